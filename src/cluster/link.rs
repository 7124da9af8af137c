//! A direct link between two instances: frames for a client on another instance go straight
//! to it over TCP instead of through Redis, and the receiving instance answers, frame by
//! frame, whether it holds that client. One link per pair and direction: the dialer sends
//! frames, the listener answers each with one byte, in order.
//!
//! Both ends prove they know the key derived from the shared `--jwt-secret` (HMAC-SHA256 over
//! both sides' random nonces and ids; the dialer first, so that a stranger learns nothing to
//! guess the secret from) before any frame is taken; the frames themselves travel in the
//! clear, as they do through Redis, so the link belongs on the instances' private network. An
//! idle link is pinged every 10 s; a listener closes one silent for a minute.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::bus::{BusError, Delivered, FRAME_HEADROOM, KEEP_BUFFER, Sending};

/// What a link's first bytes say: the protocol and its version.
const MAGIC: &[u8; 5] = b"HRTL1";
/// How long dialing, or either side of the handshake, may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a link may stall (a frame unanswered, a write not taken) before it counts as
/// broken: well beyond what one slow client at the far end may hold up its delivery lane
/// (`--slow-consumer-timeout`, 5 s by default).
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Links a listener serves at once, once proven.
const MAX_LINKS: usize = 256;
/// Connections a listener greets at once, not yet proven: strangers cannot take the proven
/// links' room.
const MAX_GREETINGS: usize = 32;
/// A link the dialer leaves idle this long is pinged (a one-byte answer).
const PING_EVERY: Duration = Duration::from_secs(10);
/// A listener closes a link that brought nothing (not even a ping) for this long.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// Frames waiting for a link's writer; a sender waits for room beyond this.
const LINK_QUEUE: usize = 4096;
/// Frames written as one batch.
const BATCH: usize = 256;
/// Turns the writer lets the ready senders take before a write, while each brings frames: under
/// load, fewer and fuller writes (and answers); when idle, one turn and no wait.
const GATHER_TURNS: usize = 4;
/// Frames sent and not yet answered; the writer waits for answers beyond this.
const MAX_UNANSWERED: usize = 16_384;
/// The longest address a frame may be for.
const MAX_ADDRESS: usize = 1024;

/// The key both ends of a link prove they hold; never printed.
#[derive(Clone)]
pub(crate) struct LinkKey([u8; 32]);

impl std::fmt::Debug for LinkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkKey(***)")
    }
}

impl LinkKey {
    /// Derives the link key from the secret every instance shares (`--jwt-secret`), so that
    /// the key itself is never the token secret.
    pub(crate) fn derive(secret: &[u8]) -> Self {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"hypha-rtc instance link v1");
        Self(mac.finalize().into_bytes().into())
    }

    /// The proof of one side (`role`) for this handshake.
    fn proof(&self, role: &[u8], nonces: &Nonces, dialer: &str, listener: &str) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(role);
        mac.update(&nonces.dialer);
        mac.update(&nonces.listener);
        for id in [dialer, listener] {
            mac.update(&[id.len() as u8]);
            mac.update(id.as_bytes());
        }
        mac
    }
}

struct Nonces {
    dialer: [u8; 32],
    listener: [u8; 32],
}

fn broken(what: impl std::fmt::Display) -> BusError {
    BusError(format!("instance link: {what}"))
}

async fn timed<T>(
    what: &str,
    work: impl Future<Output = std::io::Result<T>>,
) -> Result<T, BusError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| broken(format!("no answer while {what}")))?
        .map_err(|e| broken(format!("{what}: {e}")))
}

/// Reads an id: a length byte and that many bytes of text.
async fn read_id(io: &mut (impl AsyncRead + Unpin)) -> Result<String, BusError> {
    let len = timed("reading the peer's id", io.read_u8()).await? as usize;
    let mut id = vec![0; len];
    timed("reading the peer's id", io.read_exact(&mut id)).await?;
    String::from_utf8(id).map_err(|_| broken("the peer's id is not text"))
}

fn put_id(out: &mut BytesMut, id: &str) -> Result<(), BusError> {
    let len = u8::try_from(id.len()).map_err(|_| broken("an instance id is too long"))?;
    out.put_u8(len);
    out.put_slice(id.as_bytes());
    Ok(())
}

