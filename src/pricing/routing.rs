//! Routing classes and quotes (pure): each candidate's effective marginal price for a
//! token mix, for one tenant at one instant, ranked.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::commitments::CommitmentPosition;
use super::tiers::TierApplied;
use super::{
    period_of, rate, with_commitment, with_reservation, with_tier, CustomerPrice, PriceBook, Side,
    Terms, TierPosition, MTOK,
};
use crate::events::{Status, UsageData};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    pub provider: String,
    pub model: String,
    /// 0 to 1.
    #[schema(value_type = String)]
    pub quality: Decimal,
}

/// One immutable version of a routing class (global when `tenant_id` is none).
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RoutingClass {
    pub id: i64,
    pub tenant_id: Option<String>,
    pub name: String,
    pub effective_from: DateTime<Utc>,
    pub active: bool,
    #[schema(value_type = String)]
    pub quality_floor: Decimal,
    pub candidates: Vec<Candidate>,
}

impl RoutingClass {
    pub fn check(&self) -> Result<(), String> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b":._-".contains(&b));
        if !ok {
            return Err("name must match [a-z0-9][a-z0-9:._-]{0,63}".into());
        }
        let unit = |d: Decimal| d >= Decimal::ZERO && d <= Decimal::ONE;
        if !unit(self.quality_floor) {
            return Err("quality_floor must be between 0 and 1".into());
        }
        if self.candidates.is_empty() || self.candidates.len() > 50 {
            return Err("a class has 1 to 50 candidates".into());
        }
        for c in &self.candidates {
            if c.provider.is_empty() || c.model.is_empty() || !unit(c.quality) {
                return Err(
                    "each candidate needs provider, model and a quality between 0 and 1".into(),
                );
            }
        }
        Ok(())
    }
}

/// A token mix to price.
#[derive(Clone, Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenMix {
    pub input_tokens: u64,
    #[serde(default)]
    pub cached_input_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
    #[serde(default)]
    pub batch: bool,
}

impl TokenMix {
    pub fn check(&self) -> Result<(), String> {
        const CAP: u64 = 100_000_000;
        if [self.input_tokens, self.output_tokens]
            .iter()
            .any(|n| *n > CAP)
        {
            return Err(format!("token counts are capped at {CAP}"));
        }
        if self
            .cached_input_tokens
            .checked_add(self.cache_write_tokens)
            .is_none_or(|n| n > self.input_tokens)
        {
            return Err("cached_input_tokens + cache_write_tokens exceed input_tokens".into());
        }
        if self.reasoning_tokens > self.output_tokens {
            return Err("reasoning_tokens exceed output_tokens".into());
        }
        Ok(())
    }

    /// The mix routing decisions are ranked on: one million input and 250,000 output tokens.
    pub fn reference() -> TokenMix {
        TokenMix {
            input_tokens: 1_000_000,
            output_tokens: 250_000,
            ..Default::default()
        }
    }

    fn usage(&self, tenant: &str, provider: &str, model: &str) -> UsageData {
        UsageData {
            tenant_id: tenant.to_string(),
            api_key_id: None,
            request_id: String::new(),
            provider_request_id: None,
            authorization_id: None,
            model: model.to_string(),
            provider: provider.to_string(),
            region: None,
            input_tokens: self.input_tokens,
            cached_input_tokens: self.cached_input_tokens,
            cache_write_tokens: self.cache_write_tokens,
            output_tokens: self.output_tokens,
            reasoning_tokens: self.reasoning_tokens,
            batch: self.batch,
            status: Status::Ok,
            latency_ms: 0,
            fallback_from: Vec::new(),
            estimated: true,
            estimate_method: None,
            tags: BTreeMap::new(),
        }
    }
}

