//! The console's upkeep and corrections: the audit stream (filters, CSV and JSONL export) for
//! finance and admins; for admins, corrections of a wallet (adjustments, service credits against
//! a charge, card refunds of a top-up), each shown with its effect before it is made and kept with
//! its reason; invitations; API keys (listed, created, revoked); and the read models (status,
//! lag, rebuild with its progress, refreshed in place by htmx).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use domain::AccountId;
use maud::html;
use rust_decimal::Decimal;
use serde::Deserialize;

use app::people::{Role, Session};

use super::auth::{check_csrf, unavailable, Staff};
use super::layout::{api_money, derived_money, page, status_page};
use crate::http::error::ApiError;
use crate::http::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console/audit", get(audit))
        .route("/console/audit/export", get(audit_export))
        .route("/console/accounts/{id}/corrections", post(correct))
        .route("/console/accounts/{id}/adjustments", post(correct))
        .route("/console/people", get(people_page).post(invite))
        .route("/console/keys", get(keys_page).post(create_key))
        .route("/console/keys/{id}/revocation", post(revoke_key))
        .route("/console/projections", get(projections_page))
        .route("/console/projections/{name}/rebuild", post(rebuild))
}

/// Admins only; anyone else on the staff gets a 403 page.
fn admin(session: &Session) -> Result<(), Response> {
    if session.role == Role::Admin {
        Ok(())
    } else {
        Err(status_page(
            StatusCode::FORBIDDEN,
            "Not allowed",
            "Only an admin does this.",
            Some(session),
        ))
    }
}

fn refused(session: &Session, error: impl Into<ApiError>) -> Response {
    let error: ApiError = error.into();
    if error.status.is_server_error() {
        return unavailable(&error.detail);
    }
    status_page(error.status, error.title, &error.detail, Some(session))
}

// --- The audit stream ---------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct AuditQuery {
    /// One stream (`account-<id>`, `server-<id>`, `catalog`, ...).
    stream: Option<String>,
    /// One event type (`HourCharged`, `TopUpSettled`, ...).
    #[serde(rename = "type")]
    event_type: Option<String>,
    /// Events after this position.
    after: Option<i64>,
    /// For the export: where it starts and ends (a position or an RFC 3339 instant of recording).
    from: Option<String>,
    to: Option<String>,
    format: Option<String>,
}

fn given(text: &Option<String>) -> Option<&str> {
    text.as_deref().map(str::trim).filter(|text| !text.is_empty())
}

impl AuditQuery {
    fn filters(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in [("stream", &self.stream), ("type", &self.event_type)] {
            if let Some(value) = given(value) {
                query.append_pair(name, value);
            }
        }
        query.finish()
    }
}

/// Rows the audit page shows at once.
const AUDIT_PAGE: u32 = 50;

async fn audit(State(state): State<AppState>, Staff(session): Staff, Query(query): Query<AuditQuery>) -> Response {
    let events = match app::reads::events(
        &state.pool,
        given(&query.stream),
        given(&query.event_type),
        query.after.unwrap_or(0).max(0),
        AUDIT_PAGE,
    )
    .await
    {
        Ok(events) => events,
        Err(error) => return unavailable(error),
    };
    let filters = query.filters();
    let body = html! {
        p class="muted" { "Every event of the log in position order, with its hash. Each position opens the event, its hash recomputed." }
        form class="filters" method="get" action="/console/audit" hx-get="/console/audit" hx-trigger="change" hx-target="#audit" hx-select="#audit" hx-swap="outerHTML" hx-push-url="true" {
            label { "Stream" input type="text" name="stream" placeholder="account-…" value=(given(&query.stream).unwrap_or_default()); }
            label { "Event type" input type="text" name="type" placeholder="HourCharged" value=(given(&query.event_type).unwrap_or_default()); }
            label { "After position" input type="number" min="0" name="after" value=(query.after.unwrap_or(0)); }
            button type="submit" { "Show" }
        }
        div id="audit" {
            form class="filters" method="get" action="/console/audit/export" {
                input type="hidden" name="stream" value=(given(&query.stream).unwrap_or_default());
                input type="hidden" name="type" value=(given(&query.event_type).unwrap_or_default());
                label { "Export from (position or instant)" input type="text" name="from" placeholder="1"; }
                label { "to" input type="text" name="to" placeholder="2026-03-31T23:59:59Z"; }
                label { "Format" select name="format" { option value="csv" { "CSV" } option value="jsonl" { "JSONL" } } }
                button type="submit" { "Export" }
            }
            @if events.items.is_empty() { p class="muted" { "No events match." } }
            @else { div class="table" { table {
                thead { tr { th { "Position" } th { "Recorded (UTC)" } th { "Stream" } th { "Type" } th { "Hash" } } }
                tbody { @for event in &events.items { tr {
                    td { a href={ "/console/events/" (event.position) } { (event.position) } }
                    td { (event.recorded_at.format("%Y-%m-%d %H:%M:%S")) }
                    td { (event.stream_id) }
                    td { (event.event_type) }
                    td { code { (hex::encode(&event.hash[..8])) "…" } }
                } } }
            } } }
            @if let Some(next) = &events.next_cursor {
                p { a href={ "/console/audit?after=" (next) "&" (filters) } { "Later events" } }
            }
        }
    };
    page("Audit stream", Some(&session), body).into_response()
}

