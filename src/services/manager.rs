//! The workspace manager (`*/manager-<id>:default`): registering, finding and listing services,
//! tokens, events. Every function carries an `_rschema`, which the clients require.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use rmpv::Value;
use serde_json::json;

use super::HostedService;
use crate::AppState;
use crate::auth::{Permission, UserInfo};
use crate::error::Error;
use crate::ids::ServiceId;
use crate::registry::{ServiceEntry, ServiceQuery};
use crate::rpc::describe::{self, Envelope, Function};
use crate::rpc::peer::{CallContext, CallOptions};
use crate::rpc::value::{self, Args, get, get_str, obj};

/// The manager's functions; `get_rtc_ice_servers` is described once, with `coturn`'s.
static FUNCTIONS: LazyLock<Vec<Function>> = LazyLock::new(|| {
    let mut functions = vec![
        Function::new(
            "echo",
            "Return the data unchanged.",
            json!({"data":{"description":"Any value"}}),
            &["data"],
        ),
        Function::new(
            "ping",
            "Ping a client (ws/client or client): 'pong' when it answers, otherwise why not; without a client, answer 'pong'.",
            json!({"client_id":{"type":"string"},"timeout":{"type":"number","description":"Seconds, default 5, at most 30"}}),
            &[],
        ),
        Function::new(
            "log",
            "Write a message to the server log.",
            json!({"msg":{"type":"string"}}),
            &["msg"],
        ),
        Function::new("check_status", "Report the server status.", json!({}), &[]),
        Function::new(
            "list_clients",
            "List the clients connected to a workspace.",
            json!({"workspace":{"type":"string"}}),
            &[],
        ),
        Function::new(
            "register_service",
            "Register a service of the calling client.",
            json!({"service":{"type":"object","description":"Service info with id, config, name, type"},"config":{"type":"object"}}),
            &["service"],
        ),
        Function::new(
            "unregister_service",
            "Remove a service of the calling client.",
            json!({"service_id":{"type":"string"}}),
            &["service_id"],
        ),
        Function::new(
            "get_service_info",
            "Find a service and return its info.",
            json!({"service_id":{"type":"string","description":"svc, ws/svc or ws/client:svc[@app]"},"config":{"type":"object","description":"mode: exact, random, first or last"}}),
            &["service_id"],
        ),
        Function::new(
            "get_service",
            "Find a service and return its functions.",
            json!({"service_id":{"type":"string","description":"svc, ws/svc or ws/client:svc[@app]"},"config":{"type":"object","description":"mode: exact, random, first or last; timeout in seconds"}}),
            &["service_id"],
        ),
        Function::new(
            "list_services",
            "List the services visible to the caller: a workspace (* for all), a pattern ws/client:svc, or a dict with workspace, client_id, service_id, app_id, type, visibility.",
            json!({"query":{"description":"Workspace name, ws/client:svc pattern (* wildcards), or a dict"},"include_unlisted":{"type":"boolean"},"include_app_services":{"type":"boolean"},"prioritize_running_services":{"type":"boolean"}}),
            &[],
        ),
        Function::new(
            "generate_token",
            "Mint a token for a workspace the caller administers.",
            json!({"config":{"type":"object","description":"workspace, permission (read, read_write, admin), expires_in, client_id"}}),
            &[],
        ),
        Function::new(
            "revoke_token",
            "Revoke a token (your own, one you issued, or any as an admin); it is refused from then on.",
            json!({"token":{"type":"string"}}),
            &["token"],
        ),
        Function::new(
            "parse_token",
            "Verify a token and return the user it names.",
            json!({"token":{"type":"string"}}),
            &["token"],
        ),
        Function::new(
            "subscribe",
            "Receive manager events such as client_disconnected and service_added.",
            json!({"event_types":{"description":"An event type or a list of them"}}),
            &["event_types"],
        ),
        Function::new(
            "unsubscribe",
            "Stop receiving manager events.",
            json!({"event_types":{"description":"An event type or a list of them"}}),
            &["event_types"],
        ),
    ];
    functions.push(super::coturn::ice_function());
    functions.extend(super::workspace_data::functions());
    functions.extend(super::workspaces::functions());
    functions
});

/// The workspace manager, `*/manager-<id>:default`.
pub(crate) struct Manager;

