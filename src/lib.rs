//! hypha-rtc: a WebRTC signaling and TURN-credential server that speaks the Hypha protocol to
//! the unmodified `hypha-rpc` clients. [`App::build`] is what `main` and the tests start.

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod error;
pub mod http;
pub mod hub;
pub mod ids;
pub mod latency;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod options;
pub mod registry;
pub mod rpc;
pub mod services;
pub mod store;
pub mod turn;
pub mod workspace;

use std::net::SocketAddr;
use std::sync::Arc;

use secrecy::SecretString;
use tokio::net::TcpListener;

use crate::auth::{TokenIssuer, UserInfo};
use crate::config::Settings;
use crate::hub::Hub;
use crate::ids::PeerAddr;
use crate::registry::Registry;
use crate::rpc::peer::ServerPeer;
use crate::rpc::value::obj;

/// The Hypha version whose protocol this server speaks, reported in `connection_info`.
pub(crate) const HYPHA_VERSION: &str = "0.21.47";

/// Shared state of a running server: the composition root every part is reached from. Its
/// parts stay inside the crate; tests and tools look through the methods below.
pub struct AppState {
    /// The validated configuration.
    pub(crate) settings: Settings,
    /// Signs and checks tokens, and remembers revocations.
    pub(crate) tokens: TokenIssuer,
    /// Live connections and routing.
    pub(crate) hub: Arc<Hub>,
    /// Services registered on this instance (clients' and the server's own).
    pub(crate) registry: Registry,
    /// The server's own RPC peer: how it calls clients and answers their calls.
    pub(crate) peer: ServerPeer,
    /// TURN credentials and the coturn probe.
    pub(crate) ice: Arc<turn::IceService>,
    /// The built-in video producer (its settings say whether it is on).
    pub(crate) demo: Arc<demo::Producer>,
    /// What `/metrics` shows.
    pub(crate) metrics: metrics::Metrics,
    /// The database: accounts, revocations, the credential audit.
    pub(crate) store: store::Store,
    /// The registry shared with other instances (in-process when this instance runs alone).
    pub(crate) directory: Arc<dyn cluster::Directory>,
    /// Cancelled when the server stops; ends its background tasks.
    pub(crate) stopping: tokio_util::sync::CancellationToken,
    /// Local accounts: sign-in checks, lockouts, disabled accounts.
    pub(crate) accounts: auth::accounts::Accounts,
    /// Who may connect, how many at once.
    pub(crate) admission: Arc<net::admission::Admission>,
    /// HTTP streams (`GET /rpc`) counted as connections are, by their client's address: over
    /// HTTP/2 one connection carries many, each a session.
    pub(crate) stream_slots: Arc<net::admission::Admission>,
    /// Which browser origins may call with credentials.
    pub(crate) cors: Arc<http::cors::CorsPolicy>,
    /// The services the server answers itself.
    pub(crate) hosted: services::Hosted,
    /// Sign-ins in progress, by address.
    pub(crate) pending_logins: services::login::PendingLogins,
    /// What clients write to the log, and how fast they may.
    pub(crate) client_log: workspace::client_log::ClientLog,
    /// The HTTP streams (`GET /rpc`) open here.
    pub(crate) streams: http::streaming::Streams,
    /// Callbacks handed to clients for one exchange (an ASGI request's `receive`/`send`).
    pub(crate) exports: services::exports::Exports,
    /// Requests to ASGI apps in progress here, bounded.
    pub(crate) app_requests: Arc<tokio::sync::Semaphore>,
    /// Workspaces made with `create_workspace`: their owners, and since when grants count.
    pub(crate) workspaces: auth::workspaces::WorkspaceBook,
    /// The first run's one-time setup key, while no account exists.
    pub(crate) first_run: auth::first_run::FirstRun,
    /// This instance's id (in its manager id, and in Redis).
    pub(crate) server_id: String,
    /// The URL clients are told to use (`--public-base-url`, else the local one).
    pub(crate) public_base_url: String,
    /// The URL this instance listens on.
    pub(crate) local_base_url: String,
}

