//! Benchmarks of the pricing engine, each beside a baseline measured in the same run:
//! (t) the real pipeline with every tenant on a tier schedule, a commitment, a reservation
//! and budgets, against (d)
//! without; (q) a quote in process, against one plain rating; (h) quotes over HTTP,
//! against `/healthz` over the same connections; (z) authorisations against one hot
//! blocking budget, against one durable round trip per request on a hot row.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use rust_decimal::Decimal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::authorize::{AuthRequest, Authorizer, Verdict};
use crate::bench::{events, fresh, percentiles, publisher, real, BenchArgs};
use crate::catalog::{self, budgets::NewBudget, tiers::NewTierSchedule};
use crate::loadgen;
use crate::pricing::budgets::{BudgetAction, BudgetPeriod, BudgetScope};
use crate::pricing::routing::{eligible, quote, QuoteContext, TokenMix};
use crate::pricing::tiers::{ScopeKind, Tier, TierMetric, TierMode};
use crate::settings::Settings;

fn tiers() -> NewTierSchedule {
    NewTierSchedule {
        name: "volume".into(),
        mode: TierMode::Graduated,
        metric: TierMetric::Tokens,
        scope: ScopeKind::All,
        scope_value: String::new(),
        tiers: vec![
            Tier {
                up_to: Some(Decimal::from(1_000_000)),
                discount_percent: Decimal::ZERO,
            },
            Tier {
                up_to: Some(Decimal::from(50_000_000)),
                discount_percent: Decimal::from(10),
            },
            Tier {
                up_to: None,
                discount_percent: Decimal::from(20),
            },
        ],
        effective_from: Some("2020-01-01T00:00:00Z".parse().expect("instant")),
    }
}

fn budget(
    name: &str,
    scope: BudgetScope,
    value: &str,
    action: BudgetAction,
    amount: i64,
) -> NewBudget {
    NewBudget {
        name: name.into(),
        scope,
        scope_value: value.into(),
        period: BudgetPeriod::Month,
        amount: Decimal::from(amount),
        thresholds: None,
        action,
        downgrade_class: None,
        effective_from: Some("2020-01-01T00:00:00Z".parse().expect("instant")),
    }
}

/// Give every tenant a tier schedule, a commitment, a reservation, a tenant budget and a
/// key budget.
async fn with_terms(pool: &sqlx::PgPool, tenants: usize) -> anyhow::Result<()> {
    let skew = chrono::Duration::minutes(5);
    for i in 0..tenants {
        let t = loadgen::tenant_name(i);
        catalog::tiers::add(pool, &t, tiers(), Utc::now(), skew).await?;
        catalog::budgets::add(
            pool,
            &t,
            budget(
                "monthly",
                BudgetScope::Tenant,
                "",
                BudgetAction::Alert,
                1_000_000_000,
            ),
            Utc::now(),
            skew,
        )
        .await?;
        catalog::budgets::add(
            pool,
            &t,
            budget(
                "key0",
                BudgetScope::ApiKey,
                "key-0",
                BudgetAction::Block,
                1_000_000_000,
            ),
            Utc::now(),
            skew,
        )
        .await?;
    }
    Ok(())
}

/// (t) The real pipeline with tiers and budgets on every tenant.
pub async fn terms_pipeline(s0: &Settings, a: &BenchArgs) -> anyhow::Result<f64> {
    let n = a.events;
    let (s, pool, b) = fresh(s0, "t", a.tenants).await?;
    with_terms(&pool, a.tenants).await?;
    let evs = events(n, a.tenants, "t");
    let t = Instant::now();
    let p = publisher(b.clone(), s.clone(), evs, 0);
    let commits = real(&b, &s, &pool, n).await?;
    p.await??;
    let last = commits
        .iter()
        .map(|c| c.1)
        .max()
        .unwrap_or_else(Instant::now);
    let rate = n as f64 / (last - t).as_secs_f64();
    b.delete_stream().await?;
    println!("(t) real pipeline, every term on every tenant: {rate:>9.0} events/s");
    Ok(rate)
}