/// Events an export from the console holds at most (the CLI's `billing export` has no limit).
const EXPORT_MAX: u64 = 200_000;

async fn audit_export(State(state): State<AppState>, Staff(session): Staff, Query(query): Query<AuditQuery>) -> Response {
    let invalid = |detail: String| status_page(StatusCode::UNPROCESSABLE_ENTITY, "Not an export", &detail, Some(&session));
    let format: app::audit::Format = match given(&query.format).unwrap_or("csv").parse() {
        Ok(format) => format,
        Err(problem) => return invalid(problem),
    };
    let bound = |text: Option<&str>| text.map(str::parse::<app::audit::Bound>).transpose();
    let (from, to) = match (bound(given(&query.from)), bound(given(&query.to))) {
        (Ok(from), Ok(to)) => (from, to),
        (Err(problem), _) | (_, Err(problem)) => return invalid(problem),
    };
    // Without a start, the export begins where the page's filter would.
    let from = from.or_else(|| query.after.map(|after| app::audit::Bound::Position(after + 1)));
    let selection = app::audit::Selection {
        stream: given(&query.stream).map(str::to_string),
        event_type: given(&query.event_type).map(str::to_string),
    };
    let mut bytes = Vec::new();
    // One more than the most it gives, to know when there is more.
    let written = match app::audit::export_selected(&state.pool, from, to, &selection, Some(EXPORT_MAX + 1), format, &mut bytes).await {
        Ok(written) => written,
        Err(error) => return unavailable(error),
    };
    if written > EXPORT_MAX {
        return invalid(format!(
            "More events match than the console exports at once ({EXPORT_MAX}); narrow the range or use `billing export`."
        ));
    }
    let (content_type, extension) = match format {
        app::audit::Format::Csv => ("text/csv; charset=utf-8", "csv"),
        app::audit::Format::Jsonl => ("application/x-ndjson", "jsonl"),
    };
    (
        [
            (axum::http::header::CONTENT_TYPE, content_type.to_string()),
            (
                axum::http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"events.{extension}\""),
            ),
        ],
        bytes,
    )
        .into_response()
}

// --- Corrections --------------------------------------------------------------------------------

#[derive(Deserialize)]
struct CorrectionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    nonce: String,
    /// `adjustment` (the default), `service_credit` (of `target`, a charge) or `card_refund` (of
    /// `target`, a top-up).
    #[serde(default)]
    kind: String,
    #[serde(default)]
    target: String,
    amount: String,
    reason: String,
    /// Absent: show the effect first; `yes`: make it.
    confirm: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Correction {
    Adjustment,
    ServiceCredit,
    CardRefund,
}

