//! Reconciliation: internal (ledger transfers vs accrual projection vs invoices), against a
//! provider's usage or invoice export, and margin per provider, model and tenant.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// Where each field of a normalised provider row comes from: a column name, or several
/// joined with `+` (summed). Token semantics are as providers bill: input includes cached
/// and cache-write tokens unless `input_includes_cached` is false (then they are added).
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    #[serde(default)]
    pub provider_request_id: Option<String>,
    /// RFC 3339 instant, `YYYY-MM-DD`, or Unix seconds.
    pub time: String,
    pub model: String,
    #[serde(default)]
    pub requests: Option<String>,
    #[serde(default)]
    pub input_tokens: Option<String>,
    #[serde(default)]
    pub cached_input_tokens: Option<String>,
    #[serde(default)]
    pub cache_write_tokens: Option<String>,
    #[serde(default)]
    pub output_tokens: Option<String>,
    /// Added to output when `output_includes_reasoning` is false.
    #[serde(default)]
    pub reasoning_tokens: Option<String>,
    #[serde(default)]
    pub amount: Option<String>,
    #[serde(default = "yes")]
    pub input_includes_cached: bool,
    #[serde(default = "yes")]
    pub output_includes_reasoning: bool,
}

fn yes() -> bool {
    true
}

fn col(s: &str) -> Option<String> {
    Some(s.to_string())
}

/// The ready mappings for real providers' exports (see the README for the exact files).
pub fn preset(name: &str) -> Option<Mapping> {
    Some(match name {
        // OpenAI Usage API, GET /v1/organization/usage/completions?bucket_width=1d&group_by=model,
        // one CSV row per (bucket, result); input_tokens includes cached tokens
        "openai-usage" => Mapping {
            time: "start_time".into(),
            model: "model".into(),
            requests: col("num_model_requests"),
            input_tokens: col("input_tokens"),
            cached_input_tokens: col("input_cached_tokens"),
            output_tokens: col("output_tokens"),
            input_includes_cached: true,
            output_includes_reasoning: true,
            ..Mapping::default()
        },
        // Anthropic Usage & Cost Admin API, GET /v1/organizations/usage_report/messages?
        // bucket_width=1d&group_by[]=model, one row per (bucket, result), nested fields
        // flattened with dots; uncached input excludes cache reads and writes
        "anthropic-usage" => Mapping {
            time: "starting_at".into(),
            model: "model".into(),
            input_tokens: col("uncached_input_tokens"),
            cached_input_tokens: col("cache_read_input_tokens"),
            cache_write_tokens: col(
                "cache_creation.ephemeral_5m_input_tokens+cache_creation.ephemeral_1h_input_tokens",
            ),
            output_tokens: col("output_tokens"),
            input_includes_cached: false,
            output_includes_reasoning: true,
            ..Mapping::default()
        },
        // OpenRouter generation records (GET /api/v1/generation?id=…, one row per
        // generation): native token counts and the charged cost, per request id
        "openrouter-generations" => Mapping {
            provider_request_id: col("id"),
            time: "created_at".into(),
            model: "model".into(),
            input_tokens: col("native_tokens_prompt"),
            cached_input_tokens: col("native_tokens_cached"),
            output_tokens: col("native_tokens_completion"),
            amount: col("total_cost"),
            input_includes_cached: true,
            output_includes_reasoning: true,
            ..Mapping::default()
        },
        _ => return None,
    })
}

pub const PRESETS: [&str; 3] = ["openai-usage", "anthropic-usage", "openrouter-generations"];

/// RFC 4180 CSV: quoted fields, doubled quotes, CRLF or LF line ends.
pub fn parse_csv(text: &str) -> Result<Vec<Vec<String>>, String> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut any = false;
    while let Some(ch) = chars.next() {
        any = true;
        if quoted {
            match ch {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => field.push(c),
            }
            continue;
        }
        match ch {
            '"' if field.is_empty() => quoted = true,
            ',' => row.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' | '\r' => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            c => field.push(c),
        }
    }
    if quoted {
        return Err("unterminated quoted field".into());
    }
    if any && (!field.is_empty() || !row.is_empty()) {
        row.push(field);
        rows.push(row);
    }
    rows.retain(|r| !(r.len() == 1 && r[0].trim().is_empty()));
    Ok(rows)
}

