//! Helpers over msgpack values and hypha-rpc's tagged encodings (`_rtype`).

use rmpv::Value;

/// Looks up a string key in a msgpack map.
pub(crate) fn get<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    value
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// A string field of a map.
pub(crate) fn get_str<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    get(value, key).and_then(Value::as_str)
}

/// Sets (or replaces) a string key in a msgpack map; does nothing on a non-map.
pub(crate) fn set(value: &mut Value, key: &str, new: Value) {
    if let Value::Map(entries) = value {
        if let Some(slot) = entries.iter_mut().find(|(k, _)| k.as_str() == Some(key)) {
            slot.1 = new;
        } else {
            entries.push((Value::from(key), new));
        }
    }
}

/// Builds a map from string keys.
pub(crate) fn obj<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

/// The `_rtype: error` value a reject carries.
pub(crate) fn error_value(message: &str) -> Value {
    obj([
        ("_rtype", "error".into()),
        ("_rvalue", message.into()),
        ("_rtrace", "".into()),
    ])
}

/// An encoded remote method, as hypha-rpc's `_encode` writes it.
pub(crate) fn method_value(target: &str, method: &str, promise: Value) -> Value {
    obj([
        ("_rtype", "method".into()),
        ("_rtarget", target.into()),
        ("_rmethod", method.into()),
        ("_rpromise", promise),
    ])
}

/// Converts JSON to msgpack.
pub(crate) fn from_json(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => Value::Array(items.iter().map(from_json).collect()),
        serde_json::Value::Object(map) => Value::Map(
            map.iter()
                .map(|(k, v)| (Value::from(k.as_str()), from_json(v)))
                .collect(),
        ),
    }
}

/// Converts msgpack to JSON: bytes become base64 text, non-string keys become their text form.
pub(crate) fn to_json(value: &Value) -> serde_json::Value {
    use base64::Engine;
    match value {
        Value::Nil => serde_json::Value::Null,
        Value::Boolean(b) => (*b).into(),
        Value::Integer(i) => i
            .as_i64()
            .map(serde_json::Value::from)
            .or_else(|| i.as_u64().map(serde_json::Value::from))
            .unwrap_or(serde_json::Value::Null),
        Value::F32(f) => serde_json::Value::from(*f as f64),
        Value::F64(f) => serde_json::Value::from(*f),
        Value::String(s) => match s.as_str() {
            Some(text) => text.into(),
            None => String::from_utf8_lossy(s.as_bytes()).into_owned().into(),
        },
        Value::Binary(b) => base64::engine::general_purpose::STANDARD.encode(b).into(),
        Value::Array(items) => items.iter().map(to_json).collect(),
        Value::Map(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let key = match k.as_str() {
                        Some(s) => s.to_string(),
                        None => k.to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Value::Ext(_, _) => serde_json::Value::Null,
    }
}

/// A msgpack value written as the JSON [`to_json`] makes of it, without building that tree
/// first: keys in order and each once (the last wins), binary as base64, what JSON cannot hold
/// as `null`.
pub(crate) struct AsJson<'a>(pub &'a Value);

impl serde::Serialize for AsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, out: S) -> Result<S::Ok, S::Error> {
        use base64::Engine;
        use serde::ser::{SerializeMap, SerializeSeq};
        let float = |f: f64, out: S| match f.is_finite() {
            true => out.serialize_f64(f),
            false => out.serialize_unit(),
        };
        match self.0 {
            Value::Nil | Value::Ext(_, _) => out.serialize_unit(),
            Value::Boolean(b) => out.serialize_bool(*b),
            Value::Integer(i) => match (i.as_i64(), i.as_u64()) {
                (Some(i), _) => out.serialize_i64(i),
                (None, Some(u)) => out.serialize_u64(u),
                (None, None) => out.serialize_unit(),
            },
            Value::F32(f) => float(f64::from(*f), out),
            Value::F64(f) => float(*f, out),
            Value::String(s) => match s.as_str() {
                Some(text) => out.serialize_str(text),
                None => out.serialize_str(&String::from_utf8_lossy(s.as_bytes())),
            },
            Value::Binary(b) => {
                out.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
            }
            Value::Array(items) => {
                let mut seq = out.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&AsJson(item))?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut keyed: Vec<(std::borrow::Cow<'_, str>, &Value)> = entries
                    .iter()
                    .map(|(k, v)| match k.as_str() {
                        Some(key) => (std::borrow::Cow::Borrowed(key), v),
                        None => (std::borrow::Cow::Owned(k.to_string()), v),
                    })
                    .collect();
                // Stable: of equal keys the last stays last, and is the one written.
                keyed.sort_by(|a, b| a.0.cmp(&b.0));
                let mut map = out.serialize_map(None)?;
                for (i, (key, value)) in keyed.iter().enumerate() {
                    if keyed.get(i + 1).is_some_and(|next| next.0 == *key) {
                        continue;
                    }
                    map.serialize_entry(key.as_ref(), &AsJson(value))?;
                }
                map.end()
            }
        }
    }
}

