//! The Bus over Redis pub/sub, for several instances. Each instance subscribes to one channel
//! per client connected to it (`hypha-rtc:c:<ws>/<client>`, its manager's too) and to the
//! announcement channel. A frame for a client elsewhere is one PUBLISH, whose receiver count
//! says at once whether any instance holds that client (the dead-peer reject needs no lookup).
//! When Redis goes away, sends fail with [`BusError`]; the subscriber reconnects with back-off,
//! subscribes again and reports [`Inbound::Reconnected`] so the instance rewrites its state.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::bus::{Announcement, Bus, BusError, Inbound, decode_announcement, encode_announcement};

/// Prefix of every key and channel this server uses in Redis.
/// Several instances behind one address.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterOptions {
    /// Redis for several instances behind one address: routing between them and the shared service registry, e.g. redis://127.0.0.1:6379/0 [default: none, everything in-process]
    #[arg(
        long,
        env = "HYPHA_REDIS_URI",
        value_name = "URL",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub redis_uri: Option<String>,
}

/// Several instances, validated.
#[derive(Debug, Clone, Default)]
pub struct ClusterSettings {
    /// `None`: one instance, bus and registry in-process. May hold a password.
    pub redis_uri: Option<secrecy::SecretString>,
}

impl ClusterOptions {
    pub(crate) fn settings(&self) -> Result<ClusterSettings, crate::options::SettingsError> {
        let uri = self.redis_uri.as_deref().filter(|u| !u.is_empty());
        if let Some(uri) = uri
            && !(uri.starts_with("redis://")
                || uri.starts_with("redis+unix://")
                || uri.starts_with("unix://"))
        {
            return Err(crate::options::SettingsError::new(format!(
                "{}: must start with redis://, redis+unix:// or unix://, got {:?}",
                crate::options::option_name("redis-uri"),
                crate::options::redact_url(uri)
            )));
        }
        Ok(ClusterSettings {
            redis_uri: uri.map(|u| secrecy::SecretString::from(u.to_string())),
        })
    }
}

pub(crate) const PREFIX: &str = "hypha-rtc:";
const ANNOUNCE_CHANNEL: &str = "hypha-rtc:announce";
/// How long one Redis command may take before it counts as failed.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the subscriber checks that its connection is alive.
const PING_INTERVAL: Duration = Duration::from_secs(2);
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

fn client_channel(addr: &str) -> String {
    format!("{PREFIX}c:{addr}")
}

fn bus_error(e: impl std::fmt::Display) -> BusError {
    BusError(e.to_string())
}

/// Opens a Redis client and a self-healing command connection.
pub(crate) async fn connect(uri: &str) -> Result<(redis::Client, ConnectionManager), BusError> {
    let client = redis::Client::open(uri).map_err(|e| {
        BusError(format!(
            "invalid Redis URI {}: {e}",
            crate::options::redact_url(uri)
        ))
    })?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(RECONNECT_MAX);
    let manager = tokio::time::timeout(
        COMMAND_TIMEOUT * 2,
        ConnectionManager::new_with_config(client.clone(), config),
    )
    .await
    .map_err(|_| {
        BusError(format!(
            "no answer from Redis at {}",
            crate::options::redact_url(uri)
        ))
    })?
    .map_err(|e| {
        BusError(format!(
            "cannot connect to Redis at {}: {e}",
            crate::options::redact_url(uri)
        ))
    })?;
    Ok((client, manager))
}

/// The Redis implementation of [`Bus`].
pub(crate) struct RedisBus {
    instance: String,
    conn: ConnectionManager,
    /// Client channels this instance wants; the subscriber restores them after a reconnect.
    wanted: Mutex<HashSet<String>>,
    /// The live subscription connection's command half, if connected.
    sink: Mutex<Option<PubSubSink>>,
    /// Whether the subscription connection is up.
    up: AtomicBool,
    /// Frames for clients elsewhere, in order, for the publisher task.
    publish: mpsc::Sender<Publish>,
}

/// A frame to publish, and who hears whether any instance holds its client.
struct Publish {
    channel: String,
    data: Bytes,
    done: super::bus::Delivered,
}

