//! Several instances behind one address: the bus that carries frames and announcements
//! between them, and the registry they share, each chosen once at start-up (in-process for
//! one instance, Redis for several), so the rest of the code never asks which.

pub(crate) mod bus;
pub(crate) mod directory;
pub(crate) mod link;
pub(crate) mod redis;
pub(crate) mod resp;
pub(crate) mod routes;

pub(crate) use redis::{ClusterOptions, ClusterSettings};

use std::sync::Arc;

/// Why this instance could not join the others.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the server id must be a valid id with --redis-uri: {0}")]
    ServerId(#[from] crate::ids::InvalidId),
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error(transparent)]
    Directory(#[from] crate::error::Error),
}

/// What an instance works with: the bus, the shared registry, and (with Redis) what other
/// instances send here and (with `--instance-link`) where they link to this one.
pub(crate) struct Joined {
    pub bus: Arc<dyn bus::Bus>,
    pub directory: Arc<dyn Directory>,
    pub inbound: Option<tokio::sync::mpsc::Receiver<bus::Inbound>>,
    pub link: Option<link::LinkListener>,
}

/// Chooses the implementation once: in-process without `--redis-uri`; otherwise connects to
/// Redis, claims this instance's id and starts the bus (which carries frames of up to
/// `max_frame` bytes from clients), linking directly to the instances that listen for links
/// (`secret`, which every instance shares, proves each to the other).
pub(crate) async fn join(
    settings: &ClusterSettings,
    server_id: &str,
    manager_id: &str,
    max_frame: usize,
    secret: &[u8],
    stopping: &tokio_util::sync::CancellationToken,
) -> Result<Joined, ClusterError> {
    use secrecy::ExposeSecret;
    let Some(uri) = &settings.redis_uri else {
        return Ok(Joined {
            bus: Arc::new(bus::LocalBus),
            directory: Arc::new(LocalDirectory::new(server_id.to_string())),
            inbound: None,
            link: None,
        });
    };
    crate::ids::ClientId::parse(server_id)?;
    let (client, conn) = redis::connect(uri.expose_secret()).await?;
    let directory = Arc::new(directory::RedisDirectory::new(
        server_id.to_string(),
        conn.clone(),
    ));
    directory.claim().await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let key = link::LinkKey::derive(secret);
    let listener = match &settings.instance_link {
        Some(address) => {
            let listener = link::LinkListener::bind(
                &address.bind,
                server_id.to_string(),
                key.clone(),
                max_frame,
            )
            .await?;
            let advertised = address.advertised(listener.port());
            tracing::info!(link = %advertised, "other instances link to this one directly");
            directory.advertise_link(advertised);
            Some(listener)
        }
        None => None,
    };
    directory::RedisDirectory::heartbeat(&directory).await?;
    let redis_bus = redis::RedisBus::start(
        &[format!("*/{manager_id}")],
        server_id.to_string(),
        &client,
        max_frame,
        tx,
        stopping.clone(),
    )?;
    let bus = Arc::new(routes::LinkBus::new(
        redis_bus,
        directory.clone(),
        server_id.to_string(),
        key,
        max_frame,
    ));
    tracing::info!(redis = %crate::options::redact_url(uri.expose_secret()), instance = %server_id, "sharing routing and the registry through Redis");
    Ok(Joined {
        bus,
        directory,
        inbound: Some(rx),
        link: listener,
    })
}

impl routes::Locator for directory::RedisDirectory {
    fn locate<'a>(
        &'a self,
        addr: &'a str,
    ) -> BoxFuture<'a, Result<Option<(String, String)>, bus::BusError>> {
        Box::pin(async move {
            // Managers (`*/...`) are in no workspace's directory: Redis finds them.
            let Some((ws, client)) = addr.split_once('/').filter(|(ws, _)| *ws != "*") else {
                return Ok(None);
            };
            let owner = self
                .client_elsewhere(ws, client)
                .await
                .map_err(|e| bus::BusError(e.to_string()))?;
            let Some(owner) = owner else {
                return Ok(None);
            };
            let link = self
                .link_of(&owner)
                .await
                .map_err(|e| bus::BusError(e.to_string()))?;
            Ok(link.map(|link| (owner, link)))
        })
    }

    fn any_links(&self) -> bool {
        directory::RedisDirectory::any_links(self)
    }
}

