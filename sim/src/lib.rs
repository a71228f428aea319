//! A seeded, model-based simulation of the billing core, in the spirit of TigerBeetle's VOPR and
//! Jepsen's bank test. From a seed, random operations run through the real flows on a real
//! PostgreSQL: accounts, top-ups (paid as asked, in another currency or amount, delivered twice),
//! orders whose provisioning succeeds, fails or times out, setups and power actions, grace and
//! immediate cancellations and revocations at random seconds, service credits, adjustments, card
//! refunds completed or refused, disputes opened and closed, clock advances from seconds to days
//! (with the due work), and crashes (every in-memory state dropped; the process goes on from the
//! log). After every step the system is compared with the reference model (`model`): wallets,
//! servers and every charge; every `deep_check_every` steps and at the end also the holds, the read
//! models, the books per currency, the hash chain and a replay of every read model. The same seed
//! and steps replay the same run.

pub mod model;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use app::flows::{FlowError, Flows};
use app::handler::{CommandHandler, Metadata};
use chrono::{DateTime, Duration, Utc};
use domain::provider::{ProviderError, ProviderFuture, ProvisionRequest, ServerAction, ServerProvider};
use domain::{AccountCommand, AccountId, Clock, Country, Currency, Hostname, ManualClock, Money, OrderId, PlanId, ServerId, TopUpId};
use ledger::testing::TestDatabase;
use model::{Model, Payment, Reason, Status};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use uuid::Uuid;

/// Steps between checks of the read models and replays (each is a full replay), by default.
pub const DEEP_CHECK_EVERY: u64 = 100;
/// Accounts the simulation opens at most.
const ACCOUNTS_MAX: usize = 6;

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub seed: u64,
    pub steps: u64,
    /// Steps between deep checks (read models, books, chain, replays); always at the end.
    pub deep_check_every: u64,
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub steps: u64,
    pub operations: HashMap<&'static str, u64>,
    pub simulated: Duration,
    pub events: i64,
}

/// A disagreement between the system and the model, or a broken invariant: a bug in one of them.
#[derive(Debug)]
pub struct Violation {
    pub seed: u64,
    pub step: u64,
    pub operation: String,
    pub what: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "violation at step {} ({}): {}\nreplay: cargo run --release -p sim -- --seed {} --steps {}",
            self.step,
            self.operation,
            self.what,
            self.seed,
            self.step + 1
        )
    }
}

/// The VPS provider as the simulation's outside world: each order's provisioning succeeds, is
/// refused, or times out on each attempt, as decided by the seed and the order (not by the
/// timing of calls), and it remembers what it answered.
struct Provider {
    seed: u64,
    /// Our server id -> the simulation's index of the server.
    index_of: Mutex<HashMap<ServerId, usize>>,
    attempts: Mutex<HashMap<ServerId, u32>>,
    /// Servers the provider made (index), and refused for good.
    made: Mutex<Vec<usize>>,
    refused: Mutex<Vec<usize>>,
}

impl Provider {
    fn outcome(&self, server: usize, attempt: u32) -> u32 {
        let mut rng = StdRng::seed_from_u64(self.seed ^ (server as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(attempt));
        rng.gen_range(0..100)
    }
}

impl ServerProvider for Provider {
    fn provision(&self, request: ProvisionRequest) -> ProviderFuture<'_, String> {
        Box::pin(async move {
            let index = self.index_of.lock().unwrap()[&request.server_id];
            let attempt = {
                let mut attempts = self.attempts.lock().unwrap();
                let attempt = attempts.entry(request.server_id).or_default();
                *attempt += 1;
                *attempt
            };
            match self.outcome(index, attempt) {
                0..=14 => {
                    self.refused.lock().unwrap().push(index);
                    Err(ProviderError::Permanent("no capacity".into()))
                }
                15..=29 => Err(ProviderError::Retryable("timed out".into())),
                _ => {
                    self.made.lock().unwrap().push(index);
                    Ok(format!("sim-{index}"))
                }
            }
        })
    }

