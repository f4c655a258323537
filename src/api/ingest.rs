//! `POST /v1/events`: one CloudEvent or a batch, validated whole, published to JetStream,
//! answered 202 only after JetStream acknowledged every event.

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};

use super::{ApiError, AppState, Caller};
use crate::events::{self, Event, EventData};

/// Most events in one batch.
pub const MAX_BATCH_EVENTS: usize = 1000;
/// Largest request body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Serialize, utoipa::ToSchema)]
pub struct IngestResponse {
    /// Events JetStream acknowledged (duplicates included: they change nothing).
    pub accepted: usize,
    pub ids: Vec<String>,
}

/// Ingest usage or adjustment events.
#[utoipa::path(post, path = "/v1/events", tag = "ingest",
    request_body(content = Value, description = "A CloudEvent, or an array of them",
        content_type = "application/cloudevents+json"),
    responses((status = 202, body = IngestResponse), (status = 422, description = "invalid events, nothing published"),
        (status = 413, description = "body too large"), (status = 415, description = "unsupported content type")),
    security(("bearer" = [])))]
pub async fn ingest(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<IngestResponse>), ApiError> {
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body exceeds {MAX_BODY_BYTES} bytes"),
        ),
        other => ApiError::bad_request("unreadable_body", other.body_text()),
    })?;
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    // CloudEvents HTTP binding: without a CloudEvents media type, `ce-` headers carry the
    // attributes and the body is the event's data (binary content mode); its
    // Content-Type is the datacontenttype, which may be absent (then JSON is assumed)
    let binary =
        !ctype.starts_with("application/cloudevents") && headers.contains_key("ce-specversion");
    let batch_only = match ctype.as_str() {
        "application/cloudevents-batch+json" => true,
        "application/cloudevents+json" | "application/json" => false,
        "" if binary => false,
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "use application/cloudevents+json, application/cloudevents-batch+json or application/json",
            ))
        }
    };
    let value: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
    })?;
    let value = if binary {
        binary_event(&headers, value)?
    } else {
        value
    };
    let items = match value {
        Value::Array(items) => items,
        _ if batch_only => {
            return Err(ApiError::bad_request(
                "not_a_batch",
                "a cloudevents-batch body must be a JSON array",
            ))
        }
        single => vec![single],
    };
    // an empty batch is valid (CloudEvents JSON batch format): nothing to publish
    if items.len() > MAX_BATCH_EVENTS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "batch_size",
            format!(
                "a batch holds at most {MAX_BATCH_EVENTS} events; this one has {}",
                items.len()
            ),
        ));
    }
    let events = validate_all(&caller, items)?;
    st.bus
        .publish_events(|t| st.settings.usage_subject(t), &events)
        .await?;
    st.metrics
        .inc("tokenledger_ingest_events_total", events.len() as u64);
    Ok((
        StatusCode::ACCEPTED,
        Json(IngestResponse {
            accepted: events.len(),
            ids: events.iter().map(|e| e.id.clone()).collect(),
        }),
    ))
}

