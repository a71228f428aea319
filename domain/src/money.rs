//! Money: a `Decimal` amount with its currency, at most 6 decimal places, rounded half-even.

use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

/// Ledger precision: micro-units.
pub const LEDGER_SCALE: u32 = 6;

/// Rounds to ledger precision, half to even. Every computed amount goes through here.
pub fn round_ledger(amount: Decimal) -> Decimal {
    amount.round_dp_with_strategy(LEDGER_SCALE, RoundingStrategy::MidpointNearestEven)
}

/// An ISO 4217 currency the ledger knows, with its minor unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency {
    code: [u8; 3],
    minor_unit_digits: u8,
}

/// Currencies and their minor-unit digits (ISO 4217).
const CURRENCIES: &[(&str, u8)] = &[
    ("AUD", 2),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("INR", 2),
    ("JPY", 0),
    ("KRW", 0),
    ("MXN", 2),
    ("MYR", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("PHP", 2),
    ("PLN", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TWD", 2),
    ("USD", 2),
    ("VND", 0),
    ("ZAR", 2),
    ("BHD", 3),
    ("KWD", 3),
    ("JOD", 3),
    ("OMR", 3),
];

impl Currency {
    pub const USD: Currency = Currency {
        code: *b"USD",
        minor_unit_digits: 2,
    };
    pub const AUD: Currency = Currency {
        code: *b"AUD",
        minor_unit_digits: 2,
    };
    pub const EUR: Currency = Currency {
        code: *b"EUR",
        minor_unit_digits: 2,
    };
    pub const JPY: Currency = Currency {
        code: *b"JPY",
        minor_unit_digits: 0,
    };

    /// Every currency this ledger knows, by code.
    pub fn codes() -> impl Iterator<Item = &'static str> {
        CURRENCIES.iter().map(|(code, _)| *code)
    }

    pub fn parse(code: &str) -> Result<Currency, MoneyError> {
        CURRENCIES
            .iter()
            .find(|(known, _)| *known == code)
            .map(|(known, digits)| Currency {
                code: known.as_bytes().try_into().expect("three letters"),
                minor_unit_digits: *digits,
            })
            .ok_or_else(|| MoneyError::UnknownCurrency(code.to_string()))
    }

    pub fn code(&self) -> &str {
        std::str::from_utf8(&self.code).expect("codes are ASCII")
    }

    pub fn minor_unit_digits(&self) -> u32 {
        u32::from(self.minor_unit_digits)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl TryFrom<String> for Currency {
    type Error = MoneyError;
    fn try_from(code: String) -> Result<Currency, MoneyError> {
        Currency::parse(&code)
    }
}

impl From<Currency> for String {
    fn from(currency: Currency) -> String {
        currency.code().to_string()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown currency {0:?} (an ISO 4217 code such as USD)")]
    UnknownCurrency(String),
    #[error("{0:?} is not a decimal amount")]
    NotAnAmount(String),
    #[error("{0} has more than 6 decimal places")]
    TooPrecise(Decimal),
    #[error("{0} is negative")]
    Negative(Decimal),
    #[error("{0} must be more than zero")]
    NotPositive(Decimal),
    #[error("cannot combine {0} with {1}")]
    CurrencyMismatch(Currency, Currency),
    #[error("{amount} {currency} is not a whole number of minor units")]
    NotWholeMinorUnits { amount: Decimal, currency: Currency },
    #[error("amount out of range")]
    Overflow,
}

/// An amount in a currency. Invariant: scale <= 6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub amount: Decimal,
    pub currency: Currency,
}

impl Money {
    /// Parses an amount written as a string (`"25.00"`): any sign, at most 6 decimal places.
    pub fn parse_signed(amount: &str, currency: Currency) -> Result<Money, MoneyError> {
        let trimmed = amount.trim();
        if trimmed.is_empty() || trimmed != amount || trimmed.contains(['e', 'E', '_']) {
            return Err(MoneyError::NotAnAmount(amount.to_string()));
        }
        let decimal = Decimal::from_str(trimmed).map_err(|_| MoneyError::NotAnAmount(amount.to_string()))?;
        Money::new(decimal, currency)
    }

    /// Parses a non-negative amount.
    pub fn parse(amount: &str, currency: Currency) -> Result<Money, MoneyError> {
        let money = Money::parse_signed(amount, currency)?;
        if money.amount.is_sign_negative() && !money.amount.is_zero() {
            return Err(MoneyError::Negative(money.amount));
        }
        Ok(money)
    }

    /// Parses an amount that must be more than zero.
    pub fn parse_positive(amount: &str, currency: Currency) -> Result<Money, MoneyError> {
        let money = Money::parse(amount, currency)?;
        if money.amount.is_zero() {
            return Err(MoneyError::NotPositive(money.amount));
        }
        Ok(money)
    }

    pub fn new(amount: Decimal, currency: Currency) -> Result<Money, MoneyError> {
        if amount.scale() > LEDGER_SCALE {
            let normalized = amount.normalize();
            if normalized.scale() > LEDGER_SCALE {
                return Err(MoneyError::TooPrecise(amount));
            }
            return Ok(Money {
                amount: normalized,
                currency,
            });
        }
        Ok(Money { amount, currency })
    }

    pub fn zero(currency: Currency) -> Money {
        Money {
            amount: Decimal::ZERO,
            currency,
        }
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let sum = self.amount.checked_add(other.amount).ok_or(MoneyError::Overflow)?;
        Ok(Money {
            amount: sum,
            currency: self.currency,
        })
    }

    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let difference = self.amount.checked_sub(other.amount).ok_or(MoneyError::Overflow)?;
        Ok(Money {
            amount: difference,
            currency: self.currency,
        })
    }

    fn same_currency(self, other: Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch(self.currency, other.currency))
        }
    }

    /// The amount in minor units (cents; yen for JPY), as Stripe takes it. Refuses an amount that
    /// is not a whole number of minor units rather than rounding money away.
    pub fn to_minor_units(self) -> Result<i64, MoneyError> {
        let scaled = self.amount * Decimal::from(10i64.pow(self.currency.minor_unit_digits()));
        if !scaled.fract().is_zero() {
            return Err(MoneyError::NotWholeMinorUnits {
                amount: self.amount,
                currency: self.currency,
            });
        }
        i64::try_from(scaled).map_err(|_| MoneyError::Overflow)
    }

    pub fn from_minor_units(units: i64, currency: Currency) -> Money {
        Money {
            amount: Decimal::new(units, currency.minor_unit_digits()),
            currency,
        }
    }

    /// Rounded half-even to the currency's minor unit, for display.
    pub fn display_amount(self) -> Decimal {
        display_round(self.amount, self.currency)
    }
}

