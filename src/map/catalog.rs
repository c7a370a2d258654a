//! Checks of the mappings against a snapshot of the PostgreSQL catalog and the
//! publication. Pure: `check` fills a [`CatalogSnapshot`] with SQL and calls
//! [`check_catalog`]; tests build snapshots by hand.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::identity::{self, ReplicaIdentity};
use super::{Mappings, Rule, TableName};
use crate::diag::suggest;

/// A column as `pg_attribute` describes it (dropped columns excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    /// Column name.
    pub name: String,
    /// `attgenerated`: whether (and how) the column is generated.
    pub generated: Generated,
}

/// `pg_attribute.attgenerated`. pgoutput never sends a generated column
/// before PostgreSQL 18; 18 sends a stored one when the publication says
/// `publish_generated_columns = stored` (or names it in a column list), and
/// never a virtual one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Generated {
    /// `''`: an ordinary column.
    #[default]
    No,
    /// `'s'`: `GENERATED ALWAYS AS (...) STORED`.
    Stored,
    /// `'v'`: `GENERATED ALWAYS AS (...) VIRTUAL` (PostgreSQL 18's default).
    Virtual,
}

impl Generated {
    /// From `attgenerated::text`.
    pub fn from_attgenerated(code: &str) -> Generated {
        match code {
            "s" => Generated::Stored,
            "v" => Generated::Virtual,
            _ => Generated::No,
        }
    }
}

/// A table as the catalog describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// `pg_class.oid`.
    pub oid: u32,
    /// `relkind`: `r` ordinary, `p` partitioned, `v` view, `m` materialized view, `f` foreign, ...
    pub relkind: char,
    /// `relpersistence`: `p` permanent, `u` unlogged, `t` temporary.
    pub persistence: char,
    /// Columns in order.
    pub columns: Vec<ColumnInfo>,
    /// What its replica identity carries in old rows.
    pub replica_identity: ReplicaIdentity,
    /// `schema.table` of the parent when the table is a partition.
    pub partition_of: Option<TableName>,
}

/// How the publication publishes one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishedTable {
    /// The row filter (`WHERE ...`), if any.
    pub row_filter: Option<String>,
    /// The column list, if any (`None`: every column).
    pub column_list: Option<Vec<String>>,
}

/// The publication named in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationInfo {
    /// The publication's OID: a new one means it was dropped and recreated.
    pub oid: u32,
    /// `puballtables`.
    pub all_tables: bool,
    /// `pubinsert`.
    pub insert: bool,
    /// `pubupdate`.
    pub update: bool,
    /// `pubdelete`.
    pub delete: bool,
    /// `pubtruncate`.
    pub truncate: bool,
    /// `pubviaroot`.
    pub via_partition_root: bool,
    /// `pubgencols = 's'` (`publish_generated_columns = stored`, PostgreSQL
    /// 18+; always false before).
    pub publish_generated_stored: bool,
    /// Tables in the publication (`pg_publication_tables`, by `schema.table`).
    pub tables: BTreeMap<TableName, PublishedTable>,
}

/// Everything the catalog checks need, filled by SQL (or by hand in tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogSnapshot {
    /// `server_version_num`, e.g. 160002.
    pub server_version_num: u32,
    /// Every table a rule names that exists (others are reported unknown).
    pub tables: BTreeMap<TableName, TableInfo>,
    /// Other table names of the database, for "did you mean" on unknown tables.
    pub other_tables: Vec<TableName>,
    /// The publication, `None` when it does not exist yet (`setup` creates it).
    pub publication: Option<PublicationInfo>,
    /// `max_slot_wal_keep_size` in MB (`-1`: unlimited).
    pub max_slot_wal_keep_size_mb: Option<i64>,
    /// `synchronous_standby_names`.
    pub synchronous_standby_names: Option<String>,
}

/// How bad a finding is: errors and broken tables fail `check` (exit 2),
/// warnings don't.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Printed, exit 0.
    Warning,
    /// A mapped table the catalog no longer matches (dropped, or a column its
    /// rules read is gone): `check` fails, `run` starts and invalidates that
    /// table by its truncate invalidations on each of its changes (the
    /// fallback), every other table precisely.
    Broken,
    /// Refused, exit 2.
    Error,
}

/// One result of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// The whole message, located at the rule when there is one.
    pub message: String,
}

