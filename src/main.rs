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
    /// Invoices: close a period, show or list invoices.
    Invoice {
        #[command(subcommand)]
        cmd: InvoiceCmd,
    },
    /// Settle an ended month with the providers we hold commitments or reservations with:
    /// post what they are worth to the operator's accounts (a new revision only when
    /// something changed) and print the settlements of the month.
    ProviderSettle {
        /// `YYYY-MM`
        #[arg(long)]
        period: String,
    },
    /// Reconcile a period: internal (ledger vs projections vs invoices), against a
    /// provider's export, or margin.
    Reconcile {
        /// `YYYY-MM`
        #[arg(long)]
        period: String,
        /// Compare against this provider's export (with --file and --format).
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
        /// A preset (openai-usage, anthropic-usage, openrouter-generations) or custom.
        #[arg(long, default_value = "custom")]
        format: String,
        /// For custom: the column mapping as JSON (see the README).
        #[arg(long)]
        mapping: Option<String>,
        #[arg(long, default_value = "USD")]
        currency: String,
        /// Tolerances as JSON: {"tokens": 0, "tokens_percent": "0", "amount": "0.000001",
        /// "amount_percent": "0"}.
        #[arg(long)]
        tolerances: Option<String>,
        /// Print the margin report instead.
        #[arg(long)]
        margin: bool,
    },
}

#[derive(Subcommand, Debug)]
enum InvoiceCmd {
    /// Close a period for every tenant and wait until every invoice is finalised.
    Close {
        /// `YYYY-MM`, a month that has ended.
        #[arg(long)]
        period: String,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        wait_secs: u64,
    },
    /// Print a tenant's invoice for a period (the draft while the period is open).
    Show {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        period: String,
        /// json, csv or html
        #[arg(long, default_value = "json")]
        format: String,
    },
    /// List invoices (all tenants, or one).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        period: Option<String>,
    },
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
        Cmd::Invoice { cmd } => invoice(&s, cmd).await,
        Cmd::ProviderSettle { period } => {
            use tokenledger::ledger::provider_settlement;
            let pool = db::connect(&s.database_url, 2).await?;
            let new =
                provider_settlement::settle_period(&pool, &period, chrono::Utc::now()).await?;
            eprintln!("{period}: {} new settlement revision(s)", new.len());
            let all = provider_settlement::list(&pool, Some(&period), None).await?;
            println!("{}", serde_json::to_string_pretty(&all)?);
            Ok(())
        }
        Cmd::Reconcile {
            period,
            provider,
            file,
            format,
            mapping,
            currency,
            tolerances,
            margin,
        } => {
            use tokenledger::api::invoices::{get_run, run_reconciliation, RunRequest};
            use tokenledger::invoices::reconcile;
            let pool = db::connect(&s.database_url, 2).await?;
            let api = |e: tokenledger::api::ApiError| anyhow::anyhow!("{}: {}", e.code, e.detail);
            let mut req = RunRequest {
                kind: if margin { "margin" } else { "internal" }.into(),
                period: Some(period.clone()),
                export_id: None,
                tolerances: tolerances
                    .as_deref()
                    .map(serde_json::from_str)
                    .transpose()
                    .context("tolerances")?,
            };
            if let Some(p) = provider {
                let file = file.context("--file: the provider's export")?;
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let m = match (format.as_str(), mapping) {
                    ("custom", Some(m)) => serde_json::from_str(&m).context("mapping")?,
                    ("custom", None) => anyhow::bail!("--mapping is needed with --format custom"),
                    (f, _) => reconcile::preset(f)
                        .with_context(|| format!("unknown format {f}: {:?}", reconcile::PRESETS))?,
                };
                let rows = reconcile::normalise(&text, &m).map_err(|e| anyhow::anyhow!(e))?;
                reconcile::check_period(&rows, &period).map_err(|e| anyhow::anyhow!(e))?;
                let name = file.display().to_string();
                let id =
                    reconcile::import(&pool, &p, &period, &format, &name, &currency, &rows).await?;
                req.kind = "provider".into();
                req.export_id = Some(id);
            }
            let id = run_reconciliation(&pool, req).await.map_err(api)?;
            let run = get_run(&pool, id).await.map_err(api)?;
            println!("{}", serde_json::to_string_pretty(&run)?);
            Ok(())
        }
    }
}

async fn invoice(s: &Settings, cmd: InvoiceCmd) -> anyhow::Result<()> {
    use tokenledger::invoices::{document, store};
    let pool = db::connect(&s.database_url, 2).await?;
    match cmd {
        InvoiceCmd::Close { period, wait_secs } => {
            let b = bus::connect(s).await?;
            b.ensure_stream().await?;
            let published = tokenledger::engine::publish_closes(&pool, &b, s, &period).await?;
            println!(
                "published the {period} close for {} tenant(s)",
                published.len()
            );
            let started = std::time::Instant::now();
            loop {
                let (all, done) = store::close_status(&pool, &period).await?;
                if done.len() >= all.len() {
                    println!(
                        "{period}: {} invoice(s) finalised in {:.1} s",
                        done.len(),
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                anyhow::ensure!(
                    started.elapsed().as_secs() < wait_secs,
                    "{} of {} invoices finalised after {wait_secs} s: is the writer running?",
                    done.len(),
                    all.len()
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
        InvoiceCmd::Show {
            tenant,
            period,
            format,
        } => {
            let inv = store::for_period(&pool, &tenant, &period)
                .await?
                .with_context(|| format!("tenant {tenant} not found"))?;
            match format.as_str() {
                "json" => println!("{}", serde_json::to_string_pretty(&inv)?),
                "csv" => print!("{}", document::to_csv(&inv)),
                "html" => print!("{}", document::to_html(&inv)),
                f => anyhow::bail!("format {f}: json, csv or html"),
            }
            Ok(())
        }
        InvoiceCmd::List { tenant, period } => {
            let l = store::list(&pool, tenant.as_deref(), period.as_deref()).await?;
            println!("{}", serde_json::to_string_pretty(&l)?);
            Ok(())
        }
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
