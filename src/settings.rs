//! Settings from the environment, with defaults that work on a developer machine.

use std::time::Duration;

/// Everything the service reads from its environment.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Runtime role: `DATABASE_URL`.
    pub database_url: String,
    /// Owning role, used only by `migrate`, `rebuild` and `verify`:
    /// `TOKENLEDGER_OWNER_DATABASE_URL`.
    pub owner_database_url: String,
    pub nats_url: String,
    /// `TOKENLEDGER_HTTP_ADDR`, e.g. `127.0.0.1:8080`; port 0 picks a free port.
    pub http_addr: String,
    /// Operator token for `/v1/admin/*` and adjustments: `TOKENLEDGER_ADMIN_TOKEN`.
    pub admin_token: String,
    /// Name of the usage stream (`TOKENLEDGER_STREAM`, default `USAGE`).
    pub stream: String,
    /// Prefix put before `usage.v1.<tenant>` (`TOKENLEDGER_SUBJECT_PREFIX`, default empty);
    /// lets tests share one nats-server.
    pub subject_prefix: String,
    /// Durable consumer of the ledger writer (`TOKENLEDGER_CONSUMER`, default `ledger-writer`).
    pub consumer: String,
    /// Most events the writer applies in one transaction (`TOKENLEDGER_BATCH_MAX`).
    pub batch_max: usize,
    /// How long the writer waits to fill a batch after its first message
    /// (`TOKENLEDGER_BATCH_WAIT_MS`, default 2; under full load batches fill before it).
    pub batch_wait: Duration,
    /// Batches the writer checks against the stored event keys before staging them, after
    /// it starts and after a batch met a stored key at the unique indexes
    /// (`TOKENLEDGER_WRITER_LOOKUP_BATCHES`, default 8); other batches are staged
    /// without that read and the unique indexes refuse them if they hold a duplicate.
    pub writer_lookup_batches: u32,
    /// JetStream ack wait of the writer's consumer (`TOKENLEDGER_ACK_WAIT_MS`).
    pub ack_wait: Duration,
    /// Accepted clock skew: new prices take effect no earlier than now plus this
    /// (`TOKENLEDGER_CLOCK_SKEW_SECS`, default 300).
    pub clock_skew: Duration,
    /// How long after a month ends the clock waits before closing it for every tenant, so
    /// usage delivered late still lands in its own month
    /// (`TOKENLEDGER_INVOICE_GRACE_SECS`, default 3600).
    pub invoice_grace: Duration,
    /// Roles `serve` runs: `api`, `writer`, `pricing`, `webhooks`, `router`
    /// (`TOKENLEDGER_ROLES`, default `api,writer,pricing,webhooks`).
    pub roles: Vec<String>,
    /// Test-only fault injection: abort the process right after the N-th batch commits,
    /// before acknowledging it (`TOKENLEDGER_FAULT_ABORT_AFTER_COMMIT`).
    pub fault_abort_after_commit: Option<u64>,
    pub db_max_connections: u32,
    /// Writer tasks in one process (`TOKENLEDGER_WRITERS`, default 2); tenants are
    /// partitioned among them.
    pub writers: usize,
    /// How long an unsettled pre-authorisation hold counts against budgets
    /// (`TOKENLEDGER_HOLD_TTL_SECS`, default 3600). Must be at least as long as a producer
    /// may keep a usage event spooled before publishing it.
    pub hold_ttl: Duration,
    /// How often the router's grants from budget leases are written behind, together
    /// (`TOKENLEDGER_GRANT_FLUSH_MS`).
    pub grant_flush: Duration,
    /// How long the router gathers usage events into one publishing round after the first
    /// arrives (`TOKENLEDGER_PUBLISH_LINGER_MS`, default 5): the events of a round reach
    /// NATS, JetStream's store and the ledger's consumer together instead of one by one.
    /// It delays the ledger, never a response.
    pub publish_linger: Duration,
    /// NATS KV bucket of routing decisions (`TOKENLEDGER_ROUTING_BUCKET`, default
    /// `routing`).
    pub routing_bucket: String,
    /// How often the pricing role looks for changes that re-rank decisions
    /// (`TOKENLEDGER_PUBLISH_INTERVAL_MS`, default 500).
    pub publish_interval: Duration,
    /// Where the `router` role listens (`TOKENLEDGER_ROUTER_ADDR`, default
    /// `127.0.0.1:8081`; port 0 picks a free port).
    pub router_addr: String,
    /// The router's upstream file (`TOKENLEDGER_ROUTER_CONFIG`, default
    /// `config/router.json`), reloaded when it changes.
    pub router_config: std::path::PathBuf,
    pub webhooks: WebhookSettings,
}