/// The dialer's half of the handshake: the dialer proves itself first (so that nobody who
/// merely reaches the port gets a proof to guess the secret from), then checks the listener's
/// proof, which must come from `peer`.
async fn handshake_dialer(
    io: &mut (impl AsyncRead + AsyncWrite + Unpin),
    me: &str,
    peer: &str,
    key: &LinkKey,
) -> Result<(), BusError> {
    let dialer_nonce: [u8; 32] = rand::random();
    let mut hello = BytesMut::new();
    hello.put_slice(MAGIC);
    put_id(&mut hello, me)?;
    hello.put_slice(&dialer_nonce);
    timed("greeting the peer", io.write_all(&hello)).await?;
    let mut magic = [0; MAGIC.len()];
    timed("reading the peer's greeting", io.read_exact(&mut magic)).await?;
    if &magic != MAGIC {
        return Err(broken("the peer does not speak the instance link protocol"));
    }
    let listener = read_id(io).await?;
    if listener != peer {
        return Err(broken(format!(
            "expected instance {peer:?}, reached {listener:?}"
        )));
    }
    let mut nonce = [0; 32];
    timed("reading the peer's greeting", io.read_exact(&mut nonce)).await?;
    let nonces = Nonces {
        dialer: dialer_nonce,
        listener: nonce,
    };
    let ours = key
        .proof(b"dialer", &nonces, me, peer)
        .finalize()
        .into_bytes();
    timed("proving this instance", io.write_all(&ours)).await?;
    let mut proof = [0; 32];
    timed("reading the peer's proof", io.read_exact(&mut proof))
        .await
        .map_err(|_| broken(format!("instance {peer:?} refused this instance")))?;
    key.proof(b"listener", &nonces, me, peer)
        .verify_slice(&proof)
        .map_err(|_| {
            broken(format!(
                "instance {peer:?} does not share this instance's secret"
            ))
        })
}

/// The listener's half: returns the dialer's id once it proved itself, and only then proves
/// this instance.
async fn handshake_listener(
    io: &mut (impl AsyncRead + AsyncWrite + Unpin),
    me: &str,
    key: &LinkKey,
) -> Result<String, BusError> {
    let mut magic = [0; MAGIC.len()];
    timed("reading a greeting", io.read_exact(&mut magic)).await?;
    if &magic != MAGIC {
        return Err(broken(
            "a connection that does not speak the instance link protocol",
        ));
    }
    let dialer = read_id(io).await?;
    let mut dialer_nonce = [0; 32];
    timed("reading a greeting", io.read_exact(&mut dialer_nonce)).await?;
    let nonces = Nonces {
        dialer: dialer_nonce,
        listener: rand::random(),
    };
    let mut reply = BytesMut::new();
    reply.put_slice(MAGIC);
    put_id(&mut reply, me)?;
    reply.put_slice(&nonces.listener);
    timed("answering a greeting", io.write_all(&reply)).await?;
    let mut proof = [0; 32];
    timed("reading the dialer's proof", io.read_exact(&mut proof)).await?;
    key.proof(b"dialer", &nonces, &dialer, me)
        .verify_slice(&proof)
        .map_err(|_| broken(format!("{dialer:?} does not share this instance's secret")))?;
    let ours = key
        .proof(b"listener", &nonces, &dialer, me)
        .finalize()
        .into_bytes();
    timed("proving this instance", io.write_all(&ours)).await?;
    Ok(dialer)
}

/// Appends one frame as the link carries it: its length, its address's length, the address
/// and the frame.
fn put_frame(out: &mut BytesMut, to: &str, data: &[u8]) {
    out.put_u32((2 + to.len() + data.len()) as u32);
    out.put_u16(to.len() as u16);
    out.put_slice(to.as_bytes());
    out.put_slice(data);
}

/// A ping: a frame for no address, and nothing in it.
const PING: [u8; 6] = [0, 0, 0, 2, 0, 0];

