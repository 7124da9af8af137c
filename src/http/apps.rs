//! ASGI apps through the server: `/{workspace}/apps/{service}/{path}` reaches a service of
//! type `asgi` (registered with the client's `register_asgi_service`). The server calls its
//! `serve({"scope", "receive", "send"})` with the caller's identity as the call's user;
//! `receive` and `send` are callbacks the server exports to that provider alone for the
//! length of the request. The request body is streamed in as the app asks for it, and the
//! response streams out as the app sends it (server-sent events pass through as they come).
//! The caller's `Authorization` and `Cookie` headers are not passed on: they are credentials
//! for this server, and the app learns who calls from the call's context.
//!
//! An app is anyone's content (an anonymous client may register one) served on this server's
//! origin, where the visitor's sign-in cookie is honoured. So every app response carries a
//! `Content-Security-Policy: sandbox` without `allow-same-origin`: a page of an app runs in an
//! opaque origin, its requests to this server are cross-site (the `SameSite=Strict` cookie is
//! not sent, and `cookie_allowed` refuses it), and it cannot read or clear this origin's
//! storage or register a service worker over it. Headers that act on the origin itself
//! (`Set-Cookie`, `Clear-Site-Data`, `Service-Worker-Allowed`) are dropped from its responses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::routing::any;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use rmpv::Value;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::error::Error;
use crate::rpc::peer::CallOptions;
use crate::rpc::value::{self, Args, get, get_str, obj};
use crate::services::exports::Exported;
use crate::services::manager;

/// Requests to apps in progress on one instance at most.
pub(crate) const MAX_REQUESTS: usize = 256;
/// Largest request body an app receives (anonymous callers: [`MAX_BODY_ANONYMOUS`]).
const MAX_BODY: usize = 16 * 1024 * 1024;
const MAX_BODY_ANONYMOUS: usize = 1024 * 1024;
/// Most body bytes one `receive()` hands over.
const RECEIVE_CHUNK: usize = 192 * 1024;
/// How long the caller may take to send the next piece of its body.
const BODY_STALL: Duration = Duration::from_secs(30);
/// Most response headers an app may set.
const MAX_HEADERS: usize = 128;
/// Response messages buffered between the app and a slow HTTP client.
const RESPONSE_QUEUE: usize = 16;
/// How long an app may keep running after its HTTP client has gone.
const AFTER_DISCONNECT: Duration = Duration::from_secs(30);

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/{workspace}/apps/{service}", any(serve_any))
        .route("/{workspace}/apps/{service}/", any(serve_any))
        .route("/{workspace}/apps/{service}/{*path}", any(serve_any))
}

/// What the app sends, on its way to the HTTP client.
enum Event {
    Start(StatusCode, HeaderMap),
    Body(Bytes),
    /// The response is complete.
    End,
    /// `serve` returned (with its error, if it failed).
    Ended(Option<String>),
}

/// One request as the app sees it: the body to receive and where sent messages go.
struct Exchange {
    body: Mutex<BodyReader>,
    events: mpsc::Sender<Event>,
    started: AtomicBool,
    finished: AtomicBool,
    /// Cancelled when the response is complete or the HTTP client has gone.
    done: CancellationToken,
}

/// The request body, read as the app asks for it.
struct BodyReader {
    stream: BodyDataStream,
    lookahead: Option<Bytes>,
    read: usize,
    limit: usize,
    /// The last piece (`more_body: false`) has been handed over.
    delivered: bool,
}

impl BodyReader {
    async fn next_frame(&mut self) -> Result<Option<Bytes>, Error> {
        if let Some(frame) = self.lookahead.take() {
            return Ok(Some(frame));
        }
        let frame = tokio::time::timeout(BODY_STALL, self.stream.next())
            .await
            .map_err(|_| Error::Timeout("the request body stalled".into()))?;
        match frame {
            None => Ok(None),
            Some(Err(e)) => Err(Error::BadRequest(format!("the request body failed: {e}"))),
            Some(Ok(bytes)) => {
                self.read += bytes.len();
                if self.read > self.limit {
                    return Err(Error::PayloadTooLarge(format!(
                        "an app request body may hold at most {} bytes",
                        self.limit
                    )));
                }
                Ok(Some(bytes))
            }
        }
    }

