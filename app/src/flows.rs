//! The product's commands over several aggregates, each one atomic append: open an account,
//! settle a top-up, place an order (hold + order + server), complete or fail provisioning
//! (capture or release), charge a slot (declined: suspend), cancel (pro-rata refund), revoke,
//! delete, refunds, adjustments, disputes, invoices and credit notes.

use chrono::{DateTime, Utc};
use domain::account::{Account, AccountCommand, AccountError, AccountEvent};
use domain::catalog::{Catalog, CatalogCommand, CatalogError, Fixtures, CATALOG_STREAM};
use domain::invoice::{
    build_invoice, series_stream, BilledCharge, BilledRefund, CreditNoteDraft, InvoiceError, InvoiceSeries, InvoiceSeriesCommand,
    RefundKind,
};
use domain::order::{Order, OrderCommand, OrderError};
use domain::server::{CancellationMode, PowerAction, Server, ServerCommand, ServerError, SuspensionReason};
use domain::{
    AccountId, AdjustmentId, ChargeId, Country, Currency, DisputeId, Hostname, HourSlot, InvoiceId, Location, OrderId, PlanId, RefundId,
    ServerId, TaxRate, TopUpId, YearMonth,
};
use rust_decimal::Decimal;

use crate::handler::{CommandHandler, Commit, HandlerError, Metadata, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Order(#[from] OrderError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Invoice(#[from] InvoiceError),
    #[error(transparent)]
    TopUp(#[from] domain::topup::TopUpError),
    #[error("no {0}")]
    NotFound(&'static str),
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("the command lost {attempts} races for its streams; try again")]
    Contended { attempts: u32 },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the read models: {0}")]
    Projections(#[from] projections::ProjectionError),
}

impl From<HandlerError<FlowError>> for FlowError {
    fn from(error: HandlerError<FlowError>) -> FlowError {
        match error {
            HandlerError::Rejected(error) => error,
            HandlerError::Contended { attempts } => FlowError::Contended { attempts },
            HandlerError::Storage(error) => FlowError::Storage(error),
        }
    }
}

type Result<T> = std::result::Result<T, FlowError>;

/// Runs `$body` (which uses `$unit`) and commits, retrying on conflict; evaluates to the body's value.
macro_rules! atomically {
    ($flows:expr, $metadata:expr, |$unit:ident| $body:block) => {{
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            #[allow(unused_mut)]
            let mut $unit = $flows.handler.unit();
            let value = $body;
            match $flows.handler.commit::<FlowError>($unit, $metadata, attempt).await? {
                Commit::Done(_) => break value,
                Commit::Retry => continue,
            }
        }
    }};
}

/// What charging a slot did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotOutcome {
    Charged {
        charge_id: ChargeId,
        capped: bool,
    },
    /// Declined for insufficient funds; the server is now suspended.
    DeclinedAndSuspended,
    AlreadyCharged,
    NotBillable,
    /// A resumption the wallet cannot pay for: nothing was done.
    NotAffordable,
}

/// What one batch of the billing run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchCharges {
    pub charged: u64,
    pub declined: u64,
    /// Listed servers the log does not know as the account's (a stale read model): not charged.
    pub skipped: u64,
    /// Accounts set aside by the run because charging them failed (the others were billed).
    pub failed_accounts: u64,
    /// Which: they are not invoiced until they are billed.
    pub failed: Vec<AccountId>,
}

#[derive(Clone)]
pub struct Flows {
    pub handler: CommandHandler,
}

async fn unit_load<A: crate::handler::StreamAggregate + 'static>(
    unit: &mut crate::handler::Unit,
    stream_id: &str,
) -> Result<crate::handler::Loaded<A>> {
    Ok(unit.load::<A>(stream_id).await?)
}

impl Flows {
    pub fn new(handler: CommandHandler) -> Flows {
        Flows { handler }
    }

    fn now(&self) -> DateTime<Utc> {
        self.handler.now()
    }

