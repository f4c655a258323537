//! A tenant's rating state before an event (tier, commitment and budget positions) and the full
//! rating of a usage event from it. Pure; the writer and `verify` share it, so replay
//! computes exactly what the writer did.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::events::UsageData;
use crate::pricing::budgets::{period_key, Budget, BudgetCount};
use crate::pricing::commitments::{true_up, CommitmentPosition};
use crate::pricing::reservations::{fee, minute_of};
use crate::pricing::{
    period_of, rate, with_commitment, with_reservation, with_tier, PriceBook, PricingError, Rating,
    Terms, TierPosition,
};

/// (tenant, schedule or budget name, period)
pub type Key = (String, String, String);

#[derive(Clone, Debug, Default)]
pub struct TenantState {
    pub tiers: HashMap<Key, TierPosition>,
    pub budgets: HashMap<Key, Decimal>,
    pub commitments: HashMap<Key, CommitmentPosition>,
    /// (tenant, reservation, minute) -> covered tokens
    pub reservations: HashMap<Key, u64>,
    /// (tenant, period) whose close is applied: usage of such a period is late (it draws
    /// on no commitment, even one whose position the close did not record)
    pub closed: std::collections::HashSet<(String, String)>,
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
    /// The event took spend to the limit.
    pub exhausted: bool,
    /// The event made the period's burn rate project past the limit: when it is reached.
    pub forecast: Option<DateTime<Utc>>,
}

/// A reservation's trailing day, as an evaluation tick found it.
#[derive(Clone, Debug, PartialEq)]
pub struct Underuse {
    pub reservation: String,
    pub version: i64,
    /// The UTC day the alert counts for (that of the window's last instant).
    pub day: String,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub covered_tokens: u64,
    pub capacity_tokens: u64,
    pub utilization_percent: Decimal,
    pub alert_below_percent: Decimal,
}

/// The instant an evaluation tick's hour (`YYYY-MM-DDTHH`, UTC) ends.
pub fn tick_instant(hour: &str) -> Option<DateTime<Utc>> {
    if hour.len() != 13 {
        return None;
    }
    chrono::NaiveDateTime::parse_from_str(&format!("{hour}:00"), "%Y-%m-%dT%H:%M")
        .ok()
        .map(|t| t.and_utc())
}

/// The hour string of an instant (the tick that ends at the top of that hour).
pub fn tick_hour(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H").to_string()
}

/// Evaluate a tenant's reservations at a tick: each with an under-utilisation share set
/// whose covered tokens over the 24 hours before the tick are below that share of the
/// capacity in force minute by minute raises `reservation.underutilized` (once per UTC
/// day). From the ledger's own state: replay finds the same.
pub fn evaluate_tick(book: &PriceBook, tenant: &str, hour: &str, state: &TenantState) -> Moves {
    let mut moves = Moves::default();
    let Some(end) = tick_instant(hour) else {
        return moves;
    };
    let start = end - chrono::Duration::days(1);
    let last = end - chrono::Duration::microseconds(1);
    for (name, versions) in book.reservation_versions(tenant) {
        let in_force = |at: DateTime<Utc>| {
            versions
                .iter()
                .filter(|v| v.effective_from <= at)
                .max_by_key(|v| (v.effective_from, v.id))
                .filter(|v| v.active)
        };
        let Some(current) = in_force(last) else {
            continue;
        };
        let Some(share) = current.underutilization_alert_percent else {
            continue;
        };
        let (mut used, mut capacity) = (0u64, 0u64);
        for m in 0..1440 {
            let at = start + chrono::Duration::minutes(m);
            if let Some(v) = in_force(at) {
                capacity += v.capacity();
                let key = (tenant.to_string(), name.to_string(), minute_of(at));
                used += state.reservations.get(&key).copied().unwrap_or_default();
            }
        }
        if capacity == 0 {
            continue;
        }
        let pct =
            (Decimal::from(used) * Decimal::ONE_HUNDRED / Decimal::from(capacity)).round_dp(4);
        if pct < share {
            moves.underutilized.push(Underuse {
                reservation: name.to_string(),
                version: current.id,
                day: last.format("%Y-%m-%d").to_string(),
                window_start: start,
                window_end: end,
                covered_tokens: used,
                capacity_tokens: capacity,
                utilization_percent: pct,
                alert_below_percent: share,
            });
        }
    }
    moves
}

