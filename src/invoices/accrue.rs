//! What each applied event adds to its tenant's invoice, line by line (pure). The ledger
//! writer and the rebuild both call these, so the projection and its rebuild agree by
//! construction.
//!
//! Per usage event the lines sum to what the event moved into the receivable plus what it
//! drew from a commitment: usage at list price per model, token class and rate, minus the
//! batch discount, minus what a reservation covered, minus tier discounts and volume
//! credits, minus the usage a commitment covered, plus the commitment drawdown, plus (or
//! minus) the overage rate's difference. The close adds the true-up and reservation fees, so
//! over a closed period the lines sum to exactly the period's receivable movements.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::events::{AdjustmentData, Direction};
use crate::ledger::state::CloseRecord;
use crate::pricing::Rating;

/// Line kinds in the order an invoice shows them.
pub const KINDS: [&str; 12] = [
    "usage",
    "batch_discount",
    "reservation_covered",
    "tier_discount",
    "tier_credit",
    "commitment_covered",
    "commitment_overage",
    "commitment_drawdown",
    "commitment_true_up",
    "commitment_difference",
    "reservation_fee",
    "adjustment",
];

pub const CLASSES: [&str; 5] = [
    "input",
    "cached_input",
    "cache_write",
    "output",
    "reasoning",
];

/// The projection's columns after `tenant_id, period, line_key`, in the order the writer
/// and the rebuild bind them.
pub const COLUMNS: &str =
    "kind, origin_period, provider, model, token_class, unit_price, name, refs,
  description, quantity, amount, input_tokens, cached_input_tokens, cache_write_tokens,
  output_tokens, reasoning_tokens, input_amount, cached_input_amount, cache_write_amount,
  output_amount, reasoning_amount, input_rate, cached_input_rate, cache_write_rate, output_rate,
  reasoning_rate";

/// What an upsert does on a row that exists: totals add, rates stay.
pub const ON_CONFLICT: &str = "on conflict (tenant_id, period, line_key) do update set
  quantity = a.quantity + excluded.quantity, amount = a.amount + excluded.amount,
  input_tokens = a.input_tokens + excluded.input_tokens,
  cached_input_tokens = a.cached_input_tokens + excluded.cached_input_tokens,
  cache_write_tokens = a.cache_write_tokens + excluded.cache_write_tokens,
  output_tokens = a.output_tokens + excluded.output_tokens,
  reasoning_tokens = a.reasoning_tokens + excluded.reasoning_tokens,
  input_amount = a.input_amount + excluded.input_amount,
  cached_input_amount = a.cached_input_amount + excluded.cached_input_amount,
  cache_write_amount = a.cache_write_amount + excluded.cache_write_amount,
  output_amount = a.output_amount + excluded.output_amount,
  reasoning_amount = a.reasoning_amount + excluded.reasoning_amount,
  input_rate = coalesce(a.input_rate, excluded.input_rate),
  cached_input_rate = coalesce(a.cached_input_rate, excluded.cached_input_rate),
  cache_write_rate = coalesce(a.cache_write_rate, excluded.cache_write_rate),
  output_rate = coalesce(a.output_rate, excluded.output_rate),
  reasoning_rate = coalesce(a.reasoning_rate, excluded.reasoning_rate)";

