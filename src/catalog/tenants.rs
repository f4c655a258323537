//! Tenants: created by an operator, with a billing currency fixed at creation.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::{valid_currency, CatalogError};
use crate::events::valid_tenant_id;

#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub currency: String,
    pub created_at: DateTime<Utc>,
}

pub async fn create(
    pool: &PgPool,
    id: &str,
    name: &str,
    currency: &str,
) -> Result<Tenant, CatalogError> {
    if !valid_tenant_id(id) {
        return Err(CatalogError::InvalidTenantId);
    }
    if !valid_currency(currency) {
        return Err(CatalogError::InvalidCurrency);
    }
    let mut tx = pool.begin().await?;
    let t: Option<Tenant> = sqlx::query_as(
        "insert into tenants (id, name, currency) values ($1, $2, $3)
         on conflict (id) do nothing
         returning id, name, currency::text as currency, created_at",
    )
    .bind(id)
    .bind(name)
    .bind(currency)
    .fetch_optional(&mut *tx)
    .await?;
    let t = t.ok_or_else(|| CatalogError::TenantExists(id.to_string()))?;
    sqlx::query("insert into tenant_heads (tenant_id) values ($1)")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(t)
}

pub async fn get(pool: &PgPool, id: &str) -> Result<Option<Tenant>, CatalogError> {
    Ok(sqlx::query_as(
        "select id, name, currency::text as currency, created_at from tenants where id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

pub async fn list(pool: &PgPool) -> Result<Vec<Tenant>, CatalogError> {
    Ok(sqlx::query_as(
        "select id, name, currency::text as currency, created_at from tenants order by id limit 10000",
    )
    .fetch_all(pool)
    .await?)
}
