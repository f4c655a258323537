//! Our own terms with providers (pure): committed spend drawn down by the list cost of our
//! usage, and the per-period settlement of what our provider commitments and reservations
//! are worth. Each usage event's cost is recorded at list (DESIGN "Rating", step 3); the
//! benefit is shared by every tenant, so it is settled per provider and month, in
//! separate entries, from the month's totals.
//!
//! Settlement of one provider, month and currency, from the inputs the ledger gives:
//! 1. Reservations: in each UTC minute, the tokens within a reservation's capacity are
//!    covered; when a minute used more, every token of it is covered pro rata
//!    (share = capacity / tokens), so the covered list cost of that minute is its list
//!    cost × share. What was covered is credited back to us; the unit-hour fees for the
//!    hours each version was in force are owed.
//! 2. Commitments: what reservations did not cover is the list cost commitments absorb.
//!    Model-scoped commitments absorb their model's cost first (by name), then
//!    provider-wide ones; each absorbs up to `amount / (1 − discount)` of list cost, which
//!    draws it down at the discount. The discount on what was absorbed is credited; what
//!    no commitment absorbed is overage, credited the overage discount of the last
//!    commitment covering it; the unused amount is owed (the true-up).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::reservations::Reservation;

/// Decimal places of a pro-rata share (covered cost of an over-full minute) and of a
/// commitment's list capacity.
pub const SHARE_DP: u32 = 12;

/// One immutable version of our commitment with a provider; versions share `name`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProviderCommitment {
    pub id: i64,
    pub name: String,
    pub effective_from: DateTime<Utc>,
    /// False: this version ends the commitment.
    pub active: bool,
    pub provider: String,
    /// One model of the provider; none: every model.
    pub model: Option<String>,
    pub currency: String,
    /// Committed per UTC month.
    #[schema(value_type = String)]
    pub amount: Decimal,
    /// Taken off the list cost of usage drawn from the commitment: 0 <= d < 100.
    #[schema(value_type = String)]
    pub discount_percent: Decimal,
    /// Taken off the list cost of usage past the commitment: 0 <= o < 100.
    #[schema(value_type = String)]
    pub overage_discount_percent: Decimal,
}

impl ProviderCommitment {
    pub fn check(&self) -> Result<(), String> {
        super::check_term_name(&self.name)?;
        if self.provider.is_empty() || self.model.as_deref() == Some("") {
            return Err("provider is required and model, if given, may not be empty".into());
        }
        if !crate::catalog::valid_currency(&self.currency) {
            return Err("currency must be an ISO 4217 code such as USD".into());
        }
        if self.amount <= Decimal::ZERO || self.amount > super::MAX_TERM_AMOUNT {
            return Err(format!(
                "amount must be positive and at most {}",
                super::MAX_TERM_AMOUNT
            ));
        }
        for (field, p) in [
            ("discount_percent", self.discount_percent),
            ("overage_discount_percent", self.overage_discount_percent),
        ] {
            if p < Decimal::ZERO || p >= Decimal::ONE_HUNDRED {
                return Err(format!("{field} must be at least 0 and below 100"));
            }
        }
        Ok(())
    }

    /// The list cost the commitment absorbs in a period: `amount / (1 − discount)`.
    pub fn list_capacity(&self) -> Decimal {
        (self.amount * Decimal::ONE_HUNDRED / (Decimal::ONE_HUNDRED - self.discount_percent))
            .round_dp(SHARE_DP)
    }

    pub fn covers(&self, model: &str) -> bool {
        self.model.as_deref().is_none_or(|m| m == model)
    }
}

/// The commitments in force at `at` among a provider's versions (the latest version of
/// each name, if active) in one currency, in absorption order: model-scoped ones first,
/// then provider-wide, each by name.
pub fn in_force<'a>(
    versions: &'a [ProviderCommitment],
    currency: &str,
    at: DateTime<Utc>,
) -> Vec<&'a ProviderCommitment> {
    let mut latest: BTreeMap<&str, &ProviderCommitment> = BTreeMap::new();
    for v in versions.iter().filter(|v| v.effective_from <= at) {
        let keep = latest
            .get(v.name.as_str())
            .is_none_or(|w| (w.effective_from, w.id) <= (v.effective_from, v.id));
        if keep {
            latest.insert(&v.name, v);
        }
    }
    let mut list: Vec<&ProviderCommitment> = latest
        .into_values()
        .filter(|c| c.active && c.currency == currency)
        .collect();
    list.sort_by(|a, b| (a.model.is_none(), &a.name).cmp(&(b.model.is_none(), &b.name)));
    list
}

