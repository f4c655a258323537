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
//!
//! Leases (the router's path, `authorize_leased`): a process that authorises for a tenant
//! also takes, in that transaction, a lease on each blocking budget in force — one hold of
//! half the budget's remaining headroom — and then grants requests against it in memory,
//! with no database round trip: a request is allowed locally when its worst case fits in
//! what is left of the lease of every blocking budget in scope. Grants are written behind
//! (a flush per batch of grants, within milliseconds): each becomes its decision and holds,
//! and draws its worst case out of the lease's hold, so spend + open holds (leases
//! included) stays within the limit exactly as before. Anything the lease cannot grant
//! (no lease, not enough left, a denial or downgrade) takes the exact path, which first
//! writes the pending grants and releases the process's leases of that tenant, so the
//! decision sees the whole remaining headroom. Leases expire after `LEASE_TTL` and are
//! renewed when half used or near expiry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::catalog::prices::load_book;
use crate::events::{Status, UsageData};
use crate::ledger::store::{self, BookStamp};
use crate::ledger::writer::terms_for;
use crate::pricing::budgets::{period_key, Budget, BudgetAction};
use crate::pricing::{rate, PriceBook};

/// Most requests decided in one transaction.
pub const MAX_BATCH: usize = 512;

/// How long a budget lease's hold lasts; a lease is used only while more than
/// `LEASE_MARGIN` of it is left, and renewed when less than half of it is.
pub const LEASE_TTL: chrono::Duration = chrono::Duration::seconds(120);
const LEASE_MARGIN: chrono::Duration = chrono::Duration::seconds(30);
/// Grants made from leases are written behind at most this often, together (the default
/// of `TOKENLEDGER_GRANT_FLUSH_MS`).
pub const GRANT_FLUSH_MS: u64 = 5;

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
    /// The most output tokens the request may produce per choice; absent: the model's
    /// maximum output from the price book.
    pub max_tokens: Option<u64>,
    /// Choices the request asks for (OpenAI's `n`, 1–128; absent: 1): the worst case is
    /// `n` × the output bound.
    #[serde(default)]
    pub n: Option<u64>,
    /// In process only (the router): which provider/model pairs the caller can serve; a
    /// downgrade picks among them only. Absent: any.
    #[serde(skip)]
    #[schema(ignore)]
    pub routable: Option<Routable>,
}

/// Whether a caller can route a request to (provider, model).
pub type RoutableFn = dyn Fn(&str, &str) -> bool + Send + Sync;

/// A predicate over (provider, model): whether the caller can route a request there.
#[derive(Clone)]
pub struct Routable(pub Arc<RoutableFn>);

impl std::fmt::Debug for Routable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Routable(..)")
    }
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

/// Work for the group-commit task: a request to decide (its reply; `leased`: the caller
/// grants from leases, so leases are placed for its tenant), or a lease renewal.
struct Job {
    tenant: String,
    req: Option<AuthRequest>,
    reply: Option<Reply>,
    leased: bool,
    /// Shutdown: write the grants, release the leases, then answer.
    close: Option<oneshot::Sender<()>>,
}

/// A share of one blocking budget's headroom in one period, held by this process.
#[derive(Clone, Debug)]
struct Lease {
    id: uuid::Uuid,
    /// The budget version it was sized under: a later version in force (a new limit)
    /// voids it for local grants.
    version: i64,
    /// The lease's hold.
    amount: Decimal,
    /// Granted out of it so far (written behind or pending).
    drawn: Decimal,
    expires_at: DateTime<Utc>,
    /// The budget's spend and other holds when the lease was taken (for the views).
    spent: Decimal,
    /// A renewal was asked for and has not been answered.
    renewing: bool,
    /// No renewal is asked for before this: set when a renewal found no headroom to
    /// lease beyond this lease (it is asked for again later, as holds settle below their
    /// worst case and free headroom, instead of never before the lease runs out).
    renew_after: DateTime<Utc>,
}

/// How long after a renewal that placed no lease another is asked for.
const RENEW_RETRY: chrono::Duration = chrono::Duration::seconds(1);

/// After a decision batch for `leasing` tenants committed: a lease of theirs still waiting
/// for its renewal was not replaced (there was no headroom to lease beyond it). It keeps
/// granting, and asks again after `RENEW_RETRY`.
fn renewals_answered(sh: &mut Shared, leasing: &BTreeSet<String>, now: DateTime<Utc>) {
    for (k, l) in sh.leases.iter_mut() {
        if l.renewing && leasing.contains(&k.0) {
            l.renewing = false;
            l.renew_after = now + RENEW_RETRY;
        }
    }
}

/// A decision granted from leases, to be written behind.
struct Grant {
    tenant: String,
    req: AuthRequest,
    decision: AuthDecision,
    holds: Vec<(Key, Decimal)>,
    /// (lease, budget key, amount) drawn out of leases
    draws: Vec<(uuid::Uuid, Key, Decimal)>,
}

/// What the fast path and the task share.
#[derive(Default)]
struct Shared {
    book: Arc<PriceBook>,
    stamp: BookStamp,
    currencies: HashMap<String, String>,
    leases: HashMap<Key, Lease>,
    /// Standings read by the last exact decision (views of alert-only budgets).
    standings: HashMap<Key, Standing>,
    pending: Vec<Grant>,
    /// Leases a renewal replaced: still held in the database until released, which the
    /// next write does after the grants drawn on them.
    retired: Vec<(Key, Lease)>,
}

