//! Invoices and credit notes: a month's invoice from the account's stream, and service credits
//! (with a credit note when the charge was invoiced).

use super::*;

impl Flows {
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
            let ChargeFacts { slot, tax_rate, gross, .. } = charge_facts(&unit, account_id, charge_id).await?;
            let events = unit
                .handle(
                    &mut account,
                    AccountCommand::CreditService {
                        refund_id,
                        charge_id,
                        charge_gross: gross,
                        amount,
                        reason: reason.to_string(),
                    },
                )
                .await?;
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

pub(super) async fn account_events(unit: &crate::handler::Unit, account_id: AccountId) -> Result<Vec<(DateTime<Utc>, AccountEvent)>> {
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

/// A charge as recorded in its account's stream.
pub(super) struct ChargeFacts {
    pub charge_id: ChargeId,
    pub server_id: ServerId,
    pub slot: HourSlot,
    pub tax_rate: TaxRate,
    pub gross: Decimal,
}

/// The first charge of the account's stream that `wanted` accepts (the account itself keeps only
/// its servers' latest charges).
async fn find_charge(unit: &crate::handler::Unit, account_id: AccountId, wanted: impl Fn(&ChargeFacts) -> bool) -> Result<ChargeFacts> {
    for (_, event) in account_events(unit, account_id).await? {
        let facts = match event {
            AccountEvent::HourCharged {
                charge_id,
                server_id,
                slot,
                tax_rate,
                gross,
                ..
            }
            | AccountEvent::HoldCaptured {
                charge_id,
                server_id,
                slot,
                tax_rate,
                gross,
                ..
            } => ChargeFacts {
                charge_id,
                server_id,
                slot,
                tax_rate,
                gross,
            },
            _ => continue,
        };
        if wanted(&facts) {
            return Ok(facts);
        }
    }
    Err(FlowError::NotFound("charge"))
}

/// A charge of the account, by id.
pub(super) async fn charge_facts(unit: &crate::handler::Unit, account_id: AccountId, charge_id: ChargeId) -> Result<ChargeFacts> {
    find_charge(unit, account_id, |facts| facts.charge_id == charge_id).await
}

impl Flows {
    /// The charge of `server_id`'s `slot` on the account, if the slot was charged.
    pub async fn charge_of_slot(&self, account_id: AccountId, server_id: ServerId, slot: HourSlot) -> Result<ChargeId> {
        let unit = self.handler.unit();
        let facts = find_charge(&unit, account_id, |facts| facts.server_id == server_id && facts.slot == slot).await?;
        Ok(facts.charge_id)
    }
}

/// The charges with a slot in `period`, and the refunds of those charges.
pub(super) async fn month_activity(
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
