//! The clients and services of workspaces across instances: the local registry and the hub
//! for this instance, the shared directory for the others, and the events that announce
//! changes to the subscribers of a workspace.

pub(crate) mod client_log;
pub(crate) mod inbound;

use rmpv::Value;

use crate::AppState;
use crate::error::Error;
use crate::hub::Outbound;
use crate::ids::PeerAddr;
use crate::registry::{ServiceEntry, ServiceQuery};
use crate::rpc::frame;
use crate::rpc::value::obj;

/// Sends a manager event (`client_disconnected`, `service_added`, ...) to the clients of a
/// workspace that subscribed to it, on every instance.
pub(crate) async fn emit(state: &AppState, workspace: &str, event: &str, data: Value) {
    let bus = state.hub.bus();
    if bus.is_shared() {
        let announcement = crate::cluster::bus::Announcement::Event {
            workspace: workspace.to_string(),
            event: event.to_string(),
            data: data.clone(),
        };
        if let Err(e) = bus.announce(announcement).await {
            tracing::debug!(error = %e, event, "an event reached this instance only");
        }
    }
    emit_local(state, workspace, event, data).await;
}

/// Sends a manager event to the subscribers connected to this instance.
pub(crate) async fn emit_local(state: &AppState, workspace: &str, event: &str, data: Value) {
    let subscribers = state.hub.subscribers(workspace, event);
    if subscribers.is_empty() {
        return;
    }
    let from = state.peer.manager_addr();
    for addr in subscribers {
        let header = obj([
            ("type", event.into()),
            ("from", from.as_str().into()),
            ("to", addr.as_str().into()),
            ("ws", workspace.into()),
            ("data", data.clone()),
        ]);
        let _ = state
            .hub
            .send_local(&addr, Outbound::Binary(frame::encode(&header, None)))
            .await;
    }
}

/// Services of a workspace on every instance, in registration order.
pub(crate) async fn services_in(
    state: &AppState,
    workspace: &str,
) -> Result<Vec<ServiceEntry>, Error> {
    services_where(state, workspace, |_| true).await
}

/// Services answering a query, on every instance, in registration order.
pub(crate) async fn find_services(
    state: &AppState,
    query: &ServiceQuery,
) -> Result<Vec<ServiceEntry>, Error> {
    services_where(state, &query.workspace, |e| query.matches(e)).await
}

/// Services of a workspace that `keep` accepts, on every instance, in registration order
/// (this instance's are copied only when kept).
async fn services_where(
    state: &AppState,
    workspace: &str,
    keep: impl Fn(&ServiceEntry) -> bool,
) -> Result<Vec<ServiceEntry>, Error> {
    let mut found = state.registry.in_workspace_where(workspace, &keep);
    let mut elsewhere = state.directory.services_in(workspace).await?;
    elsewhere.retain(|e| keep(e));
    if !elsewhere.is_empty() {
        found.extend(elsewhere);
        found.sort_by_key(ServiceEntry::seq);
    }
    Ok(found)
}

/// Client ids connected to a workspace, on every instance, sorted.
pub(crate) async fn clients_in(state: &AppState, workspace: &str) -> Result<Vec<String>, Error> {
    let mut clients = state.hub.clients_in(workspace);
    clients.extend(state.directory.clients_in(workspace).await?);
    clients.sort();
    clients.dedup();
    Ok(clients)
}

/// Whether the shared registry can be written now. While Redis is away, writes are skipped
/// rather than left to time out one by one (holding up connections); the resync that follows
/// the reconnection writes this instance's state back.
pub(crate) fn directory_reachable(state: &AppState) -> bool {
    !state.directory.is_shared() || state.hub.bus().is_up()
}

/// Registers a service of a client connected here, in the shared registry too.
pub(crate) async fn add_service(state: &AppState, entry: ServiceEntry) -> Result<(), Error> {
    let entry = state.registry.stamp(entry);
    if !directory_reachable(state) {
        return Err(Error::Unavailable(
            "the shared service registry (Redis) is unavailable; register again once it is back"
                .into(),
        ));
    }
    let _writes = state.directory.writes().lock().await;
    state.directory.put_service(&entry).await?;
    state.registry.insert(entry);
    Ok(())
}

/// Withdraws services that were removed from the local registry from the shared one; what
/// cannot be withdrawn now is withdrawn when this instance next writes its state.
async fn withdraw(state: &AppState, removed: &[ServiceEntry]) {
    if directory_reachable(state)
        && let Err(e) = state.directory.remove_services(removed).await
    {
        tracing::warn!(error = %e, "services stay in Redis until it is back");
    }
}

/// Unregisters a service (every app id of it); returns what was removed.
pub(crate) async fn remove_service(
    state: &AppState,
    id: &crate::ids::ServiceId,
) -> Vec<ServiceEntry> {
    let _writes = state.directory.writes().lock().await;
    let removed = state.registry.remove(id);
    withdraw(state, &removed).await;
    removed
}

/// Forgets a client that left this instance: its services and its place on the bus. Returns
/// its services, or `None` when a newer connection holds the address.
pub(crate) async fn remove_client(
    state: &AppState,
    addr: &PeerAddr,
    conn_id: u64,
) -> Option<Vec<ServiceEntry>> {
    let key = addr.to_string();
    let workspace = addr.workspace.as_str();
    let _writes = state.directory.writes().lock().await;
    if !state.hub.remove(&key, workspace, conn_id) {
        return None;
    }
    let removed = state.registry.remove_client(&key);
    state.hub.bus().detach(&key).await;
    if directory_reachable(state) {
        withdraw(state, &removed).await;
        if let Err(e) = state
            .directory
            .remove_client(workspace, addr.client.as_str())
            .await
        {
            tracing::warn!(error = %e, "a client stays in Redis until it is back");
        }
    }
    Some(removed)
}

