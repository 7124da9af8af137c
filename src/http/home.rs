//! The home page (`/`), the API description (`/openapi.json`, browsable at `/api-docs`) and
//! the shared assets of the server's pages, all served by the server itself. The home page
//! says what this server is, its version and live state: everyone sees a short public summary
//! and the links; signed-in admins see the details (connections, workspaces, services,
//! credentials issued per hour, the coturn probe's last hour, the instances and the store).
//! It reads `GET /api/status` every few seconds.

use std::sync::{Arc, LazyLock};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::AppState;

static HOME: &str = include_str!("../../web/home.html");
static HOME_JS: &str = include_str!("../../web/home.js");
static STYLE: &str = include_str!("../../web/style.css");
static CHARTS_JS: &str = include_str!("../../web/charts.js");
static FAVICON: &str = include_str!("../../web/favicon.svg");
static API_DOCS: &str = include_str!("../../web/api-docs.html");
static API_DOCS_JS: &str = include_str!("../../web/api-docs.js");
/// The HTTP API's description, written by hand beside the routes it describes.
static OPENAPI: LazyLock<Value> = LazyLock::new(|| {
    serde_json::from_str(include_str!("../../web/openapi.json")).unwrap_or_else(|e| {
        tracing::error!(error = %e, "web/openapi.json is not JSON");
        json!({"openapi": "3.1.0", "info": {"title": "hypha-rtc"}, "paths": {}})
    })
});

/// What the server's pages may load: their own scripts, styles and data, nothing else.
pub(crate) const PAGE_POLICY: &str = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(|| async { page(HOME) }))
        .route(
            "/assets/style.css",
            get(|| async { asset(STYLE, "text/css") }),
        )
        .route(
            "/assets/charts.js",
            get(|| async { asset(CHARTS_JS, "text/javascript") }),
        )
        .route(
            "/assets/home.js",
            get(|| async { asset(HOME_JS, "text/javascript") }),
        )
        .route(
            "/favicon.svg",
            get(|| async { asset(FAVICON, "image/svg+xml") }),
        )
        .route(
            "/favicon.ico",
            get(|| async { asset(FAVICON, "image/svg+xml") }),
        )
        .route("/api/status", get(status))
        .route("/api-docs", get(|| async { page(API_DOCS) }))
        .route(
            "/assets/api-docs.js",
            get(|| async { asset(API_DOCS_JS, "text/javascript") }),
        )
        .route("/openapi.json", get(openapi))
}

/// One of the server's pages, with the policy that keeps it to the server's own resources.
pub(crate) fn page(html: impl Into<axum::body::Body>) -> Response {
    let mut response = (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html.into(),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(PAGE_POLICY),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// A small page made on the server (sign-in, first run): the shared head and header around
/// `body`, which the caller has escaped.
pub(crate) fn narrow_page(title: &str, heading: &str, body: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title} · hypha-rtc</title>
<link rel="icon" href="/favicon.svg" type="image/svg+xml"><link rel="stylesheet" href="/assets/style.css"></head>
<body><header class="top"><a class="brand" href="/">hypha-rtc</a></header>
<main class="narrow"><h1>{heading}</h1>{body}</main></body></html>"#
    )
}

/// A script or stylesheet of the pages.
pub(crate) fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=300"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// `GET /openapi.json`: the description, with this server's address.
async fn openapi(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut description = OPENAPI.clone();
    description["servers"] = json!([{"url": state.public_base_url}]);
    description["info"]["version"] = json!(env!("CARGO_PKG_VERSION"));
    Json(description)
}

/// `GET /api/status`: the public summary, and the details for admins.
async fn status(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Json<Value> {
    let user = super::caller(&state, &headers)
        .await
        .ok()
        .filter(|u| !u.is_anonymous());
    let turn = match state.ice.probe() {
        None => json!({"state": "not_configured"}),
        Some(probe) => match probe.last() {
            None => json!({"state": "unknown"}),
            Some((age, outcome)) => json!({
                "state": outcome.state(),
                "checked_seconds_ago": age.as_secs(),
            }),
        },
    };
    let mut summary = json!({
        "name": "hypha-rtc",
        "version": env!("CARGO_PKG_VERSION"),
        "hypha_version": crate::HYPHA_VERSION,
        "server_url": state.public_base_url,
        "turn": turn,
        "demo": state.settings.demo.enabled,
        // What anonymous visitors may use: the STUN side of the coturn clients are given.
        "stun": state.settings.turn.coturn.as_ref().map(|c| {
            c.public.iter().map(|p| format!("stun:{}", p.authority())).collect::<Vec<_>>()
        }).unwrap_or_default(),
        "user": user.as_ref().map(|u| json!({
            "id": u.id.as_str(),
            "email": u.email,
            "admin": u.is_admin(),
        })),
    });
    if user.as_ref().is_some_and(|u| u.is_admin()) {
        summary["details"] = details(&state).await;
    }
    Json(summary)
}

/// What admins see.
async fn details(state: &AppState) -> Value {
    let now = crate::auth::now_secs();
    let day_ago = (now / 3600 - 23) * 3600;
    let per_hour = match state.store.ice_issuances_per_hour(day_ago).await {
        Ok(rows) => json!(rows),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the credential audit for the home page");
            Value::Null
        }
    };
    let probe = state.ice.probe().map(|p| {
        json!({
            "address": p.address().authority(),
            "history": p.history(),
            "detail": p.last().map(|(_, o)| o.describe(p.address())),
        })
    });
    let bus = state.hub.bus();
    let store_kind = match state.settings.store.database_url.as_deref() {
        Some(url) if url.starts_with("postgres") => "PostgreSQL",
        _ => "SQLite",
    };
    json!({
        "connections": state.hub.connection_count(),
        "workspaces": state.hub.workspace_count(),
        "made_workspaces": state.workspaces.existing().len(),
        "services": state.registry.len(),
        "http_streams": state.streams.len(),
        "credentials": {
            "issued": state.ice.issued.get(),
            "refused": state.ice.refused.get(),
            "per_hour": per_hour,
            "since": day_ago,
        },
        "probe": probe,
        "listeners": super::health::listeners(state),
        "cluster": {
            "instance": state.server_id,
            "shared": bus.is_shared(),
            "redis": if !bus.is_shared() { "not_configured" } else if bus.is_up() { "ok" } else { "unavailable" },
            "instances": state.directory.live(),
        },
        "store": {
            "kind": store_kind,
            "state": match state.store.state() {
                crate::store::StoreState::Ok => "ok",
                crate::store::StoreState::Failing(_) => "unavailable",
            },
        },
    })
}
