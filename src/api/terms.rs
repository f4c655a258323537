//! Commercial terms over REST: tier schedule versions (operator), tier positions,
//! budgets (versioned CRUD), alert facts, and pre-authorisation.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};

use super::error::parse_json;
use super::{ApiError, AppState, Caller};
use crate::authorize::{AuthDecision, AuthError, AuthRequest};
use crate::catalog::budgets::{self, AlertFact, BudgetStatus, NewBudget};
use crate::catalog::tiers::{self, NewTierSchedule, Position};
use crate::pricing::budgets::Budget;
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

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    /// Operator calls only: the tenant.
    pub tenant_id: Option<String>,
}

/// Create a budget or change it: a new version, effective from a future instant.
/// Tenants manage their own budgets; operators name the tenant.
#[utoipa::path(post, path = "/v1/budgets", tag = "terms", params(TenantQuery),
    request_body = NewBudget,
    responses((status = 201, body = Budget), (status = 422, description = "invalid budget")),
    security(("bearer" = [])))]
pub async fn add_budget(
    State(st): State<AppState>,
    caller: Caller,
    q: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Result<(StatusCode, Json<Budget>), ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let new: NewBudget = parse_json(&body)?;
    let b = budgets::add(&st.pool, &tenant, new, Utc::now(), st.skew()).await?;
    Ok((StatusCode::CREATED, Json(b)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BudgetStatusPage {
    pub data: Vec<BudgetStatus>,
}

/// The budgets in force now, with spend and open holds in the current period.
#[utoipa::path(get, path = "/v1/budgets", tag = "terms", params(TenantQuery),
    responses((status = 200, body = BudgetStatusPage)), security(("bearer" = [])))]
pub async fn list_budgets(
    State(st): State<AppState>,
    caller: Caller,
    q: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<BudgetStatusPage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    Ok(Json(BudgetStatusPage {
        data: budgets::status(&st.pool, &tenant, Utc::now()).await?,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BudgetVersionPage {
    pub data: Vec<Budget>,
}

/// Every version of one budget, newest first.
#[utoipa::path(get, path = "/v1/budgets/{name}", tag = "terms",
    params(("name" = String, Path), TenantQuery),
    responses((status = 200, body = BudgetVersionPage), (status = 404, description = "no such budget")),
    security(("bearer" = [])))]
pub async fn budget_versions(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<BudgetVersionPage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let data = budgets::versions(&st.pool, &tenant, Some(&name)).await?;
    if data.is_empty() {
        return Err(ApiError::not_found("budget"));
    }
    Ok(Json(BudgetVersionPage { data }))
}

/// Retire a budget: a new, inactive version from now plus the accepted clock skew.
#[utoipa::path(delete, path = "/v1/budgets/{name}", tag = "terms",
    params(("name" = String, Path), TenantQuery),
    responses((status = 200, body = Budget), (status = 404, description = "no such budget")),
    security(("bearer" = [])))]
pub async fn retire_budget(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    q: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Budget>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    Ok(Json(
        budgets::retire(&st.pool, &tenant, &name, Utc::now(), st.skew()).await?,
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AlertQuery {
    /// Operator calls only: the tenant.
    pub tenant_id: Option<String>,
    #[serde(rename = "type")]
    pub type_: Option<String>,
    /// Only facts with a smaller id (the previous page's `next_cursor`).
    pub cursor: Option<i64>,
    pub limit: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct AlertPage {
    pub data: Vec<AlertFact>,
    pub next_cursor: Option<i64>,
}

/// The tenant's alert facts, newest first.
#[utoipa::path(get, path = "/v1/alerts", tag = "terms", params(AlertQuery),
    responses((status = 200, body = AlertPage)), security(("bearer" = [])))]
pub async fn list_alerts(
    State(st): State<AppState>,
    caller: Caller,
    q: Result<Query<AlertQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AlertPage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let data = budgets::alerts(&st.pool, &tenant, q.type_.as_deref(), q.cursor, limit).await?;
    let next_cursor = (data.len() as i64 == limit)
        .then(|| data.last().map(|a| a.id))
        .flatten();
    Ok(Json(AlertPage { data, next_cursor }))
}

/// Pre-authorise a request: allow (with the model and its worst-case cost) or deny (with
/// the budget that stops it); an allowed request holds its worst case on every budget in
/// scope until the usage event carrying `authorization_id` settles it, or it expires.
#[utoipa::path(post, path = "/v1/authorize", tag = "terms", request_body = AuthRequest,
    responses((status = 200, body = AuthDecision), (status = 422, description = "invalid request")),
    security(("bearer" = [])))]
pub async fn authorize(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<AuthDecision>, ApiError> {
    let req: AuthRequest = parse_json(&body)?;
    let tenant = caller.tenant(req.tenant_id.as_deref())?;
    match st.authorizer.authorize(tenant, req).await {
        Ok(d) => Ok(Json(d)),
        Err(AuthError::UnknownTenant(_)) => Err(ApiError::not_found("tenant")),
        Err(AuthError::Invalid(m)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_authorization",
            m,
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}
