//! Pre-authorisation: before a request is routed, decide allow / downgrade / deny against
//! the tenant's budgets and place a hold for its worst-case cost on every budget in scope.
//!
//! Group commit: requests queue to one task per process, which takes whatever is waiting
//! (up to `MAX_BATCH`) and decides it in ONE transaction: it locks each tenant's head row
//! (the lock the ledger writer takes to append the tenant's events), reads spend and open
//! holds per budget once, decides the requests in arrival order in memory, and appends
//! every decision and hold in one statement. Because the writer adds spend and settles
//! holds under the same lock, spend + open holds is exact at every decision, so concurrent
//! authorisations can never together take a blocking budget past its limit; only usage
//! above its own hold (or usage without a hold) can, by at most what it exceeds.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::catalog::prices::load_book;
use crate::events::{Status, UsageData};
use crate::ledger::store::{self, BookStamp};
use crate::ledger::writer::terms_for;
use crate::pricing::budgets::{period_key, Budget, BudgetAction};
use crate::pricing::{rate, PriceBook};

/// Most requests decided in one transaction.
pub const MAX_BATCH: usize = 512;

/// Largest token counts accepted (the same cap as usage events).
const MAX_TOKENS: u64 = 100_000_000;

#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthRequest {
    /// Operator calls only: the tenant.
    pub tenant_id: Option<String>,
    pub api_key_id: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// A model, or a routing class (then the cheapest of its candidates at or above its
    /// quality floor whose worst case fits).
    pub model: String,
    /// Absent: the cheapest provider priced for the model.
    pub provider: Option<String>,
    pub region: Option<String>,
    pub estimated_input_tokens: u64,
    /// The most output tokens the request may produce; absent: the model's maximum output
    /// from the price book.
    pub max_tokens: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Downgrade,
    Deny,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct BudgetView {
    pub budget: String,
    pub period: String,
    pub action: BudgetAction,
    #[schema(value_type = String)]
    pub amount: Decimal,
    #[schema(value_type = String)]
    pub spent: Decimal,
    /// Open holds, this one included when it was placed.
    #[schema(value_type = String)]
    pub held: Decimal,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AuthDecision {
    /// Carry it as `authorization_id` in the usage event: that settles the hold.
    pub authorization_id: uuid::Uuid,
    pub decision: Verdict,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Worst-case customer price: estimated input plus `max_tokens` of output at list
    /// rates (the hold placed on each budget in scope).
    #[schema(value_type = Option<String>)]
    pub estimated_cost: Option<Decimal>,
    pub currency: String,
    /// The budget that denied (or downgraded) the request.
    pub denied_by: Option<String>,
    pub reason: String,
    pub expires_at: DateTime<Utc>,
    pub budgets: Vec<BudgetView>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("tenant {0:?} not found")]
    UnknownTenant(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the authorizer is not running")]
    Stopped,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

type Reply = oneshot::Sender<Result<AuthDecision, AuthError>>;

/// The handle the API uses; cheap to clone.
#[derive(Clone)]
pub struct Authorizer {
    tx: mpsc::Sender<(String, AuthRequest, Reply)>,
}

impl Authorizer {
    /// Start the group-commit task; it ends when every handle is dropped.
    pub fn start(pool: PgPool, hold_ttl: std::time::Duration) -> Authorizer {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let ttl = chrono::Duration::from_std(hold_ttl).unwrap_or(chrono::Duration::hours(1));
        tokio::spawn(run(pool, ttl, rx));
        Authorizer { tx }
    }

    pub async fn authorize(
        &self,
        tenant: String,
        req: AuthRequest,
    ) -> Result<AuthDecision, AuthError> {
        if req.estimated_input_tokens > MAX_TOKENS || req.max_tokens.is_some_and(|m| m > MAX_TOKENS)
        {
            return Err(AuthError::Invalid(format!(
                "token counts are capped at {MAX_TOKENS}"
            )));
        }
        check_strings(&req).map_err(AuthError::Invalid)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((tenant, req, reply))
            .await
            .map_err(|_| AuthError::Stopped)?;
        rx.await.map_err(|_| AuthError::Stopped)?
    }
}

/// The same string rules as usage events: non-empty, bounded, no control characters
/// (a NUL would fail the whole group's insert).
fn check_strings(req: &AuthRequest) -> Result<(), String> {
    use crate::events::{limits, string_problem};
    let one = |field: &str, v: &str, max: usize| match string_problem(v, max) {
        Some((_, m)) => Err(format!("{field} {m}")),
        None => Ok(()),
    };
    one("model", &req.model, limits::MODEL)?;
    if let Some(p) = &req.provider {
        one("provider", p, limits::PROVIDER)?;
    }
    if let Some(r) = &req.region {
        one("region", r, limits::REGION)?;
    }
    if let Some(k) = &req.api_key_id {
        one("api_key_id", k, limits::API_KEY)?;
    }
    if req.tags.len() > limits::TAGS {
        return Err(format!("at most {} tags", limits::TAGS));
    }
    for (k, v) in &req.tags {
        one("a tag key", k, limits::TAG_KEY_BYTES)?;
        one("a tag value", v, limits::TAG_VALUE_BYTES)?;
    }
    Ok(())
}

async fn run(
    pool: PgPool,
    ttl: chrono::Duration,
    mut rx: mpsc::Receiver<(String, AuthRequest, Reply)>,
) {
    let mut book = PriceBook::default();
    let mut stamp: BookStamp = -1;
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    let mut swept = std::time::Instant::now();
    while rx.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        if swept.elapsed() > std::time::Duration::from_secs(10) {
            // expired holds no longer count; drop them from the open-hold index
            swept = std::time::Instant::now();
            if let Err(e) = sqlx::query("delete from open_holds where expires_at < now()")
                .execute(&pool)
                .await
            {
                tracing::warn!(error = %e, "sweeping expired holds failed");
            }
        }
        let batch: Vec<_> = std::mem::take(&mut jobs);
        match decide_batch(&pool, &mut book, &mut stamp, ttl, &batch).await {
            Ok(results) => {
                for ((_, _, reply), r) in batch.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "authorisation batch failed");
                for (_, _, reply) in batch {
                    let _ = reply.send(Err(AuthError::Db(sqlx::Error::Protocol(format!(
                        "authorisation batch failed: {e}"
                    )))));
                }
            }
        }
    }
}

