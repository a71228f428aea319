//! Background work due at an instant: the hourly billing of every due (server, slot), resumption
//! once affordable, termination when unpaid, deletion of servers whose cancellation is due,
//! low-balance warnings and last month's invoices. `run_due` is what the dev clock and the serve
//! loop call; every step is idempotent, so two instances may run it at once. (Provisioning, and
//! whatever else the outside must hear of, goes through the outbox: `crate::outbox`.)

use std::time::Duration;

use chrono::{DateTime, Utc};
use domain::server::SuspensionReason;
use domain::{HourSlot, ServerId};

use crate::flows::{DueServer, FlowError, Flows, FoldedServer};
use crate::handler::Metadata;

/// Slots one server is caught up by in one run, at most (a bound on a run's work).
const CATCH_UP_SLOTS_MAX: i64 = 24 * 62;

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DueReport {
    pub slots_charged: u64,
    pub slots_declined: u64,
    pub servers_resumed: u64,
    pub servers_terminated: u64,
    pub servers_deleted: u64,
    pub invoices_issued: u64,
    pub low_balance_warnings: u64,
    /// Steps that failed (each logged and counted in `/metrics`); the others went on.
    pub failures: u64,
}

/// One step of due work failed for `subject`: logged and counted, and the run goes on with the
/// others (the step is tried again at the next run).
fn failed(report: &mut DueReport, step: &str, subject: uuid::Uuid, error: FlowError) {
    report.failures += 1;
    crate::metrics::record_due_work_failure();
    tracing::error!(%subject, %error, "{step} failed; the run goes on and tries it again next time");
}

