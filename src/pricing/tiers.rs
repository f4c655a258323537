//! Volume tier discounts (pure): a tenant's cumulative usage in a billing period (a UTC
//! calendar month), measured in tokens or in list spend, moves it through tiers, each a
//! discount off the customer list price.
//!
//! - *Graduated*: each slice of usage is priced at its own tier's discount; a request that
//!   straddles a boundary is split and its breakdown shows every slice. With the tokens
//!   metric the request's tokens are taken in class order (uncached input, cached input,
//!   cache write, output, reasoning), so a slice's list price is exact.
//! - *Volume*: the request is priced at the tier reached after it; when that tier is
//!   higher than the one earlier units were charged at, the request carries a credit that
//!   brings everything charged this period to (list so far x the reached tier's rate).
//!
//! "List" is the customer price after the rates picked in step 2 (long-context, batch)
//! and before any tier discount, so a discount can never push usage back below a
//! boundary.

use chrono::{DateTime, Datelike, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{PricingError, MTOK};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TierMode {
    Graduated,
    Volume,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TierMetric {
    /// All tokens of a request (input, cached ones included, plus output).
    Tokens,
    /// List spend in the tenant's currency.
    Spend,
}

/// What usage a schedule counts: everything, one provider, or one model.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ScopeKind {
    All,
    Provider,
    Model,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Upper bound (inclusive) of cumulative units in this tier; absent on the last tier.
    #[schema(value_type = Option<String>)]
    pub up_to: Option<Decimal>,
    /// Taken off the list price, in percent: 0 <= d < 100.
    #[schema(value_type = String)]
    pub discount_percent: Decimal,
}

/// One immutable version of a tenant's tier schedule. Versions of the same schedule share
/// its `name`; the one in force at an event's time applies.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TierSchedule {
    pub id: i64,
    pub tenant_id: String,
    pub name: String,
    pub effective_from: DateTime<Utc>,
    pub mode: TierMode,
    pub metric: TierMetric,
    pub scope: ScopeKind,
    /// The provider or model for scoped schedules, '' for `all`.
    pub scope_value: String,
    pub tiers: Vec<Tier>,
}

impl TierSchedule {
    /// Why these terms cannot be a schedule, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        super::check_term_name(&self.name)?;
        match (self.scope, self.scope_value.is_empty()) {
            (ScopeKind::All, false) => return Err("scope `all` takes no scope_value".into()),
            (ScopeKind::Provider | ScopeKind::Model, true) => {
                return Err("a provider or model scope needs a scope_value".into())
            }
            _ => {}
        }
        if self.tiers.is_empty() || self.tiers.len() > 32 {
            return Err("a schedule has 1 to 32 tiers".into());
        }
        let mut prev_bound = Decimal::ZERO;
        let mut prev_discount = Decimal::ZERO;
        for (i, t) in self.tiers.iter().enumerate() {
            let last = i + 1 == self.tiers.len();
            match (t.up_to, last) {
                (Some(_), true) => return Err("the last tier has no up_to".into()),
                (None, false) => return Err(format!("tier {i} needs an up_to")),
                (Some(b), false) => {
                    if b <= prev_bound {
                        return Err("up_to bounds must be positive and increasing".into());
                    }
                    if self.metric == TierMetric::Tokens && !b.fract().is_zero() {
                        return Err("token bounds must be whole numbers".into());
                    }
                    prev_bound = b;
                }
                (None, true) => {}
            }
            if t.discount_percent < Decimal::ZERO || t.discount_percent >= Decimal::ONE_HUNDRED {
                return Err("discount_percent must be at least 0 and below 100".into());
            }
            if t.discount_percent < prev_discount {
                return Err("discounts may not decrease from one tier to the next".into());
            }
            prev_discount = t.discount_percent;
        }
        Ok(())
    }

    pub fn matches(&self, provider: &str, model: &str) -> bool {
        match self.scope {
            ScopeKind::All => true,
            ScopeKind::Provider => self.scope_value == provider,
            ScopeKind::Model => self.scope_value == model,
        }
    }

    /// The tier holding the `x`-th cumulative unit (units 0 and up to the first bound are
    /// tier 0).
    pub fn tier_of(&self, x: Decimal) -> usize {
        self.tiers
            .iter()
            .position(|t| t.up_to.is_none_or(|b| x <= b))
            .unwrap_or(self.tiers.len() - 1)
    }
}

