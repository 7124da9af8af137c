//! Calls in flight between clients, as the router sees them: a frame with a `session` opens a
//! call, a `<session>.resolve` or `.reject` back to its caller closes it, a `.heartbeat` keeps
//! it alive. A graceful shutdown waits for them; `/metrics` counts how they ended.

use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::latency::Latency;
use crate::rpc::frame::Frame;

/// A call seen without news for this long no longer counts (its caller timed out or left).
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most calls of one caller tracked at once.
const MAX_OPEN_PER_CALLER: u32 = 10_000;
/// A call this old whose caller and callee have both left this instance is forgotten at the
/// next prune (younger ones are kept: their caller may have connected as the prune began).
const GONE_AFTER: Duration = Duration::from_secs(10);

struct Open {
    /// Keyed hashes of the caller's and the callee's addresses (see [`InFlight::party`]).
    caller: u64,
    callee: u64,
    touched: Instant,
    /// When it was sent, for the latency of its answer; `None` for a call that came from
    /// another instance: how it ends is counted there, by the caller's instance (so a call
    /// between clients of two instances counts once; a manager's call, as on its own
    /// instance, counts nowhere).
    opened: Option<Instant>,
}

/// How a call ended, the label of the calls counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// What the router knows of calls in flight.
pub struct InFlight {
    /// Hash of (caller address, session) -> the call; hashed so that looking a call up or
    /// noting one allocates nothing. The hashes are keyed with a secret of this process and
    /// never leave it, so no client can feasibly make its address or session collide with
    /// another's (an accidental collision, about one in 10^8 with a million calls open,
    /// blurs a count).
    calls: DashMap<u64, Open, BuildHasherDefault<PreHashed>>,
    /// Calls open per caller (by its address's hash), to bound what one caller can make the
    /// server remember.
    per_caller: DashMap<u64, u32, BuildHasherDefault<PreHashed>>,
    keys: std::hash::RandomState,
    /// Calls to the server's own services running now.
    server_calls: AtomicUsize,
    /// Calls between clients by how they ended: `resolved`, `rejected` or `peer_gone`
    /// (refused at once because their target was gone).
    pub ended: Family<Outcome, Counter>,
    /// Calls to the server's own services by outcome: `ok` or `error`.
    pub server: Family<Outcome, Counter>,
    /// Seconds from a call to its answer, for calls routed between clients.
    pub latency: CallLatency,
    /// The counters of `ended` and `server`, taken once so counting takes no lock.
    counters: Counters,
}

struct Counters {
    resolved: Counter,
    rejected: Counter,
    peer_gone: Counter,
    server_ok: Counter,
    server_error: Counter,
}

impl Default for InFlight {
    /// Every outcome's counter exists from the start, so each shows (at 0) before its first call.
    fn default() -> Self {
        let ended = Family::<Outcome, Counter>::default();
        let server = Family::<Outcome, Counter>::default();
        let of = |family: &Family<Outcome, Counter>, outcome| {
            family.get_or_create(&Outcome { outcome }).clone()
        };
        let counters = Counters {
            resolved: of(&ended, "resolved"),
            rejected: of(&ended, "rejected"),
            peer_gone: of(&ended, "peer_gone"),
            server_ok: of(&server, "ok"),
            server_error: of(&server, "error"),
        };
        Self {
            calls: DashMap::with_hasher(Default::default()),
            per_caller: DashMap::with_hasher(Default::default()),
            keys: Default::default(),
            server_calls: AtomicUsize::new(0),
            ended,
            server,
            latency: CallLatency::default(),
            counters,
        }
    }
}

/// Hashes a key that is already a keyed hash (of caller and session) to itself: hashing it a
/// second time would cost a SipHash per lookup and protect nothing more.
#[derive(Default)]
struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A histogram of call latencies, from 20 µs to about 20 s.
#[derive(Clone, Debug)]
pub struct CallLatency(pub Latency);

