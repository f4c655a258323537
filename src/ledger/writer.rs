//! The ledger writer: applies a batch of bus messages in ONE transaction.
//!
//! Order of work per batch: decode and validate; lock the batch's tenants (ledger order
//! is assigned under that lock); find duplicates and conflicts; rate; append events,
//! transfers, conflicts and dead letters; update projections; commit. The caller acks
//! only after `apply` returned, i.e. after the commit.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::accounts::{adjustment_leg, usage_legs, Leg};
use super::store::{
    self, ConflictRows, DeadRows, EventRows, Projections, RequestRow, TransferRows,
};
use crate::catalog::prices::{book_stamp, load_book};
use crate::events::{parse_bytes, Event, EventData, UsageData};
use crate::pricing::{rate, CustomerPrice, PriceBook, PricingError, Rating, Side, Terms};

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
    stamp: (i64, i64),
}

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

struct Batch {
    events: EventRows,
    transfers: TransferRows,
    conflicts: ConflictRows,
    dead: DeadRows,
    proj: Projections,
    heads: HashMap<String, i64>,
}

impl Writer {
    pub fn new(pool: PgPool, subject_prefix: &str) -> Writer {
        Writer {
            pool,
            subject_prefix: subject_prefix.to_string(),
            book: PriceBook::default(),
            stamp: (-1, -1),
        }
    }

    fn expected_subject(&self, tenant: &str) -> String {
        if self.subject_prefix.is_empty() {
            format!("usage.v1.{tenant}")
        } else {
            format!("{}.usage.v1.{tenant}", self.subject_prefix)
        }
    }