/// An accrual map's rows as columns for `unnest`, in `COLUMNS` order after the key.
#[derive(Default)]
pub struct Columns {
    pub tenant: Vec<String>,
    pub period: Vec<String>,
    pub key: Vec<String>,
    pub text: [Vec<String>; 5],
    pub unit_price: Vec<Option<Decimal>>,
    pub name: Vec<String>,
    pub refs: Vec<String>,
    pub description: Vec<String>,
    pub quantity: Vec<Decimal>,
    pub amount: Vec<Decimal>,
    pub tokens: [Vec<Decimal>; 5],
    pub amounts: [Vec<Decimal>; 5],
    pub rates: [Vec<Option<Decimal>>; 5],
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

impl Columns {
    pub fn of<'a>(
        rows: impl Iterator<Item = (&'a (String, String, LineKey), &'a Accrued)>,
    ) -> Columns {
        let mut c = Columns::default();
        for ((t, p, k), v) in rows {
            c.tenant.push(t.clone());
            c.period.push(p.clone());
            c.key.push(k.text());
            let fields = [&k.kind, &k.origin, &k.provider, &k.model, &k.class];
            for (col, f) in c.text.iter_mut().zip(fields) {
                col.push(f.clone());
            }
            c.unit_price.push(k.unit_price);
            c.name.push(k.name.clone());
            c.refs.push(k.refs.clone());
            c.description.push(v.description.clone());
            c.quantity.push(v.quantity);
            c.amount.push(v.amount);
            for (i, x) in v.classes.iter().enumerate() {
                c.tokens[i].push(x.tokens);
                c.amounts[i].push(x.amount);
                c.rates[i].push(x.rate);
            }
        }
        c
    }

    /// Bind every column, in order, to a query whose next parameter is the tenant's.
    pub fn bind(self, q: Query<'_>) -> Query<'_> {
        let [kind, origin, provider, model, class] = self.text;
        let mut q = q
            .bind(self.tenant)
            .bind(self.period)
            .bind(self.key)
            .bind(kind)
            .bind(origin)
            .bind(provider)
            .bind(model)
            .bind(class)
            .bind(self.unit_price)
            .bind(self.name)
            .bind(self.refs)
            .bind(self.description)
            .bind(self.quantity)
            .bind(self.amount);
        for v in self.tokens {
            q = q.bind(v);
        }
        for v in self.amounts {
            q = q.bind(v);
        }
        for v in self.rates {
            q = q.bind(v);
        }
        q
    }

    /// `unnest(...)` of the bound columns (tenant, period, key, then `COLUMNS`), their
    /// parameters numbered from `first`.
    pub fn unnest(first: usize) -> String {
        format!("unnest({})", Self::params(first).join(", "))
    }

    /// The same columns as a select list, `unnest($1::text[]), unnest($2::text[]), ...`:
    /// rows yielded as they go, without a tuplestore per array (the writer's hot path).
    pub fn select_list(first: usize) -> String {
        Self::params(first)
            .iter()
            .map(|p| format!("unnest({p})"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn params(first: usize) -> Vec<String> {
        let types = [
            "text", "text", "text", "text", "text", "text", "text", "text", "numeric", "text",
            "text", "text", "numeric", "numeric",
        ];
        let mut parts: Vec<String> = types
            .iter()
            .enumerate()
            .map(|(i, t)| format!("${}::{t}[]", first + i))
            .collect();
        for i in 0..15 {
            parts.push(format!("${}::numeric[]", first + types.len() + i));
        }
        parts
    }
}

/// A line's identity within one tenant's invoice for one period.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LineKey {
    pub kind: String,
    /// The month the usage belongs to when it is billed late on a later invoice; "" if not.
    pub origin: String,
    pub provider: String,
    pub model: String,
    pub class: String,
    /// Customer rate per million tokens (usage lines), normalised.
    pub unit_price: Option<Decimal>,
    pub name: String,
    pub refs: String,
}

impl LineKey {
    fn new(kind: &str, origin: &str) -> LineKey {
        LineKey {
            kind: kind.into(),
            origin: origin.into(),
            provider: String::new(),
            model: String::new(),
            class: String::new(),
            unit_price: None,
            name: String::new(),
            refs: String::new(),
        }
    }

    /// The canonical text form stored as the projection's key: every field length-prefixed,
    /// so no two lines share one whatever their fields contain.
    pub fn text(&self) -> String {
        let price = self
            .unit_price
            .map(|p| p.normalize().to_string())
            .unwrap_or_default();
        let mut out = String::new();
        for f in [
            self.kind.as_str(),
            &self.origin,
            &self.provider,
            &self.model,
            &self.class,
            &price,
            &self.name,
            &self.refs,
        ] {
            out.push_str(&f.len().to_string());
            out.push(':');
            out.push_str(f);
        }
        out
    }
}

/// One line's running totals: quantity, amount (full precision), and a description for
/// lines whose meaning is not in their key (adjustments: the reason). A `usage` row is
/// one per provider, model, price versions and context length: its quantity counts
/// requests and its classes carry the tokens, list amount and rate of each token class
/// (the invoice shows one line per class), so the writer upserts one row where there are
/// up to five lines.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Accrued {
    pub quantity: Decimal,
    pub amount: Decimal,
    pub description: String,
    pub classes: [ClassTotals; 5],
}

/// One token class of a usage row.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ClassTotals {
    pub tokens: Decimal,
    pub amount: Decimal,
    /// Customer rate per million tokens (the same for every request of the row: it follows
    /// from the versions and the context length in the row's key).
    pub rate: Option<Decimal>,
}

/// (tenant, invoice period, line) -> totals.
pub type Accruals = HashMap<(String, String, LineKey), Accrued>;

/// Adds lines to a tenant's invoice for one period.
pub struct Sink<'a> {
    pub out: &'a mut Accruals,
    pub tenant: &'a str,
    pub period: &'a str,
}