impl Default for CallLatency {
    fn default() -> Self {
        CallLatency(Latency::exponential(20e-6, 2.0, 21))
    }
}

/// What a frame's `method` says about a call.
enum Step<'a> {
    Opens(&'a str),
    Answers(&'a str),
    KeepsAlive(&'a str),
    Other,
}

/// What a frame with this `method` and `session` does to a call.
fn step<'a>(method: Option<&'a str>, session: Option<&'a str>) -> Step<'a> {
    match answered(method) {
        Some(answer) => answer,
        None => match session {
            Some(session) if !session.is_empty() => Step::Opens(session),
            _ => Step::Other,
        },
    }
}

/// The call a `method` answers or keeps alive (`<session>.resolve`, `.reject`, `.heartbeat`).
fn answered(method: Option<&str>) -> Option<Step<'_>> {
    match method?.rsplit_once('.') {
        Some((session, "resolve" | "reject")) if !session.is_empty() => {
            Some(Step::Answers(session))
        }
        Some((session, "heartbeat")) if !session.is_empty() => Some(Step::KeepsAlive(session)),
        _ => None,
    }
}

/// Whether a frame answers a call (`<session>.resolve`, `.reject` or `.heartbeat`).
pub(crate) fn is_answer(frame: &Frame) -> bool {
    answered(frame.field("method")).is_some()
}

/// The fields of a header that say what it does to a call: `from`, `method`, `session`, and
/// its `type` (a `peer_not_found` notice ends its call).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(crate) struct CallFields<'a> {
    pub from: Option<&'a str>,
    pub method: Option<&'a str>,
    pub session: Option<&'a str>,
    pub kind: Option<&'a str>,
}

impl<'a> CallFields<'a> {
    /// Read from a header this server wrote, walking its entries only until these are known
    /// (an answer needs no `session`), so the sender's `user` after them is never looked at.
    pub(crate) fn of_trusted(header: &'a [u8]) -> Self {
        // As with `Frame::field`, the first entry of a key counts.
        // A routed header has its sender's `type` before the server's `from`: requiring it
        // costs no longer walk.
        let [from, method, session, kind] = crate::rpc::frame::trusted_fields(
            header,
            ["from", "method", "session", "type"],
            |[from, method, session, kind]| {
                from.is_some()
                    && method.is_some()
                    && kind.is_some()
                    && (session.is_some() || answered(method.flatten()).is_some())
            },
        );
        Self {
            from,
            method,
            session,
            kind,
        }
    }
}

impl InFlight {
    /// The keyed hash that stands for an address here.
    pub(crate) fn party(&self, addr: &str) -> u64 {
        use std::hash::BuildHasher;
        self.keys.hash_one(addr)
    }

    /// The key of `caller`'s (by [`Self::party`]) call `session`.
    fn key(&self, caller: u64, session: &str) -> u64 {
        use std::hash::BuildHasher;
        self.keys.hash_one((caller, session))
    }

    /// Notes a frame routed from `from` to `to`.
    pub(crate) fn observe(&self, from: &str, to: &str, frame: &Frame) {
        self.observe_fields(from, to, frame.field("method"), frame.field("session"));
    }

    /// Notes a frame routed from `from` to `to` by the fields that matter for calls.
    pub(crate) fn observe_fields(
        &self,
        from: &str,
        to: &str,
        method: Option<&str>,
        session: Option<&str>,
    ) {
        self.step(from, to, method, session, true);
    }

    /// Notes a frame that came from another instance, from `from` for `to`, a client here: a
    /// call it opens is tracked (a graceful stop waits for its answer) but not counted here
    /// when it ends: the caller's instance counts it.
    pub(crate) fn observe_arrived(
        &self,
        from: &str,
        to: &str,
        method: Option<&str>,
        session: Option<&str>,
    ) {
        self.step(from, to, method, session, false);
    }

