//! A client admitted over either transport (websocket or HTTP streaming): its place in the
//! hub, its `connection_info`, and what the server does with the frames and control messages
//! it sends. The transports only move bytes; everything a client may do is decided here.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::handshake::Admitted;
use crate::AppState;
use crate::auth::{Permission, UserInfo};
use crate::hub::{ClientHandle, Outbound, Queued, Room, Routed, Sender};
use crate::ids::PeerAddr;

/// Calls to the server's own services one connection may have running at once.
const MAX_SERVER_CALLS: usize = 512;
const MAX_SERVER_CALLS_ANONYMOUS: usize = 128;

/// One admitted client, registered with the hub from [`Session::open`] until
/// [`Session::close`].
pub(crate) struct Session {
    pub addr: PeerAddr,
    /// `addr` as text: the form frames carry and the hub routes by.
    pub key: String,
    pub conn_id: u64,
    pub user: Arc<UserInfo>,
    user_msgpack: Vec<u8>,
    permission: Permission,
    calls: Arc<Semaphore>,
    peer_ip: IpAddr,
    /// The client's queue (bounded; the hub writes to it).
    pub tx: mpsc::Sender<Queued>,
    /// Cancelled when the server ends the connection; `reason` says why, when it says.
    pub kill: CancellationToken,
    pub reason: Arc<OnceLock<String>>,
    pub reconnecting: bool,
}

/// Why a client id cannot be taken (said in the close frame or the HTTP answer).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Taken {
    #[error("Client already exists and is active: {0}")]
    Live(String),
    #[error(
        "the shared directory (Redis) is unavailable, so the server cannot check that client id {0} is free; reconnect with its reconnection token, or try again once Redis is back"
    )]
    DirectoryUnavailable(String),
}

/// Why a frame from the client was not routed (said to it in an error message).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unrouted {
    #[error(transparent)]
    Route(#[from] crate::hub::RouteError),
    #[error("{0}")]
    Refused(String),
}

/// Refuses a signed-in user whose account has been disabled (anonymous users have none).
pub(crate) async fn account_usable(state: &AppState, user: &UserInfo) -> Result<(), String> {
    if user.is_anonymous() {
        return Ok(());
    }
    match state.accounts.is_disabled(user.account()).await {
        Ok(false) => Ok(()),
        Ok(true) => Err("Authentication error: this account is disabled".into()),
        Err(e) => Err(format!("Authentication error: {e}")),
    }
}

impl Session {
    /// Registers an admitted client with the hub (replacing a live connection under the same
    /// address only when the client proved itself with its reconnection token). The client is
    /// announced to its workspace by [`Session::started`], once it has its `connection_info`.
    pub(crate) async fn open(
        state: &AppState,
        admitted: Admitted,
        client_ip: IpAddr,
    ) -> Result<(Session, mpsc::Receiver<Queued>), Taken> {
        let Admitted {
            user,
            workspace,
            client,
            permission,
            reconnecting,
        } = admitted;
        let addr = PeerAddr::new(workspace.clone(), client.clone());
        let key = addr.to_string();
        let ws = workspace.as_str();
        let user = Arc::new(user);
        let user_msgpack =
            crate::rpc::value::encode(&crate::rpc::value::from_json(&user.to_json()));
        let (tx, rx) = mpsc::channel::<Queued>(state.settings.connections.queue);
        let kill = CancellationToken::new();
        let conn_id = state.hub.next_conn_id();
        let reason: Arc<OnceLock<String>> = Default::default();
        let handle = ClientHandle {
            conn_id,
            tx: tx.clone(),
            room: Room::new(if user.is_anonymous() {
                crate::hub::QUEUE_BYTES_ANONYMOUS
            } else {
                crate::hub::QUEUE_BYTES
            }),
            kill: kill.clone(),
            user: user.clone(),
            events: Default::default(),
            reason: reason.clone(),
            since_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            reconnected: reconnecting,
        };
        let fresh_anonymous = user.token.is_none() && user.is_own_workspace(ws);
        let taken = if state.hub.insert(&key, ws, handle, reconnecting).is_err() {
            Err(Taken::Live(key.clone()))
        } else {
            free_elsewhere(state, ws, client.as_str(), reconnecting || fresh_anonymous).await
        };
        if let Err(taken) = taken {
            state.hub.remove(&key, ws, conn_id);
            return Err(taken);
        }
        let calls = Arc::new(Semaphore::new(if user.is_anonymous() {
            MAX_SERVER_CALLS_ANONYMOUS
        } else {
            MAX_SERVER_CALLS
        }));
        let session = Session {
            addr,
            key,
            conn_id,
            user,
            user_msgpack,
            permission,
            calls,
            peer_ip: client_ip,
            tx,
            kill,
            reason,
            reconnecting,
        };
        Ok((session, rx))
    }

    pub(crate) fn workspace(&self) -> &str {
        self.addr.workspace.as_str()
    }

