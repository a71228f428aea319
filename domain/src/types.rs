//! Value types that parse, don't validate: once one exists it is valid.

use std::fmt;

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ParseError {
    pub field: &'static str,
    pub reason: String,
}

fn parse_error(field: &'static str, reason: impl Into<String>) -> ParseError {
    ParseError {
        field,
        reason: reason.into(),
    }
}

macro_rules! uuid_id {
    ($name:ident, $prefix:literal) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn new() -> $name {
                $name(Uuid::now_v7())
            }

            pub fn parse(text: &str) -> Result<$name, ParseError> {
                Uuid::parse_str(text)
                    .map($name)
                    .map_err(|_| parse_error(stringify!($name), format!("{text:?} is not a UUID")))
            }

            /// The id of this object's stream in the log.
            pub fn stream_id(&self) -> String {
                format!(concat!($prefix, "-{}"), self.0)
            }
        }

        impl Default for $name {
            fn default() -> $name {
                $name(Uuid::nil())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(AccountId, "account");
uuid_id!(ServerId, "server");
uuid_id!(OrderId, "order");
uuid_id!(TopUpId, "topup");
uuid_id!(ChargeId, "charge");
uuid_id!(RefundId, "refund");
uuid_id!(AdjustmentId, "adjustment");
uuid_id!(DisputeId, "dispute");
uuid_id!(InvoiceId, "invoice");

/// A plan's id: lowercase letters, digits and dashes (`vps-1g`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PlanId(String);

impl PlanId {
    pub fn parse(text: &str) -> Result<PlanId, ParseError> {
        let valid = !text.is_empty()
            && text.len() <= 64
            && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !text.starts_with('-');
        if valid {
            Ok(PlanId(text.to_string()))
        } else {
            Err(parse_error(
                "plan_id",
                format!("{text:?} is not a plan id (lowercase letters, digits, dashes)"),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for PlanId {
    type Error = ParseError;
    fn try_from(text: String) -> Result<PlanId, ParseError> {
        PlanId::parse(&text)
    }
}

impl From<PlanId> for String {
    fn from(id: PlanId) -> String {
        id.0
    }
}

impl fmt::Display for PlanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A data-centre location code (`syd`): 2 to 16 lowercase letters or digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Location(String);

impl Location {
    pub fn parse(text: &str) -> Result<Location, ParseError> {
        if (2..=16).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
            Ok(Location(text.to_string()))
        } else {
            Err(parse_error("location", format!("{text:?} is not a location code")))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Location {
    type Error = ParseError;
    fn try_from(text: String) -> Result<Location, ParseError> {
        Location::parse(&text)
    }
}

impl From<Location> for String {
    fn from(location: Location) -> String {
        location.0
    }
}

/// An ISO 3166-1 alpha-2 country code, upper case (`AU`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Country([u8; 2]);

impl Country {
    pub fn parse(text: &str) -> Result<Country, ParseError> {
        match text.as_bytes() {
            [a, b] if a.is_ascii_uppercase() && b.is_ascii_uppercase() => Ok(Country([*a, *b])),
            _ => Err(parse_error(
                "country",
                format!("{text:?} is not an ISO 3166 alpha-2 code such as AU"),
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII")
    }
}

impl TryFrom<String> for Country {
    type Error = ParseError;
    fn try_from(text: String) -> Result<Country, ParseError> {
        Country::parse(&text)
    }
}

impl From<Country> for String {
    fn from(country: Country) -> String {
        country.as_str().to_string()
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tax rate as a fraction in [0, 1) with at most 6 decimals (`0.1` is 10%).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Decimal", into = "Decimal")]
pub struct TaxRate(Decimal);

impl TaxRate {
    pub const ZERO: TaxRate = TaxRate(Decimal::ZERO);

    pub fn new(rate: Decimal) -> Result<TaxRate, ParseError> {
        if rate.is_sign_negative() || rate >= Decimal::ONE || rate.normalize().scale() > 6 {
            return Err(parse_error(
                "tax_rate",
                format!("{rate} is not a fraction in [0, 1) with at most 6 decimals"),
            ));
        }
        Ok(TaxRate(rate.normalize()))
    }

    pub fn fraction(&self) -> Decimal {
        self.0
    }
}

impl TryFrom<Decimal> for TaxRate {
    type Error = ParseError;
    fn try_from(rate: Decimal) -> Result<TaxRate, ParseError> {
        TaxRate::new(rate)
    }
}

impl From<TaxRate> for Decimal {
    fn from(rate: TaxRate) -> Decimal {
        rate.0
    }
}

/// A host name per RFC 1123: labels of 1 to 63 letters, digits and inner hyphens, 253 at most.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hostname(String);

impl Hostname {
    pub fn parse(text: &str) -> Result<Hostname, ParseError> {
        let fail = |reason: &str| Err(parse_error("hostname", format!("{text:?} {reason}")));
        if text.is_empty() || text.len() > 253 {
            return fail("must be 1 to 253 characters");
        }
        for label in text.split('.') {
            if label.is_empty() || label.len() > 63 {
                return fail("has a label that is empty or longer than 63 characters");
            }
            if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return fail("may hold only letters, digits, hyphens and dots");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return fail("has a label that starts or ends with a hyphen");
            }
        }
        Ok(Hostname(text.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Hostname {
    type Error = ParseError;
    fn try_from(text: String) -> Result<Hostname, ParseError> {
        Hostname::parse(&text)
    }
}

impl From<Hostname> for String {
    fn from(hostname: Hostname) -> String {
        hostname.0
    }
}

/// A UTC hour `[start, start + 1h)`, the unit of billing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "DateTime<Utc>", into = "DateTime<Utc>")]
pub struct HourSlot(DateTime<Utc>);

impl HourSlot {
    /// The slot an instant falls in.
    pub fn containing(instant: DateTime<Utc>) -> HourSlot {
        let start = Utc
            .with_ymd_and_hms(instant.year(), instant.month(), instant.day(), instant.hour(), 0, 0)
            .single()
            .expect("UTC has no gaps");
        HourSlot(start)
    }

    /// A slot from its start, which must be on the hour.
    pub fn starting_at(start: DateTime<Utc>) -> Result<HourSlot, ParseError> {
        if HourSlot::containing(start).0 == start {
            Ok(HourSlot(start))
        } else {
            Err(parse_error("slot", format!("{start} is not on the hour")))
        }
    }

    pub fn start(&self) -> DateTime<Utc> {
        self.0
    }

    pub fn end(&self) -> DateTime<Utc> {
        self.0 + Duration::hours(1)
    }

    pub fn next(&self) -> HourSlot {
        HourSlot(self.end())
    }

    pub fn month(&self) -> YearMonth {
        YearMonth {
            year: self.0.year(),
            month: self.0.month(),
        }
    }

    /// Whole seconds of this slot after `instant` (0 when the instant is at or past the end).
    pub fn seconds_after(&self, instant: DateTime<Utc>) -> i64 {
        let instant = instant.clamp(self.start(), self.end());
        (self.end() - instant).num_seconds()
    }
}

impl TryFrom<DateTime<Utc>> for HourSlot {
    type Error = ParseError;
    fn try_from(start: DateTime<Utc>) -> Result<HourSlot, ParseError> {
        HourSlot::starting_at(start)
    }
}

impl From<HourSlot> for DateTime<Utc> {
    fn from(slot: HourSlot) -> DateTime<Utc> {
        slot.0
    }
}

impl fmt::Display for HourSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%dT%H:00Z"))
    }
}

/// A UTC calendar month.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct YearMonth {
    pub year: i32,
    pub month: u32,
}

impl YearMonth {
    pub fn of(instant: DateTime<Utc>) -> YearMonth {
        YearMonth {
            year: instant.year(),
            month: instant.month(),
        }
    }

    pub fn start(&self) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(self.year, self.month, 1, 0, 0, 0)
            .single()
            .expect("a valid month")
    }

    pub fn next(&self) -> YearMonth {
        if self.month == 12 {
            YearMonth {
                year: self.year + 1,
                month: 1,
            }
        } else {
            YearMonth {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    pub fn end(&self) -> DateTime<Utc> {
        self.next().start()
    }

    pub fn hours(&self) -> i64 {
        (self.end() - self.start()).num_hours()
    }
}

impl fmt::Display for YearMonth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    #[test]
    fn hostnames_follow_rfc_1123() {
        for good in ["web1", "web-1.example.com", "A1", "1host", &"a".repeat(63)] {
            assert!(Hostname::parse(good).is_ok(), "{good}");
        }
        assert_eq!(Hostname::parse("Web1.Example.COM").unwrap().as_str(), "web1.example.com");
        for bad in [
            "",
            "-web",
            "web-",
            "we_b",
            "a..b",
            "a.",
            &"a".repeat(64),
            &"a.".repeat(127),
            "h\u{e9}te",
            "a b",
        ] {
            assert!(Hostname::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn slots_are_utc_hours() {
        let slot = HourSlot::containing(at("2026-01-31T23:59:59.999Z"));
        assert_eq!(slot.start(), at("2026-01-31T23:00:00Z"));
        assert_eq!(slot.next().start(), at("2026-02-01T00:00:00Z"));
        assert_eq!(slot.next().month(), YearMonth { year: 2026, month: 2 });
        assert_eq!(slot.seconds_after(at("2026-01-31T23:00:30Z")), 3570);
        assert!(HourSlot::starting_at(at("2026-01-31T23:00:01Z")).is_err());
        assert_eq!(YearMonth { year: 2026, month: 1 }.hours(), 744);
        assert_eq!(YearMonth { year: 2026, month: 2 }.hours(), 672);
        assert_eq!(YearMonth { year: 2026, month: 12 }.next(), YearMonth { year: 2027, month: 1 });
    }

    #[test]
    fn codes_parse_strictly() {
        assert!(Country::parse("AU").is_ok());
        assert!(Country::parse("au").is_err());
        assert!(Country::parse("AUS").is_err());
        assert!(PlanId::parse("vps-1g").is_ok());
        assert!(PlanId::parse("VPS").is_err());
        assert!(Location::parse("syd").is_ok());
        assert!(Location::parse("s").is_err());
        assert!(TaxRate::new(rust_decimal::Decimal::new(1, 1)).is_ok());
        assert!(TaxRate::new(rust_decimal::Decimal::ONE).is_err());
        assert!(TaxRate::new(rust_decimal::Decimal::new(-1, 1)).is_err());
    }
}
