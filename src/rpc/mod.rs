//! The wire: frames (a msgpack header followed by an opaque body), value encodings, and the
//! server-side RPC peer that hosts the workspace manager.

pub mod cache;
pub mod frame;
pub mod peer;
pub mod scan;
pub mod value;
