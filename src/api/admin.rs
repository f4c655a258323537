//! Operator endpoints: tenants, API keys, prices, markup rules, dead letters.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::parse_json;
use super::{ApiError, AppState, Caller};
use crate::catalog::keys::{self, ApiKey};
use crate::catalog::prices::{self, NewPrice};
use crate::catalog::tenants::{self, Tenant};
use crate::ledger::dead_letters::{self, DeadLetter};
use crate::pricing::{MarkupRule, PriceVersion};

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    /// `[a-z0-9][a-z0-9_-]{0,63}`
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// ISO 4217, fixed at creation; default USD.
    pub currency: Option<String>,
}

/// Create a tenant.
#[utoipa::path(post, path = "/v1/admin/tenants", tag = "admin", request_body = NewTenant,
    responses((status = 201, body = Tenant), (status = 409, description = "exists")), security(("bearer" = [])))]
pub async fn create_tenant(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<Tenant>), ApiError> {
    caller.require_admin()?;
    let t: NewTenant = parse_json(&body)?;
    let name = if t.name.is_empty() {
        t.id.clone()
    } else {
        t.name
    };
    let tenant = tenants::create(
        &st.pool,
        &t.id,
        &name,
        t.currency.as_deref().unwrap_or("USD"),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(tenant)))
}

/// List tenants.
#[utoipa::path(get, path = "/v1/admin/tenants", tag = "admin", responses((status = 200, body = Vec<Tenant>)), security(("bearer" = [])))]
pub async fn list_tenants(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Tenant>>, ApiError> {
    caller.require_admin()?;
    Ok(Json(tenants::list(&st.pool).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[serde(default)]
    pub name: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CreatedKey {
    #[serde(flatten)]
    pub key: ApiKey,
    /// The secret: shown this once, never stored.
    pub secret: String,
}

/// Create an API key for a tenant; the secret is in this response only.
#[utoipa::path(post, path = "/v1/admin/tenants/{tenant_id}/api-keys", tag = "admin", request_body = NewKey,
    params(("tenant_id" = String, Path)), responses((status = 201, body = CreatedKey)), security(("bearer" = [])))]
pub async fn create_key(
    State(st): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    caller.require_admin()?;
    let k: NewKey = if body.is_empty() {
        NewKey {
            name: String::new(),
        }
    } else {
        parse_json(&body)?
    };
    let (key, secret) = keys::create(&st.pool, &tenant_id, &k.name).await?;
    Ok((StatusCode::CREATED, Json(CreatedKey { key, secret })))
}

/// List a tenant's API keys (never their secrets).
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant_id}/api-keys", tag = "admin",
    params(("tenant_id" = String, Path)), responses((status = 200, body = Vec<ApiKey>)), security(("bearer" = [])))]
pub async fn list_keys(
    State(st): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<String>,
) -> Result<Json<Vec<ApiKey>>, ApiError> {
    caller.require_admin()?;
    Ok(Json(keys::list(&st.pool, &tenant_id).await?))
}

/// Revoke an API key (idempotent).
#[utoipa::path(post, path = "/v1/admin/api-keys/{key_id}/revoke", tag = "admin",
    params(("key_id" = String, Path)), responses((status = 200, body = ApiKey)), security(("bearer" = [])))]
pub async fn revoke_key(
    State(st): State<AppState>,
    caller: Caller,
    Path(key_id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    caller.require_admin()?;
    let id = Uuid::parse_str(&key_id).map_err(|_| ApiError::not_found("API key"))?;
    Ok(Json(keys::revoke(&st.pool, id).await?))
}

/// Add a price version (effective no earlier than now plus the clock skew, except the
/// first version of a model, which may be dated back).
#[utoipa::path(post, path = "/v1/admin/prices", tag = "admin", request_body = NewPrice,
    responses((status = 201, body = Object)), security(("bearer" = [])))]
pub async fn add_price(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<PriceVersion>), ApiError> {
    caller.require_admin()?;
    let p: NewPrice = parse_json(&body)?;
    let mut tx = st.pool.begin().await?;
    let v = prices::add_price(&mut tx, &p, Utc::now(), st.skew()).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PriceQuery {
    pub provider: Option<String>,
    pub model: Option<String>,
}

/// Price versions (all, newest first), optionally for one provider or model.
#[utoipa::path(get, path = "/v1/prices", tag = "prices", params(PriceQuery),
    responses((status = 200, body = Object)), security(("bearer" = [])))]
