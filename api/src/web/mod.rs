//! The web faces, served by the binary beside the API: the customer portal at `/` and the finance
//! and admin console at `/console`, rendered on the server (maud) from the application layer and
//! the read models, never by calling the API's routes.
//!
//! Sign-in is by email and password (`app::people`): the session cookie is httpOnly,
//! SameSite=Strict (and Secure outside dev mode); every form carries a CSRF token (the session's,
//! or before sign-in a double-submit cookie's), and a form without it is refused with a 403.

mod actions;
mod admin;
mod auth;
mod charts;
mod console;
mod layout;
mod live;
mod pdf;
mod portal;

use axum::routing::get;
use axum::Router;

use crate::http::AppState;

pub use auth::{Visitor, SESSION_COOKIE};

pub fn routes() -> Router<AppState> {
    let pages = Router::new()
        .merge(auth::routes())
        .merge(actions::routes())
        .merge(portal::routes())
        .merge(console::routes())
        .merge(admin::routes())
        .merge(live::routes())
        .layer(axum::middleware::from_fn(no_store));
    Router::new()
        .route("/assets/app.css", get(layout::stylesheet))
        .route("/assets/htmx-2.0.8.min.js", get(layout::htmx))
        .merge(pages)
}

/// Pages of a session are never kept by the browser: after sign-out, Back shows nothing.
async fn no_store(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let mut response = next.run(request).await;
    response
        .headers_mut()
        .insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    response
}
