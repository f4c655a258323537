//! The REST billing API (axum): thin handlers over the domain modules.

pub mod admin;
pub mod auth;
pub mod error;
pub mod ingest;
pub mod invoices;
pub mod reads;
pub mod terms;
pub mod webhooks;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use sqlx::PgPool;
use utoipa::OpenApi;

pub use auth::Caller;
pub use error::ApiError;

use crate::bus::Bus;
use crate::settings::Settings;
use crate::telemetry::Metrics;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub bus: Bus,
    pub settings: Settings,
    pub metrics: Metrics,
    pub admin_token_hash: [u8; 32],
    pub authorizer: crate::authorize::Authorizer,
    pub engine: crate::engine::Engine,
}

impl AppState {
    pub fn skew(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.settings.clock_skew).unwrap_or_default()
    }
}

pub fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    ApiError::bad_request("invalid_query", e.body_text())
}

#[derive(OpenApi)]
#[openapi(
    info(title = "tokenledger", description = "Billing and usage ledger for LLM API aggregators"),
    paths(
        ingest::ingest,
        reads::get_request, reads::list_requests, reads::usage, reads::balances,
        admin::create_tenant, admin::list_tenants, admin::create_key, admin::list_keys, admin::revoke_key,
        admin::add_price, admin::list_prices, admin::add_markup,
        admin::list_dead, admin::get_dead, admin::redrive,
        terms::add_tier_schedule, terms::list_tier_schedules, terms::positions,
        terms::add_budget, terms::list_budgets, terms::budget_versions, terms::retire_budget,
        terms::list_alerts, terms::authorize,
        terms::add_reservation, terms::list_reservations, terms::utilisation,
        terms::add_provider_reservation, terms::list_provider_reservations,
        terms::add_provider_commitment, terms::list_provider_commitments,
        terms::settle_providers, terms::list_provider_settlements,
        terms::add_commitment, terms::list_commitments, terms::commitment_positions, terms::period_close,
        terms::price_diff, terms::quote, terms::routing_decision, terms::add_routing_class, terms::list_routing_classes,
        webhooks::create_endpoint, webhooks::list_endpoints, webhooks::get_endpoint,
        webhooks::update_endpoint, webhooks::delete_endpoint, webhooks::rotate_secret,
        webhooks::send_test, webhooks::replay_range, webhooks::list_messages,
        webhooks::get_message, webhooks::replay_message,
        invoices::list, invoices::draft, invoices::get, invoices::close, invoices::add_note,
        invoices::list_notes, invoices::import, invoices::run, invoices::list_runs,
        invoices::get_reconciliation, invoices::margin,
    ),
    components(schemas(crate::catalog::prices::NewPrice, error::Problem)),
    modifiers(&Security, &Problems),
    tags((name = "ingest"), (name = "reads"), (name = "prices"), (name = "terms"), (name = "webhooks"), (name = "invoices"), (name = "admin"))
)]
pub struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Every error answer is problem+json: each operation's 4xx and 5xx responses get the
/// `Problem` body, and every operation a `default` response for the errors it does not
/// list (an unreadable body, a missing key, an internal error).
struct Problems;