    /// The next piece of the body and whether more follows; `None` once all is handed over.
    async fn next_piece(&mut self) -> Result<Option<(Vec<u8>, bool)>, Error> {
        if self.delivered {
            return Ok(None);
        }
        let mut piece = Vec::new();
        while piece.len() < RECEIVE_CHUNK {
            match self.next_frame().await? {
                None => {
                    self.delivered = true;
                    return Ok(Some((piece, false)));
                }
                Some(mut frame) => {
                    let room = RECEIVE_CHUNK - piece.len();
                    if frame.len() > room {
                        self.lookahead = Some(frame.split_off(room));
                    }
                    piece.extend_from_slice(&frame);
                }
            }
        }
        // Full: look one frame ahead to tell the app whether more follows.
        match self.next_frame().await? {
            None => {
                self.delivered = true;
                Ok(Some((piece, false)))
            }
            Some(frame) => {
                self.lookahead = Some(frame);
                Ok(Some((piece, true)))
            }
        }
    }
}

impl Exchange {
    async fn receive(&self) -> Result<Value, Error> {
        let mut body = self.body.lock().await;
        if let Some((bytes, more)) = body.next_piece().await? {
            return Ok(obj([
                ("type", "http.request".into()),
                ("body", Value::Binary(bytes)),
                ("more_body", more.into()),
            ]));
        }
        drop(body);
        // After the body: answered when the response is complete or the client has gone.
        self.done.cancelled().await;
        Ok(obj([("type", "http.disconnect".into())]))
    }

    async fn send(&self, message: Option<&Value>) -> Result<Value, Error> {
        let message = message
            .filter(|m| m.is_map())
            .ok_or_else(|| Error::BadRequest("send() takes an ASGI message (a dict)".into()))?;
        let event = match get_str(message, "type") {
            Some("http.response.start") => {
                if self.started.swap(true, Ordering::SeqCst) {
                    return Err(Error::BadRequest("the response has already started".into()));
                }
                Event::Start(status(message)?, headers(message)?)
            }
            Some("http.response.body") => {
                if !self.started.load(Ordering::SeqCst) {
                    return Err(Error::BadRequest(
                        "http.response.start must come before the body".into(),
                    ));
                }
                if self.finished.load(Ordering::SeqCst) {
                    return Err(Error::BadRequest("the response is complete".into()));
                }
                let more = get(message, "more_body")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let bytes = bytes_of(get(message, "body"))?;
                if !bytes.is_empty() {
                    self.deliver(Event::Body(Bytes::from(bytes))).await?;
                }
                if more {
                    return Ok(Value::Nil);
                }
                self.finished.store(true, Ordering::SeqCst);
                Event::End
            }
            other => {
                return Err(Error::BadRequest(format!(
                    "unsupported ASGI message type {:?}",
                    other.unwrap_or("").chars().take(64).collect::<String>()
                )));
            }
        };
        self.deliver(event).await?;
        Ok(Value::Nil)
    }

    async fn deliver(&self, event: Event) -> Result<(), Error> {
        let gone = || Error::Unavailable("the HTTP client has gone".into());
        tokio::select! {
            sent = self.events.send(event) => sent.map_err(|_| gone()),
            _ = self.done.cancelled(), if !self.finished.load(Ordering::SeqCst) => Err(gone()),
        }
    }
}

impl Exported for Exchange {
    fn call<'a>(
        &'a self,
        function: &'a str,
        args: &'a Args,
    ) -> BoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            match function {
                "receive" => self.receive().await,
                "send" => self.send(args.get(0, "message")).await,
                _ => Err(Error::NotFound(format!("Method not found: {function}"))),
            }
        })
    }
}

