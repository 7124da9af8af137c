//! Properties of the frame reader, the body scanner and the chunk watch over arbitrary input:
//! they never panic, and no body that names a field only the server sets gets through,
//! however it is chunked.

use bytes::Bytes;
use hypha_rtc::hub::chunks::ChunkWatch;
use hypha_rtc::rpc::frame::Frame;
use hypha_rtc::rpc::scan::{self, BodyError, Limits, SERVER_FIELDS};
use proptest::prelude::*;
use rmpv::Value;

fn pack(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).unwrap();
    out
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{1,12}",
        Just("args".to_string()),
        Just("promise".to_string()),
        Just("fromx".to_string()),
        Just("From".to_string()),
    ]
    .prop_filter("a key every client reads", |k| k != "__proto__")
}

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::F64),
        // (A leading byte order mark is refused on its own: the JavaScript clients drop it.)
        ".{0,40}".prop_map(|s: String| Value::from(s.trim_start_matches('\u{feff}'))),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Binary),
        // A timestamp (-1) of a size the JavaScript clients cannot decode is refused on
        // its own; the values here are ones every client reads.
        // (Nor are nanoseconds of 10^9 or more: the top byte is cleared.)
        (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..20)).prop_map(|(t, mut d)| {
            if t != -1 {
                Value::Ext(t, d)
            } else if matches!(d.len(), 4 | 8 | 12) {
                if d.len() > 4 {
                    d[0] = 0;
                }
                Value::Ext(t, d)
            } else {
                Value::Ext(-2, d)
            }
        }),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((key(), inner), 0..8).prop_map(|entries| {
                Value::Map(
                    entries
                        .into_iter()
                        .map(|(k, v)| (Value::from(k.as_str()), v))
                        .collect(),
                )
            }),
        ]
    })
}

/// A body map with clean keys, and a copy with one server field inserted at `at`.
fn bodies() -> impl Strategy<Value = (Vec<(Value, Value)>, usize, &'static str, Value)> {
    (
        proptest::collection::vec((key(), value()), 0..6),
        any::<prop::sample::Index>(),
        prop::sample::select(SERVER_FIELDS.to_vec()),
        value(),
    )
        .prop_map(|(entries, at, field, forged)| {
            let mut seen = std::collections::HashSet::new();
            // A body repeats no key (refused on its own).
            let entries: Vec<(Value, Value)> = entries
                .into_iter()
                .filter(|(k, _)| !SERVER_FIELDS.contains(&k.as_str()) && seen.insert(k.clone()))
                .map(|(k, v)| (Value::from(k.as_str()), v))
                .collect();
            let at = at.index(entries.len() + 1);
            (entries, at, field, forged)
        })
}

fn message_cache_call(function: &str, args: Vec<Value>) -> Frame {
    let header = Value::Map(vec![
        ("type".into(), "method".into()),
        ("to".into(), "ws/alice".into()),
        (
            "method".into(),
            format!("services.built-in.message_cache.{function}").into(),
        ),
        ("session".into(), format!("s-{function}").into()),
    ]);
    let mut data = pack(&header);
    let mut body = vec![("args".into(), Value::Array(args))];
    if function == "process" {
        body.push(("promise".into(), "*".into()));
    }
    data.extend(pack(&Value::Map(body)));
    Frame::parse(Bytes::from(data)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = scan::check_body(&data);
        let _ = scan::object(&data, Limits::WALK);
        let _ = scan::object_for_clients(&data, Limits::WALK);
        let _ = scan::decode(&data, Limits::decode(data.len(), 10_000, 8));
        if let Ok(frame) = Frame::parse(Bytes::from(data.clone())) {
            let rewritten = frame.rewrite("ws/b", "ws/a", "ws", &pack(&Value::Map(vec![])));
            let again = Frame::parse(rewritten).unwrap();
            prop_assert_eq!(again.field("from"), Some("ws/a"));
            prop_assert_eq!(again.field("ws"), Some("ws"));
            prop_assert!(!again.keys().any(|k| k == "ctx"));
        }
        for mut scanner in [
            scan::Scanner::new(Limits::WALK, Some(1)),
            scan::Scanner::for_chunked(Limits::WALK, Some(1)),
        ] {
            for piece in data.chunks(7) {
                if scanner.feed(piece).is_err() {
                    break;
                }
            }
        }
    }

    #[test]
    fn scanned_lengths_match_the_decoder(v in value(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
        let bytes = pack(&v);
        let mut data = bytes.clone();
        data.extend(tail);
        let scanned = scan::object(&data, Limits::WALK).unwrap();
        prop_assert_eq!(scanned.len, bytes.len());
        prop_assert_eq!(scan::decode(&data, Limits::WALK).unwrap().0, v);
    }

    #[test]
    fn no_server_field_gets_through(
        (entries, at, field, forged) in bodies(),
        piece in 1usize..5000,
        reversed in any::<bool>(),
    ) {
        let clean = pack(&Value::Map(entries.clone()));
        prop_assert_eq!(scan::check_body(&clean), Ok(()));
        let mut dirty = entries;
        dirty.insert(at, (Value::from(field), forged));
        let dirty = pack(&Value::Map(dirty));
        prop_assert_eq!(scan::check_body(&dirty), Err(BodyError::ServerField(field.to_string())));

        // The same body, assembled from chunks after a main header, is refused at process.
        let mut message = pack(&Value::Map(vec![("type".into(), "method".into())]));
        message.extend(&dirty);
        let watch = ChunkWatch::default();
        watch.vet("ws/eve", false, "ws/alice", &message_cache_call("create", vec!["k".into(), false.into()]), |_| false).unwrap();
        let mut chunks: Vec<(usize, &[u8])> = message.chunks(piece).enumerate().collect();
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
            // A chunk may be refused on its own (it is then never delivered).
            let _ = watch.vet("ws/eve", false, "ws/alice", &message_cache_call("set", args), |_| false);
        }
        let verdict = watch.vet("ws/eve", false, "ws/alice", &message_cache_call("process", vec!["k".into(), false.into()]), |_| false);
        // Refused for what it assembles, not for how the calls were written.
        let refused = verdict.expect_err("a forged chunked message was let through");
        prop_assert!(
            !refused.0.contains("argument") && !refused.0.contains("promise") && !refused.0.contains("heartbeat"),
            "{}",
            refused
        );
    }
}
