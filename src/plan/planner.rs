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
//!
//! Layout: this file holds the [`Planner`], its state and the per-event entry
//! points; `render` resolves rules against a relation and renders templates,
//! `apply` runs one change through one rule, `messages` handles messages under
//! our prefix, flushes and published messages, `report` the counters and
//! fallbacks it reports besides the plan.

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

mod apply;
mod messages;
mod render;
mod report;

use render::resolve_rule;
pub use report::{
    DeclaredCounters, Fallback, FallbackReason, Malformed, PlannerStats, TableCounters,
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
        if let Some(mapped) = &st.mapped {
            if change.op == Op::Truncate {
                self.fire_truncate(mapped);
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
                            self.fire_truncate(mapped);
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
}

fn push_all<T: PartialEq>(out: &mut Vec<T>, items: impl Iterator<Item = T>) {
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
}

fn insert_all(set: &mut crate::plan::KeySet, items: &[String]) {
    for i in items {
        set.insert(i);
    }
}

#[cfg(test)]
mod tests;