    /// Whether a request with `metadata`'s idempotency key already has its effect in the log (a
    /// retry of a request whose answer was lost): then the command is not run again, and answers
    /// as the first run did (the ids it made are derived from the key).
    pub async fn replayed(&self, metadata: &Metadata) -> Result<bool> {
        let Some(key) = &metadata.idempotency_key else {
            return Ok(false);
        };
        // Within the keys' retention: a key reused after it is a new request (whose ids, derived
        // from the key, the domain then refuses to make again, as a conflict).
        let found: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM events WHERE metadata ? 'idempotency_key' AND metadata->>'idempotency_key' = $1 \
             AND recorded_at > $2)",
        )
        .bind(key)
        .bind(chrono::Utc::now() - crate::idempotency::retention())
        .fetch_one(self.handler.log().pool())
        .await
        .map_err(StorageError::Read)?;
        Ok(found)
    }

    pub async fn sync_catalog(&self, fixtures: Fixtures, metadata: &Metadata) -> Result<usize> {
        let at = self.now();
        let committed = self
            .handler
            .execute::<Catalog>(
                CATALOG_STREAM,
                CatalogCommand::Sync {
                    fixtures,
                    effective_at: at,
                },
                metadata,
            )
            .await
            .map_err(map_single)?;
        Ok(committed.value.len())
    }

    pub async fn open_account(
        &self,
        account_id: AccountId,
        name: &str,
        email: &str,
        currency: Currency,
        country: Country,
        metadata: &Metadata,
    ) -> Result<()> {
        if self.replayed(metadata).await? {
            return Ok(());
        }
        let command = AccountCommand::Open {
            account_id,
            name: name.to_string(),
            email: email.to_string(),
            currency,
            country,
            at: self.now(),
        };
        self.handler
            .execute::<Account>(&account_id.stream_id(), command, metadata)
            .await
            .map_err(map_single)?;
        Ok(())
    }

    /// Settles a paid top-up (idempotent by payment id).
    pub async fn settle_topup(
        &self,
        account_id: AccountId,
        topup_id: TopUpId,
        payment_id: &str,
        amount: Decimal,
        metadata: &Metadata,
    ) -> Result<bool> {
        let command = AccountCommand::SettleTopUp {
            topup_id,
            payment_id: payment_id.to_string(),
            amount,
        };
        let committed = self
            .handler
            .execute::<Account>(&account_id.stream_id(), command, metadata)
            .await
            .map_err(map_single)?;
        Ok(!committed.value.is_empty())
    }

    /// The net and tax of a server's first hour for an account, at the current price.
    async fn first_hour(
        &self,
        unit: &mut crate::handler::Unit,
        account: &Account,
        plan_id: &PlanId,
        at: DateTime<Utc>,
    ) -> Result<(Decimal, Decimal, TaxRate)> {
        let opened = account.opened().ok_or(FlowError::NotFound("account"))?;
        let catalog = unit_load::<Catalog>(unit, CATALOG_STREAM).await?;
        catalog.state.orderable(plan_id, at)?;
        let price = catalog
            .state
            .monthly_price(plan_id, opened.currency, at)
            .ok_or_else(|| FlowError::Invalid {
                field: "plan_id",
                reason: format!("{plan_id} has no price in {}", opened.currency),
            })?;
        let tax_rate = catalog.state.tax_rate(opened.country, at);
        let charge = domain::billing::slot_charge(price.amount, Decimal::ZERO, tax_rate);
        Ok((charge.net, charge.tax, tax_rate))
    }

    /// Places a deploy order: the first hour is held on the wallet, the order and the server recorded.
    pub async fn place_order(
        &self,
        account_id: AccountId,
        plan_id: PlanId,
        location: Location,
        order_id: OrderId,
        server_id: ServerId,
        metadata: &Metadata,
    ) -> Result<()> {
        if self.replayed(metadata).await? {
            return Ok(());
        }
        let at = self.now();
        atomically!(self, metadata, |unit| {
            let catalog = unit_load::<Catalog>(&mut unit, CATALOG_STREAM).await?;
            catalog.state.serves(&location)?;
            let mut account = unit_load::<Account>(&mut unit, &account_id.stream_id()).await?;
            let (net, tax, _) = self.first_hour(&mut unit, &account.state, &plan_id, at).await?;
            let mut order = unit_load::<Order>(&mut unit, &order_id.stream_id()).await?;
            let mut server = unit_load::<Server>(&mut unit, &server_id.stream_id()).await?;
            unit.handle(
                &mut account,
                AccountCommand::PlaceHold {
                    order_id,
                    server_id,
                    net,
                    tax,
                },
            )
            .await?;
            unit.handle(
                &mut order,
                OrderCommand::Place {
                    order_id,
                    account_id,
                    server_id,
                    plan_id: plan_id.clone(),
                    location: location.clone(),
                    net,
                    tax,
                    at,
                },
            )
            .await?;
            unit.handle(
                &mut server,
                ServerCommand::Order {
                    server_id,
                    account_id,
                    order_id,
                    plan_id: plan_id.clone(),
                    location: location.clone(),
                    at,
                },
            )
            .await?;
        });
        Ok(())
    }

    /// Provisioning succeeded: the server needs setup and the hold becomes the first hour's charge.
    pub async fn complete_provisioning(&self, order_id: OrderId, provider_server_id: &str, metadata: &Metadata) -> Result<ChargeId> {
        let at = self.now();
        let charge_id = ChargeId::new();
        atomically!(self, metadata, |unit| {
            let mut order = unit_load::<Order>(&mut unit, &order_id.stream_id()).await?;
            let placed = order.state.placed.clone().ok_or(FlowError::NotFound("order"))?;
            let mut server = unit_load::<Server>(&mut unit, &placed.server_id.stream_id()).await?;
            let mut account = unit_load::<Account>(&mut unit, &placed.account_id.stream_id()).await?;
            let country = account.state.opened().ok_or(FlowError::NotFound("account"))?.country;
            let catalog = unit_load::<Catalog>(&mut unit, CATALOG_STREAM).await?;
            let tax_rate = catalog.state.tax_rate(country, at);
            unit.handle(&mut order, OrderCommand::Complete { charge_id, at }).await?;
            unit.handle(
                &mut server,
                ServerCommand::CompleteProvisioning {
                    provider_server_id: provider_server_id.to_string(),
                    at,
                },
            )
            .await?;
            unit.handle(
                &mut account,
                AccountCommand::CaptureHold {
                    order_id,
                    charge_id,
                    plan_id: placed.plan_id.clone(),
                    slot: HourSlot::containing(at),
                    tax_rate,
                },
            )
            .await?;
        });
        Ok(charge_id)
    }

    /// Provisioning failed: the hold is released in full.
    pub async fn fail_provisioning(&self, order_id: OrderId, reason: &str, metadata: &Metadata) -> Result<()> {
        let at = self.now();
        atomically!(self, metadata, |unit| {
            let mut order = unit_load::<Order>(&mut unit, &order_id.stream_id()).await?;
            let placed = order.state.placed.clone().ok_or(FlowError::NotFound("order"))?;
            let mut server = unit_load::<Server>(&mut unit, &placed.server_id.stream_id()).await?;
            let mut account = unit_load::<Account>(&mut unit, &placed.account_id.stream_id()).await?;
            unit.handle(
                &mut order,
                OrderCommand::Fail {
                    reason: reason.to_string(),
                    at,
                },
            )
            .await?;
            unit.handle(
                &mut server,
                ServerCommand::FailProvisioning {
                    reason: reason.to_string(),
                    at,
                },
            )
            .await?;
            unit.handle(
                &mut account,
                AccountCommand::ReleaseHold {
                    order_id,
                    reason: reason.to_string(),
                },
            )
            .await?;
        });
        Ok(())
    }

    pub async fn server_command(&self, server_id: ServerId, command: ServerCommand, metadata: &Metadata) -> Result<()> {
        self.handler
            .execute::<Server>(&server_id.stream_id(), command, metadata)
            .await
            .map_err(map_single)?;
        Ok(())
    }

    pub async fn setup(&self, server_id: ServerId, os_image: &str, hostname: Hostname, metadata: &Metadata) -> Result<()> {
        if self.replayed(metadata).await? {
            return Ok(());
        }
        self.server_command(
            server_id,
            ServerCommand::Setup {
                os_image: os_image.to_string(),
                hostname,
                at: self.now(),
            },
            metadata,
        )
        .await
    }

    pub async fn power(&self, server_id: ServerId, action: PowerAction, metadata: &Metadata) -> Result<()> {
        if self.replayed(metadata).await? {
            return Ok(());
        }
        self.server_command(server_id, ServerCommand::Power { action, at: self.now() }, metadata)
            .await
    }

    /// Charges one (server, slot) at the price in force at the slot; declined for lack of funds,
    /// the server is suspended in the same append.
    pub async fn charge_slot(&self, server_id: ServerId, slot: HourSlot, metadata: &Metadata) -> Result<SlotOutcome> {
        let at = self.now();
        let charge_id = ChargeId::new();
        let outcome = atomically!(self, metadata, |unit| {
            let mut server = unit_load::<Server>(&mut unit, &server_id.stream_id()).await?;
            let ordered = server.state.ordered.clone().ok_or(FlowError::NotFound("server"))?;
            if !server.state.may_bill(slot) {
                break SlotOutcome::NotBillable;
            }
            let mut account = unit_load::<Account>(&mut unit, &ordered.account_id.stream_id()).await?;
            if account.state.is_charged(server_id, slot) {
                break SlotOutcome::AlreadyCharged;
            }
            let opened = account.state.opened().cloned().ok_or(FlowError::NotFound("account"))?;
            let catalog = unit_load::<Catalog>(&mut unit, CATALOG_STREAM).await?;
            let command = slot_charge(&catalog.state, &ordered, &opened, charge_id, slot)?;
            let events = unit.handle(&mut account, command).await?;
            match events.as_slice() {
                [AccountEvent::HourCharged { capped, .. }] => SlotOutcome::Charged {
                    charge_id,
                    capped: *capped,
                },
                [AccountEvent::ChargeDeclined { .. }] => {
                    unit.handle(&mut server, suspend_for_non_payment(at)).await?;
                    SlotOutcome::DeclinedAndSuspended
                }
                other => unreachable!("a slot charge decides one event, got {other:?}"),
            }
        });
        Ok(outcome)
    }

    /// Charges, in one atomic append, every due slot of a batch of accounts' servers: for each
    /// account the servers listed with the first slot each may owe, up to and including `until`
    /// (at most `slots_max` slots a server). The wallets, servers and the catalogue are read in
    /// one round trip each, every decision is the domain's (`ChargeSlot`, and `Suspend` on a
    /// decline, after which that server is not charged further), and the append carries every
    /// stream's expected version: a batch that races another billing run is decided again from
    /// fresh state, where the other run's slots are already charged.
    pub async fn charge_due_batch(
        &self,
        due: &[(AccountId, Vec<(ServerId, HourSlot)>, usize)],
        until: HourSlot,
        metadata: &Metadata,
    ) -> Result<BatchCharges> {
        let at = self.now();
        let account_streams: Vec<String> = due.iter().map(|(account_id, _, _)| account_id.stream_id()).collect();
        let server_streams: Vec<String> = due
            .iter()
            .flat_map(|(_, servers, _)| servers.iter().map(|(server_id, _)| server_id.stream_id()))
            .collect();
        let outcome = atomically!(self, metadata, |unit| {
            let mut outcome = BatchCharges::default();
            let catalog = unit_load::<Catalog>(&mut unit, CATALOG_STREAM).await?;
            let mut accounts = unit.load_many::<Account>(&account_streams).await?;
            let mut servers = unit.load_many::<Server>(&server_streams).await?.into_iter();
            for ((_, due_servers, slots_max), account) in due.iter().zip(accounts.iter_mut()) {
                let Some(opened) = account.state.opened().cloned() else {
                    outcome.skipped += due_servers.len() as u64;
                    servers.by_ref().take(due_servers.len()).for_each(drop);
                    continue;
                };
                for ((server_id, first), mut server) in due_servers.iter().zip(servers.by_ref()) {
                    let Some(ordered) = server.state.ordered.clone() else {
                        outcome.skipped += 1;
                        continue;
                    };
                    if ordered.account_id != opened.account_id {
                        outcome.skipped += 1;
                        continue;
                    }
                    // The read model's next slot may predate a resumption it has not seen yet;
                    // the server itself says from which slot it may be billed.
                    let Some(billable_from) = server.state.first_billable_slot() else {
                        continue;
                    };
                    let mut slot = (*first).max(billable_from);
                    let mut slots = 0;
                    while slot <= until && slots < *slots_max && server.state.is_billable() {
                        if !account.state.is_charged(*server_id, slot) {
                            let command = slot_charge(&catalog.state, &ordered, &opened, ChargeId::new(), slot)?;
                            let events = unit.handle(account, command).await?;
                            if let [AccountEvent::ChargeDeclined { .. }] = events.as_slice() {
                                unit.handle(&mut server, suspend_for_non_payment(at)).await?;
                                outcome.declined += 1;
                                break;
                            }
                            outcome.charged += 1;
                        }
                        slot = slot.next();
                        slots += 1;
                    }
                }
            }
            outcome
        });
        Ok(outcome)
    }

    /// Cancels a server: billing stops now and the unused part of the slot in progress is refunded.
    pub async fn cancel(&self, server_id: ServerId, mode: CancellationMode, metadata: &Metadata) -> Result<()> {
        if self.replayed(metadata).await? {
            return Ok(());
        }
        let at = self.now();
        atomically!(self, metadata, |unit| {
            let mut server = unit_load::<Server>(&mut unit, &server_id.stream_id()).await?;
            let ordered = server.state.ordered.clone().ok_or(FlowError::NotFound("server"))?;
            let mut account = unit_load::<Account>(&mut unit, &ordered.account_id.stream_id()).await?;
            // The hours owed up to now are charged before billing stops (after downtime, the
            // billing run may not have charged them yet).
            let catalog = unit_load::<Catalog>(&mut unit, CATALOG_STREAM).await?;
            catch_up(&mut unit, &mut server, &mut account, &catalog.state, at).await?;
            unit.handle(&mut server, ServerCommand::RequestCancellation { mode, at }).await?;
            if let Some(charge_id) = account.state.charge_for(server_id, HourSlot::containing(at)) {
                match unit
                    .handle(
                        &mut account,
                        AccountCommand::RefundUnusedTime {
                            charge_id,
                            cancelled_at: at,
                        },
                    )
                    .await
                {
                    Ok(_) | Err(AccountError::AlreadyRefunded(_)) => {}
                    Err(error) => return Err(error.into()),
                }
            }
        });
        Ok(())
    }

    /// Revokes a grace cancellation and bills the slot in progress, in one append: the server is
    /// powered on as it was, and the slot is paid at least from the revocation on (charged, or
    /// what its cancellation gave back charged again). Declined, the server is suspended.
    pub async fn revoke_cancellation(&self, server_id: ServerId, metadata: &Metadata) -> Result<SlotOutcome> {
        if self.replayed(metadata).await? {
            return Ok(SlotOutcome::AlreadyCharged);
        }
        let at = self.now();
        let outcome = atomically!(self, metadata, |unit| {
            let mut server = unit_load::<Server>(&mut unit, &server_id.stream_id()).await?;
            // (No `break` once events are decided: it would leave them uncommitted.)
            unit.handle(&mut server, ServerCommand::RevokeCancellation { at }).await?;
            if server.state.is_billable() {
                let (mut account, command) = self.resume_billing(&mut unit, &server.state, at).await?;
                let events = unit.handle(&mut account, command).await?;
                if let [AccountEvent::ChargeDeclined { .. }] = events.as_slice() {
                    unit.handle(&mut server, suspend_for_non_payment(at)).await?;
                }
                billed(&events)
            } else {
                SlotOutcome::NotBillable
            }
        });
        Ok(outcome)
    }

    /// Resumes a suspended server and bills the slot in progress, in one append, if its wallet
    /// can pay for it; otherwise nothing happens (`NotAffordable`). A server suspended for a
    /// dispute that cannot pay stays suspended, now for non-payment.
    pub async fn resume(&self, server_id: ServerId, metadata: &Metadata) -> Result<SlotOutcome> {
        let at = self.now();
        let outcome = atomically!(self, metadata, |unit| {
            let mut server = unit_load::<Server>(&mut unit, &server_id.stream_id()).await?;
            let reason = server.state.suspension().map(|(reason, _)| reason);
            let (mut account, command) = self.resume_billing(&mut unit, &server.state, at).await?;
            let declined = matches!(
                account.state.decide(command.clone())?.as_slice(),
                [AccountEvent::ChargeDeclined { .. }]
            );
            if declined && reason != Some(SuspensionReason::Dispute) {
                break SlotOutcome::NotAffordable;
            }
            // (No `break` from here on: decided events would be left uncommitted.)
            unit.handle(&mut server, ServerCommand::Resume { at }).await?;
            if !server.state.is_billable() {
                SlotOutcome::NotBillable
            } else if declined {
                unit.handle(&mut server, suspend_for_non_payment(at)).await?;
                SlotOutcome::DeclinedAndSuspended
            } else {
                billed(&unit.handle(&mut account, command).await?)
            }
        });
        Ok(outcome)
    }

    /// The account of a server that becomes billable at `at`, and the command that bills the slot
    /// in progress from `at` on, at the price and tax in force at the slot.
    async fn resume_billing(
        &self,
        unit: &mut crate::handler::Unit,
        server: &Server,
        at: DateTime<Utc>,
    ) -> Result<(crate::handler::Loaded<Account>, AccountCommand)> {
        let ordered = server.ordered.clone().ok_or(FlowError::NotFound("server"))?;
        let account = unit_load::<Account>(unit, &ordered.account_id.stream_id()).await?;
        let catalog = unit_load::<Catalog>(unit, CATALOG_STREAM).await?;
        let command = resume_billing_command(&catalog.state, server, &account.state, at)?;
        Ok((account, command))
    }

    pub async fn delete_due(&self, server_id: ServerId, metadata: &Metadata) -> Result<()> {
        self.server_command(server_id, ServerCommand::Delete { at: self.now() }, metadata)
            .await
    }

    pub async fn account_command(&self, account_id: AccountId, command: AccountCommand, metadata: &Metadata) -> Result<Vec<AccountEvent>> {
        Ok(self
            .handler
            .execute::<Account>(&account_id.stream_id(), command, metadata)
            .await
            .map_err(map_single)?
            .value)
    }

    /// A service credit against a charge; if the charge was already invoiced, a credit note
    /// referencing its invoice is issued in the same append.
    pub async fn service_credit(
        &self,
        account_id: AccountId,
        charge_id: ChargeId,
        amount: Decimal,
        reason: &str,
        metadata: &Metadata,
    ) -> Result<RefundId> {
        let refund_id = RefundId(metadata.id_for("refund"));
        if self.replayed(metadata).await? {
            return Ok(refund_id);
        }
        let at = self.now();
        atomically!(self, metadata, |unit| {
            let mut account = unit_load::<Account>(&mut unit, &account_id.stream_id()).await?;
            let events = unit
                .handle(
                    &mut account,
                    AccountCommand::CreditService {
                        refund_id,
                        charge_id,
                        amount,
                        reason: reason.to_string(),
                    },
                )
                .await?;
            let (slot, tax_rate) = charge_facts(&unit, account_id, charge_id).await?;
            let currency = account.state.opened().ok_or(FlowError::NotFound("account"))?.currency;
            let year = slot.month().year;
            let mut series = unit_load::<InvoiceSeries>(&mut unit, &series_stream(year)).await?;
            if let (Some(invoice_id), false) = (series.state.invoice_of(charge_id), events.is_empty()) {
                let split = BilledRefund::service_credit(charge_id, domain::ServerId::default(), amount, tax_rate);
                let credit_note = CreditNoteDraft {
                    invoice_id,
                    account_id,
                    charge_id,
                    reason: reason.to_string(),
                    net: split.net,
                    tax: split.tax,
                    currency,
                };
                unit.handle(
                    &mut series,
                    InvoiceSeriesCommand::IssueCreditNote {
                        year,
                        credit_note_id: InvoiceId::new(),
                        credit_note,
                        at,
                    },
                )
                .await?;
            }
        });
        Ok(refund_id)
    }

    pub async fn adjust(&self, account_id: AccountId, amount: Decimal, reason: &str, metadata: &Metadata) -> Result<AdjustmentId> {
        let adjustment_id = AdjustmentId(metadata.id_for("adjustment"));
        if self.replayed(metadata).await? {
            return Ok(adjustment_id);
        }
        self.account_command(
            account_id,
            AccountCommand::Adjust {
                adjustment_id,
                amount,
                reason: reason.to_string(),
            },
            metadata,
        )
        .await?;
        Ok(adjustment_id)
    }

    pub async fn request_card_refund(
        &self,
        account_id: AccountId,
        topup_id: TopUpId,
        amount: Decimal,
        reason: &str,
        metadata: &Metadata,
    ) -> Result<RefundId> {
        let refund_id = RefundId(metadata.id_for("refund"));
        if self.replayed(metadata).await? {
            return Ok(refund_id);
        }
        self.account_command(
            account_id,
            AccountCommand::RequestCardRefund {
                refund_id,
                topup_id,
                amount,
                reason: reason.to_string(),
            },
            metadata,
        )
        .await?;
        Ok(refund_id)
    }

    /// A chargeback: the wallet is debited (below zero if need be) and every billable server of
    /// the account is suspended.
    pub async fn open_dispute(
        &self,
        account_id: AccountId,
        dispute_id: DisputeId,
        payment_id: &str,
        amount: Decimal,
        servers: &[ServerId],
        metadata: &Metadata,
    ) -> Result<()> {
        let at = self.now();
        atomically!(self, metadata, |unit| {
            let mut account = unit_load::<Account>(&mut unit, &account_id.stream_id()).await?;
            unit.handle(
                &mut account,
                AccountCommand::OpenDispute {
                    dispute_id,
                    payment_id: payment_id.to_string(),
                    amount,
                },
            )
            .await?;
            suspend_billable(&mut unit, servers, SuspensionReason::Dispute, at).await?;
        });
        Ok(())
    }

    /// Records a top-up request with its checkout URL (made by `checkout_url(topup_id)`).
    pub async fn request_topup(
        &self,
        account_id: AccountId,
        topup_id: TopUpId,
        amount: Decimal,
        url: String,
        metadata: &Metadata,
    ) -> Result<(TopUpId, String)> {
        if self.replayed(metadata).await? {
            let topup = self.handler.load::<domain::topup::TopUp>(&topup_id.stream_id()).await?;
            let requested = topup.state.requested.ok_or(FlowError::NotFound("top-up"))?;
            return Ok((topup_id, requested.checkout_url));
        }
        let at = self.now();
        atomically!(self, metadata, |unit| {
            let account = unit_load::<Account>(&mut unit, &account_id.stream_id()).await?;
            let currency = account.state.opened().ok_or(FlowError::NotFound("account"))?.currency;
            domain::Money::new(amount, currency)
                .and_then(|money| money.to_minor_units())
                .map_err(|error| FlowError::Invalid {
                    field: "amount",
                    reason: format!("amount: {error}"),
                })?;
            let mut topup = unit_load::<domain::topup::TopUp>(&mut unit, &topup_id.stream_id()).await?;
            unit.handle(
                &mut topup,
                domain::topup::TopUpCommand::Request {
                    topup_id,
                    account_id,
                    amount,
                    currency,
                    checkout_url: url.clone(),
                    at,
                },
            )
            .await?;
        });
        Ok((topup_id, url))
    }

    /// Acts on a provider event once: its receipt (stream `receipt_stream`) is appended with its
    /// effect. A paid checkout (top-up, payment id, the amounts the payment states) credits the
    /// wallet with the amount asked if the payment states it in the account's currency; any other
    /// payment is held for review and credits nothing. Returns false for a redelivery.
    pub async fn receive_payment_event(
        &self,
        receipt_stream: &str,
        receipt: serde_json::Value,
        paid: Option<(TopUpId, String, Vec<domain::Money>)>,
        metadata: &Metadata,
    ) -> Result<bool> {
        let at = self.now();
        let fresh = atomically!(self, metadata, |unit| {
            if !unit.record_once(receipt_stream, "ProviderEventReceived", receipt.clone()).await? {
                break false;
            }
            if let Some((topup_id, payment_id, stated)) = &paid {
                let mut topup = unit_load::<domain::topup::TopUp>(&mut unit, &topup_id.stream_id()).await?;
                match topup.state.requested.clone() {
                    // An unknown top-up is recorded as received, and nothing is credited.
                    None => tracing::warn!(%topup_id, "payment for an unknown top-up"),
                    Some(requested) => {
                        let newly_paid = match unit
                            .handle(
                                &mut topup,
                                domain::topup::TopUpCommand::MarkPaid {
                                    payment_id: payment_id.clone(),
                                    stated: stated.clone(),
                                    at,
                                },
                            )
                            .await
                        {
                            Ok(events) => events,
                            // Acknowledged and recorded, never credited twice: a person looks at it.
                            Err(domain::topup::TopUpError::PaidElsewhere(first)) => {
                                tracing::warn!(%topup_id, %first, second = %payment_id, "a paid top-up was paid again");
                                Vec::new()
                            }
                            Err(error) => return Err(error.into()),
                        };
                        if let [domain::topup::TopUpEvent::PaymentHeldForReview { stated, .. }] = newly_paid.as_slice() {
                            tracing::warn!(%topup_id, ?stated, asked = %requested.amount, currency = %requested.currency, "a payment of another amount or currency is held for review; nothing credited");
                        }
                        if let [domain::topup::TopUpEvent::TopUpPaid { .. }] = newly_paid.as_slice() {
                            let mut account = unit_load::<Account>(&mut unit, &requested.account_id.stream_id()).await?;
                            unit.handle(
                                &mut account,
                                AccountCommand::SettleTopUp {
                                    topup_id: *topup_id,
                                    payment_id: payment_id.clone(),
                                    amount: requested.amount,
                                },
                            )
                            .await?;
                        }
                    }
                }
            }
            true
        });
        Ok(fresh)
    }

    /// Acts once on the processor's report that a payment held for review was refunded (its
    /// receipt opens `receipt_stream` in the same append): nothing was credited, so nothing moves;
    /// the top-up can no longer be accepted. Returns false for a redelivery.
    pub async fn receive_held_payment_returned(
        &self,
        receipt_stream: &str,
        receipt: serde_json::Value,
        topup_id: TopUpId,
        payment_id: &str,
        metadata: &Metadata,
    ) -> Result<bool> {
        let at = self.now();
        let fresh = atomically!(self, metadata, |unit| {
            if !unit.record_once(receipt_stream, "ProviderEventReceived", receipt.clone()).await? {
                break false;
            }
            let mut topup = unit_load::<domain::topup::TopUp>(&mut unit, &topup_id.stream_id()).await?;
            unit.handle(
                &mut topup,
                domain::topup::TopUpCommand::ReturnHeld {
                    payment_id: payment_id.to_string(),
                    at,
                },
            )
            .await?;
            true
        });
        Ok(fresh)
    }

    /// A person accepts a payment held for review for `amount` (at most what was asked, in the
    /// account's currency): the top-up is paid by it and the wallet credited, in one append.
    pub async fn accept_held_payment(&self, topup_id: TopUpId, amount: Decimal, reason: &str, metadata: &Metadata) -> Result<AccountId> {
        let at = self.now();
        let account_id = atomically!(self, metadata, |unit| {
            let mut topup = unit_load::<domain::topup::TopUp>(&mut unit, &topup_id.stream_id()).await?;
            let requested = topup.state.requested.clone().ok_or(FlowError::NotFound("top-up"))?;
            let events = unit
                .handle(
                    &mut topup,
                    domain::topup::TopUpCommand::AcceptHeld {
                        amount,
                        reason: reason.to_string(),
                        at,
                    },
                )
                .await?;
            let [domain::topup::TopUpEvent::HeldPaymentAccepted { payment_id, .. }] = events.as_slice() else {
                unreachable!("accepting a held payment decides one event")
            };
            let mut account = unit_load::<Account>(&mut unit, &requested.account_id.stream_id()).await?;
            unit.handle(
                &mut account,
                AccountCommand::SettleTopUp {
                    topup_id,
                    payment_id: payment_id.clone(),
                    amount,
                },
            )
            .await?;
            requested.account_id
        });
        Ok(account_id)
    }

    /// Acts once on a dispute event (its receipt opens `receipt_stream` in the same append): the
    /// dispute's totals as the processor reports them (`AccountCommand::SyncDispute`). What the
    /// account's billable `servers` owe until now is charged first; funds withdrawn are then
    /// debited (below zero if need be) and suspend them; funds given back are credited. When the
    /// dispute closes and the account has no other dispute holding funds, the servers suspended
    /// for disputes (`suspended`) come back in the same append (or, unable to pay their hour,
    /// stay suspended for non-payment). Returns false for a redelivery.
    pub async fn receive_dispute_event(
        &self,
        receipt_stream: &str,
        receipt: serde_json::Value,
        account_id: AccountId,
        report: AccountCommand,
        servers: &[ServerId],
        suspended: &[ServerId],
        metadata: &Metadata,
    ) -> Result<bool> {
        let at = self.now();
        let fresh = atomically!(self, metadata, |unit| {
            if !unit.record_once(receipt_stream, "ProviderEventReceived", receipt.clone()).await? {
                break false;
            }
            let mut account = unit_load::<Account>(&mut unit, &account_id.stream_id()).await?;
            catch_up_all(&mut unit, &mut account, servers, at).await?;
            let events = unit.handle(&mut account, report.clone()).await?;
            let withdrawn = events.iter().any(|event| match event {
                AccountEvent::DisputeOpened { amount, .. } | AccountEvent::DisputeFundsWithdrawn { amount, .. } => !amount.is_zero(),
                _ => false,
            });
            if withdrawn {
                suspend_billable(&mut unit, servers, SuspensionReason::Dispute, at).await?;
            }
            let closed = events.iter().any(|event| matches!(event, AccountEvent::DisputeClosed { .. }));
            if closed && !account.state.holds_disputed_funds() {
                let catalog = unit_load::<Catalog>(&mut unit, CATALOG_STREAM).await?;
                for server_id in suspended {
                    let mut server = unit_load::<Server>(&mut unit, &server_id.stream_id()).await?;
                    if !matches!(server.state.suspension(), Some((SuspensionReason::Dispute, _))) || server.state.cancellation.is_some() {
                        continue;
                    }
                    let command = resume_billing_command(&catalog.state, &server.state, &account.state, at)?;
                    let declined = matches!(
                        account.state.decide(command.clone())?.as_slice(),
                        [AccountEvent::ChargeDeclined { .. }]
                    );
                    unit.handle(&mut server, ServerCommand::Resume { at }).await?;
                    if declined {
                        unit.handle(&mut server, suspend_for_non_payment(at)).await?;
                    } else {
                        unit.handle(&mut account, command).await?;
                    }
                }
            }
            true
        });
        Ok(fresh)
    }

    /// Acts once on a card refund's outcome (its receipt opens `receipt_stream` in the same
    /// append): succeeded completes the refund; failed or canceled re-credits the wallet. A refund
    /// already settled is left as it is. Returns false for a redelivery.
    pub async fn receive_refund_event(
        &self,
        receipt_stream: &str,
        receipt: serde_json::Value,
        account_id: AccountId,
        refund_id: RefundId,
        succeeded: bool,
        metadata: &Metadata,
    ) -> Result<bool> {
        let command = if succeeded {
            AccountCommand::CompleteCardRefund { refund_id }
        } else {
            AccountCommand::FailCardRefund { refund_id }
        };
        // A refund already settled (a late or contrary report) is received and changes nothing.
        let settled = |error: &AccountError| matches!(error, AccountError::RefundSettled(_));
        self.receive_for_account(receipt_stream, receipt, account_id, command, settled, metadata)
            .await
    }

    /// Acts once on a processor's report that a top-up's payment has `total_refunded` refunded in
    /// all: what the ledger does not know of is recorded as a completed card refund.
    pub async fn receive_charge_refunded_event(
        &self,
        receipt_stream: &str,
        receipt: serde_json::Value,
        account_id: AccountId,
        topup_id: TopUpId,
        total_refunded: Decimal,
        servers: &[ServerId],
        metadata: &Metadata,
    ) -> Result<bool> {
        let command = AccountCommand::RecordProcessorRefund {
            refund_id: RefundId::new(),
            topup_id,
            total_refunded,
        };
        let at = self.now();
        let fresh = atomically!(self, metadata, |unit| {
            if !unit.record_once(receipt_stream, "ProviderEventReceived", receipt.clone()).await? {
                break false;
            }
            let mut account = unit_load::<Account>(&mut unit, &account_id.stream_id()).await?;
            catch_up_all(&mut unit, &mut account, servers, at).await?;
            unit.handle(&mut account, command.clone()).await?;
            // The money went back to the card whatever the balance: below zero, the account's
            // servers are suspended until it is paid, as after a dispute.
            if account.state.balance() < Decimal::ZERO {
                suspend_billable(&mut unit, servers, SuspensionReason::NonPayment, at).await?;
            }
            true
        });
        Ok(fresh)
    }

    /// A provider event's receipt and its effect on an account, in one append; false for a
    /// redelivery. Refusals for which `received_anyway` holds are recorded with no effect.
    async fn receive_for_account(
        &self,
        receipt_stream: &str,
        receipt: serde_json::Value,
        account_id: AccountId,
        command: AccountCommand,
        received_anyway: fn(&AccountError) -> bool,
        metadata: &Metadata,
    ) -> Result<bool> {
        let fresh = atomically!(self, metadata, |unit| {
            if !unit.record_once(receipt_stream, "ProviderEventReceived", receipt.clone()).await? {
                break false;
            }
            let mut account = unit_load::<Account>(&mut unit, &account_id.stream_id()).await?;
            match unit.handle(&mut account, command.clone()).await {
                Ok(_) => {}
                Err(error) if received_anyway(&error) => {}
                Err(error) => return Err(error.into()),
            }
            true
        });
        Ok(fresh)
    }

    /// Issues the month's invoice for an account (none when the month had no charge).
    pub async fn issue_invoice(&self, account_id: AccountId, period: YearMonth, metadata: &Metadata) -> Result<Option<InvoiceId>> {
        let at = self.now();
        let invoice_id = InvoiceId::new();
        let issued = atomically!(self, metadata, |unit| {
            let account = unit_load::<Account>(&mut unit, &account_id.stream_id()).await?;
            let currency = account.state.opened().ok_or(FlowError::NotFound("account"))?.currency;
            let mut series = unit_load::<InvoiceSeries>(&mut unit, &series_stream(period.year)).await?;
            if series.state.is_invoiced(account_id, period) {
                break None;
            }
            let (charges, refunds) = month_activity(&unit, account_id, period).await?;
            let Some(draft) = build_invoice(account_id, currency, period, &charges, &refunds) else {
                break None;
            };
            unit.handle(
                &mut series,
                InvoiceSeriesCommand::IssueInvoice {
                    year: period.year,
                    invoice_id,
                    invoice: draft,
                    at,
                },
            )
            .await?;
            Some(invoice_id)
        });
        Ok(issued)
    }
}

