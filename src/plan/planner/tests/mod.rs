//! Unit tests of the planner: rendering and fallbacks here, messages and
//! refresh in their own files.

use std::sync::Arc;

use super::{Fallback, FallbackReason, Planner, PlannerContext};
use crate::decode::{Change, Event, Op, Relation, RelationColumn, Row, Value};
use crate::lsn::Lsn;
use crate::map::Mappings;

fn rel(oid: u32, name: &str, cols: &[&str], identity: u8, keys: &[&str]) -> Arc<Relation> {
    Arc::new(Relation {
        oid,
        schema: "public".into(),
        name: name.into(),
        replica_identity: identity,
        columns: cols
            .iter()
            .map(|c| RelationColumn {
                name: c.to_string(),
                is_key: identity == b'f' || keys.contains(c),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect(),
    })
}

fn row(vals: &[Option<&str>]) -> Row {
    Row {
        values: vals
            .iter()
            .map(|v| match v {
                Some("?") => Value::Unknown,
                Some(s) => Value::Text((*s).into()),
                None => Value::Null,
            })
            .collect(),
    }
}

fn change(
    r: &Arc<Relation>,
    op: Op,
    old: Option<&[Option<&str>]>,
    new: Option<&[Option<&str>]>,
) -> Change {
    Change {
        relation: Arc::clone(r),
        op,
        old: old.map(row),
        new: new.map(row),
    }
}

fn planner(src: &str) -> Planner {
    let m = Mappings::parse("m.toml", src).unwrap();
    let ctx = PlannerContext {
        epoch: "e1".into(),
        ..Default::default()
    };
    let mut p = Planner::new(Arc::new(m), ctx);
    p.begin(1, Lsn(0x100));
    p
}

fn sorted(set: &crate::plan::KeySet) -> Vec<&str> {
    let mut v: Vec<&str> = set.iter().collect();
    v.sort_unstable();
    v
}

const POSTS: &str = r#"
[[table]]
name = "posts"
keys = ["post:{id}", "author:{author_id}:posts"]
tags = ["author:{author_id}"]
versions = ["post:{id}"]
patterns = ["feed:*:author:{author_id}"]
"#;

fn posts() -> Arc<Relation> {
    rel(10, "posts", &["id", "author_id", "title"], b'f', &[])
}

/// A row of [`posts`]: `id` by `author_id`, titled "a".
fn post<'a>(id: &'a str, author_id: &'a str) -> [Option<&'a str>; 3] {
    [Some(id), Some(author_id), Some("a")]
}

#[test]
fn update_renders_old_and_new_union() {
    let mut p = planner(POSTS);
    let r = posts();
    p.change(&change(
        &r,
        Op::Update,
        Some(&post("7", "1")),
        Some(&post("7", "2")),
    ));
    let plan = p.take();
    assert_eq!(
        sorted(&plan.keys),
        ["author:1:posts", "author:2:posts", "post:7"]
    );
    assert_eq!(sorted(&plan.tags), ["tag:author:1", "tag:author:2"]);
    assert_eq!(sorted(&plan.versions), ["version:post:7"]);
    assert_eq!(
        sorted(&plan.patterns),
        ["feed:*:author:1", "feed:*:author:2"]
    );
    assert!(p.take().is_empty(), "take resets");
}

#[test]
fn insert_renders_new_delete_renders_old() {
    let mut p = planner(POSTS);
    let r = posts();
    p.change(&change(&r, Op::Insert, None, Some(&post("7", "1"))));
    assert_eq!(sorted(&p.take().keys), ["author:1:posts", "post:7"]);
    p.change(&change(&r, Op::Delete, Some(&post("8", "3")), None));
    assert_eq!(sorted(&p.take().keys), ["author:3:posts", "post:8"]);
}

#[test]
fn tombstone_rules_mark_keys_and_tag_sets_at_the_commit_lsn() {
    let mut p = planner(&format!("{POSTS}mode = \"tombstone\"\n"));
    let r = posts();
    p.change(&change(&r, Op::Insert, None, Some(&post("7", "1"))));
    p.commit();
    p.begin(2, Lsn(0x200));
    p.change(&change(&r, Op::Delete, Some(&post("7", "1")), None));
    let plan = p.take();
    assert!(plan.keys.is_empty() && plan.tags.is_empty(), "{plan:?}");
    let mut tombstones: Vec<_> = plan.tombstones.iter().collect();
    tombstones.sort_unstable();
    assert_eq!(
        tombstones,
        [
            (&"author:1:posts".to_owned(), &Lsn(0x200)),
            (&"post:7".to_owned(), &Lsn(0x200))
        ]
    );
    let tags: Vec<_> = plan.tombstone_tags.iter().collect();
    assert_eq!(tags, [(&"tag:author:1".to_owned(), &Lsn(0x200))]);
    assert_eq!(sorted(&plan.versions), ["version:post:7"]);
    assert_eq!(sorted(&plan.patterns), ["feed:*:author:1"]);
}

#[test]
fn null_renders_nothing() {
    let mut p = planner(POSTS);
    p.change(&change(
        &posts(),
        Op::Insert,
        None,
        Some(&[Some("7"), None, Some("a")]),
    ));
    let plan = p.take();
    assert_eq!(sorted(&plan.keys), ["post:7"]);
    assert!(plan.tags.is_empty() && plan.patterns.is_empty());
    assert!(p.take_fallbacks().is_empty());
}

#[test]
fn pattern_values_are_glob_escaped() {
    let mut p = planner(POSTS);
    p.change(&change(&posts(), Op::Insert, None, Some(&post("7", "*"))));
    assert_eq!(sorted(&p.take().patterns), ["feed:*:author:\\*"]);
}

#[test]
fn unknown_value_fires_the_table_truncate() {
    let mut p = planner(POSTS);
    // A key-only old row under the default identity: author_id not sent.
    let r = rel(10, "posts", &["id", "author_id", "title"], b'd', &["id"]);
    p.change(&change(
        &r,
        Op::Delete,
        Some(&[Some("7"), Some("?"), Some("?")]),
        None,
    ));
    let plan = p.take();
    assert!(
        plan.keys.is_empty(),
        "nothing row-level is planned: {plan:?}"
    );
    assert_eq!(
        sorted(&plan.patterns),
        ["author:*:posts", "feed:*:author:*", "post:*"]
    );
    assert_eq!(sorted(&plan.tag_patterns), ["tag:author:*"]);
    assert_eq!(sorted(&plan.version_patterns), ["version:post:*"]);
    let f = p.take_fallbacks();
    assert_eq!(
        f,
        [Fallback {
            table: "public.posts".into(),
            reason: FallbackReason::UnknownValue,
            column: Some("author_id".into()),
            count: 1
        }]
    );
    assert_eq!(p.stats().tables["public.posts"].fallback_unknown_value, 1);
    assert_eq!(p.stats().tables["public.posts"].deletes, 1);
}

#[test]
fn missing_column_falls_back_without_crashing() {
    let mut p = planner(POSTS);
    let r = rel(10, "posts", &["id", "title"], b'f', &[]);
    p.change(&change(&r, Op::Insert, None, Some(&[Some("7"), Some("a")])));
    assert!(p.take().patterns.contains("post:*"));
    assert_eq!(p.take_fallbacks()[0].reason, FallbackReason::MissingColumn);
    assert_eq!(
        p.missing_columns(),
        [("public.posts".to_owned(), "author_id".to_owned())],
        "reported once, by name"
    );
    p.relation(&r);
    assert_eq!(p.missing_columns().len(), 1, "not reported twice");
    // The column comes back with a new Relation: rendering resumes.
    p.relation(&posts());
    assert!(p.missing_columns().is_empty(), "cleared");
    p.change(&change(&posts(), Op::Insert, None, Some(&post("7", "1"))));
    assert!(p.take().keys.contains("post:7"));
}

#[test]
fn update_without_old_row_under_default_identity() {
    // id is the identity: no old row means it did not change.
    let mut p = planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n");
    let r = rel(11, "users", &["id", "name"], b'd', &["id"]);
    p.change(&change(&r, Op::Update, None, Some(&[Some("1"), Some("b")])));
    assert_eq!(sorted(&p.take().keys), ["user:1"]);
    assert!(p.take_fallbacks().is_empty());
    // author_id is not: without old row the old author is unknown -> fallback.
    let mut p = planner(POSTS);
    let r = rel(10, "posts", &["id", "author_id", "title"], b'd', &["id"]);
    p.change(&change(&r, Op::Update, None, Some(&post("7", "2"))));
    assert!(p.take().patterns.contains("author:*:posts"));
    assert_eq!(p.take_fallbacks()[0].reason, FallbackReason::OldRowMissing);
}

#[test]
fn assume_unchanged_takes_the_old_value_from_the_new_row() {
    let mut p = planner(
        "[[table]]\nname = \"docs\"\nkeys = [\"t:{tenant_id}:doc:{id}\"]\nassume_unchanged = [\"tenant_id\"]\n",
    );
    let r = rel(12, "docs", &["id", "tenant_id"], b'd', &["id"]);
    // Identity changed: key-only old row, tenant_id unknown in it.
    p.change(&change(
        &r,
        Op::Update,
        Some(&[Some("1"), Some("?")]),
        Some(&[Some("2"), Some("9")]),
    ));
    assert_eq!(sorted(&p.take().keys), ["t:9:doc:1", "t:9:doc:2"]);
    assert!(p.take_fallbacks().is_empty());
}

#[test]
fn columns_filter() {
    let src = "[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\ncolumns = [\"avatar\"]\n";
    let r = rel(11, "users", &["id", "name", "avatar"], b'f', &[]);
    let mut p = planner(src);
    let old = [Some("1"), Some("a"), Some("x")];
    let renamed = [Some("1"), Some("b"), Some("x")];
    let new_avatar = [Some("1"), Some("a"), Some("y")];
    let toasted = [Some("1"), Some("a"), Some("?")];
    // (what, op, old row, new row, whether the rule fires), one planner.
    let cases = [
        (
            "avatar unchanged: nothing",
            Op::Update,
            Some(&old),
            &renamed,
            false,
        ),
        ("avatar changed", Op::Update, Some(&old), &new_avatar, true),
        (
            "no old row: cannot tell, fires",
            Op::Update,
            None,
            &new_avatar,
            true,
        ),
        (
            "unchanged TOAST in the new row: known unchanged",
            Op::Update,
            None,
            &toasted,
            false,
        ),
        (
            "inserts and deletes are not filtered",
            Op::Insert,
            None,
            &new_avatar,
            true,
        ),
    ];
    for (what, op, old_row, new_row, fires) in cases {
        p.change(&change(&r, op, old_row.map(|o| &o[..]), Some(&new_row[..])));
        let plan = p.take();
        if fires {
            assert_eq!(sorted(&plan.keys), ["user:1"], "{what}");
        } else {
            assert!(plan.is_empty(), "{what}: {plan:?}");
        }
    }
}

#[test]
fn on_filter() {
    let mut p = planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\non = [\"delete\"]\n");
    let r = rel(11, "users", &["id"], b'f', &[]);
    p.change(&change(&r, Op::Insert, None, Some(&[Some("1")])));
    assert!(p.take().is_empty());
    p.change(&change(&r, Op::Delete, Some(&[Some("1")]), None));
    assert_eq!(p.take().keys.len(), 1);
}

#[test]
fn truncate_fires_derived_truncate() {
    let mut p = planner(POSTS);
    p.change(&change(&posts(), Op::Truncate, None, None));
    let plan = p.take();
    assert_eq!(
        sorted(&plan.patterns),
        ["author:*:posts", "feed:*:author:*", "post:*"]
    );
    assert_eq!(p.stats().tables["public.posts"].truncates, 1);
    assert!(p.take_fallbacks().is_empty());
}

#[test]
fn truncate_none_and_unmapped_tables() {
    let mut p =
        planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\ntruncate = \"none\"\n");
    let r = rel(11, "users", &["id"], b'f', &[]);
    p.change(&change(&r, Op::Truncate, None, None));
    assert!(p.take().is_empty());
    let other = rel(99, "audit", &["id"], b'f', &[]);
    p.change(&change(&other, Op::Insert, None, Some(&[Some("1")])));
    assert!(p.take().is_empty());
    assert_eq!(p.stats().tables["public.audit"].inserts, 1);
}

