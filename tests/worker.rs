//! `run` end to end against real servers: every strategy, transactions,
//! the flush marker, graceful shutdown.

mod support;

use std::time::Duration;

use support::{PgCluster, RedisProbe, RedisServer, WorkerConfig, WorkerProcess};

const WAIT: Duration = Duration::from_secs(20);

/// Servers with the demo schema, the demo mappings, `setup --replica-identity-full` done.
fn demo() -> (PgCluster, RedisServer, WorkerConfig) {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.migrate();
    let cfg = WorkerConfig::demo(&pg, &redis);
    let (code, out, err) = cfg.command(&["setup", "--replica-identity-full"]);
    assert_eq!(code, 0, "setup failed:\n{out}\n{err}");
    (pg, redis, cfg)
}

/// Waits until the worker applied everything committed so far.
fn sync(pg: &PgCluster, redis: &RedisServer) {
    support::sync_worker(pg, redis, WAIT);
}

/// Servers with `table_sql` run, `mapping` written as `file` beside the sync
/// probe, `setup` run with `setup_flags`, and a worker that caught up (its
/// log is in the config's directory: keep both).
fn one_table(
    table_sql: &str,
    mapping: (&str, &str),
    worker_toml: &str,
    setup_flags: &[&str],
) -> (PgCluster, RedisServer, WorkerConfig, WorkerProcess) {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.psql(table_sql);
    let (cfg, worker) =
        support::running_worker(&pg, &redis, &[mapping], worker_toml, setup_flags, WAIT);
    (pg, redis, cfg, worker)
}

#[test]
fn profile_picture_change_invalidates_every_strategy() {
    let (pg, redis, cfg) = demo();
    let mut r = RedisProbe::new(&redis);
    let mut worker = cfg.spawn_worker();
    sync(&pg, &redis);

    // The application's cache, as the lesson fills it.
    for key in [
        "user:123:profile",
        "user:123:avatar",
        "user:123:settings",
        "team:5:members",
        "chat:room:42:participants",
        "control:1",
        "user:124:profile",
    ] {
        r.set(key, "cached");
    }
    r.sadd("tag:user:123", "team:5:members");
    r.sadd("tag:user:123", "chat:room:42:participants");

    let mut sub_conn = redis.client().get_connection().unwrap();
    let mut pubsub = support::subscribe(&mut sub_conn, "cache:invalidate", WAIT);

    pg.psql("UPDATE users SET avatar_url = 'https://img.example.com/ada-2.png' WHERE id = 123");

    for key in [
        "user:123:profile",
        "user:123:avatar",
        "user:123:settings",
        "team:5:members",
        "chat:room:42:participants",
        "tag:user:123",
    ] {
        r.wait_gone(key, WAIT);
    }
    // The bump lands in the same pipeline as the deletes, but wait for it to be visible.
    let version = support::wait_for("version:user:123", WAIT, || r.get("version:user:123"));
    assert_eq!(
        version,
        "2",
        "a missing version becomes 2:\n{}",
        worker.log()
    );
    assert!(
        r.exists("control:1"),
        "a key no mapping derives was deleted"
    );
    assert!(
        r.exists("user:124:profile"),
        "another user's key was deleted"
    );

    // The shaped message of the lesson's listener.
    let msg = support::wait_message(&mut pubsub, "\"123\"");
    let json: serde_json::Value = serde_json::from_str(&msg).unwrap();
    assert_eq!(json, serde_json::json!({"entity": "user", "id": "123"}));
    assert_eq!(
        worker.stop(Duration::from_secs(10)),
        Some(0),
        "{}",
        worker.log()
    );
}

#[test]
fn a_post_moved_between_authors_invalidates_both_lists() {
    let (pg, redis, cfg) = demo();
    let mut r = RedisProbe::new(&redis);
    let worker = cfg.spawn_worker();
    sync(&pg, &redis);
    for key in [
        "post:7",
        "author:1:posts",
        "author:2:posts",
        "author:3:posts",
    ] {
        r.set(key, "cached");
    }
    pg.psql("UPDATE posts SET author_id = 2 WHERE id = 7");
    for key in ["post:7", "author:1:posts", "author:2:posts"] {
        r.wait_gone(key, WAIT);
    }
    assert!(r.exists("author:3:posts"), "{}", worker.log());
}

#[test]
fn open_transactions_touch_nothing_and_rollbacks_never_do() {
    let (pg, redis, cfg) = demo();
    let mut r = RedisProbe::new(&redis);
    let _worker = cfg.spawn_worker();
    sync(&pg, &redis);
    r.set("user:123:profile", "cached");
    r.set("post:7", "cached");

    // A transaction held open by a psql session in the background.
    let mut open = pg
        .psql_command()
        .arg("-c")
        .arg("BEGIN; UPDATE users SET name = 'open' WHERE id = 123; SELECT pg_sleep(2); COMMIT;")
        .spawn()
        .unwrap();
    // A rolled-back transaction, then a sync: the worker is past both.
    let _ = pg.psql("BEGIN; UPDATE posts SET title = 'x' WHERE id = 7; ROLLBACK;");
    sync(&pg, &redis);
    assert!(
        r.exists("user:123:profile"),
        "invalidated before the commit"
    );
    assert!(r.exists("post:7"), "a rolled-back transaction invalidated");
    assert!(open.wait().unwrap().success());
    r.wait_gone("user:123:profile", WAIT);
    assert!(r.exists("post:7"));
}

