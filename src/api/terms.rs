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
use crate::catalog::commitments::NewCommitment;
use crate::catalog::reservations::{NewProviderReservation, NewReservation};
use crate::catalog::routing::NewRoutingClass;
use crate::catalog::tiers::{self, NewTierSchedule, Position};
use crate::engine::RoutingDecision;
use crate::pricing::budgets::Budget;
use crate::pricing::commitments::Commitment;
use crate::pricing::reservations::Reservation;
use crate::pricing::routing::{QuoteContext, QuoteLine, RoutingClass, TokenMix};
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
#[into_params(parameter_in = Query)]
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
#[into_params(parameter_in = Query)]
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
#[into_params(parameter_in = Query)]
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

#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuoteCandidate {
    /// Absent: every provider with a price for the model.
    pub provider: Option<String>,
    pub model: String,
}

#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuoteRequest {
    /// Operator calls only: the tenant.
    pub tenant_id: Option<String>,
    /// A routing class (its candidates at or above its quality floor) ...
    pub routing_class: Option<String>,
    /// ... or candidates.
    pub candidates: Option<Vec<QuoteCandidate>>,
    #[serde(flatten)]
    pub mix: TokenMix,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct QuoteResponse {
    pub currency: String,
    pub routing_class: Option<String>,
    pub generated_at: chrono::DateTime<Utc>,
    pub candidates: Vec<QuoteLine>,
}

/// Price candidates for a token mix as this tenant's next request: list price, batch and
/// cache savings, the tenant's tier position, the effective price; ranked cheapest first.
#[utoipa::path(post, path = "/v1/quote", tag = "terms", request_body = QuoteRequest,
    responses((status = 200, body = QuoteResponse), (status = 422, description = "invalid request")),
    security(("bearer" = [])))]
pub async fn quote(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Json<QuoteResponse>, ApiError> {
    let req: QuoteRequest = parse_json(&body)?;
    let tenant = caller.tenant(req.tenant_id.as_deref())?;
    let invalid = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_quote", m);
    req.mix.check().map_err(invalid)?;
    let (book, _) = st.engine.book().await.map_err(ApiError::internal)?;
    let now = Utc::now();
    let view = crate::engine::tenant_view(&st.pool, &book, &tenant, now)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    let candidates: Vec<(String, String, Option<rust_decimal::Decimal>)> =
        match (&req.routing_class, &req.candidates) {
            (Some(c), None) => {
                let class = book
                    .class_at(&tenant, c, now)
                    .ok_or_else(|| invalid(format!("no routing class {c:?} in force")))?;
                crate::pricing::routing::eligible(class)
            }
            (None, Some(list)) if !list.is_empty() && list.len() <= 50 => list
                .iter()
                .flat_map(|c| match &c.provider {
                    Some(p) => vec![(p.clone(), c.model.clone(), None)],
                    None => {
                        let ps = book.providers_for(&c.model, &view.currency, now);
                        if ps.is_empty() {
                            vec![(String::new(), c.model.clone(), None)]
                        } else {
                            ps.into_iter().map(|p| (p, c.model.clone(), None)).collect()
                        }
                    }
                })
                .collect(),
            _ => {
                return Err(invalid(
                    "give either routing_class or 1 to 50 candidates".into(),
                ))
            }
        };
    let ctx = QuoteContext {
        book: &book,
        tenant_id: &tenant,
        currency: &view.currency,
        tiers: &view.tiers,
        reserved: &view.reserved,
        commitments: &view.commitments,
        provider_minute: &view.provider_minute,
        provider_period: &view.provider_period,
        at: now,
    };
    Ok(Json(QuoteResponse {
        currency: view.currency.clone(),
        routing_class: req.routing_class.clone(),
        generated_at: now,
        candidates: crate::pricing::routing::quote(&ctx, &req.mix, &candidates),
    }))
}

/// The routing decision for a class as the pricing role publishes it to KV, computed now.
#[utoipa::path(get, path = "/v1/routing/{class}", tag = "terms",
    params(("class" = String, Path), TenantQuery),
    responses((status = 200, body = RoutingDecision), (status = 404, description = "no such class")),
    security(("bearer" = [])))]
