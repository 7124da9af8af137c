//! The Bus: how frames and announcements cross between instances. One trait, two
//! implementations chosen at start-up: [`LocalBus`] (one instance, nothing to cross) and
//! [`super::redis_bus::RedisBus`] (several instances sharing Redis pub/sub).

use bytes::Bytes;
use futures_util::future::BoxFuture;
use rmpv::Value;

/// Room for what the sending instance adds to a client's frame (its header's `user`), or what
/// an announcement wraps around it, above the largest frame a client may send.
pub(crate) const FRAME_HEADROOM: usize = 1 << 20;
/// A buffer grown past this by one large frame or batch is let go afterwards.
pub(crate) const KEEP_BUFFER: usize = 1 << 20;

/// The bus could not carry a message (Redis unreachable, say).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the instance bus is unavailable: {0}")]
pub struct BusError(pub String);

/// Something every instance should learn about.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Announcement {
    /// A frame for every client of a workspace (`to: "ws/*"`), header already rewritten.
    Broadcast { workspace: String, data: Bytes },
    /// A manager event for the subscribers of a workspace.
    Event {
        workspace: String,
        event: String,
        data: Value,
    },
    /// A token id that is revoked from now on, with every token derived from it, and when
    /// it would have expired.
    Revoked { id: String, expires_at: i64 },
    /// The client `addr` reconnected through instance `keep`: any other instance closes its
    /// connection of that client.
    Kick { addr: String, keep: String },
}

/// What the bus hands to this instance.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A frame for `to`, a client (or the manager) of this instance; its header is trusted.
    Frame { to: String, data: Bytes },
    /// An announcement from another instance.
    Announced(Announcement),
    /// The bus (re)connected: this instance's shared state must be written again.
    Reconnected,
}

/// Told whether a frame sent with [`Bus::send_then`] reached an instance holding its client,
/// with the frame back (empty where it was lost on its way), so that a sender needs to keep no
/// copy of it to act on it.
pub(crate) type Delivered = Box<dyn FnOnce(Result<bool, BusError>, Bytes) + Send>;

/// A frame on its way and whom to tell what became of it: told once, with the frame back.
/// Dropped untold (its sender stopped waiting, the queue it waited in went away), it tells an
/// error, so that no sender waits for ever.
pub(crate) struct Sending {
    then: Option<Delivered>,
    data: Bytes,
    /// What it tells if dropped untold.
    dropped: &'static str,
}

impl Sending {
    pub(crate) fn new(data: Bytes, then: Delivered) -> Self {
        Self {
            then: Some(then),
            data,
            dropped: "the frame was dropped on its way",
        }
    }

    /// The same, telling `error` if dropped untold.
    pub(crate) fn dropped_as(mut self, error: &'static str) -> Self {
        self.dropped = error;
        self
    }

    /// The frame.
    pub(crate) fn data(&self) -> &Bytes {
        &self.data
    }

    /// The frame, handed on (whatever takes it gives it back with the answer).
    pub(crate) fn take_data(&mut self) -> Bytes {
        std::mem::take(&mut self.data)
    }

    /// The frame again, as it came back from whatever it was handed to.
    pub(crate) fn put_data(&mut self, data: Bytes) {
        self.data = data;
    }

    /// Tells what became of the frame, with the frame.
    pub(crate) fn tell(mut self, answer: Result<bool, BusError>) {
        if let Some(then) = self.then.take() {
            then(answer, self.take_data());
        }
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        if let Some(then) = self.then.take() {
            then(
                Err(BusError(self.dropped.into())),
                std::mem::take(&mut self.data),
            );
        }
    }
}

/// Carries frames to clients on other instances and announcements to all of them.
pub(crate) trait Bus: Send + Sync {
    /// Delivers a frame to `addr` on whichever instance holds it: `Ok(false)` when none does.
    fn send<'a>(&'a self, addr: &'a str, data: Bytes) -> BoxFuture<'a, Result<bool, BusError>>;
    /// Queues a frame for `addr` and returns once it is queued (frames from one sender keep
    /// their order); `then` hears later, once whatever becomes of the frame (also when this
    /// returns an error, or its wait is cancelled), whether any instance held `addr`. The
    /// sender need not wait for Redis's answer before its next frame.
    fn send_then<'a>(
        &'a self,
        addr: &'a str,
        data: Bytes,
        then: Delivered,
    ) -> BoxFuture<'a, Result<(), BusError>>;
    /// [`Bus::send_then`] where the frame can be handed on at once, without waiting for
    /// anything: the frame and `then` come back where it cannot (the caller then uses
    /// `send_then`). Spares the common case the boxed future.
    fn try_send_then(
        &self,
        _addr: &str,
        data: Bytes,
        then: Delivered,
    ) -> Result<(), (Bytes, Delivered)> {
        Err((data, then))
    }
    /// Tells the other instances.
    fn announce(&self, announcement: Announcement) -> BoxFuture<'_, Result<(), BusError>>;
    /// Starts taking frames for `addr`, which is connected here.
    fn attach<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, Result<(), BusError>>;
    /// Stops taking frames for `addr`.
    fn detach<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, ()>;
    /// Whether other instances may exist (what is not here may be elsewhere).
    fn is_shared(&self) -> bool;
    /// Whether the bus can carry messages now (for readiness and metrics).
    fn is_up(&self) -> bool {
        true
    }
    /// Direct links to other instances that are up now (for metrics).
    fn links_up(&self) -> usize {
        0
    }
    /// `instance` is gone (its lease ran out): whatever led to it is let go.
    fn instance_gone(&self, _instance: &str) {}
}

