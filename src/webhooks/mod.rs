//! Webhooks: tenants' endpoints (URL, subscribed alert types, signing secrets with
//! rotation), the messages made from alert facts (the body fixed once, so every retry sends
//! and signs the same bytes under the same `webhook-id`), their attempts, and replays. The
//! dispatcher (`dispatch`) delivers; the guard (`guard`) decides where we may connect.

pub mod dispatch;
pub mod guard;
pub mod schema;
pub mod sign;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::PgPool;
use uuid::Uuid;

/// The alert types an endpoint may subscribe to (the payload schemas are in the README).
pub const EVENT_TYPES: &[&str] = &[
    "budget.threshold_crossed",
    "budget.exhausted",
    "budget.forecast_exceeded",
    "budget.action_taken",
    "invoice.finalized",
    "commitment.threshold_crossed",
    "commitment.exhausted",
    "reservation.exhausted",
    "reservation.underutilized",
    "tier.crossed",
    "webhook.endpoint_disabled",
];

/// The version of the `data` object's schema, carried in every payload.
pub const SCHEMA_VERSION: u32 = 1;

const MAX_ENDPOINTS_PER_TENANT: i64 = 50;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl From<guard::GuardError> for WebhookError {
    fn from(e: guard::GuardError) -> Self {
        match e {
            guard::GuardError::Refused(m) => WebhookError::Refused(m),
            other => WebhookError::Invalid(other.to_string()),
        }
    }
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct SecretInfo {
    pub created_at: DateTime<Utc>,
    /// Null: the current secret. Otherwise a rotated-out secret, still signed with until then.
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Endpoint {
    pub id: Uuid,
    pub tenant_id: String,
    pub url: String,
    pub description: String,
    /// Alert types delivered; empty: every type.
    pub event_types: Vec<String>,
    pub enabled: bool,
    /// `operator`, `gone` (the receiver answered 410) or `failing` (no success for the
    /// disable-after period).
    pub disabled_reason: Option<String>,
    pub disabled_at: Option<DateTime<Utc>>,
    /// The first failed attempt since the last success.
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Secrets in use (never their values, which are shown once).
    pub secrets: Vec<SecretInfo>,
}

/// An endpoint with its new signing secret: the only time the secret is shown.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct EndpointWithSecret {
    #[serde(flatten)]
    pub endpoint: Endpoint,
    /// `whsec_` + base64 of 32 random bytes.
    pub secret: String,
}

#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    /// Operator calls only: the tenant.
    pub tenant_id: Option<String>,
    pub url: String,
    pub description: Option<String>,
    /// Alert types to deliver; absent or empty: every type.
    pub event_types: Option<Vec<String>>,
    pub enabled: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EndpointPatch {
    pub url: Option<String>,
    pub description: Option<String>,
    pub event_types: Option<Vec<String>>,
    /// Re-enabling clears the disabled reason and the failing clock.
    pub enabled: Option<bool>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Message {
    /// The `webhook-id` header: the same on every attempt.
    pub id: String,
    pub tenant_id: String,
    pub endpoint_id: Uuid,
    /// The alert fact it delivers (null for test events).
    pub alert_fact_id: Option<i64>,
    #[serde(rename = "type")]
    pub type_: String,
    /// `pending`, `succeeded` or `failed`.
    pub status: String,
    pub attempts: i32,
    /// When a pending message is tried next.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The body sent, parsed.
    #[schema(value_type = Object)]
    pub payload: Value,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Attempt {
    pub attempt: i32,
    pub url: String,
    pub started_at: DateTime<Utc>,
    pub latency_ms: i32,
    /// Null: no response (refused address, connection error, timeout).
    pub status_code: Option<i32>,
    pub error: Option<String>,
    /// The first 1 KiB of the response body.
    pub response_body: Option<String>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct MessageDetail {
    #[serde(flatten)]
    pub message: Message,
    pub attempts_log: Vec<Attempt>,
}

fn check_types(types: &[String]) -> Result<(), WebhookError> {
    for t in types {
        if !EVENT_TYPES.contains(&t.as_str()) {
            return Err(WebhookError::Invalid(format!(
                "unknown event type {t:?} (known: {})",
                EVENT_TYPES.join(", ")
            )));
        }
    }
    if types.len() > EVENT_TYPES.len() {
        return Err(WebhookError::Invalid(
            "event_types lists a type twice".into(),
        ));
    }
    Ok(())
}

fn check_description(d: &str) -> Result<(), WebhookError> {
    if d.len() > 512 {
        return Err(WebhookError::Invalid(
            "description is longer than 512 bytes".into(),
        ));
    }
    Ok(())
}

type EndpointRow = (
    Uuid,
    String,
    String,
    String,
    Vec<String>,
    bool,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    DateTime<Utc>,
    DateTime<Utc>,
);

const ENDPOINT_COLS: &str =
    "id, tenant_id, url, description, event_types, enabled, disabled_reason,
  disabled_at, failing_since, created_at, updated_at";

async fn with_secrets(pool: &PgPool, rows: Vec<EndpointRow>) -> sqlx::Result<Vec<Endpoint>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let secrets: Vec<(Uuid, DateTime<Utc>, Option<DateTime<Utc>>)> = sqlx::query_as(
        "select endpoint_id, created_at, expires_at from webhook_secrets
         where endpoint_id = any($1) and (expires_at is null or expires_at > now())
         order by created_at desc",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Endpoint {
            secrets: secrets
                .iter()
                .filter(|s| s.0 == r.0)
                .map(|s| SecretInfo {
                    created_at: s.1,
                    expires_at: s.2,
                })
                .collect(),
            id: r.0,
            tenant_id: r.1,
            url: r.2,
            description: r.3,
            event_types: r.4,
            enabled: r.5,
            disabled_reason: r.6,
            disabled_at: r.7,
            failing_since: r.8,
            created_at: r.9,
            updated_at: r.10,
        })
        .collect())
}

/// Register an endpoint: the URL is vetted now (and again at every attempt).
pub async fn create_endpoint(
    pool: &PgPool,
    tenant: &str,
    req: NewEndpoint,
    allow: &[guard::Allow],
) -> Result<EndpointWithSecret, WebhookError> {
    let types = req.event_types.unwrap_or_default();
    check_types(&types)?;
    let description = req.description.unwrap_or_default();
    check_description(&description)?;
    guard::vet(&req.url, allow).await?;
    let mut tx = pool.begin().await?;
    // one tenant's registrations take turns, so the cap holds
    sqlx::query("select pg_advisory_xact_lock(hashtextextended('webhook_endpoints:' || $1, 0))")
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
    let n: Option<i64> = sqlx::query_scalar(
        "select (select count(*) from webhook_endpoints where tenant_id = t.id)
         from tenants t where t.id = $1",
    )
    .bind(tenant)
    .fetch_optional(&mut *tx)
    .await?;
    match n {
        None => return Err(WebhookError::NotFound("tenant")),
        Some(n) if n >= MAX_ENDPOINTS_PER_TENANT => {
            return Err(WebhookError::Conflict(format!(
                "a tenant may have at most {MAX_ENDPOINTS_PER_TENANT} endpoints"
            )))
        }
        _ => {}
    }
    let id = Uuid::now_v7();
    let enabled = req.enabled.unwrap_or(true);
    sqlx::query(
        "insert into webhook_endpoints (id, tenant_id, url, description, event_types, enabled,
           disabled_reason, disabled_at)
         values ($1, $2, $3, $4, $5, $6, case when $6 then null else 'operator' end,
           case when $6 then null else now() end)",
    )
    .bind(id)
    .bind(tenant)
    .bind(&req.url)
    .bind(&description)
    .bind(&types)
    .bind(enabled)
    .execute(&mut *tx)
    .await?;
    let secret = sign::new_secret();
    sqlx::query("insert into webhook_secrets (endpoint_id, secret) values ($1, $2)")
        .bind(id)
        .bind(&secret)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let endpoint = get_endpoint(pool, tenant, id).await?;
    Ok(EndpointWithSecret { endpoint, secret })
}

