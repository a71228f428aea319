-- Upgrade note: processes of the previous version must be stopped before this runs (their writer
-- sends payloads in jsonb's binary form). The table is rewritten once, under an exclusive lock.
-- An event's payload and metadata are kept as the canonical JSON text the appender hashed
-- (`json`, which PostgreSQL only validates) rather than parsed into `jsonb` and rendered again on
-- every read: the appender's `COPY` no longer builds a jsonb tree per event, and loads, the
-- projectors and `verify` read the text as written. Events stored before keep jsonb's rendering
-- of the same values; their hashes are over the canonical text, which `verify` recomputes from
-- the parsed value either way. The log refuses a NUL character itself (`json` would store it,
-- and no `->>` could read it back), as `jsonb` did.
DROP INDEX IF EXISTS events_idempotency_key;
ALTER TABLE events
    ALTER COLUMN payload TYPE JSON USING payload::json,
    ALTER COLUMN metadata TYPE JSON USING metadata::json;
-- The partial index's predicate is evaluated for every event appended: a search of the
-- metadata's text, not a parse of its JSON. A row it admits without a key (the words in a value)
-- only has a NULL entry; a query names the same predicate so that the index serves it.
CREATE INDEX events_idempotency_key ON events ((metadata->>'idempotency_key'))
    WHERE metadata::text LIKE '%"idempotency_key"%';
-- The rewritten table and its rebuilt indexes get their statistics now, not at autovacuum's turn.
ANALYZE events;
