//! The Bus over Redis pub/sub, for several instances. Each instance subscribes to one channel
//! per client connected to it (`hypha-rtc:c:<ws>/<client>`, its manager's too) and to the
//! announcement channel. A frame for a client elsewhere is one PUBLISH, whose receiver count
//! says at once whether any instance holds that client (the dead-peer reject needs no lookup).
//! When Redis goes away, sends fail with [`BusError`]; the subscriber reconnects with back-off,
//! subscribes again and reports [`Inbound::Reconnected`] so the instance rewrites its state.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::bus::{
    Announcement, Bus, BusError, FRAME_HEADROOM, Inbound, KEEP_BUFFER, Sending,
    decode_announcement, encode_announcement,
};
use super::resp::{self, Reply};

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
    /// With --redis-uri: where the other instances link to this one directly (HOST:PORT, an address they can reach; port 0: any free port), so that frames between instances skip Redis [default: none, frames go through Redis]
    #[arg(
        long,
        env = "HYPHA_INSTANCE_LINK",
        value_name = "HOST:PORT",
        hide_default_value = true
    )]
    pub instance_link: Option<String>,
}

/// Several instances, validated.
#[derive(Debug, Clone, Default)]
pub struct ClusterSettings {
    /// `None`: one instance, bus and registry in-process. May hold a password.
    pub redis_uri: Option<secrecy::SecretString>,
    /// Where this instance's link listens and is reached, if it has one.
    pub instance_link: Option<InstanceLink>,
}

/// Where an instance's link listens: a host the other instances can reach, and a port.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceLink {
    /// What to listen on (`HOST:PORT` as given).
    pub bind: String,
    host: String,
}

impl InstanceLink {
    /// Reads `HOST:PORT` (IPv6 hosts in brackets). The host is what the other instances dial,
    /// so an unspecified address (`0.0.0.0`, `[::]`) is refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("expected HOST:PORT, got {text:?}"))?;
        port.parse::<u16>()
            .map_err(|_| format!("the port of {text:?} is not a port number"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.is_empty() {
            return Err(format!("expected HOST:PORT, got {text:?}"));
        }
        if bare.contains(':') && !host.starts_with('[') {
            return Err(format!(
                "write an IPv6 host in brackets, as in [::1]:9600, got {text:?}"
            ));
        }
        if bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_unspecified())
        {
            return Err(format!(
                "{text:?} is no address another instance can reach: name this instance's own host or address"
            ));
        }
        Ok(Self {
            bind: text.to_string(),
            host: host.to_string(),
        })
    }

    /// What the other instances dial, once the listener has its port.
    pub fn advertised(&self, port: u16) -> String {
        format!("{}:{port}", self.host)
    }
}

impl ClusterOptions {
    /// The options checked: a Redis URI must name a scheme this server speaks.
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
        let link = self.instance_link.as_deref().filter(|l| !l.is_empty());
        let instance_link = match link {
            None => None,
            Some(_) if uri.is_none() => {
                return Err(crate::options::SettingsError::new(format!(
                    "{} links instances that share --redis-uri; set that too",
                    crate::options::option_name("instance-link")
                )));
            }
            Some(link) => Some(InstanceLink::parse(link).map_err(|e| {
                crate::options::SettingsError::new(format!(
                    "{}: {e}",
                    crate::options::option_name("instance-link")
                ))
            })?),
        };
        Ok(ClusterSettings {
            redis_uri: uri.map(|u| secrecy::SecretString::from(u.to_string())),
            instance_link,
        })
    }
}

/// Prefix of every key and channel this server uses in Redis.
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

/// The Redis implementation of [`Bus`]. Frames go out on a connection of their own (one
/// task writes each batch of `PUBLISH` commands and reads their receiver counts) and come in
/// on another (one task reads the subscription and hands each message on): no task sits
/// between a socket and the bus, and no payload is parsed twice.
pub(crate) struct RedisBus {
    instance: String,
    /// Whether the subscription connection is up.
    up: Arc<AtomicBool>,
    /// Frames and announcements for the publisher task, in order.
    publish: mpsc::Sender<Publish>,
    /// Subscription changes for the subscriber task, in order.
    control: mpsc::Sender<Control>,
}

