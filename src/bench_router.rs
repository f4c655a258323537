//! (r) The router's overhead: the same requests sent to the fake upstream directly and
//! through the router, each plain and streamed, without a budget and with a blocking
//! budget in scope: latency first with the router alone (as on hosts of its own; the
//! ledger writer takes its events afterwards), then latency and throughput with the
//! ledger writer consuming what it publishes beside it (same process, same two cores).
//!
//! Latency is measured open loop at a fixed rate (from each request's scheduled start,
//! so a stall is not hidden by requests that were never sent); throughput closed loop
//! over keep-alive connections. Added latency is the router's percentile minus the
//! direct percentile of the same run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::bench::{fresh, BenchArgs, CpuSplit};
use crate::router::fake::{Behavior, Fake};
use crate::settings::Settings;

struct Conn {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            buf: Vec::with_capacity(16 << 10),
        })
    }

    /// Send one request and read the whole response (content-length or chunked).
    async fn call(&mut self, req: &[u8]) -> anyhow::Result<u16> {
        self.s.write_all(req).await?;
        self.buf.clear();
        let mut chunk = [0u8; 16384];
        loop {
            let n = self.s.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
            let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = std::str::from_utf8(&self.buf[..end])?.to_ascii_lowercase();
            let status = head.get(9..12).and_then(|x| x.parse().ok()).unwrap_or(0);
            if head.contains("transfer-encoding: chunked") {
                if self.buf.ends_with(b"\r\n0\r\n\r\n")
                    || self.buf[end + 4..].starts_with(b"0\r\n\r\n")
                {
                    return Ok(status);
                }
                continue;
            }
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if self.buf.len() >= end + 4 + len {
                return Ok(status);
            }
        }
    }
}

