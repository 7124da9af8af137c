//! What arrives from the bus: frames for clients connected here, answers to this manager's
//! calls, and other instances' announcements. A frame goes straight into its client's queue
//! when that takes no waiting; otherwise it goes through one of a few ordered lanes, so one
//! client that stops reading holds up only its lane. Frames to one client stay in order: while
//! a lane holds frames, every frame of that lane goes through it.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::AppState;
use crate::auth::UserInfo;
use crate::cluster::bus::{Announcement, Inbound};
use crate::hub::chunks::Restored;
use crate::hub::inflight::{CallFields, InFlight};
use crate::hub::{Outbound, Unsent};
use crate::rpc::frame::Frame;
use crate::rpc::peer::{Decoded, Incoming};

const LANES: usize = 8;
const LANE_QUEUE: usize = 1024;

/// A frame for a lane: its client, and whether the call it belongs to was already noted.
type LaneItem = (String, Bytes, bool);

/// An ordered way to clients that may make the sender wait.
struct Lane {
    tx: mpsc::Sender<LaneItem>,
    /// Frames handed to the lane and not yet in their client's queue.
    waiting: Arc<AtomicUsize>,
}

impl Lane {
    async fn send(&self, item: LaneItem) -> Result<(), mpsc::error::SendError<LaneItem>> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.tx.send(item).await
    }
}

/// Delivers frames from other instances to the clients here: straight into a client's queue
/// when that takes no waiting, else through the client's lane. Shared by the bus's inbound
/// task and the instance links' readers.
pub(crate) struct Deliveries {
    state: Arc<AppState>,
    lanes: Vec<Lane>,
    hasher: std::collections::hash_map::RandomState,
    manager: String,
}