pub async fn list_endpoints(pool: &PgPool, tenant: &str) -> Result<Vec<Endpoint>, WebhookError> {
    let rows: Vec<EndpointRow> = sqlx::query_as(&format!(
        "select {ENDPOINT_COLS} from webhook_endpoints where tenant_id = $1 order by created_at"
    ))
    .bind(tenant)
    .fetch_all(pool)
    .await?;
    Ok(with_secrets(pool, rows).await?)
}

pub async fn get_endpoint(pool: &PgPool, tenant: &str, id: Uuid) -> Result<Endpoint, WebhookError> {
    let rows: Vec<EndpointRow> = sqlx::query_as(&format!(
        "select {ENDPOINT_COLS} from webhook_endpoints where tenant_id = $1 and id = $2"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_all(pool)
    .await?;
    with_secrets(pool, rows)
        .await?
        .pop()
        .ok_or(WebhookError::NotFound("endpoint"))
}

pub async fn update_endpoint(
    pool: &PgPool,
    tenant: &str,
    id: Uuid,
    p: EndpointPatch,
    allow: &[guard::Allow],
) -> Result<Endpoint, WebhookError> {
    if let Some(t) = &p.event_types {
        check_types(t)?;
    }
    if let Some(d) = &p.description {
        check_description(d)?;
    }
    if let Some(u) = &p.url {
        guard::vet(u, allow).await?;
    }
    let n = sqlx::query(
        "update webhook_endpoints set
           url = coalesce($3, url),
           description = coalesce($4, description),
           event_types = coalesce($5, event_types),
           enabled = coalesce($6, enabled),
           disabled_reason = case when $6 is null then disabled_reason
             when $6 then null else 'operator' end,
           disabled_at = case when $6 is null then disabled_at
             when $6 then null else coalesce(disabled_at, now()) end,
           failing_since = case when $6 then null else failing_since end,
           updated_at = now()
         where tenant_id = $1 and id = $2",
    )
    .bind(tenant)
    .bind(id)
    .bind(&p.url)
    .bind(&p.description)
    .bind(&p.event_types)
    .bind(p.enabled)
    .execute(pool)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(WebhookError::NotFound("endpoint"));
    }
    get_endpoint(pool, tenant, id).await
}

/// Delete an endpoint with its messages and attempt log.
pub async fn delete_endpoint(pool: &PgPool, tenant: &str, id: Uuid) -> Result<(), WebhookError> {
    let n = sqlx::query("delete from webhook_endpoints where tenant_id = $1 and id = $2")
        .bind(tenant)
        .bind(id)
        .execute(pool)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(WebhookError::NotFound("endpoint"));
    }
    Ok(())
}

