-- orders: deploy orders and how they ended, so placed orders whose saga was interrupted are found
-- and resumed.
CREATE TABLE rm.orders (
    order_id   UUID        NOT NULL PRIMARY KEY,
    account_id UUID        NOT NULL,
    server_id  UUID        NOT NULL,
    plan_id    TEXT        NOT NULL,
    location   TEXT        NOT NULL,
    status     TEXT        NOT NULL,
    placed_at  TIMESTAMPTZ NOT NULL,
    ended_at   TIMESTAMPTZ
);
CREATE INDEX orders_placed ON rm.orders (placed_at) WHERE status = 'placed';
GRANT SELECT, INSERT, UPDATE, DELETE ON rm.orders TO billing_app;
