-- The credential audit read by time (issuance per hour on the home page).
CREATE INDEX IF NOT EXISTS ice_credentials_time ON ice_credentials (issued_at);