    /// The identity with the connection's client and workspace: what its reconnection tokens
    /// carry. Made when a token is issued (at the start and on `refresh_token`), not kept: it
    /// would be a second copy of the user in every idle connection. It carries the grants of
    /// the token the client came with, never the permission the connection was given: that
    /// may have come from owning a workspace, and is worked out again at the reconnection (an
    /// owner removed since gets no admin back through a token refreshed meanwhile).
    fn scoped(&self) -> UserInfo {
        let mut scoped = (*self.user).clone();
        scoped.scope.client = Some(self.addr.client.clone());
        scoped.scope.current = Some(self.addr.workspace.clone());
        scoped
    }

    /// The first message a client gets: where it is, who it is, and its reconnection token.
    pub(crate) fn connection_info(&self, state: &AppState) -> serde_json::Value {
        let (reconnection_token, expires_at) = state.tokens.issue_reconnection(
            &self.scoped(),
            state.settings.connections.reconnection_token_life_time,
        );
        serde_json::json!({
            "type": "connection_info",
            "hypha_version": crate::HYPHA_VERSION,
            "public_base_url": state.public_base_url,
            "local_base_url": state.local_base_url,
            "manager_id": state.manager_id(),
            "workspace": self.workspace(),
            "client_id": self.addr.client.as_str(),
            "user": self.user.to_json(),
            "reconnection_token": reconnection_token,
            "reconnection_token_life_time": (expires_at - crate::auth::now_secs()).max(1),
        })
    }

    /// Announces the client to its workspace (after it got its `connection_info`).
    pub(crate) async fn started(&self, state: &AppState) {
        state.client_connected(&self.addr).await;
    }

    /// Forgets the client, unless a newer connection has taken its address since.
    pub(crate) async fn close(&self, state: &AppState) {
        state.client_gone(&self.addr, self.conn_id).await;
    }

    /// The sender of this client's frames, as the hub needs it.
    fn sender(&self) -> Sender<'_> {
        Sender {
            addr: &self.key,
            workspace: self.workspace(),
            user: &self.user,
            user_msgpack: &self.user_msgpack,
            may_broadcast: self.permission >= Permission::ReadWrite,
            calls: &self.calls,
            peer_ip: Some(self.peer_ip),
        }
    }

    /// Routes one frame from the client. A target that is gone, or a call the server refused,
    /// is answered on the client's own queue.
    pub(crate) async fn route(&self, state: &AppState, data: Bytes) -> Result<(), Unrouted> {
        let sender = self.sender();
        match state.hub.route(&sender, data).await? {
            Routed::Delivered | Routed::Dropped => {}
            Routed::PeerGone {
                session,
                target,
                error,
            } => {
                let frame = crate::hub::peer_not_found(&target, &self.key, &session, &error);
                let _ = self.tx.try_send(Queued::unmetered(Outbound::Binary(frame)));
            }
            Routed::Refused { error, reject } => {
                if let Some(reject) = reject {
                    let _ = self
                        .tx
                        .try_send(Queued::unmetered(Outbound::Binary(reject)));
                }
                return Err(Unrouted::Refused(error));
            }
        }
        Ok(())
    }

    /// The answer to a control message (`ping`, `refresh_token`); `None` for other types.
    pub(crate) fn control(&self, state: &AppState, kind: &str) -> Option<serde_json::Value> {
        match kind {
            "ping" => Some(serde_json::json!({"type": "pong"})),
            "refresh_token" => Some(serde_json::json!({
                "type": "reconnection_token",
                "reconnection_token": state.tokens.issue_reconnection(
                    &self.scoped(),
                    state.settings.connections.reconnection_token_life_time,
                ).0,
            })),
            _ => None,
        }
    }
}

/// Whether the client id is free of other live instances. A reconnecting client (or a fresh
/// anonymous one, whose workspace is new) may take it over; when the shared directory cannot
/// be consulted, nobody else may claim it: failing open would let anyone holding a token
/// for the workspace take over a live client's id while Redis is away.
async fn free_elsewhere(
    state: &AppState,
    ws: &str,
    client: &str,
    proven: bool,
) -> Result<(), Taken> {
    if !state.directory.is_shared() || proven {
        return Ok(());
    }
    let unavailable = || Taken::DirectoryUnavailable(client.to_string());
    if !crate::workspace::directory_reachable(state) {
        return Err(unavailable());
    }
    match state.directory.client_elsewhere(ws, client).await {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(Taken::Live(format!("{ws}/{client}"))),
        Err(_) => Err(unavailable()),
    }
}

/// A token bucket: `rate` messages a second, bursts of twice that (0: unlimited).
pub(crate) struct RateLimit {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    pub(crate) fn new(per_second: u32) -> Self {
        let rate = per_second as f64;
        Self {
            rate,
            tokens: rate * 2.0,
            at: Instant::now(),
        }
    }

    pub(crate) fn allow(&mut self) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate * 2.0);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