/// The charge of one (server, slot) at the plan's price and the country's tax in force at the slot.
fn slot_charge(
    catalog: &Catalog,
    ordered: &domain::server::Ordered,
    opened: &domain::account::Opened,
    charge_id: ChargeId,
    slot: HourSlot,
) -> Result<AccountCommand> {
    let price = catalog
        .monthly_price(&ordered.plan_id, opened.currency, slot.start())
        .ok_or(FlowError::NotFound("price for the slot"))?;
    Ok(AccountCommand::ChargeSlot {
        charge_id,
        server_id: ordered.server_id,
        plan_id: ordered.plan_id.clone(),
        slot,
        monthly_price: price.amount,
        tax_rate: catalog.tax_rate(opened.country, slot.start()),
    })
}

/// What billing a slot decided: charged (in full, or its unused time charged again), declined, or
/// nothing (it was paid).
fn billed(events: &[AccountEvent]) -> SlotOutcome {
    match events {
        [] => SlotOutcome::AlreadyCharged,
        [AccountEvent::ChargeDeclined { .. }] => SlotOutcome::DeclinedAndSuspended,
        [AccountEvent::HourCharged { charge_id, capped, .. }] => SlotOutcome::Charged {
            charge_id: *charge_id,
            capped: *capped,
        },
        [AccountEvent::UnusedTimeRecharged { charge_id, .. }] => SlotOutcome::Charged {
            charge_id: *charge_id,
            capped: false,
        },
        other => unreachable!("billing a slot decides at most one event, got {other:?}"),
    }
}

