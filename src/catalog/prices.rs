//! Persistence of price versions and markup rules, and the effective-date rule:
//! a change takes effect no earlier than now plus the accepted clock skew. The first
//! version of a (provider, model, region, side, currency) may be dated back, since
//! nothing was ever charged under another price for it (events for it wait in the dead
//! letters as `unpriced_model`).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Transaction};

use super::{valid_currency, CatalogError};
use crate::pricing::{import::ImportedPrice, MarkupRule, PriceBook, PriceVersion, RateSet, Side};

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    provider: String,
    model: String,
    region: String,
    side: String,
    currency: String,
    effective_from: DateTime<Utc>,
    input_per_mtok: Decimal,
    cached_input_per_mtok: Option<Decimal>,
    cache_write_per_mtok: Option<Decimal>,
    output_per_mtok: Decimal,
    reasoning_per_mtok: Option<Decimal>,
    batch_discount: Decimal,
    long_context_threshold_tokens: Option<i64>,
    long_input_per_mtok: Option<Decimal>,
    long_cached_input_per_mtok: Option<Decimal>,
    long_cache_write_per_mtok: Option<Decimal>,
    long_output_per_mtok: Option<Decimal>,
    long_reasoning_per_mtok: Option<Decimal>,
    max_output_tokens: Option<i64>,
}

impl From<Row> for PriceVersion {
    fn from(r: Row) -> Self {
        PriceVersion {
            id: r.id,
            provider: r.provider,
            model: r.model,
            region: r.region,
            side: if r.side == "price" {
                Side::Price
            } else {
                Side::Cost
            },
            currency: r.currency,
            effective_from: r.effective_from,
            base: RateSet {
                input: Some(r.input_per_mtok),
                cached_input: r.cached_input_per_mtok,
                cache_write: r.cache_write_per_mtok,
                output: Some(r.output_per_mtok),
                reasoning: r.reasoning_per_mtok,
            },
            batch_discount: r.batch_discount,
            long_context_threshold_tokens: r.long_context_threshold_tokens.map(|t| t as u64),
            long: RateSet {
                input: r.long_input_per_mtok,
                cached_input: r.long_cached_input_per_mtok,
                cache_write: r.long_cache_write_per_mtok,
                output: r.long_output_per_mtok,
                reasoning: r.long_reasoning_per_mtok,
            },
            max_output_tokens: r.max_output_tokens.map(|t| t as u64),
        }
    }
}

const COLUMNS: &str =
    "id, provider, model, region, side, currency::text as currency, effective_from,
    input_per_mtok, cached_input_per_mtok, cache_write_per_mtok, output_per_mtok,
    reasoning_per_mtok, batch_discount, long_context_threshold_tokens, long_input_per_mtok,
    long_cached_input_per_mtok, long_cache_write_per_mtok, long_output_per_mtok,
    long_reasoning_per_mtok, max_output_tokens";

pub async fn load_book(c: &mut sqlx::PgConnection) -> Result<PriceBook, sqlx::Error> {
    let rows: Vec<Row> = sqlx::query_as(&format!("select {COLUMNS} from price_versions"))
        .fetch_all(&mut *c)
        .await?;
    let markups: Vec<(i64, Option<String>, Decimal, DateTime<Utc>)> =
        sqlx::query_as("select id, tenant_id, percent, effective_from from markup_rules")
            .fetch_all(&mut *c)
            .await?;
    let tiers = super::tiers::load_all(&mut *c).await?;
    let budgets = super::budgets::load_all(&mut *c).await?;
    let classes = super::routing::load_all(&mut *c).await?;
    let commitments = super::commitments::load_all(&mut *c).await?;
    let reservations = super::reservations::load_all(&mut *c).await?;
    let provider_reservations = super::reservations::load_provider(&mut *c).await?;
    let provider_commitments = super::provider_commitments::load_all(&mut *c).await?;
    Ok(PriceBook::new(
        rows.into_iter().map(PriceVersion::from).collect(),
        markups
            .into_iter()
            .map(|(id, tenant_id, percent, effective_from)| MarkupRule {
                id,
                tenant_id,
                percent,
                effective_from,
            })
            .collect(),
    )
    .with_tiers(tiers)
    .with_budgets(budgets)
    .with_classes(classes)
    .with_commitments(commitments)
    .with_reservations(reservations)
    .with_provider_reservations(provider_reservations)
    .with_provider_commitments(provider_commitments))
}