/// The handle the API and the router use; cheap to clone.
#[derive(Clone)]
pub struct Authorizer {
    tx: mpsc::Sender<Job>,
    shared: Arc<Mutex<Shared>>,
    flush: Arc<Notify>,
    ttl: chrono::Duration,
}

impl Authorizer {
    /// Start the group-commit task; it ends when every handle is dropped (writing what is
    /// pending and releasing its leases).
    pub fn start(
        pool: PgPool,
        hold_ttl: std::time::Duration,
        grant_flush: std::time::Duration,
    ) -> Authorizer {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let ttl = chrono::Duration::from_std(hold_ttl).unwrap_or(chrono::Duration::hours(1));
        let shared = Arc::new(Mutex::new(Shared {
            stamp: -1,
            ..Shared::default()
        }));
        let flush = Arc::new(Notify::new());
        tokio::spawn(run(
            pool,
            ttl,
            grant_flush,
            rx,
            shared.clone(),
            flush.clone(),
        ));
        Authorizer {
            tx,
            shared,
            flush,
            ttl,
        }
    }

    /// The stamp of the price book and terms the authorizer decides with (-1 before the
    /// first load): it follows `terms_version` within a quarter second.
    pub fn terms_stamp(&self) -> BookStamp {
        self.shared.lock().expect("authorizer state").stamp
    }

    /// At shutdown, once no request is in flight: write what was granted from leases and
    /// release the leases (a process killed outright leaves them to expire).
    pub async fn close(&self) {
        // in order with the task's own writes: it is the only writer of grants
        let (done, rx) = oneshot::channel();
        let job = Job {
            tenant: String::new(),
            req: None,
            reply: None,
            leased: false,
            close: Some(done),
        };
        if self.tx.send(job).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Decide exactly, in the group commit: durable before it answers.
    pub async fn authorize(
        &self,
        tenant: String,
        req: AuthRequest,
    ) -> Result<AuthDecision, AuthError> {
        self.exact(tenant, req, false).await
    }

    /// Decide from this process's leases when they can grant the request (no database
    /// round trip; the grant is written behind), else exactly (placing leases for later).
    pub async fn authorize_leased(
        &self,
        tenant: String,
        req: AuthRequest,
    ) -> Result<AuthDecision, AuthError> {
        check_request(&req)?;
        if let Some(d) = self.try_leased(&tenant, &req) {
            return Ok(d);
        }
        self.exact(tenant, req, true).await
    }

    /// An allow granted from the tenant's leases alone, at once, or `None` when they
    /// cannot grant it (no lease in force, too little left in one, or a decision other
    /// than allow): then only `authorize_leased` decides, exactly.
    pub fn try_leased(&self, tenant: &str, req: &AuthRequest) -> Option<AuthDecision> {
        check_request(req).ok()?;
        let (d, renew) = {
            let mut sh = self.shared.lock().expect("authorizer state");
            grant_locally(&mut sh, tenant, req, Utc::now(), self.ttl)?
        };
        self.flush.notify_one();
        if renew {
            let job = Job {
                tenant: tenant.to_string(),
                req: None,
                reply: None,
                leased: true,
                close: None,
            };
            if self.tx.try_send(job).is_err() {
                // the queue is full: not asked for, so a later grant asks again
                let mut sh = self.shared.lock().expect("authorizer state");
                for (_, l) in sh.leases.iter_mut().filter(|(k, _)| k.0 == tenant) {
                    l.renewing = false;
                }
            }
        }
        Some(d)
    }

    async fn exact(
        &self,
        tenant: String,
        req: AuthRequest,
        leased: bool,
    ) -> Result<AuthDecision, AuthError> {
        check_request(&req)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                tenant,
                req: Some(req),
                reply: Some(reply),
                leased,
                close: None,
            })
            .await
            .map_err(|_| AuthError::Stopped)?;
        rx.await.map_err(|_| AuthError::Stopped)?
    }
}

/// Most choices one request may ask for (OpenAI's limit on `n`).
pub const MAX_CHOICES: u64 = 128;

fn check_request(req: &AuthRequest) -> Result<(), AuthError> {
    if req.estimated_input_tokens > MAX_TOKENS || req.max_tokens.is_some_and(|m| m > MAX_TOKENS) {
        return Err(AuthError::Invalid(format!(
            "token counts are capped at {MAX_TOKENS}"
        )));
    }
    if req.n.is_some_and(|n| n == 0 || n > MAX_CHOICES) {
        return Err(AuthError::Invalid(format!(
            "n must be between 1 and {MAX_CHOICES}"
        )));
    }
    check_strings(req).map_err(AuthError::Invalid)
}

