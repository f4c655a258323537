//! Persistence of reservation versions, and utilisation reports.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::CatalogError;
use crate::pricing::reservations::Reservation;

/// A reservation version as an operator submits it.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewReservation {
    pub name: String,
    pub provider: String,
    pub model: String,
    pub units: u32,
    pub tokens_per_minute_per_unit: u64,
    #[schema(value_type = String)]
    pub price_per_unit_hour: Decimal,
    /// Raise `reservation.underutilized` when the last day's utilisation, evaluated
    /// hourly, is below this percentage (absent: never).
    #[schema(value_type = Option<String>)]
    pub underutilization_alert_percent: Option<Decimal>,
    /// False ends the reservation from `effective_from`.
    #[serde(default = "yes")]
    pub active: bool,
    /// Defaults to now plus the accepted clock skew.
    pub effective_from: Option<DateTime<Utc>>,
}

fn yes() -> bool {
    true
}

type Row = (
    i64,
    String,
    String,
    DateTime<Utc>,
    bool,
    String,
    String,
    i32,
    i64,
    Decimal,
    Option<Decimal>,
);

fn from_row(r: Row) -> Reservation {
    Reservation {
        id: r.0,
        tenant_id: r.1,
        name: r.2,
        effective_from: r.3,
        active: r.4,
        provider: r.5,
        model: r.6,
        units: r.7 as u32,
        tokens_per_minute_per_unit: r.8 as u64,
        price_per_unit_hour: r.9,
        underutilization_alert_percent: r.10,
    }
}

const COLUMNS: &str = "id, tenant_id, name, effective_from, active, provider, model, units,
    tokens_per_minute_per_unit, price_per_unit_hour, underutilization_alert_percent";

pub async fn load_all(c: &mut sqlx::PgConnection) -> Result<Vec<Reservation>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!("select {COLUMNS} from reservations"))
        .fetch_all(&mut *c)
        .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// Record a new version: effective no earlier than now plus the skew, unless the tenant
/// has no events yet.
pub async fn add(
    pool: &PgPool,
    tenant_id: &str,
    new: NewReservation,
    now: DateTime<Utc>,
    skew: chrono::Duration,
) -> Result<Reservation, CatalogError> {
    let mut r = Reservation {
        id: 0,
        tenant_id: tenant_id.to_string(),
        name: new.name,
        effective_from: now + skew,
        active: new.active,
        provider: new.provider,
        model: new.model,
        units: new.units,
        tokens_per_minute_per_unit: new.tokens_per_minute_per_unit,
        price_per_unit_hour: new.price_per_unit_hour,
        underutilization_alert_percent: new.underutilization_alert_percent,
    };
    r.check().map_err(CatalogError::InvalidTerms)?;
    let mut tx = pool.begin().await?;
    r.effective_from =
        super::tenant_term_effective(&mut tx, tenant_id, new.effective_from, now, skew).await?;
    let (id,): (i64,) = sqlx::query_as(
        "insert into reservations (tenant_id, name, effective_from, active, provider, model, units,
           tokens_per_minute_per_unit, price_per_unit_hour, underutilization_alert_percent)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) returning id",
    )
    .bind(tenant_id)
    .bind(&r.name)
    .bind(r.effective_from)
    .bind(r.active)
    .bind(&r.provider)
    .bind(&r.model)
    .bind(r.units as i32)
    .bind(r.tokens_per_minute_per_unit as i64)
    .bind(r.price_per_unit_hour)
    .bind(r.underutilization_alert_percent)
    .fetch_one(&mut *tx)
    .await
    .map_err(
        |e| match e.as_database_error().and_then(|d| d.code()).as_deref() {
            Some("23503") => CatalogError::TenantNotFound(tenant_id.to_string()),
            _ => CatalogError::Db(e),
        },
    )?;
    r.id = id;
    tx.commit().await?;
    Ok(r)
}

pub async fn list(pool: &PgPool, tenant_id: &str) -> Result<Vec<Reservation>, CatalogError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "select {COLUMNS} from reservations where tenant_id = $1 order by id desc"
    ))
    .bind(tenant_id)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// Utilisation of one reservation in one UTC hour.
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct HourUtilisation {
    pub reservation: String,
    /// `YYYY-MM-DDTHH` (UTC).
    pub hour: String,
    /// Tokens covered in the hour.
    pub covered_tokens: i64,
    /// Minutes of the hour with any covered tokens.
    pub active_minutes: i64,
}

