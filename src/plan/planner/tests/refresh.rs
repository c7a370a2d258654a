//! `refresh` rules: typed values, ties inside a batch, unlinks and tombstones.

use std::sync::Arc;

use super::{change, planner, rel, sorted};
use crate::decode::{Op, Relation, RelationColumn};
use crate::lsn::Lsn;
use crate::map::Mappings;
use crate::plan::planner::{Fallback, FallbackReason, Planner, PlannerContext};
use crate::plan::{Plan, RefreshValue};

const PROFILES: &str = r#"
[[table]]
name = "users"
keys = ["user:{id}:avatar"]
refresh = [
{ key = "user:{id}:profile", columns = ["id", "name", "score", "active", "meta"], ttl_s = 300 },
{ key = "user:{id}:h", columns = ["name", "score"], format = "hash" },
]
"#;

fn typed_users() -> Arc<Relation> {
    let col = |name: &str, type_oid: u32| RelationColumn {
        name: name.into(),
        is_key: name == "id",
        type_oid,
        type_modifier: -1,
    };
    Arc::new(Relation {
        oid: 21,
        schema: "public".into(),
        name: "users".into(),
        replica_identity: b'd',
        columns: vec![
            col("id", 23),
            col("name", 25),
            col("score", 1700),
            col("active", 16),
            col("meta", 3802),
        ],
    })
}

/// A planner over [`PROFILES`] in a transaction, and the `users` relation.
fn profiles() -> (Planner, Arc<Relation>) {
    (planner(PROFILES), typed_users())
}

/// A row of [`typed_users`]: `id` and `name`, score 1, active, no meta.
fn user<'a>(id: &'a str, name: &'a str) -> [Option<&'a str>; 5] {
    [Some(id), Some(name), Some("1"), Some("t"), None]
}

/// An old row of user `id` in which only the key is known.
fn user_key(id: &str) -> [Option<&str>; 5] {
    [Some(id), Some("?"), Some("?"), Some("?"), Some("?")]
}

fn json_of(plan: &Plan, key: &str) -> String {
    match &plan.refresh[key].value {
        RefreshValue::Json(s) => s.clone(),
        other => panic!("{key}: {other:?}"),
    }
}

