//! The ledger writer: applies a batch of bus messages in ONE transaction.
//!
//! Order of work per batch: decode and validate; lock the batch's tenants (ledger order
//! is assigned under that lock); find duplicates and conflicts; rate; append events,
//! transfers, conflicts and dead letters; update projections; commit. The caller acks
//! only after `apply` returned, i.e. after the commit.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::accounts::{adjustment_leg, close_legs, usage_legs, Leg};
use super::state::{
    close_period, evaluate_tick, rate_usage, tick_minutes, CloseRecord, TenantState,
};
use super::store::{
    self, BookStamp, ConflictRows, DeadRows, EventRows, Projections, RatedUsage, TierPositions,
    TransferRows,
};
use crate::catalog::prices::load_book;
use crate::events::{parse_bytes, Event, EventData, UsageData};
use crate::invoices::accrue::{accrue_event, Accruals, Charged};
use crate::pricing::budgets::{period_key, BudgetPeriod};
use crate::pricing::reservations::minute_of;
use crate::pricing::{period_of, CustomerPrice, PriceBook, PricingError, Rating, Side, Terms};

/// One message as it came off the bus.
#[derive(Clone, Debug)]
pub struct Inbound {
    pub subject: String,
    pub payload: bytes::Bytes,
    pub stream_seq: Option<u64>,
}

/// What became of a message; the caller acks `Applied`, `Duplicate` and `Conflict`, and
/// terminates `DeadLettered` (it will never apply as it is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    Conflict,
    DeadLettered(&'static str),
}

pub struct Writer {
    pool: PgPool,
    subject_prefix: String,
    book: PriceBook,
    stamp: BookStamp,
    /// Batches still to be checked against the stored keys before they are staged (see
    /// `apply`); set at start and after a batch met a duplicate at the unique indexes.
    careful: u32,
    /// What `careful` is set to (`Settings::writer_lookup_batches`).
    careful_batches: u32,
}

/// Batches checked against the stored keys first, at start and after a refusal, unless
/// configured otherwise (`TOKENLEDGER_WRITER_LOOKUP_BATCHES`).
pub const LOOKUP_BATCHES: u32 = 8;

/// The terms in force for a usage event, or why there are none.
pub fn terms_for<'b>(
    book: &'b PriceBook,
    u: &UsageData,
    currency: &str,
    at: DateTime<Utc>,
) -> Result<Terms<'b>, PricingError> {
    let region = u.region.as_deref();
    let cost = book
        .version_at(&u.provider, &u.model, region, Side::Cost, currency, at)
        .ok_or_else(|| PricingError::Unpriced {
            side: "cost",
            provider: u.provider.clone(),
            model: u.model.clone(),
            currency: currency.to_string(),
            at: at.to_rfc3339(),
        })?;
    let price = match book.version_at(&u.provider, &u.model, region, Side::Price, currency, at) {
        Some(p) => CustomerPrice::Explicit(p),
        None => CustomerPrice::Markup(book.markup_at(&u.tenant_id, at)),
    };
    Ok(Terms { cost, price })
}

/// What an event charges: its transfers, its rating (usage), and for other events what
/// their first transfer records as the breakdown.
struct Charge {
    legs: Vec<Leg>,
    rating: Option<Rating>,
    note: Option<String>,
    /// What a period close charged.
    close: Option<CloseRecord>,
}

