//! The pricing engine: quotes, and ranked routing decisions published to a NATS KV bucket
//! for the router, republished when something that changes a ranking happens.
//!
//! KV layout: bucket `TOKENLEDGER_ROUTING_BUCKET` (default `routing`), key
//! `<tenant_id>.<class>` with the class name encoded by [`kv_token`] (`auto:budget` ->
//! `auto=3Abudget`); a router watches `<tenant_id>.>` or everything. The value is a
//! [`RoutingDecision`] as JSON.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::catalog::prices::load_book;
use crate::ledger::store::{BookStamp, BOOK_STAMP};
use crate::pricing::budgets::{period_key, BudgetAction, BudgetScope};
use crate::pricing::commitments::CommitmentPosition;
use crate::pricing::routing::{eligible, kv_token, quote, QuoteContext, QuoteLine, TokenMix};
use crate::pricing::{period_of, PriceBook, TierPosition};

/// How long a loaded price book is trusted before its stamp is checked again.
const BOOK_CHECK: Duration = Duration::from_millis(250);

/// The price book (with every commercial term), shared and reloaded when it changes.
#[derive(Clone)]
pub struct Engine {
    pool: PgPool,
    cache: Arc<Mutex<Cached>>,
}

struct Cached {
    checked: Option<Instant>,
    stamp: BookStamp,
    book: Arc<PriceBook>,
}

