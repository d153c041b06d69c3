//! Statistics of samples: exact percentiles of a sorted set, and
//! percentiles of a stream in bounded memory. The bench, the demo and the
//! daemons' metrics report with them.

/// The `p`-th percentile (nearest rank) of sorted samples; 0 if none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `x` rounded to `digits` decimal places.
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The smallest value [`Percentiles`] tells apart; smaller ones count as
/// this (in milliseconds: a microsecond).
pub const PERCENTILES_LOW: f64 = 1e-3;

/// The largest value [`Percentiles`] tells apart; larger ones count as
/// this (in milliseconds: about 17 minutes).
pub const PERCENTILES_HIGH: f64 = 1e6;

/// The ratio of one [`Percentiles`] bucket's upper bound to its lower.
const PERCENTILES_RATIO: f64 = 1.02;

/// [`Percentiles`]' buckets: ln(HIGH / LOW) / ln(RATIO), rounded up.
const PERCENTILES_BUCKETS: usize = 1047;

/// The most a percentile from [`Percentiles`] differs from the exact one,
/// relative to it, for values from [`PERCENTILES_LOW`] to
/// [`PERCENTILES_HIGH`]: half a bucket, sqrt(1.02) - 1.
pub const PERCENTILES_RELATIVE_ERROR: f64 = 0.01;

/// Percentiles of a stream of positive values in bounded memory: counts in
/// log-scale buckets 2 % wide from [`PERCENTILES_LOW`] to
/// [`PERCENTILES_HIGH`] (8 KiB, however many values), plus the exact
/// smallest and largest value. A percentile is within
/// [`PERCENTILES_RELATIVE_ERROR`] of the exact nearest-rank one.
#[derive(Debug, Clone)]
pub struct Percentiles {
    counts: Box<[u64; PERCENTILES_BUCKETS]>,
    count: u64,
    min: f64,
    max: f64,
}

impl Default for Percentiles {
    fn default() -> Percentiles {
        Percentiles::new()
    }
}

impl Percentiles {
    /// No values yet.
    pub fn new() -> Percentiles {
        Percentiles {
            counts: Box::new([0; PERCENTILES_BUCKETS]),
            count: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    fn bucket(value: f64) -> usize {
        let i = ((value / PERCENTILES_LOW).ln() / PERCENTILES_RATIO.ln()).floor();
        if i.is_nan() || i < 0.0 {
            0
        } else {
            (i as usize).min(PERCENTILES_BUCKETS - 1)
        }
    }

    /// Records one value (NaN is ignored).
    pub fn record(&mut self, value: f64) {
        if value.is_nan() {
            return;
        }
        self.counts[Percentiles::bucket(value)] += 1;
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// How many values it recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `p`-th percentile (nearest rank, as [`percentile`]
    /// over the sorted values), within [`PERCENTILES_RELATIVE_ERROR`]; 0
    /// if there are no values.
    pub fn percentile(&self, p: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let rank = rank.min(self.count);
        if rank == 1 {
            return self.min;
        }
        if rank == self.count {
            return self.max;
        }
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let middle =
                    PERCENTILES_LOW * PERCENTILES_RATIO.powf(i as f64) * PERCENTILES_RATIO.sqrt();
                return middle.clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_over_all_samples() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), 50.0);
        assert_eq!(percentile(&s, 99.0), 99.0);
        assert_eq!(percentile(&s, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        assert_eq!(percentile(&[7.0], 1.0), 7.0);
    }

    #[test]
    fn percentiles_are_within_one_percent_of_the_exact_ones() {
        // Latencies from 0.01 ms to 100 s, spread over seven decades.
        let mut exact: Vec<f64> = (0..70_000u32)
            .map(|i| 0.01 * 10f64.powf(f64::from(i) / 10_000.0))
            .collect();
        let mut p = Percentiles::new();
        for v in &exact {
            p.record(*v);
        }
        exact.sort_by(f64::total_cmp);
        for q in [1.0, 10.0, 50.0, 90.0, 99.0, 99.9] {
            let want = percentile(&exact, q);
            let got = p.percentile(q);
            assert!(
                (got - want).abs() <= want * PERCENTILES_RELATIVE_ERROR,
                "p{q}: {got} against exact {want}"
            );
        }
        assert_eq!(p.percentile(100.0), exact[exact.len() - 1]);
        assert_eq!(p.percentile(0.0), exact[0]);
    }

    #[test]
    fn percentiles_of_nothing_are_zero_and_of_one_value_that_value() {
        let mut p = Percentiles::new();
        assert_eq!(p.percentile(50.0), 0.0);
        p.record(61.25);
        assert_eq!(p.percentile(50.0), 61.25);
        assert_eq!(p.percentile(99.0), 61.25);
    }

    #[test]
    fn values_outside_the_range_are_clamped_to_the_exact_extremes() {
        let mut p = Percentiles::new();
        for v in [1e-9, 2e-9, 3e-9, 5e9] {
            p.record(v);
        }
        assert_eq!(p.count(), 4);
        assert!(
            p.percentile(50.0) <= PERCENTILES_LOW * PERCENTILES_RATIO,
            "{}",
            p.percentile(50.0)
        );
        assert_eq!(p.percentile(100.0), 5e9);
    }
}
