//! The router: an OpenAI-compatible gateway (`POST /v1/chat/completions`, streaming or
//! not, `POST /v1/embeddings`, `GET /v1/models`) that picks upstreams by model, routing
//! class or an explicit `models` list, falls back on failures, pre-authorises against
//! budgets, and publishes exactly one usage event per request it forwarded.
//!
//! A request's work runs in its own task, so a client that goes away cannot stop the
//! usage of what the upstream already did from being recorded.

// errors are finished responses in OpenAI's shape; they are built once per failed request
#![allow(clippy::result_large_err)]

pub mod config;
pub mod fake;
pub mod publish;
mod raw;
pub mod usage;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use memchr::memmem;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::authorize::{AuthRequest, Authorizer, Verdict};
use crate::engine::{kv_key, Engine};
use crate::events::{Event, EventData, Status, UsageData};
use crate::pricing::{rate, PriceBook, Side};
use crate::settings::Settings;
use crate::telemetry::Metrics;
use config::{Live, Provider, Upstreams};
use publish::{Outgoing, Publisher};
use usage::{Counter, Counts, Produced};

/// The `source` of the router's usage events.
pub const EVENT_SOURCE: &str = "tokenledger/router";
/// Response header naming the request (its id in the billing API).
pub const REQUEST_ID_HEADER: &str = "x-tokenledger-request-id";
/// Request header carrying tags for budgets and reports: `k=v,k2=v2`.
pub const TAGS_HEADER: &str = "x-tokenledger-tags";
/// How long a looked-up API key is trusted before it is checked again (revocation takes
/// effect within this).
const KEY_TTL: Duration = Duration::from_secs(10);
/// How often the price book is re-checked.
const BOOK_REFRESH: Duration = Duration::from_millis(250);

/// A tenant key, as the router needs it.
#[derive(Clone, Debug)]
struct KeyInfo {
    tenant_id: String,
    key_id: uuid::Uuid,
    currency: String,
}

/// A routing decision from the KV bucket, as the router needs it.
#[derive(Clone, Debug, Deserialize)]
pub struct Decision {
    pub class: String,
    pub status: String,
    pub blocked_by: Option<String>,
    #[serde(default)]
    pub candidates: Vec<DecisionCandidate>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DecisionCandidate {
    pub provider: String,
    pub model: String,
    #[serde(default = "yes")]
    pub available: bool,
}

fn yes() -> bool {
    true
}

type CachedKey = (Instant, Option<KeyInfo>);

pub type Decisions = Arc<RwLock<HashMap<String, Arc<Decision>>>>;

pub struct Inner {
    upstreams: Live,
    decisions: Decisions,
    /// key hash -> (looked up at, the key if valid)
    keys: Mutex<HashMap<[u8; 32], CachedKey>>,
    book: RwLock<Arc<PriceBook>>,
    authorizer: Authorizer,
    publisher: Publisher,
    pool: PgPool,
    settings: Settings,
    metrics: Metrics,
    /// provider -> not before (after a 429/503 with Retry-After)
    cooldown: Mutex<HashMap<String, Instant>>,
    /// Every request's task: waited for at shutdown, so each hands over its usage event.
    jobs: tokio_util::task::TaskTracker,
}

#[derive(Clone)]
pub struct RouterState(Arc<Inner>);

/// Everything the router role needs, started.
pub struct Started {
    pub state: RouterState,
    pub publisher: Publisher,
}

/// Load the upstreams, the price book and the decisions, and start the background tasks
/// (config reload, price-book refresh, KV watch, publisher and spool re-drive).
pub async fn start(
    settings: &Settings,
    engine: &Engine,
    authorizer: Authorizer,
    bus: &crate::bus::Bus,
    metrics: Metrics,
    cancel: CancellationToken,
) -> anyhow::Result<Started> {
    let upstreams = Live::new(Upstreams::load(&settings.router_config)?);
    tokio::spawn(config::watch(
        settings.router_config.clone(),
        upstreams.clone(),
        cancel.clone(),
    ));
    tokio::task::spawn_blocking(usage::warm_up);
    let (book, _) = engine.book().await?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .max_ack_inflight(10_000)
        .backpressure_on_inflight(true)
        .build(bus.client.clone());
    let publisher = publish::start(
        js.clone(),
        engine.pool().clone(),
        metrics.clone(),
        settings.publish_linger,
        cancel.clone(),
    );
    let decisions: Decisions = Arc::default();
    tokio::spawn(watch_decisions(
        js,
        settings.routing_bucket.clone(),
        decisions.clone(),
        cancel.clone(),
    ));
    let inner = Arc::new(Inner {
        upstreams,
        decisions,
        keys: Mutex::default(),
        book: RwLock::new(book),
        authorizer,
        publisher: publisher.clone(),
        pool: engine.pool().clone(),
        settings: settings.clone(),
        metrics,
        cooldown: Mutex::default(),
        jobs: tokio_util::task::TaskTracker::new(),
    });
    let st = RouterState(inner);
    let (st2, engine) = (st.clone(), engine.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(BOOK_REFRESH) => {}
            }
            // the stamp itself, not the engine's cache of it: a term reaches routing
            // within one refresh
            match engine.book_now().await {
                Ok((b, stamp)) => {
                    *st2.0.book.write().expect("book lock") = b;
                    st2.0
                        .metrics
                        .set("tokenledger_router_terms_stamp", stamp as f64);
                }
                Err(e) => tracing::warn!(error = %e, "price book refresh failed"),
            }
        }
    });
    Ok(Started {
        state: st,
        publisher,
    })
}

impl RouterState {
    /// Wait until every request task has finished (and handed over its usage event).
    pub async fn wait_for_requests(&self) {
        self.0.jobs.close();
        self.0.jobs.wait().await;
    }
}

/// The largest request body the router takes (images and audio travel inline as base64).
pub const MAX_BODY_BYTES: usize = 32 << 20;

pub fn routes(st: RouterState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        // what the router does not serve is answered in OpenAI's error shape too
        .fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                oai_error(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "unknown_url",
                    format!("Invalid URL ({method} {})", uri.path()),
                )
            },
        )
        .method_not_allowed_fallback(
            |method: axum::http::Method, uri: axum::http::Uri| async move {
                oai_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "invalid_request_error",
                    "method_not_allowed",
                    format!("{method} is not allowed on {}", uri.path()),
                )
            },
        )
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(st)
}

/// A body that could not be read (too large, or cut off), in OpenAI's error shape.
fn body_error(e: axum::extract::rejection::BytesRejection) -> Response {
    let status = e.status();
    let (code, message) = if status == StatusCode::PAYLOAD_TOO_LARGE {
        (
            "request_too_large",
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        )
    } else {
        (
            "invalid_body",
            format!("the request body could not be read: {}", e.body_text()),
        )
    };
    oai_error(status, "invalid_request_error", code, message)
}

