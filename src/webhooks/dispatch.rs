//! The dispatcher: fans new alert facts out into messages (one per subscribed, enabled
//! endpoint of the tenant), claims due messages (`FOR UPDATE SKIP LOCKED`, so any number of
//! dispatchers can run), and delivers each attempt signed per Standard Webhooks.
//!
//! A claim takes the attempt's number and leases the message (its next attempt time moves
//! past the attempt's deadline), in one statement; the attempt's outcome is written only
//! under that attempt number, and the attempt log's key (message, attempt) refuses a second
//! record of one attempt. A dispatcher killed mid-delivery leaves the message leased; when
//! the lease runs out another dispatcher tries it again under a new attempt number (at
//! least once, never lost).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::Rng;
use reqwest::header::{HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::{alert_body, guard, message_id, sign};
use crate::settings::WebhookSettings;

/// Response bytes read at most; the first `LOGGED` are kept in the attempt log.
const READ_CAP: usize = 64 * 1024;
const LOGGED: usize = 1024;
/// Alert facts fanned out per round.
const FANOUT_BATCH: i64 = 1000;
/// How long after its transaction started an alert fact must have committed: below the
/// oldest fact older than this, the fan-out stops looking.
const COMMIT_HORIZON: &str = "10 minutes";

/// (id, tenant, type, payload, occurred_at, recorded_at) of an alert fact.
type FactRow = (i64, String, String, Value, DateTime<Utc>, DateTime<Utc>);

/// A claimed attempt.
#[derive(Clone, Debug)]
struct Claimed {
    id: String,
    tenant_id: String,
    endpoint_id: Uuid,
    body: String,
    attempt: i32,
    schedule_pos: i32,
    url: String,
    secrets: Vec<String>,
}

/// A finished attempt, to be recorded.
struct Done {
    m: Claimed,
    started: DateTime<Utc>,
    latency: i32,
    out: Outcome,
}

/// What one attempt came to.
#[derive(Debug, Default)]
struct Outcome {
    status: Option<u16>,
    error: Option<String>,
    body: Option<String>,
    retry_after: Option<Duration>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

pub struct Dispatcher {
    pool: PgPool,
    settings: WebhookSettings,
    /// HTTP clients per (host, vetted addresses): a client connects only to the addresses
    /// it was built for, and keeps its connections for the next message to that host.
    clients: Mutex<HashMap<(String, Vec<SocketAddr>), reqwest::Client>>,
}

impl Dispatcher {
    pub fn new(pool: PgPool, settings: WebhookSettings) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            pool,
            settings,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The lease a claim takes: longer than an attempt can last.
    fn lease(&self) -> Duration {
        self.settings.timeout * 2 + Duration::from_secs(2)
    }

    /// Make messages from alert facts not fanned out yet; returns how many facts it saw.
    pub async fn fanout(&self) -> sqlx::Result<usize> {
        let low: i64 = sqlx::query_scalar("select low_id from webhook_cursor where id = 1")
            .fetch_one(&self.pool)
            .await?;
        let facts: Vec<FactRow> = sqlx::query_as(
            "select a.id, a.tenant_id, a.type, a.payload, a.occurred_at, a.recorded_at
                 from alert_facts a
                 where a.id > $1
                   and not exists (select 1 from webhook_fanout f where f.alert_fact_id = a.id)
                 order by a.id limit $2",
        )
        .bind(low)
        .bind(FANOUT_BATCH)
        .fetch_all(&self.pool)
        .await?;
        if !facts.is_empty() {
            let mut tenants: Vec<&str> = facts.iter().map(|f| f.1.as_str()).collect();
            tenants.sort();
            tenants.dedup();
            let endpoints: Vec<(Uuid, String, Vec<String>, DateTime<Utc>)> = sqlx::query_as(
                "select id, tenant_id, event_types, created_at from webhook_endpoints
                 where enabled and tenant_id = any($1)",
            )
            .bind(&tenants)
            .fetch_all(&self.pool)
            .await?;
            let (mut ids, mut ts, mut eps, mut fids, mut types, mut bodies) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for (fid, tenant, ty, payload, occurred, recorded) in &facts {
                for (eid, et, subscribed, created) in &endpoints {
                    // an endpoint gets the alerts recorded after it was registered
                    if et != tenant
                        || created > recorded
                        || !(subscribed.is_empty() || subscribed.iter().any(|s| s == ty))
                    {
                        continue;
                    }
                    ids.push(message_id());
                    ts.push(tenant.clone());
                    eps.push(*eid);
                    fids.push(*fid);
                    types.push(ty.clone());
                    bodies.push(alert_body(tenant, *fid, ty, *occurred, payload));
                }
            }
            let first = self.settings.schedule[0];
            let seen: Vec<i64> = facts.iter().map(|f| f.0).collect();
            // concurrent dispatchers may fan the same fact out: the (endpoint, fact) key
            // keeps one message
            sqlx::query(
                "with m as (insert into webhook_messages (id, tenant_id, endpoint_id, alert_fact_id,
                     type, body, status, next_attempt_at)
                   select i, t, e, f, y, b, 'pending', now() + $7
                   from unnest($1::text[], $2::text[], $3::uuid[], $4::int8[], $5::text[], $6::text[])
                     as x(i, t, e, f, y, b)
                   on conflict do nothing returning 1)
                 insert into webhook_fanout (alert_fact_id) select unnest($8::int8[])
                 on conflict do nothing",
            )
            .bind(&ids)
            .bind(&ts)
            .bind(&eps)
            .bind(&fids)
            .bind(&types)
            .bind(&bodies)
            .bind(first)
            .bind(&seen)
            .execute(&self.pool)
            .await?;
        }
        if (facts.len() as i64) < FANOUT_BATCH {
            // everything above `low` is fanned out or too young to be sure no earlier id is
            // still to commit: move `low` up to the newest fact past the horizon
            sqlx::query(&format!(
                "with n as (update webhook_cursor c set low_id = greatest(c.low_id, coalesce(
                     (select max(id) from alert_facts
                      where id > $1 and recorded_at < now() - interval '{COMMIT_HORIZON}'), c.low_id))
                   where c.id = 1 returning low_id)
                 delete from webhook_fanout where alert_fact_id <= (select low_id from n)"
            ))
            .bind(low)
            .execute(&self.pool)
            .await?;
        }
        Ok(facts.len())
    }

    /// Claim up to `n` due messages of enabled endpoints: the attempt number and the lease
    /// are taken in the same statement that locks them.
    async fn claim(&self, n: usize) -> sqlx::Result<Vec<Claimed>> {
        let rows: Vec<(String, String, Uuid, String, i32, i32, String)> = sqlx::query_as(
            "with due as (
               select m.id from webhook_messages m
               join webhook_endpoints e on e.id = m.endpoint_id and e.enabled
               where m.status = 'pending' and m.next_attempt_at <= now()
               order by m.next_attempt_at limit $1
               for update of m skip locked)
             update webhook_messages m set attempts = m.attempts + 1,
               schedule_pos = m.schedule_pos + 1, next_attempt_at = now() + $2, updated_at = now()
             from due, webhook_endpoints e
             where m.id = due.id and e.id = m.endpoint_id
             returning m.id, m.tenant_id, m.endpoint_id, m.body, m.attempts, m.schedule_pos, e.url",
        )
        .bind(n as i64)
        .bind(self.lease())
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(vec![]);
        }
        let eps: Vec<Uuid> = rows.iter().map(|r| r.2).collect();
        let secrets: Vec<(Uuid, String)> = sqlx::query_as(
            "select endpoint_id, secret from webhook_secrets
             where endpoint_id = any($1) and (expires_at is null or expires_at > now())
             order by created_at desc",
        )
        .bind(&eps)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, tenant_id, endpoint_id, body, attempt, schedule_pos, url)| Claimed {
                    secrets: secrets
                        .iter()
                        .filter(|s| s.0 == endpoint_id)
                        .map(|s| s.1.clone())
                        .collect(),
                    id,
                    tenant_id,
                    endpoint_id,
                    body,
                    attempt,
                    schedule_pos,
                    url,
                },
            )
            .collect())
    }

    fn client(&self, t: &guard::Target) -> reqwest::Client {
        let host = t
            .domain
            .clone()
            .unwrap_or_else(|| t.url.host_str().unwrap_or_default().to_string());
        let key = (host, t.addrs.clone());
        let mut clients = self.clients.lock().expect("clients");
        if let Some(c) = clients.get(&key) {
            return c.clone();
        }
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // a proxy from the environment would connect somewhere the guard never saw
            .no_proxy()
            .connect_timeout(self.settings.timeout.min(Duration::from_secs(10)))
            .timeout(self.settings.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("tokenledger-webhooks/", env!("CARGO_PKG_VERSION")));
        if let Some(d) = &t.domain {
            b = b.resolve_to_addrs(d, &t.addrs);
        }
        let c = b.build().expect("webhook client");
        if clients.len() >= 256 {
            clients.clear();
        }
        clients.insert(key, c.clone());
        c
    }

    /// One attempt: vet the URL (resolving its host once), POST the signed body to the
    /// vetted address, read a bounded response.
    async fn attempt(&self, m: &Claimed) -> Outcome {
        let target = match guard::vet(&m.url, &self.settings.allow).await {
            Ok(t) => t,
            Err(e) => {
                return Outcome {
                    error: Some(format!("not sent: {e}")),
                    ..Outcome::default()
                }
            }
        };
        let client = self.client(&target);
        let ts = Utc::now().timestamp();
        let sig = sign::header(&m.secrets, &m.id, ts, m.body.as_bytes());
        let req = client
            .post(target.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("webhook-id", &m.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(m.body.clone());
        let run = async {
            let mut resp = req.send().await?;
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let mut buf = Vec::new();
            while buf.len() < READ_CAP {
                match resp.chunk().await? {
                    Some(c) => buf.extend_from_slice(&c[..c.len().min(READ_CAP - buf.len())]),
                    None => break,
                }
            }
            Ok::<_, reqwest::Error>((status, retry_after, location, buf))
        };
        match tokio::time::timeout(self.settings.timeout, run).await {
            Err(_) => Outcome {
                error: Some(format!(
                    "timed out after {} ms",
                    self.settings.timeout.as_millis()
                )),
                ..Outcome::default()
            },
            Ok(Err(e)) => Outcome {
                error: Some(format!("request failed: {}", error_chain(&e))),
                ..Outcome::default()
            },
            Ok(Ok((status, retry_after, location, buf))) => {
                let logged = String::from_utf8_lossy(&buf[..buf.len().min(LOGGED)]).to_string();
                let error = match status {
                    200..=299 => None,
                    300..=399 => Some(format!(
                        "redirects are not followed ({status} to {})",
                        location.as_deref().unwrap_or("no location")
                    )),
                    410 => Some("410 Gone: the endpoint is disabled".into()),
                    _ => Some(format!("HTTP {status}")),
                };
                Outcome {
                    status: Some(status),
                    error,
                    body: Some(logged),
                    retry_after,
                }
            }
        }
    }

    /// Make one claimed attempt; what came of it is recorded by `record` (in batches).
    async fn deliver(&self, m: Claimed) -> Done {
        let started = Utc::now();
        let t0 = Instant::now();
        let out = self.attempt(&m).await;
        let latency = t0.elapsed().as_millis().min(i32::MAX as u128) as i32;
        Done {
            m,
            started,
            latency,
            out,
        }
    }

    /// Record a batch of attempts in one transaction: the attempt log (whose key refuses a
    /// second record of one attempt), each message's outcome under its attempt number,
    /// and the endpoints' failing clocks; disable what answered 410 or failed for too long.
    async fn record(&self, done: &[Done]) -> sqlx::Result<()> {
        let n = done.len();
        let (mut ids, mut attempts, mut endpoints, mut urls, mut started, mut latency) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut status, mut error, mut body, mut outcome, mut delay) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for d in done {
            let gone = d.out.status == Some(410);
            let next = (!gone && !d.out.ok())
                .then(|| {
                    self.settings
                        .schedule
                        .get(d.m.schedule_pos as usize)
                        .copied()
                })
                .flatten()
                .map(|x| self.delay(x, d.out.retry_after));
            ids.push(d.m.id.clone());
            attempts.push(d.m.attempt);
            endpoints.push(d.m.endpoint_id);
            urls.push(d.m.url.clone());
            started.push(d.started);
            latency.push(d.latency);
            status.push(d.out.status.map(i32::from));
            error.push(d.out.error.clone());
            body.push(d.out.body.clone());
            outcome.push(match (d.out.ok(), next) {
                (true, _) => "succeeded",
                (false, Some(_)) => "pending",
                (false, None) => "failed",
            });
            delay.push(next.unwrap_or_default());
        }
        let mut tx = self.pool.begin().await?;
        // the outcome is written only under the number the claim took, for attempts logged
        // now (a second record of one attempt changes nothing)
        let logged: Vec<(String, i32)> = sqlx::query_as(
            "with x as (
               select * from unnest($1::text[], $2::int4[], $3::uuid[], $4::text[],
                 $5::timestamptz[], $6::int4[], $7::int4[], $8::text[], $9::text[], $10::text[],
                 $11::interval[])
                 as x(id, attempt, endpoint, url, started, latency, status, error, body, outcome,
                   delay)),
             a as (insert into webhook_attempts (message_id, attempt, endpoint_id, url, started_at,
                 latency_ms, status_code, error, response_body)
               select id, attempt, endpoint, url, started, latency, status, error, body from x
               on conflict do nothing returning message_id, attempt),
             m as (update webhook_messages m set status = x.outcome,
                 next_attempt_at = case when x.outcome = 'pending' then now() + x.delay
                   else m.next_attempt_at end,
                 last_status = x.status, last_error = x.error, updated_at = now()
               from x join a on a.message_id = x.id and a.attempt = x.attempt
               where m.id = x.id and m.attempts = x.attempt and m.status = 'pending'
               returning 1)
             select message_id, attempt from a",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(&endpoints)
        .bind(&urls)
        .bind(&started)
        .bind(&latency)
        .bind(&status)
        .bind(&error)
        .bind(&body)
        .bind(&outcome)
        .bind(&delay)
        .fetch_all(&mut *tx)
        .await?;
        let logged: std::collections::HashSet<(String, i32)> = logged.into_iter().collect();
        let done: Vec<&Done> = done
            .iter()
            .filter(|d| logged.contains(&(d.m.id.clone(), d.m.attempt)))
            .collect();
        // a success stops an endpoint's failing clock; a failure starts it
        let ok: Vec<Uuid> = done
            .iter()
            .filter(|d| d.out.ok())
            .map(|d| d.m.endpoint_id)
            .collect();
        if !ok.is_empty() {
            sqlx::query(
                "update webhook_endpoints set failing_since = null
                 where id = any($1) and failing_since is not null",
            )
            .bind(&ok)
            .execute(&mut *tx)
            .await?;
        }
        let failed: Vec<&&Done> = done.iter().filter(|d| !d.out.ok()).collect();
        if !failed.is_empty() {
            let eps: Vec<Uuid> = failed.iter().map(|d| d.m.endpoint_id).collect();
            let at: Vec<DateTime<Utc>> = failed.iter().map(|d| d.started).collect();
            let clocks: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
                "update webhook_endpoints e set failing_since = coalesce(e.failing_since, x.at)
                 from (select id, min(at) as at from unnest($1::uuid[], $2::timestamptz[])
                       as u(id, at) group by id) x
                 where e.id = x.id and e.enabled returning e.id, e.failing_since",
            )
            .bind(&eps)
            .bind(&at)
            .fetch_all(&mut *tx)
            .await?;
            let limit = chrono::Duration::from_std(self.settings.disable_after).unwrap_or_default();
            for (endpoint, since) in clocks {
                let gone = failed
                    .iter()
                    .find(|d| d.m.endpoint_id == endpoint && d.out.status == Some(410));
                let overdue = Utc::now() - since >= limit;
                if gone.is_some() || overdue {
                    let d = gone
                        .copied()
                        .or_else(|| failed.iter().copied().find(|d| d.m.endpoint_id == endpoint));
                    if let Some(d) = d {
                        let reason = if gone.is_some() { "gone" } else { "failing" };
                        disable(
                            &mut tx,
                            &d.m.tenant_id,
                            endpoint,
                            reason,
                            &d.m.url,
                            Some(since),
                        )
                        .await?;
                    }
                }
            }
        }
        tx.commit().await
    }

    /// The wait before the next attempt: the schedule's, ±10% jitter, or the receiver's
    /// `Retry-After` when that is longer (at most a day).
    fn delay(&self, scheduled: Duration, retry_after: Option<Duration>) -> Duration {
        let jittered = if scheduled.is_zero() {
            scheduled
        } else {
            scheduled.mul_f64(rand::thread_rng().gen_range(0.9..1.1))
        };
        let d = match retry_after {
            Some(r) if r > jittered => r.min(Duration::from_secs(86_400)),
            _ => jittered,
        };
        // Postgres intervals hold microseconds
        Duration::from_micros(d.as_micros() as u64)
    }
}

