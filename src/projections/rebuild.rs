//! Rebuild projections from the record (events + transfers, never by re-rating), and
//! verify: rebuilt == live, balances sum to zero, and re-rating under the recorded
//! versions reproduces every stored charge.

use futures::TryStreamExt;
use rust_decimal::Decimal;
use sqlx::{Executor, PgConnection, PgPool};

use crate::catalog::prices::load_book;
use crate::events::{self, EventData};
use crate::ledger::state::{close_period, rate_usage, CloseRecord, TenantState};
use crate::ledger::writer::terms_for;
use crate::pricing::{Breakdown, CustomerPrice, PriceBook, Terms};

/// Usage events with their rated amounts, straight from the record.
const REQUEST_SELECT: &str = "select * from request_views e where true";

/// Fill `{prefix}usage_rollups` and `{prefix}account_balances` from the record
/// (`request_views` is a plain view over it). With `delta`, only events after `rebuild_hwm` are added (rollups
/// and balances are added to, not replaced).
async fn populate(c: &mut PgConnection, prefix: &str, delta: bool) -> sqlx::Result<()> {
    let (filter, tfilter) = if delta {
        (
            " and e.seq > coalesce((select last_seq from rebuild_hwm h where h.tenant_id = e.tenant_id), 0)",
            " where x.seq > coalesce((select last_seq from rebuild_hwm h where h.tenant_id = x.tenant_id), 0)",
        )
    } else {
        ("", "")
    };
    c.execute(
        format!(
            "insert into {prefix}usage_rollups as r
             select tenant_id, (occurred_at at time zone 'UTC')::date, model, provider, api_key_id,
               count(*), sum(input_tokens), sum(cached_input_tokens), sum(cache_write_tokens),
               sum(output_tokens), sum(reasoning_tokens), sum(price_amount), sum(cost_amount), currency
             from ({REQUEST_SELECT}{filter}) q
             group by 1, 2, 3, 4, 5, currency
             {}",
            crate::rollup_add!()
        )
        .as_str(),
    )
    .await?;
    c.execute(
        format!(
            "insert into {prefix}account_balances as b
             select tenant_id, account, currency, sum(amount) from (
               select x.tenant_id, x.debit_account as account, x.currency, x.amount from transfers x{tfilter}
               union all
               select x.tenant_id, x.credit_account, x.currency, -x.amount from transfers x{tfilter}
             ) m group by 1, 2, 3
             on conflict (tenant_id, account, currency) do update set balance = b.balance + excluded.balance"
        )
        .as_str(),
    )
    .await?;
    // tier positions: the sums of the tier part of each usage event's stored breakdown
    // (on its first leg); a period's charged amount is net of volume credits
    c.execute(
        format!(
            "insert into {prefix}tier_positions as p
             select x.tenant_id, t->>'schedule', t->>'period', sum((t->>'units')::numeric),
               sum((t->>'list')::numeric),
               sum((t->>'price')::numeric - coalesce((t->>'credit')::numeric, 0))
             from transfers x cross join lateral (select x.breakdown->'tier' as t) b
             where x.leg = 0 and x.kind <> 'adjustment' and t is not null{}
             group by 1, 2, 3
             on conflict (tenant_id, schedule, period) do update set units = p.units + excluded.units,
               list = p.list + excluded.list, charged = p.charged + excluded.charged",
            tfilter.replacen(" where", " and", 1)
        )
        .as_str(),
    )
    .await?;
    // budget spend: each usage event's price, for every budget its breakdown counted it in
    c.execute(
        format!(
            "insert into {prefix}budget_spend as s
             select x.tenant_id, b->>'budget', b->>'period', sum(p.amount)
             from transfers x
             cross join lateral json_array_elements(x.breakdown->'budgets') b
             join transfers p on p.tenant_id = x.tenant_id and p.seq = x.seq
               and p.kind in ('usage_price', 'commitment_drawdown')
             where x.leg = 0 and x.kind <> 'adjustment' and x.breakdown->'budgets' is not null{}
             group by 1, 2, 3
             on conflict (tenant_id, budget, period) do update set spent = s.spent + excluded.spent",
            tfilter.replacen(" where", " and", 1)
        )
        .as_str(),
    )
    .await?;
    // commitment positions: drawdowns from usage breakdowns, closes from close lines
    let f = tfilter.replacen(" where", " and", 1);
    c.execute(
        format!(
            "insert into {prefix}commitment_positions as p
             select tenant_id, c, per, sum(drawn), bool_or(closed) from (
               select x.tenant_id, x.breakdown->'commitment'->>'commitment' as c,
                 x.breakdown->'commitment'->>'period' as per,
                 (x.breakdown->'commitment'->>'drawdown')::numeric as drawn, false as closed
               from transfers x
               where x.leg = 0 and x.kind not in ('adjustment', 'commitment_billed', 'reservation_fee')
                 and x.breakdown->'commitment' is not null{f}
               union all
               select x.tenant_id, c->>'commitment', x.breakdown->>'period', 0, true
               from transfers x
               cross join lateral json_array_elements(x.breakdown->'commitments') c
               where x.leg = 0 and x.kind in ('commitment_billed', 'reservation_fee')
                 and x.breakdown->'commitments' is not null{f}
             ) q group by 1, 2, 3
             on conflict (tenant_id, commitment, period) do update set drawn = p.drawn + excluded.drawn,
               closed = p.closed or excluded.closed"
        )
        .as_str(),
    )
    .await?;
    // reservation usage: covered tokens per minute from usage breakdowns
    c.execute(
        format!(
            "insert into {prefix}reservation_usage as u
             select x.tenant_id, x.breakdown->'reservation'->>'reservation',
               x.breakdown->'reservation'->>'minute',
               sum((select sum(v::int8) from json_array_elements_text(x.breakdown->'reservation'->'covered') v))
             from transfers x
             where x.leg = 0 and x.kind not in ('adjustment', 'commitment_billed', 'reservation_fee')
               and x.breakdown->'reservation' is not null{f}
             group by 1, 2, 3
             on conflict (tenant_id, reservation, minute) do update set covered = u.covered + excluded.covered"
        )
        .as_str(),
    )
    .await?;
    // tokens per provider, model and minute under our provider reservations
    c.execute(
        format!(
            "insert into {prefix}provider_usage_minutes as m (provider, model, minute, lane, tokens)
             select e.provider, e.model,
               to_char(e.occurred_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI'),
               get_byte(sha256(convert_to(e.tenant_id, 'UTF8')), 0) % 16,
               sum(e.input_tokens + e.output_tokens)
             from events e
             where e.type = 'tokenledger.usage.v1'
               and exists (select 1 from provider_reservations r where r.provider = e.provider
                 and r.model = e.model and r.effective_from <= e.occurred_at){filter}
             group by 1, 2, 3, 4
             on conflict (provider, model, minute, lane) do update set tokens = m.tokens + excluded.tokens"
        )
        .as_str(),
    )
    .await?;
    // list cost per provider, model, month and currency (what our provider commitments draw on)
    c.execute(
        format!(
            "insert into {prefix}provider_period_costs as m
               (provider, model, period, currency, lane, list_cost)
             select e.provider, e.model, to_char(e.occurred_at at time zone 'UTC', 'YYYY-MM'),
               x.currency, get_byte(sha256(convert_to(e.tenant_id, 'UTF8')), 0) % 16, sum(x.amount)
             from events e
             join transfers x on x.tenant_id = e.tenant_id and x.seq = e.seq and x.kind = 'usage_cost'
             where e.type = 'tokenledger.usage.v1'{filter}
             group by 1, 2, 3, 4, 5
             on conflict (provider, model, period, currency, lane)
               do update set list_cost = m.list_cost + excluded.list_cost"
        )
        .as_str(),
    )
    .await?;
    Ok(())
}

const TABLES: [&str; 8] = [
    "usage_rollups",
    "account_balances",
    "tier_positions",
    "budget_spend",
    "commitment_positions",
    "reservation_usage",
    "provider_usage_minutes",
    "provider_period_costs",
];

/// The SQL that makes `rebuild_<t>`, empty, shaped like `t`: columns, defaults,
/// constraints and indexes (`including all`), and its storage parameters, which `like`
/// does not copy (the hot upsert tables keep a low fillfactor for in-place updates).
fn shadow_of(t: &str) -> String {
    format!(
        "drop table if exists rebuild_{t}; create table rebuild_{t} (like {t} including all);
         do $$ declare o text[]; begin
           select reloptions into o from pg_class where oid = '{t}'::regclass;
           if o is not null then
             execute format('alter table rebuild_{t} set (%s)', array_to_string(o, ', '));
           end if;
         end $$"
    )
}

/// Rebuild every projection into shadow tables and swap them in. Safe while `serve`
/// runs: the bulk of the work reads a snapshot; the swap locks `tenant_heads` (so
/// writers pause), adds what was appended since the snapshot, and renames.
/// Must run as the owning role.
pub async fn rebuild(owner: &PgPool) -> anyhow::Result<()> {
    let mut c = owner.acquire().await?;
    c.execute("begin isolation level repeatable read").await?;
    for t in TABLES {
        c.execute(shadow_of(t).as_str()).await?;
    }
    // the operator's settlement transfers are numbered by their settlement's id
    c.execute(
        "drop table if exists rebuild_hwm; create table rebuild_hwm as
         select tenant_id, last_seq from tenant_heads
         union all select '_operator', coalesce(max(id), 0) from provider_settlements",
    )
    .await?;
    populate(&mut c, "rebuild_", false).await?;
    // invoice lines: the record replayed in ledger order (late lines need the closes)
    c.execute(shadow_of("invoice_accruals").as_str()).await?;
    let r = crate::invoices::replay(&mut c, None).await?;
    crate::invoices::write_accruals(&mut c, "rebuild_invoice_accruals", &r.accruals).await?;
    c.execute("commit").await?;

    c.execute("begin").await?;
    c.execute("lock table tenant_heads in exclusive mode")
        .await?;
    populate(&mut c, "rebuild_", true).await?;
    let r = crate::invoices::replay(&mut c, Some("rebuild_hwm")).await?;
    crate::invoices::write_accruals(&mut c, "rebuild_invoice_accruals", &r.accruals).await?;
    for t in TABLES.iter().chain(&["invoice_accruals"]) {
        c.execute(
            format!(
                "drop table {t}; alter table rebuild_{t} rename to {t};
                 grant select, insert, update on {t} to tokenledger_app"
            )
            .as_str(),
        )
        .await?;
    }
    c.execute("drop table rebuild_hwm").await?;
    c.execute("commit").await?;
    Ok(())
}

/// What `verify` found; empty `differences` means the ledger checks out.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub events_rerated: u64,
    pub differences: Vec<String>,
}