/// (q) Quote latency in process, for the default `auto:balanced` class.
pub async fn quote_latency(s0: &Settings, _a: &BenchArgs) -> anyhow::Result<()> {
    let (_s, pool, _b) = fresh(s0, "q", 1).await?;
    with_terms(&pool, 1).await?;
    let mut c = pool.acquire().await?;
    let book = catalog::prices::load_book(&mut c).await?;
    let tenant = loadgen::tenant_name(0);
    let now = Utc::now();
    let class = book
        .class_at(&tenant, "auto:balanced", now)
        .ok_or_else(|| anyhow::anyhow!("no auto:balanced class"))?;
    let candidates = eligible(class);
    let (positions, reserved, commitments, provider_minute) = Default::default();
    let provider_period = Default::default();
    let ctx = QuoteContext {
        book: &book,
        tenant_id: &tenant,
        currency: "USD",
        tiers: &positions,
        reserved: &reserved,
        commitments: &commitments,
        provider_minute: &provider_minute,
        provider_period: &provider_period,
        at: now,
    };
    let mix = TokenMix {
        input_tokens: 3000,
        cached_input_tokens: 1000,
        output_tokens: 800,
        ..Default::default()
    };
    let one = [candidates[0].clone()];
    let time = |f: &dyn Fn()| {
        for _ in 0..2_000 {
            f();
        }
        let mut us = Vec::with_capacity(20_000);
        for _ in 0..20_000 {
            let t = Instant::now();
            f();
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
        percentiles(us)
    };
    let (b50, b99) = time(&|| {
        std::hint::black_box(quote(&ctx, &mix, &one));
    });
    let (q50, q99) = time(&|| {
        std::hint::black_box(quote(&ctx, &mix, &candidates));
    });
    println!(
        "(q) quote in process, {} candidates: p50 {q50:.1} µs, p99 {q99:.1} µs; one candidate: p50 {b50:.1} µs, p99 {b99:.1} µs (ratio p99 {:.1})",
        candidates.len(),
        q99 / b99
    );
    Ok(())
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> anyhow::Result<Conn> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Conn {
            s,
            buf: Vec::with_capacity(16 << 10),
        })
    }

    /// Send one request and read the whole response; returns the status.
    async fn call(&mut self, req: &[u8]) -> anyhow::Result<u16> {
        self.s.write_all(req).await?;
        self.buf.clear();
        loop {
            let mut chunk = [0u8; 8192];
            let n = self.s.read(&mut chunk).await?;
            anyhow::ensure!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])?;
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    let status = head.get(9..12).and_then(|x| x.parse().ok()).unwrap_or(0);
                    return Ok(status);
                }
            }
        }
    }
}

/// Requests/s of `req` over `conns` keep-alive connections for `secs`.
async fn hammer(
    addr: std::net::SocketAddr,
    req: Vec<u8>,
    conns: usize,
    secs: u64,
) -> anyhow::Result<f64> {
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
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = t.elapsed().as_secs_f64();
    for t in tasks {
        t.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / elapsed)
}

