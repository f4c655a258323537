//! A tenant's rating state before an event (tier positions, budget spend) and the full
//! rating of a usage event from it. Pure; the writer and `verify` share it, so replay
//! computes exactly what the writer did.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::events::UsageData;
use crate::pricing::budgets::{period_key, Budget, BudgetCount};
use crate::pricing::{
    period_of, rate, with_tier, PriceBook, PricingError, Rating, Terms, TierPosition,
};

/// (tenant, schedule or budget name, period)
pub type Key = (String, String, String);

#[derive(Clone, Debug, Default)]
pub struct TenantState {
    pub tiers: HashMap<Key, TierPosition>,
    pub budgets: HashMap<Key, Decimal>,
}

/// A budget an event counted toward: its spend after the event and the thresholds the
/// event crossed.
#[derive(Clone, Debug)]
pub struct BudgetMove {
    pub key: Key,
    pub before: Decimal,
    pub after: Decimal,
    pub crossed: Vec<Decimal>,
    pub budget: Budget,
}

/// How an event moves the state.
#[derive(Clone, Debug, Default)]
pub struct Moves {
    pub tier: Option<(Key, TierPosition)>,
    pub budgets: Vec<BudgetMove>,
}

impl TenantState {
    pub fn apply(&mut self, m: &Moves) {
        if let Some((k, p)) = &m.tier {
            self.tiers.insert(k.clone(), p.clone());
        }
        for b in &m.budgets {
            self.budgets.insert(b.key.clone(), b.after);
        }
    }
}

/// Rate a usage event in full, in DESIGN's order: the base rating under `terms`, the
/// tenant's tier schedule in force (from its position before the event), then the
/// budgets in force that the final price counts toward.
pub fn rate_usage(
    book: &PriceBook,
    u: &UsageData,
    terms: Terms<'_>,
    at: DateTime<Utc>,
    state: &TenantState,
) -> Result<(Rating, Moves), PricingError> {
    let mut r = rate(u, terms)?;
    let mut moves = Moves::default();
    if let Some(s) = book.tier_at(&u.tenant_id, &u.provider, &u.model, at) {
        let key = (u.tenant_id.clone(), s.name.clone(), period_of(at));
        let before = state.tiers.get(&key).cloned().unwrap_or_default();
        r = with_tier(r, s, &before, key.2.clone())?;
        moves.tier = r.tier.as_ref().map(|t| (key, t.advance(&before)));
    }
    if r.price > Decimal::ZERO && book.has_budgets(&u.tenant_id) {
        for b in book.budgets_at(&u.tenant_id, at) {
            if !b.matches(u.api_key_id.as_deref(), &u.tags) {
                continue;
            }
            let period = period_key(b.period, at);
            let key = (u.tenant_id.clone(), b.name.clone(), period.clone());
            let before = state.budgets.get(&key).copied().unwrap_or_default();
            let after = before + r.price;
            r.budgets.push(BudgetCount {
                budget: b.name.clone(),
                version: b.id,
                period,
            });
            moves.budgets.push(BudgetMove {
                crossed: b.crossed(before, after),
                key,
                before,
                after,
                budget: b.clone(),
            });
        }
    }
    Ok((r, moves))
}
