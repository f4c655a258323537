//! Rebuild projections from the record (events + transfers, never by re-rating), and
//! verify: rebuilt == live, balances sum to zero, and re-rating under the recorded
//! versions reproduces every stored charge.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::{Executor, PgConnection, PgPool};

use crate::catalog::prices::load_book;
use crate::events::{self, EventData};
use crate::ledger::writer::terms_for;
use crate::pricing::{rate, CustomerPrice, PriceBook, Terms};

const REQUEST_SELECT: &str = "
    select e.tenant_id, e.request_id, e.id as event_id, e.seq, e.occurred_at,
      coalesce(e.data->>'api_key_id', '') as api_key_id, e.data->>'provider' as provider,
      e.data->>'model' as model, e.data->>'status' as status, (e.data->>'batch')::bool as batch,
      (e.data->>'input_tokens')::int8 as input_tokens,
      (e.data->>'cached_input_tokens')::int8 as cached_input_tokens,
      (e.data->>'cache_write_tokens')::int8 as cache_write_tokens,
      (e.data->>'output_tokens')::int8 as output_tokens,
      (e.data->>'reasoning_tokens')::int8 as reasoning_tokens,
      coalesce(p.price, 0) as price_amount, coalesce(p.cost, 0) as cost_amount, t.currency
    from events e
    join tenants t on t.id = e.tenant_id
    left join (select tenant_id, seq,
                 sum(amount) filter (where kind = 'usage_price') as price,
                 sum(amount) filter (where kind = 'usage_cost') as cost
               from transfers where kind in ('usage_price', 'usage_cost')
               group by tenant_id, seq) p on p.tenant_id = e.tenant_id and p.seq = e.seq
    where e.type = 'tokenledger.usage.v1'";

/// Fill `{prefix}request_views`, `{prefix}usage_rollups`, `{prefix}account_balances`
/// from the record. With `delta`, only events after `rebuild_hwm` are added (rollups
/// and balances are added to, not replaced).
async fn populate(c: &mut PgConnection, prefix: &str, delta: bool) -> sqlx::Result<()> {
    let (filter, tfilter) = if delta {
        (
            " and e.seq > coalesce((select last_seq from rebuild_hwm h where h.tenant_id = e.tenant_id), 0)",
            " where x.seq > coalesce((select last_seq from rebuild_hwm h where h.tenant_id = x.tenant_id), 0)",
        )
    } else {
        ("", "")
    };
    c.execute(
        format!("insert into {prefix}request_views select * from ({REQUEST_SELECT}{filter}) r")
            .as_str(),
    )
    .await?;
    c.execute(
        format!(
            "insert into {prefix}usage_rollups as u
             select tenant_id, (occurred_at at time zone 'UTC')::date, model, provider, api_key_id,
               count(*), sum(input_tokens), sum(cached_input_tokens), sum(cache_write_tokens),
               sum(output_tokens), sum(reasoning_tokens), sum(price_amount), sum(cost_amount), currency
             from ({REQUEST_SELECT}{filter}) r
             group by 1, 2, 3, 4, 5, currency
             on conflict (tenant_id, day, model, provider, api_key_id) do update set
               requests = u.requests + excluded.requests,
               input_tokens = u.input_tokens + excluded.input_tokens,
               cached_input_tokens = u.cached_input_tokens + excluded.cached_input_tokens,
               cache_write_tokens = u.cache_write_tokens + excluded.cache_write_tokens,
               output_tokens = u.output_tokens + excluded.output_tokens,
               reasoning_tokens = u.reasoning_tokens + excluded.reasoning_tokens,
               price_amount = u.price_amount + excluded.price_amount,
               cost_amount = u.cost_amount + excluded.cost_amount"
        )
        .as_str(),
    )
    .await?;
    c.execute(
        format!(
            "insert into {prefix}account_balances as b
             select tenant_id, account, currency, sum(amount) from (
               select x.tenant_id, x.debit_account as account, x.currency, x.amount from transfers x{tfilter}
               union all
               select x.tenant_id, x.credit_account, x.currency, -x.amount from transfers x{tfilter}
             ) m group by 1, 2, 3
             on conflict (tenant_id, account, currency) do update set balance = b.balance + excluded.balance"
        )
        .as_str(),
    )
    .await?;
    Ok(())
}

