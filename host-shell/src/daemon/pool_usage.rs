//! Pool usage warnings: the SPM warns in its log when the pool fills past
//! thresholds (by default 80, 85, 90 and 95 % of its extents, as lvm2's
//! dmeventd warns about thin pools), so a LUN can be added before guests
//! pause, and says so again when an added LUN brings usage back under.
//!
//! [`UsageWatch`] is the decision alone, without I/O: thresholds in, the
//! pool's used and total extents in, "reached X" or "back under X" (or
//! nothing) out. The SPM daemon feeds it at start, after every commit
//! and after every admin request, logs what it answers, and publishes
//! its state as metrics.

use std::fmt;

/// The thresholds, in percent of the pool's extents: each 1..=100,
/// strictly increasing. None at all: no warnings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolWarn(Vec<u8>);

impl PoolWarn {
    /// The default thresholds, dmeventd's.
    pub const DEFAULT: [u8; 4] = [80, 85, 90, 95];

    /// Thresholds `percents`, or why they are not thresholds.
    pub fn new(percents: Vec<u8>) -> Result<PoolWarn, String> {
        if let Some(p) = percents.iter().find(|&&p| !(1..=100).contains(&p)) {
            return Err(format!("{p} is not a percentage from 1 to 100"));
        }
        if let Some(w) = percents.windows(2).find(|w| w[0] >= w[1]) {
            return Err(format!("{} comes after {}", w[1], w[0]));
        }
        Ok(PoolWarn(percents))
    }

    /// No warnings.
    pub fn off() -> PoolWarn {
        PoolWarn(Vec::new())
    }

    /// The thresholds, lowest first (empty: off).
    pub fn percents(&self) -> &[u8] {
        &self.0
    }
}

impl Default for PoolWarn {
    fn default() -> PoolWarn {
        PoolWarn(PoolWarn::DEFAULT.to_vec())
    }
}

/// As the flag takes it: `80,85,90,95`, or `none`.
impl fmt::Display for PoolWarn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let texts: Vec<String> = self.0.iter().map(u8::to_string).collect();
        f.write_str(&texts.join(","))
    }
}

/// What a new usage figure calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crossing {
    /// Usage rose to or past this threshold (the highest one it passed,
    /// when it passed several at once): warn.
    Reached(u8),
    /// Usage fell below this threshold (the lowest one it fell below,
    /// when it fell below several at once): it may warn again later.
    BackUnder(u8),
}

/// How far (percentage points of the pool) usage must fall under a
/// threshold it reached before that threshold counts as left (and may warn
/// again).
pub const HYSTERESIS_PERCENT: u8 = 2;

/// Which thresholds the pool's usage has reached, as usage changes.
#[derive(Debug, Clone)]
pub struct UsageWatch {
    thresholds: PoolWarn,
    /// The index of the highest threshold reached and warned about.
    reached: Option<usize>,
}

impl UsageWatch {
    /// A watch that has warned about nothing yet: the first
    /// [`UsageWatch::update`] warns about a pool already past a threshold.
    pub fn new(thresholds: PoolWarn) -> UsageWatch {
        UsageWatch {
            thresholds,
            reached: None,
        }
    }

    /// Takes the pool's usage now: `used` of `total` extents. A pool of
    /// no extents changes nothing (there is nothing to warn about).
    pub fn update(&mut self, used: u64, total: u64) -> Option<Crossing> {
        if total == 0 {
            return None;
        }
        let percents = self.thresholds.percents();
        // The highest threshold with used / total >= t / 100, in integers.
        let at_least = |t: u8| u128::from(used) * 100 >= u128::from(t) * u128::from(total);
        let up = percents.iter().rposition(|&t| at_least(t));
        // A threshold reached is left only once usage is HYSTERESIS_PERCENT
        // under it: deletes and reduces that move usage back and forth
        // across a threshold warn once.
        let down = percents
            .iter()
            .rposition(|&t| at_least(t.saturating_sub(HYSTERESIS_PERCENT)));
        let before = self.reached;
        let level = match (up, before) {
            (Some(u), Some(b)) if u > b => Some(u),
            (_, Some(b)) => down.map(|d| d.min(b)).max(up),
            (u, None) => u,
        };
        self.reached = level;
        match (level, before) {
            (Some(now), None) => Some(Crossing::Reached(percents[now])),
            (Some(now), Some(was)) if now > was => Some(Crossing::Reached(percents[now])),
            (now, Some(was)) if now.is_none_or(|now| now < was) => {
                // The threshold just above the new level is the one usage
                // is now under.
                Some(Crossing::BackUnder(percents[now.map_or(0, |n| n + 1)]))
            }
            _ => None,
        }
    }

    /// The highest threshold reached (percent), if any.
    pub fn reached(&self) -> Option<u8> {
        self.reached.map(|i| self.thresholds.percents()[i])
    }
}

