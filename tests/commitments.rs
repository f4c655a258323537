//! Committed spend: drawdown at the discount, overage past it, the period close billing
//! the commitment and truing up the remainder, late usage, and verify replaying it all.

mod common;

use common::{dec, usage, TestApp, ADMIN};
use rust_decimal::Decimal;
use serde_json::{json, Value};

const EVENTS: &str = "select count(*) from events";
const OCTOBER: &str = "2026-10-10T12:00:00Z";

/// 500,000 input tokens of c-model in October: 0.6 at the customer's price.
fn ev(id: &str, tenant: &str) -> Value {
    let mut e = usage(id, tenant, "c-model", 500_000, 0);
    e["time"] = json!(OCTOBER);
    e
}

async fn balance(app: &TestApp, key: &str, account: &str) -> Decimal {
    let b: Value = app.get(key, "/v1/balances").await.json().await.unwrap();
    b["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["account"] == account)
        .map(|r| dec(&r["balance"]))
        .unwrap_or_default()
}

#[tokio::test]
async fn commitments_draw_down_overage_and_true_up_at_the_close() {
    let mut app = TestApp::spawn().await;
    let r = app
        .admin_post(
            "/v1/admin/prices",
            Some(&json!({"provider": "openai", "model": "c-model", "side": "cost", "currency": "USD",
                "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": "1", "output_per_mtok": "1"})),
        )
        .await;
    assert_eq!(r.status(), 201);
    let acme = app.tenant("acme").await;
    let beta = app.tenant("beta").await;
    let gamma = app.tenant("gamma").await;
    for (t, amount) in [("acme", "1"), ("beta", "5"), ("gamma", "10")] {
        let r = app
            .admin_post(
                &format!("/v1/admin/tenants/{t}/commitments"),
                Some(
                    &json!({"name": "monthly", "amount": amount, "discount_percent": "20",
                    "effective_from": "2020-01-01T00:00:00Z"}),
                ),
            )
            .await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }
    // gamma's commitment ends on October 15th (set before any event, so it may be dated)
    let r = app
        .admin_post(
            "/v1/admin/tenants/gamma/commitments",
            Some(
                &json!({"name": "monthly", "amount": "10", "discount_percent": "20",
                "active": false, "effective_from": "2026-10-15T00:00:00Z"}),
            ),
        )
        .await;
    assert_eq!(r.status(), 201);
    let mut g2 = ev("g2", "gamma");
    g2["time"] = json!("2026-10-20T12:00:00Z");
    app.ingest(
        ADMIN,
        &json!([
            ev("e1", "acme"),
            ev("e2", "acme"),
            ev("e3", "acme"),
            ev("e4", "acme"),
            ev("b1", "beta"),
            ev("g1", "gamma"),
            g2
        ]),
    )
    .await;
    app.wait_count(EVENTS, 7).await;
    app.drain().await;

    // e1, e2: 0.6 each drawn at 20% off (0.48); e3: 0.04 left covers 0.05 of its 0.6,
    // the other 0.55 is overage at the on-demand price; e4: all overage
    let d: Value = app
        .get(&acme, "/v1/requests/req-e1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(dec(&d["price_amount"]), "0.48".parse().unwrap());
    let d: Value = app
        .get(&acme, "/v1/requests/req-e3")
        .await
        .json()
        .await
        .unwrap();
    let c = &d["breakdown"]["commitment"];
    assert_eq!(dec(&c["drawdown"]), "0.04".parse().unwrap(), "{d}");
    assert_eq!(dec(&c["covered"]), "0.05".parse().unwrap());
    assert_eq!(dec(&c["overage"]), "0.55".parse().unwrap());
    assert_eq!(dec(&d["price_amount"]), "0.59".parse().unwrap());
    let d: Value = app
        .get(&acme, "/v1/requests/req-e4")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(dec(&d["price_amount"]), "0.6".parse().unwrap());
    assert_eq!(
        balance(&app, &acme, "commitment:monthly").await,
        Decimal::ONE,
        "drawn so far"
    );

    // close October: the commitment is billed, the unused remainder trued up
    for t in ["acme", "beta", "gamma"] {
        let r = app
            .admin_post(
                &format!("/v1/admin/tenants/{t}/period-close"),
                Some(&json!({"period": "2026-10"})),
            )
            .await;
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    }
    // a second close changes nothing
    app.admin_post(
        "/v1/admin/tenants/acme/period-close",
        Some(&json!({"period": "2026-10"})),
    )
    .await;
    app.wait_count(EVENTS, 10).await;
    app.drain().await;
    assert_eq!(app.count(EVENTS).await, 10);
    // gamma's commitment ended mid-month: what it drew (0.48) is billed, with no true-up;
    // its usage after the end (0.6) was on demand
    assert_eq!(
        balance(&app, &gamma, "receivable").await,
        "1.08".parse().unwrap()
    );
    assert_eq!(
        balance(&app, &gamma, "commitment:monthly").await,
        Decimal::ZERO
    );
    // acme: overage 0.55 + 0.6 billed as used, the commitment 1 at the close
    assert_eq!(
        balance(&app, &acme, "receivable").await,
        "2.15".parse().unwrap()
    );
    assert_eq!(
        balance(&app, &acme, "commitment:monthly").await,
        Decimal::ZERO
    );
    assert_eq!(
        balance(&app, &acme, "revenue").await,
        "-2.15".parse().unwrap()
    );
    // beta drew 0.48 of 5: billed 5, of which 4.52 trued up
    assert_eq!(balance(&app, &beta, "receivable").await, Decimal::from(5));
    assert_eq!(
        balance(&app, &beta, "commitment:monthly").await,
        Decimal::ZERO
    );
    assert_eq!(
        app.count(
            "select count(*) from transfers where kind = 'commitment_true_up' and amount = 4.52"
        )
        .await,
        1
    );

    // late usage of the closed period: on demand, no drawdown
    app.ingest(ADMIN, &json!([ev("late", "beta")])).await;
    app.wait_count(EVENTS, 11).await;
    app.drain().await;
    let d: Value = app
        .get(&beta, "/v1/requests/req-late")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d["breakdown"]["commitment"]["late"], true);
    assert_eq!(dec(&d["price_amount"]), "0.6".parse().unwrap());
    let p: Value = app
        .get(&beta, "/v1/commitments")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(p["data"][0]["closed"], true);
    assert_eq!(dec(&p["data"][0]["drawn"]), "0.48".parse().unwrap());

    // verify replays drawdowns and closes; rebuild reproduces positions; tampering is caught
    app.rebuild_and_verify().await;
    app.tamper_is_caught(
        "update commitment_positions set drawn = drawn + 0.01",
        "commitment_positions",
    )
    .await;

    // system events never come through the ingest API; closes need an ended month
    let sys = json!({"specversion": "1.0", "id": "s1", "source": "x", "type": "tokenledger.system.v1",
        "time": OCTOBER, "data": {"tenant_id": "acme", "kind": "period_close", "period": "2026-09"}});
    assert_eq!(app.post_events(ADMIN, &sys).await.status(), 403);
    let r = app
        .admin_post(
            "/v1/admin/tenants/acme/period-close",
            Some(&json!({"period": "2999-01"})),
        )
        .await;
    assert_eq!(r.status(), 422);
    let r = app
        .admin_post(
            "/v1/admin/tenants/nobody/period-close",
            Some(&json!({"period": "2026-10"})),
        )
        .await;
    assert_eq!(r.status(), 404);
    let r = app
        .admin_post(
            "/v1/admin/tenants/acme/commitments",
            Some(&json!({"name": "x", "amount": "0", "discount_percent": "10"})),
        )
        .await;
    assert_eq!(r.status(), 422);
    app.stop().await;
}

#[tokio::test]
async fn verify_passes_with_tiers_commitments_reservations_and_budgets_on_a_mixed_workload() {
    use rand::{Rng, SeedableRng};
    let mut app = TestApp::spawn().await;
    let key = app.tenant("acme").await;
    app.tenant("beta").await;
    let past = "2020-01-01T00:00:00Z";
    for t in ["acme", "beta"] {
        let r = app
            .admin_post(
                &format!("/v1/admin/tenants/{t}/tier-schedules"),
                Some(&json!({"name": "tok", "mode": "graduated", "metric": "tokens", "scope": "all",
                    "effective_from": past, "tiers": [{"up_to": "200000", "discount_percent": "0"},
                    {"up_to": "600000", "discount_percent": "10"}, {"up_to": null, "discount_percent": "25"}]})),
            )
            .await;
        assert_eq!(r.status(), 201);
        let r = app
            .admin_post(
                &format!("/v1/admin/tenants/{t}/tier-schedules"),
                Some(&json!({"name": "o3", "mode": "volume", "metric": "spend", "scope": "model",
                    "scope_value": "o3", "effective_from": past, "tiers": [{"up_to": "0.5", "discount_percent": "0"},
                    {"up_to": null, "discount_percent": "15"}]})),
            )
            .await;
        assert_eq!(r.status(), 201);
        let r = app
            .admin_post(
                &format!("/v1/admin/tenants/{t}/commitments"),
                Some(
                    &json!({"name": "c", "amount": "1.5", "discount_percent": "10",
                    "overage_rate_percent": "110", "effective_from": past}),
                ),
            )
            .await;
        assert_eq!(r.status(), 201);
        let r = app
            .admin_post(
                &format!("/v1/admin/tenants/{t}/reservations"),
                Some(&json!({"name": "mini", "provider": "openai", "model": "gpt-4o-mini", "units": 2,
                    "tokens_per_minute_per_unit": 20000, "price_per_unit_hour": "0.1", "effective_from": past})),
            )
            .await;
        assert_eq!(r.status(), 201);
        for b in [
            json!({"name": "all", "scope": "tenant", "period": "month", "amount": "2", "action": "alert", "effective_from": past}),
            json!({"name": "bot", "scope": "tag", "scope_value": "project=bot", "period": "day", "amount": "0.5", "action": "block", "effective_from": past}),
        ] {
            let r = app
                .http
                .post(app.url(&format!("/v1/budgets?tenant_id={t}")))
                .bearer_auth(ADMIN)
                .json(&b)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let models = ["gpt-4o", "gpt-4o-mini", "o3", "gpt-5"];
    let mut evs = Vec::new();
    for i in 0..300 {
        let input = rng.gen_range(100..20_000u64);
        let output = rng.gen_range(1..4_000u64);
        let mut e = usage(
            &format!("w{i}"),
            ["acme", "beta"][i % 2],
            models[i % 4],
            input,
            output,
        );
        e["data"]["batch"] = json!(rng.gen_bool(0.2));
        e["data"]["cached_input_tokens"] = json!(rng.gen_range(0..=input / 2));
        if models[i % 4] == "o3" {
            e["data"]["reasoning_tokens"] = json!(rng.gen_range(0..=output));
        }
        if rng.gen_bool(0.3) {
            e["data"]["tags"] = json!({"project": "bot"});
        }
        evs.push(e);
    }
    for chunk in evs.chunks(100) {
        app.ingest(ADMIN, &json!(chunk)).await;
    }
    app.wait_count(EVENTS, 300).await;
    app.drain().await;
    // close last month too (nothing used in it: the full commitment is trued up)
    let last = chrono::Utc::now() - chrono::Duration::days(40);
    let period = last.format("%Y-%m").to_string();
    app.admin_post(
        "/v1/admin/tenants/acme/period-close",
        Some(&json!({"period": period})),
    )
    .await;
    app.wait_count(EVENTS, 301).await;
    app.drain().await;
    assert!(
        app.count("select count(*) from transfers where kind = 'commitment_drawdown'")
            .await
            > 0
    );
    assert!(
        app.count("select count(*) from transfers where kind = 'usage_price'")
            .await
            > 0
    );
    assert!(app.count("select count(*) from alert_facts").await > 0);
    assert!(app.count("select count(*) from reservation_usage").await > 0);
    assert!(
        app.count("select count(*) from transfers where kind = 'reservation_fee'")
            .await
            > 0
    );
    let report = app.verify_ok().await;
    assert_eq!(report.events_rerated, 301);
    let b: Value = app.get(&key, "/v1/balances").await.json().await.unwrap();
    assert!(!b["data"].as_array().unwrap().is_empty());
    app.stop().await;
}
