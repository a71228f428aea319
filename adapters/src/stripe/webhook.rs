//! Stripe's webhooks: signatures (`Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of
//! "<t>.<raw body>">`, 300 s tolerance) and the events the ledger acts on. Amounts arrive in
//! minor units and are converted here, and only here.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

pub const TOLERANCE_SECONDS: i64 = 300;
pub const DEV_WEBHOOK_SECRET: &str = "whsec_dev";

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    Missing,
    #[error("the Stripe-Signature header is malformed")]
    Malformed,
    #[error("the signature's timestamp is more than {TOLERANCE_SECONDS} s from now")]
    Stale,
    #[error("no v1 signature matches the body")]
    Mismatch,
}

/// Checks `header` against the raw `body` at `now`.
pub fn verify(secret: &str, header: Option<&str>, body: &[u8], now: DateTime<Utc>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => timestamp = value.parse::<i64>().ok(),
            Some(("v1", value)) => signatures.push(hex::decode(value).map_err(|_| SignatureError::Malformed)?),
            Some(_) => {}
            None => return Err(SignatureError::Malformed),
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now.timestamp() - timestamp).abs() > TOLERANCE_SECONDS {
        return Err(SignatureError::Stale);
    }
    for signature in signatures {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(&signature).is_ok() {
            return Ok(());
        }
    }
    Err(SignatureError::Mismatch)
}

/// The `Stripe-Signature` header for `body` at `timestamp`, as Stripe computes it.
pub fn sign(secret: &str, body: &[u8], timestamp: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Clone, Debug, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub livemode: bool,
    pub data: EventData,
}

#[derive(Clone, Debug, Deserialize)]
pub struct EventData {
    pub object: Value,
}

/// What a paid Checkout Session tells the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaidCheckout {
    pub topup_reference: String,
    pub payment_id: String,
    /// The amounts the session states, in minor units with their currency: what the customer was
    /// presented (`amount_total`, `currency`) and, with Adaptive Pricing, what that settles in
    /// the currency the session was created in (`currency_conversion`).
    pub stated_minor: Vec<(i64, String)>,
}

impl PaidCheckout {
    /// The stated amounts as money; amounts in currencies this ledger does not know are left out.
    pub fn stated(&self) -> Vec<domain::Money> {
        self.stated_minor
            .iter()
            .filter_map(|(minor, code)| {
                let currency = domain::Currency::parse(code).ok()?;
                Some(domain::Money::from_minor_units(*minor, currency))
            })
            .collect()
    }
}

impl Event {
    /// A `checkout.session.completed` with `payment_status` `paid`, carrying our top-up id in
    /// `client_reference_id` or `metadata.topup_id`.
    pub fn paid_checkout(&self) -> Option<PaidCheckout> {
        if self.kind != "checkout.session.completed" {
            return None;
        }
        let session = &self.data.object;
        if session.get("payment_status").and_then(Value::as_str) != Some("paid") {
            return None;
        }
        let topup_reference = session
            .get("client_reference_id")
            .and_then(Value::as_str)
            .or_else(|| session.get("metadata").and_then(|m| m.get("topup_id")).and_then(Value::as_str))?
            .to_string();
        let payment_id = session
            .get("payment_intent")
            .and_then(|intent| {
                intent
                    .as_str()
                    .map(str::to_string)
                    .or_else(|| intent.get("id").and_then(Value::as_str).map(str::to_string))
            })
            .or_else(|| session.get("id").and_then(Value::as_str).map(str::to_string))?;
        let stated = |object: &Value, currency: &str| {
            Some((
                object.get("amount_total")?.as_i64()?,
                object.get(currency)?.as_str()?.to_ascii_uppercase(),
            ))
        };
        let stated_minor = [
            stated(session, "currency"),
            session
                .get("currency_conversion")
                .and_then(|conversion| stated(conversion, "source_currency")),
        ]
        .into_iter()
        .flatten()
        .collect();
        Some(PaidCheckout {
            topup_reference,
            payment_id,
            stated_minor,
        })
    }
}

/// What a dispute event tells the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DisputeFacts {
    pub dispute_reference: String,
    pub payment_id: Option<String>,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    /// Whether the dispute's balance transactions show its funds withdrawn, and given back;
    /// None when it lists none (then the status says: an inquiry, `warning_*`, withdraws nothing).
    pub withdrawn: Option<bool>,
    pub reinstated: Option<bool>,
}

impl DisputeFacts {
    /// The dispute's totals in minor units as of this event: (withdrawn, reinstated). Stripe
    /// withdraws and gives back the disputed amount whole; the balance transactions say which
    /// happened (their amounts are in the business's settlement currency, so only their signs
    /// are read).
    pub fn totals_minor(&self, kind: &str) -> (i64, i64) {
        let inquiry = self.status.starts_with("warning_");
        let withdrawn = match (kind, self.withdrawn) {
            ("charge.dispute.funds_withdrawn" | "charge.dispute.funds_reinstated", _) => true,
            (_, Some(withdrawn)) => withdrawn,
            (_, None) => !inquiry,
        };
        let reinstated = match (kind, self.reinstated) {
            ("charge.dispute.funds_reinstated", _) => true,
            (_, Some(reinstated)) => reinstated,
            ("charge.dispute.closed", None) => self.status == "won",
            _ => false,
        };
        let amount = |yes: bool| if yes { self.amount_minor } else { 0 };
        (amount(withdrawn), amount(reinstated && withdrawn))
    }
}

