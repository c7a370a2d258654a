//! What the single-server and the cluster executors share: the found-keys
//! buffer of pattern passes and second deletes, the reply checks (wrong type,
//! WAIT), the error constructor and the delayed second delete.

use std::future::Future;
use std::time::Duration;

use redis::RedisError;

use super::error::SinkError;
use super::patterns::{self, PassPacer, PatternMatch, PatternPass};
use super::{ApplyStats, SinkOptions};
use crate::plan::Plan;

/// Keys per UNLINK command (on a cluster: within one slot).
pub(super) const UNLINK_CHUNK: usize = 1000;
/// How long WAIT waits for replicas before the plan is retried.
pub(super) const WAIT_TIMEOUT_MS: u64 = 1000;
/// Hold time of tombstones unless a sink's [`SinkTuning`] says otherwise.
pub const DEFAULT_TOMBSTONE_MS: u64 = 10_000;

/// How a sink runs what `[worker]` tunes (`Config::sink_tuning`); the
/// defaults are the config's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkTuning {
    /// Hold time of tombstones (`tombstone_ms`).
    pub tombstone_hold: Duration,
    /// Keys per SCAN call of a pattern pass (`pattern_scan_count`).
    pub pattern_scan_count: usize,
    /// Pattern passes rest between SCAN calls while other plans flow (`pattern_pass_yield`).
    pub pattern_pass_yield: bool,
}

impl Default for SinkTuning {
    fn default() -> Self {
        SinkTuning {
            tombstone_hold: Duration::from_millis(DEFAULT_TOMBSTONE_MS),
            pattern_scan_count: patterns::DEFAULT_SCAN_COUNT,
            pattern_pass_yield: false,
        }
    }
}

/// What a sink does beyond the plan's own commands, the same on both executors.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    /// Hold time of tombstones, in milliseconds.
    pub(super) tombstone_ms: u64,
    /// Keys per SCAN call of a pattern pass (`[worker] pattern_scan_count`).
    pub(super) scan_count: usize,
    /// > 0: WAIT for that many replicas after each plan.
    pub(super) wait_replicas: u32,
    /// The delayed second delete, if any.
    pub(super) redelete_after: Option<Duration>,
    /// Pattern passes yield to other plans (shared by clones).
    pub(super) pacer: PassPacer,
}

impl Settings {
    /// `options`' WAIT and second delete, and [`SinkTuning::default`]: the
    /// defaults are written once, there.
    pub(super) fn new(options: &SinkOptions) -> Settings {
        let mut settings = Settings {
            // Set by `tune` below.
            tombstone_ms: 0,
            scan_count: 0,
            wait_replicas: options.wait_replicas,
            redelete_after: options.redelete_after,
            pacer: PassPacer::new(false),
        };
        settings.tune(&SinkTuning::default());
        settings
    }

    /// Takes `tuning` (tombstone hold at least 1 ms, SCAN count at least 1).
    pub(super) fn tune(&mut self, tuning: &SinkTuning) {
        self.tombstone_ms = u64::try_from(tuning.tombstone_hold.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.scan_count = tuning.pattern_scan_count.max(1);
        self.pacer.set_enabled(tuning.pattern_pass_yield);
    }
}

/// Keys, tag sets and version keys to invalidate, owned: what a SCAN pass
/// found, a plan's own, or what the delayed second delete repeats.
#[derive(Default)]
pub(super) struct Found {
    pub(super) keys: Vec<String>,
    pub(super) tags: Vec<String>,
    pub(super) versions: Vec<String>,
}

impl Found {
    pub(super) fn len(&self) -> usize {
        self.keys.len() + self.tags.len() + self.versions.len()
    }

    /// What the delayed second delete repeats: the plan's keys and tag sets,
    /// or `None` when it has neither.
    pub(super) fn redelete(plan: &Plan) -> Option<Found> {
        if plan.keys.is_empty() && plan.tags.is_empty() {
            return None;
        }
        Some(Found {
            keys: plan.keys.iter().map(str::to_owned).collect(),
            tags: plan.tags.iter().map(str::to_owned).collect(),
            versions: Vec::new(),
        })
    }

    /// Sorts the keys one SCAN call returned by the kind of pattern they
    /// matched (counted in `stats`); keys matching none are dropped.
    pub(super) fn add_matches(
        &mut self,
        pass: &PatternPass,
        keys: Vec<String>,
        stats: &mut ApplyStats,
    ) {
        for key in keys {
            match pass.classify(&key, stats) {
                Some(PatternMatch::Key) => self.keys.push(key),
                Some(PatternMatch::Tag) => self.tags.push(key),
                Some(PatternMatch::Version) => self.versions.push(key),
                None => {}
            }
        }
    }
}

/// A key of the wrong type: a tag set that is not a set, a version key that
/// is not an integer. The sinks unlink it and redo the step.
pub(super) fn is_wrong_type(e: &RedisError) -> bool {
    let text = e.to_string();
    text.contains("WRONGTYPE") || text.contains("not an integer")
}

/// The error of `command` against `target` (the masked URL or seed URLs).
pub(super) fn redis_err<'a>(
    target: &'a str,
    command: &'static str,
) -> impl Fn(RedisError) -> SinkError + 'a {
    move |source| SinkError::Redis {
        command,
        target: target.to_owned(),
        source,
    }
}

/// WAIT's reply: fewer replicas than `wanted` acknowledged the writes fails
/// the plan (retried whole).
pub(super) fn check_wait(acked: i64, wanted: u32) -> Result<(), SinkError> {
    if acked < i64::from(wanted) {
        return Err(SinkError::Replicas {
            acked,
            wanted,
            timeout_ms: WAIT_TIMEOUT_MS,
        });
    }
    Ok(())
}

/// Runs `second_delete` after `delay`, in the background: best effort, it
/// never blocks acknowledgement (`[worker] redelete_after_ms`).
pub(super) fn spawn_redelete(
    delay: Duration,
    second_delete: impl Future<Output = Result<(), SinkError>> + Send + 'static,
) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        if let Err(err) = second_delete.await {
            tracing::warn!(error = %err, "the delayed second delete (redelete_after_ms) failed; the first one succeeded");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untuned_sink_runs_the_default_tuning() {
        let options = SinkOptions {
            url: "redis://127.0.0.1:6379".to_owned(),
            password: None,
            wait_replicas: 2,
            redelete_after: None,
            tls: Default::default(),
        };
        let settings = Settings::new(&options);
        let defaults = SinkTuning::default();
        assert_eq!(
            Duration::from_millis(settings.tombstone_ms),
            defaults.tombstone_hold
        );
        assert_eq!(settings.scan_count, defaults.pattern_scan_count);
        assert_eq!(settings.tombstone_ms, DEFAULT_TOMBSTONE_MS);
        assert_eq!(settings.wait_replicas, 2);
    }
}