/// Disable an endpoint, fail its pending messages, and tell the tenant's other endpoints
/// (a `webhook.endpoint_disabled` alert fact, fanned out like any other).
async fn disable(
    tx: &mut sqlx::PgConnection,
    tenant: &str,
    endpoint: Uuid,
    reason: &str,
    url: &str,
    failing_since: Option<DateTime<Utc>>,
) -> sqlx::Result<()> {
    let at: Option<DateTime<Utc>> = sqlx::query_scalar(
        "update webhook_endpoints set enabled = false, disabled_reason = $2, disabled_at = now(),
           updated_at = now()
         where id = $1 and enabled returning disabled_at",
    )
    .bind(endpoint)
    .bind(reason)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(at) = at else {
        return Ok(());
    };
    sqlx::query(
        "update webhook_messages set status = 'failed', last_error = 'endpoint disabled',
           updated_at = now()
         where endpoint_id = $1 and status = 'pending'",
    )
    .bind(endpoint)
    .execute(&mut *tx)
    .await?;
    let payload = json!({
        "endpoint_id": endpoint,
        "url": url,
        "reason": reason,
        "failing_since": failing_since,
        "disabled_at": at,
    });
    sqlx::query(
        "insert into alert_facts (tenant_id, type, unique_key, payload, occurred_at)
         values ($1, 'webhook.endpoint_disabled', $2, $3, $4)
         on conflict (tenant_id, type, unique_key) do nothing",
    )
    .bind(tenant)
    .bind(format!(
        "{endpoint}/{}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    ))
    .bind(payload)
    .bind(at)
    .execute(&mut *tx)
    .await?;
    tracing::warn!(%endpoint, tenant, reason, "webhook endpoint disabled");
    Ok(())
}

/// `Retry-After`: delay-seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    if let Ok(s) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(s));
    }
    DateTime::parse_from_rfc2822(v.trim()).ok().map(|d| {
        (d.with_timezone(&Utc) - Utc::now())
            .to_std()
            .unwrap_or_default()
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// Run a dispatcher until cancelled: fan out, claim what is due (as many as there are free
/// delivery slots), deliver concurrently; at shutdown the attempts in flight finish.
pub async fn run(
    pool: PgPool,
    settings: WebhookSettings,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let d = Dispatcher::new(pool, settings.clone());
    let slots = Arc::new(Semaphore::new(settings.concurrency));
    let tracker = TaskTracker::new();
    // attempts are recorded in batches, by one task
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Done>(settings.concurrency * 4);
    let rd = d.clone();
    let recorder = tokio::spawn(async move {
        let mut batch = Vec::new();
        while let Some(first) = rx.recv().await {
            batch.push(first);
            while batch.len() < 512 {
                match rx.try_recv() {
                    Ok(x) => batch.push(x),
                    Err(_) => break,
                }
            }
            if let Err(e) = rd.record(&batch).await {
                // their leases run out and the messages are tried again
                tracing::warn!(error = %e, n = batch.len(), "recording webhook attempts failed");
            }
            batch.clear();
        }
    });
    tracing::info!("webhook dispatcher running");
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let mut busy = false;
        match d.fanout().await {
            Ok(n) => busy |= n as i64 >= FANOUT_BATCH,
            Err(e) => tracing::warn!(error = %e, "webhook fan-out failed; retrying"),
        }
        let free = slots.available_permits();
        if free > 0 {
            match d.claim(free).await {
                Ok(batch) => {
                    busy |= batch.len() == free;
                    for m in batch {
                        let permit = slots.clone().acquire_owned().await?;
                        let (d, tx) = (d.clone(), tx.clone());
                        tracker.spawn(async move {
                            let done = d.deliver(m).await;
                            // the message stays leased until its record commits; the
                            // bounded queue holds deliveries back when recording lags
                            let _ = tx.send(done).await;
                            drop(permit);
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "claiming webhook messages failed; retrying"),
            }
        }
        if !busy {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(settings.poll) => {}
            }
        } else {
            // every slot taken: wait for half of them to free up, then claim that many in
            // one statement (not one message per claim)
            let half = (settings.concurrency as u32).div_ceil(2);
            tokio::select! {
                _ = cancel.cancelled() => break,
                p = slots.clone().acquire_many_owned(half) => drop(p?),
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    drop(tx);
    recorder.await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert!(parse_retry_after("soon").is_none());
        let later = (Utc::now() + chrono::Duration::seconds(90)).to_rfc2822();
        let d = parse_retry_after(&later).unwrap();
        assert!(d > Duration::from_secs(80) && d <= Duration::from_secs(90));
    }
}