/// One provider row, normalised.
#[derive(Clone, Debug, PartialEq)]
pub struct ProviderRow {
    pub line: i32,
    pub provider_request_id: Option<String>,
    pub day: NaiveDate,
    pub model: String,
    pub requests: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub amount: Option<Decimal>,
}

fn parse_day(s: &str) -> Option<NaiveDate> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc).date_naive());
    }
    if let Ok(d) = NaiveDate::parse_from_str(s.get(..10).unwrap_or(s), "%Y-%m-%d") {
        return Some(d);
    }
    s.parse::<i64>()
        .ok()
        .and_then(|n| DateTime::from_timestamp(n, 0))
        .map(|t| t.date_naive())
}

/// Normalise an export with a mapping; every bad row is an error naming its line.
pub fn normalise(text: &str, m: &Mapping) -> Result<Vec<ProviderRow>, String> {
    let rows = parse_csv(text)?;
    let Some((header, body)) = rows.split_first() else {
        return Err("the file is empty".into());
    };
    let index: HashMap<&str, usize> = header
        .iter()
        .enumerate()
        .map(|(i, h)| (h.trim().trim_start_matches('\u{feff}'), i))
        .collect();
    let cols = |spec: &str| -> Result<Vec<usize>, String> {
        spec.split('+')
            .map(|c| {
                index
                    .get(c.trim())
                    .copied()
                    .ok_or_else(|| format!("column {:?} is not in the header", c.trim()))
            })
            .collect()
    };
    let opt = |spec: &Option<String>| spec.as_deref().map(cols).transpose();
    let (time, model) = (cols(&m.time)?, cols(&m.model)?);
    let (rid, req, inp, cached, write, out, reas, amount) = (
        opt(&m.provider_request_id)?,
        opt(&m.requests)?,
        opt(&m.input_tokens)?,
        opt(&m.cached_input_tokens)?,
        opt(&m.cache_write_tokens)?,
        opt(&m.output_tokens)?,
        opt(&m.reasoning_tokens)?,
        opt(&m.amount)?,
    );
    let mut out_rows = Vec::with_capacity(body.len());
    for (n, r) in body.iter().enumerate() {
        let line = n as i32 + 2;
        let cell = |i: usize| r.get(i).map(|s| s.trim()).unwrap_or("");
        let int = |c: &Option<Vec<usize>>| -> Result<i64, String> {
            let mut sum = 0i64;
            for &i in c.iter().flatten() {
                let v = cell(i);
                if v.is_empty() || v.eq_ignore_ascii_case("null") {
                    continue;
                }
                let x: i64 = v
                    .parse()
                    .map_err(|_| format!("line {line}: {:?} is not a whole number of tokens", v))?;
                if x < 0 {
                    return Err(format!("line {line}: negative token count {x}"));
                }
                sum = sum
                    .checked_add(x)
                    .ok_or(format!("line {line}: token count overflows"))?;
            }
            Ok(sum)
        };
        let t = cell(time[0]);
        let day =
            parse_day(t).ok_or_else(|| format!("line {line}: {t:?} is not a date or time"))?;
        let model_name = model.iter().map(|&i| cell(i)).collect::<Vec<_>>().join("+");
        if model_name.is_empty() {
            return Err(format!("line {line}: no model"));
        }
        let (mut input, cached_n, write_n) = (int(&inp)?, int(&cached)?, int(&write)?);
        if !m.input_includes_cached {
            input += cached_n + write_n;
        }
        let mut output = int(&out)?;
        if !m.output_includes_reasoning {
            output += int(&reas)?;
        }
        let amount = match &amount {
            Some(c) => {
                let v = cell(c[0]);
                Some(
                    v.parse::<Decimal>()
                        .or_else(|_| Decimal::from_scientific(v))
                        .map_err(|_| format!("line {line}: amount {v:?} is not a number"))?,
                )
            }
            None => None,
        };
        let id = rid
            .as_ref()
            .map(|c| cell(c[0]).to_string())
            .filter(|s| !s.is_empty());
        out_rows.push(ProviderRow {
            line,
            provider_request_id: id,
            day,
            model: model_name,
            requests: if req.is_some() { int(&req)? } else { 1 },
            input_tokens: input,
            cached_input_tokens: cached_n,
            output_tokens: output,
            amount,
        });
    }
    Ok(out_rows)
}