impl Engine {
    pub fn new(pool: PgPool) -> Engine {
        Engine {
            pool,
            cache: Arc::new(Mutex::new(Cached {
                checked: None,
                stamp: -1,
                book: Arc::new(PriceBook::default()),
            })),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The current book and its stamp (checked against the database at most every
    /// `BOOK_CHECK`).
    pub async fn book(&self) -> Result<(Arc<PriceBook>, BookStamp), sqlx::Error> {
        self.load(false).await
    }

    /// The book as of now: its stamp is read from the database whatever the cache says.
    /// Whoever acts on facts read just before (the publisher on alert facts) needs a book
    /// at least as new as the one the writer rated those facts with.
    pub async fn book_now(&self) -> Result<(Arc<PriceBook>, BookStamp), sqlx::Error> {
        self.load(true).await
    }

    async fn load(&self, check: bool) -> Result<(Arc<PriceBook>, BookStamp), sqlx::Error> {
        let mut c = self.cache.lock().await;
        if !check && c.checked.is_some_and(|t| t.elapsed() < BOOK_CHECK) {
            return Ok((c.book.clone(), c.stamp));
        }
        let mut conn = self.pool.acquire().await?;
        let stamp: i64 = sqlx::query_scalar(&format!("select {BOOK_STAMP}"))
            .fetch_one(&mut *conn)
            .await?;
        if stamp != c.stamp {
            c.book = Arc::new(load_book(&mut conn).await?);
            c.stamp = stamp;
        }
        c.checked = Some(Instant::now());
        Ok((c.book.clone(), c.stamp))
    }
}

/// What rankings depend on for one tenant now.
#[derive(Clone, Debug, Default)]
pub struct TenantView {
    pub currency: String,
    /// schedule name -> position in the current period
    pub tiers: BTreeMap<String, TierPosition>,
    /// budget name -> spend in its current period
    pub spent: HashMap<String, Decimal>,
    /// reservation name -> covered tokens this minute
    pub reserved: BTreeMap<String, u64>,
    /// commitment name -> position this period
    pub commitments: BTreeMap<String, CommitmentPosition>,
    /// (provider, model) -> tokens this minute under our provider reservations
    pub provider_minute: BTreeMap<(String, String), u64>,
    /// (provider, model) -> our list cost this period, in the tenant's currency, for
    /// providers we hold a commitment with
    pub provider_period: BTreeMap<(String, String), Decimal>,
}

/// Read a tenant's currency, current tier positions and budget spend (none if the tenant
/// does not exist).
pub async fn tenant_view(
    pool: &PgPool,
    book: &PriceBook,
    tenant: &str,
    at: DateTime<Utc>,
) -> Result<Option<TenantView>, sqlx::Error> {
    let budgets = book.budgets_at(tenant, at);
    let names: Vec<String> = budgets.iter().map(|b| b.name.clone()).collect();
    let periods: Vec<String> = budgets.iter().map(|b| period_key(b.period, at)).collect();
    let rows: Vec<(i32, String, Decimal, Decimal, Decimal)> = sqlx::query_as(
        "select 0, currency::text, 0, 0, 0 from tenants where id = $1
         union all
         select 1, schedule, units, list, charged from tier_positions where tenant_id = $1 and period = $2
         union all
         select 2, s.budget, s.spent, 0, 0 from budget_spend s
           join unnest($3::text[], $4::text[]) as k(b, p) on s.budget = k.b and s.period = k.p
         where s.tenant_id = $1
         union all
         select 3, reservation, covered, 0, 0 from reservation_usage
         where tenant_id = $1 and minute = $5
         union all
         select 4, commitment, drawn, case when closed then 1 else 0 end, 0
         from commitment_positions where tenant_id = $1 and period = $2
         union all
         select 5, provider || '/' || model, sum(tokens), 0, 0 from provider_usage_minutes
         where minute = $5 group by provider, model
         union all
         select 6, provider || '/' || model, sum(list_cost), 0, 0 from provider_period_costs
         where period = $2 and currency = (select currency from tenants where id = $1)
         group by provider, model",
    )
    .bind(tenant)
    .bind(period_of(at))
    .bind(&names)
    .bind(&periods)
    .bind(crate::pricing::reservations::minute_of(at))
    .fetch_all(pool)
    .await?;
    let mut view = TenantView::default();
    let mut found = false;
    for (kind, name, a, list, charged) in rows {
        match kind {
            0 => {
                found = true;
                view.currency = name;
            }
            1 => {
                view.tiers.insert(
                    name,
                    TierPosition {
                        units: a,
                        list,
                        charged,
                    },
                );
            }
            2 => {
                view.spent.insert(name, a);
            }
            3 => {
                view.reserved
                    .insert(name, u64::try_from(a).unwrap_or_default());
            }
            5 => {
                if let Some((p, m)) = name.split_once('/') {
                    view.provider_minute.insert(
                        (p.to_string(), m.to_string()),
                        u64::try_from(a).unwrap_or_default(),
                    );
                }
            }
            6 => {
                if let Some((p, m)) = name.split_once('/') {
                    view.provider_period
                        .insert((p.to_string(), m.to_string()), a);
                }
            }
            _ => {
                view.commitments.insert(
                    name,
                    CommitmentPosition {
                        drawn: a,
                        closed: !list.is_zero(),
                    },
                );
            }
        }
    }
    Ok(found.then_some(view))
}

/// Value of a routing decision in the KV bucket (schema `tokenledger.routing_decision.v1`).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct RoutingDecision {
    pub schema: &'static str,
    pub tenant_id: String,
    pub class: String,
    pub class_version: i64,
    #[schema(value_type = String)]
    pub quality_floor: Decimal,
    pub generated_at: DateTime<Utc>,
    /// What caused this publication: `startup`, `price_book`, `period`, `tier_crossed`,
    /// `commitment_exhausted`, `reservation_exhausted`, `reservation_minute`,
    /// `budget_limit`, `request`.
    pub trigger: String,
    pub currency: String,
    /// The token mix candidates are priced on.
    pub reference_mix: TokenMix,
    /// `ok`, `blocked` (a blocking tenant budget is at its limit: route nothing) or
    /// `downgraded` (a downgrade budget is at its limit: `candidates` are the
    /// `downgraded_to` class's).
    pub status: &'static str,
    pub blocked_by: Option<String>,
    pub downgraded_to: Option<String>,
    /// Ranked, cheapest effective price first; the router takes the first available one
    /// and falls back down the list.
    pub candidates: Vec<QuoteLine>,
}

/// The ranked decision for one tenant and class, or none if the class is not in force.
pub fn decide(
    book: &PriceBook,
    view: &TenantView,
    tenant: &str,
    class: &str,
    at: DateTime<Utc>,
    trigger: &str,
) -> Option<RoutingDecision> {
    let c = book.class_at(tenant, class, at)?;
    let ctx = QuoteContext {
        book,
        tenant_id: tenant,
        currency: &view.currency,
        tiers: &view.tiers,
        reserved: &view.reserved,
        commitments: &view.commitments,
        provider_minute: &view.provider_minute,
        provider_period: &view.provider_period,
        at,
    };
    let mix = TokenMix::reference();
    let mut d = RoutingDecision {
        schema: "tokenledger.routing_decision.v1",
        tenant_id: tenant.to_string(),
        class: class.to_string(),
        class_version: c.id,
        quality_floor: c.quality_floor,
        generated_at: at,
        trigger: trigger.to_string(),
        currency: view.currency.clone(),
        reference_mix: mix.clone(),
        status: "ok",
        blocked_by: None,
        downgraded_to: None,
        candidates: Vec::new(),
    };
    let mut candidates = eligible(c);
    // tenant-wide budgets at their limit change the decision; key and tag budgets act
    // through /v1/authorize, which sees the request's key and tags
    for b in book.budgets_at(tenant, at) {
        let at_limit = b.scope == BudgetScope::Tenant
            && view.spent.get(&b.name).is_some_and(|s| *s >= b.amount);
        if !at_limit {
            continue;
        }
        match (b.action, &b.downgrade_class) {
            (BudgetAction::Block, _) => {
                d.status = "blocked";
                d.blocked_by = Some(b.name.clone());
                return Some(d);
            }
            (BudgetAction::Downgrade, Some(to)) if d.status == "ok" => {
                if let Some(dc) = book.class_at(tenant, to, at) {
                    d.status = "downgraded";
                    d.downgraded_to = Some(to.clone());
                    candidates = eligible(dc);
                } else {
                    d.status = "blocked";
                    d.blocked_by = Some(b.name.clone());
                    return Some(d);
                }
            }
            _ => {}
        }
    }
    d.candidates = quote(&ctx, &mix, &candidates);
    Some(d)
}

/// The KV key of a tenant's decision for a class.
pub fn kv_key(tenant: &str, class: &str) -> String {
    format!("{tenant}.{}", kv_token(class))
}

/// Open the decisions bucket, creating its stream if missing. The stream is created
/// directly with the KV layout (what `create_key_value` would make: `KV_<bucket>` on
/// `$KV.<bucket>.>`, one value per key, rollups allowed, deletes denied, direct gets) —
/// `create_key_value` first reads the account's JetStream info, and that response does not
/// parse with serde_json's `arbitrary_precision`, which this crate needs for exact money.
pub async fn bucket(js: &async_nats::jetstream::Context, name: &str) -> anyhow::Result<kv::Store> {
    use async_nats::jetstream::stream;
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{name}"),
        description: Some("tokenledger routing decisions".into()),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    })
    .await?;
    Ok(js.get_key_value(name).await?)
}

