//! The webhook payloads as OpenAPI 3.1 `webhooks` (one per alert type): the Standard
//! Webhooks headers and the JSON body, schema version 1.

use serde_json::{json, Map, Value};

use super::SCHEMA_VERSION;

const S: &str = "string";
const I: &str = "integer";
const B: &str = "boolean";
/// Decimal amounts travel as strings.
const D: &str = "decimal";
/// RFC 3339 instants.
const T: &str = "date-time";

const BUDGET: &[(&str, &str)] = &[
    ("budget", S),
    ("budget_version", I),
    ("scope", S),
    ("scope_value", S),
    ("period", S),
    ("period_kind", S),
    ("amount", D),
    ("spent", D),
    ("action", S),
    ("downgrade_class", S),
    ("event_id", S),
    ("request_id", S),
];

/// (type, what it means, its data fields and their kinds)
type TypeDoc = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

fn types() -> Vec<TypeDoc> {
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = BUDGET.to_vec();
        v.extend_from_slice(extra);
        v
    };
    vec![
        (
            "budget.threshold_crossed",
            "A charge took a budget's spend in the period to one of its thresholds.",
            with(&[("threshold_percent", D), ("limit_reached", B)]),
        ),
        (
            "budget.exhausted",
            "A charge took a budget's spend in the period to its limit.",
            BUDGET.to_vec(),
        ),
        (
            "budget.forecast_exceeded",
            "The period's burn rate so far (at the event's time) reaches the limit before the period ends.",
            with(&[("forecast_date", T), ("period_start", T), ("period_end", T)]),
        ),
        (
            "budget.action_taken",
            "A budget blocked or downgraded a request for the first time in the period.",
            vec![
                ("budget", S),
                ("budget_version", I),
                ("scope", S),
                ("scope_value", S),
                ("period", S),
                ("period_kind", S),
                ("amount", D),
                ("spent", D),
                ("held", D),
                ("action", S),
                ("budget_action", S),
                ("authorization_id", S),
                ("api_key_id", S),
                ("requested_model", S),
                ("requested_provider", S),
                ("downgraded_to", S),
                ("estimated_cost", D),
                ("reason", S),
            ],
        ),
        (
            "commitment.threshold_crossed",
            "A charge drew a commitment down to one of its alert thresholds.",
            vec![
                ("commitment", S),
                ("commitment_version", I),
                ("period", S),
                ("threshold_percent", D),
                ("amount", D),
                ("drawn", D),
                ("event_id", S),
                ("request_id", S),
            ],
        ),
        (
            "commitment.exhausted",
            "A charge drew a commitment down fully for its period.",
            vec![
                ("commitment", S),
                ("period", S),
                ("amount", D),
                ("drawn", D),
                ("event_id", S),
                ("request_id", S),
            ],
        ),
        (
            "reservation.exhausted",
            "A charge used up a reservation's capacity for its minute.",
            vec![
                ("reservation", S),
                ("minute", S),
                ("capacity", I),
                ("covered", I),
                ("event_id", S),
                ("request_id", S),
            ],
        ),
        (
            "reservation.underutilized",
            "An hourly evaluation found a reservation used below its alert share over the last day.",
            vec![
                ("reservation", S),
                ("reservation_version", I),
                ("day", S),
                ("window_start", T),
                ("window_end", T),
                ("covered_tokens", I),
                ("capacity_tokens", I),
                ("utilization_percent", D),
                ("alert_below_percent", D),
                ("event_id", S),
            ],
        ),
        (
            "invoice.finalized",
            "A period's close finalised the tenant's invoice (immutable from now on).",
            vec![
                ("invoice_number", S),
                ("period", S),
                ("currency", S),
                ("total", D),
                ("lines", I),
                ("content_hash", S),
            ],
        ),
        (
            "tier.crossed",
            "A charge moved the tenant into a higher volume tier.",
            vec![
                ("schedule", S),
                ("schedule_version", I),
                ("period", S),
                ("from_tier", I),
                ("to_tier", I),
                ("discount_percent", D),
                ("units", D),
                ("event_id", S),
                ("request_id", S),
            ],
        ),
        (
            "webhook.endpoint_disabled",
            "One of the tenant's endpoints was disabled (410 Gone, or failing for days).",
            vec![
                ("endpoint_id", S),
                ("url", S),
                ("reason", S),
                ("failing_since", T),
                ("disabled_at", T),
            ],
        ),
        (
            "webhook.test",
            "A test event asked for over the API.",
            vec![("endpoint_id", S), ("message", S)],
        ),
    ]
}

fn field(kind: &str) -> Value {
    match kind {
        D => json!({"type": ["string", "null"], "description": "decimal, as a string"}),
        T => json!({"type": ["string", "null"], "format": "date-time"}),
        other => json!({"type": [other, "null"]}),
    }
}

/// The OpenAPI 3.1 `webhooks` object.
pub fn openapi_webhooks() -> Value {
    let header = |name: &str, description: &str| {
        json!({"name": name, "in": "header", "required": true,
               "schema": {"type": "string"}, "description": description})
    };
    let mut out = Map::new();
    for (ty, about, fields) in types() {
        let mut props = Map::new();
        props.insert(
            "schema_version".into(),
            json!({"type": "integer", "const": SCHEMA_VERSION}),
        );
        props.insert("tenant_id".into(), json!({"type": "string"}));
        if !ty.starts_with("webhook.test") {
            props.insert("alert_id".into(), json!({"type": "integer"}));
            props.insert(
                "occurred_at".into(),
                json!({"type": "string", "format": "date-time"}),
            );
        }
        for (name, kind) in fields {
            props.insert(name.into(), field(kind));
        }
        props.insert(
            "links".into(),
            json!({"type": "object", "additionalProperties": {"type": "string"},
                   "description": "paths on the billing API to the objects concerned"}),
        );
        let body = json!({
            "type": "object",
            "required": ["type", "timestamp", "data"],
            "properties": {
                "type": {"type": "string", "const": ty},
                "timestamp": {"type": "string", "format": "date-time"},
                "data": {"type": "object", "required": ["schema_version", "tenant_id"],
                         "properties": props},
            },
        });
        out.insert(
            ty.into(),
            json!({"post": {
                "summary": about,
                "description": "Signed per Standard Webhooks; answer 2xx to acknowledge. Retries keep the webhook-id.",
                "parameters": [
                    header("webhook-id", "the message id, the same on every attempt"),
                    header("webhook-timestamp", "the attempt's time, Unix seconds"),
                    header("webhook-signature", "space-separated v1,<base64 HMAC-SHA256 of id.timestamp.body>, one per valid secret"),
                ],
                "requestBody": {"required": true, "content": {"application/json": {"schema": body}}},
                "responses": {
                    "2XX": {"description": "received"},
                    "410": {"description": "gone: the endpoint is disabled"},
                },
            }}),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_subscribable_type_is_documented() {
        let w = super::openapi_webhooks();
        for t in super::super::EVENT_TYPES {
            assert!(w[*t]["post"]["requestBody"].is_object(), "{t}");
        }
    }
}
