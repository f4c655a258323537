//! Validation of incoming envelopes: every rule of the contract, every error reported.

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Map, Value};

use super::*;

/// One broken rule: which field, a stable code, and a sentence for humans.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub code: &'static str,
    pub message: String,
}

/// Why an event was refused: every broken rule, and the id when it could be read.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rejection {
    pub id: Option<String>,
    pub errors: Vec<FieldError>,
}

impl Rejection {
    pub fn summary(&self) -> String {
        self.errors
            .iter()
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Parse raw bytes (a bus message) into a validated event. Valid usage events take a
/// typed fast path; anything it does not accept is parsed field by field, which is what
/// decides and explains every rejection.
pub fn parse_bytes(bytes: &[u8], now: DateTime<Utc>) -> Result<Event, Rejection> {
    if let Some(ev) = super::fast::parse_usage(bytes, now) {
        return Ok(ev);
    }
    parse_bytes_slow(bytes, now)
}

/// The field-by-field parser alone (tests compare the two paths).
pub fn parse_bytes_slow(bytes: &[u8], now: DateTime<Utc>) -> Result<Event, Rejection> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => parse(v, now),
        Err(e) => Err(Rejection {
            id: None,
            errors: vec![err("", "malformed_json", format!("not valid JSON: {e}"))],
        }),
    }
}

/// Why a string breaks the rule "1..=max printable characters", if it does.
pub(crate) fn string_problem(s: &str, max: usize) -> Option<(&'static str, String)> {
    if s.is_empty() {
        Some(("empty", "must not be empty".into()))
    } else if s.chars().count() > max {
        Some(("too_long", format!("must be at most {max} characters")))
    } else if !printable(s) {
        Some((
            "not_printable",
            "must not contain control characters".into(),
        ))
    } else {
        None
    }
}

/// `application/json` as a media type: its type and subtype compare without regard to
/// case and may carry parameters (RFC 9110 §8.3.1), e.g. `application/json; charset=utf-8`.
/// The canonical form always says `application/json`.
pub(crate) fn is_json_media_type(c: &str) -> bool {
    let essence = c.split(';').next().unwrap_or("").trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// No control characters (U+0000–U+001F, U+007F–U+009F): the rule every string of the
/// contract keeps, tags and fallback models included. Postgres cannot hold U+0000 in
/// `text` or `jsonb`, so one such string reaching a conflict or dead-letter row would fail
/// its whole batch again on every redelivery.
pub(crate) fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// A `time` attribute: RFC 3339, at most `MAX_FUTURE_SECS` ahead of `now`.
pub(super) fn check_time(
    t: &str,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, (&'static str, String)> {
    match DateTime::parse_from_rfc3339(t) {
        Ok(t) if t.with_timezone(&Utc) > now + chrono::Duration::seconds(MAX_FUTURE_SECS) => Err((
            "in_future",
            format!("is more than {MAX_FUTURE_SECS} s in the future"),
        )),
        Ok(t) => Ok(t.with_timezone(&Utc)),
        Err(_) => Err(("invalid_time", "must be an RFC 3339 timestamp".into())),
    }
}

/// Length limits (characters) of the contract's string fields; both parsers use them.
pub(crate) mod limits {
    pub const ID: usize = 128;
    pub const SPECVERSION: usize = 8;
    pub const SOURCE: usize = 512;
    pub const TYPE: usize = 64;
    pub const TIME: usize = 64;
    pub const CONTENT_TYPE: usize = 64;
    pub const SUBJECT: usize = 256;
    pub const DATASCHEMA: usize = 512;
    /// Extension attributes per event, characters per name and per (string) value.
    pub const EXTENSIONS: usize = 16;
    pub const EXTENSION_NAME: usize = 64;
    pub const EXTENSION_VALUE: usize = 1024;
    pub const TENANT: usize = 64;
    pub const API_KEY: usize = 128;
    pub const REQUEST: usize = 128;
    pub const PROVIDER_REQUEST: usize = 256;
    pub const AUTHORIZATION: usize = 128;
    pub const MODEL: usize = 128;
    pub const PROVIDER: usize = 64;
    pub const REGION: usize = 64;
    pub const STATUS: usize = 16;
    pub const ESTIMATE_METHOD: usize = 64;
    /// Items of `fallback_from`, and bytes per item.
    pub const FALLBACKS: usize = 16;
    pub const FALLBACK_BYTES: usize = 256;
    /// Entries of `tags`, bytes per key and per value.
    pub const TAGS: usize = 32;
    pub const TAG_KEY_BYTES: usize = 64;
    pub const TAG_VALUE_BYTES: usize = 256;
}

fn err(field: &str, code: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.to_string(),
        code,
        message: message.into(),
    }
}

/// Reads fields out of a JSON object, collecting errors; what is left over is unknown.
struct Fields<'a> {
    prefix: &'static str,
    map: Map<String, Value>,
    errors: &'a mut Vec<FieldError>,
}