/// (h) Quotes over HTTP, beside `/healthz` over the same number of connections.
pub async fn quote_http(s0: &Settings, _a: &BenchArgs) -> anyhow::Result<()> {
    let (mut s, pool, _b) = fresh(s0, "h", 1).await?;
    with_terms(&pool, 1).await?;
    s.http_addr = "127.0.0.1:0".into();
    s.roles = vec!["api".into()];
    let app = crate::app::App::build(s.clone()).await?;
    let addr = app.addr.ok_or_else(|| anyhow::anyhow!("no listener"))?;
    let cancel = app.cancel.clone();
    let task = tokio::spawn(app.run_until_stopped());
    let token = &s.admin_token;
    let body = format!(
        r#"{{"tenant_id":"{}","routing_class":"auto:balanced","input_tokens":3000,"cached_input_tokens":1000,"output_tokens":800}}"#,
        loadgen::tenant_name(0)
    );
    let quote_req = format!(
        "POST /v1/quote HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let health = "GET /healthz HTTP/1.1\r\nhost: bench\r\n\r\n".to_string();
    let conns = 16;
    let h = hammer(addr, health.into_bytes(), conns, 3).await?;
    let q = hammer(addr, quote_req.into_bytes(), conns, 5).await?;
    println!(
        "(h) quotes over HTTP ({conns} connections): {q:>9.0} requests/s; /healthz {h:.0} requests/s (ratio {:.2})",
        q / h
    );
    cancel.cancel();
    task.await??;
    Ok(())
}

/// (z) Authorisations against one hot blocking budget, in process through the group
/// commit, beside the naive way: one transaction per request locking the budget's row.
pub async fn authorizations(s0: &Settings, _a: &BenchArgs) -> anyhow::Result<()> {
    let (_s, pool, _b) = fresh(s0, "z", 2).await?;
    let tenant = loadgen::tenant_name(0);
    // the same budget on a second tenant, for the router's leased path
    let leased_tenant = loadgen::tenant_name(1);
    // worst case per request: 1,000 input + 500 output tokens of gpt-4o-mini, a few
    // hundredths of a cent; the limit admits about half of what the run asks for
    let limit = 10;
    catalog::budgets::add(
        &pool,
        &tenant,
        budget("hot", BudgetScope::Tenant, "", BudgetAction::Block, limit),
        Utc::now(),
        chrono::Duration::minutes(5),
    )
    .await?;
    catalog::budgets::add(
        &pool,
        &leased_tenant,
        budget("hot", BudgetScope::Tenant, "", BudgetAction::Block, limit),
        Utc::now(),
        chrono::Duration::minutes(5),
    )
    .await?;
    let secs = 5;
    let clients = 256;
    // baseline: one durable round trip per request: lock the tenant's row (the lock the
    // authorizer takes), append one row, commit
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (stop, done, pool, tenant) = (stop.clone(), done.clone(), pool.clone(), tenant.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut tx = pool.begin().await?;
                sqlx::query("select last_seq from tenant_heads where tenant_id = $1 for update")
                    .bind(&tenant)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "insert into auth_settlements (hold_id, tenant_id, event_id)
                     values (gen_random_uuid(), $1, 'bench-baseline')",
                )
                .bind(&tenant)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks.drain(..) {
        t.await??;
    }
    let naive = done.load(Ordering::Relaxed) as f64 / secs as f64;
    // the authorizer
    let auth = Authorizer::start(pool.clone(), Duration::from_secs(3600), s0.grant_flush);
    let req = AuthRequest {
        tenant_id: None,
        api_key_id: Some("key-0".into()),
        tags: Default::default(),
        model: "gpt-4o-mini".into(),
        provider: Some("openai".into()),
        region: None,
        estimated_input_tokens: 1000,
        max_tokens: Some(500),
        n: None,
        routable: None,
    };
    let (a, d, elapsed) = hammer_auth(&auth, &tenant, &req, clients, secs, false).await?;
    let rate = (a + d) as f64 / elapsed;
    let held: Decimal =
        sqlx::query_scalar("select coalesce(sum(amount), 0) from auth_hold_budgets")
            .fetch_one(&pool)
            .await?;
    println!(
        "(z) authorisations on one hot blocking budget ({clients} clients): {rate:>9.0}/s ({a} allowed, {d} denied; holds {held} <= limit {limit}: {}); naive per-request transaction {naive:.0}/s (ratio {:.1})",
        held <= Decimal::from(limit),
        rate / naive
    );
    // the router's path: granted in memory from leases, written behind
    let (a, d, elapsed) = hammer_auth(&auth, &leased_tenant, &req, clients, secs, true).await?;
    // the authorizer writes what it granted and releases its leases when dropped
    drop(auth);
    let mut recorded = 0;
    for _ in 0..100 {
        recorded = sqlx::query_scalar::<_, i64>(
            "select count(*) from authorizations where tenant_id = $1 and decision = 'allow'",
        )
        .bind(&leased_tenant)
        .fetch_one(&pool)
        .await?;
        if recorded as u64 >= a {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held: Decimal = sqlx::query_scalar(
        "select coalesce(sum(h.amount), 0) from auth_hold_budgets h
         join authorizations a on a.id = h.hold_id where a.tenant_id = $1 and a.decision = 'allow'",
    )
    .bind(&leased_tenant)
    .fetch_one(&pool)
    .await?;
    let leases: i64 = sqlx::query_scalar(
        "select count(*) from authorizations where tenant_id = $1 and decision = 'lease'",
    )
    .bind(&leased_tenant)
    .fetch_one(&pool)
    .await?;
    let lrate = (a + d) as f64 / elapsed;
    println!(
        "(z) leased (the router's path), same budget on another tenant: {lrate:>9.0}/s ({a} allowed, {d} denied, {recorded} grants recorded, {leases} leases; grant holds {held} <= limit {limit}: {}); ratio to the group commit {:.1}",
        held <= Decimal::from(limit),
        lrate / rate
    );
    Ok(())
}

/// Hammer an authorizer from `clients` tasks for `secs` seconds; (allowed, denied, seconds).
async fn hammer_auth(
    auth: &Authorizer,
    tenant: &str,
    req: &AuthRequest,
    clients: usize,
    secs: u64,
    leased: bool,
) -> anyhow::Result<(u64, u64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let allowed = Arc::new(AtomicU64::new(0));
    let denied = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let t = Instant::now();
    for _ in 0..clients {
        let (stop, allowed, denied, auth, req, tenant) = (
            stop.clone(),
            allowed.clone(),
            denied.clone(),
            auth.clone(),
            req.clone(),
            tenant.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let d = if leased {
                    auth.authorize_leased(tenant.clone(), req.clone()).await
                } else {
                    auth.authorize(tenant.clone(), req.clone()).await
                }
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                match d.decision {
                    Verdict::Deny => denied.fetch_add(1, Ordering::Relaxed),
                    _ => allowed.fetch_add(1, Ordering::Relaxed),
                };
                // a caller does other work between requests
                tokio::task::yield_now().await;
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok((
        allowed.load(Ordering::Relaxed),
        denied.load(Ordering::Relaxed),
        t.elapsed().as_secs_f64(),
    ))
}
