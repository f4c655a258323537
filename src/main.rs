//! The `tokenledger` binary: parse the command line, load settings, run a subcommand.

use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use tokenledger::{
    app, bench, bus, catalog, db, loadgen, pricing, projections, settings::Settings, telemetry,
};

#[derive(Parser)]
#[command(
    name = "tokenledger",
    version,
    about = "Billing and usage ledger for LLM API aggregators"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the service (roles from --roles or TOKENLEDGER_ROLES: api, writer, pricing,
    /// router).
    Serve {
        #[arg(long)]
        roles: Option<String>,
        /// Migrate first, with TOKENLEDGER_OWNER_DATABASE_URL.
        #[arg(long)]
        migrate: bool,
    },
    /// Create the database if needed and apply migrations (as the owning role).
    Migrate,
    /// Import a LiteLLM model_prices_and_context_window.json price map (cost side).
    ImportPrices {
        #[arg(long, default_value = "config/prices/litellm-popular.json")]
        file: PathBuf,
        #[arg(long, default_value = "USD")]
        currency: String,
        /// When changed prices take effect (default: now plus the clock skew).
        #[arg(long)]
        effective_from: Option<DateTime<Utc>>,
        /// When a model's first price takes effect (default: 2020-01-01T00:00:00Z).
        #[arg(long, default_value = "2020-01-01T00:00:00Z")]
        first_effective_from: DateTime<Utc>,
    },
    /// Create a tenant and print a new API key for it.
    CreateTenant {
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, default_value = "USD")]
        currency: String,
    },
    /// Add a markup rule (global unless --tenant).
    AddMarkup {
        #[arg(long)]
        percent: rust_decimal::Decimal,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        effective_from: Option<DateTime<Utc>>,
    },
    /// Price book management: list versions, publish a new version, diff.
    Prices {
        #[command(subcommand)]
        cmd: PricesCmd,
    },
    /// Rebuild every projection from the record and swap it in (as the owning role).
    Rebuild,
    /// Check projections against the record, the balance invariant, and re-rating.
    Verify,
    /// Publish synthetic usage.
    Loadgen {
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Events per second; 0 = as fast as possible.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value_t = 50)]
        tenants: usize,
        #[arg(long, default_value_t = 0.02)]
        duplicate_share: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Create the load tenants first.
        #[arg(long)]
        setup: bool,
    },
    /// A fake OpenAI-compatible upstream (deterministic completions and usage; failures,
    /// stalls and missing usage on request) for demos and benchmarks.
    FakeUpstream {
        #[arg(long, default_value = "127.0.0.1:9000")]
        addr: String,
    },
    /// Measure raw JetStream, raw Postgres, a naive pipeline and the real one.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
