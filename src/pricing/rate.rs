//! Rating: tokens x rates, in the order DESIGN.md "Rating" fixes. Exact decimals, no
//! rounding: rounding happens once, on invoice lines.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::budgets::BudgetCount;
use super::commitments::CommitmentApplied;
use super::reservations::{Reservation, ReservationApplied};
use super::tiers::{self, TierApplied, TierInput, TierPosition, TierSchedule};
use super::{MarkupRule, PriceVersion, PricingError, RateSet, MTOK};
use crate::events::UsageData;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenClass {
    /// Prompt tokens neither read from nor written to the cache.
    Input,
    CachedInput,
    CacheWrite,
    /// Completion tokens that are not reasoning.
    Output,
    Reasoning,
}

/// How the customer price is set: an explicit price version, or cost x markup.
#[derive(Clone, Copy, Debug)]
pub enum CustomerPrice<'a> {
    Explicit(&'a PriceVersion),
    /// `None`: no markup rule in force, the price is the cost.
    Markup(Option<&'a MarkupRule>),
}

/// The versions a charge depends on.
#[derive(Clone, Copy, Debug)]
pub struct Terms<'a> {
    pub cost: &'a PriceVersion,
    pub price: CustomerPrice<'a>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Line {
    pub class: TokenClass,
    pub tokens: u64,
    pub cost_rate_per_mtok: Decimal,
    pub price_rate_per_mtok: Decimal,
    /// Before the batch discount.
    pub cost_list: Decimal,
    pub price_list: Decimal,
    /// After the batch discount.
    pub cost: Decimal,
    pub price: Decimal,
}

/// The full breakdown of one request's charge, stored with its transfers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rating {
    pub lines: Vec<Line>,
    pub long_context: bool,
    pub batch: bool,
    pub cost_batch_discount: Decimal,
    pub price_batch_discount: Decimal,
    /// Percent applied to cost rates; `None` when the price is explicit.
    pub markup_percent: Option<Decimal>,
    pub cost_list: Decimal,
    pub price_list: Decimal,
    pub cost: Decimal,
    /// After the batch discount, before tier discounts.
    pub price_before_tiers: Decimal,
    /// What the customer is charged for this request.
    pub price: Decimal,
    pub margin: Decimal,
    pub currency: String,
    pub cost_version_id: i64,
    pub price_version_id: Option<i64>,
    pub markup_rule_id: Option<i64>,
    /// The reservation that covered part of this request (those tokens cost nothing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reservation: Option<ReservationApplied>,
    /// The tier schedule that priced this request, with its slices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<TierApplied>,
    /// The commitment this request drew down (and its overage).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commitment: Option<CommitmentApplied>,
    /// The budgets this charge counted toward.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetCount>,
}

/// Resolved rates for one side: (input, cached, cache write, output, reasoning).
fn resolve(v: &PriceVersion, long: bool) -> [Decimal; 5] {
    let base = &v.base;
    let input = base.input.unwrap_or_default();
    let output = base.output.unwrap_or_default();
    let b = [
        input,
        base.cached_input.unwrap_or(input),
        base.cache_write.unwrap_or(input),
        output,
        base.reasoning.unwrap_or(output),
    ];
    if !long {
        return b;
    }
    let l: &RateSet = &v.long;
    let linput = l.input.unwrap_or(b[0]);
    let loutput = l.output.unwrap_or(b[3]);
    [
        linput,
        l.cached_input.unwrap_or(b[1]),
        l.cache_write.unwrap_or(b[2]),
        loutput,
        l.reasoning.unwrap_or(b[4]),
    ]
}

fn is_long(v: &PriceVersion, input_tokens: u64) -> bool {
    v.long_context_threshold_tokens
        .is_some_and(|t| input_tokens > t)
}

const CLASSES: [TokenClass; 5] = [
    TokenClass::Input,
    TokenClass::CachedInput,
    TokenClass::CacheWrite,
    TokenClass::Output,
    TokenClass::Reasoning,
];

