//! What a card processor's event does to the ledger: `handle_stripe_event` takes an event whose
//! signature the edge has checked and decides, from the log and the read models, which flow it
//! feeds (a paid checkout, a refund's outcome, a refund made at Stripe, a dispute), and answers
//! with a receipt. Every event is recorded once by its id, so a redelivery acts once.
//!
//! An event that names a payment this ledger does not know yet is refused (`NotYetKnown`): Stripe
//! delivers it again later, and events that arrive out of order lose nothing.

use adapters::stripe::webhook::{ChargeRefundedFacts, DisputeFacts, Event, RefundFacts};
use domain::{AccountId, Currency, DisputeId, Money, RefundId, ServerId, TopUpId};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::flows::{FlowError, Flows};
use crate::handler::{Metadata, StorageError};

/// What became of an event.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Receipt {
    pub received: bool,
    /// The event was received before; nothing more was done.
    pub duplicate: bool,
    /// For refund events: whether the event settled a refund this ledger asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acted_on: Option<bool>,
    /// For disputes: whether the disputed payment was matched to a top-up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<bool>,
}

impl Receipt {
    fn new(fresh: bool) -> Receipt {
        Receipt {
            received: true,
            duplicate: !fresh,
            acted_on: None,
            matched: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StripeEventError {
    /// The event is not shaped as its type says.
    #[error("{0}")]
    Malformed(String),
    /// The event names a payment not known yet; deliver it again later.
    #[error("{0}")]
    NotYetKnown(String),
    #[error(transparent)]
    Flow(#[from] FlowError),
}

impl From<sqlx::Error> for StripeEventError {
    fn from(error: sqlx::Error) -> StripeEventError {
        StripeEventError::Flow(FlowError::Storage(StorageError::Read(error)))
    }
}

type Result<T> = std::result::Result<T, StripeEventError>;

/// Acts on a Stripe event (its signature checked by the caller). `request_id` is the delivery's.
pub async fn handle_stripe_event(flows: &Flows, event: &Event, request_id: Option<String>) -> Result<Receipt> {
    if !adapters::stripe::webhook::valid_event_id(&event.id) {
        return Err(StripeEventError::Malformed("the event id is not a Stripe event id".into()));
    }
    let receipt = if let Some((closed, dispute)) = event.dispute() {
        dispute_event(flows, event, request_id, closed, dispute).await?
    } else if let Some(refund) = event.refund() {
        refund_event(flows, event, request_id, refund).await?
    } else if let Some(refunded) = event.charge_refunded() {
        charge_refunded_event(flows, event, request_id, refunded).await?
    } else {
        checkout_event(flows, event, request_id).await?
    };
    // The answer reflects what the event did.
    projections::runner::catch_up_all(flows.handler.log().pool())
        .await
        .map_err(FlowError::from)?;
    Ok(receipt)
}

/// The event's receipt: the stream it opens (once per event id), the metadata of what it causes,
/// and its payload (`detail`'s fields beside the event's own).
struct Delivery {
    stream: String,
    metadata: Metadata,
    payload: Value,
}

fn delivery(event: &Event, request_id: Option<String>, detail: Value) -> Delivery {
    let metadata = Metadata {
        actor_kind: "stripe".into(),
        actor_id: event.id.clone(),
        request_id,
        ..Default::default()
    };
    let mut payload = json!({"provider": "stripe", "event_id": event.id, "event_type": event.kind, "livemode": event.livemode});
    if let (Value::Object(payload), Value::Object(detail)) = (&mut payload, detail) {
        payload.extend(detail);
    }
    Delivery {
        stream: format!("stripe-event-{}", event.id),
        metadata,
        payload,
    }
}

/// A top-up as its stream in the log has it (an unknown one is empty); a failure to read is an
/// error (so the processor delivers its event again), never taken for an unknown top-up.
pub async fn load_topup(flows: &Flows, topup_id: TopUpId) -> std::result::Result<domain::topup::TopUp, FlowError> {
    Ok(flows
        .handler
        .load::<domain::topup::TopUp>(&topup_id.stream_id())
        .await
        .map_err(FlowError::from)?
        .state
        .as_ref()
        .clone())
}

/// `checkout.session.completed` (paid): the top-up it pays is credited, at most the amount asked
/// in the account's currency; anything else is recorded and acknowledged.
async fn checkout_event(flows: &Flows, event: &Event, request_id: Option<String>) -> Result<Receipt> {
    let paid = event.paid_checkout().and_then(|checkout| {
        let topup_id = TopUpId::parse(&checkout.topup_reference).ok()?;
        let stated = checkout.stated();
        Some((topup_id, checkout.payment_id, stated))
    });
    let delivery = delivery(event, request_id, json!({"acted_on": paid.is_some()}));
    let credited_account = match &paid {
        Some((topup_id, _, _)) => load_topup(flows, *topup_id).await?.requested.map(|requested| requested.account_id),
        None => None,
    };
    let fresh = flows
        .receive_payment_event(&delivery.stream, delivery.payload, paid, &delivery.metadata)
        .await?;
    // A top-up that makes a suspended server affordable resumes it now.
    if let (true, Some(account_id)) = (fresh, credited_account) {
        crate::workers::resume_affordable(flows, Some(account_id)).await?;
    }
    Ok(Receipt::new(fresh))
}

/// `refund.updated`: a refund this ledger asked for succeeded (done) or failed (the money goes
/// back to the wallet). A pending refund, or one this ledger did not start, is recorded only.
async fn refund_event(flows: &Flows, event: &Event, request_id: Option<String>, refund: RefundFacts) -> Result<Receipt> {
    let delivery = delivery(event, request_id, json!({"refund_status": refund.status}));
    let settled = match refund.status.as_str() {
        "succeeded" => Some(true),
        "failed" | "canceled" => Some(false),
        _ => None,
    };
    let refund_id = refund.refund_reference.as_deref().and_then(|text| RefundId::parse(text).ok());
    let topup_id = refund.topup_reference.as_deref().and_then(|text| TopUpId::parse(text).ok());
    let account_id = match topup_id {
        Some(topup_id) => load_topup(flows, topup_id).await?.requested.map(|requested| requested.account_id),
        None => None,
    };
    let (Some(settled), Some(refund_id), Some(account_id)) = (settled, refund_id, account_id) else {
        let fresh = flows
            .receive_payment_event(&delivery.stream, delivery.payload, None, &delivery.metadata)
            .await?;
        return Ok(Receipt {
            acted_on: Some(false),
            ..Receipt::new(fresh)
        });
    };
    let fresh = flows
        .receive_refund_event(
            &delivery.stream,
            delivery.payload,
            account_id,
            refund_id,
            settled,
            &delivery.metadata,
        )
        .await?;
    Ok(Receipt::new(fresh))
}

/// `charge.refunded`: Stripe's total refunded for a top-up's payment. Refunds this ledger asked
/// for are known already (their `refund.updated` settles them); any excess was refunded from
/// Stripe's dashboard and is recorded as a completed card refund. A payment held for review that
/// is refunded is recorded as returned, so it can no longer be accepted.
async fn charge_refunded_event(flows: &Flows, event: &Event, request_id: Option<String>, refunded: ChargeRefundedFacts) -> Result<Receipt> {
    let pool = flows.handler.log().pool().clone();
    let delivery = delivery(event, request_id, json!({"payment_id": refunded.payment_id}));
    let (Some(payment_id), Some(minor)) = (refunded.payment_id.as_deref(), refunded.amount_refunded_minor) else {
        return Err(StripeEventError::Malformed(
            "a charge.refunded event needs the charge's payment_intent and amount_refunded".into(),
        ));
    };
    let Some((account_id, topup_id)) = crate::reads::topup_settled_by(&pool, payment_id).await? else {
        if let Some(topup_id) = crate::reads::topup_held_for(&pool, payment_id).await? {
            let fresh = flows
                .receive_held_payment_returned(&delivery.stream, delivery.payload, topup_id, payment_id, &delivery.metadata)
                .await?;
            return Ok(Receipt::new(fresh));
        }
        return Err(StripeEventError::NotYetKnown(format!(
            "no top-up was paid by {payment_id} yet; deliver again later"
        )));
    };
    let account = crate::reads::account(&pool, account_id)
        .await?
        .ok_or(FlowError::NotFound("account"))?;
    let currency = Currency::parse(&account.currency).map_err(|error| FlowError::Invalid {
        field: "currency",
        reason: error.to_string(),
    })?;
    if let Some(code) = &refunded.currency {
        if !code.eq_ignore_ascii_case(currency.code()) {
            return Err(StripeEventError::Malformed(format!(
                "the charge is in {code}, the account in {}",
                currency.code()
            )));
        }
    }
    let total = Money::from_minor_units(minor, currency);
    let servers = crate::reads::billable_servers(&pool, account_id).await?;
    let fresh = flows
        .receive_charge_refunded_event(
            &delivery.stream,
            delivery.payload,
            account_id,
            topup_id,
            total.amount,
            &servers,
            &delivery.metadata,
        )
        .await?;
    Ok(Receipt::new(fresh))
}

/// `charge.dispute.*`: the funds the bank withdrew and reinstated so far, from the processor's
/// totals (the account decides what that changes); the account's servers are suspended while a
/// dispute holds funds, and resumed when the last one is settled.
async fn dispute_event(flows: &Flows, event: &Event, request_id: Option<String>, closed: bool, dispute: DisputeFacts) -> Result<Receipt> {
    let pool = flows.handler.log().pool().clone();
    let delivery = delivery(event, request_id, json!({"dispute": dispute.dispute_reference}));
    let paid = match &dispute.payment_id {
        Some(payment_id) => crate::reads::topup_settled_by(&pool, payment_id).await?,
        None => None,
    };
    let (Some((account_id, topup_id)), Some(payment_id)) = (paid, dispute.payment_id.clone()) else {
        if dispute.payment_id.is_some() {
            return Err(StripeEventError::NotYetKnown(
                "the disputed payment is not known yet; deliver the event again later".into(),
            ));
        }
        tracing::error!(event = %event.id, dispute = %dispute.dispute_reference, "a dispute without a payment intent cannot be matched to an account; recorded for review");
        let fresh = flows
            .receive_payment_event(&delivery.stream, delivery.payload, None, &delivery.metadata)
            .await?;
        return Ok(Receipt {
            matched: Some(false),
            ..Receipt::new(fresh)
        });
    };
    let currency = Currency::parse(&dispute.currency).map_err(|error| StripeEventError::Malformed(error.to_string()))?;
    let requested = load_topup(flows, topup_id).await?.requested.ok_or(FlowError::NotFound("top-up"))?;
    let (withdrawn_minor, reinstated_minor) = dispute.totals_minor(&event.kind);
    // Amounts are in the disputed charge's currency. Presented in another one (Adaptive Pricing),
    // the whole charge is disputed as a rule: its top-up's amount, in the account's currency.
    let in_account_currency = |minor: i64| {
        if currency == requested.currency {
            Money::from_minor_units(minor, currency).amount
        } else if minor > 0 {
            requested.amount
        } else {
            Decimal::ZERO
        }
    };
    let dispute_id = DisputeId(uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("stripe:{}", dispute.dispute_reference).as_bytes(),
    ));
    let servers = crate::reads::billable_servers(&pool, account_id).await?;
    let report = domain::AccountCommand::SyncDispute {
        dispute_id,
        payment_id,
        withdrawn_total: in_account_currency(withdrawn_minor),
        reinstated_total: in_account_currency(reinstated_minor),
        closed: closed.then_some(dispute.status == "won"),
    };
    // Settled, the servers suspended for disputes come back in the same append (each checked by
    // its own aggregate), unless another dispute still holds funds.
    let suspended: Vec<ServerId> = if closed {
        crate::reads::suspended_servers(&pool, Some(account_id), domain::server::SuspensionReason::Dispute.as_str())
            .await?
            .into_iter()
            .map(|(server_id, _)| server_id)
            .collect()
    } else {
        Vec::new()
    };
    let fresh = flows
        .receive_dispute_event(
            &delivery.stream,
            delivery.payload,
            account_id,
            report,
            &servers,
            &suspended,
            &delivery.metadata,
        )
        .await?;
    Ok(Receipt::new(fresh))
}

/// The account a top-up is for, if it is known.
pub async fn account_of_topup(flows: &Flows, topup_id: TopUpId) -> std::result::Result<Option<AccountId>, FlowError> {
    Ok(load_topup(flows, topup_id).await?.requested.map(|requested| requested.account_id))
}

/// Why a top-up could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TopUpError {
    /// No card processor is configured.
    #[error("card payments are not configured on this server (STRIPE_SECRET_KEY)")]
    Unconfigured,
    /// The amount is not a whole number of the currency's minor units.
    #[error("amount: {0}")]
    Amount(String),
    /// The processor did not answer; trying again may pass.
    #[error("the card processor did not answer; try again shortly")]
    Unavailable(String),
    /// The processor refused the checkout.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Flow(#[from] FlowError),
}

/// Starts a top-up of `amount` (in the account's currency): a checkout at the card processor,
/// recorded as requested; the wallet is credited when the processor reports the payment. Its id
/// derives from the request's idempotency key, so a repeat opens the same checkout.
pub async fn start_topup(
    flows: &Flows,
    gateway: Option<&dyn domain::payments::PaymentGateway>,
    account_id: AccountId,
    currency: Currency,
    amount: Decimal,
    metadata: &Metadata,
) -> std::result::Result<(TopUpId, String), TopUpError> {
    let amount_minor = Money::new(amount, currency)
        .and_then(|money| money.to_minor_units())
        .map_err(|error| TopUpError::Amount(error.to_string()))?;
    let gateway = gateway.ok_or(TopUpError::Unconfigured)?;
    let topup_id = TopUpId(metadata.id_for("topup"));
    let checkout = gateway
        .create_checkout(domain::payments::CheckoutRequest {
            topup_id,
            account_id,
            amount_minor,
            currency,
        })
        .await
        .map_err(|error| match error {
            domain::provider::ProviderError::Retryable(reason) => {
                tracing::warn!(%reason, "the card processor is unavailable");
                TopUpError::Unavailable(reason)
            }
            domain::provider::ProviderError::Permanent(reason) => {
                tracing::error!(%reason, "the card processor refused a checkout");
                TopUpError::Refused(reason)
            }
        })?;
    Ok(flows.request_topup(account_id, topup_id, amount, checkout.url, metadata).await?)
}
