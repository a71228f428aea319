//! Given/when/then for every account command, including each failure case.

use chrono::{DateTime, Utc};
use cqrs_es::test::TestFramework;
use domain::account::{Account, AccountCommand as C, AccountError as E, AccountEvent as Ev, Figures};
use domain::{
    AccountId, AdjustmentId, ChargeId, Country, Currency, DisputeId, HourSlot, OrderId, PlanId, RefundId, ServerId, TaxRate, TopUpId,
};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use uuid::Uuid;

type Fixture = TestFramework<Account>;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn account() -> AccountId {
    AccountId(id(1))
}

fn server() -> ServerId {
    ServerId(id(2))
}

fn plan() -> PlanId {
    PlanId::parse("vps-2g").unwrap()
}

fn slot(text: &str) -> HourSlot {
    HourSlot::starting_at(at(text)).unwrap()
}

fn gst() -> TaxRate {
    TaxRate::new(dec!(0.10)).unwrap()
}

fn figures(balance: Decimal, reserved: Decimal) -> Figures {
    Figures {
        balance,
        reserved,
        available: balance - reserved,
    }
}

fn opened() -> Ev {
    Ev::AccountOpened {
        account_id: account(),
        name: "Ada".into(),
        email: "ada@example.com".into(),
        currency: Currency::AUD,
        country: Country::parse("AU").unwrap(),
        opened_at: at("2026-01-01T00:00:00Z"),
    }
}

fn topped_up(amount: Decimal, balance: Decimal) -> Ev {
    Ev::TopUpSettled {
        topup_id: TopUpId(id(10)),
        payment_id: "pi_1".into(),
        amount,
        figures: figures(balance, dec!(0)),
    }
}

fn charged(charge: u128, at_slot: &str, balance: Decimal) -> Ev {
    Ev::HourCharged {
        charge_id: ChargeId(id(charge)),
        server_id: server(),
        plan_id: plan(),
        slot: slot(at_slot),
        rate_per_hour: dec!(0.020548),
        net: dec!(0.020548),
        tax: dec!(0.002055),
        gross: dec!(0.022603),
        tax_rate: gst(),
        capped: false,
        figures: figures(balance, dec!(0)),
    }
}

fn with_funds() -> Vec<Ev> {
    vec![opened(), topped_up(dec!(25.00), dec!(25.00))]
}

fn charge_command(charge: u128, at_slot: &str) -> C {
    C::ChargeSlot {
        charge_id: ChargeId(id(charge)),
        server_id: server(),
        plan_id: plan(),
        slot: slot(at_slot),
        monthly_price: dec!(15.00),
        tax_rate: gst(),
    }
}

#[test]
fn open_an_account() {
    let command = C::Open {
        account_id: account(),
        name: " Ada ".into(),
        email: "ada@example.com".into(),
        currency: Currency::AUD,
        country: Country::parse("AU").unwrap(),
        at: at("2026-01-01T00:00:00Z"),
    };
    Fixture::with(())
        .given_no_previous_events()
        .when(command.clone())
        .then_expect_events(vec![opened()]);
    Fixture::with(())
        .given(vec![opened()])
        .when(command)
        .then_expect_error(E::AlreadyOpen);
}

#[test]
fn open_refuses_a_bad_name_or_email() {
    let open = |name: &str, email: &str| C::Open {
        account_id: account(),
        name: name.into(),
        email: email.into(),
        currency: Currency::USD,
        country: Country::parse("US").unwrap(),
        at: at("2026-01-01T00:00:00Z"),
    };
    let result = Fixture::with(())
        .given_no_previous_events()
        .when(open("  ", "a@b.co"))
        .inspect_result();
    assert!(matches!(result, Err(E::Invalid { field: "name", .. })));
    for email in ["", "nobody", "a@b", "a b@c.de", "@c.de", "a@.de"] {
        let result = Fixture::with(())
            .given_no_previous_events()
            .when(open("Ada", email))
            .inspect_result();
        assert!(matches!(result, Err(E::Invalid { field: "email", .. })), "{email:?}");
    }
}

