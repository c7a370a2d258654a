//! The pattern pass: one `SCAN` over the keyspace (every master of a cluster,
//! concurrently) for every pattern of a plan, matched client-side by a
//! [`GlobSet`] whose cost per scanned key does not grow with the pattern count,
//! with the server filtering through `MATCH` wherever one glob covers all of
//! them (ARCHITECTURE.md, "Patterns"; docs/operations.md, "Patterns and what
//! they cost").
//!
//! Matches are collected and invalidated in chunks as they accumulate: keys
//! unlinked, tag sets invalidated like tags, version keys bumped. The worker
//! runs passes in their own lane (`worker/pattern_lane.rs`), so a pass never
//! holds up the key, tag, version and channel invalidations of later batches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::ApplyStats;
use crate::map::glob_set::GlobSet;
use crate::plan::Plan;

/// Keys SCAN visits per call (a hint), unless `[worker] pattern_scan_count`
/// says otherwise. Measured by hand (SCAN MATCH from a client, COUNT 100 to
/// 50000): on 1,000,000 keys a larger COUNT saves at most ~15% of a pass,
/// while each call holds Redis proportionally longer (COUNT 5000: up to
/// 14 ms per call under load), which is latency every other client, this
/// worker's key lane included, waits. BENCHMARKS.md ("What `patterns.sh`
/// does") compares counts.
pub const DEFAULT_SCAN_COUNT: usize = 1000;

/// The range `[worker] pattern_scan_count` accepts.
pub const SCAN_COUNT_RANGE: std::ops::RangeInclusive<usize> = 10..=100_000;

/// How recently the sink must have applied other work for a pass to yield.
const YIELD_WINDOW: Duration = Duration::from_millis(100);
/// The longest a pass rests between two SCAN calls.
const MAX_REST: Duration = Duration::from_millis(10);

/// With `[worker] pattern_pass_yield = true`, pattern passes yield to the
/// key lane (docs/operations.md, "Patterns and what they cost"): while the
/// sink has applied other plans in the last 100 ms, a pass rests
/// between two SCAN calls for as long as the last call took (at most 10 ms),
/// so Redis, single-threaded, spends at most about half its time on the pass
/// while keys, tags and versions flow. An idle worker's pass runs flat out.
/// Clones share one pacer (the sink stage's sink and the lane's clone).
#[derive(Debug, Clone)]
pub(crate) struct PassPacer {
    enabled: bool,
    /// When other work was last applied: nanoseconds since [`epoch`], 0 never.
    last_other_work: Arc<AtomicU64>,
}

/// The instant pacers count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl PassPacer {
    /// A pacer that yields (`enabled`, `[worker] pattern_pass_yield`) or never does.
    pub(crate) fn new(enabled: bool) -> Self {
        PassPacer {
            enabled,
            last_other_work: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Turns yielding on or off for every clone made after this call.
    pub(crate) fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// Notes that the sink is applying a plan other than a pattern pass.
    pub(crate) fn other_work(&self) {
        let now = u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_other_work.store(now.max(1), Ordering::Relaxed);
    }

    /// How long a pass rests after a SCAN call that took `call`.
    pub(crate) fn rest_after(&self, call: Duration) -> Duration {
        let last = self.last_other_work.load(Ordering::Relaxed);
        if !self.enabled || last == 0 {
            return Duration::ZERO;
        }
        let since = epoch().elapsed().saturating_sub(Duration::from_nanos(last));
        if since > YIELD_WINDOW {
            return Duration::ZERO;
        }
        call.min(MAX_REST)
    }

    /// Rests after a SCAN call that took `call` (see [`PassPacer::rest_after`]).
    pub(crate) async fn rest(&self, call: Duration) {
        let rest = self.rest_after(call);
        if !rest.is_zero() {
            tokio::time::sleep(rest).await;
        }
    }
}

/// Which pattern set of a plan a scanned key matched (first match wins:
/// delete patterns, then tag-set patterns, then version patterns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum PatternMatch {
    /// A key to UNLINK.
    Key,
    /// A tag set to invalidate.
    Tag,
    /// A version key to bump.
    Version,
}

/// True when `plan` has work for a pattern pass.
pub fn has_patterns(plan: &Plan) -> bool {
    !(plan.patterns.is_empty() && plan.tag_patterns.is_empty() && plan.version_patterns.is_empty())
}

/// Moves the pattern part of `plan` (patterns, tag patterns, version
/// patterns) into a plan of its own; `plan` keeps everything else.
pub fn take_patterns(plan: &mut Plan) -> Plan {
    Plan {
        patterns: std::mem::take(&mut plan.patterns),
        tag_patterns: std::mem::take(&mut plan.tag_patterns),
        version_patterns: std::mem::take(&mut plan.version_patterns),
        ..Plan::default()
    }
}