use futures_util::future::BoxFuture;

use crate::error::Error;
use crate::registry::ServiceEntry;
pub(crate) use directory::{ClientClaim, Released};

/// The half of the registry that other instances share: which clients and services live on
/// them. One implementation per deployment, chosen at start-up: [`LocalDirectory`] (nothing
/// lives elsewhere) or [`directory::RedisDirectory`].
pub trait Directory: Send + Sync {
    /// Whether other instances may exist.
    fn is_shared(&self) -> bool;
    /// This instance's id.
    fn instance(&self) -> &str;
    /// Serialises this instance's writes with its resync, so a resync never restores an
    /// entry removed while it ran.
    fn writes(&self) -> &tokio::sync::Mutex<()>;
    /// Services of a workspace on the other live instances.
    fn services_in<'a>(&'a self, ws: &'a str) -> BoxFuture<'a, Result<Vec<ServiceEntry>, Error>>;
    /// Clients of a workspace on the other live instances.
    fn clients_in<'a>(&'a self, ws: &'a str) -> BoxFuture<'a, Result<Vec<String>, Error>>;
    /// The live instance other than this one that holds `ws/client`, if any.
    fn client_elsewhere<'a>(
        &'a self,
        ws: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, Error>>;
    /// Publishes a service of this instance.
    fn put_service<'a>(&'a self, entry: &'a ServiceEntry) -> BoxFuture<'a, Result<(), Error>>;
    /// Withdraws services of this instance.
    fn remove_services<'a>(
        &'a self,
        entries: &'a [ServiceEntry],
    ) -> BoxFuture<'a, Result<(), Error>>;
    /// Records a client of this instance unless another live instance holds it; then
    /// returns that instance's claim.
    fn claim_client<'a>(
        &'a self,
        ws: &'a str,
        client: &'a str,
        since_ms: i64,
        reconnected: bool,
    ) -> BoxFuture<'a, Result<Option<ClientClaim>, Error>>;
    /// Records a client of this instance whatever holds it now.
    fn force_client<'a>(
        &'a self,
        ws: &'a str,
        client: &'a str,
        since_ms: i64,
        reconnected: bool,
    ) -> BoxFuture<'a, Result<(), Error>>;
    /// Forgets a client of this instance.
    fn remove_client<'a>(
        &'a self,
        ws: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>>;
    /// Writes this instance's entries again, dropping any it no longer has.
    fn resync<'a>(
        &'a self,
        services: &'a [ServiceEntry],
        clients: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(), Error>>;
    /// Renews this instance's lease; true when the shared state had forgotten this instance.
    fn heartbeat(&self) -> BoxFuture<'_, Result<bool, Error>>;
    /// Instances whose lease ran out.
    fn expired(&self) -> Vec<String>;
    /// Instances whose lease runs (this one included), as of the last heartbeat, by id.
    fn live(&self) -> Vec<String>;
    /// Removes a dead instance's entries (if this instance is the one to do it).
    fn reap<'a>(&'a self, dead: &'a str) -> BoxFuture<'a, Result<Released, Error>>;
}

/// The directory of a single instance: nothing lives anywhere else.
pub(crate) struct LocalDirectory {
    instance: String,
    writes: tokio::sync::Mutex<()>,
}

impl LocalDirectory {
    pub(crate) fn new(instance: String) -> Self {
        Self {
            instance,
            writes: tokio::sync::Mutex::new(()),
        }
    }
}

fn done<'a, T: Send + 'a>(value: T) -> BoxFuture<'a, Result<T, Error>> {
    Box::pin(std::future::ready(Ok(value)))
}

