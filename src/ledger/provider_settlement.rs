//! The per-period settlement of our own provider terms (see `pricing::provider`): for a
//! month that has ended, read each provider's list cost and reservation coverage from the
//! record, compute what our commitments and reservations with it are worth, and post the
//! result as transfers held by the operator (`_operator`, a holder no tenant id can be),
//! recorded in `provider_settlements` with the inputs and the versions used. Run again
//! (usage of the month recorded later), it posts a new revision with only the change.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::accounts::{payable, COGS};
use crate::catalog::provider_commitments::SETTLEMENT_LOCK;
use crate::pricing::provider::{
    coverage, in_force, settle, MinuteUsage, ModelInputs, SettlementFigures, SettlementInputs,
    KINDS,
};
use crate::pricing::reservations::Reservation;
use crate::pricing::PriceBook;

/// The holder of the operator's own entries (the tenant id column of `transfers` and
/// `account_balances`): tenant ids start with `[a-z0-9]`, so no tenant can be it.
pub const OPERATOR: &str = "_operator";

/// One recorded settlement revision.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Settlement {
    pub id: i64,
    pub provider: String,
    pub period: String,
    pub currency: String,
    pub revision: i32,
    pub inputs: SettlementInputs,
    pub figures: SettlementFigures,
    /// What this revision moved per transfer kind (the change from the previous one;
    /// negative: moved the other way).
    #[schema(value_type = BTreeMap<String, String>)]
    pub moved: BTreeMap<String, Decimal>,
    pub created_at: DateTime<Utc>,
}

/// Our provider reservations: per (provider, model), each reservation's versions by name
/// (in effective order), and each version's currency.
struct ProviderReservations {
    by_model: BTreeMap<(String, String), BTreeMap<String, Vec<Reservation>>>,
    currency: BTreeMap<i64, String>,
}

impl ProviderReservations {
    async fn load(c: &mut PgConnection) -> sqlx::Result<ProviderReservations> {
        let mut r = ProviderReservations {
            by_model: BTreeMap::new(),
            currency: BTreeMap::new(),
        };
        for (v, cur) in crate::catalog::reservations::load_provider_with_currency(c).await? {
            r.currency.insert(v.id, cur);
            r.by_model
                .entry((v.provider.clone(), v.model.clone()))
                .or_default()
                .entry(v.name.clone())
                .or_default()
                .push(v);
        }
        Ok(r)
    }

    fn providers(&self, before: DateTime<Utc>) -> impl Iterator<Item = &str> {
        self.by_model
            .iter()
            .filter(move |(_, names)| {
                names
                    .values()
                    .any(|v| v.first().is_some_and(|v| v.effective_from < before))
            })
            .map(|(k, _)| k.0.as_str())
    }

    /// (name, model, versions) of a provider's reservations whose fees are in a currency
    /// (every version of a reservation is in one currency).
    fn fees_of(&self, provider: &str, currency: &str) -> Vec<(String, String, Vec<&Reservation>)> {
        let mut out = Vec::new();
        for ((p, model), names) in &self.by_model {
            if p != provider {
                continue;
            }
            for (name, versions) in names {
                let cur = versions.first().and_then(|v| self.currency.get(&v.id));
                if cur.map(String::as_str) == Some(currency) {
                    out.push((name.clone(), model.clone(), versions.iter().collect()));
                }
            }
        }
        out
    }

    /// Each reservation's chain of versions for a model.
    fn chains(&self, provider: &str, model: &str) -> Vec<Vec<&Reservation>> {
        self.by_model
            .get(&(provider.to_string(), model.to_string()))
            .map(|names| names.values().map(|v| v.iter().collect()).collect())
            .unwrap_or_default()
    }

    /// The currencies of a provider's reservations in force (active) at some point of the
    /// month `[start, end)`.
    fn currencies_of(
        &self,
        provider: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for ((p, _), names) in &self.by_model {
            if p != provider {
                continue;
            }
            for versions in names.values() {
                let overlaps = versions.iter().enumerate().any(|(i, v)| {
                    let to = versions.get(i + 1).map_or(end, |n| n.effective_from);
                    v.active && v.effective_from < end && to > start
                });
                if overlaps {
                    if let Some(c) = versions.first().and_then(|v| self.currency.get(&v.id)) {
                        out.insert(c.clone());
                    }
                }
            }
        }
        out
    }
}

