//! Live connections and routing: every client frame gets its trusted `from`/`ws`/`user` from
//! the server, then goes to its target's bounded queue, to a workspace broadcast, or to the
//! server's own RPC peer.

pub mod chunks;
pub(crate) mod inflight;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::UserInfo;
use crate::cluster::bus::{self, Announcement, Bus};
use crate::ids::PeerRef;
use crate::rpc::frame::{Frame, FrameError};

/// What a connection's writer sends to its socket.
#[derive(Debug)]
pub(crate) enum Outbound {
    Binary(Bytes),
}

impl Outbound {
    fn len(&self) -> usize {
        match self {
            Outbound::Binary(data) => data.len(),
        }
    }
}

/// A message in a connection's queue. It holds its share of the queue's byte budget until it
/// is written, so a client that reads slowly holds up at most that many bytes.
///
/// One pointer wide: a queue sets aside room for 32 entries as soon as it is made, in every
/// connection, busy or idle; entries of 48 bytes made that 1.5 KiB each.
pub(crate) struct Queued(Box<QueuedParts>);

struct QueuedParts {
    out: Outbound,
    room: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Queued {
    /// A small message from the connection itself (errors, answers to control messages),
    /// outside the byte budget.
    pub(crate) fn unmetered(out: Outbound) -> Self {
        Self(Box::new(QueuedParts { out, room: None }))
    }

    /// A message holding its share of the budget.
    fn metered(out: Outbound, room: tokio::sync::OwnedSemaphorePermit) -> Self {
        Self(Box::new(QueuedParts {
            out,
            room: Some(room),
        }))
    }

    /// The message, with its share of the budget given back once the caller is done with it.
    pub(crate) fn into_parts(self) -> (Outbound, Option<tokio::sync::OwnedSemaphorePermit>) {
        let QueuedParts { out, room } = *self.0;
        (out, room)
    }
}

/// Bytes queued for one client before the sender waits (and the client counts as slow).
pub(crate) const QUEUE_BYTES: usize = 8 * 1024 * 1024;
pub(crate) const QUEUE_BYTES_ANONYMOUS: usize = 2 * 1024 * 1024;

/// A connection's byte budget, in KiB.
#[derive(Clone)]
pub(crate) struct Room {
    kib: Arc<tokio::sync::Semaphore>,
    max_kib: u32,
}

impl Room {
    pub(crate) fn new(bytes: usize) -> Self {
        let max_kib = (bytes / 1024).max(1) as u32;
        Self {
            kib: Arc::new(tokio::sync::Semaphore::new(max_kib as usize)),
            max_kib,
        }
    }

    /// What a message of `len` bytes takes (a frame larger than the whole budget takes all of it).
    fn share(&self, len: usize) -> u32 {
        (len.div_ceil(1024) as u32).clamp(1, self.max_kib)
    }
}

/// The hub's handle on one live connection.
#[derive(Clone)]
pub(crate) struct ClientHandle {
    pub conn_id: u64,
    pub tx: mpsc::Sender<Queued>,
    /// The byte budget of its queue.
    pub room: Room,
    /// Cancelled to disconnect the client (slow consumer, superseded, shutdown).
    pub kill: CancellationToken,
    pub user: Arc<UserInfo>,
    /// Manager events this client subscribed to.
    pub events: Arc<Mutex<HashSet<String>>>,
    /// Why the server closed the connection, told to the client in its close frame.
    pub reason: Arc<std::sync::OnceLock<String>>,
    /// When it connected (ms since the epoch), and whether it proved itself with the client's
    /// reconnection token: what settles a claim on the same client id by two instances.
    pub since_ms: i64,
    pub reconnected: bool,
}

impl ClientHandle {
    /// Closes the connection, telling the client why.
    pub(crate) fn close(&self, reason: &str) {
        let _ = self.reason.set(reason.to_string());
        self.kill.cancel();
    }
}

/// Why a frame could not be handed to a client.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum SendError {
    #[error("Target peer {0} is not connected")]
    NotConnected(String),
    #[error("Target peer {0} is not reading its messages and was disconnected")]
    SlowConsumer(String),
    #[error("Target peer {0} is not on this instance and {1}")]
    Bus(String, bus::BusError),
}

/// Another live connection already holds the address.
#[derive(Debug, thiserror::Error)]
#[error("Client already exists and is active")]
pub(crate) struct AlreadyConnected;

/// The sender of a frame, as the server knows it.
pub(crate) struct Sender<'a> {
    pub addr: &'a str,
    pub workspace: &'a str,
    pub user: &'a Arc<UserInfo>,
    pub user_msgpack: &'a [u8],
    pub may_broadcast: bool,
    /// The calls to the server's own services it may still have running.
    pub calls: &'a Arc<tokio::sync::Semaphore>,
    /// Its network address (behind a trusted proxy, the client's).
    pub peer_ip: Option<std::net::IpAddr>,
}

