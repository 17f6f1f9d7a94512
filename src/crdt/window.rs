//! Sliding windows cut into sub-windows.
//!
//! A window of length `w` is cut into `k` sub-windows of length `L = w / k`. The sub-window of
//! an instant is `now_us / L`: sub-window `i` covers `[i·L, (i+1)·L)`. What a sub-window
//! consumed is counted until the whole sub-window is more than `w` old, that is while
//! `now_us < (i+1)·L + w`. An admission at `t` lies in sub-window `i = t / L`, so
//! `(i+1)·L > t` and it is still counted at `t + w`: every admission inside any closed
//! interval of length `w` is counted at the interval's end, so a limit checked against the
//! live count never admits more than the limit in any interval of length `w`. The price is at
//! most one sub-window (`w / k`) of extra memory: an admission is counted for between `w` and
//! `w + L`.
//!
//! Sub-windows more than `2·w` old (`now_us ≥ (i+1)·L + 2·w`) are garbage: no peer whose clock
//! is within `w` of ours can still count them, so every table drops them. Sub-windows more
//! than one window ahead of our clock can only come from a broken or hostile peer and are
//! refused ([`WindowSpec::max_accepted`]).
//!
//! Pure: every function takes `now_us`.

use thiserror::Error;

/// Default number of sub-windows per window (`k`).
pub const DEFAULT_SUB_WINDOWS: u32 = 10;

/// Largest accepted `k`: more sub-windows cost memory per key and buy almost nothing.
pub const MAX_SUB_WINDOWS: u32 = 1000;

/// Why a window specification was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WindowError {
    /// A window of zero length cannot count anything.
    #[error("window length must be positive")]
    ZeroWindow,
    /// `k` must be between 1 and [`MAX_SUB_WINDOWS`].
    #[error("sub-window count must be between 1 and {MAX_SUB_WINDOWS}, got {0}")]
    SubWindows(u32),
    /// `w` must be a multiple of `k` so every sub-window has the same integer length; use
    /// [`WindowSpec::rounded`] to round `w` up instead.
    #[error("window {window_us}us is not a multiple of {sub_windows} sub-windows")]
    NotDivisible {
        /// The requested window length.
        window_us: u64,
        /// The requested sub-window count.
        sub_windows: u32,
    },
}

/// The shape of a sliding window: its length `w` and its number of sub-windows `k`.
///
/// Fields are private so that every value in existence is valid (`w > 0`, `1 ≤ k ≤ 1000`,
/// `k | w`): the arithmetic below never divides by zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowSpec {
    window_us: u64,
    sub_windows: u32,
}

impl WindowSpec {
    /// A window of `window_us` microseconds in `sub_windows` sub-windows. Refuses a `window_us`
    /// that is not a multiple of `sub_windows` rather than silently changing the window.
    pub fn new(window_us: u64, sub_windows: u32) -> Result<Self, WindowError> {
        if window_us == 0 {
            return Err(WindowError::ZeroWindow);
        }
        if sub_windows == 0 || sub_windows > MAX_SUB_WINDOWS {
            return Err(WindowError::SubWindows(sub_windows));
        }
        if !window_us.is_multiple_of(u64::from(sub_windows)) {
            return Err(WindowError::NotDivisible {
                window_us,
                sub_windows,
            });
        }
        Ok(Self {
            window_us,
            sub_windows,
        })
    }

    /// Like [`WindowSpec::new`], but rounds `window_us` *up* to the next multiple of
    /// `sub_windows`. Rounding up only makes the limit stricter: an admission is remembered a
    /// little longer, never shorter.
    pub fn rounded(window_us: u64, sub_windows: u32) -> Result<Self, WindowError> {
        if sub_windows == 0 || sub_windows > MAX_SUB_WINDOWS {
            return Err(WindowError::SubWindows(sub_windows));
        }
        let k = u64::from(sub_windows);
        let window = window_us
            .checked_next_multiple_of(k)
            .unwrap_or(u64::MAX - u64::MAX % k);
        Self::new(window, sub_windows)
    }

    /// `window_us` with the default `k` ([`DEFAULT_SUB_WINDOWS`]), rounded up.
    pub fn with_default_sub_windows(window_us: u64) -> Result<Self, WindowError> {
        Self::rounded(window_us, DEFAULT_SUB_WINDOWS)
    }

