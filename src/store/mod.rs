//! The store: a sqlx pool and its few tables. SQLite (a file in `--data-dir`) is the embedded
//! default; PostgreSQL (`--database-url postgres://...`) lets several instances share it. The
//! queries are the same for both; the schema is in `migrations/sqlite` and `migrations/postgres`.

use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

mod audit;
mod spill;
pub(crate) mod workspace_data;
pub(crate) mod workspaces;

/// Where the store is.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreOptions {
    /// Directory for the embedded database and other state
    #[arg(
        long,
        env = "HYPHA_DATA_DIR",
        value_name = "DIR",
        global = true,
        default_value = "hypha-rtc-data"
    )]
    pub data_dir: std::path::PathBuf,
    /// Database URL: sqlite://... or postgres://... (Hypha's postgresql+asyncpg:// and sqlite+aiosqlite:/// forms too) [default: sqlite://<data-dir>/hypha-rtc.db]
    #[arg(
        long,
        visible_alias = "database-uri",
        env = "HYPHA_DATABASE_URL",
        value_name = "URL",
        global = true,
        hide_env_values = true,
        hide_default_value = true
    )]
    pub database_url: Option<String>,
}

/// Where the store is, validated.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub data_dir: std::path::PathBuf,
    /// `None`: a SQLite file in `data_dir`.
    pub database_url: Option<String>,
}

impl StoreOptions {
    pub(crate) fn settings(&self) -> StoreSettings {
        StoreSettings {
            data_dir: self.data_dir.clone(),
            database_url: self
                .database_url
                .as_deref()
                .filter(|u| !u.is_empty())
                .map(sqlx_url),
        }
    }
}

/// A database URL in the form sqlx takes: Hypha's SQLAlchemy forms (`postgresql+asyncpg://`,
/// `sqlite+aiosqlite:///relative.db`, `sqlite+aiosqlite:////absolute.db`) are translated.
fn sqlx_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((base, _driver)) = scheme.split_once('+')
    {
        return match base {
            // SQLAlchemy's third slash ends the authority: what follows is the path.
            "sqlite" => format!("sqlite://{}", rest.strip_prefix('/').unwrap_or(rest)),
            "postgresql" | "postgres" => format!("postgres://{rest}"),
            _ => url.to_string(),
        };
    }
    url.to_string()
}

/// A store that could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {url}: {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("cannot apply the database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    #[error("cannot write the credential audit: {0}")]
    Audit(String),
    /// The batch holding the row could not be written (the error is shared by its rows).
    #[error("cannot write the credential audit: {0}")]
    AuditBatch(std::sync::Arc<sqlx::Error>),
}

/// One issuance of TURN credentials, as audited.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IceIssuance {
    pub user_id: String,
    pub issued_at: i64,
    pub ttl: i64,
    pub expires_at: i64,
}

/// A row as read from the table: user, issued at, ttl, expires at.
impl From<(String, i64, i64, i64)> for IceIssuance {
    fn from((user_id, issued_at, ttl, expires_at): (String, i64, i64, i64)) -> Self {
        Self {
            user_id,
            issued_at,
            ttl,
            expires_at,
        }
    }
}

/// A local user account.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub id: String,
    pub email: String,
    pub password_hash: String,
    pub roles: Vec<String>,
    pub created_at: i64,
    pub disabled_at: Option<i64>,
}

/// A pending sign-in of the hypha-login flow.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoginKey {
    pub key: String,
    pub expires_at: i64,
    pub workspace: Option<String>,
    pub token_expires_in: Option<i64>,
    /// Set once the user signed in.
    pub token: Option<String>,
    pub user_id: Option<String>,
}

type UserRow = (String, String, String, String, i64, Option<i64>);

fn user_from_row(
    (id, email, password_hash, roles, created_at, disabled_at): UserRow,
) -> UserRecord {
    UserRecord {
        id,
        email,
        password_hash,
        roles: roles
            .split(',')
            .filter(|r| !r.is_empty())
            .map(str::to_string)
            .collect(),
        created_at,
        disabled_at,
    }
}

/// The database.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    audit: audit::Audit,
    health: std::sync::Arc<audit::Health>,
}

pub(crate) use audit::Closed as AuditClosed;

/// The audit's counters for `/metrics`, shared with its writer.
pub(crate) struct AuditCounters {
    pub written: prometheus_client::metrics::counter::Counter,
    pub unrecorded: prometheus_client::metrics::counter::Counter,
}

/// The store's state as readiness reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StoreState {
    Ok,
    /// The last write failed, with the error.
    Failing(String),
}

