//! The wire types of API v1: what a request may carry and what a response holds. The OpenAPI
//! document is derived from these types, so what it says is what the server does.
//!
//! A text field is checked against the very pattern its schema publishes (one constant serves
//! both), so a value the schema allows is never refused for its form, and one it refuses is never
//! taken. Money crosses as a decimal string, never a JSON number.

use std::borrow::Cow;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use regex::Regex;
use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{IntoParams, PartialSchema, ToSchema};
use uuid::Uuid;

/// Characters Rust's `char::is_whitespace` takes for white space, as a class body: a text never
/// starts or ends with one, so the domain's trimming never changes what was sent.
macro_rules! ws {
    () => {
        r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
    };
}

/// A text of 1 to `$max` characters: no control characters, no white space at either end.
macro_rules! text_pattern {
    ($middle:literal) => {
        concat!(
            r"^[^\x00-\x1f\x7f",
            ws!(),
            r"]([^\x00-\x1f\x7f]{0,",
            $middle,
            r"}[^\x00-\x1f\x7f",
            ws!(),
            r"])?$"
        )
    };
}

pub const NAME_PATTERN: &str = text_pattern!("198");
pub const REASON_PATTERN: &str = text_pattern!("498");
/// The domain's rule for an email address: something, `@`, then a domain with a dot inside it;
/// no white space anywhere.
pub const EMAIL_PATTERN: &str = concat!(
    r"^[^@",
    ws!(),
    r"]+@[^.",
    ws!(),
    r"][^",
    ws!(),
    r"]*\.[^",
    ws!(),
    r"]*[^.",
    ws!(),
    r"]$"
);
pub const COUNTRY_PATTERN: &str = r"^[A-Z]{2}$";
pub const OS_IMAGE_PATTERN: &str = r"^[A-Za-z0-9._-]{1,64}$";
/// RFC 1123: dot-separated labels of 1 to 63 letters, digits and inner hyphens (253 at most).
pub const HOSTNAME_PATTERN: &str = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$";
/// A positive amount with at most 6 decimals (no leading zeros, no sign, no exponent).
pub const POSITIVE_AMOUNT_PATTERN: &str = r"^([1-9][0-9]{0,11}(\.[0-9]{1,6})?|0\.([1-9][0-9]{0,5}|0[1-9][0-9]{0,4}|00[1-9][0-9]{0,3}|000[1-9][0-9]{0,2}|0000[1-9][0-9]?|00000[1-9]))$";
/// A non-zero amount with at most 6 decimals, negative for a debit.
pub const SIGNED_AMOUNT_PATTERN: &str = r"^-?([1-9][0-9]{0,11}(\.[0-9]{1,6})?|0\.([1-9][0-9]{0,5}|0[1-9][0-9]{0,4}|00[1-9][0-9]{0,3}|000[1-9][0-9]{0,2}|0000[1-9][0-9]?|00000[1-9]))$";
/// A top-up: more than 0 and at most 10000, at most 6 decimals (and, as the account's currency
/// has it, in whole minor units: a rule of the account, checked by the server).
pub const TOPUP_AMOUNT_PATTERN: &str = r"^(10000(\.0{1,6})?|[1-9][0-9]{0,3}(\.[0-9]{1,6})?|0\.([1-9][0-9]{0,5}|0[1-9][0-9]{0,4}|00[1-9][0-9]{0,3}|000[1-9][0-9]{0,2}|0000[1-9][0-9]?|00000[1-9]))$";
/// An amount as the server writes it.
const AMOUNT_OUT_PATTERN: &str = r"^-?[0-9]+(\.[0-9]+)?$";
pub const POSITION_CURSOR_PATTERN: &str = r"^[0-9]{1,18}$";

fn string_schema(pattern: Option<&str>, max_length: Option<usize>, description: &str, example: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(pattern.map(str::to_string))
        .max_length(max_length)
        .description(Some(description))
        .examples([serde_json::Value::String(example.to_string())])
        .into()
}

fn enum_schema(values: impl IntoIterator<Item = String>, description: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .description(Some(description))
        .into()
}

