//! A fake OpenAI-compatible upstream for tests, benchmarks and the demo: deterministic
//! completions and usage, streaming, and on request failures, stalls, missing usage and
//! cut streams. `tokenledger fake-upstream` runs one; tests start them in process.
//!
//! Deterministic usage: prompt tokens = 3 + per message (3 + ⌈content bytes / 4⌉);
//! completion tokens = the words of the reply (one word per stream chunk), at most
//! `max_completion_tokens` / `max_tokens`; cached tokens = half the prompt (rounded down)
//! once the prompt reaches 32 tokens; reasoning tokens = half the completion for upstream
//! model names starting with `o<digit>` or containing `reason`.
//!
//! It also stands in for a customer's webhook receiver in the demo: `POST /fake/webhooks`
//! keeps the last 100 deliveries (headers and body), `GET /fake/webhooks` lists them.
//!
//! Behaviour (`POST /fake/behavior`, JSON; `GET /fake/stats` counts requests):
//! `{"mode": "ok" | "fail_500" | "fail_429" | "stall" | "omit_usage" | "cut_stream" |
//!   "redirect" (307 to the same endpoint, which a client following it would find working),
//!   "times": n (apply to the next n requests, then back to ok; absent: until changed),
//!   "retry_after_secs": s (sent with fail_429), "words": n (reply length, default 12),
//!   "chunk_delay_ms": n (between stream chunks)}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpListener;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Ok,
    Fail500,
    Fail429,
    Stall,
    OmitUsage,
    CutStream,
    /// Answer 307 Temporary Redirect to this same endpoint (which would answer normally).
    Redirect,
    /// Refuse the router's own API key, as OpenAI does (401 `invalid_api_key`).
    Fail401,
    /// End a stream with `data: [DONE]` and one newline, not the blank line after it.
    ShortEnd,
    /// Send a JSON answer's first part (through the reply's text), then break the
    /// connection.
    CutBody,
    /// Begin a stream as Azure OpenAI does: a first chunk with an empty `id` and only
    /// `prompt_filter_results`.
    AzureFilter,
    /// Be a gateway: put its own `cost`, `cost_details` and `is_byok` in `usage`, as
    /// OpenRouter does.
    GatewayCost,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Behavior {
    #[serde(default)]
    pub mode: Mode,
    pub times: Option<u64>,
    #[serde(default)]
    pub retry_after_secs: u64,
    #[serde(default = "default_words")]
    pub words: u64,
    #[serde(default)]
    pub chunk_delay_ms: u64,
}

fn default_words() -> u64 {
    12
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            mode: Mode::Ok,
            times: None,
            retry_after_secs: 0,
            words: default_words(),
            chunk_delay_ms: 0,
        }
    }
}

#[derive(Default)]
struct Inner {
    behavior: Mutex<Behavior>,
    requests: AtomicU64,
    seq: AtomicU64,
    webhooks: Mutex<std::collections::VecDeque<Value>>,
}

/// A running fake upstream: its base URL (ending in `/v1`) and its controls.
#[derive(Clone)]
pub struct Fake {
    inner: Arc<Inner>,
    pub base_url: String,
}

impl Fake {
    /// Serve on `addr` (port 0 picks one) until the runtime ends.
    pub async fn start(addr: &str) -> anyhow::Result<Fake> {
        let l = TcpListener::bind(addr).await?;
        let base_url = format!("http://{}/v1", l.local_addr()?);
        let inner = Arc::new(Inner::default());
        let app = app(inner.clone());
        let l = axum::serve::ListenerExt::tap_io(l, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        Ok(Fake { inner, base_url })
    }

    pub fn set(&self, b: Behavior) {
        *self.inner.behavior.lock().expect("fake lock") = b;
    }

    /// Behave as `mode` says from now on, otherwise as by default.
    pub fn set_mode(&self, mode: Mode) {
        self.set(Behavior {
            mode,
            ..Behavior::default()
        });
    }

    /// Fail (or stall, ...) the next `times` requests, then answer normally.
    pub fn fail_next(&self, mode: Mode, times: u64) {
        self.set(Behavior {
            mode,
            times: Some(times),
            ..Behavior::default()
        });
    }

    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }
}

fn app(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/fake/behavior", post(set_behavior))
        .route("/fake/stats", get(stats))
        .route("/fake/webhooks", post(webhook).get(webhooks))
        // like a real provider, it takes inline images and audio (MBs of base64)
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(inner)
}

async fn set_behavior(State(st): State<Arc<Inner>>, Json(b): Json<Behavior>) -> StatusCode {
    *st.behavior.lock().expect("fake lock") = b;
    StatusCode::NO_CONTENT
}

async fn stats(State(st): State<Arc<Inner>>) -> Json<Value> {
    Json(json!({"requests": st.requests.load(Ordering::Relaxed)}))
}

