//! Test harness: a fresh database and a unique stream/subject prefix per test, the real
//! app on port 0, against the real Postgres and NATS on this machine.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::{json, Value};
use sqlx::PgPool;
use tokenledger::app::App;
use tokenledger::settings::Settings;
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "test-admin-token";

pub fn pg_base() -> String {
    std::env::var("TOKENLEDGER_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub struct TestApp {
    pub base: String,
    /// The router role's base URL, when it runs.
    pub router: Option<String>,
    pub settings: Settings,
    pub owner: PgPool,
    pub pool: PgPool,
    pub http: reqwest::Client,
    pub cancel: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub db: String,
}

/// Settings for a fresh database and stream (the database is created and migrated).
pub async fn fresh_settings() -> Settings {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let db = format!("tl_test_{}", &id[..16]);
    let base = pg_base();
    let host = base
        .split('@')
        .nth(1)
        .unwrap_or("127.0.0.1:5432")
        .to_string();
    let mut s = Settings::from_env().expect("settings");
    s.owner_database_url = format!("{base}/{db}");
    s.database_url = format!("postgres://tokenledger_app@{host}/{db}");
    s.nats_url = nats_url();
    s.http_addr = "127.0.0.1:0".into();
    s.admin_token = ADMIN.into();
    s.stream = format!("T{}", &id[..16]).to_uppercase();
    s.subject_prefix = format!("t{}", &id[..16]);
    s.consumer = "ledger-writer".into();
    s.routing_bucket = format!("r{}", &id[..16]);
    s.publish_interval = Duration::from_millis(100);
    s.roles = vec!["api".into(), "writer".into()];
    s.ack_wait = Duration::from_secs(2);
    s.fault_abort_after_commit = None;
    s.db_max_connections = 4;
    tokenledger::db::migrate(&s.owner_database_url)
        .await
        .expect("migrate");
    s
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        let s = fresh_settings().await;
        let app = TestApp::start(s).await;
        app.seed_prices().await;
        app
    }

    /// Start the app on existing settings (database already migrated).
    pub async fn start(s: Settings) -> TestApp {
        let owner = tokenledger::db::connect(&s.owner_database_url, 2)
            .await
            .expect("owner pool");
        let pool = tokenledger::db::connect(&s.database_url, 2)
            .await
            .expect("app pool");
        let app = App::build(s.clone()).await.expect("build app");
        let addr = app.addr.expect("api role");
        let router = app.router_addr.map(|a| format!("http://{a}"));
        let cancel = app.cancel.clone();
        let task = tokio::spawn(app.run_until_stopped());
        let db = s.owner_database_url.rsplit('/').next().unwrap().to_string();
        TestApp {
            base: format!("http://{addr}"),
            router,
            settings: s,
            owner,
            pool,
            http: reqwest::Client::new(),
            cancel,
            task: Some(task),
            db,
        }
    }

    /// Stop the service (the writer finishes its batch in flight).
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// The bundled price book (first versions dated back) and a 20% global markup.
    pub async fn seed_prices(&self) {
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
        tokenledger::catalog::prices::import(&self.pool, &prices, &opts)
            .await
            .unwrap();
        tokenledger::catalog::prices::add_markup(
            &self.pool,
            None,
            "20".parse().unwrap(),
            Some(t0),
            chrono::Utc::now(),
            chrono::Duration::minutes(5),
        )
        .await
        .unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Create a tenant through the API; returns its API key.
    pub async fn tenant(&self, id: &str) -> String {
        let r = self
            .http
            .post(self.url("/v1/admin/tenants"))
            .bearer_auth(ADMIN)
            .json(&json!({"id": id, "name": id}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let r = self
            .http
            .post(self.url(&format!("/v1/admin/tenants/{id}/api-keys")))
            .bearer_auth(ADMIN)
            .json(&json!({"name": "test"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["secret"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn post_events(&self, token: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/events"))
            .bearer_auth(token)
            .header("content-type", "application/cloudevents+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    /// Post events that must be accepted (202).
    pub async fn ingest(&self, token: &str, body: &Value) {
        let r = self.post_events(token, body).await;
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    }

    pub async fn get(&self, token: &str, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.owner)
            .await
            .unwrap()
    }

    /// Wait until `sql` (a count) reaches `n`; panics after 20 s.
    pub async fn wait_count(&self, sql: &str, n: i64) {
        for _ in 0..400 {
            if self.count(sql).await >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "timed out waiting for {sql} to reach {n} (at {})",
            self.count(sql).await
        );
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Wait until the authorizer and, if this app runs one, the router decide with the
    /// terms in the database now (their `/metrics` stamps reach `terms_version`); panics
    /// after 20 s.
    pub async fn wait_terms_seen(&self) {
        let n = self.count("select n from terms_version where id = 1").await;
        let mut names = vec!["tokenledger_authorizer_terms_stamp"];
        if self.router.is_some() {
            names.push("tokenledger_router_terms_stamp");
        }
        let mut text = String::new();
        for _ in 0..400 {
            text = self.metrics().await;
            let seen = |name: &str| {
                text.lines()
                    .filter_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                    .any(|v| v >= n as f64)
            };
            if names.iter().all(|name| seen(name)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {names:?} to reach terms version {n}:\n{text}");
    }

    /// Wait until the writer's consumer has nothing pending or unacked.
    pub async fn drain(&self) {
        let bus = tokenledger::bus::connect(&self.settings).await.unwrap();
        for _ in 0..400 {
            if let Ok((p, a)) = bus.consumer_lag().await {
                if p == 0 && a == 0 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("consumer did not drain");
    }

    /// Messages currently in this test's stream.
    pub async fn stream_messages(&self) -> u64 {
        let bus = tokenledger::bus::connect(&self.settings).await.unwrap();
        bus.stream_message_count().await.unwrap()
    }
}

/// A valid usage event.
pub fn usage(id: &str, tenant: &str, model: &str, input: u64, output: u64) -> Value {
    json!({
        "specversion": "1.0", "id": id, "source": "test", "type": "tokenledger.usage.v1",
        "time": chrono::Utc::now().to_rfc3339(),
        "data": {"tenant_id": tenant, "request_id": format!("req-{id}"), "model": model,
                 "provider": "openai", "input_tokens": input, "output_tokens": output,
                 "status": "ok", "latency_ms": 120}
    })
}

/// Publish events straight to the bus, as the router would (in chunks of 1,000).
pub async fn publish(s: &Settings, evs: Vec<Value>) {
    let bus = tokenledger::bus::connect(s).await.unwrap();
    let parsed: Vec<_> = evs
        .into_iter()
        .map(|v| tokenledger::events::parse(v, chrono::Utc::now()).unwrap())
        .collect();
    for chunk in parsed.chunks(1000) {
        bus.publish_events(|t| s.usage_subject(t), chunk)
            .await
            .unwrap();
    }
}

/// `tokenledger serve` as a separate process running only the writer role.
pub fn writer_process(s: &Settings, env: &[(&str, &str)]) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenledger"));
    cmd.arg("serve")
        .env("DATABASE_URL", &s.database_url)
        .env("NATS_URL", &s.nats_url)
        .env("TOKENLEDGER_STREAM", &s.stream)
        .env("TOKENLEDGER_SUBJECT_PREFIX", &s.subject_prefix)
        .env("TOKENLEDGER_ROLES", "writer")
        .env("TOKENLEDGER_ACK_WAIT_MS", "2000")
        .env("TOKENLEDGER_BATCH_MAX", "100")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

impl TestApp {
    /// An operator POST with an optional JSON body.
    pub async fn admin_post(&self, path: &str, body: Option<&Value>) -> reqwest::Response {
        let mut req = self.http.post(self.url(path)).bearer_auth(ADMIN);
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send().await.unwrap()
    }

    /// Status of an unauthenticated GET.
    pub async fn status(&self, path: &str) -> u16 {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

impl TestApp {
    /// `verify` must find nothing; returns its report.
    pub async fn verify_ok(&self) -> tokenledger::projections::rebuild::VerifyReport {
        let report = tokenledger::projections::rebuild::verify(&self.owner)
            .await
            .unwrap();
        assert!(report.differences.is_empty(), "{:?}", report.differences);
        report
    }

    /// verify, rebuild every projection, verify again.
    pub async fn rebuild_and_verify(&self) {
        self.verify_ok().await;
        tokenledger::projections::rebuild::rebuild(&self.owner)
            .await
            .unwrap();
        self.verify_ok().await;
    }

    /// Tamper with the database as the owner; `verify` must name `what`.
    pub async fn tamper_is_caught(&self, sql: &str, what: &str) {
        sqlx::query(sql).execute(&self.owner).await.unwrap();
        let report = tokenledger::projections::rebuild::verify(&self.owner)
            .await
            .unwrap();
        assert!(
            report.differences.iter().any(|d| d.contains(what)),
            "{what}: {:?}",
            report.differences
        );
    }
}

/// A decimal from a JSON string (or number).
pub fn dec(v: &Value) -> rust_decimal::Decimal {
    match v {
        Value::String(s) => s.parse().unwrap(),
        other => other.to_string().parse().unwrap(),
    }
}

/// The routing-decision KV bucket, once the pricing role has created it (5 s at most).
pub async fn routing_kv(s: &Settings) -> async_nats::jetstream::kv::Store {
    let js = async_nats::jetstream::new(async_nats::connect(&s.nats_url).await.unwrap());
    for _ in 0..100 {
        if let Ok(k) = js.get_key_value(&s.routing_bucket).await {
            return k;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the pricing role never created the routing bucket");
}

/// Poll the KV key until `ok` holds for its value (10 s at most).
pub async fn kv_until(
    kv: &async_nats::jetstream::kv::Store,
    key: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        if let Ok(Some(b)) = kv.get(key).await {
            last = serde_json::from_slice(&b).unwrap();
            if ok(&last) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("KV {key} never satisfied the condition; last value {last}");
}

/// Run one of the SDK scripts in tests/sdk with the interpreter scripts/test.sh prepared
/// (TOKENLEDGER_TEST_PYTHON: a venv with the SDKs from PyPI); what it printed, as JSON.
pub async fn sdk_script(script: &str, env: &[(&str, &str)]) -> Value {
    let python = std::env::var("TOKENLEDGER_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let out = tokio::process::Command::new(&python)
        .arg(format!("tests/sdk/{script}"))
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap_or_else(|e| panic!("{python}: {e} (run scripts/test.sh, which installs the SDKs)"));
    assert!(
        out.status.success(),
        "{script} failed (run scripts/test.sh, which installs the SDKs):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
