//! The credential audit's writer. A request for ICE servers queues its row and answers at
//! once; one task gathers the queued rows for a few milliseconds and writes them as one
//! multi-row `INSERT`, so under load a commit carries hundreds of rows and no request waits
//! for the database. A batch that cannot be written is kept and tried again (the rows are not
//! dropped), the store reports itself failing meanwhile, and with `--audit-required` no more
//! credentials are handed out until it recovers. Shutdown and the audit's readers flush the
//! queue first, so a stopped server and a page reading the table see every row.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{IceIssuance, StoreError};

/// Rows queued for the writer; a full queue refuses (or, with the audit optional, drops and
/// logs) rather than making requests wait.
const QUEUE: usize = 16_384;
/// Rows written per statement.
const BATCH: usize = 1024;
/// How long the writer waits for more rows before writing what it has.
const LINGER: Duration = Duration::from_millis(5);
/// Rows kept while the store refuses them (beyond this the writer stops taking rows from the
/// queue, which then fills).
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
    health: Arc<Health>,
}

impl Audit {
    /// Starts the writer on `pool`.
    pub(crate) fn start(pool: AnyPool, sqlite: bool, health: Arc<Health>) -> Self {
        let (queue, items) = mpsc::channel(QUEUE);
        tokio::spawn(write(pool, insert_statement(sqlite), items, health.clone()));
        Self { queue, health }
    }

    /// Queues a row without waiting. With `required`, refuses while the store is failing (no
    /// credential is handed out while its record may not be written).
    pub(crate) fn record(&self, row: IceIssuance, required: bool) -> Result<(), StoreError> {
        if required && self.health.failing() {
            return Err(StoreError::Audit(format!(
                "the store refuses writes ({})",
                self.health.last_error().unwrap_or_default()
            )));
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
            self.queue.send(Item::Flush(done)).await.is_ok() && written.await.unwrap_or(false)
        };
        tokio::time::timeout(limit, flushed).await.unwrap_or(false)
    }
}

/// The writer: gathers rows for up to `LINGER` (or `BATCH` of them), writes them, answers the
/// flushes that came with them; keeps and retries rows the store refused, with a growing pause.
async fn write(
    pool: AnyPool,
    statement: &'static str,
    mut items: mpsc::Receiver<Item>,
    health: Arc<Health>,
) {
    let mut pending: Vec<IceIssuance> = Vec::with_capacity(BATCH);
    let mut flushes: Vec<oneshot::Sender<bool>> = Vec::new();
    let mut backoff = Duration::ZERO;
    let mut closed = false;
    let take = |item, pending: &mut Vec<_>, flushes: &mut Vec<_>| match item {
        Item::Row(row) => pending.push(row),
        Item::Flush(done) => flushes.push(done),
    };
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
        while flushes.is_empty() && (backoff > Duration::ZERO || pending.len() < BATCH) {
            if pending.len() >= MAX_PENDING {
                tokio::time::sleep_until(deadline).await;
                break;
            }
            match tokio::time::timeout_at(deadline, items.recv()).await {
                Ok(Some(item)) => take(item, &mut pending, &mut flushes),
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) => break,
            }
        }
        while !pending.is_empty() {
            let n = pending.len().min(BATCH);
            let outcome = write_batch(&pool, statement, &pending[..n]).await;
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

/// The statement that writes a batch: its rows arrive as one JSON array parameter, so the
/// text is the same for every batch (prepared once, no per-row placeholders to bind).
fn insert_statement(sqlite: bool) -> &'static str {
    if sqlite {
        "INSERT INTO ice_credentials (user_id, issued_at, ttl, expires_at) \
         SELECT json_extract(value, '$.u'), json_extract(value, '$.i'), json_extract(value, '$.t'), \
         json_extract(value, '$.e') FROM json_each($1)"
    } else {
        "INSERT INTO ice_credentials (user_id, issued_at, ttl, expires_at) \
         SELECT u, i, t, e FROM json_to_recordset($1::json) AS r(u TEXT, i BIGINT, t BIGINT, e BIGINT)"
    }
}

/// Writes a batch as one `INSERT`: one statement, one implicit transaction, one round trip to
/// the database, whatever the batch's size.
async fn write_batch(
    pool: &AnyPool,
    statement: &'static str,
    batch: &[IceIssuance],
) -> Result<(), sqlx::Error> {
    let rows = rows_json(batch).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query(statement)
        .bind(rows)
        .execute(pool)
        .await
        .map(|_| ())
}

/// One row as the statement reads it.
#[derive(serde::Serialize)]
struct Row<'a> {
    u: &'a str,
    i: i64,
    t: i64,
    e: i64,
}

/// A batch as the JSON array the statement reads, written straight from the rows.
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
}