#[test]
fn the_flush_marker_fires_once_and_not_again_on_restart() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.migrate();
    let cfg = WorkerConfig::demo(&pg, &redis);
    let mut r = RedisProbe::new(&redis);
    // Stale entries cached before the slot existed: the WAL cannot show what
    // changed before, so setup's marker must flush them.
    r.set("user:55:profile", "stale");
    r.set("control:2", "kept");
    let (code, out, err) = cfg.command(&["setup", "--replica-identity-full"]);
    assert_eq!(code, 0, "{out}{err}");

    let mut worker = cfg.spawn_worker();
    r.wait_gone("user:55:profile", WAIT);
    assert!(r.exists("control:2"));
    sync(&pg, &redis);
    assert_eq!(
        worker.stop(Duration::from_secs(10)),
        Some(0),
        "{}",
        worker.log()
    );
    let flushes = worker.log().matches("flush marker").count();
    assert_eq!(
        flushes,
        1,
        "expected one flush marker in:\n{}",
        worker.log()
    );

    // Restart: the marker was acknowledged; nothing is flushed again.
    r.set("user:56:profile", "cached after the flush");
    let mut worker = cfg.spawn_worker();
    sync(&pg, &redis);
    assert!(
        r.exists("user:56:profile"),
        "flushed again on restart:\n{}",
        worker.log()
    );
    assert_eq!(worker.stop(Duration::from_secs(10)), Some(0));
    assert!(!worker.log().contains("flush marker"), "{}", worker.log());
    assert!(
        !worker.log().contains("flushed every mapped table"),
        "{}",
        worker.log()
    );
}

#[test]
fn graceful_shutdown_acknowledges_and_restart_reapplies_nothing() {
    let (pg, redis, cfg) = demo();
    let mut r = RedisProbe::new(&redis);
    let mut worker = cfg.spawn_worker();
    sync(&pg, &redis);
    r.set("post:7", "cached");
    pg.psql("UPDATE posts SET title = 'v2' WHERE id = 7");
    r.wait_gone("post:7", WAIT);
    let started = std::time::Instant::now();
    assert_eq!(
        worker.stop(Duration::from_secs(10)),
        Some(0),
        "{}",
        worker.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        started.elapsed()
    );
    let confirmed = pg.psql("SELECT confirmed_flush_lsn >= (SELECT max(lsn) FROM (SELECT pg_current_wal_lsn() AS lsn) s) - 100000 FROM pg_replication_slots WHERE slot_name = 'cache_invalidator'");
    assert_eq!(confirmed, "t");

    // Cached again after the invalidation: a restart must not delete it again.
    r.set("post:7", "fresh");
    let _worker = cfg.spawn_worker();
    sync(&pg, &redis);
    assert_eq!(r.get("post:7").as_deref(), Some("fresh"));
}