impl Sink<'_> {
    fn add(&mut self, key: LineKey, quantity: Decimal, amount: Decimal, description: &str) {
        let a = self
            .out
            .entry((self.tenant.to_string(), self.period.to_string(), key))
            .or_default();
        a.quantity += quantity;
        a.amount += amount;
        if a.description.is_empty() {
            a.description = description.to_string();
        }
    }

    /// A rated usage event of `provider`/`model`; `origin` is its own month when it is
    /// billed late, else "".
    pub fn usage(&mut self, provider: &str, model: &str, origin: &str, r: &Rating) {
        let refs = match (r.price_version_id, r.markup_rule_id) {
            (Some(p), _) => format!("cost:{} price:{p}", r.cost_version_id),
            (None, Some(m)) => format!("cost:{} markup:{m}", r.cost_version_id),
            (None, None) => format!("cost:{}", r.cost_version_id),
        };
        let one = Decimal::ONE;
        let mut after_batch = Decimal::ZERO;
        let mut k = LineKey::new("usage", origin);
        k.provider = provider.into();
        k.model = model.into();
        k.name = if r.long_context { "long_context" } else { "" }.into();
        k.refs = refs;
        let row = self
            .out
            .entry((self.tenant.to_string(), self.period.to_string(), k))
            .or_default();
        row.quantity += one;
        for (i, l) in r.lines.iter().enumerate() {
            after_batch += l.price;
            if l.tokens == 0 {
                continue;
            }
            let c = &mut row.classes[i];
            c.tokens += Decimal::from(l.tokens);
            c.amount += l.price_list;
            row.amount += l.price_list;
            c.rate.get_or_insert(l.price_rate_per_mtok.normalize());
        }
        let batch = r.price_list - after_batch;
        if !batch.is_zero() {
            let mut k = LineKey::new("batch_discount", origin);
            k.provider = provider.into();
            k.model = model.into();
            k.name = (r.price_batch_discount * Decimal::ONE_HUNDRED)
                .normalize()
                .to_string();
            self.add(k, one, -batch, "");
        }
        if let Some(x) = &r.reservation {
            let covered: u64 = x.covered.iter().sum();
            if covered > 0 || !x.covered_price.is_zero() {
                let mut k = LineKey::new("reservation_covered", origin);
                k.provider = provider.into();
                k.model = model.into();
                k.name = x.reservation.clone();
                k.refs = format!("reservation:{}", x.version);
                self.add(k, Decimal::from(covered), -x.covered_price, "");
            }
        }
        if let Some(t) = &r.tier {
            let d = r.price_before_tiers - t.price;
            if !d.is_zero() {
                let mut k = LineKey::new("tier_discount", origin);
                k.name = t.schedule.clone();
                k.refs = format!("tier_schedule:{}", t.schedule_id);
                self.add(k, t.units, -d, "");
            }
            if let Some(c) = t.credit.filter(|c| !c.is_zero()) {
                let mut k = LineKey::new("tier_credit", origin);
                k.name = t.schedule.clone();
                k.refs = format!("tier_schedule:{}", t.schedule_id);
                self.add(k, one, -c, "");
            }
        }
        if let Some(c) = &r.commitment {
            let refs = format!("commitment:{}", c.version);
            if !c.covered.is_zero() {
                let mut k = LineKey::new("commitment_covered", origin);
                k.name = c.commitment.clone();
                k.refs = refs.clone();
                self.add(k, one, -c.covered, "");
            }
            // the usage past the commitment (already in the usage lines at the on-demand
            // price): its quantity, and what the overage rate adds or takes off
            let d = c.overage - c.overage_usage;
            if !c.late && (!c.overage_usage.is_zero() || !d.is_zero()) {
                let mut k = LineKey::new("commitment_overage", origin);
                k.name = c.commitment.clone();
                k.refs = refs.clone();
                self.add(k, c.overage_usage, d, "");
            }
            if !c.drawdown.is_zero() {
                let mut k = LineKey::new("commitment_drawdown", origin);
                k.name = c.commitment.clone();
                k.refs = refs;
                self.add(k, one, c.drawdown, "");
            }
        }
    }

    /// A period close: commitment true-ups and reservation fees.
    pub fn close(&mut self, c: &CloseRecord) {
        let one = Decimal::ONE;
        for l in &c.commitments {
            let refs = format!("commitment:{}", l.version);
            if !l.true_up.is_zero() {
                let mut k = LineKey::new("commitment_true_up", "");
                k.name = l.commitment.clone();
                k.refs = refs.clone();
                self.add(k, one, l.true_up, "");
            }
            // billed in full: what the drawdown lines do not already carry
            let diff = l.amount - l.drawn - l.true_up;
            if !diff.is_zero() {
                let mut k = LineKey::new("commitment_difference", "");
                k.name = l.commitment.clone();
                k.refs = refs;
                self.add(k, one, diff, "");
            }
        }
        for r in &c.reservations {
            let mut k = LineKey::new("reservation_fee", "");
            k.name = r.reservation.clone();
            k.refs = r
                .versions
                .iter()
                .map(|v| format!("reservation:{v}"))
                .collect::<Vec<_>>()
                .join(" ");
            self.add(k, one, r.fee, "");
        }
    }

    /// An operator's adjustment (credit or debit), one line per event.
    pub fn adjustment(&mut self, event_id: &str, origin: &str, a: &AdjustmentData) {
        let mut k = LineKey::new("adjustment", origin);
        k.name = event_id.into();
        k.refs = a
            .corrects_event_id
            .as_deref()
            .map(|e| format!("corrects:{e}"))
            .or_else(|| a.request_id.as_deref().map(|r| format!("request:{r}")))
            .unwrap_or_default();
        let amount = match a.direction {
            Direction::Credit => -a.amount,
            Direction::Debit => a.amount,
        };
        self.add(k, Decimal::ONE, amount, &a.reason);
    }
}