#[test]
fn commands_on_an_account_that_is_not_open_fail() {
    Fixture::with(())
        .given_no_previous_events()
        .when(C::SettleTopUp {
            topup_id: TopUpId(id(10)),
            payment_id: "pi_1".into(),
            amount: dec!(5),
        })
        .then_expect_error(E::NotOpen);
}

#[test]
fn a_top_up_is_settled_once_per_payment() {
    let settle = C::SettleTopUp {
        topup_id: TopUpId(id(10)),
        payment_id: "pi_1".into(),
        amount: dec!(25.00),
    };
    Fixture::with(())
        .given(vec![opened()])
        .when(settle.clone())
        .then_expect_events(vec![topped_up(dec!(25.00), dec!(25.00))]);
    // A redelivered webhook changes nothing.
    Fixture::with(()).given(with_funds()).when(settle).then_expect_events(vec![]);
    // The same top-up paid by another payment is refused.
    Fixture::with(())
        .given(with_funds())
        .when(C::SettleTopUp {
            topup_id: TopUpId(id(10)),
            payment_id: "pi_2".into(),
            amount: dec!(25.00),
        })
        .then_expect_error(E::TopUpSettledElsewhere(TopUpId(id(10))));
    for amount in [dec!(0), dec!(-1), dec!(0.0000001)] {
        let result = Fixture::with(())
            .given(vec![opened()])
            .when(C::SettleTopUp {
                topup_id: TopUpId(id(11)),
                payment_id: "pi_9".into(),
                amount,
            })
            .inspect_result();
        assert!(matches!(result, Err(E::Invalid { field: "amount", .. })), "{amount}");
    }
}

#[test]
fn a_hold_is_placed_when_the_first_hour_is_affordable() {
    let hold = |net, tax| C::PlaceHold {
        order_id: OrderId(id(20)),
        server_id: server(),
        net,
        tax,
    };
    Fixture::with(())
        .given(with_funds())
        .when(hold(dec!(0.020548), dec!(0.002055)))
        .then_expect_events(vec![Ev::HoldPlaced {
            order_id: OrderId(id(20)),
            server_id: server(),
            net: dec!(0.020548),
            tax: dec!(0.002055),
            amount: dec!(0.022603),
            figures: figures(dec!(25.00), dec!(0.022603)),
        }]);
    Fixture::with(())
        .given(vec![opened(), topped_up(dec!(0.02), dec!(0.02))])
        .when(hold(dec!(0.020548), dec!(0.002055)))
        .then_expect_error(E::InsufficientFunds {
            needed: dec!(0.022603),
            available: dec!(0.02),
        });
    let placed = Fixture::with(())
        .given(with_funds())
        .when(hold(dec!(1), dec!(0)))
        .inspect_result()
        .unwrap();
    let mut given = with_funds();
    given.extend(placed);
    Fixture::with(())
        .given(given)
        .when(hold(dec!(1), dec!(0)))
        .then_expect_error(E::HoldExists(OrderId(id(20))));
}

fn with_hold() -> Vec<Ev> {
    let mut events = with_funds();
    events.push(Ev::HoldPlaced {
        order_id: OrderId(id(20)),
        server_id: server(),
        net: dec!(0.020548),
        tax: dec!(0.002055),
        amount: dec!(0.022603),
        figures: figures(dec!(25.00), dec!(0.022603)),
    });
    events
}

fn capture() -> C {
    C::CaptureHold {
        order_id: OrderId(id(20)),
        charge_id: ChargeId(id(30)),
        plan_id: plan(),
        slot: slot("2026-01-05T10:00:00Z"),
        tax_rate: gst(),
    }
}

fn release() -> C {
    C::ReleaseHold {
        order_id: OrderId(id(20)),
        reason: "provisioning failed".into(),
    }
}

