//! Amounts are exact: expected price and cost for a few hundred random events are
//! computed independently (scaled integers from the stored rate text, not
//! rust_decimal) and compared with the ledger to the last digit.

mod common;

use common::{TestApp, ADMIN};
use rand::{Rng, SeedableRng};
use serde_json::json;

/// A decimal as (integer, scale): value = int / 10^scale.
#[derive(Clone, Copy, Debug)]
struct Fixed(i128, u32);

fn fixed(s: &str) -> Fixed {
    let s = s.trim();
    match s.split_once('.') {
        None => Fixed(s.parse().unwrap(), 0),
        Some((a, b)) => Fixed(format!("{a}{b}").parse().unwrap(), b.len() as u32),
    }
}

fn mul(a: Fixed, b: Fixed) -> Fixed {
    Fixed(a.0 * b.0, a.1 + b.1)
}

fn rescale(a: Fixed, scale: u32) -> i128 {
    assert!(scale >= a.1);
    a.0 * 10i128.pow(scale - a.1)
}

fn add(a: Fixed, b: Fixed) -> Fixed {
    let s = a.1.max(b.1);
    Fixed(rescale(a, s) + rescale(b, s), s)
}

fn eq(a: Fixed, b: Fixed) -> bool {
    let s = a.1.max(b.1);
    rescale(a, s) == rescale(b, s)
}

const MODELS: [&str; 4] = ["gpt-4o", "gpt-4o-mini", "gpt-5", "o3"];

#[tokio::test]
async fn ledger_amounts_match_an_independent_calculation() {
    let app = TestApp::spawn().await;
    app.tenant("acme").await;
    // an explicit customer price for one model, markup (20%) for the others
    let r = app.http.post(app.url("/v1/admin/prices")).bearer_auth(ADMIN).json(&json!({
        "provider": "openai", "model": "o3", "side": "price", "currency": "USD",
        "effective_from": "2020-01-01T00:00:00Z", "input_per_mtok": "2.345", "output_per_mtok": "9.8765",
        "cached_input_per_mtok": "0.5", "batch_discount": "0.4"
    })).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut batch = Vec::new();
    for i in 0..300 {
        let input: u64 = rng.gen_range(0..300_000);
        let cached = rng.gen_range(0..=input / 2);
        let output: u64 = rng.gen_range(0..50_000);
        let model = MODELS[i % 4];
        let reasoning = if model == "gpt-5" || model == "o3" {
            rng.gen_range(0..=output)
        } else {
            0
        };
        batch.push(json!({"specversion": "1.0", "id": format!("x-{i}"), "source": "test",
            "type": "tokenledger.usage.v1", "time": chrono::Utc::now().to_rfc3339(),
            "data": {"tenant_id": "acme", "request_id": format!("r-{i}"), "model": model, "provider": "openai",
                     "input_tokens": input, "cached_input_tokens": cached, "output_tokens": output,
                     "reasoning_tokens": reasoning, "batch": rng.gen_bool(0.3), "status": "ok"}}));
    }
    app.ingest(ADMIN, &json!(batch)).await;
    app.wait_count("select count(*) from events", 300).await;

    // the oracle: rates as text straight from the price table
    type Rates = (
        String,
        Option<String>,
        Option<String>,
        String,
        Option<String>,
        String,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let rates = |model: &'static str, side: &'static str| {
        let pool = app.owner.clone();
        async move {
            sqlx::query_as::<_, Rates>(
                "select input_per_mtok::text, cached_input_per_mtok::text, cache_write_per_mtok::text,
                   output_per_mtok::text, reasoning_per_mtok::text, batch_discount::text, long_context_threshold_tokens,
                   long_input_per_mtok::text, long_cached_input_per_mtok::text, long_output_per_mtok::text
                 from price_versions where model = $1 and side = $2 and provider = 'openai' order by id desc limit 1",
            )
            .bind(model)
            .bind(side)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };
    let mut checked = 0;
    for (i, ev) in batch.iter().enumerate() {
        let d = &ev["data"];
        let model = MODELS[i % 4];
        let n = |k: &str| d[k].as_u64().unwrap_or(0) as i128;
        let (input, cached, output, reasoning) = (
            n("input_tokens"),
            n("cached_input_tokens"),
            n("output_tokens"),
            n("reasoning_tokens"),
        );
        let batch_req = d["batch"].as_bool().unwrap();
        let amount = |r: &Rates, markup: Option<Fixed>| {
            let long = r.6.is_some_and(|t| input > t as i128);
            let pick = |base: &str, long_rate: &Option<String>| {
                fixed(if long {
                    long_rate.as_deref().unwrap_or(base)
                } else {
                    base
                })
            };
            let inp = pick(&r.0, &r.7);
            let cac = if long {
                r.8.as_deref().or(r.1.as_deref()).map(fixed).unwrap_or(inp)
            } else {
                r.1.as_deref().map(fixed).unwrap_or(inp)
            };
            let out = pick(&r.3, &r.9);
            let rea = if long {
                out
            } else {
                r.4.as_deref().map(fixed).unwrap_or(out)
            };
            let mut sum = Fixed(0, 0);
            for (t, rate) in [
                (input - cached, inp),
                (cached, cac),
                (output - reasoning, out),
                (reasoning, rea),
            ] {
                sum = add(sum, mul(Fixed(t, 0), rate));
            }
            if let Some(m) = markup {
                sum = mul(sum, m);
            }
            if batch_req {
                let disc = fixed(&r.5);
                sum = mul(sum, Fixed(rescale(Fixed(1, 0), disc.1) - disc.0, disc.1));
            }
            Fixed(sum.0, sum.1 + 6) // per million tokens
        };
        let cost_rates = rates(model, "cost").await.unwrap();
        let expected_cost = amount(&cost_rates, None);
        let expected_price = match rates(model, "price").await {
            Some(p) => amount(&p, None),
            None => amount(&cost_rates, Some(fixed("1.2"))),
        };
        let (price, cost): (String, String) = sqlx::query_as(
            "select price_amount::text, cost_amount::text from request_views where request_id = $1",
        )
        .bind(format!("r-{i}"))
        .fetch_one(&app.owner)
        .await
        .unwrap();
        assert!(
            eq(fixed(&cost), expected_cost),
            "r-{i} {model}: cost {cost} expected {expected_cost:?}"
        );
        assert!(
            eq(fixed(&price), expected_price),
            "r-{i} {model}: price {price} expected {expected_price:?}"
        );
        // the transfers hold the same amounts
        let sums: (Option<String>, Option<String>) = sqlx::query_as(
            "select (sum(amount) filter (where kind = 'usage_price'))::text, (sum(amount) filter (where kind = 'usage_cost'))::text
             from transfers t join events e on e.tenant_id = t.tenant_id and e.seq = t.seq where e.request_id = $1",
        )
        .bind(format!("r-{i}"))
        .fetch_one(&app.owner)
        .await
        .unwrap();
        assert!(eq(fixed(sums.0.as_deref().unwrap_or("0")), expected_price));
        assert!(eq(fixed(sums.1.as_deref().unwrap_or("0")), expected_cost));
        checked += 1;
    }
    assert_eq!(checked, 300);
}
