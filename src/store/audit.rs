//! The credential audit's writer. A request for ICE servers queues its row and answers at
//! once; one task, woken by a first row, lets the queue fill for 20 ms and then writes what
//! it holds in multi-row `INSERT`s of up to 512 rows, so under load a commit carries hundreds
//! of rows, the writer wakes once per batch rather than once per row, and no request waits
//! for the database. A batch that cannot be written is kept and tried again (the rows are not
//! dropped), the store reports itself failing meanwhile, and with `--audit-required` no more
//! credentials are handed out until it recovers. The audit's readers flush the queue first,
//! so a page reading the table sees every row. A stopping server closes the queue (no row
//! after that is taken), gives the store a last few seconds, and keeps what it would not
//! take in a file the next start writes (see `spill`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use sqlx::AnyPool;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;

use super::{IceIssuance, StoreError, spill};

/// Rows queued for the writer; a full queue refuses (or, with the audit optional, drops and
/// logs) rather than making requests wait.
const QUEUE: usize = 16_384;
/// Rows written per statement (one statement is one transaction: a batch the store refuses
/// is retried whole; one whose answer never came, cut off by [`WRITE_LIMIT`] or a lost
/// connection, may have been written all the same, and is then written twice: an audit row
/// too many, never one too few).
const BATCH: usize = 512;
/// How long the writer waits for more rows before writing what it has.
const LINGER: Duration = Duration::from_millis(20);
/// The longest a batch's statement may take before it counts as failed (a store that hangs
/// is a failing store: `--audit-required` then stops handing out credentials).
const WRITE_LIMIT: Duration = Duration::from_secs(10);
/// Rows the writer takes from the queue and holds at most, not yet written (while the store
/// refuses them, say); beyond this it stops taking rows from the queue, which then fills.
/// Rows of earlier runs' files come on top: half as many at most per claim (or one file,
/// [`spill::ROWS_PER_FILE`], whichever is more).
pub(super) const MAX_PENDING: usize = 65_536;
/// The longest pause between attempts at a batch the store refused.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long keeping the rows the store did not take in files may take, after the stop's
/// deadline for the store.
const KEEP_LIMIT: Duration = Duration::from_secs(10);

/// What the writer is asked to do, in order.
enum Item {
    Row(IceIssuance),
    /// Answer, once every row queued before this one is written, whether all were.
    Flush(oneshot::Sender<bool>),
    /// Write the rows earlier runs kept in this directory (see `spill`) before new ones, and
    /// keep rows there at the stop.
    Recover(PathBuf),
}

/// How the audit's last writes went at a stop.
#[derive(Debug, PartialEq)]
pub(crate) enum Closed {
    /// Every row is in the store.
    Written,
    /// The store did not take these rows in time; they are in these files, for the next
    /// start.
    Kept { rows: usize, files: Vec<PathBuf> },
    /// Rows that could not be kept either, and why (rows taken from earlier runs' files stay
    /// in those files, and are not counted).
    Lost { rows: usize, why: String },
    /// The writer did not answer in time (its rows are lost if it held any).
    Unconfirmed,
}

/// How the store's last writes went, for `/health/readiness` and the audit's admission, and
/// what the writer has done, for `/metrics`.
#[derive(Default)]
pub(crate) struct Health {
    failing: AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
    /// Rows taken from the queue (or from earlier runs' files) and not yet written.
    held: AtomicUsize,
    /// Rows written to the store.
    pub(crate) written: Counter,
    /// Rows that could not be queued (the store failing under `--audit-required`, a full
    /// queue, a stopped writer).
    pub(crate) unrecorded: Counter,
}

impl Health {
    pub(crate) fn record<T, E: std::fmt::Display>(&self, outcome: &Result<T, E>) {
        match outcome {
            Ok(_) => self.failing.store(false, Ordering::Relaxed),
            Err(e) => {
                self.failing.store(true, Ordering::Relaxed);
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(e.to_string());
                }
            }
        }
    }

    /// Whether the last write failed.
    pub(crate) fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// The last write error, once there was one.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// The stop, asked outside the queue (which may be full, with a writer that takes nothing
/// while it holds all it may): when the writer gives up on the store, and whom it tells.
struct Stop {
    /// Set by [`Audit::close`] first: rows are refused from then on (one load per row; the
    /// writer closes the queue soon after, and drains what came before).
    asked: AtomicBool,
    /// Set once by [`Audit::close`]; wakes the writer wherever it waits.
    deadline: watch::Sender<Option<Instant>>,
    /// Where to keep what is left, and whom to tell how it went.
    request: std::sync::Mutex<Option<(Option<PathBuf>, oneshot::Sender<Closed>)>>,
}

/// The queue in front of the writer task.
#[derive(Clone)]
pub(crate) struct Audit {
    queue: mpsc::Sender<Item>,
    /// Cuts the writer's wait short when a flush is queued.
    flushing: Arc<Notify>,
    stop: Arc<Stop>,
    health: Arc<Health>,
}

