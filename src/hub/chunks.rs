//! Chunked messages between clients (`services.built-in.message_cache.*` calls). A receiving
//! client reassembles the chunks and merges the message's body over the trusted context of the
//! `process` call, so a body naming another sender (`from`, `user`, `ctx`...) would pass for
//! that sender. The server relays every chunk: it reads them as they pass, without keeping
//! them, and refuses the `process` of a message whose assembled body it cannot vouch for.
//!
//! The receiving client keys its cache by the message key alone, so chunks of two senders
//! under one key would mix. The server therefore gives each sender a namespace of its own: a
//! key is delivered with a suffix derived from the sender's address. The one exception is a
//! chunked answer (`heartbeat` true), whose key is the receiver's own call session: only the
//! callee of that call may send it, and only one sender may use a key at a time.
//!
//! The receiving client keeps a message's chunks until its `process` or `remove`, for ever
//! otherwise, and across a reconnect. So a message the server starts watching starts empty at
//! its receiver (its `create` goes out with overwrite on); the bytes a sender may have in
//! flight are bounded (lower for anonymous senders), and so are those one receiver holds; and
//! when the server forgets a message that was not processed (its sender left, it went idle,
//! its `process` was refused, or its receiver rejected the `process`: it then keeps the
//! chunks) the receiver is told to remove it ([`ChunkWatch::take_orphans`]), the bytes staying
//! charged until it has been. A processed message stays charged until its receiver answers,
//! and the `process` goes out under a session of the server's choosing, so that only that
//! answer settles it ([`ChunkWatch::restore`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::rpc::frame::Frame;
use crate::rpc::rules::SERVER_SESSION_MARK;
// What a chunk held ahead of its turn costs besides its bytes: as a chunk in the server's own
// cache does.
use crate::rpc::cache::CHUNK_COST as EARLY_CHUNK_COST;
use crate::rpc::scan::{self, Limits, Scanner};

/// Messages one sender may have in flight to all its targets.
const MAX_MESSAGES_PER_SENDER: usize = 64;
/// Chunks that arrived ahead of their turn, held per sender until the gap fills.
const MAX_EARLY_BYTES_PER_SENDER: usize = 16 * 1024 * 1024;
/// Chunks of one message held ahead of their turn at most.
const MAX_EARLY_CHUNKS: usize = 4096;
/// Bytes of unprocessed chunks one sender may have delivered to all its targets: what its
/// receivers hold for it.
pub const MAX_BYTES_PER_SENDER: u64 = 1 << 30;
/// The same for an anonymous sender (the clients' own tests send a 64 MiB array, and get it
/// back, as anonymous users).
pub const MAX_BYTES_PER_ANONYMOUS_SENDER: u64 = 256 << 20;
/// Bytes of unprocessed chunks one receiver may hold from all its senders.
pub const MAX_BYTES_PER_RECEIVER: u64 = 2 << 30;
/// Forgotten messages whose receivers have not been told yet; past this (a burst of many
/// thousand senders leaving at once) the receivers keep them.
const MAX_ORPHANS: usize = 1 << 16;
/// Removes sent at once to receivers that cannot take them right away.
const MAX_REMOVES_IN_FLIGHT: usize = 256;
/// A message not touched for this long is forgotten (its `process` is then refused).
const IDLE_LIMIT: Duration = Duration::from_secs(600);
/// A `process` not answered in this long is taken as failed (the receiver answers at once).
const ANSWER_LIMIT: Duration = Duration::from_secs(60);
/// `process` answers one receiver may owe at once: each is kept for up to [`ANSWER_LIMIT`],
/// and a receiver that answers (any unmodified client) owes them for a moment only.
pub const MAX_AWAITED_PER_RECEIVER: usize = 1024;
/// The same, to one sender: no sender can take up a receiver's whole allowance.
pub const MAX_AWAITED_PER_PAIR: usize = 64;
/// Settled server sessions remembered (for [`ANSWER_LIMIT`] at most) so that a late frame
/// naming one still reaches the sender under its own session, and nobody else.
const MAX_SETTLED: usize = 4096;
/// The header fields that may name a `process` call's session in its receiver's frames to the
/// sender: the answer's `method` (`<session>.resolve`), its `parent`, a notice's `session`.
const SESSION_FIELDS: [&str; 3] = ["method", "parent", "session"];
/// The method that fires a chunked message at its receiver.
pub(crate) const PROCESS: &str = "services.built-in.message_cache.process";
const MAX_KEY_LEN: usize = 256;
/// The main message (the routing header) of a chunked message is kept up to this size, to
/// read the session its receiver may answer under.
const MAX_MAIN: usize = 64 * 1024;

/// (target, key as delivered).
type Key = (String, String);

struct Watched {
    /// Who sends it: nobody else may add to it.
    sender: String,
    /// Whether its key is delivered with the sender's suffix.
    namespaced: bool,
    scanner: Scanner,
    /// Chunks received, whatever their index (what `append` numbers the next one).
    received: u64,
    /// The next index the scanner waits for.
    next: u64,
    early: BTreeMap<u64, Bytes>,
    /// What `early` costs: its bytes and [`EARLY_CHUNK_COST`] per chunk.
    early_held: usize,
    touched: Instant,
    /// Set when the message can no longer be vouched for; its `process` is refused.
    poisoned: Option<ChunkRefusal>,
    /// The bytes of the main message, while it fits in [`MAX_MAIN`].
    main: Option<Vec<u8>>,
    /// Chunk bytes delivered (what the receiver holds of it).
    bytes: u64,
}

impl Watched {
    fn new(sender: &str, namespaced: bool) -> Self {
        Self {
            sender: sender.to_string(),
            namespaced,
            scanner: Scanner::for_chunked(Limits::WALK, Some(1)),
            received: 0,
            next: 0,
            early: BTreeMap::new(),
            early_held: 0,
            touched: Instant::now(),
            poisoned: None,
            main: Some(Vec::new()),
            bytes: 0,
        }
    }

    /// What the chunks held ahead of their turn cost (bytes and entries), kept as they come
    /// and go rather than summed.
    fn early_bytes(&self) -> usize {
        self.early_held
    }

    /// Drops the chunks held ahead of their turn.
    fn drop_early(&mut self) {
        self.early.clear();
        self.early_held = 0;
    }

    /// Takes chunk `index`; scans it now if its turn has come.
    fn chunk(&mut self, index: u64, data: Bytes, early_room: usize) -> Result<(), ChunkRefusal> {
        self.received += 1;
        if index < self.next || self.early.contains_key(&index) {
            return Err(format!("chunk {index} of this message was already sent").into());
        }
        if index > self.next {
            let cost = data.len() + EARLY_CHUNK_COST;
            if cost > early_room || self.early.len() >= MAX_EARLY_CHUNKS {
                return Err("too many chunks arrived ahead of their turn".into());
            }
            self.bytes += data.len() as u64;
            self.early_held += cost;
            // Copied: a slice would keep the whole frame it came in alive, however small the
            // chunk (and the frame could be padded to its limit).
            self.early.insert(index, Bytes::copy_from_slice(&data));
            return Ok(());
        }
        self.bytes += data.len() as u64;
        self.scan(&data)?;
        self.next += 1;
        while let Some(data) = self.early.remove(&self.next) {
            self.early_held -= data.len() + EARLY_CHUNK_COST;
            self.scan(&data)?;
            self.next += 1;
        }
        Ok(())
    }

    fn scan(&mut self, data: &[u8]) -> Result<(), ChunkRefusal> {
        // Past the body (the second object) nothing is merged: no need to read on.
        if self.scanner.objects() >= 2 {
            return Ok(());
        }
        let invalid = |e: scan::ScanError| {
            ChunkRefusal(format!("the chunked message is not valid msgpack: it {e}"))
        };
        let mut data = data;
        if self.scanner.objects() == 0 {
            let used = self.scanner.run(data, 1).map_err(invalid)?;
            if let Some(main) = &mut self.main {
                if main.len() + used <= MAX_MAIN {
                    main.extend_from_slice(&data[..used]);
                } else {
                    self.main = None;
                }
            }
            data = &data[used..];
        }
        self.scanner.run(data, 2).map(|_| ()).map_err(invalid)
    }

    /// Whether the assembled message answers the receiver's call `session` (its `method` is
    /// `<session>.resolve` or `.reject`): `Some(rejects)`. Other messages sent under that
    /// session (a callback the caller passed, called with much data) answer nothing.
    fn answers(&self, session: &str) -> Option<bool> {
        let main = self.main.as_deref()?;
        let method = scan::text(scan::map_value(main, "method")?)?;
        match method.strip_prefix(session)? {
            ".resolve" => Some(false),
            ".reject" => Some(true),
            _ => None,
        }
    }

    /// The session of the call this message makes (its receiver may answer under it).
    fn call_session(&self) -> Option<String> {
        let main = self.main.as_deref()?;
        let session = scan::map_value(main, "session")?;
        rmp::decode::read_str_from_slice(session)
            .ok()
            .map(|(s, _)| s.to_string())
            .filter(|s| !s.is_empty() && s.len() <= MAX_KEY_LEN)
    }

    /// Whether the message, as sent so far, is complete and merges nothing the server sets.
    fn verdict(&self) -> Result<(), ChunkRefusal> {
        if let Some(reason) = &self.poisoned {
            return Err(reason.clone());
        }
        if !self.early.is_empty() {
            return Err("chunks of this message are missing".into());
        }
        // The receiver fires the assembled message by its own `type` (the body's, merged
        // over it, wins) and calls its own `method`: held to the rules of a header.
        if let Some(kind) = self.scanner.refused_type() {
            return Err(format!(
                "the chunked message has the type {kind:?}: {}",
                scan::type_reason(kind)
            )
            .into());
        }
        if self.scanner.objects() > 0 {
            let main = self
                .main
                .as_deref()
                .ok_or("the chunked message's header is larger than 64 KiB")?;
            let main = Frame::parse(Bytes::copy_from_slice(main))
                .map_err(|e| ChunkRefusal(format!("the chunked message's header: {e}")))?;
            crate::rpc::rules::check_header(&main)
                .map_err(|e| ChunkRefusal(format!("the chunked message's header: {e}")))?;
            // The receiver fires it by its type: without one, processing fails and the chunks
            // stay at the receiver.
            if main.field("type").is_none() {
                return Err("the chunked message's header has no type".into());
            }
            // Fired at the receiver, a `message_cache` call would pass none of the checks a
            // frame's does (the clients never send one in chunks: each fits in a frame).
            if main
                .field("method")
                .is_some_and(|m| m.starts_with("services.built-in.message_cache"))
            {
                return Err("a message_cache call cannot itself be sent in chunks".into());
            }
        }
        match self.scanner.objects() {
            0 => Err("the chunked message is incomplete".into()),
            1 if self.scanner.at_boundary() => Ok(()),
            1 => Err("the chunked message ends in the middle of its body".into()),
            _ => scan::verdict(&self.scanner).map_err(|e| ChunkRefusal(e.to_string())),
        }
    }
}

/// The chunked messages in flight through this instance, by target and key.
/// What one sender has at its receivers: charged as its chunks are delivered, released when
/// the receiver is done with the message (processed, removed, overwritten, or the receiver
/// left) or the server's remove has gone out to it.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Held {
    /// Its messages, watched or waiting for their remove.
    messages: usize,
    /// Their chunk bytes the receivers hold.
    bytes: u64,
    /// Chunks of its that arrived ahead of their turn, held here.
    early: usize,
}

/// A forgotten message whose receiver is still to be told to remove it; its bytes stay
/// charged to its sender and receiver until then ([`ChunkWatch::released`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Orphan {
    pub receiver: String,
    /// The key as delivered.
    pub key: String,
    /// Its sender, while it is still charged for it (a processed message no longer is).
    sender: Option<String>,
    bytes: u64,
}

