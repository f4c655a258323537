//! Logging (tracing) and Prometheus metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,async_nats=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
}

/// Upper bounds (seconds) of the batch latency histogram.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Default)]
struct Inner {
    counters: BTreeMap<&'static str, u64>,
    gauges: BTreeMap<&'static str, f64>,
    batch_buckets: [u64; BUCKETS.len()],
    batch_count: u64,
    batch_sum: f64,
}

/// A small Prometheus registry: counters, gauges and the batch latency histogram.
#[derive(Clone, Default)]
pub struct Metrics(Arc<Mutex<Inner>>);

impl Metrics {
    pub fn inc(&self, name: &'static str, by: u64) {
        *self
            .0
            .lock()
            .expect("metrics lock")
            .counters
            .entry(name)
            .or_default() += by;
    }

    pub fn set(&self, name: &'static str, v: f64) {
        self.0.lock().expect("metrics lock").gauges.insert(name, v);
    }

    pub fn counter(&self, name: &'static str) -> u64 {
        self.0
            .lock()
            .expect("metrics lock")
            .counters
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    pub fn observe_batch(&self, took: Duration, size: usize) {
        let mut m = self.0.lock().expect("metrics lock");
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                m.batch_buckets[i] += 1;
            }
        }
        m.batch_count += 1;
        m.batch_sum += s;
        *m.counters
            .entry("tokenledger_batch_events_total")
            .or_default() += size as u64;
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let m = self.0.lock().expect("metrics lock");
        let mut out = String::new();
        for (k, v) in &m.counters {
            out.push_str(&format!("# TYPE {k} counter\n{k} {v}\n"));
        }
        for (k, v) in &m.gauges {
            out.push_str(&format!("# TYPE {k} gauge\n{k} {v}\n"));
        }
        let h = "tokenledger_batch_seconds";
        out.push_str(&format!(
            "# HELP {h} Time to apply one batch (one transaction).\n# TYPE {h} histogram\n"
        ));
        for (i, b) in BUCKETS.iter().enumerate() {
            out.push_str(&format!(
                "{h}_bucket{{le=\"{b}\"}} {}\n",
                m.batch_buckets[i]
            ));
        }
        out.push_str(&format!("{h}_bucket{{le=\"+Inf\"}} {}\n", m.batch_count));
        out.push_str(&format!(
            "{h}_sum {}\n{h}_count {}\n",
            m.batch_sum, m.batch_count
        ));
        out
    }
}