/// Why an event cannot apply: a dead-letter reason code and a sentence.
type Rejected = (&'static str, String);

/// Everything one batch appends, staged column by column.
#[derive(Default)]
struct Batch {
    events: EventRows,
    transfers: TransferRows,
    conflicts: ConflictRows,
    dead: DeadRows,
    proj: Projections,
    /// The last sequence number assigned per tenant in this batch.
    heads: HashMap<String, i64>,
    /// Tier positions this batch moved (their values after it).
    tiers: TierPositions,
    /// Budget spend this batch moved (values after it).
    budgets: store::BudgetSpends,
    alerts: store::AlertRows,
    settlements: store::SettlementRows,
    /// Commitment positions this batch moved (values after it).
    commitments: store::CommitmentPositions,
    /// Reservation minutes this batch moved (covered tokens after it).
    reservations: store::ReservationMinutes,
    /// Tokens this batch adds per (provider, model, minute) under our provider reservations.
    provider_minutes: store::ProviderMinutes,
    /// List cost this batch adds per (provider, model, period, currency).
    provider_costs: store::ProviderCosts,
    /// What this batch adds to invoices, per (tenant, invoice period, line).
    accruals: Accruals,
    /// Period closes this batch applies: (tenant, period, close event id, seq, currency);
    /// their invoices are finalised after the batch's rows are written.
    closes: Vec<(String, String, String, i64, String)>,
}

impl Batch {
    async fn write(&self, tx: &mut sqlx::PgConnection) -> sqlx::Result<()> {
        let rows = store::Rows {
            events: &self.events,
            transfers: &self.transfers,
            conflicts: &self.conflicts,
            dead: &self.dead,
            proj: &self.proj,
            heads: &self.heads,
            tiers: &self.tiers,
            budgets: &self.budgets,
            alerts: &self.alerts,
            settlements: &self.settlements,
            commitments: &self.commitments,
            reservations: &self.reservations,
            provider_minutes: &self.provider_minutes,
            provider_costs: &self.provider_costs,
            accruals: &self.accruals,
        };
        store::append(tx, rows).await
    }
}

/// What the database already holds for this batch, read under the tenant locks.
struct Known {
    /// tenant -> (last sequence number, billing currency), for existing tenants
    tenants: HashMap<String, (i64, String)>,
    /// (tenant, event id) -> payload hash
    events: HashMap<(String, String), Vec<u8>>,
    /// (tenant, request id) -> event id
    requests: HashMap<(String, String), String>,
    /// Staged without looking the keys up, an event was dead-lettered by its rating.
    unsure: bool,
    /// The price book's stamp, read with the locks (none if no tenant was known).
    book_stamp: Option<BookStamp>,
    /// Tier positions and budget spend of the batch's tenants that have schedules or
    /// budgets, before the batch (moved as the batch is staged).
    state: TenantState,
}

impl Known {
    /// `look_up`: read which of the batch's keys are stored already; without it the batch
    /// is staged as if none were, and the unique indexes refuse it if one was.
    async fn load(
        tx: &mut sqlx::PgConnection,
        parsed: &[(usize, Event)],
        look_up: bool,
    ) -> sqlx::Result<Known> {
        let mut tenants: Vec<String> = parsed
            .iter()
            .map(|(_, e)| e.tenant_id().to_string())
            .collect();
        tenants.sort();
        tenants.dedup();
        let ((locked, book_stamp), closed) = store::lock_tenants(tx, &tenants).await?;
        let mut known = Known {
            tenants: locked,
            events: HashMap::new(),
            requests: HashMap::new(),
            unsure: false,
            book_stamp,
            state: TenantState {
                closed,
                ..TenantState::default()
            },
        };
        if !look_up {
            return Ok(known);
        }
        let keys: Vec<(String, String)> = parsed
            .iter()
            .map(|(_, e)| (e.tenant_id().to_string(), e.id.clone()))
            .collect();
        let reqs: Vec<(String, String)> = parsed
            .iter()
            .filter_map(|(_, e)| {
                e.request_id()
                    .map(|r| (e.tenant_id().to_string(), r.to_string()))
            })
            .collect();
        for (t, id, hash, rq) in store::existing(tx, &keys, &reqs).await? {
            if let Some(r) = rq {
                known.requests.insert((t.clone(), r), id.clone());
            }
            known.events.insert((t, id), hash);
        }
        Ok(known)
    }
}

impl Writer {
    pub fn new(pool: PgPool, subject_prefix: &str) -> Writer {
        Writer {
            pool,
            subject_prefix: subject_prefix.to_string(),
            book: PriceBook::default(),
            stamp: -1,
            careful: LOOKUP_BATCHES,
            careful_batches: LOOKUP_BATCHES,
        }
    }

    /// Batches checked against the stored keys first, at start and after a duplicate.
    pub fn lookup_batches(mut self, n: u32) -> Writer {
        self.careful = n;
        self.careful_batches = n;
        self
    }

    /// Whether a message came on its tenant's subject (`[prefix.]usage.v1.<tenant>`).
    fn on_own_subject(&self, subject: &str, tenant: &str) -> bool {
        let rest = if self.subject_prefix.is_empty() {
            Some(subject)
        } else {
            subject
                .strip_prefix(self.subject_prefix.as_str())
                .and_then(|r| r.strip_prefix('.'))
        };
        rest.and_then(|r| r.strip_prefix("usage.v1.")) == Some(tenant)
    }

    /// Apply a batch; returns one outcome per message, in order. On error nothing was
    /// committed and nothing may be acked.
    ///
    /// Duplicates seldom reach the writer (JetStream's window drops republished ones), so
    /// a batch is first staged without reading which of its keys are stored — two index
    /// probes per event saved. The events' unique indexes are the guard either way: if
    /// one refuses the batch, it is rolled back whole and applied again with the keys
    /// looked up (and so are the next `careful_batches`), so a duplicate or conflict gets
    /// the same outcome as before.
    pub async fn apply(
        &mut self,
        msgs: &[Inbound],
        now: DateTime<Utc>,
    ) -> sqlx::Result<Vec<Outcome>> {
        if self.careful > 0 {
            self.careful -= 1;
        } else {
            match self.attempt(msgs, now, false).await {
                Ok(Some(outcomes)) => return Ok(outcomes),
                Ok(None) => {
                    tracing::debug!("a dead letter staged without lookups; applying with them");
                }
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                    tracing::debug!(error = %e, "a stored key in the batch; applying with lookups");
                }
                Err(e) => return Err(e),
            }
            self.careful = self.careful_batches;
        }
        // with lookups every outcome is decided: `attempt` gives None only without them
        self.attempt(msgs, now, true).await?.ok_or_else(|| {
            sqlx::Error::Protocol("a batch with key lookups was left undecided".into())
        })
    }

    /// One try at a batch in a transaction of its own, rolled back explicitly on every
    /// path that does not commit (the tenant locks are free at once for a retry on another
    /// connection). `None`: staged without lookups, an event was dead-lettered by its
    /// rating — had its key been stored, it would have been a duplicate or conflict instead,
    /// and no unique index sees an event that is not written — so it must be applied again
    /// with lookups.
    async fn attempt(
        &mut self,
        msgs: &[Inbound],
        now: DateTime<Utc>,
        look_up: bool,
    ) -> sqlx::Result<Option<Vec<Outcome>>> {
        let mut tx = self.pool.begin().await?;
        match self.attempt_in(&mut tx, msgs, now, look_up).await {
            Ok(Some(outcomes)) => {
                tx.commit().await?;
                Ok(Some(outcomes))
            }
            r => {
                let _ = tx.rollback().await;
                r
            }
        }
    }

    async fn attempt_in(
        &mut self,
        tx: &mut sqlx::PgConnection,
        msgs: &[Inbound],
        now: DateTime<Utc>,
        look_up: bool,
    ) -> sqlx::Result<Option<Vec<Outcome>>> {
        let mut outcomes = vec![Outcome::Applied; msgs.len()];
        let mut b = Batch::default();
        let parsed = self.decode(msgs, now, &mut b, &mut outcomes);
        // the price book, reloaded only when it changed
        let mut known = Known::load(tx, &parsed, look_up).await?;
        if let Some(stamp) = known.book_stamp.filter(|s| *s != self.stamp) {
            self.book = load_book(tx).await?;
            self.stamp = stamp;
        }
        // tier positions and budget spend, read only for tenants that have terms
        let mut tiered: Vec<String> = Vec::new();
        let mut budgeted: Vec<String> = Vec::new();
        let mut committed: Vec<String> = Vec::new();
        let mut reserving: Vec<String> = Vec::new();
        let mut minutes: Vec<String> = Vec::new();
        let mut periods: Vec<String> = Vec::new();
        for (_, e) in &parsed {
            if known.tenants.contains_key(e.tenant_id()) && self.book.has_commitments(e.tenant_id())
            {
                committed.push(e.tenant_id().to_string());
                periods.push(match &e.data {
                    EventData::System(x) => x.period.clone(),
                    _ => period_of(e.time),
                });
            }
            if let EventData::System(x) = &e.data {
                // an evaluation tick reads the reservations' trailing day
                if x.kind == "evaluation_tick"
                    && known.tenants.contains_key(&x.tenant_id)
                    && self.book.has_reservations(&x.tenant_id)
                {
                    reserving.push(x.tenant_id.clone());
                    minutes.extend(tick_minutes(&x.period));
                }
            }
            if let EventData::Usage(u) = &e.data {
                if !known.tenants.contains_key(&u.tenant_id) {
                    continue;
                }
                if self.book.has_reservations(&u.tenant_id) {
                    reserving.push(u.tenant_id.clone());
                    minutes.push(minute_of(e.time));
                }
                if self.book.has_tiers(&u.tenant_id) {
                    tiered.push(u.tenant_id.clone());
                    periods.push(period_of(e.time));
                }
                if self.book.has_budgets(&u.tenant_id) {
                    budgeted.push(u.tenant_id.clone());
                    for p in [BudgetPeriod::Day, BudgetPeriod::Week, BudgetPeriod::Month] {
                        periods.push(period_key(p, e.time));
                    }
                }
            }
        }
        if !tiered.is_empty()
            || !budgeted.is_empty()
            || !committed.is_empty()
            || !reserving.is_empty()
        {
            for v in [
                &mut tiered,
                &mut budgeted,
                &mut committed,
                &mut reserving,
                &mut periods,
                &mut minutes,
            ] {
                v.sort();
                v.dedup();
            }
            let who = store::StateKeys {
                tiered: &tiered,
                budgeted: &budgeted,
                committed: &committed,
                reserving: &reserving,
                periods: &periods,
                minutes: &minutes,
            };
            let closed = std::mem::take(&mut known.state.closed);
            known.state = store::load_state(tx, who).await?;
            known.state.closed = closed;
        }
        for (i, ev) in parsed {
            outcomes[i] = self.stage(&mut b, &mut known, &msgs[i], ev);
            if !look_up && known.unsure {
                return Ok(None);
            }
        }
        b.write(tx).await?;
        for (tenant, period, event_id, seq, currency) in &b.closes {
            crate::invoices::store::finalize(tx, tenant, period, currency, event_id, *seq, now)
                .await?;
        }
        Ok(Some(outcomes))
    }

    /// Decode and validate; what fails is dead-lettered.
    fn decode(
        &self,
        msgs: &[Inbound],
        now: DateTime<Utc>,
        b: &mut Batch,
        outcomes: &mut [Outcome],
    ) -> Vec<(usize, Event)> {
        let mut parsed = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            match parse_bytes(&m.payload, now) {
                Ok(ev) if !self.on_own_subject(&m.subject, ev.tenant_id()) => {
                    let detail = format!(
                        "subject {} does not match tenant {}",
                        m.subject,
                        ev.tenant_id()
                    );
                    dead(&mut b.dead, m, "subject_mismatch", detail, Some(&ev), None);
                    outcomes[i] = Outcome::DeadLettered("subject_mismatch");
                }
                Ok(ev) => parsed.push((i, ev)),
                Err(rej) => {
                    dead(
                        &mut b.dead,
                        m,
                        "invalid_event",
                        rej.summary(),
                        None,
                        rej.id.clone(),
                    );
                    outcomes[i] = Outcome::DeadLettered("invalid_event");
                }
            }
        }
        parsed
    }

    /// Decide one event's fate in ledger order: duplicate, conflict, dead letter, or
    /// rated and staged with the tenant's next sequence number.
    fn stage(&self, b: &mut Batch, known: &mut Known, m: &Inbound, mut ev: Event) -> Outcome {
        let tenant = ev.tenant_id().to_string();
        let Some((last_seq, currency)) = known.tenants.get(&tenant) else {
            dead(
                &mut b.dead,
                m,
                "unknown_tenant",
                format!("tenant {tenant:?} does not exist"),
                Some(&ev),
                None,
            );
            return Outcome::DeadLettered("unknown_tenant");
        };
        let (last_seq, currency) = (*last_seq, currency.clone());
        let currency = currency.as_str();
        let key = (tenant.clone(), ev.id.clone());
        if let Some(h) = known.events.get(&key) {
            if h.as_slice() == ev.payload_hash {
                return Outcome::Duplicate;
            }
            conflict(&mut b.conflicts, &ev, "payload_differs", &ev.id);
            return Outcome::Conflict;
        }
        if let Some(owner) = ev
            .request_id()
            .and_then(|r| known.requests.get(&(tenant.clone(), r.to_string())))
        {
            conflict(&mut b.conflicts, &ev, "request_id_taken", owner);
            return Outcome::Conflict;
        }
        let charge = match self.legs(&ev, currency, known, b) {
            Ok(x) => x,
            Err((reason, detail)) => {
                known.unsure = true;
                dead(&mut b.dead, m, reason, detail, Some(&ev), None);
                return Outcome::DeadLettered(reason);
            }
        };
        let head = b.heads.entry(tenant.clone()).or_insert(last_seq);
        *head += 1;
        let seq = *head;
        if let (EventData::Usage(u), Some(r)) = (&ev.data, &charge.rating) {
            stage_usage(b, &ev, u, r);
        }
        // the hold this usage settles (an id that is no hold of this tenant settles nothing)
        if let EventData::Usage(u) = &ev.data {
            if let Some(h) = u.authorization_id.as_deref().and_then(|a| a.parse().ok()) {
                b.settlements.hold.push(h);
                b.settlements.tenant.push(tenant.clone());
                b.settlements.event_id.push(ev.id.clone());
            }
        }
        // the envelope's last reader (a conflict's record of it has returned above)
        let envelope = std::mem::take(&mut ev.canonical);
        stage_event_with(&mut b.events, &ev, envelope, seq);
        accrue(b, known, &ev, &charge, seq, currency);
        for (n, leg) in charge.legs.iter().enumerate() {
            stage_transfer(b, &ev, seq, n as i16, currency, leg, &charge);
        }
        known.events.insert(key, ev.payload_hash.to_vec());
        if let Some(r) = ev.request_id() {
            known
                .requests
                .insert((tenant, r.to_string()), ev.id.clone());
        }
        Outcome::Applied
    }

    /// The transfers an event makes (and its rating), or the dead-letter reason. A tier
    /// position it moves is updated in `known` (for later events of the batch) and
    /// staged in `b`.
    fn legs(
        &self,
        ev: &Event,
        currency: &str,
        known: &mut Known,
        b: &mut Batch,
    ) -> Result<Charge, Rejected> {
        match &ev.data {
            EventData::Usage(u) => match terms_for(&self.book, u, currency, ev.time)
                .and_then(|t| rate_usage(&self.book, u, t, ev.time, &known.state))
            {
                Ok((r, moves)) => {
                    known.state.apply(&moves);
                    // alert facts: recorded once per unique key (the table keeps it so)
                    for (type_, key, payload) in moves.alerts(&ev.id, &u.request_id) {
                        b.alerts.tenant.push(u.tenant_id.clone());
                        b.alerts.type_.push(type_.into());
                        b.alerts.key.push(key);
                        b.alerts.payload.push(payload.to_string());
                        b.alerts.occurred_at.push(ev.time);
                    }
                    if let Some((key, after)) = moves.tier {
                        b.tiers.insert(key, after);
                    }
                    for m in moves.budgets {
                        b.budgets.insert(m.key, m.after);
                    }
                    if let Some((key, after)) = moves.commitment {
                        b.commitments.insert(key, after);
                    }
                    if let Some((key, n)) = moves.reservation {
                        b.reservations.insert(key, n);
                    }
                    if self
                        .book
                        .counts_provider_usage(&u.provider, &u.model, ev.time)
                    {
                        let k = (
                            u.provider.clone(),
                            u.model.clone(),
                            minute_of(ev.time),
                            super::lane(&u.tenant_id),
                        );
                        *b.provider_minutes.entry(k).or_default() +=
                            (u.input_tokens + u.output_tokens) as i64;
                    }
                    if r.cost > rust_decimal::Decimal::ZERO {
                        let k = (
                            u.provider.clone(),
                            u.model.clone(),
                            period_of(ev.time),
                            currency.to_string(),
                            super::lane(&u.tenant_id),
                        );
                        *b.provider_costs.entry(k).or_default() += r.cost;
                    }
                    Ok(Charge {
                        legs: usage_legs(&u.provider, &r),
                        rating: Some(r),
                        note: None,
                        close: None,
                    })
                }
                Err(e @ PricingError::Unpriced { .. }) => Err(("unpriced_model", e.to_string())),
                Err(e) => Err(("rating_failed", e.to_string())),
            },
            EventData::Adjustment(a) if a.currency != currency => Err((
                "currency_mismatch",
                format!(
                    "adjustment in {} for a tenant billed in {currency}",
                    a.currency
                ),
            )),
            EventData::Adjustment(a) => Ok(Charge {
                legs: vec![adjustment_leg(a)],
                rating: None,
                note: Some(serde_json::to_string(a).expect("adjustment serialises")),
                close: None,
            }),
            EventData::System(x) if x.kind == "evaluation_tick" => {
                let moves = evaluate_tick(&self.book, &x.tenant_id, &x.period, &known.state);
                for (type_, key, payload) in moves.alerts(&ev.id, "") {
                    b.alerts.tenant.push(x.tenant_id.clone());
                    b.alerts.type_.push(type_.into());
                    b.alerts.key.push(key);
                    b.alerts.payload.push(payload.to_string());
                    b.alerts.occurred_at.push(ev.time);
                }
                Ok(Charge {
                    legs: Vec::new(),
                    rating: None,
                    note: None,
                    close: None,
                })
            }
            EventData::System(x) => {
                let (line, moves) = close_period(&self.book, &x.tenant_id, &x.period, &known.state);
                known.state.apply(&moves);
                for (key, after) in moves.closes {
                    b.commitments.insert(key, after);
                }
                Ok(match line {
                    Some(l) => Charge {
                        legs: close_legs(&l),
                        rating: None,
                        note: Some(serde_json::to_string(&l).expect("close line serialises")),
                        close: Some(l),
                    },
                    None => Charge {
                        legs: Vec::new(),
                        rating: None,
                        note: None,
                        close: None,
                    },
                })
            }
        }
    }
}

