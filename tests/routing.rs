//! Quotes and routing decisions: a tenant crosses a tier and reaches a budget limit, the
//! decision in NATS KV changes, and quotes reflect it; authorisations downgrade.

mod common;

use std::time::Duration;

use common::{dec, fresh_settings, kv_until, routing_kv, usage, TestApp, ADMIN};
use serde_json::{json, Value};

const EVENTS: &str = "select count(*) from events";
const PAST: &str = "2020-01-01T00:00:00Z";

async fn price(app: &TestApp, model: &str, rate: &str) {
    let r = app
        .admin_post(
            "/v1/admin/prices",
            Some(
                &json!({"provider": "openai", "model": model, "side": "cost", "currency": "USD",
                "effective_from": PAST, "input_per_mtok": rate, "output_per_mtok": rate}),
            ),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

async fn class(app: &TestApp, name: &str, models: &[&str]) {
    let candidates: Vec<Value> = models
        .iter()
        .map(|m| json!({"provider": "openai", "model": m, "quality": "0.8"}))
        .collect();
    let r = app
        .admin_post(
            "/v1/admin/routing-classes",
            Some(&json!({"name": name, "quality_floor": "0.5", "candidates": candidates})),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

fn first_model(d: &Value) -> String {
    d["candidates"][0]["model"].as_str().unwrap().to_string()
}

async fn quote(app: &TestApp, key: &str, body: Value) -> (u16, Value) {
    let r = app
        .http
        .post(app.url("/v1/quote"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap())
}

#[tokio::test]
async fn crossing_a_tier_and_reaching_a_budget_change_the_published_decision() {
    let mut s = fresh_settings().await;
    s.roles = vec!["api".into(), "writer".into(), "pricing".into()];
    s.clock_skew = Duration::ZERO; // classes take effect at once
    let mut app = TestApp::start(s.clone()).await;
    app.seed_prices().await;
    price(&app, "r-cheap", "1").await; // customer 1.2 per million
    price(&app, "r-dear", "2").await; // customer 2.4 per million
    class(&app, "test:pair", &["r-cheap", "r-dear"]).await;
    let key = app.tenant("acme").await;
    let r = app
        .http
        .post(app.url("/v1/budgets"))
        .bearer_auth(&key)
        .json(
            &json!({"name": "cap", "scope": "tenant", "period": "month", "amount": "6",
            "action": "block", "effective_from": PAST}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let kv = routing_kv(&s).await;
    let k = "acme.test=3Apair";
    // at first r-cheap is cheaper
    let d = kv_until(&kv, k, |v| {
        v["status"] == "ok" && v["candidates"].as_array().is_some_and(|c| c.len() == 2)
    })
    .await;
    assert_eq!(d["schema"], "tokenledger.routing_decision.v1");
    assert_eq!(first_model(&d), "r-cheap");
    let mix = json!({"candidates": [{"model": "r-cheap"}, {"model": "r-dear"}],
        "input_tokens": 1000000, "output_tokens": 0});
    let (st, q) = quote(&app, &key, mix.clone()).await;
    assert_eq!(st, 200, "{q}");
    assert_eq!(first_model(&q), "r-cheap");
    assert_eq!(
        dec(&q["candidates"][1]["effective_price"]),
        "2.4".parse().unwrap()
    );

    // volume tier on r-dear: 75% off once its list spend passes 5, added just before the
    // usage that crosses it — the publisher's cached price book may not have it yet when the
    // crossing arrives, and the crossing's decision must still apply it
    let r = app
        .admin_post(
            "/v1/admin/tenants/acme/tier-schedules",
            Some(&json!({"name": "dear", "mode": "volume", "metric": "spend", "scope": "model",
                "scope_value": "r-dear", "effective_from": PAST,
                "tiers": [{"up_to": "5", "discount_percent": "0"}, {"up_to": null, "discount_percent": "75"}]})),
        )
        .await;
    assert_eq!(r.status(), 201);
    // usage of r-dear crosses its tier (list 4.8, then 1.2; charged 4.8 + 0.3 - credit 3.6)
    app.ingest(
        ADMIN,
        &json!([
            usage("d1", "acme", "r-dear", 2_000_000, 0),
            usage("d2", "acme", "r-dear", 500_000, 0)
        ]),
    )
    .await;
    app.wait_count(EVENTS, 2).await;
    assert_eq!(
        app.count("select count(*) from alert_facts where type = 'tier.crossed'")
            .await,
        1
    );
    let d = kv_until(&kv, k, |v| v["trigger"] == "tier_crossed").await;
    assert_eq!(first_model(&d), "r-dear", "{d}");
    let (_, q) = quote(&app, &key, mix.clone()).await;
    assert_eq!(first_model(&q), "r-dear");
    assert_eq!(
        dec(&q["candidates"][0]["effective_price"]),
        "0.6".parse().unwrap()
    );
    assert_eq!(q["candidates"][0]["tier"]["tier"], 1);
    let r: Value = app
        .get(&key, "/v1/routing/test:pair")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first_model(&r), "r-dear");

    // budget spend (final prices 4.8 + 0.3, credits not subtracted) reaches 6.3 >= 6: the
    // decision says the tenant is blocked
    app.ingest(
        ADMIN,
        &json!([usage("c1", "acme", "r-cheap", 1_000_000, 0)]),
    )
    .await;
    let d = kv_until(&kv, k, |v| v["trigger"] == "budget_limit").await;
    assert_eq!(d["status"], "blocked", "{d}");
    assert_eq!(d["blocked_by"], "cap");

    // bad quotes: a clear error
    for bad in [
        json!({"routing_class": "test:pair", "candidates": [{"model": "r-cheap"}], "input_tokens": 1, "output_tokens": 1}),
        json!({"routing_class": "nope", "input_tokens": 1, "output_tokens": 1}),
        json!({"candidates": [{"model": "r-cheap"}], "input_tokens": 1, "output_tokens": 1, "reasoning_tokens": 2}),
        json!({"candidates": [{"model": "r-cheap"}], "input_tokens": 1, "output_tokens": 1, "colour": "red"}),
    ] {
        let (st, p) = quote(&app, &key, bad.clone()).await;
        assert_eq!(st, 422, "{bad} -> {p}");
    }
    app.verify_ok().await;
    app.stop().await;
}

#[tokio::test]
async fn a_downgrade_budget_routes_to_its_class_when_the_request_would_not_fit() {
    let mut s = fresh_settings().await;
    s.clock_skew = Duration::ZERO;
    let mut app = TestApp::start(s).await;
    app.seed_prices().await;
    price(&app, "r-cheap", "1").await;
    price(&app, "r-dear", "10").await;
    class(&app, "test:cheap", &["r-cheap"]).await;
    let key = app.tenant("acme").await;
    let r = app
        .http
        .post(app.url("/v1/budgets"))
        .bearer_auth(&key)
        .json(
            &json!({"name": "dg", "scope": "tenant", "period": "day", "amount": "0.05",
            "action": "downgrade", "downgrade_class": "test:cheap", "effective_from": PAST}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // r-dear worst case: 10,000 tokens at 12 per million = 0.12 > 0.05; r-cheap: 0.012
    let req = json!({"model": "r-dear", "estimated_input_tokens": 5000, "max_tokens": 5000});
    let r = app
        .http
        .post(app.url("/v1/authorize"))
        .bearer_auth(&key)
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let d: Value = r.json().await.unwrap();
    assert_eq!(d["decision"], "downgrade", "{d}");
    assert_eq!(d["model"], "r-cheap");
    assert_eq!(dec(&d["estimated_cost"]), "0.012".parse().unwrap());
    assert_eq!(d["denied_by"], "dg");
    // the downgraded request's hold counts: four fit (0.048), the fifth is denied
    let mut n = 0;
    loop {
        let d: Value = app
            .http
            .post(app.url("/v1/authorize"))
            .bearer_auth(&key)
            .json(&req)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if d["decision"] == "deny" {
            assert!(d["reason"].as_str().unwrap().contains("test:cheap"), "{d}");
            break;
        }
        n += 1;
        assert!(n < 10);
    }
    assert_eq!(n, 3, "one above plus three more fit in 0.05");
    // a routing class may be authorised directly: its cheapest candidate that fits
    let r = app
        .http
        .post(app.url("/v1/authorize"))
        .bearer_auth(&key)
        .json(&json!({"model": "test:cheap", "estimated_input_tokens": 10, "max_tokens": 10}))
        .send()
        .await
        .unwrap();
    let d: Value = r.json().await.unwrap();
    assert_eq!(
        (d["decision"].as_str(), d["model"].as_str()),
        (Some("allow"), Some("r-cheap")),
        "{d}"
    );
    app.stop().await;
}