    fn act(&self, _provider_server_id: &str, _action: ServerAction) -> ProviderFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

struct Sim {
    seed: u64,
    rng: StdRng,
    db: TestDatabase,
    clock: Arc<ManualClock>,
    flows: Flows,
    provider: Provider,
    model: Model,
    accounts: Vec<AccountId>,
    servers: Vec<(ServerId, OrderId)>,
    topups: Vec<(usize, TopUpId)>,
    refunds: Vec<(usize, domain::RefundId)>,
    events_sent: u64,
    step: u64,
    operation: &'static str,
    /// The charges already compared with the model: the log's position up to which they were read,
    /// and each (server, slot) seen.
    charges_checked_to: i64,
    charges_seen: std::collections::HashSet<(usize, DateTime<Utc>)>,
}

fn system() -> Metadata {
    Metadata::actor("system", "simulation")
}

async fn open_flows(db: &TestDatabase, clock: Arc<ManualClock>) -> Flows {
    let log = ledger::EventLog::open(db.pool.clone(), ledger::LogConfig::default())
        .await
        .expect("the log opens");
    Flows::new(CommandHandler::new(log, clock))
}

/// Runs one seed; a violation names its step and how to replay it.
pub async fn run(options: Options) -> Result<Report, Violation> {
    let db = TestDatabase::new().await;
    let start: DateTime<Utc> = "2027-01-01T00:00:00Z".parse().expect("an instant");
    let clock = Arc::new(ManualClock::new(start));
    let flows = open_flows(&db, clock.clone()).await;
    let fixtures = domain::catalog::Fixtures::parse(include_str!("../../fixtures/plans.toml"), include_str!("../../fixtures/tax.toml"))
        .expect("the fixtures parse");
    flows.sync_catalog(fixtures, &system()).await.expect("the catalogue");
    let mut sim = Sim {
        seed: options.seed,
        rng: StdRng::seed_from_u64(options.seed),
        db,
        clock,
        flows,
        provider: Provider {
            seed: options.seed,
            index_of: Mutex::default(),
            attempts: Mutex::default(),
            made: Mutex::default(),
            refused: Mutex::default(),
        },
        model: Model::default(),
        accounts: Vec::new(),
        servers: Vec::new(),
        topups: Vec::new(),
        refunds: Vec::new(),
        events_sent: 0,
        step: 0,
        operation: "start",
        charges_checked_to: 0,
        charges_seen: Default::default(),
    };
    let mut report = Report::default();
    for step in 0..options.steps {
        sim.step = step;
        let operation = sim.pick();
        sim.operation = operation;
        *report.operations.entry(operation).or_default() += 1;
        sim.perform(operation).await.map_err(|what| sim.violation(what))?;
        sim.check().await.map_err(|what| sim.violation(what))?;
        if (step + 1) % options.deep_check_every.max(1) == 0 {
            sim.deep_check().await.map_err(|what| sim.violation(what))?;
        }
    }
    sim.operation = "final check";
    sim.deep_check().await.map_err(|what| sim.violation(what))?;
    report.steps = options.steps;
    report.simulated = sim.clock.now() - start;
    report.events = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&sim.db.pool)
        .await
        .unwrap_or(0);
    Ok(report)
}

type Step = Result<(), String>;

impl Sim {
    fn violation(&self, what: String) -> Violation {
        Violation {
            seed: self.seed,
            step: self.step,
            operation: self.operation.to_string(),
            what,
        }
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn id(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.gen()).into_uuid()
    }

    fn pick(&mut self) -> &'static str {
        if self.accounts.is_empty() {
            return "open";
        }
        let choices: &[(&'static str, u32)] = &[
            ("open", 2),
            ("topup", 10),
            ("redeliver", 3),
            ("order", 8),
            ("dispatch", 8),
            ("setup", 4),
            ("power", 4),
            ("cancel", 5),
            ("revoke", 4),
            ("credit", 4),
            ("adjust", 5),
            ("card_refund", 3),
            ("settle_refund", 3),
            ("dispute", 2),
            ("close_dispute", 2),
            ("advance", 20),
            ("crash", 2),
        ];
        let total: u32 = choices.iter().map(|(_, weight)| weight).sum();
        let mut roll = self.rng.gen_range(0..total);
        for (name, weight) in choices {
            if roll < *weight {
                return name;
            }
            roll -= weight;
        }
        unreachable!("the weights add up")
    }

    async fn perform(&mut self, operation: &'static str) -> Step {
        match operation {
            "open" => self.open().await,
            "topup" => self.topup().await,
            "redeliver" => self.redeliver().await,
            "order" => self.order().await,
            "dispatch" => self.dispatch().await,
            "setup" => self.setup().await,
            "power" => self.power().await,
            "cancel" => self.cancel().await,
            "revoke" => self.revoke().await,
            "credit" => self.credit().await,
            "adjust" => self.adjust().await,
            "card_refund" => self.card_refund().await,
            "settle_refund" => self.settle_refund().await,
            "dispute" => self.dispute().await,
            "close_dispute" => self.close_dispute().await,
            "advance" => self.advance().await,
            "crash" => {
                self.flows = open_flows(&self.db, self.clock.clone()).await;
                Ok(())
            }
            other => unreachable!("no operation {other}"),
        }
    }

    fn any_account(&mut self) -> usize {
        self.rng.gen_range(0..self.accounts.len())
    }

    /// A random amount with up to six decimals, below `max`.
    fn amount(&mut self, max_cents: i64) -> Decimal {
        let micros = self.rng.gen_range(1..=max_cents * 10_000);
        // Mostly whole cents, sometimes micro-units.
        if self.rng.gen_bool(0.8) {
            Decimal::new(micros / 10_000 + 1, 2)
        } else {
            Decimal::new(micros, 6)
        }
    }

