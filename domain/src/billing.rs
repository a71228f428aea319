//! The billing arithmetic of SPEC section 4, as pure functions.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::round_ledger;
use crate::types::TaxRate;

/// A month's price is spread over this many hours.
pub const HOURS_PER_MONTH: u32 = 730;
pub const SECONDS_PER_SLOT: i64 = 3_600;

/// `round(monthly_price / 730, 6)`.
pub fn rate_per_hour(monthly_price: Decimal) -> Decimal {
    round_ledger(monthly_price / Decimal::from(HOURS_PER_MONTH))
}

/// `round(net * tax_rate, 6)`.
pub fn tax_on(net: Decimal, tax_rate: TaxRate) -> Decimal {
    round_ledger(net * tax_rate.fraction())
}

/// What one (server, slot) costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotCharge {
    pub rate_per_hour: Decimal,
    pub net: Decimal,
    pub tax: Decimal,
    pub gross: Decimal,
    /// The monthly cap cut this slot's net below the hourly rate (to zero, possibly).
    pub capped: bool,
}

/// The charge for one slot: `net = min(rate, monthly - net_charged_this_month)`, never below zero.
pub fn slot_charge(monthly_price: Decimal, net_charged_this_month: Decimal, tax_rate: TaxRate) -> SlotCharge {
    let rate = rate_per_hour(monthly_price);
    let headroom = (monthly_price - net_charged_this_month).max(Decimal::ZERO);
    let net = rate.min(headroom);
    let tax = tax_on(net, tax_rate);
    SlotCharge {
        rate_per_hour: rate,
        net,
        tax,
        gross: net + tax,
        capped: net < rate,
    }
}

/// `round(amount * unused_seconds / 3600, 6)`: the unused part of a paid slot.
pub fn pro_rata(amount: Decimal, unused_seconds: i64) -> Decimal {
    let unused_seconds = unused_seconds.clamp(0, SECONDS_PER_SLOT);
    round_ledger(amount * Decimal::from(unused_seconds) / Decimal::from(SECONDS_PER_SLOT))
}

/// Hours of runway: available funds over the hourly burn; `None` when nothing burns.
pub fn runway_hours(available: Decimal, hourly_burn_gross: Decimal) -> Option<Decimal> {
    if hourly_burn_gross <= Decimal::ZERO {
        return None;
    }
    Some((available.max(Decimal::ZERO) / hourly_burn_gross).round_dp(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn gst() -> TaxRate {
        TaxRate::new(dec!(0.10)).unwrap()
    }

    #[test]
    fn the_worked_examples_of_the_spec() {
        assert_eq!(rate_per_hour(dec!(15.00)), dec!(0.020548));
        assert_eq!(tax_on(dec!(0.020548), gst()), dec!(0.002055));
        let charge = slot_charge(dec!(15.00), dec!(0), gst());
        assert_eq!(
            (charge.net, charge.tax, charge.gross, charge.capped),
            (dec!(0.020548), dec!(0.002055), dec!(0.022603), false)
        );
        assert_eq!(rate_per_hour(dec!(5.00)), dec!(0.006849));
    }

    #[test]
    fn a_744_hour_month_of_vps_1g_is_capped_at_exactly_the_monthly_price() {
        let monthly = dec!(5.00);
        let mut net_this_month = Decimal::ZERO;
        let mut capped_slots = 0;
        for _ in 0..744 {
            let charge = slot_charge(monthly, net_this_month, TaxRate::ZERO);
            net_this_month += charge.net;
            if charge.capped {
                capped_slots += 1;
            }
        }
        assert_eq!(net_this_month, dec!(5.00));
        // 730 * 0.006849 = 4.99977; the 731st slot takes the last 0.00023, the rest are zero.
        assert_eq!(capped_slots, 744 - 730);
        let last = slot_charge(monthly, net_this_month, TaxRate::ZERO);
        assert_eq!((last.net, last.gross, last.capped), (dec!(0), dec!(0), true));
    }

    #[test]
    fn a_3570_second_pro_rata_refund() {
        // Cancelled 30 s into a slot charged 0.020548 net + 0.002055 tax.
        assert_eq!(pro_rata(dec!(0.020548), 3570), dec!(0.020377));
        assert_eq!(pro_rata(dec!(0.002055), 3570), dec!(0.002038));
        assert_eq!(pro_rata(dec!(0.020548), 0), dec!(0));
        assert_eq!(pro_rata(dec!(0.020548), 3600), dec!(0.020548));
        assert_eq!(pro_rata(dec!(0.020548), 99_999), dec!(0.020548), "never more than the slot");
    }

    #[test]
    fn runway() {
        assert_eq!(runway_hours(dec!(10), dec!(0.5)), Some(dec!(20)));
        assert_eq!(runway_hours(dec!(10), dec!(0)), None);
        assert_eq!(runway_hours(dec!(-3), dec!(1)), Some(dec!(0)));
    }
}
