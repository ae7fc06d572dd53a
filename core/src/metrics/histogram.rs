//! A fixed-bucket latency histogram with Prometheus semantics.

use core::time::Duration;

/// The finite upper bounds of the latency buckets, in milliseconds.
///
/// These are Linkerd's `response_latency_ms` buckets, which users' dashboards and PromQL already
/// assume: one, two, three, four and five times each power of ten from 1 ms to 10 s. A final
/// `+Inf` bucket (not listed) catches everything above 50 s. Bounds are inclusive (`le`).
pub const LATENCY_BUCKET_BOUNDS_MS: [u64; 25] = [
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500, 1_000, 2_000, 3_000, 4_000, 5_000,
    10_000, 20_000, 30_000, 40_000, 50_000,
];

/// The number of buckets in a [`LatencyHistogram`]: the finite ones plus `+Inf`.
pub const LATENCY_BUCKETS: usize = LATENCY_BUCKET_BOUNDS_MS.len() + 1;

/// The finite bounds in nanoseconds, so that `record` compares integers without dividing.
const BOUNDS_NANOS: [u64; LATENCY_BUCKET_BOUNDS_MS.len()] = {
    let mut nanos = [0; LATENCY_BUCKET_BOUNDS_MS.len()];
    let mut i = 0;
    while i < nanos.len() {
        nanos[i] = LATENCY_BUCKET_BOUNDS_MS[i] * 1_000_000;
        i += 1;
    }
    nanos
};

/// The largest finite bound, which Prometheus reports for any quantile that falls in `+Inf`.
const LAST_FINITE_BOUND_MS: u64 = LATENCY_BUCKET_BOUNDS_MS[LATENCY_BUCKET_BOUNDS_MS.len() - 1];

/// Counts of latencies in Linkerd's millisecond buckets ([`LATENCY_BUCKET_BOUNDS_MS`]), plus
/// their count and sum.
///
/// Buckets hold per-bucket counts, not cumulative ones, so [`merge`](Self::merge) is a plain
/// element-wise sum; [`cumulative_buckets`](Self::cumulative_buckets) produces the cumulative
/// `le` series that Prometheus exposes. A latency lands in the first bucket whose bound is at or
/// above it, compared in nanoseconds: exactly 1 ms counts in `le="1"`, 1 ms + 1 ns in `le="2"`.
///
/// All arithmetic saturates at `u64::MAX` (see [`Counter`](super::Counter) for why saturation
/// rather than wrapping). The sum is kept in whole microseconds: that truncates each sample by
/// under 1 µs, and lets the sum absorb 584,000 years of latency, where nanoseconds would
/// saturate after three weeks of a proxy serving 10,000 one-second requests a second.
///
/// `record` is a binary search over 25 integers and three additions: no allocation, no float.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LatencyHistogram {
    /// Per-bucket counts; index `i < 25` is `le = LATENCY_BUCKET_BOUNDS_MS[i]`, index 25 `+Inf`.
    buckets: [u64; LATENCY_BUCKETS],
    /// The number of samples recorded (equal to the sum of `buckets` until both saturate).
    count: u64,
    /// The sum of samples, each truncated to whole microseconds.
    sum_micros: u64,
}