/// A webhook receiver: keep the delivery's Standard Webhooks headers and body.
async fn webhook(
    State(st): State<Arc<Inner>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> StatusCode {
    let h = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut w = st.webhooks.lock().expect("fake lock");
    if w.len() >= 100 {
        w.pop_front();
    }
    w.push_back(json!({
        "webhook-id": h("webhook-id"), "webhook-timestamp": h("webhook-timestamp"),
        "webhook-signature": h("webhook-signature"),
        "body": serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body)),
    }));
    StatusCode::NO_CONTENT
}

async fn webhooks(State(st): State<Arc<Inner>>) -> Json<Value> {
    let w = st.webhooks.lock().expect("fake lock");
    Json(json!({"data": w.iter().collect::<Vec<_>>()}))
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]}))
}

/// The behaviour for this request (a `times` budget is used up one request at a time).
fn take(st: &Inner) -> Behavior {
    st.requests.fetch_add(1, Ordering::Relaxed);
    let mut b = st.behavior.lock().expect("fake lock");
    let now = b.clone();
    if let Some(t) = b.times {
        if t <= 1 {
            *b = Behavior {
                words: b.words,
                chunk_delay_ms: b.chunk_delay_ms,
                ..Behavior::default()
            };
        } else {
            b.times = Some(t - 1);
        }
    }
    now
}

fn error(status: StatusCode, message: &str, retry_after: u64) -> Response {
    let mut r = (
        status,
        Json(json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}})),
    )
        .into_response();
    if retry_after > 0 {
        r.headers_mut().insert(
            header::RETRY_AFTER,
            retry_after.to_string().parse().unwrap(),
        );
    }
    r
}

/// Failures and stalls shared by every endpoint; `None` to answer normally.
async fn misbehave(b: &Behavior, path: &str) -> Option<Response> {
    match b.mode {
        Mode::Redirect => Some(
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, path.to_string())],
            )
                .into_response(),
        ),
        Mode::Fail500 => Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "fake upstream: injected failure",
            0,
        )),
        Mode::Fail401 => Some(error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided: sk-fake...abcd",
            0,
        )),
        Mode::Fail429 => Some(error(
            StatusCode::TOO_MANY_REQUESTS,
            "fake upstream: rate limited",
            b.retry_after_secs,
        )),
        Mode::Stall => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Some(error(StatusCode::GATEWAY_TIMEOUT, "stalled", 0))
        }
        _ => None,
    }
}

/// Prompt tokens of a chat body, by the rule in the module documentation.
pub fn prompt_tokens(body: &Value) -> u64 {
    let mut n = 3;
    for m in body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let bytes = match m.get("content") {
            Some(Value::String(s)) => s.len(),
            Some(other) => other.to_string().len(),
            None => 0,
        };
        n += 3 + (bytes as u64).div_ceil(4);
    }
    n
}

const WORDS: [&str; 8] = [
    "tokens", "are", "counted", "once", "and", "billed", "exactly", "right",
];

/// `usage` as the upstream reports it: OpenAI's, plus a gateway's own cost in that mode.
fn reported_usage(b: &Behavior, model: &str, prompt: u64, completion: u64) -> Value {
    let mut u = usage_of(model, prompt, completion);
    if b.mode == Mode::GatewayCost {
        u["cost"] = json!(0.000123);
        u["is_byok"] = json!(false);
        u["cost_details"] = json!({"upstream_inference_cost": 0.0001});
    }
    u
}

