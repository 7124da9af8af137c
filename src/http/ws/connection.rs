//! One websocket connection: the handshake, then a loop that reads frames, writes the client's
//! queue, answers pings and closes idle, dead or misbehaving clients.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::WebSocket;
use crate::AppState;
use crate::http::handshake::{Admitted, Hello, admit};
use crate::http::session::{RateLimit, Session, account_usable};
use crate::hub::{Outbound, Queued};

/// How connections behave: time-outs, sizes, rates.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionOptions {
    /// Close a websocket that sent no message for this many seconds
    #[arg(
        long,
        env = "HYPHA_WS_IDLE_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 600
    )]
    pub ws_idle_timeout: u64,
    /// Send a protocol ping this often, in seconds
    #[arg(
        long,
        env = "HYPHA_WS_PING_INTERVAL",
        value_name = "SECONDS",
        default_value_t = 20
    )]
    pub ws_ping_interval: u64,
    /// Close a websocket that does not answer a ping within this many seconds
    #[arg(
        long,
        env = "HYPHA_WS_PING_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 20
    )]
    pub ws_ping_timeout: u64,
    /// Largest websocket frame accepted, in bytes
    #[arg(long, env = "HYPHA_MAX_FRAME_SIZE", value_name = "BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_frame_size: usize,
    /// Frames queued for one client before it counts as slow
    #[arg(
        long,
        env = "HYPHA_CONNECTION_QUEUE",
        value_name = "FRAMES",
        default_value_t = 256
    )]
    pub connection_queue: usize,
    /// How long a full queue may block before its slow client is disconnected, in seconds
    #[arg(
        long,
        env = "HYPHA_SLOW_CONSUMER_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 5
    )]
    pub slow_consumer_timeout: u64,
    /// Messages per second one connection may send (bursts of twice that); 0 = unlimited
    #[arg(
        long,
        env = "HYPHA_WS_RATE_LIMIT",
        value_name = "PER_SECOND",
        default_value_t = 20_000
    )]
    pub ws_rate_limit: u32,
    /// Lifetime of reconnection tokens, in seconds (never beyond the token the connection was opened with)
    #[arg(
        long,
        env = "HYPHA_RECONNECTION_TOKEN_LIFE_TIME",
        value_name = "SECONDS",
        default_value_t = 172_800
    )]
    pub reconnection_token_life_time: i64,
    /// Time-out of calls the server makes to clients, in seconds
    #[arg(
        long,
        env = "HYPHA_METHOD_TIMEOUT",
        value_name = "SECONDS",
        default_value_t = 30
    )]
    pub method_timeout: u64,
}

/// How connections behave, validated.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// How long the first (authentication) message may take.
    pub handshake_timeout: Duration,
    pub max_frame_size: usize,
    /// Frames queued for one client.
    pub queue: usize,
    pub slow_consumer_timeout: Duration,
    pub rate_limit: u32,
    pub reconnection_token_life_time: i64,
    pub method_timeout: Duration,
}

impl ConnectionOptions {
    pub(crate) fn settings(&self) -> Result<ConnectionSettings, crate::options::SettingsError> {
        use crate::options::{SettingsError, option_name, positive_seconds};
        if self.max_frame_size < 1024 {
            return Err(SettingsError::new(format!(
                "{}: must be at least 1024 bytes",
                option_name("max-frame-size")
            )));
        }
        if self.connection_queue == 0 {
            return Err(SettingsError::new(format!(
                "{}: must be positive",
                option_name("connection-queue")
            )));
        }
        if self.reconnection_token_life_time <= 0 {
            return Err(SettingsError::new(format!(
                "{}: must be a positive number of seconds",
                option_name("reconnection-token-life-time")
            )));
        }
        Ok(ConnectionSettings {
            idle_timeout: Duration::from_secs(self.ws_idle_timeout),
            ping_interval: positive_seconds(
                &option_name("ws-ping-interval"),
                self.ws_ping_interval,
            )?,
            ping_timeout: Duration::from_secs(self.ws_ping_timeout),
            handshake_timeout: Duration::from_secs(5),
            max_frame_size: self.max_frame_size,
            queue: self.connection_queue,
            slow_consumer_timeout: Duration::from_secs(self.slow_consumer_timeout),
            rate_limit: self.ws_rate_limit,
            reconnection_token_life_time: self.reconnection_token_life_time,
            method_timeout: positive_seconds(&option_name("method-timeout"), self.method_timeout)?,
        })
    }
}