#[test]
fn run_without_setup_exits_2_with_the_setup_command() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.migrate();
    let cfg = WorkerConfig::demo(&pg, &redis);
    let (code, _out, err) = cfg.command(&["run"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cache-invalidator setup --config"), "{err}");
}

/// The start-up checks run while Redis is being connected: a failed check
/// ends `run` at once instead of waiting for an unreachable Redis.
#[test]
fn a_failed_check_exits_at_once_while_redis_is_unreachable() {
    let pg = PgCluster::start();
    let mut redis = RedisServer::start();
    pg.migrate();
    let cfg = WorkerConfig::demo(&pg, &redis);
    redis.stop();
    let mut w = cfg.spawn_worker();
    let code = support::wait_for("run to exit", WAIT, || w.try_exit_code());
    assert_eq!(code, 2, "{}", w.log());
    assert!(
        w.log().contains("cache-invalidator setup --config"),
        "{}",
        w.log()
    );
}

/// Redis down when the worker starts (setup done, so the checks pass): the
/// worker waits, retrying with backoff, says so once, and invalidates once
/// Redis is back.
#[test]
fn a_worker_started_while_redis_is_down_streams_once_it_returns() {
    let (pg, mut redis, cfg) = demo();
    redis.stop();
    let mut worker = cfg.spawn_worker();
    support::wait_for("the worker to retry Redis", WAIT, || {
        worker
            .log()
            .contains("Redis unreachable; retrying")
            .then_some(())
    });
    // Several attempts in 3 s (backoff from 100 ms), one line (repeats.rs:
    // the next one is due after 30 s, with the count).
    std::thread::sleep(Duration::from_secs(3));
    let log = worker.log();
    assert_eq!(
        log.matches("Redis unreachable; retrying").count(),
        1,
        "{log}"
    );
    assert_eq!(worker.try_exit_code(), None, "{log}");
    redis.restart();
    sync(&pg, &redis);
    let mut r = RedisProbe::new(&redis);
    r.set("post:7", "cached");
    pg.psql("UPDATE posts SET title = 'after the wait' WHERE id = 7");
    r.wait_gone("post:7", WAIT);
    assert_eq!(
        worker.stop(Duration::from_secs(10)),
        Some(0),
        "{}",
        worker.log()
    );
}

#[test]
fn run_refuses_rules_the_replica_identity_cannot_serve_and_allkeys_eviction() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.migrate();
    let cfg = WorkerConfig::demo(&pg, &redis);
    // Without --replica-identity-full: posts' author:{author_id}:posts needs the old author_id.
    let (code, out, err) = cfg.command(&["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, _out, err) = cfg.command(&["run"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("posts") && err.contains("author_id"), "{err}");
    assert!(
        err.contains("replica-identity-full") && err.contains("assume_unchanged"),
        "{err}"
    );

    let (code, out, err) = cfg.command(&["setup", "--replica-identity-full"]);
    assert_eq!(code, 0, "{out}{err}");
    redis
        .cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
        .unwrap();
    let (code, _out, err) = cfg.command(&["run"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("allkeys-lru"), "{err}");
}

#[test]
fn patterns_and_default_messages_end_to_end() {
    let mapping = r#"
[[table]]
name = "feeds"
patterns = ["feed:*:owner:{owner}"]
channels = ["cache:feeds"]
"#;
    // The pattern uses `owner`, which can change: old rows need REPLICA IDENTITY FULL.
    let (pg, redis, _cfg, _worker) = one_table(
        "CREATE TABLE feeds (id int PRIMARY KEY, owner text NOT NULL, title text)",
        ("feeds.toml", mapping),
        "",
        &["--replica-identity-full"],
    );
    let mut r = RedisProbe::new(&redis);
    pg.psql("INSERT INTO feeds VALUES (1, 'ann', 'x'), (2, '*', 'y')");
    sync(&pg, &redis);

    for key in [
        "feed:1:owner:ann",
        "feed:2:owner:ann",
        "feed:1:owner:anna",
        "feed:1:owner:*",
        "feed:1:owner:bob",
        "control:3",
    ] {
        r.set(key, "cached");
    }
    let mut sub_conn = redis.client().get_connection().unwrap();
    let mut pubsub = support::subscribe(&mut sub_conn, "cache:feeds", WAIT);

    pg.psql("UPDATE feeds SET title = 'z' WHERE id = 1");
    r.wait_gone("feed:1:owner:ann", WAIT);
    r.wait_gone("feed:2:owner:ann", WAIT);
    // A value of `*` matches only its own literal key, never everything.
    pg.psql("UPDATE feeds SET title = 'z' WHERE id = 2");
    r.wait_gone("feed:1:owner:*", WAIT);
    sync(&pg, &redis);
    for kept in ["feed:1:owner:anna", "feed:1:owner:bob", "control:3"] {
        assert!(
            r.exists(kept),
            "{kept} was deleted by a pattern it does not match"
        );
    }

    // The default message: table, op, lsn, keys, tags, versions, epoch.
    let payload: String = pubsub.get_message().unwrap().get_payload().unwrap();
    let json: serde_json::Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(json["table"], "public.feeds", "{payload}");
    assert_eq!(json["op"], "update", "{payload}");
    assert!(
        json["lsn"].as_str().unwrap_or("").contains('/'),
        "{payload}"
    );
    assert!(json.get("epoch").is_some(), "{payload}");
}

#[test]
fn an_overlong_value_fires_the_tables_truncate_as_a_counted_fallback() {
    let mapping = r#"
[[table]]
name = "docs"
keys = ["doc:{slug}"]
on = ["insert"]
"#;
    let (pg, redis, _cfg, worker) = one_table(
        "CREATE TABLE docs (id int PRIMARY KEY, slug text NOT NULL)",
        ("docs.toml", mapping),
        "max_key_bytes = 1024",
        &[],
    );
    let mut r = RedisProbe::new(&redis);
    r.set("doc:short", "cached");
    r.set("doc:other", "cached");
    r.set("control:4", "kept");
    // A 2 KiB slug would render a key over max_key_bytes: the table's
    // truncate (doc:*) fires instead, never a silent skip.
    pg.psql("INSERT INTO docs VALUES (1, repeat('x', 2048))");
    r.wait_gone("doc:short", WAIT);
    r.wait_gone("doc:other", WAIT);
    assert!(r.exists("control:4"));
    sync(&pg, &redis);
    let log = worker.log();
    assert!(log.contains("value_too_long"), "{log}");
    assert!(
        log.contains("fired the table's truncate invalidations instead"),
        "{log}"
    );
}
