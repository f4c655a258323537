//! Publishing the router's usage events: pipelined JetStream publishes; whatever JetStream
//! does not acknowledge in time (NATS down, slow, restarting) goes to the durable spool
//! table and is re-driven from there, deleted only once JetStream acknowledged it.
//!
//! Each event's id is the request id and its `Nats-Msg-Id` a hash of tenant, id and
//! payload, so a publish that is retried (from the spool, or after a reconnect flushed
//! a message the router had already given up on) is a duplicate: dropped by JetStream's
//! window, or by the ledger's unique keys after it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::events::Event;
use crate::settings::Settings;
use crate::telemetry::Metrics;

/// How long a publish (into the client's buffer, then to JetStream's ack) may take before
/// the event is spooled instead.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Events per publishing round and per spool re-drive round.
const ROUND: usize = 512;

/// One message, ready to publish or spool.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub msg_id: String,
    pub subject: String,
    pub payload: Bytes,
}

impl Outgoing {
    pub fn of(ev: &Event, settings: &Settings) -> Outgoing {
        Outgoing {
            msg_id: ev.msg_id(),
            subject: settings.usage_subject(ev.tenant_id()),
            payload: Bytes::from(ev.canonical.clone()),
        }
    }
}

enum Msg {
    Event(Outgoing),
    Flush(oneshot::Sender<()>),
}

/// The handle requests publish through; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Publisher {
    pub fn publish(&self, o: Outgoing) {
        if let Err(mpsc::error::SendError(Msg::Event(o))) = self.tx.send(Msg::Event(o)) {
            // only after shutdown: nothing may be lost, so say exactly what was not sent
            tracing::error!(msg_id = %o.msg_id, subject = %o.subject, "usage event after the publisher stopped");
        }
    }

    /// Wait until everything handed over so far is acknowledged or spooled.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Events waiting for the spool table when even Postgres is unavailable.
type Pending = Arc<Mutex<Vec<Outgoing>>>;

/// Start the publishing task and the spool re-drive task.
pub fn start(
    js: jetstream::Context,
    pool: PgPool,
    metrics: Metrics,
    linger: Duration,
    cancel: CancellationToken,
) -> Publisher {
    let (tx, rx) = mpsc::unbounded_channel();
    let pending: Pending = Arc::default();
    tokio::spawn(run(
        js.clone(),
        pool.clone(),
        metrics.clone(),
        linger,
        rx,
        pending.clone(),
    ));
    tokio::spawn(redrive(js, pool, metrics, pending, cancel));
    Publisher { tx }
}

/// Publish messages pipelined (all sent, then every ack awaited); which were acknowledged.
/// The round shares one deadline for its sends and one for its acks, so while NATS is
/// down a whole round is given up (and spooled) after at most twice `ACK_TIMEOUT`, not
/// after that long per event.
async fn publish_all(js: &jetstream::Context, msgs: &[Outgoing]) -> Vec<bool> {
    let mut acks = Vec::with_capacity(msgs.len());
    let sent_by = tokio::time::Instant::now() + ACK_TIMEOUT;
    for o in msgs {
        let msg = jetstream::message::PublishMessage::build()
            .payload(o.payload.clone())
            .message_id(&o.msg_id);
        acks.push(tokio::time::timeout_at(sent_by, js.send_publish(o.subject.clone(), msg)).await);
    }
    let acked_by = tokio::time::Instant::now() + ACK_TIMEOUT;
    let mut out = Vec::with_capacity(msgs.len());
    for sent in acks {
        out.push(match sent {
            Ok(Ok(ack)) => matches!(tokio::time::timeout_at(acked_by, ack).await, Ok(Ok(_))),
            _ => false,
        });
    }
    out
}

