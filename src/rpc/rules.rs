//! What a client's frame may not say. The receiving clients act on a frame's header as the
//! server delivers it: they fire its `type`, look its `method` up attribute by attribute in
//! their own objects, and keep the last of a repeated key. A header the server could read one
//! way and a client another, or that reaches past the functions a client offers, is refused
//! before it is routed.

use super::frame::Frame;
use super::scan;

/// Method path segments that are never a function a client offers: the attributes and
/// properties through which a lookup reaches the language's internals (a Python function's
/// `__globals__`, a bound method's `__self__`, a JavaScript function's `constructor`, a
/// generator's frame and the frame's globals).
const INTERNALS: [&str; 16] = [
    "constructor",
    "prototype",
    "gi_frame",
    "gi_code",
    "ag_frame",
    "ag_code",
    "cr_frame",
    "cr_code",
    "tb_frame",
    "f_globals",
    "f_locals",
    "f_builtins",
    "f_back",
    "f_code",
    "func_globals",
    "mro",
];

/// The only double-underscore names the clients offer (a remote context manager's).
const ALLOWED_DUNDERS: [&str; 2] = ["__enter__", "__exit__"];

/// Checks a method path (`services.echo.f`, `<session>.resolve`): none of its dot-separated
/// segments may reach into the receiver's internals.
pub fn check_method(path: &str) -> Result<(), String> {
    match path.split('.').find(|segment| {
        (segment.starts_with("__") && !ALLOWED_DUNDERS.contains(segment))
            || INTERNALS.contains(segment)
    }) {
        Some(segment) => Err(format!(
            "the method {:?} names {segment:?}, which is not a function any client offers",
            truncated(path)
        )),
        None => Ok(()),
    }
}

/// What starts a session the server chose (for a chunked message's `process` call); the
/// clients' own sessions are alphanumeric.
pub const SERVER_SESSION_MARK: char = '~';

/// Checks a header as its receiver will read it: every key a string and none repeated (the
/// server reads the first, the clients the last), its `type`, `method` and `session` strings
/// if present, its `type` one a client may send, and its `method` a path to a function.
pub fn check_header(frame: &Frame) -> Result<(), String> {
    let mut keys: Vec<&str> = Vec::with_capacity(frame.entry_count());
    for key in frame.raw_keys() {
        let Some(key) = key else {
            return Err("every key of a frame's header must be a string".into());
        };
        if key == "__proto__" {
            return Err("a frame's header may not have the key \"__proto__\"".into());
        }
        if keys.contains(&key) {
            return Err(format!(
                "the frame's header has the key {:?} twice",
                truncated(key)
            ));
        }
        keys.push(key);
    }
    // The server reads these, and the JavaScript clients use `type` as a property name (an
    // array `["constructor"]` reads as "constructor"): present, each must be text.
    for name in ["type", "method", "session"] {
        if frame
            .raw_field(name)
            .is_some_and(|value| scan::text(value).is_none())
        {
            return Err(format!(
                "the frame's header field {name:?} must be a string"
            ));
        }
    }
    // Sessions that start so are the ones the server gives chunked messages' `process`
    // calls (no client writes one).
    if frame
        .field("session")
        .is_some_and(|session| session.starts_with(SERVER_SESSION_MARK))
    {
        return Err(format!(
            "a session may not start with {SERVER_SESSION_MARK:?}: those are the server's"
        ));
    }
    if let Some(kind) = frame.field("type").and_then(scan::refused_type) {
        return Err(format!(
            "a frame of type {kind:?} is refused: {}",
            scan::type_reason(kind)
        ));
    }
    if let Some(method) = frame.field("method") {
        check_method(method)?;
    }
    Ok(())
}

