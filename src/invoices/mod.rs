//! Invoices: the per-period accrual projection the writer keeps, the draft and the
//! finalised (immutable, numbered, hashed) invoice, credit/debit notes, and the replay of
//! the record that rebuilds the accruals and checks invoices against the ledger.

pub mod accrue;
pub mod document;
pub mod reconcile;
pub mod store;

use std::collections::{HashMap, HashSet};

use futures::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::PgConnection;

use crate::events::AdjustmentData;
use crate::ledger::accounts::RECEIVABLE;
use crate::ledger::state::CloseRecord;
use crate::pricing::Breakdown;
use accrue::{accrue_event, closed_by, Accruals, Charged};

/// The record replayed in ledger order: every invoice line, and what the ledger moved per
/// (tenant, invoice period) — into the receivable, and out of commitment accounts by
/// drawdowns (billed to the receivable only at the close).
#[derive(Default)]
pub struct Replay {
    pub accruals: Accruals,
    pub receivable: HashMap<(String, String), Decimal>,
    pub drawdown: HashMap<(String, String), Decimal>,
    /// (tenant, period) closed by the end of the replay.
    pub closed: HashSet<(String, String)>,
    pub problems: Vec<String>,
}

/// One event with one of its legs (or none).
#[derive(sqlx::FromRow)]
struct Leg {
    tenant_id: String,
    seq: i64,
    id: String,
    #[sqlx(rename = "type")]
    type_: String,
    occurred_at: chrono::DateTime<chrono::Utc>,
    provider: Option<String>,
    model: Option<String>,
    kind: Option<String>,
    debit_account: Option<String>,
    credit_account: Option<String>,
    amount: Option<Decimal>,
    breakdown: Option<String>,
}

/// Replay the record (or, with `hwm_table`, only what was appended after each tenant's
/// `last_seq` in that table, with the periods closed up to it) into invoice lines.
pub async fn replay(c: &mut PgConnection, hwm_table: Option<&str>) -> anyhow::Result<Replay> {
    let mut out = Replay::default();
    let after = |alias: &str| {
        match hwm_table {
        Some(t) => format!(
            "{alias}.seq > coalesce((select last_seq from {t} h where h.tenant_id = {alias}.tenant_id), 0)"
        ),
        None => "true".into(),
    }
    };
    if let Some(t) = hwm_table {
        let closed: Vec<(String, String)> = sqlx::query_as(&format!(
            "select tenant_id, substr(id, 14) from events e
             where id >= 'period-close:' and id < 'period-close;' and e.type = 'tokenledger.system.v1'
               and e.seq <= coalesce((select last_seq from {t} h where h.tenant_id = e.tenant_id), 0)"
        ))
        .fetch_all(&mut *c)
        .await?;
        out.closed.extend(closed);
    }
    let sql = format!(
        "select e.tenant_id, e.seq, e.id, e.type, e.occurred_at, e.provider, e.model, x.kind,
           x.debit_account, x.credit_account, x.amount, x.breakdown::text as breakdown
         from events e
         left join transfers x on x.tenant_id = e.tenant_id and x.seq = e.seq
         where {} and (x.seq is not null
           or (e.id >= 'period-close:' and e.id < 'period-close;' and e.type = 'tokenledger.system.v1'))
         order by e.tenant_id, e.seq, x.leg",
        after("e")
    );
    let mut rows = sqlx::query_as::<_, Leg>(&sql).fetch(&mut *c);
    let mut group: Vec<Leg> = Vec::new();
    while let Some(l) = rows.try_next().await? {
        if group
            .first()
            .is_some_and(|g| g.tenant_id != l.tenant_id || g.seq != l.seq)
        {
            apply(&mut out, std::mem::take(&mut group));
        }
        group.push(l);
    }
    if !group.is_empty() {
        apply(&mut out, group);
    }
    Ok(out)
}

