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
//! otherwise. So the bytes a sender may have in flight are bounded (lower for anonymous
//! senders), and when the server forgets a message that was not processed (its sender left,
//! it went idle, its `process` was refused) the receiver is told to remove it
//! ([`ChunkWatch::take_orphans`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::rpc::frame::Frame;
use crate::rpc::scan::{self, Limits, Scanner};

/// Messages one sender may have in flight to all its targets.
const MAX_MESSAGES_PER_SENDER: usize = 64;
/// Chunks that arrived ahead of their turn, held per sender until the gap fills.
const MAX_EARLY_BYTES_PER_SENDER: usize = 16 * 1024 * 1024;
/// Bytes of unprocessed chunks one sender may have delivered to all its targets: what its
/// receivers hold for it.
pub const MAX_BYTES_PER_SENDER: u64 = 1 << 30;
/// The same for an anonymous sender (the clients' own tests send a 64 MiB array, and get it
/// back, as anonymous users).
pub const MAX_BYTES_PER_ANONYMOUS_SENDER: u64 = 256 << 20;
/// Forgotten messages whose receivers have not been told yet; past this (a burst of many
/// thousand senders leaving at once) the receivers keep them.
const MAX_ORPHANS: usize = 1 << 16;
/// A message not touched for this long is forgotten (its `process` is then refused).
const IDLE_LIMIT: Duration = Duration::from_secs(600);
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
            scanner: Scanner::new(Limits::WALK, Some(1)),
            received: 0,
            next: 0,
            early: BTreeMap::new(),
            touched: Instant::now(),
            poisoned: None,
            main: Some(Vec::new()),
            bytes: 0,
        }
    }

    fn early_bytes(&self) -> usize {
        self.early.values().map(Bytes::len).sum()
    }

    /// Takes chunk `index`; scans it now if its turn has come.
    fn chunk(&mut self, index: u64, data: Bytes, early_room: usize) -> Result<(), ChunkRefusal> {
        self.received += 1;
        if index < self.next || self.early.contains_key(&index) {
            return Err(format!("chunk {index} of this message was already sent").into());
        }
        if index > self.next {
            if data.len() > early_room {
                return Err("too many chunks arrived ahead of their turn".into());
            }
            self.bytes += data.len() as u64;
            self.early.insert(index, data);
            return Ok(());
        }
        self.bytes += data.len() as u64;
        self.scan(&data)?;
        self.next += 1;
        while let Some(data) = self.early.remove(&self.next) {
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
#[derive(Default)]
pub struct ChunkWatch {
    messages: Mutex<HashMap<Key, Watched>>,
    /// Messages forgotten unprocessed, whose receivers are to remove them.
    orphans: Mutex<Vec<Key>>,
    /// Wakes whoever tells the receivers.
    orphaned: tokio::sync::Notify,
    /// Keys the namespace suffixes of this instance: a sender cannot compute another's.
    suffixes: std::hash::RandomState,
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
    /// Deliver it with this body (the key put in the sender's namespace); `None`: as it came.
    pub body: Option<Bytes>,
    /// The `process` of a chunked call: the session the receiver may answer it under.
    pub call_session: Option<String>,
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

    fn key(&self) -> Result<String, ChunkRefusal> {
        self.items
            .first()
            .and_then(|item| rmp::decode::read_str_from_slice(item).ok())
            .map(|(s, _)| s.to_string())
            .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
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
        let base = self.body.as_ptr() as usize;
        let start = self.args.as_ptr() as usize - base;
        let end = start + self.args.len();
        let mut out = Vec::with_capacity(self.body.len() + key.len() + 8);
        out.extend_from_slice(&self.body[..start]);
        let _ = rmp::encode::write_array_len(&mut out, 3);
        let _ = rmp::encode::write_str(&mut out, key);
        let _ = rmp::encode::write_bool(&mut out, answer);
        let _ = rmp::encode::write_bool(&mut out, true);
        out.extend_from_slice(&self.body[end..]);
        Bytes::from(out)
    }

    /// The body with the key (the first argument) replaced.
    fn with_key(&self, key: &str) -> Bytes {
        let base = self.body.as_ptr() as usize;
        let first = self.items[0];
        let start = first.as_ptr() as usize - base;
        let end = start + first.len();
        let mut out = Vec::with_capacity(self.body.len() + 32);
        out.extend_from_slice(&self.body[..start]);
        let _ = rmp::encode::write_str(&mut out, key);
        out.extend_from_slice(&self.body[end..]);
        Bytes::from(out)
    }
}

impl ChunkWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Watched>> {
        self.messages.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key `sender`'s message `key` is delivered under.
    fn namespaced(&self, sender: &str, key: &str) -> String {
        use std::hash::BuildHasher;
        format!("{key}~{:016x}", self.suffixes.hash_one(sender))
    }

    /// Looks at a frame from `sender` to `target`; `Err` says why it must not be delivered.
    /// `answers(session)` says whether the sender was sent the target's call `session` (a
    /// chunked answer goes under that session's key); an anonymous sender may have fewer
    /// bytes in flight.
    pub fn vet(
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
        let key = args.key()?;
        let namespaced = self.namespaced(sender, &key);
        let mut messages = self.lock();
        // The message this call is about: in the sender's namespace, or under the session key
        // of an answer this sender is sending.
        let mine = |messages: &HashMap<Key, Watched>| {
            let spaced = (target.to_string(), namespaced.clone());
            if messages.contains_key(&spaced) {
                return Some(spaced);
            }
            let plain = (target.to_string(), key.clone());
            messages
                .get(&plain)
                .filter(|w| w.sender == sender)
                .map(|_| plain)
        };
        let delivered = |watched_key: &Key, namespaced_key: bool| Vetted {
            body: namespaced_key.then(|| args.with_key(&watched_key.1)),
            call_session: None,
        };
        // A message the server starts watching starts empty at its receiver too.
        let fresh = |watched_key: &Key, answer: bool| Vetted {
            body: Some(args.with_fresh_create(&watched_key.1, answer)),
            call_session: None,
        };
        match op {
            Op::Create => {
                let answer = args.flag(1);
                let overwrite = args.flag(2);
                let slot: Key = if answer {
                    // The key is the receiver's session: only its callee answers under it.
                    if !answers(&key) {
                        return Err("a chunked answer goes under the session of a call to its sender, and this is none".into());
                    }
                    (target.to_string(), key.clone())
                } else {
                    (target.to_string(), namespaced.clone())
                };
                if let Some(existing) = messages.get_mut(&slot) {
                    if existing.sender != sender {
                        return Err("another sender is using this message key".into());
                    }
                    // Without overwrite the client refuses and keeps what it has; so do we.
                    if !overwrite {
                        return Ok(delivered(&slot, !answer));
                    }
                    *existing = Watched::new(sender, !answer);
                    return Ok(fresh(&slot, answer));
                }
                self.sweep_locked(&mut messages);
                if messages.values().filter(|w| w.sender == sender).count()
                    >= MAX_MESSAGES_PER_SENDER
                {
                    return Err(format!(
                        "too many chunked messages in flight (at most {MAX_MESSAGES_PER_SENDER})"
                    )
                    .into());
                }
                messages.insert(slot.clone(), Watched::new(sender, !answer));
                Ok(fresh(&slot, answer))
            }
            Op::Append | Op::Set => {
                let (early_held, held) = messages
                    .values()
                    .filter(|w| w.sender == sender)
                    .fold((0, 0), |(early, all), w| {
                        (early + w.early_bytes(), all + w.bytes)
                    });
                let Some(slot) = mine(&messages) else {
                    return Err("this chunked message was not created through the server".into());
                };
                let Some(watched) = messages.get_mut(&slot) else {
                    return Err("this chunked message was not created through the server".into());
                };
                watched.touched = Instant::now();
                let room = MAX_EARLY_BYTES_PER_SENDER.saturating_sub(early_held);
                let max_bytes = if anonymous {
                    MAX_BYTES_PER_ANONYMOUS_SENDER
                } else {
                    MAX_BYTES_PER_SENDER
                };
                let size = |data: &Bytes| -> Result<(), ChunkRefusal> {
                    if held + data.len() as u64 > max_bytes {
                        return Err(format!(
                            "too many bytes of chunked messages in flight from this sender (at most {} MiB); process or remove some first",
                            max_bytes >> 20
                        )
                        .into());
                    }
                    Ok(())
                };
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
                    watched.early.clear();
                }
                let namespaced_key = watched.namespaced;
                outcome.map(|()| delivered(&slot, namespaced_key))
            }
            Op::Process => {
                let slot = mine(&messages).ok_or_else(|| {
                    "this chunked message was not created through the server".to_string()
                })?;
                let Some(watched) = messages.remove(&slot) else {
                    return Err("this chunked message was not created through the server".into());
                };
                if let Err(refused) = watched.verdict() {
                    // Its chunks went through; its `process` will not.
                    drop(messages);
                    self.orphan(vec![slot]);
                    return Err(refused);
                }
                Ok(Vetted {
                    call_session: watched.call_session(),
                    ..delivered(&slot, watched.namespaced)
                })
            }
            Op::Remove => match mine(&messages) {
                Some(slot) => {
                    let namespaced_key = messages.remove(&slot).is_some_and(|w| w.namespaced);
                    Ok(delivered(&slot, namespaced_key))
                }
                None => Err("this chunked message was not created through the server".into()),
            },
        }
    }

    /// Forgets the messages of a client that left: those it sent (their receivers are to
    /// remove them) and those sent to it.
    pub(crate) fn forget(&self, client: &str) {
        let mut messages = self.lock();
        let mut gone = Vec::new();
        messages.retain(|key, w| {
            if key.0 == client {
                return false;
            }
            let keep = w.sender != client;
            if !keep {
                gone.push(key.clone());
            }
            keep
        });
        drop(messages);
        self.orphan(gone);
    }

    /// Forgets the messages nobody touched for [`IDLE_LIMIT`] (their receivers are to remove
    /// them).
    pub(crate) fn sweep(&self) {
        self.sweep_locked(&mut self.lock());
    }

    fn sweep_locked(&self, messages: &mut HashMap<Key, Watched>) {
        let mut idle = Vec::new();
        messages.retain(|key, w| {
            let keep = w.touched.elapsed() < IDLE_LIMIT;
            if !keep {
                idle.push(key.clone());
            }
            keep
        });
        self.orphan(idle);
    }

    fn orphan(&self, keys: Vec<Key>) {
        if keys.is_empty() {
            return;
        }
        let mut orphans = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_ORPHANS.saturating_sub(orphans.len());
        if keys.len() > room {
            tracing::warn!(
                dropped = keys.len() - room,
                "too many forgotten chunked messages at once: their receivers keep some"
            );
        }
        orphans.extend(keys.into_iter().take(room));
        drop(orphans);
        self.orphaned.notify_one();
    }

    /// The messages forgotten unprocessed since the last call, as (receiver, key as
    /// delivered): each receiver still holds the chunks and is to be told to remove them.
    pub(crate) fn take_orphans(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.orphans.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits until a message is forgotten unprocessed.
    pub(crate) async fn orphaned(&self) {
        self.orphaned.notified().await;
    }

    /// Messages being watched now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

    fn call(function: &str, args: Vec<Value>) -> Frame {
        let header = obj([
            ("type", "method".into()),
            ("to", "ws/alice".into()),
            (
                "method",
                format!("services.built-in.message_cache.{function}").into(),
            ),
        ]);
        let mut data = encode(&header);
        data.extend(encode(&obj([("args", Value::Array(args))])));
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
        vet(
            watch,
            "ws/eve",
            &call("process", vec!["k".into(), false.into()]),
        )
        .map(|_| ())
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
            let done = vet(
                &watch,
                "ws/eve",
                &call("process", vec!["k".into(), false.into()]),
            );
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
        let set = call("set", vec!["k".into(), 1.into(), Value::Binary(vec![0x80])]);
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
        // Once watched, a create without overwrite is the client's own refusal to make, and
        // leaves both sides as they were; with overwrite both start afresh.
        let again = call("create", vec!["k".into(), false.into(), false.into()]);
        let args = delivered_args(vet(&watch, "ws/eve", &again).unwrap(), &again);
        assert_eq!(args.as_array().unwrap()[1..], [false.into(), false.into()]);
        let overwrite = call("create", vec!["k".into(), false.into(), true.into()]);
        let args = delivered_args(vet(&watch, "ws/eve", &overwrite).unwrap(), &overwrite);
        assert_eq!(args.as_array().unwrap()[1..], [false.into(), true.into()]);
        // Extra arguments go; an answer keeps its key and says so.
        let answer = call(
            "create",
            vec!["sess".into(), true.into(), false.into(), 9.into()],
        );
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
        let process = call("process", vec!["k".into(), false.into()]);
        assert!(
            watch
                .vet("ws/anon", true, "ws/alice", &process, none)
                .is_err()
        );
        let orphans = watch.take_orphans();
        assert_eq!(orphans.len(), 1);
        assert_eq!(orphans[0].0, "ws/alice");
        assert!(orphans[0].1.starts_with("k~"));
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
        vet(&watch, "ws/a", &call("process", vec!["k".into()])).unwrap();
        started("ws/b");
        vet(&watch, "ws/b", &call("remove", vec!["k".into()])).unwrap();
        assert!(watch.take_orphans().is_empty());
        // Refused at process (incomplete), or its sender left: the receiver is told.
        let c = started("ws/c");
        assert!(vet(&watch, "ws/c", &call("process", vec!["k".into()])).is_err());
        let d = started("ws/d");
        watch.forget("ws/d");
        assert_eq!(
            watch.take_orphans(),
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
        let set = call(
            "set",
            vec![
                "k".into(),
                0.into(),
                Value::Binary(vec![0x80]),
                false.into(),
            ],
        );
        assert!(vet(&watch, "ws/eve", &set).is_err());
        assert!(vet(&watch, "ws/eve", &call("process", vec!["k".into()])).is_err());
        let odd = call("set.__call__", vec![]);
        assert!(vet(&watch, "ws/eve", &odd).is_err());
        let keywords = call(
            "create",
            vec![obj([("key", "k".into()), ("_rkwargs", true.into())])],
        );
        assert!(vet(&watch, "ws/eve", &keywords).is_err());
        // A chunk overwritten after it was read would change what the server vetted.
        vet(&watch, "ws/eve", &call("create", vec!["k".into()])).unwrap();
        vet(&watch, "ws/eve", &set).unwrap();
        assert!(vet(&watch, "ws/eve", &set).is_err());
        assert!(vet(&watch, "ws/eve", &call("process", vec!["k".into()])).is_err());
    }
}
