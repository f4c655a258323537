//! Tenant API keys: random, prefixed, shown once, stored as a sha256 hash, revocable.

use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use super::CatalogError;

pub const KEY_PREFIX: &str = "tl_key_";

#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ApiKey {
    pub id: Uuid,
    pub tenant_id: String,
    pub name: String,
    pub display_prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// Create a key; returns the stored record and the secret, which is never stored.
pub async fn create(
    pool: &PgPool,
    tenant_id: &str,
    name: &str,
) -> Result<(ApiKey, String), CatalogError> {
    let mut raw = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut raw);
    let secret = format!("{KEY_PREFIX}{}", hex::encode(raw));
    let display = secret[..KEY_PREFIX.len() + 6].to_string();
    let rec: Option<ApiKey> = sqlx::query_as(
        "insert into api_keys (id, tenant_id, name, display_prefix, key_hash)
         select $1, id, $3, $4, $5 from tenants where id = $2
         returning id, tenant_id, name, display_prefix, created_at, revoked_at",
    )
    .bind(Uuid::now_v7())
    .bind(tenant_id)
    .bind(name)
    .bind(&display)
    .bind(hash_key(&secret))
    .fetch_optional(pool)
    .await?;
    let rec = rec.ok_or_else(|| CatalogError::TenantNotFound(tenant_id.to_string()))?;
    Ok((rec, secret))
}

/// The tenant of an active key, if the secret is valid.
pub async fn authenticate(
    pool: &PgPool,
    secret: &str,
) -> Result<Option<(Uuid, String)>, CatalogError> {
    if !secret.starts_with(KEY_PREFIX) {
        return Ok(None);
    }
    Ok(sqlx::query_as(
        "select id, tenant_id from api_keys where key_hash = $1 and revoked_at is null",
    )
    .bind(hash_key(secret))
    .fetch_optional(pool)
    .await?)
}

pub async fn revoke(pool: &PgPool, id: Uuid) -> Result<ApiKey, CatalogError> {
    let rec: Option<ApiKey> = sqlx::query_as(
        "update api_keys set revoked_at = coalesce(revoked_at, now()) where id = $1
         returning id, tenant_id, name, display_prefix, created_at, revoked_at",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    rec.ok_or(CatalogError::KeyNotFound)
}

pub async fn list(pool: &PgPool, tenant_id: &str) -> Result<Vec<ApiKey>, CatalogError> {
    Ok(sqlx::query_as(
        "select id, tenant_id, name, display_prefix, created_at, revoked_at from api_keys
         where tenant_id = $1 order by created_at limit 1000",
    )
    .bind(tenant_id)
    .fetch_all(pool)
    .await?)
}
