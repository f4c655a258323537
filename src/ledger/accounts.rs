//! Account names and the transfers each kind of event produces (pure).

use rust_decimal::Decimal;

use crate::events::{AdjustmentData, Direction};
use crate::pricing::Rating;

/// What the tenant owes us.
pub const RECEIVABLE: &str = "receivable";
/// What we earned from the tenant at list price.
pub const REVENUE: &str = "revenue";
/// What the tenant's usage cost us.
pub const COGS: &str = "cogs";
/// Contra-revenue: operator credits (debit) and debits (credit).
pub const ADJUSTMENTS: &str = "adjustments";

/// Contra-revenue: volume-tier credits for a period's earlier units.
pub const DISCOUNTS: &str = "discounts";

/// What we owe a provider for this tenant's usage.
pub fn payable(provider: &str) -> String {
    format!("payable:{provider}")
}

#[derive(Clone, Debug, PartialEq)]
pub struct Leg {
    pub kind: &'static str,
    pub debit: String,
    pub credit: String,
    pub amount: Decimal,
}

/// The transfers of a rated usage event: price (receivable -> revenue) and cost
/// (cogs -> provider payable), and a volume-tier credit (discounts -> receivable) when
/// the request reached a higher tier. Zero amounts move nothing.
pub fn usage_legs(provider: &str, r: &Rating) -> Vec<Leg> {
    let mut legs = Vec::with_capacity(2);
    if let Some(c) = &r.commitment {
        // the overage is billed; the drawdown comes out of the commitment account
        if c.overage > Decimal::ZERO {
            legs.push(Leg {
                kind: "usage_price",
                debit: RECEIVABLE.into(),
                credit: REVENUE.into(),
                amount: c.overage,
            });
        }
        if c.drawdown > Decimal::ZERO {
            legs.push(Leg {
                kind: "commitment_drawdown",
                debit: commitment(&c.commitment),
                credit: REVENUE.into(),
                amount: c.drawdown,
            });
        }
    } else if r.price > Decimal::ZERO {
        legs.push(Leg {
            kind: "usage_price",
            debit: RECEIVABLE.into(),
            credit: REVENUE.into(),
            amount: r.price,
        });
    }
    if r.cost > Decimal::ZERO {
        legs.push(Leg {
            kind: "usage_cost",
            debit: COGS.into(),
            credit: payable(provider),
            amount: r.cost,
        });
    }
    if let Some(c) = r.tier.as_ref().and_then(|t| t.credit) {
        legs.push(Leg {
            kind: "tier_credit",
            debit: DISCOUNTS.into(),
            credit: RECEIVABLE.into(),
            amount: c,
        });
    }
    legs
}

/// A tenant's commitment account: debited by drawdowns during the period, credited with
/// the commitment when the period closes and debited with the true-up; zero after a close.
pub fn commitment(name: &str) -> String {
    format!("commitment:{name}")
}

/// The transfers of a period's close for one commitment: bill it (receivable ->
/// commitment account), then recognise the unused remainder (commitment -> revenue).
/// Reservation fees are billed as they accrue (receivable -> revenue).
pub fn close_legs(record: &super::state::CloseRecord) -> Vec<Leg> {
    let mut legs = Vec::new();
    for line in &record.commitments {
        if line.amount > Decimal::ZERO {
            legs.push(Leg {
                kind: "commitment_billed",
                debit: RECEIVABLE.into(),
                credit: commitment(&line.commitment),
                amount: line.amount,
            });
        }
        if line.true_up > Decimal::ZERO {
            legs.push(Leg {
                kind: "commitment_true_up",
                debit: commitment(&line.commitment),
                credit: REVENUE.into(),
                amount: line.true_up,
            });
        }
    }
    for r in record.reservations.iter().filter(|r| r.fee > Decimal::ZERO) {
        legs.push(Leg {
            kind: "reservation_fee",
            debit: RECEIVABLE.into(),
            credit: REVENUE.into(),
            amount: r.fee,
        });
    }
    legs
}

/// The transfer of an adjustment: a credit lowers the receivable, a debit raises it.
pub fn adjustment_leg(a: &AdjustmentData) -> Leg {
    let (debit, credit) = match a.direction {
        Direction::Credit => (ADJUSTMENTS, RECEIVABLE),
        Direction::Debit => (RECEIVABLE, ADJUSTMENTS),
    };
    debug_assert!(a.amount > Decimal::ZERO);
    Leg {
        kind: "adjustment",
        debit: debit.into(),
        credit: credit.into(),
        amount: a.amount,
    }
}
