//! The reference model: what the billing rules of SPEC section 4 say each operation must do to
//! the money and to the servers, written from the specification and independently of the domain
//! code (its own prices, tax rates, rounding, caps, pro rata and order of work). The simulation
//! asks it what to expect before each step and compares the system with it after.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, DurationRound, Utc};
use rust_decimal::{Decimal, RoundingStrategy};

pub fn round6(amount: Decimal) -> Decimal {
    amount.round_dp_with_strategy(6, RoundingStrategy::MidpointNearestEven)
}

/// Monthly prices of the demo catalogue (SPEC section 3), tax exclusive.
pub fn monthly_price(plan: &str, currency: &str) -> Decimal {
    let (usd, aud, eur) = match plan {
        "vps-1g" => (5, 8, 5),
        "vps-2g" => (10, 15, 9),
        other => panic!("the model knows no plan {other}"),
    };
    Decimal::from(match currency {
        "USD" => usd,
        "AUD" => aud,
        "EUR" => eur,
        other => panic!("the model knows no currency {other}"),
    })
}

/// Tax rates by country (SPEC section 3).
pub fn tax_rate(country: &str) -> Decimal {
    match country {
        "AU" => Decimal::new(10, 2),
        "NZ" => Decimal::new(15, 2),
        "DE" => Decimal::new(19, 2),
        "GB" => Decimal::new(20, 2),
        _ => Decimal::ZERO,
    }
}

pub fn rate_per_hour(monthly: Decimal) -> Decimal {
    round6(monthly / Decimal::from(730))
}

pub fn slot_of(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(Duration::hours(1)).expect("an hour divides time")
}

fn month_of(slot: DateTime<Utc>) -> (i32, u32) {
    (slot.year(), slot.month())
}

/// Seconds of a slot after `at` (the unused part), 0 to 3600.
fn unused_seconds(slot: DateTime<Utc>, at: DateTime<Utc>) -> i64 {
    let end = slot + Duration::hours(1);
    (end - at.clamp(slot, end)).num_seconds()
}

fn pro_rata(amount: Decimal, seconds: i64) -> Decimal {
    round6(amount * Decimal::from(seconds.clamp(0, 3600)) / Decimal::from(3600))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    NonPayment,
    Dispute,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Provisioning,
    NeedsSetup,
    Running,
    Stopped,
    Suspended,
    PendingCancellation,
    Deleting,
    Deleted,
    Failed,
}

#[derive(Clone, Debug)]
pub struct Charge {
    pub net: Decimal,
    pub tax: Decimal,
    /// Given back so far (unused time and service credits), gross.
    pub refunded: Decimal,
    /// The unused time given back at a cancellation, not charged again since.
    pub unused_refund: Option<(Decimal, Decimal)>,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub index: usize,
    pub account: usize,
    pub plan: &'static str,
    pub provisioned: bool,
    pub failed: bool,
    pub deleted: bool,
    pub set_up: bool,
    pub powered_on: bool,
    pub suspended: Option<(Reason, DateTime<Utc>)>,
    /// (grace?, effective at, powered on before)
    pub cancellation: Option<(bool, DateTime<Utc>, bool)>,
    pub hold: (Decimal, Decimal),
    pub hold_ended: bool,
    pub charges: BTreeMap<DateTime<Utc>, Charge>,
    pub month_net: BTreeMap<(i32, u32), Decimal>,
    /// The slot from which billing may charge (the slot it last became billable in).
    pub billable_from: DateTime<Utc>,
}

impl Server {
    pub fn status(&self) -> Status {
        if self.deleted {
            Status::Deleted
        } else if self.failed {
            Status::Failed
        } else if !self.provisioned {
            Status::Provisioning
        } else if let Some((grace, _, _)) = self.cancellation {
            if grace {
                Status::PendingCancellation
            } else {
                Status::Deleting
            }
        } else if self.suspended.is_some() {
            Status::Suspended
        } else if !self.set_up {
            Status::NeedsSetup
        } else if self.powered_on {
            Status::Running
        } else {
            Status::Stopped
        }
    }