/// Rounds half-even to the currency's minor unit, keeping trailing zeros (`5` -> `5.00`).
pub fn display_round(amount: Decimal, currency: Currency) -> Decimal {
    let mut rounded = amount.round_dp_with_strategy(currency.minor_unit_digits(), RoundingStrategy::MidpointNearestEven);
    rounded.rescale(currency.minor_unit_digits());
    rounded
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.amount, self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn parses_amounts_as_strings_and_refuses_the_rest() {
        assert_eq!(Money::parse("25.00", Currency::USD).unwrap().amount, dec!(25.00));
        assert_eq!(Money::parse("0.000001", Currency::USD).unwrap().amount, dec!(0.000001));
        assert_eq!(
            Money::parse("1.0000000", Currency::USD).unwrap().amount,
            dec!(1),
            "trailing zeros are not precision"
        );
        assert_eq!(
            Money::parse("0.0000001", Currency::USD),
            Err(MoneyError::TooPrecise(dec!(0.0000001)))
        );
        assert_eq!(Money::parse("-1", Currency::USD), Err(MoneyError::Negative(dec!(-1))));
        assert_eq!(Money::parse_positive("0", Currency::USD), Err(MoneyError::NotPositive(dec!(0))));
        assert_eq!(Money::parse_signed("-1.50", Currency::USD).unwrap().amount, dec!(-1.50));
        for bad in ["", " 1", "1e3", "abc", "1,5", "1_000", "NaN"] {
            assert!(
                matches!(Money::parse(bad, Currency::USD), Err(MoneyError::NotAnAmount(_))),
                "{bad:?}"
            );
        }
        assert_eq!(Currency::parse("XYZ"), Err(MoneyError::UnknownCurrency("XYZ".into())));
        assert_eq!(Currency::parse("usd"), Err(MoneyError::UnknownCurrency("usd".into())));
    }

    #[test]
    fn never_mixes_currencies() {
        let usd = Money::parse("1", Currency::USD).unwrap();
        let aud = Money::parse("1", Currency::AUD).unwrap();
        assert_eq!(
            usd.checked_add(aud),
            Err(MoneyError::CurrencyMismatch(Currency::USD, Currency::AUD))
        );
        assert_eq!(usd.checked_sub(usd).unwrap(), Money::zero(Currency::USD));
    }

    #[test]
    fn minor_units_include_zero_decimal_currencies() {
        assert_eq!(Money::parse("25.00", Currency::USD).unwrap().to_minor_units(), Ok(2500));
        assert_eq!(Money::parse("1500", Currency::JPY).unwrap().to_minor_units(), Ok(1500));
        let kwd = Currency::parse("KWD").unwrap();
        assert_eq!(Money::parse("1.234", kwd).unwrap().to_minor_units(), Ok(1234));
        assert!(matches!(
            Money::parse("10.5", Currency::JPY).unwrap().to_minor_units(),
            Err(MoneyError::NotWholeMinorUnits { .. })
        ));
        assert!(matches!(
            Money::parse("0.001", Currency::USD).unwrap().to_minor_units(),
            Err(MoneyError::NotWholeMinorUnits { .. })
        ));
        assert_eq!(Money::from_minor_units(2500, Currency::USD).amount.to_string(), "25.00");
        assert_eq!(Money::from_minor_units(1500, Currency::JPY).amount.to_string(), "1500");
    }

    #[test]
    fn rounding_is_half_even() {
        assert_eq!(round_ledger(dec!(0.0000005)), dec!(0.000000));
        assert_eq!(round_ledger(dec!(0.0000015)), dec!(0.000002));
        assert_eq!(round_ledger(dec!(0.0000025)), dec!(0.000002));
        assert_eq!(display_round(dec!(0.125), Currency::USD).to_string(), "0.12");
        assert_eq!(display_round(dec!(0.135), Currency::USD).to_string(), "0.14");
        assert_eq!(display_round(dec!(5), Currency::USD).to_string(), "5.00");
        assert_eq!(display_round(dec!(1499.5), Currency::JPY).to_string(), "1500");
    }

    #[test]
    fn money_serialises_amounts_as_strings() {
        let money = Money::parse("25.50", Currency::AUD).unwrap();
        assert_eq!(
            serde_json::to_value(money).unwrap(),
            serde_json::json!({"amount": "25.50", "currency": "AUD"})
        );
    }
}