impl HostedService for Manager {
    fn name(&self) -> &'static str {
        "default"
    }

    fn summary(&self) -> &'static str {
        "The hypha-rtc workspace manager"
    }

    fn public(&self) -> bool {
        false
    }

    fn functions(&self) -> &[Function] {
        &FUNCTIONS
    }

    /// Called at the manager's global address, from any workspace.
    fn description(&self, app: &AppState) -> Value {
        let target = app.peer.manager_addr();
        let id = format!("{target}:default");
        let envelope = Envelope {
            id: &id,
            name: "default",
            kind: self.kind(),
            description: self.summary(),
            config: describe::public_config("*"),
        };
        let mut described = describe::describe(&target, envelope, self.functions());
        value::set(&mut described, "name", "Workspace Manager".into());
        described
    }

    fn call<'a>(
        &'a self,
        app: &'a Arc<AppState>,
        ctx: &'a CallContext,
        function: &'a str,
        args: &'a Args,
    ) -> BoxFuture<'a, Result<Value, Error>> {
        Box::pin(call(app, function, ctx, args))
    }
}

/// Runs a manager function.
async fn call(
    state: &Arc<AppState>,
    function: &str,
    ctx: &CallContext,
    args: &Args,
) -> Result<Value, Error> {
    match function {
        "echo" => Ok(args.get(0, "data").cloned().unwrap_or(Value::Nil)),
        "ping" => match args.get_str(0, "client_id") {
            None => Ok("pong".into()),
            Some(client) => ping(state, ctx, client, args.get(1, "timeout")).await,
        },
        "log" => {
            let message = args.require_str(0, "msg")?;
            let who = match (&ctx.user.token, ctx.peer_ip) {
                (Some(_), _) | (None, None) => ctx.user.account().to_string(),
                (None, Some(ip)) => crate::net::client_addr::address_key(ip).to_string(),
            };
            state
                .client_log
                .write(&ctx.from, &who, ctx.user.is_anonymous(), message)?;
            Ok(Value::Nil)
        }
        "check_status" => Ok(obj([
            ("status", "ok".into()),
            ("version", env!("CARGO_PKG_VERSION").into()),
            ("connections", (state.hub.connection_count() as u64).into()),
            ("services", (state.registry.len() as u64).into()),
        ])),
        "list_clients" => {
            let ws = args.get_str(0, "workspace").unwrap_or(&ctx.ws);
            need(state, &ctx.user, ws, Permission::Read)?;
            let clients = crate::workspace::clients_in(state, ws).await?;
            Ok(Value::Array(
                clients
                    .into_iter()
                    .map(|c| format!("{ws}/{c}").into())
                    .collect(),
            ))
        }
        "register_service" => register_service(state, ctx, args).await,
        "unregister_service" => {
            let id = args
                .get_str(0, "service_id")
                .ok_or_else(|| Error::BadRequest("unregister_service needs a service_id".into()))?;
            if state.hub.get(&ctx.from).is_none() {
                return Err(Error::BadRequest(
                    "only websocket clients unregister services".into(),
                ));
            }
            let id = own_service_id(ctx, id)?;
            let removed = crate::workspace::remove_service(state, &id).await;
            if removed.is_empty() {
                return Err(Error::NotFound(format!("Service not found: {id}")));
            }
            for entry in removed {
                crate::workspace::emit(state, &ctx.ws, "service_removed", entry.into_info()).await;
            }
            Ok(Value::Nil)
        }
        "get_service_info" => {
            let (query, config) = query_args(args)?;
            Ok(resolve(state, &ctx.ws, &ctx.user, query, mode(config)?)
                .await?
                .into_info())
        }
        "get_service" => {
            let (query, config) = query_args(args)?;
            get_service(state, &ctx.ws, &ctx.user, query, config).await
        }
        "get_rtc_ice_servers" => super::coturn::ice_servers(state, ctx, args).await,
        "list_services" => super::listing::list_services(state, ctx, args).await,
        "parse_token" => {
            let token = args.require_str(0, "token")?;
            let user = state
                .tokens
                .parse(token)
                .map_err(|e| Error::BadRequest(format!("Invalid token: {e}")))?;
            Ok(value::from_json(&user.to_json()))
        }
        "revoke_token" => {
            let token = args.require_str(0, "token")?;
            revoke_token(state, &ctx.user, token).await?;
            Ok(Value::Nil)
        }
        "generate_token" => generate_token(state, ctx, args),
        "subscribe" | "unsubscribe" => {
            let events: Vec<String> = match args.get(0, "event_types") {
                Some(Value::String(s)) => {
                    s.as_str().map(|s| vec![s.to_string()]).unwrap_or_default()
                }
                Some(Value::Array(items)) => items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => {
                    return Err(Error::BadRequest(
                        "event_types must be a string or a list of strings".into(),
                    ));
                }
            };
            let handle = state
                .hub
                .get(&ctx.from)
                .ok_or_else(|| Error::BadRequest("only websocket clients can subscribe".into()))?;
            if events.iter().any(|e| e.len() > 64) {
                return Err(Error::BadRequest(
                    "an event type has at most 64 characters".into(),
                ));
            }
            if function == "subscribe"
                && let Some((ws, client)) = ctx.from.split_once('/')
            {
                state.hub.watch(ws, client);
            }
            if let Ok(mut subscribed) = handle.events.lock() {
                for event in events {
                    if function == "subscribe" {
                        if subscribed.len() < 64 {
                            subscribed.insert(event);
                        }
                    } else {
                        subscribed.remove(&event);
                    }
                }
            }
            Ok(Value::Nil)
        }
        _ => {
            if let Some(result) = super::workspace_data::call(state, ctx, function, args).await {
                return result;
            }
            match super::workspaces::call(state, ctx, function, args).await {
                Some(result) => result,
                None => Err(super::not_found("default", function)),
            }
        }
    }
}

