//! Building and running the service: listeners bound in `build`, everything stopped by
//! one cancellation token.

use std::net::SocketAddr;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, auth::token_hash, AppState};
use crate::bus;
use crate::settings::Settings;
use crate::telemetry::Metrics;

pub struct App {
    listener: Option<TcpListener>,
    pub addr: Option<SocketAddr>,
    router: Option<(TcpListener, crate::router::Started)>,
    /// Where the `router` role listens.
    pub router_addr: Option<SocketAddr>,
    state: AppState,
    pub cancel: CancellationToken,
}

impl App {
    /// Connect to Postgres and NATS, create the stream and consumer, bind the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        // every writer task holds one connection while it applies a batch; the API shares the rest
        let size = settings.db_max_connections.max(settings.writers as u32 + 4);
        let pool = crate::db::connect(&settings.database_url, size).await?;
        let bus = bus::connect(&settings).await?;
        bus.ensure_consumer().await?;
        let (listener, addr) = if settings.has_role("api") {
            let l = TcpListener::bind(&settings.http_addr).await?;
            let a = l.local_addr()?;
            (Some(l), Some(a))
        } else {
            (None, None)
        };
        let authorizer = crate::authorize::Authorizer::start(
            pool.clone(),
            settings.hold_ttl,
            settings.grant_flush,
        );
        let engine = crate::engine::Engine::new(pool.clone());
        let state = AppState {
            engine,
            authorizer,
            pool,
            bus,
            admin_token_hash: token_hash(&settings.admin_token),
            settings,
            metrics: Metrics::default(),
        };
        let cancel = CancellationToken::new();
        let (router, router_addr) = if state.settings.has_role("router") {
            let started = crate::router::start(
                &state.settings,
                &state.engine,
                state.authorizer.clone(),
                &state.bus,
                state.metrics.clone(),
                cancel.clone(),
            )
            .await?;
            let l = TcpListener::bind(&state.settings.router_addr).await?;
            let a = l.local_addr()?;
            (Some((l, started)), Some(a))
        } else {
            (None, None)
        };
        Ok(App {
            listener,
            addr,
            router,
            router_addr,
            state,
            cancel,
        })
    }

    /// Run every configured role until the token is cancelled; the writer finishes its
    /// batch in flight, the HTTP server its requests in flight.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        if self.state.settings.has_role("writer") {
            let pool = self.state.pool.clone();
            let (bus, s, m, c) = (
                self.state.bus.clone(),
                self.state.settings.clone(),
                self.state.metrics.clone(),
                self.cancel.clone(),
            );
            tasks.spawn(async move { bus::run_writer(bus, pool, s, m, c, None).await });
        }
        if self.state.settings.has_role("pricing") {
            let (engine, bus, s, c) = (
                self.state.engine.clone(),
                self.state.bus.clone(),
                self.state.settings.clone(),
                self.cancel.clone(),
            );
            tasks.spawn(async move { crate::engine::run_publisher(engine, bus, s, c).await });
        }
        if self.state.settings.has_role("webhooks") {
            let (pool, s, c) = (
                self.state.pool.clone(),
                self.state.settings.webhooks.clone(),
                self.cancel.clone(),
            );
            tasks.spawn(async move { crate::webhooks::dispatch::run(pool, s, c).await });
        }
        if let Some((listener, started)) = self.router {
            let state = started.state.clone();
            let routes = crate::router::routes(started.state);
            let cancel = self.cancel.clone();
            tracing::info!(addr = %listener.local_addr()?, "router listening");
            tasks.spawn(async move {
                // no Nagle delay on streamed chunks
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(listener, routes)
                    .with_graceful_shutdown(async move { cancel.cancelled().await })
                    .await?;
                // requests whose client went away may still be running upstream: wait for
                // them, then publish or spool every usage event
                state.wait_for_requests().await;
                started.publisher.flush().await;
                Ok(())
            });
        }
        if let Some(listener) = self.listener {
            let router = api::router(self.state.clone());
            let cancel = self.cancel.clone();
            tracing::info!(addr = %listener.local_addr()?, "HTTP API listening");
            tasks.spawn(async move {
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { cancel.cancelled().await })
                    .await?;
                Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.cancel.cancel();
                    return Err(e);
                }
                Err(e) => {
                    self.cancel.cancel();
                    return Err(e.into());
                }
            }
        }
        // grants made from budget leases are written, the leases given back
        self.state.authorizer.close().await;
        self.state.bus.flush().await;
        Ok(())
    }
}

/// Cancel the token on SIGTERM or SIGINT.
pub fn cancel_on_signals(cancel: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested; finishing work in flight");
        cancel.cancel();
    });
}
