//! Fuzz target: no message content makes the declared-invalidation parser
//! (`plan::declared`) or the planner panic.
//!
//! `cargo +nightly fuzz run declared fuzz/corpus/declared` (from the
//! repository root). Every input is fed to the planner as a transactional
//! message under the `cache-invalidator` prefix, so a parsed payload reaches
//! planning (prefixes, default messages) and a malformed one the full flush.
#![no_main]

use std::sync::{Arc, OnceLock};

use cache_invalidator::map::Mappings;
use cache_invalidator::plan::declared::{parse_invalidate, to_content, INVALIDATE_PREFIX};
use cache_invalidator::plan::planner::MESSAGE_PREFIX;
use cache_invalidator::plan::{Planner, PlannerContext};
use cache_invalidator::Lsn;
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
    // The parser alone: whatever parses serializes back to the same declaration.
    if let Some(rest) = data.strip_prefix(INVALIDATE_PREFIX.as_bytes()) {
        if let Ok(d) = parse_invalidate(rest) {
            let again = to_content(&d);
            let back = parse_invalidate(&again.as_bytes()[INVALIDATE_PREFIX.len()..]);
            assert_eq!(back.as_ref(), Ok(&d));
        }
    }
    // Through the planner, with and without our prefix.
    let mut p = Planner::new(mappings(), PlannerContext::default());
    p.begin(1, Lsn(16));
    p.message(MESSAGE_PREFIX, data, Lsn(8));
    let mut prefixed = INVALIDATE_PREFIX.as_bytes().to_vec();
    prefixed.extend_from_slice(b"v1:");
    prefixed.extend_from_slice(data);
    p.message(MESSAGE_PREFIX, &prefixed, Lsn(12));
    p.commit();
    let _ = p.take();
    let _ = p.take_malformed();
});