/// Compute and publish every class's decision for one tenant.
pub async fn publish_tenant(
    engine: &Engine,
    store: &kv::Store,
    tenant: &str,
    trigger: &str,
) -> anyhow::Result<usize> {
    let (book, _) = engine.book().await?;
    let now = Utc::now();
    let Some(view) = tenant_view(engine.pool(), &book, tenant, now).await? else {
        return Ok(0);
    };
    let mut n = 0;
    for class in book.class_names(tenant, now) {
        if let Some(d) = decide(&book, &view, tenant, &class, now, trigger) {
            store
                .put(kv_key(tenant, &class), serde_json::to_vec(&d)?.into())
                .await?;
            n += 1;
        }
    }
    Ok(n)
}

/// The pricing role. The clock: publish each ended month's close for tenants with a
/// commitment. Routing decisions: publish every decision at start, then republish when the price book
/// or any term changes (every tenant), when the UTC day changes (periods roll over), and
/// when a tenant crosses a tier or reaches a budget limit (alert facts: that tenant).
pub async fn run_publisher(
    engine: Engine,
    bus: crate::bus::Bus,
    settings: crate::settings::Settings,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let js = bus.js.clone();
    let bucket_name = settings.routing_bucket.clone();
    let interval = settings.publish_interval;
    let mut closed = HashSet::new();
    let mut ticked = HashSet::new();
    // tenants whose reservation ran out in a minute: republish once that minute is over
    let mut refill: HashMap<String, String> = HashMap::new();
    // alert fact ids handled in the look-back window
    let mut seen: HashSet<i64> = HashSet::new();
    let mut store = None;
    let mut last_alert: Option<i64> = None;
    let mut last_stamp: BookStamp = -1;
    let mut last_day = None;
    let mut first = true;
    // our provider commitments used up this period (their ids)
    let mut spent: std::collections::BTreeSet<i64> = Default::default();
    let mut settled = HashSet::new();
    loop {
        if !first {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(interval) => {}
            }
        }
        first = false;
        if let Err(e) = close_ended_periods(&engine, &bus, &settings, &mut closed).await {
            tracing::warn!(error = %e, "publishing period closes failed; retrying");
        }
        if let Err(e) = tick_hourly(&engine, &bus, &settings, &mut ticked).await {
            tracing::warn!(error = %e, "publishing evaluation ticks failed; retrying");
        }
        if let Err(e) = publish_notes(&engine, &bus, &settings).await {
            tracing::warn!(error = %e, "publishing invoice notes failed; retrying");
        }
        if let Err(e) = settle_providers(&engine, &settings, &mut settled).await {
            tracing::warn!(error = %e, "settling provider terms failed; retrying");
        }
        let r: anyhow::Result<()> = async {
            if store.is_none() {
                store = Some(bucket(&js, &bucket_name).await?);
            }
            let kv = store.as_ref().expect("bucket");
            let pool = engine.pool();
            let newest: i64 = sqlx::query_scalar("select coalesce(max(id), 0) from alert_facts")
                .fetch_one(pool)
                .await?;
            // after the facts: a book as new as the one they were rated with (a cached
            // book could predate a term the writer already applied)
            let (book, stamp) = engine.book_now().await?;
            let today = Utc::now().date_naive();
            // one of our provider commitments used up: every tenant's ranking changes
            let exhausted = exhausted_provider_commitments(pool, &book).await?;
            let newly_exhausted = !exhausted.is_subset(&spent);
            spent = exhausted;
            if stamp != last_stamp || last_day != Some(today) {
                let trigger = match (last_stamp, last_day) {
                    (-1, _) => "startup",
                    (_, Some(d)) if d != today => "period",
                    _ => "price_book",
                };
                let tenants: Vec<String> = sqlx::query_scalar("select id from tenants order by id")
                    .fetch_all(pool)
                    .await?;
                for t in &tenants {
                    publish_tenant(&engine, kv, t, trigger).await?;
                }
                let startup = last_stamp == -1;
                last_stamp = stamp;
                last_day = Some(today);
                if startup {
                    last_alert = Some(newest);
                    return Ok(());
                }
                // and on to the facts: a tenant that crossed a tier in this same round is
                // published again with its own trigger
            }
            if newly_exhausted {
                let tenants: Vec<String> = sqlx::query_scalar("select id from tenants order by id")
                    .fetch_all(pool)
                    .await?;
                for t in &tenants {
                    publish_tenant(&engine, kv, t, "provider_commitment_exhausted").await?;
                }
            }
            let since = last_alert.unwrap_or(newest);
            // alert facts of parallel writers may commit out of id order: look back over a
            // window and skip what was already handled
            let rows: Vec<(i64, String, String)> = sqlx::query_as(
                "select id, tenant_id, type from alert_facts where id > $1 - 1000 and id <= $2
                   and (type in ('tier.crossed', 'commitment.exhausted', 'reservation.exhausted')
                        or (type = 'budget.threshold_crossed' and (payload->>'limit_reached')::bool))
                 order by id",
            )
            .bind(since)
            .bind(newest)
            .fetch_all(pool)
            .await?;
            let mut done = HashSet::new();
            let minute = crate::pricing::reservations::minute_of(Utc::now());
            seen.retain(|id| *id > since - 1000);
            for (id, t, ty) in rows {
                if !seen.insert(id) {
                    continue;
                }
                if ty == "reservation.exhausted" {
                    // headroom returns with the next minute: publish again then
                    refill.insert(t.clone(), minute.clone());
                }
                if done.insert(t.clone()) {
                    let trigger = match ty.as_str() {
                        "tier.crossed" => "tier_crossed",
                        "commitment.exhausted" => "commitment_exhausted",
                        "reservation.exhausted" => "reservation_exhausted",
                        _ => "budget_limit",
                    };
                    publish_tenant(&engine, kv, &t, trigger).await?;
                }
            }
            let due: Vec<String> = refill
                .iter()
                .filter(|(_, m)| **m < minute)
                .map(|(t, _)| t.clone())
                .collect();
            for t in due {
                refill.remove(&t);
                if done.insert(t.clone()) {
                    publish_tenant(&engine, kv, &t, "reservation_minute").await?;
                }
            }
            last_alert = Some(newest);
            Ok(())
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "routing decision publication failed; retrying");
        }
    }
}

