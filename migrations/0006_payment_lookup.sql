-- Stripe's dispute and charge.refunded events name a payment (a PaymentIntent), not our top-up:
-- the top-up it paid is found through this index rather than a scan of the log.
CREATE INDEX events_topup_payment ON events ((payload->>'payment_id')) WHERE event_type = 'TopUpSettled';