/// Revokes a token (and every token derived from it) for `caller`: its own user, the account
/// at the root of its family, or an admin. The same checks whether asked over RPC or from the
/// admin page.
pub(crate) async fn revoke_token(
    state: &AppState,
    caller: &UserInfo,
    token: &str,
) -> Result<(), Error> {
    let user = state
        .tokens
        .verify(token)
        .map_err(|e| Error::BadRequest(format!("Invalid token: {e}")))?;
    // The token's own user, the account at the root of its family, or an admin; a child's
    // holder cannot revoke its parent's tokens.
    let allowed = user.id == caller.id || user.account() == &caller.id || caller.is_admin();
    if !allowed || caller.is_anonymous() {
        return Err(Error::PermissionDenied(
            "Only the token's user, its issuer or an admin may revoke it".into(),
        ));
    }
    let Some(revoked) = user.token else {
        return Err(Error::BadRequest("Invalid token: it names no token".into()));
    };
    if !caller.is_admin() && !state.tokens.may_revoke(caller.account()) {
        return Err(Error::TooManyRequests(format!(
            "too many revocations from this account (at most {} a minute); try again shortly",
            crate::auth::token::REVOCATIONS_PER_MINUTE
        )));
    }
    let id = revoked.id;
    let expires_at = revoked.expires_at;
    // Refused here at once, even if the store fails below.
    state.revoke_locally(id.clone(), expires_at);
    state
        .store
        .revoke_token(&id, expires_at, crate::auth::now_secs())
        .await
        .map_err(Error::from)?;
    let bus = state.hub.bus();
    if bus.is_shared()
        && let Err(e) = bus
            .announce(crate::cluster::bus::Announcement::Revoked { id, expires_at })
            .await
    {
        // The other instances read it from the store within a minute.
        tracing::warn!(error = %e, "the revocation reaches the other instances through the store");
    }
    Ok(())
}

/// `ping(client_id, timeout=5)`: calls the client's `built-in` `ping`. Hypha's contract: it
/// never raises for an unreachable client but says why in the answer; a client the caller
/// may not see is refused.
async fn ping(
    state: &AppState,
    ctx: &CallContext,
    client: &str,
    timeout: Option<&Value>,
) -> Result<Value, Error> {
    let (ws, id) = client.split_once('/').unwrap_or((&ctx.ws, client));
    let addr = crate::ids::PeerAddr::from_parts(ws, id).ok_or_else(|| {
        Error::BadRequest(format!(
            "invalid client id {:?}: use client or workspace/client",
            client.chars().take(64).collect::<String>()
        ))
    })?;
    need(state, &ctx.user, &ctx.ws, Permission::Read)?;
    need(state, &ctx.user, addr.workspace.as_str(), Permission::Read)?;
    if addr.client.as_str() == state.manager_id() {
        return Ok("pong".into());
    }
    let seconds = timeout
        .and_then(|t| t.as_f64().or_else(|| t.as_i64().map(|i| i as f64)))
        .filter(|t| t.is_finite() && *t > 0.0)
        .unwrap_or(5.0)
        .min(30.0);
    let options = CallOptions {
        from: &state.peer.manager_addr(),
        ws: addr.workspace.as_str(),
        user: &state.peer.server_user,
        timeout: Duration::from_secs_f64(seconds),
        with_kwargs: false,
    };
    let target = addr.to_string();
    let answer = state
        .peer
        .call(
            &target,
            "services.built-in.ping",
            vec!["ping".into()],
            &options,
        )
        .await;
    Ok(match answer {
        Ok(Value::String(s)) if s.as_str() == Some("pong") => "pong".into(),
        Ok(_) => format!("Failed to ping client {target}: it did not answer 'pong'").into(),
        Err(e) => format!("Failed to ping client {target}: {e}").into(),
    })
}