/// Rebuild into scratch tables and compare with live, check the balance invariant, and
/// re-rate every usage event under its recorded versions. Read-only on live data.
pub async fn verify(owner: &PgPool) -> anyhow::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut c = owner.acquire().await?;
    c.execute("begin isolation level repeatable read").await?;
    for t in TABLES {
        c.execute(
            format!("create temp table scratch_{t} (like {t} including all) on commit drop")
                .as_str(),
        )
        .await?;
    }
    populate(&mut c, "scratch_", false).await?;
    for t in TABLES {
        for (a, b, side) in [
            (t.to_string(), format!("scratch_{t}"), "live only"),
            (format!("scratch_{t}"), t.to_string(), "rebuilt only"),
        ] {
            let rows: Vec<(String,)> = sqlx::query_as(&format!(
                "select row_to_json(x)::text from (select * from {a} except select * from {b}) x limit 5"
            ))
            .fetch_all(&mut *c)
            .await?;
            for (r,) in rows {
                report.differences.push(format!("{t}: {side}: {r}"));
            }
        }
    }
    // the open-hold index holds exactly the unexpired holds the record leaves unsettled
    let holds: Vec<(String,)> = sqlx::query_as(
        "with rec as (select h.hold_id, h.budget, h.tenant_id, h.period,
                        h.amount - coalesce((select sum(d.amount) from auth_lease_draws d
                          where d.lease_id = h.hold_id and d.budget = h.budget), 0) as amount,
                        h.expires_at
                      from auth_hold_budgets h
                      where h.expires_at > now()
                        and not exists (select 1 from auth_settlements s where s.hold_id = h.hold_id
                                          and s.tenant_id = h.tenant_id)),
              idx as (select hold_id, budget, tenant_id, period, amount, expires_at from open_holds
                      where expires_at > now())
         select 'open_holds: index only: ' || row_to_json(x)::text from (select * from idx except select * from rec) x
         union all
         select 'open_holds: record only: ' || row_to_json(x)::text from (select * from rec except select * from idx) x
         limit 10",
    )
    .fetch_all(&mut *c)
    .await?;
    report.differences.extend(holds.into_iter().map(|(d,)| d));
    let unbalanced: Vec<(String, Decimal)> = sqlx::query_as(
        "select currency::text, sum(balance) from account_balances group by currency having sum(balance) <> 0",
    )
    .fetch_all(&mut *c)
    .await?;
    for (cur, sum) in unbalanced {
        report
            .differences
            .push(format!("balances in {cur} sum to {sum}, not zero"));
    }
    // invoice lines replayed vs the projection, invoices vs the record and the receivable
    let r = crate::invoices::replay(&mut c, None).await?;
    report
        .differences
        .extend(crate::invoices::check(&mut c, &r, None).await?);
    let book = load_book(&mut c).await?;
    rerate(&mut c, &book, &mut report).await?;
    report
        .differences
        .extend(crate::ledger::provider_settlement::check(&mut c, &book).await?);
    c.execute("rollback").await?;
    Ok(report)
}