pub async fn list_prices(
    State(st): State<AppState>,
    _caller: Caller,
    q: Result<Query<PriceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let rows = prices::list_versions(&st.pool, q.provider.as_deref(), q.model.as_deref()).await?;
    Ok(Json(serde_json::json!({ "data": rows })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMarkup {
    /// Absent: the global rule.
    pub tenant_id: Option<String>,
    #[schema(value_type = String)]
    pub percent: Decimal,
    pub effective_from: Option<DateTime<Utc>>,
}

/// Add a markup rule (customer price = cost x (1 + percent/100)).
#[utoipa::path(post, path = "/v1/admin/markup-rules", tag = "admin", request_body = NewMarkup,
    responses((status = 201, body = Object)), security(("bearer" = [])))]
pub async fn add_markup(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<MarkupRule>), ApiError> {
    caller.require_admin()?;
    let m: NewMarkup = parse_json(&body)?;
    let r = prices::add_markup(
        &st.pool,
        m.tenant_id.as_deref(),
        m.percent,
        m.effective_from,
        Utc::now(),
        st.skew(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(r)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterQuery {
    pub reason: Option<String>,
    pub tenant_id: Option<String>,
    /// Only those whose event has not landed since.
    #[serde(default)]
    pub unresolved: bool,
    pub cursor: Option<i64>,
    pub limit: Option<i64>,
}

/// List dead letters.
#[utoipa::path(get, path = "/v1/admin/dead-letters", tag = "admin", params(DeadLetterQuery),
    responses((status = 200, body = Vec<DeadLetter>)), security(("bearer" = [])))]
pub async fn list_dead(
    State(st): State<AppState>,
    caller: Caller,
    q: Result<Query<DeadLetterQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require_admin()?;
    let Query(q) = q.map_err(super::query_error)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let data = dead_letters::list(
        &st.pool,
        q.reason.as_deref(),
        q.tenant_id.as_deref(),
        q.unresolved,
        q.cursor.unwrap_or(0),
        limit,
    )
    .await?;
    let next = (data.len() as i64 == limit)
        .then(|| data.last().map(|d| d.id))
        .flatten();
    Ok(Json(
        serde_json::json!({ "data": data, "next_cursor": next }),
    ))
}

/// One dead letter, with its payload.
#[utoipa::path(get, path = "/v1/admin/dead-letters/{id}", tag = "admin", params(("id" = i64, Path)),
    responses((status = 200, body = DeadLetter)), security(("bearer" = [])))]
pub async fn get_dead(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeadLetter>, ApiError> {
    caller.require_admin()?;
    let id: i64 = id.parse().map_err(|_| ApiError::not_found("dead letter"))?;
    dead_letters::get(&st.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("dead letter"))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Redriven {
    pub dead_letter_id: i64,
    pub redrive_id: i64,
    pub subject: String,
}

/// Re-drive a dead letter: republish its payload (same event id) to its tenant's subject.
#[utoipa::path(post, path = "/v1/admin/dead-letters/{id}/redrive", tag = "admin", params(("id" = i64, Path)),
    responses((status = 202, body = Redriven)), security(("bearer" = [])))]
pub async fn redrive(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Redriven>), ApiError> {
    caller.require_admin()?;
    let id: i64 = id.parse().map_err(|_| ApiError::not_found("dead letter"))?;
    let (subject, payload) = dead_letters::payload(&st.pool, id)
        .await?
        .ok_or_else(|| ApiError::not_found("dead letter"))?;
    // to the tenant's proper subject when the payload names a valid tenant
    let subject =
        match crate::events::parse_bytes(&payload, Utc::now() + chrono::Duration::days(36500)) {
            Ok(ev) => st.settings.usage_subject(ev.tenant_id()),
            Err(_) => subject,
        };
    let redrive_id = dead_letters::record_redrive(&st.pool, id).await?;
    let ack = st
        .bus
        .publish_with_id(
            subject.clone(),
            Bytes::from(payload),
            &format!("redrive-{id}-{redrive_id}"),
        )
        .await?;
    ack.await
        .map_err(|e| crate::bus::PublishError(e.to_string()))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Redriven {
            dead_letter_id: id,
            redrive_id,
            subject,
        }),
    ))
}