fn status(message: &Value) -> Result<StatusCode, Error> {
    get(message, "status")
        .and_then(Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (100..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| Error::BadRequest("the response status must be 100 to 599".into()))
}

/// Bytes from an ASGI value: bytes, or text as UTF-8.
fn bytes_of(value: Option<&Value>) -> Result<Vec<u8>, Error> {
    match value {
        None | Some(Value::Nil) => Ok(Vec::new()),
        Some(Value::Binary(b)) => Ok(b.clone()),
        Some(Value::String(s)) => Ok(s.as_bytes().to_vec()),
        Some(_) => Err(Error::BadRequest("a body must be bytes".into())),
    }
}

/// What every app response is held to (see the module's doc): scripts, forms, pop-ups,
/// downloads and dialogs work; the page's origin is opaque. An app's own policy, if it sends
/// one, applies as well (a browser enforces every policy it is given).
const APP_SANDBOX: &str = "sandbox allow-scripts allow-forms allow-popups \
     allow-popups-to-escape-sandbox allow-downloads allow-modals";

/// Response headers an app may not send: they act on this server's origin (its cookies, its
/// stored data, the scope of its service workers), not on the app's response.
fn acts_on_origin(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "set-cookie" | "set-cookie2" | "clear-site-data" | "service-worker-allowed"
    )
}

/// Headers that concern one connection, never passed through.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-connection"
            | "te"
            | "trailer"
    )
}

fn headers(message: &Value) -> Result<HeaderMap, Error> {
    let bad = || Error::BadRequest("response headers must be [name, value] pairs of bytes".into());
    let mut map = HeaderMap::new();
    let Some(items) = get(message, "headers").filter(|h| !h.is_nil()) else {
        return Ok(map);
    };
    let items = items.as_array().ok_or_else(bad)?;
    if items.len() > MAX_HEADERS {
        return Err(Error::BadRequest(format!(
            "a response may set at most {MAX_HEADERS} headers"
        )));
    }
    for pair in items {
        let [name, value] = pair.as_array().map(Vec::as_slice).ok_or_else(bad)? else {
            return Err(bad());
        };
        let name = HeaderName::from_bytes(&bytes_of(Some(name))?).map_err(|_| bad())?;
        let value = HeaderValue::from_bytes(&bytes_of(Some(value))?).map_err(|_| bad())?;
        if !hop_by_hop(&name) && !acts_on_origin(&name) {
            map.append(name, value);
        }
    }
    map.append(
        axum::http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(APP_SANDBOX),
    );
    Ok(map)
}

/// The request as an ASGI `http` scope.
fn scope(state: &AppState, method: &Method, uri: &Uri, headers: &HeaderMap, path: &str) -> Value {
    // The raw path after `/{workspace}/apps/{service}`.
    let raw_rest = uri.path().splitn(5, '/').nth(4).unwrap_or("");
    let forwarded: Vec<Value> = headers
        .iter()
        .filter(|(name, _)| {
            !matches!(name.as_str(), "authorization" | "cookie") && !hop_by_hop(name)
        })
        .map(|(name, value)| {
            Value::Array(vec![
                Value::Binary(name.as_str().as_bytes().to_vec()),
                Value::Binary(value.as_bytes().to_vec()),
            ])
        })
        .collect();
    let scheme = if state.public_base_url.starts_with("https:") {
        "https"
    } else {
        "http"
    };
    obj([
        ("type", "http".into()),
        (
            "asgi",
            obj([("version", "3.0".into()), ("spec_version", "2.3".into())]),
        ),
        ("http_version", "1.1".into()),
        ("method", method.as_str().into()),
        ("scheme", scheme.into()),
        ("path", format!("/{path}").into()),
        (
            "raw_path",
            Value::Binary(format!("/{raw_rest}").into_bytes()),
        ),
        (
            "query_string",
            Value::Binary(uri.query().unwrap_or("").as_bytes().to_vec()),
        ),
        ("root_path", "".into()),
        ("headers", Value::Array(forwarded)),
    ])
}

/// Which app, and the path within it.
struct Target {
    workspace: String,
    service: String,
    path: String,
}

/// Both routes: `/{workspace}/apps/{service}[/]` (path `/`) and `.../{*path}`.
async fn serve_any(
    state: State<Arc<AppState>>,
    Path(mut params): Path<std::collections::HashMap<String, String>>,
    ip: super::ClientIp,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let mut take = |key: &str| params.remove(key).unwrap_or_default();
    let target = Target {
        workspace: take("workspace"),
        service: take("service"),
        path: take("path"),
    };
    serve(state, target, ip, method, uri, headers, body).await
}