/// The webhook dispatcher's settings.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// Delay before each attempt, the first counted from the alert
    /// (`TOKENLEDGER_WEBHOOK_RETRY_SCHEDULE`, seconds, comma-separated; default
    /// `0,5,300,1800,7200,18000,36000,36000`: eight attempts over 27.6 hours).
    pub schedule: Vec<Duration>,
    /// Whole-attempt timeout, connection included (`TOKENLEDGER_WEBHOOK_TIMEOUT_MS`,
    /// default 15000, at most 60000).
    pub timeout: Duration,
    /// An endpoint failing for this long without a success is disabled
    /// (`TOKENLEDGER_WEBHOOK_DISABLE_AFTER_SECS`, default 432000: five days).
    pub disable_after: Duration,
    /// Destinations exempt from the address guard, and the only ones that may use plain
    /// http (`TOKENLEDGER_WEBHOOK_ALLOW`: comma-separated `ip`, `ip/prefix` or `ip:port`,
    /// `[v6]:port`; default none).
    pub allow: Vec<crate::webhooks::guard::Allow>,
    /// How often the dispatcher looks for new alert facts and due messages
    /// (`TOKENLEDGER_WEBHOOK_POLL_MS`, default 100).
    pub poll: Duration,
    /// Deliveries in flight per dispatcher (`TOKENLEDGER_WEBHOOK_CONCURRENCY`, default 32).
    pub concurrency: usize,
}

impl WebhookSettings {
    pub fn from_env() -> anyhow::Result<Self> {
        let schedule = var(
            "TOKENLEDGER_WEBHOOK_RETRY_SCHEDULE",
            "0,5,300,1800,7200,18000,36000,36000",
        )
        .split(',')
        .map(|x| {
            x.trim()
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f <= 86_400.0 * 7.0)
                .map(|f| Duration::from_micros((f * 1e6).round() as u64))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "TOKENLEDGER_WEBHOOK_RETRY_SCHEDULE: {x:?} is not a delay in seconds"
                    )
                })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            !schedule.is_empty(),
            "TOKENLEDGER_WEBHOOK_RETRY_SCHEDULE needs at least one attempt"
        );
        let allow = var("TOKENLEDGER_WEBHOOK_ALLOW", "")
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|x| {
                x.parse()
                    .map_err(|e| anyhow::anyhow!("TOKENLEDGER_WEBHOOK_ALLOW: {x:?}: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(WebhookSettings {
            schedule,
            timeout: Duration::from_millis(
                parse("TOKENLEDGER_WEBHOOK_TIMEOUT_MS", 15_000u64)?.clamp(100, 60_000),
            ),
            disable_after: Duration::from_secs(parse(
                "TOKENLEDGER_WEBHOOK_DISABLE_AFTER_SECS",
                432_000u64,
            )?),
            allow,
            poll: Duration::from_millis(
                parse("TOKENLEDGER_WEBHOOK_POLL_MS", 100u64)?.clamp(5, 10_000),
            ),
            concurrency: parse("TOKENLEDGER_WEBHOOK_CONCURRENCY", 32usize)?.clamp(1, 1024),
        })
    }
}

fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn parse<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

pub const DEFAULT_DATABASE_URL: &str = "postgres://tokenledger_app@127.0.0.1:5432/tokenledger";
pub const DEFAULT_OWNER_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tokenledger";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_ADMIN_TOKEN: &str = "tl_admin_dev_only";