fn apply(out: &mut Replay, legs: Vec<Leg>) {
    let first = &legs[0];
    let who = format!("event {}/{}", first.tenant_id, first.id);
    let moved = first.kind.is_some();
    let text = first.breakdown.as_deref().unwrap_or("null");
    // the charge as recorded, read back from the event's first leg
    let (rating, adjustment, record) = match first.type_.as_str() {
        "tokenledger.usage.v1" if moved => (
            serde_json::from_str::<Breakdown>(text)
                .map_err(|e| e.to_string())
                .and_then(|b| b.expand().map_err(|e| e.to_string()))
                .map_err(|e| format!("{who}: breakdown unreadable: {e}"))
                .map(Some),
            Ok(None),
            Ok(None),
        ),
        "tokenledger.adjustment.v1" => (
            Ok(None),
            serde_json::from_str::<AdjustmentData>(text)
                .map(Some)
                .map_err(|e| format!("{who}: adjustment unreadable: {e}")),
            Ok(None),
        ),
        _ if moved => (
            Ok(None),
            Ok(None),
            serde_json::from_str::<CloseRecord>(text)
                .map(Some)
                .map_err(|e| format!("{who}: close record unreadable: {e}")),
        ),
        _ => (Ok(None), Ok(None), Ok(None)),
    };
    let (rating, adjustment, record) = match (rating, adjustment, record) {
        (Ok(r), Ok(a), Ok(c)) => (r, a, c),
        (r, a, c) => {
            out.problems
                .extend([r.err(), a.err(), c.err()].into_iter().flatten());
            (None, None, None)
        }
    };
    let close = (first.type_ == "tokenledger.system.v1")
        .then(|| closed_by(&first.id))
        .flatten();
    let charged = match (&rating, &adjustment, close) {
        (Some(r), _, _) => Charged::Usage {
            provider: first.provider.as_deref().unwrap_or_default(),
            model: first.model.as_deref().unwrap_or_default(),
            rating: r,
        },
        (_, Some(a), _) => Charged::Adjustment(a),
        (_, _, Some(period)) => Charged::Close {
            period,
            record: record.as_ref(),
        },
        _ => Charged::Nothing,
    };
    let done = accrue_event(
        &mut out.accruals,
        &mut out.closed,
        &first.tenant_id,
        &first.id,
        first.occurred_at,
        charged,
        moved,
    );
    if let Some(period) = done.billed_to {
        let key = (first.tenant_id.clone(), period);
        for l in &legs {
            let amount = l.amount.unwrap_or_default();
            if l.debit_account.as_deref() == Some(RECEIVABLE) {
                *out.receivable.entry(key.clone()).or_default() += amount;
            }
            if l.credit_account.as_deref() == Some(RECEIVABLE) {
                *out.receivable.entry(key.clone()).or_default() -= amount;
            }
            if l.kind.as_deref() == Some("commitment_drawdown") {
                *out.drawdown.entry(key.clone()).or_default() += amount;
            }
        }
    }
}

/// Write replayed lines into `table` (added to what is there).
pub async fn write_accruals(c: &mut PgConnection, table: &str, a: &Accruals) -> sqlx::Result<()> {
    let entries: Vec<_> = a.iter().collect();
    for chunk in entries.chunks(10_000) {
        let sql = format!(
            "insert into {table} as a (tenant_id, period, line_key, {})
             select * from {} {}",
            accrue::COLUMNS,
            accrue::Columns::unnest(1),
            accrue::ON_CONFLICT
        );
        accrue::Columns::of(chunk.iter().copied())
            .bind(sqlx::query(&sql))
            .execute(&mut *c)
            .await?;
    }
    Ok(())
}

