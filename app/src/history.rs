//! A month of realistic history, made through the real command path with a controlled clock:
//! three accounts in three currencies and tax regimes, top-ups, orders (one failing), hourly
//! charges up to the monthly cap, a declined charge and suspension, a resume after a top-up,
//! cancellations of both modes with pro-rata refunds, a revoked cancellation, a service credit, a
//! card refund, an adjustment, a dispute, March's invoices and a credit note in April.
//! `fixtures/histories/march-2026.jsonl` is this history as exported.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use domain::catalog::Fixtures;
use domain::server::{CancellationMode, PowerAction};
use domain::{
    AccountId, Country, Currency, DisputeId, Hostname, HourSlot, Location, ManualClock, OrderId, PlanId, ServerId, TopUpId, YearMonth,
};
use rust_decimal::Decimal;

use crate::flows::{DueServer, FlowError, Flows, SlotOutcome};
use crate::handler::Metadata;

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).expect("a valid instant").to_utc()
}

fn money(text: &str) -> Decimal {
    text.parse().expect("a valid amount")
}

/// Ids are derived from names so the history is the same every time it is made.
fn id(name: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes())
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub accounts: Vec<(String, AccountId)>,
    pub servers: Vec<(String, ServerId)>,
}

enum Step {
    TopUp {
        account: &'static str,
        payment: &'static str,
        amount: &'static str,
    },
    Order {
        account: &'static str,
        server: &'static str,
        plan: &'static str,
        location: &'static str,
    },
    Provision {
        server: &'static str,
    },
    FailProvisioning {
        server: &'static str,
    },
    Setup {
        server: &'static str,
        hostname: &'static str,
    },
    Power {
        server: &'static str,
        action: PowerAction,
    },
    Cancel {
        server: &'static str,
        mode: CancellationMode,
    },
    Revoke {
        server: &'static str,
    },
    Delete {
        server: &'static str,
    },
    Resume {
        server: &'static str,
    },
    ServiceCredit {
        account: &'static str,
        server: &'static str,
        amount: &'static str,
        reason: &'static str,
    },
    CardRefund {
        account: &'static str,
        payment: &'static str,
        amount: &'static str,
    },
    CompleteCardRefund {
        account: &'static str,
    },
    Adjust {
        account: &'static str,
        amount: &'static str,
        reason: &'static str,
    },
    Dispute {
        account: &'static str,
        payment: &'static str,
        amount: &'static str,
    },
    CloseDispute {
        account: &'static str,
        won: bool,
    },
}

