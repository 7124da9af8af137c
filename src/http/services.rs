//! `GET|POST /{workspace}/services/{service}/{function}`: call any service function over HTTP.
//! `service` = `ws` is the workspace manager. Query parameters or a JSON body are the kwargs.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
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

/// The routes. Requests for the last one are mostly taken before the router by
/// [`WithCalls`]: a route or a `Router::layer` added here (or elsewhere in the router) that
/// should apply to them must be added on that way too.
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

/// The router with HTTP service calls taken before it. `GET|POST
/// /{workspace}/services/{service}/{function}` is the route every HTTP call takes (pages
/// fetch their TURN credentials through it), and the general router cost about as much again
/// as such a call itself: the match, the route's parameters copied into the request, a boxed
/// service and future per route. A GET or POST whose path has that shape in plain segments
/// (no `%` escapes, so nothing to decode) goes straight to [`call`]; every other request goes
/// to the router, which holds the same route and answers it the same way.
#[derive(Clone)]
pub(crate) struct WithCalls {
    state: Arc<AppState>,
    router: Router,
}

impl WithCalls {
    /// Takes plain HTTP service calls before `router`, answering them as `state`'s server.
    pub(crate) fn new(state: Arc<AppState>, router: Router) -> Self {
        Self { state, router }
    }
}

impl<B> tower::Service<axum::http::Request<B>> for WithCalls
where
    B: axum::body::HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<
        futures_util::future::BoxFuture<'static, Result<Response, std::convert::Infallible>>,
        axum::routing::future::RouteFuture<std::convert::Infallible>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // The router is always ready, and so is the direct way.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        use futures_util::future::Either;
        let request = request.map(axum::body::Body::new);
        let Some(named) = plain_call(&request) else {
            return Either::Right(self.router.call(request));
        };
        let state = self.state.clone();
        let super::ClientIp(ip) =
            super::ClientIp::of(&state, request.extensions(), request.headers());
        Either::Left(Box::pin(async move {
            Ok(call(state, named, ip, request).await.into_response())
        }))
    }
}

/// What a request names for a call: the path's workspace, service and function, and the
/// query's parameters.
#[derive(Debug)]
struct Named {
    workspace: String,
    service: String,
    function: String,
    params: HashMap<String, String>,
}

/// What a GET or POST to `/{workspace}/services/{service}/{function}` names, where its
/// segments need no decoding; `None` for anything the router should see. The query is read
/// by the router's own extractor (which decodes leniently and so does not fail for a map of
/// strings; were it to, the router would answer its error).
fn plain_call(request: &Request) -> Option<Named> {
    if request.method() != Method::GET && request.method() != Method::POST {
        return None;
    }
    let mut segments = request.uri().path().strip_prefix('/')?.split('/');
    let (Some(workspace), Some("services"), Some(service), Some(function), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return None;
    };
    let plain = |segment: &str| !segment.is_empty() && !segment.contains('%');
    if !(plain(workspace) && plain(service) && plain(function)) {
        return None;
    }
    let Query(params) = Query::try_from_uri(request.uri()).ok()?;
    Some(Named {
        workspace: workspace.into(),
        service: service.into(),
        function: function.into(),
        params,
    })
}

/// The route's handler, for the requests [`WithCalls`] leaves to the router.
async fn call_function(
    State(state): State<Arc<AppState>>,
    Path((workspace, service, function)): Path<(String, String, String)>,
    Query(params): Query<HashMap<String, String>>,
    super::ClientIp(ip): super::ClientIp,
    request: Request,
) -> Result<Response, Error> {
    let named = Named {
        workspace,
        service,
        function,
        params,
    };
    call(state, named, ip, request).await
}

/// Calls the function a request names with the query's parameters and the body's arguments,
/// as the caller.
async fn call(
    state: Arc<AppState>,
    named: Named,
    ip: std::net::IpAddr,
    request: Request,
) -> Result<Response, Error> {
    let Named {
        workspace,
        service,
        function,
        params,
    } = named;
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
        read_body(request.into_body()).await?
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

/// A POST's body, at most [`MAX_BODY`] bytes (read here rather than through a body-limit
/// layer, which would wrap every route of the router once more).
async fn read_body(body: axum::body::Body) -> Result<Bytes, Error> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Error::PayloadTooLarge(
            format!("a request body may hold at most {MAX_BODY} bytes"),
        )),
        Err(e) => Err(Error::BadRequest(format!(
            "the request body could not be read: {e}"
        ))),
    }
}

