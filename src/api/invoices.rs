//! Invoices, notes and reconciliation over REST. Tenants read their own invoices with their
//! key; operators name the tenant with `?tenant_id=` and close periods, issue notes, import
//! provider exports and run reconciliations.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::error::parse_json;
use super::{ApiError, AppState, Caller};
use crate::invoices::document::{self, Invoice};
use crate::invoices::reconcile::{self, Finding, Mapping, Tolerances};
use crate::invoices::store::{self, InvoiceSummary, Note};

type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn invalid(code: &'static str, m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, m)
}

fn check_period(p: &str) -> Result<(), ApiError> {
    crate::pricing::tiers::parse_period(p)
        .map(|_| ())
        .ok_or_else(|| invalid("invalid_period", "period must be YYYY-MM"))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Operator calls only: the tenant (all tenants if omitted).
    pub tenant_id: Option<String>,
    /// `YYYY-MM`
    pub period: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct InvoicePage {
    pub data: Vec<InvoiceSummary>,
}

/// Invoices, newest period first: finalised ones and the live drafts of open periods.
#[utoipa::path(get, path = "/v1/invoices", tag = "invoices", params(ListQuery),
    responses((status = 200, body = InvoicePage)), security(("bearer" = [])))]
pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    q: QueryResult<ListQuery>,
) -> Result<Json<InvoicePage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = match (&caller, q.tenant_id.as_deref()) {
        (Caller::Admin, None) => None,
        _ => Some(caller.tenant(q.tenant_id.as_deref())?),
    };
    if let Some(p) = &q.period {
        check_period(p)?;
    }
    Ok(Json(InvoicePage {
        data: store::list(&st.pool, tenant.as_deref(), q.period.as_deref()).await?,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DocQuery {
    /// Operator calls only: the tenant.
    pub tenant_id: Option<String>,
    /// `YYYY-MM` (draft: default the current month).
    pub period: Option<String>,
    /// `json` (default), `csv` or `html`; or send `Accept: text/csv` / `text/html`.
    pub format: Option<String>,
}

fn render(inv: &Invoice, format: Option<&str>, headers: &HeaderMap) -> Result<Response, ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = match format {
        Some(f) => f,
        None if accept.contains("text/csv") => "csv",
        None if accept.contains("text/html") => "html",
        None => "json",
    };
    let name = inv
        .number
        .clone()
        .unwrap_or_else(|| format!("draft-{}-{}", inv.tenant_id, inv.period));
    Ok(match format {
        "json" => Json(inv).into_response(),
        "csv" => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{name}.csv\""),
                ),
            ],
            document::to_csv(inv),
        )
            .into_response(),
        "html" => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            document::to_html(inv),
        )
            .into_response(),
        other => {
            return Err(ApiError::bad_request(
                "invalid_format",
                format!("format {other:?}: use json, csv or html"),
            ))
        }
    })
}

/// The live draft invoice of an open period (the finalised invoice once it is closed),
/// read from the accrual projection.
#[utoipa::path(get, path = "/v1/invoices/draft", tag = "invoices", params(DocQuery),
    responses((status = 200, body = Invoice)), security(("bearer" = [])))]
pub async fn draft(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    q: QueryResult<DocQuery>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = caller.tenant(q.tenant_id.as_deref())?;
    let period = q
        .period
        .clone()
        .unwrap_or_else(|| crate::pricing::period_of(Utc::now()));
    check_period(&period)?;
    let inv = store::for_period(&st.pool, &tenant, &period)
        .await?
        .ok_or_else(|| ApiError::not_found("tenant"))?;
    render(&inv, q.format.as_deref(), &headers)
}

/// A finalised invoice as JSON, CSV (one row per line) or printable HTML.
#[utoipa::path(get, path = "/v1/invoices/{number}", tag = "invoices",
    params(("number" = String, Path), DocQuery),
    responses((status = 200, body = Invoice), (status = 404, description = "no such invoice")),
    security(("bearer" = [])))]
