//! Stripe with async-stripe: a Checkout Session per top-up (the amount in minor units, our top-up
//! id as `client_reference_id` and in the metadata, an idempotency key derived from the top-up
//! id) and refunds of the PaymentIntent that paid a top-up (our refund and top-up ids in the
//! metadata, an idempotency key derived from the refund id). `STRIPE_API_BASE` points the client
//! elsewhere (a test double at Stripe's HTTP boundary).

pub mod dev;
pub mod webhook;

use std::collections::HashMap;
use std::time::Duration;

use domain::payments::{Checkout, CheckoutRequest, MadeRefund, PaymentError, PaymentFuture, PaymentGateway, RefundRequest, RefundStatus};
use stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionLineItemsPriceData, CreateCheckoutSessionPaymentIntentData,
    ProductData,
};

#[derive(Clone, Debug)]
pub struct StripeConfig {
    pub secret_key: String,
    /// Stripe's API base (`https://api.stripe.com/`) unless pointed elsewhere.
    pub api_base: Option<String>,
    /// Where Checkout sends the customer back: `{CHECKOUT_SESSION_ID}` is Stripe's placeholder.
    pub success_url: String,
    pub cancel_url: String,
    pub timeout: Duration,
}

pub struct StripeGateway {
    client: stripe::Client,
    config: StripeConfig,
}

impl StripeGateway {
    pub fn new(config: StripeConfig) -> Result<StripeGateway, String> {
        let mut builder = stripe::ClientBuilder::new(config.secret_key.clone()).timeout(config.timeout);
        if let Some(base) = &config.api_base {
            // The client appends `v1/...` to the base.
            let base = if base.ends_with('/') { base.clone() } else { format!("{base}/") };
            builder = builder.url(base);
        }
        let client = builder.build().map_err(|error| error.to_string())?;
        Ok(StripeGateway { client, config })
    }
}

fn key(text: String) -> Result<RequestStrategy, PaymentError> {
    IdempotencyKey::new(text)
        .map(RequestStrategy::Idempotent)
        .map_err(|error| PaymentError::Permanent(error.to_string()))
}

/// Stripe's answers sorted as the provider's are: throttling, conflicts of concurrent idempotent
/// requests, 5xx and the network are worth retrying; other refusals are not.
fn classify(error: StripeError) -> PaymentError {
    match error {
        StripeError::Stripe(errors, status) => {
            let detail = format!("Stripe answered {status}: {}", errors.message.as_deref().unwrap_or("no message"));
            if status == 409 || status == 429 || status >= 500 {
                PaymentError::Retryable(detail)
            } else {
                PaymentError::Permanent(detail)
            }
        }
        StripeError::Timeout | StripeError::ClientError(_) => PaymentError::Retryable(format!("Stripe unreachable: {error}")),
        StripeError::JSONDeserialize(_) | StripeError::ConfigError(_) => PaymentError::Permanent(error.to_string()),
    }
}

impl PaymentGateway for StripeGateway {
    fn create_checkout(&self, request: CheckoutRequest) -> PaymentFuture<'_, Checkout> {
        Box::pin(async move {
            let currency: stripe_types::Currency = request
                .currency
                .code()
                .to_ascii_lowercase()
                .parse()
                .unwrap_or_else(|never| match never {});
            let metadata = HashMap::from([
                ("topup_id".to_string(), request.topup_id.to_string()),
                ("account_id".to_string(), request.account_id.to_string()),
            ]);
            let mut price = CreateCheckoutSessionLineItemsPriceData::new(currency);
            price.unit_amount = Some(request.amount_minor);
            price.product_data = Some(ProductData::new("Wallet top-up"));
            let mut line = CreateCheckoutSessionLineItems::new();
            line.price_data = Some(price);
            line.quantity = Some(1);
            let mut payment_intent = CreateCheckoutSessionPaymentIntentData::new();
            payment_intent.metadata = Some(metadata.clone());
            let session = CreateCheckoutSession::new()
                .mode(stripe_checkout::CheckoutSessionMode::Payment)
                .client_reference_id(request.topup_id.to_string())
                .metadata(metadata)
                .line_items(vec![line])
                .payment_intent_data(payment_intent)
                .success_url(self.config.success_url.clone())
                .cancel_url(self.config.cancel_url.clone())
                .customize()
                .request_strategy(key(format!("topup-{}", request.topup_id))?)
                .send(&self.client)
                .await
                .map_err(classify)?;
            let url = session
                .url
                .ok_or_else(|| PaymentError::Permanent(format!("Stripe's checkout session {} has no url", session.id)))?;
            Ok(Checkout {
                session_id: session.id.to_string(),
                url,
            })
        })
    }

    fn refund(&self, request: RefundRequest) -> PaymentFuture<'_, MadeRefund> {
        Box::pin(async move {
            let metadata = HashMap::from([
                ("refund_id".to_string(), request.refund_id.to_string()),
                ("topup_id".to_string(), request.topup_id.to_string()),
            ]);
            let refund = stripe_core::refund::CreateRefund::new()
                .payment_intent(request.payment_id.clone())
                .amount(request.amount_minor)
                .metadata(metadata)
                .customize()
                .request_strategy(key(format!("refund-{}", request.refund_id))?)
                .send(&self.client)
                .await
                .map_err(classify)?;
            Ok(MadeRefund {
                id: refund.id.to_string(),
                status: RefundStatus::parse(refund.status.as_deref()),
            })
        })
    }
}
