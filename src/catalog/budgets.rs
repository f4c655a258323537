//! Persistence of budget versions, budget status and alert facts.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::CatalogError;
use crate::pricing::budgets::{
    default_thresholds, period_key, Budget, BudgetAction, BudgetPeriod, BudgetScope,
};

/// A budget version as a tenant or an operator submits it (create or change).
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBudget {
    pub name: String,
    pub scope: BudgetScope,
    #[serde(default)]
    pub scope_value: String,
    pub period: BudgetPeriod,
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// Percentages of the amount; default [50, 80, 100].
    #[schema(value_type = Option<Vec<String>>)]
    pub thresholds: Option<Vec<Decimal>>,
    pub action: BudgetAction,
    pub downgrade_class: Option<String>,
    /// Defaults to now plus the accepted clock skew.
    pub effective_from: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    tenant_id: String,
    name: String,
    effective_from: DateTime<Utc>,
    active: bool,
    scope: String,
    scope_value: String,
    period: String,
    amount: Decimal,
    thresholds: Vec<Decimal>,
    action: String,
    downgrade_class: Option<String>,
}

use super::{enum_from, enum_str};

impl TryFrom<Row> for Budget {
    type Error = sqlx::Error;
    fn try_from(r: Row) -> Result<Self, Self::Error> {
        Ok(Budget {
            id: r.id,
            tenant_id: r.tenant_id,
            name: r.name,
            effective_from: r.effective_from,
            active: r.active,
            scope: enum_from(&r.scope)?,
            scope_value: r.scope_value,
            period: enum_from(&r.period)?,
            amount: r.amount,
            thresholds: r.thresholds,
            action: enum_from(&r.action)?,
            downgrade_class: r.downgrade_class,
        })
    }
}

const COLUMNS: &str = "id, tenant_id, name, effective_from, active, scope, scope_value, period,
    amount, thresholds, action, downgrade_class";

/// Every budget version (loaded with the price book).
pub async fn load_all(c: &mut sqlx::PgConnection) -> Result<Vec<Budget>, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!("select {COLUMNS} from budgets"))
        .fetch_all(&mut *c)
        .await?;
    rows.into_iter().map(Budget::try_from).collect()
}

async fn insert(c: &mut sqlx::PgConnection, b: &Budget) -> Result<i64, CatalogError> {
    let (id,): (i64,) = sqlx::query_as(
        "insert into budgets (tenant_id, name, effective_from, active, scope, scope_value, period,
           amount, thresholds, action, downgrade_class)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) returning id",
    )
    .bind(&b.tenant_id)
    .bind(&b.name)
    .bind(b.effective_from)
    .bind(b.active)
    .bind(enum_str(&b.scope))
    .bind(&b.scope_value)
    .bind(enum_str(&b.period))
    .bind(b.amount)
    .bind(&b.thresholds)
    .bind(enum_str(&b.action))
    .bind(&b.downgrade_class)
    .fetch_one(c)
    .await
    .map_err(
        |e| match e.as_database_error().and_then(|d| d.code()).as_deref() {
            Some("23503") => CatalogError::TenantNotFound(b.tenant_id.clone()),
            _ => CatalogError::Db(e),
        },
    )?;
    Ok(id)
}

/// Record a new version of a budget (creating it, or changing it from a future instant).
pub async fn add(
    pool: &PgPool,
    tenant_id: &str,
    new: NewBudget,
    now: DateTime<Utc>,
    skew: chrono::Duration,
) -> Result<Budget, CatalogError> {
    let mut b = Budget {
        id: 0,
        tenant_id: tenant_id.to_string(),
        name: new.name,
        effective_from: now,
        active: true,
        scope: new.scope,
        scope_value: new.scope_value,
        period: new.period,
        amount: new.amount,
        thresholds: new.thresholds.unwrap_or_else(default_thresholds),
        action: new.action,
        downgrade_class: new.downgrade_class,
    };
    b.check().map_err(CatalogError::InvalidTerms)?;
    let mut tx = pool.begin().await?;
    b.effective_from =
        super::tenant_term_effective(&mut tx, tenant_id, new.effective_from, now, skew).await?;
    b.id = insert(&mut tx, &b).await?;
    tx.commit().await?;
    Ok(b)
}