/// The minutes (`YYYY-MM-DDTHH:MM`) a tick's window covers.
pub fn tick_minutes(hour: &str) -> Vec<String> {
    let Some(end) = tick_instant(hour) else {
        return Vec::new();
    };
    (0..1440)
        .map(|m| minute_of(end - chrono::Duration::minutes(1440 - m)))
        .collect()
}

/// How an event moves the state.
#[derive(Clone, Debug, Default)]
pub struct Moves {
    pub tier: Option<(Key, TierPosition)>,
    /// (from tier, to tier, schedule version, the reached tier's discount) when the event
    /// moved the tenant into a higher tier.
    pub tier_crossed: Option<(u32, u32, i64, Decimal)>,
    /// The commitment position after the event.
    pub commitment: Option<(Key, CommitmentPosition)>,
    /// Commitment positions a period's close closed.
    pub closes: Vec<(Key, CommitmentPosition)>,
    /// Covered tokens of the reservation's minute after the event.
    pub reservation: Option<(Key, u64)>,
    /// The event used up the reservation's capacity for its minute: (capacity).
    pub reservation_exhausted: Option<u64>,
    /// The event used up the commitment for its period: (amount).
    pub commitment_exhausted: Option<Decimal>,
    /// Drawdown thresholds (percent) of the commitment the event crossed, with its version.
    pub commitment_crossed: Vec<(Decimal, i64, Decimal)>,
    /// Reservations an evaluation tick found used below their alert share.
    pub underutilized: Vec<Underuse>,
    pub budgets: Vec<BudgetMove>,
}

impl Moves {
    /// The alert facts these moves raise: (type, unique key, payload). Shared by the
    /// writer (which records them) and `verify` (which expects exactly them).
    pub fn alerts(
        &self,
        event_id: &str,
        request_id: &str,
    ) -> Vec<(&'static str, String, serde_json::Value)> {
        let mut out = Vec::new();
        if let (Some((key, pos)), Some((from, to, version, discount))) =
            (&self.tier, &self.tier_crossed)
        {
            out.push((
                "tier.crossed",
                format!("{}/{}/{}", key.1, key.2, to),
                serde_json::json!({
                    "schedule": key.1, "schedule_version": version, "period": key.2,
                    "from_tier": from, "to_tier": to,
                    "discount_percent": discount.normalize().to_string(),
                    "units": pos.units.normalize().to_string(),
                    "event_id": event_id, "request_id": request_id,
                }),
            ));
        }
        if let (Some((key, pos)), Some(amount)) = (&self.commitment, &self.commitment_exhausted) {
            out.push((
                "commitment.exhausted",
                format!("{}/{}", key.1, key.2),
                serde_json::json!({
                    "commitment": key.1, "period": key.2,
                    "amount": amount.normalize().to_string(),
                    "drawn": pos.drawn.normalize().to_string(),
                    "event_id": event_id, "request_id": request_id,
                }),
            ));
        }
        if let Some((key, pos)) = &self.commitment {
            for (t, version, amount) in &self.commitment_crossed {
                out.push((
                    "commitment.threshold_crossed",
                    format!("{}/{}/{}", key.1, key.2, t.normalize()),
                    serde_json::json!({
                        "commitment": key.1, "commitment_version": version, "period": key.2,
                        "threshold_percent": t.normalize().to_string(),
                        "amount": amount.normalize().to_string(),
                        "drawn": pos.drawn.normalize().to_string(),
                        "event_id": event_id, "request_id": request_id,
                    }),
                ));
            }
        }
        if let (Some((key, used)), Some(capacity)) =
            (&self.reservation, &self.reservation_exhausted)
        {
            out.push((
                "reservation.exhausted",
                format!("{}/{}", key.1, key.2),
                serde_json::json!({
                    "reservation": key.1, "minute": key.2, "capacity": capacity,
                    "covered": used, "event_id": event_id, "request_id": request_id,
                }),
            ));
        }
        for u in &self.underutilized {
            out.push((
                "reservation.underutilized",
                format!("{}/{}", u.reservation, u.day),
                serde_json::json!({
                    "reservation": u.reservation, "reservation_version": u.version,
                    "day": u.day, "window_start": u.window_start, "window_end": u.window_end,
                    "covered_tokens": u.covered_tokens, "capacity_tokens": u.capacity_tokens,
                    "utilization_percent": u.utilization_percent.normalize().to_string(),
                    "alert_below_percent": u.alert_below_percent.normalize().to_string(),
                    "event_id": event_id,
                }),
            ));
        }
        for m in &self.budgets {
            let b = &m.budget;
            for t in &m.crossed {
                out.push((
                    "budget.threshold_crossed",
                    format!("{}/{}/{}", b.name, m.key.2, t.normalize()),
                    serde_json::json!({
                        "budget": b.name, "budget_version": b.id, "scope": b.scope,
                        "scope_value": b.scope_value, "period": m.key.2, "period_kind": b.period,
                        "threshold_percent": t.normalize().to_string(),
                        "amount": b.amount.normalize().to_string(),
                        "spent": m.after.normalize().to_string(), "action": b.action,
                        "downgrade_class": b.downgrade_class,
                        "limit_reached": *t >= Decimal::ONE_HUNDRED,
                        "event_id": event_id, "request_id": request_id,
                    }),
                ));
            }
            let base = || {
                serde_json::json!({
                    "budget": b.name, "budget_version": b.id, "scope": b.scope,
                    "scope_value": b.scope_value, "period": m.key.2, "period_kind": b.period,
                    "amount": b.amount.normalize().to_string(),
                    "spent": m.after.normalize().to_string(), "action": b.action,
                    "downgrade_class": b.downgrade_class,
                    "event_id": event_id, "request_id": request_id,
                })
            };
            if m.exhausted {
                out.push((
                    "budget.exhausted",
                    format!("{}/{}", b.name, m.key.2),
                    base(),
                ));
            }
            if let Some(when) = m.forecast {
                let mut p = base();
                let (start, end) = crate::pricing::budgets::period_bounds(b.period, when);
                p["forecast_date"] = serde_json::json!(when);
                p["period_start"] = serde_json::json!(start);
                p["period_end"] = serde_json::json!(end);
                out.push((
                    "budget.forecast_exceeded",
                    format!("{}/{}", b.name, m.key.2),
                    p,
                ));
            }
        }
        out
    }
}