impl Store {
    /// Opens (creating a SQLite file if needed) the database and applies the migrations.
    pub(crate) async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let open_error = |source| StoreError::Open {
            url: crate::options::redact_url(url),
            source,
        };
        let sqlite = url.starts_with("sqlite:");
        let postgres = url.starts_with("postgres:") || url.starts_with("postgresql:");
        if !sqlite && !postgres {
            return Err(StoreError::Open {
                url: crate::options::redact_url(url),
                source: sqlx::Error::Configuration(
                    "the database URL must start with sqlite: or postgres:".into(),
                ),
            });
        }
        let url = if sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
        } else {
            url.to_string()
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if sqlite {
                        // WAL lets the admin commands and the server share the file.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 5000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(open_error)?;
        if sqlite {
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        } else {
            sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        }
        let health = std::sync::Arc::new(audit::Health::default());
        let audit = audit::Audit::start(pool.clone(), sqlite, health.clone());
        Ok(Self {
            pool,
            audit,
            health,
        })
    }

    /// Whether the last write worked.
    pub(crate) fn state(&self) -> StoreState {
        if self.health.failing() {
            StoreState::Failing(self.health.last_error().unwrap_or_default())
        } else {
            StoreState::Ok
        }
    }

    /// Queues an audit row without waiting for the database; with `required`, refuses while
    /// the store is failing. See `audit`.
    pub(crate) fn record_ice_issuance(
        &self,
        row: IceIssuance,
        required: bool,
    ) -> Result<(), StoreError> {
        self.audit.record(row, required)
    }

    /// Writes every queued audit row, waiting at most `limit` (the audit's readers); says
    /// whether all were written.
    pub(crate) async fn flush(&self, limit: Duration) -> bool {
        self.audit.flush(limit).await
    }

    /// Has the audit write the rows earlier runs kept in `dir` (see `spill`) before new ones,
    /// and keep its own there if the store will not take them at the stop. Called once, as
    /// the server starts.
    pub(crate) fn recover_audit(&self, dir: &std::path::Path) {
        self.audit.recover(dir.to_path_buf());
    }

    /// The server stops: refuses audit rows from now on, waits at most `limit` for the store
    /// to take those it holds, and keeps the rest in a file in `keep_in`.
    pub(crate) async fn close_audit(
        &self,
        limit: Duration,
        keep_in: Option<std::path::PathBuf>,
    ) -> AuditClosed {
        self.audit.close(limit, keep_in).await
    }

    /// Audit rows queued or held, not yet written (for `/metrics`).
    pub(crate) fn audit_waiting(&self) -> usize {
        self.audit.waiting()
    }

    /// The audit's counters, shared with its writer: rows written, rows that could not be
    /// queued (for `/metrics`).
    pub(crate) fn audit_counters(&self) -> AuditCounters {
        AuditCounters {
            written: self.health.written.clone(),
            unrecorded: self.health.unrecorded.clone(),
        }
    }

    /// Adds a user; fails if the email is taken.
    pub async fn create_user(&self, user: &UserRecord) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO users (id, email, password_hash, roles, created_at, disabled_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&user.id)
            .bind(&user.email)
            .bind(&user.password_hash)
            .bind(user.roles.join(","))
            .bind(user.created_at)
            .bind(user.disabled_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn user_by_email(
        &self,
        email: &str,
    ) -> Result<Option<UserRecord>, StoreError> {
        let row: Option<UserRow> = sqlx::query_as("SELECT id, email, password_hash, roles, created_at, disabled_at FROM users WHERE email = $1")
            .bind(email)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(user_from_row))
    }

    pub(crate) async fn user_by_id(&self, id: &str) -> Result<Option<UserRecord>, StoreError> {
        let row: Option<UserRow> = sqlx::query_as("SELECT id, email, password_hash, roles, created_at, disabled_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(user_from_row))
    }

    pub(crate) async fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
        let rows: Vec<UserRow> = sqlx::query_as("SELECT id, email, password_hash, roles, created_at, disabled_at FROM users ORDER BY created_at, email")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(user_from_row).collect())
    }

    /// Whether any local account exists (the first run is over).
    pub(crate) async fn has_users(&self) -> Result<bool, StoreError> {
        let found: Option<(String,)> = sqlx::query_as("SELECT id FROM users LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    /// Ids of the disabled users.
    pub(crate) async fn disabled_user_ids(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT id FROM users WHERE disabled_at IS NOT NULL")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// Disables a user; false if there is no such email.
    pub async fn disable_user(&self, email: &str, at: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE users SET disabled_at = $1 WHERE email = $2")
            .bind(at)
            .bind(email)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Replaces a password hash; false if there is no such email.
    pub(crate) async fn set_password(
        &self,
        email: &str,
        password_hash: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE users SET password_hash = $1 WHERE email = $2")
            .bind(password_hash)
            .bind(email)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Records a revoked token (by its SHA-256) until it would have expired.
    pub(crate) async fn revoke_token(
        &self,
        token_sha256: &str,
        expires_at: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO revoked_tokens (token_sha256, revoked_at, expires_at) VALUES ($1, $2, $3) ON CONFLICT (token_sha256) DO NOTHING")
            .bind(token_sha256)
            .bind(now)
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Revoked tokens that have not expired yet.
    pub(crate) async fn revoked_tokens(&self, now: i64) -> Result<Vec<(String, i64)>, StoreError> {
        sqlx::query("DELETE FROM revoked_tokens WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT token_sha256, expires_at FROM revoked_tokens")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }

    /// Deletes the login keys that expired (finished or not).
    pub(crate) async fn delete_expired_login_keys(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM login_keys WHERE expires_at < $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    pub(crate) async fn create_login_key(
        &self,
        key: &LoginKey,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO login_keys (login_key, created_at, expires_at, workspace, token_expires_in) VALUES ($1, $2, $3, $4, $5)")
            .bind(&key.key)
            .bind(now)
            .bind(key.expires_at)
            .bind(&key.workspace)
            .bind(key.token_expires_in)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn login_key(&self, key: &str) -> Result<Option<LoginKey>, StoreError> {
        type Row = (
            String,
            i64,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<String>,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT login_key, expires_at, workspace, token_expires_in, token, user_id FROM login_keys WHERE login_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(
            |(key, expires_at, workspace, token_expires_in, token, user_id)| LoginKey {
                key,
                expires_at,
                workspace,
                token_expires_in,
                token,
                user_id,
            },
        ))
    }

    /// Completes a pending sign-in; false if the key is unknown or already used.
    pub(crate) async fn complete_login_key(
        &self,
        key: &str,
        token: &str,
        user_id: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE login_keys SET token = $1, user_id = $2 WHERE login_key = $3 AND token IS NULL",
        )
        .bind(token)
        .bind(user_id)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    pub(crate) async fn delete_login_key(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM login_keys WHERE login_key = $1")
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Lets the audit's readers see the rows this instance has queued (waits at most 2 s).
    async fn read_own_audit(&self) {
        self.flush(Duration::from_secs(2)).await;
    }

    /// Credentials issued per hour since `since` (seconds): the hour's start and the count,
    /// oldest first, hours without any left out.
    pub(crate) async fn ice_issuances_per_hour(
        &self,
        since: i64,
    ) -> Result<Vec<(i64, i64)>, StoreError> {
        self.read_own_audit().await;
        Ok(sqlx::query_as(
            "SELECT (issued_at / 3600) * 3600 AS hour, COUNT(*) FROM ice_credentials \
             WHERE issued_at >= $1 GROUP BY (issued_at / 3600) * 3600 ORDER BY hour",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Credentials issued since `since` (seconds) per user: the user id, the email of its
    /// local account if it has one, and the count, most first, at most `limit` users.
    pub(crate) async fn ice_issuances_by_user(
        &self,
        since: i64,
        limit: i64,
    ) -> Result<Vec<(String, Option<String>, i64)>, StoreError> {
        self.read_own_audit().await;
        Ok(sqlx::query_as(
            "SELECT c.user_id, u.email, COUNT(*) AS issued FROM ice_credentials c \
             LEFT JOIN users u ON u.id = c.user_id WHERE c.issued_at >= $1 \
             GROUP BY c.user_id, u.email ORDER BY issued DESC, c.user_id LIMIT $2",
        )
        .bind(since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The audited issuances of a user, newest first.
    #[cfg(test)]
    pub(crate) async fn ice_issuances(
        &self,
        user_id: &str,
        limit: i64,
    ) -> Result<Vec<IceIssuance>, StoreError> {
        self.read_own_audit().await;
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT user_id, issued_at, ttl, expires_at FROM ice_credentials WHERE user_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(IceIssuance::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn audit_rows_are_written() {
        let dir =
            std::env::temp_dir().join(format!("hypha-rtc-store-{}", crate::ids::random_id(8)));
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
        store.record_ice_issuance(row.clone(), true).unwrap();
        assert!(store.flush(Duration::from_secs(5)).await);
        assert_eq!(
            store.ice_issuances("u1", 10).await.unwrap(),
            vec![row.clone()]
        );
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