#[test]
fn a_row_changed_1000_times_yields_one_invalidation_per_key() {
    let mut p = planner(&format!("{POSTS}channels = [\"c\"]\n"));
    let r = posts();
    for i in 0..1000 {
        let title = format!("t{i}");
        p.change(&change(
            &r,
            Op::Update,
            Some(&[Some("7"), Some("1"), Some("x")]),
            Some(&[Some("7"), Some("1"), Some(&title)]),
        ));
    }
    let plan = p.take();
    assert_eq!(plan.keys.len(), 2);
    assert_eq!(plan.tags.len(), 1);
    assert_eq!(plan.versions.len(), 1);
    assert_eq!(plan.publish.len(), 1);
    assert_eq!(p.stats().tables["public.posts"].updates, 1000);
}

#[test]
fn value_over_max_key_bytes_fires_the_fallback() {
    let m = Mappings::parse(
        "m.toml",
        "[[table]]\nname = \"users\"\nkeys = [\"u:{id}\"]\n",
    )
    .unwrap();
    let mut p = Planner::new(
        Arc::new(m),
        PlannerContext {
            max_key_bytes: 8,
            ..Default::default()
        },
    );
    let r = rel(11, "users", &["id"], b'f', &[]);
    p.begin(1, Lsn(1));
    p.change(&change(&r, Op::Insert, None, Some(&[Some("12345678")])));
    p.change(&change(&r, Op::Insert, None, Some(&[Some("123456789")])));
    p.commit();
    let plan = p.take();
    assert!(plan.keys.contains("u:12345678"));
    assert!(!plan.keys.iter().any(|k| k.contains("123456789")));
    assert_eq!(plan.patterns.iter().collect::<Vec<_>>(), ["u:*"]);
    let f = p.take_fallbacks();
    assert_eq!(f[0].reason, FallbackReason::ValueTooLong);
    assert_eq!(FallbackReason::ValueTooLong.as_str(), "value_too_long");
}

