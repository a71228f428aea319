-- The append-only event log. Positions are assigned by the appender while it holds the lock on the
-- single ledger_head row, never by a sequence, so transactions commit in position order and a reader
-- of `position > checkpoint` can never see a later position before an earlier one.
CREATE TABLE events (
    position        BIGINT      NOT NULL PRIMARY KEY CHECK (position > 0),
    stream_id       TEXT        COLLATE "C" NOT NULL CHECK (length(stream_id) BETWEEN 1 AND 200),
    stream_version  BIGINT      NOT NULL CHECK (stream_version > 0),
    event_id        UUID        NOT NULL,
    event_type      TEXT        COLLATE "C" NOT NULL CHECK (length(event_type) BETWEEN 1 AND 200),
    schema_version  INTEGER     NOT NULL CHECK (schema_version > 0),
    payload         JSONB       NOT NULL,
    metadata        JSONB       NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    prev_hash       BYTEA       NOT NULL CHECK (octet_length(prev_hash) = 32),
    hash            BYTEA       NOT NULL CHECK (octet_length(hash) = 32),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

-- The head of the chain: the last position and its hash. Locking this row serialises appenders
-- across every process; it is a cache of the last event that `verify` checks against the log.
CREATE TABLE ledger_head (
    singleton BOOLEAN     NOT NULL PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    position  BIGINT      NOT NULL CHECK (position >= 0),
    hash      BYTEA       NOT NULL CHECK (octet_length(hash) = 32)
);
INSERT INTO ledger_head (singleton, position, hash) VALUES (TRUE, 0, decode(repeat('00', 32), 'hex'));

-- Append-only, enforced by the database for every role, superusers included: statement-level
-- triggers fire even when no row matches.
CREATE FUNCTION events_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on events is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'correct a mistake by appending a correcting event';
END
$$;
CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_reject_change();

-- Projector checkpoints: a projector updates its row in the same transaction as its read-model rows.
CREATE TABLE checkpoints (
    name       TEXT        NOT NULL PRIMARY KEY,
    position   BIGINT      NOT NULL CHECK (position >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The application role need not own the log: it may read and append, nothing else.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'billing_app') THEN
        CREATE ROLE billing_app NOLOGIN;
    END IF;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;
GRANT SELECT, INSERT ON events TO billing_app;
GRANT SELECT, UPDATE ON ledger_head TO billing_app;
GRANT SELECT, INSERT, UPDATE ON checkpoints TO billing_app;