async fn run(
    js: jetstream::Context,
    pool: PgPool,
    metrics: Metrics,
    linger: Duration,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    pending: Pending,
) {
    let mut inflight: JoinSet<()> = JoinSet::new();
    let mut buf = Vec::with_capacity(ROUND);
    while rx.recv_many(&mut buf, ROUND).await > 0 {
        // gather the round for `linger` after its first event (a flush ends it at once):
        // one write to NATS for many events, and JetStream stores, acknowledges and
        // delivers them to the ledger's consumer together
        let until = tokio::time::Instant::now() + linger;
        let mut flush = buf.iter().any(|m| matches!(m, Msg::Flush(_)));
        while buf.len() < ROUND && !flush {
            let (from, room) = (buf.len(), ROUND - buf.len());
            match tokio::time::timeout_at(until, rx.recv_many(&mut buf, room)).await {
                Ok(n) if n > 0 => flush = buf[from..].iter().any(|m| matches!(m, Msg::Flush(_))),
                _ => break,
            }
        }
        let mut round = Vec::new();
        let mut flushes = Vec::new();
        for m in buf.drain(..) {
            match m {
                Msg::Event(o) => round.push(o),
                Msg::Flush(f) => flushes.push(f),
            }
        }
        // reap finished rounds so the set does not grow
        while inflight.try_join_next().is_some() {}
        if !round.is_empty() {
            let (js, pool, metrics, pending) =
                (js.clone(), pool.clone(), metrics.clone(), pending.clone());
            inflight.spawn(async move {
                let acked = publish_all(&js, &round).await;
                let mut failed = Vec::new();
                for (o, ok) in round.into_iter().zip(acked) {
                    if ok {
                        metrics.inc("tokenledger_router_events_published_total", 1);
                    } else {
                        failed.push(o);
                    }
                }
                if !failed.is_empty() {
                    spool(&pool, &metrics, &pending, failed).await;
                }
            });
        }
        if !flushes.is_empty() {
            while inflight.join_next().await.is_some() {}
            for f in flushes {
                let _ = f.send(());
            }
        }
    }
    while inflight.join_next().await.is_some() {}
}

/// Put events into the spool table (or, if that fails too, keep them in memory for the
/// re-drive task to spool).
async fn spool(pool: &PgPool, metrics: &Metrics, pending: &Pending, events: Vec<Outgoing>) {
    let n = events.len();
    match insert(pool, &events).await {
        Ok(()) => {
            metrics.inc("tokenledger_router_events_spooled_total", n as u64);
            tracing::warn!(
                events = n,
                "JetStream did not acknowledge; usage events spooled"
            );
        }
        Err(e) => {
            tracing::error!(error = %e, events = n, "spooling failed; keeping events in memory");
            pending.lock().expect("pending lock").extend(events);
        }
    }
}

async fn insert(pool: &PgPool, events: &[Outgoing]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into router_spool (msg_id, subject, payload)
         select * from unnest($1::text[], $2::text[], $3::bytea[])
         on conflict (msg_id) do nothing",
    )
    .bind(events.iter().map(|o| o.msg_id.clone()).collect::<Vec<_>>())
    .bind(events.iter().map(|o| o.subject.clone()).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .map(|o| o.payload.to_vec())
            .collect::<Vec<_>>(),
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Every second: spool what is pending in memory, then publish the oldest spooled events
/// (rows locked, so several routers never work on the same ones) and delete those
/// JetStream acknowledged.
async fn redrive(
    js: jetstream::Context,
    pool: PgPool,
    metrics: Metrics,
    pending: Pending,
    cancel: CancellationToken,
) {
    loop {
        let stop = tokio::select! {
            _ = cancel.cancelled() => true,
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
        };
        let held: Vec<Outgoing> = std::mem::take(&mut *pending.lock().expect("pending lock"));
        if !held.is_empty() {
            if let Err(e) = insert(&pool, &held).await {
                tracing::error!(error = %e, events = held.len(), "spooling still failing");
                pending.lock().expect("pending lock").extend(held);
            } else {
                metrics.inc("tokenledger_router_events_spooled_total", held.len() as u64);
            }
        }
        if stop {
            return;
        }
        match redrive_round(&js, &pool).await {
            Ok(0) => {}
            Ok(n) => {
                metrics.inc("tokenledger_router_events_redriven_total", n as u64);
                tracing::info!(events = n, "spooled usage events published");
            }
            Err(e) => tracing::warn!(error = %e, "spool re-drive round failed"),
        }
    }
}

/// One re-drive round; returns how many spooled events JetStream acknowledged.
pub async fn redrive_round(js: &jetstream::Context, pool: &PgPool) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "select msg_id, subject, payload from router_spool
         order by spooled_at limit $1 for update skip locked",
    )
    .bind(ROUND as i64)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let outs: Vec<Outgoing> = rows
        .into_iter()
        .map(|(msg_id, subject, payload)| Outgoing {
            msg_id,
            subject,
            payload: Bytes::from(payload),
        })
        .collect();
    let acked = publish_all(js, &outs).await;
    let done: Vec<String> = outs
        .into_iter()
        .zip(acked)
        .filter(|(_, ok)| *ok)
        .map(|(o, _)| o.msg_id)
        .collect();
    sqlx::query("delete from router_spool where msg_id = any($1)")
        .bind(&done)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(done.len())
}