impl Event {
    /// A dispute event (`charge.dispute.created`, `.updated`, `.funds_withdrawn`,
    /// `.funds_reinstated`, `.closed`): whether it closes the dispute, and the dispute's facts.
    pub fn dispute(&self) -> Option<(bool, DisputeFacts)> {
        let closed = match self.kind.as_str() {
            "charge.dispute.created" | "charge.dispute.updated" | "charge.dispute.funds_withdrawn" | "charge.dispute.funds_reinstated" => {
                false
            }
            "charge.dispute.closed" => true,
            _ => return None,
        };
        let dispute = &self.data.object;
        let payment_id = dispute.get("payment_intent").and_then(|intent| {
            intent
                .as_str()
                .map(str::to_string)
                .or_else(|| intent.get("id").and_then(Value::as_str).map(str::to_string))
        });
        let movements: Vec<i64> = dispute
            .get("balance_transactions")
            .and_then(Value::as_array)
            .map(|transactions| {
                transactions
                    .iter()
                    .filter_map(|t| t.get("amount").and_then(Value::as_i64))
                    .collect()
            })
            .unwrap_or_default();
        let known = !movements.is_empty();
        Some((
            closed,
            DisputeFacts {
                dispute_reference: dispute.get("id")?.as_str()?.to_string(),
                payment_id,
                amount_minor: dispute.get("amount")?.as_i64()?,
                currency: dispute.get("currency")?.as_str()?.to_ascii_uppercase(),
                status: dispute.get("status").and_then(Value::as_str).unwrap_or_default().to_string(),
                withdrawn: known.then(|| movements.iter().any(|amount| *amount < 0)),
                reinstated: known.then(|| movements.iter().any(|amount| *amount > 0)),
            },
        ))
    }
}

/// What a refund event tells the ledger: our refund id (the metadata we send with it) and its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefundFacts {
    pub refund_reference: Option<String>,
    pub topup_reference: Option<String>,
    pub status: String,
}

impl Event {
    /// `refund.updated` (or `charge.refund.updated`) with our ids in its metadata.
    pub fn refund(&self) -> Option<RefundFacts> {
        if self.kind != "refund.updated" && self.kind != "charge.refund.updated" {
            return None;
        }
        let refund = &self.data.object;
        let metadata = refund.get("metadata");
        let text = |key: &str| metadata.and_then(|m| m.get(key)).and_then(Value::as_str).map(str::to_string);
        Some(RefundFacts {
            refund_reference: text("refund_id"),
            topup_reference: text("topup_id"),
            status: refund.get("status").and_then(Value::as_str).unwrap_or_default().to_string(),
        })
    }
}

/// What `charge.refunded` tells the ledger: the payment (PaymentIntent) and how much of it has
/// been refunded in all, in minor units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChargeRefundedFacts {
    pub payment_id: Option<String>,
    pub amount_refunded_minor: Option<i64>,
    pub currency: Option<String>,
}

impl Event {
    /// `charge.refunded`: a charge whose `amount_refunded` grew (by our refunds, or from the dashboard).
    pub fn charge_refunded(&self) -> Option<ChargeRefundedFacts> {
        if self.kind != "charge.refunded" {
            return None;
        }
        let charge = &self.data.object;
        Some(ChargeRefundedFacts {
            payment_id: charge.get("payment_intent").and_then(Value::as_str).map(str::to_string),
            amount_refunded_minor: charge.get("amount_refunded").and_then(Value::as_i64),
            currency: charge.get("currency").and_then(Value::as_str).map(str::to_string),
        })
    }
}

/// Stripe's event ids are short ASCII tokens; anything else is refused before it names a stream.
pub fn valid_event_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 100 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_fail_for_the_right_reasons() {
        let now = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let body = br#"{"id":"evt_1"}"#;
        let header = sign("whsec_test", body, now.timestamp());
        assert_eq!(verify("whsec_test", Some(&header), body, now), Ok(()));
        assert_eq!(verify("whsec_other", Some(&header), body, now), Err(SignatureError::Mismatch));
        assert_eq!(
            verify("whsec_test", Some(&header), br#"{"id":"evt_2"}"#, now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify("whsec_test", Some(&header), body, now + chrono::Duration::seconds(301)),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify("whsec_test", Some(&header), body, now + chrono::Duration::seconds(300)),
            Ok(())
        );
        assert_eq!(verify("whsec_test", None, body, now), Err(SignatureError::Missing));
        assert_eq!(verify("whsec_test", Some("garbage"), body, now), Err(SignatureError::Malformed));
        assert_eq!(verify("whsec_test", Some("t=1,v1=zz"), body, now), Err(SignatureError::Malformed));
        // Several v1 signatures (a secret being rolled): any one matching is enough.
        let rolled = format!(
            "{},v1={}",
            sign("whsec_old", body, now.timestamp()),
            &header.split("v1=").nth(1).unwrap()
        );
        assert_eq!(verify("whsec_test", Some(&rolled), body, now), Ok(()));
    }
}
