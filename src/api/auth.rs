//! Callers: the operator (admin token) or a tenant (API key). Keys are stored hashed.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::catalog::keys;

#[derive(Clone, Debug)]
pub enum Caller {
    Admin,
    Tenant {
        tenant_id: String,
        key_id: uuid::Uuid,
    },
}

impl Caller {
    /// The tenant this caller may act on: its own, or for the operator the one named.
    pub fn tenant(&self, requested: Option<&str>) -> Result<String, ApiError> {
        match (self, requested) {
            (Caller::Tenant { tenant_id, .. }, _) => Ok(tenant_id.clone()),
            (Caller::Admin, Some(t)) => Ok(t.to_string()),
            (Caller::Admin, None) => Err(ApiError::bad_request(
                "tenant_required",
                "operator calls must name the tenant with ?tenant_id=",
            )),
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Tenant { .. } => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this call needs the operator token",
            )),
        }
    }
}

pub fn token_hash(t: &str) -> [u8; 32] {
    Sha256::digest(t.as_bytes()).into()
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Self::Rejection> {
        let unauthorized = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send a tenant API key or the operator token as 'Authorization: Bearer <token>'",
            )
        };
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(unauthorized)?;
        // compare hashes, so the comparison time says nothing about the token
        if token_hash(token) == st.admin_token_hash {
            return Ok(Caller::Admin);
        }
        match keys::authenticate(&st.pool, token).await? {
            Some((key_id, tenant_id)) => Ok(Caller::Tenant { tenant_id, key_id }),
            None => Err(unauthorized()),
        }
    }
}
