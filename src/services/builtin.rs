//! `built-in`: what every hypha-rpc peer offers, here the server's own: `ping`, `get_service`
//! (the description of a hosted service) and `message_cache`, through which clients send the
//! server messages larger than one frame.

use std::sync::{Arc, LazyLock};

use futures_util::future::BoxFuture;
use rmpv::Value;
use serde_json::json;

use super::HostedService;
use crate::AppState;
use crate::error::Error;
use crate::rpc::describe::{self, Function};
use crate::rpc::peer::{CallContext, Incoming};
use crate::rpc::value::{Args, obj};

/// The `built-in` service.
pub(crate) struct BuiltIn;

static FUNCTIONS: LazyLock<Vec<Function>> = LazyLock::new(|| {
    let key = json!({"key": {"type": "string"}});
    vec![
        Function::new("ping", "Answer 'pong'.", json!({}), &[]),
        Function::new(
            "get_service",
            "Describe a service the server hosts.",
            json!({"service_id": {"type": "string"}}),
            &[],
        ),
        Function::new(
            "message_cache.create",
            "Start a chunked message.",
            json!({"key": {"type": "string"}, "heartbeat": {"type": "boolean"}, "overwrite": {"type": "boolean"}}),
            &["key"],
        ),
        Function::new(
            "message_cache.append",
            "Add the next chunk.",
            json!({"key": {"type": "string"}, "data": {"type": "string", "format": "binary"}}),
            &["key", "data"],
        ),
        Function::new(
            "message_cache.set",
            "Set chunk `index`.",
            json!({"key": {"type": "string"}, "index": {"type": "integer"}, "data": {"type": "string", "format": "binary"}}),
            &["key", "index", "data"],
        ),
        Function::new(
            "message_cache.process",
            "Reassemble the message and handle it as if it had come in one frame.",
            key.clone(),
            &["key"],
        ),
        Function::new(
            "message_cache.remove",
            "Drop a chunked message.",
            key,
            &["key"],
        ),
    ]
});

impl HostedService for BuiltIn {
    fn name(&self) -> &'static str {
        "built-in"
    }

    fn summary(&self) -> &'static str {
        "Builtin services of the server"
    }

    fn kind(&self) -> &'static str {
        "built-in"
    }

    fn public(&self) -> bool {
        false
    }

    fn functions(&self) -> &[Function] {
        &FUNCTIONS
    }

    /// As hypha-rpc peers describe theirs: `message_cache` is an object of functions.
    fn description(&self, app: &AppState) -> Value {
        let target = app.peer.manager_addr();
        let method = |f: &Function| {
            describe::method(
                &target,
                &format!("services.built-in.{}", f.name),
                f.doc,
                None,
            )
        };
        let mut entries = vec![
            ("id".into(), format!("{target}:built-in").into()),
            ("name".into(), self.summary().into()),
            ("type".into(), self.kind().into()),
            (
                "config".into(),
                obj([
                    ("require_context", true.into()),
                    ("visibility", "public".into()),
                    ("api_version", 3.into()),
                ]),
            ),
        ];
        let mut cache = Vec::new();
        for f in FUNCTIONS.iter() {
            match f.name.strip_prefix("message_cache.") {
                Some(name) => cache.push((name.into(), method(f))),
                None => entries.push((f.name.into(), method(f))),
            }
        }
        entries.push(("message_cache".into(), Value::Map(cache)));
        Value::Map(entries)
    }

    fn call<'a>(
        &'a self,
        app: &'a Arc<AppState>,
        ctx: &'a CallContext,
        function: &'a str,
        args: &'a Args,
    ) -> BoxFuture<'a, Result<Value, Error>> {
        Box::pin(call(app, ctx, function, args))
    }
}

async fn call(
    app: &Arc<AppState>,
    ctx: &CallContext,
    function: &str,
    args: &Args,
) -> Result<Value, Error> {
    let owner = ctx.from.as_str();
    let key = || {
        args.get_str(0, "key")
            .ok_or_else(|| Error::BadRequest("message_cache needs a key".into()))
    };
    let data = |index: usize| match args.get(index, "data") {
        Some(Value::Binary(b)) => Ok(bytes::Bytes::copy_from_slice(b)),
        _ => Err(Error::BadRequest("message_cache data must be bytes".into())),
    };
    let limit = if ctx.user.is_anonymous() {
        crate::rpc::cache::MAX_BYTES_ANONYMOUS
    } else {
        crate::rpc::cache::MAX_BYTES_SIGNED_IN
    };
    let cache = &app.peer.cache;
    match function {
        "ping" => Ok("pong".into()),
        "get_service" => {
            let name = args.get_str(0, "service_id").unwrap_or("default");
            let name = name.rsplit(':').next().unwrap_or(name);
            app.hosted
                .get(name)
                .map(|service| service.description(app))
                .ok_or_else(|| Error::NotFound(format!("Service not found: {name}")))
        }
        "message_cache.create" => {
            let overwrite = args
                .get(2, "overwrite")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            cache.create(owner, key()?, overwrite)?;
            Ok(Value::Nil)
        }
        "message_cache.append" => {
            cache.put(owner, key()?, None, data(1)?, limit)?;
            Ok(Value::Nil)
        }
        "message_cache.set" => {
            let index = args
                .get(1, "index")
                .and_then(Value::as_u64)
                .ok_or_else(|| Error::BadRequest("message_cache.set needs an index".into()))?;
            cache.put(owner, key()?, Some(index), data(2)?, limit)?;
            Ok(Value::Nil)
        }
        "message_cache.remove" => {
            cache.remove(owner, key()?)?;
            Ok(Value::Nil)
        }
        "message_cache.process" => {
            // The assembled call counts among its caller's calls, as one sent whole would.
            let running = match &ctx.slots {
                Some(slots) => Some(slots.clone().try_acquire_owned().map_err(|_| {
                    Error::TooManyRequests(
                        "too many calls to the server in flight from this connection; wait for some to finish".into(),
                    )
                })?),
                None => None,
            };
            let frame = cache.take(owner, key()?)?;
            let incoming = Incoming {
                from: ctx.from.clone(),
                ws: ctx.ws.clone(),
                user: ctx.user.clone(),
                to: ctx.to.clone(),
                frame,
                peer_ip: ctx.peer_ip,
                slots: ctx.slots.clone(),
            };
            let app = app.clone();
            tokio::spawn(async move {
                super::handle(app, incoming).await;
                drop(running);
            });
            Ok(Value::Nil)
        }
        _ => Err(super::not_found("built-in", function)),
    }
}