pub async fn routing_decision(
    State(st): State<AppState>,
    caller: Caller,
    Path(class): Path<String>,
    q: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RoutingDecision>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let (book, _) = st.engine.book().await.map_err(ApiError::internal)?;
    let now = Utc::now();
    let view = crate::engine::tenant_view(&st.pool, &book, &tenant, now)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    crate::engine::decide(&book, &view, &tenant, &class, now, "request")
        .map(Json)
        .ok_or_else(|| ApiError::not_found("routing class"))
}

/// Publish a routing class version (global, or a tenant's own).
#[utoipa::path(post, path = "/v1/admin/routing-classes", tag = "terms", request_body = NewRoutingClass,
    responses((status = 201, body = RoutingClass), (status = 422, description = "invalid class")),
    security(("bearer" = [])))]
pub async fn add_routing_class(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<RoutingClass>), ApiError> {
    caller.require_admin()?;
    let new: NewRoutingClass = parse_json(&body)?;
    let c = crate::catalog::routing::add(&st.pool, new, Utc::now(), st.skew()).await?;
    Ok((StatusCode::CREATED, Json(c)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RoutingClassPage {
    pub data: Vec<RoutingClass>,
}

/// Every routing class version, newest first.
#[utoipa::path(get, path = "/v1/admin/routing-classes", tag = "terms",
    responses((status = 200, body = RoutingClassPage)), security(("bearer" = [])))]
pub async fn list_routing_classes(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<RoutingClassPage>, ApiError> {
    caller.require_admin()?;
    Ok(Json(RoutingClassPage {
        data: crate::catalog::routing::list(&st.pool).await?,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DiffQuery {
    /// Two price version ids ...
    pub from_id: Option<i64>,
    pub to_id: Option<i64>,
    /// ... or two instants: the book in force at each.
    pub from: Option<chrono::DateTime<Utc>>,
    pub to: Option<chrono::DateTime<Utc>>,
    pub provider: Option<String>,
    pub model: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PriceDiff {
    pub data: Vec<crate::pricing::diff::KeyChange>,
}

/// Diff two price versions (`from_id`, `to_id`) or the price book at two instants
/// (`from`, `to`): each key whose version changed, field by field.
#[utoipa::path(get, path = "/v1/prices/diff", tag = "prices", params(DiffQuery),
    responses((status = 200, body = PriceDiff), (status = 400, description = "bad query"),
        (status = 404, description = "no such version")),
    security(("bearer" = [])))]
pub async fn price_diff(
    State(st): State<AppState>,
    _caller: Caller,
    q: Result<Query<DiffQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<PriceDiff>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let (book, _) = st.engine.book().await.map_err(ApiError::internal)?;
    let data = crate::pricing::diff::diff(
        &book,
        crate::pricing::diff::Between::from_query(q.from_id, q.to_id, q.from, q.to)
            .map_err(|m| ApiError::bad_request("invalid_query", m))?,
        q.provider.as_deref(),
        q.model.as_deref(),
    )
    .map_err(ApiError::not_found)?;
    Ok(Json(PriceDiff { data }))
}

/// Publish a new version of a tenant's commitment (committed spend per month).
#[utoipa::path(post, path = "/v1/admin/tenants/{tenant_id}/commitments", tag = "terms",
    params(("tenant_id" = String, Path)), request_body = NewCommitment,
    responses((status = 201, body = Commitment), (status = 422, description = "invalid commitment")),
    security(("bearer" = [])))]
pub async fn add_commitment(
    State(st): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Commitment>), ApiError> {
    caller.require_admin()?;
    let new: NewCommitment = parse_json(&body)?;
    let c =
        crate::catalog::commitments::add(&st.pool, &tenant_id, new, Utc::now(), st.skew()).await?;
    Ok((StatusCode::CREATED, Json(c)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CommitmentPage {
    pub data: Vec<Commitment>,
}

/// A tenant's commitment versions, newest first.
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant_id}/commitments", tag = "terms",
    params(("tenant_id" = String, Path)),
    responses((status = 200, body = CommitmentPage)), security(("bearer" = [])))]
pub async fn list_commitments(
    State(st): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<String>,
) -> Result<Json<CommitmentPage>, ApiError> {
    caller.require_admin()?;
    Ok(Json(CommitmentPage {
        data: crate::catalog::commitments::list(&st.pool, &tenant_id).await?,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CommitmentPositionPage {
    pub data: Vec<crate::catalog::commitments::Position>,
}

/// The tenant's commitment positions per period: drawn so far, and whether closed.
#[utoipa::path(get, path = "/v1/commitments", tag = "terms", params(TenantQuery),
    responses((status = 200, body = CommitmentPositionPage)), security(("bearer" = [])))]
pub async fn commitment_positions(
    State(st): State<AppState>,
    caller: Caller,
    q: Result<Query<TenantQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<CommitmentPositionPage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    Ok(Json(CommitmentPositionPage {
        data: crate::catalog::commitments::positions(&st.pool, &tenant).await?,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeriodClose {
    /// `YYYY-MM`, a month that has ended.
    pub period: String,
}

/// Publish a tenant's period close now (the clock does it by itself once a month has
/// ended); the ledger records it once.
#[utoipa::path(post, path = "/v1/admin/tenants/{tenant_id}/period-close", tag = "terms",
    params(("tenant_id" = String, Path)), request_body = PeriodClose,
    responses((status = 202, body = Object), (status = 422, description = "not an ended period")),
    security(("bearer" = [])))]
pub async fn period_close(
    State(st): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    caller.require_admin()?;
    let p: PeriodClose = parse_json(&body)?;
    let exists: bool = sqlx::query_scalar("select exists (select 1 from tenants where id = $1)")
        .bind(&tenant_id)
        .fetch_one(&st.pool)
        .await
        .map_err(ApiError::internal)?;
    if !exists {
        return Err(ApiError::not_found("tenant"));
    }
    let invalid = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_period", m);
    match crate::pricing::tiers::period_end(&p.period) {
        Some(end) if end <= Utc::now() => {}
        Some(_) => return Err(invalid(format!("period {} has not ended", p.period))),
        None => return Err(invalid("period must be YYYY-MM".into())),
    }
    let id = crate::engine::publish_period_close(&st.bus, &st.settings, &tenant_id, &p.period)
        .await
        .map_err(ApiError::internal)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "event_id": id })),
    ))
}

/// Publish a new version of a tenant's reservation (reserved throughput for a model).
#[utoipa::path(post, path = "/v1/admin/tenants/{tenant_id}/reservations", tag = "terms",
    params(("tenant_id" = String, Path)), request_body = NewReservation,
    responses((status = 201, body = Reservation), (status = 422, description = "invalid reservation")),
    security(("bearer" = [])))]