const TABLES: [&str; 3] = ["request_views", "usage_rollups", "account_balances"];

/// Rebuild every projection into shadow tables and swap them in. Safe while `serve`
/// runs: the bulk of the work reads a snapshot; the swap locks `tenant_heads` (so
/// writers pause), adds what was appended since the snapshot, and renames.
/// Must run as the owning role.
pub async fn rebuild(owner: &PgPool) -> anyhow::Result<()> {
    let mut c = owner.acquire().await?;
    c.execute("begin isolation level repeatable read").await?;
    for t in TABLES {
        c.execute(format!("drop table if exists rebuild_{t}; create table rebuild_{t} (like {t} including all)").as_str())
            .await?;
    }
    c.execute("drop table if exists rebuild_hwm; create table rebuild_hwm as select tenant_id, last_seq from tenant_heads")
        .await?;
    populate(&mut c, "rebuild_", false).await?;
    c.execute("commit").await?;

    c.execute("begin").await?;
    c.execute("lock table tenant_heads in exclusive mode")
        .await?;
    populate(&mut c, "rebuild_", true).await?;
    for t in TABLES {
        c.execute(
            format!(
                "drop table {t}; alter table rebuild_{t} rename to {t};
                 grant select, insert, update on {t} to tokenledger_app"
            )
            .as_str(),
        )
        .await?;
    }
    c.execute("drop table rebuild_hwm").await?;
    c.execute("commit").await?;
    Ok(())
}

/// What `verify` found; empty `differences` means the ledger checks out.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub events_rerated: u64,
    pub differences: Vec<String>,
}

/// Rebuild into scratch tables and compare with live, check the balance invariant, and
/// re-rate every usage event under its recorded versions. Read-only on live data.
pub async fn verify(owner: &PgPool) -> anyhow::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut c = owner.acquire().await?;
    c.execute("begin isolation level repeatable read").await?;
    for t in TABLES {
        c.execute(
            format!("create temp table scratch_{t} (like {t} including all) on commit drop")
                .as_str(),
        )
        .await?;
    }
    populate(&mut c, "scratch_", false).await?;
    for t in TABLES {
        for (a, b, side) in [
            (t.to_string(), format!("scratch_{t}"), "live only"),
            (format!("scratch_{t}"), t.to_string(), "rebuilt only"),
        ] {
            let rows: Vec<(String,)> = sqlx::query_as(&format!(
                "select row_to_json(x)::text from (select * from {a} except select * from {b}) x limit 5"
            ))
            .fetch_all(&mut *c)
            .await?;
            for (r,) in rows {
                report.differences.push(format!("{t}: {side}: {r}"));
            }
        }
    }
    let unbalanced: Vec<(String, Decimal)> = sqlx::query_as(
        "select currency::text, sum(balance) from account_balances group by currency having sum(balance) <> 0",
    )
    .fetch_all(&mut *c)
    .await?;
    for (cur, sum) in unbalanced {
        report
            .differences
            .push(format!("balances in {cur} sum to {sum}, not zero"));
    }
    let book = load_book(owner).await?;
    rerate(&mut c, &book, &mut report).await?;
    c.execute("rollback").await?;
    Ok(report)
}

type RecordRow = (
    String,
    String,
    String,
    chrono::DateTime<chrono::Utc>,
    serde_json::Value,
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Decimal,
    Decimal,
    i64,
);

