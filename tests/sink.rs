//! The Redis sink against a real redis-server: every strategy, the permanent
//! error rules, NOSCRIPT reload, identity.

mod support;

use std::time::Duration;

use cache_invalidator::plan::{Plan, Publish};
use cache_invalidator::sink::identity::{self, Identity, IdentityCheck};
use cache_invalidator::sink::{RedisSink, SinkOptions};
use redis::Commands;
use support::RedisServer;

fn options(redis: &RedisServer) -> SinkOptions {
    support::sink_options(redis.url())
}

fn plan_with(f: impl FnOnce(&mut Plan)) -> Plan {
    let mut plan = Plan::default();
    f(&mut plan);
    plan
}

#[tokio::test]
async fn keys_tags_versions_patterns_and_publish() {
    let redis = RedisServer::start();
    let mut c = redis.client().get_connection().unwrap();
    let _: () = c.set("user:1:profile", "x").unwrap();
    let _: () = c.set("user:1:avatar", "x").unwrap();
    let _: () = c.set("control:keep", "x").unwrap();
    // A tag with more members than one SPOP batch.
    for i in 0..2500 {
        let key = format!("team:{i}:members");
        let _: () = c.set(&key, "x").unwrap();
        let _: () = c.sadd("tag:user:1", &key).unwrap();
    }
    let _: () = c.set("version:user:2", 5).unwrap();
    let _: () = c.expire("version:user:2", 1000).unwrap();
    let _: () = c.set("feed:9:user:1", "x").unwrap();
    let _: () = c.set("feed:9:user:10", "x").unwrap();
    let _: () = c.set("feed:9:user:1*", "x").unwrap();

    let mut sub = redis.client().get_connection().unwrap();
    let mut pubsub = support::subscribe(&mut sub, "cache:invalidate", Duration::from_secs(5));

    let plan = plan_with(|p| {
        p.keys.insert("user:1:profile");
        p.keys.insert("user:1:avatar");
        p.keys.insert("user:1:missing");
        p.tags.insert("tag:user:1");
        p.versions.insert("version:user:1");
        p.versions.insert("version:user:2");
        // An escaped value: only the literal key `feed:9:user:1*` and `feed:9:user:1`.
        p.patterns.insert("feed:*:user:1\\*");
        p.add_publish(Publish {
            channel: "cache:invalidate".into(),
            message: r#"{"entity":"user","id":"1"}"#.into(),
        });
    });
    let mut sink = RedisSink::connect(&options(&redis)).await.unwrap();
    let stats = sink.apply(&plan).await.unwrap();

    for gone in [
        "user:1:profile",
        "user:1:avatar",
        "tag:user:1",
        "team:0:members",
        "team:2499:members",
        "feed:9:user:1*",
    ] {
        assert!(!c.exists::<_, bool>(gone).unwrap(), "{gone} still exists");
    }
    for kept in ["control:keep", "feed:9:user:10", "feed:9:user:1"] {
        assert!(c.exists::<_, bool>(kept).unwrap(), "{kept} was deleted");
    }
    let v1: i64 = c.get("version:user:1").unwrap();
    assert_eq!(v1, 2, "a missing version key becomes 2");
    let v2: i64 = c.get("version:user:2").unwrap();
    assert_eq!(v2, 6);
    let ttl: i64 = c.ttl("version:user:2").unwrap();
    assert!(ttl > 900, "the bump keeps the TTL, got {ttl}");
    assert_eq!(stats.tag_members, 2500);
    assert_eq!(stats.published, 1);
    assert_eq!(stats.pattern_matches, 1);

    let msg = pubsub.get_message().unwrap();
    assert_eq!(msg.get_channel_name(), "cache:invalidate");
    assert_eq!(
        msg.get_payload::<String>().unwrap(),
        r#"{"entity":"user","id":"1"}"#
    );
}

#[tokio::test]
async fn wrong_types_under_prefixes_are_unlinked_and_redone() {
    let redis = RedisServer::start();
    let mut c = redis.client().get_connection().unwrap();
    let _: () = c.set("tag:user:7", "not a set").unwrap();
    let _: () = c.set("version:user:7", "not a number").unwrap();
    let plan = plan_with(|p| {
        p.tags.insert("tag:user:7");
        p.versions.insert("version:user:7");
    });
    let mut sink = RedisSink::connect(&options(&redis)).await.unwrap();
    let stats = sink.apply(&plan).await.unwrap();
    assert_eq!(stats.repaired, 2);
    assert!(!c.exists::<_, bool>("tag:user:7").unwrap());
    assert_eq!(c.get::<_, i64>("version:user:7").unwrap(), 2);
}