impl Correction {
    fn parse(text: &str) -> Option<Correction> {
        match text {
            "" | "adjustment" => Some(Correction::Adjustment),
            "service_credit" => Some(Correction::ServiceCredit),
            "card_refund" => Some(Correction::CardRefund),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Correction::Adjustment => "adjustment",
            Correction::ServiceCredit => "service_credit",
            Correction::CardRefund => "card_refund",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Correction::Adjustment => "adjustment",
            Correction::ServiceCredit => "service credit",
            Correction::CardRefund => "card refund",
        }
    }
}

/// An admin's correction of a wallet: shown with its effect first, made on confirmation, with its
/// reason in the ledger.
async fn correct(
    State(state): State<AppState>,
    Staff(session): Staff,
    Path(id): Path<String>,
    Form(form): Form<CorrectionForm>,
) -> Response {
    if let Err(refused) = admin(&session) {
        return refused;
    }
    if let Err(refused) = check_csrf(&session, &form.csrf) {
        return refused;
    }
    let (account_id, account) = match super::actions::account_named(&state, &session, &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let Ok(currency) = domain::Currency::parse(&account.currency) else {
        return unavailable("an account with an unknown currency");
    };
    let invalid = |detail: &str| status_page(StatusCode::UNPROCESSABLE_ENTITY, "Not a correction", detail, Some(&session));
    let Some(kind) = Correction::parse(&form.kind) else {
        return invalid("A correction is an adjustment, a service credit or a card refund.");
    };
    let amount = match domain::Money::parse_signed(form.amount.trim(), currency) {
        Ok(money) if kind == Correction::Adjustment && !money.amount.is_zero() => money.amount,
        Ok(money) if kind != Correction::Adjustment && money.amount > Decimal::ZERO => money.amount,
        _ if kind == Correction::Adjustment => {
            return invalid("The amount is a non-zero number with at most 6 decimals, negative for a debit.");
        }
        _ => return invalid("The amount is a positive number with at most 6 decimals."),
    };
    let reason = form.reason.trim();
    if reason.is_empty() {
        return invalid("A correction needs its reason: it is kept in the ledger.");
    }
    let target = form.target.trim();
    // What the wallet gains (or, negative, loses).
    let effect = match kind {
        Correction::CardRefund => -amount,
        _ => amount,
    };
    if form.nonce.trim().is_empty() {
        return invalid("The form has lost its nonce: open the account's page again.");
    }
    if form.confirm.as_deref() != Some("yes") {
        let what = match kind {
            Correction::Adjustment => {
                html! { "An adjustment of " strong { (derived_money(amount, &account.currency, "the amount asked")) } "." }
            }
            Correction::ServiceCredit => {
                html! { "A service credit of " strong { (derived_money(amount, &account.currency, "the amount asked")) } " against charge " code { (target) } "." }
            }
            Correction::CardRefund => html! {
                "A card refund of " strong { (derived_money(amount, &account.currency, "the amount asked")) } " of top-up " code { (target) }
                ": the wallet is debited now and the card credited by Stripe."
            },
        };
        let body = html! {
            p { (what) }
            p { "The balance of " strong { (account.name) } " goes from " (api_money(account.balance, &account.currency, &format!("/v1/accounts/{account_id}"), "/balance"))
                " to " strong data-money="balance_after" { (derived_money(account.balance + effect, &account.currency, "the balance once it is made")) } "." }
            p { "Reason: " (reason) }
            form method="post" action={ "/console/accounts/" (account.account_id) "/corrections" } {
                input type="hidden" name="csrf" value=(session.csrf_token);
                input type="hidden" name="nonce" value=(form.nonce);
                input type="hidden" name="kind" value=(kind.name());
                input type="hidden" name="target" value=(target);
                input type="hidden" name="amount" value=(form.amount.trim());
                input type="hidden" name="reason" value=(reason);
                input type="hidden" name="confirm" value="yes";
                button type="submit" { "Confirm the " (kind.title()) }
            }
            p { a href={ "/console/accounts/" (account.account_id) } { "Cancel" } }
        };
        return page(&format!("Confirm the {}", kind.title()), Some(&session), body).into_response();
    }
    let metadata = super::actions::metadata(
        &session,
        &form.nonce,
        &format!("{} {account_id} {target} {amount} {reason}", kind.name()),
    );
    let made: Result<(), ApiError> = match kind {
        Correction::Adjustment => state
            .flows
            .adjust(account_id, amount, reason, &metadata)
            .await
            .map(drop)
            .map_err(Into::into),
        // The charge or top-up must be this account's: it is looked up before anything is made.
        Correction::ServiceCredit => crate::http::admin::service_credit(&state, target, Some(account_id), amount, reason, &metadata)
            .await
            .map(drop),
        Correction::CardRefund => crate::http::payments::card_refund(&state, target, Some(account_id), amount, reason, &metadata)
            .await
            .map(drop),
    };
    if let Err(error) = made {
        return refused(&session, error);
    }
    if let Err(error) = crate::http::caught_up(&state).await {
        return unavailable(error);
    }
    Redirect::to(&format!("/console/accounts/{account_id}")).into_response()
}

// --- People -------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct InviteForm {
    #[serde(default)]
    csrf: String,
    email: String,
    role: String,
    #[serde(default)]
    account: String,
}

