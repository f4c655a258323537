//! Monthly invoices: a month with mixed usage, tiers, a commitment with true-up and a
//! reservation closes to invoices equal to the ledger; closing twice changes nothing; late
//! usage lands as a late line next month; finalised invoices cannot be modified; JPY
//! rounding; notes; documents; and reconciliation against a provider export with injected
//! discrepancies of every kind.

mod common;

use common::{dec, usage, TestApp, ADMIN};
use rust_decimal::Decimal;
use serde_json::{json, Value};

const EVENTS: &str = "select count(*) from events";

fn d(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn at(mut e: Value, time: &str) -> Value {
    e["time"] = json!(time);
    e
}

async fn created(r: reqwest::Response) -> Value {
    let status = r.status();
    let body = r.text().await.unwrap();
    assert!(status.is_success(), "{status}: {body}");
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

async fn receivable(app: &TestApp, key: &str) -> Decimal {
    let b: Value = app.get(key, "/v1/balances").await.json().await.unwrap();
    b["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["account"] == "receivable")
        .map(|r| dec(&r["balance"]))
        .unwrap_or_default()
}

async fn invoice_of(app: &TestApp, key: &str, period: &str) -> Value {
    let r = app
        .get(key, &format!("/v1/invoices/draft?period={period}"))
        .await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn kinds(inv: &Value) -> Vec<String> {
    inv["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["kind"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_month_closes_to_immutable_invoices_equal_to_the_ledger() {
    let mut app = TestApp::spawn().await;
    // c-model: cost 1 per million tokens (20% markup: 1.2), half price in batch
    created(
        app.admin_post(
            "/v1/admin/prices",
            Some(&json!({"provider": "openai", "model": "c-model", "side": "cost", "currency": "USD",
                "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": "1", "output_per_mtok": "1",
                "cached_input_per_mtok": "0.5", "batch_discount": "0.5"})),
        )
        .await,
    )
    .await;
    // y-model in JPY: cost 80, explicit customer price 100 per million tokens
    for (side, rate) in [("cost", "80"), ("price", "100")] {
        created(
            app.admin_post(
                "/v1/admin/prices",
                Some(&json!({"provider": "openai", "model": "y-model", "side": side, "currency": "JPY",
                    "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": rate, "output_per_mtok": rate})),
            )
            .await,
        )
        .await;
    }
    let acme = app.tenant("acme").await;
    let beta = app.tenant("beta").await;
    let gamma = app.tenant("gamma").await;
    // gamma's commitment ends on October 15th, before it drew anything
    for body in [
        json!({"name": "monthly", "amount": "5", "discount_percent": "20",
            "effective_from": "2020-01-01T00:00:00Z"}),
        json!({"name": "monthly", "amount": "5", "discount_percent": "20", "active": false,
            "effective_from": "2026-10-15T00:00:00Z"}),
    ] {
        created(
            app.admin_post("/v1/admin/tenants/gamma/commitments", Some(&body))
                .await,
        )
        .await;
    }
    created(
        app.admin_post(
            "/v1/admin/tenants",
            Some(&json!({"id": "yen", "name": "yen", "currency": "JPY"})),
        )
        .await,
    )
    .await;
    let yen: Value = created(
        app.admin_post(
            "/v1/admin/tenants/yen/api-keys",
            Some(&json!({"name": "t"})),
        )
        .await,
    )
    .await;
    let yen = yen["secret"].as_str().unwrap().to_string();
    // acme's terms, dated back before any of its events
    for (path, body) in [
        (
            "commitments",
            json!({"name": "monthly", "amount": "5", "discount_percent": "20",
            "effective_from": "2020-01-01T00:00:00Z"}),
        ),
        (
            "tier-schedules",
            json!({"name": "spend", "mode": "graduated", "metric": "spend", "scope": "all",
            "effective_from": "2020-01-01T00:00:00Z",
            "tiers": [{"up_to": "0.5", "discount_percent": "0"}, {"up_to": null, "discount_percent": "10"}]}),
        ),
        (
            "reservations",
            json!({"name": "ptu", "provider": "openai", "model": "c-model", "units": 1,
            "tokens_per_minute_per_unit": 1000, "price_per_unit_hour": "0.01",
            "effective_from": "2026-10-01T00:00:00Z"}),
        ),
    ] {
        created(
            app.admin_post(&format!("/v1/admin/tenants/acme/{path}"), Some(&body))
                .await,
        )
        .await;
    }
    let mut batch = at(
        usage("a2", "acme", "c-model", 500_000, 100_000),
        "2026-10-05T11:00:00Z",
    );
    batch["data"]["batch"] = json!(true);
    let mut cached = at(
        usage("a3", "acme", "c-model", 400_000, 0),
        "2026-10-06T12:00:00Z",
    );
    cached["data"]["cached_input_tokens"] = json!(100_000);
    let adjustment = json!({"specversion": "1.0", "id": "adj-1", "source": "ops", "type": "tokenledger.adjustment.v1",
        "time": "2026-10-20T00:00:00Z",
        "data": {"tenant_id": "acme", "direction": "credit", "amount": "0.25", "currency": "USD", "reason": "goodwill"}});
    app.ingest(
        ADMIN,
        &json!([
            at(
                usage("a1", "acme", "c-model", 500_000, 0),
                "2026-10-04T10:00:00Z"
            ),
            batch,
            cached,
            at(
                usage("a4", "acme", "c-model", 2_000_000, 0),
                "2026-10-07T10:00:00Z"
            ),
            adjustment,
            at(
                usage("b1", "beta", "c-model", 1_234_567, 7_654),
                "2026-10-08T10:00:00Z"
            ),
            // JPY: 25,000 tokens at 100/M = 2.5 yen, 35,000 = 3.5 yen: exact midpoints
            at(
                usage("y1", "yen", "y-model", 25_000, 35_000),
                "2026-10-09T10:00:00Z"
            ),
            at(
                usage("g1", "gamma", "c-model", 100_000, 0),
                "2026-10-16T10:00:00Z"
            ),
        ]),
    )
    .await;
    app.wait_count(EVENTS, 8).await;
    app.drain().await;

    // the live draft, from the projection
    let draft = invoice_of(&app, &acme, "2026-10").await;
    assert_eq!(draft["status"], "draft");
    assert!(draft["number"].is_null());
    let k = kinds(&draft);
    for want in [
        "usage",
        "batch_discount",
        "reservation_covered",
        "tier_discount",
        "commitment_covered",
        "commitment_drawdown",
        "adjustment",
    ] {
        assert!(k.contains(&want.to_string()), "{want} in {k:?}");
    }

    // close October for every tenant
    let r = created(
        app.admin_post(
            "/v1/admin/invoices/close",
            Some(&json!({"period": "2026-10"})),
        )
        .await,
    )
    .await;
    assert_eq!(r["published"].as_array().unwrap().len(), 4, "{r}");
    app.wait_count("select count(*) from invoices where period = '2026-10'", 4)
        .await;
    app.drain().await;

    let inv = invoice_of(&app, &acme, "2026-10").await;
    assert_eq!(inv["status"], "finalized");
    let number = inv["number"].as_str().unwrap().to_string();
    assert!(number.starts_with("INV-"));
    let k = kinds(&inv);
    assert!(k.contains(&"commitment_true_up".to_string()), "{k:?}");
    assert!(k.contains(&"reservation_fee".to_string()), "{k:?}");
    // the total is the sum of the rounded lines; the exact total is what the ledger moved
    // into the receivable; the residue is what rounding each line once left
    let lines = inv["lines"].as_array().unwrap();
    let rounded: Decimal = lines.iter().map(|l| dec(&l["amount"])).sum();
    assert_eq!(dec(&inv["total"]), rounded);
    assert_eq!(dec(&inv["total_exact"]), receivable(&app, &acme).await);
    assert_eq!(
        dec(&inv["rounding_residue"]),
        dec(&inv["total"]) - dec(&inv["total_exact"])
    );
    assert!(dec(&inv["rounding_residue"]).abs() <= Decimal::new(5, 3) * Decimal::from(lines.len()));
    for l in lines {
        assert_eq!(
            dec(&l["amount"]),
            dec(&l["amount_exact"])
                .round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointNearestEven)
        );
    }
    // the fee: 744 hours of October x 1 unit x 0.01
    let fee = lines
        .iter()
        .find(|l| l["kind"] == "reservation_fee")
        .unwrap();
    assert_eq!(dec(&fee["amount"]), d("7.44"));
    let b = invoice_of(&app, &beta, "2026-10").await;
    assert_eq!(dec(&b["total_exact"]), receivable(&app, &beta).await);
    // JPY: zero decimals, halves to even: 2.5 -> 2, 3.5 -> 4
    let y = invoice_of(&app, &yen, "2026-10").await;
    let amounts: Vec<Decimal> = y["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| dec(&l["amount"]))
        .collect();
    assert_eq!(amounts, vec![d("2"), d("4")], "{y}");
    assert_eq!(dec(&y["total"]), d("6"));
    assert_eq!(dec(&y["total_exact"]), d("6"));

    // closing again changes nothing
    let r = created(
        app.admin_post(
            "/v1/admin/invoices/close",
            Some(&json!({"period": "2026-10"})),
        )
        .await,
    )
    .await;
    assert_eq!(r["published"], json!([]));
    app.admin_post(
        "/v1/admin/tenants/acme/period-close",
        Some(&json!({"period": "2026-10"})),
    )
    .await;
    app.drain().await;
    assert_eq!(app.count("select count(*) from invoices").await, 4);
    assert_eq!(app.count(EVENTS).await, 12);

    // a finalised invoice cannot be changed, not even by the owner
    for sql in [
        "update invoices set total = 0",
        "delete from invoices",
        "truncate invoices cascade",
    ] {
        let e = sqlx::query(sql).execute(&app.owner).await.unwrap_err();
        assert!(e.to_string().contains("append-only"), "{sql}: {e}");
    }

    // late usage for October: billed on November's invoice, marked with its month
    app.ingest(
        ADMIN,
        &json!([at(
            usage("late", "acme", "c-model", 100_000, 0),
            "2026-10-30T10:00:00Z"
        )]),
    )
    .await;
    app.wait_count(EVENTS, 13).await;
    app.drain().await;
    let again = invoice_of(&app, &acme, "2026-10").await;
    assert_eq!(again, inv, "the closed invoice did not change");
    let nov = invoice_of(&app, &acme, "2026-11").await;
    let late: Vec<&Value> = nov["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["late_from"] == "2026-10")
        .collect();
    assert!(!late.is_empty(), "{nov}");
    assert!(late[0]["description"]
        .as_str()
        .unwrap()
        .starts_with("Late usage from 2026-10"));
    // on demand (the commitment's period is closed): the lines carry what it was charged
    let late_total: Decimal = late.iter().map(|l| dec(&l["amount_exact"])).sum();
    let req: Value = app
        .get(&acme, "/v1/requests/req-late")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(req["breakdown"]["commitment"]["late"], true, "{req}");
    assert_eq!(late_total, dec(&req["price_amount"]));

    // a credit note: its own document, settled on the next open invoice
    let note = created(
        app.admin_post(
            &format!("/v1/admin/invoices/{number}/notes"),
            Some(&json!({"kind": "credit", "amount": "1.00", "reason": "outage credit"})),
        )
        .await,
    )
    .await;
    assert!(note["number"].as_str().unwrap().starts_with("CN-"));
    let r = app
        .admin_post(
            &format!("/v1/admin/invoices/{number}/notes"),
            Some(&json!({"kind": "credit", "amount": "0.001", "reason": "too precise"})),
        )
        .await;
    assert_eq!(r.status(), 422);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    app.wait_count(EVENTS, 14).await;
    app.drain().await;
    // the note's adjustment is dated when the note was made: on that month's invoice
    // (November's while this was written; the month the suite runs in, in general)
    let noted = tokenledger::pricing::tiers::period_of(chrono::Utc::now());
    let current = invoice_of(&app, &acme, &noted).await;
    let adj = current["lines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["kind"] == "adjustment")
        .unwrap();
    assert_eq!(dec(&adj["amount"]), d("-1"));
    assert!(adj["description"].as_str().unwrap().contains(&number));
    assert_eq!(invoice_of(&app, &acme, "2026-10").await, inv);
    let notes: Value = app
        .get(&acme, &format!("/v1/invoices/{number}/notes"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(notes["data"].as_array().unwrap().len(), 1);

    // documents: JSON, CSV (one row per line), HTML; tenant-scoped
    let j: Value = app
        .get(&acme, &format!("/v1/invoices/{number}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(j, inv);
    let csv = app
        .get(&acme, &format!("/v1/invoices/{number}?format=csv"))
        .await;
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    assert_eq!(csv.lines().count(), lines.len() + 1);
    assert!(csv.starts_with("invoice_number,"));
    let html = app
        .get(&acme, &format!("/v1/invoices/{number}?format=html"))
        .await
        .text()
        .await
        .unwrap();
    assert!(html.contains(&format!("Invoice {number}")));
    assert_eq!(
        app.get(&beta, &format!("/v1/invoices/{number}"))
            .await
            .status(),
        404
    );
    let list: Value = app.get(&acme, "/v1/invoices").await.json().await.unwrap();
    let statuses: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    // November's draft (the late line) and the note's month's, if that is a later one
    let mut expected = vec!["draft", "finalized"];
    if noted.as_str() > "2026-11" {
        expected.insert(0, "draft");
    }
    assert_eq!(statuses, expected, "{list}");
    // the webhook outbox has the finalisation
    assert_eq!(
        app.count("select count(*) from alert_facts where type = 'invoice.finalized'")
            .await,
        4
    );
    // late usage from while gamma's commitment was in force (it drew nothing, so the close
    // recorded no position for it): the month is closed, so it is on demand, not a drawdown
    // no close would ever bill
    app.ingest(
        ADMIN,
        &json!([at(
            usage("g-late", "gamma", "c-model", 100_000, 0),
            "2026-10-05T10:00:00Z"
        )]),
    )
    .await;
    app.wait_count(EVENTS, 15).await;
    app.drain().await;
    let req: Value = app
        .get(&gamma, "/v1/requests/req-g-late")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(req["breakdown"]["commitment"]["late"], true, "{req}");
    assert_eq!(
        dec(&req["breakdown"]["commitment"]["drawdown"]),
        Decimal::ZERO
    );
    // ids of the service's own events are refused to anyone else
    for id in [
        "period-close:2026-11",
        "evaluation-tick:2026-11-01T00",
        "invoice-note:x",
    ] {
        let r = app
            .post_events(&acme, &json!([usage(id, "acme", "c-model", 1, 1)]))
            .await;
        assert!(
            r.status() == 400 || r.status() == 403 || r.status() == 422,
            "{id}: {}",
            r.status()
        );
    }
    // an unfinished month cannot be closed
    let r = app
        .admin_post(
            "/v1/admin/invoices/close",
            Some(&json!({"period": "2099-01"})),
        )
        .await;
    assert_eq!(r.status(), 422);

    // internal reconciliation: no differences
    let run = created(
        app.admin_post(
            "/v1/admin/reconciliations",
            Some(&json!({"kind": "internal", "period": "2026-10"})),
        )
        .await,
    )
    .await;
    assert_eq!(run["summary"]["findings"], 0, "{run}");
    assert_eq!(run["findings"], json!([]));

    app.rebuild_and_verify().await;
    // tampering with the projection is caught
    app.tamper_is_caught(
        &format!("update invoice_accruals set amount = amount + 0.01 where tenant_id = 'acme' and period = '{noted}' and kind = 'adjustment'"),
        "invoice_accruals",
    )
    .await;
    app.stop().await;
}

fn with_id(e: Value, id: &str) -> Value {
    let mut e = e;
    e["data"]["provider_request_id"] = json!(id);
    e
}

#[tokio::test]
async fn reconciliation_finds_exactly_the_injected_discrepancies() {
    let mut app = TestApp::spawn().await;
    created(
        app.admin_post(
            "/v1/admin/prices",
            Some(&json!({"provider": "openai", "model": "c-model", "side": "cost", "currency": "USD",
                "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": "1", "output_per_mtok": "2"})),
        )
        .await,
    )
    .await;
    app.tenant("acme").await;
    app.tenant("beta").await;
    // per request: 1,000 in + 500 out costs 0.002
    let t = "2026-10-03T10:00:00Z";
    let mut evs = vec![];
    for (i, tenant) in [
        (1, "acme"),
        (2, "acme"),
        (3, "beta"),
        (4, "beta"),
        (5, "acme"),
    ] {
        evs.push(with_id(
            at(usage(&format!("r{i}"), tenant, "c-model", 1000, 500), t),
            &format!("gen-{i}"),
        ));
    }
    // by day and model, without provider ids
    for (id, day, input) in [
        ("d1", "2026-10-11", 1000),
        ("d2", "2026-10-12", 1000),
        ("d3", "2026-10-13", 1000),
        ("d5", "2026-10-15", 1000),
    ] {
        evs.push(at(
            usage(id, "acme", "c-model", input, 500),
            &format!("{day}T08:00:00Z"),
        ));
    }
    app.ingest(ADMIN, &json!(evs)).await;
    app.wait_count(EVENTS, 9).await;
    app.drain().await;

    // OpenRouter-style per-request export: gen-1, gen-3, gen-5 agree; gen-2 billed 700
    // output tokens (token mismatch); gen-4 billed 0.004 for the same tokens (our price
    // book is out of date); gen-9 is not ours; and a day x model section
    let csv = "id,created_at,model,native_tokens_prompt,native_tokens_cached,native_tokens_completion,total_cost\n\
        gen-1,2026-10-03T10:00:01Z,c-model,1000,0,500,0.002\n\
        gen-2,2026-10-03T10:00:01Z,c-model,1000,0,700,0.0024\n\
        gen-3,2026-10-03T10:00:01Z,c-model,1000,0,500,0.002\n\
        gen-4,2026-10-03T10:00:01Z,c-model,1000,0,500,0.004\n\
        gen-5,2026-10-03T10:00:01Z,c-model,1000,0,500,0.002\n\
        gen-9,2026-10-03T10:00:01Z,c-model,1000,0,500,0.002\n\
        ,2026-10-11T00:00:00Z,c-model,1000,0,500,0.002\n\
        ,2026-10-12T00:00:00Z,c-model,1200,0,500,0.0022\n\
        ,2026-10-13T00:00:00Z,c-model,1000,0,500,0.003\n\
        ,2026-10-14T00:00:00Z,c-model,1000,0,500,0.002\n";
    let r = app
        .http
        .post(app.url(
            "/v1/admin/provider-exports?provider=openai&period=2026-10&format=openrouter-generations",
        ))
        .bearer_auth(ADMIN)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    let imported = created(r).await;
    assert_eq!(imported["rows"], 10);
    let run = created(
        app.admin_post(
            "/v1/admin/reconciliations",
            Some(&json!({"kind": "provider", "export_id": imported["export_id"]})),
        )
        .await,
    )
    .await;
    let mut found: Vec<(String, String)> = run["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_string(),
                f["provider_request_id"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| f["day"].as_str().unwrap().to_string()),
            )
        })
        .collect();
    found.sort();
    let mut want: Vec<(String, String)> = [
        ("billed_not_in_ledger", "gen-9"),
        ("billed_not_in_ledger", "2026-10-14"),
        ("in_ledger_not_billed", "2026-10-15"),
        ("token_mismatch", "gen-2"),
        ("token_mismatch", "2026-10-12"),
        ("unit_price_mismatch", "gen-4"),
        ("unit_price_mismatch", "2026-10-13"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    want.sort();
    assert_eq!(found, want, "{run}");
    let price = run["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["provider_request_id"] == "gen-4")
        .unwrap();
    assert_eq!(dec(&price["amount_at_stake"]), d("0.002"));
    assert_eq!(price["tenant_id"], "beta");
    assert_eq!(price["detail"]["price_book_entries"][0]["model"], "c-model");
    assert_eq!(run["summary"]["by_kind"]["unit_price_mismatch"]["count"], 2);
    assert_eq!(run["summary"]["matched_by_request_id"], 5);

    // tolerances: 20% on tokens absorbs the 200-token difference of 2026-10-12's input,
    // not gen-2's 40% on output
    let run = created(
        app.admin_post(
            "/v1/admin/reconciliations",
            Some(
                &json!({"kind": "provider", "export_id": imported["export_id"],
                "tolerances": {"tokens_percent": "20"}}),
            ),
        )
        .await,
    )
    .await;
    let tm: Vec<&Value> = run["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "token_mismatch")
        .collect();
    assert_eq!(tm.len(), 1, "{run}");
    assert_eq!(tm[0]["provider_request_id"], "gen-2");
    let list: Value = app
        .get(ADMIN, "/v1/admin/reconciliations")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 2);

    // a broken export is refused whole, with the line
    let r = app
        .http
        .post(app.url(
            "/v1/admin/provider-exports?provider=openai&period=2026-10&format=openrouter-generations",
        ))
        .bearer_auth(ADMIN)
        .body("id,created_at,model,native_tokens_prompt,native_tokens_cached,native_tokens_completion,total_cost\ngen-1,yesterday,c-model,1,0,1,0.1\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("line 2"));
    assert_eq!(app.count("select count(*) from provider_exports").await, 1);

    // margin: revenue 1.2x cost (20% markup) per tenant, provider and model
    let m: Value = app
        .get(ADMIN, "/v1/admin/margin?period=2026-10")
        .await
        .json()
        .await
        .unwrap();
    let acme = m["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["tenant_id"] == "acme")
        .unwrap();
    assert_eq!(acme["requests"], 7);
    assert_eq!(dec(&acme["cost"]), d("0.014"));
    assert_eq!(dec(&acme["revenue"]), d("0.0168"));
    assert_eq!(dec(&acme["margin_percent"]), d("16.6667"));
    app.stop().await;
}

#[tokio::test]
async fn the_clock_closes_ended_months_after_the_grace_period() {
    let mut s = common::fresh_settings().await;
    let mut app = TestApp::start(s.clone()).await;
    app.seed_prices().await;
    app.tenant("acme").await;
    app.ingest(
        ADMIN,
        &json!([
            at(
                usage("sep", "acme", "gpt-4o", 100_000, 10_000),
                "2026-09-10T10:00:00Z"
            ),
            at(
                usage("oct", "acme", "gpt-4o", 200_000, 20_000),
                "2026-10-10T10:00:00Z"
            ),
        ]),
    )
    .await;
    app.wait_count(EVENTS, 2).await;
    app.drain().await;
    // without the clock (the pricing role) nothing closes
    assert_eq!(app.count("select count(*) from invoices").await, 0);
    app.stop().await;

    // the clock, with no grace: October (the last ended month) and September (a month
    // with lines and no close) are closed for the tenant, whose invoices are finalised
    s.roles.push("pricing".into());
    s.invoice_grace = std::time::Duration::ZERO;
    let mut app = TestApp::start(s).await;
    app.wait_count("select count(*) from invoices", 2).await;
    app.drain().await;
    let periods: Vec<(String, Decimal)> =
        sqlx::query_as("select period, total from invoices order by period")
            .fetch_all(&app.owner)
            .await
            .unwrap();
    assert_eq!(periods.len(), 2);
    assert_eq!(periods[0].0, "2026-09");
    assert_eq!(periods[1].0, "2026-10");
    assert!(periods.iter().all(|p| p.1 > Decimal::ZERO), "{periods:?}");
    app.verify_ok().await;
    app.stop().await;
}