/// Tag sets and version keys go to Redis many per script call: more than one
/// call's worth of each (250), tag sets whose members exceed one call's
/// budget together, and wrong-typed keys among them, are all handled.
#[tokio::test]
async fn many_tags_and_versions_per_script_call() {
    let redis = RedisServer::start();
    let mut c = redis.client().get_connection().unwrap();
    let mut pipe = redis::pipe();
    for t in 0..250 {
        // 7 members each: 1,750 in all, more than one call's budget of 1,000.
        for m in 0..7 {
            let key = format!("m:{t}:{m}");
            pipe.set(&key, "x").ignore();
            pipe.sadd(format!("tag:t:{t}"), &key).ignore();
        }
        if t % 50 == 0 {
            pipe.set(format!("version:v:{t}"), 41).ignore();
        }
    }
    pipe.set("tag:t:wrong", "not a set").ignore();
    pipe.set("version:v:wrong", "not a number").ignore();
    let _: () = pipe.query(&mut c).unwrap();
    let plan = plan_with(|p| {
        for t in 0..250 {
            p.tags.insert(&format!("tag:t:{t}"));
            p.versions.insert(&format!("version:v:{t}"));
        }
        p.tags.insert("tag:t:wrong");
        p.versions.insert("version:v:wrong");
    });
    let mut sink = RedisSink::connect(&options(&redis)).await.unwrap();
    let stats = sink.apply(&plan).await.unwrap();
    assert_eq!(stats.tag_members, 1750);
    assert_eq!(stats.repaired, 2);
    for t in 0..250 {
        assert!(
            !c.exists::<_, bool>(format!("tag:t:{t}")).unwrap(),
            "tag:t:{t} left"
        );
        for m in 0..7 {
            assert!(
                !c.exists::<_, bool>(format!("m:{t}:{m}")).unwrap(),
                "m:{t}:{m} left"
            );
        }
        let want = if t % 50 == 0 { 42 } else { 2 };
        assert_eq!(
            c.get::<_, i64>(format!("version:v:{t}")).unwrap(),
            want,
            "version:v:{t}"
        );
    }
    assert!(!c.exists::<_, bool>("tag:t:wrong").unwrap());
    assert_eq!(c.get::<_, i64>("version:v:wrong").unwrap(), 2);
}

#[tokio::test]
async fn scripts_flushed_from_redis_are_reloaded() {
    let redis = RedisServer::start();
    let mut c = redis.client().get_connection().unwrap();
    let mut sink = RedisSink::connect(&options(&redis)).await.unwrap();
    let plan = plan_with(|p| {
        p.versions.insert("version:a");
        p.tags.insert("tag:a");
    });
    sink.apply(&plan).await.unwrap();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut c).unwrap();
    let _: () = c.sadd("tag:a", "k").unwrap();
    let _: () = c.set("k", "v").unwrap();
    sink.apply(&plan).await.unwrap();
    assert_eq!(c.get::<_, i64>("version:a").unwrap(), 3);
    assert!(!c.exists::<_, bool>("k").unwrap());
}

#[tokio::test]
async fn truncate_patterns_cover_tags_and_versions() {
    let redis = RedisServer::start();
    let mut c = redis.client().get_connection().unwrap();
    let _: () = c.sadd("tag:user:1", "cached:a").unwrap();
    let _: () = c.set("cached:a", "x").unwrap();
    let _: () = c.set("version:user:3", 4).unwrap();
    let _: () = c.set("user:3:profile", "x").unwrap();
    let _: () = c.set("other", "x").unwrap();
    let plan = plan_with(|p| {
        p.patterns.insert("user:*:profile");
        p.tag_patterns.insert("tag:user:*");
        p.version_patterns.insert("version:user:*");
    });
    let mut sink = RedisSink::connect(&options(&redis)).await.unwrap();
    sink.apply(&plan).await.unwrap();
    assert!(!c.exists::<_, bool>("cached:a").unwrap());
    assert!(!c.exists::<_, bool>("tag:user:1").unwrap());
    assert!(!c.exists::<_, bool>("user:3:profile").unwrap());
    assert_eq!(c.get::<_, i64>("version:user:3").unwrap(), 5);
    assert!(c.exists::<_, bool>("other").unwrap());
}