/// Every row must fall in the period's days; a row with a request id may be dated a day
/// either side (a provider may date a request near midnight differently).
pub fn check_period(rows: &[ProviderRow], period: &str) -> Result<(), String> {
    let (Some(start), Some(end)) = (
        crate::pricing::tiers::period_start(period),
        crate::pricing::tiers::period_end(period),
    ) else {
        return Err("period must be YYYY-MM".into());
    };
    let (start, end) = (start.date_naive(), end.date_naive());
    let day = chrono::Duration::days(1);
    for r in rows {
        let ok = if r.provider_request_id.is_some() {
            r.day >= start - day && r.day < end + day
        } else {
            r.day >= start && r.day < end
        };
        if !ok {
            return Err(format!("line {}: {} is outside {period}", r.line, r.day));
        }
    }
    Ok(())
}

/// Store an imported export (normalised rows) for a provider and period; returns its id.
pub async fn import(
    pool: &PgPool,
    provider: &str,
    period: &str,
    format: &str,
    filename: &str,
    currency: &str,
    rows: &[ProviderRow],
) -> sqlx::Result<i64> {
    let mut tx = pool.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "insert into provider_exports (provider, period, format, filename, currency, rows)
         values ($1, $2, $3, $4, $5, $6) returning id",
    )
    .bind(provider)
    .bind(period)
    .bind(format)
    .bind(filename)
    .bind(currency)
    .bind(rows.len() as i32)
    .fetch_one(&mut *tx)
    .await?;
    for chunk in rows.chunks(5_000) {
        sqlx::query(
            "insert into provider_export_rows (export_id, line, provider_request_id, day, model, requests,
               input_tokens, cached_input_tokens, output_tokens, amount)
             select $1, * from unnest($2::int4[], $3::text[], $4::date[], $5::text[], $6::int8[],
               $7::int8[], $8::int8[], $9::int8[], $10::numeric[])",
        )
        .bind(id)
        .bind(chunk.iter().map(|r| r.line).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.provider_request_id.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.day).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.model.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.requests).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.input_tokens).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.cached_input_tokens).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.output_tokens).collect::<Vec<_>>())
        .bind(chunk.iter().map(|r| r.amount).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(id)
}

/// When two figures count as different.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Tolerances {
    #[serde(default)]
    pub tokens: i64,
    #[serde(default, with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    pub tokens_percent: Decimal,
    #[serde(default = "amount_default", with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    pub amount: Decimal,
    #[serde(default, with = "rust_decimal::serde::str")]
    #[schema(value_type = String)]
    pub amount_percent: Decimal,
}

fn amount_default() -> Decimal {
    Decimal::new(1, 6)
}

impl Default for Tolerances {
    fn default() -> Self {
        Tolerances {
            tokens: 0,
            tokens_percent: Decimal::ZERO,
            amount: amount_default(),
            amount_percent: Decimal::ZERO,
        }
    }
}

impl Tolerances {
    fn tokens_differ(&self, a: i64, b: i64) -> bool {
        let diff = (a - b).abs();
        let pct = Decimal::from(a.abs().max(b.abs())) * self.tokens_percent / Decimal::ONE_HUNDRED;
        diff > self.tokens && Decimal::from(diff) > pct
    }
    fn amounts_differ(&self, a: Decimal, b: Decimal) -> bool {
        let diff = (a - b).abs();
        let pct = a.abs().max(b.abs()) * self.amount_percent / Decimal::ONE_HUNDRED;
        diff > self.amount && diff > pct
    }
}

/// One discrepancy.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct Finding {
    /// `billed_not_in_ledger`, `in_ledger_not_billed`, `token_mismatch`,
    /// `unit_price_mismatch`, or `internal_difference`.
    pub kind: String,
    pub tenant_id: Option<String>,
    pub provider_request_id: Option<String>,
    pub day: Option<NaiveDate>,
    pub model: Option<String>,
    #[schema(value_type = String)]
    pub amount_at_stake: Decimal,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// A stored provider row.
#[derive(Clone, Debug, sqlx::FromRow)]
struct ExportRow {
    line: i32,
    provider_request_id: Option<String>,
    day: NaiveDate,
    model: String,
    requests: i64,
    input_tokens: i64,
    cached_input_tokens: i64,
    output_tokens: i64,
    amount: Option<Decimal>,
}

/// A ledger usage event of the provider in the period.
#[derive(Clone, Debug, sqlx::FromRow)]
struct LedgerRow {
    tenant_id: String,
    event_id: String,
    provider_request_id: Option<String>,
    day: NaiveDate,
    model: String,
    input_tokens: i64,
    cached_input_tokens: i64,
    output_tokens: i64,
    cost: Decimal,
    currency: String,
    cost_version_id: Option<i64>,
}