/// Close codes (RFC 6455).
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_UNSUPPORTED: u16 = 1003;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;

/// Protocol errors tolerated from one connection before it is closed.
const MAX_PROTOCOL_ERRORS: u32 = 100;
/// Frames written per flush when the queue has a backlog.
const WRITE_BATCH: usize = 64;

fn error_text(message: &str) -> String {
    serde_json::json!({"type": "error", "message": message}).to_string()
}

/// How long closing a socket may wait on a client that does not read.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Makes a future and boxes it in a plain function. A future made inside an `async fn` takes
/// room in that function's own state as well as in its box (the compiler keeps the room of a
/// value moved into `Box::pin` for as long as the caller lives); made here, only the box's
/// pointer is kept.
fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::pin(make())
}

/// Boxed where it is awaited in the long-lived loop, so that its state does not take room in
/// every connection's future.
async fn close_with(socket: &mut WebSocket, code: u16, message: &str) {
    boxed(|| close_now(socket, code, message)).await
}

async fn close_now(socket: &mut WebSocket, code: u16, message: &str) {
    let reason: String = message.chars().take(100).collect();
    let close = async {
        socket
            .send(Message::Text(error_text(message).into()))
            .await?;
        socket
            .send(Message::Close(Some(CloseFrame {
                code: code.into(),
                reason: reason.into(),
            })))
            .await
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
}

/// Serves one upgraded websocket until it closes. Its opening (the handshake, the hub's
/// registration, the first message) runs in a box that is freed before the connection
/// settles in; what stays for the connection's life is the box of `live` and this future's
/// two pointers. (Awaited inline, each step would keep the room of its largest state in
/// every connection for as long as the connection lives.)
pub(crate) fn serve(
    upgrade: hyper::upgrade::OnUpgrade,
    config: WebSocketConfig,
    state: Arc<AppState>,
    client_ip: std::net::IpAddr,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let opening = Box::pin(opening(upgrade, config, state, client_ip));
    async move {
        if let Some(live) = opening.await {
            live.await;
        }
    }
}

/// The connection's life after its opening.
type Live = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Completes the upgrade, admits the client, registers it with the hub and sends its first
/// message; says `None` (the socket closed, with a reason where there is one) when any of
/// that fails.
async fn opening(
    upgrade: hyper::upgrade::OnUpgrade,
    config: WebSocketConfig,
    state: Arc<AppState>,
    client_ip: std::net::IpAddr,
) -> Option<Live> {
    let mut socket = boxed(|| super::accept(upgrade, config)).await?;
    let admitted = boxed(|| handshake(&mut socket, &state)).await?;
    let (session, rx) = boxed(|| open(&mut socket, &state, admitted, client_ip)).await?;
    let info = session.connection_info(&state).to_string();
    tracing::info!(client = %session.key, user = %session.user.id, reconnecting = session.reconnecting, "connection opened");
    if socket.send(Message::Text(info.into())).await.is_err() {
        tracing::info!(client = %session.key, reason = "write failed", "connection closed");
        boxed(|| session.close(&state)).await;
        return None;
    }
    Some(Box::pin(live(socket, state, session, rx)))
}

/// Reads the first message and admits the client, or closes the socket and says `None`.
async fn handshake(socket: &mut WebSocket, state: &Arc<AppState>) -> Option<Admitted> {
    let settings = &state.settings.connections;
    let first = match tokio::time::timeout(settings.handshake_timeout, socket.next()).await {
        Ok(Some(Ok(message))) => message,
        Ok(_) => return None,
        Err(_) => {
            close_with(
                socket,
                CLOSE_POLICY,
                "no authentication message within the time-out",
            )
            .await;
            return None;
        }
    };
    let text = match first {
        Message::Text(text) => text.to_string(),
        Message::Binary(data) => match String::from_utf8(data.to_vec()) {
            Ok(text) => text,
            Err(_) => {
                close_with(
                    socket,
                    CLOSE_UNSUPPORTED,
                    "the first message must be UTF-8 JSON",
                )
                .await;
                return None;
            }
        },
        _ => return None,
    };
    let hello: Hello = match serde_json::from_str(&text) {
        Ok(hello) => hello,
        Err(e) => {
            close_with(socket, CLOSE_UNSUPPORTED, &format!("the first message must be a JSON object with client_id, workspace and token: {e}")).await;
            return None;
        }
    };
    let admitted = match admit(&hello, &state.tokens, &state.workspaces) {
        Ok(admitted) => admitted,
        Err(reason) => {
            tracing::info!(%reason, "connection refused");
            close_with(
                socket,
                CLOSE_POLICY,
                &format!("Authentication error: {reason}"),
            )
            .await;
            return None;
        }
    };
    if let Err(reason) = account_usable(state, &admitted.user).await {
        close_with(socket, CLOSE_POLICY, &reason).await;
        return None;
    }
    Some(admitted)
}

/// Registers the admitted client with the hub; closes the socket and says `None` when its
/// address is taken.
async fn open(
    socket: &mut WebSocket,
    state: &Arc<AppState>,
    admitted: Admitted,
    client_ip: std::net::IpAddr,
) -> Option<(Session, mpsc::Receiver<Queued>)> {
    match Session::open(state, admitted, client_ip).await {
        Ok(opened) => Some(opened),
        Err(taken) => {
            close_with(socket, CLOSE_POLICY, &taken.to_string()).await;
            None
        }
    }
}

/// The connection's life: frames both ways until one side ends it.
async fn live(
    mut socket: WebSocket,
    state: Arc<AppState>,
    session: Session,
    mut rx: mpsc::Receiver<Queued>,
) {
    boxed(|| session.started(&state)).await;
    let reason = serve_frames(&mut socket, &state, &session, &mut rx).await;
    tracing::info!(client = %session.key, reason, "connection closed");
    boxed(|| session.close(&state)).await;
}

async fn serve_frames(
    socket: &mut WebSocket,
    state: &Arc<AppState>,
    session: &Session,
    rx: &mut mpsc::Receiver<Queued>,
) -> &'static str {
    let settings = &state.settings.connections;
    let kill = &session.kill;
    let reason = &session.reason;
    let mut ticker = tokio::time::interval(settings.ping_interval);
    ticker.tick().await;
    let mut last_message = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let mut errors = 0u32;
    let mut limit = RateLimit::new(settings.rate_limit);
    loop {
        tokio::select! {
            biased;
            _ = kill.cancelled() => {
                if state.stopping.is_cancelled() {
                    close_with(socket, CLOSE_GOING_AWAY, "the server is shutting down").await;
                    return "server shutdown";
                }
                if let Some(reason) = reason.get() {
                    close_with(socket, CLOSE_POLICY, reason).await;
                    return "closed by the server (see the message above)";
                }
                close_with(socket, CLOSE_GOING_AWAY, "disconnected by the server").await;
                return "disconnected by the server";
            }
            out = rx.recv() => {
                let Some(out) = out else { return "queue closed" };
                // A client that stops reading blocks this write; the hub then cancels `kill`.
                tokio::select! {
                    written = write(socket, out, rx) => if written.is_err() {
                        return "write failed";
                    },
                    _ = kill.cancelled() => return "stopped reading its messages",
                }
            }
            incoming = socket.next() => {
                let message = match incoming {
                    Some(Ok(message)) => message,
                    Some(Err(_)) => return "read failed",
                    None => return "closed by the client",
                };
                ping_sent = None;
                match message {
                    Message::Binary(data) => {
                        last_message = Instant::now();
                        if data.len() > settings.max_frame_size {
                            close_with(socket, CLOSE_TOO_BIG, &format!(
                                "a frame of {} bytes exceeds the limit of {} bytes; large messages must be chunked",
                                data.len(), settings.max_frame_size)).await;
                            return "frame too large";
                        }
                        if !limit.allow() {
                            close_with(socket, CLOSE_POLICY, &format!(
                                "more than {} messages per second; slow down", settings.rate_limit)).await;
                            return "rate limit";
                        }
                        // Boxed: routing reaches every service's handler, whose state would
                        // otherwise be part of every idle connection's future.
                        if let Err(e) = boxed(|| session.route(state, data)).await {
                            errors += 1;
                            let told = Message::Text(error_text(&e.to_string()).into());
                            if send_within(socket, told, settings.ping_timeout).await.is_err() {
                                return "stopped reading its messages";
                            }
                            if errors >= MAX_PROTOCOL_ERRORS {
                                close_with(socket, CLOSE_POLICY, "too many invalid frames").await;
                                return "too many invalid frames";
                            }
                        }
                    }
                    Message::Text(text) => {
                        last_message = Instant::now();
                        if !limit.allow() {
                            close_with(socket, CLOSE_POLICY, "too many messages per second").await;
                            return "rate limit";
                        }
                        if let Some(reply) = control_type(text.as_str()).and_then(|kind| session.control(state, &kind)) {
                            let reply = Message::Text(reply.to_string().into());
                            if send_within(socket, reply, settings.ping_timeout).await.is_err() {
                                return "stopped reading its messages";
                            }
                        }
                    }
                    Message::Close(_) => return "closed by the client",
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                }
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                if now.duration_since(last_message) > settings.idle_timeout {
                    close_with(socket, CLOSE_GOING_AWAY, "idle time-out").await;
                    return "idle time-out";
                }
                match ping_sent {
                    Some(at) if now.duration_since(at) > settings.ping_timeout => {
                        return "ping time-out";
                    }
                    Some(_) => {}
                    None => {
                        ping_sent = Some(now);
                        let ping = Message::Ping(Bytes::new());
                        if send_within(socket, ping, settings.ping_timeout).await.is_err() {
                            return "write failed or timed out";
                        }
                    }
                }
            }
        }
    }
}