/// A string checked against a published pattern (and a length in characters).
macro_rules! checked_text {
    ($(#[$doc:meta])* $name:ident, $pattern:expr, $max:expr, $description:literal, $example:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<$name, D::Error> {
                static PATTERN: LazyLock<Regex> = LazyLock::new(|| Regex::new($pattern).expect("a valid pattern"));
                let text = String::deserialize(deserializer)?;
                let max: Option<usize> = $max;
                if max.is_some_and(|max| text.chars().count() > max) || !PATTERN.is_match(&text) {
                    return Err(serde::de::Error::custom(format!("{text:?} is not {}", $description)));
                }
                Ok($name(text))
            }
        }

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                string_schema(Some($pattern), $max, $description, $example)
            }
        }

        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

checked_text!(
    /// An account holder's name.
    Name, NAME_PATTERN, Some(200),
    "1 to 200 characters, no control characters, no white space at either end", "Ada Lovelace"
);
checked_text!(
    /// Why an admin did something, kept in the log.
    Reason, REASON_PATTERN, Some(500),
    "1 to 500 characters, no control characters, no white space at either end", "goodwill for the outage of 3 May"
);
checked_text!(
    Email,
    EMAIL_PATTERN,
    Some(254),
    "an email address: no white space, an @, then a domain with a dot inside it (254 characters at most)",
    "ada@example.com"
);
checked_text!(
    CountryCode,
    COUNTRY_PATTERN,
    None,
    "an ISO 3166-1 alpha-2 country code in capitals",
    "AU"
);
checked_text!(
    OsImage,
    OS_IMAGE_PATTERN,
    None,
    "1 to 64 letters, digits, dots, hyphens and underscores",
    "debian-12"
);
checked_text!(
    Hostname,
    HOSTNAME_PATTERN,
    Some(253),
    "an RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens (253 characters at most)",
    "web1.example.com"
);
checked_text!(SearchText, r"^[\s\S]{0,200}$", Some(200), "at most 200 characters", "ada");
checked_text!(
    StreamName,
    r"^[\x21-\x7e]{1,200}$",
    Some(200),
    "a stream id: 1 to 200 visible ASCII characters",
    "catalog"
);
checked_text!(
    PositionCursor,
    POSITION_CURSOR_PATTERN,
    None,
    "the next_cursor of an earlier page",
    "1042"
);

/// An amount in a request: a JSON string, checked against its pattern, then exact as a decimal.
macro_rules! amount {
    ($(#[$doc:meta])* $name:ident, $pattern:expr, $description:literal, $example:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name(pub Decimal);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<$name, D::Error> {
                static PATTERN: LazyLock<Regex> = LazyLock::new(|| Regex::new($pattern).expect("a valid pattern"));
                let text = match serde_json::Value::deserialize(deserializer)? {
                    serde_json::Value::String(text) => text,
                    serde_json::Value::Number(_) => {
                        return Err(serde::de::Error::custom(concat!("must be a string such as \"", $example, "\", not a JSON number")))
                    }
                    _ => return Err(serde::de::Error::custom(concat!("must be a string such as \"", $example, "\""))),
                };
                if !PATTERN.is_match(&text) {
                    return Err(serde::de::Error::custom(format!("{text:?} is not {}", $description)));
                }
                text.parse::<Decimal>()
                    .map($name)
                    .map_err(|_| serde::de::Error::custom(format!("{text:?} is not {}", $description)))
            }
        }

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                string_schema(Some($pattern), None, $description, $example)
            }
        }

        impl ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

amount!(
    /// A positive amount.
    PositiveAmount, POSITIVE_AMOUNT_PATTERN,
    "a positive amount as a string, at most 6 decimals (\"25.00\")", "25.00"
);
amount!(
    /// A credit (positive) or a debit (negative).
    SignedAmount, SIGNED_AMOUNT_PATTERN,
    "a non-zero amount as a string, at most 6 decimals, negative for a debit (\"-5.00\")", "-5.00"
);
amount!(
    /// What a card pays: more than 0, at most 10000, in whole minor units.
    TopUpAmount, TOPUP_AMOUNT_PATTERN,
    "an amount as a string, more than 0 and at most 10000, in whole minor units of the account's currency (\"25.00\"; JPY has none, KWD three)", "25.00"
);

