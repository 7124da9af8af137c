//! How the server describes a service it answers itself, as hypha-rpc's `get_service` returns
//! one: an envelope (id, name, type, config) and one encoded method per function, each with
//! the `_rschema` the clients require.

use rmpv::Value;

use super::value::{self, from_json, obj};

/// A function a hosted service offers: its name, what it does, and its parameters.
pub(crate) struct Function {
    pub name: &'static str,
    pub doc: &'static str,
    /// `{parameter: JSON schema}`.
    pub parameters: serde_json::Value,
    pub required: &'static [&'static str],
}

impl Function {
    pub(crate) fn new(
        name: &'static str,
        doc: &'static str,
        parameters: serde_json::Value,
        required: &'static [&'static str],
    ) -> Self {
        Self {
            name,
            doc,
            parameters,
            required,
        }
    }

    /// Its `_rschema`: a JSON schema of a function call.
    pub(crate) fn schema(&self) -> Value {
        from_json(&serde_json::json!({
            "name": self.name,
            "description": self.doc,
            "parameters": {
                "type": "object",
                "properties": self.parameters,
                "required": self.required,
            },
        }))
    }
}

/// A service's own fields, before its functions.
pub(crate) struct Envelope<'a> {
    pub id: &'a str,
    pub name: &'a str,
    /// `type`: `functions`, `rtc`, `built-in`...
    pub kind: &'a str,
    pub description: &'a str,
    pub config: Value,
}

/// An encoded method called at `target` (with `_rpromise: "*"`, as Hypha's manager encodes
/// its own).
pub(crate) fn method(target: &str, path: &str, doc: &str, schema: Option<Value>) -> Value {
    let mut m = value::method_value(target, path, "*".into());
    value::set(&mut m, "_rdoc", doc.into());
    if let Some(schema) = schema {
        value::set(&mut m, "_rschema", schema);
    }
    m
}

/// The description of a service called at `target`: its envelope and one method per function.
pub(crate) fn describe(target: &str, envelope: Envelope<'_>, functions: &[Function]) -> Value {
    let mut entries = vec![
        ("id".into(), envelope.id.into()),
        ("name".into(), envelope.name.into()),
        ("description".into(), envelope.description.into()),
        ("type".into(), envelope.kind.into()),
        ("config".into(), envelope.config),
    ];
    for f in functions {
        let path = format!("services.{}.{}", envelope.name, f.name);
        let mut m = method(target, &path, f.doc, Some(f.schema()));
        value::set(&mut m, "_rname", f.name.into());
        entries.push((f.name.into(), m));
    }
    Value::Map(entries)
}

/// The config of a public service the server hosts: callers need the context.
pub(crate) fn public_config(workspace: &str) -> Value {
    obj([
        ("visibility", "public".into()),
        ("require_context", true.into()),
        ("workspace", workspace.into()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::value::{get, get_str};

    #[test]
    fn every_method_carries_its_schema() {
        let functions = [Function::new(
            "echo",
            "Return the data.",
            serde_json::json!({"data": {"description": "Any value"}}),
            &["data"],
        )];
        let envelope = Envelope {
            id: "ws/c:svc",
            name: "svc",
            kind: "functions",
            description: "a service",
            config: public_config("ws"),
        };
        let described = describe("*/manager-x", envelope, &functions);
        let echo = get(&described, "echo").unwrap();
        assert_eq!(get_str(echo, "_rmethod"), Some("services.svc.echo"));
        let schema = get(echo, "_rschema").unwrap();
        let properties = get(get(schema, "parameters").unwrap(), "properties").unwrap();
        assert!(get(properties, "data").is_some());
    }
}