/// Our provider commitments in force whose list capacity this period's usage has used up.
async fn exhausted_provider_commitments(
    pool: &PgPool,
    book: &PriceBook,
) -> anyhow::Result<std::collections::BTreeSet<i64>> {
    use crate::pricing::provider::{absorb, in_force};
    let mut out = std::collections::BTreeSet::new();
    if book.committed_providers().next().is_none() {
        return Ok(out);
    }
    let now = Utc::now();
    let rows: Vec<(String, String, String, Decimal)> = sqlx::query_as(
        "select provider, model, currency::text, sum(list_cost) from provider_period_costs
         where period = $1 group by 1, 2, 3",
    )
    .bind(period_of(now))
    .fetch_all(pool)
    .await?;
    let mut costs: BTreeMap<(String, String), BTreeMap<String, Decimal>> = BTreeMap::new();
    for (p, m, c, amount) in rows {
        costs.entry((p, c)).or_default().insert(m, amount);
    }
    for ((provider, currency), used) in &costs {
        let commitments = in_force(book.provider_commitment_versions(provider), currency, now);
        let (absorbed, _) = absorb(&commitments, used);
        for (c, took) in commitments.iter().zip(absorbed) {
            if took >= c.list_capacity() {
                out.insert(c.id);
            }
        }
    }
    Ok(out)
}

