//! The outbox: after the log records a change the outside must hear of, it is told once, in the
//! order the changes happened to their subject. The VPS provider is asked to create the server of
//! a placed order (the deploy saga: the hold is captured or released by the answer) and hears of
//! a provisioned server's setup, reinstall, power actions, suspension, resumption and deletion;
//! the card processor of a card refund.
//!
//! `fill` turns the log's events into outbox rows, in the transaction that moves the outbox's own
//! position (`outbox_head`), so each event gets exactly one row whoever runs it. `dispatch`
//! claims the oldest pending row of each subject with a lease (`FOR UPDATE SKIP LOCKED`, then
//! committed, so no transaction or connection is held while the outside answers), calls out, and
//! marks the row done, due again later (a busy, locked, slow or absent party, with capped
//! backoff) or failed. Two instances never send one row at once (the lease), a dispatcher that
//! dies mid-call leaves a lease that runs out, and a subject's later action waits for its earlier
//! ones. A call whose answer was lost is sent again; the provider's actions are safe to repeat,
//! creating a server finds one already made for the same server id, and Stripe's refunds carry an
//! idempotency key. `reconcile_orphans` deletes servers the provider holds that the log says
//! should not exist.

use chrono::{DateTime, Utc};
use domain::account::{AccountCommand, AccountEvent};
use domain::order::OrderEvent;
use domain::payments::{PaymentGateway, RefundRequest, RefundStatus};
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
        let decoded: ServerEvent = domain::decode_event(&event.event_type, event.schema_version, event.payload.clone())
            .map_err(|error| tracing::error!(position = event.position, %error, "a server event does not decode; the provider is not told"))
            .ok()?;
        let call = ProviderCall::Act(ServerAction::for_event(&decoded)?);
        return Some(("provider", server_id, serde_json::to_value(call).expect("calls serialise")));
    }
    if event.stream_id.starts_with("order-") && event.event_type == "OrderPlaced" {
        let Ok(OrderEvent::OrderPlaced { order_id, server_id, .. }) =
            domain::decode_event::<OrderEvent>(&event.event_type, event.schema_version, event.payload.clone())
        else {
            tracing::error!(position = event.position, "a placed order does not decode; it is not provisioned");
            return None;
        };
        let call = ProviderCall::Provision { order_id };
        return Some(("provider", server_id.0, serde_json::to_value(call).expect("calls serialise")));
    }
    if event.stream_id.starts_with("account-") && event.event_type == "CardRefundRequested" {
        let Ok(AccountEvent::CardRefundRequested {
            refund_id,
            topup_id,
            amount,
            at_processor,
            ..
        }) = domain::decode_event::<AccountEvent>(&event.event_type, event.schema_version, event.payload.clone())
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

/// Attempts after which a row still pending is overdue (logged, and counted in `/metrics`).
pub const OVERDUE_ATTEMPTS: i32 = 5;

/// Claims the oldest row that may go now with a lease (committed at once: no transaction is held
/// across the call), calls out, and records how it went; None when no row may go now.
///
/// The provider's actions (build, power, suspend, unsuspend, delete) are retried with capped
/// backoff until they succeed: a server must not run unbilled because the provider was down for
/// a while. A refusal is marked failed and logged. The deploy saga gives up after
/// `policy.attempts_max` (the hold is released). A card refund is retried while Stripe is
/// unavailable; refused, the refund fails and the money goes back to the wallet.
async fn dispatch_one(flows: &Flows, parties: Parties<'_>, policy: RetryPolicy, targets: &[&str]) -> Result<Option<Sent>, FlowError> {
    let pool = flows.handler.log().pool();
    let claimed: Option<(i64, String, uuid::Uuid, serde_json::Value, i32)> = sqlx::query_as(
        "WITH next AS ( \
             SELECT o.position FROM outbox o \
             WHERE o.status = 'pending' AND o.next_attempt_at <= now() AND o.claimed_until < now() AND o.target = ANY($1) \
               AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.subject = o.subject AND p.status = 'pending' AND p.position < o.position) \
             ORDER BY o.position LIMIT 1 FOR UPDATE SKIP LOCKED) \
         UPDATE outbox SET claimed_until = now() + make_interval(secs => $2), attempts = outbox.attempts + 1, updated_at = now() \
         FROM next WHERE outbox.position = next.position \
         RETURNING outbox.position, outbox.target, outbox.subject, outbox.action, outbox.attempts",
    )
    .bind(targets)
    .bind(policy.lease.as_secs_f64())
    .fetch_optional(pool)
    .await
    .map_err(StorageError::Read)?;
    let Some((position, target, subject, action, attempts)) = claimed else {
        return Ok(None);
    };
    let provisioning = matches!(
        serde_json::from_value::<ProviderCall>(action.clone()),
        Ok(ProviderCall::Provision { .. })
    );
    let outcome = match target.as_str() {
        "provider" => {
            let last_attempt = attempts as u32 >= policy.attempts_max;
            tell_provider(flows, parties.provider, subject, action, attempts, last_attempt).await?
        }
        _ => match parties.payments {
            Some(payments) => ask_for_refund(flows, payments, action).await?,
            None => Err(ProviderError::Retryable("no card processor is configured".into())),
        },
    };
    let (sent, status, next_attempt_at, error): (Sent, &str, Option<DateTime<Utc>>, Option<String>) = match outcome {
        Ok(()) => (Sent::Done, "done", None, None),
        // The saga's retries are bounded (`provision` gave up and released the hold on the last).
        Err(ProviderError::Retryable(reason)) if !provisioning || (attempts as u32) < policy.attempts_max => {
            if attempts >= OVERDUE_ATTEMPTS {
                tracing::warn!(position, %target, %subject, attempts, %reason, "the outside has not been told for a while; still trying");
            }
            let wait = chrono::Duration::from_std(policy.backoff(attempts as u32)).unwrap_or(chrono::Duration::seconds(60));
            (Sent::Deferred, "pending", Some(Utc::now() + wait), Some(reason))
        }
        Err(error) => {
            tracing::error!(position, %target, %subject, %error, "the outside refused; this action is given up and needs a person");
            (Sent::Failed, "failed", None, Some(error.to_string()))
        }
    };
    sqlx::query(
        "UPDATE outbox SET status = $2, next_attempt_at = COALESCE($3, next_attempt_at), claimed_until = '-infinity', \
         last_error = $4, updated_at = now() WHERE position = $1",
    )
    .bind(position)
    .bind(status)
    .bind(next_attempt_at)
    .bind(error)
    .execute(pool)
    .await
    .map_err(StorageError::Read)?;
    Ok(Some(sent))
}

/// Rows still pending after `OVERDUE_ATTEMPTS` attempts, or for more than five minutes.
pub async fn overdue(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE status = 'pending' AND (attempts >= $1 OR created_at < now() - interval '5 minutes')",
    )
    .bind(OVERDUE_ATTEMPTS)
    .fetch_one(pool)
    .await
}

