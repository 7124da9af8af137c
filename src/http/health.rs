//! Health probes and the client configuration document.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::AppState;

pub(crate) fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health", get(liveness))
        .route("/health/liveness", get(liveness))
        .route("/health/readiness", get(readiness))
        .route("/assets/config.json", get(config))
}

async fn liveness() -> Json<Value> {
    Json(json!({"status": "OK"}))
}

/// Ready to serve signaling; the coturn probe's state (cached briefly) is reported beside it.
/// What is wrong in words (internal addresses, store errors) only for callers on this machine
/// and admins.
async fn readiness(
    State(state): State<Arc<AppState>>,
    super::ClientIp(ip): super::ClientIp,
    headers: HeaderMap,
) -> Json<Value> {
    let detailed = ip.is_loopback()
        || super::caller(&state, &headers)
            .await
            .is_ok_and(|user| user.is_admin());
    let coturn = match state.ice.probe() {
        None => json!({"state": "not_configured"}),
        Some(probe) => {
            let outcome = probe.check().await;
            let mut report = json!({"state": outcome.state()});
            if detailed {
                report["detail"] = json!(outcome.describe(probe.address()));
            }
            if let crate::turn::probe::ProbeOutcome::Ok { latency } = outcome {
                report["latency_ms"] = json!(latency.as_secs_f64() * 1e3);
            }
            // Every address and transport clients are given, as checked once a minute (for
            // this machine and admins: it names the addresses).
            if detailed {
                report["listeners"] = listeners(&state);
            }
            report
        }
    };
    // An instance without Redis still serves its own clients, so it stays ready; the state is
    // reported for operators.
    let bus = state.hub.bus();
    let redis = if bus.is_shared() {
        json!({"state": if bus.is_up() { "ok" } else { "unavailable" }, "instance": state.server_id})
    } else {
        json!({"state": "not_configured"})
    };
    Json(json!({
        "status": "OK",
        "connections": state.hub.connection_count(),
        "services": state.registry.len(),
        "coturn": coturn,
        "redis": redis,
        "store": match state.store.state() {
            crate::store::StoreState::Ok => json!({"state": "ok"}),
            crate::store::StoreState::Failing(detail) if detailed => json!({
                "state": "unavailable",
                "detail": format!("the last write failed: {detail}"),
            }),
            crate::store::StoreState::Failing(_) => json!({"state": "unavailable"}),
        },
        "connections_refused": {
            "max_connections": state.admission.refused_total.load(std::sync::atomic::Ordering::Relaxed),
            "max_connections_per_address": state.admission.refused_per_address.load(std::sync::atomic::Ordering::Relaxed),
        },
    }))
}

/// The last check of every address and transport clients are given.
pub(crate) fn listeners(state: &AppState) -> Value {
    state
        .ice
        .listeners()
        .into_iter()
        .map(|l| {
            let mut entry = json!(l);
            if l.state != "ok" {
                entry["detail"] = json!(l.detail);
            }
            entry
        })
        .collect()
}

async fn config(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Json<Value> {
    let user = super::caller(&state, &headers)
        .await
        .ok()
        .map(|u| u.to_json());
    Json(json!({
        "server_id": state.server_id,
        "manager_id": state.manager_id(),
        "hypha_version": crate::HYPHA_VERSION,
        "hypha_rtc_version": env!("CARGO_PKG_VERSION"),
        "public_base_url": state.public_base_url,
        "local_base_url": state.local_base_url,
        "user": user,
    }))
}
