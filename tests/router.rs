//! The router against fake upstreams, the real ledger, Postgres and NATS.

mod common;

use common::dec;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokenledger::router::fake::{Behavior, Fake, Mode};
use tokenledger::settings::Settings;

/// Write a router config for (provider name, fake, models) and return its path.
fn write_config(providers: &[(&str, &str, &[&str])], first_byte_ms: u64) -> std::path::PathBuf {
    let list: Vec<Value> = providers
        .iter()
        .map(|(name, url, models)| {
            let m: serde_json::Map<String, Value> = models
                .iter()
                .map(|m| (m.to_string(), json!(format!("up-{m}"))))
                .collect();
            json!({"name": name, "base_url": url, "first_byte_timeout_ms": first_byte_ms,
                "idle_timeout_ms": 2000, "models": m})
        })
        .collect();
    let path = std::env::temp_dir().join(format!("tl-router-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(
        &path,
        json!({"providers": list, "max_retry_after_ms": 1500}).to_string(),
    )
    .unwrap();
    path
}

struct Setup {
    app: TestApp,
    key: String,
    a: Fake,
    b: Fake,
}

impl Setup {
    fn router(&self, path: &str) -> String {
        format!("{}{path}", self.app.router.as_ref().unwrap())
    }

    async fn chat(&self, body: Value) -> reqwest::Response {
        self.app
            .http
            .post(self.router("/v1/chat/completions"))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// The billing API's view of a request, once the ledger has it.
    async fn billed(&self, request_id: &str) -> Value {
        for _ in 0..200 {
            let r = self
                .app
                .get(&self.key, &format!("/v1/requests/{request_id}"))
                .await;
            if r.status() == 200 {
                return r.json().await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("request {request_id} never reached the ledger");
    }
}

/// Two fakes: `openai` serving gpt-4o-mini and gpt-4o, `anthropic` serving
/// claude-haiku-4-5; the bundled price book with a 20% markup; tenant `acme`.
async fn setup(tweak: impl FnOnce(&mut Settings)) -> Setup {
    let a = Fake::start("127.0.0.1:0").await.unwrap();
    let b = Fake::start("127.0.0.1:0").await.unwrap();
    let cfg = write_config(
        &[
            (
                "openai",
                &a.base_url,
                &["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"],
            ),
            ("anthropic", &b.base_url, &["claude-haiku-4-5"]),
        ],
        400,
    );
    let mut s = fresh_settings().await;
    s.roles = vec!["api".into(), "writer".into(), "router".into()];
    s.router_addr = "127.0.0.1:0".into();
    s.router_config = cfg;
    tweak(&mut s);
    // prices first: the router loads the book at start
    let pool = tokenledger::db::connect(&s.database_url, 1).await.unwrap();
    seed_prices_into(&pool).await;
    let app = TestApp::start(s).await;
    let key = app.tenant("acme").await;
    Setup { app, key, a, b }
}

async fn seed_prices_into(pool: &sqlx::PgPool) {
    let text = std::fs::read_to_string("config/prices/litellm-popular.json").unwrap();
    let prices = tokenledger::pricing::import::parse_litellm(&text).unwrap();
    let t0 = "2020-01-01T00:00:00Z".parse().unwrap();
    let opts = tokenledger::catalog::prices::ImportOptions {
        currency: "USD",
        first_effective_from: t0,
        effective_from: None,
        now: chrono::Utc::now(),
        skew: chrono::Duration::minutes(5),
        source: "test",
    };
    tokenledger::catalog::prices::import(pool, &prices, &opts)
        .await
        .unwrap();
    tokenledger::catalog::prices::add_markup(
        pool,
        None,
        "20".parse().unwrap(),
        Some(t0),
        chrono::Utc::now(),
        chrono::Duration::minutes(5),
    )
    .await
    .unwrap();
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers()["x-tokenledger-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Read a whole SSE body: the `data:` payloads in order.
async fn sse(r: reqwest::Response) -> Vec<String> {
    let text = r.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn chat_plain_and_streamed_are_billed_exactly_as_answered() {
    let mut s = setup(|_| {}).await;
    let msg = json!([{"role": "system", "content": "You are terse. Answer in plain words, no lists."},
        {"role": "user", "content": "Say something about ledgers, please, in a few words at most: what makes one trustworthy?"}]);

    // plain: usage passes through, usage.cost is the ledger's price, unknown fields survive
    let r = s
        .chat(json!({"model": "gpt-4o-mini", "messages": msg, "x_custom": {"kept": true}}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tokenledger-route"], "openai/gpt-4o-mini");
    let id = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["system_fingerprint"], "fp_fake");
    let u = &v["usage"];
    let billed = s.billed(&id).await;
    assert_eq!(billed["input_tokens"], u["prompt_tokens"]);
    assert_eq!(billed["output_tokens"], u["completion_tokens"]);
    assert_eq!(
        billed["cached_input_tokens"],
        u["prompt_tokens_details"]["cached_tokens"]
    );
    assert!(billed["cached_input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(dec(&billed["price_amount"]), dec(&u["cost"]));
    assert!(dec(&u["cost"]) > Decimal::ZERO);
    assert_eq!(billed["event"]["data"]["estimated"], false);
    assert_eq!(billed["event"]["data"]["provider"], "openai");
    assert!(billed["event"]["data"]["provider_request_id"]
        .as_str()
        .unwrap()
        .starts_with("chatcmpl-fake"));
    // the upstream saw its own model name and the router's usage request
    assert_eq!(s.a.requests(), 1);

    // streamed, usage asked for: the final chunk carries usage with its cost
    let r = s
        .chat(
            json!({"model": "gpt-4o-mini", "messages": msg, "stream": true,
            "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let data = sse(r).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"], json!([]));
    let billed = s.billed(&id).await;
    assert_eq!(billed["input_tokens"], last["usage"]["prompt_tokens"]);
    assert_eq!(billed["output_tokens"], last["usage"]["completion_tokens"]);
    assert_eq!(dec(&billed["price_amount"]), dec(&last["usage"]["cost"]));

    // streamed, usage not asked for: the router still bills reported usage and strips it
    let r = s
        .chat(json!({"model": "gpt-4o-mini", "messages": msg, "stream": true}))
        .await;
    let id = request_id(&r);
    let data = sse(r).await;
    assert!(data.iter().all(|d| !d.contains("\"usage\"")), "{data:?}");
    let text = streamed_text(data.iter().map(String::as_str));
    assert_eq!(text.split(' ').count(), 12);
    let billed = s.billed(&id).await;
    assert_eq!(billed["output_tokens"], 12);
    assert_eq!(billed["event"]["data"]["estimated"], false);

    // embeddings and the model list
    let r = s
        .app
        .http
        .post(s.router("/v1/embeddings"))
        .bearer_auth(&s.key)
        .json(&json!({"model": "text-embedding-3-small", "input": ["one two three four", "five"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let billed = s.billed(&id).await;
    assert_eq!(billed["input_tokens"], v["usage"]["prompt_tokens"]);
    assert_eq!(billed["output_tokens"], 0);
    let models: Value = s
        .app
        .http
        .get(s.router("/v1/models"))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"gpt-4o-mini") && ids.contains(&"anthropic/claude-haiku-4-5"));

    // bad input: OpenAI-shaped errors, nothing recorded
    let before = s.app.count("select count(*) from events").await;
    let r = s
        .chat(json!({"model": "no-such-model", "messages": msg}))
        .await;
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
    let r = s
        .app
        .http
        .post(s.router("/v1/chat/completions"))
        .bearer_auth(&s.key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .app
        .http
        .post(s.router("/v1/chat/completions"))
        .bearer_auth("tl_key_wrong")
        .json(&json!({"model": "gpt-4o-mini", "messages": msg}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    // tags the event contract would refuse are refused here, not dead-lettered later
    let r = s
        .app
        .http
        .post(s.router("/v1/chat/completions"))
        .bearer_auth(&s.key)
        .header("x-tokenledger-tags", format!("project={}", "x".repeat(300)))
        .json(&json!({"model": "gpt-4o-mini", "messages": msg}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_tags");
    s.app.drain().await;
    assert_eq!(s.app.count("select count(*) from events").await, before);
    s.app.rebuild_and_verify().await;
    s.app.stop().await;
}

#[tokio::test]
async fn fallback_on_500_429_and_timeout_reaches_the_next_candidate_and_records_the_chain() {
    let mut s = setup(|_| {}).await;
    let msg = json!([{"role": "user", "content": "hello"}]);
    let body =
        json!({"model": "gpt-4o-mini", "models": ["anthropic/claude-haiku-4-5"], "messages": msg});
    // every candidate failing: 502 in OpenAI's shape, recorded with zero tokens
    s.a.fail_next(Mode::Fail500, 1);
    s.b.fail_next(Mode::Fail500, 1);
    let r = s
        .chat(json!({"model": "openai/gpt-4o", "models": ["anthropic/claude-haiku-4-5"], "messages": msg}))
        .await;
    assert_eq!(r.status(), 502);
    let id = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unavailable");
    let billed = s.billed(&id).await;
    assert_eq!(billed["status"], "error");
    assert_eq!(billed["input_tokens"], 0);
    assert_eq!(dec(&billed["price_amount"]), Decimal::ZERO);
    assert_eq!(
        billed["event"]["data"]["fallback_from"],
        json!(["openai/gpt-4o"])
    );
    // an upstream refusing the router's key is the gateway's fault, not the client's: 502,
    // without the upstream's body (it quotes part of the operator's key)
    s.b.fail_next(Mode::Fail401, 1);
    let r = s
        .chat(json!({"model": "anthropic/claude-haiku-4-5", "messages": msg}))
        .await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_unavailable");
    assert!(!v.to_string().contains("sk-fake"), "{v}");
    // a short Retry-After on the last candidate is waited out and retried once
    s.b.set(Behavior {
        mode: Mode::Fail429,
        times: Some(1),
        retry_after_secs: 1,
        ..Behavior::default()
    });
    let t = Instant::now();
    let r = s
        .chat(json!({"model": "anthropic/claude-haiku-4-5", "messages": msg}))
        .await;
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(900));
    // the last candidate's Retry-After has cooled down by now
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // (the 429 last: its Retry-After leaves the provider cooling down)
    // (a redirect to the same, working endpoint is not followed: one call to `a`)
    for (mode, retry) in [
        (Mode::Fail500, 0),
        (Mode::Stall, 0),
        (Mode::Redirect, 0),
        (Mode::Fail401, 0),
        (Mode::Fail429, 30),
    ] {
        s.a.set(Behavior {
            mode,
            times: Some(1),
            retry_after_secs: retry,
            ..Behavior::default()
        });
        let calls = s.a.requests();
        let r = s.chat(body.clone()).await;
        assert_eq!(r.status(), 200, "{mode:?}");
        assert_eq!(s.a.requests(), calls + 1, "{mode:?}");
        assert_eq!(
            r.headers()["x-tokenledger-route"],
            "anthropic/claude-haiku-4-5"
        );
        let id = request_id(&r);
        let billed = s.billed(&id).await;
        assert_eq!(billed["provider"], "anthropic", "{mode:?}");
        assert_eq!(
            billed["event"]["data"]["fallback_from"],
            json!(["openai/gpt-4o-mini"]),
            "{mode:?}"
        );
        if mode == Mode::Fail429 {
            // Retry-After: 30 — the provider is skipped while it cools down
            let before = s.a.requests();
            let r = s.chat(body.clone()).await;
            assert_eq!(r.status(), 200);
            assert_eq!(s.a.requests(), before, "a cooling provider was called");
            let billed = s.billed(&request_id(&r)).await;
            assert_eq!(billed["provider"], "anthropic");
            // and when it is the only candidate it is still tried
            let r = s
                .chat(json!({"model": "openai/gpt-4o", "messages": msg}))
                .await;
            assert_eq!(r.status(), 200);
        }
    }
    s.app.rebuild_and_verify().await;
    s.app.stop().await;
}

#[tokio::test]
async fn cancelled_and_cut_off_streams_are_billed_with_estimated_tokens_not_zero() {
    let mut s = setup(|_| {}).await;
    let msg =
        json!([{"role": "user", "content": "Write a long story about double-entry bookkeeping."}]);
    s.a.set(Behavior {
        words: 400,
        chunk_delay_ms: 10,
        ..Behavior::default()
    });
    let r = s
        .chat(json!({"model": "gpt-4o-mini", "messages": msg, "stream": true}))
        .await;
    let id = request_id(&r);
    let mut body = r.bytes_stream();
    let mut got = 0;
    while let Some(chunk) = body.next().await {
        got += chunk.unwrap().len();
        if got > 2000 {
            break;
        }
    }
    drop(body); // the client goes away mid-stream
    let billed = s.billed(&id).await;
    assert_eq!(billed["status"], "cancelled");
    assert_eq!(billed["event"]["data"]["estimated"], true);
    assert_eq!(
        billed["event"]["data"]["estimate_method"],
        "tiktoken:o200k_base"
    );
    let out = billed["output_tokens"].as_u64().unwrap();
    assert!(out > 5 && out < 400, "output {out}");
    // the prompt, counted with the real tokenizer: 3 + 3 + the content's tokens
    assert!(billed["input_tokens"].as_u64().unwrap() > 6);
    assert!(dec(&billed["price_amount"]) > Decimal::ZERO);

    // the upstream cuts the stream off: error, estimated
    s.a.set(Behavior {
        mode: Mode::CutStream,
        words: 40,
        ..Behavior::default()
    });
    let r = s
        .chat(
            json!({"model": "gpt-4o-mini", "messages": msg, "stream": true,
            "stream_options": {"include_usage": true}}),
        )
        .await;
    let id = request_id(&r);
    // the client is told as OpenAI tells it: a last event carrying `error`, no [DONE]
    let got = r.text().await.unwrap();
    let last = got.trim_end().rsplit("\n\n").next().unwrap();
    let err: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "upstream_cut_off", "{last}");
    assert!(!got.contains("[DONE]"));
    let billed = s.billed(&id).await;
    assert_eq!(billed["status"], "error");
    assert_eq!(billed["event"]["data"]["estimated"], true);
    assert!(billed["output_tokens"].as_u64().unwrap() >= 20, "{billed}");

    // a JSON answer that breaks off after its reply's text: 502, billed for that text
    s.b.fail_next(Mode::CutBody, 1);
    let r = s
        .chat(json!({"model": "claude-haiku-4-5", "messages": msg}))
        .await;
    assert_eq!(r.status(), 502);
    let id = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_cut_off", "{v}");
    let billed = s.billed(&id).await;
    assert_eq!(billed["status"], "error");
    assert_eq!(billed["event"]["data"]["estimated"], true);
    assert!(billed["output_tokens"].as_u64().unwrap() >= 12, "{billed}");

    // a non-streaming answer without usage: estimated from the reply, and said so
    s.b.set_mode(Mode::OmitUsage);
    let r = s
        .chat(json!({"model": "claude-haiku-4-5", "messages": msg}))
        .await;
    let id = request_id(&r);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["estimated"], true);
    let billed = s.billed(&id).await;
    assert_eq!(billed["event"]["data"]["estimated"], true);
    assert_eq!(
        billed["event"]["data"]["estimate_method"],
        "approx:max(o200k_base*1.25,bytes/3)"
    );
    assert_eq!(billed["output_tokens"], v["usage"]["completion_tokens"]);
    assert!(billed["output_tokens"].as_u64().unwrap() >= 12);

    // a stream without usage whose client asked for it: the estimate comes as OpenAI's
    // last chunk (empty choices, usage) before [DONE], and is what the ledger bills
    let r = s
        .chat(
            json!({"model": "claude-haiku-4-5", "messages": msg, "stream": true,
            "stream_options": {"include_usage": true}}),
        )
        .await;
    let id = request_id(&r);
    let data = sse(r).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["object"], "chat.completion.chunk", "{last}");
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"]["estimated"], true, "{last}");
    let billed = s.billed(&id).await;
    assert_eq!(billed["event"]["data"]["estimated"], true);
    assert_eq!(billed["output_tokens"], last["usage"]["completion_tokens"]);
    assert_eq!(billed["input_tokens"], last["usage"]["prompt_tokens"]);
    assert_eq!(dec(&billed["price_amount"]), dec(&last["usage"]["cost"]));
    assert!(billed["output_tokens"].as_u64().unwrap() >= 12);
    // a stream ending `data: [DONE]` with one newline is complete, not cut off
    s.b.set_mode(Mode::ShortEnd);
    let r = s
        .chat(json!({"model": "claude-haiku-4-5", "messages": msg, "stream": true}))
        .await;
    let id = request_id(&r);
    let text = r.text().await.expect("the stream ends cleanly");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let billed = s.billed(&id).await;
    assert_eq!(billed["status"], "ok", "{billed}");
    assert_eq!(billed["event"]["data"]["estimated"], false, "{billed}");
    s.b.set_mode(Mode::OmitUsage);
    // not asked for: no usage chunk is made up
    let r = s
        .chat(json!({"model": "claude-haiku-4-5", "messages": msg, "stream": true}))
        .await;
    let data = sse(r).await;
    assert!(data.iter().all(|d| !d.contains("\"usage\"")), "{data:?}");
    // Azure's first chunk has an empty id: the response id is the next chunk's
    s.b.set_mode(Mode::AzureFilter);
    let r = s
        .chat(json!({"model": "claude-haiku-4-5", "messages": msg, "stream": true}))
        .await;
    let id = request_id(&r);
    let data = sse(r).await;
    assert!(data[0].contains("prompt_filter_results"), "{data:?}");
    let billed = s.billed(&id).await;
    let upstream_id = billed["event"]["data"]["provider_request_id"].as_str();
    assert!(
        upstream_id.is_some_and(|i| i.starts_with("chatcmpl-")),
        "{billed}"
    );
    // an upstream that is itself a gateway: its own cost and wholesale details do not
    // reach the client, whose usage.cost is the ledger's price
    s.b.set_mode(Mode::GatewayCost);
    for stream in [false, true] {
        let r = s
            .chat(
                json!({"model": "claude-haiku-4-5", "messages": msg, "stream": stream,
                "stream_options": stream.then(|| json!({"include_usage": true}))}),
            )
            .await;
        let id = request_id(&r);
        let usage = if stream {
            let data = sse(r).await;
            let with: Vec<&String> = data.iter().filter(|d| d.contains("\"usage\":{")).collect();
            assert_eq!(with.len(), 1, "{data:?}");
            serde_json::from_str::<Value>(with[0]).unwrap()["usage"].clone()
        } else {
            r.json::<Value>().await.unwrap()["usage"].clone()
        };
        assert!(usage.get("cost_details").is_none(), "{usage}");
        assert!(usage.get("is_byok").is_none(), "{usage}");
        let billed = s.billed(&id).await;
        assert_eq!(
            usage["cost"].to_string().parse::<Decimal>().unwrap(),
            dec(&billed["price_amount"]),
            "{usage}"
        );
    }
    s.app.rebuild_and_verify().await;
    s.app.stop().await;
}

/// A stream's text: the content of its chunks' deltas, joined (`data` is each event's data).
fn streamed_text<'a>(data: impl IntoIterator<Item = &'a str>) -> String {
    data.into_iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// The router gathers the upstream's events that are already in hand into one write, but
/// never waits for more: with a pause between the upstream's chunks, the client's first
/// read comes long before the stream's end.
#[tokio::test]
async fn streamed_events_are_forwarded_as_they_come() {
    let mut s = setup(|_| {}).await;
    s.a.set(Behavior {
        words: 3,
        chunk_delay_ms: 300,
        ..Behavior::default()
    });
    let r = s
        .chat(json!({"model": "gpt-4o-mini", "stream": true,
            "messages": [{"role": "user", "content": "Three words, slowly."}]}))
        .await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    assert!(!first.contains("[DONE]"), "held until the end: {first}");
    let mut all = first;
    while let Some(chunk) = body.next().await {
        all.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(all.ends_with("data: [DONE]\n\n"), "{all}");
    let text = streamed_text(all.split("\n\n").filter_map(|e| e.strip_prefix("data: ")));
    assert_eq!(text, "tokens are counted");
    let billed = s.billed(&id).await;
    assert_eq!(billed["output_tokens"], 3);
    assert_eq!(billed["status"], "ok");
    s.app.stop().await;
}

/// The API role alone (no writer) and the router's usage publisher on its own, with this
/// linger: what the publisher sends stays in the stream.
async fn publisher_alone(
    st: &Settings,
    linger: Duration,
) -> (
    TestApp,
    tokio_util::sync::CancellationToken,
    tokenledger::router::publish::Publisher,
) {
    let mut st = st.clone();
    st.roles = vec!["api".into()];
    let app = TestApp::start(st.clone()).await;
    let bus = tokenledger::bus::connect(&st).await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let publisher = tokenledger::router::publish::start(
        bus.js.clone(),
        app.pool.clone(),
        tokenledger::telemetry::Metrics::default(),
        linger,
        cancel.clone(),
    );
    (app, cancel, publisher)
}

/// The router's publisher holds a round open for its linger after the first event (one
/// write to NATS for the events of a few milliseconds), and a flush ends the round at once.
#[tokio::test]
async fn the_usage_publisher_gathers_a_round_for_its_linger_and_a_flush_ends_it() {
    use tokenledger::router::publish::Outgoing;
    // no writer: the stream keeps what arrives
    let st = fresh_settings().await;
    let (mut app, cancel, publisher) = publisher_alone(&st, Duration::from_secs(60)).await;
    for i in 0..3 {
        let ev = tokenledger::events::parse(
            usage(&format!("linger-{i}"), "acme", "gpt-4o-mini", 10, 5),
            chrono::Utc::now(),
        )
        .unwrap();
        publisher.publish(Outgoing::of(&ev, &st));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        app.stream_messages().await,
        0,
        "published before the round's linger was over"
    );
    tokio::time::timeout(Duration::from_secs(10), publisher.flush())
        .await
        .expect("a flush waited for the linger");
    assert_eq!(app.stream_messages().await, 3);
    cancel.cancel();
    app.stop().await;
}

#[tokio::test]
async fn a_denied_budget_answers_402_records_the_denial_and_no_usage() {
    let mut s = setup(|_| {}).await;
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    post_budget(
        &s,
        json!({"name": "tiny", "scope": "tenant", "period": "day",
            "amount": "0.0001", "action": "block", "effective_from": past}),
    )
    .await;
    let msg = json!([{"role": "user", "content": "hello"}]);
    // a small request fits and settles its hold
    let r = s
        .chat(json!({"model": "gpt-4o-mini", "messages": msg, "max_tokens": 20}))
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    s.app
        .wait_count(
            "select count(*) from auth_settlements where event_id <> 'lease-released'",
            1,
        )
        .await;
    // a request whose worst case does not fit is denied before any upstream call
    let calls = s.a.requests();
    let r = s
        .chat(json!({"model": "gpt-4o-mini", "messages": msg, "max_tokens": 100000}))
        .await;
    assert_eq!(r.status(), 402);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "budget_exceeded");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("\"tiny\""),
        "{v}"
    );
    assert_eq!(s.a.requests(), calls);
    // eight choices of 20 tokens each may produce 160: the hold covers all of them
    let r = s
        .chat(json!({"model": "gpt-4o-mini", "messages": msg, "max_tokens": 20, "n": 8}))
        .await;
    assert_eq!(r.status(), 402, "{}", r.text().await.unwrap());
    assert_eq!(s.a.requests(), calls);
    // with a pricier fallback the hold is its worst case: the request could end there
    let r = s
        .chat(
            json!({"model": "gpt-4o-mini", "models": ["gpt-4o"], "messages": msg,
            "max_tokens": 20}),
        )
        .await;
    assert_eq!(r.status(), 402, "{}", r.text().await.unwrap());
    assert_eq!(s.a.requests(), calls);
    let held: String = sqlx::query_scalar(
        "select requested_model from authorizations where decision = 'deny' order by decided_at desc limit 1",
    )
    .fetch_one(&s.app.owner)
    .await
    .unwrap();
    assert_eq!(held, "gpt-4o");
    assert_eq!(
        s.app
            .count("select count(*) from authorizations where decision = 'deny'")
            .await,
        3
    );
    s.app.drain().await;
    assert_eq!(s.app.count("select count(*) from events").await, 1);
    s.app.rebuild_and_verify().await;
    // the open-hold index must agree with the record
    s.app
        .tamper_is_caught(
            "insert into open_holds values (gen_random_uuid(), 'tiny', 'acme', 'x', 1, now() + interval '1 hour')",
            "open_holds: index only",
        )
        .await;
    s.app.stop().await;
}

/// Send `rounds` × 16 concurrent chat requests through the router; (served, denied).
async fn burst(s: &Setup, rounds: usize) -> (i64, i64) {
    let msg = json!([{"role": "user", "content": "hello there"}]);
    let (mut served, mut denied) = (0, 0);
    for _ in 0..rounds {
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (http, url, key, msg) = (
                s.app.http.clone(),
                s.router("/v1/chat/completions"),
                s.key.clone(),
                msg.clone(),
            );
            tasks.push(tokio::spawn(async move {
                http.post(url)
                    .bearer_auth(key)
                    .json(&json!({"model": "gpt-4o-mini", "messages": msg, "max_tokens": 1000}))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
        for t in tasks {
            match t.await.unwrap() {
                200 => served += 1,
                402 => denied += 1,
                other => panic!("status {other}"),
            }
        }
    }
    (served, denied)
}

async fn add_budget(s: &Setup, name: &str, amount: &str) {
    post_budget(
        s,
        json!({"name": name, "scope": "tenant", "period": "day",
            "amount": amount, "action": "block"}),
    )
    .await;
}

/// Create the tenant's budget and wait until the router and the authorizer have it.
/// A routing class (quality floor 0.5) of these candidates, for the tenant.
async fn add_class(s: &Setup, name: &str, candidates: Value) {
    let r = s
        .app
        .admin_post(
            "/v1/admin/routing-classes",
            Some(&json!({"name": name, "quality_floor": "0.5", "candidates": candidates})),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

async fn post_budget(s: &Setup, budget: Value) {
    let r = s
        .app
        .http
        .post(s.app.url("/v1/budgets"))
        .bearer_auth(&s.key)
        .json(&budget)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // the router and the authorizer re-read the terms every 250 ms
    s.app.wait_terms_seen().await;
}

#[tokio::test]
async fn the_router_grants_from_budget_leases_and_keeps_the_bound() {
    leases_keep_the_bound(Duration::from_millis(5)).await;
}

/// Grants written a quarter second behind: usage events settle grants before they are
/// written (such a grant never opens a hold), and the bound and the record still hold.
#[tokio::test]
async fn grants_written_after_their_settlement_keep_the_bound() {
    leases_keep_the_bound(Duration::from_millis(250)).await;
}

async fn leases_keep_the_bound(grant_flush: Duration) {
    let mut s = setup(|st| {
        st.clock_skew = Duration::ZERO;
        st.grant_flush = grant_flush;
    })
    .await;
    // gpt-4o-mini: 0.18 / 0.72 per million (20% markup): the worst case of this short
    // prompt and 1,000 output tokens is about 0.00073
    add_budget(&s, "wide", "1").await;
    // a budget it never reaches: granted in memory from leases, recorded behind
    let (served, denied) = burst(&s, 8).await;
    assert_eq!((served, denied), (128, 0));
    // written behind within milliseconds
    s.app
        .wait_count(
            "select count(*) from authorizations where decision = 'allow'",
            128,
        )
        .await;
    assert!(
        s.app.count("select count(*) from auth_lease_draws").await >= 64,
        "most grants were made in memory from a lease"
    );
    assert!(
        s.app
            .count("select count(*) from authorizations where decision = 'lease'")
            .await
            >= 1
    );
    // a narrower one, never reached either: its leases hold a few worst cases each, so
    // they are renewed over and over while the lease being replaced keeps granting; each
    // replaced lease is released once the grants drawn on it are written
    add_budget(&s, "mid", "0.04").await;
    let (served_mid, denied_mid) = burst(&s, 8).await;
    assert_eq!((served_mid, denied_mid), (128, 0));
    let mid_leases = s
        .app
        .count(
            "select count(*) from authorizations a join auth_hold_budgets h on h.hold_id = a.id
             where a.decision = 'lease' and h.budget = 'mid'",
        )
        .await;
    assert!(mid_leases > 2, "{mid_leases} leases of 'mid': renewed");
    // a tight one as well: 0.003 admits four worst cases at a time
    add_budget(&s, "cap", "0.003").await;
    let (served2, denied2) = burst(&s, 8).await;
    assert!(
        served2 > 0 && denied2 > 0,
        "served {served2}, denied {denied2}"
    );
    let served = served + served_mid + served2;
    s.app
        .wait_count("select count(*) from events", served)
        .await;
    s.app.drain().await;
    // every grant is recorded (written behind) and its holds settled by its usage event
    s.app
        .wait_count(
            "select count(*) from authorizations where decision = 'allow'",
            served,
        )
        .await;
    assert_eq!(
        s.app
            .count("select count(*) from authorizations where decision = 'allow'")
            .await,
        served
    );
    assert_eq!(
        s.app
            .count("select count(*) from authorizations where decision = 'deny'")
            .await,
        denied2
    );
    assert_eq!(
        s.app
            .count(
                "select count(*) from authorizations a where a.decision = 'allow'
                 and not exists (select 1 from auth_settlements x where x.hold_id = a.id
                                 and x.tenant_id = a.tenant_id)"
            )
            .await,
        0
    );
    if grant_flush >= Duration::from_millis(100) {
        // the case this interval is for: usage settled grants before they were written
        let first = s
            .app
            .count(
                "select count(*) from authorizations a join auth_settlements x
                   on x.hold_id = a.id and x.tenant_id = a.tenant_id
                 where a.decision = 'allow' and x.settled_at < a.decided_at",
            )
            .await;
        assert!(first > 0, "no grant was settled before it was written");
    }
    // the bound: the tight budget's spend never went past its limit (holds were worst
    // cases, leases included)
    let st: Value = s.app.get(&s.key, "/v1/budgets").await.json().await.unwrap();
    let cap = st["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["budget"]["name"] == "cap" || b["name"] == "cap")
        .unwrap_or_else(|| panic!("{st}"));
    let spent = dec(&cap["spent"]);
    assert!(spent <= "0.003".parse().unwrap(), "spent {spent}");
    assert!(spent > Decimal::ZERO);
    s.app.rebuild_and_verify().await;
    s.app.stop().await;
    // a stopping process gives its leases back
    assert_eq!(
        s.app
            .count(
                "select count(*) from authorizations a where a.decision = 'lease'
                 and not exists (select 1 from auth_settlements x where x.hold_id = a.id
                                 and x.tenant_id = a.tenant_id)"
            )
            .await,
        0
    );
    assert_eq!(
        s.app
            .count("select count(*) from open_holds where amount > 0")
            .await,
        0
    );
}

#[tokio::test]
async fn a_routing_class_follows_a_decision_change_in_kv_within_a_second() {
    let mut s = setup(|_| {}).await;
    let js =
        async_nats::jetstream::new(async_nats::connect(&s.app.settings.nats_url).await.unwrap());
    let kv = tokenledger::engine::bucket(&js, &s.app.settings.routing_bucket)
        .await
        .unwrap();
    let decision = |first: (&str, &str), second: (&str, &str)| {
        json!({"schema": "tokenledger.routing_decision.v1", "tenant_id": "acme", "class": "auto:test",
            "status": "ok", "candidates": [
                {"rank": 1, "provider": first.0, "model": first.1, "available": true},
                {"rank": 2, "provider": second.0, "model": second.1, "available": true}]})
        .to_string()
    };
    let key = tokenledger::engine::kv_key("acme", "auto:test");
    kv.put(
        &key,
        decision(("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5")).into(),
    )
    .await
    .unwrap();
    let msg = json!([{"role": "user", "content": "hi"}]);
    let route = |r: &reqwest::Response| {
        r.headers()["x-tokenledger-route"]
            .to_str()
            .unwrap()
            .to_string()
    };
    // the first decision arrives through the watch
    let mut seen = String::new();
    for _ in 0..100 {
        let r = s.chat(json!({"model": "auto:test", "messages": msg})).await;
        if r.status() == 200 {
            seen = route(&r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, "openai/gpt-4o-mini");
    // the engine re-ranks: the router follows within a second
    kv.put(
        &key,
        decision(("anthropic", "claude-haiku-4-5"), ("openai", "gpt-4o-mini")).into(),
    )
    .await
    .unwrap();
    let t = Instant::now();
    loop {
        let r = s.chat(json!({"model": "auto:test", "messages": msg})).await;
        if route(&r) == "anthropic/claude-haiku-4-5" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "still routed by the old decision after {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // a blocked decision answers 402 naming the budget
    kv.put(
        &key,
        json!({"class": "auto:test", "status": "blocked", "blocked_by": "monthly", "candidates": []})
            .to_string()
            .into(),
    )
    .await
    .unwrap();
    let t = Instant::now();
    loop {
        let r = s.chat(json!({"model": "auto:test", "messages": msg})).await;
        if r.status() == 402 {
            let v: Value = r.json().await.unwrap();
            assert!(v["error"]["message"].as_str().unwrap().contains("monthly"));
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // a blocked class is passed over for a fallback the request names after it
    let r = s
        .chat(json!({"model": "auto:test", "models": ["gpt-4o-mini"], "messages": msg}))
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(r.headers()["x-tokenledger-route"], "openai/gpt-4o-mini");
    s.app.stop().await;
}

/// A nats-server of this test's own, on a free port, with its own store.
struct OwnNats {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl OwnNats {
    fn start(port: u16, dir: &std::path::Path) -> OwnNats {
        let child = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server on PATH");
        OwnNats {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    async fn wait_up(&self) {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("nats-server did not start");
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn nats_stopped_and_restarted_during_traffic_loses_and_doubles_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("tl-nats-{}", uuid::Uuid::new_v4()));
    let mut nats = OwnNats::start(port, &dir);
    nats.wait_up().await;
    let url = format!("nats://127.0.0.1:{port}");
    let mut s = setup(|s| s.nats_url = url.clone()).await;
    let msg = json!([{"role": "user", "content": "count me once"}]);
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (http, url, key, served, stop, msg) = (
            s.app.http.clone(),
            format!("{}/v1/chat/completions", s.app.router.as_ref().unwrap()),
            s.key.clone(),
            served.clone(),
            stop.clone(),
            msg.clone(),
        );
        clients.spawn(async move {
            let mut i = 0u64;
            while !stop.is_cancelled() {
                i += 1;
                let stream = i % 2 == 0;
                let r = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"model": "gpt-4o-mini", "messages": msg, "stream": stream}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await.unwrap();
                served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    nats.stop(); // NATS goes away mid-traffic
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = served.load(std::sync::atomic::Ordering::SeqCst);
    let mut nats = OwnNats::start(port, &dir);
    nats.wait_up().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.cancel();
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }
    let total = served.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        during > 0 && total > during,
        "traffic: {during} then {total}"
    );
    // every served request is in the ledger exactly once
    for _ in 0..600 {
        if s.app.count("select count(*) from events").await >= total as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.app.count("select count(*) from events").await,
        total as i64
    );
    assert_eq!(
        s.app
            .count("select count(distinct request_id) from events")
            .await,
        total as i64
    );
    assert_eq!(s.app.count("select count(*) from router_spool").await, 0);
    s.app.rebuild_and_verify().await;
    s.app.stop().await;
    nats.stop();
}

/// The official OpenAI Python SDK (scripts/test.sh installs it from PyPI into
/// target/sdk-venv and names that interpreter in TOKENLEDGER_TEST_PYTHON).
#[tokio::test]
async fn the_official_openai_python_sdk_sees_exactly_what_the_billing_api_records() {
    let mut s = setup(|_| {}).await;
    let seen = sdk_script(
        "openai_sdk.py",
        &[
            ("ROUTER_URL", s.app.router.as_deref().unwrap()),
            ("API_KEY", &s.key),
        ],
    )
    .await;
    for case in ["plain", "stream"] {
        let v = &seen[case];
        let billed = s.billed(v["request_id"].as_str().unwrap()).await;
        assert_eq!(billed["input_tokens"], v["prompt_tokens"], "{case}");
        assert_eq!(billed["output_tokens"], v["completion_tokens"], "{case}");
        assert_eq!(billed["cached_input_tokens"], v["cached_tokens"], "{case}");
        assert!(v["cached_tokens"].as_u64().unwrap() > 0, "{case}");
        assert_eq!(billed["event"]["data"]["estimated"], false, "{case}");
        // the SDK parses JSON numbers as floats: the same decimal gives the same float
        let price = dec(&billed["price_amount"]);
        let as_float: f64 = price.to_string().parse().unwrap();
        assert_eq!(v["sdk_cost"].as_f64().unwrap(), as_float, "{case}");
        assert!(price > Decimal::ZERO);
        assert_eq!(
            v["content"].as_str().unwrap().split(' ').count(),
            12,
            "{case}"
        );
    }
    // digit for digit, as sent
    let billed = s
        .billed(seen["plain"]["request_id"].as_str().unwrap())
        .await;
    assert_eq!(
        dec(&billed["price_amount"]),
        seen["plain"]["cost"].as_str().unwrap().parse().unwrap()
    );
    assert_eq!(seen["stream_no_usage"]["saw_usage"], false);
    assert_eq!(
        seen["stream_no_usage"]["content"],
        seen["stream"]["content"]
    );
    let billed = s
        .billed(seen["stream_no_usage"]["request_id"].as_str().unwrap())
        .await;
    assert_eq!(billed["output_tokens"], 12);
    assert_eq!(seen["not_found"]["status"], 404);
    assert_eq!(seen["not_found"]["code"], "model_not_found");
    s.app.rebuild_and_verify().await;
    s.app.stop().await;
}

#[tokio::test]
async fn unknown_routes_wrong_methods_and_oversized_bodies_get_openai_errors() {
    let s = setup(|_| {}).await;
    let error_of = |r: reqwest::Response| async move {
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "an OpenAI-shaped error, not plain text"
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5, "{v}");
        v["error"]["code"].as_str().unwrap().to_string()
    };
    let r = s
        .app
        .http
        .post(s.router("/v1/completions"))
        .bearer_auth(&s.key)
        .json(&json!({"model": "gpt-4o-mini", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(error_of(r).await, "unknown_url");
    let r = s
        .app
        .http
        .get(s.router("/v1/chat/completions"))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(error_of(r).await, "method_not_allowed");
    // a body over the limit: refused before anything is authorised, routed or billed
    let big = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(tokenledger::router::MAX_BODY_BYTES)
    );
    let r = s
        .app
        .http
        .post(s.router("/v1/chat/completions"))
        .bearer_auth(&s.key)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_of(r).await, "request_too_large");
    assert_eq!(s.a.requests(), 0, "nothing reached the upstream");
    // a body well over the old 2 MB default is served (inline images are this large)
    let image = format!("data:image/png;base64,{}", "A".repeat(3 << 20));
    let r = s
        .chat(
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": image}}]}]}),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn a_round_nats_does_not_take_is_spooled_within_its_two_deadlines() {
    use tokenledger::router::publish::Outgoing;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("tl-nats-{}", uuid::Uuid::new_v4()));
    let mut nats = OwnNats::start(port, &dir);
    nats.wait_up().await;
    let mut st = fresh_settings().await;
    st.nats_url = format!("nats://127.0.0.1:{port}");
    let (mut app, cancel, publisher) = publisher_alone(&st, Duration::from_millis(5)).await;
    nats.stop();
    const N: i64 = 64;
    for i in 0..N {
        let ev = tokenledger::events::parse(
            usage(&format!("down-{i}"), "acme", "gpt-4o-mini", 10, 5),
            chrono::Utc::now(),
        )
        .unwrap();
        publisher.publish(Outgoing::of(&ev, &st));
    }
    // each ack waited out on its own would take N × 2 s (128 s) before the spool
    tokio::time::timeout(Duration::from_secs(60), publisher.flush())
        .await
        .expect("the round was spooled after its deadlines, not one per event");
    assert_eq!(app.count("select count(*) from router_spool").await, N);
    // NATS back: the re-drive publishes the spool and empties it
    let mut nats = OwnNats::start(port, &dir);
    nats.wait_up().await;
    app.wait_count("select count(*) from router_spool", 0).await;
    // the restarted server's stream info can lag what it has acknowledged for a moment
    let mut stored = 0;
    for _ in 0..100 {
        stored = app.stream_messages().await;
        if stored == N as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stored, N as u64);
    cancel.cancel();
    app.stop().await;
    nats.stop();
}

/// A routing class the published decision blocks is refused through the authoriser: the
/// 402 names the budget and the class, carries a request id, and the denial is recorded
/// like any other; nothing goes upstream and no usage is recorded.
#[tokio::test]
async fn a_blocked_routing_class_is_refused_by_the_authoriser_and_recorded() {
    let mut s = setup(|s| {
        s.clock_skew = Duration::ZERO;
        s.roles.push("pricing".into());
    })
    .await;
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    add_class(
        &s,
        "test:blk",
        json!([{"provider": "openai", "model": "gpt-4o-mini", "quality": "0.8"}]),
    )
    .await;
    post_budget(
        &s,
        json!({"name": "cap", "scope": "tenant", "period": "day", "amount": "0.0001",
            "action": "block", "effective_from": past}),
    )
    .await;
    // usage published past the router takes the tenant over its budget
    s.app
        .ingest(
            &s.app.settings.admin_token.clone(),
            &json!([usage("big", "acme", "gpt-4o-mini", 1_000_000, 0)]),
        )
        .await;
    s.app.wait_count("select count(*) from events", 1).await;
    let kv = routing_kv(&s.app.settings).await;
    let key = tokenledger::engine::kv_key("acme", "test:blk");
    kv_until(&kv, &key, |v| v["status"] == "blocked").await;
    let calls = s.a.requests();
    let msg = json!([{"role": "user", "content": "hello"}]);
    let t = Instant::now();
    let (r, v) = loop {
        let r = s
            .chat(json!({"model": "test:blk", "messages": msg, "max_tokens": 20}))
            .await;
        assert_eq!(r.status(), 402);
        let id = r
            .headers()
            .get("x-tokenledger-request-id")
            .map(|h| h.to_str().unwrap().to_string());
        let v: Value = r.json().await.unwrap();
        if v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("routing class \"test:blk\" is blocked by budget \"cap\"")
        {
            break (id, v);
        }
        // the router's watch has not seen the blocked decision yet
        assert!(t.elapsed() < Duration::from_secs(5), "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(r.is_some_and(|id| id.starts_with("req_")));
    assert_eq!(v["error"]["code"], "budget_exceeded");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("\"cap\""), "{v}");
    let auth = message
        .split("(authorization ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap();
    let row: (String, Option<String>, String) = sqlx::query_as(
        "select decision, denied_by, requested_model from authorizations where id = $1::uuid",
    )
    .bind(auth)
    .fetch_one(&s.app.owner)
    .await
    .unwrap();
    assert_eq!(
        row,
        ("deny".into(), Some("cap".into()), "gpt-4o-mini".into())
    );
    assert_eq!(s.a.requests(), calls);
    s.app.drain().await;
    assert_eq!(s.app.count("select count(*) from events").await, 1);
    s.app.stop().await;
}

#[tokio::test]
async fn a_downgrade_goes_only_to_a_model_the_router_serves() {
    // terms take effect at once (not after the clock-skew allowance)
    let mut s = setup(|s| s.clock_skew = Duration::ZERO).await;
    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    // the class's cheapest candidate, gpt-4.1-nano, is priced but no upstream here serves it
    add_class(
        &s,
        "test:cheap",
        json!([{"provider": "openai", "model": "gpt-4.1-nano", "quality": "0.8"},
            {"provider": "openai", "model": "gpt-4o-mini", "quality": "0.8"}]),
    )
    .await;
    post_budget(
        &s,
        json!({"name": "dg", "scope": "tenant", "period": "day", "amount": "0.001",
            "action": "downgrade", "downgrade_class": "test:cheap", "effective_from": past}),
    )
    .await;
    // gpt-4o's worst case (100 output tokens at $12/M with the markup) does not fit
    let msg = json!([{"role": "user", "content": "hello"}]);
    let r = s
        .chat(json!({"model": "gpt-4o", "messages": msg, "max_tokens": 100}))
        .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(r.headers()["x-tokenledger-route"], "openai/gpt-4o-mini");
    let id = request_id(&r);
    let billed = s.billed(&id).await;
    assert_eq!(billed["model"], "gpt-4o-mini");
    s.app.stop().await;
}
