//! Folding row changes into deduplicated invalidation plans.
//!
//! A [`Plan`] is what one batch (or one transaction, for `replay`) asks of Redis.
//! Every field is a set: a transaction that updates one row a million times
//! yields one invalidation per distinct key. Memory is bounded by the batch.

use crate::lsn::Lsn;

/// The plan's hash function: foldhash, seeded per process. Keys are short and
/// hashed several times per change; SipHash (std's default) was 5% of the
/// worker's CPU on small transactions.
pub type FastHash = foldhash::fast::RandomState;

mod keyset;

pub use keyset::KeySet;

/// Redis keys with the LSN of the change that invalidated them.
pub type LsnMap = std::collections::HashMap<String, Lsn, FastHash>;

pub mod batch;
pub mod declared;
pub mod planner;
pub mod refresh;

pub use refresh::{RefreshMap, RefreshSet, RefreshValue, RefreshVersion};

pub use batch::Batch;

pub use planner::{
    DeclaredCounters, Fallback, FallbackReason, Malformed, Planner, PlannerContext, PlannerStats,
    TableCounters,
};

/// A pub/sub message to send after the deletes of the same batch.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Publish {
    /// Channel name.
    pub channel: String,
    /// The JSON payload, serialized.
    pub message: String,
}

/// The Redis work derived from a set of changes. All names are full Redis keys
/// (`tag_prefix` / `version_prefix` already applied); patterns are glob patterns
/// whose substituted values are already escaped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Keys to UNLINK.
    pub keys: KeySet,
    /// Tag set keys (e.g. `tag:user:1`): every member is unlinked, then the set.
    pub tags: KeySet,
    /// Version keys (e.g. `version:user:1`) to bump (a missing key becomes 2).
    pub versions: KeySet,
    /// Glob patterns: every matching key is unlinked (one SCAN pass per batch).
    pub patterns: KeySet,
    /// Glob patterns over tag set keys (from `truncate`): each matching set is invalidated like a tag.
    pub tag_patterns: KeySet,
    /// Glob patterns over version keys (from `truncate`): each matching key is bumped.
    pub version_patterns: KeySet,
    /// Keys of `mode = "tombstone"` rules: each gets a tombstone carrying the
    /// highest commit LSN that invalidated it (see [`crate::cache::tombstone`]).
    pub tombstones: LsnMap,
    /// Tag set keys of `mode = "tombstone"` rules: every member gets a
    /// tombstone at that LSN.
    pub tombstone_tags: LsnMap,
    /// Keys to pre-warm (`refresh` rules): the last image of each key in the
    /// batch, set after every delete of the plan (patterns included) and
    /// only if Redis holds no newer version (see [`refresh`]).
    pub refresh: RefreshMap,
    /// Messages to PUBLISH after the deletes, deduplicated, in first-seen order.
    pub publish: Vec<Publish>,
    /// Dedup index for `publish`.
    pub publish_seen: std::collections::HashSet<Publish, FastHash>,
}

impl Plan {
    /// True when the plan asks nothing of Redis.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.tags.is_empty()
            && self.versions.is_empty()
            && self.patterns.is_empty()
            && self.tag_patterns.is_empty()
            && self.version_patterns.is_empty()
            && self.tombstones.is_empty()
            && self.tombstone_tags.is_empty()
            && self.refresh.is_empty()
            && self.publish.is_empty()
    }

    /// Number of distinct operations, the measure `max_batch_ops` bounds.
    pub fn ops(&self) -> usize {
        self.keys.len()
            + self.tags.len()
            + self.versions.len()
            + self.patterns.len()
            + self.tag_patterns.len()
            + self.version_patterns.len()
            + self.tombstones.len()
            + self.tombstone_tags.len()
            + self.refresh.len()
            + self.publish.len()
    }

    /// Adds a message unless the same one is already planned.
    pub fn add_publish(&mut self, publish: Publish) {
        if self.publish_seen.insert(publish.clone()) {
            self.publish.push(publish);
        }
    }

    /// Folds another plan, of later changes, into this one: a refresh of this
    /// plan that the other unlinks, tombstones at a higher LSN or matches
    /// with a pattern is dropped; the other's refreshes replace older ones.
    pub fn merge(&mut self, other: Plan) {
        if !self.refresh.is_empty() {
            self.refresh.retain(|key, set| {
                !(other.keys.contains(key)
                    || other
                        .tombstones
                        .get(key)
                        .is_some_and(|lsn| *lsn > set.version.lsn)
                    || other
                        .patterns
                        .iter()
                        .any(|p| crate::map::glob::glob_match(p.as_bytes(), key.as_bytes())))
            });
        }
        for (key, set) in other.refresh {
            refresh::put(&mut self.refresh, key, set);
        }
        self.keys.extend(&other.keys);
        self.tags.extend(&other.tags);
        self.versions.extend(&other.versions);
        self.patterns.extend(&other.patterns);
        self.tag_patterns.extend(&other.tag_patterns);
        self.version_patterns.extend(&other.version_patterns);
        for (map, more) in [
            (&mut self.tombstones, other.tombstones),
            (&mut self.tombstone_tags, other.tombstone_tags),
        ] {
            for (name, lsn) in more {
                let at = map.entry(name).or_insert(lsn);
                *at = (*at).max(lsn);
            }
        }
        for p in other.publish {
            self.add_publish(p);
        }
    }
}
