//! Tenant-scoped reads: requests, usage, balances. A tenant key sees only its tenant;
//! another tenant's object answers 404.

use axum::extract::{Path, Query, State};
use axum::Json;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState, Caller};
use crate::projections::queries::{
    self, Balance, RequestDetail, RequestFilter, RequestView, UsageRow,
};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TenantParam {
    /// Operator calls only: the tenant to read.
    pub tenant_id: Option<String>,
}

/// One request's cost breakdown.
#[utoipa::path(get, path = "/v1/requests/{request_id}", tag = "reads",
    params(("request_id" = String, Path), TenantParam),
    responses((status = 200, body = RequestDetail), (status = 404, description = "no such request for this tenant")),
    security(("bearer" = [])))]
pub async fn get_request(
    State(st): State<AppState>,
    caller: Caller,
    Path(request_id): Path<String>,
    q: Result<Query<TenantParam>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RequestDetail>, ApiError> {
    let q = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    queries::request(&st.pool, &tenant, &request_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("request"))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RequestPage {
    pub data: Vec<RequestView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Requests, newest first in ledger order, with filters and cursor pagination.
#[utoipa::path(get, path = "/v1/requests", tag = "reads", params(RequestFilter),
    responses((status = 200, body = RequestPage)), security(("bearer" = [])))]
pub async fn list_requests(
    State(st): State<AppState>,
    caller: Caller,
    q: Result<Query<RequestFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RequestPage>, ApiError> {
    let Query(f) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(f.tenant_id.as_deref())?;
    let limit = f.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            "limit must be between 1 and 1000",
        ));
    }
    let before = match &f.cursor {
        None => None,
        Some(c) => Some(c.parse::<i64>().map_err(|_| {
            ApiError::bad_request("invalid_cursor", "cursor is not one this API returned")
        })?),
    };
    let data = queries::requests(&st.pool, &tenant, &f, before, limit).await?;
    let next_cursor = (data.len() as i64 == limit)
        .then(|| data.last().map(|r| r.seq.to_string()))
        .flatten();
    Ok(Json(RequestPage { data, next_cursor }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    pub tenant_id: Option<String>,
    /// First UTC day, inclusive (YYYY-MM-DD).
    pub from: NaiveDate,
    /// Last UTC day, exclusive (YYYY-MM-DD).
    pub to: NaiveDate,
    /// Comma-separated subset of day, model, provider, api_key_id (default: day).
    pub group_by: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UsagePage {
    pub data: Vec<UsageRow>,
}

/// Usage rollups over a date range, grouped.
#[utoipa::path(get, path = "/v1/usage", tag = "reads", params(UsageQuery),
    responses((status = 200, body = UsagePage)), security(("bearer" = [])))]
pub async fn usage(
    State(st): State<AppState>,
    caller: Caller,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<UsagePage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    if q.to <= q.from || (q.to - q.from).num_days() > 366 {
        return Err(ApiError::bad_request(
            "invalid_range",
            "need from < to, at most 366 days apart",
        ));
    }
    let mut groups = Vec::new();
    for g in q
        .group_by
        .as_deref()
        .unwrap_or("day")
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
    {
        let Some(known) = queries::GROUPS.iter().find(|k| **k == g) else {
            return Err(ApiError::bad_request(
                "invalid_group_by",
                format!("unknown group {g:?}; use day, model, provider, api_key_id"),
            ));
        };
        if !groups.contains(known) {
            groups.push(*known);
        }
    }
    let data = queries::usage(&st.pool, &tenant, q.from, q.to, &groups).await?;
    if data.len() > queries::MAX_USAGE_GROUPS {
        // a sum over a cut-off answer would be short: refuse it whole
        return Err(ApiError::bad_request(
            "too_many_groups",
            format!(
                "the answer would hold more than {} groups; narrow from/to or group by fewer keys",
                queries::MAX_USAGE_GROUPS
            ),
        ));
    }
    Ok(Json(UsagePage { data }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BalancePage {
    pub data: Vec<Balance>,
}

/// The tenant's account balances (debits minus credits).
#[utoipa::path(get, path = "/v1/balances", tag = "reads", params(TenantParam),
    responses((status = 200, body = BalancePage)), security(("bearer" = [])))]
pub async fn balances(
    State(st): State<AppState>,
    caller: Caller,
    q: Result<Query<TenantParam>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<BalancePage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    Ok(Json(BalancePage {
        data: queries::balances(&st.pool, &tenant).await?,
    }))
}
