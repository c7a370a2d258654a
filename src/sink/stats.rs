//! [`ApplyStats`]: what one plan did, counted by both executors.

use crate::plan::Plan;

/// What one plan did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Keys sent to UNLINK (exact keys and pattern matches).
    pub keys: u64,
    /// Tag sets invalidated.
    pub tags: u64,
    /// Tag members popped and unlinked.
    pub tag_members: u64,
    /// Version keys bumped.
    pub versions: u64,
    /// Keys matched by patterns (included in `keys`, `tags` or `versions` by kind).
    pub pattern_matches: u64,
    /// Keys a pattern pass's SCAN returned (after the server's `MATCH` filter).
    pub scanned: u64,
    /// Messages published.
    pub published: u64,
    /// Keys sent to the tombstone script (a newer tombstone already there is kept).
    pub tombstones: u64,
    /// Tag set members tombstoned (counted per SSCAN step).
    pub tombstone_members: u64,
    /// Keys of the wrong type under the tag or version prefix, unlinked and redone.
    pub repaired: u64,
    /// Keys set by `refresh` rules.
    pub refreshed: u64,
    /// Refreshed keys left as they were: Redis held a newer version.
    pub refresh_kept: u64,
}

impl ApplyStats {
    /// The counts a plan starts with: its tag sets and version keys.
    pub(super) fn for_plan(plan: &Plan) -> ApplyStats {
        ApplyStats {
            tags: plan.tags.len() as u64,
            versions: plan.versions.len() as u64,
            ..ApplyStats::default()
        }
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &ApplyStats) {
        // Destructured so a new field cannot be forgotten here.
        let ApplyStats {
            keys,
            tags,
            tag_members,
            versions,
            pattern_matches,
            scanned,
            published,
            tombstones,
            tombstone_members,
            repaired,
            refreshed,
            refresh_kept,
        } = *other;
        self.keys += keys;
        self.tags += tags;
        self.tag_members += tag_members;
        self.versions += versions;
        self.pattern_matches += pattern_matches;
        self.scanned += scanned;
        self.published += published;
        self.tombstones += tombstones;
        self.tombstone_members += tombstone_members;
        self.repaired += repaired;
        self.refreshed += refreshed;
        self.refresh_kept += refresh_kept;
    }
}
