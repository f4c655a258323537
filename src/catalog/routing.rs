//! Persistence of routing class versions.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::CatalogError;
use crate::pricing::routing::{Candidate, RoutingClass};

/// A routing class version as an operator submits it.
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRoutingClass {
    pub name: String,
    /// Absent: global (every tenant without its own version of the name).
    pub tenant_id: Option<String>,
    #[schema(value_type = String)]
    pub quality_floor: Decimal,
    pub candidates: Vec<Candidate>,
    /// False retires the class.
    #[serde(default = "yes")]
    pub active: bool,
    /// Defaults to now plus the accepted clock skew; never earlier.
    pub effective_from: Option<DateTime<Utc>>,
}

fn yes() -> bool {
    true
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    tenant_id: Option<String>,
    name: String,
    effective_from: DateTime<Utc>,
    active: bool,
    quality_floor: Decimal,
    candidates: sqlx::types::Json<Vec<Candidate>>,
}

impl From<Row> for RoutingClass {
    fn from(r: Row) -> Self {
        RoutingClass {
            id: r.id,
            tenant_id: r.tenant_id,
            name: r.name,
            effective_from: r.effective_from,
            active: r.active,
            quality_floor: r.quality_floor,
            candidates: r.candidates.0,
        }
    }
}

const COLUMNS: &str = "id, tenant_id, name, effective_from, active, quality_floor, candidates";

pub async fn load_all(c: &mut sqlx::PgConnection) -> Result<Vec<RoutingClass>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!("select {COLUMNS} from routing_classes"))
        .fetch_all(&mut *c)
        .await?;
    Ok(rows.into_iter().map(RoutingClass::from).collect())
}

/// Record a new version. Routing decisions are not charges, but a class is a commercial
/// term like any other: it takes effect no earlier than now plus the skew.
pub async fn add(
    pool: &PgPool,
    new: NewRoutingClass,
    now: DateTime<Utc>,
    skew: chrono::Duration,
) -> Result<RoutingClass, CatalogError> {
    let at = super::global_term_effective(new.effective_from, now, skew)?;
    let mut c = RoutingClass {
        id: 0,
        tenant_id: new.tenant_id,
        name: new.name,
        effective_from: at,
        active: new.active,
        quality_floor: new.quality_floor,
        candidates: new.candidates,
    };
    c.check().map_err(CatalogError::InvalidTerms)?;
    let (id,): (i64,) = sqlx::query_as(
        "insert into routing_classes (tenant_id, name, effective_from, active, quality_floor, candidates)
         values ($1, $2, $3, $4, $5, $6) returning id",
    )
    .bind(&c.tenant_id)
    .bind(&c.name)
    .bind(c.effective_from)
    .bind(c.active)
    .bind(c.quality_floor)
    .bind(sqlx::types::Json(&c.candidates))
    .fetch_one(pool)
    .await
    .map_err(|e| match e.as_database_error().and_then(|d| d.code()).as_deref() {
        Some("23503") => CatalogError::TenantNotFound(c.tenant_id.clone().unwrap_or_default()),
        _ => CatalogError::Db(e),
    })?;
    c.id = id;
    Ok(c)
}

/// Every version, newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<RoutingClass>, CatalogError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "select {COLUMNS} from routing_classes order by id desc limit 5000"
    ))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(RoutingClass::from).collect())
}
