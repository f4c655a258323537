//! Webhooks end to end: alert facts from real ingest, fanned out and delivered by the real
//! dispatcher to a local receiver, signatures checked by us and by the Standard Webhooks
//! reference library; retries, 410, redirects, the address guard with a canary listener,
//! two dispatchers, a dispatcher killed mid-delivery.

mod common;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use common::{fresh_settings, TestApp, ADMIN};
use serde_json::{json, Value};
use tokenledger::settings::Settings;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
enum Reply {
    Status(u16),
    Stall(Duration),
    Redirect(String),
}

#[derive(Clone, Debug)]
struct Got {
    path: String,
    headers: HashMap<String, String>,
    body: String,
}

#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    /// Replies per path, in order; then `default` per path (else 200).
    plan: Arc<Mutex<HashMap<String, VecDeque<Reply>>>>,
    default: Arc<Mutex<HashMap<String, Reply>>>,
}

impl Receiver {
    fn plan(&self, path: &str, replies: Vec<Reply>) {
        self.plan
            .lock()
            .unwrap()
            .insert(path.into(), replies.into());
    }

    fn always(&self, path: &str, r: Reply) {
        self.default.lock().unwrap().insert(path.into(), r);
    }

    fn at(&self, path: &str) -> Vec<Got> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.path == path)
            .cloned()
            .collect()
    }

    async fn wait_at(&self, path: &str, n: usize) -> Vec<Got> {
        for _ in 0..400 {
            let g = self.at(path);
            if g.len() >= n {
                return g;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{path}: {} requests, expected {n}", self.at(path).len());
    }
}

async fn receive(
    State(r): State<Receiver>,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let path = uri.path().to_string();
    r.got.lock().unwrap().push(Got {
        path: path.clone(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
            .collect(),
        body,
    });
    let next = r
        .plan
        .lock()
        .unwrap()
        .get_mut(&path)
        .and_then(|q| q.pop_front())
        .or_else(|| r.default.lock().unwrap().get(&path).cloned());
    match next {
        None => (StatusCode::OK, "thanks").into_response(),
        Some(Reply::Status(s)) => (StatusCode::from_u16(s).unwrap(), "no").into_response(),
        Some(Reply::Stall(d)) => {
            tokio::time::sleep(d).await;
            (StatusCode::OK, "late").into_response()
        }
        Some(Reply::Redirect(to)) => {
            (StatusCode::FOUND, [("location", to)], "moved").into_response()
        }
    }
}

async fn start_receiver() -> (Receiver, SocketAddr) {
    let r = Receiver::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let app = axum::Router::new().fallback(receive).with_state(r.clone());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (r, addr)
}

/// A loopback listener that must never see a connection.
async fn start_canary() -> (Arc<AtomicUsize>, u16) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
        }
    });
    (n, port)
}

struct Setup {
    app: TestApp,
    recv: Receiver,
    base: String,
    key: String,
}

fn webhook_settings(s: &mut Settings, recv: SocketAddr) {
    s.webhooks.allow = vec![recv.to_string().parse().unwrap()];
    s.webhooks.schedule = [0.0, 0.3, 0.3, 0.3, 0.3]
        .iter()
        .map(|x| Duration::from_secs_f64(*x))
        .collect();
    s.webhooks.timeout = Duration::from_millis(1000);
    s.webhooks.poll = Duration::from_millis(20);
}

async fn setup(dispatcher: bool) -> Setup {
    setup_with(dispatcher, |_| {}).await
}

