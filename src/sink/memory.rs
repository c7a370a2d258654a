//! [`MemorySink`]: an [`ApplySink`] that keeps everything in memory, so the
//! worker's sink stage can be unit-tested without a server. It is our own test
//! double of the sink *interface*, not an imitation of Redis: it records the
//! plans it was given, and a test can make the next attempts fail with a chosen
//! [`RetryClass`] or hold an apply (or only pattern passes) until it releases it.
//!
//! Clones share their state: the test keeps one handle, the stage owns another.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use super::apply::ApplySink;
use super::error::{RetryClass, SinkError};
use super::identity::{Identity, IdentityCheck};
use super::patterns::has_patterns;
use super::ApplyStats;
use crate::plan::Plan;

/// An in-memory sink for tests of the stages (see the module doc).
#[derive(Clone)]
pub struct MemorySink {
    state: Arc<Mutex<State>>,
    /// `true` while applies are held.
    held: watch::Sender<bool>,
    /// `true` while applies of plans with patterns (pattern passes) are held.
    passes_held: watch::Sender<bool>,
    target: String,
}

#[derive(Default)]
struct State {
    /// Plans applied successfully, in order.
    applied: Vec<Plan>,
    /// Calls of `apply`, including failed and held ones.
    attempts: u64,
    /// Applies currently waiting for a release.
    waiting: u64,
    /// Failures to return from the next calls (any method), in order.
    failures: VecDeque<(RetryClass, String)>,
    /// Stored identities by key.
    identities: HashMap<String, Identity>,
    /// What `redis_run_id` returns.
    run_id: String,
}

impl Default for MemorySink {
    fn default() -> Self {
        Self::new()
    }
}

impl MemorySink {
    /// An empty sink with Redis `run_id` `memory-1`; nothing held, nothing failing.
    pub fn new() -> Self {
        let (held, _) = watch::channel(false);
        let (passes_held, _) = watch::channel(false);
        MemorySink {
            passes_held,
            state: Arc::new(Mutex::new(State {
                run_id: "memory-1".into(),
                ..State::default()
            })),
            held,
            target: "memory://".into(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; the
        // state is still readable for its report.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next `n` calls (of any method) fail with `class`.
    pub fn fail_next(&self, n: usize, class: RetryClass) {
        let mut state = self.state();
        for i in 0..n {
            state
                .failures
                .push_back((class, format!("told to fail ({} of {n})", i + 1)));
        }
    }

    /// From now on, `apply` waits (after counting the attempt) until
    /// [`release`](Self::release).
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Lets held and later applies through.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// From now on, applies of plans with patterns (the pattern lane's
    /// passes) wait until [`release_passes`](Self::release_passes); other
    /// plans go through.
    pub fn hold_passes(&self) {
        self.passes_held.send_replace(true);
    }

    /// Lets held and later pattern passes through.
    pub fn release_passes(&self) {
        self.passes_held.send_replace(false);
    }

    /// The plans applied successfully, in order.
    pub fn applied(&self) -> Vec<Plan> {
        self.state().applied.clone()
    }

    /// How many times `apply` was called (failed and held calls included).
    pub fn attempts(&self) -> u64 {
        self.state().attempts
    }

    /// How many applies wait for a release right now.
    pub fn waiting(&self) -> u64 {
        self.state().waiting
    }

    /// Makes `redis_run_id` return `run_id` (a "restarted" Redis).
    pub fn set_run_id(&self, run_id: &str) {
        self.state().run_id = run_id.to_string();
    }

    /// The identity stored under `key`, if any.
    pub fn identity(&self, key: &str) -> Option<Identity> {
        self.state().identities.get(key).cloned()
    }

    /// The next told-to failure, if any.
    fn injected(&self) -> Result<(), SinkError> {
        match self.state().failures.pop_front() {
            Some((class, reason)) => Err(SinkError::Simulated { class, reason }),
            None => Ok(()),
        }
    }
}

impl ApplySink for MemorySink {
    async fn apply(&mut self, plan: &Plan) -> Result<ApplyStats, SinkError> {
        self.state().attempts += 1;
        let passes = has_patterns(plan).then(|| self.passes_held.subscribe());
        for mut held in std::iter::once(self.held.subscribe()).chain(passes) {
            if *held.borrow_and_update() {
                self.state().waiting += 1;
                // The sender lives in `self`: `wait_for` cannot see it closed.
                let _ = held.wait_for(|h| !*h).await;
                self.state().waiting -= 1;
            }
        }
        self.injected()?;
        let stats = ApplyStats {
            keys: plan.keys.len() as u64,
            tags: plan.tags.len() as u64,
            versions: plan.versions.len() as u64,
            published: plan.publish.len() as u64,
            ..ApplyStats::default()
        };
        self.state().applied.push(plan.clone());
        Ok(stats)
    }

    async fn redis_run_id(&self) -> Result<String, SinkError> {
        self.injected()?;
        Ok(self.state().run_id.clone())
    }

    async fn check_identity(
        &self,
        key: &str,
        current: &Identity,
    ) -> Result<IdentityCheck, SinkError> {
        self.injected()?;
        Ok(match self.state().identities.get(key) {
            None => IdentityCheck::Missing,
            Some(stored) if stored == current => IdentityCheck::Unchanged,
            Some(stored) => IdentityCheck::Changed {
                stored: stored.to_string(),
            },
        })
    }

    async fn store_identity(&self, key: &str, current: &Identity) -> Result<(), SinkError> {
        self.injected()?;
        self.state()
            .identities
            .insert(key.to_string(), current.clone());
        Ok(())
    }

    async fn ping(&self) -> Result<(), SinkError> {
        self.injected()
    }

    fn target(&self) -> &str {
        &self.target
    }
}