    pub fn billable(&self) -> bool {
        matches!(self.status(), Status::NeedsSetup | Status::Running | Status::Stopped)
    }

    pub fn live(&self) -> bool {
        !matches!(self.status(), Status::Deleted | Status::Failed)
    }
}

#[derive(Clone, Debug)]
pub struct TopUp {
    pub amount: Decimal,
    /// How its payment is made: as asked, or in another currency or amount.
    pub payment: Payment,
    pub paid: bool,
    pub held: bool,
    /// Card refunds requested or completed (failed ones give their amount back).
    pub refunded: Decimal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payment {
    AsAsked,
    OtherCurrency,
    OtherAmount,
}

#[derive(Clone, Debug)]
pub struct CardRefund {
    pub topup: usize,
    pub amount: Decimal,
    pub settled: bool,
}

#[derive(Clone, Debug)]
pub struct Dispute {
    pub topup: usize,
    pub withdrawn: Decimal,
    pub reinstated: Decimal,
    pub closed: bool,
}

#[derive(Clone, Debug)]
pub struct Account {
    pub currency: &'static str,
    pub country: &'static str,
    pub balance: Decimal,
    pub reserved: Decimal,
    pub topups: Vec<TopUp>,
    pub card_refunds: Vec<CardRefund>,
    pub disputes: Vec<Dispute>,
    /// Money was withdrawn by a dispute at some time (the one way below zero).
    pub disputed: bool,
}

impl Account {
    pub fn available(&self) -> Decimal {
        self.balance - self.reserved
    }
}

#[derive(Default)]
pub struct Model {
    pub accounts: Vec<Account>,
    pub servers: Vec<Server>,
}

/// What billing a slot from an instant on decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Billed {
    Charged,
    Recharged,
    AlreadyPaid,
    Declined,
}

impl Model {
    pub fn server_of(&self, account: usize) -> Option<usize> {
        self.servers.iter().rposition(|server| server.account == account && server.live())
    }

    fn prices(&self, server: usize) -> (Decimal, Decimal) {
        let server = &self.servers[server];
        let account = &self.accounts[server.account];
        (monthly_price(server.plan, account.currency), tax_rate(account.country))
    }

    /// The first hour's net and tax, held when an order is placed.
    pub fn first_hour(&self, account: usize, plan: &str) -> (Decimal, Decimal) {
        let account = &self.accounts[account];
        let rate = rate_per_hour(monthly_price(plan, account.currency));
        (rate, round6(rate * tax_rate(account.country)))
    }

    /// The charge of `slot`: `net = min(rate, monthly - net so far this month)`.
    fn slot_charge(&self, server: usize, slot: DateTime<Utc>) -> (Decimal, Decimal) {
        let (monthly, tax) = self.prices(server);
        let so_far = self.servers[server].month_net.get(&month_of(slot)).copied().unwrap_or_default();
        let net = rate_per_hour(monthly).min((monthly - so_far).max(Decimal::ZERO));
        (net, round6(net * tax))
    }

    fn record_charge(&mut self, server: usize, slot: DateTime<Utc>, net: Decimal, tax: Decimal) {
        let record = &mut self.servers[server];
        assert!(!record.charges.contains_key(&slot), "the model charged {slot} twice");
        *record.month_net.entry(month_of(slot)).or_default() += net;
        record.charges.insert(
            slot,
            Charge {
                net,
                tax,
                refunded: Decimal::ZERO,
                unused_refund: None,
            },
        );
        self.accounts[record.account].balance -= net + tax;
    }

    /// Charges `slot` in full if the wallet can pay; false when declined.
    fn charge_slot(&mut self, server: usize, slot: DateTime<Utc>) -> bool {
        let (net, tax) = self.slot_charge(server, slot);
        if self.accounts[self.servers[server].account].available() < net + tax {
            return false;
        }
        self.record_charge(server, slot, net, tax);
        true
    }