impl utoipa::Modify for Problems {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let problem = || {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                for (status, response) in op.responses.responses.iter_mut() {
                    let is_error = status.starts_with('4') || status.starts_with('5');
                    if let (true, RefOr::T(r)) = (is_error, response) {
                        r.content.clear();
                        r.content
                            .insert("application/problem+json".to_string(), problem());
                    }
                }
                op.responses.responses.insert(
                    "default".to_string(),
                    RefOr::T(
                        ResponseBuilder::new()
                            .description("an error (RFC 9457 problem+json)")
                            .content("application/problem+json", problem())
                            .build(),
                    ),
                );
            }
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/v1/events",
            post(ingest::ingest).layer(DefaultBodyLimit::max(ingest::MAX_BODY_BYTES)),
        )
        .route("/v1/requests", get(reads::list_requests))
        .route("/v1/requests/{request_id}", get(reads::get_request))
        .route("/v1/usage", get(reads::usage))
        .route("/v1/balances", get(reads::balances))
        .route("/v1/prices", get(admin::list_prices))
        .route("/v1/prices/diff", get(terms::price_diff))
        .route(
            "/v1/admin/tenants",
            post(admin::create_tenant).get(admin::list_tenants),
        )
        .route(
            "/v1/admin/tenants/{tenant_id}/api-keys",
            post(admin::create_key).get(admin::list_keys),
        )
        .route(
            "/v1/admin/api-keys/{key_id}/revoke",
            post(admin::revoke_key),
        )
        .route("/v1/admin/prices", post(admin::add_price))
        .route("/v1/admin/markup-rules", post(admin::add_markup))
        .route(
            "/v1/admin/tenants/{tenant_id}/tier-schedules",
            post(terms::add_tier_schedule).get(terms::list_tier_schedules),
        )
        .route("/v1/tiers", get(terms::positions))
        .route("/v1/commitments", get(terms::commitment_positions))
        .route("/v1/reservations/utilisation", get(terms::utilisation))
        .route(
            "/v1/admin/provider-reservations",
            post(terms::add_provider_reservation).get(terms::list_provider_reservations),
        )
        .route(
            "/v1/admin/provider-commitments",
            post(terms::add_provider_commitment).get(terms::list_provider_commitments),
        )
        .route(
            "/v1/admin/provider-settlements",
            post(terms::settle_providers).get(terms::list_provider_settlements),
        )
        .route(
            "/v1/admin/tenants/{tenant_id}/reservations",
            post(terms::add_reservation).get(terms::list_reservations),
        )
        .route(
            "/v1/admin/tenants/{tenant_id}/commitments",
            post(terms::add_commitment).get(terms::list_commitments),
        )
        .route(
            "/v1/admin/tenants/{tenant_id}/period-close",
            post(terms::period_close),
        )
        .route(
            "/v1/budgets",
            post(terms::add_budget).get(terms::list_budgets),
        )
        .route(
            "/v1/budgets/{name}",
            get(terms::budget_versions).delete(terms::retire_budget),
        )
        .route("/v1/alerts", get(terms::list_alerts))
        .route(
            "/v1/webhooks/endpoints",
            post(webhooks::create_endpoint).get(webhooks::list_endpoints),
        )
        .route(
            "/v1/webhooks/endpoints/{id}",
            get(webhooks::get_endpoint)
                .patch(webhooks::update_endpoint)
                .delete(webhooks::delete_endpoint),
        )
        .route(
            "/v1/webhooks/endpoints/{id}/rotate-secret",
            post(webhooks::rotate_secret),
        )
        .route(
            "/v1/webhooks/endpoints/{id}/test",
            post(webhooks::send_test),
        )
        .route(
            "/v1/webhooks/endpoints/{id}/replay",
            post(webhooks::replay_range),
        )
        .route("/v1/webhooks/messages", get(webhooks::list_messages))
        .route("/v1/webhooks/messages/{id}", get(webhooks::get_message))
        .route(
            "/v1/webhooks/messages/{id}/replay",
            post(webhooks::replay_message),
        )
        .route("/v1/invoices", get(invoices::list))
        .route("/v1/invoices/draft", get(invoices::draft))
        .route("/v1/invoices/{number}", get(invoices::get))
        .route("/v1/invoices/{number}/notes", get(invoices::list_notes))
        .route("/v1/admin/invoices/close", post(invoices::close))
        .route(
            "/v1/admin/invoices/{number}/notes",
            post(invoices::add_note),
        )
        .route(
            "/v1/admin/provider-exports",
            post(invoices::import).layer(DefaultBodyLimit::max(64 << 20)),
        )
        .route(
            "/v1/admin/reconciliations",
            get(invoices::list_runs).post(invoices::run),
        )
        .route(
            "/v1/admin/reconciliations/{id}",
            get(invoices::get_reconciliation),
        )
        .route("/v1/admin/margin", get(invoices::margin))
        .route("/v1/authorize", post(terms::authorize))
        .route("/v1/quote", post(terms::quote))
        .route("/v1/routing/{class}", get(terms::routing_decision))
        .route(
            "/v1/admin/routing-classes",
            post(terms::add_routing_class).get(terms::list_routing_classes),
        )
        .route("/v1/admin/dead-letters", get(admin::list_dead))
        .route("/v1/admin/dead-letters/{id}", get(admin::get_dead))
        .route("/v1/admin/dead-letters/{id}/redrive", post(admin::redrive))
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::map_response(error::problem_json_errors))
        .with_state(state)
}

async fn openapi() -> impl IntoResponse {
    // utoipa has no OpenAPI 3.1 `webhooks`: the payloads we send are added here
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    doc["webhooks"] = crate::webhooks::schema::openapi_webhooks();
    Json(doc)
}

async fn readyz(State(st): State<AppState>) -> Result<&'static str, ApiError> {
    sqlx::query("select 1").execute(&st.pool).await?;
    if !st.bus.is_connected() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            "not connected to NATS",
        ));
    }
    Ok("ready")
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    match st.bus.consumer_lag().await {
        Ok((pending, ack_pending)) => {
            st.metrics
                .set("tokenledger_consumer_pending_messages", pending as f64);
            st.metrics.set(
                "tokenledger_consumer_ack_pending_messages",
                ack_pending as f64,
            );
            st.metrics.set("tokenledger_bus_up", 1.0);
        }
        Err(_) => {
            // a lag that cannot be read is not shown at its last value
            st.metrics.unset("tokenledger_consumer_pending_messages");
            st.metrics
                .unset("tokenledger_consumer_ack_pending_messages");
            st.metrics.set("tokenledger_bus_up", 0.0);
        }
    }
    st.metrics.set(
        "tokenledger_authorizer_terms_stamp",
        st.authorizer.terms_stamp() as f64,
    );
    if let Ok(n) = sqlx::query_scalar::<_, i64>("select count(*) from dead_letters")
        .fetch_one(&st.pool)
        .await
    {
        st.metrics.set("tokenledger_dead_letters_stored", n as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
}
