-- One row per get_rtc_ice_servers issuance: who, when, for how long. Never the credential.
CREATE TABLE IF NOT EXISTS ice_credentials (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    ttl BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS ice_credentials_user ON ice_credentials (user_id, issued_at);