    async fn open(&mut self) -> Step {
        if self.accounts.len() >= ACCOUNTS_MAX {
            return Ok(());
        }
        let (currency, code) = [(Currency::USD, "USD"), (Currency::AUD, "AUD"), (Currency::EUR, "EUR")][self.rng.gen_range(0..3)];
        let country = ["US", "AU", "DE", "GB", "NZ", "FR"][self.rng.gen_range(0..6)];
        let account_id = AccountId(self.id());
        self.flows
            .open_account(
                account_id,
                "Sim",
                "sim@example.com",
                currency,
                Country::parse(country).unwrap(),
                &system(),
            )
            .await
            .map_err(|error| format!("opening an account: {error}"))?;
        self.accounts.push(account_id);
        self.model.accounts.push(model::Account {
            currency: code,
            country,
            balance: Decimal::ZERO,
            reserved: Decimal::ZERO,
            topups: Vec::new(),
            card_refunds: Vec::new(),
            disputes: Vec::new(),
            disputed: false,
        });
        Ok(())
    }

    async fn topup(&mut self) -> Step {
        let account = self.any_account();
        let amount = Decimal::new(self.rng.gen_range(1..=2_000), 2);
        let payment = match self.rng.gen_range(0..10) {
            0 => Payment::OtherCurrency,
            1 => Payment::OtherAmount,
            _ => Payment::AsAsked,
        };
        let topup_id = TopUpId(self.id());
        self.flows
            .request_topup(
                self.accounts[account],
                topup_id,
                amount,
                format!("https://checkout.invalid/{topup_id}"),
                &system(),
            )
            .await
            .map_err(|error| format!("requesting a top-up: {error}"))?;
        self.topups.push((account, topup_id));
        self.model.accounts[account].topups.push(model::TopUp {
            amount,
            payment,
            paid: false,
            held: false,
            refunded: Decimal::ZERO,
        });
        let topup = self.topups.len() - 1;
        self.pay(topup, None).await
    }

    /// Delivers the payment of a top-up (a new event, or `again` an earlier event's id).
    async fn pay(&mut self, topup: usize, again: Option<String>) -> Step {
        let (account, topup_id) = self.topups[topup];
        let record = self.model_topup(topup).expect("a known top-up").clone();
        let currency = Currency::parse(self.model.accounts[account].currency).unwrap();
        let stated = match record.payment {
            Payment::AsAsked => vec![Money {
                amount: record.amount,
                currency,
            }],
            Payment::OtherCurrency => vec![Money {
                amount: record.amount * Decimal::from(150),
                currency: Currency::JPY,
            }],
            Payment::OtherAmount => vec![Money {
                amount: record.amount + Decimal::ONE,
                currency,
            }],
        };
        let event_id = again.unwrap_or_else(|| {
            self.events_sent += 1;
            format!("evt_sim_{}", self.events_sent)
        });
        let receipt = serde_json::json!({"provider": "stripe", "event_id": event_id, "event_type": "checkout.session.completed"});
        let payment_id = format!("pi_sim_{topup}");
        let fresh = self
            .flows
            .receive_payment_event(
                &format!("stripe-event-{event_id}"),
                receipt,
                Some((topup_id, payment_id, stated)),
                &system(),
            )
            .await
            .map_err(|error| format!("delivering a payment: {error}"))?;
        if !fresh {
            return Ok(());
        }
        let model_topup = self.model_topup_mut(topup);
        if !model_topup.paid && !model_topup.held {
            if record.payment == Payment::AsAsked {
                model_topup.paid = true;
                self.model.accounts[account].balance += record.amount;
            } else {
                model_topup.held = true;
            }
        }
        // As the webhook route does: a paid checkout may resume the account's servers.
        app::workers::resume_affordable(&self.flows, Some(self.accounts[account]))
            .await
            .map_err(|error| format!("resuming after a top-up: {error}"))?;
        self.model.resume_affordable(account, self.now());
        Ok(())
    }

    async fn redeliver(&mut self) -> Step {
        if self.topups.is_empty() {
            return Ok(());
        }
        let topup = self.rng.gen_range(0..self.topups.len());
        // The same event again, or another event for the same payment.
        let again = self.rng.gen_bool(0.5).then(|| format!("evt_sim_redelivered_{topup}"));
        self.pay(topup, again).await
    }

    fn live_server(&mut self) -> Option<usize> {
        let live: Vec<usize> = self.model.servers.iter().filter(|s| s.live()).map(|s| s.index).collect();
        if live.is_empty() {
            return None;
        }
        Some(live[self.rng.gen_range(0..live.len())])
    }

