//! The configuration: every setting of the product, read once from the environment and the
//! command's flags (`Config::from_env`). A value that is set but does not parse is an error that
//! names the variable, never a silent default. (Finding PostgreSQL, `DATABASE_URL` and the private
//! cluster, is the log's own business: `ledger::database`; `LOG_FORMAT` is read by the binary's
//! logging before any command runs.)

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::workers::RetryPolicy;

/// The webhook secret of dev mode when `STRIPE_WEBHOOK_SECRET` is unset.
pub use adapters::stripe::webhook::DEV_WEBHOOK_SECRET;

#[derive(Clone, Debug)]
pub struct Config {
    /// `--dev`: the simulated clock, the local checkout, `whsec_dev`.
    pub dev: bool,
    /// `--bind` / `BIND_ADDR`.
    pub bind: String,
    /// `BILLING_BOOTSTRAP_ADMIN_TOKEN`: an admin key with exactly this token exists at start.
    pub bootstrap_admin_token: Option<String>,
    /// `STRIPE_WEBHOOK_SECRET`, or `whsec_dev` in dev mode.
    pub webhook_secret: Option<String>,
    /// `STRIPE_SECRET_KEY` and its companions; none: dev mode's local checkout, or no card payments.
    pub stripe: Option<StripeSettings>,
    /// `PROVIDER` and its companions.
    pub provider: ProviderSettings,
    /// `BILLING_PROVIDER_ATTEMPTS`, `BILLING_PROVIDER_BACKOFF_MS`, `BILLING_OUTBOX_LEASE_SECONDS`.
    pub retry: RetryPolicy,
    /// `BILLING_ORPHAN_SCAN_SECONDS` (default 600).
    pub orphan_scan: Duration,
    /// `BILLING_IDEMPOTENCY_RETENTION_HOURS` (default 24, at least 24), `BILLING_UNPAID_DAYS`
    /// (default 7) and `BILLING_LOW_BALANCE_HOURS` (default 24).
    pub rules: crate::flows::Settings,
    /// `BILLING_RATE_LIMIT_BURST` (default 120) creating requests per token at once, refilled at
    /// `BILLING_RATE_LIMIT_PER_SECOND` (default 2).
    pub rate_limit_burst: u32,
    pub rate_limit_per_second: f64,
    /// `BILLING_DEMO_ACCOUNTS` (default 240, at most 2000): the demo's fleet.
    pub demo_accounts: usize,
    /// `BILLING_SESSION_IDLE_SECONDS` (default 1800) and `BILLING_SESSION_ABSOLUTE_SECONDS`
    /// (default 43200): when a portal or console session ends by itself.
    pub sessions: crate::people::SessionLimits,
    /// `BILLING_STATE_CACHE_MB` (default 32, 1 to 65536): the bytes of aggregate state the
    /// command handler keeps between commands.
    pub state_cache_bytes: u64,
}

#[derive(Clone, Debug)]
pub struct StripeSettings {
    pub secret_key: String,
    /// `STRIPE_API_BASE`: Stripe's own unless pointed elsewhere.
    pub api_base: Option<String>,
    /// `STRIPE_SUCCESS_URL`, `STRIPE_CANCEL_URL`: where Checkout sends the customer back.
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
}

#[derive(Clone, Debug)]
pub enum ProviderSettings {
    /// `PROVIDER=simulated` (the default): `BILLING_SIMULATED_LATENCY_MS` (default 300) and
    /// `BILLING_SIMULATED_FAILING_LOCATIONS` (comma-separated).
    Simulated {
        latency: Duration,
        failing_locations: std::collections::HashSet<String>,
    },
    /// `PROVIDER=virtfusion`: `VIRTFUSION_URL`, `VIRTFUSION_TOKEN`, and optionally
    /// `VIRTFUSION_PACKAGES=vps-1g=1,...`, `VIRTFUSION_HYPERVISOR_GROUPS=syd=1,...`,
    /// `VIRTFUSION_OS_TEMPLATES=ubuntu-24.04=1,...`, `VIRTFUSION_USER_ID`, `VIRTFUSION_TIMEOUT_MS`.
    VirtFusion(adapters::virtfusion::VirtFusionConfig),
}

/// The environment, read through one door.
struct Env;

impl Env {
    /// A value, when set and not empty.
    fn text(&self, name: &str) -> Option<String> {
        self.raw(name).filter(|value| !value.is_empty())
    }

