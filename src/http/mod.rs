//! HTTP routes: the websocket upgrade, service calls, health and client configuration.

pub(crate) mod apps;
pub mod cors;
mod demo;
mod doctor;
pub(crate) mod handshake;
mod health;
mod home;
mod login;
mod metrics;
mod services;
pub(crate) mod session;
mod setup;
pub(crate) mod streaming;
mod users;
pub(crate) mod ws;

use std::sync::Arc;

use axum::Router;
use axum::http::HeaderMap;

use crate::AppState;
use crate::auth::UserInfo;
use crate::error::Error;

/// The HTTP status of a service error.
pub(crate) fn status(error: &Error) -> axum::http::StatusCode {
    use axum::http::StatusCode;
    match error {
        Error::BadRequest(_) => StatusCode::BAD_REQUEST,
        Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        Error::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::Remote(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// A service error as an HTTP response: its status, and `{"success": false, "detail": ...}`
/// (Hypha's shape); 401 carries `WWW-Authenticate`, 500s are logged, never detailed.
impl axum::response::IntoResponse for Error {
    fn into_response(self) -> axum::response::Response {
        use axum::http::{HeaderValue, StatusCode, header};
        let status = status(&self);
        let body = serde_json::json!({"success": false, "detail": self.public_message()});
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The HTTP side's options.
#[derive(clap::Args, Debug, Clone)]
pub struct HttpOptions {
    /// Origins whose pages may call this server from a browser with the visitor's cookie, comma-separated; * lets any origin call without cookies [default: any origin, without cookies; cookies only from this server's own pages]
    #[arg(long, env = "HYPHA_ALLOW_ORIGINS", value_name = "ORIGINS")]
    pub allow_origins: Option<String>,
    /// PEM certificate chain: serve HTTPS and WSS directly (with --key-file)
    #[arg(long, env = "HYPHA_CERT_FILE", value_name = "FILE")]
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of --cert-file
    #[arg(long, env = "HYPHA_KEY_FILE", value_name = "FILE")]
    pub key_file: Option<std::path::PathBuf>,
    /// Serve /metrics on this port only (plain HTTP, same --host), not on the main one
    #[arg(long, env = "HYPHA_METRICS_PORT", value_name = "PORT")]
    pub metrics_port: Option<u16>,
}

/// The PEM files of `--cert-file` and `--key-file`.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// The HTTP side, validated.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub allow_origins: cors::AllowOrigins,
    /// Certificate chain and key: the server speaks TLS itself.
    pub tls: Option<TlsFiles>,
    pub metrics_port: Option<u16>,
}

impl HttpOptions {
    /// Validates the options; `port` is the main port (the metrics one must differ).
    pub(crate) fn settings(
        &self,
        port: u16,
    ) -> Result<HttpSettings, crate::options::SettingsError> {
        use crate::options::{SettingsError, option_name};
        let allow_origins = cors::AllowOrigins::parse(self.allow_origins.as_deref().unwrap_or("*"))
            .map_err(|e| SettingsError::new(format!("{}: {e}", option_name("allow-origins"))))?;
        let tls = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            (None, None) => None,
            _ => {
                return Err(SettingsError::new(
                    "--cert-file and --key-file go together: give both, or neither",
                ));
            }
        };
        if self.metrics_port.is_some_and(|p| p == port && p != 0) {
            return Err(SettingsError::new(format!(
                "{}: must differ from --port",
                option_name("metrics-port")
            )));
        }
        Ok(HttpSettings {
            allow_origins,
            tls,
            metrics_port: self.metrics_port,
        })
    }
}

/// Text made safe to put into HTML (element content and quoted attributes).
pub(crate) fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The client id calls made over HTTP come from (no websocket client may take it).
pub(crate) const HTTP_CLIENT: &str = "http-client";

/// All routes of the server, without the layers around them (CORS among them: see
/// [`service`], which is what is served).
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let demo = if state.settings.demo.enabled {
        demo::router()
    } else {
        Router::new()
    };
    let metrics = if state.settings.http.metrics_port.is_some() {
        Router::new()
    } else {
        metrics::router()
    };
    Router::new()
        .merge(ws::router())
        .merge(streaming::router())
        .merge(health::router())
        .merge(home::router())
        .merge(setup::router())
        .merge(doctor::router())
        .merge(users::router())
        .merge(metrics)
        .merge(login::router())
        .merge(demo)
        .merge(services::router())
        .merge(apps::router())
        .with_state(state)
}

/// The HTTP service as served: the routes (HTTP service calls taken before the router, see
/// [`services::WithCalls`]) behind the CORS policy, with request bodies held to time-outs
/// (idle for `--header-timeout`, three times that in all, so a body that trickles in is cut
/// off), and the peer's address for the handlers. The layers wrap the router as a whole: one
/// added with `Router::layer` wraps every route again, a boxed service and future per request.
pub(crate) type Service = axum::extract::connect_info::IntoMakeServiceWithConnectInfo<
    tower_http::timeout::RequestBodyDeadline<
        tower_http::timeout::RequestBodyTimeout<cors::Cors<services::WithCalls>>,
    >,
    std::net::SocketAddr,
>;

/// Builds the [`Service`].
pub(crate) fn service(state: Arc<AppState>) -> Service {
    use axum::ServiceExt;
    let idle = state.settings.admission.header_timeout;
    let cors = cors::CorsLayer(state.cors.clone());
    let routes = services::WithCalls::new(state.clone(), router(state));
    let bounded = tower::ServiceBuilder::new()
        .layer(tower_http::timeout::RequestBodyDeadlineLayer::new(
            crate::net::body_deadline(idle),
        ))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(idle))
        .layer(cors)
        .service(routes);
    ServiceExt::<axum::extract::Request<axum::body::Body>>::into_make_service_with_connect_info::<
        std::net::SocketAddr,
    >(bounded)
}

/// `/metrics` alone, for `--metrics-port`.
pub(crate) fn metrics_router(state: Arc<AppState>) -> Router {
    metrics::router().with_state(state)
}

/// The client's network address: the peer's, or behind a trusted proxy, the one it reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientIp(pub std::net::IpAddr);

impl axum::extract::FromRequestParts<Arc<AppState>> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        Ok(ClientIp::of(state, &parts.extensions, &parts.headers))
    }
}

