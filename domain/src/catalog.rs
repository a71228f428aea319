//! The catalogue: plans with their prices over time, tax rules, locations; the `catalog` stream.
//! A charge asks for the price in force at its slot, so repricing never rewrites history.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use cqrs_es::{Aggregate, DomainEvent};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::{Currency, Money, MoneyError};
use crate::types::{Country, Location, ParseError, PlanId, TaxRate};

pub const CATALOG_STREAM: &str = "catalog";

/// A plan's fixed shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSpec {
    pub id: PlanId,
    pub vcpu: u32,
    pub ram_gb: u32,
    pub disk_gb: u32,
}

/// Monthly prices, tax exclusive, by currency.
pub type Prices = BTreeMap<Currency, Decimal>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum CatalogEvent {
    PlanPublished {
        plan: PlanSpec,
        monthly: Prices,
        effective_at: DateTime<Utc>,
    },
    PlanRepriced {
        plan_id: PlanId,
        monthly: Prices,
        effective_at: DateTime<Utc>,
    },
    PlanRetired {
        plan_id: PlanId,
        effective_at: DateTime<Utc>,
    },
    TaxRateSet {
        country: Country,
        rate: TaxRate,
        name: String,
        effective_at: DateTime<Utc>,
    },
    LocationsSet {
        locations: BTreeSet<Location>,
        effective_at: DateTime<Utc>,
    },
}

