//! The [`Planner`]: folds decoded events into a deduplicated [`Plan`].
//!
//! Per relation (cached by OID, re-resolved on every Relation message) each
//! rule's placeholder columns are resolved to column positions once; per
//! change, templates render into one reused buffer and only new keys are
//! allocated. Memory is bounded by the plan: a row changed a million times
//! yields one entry per distinct key.
//!
//! Rendering (README, "Mapping format"): INSERT renders the new row, DELETE
//! the old row, UPDATE both (union). NULL renders nothing. A value still
//! unknown (not sent, or a column the relation lacks) fires the table's
//! truncate invalidations instead, recorded as a [`Fallback`] for a warning and
//! a metric: never a silent skip.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use super::declared::{self, Declared, DeclaredError};
use super::refresh::{self, RefreshSet, RefreshValue, RefreshVersion, ValueKind};
use super::{Plan, Publish};
use crate::decode::{Change, Event, Op, Relation, Row, Value};
use crate::lsn::Lsn;
use crate::map::glob;
use crate::map::template::{Missing, Template};
use crate::map::{
    Mappings, Mode, Refresh, RefreshFormat, Rule, Shape, TableName, REFRESH_LSN_FIELD,
};

/// The prefix of logical decoding messages addressed to the worker.
pub const MESSAGE_PREFIX: &str = "cache-invalidator";

/// Content of the heartbeat message (`pg_logical_emit_message(false, 'cache-invalidator', 'heartbeat')`).
pub const HEARTBEAT: &[u8] = b"heartbeat";

/// The name declared invalidations go by where a table name is expected
/// (the `table` of a truncate message replacing overflowing messages).
pub const DECLARED_SOURCE: &str = "declared";

/// Malformed messages kept for logging between two [`Planner::take_malformed`] calls.
pub const MAX_MALFORMED_KEPT: usize = 16;

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

/// At most 60 bytes of a content, for an error message.
fn lossy_prefix(content: &[u8]) -> String {
    let cut = &content[..content.len().min(60)];
    String::from_utf8_lossy(cut).into_owned()
}

/// What the planner needs beyond the mappings (from the service config and the slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannerContext {
    /// `[redis] tag_prefix`.
    pub tag_prefix: String,
    /// `[redis] version_prefix`.
    pub version_prefix: String,
    /// The slot's epoch, carried in every default message (e.g. slot name and creation).
    pub epoch: String,
    /// `[worker] max_batch_ops`: past this many messages in one transaction, one
    /// `{"table", "op": "truncate"}` message per channel and table replaces them.
    pub max_batch_ops: usize,
    /// `[worker] max_key_bytes`: a placeholder value longer than this (bytes)
    /// renders no key; the table's truncate invalidations fire instead
    /// ([`FallbackReason::ValueTooLong`]). Redis allows 512 MB keys; anything
    /// near that is a bug or hostile input.
    pub max_key_bytes: usize,
    /// `[worker] max_refresh_bytes`: a refreshed value larger than this
    /// (bytes) is not set; its key is unlinked instead
    /// ([`FallbackReason::RefreshTooLarge`]).
    pub max_refresh_bytes: usize,
}

/// Default of [`PlannerContext::max_key_bytes`]: 64 KiB.
pub const DEFAULT_MAX_KEY_BYTES: usize = 64 * 1024;

/// Default of [`PlannerContext::max_refresh_bytes`]: 512 KiB.
pub const DEFAULT_MAX_REFRESH_BYTES: usize = 512 * 1024;

