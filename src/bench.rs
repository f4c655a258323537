//! `tokenledger bench`: the pipeline's throughput and latency, each figure beside a
//! baseline measured in the same run on the same machine (these machines are shared
//! and noisy, so only ratios travel).
//!
//! (a) JetStream publish + consume alone; (b) plain Postgres: every row the pipeline
//! writes per event, in batches of the same size on one connection; (c) a naive
//! pipeline: NATS -> one plain row per event -> ack; (d) the real pipeline: publish ->
//! rated, double-entry, projected, committed -> ack. Then publish->commit latency of
//! (d) at a fixed rate.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use sqlx::PgPool;

use crate::bus::{self, BatchSource, Bus};
use crate::events::Event;
use crate::ledger::store::{self, EventRows, Projections, RequestRow, TransferRows};
use crate::ledger::Writer;
use crate::settings::Settings;
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
}

fn events(n: u64, tenants: usize, run: &str) -> Vec<Event> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..n).map(|i| loadgen::synthetic(&mut rng, run, i, tenants, chrono::Utc::now())).collect()
}

/// A fresh database and stream for one measurement.
async fn fresh(s: &Settings, name: &str, tenants: usize) -> anyhow::Result<(Settings, PgPool, Bus)> {
    let mut s = s.clone();
    let base = s.owner_database_url.rsplit_once('/').map(|x| x.0).unwrap_or_default().to_string();
    let app_base = s.database_url.rsplit_once('/').map(|x| x.0).unwrap_or_default().to_string();
    let db_name = format!("tokenledger_bench_{name}");
    let admin = db::connect(&format!("{base}/postgres"), 1).await?;
    sqlx::query(&format!("drop database if exists {db_name} with (force)")).execute(&admin).await?;
    s.owner_database_url = format!("{base}/{db_name}");
    s.database_url = format!("{app_base}/{db_name}");
    s.stream = format!("BENCH_{}", name.to_uppercase());
    s.subject_prefix = format!("bench{name}");
    db::migrate(&s.owner_database_url).await?;
    let pool = db::connect(&s.database_url, 4).await?;
    let text = std::fs::read_to_string("config/prices/litellm-popular.json")?;
    let prices = pricing::import::parse_litellm(&text)?;
    let t0 = "2020-01-01T00:00:00Z".parse()?;
    let skew = chrono::Duration::minutes(5);
    catalog::prices::import(&pool, &prices, "USD", t0, None, chrono::Utc::now(), skew, "bench").await?;
    catalog::prices::add_markup(&pool, None, "20".parse()?, Some(t0), chrono::Utc::now(), skew).await?;
    for i in 0..tenants {
        catalog::tenants::create(&pool, &loadgen::tenant_name(i), "bench", "USD").await?;
    }
    let b = bus::connect(&s).await?;
    let _ = b.delete_stream().await;
    b.ensure_consumer().await?;
    Ok((s, pool, b))
}

/// Publish every event as fast as JetStream acks them (in the background).
fn publisher(b: Bus, s: Settings, evs: Vec<Event>, rate: u64) -> tokio::task::JoinHandle<anyhow::Result<HashMap<String, Instant>>> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut sent = HashMap::with_capacity(evs.len());
        let mut acks = Vec::with_capacity(4096);
        for (i, ev) in evs.into_iter().enumerate() {
            if rate > 0 {
                if let Some(w) = Duration::from_secs_f64(i as f64 / rate as f64).checked_sub(start.elapsed()) {
                    tokio::time::sleep(w).await;
                }
            }
            sent.insert(ev.id.clone(), Instant::now());
            acks.push(b.publish_with_id(s.usage_subject(ev.tenant_id()), ev.canonical.clone().into(), &ev.msg_id()).await?);
            if acks.len() >= 4096 {
                for a in acks.drain(..) {
                    a.await?;
                }
            }
        }
        for a in acks {
            a.await?;
        }
        Ok(sent)
    })
}

