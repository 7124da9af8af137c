-- Local users. Passwords only as argon2 hashes (with their random salt).
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    roles TEXT NOT NULL DEFAULT '',
    created_at BIGINT NOT NULL,
    disabled_at BIGINT
);

-- Revoked tokens, by SHA-256 of the token; kept until the token would have expired anyway.
CREATE TABLE IF NOT EXISTS revoked_tokens (
    token_sha256 TEXT PRIMARY KEY,
    revoked_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- Pending sign-ins of the hypha-login flow; they survive a restart and expire.
CREATE TABLE IF NOT EXISTS login_keys (
    login_key TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    workspace TEXT,
    token_expires_in BIGINT,
    token TEXT,
    user_id TEXT
);
