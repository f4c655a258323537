//! Reserved throughput (pure): a tenant reserves `units` of capacity for a model, each a
//! number of tokens per minute, at a price per unit-hour. Within each UTC minute the
//! request's tokens that fit in what is left of the capacity are covered (zero marginal
//! price; they count in usage but not toward tiers or commitments); the rest are charged
//! on demand. Fees accrue at the period's close for the hours each version was in force.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::MTOK;

/// One immutable version of a reservation; versions share its `name`.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Reservation {
    pub id: i64,
    pub tenant_id: String,
    pub name: String,
    pub effective_from: DateTime<Utc>,
    /// False: this version ends the reservation.
    pub active: bool,
    pub provider: String,
    pub model: String,
    pub units: u32,
    pub tokens_per_minute_per_unit: u64,
    #[schema(value_type = String)]
    pub price_per_unit_hour: Decimal,
    /// `reservation.underutilized` when the trailing day's utilisation is below this
    /// percentage at an hourly evaluation tick (None: never).
    #[schema(value_type = Option<String>)]
    pub underutilization_alert_percent: Option<Decimal>,
}

impl Reservation {
    pub fn check(&self) -> Result<(), String> {
        super::check_term_name(&self.name)?;
        if self.provider.is_empty() || self.model.is_empty() {
            return Err("provider and model are required".into());
        }
        if self.units == 0 || self.units > 100_000 {
            return Err("units must be 1 to 100000".into());
        }
        if self.tokens_per_minute_per_unit == 0 || self.tokens_per_minute_per_unit > 100_000_000 {
            return Err("tokens_per_minute_per_unit must be 1 to 100000000".into());
        }
        if self.price_per_unit_hour < Decimal::ZERO
            || self.price_per_unit_hour > super::MAX_TERM_AMOUNT
        {
            return Err(format!(
                "price_per_unit_hour must be between 0 and {}",
                super::MAX_TERM_AMOUNT
            ));
        }
        if self
            .underutilization_alert_percent
            .is_some_and(|p| p <= Decimal::ZERO || p > Decimal::ONE_HUNDRED)
        {
            return Err("underutilization_alert_percent must be above 0 and at most 100".into());
        }
        Ok(())
    }

    /// Tokens per minute the reservation covers.
    pub fn capacity(&self) -> u64 {
        self.units as u64 * self.tokens_per_minute_per_unit
    }
}

/// The UTC minute an instant falls in, `YYYY-MM-DDTHH:MM`.
pub fn minute_of(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M").to_string()
}

/// How a reservation covered one request; stored in its breakdown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReservationApplied {
    pub reservation: String,
    pub version: i64,
    pub minute: String,
    pub capacity: u64,
    /// Covered tokens of this minute before the request.
    pub used_before: u64,
    /// Covered tokens per class (uncached input, cached input, cache write, output,
    /// reasoning), taken in that order.
    pub covered: [u64; 5],
    /// The customer price the covered tokens would have had.
    #[schema(value_type = String)]
    pub covered_price: Decimal,
}

impl ReservationApplied {
    pub fn covered_tokens(&self) -> u64 {
        self.covered.iter().sum()
    }
}

/// Cover a request's tokens (per class, with the customer's per-class rates and the batch
/// keep factor) from what is left of the minute's capacity.
pub fn apply(
    r: &Reservation,
    used_before: u64,
    minute: String,
    tokens: [u64; 5],
    rates: [Decimal; 5],
    keep: Decimal,
) -> ReservationApplied {
    let mut left = r.capacity().saturating_sub(used_before);
    let mut covered = [0u64; 5];
    let mut price = Decimal::ZERO;
    for i in 0..5 {
        let c = tokens[i].min(left);
        covered[i] = c;
        left -= c;
        price += Decimal::from(c) * rates[i] / MTOK * keep;
    }
    ReservationApplied {
        reservation: r.name.clone(),
        version: r.id,
        minute,
        capacity: r.capacity(),
        used_before,
        covered,
        covered_price: price.normalize(),
    }
}

/// The fee of a reservation's versions over `[start, end)`: each active version's units x
/// price per unit-hour x the hours it was in force there (exact; seconds / 3600).
pub fn fee(versions: &[&Reservation], start: DateTime<Utc>, end: DateTime<Utc>) -> Decimal {
    let mut total = Decimal::ZERO;
    for (i, v) in versions.iter().enumerate() {
        let from = v.effective_from.max(start);
        let to = versions
            .get(i + 1)
            .map(|n| n.effective_from)
            .unwrap_or(end)
            .min(end);
        if !v.active || to <= from {
            continue;
        }
        // units <= 1e5, price <= 1e12, seconds in a month < 3e6: no overflow
        let secs = Decimal::from((to - from).num_seconds());
        total += Decimal::from(v.units) * v.price_per_unit_hour * secs / Decimal::from(3600);
    }
    total.normalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn res(units: u32, tpm: u64) -> Reservation {
        Reservation {
            id: 1,
            tenant_id: "t".into(),
            name: "r".into(),
            effective_from: DateTime::<Utc>::MIN_UTC,
            active: true,
            provider: "openai".into(),
            model: "m".into(),
            units,
            tokens_per_minute_per_unit: tpm,
            underutilization_alert_percent: None,
            price_per_unit_hour: Decimal::from(2),
        }
    }

    proptest! {
        /// Coverage never exceeds capacity per minute, whatever the requests.
        #[test]
        fn coverage_never_exceeds_capacity(
            units in 1u32..10,
            tpm in 1u64..5000,
            reqs in proptest::collection::vec(proptest::array::uniform5(0u64..3000), 1..50),
        ) {
            let r = res(units, tpm);
            let mut used = 0u64;
            for t in reqs {
                let a = apply(&r, used, "m".into(), t, [Decimal::ONE; 5], Decimal::ONE);
                for (c, n) in a.covered.iter().zip(t.iter()) {
                    prop_assert!(c <= n);
                }
                used += a.covered_tokens();
                prop_assert!(used <= r.capacity());
            }
        }
    }

    #[test]
    fn fees_accrue_for_the_hours_in_force() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let mut a = res(3, 1000);
        a.effective_from = t("2026-11-10T00:00:00Z");
        let mut b = a.clone();
        b.units = 1;
        b.effective_from = t("2026-11-20T00:00:00Z");
        // 10 days x 24 h x 3 units x 2 + 10 days (to Dec 1) x 24 h x 1 unit x 2... from the 20th
        let f = fee(
            &[&a, &b],
            t("2026-11-01T00:00:00Z"),
            t("2026-12-01T00:00:00Z"),
        );
        assert_eq!(f, Decimal::from(10 * 24 * 3 * 2 + 11 * 24 * 2));
    }
}
