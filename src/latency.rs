//! Latency histograms for the metrics that take no lock to observe: an atomic add to a
//! bucket and a compare-and-swap on the sum, so workers observing at once never wait on each
//! other (the `prometheus-client` histogram takes a write lock per observation, and two
//! workers answering requests contended for it). Encoded exactly as that histogram is.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// A histogram of durations whose observations take no lock. Its count is the sum of its
/// buckets as a scrape reads them, so buckets and count agree.
#[derive(Clone, Debug)]
pub struct Latency(Arc<LatencyBuckets>);

#[derive(Debug)]
struct LatencyBuckets {
    /// Upper bounds in seconds, rising; a last bucket without bound follows them.
    bounds: Box<[f64]>,
    /// Observations per bucket (not cumulative), one more than `bounds`.
    counts: Box<[AtomicU64]>,
    /// Sum of all observations in seconds, as the bits of an `f64` (as the histogram it
    /// replaces keeps it), added to by compare-and-swap.
    sum: AtomicU64,
}

impl Latency {
    /// Buckets from `start` seconds, each bound `factor` times the one before, `length` of
    /// them (then one for everything longer).
    pub fn exponential(start: f64, factor: f64, length: u16) -> Self {
        let bounds: Box<[f64]> =
            prometheus_client::metrics::histogram::exponential_buckets(start, factor, length)
                .collect();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self(Arc::new(LatencyBuckets {
            bounds,
            counts,
            sum: AtomicU64::new(0f64.to_bits()),
        }))
    }

    /// Counts one duration.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = self
            .0
            .bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.0.bounds.len());
        self.0.counts[bucket].fetch_add(1, Ordering::Relaxed);
        // The closure always returns `Some`, so the update cannot fail.
        let _ = self
            .0
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + seconds).to_bits())
            });
    }

    /// The sum in seconds, the count, and each bucket's upper bound with its own count (the
    /// last bound `f64::MAX`, which the encoder writes as `+Inf`).
    fn read(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = f64::from_bits(self.0.sum.load(Ordering::Relaxed));
        (sum, count, buckets)
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.read();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text a scrape reads: each observation in the first bucket whose bound holds it,
    /// cumulative counts, `+Inf` for the longest, the sum in seconds; the same text as the
    /// locked histogram it replaces.
    #[test]
    fn latency_encodes_as_a_prometheus_histogram() {
        let ours = Latency::exponential(0.001, 10.0, 3);
        let theirs = prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 10.0, 3),
        );
        for ms in [0.5, 1.0, 2.0, 50.0, 100.0, 99_000.0] {
            let d = Duration::from_secs_f64(ms / 1e3);
            ours.observe(d);
            theirs.observe(d.as_secs_f64());
        }
        let encode = |register: &dyn Fn(&mut prometheus_client::registry::Registry)| {
            let mut registry = prometheus_client::registry::Registry::default();
            register(&mut registry);
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
            out
        };
        let text = encode(&|r| r.register("t", "t", ours.clone()));
        assert_eq!(text, encode(&|r| r.register("t", "t", theirs.clone())));
        for line in [
            "t_bucket{le=\"0.001\"} 2",
            "t_bucket{le=\"0.01\"} 3",
            "t_bucket{le=\"0.1\"} 5",
            "t_bucket{le=\"+Inf\"} 6",
            "t_count 6",
            "t_sum 99.1535",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
    }

    /// Observations from several threads at once are all counted.
    #[test]
    fn latency_counts_every_observation_from_every_thread() {
        let latency = Latency::exponential(1e-6, 2.0, 20);
        let start = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (latency, start) = (&latency, &start);
                s.spawn(move || {
                    start.wait();
                    for i in 0..10_000u64 {
                        latency.observe(Duration::from_nanos(1 + (i * 37 + t) % 3_000_000));
                    }
                });
            }
        });
        let (sum, count, buckets) = latency.read();
        assert_eq!(count, 40_000);
        let expected: u64 = (0..4u64)
            .flat_map(|t| (0..10_000u64).map(move |i| 1 + (i * 37 + t) % 3_000_000))
            .sum();
        assert!((sum - expected as f64 / 1e9).abs() < 1e-9, "{sum}");
        // Each observation in the first bucket whose bound holds it.
        let mut expected_counts = vec![0u64; 21];
        for t in 0..4u64 {
            for i in 0..10_000u64 {
                let seconds = Duration::from_nanos(1 + (i * 37 + t) % 3_000_000).as_secs_f64();
                let bucket = buckets
                    .iter()
                    .position(|(bound, _)| seconds <= *bound)
                    .unwrap();
                expected_counts[bucket] += 1;
            }
        }
        let counts: Vec<u64> = buckets.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, expected_counts);
    }
}