async fn people_page(Staff(session): Staff) -> Response {
    if let Err(refused) = admin(&session) {
        return refused;
    }
    page("Invitations", Some(&session), invitation_form(&session, None)).into_response()
}

fn invitation_form(session: &Session, invited: Option<(&str, &str)>) -> maud::Markup {
    html! {
        @if let Some((email, link)) = invited {
            div class="banner" role="status" {
                p { "Send this link to " strong { (email) } ": it sets their password, once, within 7 days. It is not shown again." }
                p { code { (link) } }
            }
        }
        form class="card" method="post" action="/console/people" {
            (super::layout::csrf_field(&session.csrf_token))
            label { "Email" input type="email" name="email" required maxlength="254" autocomplete="off"; }
            label { "Role" select name="role" {
                @for role in Role::ALL { option value=(role.as_str()) { (role.as_str()) } }
            } }
            label { "Account (a customer's, by id)" input type="text" name="account" placeholder="for customers only"; }
            button type="submit" { "Invite" }
        }
    }
}

async fn invite(State(state): State<AppState>, Staff(session): Staff, Form(form): Form<InviteForm>) -> Response {
    if let Err(refused) = admin(&session) {
        return refused;
    }
    if let Err(refused) = check_csrf(&session, &form.csrf) {
        return refused;
    }
    let invalid = |detail: &str| status_page(StatusCode::UNPROCESSABLE_ENTITY, "Not an invitation", detail, Some(&session));
    let Some(role) = Role::parse(&form.role) else {
        return invalid("The role is customer, finance or admin.");
    };
    let account_id = match form.account.trim() {
        "" => None,
        text => match AccountId::parse(text) {
            Ok(account_id) => match app::reads::account(&state.pool, account_id).await {
                Ok(Some(_)) => Some(account_id),
                Ok(None) => return invalid("There is no account with that id."),
                Err(error) => return unavailable(error),
            },
            Err(_) => return invalid("The account is an account's id."),
        },
    };
    match app::people::invite(&state.pool, &form.email, role, account_id, chrono::Utc::now()).await {
        Ok(link) => {
            let url = format!("{}/link/{link}", state.public_url.trim_end_matches('/'));
            page(
                "Invitations",
                Some(&session),
                invitation_form(&session, Some((form.email.trim(), &url))),
            )
            .into_response()
        }
        Err(app::people::PeopleError::Database(error)) => unavailable(error),
        Err(problem) => invalid(&problem.to_string()),
    }
}

// --- API keys -----------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct KeysQuery {
    account: Option<String>,
    after: Option<String>,
}

async fn keys_page(State(state): State<AppState>, Staff(session): Staff, Query(query): Query<KeysQuery>) -> Response {
    if let Err(refused) = admin(&session) {
        return refused;
    }
    keys_listing(&state, &session, &query, None).await
}