impl ClientIp {
    /// The address of a request with these extensions (the peer's, from the listener) and
    /// headers.
    pub(crate) fn of(
        state: &AppState,
        extensions: &axum::http::Extensions,
        headers: &HeaderMap,
    ) -> Self {
        let peer = extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0)
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        ClientIp(
            state
                .settings
                .admission
                .trusted_proxies
                .client_ip(peer, headers),
        )
    }
}

/// The caller of an HTTP request: `Authorization: Bearer`, else the `access_token` cookie,
/// else the anonymous HTTP user. Disabled local accounts are refused.
pub(crate) async fn caller(state: &AppState, headers: &HeaderMap) -> Result<Arc<UserInfo>, Error> {
    let user = token_user(state, headers)?;
    if user.token.is_none() {
        return Ok(user);
    }
    match state.accounts.is_disabled(user.account()).await {
        Ok(false) => Ok(user),
        Ok(true) => Err(Error::Unauthorized(
            "Authentication error: this account is disabled".into(),
        )),
        Err(e) => Err(Error::Unavailable(e.to_string())),
    }
}

fn token_user(state: &AppState, headers: &HeaderMap) -> Result<Arc<UserInfo>, Error> {
    match request_token(state, headers) {
        Some(token) => state
            .tokens
            .parse_shared(token)
            .map_err(|e| Error::Unauthorized(format!("Authentication error: {e}"))),
        None => Ok(Arc::new(UserInfo::http_anonymous())),
    }
}

/// The token a request carries: `Authorization: Bearer`, else the `access_token` cookie when
/// the request comes from this server's own pages (or an allowed origin).
pub(crate) fn request_token<'h>(state: &AppState, headers: &'h HeaderMap) -> Option<&'h str> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    // A cookie from a page of another origin is not the visitor acting here.
    let cookie = || {
        if !state.cors.cookie_allowed(headers) {
            return None;
        }
        headers
            .get_all(axum::http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().strip_prefix("access_token="))
            .next()
    };
    bearer.or_else(cookie).filter(|t| !t.is_empty())
}