    /// Billing starts again at `at`: the slot in progress is paid at least from `at` on.
    fn bill_from(&mut self, server: usize, at: DateTime<Utc>, decide_only: bool) -> Billed {
        let slot = slot_of(at);
        let account = self.servers[server].account;
        match self.servers[server].charges.get(&slot).cloned() {
            None => {
                let (net, tax) = self.slot_charge(server, slot);
                if self.accounts[account].available() < net + tax {
                    return Billed::Declined;
                }
                if !decide_only {
                    self.record_charge(server, slot, net, tax);
                }
                Billed::Charged
            }
            Some(Charge {
                unused_refund: Some((refunded_net, refunded_tax)),
                net,
                tax,
                ..
            }) => {
                let seconds = unused_seconds(slot, at);
                let net = pro_rata(net, seconds).min(refunded_net);
                let tax = pro_rata(tax, seconds).min(refunded_tax);
                if self.accounts[account].available() < net + tax {
                    return Billed::Declined;
                }
                if !decide_only {
                    let charge = self.servers[server].charges.get_mut(&slot).expect("present");
                    charge.unused_refund = None;
                    charge.refunded -= net + tax;
                    self.accounts[account].balance -= net + tax;
                }
                Billed::Recharged
            }
            Some(_) => Billed::AlreadyPaid,
        }
    }

    fn suspend(&mut self, server: usize, reason: Reason, at: DateTime<Utc>) {
        self.servers[server].suspended = Some((reason, at));
    }

    /// A suspended server resumed at `at` if its wallet pays the slot in progress: resumed and
    /// billed in one step, or (suspended for a dispute and unable to pay) suspended again for
    /// non-payment. Returns whether it was resumed.
    pub fn resume(&mut self, server: usize, at: DateTime<Utc>) -> bool {
        let Some((reason, _)) = self.servers[server].suspended else {
            return false;
        };
        if self.servers[server].cancellation.is_some() {
            return false;
        }
        match self.bill_from(server, at, true) {
            Billed::Declined if reason == Reason::Dispute => {
                self.suspend(server, Reason::NonPayment, at);
                false
            }
            Billed::Declined => false,
            _ => {
                self.servers[server].suspended = None;
                self.servers[server].billable_from = slot_of(at);
                self.bill_from(server, at, false);
                true
            }
        }
    }

    /// After a top-up lands: its account's servers suspended for non-payment that can now pay
    /// an hour are resumed (as `resume_affordable` does for one account).
    pub fn resume_affordable(&mut self, account: usize, at: DateTime<Utc>) {
        let candidates: Vec<usize> = self
            .servers
            .iter()
            .filter(|server| server.account == account && server.status() == Status::Suspended)
            .filter(|server| matches!(server.suspended, Some((Reason::NonPayment, _))))
            .map(|server| server.index)
            .collect();
        for server in candidates {
            let plan = self.servers[server].plan;
            let (net, tax) = self.first_hour(account, plan);
            if self.accounts[account].available() >= net + tax {
                self.resume(server, at);
            }
        }
    }

    /// Every hour a billable server owes up to the slot of `at` and has not paid, charged slot by
    /// slot; declined, it is suspended at `at` and charged no more.
    pub fn catch_up(&mut self, server: usize, at: DateTime<Utc>) {
        if !self.servers[server].billable() {
            return;
        }
        let next = match self.servers[server].charges.keys().next_back() {
            Some(last) => *last + Duration::hours(1),
            None => self.servers[server].billable_from,
        };
        let mut slot = next.max(self.servers[server].billable_from);
        while slot <= slot_of(at) {
            if !self.servers[server].charges.contains_key(&slot) && !self.charge_slot(server, slot) {
                self.suspend(server, Reason::NonPayment, at);
                break;
            }
            slot += Duration::hours(1);
        }
    }

