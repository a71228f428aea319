-- Idempotency keys are claimed with a lease: a request that died without answering leaves a claim
-- that a retry takes over once the lease has run out. Keys expire after a retention (by created_at).
ALTER TABLE idempotency_keys ADD COLUMN claimed_until TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- A request's effect is found in the log by its key (scoped to its caller), which every event it
-- appends carries in its metadata: a command retried with the same key does not act twice.
CREATE INDEX events_idempotency_key ON events ((metadata->>'idempotency_key')) WHERE metadata ? 'idempotency_key';
