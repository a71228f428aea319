//! The outbox: after the log records a change the outside must hear of, it is told once, in the
//! order the changes happened to their subject. The VPS provider is asked to create the server of
//! a placed order (the deploy saga: the hold is captured or released by the answer) and hears of
//! a provisioned server's setup, reinstall, power actions, suspension, resumption and deletion;
//! the card processor of a card refund.
//!
//! `fill` turns the log's events into outbox rows, in the transaction that moves the outbox's own
//! position (`outbox_head`), so each event gets exactly one row whoever runs it. `dispatch`
//! claims the oldest pending row of each subject with `FOR UPDATE SKIP LOCKED`, holds the claim
//! while it calls out, and marks the row done, due again later (a busy, locked or slow party,
//! with backoff) or failed. Two instances never send one row at once, and a subject's later
//! action waits for its earlier ones. A call whose answer was lost is sent again; the provider's
//! actions are safe to repeat and Stripe's refunds carry an idempotency key.

use chrono::{DateTime, Utc};
use domain::account::AccountEvent;
use domain::order::OrderEvent;
use domain::payments::{PaymentGateway, RefundRequest};
use domain::provider::{ProviderError, ServerAction, ServerProvider};
use domain::server::ServerEvent;
use domain::{OrderId, RefundId, ServerId, TopUpId};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::flows::{FlowError, Flows};
use crate::handler::StorageError;
use crate::workers::RetryPolicy;

/// Events read from the log per fill transaction.
const FILL_BATCH: usize = 1_000;
/// Rows sent per `dispatch` call, at most.
const DISPATCH_MAX: usize = 200;

/// What the provider is asked, about one server: to create it for its order (the deploy saga),
/// or to act on it once it exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ProviderCall {
    Provision { order_id: OrderId },
    Act(ServerAction),
}

/// A card refund to ask the processor for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardRefund {
    pub refund_id: RefundId,
    pub topup_id: TopUpId,
    pub amount: Decimal,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DispatchReport {
    pub queued: u64,
    pub sent: u64,
    pub deferred: u64,
    pub failed: u64,
}

/// Who is told what, for one event of the log.
fn row_for(event: &ledger::RecordedEvent) -> Option<(&'static str, uuid::Uuid, serde_json::Value)> {
    if let Some(server_id) = event.stream_id.strip_prefix("server-") {
        let server_id = uuid::Uuid::parse_str(server_id).ok()?;
        let decoded: ServerEvent = serde_json::from_value(event.payload.clone())
            .map_err(|error| tracing::error!(position = event.position, %error, "a server event does not decode; the provider is not told"))
            .ok()?;
        let call = ProviderCall::Act(ServerAction::for_event(&decoded)?);
        return Some(("provider", server_id, serde_json::to_value(call).expect("calls serialise")));
    }
    if event.stream_id.starts_with("order-") && event.event_type == "OrderPlaced" {
        let Ok(OrderEvent::OrderPlaced { order_id, server_id, .. }) = serde_json::from_value::<OrderEvent>(event.payload.clone()) else {
            tracing::error!(position = event.position, "a placed order does not decode; it is not provisioned");
            return None;
        };
        let call = ProviderCall::Provision { order_id };
        return Some(("provider", server_id.0, serde_json::to_value(call).expect("calls serialise")));
    }
    if event.stream_id.starts_with("account-") && event.event_type == "CardRefundRequested" {
        let payload = domain::account::upcast(&event.event_type, event.schema_version, event.payload.clone());
        let Ok(AccountEvent::CardRefundRequested {
            refund_id,
            topup_id,
            amount,
            at_processor,
            ..
        }) = serde_json::from_value::<AccountEvent>(payload)
        else {
            tracing::error!(
                position = event.position,
                "a card refund request does not decode; Stripe is not told"
            );
            return None;
        };
        if at_processor {
            // Made at Stripe already (from its dashboard): nothing to ask for.
            return None;
        }
        let refund = CardRefund {
            refund_id,
            topup_id,
            amount,
        };
        return Some(("payments", refund_id.0, serde_json::to_value(refund).expect("refunds serialise")));
    }
    None
}

