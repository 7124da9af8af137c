//! The wire: frames (a msgpack header followed by an opaque body), value encodings, and the
//! server-side RPC peer that hosts the workspace manager.

pub(crate) mod cache;
pub(crate) mod describe;
pub mod frame;
pub(crate) mod peer;
pub mod rules;
pub mod scan;
pub(crate) mod value;

/// What can go wrong on the wire: a message that cannot be read, a call that cannot be
/// delivered or that its callee refused. The text is what the caller is told.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum RpcError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The peer is gone, or the frame could not be sent.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    /// The callee rejected the call.
    #[error("{0}")]
    Remote(String),
    /// A limit on what a caller may hold was reached.
    #[error("{0}")]
    Busy(String),
}