pub async fn add_reservation(
    State(st): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Reservation>), ApiError> {
    caller.require_admin()?;
    let new: NewReservation = parse_json(&body)?;
    let r =
        crate::catalog::reservations::add(&st.pool, &tenant_id, new, Utc::now(), st.skew()).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReservationPage {
    pub data: Vec<Reservation>,
}

/// A tenant's reservation versions, newest first.
#[utoipa::path(get, path = "/v1/admin/tenants/{tenant_id}/reservations", tag = "terms",
    params(("tenant_id" = String, Path)),
    responses((status = 200, body = ReservationPage)), security(("bearer" = [])))]
pub async fn list_reservations(
    State(st): State<AppState>,
    caller: Caller,
    Path(tenant_id): Path<String>,
) -> Result<Json<ReservationPage>, ApiError> {
    caller.require_admin()?;
    Ok(Json(ReservationPage {
        data: crate::catalog::reservations::list(&st.pool, &tenant_id).await?,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UtilisationQuery {
    /// Operator calls only: the tenant.
    pub tenant_id: Option<String>,
    /// From this instant (inclusive, hour-aligned), default 24 hours ago.
    pub from: Option<chrono::DateTime<Utc>>,
    /// To this instant (exclusive), default now.
    pub to: Option<chrono::DateTime<Utc>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UtilisationRow {
    pub reservation: String,
    pub hour: String,
    pub covered_tokens: i64,
    pub active_minutes: i64,
    /// Tokens the reservation could cover in the hour (capacity x 60), by the version in
    /// force at the hour's start.
    pub capacity_tokens: Option<u64>,
    /// covered / capacity, in percent.
    #[schema(value_type = Option<String>)]
    pub utilisation_percent: Option<rust_decimal::Decimal>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UtilisationPage {
    pub data: Vec<UtilisationRow>,
}

/// Reservation utilisation per reservation and UTC hour (hours without use are absent).
#[utoipa::path(get, path = "/v1/reservations/utilisation", tag = "terms", params(UtilisationQuery),
    responses((status = 200, body = UtilisationPage)), security(("bearer" = [])))]
pub async fn utilisation(
    State(st): State<AppState>,
    caller: Caller,
    q: Result<Query<UtilisationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<UtilisationPage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let to = q.to.unwrap_or_else(Utc::now);
    let from = q.from.unwrap_or(to - chrono::Duration::hours(24));
    let fmt = |t: chrono::DateTime<Utc>| crate::pricing::reservations::minute_of(t);
    let rows =
        crate::catalog::reservations::utilisation(&st.pool, &tenant, &fmt(from), &fmt(to)).await?;
    let (book, _) = st.engine.book().await.map_err(ApiError::internal)?;
    let versions = book.reservation_versions(&tenant);
    let data = rows
        .into_iter()
        .map(|r| {
            let start: Option<chrono::DateTime<Utc>> = format!("{}:00:00Z", r.hour).parse().ok();
            let cap = start.and_then(|s| {
                versions.get(r.reservation.as_str()).and_then(|vs| {
                    vs.iter()
                        .rev()
                        .find(|v| v.effective_from <= s)
                        .filter(|v| v.active)
                        .map(|v| v.capacity() * 60)
                })
            });
            UtilisationRow {
                utilisation_percent: cap.filter(|c| *c > 0).map(|c| {
                    (rust_decimal::Decimal::from(r.covered_tokens)
                        * rust_decimal::Decimal::ONE_HUNDRED
                        / rust_decimal::Decimal::from(c))
                    .round_dp(2)
                }),
                capacity_tokens: cap,
                reservation: r.reservation,
                hour: r.hour,
                covered_tokens: r.covered_tokens,
                active_minutes: r.active_minutes,
            }
        })
        .collect();
    Ok(Json(UtilisationPage { data }))
}

/// Publish a version of our own reservation with a provider (effective from a future
/// instant): its live headroom lowers the marginal cost quotes and rankings see.
#[utoipa::path(post, path = "/v1/admin/provider-reservations", tag = "terms",
    request_body = NewProviderReservation,
    responses((status = 201, body = Reservation), (status = 422, description = "invalid reservation")),
    security(("bearer" = [])))]
pub async fn add_provider_reservation(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<Reservation>), ApiError> {
    caller.require_admin()?;
    let new: NewProviderReservation = parse_json(&body)?;
    let r =
        crate::catalog::reservations::add_provider(&st.pool, new, Utc::now(), st.skew()).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

/// Our provider reservation versions, newest first.
#[utoipa::path(get, path = "/v1/admin/provider-reservations", tag = "terms",
    responses((status = 200, body = ReservationPage)), security(("bearer" = [])))]
pub async fn list_provider_reservations(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<ReservationPage>, ApiError> {
    caller.require_admin()?;
    Ok(Json(ReservationPage {
        data: crate::catalog::reservations::list_provider(&st.pool).await?,
    }))
}

/// Publish a version of our own commitment with a provider. Its live drawdown lowers the
/// marginal cost quotes and rankings see; its worth is settled per month.
#[utoipa::path(post, path = "/v1/admin/provider-commitments", tag = "terms",
    request_body = crate::catalog::provider_commitments::NewProviderCommitment,
    responses((status = 201, body = crate::pricing::provider::ProviderCommitment),
        (status = 422, description = "invalid commitment, or effective in a month already settled")),
    security(("bearer" = [])))]
