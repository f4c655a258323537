//! Configuration the ledger reads: tenants, API keys, price versions and markup rules.

pub mod budgets;
pub mod commitments;
pub mod keys;
pub mod prices;
pub mod provider_commitments;
pub mod reservations;
pub mod routing;
pub mod tenants;
pub mod tiers;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("tenant {0:?} already exists")]
    TenantExists(String),
    #[error("tenant id must match [a-z0-9][a-z0-9_-]{{0,63}}")]
    InvalidTenantId,
    #[error("currency must be an ISO 4217 code such as USD")]
    InvalidCurrency,
    #[error("tenant {0:?} not found")]
    TenantNotFound(String),
    #[error("API key not found")]
    KeyNotFound,
    #[error("{0}")]
    InvalidPrice(String),
    #[error("{0}")]
    InvalidTerms(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("effective_from must be no earlier than {earliest} (now plus the accepted clock skew): a change never takes effect in the past")]
    EffectiveInPast { earliest: String },
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

pub fn valid_currency(c: &str) -> bool {
    c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())
}

/// When a new version of a tenant's commercial term takes effect: the requested instant,
/// or now plus the accepted skew by default. It may be earlier than that only while the
/// tenant has no events (nothing was charged that it could have applied to). Takes the
/// tenant's ledger lock (its `tenant_heads` row) in the caller's transaction, so no batch
/// can charge the tenant between this check and the insert that follows it.
pub async fn tenant_term_effective(
    tx: &mut sqlx::PgConnection,
    tenant_id: &str,
    requested: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
    skew: chrono::Duration,
) -> Result<chrono::DateTime<chrono::Utc>, CatalogError> {
    let earliest = now + skew;
    let known: Option<i64> =
        sqlx::query_scalar("select last_seq from tenant_heads where tenant_id = $1 for update")
            .bind(tenant_id)
            .fetch_optional(&mut *tx)
            .await?;
    if known.is_none() {
        return Err(CatalogError::TenantNotFound(tenant_id.to_string()));
    }
    let charged: bool =
        sqlx::query_scalar("select exists (select 1 from events where tenant_id = $1)")
            .bind(tenant_id)
            .fetch_one(&mut *tx)
            .await?;
    match requested {
        Some(t) if charged && t < earliest => Err(CatalogError::EffectiveInPast {
            earliest: earliest.to_rfc3339(),
        }),
        Some(t) => Ok(t),
        None => Ok(earliest),
    }
}

/// When a new version of a term shared by all tenants (routing classes, our provider
/// reservations) takes effect: the requested instant or now plus the skew, never earlier.
pub fn global_term_effective(
    requested: Option<chrono::DateTime<chrono::Utc>>,
    now: chrono::DateTime<chrono::Utc>,
    skew: chrono::Duration,
) -> Result<chrono::DateTime<chrono::Utc>, CatalogError> {
    let earliest = now + skew;
    match requested {
        Some(t) if t < earliest => Err(CatalogError::EffectiveInPast {
            earliest: earliest.to_rfc3339(),
        }),
        Some(t) => Ok(t),
        None => Ok(earliest),
    }
}

/// A unit enum stored as its serde name (`snake_case` text).
pub(crate) fn enum_from<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, sqlx::Error> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

pub(crate) fn enum_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => unreachable!("unit enums serialise as strings"),
    }
}

/// Maps a foreign-key violation on the tenant to "tenant not found".
pub(crate) fn tenant_fk(tenant_id: &str) -> impl FnOnce(sqlx::Error) -> CatalogError + '_ {
    move |e| match e.as_database_error().and_then(|d| d.code()).as_deref() {
        Some("23503") => CatalogError::TenantNotFound(tenant_id.to_string()),
        _ => CatalogError::Db(e),
    }
}