async fn keys_listing(state: &AppState, session: &Session, query: &KeysQuery, created: Option<(String, String)>) -> Response {
    let invalid = |detail: &str| status_page(StatusCode::UNPROCESSABLE_ENTITY, "Not a filter", detail, Some(session));
    let account = match given(&query.account).map(AccountId::parse).transpose() {
        Ok(account) => account,
        Err(_) => return invalid("The account is an account's id."),
    };
    let after = match given(&query.after).map(uuid::Uuid::parse_str).transpose() {
        Ok(after) => after,
        Err(_) => return invalid("That is not a page of keys."),
    };
    let keys = match app::keys::list(&state.pool, account, after, 50).await {
        Ok(Some(page)) => page,
        Ok(None) => return status_page(StatusCode::NOT_FOUND, "Not found", "There is no such page of keys.", Some(session)),
        Err(error) => return unavailable(error),
    };
    let older = |next: &str| {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("after", next);
        if let Some(account) = account {
            query.append_pair("account", &account.to_string());
        }
        format!("/console/keys?{}", query.finish())
    };
    let body = html! {
        @if let Some((role, token)) = &created {
            div class="banner" role="status" {
                p { "The new " (role) " key's token, shown this once:" }
                p { code { (token) } }
            }
        }
        p class="muted" { "A revoked key answers 401 from its next request on, in every process." }
        form class="filters" method="get" action="/console/keys" {
            label { "Account" input type="text" name="account" placeholder="all accounts" value=(given(&query.account).unwrap_or_default()); }
            button type="submit" { "Show" }
        }
        div class="table" { table {
            thead { tr { th { "Key" } th { "Role" } th { "Account" } th { "Label" } th { "Created (UTC)" } th { "State" } } }
            tbody { @for key in &keys.items { tr {
                td { code { (key.key_id.to_string()[..8]) } }
                td { (key.role) }
                td { @if let Some(account) = key.account_id { a href={ "/console/accounts/" (account) } { (account.to_string()[..8]) } } }
                td { (key.label) }
                td { (key.created_at.format("%Y-%m-%d %H:%M")) }
                td {
                    @if let Some(at) = key.revoked_at { "revoked " (at.format("%Y-%m-%d %H:%M")) }
                    @else {
                        form method="post" action={ "/console/keys/" (key.key_id) "/revocation" } {
                            (super::layout::csrf_field(&session.csrf_token))
                            button type="submit" aria-label={ "Revoke key " (key.key_id.to_string()[..8]) } { "Revoke" }
                        }
                    }
                }
            } } }
        } }
        @if let Some(next) = &keys.next_cursor { p { a href=(older(next)) { "Older keys" } } }
        h2 { "New key" }
        form class="card" method="post" action="/console/keys" {
            (super::layout::csrf_field(&session.csrf_token))
            label { "Role" select name="role" { @for role in Role::ALL { option value=(role.as_str()) { (role.as_str()) } } } }
            label { "Account (a customer key's, by id)" input type="text" name="account" placeholder="for customer keys only"; }
            label { "Label" input type="text" name="label" maxlength="200"; }
            button type="submit" { "Create" }
        }
    };
    page("API keys", Some(session), body).into_response()
}

#[derive(Deserialize)]
struct KeyForm {
    #[serde(default)]
    csrf: String,
    role: String,
    #[serde(default)]
    account: String,
    #[serde(default)]
    label: String,
}

async fn create_key(State(state): State<AppState>, Staff(session): Staff, Form(form): Form<KeyForm>) -> Response {
    if let Err(refused) = admin(&session) {
        return refused;
    }
    if let Err(refused) = check_csrf(&session, &form.csrf) {
        return refused;
    }
    let invalid = |detail: &str| status_page(StatusCode::UNPROCESSABLE_ENTITY, "Not a key", detail, Some(&session));
    let Some(role) = Role::parse(&form.role) else {
        return invalid("The role is customer, finance or admin.");
    };
    let account_id = match (role, form.account.trim()) {
        (Role::Customer, "") => return invalid("A customer key belongs to an account: give its id."),
        (Role::Customer, text) => match AccountId::parse(text) {
            Ok(account_id) => match app::reads::account(&state.pool, account_id).await {
                Ok(Some(_)) => Some(account_id),
                Ok(None) => return invalid("There is no account with that id."),
                Err(error) => return unavailable(error),
            },
            Err(_) => return invalid("The account is an account's id."),
        },
        (_, "") => None,
        (_, _) => return invalid("Only customer keys belong to an account."),
    };
    let label: String = format!("{} (by {})", form.label.trim().chars().take(200).collect::<String>(), session.email);
    match app::keys::create(&state.pool, role, account_id, label.trim()).await {
        Ok((_, token)) => keys_listing(&state, &session, &KeysQuery::default(), Some((role.as_str().to_string(), token))).await,
        Err(error) => unavailable(error),
    }
}

