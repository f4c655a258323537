//! (w) Webhooks: deliveries per second from the dispatcher to a local receiver, against
//! plain HTTP POSTs of the same body to the same receiver at the same concurrency (the
//! baseline, measured in the same run); and alert latency — from publishing the usage
//! event that crosses a budget threshold to the webhook's arrival — with the ledger
//! writer and the dispatcher in this process, at a fixed ingest rate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::bench::{fresh, percentiles, publisher, BenchArgs};
use crate::settings::Settings;
use crate::{catalog, loadgen, webhooks};

#[derive(Clone, Default)]
struct Sink {
    n: Arc<AtomicU64>,
    /// (arrival, event id) of alert bodies that name their event
    arrivals: Arc<Mutex<Vec<(Instant, String)>>>,
}

async fn sink(State(s): State<Sink>, body: Bytes) -> &'static str {
    let at = Instant::now();
    s.n.fetch_add(1, Ordering::Relaxed);
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        if let Some(e) = v["data"]["event_id"].as_str() {
            s.arrivals
                .lock()
                .expect("arrivals")
                .push((at, e.to_string()));
        }
    }
    "ok"
}

async fn wait_for(n: &AtomicU64, target: u64, limit: Duration) -> bool {
    let t = Instant::now();
    while n.load(Ordering::Relaxed) < target {
        if t.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

pub async fn webhooks(s0: &Settings, a: &BenchArgs) -> anyhow::Result<()> {
    let tenants = a.tenants.max(1);
    let (mut s, pool, b) = fresh(s0, "w", tenants).await?;
    let recv = Sink::default();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let app = axum::Router::new().fallback(sink).with_state(recv.clone());
    tokio::spawn(async move { axum::serve(l, app).await });
    s.webhooks.allow = vec![addr.to_string().parse().map_err(anyhow::Error::msg)?];
    let concurrency = s.webhooks.concurrency;
    let url = format!("http://{addr}/hook");

    // baseline: plain POSTs of a message's body, `concurrency` at a time
    let body = json!({"type": "webhook.test", "timestamp": chrono::Utc::now(),
        "data": {"schema_version": 1, "tenant_id": "t", "message": "x".repeat(300)}})
    .to_string();
    let n = (a.events / 5).clamp(1_000, 20_000);
    let client = reqwest::Client::builder().no_proxy().build()?;
    let next = Arc::new(AtomicU64::new(0));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, body, next) = (client.clone(), url.clone(), body.clone(), next.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                client
                    .post(&url)
                    .body(body.clone())
                    .send()
                    .await?
                    .bytes()
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let raw = n as f64 / t.elapsed().as_secs_f64();

    // the dispatcher: n pending messages to one endpoint, claimed, signed, delivered, logged
    let tenant = loadgen::tenant_name(0);
    let allow = s.webhooks.allow.clone();
    let endpoint = |tenant: String| {
        let (pool, url, allow) = (pool.clone(), url.clone(), allow.clone());
        async move {
            let new = webhooks::NewEndpoint {
                tenant_id: None,
                url,
                description: None,
                event_types: Some(vec!["budget.threshold_crossed".into()]),
                enabled: None,
            };
            webhooks::create_endpoint(&pool, &tenant, new, &allow).await
        }
    };
    let e = endpoint(tenant.clone()).await?;
    sqlx::query(
        "insert into webhook_messages (id, tenant_id, endpoint_id, type, body, status, next_attempt_at)
         select 'msg_bench_' || g, $1, $2, 'webhook.test', $3, 'pending', now()
         from generate_series(1, $4) g",
    )
    .bind(&tenant)
    .bind(e.endpoint.id)
    .bind(&body)
    .bind(n as i64)
    .execute(&pool)
    .await?;
    recv.n.store(0, Ordering::Relaxed);
    let cancel = CancellationToken::new();
    let t = Instant::now();
    let d = tokio::spawn(webhooks::dispatch::run(
        pool.clone(),
        s.webhooks.clone(),
        cancel.clone(),
    ));
    anyhow::ensure!(
        wait_for(&recv.n, n, Duration::from_secs(300)).await,
        "deliveries did not finish"
    );
    let delivered = n as f64 / t.elapsed().as_secs_f64();
    // every attempt is logged before the message counts as succeeded
    loop {
        let left: i64 =
            sqlx::query_scalar("select count(*) from webhook_messages where status = 'pending'")
                .fetch_one(&pool)
                .await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recorded = n as f64 / t.elapsed().as_secs_f64();
    cancel.cancel();
    d.await??;
    println!(
        "(w) webhook deliveries ({n}, {concurrency} in flight): {delivered:>7.0}/s arrived, \
         {recorded:>7.0}/s with every attempt recorded; plain POSTs to the same receiver \
         {raw:>7.0}/s; ratio {:.2}",
        recorded / raw
    );

    // alert latency: every tenant has a monthly budget with ten thresholds its share of
    // the events crosses, and an endpoint for them
    let rate = 2_000u64;
    let secs = a.latency_secs.clamp(5, 60);
    let total = rate * secs;
    let per_tenant = total / tenants as u64;
    let mut p: catalog::prices::NewPrice = serde_json::from_value(json!({
        "provider": "bench", "model": "bench-model", "side": "cost", "currency": "USD",
        "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": "1", "output_per_mtok": "4"}))?;
    p.region = String::new();
    let mut tx = pool.begin().await?;
    catalog::prices::add_price(
        &mut tx,
        &p,
        chrono::Utc::now(),
        chrono::Duration::minutes(5),
    )
    .await?;
    tx.commit().await?;
    // 1,000 in at 1.2 and 200 out at 4.8 per million (with the 20% markup): 0.00216 each;
    // the limit a little under each tenant's share, so every threshold is crossed
    let amount = rust_decimal::Decimal::new(216, 5)
        * rust_decimal::Decimal::from(per_tenant)
        * rust_decimal::Decimal::new(95, 2);
    for i in 0..tenants {
        let t = loadgen::tenant_name(i);
        catalog::budgets::add(
            &pool,
            &t,
            serde_json::from_value(
                json!({"name": "bench", "scope": "tenant", "period": "month",
                "amount": amount.round_dp(6), "action": "alert",
                "thresholds": ["10","20","30","40","50","60","70","80","90","100"],
                "effective_from": "2020-01-01T00:00:00Z"}),
            )?,
            chrono::Utc::now(),
            chrono::Duration::minutes(5),
        )
        .await?;
        if i > 0 {
            endpoint(t).await?;
        }
    }
    let now = chrono::Utc::now();
    let evs: Vec<crate::events::Event> = (0..total)
        .map(|i| {
            let t = loadgen::tenant_name((i % tenants as u64) as usize);
            crate::events::parse(
                json!({"specversion": "1.0", "id": format!("w{i}"), "source": "bench",
                    "type": "tokenledger.usage.v1", "time": now.to_rfc3339(),
                    "data": {"tenant_id": t, "request_id": format!("w{i}"), "model": "bench-model",
                        "provider": "bench", "input_tokens": 1000, "output_tokens": 200,
                        "status": "ok", "latency_ms": 100}}),
                now,
            )
            .map_err(|e| anyhow::anyhow!("bench event: {e:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let expected = tenants as u64 * 10;
    recv.n.store(0, Ordering::Relaxed);
    recv.arrivals.lock().expect("arrivals").clear();
    let (cancel, w) = crate::bench::spawn_writer(&b, &pool, &s);
    let d = tokio::spawn(webhooks::dispatch::run(
        pool.clone(),
        s.webhooks.clone(),
        cancel.clone(),
    ));
    let sent = publisher(b.clone(), s.clone(), evs, rate).await??;
    let arrived = wait_for(&recv.n, expected, Duration::from_secs(60)).await;
    cancel.cancel();
    w.await??;
    d.await??;
    // the stream is fresh: event i went out as sequence i + 1
    let lat: Vec<f64> = recv
        .arrivals
        .lock()
        .expect("arrivals")
        .iter()
        .filter_map(|(at, id)| {
            let i: u64 = id.strip_prefix('w')?.parse().ok()?;
            sent.get(&(i + 1))
                .map(|p| at.duration_since(*p).as_secs_f64() * 1000.0)
        })
        .collect();
    anyhow::ensure!(!lat.is_empty(), "no alert arrived");
    let (p50, p99) = percentiles(lat.clone());
    let max = lat.iter().copied().fold(0.0, f64::max);
    println!(
        "(w) alert latency, publish of the crossing event -> webhook arrival, at {rate} events/s \
         for {secs} s ({} of {expected} alerts{}): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms \
         (dispatcher poll {} ms)",
        lat.len(),
        if arrived { "" } else { ", the rest timed out" },
        s.webhooks.poll.as_millis()
    );
    b.delete_stream().await?;
    Ok(())
}
