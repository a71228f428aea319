//! The OpenAPI 3.1 document served at `/openapi.json`: the paths from the handlers' annotations,
//! the schemas from the wire types (`types`). What every operation may answer besides its own
//! outcomes is added here, in one place, from what the operation takes: a problem for a missing or
//! bad token (401, 403), an unknown id (404), a body that is malformed (400), too large (413), not
//! JSON (415) or invalid (422), a query that does not fit (422), a busy or unreachable database
//! (503), and for creating POSTs the `Idempotency-Key` header's own answers (409, 422) and, for
//! top-ups and orders, the rate limit (429).

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::OpenApi;

use super::types;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Billing ledger API",
        version = "1",
        description = "Prepaid wallets and hourly VPS billing over an event-sourced, hash-chained ledger. Money is a decimal string; errors are RFC 9457 problem details."
    ),
    paths(
        super::system::healthz,
        super::system::readyz,
        super::system::metrics,
        super::servers::plans,
        super::accounts::open_account,
        super::accounts::search_accounts,
        super::accounts::get_account,
        super::accounts::create_api_key,
        super::accounts::transactions,
        super::servers::account_servers,
        super::servers::place_order,
        super::servers::get_server,
        super::servers::setup_server,
        super::servers::power_server,
        super::servers::cancel_server,
        super::servers::revoke_cancellation,
        super::payments::request_topup,
        super::payments::stripe_webhook,
        super::payments::refund_topup,
        super::payments::resolve_held_payment,
        super::invoices::account_invoices,
        super::invoices::get_invoice,
        super::admin::adjust,
        super::admin::credit_charge,
        super::admin::list_keys,
        super::admin::revoke_key,
        super::admin::projection_status,
        super::admin::rebuild_projection,
        super::ledger::ledger_events,
        super::ledger::trial_balance,
        super::ledger::verify_ledger,
        super::dev::dev_clock,
        super::dev::dev_clock_now,
    ),
    components(schemas(super::error::Problem, types::Money)),
    modifiers(&BearerAuth, &Answers),
    tags(
        (name = "accounts", description = "Accounts, balances, keys and statements"),
        (name = "servers", description = "Plans, deploy orders and servers"),
        (name = "payments", description = "Top-ups, the card processor's webhook and card refunds"),
        (name = "invoices", description = "Monthly invoices and credit notes"),
        (name = "admin", description = "Corrections and read-model upkeep"),
        (name = "ledger", description = "The audit stream, trial balance and verification"),
        (name = "operations", description = "Health, readiness and metrics"),
        (name = "dev", description = "Dev mode only"),
    )
)]
struct ApiDoc;

/// The document; the dev routes are in it only in dev mode (elsewhere they do not exist).
pub fn document(dev: bool) -> utoipa::openapi::OpenApi {
    let mut document = ApiDoc::openapi();
    if !dev {
        document.paths.paths.retain(|path, _| !path.starts_with("/v1/dev/"));
    }
    document
}

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

struct Answers;

/// Paths whose POSTs create nothing: webhooks carry their own ids, dev routes are tools.
fn creates(path: &str) -> bool {
    !path.starts_with("/v1/webhooks/") && !path.starts_with("/v1/dev/")
}

impl utoipa::Modify for Answers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let has_path_id = path.contains('{');
            let operations = [
                (&mut item.get, false),
                (&mut item.post, true),
                (&mut item.delete, false),
                (&mut item.put, false),
                (&mut item.patch, false),
            ];
            for (operation, is_post) in operations {
                let Some(operation) = operation.as_mut() else { continue };
                add_answers(operation, path, has_path_id, is_post && creates(path));
            }
        }
    }
}

fn add_answers(operation: &mut Operation, path: &str, has_path_id: bool, creates: bool) {
    let secured = operation.security.as_ref().is_some_and(|security| !security.is_empty());
    let has_query = operation
        .parameters
        .as_ref()
        .is_some_and(|parameters| parameters.iter().any(|parameter| parameter.parameter_in == ParameterIn::Query));
    let has_body = operation.request_body.is_some();
    let mut answers: Vec<(&str, &str)> = vec![("503", "the database is unavailable, or the request took too long; try again")];
    if secured {
        answers.push(("401", "no token, or an unknown one"));
        answers.push(("403", "the token's role may not do this"));
    }
    if has_path_id {
        answers.push(("404", "no such object, or another account's"));
    }
    if has_body {
        answers.push(("400", "malformed JSON"));
        answers.push(("413", "the body is larger than 64 KiB"));
        answers.push(("415", "the body is not JSON"));
    }
    if has_body || has_query || creates {
        answers.push(("422", "a field is invalid: `field` names it"));
    }
    if creates {
        answers.push(("409", "a request with this Idempotency-Key is still running"));
        if path.ends_with("/topups") || path.ends_with("/orders") {
            answers.push(("429", "too many top-ups or orders from this token; see Retry-After"));
        }
        // The header is described rather than declared: a declared header is a field any client
        // generator fills at random, and one key sent with two different requests is refused.
        let note = "Send an `Idempotency-Key` header (1 to 255 visible characters) to make the request safe to retry: a repeat with the same key gets the first answer (kept 24 hours at least); the same key with another request is a 422.";
        operation.description = Some(match operation.description.take() {
            Some(description) => format!("{description}\n\n{note}"),
            None => note.to_string(),
        });
    }
    for (status, description) in answers {
        operation.responses.responses.entry(status.to_string()).or_insert_with(|| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/problem+json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build(),
                )
                .build()
                .into()
        });
    }
}
