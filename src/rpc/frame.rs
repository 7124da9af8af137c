//! Binary frames: two concatenated msgpack objects. Only the header (the first) is parsed;
//! the body is forwarded byte for byte, so end-to-end encrypted payloads pass untouched.

use bytes::{BufMut, Bytes, BytesMut};
use rmpv::Value;

use super::scan::{MapEntry, map_entries, string_bytes, text};

/// What a header may cost to decode; real headers are a handful of short fields (and `user`).
const HEADER_LIMITS: super::scan::Limits = super::scan::Limits {
    max_depth: 16,
    max_elements: 1024,
    max_decoded: 256 * 1024,
};

/// What a header this server wrote may cost (it carries the sender's whole `user`, which a
/// client's own header limits do not allow for; a user comes from a token of at most 8 KiB).
const TRUSTED_LIMITS: super::scan::Limits = super::scan::Limits {
    max_depth: 16,
    max_elements: 1 << 16,
    max_decoded: 4 * 1024 * 1024,
};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("the frame is not valid msgpack: {0}")]
    Msgpack(String),
    #[error("the frame header must be a msgpack map")]
    HeaderNotMap,
    #[error("the frame header has no string field '{0}'")]
    MissingField(&'static str),
}

/// A frame whose header has been indexed; the body stays as received.
///
/// The header is not decoded: its top-level entries are located once, and fields are read
/// from the received bytes as they are asked for, so routing a frame allocates only the
/// index (a header carries the sender's whole `user` map, which routing never reads).
#[derive(Debug, Clone)]
pub struct Frame {
    /// The encoded header, as received.
    head: Bytes,
    /// Where each top-level entry's key and value lie in `head`.
    entries: Vec<MapEntry>,
    pub body: Bytes,
}

impl Frame {
    /// Reads the header of a frame and keeps the rest as the body.
    pub fn parse(data: Bytes) -> Result<Self, FrameError> {
        Self::parse_within(data, HEADER_LIMITS, super::scan::object_for_clients)
    }

    /// Reads a frame whose header this server (another instance of it) wrote, with the
    /// sender's `user` in it: bounded, but not by a client's header limits.
    pub(crate) fn parse_trusted(data: Bytes) -> Result<Self, FrameError> {
        Self::parse_within(data, TRUSTED_LIMITS, super::scan::object)
    }

    /// Reads the header with `walk`, which bounds it (and, for a client's frame, refuses what
    /// its receivers cannot decode).
    fn parse_within(
        data: Bytes,
        limits: super::scan::Limits,
        walk: fn(
            &[u8],
            super::scan::Limits,
        ) -> Result<super::scan::Scanned, super::scan::ScanError>,
    ) -> Result<Self, FrameError> {
        let scanned =
            walk(&data, limits).map_err(|e| FrameError::Msgpack(format!("its header {e}")))?;
        // The scan proved the header whole, so every entry is there; there are at most as
        // many as the element limit allows.
        let entries = map_entries(&data[..scanned.len])
            .ok_or(FrameError::HeaderNotMap)?
            .collect();
        Ok(Self {
            head: data.slice(..scanned.len),
            body: data.slice(scanned.len..),
            entries,
        })
    }

    fn key_of(&self, entry: &MapEntry) -> Option<&str> {
        text(&self.head[entry.key..entry.value])
    }