/// A frame to publish, and who hears whether any instance holds its client (dropped
/// unpublished, with the publisher stopped or its sender no longer waiting for room in the
/// queue, it tells an error).
struct Publish {
    channel: String,
    frame: Sending,
}

/// A change of this instance's subscriptions.
enum Control {
    /// Take frames for this channel; told once Redis confirms.
    Attach(String, Attached),
    /// Stop taking frames for this channel.
    Detach(String),
}

/// Frames waiting for the publisher; a sender waits for room beyond this.
const PUBLISH_QUEUE: usize = 4096;
/// PUBLISH commands sent as one write.
const PUBLISH_BATCH: usize = 256;
/// Subscription changes waiting for the subscriber.
const CONTROL_QUEUE: usize = 4096;
/// Channels per SUBSCRIBE when (re)subscribing everything.
const SUBSCRIBE_CHUNK: usize = 512;
/// The longest reply the publishing connection takes (its replies are integers).
const PUBLISH_REPLY_MAX: usize = 64 << 10;

/// Publishes frames in the order they were queued: whatever queued while one batch was on its
/// way goes as the next, so under load a round trip to Redis carries many frames instead of
/// one, and each sender still hears its frame's receiver count. Every frame's `done` is
/// called, with an error where Redis cannot be reached.
async fn publisher(target: resp::Target, mut queue: mpsc::Receiver<Publish>) {
    let mut conn: Option<resp::Conn> = None;
    let mut retry_at = Instant::now();
    let mut delay = RECONNECT_MIN;
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    let mut answers = Vec::with_capacity(PUBLISH_BATCH);
    let mut out = BytesMut::new();
    loop {
        let taken = match conn.as_mut() {
            // While idle the connection is watched: Redis going away is noticed now, not by
            // the first frame after it (whose answer would be lost with the connection).
            Some(idle) => tokio::select! {
                taken = queue.recv_many(&mut batch, PUBLISH_BATCH) => taken,
                broken = idle.fill() => {
                    let e = broken.err().unwrap_or_else(|| BusError("Redis sent something unasked".into()));
                    tracing::warn!(error = %e, "lost the Redis connection for publishing; reconnecting");
                    conn = None;
                    continue;
                }
            },
            None => queue.recv_many(&mut batch, PUBLISH_BATCH).await,
        };
        if taken == 0 {
            return;
        }
        if conn.is_none() && Instant::now() >= retry_at {
            match resp::Conn::open(&target, COMMAND_TIMEOUT, PUBLISH_REPLY_MAX).await {
                Ok(opened) => {
                    conn = Some(opened);
                    delay = RECONNECT_MIN;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot publish to Redis");
                    retry_at = Instant::now() + delay;
                    delay = (delay * 2).min(RECONNECT_MAX);
                }
            }
        }
        answers.clear();
        let sent = match conn.as_mut() {
            // Encoded only when there is a connection to write it to.
            Some(c) => {
                out.clear();
                for publish in &batch {
                    resp::put_command(
                        &mut out,
                        &[b"PUBLISH", publish.channel.as_bytes(), publish.frame.data()],
                    );
                }
                tokio::time::timeout(
                    COMMAND_TIMEOUT,
                    publish_batch(c, &out, batch.len(), &mut answers),
                )
                .await
                .unwrap_or_else(|_| Err(BusError("Redis did not answer a PUBLISH".into())))
            }
            None => Err(BusError("not connected to Redis".into())),
        };
        if let Err(e) = sent {
            if conn.take().is_some() {
                tracing::warn!(error = %e, "lost the Redis connection for publishing; reconnecting");
            }
            answers.clear();
            answers.resize(batch.len(), Err(e));
        }
        for (publish, answer) in batch.drain(..).zip(answers.drain(..)) {
            publish.frame.tell(answer);
        }
        if out.capacity() > KEEP_BUFFER {
            out = BytesMut::new();
        }
    }
}