/// A plan's patterns compiled for one pass.
pub(crate) struct PatternPass {
    set: GlobSet<PatternMatch>,
    filter: Option<Vec<u8>>,
    scan_count: usize,
}

impl PatternPass {
    /// Compiles the plan's patterns (delete, tag-set and version patterns)
    /// for a pass that asks SCAN for `scan_count` keys per call.
    pub(crate) fn new(plan: &Plan, scan_count: usize) -> Self {
        let set = GlobSet::new(
            plan.patterns
                .iter()
                .map(|p| (p, PatternMatch::Key))
                .chain(plan.tag_patterns.iter().map(|p| (p, PatternMatch::Tag)))
                .chain(
                    plan.version_patterns
                        .iter()
                        .map(|p| (p, PatternMatch::Version)),
                ),
        );
        let filter = set.server_filter();
        PatternPass {
            set,
            filter,
            scan_count,
        }
    }

    /// `SCAN cursor [MATCH filter] COUNT n`.
    pub(crate) fn scan_cmd(&self, cursor: u64) -> redis::Cmd {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor);
        if let Some(filter) = &self.filter {
            cmd.arg("MATCH").arg(filter.as_slice());
        }
        cmd.arg("COUNT").arg(self.scan_count);
        cmd
    }

    /// Matches one scanned key and counts it (`scanned`, and by kind).
    pub(crate) fn classify(&self, key: &str, stats: &mut ApplyStats) -> Option<PatternMatch> {
        stats.scanned += 1;
        let kind = self.set.best_match(key.as_bytes())?;
        match kind {
            PatternMatch::Key => {}
            PatternMatch::Tag => stats.tags += 1,
            PatternMatch::Version => stats.versions += 1,
        }
        stats.pattern_matches += 1;
        Some(kind)
    }
}

/// What one pattern pass did, for metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PassReport {
    /// Patterns in the pass (delete, tag-set and version patterns).
    pub patterns: u64,
    /// Keys SCAN returned (after the server's `MATCH` filter).
    pub scanned: u64,
    /// Keys that matched a pattern.
    pub matched: u64,
    /// Wall-clock time of the pass, retries included.
    pub elapsed: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_rests_only_while_other_work_was_applied_recently() {
        let ms = Duration::from_millis;
        let pacer = PassPacer::new(true);
        assert_eq!(
            pacer.rest_after(ms(2)),
            Duration::ZERO,
            "idle worker: flat out"
        );
        let lane = pacer.clone();
        pacer.other_work();
        assert_eq!(lane.rest_after(ms(2)), ms(2), "clones share the pacer");
        assert_eq!(lane.rest_after(ms(50)), MAX_REST);
        std::thread::sleep(YIELD_WINDOW + ms(20));
        assert_eq!(lane.rest_after(ms(2)), Duration::ZERO, "past the window");

        let mut off = PassPacer::new(true);
        off.set_enabled(false);
        off.other_work();
        assert_eq!(
            off.rest_after(ms(2)),
            Duration::ZERO,
            "pattern_pass_yield = false"
        );
    }

    #[test]
    fn take_patterns_leaves_the_immediate_part() {
        let mut plan = Plan::default();
        plan.keys.insert("post:1");
        plan.patterns.insert("post:1:comments:*");
        plan.tag_patterns.insert("tag:post:*");
        plan.version_patterns.insert("version:post:*");
        assert!(has_patterns(&plan));
        let patterns = take_patterns(&mut plan);
        assert!(!has_patterns(&plan));
        assert_eq!(plan.keys.len(), 1);
        assert_eq!(patterns.ops(), 3);
        assert!(patterns.keys.is_empty());
    }

    #[test]
    fn classify_prefers_delete_then_tag_then_version() {
        let mut plan = Plan::default();
        plan.patterns.insert("a:*");
        plan.tag_patterns.insert("*");
        plan.version_patterns.insert("v:*");
        let pass = PatternPass::new(&plan, DEFAULT_SCAN_COUNT);
        let mut stats = ApplyStats::default();
        assert_eq!(pass.classify("a:1", &mut stats), Some(PatternMatch::Key));
        assert_eq!(pass.classify("v:1", &mut stats), Some(PatternMatch::Tag));
        assert_eq!(stats.scanned, 2);
        assert_eq!(stats.pattern_matches, 2);
        assert_eq!(stats.tags, 1);
        assert_eq!(pass.filter, None);
    }
}