#[derive(Default)]
struct Agg {
    requests: i64,
    input: i64,
    cached: i64,
    output: i64,
    amount: Option<Decimal>,
    cost: Decimal,
    versions: std::collections::BTreeSet<i64>,
    ledger: Vec<LedgerRow>,
}

async fn version_detail(pool: &PgPool, ids: &[i64]) -> sqlx::Result<serde_json::Value> {
    let rows: Vec<(serde_json::Value,)> = sqlx::query_as(
        "select json_build_object('cost_version_id', id, 'provider', provider, 'model', model,
           'region', region, 'currency', currency, 'effective_from', effective_from,
           'input_per_mtok', input_per_mtok::text, 'cached_input_per_mtok', cached_input_per_mtok::text,
           'output_per_mtok', output_per_mtok::text)
         from price_versions where id = any($1) order by id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    Ok(serde_json::Value::Array(
        rows.into_iter().map(|r| r.0).collect(),
    ))
}

fn tokens_json(requests: i64, input: i64, cached: i64, output: i64) -> serde_json::Value {
    serde_json::json!({"requests": requests, "input_tokens": input, "cached_input_tokens": cached,
        "output_tokens": output})
}

/// Compare a stored export with the ledger's usage of its provider in its period.
pub async fn against_provider(
    pool: &PgPool,
    export_id: i64,
    tol: &Tolerances,
) -> anyhow::Result<(Vec<Finding>, serde_json::Value)> {
    let (provider, period, currency): (String, String, Option<String>) = sqlx::query_as(
        "select provider, period, currency::text from provider_exports where id = $1",
    )
    .bind(export_id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| anyhow::anyhow!("export {export_id} not found"))?;
    let start =
        crate::pricing::tiers::period_start(&period).ok_or_else(|| anyhow::anyhow!("period"))?;
    let end =
        crate::pricing::tiers::period_end(&period).ok_or_else(|| anyhow::anyhow!("period"))?;
    let theirs: Vec<ExportRow> = sqlx::query_as(
        "select line, provider_request_id, day, model, requests, input_tokens, cached_input_tokens,
           output_tokens, amount from provider_export_rows where export_id = $1 order by line",
    )
    .bind(export_id)
    .fetch_all(pool)
    .await?;
    let ours: Vec<LedgerRow> = sqlx::query_as(
        "select e.tenant_id, e.id as event_id,
           convert_from(e.envelope, 'UTF8')::json->'data'->>'provider_request_id' as provider_request_id,
           (e.occurred_at at time zone 'UTC')::date as day, e.model, e.input_tokens,
           e.cached_input_tokens, e.output_tokens, coalesce(x.cost, 0) as cost,
           t.currency::text as currency, x.cv as cost_version_id
         from events e join tenants t on t.id = e.tenant_id
         left join lateral (select sum(amount) filter (where kind = 'usage_cost') as cost,
             max(cost_version_id) as cv
           from transfers x where x.tenant_id = e.tenant_id and x.seq = e.seq) x on true
         where e.type = 'tokenledger.usage.v1' and e.provider = $1
           and e.occurred_at >= $2 and e.occurred_at < $3",
    )
    .bind(&provider)
    // a day either side: the provider may date a request near midnight on the other side
    // of the month's boundary; those only match by request id
    .bind(start - chrono::Duration::days(1))
    .bind(end + chrono::Duration::days(1))
    .fetch_all(pool)
    .await?;
    let in_month = |d: NaiveDate| d >= start.date_naive() && d < end.date_naive();
    let currency = currency.unwrap_or_else(|| "USD".into());
    let mut findings = Vec::new();
    let per_request = theirs.iter().any(|r| r.provider_request_id.is_some());
    // 1. by the provider's request id
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (i, r) in theirs.iter().enumerate() {
        if let Some(id) = &r.provider_request_id {
            by_id.insert(id.clone(), i);
        }
    }
    let mut used = vec![false; theirs.len()];
    let mut rest: Vec<LedgerRow> = Vec::new();
    let mut matched = 0u64;
    for l in ours {
        let hit = l
            .provider_request_id
            .as_ref()
            .and_then(|id| by_id.get(id))
            .copied();
        let Some(i) = hit.filter(|i| !used[*i]) else {
            rest.push(l);
            continue;
        };
        used[i] = true;
        matched += 1;
        let t = &theirs[i];
        let comparable = l.currency == currency;
        let tok_diff = tol.tokens_differ(l.input_tokens, t.input_tokens)
            || tol.tokens_differ(l.cached_input_tokens, t.cached_input_tokens)
            || tol.tokens_differ(l.output_tokens, t.output_tokens);
        let stake = t
            .amount
            .filter(|_| comparable)
            .map(|a| a - l.cost)
            .unwrap_or_default();
        let base = serde_json::json!({
            "event_id": l.event_id, "line": t.line,
            "ledger": tokens_json(1, l.input_tokens, l.cached_input_tokens, l.output_tokens),
            "provider": tokens_json(t.requests, t.input_tokens, t.cached_input_tokens, t.output_tokens),
            "ledger_cost": l.cost.to_string(),
            "provider_amount": t.amount.map(|a| a.to_string()),
        });
        let kind = if tok_diff {
            Some("token_mismatch")
        } else if t
            .amount
            .is_some_and(|a| comparable && tol.amounts_differ(a, l.cost))
        {
            Some("unit_price_mismatch")
        } else {
            None
        };
        if let Some(kind) = kind {
            let mut detail = base;
            if kind == "unit_price_mismatch" {
                let ids: Vec<i64> = l.cost_version_id.into_iter().collect();
                detail["price_book_entries"] = version_detail(pool, &ids).await?;
                detail["note"] = "the provider billed these tokens at other rates than our cost price version: the price book may be out of date".into();
            }
            findings.push(Finding {
                kind: kind.into(),
                tenant_id: Some(l.tenant_id.clone()),
                provider_request_id: l.provider_request_id.clone(),
                day: Some(l.day),
                model: Some(l.model.clone()),
                amount_at_stake: stake,
                detail,
            });
        }
    }
    // provider rows with an id that matched nothing
    for (i, t) in theirs.iter().enumerate() {
        if t.provider_request_id.is_some() && !used[i] {
            used[i] = true;
            findings.push(Finding {
                kind: "billed_not_in_ledger".into(),
                tenant_id: None,
                provider_request_id: t.provider_request_id.clone(),
                day: Some(t.day),
                model: Some(t.model.clone()),
                amount_at_stake: t.amount.unwrap_or_default(),
                detail: serde_json::json!({"line": t.line, "provider": tokens_json(t.requests, t.input_tokens, t.cached_input_tokens, t.output_tokens),
                    "provider_amount": t.amount.map(|a| a.to_string())}),
            });
        }
    }
    // 2. the rest by day x model
    let mut agg: BTreeMap<(NaiveDate, String), (Agg, Agg)> = BTreeMap::new();
    for (i, t) in theirs.iter().enumerate() {
        if used[i] {
            continue;
        }
        let a = &mut agg.entry((t.day, t.model.clone())).or_default().1;
        a.requests += t.requests;
        a.input += t.input_tokens;
        a.cached += t.cached_input_tokens;
        a.output += t.output_tokens;
        if let Some(x) = t.amount {
            a.amount = Some(a.amount.unwrap_or_default() + x);
        }
    }
    for l in rest.into_iter().filter(|l| in_month(l.day)) {
        let a = &mut agg.entry((l.day, l.model.clone())).or_default().0;
        a.requests += 1;
        a.input += l.input_tokens;
        a.cached += l.cached_input_tokens;
        a.output += l.output_tokens;
        a.cost += l.cost;
        a.versions.extend(l.cost_version_id);
        a.ledger.push(l);
    }
    let mut compared = 0u64;
    for ((day, model), (o, t)) in agg {
        let provider_empty =
            t.input == 0 && t.cached == 0 && t.output == 0 && t.amount.is_none_or(|a| a.is_zero());
        if provider_empty && o.requests == 0 {
            continue;
        }
        if provider_empty {
            // nothing billed for this day and model
            if per_request {
                for l in o.ledger {
                    findings.push(Finding {
                        kind: "in_ledger_not_billed".into(),
                        tenant_id: Some(l.tenant_id.clone()),
                        provider_request_id: l.provider_request_id.clone(),
                        day: Some(day),
                        model: Some(model.clone()),
                        amount_at_stake: l.cost,
                        detail: serde_json::json!({"event_id": l.event_id,
                            "ledger": tokens_json(1, l.input_tokens, l.cached_input_tokens, l.output_tokens),
                            "ledger_cost": l.cost.to_string()}),
                    });
                }
            } else {
                findings.push(Finding {
                    kind: "in_ledger_not_billed".into(),
                    tenant_id: None,
                    provider_request_id: None,
                    day: Some(day),
                    model: Some(model.clone()),
                    amount_at_stake: o.cost,
                    detail: serde_json::json!({"ledger": tokens_json(o.requests, o.input, o.cached, o.output),
                        "ledger_cost": o.cost.to_string()}),
                });
            }
            continue;
        }
        if o.requests == 0 {
            findings.push(Finding {
                kind: "billed_not_in_ledger".into(),
                tenant_id: None,
                provider_request_id: None,
                day: Some(day),
                model: Some(model.clone()),
                amount_at_stake: t.amount.unwrap_or_default(),
                detail: serde_json::json!({"provider": tokens_json(t.requests, t.input, t.cached, t.output),
                    "provider_amount": t.amount.map(|a| a.to_string())}),
            });
            continue;
        }
        compared += 1;
        let detail = serde_json::json!({
            "ledger": tokens_json(o.requests, o.input, o.cached, o.output),
            "provider": tokens_json(t.requests, t.input, t.cached, t.output),
            "ledger_cost": o.cost.to_string(),
            "provider_amount": t.amount.map(|a| a.to_string()),
        });
        let comparable = o.ledger.iter().all(|l| l.currency == currency);
        let stake = t
            .amount
            .filter(|_| comparable)
            .map(|a| a - o.cost)
            .unwrap_or_default();
        let kind = if tol.tokens_differ(o.input, t.input)
            || tol.tokens_differ(o.cached, t.cached)
            || tol.tokens_differ(o.output, t.output)
        {
            Some("token_mismatch")
        } else if t
            .amount
            .is_some_and(|a| comparable && tol.amounts_differ(a, o.cost))
        {
            Some("unit_price_mismatch")
        } else {
            None
        };
        if let Some(kind) = kind {
            let mut detail = detail;
            if kind == "unit_price_mismatch" {
                let ids: Vec<i64> = o.versions.iter().copied().collect();
                detail["price_book_entries"] = version_detail(pool, &ids).await?;
                detail["note"] = "the provider billed these tokens at other rates than our cost price version: the price book may be out of date".into();
            }
            findings.push(Finding {
                kind: kind.into(),
                tenant_id: None,
                provider_request_id: None,
                day: Some(day),
                model: Some(model),
                amount_at_stake: stake,
                detail,
            });
        }
    }
    let summary = summarise(
        &findings,
        serde_json::json!({
            "provider": provider, "period": period, "export_id": export_id, "currency": currency,
            "matched_by_request_id": matched, "compared_by_day_and_model": compared,
            "provider_rows": theirs.len(),
        }),
    );
    Ok((findings, summary))
}