/// Adds a row for every event after the outbox's position that the outside must hear of.
pub async fn fill(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let mut queued = 0;
    loop {
        let mut tx = pool.begin().await?;
        let head: i64 = sqlx::query_scalar("SELECT position FROM outbox_head WHERE singleton FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
        let events = ledger::log::read_after(&mut *tx, head, FILL_BATCH).await?;
        let Some(last) = events.last().map(|event| event.position) else {
            tx.commit().await?;
            return Ok(queued);
        };
        let (mut positions, mut targets, mut subjects, mut actions) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for event in &events {
            if let Some((target, subject, action)) = row_for(event) {
                positions.push(event.position);
                targets.push(target);
                subjects.push(subject);
                actions.push(action);
            }
        }
        if !positions.is_empty() {
            queued += sqlx::query(
                "INSERT INTO outbox (position, target, subject, action) \
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::uuid[], $4::jsonb[]) ON CONFLICT (position) DO NOTHING",
            )
            .bind(&positions)
            .bind(&targets)
            .bind(&subjects)
            .bind(&actions)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        sqlx::query("UPDATE outbox_head SET position = $1 WHERE singleton")
            .bind(last)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if events.len() < FILL_BATCH {
            return Ok(queued);
        }
    }
}

/// Moves the outbox's position to the log's head without queueing anything: for history that was
/// acted on when it happened (an import).
pub async fn skip_to_head(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox_head SET position = GREATEST(position, (SELECT position FROM ledger_head WHERE singleton)) WHERE singleton")
        .execute(pool)
        .await?;
    Ok(())
}

/// The parties the outbox talks to.
#[derive(Clone, Copy)]
pub struct Parties<'a> {
    pub provider: &'a dyn ServerProvider,
    /// None: card refunds wait (no processor is configured).
    pub payments: Option<&'a dyn PaymentGateway>,
}

/// Fills the outbox, then sends what is due, oldest first per subject.
pub async fn dispatch(flows: &Flows, parties: Parties<'_>, policy: RetryPolicy) -> Result<DispatchReport, FlowError> {
    let pool = flows.handler.log().pool();
    let mut report = DispatchReport {
        queued: fill(pool).await.map_err(StorageError::Read)?,
        ..DispatchReport::default()
    };
    let targets: &[&str] = if parties.payments.is_some() {
        &["provider", "payments"]
    } else {
        &["provider"]
    };
    // A few rows at once (of different subjects: a subject's rows wait for its earlier ones), so
    // one slow call does not hold up every other server's.
    let budget = std::sync::atomic::AtomicUsize::new(DISPATCH_MAX);
    let worker = || async {
        let mut report = DispatchReport::default();
        while budget
            .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_ok()
        {
            match dispatch_one(flows, parties, policy, targets).await? {
                None => break,
                Some(Sent::Done) => report.sent += 1,
                Some(Sent::Deferred) => report.deferred += 1,
                Some(Sent::Failed) => report.failed += 1,
            }
        }
        Ok::<_, FlowError>(report)
    };
    let (a, b, c, d) = tokio::join!(worker(), worker(), worker(), worker());
    for part in [a?, b?, c?, d?] {
        report.sent += part.sent;
        report.deferred += part.deferred;
        report.failed += part.failed;
    }
    Ok(report)
}

/// How one row's call went.
enum Sent {
    Done,
    Deferred,
    Failed,
}

/// Claims the oldest row that may go now, calls out, and records how it went; None when no row
/// may go now.
async fn dispatch_one(flows: &Flows, parties: Parties<'_>, policy: RetryPolicy, targets: &[&str]) -> Result<Option<Sent>, FlowError> {
    let pool = flows.handler.log().pool();
    let mut tx = pool.begin().await.map_err(StorageError::Read)?;
    let claimed: Option<(i64, String, uuid::Uuid, serde_json::Value, i32)> = sqlx::query_as(
        "SELECT o.position, o.target, o.subject, o.action, o.attempts FROM outbox o \
         WHERE o.status = 'pending' AND o.next_attempt_at <= now() AND o.target = ANY($1) \
           AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.subject = o.subject AND p.status = 'pending' AND p.position < o.position) \
         ORDER BY o.position LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .bind(targets)
    .fetch_optional(&mut *tx)
    .await
    .map_err(StorageError::Read)?;
    let Some((position, target, subject, action, attempts)) = claimed else {
        return Ok(None);
    };
    let outcome = match target.as_str() {
        "provider" => {
            let last_attempt = (attempts + 1) as u32 >= policy.attempts_max;
            tell_provider(flows, parties.provider, subject, action, attempts + 1, last_attempt).await?
        }
        _ => match parties.payments {
            Some(payments) => ask_for_refund(flows, payments, action).await?,
            None => Err(ProviderError::Retryable("no card processor is configured".into())),
        },
    };
    let attempts = attempts + 1;
    let (sent, status, next_attempt_at, error): (Sent, &str, Option<DateTime<Utc>>, Option<String>) = match outcome {
        Ok(()) => (Sent::Done, "done", None, None),
        Err(ProviderError::Retryable(reason)) if (attempts as u32) < policy.attempts_max => {
            let wait = chrono::Duration::from_std(policy.backoff(attempts as u32)).unwrap_or(chrono::Duration::seconds(60));
            (Sent::Deferred, "pending", Some(Utc::now() + wait), Some(reason))
        }
        Err(error) => {
            tracing::error!(position, %target, %subject, %error, "the outside was not told; giving up on this action");
            (Sent::Failed, "failed", None, Some(error.to_string()))
        }
    };
    sqlx::query(
        "UPDATE outbox SET status = $2, attempts = $3, next_attempt_at = COALESCE($4, next_attempt_at), \
         last_error = $5, updated_at = now() WHERE position = $1",
    )
    .bind(position)
    .bind(status)
    .bind(attempts)
    .bind(next_attempt_at)
    .bind(error)
    .execute(&mut *tx)
    .await
    .map_err(StorageError::Read)?;
    tx.commit().await.map_err(StorageError::Read)?;
    Ok(Some(sent))
}

async fn tell_provider(
    flows: &Flows,
    provider: &dyn ServerProvider,
    server_id: uuid::Uuid,
    call: serde_json::Value,
    attempt: i32,
    last_attempt: bool,
) -> Result<Result<(), ProviderError>, FlowError> {
    let call = match serde_json::from_value::<ProviderCall>(call) {
        Ok(call) => call,
        Err(error) => return Ok(Err(ProviderError::Permanent(format!("the queued call does not decode: {error}")))),
    };
    let action = match call {
        ProviderCall::Provision { order_id } => return provision(flows, provider, order_id, attempt, last_attempt).await,
        ProviderCall::Act(action) => action,
    };
    let server = flows.handler.load::<domain::Server>(&ServerId(server_id).stream_id()).await?;
    Ok(match server.state.provider_server_id {
        None => Err(ProviderError::Permanent("the server was never provisioned".into())),
        Some(provider_server_id) => provider.act(&provider_server_id, action).await,
    })
}

/// The deploy saga's step: ask the provider for the order's server; then capture the hold as the
/// first hour (created) or release it (refused, or given up after the last attempt). The order,
/// the server and the hold each change state at most once, whoever else finishes the order.
async fn provision(
    flows: &Flows,
    provider: &dyn ServerProvider,
    order_id: OrderId,
    attempt: i32,
    last_attempt: bool,
) -> Result<Result<(), ProviderError>, FlowError> {
    let system = crate::handler::Metadata::actor("system", "outbox");
    let order = flows.handler.load::<domain::Order>(&order_id.stream_id()).await?;
    let Some(placed) = order.state.placed.clone() else {
        return Ok(Err(ProviderError::Permanent("no such order".into())));
    };
    if order.state.status != Some(domain::order::OrderStatus::Placed) {
        // Finished already (by an earlier attempt whose row update was lost).
        return Ok(Ok(()));
    }
    let server = flows.handler.load::<domain::Server>(&placed.server_id.stream_id()).await?;
    let location = server
        .state
        .ordered
        .as_ref()
        .map(|ordered| ordered.location.clone())
        .ok_or(FlowError::NotFound("server"))?;
    let request = domain::provider::ProvisionRequest {
        order_id,
        server_id: placed.server_id,
        plan_id: placed.plan_id.clone(),
        location,
    };
    let (outcome, result) = match provider.provision(request).await {
        Ok(provider_id) => (
            Ok(()),
            flows.complete_provisioning(order_id, &provider_id, &system).await.map(|_| ()),
        ),
        Err(ProviderError::Retryable(reason)) if !last_attempt => {
            tracing::warn!(%order_id, attempt, %reason, "provider busy; trying again later");
            return Ok(Err(ProviderError::Retryable(reason)));
        }
        Err(ProviderError::Retryable(reason)) => {
            let reason = format!("gave up after {attempt} attempts: {reason}");
            let result = flows.fail_provisioning(order_id, &reason, &system).await;
            (Err(ProviderError::Permanent(reason)), result)
        }
        Err(ProviderError::Permanent(reason)) => {
            let result = flows.fail_provisioning(order_id, &reason, &system).await;
            (Err(ProviderError::Permanent(reason)), result)
        }
    };
    match result {
        // Someone finished the saga first: the order says how it ended.
        Ok(()) | Err(FlowError::Order(domain::OrderError::AlreadyCompleted | domain::OrderError::AlreadyFailed)) => Ok(outcome),
        Err(error) => Err(error),
    }
}

async fn ask_for_refund(
    flows: &Flows,
    payments: &dyn PaymentGateway,
    action: serde_json::Value,
) -> Result<Result<(), ProviderError>, FlowError> {
    let refund = match serde_json::from_value::<CardRefund>(action) {
        Ok(refund) => refund,
        Err(error) => return Ok(Err(ProviderError::Permanent(format!("the queued refund does not decode: {error}")))),
    };
    let topup = flows.handler.load::<domain::topup::TopUp>(&refund.topup_id.stream_id()).await?;
    let (Some(requested), Some(payment_id)) = (topup.state.requested, topup.state.paid_by) else {
        return Ok(Err(ProviderError::Permanent("the refunded top-up has no payment".into())));
    };
    let amount_minor = match domain::Money::new(refund.amount, requested.currency).and_then(|money| money.to_minor_units()) {
        Ok(minor) => minor,
        Err(error) => return Ok(Err(ProviderError::Permanent(format!("the refund amount: {error}")))),
    };
    let request = RefundRequest {
        refund_id: refund.refund_id,
        topup_id: refund.topup_id,
        payment_id,
        amount_minor,
        currency: requested.currency,
    };
    Ok(payments.refund(request).await.map(|stripe_refund_id| {
        tracing::info!(refund_id = %refund.refund_id, %stripe_refund_id, "card refund asked of Stripe");
    }))
}
