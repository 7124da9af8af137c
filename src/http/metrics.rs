//! `GET /metrics`: Prometheus text format, rendered from the server's own counters.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::AppState;
use crate::turn::probe::ProbeOutcome;

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "hypha_rtc_connections",
        "gauge",
        "Open websocket connections.",
        state.hub.connection_count().to_string(),
    );
    metric(
        "hypha_rtc_services",
        "gauge",
        "Registered services.",
        state.registry.len().to_string(),
    );
    metric(
        "hypha_rtc_routed_messages_total",
        "counter",
        "Frames routed between clients.",
        state
            .hub
            .routed_messages
            .load(Ordering::Relaxed)
            .to_string(),
    );
    metric(
        "hypha_rtc_routed_bytes_total",
        "counter",
        "Bytes routed between clients.",
        state.hub.routed_bytes.load(Ordering::Relaxed).to_string(),
    );
    let bus = state.hub.bus();
    if bus.is_shared() {
        metric(
            "hypha_rtc_bus_up",
            "gauge",
            "1 while the Redis subscription that links the instances is up.",
            u8::from(bus.is_up()).to_string(),
        );
        metric(
            "hypha_rtc_bus_sent_total",
            "counter",
            "Frames sent to clients on other instances.",
            state.hub.bus_sent.load(Ordering::Relaxed).to_string(),
        );
        metric(
            "hypha_rtc_bus_received_total",
            "counter",
            "Frames received from other instances.",
            state.hub.bus_received.load(Ordering::Relaxed).to_string(),
        );
    }
    metric(
        "hypha_rtc_ice_credentials_issued_total",
        "counter",
        "get_rtc_ice_servers calls answered with credentials.",
        state.ice.issued.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "hypha_rtc_ice_credentials_refused_total",
        "counter",
        "get_rtc_ice_servers calls refused.",
        state.ice.refused.load(Ordering::Relaxed).to_string(),
    );
    if state.demo.settings.enabled {
        metric(
            "hypha_rtc_demo_viewers",
            "gauge",
            "Demo video viewers whose session is alive.",
            state.demo.viewers().to_string(),
        );
        metric(
            "hypha_rtc_demo_sessions_total",
            "counter",
            "Demo video viewer sessions started.",
            state.demo.sessions().to_string(),
        );
        metric(
            "hypha_rtc_demo_frames_total",
            "counter",
            "Demo video frames sent to all viewers.",
            state.demo.frames().to_string(),
        );
    }
    if let Some(probe) = state.ice.probe() {
        // The last verdict, without probing: scraping must not hit coturn.
        let last = probe.last();
        let up = matches!(last, Some((_, ProbeOutcome::Ok { .. })));
        metric(
            "hypha_rtc_coturn_probe_up",
            "gauge",
            "1 when the last coturn probe allocated with our secret.",
            u8::from(up).to_string(),
        );
        if let Some((age, outcome)) = last {
            metric(
                "hypha_rtc_coturn_probe_age_seconds",
                "gauge",
                "Age of the last coturn probe.",
                format!("{:.3}", age.as_secs_f64()),
            );
            if let ProbeOutcome::Ok { latency } = outcome {
                metric(
                    "hypha_rtc_coturn_probe_latency_seconds",
                    "gauge",
                    "Duration of the last successful coturn probe.",
                    format!("{:.6}", latency.as_secs_f64()),
                );
            }
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
