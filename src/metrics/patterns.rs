//! The pattern lane's metrics (docs/metrics.md, "Pattern passes"): how long
//! passes take, how many keys they scan, how many patterns they carry, and
//! whether one runs now. Registered by [`super::Metrics::new`].

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::registered;
use crate::sink::PassReport;

/// Histogram: seconds a pattern pass took (SCAN of the keyspace and the
/// invalidation of its matches, retries included).
pub const PATTERN_PASS_SECONDS: &str = "cache_invalidator_pattern_pass_seconds";
/// Histogram: keys one pattern pass's SCAN returned (after the server's `MATCH` filter).
pub const PATTERN_PASS_SCANNED_KEYS: &str = "cache_invalidator_pattern_pass_scanned_keys";
/// Histogram: patterns in one pass (every pattern that arrived while the previous pass ran).
pub const PATTERN_PASS_PATTERNS: &str = "cache_invalidator_pattern_pass_patterns";
/// Gauge: pattern passes running now (0 or 1).
pub const PATTERN_PASSES_IN_FLIGHT: &str = "cache_invalidator_pattern_passes_in_flight";

/// Buckets of [`PATTERN_PASS_SECONDS`]: a pass over 1,000,000 keys takes about a second.
pub const PASS_SECONDS_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets of [`PATTERN_PASS_SCANNED_KEYS`].
pub const SCANNED_KEYS_BUCKETS: [f64; 8] = [100.0, 1e3, 1e4, 1e5, 1e6, 5e6, 1e7, 5e7];
/// Buckets of [`PATTERN_PASS_PATTERNS`].
pub const PATTERNS_BUCKETS: [f64; 8] = [1.0, 2.0, 5.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0];

/// The pattern lane's metric handles.
pub struct PatternMetrics {
    pass_seconds: Histogram,
    scanned_keys: Histogram,
    patterns: Histogram,
    in_flight: Gauge,
}

impl PatternMetrics {
    /// Registers the pattern lane's metrics in `r`.
    pub fn register(r: &mut Registry) -> Self {
        PatternMetrics {
            pass_seconds: registered(
                r,
                PATTERN_PASS_SECONDS,
                "Seconds a pattern pass took (SCAN of the keyspace and invalidation of its matches)",
                Histogram::new(PASS_SECONDS_BUCKETS),
            ),
            scanned_keys: registered(
                r,
                PATTERN_PASS_SCANNED_KEYS,
                "Keys a pattern pass's SCAN returned (after the server's MATCH filter)",
                Histogram::new(SCANNED_KEYS_BUCKETS),
            ),
            patterns: registered(
                r,
                PATTERN_PASS_PATTERNS,
                "Patterns in one pattern pass",
                Histogram::new(PATTERNS_BUCKETS),
            ),
            in_flight: registered(
                r,
                PATTERN_PASSES_IN_FLIGHT,
                "Pattern passes running now (0 or 1)",
                Gauge::default(),
            ),
        }
    }

    /// A pass started.
    pub fn started(&self) {
        self.in_flight.set(1);
    }

    /// A pass finished.
    pub fn finished(&self, report: &PassReport) {
        self.in_flight.set(0);
        self.pass_seconds.observe(report.elapsed.as_secs_f64());
        self.scanned_keys.observe(report.scanned as f64);
        self.patterns.observe(report.patterns as f64);
    }
}
