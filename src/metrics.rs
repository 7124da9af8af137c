//! The server's metrics: one `prometheus-client` registry per application (no global
//! recorder, so several servers in one process keep theirs apart). Counters and histograms
//! live with what they count (the hub, the ICE service, the demo) and are registered here;
//! the gauges are read from the server's state when `/metrics` is scraped. Rates are left to
//! PromQL.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::demo::Producer;
use crate::hub::Hub;
use crate::store::Store;
use crate::turn::IceService;

/// The registry and the gauges set at each scrape.
pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub http_streams: Gauge,
    pub services: Gauge,
    pub chunked_messages: Gauge,
    pub chunked_answers_awaited: Gauge,
    pub bus_up: Gauge,
    pub bus_links: Gauge,
    pub demo_viewers: Gauge,
    pub probe_up: Gauge,
    pub probe_age: Gauge<f64, AtomicU64>,
    pub audit_waiting: Gauge,
}

impl Metrics {
    /// Registers what the parts count; the bus and demo families only where they exist.
    pub(crate) fn new(hub: &Hub, ice: &IceService, demo: &Producer, store: &Store) -> Self {
        let mut metrics = Self {
            registry: Registry::with_prefix("hypha_rtc"),
            connections: Gauge::default(),
            http_streams: Gauge::default(),
            services: Gauge::default(),
            chunked_messages: Gauge::default(),
            chunked_answers_awaited: Gauge::default(),
            bus_up: Gauge::default(),
            bus_links: Gauge::default(),
            demo_viewers: Gauge::default(),
            probe_up: Gauge::default(),
            probe_age: Gauge::default(),
            audit_waiting: Gauge::default(),
        };
        let r = &mut metrics.registry;
        r.register(
            "connections",
            "Connected clients (websockets and HTTP streams)",
            metrics.connections.clone(),
        );
        r.register(
            "http_streams",
            "Clients connected through the HTTP streaming transport (GET /rpc)",
            metrics.http_streams.clone(),
        );
        r.register("services", "Registered services", metrics.services.clone());
        r.register(
            "chunked_messages",
            "Chunked messages between clients being relayed and read now",
            metrics.chunked_messages.clone(),
        );
        r.register(
            "chunked_answers_awaited",
            "Processed chunked messages whose receiver has not answered the process yet (it holds their chunks until it does)",
            metrics.chunked_answers_awaited.clone(),
        );
        r.register(
            "routed_messages",
            "Frames routed between clients",
            hub.routed_messages.clone(),
        );
        r.register(
            "routed_bytes",
            "Bytes routed between clients",
            hub.routed_bytes.clone(),
        );
        r.register(
            "calls",
            "Calls between clients by how they ended: answered (resolved or rejected by the callee), or refused at once because the callee was gone (peer_gone)",
            hub.inflight.ended.clone(),
        );
        r.register(
            "call_duration_seconds",
            "Seconds from a call routed between clients to its answer",
            hub.inflight.latency.0.clone(),
        );
        r.register(
            "server_calls",
            "Calls to the server's own services (manager, coturn, login, demo) by outcome",
            hub.inflight.server.clone(),
        );
        if hub.bus().is_shared() {
            r.register(
                "bus_up",
                "1 while the Redis subscription that links the instances is up",
                metrics.bus_up.clone(),
            );
            r.register(
                "bus_links",
                "Direct links from this instance to other instances that are up (--instance-link)",
                metrics.bus_links.clone(),
            );
            r.register(
                "bus_sent",
                "Frames sent to clients on other instances",
                hub.bus_sent.clone(),
            );
            r.register(
                "bus_received",
                "Frames received from other instances",
                hub.bus_received.clone(),
            );
        }
        r.register(
            "ice_credentials_issued",
            "get_rtc_ice_servers calls answered with credentials",
            ice.issued.clone(),
        );
        r.register(
            "ice_credentials_refused",
            "get_rtc_ice_servers calls refused",
            ice.refused.clone(),
        );
        r.register(
            "ice_duration_seconds",
            "Seconds to answer get_rtc_ice_servers",
            ice.latency.clone(),
        );
        let audit = store.audit_counters();
        r.register(
            "audit_rows_written",
            "Credential audit rows written to the store",
            audit.written,
        );
        r.register(
            "audit_rows_unrecorded",
            "Credential audit rows that could not be queued (the store failing under --audit-required, a full queue, a stopping server); under --audit-required no credentials went with them",
            audit.unrecorded,
        );
        r.register(
            "audit_rows_waiting",
            "Credential audit rows queued or held by the writer, not yet written",
            metrics.audit_waiting.clone(),
        );
        if let Some(probe) = ice.probe() {
            r.register(
                "coturn_probe_up",
                "1 when the last coturn probe allocated with our secret",
                metrics.probe_up.clone(),
            );
            r.register(
                "coturn_probe_age_seconds",
                "Age of the last coturn probe",
                metrics.probe_age.clone(),
            );
            r.register(
                "coturn_probe_duration_seconds",
                "Seconds each coturn probe took, whatever its verdict",
                probe.latency.clone(),
            );
        }
        if demo.settings.enabled {
            r.register(
                "demo_viewers",
                "Demo video viewers whose session is alive",
                metrics.demo_viewers.clone(),
            );
            r.register(
                "demo_sessions",
                "Demo video viewer sessions started",
                demo.sessions.clone(),
            );
            r.register(
                "demo_frames",
                "Demo video frames sent to all viewers",
                demo.frames.clone(),
            );
        }
        metrics
    }

    /// The registry in the OpenMetrics text format.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