#[derive(Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

async fn revoke_key(State(state): State<AppState>, Staff(session): Staff, Path(id): Path<String>, Form(form): Form<CsrfOnly>) -> Response {
    if let Err(refused) = admin(&session) {
        return refused;
    }
    if let Err(refused) = check_csrf(&session, &form.csrf) {
        return refused;
    }
    let not_found = || status_page(StatusCode::NOT_FOUND, "Not found", "There is no such key.", Some(&session));
    let Ok(key_id) = uuid::Uuid::parse_str(&id) else {
        return not_found();
    };
    match app::keys::revoke(&state.pool, key_id).await {
        Ok(Some(_)) => {
            state.cache.revoked().await;
            tracing::info!(key = %key_id, by = %session.email, "API key revoked");
            Redirect::to("/console/keys").into_response()
        }
        Ok(None) => not_found(),
        Err(error) => unavailable(error),
    }
}

// --- Read models --------------------------------------------------------------------------------

async fn projections_page(State(state): State<AppState>, Staff(session): Staff) -> Response {
    if let Err(refused) = admin(&session) {
        return refused;
    }
    let statuses = match projections::queries::status(&state.pool).await {
        Ok(statuses) => statuses,
        Err(error) => return unavailable(error),
    };
    let rebuilding = statuses.iter().any(|status| status.rebuilding);
    let body = html! {
        p class="muted" { "Each read model follows the log; a rebuild replays it from position 0 beside the live one, which serves until the new one has caught up and is swapped in." }
        // While a rebuild runs, the table refreshes itself every second (htmx).
        div id="projections" hx-get=[rebuilding.then_some("/console/projections")] hx-trigger=[rebuilding.then_some("every 1s")] hx-select="#projections" hx-swap="outerHTML" {
            div class="table" { table {
                thead { tr { th { "Read model" } th class="n" { "Position" } th class="n" { "Lag (events)" } th { "Rebuild" } } }
                tbody { @for status in &statuses { tr {
                    td { (status.name) }
                    td class="n" { (status.position) }
                    td class="n" { (status.lag) }
                    td {
                        @if status.rebuilding {
                            @let done = status.rebuild_position.max(0);
                            @let head = status.head.max(1);
                            label { "Rebuilding: position " (done) " of " (head)
                                progress class="progress" max=(head) value=(done.min(head)) { (done * 100 / head) "%" } }
                        } @else {
                            form method="post" action={ "/console/projections/" (status.name) "/rebuild" } {
                                (super::layout::csrf_field(&session.csrf_token))
                                button type="submit" aria-label={ "Rebuild " (status.name) } { "Rebuild" }
                            }
                        }
                    }
                } } }
            } }
        }
    };
    page("Read models", Some(&session), body).into_response()
}

async fn rebuild(State(state): State<AppState>, Staff(session): Staff, Path(name): Path<String>, Form(form): Form<CsrfOnly>) -> Response {
    if let Err(refused) = admin(&session) {
        return refused;
    }
    if let Err(refused) = check_csrf(&session, &form.csrf) {
        return refused;
    }
    match app::rebuilds::start(&state.pool, &name) {
        Ok(_) | Err(app::rebuilds::NotStarted::AlreadyRebuilding(_)) => Redirect::to("/console/projections").into_response(),
        Err(app::rebuilds::NotStarted::Unknown(_)) => {
            status_page(StatusCode::NOT_FOUND, "Not found", "There is no such read model.", Some(&session))
        }
    }
}