/// Sends a message outside the queue (an error, a control reply, a ping) within `limit`: a
/// client that stops reading cannot hold its connection, and what it holds, by never taking
/// one (the queue's writes are cut by the hub's slow-consumer check instead).
async fn send_within(socket: &mut WebSocket, message: Message, limit: Duration) -> Result<(), ()> {
    match tokio::time::timeout(limit, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Writes a queued message and whatever else is waiting (up to a batch), then flushes; the
/// messages' share of the queue's byte budget is given back once they are written.
async fn write(
    socket: &mut WebSocket,
    first: Queued,
    rx: &mut mpsc::Receiver<Queued>,
) -> Result<(), WsError> {
    fn to_message(out: Outbound) -> Message {
        match out {
            Outbound::Binary(data) => Message::Binary(data),
        }
    }
    let mut written = Vec::new();
    let (out, room) = first.into_parts();
    socket.feed(to_message(out)).await?;
    written.push(room);
    for _ in 0..WRITE_BATCH {
        match rx.try_recv() {
            Ok(next) => {
                let (out, room) = next.into_parts();
                socket.feed(to_message(out)).await?;
                written.push(room);
            }
            Err(_) => break,
        }
    }
    socket.flush().await
}

/// The type of a text control message (`{"type": "ping"}`, `{"type": "refresh_token"}`).
fn control_type(text: &str) -> Option<String> {
    if text.len() > 1000 {
        return None;
    }
    let message: serde_json::Value = serde_json::from_str(text).ok()?;
    Some(message.get("type")?.as_str()?.to_string())
}