/// Counts and money at stake per kind, merged into `base`.
pub fn summarise(findings: &[Finding], mut base: serde_json::Value) -> serde_json::Value {
    let mut by: BTreeMap<&str, (u64, Decimal)> = BTreeMap::new();
    for f in findings {
        let e = by.entry(f.kind.as_str()).or_default();
        e.0 += 1;
        e.1 += f.amount_at_stake;
    }
    base["findings"] = findings.len().into();
    base["by_kind"] = by
        .into_iter()
        .map(|(k, (n, m))| {
            (
                k.to_string(),
                serde_json::json!({"count": n, "amount_at_stake": m.normalize().to_string()}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    base
}

/// What a stored run is.
pub struct RunMeta<'a> {
    pub kind: &'a str,
    pub period: &'a str,
    pub provider: Option<&'a str>,
    pub export_id: Option<i64>,
    pub parameters: serde_json::Value,
}

/// Store a run and its findings; returns the run's id.
pub async fn store_run(
    pool: &PgPool,
    m: RunMeta<'_>,
    summary: &serde_json::Value,
    findings: &[Finding],
) -> sqlx::Result<i64> {
    let RunMeta {
        kind,
        period,
        provider,
        export_id,
        parameters,
    } = m;
    let mut tx = pool.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "insert into reconciliations (kind, period, provider, export_id, parameters, summary)
         values ($1, $2, $3, $4, $5, $6) returning id",
    )
    .bind(kind)
    .bind(period)
    .bind(provider)
    .bind(export_id)
    .bind(&parameters)
    .bind(summary)
    .fetch_one(&mut *tx)
    .await?;
    for (n, chunk) in findings.chunks(5_000).enumerate() {
        let base = (n * 5_000) as i32;
        sqlx::query(
            "insert into reconciliation_findings (reconciliation_id, n, kind, tenant_id,
               provider_request_id, day, model, amount_at_stake, detail)
             select $1, * from unnest($2::int4[], $3::text[], $4::text[], $5::text[], $6::date[],
               $7::text[], $8::numeric[], $9::jsonb[])",
        )
        .bind(id)
        .bind(
            (0..chunk.len())
                .map(|i| base + i as i32 + 1)
                .collect::<Vec<_>>(),
        )
        .bind(chunk.iter().map(|f| f.kind.clone()).collect::<Vec<_>>())
        .bind(
            chunk
                .iter()
                .map(|f| f.tenant_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            chunk
                .iter()
                .map(|f| f.provider_request_id.clone())
                .collect::<Vec<_>>(),
        )
        .bind(chunk.iter().map(|f| f.day).collect::<Vec<_>>())
        .bind(chunk.iter().map(|f| f.model.clone()).collect::<Vec<_>>())
        .bind(chunk.iter().map(|f| f.amount_at_stake).collect::<Vec<_>>())
        .bind(chunk.iter().map(|f| f.detail.clone()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(id)
}

/// Internal reconciliation of a period: the record replayed vs the accrual projection vs
/// the finalised invoices vs the receivable, every difference a finding.
pub async fn internal(
    pool: &PgPool,
    period: &str,
) -> anyhow::Result<(Vec<Finding>, serde_json::Value)> {
    let mut c = pool.acquire().await?;
    sqlx::Executor::execute(&mut *c, "begin isolation level repeatable read").await?;
    let r = super::replay(&mut c, None).await;
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            sqlx::Executor::execute(&mut *c, "rollback").await?;
            return Err(e);
        }
    };
    let diffs = super::check(&mut c, &r, Some(period)).await;
    let invoices: (i64, Option<Decimal>) =
        sqlx::query_as("select count(*), sum(total) from invoices where period = $1")
            .bind(period)
            .fetch_one(&mut *c)
            .await?;
    sqlx::Executor::execute(&mut *c, "rollback").await?;
    let diffs = diffs?;
    let tenants: std::collections::BTreeSet<&String> = r
        .accruals
        .keys()
        .filter(|k| k.1 == period)
        .map(|k| &k.0)
        .collect();
    let lines = r.accruals.keys().filter(|k| k.1 == period).count();
    let findings: Vec<Finding> = diffs
        .into_iter()
        .map(|d| Finding {
            kind: "internal_difference".into(),
            tenant_id: None,
            provider_request_id: None,
            day: None,
            model: None,
            amount_at_stake: Decimal::ZERO,
            detail: serde_json::json!({ "difference": d }),
        })
        .collect();
    let summary = summarise(
        &findings,
        serde_json::json!({
            "period": period, "tenants_with_lines": tenants.len(), "lines": lines,
            "finalized_invoices": invoices.0,
            "finalized_total_by_currency_mixed": invoices.1.map(|d| d.to_string()),
        }),
    );
    Ok((findings, summary))
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct MarginRow {
    pub tenant_id: String,
    pub provider: String,
    pub model: String,
    pub currency: String,
    pub requests: i64,
    #[schema(value_type = String)]
    pub revenue: Decimal,
    #[schema(value_type = String)]
    pub cost: Decimal,
    #[schema(value_type = String)]
    pub margin: Decimal,
    /// margin / revenue × 100, null without revenue.
    #[schema(value_type = Option<String>)]
    pub margin_percent: Option<Decimal>,
}

/// Revenue (rated usage price) vs cost per tenant, provider and model for a period, from
/// the usage rollups; with totals per provider and per tenant.
pub async fn margin(pool: &PgPool, period: &str) -> anyhow::Result<serde_json::Value> {
    let start = crate::pricing::tiers::period_start(period)
        .ok_or_else(|| anyhow::anyhow!("period must be YYYY-MM"))?;
    let end = crate::pricing::tiers::period_end(period).ok_or_else(|| anyhow::anyhow!("period"))?;
    let rows: Vec<(String, String, String, String, i64, Decimal, Decimal)> = sqlx::query_as(
        "select tenant_id, provider, model, currency::text, sum(requests)::int8, sum(price_amount), sum(cost_amount)
         from usage_rollups where day >= $1 and day < $2
         group by 1, 2, 3, 4 order by 1, 2, 3",
    )
    .bind(start.date_naive())
    .bind(end.date_naive())
    .fetch_all(pool)
    .await?;
    let pct = |m: Decimal, r: Decimal| {
        (!r.is_zero()).then(|| (m * Decimal::ONE_HUNDRED / r).round_dp(4).normalize())
    };
    let mut by_provider: BTreeMap<(String, String), (Decimal, Decimal)> = BTreeMap::new();
    let mut by_tenant: BTreeMap<(String, String), (Decimal, Decimal)> = BTreeMap::new();
    let lines: Vec<MarginRow> = rows
        .into_iter()
        .map(
            |(tenant_id, provider, model, currency, requests, revenue, cost)| {
                let p = by_provider
                    .entry((provider.clone(), currency.clone()))
                    .or_default();
                p.0 += revenue;
                p.1 += cost;
                let t = by_tenant
                    .entry((tenant_id.clone(), currency.clone()))
                    .or_default();
                t.0 += revenue;
                t.1 += cost;
                MarginRow {
                    margin: (revenue - cost).normalize(),
                    margin_percent: pct(revenue - cost, revenue),
                    tenant_id,
                    provider,
                    model,
                    currency,
                    requests,
                    revenue: revenue.normalize(),
                    cost: cost.normalize(),
                }
            },
        )
        .collect();
    let total =
        |m: BTreeMap<(String, String), (Decimal, Decimal)>, name: &str| -> Vec<serde_json::Value> {
            m.into_iter()
                .map(|((k, cur), (r, c))| {
                    serde_json::json!({name: k, "currency": cur,
                "revenue": r.normalize().to_string(), "cost": c.normalize().to_string(),
                "margin": (r - c).normalize().to_string(),
                "margin_percent": pct(r - c, r).map(|p| p.to_string())})
                })
                .collect()
        };
    Ok(serde_json::json!({
        "period": period,
        "data": lines,
        "by_provider": total(by_provider, "provider"),
        "by_tenant": total(by_tenant, "tenant_id"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_and_line_ends() {
        let rows = parse_csv("a,b,c\r\n\"x,1\",\"he said \"\"hi\"\"\",3\n4,5,6").unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1], vec!["x,1", "he said \"hi\"", "3"]);
        assert!(parse_csv("a\n\"open").is_err());
    }

    #[test]
    fn presets_normalise_token_semantics() {
        let anthropic = "starting_at,model,uncached_input_tokens,cache_read_input_tokens,cache_creation.ephemeral_5m_input_tokens,cache_creation.ephemeral_1h_input_tokens,output_tokens\n\
            2026-10-03T00:00:00Z,claude-sonnet-4,100,50,10,5,40\n";
        let r = normalise(anthropic, &preset("anthropic-usage").unwrap()).unwrap();
        assert_eq!(r[0].input_tokens, 165);
        assert_eq!(r[0].cached_input_tokens, 50);
        assert_eq!(r[0].day, NaiveDate::from_ymd_opt(2026, 10, 3).unwrap());
        let openai = "start_time,model,num_model_requests,input_tokens,input_cached_tokens,output_tokens\n1790985600,gpt-4o,5,1000,800,500\n";
        let r = normalise(openai, &preset("openai-usage").unwrap()).unwrap();
        assert_eq!(
            (r[0].requests, r[0].input_tokens, r[0].output_tokens),
            (5, 1000, 500)
        );
        let bad = "start_time,model,num_model_requests,input_tokens,input_cached_tokens,output_tokens\nx,gpt-4o,5,1000,800,500\n";
        assert!(normalise(bad, &preset("openai-usage").unwrap())
            .unwrap_err()
            .contains("line 2"));
        let missing = "model\ngpt-4o\n";
        assert!(normalise(missing, &preset("openai-usage").unwrap())
            .unwrap_err()
            .contains("start_time"));
    }

    #[test]
    fn tolerances() {
        let t = Tolerances {
            tokens: 2,
            tokens_percent: Decimal::ONE,
            ..Tolerances::default()
        };
        assert!(!t.tokens_differ(1000, 1008)); // 8 <= 1% of 1008
        assert!(t.tokens_differ(100, 105));
        assert!(!t.amounts_differ(Decimal::new(100, 2), Decimal::new(1000001, 6)));
        assert!(t.amounts_differ(Decimal::new(100, 2), Decimal::new(101, 2)));
    }
}