fn script() -> Vec<(&'static str, Step)> {
    use Step::*;
    vec![
        (
            "2026-03-01T09:10:00Z",
            TopUp {
                account: "acme",
                payment: "pi_acme_1",
                amount: "100.00",
            },
        ),
        (
            "2026-03-01T09:20:00Z",
            Order {
                account: "acme",
                server: "acme-web",
                plan: "vps-2g",
                location: "syd",
            },
        ),
        ("2026-03-01T09:20:01Z", Provision { server: "acme-web" }),
        (
            "2026-03-01T09:31:00Z",
            Setup {
                server: "acme-web",
                hostname: "web1.acme.example",
            },
        ),
        (
            "2026-03-02T12:00:00Z",
            TopUp {
                account: "bob",
                payment: "pi_bob_1",
                amount: "5.00",
            },
        ),
        (
            "2026-03-02T12:05:00Z",
            Order {
                account: "bob",
                server: "bob-db",
                plan: "vps-4g",
                location: "nyc",
            },
        ),
        ("2026-03-02T12:05:01Z", Provision { server: "bob-db" }),
        (
            "2026-03-02T12:20:00Z",
            Setup {
                server: "bob-db",
                hostname: "db.bob.example",
            },
        ),
        (
            "2026-03-03T08:00:00Z",
            TopUp {
                account: "clara",
                payment: "pi_clara_1",
                amount: "50.00",
            },
        ),
        (
            "2026-03-03T08:02:00Z",
            Order {
                account: "clara",
                server: "clara-fail",
                plan: "vps-8g",
                location: "fra",
            },
        ),
        ("2026-03-03T08:02:02Z", FailProvisioning { server: "clara-fail" }),
        (
            "2026-03-03T08:10:00Z",
            Order {
                account: "clara",
                server: "clara-app",
                plan: "vps-1g",
                location: "fra",
            },
        ),
        ("2026-03-03T08:10:01Z", Provision { server: "clara-app" }),
        (
            "2026-03-03T08:40:00Z",
            Setup {
                server: "clara-app",
                hostname: "app.clara.example",
            },
        ),
        (
            "2026-03-05T17:45:00Z",
            Power {
                server: "clara-app",
                action: PowerAction::Shutdown,
            },
        ),
        (
            "2026-03-06T07:15:00Z",
            Power {
                server: "clara-app",
                action: PowerAction::Boot,
            },
        ),
        (
            "2026-03-10T14:05:00Z",
            Order {
                account: "acme",
                server: "acme-cache",
                plan: "vps-1g",
                location: "mel",
            },
        ),
        ("2026-03-10T14:05:01Z", Provision { server: "acme-cache" }),
        (
            "2026-03-10T14:30:00Z",
            Setup {
                server: "acme-cache",
                hostname: "cache.acme.example",
            },
        ),
        (
            "2026-03-11T10:00:00Z",
            TopUp {
                account: "bob",
                payment: "pi_bob_2",
                amount: "10.00",
            },
        ),
        ("2026-03-11T10:00:30Z", Resume { server: "bob-db" }),
        (
            "2026-03-12T16:00:00Z",
            ServiceCredit {
                account: "acme",
                server: "acme-web",
                amount: "0.010000",
                reason: "network outage in syd",
            },
        ),
        (
            "2026-03-14T09:00:00Z",
            CardRefund {
                account: "clara",
                payment: "pi_clara_1",
                amount: "10.00",
            },
        ),
        ("2026-03-14T09:30:00Z", CompleteCardRefund { account: "clara" }),
        (
            "2026-03-15T08:30:45Z",
            Cancel {
                server: "bob-db",
                mode: CancellationMode::Immediate,
            },
        ),
        ("2026-03-15T08:35:45Z", Delete { server: "bob-db" }),
        (
            "2026-03-16T11:00:00Z",
            Adjust {
                account: "clara",
                amount: "2.00",
                reason: "goodwill after support ticket 4411",
            },
        ),
        (
            "2026-03-20T11:40:00Z",
            Cancel {
                server: "acme-cache",
                mode: CancellationMode::Grace,
            },
        ),
        ("2026-03-25T09:12:00Z", Revoke { server: "acme-cache" }),
        (
            "2026-03-27T13:00:00Z",
            Dispute {
                account: "clara",
                payment: "pi_clara_1",
                amount: "20.00",
            },
        ),
        (
            "2026-03-29T10:00:00Z",
            CloseDispute {
                account: "clara",
                won: true,
            },
        ),
        ("2026-03-29T10:00:10Z", Resume { server: "clara-app" }),
    ]
}

const ACCOUNTS: [(&str, &str, &str, &str, &str); 3] = [
    ("acme", "Acme Hosting Pty Ltd", "billing@acme.example", "AUD", "AU"),
    ("bob", "Bob Jones", "bob@bob.example", "USD", "US"),
    ("clara", "Clara Schmidt GmbH", "finance@clara.example", "EUR", "DE"),
];