impl Fields<'_> {
    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn fail(&mut self, key: &str, code: &'static str, message: impl Into<String>) {
        let field = self.name(key);
        self.errors.push(err(&field, code, message));
    }

    /// A string of 1..=max printable characters (no control characters).
    fn string(&mut self, key: &str, required: bool, max: usize) -> Option<String> {
        match self.map.remove(key) {
            None | Some(Value::Null) => {
                if required {
                    self.fail(key, "missing", "is required");
                }
                None
            }
            Some(Value::String(s)) => match string_problem(&s, max) {
                Some((code, message)) => {
                    self.fail(key, code, message);
                    None
                }
                None => Some(s),
            },
            Some(_) => {
                self.fail(key, "not_a_string", "must be a string");
                None
            }
        }
    }

    fn count(&mut self, key: &str, required: bool, cap: u64) -> u64 {
        match self.map.remove(key) {
            None | Some(Value::Null) => {
                if required {
                    self.fail(key, "missing", "is required");
                }
                0
            }
            Some(Value::Number(n)) => {
                let text = n.to_string();
                match n.as_u64() {
                    Some(v) if v <= cap => v,
                    Some(_) => {
                        self.fail(key, "too_large", format!("must be at most {cap}"));
                        0
                    }
                    None if text.starts_with('-') => {
                        self.fail(key, "negative", "must not be negative");
                        0
                    }
                    None if u128::from_str(&text).is_ok() => {
                        self.fail(key, "too_large", format!("must be at most {cap}"));
                        0
                    }
                    None => {
                        self.fail(key, "not_a_whole_number", "must be a whole number");
                        0
                    }
                }
            }
            Some(_) => {
                self.fail(key, "not_a_number", "must be a whole number");
                0
            }
        }
    }

    fn boolean(&mut self, key: &str) -> bool {
        match self.map.remove(key) {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(_) => {
                self.fail(key, "not_a_boolean", "must be true or false");
                false
            }
        }
    }

    fn string_list(&mut self, key: &str, max_items: usize) -> Vec<String> {
        match self.map.remove(key) {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(items)) if items.len() <= max_items => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(s)
                            if !s.is_empty()
                                && s.len() <= limits::FALLBACK_BYTES
                                && printable(&s) =>
                        {
                            out.push(s)
                        }
                        _ => {
                            self.fail(
                                key,
                                "invalid_item",
                                "items must be non-empty strings without control characters",
                            );
                            return vec![];
                        }
                    }
                }
                out
            }
            Some(Value::Array(_)) => {
                self.fail(key, "too_many", format!("at most {max_items} items"));
                vec![]
            }
            Some(_) => {
                self.fail(key, "not_a_list", "must be a list of strings");
                vec![]
            }
        }
    }

    fn tags(&mut self, key: &str) -> BTreeMap<String, String> {
        const MAX_TAGS: usize = limits::TAGS;
        match self.map.remove(key) {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(m)) if m.len() <= MAX_TAGS => {
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    match v {
                        Value::String(s)
                            if !k.is_empty()
                                && k.len() <= limits::TAG_KEY_BYTES
                                && s.len() <= limits::TAG_VALUE_BYTES
                                && printable(&k)
                                && printable(&s) =>
                        {
                            out.insert(k, s);
                        }
                        _ => {
                            self.fail(
                                key,
                                "invalid_tag",
                                "tags map non-empty keys (<= 64 bytes) to strings (<= 256 bytes), \
                                 neither with control characters",
                            );
                            return BTreeMap::new();
                        }
                    }
                }
                out
            }
            Some(Value::Object(_)) => {
                self.fail(key, "too_many", format!("at most {MAX_TAGS} tags"));
                BTreeMap::new()
            }
            Some(_) => {
                self.fail(key, "not_an_object", "must be an object of strings");
                BTreeMap::new()
            }
        }
    }

    /// What is left of an envelope besides the core attributes: CloudEvents extension
    /// attributes. A name is 1–`EXTENSION_NAME` lower-case ASCII letters or digits (the
    /// spec's MUST; it advises at most 20); a value is a String, Boolean or Integer (32
    /// bits), kept as its canonical string; `null` is unset. Anything else stays behind
    /// and `finish` reports it as unknown.
    fn extensions(&mut self) -> BTreeMap<String, String> {
        let names: Vec<String> = self
            .map
            .keys()
            .filter(|k| extension_name(k))
            .cloned()
            .collect();
        let mut out = BTreeMap::new();
        for name in names {
            let value = self.map.remove(&name).expect("listed");
            let text = match value {
                Value::Null => continue,
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => match n.as_i64() {
                    Some(i) if i32::try_from(i).is_ok() => i.to_string(),
                    _ => {
                        self.fail(
                            &name,
                            "invalid_extension",
                            "an Integer attribute must be a whole number of 32 bits",
                        );
                        continue;
                    }
                },
                // the CloudEvents String type allows the empty string
                Value::String(s) if s.is_empty() => s,
                Value::String(s) => match string_problem(&s, limits::EXTENSION_VALUE) {
                    Some((code, message)) => {
                        self.fail(&name, code, message);
                        continue;
                    }
                    None => s,
                },
                Value::Array(_) | Value::Object(_) => {
                    self.fail(
                        &name,
                        "invalid_extension",
                        "an extension attribute is a string, boolean or integer",
                    );
                    continue;
                }
            };
            out.insert(name, text);
        }
        if out.len() > limits::EXTENSIONS {
            self.errors.push(err(
                "",
                "too_many_extensions",
                format!("at most {} extension attributes", limits::EXTENSIONS),
            ));
        }
        out
    }

    fn finish(self) {
        for key in self.map.keys() {
            self.errors.push(err(
                &format!("{}{key}", self.prefix),
                "unknown_field",
                "is not part of the contract",
            ));
        }
    }
}

