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
    metric(
        &mut out,
        "hypha_rtc_connections",
        "gauge",
        "Open websocket connections.",
        state.hub.connection_count().to_string(),
    );
    metric(
        &mut out,
        "hypha_rtc_services",
        "gauge",
        "Registered services.",
        state.registry.len().to_string(),
    );
    metric(
        &mut out,
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
        &mut out,
        "hypha_rtc_routed_bytes_total",
        "counter",
        "Bytes routed between clients.",
        state.hub.routed_bytes.load(Ordering::Relaxed).to_string(),
    );
    let bus = state.hub.bus();
    if bus.is_shared() {
        metric(
            &mut out,
            "hypha_rtc_bus_up",
            "gauge",
            "1 while the Redis subscription that links the instances is up.",
            u8::from(bus.is_up()).to_string(),
        );
        metric(
            &mut out,
            "hypha_rtc_bus_sent_total",
            "counter",
            "Frames sent to clients on other instances.",
            state.hub.bus_sent.load(Ordering::Relaxed).to_string(),
        );
        metric(
            &mut out,
            "hypha_rtc_bus_received_total",
            "counter",
            "Frames received from other instances.",
            state.hub.bus_received.load(Ordering::Relaxed).to_string(),
        );
    }
    metric(
        &mut out,
        "hypha_rtc_ice_credentials_issued_total",
        "counter",
        "get_rtc_ice_servers calls answered with credentials.",
        state.ice.issued.load(Ordering::Relaxed).to_string(),
    );
    metric(
        &mut out,
        "hypha_rtc_ice_credentials_refused_total",
        "counter",
        "get_rtc_ice_servers calls refused.",
        state.ice.refused.load(Ordering::Relaxed).to_string(),
    );
    if state.demo.settings.enabled {
        metric(
            &mut out,
            "hypha_rtc_demo_viewers",
            "gauge",
            "Demo video viewers whose session is alive.",
            state.demo.viewers().to_string(),
        );
        metric(
            &mut out,
            "hypha_rtc_demo_sessions_total",
            "counter",
            "Demo video viewer sessions started.",
            state.demo.sessions().to_string(),
        );
        metric(
            &mut out,
            "hypha_rtc_demo_frames_total",
            "counter",
            "Demo video frames sent to all viewers.",
            state.demo.frames().to_string(),
        );
        metric(
            &mut out,
            "hypha_rtc_demo_frames_per_second",
            "gauge",
            "Demo video frames sent per second, all viewers, averaged since the previous scrape.",
            format!("{:.1}", frame_rate(state.demo.frames())),
        );
    }
    let calls = &state.hub.inflight;
    let _ = writeln!(
        out,
        "# HELP hypha_rtc_calls_total Calls between clients by how they ended: answered (resolved or rejected by the callee), or refused at once because the callee was gone.\n# TYPE hypha_rtc_calls_total counter"
    );
    for (outcome, counter) in [
        ("resolved", &calls.resolved),
        ("rejected", &calls.rejected),
        ("peer_gone", &calls.peer_gone),
    ] {
        let _ = writeln!(
            out,
            "hypha_rtc_calls_total{{outcome=\"{outcome}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP hypha_rtc_server_calls_total Calls to the server's own services (manager, coturn, login, demo) by outcome.\n# TYPE hypha_rtc_server_calls_total counter"
    );
    for (outcome, counter) in [("ok", &calls.server_ok), ("error", &calls.server_failed)] {
        let _ = writeln!(
            out,
            "hypha_rtc_server_calls_total{{outcome=\"{outcome}\"}} {}",
            counter.load(Ordering::Relaxed)
        );
    }
    if let Some(probe) = state.ice.probe() {
        // The last verdict, without probing: scraping must not hit coturn.
        let last = probe.last();
        let up = matches!(last, Some((_, ProbeOutcome::Ok { .. })));
        metric(
            &mut out,
            "hypha_rtc_coturn_probe_up",
            "gauge",
            "1 when the last coturn probe allocated with our secret.",
            u8::from(up).to_string(),
        );
        if let Some((age, outcome)) = last {
            metric(
                &mut out,
                "hypha_rtc_coturn_probe_age_seconds",
                "gauge",
                "Age of the last coturn probe.",
                format!("{:.3}", age.as_secs_f64()),
            );
            if let ProbeOutcome::Ok { latency } = outcome {
                metric(
                    &mut out,
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

/// Writes one unlabelled metric with its help and type.
fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: String) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Frames per second since the previous scrape at least a second ago.
fn frame_rate(frames: u64) -> f64 {
    use std::sync::Mutex;
    use std::time::Instant;
    static LAST: Mutex<Option<(Instant, u64, f64)>> = Mutex::new(None);
    let Ok(mut last) = LAST.lock() else {
        return 0.0;
    };
    let now = Instant::now();
    match *last {
        Some((at, _, rate)) if now.duration_since(at).as_secs_f64() < 1.0 => rate,
        Some((at, before, _)) => {
            let rate = frames.saturating_sub(before) as f64 / now.duration_since(at).as_secs_f64();
            *last = Some((now, frames, rate));
            rate
        }
        None => {
            *last = Some((now, frames, 0.0));
            0.0
        }
    }
}