/// Servers the provider holds that should not exist: made for an order whose provisioning
/// failed (its hold released), duplicates of a server the log knows under another provider id,
/// and servers the log has deleted. Each is deleted at the provider; returns how many. Servers
/// that carry no id of ours, or an id the log does not know, are left alone.
pub async fn reconcile_orphans(flows: &Flows, provider: &dyn ServerProvider) -> Result<u64, FlowError> {
    let listed = match provider.servers().await {
        Ok(listed) => listed,
        Err(error) => {
            tracing::warn!(%error, "could not list the provider's servers; orphans are looked for later");
            return Ok(0);
        }
    };
    let mut deleted = 0;
    for (provider_server_id, server_id) in listed {
        let Some(server_id) = server_id else {
            continue;
        };
        let server = flows.handler.load::<domain::Server>(&server_id.stream_id()).await?;
        let orphan = match server.state.status() {
            None | Some(domain::server::Status::Provisioning) => false,
            Some(domain::server::Status::Failed | domain::server::Status::Deleted) => true,
            Some(_) => server.state.provider_server_id.as_deref() != Some(provider_server_id.as_str()),
        };
        if !orphan {
            continue;
        }
        match provider.act(&provider_server_id, ServerAction::Delete).await {
            Ok(()) => {
                tracing::warn!(%server_id, %provider_server_id, "deleted an orphaned server at the provider");
                deleted += 1;
            }
            Err(error) => tracing::warn!(%server_id, %provider_server_id, %error, "an orphaned server could not be deleted yet"),
        }
    }
    Ok(deleted)
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
    Ok(match server.state.provider_server_id.clone() {
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
    let (Some(requested), Some(payment_id)) = (topup.state.requested.clone(), topup.state.paid_by.clone()) else {
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
    let system = crate::handler::Metadata::actor("system", "outbox");
    let settle = |command: AccountCommand| async move {
        match flows.account_command(requested.account_id, command, &system).await {
            // Settled already (by Stripe's `refund.updated`, which may come first).
            Ok(_) | Err(FlowError::Account(domain::AccountError::RefundSettled(_))) => Ok(()),
            Err(error) => Err(error),
        }
    };
    match payments.refund(request).await {
        Ok(made) => {
            tracing::info!(refund_id = %refund.refund_id, stripe_refund_id = %made.id, status = ?made.status, "card refund asked of Stripe");
            match made.status {
                // Made at once (as most card refunds are): completed now, not on a webhook.
                RefundStatus::Succeeded => {
                    settle(AccountCommand::CompleteCardRefund {
                        refund_id: refund.refund_id,
                    })
                    .await?
                }
                RefundStatus::Failed => {
                    settle(AccountCommand::FailCardRefund {
                        refund_id: refund.refund_id,
                    })
                    .await?
                }
                RefundStatus::Pending => {}
            }
            Ok(Ok(()))
        }
        Err(ProviderError::Permanent(reason)) => {
            // Refused for good: the refund fails and the wallet gets the money back.
            tracing::error!(refund_id = %refund.refund_id, %reason, "Stripe refused a card refund; the wallet is credited back");
            settle(AccountCommand::FailCardRefund {
                refund_id: refund.refund_id,
            })
            .await?;
            Ok(Err(ProviderError::Permanent(reason)))
        }
        Err(retryable) => Ok(Err(retryable)),
    }
}