    /// A value as set, empty included (for settings where an empty value is a mistake to name).
    fn raw(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    /// A number, `default` when unset, brought into `range`; set but not a number is an error.
    fn number<T>(&self, name: &str, default: T, min: T, max: T) -> anyhow::Result<T>
    where
        T: FromStr + PartialOrd + Copy,
    {
        let Some(text) = self.text(name) else {
            return Ok(default);
        };
        let value: T = text.trim().parse().map_err(|_| anyhow!("{name} is a number, not {text:?}"))?;
        Ok(if value < min {
            min
        } else if value > max {
            max
        } else {
            value
        })
    }

    /// `KEY=ID,KEY=ID`.
    fn pairs(&self, name: &str, default: &str) -> anyhow::Result<HashMap<String, u64>> {
        let text = self.raw(name).unwrap_or_else(|| default.to_string());
        text.split(',')
            .filter(|pair| !pair.trim().is_empty())
            .map(|pair| {
                let (key, value) = pair.split_once('=').ok_or_else(|| anyhow!("{name}: {pair:?} is not KEY=ID"))?;
                let id = value.trim().parse().map_err(|_| anyhow!("{name}: {value:?} is not a number"))?;
                Ok((key.trim().to_string(), id))
            })
            .collect()
    }
}

/// `BILLING_STATE_CACHE_MB` unless set: the command handler's own default.
const STATE_CACHE_MB_DEFAULT: u64 = crate::handler::STATE_CACHE_BYTES / (1024 * 1024);

impl Config {
    /// The settings of a command run with `--dev` (or not) and `--bind`.
    pub fn from_env(dev: bool, bind: String) -> anyhow::Result<Config> {
        let env = Env;
        let bootstrap_admin_token = env.raw("BILLING_BOOTSTRAP_ADMIN_TOKEN");
        if let Some(token) = &bootstrap_admin_token {
            if token.len() < 16 {
                bail!("BILLING_BOOTSTRAP_ADMIN_TOKEN must be at least 16 characters");
            }
        }
        let stripe = env.text("STRIPE_SECRET_KEY").map(|secret_key| StripeSettings {
            secret_key,
            api_base: env.text("STRIPE_API_BASE"),
            success_url: env.text("STRIPE_SUCCESS_URL"),
            cancel_url: env.text("STRIPE_CANCEL_URL"),
        });
        // Set but empty is a mistake, not a wish for the simulator.
        let provider = match env.raw("PROVIDER").as_deref().unwrap_or("simulated") {
            "simulated" => ProviderSettings::Simulated {
                latency: Duration::from_millis(env.number("BILLING_SIMULATED_LATENCY_MS", 300u64, 0, 60_000)?),
                failing_locations: env
                    .text("BILLING_SIMULATED_FAILING_LOCATIONS")
                    .unwrap_or_default()
                    .split(',')
                    .filter(|location| !location.is_empty())
                    .map(str::to_string)
                    .collect(),
            },
            "virtfusion" => ProviderSettings::VirtFusion(adapters::virtfusion::VirtFusionConfig {
                base_url: env.text("VIRTFUSION_URL").context("PROVIDER=virtfusion needs VIRTFUSION_URL")?,
                token: env.text("VIRTFUSION_TOKEN").context("PROVIDER=virtfusion needs VIRTFUSION_TOKEN")?,
                packages: env.pairs("VIRTFUSION_PACKAGES", "vps-1g=1,vps-2g=2,vps-4g=3,vps-8g=4")?,
                hypervisor_groups: env.pairs("VIRTFUSION_HYPERVISOR_GROUPS", "syd=1,mel=2,sgp=3,fra=4,nyc=5")?,
                user_id: env.number("VIRTFUSION_USER_ID", 1u64, 0, u64::MAX)?,
                os_templates: env.pairs(
                    "VIRTFUSION_OS_TEMPLATES",
                    "ubuntu-24.04=1,ubuntu-22.04=2,debian-12=3,debian-11=4,rocky-9=5,almalinux-9=6",
                )?,
                timeout: Duration::from_millis(env.number("VIRTFUSION_TIMEOUT_MS", 10_000u64, 1, 600_000)?),
            }),
            other => bail!("PROVIDER is simulated or virtfusion, not {other:?}"),
        };
        let demo_accounts = match env.text("BILLING_DEMO_ACCOUNTS") {
            None => 240,
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= 2_000)
                .ok_or_else(|| anyhow!("BILLING_DEMO_ACCOUNTS is a number of accounts up to 2000, not {text:?}"))?,
        };
        Ok(Config {
            state_cache_bytes: env.number("BILLING_STATE_CACHE_MB", STATE_CACHE_MB_DEFAULT, 1, 65_536)? * 1024 * 1024,
            dev,
            bind,
            bootstrap_admin_token,
            webhook_secret: env
                .text("STRIPE_WEBHOOK_SECRET")
                .or_else(|| dev.then(|| DEV_WEBHOOK_SECRET.to_string())),
            stripe,
            provider,
            retry: RetryPolicy {
                attempts_max: env.number("BILLING_PROVIDER_ATTEMPTS", 6u32, 1, 20)?,
                backoff_base: Duration::from_millis(env.number("BILLING_PROVIDER_BACKOFF_MS", 500u64, 1, 60_000)?),
                backoff_max: Duration::from_secs(60),
                lease: Duration::from_secs(env.number("BILLING_OUTBOX_LEASE_SECONDS", 300u64, 1, 3600)?),
            },
            orphan_scan: Duration::from_secs(env.number("BILLING_ORPHAN_SCAN_SECONDS", 600u64, 1, 86_400)?),
            rules: crate::flows::Settings {
                idempotency_retention: chrono::Duration::hours(env.number("BILLING_IDEMPOTENCY_RETENTION_HOURS", 24i64, 24, 24 * 365)?),
                unpaid_days: env.number("BILLING_UNPAID_DAYS", 7i64, 1, 365)?,
                low_balance_hours: env.number("BILLING_LOW_BALANCE_HOURS", 24i64, 1, 24 * 365)?,
            },
            rate_limit_burst: env.number("BILLING_RATE_LIMIT_BURST", 120u32, 1, 1_000_000)?,
            rate_limit_per_second: env.number("BILLING_RATE_LIMIT_PER_SECOND", 2.0f64, 0.001, 1_000_000.0)?,
            demo_accounts,
            sessions: crate::people::SessionLimits {
                idle: chrono::Duration::seconds(env.number("BILLING_SESSION_IDLE_SECONDS", 1800i64, 1, 7 * 86_400)?),
                absolute: chrono::Duration::seconds(env.number("BILLING_SESSION_ABSOLUTE_SECONDS", 43_200i64, 1, 30 * 86_400)?),
            },
        })
    }