async fn serve(
    State(state): State<Arc<AppState>>,
    target: Target,
    super::ClientIp(ip): super::ClientIp,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let user = super::caller(&state, &headers).await?;
    let permit = state
        .app_requests
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            Error::TooManyRequests(
                "too many app requests are in progress here; try again shortly".into(),
            )
        })?;
    let ctx = super::services::context(&state, &user, &target.workspace, ip);
    let query = format!("{}/{}", target.workspace, target.service);
    let entry = manager::resolve(&state, &ctx.ws, &user, &query, None).await?;
    if !entry.service_type.eq_ignore_ascii_case("asgi") {
        return Err(Error::NotFound(format!(
            "{} is not an ASGI app (its type is {})",
            entry.id,
            entry.service_type.chars().take(64).collect::<String>()
        )));
    }
    let limit = if user.is_anonymous() {
        MAX_BODY_ANONYMOUS
    } else {
        MAX_BODY
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Error::PayloadTooLarge(format!(
            "an app request body may hold at most {limit} bytes"
        )));
    }

    let (events, mut responses) = mpsc::channel(RESPONSE_QUEUE);
    let done = CancellationToken::new();
    let exchange = Arc::new(Exchange {
        body: Mutex::new(BodyReader {
            stream: body.into_data_stream(),
            lookahead: None,
            read: 0,
            limit,
            delivered: false,
        }),
        events: events.clone(),
        started: AtomicBool::new(false),
        finished: AtomicBool::new(false),
        done: done.clone(),
    });
    let provider = entry.id.provider.to_string();
    let guard = state.exports.export(provider.clone(), exchange);
    let manager_addr = state.peer.manager_addr();
    let args = obj([
        (
            "scope",
            scope(&state, &method, &uri, &headers, &target.path),
        ),
        (
            "receive",
            value::method_value(&manager_addr, &guard.method("receive"), true.into()),
        ),
        (
            "send",
            value::method_value(&manager_addr, &guard.method("send"), true.into()),
        ),
    ]);
    let serve_method = format!("services.{}.serve", entry.id.name);
    let timeout = state.settings.connections.method_timeout;
    let caller = value::from_json(&user.to_json());
    let app = state.clone();
    let ws = ctx.ws.clone();
    let app_done = done.clone();
    tokio::spawn(async move {
        let options = CallOptions {
            from: &manager_addr,
            ws: &ws,
            user: &caller,
            timeout,
            with_kwargs: false,
        };
        let call = app
            .peer
            .call(&provider, &serve_method, vec![args], &options);
        let outcome = tokio::select! {
            outcome = call => outcome.err().map(|e| e.to_string()),
            _ = async {
                app_done.cancelled().await;
                tokio::time::sleep(AFTER_DISCONNECT).await;
            } => Some("abandoned after the HTTP client left".into()),
        };
        let _ = events.send(Event::Ended(outcome)).await;
        drop(guard);
        drop(permit);
    });

    let first = tokio::time::timeout(timeout, responses.recv())
        .await
        .map_err(|_| {
            done.cancel();
            Error::Timeout(format!("{query} did not start its response in time"))
        })?;
    let (status, response_headers) = match first {
        Some(Event::Start(status, headers)) => (status, headers),
        Some(Event::Ended(Some(e))) => {
            return Err(Error::Remote(format!(
                "the app failed: {}",
                e.chars().take(4096).collect::<String>()
            )));
        }
        _ => {
            return Err(Error::Remote("the app ended without a response".into()));
        }
    };
    // Dropped with the body (complete, or the client gone): `receive` then answers
    // `http.disconnect`.
    let finished = done.drop_guard();
    let stream = futures_util::stream::unfold(
        (responses, Some(finished)),
        |(mut responses, finished)| async move {
            finished.as_ref()?;
            match responses.recv().await {
                Some(Event::Body(bytes)) => Some((Ok(bytes), (responses, finished))),
                Some(Event::Ended(Some(e))) => {
                    // The app failed mid-response: end it as broken, not as complete.
                    Some((Err(std::io::Error::other(e)), (responses, None)))
                }
                _ => None,
            }
        },
    );
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = status;
    *response.headers_mut() = response_headers;
    Ok(response)
}