/// Keep a local copy of every routing decision: the last value of each key, then every
/// change (the watch is re-opened whenever it ends, e.g. across a NATS restart).
async fn watch_decisions(
    js: async_nats::jetstream::Context,
    bucket: String,
    decisions: Decisions,
    cancel: CancellationToken,
) {
    use async_nats::jetstream::kv::Operation;
    loop {
        let result: anyhow::Result<()> = async {
            let store = crate::engine::bucket(&js, &bucket).await?;
            let mut w = store.watch_with_history(">").await?;
            loop {
                let entry = tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    e = w.next() => e,
                };
                let Some(entry) = entry else {
                    anyhow::bail!("watch ended")
                };
                let entry = entry?;
                match entry.operation {
                    Operation::Put => match serde_json::from_slice::<Decision>(&entry.value) {
                        Ok(d) => {
                            decisions
                                .write()
                                .expect("decisions lock")
                                .insert(entry.key, Arc::new(d));
                        }
                        Err(e) => {
                            tracing::warn!(key = %entry.key, error = %e, "routing decision not understood")
                        }
                    },
                    Operation::Delete | Operation::Purge => {
                        decisions.write().expect("decisions lock").remove(&entry.key);
                    }
                }
            }
        }
        .await;
        if cancel.is_cancelled() {
            return;
        }
        if let Err(e) = result {
            tracing::debug!(error = %e, "routing decision watch restarting");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// Errors in OpenAI's shape

fn oai_error(status: StatusCode, type_: &str, code: &str, message: impl Into<String>) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": type_, "param": null, "code": code}});
    (status, axum::Json(body)).into_response()
}

fn bad_request(code: &str, message: impl Into<String>) -> Response {
    oai_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        code,
        message,
    )
}

fn with_request_id(mut r: Response, request_id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        r.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    r
}

// ---------------------------------------------------------------------------------------
// Authentication

impl RouterState {
    async fn authenticate(&self, headers: &HeaderMap) -> Result<KeyInfo, Response> {
        let unauthorized = |m: &str| {
            oai_error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                "invalid_api_key",
                m,
            )
        };
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                unauthorized("send a tenant API key as 'Authorization: Bearer <key>'")
            })?;
        let hash = crate::api::auth::token_hash(token);
        if let Some((at, found)) = self.0.keys.lock().expect("keys lock").get(&hash) {
            if at.elapsed() < KEY_TTL {
                return found.clone().ok_or_else(|| unauthorized("invalid API key"));
            }
        }
        let found: Option<(uuid::Uuid, String, String)> = if token
            .starts_with(crate::catalog::keys::KEY_PREFIX)
        {
            sqlx::query_as(
                "select k.id, k.tenant_id, t.currency::text from api_keys k join tenants t on t.id = k.tenant_id
                 where k.key_hash = $1 and k.revoked_at is null",
            )
            .bind(hash.to_vec())
            .fetch_optional(&self.0.pool)
            .await
            .map_err(|e| {
                oai_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "unavailable",
                    format!("key lookup failed: {e}"),
                )
            })?
        } else {
            None
        };
        let info = found.map(|(key_id, tenant_id, currency)| KeyInfo {
            tenant_id,
            key_id,
            currency,
        });
        let mut keys = self.0.keys.lock().expect("keys lock");
        if keys.len() > 100_000 {
            keys.clear();
        }
        keys.insert(hash, (Instant::now(), info.clone()));
        info.ok_or_else(|| unauthorized("invalid API key"))
    }

    fn book(&self) -> Arc<PriceBook> {
        self.0.book.read().expect("book lock").clone()
    }
}

// ---------------------------------------------------------------------------------------
// Model selection

#[derive(Clone, Debug, PartialEq, Eq)]
struct Candidate {
    provider: String,
    model: String,
}

impl Candidate {
    fn label(&self) -> String {
        format!("{}/{}", self.provider, self.model)
    }
}

/// A routing class whose published decision says a budget blocks it.
struct BlockedClass {
    class: String,
    budget: String,
    /// The class's own candidates from the price book (empty if it has none in force),
    /// for the authoriser to decide on.
    candidates: Vec<Candidate>,
}

impl BlockedClass {
    fn refusal(&self) -> Response {
        oai_error(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            "budget_exceeded",
            format!(
                "budget {:?} is at its limit: routing class {:?} is blocked",
                self.budget, self.class
            ),
        )
    }
}

/// Candidates for one `model` value: a routing class (through its published decision), a
/// `provider/model`, or a model every configured provider serving it can take.
fn resolve_one(
    st: &RouterState,
    ups: &Upstreams,
    book: &PriceBook,
    tenant: &str,
    name: &str,
    now: DateTime<Utc>,
) -> Result<Vec<Candidate>, BlockedClass> {
    let decision = {
        let d = st.0.decisions.read().expect("decisions lock");
        d.get(&kv_key(tenant, name)).cloned().or_else(|| {
            (name == "auto")
                .then(|| d.get(&kv_key(tenant, "auto:balanced")).cloned())
                .flatten()
        })
    };
    if let Some(d) = decision {
        if d.status == "blocked" {
            let candidates = book
                .class_at(tenant, &d.class, now)
                .map(crate::pricing::routing::eligible)
                .unwrap_or_default()
                .into_iter()
                .map(|(provider, model, _)| Candidate { provider, model })
                .collect();
            return Err(BlockedClass {
                class: d.class.clone(),
                budget: d.blocked_by.clone().unwrap_or_else(|| "?".into()),
                candidates,
            });
        }
        return Ok(d
            .candidates
            .iter()
            .filter(|c| c.available)
            .map(|c| Candidate {
                provider: c.provider.clone(),
                model: c.model.clone(),
            })
            .collect());
    }
    if let Some((p, m)) = name.split_once('/') {
        if ups.provider(p).is_some() {
            return Ok(vec![Candidate {
                provider: p.to_string(),
                model: m.to_string(),
            }]);
        }
    }
    Ok(ups
        .serving(name)
        .map(|p| Candidate {
            provider: p.cfg.name.clone(),
            model: name.to_string(),
        })
        .collect())
}

/// Every candidate for a request, in order: `model`, then each of `models`; only those a
/// configured provider serves and the price book prices for the tenant. When nothing is
/// left but a routing class a budget blocks, its own candidates are returned with it: the
/// authoriser decides (and records) the refusal, or admits the request if the published
/// decision is behind the budget.
fn candidates(
    st: &RouterState,
    ups: &Upstreams,
    book: &PriceBook,
    key: &KeyInfo,
    body: &Map<String, Value>,
    now: DateTime<Utc>,
) -> Result<(Vec<Candidate>, Option<BlockedClass>), Response> {
    let mut names: Vec<String> = Vec::new();
    match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => names.push(m.clone()),
        None | Some(Value::Null) => {}
        Some(_) => return Err(bad_request("invalid_model", "model must be a string")),
    }
    match body.get("models") {
        Some(Value::Array(list)) => {
            for m in list {
                match m.as_str() {
                    Some(s) if !s.is_empty() => names.push(s.to_string()),
                    _ => {
                        return Err(bad_request(
                            "invalid_models",
                            "models must be a list of strings",
                        ))
                    }
                }
            }
        }
        None | Some(Value::Null) => {}
        Some(_) => {
            return Err(bad_request(
                "invalid_models",
                "models must be a list of strings",
            ))
        }
    }
    if names.is_empty() {
        return Err(bad_request(
            "model_required",
            "name a model, a routing class (e.g. auto:budget) or a models list",
        ));
    }
    if names.len() > 16 {
        return Err(bad_request("too_many_models", "at most 16 models"));
    }
    let mut unserved = Vec::new();
    let routable = |resolved: Vec<Candidate>, unserved: &mut Vec<String>| {
        let mut out: Vec<Candidate> = Vec::new();
        for c in resolved {
            let Some(p) = ups.provider(&c.provider) else {
                unserved.push(c.label());
                continue;
            };
            if !p.cfg.models.contains_key(&c.model) {
                unserved.push(c.label());
                continue;
            }
            let region = p.cfg.region.as_deref();
            if book
                .version_at(
                    &c.provider,
                    &c.model,
                    region,
                    Side::Cost,
                    &key.currency,
                    now,
                )
                .is_none()
            {
                unserved.push(format!("{} (not priced in {})", c.label(), key.currency));
                continue;
            }
            if !out.contains(&c) {
                out.push(c);
            }
        }
        out
    };
    let mut out: Vec<Candidate> = Vec::new();
    // a routing class blocked by a budget is passed over for the names after it; only
    // when nothing else is left is the authoriser asked about it
    let mut blocked: Option<BlockedClass> = None;
    for name in &names {
        match resolve_one(st, ups, book, &key.tenant_id, name, now) {
            Ok(r) => {
                for c in routable(r, &mut unserved) {
                    if !out.contains(&c) {
                        out.push(c);
                    }
                }
            }
            Err(b) => {
                blocked.get_or_insert(b);
            }
        }
    }
    if out.is_empty() {
        if let Some(mut b) = blocked {
            let cands = routable(std::mem::take(&mut b.candidates), &mut Vec::new());
            if cands.is_empty() {
                return Err(b.refusal());
            }
            return Ok((cands, Some(b)));
        }
        let detail = if unserved.is_empty() {
            String::new()
        } else {
            format!(" (not routable: {})", unserved.join(", "))
        };
        return Err(oai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("no configured upstream serves {}{detail}", names.join(", ")),
        ));
    }
    Ok((out, None))
}