/// Writes a batch of `count` PUBLISH commands as one write and reads their answers: per
/// frame, whether any instance holds its channel.
async fn publish_batch(
    conn: &mut resp::Conn,
    commands: &[u8],
    count: usize,
    answers: &mut Vec<Result<bool, BusError>>,
) -> Result<(), BusError> {
    conn.write(commands).await?;
    while answers.len() < count {
        answers.push(match conn.reply().await? {
            Reply::Integer(receivers) => Ok(receivers > 0),
            Reply::Error(e) => Err(BusError(format!("Redis refused a PUBLISH: {e}"))),
            _ => {
                return Err(BusError(
                    "Redis answered a PUBLISH with something else".into(),
                ));
            }
        });
    }
    Ok(())
}

impl RedisBus {
    /// Starts the bus: `inbound` receives what other instances send here until `stop`, from
    /// the start for the addresses in `own` (the manager's).
    pub(crate) fn start(
        own: &[String],
        instance: String,
        client: &redis::Client,
        max_frame: usize,
        inbound: mpsc::Sender<Inbound>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, BusError> {
        let target = resp::Target::of(client)?;
        let (publish, queue) = mpsc::channel(PUBLISH_QUEUE);
        let (control, controls) = mpsc::channel(CONTROL_QUEUE);
        let up = Arc::new(AtomicBool::new(false));
        tokio::spawn(publisher(target.clone(), queue));
        let subscriber = Subscriber {
            instance: instance.clone(),
            target,
            up: up.clone(),
            wanted: own.iter().map(|a| client_channel(a)).collect(),
            controls,
            inbound,
            max_bulk: max_frame.saturating_add(FRAME_HEADROOM),
        };
        tokio::spawn(subscriber.run(stop));
        Ok(Arc::new(Self {
            instance,
            up,
            publish,
            control,
        }))
    }

    /// Queues a frame for the publisher; `done` hears what became of it, also when the
    /// publisher has stopped (the refused frame answers as it drops), so that is no error here.
    async fn queue(
        &self,
        channel: String,
        data: Bytes,
        done: super::bus::Delivered,
    ) -> Result<(), BusError> {
        let _ = self
            .publish
            .send(Publish {
                channel,
                frame: Sending::new(data, done).dropped_as("the frame was not published"),
            })
            .await;
        Ok(())
    }

    /// Publishes and waits for Redis's answer: whether any instance took it.
    async fn publish_and_wait(&self, channel: String, data: Bytes) -> Result<bool, BusError> {
        let (done, answer) = oneshot::channel();
        let then: super::bus::Delivered = Box::new(move |delivered, _| {
            let _ = done.send(delivered);
        });
        self.queue(channel, data, then).await?;
        answer
            .await
            .map_err(|_| BusError("the publisher has stopped".into()))?
    }
}

impl Bus for RedisBus {
    fn send<'a>(&'a self, addr: &'a str, data: Bytes) -> BoxFuture<'a, Result<bool, BusError>> {
        Box::pin(self.publish_and_wait(client_channel(addr), data))
    }

    fn send_then<'a>(
        &'a self,
        addr: &'a str,
        data: Bytes,
        then: super::bus::Delivered,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(self.queue(client_channel(addr), data, then))
    }

    fn announce(&self, announcement: Announcement) -> BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            let payload = Bytes::from(encode_announcement(&self.instance, &announcement));
            self.publish_and_wait(ANNOUNCE_CHANNEL.to_string(), payload)
                .await
                .map(|_| ())
        })
    }

    fn attach<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let (done, confirmed) = oneshot::channel();
            self.control
                .send(Control::Attach(client_channel(addr), done))
                .await
                .map_err(|_| BusError("the subscriber has stopped".into()))?;
            // Without a connection the subscriber subscribes it when Redis is back; the
            // caller need not wait for that.
            if !self.is_up() {
                return Err(BusError("not connected to Redis".into()));
            }
            tokio::time::timeout(COMMAND_TIMEOUT, confirmed)
                .await
                .map_err(|_| BusError("Redis did not confirm a subscription".into()))?
                .map_err(|_| BusError("lost the Redis subscription".into()))?
        })
    }

    fn detach<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = self
                .control
                .send(Control::Detach(client_channel(addr)))
                .await;
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

