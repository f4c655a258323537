//! Volume tier discounts end to end: graduated and volume schedules rate live usage,
//! the breakdown shows the slices, volume credits move money, positions are a rebuildable
//! projection, and verify replays all of it.

mod common;

use common::{dec, usage, TestApp, ADMIN};
use serde_json::{json, Value};

const EVENTS: &str = "select count(*) from events";

async fn price(app: &TestApp, model: &str, input: &str, output: &str) {
    let r = app
        .admin_post(
            "/v1/admin/prices",
            Some(
                &json!({"provider": "openai", "model": model, "side": "cost", "currency": "USD",
                "effective_from": "2020-01-01T00:00:00Z",
                "input_per_mtok": input, "output_per_mtok": output}),
            ),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

async fn schedule(app: &TestApp, tenant: &str, body: Value) -> reqwest::Response {
    app.admin_post(
        &format!("/v1/admin/tenants/{tenant}/tier-schedules"),
        Some(&body),
    )
    .await
}

fn ev(id: &str, tenant: &str, model: &str, input: u64, output: u64) -> Value {
    usage(id, tenant, model, input, output)
}

async fn detail(app: &TestApp, key: &str, req: &str) -> Value {
    let r = app.get(key, &format!("/v1/requests/{req}")).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn tier_schedules_price_usage_and_verify_replays_them() {
    let mut app = TestApp::spawn().await;
    // the bundled prices and a 20% global markup are seeded by spawn()
    price(&app, "tier-a", "1", "4").await; // customer 1.2 / 4.8 per million
    price(&app, "tier-b", "10", "10").await; // customer 12 / 12
    let key = app.tenant("acme").await;
    let beta = app.tenant("beta").await;
    // no events yet: the schedules may start in the past
    let r = schedule(&app, "acme", json!({"name": "a-tokens", "mode": "graduated", "metric": "tokens",
        "scope": "model", "scope_value": "tier-a", "effective_from": "2020-01-01T00:00:00Z",
        "tiers": [{"up_to": "1000", "discount_percent": "0"}, {"up_to": "3000", "discount_percent": "10"},
                  {"up_to": null, "discount_percent": "25"}]})).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = schedule(&app, "acme", json!({"name": "b-spend", "mode": "volume", "metric": "spend",
        "scope": "model", "scope_value": "tier-b", "effective_from": "2020-01-01T00:00:00Z",
        "tiers": [{"up_to": "0.01", "discount_percent": "0"}, {"up_to": null, "discount_percent": "20"}]})).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    let batch = json!([
        ev("e1", "acme", "tier-a", 600, 300),
        ev("e2", "acme", "tier-a", 500, 100),
        ev("e3", "acme", "tier-a", 2500, 0),
        ev("e4", "acme", "tier-b", 500, 0),
        ev("e5", "acme", "tier-b", 500, 0),
        ev("e6", "beta", "tier-a", 600, 300),
    ]);
    app.ingest(ADMIN, &batch).await;
    app.wait_count(EVENTS, 6).await;
    app.drain().await;

    // graduated by tokens: e1 inside tier 0
    let d = detail(&app, &key, "req-e1").await;
    assert_eq!(dec(&d["price_amount"]), "0.00216".parse().unwrap());
    assert_eq!(d["breakdown"]["tier"]["tier"], 0);
    // e2 straddles 1,000 tokens: 100 input tokens at tier 0, the rest at 10% off
    let d = detail(&app, &key, "req-e2").await;
    let t = &d["breakdown"]["tier"];
    assert_eq!(t["schedule"], "a-tokens");
    assert_eq!(t["units_before"], "900");
    let slices = t["slices"].as_array().unwrap();
    assert_eq!(slices.len(), 2, "{t}");
    assert_eq!(
        (slices[0]["tier"].clone(), dec(&slices[0]["units"])),
        (json!(0), 100.into())
    );
    assert_eq!(dec(&slices[0]["price"]), "0.00012".parse().unwrap());
    assert_eq!(
        (slices[1]["tier"].clone(), dec(&slices[1]["units"])),
        (json!(1), 500.into())
    );
    assert_eq!(dec(&slices[1]["price"]), "0.000864".parse().unwrap());
    assert_eq!(dec(&d["price_amount"]), "0.000984".parse().unwrap());
    assert_eq!(
        dec(&d["breakdown"]["price_before_tiers"]),
        "0.00108".parse().unwrap()
    );
    // e3: 1,500 tokens at 10% off, 1,000 at 25% off
    let d = detail(&app, &key, "req-e3").await;
    assert_eq!(dec(&d["price_amount"]), "0.00252".parse().unwrap());
    assert_eq!(d["breakdown"]["tier"]["tier"], 2);
    // volume by spend: e5 crosses 0.01 and credits e4's units down to 20% off
    let d = detail(&app, &key, "req-e4").await;
    assert_eq!(dec(&d["price_amount"]), "0.006".parse().unwrap());
    let d = detail(&app, &key, "req-e5").await;
    assert_eq!(dec(&d["price_amount"]), "0.0048".parse().unwrap());
    assert_eq!(
        dec(&d["breakdown"]["tier"]["credit"]),
        "0.0012".parse().unwrap()
    );
    let kinds: Vec<String> = d["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(kinds.contains(&"tier_credit".to_string()), "{kinds:?}");
    // another tenant pays list price: schedules are per tenant
    let d = detail(&app, &beta, "req-e6").await;
    assert_eq!(dec(&d["price_amount"]), "0.00216".parse().unwrap());
    assert!(d["breakdown"].get("tier").is_none());

    // positions per schedule and period
    let r = app.get(&key, "/v1/tiers").await;
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    let rows = p["data"].as_array().unwrap();
    let a = rows.iter().find(|r| r["schedule"] == "a-tokens").unwrap();
    assert_eq!(dec(&a["units"]), 4000.into());
    let b = rows.iter().find(|r| r["schedule"] == "b-spend").unwrap();
    assert_eq!(dec(&b["units"]), "0.012".parse().unwrap());
    assert_eq!(
        dec(&b["charged"]),
        "0.0096".parse().unwrap(),
        "all units at 20% off"
    );
    // beta sees none of acme's positions
    let p: Value = app.get(&beta, "/v1/tiers").await.json().await.unwrap();
    assert!(p["data"].as_array().unwrap().is_empty());

    // balances carry the credit and still sum to zero
    let bal: Value = app.get(&key, "/v1/balances").await.json().await.unwrap();
    let rows = bal["data"].as_array().unwrap();
    let discounts = rows.iter().find(|r| r["account"] == "discounts").unwrap();
    assert_eq!(dec(&discounts["balance"]), "0.0012".parse().unwrap());
    let receivable = rows.iter().find(|r| r["account"] == "receivable").unwrap();
    // 0.00216 + 0.000984 + 0.00252 + 0.006 + 0.0048 - 0.0012
    assert_eq!(dec(&receivable["balance"]), "0.015264".parse().unwrap());

    // verify replays the tiers; rebuild reproduces the positions; tampering is caught
    app.rebuild_and_verify().await;
    app.tamper_is_caught(
        "update tier_positions set units = units + 1 where schedule = 'a-tokens'",
        "tier_positions",
    )
    .await;
    tokenledger::projections::rebuild::rebuild(&app.owner)
        .await
        .unwrap();

    // the writer continues from the rebuilt position: e7 is all in tier 2
    app.ingest(ADMIN, &json!([ev("e7", "acme", "tier-a", 1000, 0)]))
        .await;
    app.wait_count(EVENTS, 7).await;
    app.drain().await;
    let d = detail(&app, &key, "req-e7").await;
    assert_eq!(dec(&d["price_amount"]), "0.0009".parse().unwrap());
    app.verify_ok().await;
    app.stop().await;
}

#[tokio::test]
async fn bad_tier_schedules_are_refused_and_change_nothing() {
    let mut app = TestApp::spawn().await;
    let key = app.tenant("acme").await;
    let good = json!({"name": "s", "mode": "graduated", "metric": "tokens", "scope": "all",
        "tiers": [{"up_to": "1000", "discount_percent": "0"}, {"up_to": null, "discount_percent": "5"}]});
    let mut bad = Vec::new();
    let mut b = good.clone();
    b["tiers"][1]["discount_percent"] = json!("-1");
    bad.push(b);
    let mut b = good.clone();
    b["tiers"][0]["discount_percent"] = json!("10"); // discounts may not decrease
    bad.push(b);
    let mut b = good.clone();
    b["scope"] = json!("model"); // no scope_value
    bad.push(b);
    let mut b = good.clone();
    b["tiers"][0]["up_to"] = json!("10.5"); // fractional token bound
    bad.push(b);
    let mut b = good.clone();
    b["surprise"] = json!(1);
    bad.push(b);
    let mut b = good.clone();
    b["mode"] = json!("stepwise");
    bad.push(b);
    for body in &bad {
        let r = schedule(&app, "acme", body.clone()).await;
        assert_eq!(r.status(), 422, "{body}");
        assert_eq!(
            r.headers()["content-type"].to_str().unwrap(),
            "application/problem+json"
        );
    }
    // only operators publish terms; an unknown tenant is 404
    let r = app
        .http
        .post(app.url("/v1/admin/tenants/acme/tier-schedules"))
        .bearer_auth(&key)
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(schedule(&app, "nobody", good.clone()).await.status(), 404);
    assert_eq!(app.count("select count(*) from tier_schedules").await, 0);
    // once the tenant has events, a version may not start in the past
    app.ingest(ADMIN, &json!([usage("x1", "acme", "gpt-4o", 10, 10)]))
        .await;
    app.wait_count(EVENTS, 1).await;
    let mut past = good.clone();
    past["effective_from"] = json!("2021-01-01T00:00:00Z");
    let r = schedule(&app, "acme", past).await;
    assert_eq!(r.status(), 422);
    let r = schedule(&app, "acme", good).await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let from: chrono::DateTime<chrono::Utc> =
        v["effective_from"].as_str().unwrap().parse().unwrap();
    assert!(
        from > chrono::Utc::now(),
        "a new version takes effect in the future"
    );
    app.stop().await;
}