/// The caller's permission in `workspace` if it is at least `at_least`, else a refusal.
pub(crate) fn need(
    state: &AppState,
    user: &UserInfo,
    workspace: &str,
    at_least: Permission,
) -> Result<Permission, Error> {
    match state.workspaces.permission(user, workspace) {
        Some(p) if p >= at_least => Ok(p),
        _ => Err(Error::PermissionDenied(format!(
            "Permission denied for workspace {workspace}: {} access is required",
            match at_least {
                Permission::Read => "read",
                Permission::ReadWrite => "read_write",
                Permission::Admin => "admin",
            }
        ))),
    }
}

/// Makes a service id absolute and checks that it belongs to the caller.
fn own_service_id(ctx: &CallContext, id: &str) -> Result<ServiceId, Error> {
    let full = if id.contains(':') {
        if id.contains('/') {
            id.to_string()
        } else {
            format!("{}/{id}", ctx.ws)
        }
    } else {
        format!("{}:{id}", ctx.from)
    };
    let parsed = ServiceId::parse(&full).map_err(|e| Error::BadRequest(e.to_string()))?;
    if parsed.provider.to_string() != ctx.from {
        return Err(Error::PermissionDenied(format!(
            "a client may only manage its own services ({}), not {full}",
            ctx.from
        )));
    }
    Ok(parsed)
}

/// Services one client may register, and what one service's info may take (encoded).
const MAX_SERVICES_PER_CLIENT: usize = 256;
const MAX_SERVICES_PER_CLIENT_ANONYMOUS: usize = 32;
const MAX_SERVICE_INFO: usize = 256 * 1024;

async fn register_service(
    state: &Arc<AppState>,
    ctx: &CallContext,
    args: &Args,
) -> Result<Value, Error> {
    let info = args
        .get(0, "service")
        .filter(|v| v.is_map())
        .ok_or_else(|| {
            Error::BadRequest("register_service needs the service info as a dict".into())
        })?
        .clone();
    need(state, &ctx.user, &ctx.ws, Permission::ReadWrite)?;
    // A service lives as long as its client's connection; an HTTP request has none.
    if state.hub.get(&ctx.from).is_none() {
        return Err(Error::BadRequest(
            "only websocket clients register services (a service lives as long as its client's connection)".into(),
        ));
    }
    let size = value::encode(&info).len();
    if size > MAX_SERVICE_INFO {
        return Err(Error::BadRequest(format!(
            "the service info takes {size} bytes; at most {MAX_SERVICE_INFO} are kept"
        )));
    }
    let id = get_str(&info, "id")
        .ok_or_else(|| Error::BadRequest("the service info has no id".into()))?;
    let mut id = own_service_id(ctx, id)?;
    let limit = if ctx.user.is_anonymous() {
        MAX_SERVICES_PER_CLIENT_ANONYMOUS
    } else {
        MAX_SERVICES_PER_CLIENT
    };
    if state.registry.count_of(&ctx.from) >= limit {
        return Err(Error::TooManyRequests(format!(
            "a client may register at most {limit} services"
        )));
    }
    if id.provider.workspace == "public" {
        // `public` is what anonymous callers reach by name: only an explicit admin of it
        // registers there, and never under a name the server's own services answer to.
        need(state, &ctx.user, "public", Permission::Admin)?;
        if super::is_reserved_public_name(id.name.as_str()) {
            return Err(Error::PermissionDenied(format!(
                "the name {} belongs to the server's own service in public",
                id.name
            )));
        }
    }
    let local_only = get(&info, "config")
        .and_then(|c| get(c, "_local_only"))
        .and_then(Value::as_bool)
        == Some(true);
    if id.name.as_str().starts_with("_rintf_") || local_only {
        return Ok(Value::Nil);
    }
    if let Some(app) = get_str(&info, "app_id").filter(|a| !a.is_empty() && *a != "*") {
        id.app = Some(app.to_string());
    }
    let entry = ServiceEntry::from_info(id, info)?;
    let announced = (*entry.info).clone();
    crate::workspace::add_service(state, entry).await?;
    crate::workspace::emit(state, &ctx.ws, "service_added", announced).await;
    Ok(Value::Nil)
}

fn query_args(args: &Args) -> Result<(&str, Option<&Value>), Error> {
    let query = args
        .get_str(0, "service_id")
        .or_else(|| args.get_str(0, "query"))
        .or_else(|| args.get_str(0, "id"))
        .ok_or_else(|| Error::BadRequest("a service id is required".into()))?;
    Ok((query, args.get(1, "config").filter(|c| c.is_map())))
}

