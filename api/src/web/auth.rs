//! Signing in and out, the one-time links that set a password (an invitation, a reset), and the
//! session every page reads.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use chrono::Utc;
use maud::html;
use serde::Deserialize;

use app::people::{PeopleError, Session};

use super::layout::{csrf_field, page, status_page};
use crate::http::AppState;

/// The session cookie.
pub const SESSION_COOKIE: &str = "billing_session";
/// The double-submit cookie that guards the forms shown before sign-in.
const FORM_COOKIE: &str = "billing_form";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/signin", get(signin_page).post(signin))
        .route("/signout", axum::routing::post(signout))
        .route("/link/{token}", get(link_page).post(set_password))
        .route("/reset", get(reset_page).post(reset))
}

/// A cookie's name as set: outside dev mode with the `__Host-` prefix, which browsers accept only
/// from this very host over HTTPS with `Path=/`, so a sibling subdomain cannot plant one.
fn cookie_name(state: &AppState, name: &str) -> String {
    if state.dev_clock.is_some() {
        name.to_string()
    } else {
        format!("__Host-{name}")
    }
}

/// A cookie of the request (by its name before the prefix `cookie_name` adds).
pub fn cookie<'a>(state: &AppState, headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let name = cookie_name(state, name);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name.as_str())
        .map(|(_, value)| value)
}

fn set_cookie(state: &AppState, name: &str, value: &str, max_age_seconds: i64) -> HeaderValue {
    let secure = if state.dev_clock.is_some() { "" } else { "; Secure" };
    let name = cookie_name(state, name);
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_seconds}{secure}"
    ))
    .expect("cookie values are hex")
}

/// Who is asking: the open session the cookie names, if any.
pub struct Visitor(pub Option<Session>);

impl FromRequestParts<AppState> for Visitor {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Visitor, Response> {
        let Some(cookie) = cookie(state, &parts.headers, SESSION_COOKIE) else {
            return Ok(Visitor(None));
        };
        // Session time is real time, whatever the dev clock says.
        match app::people::session(&state.pool, cookie, state.sessions, Utc::now()).await {
            Ok(session) => Ok(Visitor(session)),
            Err(error) => Err(unavailable(error)),
        }
    }
}

impl Visitor {
    /// The session, or a redirect to sign in.
    pub fn signed_in(self) -> Result<Session, Response> {
        self.0.ok_or_else(|| Redirect::to("/signin").into_response())
    }
}

/// A signed-in customer and their account; staff are sent to the console, and anyone else to
/// sign in.
pub struct Customer {
    pub session: Session,
    pub account_id: domain::AccountId,
}

impl FromRequestParts<AppState> for Customer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Customer, Response> {
        let session = Visitor::from_request_parts(parts, state).await?.signed_in()?;
        match (session.role, session.account_id) {
            (app::people::Role::Customer, Some(account_id)) => Ok(Customer { session, account_id }),
            _ => Err(Redirect::to("/console").into_response()),
        }
    }
}

/// A signed-in member of finance or an admin; to a customer the console does not exist (404).
pub struct Staff(pub Session);

impl FromRequestParts<AppState> for Staff {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Staff, Response> {
        let session = Visitor::from_request_parts(parts, state).await?.signed_in()?;
        match session.role {
            app::people::Role::Finance | app::people::Role::Admin => Ok(Staff(session)),
            app::people::Role::Customer => Err(status_page(
                StatusCode::NOT_FOUND,
                "Not found",
                "There is no such page here.",
                Some(&session),
            )),
        }
    }
}

pub fn unavailable(error: impl std::fmt::Display) -> Response {
    tracing::error!(%error, "a page failed");
    status_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "Something failed on our side; it has been logged. Try again shortly.",
        None,
    )
}

/// A form posted without the session's CSRF token is refused.
pub fn check_csrf(session: &Session, sent: &str) -> Result<(), Response> {
    if !sent.is_empty() && sent == session.csrf_token {
        Ok(())
    } else {
        Err(status_page(
            StatusCode::FORBIDDEN,
            "Refused",
            "This form has expired or did not come from this site. Reload the page and try again.",
            Some(session),
        ))
    }
}