fn tags_of(headers: &HeaderMap) -> Result<BTreeMap<String, String>, Response> {
    let mut tags = BTreeMap::new();
    let Some(v) = headers.get(TAGS_HEADER) else {
        return Ok(tags);
    };
    let s = v
        .to_str()
        .map_err(|_| bad_request("invalid_tags", format!("{TAGS_HEADER} must be ASCII")))?;
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            bad_request(
                "invalid_tags",
                format!("{TAGS_HEADER}: {pair:?} is not key=value"),
            )
        })?;
        let (k, v) = (k.trim(), v.trim());
        for (what, x, max) in [
            ("key", k, crate::events::limits::TAG_KEY_BYTES),
            ("value", v, crate::events::limits::TAG_VALUE_BYTES),
        ] {
            if let Some((_, m)) = crate::events::string_problem(x, max) {
                return Err(bad_request(
                    "invalid_tags",
                    format!("{TAGS_HEADER}: tag {what} {x:?} {m}"),
                ));
            }
        }
        tags.insert(k.to_string(), v.to_string());
    }
    if tags.len() > crate::events::limits::TAGS {
        return Err(bad_request(
            "invalid_tags",
            format!(
                "{TAGS_HEADER}: at most {} tags",
                crate::events::limits::TAGS
            ),
        ));
    }
    Ok(tags)
}

// ---------------------------------------------------------------------------------------
// Handlers

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Embeddings,
}

impl Endpoint {
    /// The request's prompt tokens, counted locally.
    fn input(self, counter: Counter, body: &Map<String, Value>) -> u64 {
        match self {
            Endpoint::Chat => usage::chat_input(counter, body),
            Endpoint::Embeddings => usage::embedding_input(counter, body),
        }
    }

    /// An upper bound of `input` from the texts' bytes, without tokenizing.
    fn input_bound(self, counter: Counter, body: &Map<String, Value>) -> u64 {
        match self {
            Endpoint::Chat => usage::chat_input_bound(counter, body),
            Endpoint::Embeddings => usage::embedding_input_bound(counter, body),
        }
    }
}

/// A request body, or why it could not be read.
type RawBody = Result<Bytes, axum::extract::rejection::BytesRejection>;

async fn chat_completions(
    State(st): State<RouterState>,
    headers: HeaderMap,
    body: RawBody,
) -> Response {
    match body {
        Ok(body) => handle(st, headers, body, Endpoint::Chat).await,
        Err(e) => body_error(e),
    }
}

async fn embeddings(State(st): State<RouterState>, headers: HeaderMap, body: RawBody) -> Response {
    match body {
        Ok(body) => handle(st, headers, body, Endpoint::Embeddings).await,
        Err(e) => body_error(e),
    }
}

async fn models(State(st): State<RouterState>, headers: HeaderMap) -> Response {
    let key = match st.authenticate(&headers).await {
        Ok(k) => k,
        Err(r) => return r,
    };
    let ups = st.0.upstreams.get();
    let mut data = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (m, p) in ups.models() {
        if seen.insert(m.to_string()) {
            data.push(json!({"id": m, "object": "model", "created": 0, "owned_by": p}));
        }
        data.push(
            json!({"id": format!("{p}/{m}"), "object": "model", "created": 0, "owned_by": p}),
        );
    }
    let prefix = format!("{}.", key.tenant_id);
    let mut classes: Vec<String> =
        st.0.decisions
            .read()
            .expect("decisions lock")
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, d)| d.class.clone())
            .collect();
    classes.sort();
    for c in classes {
        data.push(json!({"id": c, "object": "model", "created": 0, "owned_by": "tokenledger"}));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// What one request needs from start to its usage event.
struct Job {
    st: RouterState,
    key: KeyInfo,
    request_id: String,
    at: DateTime<Utc>,
    started: Instant,
    endpoint: Endpoint,
    body: Map<String, Value>,
    stream: bool,
    client_wants_usage: bool,
    candidates: Vec<Candidate>,
    authorization_id: Option<String>,
    tags: BTreeMap<String, String>,
}

async fn handle(st: RouterState, headers: HeaderMap, body: Bytes, endpoint: Endpoint) -> Response {
    st.0.metrics.inc("tokenledger_router_requests_total", 1);
    let key = match st.authenticate(&headers).await {
        Ok(k) => k,
        Err(r) => return r,
    };
    let body: Map<String, Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return bad_request("invalid_body", "the body must be a JSON object"),
        Err(e) => return bad_request("invalid_json", format!("the body is not valid JSON: {e}")),
    };
    let tags = match tags_of(&headers) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let stream = endpoint == Endpoint::Chat && body.get("stream") == Some(&Value::Bool(true));
    let client_wants_usage = stream
        && body
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            == Some(&Value::Bool(true));
    let at = Utc::now();
    let ups = st.0.upstreams.get();
    let book = st.book();
    let (mut cands, blocked) = match candidates(&st, &ups, &book, &key, &body, at) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let request_id = format!("req_{}", uuid::Uuid::now_v7().simple());
    // budgets: only a tenant with budgets pays for a pre-authorisation. A routing class
    // its published decision says is blocked goes to the exact path, never a lease: the
    // refusal is then recorded like any other, or the request admitted if the decision is
    // behind the budget (raised, or a new period begun)
    let mut authorization_id = None;
    if blocked.is_some() || book.has_budgets(&key.tenant_id) {
        // held on the candidate whose worst case costs most, so that a fallback to a
        // pricier one cannot take a blocking budget past its limit
        let first = &cands[costliest(&book, &ups, &key, &cands, &body, endpoint, at)];
        let counter = Counter::for_model(&first.provider, &first.model);
        // first with the prompt's byte bound, which costs nothing to compute: a lease that
        // covers it grants at once; only otherwise is the prompt tokenized, and the exact
        // count decides. Only for short prompts: a long one's bound would hold several
        // times its tokens' worth of headroom until its usage settles
        let bound = endpoint.input_bound(counter, &body);
        let max_tokens = max_output(endpoint, &body);
        let mut req = AuthRequest {
            tenant_id: None,
            api_key_id: Some(key.key_id.to_string()),
            tags: tags.clone(),
            model: first.model.clone(),
            provider: Some(first.provider.clone()),
            region: ups
                .provider(&first.provider)
                .and_then(|p| p.cfg.region.clone()),
            estimated_input_tokens: bound,
            max_tokens,
            n: Some(choices(endpoint, &body)),
            routable: Some(crate::authorize::Routable({
                let ups = ups.clone();
                Arc::new(move |p: &str, m: &str| {
                    ups.provider(p)
                        .is_some_and(|x| x.cfg.models.contains_key(m))
                })
            })),
        };
        let leased = if blocked.is_none() && bound <= usage::BOUND_MAX_TOKENS {
            st.0.authorizer.try_leased(&key.tenant_id, &req)
        } else {
            None
        };
        let decided = match leased {
            Some(d) => Ok(d),
            None if blocked.is_some() => {
                req.estimated_input_tokens = endpoint.input(counter, &body);
                st.0.authorizer.authorize(key.tenant_id.clone(), req).await
            }
            None => {
                req.estimated_input_tokens = endpoint.input(counter, &body);
                st.0.authorizer
                    .authorize_leased(key.tenant_id.clone(), req)
                    .await
            }
        };
        match decided {
            Ok(d) => match d.decision {
                Verdict::Deny => {
                    st.0.metrics.inc("tokenledger_router_denied_total", 1);
                    let r = oai_error(
                        StatusCode::PAYMENT_REQUIRED,
                        "insufficient_quota",
                        "budget_exceeded",
                        format!(
                            "denied by budget {:?}: {} (authorization {}){}",
                            d.denied_by.as_deref().unwrap_or("?"),
                            d.reason,
                            d.authorization_id,
                            blocked
                                .as_ref()
                                .map(|b| format!(
                                    "; routing class {:?} is blocked by budget {:?}",
                                    b.class, b.budget
                                ))
                                .unwrap_or_default(),
                        ),
                    );
                    return with_request_id(r, &request_id);
                }
                Verdict::Downgrade => {
                    if let (Some(p), Some(m)) = (d.provider, d.model) {
                        cands = vec![Candidate {
                            provider: p,
                            model: m,
                        }];
                    }
                    authorization_id = Some(d.authorization_id.to_string());
                }
                Verdict::Allow => authorization_id = Some(d.authorization_id.to_string()),
            },
            Err(crate::authorize::AuthError::Invalid(m)) => {
                return bad_request("invalid_request", m)
            }
            Err(e) => {
                return oai_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "authorization_unavailable",
                    format!("pre-authorisation failed: {e}"),
                )
            }
        }
    }
    let job = Job {
        st,
        key,
        request_id,
        at,
        started: Instant::now(),
        endpoint,
        body,
        stream,
        client_wants_usage,
        candidates: cands,
        authorization_id,
        tags,
    };
    let (tx, rx) = oneshot::channel();
    let jobs = job.st.0.jobs.clone();
    jobs.spawn(job.run(tx));
    match rx.await {
        Ok(r) => r,
        Err(_) => oai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal",
            "the request task ended without an answer",
        ),
    }
}