    fn step(
        &self,
        from: &str,
        to: &str,
        method: Option<&str>,
        session: Option<&str>,
        counts: bool,
    ) {
        match step(method, session) {
            Step::Opens(session) => self.open(from, to, session, counts),
            // Only the callee ends or keeps alive a call: anyone else who learnt its session
            // could otherwise make it vanish here, or hold up a graceful stop.
            Step::Answers(session) => {
                let rejects = method.is_some_and(|m| m.ends_with(".reject"));
                self.answer(to, session, from, rejects);
            }
            Step::KeepsAlive(session) => {
                let callee = self.party(from);
                if let Some(mut open) = self.calls.get_mut(&self.key(self.party(to), session))
                    && open.callee == callee
                {
                    open.touched = Instant::now();
                }
            }
            Step::Other => {}
        }
    }

    /// Notes the call `session` from `from` to `to` (also one the router saw only in pieces:
    /// a chunked call, whose session the assembled header names).
    pub(crate) fn opened(&self, from: &str, to: &str, session: &str) {
        self.open(from, to, session, true);
    }

    /// Notes a call; `counts`: this instance counts how it ends (its caller is here).
    fn open(&self, from: &str, to: &str, session: &str, counts: bool) {
        let caller = self.party(from);
        // A caller that opens calls it never lets end is tracked up to a bound.
        {
            let mut open = self.per_caller.entry(caller).or_insert(0);
            if *open >= MAX_OPEN_PER_CALLER {
                return;
            }
            *open += 1;
        }
        let now = Instant::now();
        let replaced = self.calls.insert(
            self.key(caller, session),
            Open {
                caller,
                callee: self.party(to),
                touched: now,
                opened: counts.then_some(now),
            },
        );
        if let Some(replaced) = replaced {
            self.closed(replaced.caller);
        }
    }

    /// `callee` answered `caller`'s call `session` (in one frame, or in chunks whose `process`
    /// passed): it ends, counted by how. Only the callee ends a call: anyone else who learnt
    /// its session could otherwise make it vanish here.
    pub(crate) fn answer(&self, caller: &str, session: &str, callee: &str, rejects: bool) {
        let callee = self.party(callee);
        let Some((_, open)) = self
            .calls
            .remove_if(&self.key(self.party(caller), session), |_, open| {
                open.callee == callee
            })
        else {
            return;
        };
        self.closed(open.caller);
        let Some(opened) = open.opened else {
            return;
        };
        self.latency.0.observe(opened.elapsed());
        let counter = if rejects {
            &self.counters.rejected
        } else {
            &self.counters.resolved
        };
        counter.inc();
    }

    /// Whether `callee` was sent `caller`'s call `session` and has not answered it yet (what
    /// lets it answer in chunks under that session's key).
    pub(crate) fn awaits_answer(&self, caller: &str, session: &str, callee: &str) -> bool {
        let (caller, callee) = (self.party(caller), self.party(callee));
        self.calls
            .get(&self.key(caller, session))
            .is_some_and(|open| open.caller == caller && open.callee == callee)
    }

    /// A call that will get no answer (its target was gone), counted as such.
    pub(crate) fn abandoned(&self, caller: &str, session: &str) {
        self.forget(caller, session);
        self.counters.peer_gone.inc();
    }

    /// Stops tracking a call without counting how it ended (the instance of its caller counts
    /// it).
    pub(crate) fn forget(&self, caller: &str, session: &str) {
        if let Some((_, open)) = self.calls.remove(&self.key(self.party(caller), session)) {
            self.closed(open.caller);
        }
    }

    /// Calls between clients that ended with `outcome`.
    #[cfg(test)]
    pub(crate) fn ended(&self, outcome: &'static str) -> u64 {
        self.ended.get_or_create(&Outcome { outcome }).get()
    }

