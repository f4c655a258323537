//! Budgets, alert facts and pre-authorisation against the real Postgres and NATS.

mod common;

use common::{dec, usage, TestApp, ADMIN};
use rust_decimal::Decimal;
use serde_json::{json, Value};

const EVENTS: &str = "select count(*) from events";

/// A model at 1 / 4 per million (customer 1.2 / 4.8 with the 20% markup spawn() seeds).
async fn seed(app: &TestApp) {
    let r = app
        .admin_post(
            "/v1/admin/prices",
            Some(&json!({"provider": "openai", "model": "b-model", "side": "cost", "currency": "USD",
                "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": "1", "output_per_mtok": "4"})),
        )
        .await;
    assert_eq!(r.status(), 201);
}

async fn budget(app: &TestApp, key: &str, body: Value) -> reqwest::Response {
    app.http
        .post(app.url("/v1/budgets"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn million(id: &str, tags: Value) -> Value {
    let mut e = usage(id, "acme", "b-model", 1_000_000, 0); // 1.2 each
    e["data"]["tags"] = tags;
    e
}

#[tokio::test]
async fn budget_spend_and_threshold_alerts_are_recorded_once_and_replayed() {
    let mut app = TestApp::spawn().await;
    seed(&app).await;
    let key = app.tenant("acme").await;
    let past = "2020-01-01T00:00:00Z";
    let r = budget(
        &app,
        &key,
        json!({"name": "monthly", "scope": "tenant", "period": "month",
        "amount": "10", "action": "alert", "effective_from": past}),
    )
    .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let r = budget(&app, &key, json!({"name": "bot", "scope": "tag", "scope_value": "project=bot",
        "period": "day", "amount": "2", "thresholds": ["100"], "action": "block", "effective_from": past})).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    let mut evs: Vec<Value> = (0..7)
        .map(|i| million(&format!("m{i}"), json!({})))
        .collect();
    evs.push(million("bot1", json!({"project": "bot"})));
    evs.push(million("bot2", json!({"project": "bot"})));
    app.ingest(ADMIN, &json!(evs)).await;
    app.wait_count(EVENTS, 9).await;
    app.drain().await;
    // duplicates change nothing, alerts included
    app.ingest(
        ADMIN,
        &json!([
            million("m1", json!({})),
            million("bot2", json!({"project": "bot"}))
        ]),
    )
    .await;
    app.drain().await;

    let st: Value = app.get(&key, "/v1/budgets").await.json().await.unwrap();
    let rows = st["data"].as_array().unwrap();
    let monthly = rows.iter().find(|b| b["name"] == "monthly").unwrap();
    assert_eq!(dec(&monthly["spent"]), "10.8".parse().unwrap());
    let bot = rows.iter().find(|b| b["name"] == "bot").unwrap();
    assert_eq!(dec(&bot["spent"]), "2.4".parse().unwrap());

    let alerts: Value = app.get(&key, "/v1/alerts").await.json().await.unwrap();
    let mut got: Vec<(String, String)> = alerts["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["type"] == "budget.threshold_crossed")
        .map(|a| {
            (
                a["payload"]["budget"].as_str().unwrap().to_string(),
                a["payload"]["threshold_percent"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    got.sort();
    let want: Vec<(String, String)> = [
        ("bot", "100"),
        ("monthly", "100"),
        ("monthly", "50"),
        ("monthly", "80"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want);
    // both reached their limit: one `budget.exhausted` each (a forecast may come too,
    // depending on how far into the month this runs)
    let mut exhausted: Vec<&str> = alerts["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["type"] == "budget.exhausted")
        .map(|a| a["payload"]["budget"].as_str().unwrap())
        .collect();
    exhausted.sort();
    assert_eq!(exhausted, vec!["bot", "monthly"]);
    let limit = alerts["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["payload"]["budget"] == "bot" && a["type"] == "budget.threshold_crossed")
        .unwrap();
    assert_eq!(limit["payload"]["limit_reached"], true);
    assert_eq!(limit["payload"]["request_id"], "req-bot2");

    // verify replays spend and alerts; rebuild reproduces spend; tampering is caught
    app.rebuild_and_verify().await;
    app.tamper_is_caught(
        "update budget_spend set spent = spent - 1 where budget = 'monthly'",
        "budget_spend",
    )
    .await;
    tokenledger::projections::rebuild::rebuild(&app.owner)
        .await
        .unwrap();
    app.tamper_is_caught(
        "insert into alert_facts (tenant_id, type, unique_key, payload, occurred_at)
         values ('acme', 'budget.threshold_crossed', 'monthly/2020-01/50', '{}', now())",
        "alert_facts",
    )
    .await;

    // versioned CRUD: a change and a retirement are new versions from the future
    let r = budget(
        &app,
        &key,
        json!({"name": "monthly", "scope": "tenant", "period": "month",
        "amount": "20", "action": "alert"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let r = app
        .http
        .delete(app.url("/v1/budgets/bot"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = app
        .get(&key, "/v1/budgets/monthly")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let v: Value = app.get(&key, "/v1/budgets/bot").await.json().await.unwrap();
    assert_eq!(v["data"][0]["active"], false);
    // still in force until the new versions take effect
    let st: Value = app.get(&key, "/v1/budgets").await.json().await.unwrap();
    assert_eq!(st["data"].as_array().unwrap().len(), 2);
    // bad input: a clear error and nothing recorded
    let before = app.count("select count(*) from budgets").await;
    for bad in [
        json!({"name": "x", "scope": "tag", "scope_value": "nokey", "period": "day", "amount": "1", "action": "alert"}),
        json!({"name": "x", "scope": "tenant", "period": "day", "amount": "0", "action": "alert"}),
        json!({"name": "x", "scope": "tenant", "period": "day", "amount": "79228162514264337593543950335", "action": "alert"}),
        json!({"name": "x", "scope": "tenant", "period": "day", "amount": "1", "action": "downgrade"}),
        json!({"name": "x", "scope": "tenant", "period": "year", "amount": "1", "action": "alert"}),
        json!({"name": "x", "scope": "tenant", "period": "day", "amount": "1", "action": "alert", "effective_from": past}),
    ] {
        let r = budget(&app, &key, bad.clone()).await;
        assert_eq!(r.status(), 422, "{bad}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    assert_eq!(app.count("select count(*) from budgets").await, before);
    // another tenant sees none of it
    let other = app.tenant("other").await;
    let v: Value = app.get(&other, "/v1/alerts").await.json().await.unwrap();
    assert!(v["data"].as_array().unwrap().is_empty());
    assert_eq!(app.get(&other, "/v1/budgets/monthly").await.status(), 404);
    app.stop().await;
}

async fn authorize(app: &TestApp, key: &str, body: &Value) -> (u16, Value) {
    let r = app
        .http
        .post(app.url("/v1/authorize"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap())
}

#[tokio::test]
async fn concurrent_authorisations_never_take_a_blocking_budget_past_its_limit() {
    let mut app = TestApp::spawn().await;
    seed(&app).await;
    let key = app.tenant("acme").await;
    let r = budget(
        &app,
        &key,
        json!({"name": "cap", "scope": "tenant", "period": "day",
        "amount": "1", "action": "block", "effective_from": "2020-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    // worst case: 10,000 input at 1.2 + 10,000 output at 4.8 per million = 0.06
    let req = json!({"model": "b-model", "estimated_input_tokens": 10_000, "max_tokens": 10_000});
    let mut tasks = Vec::new();
    for _ in 0..60 {
        let (app_url, key, req, http) = (
            app.url("/v1/authorize"),
            key.clone(),
            req.clone(),
            app.http.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(app_url)
                .bearer_auth(key)
                .json(&req)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }));
    }
    let mut allowed = Vec::new();
    let mut denied = 0;
    for t in tasks {
        let d = t.await.unwrap();
        match d["decision"].as_str().unwrap() {
            "allow" => {
                assert_eq!(dec(&d["estimated_cost"]), "0.06".parse().unwrap());
                assert_eq!(d["provider"], "openai");
                allowed.push(d["authorization_id"].as_str().unwrap().to_string());
            }
            "deny" => {
                assert_eq!(d["denied_by"], "cap");
                denied += 1;
            }
            other => panic!("unexpected decision {other}"),
        }
    }
    // 16 x 0.06 = 0.96 fits; a 17th would make 1.02
    assert_eq!(allowed.len(), 16);
    assert_eq!(denied, 44);
    // decisions and holds are durable records, denials included
    assert_eq!(
        app.count("select count(*) from authorizations where decision = 'deny'")
            .await,
        44
    );
    let held: Decimal = sqlx::query_scalar("select sum(amount) from auth_hold_budgets")
        .fetch_one(&app.owner)
        .await
        .unwrap();
    assert_eq!(held, "0.96".parse().unwrap());

    // usage settles the holds (5,000 + 5,000 tokens = 0.03 each): room opens again
    let evs: Vec<Value> = allowed
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let mut e = usage(&format!("u{i}"), "acme", "b-model", 5_000, 5_000);
            e["data"]["authorization_id"] = json!(a);
            e
        })
        .collect();
    app.ingest(ADMIN, &json!(evs)).await;
    app.wait_count(EVENTS, 16).await;
    app.drain().await;
    assert_eq!(app.count("select count(*) from auth_settlements").await, 16);
    let st: Value = app.get(&key, "/v1/budgets").await.json().await.unwrap();
    assert_eq!(dec(&st["data"][0]["spent"]), "0.48".parse().unwrap());
    assert_eq!(dec(&st["data"][0]["held"]), Decimal::ZERO);
    let mut more = 0;
    for _ in 0..12 {
        let (s, d) = authorize(&app, &key, &req).await;
        assert_eq!(s, 200);
        if d["decision"] == "allow" {
            more += 1;
        }
    }
    assert_eq!(more, 8, "(1 - 0.48) / 0.06 = 8.67");
    let st: Value = app.get(&key, "/v1/budgets").await.json().await.unwrap();
    // the eight open holds, 0.06 each (read from the open-hold index)
    assert_eq!(dec(&st["data"][0]["held"]), "0.48".parse().unwrap());
    let total = dec(&st["data"][0]["spent"]) + dec(&st["data"][0]["held"]);
    assert!(
        total <= Decimal::ONE,
        "spend + holds {total} within the limit"
    );

    // without max_tokens the model's maximum output from the price book is held:
    // 1,000 input at 0.18 + 16,384 output at 0.72 per million
    let (s, d) = authorize(
        &app,
        &key,
        &json!({"model": "gpt-4o-mini", "provider": "openai", "estimated_input_tokens": 1000}),
    )
    .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(dec(&d["estimated_cost"]), "0.01197648".parse().unwrap());

    // bad requests: a clear error, nothing recorded
    let n = app.count("select count(*) from authorizations").await;
    let (s, p) = authorize(
        &app,
        &key,
        &json!({"model": "no-such-model", "estimated_input_tokens": 1, "max_tokens": 1}),
    )
    .await;
    assert_eq!(
        (s, p["code"].as_str()),
        (422, Some("invalid_authorization"))
    );
    let (s, _) = authorize(
        &app,
        &key,
        &json!({"model": "b-model", "estimated_input_tokens": -1, "max_tokens": 1}),
    )
    .await;
    assert_eq!(s, 422);
    let (s, _) = authorize(
        &app,
        &key,
        &json!({"model": "b-model", "estimated_input_tokens": 1}),
    )
    .await;
    assert_eq!(s, 422);
    let (s, _) = authorize(&app, &key, &json!({"model": "b-model", "api_key_id": "k\u{0}", "estimated_input_tokens": 1, "max_tokens": 1})).await;
    assert_eq!(s, 422, "a control character is refused, not a failed batch");
    let (s, _) = authorize(&app, ADMIN, &json!({"tenant_id": "nobody", "model": "b-model", "estimated_input_tokens": 1, "max_tokens": 1})).await;
    assert_eq!(s, 404);
    assert_eq!(app.count("select count(*) from authorizations").await, n);
    app.stop().await;
}