/// A new price version, as an operator submits it (rates per million tokens).
#[derive(Clone, Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPrice {
    pub provider: String,
    pub model: String,
    #[serde(default)]
    pub region: String,
    /// `cost` (what the provider charges) or `price` (explicit customer price).
    pub side: String,
    pub currency: String,
    /// Defaults to now plus the accepted clock skew.
    pub effective_from: Option<DateTime<Utc>>,
    #[schema(value_type = String)]
    pub input_per_mtok: Decimal,
    #[schema(value_type = Option<String>)]
    pub cached_input_per_mtok: Option<Decimal>,
    #[schema(value_type = Option<String>)]
    pub cache_write_per_mtok: Option<Decimal>,
    #[schema(value_type = String)]
    pub output_per_mtok: Decimal,
    #[schema(value_type = Option<String>)]
    pub reasoning_per_mtok: Option<Decimal>,
    #[serde(default)]
    #[schema(value_type = String)]
    pub batch_discount: Decimal,
    pub long_context_threshold_tokens: Option<u64>,
    #[schema(value_type = Option<String>)]
    pub long_input_per_mtok: Option<Decimal>,
    #[schema(value_type = Option<String>)]
    pub long_cached_input_per_mtok: Option<Decimal>,
    #[schema(value_type = Option<String>)]
    pub long_cache_write_per_mtok: Option<Decimal>,
    #[schema(value_type = Option<String>)]
    pub long_output_per_mtok: Option<Decimal>,
    #[schema(value_type = Option<String>)]
    pub long_reasoning_per_mtok: Option<Decimal>,
    /// The most output tokens the model produces (pre-authorisation's default).
    pub max_output_tokens: Option<u64>,
    #[serde(default)]
    pub source: String,
}

impl NewPrice {
    fn check(&self) -> Result<Side, CatalogError> {
        let bad = |m: &str| Err(CatalogError::InvalidPrice(m.to_string()));
        if self.provider.is_empty() || self.model.is_empty() {
            return bad("provider and model are required");
        }
        if !valid_currency(&self.currency) {
            return Err(CatalogError::InvalidCurrency);
        }
        let rates = [
            Some(self.input_per_mtok),
            self.cached_input_per_mtok,
            self.cache_write_per_mtok,
            Some(self.output_per_mtok),
            self.reasoning_per_mtok,
            self.long_input_per_mtok,
            self.long_cached_input_per_mtok,
            self.long_cache_write_per_mtok,
            self.long_output_per_mtok,
            self.long_reasoning_per_mtok,
        ];
        if rates.iter().flatten().any(|r| r.is_sign_negative()) {
            return bad("rates must not be negative");
        }
        if self.batch_discount < Decimal::ZERO || self.batch_discount > Decimal::ONE {
            return bad("batch_discount must be between 0 and 1");
        }
        if self.long_context_threshold_tokens == Some(0) {
            return bad("long_context_threshold_tokens must be positive");
        }
        if self
            .max_output_tokens
            .is_some_and(|n| n == 0 || n > i64::MAX as u64)
        {
            return bad("max_output_tokens must be positive");
        }
        match self.side.as_str() {
            "cost" => Ok(Side::Cost),
            "price" => Ok(Side::Price),
            _ => bad("side must be cost or price"),
        }
    }
}