/// A frame for the server's own services, with its sender's place among the calls it may
/// have running (given back when the call is done).
pub(crate) struct ToServer {
    pub incoming: crate::rpc::peer::Incoming,
    pub running: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Frames for the server waiting to be taken: beyond this the server is too busy.
pub(crate) const SERVER_QUEUE: usize = 4096;

/// Where a routed frame went.
#[derive(Debug)]
pub(crate) enum Routed {
    Delivered,
    /// The target is gone (or unreachable) and the frame expects an answer: tell the sender
    /// at once, with `error` saying why.
    PeerGone {
        session: String,
        target: String,
        error: String,
    },
    /// Gone target, no answer expected: dropped.
    Dropped,
    /// Not delivered: the frame claimed what only the server may say. `reject` answers the
    /// sender's call, when it made one.
    Refused {
        error: String,
        reject: Option<Bytes>,
    },
}

/// Routing failures that are the sender's fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RouteError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("broadcast to workspace {0} is not allowed")]
    BroadcastDenied(String),
    #[error("invalid target {0:?}")]
    BadTarget(String),
}

/// Removals between two looks at whether the maps should give room back (a look reads each
/// shard's capacity; a crowd leaving ends within this many removals of its last look).
const COMPACT_EVERY: u64 = 128;
/// Maps this small keep their room (tens of KiB; at 4,096 the three maps kept about 0.7 MiB
/// after 10,000 clients had left).
const COMPACT_ABOVE: usize = 256;

/// The registry of live connections.
pub struct Hub {
    clients: DashMap<String, ClientHandle>,
    workspaces: DashMap<String, HashSet<String>>,
    /// The clients of each workspace that subscribed to manager events: what an event looks
    /// through, instead of every client of the workspace (connects and disconnects send
    /// events, so a look at every client made their cost grow with the workspace).
    watching: DashMap<String, HashSet<String>>,
    next_conn: AtomicU64,
    /// Connections removed since the maps were last looked at for room to give back.
    removed_since_compact: AtomicU64,
    slow_consumer_timeout: Duration,
    manager_id: String,
    /// Where frames for clients that are not here go.
    bus: Arc<dyn Bus>,
    /// Where frames for the server's own services go.
    server: mpsc::Sender<ToServer>,
    pub(crate) routed_messages: Counter,
    pub(crate) routed_bytes: Counter,
    /// Calls between clients that have not been answered yet, and how calls ended.
    pub(crate) inflight: inflight::InFlight,
    /// Chunked messages passing between clients, vetted as they pass.
    pub(crate) chunks: chunks::ChunkWatch,
    /// Frames that went to another instance, and those that came from one.
    pub(crate) bus_sent: Counter,
    pub(crate) bus_received: Counter,
}

impl Hub {
    /// A hub that hands frames for the server to `server`.
    pub(crate) fn new(
        manager_id: String,
        slow_consumer_timeout: Duration,
        bus: Arc<dyn Bus>,
        server: mpsc::Sender<ToServer>,
    ) -> Self {
        Self {
            server,
            clients: DashMap::new(),
            workspaces: DashMap::new(),
            watching: DashMap::new(),
            next_conn: AtomicU64::new(1),
            removed_since_compact: AtomicU64::new(0),
            slow_consumer_timeout,
            manager_id,
            bus,
            routed_messages: Counter::default(),
            routed_bytes: Counter::default(),
            inflight: Default::default(),
            chunks: Default::default(),
            bus_sent: Counter::default(),
            bus_received: Counter::default(),
        }
    }

    /// The id the server's manager goes by; frames to it are the server's.
    pub(crate) fn manager_id(&self) -> &str {
        &self.manager_id
    }

    pub(crate) fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn connection_count(&self) -> usize {
        self.clients.len()
    }

    /// Workspaces with at least one client connected here.
    pub(crate) fn workspace_count(&self) -> usize {
        self.workspaces
            .iter()
            .filter(|w| !w.value().is_empty())
            .count()
    }

    /// Adds a connection; with `replace`, an existing one under the same address is disconnected.
    /// Fails with [`AlreadyConnected`] when a live connection holds the address.
    pub(crate) fn insert(
        &self,
        addr: &str,
        workspace: &str,
        handle: ClientHandle,
        replace: bool,
    ) -> Result<(), AlreadyConnected> {
        use dashmap::mapref::entry::Entry;
        match self.clients.entry(addr.to_string()) {
            Entry::Occupied(mut existing) => {
                if !replace && !existing.get().kill.is_cancelled() && !existing.get().tx.is_closed()
                {
                    return Err(AlreadyConnected);
                }
                existing.get().kill.cancel();
                existing.insert(handle);
            }
            Entry::Vacant(slot) => {
                slot.insert(handle);
            }
        }
        let client = PeerRef::client_of(addr);
        self.workspaces
            .entry(workspace.to_string())
            .or_default()
            .insert(client.to_string());
        Ok(())
    }