    async fn order(&mut self) -> Step {
        let account = self.any_account();
        if self.model.server_of(account).is_some() {
            return Ok(());
        }
        let plan = ["vps-1g", "vps-2g"][self.rng.gen_range(0..2)];
        let (net, tax) = self.model.first_hour(account, plan);
        let affordable = self.model.accounts[account].available() >= net + tax;
        let (order_id, server_id) = (OrderId(self.id()), ServerId(self.id()));
        let index = self.servers.len();
        self.provider.index_of.lock().unwrap().insert(server_id, index);
        let result = self
            .flows
            .place_order(
                self.accounts[account],
                PlanId::parse(plan).unwrap(),
                domain::Location::parse("syd").unwrap(),
                order_id,
                server_id,
                &system(),
            )
            .await;
        match (result, affordable) {
            (Ok(()), true) => {}
            (Err(FlowError::Account(domain::AccountError::InsufficientFunds { .. })), false) => {
                self.provider.index_of.lock().unwrap().remove(&server_id);
                return Ok(());
            }
            (result, affordable) => return Err(format!("an order the model finds affordable={affordable} answered {result:?}")),
        }
        self.servers.push((server_id, order_id));
        self.model.accounts[account].reserved += net + tax;
        self.model.servers.push(model::Server {
            index,
            account,
            plan,
            provisioned: false,
            failed: false,
            deleted: false,
            set_up: false,
            powered_on: false,
            suspended: None,
            cancellation: None,
            hold: (net, tax),
            hold_ended: false,
            charges: Default::default(),
            month_net: Default::default(),
            billable_from: model::slot_of(self.now()),
        });
        Ok(())
    }