pub async fn add_provider_commitment(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<
    (
        StatusCode,
        Json<crate::pricing::provider::ProviderCommitment>,
    ),
    ApiError,
> {
    caller.require_admin()?;
    let new: crate::catalog::provider_commitments::NewProviderCommitment = parse_json(&body)?;
    let c = crate::catalog::provider_commitments::add(&st.pool, new, Utc::now(), st.skew()).await?;
    Ok((StatusCode::CREATED, Json(c)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ProviderCommitmentPage {
    pub data: Vec<crate::pricing::provider::ProviderCommitment>,
}

/// Our provider commitment versions, newest first.
#[utoipa::path(get, path = "/v1/admin/provider-commitments", tag = "terms",
    responses((status = 200, body = ProviderCommitmentPage)), security(("bearer" = [])))]
pub async fn list_provider_commitments(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<ProviderCommitmentPage>, ApiError> {
    caller.require_admin()?;
    Ok(Json(ProviderCommitmentPage {
        data: crate::catalog::provider_commitments::list(&st.pool).await?,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettleRequest {
    /// `YYYY-MM`, a month that has ended.
    pub period: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct SettlementPage {
    pub data: Vec<crate::ledger::provider_settlement::Settlement>,
}

/// Settle an ended month with every provider we hold a commitment or reservation with;
/// answers the revisions recorded now (none if nothing changed since the last run).
#[utoipa::path(post, path = "/v1/admin/provider-settlements", tag = "terms",
    request_body = SettleRequest,
    responses((status = 201, body = SettlementPage), (status = 422, description = "not an ended month")),
    security(("bearer" = [])))]
pub async fn settle_providers(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<SettlementPage>), ApiError> {
    caller.require_admin()?;
    let r: SettleRequest = parse_json(&body)?;
    let now = Utc::now();
    match crate::pricing::tiers::period_end(&r.period) {
        Some(end) if end <= now => {}
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_period",
                format!("period {} has not ended", r.period),
            ))
        }
        None => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_period",
                "period must be YYYY-MM",
            ))
        }
    }
    let data = crate::ledger::provider_settlement::settle_period(&st.pool, &r.period, now)
        .await
        .map_err(ApiError::internal)?;
    Ok((StatusCode::CREATED, Json(SettlementPage { data })))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SettlementQuery {
    /// `YYYY-MM`
    pub period: Option<String>,
    pub provider: Option<String>,
}

/// Recorded provider settlement revisions, newest first.
#[utoipa::path(get, path = "/v1/admin/provider-settlements", tag = "terms",
    params(SettlementQuery),
    responses((status = 200, body = SettlementPage)), security(("bearer" = [])))]
pub async fn list_provider_settlements(
    State(st): State<AppState>,
    caller: Caller,
    q: Result<Query<SettlementQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SettlementPage>, ApiError> {
    caller.require_admin()?;
    let Query(q) = q.map_err(super::query_error)?;
    let data = crate::ledger::provider_settlement::list(
        &st.pool,
        q.period.as_deref(),
        q.provider.as_deref(),
    )
    .await
    .map_err(ApiError::internal)?;
    Ok(Json(SettlementPage { data }))
}