/// What an applied event charged, as far as invoices are concerned.
pub enum Charged<'a> {
    Usage {
        provider: &'a str,
        model: &'a str,
        rating: &'a Rating,
    },
    Adjustment(&'a AdjustmentData),
    /// A period's close, with what it charged (`None`: nothing).
    Close {
        period: &'a str,
        record: Option<&'a CloseRecord>,
    },
    /// Lines nobody bills (an evaluation tick, or a charge whose record is unreadable).
    Nothing,
}

/// Where an event went: the invoice period its lines were added to, if any.
pub struct Accrual {
    pub billed_to: Option<String>,
    /// The period the event closed, if it is a close.
    pub closes: Option<String>,
}

/// One event in ledger order, for the writer and the replay alike: add its lines to the
/// invoice that bills it (its own month, or — if that was closed before it — the first
/// open month after, as late lines), and for a close, close its period. Only events that
/// moved money (`moved`) add lines: the record holds nothing else to rebuild them from.
pub fn accrue_event(
    out: &mut Accruals,
    closed: &mut HashSet<(String, String)>,
    tenant: &str,
    event_id: &str,
    at: DateTime<Utc>,
    charged: Charged<'_>,
    moved: bool,
) -> Accrual {
    let (origin, closes) = match &charged {
        Charged::Close { period, .. } => (period.to_string(), true),
        _ => (crate::pricing::period_of(at), false),
    };
    let billed_to = if !moved {
        None
    } else if closes {
        Some(origin.clone())
    } else {
        invoice_period(&origin, |p| {
            closed.contains(&(tenant.to_string(), p.to_string()))
        })
    };
    if let Some(period) = &billed_to {
        let late = if *period == origin {
            ""
        } else {
            origin.as_str()
        };
        let mut sink = Sink {
            out,
            tenant,
            period,
        };
        match charged {
            Charged::Usage {
                provider,
                model,
                rating,
            } => sink.usage(provider, model, late, rating),
            Charged::Adjustment(a) => sink.adjustment(event_id, late, a),
            Charged::Close {
                record: Some(c), ..
            } => sink.close(c),
            Charged::Close { record: None, .. } | Charged::Nothing => {}
        }
    }
    if closes {
        closed.insert((tenant.to_string(), origin.clone()));
    }
    Accrual {
        billed_to,
        closes: closes.then_some(origin),
    }
}

