//! Connection pools and migrations.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let opts = PgConnectOptions::from_str(url)?.log_statements(tracing::log::LevelFilter::Trace);
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // a broken connection shows as a failed statement, which every caller retries
        // or reports; a ping before each use cost the writer a round trip per batch
        .test_before_acquire(false)
        .connect_with(opts)
        .await?;
    Ok(pool)
}

/// Create the database named in `owner_url` if it does not exist, then migrate it as the
/// owning role.
pub async fn migrate(owner_url: &str) -> anyhow::Result<()> {
    ensure_database(owner_url).await?;
    let pool = connect(owner_url, 2).await?;
    MIGRATOR.run(&pool).await?;
    // where the server uses password auth, give the runtime role its password
    if let Ok(pw) = std::env::var("TOKENLEDGER_APP_ROLE_PASSWORD") {
        let quoted = pw.replace('\'', "''");
        pool.execute(format!("alter role tokenledger_app password '{quoted}'").as_str())
            .await?;
    }
    pool.close().await;
    Ok(())
}

/// Create the database of `url` (connecting to the `postgres` database to do it).
pub async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let opts = PgConnectOptions::from_str(url)?;
    let name = opts
        .get_database()
        .ok_or_else(|| anyhow::anyhow!("the database URL names no database"))?
        .to_string();
    anyhow::ensure!(
        name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "database name {name:?} must be [A-Za-z0-9_]"
    );
    let admin = opts.database("postgres");
    let mut conn = sqlx::PgConnection::connect_with(&admin).await?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        let r = conn
            .execute(format!("create database \"{name}\"").as_str())
            .await;
        if let Err(e) = r {
            // another process may have created it meanwhile
            let dup = e.as_database_error().and_then(|d| d.code()).as_deref() == Some("42P04");
            if !dup {
                return Err(e.into());
            }
        }
    }
    Ok(())
}

use sqlx::Connection;