/// A fresh form token for a page shown before sign-in, and the cookie that carries it.
fn form_token(state: &AppState) -> (String, HeaderValue) {
    let token = app::people::random_token();
    let cookie = set_cookie(state, FORM_COOKIE, &token, 3600);
    (token, cookie)
}

/// The double-submit check of a form shown before sign-in.
fn check_form_token(state: &AppState, headers: &HeaderMap, sent: &str) -> Result<(), Response> {
    match cookie(state, headers, FORM_COOKIE) {
        Some(expected) if !sent.is_empty() && expected == sent => Ok(()),
        _ => Err(status_page(
            StatusCode::FORBIDDEN,
            "Refused",
            "This form has expired or did not come from this site. Reload the page and try again.",
            None,
        )),
    }
}

fn signin_form(token: &str, email: &str, error: Option<&str>) -> maud::Markup {
    html! {
        @if let Some(error) = error { p class="error" role="alert" { (error) } }
        form class="card" method="post" action="/signin" {
            (csrf_field(token))
            label { "Email" input type="email" name="email" autocomplete="username" required value=(email); }
            label { "Password" input type="password" name="password" autocomplete="current-password" required; }
            button type="submit" { "Sign in" }
            a href="/reset" { "Forgot your password?" }
        }
    }
}

async fn signin_page(State(state): State<AppState>, visitor: Visitor) -> Response {
    if visitor.0.is_some() {
        return Redirect::to("/").into_response();
    }
    let (token, cookie) = form_token(&state);
    ([(header::SET_COOKIE, cookie)], page("Sign in", None, signin_form(&token, "", None))).into_response()
}

#[derive(Deserialize)]
struct SignIn {
    #[serde(default)]
    csrf: String,
    email: String,
    password: String,
}

async fn signin(State(state): State<AppState>, headers: HeaderMap, Form(form): Form<SignIn>) -> Response {
    if let Err(refused) = check_form_token(&state, &headers, &form.csrf) {
        return refused;
    }
    let again = |status: StatusCode, message: &str| {
        let (token, cookie) = form_token(&state);
        (
            status,
            [(header::SET_COOKIE, cookie)],
            page("Sign in", None, signin_form(&token, &form.email, Some(message))),
        )
            .into_response()
    };
    // Attempts are limited per email in this process, besides the lockout every process shares.
    // Per email, and for every email together: each attempt costs a slow password hash.
    let email = form.email.trim().to_lowercase();
    if state.signin_limiter.take(&format!("signin:{email}")).is_err() || state.signin_limiter_all.take("signin").is_err() {
        return again(StatusCode::TOO_MANY_REQUESTS, "Too many attempts. Wait a minute and try again.");
    }
    match app::people::sign_in(&state.pool, &form.email, &form.password, Utc::now()).await {
        Ok(signed_in) => {
            let cookie = set_cookie(&state, SESSION_COOKIE, &signed_in.cookie, state.sessions.absolute.num_seconds());
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Err(PeopleError::WrongCredentials) => again(StatusCode::UNAUTHORIZED, "The email or the password is wrong."),
        Err(PeopleError::Locked(until)) => again(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "Too many failed attempts: this email is locked until {}.",
                until.format("%H:%M UTC")
            ),
        ),
        Err(error) => unavailable(error),
    }
}

#[derive(Deserialize)]
struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

async fn signout(State(state): State<AppState>, headers: HeaderMap, visitor: Visitor, Form(form): Form<CsrfOnly>) -> Response {
    let Some(session) = visitor.0 else {
        return Redirect::to("/signin").into_response();
    };
    if let Err(refused) = check_csrf(&session, &form.csrf) {
        return refused;
    }
    if let Some(cookie) = cookie(&state, &headers, SESSION_COOKIE) {
        if let Err(error) = app::people::sign_out(&state.pool, cookie, Utc::now()).await {
            return unavailable(error);
        }
    }
    (
        [(header::SET_COOKIE, set_cookie(&state, SESSION_COOKIE, "", 0))],
        Redirect::to("/signin"),
    )
        .into_response()
}

