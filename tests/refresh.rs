//! Pre-warm (`refresh` rules) against real servers: the worker sets keys to
//! the new row in commit order, unlinks them on delete, moves them with the
//! row, never puts an older image over a newer one (replays after a crash
//! included), unlinks a key whose value it cannot know, and meets tombstones
//! and guarded fills as `docs/race-proof-fills.md` says.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cache_invalidator::cache::{self, tombstone};
use cache_invalidator::Lsn;
use support::{PgCluster, RedisProbe, RedisServer, WorkerConfig, WorkerProcess};

/// Generous: the machine is shared and has two cores.
const WAIT: Duration = Duration::from_secs(60);

const SCHEMA: &str = "CREATE TABLE profiles (id int PRIMARY KEY, name text, score numeric, active bool, meta jsonb, bio text)";

const MAPPING: &str = r#"
[[table]]
name = "profiles"
refresh = [
    { key = "user:{id}:profile", columns = ["id", "name", "score", "active", "meta", "bio"], ttl_s = 300 },
    { key = "user:{id}:h", columns = ["name", "score"], format = "hash" },
]
"#;

/// A worker on a fresh `profiles` table, setup's flush marker applied;
/// `worker_toml` goes under `[worker]` (see `support::metrics_toml`).
fn start(
    pg: &PgCluster,
    redis: &RedisServer,
    mapping: &str,
    worker_toml: &str,
) -> (WorkerConfig, WorkerProcess) {
    let started = start_on(
        pg,
        &format!("url = \"{}\"", redis.url()),
        mapping,
        worker_toml,
    );
    support::sync_worker(pg, redis, WAIT);
    started
}

/// [`start`] with the body of `[redis]` given, up to setup's flush marker
/// (the caller syncs: on one server or on a cluster).
fn start_on(
    pg: &PgCluster,
    redis_toml: &str,
    mapping: &str,
    worker_toml: &str,
) -> (WorkerConfig, WorkerProcess) {
    pg.psql(SCHEMA);
    let cfg = WorkerConfig::with_redis(
        pg,
        redis_toml,
        &support::with_sync_probe(pg, &[("profiles.toml", mapping)]),
        worker_toml,
    );
    cfg.run_setup(&[]);
    let w = cfg.spawn_worker();
    w.wait_log("flush marker: firing", WAIT);
    (cfg, w)
}

/// Waits until `cache_invalidator_refreshes_total{outcome}` reads `n` on the
/// worker's `/metrics` at `port`.
fn wait_refreshes(port: u16, outcome: &str, n: f64) {
    support::wait_for(
        &format!("refreshes_total{{outcome={outcome}}} = {n}"),
        WAIT,
        || {
            let (_, body) = support::http_get(port, "/metrics")?;
            let got = support::metric_sample(
                &body,
                "cache_invalidator_refreshes_total",
                &[("outcome", outcome)],
            );
            (got == n).then_some(())
        },
    );
}

fn get(redis: &RedisServer, key: &str) -> Option<String> {
    RedisProbe::new(redis).get(key)
}

fn hgetall(redis: &RedisServer, key: &str) -> HashMap<String, String> {
    let mut c = redis.client().get_connection().expect("redis");
    redis::cmd("HGETALL")
        .arg(key)
        .query(&mut c)
        .expect("HGETALL")
}

fn ttl(redis: &RedisServer, key: &str) -> i64 {
    let mut c = redis.client().get_connection().expect("redis");
    redis::cmd("TTL").arg(key).query(&mut c).expect("TTL")
}

/// Splits a refreshed JSON value into its version and the rest of the object
/// (after `_lsn`), asserting the documented layout.
fn split_json(value: &str) -> (String, String) {
    let rest = value
        .strip_prefix("{\"_lsn\":\"")
        .unwrap_or_else(|| panic!("not a refreshed value: {value}"));
    let (version, rest) = rest.split_at(25);
    assert!(
        version.len() == 25
            && version.as_bytes()[16] == b'.'
            && version
                .chars()
                .all(|c| c == '.' || c.is_ascii_digit() || c.is_ascii_uppercase()),
        "{version}"
    );
    let rest = rest
        .strip_prefix('"')
        .unwrap_or_else(|| panic!("no closing quote after _lsn: {value}"));
    (version.to_owned(), rest.to_owned())
}

