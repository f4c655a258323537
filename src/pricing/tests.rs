use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;

use super::*;
use crate::events::{Status, UsageData};

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn version(id: i64, side: Side, input: &str, output: &str) -> PriceVersion {
    PriceVersion {
        id,
        provider: "openai".into(),
        model: "m".into(),
        region: String::new(),
        side,
        currency: "USD".into(),
        effective_from: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
        base: RateSet {
            input: Some(d(input)),
            cached_input: Some(d("0.5")),
            cache_write: Some(d("3.75")),
            output: Some(d(output)),
            reasoning: None,
        },
        batch_discount: d("0.5"),
        long_context_threshold_tokens: Some(200_000),
        long: RateSet {
            input: Some(d("5")),
            output: Some(d("20")),
            ..Default::default()
        },
        max_output_tokens: None,
    }
}

fn usage(
    input: u64,
    cached: u64,
    write: u64,
    output: u64,
    reasoning: u64,
    batch: bool,
) -> UsageData {
    UsageData {
        tenant_id: "acme".into(),
        api_key_id: None,
        request_id: "r".into(),
        provider_request_id: None,
        authorization_id: None,
        model: "m".into(),
        provider: "openai".into(),
        region: None,
        input_tokens: input,
        cached_input_tokens: cached,
        cache_write_tokens: write,
        output_tokens: output,
        reasoning_tokens: reasoning,
        batch,
        status: Status::Error,
        latency_ms: 0,
        fallback_from: vec![],
        estimated: false,
        estimate_method: None,
        tags: BTreeMap::new(),
    }
}

fn markup(pct: &str) -> MarkupRule {
    MarkupRule {
        id: 7,
        tenant_id: None,
        percent: d(pct),
        effective_from: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
    }
}

/// The worked example in the README.
#[test]
fn worked_example() {
    let cost = version(1, Side::Cost, "2.5", "10");
    let m = markup("20");
    let r = rate(
        &usage(10_000, 4_000, 1_000, 2_000, 500, false),
        Terms {
            cost: &cost,
            price: CustomerPrice::Markup(Some(&m)),
        },
    )
    .unwrap();
    // cost: 5000 x 2.5 + 4000 x 0.5 + 1000 x 3.75 + 1500 x 10 + 500 x 10, per million
    assert_eq!(r.cost, d("0.03825"));
    assert_eq!(r.price, d("0.0459"));
    assert_eq!(r.margin, d("0.00765"));
    assert_eq!(r.lines[0].tokens, 5000);
    assert_eq!(r.lines[4].cost_rate_per_mtok, d("10"));
    assert!(!r.long_context);
}

#[test]
fn batch_and_long_context_rates_apply() {
    let cost = version(1, Side::Cost, "2.5", "10");
    let r = rate(
        &usage(300_000, 0, 0, 1_000, 0, true),
        Terms {
            cost: &cost,
            price: CustomerPrice::Markup(None),
        },
    )
    .unwrap();
    assert!(r.long_context);
    // (300000 x 5 + 1000 x 20) / 1e6 = 1.52, half for batch
    assert_eq!(r.cost, d("0.76"));
    assert_eq!(r.price, r.cost);
}

#[test]
fn explicit_customer_price_wins_over_markup() {
    let cost = version(1, Side::Cost, "2.5", "10");
    let price = version(2, Side::Price, "4", "16");
    let r = rate(
        &usage(100_000, 0, 0, 100_000, 0, false),
        Terms {
            cost: &cost,
            price: CustomerPrice::Explicit(&price),
        },
    )
    .unwrap();
    assert_eq!(r.price, d("2")); // 0.1 x 4 + 0.1 x 16
    assert_eq!(r.price_version_id, Some(2));
    assert_eq!(r.markup_percent, None);
}

#[test]
fn book_picks_the_version_in_force_and_the_region_first() {
    let mut v1 = version(1, Side::Cost, "1", "1");
    let mut v2 = version(2, Side::Cost, "2", "2");
    v2.effective_from = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut eu = version(3, Side::Cost, "3", "3");
    eu.region = "eu".into();
    v1.model = "m".into();
    let book = PriceBook::new(vec![v2, v1, eu], vec![]);
    let at = |y| Utc.with_ymd_and_hms(y, 6, 1, 0, 0, 0).unwrap();
    assert_eq!(
        book.version_at("openai", "m", None, Side::Cost, "USD", at(2025))
            .unwrap()
            .id,
        1
    );
    assert_eq!(
        book.version_at("openai", "m", None, Side::Cost, "USD", at(2026))
            .unwrap()
            .id,
        2
    );
    assert_eq!(
        book.version_at("openai", "m", Some("eu"), Side::Cost, "USD", at(2026))
            .unwrap()
            .id,
        3
    );
    assert_eq!(
        book.version_at("openai", "m", Some("us"), Side::Cost, "USD", at(2026))
            .unwrap()
            .id,
        2
    );
    assert!(book
        .version_at("openai", "m", None, Side::Cost, "EUR", at(2026))
        .is_none());
    assert!(book
        .version_at("openai", "m", None, Side::Cost, "USD", at(2024))
        .is_none());
}