/// Insert one version, enforcing the effective-date rule.
pub async fn add_price(
    tx: &mut Transaction<'_, Postgres>,
    p: &NewPrice,
    now: DateTime<Utc>,
    skew: chrono::Duration,
) -> Result<PriceVersion, CatalogError> {
    let side = p.check()?;
    let earliest = now + skew;
    let existing: bool = sqlx::query_scalar(
        "select exists (select 1 from price_versions where provider = $1 and model = $2
           and region = $3 and side = $4 and currency = $5)",
    )
    .bind(&p.provider)
    .bind(&p.model)
    .bind(&p.region)
    .bind(side.as_str())
    .bind(&p.currency)
    .fetch_one(&mut **tx)
    .await?;
    // A new key (a first region or an explicit price beside the cost) may be dated back
    // only over a stretch where nothing of this model was charged: otherwise it would
    // change which version was in force for events already rated.
    let charged_since = match p.effective_from {
        Some(t) if !existing && t < earliest => {
            sqlx::query_scalar(
                "select exists (select 1 from usage_rollups where provider = $1 and model = $2
               and day >= ($3 at time zone 'UTC')::date)",
            )
            .bind(&p.provider)
            .bind(&p.model)
            .bind(t)
            .fetch_one(&mut **tx)
            .await?
        }
        _ => false,
    };
    let effective_from = match p.effective_from {
        Some(t) if (existing || charged_since) && t < earliest => {
            return Err(CatalogError::EffectiveInPast {
                earliest: earliest.to_rfc3339(),
            })
        }
        Some(t) => t,
        None => earliest,
    };
    let row: Row = sqlx::query_as(&format!(
        "insert into price_versions (provider, model, region, side, currency, effective_from,
           input_per_mtok, cached_input_per_mtok, cache_write_per_mtok, output_per_mtok,
           reasoning_per_mtok, batch_discount, long_context_threshold_tokens, long_input_per_mtok,
           long_cached_input_per_mtok, long_cache_write_per_mtok, long_output_per_mtok,
           long_reasoning_per_mtok, source, max_output_tokens)
         values ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20)
         returning {COLUMNS}"
    ))
    .bind(&p.provider)
    .bind(&p.model)
    .bind(&p.region)
    .bind(side.as_str())
    .bind(&p.currency)
    .bind(effective_from)
    .bind(p.input_per_mtok)
    .bind(p.cached_input_per_mtok)
    .bind(p.cache_write_per_mtok)
    .bind(p.output_per_mtok)
    .bind(p.reasoning_per_mtok)
    .bind(p.batch_discount)
    .bind(p.long_context_threshold_tokens.map(|t| t as i64))
    .bind(p.long_input_per_mtok)
    .bind(p.long_cached_input_per_mtok)
    .bind(p.long_cache_write_per_mtok)
    .bind(p.long_output_per_mtok)
    .bind(p.long_reasoning_per_mtok)
    .bind(&p.source)
    .bind(p.max_output_tokens.map(|t| t as i64))
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.into())
}

/// How an import dates and labels what it adds.
pub struct ImportOptions<'a> {
    pub currency: &'a str,
    /// When a model's first price takes effect (it may be in the past).
    pub first_effective_from: DateTime<Utc>,
    /// When changed prices take effect (default now plus the skew; never earlier).
    pub effective_from: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
    pub skew: chrono::Duration,
    pub source: &'a str,
}

