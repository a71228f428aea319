-- API keys: random bearer tokens, stored as their SHA-256 only, each with a role.
CREATE TABLE api_keys (
    token_sha256 BYTEA       NOT NULL PRIMARY KEY CHECK (octet_length(token_sha256) = 32),
    role         TEXT        NOT NULL CHECK (role IN ('customer', 'finance', 'admin')),
    account_id   UUID,
    label        TEXT        NOT NULL DEFAULT '',
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((role = 'customer') = (account_id IS NOT NULL))
);

-- Stored responses of creating POSTs, by caller and Idempotency-Key.
CREATE TABLE idempotency_keys (
    caller       TEXT        NOT NULL,
    key          TEXT        NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    request_hash BYTEA       NOT NULL,
    status       INTEGER,
    body         JSONB,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (caller, key)
);

GRANT SELECT, INSERT ON api_keys TO billing_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys TO billing_app;
