//! The worker's Redis user needs exactly `security::redis_acl_rule`: a user
//! created from that string runs every sink strategy (keys, tags, versions,
//! patterns, publish, identity, a non-zero database) and nothing else.

mod support;

use std::time::Duration;

use cache_invalidator::plan::{Plan, Publish};
use cache_invalidator::security::redis_acl_rule;
use cache_invalidator::sink::RedisSink;
use redis::Commands;
use support::RedisServer;

#[tokio::test]
async fn the_documented_acl_is_enough_and_no_more() {
    let redis = RedisServer::start();
    let rule = redis_acl_rule(&["cache:invalidate".into()]);
    let mut args = vec!["ACL", "SETUSER", "worker", "reset", "on", ">acl-pw"];
    args.extend(rule.split(' '));
    let out = redis.cli(&args).unwrap();
    assert_eq!(out, "OK", "ACL SETUSER {rule}: {out}");

    // Data in database 1 (SELECT is part of the rule), written as the admin.
    let admin = redis::Client::open(format!("redis://127.0.0.1:{}/1", redis.port())).unwrap();
    let mut c = admin.get_connection().unwrap();
    let _: () = c.set("user:1:profile", "x").unwrap();
    for i in 0..1500 {
        let key = format!("team:{i}:members");
        let _: () = c.set(&key, "x").unwrap();
        let _: () = c.sadd("tag:user:1", &key).unwrap();
    }
    let _: () = c.set("feed:9:user:1", "x").unwrap();
    let mut sub = admin.get_connection().unwrap();
    let mut pubsub = support::subscribe(&mut sub, "cache:invalidate", Duration::from_secs(5));

    let options = support::sink_options(format!(
        "redis://worker:acl-pw@127.0.0.1:{}/1",
        redis.port()
    ));
    let mut sink = RedisSink::connect(&options).await.unwrap();
    let mut plan = Plan::default();
    plan.keys.insert("user:1:profile");
    plan.tags.insert("tag:user:1");
    plan.versions.insert("version:user:1");
    plan.patterns.insert("feed:*:user:1");
    plan.add_publish(Publish {
        channel: "cache:invalidate".into(),
        message: "{}".into(),
    });
    let stats = sink
        .apply(&plan)
        .await
        .expect("the sink runs under the ACL");
    assert_eq!((stats.tag_members, stats.published), (1500, 1));
    assert!(!c.exists::<_, bool>("user:1:profile").unwrap());
    assert!(!c.exists::<_, bool>("team:7:members").unwrap());
    assert!(!c.exists::<_, bool>("feed:9:user:1").unwrap());
    assert_eq!(c.get::<_, i64>("version:user:1").unwrap(), 2);
    assert_eq!(
        pubsub.get_message().unwrap().get_channel_name(),
        "cache:invalidate"
    );

    // NOSCRIPT reload: SCRIPT LOAD is permitted.
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut c).unwrap();
    sink.apply(&plan)
        .await
        .expect("reload scripts under the ACL");

    // The identity guard: INFO, GET and SET of the identity key.
    let (key, current) = support::slot1_identity(&sink).await;
    support::store_identity(&sink, &key, &current).await;
    let mut conn = sink.connection();
    // PING and WAIT are permitted.
    let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    let _: i64 = redis::cmd("WAIT")
        .arg(0)
        .arg(0)
        .query_async(&mut conn)
        .await
        .unwrap();

    // Anything else is refused: FLUSHALL, KEYS, other channels, CONFIG.
    for cmd in [
        vec!["FLUSHALL"],
        vec!["KEYS", "*"],
        vec!["CONFIG", "GET", "maxmemory"],
        vec!["PUBLISH", "other", "x"],
    ] {
        let mut r = redis::cmd(cmd[0]);
        for a in &cmd[1..] {
            r.arg(*a);
        }
        let err = r
            .query_async::<redis::Value>(&mut conn)
            .await
            .expect_err("outside the ACL");
        assert_eq!(err.code(), Some("NOPERM"), "{cmd:?}: {err}");
    }
    assert!(c
        .exists::<_, bool>("cache-invalidator:slot1:identity")
        .unwrap());
}