/// (tenant, budget, period)
type Key = (String, String, String);

/// Spend and open holds of one budget in one period, as the batch goes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Standing {
    pub spent: Decimal,
    pub held: Decimal,
}

/// The worst-case customer price of a request on one provider, or why it has none.
fn worst_case(
    book: &PriceBook,
    tenant: &str,
    currency: &str,
    provider: &str,
    req: &AuthRequest,
    max_tokens: u64,
    now: DateTime<Utc>,
) -> Result<Decimal, String> {
    let mut u = UsageData {
        tenant_id: tenant.to_string(),
        api_key_id: req.api_key_id.clone(),
        request_id: String::new(),
        provider_request_id: None,
        authorization_id: None,
        model: req.model.clone(),
        provider: provider.to_string(),
        region: req.region.clone(),
        input_tokens: req.estimated_input_tokens,
        cached_input_tokens: 0,
        cache_write_tokens: 0,
        output_tokens: max_tokens,
        reasoning_tokens: 0,
        batch: false,
        status: Status::Ok,
        latency_ms: 0,
        fallback_from: Vec::new(),
        estimated: true,
        estimate_method: None,
        tags: BTreeMap::new(),
    };
    let terms = terms_for(book, &u, currency, now).map_err(|e| e.to_string())?;
    let plain = rate(&u, terms).map_err(|e| e.to_string())?.price;
    // output may all be reasoning, which can be priced higher
    u.reasoning_tokens = max_tokens;
    let reasoning = rate(&u, terms).map_err(|e| e.to_string())?.price;
    Ok(plain.max(reasoning))
}