/// Covered tokens per reservation and hour in `[from, to)` (UTC hours `YYYY-MM-DDTHH`).
pub async fn utilisation(
    pool: &PgPool,
    tenant_id: &str,
    from: &str,
    to: &str,
) -> Result<Vec<HourUtilisation>, CatalogError> {
    Ok(sqlx::query_as(
        "select reservation, left(minute, 13) as hour, sum(covered)::int8 as covered_tokens,
           count(*)::int8 as active_minutes
         from reservation_usage
         where tenant_id = $1 and minute >= $2 and minute < $3
         group by 1, 2 order by 1, 2",
    )
    .bind(tenant_id)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?)
}

/// Our reservation with a provider, as an operator submits it.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProviderReservation {
    pub name: String,
    pub provider: String,
    pub model: String,
    pub units: u32,
    pub tokens_per_minute_per_unit: u64,
    #[schema(value_type = String)]
    pub price_per_unit_hour: Decimal,
    /// The currency of `price_per_unit_hour` (default USD): the fees, and the list cost the
    /// reservation covers, are settled in it.
    pub currency: Option<String>,
    #[serde(default = "yes")]
    pub active: bool,
    /// Defaults to now plus the accepted clock skew; never earlier.
    pub effective_from: Option<DateTime<Utc>>,
}

/// The tenant columns, with an empty tenant: ours.
const PROVIDER_COLUMNS: &str = "id, '' as tenant_id, name, effective_from, active, provider,
    model, units, tokens_per_minute_per_unit, price_per_unit_hour,
    null::numeric as underutilization_alert_percent";

/// Our provider reservations (`tenant_id` empty).
pub async fn load_provider(c: &mut sqlx::PgConnection) -> Result<Vec<Reservation>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "select {PROVIDER_COLUMNS} from provider_reservations"
    ))
    .fetch_all(&mut *c)
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// Record a version of our reservation with a provider: effective no earlier than now
/// plus the skew (tokens are counted against it from then on).
pub async fn add_provider(
    pool: &PgPool,
    new: NewProviderReservation,
    now: DateTime<Utc>,
    skew: chrono::Duration,
) -> Result<Reservation, CatalogError> {
    let at = super::global_term_effective(new.effective_from, now, skew)?;
    let mut r = Reservation {
        id: 0,
        tenant_id: String::new(),
        name: new.name,
        effective_from: at,
        active: new.active,
        provider: new.provider,
        model: new.model,
        units: new.units,
        tokens_per_minute_per_unit: new.tokens_per_minute_per_unit,
        price_per_unit_hour: new.price_per_unit_hour,
        underutilization_alert_percent: None,
    };
    r.check().map_err(CatalogError::InvalidTerms)?;
    let currency = new.currency.unwrap_or_else(|| "USD".into());
    if !super::valid_currency(&currency) {
        return Err(CatalogError::InvalidTerms(
            "currency must be an ISO 4217 code such as USD".into(),
        ));
    }
    // every version of a reservation is in one currency (its fees settle in it)
    let before: Option<String> = sqlx::query_scalar(
        "select currency::text from provider_reservations where name = $1 order by id limit 1",
    )
    .bind(&r.name)
    .fetch_optional(pool)
    .await?;
    if let Some(c) = before.filter(|c| *c != currency) {
        return Err(CatalogError::InvalidTerms(format!(
            "reservation {} is in {c}: its versions keep that currency",
            r.name
        )));
    }
    let (id,): (i64,) = sqlx::query_as(
        "insert into provider_reservations (name, effective_from, active, provider, model, units,
           tokens_per_minute_per_unit, price_per_unit_hour, currency)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9) returning id",
    )
    .bind(&r.name)
    .bind(r.effective_from)
    .bind(r.active)
    .bind(&r.provider)
    .bind(&r.model)
    .bind(r.units as i32)
    .bind(r.tokens_per_minute_per_unit as i64)
    .bind(r.price_per_unit_hour)
    .bind(&currency)
    .fetch_one(pool)
    .await?;
    r.id = id;
    Ok(r)
}

/// Our provider reservation versions with their currencies, by (effective_from, id).
pub async fn load_provider_with_currency(
    c: &mut sqlx::PgConnection,
) -> Result<Vec<(Reservation, String)>, sqlx::Error> {
    let currencies: std::collections::HashMap<i64, String> =
        sqlx::query_as("select id, currency::text from provider_reservations")
            .fetch_all(&mut *c)
            .await?
            .into_iter()
            .collect();
    let mut all = load_provider(c).await?;
    all.sort_by_key(|r| (r.effective_from, r.id));
    Ok(all
        .into_iter()
        .map(|r| {
            let cur = currencies.get(&r.id).cloned().unwrap_or_default();
            (r, cur)
        })
        .collect())
}

pub async fn list_provider(pool: &PgPool) -> Result<Vec<Reservation>, CatalogError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "select {PROVIDER_COLUMNS} from provider_reservations order by id desc"
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}