impl Default for PlannerContext {
    fn default() -> Self {
        PlannerContext {
            tag_prefix: "tag:".into(),
            version_prefix: "version:".into(),
            epoch: String::new(),
            max_batch_ops: 10_000,
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_refresh_bytes: DEFAULT_MAX_REFRESH_BYTES,
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

/// Fallbacks since the last [`Planner::take_fallbacks`], aggregated.
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
    fn count_op(&mut self, op: Op) {
        match op {
            Op::Insert => self.inserts += 1,
            Op::Update => self.updates += 1,
            Op::Delete => self.deletes += 1,
            Op::Truncate => self.truncates += 1,
        }
    }
    fn count_fallback(&mut self, r: FallbackReason) {
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
    fn add(&mut self, o: &TableCounters) {
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

/// A rule resolved against one relation.
struct ResolvedRule {
    rule: usize,
    /// Relation column position of each rule column (`None`: missing).
    cols: Vec<Option<usize>>,
    /// Rule column is in `assume_unchanged`.
    assumed: Vec<bool>,
    /// Rule column is used by an invalidation template (else only by messages).
    in_keys: Vec<bool>,
    /// `columns` resolved (`None` entries: missing column).
    changed: Option<Vec<Option<usize>>>,
    /// An UPDATE without old row still has every old value the rule needs
    /// (FULL identity, or the needed columns are identity or assumed unchanged).
    old_implied: bool,
    /// The rule's `refresh` entries, value columns resolved.
    refresh: Vec<ResolvedRefresh>,
}

/// A `refresh` entry's value columns resolved against one relation.
struct ResolvedRefresh {
    cols: Vec<ValueColumn>,
}

/// One column of a refreshed value.
struct ValueColumn {
    /// Relation column position (`None`: the relation lacks it).
    idx: Option<usize>,
    name: Arc<str>,
    /// `,"name":`, escaped once.
    json_prefix: String,
    kind: ValueKind,
}

struct RelState {
    rel: Arc<Relation>,
    table: Arc<str>,
    /// The mapped table whose rules apply (differs from the relation's name after a rename).
    mapped: Option<TableName>,
    rules: Vec<ResolvedRule>,
    counters: TableCounters,
}

/// A table's truncate invalidations with prefixes applied.
#[derive(Default)]
struct TableTruncate {
    name: Arc<str>,
    keys: Vec<String>,
    tags: Vec<String>,
    versions: Vec<String>,
    patterns: Vec<String>,
    tag_patterns: Vec<String>,
    version_patterns: Vec<String>,
    /// (channel, shaped message or None for the default truncate message).
    channels: Vec<(String, Option<String>)>,
}

/// Which image a value lookup reads.
#[derive(Clone, Copy)]
struct Image<'a> {
    row: &'a Row,
    /// For an UPDATE's old image: the new row, read for assumed-unchanged columns.
    new: Option<&'a Row>,
}

#[derive(Serialize)]
struct DefaultMessage<'a> {
    table: &'a str,
    op: &'a str,
    lsn: String,
    keys: &'a [String],
    tags: &'a [String],
    versions: &'a [String],
    epoch: &'a str,
}

#[derive(Serialize)]
struct TruncateMessage<'a> {
    table: &'a str,
    op: &'static str,
    lsn: String,
    epoch: &'a str,
}

/// Per-change scratch buffers, reused.
#[derive(Default)]
struct Scratch {
    buf: String,
    keys: Vec<String>,
    tags: Vec<String>,
    versions: Vec<String>,
}

/// Aggregation key of pending fallbacks: table, reason, (rule index, rule column).
type FallbackKey = (Arc<str>, FallbackReason, Option<(usize, usize)>);

/// Aggregation key of refresh fallbacks: table, reason, column.
type RefreshFallbackKey = (Arc<str>, FallbackReason, Option<Arc<str>>);

/// Folds events into a [`Plan`]: feed events, [`Planner::take`] the plan.
pub struct Planner {
    mappings: Arc<Mappings>,
    ctx: PlannerContext,
    truncates: BTreeMap<TableName, TableTruncate>,
    relations: HashMap<u32, RelState>,
    plan: Plan,
    xid: Option<u32>,
    lsn: Lsn,
    txn_messages: usize,
    txn_publish_start: usize,
    txn_overflow: bool,
    /// (channel, table) pairs that published in the current transaction.
    txn_pairs: Vec<(String, Arc<str>)>,
    scratch: Scratch,
    fallbacks: HashMap<FallbackKey, u64>,
    malformed: Vec<Malformed>,
    /// [`PlannerStats::declared`] at the last [`Planner::take_declared`].
    declared_reported: DeclaredCounters,
    /// Refresh fallbacks of the change being planned (counted after it).
    pending_refresh_fallbacks: Vec<(FallbackReason, Option<Arc<str>>)>,
    refresh_fallbacks: HashMap<RefreshFallbackKey, u64>,
    /// Position of the current change in its transaction.
    seq: u32,
    stats: PlannerStats,
}

impl Planner {
    /// A planner over `mappings`.
    pub fn new(mappings: Arc<Mappings>, ctx: PlannerContext) -> Planner {
        let mut truncates: BTreeMap<TableName, TableTruncate> = BTreeMap::new();
        let tag_prefix = glob::escape(&ctx.tag_prefix);
        let version_prefix = glob::escape(&ctx.version_prefix);
        for rule in mappings.rules() {
            let t = truncates.entry(rule.table.clone()).or_default();
            t.name = Arc::from(rule.table.to_string());
            let s = &rule.truncate;
            push_all(&mut t.keys, s.keys.iter().cloned());
            push_all(
                &mut t.tags,
                s.tags.iter().map(|x| format!("{}{x}", ctx.tag_prefix)),
            );
            push_all(
                &mut t.versions,
                s.versions
                    .iter()
                    .map(|x| format!("{}{x}", ctx.version_prefix)),
            );
            push_all(&mut t.patterns, s.patterns.iter().cloned());
            push_all(
                &mut t.tag_patterns,
                s.tag_patterns.iter().map(|x| format!("{tag_prefix}{x}")),
            );
            push_all(
                &mut t.version_patterns,
                s.version_patterns
                    .iter()
                    .map(|x| format!("{version_prefix}{x}")),
            );
            push_all(
                &mut t.channels,
                s.channels
                    .iter()
                    .map(|c| (c.channel.clone(), c.message.as_ref().map(|m| m.to_string()))),
            );
        }
        Planner {
            mappings,
            ctx,
            truncates,
            relations: HashMap::new(),
            plan: Plan::default(),
            xid: None,
            lsn: Lsn::ZERO,
            txn_messages: 0,
            txn_publish_start: 0,
            txn_overflow: false,
            txn_pairs: Vec::new(),
            scratch: Scratch::default(),
            fallbacks: HashMap::new(),
            malformed: Vec::new(),
            declared_reported: DeclaredCounters::default(),
            refresh_fallbacks: HashMap::new(),
            pending_refresh_fallbacks: Vec::new(),
            seq: 0,
            stats: PlannerStats::default(),
        }
    }

    /// The mappings.
    pub fn mappings(&self) -> &Mappings {
        &self.mappings
    }

    /// The context.
    pub fn context(&self) -> &PlannerContext {
        &self.ctx
    }

    /// Feeds one event in stream order.
    pub fn feed(&mut self, event: &Event) {
        match event {
            Event::Begin { xid, final_lsn, .. } => self.begin(*xid, *final_lsn),
            Event::Change(c) => self.change(c),
            Event::Message {
                prefix,
                content,
                lsn,
                ..
            } => self.message(prefix, content, *lsn),
            Event::Commit { .. } => self.commit(),
            Event::Relation(rel) => self.relation(rel),
        }
    }

    /// A transaction starts; `final_lsn` is the LSN messages carry.
    pub fn begin(&mut self, xid: u32, final_lsn: Lsn) {
        self.xid = Some(xid);
        self.lsn = final_lsn;
        self.reset_txn();
    }

    /// The current transaction committed.
    pub fn commit(&mut self) {
        self.xid = None;
        self.reset_txn();
    }

    fn reset_txn(&mut self) {
        self.seq = 0;
        self.txn_messages = 0;
        self.txn_publish_start = self.plan.publish.len();
        self.txn_overflow = false;
        self.txn_pairs.clear();
    }

    /// A Relation message: (re)resolves the rules of that relation by column name.
    pub fn relation(&mut self, rel: &Arc<Relation>) {
        let prev = self.relations.remove(&rel.oid);
        let state = self.resolve(rel, prev);
        self.relations.insert(rel.oid, state);
    }

    /// A logical decoding message under the `cache-invalidator` prefix (others
    /// are ignored): `flush:all` and `flush:table:<schema.table>` fire
    /// truncate invalidations; `invalidate:v1:<json>` is a declared
    /// invalidation ([`super::declared`]), planned like a mapped one;
    /// `heartbeat` plans nothing. Anything else under our prefix (an unknown
    /// payload version, a malformed payload, an unknown kind) cannot be
    /// understood, so it is answered with a full flush, never guessed: see
    /// [`Planner::take_malformed`].
    pub fn message(&mut self, prefix: &str, content: &[u8], lsn: Lsn) {
        if prefix != MESSAGE_PREFIX {
            return;
        }
        if self.xid.is_none() {
            self.lsn = lsn;
        }
        if content == HEARTBEAT {
            return;
        }
        if content == b"flush:all" {
            self.stats.flush_markers += 1;
            self.flush_all();
            return;
        }
        let result = if let Some(rest) = content.strip_prefix(b"flush:table:") {
            match std::str::from_utf8(rest).ok().map(TableName::parse) {
                Some(Ok(t)) => {
                    self.stats.flush_markers += 1;
                    self.flush_table(&t);
                    Ok(())
                }
                _ => Err(DeclaredError::UnknownKind(lossy_prefix(content))),
            }
        } else if let Some(rest) = content.strip_prefix(declared::INVALIDATE_PREFIX.as_bytes()) {
            declared::parse_invalidate(rest).map(|d| self.declared(&d))
        } else {
            Err(DeclaredError::UnknownKind(lossy_prefix(content)))
        };
        if let Err(error) = result {
            self.malformed(lsn, error);
        }
    }

    /// Plans one declared invalidation: keys and patterns as given, tags and
    /// versions under their prefixes, messages after the deletes (like a
    /// mapped rule's), all in the current transaction.
    pub fn declared(&mut self, d: &Declared) {
        let c = &mut self.stats.declared;
        c.messages += 1;
        c.keys += d.keys.len() as u64;
        c.tags += d.tags.len() as u64;
        c.versions += d.versions.len() as u64;
        c.patterns += d.patterns.len() as u64;
        c.publish += d.channels.len() as u64;
        let plan = &mut self.plan;
        let buf = &mut self.scratch.buf;
        for k in &d.keys {
            plan.keys.insert(k);
        }
        for (set, prefix, names) in [
            (&mut plan.tags, &self.ctx.tag_prefix, &d.tags),
            (&mut plan.versions, &self.ctx.version_prefix, &d.versions),
        ] {
            for n in names {
                buf.clear();
                buf.push_str(prefix);
                buf.push_str(n);
                set.insert(buf);
            }
        }
        for p in &d.patterns {
            plan.patterns.insert(p);
        }
        if d.channels.is_empty() {
            return;
        }
        let source: Arc<str> = Arc::from(DECLARED_SOURCE);
        for ch in &d.channels {
            let message = match &ch.message {
                Some(m) => m.clone(),
                None => self.declared_message(d),
            };
            self.add_message(&ch.channel, message, &source);
        }
    }

    /// The default message of a declared channel without a message of its own.
    fn declared_message(&self, d: &Declared) -> String {
        let tags: Vec<String> = d
            .tags
            .iter()
            .map(|t| format!("{}{t}", self.ctx.tag_prefix))
            .collect();
        let versions: Vec<String> = d
            .versions
            .iter()
            .map(|v| format!("{}{v}", self.ctx.version_prefix))
            .collect();
        serde_json::json!({
            "op": "declared",
            "lsn": self.lsn.to_string(),
            "keys": d.keys,
            "tags": tags,
            "versions": versions,
            "epoch": self.ctx.epoch,
        })
        .to_string()
    }

    /// A message under our prefix that cannot be understood: every mapped
    /// table's truncate invalidations (as `flush:all`), counted and kept for
    /// one log line with its LSN.
    fn malformed(&mut self, lsn: Lsn, error: DeclaredError) {
        self.stats.declared.malformed += 1;
        if self.malformed.len() < MAX_MALFORMED_KEPT {
            self.malformed.push(Malformed { lsn, error });
        }
        self.flush_all();
    }

    /// Messages answered with a full flush since the last call (at most
    /// [`MAX_MALFORMED_KEPT`]; [`PlannerStats::declared`] counts them all),
    /// each for one log line.
    pub fn take_malformed(&mut self) -> Vec<Malformed> {
        std::mem::take(&mut self.malformed)
    }

    /// Declared invalidations counted since the last call (for metrics).
    pub fn take_declared(&mut self) -> DeclaredCounters {
        let now = self.stats.declared;
        let delta = now.since(&self.declared_reported);
        self.declared_reported = now;
        delta
    }

    /// Fires every mapped table's truncate invalidations.
    pub fn flush_all(&mut self) {
        let tables: Vec<TableName> = self.truncates.keys().cloned().collect();
        for t in &tables {
            self.fire_truncate(t);
        }
    }

    /// Fires one table's truncate invalidations (nothing when unmapped).
    /// Returns whether the table is mapped.
    pub fn flush_table(&mut self, table: &TableName) -> bool {
        if self.truncates.contains_key(table) {
            self.fire_truncate(table);
            true
        } else {
            false
        }
    }

    /// One row change (or a truncate).
    pub fn change(&mut self, change: &Change) {
        let rel = &change.relation;
        let fresh = match self.relations.get_mut(&rel.oid) {
            Some(st) if Arc::ptr_eq(&st.rel, rel) => false,
            Some(st) if *st.rel == **rel => {
                st.rel = Arc::clone(rel);
                false
            }
            _ => true,
        };
        if fresh {
            self.relation(rel);
        }
        let Some(mut st) = self.relations.remove(&rel.oid) else {
            return;
        };
        st.counters.count_op(change.op);
        if let Some(mapped) = st.mapped.clone() {
            if change.op == Op::Truncate {
                self.fire_truncate(&mapped);
            } else {
                let mut fell_back = false;
                for rr in &st.rules {
                    if let Err((reason, col)) = self.apply_rule(rr, &st.table, change) {
                        *self
                            .fallbacks
                            .entry((Arc::clone(&st.table), reason, col.map(|c| (rr.rule, c))))
                            .or_insert(0) += 1;
                        if !fell_back {
                            st.counters.count_fallback(reason);
                            self.fire_truncate(&mapped);
                            fell_back = true;
                        }
                    }
                }
                for (reason, column) in self.pending_refresh_fallbacks.drain(..) {
                    st.counters.count_fallback(reason);
                    *self
                        .refresh_fallbacks
                        .entry((Arc::clone(&st.table), reason, column))
                        .or_insert(0) += 1;
                }
            }
        }
        self.seq = self.seq.saturating_add(1);
        self.relations.insert(rel.oid, st);
    }

    /// The version a refresh planned now carries.
    fn now(&self) -> RefreshVersion {
        RefreshVersion {
            lsn: self.lsn,
            seq: self.seq,
        }
    }

    /// The plan accumulated since the last call; the planner starts a new one.
    /// May be called inside a transaction (to apply it in bounded chunks).
    pub fn take(&mut self) -> Plan {
        self.txn_publish_start = 0;
        std::mem::take(&mut self.plan)
    }

    /// The plan accumulated so far.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Fallbacks since the last call, aggregated by table, reason and column,
    /// for a warning log line each (counters are in [`Planner::stats`]).
    pub fn take_fallbacks(&mut self) -> Vec<Fallback> {
        let mut out: Vec<Fallback> = self
            .fallbacks
            .drain()
            .map(|((table, reason, col), count)| Fallback {
                table: table.to_string(),
                reason,
                column: col.and_then(|(r, c)| {
                    self.mappings
                        .rules()
                        .get(r)
                        .and_then(|r| r.columns.get(c))
                        .cloned()
                }),
                count,
            })
            .collect();
        out.extend(
            self.refresh_fallbacks
                .drain()
                .map(|((table, reason, column), count)| Fallback {
                    table: table.to_string(),
                    reason,
                    column: column.map(|c| c.to_string()),
                    count,
                }),
        );
        out.sort_by(|a, b| (&a.table, a.reason, &a.column).cmp(&(&b.table, b.reason, &b.column)));
        out
    }

    /// Cumulative counters by table.
    pub fn stats(&self) -> PlannerStats {
        let mut s = PlannerStats {
            tables: BTreeMap::new(),
            ..self.stats.clone()
        };
        for st in self.relations.values() {
            s.tables
                .entry(st.table.to_string())
                .or_default()
                .add(&st.counters);
        }
        s
    }

    fn resolve(&mut self, rel: &Arc<Relation>, prev: Option<RelState>) -> RelState {
        let name = TableName {
            schema: rel.schema.clone(),
            name: rel.name.clone(),
        };
        let table: Arc<str> = Arc::from(name.to_string());
        let mut counters = TableCounters::default();
        let mut mapped = None;
        if self.truncates.contains_key(&name) {
            mapped = Some(name.clone());
        }
        if let Some(p) = prev {
            if p.table == table {
                counters = p.counters;
            } else {
                // Keep the old name's counters visible under its name.
                self.stats
                    .tables
                    .entry(p.table.to_string())
                    .or_default()
                    .add(&p.counters);
            }
            if mapped.is_none() {
                if let Some(old) = p.mapped {
                    tracing::warn!(table = %old, renamed_to = %name, "a mapped table was renamed: following it by OID; rename it in the mapping files too");
                    self.stats.renamed.push((old.to_string(), name.to_string()));
                    mapped = Some(old);
                }
            }
        }
        let mut rules = Vec::new();
        if let Some(m) = &mapped {
            for (i, rule) in self.mappings.rules().iter().enumerate() {
                if &rule.table == m {
                    rules.push(resolve_rule(i, rule, rel));
                }
            }
            self.recheck_columns(m, &rules);
        }
        RelState {
            rel: Arc::clone(rel),
            table,
            mapped,
            rules,
            counters,
        }
    }

    /// Re-checks a mapped table's placeholder columns against its relation as
    /// the last Relation message (after DDL) described it: a column that
    /// disappeared is reported once, loudly (here, and through
    /// [`PlannerStats::missing_columns`] as a metric and a `/readyz` reason);
    /// one that came back is cleared.
    fn recheck_columns(&mut self, mapped: &TableName, rules: &[ResolvedRule]) {
        let table = mapped.to_string();
        let mut missing: Vec<String> = Vec::new();
        for rr in rules {
            let rule = &self.mappings.rules()[rr.rule];
            for (col, idx) in rule.columns.iter().zip(&rr.cols) {
                if idx.is_none() && !missing.contains(col) {
                    missing.push(col.clone());
                }
            }
        }
        let known = &mut self.stats.missing_columns;
        for col in &missing {
            if !known.iter().any(|(t, c)| *t == table && c == col) {
                tracing::error!(
                    table = %table,
                    column = %col,
                    "a mapped table no longer has a column its mapping renders: every change of it fires the table's truncate invalidations until the mapping is fixed (see /readyz)"
                );
                known.push((table.clone(), col.clone()));
            }
        }
        known.retain(|(t, c)| *t != table || missing.contains(c));
    }

    /// Placeholder columns mapped relations no longer have (see [`PlannerStats::missing_columns`]).
    pub fn missing_columns(&self) -> &[(String, String)] {
        &self.stats.missing_columns
    }

    /// Renders one rule for one change into the plan; `Err` asks for the fallback.
    fn apply_rule(
        &mut self,
        rr: &ResolvedRule,
        table: &Arc<str>,
        change: &Change,
    ) -> Result<(), (FallbackReason, Option<usize>)> {
        let mappings = Arc::clone(&self.mappings);
        let rule = &mappings.rules()[rr.rule];
        if !rule.on.contains(change.op) {
            return Ok(());
        }
        let (primary, secondary) = match change.op {
            Op::Insert => match &change.new {
                Some(n) => (Image { row: n, new: None }, None),
                None => return Err((FallbackReason::UnknownValue, None)),
            },
            Op::Delete => match &change.old {
                Some(o) => (Image { row: o, new: None }, None),
                None => return Err((FallbackReason::OldRowMissing, None)),
            },
            Op::Update => {
                let Some(n) = &change.new else {
                    return Err((FallbackReason::UnknownValue, None));
                };
                if !update_fires(rr, change) {
                    return Ok(());
                }
                let old = match &change.old {
                    Some(o) => Some(Image {
                        row: o,
                        new: Some(n),
                    }),
                    None if rr.old_implied => None,
                    None => return Err((FallbackReason::OldRowMissing, None)),
                };
                (Image { row: n, new: None }, old)
            }
            Op::Truncate => return Ok(()),
        };
        // Every value needed must be known (and of sane length) before anything is planned.
        let max = self.ctx.max_key_bytes;
        for i in 0..rr.cols.len() {
            check_known(rr, primary, i, max)?;
            if let Some(old) = secondary {
                if rr.in_keys[i] {
                    check_known(rr, old, i, max)?;
                }
            }
        }

        let collect = rule.channels.iter().any(|c| c.message.is_none());
        let sc = &mut self.scratch;
        sc.keys.clear();
        sc.tags.clear();
        sc.versions.clear();
        let now = RefreshVersion {
            lsn: self.lsn,
            seq: self.seq,
        };
        for img in std::iter::once(primary).chain(secondary) {
            let ctx = &self.ctx;
            let plan = &mut self.plan;
            if rule.mode == Mode::Tombstone {
                let lsn = self.lsn;
                render_set(
                    &rule.keys,
                    rr,
                    img,
                    "",
                    &mut sc.buf,
                    &mut Unlinks {
                        inner: AtLsn(&mut plan.tombstones, lsn),
                        refresh: &mut plan.refresh,
                        now,
                    },
                    collect.then_some(&mut sc.keys),
                );
                render_set(
                    &rule.tags,
                    rr,
                    img,
                    &ctx.tag_prefix,
                    &mut sc.buf,
                    &mut AtLsn(&mut plan.tombstone_tags, lsn),
                    collect.then_some(&mut sc.tags),
                );
            } else {
                render_set(
                    &rule.keys,
                    rr,
                    img,
                    "",
                    &mut sc.buf,
                    &mut Unlinks {
                        inner: &mut plan.keys,
                        refresh: &mut plan.refresh,
                        now,
                    },
                    collect.then_some(&mut sc.keys),
                );
                render_set(
                    &rule.tags,
                    rr,
                    img,
                    &ctx.tag_prefix,
                    &mut sc.buf,
                    &mut plan.tags,
                    collect.then_some(&mut sc.tags),
                );
            }
            render_set(
                &rule.versions,
                rr,
                img,
                &ctx.version_prefix,
                &mut sc.buf,
                &mut plan.versions,
                collect.then_some(&mut sc.versions),
            );
            render_set(
                &rule.patterns,
                rr,
                img,
                "",
                &mut sc.buf,
                &mut Patterns {
                    set: &mut plan.patterns,
                    refresh: &mut plan.refresh,
                    now,
                },
                None,
            );
        }
        for (rf, resolved) in rule.refresh.iter().zip(&rr.refresh) {
            self.plan_refresh(
                rule.mode, rf, resolved, rr, change.op, primary, secondary, collect,
            );
        }
        if rule.channels.is_empty() {
            return Ok(());
        }
        if collect {
            let sc = &mut self.scratch;
            for v in [&mut sc.keys, &mut sc.tags, &mut sc.versions] {
                v.sort_unstable();
                v.dedup();
            }
        }
        for ch in &rule.channels {
            let message = match &ch.message {
                None => serde_json::to_string(&DefaultMessage {
                    table,
                    op: change.op.as_str(),
                    lsn: self.lsn.to_string(),
                    keys: &self.scratch.keys,
                    tags: &self.scratch.tags,
                    versions: &self.scratch.versions,
                    epoch: &self.ctx.epoch,
                }),
                Some(shape) => {
                    let v = render_shape(shape, rr, primary, &mut self.scratch.buf);
                    serde_json::to_string(&v)
                }
            };
            if let Ok(message) = message {
                self.add_message(&ch.channel, message, table);
            }
        }
        Ok(())
    }

    /// One `refresh` entry for one change: DELETE unlinks the key of the old
    /// row; INSERT and UPDATE set the key of the new row (a moved row's old
    /// key is unlinked). A value that cannot be rendered unlinks its key
    /// instead, recorded as a refresh fallback.
    #[allow(clippy::too_many_arguments)]
    fn plan_refresh(
        &mut self,
        mode: Mode,
        rf: &Refresh,
        resolved: &ResolvedRefresh,
        rr: &ResolvedRule,
        op: Op,
        primary: Image<'_>,
        secondary: Option<Image<'_>>,
        collect: bool,
    ) {
        let now = self.now();
        let mut key = String::new();
        let new_key = rf
            .key
            .render_into(&mut key, |i| value_text(rr, primary, i))
            .is_ok();
        if op == Op::Delete {
            if new_key {
                self.unlink(mode, &key, now, collect);
            }
            return;
        }
        if let Some(old) = secondary {
            let mut old_key = String::new();
            if rf
                .key
                .render_into(&mut old_key, |i| value_text(rr, old, i))
                .is_ok()
                && (!new_key || old_key != key)
            {
                self.unlink(mode, &old_key, now, collect);
            }
        }
        if !new_key {
            return; // a NULL in the key: no key
        }
        if collect {
            self.scratch.keys.push(key.clone());
        }
        match render_value(
            rf.format,
            resolved,
            primary.row,
            now,
            self.ctx.max_refresh_bytes,
        ) {
            Ok(value) => refresh::put(
                &mut self.plan.refresh,
                key,
                RefreshSet {
                    value,
                    version: now,
                    ttl_s: rf.ttl_s,
                },
            ),
            Err(fallback) => {
                self.pending_refresh_fallbacks.push(fallback);
                self.unlink(mode, &key, now, false);
            }
        }
    }

    /// Unlinks (or, under `mode = "tombstone"`, tombstones) `key`; a refresh
    /// of it planned by an earlier change is dropped (the later one wins).
    fn unlink(&mut self, mode: Mode, key: &str, now: RefreshVersion, collect: bool) {
        let plan = &mut self.plan;
        match mode {
            Mode::Delete => Unlinks {
                inner: &mut plan.keys,
                refresh: &mut plan.refresh,
                now,
            }
            .add(key),
            Mode::Tombstone => Unlinks {
                inner: AtLsn(&mut plan.tombstones, now.lsn),
                refresh: &mut plan.refresh,
                now,
            }
            .add(key),
        }
        if collect {
            self.scratch.keys.push(key.to_owned());
        }
    }

    fn fire_truncate(&mut self, table: &TableName) {
        let Some(t) = self.truncates.get(table) else {
            return;
        };
        let plan = &mut self.plan;
        if !plan.refresh.is_empty() {
            // A truncate after a refresh of the same batch: the refresh goes.
            let now = RefreshVersion {
                lsn: self.lsn,
                seq: self.seq,
            };
            plan.refresh.retain(|key, set| {
                set.version >= now
                    || !(t.keys.iter().any(|k| k == key)
                        || t.patterns
                            .iter()
                            .any(|p| glob::glob_match(p.as_bytes(), key.as_bytes())))
            });
        }
        insert_all(&mut plan.keys, &t.keys);
        insert_all(&mut plan.tags, &t.tags);
        insert_all(&mut plan.versions, &t.versions);
        insert_all(&mut plan.patterns, &t.patterns);
        insert_all(&mut plan.tag_patterns, &t.tag_patterns);
        insert_all(&mut plan.version_patterns, &t.version_patterns);
        if t.channels.is_empty() {
            return;
        }
        let name = Arc::clone(&t.name);
        let channels = t.channels.clone();
        for (channel, shaped) in channels {
            let message = shaped.unwrap_or_else(|| self.truncate_message(&name));
            self.add_message(&channel, message, &name);
        }
    }

    fn truncate_message(&self, table: &str) -> String {
        serde_json::to_string(&TruncateMessage {
            table,
            op: "truncate",
            lsn: self.lsn.to_string(),
            epoch: &self.ctx.epoch,
        })
        .unwrap_or_default()
    }

    fn add_message(&mut self, channel: &str, message: String, table: &Arc<str>) {
        if !self
            .txn_pairs
            .iter()
            .any(|(c, t)| c == channel && t == table)
        {
            self.txn_pairs.push((channel.to_owned(), Arc::clone(table)));
        }
        if self.txn_overflow {
            let m = self.truncate_message(table);
            self.plan.add_publish(Publish {
                channel: channel.to_owned(),
                message: m,
            });
            return;
        }
        let p = Publish {
            channel: channel.to_owned(),
            message,
        };
        if self.plan.publish_seen.contains(&p) {
            return;
        }
        self.txn_messages += 1;
        if self.txn_messages <= self.ctx.max_batch_ops {
            self.plan.add_publish(p);
            return;
        }
        // Overflow: this transaction's messages give way to one truncate
        // message per channel and table.
        self.txn_overflow = true;
        self.stats.message_overflows += 1;
        let start = self.txn_publish_start.min(self.plan.publish.len());
        for removed in self.plan.publish.drain(start..) {
            self.plan.publish_seen.remove(&removed);
        }
        let pairs = std::mem::take(&mut self.txn_pairs);
        for (c, t) in &pairs {
            let m = self.truncate_message(t);
            self.plan.add_publish(Publish {
                channel: c.clone(),
                message: m,
            });
        }
        self.txn_pairs = pairs;
    }
}

fn push_all<T: PartialEq>(out: &mut Vec<T>, items: impl Iterator<Item = T>) {
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
}

fn insert_all(set: &mut super::KeySet, items: &[String]) {
    for i in items {
        if !set.contains(i) {
            set.insert(i);
        }
    }
}

fn resolve_rule(index: usize, rule: &Rule, rel: &Relation) -> ResolvedRule {
    let cols: Vec<Option<usize>> = rule.columns.iter().map(|c| rel.column_index(c)).collect();
    let assumed: Vec<bool> = rule
        .columns
        .iter()
        .map(|c| rule.assume_unchanged.contains(c))
        .collect();
    let in_keys = rule.invalidation_columns();
    let full = rel.replica_identity == b'f';
    let old_implied = full
        || rule
            .columns
            .iter()
            .zip(&cols)
            .zip(&in_keys)
            .zip(&assumed)
            .all(|(((_, idx), used), assumed)| {
                !*used
                    || *assumed
                    || idx.is_some_and(|i| rel.columns.get(i).is_some_and(|c| c.is_key))
            });
    ResolvedRule {
        rule: index,
        changed: rule
            .changed_columns
            .as_ref()
            .map(|cs| cs.iter().map(|c| rel.column_index(c)).collect()),
        cols,
        assumed,
        in_keys,
        old_implied,
        refresh: rule
            .refresh
            .iter()
            .map(|r| resolve_refresh(r, rel))
            .collect(),
    }
}

fn resolve_refresh(r: &Refresh, rel: &Relation) -> ResolvedRefresh {
    let column = |name: &str, idx: Option<usize>| {
        let mut json_prefix = String::from(",");
        refresh::push_json_str(&mut json_prefix, name);
        json_prefix.push(':');
        ValueColumn {
            idx,
            name: Arc::from(name),
            json_prefix,
            kind: idx
                .and_then(|i| rel.columns.get(i))
                .map_or(ValueKind::Text, |c| ValueKind::of(c.type_oid)),
        }
    };
    let cols = match &r.columns {
        Some(names) => names
            .iter()
            .map(|n| column(n, rel.column_index(n)))
            .collect(),
        // Every column; a column named like the reserved field is left out
        // (`check` refuses it).
        None => rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.name != REFRESH_LSN_FIELD)
            .map(|(i, c)| column(&c.name, Some(i)))
            .collect(),
    };
    ResolvedRefresh { cols }
}

/// Renders a refreshed value from the new row; `Err` names why it cannot be
/// set (its key is unlinked instead).
fn render_value(
    format: RefreshFormat,
    rf: &ResolvedRefresh,
    row: &Row,
    version: RefreshVersion,
    max_bytes: usize,
) -> Result<RefreshValue, (FallbackReason, Option<Arc<str>>)> {
    let value = |c: &ValueColumn| -> Result<&Value, (FallbackReason, Option<Arc<str>>)> {
        let idx = c.idx.ok_or((
            FallbackReason::RefreshMissingColumn,
            Some(Arc::clone(&c.name)),
        ))?;
        match row.get(idx) {
            None => Err((
                FallbackReason::RefreshMissingColumn,
                Some(Arc::clone(&c.name)),
            )),
            Some(Value::Unknown) => Err((
                FallbackReason::RefreshUnknownValue,
                Some(Arc::clone(&c.name)),
            )),
            Some(v) => Ok(v),
        }
    };
    let too_large = || (FallbackReason::RefreshTooLarge, None);
    match format {
        RefreshFormat::Json => {
            let mut out = String::with_capacity(64 + 24 * rf.cols.len());
            out.push_str("{\"");
            out.push_str(REFRESH_LSN_FIELD);
            out.push_str("\":\"");
            use std::fmt::Write;
            let _ = write!(out, "{version}");
            out.push('"');
            for c in &rf.cols {
                let v = value(c)?;
                out.push_str(&c.json_prefix);
                match v {
                    Value::Text(t) => refresh::push_json_value(&mut out, c.kind, t),
                    _ => out.push_str("null"),
                }
                if out.len() > max_bytes {
                    return Err(too_large());
                }
            }
            out.push('}');
            if out.len() > max_bytes {
                return Err(too_large());
            }
            Ok(RefreshValue::Json(out))
        }
        RefreshFormat::Hash => {
            let mut fields = Vec::with_capacity(rf.cols.len() + 1);
            let mut len = 0;
            fields.push((REFRESH_LSN_FIELD.to_owned(), version.to_string()));
            for c in &rf.cols {
                if let Value::Text(t) = value(c)? {
                    len += c.name.len() + t.len();
                    if len > max_bytes {
                        return Err(too_large());
                    }
                    fields.push((c.name.to_string(), t.to_string()));
                }
            }
            Ok(RefreshValue::Hash(fields))
        }
    }
}

/// Whether an UPDATE passes the rule's `columns` filter.
fn update_fires(rr: &ResolvedRule, change: &Change) -> bool {
    let Some(cols) = &rr.changed else {
        return true;
    };
    let Some(new) = &change.new else {
        return true;
    };
    for idx in cols {
        let Some(i) = idx else {
            return true; // column missing: cannot tell
        };
        let n = new.get(*i);
        if matches!(n, Some(Value::Unknown)) {
            continue; // unchanged TOAST: not changed
        }
        let Some(old) = &change.old else {
            return true; // no old row: cannot tell
        };
        match old.get(*i) {
            None | Some(Value::Unknown) => return true,
            Some(o) if Some(o) != n => return true,
            Some(_) => {}
        }
    }
    false
}

#[inline]
fn lookup<'a>(rr: &ResolvedRule, img: Image<'a>, i: usize) -> Result<&'a Value, FallbackReason> {
    let idx = rr.cols[i].ok_or(FallbackReason::MissingColumn)?;
    let row = match img.new {
        Some(new) if rr.assumed[i] => new,
        _ => img.row,
    };
    row.get(idx).ok_or(FallbackReason::UnknownValue)
}