fn request(path: &str, token: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Open-loop latencies (µs) at `rate` requests/s for `secs`.
async fn latencies(
    addr: SocketAddr,
    req: Vec<u8>,
    rate: u64,
    secs: u64,
) -> anyhow::Result<Vec<u64>> {
    let pool: Arc<Mutex<Vec<Conn>>> = Arc::default();
    let out: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let req = Arc::new(req);
    let n = rate * secs;
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let at = start + period * i as u32;
        tokio::time::sleep_until(at).await;
        let (pool, out, req) = (pool.clone(), out.clone(), req.clone());
        tasks.spawn(async move {
            // from the actual start: the timer may wake late, which is not the router's cost
            let at = tokio::time::Instant::now().max(at);
            let conn = pool.lock().await.pop();
            let mut c = match conn {
                Some(c) => c,
                None => Conn::open(addr).await?,
            };
            let st = c.call(&req).await?;
            anyhow::ensure!(st == 200, "HTTP {st}");
            let took = at.elapsed().as_micros() as u64;
            out.lock().expect("latencies").push(took);
            pool.lock().await.push(c);
            anyhow::Ok(())
        });
        while let Some(r) = tasks.try_join_next() {
            r??;
        }
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let mut v = std::mem::take(&mut *out.lock().expect("latencies"));
    v.sort_unstable();
    Ok(v)
}

fn pct(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Closed-loop requests/s over `conns` keep-alive connections for `secs`, how many, and
/// the CPU time per request (µs) of this process, Postgres and nats-server (`None` where
/// unreadable).
async fn throughput(
    addr: SocketAddr,
    req: Vec<u8>,
    conns: usize,
    secs: u64,
) -> anyhow::Result<(f64, u64, Option<CpuSplit>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (stop, done, req) = (stop.clone(), done.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(addr).await?;
            while !stop.load(Ordering::Relaxed) {
                let st = c.call(&req).await?;
                anyhow::ensure!(st == 200, "HTTP {st}");
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let t = Instant::now();
    let (n0, cpu0) = (done.load(Ordering::Relaxed), CpuSplit::now());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (n1, cpu1) = (done.load(Ordering::Relaxed), CpuSplit::now());
    stop.store(true, Ordering::Relaxed);
    let elapsed = t.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    let n = done.load(Ordering::Relaxed);
    let cpu = match (cpu0, cpu1) {
        (Some(a), Some(b)) if n1 > n0 => Some(a.per(b, n1 - n0)),
        _ => None,
    };
    Ok((n as f64 / elapsed, n, cpu))
}

/// `, N µs CPU per request (tokenledger A, Postgres B, nats-server C; ratio to direct R)`:
/// "tokenledger" is this whole process — router, ledger writer, fake upstream and client.
fn cpu_note(cpu: Option<CpuSplit>, direct: Option<CpuSplit>) -> String {
    match (cpu, direct) {
        (Some(c), Some(d)) if d.total() > 0.0 => format!(
            ", {}, ratio to direct {:.1}",
            c.describe("request"),
            c.total() / d.total()
        ),
        (Some(c), _) => format!(", {}", c.describe("request")),
        _ => String::new(),
    }
}

/// (r) The router against the fake upstream directly.
pub async fn router_overhead(s0: &Settings, a: &BenchArgs) -> anyhow::Result<()> {
    let fake = Fake::start("127.0.0.1:0").await?;
    fake.set(Behavior::default());
    let fake_addr: SocketAddr = fake
        .base_url
        .trim_start_matches("http://")
        .trim_end_matches("/v1")
        .parse()?;
    let (mut s, pool, _b) = fresh(s0, "r", 0).await?;
    let cfg = std::env::temp_dir().join(format!("tl-bench-router-{}.json", std::process::id()));
    std::fs::write(
        &cfg,
        serde_json::json!({"providers": [{"name": "openai", "base_url": fake.base_url,
            "models": {"gpt-4o-mini": "gpt-4o-mini"}}]})
        .to_string(),
    )?;
    // two tenants: one without budgets, one with a blocking budget it never reaches
    crate::catalog::tenants::create(&pool, "bench-free", "bench", "USD").await?;
    crate::catalog::tenants::create(&pool, "bench-budget", "bench", "USD").await?;
    let (_, free_key) = crate::catalog::keys::create(&pool, "bench-free", "bench").await?;
    let (_, budget_key) = crate::catalog::keys::create(&pool, "bench-budget", "bench").await?;
    sqlx::query(
        "insert into budgets (tenant_id, name, scope, period, amount, thresholds, action, effective_from)
         values ('bench-budget', 'limit', 'tenant', 'month', 1000000000, '{}', 'block', now() - interval '1 hour')",
    )
    .execute(&pool)
    .await?;
    let plain = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something about ledgers in twelve words."}],"max_tokens":64}"#;
    let streamed = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something about ledgers in twelve words."}],"max_tokens":64,"stream":true}"#;
    let path = "/v1/chat/completions";
    let rate = 1_000;
    let secs = a.latency_secs.clamp(2, 10);
    let conns = 32;
    println!(
        "(r) router overhead: fake upstream in process; latency at {rate} requests/s for {secs} s (open loop), \
         throughput over {conns} keep-alive connections for {secs} s"
    );
    let keys = [("no budget", &free_key), ("blocking budget", &budget_key)];
    let mut served = 0u64;

    // First the router alone, as it runs on hosts of its own: its events wait in
    // JetStream and the ledger writer takes them when it starts below. Latency only (a
    // throughput without the writer would outrun the ledger).
    s.router_addr = "127.0.0.1:0".into();
    s.router_config = cfg.clone();
    s.roles = vec!["router".into()];
    let (router, cancel, task) = start(&s).await?;
    println!("    the router alone (the ledger writer not running):");
    for (label, body) in [("plain", plain), ("streamed", streamed)] {
        served += warm_up(fake_addr, router, path, body, &keys).await?;
        served += latency_rows(fake_addr, router, path, label, body, rate, secs, &keys).await?;
    }
    cancel.cancel();
    task.await??;

    // Then as in one place: the ledger writer beside the router, on the same two cores.
    // It settles the holds the budget tenant's requests place, as it does in production
    // (without it open holds would pile up and every authorisation would sum them all).
    s.roles = vec!["router".into(), "writer".into()];
    let (router, cancel, task) = start(&s).await?;
    // the first phase's events are in the ledger before anything is measured
    recorded(&pool, served).await?;
    println!("    the router with the ledger writer beside it:");
    for (label, body) in [("plain", plain), ("streamed", streamed)] {
        served += warm_up(fake_addr, router, path, body, &keys).await?;
        served += latency_rows(fake_addr, router, path, label, body, rate, secs, &keys).await?;
        let (direct, _, dcpu) =
            throughput(fake_addr, request(path, "x", body), conns, secs).await?;
        println!(
            "    {label:<8} direct to the fake      {direct:>8.0} requests/s{}",
            cpu_note(dcpu, None)
        );
        for (who, key) in keys {
            let (r, n, cpu) = throughput(router, request(path, key, body), conns, secs).await?;
            served += n;
            println!(
                "    {label:<8} router, {who:<16} {r:>8.0} requests/s (ratio to direct {:.2}){}",
                r / direct,
                cpu_note(cpu, dcpu)
            );
        }
    }
    // the ledger takes every request the router served, once
    let events = recorded(&pool, served).await?;
    cancel.cancel();
    task.await??;
    let spooled: i64 = sqlx::query_scalar("select count(*) from router_spool")
        .fetch_one(&pool)
        .await?;
    println!(
        "    ledger: {served} requests served, {events} usage events recorded, {spooled} left in the spool"
    );
    let _ = std::fs::remove_file(cfg);
    Ok(())
}

/// Warm up connections and caches, and for the budget tenant its first lease (the first
/// request of a tenant after start is decided exactly, in a transaction, and the requests
/// arriving meanwhile wait for it: a one-off per tenant and process, not the steady state
/// measured). Returns the requests the router served.
async fn warm_up(
    fake: SocketAddr,
    router: SocketAddr,
    path: &str,
    body: &str,
    keys: &[(&str, &String); 2],
) -> anyhow::Result<u64> {
    throughput(fake, request(path, "x", body), 4, 1).await?;
    let mut served = 0;
    for (_, key) in keys {
        served += throughput(router, request(path, key, body), 4, 1).await?.1;
    }
    Ok(served)
}

/// Latency direct to the fake, then through the router for each key, printed; returns the
/// requests the router served.
#[allow(clippy::too_many_arguments)]
async fn latency_rows(
    fake: SocketAddr,
    router: SocketAddr,
    path: &str,
    label: &str,
    body: &str,
    rate: u64,
    secs: u64,
    keys: &[(&str, &String); 2],
) -> anyhow::Result<u64> {
    let direct = latencies(fake, request(path, "x", body), rate, secs).await?;
    let (d50, d99) = (pct(&direct, 0.5), pct(&direct, 0.99));
    println!("    {label:<8} direct to the fake      p50 {d50:>6} µs  p99 {d99:>6} µs");
    let mut served = 0;
    for (who, key) in keys {
        let v = latencies(router, request(path, key, body), rate, secs).await?;
        served += v.len() as u64;
        let (r50, r99) = (pct(&v, 0.5), pct(&v, 0.99));
        println!(
            "    {label:<8} router, {who:<16} p50 {r50:>6} µs  p99 {r99:>6} µs  added p50 {:>6} µs  p99 {:>6} µs",
            r50 as i64 - d50 as i64,
            r99 as i64 - d99 as i64
        );
    }
    Ok(served)
}

/// Wait (up to two minutes) until the ledger holds `served` usage events; their count.
async fn recorded(pool: &sqlx::PgPool, served: u64) -> anyhow::Result<i64> {
    let t = Instant::now();
    let mut events: i64 = 0;
    while t.elapsed() < Duration::from_secs(120) {
        events = sqlx::query_scalar("select count(*) from events")
            .fetch_one(pool)
            .await?;
        if events >= served as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(events)
}

/// The service with `s.roles` in this process: the router's address, the token that stops
/// it and its task.
async fn start(
    s: &Settings,
) -> anyhow::Result<(
    SocketAddr,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let app = crate::app::App::build(s.clone()).await?;
    let router = app
        .router_addr
        .ok_or_else(|| anyhow::anyhow!("no router"))?;
    let cancel = app.cancel.clone();
    Ok((router, cancel, tokio::spawn(app.run_until_stopped())))
}