/// Runs one round of background work in a task of its own, so that a panic in it is logged and
/// counted in `/metrics` instead of ending the loop that runs it (the scheduler goes on at its
/// next tick). None when the work failed or panicked.
pub async fn guarded<T, F>(what: &'static str, work: F) -> Option<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, FlowError>> + Send + 'static,
{
    match tokio::spawn(work).await {
        Ok(Ok(value)) => Some(value),
        Ok(Err(error)) => {
            crate::metrics::record_due_work_failure();
            tracing::error!(%error, "{what} failed; trying again at the next tick");
            None
        }
        Err(panic) => {
            crate::metrics::record_due_work_failure();
            tracing::error!(error = %panic, "{what} panicked; trying again at the next tick");
            None
        }
    }
}

fn system() -> Metadata {
    Metadata::actor("system", "scheduler")
}

async fn catch_up(pool: &sqlx::PgPool) -> Result<(), FlowError> {
    projections::runner::catch_up_all(pool).await?;
    Ok(())
}

/// Charges every due slot of every billable server up to the slot containing `now`, deletes
/// servers whose cancellation is due, and issues last month's invoices once its last slot is
/// billed. Reads the read models, brought up to date first.
pub async fn run_due(flows: &Flows, now: DateTime<Utc>) -> Result<DueReport, FlowError> {
    let pool = flows.handler.log().pool().clone();
    // `resume_affordable` and `bill_due` bring the read models up to date before reading them.
    let mut report = DueReport::default();
    let current = HourSlot::containing(now);
    report.servers_resumed += resume_affordable(flows, None).await?;
    let billed = bill_due(flows, current).await?;
    report.slots_charged += billed.charged;
    report.slots_declined += billed.declined;
    let deletions = crate::reads::deletions_due(&pool, now)
        .await
        .map_err(crate::handler::StorageError::Read)?;
    for server_id in deletions {
        match flows.delete_due(server_id, &system()).await {
            Ok(()) => report.servers_deleted += 1,
            // Another instance deleted it first.
            Err(FlowError::Server(domain::ServerError::WrongStatus("deleted"))) => {}
            Err(error) => failed(&mut report, "deleting a server", server_id.0, error),
        }
    }
    // Unpaid for too long: terminated.
    let overdue = crate::reads::unpaid_since(&pool, now - chrono::Duration::days(flows.settings.unpaid_days))
        .await
        .map_err(crate::handler::StorageError::Read)?;
    for server_id in overdue {
        let command = domain::ServerCommand::TerminateForNonPayment {
            unpaid_days: flows.settings.unpaid_days,
            at: now,
        };
        match flows.server_command(server_id, command, &system()).await {
            Ok(()) => report.servers_terminated += 1,
            Err(error) => failed(&mut report, "terminating an unpaid server", server_id.0, error),
        }
    }
    // Low balance: one warning per crossing below the runway threshold, cleared when restored.
    // With nothing billable (all suspended, say) the runway says nothing, and nothing changes.
    catch_up(&pool).await?;
    let crossings = crate::reads::runway_crossings(&pool, flows.settings.low_balance_hours)
        .await
        .map_err(crate::handler::StorageError::Read)?;
    for (account_id, burn) in crossings {
        let command = domain::AccountCommand::CheckRunway {
            hourly_burn_gross: burn,
            threshold_hours: rust_decimal::Decimal::from(flows.settings.low_balance_hours),
        };
        match flows.account_command(account_id, command, &system()).await {
            Ok(events) => {
                report.low_balance_warnings += events
                    .iter()
                    .filter(|event| matches!(event, domain::AccountEvent::LowBalanceWarned { .. }))
                    .count() as u64
            }
            Err(error) => failed(&mut report, "checking a runway", account_id.0, error),
        }
    }
    // Last month's invoices, once its last slot is billed (the billing above came first, and
    // caught up every missed slot). Which accounts had charges is read by the hour billed, not by
    // when the charge was recorded: a month caught up after downtime is invoiced too. A month is
    // looked at until every invoice of it is issued, then never again.
    let this_month = domain::YearMonth::of(now);
    let last_month = domain::YearMonth::of(this_month.start() - chrono::Duration::hours(1));
    let invoiced: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM invoiced_periods WHERE period = $1)")
        .bind(last_month.to_string())
        .fetch_one(&pool)
        .await
        .map_err(crate::handler::StorageError::Read)?;
    if !invoiced {
        catch_up(&pool).await?;
        // Every account with a server charged for a slot of the month or later (a superset of
        // those with charges in the month; an account without any gets no invoice).
        let candidates = crate::reads::accounts_billed_between(&pool, last_month.start(), last_month.end())
            .await
            .map_err(crate::handler::StorageError::Read)?;
        let mut complete = billed.failed_accounts == 0;
        for account_id in candidates {
            // An account the billing set aside may owe hours of the month: not invoiced until billed.
            if billed.failed.contains(&account_id) {
                continue;
            }
            match flows.issue_invoice(account_id, last_month, &system()).await {
                Ok(Some(_)) => report.invoices_issued += 1,
                Ok(None) => {}
                Err(error) => {
                    complete = false;
                    failed(&mut report, "issuing an invoice", account_id.0, error);
                }
            }
        }
        if complete {
            sqlx::query("INSERT INTO invoiced_periods (period) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(last_month.to_string())
                .execute(&pool)
                .await
                .map_err(crate::handler::StorageError::Read)?;
        }
    }
    // Stored idempotency keys past their retention.
    crate::idempotency::expire(&pool, flows.settings.idempotency_retention)
        .await
        .map_err(crate::handler::StorageError::Read)?;
    catch_up(&pool).await?;
    Ok(report)
}

/// Events one append of the billing run carries, at most (the log takes up to
/// `ledger::APPEND_EVENTS_MAX`; a batch's estimate counts every slot it may charge and a
/// suspension per server).
pub const BILL_BATCH_EVENTS: usize = 10_000;
/// Batches of the billing run decided and appended at once.
const BILL_BATCHES_IN_FLIGHT: usize = 3;
/// Passes of one run, at most: each catches every server up by as many slots as its batch allows.
const BILL_PASSES_MAX: usize = 10_000;

/// One account's share of a batch: its servers (or some of them) with their first due slot, and
/// how many slots each may be charged in this pass.
struct Work {
    account_id: domain::AccountId,
    servers: Vec<DueServer>,
    slots_max: usize,
    /// The events this work may append, at most.
    events: usize,
    /// Some server has more slots due than this pass charges.
    truncated: bool,
}

/// Splits what is due into work of at most `BILL_BATCH_EVENTS` events each: an account with many
/// servers or many missed slots is caught up over several passes, never in one oversized append.
fn plan(due: Vec<crate::reads::DueRow>, until: HourSlot) -> Vec<Work> {
    let mut accounts: Vec<(domain::AccountId, Vec<DueServer>)> = Vec::new();
    for row in due {
        let account_id = domain::AccountId(row.account_id);
        // A row folded from a known version of a billable server's stream: billed from the row.
        let folded = match (row.version, row.first_billable_slot, domain::PlanId::parse(&row.plan_id)) {
            (version, Some(first_billable_slot), Ok(plan_id)) if version > 0 => Some(FoldedServer {
                plan_id,
                billable_from: HourSlot::containing(first_billable_slot),
                version,
            }),
            _ => None,
        };
        let entry = DueServer {
            server_id: ServerId(row.server_id),
            first: HourSlot::containing(row.next_charge_at),
            folded,
        };
        match accounts.last_mut() {
            Some((last, servers)) if *last == account_id => servers.push(entry),
            _ => accounts.push((account_id, vec![entry])),
        }
    }
    let slots_due = |first: HourSlot| (((until.start() - first.start()).num_hours() + 1).max(1) as usize).min(CATCH_UP_SLOTS_MAX as usize);
    let mut work = Vec::new();
    for (account_id, servers) in accounts {
        // Each server costs its slots plus one suspension, so a chunk of servers and a cap on
        // slots per server keep the work under the bound.
        let servers_max = BILL_BATCH_EVENTS / 2;
        for chunk in servers.chunks(servers_max) {
            let slots_max = (BILL_BATCH_EVENTS / chunk.len() - 1).clamp(1, CATCH_UP_SLOTS_MAX as usize);
            let events = chunk.iter().map(|server| slots_due(server.first).min(slots_max) + 1).sum();
            let truncated = chunk.iter().any(|server| slots_due(server.first) > slots_max);
            work.push(Work {
                account_id,
                servers: chunk.to_vec(),
                slots_max,
                events,
                truncated,
            });
        }
    }
    work
}

/// The hourly billing, set-based: one query finds every billable server with a slot due up to
/// `until` (from the servers read model, brought up to date first), in account order; batches
/// of accounts bounded by the events they may append are decided and appended at once
/// (`Flows::charge_due_batch`) while the query's later rows are still being read, and passes
/// repeat until every server is caught up. A batch that
/// fails is retried account by account; an account that fails alone is set aside (logged and
/// counted in `/metrics`) and the run goes on with the rest of the fleet.
pub async fn bill_due(flows: &Flows, until: HourSlot) -> Result<crate::flows::BatchCharges, FlowError> {
    bill_due_reading(flows, until, crate::reads::DUE_ROWS_PER_FETCH).await
}

/// `bill_due`, reading the due rows `rows_per_read` at a time.
pub async fn bill_due_reading(flows: &Flows, until: HourSlot, rows_per_read: usize) -> Result<crate::flows::BatchCharges, FlowError> {
    let started = std::time::Instant::now();
    let pool = flows.handler.log().pool().clone();
    let mut total = crate::flows::BatchCharges::default();
    let mut failed: std::collections::HashSet<domain::AccountId> = std::collections::HashSet::new();
    let mut read_error = None;
    for _ in 0..BILL_PASSES_MAX {
        let pass_started = std::time::Instant::now();
        catch_up(&pool).await?;
        let caught_up = pass_started.elapsed();
        let due = DueWork::open(&pool, until, rows_per_read)
            .await
            .map_err(crate::handler::StorageError::Read)?;
        // The log as the rows were folded, to guard the appends by the rows' versions.
        let seen_at = flows
            .handler
            .log()
            .seen_at(due.checkpoint())
            .await
            .map_err(crate::handler::StorageError::Read)?;
        let first_read = pass_started.elapsed();
        let pass = bill_pass(flows, due, &failed, until, seen_at).await;
        tracing::debug!(
            servers = pass.rows,
            charged = pass.charges.charged,
            catch_up_ms = caught_up.as_secs_f64() * 1e3,
            first_rows_ms = (first_read - caught_up).as_secs_f64() * 1e3,
            batches_ms = (pass_started.elapsed() - first_read).as_secs_f64() * 1e3,
            "billing pass"
        );
        total.charged += pass.charges.charged;
        total.declined += pass.charges.declined;
        total.skipped += pass.charges.skipped;
        failed.extend(pass.failed);
        if let Some(error) = pass.read_error {
            read_error = Some(error);
            break;
        }
        if !pass.more || pass.charges.charged + pass.charges.declined == 0 {
            break;
        }
    }
    total.failed_accounts = failed.len() as u64;
    total.failed = failed.into_iter().collect();
    // A run cut short by a failed read still counts what it charged and set aside.
    crate::metrics::record_billing_run(started.elapsed(), total.charged);
    crate::metrics::record_billing_failures(total.failed_accounts);
    match read_error {
        Some(error) => {
            // What the run's batches appended stands; the next run goes on from the read model.
            tracing::error!(%error, charged = total.charged, "reading the due servers failed part way; the run stopped");
            Err(crate::handler::StorageError::Read(error).into())
        }
        None => Ok(total),
    }
}

struct Pass {
    charges: crate::flows::BatchCharges,
    failed: Vec<domain::AccountId>,
    /// Due rows read.
    rows: usize,
    /// Some server has more slots due than this pass charged.
    more: bool,
    /// Reading the due rows failed part way: the batches before it were billed, no more were.
    read_error: Option<sqlx::Error>,
}

impl Pass {
    fn new() -> Pass {
        Pass {
            charges: crate::flows::BatchCharges::default(),
            failed: Vec::new(),
            rows: 0,
            more: false,
            read_error: None,
        }
    }

    fn add(&mut self, other: Pass) {
        self.charges.charged += other.charges.charged;
        self.charges.declined += other.charges.declined;
        self.charges.skipped += other.charges.skipped;
        self.failed.extend(other.failed);
    }
}

/// What one pass has due, as work of at most `BILL_BATCH_EVENTS` events each, planned from the
/// due rows as they are read (`crate::reads::DueCursor`, `Planner`): the first rows before the
/// pass starts (they give the read model's checkpoint), the rest by a task of their own that
/// reads them to the end as fast as they come, so the cursor's transaction lasts as long as the
/// query and not as long as the pass.
struct DueWork {
    chunks: tokio::sync::mpsc::UnboundedReceiver<Result<Option<Vec<crate::reads::DueRow>>, sqlx::Error>>,
    checkpoint: i64,
    planner: Planner,
    ready: std::collections::VecDeque<Work>,
    rows: usize,
    /// Some work taken has a server with more slots due than this pass charges.
    more: bool,
    done: bool,
}

/// Plans due rows read in chunks in account order: an account's rows are planned once a later
/// account's have been read (or the last chunk was), so its servers are never split.
struct Planner {
    until: HourSlot,
    /// Rows read and not planned yet: the last account's, which the next chunk may continue.
    held: Vec<crate::reads::DueRow>,
}

impl Planner {
    /// The work of every account a chunk completes.
    fn read(&mut self, chunk: Vec<crate::reads::DueRow>) -> Vec<Work> {
        self.held.extend(chunk);
        let Some(last) = self.held.last().map(|row| row.account_id) else {
            return Vec::new();
        };
        // Rows come in account order: the last account's begin at its first row.
        let split = self
            .held
            .iter()
            .position(|row| row.account_id == last)
            .expect("the last row's account");
        let complete: Vec<_> = self.held.drain(..split).collect();
        plan(complete, self.until)
    }

    /// The work of what is held, once the last chunk has been read.
    fn finish(&mut self) -> Vec<Work> {
        plan(std::mem::take(&mut self.held), self.until)
    }
}

impl DueWork {
    async fn open(pool: &sqlx::PgPool, until: HourSlot, rows_per_read: usize) -> Result<DueWork, sqlx::Error> {
        let mut cursor = crate::reads::DueCursor::open(pool, until.start(), rows_per_read).await?;
        let first = cursor.next_chunk().await?;
        let checkpoint = cursor.checkpoint();
        let (sender, chunks) = tokio::sync::mpsc::unbounded_channel();
        let more = first.is_some();
        let _ = sender.send(Ok(first));
        if more {
            tokio::spawn(async move {
                loop {
                    let read = cursor.next_chunk().await;
                    let last = !matches!(read, Ok(Some(_)));
                    if sender.send(read).is_err() || last {
                        return;
                    }
                }
            });
        }
        Ok(DueWork {
            chunks,
            checkpoint,
            planner: Planner { until, held: Vec::new() },
            ready: std::collections::VecDeque::new(),
            rows: 0,
            more: false,
            done: false,
        })
    }

    fn checkpoint(&self) -> i64 {
        self.checkpoint
    }

    /// Takes the next chunk read and plans every account it completes (all that is held, after
    /// the last chunk).
    async fn read(&mut self) -> Result<(), sqlx::Error> {
        let read = self.chunks.recv().await.unwrap_or_else(|| {
            // The reading task ended without saying the rows were all read: it panicked.
            Err(sqlx::Error::Protocol("the due rows' reader stopped before the last row".into()))
        });
        match read? {
            Some(chunk) => {
                self.rows += chunk.len();
                self.ready.extend(self.planner.read(chunk));
            }
            None => {
                self.ready.extend(self.planner.finish());
                self.done = true;
            }
        }
        Ok(())
    }

    /// The next batch: the work of accounts not set aside, at most `BILL_BATCH_EVENTS` events
    /// (or one work alone); empty once everything due is taken.
    async fn next_batch(&mut self, failed: &std::collections::HashSet<domain::AccountId>) -> Result<Vec<Work>, sqlx::Error> {
        let mut batch = Vec::new();
        let mut events = 0;
        while let Some(next) = self.next().await? {
            if failed.contains(&next.account_id) {
                continue;
            }
            if events > 0 && events + next.events > BILL_BATCH_EVENTS {
                self.ready.push_front(next);
                break;
            }
            self.more |= next.truncated;
            events += next.events;
            batch.push(next);
        }
        Ok(batch)
    }

    /// The next work, reading as needed; `None` once everything due is planned and taken.
    async fn next(&mut self) -> Result<Option<Work>, sqlx::Error> {
        loop {
            if let Some(work) = self.ready.pop_front() {
                return Ok(Some(work));
            }
            if self.done {
                return Ok(None);
            }
            self.read().await?;
        }
    }
}

/// One pass: the work packed into batches of at most `BILL_BATCH_EVENTS` events, a few in flight
/// while the rest of the due rows are read.
async fn bill_pass(
    flows: &Flows,
    mut due: DueWork,
    failed: &std::collections::HashSet<domain::AccountId>,
    until: HourSlot,
    seen_at: Option<ledger::SeenAt>,
) -> Pass {
    let mut pass = Pass::new();
    // Batches touch disjoint accounts (but for a huge account's chunks, which then conflict and
    // retry), so several are decided and appended at once: while one waits for its append,
    // another is read and decided (and the log's writer groups appends).
    let mut in_flight = tokio::task::JoinSet::new();
    let mut exhausted = false;
    loop {
        while in_flight.len() < BILL_BATCHES_IN_FLIGHT && !exhausted {
            match due.next_batch(failed).await {
                Ok(batch) if !batch.is_empty() => {
                    let flows = flows.clone();
                    in_flight.spawn(async move { bill_batch(&flows, batch, until, seen_at).await });
                }
                Ok(_) => exhausted = true,
                Err(error) => {
                    pass.read_error = Some(error);
                    exhausted = true;
                }
            }
        }
        let Some(done) = in_flight.join_next().await else {
            break;
        };
        match done {
            Ok(done) => pass.add(done),
            Err(error) => {
                // A panic in a batch: its accounts are simply not billed this pass.
                tracing::error!(%error, "a billing batch panicked; its accounts are left for the next run");
                crate::metrics::record_due_work_failure();
            }
        }
    }
    pass.rows = due.rows;
    pass.more = due.more;
    pass
}

/// Charges a batch in one append; if that fails, each account alone, setting aside those that fail.
async fn bill_batch(flows: &Flows, batch: Vec<Work>, until: HourSlot, seen_at: Option<ledger::SeenAt>) -> Pass {
    let appendable = |work: &[Work]| -> Vec<(domain::AccountId, Vec<DueServer>, usize)> {
        work.iter()
            .map(|work| (work.account_id, work.servers.clone(), work.slots_max))
            .collect()
    };
    let mut pass = Pass::new();
    match flows.charge_due_batch(&appendable(&batch), until, seen_at, &system()).await {
        Ok(charges) => pass.charges = charges,
        Err(error) if batch.len() > 1 => {
            tracing::warn!(%error, accounts = batch.len(), "a billing batch failed; billing its accounts one by one");
            for work in batch {
                // An account that fails alone is the one its attempt sets aside.
                pass.add(Box::pin(bill_batch(flows, vec![work], until, seen_at)).await);
            }
        }
        Err(error) => {
            let account_id = batch.first().map(|work| work.account_id);
            tracing::error!(%error, account_id = ?account_id, "billing an account failed; it is set aside and the run goes on");
            pass.failed.extend(account_id);
        }
    }
    pass
}

/// Resumes servers suspended for non-payment whose account can now pay for the slot in progress
/// (of one account, or of all), charging that slot. Returns how many were resumed.
pub async fn resume_affordable(flows: &Flows, account_id: Option<domain::AccountId>) -> Result<u64, FlowError> {
    let pool = flows.handler.log().pool().clone();
    catch_up(&pool).await?;
    let suspended = crate::reads::suspended_servers(&pool, account_id, SuspensionReason::NonPayment.as_str())
        .await
        .map_err(crate::handler::StorageError::Read)?;
    let mut resumed = 0;
    for (server_id, account) in suspended {
        let affordable = crate::reads::affords_an_hour(&pool, account, server_id)
            .await
            .map_err(crate::handler::StorageError::Read)?;
        if !affordable {
            continue;
        }
        match flows.resume(server_id, &system()).await {
            Ok(crate::flows::SlotOutcome::NotAffordable) => {}
            Ok(_) => {
                resumed += 1;
                catch_up(&pool).await?;
            }
            // One server that cannot be resumed now does not keep the others suspended.
            Err(error) => {
                crate::metrics::record_due_work_failure();
                tracing::error!(%server_id, %error, "resuming a server failed; tried again at the next run");
            }
        }
    }
    Ok(resumed)
}

/// How the outbox retries a provider (or Stripe) that is busy, locked or slow.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub attempts_max: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long an outbox claim lasts: longer than any call to the outside, so only a dispatcher
    /// that died leaves one to run out (and another takes its row up).
    pub lease: Duration,
}