/// The task that holds the subscription connection and owns the set of channels this
/// instance wants, so subscription changes and reconnects never race.
struct Subscriber {
    instance: String,
    target: resp::Target,
    up: Arc<AtomicBool>,
    /// Client channels this instance wants (restored after a reconnect).
    wanted: HashSet<String>,
    controls: mpsc::Receiver<Control>,
    inbound: mpsc::Sender<Inbound>,
    /// The longest message accepted from Redis.
    max_bulk: usize,
}

/// What one reply on the subscription connection means.
enum Event {
    Deliver(Inbound),
    Subscribed(Bytes),
    Pong,
    Other,
}

impl Subscriber {
    /// Keeps the subscription alive until `stop`, reconnecting with back-off.
    async fn run(mut self, stop: CancellationToken) {
        let mut delay = RECONNECT_MIN;
        // Each new reason Redis is unavailable is logged once as a warning (a refused
        // password, say); the same reason again only in debug.
        let mut last_reason = String::new();
        loop {
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                outcome = self.serve() => outcome,
            };
            let was_up = self.up.swap(false, Ordering::Relaxed);
            match outcome {
                // The instance stopped listening.
                Ok(()) => return,
                Err(e) if was_up => {
                    tracing::warn!(error = %e, "lost the Redis subscription; reconnecting");
                    delay = RECONNECT_MIN;
                    last_reason = e.to_string();
                }
                Err(e) if e.to_string() != last_reason => {
                    tracing::warn!(error = %e, "Redis still unavailable");
                    last_reason = e.to_string();
                }
                Err(e) => tracing::debug!(error = %e, "Redis still unavailable"),
            }
            // Subscription changes keep arriving while Redis is away; `wanted` follows them.
            let until = Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep_until(until.into()) => break,
                    control = self.controls.recv() => match control {
                        None => return,
                        Some(Control::Attach(channel, done)) => {
                            self.wanted.insert(channel);
                            let _ = done.send(Err(BusError("not connected to Redis".into())));
                        }
                        Some(Control::Detach(channel)) => {
                            self.wanted.remove(&channel);
                        }
                    },
                }
            }
            delay = (delay * 2).min(RECONNECT_MAX);
        }
    }

    /// One connection's life: subscribe to everything wanted, then read and apply changes
    /// until it breaks. `Ok` when the instance no longer listens.
    async fn serve(&mut self) -> Result<(), BusError> {
        let mut conn = resp::Conn::open(&self.target, COMMAND_TIMEOUT, self.max_bulk).await?;
        let mut out = BytesMut::new();
        // Everything wanted now, subscribed a chunk at a time.
        let mut initial: Vec<String> = self.wanted.iter().cloned().collect();
        initial.push(ANNOUNCE_CHANNEL.to_string());
        let channels = initial.len();
        let mut confirmations = Confirmations::new(initial);
        confirmations.next_chunk(&self.wanted, &mut out);
        write(&mut conn, &out).await?;
        let mut confirm_by = Instant::now() + COMMAND_TIMEOUT * 4;
        let mut controls = Vec::new();
        let mut awaiting_pong = false;
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            out.clear();
            // Changes first (few, bounded), then what Redis sent; the ping only when neither
            // is waiting, so a pong that came while deliveries waited is read before the
            // next ping is judged unanswered.
            tokio::select! {
                biased;
                taken = self.controls.recv_many(&mut controls, SUBSCRIBE_CHUNK) => {
                    if taken == 0 {
                        return Ok(());
                    }
                    for control in controls.drain(..) {
                        match control {
                            Control::Attach(channel, done) => {
                                resp::put_command(&mut out, &[b"SUBSCRIBE", channel.as_bytes()]);
                                confirmations.attached(channel.clone(), done);
                                self.wanted.insert(channel);
                            }
                            Control::Detach(channel) => {
                                resp::put_command(&mut out, &[b"UNSUBSCRIBE", channel.as_bytes()]);
                                self.wanted.remove(&channel);
                            }
                        }
                    }
                    write(&mut conn, &out).await?;
                }
                read = conn.fill() => {
                    read?;
                    while let Some(reply) = conn.take_reply()? {
                        match event(&self.instance, reply)? {
                            Event::Deliver(item) => {
                                if self.inbound.send(item).await.is_err() {
                                    return Ok(());
                                }
                            }
                            Event::Subscribed(channel) => {
                                out.clear();
                                let all = confirmations.confirmed(&channel, &self.wanted, &mut out);
                                if !out.is_empty() {
                                    write(&mut conn, &out).await?;
                                    confirm_by = Instant::now() + COMMAND_TIMEOUT * 4;
                                }
                                if all {
                                    tracing::info!(channels, "subscribed to Redis");
                                    self.up.store(true, Ordering::Relaxed);
                                    if self.inbound.send(Inbound::Reconnected).await.is_err() {
                                        return Ok(());
                                    }
                                }
                            }
                            Event::Pong => awaiting_pong = false,
                            Event::Other => {}
                        }
                    }
                }
                _ = ping.tick() => {
                    if awaiting_pong {
                        return Err(BusError("Redis did not answer a ping".into()));
                    }
                    if !confirmations.initial_done() && Instant::now() > confirm_by {
                        return Err(BusError("Redis did not confirm the subscriptions".into()));
                    }
                    resp::put_command(&mut out, &[b"PING"]);
                    write(&mut conn, &out).await?;
                    awaiting_pong = true;
                }
            }
            if out.capacity() > KEEP_BUFFER {
                out = BytesMut::new();
            }
        }
    }
}