/// A message whose `process` was delivered: its receiver deletes the chunks only once firing
/// it went through, so it stays charged until the receiver answers the `process` call
/// (`resolve`: released; `reject`: the receiver is told to remove it).
///
/// The call is delivered under a session the server chose (kept by it, in
/// [`State::processing`]), and the receiver's frames to the sender naming it are given the
/// sender's own back: the sender never learns it, so it cannot get the receiver to call
/// `<session>.resolve` some other way and settle the message before the receiver is done.
struct Processing {
    /// The receiver (who owes the answer) and the key it holds the chunks under.
    orphan: Orphan,
    /// Who sent the `process` call.
    sender: String,
    /// The session the sender chose for it.
    session: String,
    since: Instant,
}

/// A settled `process` call: whom its server session is between, and the sender's own.
struct Settled {
    receiver: String,
    sender: String,
    session: String,
}

#[derive(Default)]
struct State {
    messages: HashMap<Key, Watched>,
    /// By the session the server chose for each `process` call.
    processing: HashMap<String, Processing>,
    /// The server sessions each receiver owes an answer under.
    owed: HashMap<String, HashSet<String>>,
    /// The server sessions each sender awaits an answer under.
    awaited_by: HashMap<String, HashSet<String>>,
    /// Settled `process` calls, by server session, oldest first in `settled_order`.
    settled: HashMap<String, Settled>,
    settled_order: std::collections::VecDeque<(String, Instant)>,
    senders: HashMap<String, Held>,
    /// The chunk bytes each receiver holds, from every sender.
    receivers: HashMap<String, u64>,
}

impl State {
    /// Takes a message out of the watch: its early chunks are no longer held here; what its
    /// receiver holds stays charged until [`State::release`].
    fn take(&mut self, slot: &Key) -> Option<Watched> {
        let watched = self.messages.remove(slot)?;
        if let Some(held) = self.senders.get_mut(&watched.sender) {
            held.early = held.early.saturating_sub(watched.early_bytes());
        }
        Some(watched)
    }

    /// Releases one message of `sender` and its `bytes` at `receiver`.
    fn release(&mut self, sender: &str, receiver: &str, bytes: u64) {
        self.release_sender(sender, bytes);
        self.release_receiver(receiver, bytes);
    }

    /// Releases one message of `sender` and its `bytes`.
    fn release_sender(&mut self, sender: &str, bytes: u64) {
        if let Some(held) = self.senders.get_mut(sender) {
            held.messages = held.messages.saturating_sub(1);
            held.bytes = held.bytes.saturating_sub(bytes);
            if *held == Held::default() {
                self.senders.remove(sender);
            }
        }
    }

    /// Releases `bytes` that `receiver` held.
    fn release_receiver(&mut self, receiver: &str, bytes: u64) {
        if let Some(held) = self.receivers.get_mut(receiver) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                self.receivers.remove(receiver);
            }
        }
    }

    /// Takes a message out and releases it at once (its receiver is done with it or gone).
    fn drop_message(&mut self, slot: &Key) -> Option<Watched> {
        let watched = self.take(slot)?;
        self.release(&watched.sender, &slot.0, watched.bytes);
        Some(watched)
    }

    /// The message of `sender` to `target` that a call naming `key` is about: in the
    /// sender's namespace (delivered as `namespaced`), or under the session key of an answer
    /// this sender is sending.
    fn slot_of(&self, target: &str, namespaced: &str, key: &str, sender: &str) -> Option<Key> {
        let spaced = (target.to_string(), namespaced.to_string());
        if self.messages.contains_key(&spaced) {
            return Some(spaced);
        }
        let plain = (target.to_string(), key.to_string());
        self.messages
            .get(&plain)
            .filter(|w| w.sender == sender)
            .map(|_| plain)
    }

    /// Whether `receiver` may owe one more answer to a `process` from `sender`.
    fn may_await(&self, receiver: &str, sender: &str) -> Result<(), ChunkRefusal> {
        let owed = self.owed.get(receiver).map_or(0, HashSet::len);
        if owed >= MAX_AWAITED_PER_RECEIVER {
            return Err(format!(
                "the receiver has not answered {owed} processed chunked messages yet: this one is dropped"
            )
            .into());
        }
        let pair = self.awaited_by.get(sender).map_or(0, |sent| {
            sent.iter()
                .filter(|s| {
                    self.processing
                        .get(*s)
                        .is_some_and(|p| p.orphan.receiver == receiver)
                })
                .count()
        });
        if pair >= MAX_AWAITED_PER_PAIR {
            return Err(format!(
                "the receiver has not answered {pair} of this sender's processed chunked messages yet: this one is dropped"
            )
            .into());
        }
        Ok(())
    }

    /// A session for a `process` call, of the server's choosing: unguessable, and none in use;
    /// that of a chunked answer is tagged (see [`chunked_answer_in`]).
    fn new_server_session(&self, answers: Option<bool>) -> String {
        let tag = match answers {
            Some(false) => ANSWER_RESOLVES,
            Some(true) => ANSWER_REJECTS,
            None => "",
        };
        loop {
            let server = format!(
                "{SERVER_SESSION_MARK}{tag}{}",
                crate::ids::random_id(24 - tag.len())
            );
            if !self.processing.contains_key(&server) && !self.settled.contains_key(&server) {
                return server;
            }
        }
    }

    /// Takes out the `process` awaited under the server session `server`.
    fn settle(&mut self, server: &str) -> Option<Processing> {
        let settled = self.processing.remove(server)?;
        for (index, client) in [
            (&mut self.owed, &settled.orphan.receiver),
            (&mut self.awaited_by, &settled.sender),
        ] {
            if let Some(sessions) = index.get_mut(client) {
                sessions.remove(server);
                if sessions.is_empty() {
                    index.remove(client);
                }
            }
        }
        Some(settled)
    }

    /// Takes a message out whose receiver must be told to remove it.
    fn orphan(&mut self, slot: Key) -> Option<Orphan> {
        let watched = self.take(&slot)?;
        Some(Orphan {
            receiver: slot.0,
            key: slot.1,
            sender: Some(watched.sender),
            bytes: watched.bytes,
        })
    }
}

/// The chunked messages in flight through this instance, by target and key.
pub struct ChunkWatch {
    state: Mutex<State>,
    /// How many `process` answers are awaited: answers are looked at only when some are.
    awaiting: std::sync::atomic::AtomicUsize,
    /// How many settled server sessions are remembered (frames are looked at while any are).
    remembered: std::sync::atomic::AtomicUsize,
    /// Messages forgotten unprocessed, whose receivers are to remove them.
    orphans: Mutex<Vec<Orphan>>,
    /// Wakes whoever tells the receivers.
    orphaned: tokio::sync::Notify,
    /// Removes being sent to receivers whose queue was full (or on another instance).
    sending: Arc<tokio::sync::Semaphore>,
    /// Keys the namespace suffixes of this instance: a sender cannot compute another's.
    suffixes: std::hash::RandomState,
}

impl Default for ChunkWatch {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            awaiting: Default::default(),
            remembered: Default::default(),
            orphans: Mutex::default(),
            orphaned: tokio::sync::Notify::new(),
            sending: Arc::new(tokio::sync::Semaphore::new(MAX_REMOVES_IN_FLIGHT)),
            suffixes: std::hash::RandomState::new(),
        }
    }
}

/// Why a `message_cache` call is not delivered (said to its sender in the reject).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ChunkRefusal(pub String);

impl From<String> for ChunkRefusal {
    fn from(reason: String) -> Self {
        ChunkRefusal(reason)
    }
}

impl From<&str> for ChunkRefusal {
    fn from(reason: &str) -> Self {
        ChunkRefusal(reason.into())
    }
}

/// What to deliver of a vetted `message_cache` call.
#[derive(Debug, Default)]
pub struct Vetted {
    /// Deliver it with this body (the key put in the sender's namespace, a `process`'s
    /// callbacks under the server's session); `None`: as it came.
    pub body: Option<Bytes>,
    /// The `process` of a chunked call: the session the receiver may answer it under.
    pub call_session: Option<String>,
    /// A `process`: the session the server chose for it, to deliver it under (its header's
    /// `session` renamed; [`ChunkWatch::restore`] gives the sender's back).
    pub server_session: Option<String>,
    /// The `process` of a chunked answer: the session of the receiver's call it answers, and
    /// whether it rejects it (the call ends as it passes, as a one-frame answer would).
    pub answers: Option<(String, bool)>,
}

/// What a frame from a receiver to a sender is, as to the sessions the server chose.
#[derive(Debug)]
pub(crate) enum Restored {
    /// It names none of them: deliver it as it is.
    Unchanged,
    /// It names one: deliver this, which names the sender's own session instead.
    Renamed(Frame),
    /// It names one, but it goes to or comes from another client than the `process` call's
    /// (a callback with another target): it is not delivered, so the session stays secret.
    Misdirected,
}

/// The functions of `message_cache`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Create,
    Append,
    Set,
    Process,
    Remove,
}

/// The positional arguments of a `message_cache` call (the clients send no keywords to it).
struct CallArgs<'a> {
    body: &'a Bytes,
    /// The encoded `args` array, and each of its items.
    args: &'a [u8],
    items: Vec<&'a [u8]>,
}

impl CallArgs<'_> {
    fn read(body: &Bytes) -> Result<CallArgs<'_>, String> {
        let bad = || "the message_cache call has malformed arguments".to_string();
        let args = scan::map_value(body, "args").ok_or_else(bad)?;
        let items = scan::array_items(args, 8).ok_or_else(bad)?;
        let keyword = scan::map_value(body, "with_kwargs") == Some(&[0xc3][..])
            || items
                .last()
                .is_some_and(|last| matches!(last.first(), Some(0x80..=0x8f | 0xde | 0xdf)));
        if keyword {
            return Err("message_cache calls take positional arguments only".into());
        }
        Ok(CallArgs { body, args, items })
    }

    /// The message key: a string of at most 256 bytes, and not a name every JavaScript
    /// object has (an answer's key is used as it is, as a property of the receiver's cache).
    fn key(&self) -> Result<String, ChunkRefusal> {
        self.items
            .first()
            .and_then(|item| rmp::decode::read_str_from_slice(item).ok())
            .map(|(s, _)| s.to_string())
            .filter(|k| {
                !k.is_empty()
                    && k.len() <= MAX_KEY_LEN
                    && !scan::JS_BUILTIN_TYPES.contains(&k.as_str())
            })
            .ok_or_else(|| "the message_cache call names no valid key".into())
    }

    fn index(&self, at: usize) -> Result<u64, ChunkRefusal> {
        self.items
            .get(at)
            .and_then(|item| scan::decode(item, Limits::decode(item.len(), 1, 1)).ok())
            .and_then(|(v, _)| v.as_u64())
            .ok_or_else(|| "the message_cache call has no valid index".into())
    }

    fn data(&self, at: usize) -> Result<Bytes, ChunkRefusal> {
        self.items
            .get(at)
            .and_then(|item| scan::binary_payload(item))
            .map(|payload| self.body.slice_ref(payload))
            .ok_or_else(|| "the message_cache call carries no bytes".into())
    }

    fn flag(&self, at: usize) -> bool {
        self.items.get(at).is_some_and(|item| *item == [0xc3])
    }

    /// The body of a `create` that starts `key` afresh at the receiver: its arguments become
    /// `[key, answer, true]`, overwrite forced. The receiver may still hold chunks under the
    /// key that the server never saw or has forgotten (the clients keep their cache across a
    /// reconnect); kept, they would be assembled with the ones the server scans.
    fn with_fresh_create(&self, key: &str, answer: bool) -> Bytes {
        self.replacing(self.args, |out| {
            let _ = rmp::encode::write_array_len(&mut *out, 3);
            let _ = rmp::encode::write_str(&mut *out, key);
            let _ = rmp::encode::write_bool(&mut *out, answer);
            let _ = rmp::encode::write_bool(out, true);
        })
    }

    /// The body with the key (the first argument) replaced.
    fn with_key(&self, key: &str) -> Bytes {
        self.replacing(self.items[0], |out| {
            let _ = rmp::encode::write_str(out, key);
        })
    }

    /// The body with `part` (a slice of it) replaced by what `write` writes.
    fn replacing(&self, part: &[u8], write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
        let mut written = Vec::new();
        write(&mut written);
        self.spliced(&mut [(part, written)])
    }

    /// The body with each part (a slice of it; none overlapping) replaced by its bytes.
    fn spliced(&self, parts: &mut [Splice<'_>]) -> Bytes {
        let base = self.body.as_ptr() as usize;
        parts.sort_by_key(|(part, _)| part.as_ptr() as usize);
        let mut out = Vec::with_capacity(self.body.len() + 64);
        let mut at = 0;
        for (part, bytes) in parts.iter() {
            let start = part.as_ptr() as usize - base;
            out.extend_from_slice(&self.body[at..start]);
            out.extend_from_slice(bytes);
            at = start + part.len();
        }
        out.extend_from_slice(&self.body[at..]);
        Bytes::from(out)
    }
}