/// What an applied event adds to its tenant's invoice, in ledger order (the rule the
/// replay shares); a close is queued for its invoice to be finalised after the batch.
fn accrue(b: &mut Batch, known: &mut Known, ev: &Event, charge: &Charge, seq: i64, currency: &str) {
    let charged = match (&ev.data, &charge.rating) {
        (EventData::Usage(u), Some(r)) => Charged::Usage {
            provider: &u.provider,
            model: &u.model,
            rating: r,
        },
        (EventData::Adjustment(a), _) => Charged::Adjustment(a),
        (EventData::System(x), _) if x.kind == "period_close" => Charged::Close {
            period: &x.period,
            record: charge.close.as_ref(),
        },
        _ => Charged::Nothing,
    };
    let tenant = ev.tenant_id();
    let done = accrue_event(
        &mut b.accruals,
        &mut known.state.closed,
        tenant,
        &ev.id,
        ev.time,
        charged,
        !charge.legs.is_empty(),
    );
    if let Some(period) = done.closes {
        b.closes.push((
            tenant.to_string(),
            period,
            ev.id.clone(),
            seq,
            currency.to_string(),
        ));
    }
}

fn dead(
    d: &mut DeadRows,
    m: &Inbound,
    reason: &str,
    detail: String,
    ev: Option<&Event>,
    id: Option<String>,
) {
    d.reason.push(reason.into());
    // the detail may quote the message (a field's name) and a subject is the publisher's:
    // Postgres `text` cannot hold U+0000, which would fail the batch on every redelivery
    d.detail.push(without_nul(detail));
    d.subject.push(without_nul(m.subject.to_string()));
    d.tenant.push(ev.map(|e| e.tenant_id().to_string()));
    d.event_id
        .push(ev.map(|e| e.id.clone()).or(id).map(without_nul));
    d.stream_seq.push(m.stream_seq.map(|s| s as i64));
    d.payload.push(m.payload.to_vec());
}

