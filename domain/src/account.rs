//! The account: a prepaid wallet and the consistency boundary for money. Every rule that decides
//! whether money moves lives in `decide`; `apply` only folds. Events carry the resulting figures.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, DomainEvent};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::billing::{pro_rata, runway_hours, slot_charge};
use crate::money::{Currency, LEDGER_SCALE};
use crate::types::{
    AccountId, AdjustmentId, ChargeId, Country, DisputeId, HourSlot, OrderId, PlanId, RefundId, ServerId, TaxRate, TopUpId, YearMonth,
};

/// What an account's events carry about its money after the event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    pub balance: Decimal,
    pub reserved: Decimal,
    pub available: Decimal,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum AccountEvent {
    AccountOpened {
        account_id: AccountId,
        name: String,
        email: String,
        currency: Currency,
        country: Country,
        opened_at: DateTime<Utc>,
    },
    TopUpSettled {
        topup_id: TopUpId,
        payment_id: String,
        amount: Decimal,
        figures: Figures,
    },
    HoldPlaced {
        order_id: OrderId,
        server_id: ServerId,
        net: Decimal,
        tax: Decimal,
        amount: Decimal,
        figures: Figures,
    },
    HoldCaptured {
        order_id: OrderId,
        charge_id: ChargeId,
        server_id: ServerId,
        plan_id: PlanId,
        slot: HourSlot,
        net: Decimal,
        tax: Decimal,
        gross: Decimal,
        tax_rate: TaxRate,
        figures: Figures,
    },
    HoldReleased {
        order_id: OrderId,
        amount: Decimal,
        reason: String,
        figures: Figures,
    },
    HourCharged {
        charge_id: ChargeId,
        server_id: ServerId,
        plan_id: PlanId,
        slot: HourSlot,
        rate_per_hour: Decimal,
        net: Decimal,
        tax: Decimal,
        gross: Decimal,
        tax_rate: TaxRate,
        capped: bool,
        figures: Figures,
    },
    ChargeDeclined {
        server_id: ServerId,
        slot: HourSlot,
        gross: Decimal,
        figures: Figures,
    },
    CancellationRefunded {
        charge_id: ChargeId,
        server_id: ServerId,
        unused_seconds: i64,
        net: Decimal,
        tax: Decimal,
        gross: Decimal,
        figures: Figures,
    },
    /// A cancellation revoked in the hour it was made: the part of the slot from the revocation
    /// on is charged again (at most what the cancellation gave back).
    UnusedTimeRecharged {
        charge_id: ChargeId,
        server_id: ServerId,
        seconds: i64,
        net: Decimal,
        tax: Decimal,
        gross: Decimal,
        figures: Figures,
    },
    ServiceCredited {
        refund_id: RefundId,
        charge_id: ChargeId,
        amount: Decimal,
        reason: String,
        figures: Figures,
    },
    CardRefundRequested {
        refund_id: RefundId,
        topup_id: TopUpId,
        amount: Decimal,
        reason: String,
        figures: Figures,
        /// Made at the card processor already (from its dashboard): learned of, not asked for.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        at_processor: bool,
    },
    CardRefundCompleted {
        refund_id: RefundId,
        topup_id: TopUpId,
        amount: Decimal,
    },
    CardRefundFailed {
        refund_id: RefundId,
        topup_id: TopUpId,
        amount: Decimal,
        figures: Figures,
    },
    /// A completed card refund the processor later reports failed: the money came back from the
    /// card, and goes back to the wallet.
    CardRefundReversed {
        refund_id: RefundId,
        topup_id: TopUpId,
        amount: Decimal,
        figures: Figures,
    },
    Adjusted {
        adjustment_id: AdjustmentId,
        amount: Decimal,
        reason: String,
        figures: Figures,
    },
    DisputeOpened {
        dispute_id: DisputeId,
        payment_id: String,
        amount: Decimal,
        figures: Figures,
    },
    /// Funds of an open dispute withdrawn after it was opened (an inquiry escalated).
    DisputeFundsWithdrawn {
        dispute_id: DisputeId,
        amount: Decimal,
        figures: Figures,
    },
    /// Withdrawn funds of a dispute given back before it closed.
    DisputeFundsReinstated {
        dispute_id: DisputeId,
        amount: Decimal,
        figures: Figures,
    },
    DisputeClosed {
        dispute_id: DisputeId,
        won: bool,
        amount_returned: Decimal,
        figures: Figures,
    },
    LowBalanceWarned {
        runway_hours: Decimal,
        available: Decimal,
    },
    LowBalanceCleared {
        runway_hours: Option<Decimal>,
        available: Decimal,
    },
}