#[test]
fn a_hold_is_captured_as_the_first_hour_exactly_once() {
    let captured = Ev::HoldCaptured {
        order_id: OrderId(id(20)),
        charge_id: ChargeId(id(30)),
        server_id: server(),
        plan_id: plan(),
        slot: slot("2026-01-05T10:00:00Z"),
        net: dec!(0.020548),
        tax: dec!(0.002055),
        gross: dec!(0.022603),
        tax_rate: gst(),
        figures: figures(dec!(24.977397), dec!(0)),
    };
    Fixture::with(())
        .given(with_hold())
        .when(capture())
        .then_expect_events(vec![captured.clone()]);
    let mut given = with_hold();
    given.push(captured);
    Fixture::with(())
        .given(given.clone())
        .when(capture())
        .then_expect_error(E::HoldAlreadyCaptured(OrderId(id(20))));
    Fixture::with(())
        .given(given.clone())
        .when(release())
        .then_expect_error(E::HoldAlreadyCaptured(OrderId(id(20))));
    // The captured slot counts as charged.
    Fixture::with(())
        .given(given)
        .when(charge_command(31, "2026-01-05T10:00:00Z"))
        .then_expect_error(E::SlotAlreadyCharged {
            server_id: server(),
            slot: slot("2026-01-05T10:00:00Z"),
        });
    Fixture::with(())
        .given(with_funds())
        .when(capture())
        .then_expect_error(E::UnknownHold(OrderId(id(20))));
}

#[test]
fn a_hold_is_released_in_full_exactly_once_and_never_captured_after() {
    let released = Ev::HoldReleased {
        order_id: OrderId(id(20)),
        amount: dec!(0.022603),
        reason: "provisioning failed".into(),
        figures: figures(dec!(25.00), dec!(0)),
    };
    Fixture::with(())
        .given(with_hold())
        .when(release())
        .then_expect_events(vec![released.clone()]);
    let mut given = with_hold();
    given.push(released);
    Fixture::with(())
        .given(given.clone())
        .when(release())
        .then_expect_error(E::HoldAlreadyReleased(OrderId(id(20))));
    Fixture::with(())
        .given(given)
        .when(capture())
        .then_expect_error(E::HoldAlreadyReleased(OrderId(id(20))));
    Fixture::with(())
        .given(with_funds())
        .when(release())
        .then_expect_error(E::UnknownHold(OrderId(id(20))));
}

#[test]
fn an_hour_is_charged_once_per_server_and_slot() {
    Fixture::with(())
        .given(with_funds())
        .when(charge_command(30, "2026-01-05T11:00:00Z"))
        .then_expect_events(vec![charged(30, "2026-01-05T11:00:00Z", dec!(24.977397))]);
    let mut given = with_funds();
    given.push(charged(30, "2026-01-05T11:00:00Z", dec!(24.977397)));
    Fixture::with(())
        .given(given.clone())
        .when(charge_command(31, "2026-01-05T11:00:00Z"))
        .then_expect_error(E::SlotAlreadyCharged {
            server_id: server(),
            slot: slot("2026-01-05T11:00:00Z"),
        });
    // The same charge id cannot be reused for another slot either.
    Fixture::with(())
        .given(given)
        .when(charge_command(30, "2026-01-05T12:00:00Z"))
        .then_expect_error(E::DuplicateId(format!("charge {}", id(30))));
}

#[test]
fn an_unaffordable_hour_is_declined_not_charged() {
    Fixture::with(())
        .given(vec![opened(), topped_up(dec!(0.02), dec!(0.02))])
        .when(charge_command(30, "2026-01-05T11:00:00Z"))
        .then_expect_events(vec![Ev::ChargeDeclined {
            server_id: server(),
            slot: slot("2026-01-05T11:00:00Z"),
            gross: dec!(0.022603),
            figures: figures(dec!(0.02), dec!(0)),
        }]);
}