fn check_known(
    rr: &ResolvedRule,
    img: Image<'_>,
    i: usize,
    max_len: usize,
) -> Result<(), (FallbackReason, Option<usize>)> {
    match lookup(rr, img, i) {
        Ok(Value::Unknown) => Err((FallbackReason::UnknownValue, Some(i))),
        Ok(Value::Text(s)) if s.len() > max_len => Err((FallbackReason::ValueTooLong, Some(i))),
        Ok(_) => Ok(()),
        Err(r) => Err((r, Some(i))),
    }
}

#[inline]
fn value_text<'a>(rr: &ResolvedRule, img: Image<'a>, i: usize) -> Result<&'a str, Missing> {
    match lookup(rr, img, i) {
        Ok(Value::Text(s)) => Ok(s),
        Ok(Value::Null) => Err(Missing::Null),
        _ => Err(Missing::Unknown),
    }
}

/// Where [`render_set`] puts rendered names: a plain set, or a map keeping
/// the highest commit LSN per name (tombstones).
trait RenderTarget {
    fn add(&mut self, name: &str);
}

impl RenderTarget for super::KeySet {
    fn add(&mut self, name: &str) {
        self.insert(name);
    }
}

/// Tombstone names at one commit LSN; an entry only ever moves to a higher LSN.
struct AtLsn<'a>(&'a mut super::LsnMap, Lsn);

