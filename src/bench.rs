//! `tokenledger bench`: the pipeline's throughput and latency, each figure beside a
//! baseline measured in the same run on the same machine (these machines are shared
//! and noisy, so only ratios travel).
//!
//! (a) JetStream publish + consume alone; (b) plain Postgres: every row the pipeline
//! writes per event, in batches of the same size on one connection; (c) a naive
//! pipeline: NATS -> one plain row per event -> ack; (d) the real pipeline: publish ->
//! rated, double-entry, projected, committed -> ack. Then publish->commit latency of
//! (d) at a fixed rate. The pricing engine's measurements are in `bench_terms`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use sqlx::PgPool;

use crate::bus::{self, BatchSource, Bus};
use crate::events::Event;
use crate::ledger::store::{self, EventRows, Projections, RatedUsage, TransferRows};
use crate::settings::Settings;
use crate::telemetry::Metrics;
use crate::{catalog, db, loadgen, pricing};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Events per throughput measurement.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Rate of the latency measurement, events/s.
    #[arg(long, default_value_t = 5_000)]
    pub latency_rate: u64,
    /// Seconds of the latency measurement.
    #[arg(long, default_value_t = 10)]
    pub latency_secs: u64,
    #[arg(long, default_value_t = 50)]
    pub tenants: usize,
    /// Tenants of the invoice benchmark (i).
    #[arg(long, default_value_t = 1000)]
    pub invoice_tenants: usize,
    /// Run only these measurements (comma-separated of a, b, c, d, l, t, q, h, z, r, w, i);
    /// default all.
    #[arg(long)]
    pub only: Option<String>,
    /// Run (c) and (d) this many times, alternately, and print the median of their
    /// ratios: one pair says little on a machine whose speed moves within minutes.
    #[arg(long, default_value_t = 1)]
    pub pairs: usize,
    /// Publish (c)'s and (d)'s events at this rate, events/s, instead of as fast as
    /// JetStream acks them (0), to see what each costs per event below its capacity.
    #[arg(long, default_value_t = 0)]
    pub publish_rate: u64,
}

pub(crate) fn events(n: u64, tenants: usize, run: &str) -> Vec<Event> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..n)
        .map(|i| loadgen::synthetic(&mut rng, run, i, tenants, chrono::Utc::now()))
        .collect()
}

/// A fresh database and stream for one measurement.
pub(crate) async fn fresh(
    s: &Settings,
    name: &str,
    tenants: usize,
) -> anyhow::Result<(Settings, PgPool, Bus)> {
    let mut s = s.clone();
    let base = s
        .owner_database_url
        .rsplit_once('/')
        .map(|x| x.0)
        .unwrap_or_default()
        .to_string();
    let app_base = s
        .database_url
        .rsplit_once('/')
        .map(|x| x.0)
        .unwrap_or_default()
        .to_string();
    let db_name = format!("tokenledger_bench_{name}");
    let admin = db::connect(&format!("{base}/postgres"), 1).await?;
    sqlx::query(&format!("drop database if exists {db_name} with (force)"))
        .execute(&admin)
        .await?;
    s.owner_database_url = format!("{base}/{db_name}");
    s.database_url = format!("{app_base}/{db_name}");
    s.stream = format!("BENCH_{}", name.to_uppercase());
    s.subject_prefix = format!("bench{name}");
    db::migrate(&s.owner_database_url).await?;
    let pool = db::connect(&s.database_url, s.writers as u32 + 2).await?;
    let text = std::fs::read_to_string("config/prices/litellm-popular.json")?;
    let prices = pricing::import::parse_litellm(&text)?;
    let t0 = "2020-01-01T00:00:00Z".parse()?;
    let skew = chrono::Duration::minutes(5);
    let opts = catalog::prices::ImportOptions {
        currency: "USD",
        first_effective_from: t0,
        effective_from: None,
        now: chrono::Utc::now(),
        skew,
        source: "bench",
    };
    catalog::prices::import(&pool, &prices, &opts).await?;
    catalog::prices::add_markup(
        &pool,
        None,
        "20".parse()?,
        Some(t0),
        chrono::Utc::now(),
        skew,
    )
    .await?;
    for i in 0..tenants {
        catalog::tenants::create(&pool, &loadgen::tenant_name(i), "bench", "USD").await?;
    }
    let b = bus::connect(&s).await?;
    let _ = b.delete_stream().await;
    b.ensure_consumer().await?;
    Ok((s, pool, b))
}