/// How `get_service` picks among several services matching a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SelectMode {
    /// Exactly one must match (the default outside `public`).
    Exact,
    /// Any of them, at random (the default in `public`).
    Random,
    /// The first registered.
    First,
    /// The last registered.
    Last,
}

impl std::str::FromStr for SelectMode {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        match text {
            "exact" => Ok(SelectMode::Exact),
            "random" => Ok(SelectMode::Random),
            "first" => Ok(SelectMode::First),
            "last" => Ok(SelectMode::Last),
            other => Err(Error::BadRequest(format!(
                "unknown mode {:?}; use exact, random, first or last",
                other.chars().take(64).collect::<String>()
            ))),
        }
    }
}

/// The `mode` of a `get_service` config, if it names one.
fn mode(config: Option<&Value>) -> Result<Option<SelectMode>, Error> {
    config
        .and_then(|c| get_str(c, "mode"))
        .map(str::parse)
        .transpose()
}

/// A service found for a caller: registered by a client, or hosted by the server itself.
pub(crate) async fn resolve(
    state: &AppState,
    caller_ws: &str,
    user: &UserInfo,
    query: &str,
    mode: Option<SelectMode>,
) -> Result<ServiceEntry, Error> {
    let parsed = ServiceQuery::parse(query, caller_ws)?;
    if parsed.client.as_deref() == Some(state.manager_id()) && parsed.name == "default" {
        let id = ServiceId::parse(&format!("{}/{}:default", caller_ws, state.manager_id()))
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        let info = Manager.description(state);
        return ServiceEntry::from_info(id, info);
    }
    let found = if parsed.workspace == "public" && super::is_reserved_public_name(&parsed.name) {
        // Only this instance's manager answers a reserved public name (its TURN credentials,
        // say): its own registry says all there is, and no other instance is asked, so the
        // answer neither waits for Redis nor fails while Redis is away.
        state.registry.in_workspace_where("public", |e| {
            e.id.provider.client.as_str() == state.manager_id() && parsed.matches(e)
        })
    } else {
        crate::workspace::find_services(state, &parsed).await?
    };
    if found.is_empty() {
        return Err(Error::NotFound(format!("Service not found: {query}")));
    }
    let mut allowed: Vec<ServiceEntry> = found
        .into_iter()
        .filter(|e| e.allows(caller_ws, user, &state.workspaces))
        .collect();
    if allowed.is_empty() {
        return Err(Error::PermissionDenied(format!(
            "Permission denied for protected service {query}: it belongs to workspace {} and is not shared with {caller_ws}",
            parsed.workspace
        )));
    }
    let mode = mode.unwrap_or(if parsed.workspace == "public" {
        SelectMode::Random
    } else {
        SelectMode::Exact
    });
    match mode {
        SelectMode::Exact if allowed.len() > 1 => Err(Error::BadRequest(format!(
            "Multiple services found for {query}: {}; pass config mode 'random', 'first' or 'last'",
            allowed
                .iter()
                .map(|e| e.id.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        SelectMode::Exact | SelectMode::First => Ok(allowed.swap_remove(0)),
        SelectMode::Last => Ok(allowed.swap_remove(allowed.len() - 1)),
        SelectMode::Random => {
            use rand::RngExt;
            let pick = rand::rng().random_range(0..allowed.len());
            Ok(allowed.swap_remove(pick))
        }
    }
}

/// Resolves a service and fetches its functions from its provider, with absolute targets.
pub(crate) async fn get_service(
    state: &Arc<AppState>,
    caller_ws: &str,
    user: &UserInfo,
    query: &str,
    config: Option<&Value>,
) -> Result<Value, Error> {
    let case = KeyCase::of(config)?;
    let entry = resolve(state, caller_ws, user, query, mode(config)?).await?;
    let provider = entry.id.provider.to_string();
    if entry.id.provider.client.as_str() == state.manager_id() {
        return state
            .hosted
            .get(entry.id.name.as_str())
            .map(|service| case.apply(service.description(state)))
            .ok_or_else(|| Error::NotFound(format!("Service not found: {query}")));
    }
    let timeout = config
        .and_then(|c| get(c, "timeout"))
        .and_then(|t| t.as_f64().or_else(|| t.as_i64().map(|i| i as f64)))
        .filter(|t| t.is_finite() && *t > 0.0)
        .map(Duration::from_secs_f64)
        // A caller may ask for less than the server's time-out, never more.
        .map_or(state.settings.connections.method_timeout, |t| {
            t.min(state.settings.connections.method_timeout)
        });
    let options = CallOptions {
        from: &state.peer.manager_addr(),
        ws: entry.id.provider.workspace.as_str(),
        user: &state.peer.server_user,
        timeout,
        with_kwargs: false,
    };
    let mut description = state
        .peer
        .call(
            &provider,
            "services.built-in.get_service",
            vec![entry.id.name.as_str().into()],
            &options,
        )
        .await
        .map_err(|e| match e {
            crate::rpc::RpcError::Unavailable(_) => Error::NotFound(format!(
                "Service not found: {query} (its provider {provider} is gone)"
            )),
            other => Error::from(other),
        })?;
    if !description.is_map() {
        return Err(Error::Remote(format!(
            "{provider} returned no service description for {query}"
        )));
    }
    absolutize_targets(&mut description, entry.id.provider.workspace.as_str(), 0);
    value::set(&mut description, "id", entry.id.to_string().into());
    if let Value::Map(entries) = &mut description {
        match entries
            .iter_mut()
            .find(|(k, _)| k.as_str() == Some("config"))
        {
            Some((_, config @ Value::Map(_))) => value::set(
                config,
                "workspace",
                entry.id.provider.workspace.as_str().into(),
            ),
            _ => value::set(
                &mut description,
                "config",
                obj([("workspace", entry.id.provider.workspace.as_str().into())]),
            ),
        }
    }
    Ok(case.apply(description))
}

/// `get_service(..., case_conversion=...)`: the function names of a description in the
/// caller's preferred case, as Hypha converts them (`HelloWorld` is `helloWorld` in camel
/// case and `hello_world` in snake case).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyCase {
    AsIs,
    Camel,
    Snake,
}

impl KeyCase {
    fn of(config: Option<&Value>) -> Result<Self, Error> {
        match config.and_then(|c| get(c, "case_conversion")) {
            None | Some(Value::Nil) => Ok(KeyCase::AsIs),
            Some(v) => match v.as_str() {
                Some("camel") => Ok(KeyCase::Camel),
                Some("snake") => Ok(KeyCase::Snake),
                _ => Err(Error::BadRequest(
                    "case_conversion must be \"camel\" or \"snake\"".into(),
                )),
            },
        }
    }

    /// Converts the keys of the description and of the plain maps in it (never the keys of
    /// an encoded value such as a method, whose fields start with `_`).
    fn apply(self, description: Value) -> Value {
        fn convert(value: Value, case: KeyCase, depth: usize) -> Value {
            let Value::Map(entries) = value else {
                return value;
            };
            let encoded = entries
                .iter()
                .any(|(k, _)| k.as_str().is_some_and(|k| k.starts_with('_')));
            if encoded || depth > 32 {
                return Value::Map(entries);
            }
            Value::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| {
                        let key = match k.as_str() {
                            Some(name) => case.name(name).into(),
                            None => k,
                        };
                        (key, convert(v, case, depth + 1))
                    })
                    .collect(),
            )
        }
        if self == KeyCase::AsIs {
            return description;
        }
        convert(description, self, 0)
    }

    /// One name in this case: its words are split at `_`, `-` and before capitals.
    fn name(self, name: &str) -> String {
        let mut words: Vec<String> = Vec::new();
        let mut current = String::new();
        let mut previous_lower = false;
        for c in name.chars() {
            if c == '_' || c == '-' {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
                previous_lower = false;
                continue;
            }
            if c.is_uppercase() && previous_lower && !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            previous_lower = c.is_lowercase() || c.is_ascii_digit();
            current.push(c);
        }
        if !current.is_empty() {
            words.push(current);
        }
        match self {
            KeyCase::AsIs => name.to_string(),
            KeyCase::Snake => words
                .iter()
                .map(|w| w.to_lowercase())
                .collect::<Vec<_>>()
                .join("_"),
            KeyCase::Camel => words
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let lower = w.to_lowercase();
                    if i == 0 {
                        return lower;
                    }
                    let mut chars = lower.chars();
                    chars
                        .next()
                        .map(|first| first.to_uppercase().chain(chars).collect())
                        .unwrap_or_default()
                })
                .collect(),
        }
    }
}

