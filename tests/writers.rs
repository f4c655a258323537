//! The writer on the bus: poison messages, several writers, graceful shutdown.

mod common;

use std::time::Duration;

use common::{usage, TestApp};
use serde_json::Value;

const EVENTS: &str = "select count(*) from events";

fn parsed(evs: Vec<Value>) -> Vec<tokenledger::events::Event> {
    evs.into_iter()
        .map(|v| tokenledger::events::parse(v, chrono::Utc::now()).unwrap())
        .collect()
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_with_a_reason_and_not_redelivered() {
    let app = TestApp::spawn().await;
    app.tenant("acme").await;
    let bus = tokenledger::bus::connect(&app.settings).await.unwrap();
    let acme = app.settings.usage_subject("acme");
    let mut bad = usage("neg", "acme", "gpt-4o", 10, 10);
    bad["data"]["input_tokens"] = serde_json::json!(-3);
    let good_for_acme = parsed(vec![usage("misrouted", "acme", "gpt-4o", 1, 1)]).remove(0);
    // U+0000 cannot go into Postgres text or jsonb: neither a tag holding it nor a
    // rejection quoting it may fail the batch (it would on every redelivery)
    let mut nul_tag = usage("nul-tag", "acme", "gpt-4o", 10, 10);
    nul_tag["data"]["tags"] = serde_json::json!({"project": "a\u{0}b"});
    for (subject, payload, id) in [
        (acme.clone(), br#"{"\u0000":1}"#.to_vec(), "p4"),
        (acme.clone(), nul_tag.to_string().into_bytes(), "p5"),
        (acme.clone(), b"not json at all".to_vec(), "p1"),
        (acme.clone(), bad.to_string().into_bytes(), "p2"),
        (
            app.settings.usage_subject("beta"),
            good_for_acme.canonical.clone(),
            "p3",
        ),
    ] {
        bus.publish_with_id(subject, payload.into(), id)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    app.wait_count("select count(*) from dead_letters", 5).await;
    app.drain().await;
    let mut rows: Vec<(String, String)> =
        sqlx::query_as("select reason, detail from dead_letters order by id")
            .fetch_all(&app.owner)
            .await
            .unwrap();
    assert_eq!(rows[0].0, "invalid_event");
    assert!(rows[0].1.contains("\\u0000"), "{}", rows[0].1);
    assert_eq!(rows[1].0, "invalid_event");
    assert!(rows[1].1.contains("data.tags"), "{}", rows[1].1);
    rows.drain(..2);
    assert_eq!(rows[0].0, "invalid_event");
    assert!(rows[0].1.contains("not valid JSON"), "{}", rows[0].1);
    assert_eq!(rows[1].0, "invalid_event");
    assert!(
        rows[1]
            .1
            .contains("data.input_tokens: must not be negative"),
        "{}",
        rows[1].1
    );
    assert_eq!(rows[2].0, "subject_mismatch");
    // terminated, not redelivered: nothing more arrives after the ack wait
    tokio::time::sleep(app.settings.ack_wait + Duration::from_secs(1)).await;
    assert_eq!(app.count("select count(*) from dead_letters").await, 5);
    assert_eq!(app.count(EVENTS).await, 0);
}

#[tokio::test]
async fn two_writers_share_the_consumer_and_keep_ledger_order_per_tenant() {
    let s = common::fresh_settings().await;
    let a = TestApp::start(s.clone()).await;
    a.seed_prices().await;
    a.tenant("acme").await;
    a.tenant("beta").await;
    let b = TestApp::start(s.clone()).await;
    let evs: Vec<Value> = (0..3000)
        .map(|i| {
            usage(
                &format!("w-{i}"),
                if i % 2 == 0 { "acme" } else { "beta" },
                "gpt-4o",
                100 + i,
                10,
            )
        })
        .collect();
    common::publish(&s, evs).await;
    a.wait_count(EVENTS, 3000).await;
    a.drain().await;
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "select tenant_id, count(*), min(seq), max(seq) from events group by tenant_id order by tenant_id",
    )
    .fetch_all(&a.owner)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("acme".into(), 1500, 1, 1500),
            ("beta".into(), 1500, 1, 1500)
        ]
    );
    let report = tokenledger::projections::rebuild::verify(&a.owner)
        .await
        .unwrap();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    drop(b);
}

/// SIGTERM: the writer finishes its batch in flight and exits cleanly; a new writer
/// picks up the rest; everything is charged once.
#[tokio::test]
async fn sigterm_finishes_the_batch_in_flight_and_exits_cleanly() {
    let s = common::fresh_settings().await;
    let mut app = TestApp::start(s.clone()).await;
    app.seed_prices().await;
    app.tenant("acme").await;
    app.stop().await;
    let evs: Vec<Value> = (0..4000)
        .map(|i| usage(&format!("g-{i}"), "acme", "gpt-4o", 50, 5))
        .collect();
    common::publish(&s, evs).await;
    let mut child = common::writer_process(&s, &[]);
    app.wait_count(EVENTS, 1).await;
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "graceful exit, got {status:?}");
    let app = TestApp::start(s).await;
    app.wait_count(EVENTS, 4000).await;
    app.drain().await;
    assert_eq!(app.count(EVENTS).await, 4000);
    assert_eq!(app.count("select count(*) from transfers").await, 8000);
}
