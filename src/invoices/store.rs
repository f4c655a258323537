//! Invoices in Postgres: reading accruals, finalising an invoice inside the transaction that
//! applies its period's close, drafts, listings, and credit/debit notes.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use super::accrue::{Accrued, ClassTotals, LineKey};
use super::document::{build, seal, AccrualRow, Invoice};

/// One projection row as stored.
#[derive(sqlx::FromRow)]
pub struct StoredRow {
    pub tenant_id: String,
    pub period: String,
    pub line_key: String,
    pub kind: String,
    pub origin_period: String,
    pub provider: String,
    pub model: String,
    pub token_class: String,
    pub unit_price: Option<Decimal>,
    pub name: String,
    pub refs: String,
    pub description: String,
    pub quantity: Decimal,
    pub amount: Decimal,
    pub input_tokens: Decimal,
    pub cached_input_tokens: Decimal,
    pub cache_write_tokens: Decimal,
    pub output_tokens: Decimal,
    pub reasoning_tokens: Decimal,
    pub input_amount: Decimal,
    pub cached_input_amount: Decimal,
    pub cache_write_amount: Decimal,
    pub output_amount: Decimal,
    pub reasoning_amount: Decimal,
    pub input_rate: Option<Decimal>,
    pub cached_input_rate: Option<Decimal>,
    pub cache_write_rate: Option<Decimal>,
    pub output_rate: Option<Decimal>,
    pub reasoning_rate: Option<Decimal>,
}

impl StoredRow {
    pub fn row(self) -> AccrualRow {
        let tokens = [
            self.input_tokens,
            self.cached_input_tokens,
            self.cache_write_tokens,
            self.output_tokens,
            self.reasoning_tokens,
        ];
        let amounts = [
            self.input_amount,
            self.cached_input_amount,
            self.cache_write_amount,
            self.output_amount,
            self.reasoning_amount,
        ];
        let rates = [
            self.input_rate,
            self.cached_input_rate,
            self.cache_write_rate,
            self.output_rate,
            self.reasoning_rate,
        ];
        AccrualRow {
            key: LineKey {
                kind: self.kind,
                origin: self.origin_period,
                provider: self.provider,
                model: self.model,
                class: self.token_class,
                unit_price: self.unit_price,
                name: self.name,
                refs: self.refs,
            },
            totals: Accrued {
                quantity: self.quantity,
                amount: self.amount,
                description: self.description,
                classes: std::array::from_fn(|i| ClassTotals {
                    tokens: tokens[i],
                    amount: amounts[i],
                    rate: rates[i],
                }),
            },
        }
    }
}

/// Every column of the projection.
pub fn select_accruals() -> String {
    format!(
        "select tenant_id, period, line_key, {} from invoice_accruals",
        super::accrue::COLUMNS
    )
}

/// The accrued lines of a tenant's period.
pub async fn accruals(
    c: &mut PgConnection,
    tenant: &str,
    period: &str,
) -> sqlx::Result<Vec<AccrualRow>> {
    let r: Vec<StoredRow> = sqlx::query_as(&format!(
        "{} where tenant_id = $1 and period = $2",
        select_accruals()
    ))
    .bind(tenant)
    .bind(period)
    .fetch_all(c)
    .await?;
    Ok(r.into_iter().map(StoredRow::row).collect())
}

/// Finalise a tenant's invoice for a period, in the transaction that applies the period's
/// close (after the batch's accruals were written): the next gap-free number, the lines as
/// accrued, the sealed document, and an `invoice.finalized` alert fact for the webhooks.
pub async fn finalize(
    c: &mut PgConnection,
    tenant: &str,
    period: &str,
    currency: &str,
    close_event_id: &str,
    close_seq: i64,
    now: DateTime<Utc>,
) -> sqlx::Result<Invoice> {
    let lines = accruals(c, tenant, period).await?;
    let mut inv = build(tenant, period, currency, lines);
    let serial: i64 = sqlx::query_scalar(
        "update invoice_counters set last = last + 1 where series = 'INV' returning last",
    )
    .fetch_one(&mut *c)
    .await?;
    let number = format!("INV-{serial:06}");
    inv.number = Some(number.clone());
    inv.status = "finalized".into();
    inv.close_event_id = Some(close_event_id.into());
    inv.close_seq = Some(close_seq);
    inv.finalized_at = Some(now);
    let (doc, hash) = seal(&inv);
    inv.content_hash = Some(hash.clone());
    sqlx::query(
        "insert into invoices (number, serial, tenant_id, period, currency, close_event_id, close_seq,
           total, document, content_hash, finalized_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9::json, $10, $11)",
    )
    .bind(&number)
    .bind(serial)
    .bind(tenant)
    .bind(period)
    .bind(currency)
    .bind(close_event_id)
    .bind(close_seq)
    .bind(inv.total)
    .bind(&doc)
    .bind(&hash)
    .bind(now)
    .execute(&mut *c)
    .await?;
    let payload = serde_json::json!({
        "invoice_number": number,
        "period": period,
        "currency": currency,
        "total": inv.total.to_string(),
        "lines": inv.lines.len(),
        "content_hash": hash,
    });
    sqlx::query(
        "insert into alert_facts (tenant_id, type, unique_key, payload, occurred_at)
         values ($1, 'invoice.finalized', $2, $3::jsonb, $4)
         on conflict (tenant_id, type, unique_key) do nothing",
    )
    .bind(tenant)
    .bind(period)
    .bind(payload.to_string())
    .bind(crate::pricing::tiers::period_end(period).unwrap_or(now))
    .execute(&mut *c)
    .await?;
    Ok(inv)
}

