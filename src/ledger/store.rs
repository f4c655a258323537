//! Batched SQL for the append transaction: arrays + unnest, one statement for the
//! whole batch, never one round trip per event.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;

use super::state::TenantState;
use crate::pricing::commitments::CommitmentPosition;
use crate::pricing::TierPosition;

/// Rows of `events`, column by column.
#[derive(Default)]
pub struct EventRows {
    pub tenant: Vec<String>,
    pub id: Vec<String>,
    pub seq: Vec<i64>,
    pub type_: Vec<String>,
    pub source: Vec<String>,
    pub occurred_at: Vec<DateTime<Utc>>,
    pub envelope: Vec<Vec<u8>>,
    pub hash: Vec<Vec<u8>>,
    pub request_id: Vec<Option<String>>,
    pub model: Vec<Option<String>>,
    pub provider: Vec<Option<String>>,
    pub api_key_id: Vec<Option<String>>,
    pub status: Vec<Option<String>>,
    pub batch: Vec<Option<bool>>,
    /// input, cached input, cache write, output, reasoning
    pub tokens: [Vec<Option<i64>>; 5],
}

#[derive(Default)]
pub struct TransferRows {
    pub tenant: Vec<String>,
    pub seq: Vec<i64>,
    pub leg: Vec<i16>,
    pub kind: Vec<String>,
    pub debit: Vec<String>,
    pub credit: Vec<String>,
    pub amount: Vec<Decimal>,
    pub currency: Vec<String>,
    pub cost_version: Vec<Option<i64>>,
    pub price_version: Vec<Option<i64>>,
    pub markup_rule: Vec<Option<i64>>,
    pub breakdown: Vec<Option<String>>,
}

/// One rated usage event, as it counts in the usage rollup.
#[derive(Clone, Debug)]
pub struct RatedUsage<'a> {
    pub tenant: &'a str,
    pub occurred_at: DateTime<Utc>,
    pub api_key_id: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
    pub tokens: [i64; 5],
    pub price: Decimal,
    pub cost: Decimal,
    pub currency: &'a str,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RollupAgg {
    pub day: NaiveDate,
    pub requests: i64,
    pub tokens: [i64; 5],
    pub price: Decimal,
    pub cost: Decimal,
    pub currency: String,
}

/// Projection deltas accumulated over a batch.
///
/// Keyed by their parts joined with NUL — rollups (tenant, day, model, provider, API key),
/// balances (tenant, account, currency) — and looked up through a reused buffer: an event
/// adds to a key the batch has seen before far more often than it opens one, and a tuple
/// of `String`s would allocate every part for every lookup (that was 6% of the writer's
/// CPU). No part holds a control character (tenants, models, providers and API key ids
/// are validated printable; accounts and currencies are ours), so NUL cannot occur inside
/// a part and the joined keys sort as the tuples would.
#[derive(Default)]
pub struct Projections {
    rollups: BTreeMap<String, RollupAgg>,
    balances: BTreeMap<String, Decimal>,
    key: String,
}

/// Split a joined projection key into its `N` parts.
fn parts<const N: usize>(k: &str) -> [&str; N] {
    let mut it = k.split('\0');
    std::array::from_fn(|_| it.next().expect("a projection key part"))
}

impl Projections {
    pub fn add_usage(&mut self, r: RatedUsage<'_>) {
        let day = r.occurred_at.date_naive();
        // the day as its number, offset to be positive for any date chrono holds (RFC 3339
        // allows year 0000, before the CE epoch), in ten digits: it sorts as the date does
        let n = i64::from(day.num_days_from_ce()) + 1_000_000_000;
        self.key.clear();
        let _ = write!(
            self.key,
            "{}\0{n:010}\0{}\0{}\0{}",
            r.tenant, r.model, r.provider, r.api_key_id
        );
        let agg = match self.rollups.get_mut(self.key.as_str()) {
            Some(a) => a,
            None => self.rollups.entry(self.key.clone()).or_insert(RollupAgg {
                day,
                currency: r.currency.to_string(),
                ..RollupAgg::default()
            }),
        };
        agg.requests += 1;
        for i in 0..5 {
            agg.tokens[i] += r.tokens[i];
        }
        agg.price += r.price;
        agg.cost += r.cost;
    }

