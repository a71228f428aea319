//! A top-up: requested (with its checkout), then paid once. The wallet is credited only when the
//! payment provider says it was paid, never on the customer's redirect.

use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, DomainEvent};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::{Currency, Money};
use crate::types::{AccountId, TopUpId};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum TopUpEvent {
    TopUpRequested {
        topup_id: TopUpId,
        account_id: AccountId,
        amount: Decimal,
        currency: Currency,
        checkout_url: String,
        at: DateTime<Utc>,
    },
    TopUpPaid {
        payment_id: String,
        at: DateTime<Utc>,
    },
    /// Paid, but not the amount asked in the account's currency: recorded for a person to
    /// review, and nothing is credited.
    PaymentHeldForReview {
        payment_id: String,
        /// The amounts the payment states (in what it was presented and what it settled), if any.
        stated: Vec<Money>,
        at: DateTime<Utc>,
    },
    /// A held payment was refunded at the card processor: nothing was credited, and it can no
    /// longer be accepted.
    HeldPaymentReturned {
        payment_id: String,
        at: DateTime<Utc>,
    },
    /// A person reviewed a held payment and accepted it for `amount` in the account's currency
    /// (never more than was asked): the top-up is paid by it, and the wallet credited that.
    HeldPaymentAccepted {
        payment_id: String,
        amount: Decimal,
        reason: String,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for TopUpEvent {
    fn event_type(&self) -> String {
        match self {
            TopUpEvent::TopUpRequested { .. } => "TopUpRequested",
            TopUpEvent::TopUpPaid { .. } => "TopUpPaid",
            TopUpEvent::PaymentHeldForReview { .. } => "PaymentHeldForReview",
            TopUpEvent::HeldPaymentAccepted { .. } => "HeldPaymentAccepted",
            TopUpEvent::HeldPaymentReturned { .. } => "HeldPaymentReturned",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TopUpCommand {
    Request {
        topup_id: TopUpId,
        account_id: AccountId,
        amount: Decimal,
        currency: Currency,
        checkout_url: String,
        at: DateTime<Utc>,
    },
    /// A payment of the top-up, stating the amounts it was made in. It pays the top-up only if
    /// one of them is exactly the amount asked, in the currency asked: the wallet is never
    /// credited more than was asked, nor in another currency. Any other payment is held for
    /// review. Idempotent for the same payment; another payment of a paid top-up is refused.
    MarkPaid {
        payment_id: String,
        stated: Vec<Money>,
        at: DateTime<Utc>,
    },
    /// The held payment `payment_id` was refunded at the processor. Idempotent.
    ReturnHeld { payment_id: String, at: DateTime<Utc> },
    /// Accepts the held payment for `amount` (at most the amount asked).
    AcceptHeld {
        amount: Decimal,
        reason: String,
        at: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TopUpError {
    #[error("the top-up already exists")]
    AlreadyRequested,
    #[error("no such top-up")]
    NotFound,
    #[error("the top-up was already paid by {0}")]
    PaidElsewhere(String),
    #[error("the top-up has no payment held for review")]
    NothingHeld,
    #[error("amount: {amount} is not more than zero and at most the {asked} asked")]
    AmountNotAsked { amount: Decimal, asked: Decimal },
    #[error("reason: is required (1 to 500 characters)")]
    NoReason,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TopUp {
    pub requested: Option<Requested>,
    pub paid_by: Option<String>,
    /// A payment held for review (another amount or currency).
    #[serde(default)]
    pub held: Option<String>,
    /// A held payment refunded at the processor.
    #[serde(default)]
    pub returned: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Requested {
    pub topup_id: TopUpId,
    pub account_id: AccountId,
    pub amount: Decimal,
    pub currency: Currency,
    pub checkout_url: String,
}

impl TopUp {
    fn decide(&self, command: TopUpCommand) -> Result<Vec<TopUpEvent>, TopUpError> {
        match command {
            TopUpCommand::Request {
                topup_id,
                account_id,
                amount,
                currency,
                checkout_url,
                at,
            } => {
                if self.requested.is_some() {
                    return Err(TopUpError::AlreadyRequested);
                }
                Ok(vec![TopUpEvent::TopUpRequested {
                    topup_id,
                    account_id,
                    amount,
                    currency,
                    checkout_url,
                    at,
                }])
            }
            TopUpCommand::MarkPaid { payment_id, stated, at } => {
                let requested = self.requested.as_ref().ok_or(TopUpError::NotFound)?;
                match &self.paid_by {
                    Some(paid_by) if *paid_by == payment_id => return Ok(vec![]),
                    Some(paid_by) => return Err(TopUpError::PaidElsewhere(paid_by.clone())),
                    None => {}
                }
                if self.held.as_deref() == Some(payment_id.as_str()) || self.returned.as_deref() == Some(payment_id.as_str()) {
                    return Ok(vec![]);
                }
                let asked = Money {
                    amount: requested.amount,
                    currency: requested.currency,
                };
                if stated
                    .iter()
                    .any(|money| money.currency == asked.currency && money.amount == asked.amount)
                {
                    Ok(vec![TopUpEvent::TopUpPaid { payment_id, at }])
                } else {
                    Ok(vec![TopUpEvent::PaymentHeldForReview { payment_id, stated, at }])
                }
            }
            TopUpCommand::ReturnHeld { payment_id, at } => {
                self.requested.as_ref().ok_or(TopUpError::NotFound)?;
                if self.returned.as_deref() == Some(payment_id.as_str()) {
                    return Ok(vec![]);
                }
                if self.paid_by.is_some() || self.held.as_deref() != Some(payment_id.as_str()) {
                    return Err(TopUpError::NothingHeld);
                }
                Ok(vec![TopUpEvent::HeldPaymentReturned { payment_id, at }])
            }
            TopUpCommand::AcceptHeld { amount, reason, at } => {
                let requested = self.requested.as_ref().ok_or(TopUpError::NotFound)?;
                let payment_id = match (&self.paid_by, &self.held) {
                    (None, Some(held)) => held.clone(),
                    _ => return Err(TopUpError::NothingHeld),
                };
                if amount <= Decimal::ZERO || amount > requested.amount || amount.normalize().scale() > 6 {
                    return Err(TopUpError::AmountNotAsked {
                        amount,
                        asked: requested.amount,
                    });
                }
                let reason = reason.trim().to_string();
                if reason.is_empty() || reason.len() > 500 {
                    return Err(TopUpError::NoReason);
                }
                Ok(vec![TopUpEvent::HeldPaymentAccepted {
                    payment_id,
                    amount,
                    reason,
                    at,
                }])
            }
        }
    }
}

impl Aggregate for TopUp {
    const TYPE: &'static str = "topup";
    type Command = TopUpCommand;
    type Event = TopUpEvent;
    type Error = TopUpError;
    type Services = ();

    async fn handle(&mut self, command: TopUpCommand, _: &(), sink: &cqrs_es::event_sink::EventSink<Self>) -> Result<(), TopUpError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: TopUpEvent) {
        match event {
            TopUpEvent::TopUpRequested {
                topup_id,
                account_id,
                amount,
                currency,
                checkout_url,
                ..
            } => {
                self.requested = Some(Requested {
                    topup_id,
                    account_id,
                    amount,
                    currency,
                    checkout_url,
                });
            }
            TopUpEvent::TopUpPaid { payment_id, .. } => self.paid_by = Some(payment_id),
            TopUpEvent::PaymentHeldForReview { payment_id, .. } => self.held = Some(payment_id),
            TopUpEvent::HeldPaymentAccepted { payment_id, .. } => self.paid_by = Some(payment_id),
            TopUpEvent::HeldPaymentReturned { payment_id, .. } => {
                self.held = None;
                self.returned = Some(payment_id);
            }
        }
    }
}
