//! The workspace manager service and the service registry, and the dispatcher that runs
//! calls addressed to the server's own services.

pub mod client_log;
pub mod manager;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use rmpv::Value;

use crate::AppState;
use crate::error::Error;
use crate::hub::Outbound;
use crate::registry::{self, ServiceEntry, ServiceQuery};
use crate::rpc::frame;
use crate::rpc::peer::{Call, Decoded, Incoming};
use crate::rpc::value::obj;

/// Handles a frame addressed to the server: runs a call and answers it, or completes one of
/// the server's own pending calls.
pub async fn handle(state: Arc<AppState>, incoming: Incoming) {
    let from = incoming.from.clone();
    let to = incoming.to.clone();
    let frame = incoming.frame.clone();
    match state.peer.decode(incoming) {
        Err(e) => {
            tracing::debug!(%from, error = %e, "undecodable call to the server");
            // A call that asked for an answer learns why it was refused.
            if let Some(reject) = crate::rpc::peer::refusal(&frame, &to, &from, &e.to_string()) {
                let _ = state.hub.send(&from, Outbound::Binary(reject)).await;
            }
        }
        Ok(Decoded::Reply | Decoded::Ignored) => {}
        Ok(Decoded::Call(call)) => run_call(&state, *call).await,
    }
}