/// The bus of a single instance: there is nowhere else to deliver to.
pub(crate) struct LocalBus;

impl Bus for LocalBus {
    fn send<'a>(&'a self, _addr: &'a str, _data: Bytes) -> BoxFuture<'a, Result<bool, BusError>> {
        Box::pin(async { Ok(false) })
    }

    fn send_then<'a>(
        &'a self,
        _addr: &'a str,
        data: Bytes,
        then: Delivered,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        then(Ok(false), data);
        Box::pin(async { Ok(()) })
    }

    fn announce(&self, _announcement: Announcement) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async { Ok(()) })
    }

    fn attach<'a>(&'a self, _addr: &'a str) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async { Ok(()) })
    }

    fn detach<'a>(&'a self, _addr: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    fn is_shared(&self) -> bool {
        false
    }
}

/// Announcements on the wire: a msgpack array `[origin, kind, ...]`.
pub(crate) fn encode_announcement(origin: &str, announcement: &Announcement) -> Vec<u8> {
    let items: Vec<Value> = match announcement {
        Announcement::Broadcast { workspace, data } => vec![
            origin.into(),
            "b".into(),
            workspace.as_str().into(),
            Value::Binary(data.to_vec()),
        ],
        Announcement::Event {
            workspace,
            event,
            data,
        } => vec![
            origin.into(),
            "e".into(),
            workspace.as_str().into(),
            event.as_str().into(),
            data.clone(),
        ],
        Announcement::Revoked { id, expires_at } => vec![
            origin.into(),
            "r".into(),
            id.as_str().into(),
            (*expires_at).into(),
        ],
        Announcement::Kick { addr, keep } => vec![
            origin.into(),
            "k".into(),
            addr.as_str().into(),
            keep.as_str().into(),
        ],
    };
    crate::rpc::value::encode(&Value::Array(items))
}

/// Reads an announcement; `None` for anything malformed. Returns the origin instance too.
pub(crate) fn decode_announcement(payload: &[u8]) -> Option<(String, Announcement)> {
    let mut reader = payload;
    let value = rmpv::decode::read_value_with_max_depth(&mut reader, 32).ok()?;
    let Value::Array(mut items) = value else {
        return None;
    };
    let text = |v: &Value| v.as_str().map(str::to_string);
    let origin = text(items.first()?)?;
    let announcement = match (items.get(1)?.as_str()?, items.len()) {
        ("b", 4) => Announcement::Broadcast {
            workspace: text(&items[2])?,
            data: match items.pop()? {
                Value::Binary(data) => Bytes::from(data),
                _ => return None,
            },
        },
        ("e", 5) => {
            let data = items.pop()?;
            Announcement::Event {
                workspace: text(&items[2])?,
                event: text(&items[3])?,
                data,
            }
        }
        ("r", 4) => Announcement::Revoked {
            id: text(&items[2])?,
            expires_at: items[3].as_i64()?,
        },
        ("k", 4) => Announcement::Kick {
            addr: text(&items[2])?,
            keep: text(&items[3])?,
        },
        _ => return None,
    };
    Some((origin, announcement))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_round_trip() {
        let cases = [
            Announcement::Broadcast {
                workspace: "ws1".into(),
                data: Bytes::from_static(b"\x81\xa2to\xa5ws1/*"),
            },
            Announcement::Event {
                workspace: "ws1".into(),
                event: "service_added".into(),
                data: crate::rpc::value::obj([("id", "ws1/c:s".into())]),
            },
            Announcement::Revoked {
                id: "abc".into(),
                expires_at: 1_900_000_000,
            },
            Announcement::Kick {
                addr: "ws1/c".into(),
                keep: "i2".into(),
            },
        ];
        for case in cases {
            let wire = encode_announcement("i1", &case);
            assert_eq!(decode_announcement(&wire), Some(("i1".into(), case)));
        }
        assert_eq!(decode_announcement(b"\x93\xa1x\xa1z\x01"), None);
        assert_eq!(decode_announcement(b"not msgpack"), None);
    }
}