/// A tenant's running position on one schedule in one period (a projection).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TierPosition {
    /// Units counted so far (tokens or list spend).
    pub units: Decimal,
    /// List spend in scope so far.
    pub list: Decimal,
    /// What was charged in scope so far, net of volume credits.
    pub charged: Decimal,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Slice {
    pub tier: u32,
    #[schema(value_type = String)]
    pub units: Decimal,
    #[schema(value_type = String)]
    pub list: Decimal,
    #[schema(value_type = String)]
    pub discount_percent: Decimal,
    #[schema(value_type = String)]
    pub price: Decimal,
}

/// How a schedule priced one request; stored in its breakdown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TierApplied {
    pub schedule_id: i64,
    pub schedule: String,
    /// The billing period, `YYYY-MM` (UTC).
    pub period: String,
    pub mode: TierMode,
    pub metric: TierMetric,
    #[schema(value_type = String)]
    pub units_before: Decimal,
    #[schema(value_type = String)]
    pub units: Decimal,
    /// This request's list price (before tier discounts).
    #[schema(value_type = String)]
    pub list: Decimal,
    /// This request's price after tier discounts.
    #[schema(value_type = String)]
    pub price: Decimal,
    /// The tier reached after this request.
    pub tier: u32,
    pub slices: Vec<Slice>,
    /// Volume mode: credited for earlier units of the period when a higher tier is
    /// reached (a separate `tier_credit` transfer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub credit: Option<Decimal>,
}

impl TierApplied {
    /// The position after this request.
    pub fn advance(&self, before: &TierPosition) -> TierPosition {
        TierPosition {
            units: before.units + self.units,
            list: before.list + self.list,
            charged: before.charged + self.price - self.credit.unwrap_or_default(),
        }
    }
}

/// The billing period an instant falls in: its UTC calendar month.
pub fn period_of(at: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", at.year(), at.month())
}

/// (year, month) of a period spelled exactly `YYYY-MM` (ASCII digits, month 01-12).
pub fn parse_period(period: &str) -> Option<(i32, u32)> {
    let b = period.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(|c| c.is_ascii_digit());
    if b.len() != 7 || b[4] != b'-' || !digits(0..4) || !digits(5..7) {
        return None;
    }
    let (y, m) = (period[..4].parse().ok()?, period[5..].parse().ok()?);
    (1..=12).contains(&m).then_some((y, m))
}