/// An amount as the server writes it: exact, with at least the currency's minor digits
/// (`"25.00"`, `"0.022603"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Money(pub String);

impl Money {
    pub fn of(amount: Decimal, currency: &str) -> Money {
        let digits = domain::Currency::parse(currency).map(|c| c.minor_unit_digits()).unwrap_or(2);
        let mut amount = amount.normalize();
        if amount.scale() < digits {
            amount.rescale(digits);
        }
        Money(amount.to_string())
    }
}

impl PartialSchema for Money {
    fn schema() -> RefOr<Schema> {
        string_schema(Some(AMOUNT_OUT_PATTERN), None, "an exact amount as a string", "25.00")
    }
}

impl ToSchema for Money {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Money")
    }
}

/// An ISO 4217 currency this ledger knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CurrencyCode(pub domain::Currency);

impl<'de> Deserialize<'de> for CurrencyCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<CurrencyCode, D::Error> {
        let text = String::deserialize(deserializer)?;
        domain::Currency::parse(&text).map(CurrencyCode).map_err(serde::de::Error::custom)
    }
}

impl PartialSchema for CurrencyCode {
    fn schema() -> RefOr<Schema> {
        enum_schema(domain::Currency::codes().map(str::to_string), "an ISO 4217 currency code")
    }
}

impl ToSchema for CurrencyCode {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("CurrencyCode")
    }
}

/// The plans and locations on sale: the catalogue the binary embeds and publishes at start.
pub static CATALOG: LazyLock<domain::catalog::Fixtures> = LazyLock::new(|| {
    domain::catalog::Fixtures::parse(
        include_str!("../../../fixtures/plans.toml"),
        include_str!("../../../fixtures/tax.toml"),
    )
    .expect("the embedded fixtures parse")
});

/// A plan of the catalogue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanCode(pub domain::PlanId);

impl<'de> Deserialize<'de> for PlanCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PlanCode, D::Error> {
        let text = String::deserialize(deserializer)?;
        match CATALOG.plans.iter().find(|plan| plan.spec.id.as_str() == text) {
            Some(plan) => Ok(PlanCode(plan.spec.id.clone())),
            None => Err(serde::de::Error::custom(format!(
                "{text:?} is not a plan of the catalogue (GET /v1/plans)"
            ))),
        }
    }
}

impl PartialSchema for PlanCode {
    fn schema() -> RefOr<Schema> {
        enum_schema(CATALOG.plans.iter().map(|plan| plan.spec.id.to_string()), "a plan of the catalogue")
    }
}

impl ToSchema for PlanCode {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("PlanCode")
    }
}

/// A location servers are made in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocationCode(pub domain::Location);

impl<'de> Deserialize<'de> for LocationCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<LocationCode, D::Error> {
        let text = String::deserialize(deserializer)?;
        match CATALOG.locations.iter().find(|location| location.as_str() == text) {
            Some(location) => Ok(LocationCode(location.clone())),
            None => Err(serde::de::Error::custom(format!("{text:?} is not a location servers are made in"))),
        }
    }
}

impl PartialSchema for LocationCode {
    fn schema() -> RefOr<Schema> {
        enum_schema(
            CATALOG.locations.iter().map(|location| location.as_str().to_string()),
            "a location servers are made in",
        )
    }
}

impl ToSchema for LocationCode {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("LocationCode")
    }
}

// --- Requests -------------------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
pub struct OpenAccount {
    pub name: Name,
    pub email: Email,
    pub currency: CurrencyCode,
    pub country: CountryCode,
}

/// Who a key or a person acts as: `customer` (one account's owner), `finance` (reads
/// everything) or `admin` (does everything). The roles are the application's (`app::people::Role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Role(pub app::people::Role);

impl Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Role, D::Error> {
        let text = String::deserialize(deserializer)?;
        app::people::Role::parse(&text)
            .map(Role)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a role: customer, finance or admin")))
    }
}

impl PartialSchema for Role {
    fn schema() -> RefOr<Schema> {
        enum_schema(
            app::people::Role::ALL.iter().map(|role| role.as_str().to_string()),
            "Who a key acts as.",
        )
    }
}

