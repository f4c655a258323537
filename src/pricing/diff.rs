//! Differences between price versions, and between the price book at two instants (pure).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::{PriceBook, PriceVersion};

#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FieldChange {
    pub field: &'static str,
    #[schema(value_type = Option<String>)]
    pub from: Option<Decimal>,
    #[schema(value_type = Option<String>)]
    pub to: Option<Decimal>,
    /// (to - from) / from in percent, when both are set and `from` is not zero.
    #[schema(value_type = Option<String>)]
    pub change_percent: Option<Decimal>,
}

fn fields(v: &PriceVersion) -> [(&'static str, Option<Decimal>); 13] {
    [
        ("input_per_mtok", v.base.input),
        ("cached_input_per_mtok", v.base.cached_input),
        ("cache_write_per_mtok", v.base.cache_write),
        ("output_per_mtok", v.base.output),
        ("reasoning_per_mtok", v.base.reasoning),
        ("batch_discount", Some(v.batch_discount)),
        (
            "long_context_threshold_tokens",
            v.long_context_threshold_tokens.map(Decimal::from),
        ),
        ("long_input_per_mtok", v.long.input),
        ("long_cached_input_per_mtok", v.long.cached_input),
        ("long_cache_write_per_mtok", v.long.cache_write),
        ("long_output_per_mtok", v.long.output),
        ("long_reasoning_per_mtok", v.long.reasoning),
        ("max_output_tokens", v.max_output_tokens.map(Decimal::from)),
    ]
}

/// Field-by-field changes from `a` to `b` (rates, discounts, thresholds).
pub fn versions(a: &PriceVersion, b: &PriceVersion) -> Vec<FieldChange> {
    fields(a)
        .into_iter()
        .zip(fields(b))
        .filter(|((_, x), (_, y))| x != y)
        .map(|((field, from), (_, to))| FieldChange {
            field,
            from: from.map(|d| d.normalize()),
            to: to.map(|d| d.normalize()),
            change_percent: match (from, to) {
                (Some(f), Some(t)) if !f.is_zero() => {
                    Some(((t - f) * Decimal::ONE_HUNDRED / f).round_dp(4).normalize())
                }
                _ => None,
            },
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct KeyChange {
    pub provider: String,
    pub model: String,
    pub region: String,
    pub side: String,
    pub currency: String,
    /// `added`, `removed` or `changed`.
    pub kind: &'static str,
    pub from_version: Option<i64>,
    pub to_version: Option<i64>,
    pub changes: Vec<FieldChange>,
}

/// What changed in the price book between two instants: each (provider, model, region,
/// side, currency) whose version in force differs.
pub fn books(book: &PriceBook, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<KeyChange> {
    let mut out = Vec::new();
    for list in book.all_versions() {
        let at = |t: DateTime<Utc>| {
            let n = list.partition_point(|v| v.effective_from <= t);
            n.checked_sub(1).map(|i| &list[i])
        };
        let (a, b) = (at(from), at(to));
        let kind = match (a, b) {
            (None, None) => continue,
            (Some(x), Some(y)) if x.id == y.id => continue,
            (None, Some(_)) => "added",
            (Some(_), None) => "removed",
            (Some(_), Some(_)) => "changed",
        };
        let v = b.or(a).expect("one side is set");
        out.push(KeyChange {
            provider: v.provider.clone(),
            model: v.model.clone(),
            region: v.region.clone(),
            side: v.side.as_str().to_string(),
            currency: v.currency.clone(),
            kind,
            from_version: a.map(|x| x.id),
            to_version: b.map(|x| x.id),
            changes: match (a, b) {
                (Some(x), Some(y)) => versions(x, y),
                _ => Vec::new(),
            },
        });
    }
    out.sort_by(|x, y| {
        (&x.provider, &x.model, &x.region, &x.side, &x.currency).cmp(&(
            &y.provider,
            &y.model,
            &y.region,
            &y.side,
            &y.currency,
        ))
    });
    out
}

/// What to compare.
#[derive(Clone, Copy, Debug)]
pub enum Between {
    Versions(i64, i64),
    Instants(DateTime<Utc>, DateTime<Utc>),
}

impl Between {
    pub fn from_query(
        from_id: Option<i64>,
        to_id: Option<i64>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Between, String> {
        match (from_id, to_id, from, to) {
            (Some(a), Some(b), None, None) => Ok(Between::Versions(a, b)),
            (None, None, Some(a), Some(b)) => Ok(Between::Instants(a, b)),
            _ => Err("give either from_id and to_id, or from and to".into()),
        }
    }
}

/// The diff, optionally narrowed to a provider and/or model; an unknown version id is
/// an error naming it.
pub fn diff(
    book: &PriceBook,
    between: Between,
    provider: Option<&str>,
    model: Option<&str>,
) -> Result<Vec<KeyChange>, &'static str> {
    let mut out = match between {
        Between::Versions(a, b) => {
            let x = book.version_by_id(a).ok_or("price version (from_id)")?;
            let y = book.version_by_id(b).ok_or("price version (to_id)")?;
            vec![KeyChange {
                provider: y.provider.clone(),
                model: y.model.clone(),
                region: y.region.clone(),
                side: y.side.as_str().to_string(),
                currency: y.currency.clone(),
                kind: "changed",
                from_version: Some(a),
                to_version: Some(b),
                changes: versions(x, y),
            }]
        }
        Between::Instants(a, b) => books(book, a, b),
    };
    out.retain(|k| provider.is_none_or(|p| k.provider == p) && model.is_none_or(|m| k.model == m));
    Ok(out)
}
