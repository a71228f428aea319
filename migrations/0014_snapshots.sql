-- Aggregate snapshots: an aggregate's state at a version of its stream, so a load reads the
-- snapshot and only the events after it. A snapshot is derived from the log and never the truth:
-- one of another shape (`kind` names the aggregate and its state's shape) is ignored, one whose
-- `event_hash` is not the hash of the stream's event at `stream_version` (a log restored without
-- it, a stream that never reached it) is ignored, and one missing or behind only means reading
-- more events.
CREATE TABLE snapshots (
    stream_id      text COLLATE "C" PRIMARY KEY,
    kind           text NOT NULL,
    stream_version bigint NOT NULL CHECK (stream_version > 0),
    event_hash     bytea NOT NULL CHECK (octet_length(event_hash) = 32),
    state          jsonb NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT now()
);
