//! Hostile input, in `cargo test` time: proptest versions of the fuzz targets
//! (`fuzz/fuzz_targets/record.rs`, `mappings.rs`). No record line and no
//! mapping file makes the reader, the parser or the planner panic.

use std::collections::BTreeMap;
use std::sync::Arc;

use cache_invalidator::map::Mappings;
use cache_invalidator::plan::PlannerContext;
use cache_invalidator::replay::{
    parse_line, RecordedChange, RecordedOp, RecordedTxn, RecordedValue, Replayer, TxnPlan,
};
use cache_invalidator::Lsn;
use proptest::prelude::*;

fn example_mappings() -> Arc<Mappings> {
    static M: std::sync::OnceLock<Arc<Mappings>> = std::sync::OnceLock::new();
    Arc::clone(M.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
        Arc::new(Mappings::load(&dir).expect("example mappings"))
    }))
}

/// A record line built from fragments that look like the format.
fn record_like() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        Just("null".to_string()),
        "[0-9]{1,25}".prop_map(|s| s),
        "\"[a-z0-9*?\\[\\]{}:\\\\é ]{0,40}\"".prop_map(|s| s),
        Just("true".to_string()),
        Just("{}".to_string()),
    ];
    let row = prop::collection::vec(
        (
            prop_oneof![
                Just("id"),
                Just("team_id"),
                Just("user_id"),
                Just("author_id"),
                Just("x")
            ],
            value,
        ),
        0..4,
    )
    .prop_map(|kv| {
        let inner: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", inner.join(","))
    });
    let table = prop_oneof![
        Just("users"),
        Just("public.posts"),
        Just("team_members"),
        Just("a.b.c"),
        Just(""),
        Just("\"x\""),
    ];
    let op = prop_oneof![
        Just("insert"),
        Just("update"),
        Just("delete"),
        Just("truncate"),
        Just("message"),
        Just("bogus"),
    ];
    let change = (
        table,
        op,
        prop::option::of(row.clone()),
        prop::option::of(row),
    )
        .prop_map(|(t, op, old, new)| {
            let mut s = format!("{{\"table\":\"{t}\",\"op\":\"{op}\"");
            if let Some(o) = old {
                s.push_str(&format!(",\"old\":{o}"));
            }
            if let Some(n) = new {
                s.push_str(&format!(",\"new\":{n}"));
            }
            s.push_str(",\"prefix\":\"cache-invalidator\",\"content\":\"flush:all\"}");
            s
        });
    (
        any::<u32>(),
        "[0-9A-F]{1,9}/[0-9A-F]{1,9}|zz|",
        prop::collection::vec(change, 0..5),
    )
        .prop_map(|(xid, lsn, changes)| {
            format!(
                "{{\"xid\":{xid},\"lsn\":\"{lsn}\",\"changes\":[{}]}}",
                changes.join(",")
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn record_lines_never_panic(line in prop_oneof![record_like(), ".{0,200}"]) {
        match parse_line(&line) {
            Err(e) => prop_assert!(!e.is_empty()),
            Ok(txn) => {
                let mut r = Replayer::new(example_mappings(), PlannerContext::default());
                let plan = r.transaction(&txn);
                let _ = serde_json::to_string(&TxnPlan::from_plan(txn.xid, txn.lsn, plan)).unwrap();
            }
        }
    }

    #[test]
    fn mapping_files_never_panic(
        templates in prop::collection::vec("[a-z:{}*?\\[\\]\\\\_é]{0,24}", 1..4),
        field in prop_oneof![Just("keys"), Just("tags"), Just("versions"), Just("patterns"), Just("channels"), Just("kyes")],
        noise in ".{0,40}",
        value in "[a-z0-9*?\\[\\]{}\\\\]{0,30}",
    ) {
        let list: Vec<String> = templates.iter().map(|t| format!("{t:?}")).collect();
        let text = format!("[[table]]\nname = \"users\"\n{field} = [{}]\n# {noise}\n", list.join(", "));
        for source in [text.as_str(), noise.as_str()] {
            let m = match Mappings::parse("p.toml", source) {
                Err(e) => { prop_assert!(!e.to_string().is_empty()); continue; }
                Ok(m) => Arc::new(m),
            };
            let mut changes = Vec::new();
            for rule in m.rules() {
                let row: BTreeMap<String, RecordedValue> = rule
                    .columns
                    .iter()
                    .map(|c| (c.clone(), RecordedValue(Some(value.clone()))))
                    .collect();
                changes.push(RecordedChange {
                    op: RecordedOp::Update,
                    table: Some(rule.table.to_string()),
                    old: Some(row.clone()),
                    new: Some(row),
                    prefix: None,
                    content: None,
                    types: None,
                });
            }
            let txn = RecordedTxn { xid: 1, lsn: Lsn(1), commit_time: None, changes };
            let mut r = Replayer::new(Arc::clone(&m), PlannerContext::default());
            let _ = r.transaction(&txn);
        }
    }
}
