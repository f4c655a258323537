//! Synthetic usage: many tenants, a skewed model mix, a share of duplicates.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::bus::Bus;
use crate::events::{self, Event};
use crate::settings::Settings;

/// (provider, model, share weight): a skewed mix of popular models, all in the bundled
/// price book.
pub const MODEL_MIX: &[(&str, &str, u32)] = &[
    ("openai", "gpt-4o-mini", 30),
    ("openai", "gpt-4o", 15),
    ("anthropic", "claude-haiku-4-5", 12),
    ("deepseek", "deepseek-chat", 10),
    ("google", "gemini-2.5-flash", 10),
    ("openai", "gpt-5", 6),
    ("anthropic", "claude-sonnet-4-5", 6),
    ("mistral", "mistral-small-latest", 5),
    ("qwen", "qwen-plus", 4),
    ("google", "gemini-2.5-pro", 2),
];

pub fn tenant_name(i: usize) -> String {
    format!("load-{i:04}")
}

/// A deterministic synthetic usage event: the i-th of a run seeded by `run`.
pub fn synthetic(
    rng: &mut StdRng,
    run: &str,
    i: u64,
    tenants: usize,
    time: DateTime<Utc>,
) -> Event {
    // tenants: a few large ones, a long tail
    let t = if rng.gen_bool(0.5) {
        rng.gen_range(0..tenants.min(5))
    } else {
        rng.gen_range(0..tenants)
    };
    let total: u32 = MODEL_MIX.iter().map(|m| m.2).sum();
    let mut pick = rng.gen_range(0..total);
    let (provider, model, _) = *MODEL_MIX
        .iter()
        .find(|m| {
            if pick < m.2 {
                true
            } else {
                pick -= m.2;
                false
            }
        })
        .expect("weights cover the range");
    let input: u64 = rng.gen_range(20..8000);
    let cached = if rng.gen_bool(0.3) {
        rng.gen_range(0..=input / 2)
    } else {
        0
    };
    let output: u64 = rng.gen_range(1..2000);
    let reasoning = if model == "gpt-5" {
        rng.gen_range(0..=output)
    } else {
        0
    };
    let status = if rng.gen_bool(0.02) { "error" } else { "ok" };
    let id = format!("{run}-{i}");
    let env = json!({
        "specversion": "1.0", "id": id, "source": "tokenledger/loadgen",
        "type": events::USAGE_V1, "time": time.to_rfc3339(),
        "data": {
            "tenant_id": tenant_name(t), "api_key_id": format!("key-{}", rng.gen_range(0..3)),
            "request_id": format!("req-{id}"), "model": model, "provider": provider,
            "input_tokens": input, "cached_input_tokens": cached, "output_tokens": output,
            "reasoning_tokens": reasoning, "batch": rng.gen_bool(0.05), "status": status,
            "latency_ms": rng.gen_range(100..20000),
        }
    });
    events::parse(env, time).expect("synthetic events are valid")
}

pub struct LoadOptions {
    pub count: u64,
    /// Events per second; 0 = as fast as possible.
    pub rate: u64,
    pub tenants: usize,
    /// Share of events published twice (0..1).
    pub duplicate_share: f64,
    pub seed: u64,
}

/// Publish `count` events; returns (events published incl. duplicates, seconds taken).
pub async fn run(
    bus: &Bus,
    s: &Settings,
    o: &LoadOptions,
    run_id: &str,
) -> anyhow::Result<(u64, f64)> {
    let mut rng = StdRng::seed_from_u64(o.seed);
    let started = Instant::now();
    let mut published = 0u64;
    let mut pending = Vec::with_capacity(4096);
    let mut last: Option<Event> = None;
    for i in 0..o.count {
        if o.rate > 0 {
            let due = Duration::from_secs_f64(i as f64 / o.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let ev = match &last {
            Some(prev) if rng.gen_bool(o.duplicate_share) => prev.clone(),
            _ => synthetic(&mut rng, run_id, i, o.tenants, Utc::now()),
        };
        let ack = bus
            .publish_with_id(
                s.usage_subject(ev.tenant_id()),
                ev.canonical.clone().into(),
                &ev.msg_id(),
            )
            .await?;
        pending.push(ack);
        published += 1;
        if pending.len() >= 4096 {
            for a in pending.drain(..) {
                a.await?;
            }
        }
        last = Some(ev);
    }
    for a in pending {
        a.await?;
    }
    Ok((published, started.elapsed().as_secs_f64()))
}