/// The command that bills a server's slot in progress from `at` on (it becomes billable again),
/// at the price and tax in force at the slot.
fn resume_billing_command(catalog: &Catalog, server: &Server, account: &Account, at: DateTime<Utc>) -> Result<AccountCommand> {
    let ordered = server.ordered.clone().ok_or(FlowError::NotFound("server"))?;
    let opened = account.opened().cloned().ok_or(FlowError::NotFound("account"))?;
    let slot = HourSlot::containing(at);
    // The price and tax in force at the slot; in the hour the catalogue was first published
    // there is none at its start, and those in force now apply.
    let priced_at = match catalog.monthly_price(&ordered.plan_id, opened.currency, slot.start()) {
        Some(_) => slot.start(),
        None => at,
    };
    let price = catalog
        .monthly_price(&ordered.plan_id, opened.currency, priced_at)
        .ok_or(FlowError::NotFound("price for the slot"))?;
    Ok(AccountCommand::ResumeBilling {
        charge_id: ChargeId::new(),
        server_id: ordered.server_id,
        plan_id: ordered.plan_id.clone(),
        slot,
        from: at,
        monthly_price: price.amount,
        tax_rate: catalog.tax_rate(opened.country, priced_at),
    })
}

/// Charges every slot of a billable server that is due by `at` and not charged yet (the billing
/// run charges them too; after downtime it may not have yet), as the run decides them: from the
/// slot after the last charged (or the slot it became billable in), each at the price in force at
/// it. Declined, the server is suspended and nothing more is charged. Called before billing
/// stops (a cancellation, a suspension), so the hours owed until then are never lost.
async fn catch_up(
    unit: &mut crate::handler::Unit,
    server: &mut crate::handler::Loaded<Server>,
    account: &mut crate::handler::Loaded<Account>,
    catalog: &Catalog,
    at: DateTime<Utc>,
) -> Result<()> {
    let (Some(first), Some(ordered), Some(opened)) = (
        server.state.first_billable_slot(),
        server.state.ordered.clone(),
        account.state.opened().cloned(),
    ) else {
        return Ok(());
    };
    let mut slot = account
        .state
        .last_charged_slot(ordered.server_id)
        .map_or(first, |last| last.next().max(first));
    let until = HourSlot::containing(at);
    let mut slots = 0;
    while slot <= until && slots < CATCH_UP_SLOTS_MAX {
        if !account.state.is_charged(ordered.server_id, slot) {
            let command = slot_charge(catalog, &ordered, &opened, ChargeId::new(), slot)?;
            if let [AccountEvent::ChargeDeclined { .. }] = unit.handle(account, command).await?.as_slice() {
                unit.handle(server, suspend_for_non_payment(at)).await?;
                break;
            }
        }
        slot = slot.next();
        slots += 1;
    }
    Ok(())
}