/// Makes the month of history through `flows`, moving `clock`; returns who is who.
pub async fn march_2026(flows: &Flows, clock: &ManualClock, fixtures: Fixtures) -> Result<Summary, FlowError> {
    let admin = Metadata::actor("admin", "history");
    let customer = Metadata::actor("customer", "history");
    let system = Metadata::actor("system", "billing-scheduler");
    let set = |instant: DateTime<Utc>| clock.set(instant).expect("the history only moves forward");

    set(at("2026-02-28T00:00:00Z"));
    flows.sync_catalog(fixtures, &admin).await?;
    let mut accounts = BTreeMap::new();
    for (key, name, email, currency, country) in ACCOUNTS {
        let account_id = AccountId(id(key));
        flows
            .open_account(
                account_id,
                name,
                email,
                Currency::parse(currency).expect("known"),
                Country::parse(country).expect("valid"),
                &admin,
            )
            .await?;
        accounts.insert(key, account_id);
    }
    let mut servers: BTreeMap<&str, ServerId> = BTreeMap::new();
    let mut orders: BTreeMap<&str, OrderId> = BTreeMap::new();
    let mut topups: BTreeMap<&str, TopUpId> = BTreeMap::new();
    let mut last_refund = None;
    let mut disputes: BTreeMap<&str, DisputeId> = BTreeMap::new();

    let steps = script();
    let mut step_index = 0;
    let mut slot = HourSlot::containing(at("2026-03-01T00:00:00Z"));
    let end = at("2026-04-01T00:00:00Z");
    while slot.start() < end {
        // The scheduler charges every server's slot at the slot's start.
        set(slot.start());
        for server_id in servers.values() {
            match flows.charge_slot(*server_id, slot, &system).await? {
                SlotOutcome::Charged { .. }
                | SlotOutcome::DeclinedAndSuspended
                | SlotOutcome::AlreadyCharged
                | SlotOutcome::NotBillable
                | SlotOutcome::NotAffordable => {}
            }
        }
        // Then whatever people did during the hour.
        while step_index < steps.len() && at(steps[step_index].0) < slot.end() {
            let (instant, step) = &steps[step_index];
            set(at(instant));
            step_index += 1;
            match step {
                Step::TopUp { account, payment, amount } => {
                    let topup_id = TopUpId(id(payment));
                    topups.insert(payment, topup_id);
                    flows
                        .settle_topup(accounts[account], topup_id, payment, money(amount), &system)
                        .await?;
                }
                Step::Order {
                    account,
                    server,
                    plan,
                    location,
                } => {
                    let (server_id, order_id) = (ServerId(id(server)), OrderId(id(&format!("order-{server}"))));
                    servers.insert(server, server_id);
                    orders.insert(server, order_id);
                    let plan = PlanId::parse(plan).expect("valid");
                    let location = Location::parse(location).expect("valid");
                    flows
                        .place_order(accounts[account], plan, location, order_id, server_id, &customer)
                        .await?;
                }
                Step::Provision { server } => {
                    flows
                        .complete_provisioning(orders[server], &format!("sim-{server}"), &system)
                        .await?;
                }
                Step::FailProvisioning { server } => {
                    flows
                        .fail_provisioning(orders[server], "no capacity in the location", &system)
                        .await?
                }
                Step::Setup { server, hostname } => {
                    flows
                        .setup(servers[server], "debian-12", Hostname::parse(hostname).expect("valid"), &customer)
                        .await?
                }
                Step::Power { server, action } => flows.power(servers[server], *action, &customer).await?,
                Step::Cancel { server, mode } => flows.cancel(servers[server], *mode, &customer).await?,
                Step::Revoke { server } => {
                    flows.revoke_cancellation(servers[server], &customer).await?;
                }
                Step::Delete { server } => flows.delete_due(servers[server], &system).await?,
                Step::Resume { server } => {
                    flows.resume(servers[server], &system).await?;
                }
                Step::ServiceCredit {
                    account,
                    server,
                    amount,
                    reason,
                } => {
                    let account_id = accounts[account];
                    let charge_id = flows
                        .charge_of_slot(account_id, servers[server], HourSlot::containing(at(instant)))
                        .await?;
                    flows.service_credit(account_id, charge_id, money(amount), reason, &admin).await?;
                }
                Step::CardRefund { account, payment, amount } => {
                    last_refund = Some(
                        flows
                            .request_card_refund(
                                accounts[account],
                                topups[payment],
                                money(amount),
                                "customer asked for part of the top-up back",
                                &admin,
                            )
                            .await?,
                    );
                }
                Step::CompleteCardRefund { account } => {
                    let refund_id = last_refund.take().ok_or(FlowError::NotFound("refund"))?;
                    flows
                        .account_command(accounts[account], domain::AccountCommand::CompleteCardRefund { refund_id }, &system)
                        .await?;
                }
                Step::Adjust { account, amount, reason } => {
                    flows.adjust(accounts[account], money(amount), reason, &admin).await?;
                }
                Step::Dispute { account, payment, amount } => {
                    let dispute_id = DisputeId(id(&format!("dispute-{payment}")));
                    disputes.insert(account, dispute_id);
                    let own: Vec<ServerId> = servers
                        .iter()
                        .filter(|(name, _)| name.starts_with(account))
                        .map(|(_, id)| *id)
                        .collect();
                    flows
                        .open_dispute(accounts[account], dispute_id, payment, money(amount), &own, &system)
                        .await?;
                }
                Step::CloseDispute { account, won } => {
                    flows
                        .account_command(
                            accounts[account],
                            domain::AccountCommand::CloseDispute {
                                dispute_id: disputes[account],
                                won: *won,
                            },
                            &system,
                        )
                        .await?;
                }
            }
        }
        slot = slot.next();
    }

    // March is over: its invoices, then an April credit on a March charge (a credit note).
    set(at("2026-04-01T00:05:00Z"));
    let march = YearMonth { year: 2026, month: 3 };
    for account_id in accounts.values() {
        flows.issue_invoice(*account_id, march, &system).await?;
    }
    set(at("2026-04-02T10:00:00Z"));
    let acme = accounts["acme"];
    let charge_id = flows
        .charge_of_slot(acme, servers["acme-web"], HourSlot::containing(at("2026-03-20T10:00:00Z")))
        .await?;
    flows
        .service_credit(acme, charge_id, money("0.005000"), "billing error on 20 March", &admin)
        .await?;

    Ok(Summary {
        accounts: accounts.into_iter().map(|(name, id)| (name.to_string(), id)).collect(),
        servers: servers.into_iter().map(|(name, id)| (name.to_string(), id)).collect(),
    })
}

