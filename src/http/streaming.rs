//! The HTTP streaming transport of the Hypha protocol (`transport: "http"` in hypha-rpc):
//! `GET /rpc` opens a stream of frames from the server, each a 4-byte big-endian length then
//! msgpack, the first being `connection_info`; `POST /rpc` carries one frame to the server.
//!
//! Identity is the stream's: the stream's answer sets a session cookie (random, HttpOnly)
//! that only its holder has, and a POST without it does not speak for the client, whatever
//! it claims in its query. Everything else (routing, permissions, limits, reconnection) is
//! the websocket's, through [`Session`].

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::{BufMut, Bytes, BytesMut};
use dashmap::DashMap;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ClientIp;
use super::handshake::{Hello, Refused, admit};
use super::session::{RateLimit, Session, Taken, account_usable};
use crate::AppState;
use crate::error::Error;
use crate::hub::{Outbound, Queued};

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/rpc", get(open).post(post))
}

/// The query of both requests (as hypha-rpc sends it).
#[derive(Debug, Deserialize)]
struct RpcQuery {
    client_id: Option<String>,
    workspace: Option<String>,
    reconnection_token: Option<String>,
}

/// Invalid frames tolerated from one stream before it is closed.
const MAX_PROTOCOL_ERRORS: u32 = 100;
/// Frames written per chunk of the stream when the queue has a backlog.
const WRITE_BATCH: usize = 64;
/// The content type of the stream, as Hypha names it.
const STREAM_TYPE: &str = "application/x-msgpack-stream";

/// The HTTP streams open on this instance, by client address.
#[derive(Default)]
pub(crate) struct Streams(DashMap<String, Arc<Stream>>);

impl Streams {
    fn get(&self, key: &str) -> Option<Arc<Stream>> {
        self.0.get(key).map(|s| s.clone())
    }

    /// Forgets `stream`, unless a newer stream of the same client has taken its place.
    fn forget(&self, stream: &Stream) {
        let conn_id = stream.session.conn_id;
        self.0
            .remove_if(&stream.session.key, |_, s| s.session.conn_id == conn_id);
    }

    /// How many streams are open.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// One open stream: its session, and the cookie its POSTs must carry.
pub(crate) struct Stream {
    session: Session,
    cookie_name: String,
    /// Never logged, never sent but once, in the stream's own answer.
    secret: String,
    limit: Mutex<RateLimit>,
    errors: AtomicU32,
    /// The stream's place in the per-address and total counts, given back as it goes.
    _slot: crate::net::admission::Slot,
}

impl Stream {
    /// Whether the request carries this stream's session cookie.
    fn holds_cookie(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| {
                name == self.cookie_name && same_secret(value.as_bytes(), self.secret.as_bytes())
            })
    }

    /// Queues a control message (msgpack) on the stream.
    fn send_control(&self, message: &serde_json::Value) {
        let data = crate::rpc::value::encode(&crate::rpc::value::from_json(message));
        let _ = self
            .session
            .tx
            .try_send(Queued::unmetered(Outbound::Binary(Bytes::from(data))));
    }
}

/// Compares two secrets in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An error as Hypha's HTTP answers carry it: `{"success": false, "detail": ...}`.
fn refuse(status: StatusCode, detail: impl Into<String>) -> Response {
    let body = serde_json::json!({"success": false, "detail": detail.into()});
    (status, axum::Json(body)).into_response()
}