#[test]
fn renamed_table_is_followed_by_oid() {
    let mut p = planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\n");
    p.relation(&rel(11, "users", &["id"], b'f', &[]));
    let renamed = rel(11, "people", &["id"], b'f', &[]);
    p.relation(&renamed);
    p.change(&change(&renamed, Op::Insert, None, Some(&[Some("1")])));
    assert_eq!(sorted(&p.take().keys), ["user:1"]);
    assert_eq!(
        p.stats().renamed,
        [("public.users".to_owned(), "public.people".to_owned())]
    );
}

#[test]
fn events_drive_the_planner() {
    let mut p =
        planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\nchannels = [\"c\"]\n");
    let r = rel(11, "users", &["id"], b'f', &[]);
    p.feed(&Event::Begin {
        xid: 9,
        final_lsn: Lsn(0xAB),
        commit_time: Default::default(),
    });
    p.feed(&Event::Relation(Arc::clone(&r)));
    p.feed(&Event::Change(change(
        &r,
        Op::Insert,
        None,
        Some(&[Some("1")]),
    )));
    p.feed(&Event::Commit {
        xid: 9,
        commit_lsn: Lsn(0xAB),
        end_lsn: Lsn(0xAC),
        commit_time: Default::default(),
    });
    let plan = p.take();
    assert_eq!(sorted(&plan.keys), ["user:1"]);
    assert!(plan.publish[0].message.contains("\"lsn\":\"0/AB\""));
}

mod messages;
mod refresh;
