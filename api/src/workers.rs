//! Background work: provisioning of placed orders (the simulated provider for now), the hourly
//! billing of every due (server, slot), and the deletion of servers whose cancellation is due.
//! `run_due` is what the dev clock and the serve loop call; every step is idempotent, so two
//! instances may run it at once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::{HourSlot, OrderId, ServerId};

use crate::flows::{FlowError, Flows, SlotOutcome};
use crate::handler::Metadata;

/// Slots one server is caught up by in one run, at most (a bound on a run's work).
const CATCH_UP_SLOTS_MAX: i64 = 24 * 62;

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DueReport {
    pub slots_charged: u64,
    pub slots_declined: u64,
    pub servers_deleted: u64,
    pub invoices_issued: u64,
}

fn system() -> Metadata {
    Metadata::actor("system", "scheduler")
}

async fn catch_up(pool: &sqlx::PgPool) -> Result<(), FlowError> {
    projections::runner::catch_up_all(pool).await.map_err(|error| FlowError::Invalid {
        field: "projections",
        reason: error.to_string(),
    })
}

/// Charges every due slot of every billable server up to the slot containing `now`, deletes
/// servers whose cancellation is due, and issues last month's invoices once its last slot is
/// billed. Reads the read models, brought up to date first.
pub async fn run_due(flows: &Flows, now: DateTime<Utc>) -> Result<DueReport, FlowError> {
    let pool = flows.handler.log().pool().clone();
    catch_up(&pool).await?;
    let mut report = DueReport::default();
    let current = HourSlot::containing(now);
    let due: Vec<(uuid::Uuid, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT server_id, next_charge_at FROM rm.servers WHERE status IN ('needs_setup', 'running', 'stopped') AND next_charge_at <= $1 ORDER BY server_id",
    )
    .bind(current.start())
    .fetch_all(&pool)
    .await
    .map_err(crate::handler::StorageError::Read)?;
    for (server_id, next_charge_at) in due {
        let Some(first) = next_charge_at else { continue };
        let mut slot = HourSlot::containing(first);
        let mut slots = 0;
        while slot <= current && slots < CATCH_UP_SLOTS_MAX {
            match flows.charge_slot(ServerId(server_id), slot, &system()).await? {
                SlotOutcome::Charged { .. } => report.slots_charged += 1,
                SlotOutcome::DeclinedAndSuspended => {
                    report.slots_declined += 1;
                    break;
                }
                SlotOutcome::AlreadyCharged => {}
                SlotOutcome::NotBillable => break,
            }
            slot = slot.next();
            slots += 1;
        }
    }
    let deletions: Vec<(uuid::Uuid,)> = sqlx::query_as(
        "SELECT server_id FROM rm.servers WHERE status IN ('pending_cancellation', 'deleting') AND cancellation_effective_at <= $1",
    )
    .bind(now)
    .fetch_all(&pool)
    .await
    .map_err(crate::handler::StorageError::Read)?;
    for (server_id,) in deletions {
        match flows.delete_due(ServerId(server_id), &system()).await {
            Ok(()) => report.servers_deleted += 1,
            // Another instance deleted it first.
            Err(FlowError::Server(domain::ServerError::WrongStatus("deleted"))) => {}
            Err(error) => return Err(error),
        }
    }
    // Last month's invoices: the charges above came first, so its last slot is billed.
    catch_up(&pool).await?;
    let this_month = domain::YearMonth::of(now);
    let last_month = domain::YearMonth::of(this_month.start() - chrono::Duration::hours(1));
    let uninvoiced: Vec<(uuid::Uuid,)> = sqlx::query_as(
        "SELECT DISTINCT s.account_id FROM rm.statement s \
         WHERE s.kind = 'charge' AND s.occurred_at >= $1 AND s.occurred_at < $2 \
           AND NOT EXISTS (SELECT 1 FROM rm.invoices i WHERE i.account_id = s.account_id AND i.period_start = $1) \
         ORDER BY s.account_id",
    )
    .bind(last_month.start())
    .bind(last_month.end())
    .fetch_all(&pool)
    .await
    .map_err(crate::handler::StorageError::Read)?;
    for (account_id,) in uninvoiced {
        if flows
            .issue_invoice(domain::AccountId(account_id), last_month, &system())
            .await?
            .is_some()
        {
            report.invoices_issued += 1;
        }
    }
    catch_up(&pool).await?;
    Ok(report)
}

/// The simulated provider: provisioning completes after `latency`, unless the order's location is
/// configured to fail. The server is stamped with the clock's instant at completion.
pub async fn provision_simulated(flows: Flows, order_id: OrderId, latency: Duration) -> Result<(), FlowError> {
    tokio::time::sleep(latency).await;
    let provider_id = format!("sim-{}", &order_id.0.simple().to_string()[..12]);
    match flows.complete_provisioning(order_id, &provider_id, &system()).await {
        Ok(_) => Ok(()),
        Err(FlowError::Order(domain::OrderError::AlreadyCompleted | domain::OrderError::AlreadyFailed)) => Ok(()),
        Err(error) => {
            tracing::error!(%error, %order_id, "provisioning failed; releasing the hold");
            flows.fail_provisioning(order_id, &error.to_string(), &system()).await
        }
    }
}