    /// A string field of the header.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.raw_field(key).and_then(text)
    }

    /// The encoded value of a header field, whatever its type.
    pub fn raw_field(&self, key: &str) -> Option<&[u8]> {
        self.entries
            .iter()
            .find(|e| self.key_of(e) == Some(key))
            .map(|e| &self.head[e.value..e.end])
    }

    /// The header's top-level keys, in order: `None` for a key that is not a string.
    pub fn raw_keys(&self) -> impl Iterator<Item = Option<&str>> {
        self.entries.iter().map(|e| self.key_of(e))
    }

    /// How many entries the header has.
    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// The header's top-level string keys, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().filter_map(|e| self.key_of(e))
    }

    /// The header decoded, for inspection (routing reads [`Frame::field`]).
    pub fn header(&self) -> Value {
        let mut reader = self.head.as_ref();
        // The scan in `parse` proved the header whole and within the depth limit.
        rmpv::decode::read_value_with_max_depth(&mut reader, HEADER_LIMITS.max_depth + 1)
            .unwrap_or(Value::Nil)
    }

    /// Re-encodes the frame with `to`, `from`, `ws` set by the server and `user` as pre-encoded
    /// msgpack; whatever the client wrote in those fields, and any `ctx` (which the Python
    /// client would trust as the caller's context), is dropped. Other entries are copied as
    /// received.
    pub fn rewrite(&self, to: &str, from: &str, ws: &str, user_msgpack: &[u8]) -> Bytes {
        const TRUSTED: [&str; 5] = ["to", "from", "ws", "user", "ctx"];
        let kept = || {
            self.entries
                .iter()
                .filter(|e| !self.key_of(e).is_some_and(|k| TRUSTED.contains(&k)))
        };
        let kept_len: usize = kept().map(|e| e.end - e.key).sum();
        let mut out = BytesMut::with_capacity(
            64 + kept_len + to.len() + from.len() + ws.len() + user_msgpack.len() + self.body.len(),
        )
        .writer();
        // Writes into a BytesMut cannot fail.
        let _ = rmp::encode::write_map_len(&mut out, (kept().count() + 4) as u32);
        let mut out = out.into_inner();
        for entry in kept() {
            out.put_slice(&self.head[entry.key..entry.end]);
        }
        let mut out = out.writer();
        for (key, value) in [("to", to), ("from", from), ("ws", ws)] {
            let _ = rmp::encode::write_str(&mut out, key);
            let _ = rmp::encode::write_str(&mut out, value);
        }
        let _ = rmp::encode::write_str(&mut out, "user");
        let mut out = out.into_inner();
        out.put_slice(user_msgpack);
        out.put_slice(&self.body);
        out.freeze()
    }

    /// The frame with the session `old` renamed `new` in the string fields `keys` of its
    /// header: a value that is `old`, or starts with `old.` (a callback under that session),
    /// gets `new` in its place. Other entries and the body are kept as they are.
    pub(crate) fn renamed(&self, keys: &[&str], old: &str, new: &str) -> Frame {
        let mut head = Vec::with_capacity(self.head.len() + new.len() * keys.len());
        let _ = rmp::encode::write_map_len(&mut head, self.entries.len() as u32);
        for entry in &self.entries {
            head.extend_from_slice(&self.head[entry.key..entry.value]);
            let value = &self.head[entry.value..entry.end];
            let renamed = self
                .key_of(entry)
                .filter(|key| keys.contains(key))
                .and_then(|_| text(value))
                .and_then(|value| value.strip_prefix(old))
                .filter(|rest| rest.is_empty() || rest.starts_with('.'));
            match renamed {
                Some(rest) => {
                    let _ = rmp::encode::write_str(&mut head, &format!("{new}{rest}"));
                }
                None => head.extend_from_slice(value),
            }
        }
        let head = Bytes::from(head);
        // Written here from whole entries: every one is found again.
        let entries = map_entries(&head)
            .map(Iterator::collect)
            .unwrap_or_default();
        Frame {
            head,
            entries,
            body: self.body.clone(),
        }
    }

    /// The frame as bytes: its header and body.
    pub(crate) fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.head.len() + self.body.len());
        out.put_slice(&self.head);
        out.put_slice(&self.body);
        out.freeze()
    }
}

/// The string-keyed top-level entries of a frame's header as [`trusted_fields`] walks them,
/// lazily from the start (a value that is not a string reads as `None`); a malformed header
/// simply ends the walk.
#[cfg(test)]
pub(crate) fn header_entries(data: &[u8]) -> impl Iterator<Item = (&str, Option<&str>)> {
    map_entries(data)
        .into_iter()
        .flatten()
        .filter_map(|e| Some((text(&data[e.key..e.value])?, text(&data[e.value..e.end]))))
}