/// The most output a request asks for per choice: `max_completion_tokens` (or
/// `max_tokens`, capped at the usage events' token cap); none for an embedding. `None`: not
/// said, so the model's maximum output applies.
fn max_output(endpoint: Endpoint, body: &Map<String, Value>) -> Option<u64> {
    match endpoint {
        Endpoint::Embeddings => Some(0),
        Endpoint::Chat => body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
            .and_then(Value::as_u64)
            .map(|m| m.min(crate::events::MAX_TOKENS)),
    }
}

/// How many choices a chat request asks for (`n`; 1 when absent or not a whole number,
/// which the upstream refuses anyway).
fn choices(endpoint: Endpoint, body: &Map<String, Value>) -> u64 {
    match endpoint {
        Endpoint::Embeddings => 1,
        Endpoint::Chat => body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1),
    }
}

/// The index of the candidate whose worst case (the prompt's byte bound in, `n` ×
/// `max_tokens` — else the model's maximum output — out, priced as output or as reasoning,
/// whichever costs more) is the highest customer price; the first one on a tie, or when
/// none can be priced so.
fn costliest(
    book: &PriceBook,
    ups: &Upstreams,
    key: &KeyInfo,
    cands: &[Candidate],
    body: &Map<String, Value>,
    endpoint: Endpoint,
    at: DateTime<Utc>,
) -> usize {
    if cands.len() < 2 {
        return 0;
    }
    let asked = max_output(endpoint, body);
    let n = choices(endpoint, body);
    let mut best: Option<(Decimal, usize)> = None;
    for (i, c) in cands.iter().enumerate() {
        let region = ups.provider(&c.provider).and_then(|p| p.cfg.region.clone());
        let max_out = asked.or_else(|| {
            book.version_at(
                &c.provider,
                &c.model,
                region.as_deref(),
                Side::Cost,
                &key.currency,
                at,
            )
            .and_then(|v| v.max_output_tokens)
        });
        let Some(out) = max_out.map(|m| m.saturating_mul(n).min(crate::events::MAX_TOKENS)) else {
            continue;
        };
        let input = endpoint
            .input_bound(Counter::for_model(&c.provider, &c.model), body)
            .min(crate::events::MAX_TOKENS);
        let mut worst = None;
        for reasoning in [0, out] {
            let u = UsageData {
                tenant_id: key.tenant_id.clone(),
                api_key_id: None,
                request_id: String::new(),
                provider_request_id: None,
                authorization_id: None,
                model: c.model.clone(),
                provider: c.provider.clone(),
                region: region.clone(),
                input_tokens: input,
                cached_input_tokens: 0,
                cache_write_tokens: 0,
                output_tokens: out,
                reasoning_tokens: reasoning,
                batch: false,
                status: Status::Ok,
                latency_ms: 0,
                fallback_from: Vec::new(),
                estimated: false,
                estimate_method: None,
                tags: BTreeMap::new(),
            };
            let price = crate::ledger::writer::terms_for(book, &u, &key.currency, at)
                .ok()
                .and_then(|t| rate(&u, t).ok())
                .map(|r| r.price);
            worst = worst.max(price);
        }
        if let Some(w) = worst {
            if best.is_none_or(|(b, _)| w > b) {
                best = Some((w, i));
            }
        }
    }
    best.map_or(0, |(_, i)| i)
}

/// The reply text in the first part of a JSON answer that broke off: each string
/// `"content"` holds, up to its closing quote (or the end of what arrived), unescaped as far as
/// it goes. Nothing when no content had begun.
fn partial_reply(got: &[u8]) -> Produced {
    let mut produced = Produced::default();
    for key in PARTIAL_REPLY_KEYS {
        partial_strings(got, key, &mut produced);
    }
    produced
}

/// The members whose string values are produced text in a chat completion (message text,
/// reasoning, refusals, tool and function call names and arguments, content parts, audio
/// transcripts); each string is under exactly one of them.
const PARTIAL_REPLY_KEYS: [&str; 8] = [
    "\"content\":",
    "\"reasoning_content\":",
    "\"reasoning\":",
    "\"refusal\":",
    "\"name\":",
    "\"arguments\":",
    "\"text\":",
    "\"transcript\":",
];

/// Every complete or broken-off string value of `key` in `got`, added as text.
fn partial_strings(got: &[u8], key: &str, produced: &mut Produced) {
    let finder = memmem::Finder::new(key.as_bytes());
    let mut at = 0;
    while let Some(i) = finder.find(&got[at..]) {
        let mut start = at + i + finder.needle().len();
        while got.get(start).is_some_and(u8::is_ascii_whitespace) {
            start += 1;
        }
        if got.get(start) != Some(&b'"') {
            at = start;
            continue; // `null`, or a list of parts: not text
        }
        start += 1;
        let mut end = start;
        let mut escaped = false;
        while end < got.len() && (escaped || got[end] != b'"') {
            escaped = !escaped && got[end] == b'\\';
            end += 1;
        }
        let quoted = format!("\"{}\"", String::from_utf8_lossy(&got[start..end]));
        let text = serde_json::from_str::<String>(&quoted)
            .unwrap_or_else(|_| String::from_utf8_lossy(&got[start..end]).into_owned());
        produced.add(&json!({ "content": text }));
        at = end;
    }
}

