//! Dev mode's card processor: Stripe's part played locally, over the same wire format.

use chrono::Utc;
use serde_json::Value;

use super::webhook::sign;

/// Dev mode's card processor: the checkout is the local page (`/dev/checkout/{topup_id}`, whose
/// button posts a signed `checkout.session.completed`), and a refund succeeds at once by a signed
/// `refund.updated` posted to this server's own webhook, as Stripe would send it.
pub struct DevGateway {
    pub public_url: String,
    pub webhook_secret: String,
    pub client: reqwest::Client,
}

impl domain::payments::PaymentGateway for DevGateway {
    fn create_checkout(
        &self,
        request: domain::payments::CheckoutRequest,
    ) -> domain::payments::PaymentFuture<'_, domain::payments::Checkout> {
        Box::pin(async move {
            Ok(domain::payments::Checkout {
                session_id: format!("cs_dev_{}", request.topup_id.0.simple()),
                url: format!("{}/dev/checkout/{}", self.public_url, request.topup_id),
            })
        })
    }

    fn refund(&self, request: domain::payments::RefundRequest) -> domain::payments::PaymentFuture<'_, domain::payments::MadeRefund> {
        Box::pin(async move {
            let stripe_refund_id = format!("re_dev_{}", request.refund_id.0.simple());
            let refund = serde_json::json!({
                "id": stripe_refund_id,
                "object": "refund",
                "amount": request.amount_minor,
                "currency": request.currency.code().to_ascii_lowercase(),
                "payment_intent": request.payment_id,
                "metadata": {"refund_id": request.refund_id.to_string(), "topup_id": request.topup_id.to_string()},
                "status": "succeeded"
            });
            post_dev_event(&self.client, &self.public_url, &self.webhook_secret, "refund.updated", refund)
                .await
                .map_err(domain::provider::ProviderError::Retryable)?;
            // Its outcome is the webhook just delivered.
            Ok(domain::payments::MadeRefund {
                id: stripe_refund_id,
                status: domain::payments::RefundStatus::Pending,
            })
        })
    }
}

/// Posts `object` to this server's own webhook as Stripe would: in an event of type `kind`,
/// signed with `secret` now. Dev mode's stand-in for Stripe's deliveries.
pub async fn post_dev_event(client: &reqwest::Client, public_url: &str, secret: &str, kind: &str, object: Value) -> Result<(), String> {
    let now = Utc::now().timestamp();
    let event = serde_json::json!({
        "id": format!("evt_dev_{}", uuid::Uuid::new_v4().simple()),
        "object": "event",
        "api_version": "2024-06-20",
        "created": now,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": kind,
        "data": {"object": object}
    });
    let body = serde_json::to_vec(&event).expect("an event serialises");
    let response = client
        .post(format!("{public_url}/v1/webhooks/stripe"))
        .header("content-type", "application/json")
        .header("stripe-signature", sign(secret, &body, now))
        .body(body)
        .send()
        .await
        .map_err(|error| error.to_string())?;
    if !response.status().is_success() {
        return Err(format!("the webhook answered {}", response.status()));
    }
    Ok(())
}
