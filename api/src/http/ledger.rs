//! The ledger for auditors: the events with their hashes, the trial balance, and verification.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use super::auth::{Caller, Role};
use super::error::ApiError;
use super::extract::{page_size, Query};
use super::types::{
    AsOfQuery, CurrencyBooks, Difference, EventPage, EventsQuery, LedgerEvent, Money, ReadModelCheck, TrialBalance, TrialBalanceLine,
    Verification, VerifyQuery,
};
use super::{AppState, Reply};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/ledger/events", get(ledger_events))
        .route("/v1/ledger/trial-balance", get(trial_balance))
        .route("/v1/ledger/verify", get(verify_ledger))
}

/// The log in order, with positions and hashes, after a position and of one stream or all.
#[utoipa::path(get, path = "/v1/ledger/events", tag = "ledger", params(EventsQuery), security(("bearer" = [])),
    responses((status = 200, description = "the audit stream with hashes", body = EventPage)))]
pub(crate) async fn ledger_events(State(state): State<AppState>, caller: Caller, Query(query): Query<EventsQuery>) -> Reply<EventPage> {
    caller.require(&[Role::Admin, Role::Finance])?;
    let after = query.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::invalid("after", "after is a position, 0 or more"));
    }
    let limit = page_size(query.limit, 100, 1_000)?;
    let events = app::reads::events(
        &state.pool,
        query.stream.as_ref().map(|stream| stream.0.as_str()),
        None,
        after,
        limit,
    )
    .await?;
    Ok((StatusCode::OK, axum::Json(EventPage::of(events, LedgerEvent::from))))
}

/// Journal totals per ledger account and currency, now or as of an instant.
#[utoipa::path(get, path = "/v1/ledger/trial-balance", tag = "ledger", params(AsOfQuery), security(("bearer" = [])),
    responses((status = 200, description = "journal totals per ledger account, per currency", body = TrialBalance)))]
pub(crate) async fn trial_balance(State(state): State<AppState>, caller: Caller, Query(query): Query<AsOfQuery>) -> Reply<TrialBalance> {
    caller.require(&[Role::Admin, Role::Finance])?;
    let books = projections::queries::trial_balance(&state.pool, query.as_of).await?;
    let currencies = books
        .currencies
        .into_iter()
        .map(|books| {
            let currency = books.currency;
            CurrencyBooks {
                accounts: books
                    .accounts
                    .into_iter()
                    .map(|line| TrialBalanceLine {
                        account: line.account,
                        debit: Money::of(line.debit, &currency),
                        credit: Money::of(line.credit, &currency),
                    })
                    .collect(),
                total_debit: Money::of(books.total_debit, &currency),
                total_credit: Money::of(books.total_credit, &currency),
                currency,
            }
        })
        .collect();
    Ok((
        StatusCode::OK,
        axum::Json(TrialBalance {
            as_of: books.as_of,
            currencies,
        }),
    ))
}

/// Recomputes the hash chain and (unless `chain_only`) compares every read model with a replay.
#[utoipa::path(get, path = "/v1/ledger/verify", tag = "ledger", params(VerifyQuery), security(("bearer" = [])),
    responses((status = 200, description = "the chain recomputed, and every read model compared with a replay", body = Verification)))]
pub(crate) async fn verify_ledger(State(state): State<AppState>, caller: Caller, Query(query): Query<VerifyQuery>) -> Reply<Verification> {
    caller.require(&[Role::Admin, Role::Finance])?;
    // One verification at a time in this process (each is a full replay); others wait their turn.
    static VERIFYING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = VERIFYING.lock().await;
    let report = ledger::verify::verify_chain(&state.pool, None, |_, _| {}).await?;
    let mut ok = report.ok;
    let mut read_models = None;
    if report.ok && !query.chain_only.unwrap_or(false) {
        let mut checks = Vec::new();
        for projection in projections::projection::all() {
            let check = projections::verify::verify(&state.pool, projection.as_ref()).await?;
            ok &= check.differences.is_empty();
            checks.push(ReadModelCheck {
                name: check.name.to_string(),
                position: check.position,
                differences: check
                    .differences
                    .into_iter()
                    .map(|difference| Difference {
                        table: difference.table,
                        key: difference.key,
                        live: difference.live,
                        replayed: difference.replayed,
                    })
                    .collect(),
            });
        }
        read_models = Some(checks);
    }
    Ok((
        StatusCode::OK,
        axum::Json(Verification {
            ok,
            events_checked: report.events_checked,
            head_position: report.head_position,
            head_hash: report.head_hash,
            first_bad_position: report.first_bad_position,
            problem: report.problem,
            read_models,
        }),
    ))
}