/// Compute the figures of stored inputs under the versions in force for their month (the
/// settlement and `verify` both use this).
fn figures_of(
    book: &PriceBook,
    res: &ProviderReservations,
    inputs: &SettlementInputs,
) -> Option<SettlementFigures> {
    let start = crate::pricing::tiers::period_start(&inputs.period)?;
    let end = crate::pricing::tiers::period_end(&inputs.period)?;
    let last = end - chrono::Duration::nanoseconds(1);
    let commitments = in_force(
        book.provider_commitment_versions(&inputs.provider),
        &inputs.currency,
        last,
    );
    let fees = res.fees_of(&inputs.provider, &inputs.currency);
    Some(settle(inputs, &commitments, &fees, start, end))
}

fn empty_inputs(provider: &str, period: &str, currency: &str) -> SettlementInputs {
    SettlementInputs {
        provider: provider.to_string(),
        period: period.to_string(),
        currency: currency.to_string(),
        models: Vec::new(),
    }
}

type Latest = (
    String,
    String,
    i32,
    sqlx::types::Json<SettlementInputs>,
    sqlx::types::Json<SettlementFigures>,
);

/// The newest revision per (provider, currency) of a month.
async fn latest_of(
    c: &mut PgConnection,
    period: &str,
) -> sqlx::Result<BTreeMap<(String, String), (i32, SettlementInputs, SettlementFigures)>> {
    let rows: Vec<Latest> = sqlx::query_as(
        "select distinct on (provider, currency) provider, currency::text, revision, inputs, figures
         from provider_settlements where period = $1
         order by provider, currency, revision desc",
    )
    .bind(period)
    .fetch_all(&mut *c)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(p, c, r, i, f)| ((p, c), (r, i.0, f.0)))
        .collect())
}

