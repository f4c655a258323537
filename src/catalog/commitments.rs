//! Persistence of commitment versions and positions.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::CatalogError;
use crate::pricing::commitments::Commitment;

/// A commitment version as an operator submits it.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCommitment {
    pub name: String,
    #[schema(value_type = String)]
    pub amount: Decimal,
    #[schema(value_type = String)]
    pub discount_percent: Decimal,
    /// Percentage of the on-demand price charged for overage (default 100).
    #[schema(value_type = Option<String>)]
    pub overage_rate_percent: Option<Decimal>,
    /// Percentages of `amount` drawn that raise `commitment.threshold_crossed` alerts
    /// (default 50, 80).
    #[schema(value_type = Option<Vec<String>>)]
    pub alert_thresholds: Option<Vec<Decimal>>,
    /// False ends the commitment from `effective_from`.
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
    Decimal,
    Decimal,
    Decimal,
    Vec<Decimal>,
);

fn from_row(r: Row) -> Commitment {
    Commitment {
        id: r.0,
        tenant_id: r.1,
        name: r.2,
        effective_from: r.3,
        active: r.4,
        amount: r.5,
        discount_percent: r.6,
        overage_rate_percent: r.7,
        alert_thresholds: r.8,
    }
}

const COLUMNS: &str =
    "id, tenant_id, name, effective_from, active, amount, discount_percent, overage_rate_percent,
  alert_thresholds";

pub async fn load_all(c: &mut sqlx::PgConnection) -> Result<Vec<Commitment>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!("select {COLUMNS} from commitments"))
        .fetch_all(&mut *c)
        .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

/// Record a new version: effective no earlier than now plus the skew, unless the tenant
/// has no events yet.
pub async fn add(
    pool: &PgPool,
    tenant_id: &str,
    new: NewCommitment,
    now: DateTime<Utc>,
    skew: chrono::Duration,
) -> Result<Commitment, CatalogError> {
    let mut c = Commitment {
        id: 0,
        tenant_id: tenant_id.to_string(),
        name: new.name,
        effective_from: now + skew,
        active: new.active,
        amount: new.amount,
        discount_percent: new.discount_percent,
        overage_rate_percent: new.overage_rate_percent.unwrap_or(Decimal::ONE_HUNDRED),
        alert_thresholds: new
            .alert_thresholds
            .unwrap_or_else(crate::pricing::commitments::default_alert_thresholds),
    };
    c.check().map_err(CatalogError::InvalidTerms)?;
    let mut tx = pool.begin().await?;
    c.effective_from =
        super::tenant_term_effective(&mut tx, tenant_id, new.effective_from, now, skew).await?;
    let (id,): (i64,) = sqlx::query_as(
        "insert into commitments (tenant_id, name, effective_from, active, amount, discount_percent,
           overage_rate_percent, alert_thresholds) values ($1, $2, $3, $4, $5, $6, $7, $8)
         returning id",
    )
    .bind(tenant_id)
    .bind(&c.name)
    .bind(c.effective_from)
    .bind(c.active)
    .bind(c.amount)
    .bind(c.discount_percent)
    .bind(c.overage_rate_percent)
    .bind(&c.alert_thresholds)
    .fetch_one(&mut *tx)
    .await
    .map_err(super::tenant_fk(tenant_id))?;
    c.id = id;
    tx.commit().await?;
    Ok(c)
}

pub async fn list(pool: &PgPool, tenant_id: &str) -> Result<Vec<Commitment>, CatalogError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "select {COLUMNS} from commitments where tenant_id = $1 order by id desc"
    ))
    .bind(tenant_id)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Position {
    pub commitment: String,
    pub period: String,
    #[schema(value_type = String)]
    pub drawn: Decimal,
    pub closed: bool,
}

pub async fn positions(pool: &PgPool, tenant_id: &str) -> Result<Vec<Position>, CatalogError> {
    Ok(sqlx::query_as(
        "select commitment, period, drawn, closed from commitment_positions
         where tenant_id = $1 order by period desc, commitment",
    )
    .bind(tenant_id)
    .fetch_all(pool)
    .await?)
}