/// Decide one request against the standings (updated in place when a hold is placed).
/// Pure: the batch task and the tests share it.
pub fn decide(
    book: &PriceBook,
    tenant: &str,
    currency: &str,
    req: &AuthRequest,
    standings: &mut HashMap<Key, Standing>,
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> Result<(AuthDecision, Vec<(Key, Decimal)>), AuthError> {
    // candidates: a routing class's (at or above its floor), or the model on the named
    // provider, or on every provider priced for it
    let class = match &req.provider {
        None => book.class_at(tenant, &req.model, now),
        Some(_) => None,
    };
    let candidates: Vec<(String, String)> = match (class, &req.provider) {
        (Some(c), _) => crate::pricing::routing::eligible(c)
            .into_iter()
            .map(|(p, m, _)| (p, m))
            .collect(),
        (None, Some(p)) => vec![(p.clone(), req.model.clone())],
        (None, None) => book
            .providers_for(&req.model, currency, now)
            .into_iter()
            .map(|p| (p, req.model.clone()))
            .collect(),
    };
    // the most output a request may produce: max_tokens, else the model's maximum
    let max_out = |p: &str, m: &str| {
        req.max_tokens.or_else(|| {
            book.version_at(
                p,
                m,
                req.region.as_deref(),
                crate::pricing::Side::Cost,
                currency,
                now,
            )
            .and_then(|v| v.max_output_tokens)
        })
    };
    let mut best: Option<(Decimal, String, String)> = None;
    let mut why = format!("no price for model {:?} in {currency}", req.model);
    for (p, m) in &candidates {
        let Some(max_tokens) = max_out(p, m) else {
            why = format!(
                "max_tokens is required: the maximum output of {p}/{m} is not in the price book"
            );
            continue;
        };
        let mut alt = req.clone();
        alt.model = m.clone();
        match worst_case(book, tenant, currency, p, &alt, max_tokens, now) {
            Ok(c) if best.as_ref().is_none_or(|(b, _, _)| c < *b) => {
                best = Some((c, p.clone(), m.clone()))
            }
            Ok(_) => {}
            Err(e) => why = e,
        }
    }
    let Some((cost, provider, chosen)) = best else {
        return Err(AuthError::Invalid(why));
    };
    let budgets: Vec<&Budget> = book
        .budgets_at(tenant, now)
        .into_iter()
        .filter(|b| b.matches(req.api_key_id.as_deref(), &req.tags))
        .collect();
    let key = |b: &Budget| {
        (
            tenant.to_string(),
            b.name.clone(),
            period_key(b.period, now),
        )
    };
    // the first gating budget this cost would take past its limit
    let exceeded = |cost: Decimal, standings: &HashMap<Key, Standing>| {
        budgets.iter().copied().find(|b| {
            b.action != BudgetAction::Alert && {
                let s = standings.get(&key(b)).copied().unwrap_or_default();
                s.spent + s.held + cost > b.amount
            }
        })
    };
    let mut verdict = Verdict::Allow;
    let mut denied_by = None;
    let mut reason = "within every budget in scope".to_string();
    let (mut cost, mut provider, mut model) = (cost, provider, chosen);
    if let Some(b) = exceeded(cost, standings) {
        let s = standings.get(&key(b)).copied().unwrap_or_default();
        denied_by = Some(b.name.clone());
        reason = format!(
            "budget {:?} would be exceeded (spent {} + held {} + this request's worst case {} > {})",
            b.name, s.spent, s.held, cost, b.amount
        );
        verdict = Verdict::Deny;
        if let (BudgetAction::Downgrade, Some(class)) = (b.action, &b.downgrade_class) {
            // the cheapest candidate of the downgrade class that fits every budget
            let mut best: Option<(Decimal, String, String)> = None;
            if let Some(c) = book.class_at(tenant, class, now) {
                for (p, m, _) in crate::pricing::routing::eligible(c) {
                    let mut alt = req.clone();
                    alt.model = m.clone();
                    let Some(max_tokens) = max_out(&p, &m) else {
                        continue;
                    };
                    if let Ok(w) = worst_case(book, tenant, currency, &p, &alt, max_tokens, now) {
                        if exceeded(w, standings).is_none()
                            && best.as_ref().is_none_or(|(x, _, _)| w < *x)
                        {
                            best = Some((w, p, m));
                        }
                    }
                }
            }
            match best {
                Some((w, p, m)) => {
                    verdict = Verdict::Downgrade;
                    reason = format!("{reason}; downgraded to {p}/{m} of class {class:?}");
                    (cost, provider, model) = (w, p, m);
                }
                None => {
                    reason = format!("{reason}; no candidate of downgrade class {class:?} fits");
                }
            }
        }
    }
    let mut holds = Vec::new();
    if verdict != Verdict::Deny {
        for b in &budgets {
            let k = key(b);
            standings.entry(k.clone()).or_default().held += cost;
            holds.push((k, cost));
        }
    }
    let views = budgets
        .iter()
        .map(|b| {
            let s = standings.get(&key(b)).copied().unwrap_or_default();
            BudgetView {
                budget: b.name.clone(),
                period: period_key(b.period, now),
                action: b.action,
                amount: b.amount,
                spent: s.spent,
                held: s.held,
            }
        })
        .collect();
    let allowed = verdict != Verdict::Deny;
    Ok((
        AuthDecision {
            authorization_id: uuid::Uuid::now_v7(),
            decision: verdict,
            provider: allowed.then(|| provider.clone()),
            model: allowed.then(|| model.clone()),
            estimated_cost: Some(cost.normalize()),
            currency: currency.to_string(),
            denied_by,
            reason,
            expires_at: now + ttl,
            budgets: views,
        },
        holds,
    ))
}

async fn decide_batch(
    pool: &PgPool,
    book: &mut PriceBook,
    stamp: &mut BookStamp,
    ttl: chrono::Duration,
    batch: &[(String, AuthRequest, Reply)],
) -> Result<Vec<Result<AuthDecision, AuthError>>, sqlx::Error> {
    let mut tenants: Vec<String> = batch.iter().map(|(t, _, _)| t.clone()).collect();
    tenants.sort();
    tenants.dedup();
    let mut tx = pool.begin().await?;
    // authorisers (in every process) take turns per tenant; the writer is not waited for:
    // one statement reads spend and open holds from one snapshot, in which a usage event
    // has either added its spend and removed its hold, or done neither
    let (locked, book_stamp) = store::lock_tenants_for_authorization(&mut tx, &tenants).await?;
    if let Some(s) = book_stamp.filter(|s| s != stamp) {
        *book = load_book(&mut tx).await?;
        *stamp = s;
    }
    let now = Utc::now();
    // every budget in force for these tenants, with its spend and open holds
    let mut keys: Vec<Key> = Vec::new();
    for t in locked.keys() {
        for b in book.budgets_at(t, now) {
            keys.push((t.clone(), b.name.clone(), period_key(b.period, now)));
        }
    }
    let mut standings: HashMap<Key, Standing> = HashMap::new();
    if !keys.is_empty() {
        let rows: Vec<(String, String, String, Decimal, Decimal)> = sqlx::query_as(
            "select k.t, k.b, k.p, coalesce(s.spent, 0),
               coalesce((select sum(h.amount) from open_holds h
                 where h.tenant_id = k.t and h.budget = k.b and h.period = k.p
                   and h.expires_at > $4), 0)
             from unnest($1::text[], $2::text[], $3::text[]) as k(t, b, p)
             left join budget_spend s on s.tenant_id = k.t and s.budget = k.b and s.period = k.p",
        )
        .bind(keys.iter().map(|k| k.0.clone()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.1.clone()).collect::<Vec<_>>())
        .bind(keys.iter().map(|k| k.2.clone()).collect::<Vec<_>>())
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for (t, b, p, spent, held) in rows {
            standings.insert((t, b, p), Standing { spent, held });
        }
    }
    let mut rows = Rows::default();
    let mut out = Vec::with_capacity(batch.len());
    for (tenant, req, _) in batch {
        let Some((_, currency)) = locked.get(tenant) else {
            out.push(Err(AuthError::UnknownTenant(tenant.clone())));
            continue;
        };
        match decide(book, tenant, currency, req, &mut standings, now, ttl) {
            Ok((d, holds)) => {
                if let Some(name) = &d.denied_by {
                    if let Some(b) = book
                        .budgets_at(tenant, now)
                        .into_iter()
                        .find(|b| &b.name == name)
                    {
                        rows.action_taken(tenant, req, &d, b, now);
                    }
                }
                rows.add(tenant, req, &d, holds);
                out.push(Ok(d));
            }
            Err(e) => out.push(Err(e)),
        }
    }
    rows.write(&mut tx).await?;
    tx.commit().await?;
    Ok(out)
}

/// Decisions and holds of one batch, column by column.
#[derive(Default)]
struct Rows {
    id: Vec<uuid::Uuid>,
    tenant: Vec<String>,
    key: Vec<Option<String>>,
    tags: Vec<String>,
    req_model: Vec<String>,
    req_provider: Vec<Option<String>>,
    decision: Vec<String>,
    provider: Vec<Option<String>>,
    model: Vec<Option<String>>,
    input: Vec<i64>,
    max_tokens: Vec<i64>,
    cost: Vec<Option<Decimal>>,
    currency: Vec<String>,
    denied_by: Vec<Option<String>>,
    reason: Vec<String>,
    expires: Vec<DateTime<Utc>>,
    h_id: Vec<uuid::Uuid>,
    h_tenant: Vec<String>,
    h_budget: Vec<String>,
    h_period: Vec<String>,
    h_amount: Vec<Decimal>,
    h_expires: Vec<DateTime<Utc>>,
    a_tenant: Vec<String>,
    a_key: Vec<String>,
    a_payload: Vec<String>,
    a_at: Vec<DateTime<Utc>>,
}

impl Rows {
    fn add(
        &mut self,
        tenant: &str,
        req: &AuthRequest,
        d: &AuthDecision,
        holds: Vec<(Key, Decimal)>,
    ) {
        self.id.push(d.authorization_id);
        self.tenant.push(tenant.to_string());
        self.key.push(req.api_key_id.clone());
        self.tags
            .push(serde_json::to_string(&req.tags).unwrap_or_else(|_| "{}".into()));
        self.req_model.push(req.model.clone());
        self.req_provider.push(req.provider.clone());
        self.decision.push(
            match d.decision {
                Verdict::Allow => "allow",
                Verdict::Downgrade => "downgrade",
                Verdict::Deny => "deny",
            }
            .into(),
        );
        self.provider.push(d.provider.clone());
        self.model.push(d.model.clone());
        self.input.push(req.estimated_input_tokens as i64);
        self.max_tokens
            .push(req.max_tokens.unwrap_or_default() as i64);
        self.cost.push(d.estimated_cost);
        self.currency.push(d.currency.clone());
        self.denied_by.push(d.denied_by.clone());
        self.reason.push(d.reason.clone());
        self.expires.push(d.expires_at);
        for ((_, budget, period), amount) in holds {
            self.h_id.push(d.authorization_id);
            self.h_tenant.push(tenant.to_string());
            self.h_budget.push(budget);
            self.h_period.push(period);
            self.h_amount.push(amount);
            self.h_expires.push(d.expires_at);
        }
    }

    /// A `budget.action_taken` alert fact: the first time in a budget's period that it
    /// blocked or downgraded a request (recorded with the decision, once per action).
    fn action_taken(
        &mut self,
        tenant: &str,
        req: &AuthRequest,
        d: &AuthDecision,
        b: &Budget,
        now: DateTime<Utc>,
    ) {
        let action = match d.decision {
            Verdict::Deny => "blocked",
            Verdict::Downgrade => "downgraded",
            Verdict::Allow => return,
        };
        let period = period_key(b.period, now);
        let view = d.budgets.iter().find(|v| v.budget == b.name);
        let payload = serde_json::json!({
            "budget": b.name, "budget_version": b.id, "scope": b.scope,
            "scope_value": b.scope_value, "period": period, "period_kind": b.period,
            "amount": b.amount.normalize().to_string(),
            "spent": view.map(|v| v.spent.normalize().to_string()),
            "held": view.map(|v| v.held.normalize().to_string()),
            "action": action, "budget_action": b.action,
            "authorization_id": d.authorization_id,
            "api_key_id": req.api_key_id,
            "requested_model": req.model, "requested_provider": req.provider,
            "downgraded_to": (d.decision == Verdict::Downgrade).then(|| {
                format!("{}/{}", d.provider.as_deref().unwrap_or_default(), d.model.as_deref().unwrap_or_default())
            }),
            "estimated_cost": d.estimated_cost.map(|c| c.normalize().to_string()),
            "reason": d.reason,
        });
        self.a_tenant.push(tenant.to_string());
        self.a_key.push(format!("{}/{period}/{action}", b.name));
        self.a_payload.push(payload.to_string());
        self.a_at.push(now);
    }

    async fn write(&self, c: &mut sqlx::PgConnection) -> sqlx::Result<()> {
        if self.id.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "with a as (insert into authorizations (id, tenant_id, api_key_id, tags, requested_model,
                 requested_provider, decision, provider, model, estimated_input_tokens, max_tokens,
                 estimated_cost, currency, denied_by, reason, expires_at)
               select i, t, k, g::jsonb, rm, rp, d, p, m, n, x, c, cu, db, r, e
               from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::text[], $8::text[], $9::text[], $10::int8[], $11::int8[], $12::numeric[],
                 $13::text[], $14::text[], $15::text[], $16::timestamptz[])
                 as u(i, t, k, g, rm, rp, d, p, m, n, x, c, cu, db, r, e)
               returning 1)
             , h as (insert into auth_hold_budgets (hold_id, tenant_id, budget, period, amount, expires_at)
               select * from unnest($17::uuid[], $18::text[], $19::text[], $20::text[],
                 $21::numeric[], $22::timestamptz[])
               returning 1)
             , f as (insert into alert_facts (tenant_id, type, unique_key, payload, occurred_at)
               select t, 'budget.action_taken', k, p::jsonb, o
               from unnest($23::text[], $24::text[], $25::text[], $26::timestamptz[]) as x(t, k, p, o)
               on conflict (tenant_id, type, unique_key) do nothing)
             insert into open_holds (hold_id, tenant_id, budget, period, amount, expires_at)
             select * from unnest($17::uuid[], $18::text[], $19::text[], $20::text[], $21::numeric[],
               $22::timestamptz[])",
        )
        .bind(&self.id)
        .bind(&self.tenant)
        .bind(&self.key)
        .bind(&self.tags)
        .bind(&self.req_model)
        .bind(&self.req_provider)
        .bind(&self.decision)
        .bind(&self.provider)
        .bind(&self.model)
        .bind(&self.input)
        .bind(&self.max_tokens)
        .bind(&self.cost)
        .bind(&self.currency)
        .bind(&self.denied_by)
        .bind(&self.reason)
        .bind(&self.expires)
        .bind(&self.h_id)
        .bind(&self.h_tenant)
        .bind(&self.h_budget)
        .bind(&self.h_period)
        .bind(&self.h_amount)
        .bind(&self.h_expires)
        .bind(&self.a_tenant)
        .bind(&self.a_key)
        .bind(&self.a_payload)
        .bind(&self.a_at)
        .execute(c)
        .await?;
        Ok(())
    }
}
