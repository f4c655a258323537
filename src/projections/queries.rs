//! Reads over the projections, always scoped to one tenant.

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use crate::pricing::Breakdown;

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RequestView {
    pub request_id: String,
    pub event_id: String,
    /// Position in the tenant's ledger order.
    pub seq: i64,
    pub occurred_at: DateTime<Utc>,
    pub api_key_id: String,
    pub provider: String,
    pub model: String,
    pub status: String,
    pub batch: bool,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    #[schema(value_type = String)]
    pub price_amount: Decimal,
    #[schema(value_type = String)]
    pub cost_amount: Decimal,
    pub currency: String,
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct TransferView {
    /// The event's ledger position and this transfer's place among its legs.
    pub seq: i64,
    pub leg: i16,
    pub kind: String,
    pub debit_account: String,
    pub credit_account: String,
    #[schema(value_type = String)]
    pub amount: Decimal,
    pub currency: String,
    pub cost_version_id: Option<i64>,
    pub price_version_id: Option<i64>,
    pub markup_rule_id: Option<i64>,
    pub recorded_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RequestDetail {
    #[serde(flatten)]
    pub view: RequestView,
    /// The rating breakdown recorded with the charge: every token class with its rates
    /// and amounts, markup, batch discount, margin and the version ids used.
    pub breakdown: Value,
    pub transfers: Vec<TransferView>,
    /// The usage event exactly as recorded (CloudEvents JSON): its `data` carries what the
    /// view leaves out — `estimated` and `estimate_method`, `fallback_from`,
    /// `provider_request_id`, `authorization_id`, `latency_ms`, `region`, `tags`.
    pub event: Value,
}

const VIEW_COLUMNS: &str =
    "request_id, event_id, seq, occurred_at, api_key_id, provider, model, status,
    batch, input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
    price_amount, cost_amount, currency::text as currency";

pub async fn request(
    pool: &PgPool,
    tenant: &str,
    request_id: &str,
) -> sqlx::Result<Option<RequestDetail>> {
    let view: Option<RequestView> = sqlx::query_as(&format!(
        "select {VIEW_COLUMNS} from request_views where tenant_id = $1 and request_id = $2"
    ))
    .bind(tenant)
    .bind(request_id)
    .fetch_optional(pool)
    .await?;
    let Some(view) = view else { return Ok(None) };
    let transfers: Vec<TransferView> = sqlx::query_as(
        "select seq, leg, kind, debit_account, credit_account, amount, currency::text as currency,
                cost_version_id, price_version_id, markup_rule_id, recorded_at
         from transfers where tenant_id = $1 and seq = $2 order by leg",
    )
    .bind(tenant)
    .bind(view.seq)
    .fetch_all(pool)
    .await?;
    let stored: Option<String> = sqlx::query_scalar(
        "select breakdown::text from transfers where tenant_id = $1 and seq = $2 and leg = 0",
    )
    .bind(tenant)
    .bind(view.seq)
    .fetch_optional(pool)
    .await?;
    // the stored compact breakdown, expanded into every line with its amounts
    let breakdown = stored
        .and_then(|t| serde_json::from_str::<Breakdown>(&t).ok())
        .and_then(|b| b.expand().ok())
        .map(|r| serde_json::to_value(r).expect("rating serialises"))
        .unwrap_or(Value::Null);
    let envelope: Option<Vec<u8>> =
        sqlx::query_scalar("select envelope from events where tenant_id = $1 and seq = $2")
            .bind(tenant)
            .bind(view.seq)
            .fetch_optional(pool)
            .await?;
    let event = envelope
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    Ok(Some(RequestDetail {
        view,
        breakdown,
        transfers,
        event,
    }))
}

#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RequestFilter {
    pub tenant_id: Option<String>,
    /// Inclusive lower bound on `occurred_at`.
    pub from: Option<DateTime<Utc>>,
    /// Exclusive upper bound on `occurred_at`.
    pub to: Option<DateTime<Utc>>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub api_key_id: Option<String>,
    pub status: Option<String>,
    /// 1..=1000, default 100.
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// Newest first in ledger order; the cursor is the last `seq` seen.
pub async fn requests(
    pool: &PgPool,
    tenant: &str,
    f: &RequestFilter,
    before_seq: Option<i64>,
    limit: i64,
) -> sqlx::Result<Vec<RequestView>> {
    sqlx::query_as(&format!(
        "select {VIEW_COLUMNS} from request_views
         where tenant_id = $1
           and ($2::timestamptz is null or occurred_at >= $2)
           and ($3::timestamptz is null or occurred_at < $3)
           and ($4::text is null or model = $4)
           and ($5::text is null or provider = $5)
           and ($6::text is null or api_key_id = $6)
           and ($7::text is null or status = $7)
           and ($8::int8 is null or seq < $8)
         order by seq desc limit $9"
    ))
    .bind(tenant)
    .bind(f.from)
    .bind(f.to)
    .bind(&f.model)
    .bind(&f.provider)
    .bind(&f.api_key_id)
    .bind(&f.status)
    .bind(before_seq)
    .bind(limit)
    .fetch_all(pool)
    .await
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct UsageRow {
    pub day: Option<NaiveDate>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub api_key_id: Option<String>,
    pub requests: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    #[schema(value_type = String)]
    pub price_amount: Decimal,
    #[schema(value_type = String)]
    pub cost_amount: Decimal,
    pub currency: String,
}

pub const GROUPS: [&str; 4] = ["day", "model", "provider", "api_key_id"];

/// Most groups one usage answer holds; a query with more is refused, never cut short.
pub const MAX_USAGE_GROUPS: usize = 10_000;

/// Usage between two UTC days (inclusive from, exclusive to), grouped by a subset of
/// `GROUPS` (validated by the caller: only those names reach the SQL). Up to
/// `MAX_USAGE_GROUPS` + 1 rows, so the caller can tell an answer that would not fit.
pub async fn usage(
    pool: &PgPool,
    tenant: &str,
    from: NaiveDate,
    to: NaiveDate,
    group_by: &[&str],
) -> sqlx::Result<Vec<UsageRow>> {
    let col = |g: &str, ty: &str| {
        if group_by.contains(&g) {
            g.to_string()
        } else {
            format!("null::{ty} as {g}")
        }
    };
    let select = format!(
        "{}, {}, {}, {}",
        col("day", "date"),
        col("model", "text"),
        col("provider", "text"),
        col("api_key_id", "text")
    );
    let mut groups: Vec<&str> = group_by.to_vec();
    groups.push("currency");
    sqlx::query_as(&format!(
        "select {select}, sum(requests)::int8 as requests, sum(input_tokens)::int8 as input_tokens,
           sum(cached_input_tokens)::int8 as cached_input_tokens,
           sum(cache_write_tokens)::int8 as cache_write_tokens, sum(output_tokens)::int8 as output_tokens,
           sum(reasoning_tokens)::int8 as reasoning_tokens, sum(price_amount) as price_amount,
           sum(cost_amount) as cost_amount, currency::text as currency
         from usage_rollups where tenant_id = $1 and day >= $2 and day < $3
         group by {} order by {} limit {}",
        groups.join(", "),
        groups.join(", "),
        MAX_USAGE_GROUPS + 1
    ))
    .bind(tenant)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
}

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Balance {
    pub account: String,
    pub currency: String,
    /// Debits minus credits.
    #[schema(value_type = String)]
    pub balance: Decimal,
}

pub async fn balances(pool: &PgPool, tenant: &str) -> sqlx::Result<Vec<Balance>> {
    sqlx::query_as(
        "select account, currency::text as currency, balance from account_balances
         where tenant_id = $1 order by account",
    )
    .bind(tenant)
    .fetch_all(pool)
    .await
}