#[tokio::test]
async fn redis_down_is_an_error_to_retry_and_recovers() {
    let mut redis = RedisServer::start();
    let mut sink = RedisSink::connect(&options(&redis)).await.unwrap();
    let plan = plan_with(|p| {
        p.keys.insert("k1");
    });
    redis.kill();
    let err = sink.apply(&plan).await.expect_err("Redis is down");
    assert_eq!(
        err.retry_class(),
        cache_invalidator::sink::RetryClass::BackOff,
        "{err}"
    );
    redis.restart();
    let mut c = redis.client().get_connection().unwrap();
    let _: () = c.set("k1", "x").unwrap();
    // The connection manager reconnects behind the scenes.
    let mut applied = false;
    for _ in 0..50 {
        if sink.apply(&plan).await.is_ok() {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(applied, "sink did not recover after Redis came back");
    assert!(!c.exists::<_, bool>("k1").unwrap());
}

#[tokio::test]
async fn noperm_blocks() {
    let redis = RedisServer::start();
    let mut c = redis.client().get_connection().unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "weak", "on", ">pw", "~*", "+@all", "-unlink"])
        .query(&mut c)
        .unwrap();
    let mut opts = options(&redis);
    opts.url = format!("redis://weak:pw@127.0.0.1:{}/0", redis.port());
    let mut sink = RedisSink::connect(&opts).await.unwrap();
    let plan = plan_with(|p| {
        p.keys.insert("k");
    });
    let err = sink
        .apply(&plan)
        .await
        .expect_err("UNLINK is not permitted");
    assert_eq!(
        err.retry_class(),
        cache_invalidator::sink::RetryClass::Blocked,
        "{err}"
    );
    assert!(!err.to_string().contains("pw@"), "password leaked: {err}");
}

#[tokio::test]
async fn identity_detects_a_restarted_redis() {
    let mut redis = RedisServer::start();
    let sink = RedisSink::connect(&options(&redis)).await.unwrap();
    let mut conn = sink.connection();
    let (key, current) = support::slot1_identity(&sink).await;
    assert_eq!(
        identity::check(&mut conn, sink.target(), &key, &current)
            .await
            .unwrap(),
        IdentityCheck::Missing
    );
    support::store_identity(&sink, &key, &current).await;
    // Persist the identity, restart: same data, new run_id.
    let _: () = redis::cmd("SAVE")
        .query(&mut redis.client().get_connection().unwrap())
        .unwrap();
    redis.restart();
    let sink = RedisSink::connect(&options(&redis)).await.unwrap();
    let mut conn = sink.connection();
    let now = Identity {
        redis_run_id: identity::redis_run_id(&mut conn, sink.target())
            .await
            .unwrap(),
        ..current.clone()
    };
    assert_ne!(now.redis_run_id, current.redis_run_id);
    match identity::check(&mut conn, sink.target(), &key, &now)
        .await
        .unwrap()
    {
        IdentityCheck::Changed { stored } => assert_eq!(stored, current.to_string()),
        other => panic!("expected Changed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelete_after_deletes_a_key_refilled_right_after_the_invalidation() {
    let redis = RedisServer::start();
    let mut c = redis.client().get_connection().unwrap();
    let mut opts = options(&redis);
    opts.redelete_after = Some(Duration::from_millis(300));
    let mut sink = RedisSink::connect(&opts).await.unwrap();
    let _: () = c.set("user:9:profile", "x").unwrap();
    let plan = plan_with(|p| {
        p.keys.insert("user:9:profile");
    });
    sink.apply(&plan).await.unwrap();
    assert!(!c.exists::<_, bool>("user:9:profile").unwrap());
    // A reader that read the old row fills the cache after the first delete...
    let _: () = c.set("user:9:profile", "stale").unwrap();
    // ...and the delayed second pass removes it.
    support::wait_for("the second delete", Duration::from_secs(5), || {
        (!c.exists::<_, bool>("user:9:profile").unwrap()).then_some(())
    });
}

#[tokio::test]
async fn wait_replicas_waits_for_replicas_and_fails_without_enough() {
    let redis = RedisServer::start();
    let port = redis.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    support::wait_for("the replica link", Duration::from_secs(20), || {
        replica
            .cli(&["INFO", "replication"])
            .ok()
            .filter(|i| i.contains("master_link_status:up"))
    });
    let plan = plan_with(|p| {
        p.keys.insert("k");
    });
    let mut opts = options(&redis);
    opts.wait_replicas = 1;
    let mut sink = RedisSink::connect(&opts).await.unwrap();
    sink.apply(&plan).await.expect("one replica confirms");
    opts.wait_replicas = 2;
    let mut sink = RedisSink::connect(&opts).await.unwrap();
    let err = sink
        .apply(&plan)
        .await
        .expect_err("only one replica exists");
    assert!(err.to_string().contains("only 1 of 2"), "{err}");
    assert_eq!(
        err.retry_class(),
        cache_invalidator::sink::RetryClass::BackOff
    );
}