/// A fleet of customers beside the three of `march_2026`, for `billing demo`: `count` accounts in
/// three currencies opening through March 2026, each topping up and ordering one to three
/// servers that are provisioned and set up, some topping up again mid-month, some cancelling,
/// and every server billed hour by hour by the billing run (`Flows::charge_due_batch`, the same
/// decisions as `billing serve`), so small wallets run dry and their servers are suspended.
/// Then March's invoices. Everything goes through the command path with `clock` moving forward
/// from 2026-03-01 to `until`; ids derive from names, so the fleet is the same every time.
pub async fn fleet(flows: &Flows, clock: &ManualClock, count: usize, until: DateTime<Utc>) -> Result<usize, FlowError> {
    const NAMES: [&str; 12] = [
        "Northwind",
        "Bluebird",
        "Kestrel",
        "Ironbark",
        "Lumen",
        "Quokka",
        "Harbour",
        "Saltbush",
        "Meridian",
        "Wattle",
        "Granite",
        "Tidepool",
    ];
    const KINDS: [&str; 8] = ["Labs", "Hosting", "Studio", "Analytics", "Games", "Media", "Systems", "Co-op"];
    const REGIONS: [(&str, &str); 3] = [("AUD", "AU"), ("USD", "US"), ("EUR", "DE")];
    const PLANS: [&str; 4] = ["vps-1g", "vps-1g", "vps-2g", "vps-4g"];
    const LOCATIONS: [&str; 5] = ["syd", "mel", "sgp", "fra", "nyc"];
    const IMAGES: [&str; 3] = ["ubuntu-24.04", "debian-12", "rocky-9"];
    let admin = Metadata::actor("admin", "demo");
    let customer = Metadata::actor("customer", "demo");
    let system = Metadata::actor("system", "billing-scheduler");
    // Several customers may act in one hour: the clock moves to each action's minute or stays.
    let set = |instant: DateTime<Utc>| {
        use domain::Clock;
        clock.set(instant.max(clock.now())).expect("the fleet only moves forward")
    };
    let start = at("2026-03-01T00:00:00Z");
    let invoices_at = at("2026-04-01T00:05:00Z");
    let mut invoiced = false;
    // Billable servers by account, each with the next slot it owes.
    let mut fleet: Vec<(AccountId, Vec<(ServerId, HourSlot)>)> = Vec::new();
    let mut slot = HourSlot::containing(start);
    while slot.start() <= until {
        set(slot.start());
        // The billing run charges the slot.
        let due: Vec<(AccountId, Vec<DueServer>, usize)> = fleet
            .iter()
            .map(|(account_id, servers)| {
                (
                    *account_id,
                    servers
                        .iter()
                        .filter(|(_, next)| *next <= slot)
                        .map(|&(server_id, first)| DueServer {
                            server_id,
                            first,
                            folded: None,
                        })
                        .collect::<Vec<_>>(),
                    1,
                )
            })
            .filter(|(_, servers, _)| !servers.is_empty())
            .collect();
        for batch in due.chunks(500) {
            flows.charge_due_batch(batch, slot, None, &system).await?;
        }
        for (_, servers) in fleet.iter_mut() {
            for (_, next) in servers.iter_mut() {
                if *next <= slot {
                    *next = slot.next();
                }
            }
        }
        // Then what customers did during the hour.
        let hour = (slot.start() - start).num_hours() as usize;
        for index in 0..count {
            let opens_at_hour = (index * 37) % (24 * 20);
            let key = format!("fleet-{index:03}");
            let account_id = AccountId(id(&key));
            let at_minute = |minute: i64| slot.start() + chrono::Duration::minutes(minute);
            if hour == opens_at_hour {
                let (currency, country) = REGIONS[index % REGIONS.len()];
                set(at_minute(5));
                flows
                    .open_account(
                        account_id,
                        &format!("{} {}", NAMES[index % NAMES.len()], KINDS[(index / NAMES.len()) % KINDS.len()]),
                        &format!("billing@{key}.example"),
                        Currency::parse(currency).expect("known"),
                        Country::parse(country).expect("valid"),
                        &admin,
                    )
                    .await?;
                set(at_minute(10));
                let amount = Decimal::from(5 + (index * 13) % 60);
                let payment = format!("pi_{key}_1");
                flows
                    .settle_topup(account_id, TopUpId(id(&payment)), &payment, amount, &system)
                    .await?;
                let mut servers = Vec::new();
                for n in 0..1 + index % 3 {
                    let name = format!("{key}-{n}");
                    let (server_id, order_id) = (ServerId(id(&name)), OrderId(id(&format!("order-{name}"))));
                    set(at_minute(15 + n as i64));
                    let placed = flows
                        .place_order(
                            account_id,
                            PlanId::parse(PLANS[(index + n) % PLANS.len()]).expect("valid"),
                            Location::parse(LOCATIONS[(index + 2 * n) % LOCATIONS.len()]).expect("valid"),
                            order_id,
                            server_id,
                            &customer,
                        )
                        .await;
                    if let Err(FlowError::Account(_)) = placed {
                        // The wallet cannot hold the first hour: the order is refused, as over HTTP.
                        continue;
                    }
                    placed?;
                    set(at_minute(20 + n as i64));
                    flows.complete_provisioning(order_id, &format!("sim-{name}"), &system).await?;
                    set(at_minute(40 + n as i64));
                    let hostname = Hostname::parse(&format!("srv{n}.{key}.example")).expect("valid");
                    flows
                        .setup(server_id, IMAGES[(index + n) % IMAGES.len()], hostname, &customer)
                        .await?;
                    servers.push((server_id, slot.next()));
                }
                fleet.push((account_id, servers));
            }
            if index % 5 == 0 && hour == opens_at_hour + 24 * 9 && hour < 24 * 31 {
                set(at_minute(30));
                let payment = format!("pi_{key}_2");
                flows
                    .settle_topup(account_id, TopUpId(id(&payment)), &payment, Decimal::from(40), &system)
                    .await?;
            }
            if index % 11 == 0 && hour == opens_at_hour + 24 * 6 {
                set(at_minute(50));
                if let Some((server_id, _)) = fleet.iter().find(|(id, _)| *id == account_id).and_then(|(_, s)| s.first().copied()) {
                    match flows.cancel(server_id, CancellationMode::Grace, &customer).await {
                        Ok(()) | Err(FlowError::Server(_)) => {}
                        Err(error) => return Err(error),
                    }
                }
            }
        }
        if !invoiced && slot.end() > invoices_at {
            set(invoices_at.max(slot.start()));
            let march = YearMonth { year: 2026, month: 3 };
            for (account_id, _) in &fleet {
                flows.issue_invoice(*account_id, march, &system).await?;
            }
            invoiced = true;
        }
        slot = slot.next();
    }
    Ok(fleet.len())
}

