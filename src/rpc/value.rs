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