/// Grant a request from leases, in memory: allowed when its worst case fits in what is
/// left of the lease of every blocking budget in scope (and of nothing else to check);
/// returns the decision and whether a lease it drew on needs renewing. None: decide it
/// exactly.
fn grant_locally(
    sh: &mut Shared,
    tenant: &str,
    req: &AuthRequest,
    now: DateTime<Utc>,
    ttl: chrono::Duration,
) -> Option<(AuthDecision, bool)> {
    let currency = sh.currencies.get(tenant)?.clone();
    let book = sh.book.clone();
    let budgets: Vec<&Budget> = book
        .budgets_at(tenant, now)
        .into_iter()
        .filter(|b| b.matches(req.api_key_id.as_deref(), &req.tags))
        .collect();
    let mut standings: HashMap<Key, Standing> = HashMap::new();
    for b in &budgets {
        let k = (
            tenant.to_string(),
            b.name.clone(),
            period_key(b.period, now),
        );
        let s = if b.action == BudgetAction::Alert {
            sh.standings.get(&k).copied().unwrap_or_default()
        } else {
            let l = sh.leases.get(&k)?;
            if l.expires_at - LEASE_MARGIN <= now || l.version != b.id {
                return None;
            }
            let left = l.amount - l.drawn;
            // spent + held + cost > amount exactly when cost > what is left of the lease
            Standing {
                spent: l.spent,
                held: b.amount - l.spent - left,
            }
        };
        standings.insert(k, s);
    }
    let (d, holds) = decide(&book, tenant, &currency, req, &mut standings, now, ttl).ok()?;
    if d.decision != Verdict::Allow {
        return None;
    }
    let mut draws = Vec::new();
    let mut renew = false;
    let gating: BTreeSet<Key> = budgets
        .iter()
        .filter(|b| b.action != BudgetAction::Alert)
        .map(|b| {
            (
                tenant.to_string(),
                b.name.clone(),
                period_key(b.period, now),
            )
        })
        .collect();
    for (k, amount) in &holds {
        // only from the leases checked above, and only what is there to draw
        if *amount <= Decimal::ZERO || !gating.contains(k) {
            continue;
        }
        if let Some(l) = sh.leases.get_mut(k) {
            l.drawn += *amount;
            draws.push((l.id, k.clone(), *amount));
            let low = (l.amount - l.drawn) * Decimal::TWO < l.amount
                || l.expires_at - LEASE_TTL / 2 <= now;
            if low && !l.renewing && l.renew_after <= now {
                l.renewing = true;
                renew = true;
            }
        }
    }
    sh.pending.push(Grant {
        tenant: tenant.to_string(),
        req: req.clone(),
        decision: d.clone(),
        holds,
        draws,
    });
    Some((d, renew))
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
    flush_every: std::time::Duration,
    mut rx: mpsc::Receiver<Job>,
    shared: Arc<Mutex<Shared>>,
    flush: Arc<Notify>,
) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    let mut swept = std::time::Instant::now();
    // a changed price book or term is looked for every 250 ms (leases were sized under the
    // old one)
    let mut check = tokio::time::interval(std::time::Duration::from_millis(250));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // grants are written at most every `flush_every`: one transaction carries all of them
    let mut due: Option<tokio::time::Instant> = None;
    let mut last_flush = tokio::time::Instant::now();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut jobs, MAX_BATCH) => {
                if n == 0 {
                    break;
                }
            }
            _ = flush.notified(), if due.is_none() => {
                due = Some((last_flush + flush_every).max(tokio::time::Instant::now()));
                continue;
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                last_flush = tokio::time::Instant::now();
                due = None;
                if let Err(e) = write_pending(&pool, &shared).await {
                    tracing::warn!(error = %e, "writing granted authorisations failed; retrying");
                    due = Some(tokio::time::Instant::now() + std::time::Duration::from_millis(100));
                }
                continue;
            }
            _ = check.tick() => {
                if let Err(e) = check_book(&pool, &shared).await {
                    tracing::warn!(error = %e, "checking the price book failed");
                }
                continue;
            }
        }
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
        let (closing, batch): (Vec<Job>, Vec<Job>) = std::mem::take(&mut jobs)
            .into_iter()
            .partition(|j| j.close.is_some());
        let results = decide_batch(&pool, &shared, ttl, &batch).await;
        for (job, r) in batch.into_iter().zip(results) {
            if let (Some(reply), Some(r)) = (job.reply, r) {
                let _ = reply.send(r);
            }
        }
        // what was granted from leases in the batch is written at once
        flush.notify_one();
        for job in closing {
            shutdown(&pool, &shared).await;
            if let Some(done) = job.close {
                let _ = done.send(());
            }
        }
    }
    // every handle is gone: write what was granted and give the leases back
    shutdown(&pool, &shared).await;
}

/// Write what was granted and release every lease.
async fn shutdown(pool: &PgPool, shared: &Mutex<Shared>) {
    let leases: Vec<(Key, Lease)> = {
        let mut sh = shared.lock().expect("authorizer state");
        sh.leases.drain().collect()
    };
    if let Err(e) = write_and_release(pool, shared, leases).await {
        tracing::warn!(error = %e, "releasing budget leases at shutdown failed; they expire");
    }
}

/// Write the pending grants, then release these leases and those renewals retired, in
/// one transaction; on any error the grants and the retired leases go back to be written
/// later (the leases given here stay unreleased: they expire).
async fn write_and_release(
    pool: &PgPool,
    shared: &Mutex<Shared>,
    mut leases: Vec<(Key, Lease)>,
) -> Result<(), sqlx::Error> {
    let (grants, retired) = take_pending(shared);
    if grants.is_empty() && retired.is_empty() && leases.is_empty() {
        return Ok(());
    }
    let n = leases.len();
    leases.extend(retired);
    let r = async {
        let mut tx = pool.begin().await?;
        write_grants(&mut tx, &grants).await?;
        release(&mut tx, &leases).await?;
        tx.commit().await
    }
    .await;
    if r.is_err() {
        restore_pending(shared, grants, leases.split_off(n));
    }
    r
}