/// Slots one server is caught up by at once, at most (a bound on one append).
const CATCH_UP_SLOTS_MAX: usize = 24 * 62;

/// Suspends those of `servers` that are billable (each asked of its own aggregate), in the unit.
async fn suspend_billable(
    unit: &mut crate::handler::Unit,
    servers: &[ServerId],
    reason: SuspensionReason,
    at: DateTime<Utc>,
) -> Result<()> {
    for server_id in servers {
        let mut server = unit_load::<Server>(unit, &server_id.stream_id()).await?;
        if server.state.is_billable() {
            unit.handle(&mut server, ServerCommand::Suspend { reason, at }).await?;
        }
    }
    Ok(())
}

/// Charges what `servers` owe up to `at` (`catch_up`), before something stops their billing.
async fn catch_up_all(
    unit: &mut crate::handler::Unit,
    account: &mut crate::handler::Loaded<Account>,
    servers: &[ServerId],
    at: DateTime<Utc>,
) -> Result<()> {
    if servers.is_empty() {
        return Ok(());
    }
    let catalog = unit_load::<Catalog>(unit, CATALOG_STREAM).await?;
    for server_id in servers {
        let mut server = unit_load::<Server>(unit, &server_id.stream_id()).await?;
        catch_up(unit, &mut server, account, &catalog.state, at).await?;
    }
    Ok(())
}