/// Takes one whole frame off the front of `buf`: `Ok(None)` until it has all arrived. Its
/// address goes into `to` (reused from frame to frame; checked to be text, empty for a ping),
/// and its bytes are copied out on their own: a frame left waiting in a slow client's queue
/// holds only itself, never the read buffer it came in, and is nobody else's to share.
fn take_frame(buf: &mut BytesMut, max: usize, to: &mut String) -> Result<Option<Bytes>, BusError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len < 2 || len > max {
        return Err(broken(format!("a frame of {len} bytes")));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    let to_len = u16::from_be_bytes([buf[4], buf[5]]) as usize;
    to.clear();
    if to_len == 0 && len == 2 {
        buf.advance(6);
        return Ok(Some(Bytes::new()));
    }
    if to_len == 0 || to_len > MAX_ADDRESS || to_len > len - 2 {
        return Err(broken(format!("a frame for an address of {to_len} bytes")));
    }
    buf.advance(6);
    let Ok(address) = std::str::from_utf8(&buf[..to_len]) else {
        return Err(broken("a frame for an address that is not text"));
    };
    to.push_str(address);
    let data = Bytes::copy_from_slice(&buf[to_len..len - 2]);
    buf.advance(len - 2);
    Ok(Some(data))
}

/// The largest frame a link carries for clients whose frames are at most `max_frame` bytes.
fn frame_limit(max_frame: usize) -> usize {
    max_frame
        .saturating_add(FRAME_HEADROOM)
        .min(u32::MAX as usize)
}

/// Where a link's frames go on this instance.
pub(crate) trait Receiver: Send + Sync + 'static {
    /// Delivers a frame for `to`, in order, if its client is connected here: whether it was
    /// (the sender is told), or `None` once this instance stops taking frames.
    fn deliver(&self, to: &str, data: Bytes) -> impl Future<Output = Option<bool>> + Send;
}

/// This instance's end for its peers' links: bound at start-up (so a taken port fails the
/// start), served once the instance can deliver.
pub(crate) struct LinkListener {
    listener: TcpListener,
    instance: String,
    key: LinkKey,
    max_frame: usize,
}

impl LinkListener {
    /// Binds `address` (port 0: any free port).
    pub(crate) async fn bind(
        address: &str,
        instance: String,
        key: LinkKey,
        max_frame: usize,
    ) -> Result<Self, BusError> {
        let listener = TcpListener::bind(address).await.map_err(|e| {
            BusError(format!(
                "cannot listen for instance links on {address}: {e}"
            ))
        })?;
        Ok(Self {
            listener,
            instance,
            key,
            max_frame,
        })
    }

    /// The port it listens on.
    pub(crate) fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Takes links until `stop`: each frame whose client is here goes to `receiver`, and its
    /// sender is told whether it was.
    pub(crate) async fn serve<R: Receiver>(self, receiver: Arc<R>, stop: CancellationToken) {
        let slots = Arc::new(Semaphore::new(MAX_LINKS));
        let greetings = Arc::new(Semaphore::new(MAX_GREETINGS));
        let me: Arc<str> = self.instance.into();
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept an instance link");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(greeting) = greetings.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "too many unproven connections to the instance link: refused one");
                continue;
            };
            let link = Served {
                me: me.clone(),
                key: self.key.clone(),
                max: frame_limit(self.max_frame),
                receiver: receiver.clone(),
                greeting: Some(greeting),
                slots: slots.clone(),
            };
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    served = link.run(stream) => if let Err(e) = served {
                        tracing::warn!(%peer, error = %e, "an instance link ended");
                    },
                }
            });
        }
    }
}

/// One link as its listener serves it.
struct Served<R> {
    me: Arc<str>,
    key: LinkKey,
    max: usize,
    receiver: Arc<R>,
    /// Held while the dialer has not proven itself.
    greeting: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Room for proven links.
    slots: Arc<Semaphore>,
}

