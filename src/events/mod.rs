//! The event contract: CloudEvents 1.0 JSON envelopes carrying usage and adjustment facts.
//!
//! Everything that enters the ledger passes [`parse`]: it checks every rule of the
//! contract, fills defaults, and produces the canonical form that is hashed, published
//! and stored, so the same fact always has the same bytes.

mod fast;
mod uri;
mod validate;

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sha2::{Digest, Sha256};

pub(crate) use validate::{limits, string_problem};
pub use validate::{parse, parse_bytes, parse_bytes_slow, FieldError, Rejection};

pub const USAGE_V1: &str = "tokenledger.usage.v1";
pub const ADJUSTMENT_V1: &str = "tokenledger.adjustment.v1";
/// What the clock causes, appended by the service to a tenant's log (never accepted
/// through the ingest API).
pub const SYSTEM_V1: &str = "tokenledger.system.v1";
pub const SPEC_VERSION: &str = "1.0";
/// Largest token count accepted in any one field of a usage event. The largest context
/// windows today are a few million tokens; anything above this is a producer bug.
pub const MAX_TOKENS: u64 = 100_000_000;
/// Largest `latency_ms` accepted: one day.
pub const MAX_LATENCY_MS: u64 = 86_400_000;
/// How far in the future an event's `time` may be.
pub const MAX_FUTURE_SECS: i64 = 300;
/// Largest adjustment amount, in the tenant's currency.
pub const MAX_ADJUSTMENT: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Error,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::Cancelled => "cancelled",
        }
    }
}

/// One routed request's facts (`tokenledger.usage.v1`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UsageData {
    pub tenant_id: String,
    pub api_key_id: Option<String>,
    pub request_id: String,
    pub provider_request_id: Option<String>,
    pub authorization_id: Option<String>,
    pub model: String,
    pub provider: String,
    pub region: Option<String>,
    /// All prompt tokens, cached ones included (OpenAI convention).
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    /// All completion tokens, reasoning included.
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub batch: bool,
    pub status: Status,
    pub latency_ms: u64,
    pub fallback_from: Vec<String>,
    pub estimated: bool,
    pub estimate_method: Option<String>,
    pub tags: BTreeMap<String, String>,
}

impl UsageData {
    /// Prompt tokens neither read from nor written to the cache.
    pub fn uncached_input_tokens(&self) -> u64 {
        self.input_tokens - self.cached_input_tokens - self.cache_write_tokens
    }

    /// Completion tokens that are not reasoning.
    pub fn plain_output_tokens(&self) -> u64 {
        self.output_tokens - self.reasoning_tokens
    }

    /// The counts as the usage rollup adds them: input, cached input, cache write,
    /// output, reasoning.
    pub fn rollup_tokens(&self) -> [i64; 5] {
        [
            self.input_tokens,
            self.cached_input_tokens,
            self.cache_write_tokens,
            self.output_tokens,
            self.reasoning_tokens,
        ]
        .map(|n| n as i64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Reduces what the tenant owes.
    Credit,
    /// Increases what the tenant owes.
    Debit,
}

/// An operator's correction (`tokenledger.adjustment.v1`): never an edit.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct AdjustmentData {
    pub tenant_id: String,
    pub direction: Direction,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
    pub currency: String,
    pub reason: String,
    /// The request this corrects, if any.
    pub request_id: Option<String>,
    /// The event this corrects, if any.
    pub corrects_event_id: Option<String>,
}

/// A clock-driven fact in a tenant's log (`tokenledger.system.v1`). The one kind so far:
/// `period_close` — the cut-off of a billing period (a UTC month, `period` = `YYYY-MM`):
/// commitments are billed and trued up; usage of that period ordered after it is late.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SystemData {
    pub tenant_id: String,
    pub kind: String,
    pub period: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventData {
    Usage(UsageData),
    Adjustment(AdjustmentData),
    System(SystemData),
}

/// The optional CloudEvents context an event may carry besides the attributes the ledger
/// reads: kept in the canonical envelope (so stored and hashed), never interpreted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Context {
    pub subject: Option<String>,
    /// An absolute URI.
    pub dataschema: Option<String>,
    /// Extension attributes by name, each value in its canonical string form (a Boolean
    /// as `true`/`false`, an Integer in decimal), so a structured-mode and a binary-mode
    /// submission of the same event have the same bytes.
    pub extensions: BTreeMap<String, String>,
}

/// A validated event in canonical form.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub id: String,
    pub source: String,
    pub time: DateTime<Utc>,
    pub data: EventData,
    pub context: Context,
    /// The canonical JSON envelope: what is published and hashed.
    pub canonical: Vec<u8>,
    /// sha256 of `canonical`.
    pub payload_hash: [u8; 32],
}

#[derive(Serialize)]
struct CanonicalEnvelope<'a> {
    specversion: &'static str,
    id: &'a str,
    source: &'a str,
    #[serde(rename = "type")]
    type_: &'static str,
    time: String,
    datacontenttype: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dataschema: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a str>,
    #[serde(flatten)]
    extensions: &'a BTreeMap<String, String>,
    data: &'a EventData,
}

impl Event {
    pub fn new(id: String, source: String, time: DateTime<Utc>, data: EventData) -> Event {
        Event::with_context(id, source, time, data, Context::default())
    }

    pub fn with_context(
        id: String,
        source: String,
        time: DateTime<Utc>,
        data: EventData,
        context: Context,
    ) -> Event {
        // sized for a usage event's envelope (≈ 600–700 bytes): growing from serde_json's
        // default 128 bytes reallocated and copied it three times (2% of the
        // ledger writer's CPU)
        let mut canonical = Vec::with_capacity(1024);
        serde_json::to_writer(
            &mut canonical,
            &CanonicalEnvelope {
                specversion: SPEC_VERSION,
                id: &id,
                source: &source,
                type_: type_of(&data),
                time: time.to_rfc3339_opts(SecondsFormat::AutoSi, true),
                datacontenttype: "application/json",
                dataschema: context.dataschema.as_deref(),
                subject: context.subject.as_deref(),
                extensions: &context.extensions,
                data: &data,
            },
        )
        .expect("event serialises");
        let payload_hash: [u8; 32] = Sha256::digest(&canonical).into();
        Event {
            id,
            source,
            time,
            data,
            context,
            canonical,
            payload_hash,
        }
    }

    pub fn type_(&self) -> &'static str {
        type_of(&self.data)
    }

    pub fn tenant_id(&self) -> &str {
        match &self.data {
            EventData::Usage(u) => &u.tenant_id,
            EventData::Adjustment(a) => &a.tenant_id,
            EventData::System(x) => &x.tenant_id,
        }
    }

    pub fn request_id(&self) -> Option<&str> {
        match &self.data {
            EventData::Usage(u) => Some(&u.request_id),
            EventData::Adjustment(_) | EventData::System(_) => None,
        }
    }

    /// JetStream `Nats-Msg-Id`: a hash of tenant, id and payload, so that one tenant can
    /// never suppress another's event and a conflicting payload still reaches the writer.
    pub fn msg_id(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.tenant_id().as_bytes());
        h.update([0]);
        h.update(self.id.as_bytes());
        h.update([0]);
        h.update(&self.canonical);
        hex::encode(h.finalize())
    }
}

fn type_of(data: &EventData) -> &'static str {
    match data {
        EventData::Usage(_) => USAGE_V1,
        EventData::Adjustment(_) => ADJUSTMENT_V1,
        EventData::System(_) => SYSTEM_V1,
    }
}

/// Tenant ids become NATS subject tokens: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn valid_tenant_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

#[cfg(test)]
mod tests;
