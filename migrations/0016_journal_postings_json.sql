-- A journal entry's postings are kept as the JSON text the projection wrote (`json`, which
-- PostgreSQL only validates) rather than parsed into `jsonb`: the entries are only ever read
-- whole or expanded by `json_to_recordset`, and a rebuild streams a million of them in. The
-- journal is projected anew from the log, so every entry's text is written the one way.
TRUNCATE rm.journal_entries, rm.journal_totals, rm.journal_accounts;
ALTER TABLE rm.journal_entries ALTER COLUMN postings TYPE JSON USING postings::json;
UPDATE checkpoints SET position = 0, updated_at = now() WHERE name = 'journal';