/// `GET /rpc`: admits the client as the websocket's first message would, then streams its
/// queue.
async fn open(
    State(state): State<Arc<AppState>>,
    ClientIp(client_ip): ClientIp,
    headers: HeaderMap,
    Query(query): Query<RpcQuery>,
) -> Response {
    let hello = Hello {
        client_id: query.client_id,
        workspace: query.workspace,
        token: super::request_token(&state, &headers).map(str::to_string),
        reconnection_token: query.reconnection_token,
    };
    let admitted = match admit(&hello, &state.tokens, &state.workspaces) {
        Ok(admitted) => admitted,
        Err(refused) => {
            tracing::info!(reason = %refused, "HTTP stream refused");
            let status = match refused {
                Refused::PermissionDenied(_) => StatusCode::FORBIDDEN,
                Refused::ManagerId | Refused::HttpClientId(_) | Refused::InvalidId(_) => {
                    StatusCode::BAD_REQUEST
                }
                _ => StatusCode::UNAUTHORIZED,
            };
            return refuse(status, format!("Authentication error: {refused}"));
        }
    };
    if let Err(reason) = account_usable(&state, &admitted.user).await {
        return refuse(StatusCode::UNAUTHORIZED, reason);
    }
    // Held as long as the stream: HTTP/2 carries many streams on one connection, so they are
    // counted by themselves, within the same limits as connections.
    let Ok(slot) = state.stream_slots.admit(client_ip) else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too many HTTP streams are open (from this address, or in all); close some first",
        );
    };
    let (session, rx) = match Session::open(&state, admitted, client_ip).await {
        Ok(opened) => opened,
        Err(taken @ Taken::Live(_)) => return refuse(StatusCode::CONFLICT, taken.to_string()),
        Err(taken @ Taken::DirectoryUnavailable(_)) => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, taken.to_string());
        }
    };
    let info = session.connection_info(&state);
    let first = frame(&crate::rpc::value::encode(&crate::rpc::value::from_json(
        &info,
    )));
    let stream = Arc::new(Stream {
        cookie_name: format!("hypha_rpc_{}", session.conn_id),
        secret: crate::ids::random_id(32),
        limit: Mutex::new(RateLimit::new(state.settings.connections.rate_limit)),
        errors: AtomicU32::new(0),
        session,
        _slot: slot,
    });
    let mut cookie = format!(
        "{}={}; HttpOnly; SameSite=Strict; Max-Age={}",
        stream.cookie_name, stream.secret, state.settings.connections.reconnection_token_life_time
    );
    if state.public_base_url.starts_with("https:") {
        cookie.push_str("; Secure");
    }
    tracing::info!(client = %stream.session.key, user = %stream.session.user.id, reconnecting = stream.session.reconnecting, "HTTP stream opened");
    state
        .streams
        .0
        .insert(stream.session.key.clone(), stream.clone());
    stream.session.started(&state).await;

    // The stream ends when the server ends the session, or when the client goes (the body is
    // dropped); either way the session is closed once, here.
    let dropped = CancellationToken::new();
    tokio::spawn({
        let state = state.clone();
        let stream = stream.clone();
        let dropped = dropped.clone();
        async move {
            tokio::select! {
                _ = stream.session.kill.cancelled() => {}
                _ = dropped.cancelled() => {}
            }
            state.streams.forget(&stream);
            tracing::info!(client = %stream.session.key, "HTTP stream closed");
            stream.session.close(&state).await;
        }
    });
    let mut ticker = tokio::time::interval(state.settings.connections.ping_interval);
    ticker.reset();
    let pump = Pump {
        first: Some(first),
        rx,
        kill: stream.session.kill.clone(),
        reason: stream.session.reason.clone(),
        ending: false,
        ticker,
        _dropped: dropped.drop_guard(),
    };
    let body = futures_util::stream::unfold(pump, |mut pump| async move {
        let chunk = pump.next().await?;
        Some((Ok::<_, Infallible>(chunk), pump))
    });
    let mut response = Response::new(axum::body::Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(STREAM_TYPE));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    response
}

/// A frame of the stream: its length (4 bytes, big-endian), then its bytes.
fn frame(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + data.len());
    out.put_u32(data.len() as u32);
    out.put_slice(data);
    out.freeze()
}

/// What feeds a stream's body: the connection's queue, a ping now and then (so a client
/// that went away is noticed when the write fails), and the reason when the server ends it.
struct Pump {
    first: Option<Bytes>,
    rx: mpsc::Receiver<Queued>,
    kill: CancellationToken,
    reason: Arc<std::sync::OnceLock<String>>,
    ending: bool,
    ticker: tokio::time::Interval,
    _dropped: tokio_util::sync::DropGuard,
}

