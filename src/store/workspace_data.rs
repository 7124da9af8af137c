//! What the manager keeps per workspace: environment variables, logged events and service
//! types, as JSON text. Each table has a row cap per workspace that the caller passes in
//! (lower for temporary workspaces), checked before the write; rows of temporary workspaces
//! carry an expiry and are pruned by `delete_expired_workspace_data`.

use super::{Store, StoreError};

/// The outcome of a capped write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    Done,
    /// The key is taken (for tables that refuse duplicates).
    Exists,
    /// The workspace holds as many rows as its cap allows.
    Full,
}

impl Write {
    /// The outcome of an insert that skips a taken key, from the rows it wrote.
    pub(crate) fn inserted(rows: u64) -> Self {
        if rows == 0 {
            Write::Exists
        } else {
            Write::Done
        }
    }
}

/// A logged event, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct EventRow {
    pub id: i64,
    pub workspace: String,
    pub event_type: String,
    pub user_id: String,
    pub at_ms: i64,
    pub data: Option<String>,
}

/// Which events a query reads: one user's in one workspace, optionally by type and time.
#[derive(Debug, Clone)]
pub(crate) struct EventFilter<'a> {
    pub workspace: &'a str,
    pub user_id: &'a str,
    pub event_type: Option<&'a str>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
}

impl EventFilter<'_> {
    /// The WHERE clause and its bound values (`$1`..); the clause holds no caller text, only
    /// placeholders.
    fn clause(&self) -> (String, Vec<Bind>) {
        let mut clause = "workspace = $1 AND user_id = $2".to_string();
        let mut binds = vec![
            Bind::Text(self.workspace.to_string()),
            Bind::Text(self.user_id.to_string()),
        ];
        if let Some(t) = self.event_type {
            binds.push(Bind::Text(t.to_string()));
            clause.push_str(&format!(" AND event_type = ${}", binds.len()));
        }
        if let Some(s) = self.start_ms {
            binds.push(Bind::Int(s));
            clause.push_str(&format!(" AND at_ms >= ${}", binds.len()));
        }
        if let Some(e) = self.end_ms {
            binds.push(Bind::Int(e));
            clause.push_str(&format!(" AND at_ms <= ${}", binds.len()));
        }
        (clause, binds)
    }
}

enum Bind {
    Text(String),
    Int(i64),
}

fn bind_all<'q, O>(
    mut query: sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments>,
    binds: Vec<Bind>,
) -> sqlx::query::QueryAs<'q, sqlx::Any, O, sqlx::any::AnyArguments> {
    for b in binds {
        query = match b {
            Bind::Text(t) => query.bind(t),
            Bind::Int(i) => query.bind(i),
        };
    }
    query
}

impl Store {
    /// Sets (or with `None` deletes) an environment variable; `Full` when a new name would
    /// pass `max_names`.
    pub(crate) async fn set_env(
        &self,
        workspace: &str,
        name: &str,
        value: Option<&str>,
        expires_at: Option<i64>,
        max_names: i64,
    ) -> Result<Write, StoreError> {
        let Some(value) = value else {
            sqlx::query("DELETE FROM workspace_env WHERE workspace = $1 AND name = $2")
                .bind(workspace)
                .bind(name)
                .execute(&self.pool)
                .await?;
            return Ok(Write::Done);
        };
        let updated = sqlx::query(
            "UPDATE workspace_env SET value = $1, expires_at = $2 WHERE workspace = $3 AND name = $4",
        )
        .bind(value)
        .bind(expires_at)
        .bind(workspace)
        .bind(name)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() > 0 {
            return Ok(Write::Done);
        }
        if self.count("workspace_env", workspace).await? >= max_names {
            return Ok(Write::Full);
        }
        sqlx::query("INSERT INTO workspace_env (workspace, name, value, expires_at) VALUES ($1, $2, $3, $4) ON CONFLICT (workspace, name) DO UPDATE SET value = $3, expires_at = $4")
            .bind(workspace)
            .bind(name)
            .bind(value)
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(Write::Done)
    }

    /// The environment of a workspace, by name.
    pub(crate) async fn env(&self, workspace: &str) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT name, value FROM workspace_env WHERE workspace = $1 ORDER BY name",
        )
        .bind(workspace)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Records an event; `Full` when the workspace holds `max_rows` already.
    pub(crate) async fn log_event(
        &self,
        row: &EventRow,
        expires_at: Option<i64>,
        max_rows: i64,
    ) -> Result<Write, StoreError> {
        if self.count("workspace_events", &row.workspace).await? >= max_rows {
            return Ok(Write::Full);
        }
        sqlx::query("INSERT INTO workspace_events (workspace, event_type, user_id, at_ms, data, expires_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&row.workspace)
            .bind(&row.event_type)
            .bind(&row.user_id)
            .bind(row.at_ms)
            .bind(row.data.as_deref())
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(Write::Done)
    }

    /// The events a filter selects, oldest first, at most `limit`.
    pub(crate) async fn events(
        &self,
        filter: &EventFilter<'_>,
        limit: i64,
    ) -> Result<Vec<EventRow>, StoreError> {
        let (clause, mut binds) = filter.clause();
        binds.push(Bind::Int(limit));
        let sql = format!(
            "SELECT id, workspace, event_type, user_id, at_ms, data FROM workspace_events WHERE {clause} ORDER BY at_ms, id LIMIT ${}",
            binds.len()
        );
        Ok(bind_all(sqlx::query_as(sqlx::AssertSqlSafe(sql)), binds)
            .fetch_all(&self.pool)
            .await?)
    }

    /// How many events of each type a filter selects, by type.
    pub(crate) async fn event_counts(
        &self,
        filter: &EventFilter<'_>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let (clause, binds) = filter.clause();
        let sql = format!(
            "SELECT event_type, COUNT(*) FROM workspace_events WHERE {clause} GROUP BY event_type ORDER BY event_type"
        );
        Ok(bind_all(sqlx::query_as(sqlx::AssertSqlSafe(sql)), binds)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Adds a service type; `Exists` if the id is taken, `Full` past `max_types`.
    pub(crate) async fn add_service_type(
        &self,
        workspace: &str,
        id: &str,
        info: &str,
        expires_at: Option<i64>,
        max_types: i64,
    ) -> Result<Write, StoreError> {
        if self.count("service_types", workspace).await? >= max_types {
            return Ok(Write::Full);
        }
        let done = sqlx::query("INSERT INTO service_types (workspace, id, info, expires_at) VALUES ($1, $2, $3, $4) ON CONFLICT (workspace, id) DO NOTHING")
            .bind(workspace)
            .bind(id)
            .bind(info)
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(Write::inserted(done.rows_affected()))
    }

    /// The service types of a workspace (JSON), by id.
    pub(crate) async fn service_types(
        &self,
        workspace: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT id, info FROM service_types WHERE workspace = $1 ORDER BY id")
                .bind(workspace)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Deletes the rows of temporary workspaces whose time has passed.
    pub(crate) async fn delete_expired_workspace_data(&self, now: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for table in ["workspace_env", "workspace_events", "service_types"] {
            let sql =
                format!("DELETE FROM {table} WHERE expires_at IS NOT NULL AND expires_at < $1");
            deleted += sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(now)
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(deleted)
    }

    async fn count(&self, table: &'static str, workspace: &str) -> Result<i64, StoreError> {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE workspace = $1");
        let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(workspace)
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }
}
