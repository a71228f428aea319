-- Every change to an API key (a revocation, or any other update or deletion, by the product or by
-- hand) is announced on `billing_api_keys` with the key's token hash, in the changing
-- transaction: processes that keep grants in memory drop the key as it commits.
CREATE FUNCTION announce_api_key_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('billing_api_keys', encode(OLD.token_sha256, 'hex'));
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_announce_change AFTER UPDATE OR DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION announce_api_key_change();