    /// One call of `caller` (by [`Self::party`]) no longer counts.
    fn closed(&self, caller: u64) {
        let none_left = match self.per_caller.get_mut(&caller) {
            Some(mut open) => {
                *open = open.saturating_sub(1);
                *open == 0
            }
            None => false,
        };
        // Looked up again only when it may go (another call may have opened meanwhile).
        if none_left {
            self.per_caller.remove_if(&caller, |_, open| *open == 0);
        }
    }

    /// Counts a call to the server's own services until the guard drops.
    pub(crate) fn server_call(&self) -> ServerCall<'_> {
        self.server_calls.fetch_add(1, Ordering::Relaxed);
        ServerCall(self)
    }

    /// Calls that still need this instance: one end is connected here (`is_here`, asked of
    /// an address's [`Self::party`]), and there was news of it lately. Forgets the others.
    pub(crate) fn pending(&self, is_here: impl Fn(u64) -> bool) -> usize {
        self.retain(|open| {
            open.touched.elapsed() < FORGET_AFTER && (is_here(open.caller) || is_here(open.callee))
        });
        self.calls.len() + self.server_calls.load(Ordering::Relaxed)
    }

    /// Drops calls without news for a long time, and those neither of whose ends is here
    /// any more (`is_here`, asked of an address's [`Self::party`]): nobody is left to answer
    /// them or to be answered, and a client that opened thousands of calls and left (again
    /// and again, under new ids) would otherwise leave them for [`FORGET_AFTER`]. Run now and
    /// then.
    pub(crate) fn prune(&self, is_here: impl Fn(u64) -> bool) {
        self.retain(|open| {
            let age = open.touched.elapsed();
            age < FORGET_AFTER && (age < GONE_AFTER || is_here(open.caller) || is_here(open.callee))
        });
    }

    /// Calls tracked now.
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.calls.len()
    }

    fn retain(&self, keep: impl Fn(&Open) -> bool) {
        let mut dropped = Vec::new();
        self.calls.retain(|_, open| {
            let kept = keep(open);
            if !kept {
                dropped.push(open.caller);
            }
            kept
        });
        for caller in dropped {
            self.closed(caller);
        }
    }
}

/// A running call to the server's own services.
pub(crate) struct ServerCall<'a>(&'a InFlight);

impl ServerCall<'_> {
    /// Records how the call ended.
    pub(crate) fn finished(&self, ok: bool) {
        let counters = &self.0.counters;
        if ok {
            counters.server_ok.inc();
        } else {
            counters.server_error.inc();
        }
    }
}

