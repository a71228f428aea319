-- Months whose invoices have all been issued: the due work looks for a month's invoices once,
-- after its last slot is billed, instead of scanning the read models every run.
CREATE TABLE invoiced_periods (
    period       TEXT        NOT NULL PRIMARY KEY,
    completed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT ON invoiced_periods TO billing_app;