/// Rate one usage event under the given versions.
pub fn rate(u: &UsageData, terms: Terms<'_>) -> Result<Rating, PricingError> {
    let ov = |x: Option<Decimal>| x.ok_or(PricingError::Overflow);
    // 1. Split tokens.
    let tokens = [
        u.uncached_input_tokens(),
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.plain_output_tokens(),
        u.reasoning_tokens,
    ];
    // 2. Pick rates: long context above the threshold (decided on the cost version's
    // threshold, so both sides agree), batch discount for batch requests.
    let long = is_long(terms.cost, u.input_tokens);
    let cost_rates = resolve(terms.cost, long);
    let (price_rates, price_discount, markup_percent, price_version_id, markup_rule_id) =
        match terms.price {
            CustomerPrice::Explicit(p) => {
                (resolve(p, long), p.batch_discount, None, Some(p.id), None)
            }
            CustomerPrice::Markup(rule) => {
                let pct = rule.map(|r| r.percent).unwrap_or_default();
                let factor =
                    ov(Decimal::ONE.checked_add(ov(pct.checked_div(Decimal::ONE_HUNDRED))?))?;
                let mut r = cost_rates;
                for x in r.iter_mut() {
                    *x = ov(x.checked_mul(factor))?;
                }
                (
                    r,
                    terms.cost.batch_discount,
                    Some(pct),
                    None,
                    rule.map(|r| r.id),
                )
            }
        };
    let cost_discount = if u.batch {
        terms.cost.batch_discount
    } else {
        Decimal::ZERO
    };
    let price_discount = if u.batch {
        price_discount
    } else {
        Decimal::ZERO
    };
    assemble(Breakdown {
        v: 1,
        tokens,
        cost_rates,
        price_rates,
        long_context: long,
        batch: u.batch,
        cost_batch_discount: cost_discount,
        price_batch_discount: price_discount,
        markup_percent,
        currency: terms.cost.currency.clone(),
        cost_version_id: terms.cost.id,
        price_version_id,
        markup_rule_id,
        reservation: None,
        tier: None,
        commitment: None,
        budgets: Vec::new(),
    })
}

/// Step 5: cover what fits of the request in the reservation's capacity this minute.
pub fn with_reservation(
    r: Rating,
    res: &Reservation,
    used_before: u64,
    minute: String,
) -> Result<Rating, PricingError> {
    // a request that moves no money is recorded without a breakdown: nothing could
    // rebuild its coverage, so it covers nothing
    if r.price.is_zero() && r.cost.is_zero() {
        return Ok(r);
    }
    let applied = super::reservations::apply(
        res,
        used_before,
        minute,
        std::array::from_fn(|i| r.lines[i].tokens),
        std::array::from_fn(|i| r.lines[i].price_rate_per_mtok),
        Decimal::ONE - r.price_batch_discount,
    );
    if applied.covered_tokens() == 0 {
        return Ok(r);
    }
    let mut b = r.breakdown();
    b.reservation = Some(applied);
    assemble(b)
}

/// Step 7: take a rated request (after tiers) under the tenant's commitment.
pub fn with_commitment(
    r: Rating,
    c: &super::commitments::Commitment,
    pos: &super::commitments::CommitmentPosition,
    period: String,
) -> Result<Rating, PricingError> {
    if r.price.is_zero() {
        return Ok(r);
    }
    let applied = super::commitments::apply(c, pos, period, r.price)?;
    let mut b = r.breakdown();
    b.commitment = Some(applied);
    assemble(b)
}

/// Step 6: price a rated request under the tier schedule in force, from the tenant's
/// position before it. A request that moves no money (zero list price and zero cost)
/// counts toward no tier: nothing would record it.
pub fn with_tier(
    r: Rating,
    s: &TierSchedule,
    before: &TierPosition,
    period: String,
) -> Result<Rating, PricingError> {
    if r.price.is_zero() && r.cost.is_zero() {
        return Ok(r);
    }
    // tokens a reservation covered count toward no tier
    let covered = r.reservation.as_ref().map_or([0; 5], |x| x.covered);
    let input = TierInput {
        tokens: std::array::from_fn(|i| r.lines[i].tokens - covered[i]),
        rates: std::array::from_fn(|i| r.lines[i].price_rate_per_mtok),
        keep: Decimal::ONE - r.price_batch_discount,
        list: r.price,
    };
    let applied = tiers::apply(s, before, period, &input)?;
    let mut b = r.breakdown();
    b.tier = Some(applied);
    assemble(b)
}