/// One usage event as recorded: its envelope and what its transfers say.
#[derive(sqlx::FromRow)]
struct Recorded {
    tenant_id: String,
    id: String,
    occurred_at: chrono::DateTime<chrono::Utc>,
    envelope: Vec<u8>,
    currency: String,
    breakdown: Option<String>,
    price: Decimal,
    billed: Decimal,
    true_up: Decimal,
    fees: Decimal,
    cost: Decimal,
    credit: Decimal,
    legs: i64,
}

async fn rerate(
    c: &mut PgConnection,
    book: &PriceBook,
    report: &mut VerifyReport,
) -> anyhow::Result<()> {
    let mut rows = sqlx::query_as::<_, Recorded>(
        "select e.tenant_id, e.id, e.occurred_at, e.envelope, t.currency::text as currency,
           (select b.breakdown::text from transfers b
             where b.tenant_id = e.tenant_id and b.seq = e.seq and b.leg = 0) as breakdown,
           coalesce(sum(x.amount) filter (where x.kind in ('usage_price', 'commitment_drawdown')), 0) as price,
           coalesce(sum(x.amount) filter (where x.kind = 'commitment_billed'), 0) as billed,
           coalesce(sum(x.amount) filter (where x.kind = 'commitment_true_up'), 0) as true_up,
           coalesce(sum(x.amount) filter (where x.kind = 'reservation_fee'), 0) as fees,
           coalesce(sum(x.amount) filter (where x.kind = 'usage_cost'), 0) as cost,
           coalesce(sum(x.amount) filter (where x.kind = 'tier_credit'), 0) as credit,
           count(x.leg) as legs
         from events e join tenants t on t.id = e.tenant_id
         left join transfers x on x.tenant_id = e.tenant_id and x.seq = e.seq
         where e.type in ('tokenledger.usage.v1', 'tokenledger.system.v1')
         group by e.tenant_id, e.id, e.seq, e.occurred_at, e.envelope, t.currency
         order by e.tenant_id, e.seq",
    )
    .fetch(&mut *c);
    // tier positions and budget spend replayed in ledger order, as the writer moved them;
    // the budget alerts the replay raises
    let mut state = TenantState::default();
    let mut alerts = std::collections::BTreeSet::new();
    while let Some(row) = rows.try_next().await? {
        report.events_rerated += 1;
        if let Some(d) = rerate_one(book, row, &mut state, &mut alerts) {
            report.differences.push(d);
            if report.differences.len() >= 20 {
                return Ok(());
            }
        }
    }
    drop(rows);
    // every ledger alert fact is one the replay raises, and the other way round
    let recorded: std::collections::BTreeSet<AlertKey> = sqlx::query_as(
        "select tenant_id, type || ' ' || unique_key from alert_facts
         where type in ('budget.threshold_crossed', 'budget.exhausted', 'budget.forecast_exceeded',
           'tier.crossed', 'commitment.threshold_crossed', 'commitment.exhausted',
           'reservation.exhausted', 'reservation.underutilized')",
    )
    .fetch_all(&mut *c)
    .await?
    .into_iter()
    .collect();
    for (k, side) in [
        (
            recorded.difference(&alerts).next(),
            "recorded but not raised by replay",
        ),
        (
            alerts.difference(&recorded).next(),
            "raised by replay but not recorded",
        ),
    ] {
        if let Some((t, key)) = k {
            report
                .differences
                .push(format!("alert_facts: {t}: {key} {side}"));
        }
    }
    Ok(())
}

