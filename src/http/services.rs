//! `GET|POST /{workspace}/services/{service}/{function}`: call any service function over HTTP.
//! `service` = `ws` is the workspace manager. Query parameters or a JSON body are the kwargs.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rmpv::Value;

use crate::AppState;
use crate::error::Error;
use crate::rpc::peer::{CallContext, CallOptions};
use crate::rpc::value::{self, Args};
use crate::services::HostedService;
use crate::services::manager::{self, Manager};

/// Largest HTTP request body accepted (msgpack, decoded within bounds).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Largest JSON body: JSON's small tokens grow many times over once decoded.
const MAX_JSON_BODY: usize = 2 * 1024 * 1024;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/{workspace}/services", get(list))
        .route("/{workspace}/services/", get(list))
        .route("/{workspace}/services/{service}", get(service_info))
        .route("/{workspace}/info", get(workspace_info))
        .route(
            "/{workspace}/services/{service}/{function}",
            get(call_function).post(call_function),
        )
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
}

/// `GET /{workspace}/services`: `list_services` for the workspace.
async fn list(
    State(state): State<Arc<AppState>>,
    Path(workspace): Path<String>,
    super::ClientIp(ip): super::ClientIp,
    headers: HeaderMap,
) -> Result<Response, Error> {
    manager_json(&state, &headers, ip, &workspace, "list_services", "query").await
}

/// Calls a manager function for the workspace named in the path (passed as `argument`) and
/// answers its result as JSON.
async fn manager_json(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    ip: std::net::IpAddr,
    workspace: &str,
    function: &str,
    argument: &str,
) -> Result<Response, Error> {
    let user = super::caller(state, headers).await?;
    let ctx = context(state, &user, workspace, ip);
    let args = Args::from_kwargs(vec![(argument.into(), workspace.into())]);
    let result = Manager.call(state, &ctx, function, &args).await?;
    Ok(json(&result))
}

