//! Committed spend (pure): a tenant commits to an amount per billing period (a UTC month)
//! at a discount. Usage draws the commitment down at the discounted rate; usage past it is
//! overage, at the on-demand price or a set percentage of it; the period's close turns the
//! unused remainder into a true-up.

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use super::PricingError;

/// Decimal places of the covered share when a request straddles the commitment's end.
pub const COVERED_DP: u32 = 12;

/// One immutable version of a tenant's commitment; versions share its `name`.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Commitment {
    pub id: i64,
    pub tenant_id: String,
    pub name: String,
    pub effective_from: DateTime<Utc>,
    /// False: this version ends the commitment.
    pub active: bool,
    /// Committed per period, in the tenant's currency.
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// Taken off the (post-tier) price of usage drawn from the commitment: 0 <= d < 100.
    #[schema(value_type = String)]
    pub discount_percent: Decimal,
    /// Overage is charged at this percentage of the on-demand price (100 = on demand).
    #[schema(value_type = String)]
    pub overage_rate_percent: Decimal,
    /// Percentages of `amount` drawn at which an alert fact is recorded (default 50, 80;
    /// reaching 100 is `commitment.exhausted`).
    #[schema(value_type = Vec<String>)]
    pub alert_thresholds: Vec<Decimal>,
}

pub fn default_alert_thresholds() -> Vec<Decimal> {
    vec![Decimal::from(50), Decimal::from(80)]
}

impl Commitment {
    pub fn check(&self) -> Result<(), String> {
        super::check_term_name(&self.name)?;
        if self.amount <= Decimal::ZERO || self.amount > super::MAX_TERM_AMOUNT {
            return Err(format!(
                "amount must be positive and at most {}",
                super::MAX_TERM_AMOUNT
            ));
        }
        if self.discount_percent < Decimal::ZERO || self.discount_percent >= Decimal::ONE_HUNDRED {
            return Err("discount_percent must be at least 0 and below 100".into());
        }
        if self.overage_rate_percent <= Decimal::ZERO
            || self.overage_rate_percent > Decimal::from(1000)
        {
            return Err("overage_rate_percent must be above 0 and at most 1000".into());
        }
        if self.alert_thresholds.len() > 10
            || self
                .alert_thresholds
                .iter()
                .any(|t| *t <= Decimal::ZERO || *t > Decimal::ONE_HUNDRED)
            || self.alert_thresholds.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(
                "alert_thresholds must be at most 10 ascending percentages above 0 and at most 100"
                    .into(),
            );
        }
        Ok(())
    }

    /// The alert thresholds crossed going from `before` to `after` drawn.
    pub fn crossed(&self, before: Decimal, after: Decimal) -> Vec<Decimal> {
        super::budgets::thresholds_crossed(self.amount, &self.alert_thresholds, before, after)
    }
}

/// How a commitment took one request; stored in its breakdown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommitmentApplied {
    pub commitment: String,
    pub version: i64,
    pub period: String,
    /// Commitment money left before this request.
    #[schema(value_type = String)]
    pub remaining_before: Decimal,
    /// The part of the request's (post-tier) price covered by the commitment ...
    #[schema(value_type = String)]
    pub covered: Decimal,
    /// ... and what it drew down (covered at the commitment's discount).
    #[schema(value_type = String)]
    pub drawdown: Decimal,
    /// The rest of the price, past the commitment ...
    #[schema(value_type = String)]
    pub overage_usage: Decimal,
    /// ... and its charge.
    #[schema(value_type = String)]
    pub overage: Decimal,
    /// The period was already closed: nothing is drawn, everything is overage.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub late: bool,
}

/// A commitment's position in one period.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommitmentPosition {
    pub drawn: Decimal,
    pub closed: bool,
}

