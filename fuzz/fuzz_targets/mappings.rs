//! Fuzz target: no mapping file makes `Mappings::parse` panic, and every rule
//! that parses renders a change without panicking.
//!
//! `cargo +nightly fuzz run mappings fuzz/corpus/mappings` (from the
//! repository root). The input is a mapping file; when it parses, each rule's
//! table gets an update whose old and new rows set every placeholder column
//! (values with braces, globs and non-ASCII), so templates are rendered too.
#![no_main]

use std::collections::BTreeMap;
use std::sync::Arc;

use cache_invalidator::map::Mappings;
use cache_invalidator::plan::PlannerContext;
use cache_invalidator::replay::{
    RecordedChange, RecordedOp, RecordedTxn, RecordedValue, Replayer, TxnPlan,
};
use cache_invalidator::Lsn;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let m = match Mappings::parse("fuzz.toml", text) {
        Err(e) => {
            let _ = e.to_string();
            return;
        }
        Ok(m) => Arc::new(m),
    };
    let mut changes = Vec::new();
    for rule in m.rules() {
        let row = |v: &str| -> BTreeMap<String, RecordedValue> {
            rule.columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.clone(), RecordedValue(Some(format!("{v}{i}*?[]{{}}é")))))
                .collect()
        };
        changes.push(RecordedChange {
            op: RecordedOp::Update,
            table: Some(rule.table.to_string()),
            old: Some(row("old")),
            new: Some(row("new")),
            prefix: None,
            content: None,
        });
        changes.push(RecordedChange {
            op: RecordedOp::Truncate,
            table: Some(rule.table.to_string()),
            old: None,
            new: None,
            prefix: None,
            content: None,
        });
    }
    let txn = RecordedTxn {
        xid: 1,
        lsn: Lsn(0x100),
        commit_time: None,
        changes,
    };
    let mut r = Replayer::new(Arc::clone(&m), PlannerContext::default());
    let plan = r.transaction(&txn);
    let _ = serde_json::to_string(&TxnPlan::from_plan(txn.xid, txn.lsn, plan));
});
