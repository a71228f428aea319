-- The outbox claims a row with a lease, committed before the call to the outside, so no
-- transaction (nor connection) is held while the provider or Stripe answers; a dispatcher that
-- dies mid-call leaves a lease that runs out, and another takes the row up.
ALTER TABLE outbox ADD COLUMN claimed_until TIMESTAMPTZ NOT NULL DEFAULT '-infinity';
ALTER TABLE outbox ADD COLUMN created_at TIMESTAMPTZ NOT NULL DEFAULT now();