#[test]
fn import_reads_exact_decimals() {
    let text = r#"{"sample_spec": {"input_cost_per_token": 0},
        "gpt-x": {"litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1.25e-07,
          "output_cost_per_token": 0.0000100000000000000001, "input_cost_per_token_batches": 6.25e-08,
          "cache_read_input_token_cost": 3e-8},
        "gemini/gemini-y": {"litellm_provider": "gemini", "mode": "chat", "input_cost_per_token": 1.25e-06,
          "output_cost_per_token": 1e-05, "input_cost_per_token_above_200k_tokens": 2.5e-06,
          "output_cost_per_token_above_200k_tokens": 1.5e-05},
        "img": {"litellm_provider": "openai", "mode": "image_generation", "input_cost_per_token": 1}}"#;
    let p = import::parse_litellm(text).unwrap();
    assert_eq!(p.len(), 2);
    let g = &p[0];
    assert_eq!(
        (g.provider.as_str(), g.model.as_str()),
        ("google", "gemini-y")
    );
    assert_eq!(g.long_context_threshold_tokens, Some(200_000));
    assert_eq!(g.long.input, Some(d("2.5")));
    let x = &p[1];
    assert_eq!(x.base.input, Some(d("0.125")));
    assert_eq!(x.base.output, Some(d("10.0000000000000001")));
    assert_eq!(x.base.cached_input, Some(d("0.03")));
    assert_eq!(x.batch_discount, d("0.5"));
}

proptest! {
    /// Lines add up to the totals, price = cost x (1 + markup), and nothing is negative.
    #[test]
    fn rating_invariants(input in 0u64..5_000_000, c in 0u64..100, w in 0u64..100, output in 0u64..1_000_000,
                         r in 0u64..100, batch: bool, pct in 0u32..300) {
        let cached = input * c / 200;
        let write = input * w / 200;
        let reasoning = output * r / 100;
        let cost = version(1, Side::Cost, "2.5", "10");
        let m = markup(&pct.to_string());
        let u = usage(input, cached, write, output, reasoning, batch);
        let rt = rate(&u, Terms { cost: &cost, price: CustomerPrice::Markup(Some(&m)) }).unwrap();
        let sum_cost: Decimal = rt.lines.iter().map(|l| l.cost).sum();
        let sum_price: Decimal = rt.lines.iter().map(|l| l.price).sum();
        prop_assert_eq!(sum_cost, rt.cost);
        prop_assert_eq!(sum_price, rt.price);
        prop_assert_eq!(rt.lines.iter().map(|l| l.tokens).sum::<u64>(), input + output);
        let factor = Decimal::ONE + Decimal::from(pct) / Decimal::ONE_HUNDRED;
        prop_assert_eq!(rt.cost * factor, rt.price);
        prop_assert!(rt.cost >= Decimal::ZERO);
        if batch {
            prop_assert_eq!(rt.cost * Decimal::TWO, rt.cost_list);
        }
    }
}

#[test]
fn price_diffs_name_each_changed_field_and_key() {
    use crate::pricing::diff;
    let t = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    let v = |id: i64, from: &str, input: &str, output: &str| PriceVersion {
        id,
        provider: "openai".into(),
        model: "m".into(),
        region: String::new(),
        side: Side::Cost,
        currency: "USD".into(),
        effective_from: t(from),
        base: RateSet {
            input: Some(input.parse().unwrap()),
            output: Some(output.parse().unwrap()),
            ..Default::default()
        },
        batch_discount: "0.5".parse().unwrap(),
        long_context_threshold_tokens: None,
        long: RateSet::default(),
        max_output_tokens: None,
    };
    let a = v(1, "2026-01-01T00:00:00Z", "2", "8");
    let b = v(2, "2026-06-01T00:00:00Z", "2.5", "8");
    let c = diff::versions(&a, &b);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].field, "input_per_mtok");
    assert_eq!(c[0].change_percent, Some("25".parse().unwrap()));
    let mut other = v(3, "2026-07-01T00:00:00Z", "1", "1");
    other.model = "n".into();
    let book = PriceBook::new(vec![a, b, other], vec![]);
    let d = diff::books(&book, t("2026-02-01T00:00:00Z"), t("2026-08-01T00:00:00Z"));
    assert_eq!(d.len(), 2);
    assert_eq!((d[0].model.as_str(), d[0].kind), ("m", "changed"));
    assert_eq!((d[0].from_version, d[0].to_version), (Some(1), Some(2)));
    assert_eq!((d[1].model.as_str(), d[1].kind), ("n", "added"));
    assert!(diff::books(&book, t("2026-02-01T00:00:00Z"), t("2026-03-01T00:00:00Z")).is_empty());
}