/// The first value of each of `keys` in a header this server wrote, walking its entries from
/// the start only until `enough` says what was found so far will do (a key not seen yet is
/// `None`, a key whose value is not a string `Some(None)`): the rest (the sender's `user`, the
/// body) is never looked at. The walk is bounded like any scan; a malformed header ends it.
pub(crate) fn trusted_fields<'a, const N: usize>(
    data: &'a [u8],
    keys: [&str; N],
    enough: impl Fn(&[Option<Option<&'a str>>; N]) -> bool,
) -> [Option<&'a str>; N] {
    let mut found = [None; N];
    // Keys are compared as bytes (equal bytes are the same text); a value is read as text only
    // when its key is wanted.
    for e in map_entries(data).into_iter().flatten() {
        let Some(key) = string_bytes(&data[e.key..e.value]) else {
            continue;
        };
        if let Some(i) = keys.iter().position(|k| k.as_bytes() == key) {
            found[i].get_or_insert_with(|| text(&data[e.value..e.end]));
            if enough(&found) {
                break;
            }
        }
    }
    found.map(Option::flatten)
}

/// Encodes a header and an optional body map into one frame.
pub(crate) fn encode(header: &Value, body: Option<&Value>) -> Bytes {
    let mut out = super::value::encode(header);
    if let Some(body) = body {
        let _ = rmpv::encode::write_value(&mut out, body);
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::value::{get_str, obj};

    #[test]
    fn a_header_this_server_wrote_may_carry_a_user_larger_than_a_client_header() {
        let roles: Vec<Value> = (0..2000).map(|i| format!("role-{i}").into()).collect();
        let header = obj([
            ("type", "method".into()),
            ("from", "ws/a".into()),
            ("to", "*/manager".into()),
            ("user", obj([("roles", Value::Array(roles))])),
        ]);
        let data = encode(&header, Some(&obj([("args", Value::Array(vec![]))])));
        assert!(Frame::parse(data.clone()).is_err());
        let frame = Frame::parse_trusted(data).expect("within the trusted limits");
        assert_eq!(frame.field("from"), Some("ws/a"));
        // Still bounded: a header past the trusted limits is refused too.
        let many: Vec<Value> = (0..70_000).map(|i| i.into()).collect();
        let huge = encode(&obj([("user", Value::Array(many))]), None);
        assert!(Frame::parse_trusted(huge).is_err());
    }

    #[test]
    fn renaming_a_session_touches_only_the_named_fields_and_whole_segments() {
        let header = obj([
            ("type", "method".into()),
            ("method", "~s.resolve".into()),
            ("parent", "~s".into()),
            ("session", "~s2".into()),
            ("note", "~s".into()),
            ("n", 7.into()),
        ]);
        let body = vec![0x91, 0xc0];
        let mut data = crate::rpc::value::encode(&header);
        data.extend_from_slice(&body);
        let frame = Frame::parse(Bytes::from(data)).unwrap();
        let renamed = frame.renamed(&["method", "parent", "session", "n"], "~s", "own");
        assert_eq!(renamed.field("method"), Some("own.resolve"));
        assert_eq!(renamed.field("parent"), Some("own"));
        // Another session that merely starts the same, and fields not named, are kept.
        assert_eq!(renamed.field("session"), Some("~s2"));
        assert_eq!(renamed.field("note"), Some("~s"));
        assert_eq!(renamed.raw_field("n"), Some(&[7u8][..]));
        assert_eq!(renamed.body.as_ref(), body.as_slice());
        let again = Frame::parse(renamed.to_bytes()).unwrap();
        assert_eq!(again.keys().count(), 6);
        assert_eq!(again.field("method"), Some("own.resolve"));
        assert_eq!(again.body.as_ref(), body.as_slice());
    }

    #[test]
    fn rewrite_overwrites_identity_and_keeps_body() {
        let header = obj([
            ("type", "method".into()),
            ("to", "ws/b".into()),
            ("from", "forged/x".into()),
            ("user", obj([("id", "root".into())])),
            ("ctx", obj([("user", obj([("id", "root".into())]))])),
        ]);
        let body = vec![0xc4, 3, 1, 2, 3];
        let mut data = crate::rpc::value::encode(&header);
        data.extend_from_slice(&body);
        let frame = Frame::parse(Bytes::from(data)).unwrap();
        assert_eq!(frame.body.as_ref(), body.as_slice());
        let user = crate::rpc::value::encode(&obj([("id", "alice".into())]));
        let out = frame.rewrite("ws/b", "ws/a", "ws", &user);
        let again = Frame::parse(out).unwrap();
        let header = again.header();
        assert_eq!(get_str(&header, "from"), Some("ws/a"));
        assert_eq!(get_str(&header, "type"), Some("method"));
        let user = crate::rpc::value::get(&header, "user").unwrap();
        assert_eq!(get_str(user, "id"), Some("alice"));
        assert_eq!(again.body.as_ref(), body.as_slice());
        assert_eq!(
            again.keys().collect::<Vec<_>>(),
            ["type", "to", "from", "ws", "user"]
        );
    }

    #[test]
    fn header_entries_walk_lazily_and_stop_at_what_is_broken() {
        let header = obj([
            ("type", "method".into()),
            ("n", 3.into()),
            ("from", "ws/a".into()),
        ]);
        let mut data = crate::rpc::value::encode(&header);
        data.extend_from_slice(&[0xc1, 0xc1]);
        let entries: Vec<_> = header_entries(&data).collect();
        assert_eq!(
            entries,
            [
                ("type", Some("method")),
                ("n", None),
                ("from", Some("ws/a"))
            ]
        );
        // A header cut short yields the entries before the cut, then ends.
        let cut = &data[..data.len() - 5];
        assert_eq!(header_entries(cut).count(), 2);
        assert_eq!(header_entries(b"\xc1").count(), 0);
    }

    #[test]
    fn trusted_fields_read_every_string_encoding_and_stop_at_a_cut_one() {
        // A map of five entries, its strings in each of msgpack's four string encodings.
        let mut data = vec![0x85];
        data.extend_from_slice(b"\xa4type\xd9\x06method");
        data.extend_from_slice(b"\xda\x00\x01n\x93\x01\x02\xa1x");
        data.extend_from_slice(b"\xdb\x00\x00\x00\x04from\xdb\x00\x00\x00\x04ws/a");
        data.extend_from_slice(b"\xa7session\xda\x00\x02s1");
        data.extend_from_slice(b"\xa2to\xa4ws/b");
        let all = |_: &[Option<Option<&str>>; 5]| false;
        assert_eq!(
            trusted_fields(&data, ["type", "n", "from", "session", "to"], all),
            [Some("method"), None, Some("ws/a"), Some("s1"), Some("ws/b")]
        );
        assert_eq!(header_entries(&data).count(), 5);
        // A string whose head claims more bytes than there are ends the walk there.
        let mut cut = data[..data.len() - 8].to_vec();
        cut.extend_from_slice(b"\xa2to\xdb\x00\x01\x00\x00ws");
        assert_eq!(
            trusted_fields(&cut, ["type", "n", "from", "session", "to"], all),
            [Some("method"), None, Some("ws/a"), Some("s1"), None]
        );
        assert_eq!(header_entries(&cut).count(), 4);
        // Only what is wanted is read: the walk stops once `enough` says so.
        let [from, to] = trusted_fields(&data, ["from", "to"], |[from, _]| from.is_some());
        assert_eq!((from, to), (Some("ws/a"), None));
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(
            Frame::parse(Bytes::from_static(&[0x92, 1])),
            Err(FrameError::Msgpack(_))
        ));
        assert_eq!(
            Frame::parse(Bytes::from_static(&[0x01])).unwrap_err(),
            FrameError::HeaderNotMap
        );
        assert!(Frame::parse(Bytes::new()).is_err());
    }
}
