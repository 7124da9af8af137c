//! HTTP routes: the websocket upgrade, service calls, health and client configuration.

pub mod cors;
mod health;
mod metrics;
mod services;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::http::HeaderMap;

use crate::AppState;
use crate::auth::UserInfo;
use crate::error::Error;

/// All routes of the server.
pub fn router(state: Arc<AppState>) -> Router {
    let demo = if state.settings.demo.enabled {
        crate::demo::page::router()
    } else {
        Router::new()
    };
    let metrics = if state.settings.metrics_port.is_some() {
        Router::new()
    } else {
        metrics::router()
    };
    Router::new()
        .merge(ws::router())
        .merge(health::router())
        .merge(metrics)
        .merge(crate::auth::login::router())
        .merge(demo)
        .merge(services::router())
        .layer(axum::middleware::from_fn_with_state(
            state.cors.clone(),
            cors::cors,
        ))
        .with_state(state)
}

/// The HTTP service as served: the routes, with request bodies held to time-outs (idle for
/// `--header-timeout`, three times that in all, so a body that trickles in is cut off), and
/// the peer's address for the handlers.
pub type Service = axum::extract::connect_info::IntoMakeServiceWithConnectInfo<
    tower_http::timeout::RequestBodyDeadline<tower_http::timeout::RequestBodyTimeout<Router>>,
    std::net::SocketAddr,
>;

/// Builds the [`Service`].
pub fn service(state: Arc<AppState>) -> Service {
    use axum::ServiceExt;
    let idle = state.settings.header_timeout;
    let routes = router(state);
    let bounded = tower::ServiceBuilder::new()
        .layer(tower_http::timeout::RequestBodyDeadlineLayer::new(idle * 3))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(idle))
        .service(routes);
    ServiceExt::<axum::extract::Request<axum::body::Body>>::into_make_service_with_connect_info::<
        std::net::SocketAddr,
    >(bounded)
}

/// `/metrics` alone, for `--metrics-port`.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    metrics::router().with_state(state)
}

/// The client's network address: the peer's, or behind a trusted proxy, the one it reports.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub std::net::IpAddr);

impl axum::extract::FromRequestParts<Arc<AppState>> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0)
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        Ok(ClientIp(
            state
                .settings
                .admission
                .trusted_proxies
                .client_ip(peer, &parts.headers),
        ))
    }
}

/// The caller of an HTTP request: `Authorization: Bearer`, else the `access_token` cookie,
/// else the anonymous HTTP user. Disabled local accounts are refused.
pub async fn caller(state: &AppState, headers: &HeaderMap) -> Result<UserInfo, Error> {
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

fn token_user(state: &AppState, headers: &HeaderMap) -> Result<UserInfo, Error> {
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
    match bearer.or_else(cookie).filter(|t| !t.is_empty()) {
        Some(token) => state
            .tokens
            .parse(token)
            .map_err(|e| Error::Unauthorized(format!("Authentication error: {e}"))),
        None => Ok(UserInfo::http_anonymous()),
    }
}