/// Waits until `key` holds a refreshed JSON value whose fields after `_lsn`
/// are `fields`; returns the version.
fn wait_json(redis: &RedisServer, key: &str, fields: &str) -> String {
    wait_json_with(|| get(redis, key), key, fields)
}

/// [`wait_json`] reading the key with `get`.
fn wait_json_with(mut get: impl FnMut() -> Option<String>, key: &str, fields: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let v = get();
        if let Some(v) = v.as_deref().filter(|v| v.starts_with("{\"_lsn\":\"")) {
            let (version, rest) = split_json(v);
            if rest == fields {
                return version;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {key} = {fields}; it holds {v:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hash(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The hash without its `_lsn` field, asserting the field is the version.
fn hash_fields(redis: &RedisServer, key: &str, version: &str) -> HashMap<String, String> {
    let mut h = hgetall(redis, key);
    assert_eq!(h.remove("_lsn").as_deref(), Some(version), "{key}: {h:?}");
    h
}

#[test]
fn insert_update_move_delete_leave_exactly_the_new_row() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let (_cfg, mut w) = start(&pg, &redis, MAPPING, "");

    pg.psql("INSERT INTO profiles VALUES (1, 'Ann', 1.50, true, '{\"a\":1}', 'hi')");
    let v1 = wait_json(
        &redis,
        "user:1:profile",
        r#","id":1,"name":"Ann","score":1.50,"active":true,"meta":{"a": 1},"bio":"hi"}"#,
    );
    let t = ttl(&redis, "user:1:profile");
    assert!((1..=300).contains(&t), "ttl {t}");
    support::sync_worker(&pg, &redis, WAIT);
    assert_eq!(
        hash_fields(&redis, "user:1:h", &v1),
        hash(&[("name", "Ann"), ("score", "1.50")])
    );
    assert_eq!(ttl(&redis, "user:1:h"), -1, "no ttl_s: no TTL");

    // An update; then NULLs (JSON null, no hash field).
    pg.psql("UPDATE profiles SET name = 'Bob', score = -2, active = false WHERE id = 1");
    let v2 = wait_json(
        &redis,
        "user:1:profile",
        r#","id":1,"name":"Bob","score":-2,"active":false,"meta":{"a": 1},"bio":"hi"}"#,
    );
    assert!(v2 > v1, "{v2} after {v1}");
    pg.psql("UPDATE profiles SET name = NULL, meta = NULL WHERE id = 1");
    let v3 = wait_json(
        &redis,
        "user:1:profile",
        r#","id":1,"name":null,"score":-2,"active":false,"meta":null,"bio":"hi"}"#,
    );
    support::sync_worker(&pg, &redis, WAIT);
    assert_eq!(
        hash_fields(&redis, "user:1:h", &v3),
        hash(&[("score", "-2")])
    );

    // Two updates of the row in one transaction: the second image.
    pg.psql("BEGIN; UPDATE profiles SET name = 'x1' WHERE id = 1; UPDATE profiles SET name = 'x2' WHERE id = 1; COMMIT");
    let v4 = wait_json(
        &redis,
        "user:1:profile",
        r#","id":1,"name":"x2","score":-2,"active":false,"meta":null,"bio":"hi"}"#,
    );
    support::sync_worker(&pg, &redis, WAIT);
    assert_eq!(
        hash_fields(&redis, "user:1:h", &v4),
        hash(&[("name", "x2"), ("score", "-2")])
    );

    // The row moves (its key column changed): the old keys go, the new ones are set.
    pg.psql("UPDATE profiles SET id = 2 WHERE id = 1");
    let v5 = wait_json(
        &redis,
        "user:2:profile",
        r#","id":2,"name":"x2","score":-2,"active":false,"meta":null,"bio":"hi"}"#,
    );
    support::sync_worker(&pg, &redis, WAIT);
    let mut probe = RedisProbe::new(&redis);
    assert!(!probe.exists("user:1:profile") && !probe.exists("user:1:h"));
    assert_eq!(
        hash_fields(&redis, "user:2:h", &v5),
        hash(&[("name", "x2"), ("score", "-2")])
    );

    // Delete: both keys unlinked.
    pg.psql("DELETE FROM profiles WHERE id = 2");
    probe.wait_gone("user:2:profile", WAIT);
    probe.wait_gone("user:2:h", WAIT);

    // Deleted and inserted again in one transaction: set, not unlinked.
    pg.psql("BEGIN; INSERT INTO profiles (id, name) VALUES (3, 'a'); DELETE FROM profiles WHERE id = 3; INSERT INTO profiles (id, name) VALUES (3, 'b'); COMMIT");
    wait_json(
        &redis,
        "user:3:profile",
        r#","id":3,"name":"b","score":null,"active":null,"meta":null,"bio":null}"#,
    );

    // Inserted and deleted in one transaction: the delete drops the refresh
    // the insert planned in the same batch (the sink sets refreshes after the
    // deletes, so a kept one would cache a row that no longer exists).
    pg.psql("BEGIN; INSERT INTO profiles (id, name) VALUES (4, 'c'); DELETE FROM profiles WHERE id = 4; COMMIT");
    support::sync_worker(&pg, &redis, WAIT);
    assert!(!probe.exists("user:4:profile") && !probe.exists("user:4:h"));

    // A declared invalidation after an update of the same transaction: the
    // later one wins, its key stays unlinked; the other key is refreshed.
    pg.psql(r#"BEGIN; UPDATE profiles SET name = 'd' WHERE id = 3; SELECT pg_logical_emit_message(true, 'cache-invalidator', 'invalidate:v1:{"keys": ["user:3:profile"]}'); COMMIT"#);
    support::sync_worker(&pg, &redis, WAIT);
    assert!(!probe.exists("user:3:profile"));
    assert_eq!(
        hgetall(&redis, "user:3:h").get("name").map(String::as_str),
        Some("d")
    );
    assert_eq!(w.stop(WAIT), Some(0), "{}", w.log());
    assert!(!w.log().contains("could not be rendered"), "{}", w.log());
}

#[test]
fn an_unchanged_toasted_column_unlinks_the_key_and_is_counted() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let port = support::free_port();
    let (_cfg, mut w) = start(&pg, &redis, MAPPING, &support::metrics_toml(port));

    // A bio stored out of line (TOAST): md5 text barely compresses.
    pg.psql("INSERT INTO profiles (id, name, bio) SELECT 1, 'Ann', string_agg(md5(g::text), '') FROM generate_series(1, 400) g");
    support::wait_for("user:1:profile", WAIT, || get(&redis, "user:1:profile"));
    support::sync_worker(&pg, &redis, WAIT);
    // Update another column: pgoutput sends the bio as 'u' (unchanged TOAST).
    pg.psql("UPDATE profiles SET name = 'Bob' WHERE id = 1");
    RedisProbe::new(&redis).wait_gone("user:1:profile", WAIT);
    // The hash does not read the bio: it is refreshed.
    support::wait_for("user:1:h refreshed", WAIT, || {
        (hgetall(&redis, "user:1:h").get("name").map(String::as_str) == Some("Bob")).then_some(())
    });
    support::wait_for("the refresh fallback's log line", WAIT, || {
        support::strip_ansi(&w.log())
            .contains("reason=\"refresh_unknown_value\"")
            .then_some(())
    });
    let log = support::strip_ansi(&w.log());
    assert!(
        log.contains("a refreshed value could not be rendered") && log.contains("column=\"bio\""),
        "{log}"
    );
    assert!(!log.contains("fired the table's truncate"), "{log}");
    // Counted: the profile unlinked once, three keys set (insert: both; update: the hash).
    wait_refreshes(port, "unlinked_fallback", 1.0);
    wait_refreshes(port, "set", 3.0);
    let (_, body) = support::http_get(port, "/metrics").expect("/metrics");
    let count = |name: &str, labels: &[(&str, &str)]| support::metric_sample(&body, name, labels);
    assert_eq!(
        count(
            "cache_invalidator_fallbacks_total",
            &[
                ("table", "public.profiles"),
                ("reason", "refresh_unknown_value")
            ]
        ),
        1.0
    );
    assert_eq!(
        count(
            "cache_invalidator_refreshes_total",
            &[("outcome", "too_large")]
        ),
        0.0
    );
    assert_eq!(w.stop(WAIT), Some(0));
}

#[test]
fn a_replay_after_a_crash_never_leaves_an_older_image() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let port = support::free_port();
    let (cfg, mut w) = start(&pg, &redis, MAPPING, &support::metrics_toml(port));
    pg.psql("INSERT INTO profiles (id, name) VALUES (1, 'v1')");
    wait_json(
        &redis,
        "user:1:profile",
        r#","id":1,"name":"v1","score":null,"active":null,"meta":null,"bio":null}"#,
    );
    support::sync_worker(&pg, &redis, WAIT);
    assert_eq!(w.stop(WAIT), Some(0));

    // Two transactions, applied by a worker that dies before acknowledging.
    pg.psql("UPDATE profiles SET name = 'v2' WHERE id = 1");
    pg.psql("UPDATE profiles SET name = 'v3' WHERE id = 1");
    let newest = r#","id":1,"name":"v3","score":null,"active":null,"meta":null,"bio":null}"#;
    let env = [("CACHE_INVALIDATOR_FAILPOINT", "after_apply_before_ack")];
    for attempt in 0.. {
        assert!(
            attempt < 20,
            "the failpoint never applied the second update"
        );
        let mut crashed = cfg.spawn_worker_with_env(&env);
        support::wait_for("the failpoint abort", WAIT, || crashed.try_exit_code());
        assert!(crashed
            .log()
            .contains("failpoint after_apply_before_ack: aborting"));
        if get(&redis, "user:1:profile").is_some_and(|v| split_json(&v).1 == newest) {
            break;
        }
    }
    let applied = get(&redis, "user:1:profile").expect("applied");

    // The restarted worker receives both again: while it replays them, no
    // reader ever sees v2 (or v1) again.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = Arc::clone(&stop);
        let url = redis.url();
        std::thread::spawn(move || {
            let mut c = redis::Client::open(url)
                .expect("client")
                .get_connection()
                .expect("redis");
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let v: Option<String> = redis::cmd("GET")
                    .arg("user:1:profile")
                    .query(&mut c)
                    .expect("GET");
                if let Some(v) = v {
                    if !seen.contains(&v) {
                        seen.push(v);
                    }
                }
            }
            seen
        })
    };
    let mut w = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.join().expect("watcher");
    assert_eq!(
        seen,
        std::slice::from_ref(&applied),
        "values seen during the replay"
    );
    assert_eq!(get(&redis, "user:1:profile"), Some(applied));
    // The script refused the replayed images (kept what was there).
    let log = support::strip_ansi(&w.log());
    assert!(
        log.lines().any(|l| l.contains("batch applied")
            && !l.contains("refresh_kept=0")
            && l.contains("refresh_kept=")),
        "{log}"
    );
    // And counted as kept, never as set: the restarted worker set nothing.
    let (_, body) = support::http_get(port, "/metrics").expect("/metrics");
    let outcome = |o: &str| {
        support::metric_sample(
            &body,
            "cache_invalidator_refreshes_total",
            &[("outcome", o)],
        )
    };
    assert!(outcome("kept") >= 1.0, "{body}");
    assert_eq!(outcome("set"), 0.0, "{body}");
    assert_eq!(w.stop(WAIT), Some(0));
}

#[test]
fn tombstones_and_guarded_fills_meet_refreshed_values() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let (_cfg, mut w) = start(&pg, &redis, MAPPING, "");
    let mut probe = RedisProbe::new(&redis);

    // A tombstone older than the change is replaced; a newer one is kept.
    probe.set("user:1:profile", &tombstone::marker(Lsn(1)));
    let future = tombstone::marker(Lsn(u64::MAX >> 1));
    probe.set("user:2:profile", &future);
    pg.psql("INSERT INTO profiles (id, name) VALUES (1, 'a'), (2, 'b')");
    wait_json(
        &redis,
        "user:1:profile",
        r#","id":1,"name":"a","score":null,"active":null,"meta":null,"bio":null}"#,
    );
    support::sync_worker(&pg, &redis, WAIT);
    assert_eq!(get(&redis, "user:2:profile"), Some(future));
    assert_eq!(
        hgetall(&redis, "user:2:h").get("name").map(String::as_str),
        Some("b")
    );

    // get_or_fill sees a refreshed key as a hit: no database read.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let refreshed = get(&redis, "user:1:profile").expect("refreshed");
    let got = rt.block_on(async {
        let mut conn = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        cache::get_or_fill(&mut conn, "user:1:profile", 300, "tag:", || async {
            Err::<(String, Vec<String>), std::io::Error>(std::io::Error::other(
                "the loader must not run",
            ))
        })
        .await
    });
    assert_eq!(got.expect("a hit"), refreshed);

    // A fill that missed before the refresh is refused after it: the
    // refreshed (newer) value stays.
    let missed = rt.block_on(async {
        let mut conn = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        cache::lookup(&mut conn, "user:4:profile")
            .await
            .expect("lookup")
    });
    let cache::Lookup::Miss(seen) = missed else {
        panic!("user:4:profile is cached: {missed:?}")
    };
    pg.psql("INSERT INTO profiles (id, name) VALUES (4, 'new')");
    let v = wait_json(
        &redis,
        "user:4:profile",
        r#","id":4,"name":"new","score":null,"active":null,"meta":null,"bio":null}"#,
    );
    let filled = rt.block_on(async {
        let mut conn = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        cache::guarded_fill(
            &mut conn,
            "user:4:profile",
            &seen,
            "{\"name\":\"old\"}",
            300,
            &[],
            "tag:",
        )
        .await
        .expect("fill")
    });
    assert!(!filled, "the stale fill was accepted");
    assert_eq!(
        split_json(&get(&redis, "user:4:profile").expect("value")).0,
        v
    );
    assert_eq!(w.stop(WAIT), Some(0));
}