impl DomainEvent for CatalogEvent {
    fn event_type(&self) -> String {
        match self {
            CatalogEvent::PlanPublished { .. } => "PlanPublished",
            CatalogEvent::PlanRepriced { .. } => "PlanRepriced",
            CatalogEvent::PlanRetired { .. } => "PlanRetired",
            CatalogEvent::TaxRateSet { .. } => "TaxRateSet",
            CatalogEvent::LocationsSet { .. } => "LocationsSet",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1".to_string()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("plan {0} is already published")]
    PlanExists(PlanId),
    #[error("no plan {0}")]
    UnknownPlan(PlanId),
    #[error("plan {0} is retired")]
    PlanRetired(PlanId),
    #[error("no servers are made in {0:?}")]
    UnknownLocation(String),
    #[error("a change effective {effective_at} would precede the last one ({last}): history is not rewritten")]
    BackDated { effective_at: DateTime<Utc>, last: DateTime<Utc> },
    #[error("a plan needs at least one price, each more than zero with at most 6 decimals")]
    BadPrices,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CatalogCommand {
    PublishPlan {
        plan: PlanSpec,
        monthly: Prices,
        effective_at: DateTime<Utc>,
    },
    RepricePlan {
        plan_id: PlanId,
        monthly: Prices,
        effective_at: DateTime<Utc>,
    },
    RetirePlan {
        plan_id: PlanId,
        effective_at: DateTime<Utc>,
    },
    SetTaxRate {
        country: Country,
        rate: TaxRate,
        name: String,
        effective_at: DateTime<Utc>,
    },
    /// Brings the catalogue in line with the fixture files: publishes new plans, reprices changed
    /// ones, sets changed tax rates and locations. Nothing when already in line (idempotent).
    Sync {
        fixtures: Fixtures,
        effective_at: DateTime<Utc>,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct PlanHistory {
    spec: PlanSpec,
    /// (effective from, prices), in effect order.
    prices: Vec<(DateTime<Utc>, Prices)>,
    retired_at: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    plans: BTreeMap<PlanId, PlanHistory>,
    /// Per country: (effective from, rate, name).
    tax: BTreeMap<Country, Vec<(DateTime<Utc>, TaxRate, String)>>,
    locations: BTreeSet<Location>,
    last_change: Option<DateTime<Utc>>,
}

impl Catalog {
    /// The monthly price of `plan` in `currency` in force at `at`.
    pub fn monthly_price(&self, plan: &PlanId, currency: Currency, at: DateTime<Utc>) -> Option<Money> {
        let history = self.plans.get(plan)?;
        let (_, prices) = history.prices.iter().rev().find(|(from, _)| *from <= at)?;
        prices.get(&currency).map(|amount| Money { amount: *amount, currency })
    }

    /// Whether `plan` can be ordered at `at` (published and not retired).
    pub fn orderable(&self, plan: &PlanId, at: DateTime<Utc>) -> Result<&PlanSpec, CatalogError> {
        let history = self.plans.get(plan).ok_or_else(|| CatalogError::UnknownPlan(plan.clone()))?;
        match history.retired_at {
            Some(retired_at) if retired_at <= at => Err(CatalogError::PlanRetired(plan.clone())),
            _ => Ok(&history.spec),
        }
    }

    pub fn tax_rate(&self, country: Country, at: DateTime<Utc>) -> TaxRate {
        self.tax
            .get(&country)
            .and_then(|history| history.iter().rev().find(|(from, _, _)| *from <= at))
            .map(|(_, rate, _)| *rate)
            .unwrap_or(TaxRate::ZERO)
    }

    pub fn has_location(&self, location: &Location) -> bool {
        self.locations.contains(location)
    }

    /// Servers are made in `location`.
    pub fn serves(&self, location: &Location) -> Result<(), CatalogError> {
        if self.has_location(location) {
            Ok(())
        } else {
            Err(CatalogError::UnknownLocation(location.as_str().to_string()))
        }
    }

    /// Plans orderable at `at`, with the prices in force.
    pub fn plans_at(&self, at: DateTime<Utc>) -> Vec<(&PlanSpec, &Prices)> {
        self.plans
            .values()
            .filter(|history| history.retired_at.is_none_or(|retired| retired > at))
            .filter_map(|history| {
                history
                    .prices
                    .iter()
                    .rev()
                    .find(|(from, _)| *from <= at)
                    .map(|(_, prices)| (&history.spec, prices))
            })
            .collect()
    }

    fn check_not_back_dated(&self, effective_at: DateTime<Utc>) -> Result<(), CatalogError> {
        match self.last_change {
            Some(last) if effective_at < last => Err(CatalogError::BackDated { effective_at, last }),
            _ => Ok(()),
        }
    }

    fn decide(&self, command: CatalogCommand) -> Result<Vec<CatalogEvent>, CatalogError> {
        match command {
            CatalogCommand::PublishPlan {
                plan,
                monthly,
                effective_at,
            } => {
                self.check_not_back_dated(effective_at)?;
                check_prices(&monthly)?;
                if self.plans.contains_key(&plan.id) {
                    return Err(CatalogError::PlanExists(plan.id));
                }
                Ok(vec![CatalogEvent::PlanPublished {
                    plan,
                    monthly,
                    effective_at,
                }])
            }
            CatalogCommand::RepricePlan {
                plan_id,
                monthly,
                effective_at,
            } => {
                self.check_not_back_dated(effective_at)?;
                check_prices(&monthly)?;
                self.orderable(&plan_id, effective_at)?;
                Ok(vec![CatalogEvent::PlanRepriced {
                    plan_id,
                    monthly,
                    effective_at,
                }])
            }
            CatalogCommand::RetirePlan { plan_id, effective_at } => {
                self.check_not_back_dated(effective_at)?;
                self.orderable(&plan_id, effective_at)?;
                Ok(vec![CatalogEvent::PlanRetired { plan_id, effective_at }])
            }
            CatalogCommand::SetTaxRate {
                country,
                rate,
                name,
                effective_at,
            } => {
                self.check_not_back_dated(effective_at)?;
                Ok(vec![CatalogEvent::TaxRateSet {
                    country,
                    rate,
                    name,
                    effective_at,
                }])
            }
            CatalogCommand::Sync { fixtures, effective_at } => {
                let mut events = Vec::new();
                for plan in fixtures.plans {
                    check_prices(&plan.monthly)?;
                    match self.plans.get(&plan.spec.id) {
                        None => events.push(CatalogEvent::PlanPublished {
                            plan: plan.spec,
                            monthly: plan.monthly,
                            effective_at,
                        }),
                        Some(history) => {
                            let current = history.prices.last().map(|(_, prices)| prices);
                            if current != Some(&plan.monthly) {
                                events.push(CatalogEvent::PlanRepriced {
                                    plan_id: plan.spec.id,
                                    monthly: plan.monthly,
                                    effective_at,
                                });
                            }
                        }
                    }
                }
                for rule in fixtures.tax {
                    let current = self.tax.get(&rule.country).and_then(|history| history.last());
                    if current.map(|(_, rate, name)| (rate, name)) != Some((&rule.rate, &rule.name)) {
                        events.push(CatalogEvent::TaxRateSet {
                            country: rule.country,
                            rate: rule.rate,
                            name: rule.name,
                            effective_at,
                        });
                    }
                }
                if fixtures.locations != self.locations {
                    events.push(CatalogEvent::LocationsSet {
                        locations: fixtures.locations,
                        effective_at,
                    });
                }
                if !events.is_empty() {
                    self.check_not_back_dated(effective_at)?;
                }
                Ok(events)
            }
        }
    }
}

fn check_prices(monthly: &Prices) -> Result<(), CatalogError> {
    let valid = !monthly.is_empty()
        && monthly
            .values()
            .all(|price| *price > Decimal::ZERO && price.normalize().scale() <= 6);
    if valid {
        Ok(())
    } else {
        Err(CatalogError::BadPrices)
    }
}

impl Aggregate for Catalog {
    const TYPE: &'static str = "catalog";
    type Command = CatalogCommand;
    type Event = CatalogEvent;
    type Error = CatalogError;
    type Services = ();

    async fn handle(&mut self, command: CatalogCommand, _: &(), sink: &cqrs_es::event_sink::EventSink<Self>) -> Result<(), CatalogError> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: CatalogEvent) {
        match event {
            CatalogEvent::PlanPublished {
                plan,
                monthly,
                effective_at,
            } => {
                self.last_change = Some(effective_at);
                let id = plan.id.clone();
                self.plans.insert(
                    id,
                    PlanHistory {
                        spec: plan,
                        prices: vec![(effective_at, monthly)],
                        retired_at: None,
                    },
                );
            }
            CatalogEvent::PlanRepriced {
                plan_id,
                monthly,
                effective_at,
            } => {
                self.last_change = Some(effective_at);
                if let Some(history) = self.plans.get_mut(&plan_id) {
                    history.prices.push((effective_at, monthly));
                }
            }
            CatalogEvent::PlanRetired { plan_id, effective_at } => {
                self.last_change = Some(effective_at);
                if let Some(history) = self.plans.get_mut(&plan_id) {
                    history.retired_at = Some(effective_at);
                }
            }
            CatalogEvent::TaxRateSet {
                country,
                rate,
                name,
                effective_at,
            } => {
                self.last_change = Some(effective_at);
                self.tax.entry(country).or_default().push((effective_at, rate, name));
            }
            CatalogEvent::LocationsSet { locations, effective_at } => {
                self.last_change = Some(effective_at);
                self.locations = locations;
            }
        }
    }
}

/// The catalogue as the fixture files describe it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fixtures {
    pub plans: Vec<FixturePlan>,
    pub tax: Vec<TaxRule>,
    pub locations: BTreeSet<Location>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FixturePlan {
    pub spec: PlanSpec,
    pub monthly: Prices,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaxRule {
    pub country: Country,
    pub rate: TaxRate,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("{file}: {source}")]
    Toml { file: &'static str, source: toml::de::Error },
    #[error("{file}: {source}")]
    Field { file: &'static str, source: ParseError },
    #[error("{file}: {source}")]
    Money { file: &'static str, source: MoneyError },
}

impl Fixtures {
    /// Parses the texts of `plans.toml` and `tax.toml` (reading the files is the caller's IO).
    pub fn parse(plans_toml: &str, tax_toml: &str) -> Result<Fixtures, FixtureError> {
        #[derive(Deserialize)]
        struct PlansFile {
            locations: Vec<String>,
            plan: Vec<PlanEntry>,
        }
        #[derive(Deserialize)]
        struct PlanEntry {
            id: String,
            vcpu: u32,
            ram_gb: u32,
            disk_gb: u32,
            monthly: BTreeMap<String, String>,
        }
        #[derive(Deserialize)]
        struct TaxFile {
            rule: Vec<RuleEntry>,
        }
        #[derive(Deserialize)]
        struct RuleEntry {
            country: String,
            rate: String,
            name: String,
        }
        const PLANS: &str = "plans.toml";
        const TAX: &str = "tax.toml";
        let plans_file: PlansFile = toml::from_str(plans_toml).map_err(|source| FixtureError::Toml { file: PLANS, source })?;
        let tax_file: TaxFile = toml::from_str(tax_toml).map_err(|source| FixtureError::Toml { file: TAX, source })?;
        let mut plans = Vec::new();
        for entry in plans_file.plan {
            let id = PlanId::parse(&entry.id).map_err(|source| FixtureError::Field { file: PLANS, source })?;
            let mut monthly = Prices::new();
            for (code, amount) in entry.monthly {
                let currency = Currency::parse(&code).map_err(|source| FixtureError::Money { file: PLANS, source })?;
                let price = Money::parse_positive(&amount, currency).map_err(|source| FixtureError::Money { file: PLANS, source })?;
                monthly.insert(currency, price.amount);
            }
            plans.push(FixturePlan {
                spec: PlanSpec {
                    id,
                    vcpu: entry.vcpu,
                    ram_gb: entry.ram_gb,
                    disk_gb: entry.disk_gb,
                },
                monthly,
            });
        }
        let mut tax = Vec::new();
        for rule in tax_file.rule {
            let country = Country::parse(&rule.country).map_err(|source| FixtureError::Field { file: TAX, source })?;
            let rate: Decimal = rule.rate.parse().map_err(|_| FixtureError::Field {
                file: TAX,
                source: ParseError {
                    field: "rate",
                    reason: format!("{:?} is not a decimal", rule.rate),
                },
            })?;
            let rate = TaxRate::new(rate).map_err(|source| FixtureError::Field { file: TAX, source })?;
            tax.push(TaxRule {
                country,
                rate,
                name: rule.name,
            });
        }
        let locations = plans_file
            .locations
            .iter()
            .map(|text| Location::parse(text))
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(|source| FixtureError::Field { file: PLANS, source })?;
        Ok(Fixtures { plans, tax, locations })
    }
}
