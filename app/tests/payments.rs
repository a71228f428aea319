//! Stripe's events decided without HTTP (`app::payments::handle_stripe_event`), from payloads
//! shaped like Stripe's own (fixtures/stripe): what each event does to the wallet, once.

use std::sync::Arc;

use adapters::stripe::webhook::Event;
use app::flows::Flows;
use app::handler::{CommandHandler, Metadata};
use app::payments::{handle_stripe_event, StripeEventError};
use chrono::{DateTime, Utc};
use domain::catalog::Fixtures;
use domain::{AccountId, Country, Currency, ManualClock, TopUpId};
use ledger::testing::TestDatabase;
use ledger::{EventLog, LogConfig};
use rust_decimal_macros::dec;
use serde_json::{json, Value};

fn fixture(name: &str) -> Value {
    let path = format!("{}/../fixtures/stripe/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Stripe's event envelope around `object`, as its webhook delivers it.
fn event(id: &str, kind: &str, object: Value) -> Event {
    let mut event = fixture("event");
    event["id"] = json!(id);
    event["type"] = json!(kind);
    event["data"] = json!({"object": object});
    serde_json::from_value(event).unwrap()
}

fn paid_checkout(topup_id: TopUpId, payment_id: &str, amount_minor: i64, currency: &str) -> Value {
    let mut session = fixture("checkout_session");
    session["amount_total"] = json!(amount_minor);
    session["currency"] = json!(currency);
    session["client_reference_id"] = json!(topup_id.to_string());
    session["metadata"] = json!({"topup_id": topup_id.to_string()});
    session["payment_intent"] = json!(payment_id);
    session["payment_status"] = json!("paid");
    session["status"] = json!("complete");
    session["currency_conversion"] = Value::Null;
    session
}

fn refunded_charge(payment_id: &str, refunded_minor: i64, currency: &str) -> Value {
    let mut charge = fixture("charge");
    charge["payment_intent"] = json!(payment_id);
    charge["amount_refunded"] = json!(refunded_minor);
    charge["currency"] = json!(currency);
    charge["refunded"] = json!(true);
    charge
}

async fn balance(flows: &Flows, account_id: AccountId) -> rust_decimal::Decimal {
    app::reads::account(flows.handler.log().pool(), account_id)
        .await
        .unwrap()
        .unwrap()
        .balance
}

#[tokio::test]
async fn a_paid_checkout_credits_once_and_a_refund_of_an_unknown_payment_waits_until_it_is_known() {
    let db = TestDatabase::new().await;
    let start: DateTime<Utc> = "2027-03-01T10:00:00Z".parse().unwrap();
    let flows = Flows::new(CommandHandler::new(
        EventLog::open(db.pool.clone(), LogConfig::default()).await.unwrap(),
        Arc::new(ManualClock::new(start)),
    ));
    let admin = Metadata::actor("admin", "test");
    let fixtures = Fixtures::parse(include_str!("../../fixtures/plans.toml"), include_str!("../../fixtures/tax.toml")).unwrap();
    flows.sync_catalog(fixtures, &admin).await.unwrap();
    let account_id = AccountId::new();
    flows
        .open_account(
            account_id,
            "Payer",
            "payer@example.com",
            Currency::parse("AUD").unwrap(),
            Country::parse("AU").unwrap(),
            &admin,
        )
        .await
        .unwrap();
    let topup_id = TopUpId::new();
    flows
        .request_topup(account_id, topup_id, dec!(25.00), "https://checkout.example/pay".into(), &admin)
        .await
        .unwrap();

    // A refund of the payment arriving before the payment itself: refused, so Stripe sends it again.
    let early_refund = event("evt_1EarlyRefund", "charge.refunded", refunded_charge("pi_1Paid", 500, "aud"));
    assert!(matches!(
        handle_stripe_event(&flows, &early_refund, None).await,
        Err(StripeEventError::NotYetKnown(_))
    ));

    let paid = event(
        "evt_1Paid",
        "checkout.session.completed",
        paid_checkout(topup_id, "pi_1Paid", 2_500, "aud"),
    );
    let receipt = handle_stripe_event(&flows, &paid, None).await.unwrap();
    assert!(!receipt.duplicate);
    assert_eq!(balance(&flows, account_id).await, dec!(25.00));
    // Delivered again: acknowledged, nothing more.
    assert!(handle_stripe_event(&flows, &paid, None).await.unwrap().duplicate);
    assert_eq!(balance(&flows, account_id).await, dec!(25.00));

    // Delivered again now that the payment is known: 5.00 refunded from Stripe's dashboard.
    let receipt = handle_stripe_event(&flows, &early_refund, None).await.unwrap();
    assert!(!receipt.duplicate);
    assert_eq!(balance(&flows, account_id).await, dec!(20.00));

    // A refund in another currency than the payment's is malformed, and moves nothing.
    let odd = event("evt_1OddRefund", "charge.refunded", refunded_charge("pi_1Paid", 700, "usd"));
    assert!(matches!(
        handle_stripe_event(&flows, &odd, None).await,
        Err(StripeEventError::Malformed(_))
    ));
    assert_eq!(balance(&flows, account_id).await, dec!(20.00));

    // An event id that is not Stripe's never names a stream.
    let forged = event(
        "evt_1/../../account",
        "checkout.session.completed",
        paid_checkout(topup_id, "pi_1Paid", 2_500, "aud"),
    );
    assert!(matches!(
        handle_stripe_event(&flows, &forged, None).await,
        Err(StripeEventError::Malformed(_))
    ));
}
