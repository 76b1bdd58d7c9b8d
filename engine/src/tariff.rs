//! Fees: a [`Tariff`] says what one kind of operation costs, a [`TariffTable`] holds one per
//! operation code.
//!
//! A fee is a fixed part plus a percentage of the amount, clamped to a minimum and an optional
//! maximum, all in integer minor units (qəpik). The one rounding step is documented on
//! [`Tariff::fee`]; everything else is exact.

use std::collections::BTreeMap;

/// Basis points in a whole: 10 000 bps = 100 %.
const BPS_PER_WHOLE: u32 = 10_000;

/// The fee rule for one kind of operation. Amounts are minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tariff {
    /// Charged on every operation, whatever the amount.
    pub fixed: u64,
    /// The percentage part in basis points (hundredths of a percent), `0..=10_000`.
    pub percent_bps: u32,
    /// The least fee charged.
    pub min: u64,
    /// The most fee charged; `0` means no maximum.
    pub max: u64,
}

/// Why a tariff is invalid or its fee cannot be represented.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TariffError {
    #[error("tariff percentage is {bps} basis points, more than 10000 (100%)")]
    PercentTooHigh { bps: u32 },
    #[error("tariff minimum {min} is above its maximum {max}")]
    MinAboveMax { min: u64, max: u64 },
    #[error("tariff fixed part {fixed} is above its maximum {max}")]
    FixedAboveMax { fixed: u64, max: u64 },
    #[error("fee does not fit in 64 bits of minor units")]
    Overflow,
}

impl TariffError {
    /// A stable machine-readable code for API responses and metrics.
    pub const fn code(&self) -> &'static str {
        match self {
            TariffError::PercentTooHigh { .. } => "tariff_percent_too_high",
            TariffError::MinAboveMax { .. } => "tariff_min_above_max",
            TariffError::FixedAboveMax { .. } => "tariff_fixed_above_max",
            TariffError::Overflow => "tariff_overflow",
        }
    }
}

impl Tariff {
    /// A tariff that charges nothing.
    pub const FREE: Tariff = Tariff { fixed: 0, percent_bps: 0, min: 0, max: 0 };

    pub fn validate(&self) -> Result<(), TariffError> {
        if self.percent_bps > BPS_PER_WHOLE {
            return Err(TariffError::PercentTooHigh { bps: self.percent_bps });
        }
        if self.max > 0 {
            if self.min > self.max {
                return Err(TariffError::MinAboveMax { min: self.min, max: self.max });
            }
            if self.fixed > self.max {
                return Err(TariffError::FixedAboveMax { fixed: self.fixed, max: self.max });
            }
        }
        Ok(())
    }

    /// The fee for `amount` minor units: `fixed + percentage`, raised to `min`, then lowered to
    /// `max` when `max > 0`.
    ///
    /// Rounding: the percentage part `amount × percent_bps / 10 000` is rounded half up to a
    /// whole minor unit, so 0.5 qəpik becomes 1 and 0.4999… becomes 0. It is the only rounding;
    /// the arithmetic is done in `u128`, so there is no intermediate overflow.
    ///
    /// Fails when the tariff is invalid (see [`Tariff::validate`]) or the fee exceeds `u64`.
    pub fn fee(&self, amount: u64) -> Result<u64, TariffError> {
        self.validate()?;
        let whole = u128::from(BPS_PER_WHOLE);
        let percent = (u128::from(amount) * u128::from(self.percent_bps) + whole / 2) / whole;
        let mut fee = u128::from(self.fixed) + percent;
        fee = fee.max(u128::from(self.min));
        if self.max > 0 {
            fee = fee.min(u128::from(self.max));
        }
        u64::try_from(fee).map_err(|_| TariffError::Overflow)
    }
}

/// Tariffs keyed by a caller-chosen operation code (top-up, P2P, bill payment, cash-out…).
/// An operation without a tariff is free.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TariffTable {
    by_code: BTreeMap<u16, Tariff>,
}

impl TariffTable {
    pub fn new() -> TariffTable {
        TariffTable::default()
    }

    /// Sets or replaces the tariff for `code`; an invalid tariff leaves the table unchanged.
    pub fn set(&mut self, code: u16, tariff: Tariff) -> Result<(), TariffError> {
        tariff.validate()?;
        self.by_code.insert(code, tariff);
        Ok(())
    }