impl AccountEvent {
    /// The balance, reserved and available figures after this event, if it carries them.
    pub fn figures(&self) -> Option<Figures> {
        match self {
            AccountEvent::TopUpSettled { figures, .. }
            | AccountEvent::HoldPlaced { figures, .. }
            | AccountEvent::HoldCaptured { figures, .. }
            | AccountEvent::HoldReleased { figures, .. }
            | AccountEvent::HourCharged { figures, .. }
            | AccountEvent::ChargeDeclined { figures, .. }
            | AccountEvent::CancellationRefunded { figures, .. }
            | AccountEvent::UnusedTimeRecharged { figures, .. }
            | AccountEvent::ServiceCredited { figures, .. }
            | AccountEvent::CardRefundRequested { figures, .. }
            | AccountEvent::CardRefundFailed { figures, .. }
            | AccountEvent::CardRefundReversed { figures, .. }
            | AccountEvent::Adjusted { figures, .. }
            | AccountEvent::DisputeOpened { figures, .. }
            | AccountEvent::DisputeFundsWithdrawn { figures, .. }
            | AccountEvent::DisputeFundsReinstated { figures, .. }
            | AccountEvent::DisputeClosed { figures, .. } => Some(*figures),
            AccountEvent::AccountOpened { .. }
            | AccountEvent::CardRefundCompleted { .. }
            | AccountEvent::LowBalanceWarned { .. }
            | AccountEvent::LowBalanceCleared { .. } => None,
        }
    }
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> String {
        let name = match self {
            AccountEvent::AccountOpened { .. } => "AccountOpened",
            AccountEvent::TopUpSettled { .. } => "TopUpSettled",
            AccountEvent::HoldPlaced { .. } => "HoldPlaced",
            AccountEvent::HoldCaptured { .. } => "HoldCaptured",
            AccountEvent::HoldReleased { .. } => "HoldReleased",
            AccountEvent::HourCharged { .. } => "HourCharged",
            AccountEvent::ChargeDeclined { .. } => "ChargeDeclined",
            AccountEvent::CancellationRefunded { .. } => "CancellationRefunded",
            AccountEvent::UnusedTimeRecharged { .. } => "UnusedTimeRecharged",
            AccountEvent::ServiceCredited { .. } => "ServiceCredited",
            AccountEvent::CardRefundRequested { .. } => "CardRefundRequested",
            AccountEvent::CardRefundCompleted { .. } => "CardRefundCompleted",
            AccountEvent::CardRefundFailed { .. } => "CardRefundFailed",
            AccountEvent::CardRefundReversed { .. } => "CardRefundReversed",
            AccountEvent::Adjusted { .. } => "Adjusted",
            AccountEvent::DisputeOpened { .. } => "DisputeOpened",
            AccountEvent::DisputeFundsWithdrawn { .. } => "DisputeFundsWithdrawn",
            AccountEvent::DisputeFundsReinstated { .. } => "DisputeFundsReinstated",
            AccountEvent::DisputeClosed { .. } => "DisputeClosed",
            AccountEvent::LowBalanceWarned { .. } => "LowBalanceWarned",
            AccountEvent::LowBalanceCleared { .. } => "LowBalanceCleared",
        };
        name.to_string()
    }