impl Settings {
    pub fn from_env() -> anyhow::Result<Self> {
        let roles = var("TOKENLEDGER_ROLES", "api,writer,pricing,webhooks")
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>();
        for r in &roles {
            anyhow::ensure!(
                ["api", "writer", "pricing", "router", "webhooks"].contains(&r.as_str()),
                "unknown role {r:?} in TOKENLEDGER_ROLES (known: api, writer, pricing, router, webhooks)"
            );
        }
        let fault = match std::env::var("TOKENLEDGER_FAULT_ABORT_AFTER_COMMIT") {
            Ok(v) => Some(v.parse()?),
            Err(_) => None,
        };
        Ok(Settings {
            database_url: var("DATABASE_URL", DEFAULT_DATABASE_URL),
            owner_database_url: var("TOKENLEDGER_OWNER_DATABASE_URL", DEFAULT_OWNER_DATABASE_URL),
            nats_url: var("NATS_URL", DEFAULT_NATS_URL),
            http_addr: var("TOKENLEDGER_HTTP_ADDR", "127.0.0.1:8080"),
            admin_token: var("TOKENLEDGER_ADMIN_TOKEN", DEFAULT_ADMIN_TOKEN),
            stream: var("TOKENLEDGER_STREAM", "USAGE"),
            subject_prefix: var("TOKENLEDGER_SUBJECT_PREFIX", ""),
            consumer: var("TOKENLEDGER_CONSUMER", "ledger-writer"),
            batch_max: parse("TOKENLEDGER_BATCH_MAX", 1000usize)?.clamp(1, 5000),
            batch_wait: Duration::from_millis(parse("TOKENLEDGER_BATCH_WAIT_MS", 2u64)?),
            writer_lookup_batches: parse(
                "TOKENLEDGER_WRITER_LOOKUP_BATCHES",
                crate::ledger::writer::LOOKUP_BATCHES,
            )?,
            ack_wait: Duration::from_millis(parse("TOKENLEDGER_ACK_WAIT_MS", 30_000u64)?),
            clock_skew: Duration::from_secs(parse("TOKENLEDGER_CLOCK_SKEW_SECS", 300u64)?),
            invoice_grace: Duration::from_secs(parse("TOKENLEDGER_INVOICE_GRACE_SECS", 3600u64)?),
            hold_ttl: Duration::from_secs(parse("TOKENLEDGER_HOLD_TTL_SECS", 3600u64)?),
            grant_flush: Duration::from_millis(parse(
                "TOKENLEDGER_GRANT_FLUSH_MS",
                crate::authorize::GRANT_FLUSH_MS,
            )?),
            publish_linger: Duration::from_millis(parse("TOKENLEDGER_PUBLISH_LINGER_MS", 5u64)?),
            routing_bucket: var("TOKENLEDGER_ROUTING_BUCKET", "routing"),
            publish_interval: Duration::from_millis(parse(
                "TOKENLEDGER_PUBLISH_INTERVAL_MS",
                500u64,
            )?),
            router_addr: var("TOKENLEDGER_ROUTER_ADDR", "127.0.0.1:8081"),
            router_config: var("TOKENLEDGER_ROUTER_CONFIG", "config/router.json").into(),
            webhooks: WebhookSettings::from_env()?,
            roles,
            fault_abort_after_commit: fault,
            db_max_connections: parse("TOKENLEDGER_DB_MAX_CONNECTIONS", 8u32)?,
            writers: parse("TOKENLEDGER_WRITERS", 2usize)?.clamp(1, 16),
        })
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// The subject a tenant's usage is published on.
    pub fn usage_subject(&self, tenant_id: &str) -> String {
        format!("{}usage.v1.{tenant_id}", self.subject_prefix_dot())
    }

    pub fn usage_subjects_wildcard(&self) -> String {
        format!("{}usage.v1.>", self.subject_prefix_dot())
    }

    fn subject_prefix_dot(&self) -> String {
        if self.subject_prefix.is_empty() {
            String::new()
        } else {
            format!("{}.", self.subject_prefix)
        }
    }
}
