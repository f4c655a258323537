//! The ledger writer's consume loop: continuous pull, batch, apply, then ack.

use std::time::{Duration, Instant};

use async_nats::jetstream::{message::Message, AckKind};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Bus;
use crate::ledger::{Inbound, Outcome, Writer};
use crate::settings::Settings;
use crate::telemetry::Metrics;

/// Run the writer until `cancel` fires; the batch in flight is finished first.
pub async fn run_writer(
    bus: Bus,
    mut writer: Writer,
    s: Settings,
    metrics: Metrics,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let consumer = bus.ensure_consumer().await?;
    let mut commits: u64 = 0;
    'outer: while !cancel.is_cancelled() {
        let mut msgs = consumer
            .stream()
            .max_messages_per_batch(s.batch_max.max(100) * 2)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await?;
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => break 'outer,
                m = msgs.next() => m,
            };
            let mut batch: Vec<Message> = Vec::with_capacity(s.batch_max);
            match first {
                None => continue 'outer,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pull stream error");
                    continue;
                }
                Some(Ok(m)) => batch.push(m),
            }
            let deadline = tokio::time::Instant::now() + s.batch_wait;
            while batch.len() < s.batch_max {
                match tokio::time::timeout_at(deadline, msgs.next()).await {
                    Ok(Some(Ok(m))) => batch.push(m),
                    Ok(Some(Err(e))) => tracing::warn!(error = %e, "pull stream error"),
                    Ok(None) | Err(_) => break,
                }
            }
            apply_and_ack(&mut writer, &batch, &metrics, &cancel).await?;
            commits += 1;
            if s.fault_abort_after_commit.is_some_and(|n| commits >= n) {
                tracing::error!("fault injection: aborting after commit, before ack");
                std::process::abort();
            }
        }
    }
    tracing::info!("ledger writer stopped");
    Ok(())
}

async fn apply_and_ack(
    writer: &mut Writer,
    batch: &[Message],
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let inbound: Vec<Inbound> = batch
        .iter()
        .map(|m| Inbound {
            subject: m.subject.to_string(),
            payload: m.payload.to_vec(),
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
                metrics.inc("tokenledger_writer_errors_total", 1);
                tracing::error!(error = %e, "batch failed; nothing was committed, retrying");
                if cancel.is_cancelled() {
                    // not acked: JetStream redelivers after the ack wait
                    return Ok(());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    metrics.observe_batch(started.elapsed(), batch.len());
    for (m, o) in batch.iter().zip(&outcomes) {
        let kind = match o {
            Outcome::Applied => {
                metrics.inc("tokenledger_events_applied_total", 1);
                AckKind::Ack
            }
            Outcome::Duplicate => {
                metrics.inc("tokenledger_events_duplicate_total", 1);
                AckKind::Ack
            }
            Outcome::Conflict => {
                metrics.inc("tokenledger_events_conflict_total", 1);
                AckKind::Ack
            }
            Outcome::DeadLettered(_) => {
                metrics.inc("tokenledger_dead_letters_total", 1);
                AckKind::Term
            }
        };
        if let Err(e) = m.ack_with(kind).await {
            // harmless: the message is redelivered and is then a duplicate
            tracing::warn!(error = %e, "ack failed");
        }
    }
    Ok(())
}
