//! Double entry: every money event of an account as balanced postings over ledger accounts, in
//! the account's currency. Wallets are liabilities (what the business owes its customers), so a
//! wallet's credits minus debits is its balance; the trial balance of all postings nets to zero
//! in every currency. Amounts of different currencies are never added: every ledger account is
//! kept per currency.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::account::AccountEvent;
use crate::money::Currency;
use crate::types::{AccountId, Country};

pub const STRIPE_CLEARING: &str = "assets:stripe_clearing";
pub const HOSTING_INCOME: &str = "income:hosting";
pub const SERVICE_CREDITS: &str = "expenses:service_credits";
pub const ADJUSTMENT_CREDITS: &str = "expenses:adjustments";
pub const ADJUSTMENT_DEBITS: &str = "income:adjustments";
pub const CARD_REFUNDS_PENDING: &str = "liabilities:card_refunds_pending";

pub fn wallet_account(account_id: AccountId) -> String {
    format!("liabilities:wallets:{account_id}")
}

pub fn tax_account(country: Country) -> String {
    format!("liabilities:tax:{country}")
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    pub account: String,
    pub currency: Currency,
    pub debit: Decimal,
    pub credit: Decimal,
}

/// A posting before its currency is known (every posting of an event has the account's).
struct Line {
    account: String,
    debit: Decimal,
    credit: Decimal,
}

fn debit(account: impl Into<String>, amount: Decimal) -> Line {
    Line {
        account: account.into(),
        debit: amount,
        credit: Decimal::ZERO,
    }
}

fn credit(account: impl Into<String>, amount: Decimal) -> Line {
    Line {
        account: account.into(),
        debit: Decimal::ZERO,
        credit: amount,
    }
}

/// The postings of one account event, in the account's currency. Events that move no money
/// (holds, warnings) post nothing. Panics if the postings do not balance: that is a bug, never an
/// expected failure.
pub fn postings(account_id: AccountId, country: Country, currency: Currency, event: &AccountEvent) -> Vec<Posting> {
    let wallet = wallet_account(account_id);
    let tax = tax_account(country);
    let entries = match event {
        AccountEvent::TopUpSettled { amount, .. } => {
            vec![debit(STRIPE_CLEARING, *amount), credit(wallet, *amount)]
        }
        AccountEvent::HoldCaptured {
            net,
            tax: tax_amount,
            gross,
            ..
        }
        | AccountEvent::HourCharged {
            net,
            tax: tax_amount,
            gross,
            ..
        }
        | AccountEvent::UnusedTimeRecharged {
            net,
            tax: tax_amount,
            gross,
            ..
        } => {
            vec![debit(wallet, *gross), credit(HOSTING_INCOME, *net), credit(tax, *tax_amount)]
        }
        AccountEvent::CancellationRefunded {
            net,
            tax: tax_amount,
            gross,
            ..
        } => {
            vec![debit(HOSTING_INCOME, *net), debit(tax, *tax_amount), credit(wallet, *gross)]
        }
        AccountEvent::ServiceCredited { amount, .. } => {
            vec![debit(SERVICE_CREDITS, *amount), credit(wallet, *amount)]
        }
        AccountEvent::CardRefundRequested { amount, .. } => vec![debit(wallet, *amount), credit(CARD_REFUNDS_PENDING, *amount)],
        AccountEvent::CardRefundCompleted { amount, .. } => vec![debit(CARD_REFUNDS_PENDING, *amount), credit(STRIPE_CLEARING, *amount)],
        AccountEvent::CardRefundFailed { amount, .. } => vec![debit(CARD_REFUNDS_PENDING, *amount), credit(wallet, *amount)],
        // The processor took the money back from the card after all.
        AccountEvent::CardRefundReversed { amount, .. } => vec![debit(STRIPE_CLEARING, *amount), credit(wallet, *amount)],
        AccountEvent::Adjusted { amount, .. } if amount.is_sign_positive() => {
            vec![debit(ADJUSTMENT_CREDITS, *amount), credit(wallet, *amount)]
        }
        AccountEvent::Adjusted { amount, .. } => {
            vec![debit(wallet, -*amount), credit(ADJUSTMENT_DEBITS, -*amount)]
        }
        // The bank takes the disputed payment back out of the clearing account.
        AccountEvent::DisputeOpened { amount, .. } | AccountEvent::DisputeFundsWithdrawn { amount, .. } => {
            vec![debit(wallet, *amount), credit(STRIPE_CLEARING, *amount)]
        }
        AccountEvent::DisputeClosed { amount_returned, .. }
        | AccountEvent::DisputeFundsReinstated {
            amount: amount_returned, ..
        } => {
            vec![debit(STRIPE_CLEARING, *amount_returned), credit(wallet, *amount_returned)]
        }
        AccountEvent::AccountOpened { .. }
        | AccountEvent::HoldPlaced { .. }
        | AccountEvent::HoldReleased { .. }
        | AccountEvent::ChargeDeclined { .. }
        | AccountEvent::LowBalanceWarned { .. }
        | AccountEvent::LowBalanceCleared { .. } => vec![],
    };
    let entries: Vec<Posting> = entries
        .into_iter()
        .filter(|p| !(p.debit.is_zero() && p.credit.is_zero()))
        .map(|line| Posting {
            account: line.account,
            currency,
            debit: line.debit,
            credit: line.credit,
        })
        .collect();
    let debits: Decimal = entries.iter().map(|p| p.debit).sum();
    let credits: Decimal = entries.iter().map(|p| p.credit).sum();
    assert_eq!(debits, credits, "postings of {event:?} do not balance");
    assert!(
        entries.iter().all(|p| p.debit >= Decimal::ZERO && p.credit >= Decimal::ZERO),
        "a posting is negative: {entries:?}"
    );
    entries
}

/// The change an event makes to the wallet's balance, read from its postings.
pub fn wallet_change(account_id: AccountId, postings: &[Posting]) -> Decimal {
    let wallet = wallet_account(account_id);
    postings.iter().filter(|p| p.account == wallet).map(|p| p.credit - p.debit).sum()
}