impl RenderTarget for AtLsn<'_> {
    fn add(&mut self, name: &str) {
        match self.0.get_mut(name) {
            Some(lsn) => *lsn = (*lsn).max(self.1),
            None => {
                self.0.insert(name.to_owned(), self.1);
            }
        }
    }
}

/// Keys to unlink or tombstone: a refresh of the same key planned by an
/// earlier change is dropped (the later change wins; one of the same change
/// stays, and the sink sets it after the deletes).
struct Unlinks<'a, T> {
    inner: T,
    refresh: &'a mut super::RefreshMap,
    now: RefreshVersion,
}

impl<T: RenderTarget> RenderTarget for Unlinks<'_, T> {
    fn add(&mut self, name: &str) {
        if !self.refresh.is_empty() && self.refresh.get(name).is_some_and(|r| r.version < self.now)
        {
            self.refresh.remove(name);
        }
        self.inner.add(name);
    }
}

impl RenderTarget for &mut super::KeySet {
    fn add(&mut self, name: &str) {
        self.insert(name);
    }
}

/// Row-level patterns: a new pattern drops the refreshes of earlier changes it matches.
struct Patterns<'a> {
    set: &'a mut super::KeySet,
    refresh: &'a mut super::RefreshMap,
    now: RefreshVersion,
}