/// Why an attempt did not produce a usable response.
enum Failure {
    /// Fall back to the next candidate.
    Retryable(String, Option<Duration>),
    /// The upstream refused the request itself (4xx other than 429): the client sees it.
    Final(Response, String),
}

/// The longest an upstream's Retry-After cools its provider down: a larger (or absurd)
/// value is taken as this, so that `now + d` cannot overflow an `Instant`.
const MAX_COOLDOWN: Duration = Duration::from_secs(3600);

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    retry_after_uncapped(h).map(|d| d.min(MAX_COOLDOWN))
}

fn retry_after_uncapped(h: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = h
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some(Duration::from_millis(ms.max(0.0) as u64));
    }
    let v = h.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(s) = v.parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    let when = DateTime::parse_from_rfc2822(v).ok()?;
    Some(
        (when.with_timezone(&Utc) - Utc::now())
            .to_std()
            .unwrap_or_default(),
    )
}

impl Job {
    async fn run(self, reply: oneshot::Sender<Response>) {
        let ups = self.st.0.upstreams.get();
        let mut attempts: Vec<String> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        let mut last_retry_after: Option<Duration> = None;
        let mut i = 0;
        let mut retried_last = false;
        let mut last_tried: Option<Candidate> = None;
        while i < self.candidates.len() {
            let c = self.candidates[i].clone();
            let Some(p) = ups.provider(&c.provider) else {
                i += 1;
                continue;
            };
            let is_last = i + 1 == self.candidates.len();
            // a provider cooling down after Retry-After is skipped unless it is the last hope
            let cooling = self
                .st
                .0
                .cooldown
                .lock()
                .expect("cooldown lock")
                .get(&c.provider)
                .is_some_and(|t| *t > Instant::now());
            if cooling && !is_last {
                errors.push(format!("{}: cooling down after Retry-After", c.label()));
                i += 1;
                continue;
            }
            last_tried = Some(c.clone());
            match self.attempt(p, &c).await {
                Ok(resp) => {
                    return self.finish(p, &c, resp, attempts, reply).await;
                }
                Err(Failure::Final(resp, why)) => {
                    errors.push(format!("{}: {why}", c.label()));
                    let _ = reply.send(with_request_id(resp, &self.request_id));
                    self.record_failure(&c, attempts, Status::Error);
                    return;
                }
                Err(Failure::Retryable(why, ra)) => {
                    tracing::debug!(request_id = %self.request_id, candidate = %c.label(), why = %why, "attempt failed");
                    self.st
                        .0
                        .metrics
                        .inc("tokenledger_router_fallbacks_total", 1);
                    errors.push(format!("{}: {why}", c.label()));
                    if let Some(d) = ra {
                        last_retry_after = Some(d);
                        self.st
                            .0
                            .cooldown
                            .lock()
                            .expect("cooldown lock")
                            .insert(c.provider.clone(), Instant::now() + d);
                        // the last candidate: wait out a short Retry-After once, then retry
                        if is_last && !retried_last && d <= ups.max_retry_after {
                            retried_last = true;
                            attempts.push(c.label());
                            tokio::time::sleep(d).await;
                            continue;
                        }
                    }
                    attempts.push(c.label());
                    i += 1;
                }
            }
        }
        let mut r = oai_error(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "upstream_unavailable",
            format!("every candidate failed: {}", errors.join("; ")),
        );
        if let Some(d) = last_retry_after {
            if let Ok(v) = HeaderValue::from_str(&d.as_secs().max(1).to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        let _ = reply.send(with_request_id(r, &self.request_id));
        match last_tried {
            Some(c) => {
                // the chain ends at the last candidate tried; nothing was consumed
                let mut chain = attempts;
                chain.pop();
                self.record_failure(&c, chain, Status::Error);
            }
            None => tracing::warn!(request_id = %self.request_id,
                "no candidate could be tried; its hold (if any) expires unsettled"),
        }
    }

    /// One upstream call, up to its response headers.
    async fn attempt(&self, p: &Provider, c: &Candidate) -> Result<reqwest::Response, Failure> {
        let mut body = self.body.clone();
        body.remove("models");
        body.insert(
            "model".into(),
            Value::String(p.cfg.models.get(&c.model).cloned().unwrap_or_default()),
        );
        if self.stream {
            let opts = body
                .entry("stream_options")
                .or_insert_with(|| Value::Object(Map::new()));
            if !opts.is_object() {
                *opts = Value::Object(Map::new());
            }
            opts.as_object_mut()
                .expect("object")
                .insert("include_usage".into(), Value::Bool(true));
        }
        let url = match self.endpoint {
            Endpoint::Chat => &p.chat_url,
            Endpoint::Embeddings => &p.embeddings_url,
        };
        let mut req = p
            .client
            .post(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-request-id", &self.request_id)
            .body(serde_json::to_vec(&Value::Object(body)).expect("serialises"));
        if let Some(k) = &p.api_key {
            req = req.bearer_auth(k);
        }
        let sent = tokio::time::timeout(
            Duration::from_millis(p.cfg.first_byte_timeout_ms),
            req.send(),
        )
        .await;
        let resp = match sent {
            Err(_) => return Err(Failure::Retryable("timed out".into(), None)),
            Ok(Err(e)) => return Err(Failure::Retryable(format!("connection failed: {e}"), None)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let ra = retry_after(resp.headers());
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(Failure::Retryable(format!("HTTP {}", status.as_u16()), ra));
        }
        if matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
        ) {
            // the router's own credentials or model mapping for this upstream, not the
            // client's request: passed through, the client's SDK would take it for its own
            // key being refused (and see part of ours); the next candidate may serve it
            return Err(Failure::Retryable(
                format!(
                    "HTTP {} (the upstream refused the router's key or model)",
                    status.as_u16()
                ),
                None,
            ));
        }
        if status.is_redirection() {
            // not followed (see `Upstreams::from_config`): this upstream cannot serve it
            return Err(Failure::Retryable(
                format!("HTTP {} (redirects are not followed)", status.as_u16()),
                None,
            ));
        }
        // the request itself was refused: pass the upstream's answer through
        let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
        let bytes = resp.bytes().await.unwrap_or_default();
        let mut r = Response::new(Body::from(bytes));
        *r.status_mut() = status;
        if let Some(ct) = ct {
            r.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        Err(Failure::Final(r, format!("HTTP {}", status.as_u16())))
    }

    fn counter(&self, c: &Candidate) -> Counter {
        Counter::for_model(&c.provider, &c.model)
    }

    async fn finish(
        self,
        p: &Provider,
        c: &Candidate,
        mut resp: reqwest::Response,
        fallback_from: Vec<String>,
        reply: oneshot::Sender<Response>,
    ) {
        if self.stream {
            return self.finish_stream(p, c, resp, fallback_from, reply).await;
        }
        let idle = Duration::from_millis(p.cfg.idle_timeout_ms);
        let mut got: Vec<u8> = Vec::new();
        // read as it comes, keeping what arrived: a body that breaks off is billed for
        // the reply's text received so far, not for none of it
        let failed = loop {
            match tokio::time::timeout(idle, resp.chunk()).await {
                Ok(Ok(Some(b))) => got.extend_from_slice(&b),
                Ok(Ok(None)) => break None,
                Ok(Err(e)) => {
                    break Some((
                        StatusCode::BAD_GATEWAY,
                        "upstream_cut_off",
                        format!("{}: the response body failed: {e}", c.label()),
                    ))
                }
                Err(_) => {
                    break Some((
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        format!("{}: the response body stalled", c.label()),
                    ))
                }
            }
        };
        if let Some((status, code, message)) = failed {
            let _ = reply.send(with_request_id(
                oai_error(status, "server_error", code, message),
                &self.request_id,
            ));
            // the upstream did the work: bill it, estimated from what arrived
            let counts = self.estimate(c, &partial_reply(&got));
            self.record(p, c, counts, None, fallback_from, Status::Error);
            return;
        }
        let body = Bytes::from(got);
        let Some(value) = raw::RawObject::parse(&body) else {
            // not a JSON object: pass it through, bill an estimate
            let mut r = Response::new(Body::from(body));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let _ = reply.send(with_request_id(r, &self.request_id));
            let counts = self.estimate(c, &Produced::default());
            self.record(p, c, counts, None, fallback_from, Status::Ok);
            return;
        };
        let provider_id = value.string("id").filter(|s| !s.is_empty());
        let mut usage_out = value.value("usage");
        let counts = match usage_out.as_ref().map(usage::normalise) {
            Some(Ok(c)) => Measured::Reported(c),
            other => {
                if let Some(Err(e)) = other {
                    tracing::warn!(request_id = %self.request_id, error = %e, "upstream usage not usable; estimating");
                }
                let mut produced = Produced::default();
                for ch in value
                    .value("choices")
                    .as_ref()
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(m) = ch.get("message") {
                        produced.add(m);
                    }
                }
                let est = self.estimate(c, &produced);
                if let Measured::Estimated(n, _) = &est {
                    usage_out = Some(usage_object(n, self.endpoint));
                }
                est
            }
        };
        let cost = self.cost(p, c, &counts, &fallback_from);
        let mut changed = matches!(counts, Measured::Estimated(..));
        if let Some(u) = usage_out.as_mut().and_then(Value::as_object_mut) {
            set_cost(u, cost);
            if matches!(counts, Measured::Estimated(..)) {
                u.insert("estimated".into(), Value::Bool(true));
            }
            changed = true;
        }
        // untouched, the upstream's bytes go back as they came
        let out = match (&usage_out, changed) {
            (Some(u), true) => Bytes::from(value.to_vec_with("usage", u)),
            _ => body.clone(),
        };
        let mut r = Response::new(Body::from(out));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.decorate(&mut r, c);
        let _ = reply.send(r);
        self.record(p, c, counts, provider_id, fallback_from, Status::Ok);
    }

    fn decorate(&self, r: &mut Response, c: &Candidate) {
        if let Ok(v) = HeaderValue::from_str(&self.request_id) {
            r.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        if let Ok(v) = HeaderValue::from_str(&c.label()) {
            r.headers_mut().insert("x-tokenledger-route", v);
        }
    }

    fn estimate(&self, c: &Candidate, produced: &Produced) -> Measured {
        let counter = self.counter(c);
        let n = Counts {
            input: self.endpoint.input(counter, &self.body),
            output: produced.tokens(counter),
            ..Counts::default()
        };
        Measured::Estimated(n, counter.method())
    }

    /// The customer price of these counts now, from the same rating code as the ledger
    /// (before tiers, commitments and reservations, which depend on ledger order).
    fn cost(
        &self,
        p: &Provider,
        c: &Candidate,
        m: &Measured,
        fallback_from: &[String],
    ) -> Option<Decimal> {
        let u = self.usage_data(p, c, m, None, fallback_from.to_vec(), Status::Ok);
        let book = self.st.book();
        let terms =
            crate::ledger::writer::terms_for(&book, &u, &self.key.currency, self.at).ok()?;
        rate(&u, terms).ok().map(|r| r.price.normalize())
    }

    fn usage_data(
        &self,
        p: &Provider,
        c: &Candidate,
        m: &Measured,
        provider_request_id: Option<String>,
        fallback_from: Vec<String>,
        status: Status,
    ) -> UsageData {
        let (n, estimated, method) = match m {
            Measured::Reported(n) => (*n, false, None),
            Measured::Estimated(n, method) => (*n, true, Some(method.to_string())),
        };
        UsageData {
            tenant_id: self.key.tenant_id.clone(),
            api_key_id: Some(self.key.key_id.to_string()),
            request_id: self.request_id.clone(),
            provider_request_id: provider_request_id.filter(|s| {
                crate::events::string_problem(s, crate::events::limits::PROVIDER_REQUEST).is_none()
            }),
            authorization_id: self.authorization_id.clone(),
            model: c.model.clone(),
            provider: c.provider.clone(),
            region: p.cfg.region.clone(),
            input_tokens: n.input,
            cached_input_tokens: n.cached,
            cache_write_tokens: n.cache_write,
            output_tokens: n.output,
            reasoning_tokens: n.reasoning,
            batch: false,
            status,
            latency_ms: self.started.elapsed().as_millis() as u64,
            fallback_from: fallback_from
                .into_iter()
                .take(crate::events::limits::FALLBACKS)
                .collect(),
            estimated,
            estimate_method: method,
            tags: self.tags.clone(),
        }
    }

    /// Publish the request's one usage event.
    fn record(
        &self,
        p: &Provider,
        c: &Candidate,
        m: Measured,
        provider_request_id: Option<String>,
        fallback_from: Vec<String>,
        status: Status,
    ) {
        let u = self.usage_data(p, c, &m, provider_request_id, fallback_from, status);
        let ev = Event::new(
            self.request_id.clone(),
            EVENT_SOURCE.to_string(),
            self.at,
            EventData::Usage(u),
        );
        self.st
            .0
            .publisher
            .publish(Outgoing::of(&ev, &self.st.0.settings));
    }

    /// A request that consumed nothing (every candidate failed, or the upstream refused
    /// it): recorded with zero tokens, so its hold is settled and the attempt is visible.
    fn record_failure(&self, c: &Candidate, fallback_from: Vec<String>, status: Status) {
        let ups = self.st.0.upstreams.get();
        let Some(p) = ups.provider(&c.provider) else {
            return;
        };
        self.record(
            p,
            c,
            Measured::Reported(Counts::default()),
            None,
            fallback_from,
            status,
        );
    }

    async fn finish_stream(
        self,
        p: &Provider,
        c: &Candidate,
        resp: reqwest::Response,
        fallback_from: Vec<String>,
        reply: oneshot::Sender<Response>,
    ) {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        let body = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut r = Response::new(Body::from_stream(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        self.decorate(&mut r, c);
        let _ = reply.send(r);

        let idle = Duration::from_millis(p.cfg.idle_timeout_ms);
        let mut upstream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut seen = StreamSeen::default();
        let mut status = Status::Ok;
        'read: loop {
            let next = tokio::select! {
                _ = tx.closed() => { status = Status::Cancelled; break 'read; }
                n = tokio::time::timeout(idle, upstream.next()) => n,
            };
            let chunk = match next {
                Err(_) => {
                    status = Status::Error;
                    break;
                }
                Ok(None) => break,
                Ok(Some(Err(_))) => {
                    status = Status::Error;
                    break;
                }
                Ok(Some(Ok(b))) => b,
            };
            buf.extend_from_slice(&chunk);
            // and whatever else the upstream has already delivered. Upstreams send an event
            // per transfer-encoding chunk, and the HTTP client hands chunks over one at a
            // time, each after a turn of its connection task: forwarded one by one, each
            // event cost a write to the client — most of a streamed request's CPU. So after
            // each chunk the connection task gets one turn to hand over the next one if it
            // has it; what it has not yet read from the network is not waited for.
            let mut ended = None;
            let mut turned = false;
            while buf.len() < COALESCE_BYTES {
                match upstream.next().now_or_never() {
                    None if !turned => {
                        tokio::task::yield_now().await;
                        turned = true;
                        continue;
                    }
                    None => break,
                    Some(Some(Ok(b))) => {
                        buf.extend_from_slice(&b);
                        turned = false;
                    }
                    Some(Some(Err(_))) => {
                        ended = Some(Status::Error);
                        break;
                    }
                    Some(None) => {
                        ended = Some(Status::Ok);
                        break;
                    }
                }
            }
            // every complete event of these reads goes to the client in one write
            let mut out: Vec<u8> = Vec::new();
            let mut taken = 0;
            while let Some((text_end, end)) = event_end(&buf[taken..]) {
                let ev = &buf[taken..taken + text_end];
                self.on_event(ev, p, c, &fallback_from, &mut seen, &mut out);
                taken += end;
            }
            buf.drain(..taken);
            if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
                status = Status::Cancelled;
                break 'read;
            }
            if let Some(s) = ended {
                status = s;
                break;
            }
        }
        if status == Status::Ok && !buf.trim_ascii().is_empty() {
            // the stream ended inside an event without its blank line (`data: [DONE]\n`,
            // say): what is there is the last event
            let ev = buf.trim_ascii_end().to_vec();
            let mut out = Vec::new();
            self.on_event(&ev, p, c, &fallback_from, &mut seen, &mut out);
            if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
                status = Status::Cancelled;
            }
        }
        if status == Status::Ok && !seen.done {
            // the upstream ended without [DONE]: cut off
            status = Status::Error;
        }
        if status == Status::Error {
            // OpenAI's way to fail a stream that has begun: a last event carrying `error`
            // (its SDKs raise it as an APIError) and no [DONE]. The body then ends
            // normally: aborting it could drop that event before it is written
            let event = json!({"error": {
                "message": format!("{}: the upstream stream was cut off", c.label()),
                "type": "server_error", "param": null, "code": "upstream_cut_off"}});
            let _ = tx.send(Ok(Bytes::from(format!("data: {event}\n\n")))).await;
        }
        drop(tx);
        let m = match seen.reported {
            Some(n) => Measured::Reported(n),
            None => self.estimate_stream(c, &seen),
        };
        self.record(p, c, m, seen.provider_id, fallback_from, status);
    }

    /// No usage came in the stream: count what the client was sent.
    fn estimate_stream(&self, c: &Candidate, seen: &StreamSeen) -> Measured {
        let mut produced = Produced::default();
        for d in &seen.data {
            if let Ok(v) = serde_json::from_slice::<Value>(d) {
                for ch in v
                    .get("choices")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(d) = ch.get("delta") {
                        produced.add(d);
                    }
                }
            }
        }
        self.estimate(c, &produced)
    }

    /// The chunk OpenAI sends last when `include_usage` is asked for (empty `choices`,
    /// the request's `usage`), here with the router's estimate, its `cost` and
    /// `"estimated": true`: for a stream whose upstream sent no usage.
    fn estimated_usage_chunk(
        &self,
        p: &Provider,
        c: &Candidate,
        seen: &StreamSeen,
        fallback_from: &[String],
    ) -> Vec<u8> {
        let m = self.estimate_stream(c, seen);
        let mut usage = match &m {
            Measured::Estimated(n, _) | Measured::Reported(n) => usage_object(n, self.endpoint),
        };
        if let Some(u) = usage.as_object_mut() {
            set_cost(u, self.cost(p, c, &m, fallback_from));
            u.insert("estimated".into(), Value::Bool(true));
        }
        let chunk = json!({
            "id": seen.provider_id,
            "object": "chat.completion.chunk",
            "created": Utc::now().timestamp(),
            "model": c.model,
            "choices": [],
            "usage": usage,
        });
        format!("data: {chunk}\n\n").into_bytes()
    }

    /// Handle one SSE event from the upstream, appending what the client gets to `out`.
    /// Only the first chunk (for the response id) and chunks that mention usage are
    /// parsed; the others pass through as bytes (kept for a local count if no usage
    /// comes).
    fn on_event(
        &self,
        ev: &[u8],
        p: &Provider,
        c: &Candidate,
        fallback_from: &[String],
        seen: &mut StreamSeen,
        out: &mut Vec<u8>,
    ) {
        let pass = |out: &mut Vec<u8>| {
            out.extend_from_slice(ev);
            out.extend_from_slice(b"\n\n");
        };
        // the common shape: one `data: ` line
        let data: Vec<u8> = match ev.strip_prefix(b"data:") {
            Some(d) if !d.contains(&b'\n') => d.strip_prefix(b" ").unwrap_or(d).to_vec(),
            _ => {
                let Ok(text) = std::str::from_utf8(ev) else {
                    return pass(out);
                };
                text.lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect::<Vec<_>>()
                    .join("\n")
                    .into_bytes()
            }
        };
        if data.is_empty() {
            return pass(out);
        }
        if data.trim_ascii() == b"[DONE]" {
            seen.done = true;
            if self.client_wants_usage && seen.reported.is_none() {
                // asked for, never sent: the estimate goes last before [DONE], as usage would
                out.extend_from_slice(&self.estimated_usage_chunk(p, c, seen, fallback_from));
            }
            return pass(out);
        }
        let mentions_usage = FIND_USAGE.find(&data).is_some();
        let null_usage = mentions_usage && FIND_NULL_USAGE.find(&data).is_some();
        let real_usage = mentions_usage && !null_usage;
        // the first chunk is read for the response id; without usage in it, for nothing
        // else (skipping the rest, not building a tree of it)
        let mut id_read = false;
        if seen.provider_id.is_none() && !real_usage {
            if let Ok(c) = serde_json::from_slice::<ChunkId>(&data) {
                // an empty id (Azure's first, content-filter chunk) is no id: a later
                // chunk carries the real one
                seen.provider_id = c.id.as_ref().and_then(non_empty_str);
                id_read = true;
            }
        }
        if !id_read && (seen.provider_id.is_none() || real_usage) {
            let Ok(mut v) = serde_json::from_slice::<Value>(&data) else {
                return pass(out);
            };
            if seen.provider_id.is_none() {
                seen.provider_id = v.get("id").and_then(non_empty_str);
            }
            let usage = v.get("usage").filter(|u| !u.is_null());
            let Some(u) = usage else {
                seen.data.push(data);
                if !self.client_wants_usage && v.get("usage").is_some() {
                    if let Some(o) = v.as_object_mut() {
                        o.remove("usage");
                    }
                    out.extend_from_slice(format!("data: {v}\n\n").as_bytes());
                    return;
                }
                return pass(out);
            };
            match usage::normalise(u) {
                Ok(n) => seen.reported = Some(n),
                Err(e) => {
                    tracing::warn!(request_id = %self.request_id, error = %e, "upstream usage not usable; estimating")
                }
            }
            let no_choices = v
                .get("choices")
                .and_then(Value::as_array)
                .is_none_or(|a| a.is_empty());
            if !no_choices {
                seen.data.push(data);
            }
            // a usage the router cannot use is not the client's either: the estimate's
            // usage chunk ends the stream instead (one usage chunk, one cost)
            if !self.client_wants_usage || seen.reported.is_none() {
                if no_choices {
                    return;
                }
                if let Some(o) = v.as_object_mut() {
                    o.remove("usage");
                }
            } else if let Some(n) = seen.reported {
                let cost = self.cost(p, c, &Measured::Reported(n), fallback_from);
                if let Some(u) = v.get_mut("usage").and_then(Value::as_object_mut) {
                    set_cost(u, cost);
                }
            }
            out.extend_from_slice(format!("data: {v}\n\n").as_bytes());
            return;
        }
        if null_usage && !self.client_wants_usage {
            // the `usage: null` the router's include_usage added to every chunk
            if let Some(stripped) = strip_null_usage(&data) {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&stripped);
                out.extend_from_slice(b"\n\n");
                seen.data.push(data);
                return;
            }
            if let Ok(Value::Object(mut o)) = serde_json::from_slice::<Value>(&data) {
                o.remove("usage");
                out.extend_from_slice(format!("data: {}\n\n", Value::Object(o)).as_bytes());
                seen.data.push(data);
                return;
            }
        }
        seen.data.push(data);
        pass(out)
    }
}

/// At most this much of a stream is gathered from what the upstream already delivered
/// into one write to the client.
const COALESCE_BYTES: usize = 64 << 10;

/// What a stream showed so far.
#[derive(Default)]
struct StreamSeen {
    reported: Option<Counts>,
    provider_id: Option<String>,
    done: bool,
    /// The data of every chunk, for a local count if no usage comes.
    data: Vec<Vec<u8>>,
}

/// The searches made in every streamed event, built once.
static FIND_USAGE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\""));
static FIND_NULL_USAGE: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"usage\":null"));
static FIND_NULL_USAGE_FORMS: LazyLock<[memmem::Finder<'static>; 2]> = LazyLock::new(|| {
    [
        memmem::Finder::new(b",\"usage\":null"),
        memmem::Finder::new(b"\"usage\":null,"),
    ]
});