/// Settle every provider we hold a commitment or reservation with for an ended month.
/// Returns the revisions recorded (none when nothing changed since the last run). The
/// month's events are read first, without locks; the posting takes the settlement lock
/// (and a share of the writers' table lock, so no rebuild swaps in meanwhile) briefly.
pub async fn settle_period(
    pool: &PgPool,
    period: &str,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<Settlement>> {
    let (Some(start), Some(end)) = (
        crate::pricing::tiers::period_start(period),
        crate::pricing::tiers::period_end(period),
    ) else {
        anyhow::bail!("period must be YYYY-MM");
    };
    anyhow::ensure!(end <= now, "period {period} has not ended");
    let mut c = pool.acquire().await?;
    let book = crate::catalog::prices::load_book(&mut c).await?;
    let res = ProviderReservations::load(&mut c).await?;
    let last = end - chrono::Duration::nanoseconds(1);
    let mut providers: BTreeSet<String> = book
        .committed_providers()
        .filter(|p| {
            book.provider_commitment_versions(p)
                .first()
                .is_some_and(|c| c.effective_from < end)
        })
        .map(str::to_string)
        .collect();
    providers.extend(res.providers(end).map(str::to_string));
    if providers.is_empty() {
        return Ok(Vec::new());
    }
    let providers: Vec<String> = providers.into_iter().collect();
    let latest = latest_of(&mut c, period).await?;
    // the month's list cost per (provider, currency), from the rollups: a cheap check first
    let totals: Vec<(String, String, Decimal)> = sqlx::query_as(
        "select provider, currency::text, sum(cost_amount) from usage_rollups
         where day >= $1::date and day < $2::date and provider = any($3)
         group by 1, 2",
    )
    .bind(start.date_naive())
    .bind(end.date_naive())
    .bind(&providers)
    .fetch_all(&mut *c)
    .await?;
    let total = |p: &str, cur: &str| {
        totals
            .iter()
            .find(|(tp, tc, _)| tp == p && tc == cur)
            .map_or(Decimal::ZERO, |t| t.2)
    };
    // the (provider, currency) pairs to settle: with usage, or with terms in the month
    let mut pairs: BTreeSet<(String, String)> = totals
        .iter()
        .map(|(p, c, _)| (p.clone(), c.clone()))
        .collect();
    for p in &providers {
        for v in book.provider_commitment_versions(p) {
            if !in_force(book.provider_commitment_versions(p), &v.currency, last).is_empty() {
                pairs.insert((p.clone(), v.currency.clone()));
            }
        }
        for cur in res.currencies_of(p, start, end) {
            pairs.insert((p.clone(), cur));
        }
    }
    // nothing new since the last run: every pair settled on the same list cost, or with
    // nothing to settle
    let unchanged = pairs
        .iter()
        .all(|(p, cur)| match latest.get(&(p.clone(), cur.clone())) {
            Some((_, i, _)) => i.list_cost() == total(p, cur),
            None => {
                total(p, cur).is_zero()
                    && figures_of(&book, &res, &empty_inputs(p, period, cur))
                        .is_none_or(|f| f.by_kind().iter().all(|a| a.is_zero()))
            }
        });
    if unchanged {
        return Ok(Vec::new());
    }
    let inputs = read_inputs(&mut c, &providers, &res, start, end, period).await?;
    drop(c);

    let mut tx = pool.begin().await?;
    sqlx::query(SETTLEMENT_LOCK).execute(&mut *tx).await?;
    sqlx::query("lock table tenant_heads in row share mode")
        .execute(&mut *tx)
        .await?;
    // what another run may have posted meanwhile, and the terms as they are now
    let latest = latest_of(&mut tx, period).await?;
    let book = crate::catalog::prices::load_book(&mut tx).await?;
    let res = ProviderReservations::load(&mut tx).await?;
    let mut out = Vec::new();
    for (provider, currency) in pairs {
        let key = (provider.clone(), currency.clone());
        let inputs = inputs
            .get(&key)
            .cloned()
            .unwrap_or_else(|| empty_inputs(&provider, period, &currency));
        let Some(figures) = figures_of(&book, &res, &inputs) else {
            continue;
        };
        let before = latest.get(&key);
        if before.is_some_and(|(_, i, f)| *i == inputs && *f == figures) {
            continue;
        }
        let prev = before.map_or([Decimal::ZERO; 4], |(_, _, f)| f.by_kind());
        let now_ = figures.by_kind();
        if before.is_none() && now_.iter().all(|a| a.is_zero()) && inputs.models.is_empty() {
            continue;
        }
        let revision = before.map_or(1, |(r, ..)| r + 1);
        let (id, created_at): (i64, DateTime<Utc>) = sqlx::query_as(
            "insert into provider_settlements (provider, period, currency, revision, inputs, figures)
             values ($1, $2, $3, $4, $5, $6) returning id, created_at",
        )
        .bind(&provider)
        .bind(period)
        .bind(&currency)
        .bind(revision)
        .bind(sqlx::types::Json(&inputs))
        .bind(sqlx::types::Json(&figures))
        .fetch_one(&mut *tx)
        .await?;
        let mut moved = BTreeMap::new();
        let (mut kind, mut debit, mut credit, mut amount) = (vec![], vec![], vec![], vec![]);
        for (i, (k, owed)) in KINDS.iter().enumerate() {
            let delta = now_[i] - prev[i];
            if delta.is_zero() {
                continue;
            }
            moved.insert(k.to_string(), delta.normalize());
            // owed to the provider: cogs -> payable; a credit to us the other way
            let (d, c) = if *owed == (delta > Decimal::ZERO) {
                (COGS.to_string(), payable(&provider))
            } else {
                (payable(&provider), COGS.to_string())
            };
            kind.push(k.to_string());
            debit.push(d);
            credit.push(c);
            amount.push(delta.abs());
        }
        sqlx::query(
            "with t as (insert into transfers (tenant_id, seq, leg, kind, debit_account,
                          credit_account, amount, currency)
                        select $1, $2, (n - 1)::int2, k, d, c, a, $3
                        from unnest($4::text[], $5::text[], $6::text[], $7::numeric[])
                          with ordinality as x(k, d, c, a, n))
             insert into account_balances as b (tenant_id, account, currency, balance)
             select $1, acc, $3, sum(v) from (
               select d as acc, a as v from unnest($5::text[], $7::numeric[]) as x(d, a)
               union all
               select c, -a from unnest($6::text[], $7::numeric[]) as x(c, a)) m
             group by acc
             on conflict (tenant_id, account, currency) do update set balance = b.balance + excluded.balance",
        )
        .bind(OPERATOR)
        .bind(id)
        .bind(&currency)
        .bind(&kind)
        .bind(&debit)
        .bind(&credit)
        .bind(&amount)
        .execute(&mut *tx)
        .await?;
        out.push(Settlement {
            id,
            provider,
            period: period.to_string(),
            currency,
            revision,
            inputs,
            figures,
            moved,
            created_at,
        });
    }
    tx.commit().await?;
    Ok(out)
}