/// Frames waiting for the publisher; a sender waits for room beyond this.
const PUBLISH_QUEUE: usize = 4096;
/// PUBLISH commands sent as one pipeline.
const PUBLISH_BATCH: usize = 256;

/// Publishes frames in the order they were queued: whatever queued while one pipeline was
/// on its way goes as the next pipeline, so under load a round trip to Redis carries many
/// frames instead of one, and each sender still hears its frame's receiver count.
async fn publisher(conn: ConnectionManager, mut queue: mpsc::Receiver<Publish>) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while queue.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let mut pipe = redis::pipe();
        for frame in &batch {
            pipe.cmd("PUBLISH")
                .arg(&frame.channel)
                .arg(frame.data.as_ref());
        }
        let mut conn = conn.clone();
        let answered: Result<Vec<i64>, BusError> =
            tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async(&mut conn))
                .await
                .map_err(|_| BusError("Redis did not answer a PUBLISH".into()))
                .and_then(|r| r.map_err(bus_error));
        match answered {
            Ok(receivers) if receivers.len() == batch.len() => {
                for (frame, n) in batch.drain(..).zip(receivers) {
                    (frame.done)(Ok(n > 0));
                }
            }
            Ok(_) => {
                for frame in batch.drain(..) {
                    (frame.done)(Err(BusError("Redis answered a pipeline in part".into())));
                }
            }
            Err(e) => {
                for frame in batch.drain(..) {
                    (frame.done)(Err(e.clone()));
                }
            }
        }
    }
}

impl RedisBus {
    /// Starts the bus: `inbound` receives what other instances send here until `stop`, from
    /// the start for the addresses in `own` (the manager's).
    pub(crate) fn start(
        own: &[String],
        instance: String,
        client: redis::Client,
        conn: ConnectionManager,
        inbound: mpsc::Sender<Inbound>,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let (publish, queue) = mpsc::channel(PUBLISH_QUEUE);
        tokio::spawn(publisher(conn.clone(), queue));
        let bus = Arc::new(Self {
            instance,
            publish,
            conn,
            wanted: Mutex::new(own.iter().map(|a| client_channel(a)).collect()),
            sink: Mutex::new(None),
            up: AtomicBool::new(false),
        });
        tokio::spawn(subscriber(bus.clone(), client, inbound, stop));
        bus
    }

    fn current_sink(&self) -> Option<PubSubSink> {
        self.sink.lock().ok().and_then(|s| s.clone())
    }

    fn wanted_snapshot(&self) -> Vec<String> {
        self.wanted
            .lock()
            .map(|w| w.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Bus for RedisBus {
    fn send<'a>(&'a self, addr: &'a str, data: Bytes) -> BoxFuture<'a, Result<bool, BusError>> {
        Box::pin(async move {
            let (done, answer) = tokio::sync::oneshot::channel();
            let then: super::bus::Delivered = Box::new(move |delivered| {
                let _ = done.send(delivered);
            });
            self.send_then(addr, data, then).await?;
            answer
                .await
                .map_err(|_| BusError("the publisher has stopped".into()))?
        })
    }

    fn send_then<'a>(
        &'a self,
        addr: &'a str,
        data: Bytes,
        then: super::bus::Delivered,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let frame = Publish {
                channel: client_channel(addr),
                data,
                done: then,
            };
            self.publish
                .send(frame)
                .await
                .map_err(|_| BusError("the publisher has stopped".into()))
        })
    }

    fn announce(&self, announcement: Announcement) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            let payload = encode_announcement(&self.instance, &announcement);
            let mut conn = self.conn.clone();
            let _: i64 = redis::cmd("PUBLISH")
                .arg(ANNOUNCE_CHANNEL)
                .arg(payload)
                .query_async(&mut conn)
                .await
                .map_err(bus_error)?;
            Ok(())
        })
    }

    fn attach<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let channel = client_channel(addr);
            if let Ok(mut wanted) = self.wanted.lock() {
                wanted.insert(channel.clone());
            }
            // Without a connection the subscriber subscribes it when Redis is back.
            let Some(mut sink) = self.current_sink() else {
                return Err(BusError("not connected to Redis".into()));
            };
            tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&channel))
                .await
                .map_err(|_| BusError("Redis did not confirm a subscription".into()))?
                .map_err(bus_error)
        })
    }

    fn detach<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let channel = client_channel(addr);
            if let Ok(mut wanted) = self.wanted.lock() {
                wanted.remove(&channel);
            }
            if let Some(mut sink) = self.current_sink() {
                let _ = tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(&channel)).await;
            }
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