    async fn dispatch(&mut self) -> Step {
        let policy = app::workers::RetryPolicy {
            attempts_max: 3,
            backoff_base: std::time::Duration::from_millis(1),
            backoff_max: std::time::Duration::from_millis(1),
            lease: std::time::Duration::from_secs(60),
        };
        let parties = app::outbox::Parties {
            provider: &self.provider,
            payments: None,
        };
        // Until nothing is left to send (a retried row is due again a millisecond later).
        for _ in 0..50 {
            app::outbox::dispatch(&self.flows, parties, policy)
                .await
                .map_err(|error| format!("dispatching: {error}"))?;
            let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE status = 'pending'")
                .fetch_one(&self.db.pool)
                .await
                .map_err(|error| error.to_string())?;
            if pending == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let now = self.now();
        let made: Vec<usize> = std::mem::take(&mut *self.provider.made.lock().unwrap());
        for server in made {
            self.model.provisioned(server, now);
        }
        let refused: Vec<usize> = std::mem::take(&mut *self.provider.refused.lock().unwrap());
        let mut ended: Vec<usize> = refused;
        // Given up after its attempts: released.
        for server in 0..self.model.servers.len() {
            let record = &self.model.servers[server];
            if !record.hold_ended
                && self
                    .provider
                    .attempts
                    .lock()
                    .unwrap()
                    .get(&self.servers[server].0)
                    .copied()
                    .unwrap_or(0)
                    >= 3
            {
                ended.push(server);
            }
        }
        for server in ended {
            if !self.model.servers[server].hold_ended {
                self.model.provisioning_failed(server);
            }
        }
        Ok(())
    }

    async fn setup(&mut self) -> Step {
        let Some(server) = self.live_server() else {
            return Ok(());
        };
        let expected = self.model.servers[server].status() == Status::NeedsSetup;
        let result = self
            .flows
            .setup(
                self.servers[server].0,
                "ubuntu-24.04",
                Hostname::parse("sim-host").unwrap(),
                &system(),
            )
            .await;
        match (result, expected) {
            (Ok(()), true) => {
                self.model.servers[server].set_up = true;
                self.model.servers[server].powered_on = true;
                Ok(())
            }
            (Err(FlowError::Server(_)), false) => Ok(()),
            (result, expected) => Err(format!("a setup expected={expected} answered {result:?}")),
        }
    }

    async fn power(&mut self) -> Step {
        let Some(server) = self.live_server() else {
            return Ok(());
        };
        let action = [
            domain::server::PowerAction::Boot,
            domain::server::PowerAction::Shutdown,
            domain::server::PowerAction::Reboot,
        ][self.rng.gen_range(0..3)];
        let record = &self.model.servers[server];
        let expected = match (record.status(), action, record.powered_on) {
            (Status::Running | Status::Stopped, domain::server::PowerAction::Boot, false) => Some(true),
            (Status::Running | Status::Stopped, domain::server::PowerAction::Shutdown, true) => Some(false),
            (Status::Running | Status::Stopped, domain::server::PowerAction::Reboot, true) => Some(true),
            _ => None,
        };
        let result = self.flows.power(self.servers[server].0, action, &system()).await;
        match (result, expected) {
            (Ok(()), Some(on)) => {
                self.model.servers[server].powered_on = on;
                Ok(())
            }
            (Err(FlowError::Server(_)), None) => Ok(()),
            (result, expected) => Err(format!("{action:?} expected={expected:?} answered {result:?}")),
        }
    }

    /// Moves the clock a random number of seconds within the hour (cancellations and revocations
    /// happen at random seconds).
    fn nudge(&mut self) {
        let seconds = self.rng.gen_range(0..120);
        self.clock.advance(Duration::seconds(seconds)).expect("forwards");
    }

    async fn cancel(&mut self) -> Step {
        let Some(server) = self.live_server() else {
            return Ok(());
        };
        self.nudge();
        let grace = self.rng.gen_bool(0.7);
        let mode = if grace {
            domain::server::CancellationMode::Grace
        } else {
            domain::server::CancellationMode::Immediate
        };
        let expected = self.model.cancel(server, grace, self.now());
        let result = self.flows.cancel(self.servers[server].0, mode, &system()).await;
        match (result, expected) {
            (Ok(()), true) | (Err(FlowError::Server(_)), false) => Ok(()),
            (result, expected) => Err(format!("a cancellation expected={expected} answered {result:?}")),
        }
    }

    async fn revoke(&mut self) -> Step {
        let Some(server) = self.live_server() else {
            return Ok(());
        };
        self.nudge();
        let expected = self.model.revoke(server, self.now());
        let result = self.flows.revoke_cancellation(self.servers[server].0, &system()).await;
        match (&result, expected) {
            (Ok(_), Some(_)) | (Err(FlowError::Server(_)), None) => Ok(()),
            (result, expected) => Err(format!("a revocation expected {expected:?} answered {result:?}")),
        }
    }

    async fn credit(&mut self) -> Step {
        let Some(server) = self.live_server() else {
            return Ok(());
        };
        let slots: Vec<DateTime<Utc>> = self.model.servers[server].charges.keys().copied().collect();
        if slots.is_empty() {
            return Ok(());
        }
        let slot = slots[self.rng.gen_range(0..slots.len())];
        let charge_id: Option<String> = sqlx::query_scalar(
            "SELECT payload->>'charge_id' FROM events WHERE stream_id = $1 AND event_type IN ('HourCharged', 'HoldCaptured') \
             AND payload->>'server_id' = $2 AND (payload->>'slot')::timestamptz = $3",
        )
        .bind(self.accounts[self.model.servers[server].account].stream_id())
        .bind(self.servers[server].0.to_string())
        .bind(slot)
        .fetch_optional(&self.db.pool)
        .await
        .map_err(|error| error.to_string())?;
        let Some(charge_id) = charge_id else {
            return Err(format!("the model's charge of {slot} is not in the log"));
        };
        let charge_id = domain::ChargeId::parse(&charge_id).unwrap();
        let amount = self.amount(3);
        let charge = self.model.servers[server].charges[&slot].clone();
        let expected = amount <= charge.net + charge.tax - charge.refunded;
        let account = self.model.servers[server].account;
        let result = self
            .flows
            .service_credit(self.accounts[account], charge_id, amount, "simulated outage", &system())
            .await;
        match (result, expected) {
            (Ok(_), true) => {
                self.model.servers[server].charges.get_mut(&slot).unwrap().refunded += amount;
                self.model.accounts[account].balance += amount;
                Ok(())
            }
            (Err(FlowError::Account(domain::AccountError::RefundExceedsCharge { .. })), false) => Ok(()),
            (result, expected) => Err(format!("a credit of {amount} expected={expected} answered {result:?}")),
        }
    }

    async fn adjust(&mut self) -> Step {
        let account = self.any_account();
        let mut amount = self.amount(2_000);
        if self.rng.gen_bool(0.4) {
            amount = -amount;
        }
        let expected = amount > Decimal::ZERO || -amount <= self.model.accounts[account].available();
        let result = self.flows.adjust(self.accounts[account], amount, "simulated", &system()).await;
        match (result, expected) {
            (Ok(_), true) => {
                self.model.accounts[account].balance += amount;
                Ok(())
            }
            (Err(FlowError::Account(domain::AccountError::InsufficientFunds { .. })), false) => Ok(()),
            (result, expected) => Err(format!("an adjustment of {amount} expected={expected} answered {result:?}")),
        }
    }

    async fn card_refund(&mut self) -> Step {
        let paid: Vec<usize> = (0..self.topups.len())
            .filter(|topup| {
                let (account, _) = self.topups[*topup];
                self.model_topup(*topup).map(|t| t.paid).unwrap_or(false) && account < self.model.accounts.len()
            })
            .collect();
        if paid.is_empty() {
            return Ok(());
        }
        let topup = paid[self.rng.gen_range(0..paid.len())];
        let (account, topup_id) = self.topups[topup];
        let record = self.model_topup(topup).unwrap().clone();
        let cents = rust_decimal::prelude::ToPrimitive::to_i64(&(record.amount * Decimal::from(100)))
            .unwrap_or(100)
            .max(1);
        // Up to the top-up, and now and then more than is left of it.
        let amount = Decimal::new(self.rng.gen_range(1..=cents + 100), 2);
        let available = self.model.accounts[account].available();
        let expected = amount <= record.amount - record.refunded && amount <= available;
        let result = self
            .flows
            .request_card_refund(self.accounts[account], topup_id, amount, "simulated", &system())
            .await;
        match (result, expected) {
            (Ok(refund_id), true) => {
                self.model.accounts[account].balance -= amount;
                self.model_topup_mut(topup).refunded += amount;
                self.refunds.push((account, refund_id));
                self.model.accounts[account].card_refunds.push(model::CardRefund {
                    topup,
                    amount,
                    settled: false,
                });
                Ok(())
            }
            (
                Err(FlowError::Account(domain::AccountError::InsufficientFunds { .. } | domain::AccountError::RefundExceedsTopUp { .. })),
                false,
            ) => Ok(()),
            (result, expected) => Err(format!("a card refund of {amount} expected={expected} answered {result:?}")),
        }
    }

    fn model_topup(&self, topup: usize) -> Option<&model::TopUp> {
        let (account, _) = self.topups[topup];
        let index = self.topups.iter().take(topup + 1).filter(|(a, _)| *a == account).count() - 1;
        self.model.accounts[account].topups.get(index)
    }

    fn model_topup_mut(&mut self, topup: usize) -> &mut model::TopUp {
        let (account, _) = self.topups[topup];
        let index = self.topups.iter().take(topup + 1).filter(|(a, _)| *a == account).count() - 1;
        &mut self.model.accounts[account].topups[index]
    }

    async fn settle_refund(&mut self) -> Step {
        let open: Vec<usize> = (0..self.refunds.len())
            .filter(|refund| {
                let (account, _) = self.refunds[*refund];
                let index = self.refunds.iter().take(refund + 1).filter(|(a, _)| *a == account).count() - 1;
                !self.model.accounts[account].card_refunds[index].settled
            })
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        let refund = open[self.rng.gen_range(0..open.len())];
        let (account, refund_id) = self.refunds[refund];
        let index = self.refunds.iter().take(refund + 1).filter(|(a, _)| *a == account).count() - 1;
        let succeeded = self.rng.gen_bool(0.7);
        self.events_sent += 1;
        let event_id = format!("evt_sim_{}", self.events_sent);
        let receipt = serde_json::json!({"provider": "stripe", "event_id": event_id, "event_type": "refund.updated"});
        self.flows
            .receive_refund_event(
                &format!("stripe-event-{event_id}"),
                receipt,
                self.accounts[account],
                refund_id,
                succeeded,
                &system(),
            )
            .await
            .map_err(|error| format!("settling a card refund: {error}"))?;
        let record = self.model.accounts[account].card_refunds[index].clone();
        self.model.accounts[account].card_refunds[index].settled = true;
        if !succeeded {
            self.model.accounts[account].balance += record.amount;
            self.model_topup_mut(record.topup).refunded -= record.amount;
        }
        Ok(())
    }

    async fn dispute(&mut self) -> Step {
        let paid: Vec<usize> = (0..self.topups.len())
            .filter(|t| self.model_topup(*t).is_some_and(|t| t.paid))
            .collect();
        if paid.is_empty() {
            return Ok(());
        }
        let topup = paid[self.rng.gen_range(0..paid.len())];
        let (account, _) = self.topups[topup];
        if self.model.accounts[account].disputes.iter().any(|d| d.topup == topup) {
            return Ok(());
        }
        // An inquiry withdraws nothing; a chargeback the whole payment.
        let inquiry = self.rng.gen_bool(0.3);
        let amount = self.model_topup(topup).unwrap().amount;
        let withdrawn = if inquiry { Decimal::ZERO } else { amount };
        let servers = self.billable_servers(account);
        self.sync_dispute(account, topup, withdrawn, Decimal::ZERO, None, &servers, &[])
            .await?;
        // What the servers owe until now is charged before the dispute moves money.
        let now = self.now();
        for server in &servers {
            self.model.catch_up(*server, now);
        }
        let servers = self.billable_servers(account);
        self.model.accounts[account].balance -= withdrawn;
        self.model.accounts[account].disputes.push(model::Dispute {
            topup,
            withdrawn,
            reinstated: Decimal::ZERO,
            closed: false,
        });
        if withdrawn > Decimal::ZERO {
            self.model.accounts[account].disputed = true;
            let now = self.now();
            for server in servers {
                self.model.servers[server].suspended = Some((Reason::Dispute, now));
            }
        }
        Ok(())
    }

    fn billable_servers(&self, account: usize) -> Vec<usize> {
        self.model
            .servers
            .iter()
            .filter(|server| server.account == account && server.billable())
            .map(|server| server.index)
            .collect()
    }

    async fn sync_dispute(
        &mut self,
        account: usize,
        topup: usize,
        withdrawn: Decimal,
        reinstated: Decimal,
        closed: Option<bool>,
        servers: &[usize],
        suspended: &[usize],
    ) -> Step {
        self.events_sent += 1;
        let event_id = format!("evt_sim_{}", self.events_sent);
        let receipt = serde_json::json!({"provider": "stripe", "event_id": event_id, "event_type": "charge.dispute"});
        let dispute_id = domain::DisputeId(Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("sim-dispute-{topup}").as_bytes()));
        let report = AccountCommand::SyncDispute {
            dispute_id,
            payment_id: format!("pi_sim_{topup}"),
            withdrawn_total: withdrawn,
            reinstated_total: reinstated,
            closed,
        };
        let servers: Vec<ServerId> = servers.iter().map(|server| self.servers[*server].0).collect();
        let suspended: Vec<ServerId> = suspended.iter().map(|server| self.servers[*server].0).collect();
        self.flows
            .receive_dispute_event(
                &format!("stripe-event-{event_id}"),
                receipt,
                self.accounts[account],
                report,
                &servers,
                &suspended,
                &system(),
            )
            .await
            .map_err(|error| format!("a dispute event: {error}"))?;
        Ok(())
    }

