//! Persistence of our commitment versions with providers.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::CatalogError;
use crate::pricing::provider::ProviderCommitment;

/// A version of our commitment with a provider, as an operator submits it.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProviderCommitment {
    pub name: String,
    pub provider: String,
    /// One model of the provider; absent: every model.
    pub model: Option<String>,
    /// Default USD.
    pub currency: Option<String>,
    /// Committed per UTC month.
    #[schema(value_type = String)]
    pub amount: Decimal,
    #[schema(value_type = String)]
    pub discount_percent: Decimal,
    /// Default 0 (overage at list).
    #[schema(value_type = Option<String>)]
    pub overage_discount_percent: Option<Decimal>,
    /// False ends the commitment from `effective_from`.
    #[serde(default = "yes")]
    pub active: bool,
    /// Defaults to now plus the accepted clock skew. It may be earlier, back to the end of
    /// the last month settled with this provider: no charge depends on it before the
    /// settlement (contracts are often signed after the month they start in).
    pub effective_from: Option<DateTime<Utc>>,
}

fn yes() -> bool {
    true
}

const COLUMNS: &str = "id, name, effective_from, active, provider, model, currency::text, amount,
    discount_percent, overage_discount_percent";

type Row = (
    i64,
    String,
    DateTime<Utc>,
    bool,
    String,
    Option<String>,
    String,
    Decimal,
    Decimal,
    Decimal,
);

fn from_row(r: Row) -> ProviderCommitment {
    ProviderCommitment {
        id: r.0,
        name: r.1,
        effective_from: r.2,
        active: r.3,
        provider: r.4,
        model: r.5,
        currency: r.6,
        amount: r.7.normalize(),
        discount_percent: r.8.normalize(),
        overage_discount_percent: r.9.normalize(),
    }
}

pub async fn load_all(c: &mut sqlx::PgConnection) -> Result<Vec<ProviderCommitment>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!("select {COLUMNS} from provider_commitments"))
        .fetch_all(&mut *c)
        .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// Newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<ProviderCommitment>, CatalogError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "select {COLUMNS} from provider_commitments order by id desc"
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// The advisory lock settlements and backdated commitment versions share, so a version
/// can never slip into a month while it is being settled.
pub const SETTLEMENT_LOCK: &str =
    "select pg_advisory_xact_lock(hashtextextended('tokenledger.provider_settlement', 0))";

/// Record a version of our commitment with a provider.
pub async fn add(
    pool: &PgPool,
    new: NewProviderCommitment,
    now: DateTime<Utc>,
    skew: chrono::Duration,
) -> Result<ProviderCommitment, CatalogError> {
    let mut c = ProviderCommitment {
        id: 0,
        name: new.name,
        effective_from: now + skew,
        active: new.active,
        provider: new.provider,
        model: new.model,
        currency: new.currency.unwrap_or_else(|| "USD".into()),
        amount: new.amount,
        discount_percent: new.discount_percent,
        overage_discount_percent: new.overage_discount_percent.unwrap_or_default(),
    };
    c.check().map_err(CatalogError::InvalidTerms)?;
    let mut tx = pool.begin().await?;
    sqlx::query(SETTLEMENT_LOCK).execute(&mut *tx).await?;
    if let Some(at) = new.effective_from {
        // the end of the last month settled with this provider in this currency
        let settled: Option<String> = sqlx::query_scalar(
            "select max(period) from provider_settlements where provider = $1 and currency = $2",
        )
        .bind(&c.provider)
        .bind(&c.currency)
        .fetch_one(&mut *tx)
        .await?;
        let earliest = settled.and_then(|p| crate::pricing::tiers::period_end(&p));
        if let Some(e) = earliest.filter(|e| at < *e) {
            return Err(CatalogError::EffectiveInPast {
                earliest: e.to_rfc3339(),
            });
        }
        c.effective_from = at;
    }
    let (id,): (i64,) = sqlx::query_as(
        "insert into provider_commitments (name, effective_from, active, provider, model,
           currency, amount, discount_percent, overage_discount_percent)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9) returning id",
    )
    .bind(&c.name)
    .bind(c.effective_from)
    .bind(c.active)
    .bind(&c.provider)
    .bind(&c.model)
    .bind(&c.currency)
    .bind(c.amount)
    .bind(c.discount_percent)
    .bind(c.overage_discount_percent)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    c.id = id;
    Ok(c)
}
