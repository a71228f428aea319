//! Random sequences of account commands, hours, prices, months and tax rates; the rules must hold
//! after every step.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use cqrs_es::Aggregate;
use domain::account::{Account, AccountCommand as C, AccountEvent as Ev};
use domain::postings::{postings, wallet_change};
use domain::{
    AccountId, AdjustmentId, ChargeId, Country, Currency, DisputeId, HourSlot, OrderId, PlanId, RefundId, ServerId, TaxRate, TopUpId,
    YearMonth,
};
use proptest::prelude::*;
use rust_decimal::Decimal;
use uuid::Uuid;

#[derive(Clone, Debug)]
enum Op {
    TopUp {
        micros: i64,
        payment: u8,
    },
    Hold {
        order: u8,
        server: u8,
    },
    Capture {
        order: u8,
        hour: u32,
    },
    Release {
        order: u8,
    },
    Charge {
        server: u8,
        hour: u32,
    },
    /// Consecutive hours from `hour`, so months fill up to their cap.
    ChargeRun {
        server: u8,
        hour: u32,
        count: u32,
    },
    RefundUnused {
        pick: u16,
        seconds: i64,
    },
    Credit {
        pick: u16,
        micros: i64,
    },
    CardRefund {
        pick: u16,
        micros: i64,
    },
    SettleRefund {
        pick: u16,
        completed: bool,
    },
    Adjust {
        micros: i64,
    },
    Dispute {
        micros: i64,
        id: u8,
    },
    CloseDispute {
        id: u8,
        won: bool,
    },
    CheckRunway {
        micros: i64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1i64..60_000_000, 0u8..60).prop_map(|(micros, payment)| Op::TopUp { micros, payment }),
        2 => (0u8..5, 0u8..4).prop_map(|(order, server)| Op::Hold { order, server }),
        2 => (0u8..5, 0u32..2_400).prop_map(|(order, hour)| Op::Capture { order, hour }),
        1 => (0u8..5).prop_map(|order| Op::Release { order }),
        12 => (0u8..4, 0u32..2_400).prop_map(|(server, hour)| Op::Charge { server, hour }),
        1 => (0u8..4, 0u32..2_400, 1u32..800).prop_map(|(server, hour, count)| Op::ChargeRun { server, hour, count }),
        2 => (any::<u16>(), -100i64..4_000).prop_map(|(pick, seconds)| Op::RefundUnused { pick, seconds }),
        2 => (any::<u16>(), 1i64..40_000).prop_map(|(pick, micros)| Op::Credit { pick, micros }),
        1 => (any::<u16>(), 1i64..30_000_000).prop_map(|(pick, micros)| Op::CardRefund { pick, micros }),
        1 => (any::<u16>(), any::<bool>()).prop_map(|(pick, completed)| Op::SettleRefund { pick, completed }),
        1 => (-20_000_000i64..20_000_000).prop_map(|micros| Op::Adjust { micros }),
        1 => (1i64..30_000_000, 0u8..3).prop_map(|(micros, id)| Op::Dispute { micros, id }),
        1 => (0u8..3, any::<bool>()).prop_map(|(id, won)| Op::CloseDispute { id, won }),
        1 => (0i64..2_000_000).prop_map(|micros| Op::CheckRunway { micros }),
    ]
}

fn micros(value: i64) -> Decimal {
    Decimal::new(value, 6)
}

fn uuid(kind: u128, n: u128) -> Uuid {
    Uuid::from_u128((kind << 64) | n)
}

struct World {
    account_id: AccountId,
    start: DateTime<Utc>,
    monthly: Vec<Decimal>,
    tax_rate: TaxRate,
    next_id: u128,
    /// The charges made so far, with their gross (a service credit names it, as read from the log).
    charges: Vec<(ChargeId, Decimal)>,
    topups: Vec<TopUpId>,
    refunds: Vec<RefundId>,
}

impl World {
    fn fresh(&mut self) -> u128 {
        self.next_id += 1;
        self.next_id
    }

    fn slot(&self, hour: u32) -> HourSlot {
        HourSlot::containing(self.start + Duration::hours(i64::from(hour)))
    }

    fn pick<T: Copy>(items: &[T], pick: u16) -> Option<T> {
        (!items.is_empty()).then(|| items[pick as usize % items.len()])
    }

    /// The commands of an op, each made only when its turn comes (refunds pick among the charges
    /// made so far).
    fn commands_later(op: &Op) -> Vec<Box<dyn FnOnce(&mut World) -> Option<C>>> {
        match *op {
            Op::ChargeRun { server, hour, count } => (hour..hour + count)
                .map(|hour| {
                    Box::new(move |world: &mut World| world.command(&Op::Charge { server, hour }))
                        as Box<dyn FnOnce(&mut World) -> Option<C>>
                })
                .collect(),
            _ => {
                let op = op.clone();
                vec![Box::new(move |world: &mut World| world.command(&op))]
            }
        }
    }

