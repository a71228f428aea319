-- Upgrade note: processes of the previous version must be stopped before this runs (an old
-- projector would write postings as jsonb renders them, an old journal rebuild would swap in a
-- jsonb column, and old readers expand postings with jsonb_to_recordset).
-- A journal entry's postings are kept as the JSON text the projection wrote (`json`, which
-- PostgreSQL only validates) rather than parsed into `jsonb`: they are only read whole or
-- expanded by `json_to_recordset`, and a rebuild streams a million of them in. The entries
-- already there keep jsonb's rendering of the same values (`billing verify` compares them as
-- jsonb) until the journal is next rebuilt (`billing rebuild journal`), which writes every
-- entry's text the one way; the journal keeps serving meanwhile.
ALTER TABLE rm.journal_entries ALTER COLUMN postings TYPE JSON USING postings::json;