impl Audit {
    /// Starts the writer on `pool`.
    pub(crate) fn start(pool: AnyPool, sqlite: bool, health: Arc<Health>) -> Self {
        let (queue, items) = mpsc::channel(QUEUE);
        let flushing = Arc::new(Notify::new());
        let (deadline, deadline_set) = watch::channel(None);
        let stop = Arc::new(Stop {
            asked: AtomicBool::new(false),
            deadline,
            request: std::sync::Mutex::new(None),
        });
        let writer = Writer {
            pool,
            dialect: if sqlite {
                Dialect::Sqlite
            } else {
                Dialect::Postgres
            },
            health: health.clone(),
            stop: stop.clone(),
            deadline: deadline_set,
            held: Held::default(),
        };
        tokio::spawn(writer.run(items, flushing.clone()));
        Self {
            queue,
            flushing,
            stop,
            health,
        }
    }

    /// Queues a row without waiting. With `required`, refuses while the store is failing (no
    /// credential is handed out while its record may not be written).
    pub(crate) fn record(&self, row: IceIssuance, required: bool) -> Result<(), StoreError> {
        let refused = if required && self.health.failing() {
            // No lock and no formatting per refusal: the writer logs the store's error with
            // each attempt, and `/health/readiness` reports it.
            StoreError::Audit(
                "the store refuses writes (its error is in the log and /health/readiness)".into(),
            )
        } else if self.stop.asked.load(Ordering::Relaxed) {
            StoreError::Audit("the audit writer has stopped (the server stops)".into())
        } else {
            match self.queue.try_send(Item::Row(row)) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    StoreError::Audit(format!("{QUEUE} rows are waiting to be written"))
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    StoreError::Audit("the audit writer has stopped (the server stops)".into())
                }
            }
        };
        self.health.unrecorded.inc();
        Err(refused)
    }

    /// Rows queued or held by the writer, not yet written (a flush waiting in the queue
    /// counts as a row).
    pub(crate) fn waiting(&self) -> usize {
        let queued = self.queue.max_capacity() - self.queue.capacity();
        queued + self.health.held.load(Ordering::Relaxed)
    }

    /// Waits, at most `limit`, until every row queued so far is written; says whether they
    /// all were.
    pub(crate) async fn flush(&self, limit: Duration) -> bool {
        let (done, written) = oneshot::channel();
        let flushed = async {
            if self.queue.send(Item::Flush(done)).await.is_err() {
                return false;
            }
            self.flushing.notify_one();
            written.await.unwrap_or(false)
        };
        tokio::time::timeout(limit, flushed).await.unwrap_or(false)
    }

    /// Has the writer take the rows earlier runs kept in `dir` (a few files at a time,
    /// before new rows; each file removed once its rows are written) and keep its own there
    /// at the stop. Never waits: with the queue full (it is empty as the server starts) the
    /// files wait for the next start.
    pub(crate) fn recover(&self, dir: PathBuf) {
        match self.queue.try_send(Item::Recover(dir)) {
            Ok(()) => self.flushing.notify_one(),
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    "the audit's queue is full: rows earlier runs kept wait for the next start"
                );
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// The server stops: from now on rows are refused (every row accepted before is written,
    /// or kept); waits at most `limit` for the store to take what is held, then keeps the
    /// rest in files in `keep_in` (if given); says how it went.
    pub(crate) async fn close(&self, limit: Duration, keep_in: Option<PathBuf>) -> Closed {
        let deadline = Instant::now() + limit;
        let (done, closed) = oneshot::channel();
        self.stop.asked.store(true, Ordering::Relaxed);
        if let Ok(mut request) = self.stop.request.lock() {
            // A second stop's answer replaces the first's (which then says `Unconfirmed`).
            *request = Some((keep_in, done));
        }
        self.stop.deadline.send_replace(Some(deadline));
        tokio::time::timeout_at(deadline + KEEP_LIMIT, closed)
            .await
            .ok()
            .and_then(|answer| answer.ok())
            .unwrap_or(Closed::Unconfirmed)
    }
}

/// What the writer holds: taken from the queue, not yet written or answered.
#[derive(Default)]
struct Held {
    rows: Vec<IceIssuance>,
    flushes: Vec<oneshot::Sender<bool>>,
    /// How many of `rows`, from the front, came from earlier runs' files.
    recovered: usize,
    /// Those files, removed once their rows are written.
    files: Vec<spill::Claimed>,
    /// Where earlier runs' rows are kept, and this run's are kept at the stop.
    kept_in: Option<PathBuf>,
    /// Files there may wait to be claimed.
    unclaimed: bool,
    /// Removals of files whose rows are written, awaited before the next claim and before
    /// the stop is answered (a removal left undone would write a file's rows again).
    removing: Vec<tokio::task::JoinHandle<()>>,
}

impl Held {
    /// Puts a queued item where the writer keeps it.
    fn take(&mut self, item: Item) {
        match item {
            Item::Row(row) => self.rows.push(row),
            Item::Flush(done) => self.flushes.push(done),
            Item::Recover(dir) => {
                self.kept_in = Some(dir);
                self.unclaimed = true;
            }
        }
    }

    /// The first `n` rows are written; the files whose rows all are, removed.
    fn written(&mut self, n: usize) {
        self.rows.drain(..n);
        self.recovered = self.recovered.saturating_sub(n);
        if self.recovered == 0 && !self.files.is_empty() {
            let files = std::mem::take(&mut self.files);
            self.removing.push(tokio::task::spawn_blocking(move || {
                files.into_iter().for_each(spill::Claimed::remove)
            }));
        }
    }

    /// Waits until the files whose rows are written are gone.
    async fn removed(&mut self) {
        for removal in self.removing.drain(..) {
            let _ = removal.await;
        }
    }
}

