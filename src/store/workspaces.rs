//! Workspaces made with `create_workspace`: one row each, kept after deletion as a tombstone
//! (so grants that tokens carried for the old workspace never count for a new one of the
//! same name), read back by every instance through the time each row last changed.

use super::workspace_data::Write;
use super::{Store, StoreError};

/// A workspace as stored. `info` is JSON text the caller validated.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub(crate) struct WorkspaceRow {
    pub id: String,
    pub info: String,
    pub created_by: String,
    /// Milliseconds since the epoch, as are the other times.
    pub created_at: i64,
    pub changed_at: i64,
    /// `None` while the workspace exists.
    pub deleted_at: Option<i64>,
}

/// The workspace data tables a deleted workspace is cleared from.
const DATA_TABLES: [&str; 3] = ["workspace_env", "workspace_events", "service_types"];

impl Store {
    /// How many workspaces `creator` made: those that exist, and all rows kept (deleted ones
    /// included, until they are purged).
    pub(crate) async fn workspaces_made_by(&self, creator: &str) -> Result<(i64, i64), StoreError> {
        Ok(sqlx::query_as(
            "SELECT COALESCE(SUM(CASE WHEN deleted_at IS NULL THEN 1 ELSE 0 END), 0), COUNT(*) \
             FROM workspaces WHERE created_by = $1",
        )
        .bind(creator)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Creates a workspace, or takes over a deleted one's name: `Exists` if a live workspace
    /// has the id.
    pub(crate) async fn create_workspace(&self, row: &WorkspaceRow) -> Result<Write, StoreError> {
        // One statement, so two instances creating the same name cannot both win.
        let done = sqlx::query(
            "INSERT INTO workspaces (id, info, created_by, created_at, changed_at, deleted_at) \
             VALUES ($1, $2, $3, $4, $5, NULL) \
             ON CONFLICT (id) DO UPDATE SET info = $2, created_by = $3, created_at = $4, \
             changed_at = $5, deleted_at = NULL WHERE workspaces.deleted_at IS NOT NULL",
        )
        .bind(&row.id)
        .bind(&row.info)
        .bind(&row.created_by)
        .bind(row.created_at)
        .bind(row.changed_at)
        .execute(&self.pool)
        .await?;
        Ok(Write::inserted(done.rows_affected()))
    }

    /// Replaces a live workspace's description (`overwrite=True` by one who may); `false`
    /// when it does not exist (any more).
    pub(crate) async fn update_workspace(
        &self,
        id: &str,
        info: &str,
        changed_at: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE workspaces SET info = $2, changed_at = $3 WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(info)
        .bind(changed_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Deletes a workspace and the data kept for it (environment, events, service types);
    /// `false` when it did not exist.
    pub(crate) async fn delete_workspace(
        &self,
        id: &str,
        at: i64,
        changed_at: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE workspaces SET deleted_at = $2, changed_at = $3 WHERE id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(at)
        .bind(changed_at)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        for table in DATA_TABLES {
            let sql = format!("DELETE FROM {table} WHERE workspace = $1");
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id)
                .execute(&self.pool)
                .await?;
        }
        Ok(true)
    }

    /// Rows changed at or after `since` (milliseconds), deleted ones included, oldest
    /// change first.
    pub(crate) async fn workspaces_changed_since(
        &self,
        since: i64,
    ) -> Result<Vec<WorkspaceRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT id, info, created_by, created_at, changed_at, deleted_at FROM workspaces \
             WHERE changed_at >= $1 ORDER BY changed_at, id",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Forgets deleted workspaces whose deletion is older than `before` (milliseconds): no token
    /// issued before it is still valid.
    pub(crate) async fn purge_deleted_workspaces(&self, before: i64) -> Result<u64, StoreError> {
        Ok(
            sqlx::query("DELETE FROM workspaces WHERE deleted_at IS NOT NULL AND deleted_at < $1")
                .bind(before)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