enum PricesCmd {
    /// Price versions, newest first.
    List {
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        model: Option<String>,
    },
    /// Publish a new version from a JSON file (the body of POST /v1/admin/prices); it
    /// takes effect no earlier than now plus the clock skew.
    Publish {
        #[arg(long)]
        file: PathBuf,
    },
    /// Diff two versions (ids) or the book at two instants (RFC 3339).
    Diff {
        from: String,
        to: String,
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        model: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_tracing();
    let cli = Cli::parse();
    let mut s = Settings::from_env()?;
    match cli.cmd {
        Cmd::Serve { roles, migrate } => {
            if let Some(r) = roles {
                std::env::set_var("TOKENLEDGER_ROLES", r);
                s = Settings::from_env()?;
            }
            if migrate {
                db::migrate(&s.owner_database_url)
                    .await
                    .context("migrate")?;
            }
            let app = app::App::build(s).await?;
            app::cancel_on_signals(app.cancel.clone());
            app.run_until_stopped().await
        }
        Cmd::FakeUpstream { addr } => {
            let fake = tokenledger::router::fake::Fake::start(&addr).await?;
            println!("fake upstream at {}", fake.base_url);
            let stop = tokio_util::sync::CancellationToken::new();
            app::cancel_on_signals(stop.clone());
            stop.cancelled().await;
            Ok(())
        }
        Cmd::Migrate => {
            db::migrate(&s.owner_database_url).await?;
            println!("migrated");
            Ok(())
        }
        Cmd::ImportPrices {
            file,
            currency,
            effective_from,
            first_effective_from,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let prices = pricing::import::parse_litellm(&text)?;
            let pool = db::connect(&s.database_url, 2).await?;
            let skew = chrono::Duration::from_std(s.clock_skew)?;
            let source = file
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            let opts = catalog::prices::ImportOptions {
                currency: &currency,
                first_effective_from,
                effective_from,
                now: Utc::now(),
                skew,
                source: &source,
            };
            let (added, unchanged) = catalog::prices::import(&pool, &prices, &opts).await?;
            println!(
                "imported {} models: {added} new versions, {unchanged} unchanged",
                prices.len()
            );
            Ok(())
        }
        Cmd::CreateTenant { id, name, currency } => {
            let pool = db::connect(&s.database_url, 2).await?;
            let name = if name.is_empty() { id.clone() } else { name };
            let t = catalog::tenants::create(&pool, &id, &name, &currency).await?;
            let (_, secret) = catalog::keys::create(&pool, &t.id, "cli").await?;
            println!("{secret}");
            Ok(())
        }
        Cmd::AddMarkup {
            percent,
            tenant,
            effective_from,
        } => {
            let pool = db::connect(&s.database_url, 2).await?;
            let skew = chrono::Duration::from_std(s.clock_skew)?;
            let r = catalog::prices::add_markup(
                &pool,
                tenant.as_deref(),
                percent,
                effective_from,
                Utc::now(),
                skew,
            )
            .await?;
            println!(
                "markup rule {} : {}% from {}",
                r.id, r.percent, r.effective_from
            );
            Ok(())
        }
        Cmd::Prices { cmd } => prices(&s, cmd).await,
        Cmd::Rebuild => {
            let pool = db::connect(&s.owner_database_url, 2).await?;
            projections::rebuild::rebuild(&pool).await?;
            println!("projections rebuilt");
            Ok(())
        }
        Cmd::Verify => {
            let pool = db::connect(&s.owner_database_url, 2).await?;
            let r = projections::rebuild::verify(&pool).await?;
            if let Some(first) = r.differences.first() {
                for d in &r.differences {
                    eprintln!("difference: {d}");
                }
                anyhow::bail!(
                    "verify failed ({} differences); first: {first}",
                    r.differences.len()
                );
            }
            println!("verify ok: projections match the record, balances sum to zero, {} events re-rated without drift", r.events_rerated);
            Ok(())
        }
        Cmd::Loadgen {
            count,
            rate,
            tenants,
            duplicate_share,
            seed,
            setup,
        } => {
            let b = bus::connect(&s).await?;
            b.ensure_stream().await?;
            if setup {
                let pool = db::connect(&s.database_url, 2).await?;
                for i in 0..tenants {
                    match catalog::tenants::create(&pool, &loadgen::tenant_name(i), "load", "USD")
                        .await
                    {
                        Ok(_) | Err(catalog::CatalogError::TenantExists(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            let o = loadgen::LoadOptions {
                count,
                rate,
                tenants,
                duplicate_share,
                seed,
            };
            let run_id = uuid::Uuid::now_v7().to_string();
            let (n, secs) = loadgen::run(&b, &s, &o, &run_id).await?;
            println!(
                "published {n} events in {secs:.2} s ({:.0}/s)",
                n as f64 / secs
            );
            Ok(())
        }
        Cmd::Bench(args) => bench::run(&s, args).await,
    }
}

// The writer allocates per event (JSON values, strings, SQL argument buffers); glibc's
// allocator spent a quarter of the writer's CPU in a profile, mimalloc far less.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn prices(s: &Settings, cmd: PricesCmd) -> anyhow::Result<()> {
    let pool = db::connect(&s.database_url, 2).await?;
    match cmd {
        PricesCmd::List { provider, model } => {
            let v = catalog::prices::list_versions(&pool, provider.as_deref(), model.as_deref())
                .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        PricesCmd::Publish { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let p: catalog::prices::NewPrice = serde_json::from_str(&text)?;
            let skew = chrono::Duration::from_std(s.clock_skew)?;
            let mut tx = pool.begin().await?;
            let v = catalog::prices::add_price(&mut tx, &p, Utc::now(), skew).await?;
            tx.commit().await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        PricesCmd::Diff {
            from,
            to,
            provider,
            model,
        } => {
            use tokenledger::pricing::diff::{diff, Between};
            let between = match (from.parse::<i64>(), to.parse::<i64>()) {
                (Ok(a), Ok(b)) => Between::Versions(a, b),
                _ => Between::Instants(
                    from.parse()
                        .context("from: a version id or an RFC 3339 instant")?,
                    to.parse()
                        .context("to: a version id or an RFC 3339 instant")?,
                ),
            };
            let mut c = pool.acquire().await?;
            let book = catalog::prices::load_book(&mut c).await?;
            let d = diff(&book, between, provider.as_deref(), model.as_deref())
                .map_err(|m| anyhow::anyhow!("{m} not found"))?;
            println!("{}", serde_json::to_string_pretty(&d)?);
        }
    }
    Ok(())
}