    /// The due work at `now`: resumptions, the billing of every due slot, deletions, terminations.
    pub fn run_due(&mut self, now: DateTime<Utc>) {
        for account in 0..self.accounts.len() {
            self.resume_affordable(account, now);
        }
        for server in 0..self.servers.len() {
            self.catch_up(server, now);
        }
        for server in &mut self.servers {
            if let Some((_, effective_at, _)) = server.cancellation {
                if effective_at <= now && !server.deleted {
                    server.deleted = true;
                    server.powered_on = false;
                }
            }
        }
        for server in &mut self.servers {
            if server.status() == Status::Suspended {
                if let Some((Reason::NonPayment, since)) = server.suspended {
                    if now - since >= Duration::days(7) {
                        server.deleted = true;
                        server.powered_on = false;
                    }
                }
            }
        }
    }

    /// Provisioning succeeded at `at`: the hold is the first hour's charge.
    pub fn provisioned(&mut self, server: usize, at: DateTime<Utc>) {
        let record = &mut self.servers[server];
        let (net, tax) = record.hold;
        record.provisioned = true;
        record.hold_ended = true;
        record.billable_from = slot_of(at);
        let account = record.account;
        self.accounts[account].reserved -= net + tax;
        self.record_charge(server, slot_of(at), net, tax);
    }

    pub fn provisioning_failed(&mut self, server: usize) {
        let record = &mut self.servers[server];
        let (net, tax) = record.hold;
        record.failed = true;
        record.hold_ended = true;
        self.accounts[record.account].reserved -= net + tax;
    }

    /// A cancellation at `at`: billing stops and the unused part of the slot in progress is given back.
    pub fn cancel(&mut self, server: usize, grace: bool, at: DateTime<Utc>) -> bool {
        if !matches!(
            self.servers[server].status(),
            Status::NeedsSetup | Status::Running | Status::Stopped | Status::Suspended
        ) {
            return false;
        }
        // What it owes until now is charged before billing stops.
        self.catch_up(server, at);
        let effective_at = if grace {
            at + Duration::days(30)
        } else {
            at + Duration::minutes(5)
        };
        let record = &mut self.servers[server];
        record.cancellation = Some((grace, effective_at, record.powered_on));
        record.powered_on = false;
        let account = record.account;
        let slot = slot_of(at);
        if let Some(charge) = record.charges.get_mut(&slot) {
            if charge.unused_refund.is_none() {
                let seconds = unused_seconds(slot, at);
                let (mut net, mut tax) = (pro_rata(charge.net, seconds), pro_rata(charge.tax, seconds));
                let refundable = charge.net + charge.tax - charge.refunded;
                if net + tax > refundable {
                    let total = net + tax;
                    if total.is_zero() || refundable <= Decimal::ZERO {
                        (net, tax) = (Decimal::ZERO, Decimal::ZERO);
                    } else {
                        tax = round6(tax * refundable / total);
                        net = refundable - tax;
                    }
                }
                charge.unused_refund = Some((net, tax));
                charge.refunded += net + tax;
                self.accounts[account].balance += net + tax;
            }
        }
        true
    }

    /// Revoking a grace cancellation at `at`; None when refused.
    pub fn revoke(&mut self, server: usize, at: DateTime<Utc>) -> Option<Billed> {
        let record = &mut self.servers[server];
        let (grace, effective_at, powered_before) = record.cancellation?;
        if !grace || record.deleted || at >= effective_at {
            return None;
        }
        record.cancellation = None;
        record.powered_on = powered_before && record.set_up;
        record.billable_from = slot_of(at);
        if !self.servers[server].billable() {
            return Some(Billed::AlreadyPaid);
        }
        let billed = self.bill_from(server, at, false);
        if billed == Billed::Declined {
            self.suspend(server, Reason::NonPayment, at);
        }
        Some(billed)
    }
}