    async fn close_dispute(&mut self) -> Step {
        let open: Vec<(usize, usize)> = self
            .model
            .accounts
            .iter()
            .enumerate()
            .flat_map(|(account, record)| {
                record
                    .disputes
                    .iter()
                    .enumerate()
                    .filter(|(_, dispute)| !dispute.closed)
                    .map(move |(index, _)| (account, index))
            })
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        let (account, index) = open[self.rng.gen_range(0..open.len())];
        let dispute = self.model.accounts[account].disputes[index].clone();
        let won = self.rng.gen_bool(0.5);
        let reinstated = if won { dispute.withdrawn } else { Decimal::ZERO };
        let suspended: Vec<usize> = self
            .model
            .servers
            .iter()
            .filter(|server| server.account == account && server.status() == Status::Suspended)
            .filter(|server| matches!(server.suspended, Some((Reason::Dispute, _))))
            .map(|server| server.index)
            .collect();
        self.sync_dispute(account, dispute.topup, dispute.withdrawn, reinstated, Some(won), &[], &suspended)
            .await?;
        self.model.accounts[account].balance += reinstated;
        self.model.accounts[account].disputes[index].closed = true;
        self.model.accounts[account].disputes[index].reinstated = reinstated;
        // Settled, and no other dispute of the account holding funds: the servers suspended for
        // disputes come back, in the same append.
        let holding = self.model.accounts[account]
            .disputes
            .iter()
            .any(|dispute| !dispute.closed && dispute.withdrawn > dispute.reinstated);
        if !holding {
            let now = self.now();
            for server in suspended {
                self.model.resume(server, now);
            }
        }
        Ok(())
    }

