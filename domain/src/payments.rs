//! The port to the card payment processor. The domain names what it needs; `adapters` implements
//! it (Stripe), and dev mode answers it locally.

use crate::money::Currency;
use crate::provider::ProviderError;
use crate::types::{AccountId, RefundId, TopUpId};

/// A hosted payment page for a top-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckoutRequest {
    pub topup_id: TopUpId,
    pub account_id: AccountId,
    /// The amount in the currency's minor units.
    pub amount_minor: i64,
    pub currency: Currency,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkout {
    /// The processor's id for the session.
    pub session_id: String,
    /// Where the customer pays.
    pub url: String,
}

/// Money back to the card that paid a top-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefundRequest {
    pub refund_id: RefundId,
    pub topup_id: TopUpId,
    /// The processor's id of the payment (a PaymentIntent).
    pub payment_id: String,
    pub amount_minor: i64,
    pub currency: Currency,
}

/// The same classification as the provider's: retry what may pass, give up on refusals.
pub type PaymentError = ProviderError;

pub type PaymentFuture<'a, T> = crate::provider::ProviderFuture<'a, T>;

pub trait PaymentGateway: Send + Sync {
    /// Opens a checkout for a top-up. Asking twice for the same top-up gives the same session.
    fn create_checkout(&self, request: CheckoutRequest) -> PaymentFuture<'_, Checkout>;

    /// Asks for a refund. Asking twice for the same refund id makes one refund. Returns the
    /// processor's refund and its status: most card refunds succeed at once; a pending one's
    /// outcome arrives later as a `refund.updated` webhook.
    fn refund(&self, request: RefundRequest) -> PaymentFuture<'_, MadeRefund>;
}

/// A refund the processor made (or is making).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MadeRefund {
    /// The processor's id for it.
    pub id: String,
    pub status: RefundStatus,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefundStatus {
    Succeeded,
    /// Pending, or requiring action: its outcome comes later.
    Pending,
    Failed,
}

impl RefundStatus {
    /// Stripe's refund status (`succeeded`, `pending`, `requires_action`, `failed`, `canceled`).
    pub fn parse(status: Option<&str>) -> RefundStatus {
        match status {
            Some("succeeded") => RefundStatus::Succeeded,
            Some("failed" | "canceled") => RefundStatus::Failed,
            _ => RefundStatus::Pending,
        }
    }
}
