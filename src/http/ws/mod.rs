//! `GET /ws`: the websocket endpoint of the Hypha protocol: the upgrade, the first message
//! (handshake), then the connection's loop.

pub(crate) mod connection;

use std::sync::Arc;

use axum::Router;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;

use crate::AppState;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/ws", get(upgrade))
}

/// Bytes of frames gathered before a send, within one batch.
const WRITE_BUFFER: usize = 16 * 1024;

async fn upgrade(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let client_ip = state
        .settings
        .admission
        .trusted_proxies
        .client_ip(peer, &headers);
    // Small buffers keep idle connections cheap; frames above the limit (with some slack for
    // a clear error message) are refused by the websocket layer itself. The write buffer lets
    // a batch of queued frames (see `connection::write`, which flushes after each batch) go
    // out in one send instead of one send per frame: with none, a send per frame took over
    // half the server's CPU under load.
    let limit = state.settings.connections.max_frame_size.saturating_mul(2);
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| connection::serve(socket, state, client_ip))
}