    async fn advance(&mut self) -> Step {
        let seconds = match self.rng.gen_range(0..10) {
            0..=3 => self.rng.gen_range(1..900),
            4..=7 => self.rng.gen_range(900..6 * 3600),
            _ => self.rng.gen_range(6 * 3600..3 * 24 * 3600),
        };
        self.clock.advance(Duration::seconds(seconds)).expect("forwards");
        let now = self.now();
        app::workers::run_due(&self.flows, now)
            .await
            .map_err(|error| format!("the due work: {error}"))?;
        self.model.run_due(now);
        Ok(())
    }

    /// After every step: each wallet and server as the model has it, from the log.
    async fn check(&mut self) -> Step {
        for (index, account_id) in self.accounts.iter().enumerate() {
            let account = self
                .flows
                .handler
                .load::<domain::Account>(&account_id.stream_id())
                .await
                .map_err(|error| error.to_string())?;
            let expected = &self.model.accounts[index];
            if (account.state.balance(), account.state.reserved()) != (expected.balance, expected.reserved) {
                return Err(format!(
                    "account {index} ({account_id}): balance {} reserved {}, the model says {} and {}",
                    account.state.balance(),
                    account.state.reserved(),
                    expected.balance,
                    expected.reserved
                ));
            }
            if account.state.balance() < Decimal::ZERO && !expected.disputed {
                return Err(format!(
                    "account {index} is below zero without a dispute: {}",
                    account.state.balance()
                ));
            }
        }
        for (index, (server_id, _)) in self.servers.iter().enumerate() {
            let server = self
                .flows
                .handler
                .load::<domain::Server>(&server_id.stream_id())
                .await
                .map_err(|error| error.to_string())?;
            let status = server.state.status().map(|status| status.as_str()).unwrap_or("none");
            let expected = format!("{:?}", self.model.servers[index].status());
            if status.replace('_', "") != expected.to_lowercase() {
                return Err(format!("server {index}: {status}, the model says {expected}"));
            }
        }
        // Every (server, slot) charged once, exactly the slots the model charged, at its figures
        // (the charges appended since the last step are read; those before were compared then).
        let charged: Vec<(i64, String, DateTime<Utc>, Decimal, Decimal)> = sqlx::query_as(
            "SELECT position, payload->>'server_id', (payload->>'slot')::timestamptz, (payload->>'net')::numeric, \
                    (payload->>'tax')::numeric \
             FROM events WHERE position > $1 AND event_type IN ('HourCharged', 'HoldCaptured') ORDER BY position",
        )
        .bind(self.charges_checked_to)
        .fetch_all(&self.db.pool)
        .await
        .map_err(|error| error.to_string())?;
        let index_of: HashMap<String, usize> = self.servers.iter().enumerate().map(|(i, (id, _))| (id.to_string(), i)).collect();
        for (position, server_id, slot, net, tax) in charged {
            self.charges_checked_to = position;
            let server = index_of[&server_id];
            if !self.charges_seen.insert((server, slot)) {
                return Err(format!("server {server} charged twice for {slot}"));
            }
            match self.model.servers[server].charges.get(&slot) {
                Some(charge) if (charge.net, charge.tax) == (net, tax) => {}
                Some(charge) => {
                    return Err(format!(
                        "server {server} charged {net} + {tax} for {slot}, the model {} + {}",
                        charge.net, charge.tax
                    ))
                }
                None => return Err(format!("server {server} charged for {slot}, which the model did not bill")),
            }
        }
        let modelled: usize = self.model.servers.iter().map(|server| server.charges.len()).sum();
        if self.charges_seen.len() != modelled {
            return Err(format!("{} slots charged, the model billed {modelled}", self.charges_seen.len()));
        }
        Ok(())
    }

