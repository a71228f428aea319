-- The servers read model carries what the billing run needs of a server, so that a run decides
-- from the read model's rows instead of folding every server's stream: the slot from which the
-- server may be billed (`Server::first_billable_slot`), and the version of its stream the row was
-- folded from. A run guards its append with that version, so a server whose stream moved since
-- is decided again from its stream. Rows stored before this migration have version 0 (unknown):
-- the run folds their streams, as before, until their next event or `billing rebuild servers`.
ALTER TABLE rm.servers
    ADD COLUMN version             BIGINT      NOT NULL DEFAULT 0,
    ADD COLUMN first_billable_slot TIMESTAMPTZ;