/// `used` of `total` as a percentage rounded down to a tenth, so that a
/// pool just under a threshold never shows as at it: `79.9`.
pub fn percent_text(used: u64, total: u64) -> String {
    if total == 0 {
        return "0.0".into();
    }
    let permille = u128::from(used) * 1000 / u128::from(total);
    format!("{}.{}", permille / 10, permille % 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(percents: &[u8]) -> UsageWatch {
        UsageWatch::new(PoolWarn::new(percents.to_vec()).unwrap())
    }

    #[test]
    fn rising_past_each_threshold_warns_once() {
        let mut w = watch(&PoolWarn::DEFAULT);
        assert_eq!(w.update(0, 100), None);
        assert_eq!(w.update(79, 100), None);
        assert_eq!(w.update(80, 100), Some(Crossing::Reached(80)));
        assert_eq!(w.update(81, 100), None);
        assert_eq!(w.update(84, 100), None);
        assert_eq!(w.update(85, 100), Some(Crossing::Reached(85)));
        assert_eq!(w.reached(), Some(85));
        assert_eq!(w.update(99, 100), Some(Crossing::Reached(95)));
        assert_eq!(w.update(100, 100), None);
        assert_eq!(w.reached(), Some(95));
    }

    #[test]
    fn a_threshold_is_reached_exactly_not_by_rounding() {
        // 79.99 %: not 80.
        let mut w = watch(&[80]);
        assert_eq!(w.update(7999, 10_000), None);
        assert_eq!(w.update(8000, 10_000), Some(Crossing::Reached(80)));
        // Sizes far beyond u64 / 100 do not overflow.
        let mut w = watch(&[50]);
        assert_eq!(
            w.update(u64::MAX / 2 + 1, u64::MAX),
            Some(Crossing::Reached(50))
        );
    }

    #[test]
    fn several_at_once_warn_about_the_highest_only() {
        let mut w = watch(&PoolWarn::DEFAULT);
        // At start, a pool already at 92 %.
        assert_eq!(w.update(92, 100), Some(Crossing::Reached(90)));
        assert_eq!(w.update(92, 100), None);
        let mut w = watch(&PoolWarn::DEFAULT);
        assert_eq!(w.update(10, 100), None);
        assert_eq!(w.update(100, 100), Some(Crossing::Reached(95)));
    }

    #[test]
    fn falling_says_back_under_and_rising_again_warns_again() {
        let mut w = watch(&PoolWarn::DEFAULT);
        assert_eq!(w.update(96, 100), Some(Crossing::Reached(95)));
        // A LUN added: 96 of 110 extents is 87 %, under 90 and 95.
        assert_eq!(w.update(96, 110), Some(Crossing::BackUnder(90)));
        assert_eq!(w.reached(), Some(85));
        assert_eq!(w.update(96, 110), None);
        // Filling again warns at 90 again.
        assert_eq!(w.update(99, 110), Some(Crossing::Reached(90)));
        // A large LUN: under every threshold.
        assert_eq!(w.update(99, 1000), Some(Crossing::BackUnder(80)));
        assert_eq!(w.reached(), None);
        assert_eq!(w.update(100, 1000), None);
        assert_eq!(w.update(800, 1000), Some(Crossing::Reached(80)));
    }

    #[test]
    fn a_pool_of_no_extents_never_warns() {
        let mut w = watch(&PoolWarn::DEFAULT);
        assert_eq!(w.update(0, 0), None);
        assert_eq!(w.reached(), None);
        assert_eq!(w.update(5, 0), None);
        // And changes nothing already reached.
        assert_eq!(w.update(9, 10), Some(Crossing::Reached(90)));
        assert_eq!(w.update(0, 0), None);
        assert_eq!(w.reached(), Some(90));
        assert_eq!(percent_text(0, 0), "0.0");
    }

    #[test]
    fn off_never_warns() {
        let mut w = UsageWatch::new(PoolWarn::off());
        for (used, total) in [(0, 10), (10, 10), (5, 10), (0, 0)] {
            assert_eq!(w.update(used, total), None);
        }
        assert_eq!(w.reached(), None);
        assert_eq!(PoolWarn::off().to_string(), "none");
    }

    #[test]
    fn thresholds_are_percentages_in_increasing_order() {
        assert_eq!(PoolWarn::default().to_string(), "80,85,90,95");
        assert!(PoolWarn::new(vec![1, 100]).is_ok());
        assert!(PoolWarn::new(vec![0]).unwrap_err().contains("1 to 100"));
        assert!(PoolWarn::new(vec![101]).unwrap_err().contains("1 to 100"));
        assert_eq!(
            PoolWarn::new(vec![90, 80]).unwrap_err(),
            "80 comes after 90"
        );
        assert_eq!(
            PoolWarn::new(vec![80, 80]).unwrap_err(),
            "80 comes after 80"
        );
    }

    #[test]
    fn percentages_are_rounded_down() {
        assert_eq!(percent_text(7999, 10_000), "79.9");
        assert_eq!(percent_text(8, 10), "80.0");
        assert_eq!(percent_text(1, 3), "33.3");
        assert_eq!(percent_text(10, 10), "100.0");
    }

    #[test]
    fn usage_that_dips_just_under_a_threshold_and_back_warns_once() {
        let mut w = UsageWatch::new(PoolWarn::default());
        assert_eq!(w.update(80, 100), Some(Crossing::Reached(80)));
        // A delete, then an extension, then another delete: within
        // HYSTERESIS_PERCENT of 80 % nothing is logged.
        assert_eq!(w.update(79, 100), None);
        assert_eq!(w.update(80, 100), None);
        assert_eq!(w.update(78, 100), None);
        assert_eq!(w.reached(), Some(80));
        // Clearly under: back under once, and a warning when reached again.
        assert_eq!(w.update(77, 100), Some(Crossing::BackUnder(80)));
        assert_eq!(w.update(79, 100), None);
        assert_eq!(w.update(80, 100), Some(Crossing::Reached(80)));
        // Under a higher threshold by less than the margin: still reached.
        assert_eq!(w.update(90, 100), Some(Crossing::Reached(90)));
        assert_eq!(w.update(88, 100), None);
        assert_eq!(w.update(87, 100), Some(Crossing::BackUnder(90)));
    }
}
