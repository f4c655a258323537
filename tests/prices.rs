//! Price book management: publish a version effective from a future instant, list, and
//! diff over REST and the CLI; history is never rewritten.

mod common;

use common::{TestApp, ADMIN};
use serde_json::{json, Value};

#[tokio::test]
async fn publish_list_and_diff_price_versions() {
    let mut app = TestApp::spawn().await;
    let first = json!({"provider": "openai", "model": "diff-m", "side": "cost", "currency": "USD",
        "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": "2", "output_per_mtok": "8"});
    let r = app.admin_post("/v1/admin/prices", Some(&first)).await;
    assert_eq!(r.status(), 201);
    let v1: Value = r.json().await.unwrap();
    // a change may not start in the past ...
    let mut past = first.clone();
    past["input_per_mtok"] = json!("2.5");
    past["effective_from"] = json!("2021-01-01T00:00:00Z");
    let r = app.admin_post("/v1/admin/prices", Some(&past)).await;
    assert_eq!(r.status(), 422);
    // ... it starts in the future
    let mut next = first.clone();
    next["input_per_mtok"] = json!("2.5");
    next["effective_from"] = json!("2030-01-01T00:00:00Z");
    let r = app.admin_post("/v1/admin/prices", Some(&next)).await;
    assert_eq!(r.status(), 201);
    let v2: Value = r.json().await.unwrap();

    let list: Value = app
        .get(ADMIN, "/v1/prices?model=diff-m")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 2);

    let d: Value = app
        .get(
            ADMIN,
            &format!("/v1/prices/diff?from_id={}&to_id={}", v1["id"], v2["id"]),
        )
        .await
        .json()
        .await
        .unwrap();
    let changes = d["data"][0]["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{d}");
    assert_eq!(changes[0]["field"], "input_per_mtok");
    assert_eq!(changes[0]["change_percent"], "25");
    let d: Value = app
        .get(
            ADMIN,
            "/v1/prices/diff?from=2025-01-01T00:00:00Z&to=2031-01-01T00:00:00Z&model=diff-m",
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(d["data"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["data"][0]["kind"], "changed");
    let r = app.get(ADMIN, "/v1/prices/diff?from_id=1").await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(
        app.get(ADMIN, "/v1/prices/diff?from_id=1&to_id=999999")
            .await
            .status(),
        404
    );

    // once the model was charged, a new key for it (a first region) may not be dated back
    // over those charges
    app.tenant("acme").await;
    app.ingest(
        ADMIN,
        &json!([common::usage("p1", "acme", "diff-m", 10, 10)]),
    )
    .await;
    app.wait_count("select count(*) from events", 1).await;
    app.drain().await;
    let mut region = first.clone();
    region["region"] = json!("eu");
    region["effective_from"] = json!("2021-01-01T00:00:00Z");
    let r = app.admin_post("/v1/admin/prices", Some(&region)).await;
    assert_eq!(r.status(), 422);

    // the CLI shows the same diff
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenledger"))
        .args([
            "prices",
            "diff",
            "2025-01-01T00:00:00Z",
            "2031-01-01T00:00:00Z",
            "--model",
            "diff-m",
        ])
        .env("DATABASE_URL", &app.settings.database_url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli, d["data"]);
    app.stop().await;
}