/// A stored invoice, hash attached.
fn stored(doc: &str, hash: String) -> Result<Invoice, sqlx::Error> {
    let mut inv: Invoice =
        serde_json::from_str(doc).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    inv.content_hash = Some(hash);
    Ok(inv)
}

/// A finalised invoice by number (scoped to a tenant unless `tenant` is None).
pub async fn get(
    pool: &PgPool,
    number: &str,
    tenant: Option<&str>,
) -> sqlx::Result<Option<Invoice>> {
    let r: Option<(String, String)> = sqlx::query_as(
        "select document::text, content_hash from invoices where number = $1 and ($2::text is null or tenant_id = $2)",
    )
    .bind(number)
    .bind(tenant)
    .fetch_optional(pool)
    .await?;
    r.map(|(d, h)| stored(&d, h)).transpose()
}

/// The invoice of a tenant's period: the finalised one if the period is closed, else the
/// live draft from the accruals (None if the tenant does not exist).
pub async fn for_period(
    pool: &PgPool,
    tenant: &str,
    period: &str,
) -> sqlx::Result<Option<Invoice>> {
    let fin: Option<(String, String)> = sqlx::query_as(
        "select document::text, content_hash from invoices where tenant_id = $1 and period = $2",
    )
    .bind(tenant)
    .bind(period)
    .fetch_optional(pool)
    .await?;
    if let Some((d, h)) = fin {
        return stored(&d, h).map(Some);
    }
    let currency: Option<String> =
        sqlx::query_scalar("select currency::text from tenants where id = $1")
            .bind(tenant)
            .fetch_optional(pool)
            .await?;
    let Some(currency) = currency else {
        return Ok(None);
    };
    let mut c = pool.acquire().await?;
    let lines = accruals(&mut c, tenant, period).await?;
    Ok(Some(build(tenant, period, &currency, lines)))
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct InvoiceSummary {
    pub number: Option<String>,
    pub status: String,
    pub tenant_id: String,
    pub period: String,
    pub currency: String,
    #[schema(value_type = Option<String>)]
    pub total: Option<Decimal>,
    pub finalized_at: Option<DateTime<Utc>>,
    pub content_hash: Option<String>,
}

/// A tenant's invoices, newest period first: finalised ones, and a draft for every period
/// that has accrued lines and is not closed.
pub async fn list(
    pool: &PgPool,
    tenant: Option<&str>,
    period: Option<&str>,
) -> sqlx::Result<Vec<InvoiceSummary>> {
    sqlx::query_as(
        "select number, 'finalized' as status, tenant_id, period, currency::text as currency, total,
           finalized_at, content_hash from invoices
         where ($1::text is null or tenant_id = $1) and ($2::text is null or period = $2)
         union all
         select distinct null::text, 'draft', a.tenant_id, a.period, t.currency::text, null::numeric,
           null::timestamptz, null::text
         from invoice_accruals a join tenants t on t.id = a.tenant_id
         where ($1::text is null or a.tenant_id = $1) and ($2::text is null or a.period = $2)
           and not exists (select 1 from invoices i where i.tenant_id = a.tenant_id and i.period = a.period)
         order by 4 desc, 3, 1 nulls first
         limit 1000",
    )
    .bind(tenant)
    .bind(period)
    .fetch_all(pool)
    .await
}

/// Tenants that existed before a period ended or have lines for it (each gets an invoice) and, of those, the
/// ones whose invoice is finalised.
pub async fn close_status(pool: &PgPool, period: &str) -> sqlx::Result<(Vec<String>, Vec<String>)> {
    let end = crate::pricing::tiers::period_end(period).unwrap_or_else(Utc::now);
    let all: Vec<String> = sqlx::query_scalar(
        "select t.id from tenants t
         where t.created_at < $1
            or exists (select 1 from invoice_accruals a where a.tenant_id = t.id and a.period = $2)
         order by t.id",
    )
    .bind(end)
    .bind(period)
    .fetch_all(pool)
    .await?;
    let done: Vec<String> =
        sqlx::query_scalar("select tenant_id from invoices where period = $1 order by tenant_id")
            .bind(period)
            .fetch_all(pool)
            .await?;
    Ok((all, done))
}

/// A credit or debit note against a finalised invoice.
#[derive(Clone, Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Note {
    pub number: String,
    /// `credit` or `debit`.
    pub kind: String,
    pub tenant_id: String,
    pub invoice_number: String,
    /// The adjustment event that carries it into the ledger (settled on the next open invoice).
    pub event_id: String,
    #[schema(value_type = String)]
    pub amount: Decimal,
    pub currency: String,
    pub reason: String,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
}