impl<R: Receiver> Served<R> {
    async fn run(mut self, mut stream: TcpStream) -> Result<(), BusError> {
        let _ = stream.set_nodelay(true);
        // The whole handshake within the limit: a stranger holds a slot for no longer.
        let greeted = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake_listener(&mut stream, &self.me, &self.key),
        )
        .await
        .unwrap_or_else(|_| Err(broken("a greeting that took too long")));
        let dialer = match greeted {
            Ok(dialer) => dialer,
            Err(e) => {
                // Anyone may knock: not worth a warning each (the dialing instance warns).
                tracing::debug!(error = %e, "refused a connection to the instance link");
                return Ok(());
            }
        };
        self.greeting = None;
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            return Err(broken(format!("too many links: refused {dialer:?}'s")));
        };
        tracing::debug!(instance = %dialer, "an instance linked to this one");
        let (mut rd, mut wr) = stream.into_split();
        let mut buf = BytesMut::with_capacity(64 << 10);
        let mut answers = Vec::with_capacity(BATCH);
        let mut to = String::with_capacity(64);
        loop {
            let read = tokio::time::timeout(IDLE_LIMIT, rd.read_buf(&mut buf))
                .await
                .map_err(|_| broken(format!("nothing from {dialer:?} for a minute")))?
                .map_err(|e| broken(format!("reading frames: {e}")))?;
            if read == 0 {
                return Ok(());
            }
            while let Some(data) = take_frame(&mut buf, self.max, &mut to)? {
                // A ping: answered, delivered nowhere.
                if to.is_empty() {
                    answers.push(1);
                    continue;
                }
                let Some(here) = self.receiver.deliver(&to, data).await else {
                    return Ok(());
                };
                answers.push(u8::from(here));
            }
            // One write answers everything this read brought.
            if !answers.is_empty() {
                tokio::time::timeout(ANSWER_TIMEOUT, wr.write_all(&answers))
                    .await
                    .map_err(|_| broken("the dialer does not read its answers"))?
                    .map_err(|e| broken(format!("answering frames: {e}")))?;
                answers.clear();
            }
            if buf.capacity() > KEEP_BUFFER && buf.is_empty() {
                buf = BytesMut::with_capacity(64 << 10);
            }
        }
    }
}

/// A frame for a link's writer: its client, and whom to tell what became of it (`Ok(true)`:
/// its client is on the other instance; `Ok(false)`: it is not), with the frame back for a
/// second try elsewhere.
pub(crate) struct Outgoing {
    to: Arc<str>,
    frame: Sending,
}

impl Outgoing {
    /// The frame `data` for the client `to`; `then` hears what became of it.
    pub(crate) fn new(to: Arc<str>, data: Bytes, then: Delivered) -> Self {
        Self {
            to,
            frame: Sending::new(data, then)
                .dropped_as("instance link: the frame was dropped on its way"),
        }
    }

    /// The frame, once it is written, waiting for its answer.
    fn written(self, sent: Instant) -> Unanswered {
        Unanswered {
            frame: self.frame,
            sent,
        }
    }
}

/// A frame written and not yet answered.
struct Unanswered {
    frame: Sending,
    sent: Instant,
}

/// This instance's link to one other instance, for frames that way.
pub(crate) struct Link {
    queue: mpsc::Sender<Outgoing>,
    closing: Arc<Closing>,
}

/// Whether a link is closing: the token its tasks wait on, and a flag that every frame reads
/// without the token's lock.
struct Closing {
    token: CancellationToken,
    down: AtomicBool,
}

impl Closing {
    fn close(&self) {
        self.down.store(true, Ordering::Release);
        self.token.cancel();
    }

    fn is_closed(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
}

impl Link {
    /// Dials `peer` at `address`, proves this instance and starts the link's tasks.
    pub(crate) async fn dial(
        address: &str,
        me: &str,
        peer: &str,
        key: &LinkKey,
        max_frame: usize,
    ) -> Result<Arc<Self>, BusError> {
        let mut stream = timed("dialing", TcpStream::connect(address)).await?;
        let _ = stream.set_nodelay(true);
        tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake_dialer(&mut stream, me, peer, key),
        )
        .await
        .map_err(|_| broken(format!("instance {peer:?} took too long to greet")))??;
        let (queue, frames) = mpsc::channel(LINK_QUEUE);
        let closing = Arc::new(Closing {
            token: CancellationToken::new(),
            down: AtomicBool::new(false),
        });
        let unanswered = Arc::new(Pending {
            frames: Mutex::new(VecDeque::new()),
            room: Notify::new(),
        });
        let (rd, wr) = stream.into_split();
        let limit = frame_limit(max_frame);
        tokio::spawn(write_frames(
            wr,
            frames,
            unanswered.clone(),
            closing.clone(),
            limit,
        ));
        tokio::spawn(read_answers(rd, unanswered, closing.clone()));
        Ok(Arc::new(Self { queue, closing }))
    }