pub async fn get(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(number): Path<String>,
    q: QueryResult<DocQuery>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = match (&caller, q.tenant_id.as_deref()) {
        (Caller::Admin, None) => None,
        _ => Some(caller.tenant(q.tenant_id.as_deref())?),
    };
    let inv = store::get(&st.pool, &number, tenant.as_deref())
        .await?
        .ok_or_else(|| ApiError::not_found("invoice"))?;
    render(&inv, q.format.as_deref(), &headers)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloseRequest {
    /// `YYYY-MM`, a month that has ended.
    pub period: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CloseAccepted {
    pub period: String,
    /// Tenants whose close was published now (the others had closed already).
    pub published: Vec<String>,
}

/// Close a period for every tenant: each tenant's close event is published (once; a
/// second call publishes nothing) and its invoice is finalised when the ledger applies it.
#[utoipa::path(post, path = "/v1/admin/invoices/close", tag = "invoices", request_body = CloseRequest,
    responses((status = 202, body = CloseAccepted), (status = 422, description = "not an ended period")),
    security(("bearer" = [])))]
pub async fn close(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<CloseAccepted>), ApiError> {
    caller.require_admin()?;
    let r: CloseRequest = parse_json(&body)?;
    check_period(&r.period)?;
    match crate::pricing::tiers::period_end(&r.period) {
        Some(end) if end <= Utc::now() => {}
        _ => {
            return Err(invalid(
                "invalid_period",
                format!("period {} has not ended", r.period),
            ))
        }
    }
    let published = crate::engine::publish_closes(&st.pool, &st.bus, &st.settings, &r.period)
        .await
        .map_err(ApiError::internal)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(CloseAccepted {
            period: r.period,
            published,
        }),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNote {
    /// `credit` (lowers what the tenant owes) or `debit`.
    pub kind: String,
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub reason: String,
}

/// Issue a credit or debit note against a finalised invoice. The invoice never changes: the
/// note is its own numbered, hashed document, and an adjustment event referring to the
/// invoice carries it into the ledger, where the next open invoice settles it. The note is
/// stored first; its adjustment is published right after (and, should that fail, by the
/// pricing role's clock until the ledger has it).
#[utoipa::path(post, path = "/v1/admin/invoices/{number}/notes", tag = "invoices",
    params(("number" = String, Path)), request_body = NewNote,
    responses((status = 201, body = Note), (status = 404, description = "no such invoice"),
      (status = 422, description = "invalid note")),
    security(("bearer" = [])))]
pub async fn add_note(
    State(st): State<AppState>,
    caller: Caller,
    Path(number): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Note>), ApiError> {
    caller.require_admin()?;
    let n: NewNote = parse_json(&body)?;
    if n.kind != "credit" && n.kind != "debit" {
        return Err(invalid("invalid_note", "kind must be credit or debit"));
    }
    let inv = store::get(&st.pool, &number, None)
        .await?
        .ok_or_else(|| ApiError::not_found("invoice"))?;
    if n.amount <= Decimal::ZERO || n.amount.scale() > document::minor_units(&inv.currency) {
        return Err(invalid(
            "invalid_note",
            format!(
                "amount must be positive with at most {} decimal places in {}",
                document::minor_units(&inv.currency),
                inv.currency
            ),
        ));
    }
    let reason = n.reason.trim();
    if reason.is_empty() || reason.len() > 500 || reason.contains('\0') {
        return Err(invalid("invalid_note", "reason: 1 to 500 characters"));
    }
    let mut tx = st.pool.begin().await?;
    let note = store::insert_note(&mut tx, &n.kind, &inv, n.amount, reason, Utc::now()).await?;
    tx.commit().await?;
    // the note's adjustment, published once the note is stored; if this fails the clock's
    // sweep publishes it (same id and payload: the ledger records it once)
    let ev = store::note_event(&note, &inv.period);
    let published = match st
        .bus
        .publish_with_id(
            st.settings.usage_subject(&inv.tenant_id),
            ev.canonical.clone().into(),
            &ev.msg_id(),
        )
        .await
    {
        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = published {
        tracing::warn!(error = %e, note = %note.number, "note adjustment not published yet; the clock will retry");
    }
    Ok((StatusCode::CREATED, Json(note)))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct NotePage {
    pub data: Vec<Note>,
}

/// Credit and debit notes against an invoice.
#[utoipa::path(get, path = "/v1/invoices/{number}/notes", tag = "invoices",
    params(("number" = String, Path), ListQuery),
    responses((status = 200, body = NotePage)), security(("bearer" = [])))]