impl RetryPolicy {
    pub fn backoff(&self, attempt: u32) -> Duration {
        (self.backoff_base * 2u32.saturating_pow(attempt.saturating_sub(1).min(16))).min(self.backoff_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(account: u128, server: u128) -> crate::reads::DueRow {
        crate::reads::DueRow {
            account_id: uuid::Uuid::from_u128(account),
            server_id: uuid::Uuid::from_u128(server),
            next_charge_at: "2027-03-01T10:00:00Z".parse().unwrap(),
            plan_id: "vps-1g".into(),
            first_billable_slot: Some("2027-03-01T09:00:00Z".parse().unwrap()),
            version: 2,
        }
    }

    #[test]
    fn an_account_whose_rows_straddle_two_reads_is_planned_whole_once() {
        let until = HourSlot::containing("2027-03-01T12:10:00Z".parse().unwrap());
        let mut planner = Planner { until, held: Vec::new() };
        // Accounts 1 to 4 with 3, 1, 4 and 2 servers, read three rows at a time.
        let rows: Vec<_> = [(1, 3), (2, 1), (3, 4), (4, 2)]
            .into_iter()
            .flat_map(|(account, servers)| (0..servers).map(move |server| row(account, account * 10 + server)))
            .collect();
        let mut planned: Vec<Vec<Work>> = rows.chunks(3).map(|chunk| planner.read(chunk.to_vec())).collect();
        planned.push(planner.finish());
        let accounts =
            |works: &[Work]| -> Vec<(u128, usize)> { works.iter().map(|work| (work.account_id.0.as_u128(), work.servers.len())).collect() };
        let by_read: Vec<_> = planned.iter().map(|works| accounts(works)).collect();
        assert_eq!(
            by_read,
            vec![vec![], vec![(1, 3), (2, 1)], vec![(3, 4)], vec![], vec![(4, 2)]],
            "each account once, with all its servers, once a later account's rows or the end are read"
        );
        let work = &planned[2][0];
        assert_eq!(
            (work.slots_max, work.events, work.truncated),
            ((BILL_BATCH_EVENTS / 4 - 1).min(CATCH_UP_SLOTS_MAX as usize), 4 * (3 + 1), false)
        );
        assert!(planner.finish().is_empty());
    }
}
