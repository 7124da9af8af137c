//! `GET /ws`: the websocket endpoint of the Hypha protocol: the upgrade, the first message
//! (handshake), then the connection's loop.

pub(crate) mod connection;
mod transport;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use crate::AppState;

/// A client's websocket: frames over the upgraded HTTP connection, read ahead.
pub(crate) type WebSocket =
    tokio_tungstenite::WebSocketStream<transport::ReadAhead<TokioIo<hyper::upgrade::Upgraded>>>;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/ws", get(upgrade))
}

/// Bytes of frames gathered before a send, within one batch.
const WRITE_BUFFER: usize = 16 * 1024;
/// The frame parser's own buffer: every connection keeps one for its whole life, so it is
/// small; reads are large all the same (see `transport`).
const READ_BUFFER: usize = 512;

/// Whether a header holds `token` in its comma-separated list (case does not matter).
fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Says what is wrong with a request that cannot become a websocket.
fn refuse(status: StatusCode, message: &str) -> Response {
    (status, format!("{message}\n")).into_response()
}

async fn upgrade(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (mut parts, _body) = request.into_parts();
    let headers = &parts.headers;
    if parts.version > Version::HTTP_11 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "websockets are served over HTTP/1.1 only",
        );
    }
    if !header_has(headers, header::CONNECTION, "upgrade") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the Connection header must include 'upgrade'",
        );
    }
    if !header_has(headers, header::UPGRADE, "websocket") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the Upgrade header must be 'websocket'",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut refused = refuse(
            StatusCode::UPGRADE_REQUIRED,
            "only websocket version 13 is spoken here",
        );
        refused.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return refused;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the Sec-WebSocket-Key header is missing",
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let client_ip = state
        .settings
        .admission
        .trusted_proxies
        .client_ip(peer, headers);
    let Some(upgraded) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return refuse(
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        );
    };
    // Small buffers keep idle connections cheap; frames above the limit (with some slack for
    // a clear error message) are refused by the websocket layer itself. The write buffer lets
    // a batch of queued frames (see `connection::write`, which flushes after each batch) go
    // out in one send instead of one send per frame: with none, a send per frame took over
    // half the server's CPU under load.
    let limit = state.settings.connections.max_frame_size.saturating_mul(2);
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    tokio::spawn(connection::serve(upgraded, config, state, client_ip));
    let mut switching = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let answer = switching.headers_mut();
    answer.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    answer.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        answer.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    switching
}

/// Makes the upgraded connection a websocket; `None` when the upgrade did not happen.
async fn accept(upgrade: hyper::upgrade::OnUpgrade, config: WebSocketConfig) -> Option<WebSocket> {
    let upgraded = upgrade.await.ok()?;
    let io = transport::ReadAhead::new(TokioIo::new(upgraded));
    Some(tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await)
}