impl RenderTarget for Patterns<'_> {
    fn add(&mut self, name: &str) {
        if self.set.insert(name) && !self.refresh.is_empty() {
            let now = self.now;
            self.refresh.retain(|key, set| {
                set.version >= now || !glob::glob_match(name.as_bytes(), key.as_bytes())
            });
        }
    }
}

fn render_set(
    templates: &[Template],
    rr: &ResolvedRule,
    img: Image<'_>,
    prefix: &str,
    buf: &mut String,
    set: &mut impl RenderTarget,
    mut collect: Option<&mut Vec<String>>,
) {
    for t in templates {
        buf.clear();
        buf.push_str(prefix);
        if t.render_into(buf, |i| value_text(rr, img, i)).is_err() {
            continue; // NULL renders nothing (unknown values were checked before)
        }
        set.add(buf);
        if let Some(c) = collect.as_deref_mut() {
            c.push(buf.clone());
        }
    }
}

fn render_shape(
    shape: &Shape,
    rr: &ResolvedRule,
    img: Image<'_>,
    buf: &mut String,
) -> serde_json::Value {
    match shape {
        Shape::Text(t) => {
            buf.clear();
            match t.render_into(buf, |i| value_text(rr, img, i)) {
                Ok(()) => serde_json::Value::String(buf.clone()),
                Err(_) => serde_json::Value::Null,
            }
        }
        Shape::Literal(v) => v.clone(),
        Shape::Array(items) => serde_json::Value::Array(
            items
                .iter()
                .map(|s| render_shape(s, rr, img, buf))
                .collect(),
        ),
        Shape::Object(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, s)| (k.clone(), render_shape(s, rr, img, buf)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::RelationColumn;

    fn rel(oid: u32, name: &str, cols: &[&str], identity: u8, keys: &[&str]) -> Arc<Relation> {
        Arc::new(Relation {
            oid,
            schema: "public".into(),
            name: name.into(),
            replica_identity: identity,
            columns: cols
                .iter()
                .map(|c| RelationColumn {
                    name: c.to_string(),
                    is_key: identity == b'f' || keys.contains(c),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn row(vals: &[Option<&str>]) -> Row {
        Row {
            values: vals
                .iter()
                .map(|v| match v {
                    Some("?") => Value::Unknown,
                    Some(s) => Value::Text((*s).into()),
                    None => Value::Null,
                })
                .collect(),
        }
    }

    fn change(
        r: &Arc<Relation>,
        op: Op,
        old: Option<&[Option<&str>]>,
        new: Option<&[Option<&str>]>,
    ) -> Change {
        Change {
            relation: Arc::clone(r),
            op,
            old: old.map(row),
            new: new.map(row),
        }
    }

    fn planner(src: &str) -> Planner {
        let m = Mappings::parse("m.toml", src).unwrap();
        let ctx = PlannerContext {
            epoch: "e1".into(),
            ..Default::default()
        };
        let mut p = Planner::new(Arc::new(m), ctx);
        p.begin(1, Lsn(0x100));
        p
    }

    fn sorted(set: &crate::plan::KeySet) -> Vec<&str> {
        let mut v: Vec<&str> = set.iter().collect();
        v.sort_unstable();
        v
    }

    const POSTS: &str = r#"
[[table]]
name = "posts"
keys = ["post:{id}", "author:{author_id}:posts"]
tags = ["author:{author_id}"]
versions = ["post:{id}"]
patterns = ["feed:*:author:{author_id}"]
"#;

    fn posts() -> Arc<Relation> {
        rel(10, "posts", &["id", "author_id", "title"], b'f', &[])
    }

    #[test]
    fn update_renders_old_and_new_union() {
        let mut p = planner(POSTS);
        let r = posts();
        p.change(&change(
            &r,
            Op::Update,
            Some(&[Some("7"), Some("1"), Some("a")]),
            Some(&[Some("7"), Some("2"), Some("a")]),
        ));
        let plan = p.take();
        assert_eq!(
            sorted(&plan.keys),
            ["author:1:posts", "author:2:posts", "post:7"]
        );
        assert_eq!(sorted(&plan.tags), ["tag:author:1", "tag:author:2"]);
        assert_eq!(sorted(&plan.versions), ["version:post:7"]);
        assert_eq!(
            sorted(&plan.patterns),
            ["feed:*:author:1", "feed:*:author:2"]
        );
        assert!(p.take().is_empty(), "take resets");
    }

    #[test]
    fn insert_renders_new_delete_renders_old() {
        let mut p = planner(POSTS);
        let r = posts();
        p.change(&change(
            &r,
            Op::Insert,
            None,
            Some(&[Some("7"), Some("1"), Some("a")]),
        ));
        assert_eq!(sorted(&p.take().keys), ["author:1:posts", "post:7"]);
        p.change(&change(
            &r,
            Op::Delete,
            Some(&[Some("8"), Some("3"), Some("a")]),
            None,
        ));
        assert_eq!(sorted(&p.take().keys), ["author:3:posts", "post:8"]);
    }

    #[test]
    fn null_renders_nothing() {
        let mut p = planner(POSTS);
        p.change(&change(
            &posts(),
            Op::Insert,
            None,
            Some(&[Some("7"), None, Some("a")]),
        ));
        let plan = p.take();
        assert_eq!(sorted(&plan.keys), ["post:7"]);
        assert!(plan.tags.is_empty() && plan.patterns.is_empty());
        assert!(p.take_fallbacks().is_empty());
    }

    #[test]
    fn pattern_values_are_glob_escaped() {
        let mut p = planner(POSTS);
        p.change(&change(
            &posts(),
            Op::Insert,
            None,
            Some(&[Some("7"), Some("*"), Some("a")]),
        ));
        assert_eq!(sorted(&p.take().patterns), ["feed:*:author:\\*"]);
    }

    #[test]
    fn unknown_value_fires_the_table_truncate() {
        let mut p = planner(POSTS);
        // A key-only old row under the default identity: author_id not sent.
        let r = rel(10, "posts", &["id", "author_id", "title"], b'd', &["id"]);
        p.change(&change(
            &r,
            Op::Delete,
            Some(&[Some("7"), Some("?"), Some("?")]),
            None,
        ));
        let plan = p.take();
        assert!(
            plan.keys.is_empty(),
            "nothing row-level is planned: {plan:?}"
        );
        assert_eq!(
            sorted(&plan.patterns),
            ["author:*:posts", "feed:*:author:*", "post:*"]
        );
        assert_eq!(sorted(&plan.tag_patterns), ["tag:author:*"]);
        assert_eq!(sorted(&plan.version_patterns), ["version:post:*"]);
        let f = p.take_fallbacks();
        assert_eq!(
            f,
            [Fallback {
                table: "public.posts".into(),
                reason: FallbackReason::UnknownValue,
                column: Some("author_id".into()),
                count: 1
            }]
        );
        assert_eq!(p.stats().tables["public.posts"].fallback_unknown_value, 1);
        assert_eq!(p.stats().tables["public.posts"].deletes, 1);
    }

    #[test]
    fn missing_column_falls_back_without_crashing() {
        let mut p = planner(POSTS);
        let r = rel(10, "posts", &["id", "title"], b'f', &[]);
        p.change(&change(&r, Op::Insert, None, Some(&[Some("7"), Some("a")])));
        assert!(p.take().patterns.contains("post:*"));
        assert_eq!(p.take_fallbacks()[0].reason, FallbackReason::MissingColumn);
        assert_eq!(
            p.missing_columns(),
            [("public.posts".to_owned(), "author_id".to_owned())],
            "reported once, by name"
        );
        p.relation(&r);
        assert_eq!(p.missing_columns().len(), 1, "not reported twice");
        // The column comes back with a new Relation: rendering resumes.
        p.relation(&posts());
        assert!(p.missing_columns().is_empty(), "cleared");
        p.change(&change(
            &posts(),
            Op::Insert,
            None,
            Some(&[Some("7"), Some("1"), Some("a")]),
        ));
        assert!(p.take().keys.contains("post:7"));
    }

    #[test]
    fn update_without_old_row_under_default_identity() {
        // id is the identity: no old row means it did not change.
        let mut p = planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n");
        let r = rel(11, "users", &["id", "name"], b'd', &["id"]);
        p.change(&change(&r, Op::Update, None, Some(&[Some("1"), Some("b")])));
        assert_eq!(sorted(&p.take().keys), ["user:1"]);
        assert!(p.take_fallbacks().is_empty());
        // author_id is not: without old row the old author is unknown -> fallback.
        let mut p = planner(POSTS);
        let r = rel(10, "posts", &["id", "author_id", "title"], b'd', &["id"]);
        p.change(&change(
            &r,
            Op::Update,
            None,
            Some(&[Some("7"), Some("2"), Some("a")]),
        ));
        assert!(p.take().patterns.contains("author:*:posts"));
        assert_eq!(p.take_fallbacks()[0].reason, FallbackReason::OldRowMissing);
    }

    #[test]
    fn assume_unchanged_takes_the_old_value_from_the_new_row() {
        let mut p = planner(
            "[[table]]\nname = \"docs\"\nkeys = [\"t:{tenant_id}:doc:{id}\"]\nassume_unchanged = [\"tenant_id\"]\n",
        );
        let r = rel(12, "docs", &["id", "tenant_id"], b'd', &["id"]);
        // Identity changed: key-only old row, tenant_id unknown in it.
        p.change(&change(
            &r,
            Op::Update,
            Some(&[Some("1"), Some("?")]),
            Some(&[Some("2"), Some("9")]),
        ));
        assert_eq!(sorted(&p.take().keys), ["t:9:doc:1", "t:9:doc:2"]);
        assert!(p.take_fallbacks().is_empty());
    }

    #[test]
    fn columns_filter() {
        let src = "[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\ncolumns = [\"avatar\"]\n";
        let r = rel(11, "users", &["id", "name", "avatar"], b'f', &[]);
        let mut p = planner(src);
        // avatar unchanged: nothing.
        p.change(&change(
            &r,
            Op::Update,
            Some(&[Some("1"), Some("a"), Some("x")]),
            Some(&[Some("1"), Some("b"), Some("x")]),
        ));
        assert!(p.take().is_empty());
        // avatar changed.
        p.change(&change(
            &r,
            Op::Update,
            Some(&[Some("1"), Some("a"), Some("x")]),
            Some(&[Some("1"), Some("a"), Some("y")]),
        ));
        assert_eq!(sorted(&p.take().keys), ["user:1"]);
        // no old row: cannot tell, fires.
        p.change(&change(
            &r,
            Op::Update,
            None,
            Some(&[Some("1"), Some("a"), Some("y")]),
        ));
        assert_eq!(sorted(&p.take().keys), ["user:1"]);
        // unchanged TOAST in the new row: known unchanged.
        p.change(&change(
            &r,
            Op::Update,
            None,
            Some(&[Some("1"), Some("a"), Some("?")]),
        ));
        assert!(p.take().is_empty());
        // inserts and deletes are not filtered.
        p.change(&change(
            &r,
            Op::Insert,
            None,
            Some(&[Some("1"), Some("a"), Some("y")]),
        ));
        assert_eq!(p.take().keys.len(), 1);
    }

    #[test]
    fn on_filter() {
        let mut p =
            planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\non = [\"delete\"]\n");
        let r = rel(11, "users", &["id"], b'f', &[]);
        p.change(&change(&r, Op::Insert, None, Some(&[Some("1")])));
        assert!(p.take().is_empty());
        p.change(&change(&r, Op::Delete, Some(&[Some("1")]), None));
        assert_eq!(p.take().keys.len(), 1);
    }

    #[test]
    fn truncate_fires_derived_truncate() {
        let mut p = planner(POSTS);
        p.change(&change(&posts(), Op::Truncate, None, None));
        let plan = p.take();
        assert_eq!(
            sorted(&plan.patterns),
            ["author:*:posts", "feed:*:author:*", "post:*"]
        );
        assert_eq!(p.stats().tables["public.posts"].truncates, 1);
        assert!(p.take_fallbacks().is_empty());
    }

    #[test]
    fn flush_markers() {
        let src = format!("{POSTS}\n[[table]]\nname = \"users\"\nkeys = [\"user:{{id}}\"]\n[table.truncate]\npatterns = [\"user:*\"]\n");
        let mut p = planner(&src);
        p.message("cache-invalidator", b"flush:table:posts", Lsn(5));
        assert_eq!(
            sorted(&p.take().patterns),
            ["author:*:posts", "feed:*:author:*", "post:*"]
        );
        p.message("cache-invalidator", b"flush:table:public.users", Lsn(5));
        assert_eq!(sorted(&p.take().patterns), ["user:*"]);
        p.message("cache-invalidator", b"flush:all", Lsn(5));
        assert_eq!(p.take().patterns.len(), 4);
        p.message("cache-invalidator", b"heartbeat", Lsn(5));
        p.message("other", b"flush:all", Lsn(5));
        assert!(p.take().is_empty());
        assert_eq!(p.stats().flush_markers, 3);
    }

    #[test]
    fn declared_invalidations_are_planned_with_the_transaction() {
        let src = format!("{POSTS}\n[[table]]\nname = \"users\"\nkeys = [\"user:{{id}}\"]\n[table.truncate]\npatterns = [\"user:*\"]\n");
        let mut p = planner(&src);
        p.begin(3, Lsn(0x30));
        p.change(&change(
            &posts(),
            Op::Insert,
            None,
            Some(&[Some("7"), Some("1"), Some("a")]),
        ));
        p.message(
            MESSAGE_PREFIX,
            br#"invalidate:v1:{"keys":["post:7:count","post:7"],"tags":["user:5"],"versions":["post:7"],"patterns":["feed:[ab]*"],"channels":[{"channel":"c","message":{"post":7}},{"channel":"d"}]}"#,
            Lsn(0x20),
        );
        p.commit();
        let plan = p.take();
        // Keys as given, deduplicated with the mapped rule's.
        assert_eq!(
            sorted(&plan.keys),
            ["author:1:posts", "post:7", "post:7:count"]
        );
        assert_eq!(sorted(&plan.tags), ["tag:author:1", "tag:user:5"]);
        assert_eq!(sorted(&plan.versions), ["version:post:7"]);
        // The declared pattern keeps its glob; the mapped one is escaped.
        assert_eq!(sorted(&plan.patterns), ["feed:*:author:1", "feed:[ab]*"]);
        assert!(plan.tag_patterns.is_empty(), "no flush: {plan:?}");
        assert_eq!(plan.publish.len(), 2);
        assert_eq!(plan.publish[0].message, r#"{"post":7}"#);
        assert_eq!(
            plan.publish[1].message,
            r#"{"epoch":"e1","keys":["post:7:count","post:7"],"lsn":"0/30","op":"declared","tags":["tag:user:5"],"versions":["version:post:7"]}"#
        );
        let d = p.stats().declared;
        assert_eq!(
            (
                d.messages,
                d.keys,
                d.tags,
                d.versions,
                d.patterns,
                d.publish,
                d.malformed
            ),
            (1, 2, 1, 1, 1, 2, 0)
        );
        assert!(p.take_malformed().is_empty());
        assert_eq!(p.take_declared().keys, 2);
        assert_eq!(p.take_declared(), DeclaredCounters::default());
    }

    #[test]
    fn a_message_that_cannot_be_understood_flushes_everything() {
        let src = format!("{POSTS}\n[[table]]\nname = \"users\"\nkeys = [\"user:{{id}}\"]\n[table.truncate]\npatterns = [\"user:*\"]\n");
        let all = ["author:*:posts", "feed:*:author:*", "post:*", "user:*"];
        for content in [
            &b"invalidate:v9:{}"[..],
            b"invalidate:v1:{not json",
            b"invalidate:v1:{\"keys\":[\"\"]}",
            b"invalidate:\xff",
            b"flush:table:",
            b"flush:everything",
            b"",
        ] {
            let mut p = planner(&src);
            p.begin(3, Lsn(0x30));
            p.message(MESSAGE_PREFIX, content, Lsn(0x20));
            p.commit();
            let plan = p.take();
            assert_eq!(
                sorted(&plan.patterns),
                all,
                "{}",
                String::from_utf8_lossy(content)
            );
            let m = p.take_malformed();
            assert_eq!(m.len(), 1);
            assert_eq!(m[0].lsn, Lsn(0x20), "the message's own LSN");
            assert_eq!(p.stats().declared.malformed, 1);
            assert_eq!(p.stats().declared.messages, 0);
        }
        // Heartbeats, known markers and other prefixes are not malformed.
        let mut p = planner(&src);
        p.message(MESSAGE_PREFIX, b"heartbeat", Lsn(1));
        p.message("someone-else", b"invalidate:v9:", Lsn(1));
        p.message(MESSAGE_PREFIX, b"flush:table:public.unmapped", Lsn(1));
        assert!(p.take().is_empty());
        assert!(p.take_malformed().is_empty());
    }

    #[test]
    fn malformed_messages_kept_for_logging_are_bounded() {
        let mut p = planner(POSTS);
        for i in 0..100 {
            p.message(MESSAGE_PREFIX, b"invalidate:v0:", Lsn(i));
        }
        assert_eq!(p.take_malformed().len(), MAX_MALFORMED_KEPT);
        assert_eq!(p.stats().declared.malformed, 100);
        assert_eq!(sorted(&p.take().patterns).len(), 3);
    }

    #[test]
    fn truncate_none_and_unmapped_tables() {
        let mut p =
            planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\ntruncate = \"none\"\n");
        let r = rel(11, "users", &["id"], b'f', &[]);
        p.change(&change(&r, Op::Truncate, None, None));
        assert!(p.take().is_empty());
        let other = rel(99, "audit", &["id"], b'f', &[]);
        p.change(&change(&other, Op::Insert, None, Some(&[Some("1")])));
        assert!(p.take().is_empty());
        assert_eq!(p.stats().tables["public.audit"].inserts, 1);
    }

    #[test]
    fn a_row_changed_1000_times_yields_one_invalidation_per_key() {
        let mut p = planner(&format!("{POSTS}channels = [\"c\"]\n"));
        let r = posts();
        for i in 0..1000 {
            let title = format!("t{i}");
            p.change(&change(
                &r,
                Op::Update,
                Some(&[Some("7"), Some("1"), Some("x")]),
                Some(&[Some("7"), Some("1"), Some(&title)]),
            ));
        }
        let plan = p.take();
        assert_eq!(plan.keys.len(), 2);
        assert_eq!(plan.tags.len(), 1);
        assert_eq!(plan.versions.len(), 1);
        assert_eq!(plan.publish.len(), 1);
        assert_eq!(p.stats().tables["public.posts"].updates, 1000);
    }

    #[test]
    fn default_message() {
        let mut p = planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}:b\", \"user:{id}:a\"]\ntags = [\"user:{id}\"]\nchannels = [\"cache:invalidate\"]\n");
        let r = rel(11, "users", &["id"], b'f', &[]);
        p.change(&change(&r, Op::Insert, None, Some(&[Some("1")])));
        let plan = p.take();
        assert_eq!(plan.publish.len(), 1);
        assert_eq!(plan.publish[0].channel, "cache:invalidate");
        assert_eq!(
            plan.publish[0].message,
            r#"{"table":"public.users","op":"insert","lsn":"0/100","keys":["user:1:a","user:1:b"],"tags":["tag:user:1"],"versions":[],"epoch":"e1"}"#
        );
    }

    #[test]
    fn shaped_message_renders_the_new_row() {
        let mut p = planner("[[table]]\nname = \"users\"\nchannels = [{ channel = \"cache:invalidate\", message = { entity = \"user\", id = \"{id}\", n = 2 } }]\n");
        let r = rel(11, "users", &["id"], b'f', &[]);
        p.change(&change(
            &r,
            Op::Update,
            Some(&[Some("1")]),
            Some(&[Some("2")]),
        ));
        let plan = p.take();
        assert_eq!(
            plan.publish[0].message,
            r#"{"entity":"user","id":"2","n":2}"#
        );
        p.change(&change(&r, Op::Delete, Some(&[Some("3")]), None));
        assert_eq!(
            p.take().publish[0].message,
            r#"{"entity":"user","id":"3","n":2}"#
        );
    }

    #[test]
    fn value_over_max_key_bytes_fires_the_fallback() {
        let m = Mappings::parse(
            "m.toml",
            "[[table]]\nname = \"users\"\nkeys = [\"u:{id}\"]\n",
        )
        .unwrap();
        let mut p = Planner::new(
            Arc::new(m),
            PlannerContext {
                max_key_bytes: 8,
                ..Default::default()
            },
        );
        let r = rel(11, "users", &["id"], b'f', &[]);
        p.begin(1, Lsn(1));
        p.change(&change(&r, Op::Insert, None, Some(&[Some("12345678")])));
        p.change(&change(&r, Op::Insert, None, Some(&[Some("123456789")])));
        p.commit();
        let plan = p.take();
        assert!(plan.keys.contains("u:12345678"));
        assert!(!plan.keys.iter().any(|k| k.contains("123456789")));
        assert_eq!(plan.patterns.iter().collect::<Vec<_>>(), ["u:*"]);
        let f = p.take_fallbacks();
        assert_eq!(f[0].reason, FallbackReason::ValueTooLong);
        assert_eq!(FallbackReason::ValueTooLong.as_str(), "value_too_long");
    }

    #[test]
    fn messages_past_max_batch_ops_become_one_truncate_message_per_table() {
        let m = Mappings::parse("m.toml", "[[table]]\nname = \"users\"\nkeys = [\"u:{id}\"]\nchannels = [\"c\"]\n[table.truncate]\npatterns = [\"u:*\"]\n").unwrap();
        let mut p = Planner::new(
            Arc::new(m),
            PlannerContext {
                max_batch_ops: 3,
                epoch: "e".into(),
                ..Default::default()
            },
        );
        let r = rel(11, "users", &["id"], b'f', &[]);
        // A first transaction under the limit stays as is.
        p.begin(1, Lsn(1));
        p.change(&change(&r, Op::Insert, None, Some(&[Some("0")])));
        p.commit();
        p.begin(2, Lsn(2));
        for i in 1..=5 {
            let id = i.to_string();
            p.change(&change(&r, Op::Insert, None, Some(&[Some(&id)])));
        }
        p.commit();
        let plan = p.take();
        let msgs: Vec<&str> = plan.publish.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert!(msgs[0].contains("\"op\":\"insert\""));
        assert_eq!(
            msgs[1],
            r#"{"table":"public.users","op":"truncate","lsn":"0/2","epoch":"e"}"#
        );
        assert_eq!(p.stats().message_overflows, 1);
    }

    #[test]
    fn renamed_table_is_followed_by_oid() {
        let mut p = planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n");
        p.relation(&rel(11, "users", &["id"], b'f', &[]));
        let renamed = rel(11, "people", &["id"], b'f', &[]);
        p.relation(&renamed);
        p.change(&change(&renamed, Op::Insert, None, Some(&[Some("1")])));
        assert_eq!(sorted(&p.take().keys), ["user:1"]);
        assert_eq!(
            p.stats().renamed,
            [("public.users".to_owned(), "public.people".to_owned())]
        );
    }

    #[test]
    fn events_drive_the_planner() {
        let mut p =
            planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\nchannels = [\"c\"]\n");
        let r = rel(11, "users", &["id"], b'f', &[]);
        p.feed(&Event::Begin {
            xid: 9,
            final_lsn: Lsn(0xAB),
            commit_time: Default::default(),
        });
        p.feed(&Event::Relation(Arc::clone(&r)));
        p.feed(&Event::Change(change(
            &r,
            Op::Insert,
            None,
            Some(&[Some("1")]),
        )));
        p.feed(&Event::Commit {
            xid: 9,
            commit_lsn: Lsn(0xAB),
            end_lsn: Lsn(0xAC),
            commit_time: Default::default(),
        });
        let plan = p.take();
        assert_eq!(sorted(&plan.keys), ["user:1"]);
        assert!(plan.publish[0].message.contains("\"lsn\":\"0/AB\""));
    }

    const PROFILES: &str = r#"
[[table]]
name = "users"
keys = ["user:{id}:avatar"]
refresh = [
    { key = "user:{id}:profile", columns = ["id", "name", "score", "active", "meta"], ttl_s = 300 },
    { key = "user:{id}:h", columns = ["name", "score"], format = "hash" },
]
"#;

    fn typed_users() -> Arc<Relation> {
        let col = |name: &str, type_oid: u32| RelationColumn {
            name: name.into(),
            is_key: name == "id",
            type_oid,
            type_modifier: -1,
        };
        Arc::new(Relation {
            oid: 21,
            schema: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: vec![
                col("id", 23),
                col("name", 25),
                col("score", 1700),
                col("active", 16),
                col("meta", 3802),
            ],
        })
    }

    fn json_of(plan: &Plan, key: &str) -> String {
        match &plan.refresh[key].value {
            RefreshValue::Json(s) => s.clone(),
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn refresh_renders_typed_json_and_a_hash() {
        let mut p = planner(PROFILES);
        let r = typed_users();
        p.change(&change(
            &r,
            Op::Insert,
            None,
            Some(&[
                Some("1"),
                Some("Ann \"A\""),
                Some("1.50"),
                Some("t"),
                Some(r#"{"a":[1]}"#),
            ]),
        ));
        let plan = p.take();
        assert_eq!(
            json_of(&plan, "user:1:profile"),
            r#"{"_lsn":"0000000000000100.00000000","id":1,"name":"Ann \"A\"","score":1.50,"active":true,"meta":{"a":[1]}}"#
        );
        assert_eq!(plan.refresh["user:1:profile"].ttl_s, Some(300));
        assert_eq!(
            plan.refresh["user:1:h"].value,
            RefreshValue::Hash(vec![
                ("_lsn".into(), "0000000000000100.00000000".into()),
                ("name".into(), "Ann \"A\"".into()),
                ("score".into(), "1.50".into()),
            ])
        );
        assert_eq!(plan.refresh["user:1:h"].ttl_s, None);
        assert_eq!(
            sorted(&plan.keys),
            ["user:1:avatar"],
            "refreshed keys are not unlinked"
        );
        // NULL: JSON null, and no hash field.
        p.change(&change(
            &r,
            Op::Insert,
            None,
            Some(&[Some("2"), None, Some("NaN"), Some("f"), None]),
        ));
        let plan = p.take();
        assert_eq!(
            json_of(&plan, "user:2:profile"),
            r#"{"_lsn":"0000000000000100.00000001","id":2,"name":null,"score":"NaN","active":false,"meta":null}"#
        );
        assert_eq!(
            plan.refresh["user:2:h"].value,
            RefreshValue::Hash(vec![
                ("_lsn".into(), "0000000000000100.00000001".into()),
                ("score".into(), "NaN".into()),
            ])
        );
    }

    #[test]
    fn refresh_keeps_the_last_image_of_a_key_in_a_batch() {
        let mut p = planner(PROFILES);
        let r = typed_users();
        for name in ["a", "b"] {
            p.change(&change(
                &r,
                Op::Update,
                None,
                Some(&[Some("1"), Some(name), Some("1"), Some("t"), None]),
            ));
        }
        let plan = p.take();
        assert!(json_of(&plan, "user:1:profile").contains(r#""name":"b""#));
        assert_eq!(plan.refresh["user:1:profile"].version.seq, 1);
        assert_eq!(plan.refresh.len(), 2);
    }

    #[test]
    fn refresh_delete_unlinks_and_a_later_unlink_wins() {
        let mut p = planner(PROFILES);
        let r = typed_users();
        let row = [Some("1"), Some("a"), Some("1"), Some("t"), None];
        p.change(&change(&r, Op::Insert, None, Some(&row)));
        p.change(&change(
            &r,
            Op::Delete,
            Some(&[Some("1"), Some("?"), Some("?"), Some("?"), Some("?")]),
            None,
        ));
        let plan = p.take();
        assert!(
            plan.refresh.is_empty(),
            "the delete came later: {:?}",
            plan.refresh
        );
        assert_eq!(
            sorted(&plan.keys),
            ["user:1:avatar", "user:1:h", "user:1:profile"]
        );
        // Delete, then insert again: the key is unlinked first and set after.
        p.change(&change(
            &r,
            Op::Delete,
            Some(&[Some("1"), Some("?"), Some("?"), Some("?"), Some("?")]),
            None,
        ));
        p.change(&change(&r, Op::Insert, None, Some(&row)));
        let plan = p.take();
        assert!(plan.keys.contains("user:1:profile"));
        assert!(plan.refresh.contains_key("user:1:profile"));
        assert!(p.take_fallbacks().is_empty());
    }

    #[test]
    fn refresh_of_a_moved_row_unlinks_the_old_key() {
        let mut p = planner(PROFILES);
        let r = typed_users();
        p.change(&change(
            &r,
            Op::Update,
            Some(&[Some("1"), Some("?"), Some("?"), Some("?"), Some("?")]),
            Some(&[Some("2"), Some("a"), Some("1"), Some("t"), None]),
        ));
        let plan = p.take();
        assert_eq!(
            sorted(&plan.keys),
            [
                "user:1:avatar",
                "user:1:h",
                "user:1:profile",
                "user:2:avatar"
            ]
        );
        let mut refreshed: Vec<&String> = plan.refresh.keys().collect();
        refreshed.sort();
        assert_eq!(refreshed, ["user:2:h", "user:2:profile"]);
    }

    #[test]
    fn refresh_with_an_unknown_or_oversized_value_unlinks_its_key() {
        let mut p = planner(PROFILES);
        let r = typed_users();
        // Unchanged TOAST in `name`, no old row: unknown.
        p.change(&change(
            &r,
            Op::Update,
            None,
            Some(&[Some("1"), Some("?"), Some("1"), Some("t"), None]),
        ));
        let plan = p.take();
        assert!(plan.refresh.is_empty(), "{:?}", plan.refresh);
        assert_eq!(
            sorted(&plan.keys),
            ["user:1:avatar", "user:1:h", "user:1:profile"]
        );
        assert!(plan.patterns.is_empty(), "no truncate fired");
        let f = p.take_fallbacks();
        assert_eq!(
            f,
            [Fallback {
                table: "public.users".into(),
                reason: FallbackReason::RefreshUnknownValue,
                column: Some("name".into()),
                count: 2
            }]
        );
        assert!(f[0].reason.is_refresh());
        assert_eq!(p.stats().tables["public.users"].refresh_fallbacks, 2);

        let m = Mappings::parse("m.toml", PROFILES).unwrap();
        let mut p = Planner::new(
            Arc::new(m),
            PlannerContext {
                max_refresh_bytes: 60,
                ..Default::default()
            },
        );
        p.begin(1, Lsn(1));
        let long = "x".repeat(61);
        p.change(&change(
            &r,
            Op::Insert,
            None,
            Some(&[Some("1"), Some(&long), Some("1"), Some("t"), None]),
        ));
        let plan = p.take();
        assert!(plan.refresh.is_empty());
        assert!(plan.keys.contains("user:1:profile") && plan.keys.contains("user:1:h"));
        assert_eq!(
            p.take_fallbacks()[0].reason,
            FallbackReason::RefreshTooLarge
        );
    }

    #[test]
    fn refresh_is_dropped_by_a_later_truncate_or_tombstone() {
        let src = format!("{PROFILES}\n[[table]]\nname = \"audit\"\nkeys = [\"user:{{user_id}}:profile\"]\nmode = \"tombstone\"\n");
        let mut p = planner(&src);
        let r = typed_users();
        let audit = rel(30, "audit", &["user_id"], b'f', &[]);
        let row = [Some("1"), Some("a"), Some("1"), Some("t"), None];
        p.change(&change(&r, Op::Insert, None, Some(&row)));
        p.change(&change(&r, Op::Truncate, None, None));
        let plan = p.take();
        assert!(plan.refresh.is_empty(), "{:?}", plan.refresh);
        assert!(plan.patterns.contains("user:*:profile"));
        // A tombstone of a later transaction wins; one of the same transaction
        // at the same LSN leaves the sink to order them (the value is set last).
        p.change(&change(&r, Op::Insert, None, Some(&row)));
        p.commit();
        p.begin(2, Lsn(0x200));
        p.change(&change(&audit, Op::Insert, None, Some(&[Some("1")])));
        let plan = p.take();
        assert!(!plan.refresh.contains_key("user:1:profile"));
        assert_eq!(plan.tombstones["user:1:profile"], Lsn(0x200));
        assert!(plan.refresh.contains_key("user:1:h"));
    }

    #[test]
    fn merge_drops_refreshes_the_later_plan_unlinks() {
        let mut p = planner(PROFILES);
        let r = typed_users();
        p.change(&change(
            &r,
            Op::Insert,
            None,
            Some(&[Some("1"), Some("a"), Some("1"), Some("t"), None]),
        ));
        let mut first = p.take();
        p.change(&change(
            &r,
            Op::Delete,
            Some(&[Some("1"), Some("?"), Some("?"), Some("?"), Some("?")]),
            None,
        ));
        first.merge(p.take());
        assert!(first.refresh.is_empty());
        assert_eq!(first.ops(), 3);
    }
}