    pub fn add_transfer(
        &mut self,
        tenant: &str,
        debit: &str,
        credit: &str,
        amount: Decimal,
        currency: &str,
    ) {
        for (account, delta) in [(debit, amount), (credit, -amount)] {
            self.key.clear();
            let _ = write!(self.key, "{tenant}\0{account}\0{currency}");
            match self.balances.get_mut(self.key.as_str()) {
                Some(b) => *b += delta,
                None => {
                    self.balances.insert(self.key.clone(), delta);
                }
            }
        }
    }

    /// (tenant, model, provider, API key) and the aggregate of each rollup row, in key order.
    pub fn rollups(&self) -> impl Iterator<Item = ([&str; 4], &RollupAgg)> {
        self.rollups.iter().map(|(k, a)| {
            let [t, _, m, p, ak] = parts::<5>(k);
            ([t, m, p, ak], a)
        })
    }

    /// (tenant, account, currency) and the delta of each balance, in key order.
    pub fn balances(&self) -> impl Iterator<Item = ([&str; 3], Decimal)> {
        self.balances.iter().map(|(k, d)| (parts::<3>(k), *d))
    }
}

/// Lock the heads of these tenants (in id order, so writers never deadlock) and return
/// (last_seq, currency) for each known tenant.
/// What `lock_tenants` found: (last_seq, currency) per existing tenant, and the price
/// book's stamp (newest price version and markup rule ids) read in the same round trip.
pub type Locked = (HashMap<String, (i64, String)>, Option<BookStamp>);

/// The terms version: a counter every insert into a commercial-term table (prices,
/// markups, tier schedules, budgets, routing classes, commitments, reservations) bumps
/// in commit order; the price book changed exactly when it moved.
pub type BookStamp = i64;

/// The SQL expression of the book stamp.
pub const BOOK_STAMP: &str = "(select n from terms_version where id = 1)";

pub async fn lock_tenants(
    c: &mut PgConnection,
    tenants: &[String],
) -> sqlx::Result<(Locked, HashSet<(String, String)>)> {
    // with each tenant, the periods it has closed (its `period-close:` events): usage of a
    // closed period is billed late on the next open invoice
    let rows: Vec<(String, i64, String, i64, Vec<String>)> = sqlx::query_as(&format!(
        "select h.tenant_id, h.last_seq, t.currency::text, {BOOK_STAMP},
           array(select substr(e.id, 14) from events e where e.tenant_id = h.tenant_id
                 and e.id >= 'period-close:' and e.id < 'period-close;'
                 and e.type = 'tokenledger.system.v1')
         from tenant_heads h
         join tenants t on t.id = h.tenant_id
         where h.tenant_id = any($1) order by h.tenant_id for update of h"
    ))
    .bind(tenants)
    .fetch_all(c)
    .await?;
    let stamp = rows.first().map(|r| r.3);
    let closed = rows
        .iter()
        .flat_map(|r| r.4.iter().map(|p| (r.0.clone(), p.clone())))
        .collect();
    Ok((
        (
            rows.into_iter().map(|(t, s, c, ..)| (t, (s, c))).collect(),
            stamp,
        ),
        closed,
    ))
}

/// Serialise authorisations per tenant (a transaction-scoped advisory lock, taken in
/// tenant order) without taking the writer's lock; returns currencies and the book stamp.
pub async fn lock_tenants_for_authorization(
    c: &mut PgConnection,
    tenants: &[String],
) -> sqlx::Result<Locked> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(&format!(
        // the locks are taken in array order (the caller sorts), so two processes can
        // never wait on each other in a cycle
        "with l as (select count(pg_advisory_xact_lock(
                      hashtextextended('tokenledger.authorize.' || k.t, 0))) as n
                    from unnest($1::text[]) as k(t))
         select t.id, t.currency::text, {BOOK_STAMP}
         from tenants t, l where t.id = any($1) order by t.id"
    ))
    .bind(tenants)
    .fetch_all(c)
    .await?;
    let stamp = rows.first().map(|r| r.2);
    Ok((
        rows.into_iter().map(|(t, c, _)| (t, (0, c))).collect(),
        stamp,
    ))
}