/// A plan that refreshes `key` (JSON, or a hash when `hash`) at `lsn`.`seq`.
fn refresh_plan(key: &str, lsn: u64, seq: u32, hash: bool) -> cache_invalidator::plan::Plan {
    use cache_invalidator::plan::{Plan, RefreshSet, RefreshValue, RefreshVersion};
    let version = RefreshVersion { lsn: Lsn(lsn), seq };
    let value = if hash {
        RefreshValue::Hash(vec![
            ("_lsn".into(), version.to_string()),
            ("n".into(), format!("{lsn}.{seq}")),
        ])
    } else {
        RefreshValue::Json(format!("{{\"_lsn\":\"{version}\",\"n\":\"{lsn}.{seq}\"}}"))
    };
    let mut plan = Plan::default();
    plan.refresh.insert(
        key.to_owned(),
        RefreshSet {
            value,
            version,
            ttl_s: Some(100),
        },
    );
    plan
}

fn tombstone_plan(key: &str, lsn: u64) -> cache_invalidator::plan::Plan {
    let mut plan = cache_invalidator::plan::Plan::default();
    plan.tombstones.insert(key.to_owned(), Lsn(lsn));
    plan
}

/// What `key` holds, as the scripts see it: the refreshed `n`, a tombstone's
/// LSN, or nothing.
fn state(c: &mut redis::Connection, key: &str) -> String {
    let kind: String = redis::cmd("TYPE").arg(key).query(c).expect("TYPE");
    match kind.as_str() {
        "hash" => {
            let n: String = redis::cmd("HGET").arg(key).arg("n").query(c).expect("HGET");
            format!("value {n}")
        }
        "string" => {
            let v: Vec<u8> = redis::cmd("GET").arg(key).query(c).expect("GET");
            match tombstone::parse(&v) {
                Some(lsn) => format!("tombstone {:X}", lsn.0),
                None => {
                    let v = String::from_utf8_lossy(&v).into_owned();
                    let n = v
                        .split("\"n\":\"")
                        .nth(1)
                        .unwrap_or("?")
                        .trim_end_matches("\"}");
                    format!("value {n}")
                }
            }
        }
        other => other.to_owned(),
    }
}

