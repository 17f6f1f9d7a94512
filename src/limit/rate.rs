//! Rates written as `"100/10s"`: an amount per period.

use std::fmt;
use std::time::Duration;

/// `amount` units per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Units per period; at least 1 when parsed.
    pub amount: u64,
    /// The window the amount is spread over; at least 1 ms when parsed.
    pub period: Duration,
}

impl Rate {
    /// Parses `"100/10s"`, `"5/s"`, `"600/1m"`, `"1000/1h"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (amount, period) = text.split_once('/').ok_or_else(|| {
            format!("invalid rate {text:?}: expected AMOUNT/PERIOD such as \"100/10s\"")
        })?;
        let amount: u64 = amount
            .trim()
            .parse()
            .map_err(|_| format!("invalid rate {text:?}: {amount:?} is not a whole number"))?;
        if amount == 0 {
            return Err(format!(
                "invalid rate {text:?}: the amount must be at least 1"
            ));
        }
        let period = period.trim();
        // "5/s" means one second.
        let period_text = if period.starts_with(|c: char| c.is_ascii_digit()) {
            period.to_owned()
        } else {
            format!("1{period}")
        };
        let period = humantime::parse_duration(&period_text)
            .map_err(|e| format!("invalid rate {text:?}: period {period:?}: {e}"))?;
        if period < Duration::from_millis(1) {
            return Err(format!(
                "invalid rate {text:?}: the period must be at least 1ms"
            ));
        }
        Ok(Self { amount, period })
    }

    /// The window in whole seconds, at least 1, as `RateLimit-Policy`'s `w` wants it.
    pub fn window_secs(&self) -> u64 {
        self.period.as_secs().max(1)
    }

    /// The period in microseconds (saturating at `u64::MAX`), the unit of the bucket math
    /// ([`crate::limit::bucket`]) and of global windows.
    pub fn period_us(&self) -> u64 {
        u64::try_from(self.period.as_micros()).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.amount,
            humantime::format_duration(self.period)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(
            Rate::parse("100/10s").unwrap().period,
            Duration::from_secs(10)
        );
        assert_eq!(Rate::parse("5/s").unwrap().period, Duration::from_secs(1));
        assert_eq!(Rate::parse("600/1m").unwrap().window_secs(), 60);
        assert_eq!(Rate::parse(" 30 / 1min ").unwrap().amount, 30);
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["100", "0/1s", "x/1s", "10/forever", "10/0s", "-1/1s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }
}
