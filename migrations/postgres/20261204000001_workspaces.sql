-- Workspaces made with create_workspace: their description as JSON text (name, description,
-- owners, persistent, read_only, icon, covers, docs, config), who made them and when, and
-- when the row last changed (what other instances reload by); times in milliseconds.
-- A deleted workspace keeps its row with deleted_at set, so the grants tokens carried for it
-- stay void if the name is taken again; such rows are purged once no token can outlive them.
CREATE TABLE IF NOT EXISTS workspaces (
    id TEXT PRIMARY KEY,
    info TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    changed_at BIGINT NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX IF NOT EXISTS workspaces_by_change ON workspaces (changed_at);
CREATE INDEX IF NOT EXISTS workspaces_by_creator ON workspaces (created_by);