/// The first instant of a `YYYY-MM` period (UTC).
pub fn period_start(period: &str) -> Option<DateTime<Utc>> {
    let (y, m) = parse_period(period)?;
    chrono::NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// The first instant after a `YYYY-MM` period (UTC).
pub fn period_end(period: &str) -> Option<DateTime<Utc>> {
    let (y, m) = parse_period(period)?;
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    chrono::NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// What one request brings to a schedule: its tokens per class (in rating order) and the
/// customer's per-class rates per million tokens after the batch discount.
pub struct TierInput {
    pub tokens: [u64; 5],
    pub rates: [Decimal; 5],
    pub keep: Decimal,
    /// The request's list price: sum over classes of tokens x rate / 1M x keep.
    pub list: Decimal,
}

impl TierInput {
    /// List price of the request's tokens at positions [a, b) taken in class order.
    fn list_between(&self, a: u64, b: u64) -> Option<Decimal> {
        let mut sum = Decimal::ZERO;
        let mut start = 0u64;
        for (n, rate) in self.tokens.iter().zip(self.rates.iter()) {
            let end = start + n;
            let lo = a.max(start);
            let hi = b.min(end);
            if hi > lo {
                let part = Decimal::from(hi - lo)
                    .checked_mul(*rate)?
                    .checked_div(MTOK)?
                    .checked_mul(self.keep)?;
                sum = sum.checked_add(part)?;
            }
            start = end;
        }
        Some(sum)
    }

    fn total_tokens(&self) -> u64 {
        self.tokens.iter().sum()
    }
}

fn discounted(list: Decimal, pct: Decimal) -> Option<Decimal> {
    list.checked_mul(Decimal::ONE_HUNDRED - pct)?
        .checked_div(Decimal::ONE_HUNDRED)
}

/// Price one request under a schedule, from the position before it.
pub fn apply(
    s: &TierSchedule,
    before: &TierPosition,
    period: String,
    input: &TierInput,
) -> Result<TierApplied, PricingError> {
    let ov = |x: Option<Decimal>| x.ok_or(PricingError::Overflow);
    let units = match s.metric {
        TierMetric::Tokens => Decimal::from(input.total_tokens()),
        TierMetric::Spend => input.list,
    };
    let after = ov(before.units.checked_add(units))?;
    let reached = s.tier_of(after);
    let mut slices = Vec::new();
    let mut credit = None;
    match s.mode {
        TierMode::Graduated => {
            let mut pos = before.units;
            let mut listed = Decimal::ZERO;
            for (i, t) in s.tiers.iter().enumerate() {
                // tier i holds units up to its bound; a full tier is skipped
                if t.up_to.is_some_and(|u| pos >= u) {
                    continue;
                }
                let end = t.up_to.map_or(after, |u| u.min(after));
                let take = end - pos;
                if take <= Decimal::ZERO {
                    break;
                }
                let list = if end == after {
                    // the last slice takes the rest, so slices sum to the list exactly
                    input.list - listed
                } else {
                    match s.metric {
                        TierMetric::Spend => take,
                        TierMetric::Tokens => {
                            let a = u64::try_from(pos - before.units)
                                .map_err(|_| PricingError::Overflow)?;
                            let b = u64::try_from(end - before.units)
                                .map_err(|_| PricingError::Overflow)?;
                            ov(input.list_between(a, b))?
                        }
                    }
                };
                listed += list;
                slices.push(Slice {
                    tier: i as u32,
                    units: take.normalize(),
                    list: list.normalize(),
                    discount_percent: t.discount_percent.normalize(),
                    price: ov(discounted(list, t.discount_percent))?.normalize(),
                });
                pos = end;
                if pos >= after {
                    break;
                }
            }
        }
        TierMode::Volume => {
            let pct = s.tiers[reached].discount_percent;
            slices.push(Slice {
                tier: reached as u32,
                units: units.normalize(),
                list: input.list.normalize(),
                discount_percent: pct.normalize(),
                price: ov(discounted(input.list, pct))?.normalize(),
            });
            // bring what earlier units were charged down to the reached tier's rate
            let due = ov(discounted(before.list, pct))?;
            let c = before.charged - due;
            if c > Decimal::ZERO {
                credit = Some(c.normalize());
            }
        }
    }
    let price = slices.iter().map(|x| x.price).sum::<Decimal>().normalize();
    Ok(TierApplied {
        schedule_id: s.id,
        schedule: s.name.clone(),
        period,
        mode: s.mode,
        metric: s.metric,
        units_before: before.units.normalize(),
        units: units.normalize(),
        list: input.list.normalize(),
        price,
        tier: reached as u32,
        slices,
        credit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schedule(
        mode: TierMode,
        metric: TierMetric,
        bounds: &[u64],
        discounts: &[u32],
    ) -> TierSchedule {
        let tiers = discounts
            .iter()
            .enumerate()
            .map(|(i, d)| Tier {
                up_to: bounds.get(i).map(|b| Decimal::from(*b)),
                discount_percent: Decimal::from(*d),
            })
            .collect();
        TierSchedule {
            id: 1,
            tenant_id: "t".into(),
            name: "s".into(),
            effective_from: DateTime::<Utc>::MIN_UTC,
            mode,
            metric,
            scope: ScopeKind::All,
            scope_value: String::new(),
            tiers,
        }
    }

    /// A request of `n` input tokens at one rate (a single-rate scope).
    fn single(n: u64, rate: Decimal) -> TierInput {
        let mut tokens = [0; 5];
        tokens[0] = n;
        TierInput {
            tokens,
            rates: [rate; 5],
            keep: Decimal::ONE,
            list: Decimal::from(n) * rate / MTOK,
        }
    }

    /// Run requests through a schedule in order; (sum of prices, sum of credits, position).
    fn run(s: &TierSchedule, reqs: &[TierInput]) -> (Decimal, Decimal, TierPosition) {
        let mut pos = TierPosition::default();
        let (mut price, mut credit) = (Decimal::ZERO, Decimal::ZERO);
        for r in reqs {
            let a = apply(s, &pos, "2026-11".into(), r).unwrap();
            assert_eq!(
                a.slices.iter().map(|x| x.list).sum::<Decimal>(),
                r.list,
                "slices sum to the request's list price"
            );
            price += a.price;
            credit += a.credit.unwrap_or_default();
            pos = a.advance(&pos);
        }
        (price, credit, pos)
    }

    /// The piecewise formula: every unit in tier i at (1 - d_i) of its list value.
    fn piecewise(s: &TierSchedule, total_units: Decimal, list_per_unit: Decimal) -> Decimal {
        let mut lower = Decimal::ZERO;
        let mut sum = Decimal::ZERO;
        for t in &s.tiers {
            let upper = t.up_to.unwrap_or(Decimal::MAX);
            let in_tier = (total_units.min(upper) - lower).max(Decimal::ZERO);
            sum += in_tier * list_per_unit * (Decimal::ONE_HUNDRED - t.discount_percent)
                / Decimal::ONE_HUNDRED;
            lower = upper;
            if total_units <= upper {
                break;
            }
        }
        sum
    }

    fn bounds_and_discounts() -> impl Strategy<Value = (Vec<u64>, Vec<u32>)> {
        (1usize..5).prop_flat_map(|n| {
            (
                proptest::collection::btree_set(1u64..20_000_000, n - 1),
                proptest::collection::vec(0u32..60, n),
            )
                .prop_map(|(b, mut d)| {
                    d.sort();
                    (b.into_iter().collect(), d)
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Graduated tokens: any split of the same usage, in any order, totals the
        /// piecewise formula exactly.
        #[test]
        fn graduated_tokens_total_is_piecewise(
            (bounds, discounts) in bounds_and_discounts(),
            reqs in proptest::collection::vec(1u64..3_000_000, 1..40),
            seed in any::<u64>(),
        ) {
            let s = schedule(TierMode::Graduated, TierMetric::Tokens, &bounds, &discounts);
            let rate = Decimal::new(25, 1); // 2.5 per million tokens
            let mut order: Vec<TierInput> = reqs.iter().map(|n| single(*n, rate)).collect();
            let total: u64 = reqs.iter().sum();
            let (p1, _, pos) = run(&s, &order);
            // another order
            let k = (seed as usize) % order.len();
            order.rotate_left(k);
            order.reverse();
            let (p2, _, _) = run(&s, &order);
            let expected = piecewise(&s, Decimal::from(total), rate / MTOK);
            prop_assert_eq!(p1, expected);
            prop_assert_eq!(p2, expected);
            prop_assert_eq!(pos.units, Decimal::from(total));
            // the same usage in one request
            let (p3, _, _) = run(&s, &[single(total, rate)]);
            prop_assert_eq!(p3, expected);
        }

        /// Graduated spend: the same, with units measured in list spend.
        #[test]
        fn graduated_spend_total_is_piecewise(
            (bounds, discounts) in bounds_and_discounts(),
            reqs in proptest::collection::vec(1u64..3_000_000, 1..40),
        ) {
            // bounds in currency units: a request of n tokens at 1 per token lists n
            let s = schedule(TierMode::Graduated, TierMetric::Spend, &bounds, &discounts);
            let rate = MTOK;
            let order: Vec<TierInput> = reqs.iter().map(|n| single(*n, rate)).collect();
            let total: u64 = reqs.iter().sum();
            let (p, _, _) = run(&s, &order);
            prop_assert_eq!(p, piecewise(&s, Decimal::from(total), Decimal::ONE));
        }

        /// Volume: after the credits, the period total is all units at the reached rate.
        #[test]
        fn volume_total_is_all_units_at_the_reached_rate(
            (bounds, discounts) in bounds_and_discounts(),
            reqs in proptest::collection::vec(1u64..3_000_000, 1..40),
            spend in any::<bool>(),
        ) {
            let metric = if spend { TierMetric::Spend } else { TierMetric::Tokens };
            let s = schedule(TierMode::Volume, metric, &bounds, &discounts);
            let rate = Decimal::new(3, 0);
            let order: Vec<TierInput> = reqs.iter().map(|n| single(*n, rate)).collect();
            let (price, credit, pos) = run(&s, &order);
            let list: Decimal = order.iter().map(|r| r.list).sum();
            let reached = s.tier_of(pos.units);
            let d = s.tiers[reached].discount_percent;
            let expected = list * (Decimal::ONE_HUNDRED - d) / Decimal::ONE_HUNDRED;
            prop_assert_eq!(price - credit, expected);
            prop_assert_eq!(pos.charged, expected);
        }
    }

    #[test]
    fn a_request_straddling_a_boundary_is_split_in_class_order() {
        let s = schedule(TierMode::Graduated, TierMetric::Tokens, &[1000], &[0, 10]);
        // 600 input at 1/token-million... use round rates: input 2, output 8 per million
        let input = TierInput {
            tokens: [600, 0, 0, 900, 0],
            rates: [
                Decimal::from(2),
                Decimal::ZERO,
                Decimal::ZERO,
                Decimal::from(8),
                Decimal::ZERO,
            ],
            keep: Decimal::ONE,
            list: Decimal::new(84, 4), // 600*2/1e6 + 900*8/1e6 = 0.0012 + 0.0072
        };
        let before = TierPosition {
            units: Decimal::from(500),
            ..Default::default()
        };
        let a = apply(&s, &before, "2026-11".into(), &input).unwrap();
        assert_eq!(a.slices.len(), 2);
        // first 500 tokens (all input) at tier 0, the rest (100 input + 900 output) at 10% off
        assert_eq!(a.slices[0].units, Decimal::from(500));
        assert_eq!(a.slices[0].list, Decimal::new(10, 4));
        assert_eq!(a.slices[1].list, Decimal::new(74, 4));
        assert_eq!(a.slices[1].price, Decimal::new(666, 5));
        assert_eq!(a.price, Decimal::new(766, 5));
        assert_eq!(a.tier, 1);
    }

    #[test]
    fn periods_are_spelled_exactly() {
        assert_eq!(parse_period("2026-10"), Some((2026, 10)));
        for bad in [
            "2026-+1",
            "2026-1",
            "2026-13",
            "+026-10",
            "2026/10",
            "2026-00",
            "２０２６-10",
        ] {
            assert_eq!(parse_period(bad), None, "{bad}");
        }
        assert_eq!(
            period_end("2026-12"),
            Some("2027-01-01T00:00:00Z".parse().unwrap())
        );
    }

    #[test]
    fn volume_crossing_credits_earlier_units() {
        let s = schedule(TierMode::Volume, TierMetric::Spend, &[100], &[0, 20]);
        let before = TierPosition {
            units: Decimal::from(90),
            list: Decimal::from(90),
            charged: Decimal::from(90),
        };
        let input = single(20, MTOK); // lists 20
        let a = apply(&s, &before, "2026-11".into(), &input).unwrap();
        assert_eq!(a.price, Decimal::from(16));
        assert_eq!(a.credit, Some(Decimal::from(18)));
        assert_eq!(a.advance(&before).charged, Decimal::from(88)); // 110 x 0.8
    }

    #[test]
    fn schedules_are_checked() {
        let ok = schedule(
            TierMode::Graduated,
            TierMetric::Tokens,
            &[10, 20],
            &[0, 5, 10],
        );
        assert!(ok.check().is_ok());
        for (b, d) in [
            (&[20u64, 10][..], &[0u32, 5, 10][..]),
            (&[10, 20], &[10, 5, 20]),
            (&[10, 20], &[0, 5, 100]),
            (&[10], &[0, 5, 10]),
        ] {
            assert!(schedule(TierMode::Volume, TierMetric::Tokens, b, d)
                .check()
                .is_err());
        }
        let mut last_bounded = ok.clone();
        last_bounded.tiers[2].up_to = Some(Decimal::from(30));
        assert!(last_bounded.check().is_err());
        let mut fractional = ok.clone();
        fractional.tiers[0].up_to = Some(Decimal::new(105, 1));
        assert!(fractional.check().is_err());
    }
}
