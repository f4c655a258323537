//! NATS JetStream: the usage stream, the writer's durable consumer, and publishing.
//! The only module that uses async-nats.

mod consumer;

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;

pub use consumer::{run_writer, CommitObserver};

use crate::events::Event;
use crate::settings::Settings;

/// Duplicate window: a republish inside it is dropped by JetStream (saving work only;
/// the ledger's unique keys are the guard).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// How long the stream keeps messages after the ledger consumed them (replay, audit).
pub const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// Bound on unacknowledged messages handed to the writer.
pub const MAX_ACK_PENDING: i64 = 20_000;

#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    stream: String,
    consumer: String,
    subjects: String,
    ack_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("publishing to JetStream failed: {0}")]
pub struct PublishError(pub String);

pub async fn connect(s: &Settings) -> anyhow::Result<Bus> {
    let client = async_nats::ConnectOptions::new()
        .name("tokenledger")
        .connection_timeout(Duration::from_secs(5))
        .connect(&s.nats_url)
        .await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        .max_ack_inflight(10_000)
        .backpressure_on_inflight(true)
        .build(client.clone());
    Ok(Bus {
        client,
        js,
        stream: s.stream.clone(),
        consumer: s.consumer.clone(),
        subjects: s.usage_subjects_wildcard(),
        ack_wait: s.ack_wait,
    })
}

impl Bus {
    pub async fn flush(&self) {
        let _ = self.client.flush().await;
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Create the usage stream if missing (idempotent; an existing stream is kept).
    pub async fn ensure_stream(&self) -> anyhow::Result<stream::Stream> {
        let cfg = stream::Config {
            name: self.stream.clone(),
            subjects: vec![self.subjects.clone()],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: MAX_AGE,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        Ok(self.js.get_or_create_stream(cfg).await?)
    }

    /// Create the ledger writer's durable pull consumer if missing.
    pub async fn ensure_consumer(&self) -> anyhow::Result<jetstream::consumer::PullConsumer> {
        let stream = self.ensure_stream().await?;
        let cfg = pull::Config {
            durable_name: Some(self.consumer.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // unlimited: a message that cannot apply is dead-lettered and terminated by
            // the writer; a database outage must never make JetStream give up on one
            max_deliver: -1,
            max_ack_pending: MAX_ACK_PENDING,
            filter_subject: self.subjects.clone(),
            ..Default::default()
        };
        Ok(stream.get_or_create_consumer(&self.consumer, cfg).await?)
    }

    /// Publish validated events and wait until JetStream acknowledged every one.
    pub async fn publish_events(
        &self,
        subject_of: impl Fn(&str) -> String,
        events: &[Event],
    ) -> Result<(), PublishError> {
        let mut acks = Vec::with_capacity(events.len());
        for ev in events {
            let ack = self
                .publish_with_id(
                    subject_of(ev.tenant_id()),
                    Bytes::from(ev.canonical.clone()),
                    &ev.msg_id(),
                )
                .await?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|e| PublishError(e.to_string()))?;
        }
        Ok(())
    }

    pub async fn publish_with_id(
        &self,
        subject: String,
        payload: Bytes,
        msg_id: &str,
    ) -> Result<jetstream::context::PublishAckFuture, PublishError> {
        let msg = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(msg_id);
        self.js
            .send_publish(subject, msg)
            .await
            .map_err(|e| PublishError(e.to_string()))
    }

    /// Lag of the writer's consumer: messages not yet delivered plus not yet acked.
    pub async fn consumer_lag(&self) -> anyhow::Result<(u64, u64)> {
        let stream = self.js.get_stream(&self.stream).await?;
        let mut c: jetstream::consumer::PullConsumer = stream
            .get_consumer(&self.consumer)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let info = c.info().await?;
        Ok((info.num_pending, info.num_ack_pending as u64))
    }
}

impl Bus {
    /// Messages stored in the usage stream.
    pub async fn stream_message_count(&self) -> anyhow::Result<u64> {
        let mut stream = self.js.get_stream(&self.stream).await?;
        Ok(stream.info().await?.state.messages)
    }

    /// Delete the usage stream (tests and benchmarks clean up after themselves).
    pub async fn delete_stream(&self) -> anyhow::Result<()> {
        self.js.delete_stream(&self.stream).await?;
        Ok(())
    }
}

/// Batches off the writer's consumer, for tools that drive their own loop (bench).
pub struct BatchSource {
    msgs: jetstream::consumer::pull::Stream,
    batch_max: usize,
    wait: Duration,
}

impl Bus {
    pub async fn batch_source(
        &self,
        batch_max: usize,
        wait: Duration,
    ) -> anyhow::Result<BatchSource> {
        let c = self.ensure_consumer().await?;
        let msgs = c
            .stream()
            .max_messages_per_batch(batch_max * 2)
            .messages()
            .await?;
        Ok(BatchSource {
            msgs,
            batch_max,
            wait,
        })
    }
}

impl BatchSource {
    /// The next batch: at least one message, then whatever arrives within the wait.
    /// Returns the messages as `Inbound` and a closure-free acker.
    pub async fn next(
        &mut self,
    ) -> anyhow::Result<(Vec<crate::ledger::Inbound>, Vec<jetstream::Message>)> {
        use futures::StreamExt;
        let first = self
            .msgs
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("stream ended"))?;
        let mut batch = vec![first.map_err(|e| anyhow::anyhow!(e))?];
        let deadline = tokio::time::Instant::now() + self.wait;
        while batch.len() < self.batch_max {
            match tokio::time::timeout_at(deadline, self.msgs.next()).await {
                Ok(Some(Ok(m))) => batch.push(m),
                _ => break,
            }
        }
        let inbound = batch
            .iter()
            .map(|m| crate::ledger::Inbound {
                subject: m.subject.to_string(),
                payload: m.payload.clone(),
                stream_seq: m.info().ok().map(|i| i.stream_sequence),
            })
            .collect();
        Ok((inbound, batch))
    }

    pub async fn ack(batch: &[jetstream::Message]) -> anyhow::Result<()> {
        for m in batch {
            m.ack().await.map_err(|e| anyhow::anyhow!(e))?;
        }
        Ok(())
    }
}
