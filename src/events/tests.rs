use chrono::{TimeZone, Utc};
use serde_json::{json, Value};

use super::validate;
use super::*;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap()
}

fn good() -> Value {
    json!({"specversion": "1.0", "id": "01J", "source": "router", "type": USAGE_V1,
        "time": "2026-11-24T11:59:00Z",
        "data": {"tenant_id": "acme", "request_id": "r1", "model": "gpt-4o", "provider": "openai",
                 "input_tokens": 100, "cached_input_tokens": 40, "cache_write_tokens": 10,
                 "output_tokens": 50, "reasoning_tokens": 20, "status": "cancelled", "latency_ms": 9}})
}

fn codes(v: Value) -> Vec<&'static str> {
    parse(v, now())
        .unwrap_err()
        .errors
        .into_iter()
        .map(|e| e.code)
        .collect()
}

#[test]
fn a_valid_event_parses_and_splits_tokens() {
    let ev = parse(good(), now()).unwrap();
    let EventData::Usage(u) = &ev.data else {
        panic!()
    };
    assert_eq!(u.uncached_input_tokens(), 50);
    assert_eq!(u.plain_output_tokens(), 30);
    assert_eq!(u.status, Status::Cancelled);
}

#[test]
fn canonical_form_ignores_key_order_and_defaults() {
    let a = parse(good(), now()).unwrap();
    let mut b = good();
    b["data"]["batch"] = json!(false);
    b["data"]["tags"] = json!({});
    let b = parse(b, now()).unwrap();
    assert_eq!(a.canonical, b.canonical);
    assert_eq!(a.msg_id(), b.msg_id());
}

#[test]
fn msg_id_differs_by_tenant_and_by_payload() {
    let a = parse(good(), now()).unwrap();
    let mut other = good();
    other["data"]["tenant_id"] = json!("beta");
    assert_ne!(a.msg_id(), parse(other, now()).unwrap().msg_id());
    let mut changed = good();
    changed["data"]["output_tokens"] = json!(51);
    assert_ne!(a.msg_id(), parse(changed, now()).unwrap().msg_id());
}

#[test]
fn every_rule_is_enforced() {
    let cases: Vec<(&str, Value, &str)> = vec![
        ("data.x", json!(1), "unknown_field"),
        ("data.input_tokens", json!(-1), "negative"),
        ("data.input_tokens", json!(2.5), "not_a_whole_number"),
        ("data.input_tokens", json!("100"), "not_a_number"),
        ("data.output_tokens", json!(MAX_TOKENS + 1), "too_large"),
        ("data.output_tokens", json!(1e30), "not_a_whole_number"),
        ("data.cached_input_tokens", json!(95), "exceeds_input"),
        ("data.reasoning_tokens", json!(51), "exceeds_output"),
        ("time", json!("2026-11-24T12:06:00Z"), "in_future"),
        ("time", json!("yesterday"), "invalid_time"),
        ("id", json!(""), "empty"),
        ("id", json!("a\u{0007}"), "not_printable"),
        ("specversion", json!("0.3"), "unsupported"),
        ("data.tenant_id", json!("-bad"), "invalid_tenant_id"),
        ("data.status", json!("done"), "invalid_status"),
        ("data.estimated", json!(true), "missing"),
        ("data.estimate_method", json!("chars/4"), "unexpected"),
        ("data.tags", json!({"k": 1}), "invalid_tag"),
        ("data.fallback_from", json!("gpt-4"), "not_a_list"),
    ];
    for (path, value, code) in cases {
        let mut v = good();
        let mut cur = &mut v;
        let parts: Vec<&str> = path.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            cur = &mut cur[*p];
        }
        cur[parts[parts.len() - 1]] = value;
        let got = codes(v);
        assert!(got.contains(&code), "{path}: expected {code}, got {got:?}");
    }
}

#[test]
fn five_minutes_ahead_is_still_accepted() {
    let mut v = good();
    v["time"] = json!("2026-11-24T12:05:00Z");
    assert!(parse(v, now()).is_ok());
}