/// The writer task and what it holds.
struct Writer {
    pool: AnyPool,
    dialect: Dialect,
    health: Arc<Health>,
    stop: Arc<Stop>,
    deadline: watch::Receiver<Option<Instant>>,
    held: Held,
}

impl Writer {
    /// After a first row, sleeps for `LINGER` (or until a flush or the stop is asked for, or
    /// not at all while a batch's worth is queued) and then takes everything queued meanwhile,
    /// so a busy queue wakes it once per batch rather than once per row; writes what it took
    /// in batches, answers the flushes that came with them; keeps and retries rows the store
    /// refused, with a growing pause. Rows of earlier runs are claimed a bound's worth of
    /// files at a time, once those claimed before are written. Asked to stop, it closes the
    /// queue, takes all that is in it, and ends with [`Writer::finish`].
    async fn run(mut self, mut items: mpsc::Receiver<Item>, flushing: Arc<Notify>) {
        let mut backoff = Duration::ZERO;
        let mut closed = false;
        while !closed {
            if self.claim_due() {
                self.claim().await;
            }
            self.close_queue_once_stopping(&mut items);
            let wake = if self.held.rows.is_empty() {
                // The deadline's change is seen once: a stop asked since the line above
                // comes back to the top, which closes the queue.
                tokio::select! {
                    item = items.recv() => match item {
                        Some(item) => self.held.take(item),
                        None => break,
                    },
                    _ = self.deadline.changed() => continue,
                }
                Instant::now() + LINGER
            } else {
                // The last attempt failed: pause before the next, still taking rows and
                // flushes.
                Instant::now() + backoff
            };
            // Takes rows in slices of at most `LINGER`, so that a long pause still empties the
            // queue into `rows`; a flush or the stop ends the wait, and no wait begins while a
            // batch is already there to write (outside a pause, and only while taking rows
            // goes on).
            let mut taking = true;
            loop {
                let stopping = self.stopping();
                let ready =
                    taking && backoff.is_zero() && self.held.rows.len() + items.len() >= BATCH;
                let asked = !self.held.flushes.is_empty() || stopping;
                if !(ready || (asked && taking)) {
                    let slice = wake.min(Instant::now() + LINGER);
                    tokio::select! {
                        () = tokio::time::sleep_until(slice) => {}
                        () = flushing.notified() => {}
                        _ = self.deadline.changed() => {}
                    }
                }
                let before = self.held.rows.len() + self.held.flushes.len();
                closed = self.take_queued(&mut items);
                taking = self.held.rows.len() + self.held.flushes.len() > before;
                if closed
                    || !self.held.flushes.is_empty()
                    || (backoff.is_zero() && self.held.rows.len() >= BATCH)
                    || Instant::now() >= wake
                {
                    break;
                }
            }
            if self.claim_due() {
                self.claim().await;
            }
            let all = self.write_held(&mut items).await;
            backoff = if all {
                Duration::ZERO
            } else {
                (backoff * 2).clamp(Duration::from_millis(50), MAX_BACKOFF)
            };
            for done in self.held.flushes.drain(..) {
                let _ = done.send(all);
            }
        }
        self.finish(&mut items, backoff).await;
    }

    /// Whether kept files wait to be claimed and may be now: the rows of those claimed
    /// before are written, and no stop is asked.
    fn claim_due(&self) -> bool {
        self.held.unclaimed && self.held.recovered == 0 && !self.stopping()
    }

    /// Tells `/metrics` how many rows the writer holds.
    fn note_held(&self) {
        self.health
            .held
            .store(self.held.rows.len(), Ordering::Relaxed);
    }

    /// Whether the stop has been asked for.
    fn stopping(&self) -> bool {
        self.deadline.borrow().is_some()
    }

    /// Once the stop is asked, closes the queue: every `try_send` fails from then on, so no
    /// row can follow the stop; those already queued are still taken.
    fn close_queue_once_stopping(&self, items: &mut mpsc::Receiver<Item>) {
        if self.stopping() {
            items.close();
        }
    }

    /// Claims the next files of rows earlier runs kept (up to [`MAX_PENDING`] rows in all),
    /// in front of the rows held.
    async fn claim(&mut self) {
        let Some(dir) = self.held.kept_in.clone() else {
            return;
        };
        self.held.removed().await;
        let claimed =
            tokio::task::spawn_blocking(move || spill::claim(&dir, MAX_PENDING / 2)).await;
        let claim = claimed.unwrap_or_else(|e| {
            tracing::error!(error = %e, "claiming kept audit rows failed");
            spill::Claim::default()
        });
        self.held.unclaimed = claim.more;
        self.held.recovered += claim.rows.len();
        self.held.rows.splice(0..0, claim.rows);
        self.held.files.extend(claim.files);
        self.note_held();
    }

    /// Takes what is queued now, up to [`MAX_PENDING`] rows held (all of it once the stop is
    /// asked: the queue is closed then, and bounded), without waiting (a message a sender is
    /// still writing is left for the next turn: `try_recv` would park the worker's thread
    /// until it is written); says whether the queue is closed and empty.
    fn take_queued(&mut self, items: &mut mpsc::Receiver<Item>) -> bool {
        use futures_util::FutureExt;
        self.close_queue_once_stopping(items);
        let bound = if self.stopping() {
            usize::MAX
        } else {
            MAX_PENDING
        };
        let mut taken = Vec::new();
        let mut closed = false;
        while self.held.rows.len() < bound {
            let room = (bound - self.held.rows.len()).min(BATCH);
            match items.recv_many(&mut taken, room).now_or_never() {
                Some(0) => {
                    closed = true;
                    break;
                }
                Some(_) => {
                    taken.drain(..).for_each(|item| self.held.take(item));
                    self.note_held();
                }
                None => break,
            }
        }
        self.note_held();
        closed
    }