/// A new signing secret; the ones in use stay valid (and signed with) for `grace`.
pub async fn rotate_secret(
    pool: &PgPool,
    tenant: &str,
    id: Uuid,
    grace: chrono::Duration,
) -> Result<EndpointWithSecret, WebhookError> {
    let mut tx = pool.begin().await?;
    let found: Option<Uuid> = sqlx::query_scalar(
        "select id from webhook_endpoints where tenant_id = $1 and id = $2 for update",
    )
    .bind(tenant)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if found.is_none() {
        return Err(WebhookError::NotFound("endpoint"));
    }
    sqlx::query(
        "update webhook_secrets set expires_at = least(coalesce(expires_at, 'infinity'), now() + $2)
         where endpoint_id = $1 and (expires_at is null or expires_at > now())",
    )
    .bind(id)
    .bind(grace)
    .execute(&mut *tx)
    .await?;
    let secret = sign::new_secret();
    sqlx::query("insert into webhook_secrets (endpoint_id, secret) values ($1, $2)")
        .bind(id)
        .bind(&secret)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(EndpointWithSecret {
        endpoint: get_endpoint(pool, tenant, id).await?,
        secret,
    })
}

/// A new message id (the `webhook-id`).
pub fn message_id() -> String {
    format!("msg_{}", Uuid::now_v7().simple())
}