impl AppState {
    /// The id the server's manager goes by (held once, by the hub, which routes by it).
    pub fn manager_id(&self) -> &str {
        self.hub.manager_id()
    }

    /// The server's token issuer: what signs and checks its tokens.
    pub fn tokens(&self) -> &TokenIssuer {
        &self.tokens
    }

    /// The database.
    pub fn store(&self) -> &store::Store {
        &self.store
    }

    /// The settings the server runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Whether `addr` (`workspace/client`) has a live connection here.
    pub fn is_connected(&self, addr: &str) -> bool {
        self.hub.is_connected(addr)
    }

    /// Chunked messages between clients that the server is watching now.
    pub fn chunked_in_flight(&self) -> usize {
        self.hub.chunks.len()
    }

    /// Connections admitted and still open.
    pub fn open_connections(&self) -> usize {
        self.admission.open()
    }

    /// Connections refused because their address held too many.
    pub fn refused_per_address(&self) -> u64 {
        self.admission
            .refused_per_address
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes a new client reachable from every instance and announces it to the subscribers
    /// of its workspace.
    pub(crate) async fn client_connected(&self, addr: &PeerAddr) {
        workspace::add_client(self, addr).await;
        let workspace = addr.workspace.as_str();
        let data = obj([
            ("id", addr.client.as_str().into()),
            ("workspace", workspace.into()),
        ]);
        workspace::emit(self, workspace, "client_connected", data).await;
    }

    /// Refuses a token and every token derived from it from now on, and closes the
    /// connections opened with any of them.
    pub(crate) fn revoke_locally(&self, id: String, expires_at: i64) {
        if self.tokens.mark_revoked(id.clone(), expires_at) {
            let closed = self.hub.close_where(
                |handle| {
                    handle
                        .user
                        .token
                        .as_ref()
                        .is_some_and(|t| t.family().any(|member| member == id))
                },
                "the token this connection was opened with has been revoked",
            );
            if closed > 0 {
                tracing::info!(
                    connections = closed,
                    "closed the connections of a revoked token"
                );
            }
        }
    }

    /// Forgets a client that went away: its services, the server's calls to it, its events.
    pub(crate) async fn client_gone(&self, addr: &PeerAddr, conn_id: u64) {
        let Some(removed) = workspace::remove_client(self, addr, conn_id).await else {
            return;
        };
        let workspace = addr.workspace.as_str();
        self.peer.peer_gone(&addr.to_string());
        for entry in removed {
            workspace::emit(self, workspace, "service_removed", entry.into_info()).await;
        }
        let data = obj([
            ("id", addr.client.as_str().into()),
            ("workspace", workspace.into()),
        ]);
        workspace::emit(self, workspace, "client_disconnected", data).await;
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot create the data directory {dir}: {source}")]
    DataDir { dir: String, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot join the other instances: {0}")]
    Cluster(#[from] cluster::ClusterError),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Opens the store the settings name: `--database-url`, or a SQLite file in `--data-dir`.
pub async fn open_store(settings: &Settings) -> Result<store::Store, StartupError> {
    let url = match &settings.store.database_url {
        Some(url) => url.clone(),
        None => {
            std::fs::create_dir_all(&settings.store.data_dir).map_err(|source| {
                StartupError::DataDir {
                    dir: settings.store.data_dir.display().to_string(),
                    source,
                }
            })?;
            format!(
                "sqlite://{}/hypha-rtc.db",
                settings.store.data_dir.display()
            )
        }
    };
    Ok(store::Store::open(&url).await?)
}

/// A bound, ready-to-run server.
pub struct App {
    listener: TcpListener,
    /// `--metrics-port`: /metrics served apart.
    metrics_listener: Option<TcpListener>,
    /// `--cert-file`/`--key-file`: the server speaks TLS.
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    state: Arc<AppState>,
}

impl App {
    /// For unit tests: an app on a free loopback port, its data in a new temporary directory
    /// (returned, for the test to remove).
    #[cfg(test)]
    pub(crate) async fn for_tests() -> (App, std::path::PathBuf) {
        let mut settings = Settings::default();
        settings.server.port = 0;
        settings.store.data_dir =
            std::env::temp_dir().join(format!("hypha-rtc-unit-{}", ids::random_id(10)));
        settings.server.jwt_secret = Some(secrecy::SecretString::from("unit-test".to_string()));
        let data_dir = settings.store.data_dir.clone();
        let app = App::build(settings).await.expect("the app builds");
        (app, data_dir)
    }

    /// Binds the listener and builds the state; nothing runs until [`App::run_until_stopped`].
    pub async fn build(settings: Settings) -> Result<App, StartupError> {
        let addr = format!("{}:{}", settings.server.host, settings.server.port);
        let listener =
            crate::net::listen::bind(&addr)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: addr.clone(),
                    source,
                })?;
        let local = listener
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;
        let server_id = settings
            .server
            .server_id
            .clone()
            .unwrap_or_else(|| ids::random_id(10));
        let manager_id = format!("manager-{server_id}");
        let secret = settings.server.jwt_secret.clone().unwrap_or_else(|| {
            tracing::warn!("no --jwt-secret set: using a random one, so tokens and reconnection tokens die with this process");
            SecretString::from(ids::random_id(48))
        });
        let metrics_listener = match settings.http.metrics_port {
            Some(port) => {
                let addr = format!("{}:{port}", settings.server.host);
                Some(
                    crate::net::listen::bind(&addr)
                        .await
                        .map_err(|source| StartupError::Bind { addr, source })?,
                )
            }
            None => None,
        };
        let tls = match &settings.http.tls {
            Some(files) => Some(
                axum_server::tls_rustls::RustlsConfig::from_pem_file(&files.cert, &files.key)
                    .await
                    .map_err(|e| {
                        StartupError::Tls(format!(
                            "cannot use {} and {}: {e}",
                            files.cert.display(),
                            files.key.display()
                        ))
                    })?,
            ),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let local_base_url = format!("{scheme}://{local}");
        let public_base_url = settings
            .server
            .public_base_url
            .clone()
            .unwrap_or_else(|| local_base_url.clone());
        let stopping = tokio_util::sync::CancellationToken::new();
        let cluster::Joined {
            bus,
            directory,
            inbound,
            link,
        } = cluster::join(
            &settings.cluster,
            &server_id,
            &manager_id,
            settings.connections.max_frame_size,
            secrecy::ExposeSecret::expose_secret(&secret).as_bytes(),
            &stopping,
        )
        .await?;
        let (to_server, server_frames) = tokio::sync::mpsc::channel(hub::SERVER_QUEUE);
        let hub = Arc::new(Hub::new(
            manager_id.clone(),
            settings.connections.slow_consumer_timeout,
            bus,
            to_server,
        ));
        let server_user = UserInfo::server();
        let store = open_store(&settings).await?;
        let tokens = TokenIssuer::new(&secret);
        for (revoked, expires_at) in store.revoked_tokens(auth::now_secs()).await? {
            tokens.mark_revoked(revoked, expires_at);
        }
        let workspaces = auth::workspaces::WorkspaceBook::default();
        workspaces.apply(&store.workspaces_changed_since(0).await?);
        // str0m's DTLS needs one crypto provider for the process; a second install is harmless.
        str0m::crypto::from_feature_flags().install_process_default();
        let ice = turn::IceService::new(settings.turn.clone(), store.clone());
        let demo = demo::Producer::new(settings.demo.clone());
        let metrics = metrics::Metrics::new(&hub, &ice, &demo, &store);
        let state = Arc::new(AppState {
            tokens,
            accounts: auth::accounts::Accounts::new(
                store.clone(),
                settings.accounts.max_failures,
                settings.accounts.lockout,
            ),
            client_log: Default::default(),
            streams: Default::default(),
            exports: Default::default(),
            app_requests: Arc::new(tokio::sync::Semaphore::new(http::apps::MAX_REQUESTS)),
            workspaces,
            first_run: Default::default(),
            hosted: services::Hosted::new(settings.demo.enabled),
            pending_logins: Default::default(),
            admission: net::admission::Admission::new(settings.admission.clone()),
            stream_slots: net::admission::Admission::new(settings.admission.clone()),
            cors: Arc::new(http::cors::CorsPolicy::new(
                &settings.http.allow_origins,
                &[&public_base_url, &local_base_url],
            )),
            ice,
            demo,
            metrics,
            store,
            directory,
            stopping,
            peer: ServerPeer::new(hub.clone(), &server_user),
            hub,
            registry: Registry::default(),
            server_id,
            public_base_url,
            local_base_url,
            settings,
        });
        if let Err(e) = state.accounts.reload_disabled().await {
            tracing::warn!(error = %e, "cannot read the disabled accounts yet");
        }
        tokio::spawn(watch_accounts(state.clone()));
        state.hosted.register(&state);
        tokio::spawn(services::run(state.clone(), server_frames));
        if let Some(rx) = inbound {
            let deliveries = workspace::inbound::Deliveries::start(state.clone());
            if let Some(link) = link {
                tokio::spawn(link.serve(deliveries.clone(), state.stopping.clone()));
            }
            tokio::spawn(workspace::inbound::run(deliveries, rx));
            tokio::spawn(workspace::keep_lease(state.clone(), state.stopping.clone()));
        }
        tokio::spawn(reload_revocations_now_and_then(state.clone()));
        tokio::spawn(probe_now_and_then(state.clone()));
        tokio::spawn(drop_orphaned_chunks(state.clone()));
        offer_first_run(&state).await;
        Ok(App {
            listener,
            metrics_listener,
            tls,
            state,
        })
    }

    /// The address the server listens on (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until SIGINT or SIGTERM.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `stop` completes, then shuts down gracefully (see [`shutdown`]).
    pub async fn run_until(
        self,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let addr = self.addr();
        let App {
            listener,
            metrics_listener,
            tls,
            state,
        } = self;
        tracing::info!(%addr, tls = tls.is_some(), manager_id = %state.manager_id(), "hypha-rtc listening");
        if let Some(listener) = metrics_listener {
            let metrics = http::metrics_router(state.clone());
            let stopping = state.stopping.clone();
            tokio::spawn(async move {
                let served = axum::serve(listener, metrics)
                    .with_graceful_shutdown(stopping.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "the metrics listener failed");
                }
            });
        }
        let handle = axum_server::Handle::new();
        let app = http::service(state.clone());
        let listener = listener.into_std()?;
        let admitted = net::admission::Acceptor::new(state.admission.clone());
        let timeouts = |builder: &mut hyper_util::server::conn::auto::Builder<_>| {
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(state.settings.admission.header_timeout);
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(std::time::Duration::from_secs(20))
                .keep_alive_timeout(std::time::Duration::from_secs(20))
                .max_concurrent_streams(128);
        };
        let mut server = match tls {
            Some(config) => {
                let acceptor =
                    axum_server::tls_rustls::RustlsAcceptor::new(config).acceptor(admitted);
                let mut server = axum_server::from_tcp(listener)?
                    .acceptor(acceptor)
                    .handle(handle.clone());
                timeouts(server.http_builder());
                tokio::spawn(server.serve(app))
            }
            None => {
                let mut server = axum_server::from_tcp(listener)?
                    .acceptor(admitted)
                    .handle(handle.clone());
                timeouts(server.http_builder());
                tokio::spawn(server.serve(app))
            }
        };
        // Rows an earlier run's store would not take before it stopped: written first (here,
        // once serving has begun, so that every way out below closes the audit).
        state.store.recover_audit(&state.settings.store.data_dir);
        let failed = tokio::select! {
            _ = stop => None,
            served = &mut server => Some(served.unwrap_or_else(|e| Err(std::io::Error::other(e)))),
        };
        let served = match failed {
            Some(served) => served,
            None => {
                shutdown(&state, &handle).await;
                match tokio::time::timeout(std::time::Duration::from_secs(5), server).await {
                    Ok(served) => served.unwrap_or_else(|e| Err(std::io::Error::other(e))),
                    Err(_) => Ok(()),
                }
            }
        };
        // Last: the audit refuses rows from here on (a call still waiting for its coturn
        // probe gets no credentials) and writes what it holds, or keeps it for the next start.
        let closed = state
            .store
            .close_audit(
                std::time::Duration::from_secs(3),
                Some(state.settings.store.data_dir.clone()),
            )
            .await;
        match closed {
            store::AuditClosed::Written => {}
            store::AuditClosed::Kept { rows, files } => {
                let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                tracing::error!(rows, files = %files.join(", "), "the store did not take the last audit rows in time; they are kept in the files and written at the next start");
            }
            store::AuditClosed::Lost { rows, why } => {
                tracing::error!(
                    rows,
                    why,
                    "the store did not take the last audit rows in time, and they could not be kept: they are lost"
                );
            }
            store::AuditClosed::Unconfirmed => {
                tracing::error!("the audit writer did not confirm its last writes");
            }
        }
        tracing::info!("stopped");
        served
    }
}

/// A graceful stop: no new connections; calls in flight finish (up to `--shutdown-timeout`);
/// every client gets a close frame. The caller then waits for the HTTP connections to end
/// and flushes the store.
async fn shutdown(state: &AppState, handle: &axum_server::Handle<SocketAddr>) {
    use std::time::{Duration, Instant};
    let limit = state.settings.server.shutdown_timeout;
    tracing::info!(
        limit_s = limit.as_secs(),
        "shutting down: no new connections, waiting for calls in flight"
    );
    handle.graceful_shutdown(Some(limit + Duration::from_secs(3)));
    let deadline = Instant::now() + limit;
    loop {
        // Who is here is asked only about calls between clients: hashed once per round, and
        // only when there are such calls.
        let here = std::cell::OnceCell::new();
        let pending = state.hub.inflight.pending(|party| {
            here.get_or_init(|| state.hub.connected_parties())
                .contains(&party)
        });
        if pending == 0 {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(pending, "closing with calls still in flight");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    state.stopping.cancel();
    state.hub.disconnect_all();
    let deadline = Instant::now() + Duration::from_secs(3);
    while state.hub.connection_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How often an instance reads the revocations others made through a shared store (the bus
/// brings them at once; this catches any it missed) and forgets the expired ones.
const REVOCATION_RELOAD: std::time::Duration = std::time::Duration::from_secs(30);

async fn reload_revocations_now_and_then(state: Arc<AppState>) {
    let mut ticker = tokio::time::interval(REVOCATION_RELOAD);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = state.stopping.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // Alone with its own store, this instance made every revocation it knows of: there is
        // nothing to read, only expired ones to forget.
        if state.directory.is_shared() || state.settings.store.database_url.is_some() {
            reload_revocations(&state).await;
        } else {
            state.tokens.prune_revoked(auth::now_secs());
        }
    }
}

/// While no account exists, tells the one-time link that creates the first admin, in the
/// server's output (a line of the log, JSON too when the log is JSON). The link is void once
/// used, after an hour, and as soon as any account exists.
async fn offer_first_run(state: &AppState) {
    match state.store.has_users().await {
        Ok(false) => {
            let key = state.first_run.open(auth::first_run::LIFETIME);
            tracing::warn!(
                "No account exists yet. Create the first admin at {}/setup?key={key} (the link works once, for {} minutes)",
                state.public_base_url,
                auth::first_run::LIFETIME.as_secs() / 60
            );
        }
        Ok(true) => {}
        Err(e) => tracing::warn!(error = %e, "cannot tell whether an account exists"),
    }
}

/// How often coturn is probed when nobody asks (the home page's chart of the last hour).
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Probes coturn once a minute, and every address and transport clients are given, from a
/// moment after start-up (which it does not delay).
async fn probe_now_and_then(state: Arc<AppState>) {
    if state.ice.probe().is_none() {
        return;
    }
    let mut ticker = tokio::time::interval(PROBE_EVERY);
    loop {
        tokio::select! {
            _ = state.stopping.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Some(probe) = state.ice.probe() {
            probe.check().await;
        }
        state.ice.check_listeners().await;
    }
}

/// How often chunked messages nobody touches are looked for.
const CHUNK_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Tells receivers to remove chunked messages the server forgot unprocessed, as they are
/// forgotten, and forgets idle ones now and then.
async fn drop_orphaned_chunks(state: Arc<AppState>) {
    let mut ticker = tokio::time::interval(CHUNK_SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = state.stopping.cancelled() => return,
            _ = state.hub.chunks.orphaned() => {}
            _ = ticker.tick() => state.hub.chunks.sweep(),
        }
        state.hub.drop_orphans(&state.peer.server_user).await;
    }
}

/// Reads the revocations from the store (others' too) and forgets those whose tokens expired.
pub(crate) async fn reload_revocations(state: &AppState) {
    let now = auth::now_secs();
    match state.store.revoked_tokens(now).await {
        Ok(revoked) => {
            for (id, expires_at) in revoked {
                state.revoke_locally(id, expires_at);
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read revoked tokens from the store"),
    }
    state.tokens.prune_revoked(now);
}

/// Reads the workspaces other instances made or deleted since the last reading; closes the
/// connections here of those deleted since.
async fn reload_workspaces(state: &Arc<AppState>) {
    match state
        .store
        .workspaces_changed_since(state.workspaces.reload_from())
        .await
    {
        Ok(rows) => {
            for gone in state.workspaces.apply(&rows) {
                services::workspaces::close_connections(state, &gone, None);
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot read the workspaces from the store yet"),
    }
}

/// Reads the disabled accounts every few seconds and closes the connections of accounts
/// disabled since (from any token of their family), and, when the store is shared, the
/// workspaces other instances made or deleted; prunes the rate limiters and old rows now and
/// then.
async fn watch_accounts(state: Arc<AppState>) {
    let mut ticker = tokio::time::interval(auth::accounts::DISABLED_RELOAD);
    let mut failing = false;
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = state.stopping.cancelled() => return,
            _ = ticker.tick() => {}
        }
        ticks += 1;
        if ticks.is_multiple_of(30) {
            let here = state.hub.connected_parties();
            state.hub.inflight.prune(|party| here.contains(&party));
            state.ice.prune();
            state.tokens.prune_limits();
            state.client_log.prune();
            if let Err(e) = state
                .store
                .delete_expired_login_keys(auth::now_secs())
                .await
            {
                tracing::debug!(error = %e, "cannot delete expired login keys yet");
            }
            if let Err(e) = state
                .store
                .delete_expired_workspace_data(auth::now_secs())
                .await
            {
                tracing::debug!(error = %e, "cannot delete expired workspace data yet");
            }
            // A deleted workspace is remembered while a token issued before could live.
            let forgotten = (auth::now_secs() - auth::token::MAX_LIFETIME - 24 * 3600) * 1000;
            state.workspaces.forget_deleted_before(forgotten);
            if let Err(e) = state.store.purge_deleted_workspaces(forgotten).await {
                tracing::debug!(error = %e, "cannot forget old deleted workspaces yet");
            }
        }
        if state.directory.is_shared() || state.settings.store.database_url.is_some() {
            reload_workspaces(&state).await;
        }
        match state.accounts.reload_disabled().await {
            Ok(disabled) => {
                failing = false;
                for account in disabled {
                    let closed = state.hub.close_where(
                        |handle| {
                            handle.user.token.is_some() && handle.user.account().as_str() == account
                        },
                        "this account has been disabled",
                    );
                    if closed > 0 {
                        tracing::info!(%account, connections = closed, "closed the connections of a disabled account");
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read the disabled accounts from the store");
                    failing = true;
                }
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
