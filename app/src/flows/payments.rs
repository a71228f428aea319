//! Money in and out through the card processor: top-ups, payments held for review, card refunds,
//! disputes; each processor event recorded once with what it causes.

use super::*;

impl Flows {
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
            let requested = topup.state.requested.clone().ok_or(FlowError::NotFound("top-up"))?;
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
            let Some(mut account) = received(&mut unit, receipt_stream, &receipt, account_id, servers, at).await? else {
                break false;
            };
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
            let Some(mut account) = received(&mut unit, receipt_stream, &receipt, account_id, servers, at).await? else {
                break false;
            };
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
    pub(super) async fn receive_for_account(
        &self,
        receipt_stream: &str,
        receipt: serde_json::Value,
        account_id: AccountId,
        command: AccountCommand,
        received_anyway: fn(&AccountError) -> bool,
        metadata: &Metadata,
    ) -> Result<bool> {
        let at = self.now();
        let fresh = atomically!(self, metadata, |unit| {
            let Some(mut account) = received(&mut unit, receipt_stream, &receipt, account_id, &[], at).await? else {
                break false;
            };
            match unit.handle(&mut account, command.clone()).await {
                Ok(_) => {}
                Err(error) if received_anyway(&error) => {}
                Err(error) => return Err(error.into()),
            }
            true
        });
        Ok(fresh)
    }
}

/// A processor event's receipt, recorded in the unit once per event id, and the account it acts
/// on, with the hours its billable `servers` owe until `at` charged first (their billing may stop
/// or their wallet change). None for a redelivery: nothing more is done.
async fn received(
    unit: &mut crate::handler::Unit,
    receipt_stream: &str,
    receipt: &serde_json::Value,
    account_id: AccountId,
    servers: &[ServerId],
    at: DateTime<Utc>,
) -> Result<Option<crate::handler::Loaded<Account>>> {
    if !unit.record_once(receipt_stream, "ProviderEventReceived", receipt.clone()).await? {
        return Ok(None);
    }
    let mut account = unit_load::<Account>(unit, &account_id.stream_id()).await?;
    catch_up_all(unit, &mut account, servers, at).await?;
    Ok(Some(account))
}