    /// The window length `w` in microseconds.
    pub fn window_us(&self) -> u64 {
        self.window_us
    }

    /// The number of sub-windows `k`.
    pub fn sub_windows(&self) -> u32 {
        self.sub_windows
    }

    /// The sub-window length `L = w / k` (never zero).
    pub fn sub_len_us(&self) -> u64 {
        // Both validated in `new`: k ≥ 1 and k | w with w > 0, so L ≥ 1.
        self.window_us / u64::from(self.sub_windows)
    }

    /// The sub-window index of an instant.
    pub fn sub_window(&self, now_us: u64) -> u64 {
        now_us / self.sub_len_us()
    }

    /// The oldest sub-window still counted at `now_us`: `i` is live iff
    /// `now_us < (i+1)·L + w`, i.e. iff `i ≥ (now_us − w) / L`.
    pub fn oldest_live(&self, now_us: u64) -> u64 {
        now_us.saturating_sub(self.window_us) / self.sub_len_us()
    }

    /// Whether what sub-window `sub` consumed is still counted at `now_us`.
    pub fn is_live(&self, sub: u64, now_us: u64) -> bool {
        sub >= self.oldest_live(now_us)
    }

    /// The instant from which sub-window `sub` is no longer counted: `(sub+1)·L + w`.
    pub fn release_at_us(&self, sub: u64) -> u64 {
        sub.saturating_add(1)
            .saturating_mul(self.sub_len_us())
            .saturating_add(self.window_us)
    }

    /// Sub-windows below this index are garbage at `now_us` (more than `2·w` old).
    pub fn gc_horizon(&self, now_us: u64) -> u64 {
        now_us.saturating_sub(self.window_us.saturating_mul(2)) / self.sub_len_us()
    }

    /// The newest sub-window a peer may report at `now_us`: one window ahead of ours. A peer
    /// further ahead has a broken clock or is lying; its entries are refused and counted.
    pub fn max_accepted(&self, now_us: u64) -> u64 {
        self.sub_window(now_us)
            .saturating_add(u64::from(self.sub_windows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn validation() {
        assert_eq!(WindowSpec::new(0, 10), Err(WindowError::ZeroWindow));
        assert_eq!(WindowSpec::new(100, 0), Err(WindowError::SubWindows(0)));
        assert_eq!(
            WindowSpec::new(100, 1001),
            Err(WindowError::SubWindows(1001))
        );
        assert!(matches!(
            WindowSpec::new(105, 10),
            Err(WindowError::NotDivisible { .. })
        ));
        let r = WindowSpec::rounded(105, 10).unwrap();
        assert_eq!((r.window_us(), r.sub_len_us()), (110, 11));
        let d = WindowSpec::with_default_sub_windows(60_000_000).unwrap();
        assert_eq!((d.sub_windows(), d.sub_len_us()), (10, 6_000_000));
        assert!(WindowSpec::rounded(u64::MAX, 7).is_ok());
    }

    #[test]
    fn sliding_rule_at_the_edges() {
        let s = WindowSpec::new(100, 10).unwrap(); // L = 10
        assert_eq!(s.sub_window(25), 2);
        // Sub-window 2 covers [20, 30) and is counted while now < 30 + 100.
        assert!(s.is_live(2, 129));
        assert!(!s.is_live(2, 130));
        assert_eq!(s.release_at_us(2), 130);
        assert_eq!(s.oldest_live(130), 3);
        // Garbage once more than 2w old: now >= 30 + 200.
        assert_eq!(s.gc_horizon(229), 2);
        assert_eq!(s.gc_horizon(230), 3);
        assert_eq!(s.max_accepted(25), 12);
    }

    proptest! {
        /// An admission at `t` is counted at every instant of `[t, t + w]` and released at the
        /// latest `w + L` after `t`.
        #[test]
        fn admission_counted_for_at_least_w(w in 1u64..10_000, k in 1u32..50, t in 0u64..1_000_000) {
            let s = WindowSpec::rounded(w, k).unwrap();
            let sub = s.sub_window(t);
            prop_assert!(s.is_live(sub, t));
            prop_assert!(s.is_live(sub, t + s.window_us()));
            prop_assert!(!s.is_live(sub, t + s.window_us() + s.sub_len_us()));
            prop_assert!(s.gc_horizon(t + s.window_us()) <= sub);
        }
    }
}