/// Existing events matching these keys, or holding these request ids:
/// (tenant, id, payload_hash, request_id).
pub async fn existing(
    c: &mut PgConnection,
    keys: &[(String, String)],
    requests: &[(String, String)],
) -> sqlx::Result<Vec<(String, String, Vec<u8>, Option<String>)>> {
    if keys.is_empty() {
        return Ok(vec![]);
    }
    sqlx::query_as(
        // one index probe per key: `limit 1` keeps each lateral subquery from being
        // flattened into a join, which with stale statistics became a scan of every
        // usage event (found with auto_explain: 3.6 ms per small batch, growing)
        "select x.tenant_id, x.id, x.payload_hash, x.request_id
         from unnest($1::text[], $2::text[]) as k(t, i)
         cross join lateral (select e.tenant_id, e.id, e.payload_hash, e.request_id from events e
                             where e.tenant_id = k.t and e.id = k.i limit 1) x
         union all
         select x.tenant_id, x.id, x.payload_hash, x.request_id
         from unnest($3::text[], $4::text[]) as k(t, r)
         cross join lateral (select e.tenant_id, e.id, e.payload_hash, e.request_id from events e
                             where e.tenant_id = k.t and e.request_id = k.r
                               and e.type = 'tokenledger.usage.v1' limit 1) x",
    )
    .bind(keys.iter().map(|k| k.0.clone()).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1.clone()).collect::<Vec<_>>())
    .bind(requests.iter().map(|k| k.0.clone()).collect::<Vec<_>>())
    .bind(requests.iter().map(|k| k.1.clone()).collect::<Vec<_>>())
    .fetch_all(c)
    .await
}

#[derive(Default)]
pub struct ConflictRows {
    pub tenant: Vec<String>,
    pub event_id: Vec<String>,
    pub kind: Vec<String>,
    pub existing: Vec<String>,
    pub payload: Vec<String>,
    pub hash: Vec<Vec<u8>>,
}

#[derive(Default)]
pub struct DeadRows {
    pub reason: Vec<String>,
    pub detail: Vec<String>,
    pub subject: Vec<String>,
    pub tenant: Vec<Option<String>>,
    pub event_id: Vec<Option<String>>,
    pub stream_seq: Vec<Option<i64>>,
    pub payload: Vec<Vec<u8>>,
}

/// Adds a rollup row onto an existing one (the table aliased `r`); shared with rebuild.
#[macro_export]
macro_rules! rollup_add {
    () => {
        "on conflict (tenant_id, day, model, provider, api_key_id) do update set
           requests = r.requests + excluded.requests,
           input_tokens = r.input_tokens + excluded.input_tokens,
           cached_input_tokens = r.cached_input_tokens + excluded.cached_input_tokens,
           cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
           output_tokens = r.output_tokens + excluded.output_tokens,
           reasoning_tokens = r.reasoning_tokens + excluded.reasoning_tokens,
           price_amount = r.price_amount + excluded.price_amount,
           cost_amount = r.cost_amount + excluded.cost_amount"
    };
}

/// Everything a batch appends and projects.
pub struct Rows<'a> {
    pub events: &'a EventRows,
    pub transfers: &'a TransferRows,
    pub conflicts: &'a ConflictRows,
    pub dead: &'a DeadRows,
    pub proj: &'a Projections,
    pub heads: &'a HashMap<String, i64>,
    pub tiers: &'a TierPositions,
    pub budgets: &'a BudgetSpends,
    pub alerts: &'a AlertRows,
    pub settlements: &'a SettlementRows,
    pub commitments: &'a CommitmentPositions,
    pub reservations: &'a ReservationMinutes,
    pub provider_minutes: &'a ProviderMinutes,
    pub provider_costs: &'a ProviderCosts,
    pub accruals: &'a crate::invoices::accrue::Accruals,
}

/// The physical rows of `open_holds` holding these (hold id[], tenant id[]) pairs, one index
/// probe per pair, for a delete by `ctid = any(...)` (a tid scan). `open_holds` churns — a
/// row per request in flight, deleted when its usage settles it — so it is mostly dead
/// tuples between autovacuum runs; a plan made while it was small joined it by a scan of
/// every page, for every batch (seen: 216 pages of 29,000 dead rows after a minute of
/// router traffic). `offset 0` keeps the lateral subquery a per-pair probe, and by the hold
/// id alone: given the tenant too, the planner ANDed in a bitmap of the tenant's index
/// entries, dead ones included — every open and settled hold of the tenant, per probe.
#[macro_export]
macro_rules! open_hold_rows {
    ($holds:literal, $tenants:literal) => {
        concat!(
            "select p.c from unnest(",
            $holds,
            "::uuid[], ",
            $tenants,
            "::text[]) as x(h, t)
             cross join lateral (select o2.ctid as c, o2.tenant_id as t from open_holds o2
                                 where o2.hold_id = x.h offset 0) p
             where p.t = x.t"
        )
    };
}