#[test]
fn the_monthly_cap_limits_net_and_a_capped_slot_is_still_recorded() {
    // 15.00 a month; 14.99 already charged this month leaves 0.01 of headroom.
    let mut given = with_funds();
    given.push(Ev::HourCharged {
        charge_id: ChargeId(id(29)),
        server_id: server(),
        plan_id: plan(),
        slot: slot("2026-01-05T10:00:00Z"),
        rate_per_hour: dec!(14.99),
        net: dec!(14.99),
        tax: dec!(0),
        gross: dec!(14.99),
        tax_rate: TaxRate::ZERO,
        capped: false,
        figures: figures(dec!(10.01), dec!(0)),
    });
    let events = Fixture::with(())
        .given(given.clone())
        .when(charge_command(30, "2026-01-05T11:00:00Z"))
        .inspect_result()
        .unwrap();
    let Ev::HourCharged {
        net, tax, gross, capped, ..
    } = &events[0]
    else {
        panic!("{events:?}")
    };
    assert_eq!((*net, *tax, *gross, *capped), (dec!(0.01), dec!(0.001), dec!(0.011), true));
    given.extend(events);
    let events = Fixture::with(())
        .given(given.clone())
        .when(charge_command(31, "2026-01-05T12:00:00Z"))
        .inspect_result()
        .unwrap();
    let Ev::HourCharged { net, gross, capped, .. } = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!((*net, *gross, *capped), (dec!(0), dec!(0), true));
    // A new month starts afresh.
    let events = Fixture::with(())
        .given(given)
        .when(charge_command(32, "2026-02-01T00:00:00Z"))
        .inspect_result()
        .unwrap();
    let Ev::HourCharged { net, capped, .. } = &events[0] else {
        panic!("{events:?}")
    };
    assert_eq!((*net, *capped), (dec!(0.020548), false));
}

fn with_charge() -> Vec<Ev> {
    let mut events = with_funds();
    events.push(charged(30, "2026-01-05T11:00:00Z", dec!(24.977397)));
    events
}

#[test]
fn unused_time_is_refunded_pro_rata_by_the_second_once() {
    let refund = C::RefundUnusedTime {
        charge_id: ChargeId(id(30)),
        cancelled_at: at("2026-01-05T11:00:30Z"),
    };
    let refunded = Ev::CancellationRefunded {
        charge_id: ChargeId(id(30)),
        server_id: server(),
        unused_seconds: 3570,
        net: dec!(0.020377),
        tax: dec!(0.002038),
        gross: dec!(0.022415),
        figures: figures(dec!(24.999812), dec!(0)),
    };
    Fixture::with(())
        .given(with_charge())
        .when(refund.clone())
        .then_expect_events(vec![refunded.clone()]);
    let mut given = with_charge();
    given.push(refunded);
    Fixture::with(())
        .given(given)
        .when(refund)
        .then_expect_error(E::AlreadyRefunded(ChargeId(id(30))));
    Fixture::with(())
        .given(with_funds())
        .when(C::RefundUnusedTime {
            charge_id: ChargeId(id(99)),
            cancelled_at: at("2026-01-05T11:00:30Z"),
        })
        .then_expect_error(E::UnknownCharge(ChargeId(id(99))));
}

#[test]
fn service_credits_never_exceed_the_charge_in_total() {
    let credit = |refund: u128, amount| C::CreditService {
        refund_id: RefundId(id(refund)),
        charge_id: ChargeId(id(30)),
        charge_gross: dec!(0.022603),
        amount,
        reason: "outage".into(),
    };
    let first = Fixture::with(())
        .given(with_charge())
        .when(credit(40, dec!(0.02)))
        .inspect_result()
        .unwrap();
    assert_eq!(
        first,
        vec![Ev::ServiceCredited {
            refund_id: RefundId(id(40)),
            charge_id: ChargeId(id(30)),
            amount: dec!(0.02),
            reason: "outage".into(),
            figures: figures(dec!(24.997397), dec!(0))
        }]
    );
    let mut given = with_charge();
    given.extend(first);
    Fixture::with(())
        .given(given.clone())
        .when(credit(41, dec!(0.002604)))
        .then_expect_error(E::RefundExceedsCharge {
            charge_id: ChargeId(id(30)),
            refundable: dec!(0.002603),
        });
    Fixture::with(())
        .given(given.clone())
        .when(credit(40, dec!(0.001)))
        .then_expect_error(E::DuplicateId(format!("refund {}", id(40))));
    let result = Fixture::with(())
        .given(given.clone())
        .when(C::CreditService {
            refund_id: RefundId(id(42)),
            charge_id: ChargeId(id(30)),
            charge_gross: dec!(0.022603),
            amount: dec!(0.001),
            reason: " ".into(),
        })
        .inspect_result();
    assert!(matches!(result, Err(E::Invalid { field: "reason", .. })));
    // The pro-rata refund after a credit gives back only what is left.
    let events = Fixture::with(())
        .given(given)
        .when(C::RefundUnusedTime {
            charge_id: ChargeId(id(30)),
            cancelled_at: at("2026-01-05T11:00:00Z"),
        })
        .inspect_result()
        .unwrap();
    let Ev::CancellationRefunded { gross, .. } = &events[0] else {
        panic!()
    };
    assert_eq!(*gross, dec!(0.002603));
}

