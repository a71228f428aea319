//! The OpenAPI 3 description served at `/openapi.json`, generated from the handlers' annotations.

use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

/// An error (RFC 9457).
#[derive(Serialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// The field at fault, for a 422.
    pub field: Option<String>,
}

/// An amount as a string, at most 6 decimal places (`"25.00"`); never a JSON number.
#[derive(Serialize, ToSchema)]
#[schema(value_type = String, example = "25.00")]
pub struct Amount(pub String);

#[derive(Serialize, ToSchema)]
pub struct OpenAccount {
    pub name: String,
    pub email: String,
    #[schema(example = "AUD")]
    pub currency: String,
    #[schema(example = "AU")]
    pub country: String,
}

#[derive(Serialize, ToSchema)]
pub struct Account {
    pub id: uuid::Uuid,
    pub name: String,
    pub currency: String,
    pub country: String,
    pub balance: Amount,
    pub reserved: Amount,
    pub available: Amount,
    /// Hours the available balance lasts at the current hourly burn; null when nothing is billed.
    pub runway_hours: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct NewKey {
    #[schema(example = "customer")]
    pub role: String,
}

#[derive(Serialize, ToSchema)]
pub struct AmountRequest {
    pub amount: Amount,
}

#[derive(Serialize, ToSchema)]
pub struct Adjustment {
    /// Signed: a credit or a debit.
    pub amount: Amount,
    pub reason: String,
}

#[derive(Serialize, ToSchema)]
pub struct TopUp {
    pub topup_id: uuid::Uuid,
    pub checkout_url: String,
    pub amount: Amount,
    #[schema(example = "pending")]
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct PlaceOrder {
    #[schema(example = "vps-2g")]
    pub plan_id: String,
    #[schema(example = "syd")]
    pub location: String,
}

#[derive(Serialize, ToSchema)]
pub struct OrderAccepted {
    pub order_id: uuid::Uuid,
    pub server_id: uuid::Uuid,
    #[schema(example = "provisioning")]
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct Server {
    pub id: uuid::Uuid,
    pub account_id: uuid::Uuid,
    pub plan_id: String,
    pub location: String,
    /// provisioning, needs_setup, running, stopped, suspended, pending_cancellation, deleting, deleted, failed
    pub status: String,
    pub hostname: Option<String>,
    pub os_image: Option<String>,
    pub month_to_date_net: Amount,
}

#[derive(Serialize, ToSchema)]
pub struct Setup {
    #[schema(example = "debian-12")]
    pub os_image: String,
    #[schema(example = "web1.example.com")]
    pub hostname: String,
}

#[derive(Serialize, ToSchema)]
pub struct Power {
    /// boot, shutdown or reboot
    pub action: String,
}

#[derive(Serialize, ToSchema)]
pub struct Cancellation {
    /// grace (deletion in 30 days, revocable) or immediate (deletion in 5 minutes)
    pub mode: String,
}

#[derive(Serialize, ToSchema)]
pub struct Transaction {
    pub id: uuid::Uuid,
    pub position: i64,
    pub kind: String,
    pub amount: Amount,
    pub balance_after: Amount,
    pub occurred_at: String,
    pub server_id: Option<uuid::Uuid>,
    pub reference: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Page {
    pub items: Vec<serde_json::Value>,
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct InvoiceLine {
    pub description: String,
    pub server_id: Option<uuid::Uuid>,
    pub hours: Option<u32>,
    pub net: Amount,
    pub tax: Amount,
}

#[derive(Serialize, ToSchema)]
pub struct Invoice {
    pub id: uuid::Uuid,
    #[schema(example = "INV-2026-000001")]
    pub number: String,
    pub account_id: uuid::Uuid,
    pub period_start: String,
    pub period_end: String,
    pub lines: Vec<InvoiceLine>,
    pub net: Amount,
    pub tax: Amount,
    pub total: Amount,
    pub display: serde_json::Value,
    pub credit_notes: Vec<serde_json::Value>,
}

#[derive(Serialize, ToSchema)]
pub struct TrialBalanceLine {
    #[schema(example = "income:hosting")]
    pub account: String,
    pub debit: Amount,
    pub credit: Amount,
}

/// The books of one currency; its total debit equals its total credit.
#[derive(Serialize, ToSchema)]
pub struct CurrencyBooks {
    #[schema(example = "AUD")]
    pub currency: String,
    pub accounts: Vec<TrialBalanceLine>,
    pub total_debit: Amount,
    pub total_credit: Amount,
}

/// Journal totals per currency (amounts of different currencies are never added).
#[derive(Serialize, ToSchema)]
pub struct TrialBalance {
    pub as_of: Option<String>,
    pub currencies: Vec<CurrencyBooks>,
}

#[derive(Serialize, ToSchema)]
pub struct DevClock {
    /// RFC 3339; or send `advance_seconds` instead.
    pub now: Option<String>,
    pub advance_seconds: Option<i64>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Billing ledger API", version = "1", description = "Prepaid wallets and hourly VPS billing over an event-sourced ledger. Money is a string; errors are problem details."),
    paths(
        super::routes::healthz,
        super::routes::readyz,
        super::routes::metrics,
        super::routes::plans,
        super::routes::open_account,
        super::routes::search_accounts,
        super::routes::get_account,
        super::routes::create_api_key,
        super::routes::transactions,
        super::routes::account_servers,
        super::routes::get_server,
        super::routes::place_order,
        super::routes::request_topup,
        super::routes::account_invoices,
        super::routes::get_invoice,
        super::routes::stripe_webhook,
        super::routes::setup_server,
        super::routes::power_server,
        super::routes::cancel_server,
        super::routes::revoke_cancellation,
        super::routes::adjust,
        super::routes::credit_charge,
        super::routes::refund_topup,
        super::routes::projection_status,
        super::routes::rebuild_projection,
        super::routes::verify_ledger,
        super::routes::trial_balance,
        super::routes::ledger_events,
        super::routes::dev_clock,
        super::routes::resolve_held_payment,
    ),
    components(schemas(Problem, Amount, OpenAccount, Account, NewKey, AmountRequest, Adjustment, TopUp, PlaceOrder, OrderAccepted, Server, Setup, Power, Cancellation, Transaction, Page, InvoiceLine, Invoice, TrialBalanceLine, CurrencyBooks, TrialBalance, DevClock)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}