/// The grants to write and the retired leases to release (after them).
fn take_pending(shared: &Mutex<Shared>) -> (Vec<Grant>, Vec<(Key, Lease)>) {
    let mut sh = shared.lock().expect("authorizer state");
    (
        std::mem::take(&mut sh.pending),
        std::mem::take(&mut sh.retired),
    )
}

/// Put grants whose write failed back in front of the queue, with the retired leases.
fn restore_pending(shared: &Mutex<Shared>, mut grants: Vec<Grant>, mut retired: Vec<(Key, Lease)>) {
    let mut sh = shared.lock().expect("authorizer state");
    grants.append(&mut sh.pending);
    sh.pending = grants;
    retired.append(&mut sh.retired);
    sh.retired = retired;
}

/// Write the grants made from leases since the last write, and release the leases that
/// renewals replaced, in one transaction.
async fn write_pending(pool: &PgPool, shared: &Mutex<Shared>) -> Result<(), sqlx::Error> {
    write_and_release(pool, shared, Vec::new()).await
}

/// A granted decision's records: the decision and its holds (as the exact path writes
/// them), and what it drew out of each lease, taken off the lease's open hold. The grants'
/// tenants' head rows are share-locked, so a usage event that settles a grant before it is
/// written is either seen here (its hold is not opened) or waits for this to commit (and
/// then closes the hold).
async fn write_grants(tx: &mut sqlx::PgConnection, grants: &[Grant]) -> Result<(), sqlx::Error> {
    if grants.is_empty() {
        return Ok(());
    }
    let tenants: BTreeSet<&str> = grants.iter().map(|g| g.tenant.as_str()).collect();
    let tenants: Vec<&str> = tenants.into_iter().collect();
    sqlx::query(
        "select 1 from tenant_heads where tenant_id = any($1) order by tenant_id for share",
    )
    .bind(&tenants)
    .execute(&mut *tx)
    .await?;
    let mut rows = Rows::default();
    let (mut lease, mut budget, mut grant, mut tenant, mut amount) =
        (vec![], vec![], vec![], vec![], vec![]);
    for g in grants {
        rows.add(&g.tenant, &g.req, &g.decision, g.holds.clone());
        for (l, k, a) in &g.draws {
            lease.push(*l);
            budget.push(k.1.clone());
            grant.push(g.decision.authorization_id);
            tenant.push(g.tenant.clone());
            amount.push(*a);
        }
    }
    rows.write(&mut *tx).await?;
    if !lease.is_empty() {
        sqlx::query(
            "with d as (insert into auth_lease_draws (lease_id, budget, grant_id, tenant_id, amount)
                        select * from unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::numeric[])
                        on conflict (lease_id, budget, grant_id) do nothing
                        returning lease_id, budget, amount)
             -- the leases' rows by index probe and tid (see `open_hold_rows`)
             update open_holds o
             set amount = o.amount - (select sum(d.amount) from d
                                      where d.lease_id = o.hold_id and d.budget = o.budget)
             where o.ctid = any(array(
               select p.c from (select distinct lease_id, budget from d) x
               cross join lateral (select o2.ctid as c from open_holds o2
                                   where o2.hold_id = x.lease_id and o2.budget = x.budget
                                   offset 0) p))",
        )
        .bind(&lease)
        .bind(&budget)
        .bind(&grant)
        .bind(&tenant)
        .bind(&amount)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Release leases: their undrawn rest stops counting (a settlement of the lease's id).
async fn release(tx: &mut sqlx::PgConnection, leases: &[(Key, Lease)]) -> Result<(), sqlx::Error> {
    if leases.is_empty() {
        return Ok(());
    }
    let ids: Vec<uuid::Uuid> = leases.iter().map(|(_, l)| l.id).collect();
    let tenants: Vec<String> = leases.iter().map(|(k, _)| k.0.clone()).collect();
    sqlx::query(concat!(
        "with s as (insert into auth_settlements (hold_id, tenant_id, event_id)
                    select h, t, 'lease-released' from unnest($1::uuid[], $2::text[]) as x(h, t)
                    on conflict (hold_id, tenant_id) do nothing)
         delete from open_holds o where o.ctid = any(array(",
        crate::open_hold_rows!("$1", "$2"),
        "))"
    ))
    .bind(&ids)
    .bind(&tenants)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Reload the price book when a term changed; leases sized under the old one are
/// released (requests take the exact path until new ones are placed).
async fn check_book(pool: &PgPool, shared: &Mutex<Shared>) -> Result<(), sqlx::Error> {
    let current = shared.lock().expect("authorizer state").stamp;
    let mut c = pool.acquire().await?;
    let stamp: i64 = sqlx::query_scalar(&format!("select {}", store::BOOK_STAMP))
        .fetch_one(&mut *c)
        .await?;
    if stamp == current {
        return Ok(());
    }
    let book = Arc::new(load_book(&mut c).await?);
    let leases: Vec<(Key, Lease)> = {
        let mut sh = shared.lock().expect("authorizer state");
        sh.book = book;
        sh.stamp = stamp;
        sh.leases.drain().collect()
    };
    write_and_release(pool, shared, leases).await
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
    // the most output a request may produce: n × (max_tokens, else the model's maximum)
    let choices = req.n.unwrap_or(1).max(1);
    let max_out = |p: &str, m: &str| {
        req.max_tokens
            .or_else(|| {
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
            .map(|per_choice| per_choice.saturating_mul(choices).min(MAX_TOKENS))
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
                    if req.routable.as_ref().is_some_and(|r| !(r.0)(&p, &m)) {
                        continue; // the caller could not send the request there
                    }
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

/// Decide a batch. Requests from the router are first tried against the leases again (a
/// lease may have been placed since they queued): only what still needs it is decided
/// exactly, and only those tenants' leases are released for it — so queued requests do not
/// keep taking the leases away from the ones arriving meanwhile.
async fn decide_batch(
    pool: &PgPool,
    shared: &Mutex<Shared>,
    ttl: chrono::Duration,
    batch: &[Job],
) -> Vec<Option<Result<AuthDecision, AuthError>>> {
    let mut out: Vec<Option<Result<AuthDecision, AuthError>>> =
        batch.iter().map(|_| None).collect();
    let mut exact: Vec<usize> = Vec::new();
    // tenants whose leases are renewed in this batch
    let mut renew: BTreeSet<String> = BTreeSet::new();
    let (grants, mut released, mut book, mut stamp, tenants, n_retired) = {
        let mut sh = shared.lock().expect("authorizer state");
        let now = Utc::now();
        for (i, job) in batch.iter().enumerate() {
            match &job.req {
                Some(req) if job.leased => {
                    match grant_locally(&mut sh, &job.tenant, req, now, ttl) {
                        Some((d, again)) => {
                            out[i] = Some(Ok(d));
                            if again {
                                renew.insert(job.tenant.clone());
                            }
                        }
                        None => exact.push(i),
                    }
                }
                Some(_) => exact.push(i),
                None => {
                    renew.insert(job.tenant.clone());
                }
            }
        }
        let mut deciding: Vec<String> = exact.iter().map(|i| batch[*i].tenant.clone()).collect();
        deciding.sort();
        deciding.dedup();
        let mut tenants = deciding.clone();
        tenants.extend(renew.iter().cloned());
        tenants.sort();
        tenants.dedup();
        // what was granted from leases is written first, and the leases of the tenants
        // with requests to decide exactly are released in the same transaction: the
        // decisions see all the remaining headroom. A tenant whose lease is only renewed
        // keeps granting from it meanwhile (its open rest counts as held when the new
        // one is sized, so the two never promise the same headroom); the new lease
        // replaces it afterwards and it is released with the next write.
        let keys: Vec<Key> = sh
            .leases
            .keys()
            .filter(|k| deciding.binary_search(&k.0).is_ok())
            .cloned()
            .collect();
        let mut released: Vec<(Key, Lease)> = keys
            .into_iter()
            .filter_map(|k| sh.leases.remove(&k).map(|l| (k, l)))
            .collect();
        // leases a renewal replaced go too (after the grants, which may draw on them), or
        // an exact decision here would still count their unused rest as held
        let retired = std::mem::take(&mut sh.retired);
        let n_retired = retired.len();
        released.extend(retired);
        (
            std::mem::take(&mut sh.pending),
            released,
            sh.book.clone(),
            sh.stamp,
            tenants,
            n_retired,
        )
    };
    if tenants.is_empty() {
        // all granted from leases: written behind like the others
        let mut sh = shared.lock().expect("authorizer state");
        let mut retired = released.split_off(released.len() - n_retired);
        retired.append(&mut sh.retired);
        sh.retired = retired;
        let mut grants = grants;
        grants.append(&mut sh.pending);
        sh.pending = grants;
        return out;
    }
    let jobs: Vec<&Job> = exact.iter().map(|i| &batch[*i]).collect();
    let mut leasing: BTreeSet<String> = jobs
        .iter()
        .filter(|j| j.leased)
        .map(|j| j.tenant.clone())
        .collect();
    leasing.extend(renew);
    let r = decide_in_tx(
        pool, &tenants, &grants, &released, &mut book, &mut stamp, ttl, &jobs, &leasing,
    )
    .await;
    let mut sh = shared.lock().expect("authorizer state");
    match r {
        Ok((decided, new_leases, currencies, standings)) => {
            if stamp != sh.stamp {
                // a newer book: leases sized under the old one stop granting and are
                // released by the next write
                let old: Vec<(Key, Lease)> = sh.leases.drain().collect();
                sh.retired.extend(old);
                sh.book = book;
                sh.stamp = stamp;
            }
            for (k, l) in new_leases {
                if let Some(old) = sh.leases.insert(k.clone(), l) {
                    sh.retired.push((k, old));
                }
            }
            renewals_answered(&mut sh, &leasing, Utc::now());
            sh.currencies.extend(currencies);
            sh.standings.extend(standings);
            for (i, d) in exact.into_iter().zip(decided) {
                out[i] = d;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "authorisation batch failed");
            // nothing was written: the grants go back, and every lease this batch was to
            // release (the deciding tenants' and those renewals replaced) is released by
            // the next write, after those grants — not left to park its headroom until it
            // expires
            let mut grants = grants;
            grants.append(&mut sh.pending);
            sh.pending = grants;
            let mut retired = released;
            retired.append(&mut sh.retired);
            sh.retired = retired;
            // a renewal that did not happen is asked for again by the next grant
            for l in sh.leases.values_mut() {
                l.renewing = false;
            }
            for i in exact {
                out[i] = Some(Err(AuthError::Db(sqlx::Error::Protocol(format!(
                    "authorisation batch failed: {e}"
                )))));
            }
        }
    }
    out
}

type Decided = (
    Vec<Option<Result<AuthDecision, AuthError>>>,
    Vec<(Key, Lease)>,
    Vec<(String, String)>,
    HashMap<Key, Standing>,
);

#[allow(clippy::too_many_arguments)]
async fn decide_in_tx(
    pool: &PgPool,
    tenants: &[String],
    grants: &[Grant],
    released: &[(Key, Lease)],
    book: &mut Arc<PriceBook>,
    stamp: &mut BookStamp,
    ttl: chrono::Duration,
    batch: &[&Job],
    leasing: &BTreeSet<String>,
) -> Result<Decided, sqlx::Error> {
    let mut tx = pool.begin().await?;
    // authorisers (in every process) take turns per tenant; the writer is waited for only
    // to write grants made from leases (below), not to read:
    // one statement reads spend and open holds from one snapshot, in which a usage event
    // has either added its spend and removed its hold, or done neither
    let (locked, book_stamp) = store::lock_tenants_for_authorization(&mut tx, tenants).await?;
    if let Some(s) = book_stamp.filter(|s| s != stamp) {
        *book = Arc::new(load_book(&mut tx).await?);
        *stamp = s;
    }
    write_grants(&mut tx, grants).await?;
    release(&mut tx, released).await?;
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
    for job in batch {
        let (tenant, Some(req)) = (&job.tenant, &job.req) else {
            out.push(None);
            continue;
        };
        let Some((_, currency)) = locked.get(tenant) else {
            out.push(Some(Err(AuthError::UnknownTenant(tenant.clone()))));
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
                out.push(Some(Ok(d)));
            }
            Err(e) => out.push(Some(Err(e))),
        }
    }
    // leases for the tenants whose requests grant from leases: half of what is left of
    // each blocking budget in force, so other processes keep room to lease too
    let mut leases = Vec::new();
    for tenant in leasing {
        let Some((_, currency)) = locked.get(tenant) else {
            continue;
        };
        for b in book.budgets_at(tenant, now) {
            if b.action == BudgetAction::Alert {
                continue;
            }
            let k = (tenant.clone(), b.name.clone(), period_key(b.period, now));
            let s = standings.entry(k.clone()).or_default();
            let half = ((b.amount - s.spent - s.held) / Decimal::TWO).round_dp(12);
            if half <= Decimal::ZERO {
                continue;
            }
            let lease = Lease {
                id: uuid::Uuid::now_v7(),
                version: b.id,
                amount: half,
                drawn: Decimal::ZERO,
                expires_at: now + LEASE_TTL,
                spent: s.spent,
                renewing: false,
                renew_after: now,
            };
            s.held += half;
            rows.lease(tenant, currency, &k, &lease, b);
            leases.push((k, lease));
        }
    }
    rows.write(&mut tx).await?;
    tx.commit().await?;
    let currencies = locked.into_iter().map(|(t, (_, c))| (t, c)).collect();
    Ok((out, leases, currencies, standings))
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
        // the output bound asked for, over all choices (0: the model's maximum applied)
        let choices = req.n.unwrap_or(1).max(1);
        self.max_tokens.push(
            req.max_tokens
                .map_or(0, |m| m.saturating_mul(choices).min(MAX_TOKENS)) as i64,
        );
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

    /// A lease: a decision of its own with one hold, on one blocking budget.
    fn lease(&mut self, tenant: &str, currency: &str, k: &Key, l: &Lease, b: &Budget) {
        self.id.push(l.id);
        self.tenant.push(tenant.to_string());
        self.key.push(None);
        self.tags.push("{}".into());
        self.req_model.push("*".into());
        self.req_provider.push(None);
        self.decision.push("lease".into());
        self.provider.push(None);
        self.model.push(None);
        self.input.push(0);
        self.max_tokens.push(0);
        self.cost.push(Some(l.amount));
        self.currency.push(currency.to_string());
        self.denied_by.push(None);
        self.reason
            .push(format!("lease on budget {:?} (version {})", b.name, b.id));
        self.expires.push(l.expires_at);
        self.h_id.push(l.id);
        self.h_tenant.push(tenant.to_string());
        self.h_budget.push(k.1.clone());
        self.h_period.push(k.2.clone());
        self.h_amount.push(l.amount);
        self.h_expires.push(l.expires_at);
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
               on conflict (id) do nothing
               returning 1)
             , h as (insert into auth_hold_budgets (hold_id, tenant_id, budget, period, amount, expires_at)
               select * from unnest($17::uuid[], $18::text[], $19::text[], $20::text[],
                 $21::numeric[], $22::timestamptz[])
               on conflict (hold_id, budget) do nothing
               returning 1)
             , f as (insert into alert_facts (tenant_id, type, unique_key, payload, occurred_at)
               select t, 'budget.action_taken', k, p::jsonb, o
               from unnest($23::text[], $24::text[], $25::text[], $26::timestamptz[]) as x(t, k, p, o)
               on conflict (tenant_id, type, unique_key) do nothing)
             insert into open_holds (hold_id, tenant_id, budget, period, amount, expires_at)
             select x.* from unnest($17::uuid[], $18::text[], $19::text[], $20::text[],
               $21::numeric[], $22::timestamptz[]) as x(h, t, b, p, a, e)
             -- a grant written behind may have been settled already. One index probe per
             -- hold: `limit 1` keeps the lateral subquery from being flattened into an anti
             -- join, which with a plan made while the table was small scanned every
             -- settlement ever recorded on each write (auto_explain: 1 -> 27 ms per write
             -- within a minute of router traffic)
             left join lateral (select 1 as settled from auth_settlements s
                                where s.hold_id = x.h and s.tenant_id = x.t limit 1) s on true
             where s.settled is null
             -- written again after a commit whose outcome was lost: nothing more
             on conflict (hold_id, budget) do nothing",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::budgets::{BudgetPeriod, BudgetScope};
    use crate::pricing::{MarkupRule, PriceVersion, RateSet, Side};

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    /// A book with one model at 1 per million tokens (cost; 0% markup: price 1) and the
    /// given budget versions (amount, effective from).
    fn book(budgets: &[(i64, i64, &str)]) -> PriceBook {
        let (v, markup) = model_terms();
        let list = budgets
            .iter()
            .map(|(id, amount, from)| Budget {
                id: *id,
                tenant_id: "acme".into(),
                name: "cap".into(),
                effective_from: t(from),
                active: true,
                scope: BudgetScope::Tenant,
                scope_value: String::new(),
                period: BudgetPeriod::Month,
                amount: Decimal::from(*amount),
                thresholds: Vec::new(),
                action: BudgetAction::Block,
                downgrade_class: None,
            })
            .collect();
        PriceBook::new(vec![v], vec![markup]).with_budgets(list)
    }

    /// The one model's price version and the 0% markup.
    fn model_terms() -> (PriceVersion, MarkupRule) {
        let v = PriceVersion {
            id: 1,
            provider: "openai".into(),
            model: "m".into(),
            region: String::new(),
            side: Side::Cost,
            currency: "USD".into(),
            effective_from: t("2020-01-01T00:00:00Z"),
            base: RateSet {
                input: Some(Decimal::ONE),
                output: Some(Decimal::ONE),
                ..Default::default()
            },
            batch_discount: Decimal::ZERO,
            long_context_threshold_tokens: None,
            long: RateSet::default(),
            max_output_tokens: None,
        };
        let markup = MarkupRule {
            id: 1,
            tenant_id: None,
            percent: Decimal::ZERO,
            effective_from: t("2020-01-01T00:00:00Z"),
        };
        (v, markup)
    }

    fn req(tokens: u64) -> AuthRequest {
        AuthRequest {
            tenant_id: None,
            api_key_id: None,
            tags: BTreeMap::new(),
            model: "m".into(),
            provider: Some("openai".into()),
            region: None,
            estimated_input_tokens: 0,
            max_tokens: Some(tokens),
            n: None,
            routable: None,
        }
    }

    fn shared(book: PriceBook, lease: Decimal, version: i64, expires: &str) -> Shared {
        let mut sh = Shared {
            book: Arc::new(book),
            ..Shared::default()
        };
        sh.currencies.insert("acme".into(), "USD".into());
        sh.leases.insert(
            ("acme".into(), "cap".into(), "2026-11".into()),
            Lease {
                id: uuid::Uuid::now_v7(),
                version,
                amount: lease,
                drawn: Decimal::ZERO,
                expires_at: t(expires),
                spent: Decimal::ZERO,
                renewing: false,
                renew_after: DateTime::<Utc>::MIN_UTC,
            },
        );
        sh
    }

    #[test]
    fn the_worst_case_covers_every_choice_with_or_without_max_tokens() {
        let now = t("2026-11-25T12:00:00Z");
        let ttl = chrono::Duration::hours(1);
        // the model's maximum output is 1,000 tokens, at 1 per million
        let (mut v, markup) = model_terms();
        v.max_output_tokens = Some(1000);
        let b = PriceBook::new(vec![v], vec![markup]);
        let cost = |max_tokens: Option<u64>, n: Option<u64>| {
            let mut r = req(0);
            r.max_tokens = max_tokens;
            r.n = n;
            let (d, _) = decide(&b, "acme", "USD", &r, &mut HashMap::new(), now, ttl).unwrap();
            d.estimated_cost.unwrap()
        };
        let dec = |s: &str| s.parse::<Decimal>().unwrap();
        assert_eq!(cost(None, None), dec("0.001"));
        assert_eq!(cost(None, Some(3)), dec("0.003"));
        assert_eq!(cost(Some(500), Some(4)), dec("0.002"));
        assert_eq!(cost(Some(500), Some(1)), dec("0.0005"));
        // n is OpenAI's 1..=128
        for bad in [0, MAX_CHOICES + 1] {
            let mut r = req(1);
            r.n = Some(bad);
            assert!(matches!(check_request(&r), Err(AuthError::Invalid(_))));
        }
    }

    #[test]
    fn a_lease_grants_what_fits_and_no_more() {
        let now = t("2026-11-25T12:00:00Z");
        let ttl = chrono::Duration::hours(1);
        // a budget of 100, a lease of 3 (worst case of 1,000,000 tokens: 1)
        let mut sh = shared(
            book(&[(7, 100, "2026-01-01T00:00:00Z")]),
            Decimal::from(3),
            7,
            "2026-11-25T12:02:00Z",
        );
        for _ in 0..3 {
            let (d, _) = grant_locally(&mut sh, "acme", &req(1_000_000), now, ttl).unwrap();
            assert_eq!(d.decision, Verdict::Allow);
            assert_eq!(d.estimated_cost, Some(Decimal::ONE));
        }
        // a request that costs nothing draws nothing (a draw is a positive amount)
        let (d, _) = grant_locally(&mut sh, "acme", &req(0), now, ttl).unwrap();
        assert_eq!(d.estimated_cost, Some(Decimal::ZERO));
        assert!(sh.pending.last().unwrap().draws.is_empty());
        sh.pending.pop();
        // the fourth does not fit in the lease: decided exactly, nothing drawn
        assert!(grant_locally(&mut sh, "acme", &req(1_000_000), now, ttl).is_none());
        assert_eq!(sh.pending.len(), 3);
        let drawn: Decimal = sh.pending.iter().flat_map(|g| &g.draws).map(|d| d.2).sum();
        assert_eq!(drawn, Decimal::from(3));
        assert_eq!(sh.leases.values().next().unwrap().drawn, Decimal::from(3));
    }

    #[test]
    fn a_lease_asks_for_renewal_once_half_used() {
        let now = t("2026-11-25T12:00:00Z");
        let ttl = chrono::Duration::hours(1);
        let mut sh = shared(
            book(&[(7, 100, "2026-01-01T00:00:00Z")]),
            Decimal::from(4),
            7,
            "2026-11-25T12:02:00Z",
        );
        let renew: Vec<bool> = (0..4)
            .map(|_| {
                grant_locally(&mut sh, "acme", &req(1_000_000), now, ttl)
                    .unwrap()
                    .1
            })
            .collect();
        // renewal is asked for once, when less than half is left
        assert_eq!(renew, vec![false, false, true, false]);
    }

    #[test]
    fn a_renewal_that_placed_nothing_is_asked_for_again_later() {
        let now = t("2026-11-25T12:00:00Z");
        let ttl = chrono::Duration::hours(1);
        let mut sh = shared(
            book(&[(7, 100, "2026-01-01T00:00:00Z")]),
            Decimal::from(10),
            7,
            "2026-11-25T12:02:00Z",
        );
        let ask = |sh: &mut Shared, at: DateTime<Utc>| {
            grant_locally(sh, "acme", &req(1_000_000), at, ttl)
                .unwrap()
                .1
        };
        let asked: Vec<bool> = (0..6).map(|_| ask(&mut sh, now)).collect();
        assert_eq!(asked, vec![false, false, false, false, false, true]);
        // the batch ran and placed no new lease: this one keeps granting ...
        let other: BTreeSet<String> = ["other".to_string()].into();
        renewals_answered(&mut sh, &other, now);
        assert!(
            sh.leases.values().all(|l| l.renewing),
            "only its tenant's batch answers"
        );
        let leasing: BTreeSet<String> = ["acme".to_string()].into();
        renewals_answered(&mut sh, &leasing, now);
        // ... and asks again, not at once but after RENEW_RETRY
        assert!(!ask(&mut sh, now + chrono::Duration::milliseconds(500)));
        assert!(ask(&mut sh, now + RENEW_RETRY));
        assert!(!ask(&mut sh, now + RENEW_RETRY));
    }

    #[test]
    fn no_local_grant_from_a_lease_near_expiry_or_under_another_budget_version() {
        let now = t("2026-11-25T12:00:00Z");
        let ttl = chrono::Duration::hours(1);
        // expiring within the margin
        let mut sh = shared(
            book(&[(7, 100, "2026-01-01T00:00:00Z")]),
            Decimal::from(3),
            7,
            "2026-11-25T12:00:20Z",
        );
        assert!(grant_locally(&mut sh, "acme", &req(1), now, ttl).is_none());
        // a new version (a lower limit) took effect after the lease was sized
        let b = book(&[
            (7, 100, "2026-01-01T00:00:00Z"),
            (8, 2, "2026-11-25T11:00:00Z"),
        ]);
        let mut sh = shared(b, Decimal::from(50), 7, "2026-11-25T12:02:00Z");
        assert!(grant_locally(&mut sh, "acme", &req(1), now, ttl).is_none());
        assert!(sh.pending.is_empty());
        // no lease at all, or an unknown tenant
        let mut sh = shared(
            book(&[(7, 100, "2026-01-01T00:00:00Z")]),
            Decimal::from(3),
            7,
            "2026-11-25T12:02:00Z",
        );
        sh.leases.clear();
        assert!(grant_locally(&mut sh, "acme", &req(1), now, ttl).is_none());
        assert!(grant_locally(&mut sh, "other", &req(1), now, ttl).is_none());
    }
}