impl ToSchema for Role {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Role")
    }
}

#[derive(Deserialize, ToSchema)]
pub struct NewKey {
    pub role: Role,
}

#[derive(Deserialize, ToSchema)]
pub struct TopUpRequest {
    pub amount: TopUpAmount,
}

#[derive(Deserialize, ToSchema)]
pub struct Adjustment {
    pub amount: SignedAmount,
    pub reason: Reason,
}

/// A refund (a service credit against a charge, or a card refund of a top-up), or the amount a
/// held payment is accepted for.
#[derive(Deserialize, ToSchema)]
pub struct AmountWithReason {
    pub amount: PositiveAmount,
    pub reason: Reason,
}

#[derive(Deserialize, ToSchema)]
pub struct PlaceOrder {
    pub plan_id: PlanCode,
    pub location: LocationCode,
}

#[derive(Deserialize, ToSchema)]
pub struct Setup {
    pub os_image: OsImage,
    pub hostname: Hostname,
}

#[derive(Clone, Copy, Debug, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    Boot,
    Shutdown,
    Reboot,
}

impl From<PowerAction> for domain::server::PowerAction {
    fn from(action: PowerAction) -> domain::server::PowerAction {
        match action {
            PowerAction::Boot => domain::server::PowerAction::Boot,
            PowerAction::Shutdown => domain::server::PowerAction::Shutdown,
            PowerAction::Reboot => domain::server::PowerAction::Reboot,
        }
    }
}

#[derive(Deserialize, ToSchema)]
pub struct Power {
    pub action: PowerAction,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancellationMode {
    /// Deleted 30 days later, revocable; powered off meanwhile.
    Grace,
    /// Deleted 5 minutes later; not revocable.
    Immediate,
}

impl From<CancellationMode> for domain::server::CancellationMode {
    fn from(mode: CancellationMode) -> domain::server::CancellationMode {
        match mode {
            CancellationMode::Grace => domain::server::CancellationMode::Grace,
            CancellationMode::Immediate => domain::server::CancellationMode::Immediate,
        }
    }
}

#[derive(Deserialize, ToSchema)]
pub struct Cancellation {
    pub mode: CancellationMode,
}

/// Dev mode: set the clock to an instant (never backwards), or move it on; one or the other.
#[derive(Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum DevClock {
    Set { now: DateTime<Utc> },
    Advance { advance_seconds: u32 },
}

impl PartialSchema for DevClock {
    fn schema() -> RefOr<Schema> {
        use utoipa::openapi::schema::{AdditionalProperties, OneOfBuilder};
        let set = ObjectBuilder::new()
            .property(
                "now",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                        utoipa::openapi::KnownFormat::DateTime,
                    )))
                    .description(Some("the new instant (RFC 3339), not before the clock's")),
            )
            .required("now")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        let advance = ObjectBuilder::new()
            .property(
                "advance_seconds",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .maximum(Some(31_622_400))
                    .description(Some("seconds to move the clock on, at most a year")),
            )
            .required("advance_seconds")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        OneOfBuilder::new().item(set).item(advance).into()
    }
}

impl ToSchema for DevClock {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("DevClock")
    }
}

// --- Queries --------------------------------------------------------------------------------

/// The query of a cursor-paginated list.
macro_rules! page_query {
    ($($name:ident after $cursor:ty),* $(,)?) => {
        $(
            #[derive(Deserialize, IntoParams)]
            #[into_params(parameter_in = Query)]
            pub struct $name {
                /// The `next_cursor` of the page before.
                #[param(inline)]
                pub cursor: Option<$cursor>,
                /// Items per page (50 when absent).
                #[param(minimum = 1, maximum = 200)]
                pub limit: Option<u32>,
            }
        )*
    };
}