/// The ledger writer (the real consumer) in this process until the token is cancelled.
pub(crate) fn spawn_writer(
    b: &Bus,
    pool: &PgPool,
    s: &Settings,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let cancel = tokio_util::sync::CancellationToken::new();
    let w = tokio::spawn(bus::run_writer(
        b.clone(),
        pool.clone(),
        s.clone(),
        crate::telemetry::Metrics::default(),
        cancel.clone(),
        None,
    ));
    (cancel, w)
}

/// Publish every event (at `rate`/s, or as fast as JetStream acks them if 0) in the
/// background; returns each stream sequence's publish instant.
pub(crate) fn publisher(
    b: Bus,
    s: Settings,
    evs: Vec<Event>,
    rate: u64,
) -> tokio::task::JoinHandle<anyhow::Result<HashMap<u64, Instant>>> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut sent = HashMap::with_capacity(evs.len());
        let mut acks = Vec::with_capacity(4096);
        for (i, ev) in evs.into_iter().enumerate() {
            if rate > 0 {
                if let Some(w) =
                    Duration::from_secs_f64(i as f64 / rate as f64).checked_sub(start.elapsed())
                {
                    tokio::time::sleep(w).await;
                }
            }
            let at = Instant::now();
            acks.push((
                at,
                b.publish_with_id(
                    s.usage_subject(ev.tenant_id()),
                    ev.canonical.clone().into(),
                    &ev.msg_id(),
                )
                .await?,
            ));
            if acks.len() >= 4096 {
                for (at, a) in acks.drain(..) {
                    sent.insert(a.await?.sequence, at);
                }
            }
        }
        for (at, a) in acks {
            sent.insert(a.await?.sequence, at);
        }
        Ok(sent)
    })
}