impl Pump {
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        if self.ending {
            return None;
        }
        tokio::select! {
            biased;
            _ = self.kill.cancelled() => {
                self.ending = true;
                let message = self.reason.get().map_or("disconnected by the server", String::as_str);
                let error = serde_json::json!({"type": "error", "message": message});
                Some(frame(&crate::rpc::value::encode(&crate::rpc::value::from_json(&error))))
            }
            out = self.rx.recv() => {
                let mut chunk = BytesMut::new();
                let mut push = |queued: Queued| {
                    let (Outbound::Binary(data), _room) = queued.into_parts();
                    chunk.put_u32(data.len() as u32);
                    chunk.put_slice(&data);
                };
                push(out?);
                for _ in 0..WRITE_BATCH {
                    match self.rx.try_recv() {
                        Ok(next) => push(next),
                        Err(_) => break,
                    }
                }
                Some(chunk.freeze())
            }
            _ = self.ticker.tick() => {
                Some(frame(&crate::rpc::value::encode(&crate::rpc::value::from_json(
                    &serde_json::json!({"type": "ping"}),
                ))))
            }
        }
    }
}

/// `POST /rpc`: one frame from the client of an open stream.
async fn post(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<RpcQuery>,
    body: axum::body::Body,
) -> Response {
    let (Some(client), Some(workspace)) = (query.client_id.as_deref(), query.workspace.as_deref())
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "client_id and workspace are required: POST /rpc carries the frames of a stream opened with GET /rpc",
        );
    };
    let key = format!("{workspace}/{client}");
    let Some(stream) = state.streams.get(&key) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("no open stream for {key} on this server: open one with GET /rpc first"),
        );
    };
    if !stream.holds_cookie(&headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("this request does not carry the session cookie of the stream of {key}"),
        );
    }
    let limited = stream.limit.lock().map(|mut l| !l.allow()).unwrap_or(false);
    if limited {
        return Error::TooManyRequests(format!(
            "more than {} messages per second; slow down",
            state.settings.connections.rate_limit
        ))
        .into_response();
    }
    let max = state.settings.connections.max_frame_size;
    let too_large = || {
        Error::PayloadTooLarge(format!(
            "a frame larger than {max} bytes; large messages must be chunked"
        ))
        .into_response()
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > max) {
        return too_large();
    }
    let data = match axum::body::to_bytes(body, max).await {
        Ok(data) => data,
        Err(_) if declared.is_none() => return too_large(),
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("the request body could not be read: {e}"),
            );
        }
    };
    if data.is_empty() {
        return refuse(StatusCode::BAD_REQUEST, "Empty request body");
    }
    if let Some(reply) = control_type(&data).and_then(|kind| stream.session.control(&state, kind)) {
        stream.send_control(&reply);
        return StatusCode::OK.into_response();
    }
    match stream.session.route(&state, data).await {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => {
            if stream.errors.fetch_add(1, Ordering::Relaxed) + 1 >= MAX_PROTOCOL_ERRORS {
                let _ = stream.session.reason.set("too many invalid frames".into());
                stream.session.kill.cancel();
            }
            refuse(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
        }
    }
}

/// The type of a control message (`ping`, `refresh_token`): a small msgpack map whose `type`
/// is one of them. RPC frames are never mistaken for one: their types differ.
fn control_type(data: &[u8]) -> Option<&'static str> {
    if data.len() > 256 {
        return None;
    }
    let value = rmpv::decode::read_value(&mut &data[..]).ok()?;
    match crate::rpc::value::get_str(&value, "type")? {
        "ping" => Some("ping"),
        "refresh_token" => Some("refresh_token"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_length_prefixed() {
        let f = frame(b"abc");
        assert_eq!(&f[..], &[0, 0, 0, 3, b'a', b'b', b'c']);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }

    #[test]
    fn control_messages_are_told_from_frames() {
        let ping = crate::rpc::value::encode(&crate::rpc::value::from_json(
            &serde_json::json!({"type": "ping"}),
        ));
        assert_eq!(control_type(&ping), Some("ping"));
        let call = crate::rpc::value::encode(&crate::rpc::value::from_json(
            &serde_json::json!({"type": "method", "to": "x"}),
        ));
        assert_eq!(control_type(&call), None);
        assert_eq!(control_type(b"\xff\x00"), None);
    }
}