async fn rerate(
    c: &mut PgConnection,
    book: &PriceBook,
    report: &mut VerifyReport,
) -> anyhow::Result<()> {
    let mut rows = sqlx::query_as::<_, RecordRow>(
        "select e.tenant_id, e.id, e.source, e.occurred_at, e.data, t.currency::text,
           max(x.cost_version_id), max(x.price_version_id), max(x.markup_rule_id),
           coalesce(sum(x.amount) filter (where x.kind = 'usage_price'), 0),
           coalesce(sum(x.amount) filter (where x.kind = 'usage_cost'), 0),
           count(x.id)
         from events e join tenants t on t.id = e.tenant_id
         left join transfers x on x.tenant_id = e.tenant_id and x.seq = e.seq
         where e.type = 'tokenledger.usage.v1'
         group by e.tenant_id, e.id, e.source, e.occurred_at, e.data, t.currency
         order by e.tenant_id, e.id",
    )
    .fetch(&mut *c);
    let mut found = BTreeMap::new();
    while let Some(row) = rows.try_next().await? {
        report.events_rerated += 1;
        if let Some(d) = rerate_one(book, row) {
            found.insert(found.len(), d);
            if found.len() >= 20 {
                break;
            }
        }
    }
    report.differences.extend(found.into_values());
    Ok(())
}

fn rerate_one(book: &PriceBook, row: RecordRow) -> Option<String> {
    let (tenant, id, source, at, data, currency, cost_v, price_v, markup_id, price, cost, n) = row;
    let env = serde_json::json!({"specversion": "1.0", "id": id, "source": source,
        "type": events::USAGE_V1, "time": at.to_rfc3339(), "data": data});
    let far = chrono::DateTime::<chrono::Utc>::MAX_UTC - chrono::Duration::days(1);
    let ev = match events::parse(env, far) {
        Ok(ev) => ev,
        Err(r) => {
            return Some(format!(
                "event {tenant}/{id}: stored data no longer validates: {}",
                r.summary()
            ))
        }
    };
    let EventData::Usage(u) = &ev.data else {
        return None;
    };
    let in_force = terms_for(book, u, &currency, at);
    let terms = if n == 0 {
        match in_force {
            Ok(t) => t,
            Err(e) => return Some(format!("event {tenant}/{id}: {e}")),
        }
    } else {
        let Some(cost_version) = cost_v.and_then(|v| book.version_by_id(v)) else {
            return Some(format!(
                "event {tenant}/{id}: recorded cost version {cost_v:?} not found"
            ));
        };
        let price = match (price_v, markup_id) {
            (Some(p), _) => match book.version_by_id(p) {
                Some(v) => CustomerPrice::Explicit(v),
                None => {
                    return Some(format!(
                        "event {tenant}/{id}: recorded price version {p} not found"
                    ))
                }
            },
            (None, m) => CustomerPrice::Markup(m.and_then(|m| book.markup_by_id(m))),
        };
        let recorded = Terms {
            cost: cost_version,
            price,
        };
        if let Ok(now) = in_force {
            let same = now.cost.id == recorded.cost.id
                && match (now.price, recorded.price) {
                    (CustomerPrice::Explicit(a), CustomerPrice::Explicit(b)) => a.id == b.id,
                    (CustomerPrice::Markup(a), CustomerPrice::Markup(b)) => {
                        a.map(|r| r.id) == b.map(|r| r.id)
                    }
                    _ => false,
                };
            if !same {
                return Some(format!(
                    "event {tenant}/{id}: recorded versions are not the ones in force at {at}"
                ));
            }
        }
        recorded
    };
    match rate(u, terms) {
        Ok(r) if r.price == price && r.cost == cost => None,
        Ok(r) => Some(format!(
            "event {tenant}/{id}: re-rated price {} cost {} but recorded price {price} cost {cost}",
            r.price, r.cost
        )),
        Err(e) => Some(format!("event {tenant}/{id}: re-rating failed: {e}")),
    }
}