pub async fn run(s0: &Settings, a: BenchArgs) -> anyhow::Result<()> {
    let n = a.events;
    let only = |m: &str| {
        a.only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|x| x.trim() == m))
    };
    println!(
        "tokenledger bench: {n} events per measurement, batches of up to {}, {} writer tasks, {} tenants",
        s0.batch_max, s0.writers, a.tenants
    );
    let (rate_a, cpu_a) = if only("a") {
        let (r, c) = jetstream_alone(s0, &a).await?;
        (Some(r), c)
    } else {
        (None, None)
    };
    let (rate_b, cpu_b) = if only("b") {
        let (r, c) = plain_postgres(s0, &a).await?;
        (Some(r), c)
    } else {
        (None, None)
    };
    let mut rate_d = None;
    let mut pairs = Vec::new();
    for _ in 0..a.pairs.max(1) {
        let (rate_c, cpu_c) = if only("c") {
            let (r, c) = naive(s0, &a).await?;
            (Some(r), c)
        } else {
            (None, None)
        };
        if !only("d") {
            break;
        }
        let (r, cpu_d) = real_pipeline(s0, &a).await?;
        let rate_d = *rate_d.insert(r);
        if let (Some(d), Some(c)) = (cpu_d, cpu_c) {
            println!(
                "    CPU per event (d) / (c) = {:.2} (tokenledger {:.2}, Postgres {:.2}, nats-server {:.2})",
                d.total() / c.total(),
                d.own / c.own,
                d.postgres / c.postgres,
                d.nats / c.nats
            );
        }
        for (name, base) in [
            ("(c) naive", rate_c),
            ("(b) plain Postgres", rate_b),
            ("(a) JetStream", rate_a),
        ] {
            if let Some(base) = base {
                println!("    ratio (d) / {name} = {:.2}", rate_d / base);
            }
        }
        if let (Some(fa), Some(fb), Some(c)) = (cpu_a, cpu_b, cpu_c) {
            print_floor(fa, fb, c);
        }
        if let Some(c) = rate_c {
            pairs.push((c, rate_d));
        }
    }
    if pairs.len() > 1 {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let m = v.len() / 2;
            if v.len() % 2 == 1 {
                v[m]
            } else {
                (v[m - 1] + v[m]) / 2.0
            }
        };
        let ratios: Vec<f64> = pairs.iter().map(|(c, d)| d / c).collect();
        let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "{} pairs of (c), (d): ratios {}; median (d) / (c) = {:.2}, median (c) {:.0}, (d) {:.0} events/s",
            pairs.len(),
            shown.join(", "),
            median(ratios.clone()),
            median(pairs.iter().map(|p| p.0).collect()),
            median(pairs.iter().map(|p| p.1).collect()),
        );
    }
    if only("t") {
        let rate_t = crate::bench_terms::terms_pipeline(s0, &a).await?;
        if let Some(d) = rate_d {
            println!("    ratio (t) / (d) = {:.2}", rate_t / d);
        }
    }
    if only("l") {
        latency(s0, &a).await?;
    }
    if only("q") {
        crate::bench_terms::quote_latency(s0, &a).await?;
    }
    if only("h") {
        crate::bench_terms::quote_http(s0, &a).await?;
    }
    if only("z") {
        crate::bench_terms::authorizations(s0, &a).await?;
    }
    if only("r") {
        crate::bench_router::router_overhead(s0, &a).await?;
    }
    if only("w") {
        crate::bench_webhooks::webhooks(s0, &a).await?;
    }
    if only("i") {
        crate::bench_invoices::invoices(s0, &a).await?;
    }
    Ok(())
}

/// The floor under any pipeline that moves events through JetStream and writes the rows
/// of (b): (a)'s CPU per event plus (b)'s, with no decoding, validation, rating, key
/// lookup or locking at all. Both (c) and (d) keep the two cores busy, so their rates are
/// about inverse to their CPU per event, and (c)'s CPU over the floor's is about the best
/// ratio to (c) such a pipeline could reach on this machine.
fn print_floor(a: CpuSplit, b: CpuSplit, c: CpuSplit) {
    let floor = a.total() + b.total();
    println!(
        "    floor (a) + (b) = {floor:.0} µs CPU per event (JetStream {:.0}, rows {:.0}): \
         at most {:.2} of (c) for any pipeline writing (b)'s rows",
        a.total(),
        b.total(),
        c.total() / floor
    );
}

async fn jetstream_alone(s0: &Settings, a: &BenchArgs) -> anyhow::Result<(f64, Option<CpuSplit>)> {
    let n = a.events;
    let (s, _pool, b) = fresh(s0, "a", 0).await?;
    let evs = events(n, a.tenants, "a");
    let busy = CpuSplit::now();
    let t = Instant::now();
    let p = publisher(b.clone(), s.clone(), evs, 0);
    let mut src = b.batch_source(s.batch_max, s.batch_wait).await?;
    let mut done = 0;
    while done < n {
        let (inb, msgs) = src.next().await?;
        BatchSource::ack(&msgs).await?;
        done += inb.len() as u64;
    }
    p.await??;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let cpu = cpu_since(busy, n);
    b.delete_stream().await?;
    println!(
        "(a) JetStream publish + consume:        {rate:>9.0} events/s{}",
        cpu_text(cpu)
    );
    Ok((rate, cpu))
}