fn non_empty_str(v: &Value) -> Option<String> {
    v.as_str().filter(|s| !s.is_empty()).map(str::to_string)
}

/// Our price replaces the upstream's: an upstream that is itself a gateway (OpenRouter)
/// puts its own `cost` and wholesale `cost_details` / `is_byok` in `usage`, which must not
/// reach our client beside the customer price.
fn set_cost(usage: &mut Map<String, Value>, cost: Option<Decimal>) {
    usage.remove("cost_details");
    usage.remove("is_byok");
    match cost {
        Some(cost) => usage.insert("cost".into(), decimal_number(cost)),
        // no price of ours (the book changed under the request): none of theirs either
        None => usage.remove("cost"),
    };
}

/// A chunk's response id, the rest of it skipped.
#[derive(Deserialize)]
struct ChunkId {
    id: Option<Value>,
}

/// `{"a":1,"usage":null}` -> `{"a":1}` (the compact form upstreams send); `None` when
/// the bytes are not in that form, and the caller re-serialises instead.
fn strip_null_usage(data: &[u8]) -> Option<Vec<u8>> {
    for f in FIND_NULL_USAGE_FORMS.iter() {
        if let Some(i) = f.find(data) {
            let mut v = Vec::with_capacity(data.len());
            v.extend_from_slice(&data[..i]);
            v.extend_from_slice(&data[i + f.needle().len()..]);
            return Some(v);
        }
    }
    None
}