impl TenantState {
    pub fn apply(&mut self, m: &Moves) {
        if let Some((k, p)) = &m.tier {
            self.tiers.insert(k.clone(), p.clone());
        }
        for b in &m.budgets {
            self.budgets.insert(b.key.clone(), b.after);
        }
        if let Some((k, p)) = &m.commitment {
            self.commitments.insert(k.clone(), p.clone());
        }
        for (k, p) in &m.closes {
            self.commitments.insert(k.clone(), p.clone());
        }
        if let Some((k, n)) = &m.reservation {
            self.reservations.insert(k.clone(), *n);
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
    if let Some(res) = book.reservation_at(&u.tenant_id, &u.provider, &u.model, at) {
        let key = (u.tenant_id.clone(), res.name.clone(), minute_of(at));
        let used = state.reservations.get(&key).copied().unwrap_or_default();
        r = with_reservation(r, res, used, key.2.clone())?;
        if let Some(a) = &r.reservation {
            let after = used + a.covered_tokens();
            if after >= res.capacity() {
                moves.reservation_exhausted = Some(res.capacity());
            }
            moves.reservation = Some((key, after));
        }
    }
    if let Some(s) = book.tier_at(&u.tenant_id, &u.provider, &u.model, at) {
        let key = (u.tenant_id.clone(), s.name.clone(), period_of(at));
        let before = state.tiers.get(&key).cloned().unwrap_or_default();
        r = with_tier(r, s, &before, key.2.clone())?;
        if let Some(t) = &r.tier {
            let from = s.tier_of(before.units) as u32;
            if t.tier > from {
                let d = s.tiers[t.tier as usize].discount_percent;
                moves.tier_crossed = Some((from, t.tier, s.id, d));
            }
        }
        moves.tier = r.tier.as_ref().map(|t| (key, t.advance(&before)));
    }
    if let Some(c) = book.commitment_at(&u.tenant_id, at) {
        let key = (u.tenant_id.clone(), c.name.clone(), period_of(at));
        let before = state.commitments.get(&key).cloned().unwrap_or_default();
        let mut effective = before.clone();
        effective.closed |= state.closed.contains(&(key.0.clone(), key.2.clone()));
        r = with_commitment(r, c, &effective, key.2.clone())?;
        if let Some(a) = &r.commitment {
            let after = CommitmentPosition {
                drawn: before.drawn + a.drawdown,
                closed: before.closed,
            };
            if !before.closed && before.drawn < c.amount && after.drawn >= c.amount {
                moves.commitment_exhausted = Some(c.amount);
            }
            if !before.closed {
                moves.commitment_crossed = c
                    .crossed(before.drawn, after.drawn)
                    .into_iter()
                    .map(|t| (t, c.id, c.amount))
                    .collect();
            }
            moves.commitment = Some((key, after));
        }
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
                exhausted: before < b.amount && b.amount <= after,
                // raised when this event's spend first makes the projection pass the limit
                forecast: b
                    .forecast(at, after)
                    .filter(|_| b.forecast(at, before).is_none()),
                key,
                before,
                after,
                budget: b.clone(),
            });
        }
    }
    Ok((r, moves))
}

