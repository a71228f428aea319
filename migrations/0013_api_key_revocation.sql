-- API keys get an id to be named by (the token's hash is never shown) and can be revoked: a
-- revoked key stays, for the record, and answers 401.
ALTER TABLE api_keys ADD COLUMN key_id UUID NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE api_keys ADD COLUMN revoked_at TIMESTAMPTZ;
CREATE UNIQUE INDEX api_keys_id ON api_keys (key_id);
GRANT UPDATE (revoked_at) ON api_keys TO billing_app;