    fn command(&mut self, op: &Op) -> Option<C> {
        let server = |n: u8| ServerId(uuid(2, u128::from(n)));
        let plan = PlanId::parse("vps-x").unwrap();
        Some(match *op {
            Op::TopUp { micros: amount, payment } => {
                let topup_id = TopUpId(uuid(3, self.fresh()));
                C::SettleTopUp {
                    topup_id,
                    payment_id: format!("pi_{payment}"),
                    amount: micros(amount),
                }
            }
            Op::Hold { order, server: n } => {
                let (net, tax) = {
                    let rate = domain::billing::rate_per_hour(self.monthly[n as usize]);
                    (rate, domain::billing::tax_on(rate, self.tax_rate))
                };
                C::PlaceHold {
                    order_id: OrderId(uuid(4, u128::from(order))),
                    server_id: server(n),
                    net,
                    tax,
                }
            }
            Op::Capture { order, hour } => C::CaptureHold {
                order_id: OrderId(uuid(4, u128::from(order))),
                charge_id: ChargeId(uuid(5, self.fresh())),
                plan_id: plan,
                slot: self.slot(hour),
                tax_rate: self.tax_rate,
            },
            Op::Release { order } => C::ReleaseHold {
                order_id: OrderId(uuid(4, u128::from(order))),
                reason: "failed".into(),
            },
            Op::ChargeRun { .. } => unreachable!("expanded by commands()"),
            Op::Charge { server: n, hour } => C::ChargeSlot {
                charge_id: ChargeId(uuid(5, self.fresh())),
                server_id: server(n),
                plan_id: plan,
                slot: self.slot(hour),
                monthly_price: self.monthly[n as usize],
                tax_rate: self.tax_rate,
            },
            Op::RefundUnused { pick, seconds } => {
                let (charge_id, _) = World::pick(&self.charges, pick)?;
                // The cancellation instant is relative to the slot; the account looks the slot up.
                C::RefundUnusedTime {
                    charge_id,
                    cancelled_at: self.start + Duration::seconds(seconds),
                }
            }
            Op::Credit { pick, micros: amount } => {
                let (charge_id, charge_gross) = World::pick(&self.charges, pick)?;
                C::CreditService {
                    refund_id: RefundId(uuid(6, self.fresh())),
                    charge_id,
                    charge_gross,
                    amount: micros(amount),
                    reason: "sla".into(),
                }
            }
            Op::CardRefund { pick, micros: amount } => {
                let refund_id = RefundId(uuid(6, self.fresh()));
                C::RequestCardRefund {
                    refund_id,
                    topup_id: World::pick(&self.topups, pick)?,
                    amount: micros(amount),
                    reason: "asked".into(),
                }
            }
            Op::SettleRefund { pick, completed } => {
                let refund_id = World::pick(&self.refunds, pick)?;
                if completed {
                    C::CompleteCardRefund { refund_id }
                } else {
                    C::FailCardRefund { refund_id }
                }
            }
            Op::Adjust { micros: amount } => C::Adjust {
                adjustment_id: AdjustmentId(uuid(7, self.fresh())),
                amount: micros(amount),
                reason: "ops".into(),
            },
            Op::Dispute { micros: amount, id } => C::OpenDispute {
                dispute_id: DisputeId(uuid(8, u128::from(id))),
                payment_id: "pi_0".into(),
                amount: micros(amount),
            },
            Op::CloseDispute { id, won } => C::CloseDispute {
                dispute_id: DisputeId(uuid(8, u128::from(id))),
                won,
            },
            Op::CheckRunway { micros: burn } => C::CheckRunway {
                hourly_burn_gross: micros(burn),
                threshold_hours: Decimal::from(24),
            },
        })
    }
}