/// One statement appends the whole batch: events, transfers, conflicts, dead letters,
/// rollup and balance upserts and the new tenant heads, as data-modifying CTEs over
/// arrays. One round trip instead of seven keeps small batches (low rates) fast. The
/// inserts of a row per event (events, transfers) and the largest upserts (rollups,
/// balances, invoice accruals) unnest their arrays in the select list (a ProjectSet,
/// which yields rows as it goes), not in `from unnest(a, b, ...)`, which first copies
/// every array into a tuplestore of its own (see the README's *Benchmark*).
const APPEND_START: &str = concat!("with
  ev as (insert into events (tenant_id, id, seq, type, source, occurred_at, envelope, payload_hash,
           request_id, model, provider, api_key_id, status, batch, input_tokens, cached_input_tokens,
           cache_write_tokens, output_tokens, reasoning_tokens)
         select unnest($1::text[]), unnest($2::text[]), unnest($3::int8[]), unnest($4::text[]),
           unnest($5::text[]), unnest($6::timestamptz[]), unnest($7::bytea[]), unnest($8::bytea[]),
           unnest($9::text[]), unnest($10::text[]), unnest($11::text[]), unnest($12::text[]),
           unnest($13::text[]), unnest($14::bool[]), unnest($15::int8[]), unnest($16::int8[]),
           unnest($17::int8[]), unnest($18::int8[]), unnest($19::int8[])),
  tr as (insert into transfers (tenant_id, seq, leg, kind, debit_account, credit_account,
           amount, currency, cost_version_id, price_version_id, markup_rule_id, breakdown)
         select unnest($20::text[]), unnest($21::int8[]), unnest($22::int2[]), unnest($23::text[]),
           unnest($24::text[]), unnest($25::text[]), unnest($26::numeric[]), unnest($27::text[]),
           unnest($28::int8[]), unnest($29::int8[]), unnest($30::int8[]), unnest($31::text[])::json),
  cf as (insert into event_conflicts (tenant_id, event_id, kind, existing_event_id, payload, payload_hash)
         select t, e, k, x, p::jsonb, h from unnest($32::text[], $33::text[], $34::text[], $35::text[],
           $36::text[], $37::bytea[]) as u(t, e, k, x, p, h)
         on conflict (tenant_id, event_id, payload_hash) do nothing),
  dl as (insert into dead_letters (reason, detail, subject, tenant_id, event_id, stream_seq, payload)
         select * from unnest($38::text[], $39::text[], $40::text[], $41::text[], $42::text[],
           $43::int8[], $44::bytea[])),
  ru as (insert into usage_rollups as r (tenant_id, day, model, provider, api_key_id, requests,
           input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens,
           price_amount, cost_amount, currency)
         select unnest($45::text[]), unnest($46::date[]), unnest($47::text[]), unnest($48::text[]),
           unnest($49::text[]), unnest($50::int8[]), unnest($51::int8[]), unnest($52::int8[]),
           unnest($53::int8[]), unnest($54::int8[]), unnest($55::int8[]), unnest($56::numeric[]),
           unnest($57::numeric[]), unnest($58::text[])
         ", rollup_add!(), "),
  ba as (insert into account_balances as b (tenant_id, account, currency, balance)
         select unnest($59::text[]), unnest($60::text[]), unnest($61::text[]), unnest($62::numeric[])
         on conflict (tenant_id, account, currency) do update set balance = b.balance + excluded.balance),
  hd as (update tenant_heads h set last_seq = x.s
         from unnest($63::text[], $64::int8[]) as x(t, s) where h.tenant_id = x.t),
  tp as (insert into tier_positions as p (tenant_id, schedule, period, units, list, charged)
         select * from unnest($65::text[], $66::text[], $67::text[], $68::numeric[],
           $69::numeric[], $70::numeric[])
         on conflict (tenant_id, schedule, period) do update set units = excluded.units,
           list = excluded.list, charged = excluded.charged),
  bs as (insert into budget_spend as s (tenant_id, budget, period, spent)
         select * from unnest($71::text[], $72::text[], $73::text[], $74::numeric[])
         on conflict (tenant_id, budget, period) do update set spent = excluded.spent),
  af as (insert into alert_facts (tenant_id, type, unique_key, payload, occurred_at)
         select t, y, k, p::jsonb, o from unnest($75::text[], $76::text[], $77::text[], $78::text[],
           $79::timestamptz[]) as x(t, y, k, p, o)
         on conflict (tenant_id, type, unique_key) do nothing),
  st as (insert into auth_settlements (hold_id, tenant_id, event_id)
         select h, t, e from unnest($80::uuid[], $81::text[], $82::text[]) as x(h, t, e)
         on conflict (hold_id, tenant_id) do nothing),
  oh as (delete from open_holds o where o.ctid = any(array(", open_hold_rows!("$80", "$81"), "))),
  cp as (insert into commitment_positions as p (tenant_id, commitment, period, drawn, closed)
         select * from unnest($83::text[], $84::text[], $85::text[], $86::numeric[], $87::bool[])
         on conflict (tenant_id, commitment, period) do update set drawn = excluded.drawn,
           closed = excluded.closed),
  ru2 as (insert into reservation_usage as u (tenant_id, reservation, minute, covered)
         select * from unnest($88::text[], $89::text[], $90::text[], $91::int8[])
         on conflict (tenant_id, reservation, minute) do update set covered = excluded.covered),
  pm as (insert into provider_usage_minutes as m (provider, model, minute, tokens, lane)
         select * from unnest($92::text[], $93::text[], $94::text[], $95::int8[], $130::int2[])
         on conflict (provider, model, minute, lane) do update set tokens = m.tokens + excluded.tokens),
  pc as (insert into provider_period_costs as m (provider, model, period, currency, list_cost, lane)
         select * from unnest($96::text[], $97::text[], $98::text[], $99::text[], $100::numeric[],
           $131::int2[])
         on conflict (provider, model, period, currency, lane)
           do update set list_cost = m.list_cost + excluded.list_cost),
");

/// The batch's statement: `APPEND_START` and the invoice accrual upsert.
static APPEND: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use crate::invoices::accrue::{Columns, COLUMNS, ON_CONFLICT};
    format!(
        "{APPEND_START}
  ia as (insert into invoice_accruals as a (tenant_id, period, line_key, {COLUMNS})
         select {} {ON_CONFLICT})
select 1",
        Columns::select_list(101)
    )
});