#[test]
fn refresh_renders_typed_json_and_a_hash() {
    let (mut p, r) = profiles();
    p.change(&change(
        &r,
        Op::Insert,
        None,
        Some(&[
            Some("1"),
            Some("Ann \"A\""),
            Some("1.50"),
            Some("t"),
            Some(r#"{"a":[1]}"#),
        ]),
    ));
    let plan = p.take();
    assert_eq!(
        json_of(&plan, "user:1:profile"),
        r#"{"_lsn":"0000000000000100.00000000","id":1,"name":"Ann \"A\"","score":1.50,"active":true,"meta":{"a":[1]}}"#
    );
    assert_eq!(plan.refresh["user:1:profile"].ttl_s, Some(300));
    assert_eq!(
        plan.refresh["user:1:h"].value,
        RefreshValue::Hash(vec![
            ("_lsn".into(), "0000000000000100.00000000".into()),
            ("name".into(), "Ann \"A\"".into()),
            ("score".into(), "1.50".into()),
        ])
    );
    assert_eq!(plan.refresh["user:1:h"].ttl_s, None);
    assert_eq!(
        sorted(&plan.keys),
        ["user:1:avatar"],
        "refreshed keys are not unlinked"
    );
    // NULL: JSON null, and no hash field.
    p.change(&change(
        &r,
        Op::Insert,
        None,
        Some(&[Some("2"), None, Some("NaN"), Some("f"), None]),
    ));
    let plan = p.take();
    assert_eq!(
        json_of(&plan, "user:2:profile"),
        r#"{"_lsn":"0000000000000100.00000001","id":2,"name":null,"score":"NaN","active":false,"meta":null}"#
    );
    assert_eq!(
        plan.refresh["user:2:h"].value,
        RefreshValue::Hash(vec![
            ("_lsn".into(), "0000000000000100.00000001".into()),
            ("score".into(), "NaN".into()),
        ])
    );
}

#[test]
fn refresh_keeps_the_last_image_of_a_key_in_a_batch() {
    let (mut p, r) = profiles();
    for name in ["a", "b"] {
        p.change(&change(&r, Op::Update, None, Some(&user("1", name))));
    }
    let plan = p.take();
    assert!(json_of(&plan, "user:1:profile").contains(r#""name":"b""#));
    assert_eq!(plan.refresh["user:1:profile"].version.seq, 1);
    assert_eq!(plan.refresh.len(), 2);
}

#[test]
fn refresh_delete_unlinks_and_a_later_unlink_wins() {
    let (mut p, r) = profiles();
    let row = user("1", "a");
    p.change(&change(&r, Op::Insert, None, Some(&row)));
    p.change(&change(&r, Op::Delete, Some(&user_key("1")), None));
    let plan = p.take();
    assert!(
        plan.refresh.is_empty(),
        "the delete came later: {:?}",
        plan.refresh
    );
    assert_eq!(
        sorted(&plan.keys),
        ["user:1:avatar", "user:1:h", "user:1:profile"]
    );
    // Delete, then insert again: the key is unlinked first and set after.
    p.change(&change(&r, Op::Delete, Some(&user_key("1")), None));
    p.change(&change(&r, Op::Insert, None, Some(&row)));
    let plan = p.take();
    assert!(plan.keys.contains("user:1:profile"));
    assert!(plan.refresh.contains_key("user:1:profile"));
    assert!(p.take_fallbacks().is_empty());
}

#[test]
fn a_later_declared_key_or_pattern_drops_the_refresh() {
    let (mut p, r) = profiles();
    p.change(&change(&r, Op::Insert, None, Some(&user("1", "a"))));
    p.change(&change(&r, Op::Insert, None, Some(&user("2", "b"))));
    p.message(
        crate::plan::planner::MESSAGE_PREFIX,
        br#"invalidate:v1:{"keys": ["user:1:profile"], "patterns": ["user:2:*"]}"#,
        Lsn(0x10),
    );
    let plan = p.take();
    assert_eq!(
        plan.refresh.keys().map(String::as_str).collect::<Vec<_>>(),
        ["user:1:h"],
        "the declared key and pattern came later"
    );
    assert!(plan.keys.contains("user:1:profile"));
    // A refresh after the declared key (a later change) is kept.
    p.message(
        crate::plan::planner::MESSAGE_PREFIX,
        br#"invalidate:v1:{"keys": ["user:1:profile"]}"#,
        Lsn(0x10),
    );
    p.change(&change(&r, Op::Insert, None, Some(&user("1", "a"))));
    assert!(p.take().refresh.contains_key("user:1:profile"));
}

#[test]
fn refresh_of_a_moved_row_unlinks_the_old_key() {
    let (mut p, r) = profiles();
    p.change(&change(
        &r,
        Op::Update,
        Some(&user_key("1")),
        Some(&user("2", "a")),
    ));
    let plan = p.take();
    assert_eq!(
        sorted(&plan.keys),
        [
            "user:1:avatar",
            "user:1:h",
            "user:1:profile",
            "user:2:avatar"
        ]
    );
    let mut refreshed: Vec<&String> = plan.refresh.keys().collect();
    refreshed.sort();
    assert_eq!(refreshed, ["user:2:h", "user:2:profile"]);
}

#[test]
fn refresh_with_an_unknown_or_oversized_value_unlinks_its_key() {
    let (mut p, r) = profiles();
    // Unchanged TOAST in `name`, no old row: unknown.
    p.change(&change(&r, Op::Update, None, Some(&user("1", "?"))));
    let plan = p.take();
    assert!(plan.refresh.is_empty(), "{:?}", plan.refresh);
    assert_eq!(
        sorted(&plan.keys),
        ["user:1:avatar", "user:1:h", "user:1:profile"]
    );
    assert!(plan.patterns.is_empty(), "no truncate fired");
    let f = p.take_fallbacks();
    assert_eq!(
        f,
        [Fallback {
            table: "public.users".into(),
            reason: FallbackReason::RefreshUnknownValue,
            column: Some("name".into()),
            count: 2
        }]
    );
    assert!(f[0].reason.is_refresh());
    assert_eq!(p.stats().tables["public.users"].refresh_fallbacks, 2);

    let m = Mappings::parse("m.toml", PROFILES).unwrap();
    let mut p = Planner::new(
        Arc::new(m),
        PlannerContext {
            max_refresh_bytes: 60,
            ..Default::default()
        },
    );
    p.begin(1, Lsn(1));
    let long = "x".repeat(61);
    p.change(&change(&r, Op::Insert, None, Some(&user("1", &long))));
    let plan = p.take();
    assert!(plan.refresh.is_empty());
    assert!(plan.keys.contains("user:1:profile") && plan.keys.contains("user:1:h"));
    assert_eq!(
        p.take_fallbacks()[0].reason,
        FallbackReason::RefreshTooLarge
    );
}

#[test]
fn refresh_is_dropped_by_a_later_truncate_or_tombstone() {
    let src = format!("{PROFILES}\n[[table]]\nname = \"audit\"\nkeys = [\"user:{{user_id}}:profile\"]\nmode = \"tombstone\"\n");
    let mut p = planner(&src);
    let r = typed_users();
    let audit = rel(30, "audit", &["user_id"], b'f', &[]);
    let row = user("1", "a");
    p.change(&change(&r, Op::Insert, None, Some(&row)));
    p.change(&change(&r, Op::Truncate, None, None));
    let plan = p.take();
    assert!(plan.refresh.is_empty(), "{:?}", plan.refresh);
    assert!(plan.patterns.contains("user:*:profile"));
    // A tombstone of a later transaction wins; one of the same transaction
    // at the same LSN leaves the sink to order them (the value is set last).
    p.change(&change(&r, Op::Insert, None, Some(&row)));
    p.commit();
    p.begin(2, Lsn(0x200));
    p.change(&change(&audit, Op::Insert, None, Some(&[Some("1")])));
    let plan = p.take();
    assert!(!plan.refresh.contains_key("user:1:profile"));
    assert_eq!(plan.tombstones["user:1:profile"], Lsn(0x200));
    assert!(plan.refresh.contains_key("user:1:h"));
}

#[test]
fn merge_drops_refreshes_the_later_plan_unlinks() {
    let (mut p, r) = profiles();
    p.change(&change(&r, Op::Insert, None, Some(&user("1", "a"))));
    let mut first = p.take();
    p.change(&change(&r, Op::Delete, Some(&user_key("1")), None));
    first.merge(p.take());
    assert!(first.refresh.is_empty());
    assert_eq!(first.ops(), 3);
}