#[test]
fn card_refunds_are_bounded_by_the_top_up_and_the_available_balance() {
    let request = |refund: u128, amount| C::RequestCardRefund {
        refund_id: RefundId(id(refund)),
        topup_id: TopUpId(id(10)),
        amount,
        reason: "customer asked".into(),
    };
    let requested = Fixture::with(())
        .given(with_funds())
        .when(request(50, dec!(10)))
        .inspect_result()
        .unwrap();
    assert_eq!(
        requested,
        vec![Ev::CardRefundRequested {
            refund_id: RefundId(id(50)),
            topup_id: TopUpId(id(10)),
            amount: dec!(10),
            reason: "customer asked".into(),
            figures: figures(dec!(15.00), dec!(0)),
            at_processor: false,
        }]
    );
    let mut given = with_funds();
    given.extend(requested);
    Fixture::with(())
        .given(given.clone())
        .when(request(51, dec!(15.01)))
        .then_expect_error(E::RefundExceedsTopUp {
            topup_id: TopUpId(id(10)),
            refundable: dec!(15.00),
        });
    Fixture::with(())
        .given(with_charge())
        .when(request(51, dec!(25.00)))
        .then_expect_error(E::InsufficientFunds {
            needed: dec!(25.00),
            available: dec!(24.977397),
        });
    Fixture::with(())
        .given(with_funds())
        .when(C::RequestCardRefund {
            refund_id: RefundId(id(52)),
            topup_id: TopUpId(id(99)),
            amount: dec!(1),
            reason: "x".into(),
        })
        .then_expect_error(E::UnknownTopUp(TopUpId(id(99))));

    Fixture::with(())
        .given(given.clone())
        .when(C::CompleteCardRefund {
            refund_id: RefundId(id(50)),
        })
        .then_expect_events(vec![Ev::CardRefundCompleted {
            refund_id: RefundId(id(50)),
            topup_id: TopUpId(id(10)),
            amount: dec!(10),
        }]);
    let failed = Ev::CardRefundFailed {
        refund_id: RefundId(id(50)),
        topup_id: TopUpId(id(10)),
        amount: dec!(10),
        figures: figures(dec!(25.00), dec!(0)),
    };
    Fixture::with(())
        .given(given.clone())
        .when(C::FailCardRefund {
            refund_id: RefundId(id(50)),
        })
        .then_expect_events(vec![failed.clone()]);
    given.push(failed);
    Fixture::with(())
        .given(given.clone())
        .when(C::CompleteCardRefund {
            refund_id: RefundId(id(50)),
        })
        .then_expect_error(E::RefundSettled(RefundId(id(50))));
    Fixture::with(())
        .given(given.clone())
        .when(C::FailCardRefund {
            refund_id: RefundId(id(50)),
        })
        .then_expect_error(E::RefundSettled(RefundId(id(50))));
    // A failed refund gives its amount back to what may be refunded.
    let result = Fixture::with(()).given(given).when(request(53, dec!(25.00))).inspect_result();
    assert!(result.is_ok(), "{result:?}");
    Fixture::with(())
        .given(with_funds())
        .when(C::CompleteCardRefund {
            refund_id: RefundId(id(59)),
        })
        .then_expect_error(E::UnknownRefund(RefundId(id(59))));
}

