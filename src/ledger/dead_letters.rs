//! Dead letters: listing, inspection, and the record of re-drives.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

#[derive(Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct DeadLetter {
    pub id: i64,
    /// Stable code: invalid_event, unknown_tenant, unpriced_model, subject_mismatch,
    /// currency_mismatch, rating_failed.
    pub reason: String,
    pub detail: String,
    pub subject: String,
    pub tenant_id: Option<String>,
    pub event_id: Option<String>,
    pub stream_seq: Option<i64>,
    pub recorded_at: DateTime<Utc>,
    /// Times it was re-driven.
    pub redrives: i64,
    /// Whether an event with this tenant and id is now in the ledger.
    pub resolved: bool,
    /// The message as received (UTF-8; lossy if it was not).
    pub payload: String,
}

const SELECT: &str = "select d.id, d.reason, d.detail, d.subject, d.tenant_id, d.event_id, d.stream_seq,
    d.recorded_at, (select count(*) from dead_letter_redrives r where r.dead_letter_id = d.id) as redrives,
    exists (select 1 from events e where e.tenant_id = d.tenant_id and e.id = d.event_id) as resolved,
    convert_from(d.payload, 'UTF8') as payload
    from dead_letters d";

pub async fn list(
    pool: &PgPool,
    reason: Option<&str>,
    tenant: Option<&str>,
    unresolved_only: bool,
    after_id: i64,
    limit: i64,
) -> sqlx::Result<Vec<DeadLetter>> {
    sqlx::query_as(&format!(
        "select * from ({SELECT}) x where ($1::text is null or reason = $1)
           and ($2::text is null or tenant_id = $2) and (not $3 or not resolved) and id > $4
         order by id limit $5"
    ))
    .bind(reason)
    .bind(tenant)
    .bind(unresolved_only)
    .bind(after_id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

pub async fn get(pool: &PgPool, id: i64) -> sqlx::Result<Option<DeadLetter>> {
    sqlx::query_as(&format!("{SELECT} where d.id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// The raw payload and subject, for re-driving.
pub async fn payload(pool: &PgPool, id: i64) -> sqlx::Result<Option<(String, Vec<u8>)>> {
    sqlx::query_as("select subject, payload from dead_letters where id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Record a re-drive; returns its id (used in the republished message id).
pub async fn record_redrive(pool: &PgPool, id: i64) -> sqlx::Result<i64> {
    sqlx::query_scalar("insert into dead_letter_redrives (dead_letter_id) values ($1) returning id")
        .bind(id)
        .fetch_one(pool)
        .await
}