impl Directory for LocalDirectory {
    fn is_shared(&self) -> bool {
        false
    }
    fn instance(&self) -> &str {
        &self.instance
    }
    fn writes(&self) -> &tokio::sync::Mutex<()> {
        &self.writes
    }
    fn services_in<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<ServiceEntry>, Error>> {
        done(Vec::new())
    }
    fn clients_in<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<String>, Error>> {
        done(Vec::new())
    }
    fn client_elsewhere<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, Error>> {
        done(None)
    }
    fn put_service<'a>(&'a self, _: &'a ServiceEntry) -> BoxFuture<'a, Result<(), Error>> {
        done(())
    }
    fn remove_services<'a>(&'a self, _: &'a [ServiceEntry]) -> BoxFuture<'a, Result<(), Error>> {
        done(())
    }
    fn claim_client<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: i64,
        _: bool,
    ) -> BoxFuture<'a, Result<Option<ClientClaim>, Error>> {
        done(None)
    }
    fn force_client<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: i64,
        _: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        done(())
    }
    fn remove_client<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        done(())
    }
    fn resync<'a>(
        &'a self,
        _: &'a [ServiceEntry],
        _: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(), Error>> {
        done(())
    }
    fn heartbeat(&self) -> BoxFuture<'_, Result<bool, Error>> {
        done(false)
    }
    fn expired(&self) -> Vec<String> {
        Vec::new()
    }
    fn live(&self) -> Vec<String> {
        vec![self.instance.clone()]
    }
    fn reap<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Released, Error>> {
        done(Released::default())
    }
}

impl Directory for directory::RedisDirectory {
    fn is_shared(&self) -> bool {
        true
    }
    fn instance(&self) -> &str {
        directory::RedisDirectory::instance(self)
    }
    fn writes(&self) -> &tokio::sync::Mutex<()> {
        &self.writes
    }
    fn services_in<'a>(&'a self, ws: &'a str) -> BoxFuture<'a, Result<Vec<ServiceEntry>, Error>> {
        Box::pin(directory::RedisDirectory::services_in(self, ws))
    }
    fn clients_in<'a>(&'a self, ws: &'a str) -> BoxFuture<'a, Result<Vec<String>, Error>> {
        Box::pin(directory::RedisDirectory::clients_in(self, ws))
    }
    fn client_elsewhere<'a>(
        &'a self,
        ws: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, Error>> {
        Box::pin(directory::RedisDirectory::client_elsewhere(
            self, ws, client,
        ))
    }
    fn put_service<'a>(&'a self, entry: &'a ServiceEntry) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(directory::RedisDirectory::put_service(self, entry))
    }
    fn remove_services<'a>(
        &'a self,
        entries: &'a [ServiceEntry],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(directory::RedisDirectory::remove_services(self, entries))
    }
    fn claim_client<'a>(
        &'a self,
        ws: &'a str,
        client: &'a str,
        since_ms: i64,
        reconnected: bool,
    ) -> BoxFuture<'a, Result<Option<ClientClaim>, Error>> {
        Box::pin(directory::RedisDirectory::claim_client(
            self,
            ws,
            client,
            since_ms,
            reconnected,
        ))
    }
    fn force_client<'a>(
        &'a self,
        ws: &'a str,
        client: &'a str,
        since_ms: i64,
        reconnected: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(directory::RedisDirectory::force_client(
            self,
            ws,
            client,
            since_ms,
            reconnected,
        ))
    }
    fn remove_client<'a>(
        &'a self,
        ws: &'a str,
        client: &'a str,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(directory::RedisDirectory::remove_client(self, ws, client))
    }
    fn resync<'a>(
        &'a self,
        services: &'a [ServiceEntry],
        clients: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(directory::RedisDirectory::resync(self, services, clients))
    }
    fn heartbeat(&self) -> BoxFuture<'_, Result<bool, Error>> {
        Box::pin(directory::RedisDirectory::heartbeat(self))
    }
    fn expired(&self) -> Vec<String> {
        directory::RedisDirectory::expired(self)
    }
    fn live(&self) -> Vec<String> {
        directory::RedisDirectory::live(self)
    }
    fn reap<'a>(&'a self, dead: &'a str) -> BoxFuture<'a, Result<Released, Error>> {
        Box::pin(directory::RedisDirectory::reap(self, dead))
    }
}