    /// Removes a connection if it is still the one with `conn_id` (a newer one may have replaced it).
    pub(crate) fn remove(&self, addr: &str, workspace: &str, conn_id: u64) -> bool {
        let removed = self
            .clients
            .remove_if(addr, |_, h| h.conn_id == conn_id)
            .is_some();
        if removed {
            self.chunks.forget(addr);
            let client = PeerRef::client_of(addr);
            if let Some(mut members) = self.workspaces.get_mut(workspace) {
                members.remove(client);
            }
            self.workspaces.remove_if(workspace, |_, m| m.is_empty());
            if let Some(mut watchers) = self.watching.get_mut(workspace) {
                watchers.remove(client);
            }
            self.watching.remove_if(workspace, |_, m| m.is_empty());
            if self.removed_since_compact.fetch_add(1, Ordering::Relaxed) + 1 >= COMPACT_EVERY {
                self.removed_since_compact.store(0, Ordering::Relaxed);
                self.compact();
            }
        }
        removed
    }

    /// Gives back the room the maps grew for a crowd of connections that has left: a map
    /// keeps its largest size otherwise, and a server that once held 100,000 clients would
    /// hold their tables for good.
    fn compact(&self) {
        if self.clients.capacity() > COMPACT_ABOVE
            && self.clients.len() < self.clients.capacity() / 4
        {
            self.clients.shrink_to_fit();
            self.workspaces.shrink_to_fit();
            self.watching.shrink_to_fit();
        }
    }

    pub(crate) fn get(&self, addr: &str) -> Option<ClientHandle> {
        self.clients.get(addr).map(|h| h.clone())
    }

    /// Every client connected here, as its calls know it ([`inflight::InFlight::party`]).
    pub(crate) fn connected_parties(&self) -> std::collections::HashSet<u64> {
        self.clients
            .iter()
            .map(|c| self.inflight.party(c.key()))
            .collect()
    }

    pub(crate) fn is_connected(&self, addr: &str) -> bool {
        self.clients.contains_key(addr)
    }