/// The recorded versions of a charge, from its stored breakdown.
fn recorded_terms<'b>(book: &'b PriceBook, b: &Breakdown) -> Result<Terms<'b>, String> {
    let cost = book
        .version_by_id(b.cost_version_id)
        .ok_or_else(|| format!("recorded cost version {} not found", b.cost_version_id))?;
    let price = match b.price_version_id {
        Some(p) => CustomerPrice::Explicit(
            book.version_by_id(p)
                .ok_or_else(|| format!("recorded price version {p} not found"))?,
        ),
        None => CustomerPrice::Markup(match b.markup_rule_id {
            Some(m) => Some(
                book.markup_by_id(m)
                    .ok_or_else(|| format!("recorded markup rule {m} not found"))?,
            ),
            None => None,
        }),
    };
    Ok(Terms { cost, price })
}

fn same_versions(a: &Terms<'_>, b: &Terms<'_>) -> bool {
    a.cost.id == b.cost.id
        && match (a.price, b.price) {
            (CustomerPrice::Explicit(x), CustomerPrice::Explicit(y)) => x.id == y.id,
            (CustomerPrice::Markup(x), CustomerPrice::Markup(y)) => {
                x.map(|r| r.id) == y.map(|r| r.id)
            }
            _ => false,
        }
}