/// Relative links (to the billing API's base URL) to the objects an alert is about.
fn links(tenant: &str, alert_type: &str, alert_id: i64, p: &Value) -> Value {
    let s = |k: &str| p.get(k).and_then(Value::as_str);
    let mut l = serde_json::Map::new();
    l.insert(
        "alerts".into(),
        json!(format!(
            "/v1/alerts?type={alert_type}&cursor={}",
            alert_id + 1
        )),
    );
    if let Some(b) = s("budget") {
        l.insert("budget".into(), json!(format!("/v1/budgets/{b}")));
    }
    if s("commitment").is_some() {
        l.insert("commitments".into(), json!("/v1/commitments"));
    }
    if s("reservation").is_some() {
        l.insert(
            "reservation_utilisation".into(),
            json!("/v1/reservations/utilisation"),
        );
    }
    if s("schedule").is_some() {
        l.insert("tiers".into(), json!("/v1/tiers"));
    }
    if let Some(r) = s("request_id") {
        l.insert("request".into(), json!(format!("/v1/requests/{r}")));
    }
    if let Some(e) = s("endpoint_id") {
        l.insert(
            "endpoint".into(),
            json!(format!("/v1/webhooks/endpoints/{e}")),
        );
    }
    let _ = tenant;
    Value::Object(l)
}

/// The body of an alert fact's message: `{"type", "timestamp", "data"}` (the Standard
/// Webhooks payload shape), `data` carrying the schema version, tenant, alert id, the
/// fact's own fields and links.
pub fn alert_body(
    tenant: &str,
    alert_id: i64,
    alert_type: &str,
    occurred_at: DateTime<Utc>,
    payload: &Value,
) -> String {
    let mut data = serde_json::Map::new();
    data.insert("schema_version".into(), json!(SCHEMA_VERSION));
    data.insert("alert_id".into(), json!(alert_id));
    data.insert("tenant_id".into(), json!(tenant));
    data.insert(
        "occurred_at".into(),
        json!(occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
    );
    if let Value::Object(m) = payload {
        for (k, v) in m {
            data.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    data.insert("links".into(), links(tenant, alert_type, alert_id, payload));
    json!({
        "type": alert_type,
        "timestamp": occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "data": data,
    })
    .to_string()
}

/// Queue a `webhook.test` message to one endpoint (subscribed types aside).
pub async fn send_test(
    pool: &PgPool,
    tenant: &str,
    endpoint: Uuid,
) -> Result<Message, WebhookError> {
    get_endpoint(pool, tenant, endpoint).await?;
    let id = message_id();
    let now = Utc::now();
    let body = json!({
        "type": "webhook.test",
        "timestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "data": {
            "schema_version": SCHEMA_VERSION,
            "tenant_id": tenant,
            "endpoint_id": endpoint,
            "message": "a test event from tokenledger",
            "links": {"endpoint": format!("/v1/webhooks/endpoints/{endpoint}")},
        },
    })
    .to_string();
    sqlx::query(
        "insert into webhook_messages (id, tenant_id, endpoint_id, type, body, status, next_attempt_at)
         values ($1, $2, $3, 'webhook.test', $4, 'pending', now())",
    )
    .bind(&id)
    .bind(tenant)
    .bind(endpoint)
    .bind(&body)
    .execute(pool)
    .await?;
    get_message(pool, tenant, &id).await.map(|d| d.message)
}

type MessageRow = (
    String,
    String,
    Uuid,
    Option<i64>,
    String,
    String,
    i32,
    DateTime<Utc>,
    Option<i32>,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
    String,
);

const MESSAGE_COLS: &str = "id, tenant_id, endpoint_id, alert_fact_id, type, status, attempts,
  next_attempt_at, last_status, last_error, created_at, updated_at, body";

fn message(r: MessageRow) -> Message {
    Message {
        next_attempt_at: (r.5 == "pending").then_some(r.7),
        id: r.0,
        tenant_id: r.1,
        endpoint_id: r.2,
        alert_fact_id: r.3,
        type_: r.4,
        status: r.5,
        attempts: r.6,
        last_status: r.8,
        last_error: r.9,
        created_at: r.10,
        updated_at: r.11,
        payload: serde_json::from_str(&r.12).unwrap_or(Value::Null),
    }
}

pub struct MessageFilter<'a> {
    pub endpoint_id: Option<Uuid>,
    pub status: Option<&'a str>,
    /// Only messages created before the one with this id (the previous page's cursor).
    pub cursor: Option<&'a str>,
    pub limit: i64,
}

/// A tenant's messages, newest first.
pub async fn list_messages(
    pool: &PgPool,
    tenant: &str,
    f: MessageFilter<'_>,
) -> Result<Vec<Message>, WebhookError> {
    if let Some(s) = f.status {
        if !["pending", "succeeded", "failed"].contains(&s) {
            return Err(WebhookError::Invalid(
                "status must be pending, succeeded or failed".into(),
            ));
        }
    }
    let rows: Vec<MessageRow> = sqlx::query_as(&format!(
        "select {MESSAGE_COLS} from webhook_messages m
         where tenant_id = $1 and ($2::uuid is null or endpoint_id = $2)
           and ($3::text is null or status = $3)
           and ($4::text is null or (created_at, id) <
             (select created_at, id from webhook_messages where id = $4 and tenant_id = $1))
         order by created_at desc, id desc limit $5"
    ))
    .bind(tenant)
    .bind(f.endpoint_id)
    .bind(f.status)
    .bind(f.cursor)
    .bind(f.limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(message).collect())
}

pub async fn get_message(
    pool: &PgPool,
    tenant: &str,
    id: &str,
) -> Result<MessageDetail, WebhookError> {
    let row: Option<MessageRow> = sqlx::query_as(&format!(
        "select {MESSAGE_COLS} from webhook_messages where tenant_id = $1 and id = $2"
    ))
    .bind(tenant)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let row = row.ok_or(WebhookError::NotFound("message"))?;
    let attempts_log: Vec<Attempt> = sqlx::query_as(
        "select attempt, url, started_at, latency_ms, status_code, error, response_body
         from webhook_attempts where message_id = $1 order by attempt",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(MessageDetail {
        message: message(row),
        attempts_log,
    })
}

