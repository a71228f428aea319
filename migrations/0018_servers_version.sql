-- Upgrade note: processes of the previous version must be stopped before this runs (an old
-- projector would move rows without these columns).
-- The servers read model carries what the billing run needs of a server, so that a run decides
-- from the read model's rows instead of folding every server's stream: the slot from which the
-- server may be billed (`Server::first_billable_slot`), and the version of its stream the row was
-- folded from. A run guards its append with that version, so a server whose stream moved since
-- is decided again from its stream. A row with version 0 (unknown) is folded from its stream.
ALTER TABLE rm.servers
    ADD COLUMN version             BIGINT      NOT NULL DEFAULT 0,
    ADD COLUMN first_billable_slot TIMESTAMPTZ;

-- Rows stored before: the version of the stream up to the read model's checkpoint (the row holds
-- every event up to it and none after), and the first billable slot as the domain works it out
-- from the folded state: while billable, the hour in which the server last became billable (or
-- was provisioned).
UPDATE rm.servers s SET
    version = coalesce((
        SELECT max(e.stream_version) FROM events e
        WHERE e.stream_id = 'server-' || s.server_id::text
          AND e.position <= (SELECT position FROM checkpoints WHERE name = 'servers')
    ), 0),
    first_billable_slot = CASE WHEN s.billable THEN
        date_trunc('hour', coalesce((s.state->>'billable_since')::timestamptz, (s.state->>'provisioned_at')::timestamptz)
                           AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    END;
