-- People who sign in to the portal and the console: an email, a role (and a customer's
-- account), and a password set through a one-time link (argon2id, never stored in the clear).
-- Sessions are kept by the SHA-256 of their cookie; links by the SHA-256 of their token.
CREATE TABLE people (
    person_id       UUID        NOT NULL PRIMARY KEY,
    email           TEXT        NOT NULL UNIQUE,
    role            TEXT        NOT NULL CHECK (role IN ('customer', 'finance', 'admin')),
    account_id      UUID,
    password_hash   TEXT,
    failed_attempts INT         NOT NULL DEFAULT 0,
    locked_until    TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((role = 'customer') = (account_id IS NOT NULL))
);

CREATE TABLE person_links (
    token_sha256 BYTEA       NOT NULL PRIMARY KEY,
    person_id    UUID        NOT NULL REFERENCES people,
    purpose      TEXT        NOT NULL CHECK (purpose IN ('invitation', 'reset')),
    expires_at   TIMESTAMPTZ NOT NULL,
    used_at      TIMESTAMPTZ
);

CREATE TABLE sessions (
    session_sha256 BYTEA       NOT NULL PRIMARY KEY,
    person_id      UUID        NOT NULL REFERENCES people,
    csrf_token     TEXT        NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    last_seen_at   TIMESTAMPTZ NOT NULL,
    ended_at       TIMESTAMPTZ
);
CREATE INDEX sessions_person ON sessions (person_id);

GRANT SELECT, INSERT, UPDATE ON people, person_links, sessions TO billing_app;
