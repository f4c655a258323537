//! Integration tests of the core pipeline against real Postgres and NATS.

mod common;

use std::time::Duration;

use common::{fresh_settings, sdk_script, usage, TestApp, ADMIN};
use serde_json::{json, Value};

const EVENTS: &str = "select count(*) from events";
const TRANSFERS: &str = "select count(*) from transfers";

/// A service whose writer stages batches without looking their keys up from the first
/// batch on (`lookups` = 0: the unique indexes catch duplicates and the batch is applied
/// again with lookups) or only after the first `lookups` batches.
async fn app_with_lookups(lookups: u32) -> TestApp {
    let mut s = fresh_settings().await;
    s.writer_lookup_batches = lookups;
    let app = TestApp::start(s).await;
    app.seed_prices().await;
    app
}

#[tokio::test]
async fn duplicates_resubmitted_republished_and_redelivered_are_charged_once() {
    for lookups in [8, 0] {
        duplicates_charged_once(lookups).await;
    }
}

async fn duplicates_charged_once(lookups: u32) {
    let mut app = app_with_lookups(lookups).await;
    let key = app.tenant("acme").await;
    let ev = usage("e-1", "acme", "gpt-4o", 1000, 500);
    for _ in 0..3 {
        app.ingest(&key, &ev).await;
    }
    // committed first, so the copy below comes in a batch of its own
    app.wait_count(EVENTS, 1).await;
    // republished by another producer, past JetStream's duplicate window (a new msg id)
    let bus = tokenledger::bus::connect(&app.settings).await.unwrap();
    let parsed = tokenledger::events::parse(ev.clone(), chrono::Utc::now()).unwrap();
    let subject = app.settings.usage_subject("acme");
    bus.publish_with_id(subject, parsed.canonical.clone().into(), "another-id")
        .await
        .unwrap()
        .await
        .unwrap();
    app.drain().await;
    assert_eq!(app.count(EVENTS).await, 1);
    assert_eq!(app.count(TRANSFERS).await, 2);
    assert_eq!(app.count("select count(*) from event_conflicts").await, 0);
    let r: Value = app
        .get(&key, "/v1/requests/req-e-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["price_amount"], "0.009"); // (1000 x 2.5 + 500 x 10) / 1e6 x 1.2
    assert_eq!(r["cost_amount"], "0.0075");
    app.stop().await;
}

#[tokio::test]
async fn conflicting_duplicate_is_recorded_and_the_first_kept() {
    for lookups in [8, 0] {
        conflicting_duplicate(lookups).await;
    }
}

async fn conflicting_duplicate(lookups: u32) {
    let mut app = app_with_lookups(lookups).await;
    let key = app.tenant("acme").await;
    app.ingest(&key, &usage("e-1", "acme", "gpt-4o", 1000, 500))
        .await;
    app.wait_count(EVENTS, 1).await;
    app.ingest(&key, &usage("e-1", "acme", "gpt-4o", 9999, 500))
        .await;
    // a different event id reusing the request id is a conflict too
    let mut other = usage("e-2", "acme", "gpt-4o", 10, 10);
    other["data"]["request_id"] = json!("req-e-1");
    app.ingest(&key, &other).await;
    app.wait_count("select count(*) from event_conflicts", 2)
        .await;
    app.drain().await;
    assert_eq!(app.count(EVENTS).await, 1);
    let kinds: Vec<String> = sqlx::query_scalar("select kind from event_conflicts order by id")
        .fetch_all(&app.owner)
        .await
        .unwrap();
    assert_eq!(kinds, ["payload_differs", "request_id_taken"]);
    // a conflicting copy that would not rate (an unpriced model) is a conflict all the same,
    // not a dead letter: it is never written, so no unique index would have caught it
    app.ingest(&key, &usage("e-1", "acme", "no-such-model", 1, 1))
        .await;
    app.wait_count("select count(*) from event_conflicts", 3)
        .await;
    app.drain().await;
    assert_eq!(app.count("select count(*) from dead_letters").await, 0);
    let r: Value = app
        .get(&key, "/v1/requests/req-e-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["input_tokens"], 1000);
    app.stop().await;
}

#[tokio::test]
async fn same_id_under_two_tenants_is_two_events() {
    let app = TestApp::spawn().await;
    let a = app.tenant("alpha").await;
    let b = app.tenant("beta").await;
    app.ingest(&a, &usage("same", "alpha", "gpt-4o", 100, 100))
        .await;
    app.ingest(&b, &usage("same", "beta", "gpt-4o", 100, 100))
        .await;
    app.wait_count(EVENTS, 2).await;
    app.drain().await;
    assert_eq!(app.count(EVENTS).await, 2);
    assert_eq!(app.count("select count(*) from event_conflicts").await, 0);
}

#[tokio::test]
async fn runtime_role_cannot_change_the_record() {
    let app = TestApp::spawn().await;
    let key = app.tenant("acme").await;
    app.post_events(&key, &usage("e-1", "acme", "gpt-4o", 10, 10))
        .await;
    app.wait_count(TRANSFERS, 2).await;
    for table in [
        "events",
        "transfers",
        "dead_letters",
        "event_conflicts",
        "price_versions",
        "markup_rules",
        "tenants",
    ] {
        for sql in [
            format!("update {table} set tenant_id = tenant_id"),
            format!("delete from {table}"),
            format!("truncate {table} cascade"),
        ] {
            let sql = sql.replace(
                "set tenant_id = tenant_id",
                if table == "tenants" {
                    "set name = name"
                } else if table.starts_with("price") || table.starts_with("markup") {
                    "set created_at = created_at"
                } else {
                    "set tenant_id = tenant_id"
                },
            );
            let err = sqlx::query(&sql).execute(&app.pool).await.expect_err(&sql);
            assert!(
                err.to_string().contains("permission denied"),
                "{sql}: {err}"
            );
        }
    }
    // the owner is refused by the triggers
    for sql in [
        "update events set source = 'x'",
        "delete from transfers",
        "truncate event_conflicts",
        "truncate dead_letters cascade",
    ] {
        let err = sqlx::query(sql).execute(&app.owner).await.expect_err(sql);
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(app.count(EVENTS).await, 1);
}

#[tokio::test]
async fn tenant_keys_see_only_their_tenant() {
    let app = TestApp::spawn().await;
    let a = app.tenant("alpha").await;
    let b = app.tenant("beta").await;
    app.post_events(&b, &usage("b-1", "beta", "gpt-4o", 100, 100))
        .await;
    app.wait_count(EVENTS, 1).await;
    assert_eq!(app.get(&b, "/v1/requests/req-b-1").await.status(), 200);
    assert_eq!(app.get(&a, "/v1/requests/req-b-1").await.status(), 404);
    let list: Value = app.get(&a, "/v1/requests").await.json().await.unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let today = chrono::Utc::now().date_naive();
    let q = format!(
        "/v1/usage?from={}&to={}",
        today,
        today + chrono::Duration::days(1)
    );
    let usage_a: Value = app.get(&a, &q).await.json().await.unwrap();
    assert_eq!(usage_a["data"].as_array().unwrap().len(), 0);
    let usage_b: Value = app.get(&b, &q).await.json().await.unwrap();
    assert_eq!(usage_b["data"][0]["requests"], 1);
    // a tenant's balances ignore ?tenant_id=, and that field is operator-only
    let bal: Value = app
        .get(&a, "/v1/balances?tenant_id=beta")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(bal["data"].as_array().unwrap().len(), 0);
    // a tenant key cannot submit another tenant's events, nor adjustments
    let r = app
        .post_events(&a, &usage("x", "beta", "gpt-4o", 1, 1))
        .await;
    assert_eq!(r.status(), 403);
    // admin endpoints refuse tenant keys; no key at all is 401
    assert_eq!(app.get(&a, "/v1/admin/tenants").await.status(), 403);
    assert_eq!(app.status("/v1/balances").await, 401);
    // a revoked key stops working
    let keys: Value = app
        .get(ADMIN, "/v1/admin/tenants/alpha/api-keys")
        .await
        .json()
        .await
        .unwrap();
    let id = keys[0]["id"].as_str().unwrap();
    let r = app
        .admin_post(&format!("/v1/admin/api-keys/{id}/revoke"), None)
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(app.get(&a, "/v1/balances").await.status(), 401);
}

/// Every bad-input case gets a problem+json error and publishes nothing.
#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let key = app.tenant("acme").await;
    let good = usage("ok-1", "acme", "gpt-4o", 10, 10);
    let with = |path: &[&str], v: Value| {
        let mut e = good.clone();
        let mut cur = &mut e;
        for p in &path[..path.len() - 1] {
            cur = &mut cur[*p];
        }
        cur[path[path.len() - 1]] = v;
        e
    };
    let future = (chrono::Utc::now() + chrono::Duration::minutes(10)).to_rfc3339();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "unknown field",
            with(&["data", "colour"], json!("red")),
            "unknown_field",
        ),
        (
            "unknown envelope field (not an extension name)",
            with(&["Extra_Field"], json!(1)),
            "unknown_field",
        ),
        (
            "source not a URI-reference",
            with(&["source"], json!("my router")),
            "invalid_uri_reference",
        ),
        (
            "relative dataschema",
            with(&["dataschema"], json!("/schemas/usage")),
            "invalid_uri",
        ),
        (
            "extension of no CloudEvents type",
            with(&["myext"], json!({"a": 1})),
            "invalid_extension",
        ),
        (
            "extension integer beyond 32 bits",
            with(&["myext"], json!(1u64 << 31)),
            "invalid_extension",
        ),
        (
            "binary data",
            with(&["data_base64"], json!("AAAA")),
            "unsupported",
        ),
        (
            "negative",
            with(&["data", "input_tokens"], json!(-1)),
            "negative",
        ),
        (
            "fractional",
            with(&["data", "output_tokens"], json!(1.5)),
            "not_a_whole_number",
        ),
        (
            "absurd",
            with(&["data", "input_tokens"], json!(100_000_001u64)),
            "too_large",
        ),
        (
            "cache over input",
            with(&["data", "cached_input_tokens"], json!(11)),
            "exceeds_input",
        ),
        (
            "reasoning over output",
            with(&["data", "reasoning_tokens"], json!(11)),
            "exceeds_output",
        ),
        ("future", with(&["time"], json!(future)), "in_future"),
        ("empty id", with(&["id"], json!("")), "empty"),
        (
            "empty request id",
            with(&["data", "request_id"], json!("")),
            "empty",
        ),
        (
            "bad tenant",
            with(&["data", "tenant_id"], json!("Acme!")),
            "invalid_tenant_id",
        ),
        (
            "bad status",
            with(&["data", "status"], json!("weird")),
            "invalid_status",
        ),
        (
            "unknown type",
            with(&["type"], json!("other.v1")),
            "unknown_type",
        ),
        (
            "missing model",
            with(&["data", "model"], Value::Null),
            "missing",
        ),
        ("long id", with(&["id"], json!("x".repeat(129))), "too_long"),
    ];
    for (name, ev, code) in cases {
        let r = app.post_events(&key, &ev).await;
        assert_eq!(r.status(), 422, "{name}");
        assert_eq!(
            r.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "invalid_events", "{name}");
        let codes: Vec<&str> = body["errors"][0]["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["code"].as_str().unwrap())
            .collect();
        assert!(codes.contains(&code), "{name}: {codes:?}");
    }
    // a batch with one bad event names it and publishes nothing
    let batch = json!([
        good,
        usage("ok-2", "acme", "gpt-4o", 1, 1),
        with(&["data", "input_tokens"], json!(-5))
    ]);
    let r = app
        .http
        .post(app.url("/v1/events"))
        .bearer_auth(&key)
        .header("content-type", "application/cloudevents-batch+json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["index"], 2);
    assert_eq!(body["errors"][0]["id"], "ok-1");
    // malformed JSON, wrong content type, too many events, too large a body
    let raw = |ct: &str, body: String| {
        app.http
            .post(app.url("/v1/events"))
            .bearer_auth(&key)
            .header("content-type", ct.to_string())
            .body(body)
            .send()
    };
    assert_eq!(
        raw("application/json", "{not json".into())
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        raw("text/plain", good.to_string()).await.unwrap().status(),
        415
    );
    let many = Value::Array(
        (0..1001)
            .map(|i| usage(&format!("m{i}"), "acme", "gpt-4o", 1, 1))
            .collect(),
    );
    assert_eq!(
        raw("application/json", many.to_string())
            .await
            .unwrap()
            .status(),
        422
    );
    assert_eq!(
        raw(
            "application/json",
            "[".to_string() + &" ".repeat(1024 * 1024 + 10) + "]"
        )
        .await
        .unwrap()
        .status(),
        413
    );
    assert_eq!(app.stream_messages().await, 0);
    assert_eq!(app.count(EVENTS).await, 0);
    // other API errors are problem+json too
    let r = app.get(&key, "/v1/requests?limit=0").await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = app.get(&key, "/v1/nothing-here").await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    // the framework's own rejections too: a path parameter of the wrong type, a body over
    // its route's limit, a missing or wrong key (which names its scheme)
    let problem = |r: reqwest::Response, status: u16| async move {
        assert_eq!(r.status(), status);
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], status, "{v}");
        assert!(!v["detail"].as_str().unwrap().is_empty(), "{v}");
        v
    };
    let admin = app.settings.admin_token.clone();
    problem(
        app.get(&admin, "/v1/admin/reconciliations/not-a-number")
            .await,
        400,
    )
    .await;
    let r = app
        .http
        .post(app.url("/v1/admin/prices"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(vec![b' '; 200 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(problem(r, 413).await["code"], "body_too_large");
    let r = app.get("wrong", "/v1/balances").await;
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    problem(r, 401).await;
}

/// CloudEvents as its SDKs send them: optional and extension attributes are kept in the
/// stored envelope, the HTTP binary content mode (`ce-` headers) is the same event as the
/// structured one, and an empty batch is valid.
#[tokio::test]
async fn cloudevents_binary_mode_extensions_and_empty_batches_are_accepted() {
    let app = TestApp::spawn().await;
    let key = app.tenant("acme").await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut ev = usage("ce-1", "acme", "gpt-4o", 10, 10);
    ev["source"] = json!("https://gw.example.com/router");
    ev["subject"] = json!("req-ce-1");
    ev["dataschema"] = json!("https://tokenledger.dev/schemas/usage.v1.json");
    ev["traceparent"] = json!(traceparent);
    ev["retries"] = json!(2);
    ev["sampled"] = json!(true);
    ev["unsetext"] = Value::Null;
    let r = app.post_events(&key, &ev).await;
    assert_eq!(r.status(), 202);
    app.wait_count(EVENTS, 1).await;
    let envelope: Vec<u8> = sqlx::query_scalar("select envelope from events")
        .fetch_one(&app.owner)
        .await
        .unwrap();
    let stored: Value = serde_json::from_slice(&envelope).unwrap();
    assert_eq!(stored["traceparent"], traceparent);
    assert_eq!(stored["subject"], "req-ce-1");
    assert_eq!(stored["dataschema"], ev["dataschema"]);
    // Integer and Boolean extensions are kept as their canonical strings; null is unset
    assert_eq!(stored["retries"], "2");
    assert_eq!(stored["sampled"], "true");
    assert!(stored.get("unsetext").is_none(), "{stored}");
    // the same event in binary mode: a duplicate, not a conflict
    let binary = |headers: Vec<(&str, String)>, body: Value| {
        let mut req = app
            .http
            .post(app.url("/v1/events"))
            .bearer_auth(&key)
            .header("content-type", "application/json; charset=utf-8");
        for (h, v) in headers {
            req = req.header(h, v);
        }
        req.body(body.to_string()).send()
    };
    let attr = |k: &str| ev[k].as_str().unwrap().to_string();
    let headers = vec![
        ("ce-specversion", "1.0".to_string()),
        ("ce-id", attr("id")),
        ("ce-source", attr("source")),
        ("ce-type", attr("type")),
        ("ce-time", attr("time").replace('+', "%2B")),
        ("ce-subject", "%72eq-ce-1".to_string()),
        ("ce-dataschema", attr("dataschema")),
        ("ce-traceparent", traceparent.to_string()),
        ("ce-retries", "2".to_string()),
        ("ce-sampled", "\"true\"".to_string()),
    ];
    let r = binary(headers.clone(), ev["data"].clone()).await.unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["ids"], json!(["ce-1"]));
    app.drain().await;
    assert_eq!(app.count(EVENTS).await, 1);
    assert_eq!(app.count("select count(*) from event_conflicts").await, 0);
    // a new binary-mode event is recorded with its own attributes
    let mut second = headers.clone();
    second[1].1 = "ce-2".into();
    let mut data = ev["data"].clone();
    data["request_id"] = json!("req-ce-2");
    assert_eq!(binary(second, data).await.unwrap().status(), 202);
    app.wait_count(EVENTS, 2).await;
    // binary-mode mistakes are named: a ce-datacontenttype header, a header that is
    // not percent-encoded UTF-8, an attribute that breaks the contract
    let mut with_ct = headers.clone();
    with_ct.push(("ce-datacontenttype", "application/json".into()));
    let r = binary(with_ct, ev["data"].clone()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let mut overlong = headers.clone();
    overlong[6].1 = "%C0%A0".into();
    assert_eq!(
        binary(overlong, ev["data"].clone()).await.unwrap().status(),
        400
    );
    let mut bad_source = headers.clone();
    bad_source[2].1 = "my%20router".into();
    let r = binary(bad_source, ev["data"].clone()).await.unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["errors"][0]["field"], "source", "{body}");
    // an empty batch is a valid batch: accepted, nothing published
    let r = app
        .http
        .post(app.url("/v1/events"))
        .bearer_auth(&key)
        .header("content-type", "application/cloudevents-batch+json")
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, json!({"accepted": 0, "ids": []}));
    app.drain().await;
    assert_eq!(app.count(EVENTS).await, 2);
    assert_eq!(app.stream_messages().await, 2);
}

/// The CloudEvents Python SDK (scripts/test.sh installs it from PyPI into target/sdk-venv
/// and names that interpreter in TOKENLEDGER_TEST_PYTHON) builds and sends usage events in
/// structured mode, binary mode with and without a datacontenttype, and as a batch.
#[tokio::test]
async fn the_cloudevents_python_sdk_is_understood_in_every_content_mode() {
    let app = TestApp::spawn().await;
    let key = app.tenant("acme").await;
    let seen = sdk_script(
        "cloudevents_sdk.py",
        &[
            ("API_URL", &app.base),
            ("API_KEY", &key),
            ("TENANT", "acme"),
        ],
    )
    .await;
    for case in ["structured", "binary", "bare"] {
        let answer = &seen[case]["answer"];
        assert_eq!(answer[0], 202, "{case}: {answer}");
        assert_eq!(answer[1]["ids"], json!([seen[case]["id"]]), "{case}");
    }
    // the SDK sent no Content-Type for the event without a datacontenttype
    let bare = seen["bare"]["headers"].as_object().unwrap();
    assert!(
        !bare.keys().any(|k| k.eq_ignore_ascii_case("content-type")),
        "{bare:?}"
    );
    assert_eq!(seen["again"]["answer"][0], 202);
    assert_eq!(
        seen["again"]["answer"][1]["ids"],
        json!([seen["structured"]["id"]])
    );
    assert_eq!(seen["batch"]["answer"][0], 202);
    assert_eq!(seen["batch"]["answer"][1]["ids"], seen["batch"]["ids"]);
    assert_eq!(
        seen["empty"]["answer"][1],
        json!({"accepted": 0, "ids": []})
    );
    app.wait_count(EVENTS, 6).await;
    app.drain().await;
    assert_eq!(app.count(EVENTS).await, 6);
    assert_eq!(app.count("select count(*) from event_conflicts").await, 0);
    let envelope = |request: &'static str| {
        let pool = app.owner.clone();
        async move {
            let b: Vec<u8> =
                sqlx::query_scalar("select envelope from events where request_id = $1")
                    .bind(request)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            serde_json::from_slice::<Value>(&b).unwrap()
        }
    };
    let e = envelope("sdk-structured").await;
    assert_eq!(e["source"], "https://gw.example.com/router/eu-1");
    assert_eq!(e["subject"], "sdk-structured");
    assert_eq!(
        e["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    // binary-mode extensions are kept as the headers said them (this SDK writes a Python
    // bool as `True`, not CloudEvents' `true`: the ledger does not interpret them)
    let e = envelope("sdk-binary").await;
    let sent = &seen["binary"]["headers"];
    assert_eq!(e["sampled"], sent["ce-sampled"]);
    assert_eq!(e["retries"], "2");
    let r: Value = app
        .get(&key, "/v1/requests/sdk-bare")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["input_tokens"], 1200, "{r}");
    assert_eq!(r["cached_input_tokens"], 200, "{r}");
}

#[tokio::test]
async fn unpriced_model_is_dead_lettered_then_charged_once_after_a_price_and_redrive() {
    let app = TestApp::spawn().await;
    let key = app.tenant("acme").await;
    let ev = usage("u-1", "acme", "house-model-1", 2_000_000, 1_000_000);
    app.ingest(&key, &ev).await;
    app.wait_count(
        "select count(*) from dead_letters where reason = 'unpriced_model'",
        1,
    )
    .await;
    assert_eq!(app.count(EVENTS).await, 0);
    let dl: Value = app
        .get(ADMIN, "/v1/admin/dead-letters?reason=unpriced_model")
        .await
        .json()
        .await
        .unwrap();
    let id = dl["data"][0]["id"].as_i64().unwrap();
    assert_eq!(dl["data"][0]["resolved"], false);
    // the first price of a model may be dated back
    let r = app.http.post(app.url("/v1/admin/prices")).bearer_auth(ADMIN).json(&json!({
        "provider": "openai", "model": "house-model-1", "side": "cost", "currency": "USD",
        "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": "1.5", "output_per_mtok": "3"
    })).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // ... but a change to it may not
    let r = app.admin_post("/v1/admin/prices", Some(&json!({
            "provider": "openai", "model": "house-model-1", "side": "cost", "currency": "USD",
            "effective_from": "2021-01-01T00:00:00Z", "input_per_mtok": "9", "output_per_mtok": "9"
        }))).await;
    assert_eq!(r.status(), 422);
    for _ in 0..2 {
        let r = app
            .admin_post(&format!("/v1/admin/dead-letters/{id}/redrive"), None)
            .await;
        assert_eq!(r.status(), 202);
    }
    app.wait_count(EVENTS, 1).await;
    app.drain().await;
    assert_eq!(app.count(EVENTS).await, 1);
    assert_eq!(app.count(TRANSFERS).await, 2);
    let r: Value = app
        .get(&key, "/v1/requests/req-u-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["cost_amount"], "6"); // 2 x 1.5 + 1 x 3
    assert_eq!(r["price_amount"], "7.2");
    let dl: Value = app
        .get(ADMIN, &format!("/v1/admin/dead-letters/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(dl["resolved"], true);
    assert_eq!(dl["redrives"], 2);
}

#[tokio::test]
async fn unknown_tenant_and_adjustment_currency_mismatch_are_dead_lettered() {
    let app = TestApp::spawn().await;
    app.tenant("acme").await;
    app.ingest(ADMIN, &usage("g-1", "ghost", "gpt-4o", 1, 1))
        .await;
    let adj = json!({"specversion": "1.0", "id": "adj-eur", "source": "ops", "type": "tokenledger.adjustment.v1",
        "time": chrono::Utc::now().to_rfc3339(),
        "data": {"tenant_id": "acme", "direction": "credit", "amount": "5", "currency": "EUR", "reason": "goodwill"}});
    app.ingest(ADMIN, &adj).await;
    app.wait_count("select count(*) from dead_letters", 2).await;
    let reasons: Vec<String> =
        sqlx::query_scalar("select reason from dead_letters order by reason")
            .fetch_all(&app.owner)
            .await
            .unwrap();
    assert_eq!(reasons, ["currency_mismatch", "unknown_tenant"]);
    assert_eq!(app.count(EVENTS).await, 0);
}

#[tokio::test]
async fn adjustment_credit_shows_in_balances_which_sum_to_zero() {
    let app = TestApp::spawn().await;
    let key = app.tenant("acme").await;
    app.post_events(&key, &usage("e-1", "acme", "gpt-4o", 1_000_000, 0))
        .await;
    let adj = json!({"specversion": "1.0", "id": "adj-1", "source": "ops", "type": "tokenledger.adjustment.v1",
        "time": chrono::Utc::now().to_rfc3339(),
        "data": {"tenant_id": "acme", "direction": "credit", "amount": "1.25", "currency": "USD",
                 "reason": "outage credit", "request_id": "req-e-1"}});
    // tenants may not adjust their own ledger
    assert_eq!(app.post_events(&key, &adj).await.status(), 403);
    app.ingest(ADMIN, &adj).await;
    app.wait_count(TRANSFERS, 3).await;
    let bal: Value = app.get(&key, "/v1/balances").await.json().await.unwrap();
    let get = |acct: &str| {
        bal["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["account"] == acct)
            .map(|b| b["balance"].as_str().unwrap().to_string())
    };
    assert_eq!(get("receivable").as_deref(), Some("1.75")); // 3.00 charged - 1.25 credited
    assert_eq!(get("adjustments").as_deref(), Some("1.25"));
    let sum: rust_decimal::Decimal =
        sqlx::query_scalar("select sum(balance) from account_balances")
            .fetch_one(&app.owner)
            .await
            .unwrap();
    assert!(sum.is_zero());
}

#[tokio::test]
async fn verify_passes_after_a_mixed_workload_and_fails_after_tampering() {
    let app = TestApp::spawn().await;
    let key = app.tenant("acme").await;
    app.tenant("beta").await;
    let mut batch = Vec::new();
    for i in 0..200 {
        let mut e = usage(
            &format!("m-{i}"),
            if i % 3 == 0 { "beta" } else { "acme" },
            ["gpt-4o", "gpt-5", "o3"][i % 3],
            100 + i as u64 * 7,
            50 + i as u64,
        );
        e["data"]["provider"] = json!("openai");
        e["data"]["batch"] = json!(i % 5 == 0);
        if i % 4 == 0 {
            e["data"]["cached_input_tokens"] = json!(50);
        }
        batch.push(e);
    }
    app.ingest(ADMIN, &json!(batch)).await;
    app.post_events(ADMIN, &usage("m-0", "beta", "gpt-4o", 1, 1))
        .await; // conflict
    app.post_events(ADMIN, &usage("x-1", "acme", "unpriced-x", 1, 1))
        .await; // dead letter
    let adj = json!({"specversion": "1.0", "id": "adj-1", "source": "ops", "type": "tokenledger.adjustment.v1",
        "time": chrono::Utc::now().to_rfc3339(),
        "data": {"tenant_id": "acme", "direction": "debit", "amount": "0.5", "currency": "USD", "reason": "late fee"}});
    app.post_events(ADMIN, &adj).await;
    app.wait_count(EVENTS, 201).await;
    app.drain().await;
    let report = tokenledger::projections::rebuild::verify(&app.owner)
        .await
        .unwrap();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    assert_eq!(report.events_rerated, 200);
    // rebuild while serving, then verify again
    tokenledger::projections::rebuild::rebuild(&app.owner)
        .await
        .unwrap();
    // the swapped-in tables keep their storage parameters (room for in-place updates)
    for (table, option) in [
        ("account_balances", "fillfactor=50"),
        ("usage_rollups", "fillfactor=70"),
    ] {
        let o: Option<Vec<String>> =
            sqlx::query_scalar("select reloptions from pg_class where relname = $1")
                .bind(table)
                .fetch_one(&app.owner)
                .await
                .unwrap();
        assert_eq!(o, Some(vec![option.to_string()]), "{table}");
    }
    app.post_events(&key, &usage("after-1", "acme", "gpt-4o", 10, 10))
        .await;
    app.wait_count(EVENTS, 202).await;
    app.drain().await;
    let report = tokenledger::projections::rebuild::verify(&app.owner)
        .await
        .unwrap();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    // tamper with a projection: verify names it
    sqlx::query(
        "update usage_rollups set price_amount = price_amount + 0.000001 where tenant_id = 'acme'",
    )
    .execute(&app.owner)
    .await
    .unwrap();
    let report = tokenledger::projections::rebuild::verify(&app.owner)
        .await
        .unwrap();
    assert!(
        report.differences[0].contains("usage_rollups"),
        "{:?}",
        report.differences
    );
}

#[tokio::test]
async fn openapi_health_and_metrics_are_served() {
    let app = TestApp::spawn().await;
    let doc: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    assert!(doc["paths"]["/v1/events"]["post"].is_object());
    for p in [
        "/v1/webhooks/endpoints",
        "/v1/webhooks/endpoints/{id}/rotate-secret",
        "/v1/webhooks/messages/{id}",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} is not documented");
    }
    // the payloads we send, as OpenAPI 3.1 webhooks
    for t in tokenledger::webhooks::EVENT_TYPES {
        let w = &doc["webhooks"][*t]["post"];
        assert!(
            w["requestBody"]["content"]["application/json"]["schema"].is_object(),
            "{t}"
        );
    }
    // every schema reference resolves
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    // parameters are where they are read: a path parameter is in its template and
    // required; query parameters are `in: query`
    let mut operations = 0;
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            for p in op["parameters"].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap();
                match p["in"].as_str().unwrap() {
                    "path" => {
                        assert!(
                            template.contains(&format!("{{{name}}}")),
                            "{method} {template}: {name} is not in the path"
                        );
                        assert_eq!(p["required"], true, "{method} {template}: {name}");
                    }
                    "query" | "header" => {}
                    other => panic!("{method} {template}: {name} in {other}"),
                }
            }
            // every error answer is problem+json, and documented so
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.contains_key("default"), "{method} {template}");
            for (status, r) in responses {
                if status == "default" || status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        r["content"]["application/problem+json"]["schema"]["$ref"],
                        "#/components/schemas/Problem",
                        "{method} {template} {status}"
                    );
                }
            }
        }
    }
    assert!(operations > 50, "{operations}");
    let usage_from = doc["paths"]["/v1/usage"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "from")
        .unwrap();
    assert_eq!(usage_from["in"], "query");
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.iter().any(|r| r.ends_with("/EndpointWithSecret")));
    for r in &all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected reference {r}"));
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{r} does not resolve"
        );
    }
    assert_eq!(app.status("/healthz").await, 200);
    assert_eq!(app.status("/readyz").await, 200);
    let m = app.metrics().await;
    assert!(m.contains("tokenledger_batch_seconds_bucket"));
    assert!(m.contains("tokenledger_consumer_pending_messages"));
}

