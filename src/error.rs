//! The one error type of the service boundary: how a failure becomes an HTTP response and an RPC reject.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// A failure of a call into a service, from HTTP or from the websocket RPC.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    TooManyRequests(String),
    /// The remote peer that provides the service rejected the call.
    #[error("{0}")]
    Remote(String),
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure; its detail is logged, never sent.
    #[error("internal error")]
    Internal(String),
}

impl Error {
    pub fn status_code(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Error::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Remote(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message a client may see; internal details stay in the log.
    pub fn public_message(&self) -> String {
        if let Error::Internal(detail) = self {
            tracing::error!(%detail, "internal error");
        }
        self.to_string()
    }

    /// The `_rtype: error` value that hypha-rpc clients turn into an exception.
    pub fn to_reject(&self) -> rmpv::Value {
        crate::rpc::value::error_value(&self.public_message())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let body = serde_json::json!({"success": false, "detail": self.public_message()});
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A store that failed: the client is told the store is unavailable; the detail is logged.
impl From<crate::store::StoreError> for Error {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::warn!(error = %e, "the store failed");
        Error::Unavailable("the store is unavailable; try again later".into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