/// The rows of the pipeline, batched, on one connection.
async fn plain_postgres(s0: &Settings, a: &BenchArgs) -> anyhow::Result<(f64, Option<CpuSplit>)> {
    let n = a.events;
    let (s, pool, b) = fresh(s0, "b", a.tenants).await?;
    let evs = events(n, a.tenants, "b");
    // the rows are built before the clock starts: (b) is what writing them costs
    let chunks: Vec<PlainRows> = evs
        .chunks(s.batch_max)
        .enumerate()
        .map(|(no, chunk)| plain_rows(chunk, no as i64 * s.batch_max as i64))
        .collect::<anyhow::Result<_>>()?;
    let busy = CpuSplit::now();
    let t = Instant::now();
    let mut conn = pool.acquire().await?;
    for r in &chunks {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let (cf, dl) = (Default::default(), Default::default());
        let rows = store::Rows {
            events: &r.events,
            transfers: &r.transfers,
            conflicts: &cf,
            dead: &dl,
            proj: &r.proj,
            heads: &r.heads,
            tiers: &Default::default(),
            budgets: &Default::default(),
            alerts: &Default::default(),
            settlements: &Default::default(),
            commitments: &Default::default(),
            reservations: &Default::default(),
            provider_minutes: &Default::default(),
            provider_costs: &r.provider_costs,
            accruals: &r.accruals,
        };
        store::append(&mut tx, rows).await?;
        tx.commit().await?;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let cpu = cpu_since(busy, n);
    drop(conn);
    b.delete_stream().await?;
    println!(
        "(b) plain Postgres, same rows, batched: {rate:>9.0} events/s{}",
        cpu_text(cpu)
    );
    Ok((rate, cpu))
}

/// NATS -> one plain row per event -> ack.
async fn naive(s0: &Settings, a: &BenchArgs) -> anyhow::Result<(f64, Option<CpuSplit>)> {
    let n = a.events;
    let (s, pool, b) = fresh(s0, "c", 0).await?;
    let owner = db::connect(&s.owner_database_url, 1).await?;
    sqlx::query("create table naive (subject text, payload bytea)")
        .execute(&owner)
        .await?;
    sqlx::query("grant insert on naive to tokenledger_app")
        .execute(&owner)
        .await?;
    let evs = events(n, a.tenants, "c");
    let busy = CpuSplit::now();
    let t = Instant::now();
    let p = publisher(b.clone(), s.clone(), evs, a.publish_rate);
    let mut src = b.batch_source(s.batch_max, s.batch_wait).await?;
    let mut done = 0;
    while done < n {
        let (batch, msgs) = src.next().await?;
        done += batch.len() as u64;
        let subj: Vec<String> = batch.iter().map(|m| m.subject.clone()).collect();
        let pay: Vec<Vec<u8>> = batch.into_iter().map(|m| m.payload.to_vec()).collect();
        sqlx::query("insert into naive select * from unnest($1::text[], $2::bytea[])")
            .bind(subj)
            .bind(pay)
            .execute(&pool)
            .await?;
        BatchSource::ack(&msgs).await?;
    }
    p.await??;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let cpu = cpu_since(busy, n);
    b.delete_stream().await?;
    println!(
        "(c) naive pipeline (NATS -> 1 row):     {rate:>9.0} events/s{}",
        cpu_text(cpu)
    );
    Ok((rate, cpu))
}

async fn real_pipeline(s0: &Settings, a: &BenchArgs) -> anyhow::Result<(f64, Option<CpuSplit>)> {
    let n = a.events;
    let (s, pool, b) = fresh(s0, "d", a.tenants).await?;
    let evs = events(n, a.tenants, "d");
    let busy = CpuSplit::now();
    let t = Instant::now();
    let p = publisher(b.clone(), s.clone(), evs, a.publish_rate);
    let commits = real(&b, &s, &pool, n).await?;
    p.await??;
    let last = commits
        .iter()
        .map(|c| c.1)
        .max()
        .unwrap_or_else(Instant::now);
    let rate = n as f64 / (last - t).as_secs_f64();
    let cpu = cpu_since(busy, n);
    b.delete_stream().await?;
    println!(
        "(d) real pipeline (rated, double-entry, projections): {rate:>9.0} events/s{}",
        cpu_text(cpu)
    );
    Ok((rate, cpu))
}

/// (p50, p99) in milliseconds.
pub(crate) fn percentiles(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(|x, y| x.partial_cmp(y).expect("finite"));
    let q = |p: f64| ms[((ms.len() as f64 - 1.0) * p) as usize];
    (q(0.5), q(0.99))
}

fn latencies(at: &[(u64, Instant)], sent: &HashMap<u64, Instant>, skip: u64) -> Vec<f64> {
    at.iter()
        .filter(|(q, _)| *q > skip)
        .filter_map(|(q, t)| {
            sent.get(q)
                .map(|s| t.duration_since(*s).as_secs_f64() * 1000.0)
        })
        .collect()
}

/// Publish->commit latency of the real pipeline at a fixed rate, beside the baseline of
/// JetStream alone (publish->received by a pull consumer) at the same rate. One warm-up
/// second (connections, prepared statements, price book) is not counted.
async fn latency(s0: &Settings, a: &BenchArgs) -> anyhow::Result<()> {
    let warm = a.latency_rate;
    let m = a.latency_rate * a.latency_secs + warm;
    // baseline: JetStream alone
    let (s, _pool, b) = fresh(s0, "j", 0).await?;
    let p = publisher(
        b.clone(),
        s.clone(),
        events(m, a.tenants, "j"),
        a.latency_rate,
    );
    let mut src = b.batch_source(s.batch_max, s.batch_wait).await?;
    let mut got = Vec::with_capacity(m as usize);
    while (got.len() as u64) < m {
        let (inb, msgs) = src.next().await?;
        let now = Instant::now();
        got.extend(inb.iter().filter_map(|i| i.stream_seq).map(|q| (q, now)));
        BatchSource::ack(&msgs).await?;
    }
    let (j50, j99) = percentiles(latencies(&got, &p.await??, warm));
    b.delete_stream().await?;
    // the real pipeline
    let (s, pool, b) = fresh(s0, "l", a.tenants).await?;
    let p = publisher(
        b.clone(),
        s.clone(),
        events(m, a.tenants, "l"),
        a.latency_rate,
    );
    let commits = real(&b, &s, &pool, m).await?;
    let lat = latencies(&commits, &p.await??, warm);
    let n = lat.len();
    let (p50, p99) = percentiles(lat);
    b.delete_stream().await?;
    println!(
        "latency at {} events/s over {} s (n = {n}):",
        a.latency_rate, a.latency_secs
    );
    println!("    JetStream publish->receive:  p50 {j50:>6.1} ms, p99 {j99:>6.1} ms");
    println!(
        "    real publish->commit:        p50 {p50:>6.1} ms, p99 {p99:>6.1} ms (p99 ratio {:.1})",
        p99 / j99
    );
    Ok(())
}

/// The real writers (as `serve` runs them) until `n` messages are committed; returns
/// the commit instant of every stream sequence.
pub(crate) async fn real(
    b: &Bus,
    s: &Settings,
    pool: &PgPool,
    n: u64,
) -> anyhow::Result<Vec<(u64, Instant)>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(bus::run_writer(
        b.clone(),
        pool.clone(),
        s.clone(),
        Metrics::default(),
        cancel.clone(),
        Some(tx),
    ));
    let mut commits = Vec::with_capacity(n as usize);
    while (commits.len() as u64) < n {
        let (at, seqs) = rx
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("writer stopped"))?;
        commits.extend(seqs.into_iter().map(|q| (q, at)));
    }
    cancel.cancel();
    task.await??;
    Ok(commits)
}

