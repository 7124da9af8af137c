//! `GET /metrics`: the application's registry in the OpenMetrics text format, its gauges
//! read from the server's state at the scrape (the probe's last verdict, never a new probe).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::AppState;
use crate::turn::probe::ProbeOutcome;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new().route("/metrics", get(metrics))
}

/// What Prometheus is told the body is.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let m = &state.metrics;
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    m.connections.set(count(state.hub.connection_count()));
    m.http_streams.set(count(state.streams.len()));
    m.services.set(count(state.registry.len()));
    m.chunked_messages.set(count(state.hub.chunks.len()));
    m.chunked_answers_awaited
        .set(count(state.hub.chunks.answers_awaited()));
    m.bus_up.set(i64::from(state.hub.bus().is_up()));
    m.bus_links.set(count(state.hub.bus().links_up()));
    m.demo_viewers.set(count(state.demo.viewers()));
    m.audit_waiting.set(count(state.store.audit_waiting()));
    if let Some(probe) = state.ice.probe() {
        let last = probe.last();
        let up = matches!(last, Some((_, ProbeOutcome::Ok { .. })));
        m.probe_up.set(i64::from(up));
        if let Some((age, _)) = last {
            m.probe_age.set(age.as_secs_f64());
        }
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], m.encode())
}
