//! The workspace manager service and the service registry, and the dispatcher that runs
//! calls addressed to the server's own services.

pub mod manager;
pub mod registry;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use rmpv::Value;

use crate::AppState;
use crate::error::Error;
use crate::hub::Outbound;
use crate::rpc::frame;
use crate::rpc::peer::{Call, Decoded, Incoming};
use crate::rpc::value::obj;

/// Handles a frame addressed to the server: runs a call and answers it, or completes one of
/// the server's own pending calls.
pub async fn handle(state: Arc<AppState>, incoming: Incoming) {
    let from = incoming.from.clone();
    match state.peer.decode(incoming) {
        Err(e) => tracing::debug!(%from, error = %e, "undecodable call to the server"),
        Ok(Decoded::Reply | Decoded::Ignored) => {}
        Ok(Decoded::Call(call)) => run_call(&state, *call).await,
    }
}

async fn run_call(state: &Arc<AppState>, call: Call) {
    let work = dispatch(state, &call);
    tokio::pin!(work);
    let outcome = match call.reply.as_ref().and_then(|r| r.interval) {
        Some(interval) => loop {
            tokio::select! {
                outcome = &mut work => break outcome,
                _ = tokio::time::sleep(interval) => state.peer.heartbeat(&call).await,
            }
        },
        None => work.await,
    };
    state.peer.reply(&call, outcome).await;
}

/// Runs a call on a hosted service: `services.<service>.<function>`.
fn dispatch<'a>(state: &'a Arc<AppState>, call: &'a Call) -> BoxFuture<'a, Result<Value, Error>> {
    Box::pin(async move {
        let (service, function) = call.target()?;
        match service {
            "built-in" => builtin(state, call, function).await,
            _ => call_hosted(state, service, function, &call.ctx, &call.args).await,
        }
    })
}

/// Services the server hosts besides the manager, registered in `public` like any other.
pub const HOSTED_PUBLIC: &[(&str, &str)] = &[
    ("coturn", "TURN credentials for WebRTC"),
    ("hypha-login", "Sign in to this server"),
    (
        "video-producer",
        "Demo video producer: offer() answers a WebRTC offer with live video",
    ),
];

/// Registers the hosted public services, so one lookup path serves them and client services.
pub fn register_hosted(state: &AppState) {
    for (name, description) in HOSTED_PUBLIC {
        if *name == "video-producer" && !state.settings.demo.enabled {
            continue;
        }
        let id = format!("public/{}:{name}", state.manager_id);
        let info = obj([
            ("id", id.as_str().into()),
            ("name", (*name).into()),
            ("description", (*description).into()),
            ("type", "functions".into()),
            (
                "config",
                obj([
                    ("visibility", "public".into()),
                    ("require_context", true.into()),
                ]),
            ),
        ]);
        match crate::ids::ServiceId::parse(&id)
            .map_err(|e| Error::Internal(e.to_string()))
            .and_then(|id| registry::ServiceEntry::from_info(id, info))
        {
            Ok(entry) => state.registry.insert(entry),
            Err(e) => tracing::error!(error = %e, "cannot register hosted service {name}"),
        }
    }
}

/// Runs a function of a service the server hosts: the manager (`default`) or a public one.
pub async fn call_hosted(
    state: &Arc<AppState>,
    service: &str,
    function: &str,
    ctx: &crate::rpc::peer::CallContext,
    args: &crate::rpc::value::Args,
) -> Result<Value, Error> {
    match (service, function) {
        ("default", _) => manager::call(state, function, ctx, args).await,
        ("coturn", "get_rtc_ice_servers") => state.ice.ice_servers(&ctx.user, args).await,
        ("hypha-login", _) => crate::auth::login::call(state, function, args).await,
        ("video-producer", "offer") if state.settings.demo.enabled => {
            let params = args
                .get(0, "params")
                .ok_or_else(|| Error::BadRequest("offer needs {sdp, type}".into()))?;
            let sdp = crate::rpc::value::get_str(params, "sdp")
                .ok_or_else(|| Error::BadRequest("the offer has no sdp".into()))?;
            if crate::rpc::value::get_str(params, "type") != Some("offer") {
                return Err(Error::BadRequest("type must be \"offer\"".into()));
            }
            let answer = crate::demo::peer::start(&state.demo, sdp, ctx.user.clone()).await?;
            Ok(obj([
                ("sdp", answer.into()),
                ("type", "answer".into()),
                ("workspace", "public".into()),
            ]))
        }
        _ => Err(Error::NotFound(format!(
            "Method not found: services.{service}.{function}"
        ))),
    }
}

/// The manager's `built-in` service: `get_service`, `ping` and `message_cache`.
async fn builtin(state: &Arc<AppState>, call: &Call, function: &str) -> Result<Value, Error> {
    let args = &call.args;
    let owner = call.ctx.from.as_str();
    let key = || {
        args.get_str(0, "key")
            .ok_or_else(|| Error::BadRequest("message_cache needs a key".into()))
    };
    let data = |index: usize| match args.get(index, "data") {
        Some(Value::Binary(b)) => Ok(b.clone()),
        _ => Err(Error::BadRequest("message_cache data must be bytes".into())),
    };
    match function {
        "ping" => Ok("pong".into()),
        "get_service" => {
            let name = args.get_str(0, "service_id").unwrap_or("default");
            let name = name.rsplit(':').next().unwrap_or(name);
            manager::hosted_description(state, name)
                .ok_or_else(|| Error::NotFound(format!("Service not found: {name}")))
        }
        "message_cache.create" => {
            let overwrite = args
                .get(2, "overwrite")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            state
                .peer
                .cache_create(owner, key()?, overwrite)
                .map(|_| Value::Nil)
        }
        "message_cache.append" => state
            .peer
            .cache_put(owner, key()?, None, data(1)?)
            .map(|_| Value::Nil),
        "message_cache.set" => {
            let index = args
                .get(1, "index")
                .and_then(Value::as_u64)
                .ok_or_else(|| Error::BadRequest("message_cache.set needs an index".into()))?;
            state
                .peer
                .cache_put(owner, key()?, Some(index), data(2)?)
                .map(|_| Value::Nil)
        }
        "message_cache.remove" => state.peer.cache_remove(owner, key()?).map(|_| Value::Nil),
        "message_cache.process" => {
            let frame = state.peer.cache_take(owner, key()?)?;
            let incoming = Incoming {
                from: call.ctx.from.clone(),
                ws: call.ctx.ws.clone(),
                user: call.ctx.user.clone(),
                to: call.ctx.to.clone(),
                frame,
            };
            tokio::spawn(handle(state.clone(), incoming));
            Ok(Value::Nil)
        }
        _ => Err(Error::NotFound(format!(
            "Method not found: {}",
            call.method
        ))),
    }
}

/// Sends a manager event (`client_disconnected`, `service_added`, ...) to the clients of a
/// workspace that subscribed to it.
pub async fn emit(state: &AppState, workspace: &str, event: &str, data: Value) {
    let subscribers = state.hub.subscribers(workspace, event);
    if subscribers.is_empty() {
        return;
    }
    let from = state.peer.manager_addr();
    for addr in subscribers {
        let header = obj([
            ("type", event.into()),
            ("from", from.as_str().into()),
            ("to", addr.as_str().into()),
            ("ws", workspace.into()),
            ("data", data.clone()),
        ]);
        let _ = state
            .hub
            .send(&addr, Outbound::Binary(frame::encode(&header, None)))
            .await;
    }
}