/// A part of a body (a slice of it) and the bytes that replace it.
type Splice<'a> = (&'a [u8], Vec<u8>);

/// The shortest and longest heartbeat interval a receiver is given (seconds): the clients
/// send half their call time-out.
const HEARTBEAT_INTERVAL: std::ops::RangeInclusive<f64> = 1.0..=3600.0;

/// The promise a `process` call from `sender` is delivered with, written by the server: its
/// `resolve`, `reject` and (where the sender asked for heartbeats, at a sane interval)
/// `heartbeat` callbacks go to the sender under the server's session `server`, whatever the
/// sender wrote (a callback aimed elsewhere would tell a third client that session, and a
/// promise the receiver cannot use would leave the process unanswered): (the promise as sent,
/// what replaces it). `None` when the call has no promise.
fn server_promise<'a>(body: &'a [u8], sender: &str, server: &str) -> Option<Splice<'a>> {
    let promise = scan::map_value(body, "promise")?;
    let interval = if scan::text(promise) == Some("*") {
        scan::map_value(body, "t")
    } else {
        scan::map_value(promise, "heartbeat").and_then(|_| scan::map_value(promise, "interval"))
    }
    .and_then(|value| scan::decode(value, Limits::decode(value.len(), 1, 1)).ok())
    .and_then(|(value, _)| value.as_f64())
    .filter(|seconds| HEARTBEAT_INTERVAL.contains(seconds));
    let names: &[&str] = if interval.is_some() {
        &["heartbeat", "resolve", "reject"]
    } else {
        &["resolve", "reject"]
    };
    let mut out = Vec::with_capacity(128 + 3 * (sender.len() + server.len()));
    let _ =
        rmp::encode::write_map_len(&mut out, names.len() as u32 + u32::from(interval.is_some()));
    for name in names {
        let _ = rmp::encode::write_str(&mut out, name);
        let _ = rmp::encode::write_map_len(&mut out, 4);
        for (key, value) in [
            ("_rtype", "method"),
            ("_rtarget", sender),
            ("_rmethod", &format!("{server}.{name}")),
        ] {
            let _ = rmp::encode::write_str(&mut out, key);
            let _ = rmp::encode::write_str(&mut out, value);
        }
        let _ = rmp::encode::write_str(&mut out, "_rpromise");
        let _ = rmp::encode::write_bool(&mut out, false);
    }
    if let Some(seconds) = interval {
        let _ = rmp::encode::write_str(&mut out, "interval");
        let _ = rmp::encode::write_f64(&mut out, seconds);
    }
    Some((promise, out))
}

/// What follows [`SERVER_SESSION_MARK`] in the session of a `process` that delivers a chunked
/// answer that resolves, or rejects, its receiver's call: the receiver's instance ends the
/// call by it, never seeing the assembled message. (The rest is lowercase; no client may send
/// a session that starts with the mark.)
const ANSWER_RESOLVES: &str = "R";
const ANSWER_REJECTS: &str = "J";

/// The message key a `message_cache` call's body names (its first argument), as it stands.
pub(crate) fn message_key(body: &[u8]) -> Option<&str> {
    let args = scan::map_value(body, "args")?;
    scan::text(scan::array_items(args, 64)?.first()?)
}

/// Whether a `process` arriving under `session` delivers a chunked answer: `Some(rejects)`.
pub(crate) fn chunked_answer_in(session: &str) -> Option<bool> {
    let tag = session.strip_prefix(SERVER_SESSION_MARK)?;
    if tag.starts_with(ANSWER_RESOLVES) {
        Some(false)
    } else if tag.starts_with(ANSWER_REJECTS) {
        Some(true)
    } else {
        None
    }
}

/// The server session a header field names, if it names one (see [`SERVER_SESSION_MARK`]).
fn server_session_in(value: &str) -> Option<&str> {
    value
        .starts_with(SERVER_SESSION_MARK)
        .then(|| value.split('.').next().unwrap_or(value))
}