pub async fn run(s0: &Settings, a: BenchArgs) -> anyhow::Result<()> {
    let n = a.events;
    println!("tokenledger bench: {n} events per measurement, batches of up to {}, {} tenants", s0.batch_max, a.tenants);

    // (a) JetStream alone
    let (s, _pool, b) = fresh(s0, "a", 0).await?;
    let evs = events(n, a.tenants, "a");
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
    let rate_a = n as f64 / t.elapsed().as_secs_f64();
    b.delete_stream().await?;
    println!("(a) JetStream publish + consume:        {rate_a:>9.0} events/s");

    // (b) plain Postgres: the rows of the pipeline, batched, one connection
    let (s, pool, b) = fresh(s0, "b", a.tenants).await?;
    let evs = events(n, a.tenants, "b");
    let t = Instant::now();
    let mut conn = pool.acquire().await?;
    for (chunk_no, chunk) in evs.chunks(s.batch_max).enumerate() {
        let (er, tr, pr) = plain_rows(chunk, chunk_no as i64 * s.batch_max as i64);
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        store::insert_events(&mut tx, &er).await?;
        store::insert_transfers(&mut tx, &tr).await?;
        store::apply_projections(&mut tx, &pr, &store::LIVE).await?;
        tx.commit().await?;
    }
    let rate_b = n as f64 / t.elapsed().as_secs_f64();
    drop(conn);
    b.delete_stream().await?;
    println!("(b) plain Postgres, same rows, batched: {rate_b:>9.0} events/s");

    // (c) naive pipeline: one plain row per event
    let (s, pool, b) = fresh(s0, "c", 0).await?;
    sqlx::query("create table naive (subject text, payload bytea)").execute(&db::connect(&s.owner_database_url, 1).await?).await?;
    sqlx::query("grant insert on naive to tokenledger_app").execute(&db::connect(&s.owner_database_url, 1).await?).await?;
    let evs = events(n, a.tenants, "c");
    let t = Instant::now();
    let p = publisher(b.clone(), s.clone(), evs, 0);
    let mut src = b.batch_source(s.batch_max, s.batch_wait).await?;
    let mut done = 0;
    while done < n {
        let (batch, msgs) = src.next().await?;
        done += batch.len() as u64;
        let subj: Vec<String> = batch.iter().map(|m| m.subject.clone()).collect();
        let pay: Vec<Vec<u8>> = batch.into_iter().map(|m| m.payload).collect();
        sqlx::query("insert into naive select * from unnest($1::text[], $2::bytea[])")
            .bind(subj)
            .bind(pay)
            .execute(&pool)
            .await?;
        BatchSource::ack(&msgs).await?;
    }
    p.await??;
    let rate_c = n as f64 / t.elapsed().as_secs_f64();
    b.delete_stream().await?;
    println!("(c) naive pipeline (NATS -> 1 row):     {rate_c:>9.0} events/s");

    // (d) the real pipeline
    let (s, pool, b) = fresh(s0, "d", a.tenants).await?;
    let evs = events(n, a.tenants, "d");
    let t = Instant::now();
    let p = publisher(b.clone(), s.clone(), evs, 0);
    let (rate_d, _) = real(&b, &s, &pool, n, None).await?;
    p.await??;
    let rate_d = rate_d.unwrap_or(n as f64 / t.elapsed().as_secs_f64());
    let rate_d = rate_d.min(n as f64 / t.elapsed().as_secs_f64());
    b.delete_stream().await?;
    println!("(d) real pipeline (rated, double-entry, projections): {rate_d:>9.0} events/s");
    println!("    ratio (d)/(c) = {:.2}; (d)/(b) = {:.2}; (d)/(a) = {:.2}", rate_d / rate_c, rate_d / rate_b, rate_d / rate_a);

    // latency of (d) at a fixed rate
    let m = a.latency_rate * a.latency_secs;
    let (s, pool, b) = fresh(s0, "l", a.tenants).await?;
    let evs = events(m, a.tenants, "l");
    let p = publisher(b.clone(), s.clone(), evs, a.latency_rate);
    let (_, commits) = real(&b, &s, &pool, m, Some(())).await?;
    let sent = p.await??;
    let mut lat: Vec<f64> = commits
        .iter()
        .filter_map(|(id, at)| sent.get(id).map(|s| at.duration_since(*s).as_secs_f64() * 1000.0))
        .collect();
    lat.sort_by(|x, y| x.partial_cmp(y).expect("finite"));
    let q = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize];
    println!("publish->commit latency at {} events/s over {} s: p50 {:.1} ms, p99 {:.1} ms (n = {})", a.latency_rate, a.latency_secs, q(0.5), q(0.99), lat.len());
    b.delete_stream().await?;
    Ok(())
}