    /// Apply a batch; returns one outcome per message, in order. On error nothing was
    /// committed and nothing may be acked.
    pub async fn apply(
        &mut self,
        msgs: &[Inbound],
        now: DateTime<Utc>,
    ) -> sqlx::Result<Vec<Outcome>> {
        let mut outcomes = vec![Outcome::Applied; msgs.len()];
        let mut b = Batch {
            events: EventRows::default(),
            transfers: TransferRows::default(),
            conflicts: ConflictRows::default(),
            dead: DeadRows::default(),
            proj: Projections::default(),
            heads: HashMap::new(),
        };
        // 1. Decode and validate.
        let mut parsed: Vec<(usize, Event)> = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            match parse_bytes(&m.payload, now) {
                Ok(ev) if m.subject != self.expected_subject(ev.tenant_id()) => {
                    let detail = format!(
                        "subject {} does not match tenant {}",
                        m.subject,
                        ev.tenant_id()
                    );
                    dead(&mut b.dead, m, "subject_mismatch", detail, Some(&ev));
                    outcomes[i] = Outcome::DeadLettered("subject_mismatch");
                }
                Ok(ev) => parsed.push((i, ev)),
                Err(rej) => {
                    b.dead.reason.push("invalid_event".into());
                    b.dead.detail.push(rej.summary());
                    b.dead.subject.push(m.subject.clone());
                    b.dead.tenant.push(None);
                    b.dead.event_id.push(rej.id.clone());
                    b.dead.stream_seq.push(m.stream_seq.map(|s| s as i64));
                    b.dead.payload.push(m.payload.to_vec());
                    outcomes[i] = Outcome::DeadLettered("invalid_event");
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        // 2. The price book, reloaded only when it changed.
        let stamp = book_stamp(&mut *tx).await?;
        if stamp != self.stamp {
            self.book = load_book(&mut tx).await?;
            self.stamp = stamp;
        }
        // 3. Lock tenants; 4. find what already exists.
        let mut tenants: Vec<String> = parsed
            .iter()
            .map(|(_, e)| e.tenant_id().to_string())
            .collect();
        tenants.sort();
        tenants.dedup();
        let locked = store::lock_tenants(&mut tx, &tenants).await?;
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
        let mut seen: HashMap<(String, String), Vec<u8>> = HashMap::new();
        let mut req_owner: HashMap<(String, String), String> = HashMap::new();
        for (t, id, hash, rq) in store::existing(&mut tx, &keys, &reqs).await? {
            if let Some(r) = rq {
                req_owner.insert((t.clone(), r), id.clone());
            }
            seen.insert((t, id), hash);
        }
        // 5. Decide, rate and stage every event in message order.
        for (i, ev) in parsed {
            let m = &msgs[i];
            let tenant = ev.tenant_id().to_string();
            let Some((_, currency)) = locked.get(&tenant) else {
                dead(
                    &mut b.dead,
                    m,
                    "unknown_tenant",
                    format!("tenant {tenant:?} does not exist"),
                    Some(&ev),
                );
                outcomes[i] = Outcome::DeadLettered("unknown_tenant");
                continue;
            };
            let key = (tenant.clone(), ev.id.clone());
            if let Some(h) = seen.get(&key) {
                outcomes[i] = if h.as_slice() == ev.payload_hash {
                    Outcome::Duplicate
                } else {
                    conflict(&mut b.conflicts, &ev, "payload_differs", &ev.id);
                    Outcome::Conflict
                };
                continue;
            }
            if let Some(r) = ev.request_id() {
                if let Some(owner) = req_owner.get(&(tenant.clone(), r.to_string())) {
                    conflict(&mut b.conflicts, &ev, "request_id_taken", owner);
                    outcomes[i] = Outcome::Conflict;
                    continue;
                }
            }
            let (legs, rating): (Vec<Leg>, Option<Rating>) = match &ev.data {
                EventData::Usage(u) => {
                    match terms_for(&self.book, u, currency, ev.time).and_then(|t| rate(u, t)) {
                        Ok(r) => (usage_legs(&u.provider, &r), Some(r)),
                        Err(e) => {
                            let reason = match e {
                                PricingError::Unpriced { .. } => "unpriced_model",
                                PricingError::Overflow => "rating_failed",
                            };
                            dead(&mut b.dead, m, reason, e.to_string(), Some(&ev));
                            outcomes[i] = Outcome::DeadLettered(reason);
                            continue;
                        }
                    }
                }
                EventData::Adjustment(a) => {
                    if &a.currency != currency {
                        let detail = format!(
                            "adjustment in {} for a tenant billed in {currency}",
                            a.currency
                        );
                        dead(&mut b.dead, m, "currency_mismatch", detail, Some(&ev));
                        outcomes[i] = Outcome::DeadLettered("currency_mismatch");
                        continue;
                    }
                    (vec![adjustment_leg(a)], None)
                }
            };
            let head = b.heads.entry(tenant.clone()).or_insert(locked[&tenant].0);
            *head += 1;
            let seq = *head;
            if let (EventData::Usage(u), Some(r)) = (&ev.data, &rating) {
                stage_request(&mut b, &ev, u, r, seq);
            }
            stage_event(&mut b.events, &ev, seq);
            for (n, leg) in legs.iter().enumerate() {
                stage_transfer(&mut b, &ev, seq, n as i16, currency, leg, rating.as_ref());
            }
            seen.insert(key, ev.payload_hash.to_vec());
            if let Some(r) = ev.request_id() {
                req_owner.insert((tenant.clone(), r.to_string()), ev.id.clone());
            }
        }
        // 6. Append and project, then commit.
        store::insert_events(&mut tx, &b.events).await?;
        store::insert_transfers(&mut tx, &b.transfers).await?;
        store::insert_conflicts(&mut tx, &b.conflicts).await?;
        store::insert_dead(&mut tx, &b.dead).await?;
        store::apply_projections(&mut tx, &b.proj, &store::LIVE).await?;
        store::advance_heads(&mut tx, &b.heads).await?;
        tx.commit().await?;
        Ok(outcomes)
    }
}

fn dead(d: &mut DeadRows, m: &Inbound, reason: &str, detail: String, ev: Option<&Event>) {
    d.reason.push(reason.into());
    d.detail.push(detail);
    d.subject.push(m.subject.clone());
    d.tenant.push(ev.map(|e| e.tenant_id().to_string()));
    d.event_id.push(ev.map(|e| e.id.clone()));
    d.stream_seq.push(m.stream_seq.map(|s| s as i64));
    d.payload.push(m.payload.to_vec());
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
    r.tenant.push(ev.tenant_id().into());
    r.id.push(ev.id.clone());
    r.seq.push(seq);
    r.type_.push(ev.type_().into());
    r.source.push(ev.source.clone());
    r.occurred_at.push(ev.time);
    r.envelope.push(ev.canonical.clone());
    r.hash.push(ev.payload_hash.to_vec());
    let u = match &ev.data {
        EventData::Usage(u) => Some(u),
        EventData::Adjustment(_) => None,
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

fn stage_request(b: &mut Batch, ev: &Event, u: &UsageData, r: &Rating, seq: i64) {
    b.proj.add_usage(RequestRow {
        tenant: u.tenant_id.clone(),
        request_id: u.request_id.clone(),
        event_id: ev.id.clone(),
        seq,
        occurred_at: ev.time,
        api_key_id: u.api_key_id.clone().unwrap_or_default(),
        provider: u.provider.clone(),
        model: u.model.clone(),
        status: u.status.as_str().into(),
        batch: u.batch,
        tokens: [
            u.input_tokens as i64,
            u.cached_input_tokens as i64,
            u.cache_write_tokens as i64,
            u.output_tokens as i64,
            u.reasoning_tokens as i64,
        ],
        price: r.price,
        cost: r.cost,
        currency: r.currency.clone(),
    });
}

fn stage_transfer(
    b: &mut Batch,
    ev: &Event,
    seq: i64,
    n: i16,
    currency: &str,
    leg: &Leg,
    rating: Option<&Rating>,
) {
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
    let breakdown = match (n, &ev.data, rating) {
        (0, _, Some(r)) => {
            Some(serde_json::to_string(&r.breakdown()).expect("breakdown serialises"))
        }
        (0, EventData::Adjustment(a), None) => {
            Some(serde_json::to_string(a).expect("adjustment serialises"))
        }
        _ => None,
    };
    t.breakdown.push(breakdown);
    b.proj
        .add_transfer(tenant, &leg.debit, &leg.credit, leg.amount, currency);
}