/// What a period's close bills for the commitment.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CloseLine {
    pub commitment: String,
    pub version: i64,
    pub period: String,
    pub amount: Decimal,
    pub drawn: Decimal,
    pub true_up: Decimal,
}

/// A reservation's fee for the period: units x price per unit-hour x hours in force.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReservationFee {
    pub reservation: String,
    pub versions: Vec<i64>,
    pub fee: Decimal,
}

/// Everything a period's close charges; stored as the close event's breakdown.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CloseRecord {
    pub period: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commitments: Vec<CloseLine>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reservations: Vec<ReservationFee>,
}

/// The close of a tenant's period. The commitment in force at the period's last instant
/// is billed in full and its unused remainder trued up; one that ended during the period
/// is billed what was drawn; their positions are closed (usage of that period ordered
/// after this is late: on demand, no drawdown); each reservation's
/// unit-hour fees for the hours its versions were in force in the period accrue. Nothing
/// if there is nothing to charge or the commitment's period is already closed.
pub fn close_period(
    book: &PriceBook,
    tenant: &str,
    period: &str,
    state: &TenantState,
) -> (Option<CloseRecord>, Moves) {
    let mut moves = Moves::default();
    let (Some(start), Some(end)) = (
        crate::pricing::tiers::period_start(period),
        crate::pricing::tiers::period_end(period),
    ) else {
        return (None, moves);
    };
    let mut record = CloseRecord {
        period: period.to_string(),
        commitments: Vec::new(),
        reservations: Vec::new(),
    };
    let last = end - chrono::Duration::nanoseconds(1);
    let in_force = book.commitment_at(tenant, last);
    // every commitment drawn on in the period, and the one in force at its end
    let mut names: std::collections::BTreeSet<String> = state
        .commitments
        .keys()
        .filter(|k| k.0 == tenant && k.2 == period)
        .map(|k| k.1.clone())
        .collect();
    if let Some(c) = in_force {
        names.insert(c.name.clone());
    }
    for name in names {
        let key = (tenant.to_string(), name.clone(), period.to_string());
        let pos = state.commitments.get(&key).cloned().unwrap_or_default();
        if pos.closed {
            // this period was closed already: a second close charges nothing
            return (None, Moves::default());
        }
        let line = match in_force {
            // in force at the end: billed in full, the unused remainder trued up
            Some(c) if c.name == name => CloseLine {
                commitment: name.clone(),
                version: c.id,
                period: period.to_string(),
                amount: c.amount.normalize(),
                drawn: pos.drawn.normalize(),
                true_up: true_up(c, &pos).normalize(),
            },
            // ended during the period: what was drawn is billed, nothing is trued up
            _ => CloseLine {
                commitment: name.clone(),
                version: book
                    .commitment_version_at(tenant, &name, last)
                    .map_or(0, |c| c.id),
                period: period.to_string(),
                amount: pos.drawn.normalize(),
                drawn: pos.drawn.normalize(),
                true_up: Decimal::ZERO,
            },
        };
        record.commitments.push(line);
        moves.closes.push((
            key,
            CommitmentPosition {
                drawn: pos.drawn,
                closed: true,
            },
        ));
    }
    for (name, versions) in book.reservation_versions(tenant) {
        let f = fee(&versions, start, end);
        if f > Decimal::ZERO {
            record.reservations.push(ReservationFee {
                reservation: name.to_string(),
                versions: versions.iter().map(|v| v.id).collect(),
                fee: f,
            });
        }
    }
    if record.commitments.is_empty() && record.reservations.is_empty() {
        return (None, moves);
    }
    (Some(record), moves)
}