/// The real writer over `n` messages; returns its rate and, if asked, each event's
/// commit instant.
async fn real(b: &Bus, s: &Settings, pool: &PgPool, n: u64, track: Option<()>) -> anyhow::Result<(Option<f64>, Vec<(String, Instant)>)> {
    let mut writer = Writer::new(pool.clone(), &s.subject_prefix);
    let mut commits = Vec::new();
    let t = Instant::now();
    let mut src = b.batch_source(s.batch_max, s.batch_wait).await?;
    let mut done = 0;
    while done < n {
        let (batch, msgs) = src.next().await?;
        writer.apply(&batch, chrono::Utc::now()).await?;
        if track.is_some() {
            let now = Instant::now();
            for m in &batch {
                if let Ok(ev) = crate::events::parse_bytes(&m.payload, chrono::Utc::now()) {
                    commits.push((ev.id, now));
                }
            }
        }
        BatchSource::ack(&msgs).await?;
        done += batch.len() as u64;
    }
    Ok((Some(n as f64 / t.elapsed().as_secs_f64()), commits))
}

/// The rows the pipeline writes for these events, built without locks or rating.
fn plain_rows(evs: &[Event], seq0: i64) -> (EventRows, TransferRows, Projections) {
    let (mut er, mut tr, mut pr) = (EventRows::default(), TransferRows::default(), Projections::default());
    for (i, ev) in evs.iter().enumerate() {
        let seq = seq0 + i as i64 + 1;
        let crate::events::EventData::Usage(u) = &ev.data else { continue };
        er.tenant.push(u.tenant_id.clone());
        er.id.push(ev.id.clone());
        er.seq.push(seq);
        er.type_.push(ev.type_().into());
        er.request_id.push(Some(u.request_id.clone()));
        er.source.push(ev.source.clone());
        er.occurred_at.push(ev.time);
        er.data.push(ev.data_json().to_string());
        er.hash.push(ev.payload_hash.to_vec());
        let amount = rust_decimal::Decimal::new(12345, 7);
        for (kind, d, c) in [("usage_price", "receivable", "revenue"), ("usage_cost", "cogs", "payable:x")] {
            tr.tenant.push(u.tenant_id.clone());
            tr.seq.push(seq);
            tr.event_id.push(ev.id.clone());
            tr.kind.push(kind.into());
            tr.debit.push(d.into());
            tr.credit.push(c.into());
            tr.amount.push(amount);
            tr.currency.push("USD".into());
            tr.cost_version.push(None);
            tr.price_version.push(None);
            tr.markup_rule.push(None);
            tr.breakdown.push(r#"{"lines":[{"class":"input","tokens":1,"cost":"0.1","price":"0.12"}],"cost":"0.1","price":"0.12"}"#.repeat(4));
            pr.add_transfer(&u.tenant_id, d, c, amount, "USD");
        }
        pr.add_request(RequestRow {
            tenant: u.tenant_id.clone(),
            request_id: u.request_id.clone(),
            event_id: ev.id.clone(),
            seq,
            occurred_at: ev.time,
            api_key_id: String::new(),
            provider: u.provider.clone(),
            model: u.model.clone(),
            status: "ok".into(),
            batch: u.batch,
            tokens: [u.input_tokens as i64, 0, 0, u.output_tokens as i64, 0],
            price: amount,
            cost: amount,
            currency: "USD".into(),
        });
    }
    (er, tr, pr)
}