fn usage_of(model: &str, prompt: u64, completion: u64) -> Value {
    let cached = if prompt >= 32 { prompt / 2 } else { 0 };
    let reasoning =
        if (model.len() > 1 && model.starts_with('o') && model.as_bytes()[1].is_ascii_digit())
            || model.contains("reason")
        {
            completion / 2
        } else {
            0
        };
    json!({"prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}})
}

async fn chat(State(st): State<Arc<Inner>>, body: Bytes) -> Response {
    let b = take(&st);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not JSON", 0);
    };
    if let Some(r) = misbehave(&b, "/v1/chat/completions").await {
        return r;
    }
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("fake-model")
        .to_string();
    let limit = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let words = b.words.min(limit);
    let prompt = prompt_tokens(&req);
    let id = format!(
        "chatcmpl-fake{:012}",
        st.seq.fetch_add(1, Ordering::Relaxed)
    );
    let created = chrono::Utc::now().timestamp();
    let finish = if words < b.words { "length" } else { "stop" };
    if req.get("stream").and_then(Value::as_bool) != Some(true) {
        let text: Vec<&str> = (0..words)
            .map(|i| WORDS[i as usize % WORDS.len()])
            .collect();
        let mut resp = json!({"id": id, "object": "chat.completion", "created": created,
            "model": model, "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text.join(" "),
                "refusal": null}, "logprobs": null, "finish_reason": finish}],
            "service_tier": "default"});
        if b.mode != Mode::OmitUsage {
            resp["usage"] = reported_usage(&b, &model, prompt, words);
        }
        if b.mode == Mode::CutBody {
            let bytes = resp.to_string().into_bytes();
            // through the reply's text: up to the member after `content`
            let upto = bytes
                .windows(9)
                .position(|w| w == b"\"refusal\"")
                .unwrap_or(bytes.len() / 2);
            let first = Bytes::from(bytes[..upto].to_vec());
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
            tokio::spawn(async move {
                let _ = tx.send(Ok(first)).await;
                // after a pause, so the headers and the first part reach the client
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx
                    .send(Err(std::io::Error::other("fake upstream cut the body")))
                    .await;
            });
            let parts = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            });
            let mut r = Response::new(Body::from_stream(parts));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            );
            return r;
        }
        return Json(resp).into_response();
    }
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true)
        && b.mode != Mode::OmitUsage;
    let cut = b.mode == Mode::CutStream;
    let short_end = b.mode == Mode::ShortEnd;
    let azure = b.mode == Mode::AzureFilter;
    let usage = reported_usage(&b, &model, prompt, words);
    let delay = Duration::from_millis(b.chunk_delay_ms);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        // every chunk is the same object but for its delta and finish reason, so it is
        // written around them as text: a `json!` tree per chunk made the fake, which
        // shares the benchmark's two cores with the router, cost more CPU per streamed
        // request than the router itself
        let head = format!(
            r#"data: {{"id":{},"object":"chat.completion.chunk","created":{created},"model":{},"system_fingerprint":"fp_fake","choices":[{{"index":0,"delta":"#,
            Value::from(id.as_str()),
            Value::from(model.as_str())
        );
        let tail = if include_usage {
            r#"}],"usage":null}"#
        } else {
            "}]}"
        };
        let chunk = |delta: &str, finish: &str| {
            Bytes::from(format!(
                "{head}{delta},\"logprobs\":null,\"finish_reason\":{finish}{tail}\n\n"
            ))
        };
        let mut out = Vec::new();
        if azure {
            out.push(Bytes::from_static(
                br#"data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}

"#,
            ));
        }
        out.push(chunk(r#"{"role":"assistant","content":""}"#, "null"));
        let send_until = if cut { words / 2 } else { words };
        for i in 0..words {
            let w = WORDS[i as usize % WORDS.len()];
            let text = if i == 0 {
                w.to_string()
            } else {
                format!(" {w}")
            };
            out.push(chunk(&json!({"content": text}).to_string(), "null"));
        }
        for (i, c) in out.into_iter().enumerate() {
            if cut && i as u64 > send_until {
                // the connection ends mid-stream: no finish, no usage, no [DONE] (after
                // a pause, so what was sent reaches the client first)
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx
                    .send(Err(std::io::Error::other("fake upstream cut the stream")))
                    .await;
                return;
            }
            if tx.send(Ok(c)).await.is_err() {
                return;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
        }
        let _ = tx
            .send(Ok(chunk("{}", &Value::from(finish).to_string())))
            .await;
        if include_usage {
            let u = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": "fp_fake", "choices": [],
                "usage": usage});
            let _ = tx.send(Ok(Bytes::from(format!("data: {u}\n\n")))).await;
        }
        let done: &'static [u8] = if short_end {
            b"data: [DONE]\n"
        } else {
            b"data: [DONE]\n\n"
        };
        let _ = tx.send(Ok(Bytes::from_static(done))).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("response")
}

async fn embeddings(State(st): State<Arc<Inner>>, body: Bytes) -> Response {
    let b = take(&st);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "body is not JSON", 0);
    };
    if let Some(r) = misbehave(&b, "/v1/embeddings").await {
        return r;
    }
    let inputs: Vec<u64> = match req.get("input") {
        Some(Value::String(s)) => vec![(s.len() as u64).div_ceil(4)],
        Some(Value::Array(a)) => a
            .iter()
            .map(|i| match i {
                Value::String(s) => (s.len() as u64).div_ceil(4),
                Value::Array(t) => t.len() as u64,
                _ => 1,
            })
            .collect(),
        _ => return error(StatusCode::BAD_REQUEST, "input is required", 0),
    };
    let prompt: u64 = inputs.iter().sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({"object": "embedding", "index": i,
                "embedding": (0..8).map(|k| ((i as u64 + k + n) % 7) as f64 / 7.0).collect::<Vec<_>>()})
        })
        .collect();
    let mut resp = json!({"object": "list", "data": data,
        "model": req.get("model").cloned().unwrap_or(json!("fake-embedding"))});
    if b.mode != Mode::OmitUsage {
        resp["usage"] = json!({"prompt_tokens": prompt, "total_tokens": prompt});
    }
    Json(resp).into_response()
}