/// A CloudEvents extension attribute name (lower-case ASCII letters and digits) that is
/// not one of the core attributes or `data`, which `parse` reads first.
fn extension_name(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= limits::EXTENSION_NAME
        && k.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && k != "data"
}

/// Id prefixes of system events.
pub const RESERVED_ID_PREFIXES: [&str; 2] = ["period-close:", "evaluation-tick:"];

/// Validate a parsed JSON envelope. `now` bounds how far in the future `time` may be.
pub fn parse(value: Value, now: DateTime<Utc>) -> Result<Event, Rejection> {
    let mut errors = Vec::new();
    let Value::Object(map) = value else {
        return Err(Rejection {
            id: None,
            errors: vec![err("", "not_an_object", "an event must be a JSON object")],
        });
    };
    let mut env = Fields {
        prefix: "",
        map,
        errors: &mut errors,
    };
    let id = env.string("id", true, limits::ID);
    let spec = env.string("specversion", true, limits::SPECVERSION);
    let source = env.string("source", true, limits::SOURCE);
    let type_ = env.string("type", true, limits::TYPE);
    let time = env.string("time", true, limits::TIME);
    let ctype = env.string("datacontenttype", false, limits::CONTENT_TYPE);
    let subject = env.string("subject", false, limits::SUBJECT);
    let dataschema = env.string("dataschema", false, limits::DATASCHEMA);
    let data = env.map.remove("data");
    if env.map.remove("data_base64").is_some() {
        env.fail(
            "data_base64",
            "unsupported",
            "binary data is not accepted: `data` must be a JSON object",
        );
    }
    let extensions = env.extensions();
    env.finish();

    if let Some(s) = &source {
        if let Some(problem) = super::uri::reference_problem(s) {
            errors.push(err(
                "source",
                "invalid_uri_reference",
                format!("must be a URI-reference (RFC 3986): it {problem}"),
            ));
        }
    }
    if let Some(s) = &dataschema {
        if let Some(problem) = super::uri::absolute_problem(s) {
            errors.push(err(
                "dataschema",
                "invalid_uri",
                format!("must be an absolute URI (RFC 3986): it {problem}"),
            ));
        }
    }

    if let Some(s) = &spec {
        if s != SPEC_VERSION {
            errors.push(err("specversion", "unsupported", "must be \"1.0\""));
        }
    }
    if let Some(c) = &ctype {
        if !is_json_media_type(c) {
            errors.push(err(
                "datacontenttype",
                "unsupported",
                "must be application/json",
            ));
        }
    }
    let time = time.and_then(|t| match check_time(&t, now) {
        Ok(t) => Some(t),
        Err((code, message)) => {
            errors.push(err("time", code, message));
            None
        }
    });
    let data = match (type_.as_deref(), data) {
        (_, None) | (_, Some(Value::Null)) => {
            errors.push(err("data", "missing", "is required"));
            None
        }
        (_, Some(d)) if !d.is_object() => {
            errors.push(err("data", "not_an_object", "must be an object"));
            None
        }
        (Some(USAGE_V1), Some(Value::Object(m))) => usage(m, &mut errors).map(EventData::Usage),
        (Some(ADJUSTMENT_V1), Some(Value::Object(m))) => {
            adjustment(m, &mut errors).map(EventData::Adjustment)
        }
        (Some(SYSTEM_V1), Some(Value::Object(m))) => system(m, &mut errors).map(EventData::System),
        (Some(other), Some(_)) => {
            errors.push(err(
                "type",
                "unknown_type",
                format!("{other:?} is not one of {USAGE_V1}, {ADJUSTMENT_V1}, {SYSTEM_V1}"),
            ));
            None
        }
        (None, Some(_)) => None,
    };
    // the ids of the service's own events: a usage or adjustment event may not take one
    // (it would pass for, or block, a period's close or an hour's tick)
    if let (Some(i), Some(t)) = (&id, type_.as_deref()) {
        if t != SYSTEM_V1 && RESERVED_ID_PREFIXES.iter().any(|p| i.starts_with(p)) {
            errors.push(err(
                "id",
                "reserved",
                format!("ids starting with {RESERVED_ID_PREFIXES:?} are the service's own"),
            ));
        }
    }
    match (id.clone(), source, time, data) {
        (Some(id), Some(source), Some(time), Some(data)) if errors.is_empty() => {
            let context = Context {
                subject,
                dataschema,
                extensions,
            };
            Ok(Event::with_context(id, source, time, data, context))
        }
        _ => Err(Rejection { id, errors }),
    }
}