impl ChunkWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key `sender`'s message `key` is delivered under.
    fn namespaced(&self, sender: &str, key: &str) -> String {
        use std::hash::BuildHasher;
        format!("{key}~{:016x}", self.suffixes.hash_one(sender))
    }

    /// Looks at a frame from `sender` to `target`; `Err` says why it must not be delivered.
    /// `answers(session)` says whether the sender was sent the target's call `session` (a
    /// chunked answer goes under that session's key); an anonymous sender may have fewer
    /// bytes in flight, and a receiver holds at most [`MAX_BYTES_PER_RECEIVER`] from all.
    pub fn vet(
        &self,
        sender: &str,
        anonymous: bool,
        target: &str,
        frame: &Frame,
        answers: impl Fn(&str) -> bool,
    ) -> Result<Vetted, ChunkRefusal> {
        let vetted = self.vet_call(sender, anonymous, target, frame, answers);
        if vetted.is_err() {
            // Refused before its message was looked at (how its arguments are written):
            // the receiver still drops what it holds of that message.
            self.refused(sender, target, frame);
        }
        vetted
    }

    /// A frame from `sender` to `target` is not delivered: if it is the `process` of a message
    /// still watched, the receiver is told to drop the chunks.
    pub(crate) fn refused(&self, sender: &str, target: &str, frame: &Frame) {
        if frame.field("method") != Some(PROCESS) {
            return;
        }
        let Some(key) = message_key(&frame.body) else {
            return;
        };
        let namespaced = self.namespaced(sender, key);
        let mut state = self.lock();
        let Some(slot) = state.slot_of(target, &namespaced, key, sender) else {
            return;
        };
        let orphan = state.orphan(slot);
        drop(state);
        self.orphan(orphan.into_iter().collect());
    }

    /// The checks of [`ChunkWatch::vet`].
    fn vet_call(
        &self,
        sender: &str,
        anonymous: bool,
        target: &str,
        frame: &Frame,
        answers: impl Fn(&str) -> bool,
    ) -> Result<Vetted, ChunkRefusal> {
        let Some(method) = frame.field("method") else {
            return Ok(Vetted::default());
        };
        let Some(rest) = method.strip_prefix("services.built-in.message_cache") else {
            return Ok(Vetted::default());
        };
        let op = match rest {
            ".create" => Op::Create,
            ".append" => Op::Append,
            ".set" => Op::Set,
            ".process" => Op::Process,
            ".remove" => Op::Remove,
            _ => return Err(format!("{method} is not a message_cache function").into()),
        };
        if target.ends_with("/*") {
            return Err("message_cache calls go to one client, never to a whole workspace".into());
        }
        if scan::map_value(&frame.body, "_enc").is_some() {
            return Err("message_cache calls cannot be end-to-end encrypted: the server vets what they assemble".into());
        }
        let args = CallArgs::read(&frame.body)?;
        // Exactly what the clients send: a receiver appends its own context after the
        // arguments (the JavaScript client positionally), so one more would stand in for it.
        let (function, arity) = match op {
            Op::Create => ("create", 2..=3),
            Op::Append => ("append", 3..=3),
            Op::Set => ("set", 4..=4),
            Op::Process => ("process", 2..=2),
            Op::Remove => ("remove", 1..=1),
        };
        let arity = (!arity.contains(&args.items.len())).then(|| {
            ChunkRefusal(format!(
                "message_cache.{function} takes {} arguments, not {}",
                if arity.start() == arity.end() {
                    arity.start().to_string()
                } else {
                    format!("{} or {}", arity.start(), arity.end())
                },
                args.items.len()
            ))
        });
        // (A `process` refused for it has its message dropped at the receiver, below.)
        if let Some(refused) = arity.clone()
            && op != Op::Process
        {
            return Err(refused);
        }
        let key = args.key()?;
        let namespaced = self.namespaced(sender, &key);
        let mut guard = self.lock();
        let state = &mut *guard;
        // The message this call is about: in the sender's namespace, or under the session key
        // of an answer this sender is sending.
        let mine = |state: &State| state.slot_of(target, &namespaced, &key, sender);
        let delivered = |watched_key: &Key, namespaced_key: bool| Vetted {
            body: namespaced_key.then(|| args.with_key(&watched_key.1)),
            ..Vetted::default()
        };
        // A message the server starts watching starts empty at its receiver too.
        let fresh = |watched_key: &Key, answer: bool| Vetted {
            body: Some(args.with_fresh_create(&watched_key.1, answer)),
            ..Vetted::default()
        };
        let not_created =
            || ChunkRefusal::from("this chunked message was not created through the server");
        match op {
            Op::Create => {
                let answer = args.flag(1);
                let slot: Key = if answer {
                    // The key is the receiver's session: only its callee answers under it.
                    if !answers(&key) {
                        return Err("a chunked answer goes under the session of a call to its sender, and this is none".into());
                    }
                    (target.to_string(), key.clone())
                } else {
                    (target.to_string(), namespaced.clone())
                };
                let idle = if let Some(existing) = state.messages.get(&slot) {
                    if existing.sender != sender {
                        return Err("another sender is using this message key".into());
                    }
                    // Overwritten, whatever the sender asked: a receiver may no longer hold what
                    // the server scanned (the JavaScript clients drop the oldest of many), and
                    // would then start an empty message the server reads as a continuation.
                    state.drop_message(&slot);
                    Vec::new()
                } else {
                    let idle = Self::sweep_locked(state);
                    let held = state.senders.get(sender).map_or(0, |h| h.messages);
                    if held >= MAX_MESSAGES_PER_SENDER {
                        drop(guard);
                        self.orphan(idle);
                        return Err(format!(
                            "too many chunked messages in flight (at most {MAX_MESSAGES_PER_SENDER})"
                        )
                        .into());
                    }
                    idle
                };
                state
                    .messages
                    .insert(slot.clone(), Watched::new(sender, !answer));
                state
                    .senders
                    .entry(sender.to_string())
                    .or_default()
                    .messages += 1;
                drop(guard);
                self.orphan(idle);
                Ok(fresh(&slot, answer))
            }
            Op::Append | Op::Set => {
                let held = state.senders.get(sender).copied().unwrap_or_default();
                let at_receiver = state.receivers.get(target).copied().unwrap_or(0);
                let slot = mine(state).ok_or_else(not_created)?;
                let watched = state.messages.get_mut(&slot).ok_or_else(not_created)?;
                heartbeat_flag(&args, if op == Op::Append { 2 } else { 3 }, watched)?;
                watched.touched = Instant::now();
                let room = MAX_EARLY_BYTES_PER_SENDER.saturating_sub(held.early);
                let max_bytes = if anonymous {
                    MAX_BYTES_PER_ANONYMOUS_SENDER
                } else {
                    MAX_BYTES_PER_SENDER
                };
                let size = |data: &Bytes| -> Result<(), ChunkRefusal> {
                    let len = data.len() as u64;
                    if held.bytes + len > max_bytes {
                        return Err(format!(
                            "too many bytes of chunked messages in flight from this sender (at most {} MiB); process or remove some first",
                            max_bytes >> 20
                        )
                        .into());
                    }
                    if at_receiver + len > MAX_BYTES_PER_RECEIVER {
                        return Err(format!(
                            "the receiver holds too many bytes of unprocessed chunked messages (at most {} MiB from all senders); try again later",
                            MAX_BYTES_PER_RECEIVER >> 20
                        )
                        .into());
                    }
                    Ok(())
                };
                let before = (watched.bytes, watched.early_bytes());
                let outcome = if op == Op::Append {
                    args.data(1).and_then(|data| {
                        size(&data)?;
                        watched.chunk(watched.received, data, room)
                    })
                } else {
                    args.index(1).and_then(|index| {
                        let data = args.data(2)?;
                        size(&data)?;
                        watched.chunk(index, data, room)
                    })
                };
                if let Err(reason) = &outcome {
                    watched.poisoned.get_or_insert_with(|| reason.clone());
                    watched.drop_early();
                }
                let namespaced_key = watched.namespaced;
                let (bytes, early) = (watched.bytes, watched.early_bytes());
                let added = bytes.saturating_sub(before.0);
                let sender_held = state.senders.entry(sender.to_string()).or_default();
                sender_held.bytes += added;
                sender_held.early = (sender_held.early + early).saturating_sub(before.1);
                if added > 0 {
                    *state.receivers.entry(target.to_string()).or_default() += added;
                }
                outcome.map(|()| delivered(&slot, namespaced_key))
            }
            Op::Process => {
                let slot = mine(state).ok_or_else(not_created)?;
                let watched = state.messages.get(&slot).ok_or_else(not_created)?;
                let session = frame
                    .field("session")
                    .filter(|s| !s.is_empty() && s.len() <= MAX_KEY_LEN);
                let checked = arity.map_or(Ok(()), Err).and_then(|()| {
                    let session = session.ok_or(
                        "a message_cache process must be a call that is answered (with a session)",
                    )?;
                    heartbeat_flag(&args, 1, watched)?;
                    watched.verdict()?;
                    state.may_await(target, sender)?;
                    // Created as an answer (under the receiver's session, not in the
                    // sender's namespace) and assembling into one.
                    let answers = (!watched.namespaced)
                        .then(|| watched.answers(&slot.1))
                        .flatten();
                    let server = state.new_server_session(answers);
                    let promise = server_promise(&frame.body, sender, &server).ok_or(
                        "a message_cache process must be a call that is answered (with a promise)",
                    )?;
                    Ok((session, server, promise, answers))
                });
                let (session, server, promise, answers) = match checked {
                    Ok(checked) => checked,
                    // Its answer says whether the receiver let the chunks go: a process that
                    // will not go through leaves them there, and the receiver is told to drop
                    // them.
                    Err(reason) => {
                        let orphan = state.orphan(slot);
                        drop(guard);
                        self.orphan(orphan.into_iter().collect());
                        return Err(reason);
                    }
                };
                // The sender is done with it; what its receiver holds stays counted there.
                let watched = state.take(&slot).ok_or_else(not_created)?;
                state.release_sender(&watched.sender, watched.bytes);
                let mut parts = Vec::with_capacity(2);
                if watched.namespaced {
                    let mut key = Vec::with_capacity(slot.1.len() + 2);
                    let _ = rmp::encode::write_str(&mut key, &slot.1);
                    parts.push((args.items[0], key));
                }
                parts.push(promise);
                let body = Some(args.spliced(&mut parts));
                let processing = Processing {
                    orphan: Orphan {
                        receiver: slot.0.clone(),
                        key: slot.1.clone(),
                        sender: None,
                        bytes: watched.bytes,
                    },
                    sender: sender.to_string(),
                    session: session.to_string(),
                    since: Instant::now(),
                };
                state.processing.insert(server.clone(), processing);
                state
                    .owed
                    .entry(slot.0.clone())
                    .or_default()
                    .insert(server.clone());
                state
                    .awaited_by
                    .entry(sender.to_string())
                    .or_default()
                    .insert(server.clone());
                self.awaiting
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let answers = answers.map(|rejects| (slot.1.clone(), rejects));
                Ok(Vetted {
                    body,
                    call_session: watched.call_session(),
                    server_session: Some(server),
                    answers,
                })
            }
            Op::Remove => {
                let slot = mine(state).ok_or_else(not_created)?;
                let namespaced_key = state.drop_message(&slot).is_some_and(|w| w.namespaced);
                Ok(delivered(&slot, namespaced_key))
            }
        }
    }

    /// Whether frames may name a session the server chose (one awaited or remembered).
    pub(crate) fn names_sessions(&self) -> bool {
        self.awaits_answers() || self.remembered.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// Whether any `process` answer is awaited.
    pub(crate) fn awaits_answers(&self) -> bool {
        self.answers_awaited() > 0
    }

    /// How many `process` answers are awaited.
    pub fn answers_awaited(&self) -> usize {
        self.awaiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a frame whose header has these `method`, `parent` and `session` may name a
    /// session the server chose (then [`ChunkWatch::restore`] is worth its lock).
    pub(crate) fn may_name_server_session(&self, fields: [Option<&str>; 3]) -> bool {
        self.names_sessions()
            && fields
                .iter()
                .flatten()
                .any(|v| server_session_in(v).is_some())
    }

    /// Looks at a frame from `from` to `to` for a session the server chose for a `process`
    /// call: the receiver's frames to the sender naming it (the answer, its heartbeats, a
    /// notice that the receiver is gone) are given the sender's own session, and the answer
    /// settles what the receiver holds. Cheap when no answer is awaited.
    pub(crate) fn restore(&self, from: &str, to: &str, frame: &Frame) -> Restored {
        if !self.names_sessions() {
            return Restored::Unchanged;
        }
        let named: Vec<&str> = SESSION_FIELDS
            .iter()
            .filter_map(|key| frame.field(key))
            .filter_map(server_session_in)
            .collect();
        if named.is_empty() {
            return Restored::Unchanged;
        }
        let mut state = self.lock();
        // Each server session it names that is awaited, with the sender's own.
        let mut renames: Vec<(&str, String)> = Vec::with_capacity(named.len());
        for server in named {
            // One settled a while ago (or unknown) names nothing of the sender's any more.
            let known = state
                .processing
                .get(server)
                .map(|p| (&p.orphan.receiver, &p.sender, &p.session))
                .or_else(|| {
                    let s = state.settled.get(server)?;
                    Some((&s.receiver, &s.sender, &s.session))
                });
            let Some((receiver, sender, session)) = known else {
                continue;
            };
            if receiver != from || sender != to {
                return Restored::Misdirected;
            }
            if !renames.iter().any(|(s, _)| *s == server) {
                renames.push((server, session.clone()));
            }
        }
        // The answer itself: `<server session>.resolve` or `.reject`.
        let answered = frame.field("method").and_then(|method| {
            renames.iter().find_map(|(server, _)| {
                match method.strip_prefix(*server)?.strip_prefix('.')? {
                    outcome @ ("resolve" | "reject") => Some((*server, outcome)),
                    _ => None,
                }
            })
        });
        if let Some((server, outcome)) = answered
            && let Some(settled) = self.settle(&mut state, server)
        {
            let o = settled.orphan;
            if outcome == "resolve" {
                state.release_receiver(&o.receiver, o.bytes);
            } else {
                drop(state);
                self.orphan(vec![o]);
            }
        } else {
            drop(state);
        }
        let mut renamed: Option<Frame> = None;
        for (server, session) in &renames {
            let current = renamed.as_ref().unwrap_or(frame);
            renamed = Some(current.renamed(&SESSION_FIELDS, server, session));
        }
        renamed.map_or(Restored::Unchanged, Restored::Renamed)
    }

    /// The sender's own session for the server session `server` of a `process` that reached
    /// no instance (its receiver is connected nowhere: nothing held any more).
    pub(crate) fn undelivered(&self, server: &str) -> Option<String> {
        if server_session_in(server) != Some(server) || !self.awaits_answers() {
            return None;
        }
        let mut state = self.lock();
        let settled = self.settle(&mut state, server)?;
        state.release_receiver(&settled.orphan.receiver, settled.orphan.bytes);
        Some(settled.session)
    }

    /// Takes out what `receiver` owes (it left: nothing to tell, nothing held).
    fn settle_receiver(&self, state: &mut State, receiver: &str) {
        let Some(owed) = state.owed.get(receiver).cloned() else {
            return;
        };
        for server in owed {
            if let Some(p) = self.settle(state, &server) {
                state.release_receiver(receiver, p.orphan.bytes);
            }
        }
    }

    /// Takes out what `sender` awaits (it left: its receivers' answers may never be seen
    /// here): the receivers are told to remove the messages (one already deleted only makes
    /// its receiver log an error).
    fn settle_sender(&self, state: &mut State, sender: &str) -> Vec<Orphan> {
        let awaited = state.awaited_by.get(sender).cloned().unwrap_or_default();
        self.settle_all(state, awaited)
    }

    /// Takes out what waited too long for its answer: its receiver is to remove it (a remove
    /// of what it already deleted only makes it log an error).
    fn expire_answers(&self, state: &mut State) -> Vec<Orphan> {
        let expired: Vec<String> = state
            .processing
            .iter()
            .filter(|(_, p)| p.since.elapsed() >= ANSWER_LIMIT)
            .map(|(server, _)| server.clone())
            .collect();
        self.settle_all(state, expired)
    }

    /// Takes out the `process` calls awaited under `servers`: their receivers are to be told.
    fn settle_all(
        &self,
        state: &mut State,
        servers: impl IntoIterator<Item = String>,
    ) -> Vec<Orphan> {
        servers
            .into_iter()
            .filter_map(|server| self.settle(state, &server))
            .map(|p| p.orphan)
            .collect()
    }

    /// Takes out the `process` awaited under `server`, and counts it no longer; its session
    /// is remembered a while (see [`MAX_SETTLED`]).
    fn settle(&self, state: &mut State, server: &str) -> Option<Processing> {
        use std::sync::atomic::Ordering;
        let settled = state.settle(server)?;
        self.awaiting.fetch_sub(1, Ordering::Relaxed);
        let named = Settled {
            receiver: settled.orphan.receiver.clone(),
            sender: settled.sender.clone(),
            session: settled.session.clone(),
        };
        state.settled.insert(server.to_string(), named);
        state
            .settled_order
            .push_back((server.to_string(), Instant::now()));
        self.forget_settled(state, |count, _| count > MAX_SETTLED);
        Some(settled)
    }

    /// Forgets the oldest remembered sessions while `drop(count, settled at)` says so.
    fn forget_settled(&self, state: &mut State, drop: impl Fn(usize, Instant) -> bool) {
        while let Some((server, at)) = state.settled_order.front()
            && drop(state.settled_order.len(), *at)
        {
            state.settled.remove(server.as_str());
            state.settled_order.pop_front();
        }
        self.remembered
            .store(state.settled.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Forgets the messages of a client that left: those it sent (their receivers are to
    /// remove them) and those sent to it.
    pub(crate) fn forget(&self, client: &str) {
        let mut state = self.lock();
        let slots: Vec<Key> = state
            .messages
            .iter()
            .filter(|(slot, w)| slot.0 == client || w.sender == client)
            .map(|(slot, _)| slot.clone())
            .collect();
        let mut gone = Vec::new();
        for slot in slots {
            if slot.0 == client {
                state.drop_message(&slot);
            } else {
                gone.extend(state.orphan(slot));
            }
        }
        self.settle_receiver(&mut state, client);
        gone.extend(self.settle_sender(&mut state, client));
        drop(state);
        self.orphan(gone);
    }

    /// Forgets the messages nobody touched for [`IDLE_LIMIT`] (their receivers are to remove
    /// them).
    pub(crate) fn sweep(&self) {
        let mut state = self.lock();
        let mut idle = Self::sweep_locked(&mut state);
        idle.extend(self.expire_answers(&mut state));
        self.forget_settled(&mut state, |_, at| at.elapsed() >= ANSWER_LIMIT);
        drop(state);
        self.orphan(idle);
    }

    /// Takes out the idle messages; their receivers are to be told ([`ChunkWatch::orphan`],
    /// once the lock is let go).
    fn sweep_locked(state: &mut State) -> Vec<Orphan> {
        let idle: Vec<Key> = state
            .messages
            .iter()
            .filter(|(_, w)| w.touched.elapsed() >= IDLE_LIMIT)
            .map(|(slot, _)| slot.clone())
            .collect();
        idle.into_iter()
            .filter_map(|slot| state.orphan(slot))
            .collect()
    }

    /// Queues forgotten messages for their receivers to be told (never with the state lock
    /// held: past [`MAX_ORPHANS`] they are released here).
    fn orphan(&self, forgotten: Vec<Orphan>) {
        if forgotten.is_empty() {
            return;
        }
        let mut orphans = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_ORPHANS.saturating_sub(orphans.len());
        let mut forgotten = forgotten.into_iter();
        orphans.extend(forgotten.by_ref().take(room));
        drop(orphans);
        let dropped: Vec<Orphan> = forgotten.collect();
        if !dropped.is_empty() {
            tracing::warn!(
                dropped = dropped.len(),
                "too many forgotten chunked messages at once: their receivers keep some"
            );
            for orphan in &dropped {
                self.released(orphan);
            }
        }
        self.orphaned.notify_one();
    }

    /// The messages forgotten unprocessed since the last call: each receiver still holds the
    /// chunks and is to be told to remove them; then [`ChunkWatch::released`].
    pub(crate) fn take_orphans(&self) -> Vec<Orphan> {
        std::mem::take(&mut *self.orphans.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The remove of `orphan` has gone out (or its receiver is gone): its sender and receiver
    /// are charged for it no longer.
    pub(crate) fn released(&self, orphan: &Orphan) {
        let mut state = self.lock();
        // Its early chunks were released when it was forgotten.
        if let Some(sender) = &orphan.sender {
            state.release_sender(sender, orphan.bytes);
        }
        state.release_receiver(&orphan.receiver, orphan.bytes);
    }

    /// Waits until a message is forgotten unprocessed.
    pub(crate) async fn orphaned(&self) {
        self.orphaned.notified().await;
    }

    /// A place among the removes being sent to receivers that cannot take them right away
    /// (at most [`MAX_REMOVES_IN_FLIGHT`] at once).
    pub(crate) async fn remove_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.sending.clone().acquire_owned().await.ok()
    }

    /// The messages `sender` has at its receivers (watched, or waiting for their remove).
    #[cfg(test)]
    pub(crate) fn messages_of(&self, sender: &str) -> usize {
        self.lock().senders.get(sender).map_or(0, |h| h.messages)
    }

    /// Messages being watched now.
    pub fn len(&self) -> usize {
        self.lock().messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Checks the `heartbeat` argument at `at` of a call about `watched`: true exactly for a
/// chunked answer. The clients look a true one up as a session of theirs and throw when there
/// is none, which would leave the chunks with them.
fn heartbeat_flag(args: &CallArgs<'_>, at: usize, watched: &Watched) -> Result<(), ChunkRefusal> {
    if args.flag(at) == watched.namespaced {
        return Err(format!(
            "a message_cache call's heartbeat argument must be {} for this message",
            !watched.namespaced
        )
        .into());
    }
    Ok(())
}

/// The manager's call that tells `target` to remove the chunks it holds under `key`.
pub(crate) fn remove_frame(from: &str, target: &str, key: &str, user: &rmpv::Value) -> Bytes {
    let ws = target.split('/').next().unwrap_or_default();
    let method = "services.built-in.message_cache.remove";
    crate::rpc::peer::method_frame(from, target, method, vec![key.into()], ws, user)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::value::{encode, obj};
    use rmpv::Value;

    /// Chunks ahead of their turn: each costs its entry as well as its bytes (empty ones are
    /// not free), their number per message is bounded, a held chunk does not keep the frame
    /// it came in alive, and their cost goes with them.
    #[test]
    fn chunks_ahead_of_their_turn_are_bounded_and_copied() {
        let mut watched = Watched::new("ws/bob", false);
        let frame = Bytes::from(vec![7u8; 1 << 20]);
        watched.chunk(3, frame.slice(0..1), usize::MAX).unwrap();
        assert!(frame.is_unique(), "the held chunk pins its frame");
        assert_eq!(watched.early_bytes(), 1 + EARLY_CHUNK_COST);
        assert!(
            watched
                .chunk(4, Bytes::new(), EARLY_CHUNK_COST - 1)
                .is_err()
        );
        let mut index = 4;
        while watched.early.len() < MAX_EARLY_CHUNKS {
            watched.chunk(index, Bytes::new(), usize::MAX).unwrap();
            index += 1;
        }
        assert!(watched.chunk(index, Bytes::new(), usize::MAX).is_err());
        assert_eq!(
            watched.early_bytes(),
            1 + MAX_EARLY_CHUNKS * EARLY_CHUNK_COST
        );
        assert_eq!(watched.early.len(), MAX_EARLY_CHUNKS);
        watched.drop_early();
        assert_eq!(watched.early_bytes(), 0);
    }

    /// A `message_cache` call to `ws/alice`, under a session of its own.
    fn call(function: &str, args: Vec<Value>) -> Frame {
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let header = obj([
            ("type", "method".into()),
            ("to", "ws/alice".into()),
            (
                "method",
                format!("services.built-in.message_cache.{function}").into(),
            ),
            ("session", format!("call{n}").into()),
        ]);
        let mut data = encode(&header);
        let mut body = vec![("args".into(), Value::Array(args))];
        if function == "process" {
            body.push(("promise".into(), promise(&format!("call{n}"))));
        }
        data.extend(encode(&Value::Map(body)));
        Frame::parse(Bytes::from(data)).unwrap()
    }

    /// Sends message `key` (one small call) from `sender` to `ws/alice` and its `process`:
    /// the `process` frame, and what became of it.
    fn processed_by(
        watch: &ChunkWatch,
        sender: &str,
        key: &str,
    ) -> (Frame, Result<Vetted, ChunkRefusal>) {
        let whole = message(&obj([("args", Value::Array(vec![1.into()]))]));
        staged(watch, sender, key, whole);
        let process = process_of(key);
        let vetted = vet(watch, sender, &process);
        (process, vetted)
    }

    /// Opens message `key` from `sender` and fills it with `whole` in one piece.
    fn staged(watch: &ChunkWatch, sender: &str, key: &str, whole: Vec<u8>) {
        let create = call("create", vec![key.into(), false.into()]);
        vet(watch, sender, &create).unwrap();
        vet(watch, sender, &set(key, 0, whole)).unwrap();
    }

    /// The `process` of message `key`, as the clients send it.
    fn process_of(key: &str) -> Frame {
        call("process", vec![key.into(), false.into()])
    }

    /// The promise a client sends with a call under `session`.
    fn promise(session: &str) -> Value {
        let callback = |name: &str| {
            obj([
                ("_rtype", "method".into()),
                ("_rtarget", "ws/eve".into()),
                ("_rmethod", format!("{session}.{name}").into()),
                ("_rpromise", false.into()),
            ])
        };
        obj([
            ("heartbeat", callback("heartbeat")),
            ("interval", 15.0.into()),
            ("resolve", callback("resolve")),
            ("reject", callback("reject")),
        ])
    }

    /// A frame from `from` to `to` calling `method` under the parent session `parent`.
    fn callback_frame(from: &str, to: &str, method: &str, parent: &str) -> Frame {
        let mut data = encode(&obj([
            ("type", "method".into()),
            ("from", from.into()),
            ("to", to.into()),
            ("method", method.into()),
            ("parent", parent.into()),
        ]));
        data.extend(encode(&obj([("args", Value::Array(vec![Value::Nil]))])));
        Frame::parse(Bytes::from(data)).unwrap()
    }

    fn message(body: &Value) -> Vec<u8> {
        let mut data = encode(&obj([
            ("type", "method".into()),
            ("method", "services.s.f".into()),
        ]));
        data.extend(encode(body));
        data
    }

    fn none(_: &str) -> bool {
        false
    }

    fn vet(watch: &ChunkWatch, sender: &str, frame: &Frame) -> Result<Vetted, ChunkRefusal> {
        watch.vet(sender, false, "ws/alice", frame, none)
    }

    fn send(
        watch: &ChunkWatch,
        data: &[u8],
        piece: usize,
        reversed: bool,
    ) -> Result<(), ChunkRefusal> {
        vet(
            watch,
            "ws/eve",
            &call("create", vec!["k".into(), false.into()]),
        )?;
        let mut chunks: Vec<(usize, &[u8])> = data.chunks(piece).enumerate().collect();
        if reversed {
            chunks.reverse();
        }
        for (index, chunk) in chunks {
            let args = vec![
                "k".into(),
                (index as u64).into(),
                Value::Binary(chunk.to_vec()),
                false.into(),
            ];
            vet(watch, "ws/eve", &call("set", args))?;
        }
        vet(watch, "ws/eve", &process_of("k")).map(|_| ())
    }

    #[test]
    fn a_chunked_call_tells_the_session_its_answer_goes_under() {
        let mut data = encode(&obj([
            ("type", "method".into()),
            ("method", "services.s.f".into()),
            ("session", "s3ss10n".into()),
        ]));
        data.extend(encode(&obj([("args", Value::Array(vec![1.into()]))])));
        for piece in [1, 3, 7, 4096] {
            let watch = ChunkWatch::default();
            vet(
                &watch,
                "ws/eve",
                &call("create", vec!["k".into(), false.into()]),
            )
            .unwrap();
            for (index, chunk) in data.chunks(piece).enumerate() {
                let args = vec![
                    "k".into(),
                    (index as u64).into(),
                    Value::Binary(chunk.to_vec()),
                    false.into(),
                ];
                vet(&watch, "ws/eve", &call("set", args)).unwrap();
            }
            let done = vet(&watch, "ws/eve", &process_of("k"));
            assert_eq!(
                done.unwrap().call_session.as_deref(),
                Some("s3ss10n"),
                "{piece}"
            );
        }
    }

    /// The key a vetted call delivers.
    fn delivered_key(vetted: Vetted, original: &Frame) -> String {
        let body = vetted.body.unwrap_or_else(|| original.body.clone());
        let args = scan::map_value(&body, "args").unwrap();
        let first = scan::array_items(args, 8).unwrap()[0];
        rmp::decode::read_str_from_slice(first)
            .unwrap()
            .0
            .to_string()
    }

    #[test]
    fn a_forged_sender_in_the_assembled_body_is_refused() {
        let watch = ChunkWatch::default();
        let clean = message(&obj([(
            "args",
            Value::Array(vec![Value::Binary(vec![1; 3000])]),
        )]));
        let forged = message(&obj([
            ("args", Value::Array(vec![Value::Binary(vec![1; 3000])])),
            ("from", "ws-user-alice/x".into()),
        ]));
        for piece in [7, 1000, 100_000] {
            for reversed in [false, true] {
                assert_eq!(send(&watch, &clean, piece, reversed), Ok(()));
                let refused = send(&watch, &forged, piece, reversed).unwrap_err();
                assert!(refused.0.contains("\"from\""), "{refused}");
            }
        }
        assert!(watch.is_empty());
    }

    #[test]
    fn a_chunked_notice_only_the_server_sends_is_refused() {
        let watch = ChunkWatch::default();
        let notice = |main: Value, body: Option<Value>| {
            let mut data = encode(&main);
            if let Some(body) = body {
                data.extend(encode(&body));
            }
            data
        };
        let forged_main = notice(
            obj([
                ("type", "peer_not_found".into()),
                ("peer_id", "ws/bob".into()),
                ("session", "s1".into()),
            ]),
            None,
        );
        let forged_body = notice(
            obj([("type", "method".into()), ("method", "services.s.f".into())]),
            Some(obj([
                ("peer_id", "ws/bob".into()),
                ("type", "peer_not_found".into()),
            ])),
        );
        // A repeated key: the clients keep the last.
        let repeated = {
            let mut data = vec![0x82];
            for kind in ["method", "peer_not_found"] {
                data.extend(encode(&"type".into()));
                data.extend(encode(&kind.into()));
            }
            data
        };
        let allowed = notice(
            obj([
                ("type", "method".into()),
                ("method", "services.s.f".into()),
                ("peer_id", "peer_not_found".into()),
            ]),
            Some(obj([(
                "args",
                Value::Array(vec![obj([("type", "peer_not_found".into())])]),
            )])),
        );
        for piece in [1, 5, 4096] {
            for reversed in [false, true] {
                for forged in [&forged_main, &forged_body, &repeated] {
                    let refused = send(&watch, forged, piece, reversed).unwrap_err();
                    assert!(refused.0.contains("\"peer_not_found\""), "{refused}");
                    assert!(refused.0.contains("only the server sends"), "{refused}");
                }
                // The same words elsewhere (a value of another key, nested) are not a notice.
                assert_eq!(send(&watch, &allowed, piece, reversed), Ok(()));
            }
        }
        assert!(watch.is_empty());
    }

    #[test]
    fn senders_never_share_a_key() {
        let watch = ChunkWatch::default();
        let create = call("create", vec!["k".into(), false.into()]);
        let eve = delivered_key(vet(&watch, "ws/eve", &create).unwrap(), &create);
        let bob = delivered_key(vet(&watch, "ws/bob", &create).unwrap(), &create);
        assert!(eve.starts_with("k~") && bob.starts_with("k~") && eve != bob);
        // The attack: one sender sends a clean header, another the forged body under the same
        // key. Each lands in a namespace of its own, so they never meet at the receiver.
        let set = set("k", 1, vec![0x80]);
        assert_ne!(
            delivered_key(vet(&watch, "ws/bob", &set).unwrap(), &set),
            eve
        );
        // An answer under a session key only from that call's callee, and only one sender.
        let answer = call("create", vec!["sess".into(), true.into()]);
        assert!(vet(&watch, "ws/eve", &answer).is_err());
        let vetted = watch
            .vet("ws/eve", false, "ws/alice", &answer, |s| s == "sess")
            .unwrap();
        assert_eq!(delivered_key(vetted, &answer), "sess");
        // Even one that was sent the call too may not join a key another sender holds.
        assert!(
            watch
                .vet("ws/bob", false, "ws/alice", &answer, |s| s == "sess")
                .is_err()
        );
        // Never to a whole workspace.
        assert!(watch.vet("ws/eve", false, "ws/*", &create, none).is_err());
    }

    /// The arguments a vetted call delivers.
    fn delivered_args(vetted: Vetted, original: &Frame) -> Value {
        let body = vetted.body.unwrap_or_else(|| original.body.clone());
        let args = scan::map_value(&body, "args").unwrap();
        scan::decode(args, Limits::WALK).unwrap().0
    }

    #[test]
    fn a_message_the_server_starts_watching_starts_empty_at_its_receiver() {
        let watch = ChunkWatch::default();
        // The clients send create(key, heartbeat): whatever the receiver held under the key
        // (its cache outlives a reconnect) is overwritten, since the server scans only what
        // it sees from now on.
        let create = call("create", vec!["k".into(), false.into()]);
        let args = delivered_args(vet(&watch, "ws/eve", &create).unwrap(), &create);
        let Value::Array(args) = args else {
            panic!("{args}")
        };
        assert!(args[0].as_str().unwrap().starts_with("k~"), "{args:?}");
        assert_eq!(args[1..], [false.into(), true.into()]);
        // Once watched, a create starts afresh on both sides too, with or without overwrite:
        // the receiver may have dropped what it held (the JavaScript clients drop the oldest
        // of many messages), and would otherwise start empty while the server reads on.
        let prefix = message(&obj([("args", Value::Array(vec![]))]));
        vet(&watch, "ws/eve", &set("k", 0, prefix[..5].to_vec())).unwrap();
        let again = call("create", vec!["k".into(), false.into(), false.into()]);
        let args = delivered_args(vet(&watch, "ws/eve", &again).unwrap(), &again);
        assert_eq!(args.as_array().unwrap()[1..], [false.into(), true.into()]);
        vet(&watch, "ws/eve", &set("k", 0, prefix.clone())).unwrap();
        let process = process_of("k");
        assert!(vet(&watch, "ws/eve", &process).is_ok());
        // Extra arguments are refused (a receiver appends its own context after them); an
        // answer keeps its key and says so.
        let extra = call(
            "create",
            vec!["sess".into(), true.into(), false.into(), 9.into()],
        );
        let refused = watch
            .vet("ws/eve", false, "ws/alice", &extra, |s| s == "sess")
            .unwrap_err();
        assert!(
            refused.0.contains("takes 2 or 3 arguments, not 4"),
            "{refused}"
        );
        let answer = call("create", vec!["sess".into(), true.into(), false.into()]);
        let vetted = watch
            .vet("ws/eve", false, "ws/alice", &answer, |s| s == "sess")
            .unwrap();
        assert_eq!(
            delivered_args(vetted, &answer),
            Value::Array(vec!["sess".into(), true.into(), true.into()])
        );
        // After the receiver left (and came back), the message starts afresh again.
        watch.forget("ws/alice");
        let args = delivered_args(vet(&watch, "ws/eve", &again).unwrap(), &again);
        assert_eq!(args.as_array().unwrap()[1..], [false.into(), true.into()]);
        // A key is never a property every JavaScript object has (an answer's is used as is).
        for key in ["__proto__", "constructor", "hasOwnProperty"] {
            let create = call("create", vec![key.into(), true.into()]);
            let refused = watch
                .vet("ws/eve", false, "ws/alice", &create, |_| true)
                .unwrap_err();
            assert!(refused.0.contains("no valid key"), "{key}");
        }
    }

    fn set(key: &str, index: u64, data: Vec<u8>) -> Frame {
        call(
            "set",
            vec![key.into(), index.into(), Value::Binary(data), false.into()],
        )
    }

    #[test]
    fn what_a_sender_has_in_flight_is_bounded_lower_when_anonymous() {
        let watch = ChunkWatch::default();
        let create = call("create", vec!["k".into(), false.into()]);
        let piece = 4 << 20;
        for (sender, anonymous) in [("ws/anon", true), ("ws/user", false)] {
            watch
                .vet(sender, anonymous, "ws/alice", &create, none)
                .unwrap();
            let mut index = 0;
            // The message's main part, then 4 MiB at a time.
            let main = message(&obj([("args", Value::Array(vec![]))]));
            watch
                .vet(sender, anonymous, "ws/alice", &set("k", 0, main), none)
                .unwrap();
            let refused = loop {
                index += 1;
                let chunk = set("k", index, vec![0; piece]);
                if let Err(refused) = watch.vet(sender, anonymous, "ws/alice", &chunk, none) {
                    break refused;
                }
                assert!(index <= 70, "{sender} was never refused");
                if !anonymous && index == 70 {
                    break ChunkRefusal("not refused".into());
                }
            };
            if anonymous {
                // The main part and 63 pieces fit in 256 MiB; the 64th does not.
                assert_eq!(index, 64, "{refused}");
                assert!(refused.0.contains("at most 256 MiB"), "{refused}");
            } else {
                assert_eq!(refused.0, "not refused");
            }
        }
        // The refused message is poisoned: its process is refused and its receiver told to
        // remove what it got.
        let process = process_of("k");
        assert!(
            watch
                .vet("ws/anon", true, "ws/alice", &process, none)
                .is_err()
        );
        let orphans = watch.take_orphans();
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].receiver, "ws/alice");
        assert!(orphans[0].key.starts_with("k~"));
    }

    #[test]
    fn a_processed_message_is_charged_until_its_receiver_answers() {
        let watch = ChunkWatch::default();
        let whole = message(&obj([("args", Value::Array(vec![1.into()]))]));
        let held = || watch.lock().receivers.get("ws/alice").copied().unwrap_or(0);
        // (the sender's session, the server's, the body delivered)
        let processed = |key: &str| {
            let (process, vetted) = processed_by(&watch, "ws/eve", key);
            let vetted = vetted.unwrap();
            let own = process.field("session").unwrap().to_string();
            let server = vetted.server_session.unwrap();
            (own, server, vetted.body.unwrap())
        };
        // c is never answered.
        let ((ok, ok_server, body), (_, failed_server, _), _) =
            (processed("a"), processed("b"), processed("c"));
        let one = whole.len() as u64;
        // The sender is done with them; the receiver holds them until it answers.
        assert_eq!(watch.messages_of("ws/eve"), 0);
        assert_eq!(held(), 3 * one);
        // The receiver gets the callbacks under the server's session, which the sender never
        // chose and never sees.
        assert!(
            ok_server.starts_with('~') && ok_server.len() > 20,
            "{ok_server}"
        );
        let (body, _) = scan::decode(&body, Limits::decode(body.len(), 64, 8)).unwrap();
        let promise = crate::rpc::value::get(&body, "promise").unwrap();
        for name in ["resolve", "reject", "heartbeat"] {
            let callback = crate::rpc::value::get(promise, name).unwrap();
            let method = crate::rpc::value::get_str(callback, "_rmethod").unwrap();
            assert_eq!(method, format!("{ok_server}.{name}"));
            assert_eq!(
                crate::rpc::value::get_str(callback, "_rtarget"),
                Some("ws/eve")
            );
        }
        let restored = |from: &str, to: &str, method: String, parent: &str| {
            watch.restore(from, to, &callback_frame(from, to, &method, parent))
        };
        // The receiver's callback `name` under the server's session, as the sender gets it.
        let from_receiver = |name: &str| match restored(
            "ws/alice",
            "ws/eve",
            format!("{ok_server}.{name}"),
            &ok_server,
        ) {
            Restored::Renamed(frame) => frame,
            other => panic!("{other:?}"),
        };
        // The sender's own session settles nothing (a callback it handed the receiver).
        let own = restored("ws/alice", "ws/eve", format!("{ok}.resolve"), &ok);
        assert!(matches!(own, Restored::Unchanged), "{own:?}");
        // The server's session, from or to anyone else, is not delivered.
        for (from, to) in [("ws/bob", "ws/eve"), ("ws/alice", "ws/bob")] {
            let other = restored(from, to, format!("{ok_server}.resolve"), &ok_server);
            assert!(matches!(other, Restored::Misdirected), "{other:?}");
        }
        // A heartbeat reaches the sender under its own session, and settles nothing.
        let beat = from_receiver("heartbeat");
        assert_eq!(
            beat.field("method"),
            Some(format!("{ok}.heartbeat").as_str())
        );
        assert_eq!(beat.field("parent"), Some(ok.as_str()));
        assert_eq!(held(), 3 * one);
        // Resolved: the receiver deleted the chunks. Rejected: it kept them, and is told.
        let answer = from_receiver("resolve");
        assert_eq!(
            answer.field("method"),
            Some(format!("{ok}.resolve").as_str())
        );
        assert_eq!(held(), 2 * one);
        assert!(watch.take_orphans().is_empty());
        // Settled: a late frame naming it still reaches the sender under its own session
        // (settling nothing), and nobody else.
        let late = from_receiver("heartbeat");
        assert_eq!(late.field("parent"), Some(ok.as_str()));
        let late = restored("ws/bob", "ws/eve", format!("{ok_server}.resolve"), "");
        assert!(matches!(late, Restored::Misdirected), "{late:?}");
        assert_eq!(held(), 2 * one);
        restored(
            "ws/alice",
            "ws/eve",
            format!("{failed_server}.reject"),
            &failed_server,
        );
        let told = watch.take_orphans();
        assert_eq!(told.len(), 1);
        assert!(told[0].key.starts_with("b~"), "{told:?}");
        assert_eq!(held(), 2 * one);
        watch.released(&told[0]);
        assert_eq!(held(), one);
        // The receiver left before answering: nothing to tell, nothing held.
        watch.forget("ws/alice");
        assert_eq!(held(), 0);
        assert!(!watch.awaits_answers());
        assert!(watch.take_orphans().is_empty());
        // A process that is not a call awaiting an answer is refused, and its receiver told to
        // remove the chunks.
        staged(&watch, "ws/eve", "d", whole.clone());
        let mut data = encode(&obj([
            ("type", "method".into()),
            ("to", "ws/alice".into()),
            ("method", "services.built-in.message_cache.process".into()),
        ]));
        data.extend(encode(&obj([(
            "args",
            Value::Array(vec!["d".into(), false.into()]),
        )])));
        let unanswered = Frame::parse(Bytes::from(data)).unwrap();
        let refused = vet(&watch, "ws/eve", &unanswered).unwrap_err();
        assert!(refused.0.contains("answered"), "{refused}");
        assert_eq!(watch.take_orphans().len(), 1);
    }

    #[test]
    fn a_process_goes_out_with_a_promise_the_server_wrote() {
        let watch = ChunkWatch::default();
        let whole = message(&obj([("args", Value::Array(vec![1.into()]))]));
        let process_with = |args: Vec<Value>, promise: Option<Value>, t: Option<Value>| {
            staged(&watch, "ws/eve", "k", whole.clone());
            let mut data = encode(&obj([
                ("type", "method".into()),
                ("to", "ws/alice".into()),
                ("method", "services.built-in.message_cache.process".into()),
                ("session", "mine".into()),
            ]));
            let mut body = vec![("args".into(), Value::Array(args))];
            body.extend(promise.map(|p| ("promise".into(), p)));
            body.extend(t.map(|t| ("t".into(), t)));
            data.extend(encode(&Value::Map(body)));
            vet(&watch, "ws/eve", &Frame::parse(Bytes::from(data)).unwrap())
        };
        let args = || vec!["k".into(), false.into()];
        // What the receiver is given: callbacks to the sender under the server's session.
        let delivered = |vetted: Vetted| {
            let server = vetted.server_session.unwrap();
            let body = vetted.body.unwrap();
            let (body, _) = scan::decode(&body, Limits::decode(body.len(), 64, 8)).unwrap();
            let promise = crate::rpc::value::get(&body, "promise").unwrap().clone();
            let Value::Map(entries) = &promise else {
                panic!("{promise}")
            };
            let mut names = Vec::new();
            for (name, callback) in entries {
                let name = name.as_str().unwrap().to_string();
                if name == "interval" {
                    assert_eq!(callback.as_f64(), Some(15.0));
                    continue;
                }
                assert_eq!(
                    callback,
                    &obj([
                        ("_rtype", "method".into()),
                        ("_rtarget", "ws/eve".into()),
                        ("_rmethod", format!("{server}.{name}").into()),
                        ("_rpromise", false.into()),
                    ])
                );
                names.push(name);
            }
            names
        };
        let all = ["heartbeat", "resolve", "reject"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            delivered(process_with(args(), Some(promise("mine")), None).unwrap()),
            all
        );
        // Whatever the sender wrote: another session, another target, another kind.
        let callback = |target: &str, method: &str, kind: &str| {
            obj([
                ("_rtype", kind.into()),
                ("_rtarget", target.into()),
                ("_rmethod", method.into()),
            ])
        };
        let forged = obj([
            ("heartbeat", callback("ws/carol", "x.heartbeat", "iostream")),
            ("interval", 15.into()),
            ("resolve", callback("ws/carol", "other.resolve", "method")),
            ("reject", callback("ws/eve", "mine.reject", "iostream")),
            ("extra", 1.into()),
        ]);
        assert_eq!(
            delivered(process_with(args(), Some(forged), None).unwrap()),
            all
        );
        // `"*"`, which the receiver would write out itself (from `t`): written out here.
        let star = process_with(args(), Some("*".into()), Some(15.0.into())).unwrap();
        assert_eq!(delivered(star), all);
        // (The JavaScript client writes `t` as an integer.)
        let star = process_with(args(), Some("*".into()), Some(15.into())).unwrap();
        assert_eq!(delivered(star), all);
        // No heartbeat asked for, or at an interval no client uses: none is given.
        let two = ["resolve", "reject"].map(String::from).to_vec();
        assert_eq!(
            delivered(process_with(args(), Some("*".into()), None).unwrap()),
            two
        );
        let mut fast = promise("mine");
        if let Value::Map(entries) = &mut fast {
            entries.retain(|(k, _)| k.as_str() != Some("interval"));
            entries.push(("interval".into(), 0.001.into()));
        }
        assert_eq!(
            delivered(process_with(args(), Some(fast), None).unwrap()),
            two
        );
        // No promise, or an argument more (the JavaScript client would take it for the
        // context it appends): refused, and the receiver told to drop the chunks.
        let refused = process_with(args(), None, None).unwrap_err();
        assert!(refused.0.contains("promise"), "{refused}");
        assert_eq!(watch.take_orphans().len(), 1);
        let mut more = args();
        more.push(obj([("from", "ws-admin/x".into())]));
        more.push(0.into());
        let refused = process_with(more, Some(promise("mine")), None).unwrap_err();
        assert!(refused.0.contains("takes 2 arguments, not 4"), "{refused}");
        assert_eq!(watch.take_orphans().len(), 1);
        // Refused before its message is looked at (keyword arguments, nine arguments): the
        // same.
        let mut keywords = args();
        keywords.push(obj([("heartbeat", false.into())]));
        let refused = process_with(keywords, Some(promise("mine")), None).unwrap_err();
        assert!(refused.0.contains("positional"), "{refused}");
        assert_eq!(watch.take_orphans().len(), 1);
        let mut nine = args();
        nine.extend(std::iter::repeat_n(Value::from(0), 7));
        let refused = process_with(nine, Some(promise("mine")), None).unwrap_err();
        assert!(refused.0.contains("malformed"), "{refused}");
        assert_eq!(watch.take_orphans().len(), 1);
    }

    #[test]
    fn a_message_cache_call_cannot_travel_in_chunks() {
        // Fired at the receiver, it would pass none of a frame's checks: a nested `set` of a
        // forged message, uncharged bytes, a forged context as an extra argument.
        let watch = ChunkWatch::default();
        let mut inner = encode(&obj([
            ("type", "method".into()),
            ("method", "services.built-in.message_cache.create".into()),
        ]));
        inner.extend(encode(&obj([(
            "args",
            Value::Array(vec!["evil".into(), false.into(), true.into()]),
        )])));
        created(&watch, "k");
        vet(&watch, "ws/eve", &set("k", 0, inner)).unwrap();
        let refused = vet(&watch, "ws/eve", &process_of("k")).unwrap_err();
        assert!(
            refused.0.contains("cannot itself be sent in chunks"),
            "{refused}"
        );
        assert_eq!(watch.take_orphans().len(), 1);
    }

    #[test]
    fn a_receiver_owes_a_bounded_number_of_answers() {
        let watch = ChunkWatch::default();
        let process = |sender: &str, n: usize| processed_by(&watch, sender, &format!("k{n}")).1;
        // One sender may take up a share of what the receiver may owe...
        let eve: Vec<String> = (0..MAX_AWAITED_PER_PAIR)
            .map(|n| process("ws/eve", n).unwrap().server_session.unwrap())
            .collect();
        let refused = process("ws/eve", MAX_AWAITED_PER_PAIR).unwrap_err();
        assert!(refused.0.contains("of this sender's"), "{refused}");
        assert_eq!(watch.take_orphans().len(), 1);
        // ...and all of them together the whole of it.
        let mut servers = eve.clone();
        let senders = MAX_AWAITED_PER_RECEIVER / MAX_AWAITED_PER_PAIR;
        for s in 1..senders {
            for n in 0..MAX_AWAITED_PER_PAIR {
                let vetted = process(&format!("ws/s{s}"), n).unwrap();
                servers.push(vetted.server_session.unwrap());
            }
        }
        let refused = process("ws/last", 0).unwrap_err();
        assert!(refused.0.contains("not answered 1024"), "{refused}");
        assert_eq!(watch.take_orphans().len(), 1);
        // One answer makes room for one more.
        let answer = callback_frame("ws/alice", "ws/eve", &format!("{}.resolve", eve[0]), "");
        assert!(matches!(
            watch.restore("ws/alice", "ws/eve", &answer),
            Restored::Renamed(_)
        ));
        process("ws/eve", MAX_AWAITED_PER_PAIR + 1).unwrap();
        assert!(process("ws/last", 1).is_err());
        // Its sessions are all different.
        let distinct: HashSet<&String> = servers.iter().collect();
        assert_eq!(distinct.len(), servers.len());
    }

    #[test]
    fn every_server_session_a_frame_names_is_looked_at() {
        let watch = ChunkWatch::default();
        let processed = |key: &str| {
            let (process, vetted) = processed_by(&watch, "ws/eve", key);
            let vetted = vetted.unwrap();
            (
                process.field("session").unwrap().to_string(),
                vetted.server_session.unwrap(),
            )
        };
        let (own, live) = processed("a");
        // A stale-looking first field does not hide a live session in the next one.
        let frame = callback_frame("ws/alice", "ws/bob", "~stale.x", &live);
        assert!(matches!(
            watch.restore("ws/alice", "ws/bob", &frame),
            Restored::Misdirected
        ));
        // Between the right pair, both the stale name and the live one: the live one renamed.
        let frame = callback_frame("ws/alice", "ws/eve", "~stale.x", &live);
        let Restored::Renamed(renamed) = watch.restore("ws/alice", "ws/eve", &frame) else {
            panic!("not renamed")
        };
        assert_eq!(renamed.field("method"), Some("~stale.x"));
        assert_eq!(renamed.field("parent"), Some(own.as_str()));
        // A process that reached no instance: its sender hears its own session, and nothing
        // stays awaited or held.
        assert_eq!(watch.undelivered(&live), Some(own));
        assert_eq!(watch.undelivered(&live), None);
        assert_eq!(watch.undelivered("mine"), None);
        assert!(!watch.awaits_answers());
        assert_eq!(watch.lock().receivers.get("ws/alice"), None);
        // A sender that left will not see its receiver's answer here: the receiver is told
        // to drop the message, and owes nothing any more.
        let (_, left) = processed("b");
        watch.forget("ws/eve");
        assert!(!watch.awaits_answers());
        assert!(watch.lock().owed.is_empty() && watch.lock().awaited_by.is_empty());
        let told = watch.take_orphans();
        assert_eq!(told.len(), 1, "{left}");
        assert!(told[0].key.starts_with("b~"));
    }

    #[test]
    fn settled_sessions_are_remembered_a_bounded_while() {
        let watch = ChunkWatch::default();
        let mut first = None;
        for n in 0..=MAX_SETTLED {
            let (_, vetted) = processed_by(&watch, "ws/eve", "k");
            let server = vetted.unwrap().server_session.unwrap();
            let answer = callback_frame("ws/alice", "ws/eve", &format!("{server}.resolve"), "");
            assert!(matches!(
                watch.restore("ws/alice", "ws/eve", &answer),
                Restored::Renamed(_)
            ));
            first.get_or_insert(server);
            assert!(watch.lock().settled.len() <= MAX_SETTLED, "{n}");
        }
        assert!(!watch.awaits_answers() && watch.names_sessions());
        // The oldest went first: a frame naming it is not looked up any more.
        let first = first.unwrap();
        let late = callback_frame("ws/bob", "ws/eve", &format!("{first}.resolve"), "");
        assert!(matches!(
            watch.restore("ws/bob", "ws/eve", &late),
            Restored::Unchanged
        ));
    }

    /// Starts message `key` from `ws/eve` to `ws/alice`.
    fn created(watch: &ChunkWatch, key: &str) {
        let create = call("create", vec![key.into(), false.into()]);
        vet(watch, "ws/eve", &create).unwrap();
    }

    #[test]
    fn the_heartbeat_flag_says_whether_the_message_is_an_answer() {
        // The clients look a true heartbeat up as a session of theirs and throw without one,
        // keeping the chunks: a sender's message takes false, an answer true.
        let watch = ChunkWatch::default();
        created(&watch, "k");
        let append = |flag: bool| {
            call(
                "append",
                vec!["k".into(), Value::Binary(vec![0x80]), flag.into()],
            )
        };
        let refused = vet(&watch, "ws/eve", &append(true)).unwrap_err();
        assert!(
            refused.0.contains("heartbeat argument must be false"),
            "{refused}"
        );
        created(&watch, "k");
        vet(&watch, "ws/eve", &append(false)).unwrap();
        let refused = vet(
            &watch,
            "ws/eve",
            &call("process", vec!["k".into(), true.into()]),
        )
        .unwrap_err();
        assert!(refused.0.contains("heartbeat"), "{refused}");
        let answer = call("create", vec!["sess".into(), true.into()]);
        watch
            .vet("ws/eve", false, "ws/alice", &answer, |s| s == "sess")
            .unwrap();
        let set = set("sess", 0, vec![0x80]);
        let refused = watch
            .vet("ws/eve", false, "ws/alice", &set, |s| s == "sess")
            .unwrap_err();
        assert!(refused.0.contains("must be true"), "{refused}");
    }

    #[test]
    fn only_a_chunked_answer_ends_the_call_it_is_sent_under() {
        // Sent under the receiver's call `sess`: its answer (resolve or reject), or a callback
        // the receiver passed in that call, called with much data (not an answer).
        for (method, answers) in [
            ("sess.resolve", Some(false)),
            ("sess.reject", Some(true)),
            ("sess.cb1", None),
            ("sessx.resolve", None),
        ] {
            let watch = ChunkWatch::default();
            let awaited = |s: &str| s == "sess";
            let create = call("create", vec!["sess".into(), true.into()]);
            watch
                .vet("ws/eve", false, "ws/alice", &create, awaited)
                .unwrap();
            let mut whole = encode(&obj([("type", "method".into()), ("method", method.into())]));
            whole.extend(encode(&obj([("args", Value::Array(vec![1.into()]))])));
            let set = call(
                "set",
                vec!["sess".into(), 0.into(), Value::Binary(whole), true.into()],
            );
            watch
                .vet("ws/eve", false, "ws/alice", &set, awaited)
                .unwrap();
            let process = call("process", vec!["sess".into(), true.into()]);
            let vetted = watch
                .vet("ws/eve", false, "ws/alice", &process, awaited)
                .unwrap();
            assert_eq!(
                vetted.answers,
                answers.map(|rejects| ("sess".to_string(), rejects)),
                "{method}"
            );
            // The receiver's instance reads the same from the session it is delivered under.
            let server = vetted.server_session.unwrap();
            assert_eq!(chunked_answer_in(&server), answers, "{method}");
            assert_eq!(server.len(), 25);
        }
        // A message in the sender's own namespace answers nothing, whatever it assembles.
        let watch = ChunkWatch::default();
        let whole = encode(&obj([
            ("type", "method".into()),
            ("method", "k.resolve".into()),
        ]));
        staged(&watch, "ws/eve", "k", whole);
        let vetted = vet(&watch, "ws/eve", &process_of("k")).unwrap();
        assert_eq!(vetted.answers, None);
        assert_eq!(chunked_answer_in(&vetted.server_session.unwrap()), None);
        assert_eq!(chunked_answer_in("sess"), None);
    }

    /// Starts message `key` from `sender` to `target` and sends `pieces` chunks of `piece`
    /// bytes after its main part; the first refusal, if any.
    fn fill(
        watch: &ChunkWatch,
        (sender, anonymous): (&str, bool),
        target: &str,
        key: &str,
        pieces: u64,
        piece: usize,
    ) -> Result<(), ChunkRefusal> {
        let create = call("create", vec![key.into(), false.into()]);
        watch.vet(sender, anonymous, target, &create, none)?;
        let main = message(&obj([("args", Value::Array(vec![]))]));
        watch.vet(sender, anonymous, target, &set(key, 0, main), none)?;
        for index in 1..=pieces {
            let chunk = set(key, index, vec![0; piece]);
            watch.vet(sender, anonymous, target, &chunk, none)?;
        }
        Ok(())
    }

    #[test]
    fn what_receivers_hold_stays_charged_until_they_are_told_and_is_bounded_per_receiver() {
        let watch = ChunkWatch::default();
        let anon = ("ws/anon", true);
        let piece = 16 << 20;
        let whole = (MAX_BYTES_PER_ANONYMOUS_SENDER as usize / piece - 1) as u64;
        fill(&watch, anon, "ws/alice", "k", whole, piece).unwrap();
        // Its sender leaves: the receiver still holds the bytes until the remove is out, and
        // the sender (the same address, back) may not send more meanwhile.
        watch.forget("ws/anon");
        let orphans = watch.take_orphans();
        assert_eq!(orphans.len(), 1);
        let refused = fill(&watch, anon, "ws/alice", "k2", 2, piece).unwrap_err();
        assert!(refused.0.contains("at most 256 MiB"), "{refused}");
        watch.released(&orphans[0]);
        fill(&watch, anon, "ws/alice", "k3", 2, piece).unwrap();
        // Many senders, one receiver: at most MAX_BYTES_PER_RECEIVER in all.
        let piece = 64 << 20;
        let per_sender = (MAX_BYTES_PER_SENDER as usize / piece) as u64 - 1;
        fill(&watch, ("ws/a", false), "ws/bob", "k", per_sender, piece).unwrap();
        fill(&watch, ("ws/b", false), "ws/bob", "k", per_sender, piece).unwrap();
        let refused = fill(&watch, ("ws/c", false), "ws/bob", "k", 4, piece).unwrap_err();
        assert!(
            refused.0.contains("receiver holds too many bytes"),
            "{refused}"
        );
        fill(&watch, ("ws/c", false), "ws/carol", "k", 4, piece).unwrap();
        // Processed, removed or overwritten, it is released at once.
        let remove = call("remove", vec!["k".into()]);
        watch.vet("ws/a", false, "ws/bob", &remove, none).unwrap();
        fill(&watch, ("ws/c", false), "ws/bob", "k2", 4, piece).unwrap();
        // Bob holds b's message, c's first (one piece got in before he was full) and second;
        // c has those two and carol's.
        let main = message(&obj([("args", Value::Array(vec![]))])).len() as u64;
        let state = watch.lock();
        assert_eq!(
            state.receivers["ws/bob"],
            (per_sender + 1 + 4) * piece as u64 + 3 * main
        );
        assert_eq!(state.senders["ws/c"].messages, 3);
    }

    #[test]
    fn receivers_are_told_to_remove_what_the_server_forgets() {
        let watch = ChunkWatch::default();
        let create = call("create", vec!["k".into(), false.into()]);
        let whole = message(&obj([("args", Value::Array(vec![1.into()]))]));
        let started = |sender: &str| {
            let key = delivered_key(vet(&watch, sender, &create).unwrap(), &create);
            vet(&watch, sender, &set("k", 0, whole[..3].to_vec())).unwrap();
            key
        };
        // Processed or removed by its sender: the receiver needs no word.
        started("ws/a");
        vet(&watch, "ws/a", &set("k", 1, whole[3..].to_vec())).unwrap();
        vet(&watch, "ws/a", &process_of("k")).unwrap();
        started("ws/b");
        vet(&watch, "ws/b", &call("remove", vec!["k".into()])).unwrap();
        assert!(watch.take_orphans().is_empty());
        // Refused at process (incomplete), or its sender left: the receiver is told.
        let c = started("ws/c");
        assert!(vet(&watch, "ws/c", &process_of("k")).is_err());
        let d = started("ws/d");
        watch.forget("ws/d");
        let told: Vec<(String, String)> = watch
            .take_orphans()
            .into_iter()
            .map(|o| (o.receiver, o.key))
            .collect();
        assert_eq!(
            told,
            [("ws/alice".to_string(), c), ("ws/alice".to_string(), d)]
        );
        // The receiver left: nothing to tell.
        started("ws/e");
        watch.forget("ws/alice");
        assert!(watch.is_empty());
        assert!(watch.take_orphans().is_empty());
        // The call that tells it, as the manager's, with no answer asked for.
        let frame =
            Frame::parse(remove_frame("*/manager-x", "ws/alice", "k~1", &Value::Nil)).unwrap();
        assert_eq!(
            frame.field("method"),
            Some("services.built-in.message_cache.remove")
        );
        assert_eq!(frame.field("from"), Some("*/manager-x"));
        assert_eq!(frame.field("ws"), Some("ws"));
        assert!(scan::map_value(&frame.body, "promise").is_none());
    }

    #[test]
    fn chunks_that_bypass_the_watch_are_refused() {
        let watch = ChunkWatch::default();
        let set = set("k", 0, vec![0x80]);
        assert!(vet(&watch, "ws/eve", &set).is_err());
        assert!(vet(&watch, "ws/eve", &process_of("k")).is_err());
        let odd = call("set.__call__", vec![]);
        assert!(vet(&watch, "ws/eve", &odd).is_err());
        let keywords = call(
            "create",
            vec![obj([("key", "k".into()), ("_rkwargs", true.into())])],
        );
        assert!(vet(&watch, "ws/eve", &keywords).is_err());
        // A chunk overwritten after it was read would change what the server vetted.
        vet(
            &watch,
            "ws/eve",
            &call("create", vec!["k".into(), false.into()]),
        )
        .unwrap();
        vet(&watch, "ws/eve", &set).unwrap();
        assert!(vet(&watch, "ws/eve", &set).is_err());
        assert!(vet(&watch, "ws/eve", &process_of("k")).is_err());
    }
}