/// The order rules of REFRESH_SET and the tombstone script on one server,
/// JSON and hash: a newer version or tombstone is kept, an older one replaced,
/// a tie between a tombstone and a value goes to the later command.
#[tokio::test]
async fn refresh_and_tombstone_scripts_order_by_version() {
    let redis = RedisServer::start();
    let mut c = redis.client().get_connection().expect("redis");
    let mut sink = cache_invalidator::sink::RedisSink::connect(&support::sink_options(redis.url()))
        .await
        .expect("sink");
    for (key, hash) in [("j", false), ("h", true)] {
        // Another type at the key, then application data: replaced.
        let _: () = redis::cmd("RPUSH").arg(key).arg("x").query(&mut c).unwrap();
        let s = sink
            .apply(&refresh_plan(key, 0x100, 1, hash))
            .await
            .unwrap();
        assert_eq!((s.refreshed, s.refresh_kept), (1, 0));
        assert_eq!(state(&mut c, key), "value 256.1");
        let ttl: i64 = redis::cmd("TTL").arg(key).query(&mut c).unwrap();
        assert!((1..=100).contains(&ttl), "{key}: ttl {ttl}");
        // Older versions (a replay) and the same version: kept.
        for (lsn, seq) in [(0x100, 0), (0xFF, 9), (0x100, 1)] {
            let s = sink
                .apply(&refresh_plan(key, lsn, seq, hash))
                .await
                .unwrap();
            assert_eq!((s.refreshed, s.refresh_kept), (0, 1), "{key} {lsn:X}.{seq}");
            assert_eq!(state(&mut c, key), "value 256.1");
        }
        // A tombstone of an older commit is not written over the value.
        sink.apply(&tombstone_plan(key, 0xFF)).await.unwrap();
        assert_eq!(state(&mut c, key), "value 256.1");
        // One of the same commit is (the later command wins a tie) ...
        sink.apply(&tombstone_plan(key, 0x100)).await.unwrap();
        assert_eq!(state(&mut c, key), "tombstone 100");
        // ... and a refresh of that commit replaces the tombstone again.
        sink.apply(&refresh_plan(key, 0x100, 2, hash))
            .await
            .unwrap();
        assert_eq!(state(&mut c, key), "value 256.2");
        // A newer tombstone is kept by an older refresh, replaced by a newer one.
        sink.apply(&tombstone_plan(key, 0x200)).await.unwrap();
        assert_eq!(state(&mut c, key), "tombstone 200");
        sink.apply(&refresh_plan(key, 0x1FF, 0, hash))
            .await
            .unwrap();
        assert_eq!(state(&mut c, key), "tombstone 200");
        sink.apply(&refresh_plan(key, 0x201, 0, hash))
            .await
            .unwrap();
        assert_eq!(state(&mut c, key), "value 513.0");
    }
    // The script is reloaded after SCRIPT FLUSH (NOSCRIPT).
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut c).unwrap();
    let s = sink
        .apply(&refresh_plan("j", 0x300, 0, false))
        .await
        .unwrap();
    assert_eq!(s.refreshed, 1);
    assert_eq!(state(&mut c, "j"), "value 768.0");
}