    /// Client ids connected in a workspace.
    pub(crate) fn clients_in(&self, workspace: &str) -> Vec<String> {
        self.workspaces
            .get(workspace)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Every client connected here, as `(workspace, client)`.
    pub(crate) fn addresses(&self) -> Vec<(String, String)> {
        self.workspaces
            .iter()
            .flat_map(|entry| {
                let ws = entry.key().clone();
                entry
                    .value()
                    .iter()
                    .map(|c| (ws.clone(), c.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Notes that a client of `workspace` subscribed to manager events (it stays noted until
    /// it disconnects).
    pub(crate) fn watch(&self, workspace: &str, client: &str) {
        self.watching
            .entry(workspace.to_string())
            .or_default()
            .insert(client.to_string());
    }

    /// Addresses of the clients in `workspace` subscribed to `event`.
    pub(crate) fn subscribers(&self, workspace: &str, event: &str) -> Vec<String> {
        let Some(watchers) = self.watching.get(workspace) else {
            return Vec::new();
        };
        let candidates: Vec<String> = watchers.iter().cloned().collect();
        drop(watchers);
        candidates
            .into_iter()
            .map(|c| format!("{workspace}/{c}"))
            .filter(|addr| {
                self.clients.get(addr).is_some_and(|h| {
                    h.events
                        .lock()
                        .map(|e| e.contains(event) || e.contains("*"))
                        .unwrap_or(false)
                })
            })
            .collect()
    }

    /// Hands a message to a client here or, through the bus, on another instance.
    pub(crate) async fn send(&self, addr: &str, message: Outbound) -> Result<(), SendError> {
        match self.send_local(addr, message).await {
            Err(Unsent::Elsewhere(Outbound::Binary(data))) if self.bus.is_shared() => {
                match self.bus.send(addr, data).await {
                    Ok(true) => {
                        self.bus_sent.inc();
                        Ok(())
                    }
                    Ok(false) => Err(SendError::NotConnected(addr.to_string())),
                    Err(e) => Err(SendError::Bus(addr.to_string(), e)),
                }
            }
            Err(Unsent::Elsewhere(_)) => Err(SendError::NotConnected(addr.to_string())),
            Err(Unsent::Failed(e)) => Err(e),
            Ok(()) => Ok(()),
        }
    }

    /// Publishes a client's frame for another instance without waiting for Redis's answer
    /// (the connection reads its next frame meanwhile); when no instance held the target, the
    /// caller of a call hears `peer_not_found` on its own queue, as for a local target.
    async fn send_elsewhere(self: &Arc<Self>, target: &str, data: Bytes) -> Result<(), SendError> {
        let hub = self.clone();
        // What the answer needs (sender, target, session) is read back from the frame, which
        // this server wrote and the bus gives back, only when it was not delivered.
        let then: bus::Delivered = Box::new(move |delivered, sent| {
            let error = match delivered {
                Ok(true) => {
                    hub.bus_sent.inc();
                    return;
                }
                Ok(false) => None,
                Err(e) => Some(e),
            };
            hub.undelivered(&sent, error);
        });
        let (data, then) = match self.bus.try_send_then(target, data, then) {
            Ok(()) => return Ok(()),
            Err(back) => back,
        };
        self.bus
            .send_then(target, data, then)
            .await
            .map_err(|e| SendError::Bus(target.to_string(), e))
    }

    /// A frame this server wrote for another instance reached none: the caller of a call
    /// hears `peer_not_found` on its own queue and the call stops counting.
    fn undelivered(&self, sent: &Bytes, error: Option<bus::BusError>) {
        // Walked, not parsed: the header this server wrote (with the sender's `user`) may be
        // larger than what a client's header may be.
        let fields = crate::rpc::frame::trusted_fields(sent, ["from", "to", "session"], |found| {
            found.iter().all(Option::is_some)
        });
        let [Some(from), Some(to), Some(session)] = fields else {
            return;
        };
        // A chunked message's `process` went out under the server's session: its caller is
        // told its own.
        let own = self.chunks.undelivered(session);
        let session = own.as_deref().unwrap_or(session);
        let error = match error {
            None => SendError::NotConnected(to.to_string()),
            Some(e) => SendError::Bus(to.to_string(), e),
        };
        self.inflight.abandoned(from, session);
        let reply = peer_not_found(to, from, session, &error.to_string());
        if let Some(handle) = self.clients.get(from) {
            let _ = handle
                .tx
                .try_send(Queued::unmetered(Outbound::Binary(reply)));
        }
    }

    /// Hands a binary frame to the queue of a client connected here only where that needs no
    /// waiting; the frame back where it does not (not here, leaving, queue or byte budget
    /// full): the caller then uses [`Hub::send_local`], which waits and says why. Taken by
    /// value so that a frame nobody else holds is never shared to be queued.
    pub(crate) fn try_send_local(&self, addr: &str, data: Bytes) -> Result<(), Bytes> {
        let Some(handle) = self.clients.get(addr) else {
            return Err(data);
        };
        if handle.kill.is_cancelled() {
            return Err(data);
        }
        let share = handle.room.share(data.len());
        let Ok(permit) = handle.room.kib.clone().try_acquire_many_owned(share) else {
            return Err(data);
        };
        match handle
            .tx
            .try_send(Queued::metered(Outbound::Binary(data), permit))
        {
            Ok(()) => Ok(()),
            Err(refused) => {
                let Outbound::Binary(data) = refused.into_inner().into_parts().0;
                Err(data)
            }
        }
    }

    /// Hands a message to the queue of a client connected here. A full queue blocks the sender
    /// (back-pressure) for at most the slow-consumer time-out; then the client that stopped
    /// reading is disconnected.
    pub(crate) async fn send_local(&self, addr: &str, message: Outbound) -> Result<(), Unsent> {
        let Some((tx, kill, room)) = self
            .clients
            .get(addr)
            .map(|h| (h.tx.clone(), h.kill.clone(), h.room.clone()))
        else {
            return Err(Unsent::Elsewhere(message));
        };
        if kill.is_cancelled() {
            return Err(Unsent::Failed(SendError::NotConnected(addr.to_string())));
        }
        let gone = || Unsent::Failed(SendError::NotConnected(addr.to_string()));
        let share = room.share(message.len());
        let permit = match room.kib.clone().try_acquire_many_owned(share) {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(gone()),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                let wait = tokio::time::timeout(
                    self.slow_consumer_timeout,
                    room.kib.clone().acquire_many_owned(share),
                );
                let outcome = tokio::select! {
                    outcome = wait => outcome,
                    _ = kill.cancelled() => return Err(gone()),
                };
                match outcome {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(gone()),
                    Err(_) => {
                        tracing::warn!(
                            client = addr,
                            "disconnecting a client that stopped reading"
                        );
                        kill.cancel();
                        return Err(Unsent::Failed(SendError::SlowConsumer(addr.to_string())));
                    }
                }
            }
        };
        let message = Queued::metered(message, permit);
        match tx.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(Unsent::Failed(SendError::NotConnected(addr.to_string())))
            }
            Err(mpsc::error::TrySendError::Full(message)) => {
                let wait = tokio::time::timeout(self.slow_consumer_timeout, tx.send(message));
                let outcome = tokio::select! {
                    outcome = wait => outcome,
                    _ = kill.cancelled() => return Err(Unsent::Failed(SendError::NotConnected(addr.to_string()))),
                };
                match outcome {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(Unsent::Failed(SendError::NotConnected(addr.to_string()))),
                    Err(_) => {
                        tracing::warn!(
                            client = addr,
                            "disconnecting a client that stopped reading"
                        );
                        kill.cancel();
                        Err(Unsent::Failed(SendError::SlowConsumer(addr.to_string())))
                    }
                }
            }
        }
    }

    /// Routes one binary frame from a client.
    pub(crate) async fn route(
        self: &Arc<Self>,
        sender: &Sender<'_>,
        data: Bytes,
    ) -> Result<Routed, RouteError> {
        let frame = Frame::parse(data)?;
        let to = frame.field("to").ok_or(FrameError::MissingField("to"))?;
        let target = normalize_target(to, sender.workspace);
        let Some(PeerRef {
            workspace: target_ws,
            client: target_client,
        }) = PeerRef::split(&target)
        else {
            return Err(RouteError::BadTarget(to.chars().take(100).collect()));
        };
        // The receiver acts on the header as delivered: a forged notice, a repeated key read
        // one way here and another there, a method reaching into the receiver's internals
        // are refused (the body is checked below).
        if let Err(error) = crate::rpc::rules::check_header(&frame) {
            let reject = crate::rpc::peer::refusal(&frame, &target, sender.addr, &error);
            return Ok(Routed::Refused { error, reject });
        }
        // Any `*/manager-*` address is this server's manager: a client that kept the manager id
        // of a previous run (or of another instance) goes on working after it reconnects.
        if target_client == self.manager_id || (target_ws == "*" && is_manager_id(target_client)) {
            // An answer to a call another instance's manager made goes back to it; anything
            // else for a manager runs here.
            if target_client != self.manager_id
                && self.bus.is_shared()
                && inflight::is_answer(&frame)
            {
                // The call was noted here when it arrived: it ends (or is kept alive) here too,
                // or it would hold up this instance's graceful stop.
                self.inflight.observe(sender.addr, &target, &frame);
                let out =
                    frame.rewrite(&target, sender.addr, sender.workspace, sender.user_msgpack);
                if let Err(e) = self.send(&target, Outbound::Binary(out)).await {
                    tracing::debug!(error = %e, "an answer to another instance's manager was lost");
                }
                return Ok(Routed::Delivered);
            }
            return Ok(self.to_server(sender, frame, target));
        }
        if target_client.is_empty() || target_ws.is_empty() || target_client.contains('/') {
            return Err(RouteError::BadTarget(to.chars().take(100).collect()));
        }
        // A frame to the sender of a `process` call names the session the server chose for it:
        // the sender is told its own.
        let frame = match self.chunks.restore(sender.addr, &target, &frame) {
            chunks::Restored::Unchanged => frame,
            chunks::Restored::Renamed(renamed) => renamed,
            chunks::Restored::Misdirected => {
                let error = "this frame names a call between two other clients".to_string();
                let reject = crate::rpc::peer::refusal(&frame, &target, sender.addr, &error);
                return Ok(Routed::Refused { error, reject });
            }
        };
        // The clients merge the body over the header the server wrote, so a body may not
        // carry the fields the server sets; and what a chunked message will assemble into is
        // vetted the same way as it passes.
        let vetted = match crate::rpc::scan::check_body(&frame.body) {
            Err(e) => {
                // A chunked message's `process` refused here: its receiver drops the chunks.
                self.chunks.refused(sender.addr, &target, &frame);
                Err(chunks::ChunkRefusal(e.to_string()))
            }
            Ok(()) => {
                let anonymous = sender.user.is_anonymous();
                self.chunks
                    .vet(sender.addr, anonymous, &target, &frame, |session| {
                        // A call that came through another instance is not seen here: its
                        // answer's content is still vetted like any other.
                        !self.clients.contains_key(&target)
                            || self.inflight.awaits_answer(&target, session, sender.addr)
                    })
            }
        };
        let mut frame = frame;
        let server_session = match vetted {
            Err(chunks::ChunkRefusal(error)) => {
                let reject = crate::rpc::peer::refusal(&frame, &target, sender.addr, &error);
                return Ok(Routed::Refused { error, reject });
            }
            Ok(vetted) => {
                if let Some(body) = vetted.body {
                    frame.body = body;
                }
                // A chunked call: its receiver may answer under the session it assembles.
                if let Some(session) = vetted.call_session {
                    self.inflight.opened(sender.addr, &target, &session);
                }
                // A chunked answer: the call it answers ends here.
                if let Some((session, rejects)) = vetted.answers {
                    self.inflight
                        .answer(&target, &session, sender.addr, rejects);
                }
                vetted.server_session
            }
        };
        // A `process` goes out under the server's session; the sender's is what the calls it
        // has open are tracked by (and what a notice that the receiver is gone names).
        let renamed;
        let delivered = match server_session
            .as_deref()
            .and_then(|server| Some((server, frame.field("session")?)))
        {
            Some((server, own)) => {
                renamed = frame.renamed(&["session"], own, server);
                &renamed
            }
            None => &frame,
        };
        let out = delivered.rewrite(&target, sender.addr, sender.workspace, sender.user_msgpack);
        self.routed_messages.inc();
        self.routed_bytes.inc_by(out.len() as u64);
        if target_client == "*" {
            if target_ws != sender.workspace || !sender.may_broadcast {
                return Err(RouteError::BroadcastDenied(target_ws.to_string()));
            }
            self.broadcast_local(target_ws, &out).await;
            if self.bus.is_shared() {
                let announcement = Announcement::Broadcast {
                    workspace: target_ws.to_string(),
                    data: out,
                };
                if let Err(e) = self.bus.announce(announcement).await {
                    tracing::debug!(error = %e, "a broadcast reached this instance only");
                }
            }
            return Ok(Routed::Delivered);
        }
        self.inflight.observe(sender.addr, &target, &frame);
        let sent = match self.send_local(&target, Outbound::Binary(out)).await {
            Err(Unsent::Elsewhere(Outbound::Binary(data))) if self.bus.is_shared() => {
                self.send_elsewhere(&target, data).await
            }
            Err(Unsent::Elsewhere(_)) => Err(SendError::NotConnected(target.clone())),
            Err(Unsent::Failed(e)) => Err(e),
            Ok(()) => Ok(()),
        };
        match sent {
            Ok(()) => Ok(Routed::Delivered),
            Err(e) => match frame.field("session") {
                Some(session) => {
                    // A `process` that reached nobody is answered by nobody.
                    if let Some(server) = &server_session {
                        self.chunks.undelivered(server);
                    }
                    self.inflight.abandoned(sender.addr, session);
                    Ok(Routed::PeerGone {
                        session: session.to_string(),
                        target,
                        error: e.to_string(),
                    })
                }
                None => Ok(Routed::Dropped),
            },
        }
    }

    /// Hands a frame addressed to the server to its services, counting it among the sender's
    /// calls (the built-in service answers at once and is not counted: the clients send
    /// chunks 30 at a time).
    fn to_server(&self, sender: &Sender<'_>, frame: Frame, to: String) -> Routed {
        let immediate = frame
            .field("method")
            .is_some_and(|m| m.starts_with("services.built-in."));
        let running = if immediate {
            None
        } else {
            match sender.calls.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let error = "too many calls to the server in flight from this connection; wait for some to finish".to_string();
                    let reject = crate::rpc::peer::refusal(&frame, &to, sender.addr, &error);
                    return Routed::Refused { error, reject };
                }
            }
        };
        let incoming = crate::rpc::peer::Incoming {
            from: sender.addr.to_string(),
            ws: sender.workspace.to_string(),
            user: sender.user.clone(),
            to: to.clone(),
            frame,
            peer_ip: sender.peer_ip,
            slots: Some(sender.calls.clone()),
        };
        match self.server.try_send(ToServer { incoming, running }) {
            Ok(()) => Routed::Delivered,
            Err(refused) => {
                let error =
                    "the server is too busy to take more calls; try again shortly".to_string();
                let frame = &refused.into_inner().incoming.frame;
                let reject = crate::rpc::peer::refusal(frame, &to, sender.addr, &error);
                Routed::Refused { error, reject }
            }
        }
    }

    /// Tells the receivers of chunked messages the watch forgot unprocessed to remove them
    /// (the clients keep such chunks for ever otherwise). The call goes out as the manager's,
    /// with no answer asked for; a receiver that is gone needs nothing. A receiver whose queue
    /// is full (or that is on another instance) is told by a task of its own, so that one that
    /// stopped reading holds up nobody else; the message stays charged to its sender and
    /// receiver until its remove is out.
    pub(crate) async fn drop_orphans(self: &Arc<Self>, server_user: &rmpv::Value) {
        let from = format!("*/{}", self.manager_id);
        for orphan in self.chunks.take_orphans() {
            let data = chunks::remove_frame(&from, &orphan.receiver, &orphan.key, server_user);
            let data = match self.try_send_local(&orphan.receiver, data) {
                Ok(()) => {
                    self.chunks.released(&orphan);
                    continue;
                }
                Err(data) => data,
            };
            let Some(slot) = self.chunks.remove_slot().await else {
                return;
            };
            let hub = self.clone();
            tokio::spawn(async move {
                if let Err(e) = hub.send(&orphan.receiver, Outbound::Binary(data)).await {
                    tracing::debug!(error = %e, "a receiver of a forgotten chunked message is gone");
                }
                hub.chunks.released(&orphan);
                drop(slot);
            });
        }
    }

    /// Hands a frame to every client of a workspace connected here.
    pub(crate) async fn broadcast_local(&self, workspace: &str, data: &Bytes) {
        for client in self.clients_in(workspace) {
            let addr = format!("{workspace}/{client}");
            let _ = self.send_local(&addr, Outbound::Binary(data.clone())).await;
        }
    }

    /// Closes every connection whose handle matches, telling each client `reason`; returns
    /// how many were closed.
    pub(crate) fn close_where(
        &self,
        matches: impl Fn(&ClientHandle) -> bool,
        reason: &str,
    ) -> usize {
        let mut closed = 0;
        for entry in self.clients.iter() {
            if !entry.kill.is_cancelled() && matches(entry.value()) {
                entry.close(reason);
                closed += 1;
            }
        }
        closed
    }

    /// Closes the connections of a workspace's clients here, except `except` (a client id);
    /// returns how many were closed.
    pub(crate) fn close_workspace(
        &self,
        workspace: &str,
        except: Option<&str>,
        reason: &str,
    ) -> usize {
        let mut closed = 0;
        for client in self.clients_in(workspace) {
            if except == Some(client.as_str()) {
                continue;
            }
            if let Some(handle) = self.clients.get(&format!("{workspace}/{client}"))
                && !handle.kill.is_cancelled()
            {
                handle.close(reason);
                closed += 1;
            }
        }
        closed
    }

    /// Disconnects every client (server shutdown).
    pub(crate) fn disconnect_all(&self) {
        for entry in self.clients.iter() {
            entry.kill.cancel();
        }
    }
}

/// The server's own RPC peer sends through the hub, to clients here or on other instances.
impl crate::rpc::peer::Outbox for Hub {
    fn send<'a>(
        &'a self,
        to: &'a str,
        frame: Bytes,
    ) -> futures_util::future::BoxFuture<'a, Result<(), crate::rpc::RpcError>> {
        Box::pin(async move {
            Hub::send(self, to, Outbound::Binary(frame))
                .await
                .map_err(|e| crate::rpc::RpcError::Unavailable(e.to_string()))
        })
    }