/// The clock's provider settlements: hourly (and at start), every month of the last year
/// that ended before the grace period is settled with the providers we hold terms with —
/// a new revision only where the month's list cost changed (late usage) or none exists.
async fn settle_providers(
    engine: &Engine,
    settings: &crate::settings::Settings,
    done: &mut HashSet<String>,
) -> anyhow::Result<()> {
    let now = Utc::now();
    let hour = crate::ledger::state::tick_hour(now);
    // once an hour; after a failure, again a minute later
    let retry = format!("retry:{}", now.format("%Y-%m-%dT%H:%M"));
    if done.contains(&hour) || done.contains(&retry) {
        return Ok(());
    }
    done.retain(|k| !k.starts_with("retry:"));
    done.insert(retry);
    let grace = chrono::Duration::from_std(settings.invoice_grace)?;
    let open = period_of(now - grace);
    let mut start =
        crate::pricing::tiers::period_start(&open).ok_or_else(|| anyhow::anyhow!("calendar"))?;
    let mut months = Vec::new();
    for _ in 0..12 {
        let p = period_of(start - chrono::Duration::nanoseconds(1));
        start =
            crate::pricing::tiers::period_start(&p).ok_or_else(|| anyhow::anyhow!("calendar"))?;
        months.push(p);
    }
    // oldest first
    for p in months.iter().rev() {
        crate::ledger::provider_settlement::settle_period(engine.pool(), p, now).await?;
    }
    done.clear();
    done.insert(hour);
    Ok(())
}

/// The id of a tenant's close event for a period: deterministic, so the clock and an
/// operator can both publish it and the ledger records it once.
pub fn close_event_id(period: &str) -> String {
    format!("period-close:{period}")
}