/// A breakdown of the real one's size.
static PLAIN_BREAKDOWN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    r#"{"v":1,"tokens":[1234,200,0,800,0],"cost_rates":["2.5","1.25","2.5","10","10"],"price_rates":["3","1.5","3","12","12"],"long_context":false,"batch":false,"cost_batch_discount":"0","price_batch_discount":"0","markup_percent":"20","currency":"USD","cost_version_id":163,"price_version_id":null,"markup_rule_id":1}"#.to_string()
});

/// The rows the real pipeline writes for a batch of the benchmark's usage events (none of
/// its tenants has tiers, budgets, commitments or reservations, and no provider terms
/// count usage by the minute): each event's row, its price and cost transfers with the
/// breakdown, the rollup, balance, tenant head, provider cost and invoice accrual upserts.
struct PlainRows {
    events: EventRows,
    transfers: TransferRows,
    proj: Projections,
    heads: HashMap<String, i64>,
    provider_costs: store::ProviderCosts,
    accruals: crate::invoices::accrue::Accruals,
}

/// Build [`PlainRows`] without reading anything: one fixed set of rates (the bench's
/// events carry their own token counts), no locks, no lookups.
fn plain_rows(evs: &[Event], seq0: i64) -> anyhow::Result<PlainRows> {
    use crate::invoices::accrue::{accrue_event, Charged};
    let template: pricing::Breakdown = serde_json::from_str(&PLAIN_BREAKDOWN)?;
    let mut r = PlainRows {
        events: EventRows::default(),
        transfers: TransferRows::default(),
        proj: Projections::default(),
        heads: HashMap::new(),
        provider_costs: Default::default(),
        accruals: Default::default(),
    };
    let mut closed = std::collections::HashSet::new();
    for (i, ev) in evs.iter().enumerate() {
        let seq = seq0 + i as i64 + 1;
        let crate::events::EventData::Usage(u) = &ev.data else {
            continue;
        };
        crate::ledger::writer::stage_event(&mut r.events, ev, seq);
        let mut b = template.clone();
        b.tokens = [
            u.uncached_input_tokens(),
            u.cached_input_tokens,
            u.cache_write_tokens,
            u.plain_output_tokens(),
            u.reasoning_tokens,
        ];
        let breakdown = serde_json::to_string(&b)?;
        let rating = b.expand()?;
        for (leg, (kind, d, c, amount)) in [
            ("usage_price", "receivable", "revenue", rating.price),
            ("usage_cost", "cogs", "payable:x", rating.cost),
        ]
        .into_iter()
        .enumerate()
        {
            let t = &mut r.transfers;
            t.tenant.push(u.tenant_id.clone());
            t.seq.push(seq);
            t.leg.push(leg as i16);
            t.kind.push(kind.into());
            t.debit.push(d.into());
            t.credit.push(c.into());
            t.amount.push(amount);
            t.currency.push("USD".into());
            t.cost_version.push(Some(rating.cost_version_id));
            t.price_version.push(rating.price_version_id);
            t.markup_rule.push(rating.markup_rule_id);
            t.breakdown.push((leg == 0).then(|| breakdown.clone()));
            r.proj.add_transfer(&u.tenant_id, d, c, amount, "USD");
        }
        r.proj.add_usage(RatedUsage {
            tenant: &u.tenant_id,
            occurred_at: ev.time,
            api_key_id: u.api_key_id.as_deref().unwrap_or(""),
            provider: &u.provider,
            model: &u.model,
            tokens: u.rollup_tokens(),
            price: rating.price,
            cost: rating.cost,
            currency: "USD",
        });
        r.heads.insert(u.tenant_id.clone(), seq);
        let k = (
            u.provider.clone(),
            u.model.clone(),
            pricing::period_of(ev.time),
            "USD".to_string(),
            crate::ledger::lane(&u.tenant_id),
        );
        *r.provider_costs.entry(k).or_default() += rating.cost;
        let charged = Charged::Usage {
            provider: &u.provider,
            model: &u.model,
            rating: &rating,
        };
        accrue_event(
            &mut r.accruals,
            &mut closed,
            &u.tenant_id,
            &ev.id,
            ev.time,
            charged,
            true,
        );
    }
    Ok(r)
}