impl LatencyHistogram {
    /// An empty histogram.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            buckets: [0; LATENCY_BUCKETS],
            count: 0,
            sum_micros: 0,
        }
    }

    /// A histogram holding the given per-bucket (not cumulative) counts, as read back from a
    /// Prometheus scrape; the sum is unknown and left at zero.
    #[must_use]
    pub fn from_bucket_counts(buckets: [u64; LATENCY_BUCKETS]) -> Self {
        let count = buckets.iter().fold(0u64, |sum, n| sum.saturating_add(*n));
        let histogram = Self {
            buckets,
            count,
            sum_micros: 0,
        };
        #[cfg(debug_assertions)]
        histogram.assert_invariants();
        histogram
    }

    /// Records one latency sample.
    ///
    /// Latencies too large for `u64` nanoseconds (over 584 years) are recorded as that maximum.
    #[inline]
    pub fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        // Upper-inclusive: the first bucket whose bound is not below the sample. A search
        // past every finite bound yields 25, the `+Inf` bucket.
        let index = BOUNDS_NANOS.partition_point(|&bound| bound < nanos);
        if let Some(bucket) = self.buckets.get_mut(index) {
            *bucket = bucket.saturating_add(1);
        }
        self.count = self.count.saturating_add(1);
        self.sum_micros = self.sum_micros.saturating_add(nanos / 1_000);
        #[cfg(debug_assertions)]
        self.assert_invariants();
    }

    /// Adds every sample of `other` to this histogram.
    ///
    /// The result equals recording both sample streams into one histogram (up to saturation).
    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine = mine.saturating_add(theirs);
        }
        self.count = self.count.saturating_add(other.count);
        self.sum_micros = self.sum_micros.saturating_add(other.sum_micros);
        #[cfg(debug_assertions)]
        self.assert_invariants();
    }

    /// The number of samples recorded.
    #[must_use]
    pub const fn count(&self) -> u64 {
        self.count
    }

    /// True if no sample has been recorded.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The sum of all samples, each truncated to whole microseconds.
    #[must_use]
    pub const fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_micros)
    }

    /// The sum of all samples in whole microseconds (saturating at `u64::MAX`).
    #[must_use]
    pub const fn sum_micros(&self) -> u64 {
        self.sum_micros
    }

    /// Per-bucket (not cumulative) counts: index `i < 25` counts samples in
    /// `(LATENCY_BUCKET_BOUNDS_MS[i - 1], LATENCY_BUCKET_BOUNDS_MS[i]]` ms, index 25 those above
    /// 50 s.
    #[must_use]
    pub const fn bucket_counts(&self) -> &[u64; LATENCY_BUCKETS] {
        &self.buckets
    }

    /// The cumulative buckets Prometheus exposes as `<name>_bucket{le="..."}`, in increasing
    /// order of bound, ending with `+Inf` whose count equals [`count`](Self::count).
    pub fn cumulative_buckets(&self) -> CumulativeBuckets<'_> {
        CumulativeBuckets {
            buckets: &self.buckets,
            next: 0,
            cumulative: 0,
        }
    }

    /// The `q`-quantile of the recorded latencies, estimated exactly as Prometheus's
    /// `histogram_quantile(q, ...)` estimates it from the same buckets.
    ///
    /// The algorithm (Prometheus `promql/quantile.go`, `bucketQuantile`):
    /// 1. `rank = q * count`;
    /// 2. find the first bucket whose cumulative count is `>= rank`;
    /// 3. if that is the `+Inf` bucket, answer the largest finite bound, 50,000 ms;
    /// 4. otherwise interpolate linearly inside the bucket, from its lower bound (the previous
    ///    bucket's bound, or 0 for the first) to its upper bound, by the fraction
    ///    `(rank - cumulative count below the bucket) / count in the bucket`.
    ///
    /// The answer assumes samples are spread evenly inside each bucket, so it is accurate to
    /// within the width of the bucket that holds the quantile, and never exceeds 50 s.
    ///
    /// Returns `None` where Prometheus gives no finite number: when the histogram is empty,
    /// when `q` is NaN or outside `0.0..=1.0` (Prometheus returns NaN or ±Inf), and in
    /// Prometheus's one `0 / 0` case, `q == 0.0` with an empty first bucket.
    #[must_use]
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if !(0.0..=1.0).contains(&q) || self.count == 0 {
            return None;
        }
        // Prometheus takes the number of observations from the `+Inf` cumulative count.
        let total = self
            .buckets
            .iter()
            .fold(0u64, |sum, &n| sum.saturating_add(n));
        let rank = q * total as f64;
        let mut below = 0u64;
        let mut lower_ms = 0.0;
        for (&bound_ms, &in_bucket) in LATENCY_BUCKET_BOUNDS_MS.iter().zip(&self.buckets) {
            let cumulative = below.saturating_add(in_bucket);
            if cumulative as f64 >= rank {
                let upper_ms = bound_ms as f64;
                let fraction = (rank - below as f64) / in_bucket as f64;
                let estimate = lower_ms + (upper_ms - lower_ms) * fraction;
                return estimate.is_finite().then_some(estimate);
            }
            below = cumulative;
            lower_ms = bound_ms as f64;
        }
        Some(LAST_FINITE_BOUND_MS as f64)
    }

    /// [`quantile_ms`](Self::quantile_ms) as a [`Duration`] (rounded to the nanosecond).
    #[must_use]
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let millis = self.quantile_ms(q)?;
        Duration::try_from_secs_f64(millis / 1_000.0).ok()
    }

    /// Checks the histogram's internal consistency.
    ///
    /// Called after every mutation in debug builds; cheap enough (26 additions) to call from
    /// tests and from the invariant checks of structures that hold histograms.
    ///
    /// # Panics
    ///
    /// If `count` differs from the (saturating) sum of the buckets, or if nothing is in `+Inf`
    /// and the microsecond sum exceeds what the buckets' upper bounds allow. (The sum has no
    /// floor here: a histogram rebuilt by [`from_bucket_counts`](Self::from_bucket_counts)
    /// does not know its sum.)
    pub fn assert_invariants(&self) {
        let total: u128 = self.buckets.iter().map(|&n| u128::from(n)).sum();
        assert_eq!(
            u128::from(self.count),
            total.min(u128::from(u64::MAX)),
            "histogram count must equal the sum of its buckets: {self:?}"
        );
        let (_, cap) = self.sum_bounds_micros();
        if let Some(cap) = cap {
            let sum = u128::from(self.sum_micros);
            assert!(
                sum <= cap,
                "histogram sum {sum} µs exceeds its buckets' cap {cap}"
            );
        }
    }

    /// The least and (if nothing is in `+Inf`) the greatest microsecond sum that recorded
    /// samples in these buckets can have: each sample contributes more than its bucket's lower
    /// bound and at most its upper bound.
    fn sum_bounds_micros(&self) -> (u128, Option<u128>) {
        let mut lower_us: u128 = 0;
        let mut floor: u128 = 0;
        let mut cap: u128 = 0;
        for (&bound_ms, &n) in LATENCY_BUCKET_BOUNDS_MS.iter().zip(&self.buckets) {
            let upper_us = u128::from(bound_ms) * 1_000;
            floor += u128::from(n) * lower_us;
            cap += u128::from(n) * upper_us;
            lower_us = upper_us;
        }
        let infinite = self.buckets[LATENCY_BUCKETS - 1];
        floor += u128::from(infinite) * lower_us;
        (floor, (infinite == 0).then_some(cap))
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

/// One cumulative bucket of a [`LatencyHistogram`]: a Prometheus `_bucket` sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CumulativeBucket {
    /// The inclusive upper bound in milliseconds (the `le` label), or `None` for `+Inf`.
    pub le_ms: Option<u64>,
    /// The number of samples at or below the bound.
    pub count: u64,
}

