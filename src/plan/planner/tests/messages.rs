//! Messages under our prefix (markers, declared invalidations, malformed)
//! and the messages the planner publishes.

use std::sync::Arc;

use super::{change, planner, post, posts, rel, sorted, POSTS};
use crate::decode::Op;
use crate::lsn::Lsn;
use crate::map::Mappings;
use crate::plan::planner::{
    DeclaredCounters, Planner, PlannerContext, MAX_MALFORMED_KEPT, MESSAGE_PREFIX,
};

#[test]
fn flush_markers() {
    let src = format!("{POSTS}\n[[table]]\nname = \"users\"\nkeys = [\"user:{{id}}\"]\n[table.truncate]\npatterns = [\"user:*\"]\n");
    let mut p = planner(&src);
    p.message("cache-invalidator", b"flush:table:posts", Lsn(5));
    assert_eq!(
        sorted(&p.take().patterns),
        ["author:*:posts", "feed:*:author:*", "post:*"]
    );
    p.message("cache-invalidator", b"flush:table:public.users", Lsn(5));
    assert_eq!(sorted(&p.take().patterns), ["user:*"]);
    p.message("cache-invalidator", b"flush:all", Lsn(5));
    assert_eq!(p.take().patterns.len(), 4);
    p.message("cache-invalidator", b"heartbeat", Lsn(5));
    p.message("other", b"flush:all", Lsn(5));
    assert!(p.take().is_empty());
    assert_eq!(p.stats().flush_markers, 3);
}

#[test]
fn declared_invalidations_are_planned_with_the_transaction() {
    let src = format!("{POSTS}\n[[table]]\nname = \"users\"\nkeys = [\"user:{{id}}\"]\n[table.truncate]\npatterns = [\"user:*\"]\n");
    let mut p = planner(&src);
    p.begin(3, Lsn(0x30));
    p.change(&change(&posts(), Op::Insert, None, Some(&post("7", "1"))));
    p.message(
        MESSAGE_PREFIX,
        br#"invalidate:v1:{"keys":["post:7:count","post:7"],"tags":["user:5"],"versions":["post:7"],"patterns":["feed:[ab]*"],"channels":[{"channel":"c","message":{"post":7}},{"channel":"d"}]}"#,
        Lsn(0x20),
    );
    p.commit();
    let plan = p.take();
    // Keys as given, deduplicated with the mapped rule's.
    assert_eq!(
        sorted(&plan.keys),
        ["author:1:posts", "post:7", "post:7:count"]
    );
    assert_eq!(sorted(&plan.tags), ["tag:author:1", "tag:user:5"]);
    assert_eq!(sorted(&plan.versions), ["version:post:7"]);
    // The declared pattern keeps its glob; the mapped one is escaped.
    assert_eq!(sorted(&plan.patterns), ["feed:*:author:1", "feed:[ab]*"]);
    assert!(plan.tag_patterns.is_empty(), "no flush: {plan:?}");
    assert_eq!(plan.publish.len(), 2);
    assert_eq!(plan.publish[0].message, r#"{"post":7}"#);
    assert_eq!(
        plan.publish[1].message,
        r#"{"epoch":"e1","keys":["post:7:count","post:7"],"lsn":"0/30","op":"declared","tags":["tag:user:5"],"versions":["version:post:7"]}"#
    );
    let d = p.stats().declared;
    assert_eq!(
        (
            d.messages,
            d.keys,
            d.tags,
            d.versions,
            d.patterns,
            d.publish,
            d.malformed
        ),
        (1, 2, 1, 1, 1, 2, 0)
    );
    assert!(p.take_malformed().is_empty());
    assert_eq!(p.take_declared().keys, 2);
    assert_eq!(p.take_declared(), DeclaredCounters::default());
}

#[test]
fn a_message_that_cannot_be_understood_flushes_everything() {
    let src = format!("{POSTS}\n[[table]]\nname = \"users\"\nkeys = [\"user:{{id}}\"]\n[table.truncate]\npatterns = [\"user:*\"]\n");
    let all = ["author:*:posts", "feed:*:author:*", "post:*", "user:*"];
    for content in [
        &b"invalidate:v9:{}"[..],
        b"invalidate:v1:{not json",
        b"invalidate:v1:{\"keys\":[\"\"]}",
        b"invalidate:\xff",
        b"flush:table:",
        b"flush:everything",
        b"",
    ] {
        let mut p = planner(&src);
        p.begin(3, Lsn(0x30));
        p.message(MESSAGE_PREFIX, content, Lsn(0x20));
        p.commit();
        let plan = p.take();
        assert_eq!(
            sorted(&plan.patterns),
            all,
            "{}",
            String::from_utf8_lossy(content)
        );
        let m = p.take_malformed();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].lsn, Lsn(0x20), "the message's own LSN");
        assert_eq!(p.stats().declared.malformed, 1);
        assert_eq!(p.stats().declared.messages, 0);
    }
    // Heartbeats, known markers and other prefixes are not malformed.
    let mut p = planner(&src);
    p.message(MESSAGE_PREFIX, b"heartbeat", Lsn(1));
    p.message("someone-else", b"invalidate:v9:", Lsn(1));
    p.message(MESSAGE_PREFIX, b"flush:table:public.unmapped", Lsn(1));
    assert!(p.take().is_empty());
    assert!(p.take_malformed().is_empty());
}