/// The same on a Redis Cluster: one script call per key, any slot.
#[tokio::test]
async fn refresh_works_per_slot_on_a_cluster() {
    let cluster = support::RedisCluster::start();
    let mut sink = cache_invalidator::sink::ClusterSink::connect(
        &cluster.urls(),
        &support::sink_options(cluster.urls()[0].clone()),
    )
    .await
    .expect("cluster sink");
    let mut plan = cache_invalidator::plan::Plan::default();
    for i in 0..50 {
        plan.merge(refresh_plan(
            &format!("user:{i}:profile"),
            0x100,
            0,
            i % 2 == 0,
        ));
    }
    let s = sink.apply(&plan).await.expect("apply");
    assert_eq!((s.refreshed, s.refresh_kept), (50, 0));
    let again = sink.apply(&plan).await.expect("apply again");
    assert_eq!((again.refreshed, again.refresh_kept), (0, 50));
    let mut c = cluster.connection();
    for i in 0..50 {
        let key = format!("user:{i}:profile");
        let v: String = if i % 2 == 0 {
            redis::cmd("HGET")
                .arg(&key)
                .arg("n")
                .query(&mut c)
                .expect("HGET")
        } else {
            let v: String = redis::cmd("GET").arg(&key).query(&mut c).expect("GET");
            v.split("\"n\":\"")
                .nth(1)
                .expect("n")
                .trim_end_matches("\"}")
                .to_owned()
        };
        assert_eq!(v, "256.0", "{key}");
    }
}