/// Tokens per (provider, model, minute, lane) a batch adds (shared across the tenants of
/// a lane, so added to, not set; a BTreeMap, so rows are locked in key order).
pub type ProviderMinutes = BTreeMap<(String, String, String, i16), i64>;

/// List cost per (provider, model, period, currency, lane) a batch adds under our provider
/// commitments (shared across the tenants of a lane: added to, in key order).
pub type ProviderCosts = BTreeMap<(String, String, String, String, i16), Decimal>;

/// Settlements of pre-authorisation holds by the usage events carrying their ids.
#[derive(Default)]
pub struct SettlementRows {
    pub hold: Vec<uuid::Uuid>,
    pub tenant: Vec<String>,
    pub event_id: Vec<String>,
}

/// Budget spend after a batch, keyed (tenant, budget name, period): absolute values.
/// A BTreeMap, so rows are written (and locked) in key order.
pub type BudgetSpends = BTreeMap<(String, String, String), Decimal>;

/// Alert facts, column by column.
#[derive(Default)]
pub struct AlertRows {
    pub tenant: Vec<String>,
    pub type_: Vec<String>,
    pub key: Vec<String>,
    pub payload: Vec<String>,
    pub occurred_at: Vec<DateTime<Utc>>,
}

/// Tier positions of `tiered` tenants and budget spend of `budgeted` tenants in these
/// periods, in one round trip.
/// Whose state a batch needs: tenants with tier schedules, budgets, commitments and
/// reservations, and the periods and minutes its events fall in.
pub struct StateKeys<'a> {
    pub tiered: &'a [String],
    pub budgeted: &'a [String],
    pub committed: &'a [String],
    pub reserving: &'a [String],
    pub periods: &'a [String],
    pub minutes: &'a [String],
}