/// Retire a budget: a new version, inactive, from now plus the skew.
pub async fn retire(
    pool: &PgPool,
    tenant_id: &str,
    name: &str,
    now: DateTime<Utc>,
    skew: chrono::Duration,
) -> Result<Budget, CatalogError> {
    let current = versions(pool, tenant_id, Some(name)).await?;
    let Some(last) = current.into_iter().next() else {
        return Err(CatalogError::NotFound("budget"));
    };
    let mut b = last;
    b.active = false;
    b.effective_from = now + skew;
    b.id = insert(&mut *pool.acquire().await?, &b).await?;
    Ok(b)
}

/// A tenant's budget versions, newest first, optionally of one budget.
pub async fn versions(
    pool: &PgPool,
    tenant_id: &str,
    name: Option<&str>,
) -> Result<Vec<Budget>, CatalogError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "select {COLUMNS} from budgets where tenant_id = $1 and ($2::text is null or name = $2)
         order by effective_from desc, id desc"
    ))
    .bind(tenant_id)
    .bind(name)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(Budget::try_from)
        .collect::<Result<_, _>>()?)
}

/// A budget in force now, with its spend and holds in the current period.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct BudgetStatus {
    #[serde(flatten)]
    pub budget: Budget,
    pub current_period: String,
    #[schema(value_type = String)]
    pub spent: Decimal,
    /// Open pre-authorisation holds counted against it.
    #[schema(value_type = String)]
    pub held: Decimal,
    #[schema(value_type = String)]
    pub remaining: Decimal,
}

/// The tenant's budgets in force at `now` with their current spend and holds. Holds come
/// from the open-hold index (`open_holds`: the unexpired holds the record leaves
/// unsettled, which `verify` checks), not from the record, whose holds of the period grow
/// with every authorisation of the month.
pub async fn status(
    pool: &PgPool,
    tenant_id: &str,
    now: DateTime<Utc>,
) -> Result<Vec<BudgetStatus>, CatalogError> {
    let all = versions(pool, tenant_id, None).await?;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for b in all {
        if b.effective_from > now || !seen.insert(b.name.clone()) || !b.active {
            continue;
        }
        let period = period_key(b.period, now);
        let (spent, held): (Decimal, Decimal) = sqlx::query_as(
            "select coalesce((select spent from budget_spend where tenant_id = $1 and budget = $2
                and period = $3), 0),
               coalesce((select sum(h.amount) from open_holds h
                 where h.tenant_id = $1 and h.budget = $2 and h.period = $3
                   and h.expires_at > $4), 0)",
        )
        .bind(tenant_id)
        .bind(&b.name)
        .bind(&period)
        .bind(now)
        .fetch_one(pool)
        .await?;
        out.push(BudgetStatus {
            remaining: (b.amount - spent - held).max(Decimal::ZERO),
            budget: b,
            current_period: period,
            spent,
            held,
        });
    }
    out.sort_by(|a, b| a.budget.name.cmp(&b.budget.name));
    Ok(out)
}

/// One alert fact.
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AlertFact {
    pub id: i64,
    #[serde(rename = "type")]
    #[sqlx(rename = "type")]
    pub type_: String,
    pub unique_key: String,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
}

/// A tenant's alert facts, newest first, paged by id.
pub async fn alerts(
    pool: &PgPool,
    tenant_id: &str,
    type_: Option<&str>,
    before_id: Option<i64>,
    limit: i64,
) -> Result<Vec<AlertFact>, CatalogError> {
    Ok(sqlx::query_as(
        "select id, type, unique_key, payload, occurred_at, recorded_at from alert_facts
         where tenant_id = $1 and ($2::text is null or type = $2) and ($3::int8 is null or id < $3)
         order by id desc limit $4",
    )
    .bind(tenant_id)
    .bind(type_)
    .bind(before_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