/// Validate every event; any failure rejects the whole batch, naming each bad event.
fn validate_all(caller: &Caller, items: Vec<Value>) -> Result<Vec<Event>, ApiError> {
    let now = chrono::Utc::now();
    let mut ok = Vec::with_capacity(items.len());
    let mut bad = Vec::new();
    let mut forbidden = Vec::new();
    for (index, item) in items.into_iter().enumerate() {
        match events::parse(item, now) {
            Ok(ev) => {
                if matches!(ev.data, EventData::System(_)) {
                    forbidden.push(json!({"index": index, "id": ev.id,
                        "reason": "system events are appended by the service only"}));
                } else if ev.id.starts_with(crate::invoices::store::NOTE_EVENT_PREFIX) {
                    forbidden.push(json!({"index": index, "id": ev.id,
                        "reason": "invoice-note: ids are the adjustments of credit and debit notes, issued through the invoices API"}));
                } else if let Caller::Tenant { tenant_id, .. } = caller {
                    if matches!(ev.data, EventData::Adjustment(_)) {
                        forbidden.push(json!({"index": index, "id": ev.id,
                            "reason": "adjustments are operator-only"}));
                    } else if ev.tenant_id() != tenant_id {
                        forbidden.push(json!({"index": index, "id": ev.id,
                            "reason": "a tenant key may only submit its own tenant's events"}));
                    }
                }
                ok.push(ev);
            }
            Err(rej) => bad.push(json!({"index": index, "id": rej.id, "reason": rej.summary(), "errors": rej.errors})),
        }
    }
    if !bad.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_events",
            format!(
                "{} of the events are invalid; nothing was published",
                bad.len()
            ),
        )
        .with_errors(Value::Array(bad)));
    }
    if !forbidden.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden_events",
            "this key may not submit some of these events; nothing was published",
        )
        .with_errors(Value::Array(forbidden)));
    }
    Ok(ok)
}

/// A binary-mode event as the JSON envelope `events::parse` reads: each `ce-<name>` header
/// is the attribute `<name>` (its value unquoted, then percent-decoded as the HTTP binding
/// says), `Content-Type` is `datacontenttype`, and the body is `data`.
fn binary_event(headers: &HeaderMap, data: Value) -> Result<Value, ApiError> {
    let mut envelope = serde_json::Map::new();
    for name in headers.keys() {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        if attr == "datacontenttype" {
            return Err(ApiError::bad_request(
                "invalid_binary_event",
                "a binary-mode event carries its datacontenttype in Content-Type, not ce-datacontenttype",
            ));
        }
        let mut values = headers.get_all(name).iter();
        let (Some(v), None) = (values.next(), values.next()) else {
            return Err(ApiError::bad_request(
                "invalid_binary_event",
                format!("the header {name} appears more than once"),
            ));
        };
        let text = v
            .to_str()
            .ok()
            .and_then(|t| header_value(t.trim()))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_binary_event",
                    format!("the header {name} is not percent-encoded UTF-8"),
                )
            })?;
        envelope.insert(attr.to_string(), Value::String(text));
    }
    if let Some(c) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        envelope.insert("datacontenttype".into(), Value::String(c.to_string()));
    }
    envelope.insert("data".into(), data);
    Ok(Value::Object(envelope))
}

/// An attribute's value from its header: a double-quoted string is unescaped first, then
/// one round of percent-decoding; the bytes must be UTF-8 (so overlong forms fail).
fn header_value(raw: &str) -> Option<String> {
    let unquoted = match raw.strip_prefix('"') {
        Some(inner) => {
            let inner = inner.strip_suffix('"')?;
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                out.push(if c == '\\' { chars.next()? } else { c });
            }
            out
        }
        None => raw.to_string(),
    };
    let b = unquoted.as_bytes();
    let mut bytes = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = unquoted.get(i + 1..i + 3)?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            bytes.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::header_value;

    #[test]
    fn binary_mode_header_values_are_unquoted_and_percent_decoded() {
        assert_eq!(
            header_value("Euro%20%E2%82%AC%20%F0%9F%98%80").as_deref(),
            Some("Euro € 😀")
        );
        assert_eq!(header_value("%41%62c").as_deref(), Some("Abc"));
        assert_eq!(header_value("%c3%a9").as_deref(), Some("é"));
        assert_eq!(
            header_value(r#""a \"b\" c%21""#).as_deref(),
            Some("a \"b\" c!")
        );
        assert_eq!(
            header_value("/plain/source").as_deref(),
            Some("/plain/source")
        );
        // an overlong encoding of U+0020, a broken escape, an unclosed quote
        for bad in ["%C0%A0", "%4", "%zz", "%+1", "\"open"] {
            assert_eq!(header_value(bad), None, "{bad}");
        }
    }
}