/// The id prefix of the adjustment events that carry notes into the ledger.
pub const NOTE_EVENT_PREFIX: &str = "invoice-note:";

/// The adjustment event of a note: a deterministic function of the stored note (published
/// after the note commits, and again by the clock's sweep until the ledger has it; twice is
/// a duplicate, never a second credit).
pub fn note_event(n: &Note, invoice_period: &str) -> crate::events::Event {
    use crate::events::{AdjustmentData, Direction, Event, EventData};
    Event::new(
        n.event_id.clone(),
        "tokenledger/invoices".into(),
        n.created_at,
        EventData::Adjustment(AdjustmentData {
            tenant_id: n.tenant_id.clone(),
            direction: if n.kind == "credit" {
                Direction::Credit
            } else {
                Direction::Debit
            },
            amount: n.amount,
            currency: n.currency.clone(),
            reason: format!(
                "{} note {} for invoice {}: {}",
                n.kind, n.number, n.invoice_number, n.reason
            ),
            request_id: None,
            corrects_event_id: Some(crate::engine::close_event_id(invoice_period)),
        }),
    )
}

/// Notes whose adjustment the ledger does not hold yet, older than `age`: (note, the
/// invoice's period).
pub async fn unpublished_notes(
    pool: &PgPool,
    age: chrono::Duration,
) -> sqlx::Result<Vec<(Note, String)>> {
    let r: Vec<(String, String, String)> = sqlx::query_as(
        "select n.document::text, n.content_hash, i.period from invoice_notes n
         join invoices i on i.number = n.invoice_number
         where n.created_at < now() - $1::interval
           and not exists (select 1 from events e where e.tenant_id = n.tenant_id and e.id = n.event_id)
         order by n.serial limit 100",
    )
    .bind(format!("{} milliseconds", age.num_milliseconds()))
    .fetch_all(pool)
    .await?;
    r.into_iter()
        .map(|(d, h, p)| {
            let mut n: Note =
                serde_json::from_str(&d).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            n.content_hash = Some(h);
            Ok((n, p))
        })
        .collect()
}

/// Reserve a note's number and store it (the caller commits, then publishes its event).
pub async fn insert_note(
    c: &mut PgConnection,
    kind: &str,
    inv: &Invoice,
    amount: Decimal,
    reason: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Note> {
    let series = if kind == "credit" { "CN" } else { "DN" };
    let serial: i64 = sqlx::query_scalar(
        "update invoice_counters set last = last + 1 where series = $1 returning last",
    )
    .bind(series)
    .fetch_one(&mut *c)
    .await?;
    let number = format!("{series}-{serial:06}");
    // microseconds, as Postgres keeps it: the event rebuilt from the stored note is the same
    let now = chrono::SubsecRound::trunc_subsecs(now, 6);
    let mut note = Note {
        number: number.clone(),
        kind: kind.into(),
        tenant_id: inv.tenant_id.clone(),
        invoice_number: inv.number.clone().unwrap_or_default(),
        event_id: format!("{NOTE_EVENT_PREFIX}{}", uuid::Uuid::now_v7()),
        amount: amount.normalize(),
        currency: inv.currency.clone(),
        reason: reason.into(),
        created_at: now,
        content_hash: None,
    };
    let doc = serde_json::to_string(&note).expect("note serialises");
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(doc.as_bytes()));
    sqlx::query(
        "insert into invoice_notes (number, serial, kind, tenant_id, invoice_number, event_id, amount,
           currency, reason, document, content_hash, created_at)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::json, $11, $12)",
    )
    .bind(&number)
    .bind(serial)
    .bind(kind)
    .bind(&note.tenant_id)
    .bind(&note.invoice_number)
    .bind(&note.event_id)
    .bind(note.amount)
    .bind(&note.currency)
    .bind(reason)
    .bind(&doc)
    .bind(&hash)
    .bind(now)
    .execute(&mut *c)
    .await?;
    note.content_hash = Some(hash);
    Ok(note)
}

/// Notes against an invoice.
pub async fn notes(pool: &PgPool, invoice: &str) -> sqlx::Result<Vec<Note>> {
    let r: Vec<(String, String)> = sqlx::query_as(
        "select document::text, content_hash from invoice_notes where invoice_number = $1 order by serial",
    )
    .bind(invoice)
    .fetch_all(pool)
    .await?;
    r.into_iter()
        .map(|(d, h)| {
            let mut n: Note =
                serde_json::from_str(&d).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            n.content_hash = Some(h);
            Ok(n)
        })
        .collect()
}
