//! Binary frames: two concatenated msgpack objects. Only the header (the first) is parsed;
//! the body is forwarded byte for byte, so end-to-end encrypted payloads pass untouched.

use bytes::{BufMut, Bytes, BytesMut};
use rmpv::Value;

/// What a header may cost to decode; real headers are a handful of short fields (and `user`).
const HEADER_LIMITS: super::scan::Limits = super::scan::Limits {
    max_depth: 16,
    max_elements: 1024,
    max_decoded: 256 * 1024,
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

/// A frame whose header has been read; the body stays as received.
#[derive(Debug, Clone)]
pub struct Frame {
    pub header: Vec<(Value, Value)>,
    pub body: Bytes,
}

impl Frame {
    /// Reads the header of a frame and keeps the rest as the body.
    pub fn parse(data: Bytes) -> Result<Self, FrameError> {
        let (header, consumed) = super::scan::decode(&data, HEADER_LIMITS)
            .map_err(|e| FrameError::Msgpack(format!("its header {e}")))?;
        let Value::Map(header) = header else {
            return Err(FrameError::HeaderNotMap);
        };
        Ok(Self {
            header,
            body: data.slice(consumed..),
        })
    }

    /// A string field of the header.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.header
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .and_then(|(_, v)| v.as_str())
    }

    /// Re-encodes the frame with `to`, `from`, `ws` set by the server and `user` as pre-encoded
    /// msgpack; whatever the client wrote in those fields, and any `ctx` (which the Python
    /// client would trust as the caller's context), is dropped.
    pub fn rewrite(&self, to: &str, from: &str, ws: &str, user_msgpack: &[u8]) -> Bytes {
        const TRUSTED: [&str; 5] = ["to", "from", "ws", "user", "ctx"];
        let kept: Vec<&(Value, Value)> = self
            .header
            .iter()
            .filter(|(k, _)| !k.as_str().is_some_and(|k| TRUSTED.contains(&k)))
            .collect();
        let mut out = BytesMut::with_capacity(128 + user_msgpack.len() + self.body.len()).writer();
        // Writes into a BytesMut cannot fail.
        let _ = rmp::encode::write_map_len(&mut out, (kept.len() + 4) as u32);
        for (k, v) in kept {
            let _ = rmpv::encode::write_value(&mut out, k);
            let _ = rmpv::encode::write_value(&mut out, v);
        }
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
        let header = Value::Map(again.header.clone());
        assert_eq!(get_str(&header, "from"), Some("ws/a"));
        assert_eq!(get_str(&header, "type"), Some("method"));
        let user = crate::rpc::value::get(&header, "user").unwrap();
        assert_eq!(get_str(user, "id"), Some("alice"));
        assert_eq!(again.body.as_ref(), body.as_slice());
        assert_eq!(again.header.len(), 5);
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
