//! Given/when/then for the server, the deploy order, the catalogue and the invoice series.

use chrono::{DateTime, Duration, Utc};
use cqrs_es::test::TestFramework;
use domain::catalog::{Catalog, CatalogCommand, CatalogError, CatalogEvent, Fixtures, PlanSpec, Prices};
use domain::invoice::{
    build_invoice, BilledCharge, BilledRefund, CreditNoteDraft, InvoiceError, InvoiceSeries, InvoiceSeriesCommand, InvoiceSeriesEvent,
    RefundKind,
};
use domain::order::{Order, OrderCommand, OrderError, OrderEvent};
use domain::server::{
    CancellationMode, PowerAction, Server, ServerCommand as S, ServerError as SE, ServerEvent as SEv, Status, SuspensionReason,
};
use domain::{AccountId, ChargeId, Currency, Hostname, InvoiceId, Location, OrderId, PlanId, ServerId, TaxRate, YearMonth};
use rust_decimal_macros::dec;
use uuid::Uuid;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

fn id(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

fn t0() -> DateTime<Utc> {
    at("2026-03-10T09:15:00Z")
}

fn ordered() -> SEv {
    SEv::ServerOrdered {
        server_id: ServerId(id(2)),
        account_id: AccountId(id(1)),
        order_id: OrderId(id(3)),
        plan_id: PlanId::parse("vps-1g").unwrap(),
        location: Location::parse("syd").unwrap(),
        at: t0(),
    }
}

fn provisioned() -> Vec<SEv> {
    vec![
        ordered(),
        SEv::ServerProvisioned {
            provider_server_id: "vf-1001".into(),
            at: t0(),
        },
    ]
}

fn running() -> Vec<SEv> {
    let mut events = provisioned();
    events.push(SEv::SetupCompleted {
        os_image: "debian-12".into(),
        hostname: Hostname::parse("web1").unwrap(),
        at: t0(),
    });
    events
}

fn status_after(events: Vec<SEv>) -> Option<Status> {
    let mut server = Server::default();
    for event in events {
        cqrs_es::Aggregate::apply(&mut server, event);
    }
    server.status()
}

#[test]
fn a_server_goes_from_order_to_running() {
    let order = S::Order {
        server_id: ServerId(id(2)),
        account_id: AccountId(id(1)),
        order_id: OrderId(id(3)),
        plan_id: PlanId::parse("vps-1g").unwrap(),
        location: Location::parse("syd").unwrap(),
        at: t0(),
    };
    TestFramework::<Server>::with(())
        .given_no_previous_events()
        .when(order.clone())
        .then_expect_events(vec![ordered()]);
    TestFramework::<Server>::with(())
        .given(vec![ordered()])
        .when(order)
        .then_expect_error(SE::AlreadyExists);
    assert_eq!(status_after(vec![ordered()]), Some(Status::Provisioning));
    TestFramework::<Server>::with(())
        .given(vec![ordered()])
        .when(S::CompleteProvisioning {
            provider_server_id: "vf-1001".into(),
            at: t0(),
        })
        .then_expect_events(vec![SEv::ServerProvisioned {
            provider_server_id: "vf-1001".into(),
            at: t0(),
        }]);
    assert_eq!(status_after(provisioned()), Some(Status::NeedsSetup));
    TestFramework::<Server>::with(())
        .given(provisioned())
        .when(S::CompleteProvisioning {
            provider_server_id: "x".into(),
            at: t0(),
        })
        .then_expect_error(SE::WrongStatus("needs_setup"));
    let setup = S::Setup {
        os_image: "debian-12".into(),
        hostname: Hostname::parse("web1").unwrap(),
        at: t0(),
    };
    TestFramework::<Server>::with(())
        .given(provisioned())
        .when(setup.clone())
        .then_expect_events(vec![SEv::SetupCompleted {
            os_image: "debian-12".into(),
            hostname: Hostname::parse("web1").unwrap(),
            at: t0(),
        }]);
    assert_eq!(status_after(running()), Some(Status::Running));
    TestFramework::<Server>::with(())
        .given(running())
        .when(setup)
        .then_expect_error(SE::AlreadySetUp);
    TestFramework::<Server>::with(())
        .given_no_previous_events()
        .when(S::Resume { at: t0() })
        .then_expect_error(SE::NotFound);
}

#[test]
fn provisioning_can_fail_once() {
    let fail = S::FailProvisioning {
        reason: "no capacity".into(),
        at: t0(),
    };
    TestFramework::<Server>::with(())
        .given(vec![ordered()])
        .when(fail.clone())
        .then_expect_events(vec![SEv::ProvisioningFailed {
            reason: "no capacity".into(),
            at: t0(),
        }]);
    let failed = vec![
        ordered(),
        SEv::ProvisioningFailed {
            reason: "no capacity".into(),
            at: t0(),
        },
    ];
    assert_eq!(status_after(failed.clone()), Some(Status::Failed));
    TestFramework::<Server>::with(())
        .given(failed.clone())
        .when(fail)
        .then_expect_error(SE::WrongStatus("failed"));
    TestFramework::<Server>::with(())
        .given(failed)
        .when(S::CompleteProvisioning {
            provider_server_id: "x".into(),
            at: t0(),
        })
        .then_expect_error(SE::WrongStatus("failed"));
}

#[test]
fn setup_and_reinstall_check_their_inputs_and_order() {
    let bad = S::Setup {
        os_image: "debian 12; rm".into(),
        hostname: Hostname::parse("web1").unwrap(),
        at: t0(),
    };
    assert!(matches!(
        TestFramework::<Server>::with(()).given(provisioned()).when(bad).inspect_result(),
        Err(SE::Invalid(_))
    ));
    TestFramework::<Server>::with(())
        .given(provisioned())
        .when(S::Reinstall {
            os_image: "ubuntu-24.04".into(),
            at: t0(),
        })
        .then_expect_error(SE::NotSetUp);
    TestFramework::<Server>::with(())
        .given(running())
        .when(S::Reinstall {
            os_image: "ubuntu-24.04".into(),
            at: t0(),
        })
        .then_expect_events(vec![SEv::Reinstalled {
            os_image: "ubuntu-24.04".into(),
            at: t0(),
        }]);
}

#[test]
fn power_actions_follow_the_power_state_and_a_stopped_server_is_still_billed() {
    TestFramework::<Server>::with(())
        .given(running())
        .when(S::Power {
            action: PowerAction::Boot,
            at: t0(),
        })
        .then_expect_error(SE::AlreadyInPowerState("running"));
    TestFramework::<Server>::with(())
        .given(running())
        .when(S::Power {
            action: PowerAction::Reboot,
            at: t0(),
        })
        .then_expect_events(vec![SEv::PowerChanged {
            action: PowerAction::Reboot,
            powered_on: true,
            at: t0(),
        }]);
    let shutdown = SEv::PowerChanged {
        action: PowerAction::Shutdown,
        powered_on: false,
        at: t0(),
    };
    TestFramework::<Server>::with(())
        .given(running())
        .when(S::Power {
            action: PowerAction::Shutdown,
            at: t0(),
        })
        .then_expect_events(vec![shutdown.clone()]);
    let mut stopped = running();
    stopped.push(shutdown);
    assert_eq!(status_after(stopped.clone()), Some(Status::Stopped));
    let mut server = Server::default();
    for event in stopped.clone() {
        cqrs_es::Aggregate::apply(&mut server, event);
    }
    assert!(server.is_billable());
    TestFramework::<Server>::with(())
        .given(stopped)
        .when(S::Power {
            action: PowerAction::Reboot,
            at: t0(),
        })
        .then_expect_error(SE::AlreadyInPowerState("stopped"));
    TestFramework::<Server>::with(())
        .given(provisioned())
        .when(S::Power {
            action: PowerAction::Boot,
            at: t0(),
        })
        .then_expect_error(SE::NotSetUp);
}

#[test]
fn suspension_stops_billing_and_resumption_restarts_it() {
    let suspended = SEv::ServerSuspended {
        reason: SuspensionReason::NonPayment,
        at: t0(),
    };
    TestFramework::<Server>::with(())
        .given(running())
        .when(S::Suspend {
            reason: SuspensionReason::NonPayment,
            at: t0(),
        })
        .then_expect_events(vec![suspended.clone()]);
    let mut given = running();
    given.push(suspended);
    assert_eq!(status_after(given.clone()), Some(Status::Suspended));
    TestFramework::<Server>::with(())
        .given(given.clone())
        .when(S::Suspend {
            reason: SuspensionReason::Dispute,
            at: t0(),
        })
        .then_expect_error(SE::AlreadySuspended);
    TestFramework::<Server>::with(())
        .given(running())
        .when(S::Resume { at: t0() })
        .then_expect_error(SE::NotSuspended);
    TestFramework::<Server>::with(())
        .given(given.clone())
        .when(S::Resume { at: t0() })
        .then_expect_events(vec![SEv::ServerResumed { at: t0() }]);
    // Terminated for non-payment only after the configured days.
    let six_days = t0() + Duration::days(6);
    TestFramework::<Server>::with(())
        .given(given.clone())
        .when(S::TerminateForNonPayment {
            unpaid_days: 7,
            at: six_days,
        })
        .then_expect_error(SE::NotOverdue(t0()));
    let seven_days = t0() + Duration::days(7);
    TestFramework::<Server>::with(())
        .given(given.clone())
        .when(S::TerminateForNonPayment {
            unpaid_days: 7,
            at: seven_days,
        })
        .then_expect_events(vec![SEv::TerminatedForNonPayment {
            suspended_since: t0(),
            at: seven_days,
        }]);
    given.push(SEv::TerminatedForNonPayment {
        suspended_since: t0(),
        at: seven_days,
    });
    assert_eq!(status_after(given), Some(Status::Deleted));
    TestFramework::<Server>::with(())
        .given(running())
        .when(S::TerminateForNonPayment {
            unpaid_days: 7,
            at: seven_days,
        })
        .then_expect_error(SE::WrongStatus("running"));
}

#[test]
fn cancellation_in_both_modes() {
    let grace = SEv::CancellationRequested {
        mode: CancellationMode::Grace,
        requested_at: t0(),
        effective_at: t0() + Duration::days(30),
        power_off: true,
    };
    TestFramework::<Server>::with(())
        .given(running())
        .when(S::RequestCancellation {
            mode: CancellationMode::Grace,
            at: t0(),
        })
        .then_expect_events(vec![grace.clone()]);
    let immediate = SEv::CancellationRequested {
        mode: CancellationMode::Immediate,
        requested_at: t0(),
        effective_at: t0() + Duration::minutes(5),
        power_off: false,
    };
    TestFramework::<Server>::with(())
        .given(running())
        .when(S::RequestCancellation {
            mode: CancellationMode::Immediate,
            at: t0(),
        })
        .then_expect_events(vec![immediate.clone()]);

    let mut in_grace = running();
    in_grace.push(grace);
    assert_eq!(status_after(in_grace.clone()), Some(Status::PendingCancellation));
    TestFramework::<Server>::with(())
        .given(in_grace.clone())
        .when(S::RequestCancellation {
            mode: CancellationMode::Immediate,
            at: t0(),
        })
        .then_expect_error(SE::AlreadyCancelled);
    TestFramework::<Server>::with(())
        .given(in_grace.clone())
        .when(S::Power {
            action: PowerAction::Boot,
            at: t0(),
        })
        .then_expect_error(SE::WrongStatus("pending_cancellation"));
    let later = t0() + Duration::days(1);
    TestFramework::<Server>::with(())
        .given(in_grace.clone())
        .when(S::RevokeCancellation { at: later })
        .then_expect_events(vec![SEv::CancellationRevoked {
            at: later,
            powered_on: Some(true),
            boot: true,
        }]);
    let mut revoked = in_grace.clone();
    revoked.push(SEv::CancellationRevoked {
        at: later,
        powered_on: Some(true),
        boot: true,
    });
    assert_eq!(
        status_after(revoked.clone()),
        Some(Status::Running),
        "revoking powers the server on"
    );
    TestFramework::<Server>::with(())
        .given(revoked)
        .when(S::RevokeCancellation { at: later })
        .then_expect_error(SE::NotCancelled);
    TestFramework::<Server>::with(())
        .given(in_grace.clone())
        .when(S::RevokeCancellation {
            at: t0() + Duration::days(30),
        })
        .then_expect_error(SE::DeletionDue(t0() + Duration::days(30)));
    TestFramework::<Server>::with(())
        .given(in_grace.clone())
        .when(S::Delete { at: later })
        .then_expect_error(SE::DeletionNotDue(t0() + Duration::days(30)));
    TestFramework::<Server>::with(())
        .given(in_grace)
        .when(S::Delete {
            at: t0() + Duration::days(30),
        })
        .then_expect_events(vec![SEv::ServerDeleted {
            at: t0() + Duration::days(30),
        }]);

    let mut deleting = running();
    deleting.push(immediate);
    assert_eq!(status_after(deleting.clone()), Some(Status::Deleting));
    TestFramework::<Server>::with(())
        .given(deleting.clone())
        .when(S::RevokeCancellation { at: t0() })
        .then_expect_error(SE::ImmediateNotRevocable);
    deleting.push(SEv::ServerDeleted {
        at: t0() + Duration::minutes(5),
    });
    assert_eq!(status_after(deleting.clone()), Some(Status::Deleted));
    TestFramework::<Server>::with(())
        .given(deleting.clone())
        .when(S::Delete {
            at: t0() + Duration::minutes(6),
        })
        .then_expect_error(SE::WrongStatus("deleted"));
    TestFramework::<Server>::with(())
        .given(running())
        .when(S::Delete { at: t0() })
        .then_expect_error(SE::NotCancelled);
    TestFramework::<Server>::with(())
        .given(vec![ordered()])
        .when(S::RequestCancellation {
            mode: CancellationMode::Grace,
            at: t0(),
        })
        .then_expect_error(SE::WrongStatus("provisioning"));
}

#[test]
fn a_deploy_order_completes_or_fails_exactly_once() {
    let place = OrderCommand::Place {
        order_id: OrderId(id(3)),
        account_id: AccountId(id(1)),
        server_id: ServerId(id(2)),
        plan_id: PlanId::parse("vps-1g").unwrap(),
        location: Location::parse("syd").unwrap(),
        net: dec!(0.006849),
        tax: dec!(0.000685),
        at: t0(),
    };
    let placed = OrderEvent::OrderPlaced {
        order_id: OrderId(id(3)),
        account_id: AccountId(id(1)),
        server_id: ServerId(id(2)),
        plan_id: PlanId::parse("vps-1g").unwrap(),
        location: Location::parse("syd").unwrap(),
        net: dec!(0.006849),
        tax: dec!(0.000685),
        gross: dec!(0.007534),
        at: t0(),
    };
    TestFramework::<Order>::with(())
        .given_no_previous_events()
        .when(place.clone())
        .then_expect_events(vec![placed.clone()]);
    TestFramework::<Order>::with(())
        .given(vec![placed.clone()])
        .when(place)
        .then_expect_error(OrderError::AlreadyPlaced);
    TestFramework::<Order>::with(())
        .given_no_previous_events()
        .when(OrderCommand::Fail {
            reason: "x".into(),
            at: t0(),
        })
        .then_expect_error(OrderError::NotFound);
    let completed = OrderEvent::OrderCompleted {
        charge_id: ChargeId(id(4)),
        at: t0(),
    };
    TestFramework::<Order>::with(())
        .given(vec![placed.clone()])
        .when(OrderCommand::Complete {
            charge_id: ChargeId(id(4)),
            at: t0(),
        })
        .then_expect_events(vec![completed.clone()]);
    TestFramework::<Order>::with(())
        .given(vec![placed.clone(), completed.clone()])
        .when(OrderCommand::Complete {
            charge_id: ChargeId(id(4)),
            at: t0(),
        })
        .then_expect_error(OrderError::AlreadyCompleted);
    TestFramework::<Order>::with(())
        .given(vec![placed.clone(), completed])
        .when(OrderCommand::Fail {
            reason: "late".into(),
            at: t0(),
        })
        .then_expect_error(OrderError::AlreadyCompleted);
    let failed = OrderEvent::OrderFailed {
        reason: "no capacity".into(),
        at: t0(),
    };
    TestFramework::<Order>::with(())
        .given(vec![placed.clone(), failed.clone()])
        .when(OrderCommand::Complete {
            charge_id: ChargeId(id(4)),
            at: t0(),
        })
        .then_expect_error(OrderError::AlreadyFailed);
    TestFramework::<Order>::with(())
        .given(vec![placed, failed])
        .when(OrderCommand::Fail {
            reason: "again".into(),
            at: t0(),
        })
        .then_expect_error(OrderError::AlreadyFailed);
}

fn fixtures() -> Fixtures {
    Fixtures::parse(include_str!("../../fixtures/plans.toml"), include_str!("../../fixtures/tax.toml")).unwrap()
}

fn catalog_after(events: Vec<CatalogEvent>) -> Catalog {
    let mut catalog = Catalog::default();
    for event in events {
        cqrs_es::Aggregate::apply(&mut catalog, event);
    }
    catalog
}

#[test]
fn the_catalogue_loads_the_demo_plans_and_tax_rules_idempotently() {
    let sync = CatalogCommand::Sync {
        fixtures: fixtures(),
        effective_at: at("2026-01-01T00:00:00Z"),
    };
    let events = TestFramework::<Catalog>::with(())
        .given_no_previous_events()
        .when(sync.clone())
        .inspect_result()
        .unwrap();
    assert_eq!(events.len(), 4 + 4 + 1, "four plans, four tax rules, the locations");
    TestFramework::<Catalog>::with(())
        .given(events.clone())
        .when(sync)
        .then_expect_events(vec![]);
    let catalog = catalog_after(events);
    let vps2 = PlanId::parse("vps-2g").unwrap();
    assert_eq!(
        catalog
            .monthly_price(&vps2, Currency::AUD, at("2026-02-01T00:00:00Z"))
            .unwrap()
            .amount,
        dec!(15.00)
    );
    assert_eq!(
        catalog
            .monthly_price(&PlanId::parse("vps-8g").unwrap(), Currency::EUR, at("2026-02-01T00:00:00Z"))
            .unwrap()
            .amount,
        dec!(36.00)
    );
    assert_eq!(catalog.monthly_price(&vps2, Currency::JPY, at("2026-02-01T00:00:00Z")), None);
    assert_eq!(
        catalog.monthly_price(&vps2, Currency::AUD, at("2025-12-31T23:59:59Z")),
        None,
        "not yet published"
    );
    assert_eq!(
        catalog
            .tax_rate(domain::Country::parse("AU").unwrap(), at("2026-02-01T00:00:00Z"))
            .fraction(),
        dec!(0.1)
    );
    assert_eq!(
        catalog
            .tax_rate(domain::Country::parse("DE").unwrap(), at("2026-02-01T00:00:00Z"))
            .fraction(),
        dec!(0.19)
    );
    assert_eq!(
        catalog.tax_rate(domain::Country::parse("US").unwrap(), at("2026-02-01T00:00:00Z")),
        TaxRate::ZERO
    );
    assert!(catalog.has_location(&Location::parse("fra").unwrap()));
    assert_eq!(catalog.plans_at(at("2026-02-01T00:00:00Z")).len(), 4);
}

#[test]
fn a_charge_uses_the_price_in_force_at_its_slot() {
    let base = TestFramework::<Catalog>::with(())
        .given_no_previous_events()
        .when(CatalogCommand::Sync {
            fixtures: fixtures(),
            effective_at: at("2026-01-01T00:00:00Z"),
        })
        .inspect_result()
        .unwrap();
    let vps1 = PlanId::parse("vps-1g").unwrap();
    let mut prices = Prices::new();
    prices.insert(Currency::USD, dec!(6.00));
    let reprice = CatalogCommand::RepricePlan {
        plan_id: vps1.clone(),
        monthly: prices.clone(),
        effective_at: at("2026-03-01T00:00:00Z"),
    };
    let repriced = TestFramework::<Catalog>::with(())
        .given(base.clone())
        .when(reprice)
        .inspect_result()
        .unwrap();
    let mut events = base.clone();
    events.extend(repriced);
    let catalog = catalog_after(events.clone());
    assert_eq!(
        catalog
            .monthly_price(&vps1, Currency::USD, at("2026-02-28T23:00:00Z"))
            .unwrap()
            .amount,
        dec!(5.00)
    );
    assert_eq!(
        catalog
            .monthly_price(&vps1, Currency::USD, at("2026-03-01T00:00:00Z"))
            .unwrap()
            .amount,
        dec!(6.00)
    );
    // History is never rewritten.
    let back_dated = CatalogCommand::RepricePlan {
        plan_id: vps1.clone(),
        monthly: prices.clone(),
        effective_at: at("2026-02-01T00:00:00Z"),
    };
    TestFramework::<Catalog>::with(())
        .given(events.clone())
        .when(back_dated)
        .then_expect_error(CatalogError::BackDated {
            effective_at: at("2026-02-01T00:00:00Z"),
            last: at("2026-03-01T00:00:00Z"),
        });
    let retire = CatalogCommand::RetirePlan {
        plan_id: vps1.clone(),
        effective_at: at("2026-04-01T00:00:00Z"),
    };
    let retired = TestFramework::<Catalog>::with(())
        .given(events.clone())
        .when(retire.clone())
        .inspect_result()
        .unwrap();
    events.extend(retired);
    let catalog = catalog_after(events.clone());
    assert!(catalog.orderable(&vps1, at("2026-03-31T00:00:00Z")).is_ok());
    assert_eq!(
        catalog.orderable(&vps1, at("2026-04-01T00:00:00Z")),
        Err(CatalogError::PlanRetired(vps1.clone()))
    );
    assert_eq!(
        catalog
            .monthly_price(&vps1, Currency::USD, at("2026-04-02T00:00:00Z"))
            .unwrap()
            .amount,
        dec!(6.00),
        "servers on a retired plan are still billed"
    );
    TestFramework::<Catalog>::with(())
        .given(events.clone())
        .when(retire)
        .then_expect_error(CatalogError::PlanRetired(vps1.clone()));
    let unknown = PlanId::parse("vps-64g").unwrap();
    TestFramework::<Catalog>::with(())
        .given(events.clone())
        .when(CatalogCommand::RepricePlan {
            plan_id: unknown.clone(),
            monthly: prices.clone(),
            effective_at: at("2026-05-01T00:00:00Z"),
        })
        .then_expect_error(CatalogError::UnknownPlan(unknown));
    let spec = PlanSpec {
        id: vps1.clone(),
        vcpu: 1,
        ram_gb: 1,
        disk_gb: 25,
    };
    TestFramework::<Catalog>::with(())
        .given(events.clone())
        .when(CatalogCommand::PublishPlan {
            plan: spec.clone(),
            monthly: prices,
            effective_at: at("2026-05-01T00:00:00Z"),
        })
        .then_expect_error(CatalogError::PlanExists(vps1));
    TestFramework::<Catalog>::with(())
        .given(events)
        .when(CatalogCommand::PublishPlan {
            plan: PlanSpec {
                id: PlanId::parse("vps-0").unwrap(),
                ..spec
            },
            monthly: Prices::new(),
            effective_at: at("2026-05-01T00:00:00Z"),
        })
        .then_expect_error(CatalogError::BadPrices);
}

#[test]
fn bad_fixture_files_say_which_file_and_what() {
    let error = Fixtures::parse(
        "locations = []\n[[plan]]\nid = \"VPS\"\nvcpu = 1\nram_gb = 1\ndisk_gb = 1\nmonthly = {}\n",
        include_str!("../../fixtures/tax.toml"),
    )
    .unwrap_err();
    assert!(error.to_string().starts_with("plans.toml: plan_id"), "{error}");
    let error = Fixtures::parse(
        include_str!("../../fixtures/plans.toml"),
        "[[rule]]\ncountry = \"AU\"\nrate = \"1.5\"\nname = \"x\"\n",
    )
    .unwrap_err();
    assert!(error.to_string().starts_with("tax.toml: tax_rate"), "{error}");
}

fn charge(n: u128, server: u128, net: rust_decimal::Decimal, tax: rust_decimal::Decimal) -> BilledCharge {
    BilledCharge {
        charge_id: ChargeId(id(n)),
        server_id: ServerId(id(server)),
        plan_id: PlanId::parse("vps-2g").unwrap(),
        net,
        tax,
        tax_rate: TaxRate::new(dec!(0.1)).unwrap(),
    }
}

#[test]
fn an_invoice_has_a_line_per_server_negative_refund_lines_and_display_figures_that_add_up() {
    let period = YearMonth { year: 2026, month: 3 };
    let charges: Vec<BilledCharge> = (0..3)
        .map(|n| charge(100 + n, 2, dec!(0.020548), dec!(0.002055)))
        .chain([charge(200, 5, dec!(0.020548), dec!(0.002055))])
        .collect();
    let refunds = vec![
        BilledRefund {
            kind: RefundKind::Cancellation,
            charge_id: ChargeId(id(102)),
            server_id: ServerId(id(2)),
            net: dec!(0.020377),
            tax: dec!(0.002038),
            tax_rate: TaxRate::new(dec!(0.1)).unwrap(),
        },
        BilledRefund::service_credit(ChargeId(id(200)), ServerId(id(5)), dec!(0.011), TaxRate::new(dec!(0.1)).unwrap()),
    ];
    let invoice = build_invoice(AccountId(id(1)), Currency::AUD, period, &charges, &refunds).unwrap();
    assert_eq!(invoice.lines.len(), 4);
    assert_eq!(
        (invoice.lines[0].hours, invoice.lines[0].net, invoice.lines[0].tax),
        (Some(3), dec!(0.061644), dec!(0.006165))
    );
    assert_eq!((invoice.lines[1].hours, invoice.lines[1].net), (Some(1), dec!(0.020548)));
    assert_eq!((invoice.lines[2].net, invoice.lines[2].tax), (dec!(-0.020377), dec!(-0.002038)));
    assert_eq!((invoice.lines[3].net, invoice.lines[3].tax), (dec!(-0.010000), dec!(-0.001000)));
    assert_eq!(invoice.net, dec!(0.051815));
    assert_eq!(invoice.tax, dec!(0.005182));
    assert_eq!(invoice.total, dec!(0.056997));
    assert_eq!(
        (
            invoice.display.net.to_string(),
            invoice.display.tax.to_string(),
            invoice.display.total.to_string()
        ),
        ("0.05".into(), "0.01".into(), "0.06".into())
    );
    assert_eq!(invoice.display.net + invoice.display.tax, invoice.display.total);
    assert!(
        build_invoice(AccountId(id(1)), Currency::AUD, period, &[], &refunds).is_none(),
        "no charge, no invoice"
    );
}

#[test]
fn invoice_numbers_are_gapless_per_year_and_credit_notes_reference_their_invoice() {
    let period = YearMonth { year: 2026, month: 3 };
    let draft = |account: u128| {
        build_invoice(
            AccountId(id(account)),
            Currency::AUD,
            period,
            &[charge(100 + account, 2, dec!(1), dec!(0.1))],
            &[],
        )
        .unwrap()
    };
    let after_month = at("2026-04-01T00:00:00Z");
    let issue = |account: u128, invoice: u128| InvoiceSeriesCommand::IssueInvoice {
        year: 2026,
        invoice_id: InvoiceId(id(invoice)),
        invoice: draft(account),
        at: after_month,
    };
    let mut events: Vec<InvoiceSeriesEvent> = Vec::new();
    for (n, account) in [(1u128, 11u128), (2, 12), (3, 13)] {
        let issued = TestFramework::<InvoiceSeries>::with(())
            .given(events.clone())
            .when(issue(account, 900 + n))
            .inspect_result()
            .unwrap();
        let InvoiceSeriesEvent::InvoiceIssued { number, .. } = &issued[0] else {
            panic!()
        };
        assert_eq!(number, &format!("INV-2026-{n:06}"));
        events.extend(issued);
    }
    TestFramework::<InvoiceSeries>::with(())
        .given(events.clone())
        .when(issue(11, 999))
        .then_expect_error(InvoiceError::AlreadyInvoiced(AccountId(id(11)), period));
    TestFramework::<InvoiceSeries>::with(())
        .given(events.clone())
        .when(issue(14, 901))
        .then_expect_error(InvoiceError::DuplicateId(InvoiceId(id(901))));
    TestFramework::<InvoiceSeries>::with(())
        .given(events.clone())
        .when(InvoiceSeriesCommand::IssueInvoice {
            year: 2026,
            invoice_id: InvoiceId(id(950)),
            invoice: draft(15),
            at: at("2026-03-31T23:00:00Z"),
        })
        .then_expect_error(InvoiceError::MonthNotOver(period));
    TestFramework::<InvoiceSeries>::with(())
        .given(events.clone())
        .when(InvoiceSeriesCommand::IssueInvoice {
            year: 2027,
            invoice_id: InvoiceId(id(951)),
            invoice: draft(15),
            at: after_month,
        })
        .then_expect_error(InvoiceError::WrongSeries(2026));

    let note = CreditNoteDraft {
        invoice_id: InvoiceId(id(902)),
        account_id: AccountId(id(12)),
        charge_id: ChargeId(id(112)),
        reason: "outage".into(),
        net: dec!(0.5),
        tax: dec!(0.05),
        currency: Currency::AUD,
    };
    let issued = TestFramework::<InvoiceSeries>::with(())
        .given(events.clone())
        .when(InvoiceSeriesCommand::IssueCreditNote {
            year: 2026,
            credit_note_id: InvoiceId(id(960)),
            credit_note: note.clone(),
            at: after_month,
        })
        .inspect_result()
        .unwrap();
    let InvoiceSeriesEvent::CreditNoteIssued {
        number,
        invoice_number,
        total,
        ..
    } = &issued[0]
    else {
        panic!()
    };
    assert_eq!(
        (number.as_str(), invoice_number.as_str(), *total),
        ("CN-2026-000001", "INV-2026-000002", dec!(0.55))
    );
    let unknown = CreditNoteDraft {
        invoice_id: InvoiceId(id(999)),
        ..note.clone()
    };
    TestFramework::<InvoiceSeries>::with(())
        .given(events.clone())
        .when(InvoiceSeriesCommand::IssueCreditNote {
            year: 2026,
            credit_note_id: InvoiceId(id(961)),
            credit_note: unknown,
            at: after_month,
        })
        .then_expect_error(InvoiceError::UnknownInvoice(InvoiceId(id(999))));
    let empty = CreditNoteDraft {
        net: dec!(0),
        tax: dec!(0),
        ..note
    };
    TestFramework::<InvoiceSeries>::with(())
        .given(events)
        .when(InvoiceSeriesCommand::IssueCreditNote {
            year: 2026,
            credit_note_id: InvoiceId(id(962)),
            credit_note: empty,
            at: after_month,
        })
        .then_expect_error(InvoiceError::EmptyCreditNote);
}

#[test]
fn a_tax_rate_change_applies_from_its_date_and_is_never_back_dated() {
    let au = domain::Country::parse("AU").unwrap();
    let set = |rate, effective_at| CatalogCommand::SetTaxRate {
        country: au,
        rate: TaxRate::new(rate).unwrap(),
        name: "GST".into(),
        effective_at,
    };
    let first = TestFramework::<Catalog>::with(())
        .given_no_previous_events()
        .when(set(dec!(0.10), at("2026-01-01T00:00:00Z")))
        .inspect_result()
        .unwrap();
    assert_eq!(
        first,
        vec![CatalogEvent::TaxRateSet {
            country: au,
            rate: TaxRate::new(dec!(0.10)).unwrap(),
            name: "GST".into(),
            effective_at: at("2026-01-01T00:00:00Z")
        }]
    );
    let mut events = first;
    events.extend(
        TestFramework::<Catalog>::with(())
            .given(events.clone())
            .when(set(dec!(0.125), at("2026-07-01T00:00:00Z")))
            .inspect_result()
            .unwrap(),
    );
    let catalog = catalog_after(events.clone());
    assert_eq!(catalog.tax_rate(au, at("2026-06-30T23:59:59Z")).fraction(), dec!(0.1));
    assert_eq!(catalog.tax_rate(au, at("2026-07-01T00:00:00Z")).fraction(), dec!(0.125));
    TestFramework::<Catalog>::with(())
        .given(events)
        .when(set(dec!(0.2), at("2026-03-01T00:00:00Z")))
        .then_expect_error(CatalogError::BackDated {
            effective_at: at("2026-03-01T00:00:00Z"),
            last: at("2026-07-01T00:00:00Z"),
        });
}

#[test]
fn a_top_up_is_paid_once() {
    use domain::topup::{TopUp, TopUpCommand, TopUpError, TopUpEvent};
    let requested = TopUpEvent::TopUpRequested {
        topup_id: domain::TopUpId(id(9)),
        account_id: AccountId(id(1)),
        amount: dec!(25.00),
        currency: Currency::AUD,
        checkout_url: "http://localhost/dev/checkout/9".into(),
        at: t0(),
    };
    let request = TopUpCommand::Request {
        topup_id: domain::TopUpId(id(9)),
        account_id: AccountId(id(1)),
        amount: dec!(25.00),
        currency: Currency::AUD,
        checkout_url: "http://localhost/dev/checkout/9".into(),
        at: t0(),
    };
    TestFramework::<TopUp>::with(())
        .given_no_previous_events()
        .when(request.clone())
        .then_expect_events(vec![requested.clone()]);
    TestFramework::<TopUp>::with(())
        .given(vec![requested.clone()])
        .when(request)
        .then_expect_error(TopUpError::AlreadyRequested);
    let asked = domain::Money {
        amount: dec!(25.00),
        currency: Currency::AUD,
    };
    // Paid in another currency, or another amount: held for review, nothing paid.
    for stated in [
        vec![domain::Money {
            amount: dec!(375000),
            currency: Currency::JPY,
        }],
        vec![domain::Money {
            amount: dec!(250.00),
            currency: Currency::AUD,
        }],
        vec![domain::Money {
            amount: dec!(25.00),
            currency: Currency::USD,
        }],
        vec![],
    ] {
        TestFramework::<TopUp>::with(())
            .given(vec![requested.clone()])
            .when(TopUpCommand::MarkPaid {
                payment_id: "pi_x".into(),
                stated: stated.clone(),
                at: t0(),
            })
            .then_expect_events(vec![TopUpEvent::PaymentHeldForReview {
                payment_id: "pi_x".into(),
                stated,
                at: t0(),
            }]);
    }
    // Presented in yen, settled as the Australian dollars asked (Stripe's currency conversion).
    TestFramework::<TopUp>::with(())
        .given(vec![requested.clone()])
        .when(TopUpCommand::MarkPaid {
            payment_id: "pi_1".into(),
            stated: vec![
                domain::Money {
                    amount: dec!(2500),
                    currency: Currency::JPY,
                },
                asked,
            ],
            at: t0(),
        })
        .then_expect_events(vec![TopUpEvent::TopUpPaid {
            payment_id: "pi_1".into(),
            at: t0(),
        }]);
    let paid = TopUpEvent::TopUpPaid {
        payment_id: "pi_1".into(),
        at: t0(),
    };
    TestFramework::<TopUp>::with(())
        .given(vec![requested.clone()])
        .when(TopUpCommand::MarkPaid {
            payment_id: "pi_1".into(),
            stated: vec![asked],
            at: t0(),
        })
        .then_expect_events(vec![paid.clone()]);
    TestFramework::<TopUp>::with(())
        .given(vec![requested.clone(), paid.clone()])
        .when(TopUpCommand::MarkPaid {
            payment_id: "pi_1".into(),
            stated: vec![asked],
            at: t0(),
        })
        .then_expect_events(vec![]);
    TestFramework::<TopUp>::with(())
        .given(vec![requested, paid])
        .when(TopUpCommand::MarkPaid {
            payment_id: "pi_2".into(),
            stated: vec![asked],
            at: t0(),
        })
        .then_expect_error(TopUpError::PaidElsewhere("pi_1".into()));
    TestFramework::<TopUp>::with(())
        .given_no_previous_events()
        .when(TopUpCommand::MarkPaid {
            payment_id: "pi_1".into(),
            stated: vec![asked],
            at: t0(),
        })
        .then_expect_error(TopUpError::NotFound);
}