async fn setup_with(dispatcher: bool, f: impl FnOnce(&mut Settings)) -> Setup {
    let (recv, addr) = start_receiver().await;
    let mut s = fresh_settings().await;
    if dispatcher {
        s.roles.push("webhooks".into());
    }
    webhook_settings(&mut s, addr);
    f(&mut s);
    let app = TestApp::start(s).await;
    app.seed_prices().await;
    let r = app
        .admin_post(
            "/v1/admin/prices",
            Some(&json!({"provider": "openai", "model": "b-model", "side": "cost", "currency": "USD",
                "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": "1", "output_per_mtok": "4"})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let key = app.tenant("acme").await;
    Setup {
        app,
        recv,
        base: format!("http://{addr}"),
        key,
    }
}

impl Setup {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .app
            .http
            .request(method.parse().unwrap(), self.app.url(path))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn endpoint(&self, path: &str, types: Value) -> (String, String) {
        let (s, v) = self
            .call(
                "POST",
                "/v1/webhooks/endpoints",
                Some(
                    json!({"url": format!("{}{path}", self.base), "event_types": types,
                    "description": "test receiver"}),
                ),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_string(),
            v["secret"].as_str().unwrap().to_string(),
        )
    }

    async fn message(&self, id: &str) -> Value {
        let (s, v) = self
            .call("GET", &format!("/v1/webhooks/messages/{id}"), None)
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }

    /// Wait until the message is no longer pending.
    async fn settled(&self, id: &str) -> Value {
        for _ in 0..400 {
            let m = self.message(id).await;
            if m["status"] != "pending" {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("message {id} still pending");
    }
}

fn million(id: &str, time: &str) -> Value {
    let mut e = common::usage(id, "acme", "b-model", 1_000_000, 0); // 1.2 each
    e["time"] = json!(time);
    e
}

/// Check signatures with the Standard Webhooks reference library (scripts/test.sh
/// installs it from PyPI and names the interpreter in TOKENLEDGER_TEST_PYTHON).
async fn reference_library_verifies(deliveries: Vec<Value>) {
    let python = std::env::var("TOKENLEDGER_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let mut child = tokio::process::Command::new(&python)
        .arg("tests/sdk/verify_webhooks.py")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python}: {e} (run scripts/test.sh)"));
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(json!(deliveries).to_string().as_bytes())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "the Standard Webhooks library rejected a signature (run scripts/test.sh, which installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn verified(secret: &str, g: &Got) -> bool {
    let ts: i64 = g.headers["webhook-timestamp"].parse().unwrap();
    tokenledger::webhooks::sign::verify(
        secret,
        &g.headers["webhook-id"],
        ts,
        g.body.as_bytes(),
        &g.headers["webhook-signature"],
    )
}

#[tokio::test]
async fn a_budget_alert_is_signed_retried_under_one_id_and_delivered_once_more_per_failure() {
    let mut s = setup(true).await;
    let (endpoint, secret) = s
        .endpoint("/flaky", json!(["budget.threshold_crossed"]))
        .await;
    s.recv.plan(
        "/flaky",
        vec![Reply::Status(500), Reply::Status(503), Reply::Status(500)],
    );
    let r = s
        .call(
            "POST",
            "/v1/budgets",
            Some(
                json!({"name": "monthly", "scope": "tenant", "period": "month", "amount": "10",
                "thresholds": ["50"], "action": "alert", "effective_from": "2020-01-01T00:00:00Z"}),
            ),
        )
        .await;
    assert_eq!(r.0, 201, "{}", r.1);
    let evs: Vec<Value> = (0..5)
        .map(|i| million(&format!("e{i}"), "2026-10-02T12:00:00Z"))
        .collect();
    s.app.ingest(ADMIN, &json!(evs)).await;

    // three failures, then the success: four requests, one webhook-id, then no more
    let got = s.recv.wait_at("/flaky", 4).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got2 = s.recv.at("/flaky");
    assert_eq!(got2.len(), 4, "deliveries went on after the success");
    let id = &got[0].headers["webhook-id"];
    assert!(id.starts_with("msg_"));
    for g in &got {
        assert_eq!(&g.headers["webhook-id"], id);
        assert_eq!(g.body, got[0].body, "the body is the same on every attempt");
        assert_eq!(g.headers["content-type"], "application/json");
        assert!(verified(&secret, g), "signature: {:?}", g.headers);
        assert!(!verified(&tokenledger::webhooks::sign::new_secret(), g));
    }
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["type"], "budget.threshold_crossed");
    let d = &body["data"];
    assert_eq!(d["schema_version"], 1);
    assert_eq!(d["tenant_id"], "acme");
    assert_eq!(d["budget"], "monthly");
    assert_eq!(d["period"], "2026-10");
    assert_eq!(d["threshold_percent"], "50");
    assert_eq!(d["amount"], "10");
    assert_eq!(d["spent"], "6");
    assert_eq!(d["links"]["budget"], "/v1/budgets/monthly");
    assert!(d["links"]["request"]
        .as_str()
        .unwrap()
        .starts_with("/v1/requests/req-e"));

    // the message and its attempts over REST
    let m = s.settled(id).await;
    assert_eq!(m["status"], "succeeded", "{m}");
    assert_eq!(m["attempts"], 4);
    assert_eq!(m["endpoint_id"], endpoint.as_str());
    let codes: Vec<i64> = m["attempts_log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].as_i64().unwrap())
        .collect();
    assert_eq!(codes, vec![500, 503, 500, 200]);
    assert_eq!(m["attempts_log"][3]["response_body"], "thanks");
    let (st, list) = s
        .call(
            "GET",
            &format!("/v1/webhooks/messages?endpoint_id={endpoint}&status=succeeded"),
            None,
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(list["data"].as_array().unwrap().len(), 1);

    // another tenant sees none of it
    let other = s.app.tenant("other").await;
    let r = s
        .app
        .get(&other, &format!("/v1/webhooks/messages/{id}"))
        .await;
    assert_eq!(r.status(), 404);
    let r = s
        .app
        .get(&other, &format!("/v1/webhooks/endpoints/{endpoint}"))
        .await;
    assert_eq!(r.status(), 404);

    // rotation: both secrets sign until the old one's grace ends
    let (st, rotated) = s
        .call(
            "POST",
            &format!("/v1/webhooks/endpoints/{endpoint}/rotate-secret"),
            Some(json!({"grace_seconds": 3600})),
        )
        .await;
    assert_eq!(st, 200, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, secret);
    assert_eq!(rotated["secrets"].as_array().unwrap().len(), 2);
    let (st, test) = s
        .call(
            "POST",
            &format!("/v1/webhooks/endpoints/{endpoint}/test"),
            None,
        )
        .await;
    assert_eq!(st, 202, "{test}");
    let got = s.recv.wait_at("/flaky", 5).await;
    let t = &got[4];
    assert_eq!(t.headers["webhook-id"], test["id"].as_str().unwrap());
    assert_eq!(t.headers["webhook-signature"].split(' ').count(), 2);
    assert!(verified(&secret, t) && verified(&new_secret, t));
    // the endpoint shows no secret after creation
    let (_, e) = s
        .call("GET", &format!("/v1/webhooks/endpoints/{endpoint}"), None)
        .await;
    assert!(e.get("secret").is_none() && !e.to_string().contains("whsec_"));

    let mut deliveries: Vec<Value> = got[..4]
        .iter()
        .map(|g| json!({"secret": secret, "headers": g.headers, "body": g.body}))
        .collect();
    deliveries.push(json!({"secret": secret, "headers": t.headers, "body": t.body}));
    deliveries.push(json!({"secret": new_secret, "headers": t.headers, "body": t.body}));
    reference_library_verifies(deliveries).await;
    s.app.stop().await;
}

#[tokio::test]
async fn gone_disables_redirects_are_not_followed_and_the_guard_keeps_us_off_loopback() {
    let mut s = setup(true).await;
    let (canary, cport) = start_canary().await;
    let (gone, _) = s.endpoint("/gone", json!([])).await;
    let (_other, _) = s
        .endpoint("/other", json!(["webhook.endpoint_disabled"]))
        .await;
    // (test events go to any endpoint; this one hears of nothing else)
    let (redirect, _) = s.endpoint("/redirect", json!(["tier.crossed"])).await;
    s.recv.always("/gone", Reply::Status(410));
    s.recv.always(
        "/redirect",
        Reply::Redirect(format!("http://127.0.0.1:{cport}/stolen")),
    );

    // 410: the endpoint is disabled at once, and the tenant's other endpoint is told
    let (_, m) = s
        .call("POST", &format!("/v1/webhooks/endpoints/{gone}/test"), None)
        .await;
    let m = s.settled(m["id"].as_str().unwrap()).await;
    assert_eq!(m["status"], "failed");
    assert_eq!(m["attempts"], 1, "a 410 is not retried");
    let (_, e) = s
        .call("GET", &format!("/v1/webhooks/endpoints/{gone}"), None)
        .await;
    assert_eq!(e["enabled"], false);
    assert_eq!(e["disabled_reason"], "gone");
    let told = s.recv.wait_at("/other", 1).await;
    let body: Value = serde_json::from_str(&told[0].body).unwrap();
    assert_eq!(body["type"], "webhook.endpoint_disabled");
    assert_eq!(body["data"]["endpoint_id"], gone.as_str());
    assert_eq!(body["data"]["reason"], "gone");

    // a redirect is a failed attempt, never followed
    let (_, m) = s
        .call(
            "POST",
            &format!("/v1/webhooks/endpoints/{redirect}/test"),
            None,
        )
        .await;
    let mid = m["id"].as_str().unwrap().to_string();
    let m = s.settled(&mid).await;
    assert_eq!(m["status"], "failed");
    assert_eq!(m["attempts"], 5, "the whole schedule: {m}");
    let log = m["attempts_log"].as_array().unwrap();
    assert!(log.iter().all(|a| a["status_code"] == 302
        && a["error"]
            .as_str()
            .unwrap()
            .contains("redirects are not followed")));
    assert_eq!(s.recv.at("/redirect").len(), 5);

    // registration refuses every address class and spelling
    for url in [
        format!("http://127.0.0.1:{cport}/"),
        format!("http://[::ffff:127.0.0.1]:{cport}/"),
        format!("http://2130706433:{cport}/"),
        format!("http://0x7f000001:{cport}/"),
        format!("http://0x7f.0.0.1:{cport}/"),
        format!("http://0177.0.0.1:{cport}/"),
        format!("http://127.1:{cport}/"),
        format!("http://localhost:{cport}/"),
        format!("http://[::1]:{cport}/"),
        format!("http://0.0.0.0:{cport}/"),
        "https://169.254.169.254/latest/meta-data/".into(),
        "https://10.1.2.3/".into(),
        "https://172.16.0.1/".into(),
        "https://192.168.1.1/".into(),
        "https://100.64.1.1/".into(),
        "https://224.0.0.1/".into(),
        "https://[fe80::1]/".into(),
        "https://[fd00::1]/".into(),
        "https://[ff02::1]/".into(),
        "http://8.8.8.8/hook".into(),
    ] {
        let (st, v) = s
            .call("POST", "/v1/webhooks/endpoints", Some(json!({"url": url})))
            .await;
        assert_eq!(st, 422, "{url}: {v}");
        assert_eq!(v["code"], "url_refused", "{url}: {v}");
    }
    for (body, code) in [
        (json!({"url": "ftp://example.com/"}), "invalid_webhook"),
        (json!({"url": "https://u:p@8.8.8.8/"}), "invalid_webhook"),
        (
            json!({"url": "https://8.8.8.8/", "event_types": ["nope"]}),
            "invalid_webhook",
        ),
        (
            json!({"url": "https://8.8.8.8/", "colour": "red"}),
            "invalid_body",
        ),
    ] {
        let (st, v) = s
            .call("POST", "/v1/webhooks/endpoints", Some(body.clone()))
            .await;
        assert_eq!(
            (st, v["code"].as_str().unwrap()),
            (422, code),
            "{body}: {v}"
        );
    }
    // PATCH vets the URL too
    let (st, v) = s
        .call(
            "PATCH",
            &format!("/v1/webhooks/endpoints/{redirect}"),
            Some(json!({"url": format!("http://[::ffff:127.0.0.1]:{cport}/")})),
        )
        .await;
    assert_eq!((st, v["code"].as_str().unwrap()), (422, "url_refused"));

    // at delivery too: a URL whose name now resolves to loopback (as DNS rebinding would
    // make it) is refused before any connection
    sqlx::query("update webhook_endpoints set url = $1 where id = $2::uuid")
        .bind(format!("http://localhost:{cport}/rebound"))
        .bind(&redirect)
        .execute(&s.app.owner)
        .await
        .unwrap();
    let (st, _) = s
        .call("POST", &format!("/v1/webhooks/messages/{mid}/replay"), None)
        .await;
    assert_eq!(st, 202);
    let m = s.settled(&mid).await;
    let log = m["attempts_log"].as_array().unwrap();
    assert_eq!(log.len(), 10, "the replay ran the schedule again: {m}");
    for a in &log[5..] {
        assert!(a["status_code"].is_null());
        let e = a["error"].as_str().unwrap();
        assert!(e.starts_with("not sent") && e.contains("loopback"), "{e}");
    }
    assert_eq!(canary.load(Ordering::SeqCst), 0, "the canary was reached");
    s.app.stop().await;
}

#[tokio::test]
async fn two_dispatchers_never_deliver_the_same_attempt_twice() {
    let mut s = setup(true).await;
    let (endpoint, _) = s.endpoint("/ok", json!([])).await;
    // a second dispatcher beside the app's
    let cancel = CancellationToken::new();
    let second = tokio::spawn(tokenledger::webhooks::dispatch::run(
        s.app.pool.clone(),
        s.app.settings.webhooks.clone(),
        cancel.clone(),
    ));
    let n = 300;
    for _ in 0..n {
        let (st, _) = s
            .call(
                "POST",
                &format!("/v1/webhooks/endpoints/{endpoint}/test"),
                None,
            )
            .await;
        assert_eq!(st, 202);
    }
    let got = s.recv.wait_at("/ok", n).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = if s.recv.at("/ok").len() > got.len() {
        s.recv.at("/ok")
    } else {
        got
    };
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for g in &got {
        *per_id.entry(g.headers["webhook-id"].clone()).or_default() += 1;
    }
    assert_eq!(per_id.len(), n);
    assert!(
        per_id.values().all(|c| *c == 1),
        "a message was delivered twice"
    );
    // the dispatchers record an attempt once its response is back: wait for the last ones
    for sql in [
        "select count(*) from webhook_attempts where attempt = 1",
        "select count(*) from webhook_messages where status = 'succeeded' and attempts = 1",
    ] {
        s.app.wait_count(sql, n as i64).await;
    }
    assert_eq!(
        s.app
            .count("select count(*) from webhook_attempts where attempt = 1")
            .await,
        n as i64
    );
    assert_eq!(
        s.app
            .count(
                "select count(*) from webhook_messages where status = 'succeeded' and attempts = 1"
            )
            .await,
        n as i64
    );
    cancel.cancel();
    second.await.unwrap().unwrap();
    s.app.stop().await;
}

#[tokio::test]
async fn a_dispatcher_killed_mid_delivery_loses_nothing() {
    // the app runs no dispatcher; a separate process does, and is killed
    let mut s = setup(false).await;
    let (endpoint, secret) = s.endpoint("/slow", json!([])).await;
    s.recv
        .plan("/slow", vec![Reply::Stall(Duration::from_secs(30))]);
    let st = &s.app.settings;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenledger"))
        .arg("serve")
        .env("DATABASE_URL", &st.database_url)
        .env("NATS_URL", &st.nats_url)
        .env("TOKENLEDGER_STREAM", &st.stream)
        .env("TOKENLEDGER_SUBJECT_PREFIX", &st.subject_prefix)
        .env("TOKENLEDGER_ROLES", "webhooks")
        .env(
            "TOKENLEDGER_WEBHOOK_ALLOW",
            s.base.trim_start_matches("http://"),
        )
        .env("TOKENLEDGER_WEBHOOK_TIMEOUT_MS", "1000")
        .env("TOKENLEDGER_WEBHOOK_RETRY_SCHEDULE", "0,0.3,0.3")
        .env("TOKENLEDGER_WEBHOOK_POLL_MS", "20")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (_, m) = s
        .call(
            "POST",
            &format!("/v1/webhooks/endpoints/{endpoint}/test"),
            None,
        )
        .await;
    let id = m["id"].as_str().unwrap().to_string();
    // the request is in flight: kill the process before it hears back
    s.recv.wait_at("/slow", 1).await;
    child.kill().await.unwrap();
    let m = s.message(&id).await;
    assert_eq!(m["status"], "pending");
    assert_eq!(m["attempts"], 1);
    // another dispatcher takes the message over once the dead one's lease runs out
    let cancel = CancellationToken::new();
    let d = tokio::spawn(tokenledger::webhooks::dispatch::run(
        s.app.pool.clone(),
        s.app.settings.webhooks.clone(),
        cancel.clone(),
    ));
    let m = s.settled(&id).await;
    assert_eq!(m["status"], "succeeded", "{m}");
    assert_eq!(m["attempts"], 2);
    let got = s.recv.at("/slow");
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].headers["webhook-id"], got[1].headers["webhook-id"]);
    assert!(verified(&secret, &got[1]));
    cancel.cancel();
    d.await.unwrap().unwrap();
    s.app.stop().await;
}

#[tokio::test]
async fn one_alert_fact_per_threshold_per_period_under_concurrent_ingest_and_across_rebuild() {
    let mut s = setup(true).await;
    let (_, _) = s.endpoint("/all", json!([])).await;
    let past = "2020-01-01T00:00:00Z";
    for b in [
        json!({"name": "monthly", "scope": "tenant", "period": "month", "amount": "100",
            "thresholds": ["10","20","30","40","50","60","70","80","90","100"], "action": "alert",
            "effective_from": past}),
        json!({"name": "bot", "scope": "tag", "scope_value": "project=bot", "period": "day",
            "amount": "0.0001", "action": "block", "effective_from": past}),
    ] {
        let (st, v) = s.call("POST", "/v1/budgets", Some(b)).await;
        assert_eq!(st, 201, "{v}");
    }
    let r = s
        .app
        .admin_post(
            "/v1/admin/tenants/acme/commitments",
            Some(
                &json!({"name": "annual", "amount": "50", "discount_percent": "0",
                "alert_thresholds": ["50", "80"], "effective_from": past}),
            ),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // 120 events of 1.2 each, all at one instant of October: 12 concurrent posts of 10
    // (across batches), then the same again straight to the bus in one chunk (duplicates)
    let time = "2026-10-20T12:00:00Z";
    let evs: Vec<Value> = (0..120).map(|i| million(&format!("c{i}"), time)).collect();
    let mut posts = Vec::new();
    for chunk in evs.chunks(10) {
        let (http, url, body) = (s.app.http.clone(), s.app.url("/v1/events"), json!(chunk));
        posts.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(ADMIN)
                .header("content-type", "application/cloudevents+json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
        }));
    }
    for p in posts {
        p.await.unwrap();
    }
    common::publish(&s.app.settings, evs.clone()).await;
    s.app.wait_count("select count(*) from events", 120).await;
    s.app.drain().await;

    // two denials by the blocking budget: one action-taken fact
    for _ in 0..2 {
        let (st, d) = s
            .call(
                "POST",
                "/v1/authorize",
                Some(
                    json!({"model": "b-model", "estimated_input_tokens": 1000, "max_tokens": 10,
                    "tags": {"project": "bot"}}),
                ),
            )
            .await;
        assert_eq!(st, 200);
        assert_eq!(d["decision"], "deny", "{d}");
    }

    let facts: Vec<(String, String, Value)> = sqlx::query_as(
        "select type, unique_key, payload from alert_facts where tenant_id = 'acme' order by id",
    )
    .fetch_all(&s.app.owner)
    .await
    .unwrap();
    let keys: Vec<String> = facts.iter().map(|f| format!("{} {}", f.0, f.1)).collect();
    let mut dedup = keys.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(
        dedup.len(),
        keys.len(),
        "a fact was recorded twice: {keys:?}"
    );
    let of = |t: &str| facts.iter().filter(|f| f.0 == t).collect::<Vec<_>>();
    // spend: the first 50 (committed) at the commitment's 0% discount, the rest overage:
    // 144 in all, past every threshold of 100 once
    assert_eq!(of("budget.threshold_crossed").len(), 10, "{keys:?}");
    assert_eq!(of("budget.exhausted").len(), 1, "{keys:?}");
    assert_eq!(of("commitment.threshold_crossed").len(), 2, "{keys:?}");
    assert_eq!(of("commitment.exhausted").len(), 1, "{keys:?}");
    // 19.5 of October's 31 days gone: the projection passes 100 once spend passes 62.9
    // (the 53rd event, 63.6): reached after 19.5 days x 100 / 63.6 = 30.66 days
    let f = of("budget.forecast_exceeded");
    assert_eq!(f.len(), 1, "{keys:?}");
    assert_eq!(f[0].2["spent"], "63.6");
    assert_eq!(f[0].2["forecast_date"], "2026-10-31T15:50:56.603773Z");
    let a = of("budget.action_taken");
    assert_eq!(a.len(), 1, "{keys:?}");
    assert_eq!(
        a[0].1,
        format!("bot/{}/blocked", chrono::Utc::now().format("%Y-%m-%d"))
    );
    assert_eq!(a[0].2["action"], "blocked");

    // every fact reaches the endpoint once
    let got = s.recv.wait_at("/all", facts.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.recv.at("/all").len(), facts.len());
    let mut ids: Vec<&String> = got.iter().map(|g| &g.headers["webhook-id"]).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), facts.len());

    // rebuild replays to exactly the recorded facts
    s.app.rebuild_and_verify().await;
    assert_eq!(
        s.app
            .count("select count(*) from alert_facts where tenant_id = 'acme'")
            .await,
        facts.len() as i64
    );
    s.app.stop().await;
}