fn usage(map: Map<String, Value>, errors: &mut Vec<FieldError>) -> Option<UsageData> {
    let mut f = Fields {
        prefix: "data.",
        map,
        errors,
    };
    let tenant_id = tenant(&mut f);
    let api_key_id = f.string("api_key_id", false, limits::API_KEY);
    let request_id = f.string("request_id", true, limits::REQUEST);
    let provider_request_id = f.string("provider_request_id", false, limits::PROVIDER_REQUEST);
    let authorization_id = f.string("authorization_id", false, limits::AUTHORIZATION);
    let model = f.string("model", true, limits::MODEL);
    let provider = f.string("provider", true, limits::PROVIDER);
    let region = f.string("region", false, limits::REGION);
    let input_tokens = f.count("input_tokens", true, MAX_TOKENS);
    let cached_input_tokens = f.count("cached_input_tokens", false, MAX_TOKENS);
    let cache_write_tokens = f.count("cache_write_tokens", false, MAX_TOKENS);
    let output_tokens = f.count("output_tokens", true, MAX_TOKENS);
    let reasoning_tokens = f.count("reasoning_tokens", false, MAX_TOKENS);
    let batch = f.boolean("batch");
    let status = match f.string("status", true, limits::STATUS).as_deref() {
        Some("ok") => Some(Status::Ok),
        Some("error") => Some(Status::Error),
        Some("cancelled") => Some(Status::Cancelled),
        Some(_) => {
            f.fail("status", "invalid_status", "must be ok, error or cancelled");
            None
        }
        None => None,
    };
    let latency_ms = f.count("latency_ms", false, MAX_LATENCY_MS);
    let fallback_from = f.string_list("fallback_from", limits::FALLBACKS);
    let estimated = f.boolean("estimated");
    let estimate_method = f.string("estimate_method", false, limits::ESTIMATE_METHOD);
    let tags = f.tags("tags");
    if cached_input_tokens + cache_write_tokens > input_tokens {
        f.fail(
            "cached_input_tokens",
            "exceeds_input",
            "cached_input_tokens + cache_write_tokens must not exceed input_tokens",
        );
    }
    if reasoning_tokens > output_tokens {
        f.fail(
            "reasoning_tokens",
            "exceeds_output",
            "reasoning_tokens must not exceed output_tokens",
        );
    }
    if estimated && estimate_method.is_none() {
        f.fail(
            "estimate_method",
            "missing",
            "is required when estimated is true",
        );
    }
    if !estimated && estimate_method.is_some() {
        f.fail(
            "estimate_method",
            "unexpected",
            "only allowed when estimated is true",
        );
    }
    f.finish();
    Some(UsageData {
        tenant_id: tenant_id?,
        api_key_id,
        request_id: request_id?,
        provider_request_id,
        authorization_id,
        model: model?,
        provider: provider?,
        region,
        input_tokens,
        cached_input_tokens,
        cache_write_tokens,
        output_tokens,
        reasoning_tokens,
        batch,
        status: status?,
        latency_ms,
        fallback_from,
        estimated,
        estimate_method,
        tags,
    })
}

