//! Our own terms with providers: a month settles to what our commitment and reservation
//! with the provider say (and a late event to a revision carrying only the change); our
//! commitment's live headroom lowers marginal cost until it is used up, and the published
//! routing decision follows.

mod common;

use std::time::Duration;

use chrono::{Datelike, TimeZone, Utc};
use common::{dec, fresh_settings, kv_until, routing_kv, TestApp, ADMIN};
use rust_decimal::Decimal;
use serde_json::{json, Value};

const EVENTS: &str = "select count(*) from events";
const PAST: &str = "2020-01-01T00:00:00Z";

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// Last month: its `YYYY-MM`, an instant on a day and hour of it, and its hours.
fn last_month() -> (String, chrono::DateTime<Utc>, i64) {
    let now = Utc::now();
    let this = Utc
        .with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0)
        .unwrap();
    let start = (this - chrono::Duration::days(1))
        .with_day(1)
        .unwrap()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    (
        start.format("%Y-%m").to_string(),
        start,
        (this - start).num_hours(),
    )
}

fn event(
    id: &str,
    tenant: &str,
    provider: &str,
    model: &str,
    at: chrono::DateTime<Utc>,
    input: u64,
    output: u64,
) -> Value {
    json!({
        "specversion": "1.0", "id": id, "source": "test", "type": "tokenledger.usage.v1",
        "time": at.to_rfc3339(),
        "data": {"tenant_id": tenant, "request_id": format!("req-{id}"), "model": model,
                 "provider": provider, "input_tokens": input, "output_tokens": output,
                 "status": "ok", "latency_ms": 120}
    })
}

