//! One error type for the HTTP API, rendered as RFC 9457 `application/problem+json`
//! with a stable snake_case `code`. Internal errors are logged and say nothing inside.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::bus::PublishError;
use crate::catalog::CatalogError;

/// The body of every error answer (RFC 9457 `application/problem+json`), as the OpenAPI
/// document describes it.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `urn:tokenledger:problem:<code>`
    #[serde(rename = "type")]
    pub type_: String,
    /// The HTTP status's reason phrase.
    pub title: String,
    pub status: u16,
    /// What went wrong, for a person.
    pub detail: String,
    /// A stable snake_case code, for a program.
    pub code: String,
    /// Per-item reasons where there are several (e.g. each bad event of a batch).
    #[schema(value_type = Option<Vec<Object>>)]
    pub errors: Option<Value>,
}

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
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 9110 §11.6.1: a 401 names the scheme it wants
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// Every error the API answers is problem+json: the framework's own rejections (a path
/// parameter of the wrong type, a body over its route's limit or cut off, a query string
/// that does not parse) come as plain text and are rewritten here, their text the detail.
pub async fn problem_json_errors(r: Response) -> Response {
    let status = r.status();
    let is_problem = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|c| c.as_bytes().starts_with(b"application/problem+json"));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return r;
    }
    let text = axum::body::to_bytes(r.into_body(), 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let detail = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    ApiError::new(status, code, detail).into_response()
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
            "the event bus did not acknowledge every event; those it stored are kept, and \
             sending the same events again is safe (each is applied once, by its id)",
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