/// What a charge is computed from: the token split, the rates and discounts in force,
/// and the versions they came from. This compact form is what the ledger stores with
/// each usage transfer; [`Breakdown::expand`] recomputes every line exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    /// Format version.
    pub v: u8,
    /// input (uncached), cached input, cache write, output (plain), reasoning
    pub tokens: [u64; 5],
    pub cost_rates: [Decimal; 5],
    pub price_rates: [Decimal; 5],
    pub long_context: bool,
    pub batch: bool,
    pub cost_batch_discount: Decimal,
    pub price_batch_discount: Decimal,
    pub markup_percent: Option<Decimal>,
    pub currency: String,
    pub cost_version_id: i64,
    pub price_version_id: Option<i64>,
    pub markup_rule_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<ReservationApplied>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<TierApplied>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commitment: Option<CommitmentApplied>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<BudgetCount>,
}

impl Breakdown {
    /// The full rating, every line recomputed from the stored inputs.
    pub fn expand(self) -> Result<Rating, PricingError> {
        assemble(self)
    }
}

impl Rating {
    pub fn breakdown(&self) -> Breakdown {
        Breakdown {
            v: 1,
            tokens: std::array::from_fn(|i| self.lines[i].tokens),
            cost_rates: std::array::from_fn(|i| self.lines[i].cost_rate_per_mtok),
            price_rates: std::array::from_fn(|i| self.lines[i].price_rate_per_mtok),
            long_context: self.long_context,
            batch: self.batch,
            cost_batch_discount: self.cost_batch_discount,
            price_batch_discount: self.price_batch_discount,
            markup_percent: self.markup_percent,
            currency: self.currency.clone(),
            cost_version_id: self.cost_version_id,
            price_version_id: self.price_version_id,
            markup_rule_id: self.markup_rule_id,
            reservation: self.reservation.clone(),
            tier: self.tier.clone(),
            commitment: self.commitment.clone(),
            budgets: self.budgets.clone(),
        }
    }
}

/// Steps 3 and 4: cost and customer price per token class, then the totals.
fn assemble(b: Breakdown) -> Result<Rating, PricingError> {
    let ov = |x: Option<Decimal>| x.ok_or(PricingError::Overflow);
    let cost_keep = Decimal::ONE - b.cost_batch_discount;
    let price_keep = Decimal::ONE - b.price_batch_discount;
    let mut lines = Vec::with_capacity(5);
    let (mut cost_list, mut price_list, mut cost, mut price) =
        (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO, Decimal::ZERO);
    for (i, class) in CLASSES.iter().enumerate() {
        let n = Decimal::from(b.tokens[i]);
        let cl = ov(ov(n.checked_mul(b.cost_rates[i]))?.checked_div(MTOK))?;
        let pl = ov(ov(n.checked_mul(b.price_rates[i]))?.checked_div(MTOK))?;
        let c = ov(cl.checked_mul(cost_keep))?;
        let p = ov(pl.checked_mul(price_keep))?;
        cost_list = ov(cost_list.checked_add(cl))?;
        price_list = ov(price_list.checked_add(pl))?;
        cost = ov(cost.checked_add(c))?;
        price = ov(price.checked_add(p))?;
        lines.push(Line {
            class: *class,
            tokens: b.tokens[i],
            cost_rate_per_mtok: b.cost_rates[i].normalize(),
            price_rate_per_mtok: b.price_rates[i].normalize(),
            cost_list: cl.normalize(),
            price_list: pl.normalize(),
            cost: c.normalize(),
            price: p.normalize(),
        });
    }
    if let Some(r) = &b.reservation {
        price -= r.covered_price;
    }
    let before_tiers = price;
    if let Some(t) = &b.tier {
        price = t.price;
    }
    if let Some(c) = &b.commitment {
        price = c.drawdown + c.overage;
    }
    Ok(Rating {
        lines,
        long_context: b.long_context,
        batch: b.batch,
        cost_batch_discount: b.cost_batch_discount.normalize(),
        price_batch_discount: b.price_batch_discount.normalize(),
        markup_percent: b.markup_percent.map(|d| d.normalize()),
        cost_list: cost_list.normalize(),
        price_list: price_list.normalize(),
        cost: cost.normalize(),
        price_before_tiers: before_tiers.normalize(),
        price: price.normalize(),
        margin: (price - cost).normalize(),
        currency: b.currency,
        cost_version_id: b.cost_version_id,
        price_version_id: b.price_version_id,
        markup_rule_id: b.markup_rule_id,
        reservation: b.reservation,
        tier: b.tier,
        commitment: b.commitment,
        budgets: b.budgets,
    })
}