/// At most 100 characters of something a client sent, for an error message.
fn truncated(text: &str) -> String {
    text.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::value::{encode, obj};
    use bytes::Bytes;
    use rmpv::Value;

    fn header(entries: &[(Value, Value)]) -> Frame {
        let mut data = Vec::new();
        rmpv::encode::write_value(&mut data, &Value::Map(entries.to_vec())).unwrap();
        Frame::parse(Bytes::from(data)).unwrap()
    }

    #[test]
    fn method_paths_stay_among_the_functions_clients_offer() {
        for ok in [
            "services.echo.f",
            "abc123.resolve",
            "services._rintf_x1.fn",
            "services.ctx.__enter__",
            "services.ctx.__exit__",
            "services.svc._dispose",
            "services.built-in.message_cache.create",
            "",
        ] {
            assert_eq!(check_method(ok), Ok(()), "{ok}");
        }
        for bad in [
            "S.resolve.__globals__.os.system",
            "services.built-in.ping.__self__._process_message",
            "S.resolve.constructor",
            "services.x.__class__",
            "services.x.__proto__.y",
            "S.gen.gi_frame.f_globals.os.system",
        ] {
            let refused = check_method(bad).unwrap_err();
            assert!(
                refused.contains("not a function any client offers"),
                "{bad}"
            );
        }
    }

    #[test]
    fn headers_are_read_one_way_only() {
        let ok = obj([
            ("type", "method".into()),
            ("method", "services.s.f".into()),
            ("session", "s1".into()),
        ]);
        assert_eq!(
            check_header(&Frame::parse(Bytes::from(encode(&ok))).unwrap()),
            Ok(())
        );
        let key = |k: &str| Value::from(k);
        let cases: [(Vec<(Value, Value)>, &str); 7] = [
            (
                vec![
                    (key("method"), "services.s.f".into()),
                    (
                        key("method"),
                        "services.built-in.message_cache.process".into(),
                    ),
                ],
                "\"method\" twice",
            ),
            (
                vec![
                    (key("type"), "method".into()),
                    (key("type"), "method".into()),
                ],
                "\"type\" twice",
            ),
            (vec![(Value::from(7), 1.into())], "must be a string"),
            (vec![(Value::F64(0.5), 1.into())], "must be a string"),
            (
                vec![(key("type"), "client_disconnected".into())],
                "only the server sends",
            ),
            (
                vec![(key("type"), "constructor".into())],
                "every JavaScript object has",
            ),
            (
                vec![(key("session"), "~a1b2c3".into())],
                "those are the server's",
            ),
        ];
        for (entries, expected) in cases {
            let refused = check_header(&header(&entries)).unwrap_err();
            assert!(refused.contains(expected), "{refused} / {expected}");
        }
        // What the server reads must be text: `["constructor"]` as a type reads as
        // "constructor" to the JavaScript clients.
        for name in ["type", "method", "session"] {
            for value in [
                Value::Array(vec!["constructor".into()]),
                Value::from(5),
                Value::Nil,
            ] {
                let refused = check_header(&header(&[(key(name), value)])).unwrap_err();
                assert_eq!(
                    refused,
                    format!("the frame's header field {name:?} must be a string")
                );
            }
        }
        // So must every string: an overlong `_` would read as `_` (`__proto__`) to them.
        for (k, v) in [
            (&b"\xc1\x9f_proto__"[..], &b"x"[..]),
            (b"type", b"construct\xc1\xb2"),
            (b"method", b"S.resolve.\xc1\x9f_globals__"),
        ] {
            let mut data = vec![0x81, 0xa0 | k.len() as u8];
            data.extend_from_slice(k);
            data.push(0xa0 | v.len() as u8);
            data.extend_from_slice(v);
            let refused = Frame::parse(Bytes::from(data)).unwrap_err().to_string();
            assert!(refused.contains("not valid UTF-8"), "{refused}");
        }
        let dunder = header(&[(key("method"), "S.resolve.__globals__".into())]);
        assert!(check_header(&dunder).is_err());
        // Keys the JavaScript clients cannot decode never get as far: the frame is not read.
        for bad in [Value::Nil, Value::Binary(b"to".to_vec()), key("__proto__")] {
            let mut data = Vec::new();
            rmpv::encode::write_value(&mut data, &Value::Map(vec![(bad, 1.into())])).unwrap();
            let refused = Frame::parse(Bytes::from(data)).unwrap_err().to_string();
            assert!(
                refused.contains("JavaScript clients cannot decode"),
                "{refused}"
            );
        }
    }
}