#[tokio::test]
async fn an_hourly_tick_raises_reservation_underutilisation_once_per_day_and_replays() {
    let mut s = setup(true).await;
    let (_, _) = s
        .endpoint("/res", json!(["reservation.underutilized"]))
        .await;
    let past = "2020-01-01T00:00:00Z";
    for r in [
        // 1,000 tokens a minute, alert below half of that over a day
        json!({"name": "idle", "provider": "openai", "model": "b-model", "units": 1,
            "tokens_per_minute_per_unit": 1000, "price_per_unit_hour": "0.1",
            "underutilization_alert_percent": "50", "effective_from": past}),
        // 1 token a minute: one request covers 1 of 1,440 a day (0.0694%), above 0.05%
        json!({"name": "busy", "provider": "openai", "model": "gpt-4o-mini", "units": 1,
            "tokens_per_minute_per_unit": 1, "price_per_unit_hour": "0.1",
            "underutilization_alert_percent": "0.05", "effective_from": past}),
    ] {
        let r = s
            .app
            .admin_post("/v1/admin/tenants/acme/reservations", Some(&r))
            .await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    let r = s
        .app
        .admin_post(
            "/v1/admin/tenants/acme/reservations",
            Some(
                &json!({"name": "bad", "provider": "openai", "model": "x", "units": 1,
                "tokens_per_minute_per_unit": 1, "price_per_unit_hour": "0.1",
                "underutilization_alert_percent": "150"}),
            ),
        )
        .await;
    assert_eq!(r.status(), 422);
    let now = chrono::Utc::now();
    let two_hours_ago = (now - chrono::Duration::hours(2)).to_rfc3339();
    let mut a = common::usage("u1", "acme", "b-model", 1000, 0);
    a["time"] = json!(two_hours_ago);
    let mut b = common::usage("u2", "acme", "gpt-4o-mini", 1000, 0);
    b["time"] = json!(two_hours_ago);
    s.app.ingest(ADMIN, &json!([a, b])).await;
    s.app.wait_count("select count(*) from events", 2).await;

    // the ticks of this hour and the previous one (and this one again: one event)
    use tokenledger::ledger::state::{tick_hour, tick_instant};
    let bus = tokenledger::bus::connect(&s.app.settings).await.unwrap();
    let hours = [
        tick_hour(now - chrono::Duration::hours(1)),
        tick_hour(now),
        tick_hour(now),
    ];
    for h in &hours {
        tokenledger::engine::publish_tick(&bus, &s.app.settings, "acme", h)
            .await
            .unwrap();
    }
    s.app.wait_count("select count(*) from events", 4).await;
    s.app.drain().await;
    let facts: Vec<(String, Value)> = sqlx::query_as(
        "select unique_key, payload from alert_facts where type = 'reservation.underutilized'
         order by id",
    )
    .fetch_all(&s.app.owner)
    .await
    .unwrap();
    // once per UTC day: two ticks an hour apart share a day unless midnight lies between
    let mut days: Vec<String> = hours
        .iter()
        .map(|h| {
            (tick_instant(h).unwrap() - chrono::Duration::microseconds(1))
                .format("%Y-%m-%d")
                .to_string()
        })
        .collect();
    days.dedup();
    let keys: Vec<&str> = facts.iter().map(|f| f.0.as_str()).collect();
    let want: Vec<String> = days.iter().map(|d| format!("idle/{d}")).collect();
    assert_eq!(keys, want, "only the idle reservation, once a day");
    let p = &facts[0].1;
    assert_eq!(p["covered_tokens"], 1000);
    assert_eq!(p["capacity_tokens"], 1_440_000);
    assert_eq!(p["utilization_percent"], "0.0694");
    assert_eq!(p["alert_below_percent"], "50");
    let got = s.recv.wait_at("/res", facts.len()).await;
    let body: Value = serde_json::from_str(&got[0].body).unwrap();
    assert_eq!(body["type"], "reservation.underutilized");
    assert_eq!(body["data"]["reservation"], "idle");
    // replay raises exactly these
    s.app.rebuild_and_verify().await;
    s.app.stop().await;
}

#[tokio::test]
async fn an_endpoint_failing_past_the_disable_period_is_disabled_and_the_tenant_told() {
    // every attempt fails; the endpoint may fail for 0.5 s before it is disabled
    let mut s = setup_with(true, |s| {
        s.webhooks.disable_after = Duration::from_millis(500);
    })
    .await;
    let (down, _) = s.endpoint("/down", json!(["tier.crossed"])).await;
    let (_, _) = s
        .endpoint("/pager", json!(["webhook.endpoint_disabled"]))
        .await;
    s.recv.always("/down", Reply::Status(503));
    let (_, m) = s
        .call("POST", &format!("/v1/webhooks/endpoints/{down}/test"), None)
        .await;
    let m = s.settled(m["id"].as_str().unwrap()).await;
    assert_eq!(m["status"], "failed");
    let n = m["attempts"].as_i64().unwrap();
    assert!(
        (1..5).contains(&n),
        "disabled before the schedule ran out: {m}"
    );
    let (_, e) = s
        .call("GET", &format!("/v1/webhooks/endpoints/{down}"), None)
        .await;
    assert_eq!(
        (e["enabled"].as_bool(), e["disabled_reason"].as_str()),
        (Some(false), Some("failing")),
        "{e}"
    );
    let told = s.recv.wait_at("/pager", 1).await;
    let body: Value = serde_json::from_str(&told[0].body).unwrap();
    assert_eq!(body["type"], "webhook.endpoint_disabled");
    assert_eq!(body["data"]["reason"], "failing");
    assert!(body["data"]["failing_since"].is_string());
    // no further attempts once disabled; re-enabling clears the reason
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(s.recv.at("/down").len() as i64, n);
    let (st, e) = s
        .call(
            "PATCH",
            &format!("/v1/webhooks/endpoints/{down}"),
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(st, 200);
    assert!(
        e["enabled"].as_bool().unwrap()
            && e["disabled_reason"].is_null()
            && e["failing_since"].is_null()
    );
    // the receiver is back: replaying the last hour's failed messages delivers them
    s.recv.always("/down", Reply::Status(200));
    let since = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let (st, r) = s
        .call(
            "POST",
            &format!("/v1/webhooks/endpoints/{down}/replay"),
            Some(json!({"since": since})),
        )
        .await;
    assert_eq!((st, r["replayed"].as_i64()), (200, Some(1)), "{r}");
    let m = s.settled(m["id"].as_str().unwrap()).await;
    assert_eq!(m["status"], "succeeded", "{m}");
    assert_eq!(m["attempts"].as_i64().unwrap(), n + 1);
    let got = s.recv.at("/down");
    assert_eq!(
        got.first().unwrap().headers["webhook-id"],
        got.last().unwrap().headers["webhook-id"]
    );
    let (st, r) = s
        .call(
            "POST",
            &format!("/v1/webhooks/endpoints/{down}/replay"),
            Some(json!({"since": since, "until": "2020-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!((st, r["code"].as_str()), (422, Some("invalid_webhook")));
    s.app.stop().await;
}
