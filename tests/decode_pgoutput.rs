//! pgoutput decoding on bytes captured from a real PostgreSQL 15
//! (`tests/fixtures/pgoutput/`, recaptured by its `capture.sh`), and
//! property tests: no input, arbitrary or mutated, makes the decoder panic.

use cache_invalidator::decode::pgoutput::{self, Message};
use cache_invalidator::decode::relations::RelationCache;
use std::sync::Arc;

use cache_invalidator::decode::{Change, Event, Op, Relation, RelationColumn, Timestamp, Value};
use cache_invalidator::Lsn;

/// The messages of one fixture file: (WAL position, payload).
fn fixture(name: &str) -> Vec<(Lsn, Vec<u8>)> {
    let path = format!(
        "{}/tests/fixtures/pgoutput/{name}.hex",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (lsn, hex) = l.split_once(' ').expect("<lsn> <hex>");
            (lsn.parse().expect("lsn"), unhex(hex))
        })
        .collect()
}

fn unhex(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "odd hex length");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn decode(name: &str) -> Vec<Event> {
    let mut cache = RelationCache::new();
    let mut out = Vec::new();
    for (lsn, payload) in fixture(name) {
        cache
            .decode_payload(&payload, lsn, &mut out)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    out
}

fn t(s: &str) -> Value {
    Value::Text(s.into())
}

fn change(event: &Event) -> &Change {
    match event {
        Event::Change(c) => c,
        other => panic!("not a change: {other:?}"),
    }
}

fn old(event: &Event) -> &[Value] {
    &change(event).old.as_ref().expect("old row").values
}

fn new(event: &Event) -> &[Value] {
    &change(event).new.as_ref().expect("new row").values
}

fn col(name: &str, is_key: bool, type_oid: u32, type_modifier: i32) -> RelationColumn {
    RelationColumn {
        name: name.to_owned(),
        is_key,
        type_oid,
        type_modifier,
    }
}

/// The 300 md5s `capture.sh` stores in the TOASTed column.
fn big_value(events: &[Event]) -> String {
    let v = new(&events[2])[2].as_text().expect("big text").to_owned();
    assert_eq!(v.len(), 9600);
    assert!(
        v.starts_with("c4ca4238a0b923820dcc509a6f75849b"),
        "md5('1') first"
    );
    v
}

#[test]
fn insert_of_every_type_renders_as_postgres_prints_it() {
    let events = decode("insert_types");
    assert_eq!(
        events.len(),
        6,
        "Begin, Relation, 3 inserts, Commit (the Type message gives none)"
    );
    assert_eq!(
        events[0],
        Event::Begin {
            xid: 731,
            final_lsn: "0/1553310".parse().unwrap(),
            commit_time: Timestamp(848_959_356_577_496)
        }
    );
    let Event::Relation(rel) = &events[1] else {
        panic!("{:?}", events[1])
    };
    assert_eq!(
        **rel,
        Relation {
            oid: 16391,
            schema: "public".into(),
            name: "t_types".into(),
            replica_identity: b'd',
            columns: vec![
                col("id", true, 20, -1),
                col("u", false, 2950, -1),
                col("txt", false, 25, -1),
                col("n", false, 1700, (12 << 16 | 4) + 4),
                col("b", false, 16, -1),
                col("ts", false, 1184, -1),
                col("j", false, 3802, -1),
                col("arr", false, 1007, -1),
                col("tarr", false, 1009, -1),
                col("by", false, 17, -1),
                col("m", false, 16385, -1),
                col("nul", false, 25, -1),
            ],
        }
    );
    let c = change(&events[2]);
    assert_eq!(c.op, Op::Insert);
    assert!(
        Arc::ptr_eq(&c.relation, rel),
        "changes share the cached relation"
    );
    assert_eq!(c.old, None);
    assert_eq!(
        new(&events[2]),
        [
            t("1"),
            t("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            t("it's \"quoted\"\nline 2\ttab, ünïcødé ✓ 🐘"),
            t("12345678.5000"),
            t("t"),
            t("2026-11-25 20:00:00.123456+00"),
            t(r#"{"a": "x", "b": [1, 2.50, null]}"#),
            t("{1,2,NULL}"),
            t(r#"{"a b","c,d",NULL}"#),
            t(r"\x00ff10"),
            t("happy"),
            Value::Null,
        ]
    );
    let mut nulls = vec![Value::Null; 12];
    nulls[0] = t("-9223372036854775808");
    assert_eq!(new(&events[3]), nulls);
    assert_eq!(
        &new(&events[4])[..5],
        [t("2"), Value::Null, t(""), t("-0.0001"), t("f")]
    );
    assert_eq!(
        events[5],
        Event::Commit {
            xid: 731,
            commit_lsn: "0/1553310".parse().unwrap(),
            end_lsn: "0/1553340".parse().unwrap(),
            commit_time: Timestamp(848_959_356_577_496),
        }
    );
    let Event::Commit { commit_time, .. } = events[5] else {
        unreachable!()
    };
    assert!(
        commit_time.to_rfc3339().starts_with("20"),
        "{}",
        commit_time.to_rfc3339()
    );
}

#[test]
fn default_identity_sends_old_key_only_when_the_key_changes() {
    let events = decode("default_identity");
    assert_eq!(events.len(), 8);
    assert_eq!(new(&events[2]), [t("1"), t("Ann"), t("n1")]);
    assert_eq!(
        new(&events[3]),
        [t("2"), t("Bob"), Value::Null],
        "a real NULL stays NULL"
    );
    // UPDATE of a non-key column: no old row at all.
    assert_eq!(change(&events[4]).op, Op::Update);
    assert_eq!(change(&events[4]).old, None);
    assert_eq!(new(&events[4]), [t("1"), t("Anna"), t("n1")]);
    // UPDATE of the key: 'K' old tuple; its 'n's outside the identity are unknown, not NULL.
    assert_eq!(old(&events[5]), [t("1"), Value::Unknown, Value::Unknown]);
    assert_eq!(new(&events[5]), [t("10"), t("Anna"), t("n1")]);
    // DELETE: 'K' old tuple; note was NULL in the row but is unknown here.
    let c = change(&events[6]);
    assert_eq!((c.op, &c.new), (Op::Delete, &None));
    assert_eq!(old(&events[6]), [t("2"), Value::Unknown, Value::Unknown]);
    assert!(matches!(events[7], Event::Commit { xid: 732, .. }));
}

#[test]
fn full_identity_sends_whole_old_rows_with_real_nulls() {
    let events = decode("full_identity");
    assert_eq!(events.len(), 7);
    let Event::Relation(rel) = &events[1] else {
        panic!()
    };
    assert_eq!(rel.replica_identity, b'f');
    assert!(
        rel.columns.iter().all(|c| c.is_key),
        "FULL marks every column as key"
    );
    assert_eq!(old(&events[3]), [t("1"), t("Ann"), t("small")]);
    assert_eq!(new(&events[3]), [t("1"), t("Anna"), t("small")]);
    assert_eq!(new(&events[4]), [t("1"), Value::Null, t("small")]);
    assert_eq!(
        old(&events[5]),
        [t("1"), Value::Null, t("small")],
        "NULL in an 'O' tuple is NULL"
    );
    assert_eq!(change(&events[5]).op, Op::Delete);
}

#[test]
fn unchanged_toast_is_filled_from_the_old_row_when_known() {
    let events = decode("toast");
    assert_eq!(events.len(), 9);
    let big = big_value(&events);
    // DEFAULT identity, non-key update: 'u' with no old row -> unknown.
    assert_eq!(change(&events[3]).old, None);
    assert_eq!(new(&events[3]), [t("1"), t("1"), Value::Unknown]);
    // DEFAULT identity, key update: 'K' old row does not know it either.
    assert_eq!(old(&events[4]), [t("1"), Value::Unknown, Value::Unknown]);
    assert_eq!(new(&events[4]), [t("2"), t("1"), Value::Unknown]);
    // FULL identity: the old row carries the detoasted value, the new row gets it.
    assert!(matches!(&events[5], Event::Relation(r) if r.name == "t_full"));
    assert_eq!(old(&events[7]), [t("7"), t("big"), t(&big)]);
    assert_eq!(new(&events[7]), [t("7"), t("still big"), t(&big)]);
    assert!(matches!(events[8], Event::Commit { xid: 734, .. }));
}

#[test]
fn truncate_gives_one_change_per_relation() {
    let events = decode("truncate");
    let truncated: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Change(c) if c.op == Op::Truncate => {
                Some((c.relation.qualified_name(), &c.old, &c.new))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        truncated,
        [
            ("public.t_default".to_owned(), &None, &None),
            ("public.t_full".to_owned(), &None, &None),
            ("public.t_toast".to_owned(), &None, &None),
        ]
    );
    let raw: Vec<_> = fixture("truncate")
        .iter()
        .filter_map(|(_, p)| match pgoutput::parse(p) {
            Ok(Message::Truncate { options, relations }) => Some((options, relations)),
            _ => None,
        })
        .collect();
    let both = Message::TRUNCATE_CASCADE | Message::TRUNCATE_RESTART_IDENTITY;
    assert_eq!(raw, [(0, vec![16398, 16405]), (both, vec![16412])]);
    assert!(matches!(
        events.last(),
        Some(Event::Commit { xid: 735, .. })
    ));
}

#[test]
fn logical_messages_transactional_and_not() {
    let events = decode("messages");
    let msg = |transactional, lsn: &str, prefix: &str, content: &[u8]| Event::Message {
        transactional,
        lsn: lsn.parse().unwrap(),
        prefix: prefix.to_owned(),
        content: content.to_vec(),
    };
    assert_eq!(events.len(), 9);
    assert!(matches!(events[0], Event::Begin { xid: 736, .. }));
    assert_eq!(new(&events[2]), [t("4"), t("Dee"), t("x")]);
    assert_eq!(
        events[3],
        msg(true, "0/155DB00", "cache-invalidator", b"flush:all")
    );
    assert!(matches!(events[4], Event::Commit { xid: 736, .. }));
    // Non-transactional: alone, outside any transaction.
    assert_eq!(
        events[5],
        msg(false, "0/155DB80", "cache-invalidator", b"heartbeat")
    );
    // A transaction holding only a message; content is bytes, not necessarily UTF-8.
    assert!(matches!(events[6], Event::Begin { xid: 737, .. }));
    assert_eq!(events[7], msg(true, "0/155DBB8", "bin", &[0x00, 0xff]));
    assert!(matches!(events[8], Event::Commit { xid: 737, .. }));
}

#[test]
fn errors_name_message_type_lsn_and_offset() {
    let (lsn, payload) = fixture("default_identity").swap_remove(5); // the 'K' update
    let mut cache = RelationCache::new();
    let mut out = Vec::new();
    let (rel_lsn, relation) = &fixture("default_identity")[1];
    cache.decode_payload(relation, *rel_lsn, &mut out).unwrap();
    let e = cache
        .decode_payload(&payload[..25], lsn, &mut out)
        .unwrap_err();
    // 'K' tuple at 5..16, then 'N', 3 columns, 't', length 2 at 20, the value cut at 24.
    assert_eq!(
        e.to_string(),
        "malformed pgoutput Update message at LSN 0/15534F8: tuple truncated at byte 24"
    );
    assert_eq!(e.lsn(), Some(lsn));
    cache.clear();
    let e = cache.decode_payload(&payload, lsn, &mut out).unwrap_err();
    assert_eq!(
        e.to_string(),
        "pgoutput Update message at LSN 0/15534F8: unknown relation OID 16398: no Relation message for it was received on this stream"
    );
}

mod no_panic {
    //! Whatever the bytes, `parse` and `RelationCache::decode` return; a strict
    //! prefix of a valid message is always an error.

    use std::sync::OnceLock;

    use super::*;
    use proptest::prelude::*;

    const FILES: [&str; 6] = [
        "insert_types",
        "default_identity",
        "full_identity",
        "toast",
        "truncate",
        "messages",
    ];

    fn all_messages() -> &'static [(Lsn, Vec<u8>)] {
        static ALL: OnceLock<Vec<(Lsn, Vec<u8>)>> = OnceLock::new();
        ALL.get_or_init(|| FILES.iter().flat_map(|f| fixture(f)).collect())
    }

    /// A cache that knows every fixture relation and is inside a transaction,
    /// so mutated row messages reach the row-building code.
    fn primed_cache() -> RelationCache {
        static PRIMED: OnceLock<RelationCache> = OnceLock::new();
        PRIMED
            .get_or_init(|| {
                let mut cache = RelationCache::new();
                let mut out = Vec::new();
                for (lsn, payload) in all_messages() {
                    if payload.first() == Some(&b'R') || payload.first() == Some(&b'B') {
                        cache.decode_payload(payload, *lsn, &mut out).unwrap();
                    }
                }
                cache
            })
            .clone()
    }

    /// Parses and decodes; only a panic fails the test. Returns whether it decoded.
    fn exercise(cache: &mut RelationCache, payload: &[u8]) -> bool {
        let mut out = Vec::new();
        match cache.decode_payload(payload, Lsn(0x16B_3748), &mut out) {
            Ok(()) => true,
            Err(e) => {
                assert!(out.is_empty(), "events appended before an error: {out:?}");
                assert!(!e.to_string().is_empty());
                false
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Truncate(prop::sample::Index),
        FlipBits(Vec<(prop::sample::Index, u8)>),
        SetByte(prop::sample::Index, u8),
        Insert(prop::sample::Index, Vec<u8>),
        Remove(prop::sample::Index, prop::sample::Index),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            any::<prop::sample::Index>().prop_map(Mutation::Truncate),
            prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..8)
                .prop_map(Mutation::FlipBits),
            (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
            (
                any::<prop::sample::Index>(),
                prop::collection::vec(any::<u8>(), 1..8)
            )
                .prop_map(|(i, b)| Mutation::Insert(i, b)),
            (any::<prop::sample::Index>(), any::<prop::sample::Index>())
                .prop_map(|(i, n)| Mutation::Remove(i, n)),
        ]
    }

    /// Applies the mutation; true when the result is a strict prefix of the original.
    fn apply(m: &Mutation, p: &mut Vec<u8>) -> bool {
        if p.is_empty() {
            return false;
        }
        match m {
            Mutation::Truncate(i) => {
                p.truncate(i.index(p.len()));
                return true;
            }
            Mutation::FlipBits(flips) => {
                for (i, bit) in flips {
                    let i = i.index(p.len());
                    p[i] ^= 1 << bit;
                }
            }
            Mutation::SetByte(i, b) => {
                let i = i.index(p.len());
                p[i] = *b;
            }
            Mutation::Insert(i, bytes) => {
                let i = i.index(p.len() + 1);
                p.splice(i..i, bytes.iter().copied());
            }
            Mutation::Remove(i, n) => {
                let i = i.index(p.len());
                let n = 1 + n.index(p.len() - i);
                p.drain(i..i + n);
            }
        }
        false
    }

    /// Tags pgoutput defines (and ones we refuse), so random bodies get parsed deeply.
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        let tag = prop::sample::select(b"BCORYIUDTMSEcAbPKrpxn\0".to_vec());
        (tag, prop::collection::vec(any::<u8>(), 0..128)).prop_map(|(tag, mut body)| {
            body.insert(0, tag);
            body
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = pgoutput::parse(&bytes);
            exercise(&mut primed_cache(), &bytes);
        }

        #[test]
        fn arbitrary_bodies_behind_real_tags_never_panic(bytes in payload()) {
            exercise(&mut primed_cache(), &bytes);
        }

        /// The worker's zero-copy, pooled parse agrees with the copying one,
        /// on valid and broken messages alike (same message, same error).
        #[test]
        fn shared_and_pooled_parses_match_the_copying_parse(which in any::<prop::sample::Index>(), m in mutation(), mutate in any::<bool>()) {
            let messages = all_messages();
            let (_, mut p) = messages[which.index(messages.len())].clone();
            if mutate {
                apply(&m, &mut p);
            }
            let shared = bytes::Bytes::from(p.clone());
            let copied = format!("{:?}", pgoutput::parse(&p));
            prop_assert_eq!(format!("{:?}", pgoutput::parse_shared(&shared)), copied.clone());
            // Reused row vectors (with stale values in them) change nothing.
            let mut spare = vec![vec![pgoutput::TupleValue::Text("stale".into()); 5]; 2];
            prop_assert_eq!(format!("{:?}", pgoutput::parse_pooled(&shared, &mut spare)), copied);
        }

        #[test]
        fn mutated_fixtures_never_panic(which in any::<prop::sample::Index>(), m in mutation()) {
            let messages = all_messages();
            let (_, mut p) = messages[which.index(messages.len())].clone();
            let prefix = apply(&m, &mut p);
            let decoded = exercise(&mut primed_cache(), &p);
            prop_assert!(!(prefix && decoded), "a strict prefix decoded: {p:02x?}");
        }
    }
}
