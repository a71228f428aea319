-- Upgrade note: processes of the previous version must be stopped before this runs (an old
-- projector would write servers without these columns); or rebuild the servers read model after
-- (`billing rebuild servers`).
-- The servers read model carries the domain's answers as columns, so that no query reads the
-- aggregate's serialized state: billable now (`Server::is_billable`), and why and since when a
-- suspended server is suspended (`Server::suspension`).
ALTER TABLE rm.servers
    ADD COLUMN billable          BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN suspension_reason TEXT,
    ADD COLUMN suspended_at      TIMESTAMPTZ;

UPDATE rm.servers SET
    billable          = status IN ('needs_setup', 'running', 'stopped'),
    suspension_reason = CASE WHEN status = 'suspended' THEN state->'suspended'->>0 END,
    suspended_at      = CASE WHEN status = 'suspended' THEN (state->'suspended'->>1)::timestamptz END;

CREATE INDEX servers_due ON rm.servers (next_charge_at) WHERE billable;
CREATE INDEX servers_suspended ON rm.servers (suspension_reason) WHERE suspension_reason IS NOT NULL;