/// Publish a tenant's `period_close` system event for a period that has ended; returns
/// its id. Waits for JetStream's ack.
pub async fn publish_period_close(
    bus: &crate::bus::Bus,
    settings: &crate::settings::Settings,
    tenant: &str,
    period: &str,
) -> anyhow::Result<String> {
    let end = crate::pricing::tiers::period_end(period)
        .ok_or_else(|| anyhow::anyhow!("period must be YYYY-MM"))?;
    anyhow::ensure!(end <= Utc::now(), "period {period} has not ended");
    publish_system(
        bus,
        settings,
        tenant,
        close_event_id(period),
        end,
        "period_close",
        period,
    )
    .await
}

/// The id of a tenant's evaluation tick for an hour (deterministic: published twice, it is
/// one event).
pub fn tick_event_id(hour: &str) -> String {
    format!("evaluation-tick:{hour}")
}

/// Publish a tenant's `evaluation_tick` for the hour string `YYYY-MM-DDTHH` (the tick at
/// the top of that hour, which must have passed). Waits for JetStream's ack.
pub async fn publish_tick(
    bus: &crate::bus::Bus,
    settings: &crate::settings::Settings,
    tenant: &str,
    hour: &str,
) -> anyhow::Result<String> {
    let at = crate::ledger::state::tick_instant(hour)
        .ok_or_else(|| anyhow::anyhow!("hour must be YYYY-MM-DDTHH"))?;
    anyhow::ensure!(at <= Utc::now(), "tick {hour} is in the future");
    publish_system(
        bus,
        settings,
        tenant,
        tick_event_id(hour),
        at,
        "evaluation_tick",
        hour,
    )
    .await
}

/// Publish one system event to the tenant's log and wait for JetStream's ack.
async fn publish_system(
    bus: &crate::bus::Bus,
    settings: &crate::settings::Settings,
    tenant: &str,
    id: String,
    at: chrono::DateTime<Utc>,
    kind: &str,
    period: &str,
) -> anyhow::Result<String> {
    use crate::events::{Event, EventData, SystemData};
    let ev = Event::new(
        id,
        "tokenledger/clock".into(),
        at,
        EventData::System(SystemData {
            tenant_id: tenant.to_string(),
            kind: kind.into(),
            period: period.to_string(),
        }),
    );
    bus.publish_with_id(
        settings.usage_subject(tenant),
        ev.canonical.clone().into(),
        &ev.msg_id(),
    )
    .await?
    .await?;
    Ok(ev.id)
}

/// The clock's hourly ticks: for every tenant with a reservation that alerts on
/// under-utilisation, the tick at the top of the current hour, once.
async fn tick_hourly(
    engine: &Engine,
    bus: &crate::bus::Bus,
    settings: &crate::settings::Settings,
    done: &mut HashSet<(String, String)>,
) -> anyhow::Result<()> {
    let (book, _) = engine.book().await?;
    let hour = crate::ledger::state::tick_hour(Utc::now());
    let tenants: Vec<String> = book
        .reserving_tenants()
        .filter(|t| {
            book.reservation_versions(t)
                .values()
                .flatten()
                .any(|v| v.underutilization_alert_percent.is_some())
        })
        .filter(|t| !done.contains(&(t.to_string(), hour.clone())))
        .map(str::to_string)
        .collect();
    for t in tenants {
        let recorded: bool = sqlx::query_scalar(
            "select exists (select 1 from events where tenant_id = $1 and id = $2)",
        )
        .bind(&t)
        .bind(tick_event_id(&hour))
        .fetch_one(engine.pool())
        .await?;
        if !recorded {
            publish_tick(bus, settings, &t, &hour).await?;
        }
        done.insert((t, hour.clone()));
    }
    done.retain(|(_, h)| *h == hour);
    Ok(())
}

