//! The credential audit's writer. A request for ICE servers queues its row and answers at
//! once; one task, woken by a first row, lets the queue fill for 20 ms and then writes what
//! it holds in multi-row `INSERT`s of up to 512 rows, so under load a commit carries hundreds
//! of rows, the writer wakes once per batch rather than once per row, and no request waits
//! for the database. A batch that cannot be written is kept and tried again (the rows are not
//! dropped), the store reports itself failing meanwhile, and with `--audit-required` no more
//! credentials are handed out until it recovers. Shutdown and the audit's readers flush the
//! queue first, so a stopped server and a page reading the table see every row.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::AnyPool;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;

use super::{IceIssuance, StoreError};

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
/// Rows the writer holds at most, taken from the queue and not yet written (while the store
/// refuses them, say); beyond this it stops taking rows from the queue, which then fills.
const MAX_PENDING: usize = 65_536;
/// The longest pause between attempts at a batch the store refused.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the writer is asked to do, in order.
enum Item {
    Row(IceIssuance),
    /// Answer, once every row queued before this one is written, whether all were.
    Flush(oneshot::Sender<bool>),
}

/// How the store's last writes went, for `/health/readiness` and the audit's admission.
#[derive(Default)]
pub(crate) struct Health {
    failing: AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
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

/// The queue in front of the writer task.
#[derive(Clone)]
pub(crate) struct Audit {
    queue: mpsc::Sender<Item>,
    /// Cuts the writer's wait short when a flush is queued.
    flushing: Arc<Notify>,
    health: Arc<Health>,
}

impl Audit {
    /// Starts the writer on `pool`.
    pub(crate) fn start(pool: AnyPool, sqlite: bool, health: Arc<Health>) -> Self {
        let (queue, items) = mpsc::channel(QUEUE);
        let flushing = Arc::new(Notify::new());
        tokio::spawn(write(
            pool,
            if sqlite {
                Dialect::Sqlite
            } else {
                Dialect::Postgres
            },
            items,
            flushing.clone(),
            health.clone(),
        ));
        Self {
            queue,
            flushing,
            health,
        }
    }

    /// Queues a row without waiting. With `required`, refuses while the store is failing (no
    /// credential is handed out while its record may not be written).
    pub(crate) fn record(&self, row: IceIssuance, required: bool) -> Result<(), StoreError> {
        if required && self.health.failing() {
            // No lock and no formatting per refusal: the writer logs the store's error with
            // each attempt, and `/health/readiness` reports it.
            return Err(StoreError::Audit(
                "the store refuses writes (its error is in the log and /health/readiness)".into(),
            ));
        }
        self.queue.try_send(Item::Row(row)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                StoreError::Audit(format!("{QUEUE} rows are waiting to be written"))
            }
            mpsc::error::TrySendError::Closed(_) => {
                StoreError::Audit("the audit writer has stopped".into())
            }
        })
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
}

/// The writer: after a first row, sleeps for `LINGER` (or until a flush is asked for, or not
/// at all while a batch's worth is queued) and then takes everything queued meanwhile, so a
/// busy queue wakes it once per batch rather than once per row; writes what it took in
/// batches, answers the flushes that came with them; keeps and retries rows the store
/// refused, with a growing pause.
async fn write(
    pool: AnyPool,
    dialect: Dialect,
    mut items: mpsc::Receiver<Item>,
    flushing: Arc<Notify>,
    health: Arc<Health>,
) {
    let mut pending: Vec<IceIssuance> = Vec::with_capacity(BATCH);
    let mut flushes: Vec<oneshot::Sender<bool>> = Vec::new();
    let mut backoff = Duration::ZERO;
    let mut closed = false;
    while !closed {
        let deadline = if pending.is_empty() {
            match items.recv().await {
                Some(item) => take(item, &mut pending, &mut flushes),
                None => break,
            }
            Instant::now() + LINGER
        } else {
            // The last attempt failed: pause before the next, still taking rows and flushes.
            Instant::now() + backoff
        };
        // Takes rows in slices of at most `LINGER`, so that a long pause still empties the
        // queue into `pending`; a flush ends the wait, and no wait begins while a batch is
        // already there to write (outside a pause, and only while taking rows goes on).
        let mut taking = true;
        loop {
            let ready = taking && backoff.is_zero() && pending.len() + items.len() >= BATCH;
            if flushes.is_empty() && !ready {
                let slice = deadline.min(Instant::now() + LINGER);
                tokio::select! {
                    () = tokio::time::sleep_until(slice) => {}
                    () = flushing.notified() => {}
                }
            }
            let before = pending.len() + flushes.len();
            closed = take_queued(&mut items, &mut pending, &mut flushes);
            taking = pending.len() + flushes.len() > before;
            if closed
                || !flushes.is_empty()
                || (backoff.is_zero() && pending.len() >= BATCH)
                || Instant::now() >= deadline
            {
                break;
            }
        }
        while !pending.is_empty() {
            let n = pending.len().min(BATCH);
            let outcome =
                tokio::time::timeout(WRITE_LIMIT, write_batch(&pool, dialect, &pending[..n]))
                    .await
                    .unwrap_or_else(|_| {
                        Err(sqlx::Error::Protocol(format!(
                            "a write of {n} rows took longer than {} s",
                            WRITE_LIMIT.as_secs()
                        )))
                    });
            health.record(&outcome);
            match outcome {
                Ok(()) => {
                    pending.drain(..n);
                }
                Err(e) => {
                    tracing::error!(error = %e, rows = pending.len(), "cannot write ICE audit rows; keeping them to try again");
                    break;
                }
            }
        }
        backoff = if pending.is_empty() {
            Duration::ZERO
        } else {
            (backoff * 2).clamp(Duration::from_millis(50), MAX_BACKOFF)
        };
        for done in flushes.drain(..) {
            let _ = done.send(pending.is_empty());
        }
    }
    if !pending.is_empty() {
        tracing::error!(
            rows = pending.len(),
            "the audit writer stopped with rows the store refused"
        );
    }
}

/// Takes what is queued now, up to [`MAX_PENDING`] rows held, without waiting (a message a
/// sender is still writing is left for the next turn: `try_recv` would park the worker's
/// thread until it is written); says whether the queue is closed and empty.
fn take_queued(
    items: &mut mpsc::Receiver<Item>,
    pending: &mut Vec<IceIssuance>,
    flushes: &mut Vec<oneshot::Sender<bool>>,
) -> bool {
    use futures_util::FutureExt;
    let mut taken = Vec::new();
    while pending.len() < MAX_PENDING {
        let room = (MAX_PENDING - pending.len()).min(BATCH);
        match items.recv_many(&mut taken, room).now_or_never() {
            Some(0) => return true,
            Some(_) => taken
                .drain(..)
                .for_each(|item| take(item, pending, flushes)),
            None => break,
        }
    }
    false
}

/// Puts a queued item where the writer keeps it.
fn take(item: Item, pending: &mut Vec<IceIssuance>, flushes: &mut Vec<oneshot::Sender<bool>>) {
    match item {
        Item::Row(row) => pending.push(row),
        Item::Flush(done) => flushes.push(done),
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
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON ice_credentials \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(&pool)
        .await
        .unwrap();
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