/// `s` with each U+0000 written as the six characters `\u0000`.
fn without_nul(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "\\u0000")
    } else {
        s
    }
}

fn conflict(c: &mut ConflictRows, ev: &Event, kind: &str, existing: &str) {
    c.tenant.push(ev.tenant_id().into());
    c.event_id.push(ev.id.clone());
    c.kind.push(kind.into());
    c.existing.push(existing.into());
    c.payload
        .push(String::from_utf8_lossy(&ev.canonical).into_owned());
    c.hash.push(ev.payload_hash.to_vec());
}

/// Stage one event's row (also used by the benchmark's plain-Postgres baseline).
pub fn stage_event(r: &mut EventRows, ev: &Event, seq: i64) {
    stage_event_with(r, ev, ev.canonical.clone(), seq);
}

/// `stage_event` with the envelope's bytes handed over (the writer moves them out of the
/// event rather than copying them).
fn stage_event_with(r: &mut EventRows, ev: &Event, envelope: Vec<u8>, seq: i64) {
    r.tenant.push(ev.tenant_id().into());
    r.id.push(ev.id.clone());
    r.seq.push(seq);
    r.type_.push(ev.type_().into());
    r.source.push(ev.source.clone());
    r.occurred_at.push(ev.time);
    r.envelope.push(envelope);
    r.hash.push(ev.payload_hash.to_vec());
    let u = match &ev.data {
        EventData::Usage(u) => Some(u),
        EventData::Adjustment(_) | EventData::System(_) => None,
    };
    r.request_id.push(u.map(|u| u.request_id.clone()));
    r.model.push(u.map(|u| u.model.clone()));
    r.provider.push(u.map(|u| u.provider.clone()));
    r.api_key_id.push(u.and_then(|u| u.api_key_id.clone()));
    r.status.push(u.map(|u| u.status.as_str().to_string()));
    r.batch.push(u.map(|u| u.batch));
    let counts = u.map(|u| {
        [
            u.input_tokens,
            u.cached_input_tokens,
            u.cache_write_tokens,
            u.output_tokens,
            u.reasoning_tokens,
        ]
    });
    for (i, col) in r.tokens.iter_mut().enumerate() {
        col.push(counts.map(|c| c[i] as i64));
    }
}

