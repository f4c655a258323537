//! (i) Invoices: a month of usage across many tenants applied by the ledger writer while
//! one tenant's draft invoice is read over and over (p50/p99 against a bare `select 1`
//! round trip on the same pool, measured in the same loop); then the month's close for
//! every tenant through the real path (close events on JetStream, applied by the writer,
//! each finalising an invoice) — elapsed time and this process's peak memory — against a
//! single SQL scan summing the month's transfers per tenant (what a close that scanned
//! the events would at least cost).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;

use crate::bench::{fresh, percentiles, spawn_writer, BenchArgs};
use crate::ledger::writer::{Inbound, Writer};
use crate::loadgen;
use crate::settings::Settings;

/// This process's resident set and its peak since the last reset, in MiB (Linux).
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

pub async fn invoices(s0: &Settings, a: &BenchArgs) -> anyhow::Result<()> {
    let tenants = a.invoice_tenants.max(1);
    let n = a.events;
    let (s, pool, b) = fresh(s0, "i", tenants).await?;
    let now = chrono::Utc::now();
    let this = crate::pricing::period_of(now);
    let start =
        crate::pricing::tiers::period_start(&this).expect("period") - chrono::Duration::days(1);
    let period = crate::pricing::period_of(start);
    let p0 = crate::pricing::tiers::period_start(&period).expect("period");
    let span = (crate::pricing::tiers::period_end(&period).expect("period") - p0)
        .num_milliseconds()
        .max(1) as f64;
    // the tenant whose draft is read: a large one (the synthetic mix favours the first five)
    let reader_tenant = loadgen::tenant_name(1);
    let loading = Arc::new(AtomicBool::new(true));
    let reader = {
        let (pool, loading, t, p) = (
            pool.clone(),
            loading.clone(),
            reader_tenant.clone(),
            period.clone(),
        );
        tokio::spawn(async move {
            let (mut draft, mut base) = (Vec::new(), Vec::new());
            let mut lines = 0;
            while loading.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let inv = crate::invoices::store::for_period(&pool, &t, &p).await?;
                draft.push(t0.elapsed().as_secs_f64() * 1000.0);
                lines = inv.map_or(0, |i| i.lines.len());
                let t0 = Instant::now();
                sqlx::query("select 1").execute(&pool).await?;
                base.push(t0.elapsed().as_secs_f64() * 1000.0);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok((draft, base, lines))
        })
    };
    // the month's usage, applied by the writer code in tasks partitioned by tenant (as the
    // consumer routes them)
    let t = Instant::now();
    let k = s.writers.max(1);
    let mut tasks = Vec::new();
    for w in 0..k {
        let (pool, s, period) = (pool.clone(), s.clone(), period.clone());
        tasks.push(tokio::spawn(async move {
            let mut writer = Writer::new(pool, &s.subject_prefix);
            // every task draws the same sequence and keeps its tenants' events
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            let mut batch: Vec<Inbound> = Vec::with_capacity(s.batch_max);
            for i in 0..n {
                let at = p0 + chrono::Duration::milliseconds((i as f64 / n as f64 * span) as i64);
                let ev = loadgen::synthetic(&mut rng, &format!("i{period}"), i, tenants, at);
                let tenant = ev.tenant_id().to_string();
                let part = tenant
                    .bytes()
                    .fold(0usize, |h, c| h.wrapping_mul(31).wrapping_add(c as usize))
                    % k;
                if part != w {
                    continue;
                }
                batch.push(Inbound {
                    subject: s.usage_subject(&tenant),
                    payload: ev.canonical.clone().into(),
                    stream_seq: None,
                });
                if batch.len() >= s.batch_max {
                    writer.apply(&batch, chrono::Utc::now()).await?;
                    batch.clear();
                }
            }
            if !batch.is_empty() {
                writer.apply(&batch, chrono::Utc::now()).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let load_secs = t.elapsed().as_secs_f64();
    loading.store(false, Ordering::Relaxed);
    let (draft, base, lines) = reader.await??;
    let applied: i64 = sqlx::query_scalar("select count(*) from events")
        .fetch_one(&pool)
        .await?;
    println!(
        "(i) a month of usage: {applied} events across {tenants} tenants applied by the writer in {load_secs:.1} s ({:.0} events/s)",
        applied as f64 / load_secs
    );
    if !draft.is_empty() {
        let (d50, d99) = percentiles(draft.clone());
        let (b50, b99) = percentiles(base);
        println!(
            "    draft invoice of {reader_tenant} ({lines} lines) read {} times while the writer ran: p50 {d50:.2} ms, p99 {d99:.2} ms; select 1: p50 {b50:.2} ms, p99 {b99:.2} ms; ratio p99 {:.1}",
            draft.len(),
            d99 / b99.max(1e-9)
        );
    }
    // baseline: one scan summing the month's transfers per tenant
    let t = Instant::now();
    let scanned: Vec<(String, rust_decimal::Decimal)> = sqlx::query_as(
        "select x.tenant_id, sum(x.amount) from transfers x join events e
           on e.tenant_id = x.tenant_id and e.seq = x.seq
         where e.occurred_at >= $1 and e.occurred_at < $2 and x.kind = 'usage_price'
         group by 1",
    )
    .bind(p0)
    .bind(crate::pricing::tiers::period_end(&period))
    .fetch_all(&pool)
    .await?;
    let scan_secs = t.elapsed().as_secs_f64();
    // the close, through the real path
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (rss0, _) = memory();
    let (cancel, w) = spawn_writer(&b, &pool, &s);
    let t = Instant::now();
    let published = crate::engine::publish_closes(&pool, &b, &s, &period).await?;
    loop {
        let (all, done) = crate::invoices::store::close_status(&pool, &period).await?;
        if done.len() >= all.len() {
            break;
        }
        anyhow::ensure!(t.elapsed() < Duration::from_secs(1800), "close timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let close_secs = t.elapsed().as_secs_f64();
    let (_, peak) = memory();
    cancel.cancel();
    w.await??;
    let (count, lines): (i64, i64) = sqlx::query_as(
        "select count(*), coalesce(sum(json_array_length(document->'lines')), 0)::int8 from invoices where period = $1",
    )
    .bind(&period)
    .fetch_one(&pool)
    .await?;
    println!(
        "    close of {period}: {} tenants published, {count} invoices ({lines} lines) finalised in {close_secs:.2} s; \
         peak memory of this process {peak:.0} MiB (resident {rss0:.0} MiB before); \
         one SQL scan of the month's transfers per tenant ({} tenants) {scan_secs:.2} s; ratio close / scan {:.2}",
        published.len(),
        scanned.len(),
        close_secs / scan_secs.max(1e-9)
    );
    b.delete_stream().await?;
    Ok(())
}
