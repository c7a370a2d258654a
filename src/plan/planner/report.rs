//! What the planner reports besides the plan: fallbacks, per-table and
//! declared counters, malformed messages, [`PlannerStats`].

use std::collections::BTreeMap;

use super::declared::DeclaredError;
use crate::decode::Op;
use crate::lsn::Lsn;

/// A message under our prefix the planner could not understand and answered
/// with a full flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// The message's own LSN (where `pg_waldump` finds it).
    pub lsn: Lsn,
    /// What is wrong with it.
    pub error: DeclaredError,
}

/// Counters of declared invalidations (the SQL API's messages).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeclaredCounters {
    /// Messages understood and planned.
    pub messages: u64,
    /// Keys declared.
    pub keys: u64,
    /// Tags declared.
    pub tags: u64,
    /// Versions declared.
    pub versions: u64,
    /// Patterns declared.
    pub patterns: u64,
    /// Messages to publish declared.
    pub publish: u64,
    /// Messages under our prefix that could not be understood (each answered
    /// with a full flush).
    pub malformed: u64,
}

impl DeclaredCounters {
    /// What was counted since `earlier` (a previous copy of these counters).
    pub fn since(&self, earlier: &DeclaredCounters) -> DeclaredCounters {
        DeclaredCounters {
            messages: self.messages.saturating_sub(earlier.messages),
            keys: self.keys.saturating_sub(earlier.keys),
            tags: self.tags.saturating_sub(earlier.tags),
            versions: self.versions.saturating_sub(earlier.versions),
            patterns: self.patterns.saturating_sub(earlier.patterns),
            publish: self.publish.saturating_sub(earlier.publish),
            malformed: self.malformed.saturating_sub(earlier.malformed),
        }
    }
}

/// Why a change fired its table's truncate invalidations instead of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FallbackReason {
    /// A value a template needs was not sent (unchanged TOAST without old row,
    /// a column outside a key-only old row).
    UnknownValue,
    /// A placeholder column is not in the relation (dropped or renamed).
    MissingColumn,
    /// An UPDATE without old row on a table whose replica identity does not
    /// carry the old values the rule needs, or a DELETE without old row.
    OldRowMissing,
    /// A value a template needs is longer than `max_key_bytes`.
    ValueTooLong,
    /// A column of a `refresh` value was not sent (unchanged TOAST without
    /// old row): only that key is unlinked, no truncate fires.
    RefreshUnknownValue,
    /// A column of a `refresh` value is not in the relation: only that key
    /// is unlinked.
    RefreshMissingColumn,
    /// A `refresh` value is larger than `max_refresh_bytes`: only that key
    /// is unlinked.
    RefreshTooLarge,
}

impl FallbackReason {
    /// Every reason, for metrics that start at 0.
    pub const ALL: [FallbackReason; 7] = [
        FallbackReason::UnknownValue,
        FallbackReason::MissingColumn,
        FallbackReason::OldRowMissing,
        FallbackReason::ValueTooLong,
        FallbackReason::RefreshUnknownValue,
        FallbackReason::RefreshMissingColumn,
        FallbackReason::RefreshTooLarge,
    ];

    /// Stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::UnknownValue => "unknown_value",
            FallbackReason::MissingColumn => "missing_column",
            FallbackReason::OldRowMissing => "old_row_missing",
            FallbackReason::ValueTooLong => "value_too_long",
            FallbackReason::RefreshUnknownValue => "refresh_unknown_value",
            FallbackReason::RefreshMissingColumn => "refresh_missing_column",
            FallbackReason::RefreshTooLarge => "refresh_value_too_large",
        }
    }

    /// True for the `refresh_*` reasons: only the refreshed key was
    /// unlinked, no truncate fired.
    pub fn is_refresh(self) -> bool {
        matches!(
            self,
            FallbackReason::RefreshUnknownValue
                | FallbackReason::RefreshMissingColumn
                | FallbackReason::RefreshTooLarge
        )
    }
}

/// Fallbacks since the last [`super::Planner::take_fallbacks`], aggregated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// `schema.table`.
    pub table: String,
    /// Why.
    pub reason: FallbackReason,
    /// The column at fault, when one is.
    pub column: Option<String>,
    /// How many changes fell back for this reason.
    pub count: u64,
}

/// Counters of one table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableCounters {
    /// INSERTs seen.
    pub inserts: u64,
    /// UPDATEs seen.
    pub updates: u64,
    /// DELETEs seen.
    pub deletes: u64,
    /// TRUNCATEs seen.
    pub truncates: u64,
    /// Fallbacks by reason: unknown value.
    pub fallback_unknown_value: u64,
    /// Fallbacks by reason: missing column.
    pub fallback_missing_column: u64,
    /// Fallbacks by reason: old row missing.
    pub fallback_old_row_missing: u64,
    /// Fallbacks by reason: a value over `max_key_bytes`.
    pub fallback_value_too_long: u64,
    /// Refreshed keys unlinked instead of set (any `refresh_*` reason).
    pub refresh_fallbacks: u64,
}

impl TableCounters {
    pub(super) fn count_op(&mut self, op: Op) {
        match op {
            Op::Insert => self.inserts += 1,
            Op::Update => self.updates += 1,
            Op::Delete => self.deletes += 1,
            Op::Truncate => self.truncates += 1,
        }
    }
    pub(super) fn count_fallback(&mut self, r: FallbackReason) {
        match r {
            FallbackReason::UnknownValue => self.fallback_unknown_value += 1,
            FallbackReason::MissingColumn => self.fallback_missing_column += 1,
            FallbackReason::OldRowMissing => self.fallback_old_row_missing += 1,
            FallbackReason::ValueTooLong => self.fallback_value_too_long += 1,
            FallbackReason::RefreshUnknownValue
            | FallbackReason::RefreshMissingColumn
            | FallbackReason::RefreshTooLarge => self.refresh_fallbacks += 1,
        }
    }
    pub(super) fn add(&mut self, o: &TableCounters) {
        self.inserts += o.inserts;
        self.updates += o.updates;
        self.deletes += o.deletes;
        self.truncates += o.truncates;
        self.fallback_unknown_value += o.fallback_unknown_value;
        self.fallback_missing_column += o.fallback_missing_column;
        self.fallback_old_row_missing += o.fallback_old_row_missing;
        self.fallback_value_too_long += o.fallback_value_too_long;
        self.refresh_fallbacks += o.refresh_fallbacks;
    }
}

/// Counters the worker reads for metrics (cumulative since the planner was made).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlannerStats {
    /// Per relation `schema.table` (as the stream names it).
    pub tables: BTreeMap<String, TableCounters>,
    /// Flush markers handled.
    pub flush_markers: u64,
    /// Transactions whose messages overflowed `max_batch_ops`.
    pub message_overflows: u64,
    /// Relations followed by OID after a rename (mapped name, current name).
    pub renamed: Vec<(String, String)>,
    /// Declared invalidations planned, and malformed messages.
    pub declared: DeclaredCounters,
    /// Placeholder columns the mapped relation no longer has, as of its last
    /// Relation message (mapped table, column): that table's changes fall
    /// back to its truncate invalidations until the column is back or the
    /// mapping is fixed.
    pub missing_columns: Vec<(String, String)>,
}