page_query!(
    StatementQuery after PositionCursor,
    ServersQuery after Uuid,
    InvoicesQuery after Uuid,
);

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// Part of a name or an email, any case.
    #[param(inline)]
    pub query: Option<SearchText>,
    /// The `next_cursor` of the page before.
    pub cursor: Option<Uuid>,
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeysQuery {
    /// One account's keys only.
    pub account: Option<Uuid>,
    /// The `next_cursor` of the page before.
    pub cursor: Option<Uuid>,
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AsOfQuery {
    /// An RFC 3339 instant: the figures as they were then.
    pub as_of: Option<DateTime<Utc>>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VerifyQuery {
    /// Check the hash chain only, not the read models.
    pub chain_only: Option<bool>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events after this position (the `next_cursor` of the page before).
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// Events per page (100 when absent).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// One stream only (`account-<id>`, `catalog`, ...).
    #[param(inline)]
    pub stream: Option<StreamName>,
}

// --- Responses ------------------------------------------------------------------------------

#[derive(Serialize, ToSchema)]
pub struct Created {
    pub id: Uuid,
}

#[derive(Serialize, ToSchema)]
pub struct Account {
    pub id: Uuid,
    pub name: String,
    pub email: String,
    pub currency: String,
    pub country: String,
    pub balance: Money,
    pub reserved: Money,
    pub available: Money,
    /// The gross hourly rate of the account's billable servers (null for a past instant).
    pub hourly_burn: Option<Money>,
    /// Hours the available balance lasts at the hourly burn; null when nothing is billed or for a
    /// past instant.
    pub runway_hours: Option<String>,
    /// The runway is below the warning threshold (null for a past instant).
    pub low_balance: Option<bool>,
    /// The instant the figures are as of, when one was asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub as_of: Option<DateTime<Utc>>,
}

impl Account {
    pub fn of(row: &projections::balances::BalanceRow) -> Account {
        let runway_hours = (row.hourly_burn > Decimal::ZERO)
            .then(|| domain::billing::runway_hours(row.available, row.hourly_burn))
            .flatten();
        Account {
            id: row.account_id,
            name: row.name.clone(),
            email: row.email.clone(),
            currency: row.currency.clone(),
            country: row.country.clone(),
            balance: Money::of(row.balance, &row.currency),
            reserved: Money::of(row.reserved, &row.currency),
            available: Money::of(row.available, &row.currency),
            hourly_burn: Some(Money::of(row.hourly_burn, &row.currency)),
            runway_hours: runway_hours.map(|hours| hours.to_string()),
            low_balance: Some(row.low_balance_warned),
            as_of: None,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ApiKey {
    /// Names the key (to list or revoke it); never the token.
    pub id: Uuid,
    /// Shown once; stored hashed.
    pub token: String,
    pub role: Role,
    pub account_id: Uuid,
}

/// A key as listed: never its token.
#[derive(Serialize, ToSchema)]
pub struct KeyView {
    pub id: Uuid,
    pub role: Role,
    /// A customer key's account.
    pub account_id: Option<Uuid>,
    pub label: String,
    pub created_at: DateTime<Utc>,
    /// When it stopped opening anything; null while it works.
    pub revoked_at: Option<DateTime<Utc>>,
}

impl KeyView {
    pub fn of(row: app::keys::KeyRow) -> KeyView {
        KeyView {
            id: row.key_id,
            // The table's CHECK admits the three roles only.
            role: Role(app::people::Role::parse(&row.role).unwrap_or(app::people::Role::Customer)),
            account_id: row.account_id,
            label: row.label,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct Transaction {
    pub id: Uuid,
    pub position: i64,
    /// topup, charge, refund, adjustment, hold, release, ...
    pub kind: String,
    /// Signed: what the wallet gained (positive) or lost.
    pub amount: Money,
    pub balance_after: Money,
    pub occurred_at: DateTime<Utc>,
    pub server_id: Option<Uuid>,
    pub reference: Option<String>,
}

/// A server's status, as the domain names it (`domain::server::Status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerStatus(pub domain::server::Status);

impl Serialize for ServerStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

impl PartialSchema for ServerStatus {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(domain::server::Status::ALL.iter().map(|status| status.as_str())))
            .into()
    }
}

impl ToSchema for ServerStatus {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ServerStatus")
    }
}

#[derive(Serialize, ToSchema)]
pub struct Server {
    pub id: Uuid,
    pub account_id: Uuid,
    pub plan_id: String,
    pub location: String,
    pub status: ServerStatus,
    pub hostname: Option<String>,
    pub os_image: Option<String>,
    /// Net charged in the current UTC month.
    pub month_to_date_net: Money,
    /// The start of the next hour to be charged, while the server is billable.
    pub next_charge_at: Option<DateTime<Utc>>,
    pub cancellation_mode: Option<CancellationMode>,
    /// When a cancelled server is deleted.
    pub cancellation_effective_at: Option<DateTime<Utc>>,
    /// Why a suspended server is suspended: `non_payment` or `dispute`.
    pub suspension_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct OrderAccepted {
    pub order_id: Uuid,
    pub server_id: Uuid,
    /// `provisioning`: the server is being made.
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct TopUp {
    pub topup_id: Uuid,
    pub checkout_url: String,
    pub amount: Money,
    /// `pending` until the processor reports the payment.
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct PlanPrice {
    pub monthly: Money,
    /// `round(monthly / 730, 6)`.
    pub hourly: Money,
}

#[derive(Serialize, ToSchema)]
pub struct Plan {
    pub id: String,
    pub vcpu: u32,
    pub ram_gb: u32,
    pub disk_gb: u32,
    /// Prices per currency code, tax exclusive.
    pub prices: std::collections::BTreeMap<String, PlanPrice>,
}

#[derive(Serialize, ToSchema)]
pub struct InvoiceLine {
    pub description: String,
    pub server_id: Option<Uuid>,
    pub hours: Option<u32>,
    pub net: Money,
    pub tax: Money,
}

#[derive(Serialize, ToSchema)]
pub struct TaxLine {
    /// The rate as a fraction (`0.1` is 10%).
    pub rate: String,
    pub net: Money,
    pub tax: Money,
}

/// Figures rounded to the currency's minor unit, with `tax = total - net` so they add up.
#[derive(Serialize, ToSchema)]
pub struct DisplayFigures {
    pub net: Money,
    pub tax: Money,
    pub total: Money,
}

#[derive(Serialize, ToSchema)]
pub struct CreditNote {
    pub id: Uuid,
    pub number: String,
    pub charge_id: Uuid,
    pub reason: String,
    pub net: Money,
    pub tax: Money,
    pub total: Money,
    pub issued_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct Invoice {
    pub id: Uuid,
    pub number: String,
    pub account_id: Uuid,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub currency: String,
    pub lines: Vec<InvoiceLine>,
    pub taxes: Vec<TaxLine>,
    pub net: Money,
    pub tax: Money,
    pub total: Money,
    pub display: DisplayFigures,
    pub issued_at: DateTime<Utc>,
    pub credit_notes: Vec<CreditNote>,
}

#[derive(Serialize, ToSchema)]
pub struct AdjustmentMade {
    pub adjustment_id: Uuid,
    pub account: Account,
}

#[derive(Serialize, ToSchema)]
pub struct ServiceCredit {
    pub refund_id: Uuid,
    pub charge_id: Uuid,
    pub amount: Money,
    pub account: Account,
}

#[derive(Serialize, ToSchema)]
pub struct CardRefund {
    pub refund_id: Uuid,
    pub topup_id: Uuid,
    pub amount: Money,
    /// `requested` until Stripe reports its outcome.
    pub status: String,
    pub account: Account,
}

#[derive(Serialize, ToSchema)]
pub struct HeldPaymentAccepted {
    pub topup_id: Uuid,
    pub amount: Money,
    /// `paid`.
    pub status: String,
    pub account: Account,
}

/// What became of a webhook event.
#[derive(Serialize, ToSchema)]
pub struct WebhookReceipt {
    pub received: bool,
    /// Received before; nothing more was done.
    pub duplicate: bool,
    /// For refund events: whether it settled a refund this ledger asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acted_on: Option<bool>,
    /// For disputes: whether the payment was matched to a top-up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<bool>,
}

#[derive(Serialize, ToSchema)]
pub struct TrialBalanceLine {
    pub account: String,
    pub debit: Money,
    pub credit: Money,
}

/// The books of one currency; its total debit equals its total credit.
#[derive(Serialize, ToSchema)]
pub struct CurrencyBooks {
    pub currency: String,
    pub accounts: Vec<TrialBalanceLine>,
    pub total_debit: Money,
    pub total_credit: Money,
}

/// Journal totals per currency (amounts of different currencies are never added).
#[derive(Serialize, ToSchema)]
pub struct TrialBalance {
    pub as_of: Option<DateTime<Utc>>,
    pub currencies: Vec<CurrencyBooks>,
}

#[derive(Serialize, ToSchema)]
pub struct LedgerEvent {
    pub position: i64,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    pub recorded_at: DateTime<Utc>,
    pub occurred_at: DateTime<Utc>,
    /// SHA-256, hex.
    pub prev_hash: String,
    /// `SHA-256(prev_hash || canonical envelope)`, hex.
    pub hash: String,
}

impl From<ledger::RecordedEvent> for LedgerEvent {
    fn from(event: ledger::RecordedEvent) -> LedgerEvent {
        LedgerEvent {
            position: event.position,
            stream_id: event.stream_id,
            stream_version: event.stream_version,
            event_id: event.event_id,
            event_type: event.event_type,
            schema_version: event.schema_version,
            payload: event.payload,
            metadata: event.metadata,
            recorded_at: event.recorded_at,
            occurred_at: event.occurred_at,
            prev_hash: hex::encode(event.prev_hash),
            hash: hex::encode(event.hash),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct Difference {
    pub table: String,
    pub key: String,
    /// The stored row, null when missing.
    pub live: Option<String>,
    /// The replayed row, null when missing.
    pub replayed: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ReadModelCheck {
    pub name: String,
    pub position: i64,
    pub differences: Vec<Difference>,
}

#[derive(Serialize, ToSchema)]
pub struct Verification {
    /// The chain holds and (unless `chain_only`) every read model matches a replay.
    pub ok: bool,
    pub events_checked: u64,
    pub head_position: i64,
    pub head_hash: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad_position: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_models: Option<Vec<ReadModelCheck>>,
}

#[derive(Serialize, ToSchema)]
pub struct ProjectionStatus {
    pub name: String,
    pub position: i64,
    pub head: i64,
    pub lag: i64,
    pub generation: i32,
    pub rebuilding: bool,
    pub rebuild_position: i64,
}

#[derive(Serialize, ToSchema)]
pub struct RebuildStarted {
    pub name: String,
    /// `rebuilding`.
    pub status: String,
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// `ready`.
    pub status: String,
    /// The largest lag of a projector behind the log, in events.
    pub projector_lag: i64,
}

#[derive(Serialize, ToSchema)]
pub struct DueReport {
    pub slots_charged: u64,
    pub slots_declined: u64,
    pub servers_resumed: u64,
    pub servers_terminated: u64,
    pub servers_deleted: u64,
    pub invoices_issued: u64,
    pub low_balance_warnings: u64,
    pub failures: u64,
}

#[derive(Serialize, ToSchema)]
pub struct ClockNow {
    pub now: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct ClockMoved {
    pub now: DateTime<Utc>,
    /// The due work run at the new instant.
    pub due: DueReport,
}

/// A page of a list: `next_cursor` is null on the last page.
macro_rules! page {
    ($($page:ident of $item:ty),* $(,)?) => {
        $(
            #[derive(Serialize, ToSchema)]
            pub struct $page {
                pub items: Vec<$item>,
                /// Pass as `cursor` for the next page; null on the last.
                pub next_cursor: Option<String>,
            }

            impl $page {
                pub fn of<R>(page: app::reads::Page<R>, item: impl FnMut(R) -> $item) -> $page {
                    $page {
                        items: page.items.into_iter().map(item).collect(),
                        next_cursor: page.next_cursor,
                    }
                }
            }
        )*
    };
}

page!(
    AccountPage of Account,
    TransactionPage of Transaction,
    ServerPage of Server,
    InvoicePage of Invoice,
    EventPage of LedgerEvent,
    PlanPage of Plan,
    ProjectionPage of ProjectionStatus,
    KeyPage of KeyView,
);