    /// The VPS provider the settings name.
    pub fn provider(&self) -> Arc<dyn domain::provider::ServerProvider> {
        match &self.provider {
            ProviderSettings::Simulated {
                latency,
                failing_locations,
            } => Arc::new(adapters::simulated::SimulatedProvider {
                latency: *latency,
                failing_locations: failing_locations.clone(),
            }),
            ProviderSettings::VirtFusion(config) => Arc::new(adapters::virtfusion::VirtFusion::new(config.clone())),
        }
    }

    /// The card processor: Stripe when `STRIPE_SECRET_KEY` is set, else in dev mode the local
    /// checkout page (served at `public_url`), else none (top-ups and card refunds answer 503).
    pub fn payments(&self, public_url: &str) -> anyhow::Result<Option<Arc<dyn domain::payments::PaymentGateway>>> {
        if let Some(stripe) = &self.stripe {
            let gateway = adapters::stripe::StripeGateway::new(adapters::stripe::StripeConfig {
                secret_key: stripe.secret_key.clone(),
                api_base: stripe.api_base.clone(),
                success_url: stripe
                    .success_url
                    .clone()
                    .unwrap_or_else(|| format!("{public_url}/?checkout=done&session={{CHECKOUT_SESSION_ID}}")),
                cancel_url: stripe
                    .cancel_url
                    .clone()
                    .unwrap_or_else(|| format!("{public_url}/?checkout=cancelled")),
                timeout: Duration::from_secs(20),
            })
            .map_err(|error| anyhow!("configuring Stripe: {error}"))?;
            return Ok(Some(Arc::new(gateway)));
        }
        match (self.dev, &self.webhook_secret) {
            (true, Some(secret)) => Ok(Some(Arc::new(adapters::stripe::dev::DevGateway {
                public_url: public_url.to_string(),
                webhook_secret: secret.clone(),
                client: reqwest::Client::new(),
            }))),
            _ => Ok(None),
        }
    }
}