pub async fn list_notes(
    State(st): State<AppState>,
    caller: Caller,
    Path(number): Path<String>,
    q: QueryResult<ListQuery>,
) -> Result<Json<NotePage>, ApiError> {
    let Query(q) = q.map_err(super::query_error)?;
    let tenant = match (&caller, q.tenant_id.as_deref()) {
        (Caller::Admin, None) => None,
        _ => Some(caller.tenant(q.tenant_id.as_deref())?),
    };
    store::get(&st.pool, &number, tenant.as_deref())
        .await?
        .ok_or_else(|| ApiError::not_found("invoice"))?;
    Ok(Json(NotePage {
        data: store::notes(&st.pool, &number).await?,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    pub provider: String,
    /// `YYYY-MM`
    pub period: String,
    /// A preset (`openai-usage`, `anthropic-usage`, `openrouter-generations`) or `custom`
    /// with `mapping`.
    pub format: String,
    /// For `custom`: the column mapping as JSON.
    pub mapping: Option<String>,
    /// The export's currency (default USD).
    pub currency: Option<String>,
    pub filename: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Imported {
    pub export_id: i64,
    pub rows: usize,
}

/// Import a provider's usage or invoice export (CSV body, up to 64 MiB). Every row must
/// parse; a bad row refuses the whole file and stores nothing.
#[utoipa::path(post, path = "/v1/admin/provider-exports", tag = "invoices", params(ImportQuery),
    request_body(content = String, content_type = "text/csv"),
    responses((status = 201, body = Imported), (status = 422, description = "unreadable export")),
    security(("bearer" = [])))]
pub async fn import(
    State(st): State<AppState>,
    caller: Caller,
    q: QueryResult<ImportQuery>,
    body: Bytes,
) -> Result<(StatusCode, Json<Imported>), ApiError> {
    caller.require_admin()?;
    let Query(q) = q.map_err(super::query_error)?;
    check_period(&q.period)?;
    let mapping = match (q.format.as_str(), &q.mapping) {
        ("custom", Some(m)) => serde_json::from_str::<Mapping>(m)
            .map_err(|e| invalid("invalid_mapping", format!("mapping: {e}")))?,
        ("custom", None) => return Err(invalid("invalid_mapping", "custom format needs mapping")),
        (f, _) => reconcile::preset(f).ok_or_else(|| {
            invalid(
                "invalid_format",
                format!("format {f:?}: one of {:?} or custom", reconcile::PRESETS),
            )
        })?,
    };
    let currency = q.currency.clone().unwrap_or_else(|| "USD".into());
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(invalid("invalid_currency", "currency: an ISO 4217 code"));
    }
    let text = std::str::from_utf8(&body)
        .map_err(|_| invalid("invalid_export", "the export is not UTF-8"))?;
    let rows = reconcile::normalise(text, &mapping).map_err(|m| invalid("invalid_export", m))?;
    reconcile::check_period(&rows, &q.period).map_err(|m| invalid("invalid_export", m))?;
    let id = reconcile::import(
        &st.pool,
        &q.provider,
        &q.period,
        &q.format,
        q.filename.as_deref().unwrap_or(""),
        &currency,
        &rows,
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(Imported {
            export_id: id,
            rows: rows.len(),
        }),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// `internal`, `provider` or `margin`.
    pub kind: String,
    /// `YYYY-MM` (internal, margin).
    pub period: Option<String>,
    /// provider: the imported export to compare.
    pub export_id: Option<i64>,
    #[serde(default)]
    pub tolerances: Option<Tolerances>,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct Run {
    pub id: i64,
    pub kind: String,
    pub period: String,
    pub provider: Option<String>,
    pub export_id: Option<i64>,
    #[schema(value_type = Object)]
    pub parameters: serde_json::Value,
    #[schema(value_type = Object)]
    pub summary: serde_json::Value,
    pub created_at: chrono::DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[sqlx(skip)]
    pub findings: Option<Vec<Finding>>,
}

/// Run a reconciliation and store it with its findings.
#[utoipa::path(post, path = "/v1/admin/reconciliations", tag = "invoices", request_body = RunRequest,
    responses((status = 201, body = Run), (status = 422, description = "invalid request")),
    security(("bearer" = [])))]
pub async fn run(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<Run>), ApiError> {
    caller.require_admin()?;
    let r: RunRequest = parse_json(&body)?;
    let id = run_reconciliation(&st.pool, r).await?;
    Ok((StatusCode::CREATED, Json(get_run(&st.pool, id).await?)))
}

/// Run and store a reconciliation (shared by REST and the CLI); returns its id.
pub async fn run_reconciliation(pool: &sqlx::PgPool, r: RunRequest) -> Result<i64, ApiError> {
    let tol = r.tolerances.clone().unwrap_or_default();
    match r.kind.as_str() {
        "internal" | "margin" => {
            let p = r
                .period
                .ok_or_else(|| invalid("invalid_reconciliation", "period is required"))?;
            check_period(&p)?;
            let (findings, summary) = if r.kind == "internal" {
                reconcile::internal(pool, &p)
                    .await
                    .map_err(ApiError::internal)?
            } else {
                (
                    Vec::new(),
                    reconcile::margin(pool, &p)
                        .await
                        .map_err(ApiError::internal)?,
                )
            };
            let meta = reconcile::RunMeta {
                kind: &r.kind,
                period: &p,
                provider: None,
                export_id: None,
                parameters: serde_json::json!({}),
            };
            Ok(reconcile::store_run(pool, meta, &summary, &findings).await?)
        }
        "provider" => {
            let e = r
                .export_id
                .ok_or_else(|| invalid("invalid_reconciliation", "export_id is required"))?;
            let meta: Option<(String, String)> =
                sqlx::query_as("select provider, period from provider_exports where id = $1")
                    .bind(e)
                    .fetch_optional(pool)
                    .await?;
            let (provider, period) = meta.ok_or_else(|| ApiError::not_found("export"))?;
            let (findings, summary) = reconcile::against_provider(pool, e, &tol)
                .await
                .map_err(ApiError::internal)?;
            let meta = reconcile::RunMeta {
                kind: "provider",
                period: &period,
                provider: Some(&provider),
                export_id: Some(e),
                parameters: serde_json::to_value(&tol).unwrap_or_default(),
            };
            Ok(reconcile::store_run(pool, meta, &summary, &findings).await?)
        }
        k => Err(invalid(
            "invalid_reconciliation",
            format!("kind {k:?}: internal, provider or margin"),
        )),
    }
}

pub async fn get_run(pool: &sqlx::PgPool, id: i64) -> Result<Run, ApiError> {
    let mut run: Run = sqlx::query_as(
        "select id, kind, period, provider, export_id, parameters, summary, created_at
         from reconciliations where id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| ApiError::not_found("reconciliation"))?;
    let f: Vec<Finding> = sqlx::query_as(
        "select kind, tenant_id, provider_request_id, day, model, amount_at_stake, detail
         from reconciliation_findings where reconciliation_id = $1 order by n limit 10000",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    run.findings = Some(f);
    Ok(run)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RunPage {
    pub data: Vec<Run>,
}

/// Stored reconciliations, newest first (summaries; fetch one for its findings).
#[utoipa::path(get, path = "/v1/admin/reconciliations", tag = "invoices",
    responses((status = 200, body = RunPage)), security(("bearer" = [])))]
pub async fn list_runs(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<RunPage>, ApiError> {
    caller.require_admin()?;
    let data: Vec<Run> = sqlx::query_as(
        "select id, kind, period, provider, export_id, parameters, summary, created_at
         from reconciliations order by id desc limit 200",
    )
    .fetch_all(&st.pool)
    .await?;
    Ok(Json(RunPage { data }))
}

/// One reconciliation with its findings (up to 10,000).
#[utoipa::path(get, path = "/v1/admin/reconciliations/{id}", tag = "invoices",
    params(("id" = i64, Path)),
    responses((status = 200, body = Run), (status = 404, description = "no such run")),
    security(("bearer" = [])))]
pub async fn get_reconciliation(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<i64>,
) -> Result<Json<Run>, ApiError> {
    caller.require_admin()?;
    Ok(Json(get_run(&st.pool, id).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PeriodQuery {
    /// `YYYY-MM`
    pub period: String,
}

/// Revenue vs cost per tenant, provider and model for a period (with totals per provider
/// and per tenant).
#[utoipa::path(get, path = "/v1/admin/margin", tag = "invoices", params(PeriodQuery),
    responses((status = 200, body = Object)), security(("bearer" = [])))]
pub async fn margin(
    State(st): State<AppState>,
    caller: Caller,
    q: QueryResult<PeriodQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require_admin()?;
    let Query(q) = q.map_err(super::query_error)?;
    check_period(&q.period)?;
    Ok(Json(
        reconcile::margin(&st.pool, &q.period)
            .await
            .map_err(ApiError::internal)?,
    ))
}