#[test]
fn adjustments_need_a_reason_and_a_debit_never_goes_below_zero() {
    let adjust = |n: u128, amount, reason: &str| C::Adjust {
        adjustment_id: AdjustmentId(id(n)),
        amount,
        reason: reason.into(),
    };
    Fixture::with(())
        .given(with_funds())
        .when(adjust(60, dec!(5), "goodwill"))
        .then_expect_events(vec![Ev::Adjusted {
            adjustment_id: AdjustmentId(id(60)),
            amount: dec!(5),
            reason: "goodwill".into(),
            figures: figures(dec!(30.00), dec!(0)),
        }]);
    Fixture::with(())
        .given(with_funds())
        .when(adjust(60, dec!(-25.00), "correction"))
        .then_expect_events(vec![Ev::Adjusted {
            adjustment_id: AdjustmentId(id(60)),
            amount: dec!(-25.00),
            reason: "correction".into(),
            figures: figures(dec!(0.00), dec!(0)),
        }]);
    Fixture::with(())
        .given(with_funds())
        .when(adjust(60, dec!(-25.01), "correction"))
        .then_expect_error(E::InsufficientFunds {
            needed: dec!(25.01),
            available: dec!(25.00),
        });
    assert!(matches!(
        Fixture::with(()).given(with_funds()).when(adjust(60, dec!(5), "")).inspect_result(),
        Err(E::Invalid { field: "reason", .. })
    ));
    assert!(matches!(
        Fixture::with(())
            .given(with_funds())
            .when(adjust(60, dec!(0), "x"))
            .inspect_result(),
        Err(E::Invalid { field: "amount", .. })
    ));
    let mut given = with_funds();
    given.push(Ev::Adjusted {
        adjustment_id: AdjustmentId(id(60)),
        amount: dec!(5),
        reason: "goodwill".into(),
        figures: figures(dec!(30.00), dec!(0)),
    });
    Fixture::with(())
        .given(given)
        .when(adjust(60, dec!(5), "goodwill"))
        .then_expect_error(E::DuplicateId(format!("adjustment {}", id(60))));
}

#[test]
fn a_dispute_may_take_the_balance_below_zero_and_a_won_one_gives_it_back() {
    let open = C::OpenDispute {
        dispute_id: DisputeId(id(70)),
        payment_id: "pi_1".into(),
        amount: dec!(25.00),
    };
    let mut given = with_charge();
    let opened_dispute = Ev::DisputeOpened {
        dispute_id: DisputeId(id(70)),
        payment_id: "pi_1".into(),
        amount: dec!(25.00),
        figures: figures(dec!(-0.022603), dec!(0)),
    };
    Fixture::with(())
        .given(given.clone())
        .when(open.clone())
        .then_expect_events(vec![opened_dispute.clone()]);
    given.push(opened_dispute);
    Fixture::with(()).given(given.clone()).when(open).then_expect_events(vec![]);
    Fixture::with(())
        .given(given.clone())
        .when(C::CloseDispute {
            dispute_id: DisputeId(id(70)),
            won: true,
        })
        .then_expect_events(vec![Ev::DisputeClosed {
            dispute_id: DisputeId(id(70)),
            won: true,
            amount_returned: dec!(25.00),
            figures: figures(dec!(24.977397), dec!(0)),
        }]);
    let lost = Ev::DisputeClosed {
        dispute_id: DisputeId(id(70)),
        won: false,
        amount_returned: dec!(0),
        figures: figures(dec!(-0.022603), dec!(0)),
    };
    Fixture::with(())
        .given(given.clone())
        .when(C::CloseDispute {
            dispute_id: DisputeId(id(70)),
            won: false,
        })
        .then_expect_events(vec![lost.clone()]);
    given.push(lost);
    Fixture::with(())
        .given(given)
        .when(C::CloseDispute {
            dispute_id: DisputeId(id(70)),
            won: true,
        })
        .then_expect_error(E::DisputeClosed(DisputeId(id(70))));
    Fixture::with(())
        .given(with_funds())
        .when(C::CloseDispute {
            dispute_id: DisputeId(id(71)),
            won: true,
        })
        .then_expect_error(E::UnknownDispute(DisputeId(id(71))));
}