fn scenario() -> impl Strategy<Value = (Vec<i64>, u8, u32, Vec<Op>)> {
    (
        proptest::collection::vec(1_000_000i64..80_000_000, 4),
        0u8..6,
        0u32..24 * 365,
        proptest::collection::vec(op(), 1..150),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn the_rules_hold_after_every_command((monthly, tax, start_hour, ops) in scenario()) {
        let tax_rates = [0i64, 100_000, 150_000, 190_000, 200_000, 72_500];
        let start = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z").unwrap().to_utc() + Duration::hours(i64::from(start_hour));
        let mut world = World {
            account_id: AccountId(uuid(1, 1)),
            start,
            monthly: monthly.into_iter().map(micros).collect(),
            tax_rate: TaxRate::new(micros(tax_rates[tax as usize])).unwrap(),
            next_id: 0,
            charges: vec![],
            topups: vec![],
            refunds: vec![],
        };
        let country = Country::parse("AU").unwrap();
        let mut account = Account::default();
        let mut history: Vec<Ev> = Vec::new();
        let open = C::Open { account_id: world.account_id, name: "P".into(), email: "p@example.com".into(), currency: Currency::USD, country, at: start };
        for event in account.decide(open).unwrap() {
            account.apply(event.clone());
            history.push(event);
        }

        let mut charged: HashSet<(ServerId, HourSlot)> = HashSet::new();
        let mut month_net: HashMap<(ServerId, YearMonth), Decimal> = HashMap::new();
        let mut charge_gross: HashMap<ChargeId, (ServerId, Decimal)> = HashMap::new();
        let mut refunded: HashMap<ChargeId, Decimal> = HashMap::new();
        let mut topup_amount: HashMap<TopUpId, Decimal> = HashMap::new();
        let mut topup_refunded: HashMap<TopUpId, Decimal> = HashMap::new();
        let mut disputed_outstanding = Decimal::ZERO;
        let mut dispute_amounts: HashMap<DisputeId, Decimal> = HashMap::new();
        let mut wallet_total = Decimal::ZERO;

        for command in ops.iter().flat_map(World::commands_later) {
            let Some(command) = command(&mut world) else { continue };
            // `decide` borrows the account immutably: a refused command cannot change it.
            let Ok(events) = account.decide(command) else { continue };
            for event in events {
                let balance_before = account.balance();
                account.apply(event.clone());
                history.push(event.clone());
                let entries = postings(world.account_id, country, Currency::USD, &event);
                let change = wallet_change(world.account_id, &entries);
                wallet_total += change;
                prop_assert_eq!(account.balance() - balance_before, change, "the figures move as the postings say: {:?}", event);

                match &event {
                    Ev::HourCharged { charge_id, server_id, slot, net, gross, .. } | Ev::HoldCaptured { charge_id, server_id, slot, net, gross, .. } => {
                        prop_assert!(charged.insert((*server_id, *slot)), "charged twice: {:?} {}", server_id, slot);
                        *month_net.entry((*server_id, slot.month())).or_default() += *net;
                        charge_gross.insert(*charge_id, (*server_id, *gross));
                        world.charges.push((*charge_id, *gross));
                    }
                    Ev::CancellationRefunded { charge_id, gross, .. } => *refunded.entry(*charge_id).or_default() += *gross,
                    Ev::ServiceCredited { charge_id, amount, .. } => *refunded.entry(*charge_id).or_default() += *amount,
                    Ev::TopUpSettled { topup_id, amount, .. } => {
                        topup_amount.insert(*topup_id, *amount);
                        world.topups.push(*topup_id);
                    }
                    Ev::CardRefundRequested { refund_id, topup_id, amount, .. } => {
                        *topup_refunded.entry(*topup_id).or_default() += *amount;
                        world.refunds.push(*refund_id);
                    }
                    Ev::CardRefundFailed { topup_id, amount, .. } | Ev::CardRefundReversed { topup_id, amount, .. } => *topup_refunded.entry(*topup_id).or_default() -= *amount,
                    Ev::DisputeOpened { dispute_id, amount, .. } => {
                        disputed_outstanding += *amount;
                        dispute_amounts.insert(*dispute_id, *amount);
                    }
                    Ev::DisputeClosed { amount_returned, .. } => disputed_outstanding -= *amount_returned,
                    _ => {}
                }
            }

            // Balance never negative except through a dispute; available = balance - holds.
            prop_assert!(account.balance() + disputed_outstanding >= Decimal::ZERO, "balance {} with {} disputed", account.balance(), disputed_outstanding);
            prop_assert!(account.reserved() >= Decimal::ZERO);
            prop_assert_eq!(account.available(), account.balance() - account.reserved());
            prop_assert!(account.available() + disputed_outstanding >= Decimal::ZERO, "available {} with {} disputed", account.available(), disputed_outstanding);
            // The monthly cap, per server and month.
            for ((server_id, month), net) in &month_net {
                let index = (0..4u8).find(|n| ServerId(uuid(2, u128::from(*n))) == *server_id).unwrap();
                prop_assert!(*net <= world.monthly[index as usize], "{} net {} over {} in {}", server_id, net, world.monthly[index as usize], month);
            }
            // Refunds never exceed what they refund.
            for (charge_id, total) in &refunded {
                prop_assert!(*total <= charge_gross[charge_id].1, "charge {} refunded {} of {}", charge_id, total, charge_gross[charge_id].1);
            }
            for (topup_id, total) in &topup_refunded {
                prop_assert!(*total <= topup_amount[topup_id] && *total >= Decimal::ZERO);
            }
            // Every stored amount has ledger precision.
            prop_assert!(account.balance().normalize().scale() <= 6);
        }

        // The wallet liability in the journal equals the balance; replaying the stored events
        // (through JSON, as the log holds them) gives the same state.
        prop_assert_eq!(wallet_total, account.balance());
        let mut replayed = Account::default();
        for event in &history {
            let stored = serde_json::to_value(event).unwrap();
            let event: Ev = serde_json::from_value(stored).unwrap();
            replayed.apply(event);
        }
        prop_assert_eq!(replayed, account);
    }
}