async fn link_page(State(state): State<AppState>, Path(link): Path<String>) -> Response {
    match app::people::link_is_usable(&state.pool, &link, Utc::now()).await {
        Ok(true) => {}
        Ok(false) => {
            return status_page(
                StatusCode::NOT_FOUND,
                "Link not valid",
                "This link is unknown, used or expired.",
                None,
            )
        }
        Err(error) => return unavailable(error),
    }
    let (token, cookie) = form_token(&state);
    let body = html! {
        form class="card" method="post" action={ "/link/" (link) } {
            (csrf_field(&token))
            label {
                "New password (12 characters or more)"
                input type="password" name="password" autocomplete="new-password" minlength="12" maxlength="200" required;
            }
            button type="submit" { "Set the password" }
        }
    };
    ([(header::SET_COOKIE, cookie)], page("Choose your password", None, body)).into_response()
}

#[derive(Deserialize)]
struct NewPassword {
    #[serde(default)]
    csrf: String,
    password: String,
}

async fn set_password(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(link): Path<String>,
    Form(form): Form<NewPassword>,
) -> Response {
    if let Err(refused) = check_form_token(&state, &headers, &form.csrf) {
        return refused;
    }
    match app::people::set_password(&state.pool, &link, &form.password, Utc::now()).await {
        Ok(()) => page(
            "Password set",
            None,
            html! { p { "Your password is set. " a href="/signin" { "Sign in" } } },
        )
        .into_response(),
        Err(PeopleError::WeakPassword) => status_page(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Password too short",
            "A password is 12 to 200 characters. Go back and choose another.",
            None,
        ),
        Err(PeopleError::BadLink) => status_page(
            StatusCode::NOT_FOUND,
            "Link not valid",
            "This link is unknown, used or expired.",
            None,
        ),
        Err(error) => unavailable(error),
    }
}

async fn reset_page(State(state): State<AppState>) -> Response {
    let (token, cookie) = form_token(&state);
    let body = html! {
        form class="card" method="post" action="/reset" {
            (csrf_field(&token))
            label { "Email" input type="email" name="email" autocomplete="username" required; }
            button type="submit" { "Send a reset link" }
        }
    };
    ([(header::SET_COOKIE, cookie)], page("Reset your password", None, body)).into_response()
}

#[derive(Deserialize)]
struct ResetRequest {
    #[serde(default)]
    csrf: String,
    email: String,
}

/// Answers the same whether the email is known or not. The link goes to the operator's log (no
/// mail server is configured); in dev mode it is also shown on the page.
async fn reset(State(state): State<AppState>, headers: HeaderMap, Form(form): Form<ResetRequest>) -> Response {
    if let Err(refused) = check_form_token(&state, &headers, &form.csrf) {
        return refused;
    }
    if state
        .signin_limiter
        .take(&format!("reset:{}", form.email.trim().to_lowercase()))
        .is_err()
    {
        return status_page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests",
            "Wait a minute and try again.",
            None,
        );
    }
    let link = match app::people::request_reset(&state.pool, &form.email, Utc::now()).await {
        Ok(link) => link,
        Err(error) => return unavailable(error),
    };
    if let Some(link) = &link {
        tracing::warn!(email = %form.email.trim().to_lowercase(), path = %format!("/link/{link}"), "password reset link (valid 1 hour)");
    }
    let body = html! {
        p { "If that email belongs to someone here, a reset link valid for one hour is on its way." }
        @if let (true, Some(link)) = (state.dev_clock.is_some(), &link) {
            p class="muted" { "Dev mode: " a href={ "/link/" (link) } { "open the reset link" } }
        }
    };
    page("Reset your password", None, body).into_response()
}
