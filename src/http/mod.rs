//! HTTP routes: the websocket upgrade, service calls, health and client configuration.

mod health;
mod metrics;
mod services;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::http::HeaderMap;
use tower_http::cors::CorsLayer;

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
        .layer(CorsLayer::very_permissive())
        .with_state(state)
}

/// `/metrics` alone, for `--metrics-port`.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    metrics::router().with_state(state)
}

/// The caller of an HTTP request: `Authorization: Bearer`, else the `access_token` cookie,
/// else the anonymous HTTP user. Disabled local accounts are refused.
pub async fn caller(state: &AppState, headers: &HeaderMap) -> Result<UserInfo, Error> {
    let user = token_user(state, headers)?;
    match state.accounts.is_disabled(&user.id).await {
        Ok(false) => Ok(user),
        Ok(true) => Err(Error::Unauthorized(
            "Authentication error: this account is disabled".into(),
        )),
        Err(e) => Err(Error::Internal(e.to_string())),
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
    let cookie = || {
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