impl Finding {
    /// A refusal (`check` and `run` exit 2).
    pub fn error(message: String) -> Self {
        Finding {
            severity: Severity::Error,
            message,
        }
    }
    /// A table DDL broke (see [`Severity::Broken`]).
    pub fn broken(message: String) -> Self {
        Finding {
            severity: Severity::Broken,
            message,
        }
    }
    /// Printed, never fails.
    pub fn warning(message: String) -> Self {
        Finding {
            severity: Severity::Warning,
            message,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.severity {
            Severity::Error => write!(f, "error: {}", self.message),
            Severity::Warning => write!(f, "warning: {}", self.message),
            Severity::Broken => write!(
                f,
                "error: {} (`run` falls back to this table's truncate invalidations on each of its changes until the mapping or the table is fixed)",
                self.message
            ),
        }
    }
}

/// The columns a rule reads: placeholders, `columns`, `assume_unchanged`,
/// the columns of `refresh` values.
fn referenced_columns(rule: &Rule) -> Vec<&str> {
    let mut out: Vec<&str> = rule.columns.iter().map(String::as_str).collect();
    for c in rule
        .changed_columns
        .iter()
        .flatten()
        .chain(&rule.assume_unchanged)
        .chain(rule.refresh.iter().flat_map(|r| r.columns.iter().flatten()))
    {
        if !out.contains(&c.as_str()) {
            out.push(c);
        }
    }
    out
}

/// What [`broken_tables`] says of a mapped table that does not exist.
pub const TABLE_MISSING: &str = "the table does not exist";

/// Mapped tables the catalog no longer matches, with why: the table does not
/// exist ([`TABLE_MISSING`]), or a column one of its rules reads is gone.
/// `run` starts with these in fallback (their truncate invalidations on each
/// of their changes); [`check_catalog`] reports them as [`Severity::Broken`].
pub fn broken_tables(mappings: &Mappings, snap: &CatalogSnapshot) -> BTreeMap<TableName, String> {
    let mut out: BTreeMap<TableName, String> = BTreeMap::new();
    for rule in mappings.rules() {
        let t = &rule.table;
        let Some(info) = snap.tables.get(t) else {
            out.insert(t.clone(), TABLE_MISSING.into());
            continue;
        };
        let missing: Vec<&str> = referenced_columns(rule)
            .into_iter()
            .filter(|c| !info.columns.iter().any(|ci| ci.name == *c))
            .collect();
        if !missing.is_empty() {
            let why = format!("column(s) {} no longer exist", missing.join(", "));
            out.entry(t.clone())
                .and_modify(|w| {
                    if !w.contains(&why) {
                        w.push_str("; ");
                        w.push_str(&why);
                    }
                })
                .or_insert(why);
        }
    }
    out
}

/// What the publication hides from the mappings right now (drift): the
/// publication missing, publish actions a rule fires on, a mapped table not
/// in it, a row filter, a column list hiding a read column, a partitioned
/// table published without `publish_via_partition_root`. One line per
/// problem, each saying what to run; empty when nothing is hidden. The
/// worker re-reads the publication on every (re)connect and on a timer and
/// reports these on `/readyz`.
pub fn publication_drift(
    mappings: &Mappings,
    snap: &CatalogSnapshot,
    publication: &str,
) -> Vec<String> {
    let Some(p) = &snap.publication else {
        return vec![format!(
            "publication {publication:?} does not exist: no change is sent; run `cache-invalidator setup` (it recreates it, and the slot with a full flush when the slot cannot decode past the gap)"
        )];
    };
    let mut out: Vec<String> = Vec::new();
    for rule in mappings.rules() {
        let Some(info) = snap.tables.get(&rule.table) else {
            continue;
        };
        let mut found = Vec::new();
        check_publication(rule, info, p, &mut found);
        for f in found.into_iter().filter(|f| f.severity == Severity::Error) {
            // Without the rule's location: one line per problem and table.
            let text = f
                .message
                .split_once(": ")
                .filter(|(loc, _)| *loc == rule.location.to_string())
                .map(|(_, m)| m.to_string())
                .unwrap_or(f.message);
            if !out.contains(&text) {
                out.push(text);
            }
        }
    }
    out
}

/// The mapped tables whose changes the publication hides now (every one
/// when it does not exist): what [`publication_drift`] reports, by table.
pub fn hidden_tables(mappings: &Mappings, snap: &CatalogSnapshot) -> BTreeSet<TableName> {
    let rules = mappings.rules().iter();
    let Some(p) = &snap.publication else {
        return rules.map(|rule| rule.table.clone()).collect();
    };
    rules
        .filter(|rule| {
            snap.tables.get(&rule.table).is_some_and(|info| {
                let mut found = Vec::new();
                check_publication(rule, info, p, &mut found);
                found.iter().any(|f| f.severity == Severity::Error)
            })
        })
        .map(|rule| rule.table.clone())
        .collect()
}

/// Checks the mappings against the catalog and the publication, per the design:
/// unknown tables or columns, relkinds, unlogged tables, generated columns,
/// replica identity, publish actions, row filters, column lists, partitions.
/// `application_name` is matched against `synchronous_standby_names`.
pub fn check_catalog(
    mappings: &Mappings,
    snap: &CatalogSnapshot,
    application_name: &str,
) -> Vec<Finding> {
    let mut out = Vec::new();
    for rule in mappings.rules() {
        let loc = &rule.location;
        let t = &rule.table;
        let Some(info) = snap.tables.get(t) else {
            let names: Vec<String> = snap
                .tables
                .keys()
                .chain(&snap.other_tables)
                .map(|n| n.to_string())
                .collect();
            let hint = suggest(&t.to_string(), names.iter().map(String::as_str))
                .map(|s| format!(": did you mean {s}?"))
                .unwrap_or_default();
            out.push(Finding::broken(format!(
                "{loc}: table {t} does not exist{hint} (names are schema-qualified and case-sensitive, as in the catalog: `name = \"Sales.Orders\"` for a quoted identifier)"
            )));
            continue;
        };
        match info.relkind {
            'r' | 'p' => {}
            'm' => {
                // No row events: only its truncate invalidations ever fire,
                // on REFRESH (DDL event trigger) or by `flush`.
                out.push(Finding::warning(format!(
                    "{loc}: {t} is a materialized view: it has no row events; its truncate invalidations fire on REFRESH MATERIALIZED VIEW with `setup --ddl-trigger` installed, otherwise only by `cache-invalidator flush --table {t}`"
                )));
                continue;
            }
            k => {
                let what = match k {
                    'v' => "a view",
                    'm' => "a materialized view",
                    'f' => "a foreign table",
                    _ => "not a table",
                };
                out.push(Finding::error(format!(
                    "{loc}: {t} is {what} (relkind '{k}'): only ordinary and partitioned tables produce row changes in the WAL"
                )));
                continue;
            }
        }
        match info.persistence {
            'u' => out.push(Finding::error(format!(
                "{loc}: {t} is UNLOGGED: its changes are not in the WAL; `ALTER TABLE {} SET LOGGED;` or remove the rule", t.quoted()
            ))),
            't' => out.push(Finding::error(format!(
                "{loc}: {t} is a temporary table: its changes are not in the WAL"
            ))),
            _ => {}
        }
        let names: Vec<&str> = info.columns.iter().map(|c| c.name.as_str()).collect();
        for c in referenced_columns(rule) {
            match info.columns.iter().find(|ci| ci.name == c) {
                None => {
                    let hint = suggest(c, names.iter().copied())
                        .map(|s| format!(": did you mean `{s}`?"))
                        .unwrap_or_default();
                    out.push(Finding::broken(format!(
                        "{loc}: table {t} has no column `{c}`{hint}; its columns: {}",
                        names.join(", ")
                    )));
                }
                Some(ci)
                    if ci.generated != Generated::No
                        && (rule.columns.iter().any(|p| p == c)
                            || rule
                                .refresh
                                .iter()
                                .any(|r| r.columns.iter().flatten().any(|v| v == c))) =>
                {
                    if let Some(why) = unpublished_generated(snap, t, c, ci.generated) {
                        out.push(Finding::error(format!(
                            "{loc}: column `{c}` of {t} is generated: {why}"
                        )));
                    }
                }
                Some(_) => {}
            }
        }
        if rule.refresh.iter().any(|r| r.columns.is_none())
            && names.contains(&crate::map::REFRESH_LSN_FIELD)
        {
            out.push(Finding::error(format!(
                "{loc}: table {t} has a column `{}`, the field refreshed values reserve for their commit LSN: list the value's columns in `refresh.columns` without it",
                crate::map::REFRESH_LSN_FIELD
            )));
        }
        if let Some(e) = identity::check_rule(rule, &info.replica_identity) {
            out.push(Finding::error(e.to_string()));
        }
        if info.replica_identity == ReplicaIdentity::Columns(Vec::new()) {
            out.push(Finding::error(format!(
                "{loc}: {t} has no usable replica identity (no primary key, or REPLICA IDENTITY NOTHING): once published, PostgreSQL rejects every UPDATE and DELETE on it; \
                 add a primary key, `ALTER TABLE {} REPLICA IDENTITY USING INDEX <unique index>;`, or run `cache-invalidator setup --replica-identity-full`",
                t.quoted()
            )));
        }
        if let Some(parent) = &info.partition_of {
            // `setup` creates the publication with publish_via_partition_root.
            let via_root = snap
                .publication
                .as_ref()
                .map(|p| p.via_partition_root)
                .unwrap_or(true);
            if via_root || mappings.tables().contains(parent) {
                out.push(Finding::error(format!(
                    "{loc}: {t} is a partition of {parent}, and changes of partitions arrive as {parent} (publish_via_partition_root): map {parent} instead of its partition"
                )));
            }
        }
        if let Some(pub_) = &snap.publication {
            check_publication(rule, info, pub_, &mut out);
        }
    }
    if snap.publication.is_none() {
        out.push(Finding::warning(
            "the publication does not exist yet: `cache-invalidator setup` creates it".into(),
        ));
    }
    if snap.max_slot_wal_keep_size_mb == Some(-1) {
        out.push(Finding::warning(
            "max_slot_wal_keep_size = -1: a stopped worker's slot retains WAL without bound; set a limit and monitor `status`".into(),
        ));
    }
    if let Some(names) = &snap.synchronous_standby_names {
        if sync_names_match(names, application_name) {
            out.push(Finding::warning(format!(
                "synchronous_standby_names = '{names}' matches `{application_name}`: the worker would become a synchronous standby and application commits would wait on Redis"
            )));
        }
    }
    out
}

fn check_publication(rule: &Rule, info: &TableInfo, p: &PublicationInfo, out: &mut Vec<Finding>) {
    let loc = &rule.location;
    let t = &rule.table;
    for (needed, published, op) in [
        (rule.on.insert, p.insert, "insert"),
        (rule.on.update, p.update, "update"),
        (rule.on.delete, p.delete, "delete"),
    ] {
        if needed && !published {
            out.push(Finding::error(format!(
                "{loc}: the publication does not publish {op}s, which the rule for {t} fires on: `cache-invalidator setup` repairs it (and flushes the tables whose changes were hidden)"
            )));
        }
    }
    if !p.truncate {
        out.push(Finding::warning(format!(
            "{loc}: the publication does not publish truncates: a TRUNCATE of {t} will not be seen"
        )));
    }
    if info.relkind == 'p' && !p.via_partition_root {
        out.push(Finding::error(format!(
            "{loc}: {t} is partitioned but the publication is not `publish_via_partition_root = true`: changes would arrive under the partitions' names; `cache-invalidator setup` repairs it (and flushes the table)"
        )));
    }
    match p.tables.get(t) {
        None if !p.all_tables && info.partition_of.is_none() => out.push(Finding::error(
            format!("{loc}: {t} is not in the publication, so its changes are never sent: `cache-invalidator setup` adds it (and flushes it)"),
        )),
        None => {}
        Some(pt) => {
            if let Some(filter) = &pt.row_filter {
                out.push(Finding::error(format!(
                    "{loc}: the publication has a row filter on {t} (WHERE {filter}): changes of rows outside it would never be invalidated; remove the filter"
                )));
            }
            if let Some(list) = &pt.column_list {
                let hidden: Vec<&str> = referenced_columns(rule)
                    .into_iter()
                    .filter(|c| !list.iter().any(|l| l == c))
                    .collect();
                if !hidden.is_empty() {
                    out.push(Finding::error(format!(
                        "{loc}: the publication's column list on {t} hides column(s) {} that the rule reads; add them to the list or drop the list",
                        hidden.join(", ")
                    )));
                }
            }
        }
    }
}

/// Why pgoutput would not send generated column `column` of `table`, or
/// `None` when it does (PostgreSQL 18, stored, published).
fn unpublished_generated(
    snap: &CatalogSnapshot,
    table: &TableName,
    column: &str,
    kind: Generated,
) -> Option<&'static str> {
    if snap.server_version_num < 180000 {
        return Some(
            "generated columns are not published before PostgreSQL 18; use the columns it is computed from",
        );
    }
    if kind == Generated::Virtual {
        return Some(
            "virtual generated columns are never published; use the columns it is computed from (or make it STORED and publish it)",
        );
    }
    let Some(p) = &snap.publication else {
        // No publication yet: `setup` creates it without generated columns.
        return Some(
            "PostgreSQL 18 publishes a stored generated column only with `publish_generated_columns = stored`; use the columns it is computed from, or `ALTER PUBLICATION ... SET (publish_generated_columns = stored)` once it exists",
        );
    };
    let listed = p
        .tables
        .get(table)
        .and_then(|t| t.column_list.as_ref())
        .is_some_and(|list| list.iter().any(|l| l == column));
    if p.publish_generated_stored || listed {
        None
    } else {
        Some(
            "PostgreSQL 18 publishes a stored generated column only with `ALTER PUBLICATION ... SET (publish_generated_columns = stored)`; set it, or use the columns it is computed from",
        )
    }
}

/// Whether `synchronous_standby_names` names `application_name` (or `*`).
fn sync_names_match(setting: &str, application_name: &str) -> bool {
    let s = setting.trim();
    if s.is_empty() {
        return false;
    }
    // Strip `FIRST n (...)` / `ANY n (...)` / `n (...)`.
    let list = match (s.find('('), s.rfind(')')) {
        (Some(a), Some(b)) if a < b => &s[a + 1..b],
        _ => s,
    };
    list.split(',')
        .map(|n| n.trim().trim_matches('"'))
        .any(|n| n == "*" || n.eq_ignore_ascii_case(application_name))
}

#[cfg(test)]
mod tests;
