//! Chunked messages between clients (`services.built-in.message_cache.*` calls). A receiving
//! client reassembles the chunks and merges the message's body over the trusted context of the
//! `process` call, so a body naming another sender (`from`, `user`, `ctx`...) would pass for
//! that sender. The server relays every chunk: it reads them as they pass, without keeping
//! them, and refuses the `process` of a message whose assembled body it cannot vouch for.

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
/// A message not touched for this long is forgotten (its `process` is then refused).
const IDLE_LIMIT: Duration = Duration::from_secs(600);
const MAX_KEY_LEN: usize = 256;

/// (sender, target, key).
type Key = (String, String, String);

struct Watched {
    scanner: Scanner,
    /// Chunks received, whatever their index (what `append` numbers the next one).
    received: u64,
    /// The next index the scanner waits for.
    next: u64,
    early: BTreeMap<u64, Bytes>,
    touched: Instant,
    /// Set when the message can no longer be vouched for; its `process` is refused.
    poisoned: Option<String>,
}

impl Watched {
    fn new() -> Self {
        Self {
            scanner: Scanner::new(Limits::WALK, Some(1)),
            received: 0,
            next: 0,
            early: BTreeMap::new(),
            touched: Instant::now(),
            poisoned: None,
        }
    }

    fn early_bytes(&self) -> usize {
        self.early.values().map(Bytes::len).sum()
    }

    /// Takes chunk `index`; scans it now if its turn has come.
    fn chunk(&mut self, index: u64, data: Bytes, early_room: usize) -> Result<(), String> {
        self.received += 1;
        if index < self.next || self.early.contains_key(&index) {
            return Err(format!("chunk {index} of this message was already sent"));
        }
        if index > self.next {
            if data.len() > early_room {
                return Err("too many chunks arrived ahead of their turn".into());
            }
            self.early.insert(index, data);
            return Ok(());
        }
        self.scan(&data)?;
        self.next += 1;
        while let Some(data) = self.early.remove(&self.next) {
            self.scan(&data)?;
            self.next += 1;
        }
        Ok(())
    }

    fn scan(&mut self, data: &[u8]) -> Result<(), String> {
        // Past the body (the second object) nothing is merged: no need to read on.
        if self.scanner.objects() >= 2 {
            return Ok(());
        }
        self.scanner
            .run(data, 2)
            .map(|_| ())
            .map_err(|e| format!("the chunked message is not valid msgpack: it {e}"))
    }

    /// Whether the message, as sent so far, is complete and merges nothing the server sets.
    fn verdict(&self) -> Result<(), String> {
        if let Some(reason) = &self.poisoned {
            return Err(reason.clone());
        }
        if !self.early.is_empty() {
            return Err("chunks of this message are missing".into());
        }
        match self.scanner.objects() {
            0 => Err("the chunked message is incomplete".into()),
            1 if self.scanner.at_boundary() => Ok(()),
            1 => Err("the chunked message ends in the middle of its body".into()),
            _ => scan::verdict(&self.scanner).map_err(|e| e.to_string()),
        }
    }
}

/// The chunked messages in flight through this instance, by sender, target and key.
#[derive(Default)]
pub struct ChunkWatch {
    messages: Mutex<HashMap<Key, Watched>>,
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

/// The arguments of a `message_cache` call: positional items, or keywords.
struct CallArgs<'a> {
    body: &'a Bytes,
    positional: Vec<&'a [u8]>,
    kwargs: Option<rmpv::Value>,
}

impl CallArgs<'_> {
    fn read(body: &Bytes) -> Result<CallArgs<'_>, String> {
        let bad = || "the message_cache call has malformed arguments".to_string();
        let mut positional = match scan::map_value(body, "args") {
            Some(args) => scan::array_items(args, 8).ok_or_else(bad)?,
            None => Vec::new(),
        };
        let with_kwargs = scan::map_value(body, "with_kwargs") == Some(&[0xc3][..]);
        let last_is_map = positional
            .last()
            .is_some_and(|last| matches!(last.first(), Some(0x80..=0x8f | 0xde | 0xdf)));
        let mut kwargs = None;
        if last_is_map && let Some(last) = positional.last() {
            let limits = Limits::decode(last.len(), 64, 4);
            let (value, _) = scan::decode(last, limits).map_err(|_| bad())?;
            let marked = crate::rpc::value::get(&value, "_rkwargs").and_then(rmpv::Value::as_bool)
                == Some(true);
            if with_kwargs || marked {
                positional.pop();
                kwargs = Some(value);
            }
        }
        Ok(CallArgs {
            body,
            positional,
            kwargs,
        })
    }

    fn keyword(&self, name: &str) -> Option<&rmpv::Value> {
        self.kwargs
            .as_ref()
            .and_then(|k| crate::rpc::value::get(k, name))
    }

    fn key(&self) -> Result<String, String> {
        let text = match self.positional.first() {
            Some(item) => rmp::decode::read_str_from_slice(item)
                .ok()
                .map(|(s, _)| s.to_string()),
            None => self
                .keyword("key")
                .and_then(rmpv::Value::as_str)
                .map(str::to_string),
        };
        text.filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
            .ok_or_else(|| "the message_cache call names no valid key".to_string())
    }

    fn index(&self, at: usize) -> Result<u64, String> {
        let value = match self.positional.get(at) {
            Some(item) => scan::decode(item, Limits::decode(item.len(), 1, 1))
                .ok()
                .and_then(|(v, _)| v.as_u64()),
            None => self.keyword("index").and_then(rmpv::Value::as_u64),
        };
        value.ok_or_else(|| "the message_cache call has no valid index".to_string())
    }

    fn data(&self, at: usize) -> Result<Bytes, String> {
        let data = match self.positional.get(at) {
            Some(item) => scan::binary_payload(item).map(|p| self.body.slice_ref(p)),
            None => match self.keyword("data") {
                Some(rmpv::Value::Binary(b)) => Some(Bytes::copy_from_slice(b)),
                _ => None,
            },
        };
        data.ok_or_else(|| "the message_cache call carries no bytes".to_string())
    }

    fn flag(&self, at: usize, name: &str) -> bool {
        match self.positional.get(at) {
            Some(item) => *item == [0xc3],
            None => self.keyword(name).and_then(rmpv::Value::as_bool) == Some(true),
        }
    }
}

