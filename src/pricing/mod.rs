//! Pricing: the price book and rating. Pure functions: the caller looks up the versions
//! in force and passes them in; nothing here touches a database or a clock.

mod book;
pub mod budgets;
pub mod commitments;
pub mod diff;
pub mod import;
pub mod provider;
mod rate;
pub mod reservations;
pub mod routing;
pub mod tiers;

pub use book::{MarkupRule, PriceBook, PriceVersion, RateSet, Side};
pub use rate::{
    rate, with_commitment, with_reservation, with_tier, Breakdown, CustomerPrice, Line, Rating,
    Terms, TokenClass,
};
pub use tiers::{period_of, TierApplied, TierPosition, TierSchedule};

use rust_decimal::Decimal;

/// Tokens per "million tokens" unit in which rates are quoted.
pub const MTOK: Decimal = Decimal::from_parts(1_000_000, 0, 0, false, 0);

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PricingError {
    #[error("no {side} price for provider {provider:?} model {model:?} in {currency} at {at}")]
    Unpriced {
        side: &'static str,
        provider: String,
        model: String,
        currency: String,
        at: String,
    },
    #[error("arithmetic overflow while rating")]
    Overflow,
}

#[cfg(test)]
mod tests;

/// The largest amount a term may state (budget limits, commitments, unit prices): far
/// above any real contract, far below where decimal arithmetic could overflow.
pub const MAX_TERM_AMOUNT: Decimal = Decimal::from_parts(3_567_587_328, 232, 0, false, 0); // 1e12

/// Names of versioned terms (tier schedules, budgets, commitments, reservations): 1-64
/// characters of `[A-Za-z0-9._-]`.
pub fn check_term_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("name must be 1-64 characters of [A-Za-z0-9._-]".into())
    }
}
