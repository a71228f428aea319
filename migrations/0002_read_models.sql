-- Read models: projections of the log, in schema rm. Every table here is rebuildable from position 0;
-- a rebuild creates copies (LIKE ... INCLUDING ALL) in a side schema and swaps them in.
CREATE SCHEMA rm;

-- Status of each projection, for the admin API and `billing rebuild`.
CREATE TABLE projection_status (
    name            TEXT        NOT NULL PRIMARY KEY,
    generation      INTEGER     NOT NULL DEFAULT 1,
    rebuilding      BOOLEAN     NOT NULL DEFAULT FALSE,
    rebuild_position BIGINT     NOT NULL DEFAULT 0,
    rebuilt_at      TIMESTAMPTZ
);

-- balances: one row per account.
CREATE TABLE rm.balances (
    account_id          UUID        NOT NULL PRIMARY KEY,
    name                TEXT        NOT NULL,
    email               TEXT        NOT NULL,
    currency            TEXT        NOT NULL,
    country             TEXT        NOT NULL,
    balance             NUMERIC     NOT NULL,
    reserved            NUMERIC     NOT NULL,
    available           NUMERIC     NOT NULL,
    hourly_burn         NUMERIC     NOT NULL,
    low_balance_warned  BOOLEAN     NOT NULL,
    opened_at           TIMESTAMPTZ NOT NULL,
    position            BIGINT      NOT NULL
);
CREATE INDEX balances_name ON rm.balances (lower(name));
CREATE INDEX balances_email ON rm.balances (lower(email));

-- What the balances projection needs of servers to know the hourly burn.
CREATE TABLE rm.balance_servers (
    server_id    UUID    NOT NULL PRIMARY KEY,
    account_id   UUID    NOT NULL,
    provisioned  BOOLEAN NOT NULL,
    suspended    BOOLEAN NOT NULL,
    cancelled    BOOLEAN NOT NULL,
    deleted      BOOLEAN NOT NULL,
    hourly_gross NUMERIC NOT NULL
);
CREATE INDEX balance_servers_account ON rm.balance_servers (account_id);

-- statement: every money movement, with the balance after it.
CREATE TABLE rm.statement (
    event_id      UUID        NOT NULL PRIMARY KEY,
    position      BIGINT      NOT NULL,
    account_id    UUID        NOT NULL,
    kind          TEXT        NOT NULL,
    amount        NUMERIC     NOT NULL,
    balance_after NUMERIC     NOT NULL,
    occurred_at   TIMESTAMPTZ NOT NULL,
    server_id     UUID,
    reference     TEXT
);
CREATE INDEX statement_account_position ON rm.statement (account_id, position);

-- servers: the server view.
CREATE TABLE rm.servers (
    server_id                 UUID        NOT NULL PRIMARY KEY,
    account_id                UUID        NOT NULL,
    order_id                  UUID        NOT NULL,
    plan_id                   TEXT        NOT NULL,
    location                  TEXT        NOT NULL,
    status                    TEXT        NOT NULL,
    hostname                  TEXT,
    os_image                  TEXT,
    provider_server_id        TEXT,
    cancellation_mode         TEXT,
    cancellation_effective_at TIMESTAMPTZ,
    month                     TEXT,
    month_to_date_net         NUMERIC     NOT NULL,
    last_charged_slot         TIMESTAMPTZ,
    next_charge_at            TIMESTAMPTZ,
    created_at                TIMESTAMPTZ NOT NULL,
    state                     JSONB       NOT NULL
);
CREATE INDEX servers_account ON rm.servers (account_id);
CREATE INDEX servers_status ON rm.servers (status);

-- invoices and credit notes, as issued.
CREATE TABLE rm.invoices (
    invoice_id   UUID        NOT NULL PRIMARY KEY,
    number       TEXT        NOT NULL UNIQUE,
    account_id   UUID        NOT NULL,
    period_start TIMESTAMPTZ NOT NULL,
    period_end   TIMESTAMPTZ NOT NULL,
    currency     TEXT        NOT NULL,
    lines        JSONB       NOT NULL,
    taxes        JSONB       NOT NULL,
    net          NUMERIC     NOT NULL,
    tax          NUMERIC     NOT NULL,
    total        NUMERIC     NOT NULL,
    display      JSONB       NOT NULL,
    charge_ids   JSONB       NOT NULL,
    issued_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX invoices_account ON rm.invoices (account_id, period_start);

CREATE TABLE rm.credit_notes (
    credit_note_id UUID        NOT NULL PRIMARY KEY,
    number         TEXT        NOT NULL UNIQUE,
    invoice_id     UUID        NOT NULL,
    account_id     UUID        NOT NULL,
    charge_id      UUID        NOT NULL,
    reason         TEXT        NOT NULL,
    net            NUMERIC     NOT NULL,
    tax            NUMERIC     NOT NULL,
    total          NUMERIC     NOT NULL,
    display        JSONB       NOT NULL,
    issued_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX credit_notes_invoice ON rm.credit_notes (invoice_id);

-- journal: the postings of every money event, and totals per ledger account and day.
CREATE TABLE rm.journal_entries (
    event_id    UUID        NOT NULL PRIMARY KEY,
    position    BIGINT      NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    account_id  UUID        NOT NULL,
    postings    JSONB       NOT NULL
);
CREATE INDEX journal_entries_occurred ON rm.journal_entries (occurred_at);

CREATE TABLE rm.journal_totals (
    ledger_account TEXT    NOT NULL,
    day            DATE    NOT NULL,
    debit          NUMERIC NOT NULL,
    credit         NUMERIC NOT NULL,
    PRIMARY KEY (ledger_account, day)
);

CREATE TABLE rm.journal_accounts (
    account_id UUID NOT NULL PRIMARY KEY,
    country    TEXT NOT NULL
);

-- metrics: revenue per day (net of cancellation refunds), per currency.
CREATE TABLE rm.metrics_accounts (
    account_id UUID NOT NULL PRIMARY KEY,
    currency   TEXT NOT NULL
);

CREATE TABLE rm.metrics_revenue (
    day      DATE    NOT NULL,
    currency TEXT    NOT NULL,
    net      NUMERIC NOT NULL,
    tax      NUMERIC NOT NULL,
    PRIMARY KEY (day, currency)
);

GRANT USAGE ON SCHEMA rm TO billing_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA rm TO billing_app;
GRANT SELECT, INSERT, UPDATE ON projection_status TO billing_app;