#[test]
fn low_balance_is_warned_once_per_crossing() {
    let check = |burn| C::CheckRunway {
        hourly_burn_gross: burn,
        threshold_hours: dec!(24),
    };
    // 25.00 at 2.00 an hour is 12.5 hours of runway.
    let warned = Ev::LowBalanceWarned {
        runway_hours: dec!(12.50),
        available: dec!(25.00),
    };
    Fixture::with(())
        .given(with_funds())
        .when(check(dec!(2)))
        .then_expect_events(vec![warned.clone()]);
    Fixture::with(())
        .given(with_funds())
        .when(check(dec!(0.5)))
        .then_expect_events(vec![]);
    let mut given = with_funds();
    given.push(warned);
    Fixture::with(())
        .given(given.clone())
        .when(check(dec!(2)))
        .then_expect_events(vec![]);
    Fixture::with(())
        .given(given)
        .when(check(dec!(0.5)))
        .then_expect_events(vec![Ev::LowBalanceCleared {
            runway_hours: Some(dec!(50.00)),
            available: dec!(25.00),
        }]);
}

#[test]
fn an_opened_v1_event_upcasts_to_v2() {
    let stored = include_str!("../../fixtures/events/account_opened_v1.json");
    let stored: serde_json::Value = serde_json::from_str(stored).unwrap();
    assert_eq!(stored["schema_version"], 1);
    let payload = domain::account::upcast("AccountOpened", 1, stored["payload"].clone());
    let event: Ev = serde_json::from_value(payload).unwrap();
    let Ev::AccountOpened { country, currency, .. } = event else {
        panic!()
    };
    assert_eq!((country.as_str(), currency.code()), ("NZ", "NZD"));
}

#[test]
fn refunds_made_at_the_processor_are_learned_of_once_even_below_zero() {
    let learn = |refund: u128, total| C::RecordProcessorRefund {
        refund_id: RefundId(id(refund)),
        topup_id: TopUpId(id(10)),
        total_refunded: total,
    };
    // 10.00 asked for through the ledger; the processor later reports 14.00 refunded in all.
    let mut given = with_funds();
    given.push(Ev::CardRefundRequested {
        refund_id: RefundId(id(50)),
        topup_id: TopUpId(id(10)),
        amount: dec!(10),
        reason: "customer asked".into(),
        figures: figures(dec!(15.00), dec!(0)),
        at_processor: false,
    });
    Fixture::with(())
        .given(given.clone())
        .when(learn(60, dec!(14.00)))
        .then_expect_events(vec![
            Ev::CardRefundRequested {
                refund_id: RefundId(id(60)),
                topup_id: TopUpId(id(10)),
                amount: dec!(4.00),
                reason: "refunded at the card processor (dashboard)".into(),
                figures: figures(dec!(11.00), dec!(0)),
                at_processor: true,
            },
            Ev::CardRefundCompleted {
                refund_id: RefundId(id(60)),
                topup_id: TopUpId(id(10)),
                amount: dec!(4.00),
            },
        ]);
    // What the ledger already knows of changes nothing (its own refund, or an earlier report).
    Fixture::with(())
        .given(given.clone())
        .when(learn(61, dec!(10.00)))
        .then_expect_events(vec![]);
    // A report of everything refunded after the wallet was spent goes below zero: the money is gone.
    let mut spent = given.clone();
    spent.push(Ev::Adjusted {
        adjustment_id: AdjustmentId(id(70)),
        amount: dec!(-15.00),
        reason: "spent".into(),
        figures: figures(dec!(0.00), dec!(0)),
    });
    Fixture::with(()).given(spent).when(learn(62, dec!(99.00))).then_expect_events(vec![
        Ev::CardRefundRequested {
            refund_id: RefundId(id(62)),
            topup_id: TopUpId(id(10)),
            amount: dec!(15.00),
            reason: "refunded at the card processor (dashboard)".into(),
            figures: figures(dec!(-15.00), dec!(0)),
            at_processor: true,
        },
        Ev::CardRefundCompleted {
            refund_id: RefundId(id(62)),
            topup_id: TopUpId(id(10)),
            amount: dec!(15.00),
        },
    ]);
    Fixture::with(())
        .given(given)
        .when(C::RecordProcessorRefund {
            refund_id: RefundId(id(63)),
            topup_id: TopUpId(id(99)),
            total_refunded: dec!(1),
        })
        .then_expect_error(E::UnknownTopUp(TopUpId(id(99))));
}