/// (tenant, "type unique_key") of an alert fact.
type AlertKey = (String, String);

fn rerate_one(
    book: &PriceBook,
    r: Recorded,
    state: &mut TenantState,
    alerts: &mut std::collections::BTreeSet<AlertKey>,
) -> Option<String> {
    let who = format!("event {}/{}", r.tenant_id, r.id);
    let far = chrono::DateTime::<chrono::Utc>::MAX_UTC - chrono::Duration::days(1);
    let ev = match events::parse_bytes(&r.envelope, far) {
        Ok(ev) => ev,
        Err(e) => {
            return Some(format!(
                "{who}: stored envelope no longer validates: {}",
                e.summary()
            ))
        }
    };
    let u = match &ev.data {
        EventData::Usage(u) => u,
        EventData::System(x) if x.kind == "evaluation_tick" => {
            // a tick charges nothing; the alerts it raises are compared below
            let moves = crate::ledger::state::evaluate_tick(book, &x.tenant_id, &x.period, state);
            for (type_, key, _) in moves.alerts(&r.id, "") {
                alerts.insert((r.tenant_id.clone(), format!("{type_} {key}")));
            }
            return None;
        }
        EventData::System(x) => {
            // a period's close: replay it and compare with what it billed
            let (line, moves) = close_period(book, &x.tenant_id, &x.period, state);
            state.apply(&moves);
            state.closed.insert((x.tenant_id.clone(), x.period.clone()));
            let lines = line.iter().flat_map(|l| &l.commitments);
            let billed: Decimal = lines.clone().map(|c| c.amount).sum();
            let true_up: Decimal = lines.map(|c| c.true_up).sum();
            let fees: Decimal = line
                .iter()
                .flat_map(|l| &l.reservations)
                .map(|f| f.fee)
                .sum();
            let stored: Option<CloseRecord> = r
                .breakdown
                .as_deref()
                .and_then(|b| serde_json::from_str(b).ok());
            if stored != line || billed != r.billed || true_up != r.true_up || fees != r.fees {
                return Some(format!(
                    "{who}: replaying the period close gives billed {billed} true-up {true_up} reservation fees {fees}, recorded billed {} true-up {} fees {}",
                    r.billed, r.true_up, r.fees
                ));
            }
            return None;
        }
        EventData::Adjustment(_) => return None,
    };
    let in_force = terms_for(book, u, &r.currency, r.occurred_at);
    let (terms, stored) = match (&r.breakdown, r.legs) {
        // nothing was charged: whatever is in force must rate it at zero
        (None, 0) => match in_force {
            Ok(t) => (t, None),
            Err(e) => return Some(format!("{who}: {e}")),
        },
        (Some(text), _) => {
            let stored: Breakdown = match serde_json::from_str(text) {
                Ok(b) => b,
                Err(e) => return Some(format!("{who}: stored breakdown unreadable: {e}")),
            };
            let recorded = match recorded_terms(book, &stored) {
                Ok(t) => t,
                Err(e) => return Some(format!("{who}: {e}")),
            };
            match &in_force {
                Ok(now) if same_versions(now, &recorded) => {}
                _ => {
                    return Some(format!(
                        "{who}: recorded versions are not the ones in force at {}",
                        r.occurred_at
                    ))
                }
            }
            (recorded, Some(stored))
        }
        (None, _) => return Some(format!("{who}: transfers without a breakdown")),
    };
    match rate_usage(book, u, terms, r.occurred_at, state) {
        Ok((rt, moves)) => {
            state.apply(&moves);
            for (type_, key, _) in moves.alerts(&r.id, u.request_id.as_str()) {
                alerts.insert((r.tenant_id.clone(), format!("{type_} {key}")));
            }
            if stored.is_some_and(|b| b != rt.breakdown()) {
                return Some(format!(
                    "{who}: re-rating gives a different breakdown than the stored one"
                ));
            }
            let credit = rt.tier.as_ref().and_then(|t| t.credit).unwrap_or_default();
            if rt.price == r.price && rt.cost == r.cost && credit == r.credit {
                None
            } else {
                Some(format!(
                    "{who}: re-rated price {} cost {} tier credit {credit} but recorded price {} cost {} tier credit {}",
                    rt.price, rt.cost, r.price, r.cost, r.credit
                ))
            }
        }
        Err(e) => Some(format!("{who}: re-rating failed: {e}")),
    }
}