    /// Writes the held rows in batches until one fails (a write still going at the stop's
    /// deadline is cut off: the store may have taken it all the same, and its rows are then
    /// written twice); says whether all were written. While a backlog is written (a batch's
    /// worth or more left, after an outage), each batch written makes room for as many
    /// queued rows, taken at once, so the queue keeps moving and requests are not refused
    /// for want of room; kept files due are claimed on the way (a saturated writer may not
    /// come back to its loop for long). Taking stops at a flush, answered once the rows held
    /// are written; with less than a batch left it writes that and returns, to linger.
    async fn write_held(&mut self, items: &mut mpsc::Receiver<Item>) -> bool {
        while !self.held.rows.is_empty() {
            let n = self.held.rows.len().min(BATCH);
            let batch = &self.held.rows[..n];
            let write =
                tokio::time::timeout(WRITE_LIMIT, write_batch(&self.pool, self.dialect, batch));
            let mut deadline = self.deadline.clone();
            // The deadline first: past it, no write begins.
            let outcome = tokio::select! {
                biased;
                () = passed(&mut deadline) => Err(sqlx::Error::Protocol(
                    "the server stopped before the store answered".into(),
                )),
                written = write => written.unwrap_or_else(|_| {
                    Err(sqlx::Error::Protocol(format!(
                        "a write of {n} rows took longer than {} s",
                        WRITE_LIMIT.as_secs()
                    )))
                }),
            };
            self.health.record(&outcome);
            match outcome {
                Ok(()) => {
                    self.held.written(n);
                    self.health.written.inc_by(n as u64);
                    if self.held.flushes.is_empty() && self.held.rows.len() >= BATCH {
                        // Closed and empty: the caller finds that out by itself.
                        self.take_queued(items);
                        if self.claim_due() {
                            self.claim().await;
                        }
                    }
                    self.note_held();
                }
                Err(e) => {
                    tracing::error!(error = %e, rows = self.held.rows.len(), "cannot write ICE audit rows; keeping them to try again");
                    break;
                }
            }
        }
        self.held.rows.is_empty()
    }

    /// The queue is closed and empty. At a stop, tries the store until the stop's deadline,
    /// keeps what it would not take in files, and says how it went; otherwise (every sender
    /// gone, outside a server) says what is left unwritten.
    async fn finish(mut self, items: &mut mpsc::Receiver<Item>, mut backoff: Duration) {
        let Some(deadline) = *self.deadline.borrow() else {
            if !self.held.rows.is_empty() {
                tracing::error!(
                    rows = self.held.rows.len(),
                    "the audit writer stopped with rows the store refused"
                );
            }
            return;
        };
        while !self.held.rows.is_empty() && Instant::now() < deadline {
            tokio::time::sleep_until(deadline.min(Instant::now() + backoff)).await;
            self.write_held(items).await;
            backoff = (backoff * 2).clamp(Duration::from_millis(50), MAX_BACKOFF);
        }
        self.held.removed().await;
        let request = self.stop.request.lock().ok().and_then(|mut r| r.take());
        let Some((keep_in, done)) = request else {
            return;
        };
        let rows = std::mem::take(&mut self.held.rows);
        let files = std::mem::take(&mut self.held.files);
        let fresh = rows.len() - self.held.recovered.min(rows.len());
        let closed = match keep_in {
            _ if rows.is_empty() => Closed::Written,
            Some(dir) => {
                let count = rows.len();
                let kept = tokio::task::spawn_blocking(move || {
                    let written = spill::write(&dir, &rows);
                    if written.is_ok() {
                        // Every row of the earlier files is in the new ones.
                        files.into_iter().for_each(spill::Claimed::remove);
                    }
                    written
                })
                .await;
                match kept.map_err(std::io::Error::other).and_then(|kept| kept) {
                    Ok(files) => Closed::Kept { rows: count, files },
                    Err(e) => Closed::Lost {
                        rows: fresh,
                        why: e.to_string(),
                    },
                }
            }
            None => Closed::Lost {
                rows: fresh,
                why: "no directory to keep them in".into(),
            },
        };
        self.health.held.store(0, Ordering::Relaxed);
        let _ = done.send(closed);
    }
}

/// Completes once [`Audit::close`]'s deadline has passed; never before it is set.
async fn passed(deadline: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let set = *deadline.borrow_and_update();
        if let Some(at) = set {
            tokio::time::sleep_until(at).await;
            return;
        }
        if deadline.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How the writer puts a batch into the database.
#[derive(Clone, Copy)]
enum Dialect {
    /// SQLite: rows bound as parameters of a `VALUES` list (see [`sqlite_insert`]).
    Sqlite,
    /// PostgreSQL: rows as one JSON array parameter (one statement text for every batch).
    Postgres,
}

/// Rows per statement in SQLite: a batch (at most [`BATCH`] rows) is written by the smallest
/// of these that holds it, padded with rows of `NULL`s that the statement leaves out. A few
/// fixed texts, each prepared once per connection; padding binds at most seven eighths of a
/// statement's rows (one row in the statement of eight), cheap beside a row written.
const SQLITE_ROWS: [usize; 4] = [8, 32, 128, BATCH];

/// The statement that writes `rows` rows in SQLite: parameters bound straight into a `VALUES`
/// list (no JSON to build and parse again per row, which cost about as much as the insert
/// itself); rows whose user is `NULL` are padding.
fn sqlite_insert(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT INTO ice_credentials (user_id, issued_at, ttl, expires_at) \
         SELECT column1, column2, column3, column4 FROM (VALUES {values}) WHERE column1 IS NOT NULL"
    )
}