/// Records a client that connected here, on the bus and in the shared registry. When another
/// instance holds the client id too, the claims are compared (see
/// [`crate::cluster::ClientClaim::wins_over`]): the loser's connection is closed.
pub(crate) async fn add_client(state: &AppState, addr: &PeerAddr) {
    if let Err(e) = state.hub.bus().attach(&addr.to_string()).await {
        tracing::warn!(client = %addr, error = %e, "the client is reachable from other instances once Redis is back");
    }
    if directory_reachable(state) {
        let _writes = state.directory.writes().lock().await;
        claim(state, addr).await;
    }
}

/// Claims a client of this instance in the shared registry and settles a conflict with
/// another instance's claim.
async fn claim(state: &AppState, addr: &PeerAddr) {
    let Some(handle) = state.hub.get(&addr.to_string()) else {
        return;
    };
    let directory = &state.directory;
    let (workspace, client) = (addr.workspace.as_str(), addr.client.as_str());
    let (since, reconnected) = (handle.since_ms, handle.reconnected);
    let other = match directory
        .claim_client(workspace, client, since, reconnected)
        .await
    {
        Ok(other) => other,
        Err(e) => {
            tracing::warn!(client = %addr, error = %e, "the client is listed on other instances once Redis is back");
            return;
        }
    };
    let Some(other) = other else {
        return;
    };
    let mine = crate::cluster::ClientClaim {
        owner: directory.instance().to_string(),
        since_ms: since,
        reconnected,
    };
    if !mine.wins_over(&other) {
        tracing::warn!(client = %addr, other = %other.owner, "closing a connection whose client id another instance holds");
        handle.close(&format!(
            "Client already exists and is active: {addr} is connected through another server instance"
        ));
        return;
    }
    if let Err(e) = directory
        .force_client(workspace, client, since, reconnected)
        .await
    {
        tracing::warn!(client = %addr, error = %e, "cannot take the client over in Redis yet");
    }
    let kick = crate::cluster::bus::Announcement::Kick {
        addr: addr.to_string(),
        keep: directory.instance().to_string(),
    };
    if let Err(e) = state.hub.bus().announce(kick).await {
        tracing::warn!(client = %addr, error = %e, "cannot tell the other instance to close the old connection");
    }
}

/// Writes this instance's clients and services to the shared registry again (after Redis
/// restarted or forgot this instance), dropping what it no longer has.
pub(crate) async fn resync(state: &AppState) {
    let _writes = state.directory.writes().lock().await;
    let services: Vec<ServiceEntry> = state
        .registry
        .all()
        .into_iter()
        .filter(|e| e.id.provider.client.as_str() != state.manager_id())
        .collect();
    let clients = state.hub.addresses();
    match state.directory.resync(&services, &clients).await {
        Ok(()) => tracing::info!(
            clients = clients.len(),
            services = services.len(),
            "wrote this instance's clients and services to Redis"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot write this instance's state to Redis yet"),
    }
    // Claim each client again: one that another instance took meanwhile (while Redis was
    // away) is settled now, and the loser's connection closed.
    for (ws, client) in &clients {
        if let Some(addr) = PeerAddr::from_parts(ws, client) {
            claim(state, &addr).await;
        }
    }
}

/// Renews this instance's lease and clears up after instances whose lease ran out, until
/// `stop` (several instances only).
pub(crate) async fn keep_lease(
    state: std::sync::Arc<AppState>,
    stop: tokio_util::sync::CancellationToken,
) {
    if !state.directory.is_shared() {
        return;
    }
    let mut ticker = tokio::time::interval(crate::cluster::directory::HEARTBEAT);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match state.directory.heartbeat().await {
            Ok(forgotten) => {
                if failing {
                    tracing::info!("Redis is reachable again");
                    failing = false;
                }
                if forgotten {
                    resync(&state).await;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot renew this instance's lease");
                    failing = true;
                }
                continue;
            }
        }
        for dead in state.directory.expired() {
            state.hub.bus().instance_gone(&dead);
            match state.directory.reap(&dead).await {
                Ok(released) => announce_released(&state, &dead, released).await,
                Err(e) => {
                    tracing::warn!(instance = %dead, error = %e, "cannot clear a dead instance's entries yet")
                }
            }
        }
    }
}

/// Tells every instance what a dead instance's clients and services were.
async fn announce_released(state: &AppState, dead: &str, released: crate::cluster::Released) {
    if released.services.is_empty() && released.clients.is_empty() {
        return;
    }
    tracing::info!(
        instance = dead,
        clients = released.clients.len(),
        services = released.services.len(),
        "cleared the entries of an instance whose lease ran out"
    );
    for entry in released.services {
        let ws = entry.id.provider.workspace.to_string();
        emit(state, &ws, "service_removed", entry.into_info()).await;
    }
    for (ws, client) in released.clients {
        state.peer.peer_gone(&format!("{ws}/{client}"));
        let data = obj([
            ("id", client.as_str().into()),
            ("workspace", ws.as_str().into()),
        ]);
        emit(state, &ws, "client_disconnected", data).await;
    }
}