/// Keeps one subscription connection alive, forwarding what arrives to `inbound`.
async fn subscriber(
    bus: Arc<RedisBus>,
    client: redis::Client,
    inbound: mpsc::Sender<Inbound>,
    stop: CancellationToken,
) {
    let mut delay = RECONNECT_MIN;
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = subscribe_and_read(&bus, &client, &inbound, &stop) => outcome,
        };
        if let Ok(mut sink) = bus.sink.lock() {
            *sink = None;
        }
        if stop.is_cancelled() || inbound.is_closed() {
            return;
        }
        if let Err(e) = outcome {
            if bus.up.swap(false, Ordering::Relaxed) {
                tracing::warn!(error = %e, "lost the Redis subscription; reconnecting");
                delay = RECONNECT_MIN;
            } else {
                tracing::debug!(error = %e, "Redis still unavailable");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

/// One subscription connection's life: subscribe, read until it breaks.
async fn subscribe_and_read(
    bus: &Arc<RedisBus>,
    client: &redis::Client,
    inbound: &mpsc::Sender<Inbound>,
    stop: &CancellationToken,
) -> Result<(), BusError> {
    let pubsub = tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| BusError("no answer from Redis".into()))?
        .map_err(bus_error)?;
    let (mut sink, mut stream) = pubsub.split();
    // The sink goes live before the snapshot: an attach racing with this reconnect either is
    // in the snapshot or subscribes through the new sink itself.
    if let Ok(mut current) = bus.sink.lock() {
        *current = Some(sink.clone());
    }
    let mut channels = bus.wanted_snapshot();
    channels.push(ANNOUNCE_CHANNEL.to_string());
    for chunk in channels.chunks(512) {
        tokio::time::timeout(COMMAND_TIMEOUT * 4, sink.subscribe(chunk))
            .await
            .map_err(|_| BusError("Redis did not confirm the subscriptions".into()))?
            .map_err(bus_error)?;
    }
    // A detach that ran during the snapshot is undone here.
    let left: Vec<String> = {
        let wanted = bus.wanted.lock().map(|w| w.clone()).unwrap_or_default();
        channels
            .iter()
            .filter(|c| *c != ANNOUNCE_CHANNEL && !wanted.contains(*c))
            .cloned()
            .collect()
    };
    if !left.is_empty() {
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(&left)).await;
    }
    tracing::info!(channels = channels.len(), "subscribed to Redis");
    bus.up.store(true, Ordering::Relaxed);
    if inbound.send(Inbound::Reconnected).await.is_err() {
        return Ok(());
    }
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            message = stream.next() => {
                let Some(message) = message else {
                    return Err(BusError("the Redis subscription connection closed".into()));
                };
                let Some(item) = inbound_of(&bus.instance, &message) else { continue };
                if inbound.send(item).await.is_err() {
                    return Ok(());
                }
            }
            _ = ping.tick() => {
                tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<redis::Value>())
                    .await
                    .map_err(|_| BusError("Redis did not answer a ping".into()))?
                    .map_err(bus_error)?;
            }
        }
    }
}

/// What a pub/sub message means here; `None` for our own announcements and malformed ones.
fn inbound_of(instance: &str, message: &redis::Msg) -> Option<Inbound> {
    let channel = message.get_channel_name();
    let payload = message.get_payload_bytes();
    if channel == ANNOUNCE_CHANNEL {
        let (origin, announcement) = decode_announcement(payload)?;
        return (origin != instance).then_some(Inbound::Announced(announcement));
    }
    let to = channel.strip_prefix(PREFIX)?.strip_prefix("c:")?;
    Some(Inbound::Frame {
        to: to.to_string(),
        data: Bytes::copy_from_slice(payload),
    })
}