impl Drop for ServerCall<'_> {
    fn drop(&mut self) {
        self.0.server_calls.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fields: &[(&str, &str)]) -> Frame {
        let header = rmpv::Value::Map(
            fields
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        );
        Frame::parse(crate::rpc::frame::encode(&header, None)).unwrap()
    }

    #[test]
    fn call_fields_of_a_trusted_header_match_the_parsed_frame() {
        let encoded = |fields: &[(&str, &str)]| {
            let header = rmpv::Value::Map(
                fields
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            );
            crate::rpc::frame::encode(&header, None)
        };
        let cases: [&[(&str, &str)]; 5] = [
            &[
                ("type", "method"),
                ("method", "services.x.f"),
                ("session", "s1"),
                ("from", "ws/a"),
                ("user", "u"),
            ],
            &[
                ("method", "s1.resolve"),
                ("to", "ws/a"),
                ("from", "ws/b"),
                ("user", "u"),
            ],
            &[
                ("from", "ws/a"),
                ("from", "ws/z"),
                ("session", "s2"),
                ("method", "m"),
                ("session", "s3"),
            ],
            &[("type", "log"), ("to", "ws/b")],
            &[
                ("type", "peer_not_found"),
                ("from", "ws/b"),
                ("to", "ws/a"),
                ("session", "s1"),
            ],
        ];
        for case in cases {
            let data = encoded(case);
            let parsed = Frame::parse(data.clone()).unwrap();
            let expected = CallFields {
                from: parsed.field("from"),
                method: parsed.field("method"),
                session: parsed.field("session"),
                kind: parsed.field("type"),
            };
            assert_eq!(CallFields::of_trusted(&data), expected, "{case:?}");
        }
        assert_eq!(CallFields::of_trusted(b"\xc1"), CallFields::default());
    }

    /// A prune forgets the calls whose caller and callee have both gone (once they are a few
    /// seconds old), keeps the others, and gives the callers' allowance back.
    #[test]
    fn calls_whose_ends_are_gone_are_pruned() {
        let calls = InFlight::default();
        for n in 0..5 {
            let session = format!("s{n}");
            calls.observe(
                "ws/left",
                "ws/left",
                &frame(&[("method", "services.x.f"), ("session", &session)]),
            );
        }
        calls.observe(
            "ws/stays",
            "ws/left",
            &frame(&[("method", "services.x.f"), ("session", "kept")]),
        );
        let stays = calls.party("ws/stays");
        let here = |party: u64| party == stays;
        calls.prune(here);
        assert_eq!(calls.tracked(), 6, "young calls are kept");
        for mut open in calls.calls.iter_mut() {
            open.touched -= GONE_AFTER;
        }
        calls.prune(here);
        assert_eq!(calls.tracked(), 1);
        assert!(calls.per_caller.get(&calls.party("ws/left")).is_none());
        assert!(calls.awaits_answer("ws/stays", "kept", "ws/left"));
    }

    #[test]
    fn a_call_is_open_until_its_answer() {
        let calls = InFlight::default();
        let here = |_: u64| true;
        calls.observe(
            "ws/a",
            "ws/b",
            &frame(&[("method", "services.x.f"), ("session", "s1.c")]),
        );
        calls.observe("ws/a", "ws/b", &frame(&[("method", "services.x.g")]));
        assert_eq!(calls.pending(here), 1);
        calls.observe("ws/b", "ws/a", &frame(&[("method", "s1.c.heartbeat")]));
        assert_eq!(calls.pending(here), 1);
        // Only the callee answers: another client that learnt the session ends nothing.
        calls.observe("ws/m", "ws/a", &frame(&[("method", "s1.c.resolve")]));
        assert_eq!(calls.pending(here), 1);
        assert_eq!(calls.ended("resolved"), 0);
        calls.observe("ws/b", "ws/a", &frame(&[("method", "s1.c.resolve")]));
        assert_eq!(calls.pending(here), 0);
        assert_eq!(calls.ended("resolved"), 1);
        calls.observe(
            "ws/a",
            "ws/b",
            &frame(&[("method", "services.x.f"), ("session", "s2")]),
        );
        assert_eq!(calls.pending(|party| party == calls.party("ws/b")), 1);
        assert_eq!(
            calls.pending(|party| party == calls.party("elsewhere")),
            0,
            "neither end is here"
        );
        // A call from another instance's client is tracked until its answer, but its
        // caller's instance counts it.
        calls.observe_arrived("ws/far", "ws/b", Some("services.x.f"), Some("s3"));
        assert_eq!(calls.pending(here), 1);
        calls.observe("ws/b", "ws/far", &frame(&[("method", "s3.reject")]));
        assert_eq!(calls.pending(here), 0);
        assert_eq!(calls.ended("rejected"), 0, "counted where its caller is");
        calls.observe(
            "ws/a",
            "ws/b",
            &frame(&[("method", "services.x.f"), ("session", "s4")]),
        );
        calls.observe("ws/b", "ws/a", &frame(&[("method", "s4.reject")]));
        assert_eq!(calls.ended("rejected"), 1);
        assert_eq!(calls.pending(here), 0);
        let guard = calls.server_call();
        assert_eq!(calls.pending(here), 1);
        drop(guard);
        assert_eq!(calls.pending(here), 0);
    }
}