    fn event_version(&self) -> String {
        match self {
            // Version 1 named the country `tax_country`; see `upcast`.
            AccountEvent::AccountOpened { .. } => "2".to_string(),
            _ => "1".to_string(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AccountCommand {
    Open {
        account_id: AccountId,
        name: String,
        email: String,
        currency: Currency,
        country: Country,
        at: DateTime<Utc>,
    },
    /// Idempotent by the provider's payment id: a redelivered payment changes nothing.
    SettleTopUp {
        topup_id: TopUpId,
        payment_id: String,
        amount: Decimal,
    },
    PlaceHold {
        order_id: OrderId,
        server_id: ServerId,
        net: Decimal,
        tax: Decimal,
    },
    CaptureHold {
        order_id: OrderId,
        charge_id: ChargeId,
        plan_id: PlanId,
        slot: HourSlot,
        tax_rate: TaxRate,
    },
    ReleaseHold {
        order_id: OrderId,
        reason: String,
    },
    ChargeSlot {
        charge_id: ChargeId,
        server_id: ServerId,
        plan_id: PlanId,
        slot: HourSlot,
        monthly_price: Decimal,
        tax_rate: TaxRate,
    },
    RefundUnusedTime {
        charge_id: ChargeId,
        cancelled_at: DateTime<Utc>,
    },
    /// Billing starts again at `from` (a resumption or a revoked cancellation): the slot in
    /// progress is paid at least from `from` on. Not charged yet: charged in full (or declined).
    /// Charged and its unused time given back by a cancellation: that part from `from` on is
    /// charged again (or declined). Charged and kept: nothing.
    ResumeBilling {
        charge_id: ChargeId,
        server_id: ServerId,
        plan_id: PlanId,
        slot: HourSlot,
        from: DateTime<Utc>,
        monthly_price: Decimal,
        tax_rate: TaxRate,
    },
    /// A service credit against a charge of this account. The account keeps only its servers'
    /// latest charges, so the command carries the charge's gross as recorded in this account's
    /// stream (the caller reads it from the log; an unknown charge is the caller's to refuse).
    CreditService {
        refund_id: RefundId,
        charge_id: ChargeId,
        charge_gross: Decimal,
        amount: Decimal,
        reason: String,
    },
    RequestCardRefund {
        refund_id: RefundId,
        topup_id: TopUpId,
        amount: Decimal,
        reason: String,
    },
    CompleteCardRefund {
        refund_id: RefundId,
    },
    /// The processor reports `total_refunded` of a top-up's payment refunded in all. What exceeds
    /// the refunds this ledger knows of was refunded outside it (from the processor's dashboard):
    /// it is recorded as a completed card refund, debiting the wallet even below zero, since the
    /// money has already gone back to the card. Nothing beyond what is known: no events.
    RecordProcessorRefund {
        refund_id: RefundId,
        topup_id: TopUpId,
        total_refunded: Decimal,
    },
    FailCardRefund {
        refund_id: RefundId,
    },
    Adjust {
        adjustment_id: AdjustmentId,
        amount: Decimal,
        reason: String,
    },
    OpenDispute {
        dispute_id: DisputeId,
        payment_id: String,
        amount: Decimal,
    },
    CloseDispute {
        dispute_id: DisputeId,
        won: bool,
    },
    /// What the card processor says of a dispute, in totals: the funds withdrawn from the
    /// business for it so far, those given back, and whether it is closed (and won). Only funds
    /// actually withdrawn are debited (an inquiry withdraws nothing); funds given back are
    /// credited whatever the closing status is called. Idempotent: totals already recorded change
    /// nothing, and a dispute not known yet is opened with what was withdrawn.
    SyncDispute {
        dispute_id: DisputeId,
        payment_id: String,
        withdrawn_total: Decimal,
        reinstated_total: Decimal,
        closed: Option<bool>,
    },
    CheckRunway {
        hourly_burn_gross: Decimal,
        threshold_hours: Decimal,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("insufficient funds: {needed} needed, {available} available")]
    InsufficientFunds { needed: Decimal, available: Decimal },
    #[error("top-up {0} was settled by another payment")]
    TopUpSettledElsewhere(TopUpId),
    #[error("order {0} already has a hold")]
    HoldExists(OrderId),
    #[error("no hold for order {0}")]
    UnknownHold(OrderId),
    #[error("the hold for order {0} is already captured")]
    HoldAlreadyCaptured(OrderId),
    #[error("the hold for order {0} is already released")]
    HoldAlreadyReleased(OrderId),
    #[error("server {server_id} is already charged for {slot}")]
    SlotAlreadyCharged { server_id: ServerId, slot: HourSlot },
    #[error("no charge {0}")]
    UnknownCharge(ChargeId),
    #[error("charge {0} already had its unused time refunded")]
    AlreadyRefunded(ChargeId),
    #[error("refunds of charge {charge_id} would exceed its gross: {refundable} refundable")]
    RefundExceedsCharge { charge_id: ChargeId, refundable: Decimal },
    #[error("no top-up {0}")]
    UnknownTopUp(TopUpId),
    #[error("refunds of top-up {topup_id} would exceed it: {refundable} refundable")]
    RefundExceedsTopUp { topup_id: TopUpId, refundable: Decimal },
    #[error("no card refund {0}")]
    UnknownRefund(RefundId),
    #[error("card refund {0} is already settled")]
    RefundSettled(RefundId),
    #[error("{0} was already used")]
    DuplicateId(String),
    #[error("no dispute {0}")]
    UnknownDispute(DisputeId),
    #[error("dispute {0} is already closed")]
    DisputeClosed(DisputeId),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> AccountError {
    AccountError::Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum HoldState {
    Placed,
    Captured,
    Released,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Hold {
    server_id: ServerId,
    net: Decimal,
    tax: Decimal,
    state: HoldState,
}

/// What deciding needs of one server's charges, whatever the length of its history: its latest
/// charge and the net of that charge's month.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ServerCharges {
    last: LastCharge,
    month: YearMonth,
    /// Net charged in `month` (for the monthly cap).
    month_net: Decimal,
}

/// A server's latest charge. Its slot is the server's high-water mark: slots are charged in
/// order (the billing run, a catch-up and a resumption all go forward), so no slot at or before it
/// is charged again. A cancellation gives back the unused time of this charge (the slot in progress).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct LastCharge {
    charge_id: ChargeId,
    slot: HourSlot,
    net: Decimal,
    tax: Decimal,
    /// The net and tax of the unused time given back at a cancellation, until a revocation in
    /// the same slot charges it again.
    unused_refund: Option<(Decimal, Decimal)>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct TopUp {
    amount: Decimal,
    /// Card refunds requested or completed (failed ones give their amount back).
    refunded: Decimal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum CardRefundState {
    Requested,
    Completed,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct CardRefund {
    topup_id: TopUpId,
    amount: Decimal,
    state: CardRefundState,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Dispute {
    /// Withdrawn from the wallet for it, and given back.
    amount: Decimal,
    #[serde(default)]
    reinstated: Decimal,
    open: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Account {
    opened: Option<Opened>,
    balance: Decimal,
    reserved: Decimal,
    holds: HashMap<OrderId, Hold>,
    payments: HashSet<String>,
    topups: HashMap<TopUpId, TopUp>,
    /// Per server, its latest charge: the state does not grow with the hours billed.
    servers: HashMap<ServerId, ServerCharges>,
    /// Refunded so far (unused time and service credits, gross), for the charges refunded at all.
    refunded: HashMap<ChargeId, Decimal>,
    card_refunds: HashMap<RefundId, CardRefund>,
    /// Refund and adjustment ids used (charge ids are checked against the servers' latest charges).
    used_ids: HashSet<uuid::Uuid>,
    disputes: HashMap<DisputeId, Dispute>,
    low_balance_warned: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Opened {
    pub account_id: AccountId,
    pub currency: Currency,
    pub country: Country,
}

impl Account {
    pub fn opened(&self) -> Option<&Opened> {
        self.opened.as_ref()
    }

    pub fn balance(&self) -> Decimal {
        self.balance
    }

    pub fn reserved(&self) -> Decimal {
        self.reserved
    }

    pub fn available(&self) -> Decimal {
        self.balance - self.reserved
    }

    /// Net charged for `server` in `month` so far (for the monthly cap).
    pub fn month_net(&self, server_id: ServerId, month: YearMonth) -> Decimal {
        self.servers
            .get(&server_id)
            .filter(|charges| charges.month == month)
            .map_or(Decimal::ZERO, |charges| charges.month_net)
    }

    /// Whether `slot` of `server` is settled for billing: charged, or at or before the server's
    /// latest charge (slots are charged in order, so an earlier slot left uncharged stays so).
    pub fn is_charged(&self, server_id: ServerId, slot: HourSlot) -> bool {
        self.last_charged_slot(server_id).is_some_and(|last| slot <= last)
    }

    /// Whether an open dispute still holds funds withdrawn from the wallet.
    pub fn holds_disputed_funds(&self) -> bool {
        self.disputes
            .values()
            .any(|dispute| dispute.open && dispute.amount > dispute.reinstated)
    }

    /// The last slot charged for `server`, if any.
    pub fn last_charged_slot(&self, server_id: ServerId) -> Option<HourSlot> {
        self.servers.get(&server_id).map(|charges| charges.last.slot)
    }

    pub fn low_balance_warned(&self) -> bool {
        self.low_balance_warned
    }

    /// Roughly the bytes the state holds (entries and their keys, with a map's overhead). It grows
    /// with the account's servers, orders, payments and refunds, not with the hours billed.
    pub fn footprint(&self) -> usize {
        use std::mem::size_of;
        const ENTRY_OVERHEAD: usize = 16;
        fn entries<K, V>(map: &HashMap<K, V>) -> usize {
            map.capacity() * (size_of::<(K, V)>() + ENTRY_OVERHEAD)
        }
        size_of::<Self>()
            + entries(&self.holds)
            + self
                .payments
                .iter()
                .map(|payment| payment.capacity() + size_of::<String>() + ENTRY_OVERHEAD)
                .sum::<usize>()
            + entries(&self.topups)
            + entries(&self.servers)
            + entries(&self.refunded)
            + entries(&self.card_refunds)
            + self.used_ids.capacity() * (size_of::<uuid::Uuid>() + ENTRY_OVERHEAD)
            + entries(&self.disputes)
    }

    fn figures_after(&self, balance_change: Decimal, reserved_change: Decimal) -> Figures {
        let balance = self.balance + balance_change;
        let reserved = self.reserved + reserved_change;
        Figures {
            balance,
            reserved,
            available: balance - reserved,
        }
    }

    fn require_open(&self) -> Result<&Opened, AccountError> {
        self.opened.as_ref().ok_or(AccountError::NotOpen)
    }

    fn fresh_id(&self, id: uuid::Uuid, what: &str) -> Result<(), AccountError> {
        if self.used_ids.contains(&id) {
            Err(AccountError::DuplicateId(format!("{what} {id}")))
        } else {
            Ok(())
        }
    }

    /// A charge id must be fresh: not a refund's or an adjustment's, nor the server's latest
    /// charge's (a retried decision with the same id). Charge ids are minted per decision.
    fn fresh_charge_id(&self, server_id: ServerId, charge_id: ChargeId) -> Result<(), AccountError> {
        let latest = self
            .servers
            .get(&server_id)
            .is_some_and(|charges| charges.last.charge_id == charge_id);
        if self.used_ids.contains(&charge_id.0) || latest {
            Err(AccountError::DuplicateId(format!("charge {}", charge_id.0)))
        } else {
            Ok(())
        }
    }

    /// Decides a command: the events it causes, or why not. Pure.
    pub fn decide(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        if let AccountCommand::Open {
            account_id,
            name,
            email,
            currency,
            country,
            at,
        } = command
        {
            if self.opened.is_some() {
                return Err(AccountError::AlreadyOpen);
            }
            let name = name.trim().to_string();
            if name.is_empty() || name.len() > 200 {
                return Err(invalid("name", "must be 1 to 200 characters"));
            }
            let email = email.trim().to_string();
            let valid_email = email.len() <= 254
                && email.split_once('@').is_some_and(|(local, domain)| {
                    !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
                })
                && !email.contains(char::is_whitespace);
            if !valid_email {
                return Err(invalid("email", format!("{email:?} is not an email address")));
            }
            return Ok(vec![AccountEvent::AccountOpened {
                account_id,
                name,
                email,
                currency,
                country,
                opened_at: at,
            }]);
        }
        let opened = self.require_open()?;
        let currency = opened.currency;
        match command {
            AccountCommand::Open { .. } => unreachable!("handled above"),
            AccountCommand::SettleTopUp {
                topup_id,
                payment_id,
                amount,
            } => {
                check_positive("amount", amount, currency)?;
                if payment_id.is_empty() {
                    return Err(invalid("payment_id", "is empty"));
                }
                if self.payments.contains(&payment_id) {
                    return Ok(vec![]);
                }
                if self.topups.contains_key(&topup_id) {
                    return Err(AccountError::TopUpSettledElsewhere(topup_id));
                }
                Ok(vec![AccountEvent::TopUpSettled {
                    topup_id,
                    payment_id,
                    amount,
                    figures: self.figures_after(amount, Decimal::ZERO),
                }])
            }
            AccountCommand::PlaceHold {
                order_id,
                server_id,
                net,
                tax,
            } => {
                check_non_negative("net", net)?;
                check_non_negative("tax", tax)?;
                if self.holds.contains_key(&order_id) {
                    return Err(AccountError::HoldExists(order_id));
                }
                let amount = net + tax;
                if self.available() < amount {
                    return Err(AccountError::InsufficientFunds {
                        needed: amount,
                        available: self.available(),
                    });
                }
                Ok(vec![AccountEvent::HoldPlaced {
                    order_id,
                    server_id,
                    net,
                    tax,
                    amount,
                    figures: self.figures_after(Decimal::ZERO, amount),
                }])
            }
            AccountCommand::CaptureHold {
                order_id,
                charge_id,
                plan_id,
                slot,
                tax_rate,
            } => {
                let hold = self.holds.get(&order_id).ok_or(AccountError::UnknownHold(order_id))?;
                match hold.state {
                    HoldState::Captured => return Err(AccountError::HoldAlreadyCaptured(order_id)),
                    HoldState::Released => return Err(AccountError::HoldAlreadyReleased(order_id)),
                    HoldState::Placed => {}
                }
                self.fresh_charge_id(hold.server_id, charge_id)?;
                if self.is_charged(hold.server_id, slot) {
                    return Err(AccountError::SlotAlreadyCharged {
                        server_id: hold.server_id,
                        slot,
                    });
                }
                let gross = hold.net + hold.tax;
                Ok(vec![AccountEvent::HoldCaptured {
                    order_id,
                    charge_id,
                    server_id: hold.server_id,
                    plan_id,
                    slot,
                    net: hold.net,
                    tax: hold.tax,
                    gross,
                    tax_rate,
                    figures: self.figures_after(-gross, -gross),
                }])
            }
            AccountCommand::ReleaseHold { order_id, reason } => {
                let hold = self.holds.get(&order_id).ok_or(AccountError::UnknownHold(order_id))?;
                match hold.state {
                    HoldState::Captured => return Err(AccountError::HoldAlreadyCaptured(order_id)),
                    HoldState::Released => return Err(AccountError::HoldAlreadyReleased(order_id)),
                    HoldState::Placed => {}
                }
                let amount = hold.net + hold.tax;
                Ok(vec![AccountEvent::HoldReleased {
                    order_id,
                    amount,
                    reason,
                    figures: self.figures_after(Decimal::ZERO, -amount),
                }])
            }
            AccountCommand::ChargeSlot {
                charge_id,
                server_id,
                plan_id,
                slot,
                monthly_price,
                tax_rate,
            } => {
                check_positive("monthly_price", monthly_price, currency)?;
                if self.is_charged(server_id, slot) {
                    return Err(AccountError::SlotAlreadyCharged { server_id, slot });
                }
                self.fresh_charge_id(server_id, charge_id)?;
                let charge = slot_charge(monthly_price, self.month_net(server_id, slot.month()), tax_rate);
                if self.available() < charge.gross {
                    return Ok(vec![AccountEvent::ChargeDeclined {
                        server_id,
                        slot,
                        gross: charge.gross,
                        figures: self.figures_after(Decimal::ZERO, Decimal::ZERO),
                    }]);
                }
                Ok(vec![AccountEvent::HourCharged {
                    charge_id,
                    server_id,
                    plan_id,
                    slot,
                    rate_per_hour: charge.rate_per_hour,
                    net: charge.net,
                    tax: charge.tax,
                    gross: charge.gross,
                    tax_rate,
                    capped: charge.capped,
                    figures: self.figures_after(-charge.gross, Decimal::ZERO),
                }])
            }
            AccountCommand::RefundUnusedTime { charge_id, cancelled_at } => {
                let (server_id, charge) = self.latest_charge(charge_id).ok_or(AccountError::UnknownCharge(charge_id))?;
                if charge.unused_refund.is_some() {
                    return Err(AccountError::AlreadyRefunded(charge_id));
                }
                let unused_seconds = charge.slot.seconds_after(cancelled_at);
                let net = pro_rata(charge.net, unused_seconds);
                let tax = pro_rata(charge.tax, unused_seconds);
                let refundable = charge.net + charge.tax - self.refunded_of(charge_id);
                // Earlier service credits on the charge shrink what is left to give back.
                let (net, tax) = if net + tax > refundable {
                    scale_down(net, tax, refundable)
                } else {
                    (net, tax)
                };
                Ok(vec![AccountEvent::CancellationRefunded {
                    charge_id,
                    server_id,
                    unused_seconds,
                    net,
                    tax,
                    gross: net + tax,
                    figures: self.figures_after(net + tax, Decimal::ZERO),
                }])
            }
            AccountCommand::ResumeBilling {
                charge_id,
                server_id,
                plan_id,
                slot,
                from,
                monthly_price,
                tax_rate,
            } => {
                let Some(charge) = self
                    .servers
                    .get(&server_id)
                    .map(|charges| &charges.last)
                    .filter(|last| last.slot == slot)
                else {
                    return self.decide(AccountCommand::ChargeSlot {
                        charge_id,
                        server_id,
                        plan_id,
                        slot,
                        monthly_price,
                        tax_rate,
                    });
                };
                let charged = charge.charge_id;
                let Some((refunded_net, refunded_tax)) = charge.unused_refund else {
                    return Ok(vec![]);
                };
                let seconds = slot.seconds_after(from);
                let net = pro_rata(charge.net, seconds).min(refunded_net);
                let tax = pro_rata(charge.tax, seconds).min(refunded_tax);
                let gross = net + tax;
                if self.available() < gross {
                    return Ok(vec![AccountEvent::ChargeDeclined {
                        server_id,
                        slot,
                        gross,
                        figures: self.figures_after(Decimal::ZERO, Decimal::ZERO),
                    }]);
                }
                Ok(vec![AccountEvent::UnusedTimeRecharged {
                    charge_id: charged,
                    server_id,
                    seconds,
                    net,
                    tax,
                    gross,
                    figures: self.figures_after(-gross, Decimal::ZERO),
                }])
            }
            AccountCommand::CreditService {
                refund_id,
                charge_id,
                charge_gross,
                amount,
                reason,
            } => {
                check_positive("amount", amount, currency)?;
                check_reason(&reason)?;
                self.fresh_id(refund_id.0, "refund")?;
                if let Some((_, latest)) = self.latest_charge(charge_id) {
                    if latest.net + latest.tax != charge_gross {
                        return Err(AccountError::Invalid {
                            field: "charge_gross",
                            reason: format!("the charge's gross is {}", latest.net + latest.tax),
                        });
                    }
                }
                let refundable = charge_gross - self.refunded_of(charge_id);
                if amount > refundable {
                    return Err(AccountError::RefundExceedsCharge { charge_id, refundable });
                }
                Ok(vec![AccountEvent::ServiceCredited {
                    refund_id,
                    charge_id,
                    amount,
                    reason,
                    figures: self.figures_after(amount, Decimal::ZERO),
                }])
            }
            AccountCommand::RequestCardRefund {
                refund_id,
                topup_id,
                amount,
                reason,
            } => {
                check_positive("amount", amount, currency)?;
                check_reason(&reason)?;
                self.fresh_id(refund_id.0, "refund")?;
                let topup = self.topups.get(&topup_id).ok_or(AccountError::UnknownTopUp(topup_id))?;
                let refundable = topup.amount - topup.refunded;
                if amount > refundable {
                    return Err(AccountError::RefundExceedsTopUp { topup_id, refundable });
                }
                if amount > self.available() {
                    return Err(AccountError::InsufficientFunds {
                        needed: amount,
                        available: self.available(),
                    });
                }
                Ok(vec![AccountEvent::CardRefundRequested {
                    refund_id,
                    topup_id,
                    amount,
                    reason,
                    figures: self.figures_after(-amount, Decimal::ZERO),
                    at_processor: false,
                }])
            }
            AccountCommand::RecordProcessorRefund {
                refund_id,
                topup_id,
                total_refunded,
            } => {
                check_positive("total_refunded", total_refunded, currency)?;
                let topup = self.topups.get(&topup_id).ok_or(AccountError::UnknownTopUp(topup_id))?;
                // The processor never refunds more than was paid.
                let outside = total_refunded.min(topup.amount) - topup.refunded;
                if outside <= Decimal::ZERO {
                    return Ok(Vec::new());
                }
                self.fresh_id(refund_id.0, "refund")?;
                Ok(vec![
                    AccountEvent::CardRefundRequested {
                        refund_id,
                        topup_id,
                        amount: outside,
                        reason: "refunded at the card processor (dashboard)".into(),
                        figures: self.figures_after(-outside, Decimal::ZERO),
                        at_processor: true,
                    },
                    AccountEvent::CardRefundCompleted {
                        refund_id,
                        topup_id,
                        amount: outside,
                    },
                ])
            }
            AccountCommand::CompleteCardRefund { refund_id } => {
                let refund = self.card_refunds.get(&refund_id).ok_or(AccountError::UnknownRefund(refund_id))?;
                if refund.state != CardRefundState::Requested {
                    return Err(AccountError::RefundSettled(refund_id));
                }
                Ok(vec![AccountEvent::CardRefundCompleted {
                    refund_id,
                    topup_id: refund.topup_id,
                    amount: refund.amount,
                }])
            }
            AccountCommand::FailCardRefund { refund_id } => {
                let refund = self.card_refunds.get(&refund_id).ok_or(AccountError::UnknownRefund(refund_id))?;
                match refund.state {
                    CardRefundState::Requested => {}
                    // Reported failed after it succeeded: the card never got it.
                    CardRefundState::Completed => {
                        return Ok(vec![AccountEvent::CardRefundReversed {
                            refund_id,
                            topup_id: refund.topup_id,
                            amount: refund.amount,
                            figures: self.figures_after(refund.amount, Decimal::ZERO),
                        }])
                    }
                    CardRefundState::Failed => return Err(AccountError::RefundSettled(refund_id)),
                }
                Ok(vec![AccountEvent::CardRefundFailed {
                    refund_id,
                    topup_id: refund.topup_id,
                    amount: refund.amount,
                    figures: self.figures_after(refund.amount, Decimal::ZERO),
                }])
            }
            AccountCommand::Adjust {
                adjustment_id,
                amount,
                reason,
            } => {
                check_scale("amount", amount)?;
                if amount.is_zero() {
                    return Err(invalid("amount", "must not be zero"));
                }
                check_reason(&reason)?;
                self.fresh_id(adjustment_id.0, "adjustment")?;
                if amount.is_sign_negative() && -amount > self.available() {
                    return Err(AccountError::InsufficientFunds {
                        needed: -amount,
                        available: self.available(),
                    });
                }
                Ok(vec![AccountEvent::Adjusted {
                    adjustment_id,
                    amount,
                    reason,
                    figures: self.figures_after(amount, Decimal::ZERO),
                }])
            }
            AccountCommand::OpenDispute {
                dispute_id,
                payment_id,
                amount,
            } => {
                check_non_negative("amount", amount)?;
                if self.disputes.contains_key(&dispute_id) {
                    return Ok(vec![]);
                }
                // The bank takes the money whatever the balance: the one way below zero.
                Ok(vec![AccountEvent::DisputeOpened {
                    dispute_id,
                    payment_id,
                    amount,
                    figures: self.figures_after(-amount, Decimal::ZERO),
                }])
            }
            AccountCommand::CloseDispute { dispute_id, won } => {
                let dispute = self.disputes.get(&dispute_id).ok_or(AccountError::UnknownDispute(dispute_id))?;
                if !dispute.open {
                    return Err(AccountError::DisputeClosed(dispute_id));
                }
                let amount_returned = if won { dispute.amount - dispute.reinstated } else { Decimal::ZERO };
                Ok(vec![AccountEvent::DisputeClosed {
                    dispute_id,
                    won,
                    amount_returned,
                    figures: self.figures_after(amount_returned, Decimal::ZERO),
                }])
            }
            AccountCommand::SyncDispute {
                dispute_id,
                payment_id,
                withdrawn_total,
                reinstated_total,
                closed,
            } => {
                check_non_negative("withdrawn_total", withdrawn_total)?;
                check_non_negative("reinstated_total", reinstated_total)?;
                let mut events = Vec::new();
                let mut balance = self.balance;
                let mut figures = |change: Decimal| {
                    balance += change;
                    Figures {
                        balance,
                        reserved: self.reserved,
                        available: balance - self.reserved,
                    }
                };
                let (withdrawn, reinstated) = match self.disputes.get(&dispute_id) {
                    Some(dispute) if !dispute.open => return Ok(vec![]),
                    Some(dispute) => {
                        let more = withdrawn_total - dispute.amount;
                        if more > Decimal::ZERO {
                            events.push(AccountEvent::DisputeFundsWithdrawn {
                                dispute_id,
                                amount: more,
                                figures: figures(-more),
                            });
                        }
                        (dispute.amount.max(withdrawn_total), dispute.reinstated)
                    }
                    None => {
                        // The bank takes the money whatever the balance: the one way below zero.
                        events.push(AccountEvent::DisputeOpened {
                            dispute_id,
                            payment_id,
                            amount: withdrawn_total,
                            figures: figures(-withdrawn_total),
                        });
                        (withdrawn_total, Decimal::ZERO)
                    }
                };
                // Never more given back than was taken.
                let back = reinstated_total.min(withdrawn) - reinstated;
                let back = back.max(Decimal::ZERO);
                match closed {
                    Some(won) => events.push(AccountEvent::DisputeClosed {
                        dispute_id,
                        won,
                        amount_returned: back,
                        figures: figures(back),
                    }),
                    None if back > Decimal::ZERO => events.push(AccountEvent::DisputeFundsReinstated {
                        dispute_id,
                        amount: back,
                        figures: figures(back),
                    }),
                    None => {}
                }
                Ok(events)
            }
            AccountCommand::CheckRunway {
                hourly_burn_gross,
                threshold_hours,
            } => {
                let runway = runway_hours(self.available(), hourly_burn_gross);
                let low = runway.is_some_and(|hours| hours < threshold_hours);
                match (low, self.low_balance_warned) {
                    (true, false) => Ok(vec![AccountEvent::LowBalanceWarned {
                        runway_hours: runway.expect("low implies some"),
                        available: self.available(),
                    }]),
                    (false, true) => Ok(vec![AccountEvent::LowBalanceCleared {
                        runway_hours: runway,
                        available: self.available(),
                    }]),
                    _ => Ok(vec![]),
                }
            }
        }
    }
}

/// Shrinks a (net, tax) pair to total `limit`, keeping the tax's share.
fn scale_down(net: Decimal, tax: Decimal, limit: Decimal) -> (Decimal, Decimal) {
    let total = net + tax;
    if total.is_zero() || limit <= Decimal::ZERO {
        return (Decimal::ZERO, Decimal::ZERO);
    }
    let tax = crate::money::round_ledger(tax * limit / total);
    (limit - tax, tax)
}

fn check_scale(field: &'static str, amount: Decimal) -> Result<(), AccountError> {
    if amount.normalize().scale() > LEDGER_SCALE {
        return Err(invalid(field, format!("{amount} has more than 6 decimal places")));
    }
    Ok(())
}

fn check_non_negative(field: &'static str, amount: Decimal) -> Result<(), AccountError> {
    check_scale(field, amount)?;
    if amount.is_sign_negative() && !amount.is_zero() {
        return Err(invalid(field, format!("{amount} is negative")));
    }
    Ok(())
}

fn check_positive(field: &'static str, amount: Decimal, _currency: Currency) -> Result<(), AccountError> {
    check_scale(field, amount)?;
    if amount <= Decimal::ZERO {
        return Err(invalid(field, format!("{amount} must be more than zero")));
    }
    Ok(())
}

fn check_reason(reason: &str) -> Result<(), AccountError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 500 {
        return Err(invalid("reason", "is required (1 to 500 characters)"));
    }
    Ok(())
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;
    type Services = ();

    async fn handle(&mut self, command: AccountCommand, _: &(), sink: &cqrs_es::event_sink::EventSink<Self>) -> Result<(), AccountError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: AccountEvent) {
        let figures = event.figures();
        match event {
            AccountEvent::AccountOpened {
                account_id,
                currency,
                country,
                ..
            } => {
                self.opened = Some(Opened {
                    account_id,
                    currency,
                    country,
                });
            }
            AccountEvent::TopUpSettled {
                topup_id,
                payment_id,
                amount,
                ..
            } => {
                self.payments.insert(payment_id);
                self.topups.insert(
                    topup_id,
                    TopUp {
                        amount,
                        refunded: Decimal::ZERO,
                    },
                );
            }
            AccountEvent::HoldPlaced {
                order_id,
                server_id,
                net,
                tax,
                ..
            } => {
                self.holds.insert(
                    order_id,
                    Hold {
                        server_id,
                        net,
                        tax,
                        state: HoldState::Placed,
                    },
                );
            }
            AccountEvent::HoldCaptured {
                order_id,
                charge_id,
                server_id,
                slot,
                net,
                tax,
                ..
            } => {
                if let Some(hold) = self.holds.get_mut(&order_id) {
                    hold.state = HoldState::Captured;
                }
                self.record_charge(charge_id, server_id, slot, net, tax);
            }
            AccountEvent::HoldReleased { order_id, .. } => {
                if let Some(hold) = self.holds.get_mut(&order_id) {
                    hold.state = HoldState::Released;
                }
            }
            AccountEvent::HourCharged {
                charge_id,
                server_id,
                slot,
                net,
                tax,
                ..
            } => {
                self.record_charge(charge_id, server_id, slot, net, tax);
            }
            AccountEvent::ChargeDeclined { .. } => {}
            AccountEvent::CancellationRefunded {
                charge_id,
                net,
                tax,
                gross,
                ..
            } => {
                if let Some(last) = self.latest_charge_mut(charge_id) {
                    last.unused_refund = Some((net, tax));
                }
                self.add_refunded(charge_id, gross);
            }
            AccountEvent::UnusedTimeRecharged { charge_id, gross, .. } => {
                if let Some(last) = self.latest_charge_mut(charge_id) {
                    last.unused_refund = None;
                }
                self.add_refunded(charge_id, -gross);
            }
            AccountEvent::ServiceCredited {
                refund_id,
                charge_id,
                amount,
                ..
            } => {
                self.used_ids.insert(refund_id.0);
                self.add_refunded(charge_id, amount);
            }
            AccountEvent::CardRefundRequested {
                refund_id,
                topup_id,
                amount,
                ..
            } => {
                self.used_ids.insert(refund_id.0);
                self.card_refunds.insert(
                    refund_id,
                    CardRefund {
                        topup_id,
                        amount,
                        state: CardRefundState::Requested,
                    },
                );
                if let Some(topup) = self.topups.get_mut(&topup_id) {
                    topup.refunded += amount;
                }
            }
            AccountEvent::CardRefundCompleted { refund_id, .. } => {
                if let Some(refund) = self.card_refunds.get_mut(&refund_id) {
                    refund.state = CardRefundState::Completed;
                }
            }
            AccountEvent::CardRefundFailed {
                refund_id,
                topup_id,
                amount,
                ..
            }
            | AccountEvent::CardRefundReversed {
                refund_id,
                topup_id,
                amount,
                ..
            } => {
                if let Some(refund) = self.card_refunds.get_mut(&refund_id) {
                    refund.state = CardRefundState::Failed;
                }
                if let Some(topup) = self.topups.get_mut(&topup_id) {
                    topup.refunded -= amount;
                }
            }
            AccountEvent::Adjusted { adjustment_id, .. } => {
                self.used_ids.insert(adjustment_id.0);
            }
            AccountEvent::DisputeOpened { dispute_id, amount, .. } => {
                self.disputes.insert(
                    dispute_id,
                    Dispute {
                        amount,
                        reinstated: Decimal::ZERO,
                        open: true,
                    },
                );
            }
            AccountEvent::DisputeFundsWithdrawn { dispute_id, amount, .. } => {
                if let Some(dispute) = self.disputes.get_mut(&dispute_id) {
                    dispute.amount += amount;
                }
            }
            AccountEvent::DisputeFundsReinstated { dispute_id, amount, .. } => {
                if let Some(dispute) = self.disputes.get_mut(&dispute_id) {
                    dispute.reinstated += amount;
                }
            }
            AccountEvent::DisputeClosed {
                dispute_id,
                amount_returned,
                ..
            } => {
                if let Some(dispute) = self.disputes.get_mut(&dispute_id) {
                    dispute.open = false;
                    dispute.reinstated += amount_returned;
                }
            }
            AccountEvent::LowBalanceWarned { .. } => self.low_balance_warned = true,
            AccountEvent::LowBalanceCleared { .. } => self.low_balance_warned = false,
        }
        if let Some(figures) = figures {
            self.balance = figures.balance;
            self.reserved = figures.reserved;
            debug_assert_eq!(figures.available, figures.balance - figures.reserved);
        }
    }
}

impl Account {
    fn record_charge(&mut self, charge_id: ChargeId, server_id: ServerId, slot: HourSlot, net: Decimal, tax: Decimal) {
        let last = LastCharge {
            charge_id,
            slot,
            net,
            tax,
            unused_refund: None,
        };
        let month = slot.month();
        match self.servers.get_mut(&server_id) {
            // Slots are charged in order; a stored history that has one out of order (logs
            // written before the run started from the server's own billable slot) never moves
            // the high-water mark back, and counts towards the cap only in the latest month.
            Some(charges) if slot < charges.last.slot => {
                if month == charges.month {
                    charges.month_net += net;
                }
            }
            Some(charges) => {
                charges.month_net = if charges.month == month { charges.month_net + net } else { net };
                charges.month = month;
                charges.last = last;
            }
            None => {
                self.servers.insert(
                    server_id,
                    ServerCharges {
                        last,
                        month,
                        month_net: net,
                    },
                );
            }
        }
    }

    fn add_refunded(&mut self, charge_id: ChargeId, gross: Decimal) {
        let refunded = self.refunded.entry(charge_id).or_default();
        *refunded += gross;
        if refunded.is_zero() {
            self.refunded.remove(&charge_id);
        }
    }

    fn refunded_of(&self, charge_id: ChargeId) -> Decimal {
        self.refunded.get(&charge_id).copied().unwrap_or_default()
    }

    fn latest_charge(&self, charge_id: ChargeId) -> Option<(ServerId, &LastCharge)> {
        self.servers
            .iter()
            .find(|(_, charges)| charges.last.charge_id == charge_id)
            .map(|(server_id, charges)| (*server_id, &charges.last))
    }

    fn latest_charge_mut(&mut self, charge_id: ChargeId) -> Option<&mut LastCharge> {
        self.servers
            .values_mut()
            .map(|charges| &mut charges.last)
            .find(|last| last.charge_id == charge_id)
    }

    /// The charge of `server` in `slot` if it is the server's latest (the slot in progress, for
    /// a refund at cancellation); older charges are found in the log.
    pub fn charge_for(&self, server_id: ServerId, slot: HourSlot) -> Option<ChargeId> {
        self.servers
            .get(&server_id)
            .filter(|charges| charges.last.slot == slot)
            .map(|charges| charges.last.charge_id)
    }
}

/// Whether a stored account event's payload needs `upcast`.
pub fn upcasts(event_type: &str, schema_version: i32) -> bool {
    event_type == "AccountOpened" && schema_version < 2
}

/// Brings a stored account event's payload to the current version. Every upcaster sits behind
/// `upcasts`, which readers of the payload's text consult to know when to come here.
pub fn upcast(event_type: &str, schema_version: i32, mut payload: serde_json::Value) -> serde_json::Value {
    if !upcasts(event_type, schema_version) {
        return payload;
    }
    if event_type == "AccountOpened" {
        if let Some(object) = payload.as_object_mut() {
            if let Some(country) = object.remove("tax_country") {
                object.insert("country".into(), country);
            }
        }
    }
    payload
}