/// A declined slot suspends its server.
fn suspend_for_non_payment(at: DateTime<Utc>) -> ServerCommand {
    ServerCommand::Suspend {
        reason: SuspensionReason::NonPayment,
        at,
    }
}

fn map_single<E: Into<FlowError>>(error: HandlerError<E>) -> FlowError {
    match error {
        HandlerError::Rejected(error) => error.into(),
        HandlerError::Contended { attempts } => FlowError::Contended { attempts },
        HandlerError::Storage(error) => FlowError::Storage(error),
    }
}

async fn account_events(unit: &crate::handler::Unit, account_id: AccountId) -> Result<Vec<(DateTime<Utc>, AccountEvent)>> {
    let events = unit.read_stream(&account_id.stream_id()).await?;
    events
        .into_iter()
        .map(|recorded| {
            domain::decode_event(&recorded.event_type, recorded.schema_version, recorded.payload)
                .map(|event| (recorded.occurred_at, event))
                .map_err(|error| {
                    StorageError::Corrupt {
                        stream_id: recorded.stream_id,
                        position: recorded.position,
                        reason: error.to_string(),
                    }
                    .into()
                })
        })
        .collect()
}

/// The slot and tax rate of a charge.
async fn charge_facts(unit: &crate::handler::Unit, account_id: AccountId, charge_id: ChargeId) -> Result<(HourSlot, TaxRate)> {
    for (_, event) in account_events(unit, account_id).await? {
        match event {
            AccountEvent::HourCharged {
                charge_id: id,
                slot,
                tax_rate,
                ..
            }
            | AccountEvent::HoldCaptured {
                charge_id: id,
                slot,
                tax_rate,
                ..
            } if id == charge_id => return Ok((slot, tax_rate)),
            _ => {}
        }
    }
    Err(FlowError::NotFound("charge"))
}