/// Kill the writer (abort) between commit and ack: after a restart, nothing is lost
/// and nothing doubled.
#[tokio::test]
async fn crash_between_commit_and_ack_loses_and_doubles_nothing() {
    let s = common::fresh_settings().await;
    // publish first, so the crashing writer's first batch holds many events
    let mut app = TestApp::start(s.clone()).await;
    app.seed_prices().await;
    app.tenant("acme").await;
    app.stop().await;
    let batch: Vec<Value> = (0..300)
        .map(|i| usage(&format!("c-{i}"), "acme", "gpt-4o", 100, 10))
        .collect();
    common::publish(&s, batch).await;
    let mut child = common::writer_process(
        &s,
        &[
            ("TOKENLEDGER_BATCH_WAIT_MS", "50"),
            ("TOKENLEDGER_FAULT_ABORT_AFTER_COMMIT", "1"),
        ],
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(!status.success(), "the writer must have aborted");
    let committed = app.count(EVENTS).await;
    assert!(committed > 0 && committed < 300, "committed {committed}");
    // the committed batch was never acked; a new writer gets it again (and the rest)
    let app = TestApp::start(s).await;
    app.wait_count(EVENTS, 300).await;
    app.drain().await;
    assert_eq!(app.count(EVENTS).await, 300);
    assert_eq!(app.count(TRANSFERS).await, 600);
    assert_eq!(app.count("select count(*) from event_conflicts").await, 0);
    let report = tokenledger::projections::rebuild::verify(&app.owner)
        .await
        .unwrap();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
}

#[tokio::test]
async fn requests_page_by_cursor_usage_groups_and_breakdowns_expand() {
    let app = TestApp::spawn().await;
    let key = app.tenant("acme").await;
    let batch: Vec<Value> = (0..25)
        .map(|i| {
            let mut e = usage(
                &format!("p-{i}"),
                "acme",
                ["gpt-4o", "gpt-4o-mini"][i % 2],
                1000,
                100,
            );
            e["data"]["api_key_id"] = json!(format!("k{}", i % 3));
            e
        })
        .collect();
    app.ingest(&key, &json!(batch)).await;
    app.wait_count(EVENTS, 25).await;
    // pages of 10, newest first in ledger order, no gaps or repeats
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/requests?limit=10&cursor={c}"),
            None => "/v1/requests?limit=10".to_string(),
        };
        let page: Value = app.get(&key, &path).await.json().await.unwrap();
        for r in page["data"].as_array().unwrap() {
            seen.push(r["seq"].as_i64().unwrap());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, (1..=25).rev().collect::<Vec<i64>>());
    let filtered: Value = app
        .get(&key, "/v1/requests?model=gpt-4o-mini&limit=100")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(filtered["data"].as_array().unwrap().len(), 12);
    // usage grouped by model and key
    let today = chrono::Utc::now().date_naive();
    let q = format!(
        "/v1/usage?from={today}&to={}&group_by=model,api_key_id",
        today + chrono::Duration::days(1)
    );
    let usage: Value = app.get(&key, &q).await.json().await.unwrap();
    let rows = usage["data"].as_array().unwrap();
    assert_eq!(rows.len(), 6);
    assert_eq!(
        rows.iter()
            .map(|r| r["requests"].as_i64().unwrap())
            .sum::<i64>(),
        25
    );
    assert!(rows
        .iter()
        .all(|r| r["day"].is_null() && r["model"].is_string()));
    let bad = app
        .get(
            &key,
            &format!("/v1/usage?from={today}&to={today}&group_by=colour"),
        )
        .await;
    assert_eq!(bad.status(), 400);
    // the stored compact breakdown comes back with every line and amount
    let r: Value = app
        .get(&key, "/v1/requests/req-p-0")
        .await
        .json()
        .await
        .unwrap();
    let lines = r["breakdown"]["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["class"], "input");
    assert_eq!(lines[0]["tokens"], 1000);
    assert_eq!(lines[0]["cost"], "0.0025");
    assert_eq!(r["breakdown"]["price"], r["price_amount"]);
    assert_eq!(r["transfers"].as_array().unwrap().len(), 2);
    // an answer of more groups than fit is refused, not cut short (rollup rows written
    // straight into the projection: 10,001 API keys on one day)
    sqlx::query(
        "insert into usage_rollups select 'acme', current_date, 'm', 'p', 'k' || i, 1, 1, 0, 0, 1, 0,
           0.01, 0.005, 'USD' from generate_series(1, 10001) as i",
    )
    .execute(&app.owner)
    .await
    .unwrap();
    let q = |g: &str| {
        format!(
            "/v1/usage?from={}&to={}&group_by={g}",
            chrono::Utc::now().date_naive(),
            chrono::Utc::now().date_naive() + chrono::Duration::days(1)
        )
    };
    let r = app.get(&key, &q("api_key_id")).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["code"], "too_many_groups", "{v}");
    let r: Value = app.get(&key, &q("day")).await.json().await.unwrap();
    assert!(r["data"][0]["requests"].as_i64().unwrap() > 10_001, "{r}");
}
