//! The one error type of the service boundary: what a call into a service (over the
//! websocket RPC or HTTP) can fail with. The lower layers' errors convert into it; `http`
//! turns it into a response, the service dispatcher into an RPC reject.

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
    /// A request body larger than the server accepts.
    #[error("{0}")]
    PayloadTooLarge(String),
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
    /// The message a client may see; internal details stay in the log.
    pub(crate) fn public_message(&self) -> String {
        if let Error::Internal(detail) = self {
            tracing::error!(%detail, "internal error");
        }
        self.to_string()
    }
}

/// What went wrong on the wire, for the caller of a service.
impl From<crate::rpc::RpcError> for Error {
    fn from(e: crate::rpc::RpcError) -> Self {
        use crate::rpc::RpcError;
        match e {
            RpcError::BadRequest(m) => Error::BadRequest(m),
            RpcError::NotFound(m) => Error::NotFound(m),
            RpcError::Unavailable(m) => Error::Unavailable(m),
            RpcError::Timeout(m) => Error::Timeout(m),
            RpcError::Remote(m) => Error::Remote(m),
            RpcError::Busy(m) => Error::TooManyRequests(m),
        }
    }
}

/// Why no ICE servers were handed out, as the caller sees it.
impl From<crate::turn::IceError> for Error {
    fn from(e: crate::turn::IceError) -> Self {
        use crate::turn::IceError;
        let message = e.to_string();
        match e {
            IceError::Anonymous => Error::PermissionDenied(message),
            IceError::RateLimited(_) => Error::TooManyRequests(message),
            IceError::NotConfigured | IceError::Probe(_) | IceError::AuditUnavailable => {
                Error::Unavailable(message)
            }
        }
    }
}

/// A store that failed: the client is told the store is unavailable; the detail is logged.
impl From<crate::store::StoreError> for Error {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::warn!(error = %e, "the store failed");
        Error::Unavailable("the store is unavailable; try again later".into())
    }
}
