//! Configuration the ledger reads: tenants, API keys, price versions and markup rules.

pub mod budgets;
pub mod commitments;
pub mod keys;
pub mod prices;
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
