//! The ledger writer's consume loop. One fetcher pulls continuously from the durable
//! consumer and routes each message by tenant (the subject's last token) to one of
//! `TOKENLEDGER_WRITERS` writer tasks; each batches, applies in one transaction, and
//! acks after the commit. Routing by tenant keeps one tenant's events in one task, in
//! order, so writers never wait on each other's tenant locks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{message::Message, AckKind};
use futures::StreamExt;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Bus;
use crate::ledger::{Inbound, Outcome, Writer};
use crate::settings::Settings;
use crate::telemetry::Metrics;

/// Told after every commit: when, and the stream sequences committed (benchmarks).
pub type CommitObserver = mpsc::UnboundedSender<(Instant, Vec<u64>)>;

struct Shared {
    s: Settings,
    metrics: Metrics,
    cancel: CancellationToken,
    observer: Option<CommitObserver>,
    commits: AtomicU64,
}

/// Run the writers until `cancel` fires; each finishes the batch in flight first.
pub async fn run_writer(
    bus: Bus,
    pool: PgPool,
    s: Settings,
    metrics: Metrics,
    cancel: CancellationToken,
    observer: Option<CommitObserver>,
) -> anyhow::Result<()> {
    let consumer = bus.ensure_consumer().await?;
    let k = s.writers.max(1);
    let shared = Arc::new(Shared {
        s: s.clone(),
        metrics,
        cancel: cancel.clone(),
        observer,
        commits: AtomicU64::new(0),
    });
    let mut tasks = tokio::task::JoinSet::new();
    let mut routes = Vec::with_capacity(k);
    for _ in 0..k {
        let (tx, rx) = mpsc::channel::<Message>(s.batch_max);
        routes.push(tx);
        let writer =
            Writer::new(pool.clone(), &s.subject_prefix).lookup_batches(s.writer_lookup_batches);
        tasks.spawn(writer_task(rx, writer, shared.clone()));
    }
    'outer: while !cancel.is_cancelled() {
        let mut msgs = consumer
            .stream()
            .max_messages_per_batch(s.batch_max * k)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await?;
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => break 'outer,
                m = msgs.next() => m,
            };
            match next {
                None => continue 'outer,
                Some(Err(e)) => tracing::warn!(error = %e, "pull stream error"),
                Some(Ok(m)) => {
                    let route = partition(&m.subject, k);
                    if routes[route].send(m).await.is_err() {
                        break 'outer; // a writer failed; its error is reported below
                    }
                }
            }
        }
    }
    drop(routes);
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    tracing::info!("ledger writers stopped");
    Ok(())
}

/// The writer task a subject's tenant (its last token) belongs to: the tenant's routing
/// byte mod `k`, the same byte that picks its lane in the projections all tenants add to,
/// so writer tasks never share a row there.
fn partition(subject: &str, k: usize) -> usize {
    let tenant = subject.rsplit('.').next().unwrap_or(subject);
    crate::ledger::tenant_byte(tenant) as usize % k
}

async fn writer_task(
    mut rx: mpsc::Receiver<Message>,
    mut writer: Writer,
    sh: Arc<Shared>,
) -> anyhow::Result<()> {
    let s = &sh.s;
    // acks go out from a task of their own, so the next batch is gathered while the
    // last one's acks are sent; they still leave only after the commit
    let (ack_tx, ack_rx) = mpsc::channel::<(Vec<Message>, Vec<Outcome>)>(4);
    let acker = tokio::spawn(ack_loop(ack_rx, sh.metrics.clone()));
    while let Some(first) = rx.recv().await {
        let mut batch: Vec<Message> = Vec::with_capacity(s.batch_max);
        batch.push(first);
        let deadline = tokio::time::Instant::now() + s.batch_wait;
        while batch.len() < s.batch_max {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => batch.push(m),
                Ok(None) | Err(_) => break,
            }
        }
        let Some(outcomes) = apply(&mut writer, &batch, &sh).await else {
            break;
        };
        let n = sh.commits.fetch_add(1, Ordering::SeqCst) + 1;
        if s.fault_abort_after_commit.is_some_and(|f| n >= f) {
            tracing::error!("fault injection: aborting after commit, before ack");
            std::process::abort();
        }
        if ack_tx.send((batch, outcomes)).await.is_err() {
            break;
        }
        if sh.cancel.is_cancelled() {
            break; // the rest is unacked and will be redelivered
        }
    }
    drop(ack_tx);
    acker.await?;
    Ok(())
}

async fn ack_loop(mut rx: mpsc::Receiver<(Vec<Message>, Vec<Outcome>)>, metrics: Metrics) {
    while let Some((batch, outcomes)) = rx.recv().await {
        for (m, o) in batch.iter().zip(&outcomes) {
            let (name, kind) = match o {
                Outcome::Applied => ("tokenledger_events_applied_total", AckKind::Ack),
                Outcome::Duplicate => ("tokenledger_events_duplicate_total", AckKind::Ack),
                Outcome::Conflict => ("tokenledger_events_conflict_total", AckKind::Ack),
                Outcome::DeadLettered(_) => ("tokenledger_dead_letters_total", AckKind::Term),
            };
            metrics.inc(name, 1);
            if let Err(e) = m.ack_with(kind).await {
                // harmless: the message is redelivered and is then a duplicate
                tracing::warn!(error = %e, "ack failed");
            }
        }
    }
}

/// Apply one batch (retrying on database errors); `None` if shutdown interrupted the
/// retries, in which case nothing was committed and nothing may be acked.
async fn apply(writer: &mut Writer, batch: &[Message], sh: &Shared) -> Option<Vec<Outcome>> {
    let inbound: Vec<Inbound> = batch
        .iter()
        .map(|m| Inbound {
            subject: m.subject.to_string(),
            payload: m.payload.clone(),
            stream_seq: m.info().ok().map(|i| i.stream_sequence),
        })
        .collect();
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let outcomes = loop {
        let span = tracing::info_span!("apply_batch", size = inbound.len());
        match writer
            .apply(&inbound, chrono::Utc::now())
            .instrument(span)
            .await
        {
            Ok(o) => break o,
            Err(e) => {
                sh.metrics.inc("tokenledger_writer_errors_total", 1);
                tracing::error!(error = %e, "batch failed; nothing was committed, retrying");
                if sh.cancel.is_cancelled() {
                    return None; // not acked: JetStream redelivers after the ack wait
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    let committed = Instant::now();
    sh.metrics.observe_batch(committed - started, batch.len());
    if let Some(o) = &sh.observer {
        let _ = o.send((
            committed,
            inbound.iter().filter_map(|m| m.stream_seq).collect(),
        ));
    }
    Some(outcomes)
}
