//! One error type for the HTTP API, rendered as RFC 9457 `application/problem+json`
//! with a stable snake_case `code`. Internal errors are logged and say nothing inside.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::bus::PublishError;
use crate::catalog::CatalogError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub errors: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
            errors: None,
        }
    }

    pub fn with_errors(mut self, errors: Value) -> ApiError {
        self.errors = Some(errors);
        self
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %e, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let title = self.status.canonical_reason().unwrap_or("Error");
        let mut body = json!({
            "type": format!("urn:tokenledger:problem:{}", self.code),
            "title": title,
            "status": self.status.as_u16(),
            "detail": self.detail,
            "code": self.code,
        });
        if let Some(e) = self.errors {
            body["errors"] = e;
        }
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::internal(e)
    }
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        tracing::error!(error = %e, "publish failed");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_unavailable",
            "the event bus did not acknowledge the events; nothing was accepted, retry later",
        )
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        let (status, code) = match &e {
            CatalogError::TenantExists(_) => (StatusCode::CONFLICT, "tenant_exists"),
            CatalogError::InvalidTenantId => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_tenant_id")
            }
            CatalogError::InvalidCurrency => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_currency"),
            CatalogError::TenantNotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            CatalogError::KeyNotFound => (StatusCode::NOT_FOUND, "not_found"),
            CatalogError::InvalidPrice(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_price"),
            CatalogError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            CatalogError::InvalidTerms(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_terms"),
            CatalogError::EffectiveInPast { .. } => {
                (StatusCode::UNPROCESSABLE_ENTITY, "effective_in_past")
            }
            CatalogError::Db(e) => return ApiError::internal(e),
        };
        ApiError::new(status, code, e.to_string())
    }
}

/// Parse a JSON body into `T`, with a problem+json error naming what is wrong.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            format!("invalid request body: {e}"),
        )
    })
}