/// Iterator over a histogram's cumulative buckets; see
/// [`LatencyHistogram::cumulative_buckets`].
#[derive(Clone, Debug)]
pub struct CumulativeBuckets<'a> {
    buckets: &'a [u64; LATENCY_BUCKETS],
    next: usize,
    cumulative: u64,
}

impl Iterator for CumulativeBuckets<'_> {
    type Item = CumulativeBucket;

    fn next(&mut self) -> Option<CumulativeBucket> {
        let in_bucket = *self.buckets.get(self.next)?;
        let le_ms = LATENCY_BUCKET_BOUNDS_MS.get(self.next).copied();
        self.cumulative = self.cumulative.saturating_add(in_bucket);
        self.next += 1;
        Some(CumulativeBucket {
            le_ms,
            count: self.cumulative,
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = LATENCY_BUCKETS - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for CumulativeBuckets<'_> {}

impl core::iter::FusedIterator for CumulativeBuckets<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::ms;
    use core::fmt::Write as _;
    use proptest::prelude::*;

    fn histogram_of(samples: &[Duration]) -> LatencyHistogram {
        let mut h = LatencyHistogram::new();
        for &s in samples {
            h.record(s);
        }
        h
    }

    /// The bucket index a sample belongs in, computed independently of `record`.
    fn bucket_of(sample: Duration) -> usize {
        LATENCY_BUCKET_BOUNDS_MS
            .iter()
            .position(|&bound| sample <= ms(bound))
            .unwrap_or(LATENCY_BUCKETS - 1)
    }

    /// The lower and upper bounds in ms of bucket `index` (the `+Inf` bucket is capped at the
    /// last finite bound, which is what the estimate returns for it).
    fn bucket_bounds_ms(index: usize) -> (f64, f64) {
        let lower = index
            .checked_sub(1)
            .map_or(0, |i| LATENCY_BUCKET_BOUNDS_MS[i]);
        let upper = LATENCY_BUCKET_BOUNDS_MS
            .get(index)
            .copied()
            .unwrap_or(LAST_FINITE_BOUND_MS);
        (lower as f64, upper as f64)
    }

    /// Renders the histogram as Prometheus text exposition, the way the admin endpoint will.
    fn render(name: &str, h: &LatencyHistogram) -> String {
        let mut out = String::new();
        for bucket in h.cumulative_buckets() {
            let le = bucket
                .le_ms
                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", bucket.count).unwrap();
        }
        writeln!(out, "{name}_sum {}", h.sum_micros() as f64 / 1_000.0).unwrap();
        writeln!(out, "{name}_count {}", h.count()).unwrap();
        out
    }

    #[test]
    fn bounds_are_upper_inclusive() {
        let mut h = LatencyHistogram::new();
        h.record(Duration::ZERO);
        h.record(ms(1));
        h.record(ms(1) + Duration::from_nanos(1));
        h.record(ms(50_000));
        h.record(ms(50_000) + Duration::from_nanos(1));
        h.record(Duration::MAX);
        let counts = h.bucket_counts();
        assert_eq!(counts[0], 2, "0 and exactly 1 ms are in le=1");
        assert_eq!(counts[1], 1, "1 ms + 1 ns is in le=2");
        assert_eq!(counts[24], 1, "exactly 50 s is in le=50000");
        assert_eq!(counts[25], 2, "above 50 s is in +Inf");
        assert_eq!(h.count(), 6);
    }

    #[test]
    fn sum_truncates_to_microseconds_and_saturates() {
        let mut h = LatencyHistogram::new();
        h.record(Duration::from_nanos(1_999));
        h.record(ms(3));
        assert_eq!(h.sum_micros(), 3_001);
        assert_eq!(h.sum(), Duration::from_micros(3_001));
        // Beyond u64 nanoseconds (584 years) a sample is recorded as that maximum.
        h.record(Duration::MAX);
        assert_eq!(h.sum_micros(), 3_001 + u64::MAX / 1_000);
        for _ in 0..11 {
            let copy = h.clone();
            h.merge(&copy);
        }
        assert_eq!(h.sum_micros(), u64::MAX, "the sum saturates");
        assert_eq!(h.count(), 3 << 11);
        h.assert_invariants();
    }

    #[test]
    fn cumulative_buckets_end_at_count() {
        let h = histogram_of(&[ms(1), ms(7), ms(7), ms(60_000)]);
        let buckets: Vec<_> = h.cumulative_buckets().collect();
        assert_eq!(buckets.len(), LATENCY_BUCKETS);
        assert_eq!(h.cumulative_buckets().len(), LATENCY_BUCKETS);
        assert_eq!(
            buckets[0],
            CumulativeBucket {
                le_ms: Some(1),
                count: 1
            }
        );
        assert_eq!(
            buckets[4],
            CumulativeBucket {
                le_ms: Some(5),
                count: 1
            }
        );
        assert_eq!(
            buckets[5],
            CumulativeBucket {
                le_ms: Some(10),
                count: 3
            }
        );
        assert_eq!(
            buckets[24],
            CumulativeBucket {
                le_ms: Some(50_000),
                count: 3
            }
        );
        assert_eq!(
            buckets[25],
            CumulativeBucket {
                le_ms: None,
                count: 4
            }
        );
    }

    #[test]
    fn quantile_matches_prometheus_worked_examples() {
        // 10 samples in le=10 (5..10 ms) and 10 in le=100 (50..100 ms).
        let mut samples = vec![ms(7); 10];
        samples.extend([ms(70); 10]);
        let h = histogram_of(&samples);
        // rank 10 is reached exactly at the end of le=10: 5 + (10 - 5) * 10/10.
        assert_eq!(h.quantile_ms(0.5), Some(10.0));
        // rank 1 is the first tenth of le=10: 5 + 5 * 0.1.
        assert_eq!(h.quantile_ms(0.05), Some(5.5));
        // rank 19 is 9/10 of the way through le=100: 50 + 50 * 0.9.
        assert_eq!(h.quantile_ms(0.95), Some(95.0));
        assert_eq!(h.quantile_ms(1.0), Some(100.0));
        assert_eq!(h.quantile(0.95), Some(ms(95)));
    }

    #[test]
    fn quantile_in_first_bucket_interpolates_from_zero() {
        let h = histogram_of(&[ms(1); 4]);
        assert_eq!(h.quantile_ms(0.25), Some(0.25));
        assert_eq!(h.quantile_ms(0.5), Some(0.5));
    }

    #[test]
    fn quantile_in_inf_bucket_is_the_last_finite_bound() {
        let h = histogram_of(&[ms(1), ms(90_000), ms(90_000), ms(90_000)]);
        assert_eq!(h.quantile_ms(0.99), Some(50_000.0));
        assert_eq!(h.quantile(0.99), Some(ms(50_000)));
        // rank 1 is still the end of le=1.
        assert_eq!(h.quantile_ms(0.25), Some(1.0));
    }

    #[test]
    fn quantile_edges_follow_prometheus() {
        assert_eq!(
            LatencyHistogram::new().quantile_ms(0.5),
            None,
            "empty: NaN in Prometheus"
        );
        let h = histogram_of(&[ms(7)]);
        assert_eq!(h.quantile_ms(-0.1), None, "Prometheus: -Inf");
        assert_eq!(h.quantile_ms(1.1), None, "Prometheus: +Inf");
        assert_eq!(h.quantile_ms(f64::NAN), None);
        // q = 0 lands in the first bucket whatever it holds; empty, Prometheus computes 0/0.
        assert_eq!(h.quantile_ms(0.0), None);
        assert_eq!(histogram_of(&[ms(1)]).quantile_ms(0.0), Some(0.0));
    }

    #[test]
    fn rebuilt_from_bucket_counts() {
        let recorded = histogram_of(&[ms(1), ms(7), ms(7), ms(60_000)]);
        let rebuilt = LatencyHistogram::from_bucket_counts(*recorded.bucket_counts());
        assert_eq!(rebuilt.count(), 4);
        assert_eq!(
            rebuilt.sum(),
            Duration::ZERO,
            "a scrape's buckets do not carry the sum"
        );
        assert!(
            rebuilt
                .cumulative_buckets()
                .eq(recorded.cumulative_buckets())
        );
        assert_eq!(rebuilt.quantile_ms(0.5), recorded.quantile_ms(0.5));
        let mut merged = rebuilt;
        merged.merge(&recorded);
        assert_eq!(merged.count(), 8);
    }

    #[test]
    fn merge_with_empty_is_identity() {
        let h = histogram_of(&[ms(3), ms(300)]);
        let mut merged = h.clone();
        merged.merge(&LatencyHistogram::default());
        assert_eq!(merged, h);
    }

    #[test]
    fn rendered_histogram() {
        let samples = [
            0, 1, 2, 2, 4, 9, 15, 15, 45, 120, 480, 999, 2_500, 45_000, 61_000,
        ];
        let h = histogram_of(&samples.map(ms));
        // Kept with the crate's other snapshots rather than in a folder of this module's own.
        insta::with_settings!({ snapshot_path => "../snapshots" }, {
            insta::assert_snapshot!(render("response_latency_ms", &h));
        });
    }

    fn latency() -> impl Strategy<Value = Duration> {
        prop_oneof![
            // Mostly realistic latencies, with extra weight near bucket bounds.
            (0u64..120_000_000_000).prop_map(Duration::from_nanos),
            (0usize..LATENCY_BUCKET_BOUNDS_MS.len(), -1i64..=1).prop_map(|(i, nudge)| {
                let bound = BOUNDS_NANOS[i];
                Duration::from_nanos(bound.saturating_add_signed(nudge))
            }),
            Just(Duration::MAX),
        ]
    }

    proptest! {
        /// The estimate sits in the bucket holding the exact (nearest-rank) quantile, or a
        /// neighbour of it when the rank lands on a bucket boundary.
        #[test]
        fn quantile_is_within_one_bucket_of_exact(
            mut samples in prop::collection::vec(latency(), 1..200),
            q in 0.0f64..=1.0,
        ) {
            let h = histogram_of(&samples);
            samples.sort_unstable();
            let rank = q * samples.len() as f64;
            // Nearest rank: the smallest sample with at least `rank` samples at or below it.
            #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "test")]
            let nearest = (rank.ceil() as usize).clamp(1, samples.len()) - 1;
            let exact = samples[nearest];
            let bucket = bucket_of(exact);
            match h.quantile_ms(q) {
                None => {
                    // Only Prometheus's 0/0 case: q = 0 with nothing in the first bucket.
                    prop_assert_eq!(q, 0.0);
                    prop_assert_eq!(h.bucket_counts()[0], 0);
                }
                Some(estimate) => {
                    let (low, _) = bucket_bounds_ms(bucket.saturating_sub(1));
                    let (_, high) = bucket_bounds_ms((bucket + 1).min(LATENCY_BUCKETS - 1));
                    prop_assert!(
                        (low..=high).contains(&estimate),
                        "estimate {} ms outside [{}, {}] around exact {:?}", estimate, low, high, exact
                    );
                    let (same_low, same_high) = bucket_bounds_ms(bucket);
                    if q > 0.0 {
                        prop_assert!(
                            (same_low..=same_high).contains(&estimate),
                            "estimate {} ms not in the exact sample's bucket [{}, {}]",
                            estimate, same_low, same_high
                        );
                    }
                }
            }
        }

        #[test]
        fn quantile_is_monotonic_in_q(
            samples in prop::collection::vec(latency(), 1..100),
            a in 0.001f64..=1.0,
            b in 0.001f64..=1.0,
        ) {
            let h = histogram_of(&samples);
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(h.quantile_ms(lo).unwrap() <= h.quantile_ms(hi).unwrap());
        }

        #[test]
        fn merging_equals_recording_everything(
            a in prop::collection::vec(latency(), 0..100),
            b in prop::collection::vec(latency(), 0..100),
        ) {
            let mut merged = histogram_of(&a);
            merged.merge(&histogram_of(&b));
            let mut all = a;
            all.extend(b);
            prop_assert_eq!(merged, histogram_of(&all));
        }

        #[test]
        fn cumulative_buckets_are_monotonic_and_total(
            samples in prop::collection::vec(latency(), 0..100),
        ) {
            let h = histogram_of(&samples);
            let counts: Vec<u64> = h.cumulative_buckets().map(|b| b.count).collect();
            prop_assert!(counts.windows(2).all(|w| w[0] <= w[1]));
            prop_assert_eq!(counts.last().copied(), Some(h.count()));
            prop_assert_eq!(h.count(), samples.len() as u64);
            // Recorded (not rebuilt) histograms also respect the sum's floor.
            let (floor, cap) = h.sum_bounds_micros();
            prop_assert!(h.sum_micros() == u64::MAX || u128::from(h.sum_micros()) >= floor);
            prop_assert!(cap.is_none_or(|cap| u128::from(h.sum_micros()) <= cap));
            for s in &samples {
                prop_assert!(h.bucket_counts()[bucket_of(*s)] > 0);
            }
        }

        /// Doubling a histogram by merging it into itself saturates every figure at `u64::MAX`
        /// instead of wrapping, and the invariants keep holding throughout.
        #[test]
        fn counts_saturate_instead_of_overflowing(
            samples in prop::collection::vec(latency(), 1..20),
            doublings in 1u32..80,
        ) {
            let mut h = histogram_of(&samples);
            let original = h.clone();
            for _ in 0..doublings {
                let copy = h.clone();
                h.merge(&copy);
                h.assert_invariants();
            }
            let scale = 1u128 << doublings;
            let expect = |n: u64| {
                u128::from(n)
                    .checked_mul(scale)
                    .and_then(|scaled| u64::try_from(scaled).ok())
                    .unwrap_or(u64::MAX)
            };
            prop_assert_eq!(h.count(), expect(original.count()));
            prop_assert_eq!(h.sum_micros(), expect(original.sum_micros()));
            for (now, before) in h.bucket_counts().iter().zip(original.bucket_counts()) {
                prop_assert_eq!(*now, expect(*before));
            }
            h.record(ms(1));
            h.assert_invariants();
        }
    }
}
