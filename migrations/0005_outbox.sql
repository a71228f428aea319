-- The outbox: what must be told to the outside for events of the log, one row per event: the VPS
-- provider (build, power, suspend, unsuspend, delete of a server) and the card processor (a card
-- refund). Rows are taken from the log after `outbox_head.position` in the same transaction that
-- moves the head, so every such event gets exactly one row; a dispatcher claims rows with
-- FOR UPDATE SKIP LOCKED, so two instances never send the same row at once. Not a read model:
-- rebuilds leave it alone (replaying history must not replay calls to the outside).
CREATE TABLE outbox_head (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    position  BIGINT  NOT NULL
);
-- A database that already has history starts after it: those events were acted on when they happened.
INSERT INTO outbox_head (position) SELECT position FROM ledger_head WHERE singleton;

CREATE TABLE outbox (
    position        BIGINT      NOT NULL PRIMARY KEY,
    target          TEXT        NOT NULL CHECK (target IN ('provider', 'payments')),
    -- What the calls are about, in order: a server, or a card refund.
    subject         UUID        NOT NULL,
    action          JSONB       NOT NULL,
    status          TEXT        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed')),
    attempts        INTEGER     NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error      TEXT,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_pending ON outbox (subject, position) WHERE status = 'pending';
GRANT SELECT, INSERT, UPDATE ON outbox, outbox_head TO billing_app;