impl ChunkWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Watched>> {
        self.messages.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks at a frame from `sender` to `target`; `Err` says why it must not be delivered.
    /// Frames that are not `message_cache` calls pass untouched.
    pub fn vet(&self, sender: &str, target: &str, frame: &Frame) -> Result<(), String> {
        let Some(method) = frame.field("method") else {
            return Ok(());
        };
        let Some(rest) = method.strip_prefix("services.built-in.message_cache") else {
            return Ok(());
        };
        let op = match rest {
            ".create" => Op::Create,
            ".append" => Op::Append,
            ".set" => Op::Set,
            ".process" => Op::Process,
            ".remove" => Op::Remove,
            _ => return Err(format!("{method} is not a message_cache function")),
        };
        if scan::map_value(&frame.body, "_enc").is_some() {
            return Err("message_cache calls cannot be end-to-end encrypted: the server vets what they assemble".into());
        }
        let args = CallArgs::read(&frame.body)?;
        let key = (sender.to_string(), target.to_string(), args.key()?);
        let mut messages = self.lock();
        match op {
            Op::Create => {
                let overwrite = args.flag(2, "overwrite");
                if let Some(existing) = messages.get_mut(&key) {
                    // Without overwrite the client refuses and keeps what it has; so do we.
                    if overwrite {
                        *existing = Watched::new();
                    }
                    return Ok(());
                }
                messages.retain(|_, w| w.touched.elapsed() < IDLE_LIMIT);
                if messages.keys().filter(|(s, _, _)| s == sender).count()
                    >= MAX_MESSAGES_PER_SENDER
                {
                    return Err(format!(
                        "too many chunked messages in flight (at most {MAX_MESSAGES_PER_SENDER})"
                    ));
                }
                messages.insert(key, Watched::new());
                Ok(())
            }
            Op::Append | Op::Set => {
                let early_held: usize = messages
                    .iter()
                    .filter(|((s, _, _), _)| s == sender)
                    .map(|(_, w)| w.early_bytes())
                    .sum();
                let Some(watched) = messages.get_mut(&key) else {
                    return Err("this chunked message was not created through the server".into());
                };
                watched.touched = Instant::now();
                let outcome = if op == Op::Append {
                    args.data(1).and_then(|data| {
                        watched.chunk(
                            watched.received,
                            data,
                            MAX_EARLY_BYTES_PER_SENDER.saturating_sub(early_held),
                        )
                    })
                } else {
                    args.index(1).and_then(|index| {
                        args.data(2).and_then(|data| {
                            watched.chunk(
                                index,
                                data,
                                MAX_EARLY_BYTES_PER_SENDER.saturating_sub(early_held),
                            )
                        })
                    })
                };
                if let Err(reason) = &outcome {
                    watched.poisoned.get_or_insert_with(|| reason.clone());
                    watched.early.clear();
                }
                outcome
            }
            Op::Process => {
                let watched = messages.remove(&key).ok_or_else(|| {
                    "this chunked message was not created through the server".to_string()
                })?;
                watched.verdict()
            }
            Op::Remove => {
                messages.remove(&key);
                Ok(())
            }
        }
    }

    /// Forgets the messages of a sender that left.
    pub fn forget(&self, sender: &str) {
        self.lock().retain(|(s, _, _), _| s != sender);
    }

    /// Messages being watched now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

    fn send(watch: &ChunkWatch, data: &[u8], piece: usize, reversed: bool) -> Result<(), String> {
        watch.vet(
            "ws/eve",
            "ws/alice",
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
            watch.vet("ws/eve", "ws/alice", &call("set", args))?;
        }
        watch.vet(
            "ws/eve",
            "ws/alice",
            &call("process", vec!["k".into(), false.into()]),
        )
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
                assert!(refused.contains("\"from\""), "{refused}");
            }
        }
        assert!(watch.is_empty());
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
        assert!(watch.vet("ws/eve", "ws/alice", &set).is_err());
        assert!(
            watch
                .vet("ws/eve", "ws/alice", &call("process", vec!["k".into()]))
                .is_err()
        );
        let odd = call("set.__call__", vec![]);
        assert!(watch.vet("ws/eve", "ws/alice", &odd).is_err());
        // A chunk overwritten after it was read would change what the server vetted.
        watch
            .vet("ws/eve", "ws/alice", &call("create", vec!["k".into()]))
            .unwrap();
        watch.vet("ws/eve", "ws/alice", &set).unwrap();
        assert!(watch.vet("ws/eve", "ws/alice", &set).is_err());
        assert!(
            watch
                .vet("ws/eve", "ws/alice", &call("process", vec!["k".into()]))
                .is_err()
        );
    }
}