/// The invoice period for an event of `origin`: its own month, or — when that month was
/// closed before the event in ledger order — the first later month not closed yet.
pub fn invoice_period(origin: &str, closed: impl Fn(&str) -> bool) -> Option<String> {
    let mut p = origin.to_string();
    // a tenant closes at most one period per month: a bounded walk
    for _ in 0..1200 {
        if !closed(&p) {
            return Some(p);
        }
        p = next_period(&p)?;
    }
    None
}

/// The month after `YYYY-MM`.
pub fn next_period(p: &str) -> Option<String> {
    let (y, m) = crate::pricing::tiers::parse_period(p)?;
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    Some(format!("{y:04}-{m:02}"))
}

/// The period a close event id (`period-close:YYYY-MM`) closes.
pub fn closed_by(event_id: &str) -> Option<&str> {
    event_id.strip_prefix("period-close:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_usage_goes_to_the_first_open_month() {
        let closed = ["2026-10", "2026-11"];
        let c = |p: &str| closed.contains(&p);
        assert_eq!(invoice_period("2026-09", c).as_deref(), Some("2026-09"));
        assert_eq!(invoice_period("2026-10", c).as_deref(), Some("2026-12"));
        assert_eq!(invoice_period("2026-11", c).as_deref(), Some("2026-12"));
        assert_eq!(next_period("2026-12").as_deref(), Some("2027-01"));
        assert_eq!(closed_by("period-close:2026-10"), Some("2026-10"));
        assert_eq!(closed_by("evaluation-tick:2026-10-01T00"), None);
    }

    #[test]
    fn keys_of_different_lines_differ_whatever_their_fields_hold() {
        let mut a = LineKey::new("usage", "");
        a.model = "m|x".into();
        let mut b = LineKey::new("usage", "");
        b.model = "m".into();
        b.class = "x".into();
        assert_ne!(a.text(), b.text());
    }
}
