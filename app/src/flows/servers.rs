//! A server's life: setup, power, cancellation with the pro-rata refund, revocation and resumption
//! with the billing of the hour in progress, deletion.

use super::*;

/// What a server's owner asks of it.
#[derive(Clone, Debug)]
pub enum ServerRequest {
    Setup { os_image: String, hostname: Hostname },
    Power(PowerAction),
    Cancel(CancellationMode),
    RevokeCancellation,
}

impl Flows {
    /// Does what the owner asked of the server.
    pub async fn act_on_server(&self, server_id: ServerId, request: ServerRequest, metadata: &Metadata) -> Result<()> {
        match request {
            ServerRequest::Setup { os_image, hostname } => self.setup(server_id, &os_image, hostname, metadata).await,
            ServerRequest::Power(action) => self.power(server_id, action, metadata).await,
            ServerRequest::Cancel(mode) => self.cancel(server_id, mode, metadata).await,
            ServerRequest::RevokeCancellation => self.revoke_cancellation(server_id, metadata).await.map(|_| ()),
        }
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
    pub(super) async fn resume_billing(
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
}

/// The command that bills a server's slot in progress from `at` on (it becomes billable again),
/// at the price and tax in force at the slot.
pub(super) fn resume_billing_command(catalog: &Catalog, server: &Server, account: &Account, at: DateTime<Utc>) -> Result<AccountCommand> {
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

/// Suspends those of `servers` that are billable (each asked of its own aggregate), in the unit.
pub(super) async fn suspend_billable(
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

/// A declined slot suspends its server.
pub(super) fn suspend_for_non_payment(at: DateTime<Utc>) -> ServerCommand {
    ServerCommand::Suspend {
        reason: SuspensionReason::NonPayment,
        at,
    }
}
