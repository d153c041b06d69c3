//! Time as the engines see it: a monotonic instant the caller supplies.
//!
//! The engines have no clock. Every input carries the current [`Instant`],
//! and every engine says when it next wants to be woken
//! (`poll_timeout`). Tests drive them in simulated time by jumping to the
//! next timeout.

use core::ops::{Add, Sub};
use core::time::Duration;

/// A point in monotonic time, in microseconds since an arbitrary origin
/// chosen by the caller (such as the process start).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Instant(pub u64);

impl Instant {
    /// The origin.
    pub const ZERO: Instant = Instant(0);

    /// Microseconds since the origin.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Instant) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_add(micros))
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;
    fn sub(self, d: Duration) -> Instant {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        Instant(self.0.saturating_sub(micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_panicking() {
        assert_eq!(Instant(5) + Duration::from_micros(7), Instant(12));
        assert_eq!(
            Instant(u64::MAX) + Duration::from_secs(1),
            Instant(u64::MAX)
        );
        assert_eq!(Instant(5) - Duration::from_micros(7), Instant(0));
        assert_eq!(
            Instant(10).saturating_since(Instant(4)),
            Duration::from_micros(6)
        );
        assert_eq!(Instant(4).saturating_since(Instant(10)), Duration::ZERO);
    }
}
