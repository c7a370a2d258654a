//! The label sets of labelled families (`{table, op}`, `{kind}`, ...) and
//! the per-table counter cache that finds a family's counter without
//! allocating.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;

use super::lock;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct TableOpLabels {
    pub(super) table: String,
    pub(super) op: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct TableReasonLabels {
    pub(super) table: String,
    pub(super) reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct KindLabels {
    pub(super) kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct SourceKindLabels {
    pub(super) source: &'static str,
    pub(super) kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ReasonLabels {
    pub(super) reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct OutcomeLabels {
    pub(super) outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct TargetLabels {
    pub(super) target: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct ReplicaLabels {
    pub(super) replica: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(super) struct RoleLabels {
    pub(super) role: &'static str,
}

/// Per-table counter handles, looked up by `&str` without allocating.
pub(super) struct TableCounters<K> {
    pub(super) by_table: Mutex<HashMap<String, Vec<(K, Counter)>>>,
}

impl<K: Copy + Eq> TableCounters<K> {
    pub(super) fn new() -> Self {
        TableCounters {
            by_table: Mutex::new(HashMap::new()),
        }
    }

    /// The cached counter of `(table, key)`, created by `make` on first use.
    pub(super) fn get(&self, table: &str, key: K, make: impl FnOnce() -> Counter) -> Counter {
        let mut map = lock(&self.by_table);
        if let Some(list) = map.get_mut(table) {
            if let Some((_, c)) = list.iter().find(|(k, _)| *k == key) {
                return c.clone();
            }
            let c = make();
            list.push((key, c.clone()));
            return c;
        }
        let c = make();
        map.insert(table.to_owned(), vec![(key, c.clone())]);
        c
    }
}
