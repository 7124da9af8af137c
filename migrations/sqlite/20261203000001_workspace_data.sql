-- Per-workspace data the manager keeps (get_env/set_env, log_event/get_events, service types).
-- Values are JSON text. Rows of temporary (anonymous) workspaces carry expires_at and are
-- pruned after it; rows of other workspaces have none.
CREATE TABLE IF NOT EXISTS workspace_env (
    workspace TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    expires_at BIGINT,
    PRIMARY KEY (workspace, name)
);

CREATE TABLE IF NOT EXISTS workspace_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    workspace TEXT NOT NULL,
    event_type TEXT NOT NULL,
    user_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    data TEXT,
    expires_at BIGINT
);
CREATE INDEX IF NOT EXISTS workspace_events_by_user ON workspace_events (workspace, user_id, at_ms);

CREATE TABLE IF NOT EXISTS service_types (
    workspace TEXT NOT NULL,
    id TEXT NOT NULL,
    info TEXT NOT NULL,
    expires_at BIGINT,
    PRIMARY KEY (workspace, id)
);