/// The charges with a slot in `period`, and the refunds of those charges.
async fn month_activity(
    unit: &crate::handler::Unit,
    account_id: AccountId,
    period: YearMonth,
) -> Result<(Vec<BilledCharge>, Vec<BilledRefund>)> {
    let events = account_events(unit, account_id).await?;
    let mut charges: Vec<BilledCharge> = Vec::new();
    for (_, event) in &events {
        match event {
            AccountEvent::HourCharged {
                charge_id,
                server_id,
                plan_id,
                slot,
                net,
                tax,
                tax_rate,
                ..
            }
            | AccountEvent::HoldCaptured {
                charge_id,
                server_id,
                plan_id,
                slot,
                net,
                tax,
                tax_rate,
                ..
            } if slot.month() == period => {
                charges.push(BilledCharge {
                    charge_id: *charge_id,
                    server_id: *server_id,
                    plan_id: plan_id.clone(),
                    net: *net,
                    tax: *tax,
                    tax_rate: *tax_rate,
                });
            }
            _ => {}
        }
    }
    let mut refunds = Vec::new();
    for (_, event) in &events {
        let (kind, charge_id, net, tax, gross) = match event {
            AccountEvent::CancellationRefunded { charge_id, net, tax, .. } => (RefundKind::Cancellation, charge_id, *net, *tax, None),
            // A revocation in the cancellation's hour takes back (part of) its refund.
            AccountEvent::UnusedTimeRecharged { charge_id, net, tax, .. } => (RefundKind::Cancellation, charge_id, -*net, -*tax, None),
            AccountEvent::ServiceCredited { charge_id, amount, .. } => {
                (RefundKind::ServiceCredit, charge_id, Decimal::ZERO, Decimal::ZERO, Some(*amount))
            }
            _ => continue,
        };
        let Some(charge) = charges.iter().find(|charge| charge.charge_id == *charge_id) else {
            continue;
        };
        if let Some(amount) = gross {
            refunds.push(BilledRefund::service_credit(*charge_id, charge.server_id, amount, charge.tax_rate));
            continue;
        }
        // One line per charge for its unused time, net of what revocations charged again.
        match refunds
            .iter_mut()
            .find(|refund| refund.kind == RefundKind::Cancellation && refund.charge_id == *charge_id)
        {
            Some(refund) => {
                refund.net += net;
                refund.tax += tax;
            }
            None => refunds.push(BilledRefund {
                kind,
                charge_id: *charge_id,
                server_id: charge.server_id,
                net,
                tax,
                tax_rate: charge.tax_rate,
            }),
        }
    }
    refunds.retain(|refund| refund.kind != RefundKind::Cancellation || !(refund.net.is_zero() && refund.tax.is_zero()));
    Ok((charges, refunds))
}