#[test]
fn malformed_messages_kept_for_logging_are_bounded() {
    let mut p = planner(POSTS);
    for i in 0..100 {
        p.message(MESSAGE_PREFIX, b"invalidate:v0:", Lsn(i));
    }
    assert_eq!(p.take_malformed().len(), MAX_MALFORMED_KEPT);
    assert_eq!(p.stats().declared.malformed, 100);
    assert_eq!(sorted(&p.take().patterns).len(), 3);
}

#[test]
fn default_message() {
    let mut p = planner("[[table]]\nname = \"users\"\nkeys = [\"user:{id}:b\", \"user:{id}:a\"]\ntags = [\"user:{id}\"]\nchannels = [\"cache:invalidate\"]\n");
    let r = rel(11, "users", &["id"], b'f', &[]);
    p.change(&change(&r, Op::Insert, None, Some(&[Some("1")])));
    let plan = p.take();
    assert_eq!(plan.publish.len(), 1);
    assert_eq!(plan.publish[0].channel, "cache:invalidate");
    assert_eq!(
        plan.publish[0].message,
        r#"{"table":"public.users","op":"insert","lsn":"0/100","keys":["user:1:a","user:1:b"],"tags":["tag:user:1"],"versions":[],"epoch":"e1"}"#
    );
}

#[test]
fn shaped_message_renders_the_new_row() {
    let mut p = planner("[[table]]\nname = \"users\"\nchannels = [{ channel = \"cache:invalidate\", message = { entity = \"user\", id = \"{id}\", n = 2 } }]\n");
    let r = rel(11, "users", &["id"], b'f', &[]);
    p.change(&change(
        &r,
        Op::Update,
        Some(&[Some("1")]),
        Some(&[Some("2")]),
    ));
    let plan = p.take();
    assert_eq!(
        plan.publish[0].message,
        r#"{"entity":"user","id":"2","n":2}"#
    );
    p.change(&change(&r, Op::Delete, Some(&[Some("3")]), None));
    assert_eq!(
        p.take().publish[0].message,
        r#"{"entity":"user","id":"3","n":2}"#
    );
}

#[test]
fn messages_past_max_batch_ops_become_one_truncate_message_per_table() {
    let m = Mappings::parse("m.toml", "[[table]]\nname = \"users\"\nkeys = [\"u:{id}\"]\nchannels = [\"c\"]\n[table.truncate]\npatterns = [\"u:*\"]\n").unwrap();
    let mut p = Planner::new(
        Arc::new(m),
        PlannerContext {
            max_batch_ops: 3,
            epoch: "e".into(),
            ..Default::default()
        },
    );
    let r = rel(11, "users", &["id"], b'f', &[]);
    // A first transaction under the limit stays as is.
    p.begin(1, Lsn(1));
    p.change(&change(&r, Op::Insert, None, Some(&[Some("0")])));
    p.commit();
    p.begin(2, Lsn(2));
    for i in 1..=5 {
        let id = i.to_string();
        p.change(&change(&r, Op::Insert, None, Some(&[Some(&id)])));
    }
    p.commit();
    let plan = p.take();
    let msgs: Vec<&str> = plan.publish.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(msgs[0].contains("\"op\":\"insert\""));
    assert_eq!(
        msgs[1],
        r#"{"table":"public.users","op":"truncate","lsn":"0/2","epoch":"e"}"#
    );
    assert_eq!(p.stats().message_overflows, 1);
}
