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

/// The metrics this service exports, with their help text: counters are shown from the
/// start (at 0), so a rate or `increase()` counts the first event after a restart; gauges
/// once they have a value.
const KNOWN: [(&str, &str, &str); 19] = [
    ("tokenledger_ingest_events_total", "counter", "Events accepted by POST /v1/events (acknowledged by JetStream)."),
    ("tokenledger_batch_events_total", "counter", "Messages in the ledger writer's batches."),
    ("tokenledger_events_applied_total", "counter", "Events appended to the ledger."),
    ("tokenledger_events_duplicate_total", "counter", "Redelivered or republished events that changed nothing."),
    ("tokenledger_events_conflict_total", "counter", "Same key, different payload: recorded as conflicts, the first kept."),
    ("tokenledger_dead_letters_total", "counter", "Messages dead-lettered by this process."),
    ("tokenledger_writer_errors_total", "counter", "Ledger writer batches that failed (redelivered)."),
    ("tokenledger_router_requests_total", "counter", "Requests the router received."),
    ("tokenledger_router_denied_total", "counter", "Router requests a budget denied (402)."),
    ("tokenledger_router_fallbacks_total", "counter", "Router attempts that fell back to the next candidate."),
    ("tokenledger_router_events_published_total", "counter", "Usage events the router published and JetStream acknowledged."),
    ("tokenledger_router_events_spooled_total", "counter", "Usage events spooled to Postgres while NATS did not acknowledge."),
    ("tokenledger_router_events_redriven_total", "counter", "Spooled usage events published again."),
    ("tokenledger_consumer_pending_messages", "gauge", "Messages of the USAGE stream the ledger consumer has not been delivered (absent while NATS cannot be asked)."),
    ("tokenledger_consumer_ack_pending_messages", "gauge", "Messages delivered to the ledger consumer and not yet acknowledged (absent while NATS cannot be asked)."),
    ("tokenledger_bus_up", "gauge", "1 if NATS answered the consumer-lag query for this scrape, else 0."),
    ("tokenledger_dead_letters_stored", "gauge", "Dead letters in the database."),
    ("tokenledger_authorizer_terms_stamp", "gauge", "The commercial-terms version the authoriser decides on."),
    ("tokenledger_router_terms_stamp", "gauge", "The commercial-terms version the router prices on."),
];

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

    /// Forget a gauge: absent says "unknown", where a stale value would look healthy.
    pub fn unset(&self, name: &'static str) {
        self.0.lock().expect("metrics lock").gauges.remove(name);
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
        for (k, kind, help) in KNOWN {
            let v = match kind {
                "counter" => Some(m.counters.get(k).copied().unwrap_or(0).to_string()),
                _ => m.gauges.get(k).map(f64::to_string),
            };
            if let Some(v) = v {
                out.push_str(&format!("# HELP {k} {help}\n# TYPE {k} {kind}\n{k} {v}\n"));
            }
        }
        let known = |k: &str| KNOWN.iter().any(|(n, _, _)| *n == k);
        for (k, v) in m.counters.iter().filter(|(k, _)| !known(k)) {
            out.push_str(&format!("# TYPE {k} counter\n{k} {v}\n"));
        }
        for (k, v) in m.gauges.iter().filter(|(k, _)| !known(k)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_from_the_start_with_help_and_a_forgotten_gauge_is_absent() {
        let m = Metrics::default();
        let text = m.render();
        assert!(text.contains("# HELP tokenledger_dead_letters_total "));
        assert!(text.contains("\ntokenledger_dead_letters_total 0\n"));
        assert!(!text.contains("tokenledger_consumer_pending_messages"));
        m.set("tokenledger_consumer_pending_messages", 7.0);
        assert!(m
            .render()
            .contains("\ntokenledger_consumer_pending_messages 7\n"));
        m.unset("tokenledger_consumer_pending_messages");
        assert!(!m.render().contains("tokenledger_consumer_pending_messages"));
        // every name is exported once
        let text = m.render();
        for (k, _, _) in KNOWN {
            assert!(text.matches(&format!("# TYPE {k} ")).count() <= 1, "{k}");
        }
    }
}