/// CPU time (user + system, in seconds) of this process (every thread: publisher, writer,
/// router, fake upstream, benchmark client), of every Postgres process and of nats-server,
/// read from `/proc/<pid>/stat`. Steal and other processes are not in it, so it says where
/// the work of a benchmark goes — which a saturated machine's busy time (two cores' worth
/// whatever the load) cannot. Postgres backends that exit within a window are missed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuSplit {
    pub own: f64,
    pub postgres: f64,
    pub nats: f64,
}

impl CpuSplit {
    /// Now; `None` where `/proc` cannot be read (not Linux).
    pub fn now() -> Option<CpuSplit> {
        let (_, own) = stat_cpu(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        let mut s = CpuSplit {
            own,
            ..CpuSplit::default()
        };
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue; // it exited meanwhile
            };
            match stat_cpu(&text) {
                Some((comm, secs)) if comm == "postgres" => s.postgres += secs,
                Some((comm, secs)) if comm == "nats-server" => s.nats += secs,
                _ => {}
            }
        }
        Some(s)
    }

    /// Per unit of work, in µs, from `self` (earlier) to `later`.
    pub fn per(self, later: CpuSplit, n: u64) -> CpuSplit {
        let k = 1e6 / n.max(1) as f64;
        CpuSplit {
            own: (later.own - self.own) * k,
            postgres: (later.postgres - self.postgres) * k,
            nats: (later.nats - self.nats) * k,
        }
    }

    pub fn total(self) -> f64 {
        self.own + self.postgres + self.nats
    }

    /// `N µs CPU per <unit> (tokenledger A, Postgres B, nats-server C)`, "tokenledger" being
    /// this process.
    pub fn describe(self, unit: &str) -> String {
        format!(
            "{:.0} µs CPU per {unit} (tokenledger {:.0}, Postgres {:.0}, nats-server {:.0})",
            self.total(),
            self.own,
            self.postgres,
            self.nats
        )
    }
}

