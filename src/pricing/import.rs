//! Import of a price map in LiteLLM's `model_prices_and_context_window.json` format.
//!
//! Numbers are read from the JSON text as exact decimals (serde_json's
//! `arbitrary_precision` keeps the text): `1.25e-07` has no exact binary form, and a
//! detour through f64 could shift the last digits.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::{Map, Value};

use super::{RateSet, MTOK};

/// LiteLLM's provider names mapped to the names tokenledger uses; others are kept.
pub const PROVIDER_ALIASES: &[(&str, &str)] = &[
    ("gemini", "google"),
    ("vertex_ai-language-models", "google-vertex"),
    ("dashscope", "qwen"),
];

/// One priced model read from the map (cost side, per million tokens).
#[derive(Clone, Debug, PartialEq)]
pub struct ImportedPrice {
    pub provider: String,
    pub model: String,
    pub base: RateSet,
    pub batch_discount: Decimal,
    pub long_context_threshold_tokens: Option<u64>,
    pub long: RateSet,
    /// `max_output_tokens` (or `max_tokens`) of the entry.
    pub max_output_tokens: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("the price map is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the price map must be a JSON object of model entries")]
    NotAnObject,
    #[error("{model}: {field} is not a decimal number ({text})")]
    BadNumber {
        model: String,
        field: String,
        text: String,
    },
}

/// Exact decimal from a JSON number's text (plain or scientific notation).
pub fn exact_decimal(text: &str) -> Option<Decimal> {
    if text.contains(['e', 'E']) {
        Decimal::from_scientific(text).ok()
    } else {
        Decimal::from_str(text).ok()
    }
}

fn per_mtok(
    entry: &Map<String, Value>,
    model: &str,
    field: &str,
) -> Result<Option<Decimal>, ImportError> {
    match entry.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let text = n.to_string();
            let d = exact_decimal(&text).ok_or_else(|| ImportError::BadNumber {
                model: model.to_string(),
                field: field.to_string(),
                text: text.clone(),
            })?;
            if d.is_sign_negative() {
                return Err(ImportError::BadNumber {
                    model: model.to_string(),
                    field: field.to_string(),
                    text,
                });
            }
            Ok(Some((d * MTOK).normalize()))
        }
        Some(other) => Err(ImportError::BadNumber {
            model: model.to_string(),
            field: field.to_string(),
            text: other.to_string(),
        }),
    }
}

/// The long-context threshold named by fields such as `input_cost_per_token_above_200k_tokens`.
fn long_context_suffix(entry: &Map<String, Value>) -> Option<(String, u64)> {
    entry.keys().find_map(|k| {
        let rest = k.strip_prefix("input_cost_per_token_above_")?;
        let kilo = rest.strip_suffix("k_tokens")?;
        let n: u64 = kilo.parse().ok()?;
        Some((format!("_above_{kilo}k_tokens"), n * 1000))
    })
}

fn rates(entry: &Map<String, Value>, model: &str, suffix: &str) -> Result<RateSet, ImportError> {
    Ok(RateSet {
        input: per_mtok(entry, model, &format!("input_cost_per_token{suffix}"))?,
        cached_input: per_mtok(
            entry,
            model,
            &format!("cache_read_input_token_cost{suffix}"),
        )?,
        cache_write: per_mtok(
            entry,
            model,
            &format!("cache_creation_input_token_cost{suffix}"),
        )?,
        output: per_mtok(entry, model, &format!("output_cost_per_token{suffix}"))?,
        reasoning: per_mtok(
            entry,
            model,
            &format!("output_cost_per_reasoning_token{suffix}"),
        )?,
    })
}

/// Read every chat, completion and embedding entry that has an input price.
pub fn parse_litellm(text: &str) -> Result<Vec<ImportedPrice>, ImportError> {
    let Value::Object(map) = serde_json::from_str::<Value>(text)? else {
        return Err(ImportError::NotAnObject);
    };
    let mut out = Vec::new();
    for (key, entry) in map {
        let Value::Object(entry) = entry else {
            continue;
        };
        let mode = entry.get("mode").and_then(Value::as_str).unwrap_or("chat");
        if !matches!(mode, "chat" | "completion" | "embedding" | "responses") {
            continue;
        }
        let Some(provider) = entry.get("litellm_provider").and_then(Value::as_str) else {
            continue;
        };
        let mut base = rates(&entry, &key, "")?;
        if base.input.is_none() {
            continue;
        }
        base.output = Some(base.output.unwrap_or_default());
        let batch_discount = match (
            base.input,
            per_mtok(&entry, &key, "input_cost_per_token_batches")?,
        ) {
            (Some(full), Some(batch)) if full > Decimal::ZERO && batch <= full => {
                (Decimal::ONE - batch / full).normalize()
            }
            _ => Decimal::ZERO,
        };
        let (threshold, long) = match long_context_suffix(&entry) {
            Some((suffix, n)) => (Some(n), rates(&entry, &key, &suffix)?),
            None => (None, RateSet::default()),
        };
        let model = key
            .strip_prefix(provider)
            .and_then(|m| m.strip_prefix('/'))
            .unwrap_or(&key)
            .to_string();
        let provider = PROVIDER_ALIASES
            .iter()
            .find(|(from, _)| *from == provider)
            .map(|(_, to)| to.to_string())
            .unwrap_or_else(|| provider.to_string());
        let max_output_tokens = ["max_output_tokens", "max_tokens"]
            .iter()
            .find_map(|k| entry.get(*k).and_then(Value::as_u64))
            .filter(|n| *n > 0);
        out.push(ImportedPrice {
            provider,
            model,
            base,
            batch_discount,
            long_context_threshold_tokens: threshold,
            long,
            max_output_tokens,
        });
    }
    out.sort_by(|a, b| (&a.provider, &a.model).cmp(&(&b.provider, &b.model)));
    out.dedup_by(|a, b| a.provider == b.provider && a.model == b.model);
    Ok(out)
}