/// Check invoices and accruals against a full replay of the record: the live projection
/// equals the replay line by line; every finalised invoice's document hashes to its stored
/// hash, carries exactly the replayed lines of its period at full precision, rounds each
/// once by the rule, totals the rounded lines, and (its exact total) equals what the
/// ledger moved into the receivable for that period; an open period's lines equal its
/// receivable movements plus its commitment drawdowns. Returns every difference.
pub async fn check(
    c: &mut PgConnection,
    r: &Replay,
    period: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let mut diffs: Vec<String> = r.problems.clone();
    let want = |p: &str| period.is_none_or(|x| x == p);
    // live projection vs replay
    let live: Vec<store::StoredRow> = sqlx::query_as(&format!(
        "{} where ($1::text is null or period = $1)",
        store::select_accruals()
    ))
    .bind(period)
    .fetch_all(&mut *c)
    .await?;
    let mut replayed: HashMap<(String, String, String), &accrue::Accrued> = r
        .accruals
        .iter()
        .filter(|(k, _)| want(&k.1))
        .map(|(k, v)| ((k.0.clone(), k.1.clone(), k.2.text()), v))
        .collect();
    for row in live {
        let (t, p, key) = (
            row.tenant_id.clone(),
            row.period.clone(),
            row.line_key.clone(),
        );
        let live = row.row().totals;
        match replayed.remove(&(t.clone(), p.clone(), key.clone())) {
            Some(x) if *x == live => {}
            Some(x) => diffs.push(format!(
                "invoice_accruals {t} {p} [{key}]: live {live:?}, replayed {x:?}"
            )),
            None => diffs.push(format!(
                "invoice_accruals {t} {p} [{key}]: live only ({}, {})",
                live.quantity, live.amount
            )),
        }
    }
    for ((t, p, key), x) in replayed {
        diffs.push(format!(
            "invoice_accruals {t} {p} [{key}]: replayed only ({}, {})",
            x.quantity, x.amount
        ));
    }
    // per (tenant, period): lines vs the ledger
    let mut sums: HashMap<(String, String), Decimal> = HashMap::new();
    for (k, v) in &r.accruals {
        if want(&k.1) {
            *sums.entry((k.0.clone(), k.1.clone())).or_default() += v.amount;
        }
    }
    let mut keys: HashSet<(String, String)> = sums.keys().cloned().collect();
    keys.extend(r.receivable.keys().filter(|k| want(&k.1)).cloned());
    for key in keys {
        let lines = sums.get(&key).copied().unwrap_or_default();
        let recv = r.receivable.get(&key).copied().unwrap_or_default();
        let drawn = r.drawdown.get(&key).copied().unwrap_or_default();
        let ledger = if r.closed.contains(&key) {
            recv
        } else {
            recv + drawn
        };
        if lines != ledger {
            diffs.push(format!(
                "invoice lines of {} {} sum to {lines}, the ledger moved {ledger} (receivable {recv}, drawdowns {drawn})",
                key.0, key.1
            ));
        }
    }
    // finalised invoices vs the replay
    let invoices: Vec<(String, String, String, String, String, Decimal, String)> = sqlx::query_as(
        "select number, tenant_id, period, currency::text, document::text, total, content_hash from invoices
         where ($1::text is null or period = $1) order by serial",
    )
    .bind(period)
    .fetch_all(&mut *c)
    .await?;
    for (number, t, p, cur, doc, total, hash) in invoices {
        let h = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(doc.as_bytes()));
        if h != hash {
            diffs.push(format!(
                "invoice {number}: document hashes to {h}, stored {hash}"
            ));
        }
        let inv: document::Invoice = match serde_json::from_str(&doc) {
            Ok(i) => i,
            Err(e) => {
                diffs.push(format!("invoice {number}: document unreadable: {e}"));
                continue;
            }
        };
        let mut rows: Vec<document::AccrualRow> = r
            .accruals
            .iter()
            .filter(|(k, _)| k.0 == t && k.1 == p)
            .map(|(k, v)| document::AccrualRow {
                key: k.2.clone(),
                totals: v.clone(),
            })
            .collect();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        let rebuilt = document::build(&t, &p, &cur, rows);
        if rebuilt.lines != inv.lines {
            diffs.push(format!(
                "invoice {number}: its {} lines differ from the {} the record gives for {t} {p}",
                inv.lines.len(),
                rebuilt.lines.len()
            ));
        }
        let rounded: Decimal = inv.lines.iter().map(|l| l.amount).sum();
        if rounded != inv.total || total != inv.total {
            diffs.push(format!(
                "invoice {number}: total {} is not the sum of its rounded lines {rounded}",
                inv.total
            ));
        }
        if inv
            .lines
            .iter()
            .any(|l| l.amount != document::round_line(l.amount_exact, &cur))
        {
            diffs.push(format!(
                "invoice {number}: a line is not rounded by the rule"
            ));
        }
        let recv = r
            .receivable
            .get(&(t.clone(), p.clone()))
            .copied()
            .unwrap_or_default();
        if inv.total_exact != recv {
            diffs.push(format!(
                "invoice {number}: exact total {} but the ledger moved {recv} into {t}'s receivable for {p}",
                inv.total_exact
            ));
        }
    }
    Ok(diffs)
}