    fn manager_id(&self) -> &str {
        Hub::manager_id(self)
    }
}

/// The frame that tells a caller at once that its target is gone (`peer_not_found`).
pub(crate) fn peer_not_found(target: &str, to: &str, session: &str, error: &str) -> Bytes {
    let header = crate::rpc::value::obj([
        ("type", PEER_NOT_FOUND.into()),
        ("from", target.into()),
        ("to", to.into()),
        ("session", session.into()),
        ("peer_id", target.into()),
        ("error", error.into()),
    ]);
    crate::rpc::frame::encode(&header, None)
}

pub(crate) use crate::rpc::scan::PEER_NOT_FOUND;

/// Why a message was not handed to a local client.
#[derive(Debug)]
pub(crate) enum Unsent {
    /// No such client here; the message comes back for the bus.
    Elsewhere(Outbound),
    Failed(SendError),
}

/// Client ids of this form name a server's manager and are reserved.
pub(crate) fn is_manager_id(client: &str) -> bool {
    client.starts_with("manager-")
}

/// `*` means the sender's workspace; a bare client id is in the sender's workspace.
pub(crate) fn normalize_target(to: &str, workspace: &str) -> String {
    if to == "*" {
        format!("{workspace}/*")
    } else if to.contains('/') {
        to.to_string()
    } else {
        format!("{workspace}/{to}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(conn_id: u64) -> ClientHandle {
        ClientHandle {
            conn_id,
            tx: mpsc::channel(1).0,
            room: Room::new(1024),
            kill: CancellationToken::new(),
            user: Arc::new(UserInfo::anonymous(60)),
            events: Default::default(),
            reason: Default::default(),
            since_ms: 0,
            reconnected: false,
        }
    }

    #[test]
    fn the_maps_give_room_back_after_a_crowd_leaves() {
        let hub = Hub::new(
            "manager".into(),
            Duration::from_secs(1),
            Arc::new(bus::LocalBus),
            mpsc::channel(1).0,
        );
        let crowd = 10_000u64;
        for i in 0..crowd {
            let ws = format!("ws-{i}");
            hub.insert(&format!("{ws}/c"), &ws, handle(i), false)
                .expect("a free address");
        }
        let grown = hub.clients.capacity();
        assert!(grown >= crowd as usize, "{grown}");
        // All but ten leave.
        for i in 10..crowd {
            let ws = format!("ws-{i}");
            assert!(hub.remove(&format!("{ws}/c"), &ws, i));
        }
        // Down to what the last look before the end saw (at most COMPACT_EVERY more), not
        // to the size of a table that held thousands.
        let left = hub.clients.capacity();
        assert!(left <= 1024, "capacity {grown} before, {left} after");
        assert_eq!(hub.connection_count(), 10);
        assert_eq!(hub.workspace_count(), 10);
        let workspaces = hub.workspaces.capacity();
        assert!(workspaces <= 1024, "{workspaces}");
        // The ten still there are still reachable.
        for i in 0..10 {
            assert!(hub.is_connected(&format!("ws-{i}/c")));
        }
    }

    #[tokio::test]
    async fn a_receiver_that_stopped_reading_holds_up_no_other_remove() {
        use crate::rpc::value::{encode, obj};
        // Slow consumers are given an hour: a remove that waited for one would hang here.
        let hub = Arc::new(Hub::new(
            "manager".into(),
            Duration::from_secs(3600),
            Arc::new(bus::LocalBus),
            mpsc::channel(1).0,
        ));
        let live = |conn_id: u64, room: usize| {
            let (tx, rx) = mpsc::channel(16);
            let handle = ClientHandle {
                tx,
                room: Room::new(room),
                ..handle(conn_id)
            };
            (handle, rx)
        };
        let (stuck, _stuck_queue) = live(1, 1024);
        let stuck_kill = stuck.kill.clone();
        let (alice, mut alice_queue) = live(2, 1 << 20);
        hub.insert("ws/stuck", "ws", stuck, false).unwrap();
        hub.insert("ws/alice", "ws", alice, false).unwrap();
        // The stuck client's queue is full.
        assert!(
            hub.try_send_local("ws/stuck", Bytes::from(vec![0; 1024]))
                .is_ok()
        );
        // Eve starts a chunked message to each, and leaves.
        let cache_call = |to: &str, function: &str, args: Vec<rmpv::Value>| {
            let header = obj([
                ("type", "method".into()),
                ("to", to.into()),
                (
                    "method",
                    format!("services.built-in.message_cache.{function}").into(),
                ),
            ]);
            let mut data = encode(&header);
            data.extend(encode(&obj([("args", rmpv::Value::Array(args))])));
            Frame::parse(Bytes::from(data)).unwrap()
        };
        for to in ["ws/stuck", "ws/alice"] {
            for (function, args) in [
                ("create", vec!["k".into(), false.into()]),
                (
                    "append",
                    vec!["k".into(), rmpv::Value::Binary(vec![1; 10]), false.into()],
                ),
            ] {
                let frame = cache_call(to, function, args);
                hub.chunks
                    .vet("ws/eve", false, to, &frame, |_| false)
                    .unwrap();
            }
        }
        hub.chunks.forget("ws/eve");
        assert_eq!(hub.chunks.messages_of("ws/eve"), 2);
        tokio::time::timeout(Duration::from_secs(10), hub.drop_orphans(&rmpv::Value::Nil))
            .await
            .expect("the removes went out without waiting for the stuck client");
        // Alice is told at once; the stuck client's remove waits in a task of its own, and
        // Eve is charged for that message until it is out (or the client gone).
        let (Outbound::Binary(removal), _) = alice_queue.try_recv().unwrap().into_parts();
        let removal = Frame::parse(removal).unwrap();
        assert_eq!(
            removal.field("method"),
            Some("services.built-in.message_cache.remove")
        );
        assert_eq!(hub.chunks.messages_of("ws/eve"), 1);
        stuck_kill.cancel();
        for _ in 0..500 {
            if hub.chunks.messages_of("ws/eve") == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the stuck client's message was never released");
    }

    #[test]
    fn targets_are_normalised() {
        assert_eq!(normalize_target("*", "ws1"), "ws1/*");
        assert_eq!(normalize_target("c2", "ws1"), "ws1/c2");
        assert_eq!(normalize_target("ws2/c2", "ws1"), "ws2/c2");
        assert_eq!(normalize_target("*/manager-x", "ws1"), "*/manager-x");
    }
}