/// Per (provider, currency): each model's list cost in the month and what our provider
/// reservations covered, from the record (usage events and their `usage_cost` transfers;
/// minute by minute for reserved models).
async fn read_inputs(
    c: &mut PgConnection,
    providers: &[String],
    res: &ProviderReservations,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    period: &str,
) -> sqlx::Result<BTreeMap<(String, String), SettlementInputs>> {
    let (rp, rm): (Vec<String>, Vec<String>) = res.by_model.keys().cloned().unzip();
    type MinuteRow = (String, String, String, Option<DateTime<Utc>>, i64, Decimal);
    let rows: Vec<MinuteRow> = sqlx::query_as(
        "select e.provider, e.model, x.currency::text,
           case when (e.provider, e.model) in (select * from unnest($4::text[], $5::text[]))
                then date_trunc('minute', e.occurred_at) end,
           sum(e.input_tokens + e.output_tokens)::int8, sum(x.amount)
         from events e
         join transfers x on x.tenant_id = e.tenant_id and x.seq = e.seq and x.kind = 'usage_cost'
         where e.type = 'tokenledger.usage.v1' and e.occurred_at >= $1 and e.occurred_at < $2
           and e.provider = any($3)
         group by 1, 2, 3, 4",
    )
    .bind(start)
    .bind(end)
    .bind(providers)
    .bind(&rp)
    .bind(&rm)
    .fetch_all(&mut *c)
    .await?;
    // every currency's tokens fill a reservation's minute
    let mut minute_tokens: BTreeMap<(String, String, DateTime<Utc>), u64> = BTreeMap::new();
    for (p, m, _, minute, tokens, _) in &rows {
        if let Some(minute) = minute {
            *minute_tokens
                .entry((p.clone(), m.clone(), *minute))
                .or_default() += *tokens as u64;
        }
    }
    let mut per_model: BTreeMap<(String, String, String), (Decimal, Vec<MinuteUsage>)> =
        BTreeMap::new();
    for (p, m, cur, minute, tokens, cost) in rows {
        let e = per_model
            .entry((p.clone(), cur, m.clone()))
            .or_insert((Decimal::ZERO, Vec::new()));
        e.0 += cost;
        if let Some(minute) = minute {
            e.1.push(MinuteUsage {
                minute,
                tokens: minute_tokens[&(p, m, minute)],
                cost,
                own_tokens: tokens as u64,
            });
        }
    }
    let mut out: BTreeMap<(String, String), SettlementInputs> = BTreeMap::new();
    for ((p, cur, m), (list_cost, mut minutes)) in per_model {
        minutes.sort_by_key(|x| x.minute);
        let (covered_tokens, covered_cost) = coverage(&res.chains(&p, &m), &minutes);
        out.entry((p.clone(), cur.clone()))
            .or_insert_with(|| SettlementInputs {
                provider: p.clone(),
                period: period.to_string(),
                currency: cur.clone(),
                models: Vec::new(),
            })
            .models
            .push(ModelInputs {
                model: m,
                list_cost: list_cost.normalize(),
                covered_tokens,
                covered_cost,
            });
    }
    Ok(out)
}

