//! The typed fast path for valid usage events: serde straight into structs, then the
//! same rules the field-by-field parser applies. It only ever *accepts*: on any doubt it
//! returns `None` and the caller falls back to the full parser, which decides and
//! explains every rejection. (Decoding was the writer's largest CPU cost per event.)

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::validate::{
    check_time, is_json_media_type, limits, printable, string_problem, RESERVED_ID_PREFIXES,
};
use super::{
    valid_tenant_id, Context, Event, EventData, Status, UsageData, MAX_LATENCY_MS, MAX_TOKENS,
    SPEC_VERSION, USAGE_V1,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(borrow)]
    specversion: Cow<'a, str>,
    id: String,
    source: String,
    #[serde(borrow, rename = "type")]
    type_: Cow<'a, str>,
    #[serde(borrow)]
    time: Cow<'a, str>,
    #[serde(borrow, default)]
    datacontenttype: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    subject: Option<Cow<'a, str>>,
    data: Usage,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Usage {
    tenant_id: String,
    #[serde(default)]
    api_key_id: Option<String>,
    request_id: String,
    #[serde(default)]
    provider_request_id: Option<String>,
    #[serde(default)]
    authorization_id: Option<String>,
    model: String,
    provider: String,
    #[serde(default)]
    region: Option<String>,
    input_tokens: u64,
    #[serde(default)]
    cached_input_tokens: Option<u64>,
    #[serde(default)]
    cache_write_tokens: Option<u64>,
    output_tokens: u64,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
    #[serde(default)]
    batch: Option<bool>,
    status: String,
    #[serde(default)]
    latency_ms: Option<u64>,
    #[serde(default)]
    fallback_from: Option<Vec<String>>,
    #[serde(default)]
    estimated: Option<bool>,
    #[serde(default)]
    estimate_method: Option<String>,
    #[serde(default)]
    tags: Option<BTreeMap<String, String>>,
}

fn ok(s: &str, max: usize) -> bool {
    string_problem(s, max).is_none()
}

fn ok_opt(s: &Option<String>, max: usize) -> bool {
    s.as_deref().is_none_or(|s| ok(s, max))
}

/// A valid usage event, or `None` (invalid, or not a usage event: use the full parser).
pub fn parse_usage(bytes: &[u8], now: DateTime<Utc>) -> Option<Event> {
    let e: Envelope = serde_json::from_slice(bytes).ok()?;
    let envelope_ok = e.specversion == SPEC_VERSION
        && e.type_ == USAGE_V1
        && ok(&e.id, limits::ID)
        && !RESERVED_ID_PREFIXES.iter().any(|p| e.id.starts_with(p))
        && ok(&e.source, limits::SOURCE)
        && super::uri::reference_problem(&e.source).is_none()
        && ok(&e.time, limits::TIME)
        && e.datacontenttype
            .as_deref()
            .is_none_or(|c| ok(c, limits::CONTENT_TYPE) && is_json_media_type(c))
        && e.subject.as_deref().is_none_or(|s| ok(s, limits::SUBJECT));
    if !envelope_ok {
        return None;
    }
    let time = check_time(&e.time, now).ok()?;
    let u = usage(e.data)?;
    let context = Context {
        subject: e.subject.map(Cow::into_owned),
        ..Context::default()
    };
    Some(Event::with_context(
        e.id,
        e.source,
        time,
        EventData::Usage(u),
        context,
    ))
}

fn usage(d: Usage) -> Option<UsageData> {
    let strings_ok = ok(&d.tenant_id, limits::TENANT)
        && valid_tenant_id(&d.tenant_id)
        && ok_opt(&d.api_key_id, limits::API_KEY)
        && ok(&d.request_id, limits::REQUEST)
        && ok_opt(&d.provider_request_id, limits::PROVIDER_REQUEST)
        && ok_opt(&d.authorization_id, limits::AUTHORIZATION)
        && ok(&d.model, limits::MODEL)
        && ok(&d.provider, limits::PROVIDER)
        && ok_opt(&d.region, limits::REGION)
        && ok_opt(&d.estimate_method, limits::ESTIMATE_METHOD);
    let status = match d.status.as_str() {
        "ok" => Status::Ok,
        "error" => Status::Error,
        "cancelled" => Status::Cancelled,
        _ => return None,
    };
    let (cached, write, reasoning) = (
        d.cached_input_tokens.unwrap_or(0),
        d.cache_write_tokens.unwrap_or(0),
        d.reasoning_tokens.unwrap_or(0),
    );
    let latency_ms = d.latency_ms.unwrap_or(0);
    let counts_ok = [d.input_tokens, cached, write, d.output_tokens, reasoning]
        .iter()
        .all(|c| *c <= MAX_TOKENS)
        && latency_ms <= MAX_LATENCY_MS
        && cached + write <= d.input_tokens
        && reasoning <= d.output_tokens;
    let fallback_from = d.fallback_from.unwrap_or_default();
    let tags = d.tags.unwrap_or_default();
    let lists_ok = fallback_from.len() <= limits::FALLBACKS
        && fallback_from
            .iter()
            .all(|f| !f.is_empty() && f.len() <= limits::FALLBACK_BYTES && printable(f))
        && tags.len() <= limits::TAGS
        && tags.iter().all(|(k, v)| {
            !k.is_empty()
                && k.len() <= limits::TAG_KEY_BYTES
                && v.len() <= limits::TAG_VALUE_BYTES
                && printable(k)
                && printable(v)
        });
    let estimated = d.estimated.unwrap_or(false);
    if !(strings_ok && counts_ok && lists_ok && estimated == d.estimate_method.is_some()) {
        return None;
    }
    Some(UsageData {
        tenant_id: d.tenant_id,
        api_key_id: d.api_key_id,
        request_id: d.request_id,
        provider_request_id: d.provider_request_id,
        authorization_id: d.authorization_id,
        model: d.model,
        provider: d.provider,
        region: d.region,
        input_tokens: d.input_tokens,
        cached_input_tokens: cached,
        cache_write_tokens: write,
        output_tokens: d.output_tokens,
        reasoning_tokens: reasoning,
        batch: d.batch.unwrap_or(false),
        status,
        latency_ms,
        fallback_from,
        estimated,
        estimate_method: d.estimate_method,
        tags,
    })
}