/// Per model: list cost no commitment absorbed, and the last commitment covering it.
pub type Leftover<'a> = BTreeMap<String, (Decimal, Option<&'a ProviderCommitment>)>;

/// How much list cost each commitment absorbs from per-model list costs, in order; and
/// per model what is left (overage) with the last commitment that covered it.
pub fn absorb<'a>(
    commitments: &[&'a ProviderCommitment],
    costs: &BTreeMap<String, Decimal>,
) -> (Vec<Decimal>, Leftover<'a>) {
    let mut left: Leftover<'a> = costs.iter().map(|(m, c)| (m.clone(), (*c, None))).collect();
    let mut absorbed = Vec::with_capacity(commitments.len());
    for c in commitments {
        let mut room = c.list_capacity();
        let mut took = Decimal::ZERO;
        for (model, (rest, last)) in left.iter_mut() {
            if !c.covers(model) {
                continue;
            }
            *last = Some(*c);
            let t = (*rest).min(room);
            *rest -= t;
            room -= t;
            took += t;
        }
        absorbed.push(took);
    }
    (absorbed, left)
}

/// One UTC minute of a reserved model's usage in one currency, from the record.
#[derive(Clone, Debug, PartialEq)]
pub struct MinuteUsage {
    pub minute: DateTime<Utc>,
    /// Every token of the model in the minute (all currencies): what fills the capacity.
    pub tokens: u64,
    /// The list cost of the minute's usage in this currency.
    pub cost: Decimal,
    /// This currency's tokens of the minute.
    pub own_tokens: u64,
}

/// Tokens and list cost a model's reservations (each its chain of versions, in effective
/// order) covered over these minutes: a minute's capacity is the sum of the capacities of
/// the versions in force (and active) at its start.
pub fn coverage(reservations: &[Vec<&Reservation>], minutes: &[MinuteUsage]) -> (u64, Decimal) {
    let (mut tokens, mut cost) = (0u64, Decimal::ZERO);
    for m in minutes {
        let cap: u64 = reservations
            .iter()
            .filter_map(|chain| chain.iter().rev().find(|v| v.effective_from <= m.minute))
            .filter(|v| v.active)
            .map(|v| v.capacity())
            .sum();
        if cap == 0 || m.tokens == 0 {
            continue;
        }
        if m.tokens <= cap {
            tokens += m.own_tokens;
            cost += m.cost;
        } else {
            let share = Decimal::from(cap) / Decimal::from(m.tokens);
            // this currency's part of the covered tokens, rounded down
            tokens += (Decimal::from(m.own_tokens) * share)
                .floor()
                .try_into()
                .unwrap_or(0u64);
            cost += (m.cost * share).round_dp(SHARE_DP);
        }
    }
    (tokens, cost.normalize())
}

/// What one model of the provider came to in the month, in one currency.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelInputs {
    pub model: String,
    /// Σ list cost of the month's usage (its `usage_cost` transfers).
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub list_cost: Decimal,
    /// Tokens and list cost covered by our reservation with the provider.
    pub covered_tokens: u64,
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub covered_cost: Decimal,
}

/// What a settlement is computed from: read from the ledger, stored with it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SettlementInputs {
    pub provider: String,
    pub period: String,
    pub currency: String,
    /// By model name.
    pub models: Vec<ModelInputs>,
}