/// The command name and user + system seconds of a `/proc/<pid>/stat` line: the name is in
/// parentheses (and may hold spaces or parentheses itself); utime and stime are fields 14
/// and 15, in clock ticks of 1/100 s (USER_HZ on Linux).
fn stat_cpu(line: &str) -> Option<(String, f64)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is field 3 (state)
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) as f64 / 100.0))
}

/// The CPU per event (µs, by process) since `at0`, over `n` events.
fn cpu_since(at0: Option<CpuSplit>, n: u64) -> Option<CpuSplit> {
    Some(at0?.per(CpuSplit::now()?, n))
}

fn cpu_text(cpu: Option<CpuSplit>) -> String {
    cpu.map(|c| format!(", {}", c.describe("event")))
        .unwrap_or_default()
}

#[cfg(test)]
mod cpu_tests {
    #[test]
    fn process_cpu_is_utime_plus_stime() {
        let line =
            "4242 (nats-server) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0 9 0 100 0 0";
        assert_eq!(
            super::stat_cpu(line),
            Some(("nats-server".to_string(), 18.01))
        );
        // a command name with a space and a parenthesis
        let line = "7 (tokio (rt) w) R 1 7 7 0 -1 0 0 0 0 0 100 50 0 0 20 0 1 0 5 0 0";
        assert_eq!(
            super::stat_cpu(line),
            Some(("tokio (rt) w".to_string(), 1.5))
        );
        assert_eq!(super::stat_cpu("7 (x) R 1 2"), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn this_process_cpu_is_read_from_proc_and_grows_with_work() {
        let a = super::CpuSplit::now().expect("/proc readable on Linux");
        // spin until the kernel has charged at least two ticks to this process
        let t = std::time::Instant::now();
        let mut x = 0u64;
        let b = loop {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            let b = super::CpuSplit::now().expect("/proc readable on Linux");
            if b.own >= a.own + 0.02 || t.elapsed() > std::time::Duration::from_secs(5) {
                break b;
            }
        };
        std::hint::black_box(x);
        assert!(b.own >= a.own + 0.02, "{a:?} -> {b:?}");
        assert!(b.postgres >= a.postgres && b.nats >= a.nats);
    }
}