/// Send a failed (or delivered) message again, from the start of the retry schedule, under
/// the same `webhook-id`.
pub async fn replay_message(
    pool: &PgPool,
    tenant: &str,
    id: &str,
) -> Result<Message, WebhookError> {
    let r = sqlx::query(
        "update webhook_messages m set status = 'pending', schedule_pos = 0, next_attempt_at = now(),
           updated_at = now()
         from webhook_endpoints e
         where m.tenant_id = $1 and m.id = $2 and e.id = m.endpoint_id and m.status <> 'pending'",
    )
    .bind(tenant)
    .bind(id)
    .execute(pool)
    .await?
    .rows_affected();
    let d = get_message(pool, tenant, id).await?;
    if r == 0 && d.message.status == "pending" {
        return Err(WebhookError::Conflict(
            "the message is pending already".into(),
        ));
    }
    Ok(d.message)
}

/// Replay an endpoint's failed messages created in [since, until).
pub async fn replay_range(
    pool: &PgPool,
    tenant: &str,
    endpoint: Uuid,
    since: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
) -> Result<u64, WebhookError> {
    get_endpoint(pool, tenant, endpoint).await?;
    Ok(sqlx::query(
        "update webhook_messages set status = 'pending', schedule_pos = 0, next_attempt_at = now(),
           updated_at = now()
         where tenant_id = $1 and endpoint_id = $2 and status = 'failed'
           and created_at >= $3 and ($4::timestamptz is null or created_at < $4)",
    )
    .bind(tenant)
    .bind(endpoint)
    .bind(since)
    .bind(until)
    .execute(pool)
    .await?
    .rows_affected())
}
