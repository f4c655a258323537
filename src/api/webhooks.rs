//! Webhook endpoints, messages and attempts over REST. Tenants manage their own with their
//! key; operators name the tenant with `?tenant_id=` (or `tenant_id` in a new endpoint).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::parse_json;
use super::{ApiError, AppState, Caller};
use crate::webhooks::{
    self, Endpoint, EndpointPatch, EndpointWithSecret, Message, MessageDetail, MessageFilter,
    NewEndpoint, WebhookError,
};

type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        match e {
            WebhookError::Invalid(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_webhook", m)
            }
            WebhookError::Refused(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "url_refused", m)
            }
            WebhookError::NotFound(w) => ApiError::not_found(w),
            WebhookError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            WebhookError::Db(e) => ApiError::internal(e),
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    /// Operator calls only: the tenant.
    pub tenant_id: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EndpointPage {
    pub data: Vec<Endpoint>,
}

/// Register an endpoint. The URL is vetted by the address guard; the answer carries the
/// signing secret, shown this once.
#[utoipa::path(post, path = "/v1/webhooks/endpoints", tag = "webhooks", request_body = NewEndpoint,
    responses((status = 201, body = EndpointWithSecret),
      (status = 422, description = "invalid or refused URL, unknown event type")),
    security(("bearer" = [])))]
pub async fn create_endpoint(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<EndpointWithSecret>), ApiError> {
    let req: NewEndpoint = parse_json(&body)?;
    let tenant = caller.tenant(req.tenant_id.as_deref())?;
    let e = webhooks::create_endpoint(&st.pool, &tenant, req, &st.settings.webhooks.allow).await?;
    Ok((StatusCode::CREATED, Json(e)))
}

#[utoipa::path(get, path = "/v1/webhooks/endpoints", tag = "webhooks", params(TenantQuery),
    responses((status = 200, body = EndpointPage)), security(("bearer" = [])))]
pub async fn list_endpoints(
    State(st): State<AppState>,
    caller: Caller,
    q: QueryResult<TenantQuery>,
) -> Result<Json<EndpointPage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    Ok(Json(EndpointPage {
        data: webhooks::list_endpoints(&st.pool, &tenant).await?,
    }))
}

fn endpoint_id(s: &str) -> Result<Uuid, ApiError> {
    s.parse().map_err(|_| ApiError::not_found("endpoint"))
}

#[utoipa::path(get, path = "/v1/webhooks/endpoints/{id}", tag = "webhooks",
    params(("id" = Uuid, Path), TenantQuery),
    responses((status = 200, body = Endpoint), (status = 404, description = "no such endpoint")),
    security(("bearer" = [])))]
pub async fn get_endpoint(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult<TenantQuery>,
) -> Result<Json<Endpoint>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    Ok(Json(
        webhooks::get_endpoint(&st.pool, &tenant, endpoint_id(&id)?).await?,
    ))
}

/// Change an endpoint's URL (vetted again), description, types, or enabled flag.
#[utoipa::path(patch, path = "/v1/webhooks/endpoints/{id}", tag = "webhooks",
    params(("id" = Uuid, Path), TenantQuery), request_body = EndpointPatch,
    responses((status = 200, body = Endpoint), (status = 404, description = "no such endpoint"),
      (status = 422, description = "invalid or refused URL")),
    security(("bearer" = [])))]
pub async fn update_endpoint(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult<TenantQuery>,
    body: Bytes,
) -> Result<Json<Endpoint>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let patch: EndpointPatch = parse_json(&body)?;
    Ok(Json(
        webhooks::update_endpoint(
            &st.pool,
            &tenant,
            endpoint_id(&id)?,
            patch,
            &st.settings.webhooks.allow,
        )
        .await?,
    ))
}

/// Delete an endpoint, with its messages and attempt log.
#[utoipa::path(delete, path = "/v1/webhooks/endpoints/{id}", tag = "webhooks",
    params(("id" = Uuid, Path), TenantQuery),
    responses((status = 204), (status = 404, description = "no such endpoint")),
    security(("bearer" = [])))]
pub async fn delete_endpoint(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult<TenantQuery>,
) -> Result<StatusCode, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    webhooks::delete_endpoint(&st.pool, &tenant, endpoint_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the secrets in use stay valid (and are signed with), default 86400 (a day),
    /// at most 604800 (a week); 0 ends them now.
    pub grace_seconds: Option<i64>,
}

/// A new signing secret (shown once); the old one stays valid for the grace period, and
/// meanwhile every message carries a signature by each.
#[utoipa::path(post, path = "/v1/webhooks/endpoints/{id}/rotate-secret", tag = "webhooks",
    params(("id" = Uuid, Path), TenantQuery), request_body = RotateRequest,
    responses((status = 200, body = EndpointWithSecret), (status = 404, description = "no such endpoint")),
    security(("bearer" = [])))]
