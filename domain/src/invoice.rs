//! Invoices: built from a month's charges and refunds by a pure function, numbered by a per-year
//! series whose events make the numbers gapless (`INV-2026-000001`, credit notes `CN-2026-000001`).

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, DomainEvent};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::{display_round, round_ledger, Currency};
use crate::types::{AccountId, ChargeId, InvoiceId, PlanId, ServerId, TaxRate, YearMonth};

pub fn series_stream(year: i32) -> String {
    format!("invoice-series-{year}")
}

/// A charge of the month, as the invoice sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BilledCharge {
    pub charge_id: ChargeId,
    pub server_id: ServerId,
    pub plan_id: PlanId,
    pub net: Decimal,
    pub tax: Decimal,
    pub tax_rate: TaxRate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundKind {
    Cancellation,
    ServiceCredit,
}

/// A refund of the month (pro-rata cancellation or service credit), shown as a negative line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BilledRefund {
    pub kind: RefundKind,
    pub charge_id: ChargeId,
    pub server_id: ServerId,
    pub net: Decimal,
    pub tax: Decimal,
    pub tax_rate: TaxRate,
}

impl BilledRefund {
    /// A service credit is a gross amount; split it by the charge's tax rate.
    pub fn service_credit(charge_id: ChargeId, server_id: ServerId, gross: Decimal, tax_rate: TaxRate) -> BilledRefund {
        let net = round_ledger(gross / (Decimal::ONE + tax_rate.fraction()));
        BilledRefund {
            kind: RefundKind::ServiceCredit,
            charge_id,
            server_id,
            net,
            tax: gross - net,
            tax_rate,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InvoiceLine {
    pub description: String,
    pub server_id: Option<ServerId>,
    pub hours: Option<u32>,
    pub net: Decimal,
    pub tax: Decimal,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaxSummary {
    pub rate: TaxRate,
    pub net: Decimal,
    pub tax: Decimal,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Display {
    pub net: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InvoiceDraft {
    pub account_id: AccountId,
    pub currency: Currency,
    pub period: YearMonth,
    pub lines: Vec<InvoiceLine>,
    pub taxes: Vec<TaxSummary>,
    pub net: Decimal,
    pub tax: Decimal,
    pub total: Decimal,
    pub display: Display,
    /// The charges this invoice covers, so a later refund of one can reference it.
    pub charge_ids: Vec<ChargeId>,
}

/// Display figures: each rounded half-even to the minor unit, with tax = total - net so they add up.
pub fn display_figures(net: Decimal, total: Decimal, currency: Currency) -> Display {
    let total_display = display_round(total, currency);
    let net_display = display_round(net, currency);
    Display {
        net: net_display,
        tax: total_display - net_display,
        total: total_display,
    }
}

/// Builds a month's invoice; `None` when the month had no charge.
pub fn build_invoice(
    account_id: AccountId,
    currency: Currency,
    period: YearMonth,
    charges: &[BilledCharge],
    refunds: &[BilledRefund],
) -> Option<InvoiceDraft> {
    if charges.is_empty() {
        return None;
    }
    // One line per server, in order of first charge.
    let mut per_server: Vec<(ServerId, PlanId, u32, Decimal, Decimal)> = Vec::new();
    let mut taxes: BTreeMap<TaxRate, (Decimal, Decimal)> = BTreeMap::new();
    for charge in charges {
        match per_server.iter_mut().find(|line| line.0 == charge.server_id) {
            Some(line) => {
                line.2 += 1;
                line.3 += charge.net;
                line.4 += charge.tax;
            }
            None => per_server.push((charge.server_id, charge.plan_id.clone(), 1, charge.net, charge.tax)),
        }
        let entry = taxes.entry(charge.tax_rate).or_default();
        entry.0 += charge.net;
        entry.1 += charge.tax;
    }
    let mut lines: Vec<InvoiceLine> = per_server
        .into_iter()
        .map(|(server_id, plan_id, hours, net, tax)| InvoiceLine {
            description: format!("{plan_id} server {server_id}, {hours} hours"),
            server_id: Some(server_id),
            hours: Some(hours),
            net,
            tax,
        })
        .collect();
    for refund in refunds {
        let description = match refund.kind {
            RefundKind::Cancellation => {
                format!("Pro-rata cancellation refund, server {}", refund.server_id)
            }
            RefundKind::ServiceCredit => format!("Service credit, server {}", refund.server_id),
        };
        lines.push(InvoiceLine {
            description,
            server_id: Some(refund.server_id),
            hours: None,
            net: -refund.net,
            tax: -refund.tax,
        });
        let entry = taxes.entry(refund.tax_rate).or_default();
        entry.0 -= refund.net;
        entry.1 -= refund.tax;
    }
    let net: Decimal = lines.iter().map(|line| line.net).sum();
    let tax: Decimal = lines.iter().map(|line| line.tax).sum();
    let total = net + tax;
    Some(InvoiceDraft {
        account_id,
        currency,
        period,
        lines,
        taxes: taxes.into_iter().map(|(rate, (net, tax))| TaxSummary { rate, net, tax }).collect(),
        net,
        tax,
        total,
        display: display_figures(net, total, currency),
        charge_ids: charges.iter().map(|charge| charge.charge_id).collect(),
    })
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreditNoteDraft {
    pub invoice_id: InvoiceId,
    pub account_id: AccountId,
    pub charge_id: ChargeId,
    pub reason: String,
    pub net: Decimal,
    pub tax: Decimal,
    pub currency: Currency,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum InvoiceSeriesEvent {
    InvoiceIssued {
        invoice_id: InvoiceId,
        number: String,
        invoice: InvoiceDraft,
        issued_at: DateTime<Utc>,
    },
    CreditNoteIssued {
        credit_note_id: InvoiceId,
        number: String,
        invoice_number: String,
        credit_note: CreditNoteDraft,
        total: Decimal,
        display: Display,
        issued_at: DateTime<Utc>,
    },
}

impl DomainEvent for InvoiceSeriesEvent {
    fn event_type(&self) -> String {
        match self {
            InvoiceSeriesEvent::InvoiceIssued { .. } => "InvoiceIssued",
            InvoiceSeriesEvent::CreditNoteIssued { .. } => "CreditNoteIssued",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum InvoiceSeriesCommand {
    IssueInvoice {
        year: i32,
        invoice_id: InvoiceId,
        invoice: InvoiceDraft,
        at: DateTime<Utc>,
    },
    IssueCreditNote {
        year: i32,
        credit_note_id: InvoiceId,
        credit_note: CreditNoteDraft,
        at: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvoiceError {
    #[error("account {0} already has an invoice for {1}")]
    AlreadyInvoiced(AccountId, YearMonth),
    #[error("the invoice belongs to the {0} series")]
    WrongSeries(i32),
    #[error("the month {0} has not ended")]
    MonthNotOver(YearMonth),
    #[error("no invoice {0} in this series")]
    UnknownInvoice(InvoiceId),
    #[error("{0} was already used")]
    DuplicateId(InvoiceId),
    #[error("a credit note must credit more than zero")]
    EmptyCreditNote,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InvoiceSeries {
    year: Option<i32>,
    invoices_issued: u32,
    credit_notes_issued: u32,
    invoiced: HashSet<(AccountId, YearMonth)>,
    numbers: BTreeMap<InvoiceId, String>,
    charge_invoices: BTreeMap<ChargeId, InvoiceId>,
}

impl InvoiceSeries {
    /// Roughly the bytes the state holds. It grows with the year's invoices and the charges they
    /// list (each invoiced charge is kept, for the credit note a refund of it references).
    pub fn footprint(&self) -> usize {
        use std::mem::size_of;
        // A B-tree entry's share of its node, and a hash set's per-entry overhead.
        const ENTRY_OVERHEAD: usize = 16;
        size_of::<Self>()
            + self.invoiced.capacity() * (size_of::<(AccountId, YearMonth)>() + ENTRY_OVERHEAD)
            + self
                .numbers
                .values()
                .map(|number| size_of::<(InvoiceId, String)>() + number.capacity() + ENTRY_OVERHEAD)
                .sum::<usize>()
            + self.charge_invoices.len() * (size_of::<(ChargeId, InvoiceId)>() + ENTRY_OVERHEAD)
    }

    pub fn invoices_issued(&self) -> u32 {
        self.invoices_issued
    }

    pub fn is_invoiced(&self, account_id: AccountId, period: YearMonth) -> bool {
        self.invoiced.contains(&(account_id, period))
    }

    /// The invoice that billed `charge_id`, if one did.
    pub fn invoice_of(&self, charge_id: ChargeId) -> Option<InvoiceId> {
        self.charge_invoices.get(&charge_id).copied()
    }

    fn decide(&self, command: InvoiceSeriesCommand) -> Result<Vec<InvoiceSeriesEvent>, InvoiceError> {
        match command {
            InvoiceSeriesCommand::IssueInvoice {
                year,
                invoice_id,
                invoice,
                at,
            } => {
                if invoice.period.year != year || self.year.is_some_and(|own| own != year) {
                    return Err(InvoiceError::WrongSeries(invoice.period.year));
                }
                if at < invoice.period.end() {
                    return Err(InvoiceError::MonthNotOver(invoice.period));
                }
                if self.invoiced.contains(&(invoice.account_id, invoice.period)) {
                    return Err(InvoiceError::AlreadyInvoiced(invoice.account_id, invoice.period));
                }
                if self.numbers.contains_key(&invoice_id) {
                    return Err(InvoiceError::DuplicateId(invoice_id));
                }
                let number = format!("INV-{year}-{:06}", self.invoices_issued + 1);
                Ok(vec![InvoiceSeriesEvent::InvoiceIssued {
                    invoice_id,
                    number,
                    invoice,
                    issued_at: at,
                }])
            }
            InvoiceSeriesCommand::IssueCreditNote {
                year,
                credit_note_id,
                credit_note,
                at,
            } => {
                if self.year.is_some_and(|own| own != year) {
                    return Err(InvoiceError::WrongSeries(year));
                }
                let invoice_number = self
                    .numbers
                    .get(&credit_note.invoice_id)
                    .ok_or(InvoiceError::UnknownInvoice(credit_note.invoice_id))?;
                if self.numbers.contains_key(&credit_note_id) {
                    return Err(InvoiceError::DuplicateId(credit_note_id));
                }
                let total = credit_note.net + credit_note.tax;
                if total <= Decimal::ZERO {
                    return Err(InvoiceError::EmptyCreditNote);
                }
                let number = format!("CN-{year}-{:06}", self.credit_notes_issued + 1);
                let display = display_figures(credit_note.net, total, credit_note.currency);
                Ok(vec![InvoiceSeriesEvent::CreditNoteIssued {
                    credit_note_id,
                    number,
                    invoice_number: invoice_number.clone(),
                    credit_note,
                    total,
                    display,
                    issued_at: at,
                }])
            }
        }
    }
}

impl Aggregate for InvoiceSeries {
    const TYPE: &'static str = "invoice-series";
    type Command = InvoiceSeriesCommand;
    type Event = InvoiceSeriesEvent;
    type Error = InvoiceError;
    type Services = ();

    async fn handle(
        &mut self,
        command: InvoiceSeriesCommand,
        _: &(),
        sink: &cqrs_es::event_sink::EventSink<Self>,
    ) -> Result<(), InvoiceError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: InvoiceSeriesEvent) {
        match event {
            InvoiceSeriesEvent::InvoiceIssued {
                invoice_id,
                number,
                invoice,
                ..
            } => {
                self.year = Some(invoice.period.year);
                self.invoices_issued += 1;
                self.invoiced.insert((invoice.account_id, invoice.period));
                self.numbers.insert(invoice_id, number);
                for charge_id in invoice.charge_ids {
                    self.charge_invoices.insert(charge_id, invoice_id);
                }
            }
            InvoiceSeriesEvent::CreditNoteIssued {
                credit_note_id, number, ..
            } => {
                self.credit_notes_issued += 1;
                self.numbers.insert(credit_note_id, number);
            }
        }
    }
}