/// The month of history shipped with the binary, for `billing demo`.
const DEMO_HISTORY: &str = include_str!("../../fixtures/histories/march-2026.jsonl");

/// What `demo` made, and what there is.
pub struct Demo {
    /// Events of the shipped history new to this database.
    pub imported: u64,
    /// The last instant of the history: the dev clock starts there.
    pub history_end: DateTime<Utc>,
    pub accounts: i64,
    pub servers: i64,
    pub events: i64,
    /// The shipped history's first customer (Acme), for a customer key.
    pub customer_account: domain::AccountId,
}

/// The demo's data: the shipped month of history (imported, ids kept) and, once per database, a
/// fleet of `fleet_size` more accounts through the same month; then the read models brought up to
/// date. `progress` hears of the slow part.
pub async fn demo(log: &ledger::EventLog, fleet_size: usize, progress: impl Fn(String)) -> anyhow::Result<Demo> {
    let pool = log.pool().clone();
    let imported = crate::audit::import(log, DEMO_HISTORY.as_bytes()).await?;
    let history_end = crate::reads::last_occurred_at(&pool)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the demo history is empty"))?;
    // The fleet: hundreds more customers through the same month, made once per database.
    let fleet_account = domain::AccountId(uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, b"fleet-000"));
    if fleet_size > 0 && log.stream_version(&fleet_account.stream_id()).await? == 0 {
        progress(format!(
            "making a month of history for {fleet_size} more accounts through the command path (once per database)..."
        ));
        let started = std::time::Instant::now();
        let clock = std::sync::Arc::new(ManualClock::new(history_end - chrono::Duration::days(60)));
        let flows = Flows::new(crate::handler::CommandHandler::new(log.clone(), clock.clone()));
        let accounts = fleet(&flows, &clock, fleet_size, history_end).await?;
        progress(format!(
            "{accounts} accounts made in {:.1} s; bringing the read models up to date...",
            started.elapsed().as_secs_f64()
        ));
    }
    crate::outbox::skip_to_head(&pool).await?;
    projections::runner::catch_up_all(&pool).await?;
    let (accounts, servers, events) = crate::reads::counts(&pool).await?;
    let customer_account = crate::reads::first_account_named(&pool, "Acme")
        .await?
        .ok_or_else(|| anyhow::anyhow!("the demo history has no Acme account"))?;
    Ok(Demo {
        imported,
        history_end,
        accounts,
        servers,
        events,
        customer_account,
    })
}