/// Told once Redis has confirmed an attached channel's subscription.
type Attached = oneshot::Sender<Result<(), BusError>>;

/// The subscriptions one connection waits for Redis to confirm. Each channel a SUBSCRIBE
/// names gets one confirmation, in the order sent: per channel, who waits for each (`None`:
/// the initial subscription). The initial subscription goes a chunk at a time, the next once
/// the last is confirmed, so Redis never holds more than a chunk of confirmations for this
/// connection however many clients there are.
struct Confirmations {
    waiting: HashMap<String, VecDeque<Option<Attached>>>,
    /// The initial subscription's channels not sent yet.
    initial: std::vec::IntoIter<String>,
    /// Initial subscriptions not confirmed yet, sent or not.
    unconfirmed: usize,
    /// Of those, the ones sent in the last chunk.
    chunk_left: usize,
}

impl Confirmations {
    fn new(initial: Vec<String>) -> Self {
        Self {
            waiting: HashMap::new(),
            unconfirmed: initial.len(),
            initial: initial.into_iter(),
            chunk_left: 0,
        }
    }

    /// Whether every channel of the initial subscription is confirmed.
    fn initial_done(&self) -> bool {
        self.unconfirmed == 0
    }

    /// A SUBSCRIBE for `channel` went out; `done` hears its confirmation.
    fn attached(&mut self, channel: String, done: Attached) {
        self.waiting
            .entry(channel)
            .or_default()
            .push_back(Some(done));
    }

    /// Writes a SUBSCRIBE for the next chunk of the initial subscription into `out`; a client
    /// channel no longer `wanted` (detached meanwhile) is left out. Returns how many it named
    /// and how many it left out.
    fn next_chunk(&mut self, wanted: &HashSet<String>, out: &mut BytesMut) -> (usize, usize) {
        let mut chunk = Vec::with_capacity(SUBSCRIBE_CHUNK.min(self.initial.len()));
        let mut skipped = 0;
        while chunk.len() < SUBSCRIBE_CHUNK {
            let Some(channel) = self.initial.next() else {
                break;
            };
            if channel == ANNOUNCE_CHANNEL || wanted.contains(&channel) {
                chunk.push(channel);
            } else {
                skipped += 1;
            }
        }
        self.unconfirmed -= skipped;
        self.chunk_left = chunk.len();
        if !chunk.is_empty() {
            let mut args: Vec<&[u8]> = Vec::with_capacity(chunk.len() + 1);
            args.push(b"SUBSCRIBE");
            args.extend(chunk.iter().map(String::as_bytes));
            resp::put_command(out, &args);
        }
        for channel in chunk {
            self.waiting.entry(channel).or_default().push_back(None);
        }
        (self.chunk_left, skipped)
    }