/// Import a LiteLLM map as cost-side versions. Entries identical to the version already
/// in force are skipped. Returns (versions added, entries unchanged).
pub async fn import(
    pool: &PgPool,
    prices: &[ImportedPrice],
    o: &ImportOptions<'_>,
) -> Result<(usize, usize), CatalogError> {
    let (currency, now, skew) = (o.currency, o.now, o.skew);
    let book = load_book(&mut *pool.acquire().await?).await?;
    let mut tx = pool.begin().await?;
    let (mut added, mut unchanged) = (0, 0);
    for p in prices {
        let current = book.version_at(
            &p.provider,
            &p.model,
            None,
            Side::Cost,
            currency,
            DateTime::<Utc>::MAX_UTC,
        );
        if let Some(c) = current {
            let same = c.base == normalised(&p.base)
                && c.batch_discount == p.batch_discount
                && c.long_context_threshold_tokens == p.long_context_threshold_tokens
                && c.long == p.long;
            if same {
                unchanged += 1;
                continue;
            }
        }
        let new = NewPrice {
            provider: p.provider.clone(),
            model: p.model.clone(),
            region: String::new(),
            side: "cost".into(),
            currency: currency.into(),
            effective_from: Some(if current.is_some() {
                o.effective_from.unwrap_or(now + skew)
            } else {
                o.first_effective_from
            }),
            input_per_mtok: p.base.input.unwrap_or_default(),
            cached_input_per_mtok: p.base.cached_input,
            cache_write_per_mtok: p.base.cache_write,
            output_per_mtok: p.base.output.unwrap_or_default(),
            reasoning_per_mtok: p.base.reasoning,
            batch_discount: p.batch_discount,
            long_context_threshold_tokens: p.long_context_threshold_tokens,
            long_input_per_mtok: p.long.input,
            long_cached_input_per_mtok: p.long.cached_input,
            long_cache_write_per_mtok: p.long.cache_write,
            long_output_per_mtok: p.long.output,
            long_reasoning_per_mtok: p.long.reasoning,
            max_output_tokens: p.max_output_tokens,
            source: o.source.into(),
        };
        add_price(&mut tx, &new, now, skew).await?;
        added += 1;
    }
    tx.commit().await?;
    Ok((added, unchanged))
}

fn normalised(r: &RateSet) -> RateSet {
    RateSet {
        input: Some(r.input.unwrap_or_default()),
        output: Some(r.output.unwrap_or_default()),
        ..r.clone()
    }
}

/// A new markup rule; `tenant_id` none = global. It takes effect no earlier than now
/// plus the skew, unless no event it could apply to was ever recorded.
pub async fn add_markup(
    pool: &PgPool,
    tenant_id: Option<&str>,
    percent: Decimal,
    effective_from: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    skew: chrono::Duration,
) -> Result<MarkupRule, CatalogError> {
    if percent <= Decimal::from(-100) {
        return Err(CatalogError::InvalidPrice(
            "percent must be above -100".into(),
        ));
    }
    let earliest = now + skew;
    // A markup rule may be dated back only while nothing it could apply to was charged.
    let charged: bool = sqlx::query_scalar(
        "select exists (select 1 from events where $1::text is null or tenant_id = $1)",
    )
    .bind(tenant_id)
    .fetch_one(pool)
    .await?;
    let at = match effective_from {
        Some(t) if charged && t < earliest => {
            return Err(CatalogError::EffectiveInPast {
                earliest: earliest.to_rfc3339(),
            })
        }
        Some(t) => t,
        None => earliest,
    };
    let (id,): (i64,) = sqlx::query_as(
        "insert into markup_rules (tenant_id, percent, effective_from) values ($1, $2, $3) returning id",
    )
    .bind(tenant_id)
    .bind(percent)
    .bind(at)
    .fetch_one(pool)
    .await
    .map_err(|e| match e.as_database_error().and_then(|d| d.code()).as_deref() {
        Some("23503") => CatalogError::TenantNotFound(tenant_id.unwrap_or_default().to_string()),
        _ => CatalogError::Db(e),
    })?;
    Ok(MarkupRule {
        id,
        tenant_id: tenant_id.map(str::to_string),
        percent,
        effective_from: at,
    })
}

/// Price versions, newest first, optionally for one provider and/or model.
pub async fn list_versions(
    pool: &PgPool,
    provider: Option<&str>,
    model: Option<&str>,
) -> Result<Vec<PriceVersion>, CatalogError> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "select {COLUMNS} from price_versions where ($1::text is null or provider = $1)
           and ($2::text is null or model = $2) order by id desc limit 5000"
    ))
    .bind(provider)
    .bind(model)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(PriceVersion::from).collect())
}
