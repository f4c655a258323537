//! Reserved throughput: tokens within each minute's capacity are covered at no price and
//! count toward no tier, the rest is charged on demand; utilisation per hour; fees accrue
//! at the period close; quotes show the headroom; verify replays it.

mod common;

use common::{dec, usage, TestApp, ADMIN};
use rust_decimal::Decimal;
use serde_json::{json, Value};

const EVENTS: &str = "select count(*) from events";

fn at(id: &str, input: u64, time: &str) -> Value {
    let mut e = usage(id, "acme", "r-model", input, 0);
    e["time"] = json!(time);
    e
}

#[tokio::test]
async fn reservations_cover_tokens_per_minute_and_accrue_fees() {
    let mut app = TestApp::spawn().await;
    let r = app
        .admin_post(
            "/v1/admin/prices",
            Some(&json!({"provider": "openai", "model": "r-model", "side": "cost", "currency": "USD",
                "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": "1", "output_per_mtok": "1"})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let key = app.tenant("acme").await;
    // 2 units x 1,000 tokens per minute, 0.5 per unit-hour, from October 1st
    let r = app
        .admin_post(
            "/v1/admin/tenants/acme/reservations",
            Some(
                &json!({"name": "gpu", "provider": "openai", "model": "r-model", "units": 2,
                "tokens_per_minute_per_unit": 1000, "price_per_unit_hour": "0.5",
                "effective_from": "2026-10-01T00:00:00Z"}),
            ),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = app
        .admin_post(
            "/v1/admin/tenants/acme/tier-schedules",
            Some(&json!({"name": "t", "mode": "graduated", "metric": "tokens", "scope": "all",
                "effective_from": "2020-01-01T00:00:00Z",
                "tiers": [{"up_to": "100000", "discount_percent": "0"}, {"up_to": null, "discount_percent": "10"}]})),
        )
        .await;
    assert_eq!(r.status(), 201);
    app.ingest(
        ADMIN,
        &json!([
            at("e1", 1500, "2026-10-10T12:00:10Z"),
            at("e2", 1000, "2026-10-10T12:00:40Z"),
            at("e3", 800, "2026-10-10T12:01:05Z")
        ]),
    )
    .await;
    app.wait_count(EVENTS, 3).await;
    app.drain().await;
    let d: Value = app
        .get(&key, "/v1/requests/req-e1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(dec(&d["price_amount"]), Decimal::ZERO, "{d}");
    assert!(
        dec(&d["cost_amount"]) > Decimal::ZERO,
        "our cost is still owed"
    );
    // e2: 500 tokens fit in the minute, 500 are charged on demand (1.2 per million)
    let d: Value = app
        .get(&key, "/v1/requests/req-e2")
        .await
        .json()
        .await
        .unwrap();
    let res = &d["breakdown"]["reservation"];
    assert_eq!(res["covered"][0], 500, "{d}");
    assert_eq!(res["used_before"], 1500);
    assert_eq!(dec(&d["price_amount"]), "0.0006".parse().unwrap());
    // covered tokens count toward no tier
    assert_eq!(d["breakdown"]["tier"]["units"], "500");
    assert_eq!(d["breakdown"]["tier"]["units_before"], "0");
    // e2 used up the minute's capacity: recorded once, for the router to re-rank
    assert_eq!(
        app.count("select count(*) from alert_facts where type = 'reservation.exhausted' and unique_key = 'gpu/2026-10-10T12:00'").await,
        1
    );
    // e3: a new minute, covered again
    let d: Value = app
        .get(&key, "/v1/requests/req-e3")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(dec(&d["price_amount"]), Decimal::ZERO);

    let u: Value = app
        .get(
            &key,
            "/v1/reservations/utilisation?from=2026-10-10T00:00:00Z&to=2026-10-11T00:00:00Z",
        )
        .await
        .json()
        .await
        .unwrap();
    let row = &u["data"][0];
    assert_eq!(row["hour"], "2026-10-10T12", "{u}");
    assert_eq!(row["covered_tokens"], 2800);
    assert_eq!(row["active_minutes"], 2);
    assert_eq!(row["capacity_tokens"], 120000);
    assert_eq!(dec(&row["utilisation_percent"]), "2.33".parse().unwrap());

    // the close accrues October's fees: 2 units x 0.5 x 744 hours
    let r = app
        .admin_post(
            "/v1/admin/tenants/acme/period-close",
            Some(&json!({"period": "2026-10"})),
        )
        .await;
    assert_eq!(r.status(), 202);
    app.wait_count(EVENTS, 4).await;
    app.drain().await;
    assert_eq!(
        app.count("select count(*) from transfers where kind = 'reservation_fee' and amount = 744")
            .await,
        1
    );
    let b: Value = app.get(&key, "/v1/balances").await.json().await.unwrap();
    let receivable = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["account"] == "receivable")
        .unwrap();
    assert_eq!(dec(&receivable["balance"]), "744.0006".parse().unwrap());

    // a quote now sees the whole minute's headroom: 1,000 input tokens cost nothing
    let q: Value = app
        .http
        .post(app.url("/v1/quote"))
        .bearer_auth(&key)
        .json(&json!({"candidates": [{"provider": "openai", "model": "r-model"}], "input_tokens": 1000, "output_tokens": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(q["candidates"][0]["reserved_headroom_tokens"], 2000, "{q}");
    assert_eq!(dec(&q["candidates"][0]["effective_price"]), Decimal::ZERO);

    app.rebuild_and_verify().await;
    app.tamper_is_caught(
        "update reservation_usage set covered = covered + 1",
        "reservation_usage",
    )
    .await;
    let r = app
        .admin_post(
            "/v1/admin/tenants/acme/reservations",
            Some(
                &json!({"name": "x", "provider": "openai", "model": "r-model", "units": 0,
                "tokens_per_minute_per_unit": 1000, "price_per_unit_hour": "0.5"}),
            ),
        )
        .await;
    assert_eq!(r.status(), 422);
    app.stop().await;
}

#[tokio::test]
async fn our_provider_reservation_lowers_marginal_cost_by_its_live_headroom() {
    let mut s = common::fresh_settings().await;
    s.clock_skew = std::time::Duration::ZERO; // the reservation takes effect at once
    let mut app = TestApp::start(s).await;
    app.seed_prices().await;
    for (model, rate) in [("p-res", "1"), ("p-plain", "1")] {
        let r = app
            .admin_post(
                "/v1/admin/prices",
                Some(&json!({"provider": "openai", "model": model, "side": "cost", "currency": "USD",
                    "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": rate, "output_per_mtok": rate})),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    let r = app
        .admin_post(
            "/v1/admin/provider-reservations",
            Some(
                &json!({"name": "ptu", "provider": "openai", "model": "p-res", "units": 1,
                "tokens_per_minute_per_unit": 1000000, "price_per_unit_hour": "10"}),
            ),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let key = app.tenant("acme").await;
    let quote = |app: &TestApp, key: String| {
        let (http, url) = (app.http.clone(), app.url("/v1/quote"));
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&json!({"candidates": [{"provider": "openai", "model": "p-plain"},
                    {"provider": "openai", "model": "p-res"}], "input_tokens": 1000, "output_tokens": 0}))
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    // same price for the customer; our reservation makes p-res free to us at the margin
    let q = quote(&app, key.clone()).await;
    assert_eq!(q["candidates"][0]["model"], "p-res", "{q}");
    assert_eq!(dec(&q["candidates"][0]["marginal_cost"]), Decimal::ZERO);
    assert_eq!(
        dec(&q["candidates"][1]["marginal_cost"]),
        "0.001".parse().unwrap()
    );
    let before = q["candidates"][0]["provider_headroom_tokens"]
        .as_u64()
        .unwrap();
    // usage this minute eats the headroom (recorded per minute across tenants)
    app.ingest(ADMIN, &json!([usage("u1", "acme", "p-res", 5000, 0)]))
        .await;
    app.wait_count(EVENTS, 1).await;
    app.drain().await;
    let q = quote(&app, key.clone()).await;
    let after = q["candidates"][0]["provider_headroom_tokens"]
        .as_u64()
        .unwrap();
    // (the minute may have turned between the two quotes: then the headroom is full again)
    assert!(
        after == before - 5000 || after == 1_000_000,
        "{before} -> {after}"
    );
    app.verify_ok().await;
    assert_eq!(
        app.count("select count(*) from provider_usage_minutes")
            .await,
        1
    );
    app.stop().await;
}
