//! Latency statistics: a log-linear histogram in nanoseconds.
//!
//! Values below 128 ns are stored exactly; above that, each power of two is
//! split into 64 equal buckets, so a bucket is at most 1/64 (1.56%) of its
//! lower bound wide. Reported values are bucket midpoints (clamped to the
//! exact recorded min/max), so the relative error is below 0.8%. The whole
//! `u64` range is covered (3776 buckets, ~30 KiB), which keeps `record`
//! branch-light and free of saturation cases.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Values below this are recorded exactly (one bucket per nanosecond).
const EXACT_LIMIT: u64 = 128;
/// log2 of the number of sub-buckets per power of two above `EXACT_LIMIT`.
const SUB_BITS: u32 = 6;
const SUB_BUCKETS: usize = 1 << SUB_BITS;
/// First power of two handled by the log-linear part (2^7 = `EXACT_LIMIT`).
const FIRST_EXP: u32 = 7;
const BUCKETS: usize = EXACT_LIMIT as usize + (64 - FIRST_EXP as usize) * SUB_BUCKETS;

/// Bucket index of `v`.
fn bucket_of(v: u64) -> usize {
    if v < EXACT_LIMIT {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= FIRST_EXP
    let shift = exp - SUB_BITS;
    // Top SUB_BITS+1 bits of v: in [64, 128).
    let mantissa = (v >> shift) as usize;
    EXACT_LIMIT as usize + (exp - FIRST_EXP) as usize * SUB_BUCKETS + (mantissa - SUB_BUCKETS)
}

/// `(lowest value, width)` of bucket `i`.
fn bucket_bounds(i: usize) -> (u64, u64) {
    if i < EXACT_LIMIT as usize {
        return (i as u64, 1);
    }
    let rel = i - EXACT_LIMIT as usize;
    let octave = (rel / SUB_BUCKETS) as u32;
    let mantissa = (rel % SUB_BUCKETS + SUB_BUCKETS) as u64;
    let shift = octave + FIRST_EXP - SUB_BITS;
    (mantissa << shift, 1 << shift)
}

/// A latency histogram in nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one value in nanoseconds.
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket_of(ns)] += 1;
        self.count += 1;
        self.sum += u128::from(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    /// Records a duration (saturating at `u64::MAX` ns, ~584 years).
    pub fn record_duration(&mut self, d: Duration) {
        self.record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Adds every value recorded in `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Largest recorded value (exact); 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Smallest recorded value (exact); 0 when empty.
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    /// Mean of the recorded values (exact); 0 when empty.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value at percentile `p` (0–100, clamped): the smallest recorded
    /// value such that at least `p`% of values are <= it, within the bucket
    /// error bound. 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let p = if p.is_nan() {
            100.0
        } else {
            p.clamp(0.0, 100.0)
        };
        // Rank in 1..=count of the value we want (nearest-rank definition).
        let rank = ((p / 100.0) * self.count as f64).ceil() as u64;
        let rank = rank.clamp(1, self.count);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (low, width) = bucket_bounds(i);
                let mid = low + (width - 1) / 2;
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// The summary the reports print.
    pub fn summary(&self) -> LatencySummary {
        const NS_PER_US: f64 = 1000.0;
        LatencySummary {
            p50_us: self.percentile(50.0) as f64 / NS_PER_US,
            p99_us: self.percentile(99.0) as f64 / NS_PER_US,
            max_us: self.max() as f64 / NS_PER_US,
            mean_us: self.mean() / NS_PER_US,
        }
    }
}

/// Latency summary in microseconds, as printed in reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest single latency (exact).
    pub max_us: f64,
    /// Mean (exact).
    pub mean_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::SplitMix64;
    use proptest::prelude::*;

    /// Nearest-rank percentile of a sorted slice (the reference).
    fn reference(sorted: &[u64], p: f64) -> u64 {
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    fn assert_close(got: u64, want: u64) {
        let err = got.abs_diff(want) as f64;
        assert!(
            err <= want as f64 / 64.0,
            "got {got}, want {want} (error {:.3}%)",
            100.0 * err / want.max(1) as f64
        );
    }

    #[test]
    fn buckets_tile_the_u64_range() {
        let mut next = 0u64;
        for i in 0..BUCKETS {
            let (low, width) = bucket_bounds(i);
            assert_eq!(low, next, "bucket {i}");
            assert_eq!(bucket_of(low), i);
            assert_eq!(bucket_of(low + (width - 1)), i);
            assert!(width == 1 || (width as f64) <= low as f64 / 64.0);
            next = low.wrapping_add(width);
        }
        assert_eq!(next, 0, "last bucket ends at u64::MAX");
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn empty_histogram_is_all_zero() {
        let h = LatencyHistogram::new();
        assert_eq!(
            (h.count(), h.max(), h.min(), h.percentile(50.0)),
            (0, 0, 0, 0)
        );
        assert_eq!(h.summary(), LatencySummary::default());
    }

    #[test]
    fn percentiles_match_sorted_reference_on_random_data() {
        let mut rng = SplitMix64::new(42);
        for round in 0..20 {
            let n = 1 + rng.below(5000) as usize;
            // Log-uniform over 1 ns .. ~100 s so every octave gets exercised.
            let values: Vec<u64> = (0..n)
                .map(|_| {
                    let exp = rng.below(37) as u32;
                    (1u64 << exp) + rng.below(1u64 << exp)
                })
                .collect();
            let mut h = LatencyHistogram::new();
            values.iter().for_each(|&v| h.record(v));
            let mut sorted = values.clone();
            sorted.sort_unstable();
            for p in [0.0, 1.0, 25.0, 50.0, 90.0, 99.0, 99.9, 100.0] {
                assert_close(h.percentile(p), reference(&sorted, p));
            }
            assert_eq!(h.max(), *sorted.last().unwrap(), "round {round}");
            assert_eq!(h.count(), n as u64);
            let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!((h.mean() - mean).abs() <= mean * 1e-9);
        }
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut rng = SplitMix64::new(7);
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        let mut all = LatencyHistogram::new();
        for i in 0..10_000u64 {
            let v = rng.below(1 << 30);
            if i % 3 == 0 {
                a.record(v);
            } else {
                b.record(v);
            }
            all.record(v);
        }
        a.merge(&b);
        assert_eq!(a, all);
    }

    #[test]
    fn summary_is_in_microseconds() {
        let mut h = LatencyHistogram::new();
        h.record_duration(Duration::from_micros(100));
        h.record_duration(Duration::from_millis(2));
        let s = h.summary();
        assert!((s.p50_us - 100.0).abs() < 1.0, "{s:?}");
        assert_eq!(s.max_us, 2000.0);
        assert_eq!(s.mean_us, 1050.0);
        let json = serde_json::to_string(&s).unwrap();
        let back: LatencySummary = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    proptest! {
        #[test]
        fn any_value_lands_in_a_bucket_containing_it(v in any::<u64>()) {
            let (low, width) = bucket_bounds(bucket_of(v));
            prop_assert!(low <= v && v - low < width);
        }

        #[test]
        fn single_value_percentile_is_exact(v in any::<u64>(), p in 0.0f64..=100.0) {
            let mut h = LatencyHistogram::new();
            h.record(v);
            prop_assert_eq!(h.percentile(p), v);
        }
    }
}
