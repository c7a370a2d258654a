//! Fuzz target: no payload makes `parse` or `RelationCache::decode` panic.
//!
//! `cargo +nightly fuzz run pgoutput` (from the repository root). The cache is
//! primed with the Relation messages of the captured fixtures, so inputs that
//! name their OIDs (16391, 16398, 16405, 16412) reach the row-building code.
#![no_main]

use std::sync::OnceLock;

use cache_invalidator::decode::relations::RelationCache;
use cache_invalidator::Lsn;
use libfuzzer_sys::fuzz_target;

const FIXTURES: [&str; 3] = [
    include_str!("../../tests/fixtures/pgoutput/insert_types.hex"),
    include_str!("../../tests/fixtures/pgoutput/truncate.hex"),
    include_str!("../../tests/fixtures/pgoutput/messages.hex"),
];

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

fn primed() -> RelationCache {
    static PRIMED: OnceLock<RelationCache> = OnceLock::new();
    PRIMED
        .get_or_init(|| {
            let mut cache = RelationCache::new();
            let mut out = Vec::new();
            for line in FIXTURES.iter().flat_map(|f| f.lines()) {
                if let Some((_, hex)) = line.split_once(' ').filter(|_| !line.starts_with('#')) {
                    let p = unhex(hex);
                    if matches!(p.first(), Some(b'R' | b'B')) {
                        let _ = cache.decode_payload(&p, Lsn(0), &mut out);
                    }
                }
            }
            cache
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let mut cache = primed();
    let mut out = Vec::new();
    if let Err(e) = cache.decode_payload(data, Lsn(0x16B_3748), &mut out) {
        assert!(out.is_empty());
        let _ = e.to_string();
    }
});
