-- The journal keeps every ledger account per currency: amounts of different currencies are never
-- added. Its tables are made anew with a currency on every posting and total, and its checkpoint
-- goes back to 0, so it is rebuilt from the log when the projectors next run.
DROP TABLE rm.journal_entries;
DROP TABLE rm.journal_totals;
DROP TABLE rm.journal_accounts;

CREATE TABLE rm.journal_entries (
    event_id    UUID        NOT NULL PRIMARY KEY,
    position    BIGINT      NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    account_id  UUID        NOT NULL,
    -- [{account, currency, debit, credit}]
    postings    JSONB       NOT NULL
);
CREATE INDEX journal_entries_occurred ON rm.journal_entries (occurred_at);

CREATE TABLE rm.journal_totals (
    ledger_account TEXT    NOT NULL,
    currency       TEXT    NOT NULL,
    day            DATE    NOT NULL,
    debit          NUMERIC NOT NULL,
    credit         NUMERIC NOT NULL,
    PRIMARY KEY (ledger_account, currency, day)
);

CREATE TABLE rm.journal_accounts (
    account_id UUID NOT NULL PRIMARY KEY,
    country    TEXT NOT NULL,
    currency   TEXT NOT NULL
);

GRANT SELECT, INSERT, UPDATE, DELETE ON rm.journal_entries, rm.journal_totals, rm.journal_accounts TO billing_app;
UPDATE checkpoints SET position = 0, updated_at = now() WHERE name = 'journal';