async fn price(app: &TestApp, provider: &str, model: &str, side: &str, rate: &str) {
    let r = app
        .admin_post(
            "/v1/admin/prices",
            Some(
                &json!({"provider": provider, "model": model, "side": side, "currency": "USD",
                "effective_from": PAST, "input_per_mtok": rate, "output_per_mtok": rate}),
            ),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

/// What we owe a provider across every holder (tenants' usage and the operator's
/// settlements), as a positive amount.
async fn owed(app: &TestApp, provider: &str) -> Decimal {
    let b: Decimal = sqlx::query_scalar(
        "select coalesce(sum(balance), 0) from account_balances where account = $1",
    )
    .bind(format!("payable:{provider}"))
    .fetch_one(&app.owner)
    .await
    .unwrap();
    -b
}

async fn settle(app: &TestApp, period: &str) -> Vec<Value> {
    let r = app
        .admin_post(
            "/v1/admin/provider-settlements",
            Some(&json!({"period": period})),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    r.json::<Value>().await.unwrap()["data"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_month_settles_to_what_our_provider_commitment_and_reservation_say() {
    let mut app = TestApp::spawn().await;
    // pa: 1 per million tokens; pb: 2
    price(&app, "openai", "pa", "cost", "1").await;
    price(&app, "openai", "pb", "cost", "2").await;
    app.tenant("acme").await;
    app.tenant("beta").await;
    let (period, start, hours) = last_month();
    // our commitment: 0.05 a month at 20% off (absorbs 0.0625 of list), overage 10% off;
    // nothing is settled yet, so it may start in the past
    let r = app
        .admin_post(
            "/v1/admin/provider-commitments",
            Some(&json!({"name": "oa", "provider": "openai", "amount": "0.05",
                "discount_percent": "20", "overage_discount_percent": "10", "effective_from": PAST})),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // bad input is refused and leaves nothing
    for bad in [
        json!({"name": "x", "provider": "openai", "amount": "1", "discount_percent": "100"}),
        json!({"name": "x", "provider": "openai", "amount": "-1", "discount_percent": "0"}),
        json!({"name": "x", "provider": "openai", "amount": "1", "discount_percent": "0", "currency": "usd"}),
        json!({"name": "x", "provider": "openai", "amount": "1", "discount_percent": "0", "extra": 1}),
    ] {
        let r = app
            .admin_post("/v1/admin/provider-commitments", Some(&bad))
            .await;
        assert!([400, 422].contains(&r.status().as_u16()), "{bad}");
        let body: Value = r.json().await.unwrap();
        assert!(body["detail"].is_string(), "{body}");
    }
    assert_eq!(
        app.count("select count(*) from provider_commitments").await,
        1
    );
    // our reservation for pb since before last month: 1,000 tokens a minute at 0.001 an
    // hour (a backfilled term: the API only takes future ones)
    sqlx::query(
        "insert into provider_reservations (name, effective_from, provider, model, units,
           tokens_per_minute_per_unit, price_per_unit_hour, currency)
         values ('ptu', $1, 'openai', 'pb', 1, 1000, 0.001, 'USD')",
    )
    .bind(start - chrono::Duration::days(40))
    .execute(&app.owner)
    .await
    .unwrap();
    let at =
        |day: i64, hour: i64| start + chrono::Duration::days(day) + chrono::Duration::hours(hour);
    app.ingest(
        ADMIN,
        &json!([
            // pa: 0.02 + 0.025 of list
            event("a1", "acme", "openai", "pa", at(9, 12), 10_000, 10_000),
            event("b1", "beta", "openai", "pa", at(9, 12), 20_000, 5_000),
            // pb: 2,000 tokens in a minute of 1,000 capacity: half of its 0.004 covered
            event("a2", "acme", "openai", "pb", at(10, 13), 1_500, 500),
            // pb: 500 tokens, all covered (0.001)
            event("b2", "beta", "openai", "pb", at(11, 9), 400, 100),
        ]),
    )
    .await;
    app.wait_count(EVENTS, 4).await;
    app.drain().await;
    // at list, we owe openai 0.05 for these
    assert_eq!(owed(&app, "openai").await, d("0.05"));
    // a month that has not ended cannot be settled
    let r = app
        .admin_post(
            "/v1/admin/provider-settlements",
            Some(&json!({"period": Utc::now().format("%Y-%m").to_string()})),
        )
        .await;
    assert_eq!(r.status(), 422);

    let s = settle(&app, &period).await;
    assert_eq!(s.len(), 1, "{s:?}");
    let s = &s[0];
    assert_eq!(
        (s["provider"].as_str(), s["revision"].as_i64()),
        (Some("openai"), Some(1))
    );
    let models = s["inputs"]["models"].as_array().unwrap();
    assert_eq!(dec(&models[0]["list_cost"]), d("0.045"));
    assert_eq!(dec(&models[1]["list_cost"]), d("0.005"));
    assert_eq!(dec(&models[1]["covered_cost"]), d("0.003"));
    assert_eq!(models[1]["covered_tokens"], 1_500);
    let f = &s["figures"];
    let fee = d("0.001") * Decimal::from(hours);
    assert_eq!(dec(&f["reservation_fees"]), fee);
    assert_eq!(dec(&f["reservation_credit"]), d("0.003"));
    // billable 0.047 drawn at 20% off: 0.0376 drawn, 0.0094 discount, 0.0124 trued up
    let c = &f["commitments"][0];
    assert_eq!(dec(&c["absorbed_list"]), d("0.047"));
    assert_eq!(dec(&c["drawdown"]), d("0.0376"));
    assert_eq!(dec(&c["discount"]), d("0.0094"));
    assert_eq!(dec(&c["true_up"]), d("0.0124"));
    // the provider bills the commitment plus the reservation's fees: so do we now owe
    assert_eq!(dec(&f["net_cost"]), d("0.05") + fee);
    assert_eq!(owed(&app, "openai").await, d("0.05") + fee);
    // the operator holds the entries; no tenant's balances moved
    assert_eq!(
        app.count("select count(*) from transfers where tenant_id = '_operator'")
            .await,
        4
    );
    // settling again changes nothing
    assert!(settle(&app, &period).await.is_empty());
    // a commitment version can no longer start in the settled month
    let r = app
        .admin_post(
            "/v1/admin/provider-commitments",
            Some(&json!({"name": "oa", "provider": "openai", "amount": "1",
                "discount_percent": "20", "effective_from": at(20, 0).to_rfc3339()})),
        )
        .await;
    assert_eq!(r.status(), 422);

    // a late event of the month (0.1 of list) takes it past the commitment: revision 2
    app.ingest(
        ADMIN,
        &json!([event("a3", "acme", "openai", "pa", at(15, 0), 100_000, 0)]),
    )
    .await;
    app.wait_count(EVENTS, 5).await;
    app.drain().await;
    let s = settle(&app, &period).await;
    assert_eq!(s.len(), 1);
    assert_eq!(s[0]["revision"], 2);
    let c = &s[0]["figures"]["commitments"][0];
    // 0.147 billable: 0.0625 absorbed (0.05 drawn, 0.0125 discount), 0.0845 overage with
    // 0.00845 off, nothing trued up
    assert_eq!(dec(&c["drawdown"]), d("0.05"));
    assert_eq!(dec(&c["discount"]), d("0.0125"));
    assert_eq!(dec(&c["overage_list"]), d("0.0845"));
    assert_eq!(dec(&c["overage_credit"]), d("0.00845"));
    assert_eq!(dec(&c["true_up"]), Decimal::ZERO);
    let moved = &s[0]["moved"];
    assert_eq!(dec(&moved["provider_commitment_true_up"]), d("-0.0124"));
    assert_eq!(
        dec(&moved["provider_commitment_discount"]),
        d("0.0125") + d("0.00845") - d("0.0094")
    );
    assert!(moved.get("provider_reservation_fee").is_none());
    let net = d("0.05") + d("0.0845") * d("0.9") + fee;
    assert_eq!(dec(&s[0]["figures"]["net_cost"]), net);
    assert_eq!(owed(&app, "openai").await, net);
    let all: Value = app
        .get(
            ADMIN,
            &format!("/v1/admin/provider-settlements?period={period}"),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(all["data"].as_array().unwrap().len(), 2);
    // tenants cannot read the operator's settlements
    let key = app.tenant("gamma").await;
    assert_eq!(
        app.get(&key, "/v1/admin/provider-settlements")
            .await
            .status(),
        403
    );
    app.rebuild_and_verify().await;
    // a settlement transfer the figures do not account for is caught
    app.tamper_is_caught(
        "insert into transfers (tenant_id, seq, leg, kind, debit_account, credit_account, amount, currency)
         select '_operator', max(id), 9, 'provider_commitment_true_up', 'cogs', 'payable:openai', 1, 'USD'
         from provider_settlements",
        "provider_commitment_true_up transfers sum",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn our_provider_commitment_lowers_marginal_cost_until_used_up() {
    let mut s = fresh_settings().await;
    s.roles = vec!["api".into(), "writer".into(), "pricing".into()];
    s.clock_skew = Duration::ZERO;
    let mut app = TestApp::start(s.clone()).await;
    // the same customer price; k-a costs us a little more than k-b at list
    price(&app, "openai", "k-a", "cost", "1.1").await;
    price(&app, "other", "k-b", "cost", "1").await;
    price(&app, "openai", "k-a", "price", "2").await;
    price(&app, "other", "k-b", "price", "2").await;
    let r = app
        .admin_post(
            "/v1/admin/routing-classes",
            Some(
                &json!({"name": "test:pair", "quality_floor": "0.5", "candidates": [
                {"provider": "openai", "model": "k-a", "quality": "0.8"},
                {"provider": "other", "model": "k-b", "quality": "0.8"}]}),
            ),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    // 1.5 a month with openai (more than the decision's reference mix costs), no
    // discount, no overage discount
    let r = app
        .admin_post(
            "/v1/admin/provider-commitments",
            Some(&json!({"name": "oa", "provider": "openai", "amount": "1.5",
                "discount_percent": "0", "effective_from": PAST})),
        )
        .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let key = app.tenant("acme").await;
    let mix = json!({"candidates": [{"provider": "openai", "model": "k-a"}, {"provider": "other", "model": "k-b"}],
        "input_tokens": 1000, "output_tokens": 0});
    let quote = || {
        let (http, url, key, mix) = (
            app.http.clone(),
            app.url("/v1/quote"),
            key.clone(),
            mix.clone(),
        );
        async move {
            http.post(url)
                .bearer_auth(key)
                .json(&mix)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    // within the commitment k-a costs us nothing more: it ranks first on the tie (once
    // the engine's cached book has the new terms)
    let mut q = quote().await;
    for _ in 0..100 {
        if q["candidates"][0]["provider_commitment_headroom"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        q = quote().await;
    }
    assert_eq!(q["candidates"][0]["model"], "k-a", "{q}");
    assert_eq!(dec(&q["candidates"][0]["marginal_cost"]), Decimal::ZERO);
    assert_eq!(
        dec(&q["candidates"][0]["provider_commitment_headroom"]),
        d("1.5")
    );
    assert_eq!(dec(&q["candidates"][1]["marginal_cost"]), d("0.001"));
    let kv = routing_kv(&s).await;
    let k = "acme.test=3Apair";
    let first = |v: &Value| {
        v["candidates"][0]["model"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let last = kv_until(&kv, k, |v| first(v) == "k-a").await;
    assert_eq!(first(&last), "k-a", "{last}");
    // usage this month uses the commitment up (1.65 of list)
    let now = Utc::now();
    app.ingest(
        ADMIN,
        &json!([event("u1", "acme", "openai", "k-a", now, 1_500_000, 0)]),
    )
    .await;
    app.wait_count(EVENTS, 1).await;
    app.drain().await;
    let q = quote().await;
    assert_eq!(q["candidates"][0]["model"], "k-b", "{q}");
    assert_eq!(dec(&q["candidates"][1]["marginal_cost"]), d("0.0011"));
    assert_eq!(
        dec(&q["candidates"][1]["provider_commitment_headroom"]),
        Decimal::ZERO
    );
    // and the published decision follows, triggered by the commitment running out
    let last = kv_until(&kv, k, |v| v["trigger"] == "provider_commitment_exhausted").await;
    assert_eq!(last["trigger"], "provider_commitment_exhausted", "{last}");
    assert_eq!(first(&last), "k-b", "{last}");
    app.rebuild_and_verify().await;
    app.stop().await;
}