/// `n` hourly charges of the test server from 2026-01-01T00:00Z on, ids 1000 + hour.
fn hours_charged(n: i64) -> Vec<Ev> {
    let first = at("2026-01-01T00:00:00Z");
    (0..n)
        .map(|hour| {
            let instant = (first + chrono::Duration::hours(hour)).to_rfc3339();
            charged(1_000 + hour as u128, &instant, dec!(20))
        })
        .collect()
}

fn folded(events: Vec<Ev>) -> Account {
    let mut account = Account::default();
    for event in events {
        cqrs_es::Aggregate::apply(&mut account, event);
    }
    account
}

#[test]
fn the_state_does_not_grow_with_the_hours_billed() {
    let mut a_day = with_funds();
    a_day.extend(hours_charged(24));
    let mut a_year = with_funds();
    a_year.extend(hours_charged(24 * 365));
    let (a_day, a_year) = (folded(a_day), folded(a_year));
    assert_eq!(a_day.footprint(), a_year.footprint());
    let serialised = |account: &Account| serde_json::to_vec(account).unwrap().len();
    assert!(
        serialised(&a_year) <= serialised(&a_day) + 16,
        "{} bytes after a year, {} after a day",
        serialised(&a_year),
        serialised(&a_day)
    );
    // What deciding needs is still there: the high-water slot, the month's net for the cap.
    let last = slot("2026-12-31T23:00:00Z");
    assert_eq!(a_year.last_charged_slot(server()), Some(last));
    assert!(a_year.is_charged(server(), last) && !a_year.is_charged(server(), last.next()));
    assert_eq!(a_year.month_net(server(), last.month()), dec!(0.020548) * Decimal::from(24 * 31));
}

#[test]
fn an_older_charge_is_credited_by_its_gross_as_the_log_has_it_but_only_the_latest_is_refunded_pro_rata() {
    let mut given = with_funds();
    given.extend(hours_charged(3));
    let credit = |refund: u128, charge: u128, gross: Decimal, amount: Decimal| C::CreditService {
        refund_id: RefundId(id(refund)),
        charge_id: ChargeId(id(charge)),
        charge_gross: gross,
        amount,
        reason: "outage".into(),
    };
    // The first hour's charge is no longer held by the account; the command carries its gross.
    let events = Fixture::with(())
        .given(given.clone())
        .when(credit(40, 1_000, dec!(0.022603), dec!(0.02)))
        .inspect_result()
        .unwrap();
    assert!(matches!(events.as_slice(), [Ev::ServiceCredited { amount, .. }] if *amount == dec!(0.02)));
    given.extend(events);
    // What was credited stays counted against that charge.
    Fixture::with(())
        .given(given.clone())
        .when(credit(41, 1_000, dec!(0.022603), dec!(0.003)))
        .then_expect_error(E::RefundExceedsCharge {
            charge_id: ChargeId(id(1_000)),
            refundable: dec!(0.002603),
        });
    // The latest charge's gross is the account's own, and a different one is refused.
    let result = Fixture::with(())
        .given(given.clone())
        .when(credit(42, 1_002, dec!(1), dec!(0.01)))
        .inspect_result();
    assert!(matches!(result, Err(E::Invalid { field: "charge_gross", .. })), "{result:?}");
    // Unused time is given back only for the slot in progress (the server's latest charge).
    Fixture::with(())
        .given(given)
        .when(C::RefundUnusedTime {
            charge_id: ChargeId(id(1_000)),
            cancelled_at: at("2026-01-01T00:30:00Z"),
        })
        .then_expect_error(E::UnknownCharge(ChargeId(id(1_000))));
}

#[test]
fn a_stored_history_with_a_charge_out_of_slot_order_never_moves_the_high_water_mark_back() {
    let mut given = with_funds();
    let charges = hours_charged(4);
    // Hour 3 stored first, then hours 0 to 2 (as a run that started from a stale slot once did).
    given.push(charges[3].clone());
    given.extend(charges[..3].iter().cloned());
    let account = folded(given);
    let last = slot("2026-01-01T03:00:00Z");
    assert_eq!(account.last_charged_slot(server()), Some(last));
    assert!(account.is_charged(server(), last));
    assert_eq!(account.month_net(server(), last.month()), dec!(0.020548) * Decimal::from(4));
}