/// A result as a JSON answer, written straight from the msgpack value.
fn json(result: &Value) -> Response {
    typed(value::json_bytes(result), "application/json")
}

/// JSON, or msgpack when the client asks for it.
fn respond(accepts_msgpack: bool, result: &Value) -> Response {
    if accepts_msgpack {
        return typed(value::encode(result), "application/msgpack");
    }
    json(result)
}

/// A 200 answer with `body` of `content_type` (built directly: the header set once).
fn typed(body: Vec<u8>, content_type: &'static str) -> Response {
    let mut response = Response::new(axum::body::Body::from(body));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, uri: &str) -> Request {
        axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(axum::body::Body::empty())
            .unwrap()
    }

    /// Only a GET or POST of a plain `/{workspace}/services/{service}/{function}` goes the
    /// direct way (its query read as the router's extractor reads it).
    #[test]
    fn only_plain_calls_skip_the_router() {
        let taken = |method: &str, uri: &str| {
            plain_call(&request(method, uri)).map(|named| {
                let mut params: Vec<_> = named.params.into_iter().collect();
                params.sort();
                ([named.workspace, named.service, named.function], params)
            })
        };
        let parts = |w: &str, s: &str, f: &str| [w.to_string(), s.to_string(), f.to_string()];
        assert_eq!(
            taken("GET", "/public/services/coturn/get_rtc_ice_servers"),
            Some((parts("public", "coturn", "get_rtc_ice_servers"), vec![]))
        );
        assert_eq!(
            taken("POST", "/ws-user-a/services/c:svc@app/f?x=1&y=%22z%22"),
            Some((
                parts("ws-user-a", "c:svc@app", "f"),
                vec![("x".into(), "1".into()), ("y".into(), "\"z\"".into())]
            ))
        );
        for (method, uri) in [
            ("HEAD", "/public/services/coturn/f"),
            ("PUT", "/public/services/coturn/f"),
            ("OPTIONS", "/public/services/coturn/f"),
            ("GET", "/public/services/c%6Fturn/f"),
            ("GET", "/p%75blic/services/coturn/f"),
            ("GET", "/public/services/coturn/f%20"),
            ("GET", "/public/services/coturn/f/"),
            ("GET", "/public/services/coturn/f/g"),
            ("GET", "/public/services/coturn"),
            ("GET", "/public/services//f"),
            ("GET", "//services/coturn/f"),
            ("GET", "/public/service/coturn/f"),
            ("GET", "/public/apps/coturn/f"),
        ] {
            assert_eq!(taken(method, uri), None, "{method} {uri}");
        }
    }

    /// `WithCalls` answers plain calls itself and hands everything else to its router: in
    /// front of a router without routes, a plain call is answered (anonymous callers get no
    /// TURN credentials: 403) and every other request is not found.
    #[tokio::test]
    async fn plain_calls_are_answered_without_the_router() {
        use tower::ServiceExt;
        let (app, data_dir) = crate::App::for_tests().await;
        let calls = WithCalls::new(app.state(), Router::new());
        let status = |method: &str, uri: &str| {
            let (calls, request) = (calls.clone(), request(method, uri));
            async move { calls.oneshot(request).await.unwrap().status().as_u16() }
        };
        let ice = "/public/services/coturn/get_rtc_ice_servers";
        assert_eq!(status("GET", ice).await, 403);
        assert_eq!(status("POST", ice).await, 403);
        assert_eq!(status("HEAD", ice).await, 404);
        assert_eq!(status("PUT", ice).await, 404);
        assert_eq!(
            status("GET", "/public/services/c%6Fturn/get_rtc_ice_servers").await,
            404
        );
        std::fs::remove_dir_all(data_dir).ok();
    }
}