impl Deliveries {
    /// Starts the lanes.
    pub(crate) fn start(state: Arc<AppState>) -> Arc<Self> {
        let lanes: Vec<Lane> = (0..LANES)
            .map(|_| {
                let (tx, rx) = mpsc::channel(LANE_QUEUE);
                let waiting = Arc::new(AtomicUsize::new(0));
                tokio::spawn(lane(state.clone(), rx, waiting.clone()));
                Lane { tx, waiting }
            })
            .collect();
        Arc::new(Self {
            manager: state.peer.manager_addr(),
            state,
            lanes,
            hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    fn lane_of(&self, addr: &str) -> &Lane {
        &self.lanes[(self.hasher.hash_one(addr) as usize) % LANES]
    }

    /// Delivers a frame for `to`: whether its client is here (one that is not, with `held_only`,
    /// is left alone; else its call gets the dead-peer reject), or `None` once the lanes have
    /// stopped.
    async fn frame(&self, to: &str, data: Bytes, held_only: bool) -> Option<bool> {
        let state = &self.state;
        if to == self.manager {
            state.hub.bus_received.inc();
            answer(state, to.to_string(), data);
            return Some(true);
        }
        if held_only && !state.hub.is_connected(to) {
            return Some(false);
        }
        state.hub.bus_received.inc();
        let lane = self.lane_of(to);
        // Nothing of this lane waits before it: straight into the client's queue.
        let item = if lane.waiting.load(Ordering::Acquire) == 0 {
            let Some(data) = observe(state, to, data) else {
                return Some(true);
            };
            match state.hub.try_send_local(to, data) {
                Ok(()) => return Some(true),
                Err(data) => (to.to_string(), data, true),
            }
        } else {
            (to.to_string(), data, false)
        };
        lane.send(item).await.ok().map(|()| true)
    }
}

impl crate::cluster::link::Receiver for Deliveries {
    fn deliver(&self, to: &str, data: Bytes) -> impl Future<Output = Option<bool>> + Send {
        self.frame(to, data, true)
    }
}

/// Handles the bus's deliveries until the bus stops.
pub(crate) async fn run(deliveries: Arc<Deliveries>, mut rx: mpsc::Receiver<Inbound>) {
    let state = deliveries.state.clone();
    while let Some(item) = rx.recv().await {
        match item {
            Inbound::Frame { to, data } => {
                if deliveries.frame(&to, data, false).await.is_none() {
                    return;
                }
            }
            Inbound::Announced(Announcement::Broadcast { workspace, data }) => {
                for client in state.hub.clients_in(&workspace) {
                    let addr = format!("{workspace}/{client}");
                    if deliveries
                        .lane_of(&addr)
                        .send((addr, data.clone(), false))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Inbound::Announced(Announcement::Event {
                workspace,
                event,
                data,
            }) => {
                if event == "client_disconnected"
                    && let Some(client) = crate::rpc::value::get_str(&data, "id")
                {
                    state.peer.peer_gone(&format!("{workspace}/{client}"));
                }
                let state = state.clone();
                tokio::spawn(async move {
                    crate::workspace::emit_local(&state, &workspace, &event, data).await;
                });
            }
            Inbound::Announced(Announcement::Revoked { id, expires_at }) => {
                state.revoke_locally(id, expires_at)
            }
            Inbound::Announced(Announcement::Kick { addr, keep }) => {
                if keep != state.server_id
                    && let Some(handle) = state.hub.get(&addr)
                {
                    tracing::info!(client = %addr, instance = %keep, "the client came back through another instance");
                    handle.close("this client connected again through another server instance");
                }
            }
            Inbound::Reconnected => {
                let state = state.clone();
                tokio::spawn(async move {
                    crate::workspace::resync(&state).await;
                    // Revocations announced while the bus was away are in the store.
                    crate::reload_revocations(&state).await;
                });
            }
        }
    }
}

/// Notes the call a frame for `to` opens, answers or keeps alive; `None`: it is not delivered.
fn observe(state: &AppState, to: &str, data: Bytes) -> Option<Bytes> {
    // The answer to a chunked message's `process` (vetted here, where its sender is) names
    // the session this server chose: the sender is told its own, and what the receiver holds
    // is settled.
    let data = restore(state, to, data)?;
    if note_call(&state.hub.inflight, to, &data) {
        return Some(as_own_managers(state, data));
    }
    Some(data)
}

/// A call from another instance's manager (an HTTP service call, an app, a chunked send) as
/// this instance's manager's: a client lets only the manager it connected to call its
/// protected services. Only instances write `*/...` senders (a client's `from` is always its
/// own address), and the answer still goes to the calling manager: the call's callbacks name
/// it in the body.
fn as_own_managers(state: &AppState, data: Bytes) -> Bytes {
    let own = state.peer.manager_addr();
    let Ok(frame) = Frame::parse_trusted(data.clone()) else {
        return data;
    };
    match frame.field("from") {
        Some(from) if from != own => frame.renamed(&["from"], from, &own).to_bytes(),
        _ => data,
    }
}

/// The frame for `to` as its client is to see it, as to the sessions this server chose for
/// `process` calls (see [`crate::hub::chunks::ChunkWatch::restore`]).
fn restore(state: &AppState, to: &str, data: Bytes) -> Option<Bytes> {
    let chunks = &state.hub.chunks;
    if !chunks.names_sessions() {
        return Some(data);
    }
    // The server writes `from` after the sender's own entries (a notice: before its
    // `session`), so the sender's `user` after them need not be walked.
    let [from, method, parent, session, _] = crate::rpc::frame::trusted_fields(
        &data,
        ["from", "method", "parent", "session", "type"],
        |[from, _, _, session, kind]| {
            from.is_some()
                && kind.is_some()
                && (*kind != Some(Some(crate::hub::PEER_NOT_FOUND)) || session.is_some())
        },
    );
    let Some(from) = from else {
        return Some(data);
    };
    if !chunks.may_name_server_session([method, parent, session]) {
        return Some(data);
    }
    let Ok(frame) = Frame::parse_trusted(data.clone()) else {
        return Some(data);
    };
    match chunks.restore(from, to, &frame) {
        Restored::Unchanged => Some(data),
        Restored::Renamed(renamed) => Some(renamed.to_bytes()),
        Restored::Misdirected => {
            tracing::debug!("a frame naming another call's session was not delivered");
            None
        }
    }
}

/// What a frame from another instance for `to` does to the calls tracked here; true for a
/// frame from a manager (`*/...`).
fn note_call(inflight: &InFlight, to: &str, data: &[u8]) -> bool {
    // The header was written by the instance that published it: only the call's fields are
    // read, not the whole header.
    let fields = CallFields::of_trusted(data);
    // The instance of a target that left tells its caller: the caller's call ends here, where
    // it was counted when it was sent (only the server sends such notices).
    if fields.kind == Some(crate::hub::PEER_NOT_FOUND) {
        if let Some(session) = fields.session {
            inflight.abandoned(to, session);
        }
        return false;
    }
    let Some(from) = fields.from else {
        return false;
    };
    inflight.observe_arrived(from, to, fields.method, fields.session);
    // The `process` of a chunked answer names the call it answers (its key is that call's
    // session), and the sender's instance, which saw the assembled message, tagged its
    // session: the call ends here too.
    if fields.method == Some(crate::hub::chunks::PROCESS)
        && let Some(rejects) = fields
            .session
            .and_then(crate::hub::chunks::chunked_answer_in)
        && let Some(key) = process_key(data)
    {
        inflight.answer(to, key, from, rejects);
    }
    from.starts_with("*/")
}

/// The message key a `process` call names, read from a frame another instance wrote.
fn process_key(data: &[u8]) -> Option<&str> {
    let header = crate::rpc::scan::object(data, crate::rpc::scan::Limits::WALK).ok()?;
    crate::hub::chunks::message_key(data.get(header.len..)?)
}

/// Delivers frames to the clients of one lane, in order, waiting for room where needed.
async fn lane(state: Arc<AppState>, mut rx: mpsc::Receiver<LaneItem>, waiting: Arc<AtomicUsize>) {
    while let Some((to, data, observed)) = rx.recv().await {
        let data = if observed {
            Some(data)
        } else {
            observe(&state, &to, data)
        };
        let Some(data) = data else {
            waiting.fetch_sub(1, Ordering::AcqRel);
            continue;
        };
        if let Err(Unsent::Elsewhere(Outbound::Binary(data))) =
            state.hub.send_local(&to, Outbound::Binary(data)).await
        {
            peer_left(&state, &to, data).await;
        }
        waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A frame came for a client that has just left: a call gets the dead-peer reject.
async fn peer_left(state: &AppState, to: &str, data: Bytes) {
    let Some((session, from)) = awaited_call(&data) else {
        return;
    };
    // Noted when it arrived; the caller's instance counts how it ended.
    state.hub.inflight.forget(from, session);
    let header = crate::hub::peer_not_found(
        to,
        from,
        session,
        &format!("Target peer {to} is not connected"),
    );
    let _ = state.hub.send(from, Outbound::Binary(header)).await;
}

/// The call whose caller waits for an answer to this frame: (session, caller). `None` for a
/// frame without a session and for a `peer_not_found` notice: answering a notice would bounce
/// notices between two clients that both just left, for as long as both are subscribed.
fn awaited_call(data: &[u8]) -> Option<(&str, &str)> {
    // Walked, not parsed: the header another instance wrote (with the sender's `user`) may be
    // larger than what a client's header may be, and its caller would then wait out its call.
    let [session, from, kind] =
        crate::rpc::frame::trusted_fields(data, ["session", "from", "type"], |found| {
            found.iter().all(Option::is_some)
        });
    match (session, from, kind) {
        (_, _, Some(crate::hub::PEER_NOT_FOUND)) => None,
        (Some(session), Some(from), _) => Some((session, from)),
        _ => None,
    }
}

/// An answer to one of this manager's calls, sent by a client on another instance. Only
/// answers are taken: a call through the bus would carry no user the server checked.
fn answer(state: &AppState, to: String, data: Bytes) {
    // The other instance wrote this header with the sender's `user`: a client's header
    // limits could refuse it, and the manager's call would wait out its time.
    let Ok(frame) = Frame::parse_trusted(data) else {
        return;
    };
    let (Some(from), Some(ws)) = (frame.field("from"), frame.field("ws")) else {
        return;
    };
    let incoming = Incoming {
        from: from.to_string(),
        ws: ws.to_string(),
        user: Arc::new(UserInfo::server()),
        to,
        frame,
        peer_ip: None,
        slots: None,
    };
    match state.peer.decode(incoming) {
        Ok(Decoded::Reply) => {}
        Ok(_) | Err(_) => {
            tracing::debug!("a frame for this manager through the bus was not an answer")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_for_a_client_that_left_is_answered_and_a_notice_is_not() {
        let call = crate::rpc::frame::encode(
            &crate::rpc::value::obj([
                ("type", "method".into()),
                ("from", "ws1/caller".into()),
                ("to", "ws1/gone".into()),
                ("session", "s1".into()),
            ]),
            None,
        );
        assert_eq!(awaited_call(&call), Some(("s1", "ws1/caller")));
        let notice =
            crate::hub::peer_not_found("ws1/gone", "ws1/caller", "s1", "Target peer is gone");
        assert_eq!(awaited_call(&notice), None);
        let no_session = crate::rpc::frame::encode(
            &crate::rpc::value::obj([("type", "method".into()), ("from", "ws1/caller".into())]),
            None,
        );
        assert_eq!(awaited_call(&no_session), None);
    }

    #[test]
    fn a_call_from_a_manager_is_noted_under_its_own_address() {
        let inflight = InFlight::default();
        let call = |from: &str| {
            crate::rpc::frame::encode(
                &crate::rpc::value::obj([
                    ("type", "method".into()),
                    ("from", from.into()),
                    ("to", "ws1/callee".into()),
                    ("method", "services.lab.f".into()),
                    ("session", "s1".into()),
                ]),
                None,
            )
        };
        assert!(note_call(&inflight, "ws1/callee", &call("*/manager-a")));
        assert!(!note_call(&inflight, "ws1/callee", &call("ws1/caller")));
        assert_eq!(inflight.pending(|_| true), 2);
        // The answer goes to the calling manager (its callbacks name it), which ends the call
        // noted under that manager's address.
        inflight.observe_fields("ws1/callee", "*/manager-a", Some("s1.resolve"), None);
        assert_eq!(inflight.pending(|_| true), 1);
        // Not counted here, where it arrived (a call between clients is counted by its
        // caller's instance; a manager's, as on its own instance, by none).
        assert_eq!(inflight.ended("resolved"), 0);
    }

    #[test]
    fn the_process_of_a_chunked_answer_ends_the_call_it_answers() {
        let inflight = InFlight::default();
        inflight.opened("ws1/caller", "ws1/callee", "s1");
        inflight.opened("ws1/caller", "ws1/callee", "s2");
        let process = |from: &str, session: &str, key: &str| {
            crate::rpc::frame::encode(
                &crate::rpc::value::obj([
                    ("type", "method".into()),
                    ("from", from.into()),
                    ("to", "ws1/caller".into()),
                    ("method", crate::hub::chunks::PROCESS.into()),
                    ("session", session.into()),
                ]),
                Some(&crate::rpc::value::obj([(
                    "args",
                    rmpv::Value::Array(vec![key.into(), "ctx".into()]),
                )])),
            )
        };
        // Only a process its sender's instance tagged as an answer (a large callback call
        // under the caller's session is not one), and only the callee's, ends the call.
        let arrives = |from: &str, session: &str, key: &str| {
            note_call(&inflight, "ws1/caller", &process(from, session, key))
        };
        arrives("ws1/callee", "~abc", "s1");
        arrives("ws1/other", "~Rabc", "s1");
        assert!(inflight.awaits_answer("ws1/caller", "s1", "ws1/callee"));
        arrives("ws1/callee", "~Rabd", "s1");
        assert!(!inflight.awaits_answer("ws1/caller", "s1", "ws1/callee"));
        assert_eq!(inflight.ended("resolved"), 1);
        arrives("ws1/callee", "~Jabe", "s2");
        assert!(!inflight.awaits_answer("ws1/caller", "s2", "ws1/callee"));
        assert_eq!(inflight.ended("rejected"), 1);
        assert_eq!(
            process_key(&process("ws1/callee", "~Rabd", "s1")),
            Some("s1")
        );
        assert_eq!(process_key(b"\x81\xa4type"), None);
    }

    #[test]
    fn a_notice_from_the_targets_instance_ends_the_call_here() {
        let inflight = InFlight::default();
        inflight.opened("ws1/caller", "ws1/gone", "s1");
        assert_eq!(inflight.pending(|_| true), 1);
        let notice =
            crate::hub::peer_not_found("ws1/gone", "ws1/caller", "s1", "Target peer is gone");
        note_call(&inflight, "ws1/caller", &notice);
        assert_eq!(inflight.pending(|_| true), 0);
        assert_eq!(inflight.ended("peer_gone"), 1);
    }
}