pub async fn rotate_secret(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult<TenantQuery>,
    body: Bytes,
) -> Result<Json<EndpointWithSecret>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let req: RotateRequest = if body.is_empty() {
        RotateRequest::default()
    } else {
        parse_json(&body)?
    };
    let grace = req.grace_seconds.unwrap_or(86_400);
    if !(0..=604_800).contains(&grace) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_webhook",
            "grace_seconds must be between 0 and 604800",
        ));
    }
    Ok(Json(
        webhooks::rotate_secret(
            &st.pool,
            &tenant,
            endpoint_id(&id)?,
            chrono::Duration::seconds(grace),
        )
        .await?,
    ))
}

/// Queue a `webhook.test` message to the endpoint.
#[utoipa::path(post, path = "/v1/webhooks/endpoints/{id}/test", tag = "webhooks",
    params(("id" = Uuid, Path), TenantQuery),
    responses((status = 202, body = Message), (status = 404, description = "no such endpoint")),
    security(("bearer" = [])))]
pub async fn send_test(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult<TenantQuery>,
) -> Result<(StatusCode, Json<Message>), ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let m = webhooks::send_test(&st.pool, &tenant, endpoint_id(&id)?).await?;
    Ok((StatusCode::ACCEPTED, Json(m)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRange {
    /// Failed messages created at or after this instant ...
    pub since: DateTime<Utc>,
    /// ... and before this one (default: now).
    pub until: Option<DateTime<Utc>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReplayCount {
    pub replayed: u64,
}

/// Replay an endpoint's failed messages created in a time range.
#[utoipa::path(post, path = "/v1/webhooks/endpoints/{id}/replay", tag = "webhooks",
    params(("id" = Uuid, Path), TenantQuery), request_body = ReplayRange,
    responses((status = 200, body = ReplayCount), (status = 404, description = "no such endpoint")),
    security(("bearer" = [])))]
pub async fn replay_range(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult<TenantQuery>,
    body: Bytes,
) -> Result<Json<ReplayCount>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let r: ReplayRange = parse_json(&body)?;
    if r.until.is_some_and(|u| u <= r.since) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_webhook",
            "until must be after since",
        ));
    }
    let n = webhooks::replay_range(&st.pool, &tenant, endpoint_id(&id)?, r.since, r.until).await?;
    Ok(Json(ReplayCount { replayed: n }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct MessageQuery {
    /// Operator calls only: the tenant.
    pub tenant_id: Option<String>,
    pub endpoint_id: Option<Uuid>,
    /// `pending`, `succeeded` or `failed`.
    pub status: Option<String>,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
    pub limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MessagePage {
    pub data: Vec<Message>,
    pub next_cursor: Option<String>,
}

/// Messages, newest first.
#[utoipa::path(get, path = "/v1/webhooks/messages", tag = "webhooks", params(MessageQuery),
    responses((status = 200, body = MessagePage)), security(("bearer" = [])))]
pub async fn list_messages(
    State(st): State<AppState>,
    caller: Caller,
    q: QueryResult<MessageQuery>,
) -> Result<Json<MessagePage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let data = webhooks::list_messages(
        &st.pool,
        &tenant,
        MessageFilter {
            endpoint_id: q.endpoint_id,
            status: q.status.as_deref(),
            cursor: q.cursor.as_deref(),
            limit,
        },
    )
    .await?;
    let next_cursor = (data.len() as i64 == limit)
        .then(|| data.last().map(|m| m.id.clone()))
        .flatten();
    Ok(Json(MessagePage { data, next_cursor }))
}

/// A message with every attempt (status, latency, the start of the response).
#[utoipa::path(get, path = "/v1/webhooks/messages/{id}", tag = "webhooks",
    params(("id" = String, Path), TenantQuery),
    responses((status = 200, body = MessageDetail), (status = 404, description = "no such message")),
    security(("bearer" = [])))]
pub async fn get_message(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult<TenantQuery>,
) -> Result<Json<MessageDetail>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    Ok(Json(webhooks::get_message(&st.pool, &tenant, &id).await?))
}

/// Send a message again from the start of the retry schedule, under the same id.
#[utoipa::path(post, path = "/v1/webhooks/messages/{id}/replay", tag = "webhooks",
    params(("id" = String, Path), TenantQuery),
    responses((status = 202, body = Message), (status = 404, description = "no such message"),
      (status = 409, description = "already pending")),
    security(("bearer" = [])))]
pub async fn replay_message(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: QueryResult<TenantQuery>,
) -> Result<(StatusCode, Json<Message>), ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let m = webhooks::replay_message(&st.pool, &tenant, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(m)))
}