    /// Takes the tariff for `code` out; the operation is free from then on.
    pub fn remove(&mut self, code: u16) -> Option<Tariff> {
        self.by_code.remove(&code)
    }

    pub fn get(&self, code: u16) -> Option<&Tariff> {
        self.by_code.get(&code)
    }

    /// The fee for `amount` under `code`'s tariff, or 0 when `code` has none.
    pub fn fee(&self, code: u16, amount: u64) -> Result<u64, TariffError> {
        self.by_code.get(&code).map_or(Ok(0), |t| t.fee(amount))
    }

    /// The tariffs in ascending code order.
    pub fn iter(&self) -> impl Iterator<Item = (u16, &Tariff)> + '_ {
        self.by_code.iter().map(|(code, tariff)| (*code, tariff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn percent(bps: u32) -> Tariff {
        Tariff { percent_bps: bps, ..Tariff::FREE }
    }

    #[test]
    fn percentage_rounds_half_up() {
        // 1% of 50 qəpik is exactly 0.5 → 1; of 49 it is 0.49 → 0; of 149 it is 1.49 → 1.
        let one_percent = percent(100);
        assert_eq!(one_percent.fee(50), Ok(1));
        assert_eq!(one_percent.fee(49), Ok(0));
        assert_eq!(one_percent.fee(149), Ok(1));
        assert_eq!(one_percent.fee(150), Ok(2));
        // 1 bps: 5000 minor units is exactly 0.5, 4999 just below.
        let one_bps = percent(1);
        assert_eq!(one_bps.fee(5_000), Ok(1));
        assert_eq!(one_bps.fee(4_999), Ok(0));
        assert_eq!(one_bps.fee(15_000), Ok(2));
        assert_eq!(one_bps.fee(14_999), Ok(1));
        // 1.5% of 1 000 AZN = 15 AZN exactly.
        assert_eq!(percent(150).fee(100_000), Ok(1_500));
        assert_eq!(percent(10_000).fee(12_345), Ok(12_345));
    }

    #[test]
    fn fixed_part_adds_to_percentage() {
        let t = Tariff { fixed: 20, percent_bps: 100, min: 0, max: 0 };
        assert_eq!(t.fee(10_000), Ok(120));
        assert_eq!(t.fee(50), Ok(21));
    }

    #[test]
    fn zero_amount() {
        assert_eq!(Tariff::FREE.fee(0), Ok(0));
        assert_eq!(percent(10_000).fee(0), Ok(0));
        assert_eq!(Tariff { fixed: 10, percent_bps: 100, min: 0, max: 0 }.fee(0), Ok(10));
        assert_eq!(Tariff { fixed: 0, percent_bps: 100, min: 30, max: 500 }.fee(0), Ok(30));
    }

    #[test]
    fn clamps_to_min_and_max() {
        let t = Tariff { fixed: 0, percent_bps: 100, min: 30, max: 500 };
        assert_eq!(t.fee(2_999), Ok(30));
        assert_eq!(t.fee(3_000), Ok(30));
        assert_eq!(t.fee(3_100), Ok(31));
        assert_eq!(t.fee(50_000), Ok(500));
        assert_eq!(t.fee(50_049), Ok(500));
        assert_eq!(t.fee(u64::MAX), Ok(500));
        // min == max is a flat fee.
        let flat = Tariff { fixed: 0, percent_bps: 250, min: 100, max: 100 };
        assert_eq!(flat.fee(1), Ok(100));
        assert_eq!(flat.fee(1_000_000), Ok(100));
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let t = Tariff { fixed: 1, percent_bps: 10_000, min: 0, max: 0 };
        assert_eq!(t.fee(u64::MAX), Err(TariffError::Overflow));
        assert_eq!(t.fee(u64::MAX - 1), Ok(u64::MAX));
        assert_eq!(percent(10_000).fee(u64::MAX), Ok(u64::MAX));
        // With a maximum the fee is bounded, so the same inputs succeed.
        let capped = Tariff { max: 1_000, ..t };
        assert_eq!(capped.fee(u64::MAX), Ok(1_000));
    }

    #[test]
    fn validation() {
        assert_eq!(percent(10_000).validate(), Ok(()));
        assert_eq!(percent(10_001).validate(), Err(TariffError::PercentTooHigh { bps: 10_001 }));
        assert_eq!(
            Tariff { min: 10, max: 5, ..Tariff::FREE }.validate(),
            Err(TariffError::MinAboveMax { min: 10, max: 5 })
        );
        assert_eq!(
            Tariff { fixed: 10, max: 5, ..Tariff::FREE }.validate(),
            Err(TariffError::FixedAboveMax { fixed: 10, max: 5 })
        );
        // Without a maximum, min and fixed are unconstrained.
        assert_eq!(Tariff { fixed: 10, min: 1_000, ..Tariff::FREE }.validate(), Ok(()));
        // A tariff built by hand, never validated, fails instead of charging.
        assert_eq!(percent(20_000).fee(100), Err(TariffError::PercentTooHigh { bps: 20_000 }));
    }

    #[test]
    fn table() {
        let mut table = TariffTable::new();
        let p2p = Tariff { fixed: 0, percent_bps: 50, min: 10, max: 1_000 };
        assert_eq!(table.set(2, p2p), Ok(()));
        assert_eq!(table.set(1, Tariff { fixed: 5, ..Tariff::FREE }), Ok(()));
        assert_eq!(table.set(3, percent(10_001)), Err(TariffError::PercentTooHigh { bps: 10_001 }));
        assert_eq!(table.get(3), None);
        assert_eq!(table.get(2), Some(&p2p));
        assert_eq!(table.fee(2, 10_000), Ok(50));
        assert_eq!(table.fee(1, 10_000), Ok(5));
        assert_eq!(table.fee(9, 10_000), Ok(0));
        let codes: Vec<u16> = table.iter().map(|(code, _)| code).collect();
        assert_eq!(codes, vec![1, 2]);
        // Replacing keeps one entry per code.
        assert_eq!(table.set(2, Tariff::FREE), Ok(()));
        assert_eq!(table.fee(2, 10_000), Ok(0));
        assert_eq!(table.iter().count(), 2);
        assert_eq!(table.remove(1), Some(Tariff { fixed: 5, ..Tariff::FREE }));
        assert_eq!(table.remove(1), None);
        assert_eq!(table.fee(1, 10_000), Ok(0));
    }

    fn valid_tariff() -> impl Strategy<Value = Tariff> {
        (any::<u64>(), 0u32..=10_000, any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
            |(a, percent_bps, b, c, capped)| {
                if capped {
                    // Sort three values so that fixed, min <= max and max > 0.
                    let mut v = [a, b, c.max(1)];
                    v.sort_unstable();
                    Tariff { fixed: v[0], percent_bps, min: v[1], max: v[2] }
                } else {
                    Tariff { fixed: a, percent_bps, min: b, max: 0 }
                }
            },
        )
    }

    proptest! {
        #[test]
        fn monotone_without_clamps(
            fixed in any::<u64>(), bps in 0u32..=10_000, a in any::<u64>(), b in any::<u64>()
        ) {
            let t = Tariff { fixed, percent_bps: bps, min: 0, max: 0 };
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            if let (Ok(f_lo), Ok(f_hi)) = (t.fee(lo), t.fee(hi)) {
                prop_assert!(f_lo <= f_hi);
            }
            // Overflow is monotone too: once the fee overflows, larger amounts overflow.
            if t.fee(lo).is_err() {
                prop_assert_eq!(t.fee(hi), Err(TariffError::Overflow));
            }
        }

        #[test]
        fn within_bounds(t in valid_tariff(), amount in any::<u64>()) {
            match t.fee(amount) {
                Ok(fee) => {
                    prop_assert!(fee >= t.min);
                    // A valid tariff's fixed part is at most its maximum, so it is never clamped away.
                    prop_assert!(fee >= t.fixed);
                    if t.max > 0 {
                        prop_assert!(fee <= t.max);
                    }
                }
                Err(e) => {
                    prop_assert_eq!(e, TariffError::Overflow);
                    prop_assert_eq!(t.max, 0);
                }
            }
        }

        #[test]
        fn never_panics(
            fixed in any::<u64>(), bps in any::<u32>(), min in any::<u64>(), max in any::<u64>(),
            amount in any::<u64>()
        ) {
            let _ = Tariff { fixed, percent_bps: bps, min, max }.fee(amount);
        }
    }
}