/// `GET /{workspace}/services/{service}`: the service's info, as `get_service_info` gives it
/// (`service` may be `svc`, `client:svc` or with `@app`; `?_mode=` picks among several).
async fn service_info(
    State(state): State<Arc<AppState>>,
    Path((workspace, service)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
    super::ClientIp(ip): super::ClientIp,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let user = super::caller(&state, &headers).await?;
    let ctx = context(&state, &user, &workspace, ip);
    let mode = params
        .get("_mode")
        .map(|m| m.parse::<manager::SelectMode>())
        .transpose()?;
    let query = format!("{workspace}/{service}");
    let entry = manager::resolve(&state, &ctx.ws, &user, &query, mode).await?;
    Ok(json(&entry.info))
}

/// `GET /{workspace}/info`: `get_workspace_info` for the workspace.
async fn workspace_info(
    State(state): State<Arc<AppState>>,
    Path(workspace): Path<String>,
    super::ClientIp(ip): super::ClientIp,
    headers: HeaderMap,
) -> Result<Response, Error> {
    manager_json(
        &state,
        &headers,
        ip,
        &workspace,
        "get_workspace_info",
        "workspace",
    )
    .await
}

/// The call context of an HTTP caller addressing `workspace`: that workspace where the caller
/// holds a permission in it, else the token's current or the caller's own.
pub(crate) fn context(
    state: &AppState,
    user: &Arc<crate::auth::UserInfo>,
    workspace: &str,
    peer_ip: std::net::IpAddr,
) -> CallContext {
    let ws = if state.workspaces.permission(user, workspace).is_some() {
        workspace.to_string()
    } else {
        // The token's current workspace only where it grants something.
        user.scope
            .current
            .as_ref()
            .map(ToString::to_string)
            .filter(|current| state.workspaces.permission(user, current).is_some())
            .unwrap_or_else(|| user.own_workspace())
    };
    CallContext {
        from: format!("{ws}/{}", super::HTTP_CLIENT),
        ws,
        user: user.clone(),
        to: state.peer.manager_addr(),
        peer_ip: Some(peer_ip),
        slots: None,
    }
}

/// Query strings carry text; values that look like JSON are parsed as JSON.
fn query_value(text: &str) -> Value {
    let looks_json = text.starts_with(['{', '[', '"'])
        || matches!(text, "true" | "false" | "null")
        || text.parse::<f64>().is_ok();
    match looks_json
        .then(|| serde_json::from_str::<serde_json::Value>(text).ok())
        .flatten()
    {
        Some(json) => value::from_json(&json),
        None => text.into(),
    }
}

async fn call_function(
    State(state): State<Arc<AppState>>,
    Path((workspace, service, function)): Path<(String, String, String)>,
    Query(params): Query<HashMap<String, String>>,
    super::ClientIp(ip): super::ClientIp,
    request: Request,
) -> Result<Response, Error> {
    let user = super::caller(&state, request.headers()).await?;
    let accepts_msgpack = accepts_msgpack(request.headers());
    let msgpack = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("msgpack"));
    let mut kwargs: Vec<(String, Value)> = params
        .iter()
        .filter(|(k, _)| k.as_str() != "_mode")
        .map(|(k, v)| (k.clone(), query_value(v)))
        .collect();
    let mut positional = Vec::new();
    // Only a POST carries arguments in its body; a GET's is not read.
    let body = if request.method() == Method::POST {
        Bytes::from_request(request, &state)
            .await
            .map_err(|e| body_error(&e))?
    } else {
        Bytes::new()
    };
    if !body.is_empty() {
        let decoded = if msgpack {
            let limits = crate::rpc::scan::Limits::decode(body.len(), 1_000_000, 8);
            crate::rpc::scan::decode(&body, limits)
                .map_err(|e| Error::BadRequest(format!("the msgpack body {e}")))?
                .0
        } else {
            if body.len() > MAX_JSON_BODY {
                return Err(Error::PayloadTooLarge(format!(
                    "a JSON body may hold at most {MAX_JSON_BODY} bytes (this one has {}); send larger arguments as msgpack",
                    body.len()
                )));
            }
            let json: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| Error::BadRequest(format!("the body is not valid JSON: {e}")))?;
            value::from_json(&json)
        };
        match decoded {
            Value::Map(entries) => kwargs.extend(
                entries
                    .into_iter()
                    .filter_map(|(k, v)| k.as_str().map(|k| (k.to_string(), v))),
            ),
            Value::Array(items) => positional = items,
            other => positional.push(other),
        }
    }
    // The arguments go on to a client, which must be able to decode them.
    kwargs
        .iter()
        .try_for_each(|(key, value)| match key.as_str() {
            "__proto__" => Err(crate::rpc::scan::ScanError::ProtoKey),
            _ => crate::rpc::scan::value_for_clients(value),
        })
        .and_then(|()| {
            positional
                .iter()
                .try_for_each(crate::rpc::scan::value_for_clients)
        })
        .map_err(|e| Error::BadRequest(format!("an argument {e}")))?;
    let args = Args { positional, kwargs };
    let ctx = context(&state, &user, &workspace, ip);
    let result = if service == "ws" {
        if state.workspaces.permission(&user, &workspace).is_none() {
            return Err(Error::PermissionDenied(format!(
                "Permission denied for workspace {workspace}"
            )));
        }
        Manager.call(&state, &ctx, &function, &args).await?
    } else {
        let query = format!("{workspace}/{service}");
        let mode = params
            .get("_mode")
            .map(|m| m.parse::<manager::SelectMode>())
            .transpose()?;
        let entry = manager::resolve(&state, &ctx.ws, &user, &query, mode).await?;
        if entry.id.provider.client.as_str() == state.manager_id() {
            let hosted = state
                .hosted
                .get(entry.id.name.as_str())
                .ok_or_else(|| crate::services::not_found(entry.id.name.as_str(), &function))?;
            let result = hosted.call(&state, &ctx, &function, &args).await?;
            return Ok(respond(accepts_msgpack, &result));
        }
        let mut call_args = args.positional;
        let with_kwargs = !args.kwargs.is_empty();
        if with_kwargs {
            call_args.push(Value::Map(
                args.kwargs
                    .into_iter()
                    .map(|(k, v)| (k.into(), v))
                    .collect(),
            ));
        }
        let user_value = crate::rpc::value::from_json(&user.to_json());
        let options = CallOptions {
            from: &state.peer.manager_addr(),
            ws: &ctx.ws,
            user: &user_value,
            timeout: state.settings.connections.method_timeout,
            with_kwargs,
        };
        let target = entry.id.provider.to_string();
        let method_path = format!("services.{}.{function}", entry.id.name);
        // The call goes out as the manager's, whom the clients trust with everything: it may
        // name only a function the service offers, and never the chunked-message cache, whose
        // calls the server vets only as they pass between clients.
        crate::rpc::rules::check_method(&method_path).map_err(Error::BadRequest)?;
        if method_path.starts_with("services.built-in.message_cache") {
            return Err(Error::PermissionDenied(
                "message_cache functions cannot be called over HTTP: clients call them on each other over their connection".into(),
            ));
        }
        state
            .peer
            .call(&target, &method_path, call_args, &options)
            .await?
    };
    Ok(respond(accepts_msgpack, &result))
}

/// Whether the client asks for msgpack answers.
fn accepts_msgpack(headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/msgpack"))
}

/// A body that could not be read, as the error the caller sees (its status and words kept).
fn body_error(rejection: &axum::extract::rejection::BytesRejection) -> Error {
    let text = rejection.body_text();
    match rejection.status() {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge(text),
        _ => Error::BadRequest(text),
    }
}

/// A result as a JSON answer, written straight from the msgpack value.
fn json(result: &Value) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        value::json_bytes(result),
    )
        .into_response()
}

/// JSON, or msgpack when the client asks for it.
fn respond(accepts_msgpack: bool, result: &Value) -> Response {
    if accepts_msgpack {
        let bytes = value::encode(result);
        return (
            [(axum::http::header::CONTENT_TYPE, "application/msgpack")],
            bytes,
        )
            .into_response();
    }
    json(result)
}
