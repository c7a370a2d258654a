//! The replica-identity rule: a rule that needs old values the table's
//! replica identity does not carry is refused by `check` and `run`.
//!
//! PostgreSQL sends an UPDATE's old row only under REPLICA IDENTITY FULL (or
//! when identity columns changed) and a DELETE's old row with only the
//! identity columns. A placeholder column outside the identity, on a rule that
//! fires on update or delete and does not list it in `assume_unchanged`, would
//! silently miss the old key: that is an error, with the three fixes.

use std::fmt;

use crate::decode::Relation;

use super::{Location, Mappings, Rule, TableName};

/// What a table's replica identity carries in old rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// REPLICA IDENTITY FULL: every column.
    Full,
    /// DEFAULT (primary key) or USING INDEX: these columns. Empty for NOTHING
    /// or a DEFAULT without primary key.
    Columns(Vec<String>),
}

impl ReplicaIdentity {
    /// From a Relation message: `f` is FULL, otherwise the columns flagged as key.
    pub fn of_relation(rel: &Relation) -> ReplicaIdentity {
        if rel.replica_identity == b'f' {
            ReplicaIdentity::Full
        } else {
            ReplicaIdentity::Columns(
                rel.columns
                    .iter()
                    .filter(|c| c.is_key)
                    .map(|c| c.name.clone())
                    .collect(),
            )
        }
    }

    /// Whether an old row carries `column`.
    pub fn carries(&self, column: &str) -> bool {
        match self {
            ReplicaIdentity::Full => true,
            ReplicaIdentity::Columns(c) => c.iter().any(|c| c == column),
        }
    }
}

/// A rule refused by the replica-identity rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityError {
    /// The table.
    pub table: TableName,
    /// Where the rule is written.
    pub location: Location,
    /// Placeholder columns whose old values the identity does not carry.
    pub columns: Vec<String>,
    /// The identity columns (empty for NOTHING), `None` for FULL (never an error).
    pub identity: Vec<String>,
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cols = self.columns.join(", ");
        let identity = if self.identity.is_empty() {
            "no columns (REPLICA IDENTITY NOTHING, or DEFAULT without a primary key)".to_owned()
        } else {
            format!("only ({})", self.identity.join(", "))
        };
        write!(
            f,
            "{loc}: table {t}: the rule renders old values of column(s) {cols} on update/delete, \
             but the table's replica identity carries {identity}, so old keys would be missed. \
             Fix one of: (1) run `cache-invalidator setup --replica-identity-full` \
             (or `ALTER TABLE {tq} REPLICA IDENTITY USING INDEX <a unique index covering {cols}>;`); \
             (2) add {cols} to `assume_unchanged` if the values never change; \
             (3) narrow `on` to [\"insert\"] so the rule needs no old values",
            loc = self.location,
            tq = self.table.quoted(),
            t = self.table,
        )
    }
}

impl std::error::Error for IdentityError {}

/// Placeholder columns of `rule` whose old values `identity` does not carry
/// (empty when the rule is fine).
pub fn missing_old_columns(rule: &Rule, identity: &ReplicaIdentity) -> Vec<String> {
    if !rule.needs_old_values() {
        return Vec::new();
    }
    let used = rule.invalidation_columns();
    rule.columns
        .iter()
        .zip(used)
        .filter(|(c, used)| {
            *used && !identity.carries(c) && !rule.assume_unchanged.iter().any(|a| a == *c)
        })
        .map(|(c, _)| c.clone())
        .collect()
}

/// Checks one rule against its table's identity.
pub fn check_rule(rule: &Rule, identity: &ReplicaIdentity) -> Option<IdentityError> {
    let columns = missing_old_columns(rule, identity);
    if columns.is_empty() {
        return None;
    }
    Some(IdentityError {
        table: rule.table.clone(),
        location: rule.location.clone(),
        columns,
        identity: match identity {
            ReplicaIdentity::Full => Vec::new(),
            ReplicaIdentity::Columns(c) => c.clone(),
        },
    })
}

/// Checks every rule of `table` against its identity: one error per refused rule.
pub fn check_table(
    mappings: &Mappings,
    table: &TableName,
    identity: &ReplicaIdentity,
) -> Vec<IdentityError> {
    mappings
        .rules_for(table)
        .filter_map(|r| check_rule(r, identity))
        .collect()
}

/// Checks the rules of a relation as a Relation message describes it (for `run`).
pub fn check_relation(mappings: &Mappings, rel: &Relation) -> Vec<IdentityError> {
    let table = TableName {
        schema: rel.schema.clone(),
        name: rel.name.clone(),
    };
    check_table(mappings, &table, &ReplicaIdentity::of_relation(rel))
}