fn tenant(f: &mut Fields<'_>) -> Option<String> {
    let t = f.string("tenant_id", true, limits::TENANT)?;
    if valid_tenant_id(&t) {
        Some(t)
    } else {
        f.fail(
            "tenant_id",
            "invalid_tenant_id",
            "must match [a-z0-9][a-z0-9_-]{0,63}",
        );
        None
    }
}

fn system(map: Map<String, Value>, errors: &mut Vec<FieldError>) -> Option<SystemData> {
    let mut f = Fields {
        prefix: "data.",
        map,
        errors,
    };
    let tenant_id = tenant(&mut f);
    let kind = f.string("kind", true, 32);
    let known = |k: &str| k == "period_close" || k == "evaluation_tick";
    if kind.as_deref().is_some_and(|k| !known(k)) {
        f.fail(
            "kind",
            "unknown_kind",
            "must be period_close or evaluation_tick",
        );
    }
    let period = f.string("period", true, 13);
    // a close names a month; a tick the hour it ends (UTC), YYYY-MM-DDTHH
    let period_ok = |k: &str, p: &str| match k {
        "period_close" => crate::pricing::tiers::parse_period(p).is_some(),
        _ => crate::ledger::state::tick_instant(p).is_some(),
    };
    if let (Some(k), Some(p)) = (kind.as_deref(), period.as_deref()) {
        if known(k) && !period_ok(k, p) {
            f.fail(
                "period",
                "invalid_period",
                if k == "period_close" {
                    "must be a month, YYYY-MM"
                } else {
                    "must be an hour, YYYY-MM-DDTHH"
                },
            );
        }
    }
    f.finish();
    if !kind.as_deref().is_some_and(known)
        || !period
            .as_deref()
            .is_some_and(|p| period_ok(kind.as_deref().unwrap_or_default(), p))
    {
        return None;
    }
    Some(SystemData {
        tenant_id: tenant_id?,
        kind: kind?,
        period: period?,
    })
}

fn adjustment(map: Map<String, Value>, errors: &mut Vec<FieldError>) -> Option<AdjustmentData> {
    let mut f = Fields {
        prefix: "data.",
        map,
        errors,
    };
    let tenant_id = tenant(&mut f);
    let direction = match f.string("direction", true, 16).as_deref() {
        Some("credit") => Some(Direction::Credit),
        Some("debit") => Some(Direction::Debit),
        Some(_) => {
            f.fail("direction", "invalid_direction", "must be credit or debit");
            None
        }
        None => None,
    };
    let amount = match f.map.remove("amount") {
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        None | Some(Value::Null) => {
            f.fail("amount", "missing", "is required");
            None
        }
        Some(_) => {
            f.fail(
                "amount",
                "not_a_decimal",
                "must be a decimal string such as \"12.50\"",
            );
            None
        }
    };
    // a plain decimal: digits with one optional point (the parser would also take `1_000`)
    let plain = |s: &str| {
        let s = s.strip_prefix('-').unwrap_or(s); // refused below as out of range
        let (int, frac) = s.split_once('.').unwrap_or((s, "0"));
        !int.is_empty()
            && !frac.is_empty()
            && int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    };
    let amount = amount.filter(|s| {
        plain(s) || {
            f.fail(
                "amount",
                "not_a_decimal",
                "must be a decimal string such as \"12.50\"",
            );
            false
        }
    });
    let amount = amount.and_then(|s| match Decimal::from_str_exact(&s) {
        Ok(d) if d > Decimal::ZERO && d <= MAX_ADJUSTMENT => Some(d.normalize()),
        Ok(_) => {
            f.fail(
                "amount",
                "out_of_range",
                format!("must be positive and at most {MAX_ADJUSTMENT}"),
            );
            None
        }
        Err(_) => {
            f.fail(
                "amount",
                "not_a_decimal",
                "must be a decimal string such as \"12.50\"",
            );
            None
        }
    });
    let currency = f.string("currency", true, 3);
    if let Some(c) = &currency {
        if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
            f.fail(
                "currency",
                "invalid_currency",
                "must be an ISO 4217 code such as USD",
            );
        }
    }
    let reason = f.string("reason", true, 1024);
    let request_id = f.string("request_id", false, 128);
    let corrects_event_id = f.string("corrects_event_id", false, 128);
    f.finish();
    Some(AdjustmentData {
        tenant_id: tenant_id?,
        direction: direction?,
        amount: amount?,
        currency: currency?,
        reason: reason?,
        request_id,
        corrects_event_id,
    })
}