impl SettlementInputs {
    pub fn list_cost(&self) -> Decimal {
        self.models.iter().map(|m| m.list_cost).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommitmentFigure {
    pub commitment: String,
    pub version: i64,
    pub model: Option<String>,
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    /// List cost it absorbed (at most `amount / (1 − discount)`).
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub absorbed_list: Decimal,
    /// `absorbed_list` at the discount: what was drawn from `amount`.
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub drawdown: Decimal,
    /// `absorbed_list − drawdown`: credited.
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub discount: Decimal,
    /// List cost past it (of models it was the last to cover) and its discount, credited.
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub overage_list: Decimal,
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub overage_credit: Decimal,
    /// `amount − drawdown`: owed.
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub true_up: Decimal,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReservationFigure {
    pub reservation: String,
    pub model: String,
    pub versions: Vec<i64>,
    /// Unit-hour fees for the hours its versions were in force in the month: owed.
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub fee: Decimal,
}

/// A settlement's amounts; the totals are what its transfers move (cumulatively over its
/// revisions).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SettlementFigures {
    pub commitments: Vec<CommitmentFigure>,
    pub reservations: Vec<ReservationFigure>,
    /// Σ covered list cost: `provider_reservation_credit`.
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub reservation_credit: Decimal,
    /// Σ fees: `provider_reservation_fee`.
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub reservation_fees: Decimal,
    /// Σ discounts and overage credits: `provider_commitment_discount`.
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub commitment_credit: Decimal,
    /// Σ true-ups: `provider_commitment_true_up`.
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub true_up: Decimal,
    /// What the provider bills us for the month: list − credits + fees + true-ups.
    #[schema(value_type = String)]
    #[serde(with = "rust_decimal::serde::str")]
    pub net_cost: Decimal,
}

/// The transfer kinds a settlement moves, with their direction as (debit, credit) for a
/// positive amount: credits to us move the payable down.
pub const KINDS: [(&str, bool); 4] = [
    ("provider_reservation_credit", false),
    ("provider_reservation_fee", true),
    ("provider_commitment_discount", false),
    ("provider_commitment_true_up", true),
];

impl SettlementFigures {
    /// Amounts per kind of `KINDS`, in order.
    pub fn by_kind(&self) -> [Decimal; 4] {
        [
            self.reservation_credit,
            self.reservation_fees,
            self.commitment_credit,
            self.true_up,
        ]
    }
}

/// Settle a provider's month in one currency: `commitments` are those in force at the
/// month's last instant (see `in_force`); `reservations` each reservation's versions by
/// (name, model), in effective order, in this currency.
pub fn settle(
    inputs: &SettlementInputs,
    commitments: &[&ProviderCommitment],
    reservations: &[(String, String, Vec<&Reservation>)],
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> SettlementFigures {
    let mut f = SettlementFigures::default();
    for (name, model, versions) in reservations {
        let fee = super::reservations::fee(versions, start, end);
        if fee > Decimal::ZERO {
            f.reservations.push(ReservationFigure {
                reservation: name.clone(),
                model: model.clone(),
                versions: versions.iter().map(|v| v.id).collect(),
                fee,
            });
            f.reservation_fees += fee;
        }
    }
    f.reservation_credit = inputs.models.iter().map(|m| m.covered_cost).sum();
    let billable: BTreeMap<String, Decimal> = inputs
        .models
        .iter()
        .map(|m| {
            (
                m.model.clone(),
                (m.list_cost - m.covered_cost).max(Decimal::ZERO),
            )
        })
        .collect();
    let (absorbed, left) = absorb(commitments, &billable);
    for (c, took) in commitments.iter().zip(absorbed) {
        let full = took >= c.list_capacity();
        let discount = took * c.discount_percent / Decimal::ONE_HUNDRED;
        let drawdown = if full { c.amount } else { took - discount };
        let discount = if full { took - c.amount } else { discount };
        let overage_list: Decimal = left
            .values()
            .filter(|(_, last)| last.is_some_and(|l| l.id == c.id))
            .map(|(rest, _)| *rest)
            .sum();
        let overage_credit = overage_list * c.overage_discount_percent / Decimal::ONE_HUNDRED;
        let true_up = (c.amount - drawdown).max(Decimal::ZERO);
        f.commitment_credit += discount.max(Decimal::ZERO) + overage_credit;
        f.true_up += true_up;
        f.commitments.push(CommitmentFigure {
            commitment: c.name.clone(),
            version: c.id,
            model: c.model.clone(),
            amount: c.amount.normalize(),
            absorbed_list: took.normalize(),
            drawdown: drawdown.normalize(),
            discount: discount.max(Decimal::ZERO).normalize(),
            overage_list: overage_list.normalize(),
            overage_credit: overage_credit.normalize(),
            true_up: true_up.normalize(),
        });
    }
    f.net_cost = (inputs.list_cost() - f.reservation_credit - f.commitment_credit
        + f.reservation_fees
        + f.true_up)
        .normalize();
    f.reservation_credit = f.reservation_credit.normalize();
    f.reservation_fees = f.reservation_fees.normalize();
    f.commitment_credit = f.commitment_credit.normalize();
    f.true_up = f.true_up.normalize();
    f
}

/// Our marginal list cost for `cost` more of `model` given the list cost the provider's
/// models ran up this period (`used`, per model): what the commitments in force can still
/// absorb is already paid for (use it or lose it), what they cannot is charged at list less
/// the overage discount of the last commitment covering the model. Also returns the list
/// cost the commitments can still absorb for this model.
pub fn marginal(
    commitments: &[&ProviderCommitment],
    used: &BTreeMap<String, Decimal>,
    model: &str,
    cost: Decimal,
) -> (Decimal, Decimal) {
    let mut costs = used.clone();
    costs.entry(model.to_string()).or_default();
    let (absorbed, left) = absorb(commitments, &costs);
    let headroom: Decimal = commitments
        .iter()
        .zip(&absorbed)
        .filter(|(c, _)| c.covers(model))
        .map(|(c, took)| (c.list_capacity() - took).max(Decimal::ZERO))
        .sum();
    let over = (cost - headroom).max(Decimal::ZERO);
    let last = left
        .get(model)
        .and_then(|(_, l)| *l)
        .or_else(|| commitments.iter().rev().find(|c| c.covers(model)).copied());
    let keep = last.map_or(Decimal::ONE, |c| {
        Decimal::ONE - c.overage_discount_percent / Decimal::ONE_HUNDRED
    });
    ((over * keep).normalize(), headroom.normalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn commitment(
        id: i64,
        name: &str,
        model: Option<&str>,
        amount: i64,
        d: i64,
        o: i64,
    ) -> ProviderCommitment {
        ProviderCommitment {
            id,
            name: name.into(),
            effective_from: t("2026-01-01T00:00:00Z"),
            active: true,
            provider: "openai".into(),
            model: model.map(str::to_string),
            currency: "USD".into(),
            amount: Decimal::from(amount),
            discount_percent: Decimal::from(d),
            overage_discount_percent: Decimal::from(o),
        }
    }

    fn inputs(models: &[(&str, Decimal, Decimal)]) -> SettlementInputs {
        SettlementInputs {
            provider: "openai".into(),
            period: "2026-10".into(),
            currency: "USD".into(),
            models: models
                .iter()
                .map(|(m, l, c)| ModelInputs {
                    model: m.to_string(),
                    list_cost: *l,
                    covered_tokens: 0,
                    covered_cost: *c,
                })
                .collect(),
        }
    }

    fn settle_one(i: &SettlementInputs, c: &[&ProviderCommitment]) -> SettlementFigures {
        settle(
            i,
            c,
            &[],
            t("2026-10-01T00:00:00Z"),
            t("2026-11-01T00:00:00Z"),
        )
    }

    #[test]
    fn a_shortfall_is_trued_up_and_the_provider_bills_the_amount() {
        // 100 committed at 20% off absorbs 125 of list; 50 of list used draws 40
        let c = commitment(1, "c", None, 100, 20, 0);
        let f = settle_one(&inputs(&[("a", Decimal::from(50), Decimal::ZERO)]), &[&c]);
        let x = &f.commitments[0];
        assert_eq!(
            (x.absorbed_list, x.drawdown, x.discount),
            (50.into(), 40.into(), 10.into())
        );
        assert_eq!(x.true_up, Decimal::from(60));
        assert_eq!(f.net_cost, Decimal::from(100));
    }

    #[test]
    fn overage_is_list_less_its_discount() {
        // 100 at 20% absorbs 125 of list; 200 used: 75 overage at 10% off
        let c = commitment(1, "c", None, 100, 20, 10);
        let f = settle_one(&inputs(&[("a", Decimal::from(200), Decimal::ZERO)]), &[&c]);
        let x = &f.commitments[0];
        assert_eq!(
            (x.drawdown, x.discount, x.true_up),
            (100.into(), 25.into(), 0.into())
        );
        assert_eq!(
            (x.overage_list, x.overage_credit),
            (75.into(), "7.5".parse().unwrap())
        );
        assert_eq!(f.net_cost, "167.5".parse::<Decimal>().unwrap());
    }

    #[test]
    fn model_scoped_commitments_absorb_first_and_covered_cost_is_not_absorbed() {
        let wide = commitment(1, "all", None, 30, 0, 0);
        let narrow = commitment(2, "zz-a-only", Some("a"), 10, 0, 0);
        let versions = [wide.clone(), narrow.clone()];
        let order = in_force(&versions, "USD", t("2026-10-31T00:00:00Z"));
        assert_eq!(order[0].name, "zz-a-only");
        // a: 25 list, 5 covered by a reservation -> 20 billable; b: 15
        let i = inputs(&[
            ("a", Decimal::from(25), Decimal::from(5)),
            ("b", Decimal::from(15), Decimal::ZERO),
        ]);
        let f = settle_one(&i, &order);
        assert_eq!(f.commitments[0].absorbed_list, Decimal::from(10));
        assert_eq!(f.commitments[1].absorbed_list, Decimal::from(25));
        assert_eq!(f.commitments[1].true_up, Decimal::from(5));
        assert_eq!(f.reservation_credit, Decimal::from(5));
        // 40 list - 5 covered + 5 true-up
        assert_eq!(f.net_cost, Decimal::from(40));
    }

    #[test]
    fn an_over_full_minute_is_covered_pro_rata() {
        let r = Reservation {
            id: 1,
            tenant_id: String::new(),
            name: "r".into(),
            effective_from: t("2026-10-01T00:00:00Z"),
            active: true,
            provider: "openai".into(),
            model: "a".into(),
            units: 1,
            tokens_per_minute_per_unit: 1000,
            price_per_unit_hour: Decimal::ONE,
            underutilization_alert_percent: None,
        };
        let m = |min: &str, tokens, cost: i64| MinuteUsage {
            minute: t(min),
            tokens,
            cost: Decimal::from(cost),
            own_tokens: tokens,
        };
        let mut off = r.clone();
        off.name = "other".into();
        off.active = false;
        // a second reservation, ended: adds nothing
        let (tok, cost) = coverage(
            &[vec![&r], vec![&off]],
            &[
                m("2026-09-30T23:59:00Z", 500, 5),
                m("2026-10-01T00:00:00Z", 500, 5),
                m("2026-10-01T00:01:00Z", 4000, 40),
            ],
        );
        assert_eq!((tok, cost), (1500, Decimal::from(15)));
    }

    #[test]
    fn marginal_cost_is_zero_within_the_commitment_and_list_less_overage_past_it() {
        let c = commitment(1, "c", None, 80, 20, 50);
        let used = BTreeMap::from([("a".to_string(), Decimal::from(90))]);
        // capacity 100 of list, 10 left
        let (m, head) = marginal(&[&c], &used, "a", Decimal::from(4));
        assert_eq!((m, head), (Decimal::ZERO, Decimal::from(10)));
        let (m, _) = marginal(&[&c], &used, "b", Decimal::from(14));
        assert_eq!(m, Decimal::from(2));
        let (m, head) = marginal(&[], &used, "a", Decimal::from(4));
        assert_eq!((m, head), (Decimal::from(4), Decimal::ZERO));
    }

    proptest! {
        /// Drawdown + true-up = amount; absorbed + overage + covered = list; the net cost
        /// is what the terms say the provider bills.
        #[test]
        fn settlement_conserves_the_list_cost(
            costs in proptest::collection::vec((0u32..2_000_000, 0u32..100), 1..4),
            amount in 1i64..5_000,
            d in 0i64..99,
            o in 0i64..99,
        ) {
            let models: Vec<(String, Decimal, Decimal)> = costs
                .iter()
                .enumerate()
                .map(|(i, (l, p))| {
                    let list = Decimal::new(*l as i64, 3);
                    (format!("m{i}"), list, (list * Decimal::from(*p) / Decimal::ONE_HUNDRED).round_dp(3))
                })
                .collect();
            let refs: Vec<(&str, Decimal, Decimal)> =
                models.iter().map(|(m, l, c)| (m.as_str(), *l, *c)).collect();
            let i = inputs(&refs);
            let c = commitment(1, "c", None, amount, d, o);
            let f = settle_one(&i, &[&c]);
            let x = &f.commitments[0];
            prop_assert_eq!(x.drawdown + x.true_up, c.amount);
            prop_assert_eq!(x.absorbed_list + x.overage_list + f.reservation_credit, i.list_cost());
            prop_assert!(x.absorbed_list <= c.list_capacity());
            let expected = if x.overage_list > Decimal::ZERO {
                c.amount + x.overage_list * (Decimal::ONE_HUNDRED - c.overage_discount_percent) / Decimal::ONE_HUNDRED
            } else {
                c.amount
            };
            prop_assert_eq!(f.net_cost, expected.normalize());
        }
    }
}