/// Publish a period's close for every tenant that existed before the period ended (or has
/// lines for it, e.g. backfilled usage) and has not closed it yet; returns those tenants. Each close is one system event (deterministic
/// id), so publishing twice, or from two processes at once, records one close per tenant.
pub async fn publish_closes(
    pool: &sqlx::PgPool,
    bus: &crate::bus::Bus,
    settings: &crate::settings::Settings,
    period: &str,
) -> anyhow::Result<Vec<String>> {
    let end = crate::pricing::tiers::period_end(period)
        .ok_or_else(|| anyhow::anyhow!("period must be YYYY-MM"))?;
    anyhow::ensure!(end <= Utc::now(), "period {period} has not ended");
    let tenants: Vec<String> = sqlx::query_scalar(
        "select t.id from tenants t
         where (t.created_at < $1
                or exists (select 1 from invoice_accruals a where a.tenant_id = t.id and a.period = $3))
           and not exists (select 1 from events e where e.tenant_id = t.id and e.id = $2
                           and e.type = 'tokenledger.system.v1')
         order by t.id",
    )
    .bind(end)
    .bind(close_event_id(period))
    .bind(period)
    .fetch_all(pool)
    .await?;
    for t in &tenants {
        publish_period_close(bus, settings, t, period).await?;
    }
    Ok(tenants)
}

/// Publish the adjustment of every stored credit/debit note the ledger does not hold 10 s
/// after it was issued (the API publishes it at once; this covers a failure there).
async fn publish_notes(
    engine: &Engine,
    bus: &crate::bus::Bus,
    settings: &crate::settings::Settings,
) -> anyhow::Result<()> {
    let notes =
        crate::invoices::store::unpublished_notes(engine.pool(), chrono::Duration::seconds(10))
            .await?;
    for (n, period) in notes {
        let ev = crate::invoices::store::note_event(&n, &period);
        bus.publish_with_id(
            settings.usage_subject(&n.tenant_id),
            ev.canonical.clone().into(),
            &ev.msg_id(),
        )
        .await?
        .await?;
    }
    Ok(())
}

/// The clock: once a month has ended and the grace period passed, publish its close for
/// every tenant (each close finalises that tenant's invoice); and, once an hour (and at
/// start), the closes still missing for the twelve months before (a clock that was down
/// over a month's end) and for any month with lines and no close (usage backfilled for a
/// tenant created after the month). Closes go out oldest month first.
async fn close_ended_periods(
    engine: &Engine,
    bus: &crate::bus::Bus,
    settings: &crate::settings::Settings,
    done: &mut HashSet<(String, String)>,
) -> anyhow::Result<()> {
    let now = Utc::now();
    let grace = chrono::Duration::from_std(settings.invoice_grace)?;
    // the month holding `now - grace` is not closable yet; every month before it is
    let open = period_of(now - grace);
    let start =
        crate::pricing::tiers::period_start(&open).ok_or_else(|| anyhow::anyhow!("calendar"))?;
    let last = period_of(start - chrono::Duration::nanoseconds(1));
    let mut due = std::collections::BTreeSet::new();
    if !done.contains(&(String::new(), last.clone())) {
        due.insert(last.clone());
    }
    let hour = ("backlog".to_string(), crate::ledger::state::tick_hour(now));
    if !done.contains(&hour) {
        // every month of the last year (a tenant with a commitment or a reservation and
        // no usage still has a close to bill), and any older month with lines and no close
        let mut p = last.clone();
        for _ in 0..12 {
            due.insert(p.clone());
            let Some(start) = crate::pricing::tiers::period_start(&p) else {
                break;
            };
            p = period_of(start - chrono::Duration::nanoseconds(1));
        }
        let backlog: Vec<String> = sqlx::query_scalar(
            "select distinct a.period from invoice_accruals a
             where a.period <= $1
               and not exists (select 1 from events e where e.tenant_id = a.tenant_id
                                 and e.id = 'period-close:' || a.period
                                 and e.type = 'tokenledger.system.v1')",
        )
        .bind(&last)
        .fetch_all(engine.pool())
        .await?;
        due.extend(backlog);
    }
    // oldest first, so invoice numbers follow the months
    for period in due {
        publish_closes(engine.pool(), bus, settings, &period).await?;
        done.insert((String::new(), period));
    }
    done.retain(|k| k.0.is_empty() || k == &hour);
    done.insert(hour);
    Ok(())
}