fn stage_usage(b: &mut Batch, ev: &Event, u: &UsageData, r: &Rating) {
    b.proj.add_usage(RatedUsage {
        tenant: &u.tenant_id,
        occurred_at: ev.time,
        api_key_id: u.api_key_id.as_deref().unwrap_or_default(),
        provider: &u.provider,
        model: &u.model,
        tokens: u.rollup_tokens(),
        price: r.price,
        cost: r.cost,
        currency: &r.currency,
    });
}

fn stage_transfer(
    b: &mut Batch,
    ev: &Event,
    seq: i64,
    n: i16,
    currency: &str,
    leg: &Leg,
    charge: &Charge,
) {
    let (rating, note) = (charge.rating.as_ref(), charge.note.as_deref());
    let t = &mut b.transfers;
    let tenant = ev.tenant_id();
    t.tenant.push(tenant.into());
    t.seq.push(seq);
    t.leg.push(n);
    t.kind.push(leg.kind.into());
    t.debit.push(leg.debit.clone());
    t.credit.push(leg.credit.clone());
    t.amount.push(leg.amount);
    t.currency.push(currency.into());
    t.cost_version.push(rating.map(|r| r.cost_version_id));
    t.price_version
        .push(rating.and_then(|r| r.price_version_id));
    t.markup_rule.push(rating.and_then(|r| r.markup_rule_id));
    // the breakdown is stored once per event, on its first leg
    let breakdown = match (n, rating) {
        (0, Some(r)) => Some(serde_json::to_string(&r.breakdown()).expect("breakdown serialises")),
        (0, None) => note.map(str::to_string),
        _ => None,
    };
    t.breakdown.push(breakdown);
    b.proj
        .add_transfer(tenant, &leg.debit, &leg.credit, leg.amount, currency);
}