    /// Redis confirmed `channel`: whoever waited for it hears so, and the last confirmation
    /// of a chunk writes the next chunk into `out`. True when that completed the initial
    /// subscription.
    fn confirmed(&mut self, channel: &[u8], wanted: &HashSet<String>, out: &mut BytesMut) -> bool {
        let Ok(channel) = std::str::from_utf8(channel) else {
            return false;
        };
        let Some(waiting) = self.waiting.get_mut(channel) else {
            return false;
        };
        let waiter = waiting.pop_front();
        if waiting.is_empty() {
            self.waiting.remove(channel);
        }
        match waiter {
            Some(Some(done)) => {
                let _ = done.send(Ok(()));
                false
            }
            Some(None) => {
                self.unconfirmed -= 1;
                self.chunk_left -= 1;
                if self.chunk_left == 0 && self.unconfirmed > 0 {
                    self.next_chunk(wanted, out);
                }
                self.unconfirmed == 0
            }
            None => false,
        }
    }
}

/// Writes within the command time-out.
async fn write(conn: &mut resp::Conn, data: &[u8]) -> Result<(), BusError> {
    tokio::time::timeout(COMMAND_TIMEOUT, conn.write(data))
        .await
        .map_err(|_| BusError("Redis did not take a command".into()))?
}

/// What a reply on the subscription connection means here.
fn event(instance: &str, reply: Reply) -> Result<Event, BusError> {
    let items = match reply {
        Reply::Array(Some(items)) => items,
        Reply::Status(status) if status.eq_ignore_ascii_case(b"pong") => return Ok(Event::Pong),
        Reply::Error(e) => {
            return Err(BusError(format!(
                "Redis refused a subscription command: {e}"
            )));
        }
        _ => return Ok(Event::Other),
    };
    let mut items = items.into_iter();
    let (Some(kind), Some(channel)) = (items.next(), items.next()) else {
        return Ok(Event::Other);
    };
    let (Some(kind), Some(channel)) = (kind.bytes(), channel.bytes()) else {
        return Ok(Event::Other);
    };
    Ok(match kind.as_ref() {
        b"message" => match items.next().as_ref().and_then(Reply::bytes) {
            Some(payload) => {
                inbound_of(instance, channel, payload).map_or(Event::Other, Event::Deliver)
            }
            None => Event::Other,
        },
        b"subscribe" => Event::Subscribed(channel.clone()),
        b"pong" => Event::Pong,
        _ => Event::Other,
    })
}

