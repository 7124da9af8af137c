//! `GET /ws`: the websocket endpoint of the Hypha protocol.

use std::sync::Arc;

use axum::Router;
use axum::extract::{State, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;

use crate::AppState;

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/ws", get(upgrade))
}

async fn upgrade(State(state): State<Arc<AppState>>, upgrade: WebSocketUpgrade) -> Response {
    // Small buffers keep idle connections cheap; frames above the limit (with some slack for
    // a clear error message) are refused by the websocket layer itself.
    let limit = state.settings.max_frame_size.saturating_mul(2);
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| crate::hub::connection::serve(socket, state))
}