/// JS providers encode `_rtarget` relative to their workspace; consumers need it absolute.
fn absolutize_targets(value: &mut Value, workspace: &str, depth: usize) {
    if depth > 32 {
        return;
    }
    match value {
        Value::Map(entries) => {
            let is_method = entries
                .iter()
                .any(|(k, v)| k.as_str() == Some("_rtype") && v.as_str() == Some("method"));
            for (k, v) in entries.iter_mut() {
                if is_method && k.as_str() == Some("_rtarget") {
                    if let Some(target) = v.as_str()
                        && !target.contains('/')
                    {
                        *v = format!("{workspace}/{target}").into();
                    }
                } else {
                    absolutize_targets(v, workspace, depth + 1);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| absolutize_targets(v, workspace, depth + 1)),
        _ => {}
    }
}

/// The keys `generate_token`'s config may hold.
const TOKEN_CONFIG_KEYS: &[&str] = &[
    "workspace",
    "permission",
    "expires_in",
    "client_id",
    "extra_scopes",
    "email",
];

/// Mints a child token. Every value is parsed into its type and checked against what the
/// caller holds: an admin of the workspace only, never more than the caller's permission,
/// never outliving the caller's own token, extra scopes only those the caller has.
fn generate_token(state: &AppState, ctx: &CallContext, args: &Args) -> Result<Value, Error> {
    use crate::auth::scope::ExtraScope;
    use crate::ids::{ClientId, UserId, WorkspaceId};
    let config = args.get(0, "config").filter(|c| c.is_map());
    if let Some(Value::Map(entries)) = config
        && let Some((key, _)) = entries
            .iter()
            .find(|(k, _)| !k.as_str().is_some_and(|k| TOKEN_CONFIG_KEYS.contains(&k)))
    {
        return Err(Error::BadRequest(format!(
            "generate_token does not know the option {}; it takes {}",
            value::describe_key(key),
            TOKEN_CONFIG_KEYS.join(", ")
        )));
    }
    let field = |name: &str| {
        config
            .and_then(|c| get(c, name))
            .or_else(|| args.kwarg(name))
    };
    let text = |name: &str| -> Result<Option<&str>, Error> {
        match field(name) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| Error::BadRequest(format!("{name} must be a string"))),
        }
    };
    let caller = &ctx.user;
    // An anonymous user is admin of its own temporary workspace and may mint tokens for it
    // (as in Hypha); they stay anonymous and short-lived. Anyone else derives from a token.
    let from = match caller.token.as_ref() {
        Some(from) if from.purpose != crate::auth::Purpose::General => {
            return Err(Error::PermissionDenied(
                "this connection was resumed with a reconnection token, which cannot mint tokens; reconnect with your token".into(),
            ));
        }
        Some(from) => Some(from),
        None if caller.is_anonymous() => None,
        None => {
            return Err(Error::PermissionDenied(
                "this connection was opened without a token, so it cannot derive one".into(),
            ));
        }
    };
    let workspace = WorkspaceId::parse(text("workspace")?.unwrap_or(&ctx.ws))
        .map_err(|e| Error::BadRequest(e.to_string()))?;
    let permission = match text("permission")? {
        None => Permission::ReadWrite,
        Some(name) => Permission::parse(name).ok_or_else(|| {
            Error::BadRequest(format!(
                "permission must be read, read_write or admin, not {:?}",
                name.chars().take(40).collect::<String>()
            ))
        })?,
    };
    let held = state.workspaces.permission(caller, workspace.as_str());
    if held != Some(Permission::Admin) {
        return Err(Error::PermissionDenied(format!(
            "Only an admin of workspace {workspace} may generate tokens for it"
        )));
    }
    if Some(permission) > held {
        return Err(Error::PermissionDenied(format!(
            "a token cannot grant more than the caller holds in {workspace}"
        )));
    }
    let now = crate::auth::now_secs();
    let remaining = from.map_or(ANONYMOUS_TOKEN_LIFETIME, |from| from.expires_at - now);
    if remaining <= 0 {
        return Err(Error::PermissionDenied(
            "the token this connection was opened with has expired".into(),
        ));
    }
    // A child never outlives its parent: a longer lifetime is cut to what the parent has left.
    let expires_in = match field("expires_in") {
        None => 3600,
        Some(v) => super::token_lifetime(v)?,
    }
    .min(remaining);
    let client = text("client_id")?
        .map(|c| {
            if crate::hub::is_manager_id(c) {
                return Err(Error::BadRequest(
                    "client ids starting with 'manager-' are reserved for the server".into(),
                ));
            }
            ClientId::parse(c).map_err(|e| Error::BadRequest(e.to_string()))
        })
        .transpose()?;
    // A token bound to one client id derives only tokens bound to the same id.
    let client = match (&caller.scope.client, client) {
        (Some(bound), Some(asked)) if *bound != asked => {
            return Err(Error::PermissionDenied(format!(
                "this token is bound to client {bound}; it cannot derive a token for client {asked}"
            )));
        }
        (Some(bound), _) => Some(bound.clone()),
        (None, asked) => asked,
    };
    let extra = match field("extra_scopes") {
        None | Some(Value::Nil) => Vec::new(),
        Some(Value::Array(items)) if items.len() <= crate::auth::scope::MAX_EXTRA => items
            .iter()
            .map(|item| {
                let text = item
                    .as_str()
                    .ok_or_else(|| Error::BadRequest("extra_scopes must be strings".into()))?;
                let scope =
                    ExtraScope::parse(text).map_err(|e| Error::BadRequest(e.to_string()))?;
                if !caller.scope.extra.contains(&scope) {
                    return Err(Error::PermissionDenied(format!(
                        "the extra scope {scope} is not one the caller holds"
                    )));
                }
                Ok(scope)
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(Error::BadRequest(format!(
                "extra_scopes must be a list of at most {} strings",
                crate::auth::scope::MAX_EXTRA
            )));
        }
    };
    if let Some(email) = text("email")?
        && Some(email) != caller.email.as_deref()
    {
        return Err(Error::PermissionDenied(
            "a derived token carries the caller's email; it cannot name another".into(),
        ));
    }
    let account = caller.account();
    let id = UserId::parse(format!("{account}-{}", crate::ids::random_id(8)))
        .map_err(|e| Error::BadRequest(format!("cannot derive a user id: {e}")))?;
    let roles = if caller.is_anonymous() {
        vec!["anonymous".to_string()]
    } else {
        Vec::new()
    };
    let mut child = UserInfo::new(id, roles, None);
    child.parent = Some(account.clone());
    child.email = caller.email.clone();
    child.scope.workspaces.insert(workspace.clone(), permission);
    child.scope.current = Some(workspace);
    child.scope.client = client;
    child.scope.extra = extra;
    // A token restricted to one purpose (`file:download`) derives only tokens restricted alike.
    for scope in caller.scope.extra.iter().filter(|s| s.is_specialized()) {
        if !child.scope.extra.contains(scope) {
            child.scope.extra.push(scope.clone());
        }
    }
    let token = match from {
        Some(from) => state
            .tokens
            .issue_child(from, &child, now + expires_in)
            .map_err(|e| Error::PermissionDenied(e.to_string()))?,
        None => state.tokens.issue(&child, expires_in),
    };
    Ok(token.into())
}

/// The longest life of a token an anonymous user mints for its workspace.
const ANONYMOUS_TOKEN_LIFETIME: i64 = 3600;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_convert_to_either_case_as_hypha_does() {
        for (name, camel, snake) in [
            ("HelloWorld", "helloWorld", "hello_world"),
            ("hello_world", "helloWorld", "hello_world"),
            ("helloWorld", "helloWorld", "hello_world"),
            ("echo", "echo", "echo"),
            (
                "get_rtc_ice_servers",
                "getRtcIceServers",
                "get_rtc_ice_servers",
            ),
        ] {
            assert_eq!(KeyCase::Camel.name(name), camel, "{name}");
            assert_eq!(KeyCase::Snake.name(name), snake, "{name}");
        }
        let description = obj([
            ("id", "ws/c:s".into()),
            (
                "HelloWorld",
                obj([("_rtype", "method".into()), ("_rtarget", "ws/c".into())]),
            ),
        ]);
        let camel = KeyCase::Camel.apply(description);
        let method = get(&camel, "helloWorld").expect("converted");
        assert!(
            get(method, "_rtarget").is_some(),
            "an encoded value kept its fields"
        );
    }

    #[test]
    fn relative_targets_become_absolute() {
        let mut desc = obj([
            (
                "echo",
                value::method_value("js-a", "services.x.echo", true.into()),
            ),
            (
                "nested",
                obj([(
                    "f",
                    value::method_value("ws2/b", "services.x.f", true.into()),
                )]),
            ),
        ]);
        absolutize_targets(&mut desc, "ws1", 0);
        assert_eq!(
            get(&desc, "echo").and_then(|m| get_str(m, "_rtarget")),
            Some("ws1/js-a")
        );
        let nested = get(&desc, "nested").and_then(|n| get(n, "f")).unwrap();
        assert_eq!(get_str(nested, "_rtarget"), Some("ws2/b"));
    }

    #[test]
    fn every_function_has_a_valid_schema() {
        for f in FUNCTIONS.iter() {
            let s = f.schema();
            assert!(
                get(&s, "parameters")
                    .and_then(|p| get(p, "properties"))
                    .is_some_and(Value::is_map),
                "{}",
                f.name
            );
        }
    }
}