/// Where the first complete SSE event in `buf` ends: (end of its text, end including the
/// blank line). Events are separated by a blank line (`\n\n` or `\r\n\r\n`).
fn event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(j) = memchr::memchr2(b'\n', b'\r', &buf[from..]) {
        let i = from + j;
        if buf[i] == b'\n' && buf.get(i + 1) == Some(&b'\n') {
            return Some((i, i + 2));
        }
        if buf[i..].starts_with(b"\r\n\r\n") {
            return Some((i, i + 4));
        }
        from = i + 1;
    }
    None
}

enum Measured {
    Reported(Counts),
    Estimated(Counts, &'static str),
}

fn usage_object(n: &Counts, endpoint: Endpoint) -> Value {
    match endpoint {
        Endpoint::Embeddings => json!({"prompt_tokens": n.input, "total_tokens": n.input}),
        Endpoint::Chat => json!({"prompt_tokens": n.input, "completion_tokens": n.output,
            "total_tokens": n.input + n.output}),
    }
}

/// A Decimal as an exact JSON number.
fn decimal_number(d: Decimal) -> Value {
    serde_json::from_str(&d.normalize().to_string()).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_usage_is_stripped_from_compact_chunks() {
        assert_eq!(
            strip_null_usage(br#"{"id":"x","choices":[],"usage":null}"#).unwrap(),
            br#"{"id":"x","choices":[]}"#
        );
        assert_eq!(
            strip_null_usage(br#"{"usage":null,"id":"x"}"#).unwrap(),
            br#"{"id":"x"}"#
        );
        assert!(strip_null_usage(br#"{"usage": null}"#).is_none());
    }

    #[test]
    fn sse_events_split_on_blank_lines() {
        assert_eq!(event_end(b"data: x\n\ndata: y"), Some((7, 9)));
        assert_eq!(event_end(b"data: x\r\n\r\n"), Some((7, 11)));
        assert_eq!(event_end(b"data: x\n"), None);
        // a lone CR or LF inside or at the end is not a boundary
        assert_eq!(event_end(b"data: a\rb\ndata: c\n\n"), Some((17, 19)));
        assert_eq!(event_end(b"data: x\r\n\r"), None);
        assert_eq!(event_end(b"data: x\n\r\n\r\n"), Some((8, 12)));
        assert_eq!(event_end(b""), None);
    }

    #[test]
    fn a_broken_off_answer_counts_the_reply_text_that_arrived() {
        let text = |b: &[u8]| partial_reply(b).text;
        assert_eq!(
            text(br#"{"id":"x","choices":[{"message":{"content":"Hello \"you\"\nthere","#),
            "Hello \"you\"\nthere"
        );
        // cut inside the string, or inside an escape
        assert_eq!(text(br#"{"choices":[{"message":{"content": "Hel"#), "Hel");
        assert_eq!(text(br#"{"choices":[{"message":{"content":"ab\"#), "ab\\");
        // no text begun, or no text at all
        assert_eq!(text(br#"{"id":"x","choices":[{"message":{"role":"#), "");
        assert_eq!(text(br#"{"choices":[{"message":{"content":null,"tool"#), "");
        // every choice's
        assert_eq!(
            text(br#"[{"message":{"content":"a"}},{"message":{"content":"b"#),
            "ab"
        );
        // tool call arguments, reasoning and refusals are produced text too
        let t = text(
            br#"{"choices":[{"message":{"content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"search","arguments":"{\"query\":\"ledg"#,
        );
        assert_eq!(t, "search{\"query\":\"ledg");
        assert_eq!(
            text(br#"{"choices":[{"message":{"reasoning_content":"First, the","#),
            "First, the"
        );
        assert_eq!(
            text(br#"{"choices":[{"message":{"refusal":"I can"#),
            "I can"
        );
    }

    #[test]
    fn an_absurd_retry_after_is_capped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("18446744073709551615"),
        );
        assert_eq!(retry_after(&h), Some(MAX_COOLDOWN));
        let _ = Instant::now() + retry_after(&h).unwrap();
        h.insert("retry-after-ms", HeaderValue::from_static("1e300"));
        assert_eq!(retry_after(&h), Some(MAX_COOLDOWN));
    }

    #[test]
    fn retry_after_in_seconds_milliseconds_or_a_date() {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = HeaderMap::new();
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
    }

    #[test]
    fn costs_are_exact_json_numbers() {
        let d: Decimal = "0.000012345678901234".parse().unwrap();
        assert_eq!(decimal_number(d).to_string(), "0.000012345678901234");
    }
}
