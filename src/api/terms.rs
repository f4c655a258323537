//! Commercial terms over REST: tier schedule versions (operator) and a tenant's tier
//! positions.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::error::parse_json;
use super::{ApiError, AppState, Caller};
use crate::catalog::tiers::{self, NewTierSchedule, Position};
use crate::pricing::TierSchedule;

/// Publish a new version of a tenant's tier schedule (effective from a future instant).
#[utoipa::path(post, path = "/v1/admin/tenants/{tenant_id}/tier-schedules", tag = "terms",
    params(("tenant_id" = String, Path)), request_body = NewTierSchedule,
    responses((status = 201, body = TierSchedule), (status = 422, description = "invalid schedule")),
    security(("bearer" = [])))]
pub async fn add_tier_schedule(
    State(st): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<TierSchedule>), ApiError> {
    caller.require_admin()?;
    let new: NewTierSchedule = parse_json(&body)?;
    let s = tiers::add(&st.pool, &tenant_id, new, Utc::now(), st.skew()).await?;
    Ok((StatusCode::CREATED, Json(s)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TierSchedulePage {
    pub data: Vec<TierSchedule>,
}

/// A tenant's tier schedule versions, newest first.
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant_id}/tier-schedules", tag = "terms",
    params(("tenant_id" = String, Path)),
    responses((status = 200, body = TierSchedulePage)), security(("bearer" = [])))]
pub async fn list_tier_schedules(
    State(st): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<String>,
) -> Result<Json<TierSchedulePage>, ApiError> {
    caller.require_admin()?;
    Ok(Json(TierSchedulePage {
        data: tiers::list(&st.pool, &tenant_id).await?,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PositionQuery {
    /// Operator calls only: the tenant to read.
    pub tenant_id: Option<String>,
    /// `YYYY-MM`; absent: every period.
    pub period: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PositionPage {
    pub data: Vec<Position>,
}

/// The tenant's cumulative position per tier schedule and billing period.
#[utoipa::path(get, path = "/v1/tiers", tag = "terms", params(PositionQuery),
    responses((status = 200, body = PositionPage)), security(("bearer" = [])))]
pub async fn positions(
    State(st): State<AppState>,
    caller: Caller,
    q: Result<Query<PositionQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<PositionPage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    Ok(Json(PositionPage {
        data: tiers::positions(&st.pool, &tenant, q.period.as_deref()).await?,
    }))
}