pub async fn load_state(c: &mut PgConnection, k: StateKeys<'_>) -> sqlx::Result<TenantState> {
    let rows: Vec<(i32, String, String, String, Decimal, Decimal, Decimal)> = sqlx::query_as(
        "select 0, tenant_id, schedule, period, units, list, charged from tier_positions
         where tenant_id = any($1) and period = any($5)
         union all
         select 1, tenant_id, budget, period, spent, 0, 0 from budget_spend
         where tenant_id = any($2) and period = any($5)
         union all
         select 2, tenant_id, commitment, period, drawn, case when closed then 1 else 0 end, 0
         from commitment_positions where tenant_id = any($3) and period = any($5)
         union all
         select 3, tenant_id, reservation, minute, covered, 0, 0
         from reservation_usage where tenant_id = any($4) and minute = any($6)",
    )
    .bind(k.tiered)
    .bind(k.budgeted)
    .bind(k.committed)
    .bind(k.reserving)
    .bind(k.periods)
    .bind(k.minutes)
    .fetch_all(c)
    .await?;
    let mut st = TenantState::default();
    for (kind, t, name, p, a, list, charged) in rows {
        match kind {
            0 => {
                st.tiers.insert(
                    (t, name, p),
                    TierPosition {
                        units: a,
                        list,
                        charged,
                    },
                );
            }
            1 => {
                st.budgets.insert((t, name, p), a);
            }
            3 => {
                st.reservations
                    .insert((t, name, p), u64::try_from(a).unwrap_or_default());
            }
            _ => {
                st.commitments.insert(
                    (t, name, p),
                    CommitmentPosition {
                        drawn: a,
                        closed: !list.is_zero(),
                    },
                );
            }
        }
    }
    Ok(st)
}

/// Covered tokens per (tenant, reservation, minute) after a batch: absolute values.
pub type ReservationMinutes = HashMap<(String, String, String), u64>;

/// Commitment positions after a batch: absolute values.
pub type CommitmentPositions = HashMap<(String, String, String), CommitmentPosition>;

/// Tier positions after a batch, keyed (tenant, schedule name, period): absolute values,
/// computed under the tenant's lock from the position before the batch.
pub type TierPositions = HashMap<(String, String, String), TierPosition>;

