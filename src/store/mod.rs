//! The store: a sqlx pool (SQLite, a file in `--data-dir`, by default) and its few tables,
//! with the schema in `migrations/`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::mpsc;

/// A store that could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("cannot apply the database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
}

/// One issuance of TURN credentials, as audited.
#[derive(Debug, Clone, PartialEq)]
pub struct IceIssuance {
    pub user_id: String,
    pub issued_at: i64,
    pub ttl: i64,
    pub expires_at: i64,
}

/// Audit rows waiting to be written before callers feel back-pressure.
const AUDIT_QUEUE: usize = 4096;
/// Rows written per transaction.
const AUDIT_BATCH: usize = 512;

/// The database.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    audit: mpsc::Sender<IceIssuance>,
}

impl Store {
    /// Opens (creating if needed) the database and applies the migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let open_error = |source| StoreError::Open {
            url: url.to_string(),
            source,
        };
        let options = SqliteConnectOptions::from_str(url)
            .map_err(open_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(open_error)?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let (audit, rows) = mpsc::channel(AUDIT_QUEUE);
        tokio::spawn(write_audit(pool.clone(), rows));
        Ok(Self { pool, audit })
    }

    /// Queues an audit row; waits (back-pressure) rather than drop it when the writer is behind.
    pub async fn record_ice_issuance(&self, row: IceIssuance) {
        if self.audit.send(row).await.is_err() {
            tracing::error!("the audit writer has stopped; an ICE issuance was not recorded");
        }
    }

    /// The audited issuances of a user, newest first.
    pub async fn ice_issuances(
        &self,
        user_id: &str,
        limit: i64,
    ) -> Result<Vec<IceIssuance>, StoreError> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT user_id, issued_at, ttl, expires_at FROM ice_credentials WHERE user_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user_id, issued_at, ttl, expires_at)| IceIssuance {
                user_id,
                issued_at,
                ttl,
                expires_at,
            })
            .collect())
    }
}

/// Writes queued audit rows in batches, one transaction per batch.
async fn write_audit(pool: SqlitePool, mut rows: mpsc::Receiver<IceIssuance>) {
    let mut batch = Vec::with_capacity(AUDIT_BATCH);
    while rows.recv_many(&mut batch, AUDIT_BATCH).await > 0 {
        let written = async {
            let mut tx = pool.begin().await?;
            for row in &batch {
                sqlx::query("INSERT INTO ice_credentials (user_id, issued_at, ttl, expires_at) VALUES ($1, $2, $3, $4)")
                    .bind(&row.user_id)
                    .bind(row.issued_at)
                    .bind(row.ttl)
                    .bind(row.expires_at)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        }
        .await;
        if let Err(e) = written {
            tracing::error!(error = %e, rows = batch.len(), "cannot write ICE audit rows");
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn audit_rows_are_written() {
        let dir =
            std::env::temp_dir().join(format!("hypha-rtc-store-{}", crate::auth::random_id(8)));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&format!("sqlite://{}/t.db", dir.display()))
            .await
            .unwrap();
        let row = IceIssuance {
            user_id: "u1".into(),
            issued_at: 10,
            ttl: 60,
            expires_at: 70,
        };
        store.record_ice_issuance(row.clone()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let rows = store.ice_issuances("u1", 10).await.unwrap();
            if !rows.is_empty() {
                assert_eq!(rows, vec![row]);
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the audit row was not written"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::remove_dir_all(dir).ok();
    }
}