/// What a pub/sub message means here; `None` for our own announcements and malformed ones.
fn inbound_of(instance: &str, channel: &[u8], payload: &Bytes) -> Option<Inbound> {
    if channel == ANNOUNCE_CHANNEL.as_bytes() {
        let (origin, announcement) = decode_announcement(payload)?;
        return (origin != instance).then_some(Inbound::Announced(announcement));
    }
    let to = channel
        .strip_prefix(PREFIX.as_bytes())?
        .strip_prefix(b"c:")?;
    // Copied out: a frame left waiting in a slow client's queue holds only its own bytes,
    // never the read buffer it came in.
    Some(Inbound::Frame {
        to: std::str::from_utf8(to).ok()?.to_string(),
        data: Bytes::copy_from_slice(payload),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_never_published_answers_with_an_error_and_itself() {
        let (tx, rx) = std::sync::mpsc::channel();
        let publish = Publish {
            channel: "c".into(),
            frame: Sending::new(
                Bytes::from_static(b"frame"),
                Box::new(move |answer, data| {
                    tx.send((answer.is_err(), data)).unwrap();
                }),
            ),
        };
        drop(publish);
        assert_eq!(rx.try_recv().unwrap(), (true, Bytes::from_static(b"frame")));
        assert!(rx.try_recv().is_err(), "once");
    }

    #[test]
    fn initial_subscriptions_go_in_chunks_without_what_was_detached() {
        let mut wanted: HashSet<String> = (0..1200).map(|i| format!("c{i}")).collect();
        let mut all: Vec<String> = wanted.iter().cloned().collect();
        all.push(ANNOUNCE_CHANNEL.to_string());
        let total = all.len();
        let mut confirmations = Confirmations::new(all);
        let mut out = BytesMut::new();
        let (first, skipped) = confirmations.next_chunk(&wanted, &mut out);
        assert_eq!((first, skipped), (SUBSCRIBE_CHUNK, 0));
        assert!(
            out.starts_with(format!("*{}\r\n$9\r\nSUBSCRIBE\r\n", SUBSCRIBE_CHUNK + 1).as_bytes())
        );
        // Detached meanwhile: left out of the later chunks and not waited for.
        let later: Vec<String> = confirmations.initial.as_slice().to_vec();
        for gone in &later[..100] {
            wanted.remove(gone);
        }
        let (mut named, mut left_out) = (first, 0);
        loop {
            out.clear();
            let (n, s) = confirmations.next_chunk(&wanted, &mut out);
            if n == 0 && s == 0 {
                break;
            }
            assert!(n <= SUBSCRIBE_CHUNK);
            named += n;
            left_out += s;
        }
        assert_eq!((named, left_out), (total - 100, 100));
        let confirming = &confirmations.waiting;
        assert_eq!(confirming.len(), total - 100);
        assert!(confirming.contains_key(ANNOUNCE_CHANNEL));
        assert!(later[..100].iter().all(|c| !confirming.contains_key(c)));
    }

    #[test]
    fn subscription_replies_mean_what_they_say() {
        let bulk = |b: &'static [u8]| Reply::Bulk(Some(Bytes::from_static(b)));
        let message = |channel: &'static [u8], payload: &'static [u8]| {
            Reply::Array(Some(vec![bulk(b"message"), bulk(channel), bulk(payload)]))
        };
        match event("i1", message(b"hypha-rtc:c:ws1/alice", b"\x80")) {
            Ok(Event::Deliver(Inbound::Frame { to, data })) => {
                assert_eq!(to, "ws1/alice");
                assert_eq!(&data[..], b"\x80");
            }
            _ => panic!("a frame for a client"),
        }
        let own = encode_announcement(
            "i1",
            &Announcement::Kick {
                addr: "ws1/a".into(),
                keep: "i1".into(),
            },
        );
        let own: &'static [u8] = Box::leak(own.into_boxed_slice());
        assert!(matches!(
            event("i1", message(ANNOUNCE_CHANNEL.as_bytes(), own)),
            Ok(Event::Other)
        ));
        assert!(matches!(
            event("i2", message(ANNOUNCE_CHANNEL.as_bytes(), own)),
            Ok(Event::Deliver(Inbound::Announced(
                Announcement::Kick { .. }
            )))
        ));
        assert!(matches!(
            event("i1", message(b"elsewhere", b"x")),
            Ok(Event::Other)
        ));
        let confirmed = Reply::Array(Some(vec![
            bulk(b"subscribe"),
            bulk(b"ch"),
            Reply::Integer(1),
        ]));
        assert!(matches!(event("i1", confirmed), Ok(Event::Subscribed(c)) if &c[..] == b"ch"));
        let pong = Reply::Array(Some(vec![bulk(b"pong"), bulk(b"")]));
        assert!(matches!(event("i1", pong), Ok(Event::Pong)));
        assert!(event("i1", Reply::Error("NOPERM no".into())).is_err());
    }
}