/// A running worker streaming into a Redis Cluster: every refreshed key
/// lands with its value on the master that owns its slot (the keys span all
/// three), and update, move and delete leave exactly the new row, as on one
/// server.
#[test]
fn a_worker_refreshes_keys_on_every_master_of_a_cluster() {
    let pg = PgCluster::start();
    let cluster = support::RedisCluster::start();
    let (_cfg, mut w) = start_on(&pg, &cluster.redis_toml(), MAPPING, "");
    let mut c = cluster.connection();
    let log = || w.log();
    support::sync_worker_on_cluster(&pg, &mut c, WAIT, log);
    let get = |c: &mut redis::cluster::ClusterConnection, key: &str| -> Option<String> {
        redis::cmd("GET").arg(key).query(c).expect("GET")
    };
    let hgetall = |c: &mut redis::cluster::ClusterConnection, key: &str| {
        redis::cmd("HGETALL")
            .arg(key)
            .query::<HashMap<String, String>>(c)
            .expect("HGETALL")
    };
    let fields = |id: u32, name: &str, row: u32| {
        format!(
            r#","id":{id},"name":"{name}","score":{row}.5,"active":{},"meta":null,"bio":null}}"#,
            row.is_multiple_of(2)
        )
    };

    // Twelve rows in one transaction: 24 keys over the three masters.
    pg.psql(
        "INSERT INTO profiles (id, name, score, active)
         SELECT g, 'n' || g, g + 0.5, g % 2 = 0 FROM generate_series(1, 12) g",
    );
    let mut versions = Vec::new();
    let mut masters = std::collections::BTreeSet::new();
    for i in 1..=12u32 {
        let key = format!("user:{i}:profile");
        let version = wait_json_with(|| get(&mut c, &key), &key, &fields(i, &format!("n{i}"), i));
        support::sync_worker_on_cluster(&pg, &mut c, WAIT, log);
        let mut h = hgetall(&mut c, &format!("user:{i}:h"));
        assert_eq!(h.remove("_lsn").as_deref(), Some(version.as_str()));
        assert_eq!(
            h,
            hash(&[("name", &format!("n{i}")), ("score", &format!("{i}.5"))])
        );
        for key in [key, format!("user:{i}:h")] {
            // Only the slot's owner holds it (the others answer MOVED).
            let node = cluster.node_of(&key);
            assert!(node.is_some(), "{key} on no master\n{}", log());
            masters.insert(node);
        }
        versions.push(version);
    }
    assert_eq!(masters.len(), 3, "the refreshed keys span every master");
    assert!(versions.windows(2).all(|v| v[0] < v[1]), "{versions:?}");

    // An update, a moved row, a delete.
    pg.psql("UPDATE profiles SET name = 'Ann' WHERE id = 1");
    let v1 = wait_json_with(
        || get(&mut c, "user:1:profile"),
        "user:1:profile",
        &fields(1, "Ann", 1),
    );
    assert!(v1 > versions[11], "{v1} after {}", versions[11]);
    pg.psql("UPDATE profiles SET id = 100 WHERE id = 2");
    wait_json_with(
        || get(&mut c, "user:100:profile"),
        "user:100:profile",
        &fields(100, "n2", 2),
    );
    pg.psql("DELETE FROM profiles WHERE id = 3");
    for key in ["user:2:profile", "user:2:h", "user:3:profile", "user:3:h"] {
        support::wait_gone_on_cluster(&mut c, key, WAIT, log);
    }
    support::sync_worker_on_cluster(&pg, &mut c, WAIT, log);
    assert_eq!(
        hgetall(&mut c, "user:100:h")
            .get("name")
            .map(String::as_str),
        Some("n2")
    );
    assert_eq!(
        hgetall(&mut c, "user:1:h").get("name").map(String::as_str),
        Some("Ann")
    );
    // The rows nothing touched keep their first image.
    for i in 4..=12u32 {
        let v = get(&mut c, &format!("user:{i}:profile")).expect("kept");
        assert_eq!(
            split_json(&v),
            (
                versions[i as usize - 1].clone(),
                fields(i, &format!("n{i}"), i)
            )
        );
    }
    assert_eq!(w.stop(WAIT), Some(0), "{}", w.log());
}