pub async fn append(c: &mut PgConnection, r: Rows<'_>) -> sqlx::Result<()> {
    let (e, t, cf, d, p) = (r.events, r.transfers, r.conflicts, r.dead, r.proj);
    let (keys, vals): (Vec<[&str; 4]>, Vec<&RollupAgg>) = p.rollups().unzip();
    let balances: Vec<([&str; 3], Decimal)> = p.balances().collect();
    let tok = |i: usize| vals.iter().map(|a| a.tokens[i]).collect::<Vec<_>>();
    let q = sqlx::query(APPEND.as_str())
        .bind(&e.tenant)
        .bind(&e.id)
        .bind(&e.seq)
        .bind(&e.type_)
        .bind(&e.source)
        .bind(&e.occurred_at)
        .bind(&e.envelope)
        .bind(&e.hash)
        .bind(&e.request_id)
        .bind(&e.model)
        .bind(&e.provider)
        .bind(&e.api_key_id)
        .bind(&e.status)
        .bind(&e.batch)
        .bind(&e.tokens[0])
        .bind(&e.tokens[1])
        .bind(&e.tokens[2])
        .bind(&e.tokens[3])
        .bind(&e.tokens[4]);
    let q = q
        .bind(&t.tenant)
        .bind(&t.seq)
        .bind(&t.leg)
        .bind(&t.kind)
        .bind(&t.debit)
        .bind(&t.credit)
        .bind(&t.amount)
        .bind(&t.currency)
        .bind(&t.cost_version)
        .bind(&t.price_version)
        .bind(&t.markup_rule)
        .bind(&t.breakdown);
    let q = q
        .bind(&cf.tenant)
        .bind(&cf.event_id)
        .bind(&cf.kind)
        .bind(&cf.existing)
        .bind(&cf.payload)
        .bind(&cf.hash)
        .bind(&d.reason)
        .bind(&d.detail)
        .bind(&d.subject)
        .bind(&d.tenant)
        .bind(&d.event_id)
        .bind(&d.stream_seq)
        .bind(&d.payload);
    let q = q
        .bind(keys.iter().map(|k| k[0]).collect::<Vec<_>>())
        .bind(vals.iter().map(|a| a.day).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k[1]).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k[2]).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k[3]).collect::<Vec<_>>())
        .bind(vals.iter().map(|a| a.requests).collect::<Vec<_>>())
        .bind(tok(0))
        .bind(tok(1))
        .bind(tok(2))
        .bind(tok(3))
        .bind(tok(4))
        .bind(vals.iter().map(|a| a.price).collect::<Vec<_>>())
        .bind(vals.iter().map(|a| a.cost).collect::<Vec<_>>())
        .bind(vals.iter().map(|a| a.currency.as_str()).collect::<Vec<_>>());
    let q = q
        .bind(balances.iter().map(|b| b.0[0]).collect::<Vec<_>>())
        .bind(balances.iter().map(|b| b.0[1]).collect::<Vec<_>>())
        .bind(balances.iter().map(|b| b.0[2]).collect::<Vec<_>>())
        .bind(balances.iter().map(|b| b.1).collect::<Vec<_>>())
        .bind(r.heads.keys().cloned().collect::<Vec<_>>())
        .bind(r.heads.values().copied().collect::<Vec<_>>());
    let tk: Vec<_> = r.tiers.keys().collect();
    let tv: Vec<_> = r.tiers.values().collect();
    let q = q
        .bind(tk.iter().map(|k| k.0.clone()).collect::<Vec<_>>())
        .bind(tk.iter().map(|k| k.1.clone()).collect::<Vec<_>>())
        .bind(tk.iter().map(|k| k.2.clone()).collect::<Vec<_>>())
        .bind(tv.iter().map(|p| p.units).collect::<Vec<_>>())
        .bind(tv.iter().map(|p| p.list).collect::<Vec<_>>())
        .bind(tv.iter().map(|p| p.charged).collect::<Vec<_>>());
    let (b, a) = (r.budgets, r.alerts);
    let q = q
        .bind(b.keys().map(|k| k.0.clone()).collect::<Vec<_>>())
        .bind(b.keys().map(|k| k.1.clone()).collect::<Vec<_>>())
        .bind(b.keys().map(|k| k.2.clone()).collect::<Vec<_>>())
        .bind(b.values().copied().collect::<Vec<_>>())
        .bind(&a.tenant)
        .bind(&a.type_)
        .bind(&a.key)
        .bind(&a.payload)
        .bind(&a.occurred_at)
        .bind(&r.settlements.hold)
        .bind(&r.settlements.tenant)
        .bind(&r.settlements.event_id);
    let ck: Vec<_> = r.commitments.keys().collect();
    let cv: Vec<_> = r.commitments.values().collect();
    let q = q
        .bind(ck.iter().map(|k| k.0.clone()).collect::<Vec<_>>())
        .bind(ck.iter().map(|k| k.1.clone()).collect::<Vec<_>>())
        .bind(ck.iter().map(|k| k.2.clone()).collect::<Vec<_>>())
        .bind(cv.iter().map(|p| p.drawn).collect::<Vec<_>>())
        .bind(cv.iter().map(|p| p.closed).collect::<Vec<_>>());
    let rk: Vec<_> = r.reservations.keys().collect();
    let q = q
        .bind(rk.iter().map(|k| k.0.clone()).collect::<Vec<_>>())
        .bind(rk.iter().map(|k| k.1.clone()).collect::<Vec<_>>())
        .bind(rk.iter().map(|k| k.2.clone()).collect::<Vec<_>>())
        .bind(
            r.reservations
                .values()
                .map(|n| *n as i64)
                .collect::<Vec<_>>(),
        );
    let pm = r.provider_minutes;
    let q = q
        .bind(pm.keys().map(|k| k.0.clone()).collect::<Vec<_>>())
        .bind(pm.keys().map(|k| k.1.clone()).collect::<Vec<_>>())
        .bind(pm.keys().map(|k| k.2.clone()).collect::<Vec<_>>())
        .bind(pm.values().copied().collect::<Vec<_>>());
    let pc = r.provider_costs;
    let q = q
        .bind(pc.keys().map(|k| k.0.clone()).collect::<Vec<_>>())
        .bind(pc.keys().map(|k| k.1.clone()).collect::<Vec<_>>())
        .bind(pc.keys().map(|k| k.2.clone()).collect::<Vec<_>>())
        .bind(pc.keys().map(|k| k.3.clone()).collect::<Vec<_>>())
        .bind(pc.values().copied().collect::<Vec<_>>());
    let q = crate::invoices::accrue::Columns::of(r.accruals.iter()).bind(q);
    // after the invoice columns ($101-$129): the lanes of `pm` and `pc`
    let q = q
        .bind(pm.keys().map(|k| k.3).collect::<Vec<_>>())
        .bind(pc.keys().map(|k| k.4).collect::<Vec<_>>());
    q.execute(c).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn usage<'a>(tenant: &'a str, day: u32, model: &'a str, key: &'a str) -> RatedUsage<'a> {
        RatedUsage {
            tenant,
            occurred_at: Utc.with_ymd_and_hms(2026, 11, day, 23, 59, 59).unwrap(),
            api_key_id: key,
            provider: "openai",
            model,
            tokens: [10, 4, 0, 5, 1],
            price: Decimal::new(3, 2),
            cost: Decimal::new(2, 2),
            currency: "USD",
        }
    }

    #[test]
    fn projections_add_up_per_key_and_come_out_in_the_tuples_order() {
        let mut p = Projections::default();
        // with a printable separator such as '|', "acme|…" would sort after "acme-b|…";
        // NUL keeps the tuples' order ("acme" before "acme-b", "gpt-4o" before "gpt-4o-mini")
        for (t, d, m, k) in [
            ("acme", 2, "gpt-4o", ""),
            ("acme", 2, "gpt-4o", ""),
            ("acme", 2, "gpt-4o", "key1"),
            ("acme", 10, "gpt-4o", ""),
            ("acme-b", 1, "gpt-4o", ""),
            ("acme", 2, "gpt-4o-mini", ""),
        ] {
            p.add_usage(usage(t, d, m, k));
        }
        let rows: Vec<_> = p.rollups().map(|(k, a)| (k, a.day, a.requests)).collect();
        let day = |d| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
        assert_eq!(
            rows,
            vec![
                (["acme", "gpt-4o", "openai", ""], day(2), 2),
                (["acme", "gpt-4o", "openai", "key1"], day(2), 1),
                (["acme", "gpt-4o-mini", "openai", ""], day(2), 1),
                (["acme", "gpt-4o", "openai", ""], day(10), 1),
                (["acme-b", "gpt-4o", "openai", ""], day(1), 1),
            ]
        );
        // days before the CE epoch stay apart, and in order
        let mut q = Projections::default();
        for (y, m, d) in [(0, 12, 31), (0, 12, 30), (1, 1, 1)] {
            let mut u = usage("acme", 1, "gpt-4o", "");
            u.occurred_at = Utc.with_ymd_and_hms(y, m, d, 0, 0, 0).unwrap();
            q.add_usage(u);
        }
        let days: Vec<_> = q.rollups().map(|(_, a)| a.day.to_string()).collect();
        assert_eq!(days, ["0000-12-30", "0000-12-31", "0001-01-01"]);
        let (_, first) = p.rollups().next().unwrap();
        assert_eq!(first.tokens, [20, 8, 0, 10, 2]);
        assert_eq!(first.price, Decimal::new(6, 2));
        assert_eq!(first.cost, Decimal::new(4, 2));
        assert_eq!(first.currency, "USD");

        p.add_transfer("acme", "receivable", "revenue", Decimal::new(5, 1), "USD");
        p.add_transfer("acme", "receivable", "revenue", Decimal::new(25, 2), "USD");
        p.add_transfer("acme", "cogs", "payable:openai", Decimal::new(1, 1), "USD");
        p.add_transfer("acme-b", "receivable", "revenue", Decimal::ONE, "EUR");
        let b: Vec<_> = p.balances().collect();
        assert_eq!(
            b,
            vec![
                (["acme", "cogs", "USD"], Decimal::new(1, 1)),
                (["acme", "payable:openai", "USD"], Decimal::new(-1, 1)),
                (["acme", "receivable", "USD"], Decimal::new(75, 2)),
                (["acme", "revenue", "USD"], Decimal::new(-75, 2)),
                (["acme-b", "receivable", "EUR"], Decimal::ONE),
                (["acme-b", "revenue", "EUR"], -Decimal::ONE),
            ]
        );
    }
}
