//! Batched SQL for the append transaction: one statement per table per batch
//! (arrays + unnest), never one round trip per event.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sqlx::PgConnection;

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
pub struct RequestRow {
    pub tenant: String,
    pub request_id: String,
    pub event_id: String,
    pub seq: i64,
    pub occurred_at: DateTime<Utc>,
    pub api_key_id: String,
    pub provider: String,
    pub model: String,
    pub status: String,
    pub batch: bool,
    pub tokens: [i64; 5],
    pub price: Decimal,
    pub cost: Decimal,
    pub currency: String,
}

pub type RollupKey = (String, NaiveDate, String, String, String);

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RollupAgg {
    pub requests: i64,
    pub tokens: [i64; 5],
    pub price: Decimal,
    pub cost: Decimal,
    pub currency: String,
}

/// Projection deltas accumulated over a batch.
#[derive(Default)]
pub struct Projections {
    pub rollups: BTreeMap<RollupKey, RollupAgg>,
    pub balances: BTreeMap<(String, String, String), Decimal>,
}

impl Projections {
    pub fn add_usage(&mut self, r: RequestRow) {
        let key = (
            r.tenant.clone(),
            r.occurred_at.date_naive(),
            r.model.clone(),
            r.provider.clone(),
            r.api_key_id.clone(),
        );
        let agg = self.rollups.entry(key).or_default();
        agg.requests += 1;
        for i in 0..5 {
            agg.tokens[i] += r.tokens[i];
        }
        agg.price += r.price;
        agg.cost += r.cost;
        agg.currency = r.currency;
    }

    pub fn add_transfer(
        &mut self,
        tenant: &str,
        debit: &str,
        credit: &str,
        amount: Decimal,
        currency: &str,
    ) {
        *self
            .balances
            .entry((tenant.into(), debit.into(), currency.into()))
            .or_default() += amount;
        *self
            .balances
            .entry((tenant.into(), credit.into(), currency.into()))
            .or_default() -= amount;
    }
}

pub async fn insert_events(c: &mut PgConnection, r: &EventRows) -> sqlx::Result<()> {
    if r.id.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into events (tenant_id, id, seq, type, source, occurred_at, envelope, payload_hash,
           request_id, model, provider, api_key_id, status, batch, input_tokens, cached_input_tokens,
           cache_write_tokens, output_tokens, reasoning_tokens)
         select * from unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[],
           $6::timestamptz[], $7::bytea[], $8::bytea[], $9::text[], $10::text[], $11::text[],
           $12::text[], $13::text[], $14::bool[], $15::int8[], $16::int8[], $17::int8[], $18::int8[],
           $19::int8[])",
    )
    .bind(&r.tenant)
    .bind(&r.id)
    .bind(&r.seq)
    .bind(&r.type_)
    .bind(&r.source)
    .bind(&r.occurred_at)
    .bind(&r.envelope)
    .bind(&r.hash)
    .bind(&r.request_id)
    .bind(&r.model)
    .bind(&r.provider)
    .bind(&r.api_key_id)
    .bind(&r.status)
    .bind(&r.batch)
    .bind(&r.tokens[0])
    .bind(&r.tokens[1])
    .bind(&r.tokens[2])
    .bind(&r.tokens[3])
    .bind(&r.tokens[4])
    .execute(c)
    .await?;
    Ok(())
}

pub async fn insert_transfers(c: &mut PgConnection, r: &TransferRows) -> sqlx::Result<()> {
    if r.seq.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into transfers (tenant_id, seq, leg, kind, debit_account, credit_account,
           amount, currency, cost_version_id, price_version_id, markup_rule_id, breakdown)
         select t, s, l, k, d, c, a, cu, cv, pv, mr, b::json
         from unnest($1::text[], $2::int8[], $3::int2[], $4::text[], $5::text[], $6::text[],
                     $7::numeric[], $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::text[])
           as x(t, s, l, k, d, c, a, cu, cv, pv, mr, b)",
    )
    .bind(&r.tenant)
    .bind(&r.seq)
    .bind(&r.leg)
    .bind(&r.kind)
    .bind(&r.debit)
    .bind(&r.credit)
    .bind(&r.amount)
    .bind(&r.currency)
    .bind(&r.cost_version)
    .bind(&r.price_version)
    .bind(&r.markup_rule)
    .bind(&r.breakdown)
    .execute(c)
    .await?;
    Ok(())
}

/// Apply projection deltas. `tables` names the three projection tables, so rebuild can
/// write shadow tables with the same code.
pub async fn apply_projections(
    c: &mut PgConnection,
    p: &Projections,
    tables: &ProjectionTables,
) -> sqlx::Result<()> {
    upsert_rollups(c, &p.rollups, tables.rollups).await?;
    upsert_balances(c, &p.balances, tables.balances).await
}

pub struct ProjectionTables {
    pub rollups: &'static str,
    pub balances: &'static str,
}

pub const LIVE: ProjectionTables = ProjectionTables {
    rollups: "usage_rollups",
    balances: "account_balances",
};