    /// The read models caught up and equal to the model; the books per currency; the replay.
    async fn deep_check(&mut self) -> Step {
        // Every hold ended at most once.
        let twice: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT payload->>'order_id' FROM events WHERE event_type IN ('HoldCaptured', 'HoldReleased') \
             GROUP BY 1 HAVING count(*) > 1) t",
        )
        .fetch_one(&self.db.pool)
        .await
        .map_err(|error| error.to_string())?;
        if twice > 0 {
            return Err(format!("{twice} holds ended twice"));
        }
        // And every order the model knows ended, ended one way.
        let ended: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type IN ('HoldCaptured', 'HoldReleased')")
            .fetch_one(&self.db.pool)
            .await
            .map_err(|error| error.to_string())?;
        let modelled = self.model.servers.iter().filter(|server| server.hold_ended).count() as i64;
        if ended != modelled {
            return Err(format!("{ended} holds ended, the model ended {modelled}"));
        }
        projections::runner::catch_up_all(&self.db.pool)
            .await
            .map_err(|error| format!("catching up: {error}"))?;
        for (index, account_id) in self.accounts.iter().enumerate() {
            let row: (Decimal, Decimal) = sqlx::query_as("SELECT balance, reserved FROM rm.balances WHERE account_id = $1")
                .bind(account_id.0)
                .fetch_one(&self.db.pool)
                .await
                .map_err(|error| error.to_string())?;
            let expected = &self.model.accounts[index];
            if row != (expected.balance, expected.reserved) {
                return Err(format!(
                    "rm.balances of account {index}: {row:?}, the model ({}, {})",
                    expected.balance, expected.reserved
                ));
            }
        }
        let books = projections::queries::trial_balance(&self.db.pool, None)
            .await
            .map_err(|error| error.to_string())?;
        for currency in &books.currencies {
            if currency.total_debit != currency.total_credit {
                return Err(format!("the {} books do not balance: {currency:?}", currency.currency));
            }
            let wallets: Decimal = currency
                .accounts
                .iter()
                .filter(|line| line.account.starts_with("liabilities:wallets:"))
                .map(|line| line.credit - line.debit)
                .sum();
            let modelled: Decimal = self
                .model
                .accounts
                .iter()
                .filter(|account| account.currency == currency.currency)
                .map(|account| account.balance)
                .sum();
            if wallets != modelled {
                return Err(format!(
                    "the {} wallets add up to {wallets}, the model's to {modelled}",
                    currency.currency
                ));
            }
        }
        let chain = ledger::verify::verify_chain(&self.db.pool, None, |_, _| {})
            .await
            .map_err(|error| error.to_string())?;
        if !chain.ok {
            return Err(format!("the hash chain does not verify: {chain:?}"));
        }
        for projection in projections::projection::all() {
            let check = projections::verify::verify(&self.db.pool, projection.as_ref())
                .await
                .map_err(|error| error.to_string())?;
            if !check.differences.is_empty() {
                return Err(format!("{} differs from its replay: {:?}", check.name, check.differences));
            }
        }
        Ok(())
    }
}