/// Take a request whose price after tiers is `price` under the commitment. Covered +
/// overage usage always equal `price`; the drawdown never exceeds what remains.
pub fn apply(
    c: &Commitment,
    pos: &CommitmentPosition,
    period: String,
    price: Decimal,
) -> Result<CommitmentApplied, PricingError> {
    let ov = |x: Option<Decimal>| x.ok_or(PricingError::Overflow);
    let keep = (Decimal::ONE_HUNDRED - c.discount_percent) / Decimal::ONE_HUNDRED;
    let remaining = (c.amount - pos.drawn).max(Decimal::ZERO);
    let full = ov(price.checked_mul(keep))?;
    let (covered, drawdown) = if pos.closed {
        (Decimal::ZERO, Decimal::ZERO)
    } else if full <= remaining {
        (price, full)
    } else {
        // the covered share of the price is what `remaining` buys at the discount, to 12
        // decimal places (a division need not terminate; rounding it keeps every amount
        // short and exact, and covered + overage = price exactly)
        let covered = ov(remaining.checked_div(keep))?
            .round_dp_with_strategy(COVERED_DP, RoundingStrategy::MidpointNearestEven);
        (covered.min(price), remaining)
    };
    let overage_usage = price - covered;
    // late usage (the period is closed) is charged on demand, not at the overage rate
    let rate = if pos.closed {
        Decimal::ONE_HUNDRED
    } else {
        c.overage_rate_percent
    };
    let overage = ov(overage_usage.checked_mul(rate))? / Decimal::ONE_HUNDRED;
    Ok(CommitmentApplied {
        commitment: c.name.clone(),
        version: c.id,
        period,
        remaining_before: remaining.normalize(),
        covered: covered.normalize(),
        drawdown: drawdown.normalize(),
        overage_usage: overage_usage.normalize(),
        overage: overage.normalize(),
        late: pos.closed,
    })
}

/// The true-up at the period's close: the unused remainder.
pub fn true_up(c: &Commitment, pos: &CommitmentPosition) -> Decimal {
    (c.amount - pos.drawn).max(Decimal::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn commitment(amount: i64, discount: u32, overage: u32) -> Commitment {
        Commitment {
            alert_thresholds: default_alert_thresholds(),
            id: 1,
            tenant_id: "t".into(),
            name: "c".into(),
            effective_from: DateTime::<Utc>::MIN_UTC,
            active: true,
            amount: Decimal::from(amount),
            discount_percent: Decimal::from(discount),
            overage_rate_percent: Decimal::from(overage),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Covered + overage usage = rated usage; drawdown never passes the commitment;
        /// true-up = max(0, commitment - drawdown).
        #[test]
        fn drawdown_overage_and_true_up_add_up(
            amount in 1i64..1000,
            discount in 0u32..60,
            overage in 50u32..200,
            prices in proptest::collection::vec(1i64..100_000, 1..40),
        ) {
            let c = commitment(amount, discount, overage);
            let mut pos = CommitmentPosition::default();
            let (mut usage, mut covered, mut over_usage) = (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO);
            for p in prices {
                let price = Decimal::new(p, 3);
                let a = apply(&c, &pos, "2026-11".into(), price).unwrap();
                prop_assert_eq!(a.covered + a.overage_usage, price);
                prop_assert!(a.drawdown <= a.remaining_before);
                prop_assert_eq!(a.overage, a.overage_usage * c.overage_rate_percent / Decimal::ONE_HUNDRED);
                usage += price;
                covered += a.covered;
                over_usage += a.overage_usage;
                pos.drawn += a.drawdown;
            }
            prop_assert_eq!(covered + over_usage, usage);
            prop_assert!(pos.drawn <= c.amount);
            let t = true_up(&c, &pos);
            prop_assert_eq!(t, (c.amount - pos.drawn).max(Decimal::ZERO));
            // what the tenant pays for the period's commitment: drawdown + true-up = amount
            prop_assert_eq!(pos.drawn + t, c.amount);
        }
    }

    #[test]
    fn a_request_past_the_commitment_is_split() {
        let c = commitment(10, 20, 100);
        let pos = CommitmentPosition {
            drawn: Decimal::from(8),
            closed: false,
        };
        // price 5: 2 left buys 2.5 of usage at 20% off; 2.5 is overage at on-demand
        let a = apply(&c, &pos, "2026-11".into(), Decimal::from(5)).unwrap();
        assert_eq!(a.drawdown, Decimal::from(2));
        assert_eq!(a.covered, Decimal::new(25, 1));
        assert_eq!(a.overage, Decimal::new(25, 1));
        let closed = CommitmentPosition {
            drawn: Decimal::ZERO,
            closed: true,
        };
        let a = apply(&c, &closed, "2026-11".into(), Decimal::from(5)).unwrap();
        assert!(a.late);
        assert_eq!((a.drawdown, a.overage), (Decimal::ZERO, Decimal::from(5)));
    }
}