/// One candidate's price for the mix.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct QuoteLine {
    pub rank: u32,
    pub provider: String,
    pub model: String,
    #[schema(value_type = Option<String>)]
    pub quality: Option<Decimal>,
    /// Whether it can be priced (false: `reason` says why); unpriced candidates rank last.
    pub available: bool,
    pub reason: Option<String>,
    /// Customer price at list rates, before batch and tier discounts.
    #[schema(value_type = Option<String>)]
    pub list_price: Option<Decimal>,
    /// Taken off by the batch discount.
    #[schema(value_type = Option<String>)]
    pub batch_savings: Option<Decimal>,
    /// Taken off because cached input is priced below fresh input.
    #[schema(value_type = Option<String>)]
    pub cache_savings: Option<Decimal>,
    /// After batch, before tiers.
    #[schema(value_type = Option<String>)]
    pub price_before_tiers: Option<Decimal>,
    /// The tenant's tier position applied to this mix as its next request.
    pub tier: Option<TierApplied>,
    /// What this mix would be charged now: the number candidates are ranked by.
    #[schema(value_type = Option<String>)]
    pub effective_price: Option<Decimal>,
    /// Our provider cost at list rates (provider commitments are settled per period).
    #[schema(value_type = Option<String>)]
    pub cost: Option<Decimal>,
    /// What is left of the tenant's commitment this period (its drawdown is at the
    /// commitment's discount).
    #[schema(value_type = Option<String>)]
    pub commitment_remaining: Option<Decimal>,
    /// Tokens the tenant's reservation for this model can still cover this minute.
    pub reserved_headroom_tokens: Option<u64>,
    /// Tokens our own reservation with the provider can still take this minute.
    pub provider_headroom_tokens: Option<u64>,
    /// List cost our commitments with the provider can still absorb this period (what
    /// they absorb is already paid for).
    #[schema(value_type = Option<String>)]
    pub provider_commitment_headroom: Option<Decimal>,
    /// Our cost for the mix at the margin: list cost less what our provider reservation's
    /// headroom covers, less what our provider commitments can still absorb, the rest at
    /// their overage discount (ties in effective price are broken by it).
    #[schema(value_type = Option<String>)]
    pub marginal_cost: Option<Decimal>,
}

/// What a quote needs of a tenant: its currency and tier positions (current period).
pub struct QuoteContext<'a> {
    pub book: &'a PriceBook,
    pub tenant_id: &'a str,
    pub currency: &'a str,
    pub tiers: &'a BTreeMap<String, TierPosition>,
    /// reservation name -> covered tokens this minute
    pub reserved: &'a BTreeMap<String, u64>,
    /// commitment name -> position this period
    pub commitments: &'a BTreeMap<String, CommitmentPosition>,
    /// (provider, model) -> tokens this minute under our provider reservations
    pub provider_minute: &'a BTreeMap<(String, String), u64>,
    /// (provider, model) -> our list cost this period (tenant's currency), for providers we
    /// hold a commitment with
    pub provider_period: &'a BTreeMap<(String, String), Decimal>,
    pub at: DateTime<Utc>,
}