/// A value as JSON text (what `serde_json::to_vec(&to_json(value))` gives).
pub(crate) fn json_bytes(value: &Value) -> Vec<u8> {
    // Writing into a Vec cannot fail, and every key is a string. Room for a typical answer
    // (a set of ICE servers is about 200 bytes) saves growing it twice.
    let mut out = Vec::with_capacity(256);
    match serde_json::to_writer(&mut out, &AsJson(value)) {
        Ok(()) => out,
        Err(_) => b"null".to_vec(),
    }
}

/// A map key for a message: quoted, shortened, control characters escaped.
pub(crate) fn describe_key(key: &Value) -> String {
    match key.as_str() {
        Some(text) => format!("{:?}", text.chars().take(40).collect::<String>()),
        None => "(a key that is not a string)".to_string(),
    }
}

/// Encodes a value to msgpack bytes.
pub(crate) fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, value);
    out
}

/// Arguments of a call: positional values plus hypha-rpc's trailing kwargs dict.
#[derive(Debug, Default, Clone)]
pub(crate) struct Args {
    pub positional: Vec<Value>,
    pub kwargs: Vec<(String, Value)>,
}

impl Args {
    /// Splits `args` per `with_kwargs` (Python sets it; JS marks the dict with `_rkwargs`).
    pub(crate) fn from_call(args: Vec<Value>, with_kwargs: bool) -> Self {
        let mut positional = args;
        let mut kwargs = Vec::new();
        let last_is_kwargs = match positional.last() {
            Some(last @ Value::Map(_)) => {
                with_kwargs || get(last, "_rkwargs").and_then(Value::as_bool) == Some(true)
            }
            _ => false,
        };
        if last_is_kwargs && let Some(Value::Map(entries)) = positional.pop() {
            for (k, v) in entries {
                if let Some(key) = k.as_str()
                    && key != "_rkwargs"
                {
                    kwargs.push((key.to_string(), v));
                }
            }
        }
        Self { positional, kwargs }
    }

    /// Keyword arguments only, as HTTP calls give them.
    pub(crate) fn from_kwargs(kwargs: Vec<(String, Value)>) -> Self {
        Self {
            positional: Vec::new(),
            kwargs,
        }
    }

    /// The argument at `index`, or the keyword `name`; nil counts as absent.
    pub(crate) fn get(&self, index: usize, name: &str) -> Option<&Value> {
        self.kwargs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .or_else(|| self.positional.get(index))
            .filter(|v| !v.is_nil())
    }

    /// A keyword argument only (no positional fallback).
    pub(crate) fn kwarg(&self, name: &str) -> Option<&Value> {
        self.kwargs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .filter(|v| !v.is_nil())
    }

    pub(crate) fn get_str(&self, index: usize, name: &str) -> Option<&str> {
        self.get(index, name).and_then(Value::as_str)
    }

    /// A string argument that must be there.
    pub(crate) fn require_str(&self, index: usize, name: &str) -> Result<&str, super::RpcError> {
        self.get_str(index, name).ok_or_else(|| {
            super::RpcError::BadRequest(format!("the argument {name} (a string) is required"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::F64),
            any::<f32>().prop_map(Value::F32),
            "[a-c]{0,3}".prop_map(|s: String| Value::from(s.as_str())),
            proptest::collection::vec(any::<u8>(), 0..6).prop_map(|b| {
                // A msgpack string of any bytes, valid UTF-8 or not.
                let mut data = vec![0xa0 | b.len() as u8];
                data.extend_from_slice(&b);
                rmpv::decode::read_value(&mut data.as_slice()).unwrap()
            }),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(Value::Binary),
            (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..4))
                .prop_map(|(t, d)| Value::Ext(t, d)),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                // Keys of any kind, often the same twice.
                proptest::collection::vec((inner.clone(), inner), 0..8).prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn json_written_directly_is_the_json_of_the_tree(value in any_value()) {
            let tree = serde_json::to_vec(&to_json(&value)).unwrap();
            prop_assert_eq!(String::from_utf8(json_bytes(&value)).unwrap(), String::from_utf8(tree).unwrap());
        }
    }

    #[test]
    fn kwargs_both_forms() {
        let py = Args::from_call(vec!["a".into(), obj([("x", 1.into())])], true);
        assert_eq!(py.get(0, "q").and_then(Value::as_str), Some("a"));
        assert_eq!(py.get(9, "x").and_then(Value::as_i64), Some(1));
        let js = Args::from_call(
            vec![obj([("x", 2.into()), ("_rkwargs", true.into())])],
            false,
        );
        assert_eq!(js.get(0, "x").and_then(Value::as_i64), Some(2));
        assert!(js.positional.is_empty());
        let plain = Args::from_call(vec![obj([("x", 2.into())])], false);
        assert_eq!(plain.positional.len(), 1);
    }

    #[test]
    fn json_round_trip() {
        let json = serde_json::json!({"a": [1, -2, 2.5, "s", null, true], "b": {"c": u64::MAX}});
        assert_eq!(to_json(&from_json(&json)), json);
    }
}