/// PostgreSQL's statement: the rows arrive as one JSON array parameter.
const POSTGRES_INSERT: &str = "INSERT INTO ice_credentials (user_id, issued_at, ttl, expires_at) \
     SELECT u, i, t, e FROM json_to_recordset($1::json) AS r(u TEXT, i BIGINT, t BIGINT, e BIGINT)";

/// SQLite's statements with the rows each takes, one per entry of [`SQLITE_ROWS`], made once.
static SQLITE_INSERTS: std::sync::LazyLock<Vec<(usize, String)>> =
    std::sync::LazyLock::new(|| SQLITE_ROWS.iter().map(|&n| (n, sqlite_insert(n))).collect());

/// Writes a batch (at most [`BATCH`] rows) as one statement: one implicit transaction, one
/// round trip to the database.
async fn write_batch(
    pool: &AnyPool,
    dialect: Dialect,
    batch: &[IceIssuance],
) -> Result<(), sqlx::Error> {
    match dialect {
        Dialect::Postgres => {
            let rows = rows_json(batch).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            sqlx::query(POSTGRES_INSERT)
                .bind(rows)
                .execute(pool)
                .await
                .map(|_| ())
        }
        Dialect::Sqlite => {
            let (size, text) = SQLITE_INSERTS
                .iter()
                .find(|(size, _)| *size >= batch.len())
                .ok_or_else(|| {
                    sqlx::Error::Protocol(format!("{} rows are more than a batch", batch.len()))
                })?;
            let mut query = sqlx::query(text.as_str());
            for row in batch {
                query = query
                    .bind(Some(row.user_id.as_str()))
                    .bind(Some(row.issued_at))
                    .bind(Some(row.ttl))
                    .bind(Some(row.expires_at));
            }
            for _ in batch.len()..*size {
                query = query
                    .bind(None::<&str>)
                    .bind(None::<i64>)
                    .bind(None::<i64>)
                    .bind(None::<i64>);
            }
            query.execute(pool).await.map(|_| ())
        }
    }
}

/// One row as PostgreSQL's statement reads it.
#[derive(serde::Serialize)]
struct Row<'a> {
    u: &'a str,
    i: i64,
    t: i64,
    e: i64,
}

