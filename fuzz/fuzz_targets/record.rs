//! Fuzz target: no line of a record file makes `replay::parse_line` or the
//! planner panic.
//!
//! `cargo +nightly fuzz run record fuzz/corpus/record` (from the repository
//! root). A line that parses is planned against the example mappings, so
//! hostile values (huge, odd bytes, glob characters) reach template rendering.
#![no_main]

use std::sync::{Arc, OnceLock};

use cache_invalidator::map::Mappings;
use cache_invalidator::plan::PlannerContext;
use cache_invalidator::replay::{parse_line, Replayer, TxnPlan};
use libfuzzer_sys::fuzz_target;

const MAPPINGS: [(&str, &str); 4] = [
    ("blog.toml", include_str!("../../mappings/blog.toml")),
    ("chat.toml", include_str!("../../mappings/chat.toml")),
    ("teams.toml", include_str!("../../mappings/teams.toml")),
    ("users.toml", include_str!("../../mappings/users.toml")),
];

fn mappings() -> Arc<Mappings> {
    static M: OnceLock<Arc<Mappings>> = OnceLock::new();
    Arc::clone(M.get_or_init(|| {
        let sources = MAPPINGS.iter().map(|(f, t)| (std::path::Path::new(f), *t));
        Arc::new(Mappings::from_sources(sources).expect("the example mappings are valid"))
    }))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_line(text) {
        Err(e) => assert!(!e.is_empty()),
        Ok(txn) => {
            let mut r = Replayer::new(mappings(), PlannerContext::default());
            let plan = r.transaction(&txn);
            let _ = serde_json::to_string(&TxnPlan::from_plan(txn.xid, txn.lsn, plan));
        }
    }
});
