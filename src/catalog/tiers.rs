//! Persistence of tier schedule versions, and tenants' tier positions.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::CatalogError;
use crate::pricing::tiers::{ScopeKind, Tier, TierMetric, TierMode};
use crate::pricing::TierSchedule;

/// A new version of a tenant's tier schedule, as an operator submits it.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTierSchedule {
    /// Versions of one schedule share its name.
    pub name: String,
    pub mode: TierMode,
    pub metric: TierMetric,
    pub scope: ScopeKind,
    /// The provider or model for a scoped schedule.
    #[serde(default)]
    pub scope_value: String,
    pub tiers: Vec<Tier>,
    /// Defaults to now plus the accepted clock skew.
    pub effective_from: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    tenant_id: String,
    name: String,
    effective_from: DateTime<Utc>,
    mode: String,
    metric: String,
    scope: String,
    scope_value: String,
    tiers: sqlx::types::Json<Vec<Tier>>,
}

use super::{enum_from, enum_str};

impl TryFrom<Row> for TierSchedule {
    type Error = sqlx::Error;
    fn try_from(r: Row) -> Result<Self, Self::Error> {
        Ok(TierSchedule {
            id: r.id,
            tenant_id: r.tenant_id,
            name: r.name,
            effective_from: r.effective_from,
            mode: enum_from(&r.mode)?,
            metric: enum_from(&r.metric)?,
            scope: enum_from(&r.scope)?,
            scope_value: r.scope_value,
            tiers: r.tiers.0,
        })
    }
}

const COLUMNS: &str =
    "id, tenant_id, name, effective_from, mode, metric, scope, scope_value, tiers";

/// Every tier schedule version (loaded with the price book).
pub async fn load_all(c: &mut sqlx::PgConnection) -> Result<Vec<TierSchedule>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!("select {COLUMNS} from tier_schedules"))
        .fetch_all(&mut *c)
        .await?;
    rows.into_iter().map(TierSchedule::try_from).collect()
}

/// Record a new version. It takes effect no earlier than now plus the skew, unless the
/// tenant has no events yet (then nothing was charged that it could have applied to).
pub async fn add(
    pool: &PgPool,
    tenant_id: &str,
    new: NewTierSchedule,
    now: DateTime<Utc>,
    skew: chrono::Duration,
) -> Result<TierSchedule, CatalogError> {
    let mut s = TierSchedule {
        id: 0,
        tenant_id: tenant_id.to_string(),
        name: new.name,
        effective_from: now + skew,
        mode: new.mode,
        metric: new.metric,
        scope: new.scope,
        scope_value: new.scope_value,
        tiers: new.tiers,
    };
    s.check().map_err(CatalogError::InvalidTerms)?;
    let mut tx = pool.begin().await?;
    s.effective_from =
        super::tenant_term_effective(&mut tx, tenant_id, new.effective_from, now, skew).await?;
    let (id,): (i64,) = sqlx::query_as(
        "insert into tier_schedules (tenant_id, name, effective_from, mode, metric, scope,
           scope_value, tiers) values ($1, $2, $3, $4, $5, $6, $7, $8) returning id",
    )
    .bind(tenant_id)
    .bind(&s.name)
    .bind(s.effective_from)
    .bind(enum_str(&s.mode))
    .bind(enum_str(&s.metric))
    .bind(enum_str(&s.scope))
    .bind(&s.scope_value)
    .bind(sqlx::types::Json(&s.tiers))
    .fetch_one(&mut *tx)
    .await
    .map_err(
        |e| match e.as_database_error().and_then(|d| d.code()).as_deref() {
            Some("23503") => CatalogError::TenantNotFound(tenant_id.to_string()),
            _ => CatalogError::Db(e),
        },
    )?;
    s.id = id;
    tx.commit().await?;
    Ok(s)
}

/// A tenant's schedule versions, newest first.
pub async fn list(pool: &PgPool, tenant_id: &str) -> Result<Vec<TierSchedule>, CatalogError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "select {COLUMNS} from tier_schedules where tenant_id = $1 order by id desc"
    ))
    .bind(tenant_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(TierSchedule::try_from)
        .collect::<Result<_, _>>()?)
}

/// A tenant's position on one schedule in one period.
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Position {
    pub schedule: String,
    pub period: String,
    #[schema(value_type = String)]
    pub units: Decimal,
    #[schema(value_type = String)]
    pub list: Decimal,
    #[schema(value_type = String)]
    pub charged: Decimal,
}

/// A tenant's tier positions, newest period first.
pub async fn positions(
    pool: &PgPool,
    tenant_id: &str,
    period: Option<&str>,
) -> Result<Vec<Position>, CatalogError> {
    Ok(sqlx::query_as(
        "select schedule, period, units, list, charged from tier_positions
         where tenant_id = $1 and ($2::text is null or period = $2)
         order by period desc, schedule",
    )
    .bind(tenant_id)
    .bind(period)
    .fetch_all(pool)
    .await?)
}