type SettlementRow = (
    i64,
    String,
    String,
    String,
    i32,
    sqlx::types::Json<SettlementInputs>,
    sqlx::types::Json<SettlementFigures>,
    DateTime<Utc>,
);

/// Recorded settlement revisions, newest first, optionally of one month and provider.
pub async fn list(
    pool: &PgPool,
    period: Option<&str>,
    provider: Option<&str>,
) -> sqlx::Result<Vec<Settlement>> {
    let rows: Vec<SettlementRow> = sqlx::query_as(
        "select id, provider, period, currency::text, revision, inputs, figures, created_at
         from provider_settlements
         where ($1::text is null or period = $1) and ($2::text is null or provider = $2)
         order by id desc limit 1000",
    )
    .bind(period)
    .bind(provider)
    .fetch_all(pool)
    .await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let moves: Vec<(i64, String, String, Decimal)> = sqlx::query_as(
        "select seq, kind, debit_account, amount from transfers
         where tenant_id = $1 and seq = any($2) order by seq, leg",
    )
    .bind(OPERATOR)
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, provider, period, currency, revision, i, f, created_at)| {
                let moved = moves
                    .iter()
                    .filter(|m| m.0 == id)
                    .map(|(_, k, d, a)| (k.clone(), signed(k, d, *a)))
                    .collect();
                Settlement {
                    id,
                    provider,
                    period,
                    currency,
                    revision,
                    inputs: i.0,
                    figures: f.0,
                    moved,
                    created_at,
                }
            },
        )
        .collect())
}

/// A settlement transfer's amount signed as its kind's figure moved: positive when it
/// moved the way the kind is owed or credited.
fn signed(kind: &str, debit: &str, amount: Decimal) -> Decimal {
    let owed = KINDS.iter().find(|k| k.0 == kind).is_some_and(|k| k.1);
    if owed == (debit == COGS) {
        amount
    } else {
        -amount
    }
}

/// `verify`: each revision's figures follow from its inputs under the versions in force
/// for its month, and the transfers of each (provider, month, currency) add up to its
/// newest revision's figures.
pub async fn check(c: &mut PgConnection, book: &PriceBook) -> anyhow::Result<Vec<String>> {
    let res = ProviderReservations::load(&mut *c).await?;
    let rows: Vec<SettlementRow> = sqlx::query_as(
        "select id, provider, period, currency::text, revision, inputs, figures, created_at
         from provider_settlements order by provider, period, currency, revision",
    )
    .fetch_all(&mut *c)
    .await?;
    let moves: Vec<(i64, String, String, Decimal)> = sqlx::query_as(
        "select seq, kind, debit_account, amount from transfers where tenant_id = $1",
    )
    .bind(OPERATOR)
    .fetch_all(&mut *c)
    .await?;
    let mut sums: BTreeMap<(String, String, String), BTreeMap<String, Decimal>> = BTreeMap::new();
    let mut newest: BTreeMap<(String, String, String), SettlementFigures> = BTreeMap::new();
    let mut out = Vec::new();
    for (id, provider, period, currency, revision, i, f, _) in rows {
        match figures_of(book, &res, &i.0) {
            Some(x) if x == f.0 => {}
            x => out.push(format!(
                "provider settlement {provider} {period} {currency} revision {revision}: stored figures {} but its inputs give {}",
                serde_json::to_string(&f.0)?,
                serde_json::to_string(&x)?
            )),
        }
        let key = (provider, period, currency);
        let s = sums.entry(key.clone()).or_default();
        for (_, k, d, a) in moves.iter().filter(|m| m.0 == id) {
            *s.entry(k.clone()).or_default() += signed(k, d, *a);
        }
        newest.insert(key, f.0);
    }
    for (key, f) in newest {
        let s = &sums[&key];
        for ((k, _), want) in KINDS.iter().zip(f.by_kind()) {
            let got = s.get(*k).copied().unwrap_or_default();
            if got != want {
                out.push(format!(
                    "provider settlement {} {} {}: {k} transfers sum to {got}, its figures say {want}",
                    key.0, key.1, key.2
                ));
            }
        }
    }
    Ok(out)
}