fn price_one(
    ctx: &QuoteContext<'_>,
    mix: &TokenMix,
    provider: &str,
    model: &str,
    quality: Option<Decimal>,
) -> QuoteLine {
    let mut line = QuoteLine {
        rank: 0,
        provider: provider.to_string(),
        model: model.to_string(),
        quality,
        available: false,
        reason: None,
        list_price: None,
        batch_savings: None,
        cache_savings: None,
        price_before_tiers: None,
        tier: None,
        effective_price: None,
        cost: None,
        commitment_remaining: None,
        reserved_headroom_tokens: None,
        provider_headroom_tokens: None,
        provider_commitment_headroom: None,
        marginal_cost: None,
    };
    let u = mix.usage(ctx.tenant_id, provider, model);
    let book = ctx.book;
    let Some(cost_v) = book.version_at(provider, model, None, Side::Cost, ctx.currency, ctx.at)
    else {
        line.reason = Some(format!("no {} price for {provider}/{model}", ctx.currency));
        return line;
    };
    let price = match book.version_at(provider, model, None, Side::Price, ctx.currency, ctx.at) {
        Some(p) => CustomerPrice::Explicit(p),
        None => CustomerPrice::Markup(book.markup_at(ctx.tenant_id, ctx.at)),
    };
    let terms = Terms {
        cost: cost_v,
        price,
    };
    let r = match rate(&u, terms) {
        Ok(r) => r,
        Err(e) => {
            line.reason = Some(e.to_string());
            return line;
        }
    };
    // what the cached tokens would have cost as fresh input, from the rated lines
    let fresh = {
        let (input, cached) = (&r.lines[0], &r.lines[1]);
        let per_token = (input.price_rate_per_mtok - cached.price_rate_per_mtok) / MTOK;
        r.price + Decimal::from(cached.tokens) * per_token * (Decimal::ONE - r.price_batch_discount)
    };
    // our side: tokens within our provider reservation's headroom cost us nothing more
    let marginal_cost = match book.provider_reservation_at(provider, model, ctx.at) {
        Some(pr) => {
            let used = ctx
                .provider_minute
                .get(&(provider.to_string(), model.to_string()))
                .copied()
                .unwrap_or_default();
            let mut left = pr.capacity().saturating_sub(used);
            line.provider_headroom_tokens = Some(left);
            let keep = Decimal::ONE - r.cost_batch_discount;
            let mut saved = Decimal::ZERO;
            for l in &r.lines {
                let c = l.tokens.min(left);
                left -= c;
                saved += Decimal::from(c) * l.cost_rate_per_mtok / MTOK * keep;
            }
            (r.cost - saved).max(Decimal::ZERO)
        }
        None => r.cost,
    };
    // and what our commitments with the provider can still absorb is already paid for
    let commitments = super::provider::in_force(
        book.provider_commitment_versions(provider),
        ctx.currency,
        ctx.at,
    );
    let marginal_cost = if commitments.is_empty() {
        marginal_cost
    } else {
        let used: BTreeMap<String, Decimal> = ctx
            .provider_period
            .iter()
            .filter(|((p, _), _)| p == provider)
            .map(|((_, m), c)| (m.clone(), *c))
            .collect();
        let (m, headroom) = super::provider::marginal(&commitments, &used, model, marginal_cost);
        line.provider_commitment_headroom = Some(headroom);
        m
    };
    line.marginal_cost = Some(marginal_cost.normalize());
    // step 5: what is left of a reservation this minute covers tokens at no price
    let r = match book.reservation_at(ctx.tenant_id, provider, model, ctx.at) {
        Some(res) => {
            let used = ctx.reserved.get(&res.name).copied().unwrap_or_default();
            line.reserved_headroom_tokens = Some(res.capacity().saturating_sub(used));
            match with_reservation(r, res, used, super::reservations::minute_of(ctx.at)) {
                Ok(r) => r,
                Err(e) => {
                    line.reason = Some(e.to_string());
                    return line;
                }
            }
        }
        None => r,
    };
    let before_tiers = r.price;
    let r = match book.tier_at(ctx.tenant_id, provider, model, ctx.at) {
        Some(s) => {
            let pos = ctx.tiers.get(&s.name).cloned().unwrap_or_default();
            match with_tier(r, s, &pos, period_of(ctx.at)) {
                Ok(r) => r,
                Err(e) => {
                    line.reason = Some(e.to_string());
                    return line;
                }
            }
        }
        None => r,
    };
    // step 7: the commitment's remainder at its discount, overage past it
    let r = match book.commitment_at(ctx.tenant_id, ctx.at) {
        Some(c) => {
            let pos = ctx.commitments.get(&c.name).cloned().unwrap_or_default();
            if !pos.closed {
                line.commitment_remaining = Some((c.amount - pos.drawn).max(Decimal::ZERO));
            }
            match with_commitment(r, c, &pos, period_of(ctx.at)) {
                Ok(r) => r,
                Err(e) => {
                    line.reason = Some(e.to_string());
                    return line;
                }
            }
        }
        None => r,
    };
    line.available = true;
    line.list_price = Some(r.price_list);
    line.batch_savings = Some((r.price_list - before_tiers).normalize());
    line.cache_savings = Some((fresh - before_tiers).max(Decimal::ZERO).normalize());
    line.price_before_tiers = Some(before_tiers);
    line.effective_price = Some(r.price);
    line.cost = Some(r.cost);
    line.tier = r.tier;
    line
}

/// Price every candidate for the mix and rank them: cheapest effective price first, then
/// lowest marginal cost to us, then higher quality, then name; unavailable ones last.
pub fn quote(
    ctx: &QuoteContext<'_>,
    mix: &TokenMix,
    candidates: &[(String, String, Option<Decimal>)],
) -> Vec<QuoteLine> {
    let mut lines: Vec<QuoteLine> = candidates
        .iter()
        .map(|(p, m, q)| price_one(ctx, mix, p, m, *q))
        .collect();
    lines.sort_by(|a, b| {
        (!a.available)
            .cmp(&!b.available)
            .then(a.effective_price.cmp(&b.effective_price))
            .then(a.marginal_cost.cmp(&b.marginal_cost))
            .then(b.quality.cmp(&a.quality))
            .then((&a.provider, &a.model).cmp(&(&b.provider, &b.model)))
    });
    for (i, l) in lines.iter_mut().enumerate() {
        l.rank = i as u32 + 1;
    }
    lines
}

/// A class's candidates at or above its quality floor.
pub fn eligible(c: &RoutingClass) -> Vec<(String, String, Option<Decimal>)> {
    c.candidates
        .iter()
        .filter(|x| x.quality >= c.quality_floor)
        .map(|x| (x.provider.clone(), x.model.clone(), Some(x.quality)))
        .collect()
}

/// A NATS KV key token for any string: bytes outside `[-/_a-zA-Z0-9]` become `=XX`
/// (uppercase hex), so `auto:budget` is `auto=3Abudget`.
pub fn kv_token(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-/_".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_tokens_use_only_allowed_characters() {
        assert_eq!(kv_token("auto:budget"), "auto=3Abudget");
        assert_eq!(kv_token("a.b=c"), "a=2Eb=3Dc");
        assert_eq!(kv_token("plain-name_1/x"), "plain-name_1/x");
        assert!(kv_token("ü 1")
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-/_=".contains(&b)));
    }
}