/// A batch as the JSON array PostgreSQL's statement reads, written straight from the rows.
fn rows_json(batch: &[IceIssuance]) -> Result<String, serde_json::Error> {
    let rows: Vec<Row<'_>> = batch
        .iter()
        .map(|row| Row {
            u: &row.user_id,
            i: row.issued_at,
            t: row.ttl,
            e: row.expires_at,
        })
        .collect();
    serde_json::to_string(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_the_json_array_the_statement_reads() {
        let batch = [
            IceIssuance {
                user_id: "alice".into(),
                issued_at: 1_800_000_000,
                ttl: 3600,
                expires_at: 1_800_003_600,
            },
            IceIssuance {
                user_id: "a \"quoted\" \\ ü\n".into(),
                issued_at: -1,
                ttl: 0,
                expires_at: i64::MAX,
            },
        ];
        let text = rows_json(&batch).unwrap();
        let read: serde_json::Value = serde_json::from_str(&text).unwrap();
        let expected: Vec<serde_json::Value> = batch
            .iter()
            .map(|r| serde_json::json!({"u": r.user_id, "i": r.issued_at, "t": r.ttl, "e": r.expires_at}))
            .collect();
        assert_eq!(read, serde_json::Value::Array(expected));
        assert_eq!(rows_json(&[]).unwrap(), "[]");
    }

    /// A new SQLite store's directory and pool.
    async fn sqlite_store() -> (std::path::PathBuf, AnyPool) {
        let dir =
            std::env::temp_dir().join(format!("hypha-rtc-audit-{}", crate::ids::random_id(8)));
        std::fs::create_dir_all(&dir).unwrap();
        let store = crate::store::Store::open(&format!("sqlite://{}/t.db", dir.display()))
            .await
            .unwrap();
        (dir, store.pool.clone())
    }

    /// The writer takes rows in bursts: a flush after more than a batch answers once all of
    /// them are written, and rows still queued when the last sender goes are written before
    /// the writer ends (none lost when the queue closes mid-linger).
    #[tokio::test]
    async fn the_writer_writes_every_row_by_a_flush_and_when_its_queue_closes() {
        let (dir, pool) = sqlite_store().await;
        let count = || async {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM ice_credentials")
                .fetch_one(&pool)
                .await
                .unwrap()
        };
        let row = |i: usize| IceIssuance {
            user_id: format!("writer-{i}"),
            issued_at: i as i64,
            ttl: 60,
            expires_at: i as i64 + 60,
        };
        let audit = Audit::start(pool.clone(), true, Arc::new(Health::default()));
        for i in 0..(3 * BATCH + 7) {
            audit.record(row(i), true).unwrap();
        }
        assert!(audit.flush(Duration::from_secs(10)).await);
        assert_eq!(count().await, (3 * BATCH + 7) as i64);
        for i in 0..100 {
            audit.record(row(10_000 + i), true).unwrap();
        }
        drop(audit);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while count().await < (3 * BATCH + 107) as i64 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} rows",
                count().await
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(count().await, (3 * BATCH + 107) as i64);
        std::fs::remove_dir_all(dir).ok();
    }

    /// A store that refuses writes: the flush says so, the audit reports itself failing,
    /// required rows are refused and optional ones kept; once the store takes writes again
    /// every kept row is written exactly once and the audit is healthy again.
    #[tokio::test]
    async fn refused_rows_are_kept_and_written_once_the_store_takes_them() {
        let (dir, pool) = sqlite_store().await;
        refuse_inserts(&pool).await;
        let health = Arc::new(Health::default());
        let audit = Audit::start(pool.clone(), true, health.clone());
        let row = |i: usize| IceIssuance {
            user_id: format!("kept-{i}"),
            issued_at: i as i64,
            ttl: 60,
            expires_at: i as i64 + 60,
        };
        for i in 0..600 {
            audit.record(row(i), true).unwrap();
        }
        assert!(!audit.flush(Duration::from_secs(10)).await);
        assert!(health.failing());
        assert!(health.last_error().unwrap_or_default().contains("refused"));
        assert!(audit.record(row(600), true).is_err());
        audit.record(row(600), false).unwrap();
        sqlx::query("DROP TRIGGER refuse")
            .execute(&pool)
            .await
            .unwrap();
        assert!(audit.flush(Duration::from_secs(10)).await);
        assert!(!health.failing());
        let written: Vec<String> =
            sqlx::query_scalar("SELECT user_id FROM ice_credentials ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        let expected: Vec<String> = (0..=600).map(|i| row(i).user_id).collect();
        assert_eq!(written, expected);
        std::fs::remove_dir_all(dir).ok();
    }

    fn row(tag: &str, i: usize) -> IceIssuance {
        IceIssuance {
            user_id: format!("{tag}-{i}"),
            issued_at: i as i64,
            ttl: 60,
            expires_at: i as i64 + 60,
        }
    }

    async fn user_ids(pool: &AnyPool) -> Vec<String> {
        sqlx::query_scalar("SELECT user_id FROM ice_credentials ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    /// Makes the store refuse every audit row from now on (until `DROP TRIGGER refuse`).
    async fn refuse_inserts(pool: &AnyPool) {
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON ice_credentials \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(pool)
        .await
        .unwrap();
    }

    /// Records rows `tag-0`, `tag-1`, ... (optional ones) until the writer holds all it may
    /// and its queue is full, against a store that refuses them; how many were taken.
    async fn fill(audit: &Audit, tag: &str) -> usize {
        let mut accepted = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while audit.waiting() < MAX_PENDING + QUEUE {
            assert!(std::time::Instant::now() < deadline, "{}", audit.waiting());
            match audit.record(row(tag, accepted), false) {
                Ok(()) => accepted += 1,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        accepted
    }

    /// A stop writes every row accepted before it (more than a batch) and refuses every row
    /// after it, counted.
    #[tokio::test]
    async fn a_stop_writes_every_row_taken_and_refuses_the_rest() {
        let (dir, pool) = sqlite_store().await;
        let health = Arc::new(Health::default());
        let audit = Audit::start(pool.clone(), true, health.clone());
        for i in 0..(2 * BATCH + 3) {
            audit.record(row("before", i), true).unwrap();
        }
        let closed = audit
            .close(Duration::from_secs(10), Some(dir.clone()))
            .await;
        assert_eq!(closed, Closed::Written);
        let error = audit.record(row("after", 0), false).unwrap_err();
        assert!(error.to_string().contains("stopped"), "{error}");
        assert_eq!(health.unrecorded.get(), 1);
        assert_eq!(health.written.get(), (2 * BATCH + 3) as u64);
        let expected: Vec<String> = (0..(2 * BATCH + 3))
            .map(|i| row("before", i).user_id)
            .collect();
        assert!(user_ids(&pool).await == expected, "every row, once");
        std::fs::remove_dir_all(dir).ok();
    }

    /// Senders racing the stop: every row accepted is written, every row refused is
    /// counted, none is both or neither.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_racing_the_stop_are_written_or_refused_never_lost() {
        let (dir, pool) = sqlite_store().await;
        let health = Arc::new(Health::default());
        let audit = Audit::start(pool.clone(), true, health.clone());
        let senders: Vec<_> = (0..4)
            .map(|s| {
                let audit = audit.clone();
                tokio::spawn(async move {
                    let mut accepted = 0;
                    for i in 0..10_000_000 {
                        match audit.record(row(&format!("race{s}"), i), false) {
                            Ok(()) => accepted += 1,
                            Err(e) if e.to_string().contains("stopped") => return (accepted, true),
                            Err(_) => {}
                        }
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                    (accepted, false)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let closed = audit
            .close(Duration::from_secs(20), Some(dir.clone()))
            .await;
        let mut accepted = 0;
        for sender in senders {
            let (taken, stopped) = sender.await.unwrap();
            assert!(stopped, "each sender ran into the stop");
            accepted += taken;
        }
        assert!(accepted > 0);
        // On a slow machine the store may not take them all in time: the rest are kept.
        let kept = match closed {
            Closed::Written => 0,
            Closed::Kept { rows, .. } => rows as u64,
            other => panic!("{other:?}"),
        };
        let written = user_ids(&pool).await.len() as u64;
        assert_eq!(written + kept, accepted);
        assert_eq!(health.written.get(), written);
        std::fs::remove_dir_all(dir).ok();
    }

    /// A writer holding all it may while the store refuses, its queue full: the stop still
    /// reaches it, and every row it holds or that waits in the queue is kept, in order.
    #[tokio::test]
    async fn a_full_writer_keeps_every_row_at_the_stop() {
        let (dir, pool) = sqlite_store().await;
        let kept_dir = dir.join("kept");
        refuse_inserts(&pool).await;
        let audit = Audit::start(pool.clone(), true, Arc::new(Health::default()));
        let accepted = fill(&audit, "full").await;
        assert_eq!(accepted, MAX_PENDING + QUEUE);
        assert!(audit.record(row("full", accepted), false).is_err());
        let closed = audit
            .close(Duration::from_millis(300), Some(kept_dir.clone()))
            .await;
        let Closed::Kept { rows, files } = closed else {
            panic!("{closed:?}");
        };
        assert_eq!((rows, files.len()), (accepted, 2));
        let claim = spill::claim(&kept_dir, usize::MAX);
        let expected: Vec<IceIssuance> = (0..accepted).map(|i| row("full", i)).collect();
        assert!(claim.rows == expected, "the kept rows differ");
        std::fs::remove_dir_all(dir).ok();
    }

    /// After an outage the writer holds all it may and the queue is full: once the store
    /// takes writes again the queue has room after the first batches of the backlog, not
    /// only once the whole backlog is written; what is held stays within its bound; every
    /// row lands once, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_moves_while_a_backlog_is_written() {
        let (dir, pool) = sqlite_store().await;
        refuse_inserts(&pool).await;
        let health = Arc::new(Health::default());
        let audit = Audit::start(pool.clone(), true, health.clone());
        let mut accepted = fill(&audit, "backlog").await;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        sqlx::query("DROP TRIGGER refuse")
            .execute(&pool)
            .await
            .unwrap();
        let written_when_room = loop {
            assert!(health.held.load(Ordering::Relaxed) <= MAX_PENDING);
            if audit.record(row("backlog", accepted), false).is_ok() {
                accepted += 1;
                break health.written.get();
            }
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert!(
            written_when_room < (MAX_PENDING / 2) as u64,
            "the queue had room only after {written_when_room} rows were written"
        );
        assert!(audit.flush(Duration::from_secs(30)).await);
        let expected: Vec<String> = (0..accepted).map(|i| row("backlog", i).user_id).collect();
        assert!(
            user_ids(&pool).await == expected,
            "every row, once, in order"
        );
        std::fs::remove_dir_all(dir).ok();
    }

    /// Kept files given to a writer under steady traffic are written while the traffic goes
    /// on, and their files go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kept_rows_are_written_under_steady_traffic() {
        let (dir, pool) = sqlite_store().await;
        let kept_dir = dir.join("kept");
        let kept: Vec<IceIssuance> = (0..3 * BATCH).map(|i| row("kept", i)).collect();
        let files = spill::write(&kept_dir, &kept).unwrap();
        let audit = Audit::start(pool.clone(), true, Arc::new(Health::default()));
        let traffic = {
            let audit = audit.clone();
            tokio::spawn(async move {
                for i in 0..1_000_000 {
                    if audit.record(row("steady", i), false).is_err() {
                        return i;
                    }
                    if i % 8 == 0 {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
                1_000_000
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        audit.recover(kept_dir.clone());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while files[0].exists() {
            assert!(!traffic.is_finished() && std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            audit.close(Duration::from_secs(10), None).await,
            Closed::Written
        );
        let sent = traffic.await.unwrap();
        let ids = user_ids(&pool).await;
        assert_eq!(ids.len(), kept.len() + sent);
        let kept_written: Vec<&String> = ids.iter().filter(|id| id.starts_with("kept-")).collect();
        assert!(kept_written.len() == kept.len(), "every kept row, once");
        std::fs::remove_dir_all(dir).ok();
    }

    /// Rows the store refuses until the stop's deadline are kept in a file; a writer started
    /// later on the same directory writes them first (once), removes the file; if the store
    /// refuses again at that writer's stop, the kept rows and the new ones go to one new
    /// file and the old one is removed.
    #[tokio::test]
    async fn rows_refused_at_a_stop_are_kept_and_written_by_the_next_writer() {
        let (dir, pool) = sqlite_store().await;
        let kept_dir = dir.join("kept");
        refuse_inserts(&pool).await;
        let audit = Audit::start(pool.clone(), true, Arc::new(Health::default()));
        for i in 0..600 {
            audit.record(row("first", i), false).unwrap();
        }
        let closed = audit
            .close(Duration::from_millis(300), Some(kept_dir.clone()))
            .await;
        let Closed::Kept { rows: 600, files } = closed else {
            panic!("{closed:?}");
        };
        assert!(files.len() == 1 && files[0].exists());

        // The store still refuses: the next writer keeps old and new rows in one new file.
        let health = Arc::new(Health::default());
        let audit = Audit::start(pool.clone(), true, health.clone());
        audit.recover(kept_dir.clone());
        for i in 0..5 {
            audit.record(row("second", i), false).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while audit.waiting() < 605 {
            assert!(std::time::Instant::now() < deadline, "{}", audit.waiting());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let closed = audit
            .close(Duration::from_millis(300), Some(kept_dir.clone()))
            .await;
        let Closed::Kept {
            rows: 605,
            files: second,
        } = closed
        else {
            panic!("{closed:?}");
        };
        assert!(!files[0].exists() && second.len() == 1 && second[0].exists());

        sqlx::query("DROP TRIGGER refuse")
            .execute(&pool)
            .await
            .unwrap();
        let audit = Audit::start(pool.clone(), true, Arc::new(Health::default()));
        audit.recover(kept_dir.clone());
        audit.record(row("third", 0), true).unwrap();
        assert!(audit.flush(Duration::from_secs(10)).await);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while second[0].exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the file goes once its rows are written"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut expected: Vec<String> = (0..600).map(|i| row("first", i).user_id).collect();
        expected.extend((0..5).map(|i| row("second", i).user_id));
        expected.push(row("third", 0).user_id);
        assert!(
            user_ids(&pool).await == expected,
            "kept rows first, each once"
        );
        assert_eq!(
            audit.close(Duration::from_secs(5), None).await,
            Closed::Written
        );
        std::fs::remove_dir_all(dir).ok();
    }

    /// More kept files than one claim takes: the writer claims the next once the rows before
    /// are written, without a restart, and every file goes.
    #[tokio::test]
    async fn kept_files_beyond_one_claim_are_written_while_running() {
        let (dir, pool) = sqlite_store().await;
        let kept_dir = dir.join("kept");
        let mut expected = Vec::new();
        for f in 0..3 {
            let rows: Vec<IceIssuance> = (0..MAX_PENDING / 2)
                .map(|i| row(&format!("file{f}"), i))
                .collect();
            spill::write(&kept_dir, &rows).unwrap();
            expected.extend(rows.into_iter().map(|r| r.user_id));
            std::thread::sleep(Duration::from_millis(2));
        }
        let audit = Audit::start(pool.clone(), true, Arc::new(Health::default()));
        audit.recover(kept_dir.clone());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let left = std::fs::read_dir(&kept_dir).unwrap().count();
            if left == 0 && user_ids(&pool).await.len() == expected.len() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{left} files left");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(user_ids(&pool).await == expected, "every file's rows, once");
        std::fs::remove_dir_all(dir).ok();
    }

    /// A write the store leaves hanging (a lock another connection holds) does not hold the
    /// stop beyond its deadline: the rows are kept, and without a directory said lost.
    #[tokio::test]
    async fn a_hanging_store_does_not_hold_the_stop() {
        let (dir, pool) = sqlite_store().await;
        let mut locker = pool.acquire().await.unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut *locker)
            .await
            .unwrap();
        let audit = Audit::start(pool.clone(), true, Arc::new(Health::default()));
        audit.record(row("hung", 0), true).unwrap();
        let started = std::time::Instant::now();
        let closed = audit
            .close(Duration::from_millis(200), Some(dir.join("kept")))
            .await;
        assert!(matches!(closed, Closed::Kept { rows: 1, .. }), "{closed:?}");
        // The store's own wait for its lock is 5 s.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        let audit = Audit::start(pool.clone(), true, Arc::new(Health::default()));
        audit.record(row("hung", 1), true).unwrap();
        let closed = audit.close(Duration::from_millis(200), None).await;
        assert!(matches!(closed, Closed::Lost { rows: 1, .. }), "{closed:?}");
        sqlx::query("ROLLBACK").execute(&mut *locker).await.unwrap();
        std::fs::remove_dir_all(dir).ok();
    }

    /// Every size of batch SQLite's statements take, on both sides of each statement's size,
    /// lands whole and exactly (the padding rows leave nothing behind); more than a batch is
    /// refused without writing any of it.
    #[tokio::test]
    async fn sqlite_batches_of_every_size_land_exactly() {
        let (dir, pool) = sqlite_store().await;
        let mut expected = Vec::new();
        for (b, size) in [1, 7, 8, 9, 32, 33, 127, 128, 129, 511, BATCH]
            .into_iter()
            .enumerate()
        {
            let batch: Vec<IceIssuance> = (0..size)
                .map(|i| IceIssuance {
                    user_id: format!("user-{b}-{i} \"ü\""),
                    issued_at: (b * 10_000 + i) as i64,
                    ttl: i as i64,
                    expires_at: i64::MAX - i as i64,
                })
                .collect();
            write_batch(&pool, Dialect::Sqlite, &batch).await.unwrap();
            expected.extend(batch);
        }
        let too_many: Vec<IceIssuance> = (0..=BATCH).map(|_| expected[0].clone()).collect();
        assert!(
            write_batch(&pool, Dialect::Sqlite, &too_many)
                .await
                .is_err()
        );
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT user_id, issued_at, ttl, expires_at FROM ice_credentials ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let written: Vec<IceIssuance> = rows.into_iter().map(IceIssuance::from).collect();
        assert_eq!(written, expected);
        std::fs::remove_dir_all(dir).ok();
    }
}