    /// Whether the link can no longer carry frames.
    pub(crate) fn is_closed(&self) -> bool {
        self.closing.is_closed()
    }

    /// Room for one frame in the link's queue (frames keep their order); `None` once the link
    /// is closed. Cancelling the wait takes nothing.
    pub(crate) async fn reserve(&self) -> Option<mpsc::Permit<'_, Outgoing>> {
        self.queue.reserve().await.ok()
    }

    /// Room for one frame in the link's queue if there is some now.
    pub(crate) fn try_reserve(&self) -> Option<mpsc::Permit<'_, Outgoing>> {
        self.queue.try_reserve().ok()
    }

    /// Closes the link; what it still holds is answered with an error.
    pub(crate) fn close(&self) {
        self.closing.close();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.closing.close();
    }
}

/// The frames a link wrote and awaits answers for, oldest first.
struct Pending {
    frames: Mutex<VecDeque<Unanswered>>,
    /// Rung when answers make room.
    room: Notify,
}

impl Pending {
    fn len(&self) -> usize {
        self.frames.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Answers everything still waiting with `error`.
    fn fail(&self, error: &BusError) {
        let left: Vec<Unanswered> = self
            .frames
            .lock()
            .map(|mut f| f.drain(..).collect())
            .unwrap_or_default();
        for left in left {
            left.frame.tell(Err(error.clone()));
        }
    }
}

/// Writes queued frames in batches until the link closes; then answers whatever is left.
async fn write_frames(
    mut wr: tokio::net::tcp::OwnedWriteHalf,
    mut frames: mpsc::Receiver<Outgoing>,
    pending: Arc<Pending>,
    closing: Arc<Closing>,
    limit: usize,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut refused = Vec::new();
    let mut out = BytesMut::new();
    let error = loop {
        let taken = tokio::select! {
            _ = closing.token.cancelled() => break broken("closed"),
            taken = frames.recv_many(&mut batch, BATCH) => taken,
            // Idle: a ping keeps the listener's side open and tells this side the peer lives.
            _ = tokio::time::sleep(PING_EVERY) => {
                if let Ok(mut waiting) = pending.frames.lock() {
                    waiting.push_back(Unanswered {
                        frame: Sending::new(Bytes::new(), Box::new(|_, _| {})),
                        sent: Instant::now(),
                    });
                }
                match tokio::time::timeout(ANSWER_TIMEOUT, wr.write_all(&PING)).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => break broken(format!("writing a ping: {e}")),
                    Err(_) => break broken("the peer does not read its frames"),
                }
            }
        };
        if taken == 0 {
            break broken("closed");
        }
        // The senders that are ready run first: their frames join this write, for as long as
        // each turn brings more (a bounded number of turns).
        for _ in 0..GATHER_TURNS {
            if batch.len() >= BATCH {
                break;
            }
            tokio::task::yield_now().await;
            let before = batch.len();
            while batch.len() < BATCH {
                match frames.try_recv() {
                    Ok(frame) => batch.push(frame),
                    Err(_) => break,
                }
            }
            if batch.len() == before {
                break;
            }
        }
        // Room for the batch's answers first: a peer that stops answering holds the senders.
        while pending.len() >= MAX_UNANSWERED {
            let room = pending.room.notified();
            tokio::select! {
                _ = closing.token.cancelled() => break,
                _ = room => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        if closing.is_closed() {
            break broken("closed");
        }
        out.clear();
        let now = Instant::now();
        if let Ok(mut waiting) = pending.frames.lock() {
            for frame in batch.drain(..) {
                if frame.to.len() > MAX_ADDRESS
                    || frame.to.is_empty()
                    || 2 + frame.to.len() + frame.frame.data().len() > limit
                {
                    // Nothing a client sends is this large; refused here rather than at the
                    // peer (answered below, outside the lock).
                    refused.push(frame);
                    continue;
                }
                put_frame(&mut out, &frame.to, frame.frame.data());
                waiting.push_back(frame.written(now));
            }
        }
        for frame in refused.drain(..) {
            frame
                .frame
                .tell(Err(broken("a frame too large for the link")));
        }
        match tokio::time::timeout(ANSWER_TIMEOUT, wr.write_all(&out)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break broken(format!("writing frames: {e}")),
            Err(_) => break broken("the peer does not read its frames"),
        }
        if out.capacity() > KEEP_BUFFER {
            out = BytesMut::new();
        }
    };
    closing.close();
    pending.fail(&error);
    frames.close();
    // Taken for a batch that was not written: answered too.
    for frame in batch.drain(..) {
        frame.frame.tell(Err(error.clone()));
    }
    // Still queued, or about to be by a sender holding room (a permit is held only between
    // taking it and sending, never across a wait): answered too. The queue ends once no
    // permit is out.
    while let Some(frame) = frames.recv().await {
        frame.frame.tell(Err(error.clone()));
    }
}

/// Reads the peer's answers, one byte per frame in the order written, until the link closes
/// or an answer is overdue.
async fn read_answers(
    mut rd: tokio::net::tcp::OwnedReadHalf,
    pending: Arc<Pending>,
    closing: Arc<Closing>,
) {
    let mut buf = [0u8; 4096];
    // The frames a read answers, taken off the list at once (kept between reads).
    let mut answered: Vec<Unanswered> = Vec::with_capacity(BATCH);
    let mut check = tokio::time::interval(Duration::from_secs(1));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let error = loop {
        let read = tokio::select! {
            _ = closing.token.cancelled() => break broken("closed"),
            read = rd.read(&mut buf) => read,
            _ = check.tick() => {
                let overdue = pending
                    .frames
                    .lock()
                    .map(|f| f.front().is_some_and(|u| u.sent.elapsed() > ANSWER_TIMEOUT))
                    .unwrap_or(true);
                if overdue {
                    break broken("the peer stopped answering");
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) => break broken("the peer closed the link"),
            Ok(n) => n,
            Err(e) => break broken(format!("reading answers: {e}")),
        };
        let taken = pending.frames.lock().is_ok_and(|mut f| {
            if f.len() < n {
                return false;
            }
            answered.extend(f.drain(..n));
            true
        });
        if !taken {
            break broken("the peer answered frames never sent");
        }
        pending.room.notify_waiters();
        let mut bad = false;
        for (frame, answer) in answered.drain(..).zip(buf[..n].iter().copied()) {
            let result = match answer {
                0 => Ok(false),
                1 => Ok(true),
                _ => {
                    bad = true;
                    Err(broken("the peer answered something unknown"))
                }
            };
            frame.frame.tell(result);
        }
        if bad {
            break broken("the peer answered something unknown");
        }
    };
    closing.close();
    pending.room.notify_waiters();
    pending.fail(&error);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_the_wire_and_bad_ones_are_refused() {
        let mut buf = BytesMut::new();
        put_frame(&mut buf, "ws1/alice", b"\x81\xa1a\x01");
        put_frame(&mut buf, "ws1/bob", b"");
        let whole = buf.clone();
        // Any prefix waits for the rest.
        let mut to = String::new();
        for cut in 0..whole.len().min(18) {
            let mut part = BytesMut::from(&whole[..cut]);
            assert!(
                take_frame(&mut part, 100, &mut to).unwrap().is_none(),
                "cut at {cut}"
            );
        }
        let data = take_frame(&mut buf, 100, &mut to).unwrap().unwrap();
        assert_eq!(
            (to.as_str(), &data[..]),
            ("ws1/alice", &b"\x81\xa1a\x01"[..])
        );
        let data = take_frame(&mut buf, 100, &mut to).unwrap().unwrap();
        assert_eq!((to.as_str(), data.len()), ("ws1/bob", 0));
        assert!(buf.is_empty());
        let mut ping = BytesMut::from(&PING[..]);
        let data = take_frame(&mut ping, 100, &mut to).unwrap().unwrap();
        assert_eq!((to.as_str(), data.len()), ("", 0), "a ping");
        let refused = |bytes: &[u8], max: usize| {
            take_frame(&mut BytesMut::from(bytes), max, &mut String::new()).is_err()
        };
        let cases: [(&[u8], &str); 5] = [
            (b"\x00\x00\x01\x00", "longer than the limit"),
            (b"\x00\x00\x00\x01", "shorter than an address length"),
            (b"\x00\x00\x00\x04\x00\x00ab", "an empty address"),
            (b"\x00\x00\x00\x04\x00\x03ab", "an address past the frame"),
            (b"\x00\x00\x00\x04\x00\x02\xff\xfe", "an address not text"),
        ];
        for (bytes, what) in cases {
            assert!(refused(bytes, 100), "{what}");
        }
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (dialed.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn only_instances_that_share_the_secret_link() {
        let key = LinkKey::derive(b"shared");
        let (mut a, mut b) = pair().await;
        let (dialed, listened) = tokio::join!(
            handshake_dialer(&mut a, "i1", "i2", &key),
            handshake_listener(&mut b, "i2", &key)
        );
        dialed.unwrap();
        assert_eq!(listened.unwrap(), "i1");

        // Another secret: the listener refuses the dialer's proof and never proves itself, so
        // a stranger who dials gets nothing to guess the secret from.
        let other = LinkKey::derive(b"guessed");
        let (mut a, mut b) = pair().await;
        let (dialed, listened) = tokio::join!(
            handshake_dialer(&mut a, "i1", "i2", &other),
            handshake_listener(&mut b, "i2", &key)
        );
        assert!(dialed.unwrap_err().0.contains("refused this instance"));
        assert!(listened.unwrap_err().0.contains("does not share"));

        // The right secret at the wrong instance: the dialer notices.
        let (mut a, mut b) = pair().await;
        let (dialed, _) = tokio::join!(
            handshake_dialer(&mut a, "i1", "i3", &key),
            handshake_listener(&mut b, "i2", &key)
        );
        assert!(dialed.unwrap_err().0.contains("expected instance"));

        // A dialer that replays an old proof is refused: the listener's nonce is new each time.
        let (mut a, mut b) = pair().await;
        let listening = tokio::spawn(async move { handshake_listener(&mut b, "i2", &key).await });
        let mut hello = BytesMut::new();
        hello.put_slice(MAGIC);
        put_id(&mut hello, "i1").unwrap();
        hello.put_slice(&[7; 32]);
        a.write_all(&hello).await.unwrap();
        let mut greeting = vec![0; MAGIC.len() + 1 + 2 + 32];
        a.read_exact(&mut greeting).await.unwrap();
        a.write_all(&[0; 32]).await.unwrap();
        assert!(
            listening
                .await
                .unwrap()
                .unwrap_err()
                .0
                .contains("does not share")
        );

        // Something else altogether is refused at once.
        let (mut a, mut b) = pair().await;
        a.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(
            handshake_listener(&mut b, "i2", &LinkKey::derive(b"shared"))
                .await
                .is_err()
        );
    }

    #[test]
    fn a_frame_dropped_unwritten_answers_with_an_error_and_itself() {
        let (tx, rx) = std::sync::mpsc::channel();
        let answered: Delivered = Box::new(move |answer, data| {
            tx.send((answer.is_err(), data)).unwrap();
        });
        drop(Outgoing::new(
            "ws/x".into(),
            Bytes::from_static(b"frame"),
            answered,
        ));
        assert_eq!(rx.try_recv().unwrap(), (true, Bytes::from_static(b"frame")));
        assert!(rx.try_recv().is_err(), "once");
        // Written, it waits for the reader's answer: being written tells nothing.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let answered: Delivered = Box::new(move |_, _| {
            let _ = tx.send(());
        });
        let unanswered = Outgoing::new("ws/x".into(), Bytes::from_static(b"frame"), answered)
            .written(Instant::now());
        assert!(rx.try_recv().is_err());
        assert_eq!(*unanswered.frame.data(), Bytes::from_static(b"frame"));
    }

    #[test]
    fn the_key_never_prints() {
        let key = LinkKey::derive(b"top secret");
        assert_eq!(format!("{key:?}"), "LinkKey(***)");
    }
}