#[test]
fn adjustments_parse_with_exact_amounts() {
    let v = json!({"specversion": "1.0", "id": "a1", "source": "ops", "type": ADJUSTMENT_V1,
        "time": "2026-11-24T11:00:00Z",
        "data": {"tenant_id": "acme", "direction": "credit", "amount": "12.50", "currency": "USD",
                 "reason": "outage"}});
    let ev = parse(v.clone(), now()).unwrap();
    let EventData::Adjustment(a) = &ev.data else {
        panic!()
    };
    assert_eq!(a.amount.to_string(), "12.5");
    let mut neg = v.clone();
    neg["data"]["amount"] = json!("-1");
    assert!(codes(neg).contains(&"out_of_range"));
    let mut bad = v.clone();
    bad["data"]["currency"] = json!("usd");
    assert!(codes(bad).contains(&"invalid_currency"));
    for s in ["1_000", "1e3", "12.", ".5", "+1", " 1", "1.2.3"] {
        let mut bad = v.clone();
        bad["data"]["amount"] = json!(s);
        assert!(codes(bad).contains(&"not_a_decimal"), "{s}");
    }
    let mut ok = v;
    ok["data"]["amount"] = json!("1000");
    assert!(parse(ok, now()).is_ok());
}

#[test]
fn malformed_json_is_rejected() {
    let e = parse_bytes(b"{nope", now()).unwrap_err();
    assert_eq!(e.errors[0].code, "malformed_json");
}

/// The fast path never accepts what the full parser rejects, and accepts to the same
/// event.
fn same_on_both_paths(v: &Value) {
    let bytes = serde_json::to_vec(v).unwrap();
    let slow = validate::parse_bytes_slow(&bytes, now());
    if let Some(fast) = super::fast::parse_usage(&bytes, now()) {
        assert_eq!(Ok(fast), slow, "{v}");
    }
    assert_eq!(parse_bytes(&bytes, now()), slow, "{v}");
}

#[test]
fn fast_path_agrees_with_the_full_parser_on_every_rule() {
    let mut v = good();
    v["data"]["tags"] = json!({"project": "x"});
    v["data"]["fallback_from"] = json!(["a", "b"]);
    v["data"]["estimated"] = json!(true);
    v["data"]["estimate_method"] = json!("tiktoken");
    let bytes = serde_json::to_vec(&v).unwrap();
    assert!(
        super::fast::parse_usage(&bytes, now()).is_some(),
        "a valid event takes the fast path"
    );
    same_on_both_paths(&v);
    let edits: Vec<(&str, Value)> = vec![
        ("data.x", json!(1)),
        ("x", json!(1)),
        ("data.input_tokens", json!(-1)),
        ("data.input_tokens", json!(2.5)),
        ("data.input_tokens", json!(100.0)),
        ("data.input_tokens", json!("100")),
        ("data.output_tokens", json!(MAX_TOKENS + 1)),
        ("data.output_tokens", json!(MAX_TOKENS)),
        ("data.cached_input_tokens", json!(95)),
        ("data.cached_input_tokens", json!(null)),
        ("data.reasoning_tokens", json!(51)),
        ("data.latency_ms", json!(MAX_LATENCY_MS + 1)),
        ("time", json!("2026-11-24T12:06:00Z")),
        ("time", json!("2026-11-24T12:05:00Z")),
        ("time", json!("yesterday")),
        ("id", json!("")),
        ("id", json!("é".repeat(128))),
        ("id", json!("é".repeat(129))),
        ("id", json!("a\u{0007}")),
        ("specversion", json!("0.3")),
        ("type", json!(ADJUSTMENT_V1)),
        ("datacontenttype", json!("text/plain")),
        ("datacontenttype", json!("application/json")),
        ("datacontenttype", json!("Application/JSON; charset=utf-8")),
        ("datacontenttype", json!("application/jsonx")),
        ("subject", json!("")),
        ("data.tenant_id", json!("-bad")),
        ("data.tenant_id", json!(null)),
        ("data.status", json!("done")),
        ("data.status", json!("ok")),
        ("data.estimated", json!(true)),
        ("data.estimated", json!(null)),
        ("data.estimate_method", json!("chars/4")),
        ("data.tags", json!({"k": 1})),
        ("data.tags", json!({"": "v"})),
        ("data.tags", json!(null)),
        ("data.fallback_from", json!("gpt-4")),
        ("data.fallback_from", json!([""])),
        ("data.fallback_from", json!(vec!["m"; 17])),
        ("data.batch", json!(1)),
        ("data.batch", json!(null)),
        ("data.region", json!("")),
        ("data.model", json!(null)),
        ("data.tags", json!({"k": "a\u{0}"})),
        ("data.tags", json!({"a\u{0}": "v"})),
        ("data.tags", json!({"k": "line\nbreak"})),
        ("data.fallback_from", json!(["gpt\u{0}"])),
        ("id", json!("period-close:2026-11")),
        ("id", json!("evaluation-tick:2026-11-24T11")),
        ("source", json!("my router")),
        ("source", json!("https://gw.example.com/r?x=1")),
        ("source", json!("1bad:scheme")),
        ("subject", json!("req-1")),
        ("dataschema", json!("https://example.com/usage.json")),
        ("dataschema", json!("usage.json")),
        (
            "traceparent",
            json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ),
        ("myext", json!(true)),
        ("myext", json!(7)),
        ("myext", json!(null)),
        ("myext", json!([1])),
        ("myExt", json!("x")),
        ("data_base64", json!("AAAA")),
    ];
    for (path, value) in edits {
        let mut v = good();
        let parts: Vec<&str> = path.split('.').collect();
        let mut cur = &mut v;
        for p in &parts[..parts.len() - 1] {
            cur = &mut cur[*p];
        }
        cur[parts[parts.len() - 1]] = value;
        same_on_both_paths(&v);
    }
    // duplicate keys: the full parser keeps the last one
    let dup = br#"{"specversion":"1.0","id":"d","id":"e","source":"s","type":"tokenledger.usage.v1","time":"2026-11-24T11:00:00Z","data":{"tenant_id":"acme","request_id":"r","model":"m","provider":"p","input_tokens":1,"output_tokens":1,"status":"ok"}}"#;
    assert_eq!(
        parse_bytes(dup, now()),
        validate::parse_bytes_slow(dup, now())
    );
}