async fn upsert_rollups(
    c: &mut PgConnection,
    m: &BTreeMap<RollupKey, RollupAgg>,
    table: &str,
) -> sqlx::Result<()> {
    if m.is_empty() {
        return Ok(());
    }
    let keys: Vec<&RollupKey> = m.keys().collect();
    let vals: Vec<&RollupAgg> = m.values().collect();
    let tok = |i: usize| vals.iter().map(|a| a.tokens[i]).collect::<Vec<_>>();
    sqlx::query(&format!(
        "insert into {table} as r (tenant_id, day, model, provider, api_key_id, requests, input_tokens,
           cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, price_amount,
           cost_amount, currency)
         select * from unnest($1::text[], $2::date[], $3::text[], $4::text[], $5::text[], $6::int8[],
           $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::numeric[], $13::numeric[],
           $14::text[])
         on conflict (tenant_id, day, model, provider, api_key_id) do update set
           requests = r.requests + excluded.requests,
           input_tokens = r.input_tokens + excluded.input_tokens,
           cached_input_tokens = r.cached_input_tokens + excluded.cached_input_tokens,
           cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
           output_tokens = r.output_tokens + excluded.output_tokens,
           reasoning_tokens = r.reasoning_tokens + excluded.reasoning_tokens,
           price_amount = r.price_amount + excluded.price_amount,
           cost_amount = r.cost_amount + excluded.cost_amount"
    ))
    .bind(keys.iter().map(|k| k.0.clone()).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.1).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.2.clone()).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.3.clone()).collect::<Vec<_>>())
    .bind(keys.iter().map(|k| k.4.clone()).collect::<Vec<_>>())
    .bind(vals.iter().map(|a| a.requests).collect::<Vec<_>>())
    .bind(tok(0))
    .bind(tok(1))
    .bind(tok(2))
    .bind(tok(3))
    .bind(tok(4))
    .bind(vals.iter().map(|a| a.price).collect::<Vec<_>>())
    .bind(vals.iter().map(|a| a.cost).collect::<Vec<_>>())
    .bind(vals.iter().map(|a| a.currency.clone()).collect::<Vec<_>>())
    .execute(c)
    .await?;
    Ok(())
}

async fn upsert_balances(
    c: &mut PgConnection,
    m: &BTreeMap<(String, String, String), Decimal>,
    table: &str,
) -> sqlx::Result<()> {
    if m.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "insert into {table} as b (tenant_id, account, currency, balance)
         select * from unnest($1::text[], $2::text[], $3::text[], $4::numeric[])
         on conflict (tenant_id, account, currency) do update set balance = b.balance + excluded.balance"
    ))
    .bind(m.keys().map(|k| k.0.clone()).collect::<Vec<_>>())
    .bind(m.keys().map(|k| k.1.clone()).collect::<Vec<_>>())
    .bind(m.keys().map(|k| k.2.clone()).collect::<Vec<_>>())
    .bind(m.values().copied().collect::<Vec<_>>())
    .execute(c)
    .await?;
    Ok(())
}

/// Lock the heads of these tenants (in id order, so writers never deadlock) and return
/// (last_seq, currency) for each known tenant.
pub async fn lock_tenants(
    c: &mut PgConnection,
    tenants: &[String],
) -> sqlx::Result<HashMap<String, (i64, String)>> {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(
        "select h.tenant_id, h.last_seq, t.currency::text from tenant_heads h
         join tenants t on t.id = h.tenant_id
         where h.tenant_id = any($1) order by h.tenant_id for update of h",
    )
    .bind(tenants)
    .fetch_all(c)
    .await?;
    Ok(rows.into_iter().map(|(t, s, c)| (t, (s, c))).collect())
}

pub async fn advance_heads(c: &mut PgConnection, heads: &HashMap<String, i64>) -> sqlx::Result<()> {
    if heads.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "update tenant_heads h set last_seq = x.s
         from unnest($1::text[], $2::int8[]) as x(t, s) where h.tenant_id = x.t",
    )
    .bind(heads.keys().cloned().collect::<Vec<_>>())
    .bind(heads.values().copied().collect::<Vec<_>>())
    .execute(c)
    .await?;
    Ok(())
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
        "select e.tenant_id, e.id, e.payload_hash, e.request_id from events e
           join unnest($1::text[], $2::text[]) as k(t, i) on e.tenant_id = k.t and e.id = k.i
         union all
         select e.tenant_id, e.id, e.payload_hash, e.request_id from events e
           join unnest($3::text[], $4::text[]) as k(t, r) on e.tenant_id = k.t and e.request_id = k.r
          and e.type = 'tokenledger.usage.v1'",
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

pub async fn insert_conflicts(c: &mut PgConnection, r: &ConflictRows) -> sqlx::Result<()> {
    if r.tenant.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into event_conflicts (tenant_id, event_id, kind, existing_event_id, payload, payload_hash)
         select t, e, k, x, p::jsonb, h from unnest($1::text[], $2::text[], $3::text[], $4::text[],
           $5::text[], $6::bytea[]) as u(t, e, k, x, p, h)
         on conflict (tenant_id, event_id, payload_hash) do nothing",
    )
    .bind(&r.tenant)
    .bind(&r.event_id)
    .bind(&r.kind)
    .bind(&r.existing)
    .bind(&r.payload)
    .bind(&r.hash)
    .execute(c)
    .await?;
    Ok(())
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

pub async fn insert_dead(c: &mut PgConnection, r: &DeadRows) -> sqlx::Result<()> {
    if r.reason.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "insert into dead_letters (reason, detail, subject, tenant_id, event_id, stream_seq, payload)
         select * from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[],
           $7::bytea[])",
    )
    .bind(&r.reason)
    .bind(&r.detail)
    .bind(&r.subject)
    .bind(&r.tenant)
    .bind(&r.event_id)
    .bind(&r.stream_seq)
    .bind(&r.payload)
    .execute(c)
    .await?;
    Ok(())
}