async fn run_call(state: &Arc<AppState>, call: Call) {
    let running = state.hub.inflight.server_call();
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
    running.finished(outcome.is_ok());
    state
        .peer
        .reply(&call, outcome.map_err(|e| e.public_message()))
        .await;
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

/// Names in `public` only the server's own services may have.
pub fn is_reserved_public_name(name: &str) -> bool {
    matches!(name, "default" | "built-in") || HOSTED_PUBLIC.iter().any(|(n, _)| *n == name)
}

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
        ("coturn", "get_rtc_ice_servers") => ice_servers(state, ctx, args).await,
        ("hypha-login", _) => crate::auth::login::call(state, function, ctx, args).await,
        ("video-producer", "offer") if state.settings.demo.enabled => {
            let params = args
                .get(0, "params")
                .ok_or_else(|| Error::BadRequest("offer needs {sdp, type}".into()))?;
            let sdp = crate::rpc::value::get_str(params, "sdp")
                .ok_or_else(|| Error::BadRequest("the offer has no sdp".into()))?;
            if crate::rpc::value::get_str(params, "type") != Some("offer") {
                return Err(Error::BadRequest("type must be \"offer\"".into()));
            }
            let answer =
                crate::demo::peer::start(&state.demo, sdp, ctx.user.clone(), ctx.peer_ip).await?;
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

/// `get_rtc_ice_servers(ttl=43200, test_connectivity=True)`, positional or keyword.
pub async fn ice_servers(
    state: &AppState,
    ctx: &crate::rpc::peer::CallContext,
    args: &crate::rpc::value::Args,
) -> Result<Value, Error> {
    let ttl = match args.get(0, "ttl") {
        None => None,
        Some(v) => Some(v.as_u64().filter(|t| *t > 0).ok_or_else(|| {
            Error::BadRequest(format!(
                "ttl must be a positive integer number of seconds, not {v}"
            ))
        })?),
    };
    let test_connectivity = match args.get(1, "test_connectivity") {
        None => true,
        Some(Value::Boolean(b)) => *b,
        Some(v) => {
            return Err(Error::BadRequest(format!(
                "test_connectivity must be true or false, not {v}"
            )));
        }
    };
    let request = crate::turn::IceRequest {
        ttl,
        test_connectivity,
    };
    let servers = state.ice.ice_servers(&ctx.user, request).await?;
    Ok(crate::rpc::value::from_json(&servers))
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
        Some(Value::Binary(b)) => Ok(bytes::Bytes::copy_from_slice(b)),
        _ => Err(Error::BadRequest("message_cache data must be bytes".into())),
    };
    let limit = if call.ctx.user.is_anonymous() {
        crate::rpc::cache::MAX_BYTES_ANONYMOUS
    } else {
        crate::rpc::cache::MAX_BYTES_SIGNED_IN
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
                .cache
                .create(owner, key()?, overwrite)
                .map(|_| Value::Nil)
                .map_err(Error::from)
        }
        "message_cache.append" => state
            .peer
            .cache
            .put(owner, key()?, None, data(1)?, limit)
            .map(|_| Value::Nil)
            .map_err(Error::from),
        "message_cache.set" => {
            let index = args
                .get(1, "index")
                .and_then(Value::as_u64)
                .ok_or_else(|| Error::BadRequest("message_cache.set needs an index".into()))?;
            state
                .peer
                .cache
                .put(owner, key()?, Some(index), data(2)?, limit)
                .map(|_| Value::Nil)
                .map_err(Error::from)
        }
        "message_cache.remove" => state
            .peer
            .cache
            .remove(owner, key()?)
            .map(|_| Value::Nil)
            .map_err(Error::from),
        "message_cache.process" => {
            let frame = state.peer.cache.take(owner, key()?)?;
            let incoming = Incoming {
                from: call.ctx.from.clone(),
                ws: call.ctx.ws.clone(),
                user: call.ctx.user.clone(),
                to: call.ctx.to.clone(),
                frame,
                peer_ip: call.ctx.peer_ip,
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
/// workspace that subscribed to it, on every instance.
pub async fn emit(state: &AppState, workspace: &str, event: &str, data: Value) {
    let bus = state.hub.bus();
    if bus.is_shared() {
        let announcement = crate::cluster::bus::Announcement::Event {
            workspace: workspace.to_string(),
            event: event.to_string(),
            data: data.clone(),
        };
        if let Err(e) = bus.announce(announcement).await {
            tracing::debug!(error = %e, event, "an event reached this instance only");
        }
    }
    emit_local(state, workspace, event, data).await;
}

/// Sends a manager event to the subscribers connected to this instance.
pub async fn emit_local(state: &AppState, workspace: &str, event: &str, data: Value) {
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
            .send_local(&addr, Outbound::Binary(frame::encode(&header, None)))
            .await;
    }
}

/// Services of a workspace on every instance, in registration order.
pub async fn services_in(state: &AppState, workspace: &str) -> Result<Vec<ServiceEntry>, Error> {
    let mut found = state.registry.in_workspace(workspace);
    let elsewhere = state.directory.services_in(workspace).await?;
    if !elsewhere.is_empty() {
        found.extend(elsewhere);
        found.sort_by_key(ServiceEntry::seq);
    }
    Ok(found)
}

/// Services answering a query, on every instance, in registration order.
pub async fn find_services(
    state: &AppState,
    query: &ServiceQuery,
) -> Result<Vec<ServiceEntry>, Error> {
    let mut found = services_in(state, &query.workspace).await?;
    found.retain(|e| query.matches(e));
    Ok(found)
}

/// Client ids connected to a workspace, on every instance, sorted.
pub async fn clients_in(state: &AppState, workspace: &str) -> Result<Vec<String>, Error> {
    let mut clients = state.hub.clients_in(workspace);
    clients.extend(state.directory.clients_in(workspace).await?);
    clients.sort();
    clients.dedup();
    Ok(clients)
}

/// Whether the shared registry can be written now. While Redis is away, writes are skipped
/// rather than left to time out one by one (holding up connections); the resync that follows
/// the reconnection writes this instance's state back.
pub fn directory_reachable(state: &AppState) -> bool {
    !state.directory.is_shared() || state.hub.bus().is_up()
}

/// Registers a service of a client connected here, in the shared registry too.
pub async fn add_service(state: &AppState, entry: ServiceEntry) -> Result<(), Error> {
    let entry = state.registry.stamp(entry);
    if !directory_reachable(state) {
        return Err(Error::Unavailable(
            "the shared service registry (Redis) is unavailable; register again once it is back"
                .into(),
        ));
    }
    let _writes = state.directory.writes().lock().await;
    state.directory.put_service(&entry).await?;
    state.registry.insert(entry);
    Ok(())
}

/// Withdraws services that were removed from the local registry from the shared one; what
/// cannot be withdrawn now is withdrawn when this instance next writes its state.
async fn withdraw(state: &AppState, removed: &[ServiceEntry]) {
    if directory_reachable(state)
        && let Err(e) = state.directory.remove_services(removed).await
    {
        tracing::warn!(error = %e, "services stay in Redis until it is back");
    }
}

/// Unregisters a service (every app id of it); returns what was removed.
pub async fn remove_service(state: &AppState, id: &crate::ids::ServiceId) -> Vec<ServiceEntry> {
    let _writes = state.directory.writes().lock().await;
    let removed = state.registry.remove(id);
    withdraw(state, &removed).await;
    removed
}

/// Forgets a client that left this instance: its services and its place on the bus. Returns
/// its services, or `None` when a newer connection holds the address.
pub async fn remove_client(
    state: &AppState,
    addr: &str,
    workspace: &str,
    conn_id: u64,
) -> Option<Vec<ServiceEntry>> {
    let _writes = state.directory.writes().lock().await;
    if !state.hub.remove(addr, workspace, conn_id) {
        return None;
    }
    let removed = state.registry.remove_client(addr);
    state.hub.bus().detach(addr).await;
    if directory_reachable(state) {
        withdraw(state, &removed).await;
        let client = addr.rsplit('/').next().unwrap_or(addr);
        if let Err(e) = state.directory.remove_client(workspace, client).await {
            tracing::warn!(error = %e, "a client stays in Redis until it is back");
        }
    }
    Some(removed)
}

/// Records a client that connected here, on the bus and in the shared registry. When another
/// instance holds the client id too, the claims are compared (see
/// [`crate::cluster::ClientClaim::wins_over`]): the loser's connection is closed.
pub async fn add_client(state: &AppState, addr: &str, workspace: &str) {
    if let Err(e) = state.hub.bus().attach(addr).await {
        tracing::warn!(client = addr, error = %e, "the client is reachable from other instances once Redis is back");
    }
    if directory_reachable(state) {
        let _writes = state.directory.writes().lock().await;
        claim(state, addr, workspace).await;
    }
}

/// Claims a client of this instance in the shared registry and settles a conflict with
/// another instance's claim.
async fn claim(state: &AppState, addr: &str, workspace: &str) {
    let Some(handle) = state.hub.get(addr) else {
        return;
    };
    let directory = &state.directory;
    let client = addr.rsplit('/').next().unwrap_or(addr);
    let (since, reconnected) = (handle.since_ms, handle.reconnected);
    let other = match directory
        .claim_client(workspace, client, since, reconnected)
        .await
    {
        Ok(other) => other,
        Err(e) => {
            tracing::warn!(client = addr, error = %e, "the client is listed on other instances once Redis is back");
            return;
        }
    };
    let Some(other) = other else {
        return;
    };
    let mine = crate::cluster::ClientClaim {
        owner: directory.instance().to_string(),
        since_ms: since,
        reconnected,
    };
    if !mine.wins_over(&other) {
        tracing::warn!(client = addr, other = %other.owner, "closing a connection whose client id another instance holds");
        handle.close(&format!(
            "Client already exists and is active: {addr} is connected through another server instance"
        ));
        return;
    }
    if let Err(e) = directory
        .force_client(workspace, client, since, reconnected)
        .await
    {
        tracing::warn!(client = addr, error = %e, "cannot take the client over in Redis yet");
    }
    let kick = crate::cluster::bus::Announcement::Kick {
        addr: addr.to_string(),
        keep: directory.instance().to_string(),
    };
    if let Err(e) = state.hub.bus().announce(kick).await {
        tracing::warn!(client = addr, error = %e, "cannot tell the other instance to close the old connection");
    }
}

/// Writes this instance's clients and services to the shared registry again (after Redis
/// restarted or forgot this instance), dropping what it no longer has.
pub async fn resync(state: &AppState) {
    let _writes = state.directory.writes().lock().await;
    let services: Vec<ServiceEntry> = state
        .registry
        .all()
        .into_iter()
        .filter(|e| e.id.provider.client.as_str() != state.manager_id)
        .collect();
    let clients = state.hub.addresses();
    match state.directory.resync(&services, &clients).await {
        Ok(()) => tracing::info!(
            clients = clients.len(),
            services = services.len(),
            "wrote this instance's clients and services to Redis"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot write this instance's state to Redis yet"),
    }
    // Claim each client again: one that another instance took meanwhile (while Redis was
    // away) is settled now, and the loser's connection closed.
    for (ws, client) in &clients {
        claim(state, &format!("{ws}/{client}"), ws).await;
    }
}

/// Renews this instance's lease and clears up after instances whose lease ran out, until
/// `stop` (several instances only).
pub async fn keep_lease(
    state: std::sync::Arc<AppState>,
    stop: tokio_util::sync::CancellationToken,
) {
    if !state.directory.is_shared() {
        return;
    }
    let mut ticker = tokio::time::interval(crate::cluster::directory::HEARTBEAT);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match state.directory.heartbeat().await {
            Ok(forgotten) => {
                if failing {
                    tracing::info!("Redis is reachable again");
                    failing = false;
                }
                if forgotten {
                    resync(&state).await;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot renew this instance's lease");
                    failing = true;
                }
                continue;
            }
        }
        for dead in state.directory.expired() {
            match state.directory.reap(&dead).await {
                Ok(released) => announce_released(&state, &dead, released).await,
                Err(e) => {
                    tracing::warn!(instance = %dead, error = %e, "cannot clear a dead instance's entries yet")
                }
            }
        }
    }
}

/// Tells every instance what a dead instance's clients and services were.
async fn announce_released(state: &AppState, dead: &str, released: crate::cluster::Released) {
    if released.services.is_empty() && released.clients.is_empty() {
        return;
    }
    tracing::info!(
        instance = dead,
        clients = released.clients.len(),
        services = released.services.len(),
        "cleared the entries of an instance whose lease ran out"
    );
    for entry in released.services {
        let ws = entry.id.provider.workspace.to_string();
        emit(state, &ws, "service_removed", entry.info).await;
    }
    for (ws, client) in released.clients {
        state.peer.peer_gone(&format!("{ws}/{client}"));
        let data = obj([
            ("id", client.as_str().into()),
            ("workspace", ws.as_str().into()),
        ]);
        emit(state, &ws, "client_disconnected", data).await;
    }
}