#[test]
fn reserved_ids_and_control_characters_in_tags_and_fallbacks_are_rejected_on_both_paths() {
    for (path, value, code) in [
        ("data.tags", json!({"k": "a\u{0}"}), "invalid_tag"),
        ("data.tags", json!({"a\u{0}": "v"}), "invalid_tag"),
        ("data.tags", json!({"k": "\u{85}"}), "invalid_tag"),
        ("data.fallback_from", json!(["gpt\u{0}"]), "invalid_item"),
        ("id", json!("period-close:2026-11"), "reserved"),
    ] {
        let mut v = good();
        match path.split_once('.') {
            Some((a, b)) => v[a][b] = value,
            None => v[path] = value,
        }
        assert!(codes(v.clone()).contains(&code), "{v}");
        let bytes = serde_json::to_vec(&v).unwrap();
        assert!(super::fast::parse_usage(&bytes, now()).is_none(), "{v}");
        assert!(parse_bytes(&bytes, now()).is_err(), "{v}");
    }
}

#[test]
fn context_attributes_are_kept_in_the_canonical_envelope() {
    let mut v = good();
    v["subject"] = json!("req-1");
    v["traceparent"] = json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    v["retries"] = json!(3);
    v["sampled"] = json!(false);
    v["tracestate"] = json!("");
    let ev = parse(v.clone(), now()).unwrap();
    let canon: Value = serde_json::from_slice(&ev.canonical).unwrap();
    assert_eq!(canon["subject"], "req-1");
    assert_eq!(canon["traceparent"], v["traceparent"]);
    assert_eq!(canon["retries"], "3");
    assert_eq!(canon["sampled"], "false");
    assert_eq!(canon["tracestate"], "");
    // the canonical form parses to itself, and string-typed values are the same event
    assert_eq!(parse(canon.clone(), now()).unwrap().canonical, ev.canonical);
    v["retries"] = json!("3");
    v["sampled"] = json!("false");
    assert_eq!(parse(v, now()).unwrap().payload_hash, ev.payload_hash);
    // a changed extension is another payload (a conflict if the id is reused)
    canon_with(&canon, "retries", json!("4"), &ev);
    // too many extensions
    let mut many = good();
    for i in 0..=limits::EXTENSIONS {
        many[format!("ext{i}")] = json!("v");
    }
    assert!(codes(many).contains(&"too_many_extensions"));
}

fn canon_with(canon: &Value, k: &str, v: Value, ev: &Event) {
    let mut c = canon.clone();
    c[k] = v;
    assert_ne!(parse(c, now()).unwrap().payload_hash, ev.payload_hash);
}
