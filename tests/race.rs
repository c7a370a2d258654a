//! The stale-set race (issue 11) against real servers: the tombstone and tag
//! tombstone scripts, the guarded fill and versioned read scripts (from Rust
//! and from Python), and a deterministic reproduction of the race through the
//! worker: plain UNLINK leaves the stale entry, a guarded fill and a versioned
//! fill do not.

mod support;

use std::process::Command;
use std::time::Duration;

use cache_invalidator::cache::{self, tombstone, Lookup, Seen, VersionedCache};
use cache_invalidator::lsn::Lsn;
use cache_invalidator::plan::Plan;
use cache_invalidator::sink::{RedisSink, SinkOptions};
use redis::Commands;
use support::{PgCluster, RedisProbe, RedisServer};

const WAIT: Duration = Duration::from_secs(20);

fn options(redis: &RedisServer) -> SinkOptions {
    support::sink_options(redis.url())
}

/// A blocking connection (setup, checks) and an async one (the code under test).
async fn connections(
    redis: &RedisServer,
) -> (redis::Connection, redis::aio::MultiplexedConnection) {
    let async_conn = redis.async_connection().await;
    (redis.client().get_connection().unwrap(), async_conn)
}

/// User `id`'s profile through `vc`: the version and the cached data.
async fn profile(
    vc: &VersionedCache,
    a: &mut redis::aio::MultiplexedConnection,
    id: &str,
) -> (i64, Option<String>) {
    vc.get_versioned(a, "user", id, "profile").await.unwrap()
}

fn tombstones(keys: &[(&str, u64)], tags: &[(&str, u64)]) -> Plan {
    let mut plan = Plan::default();
    for (k, lsn) in keys {
        plan.tombstones.insert((*k).to_owned(), Lsn(*lsn));
    }
    for (t, lsn) in tags {
        plan.tombstone_tags.insert((*t).to_owned(), Lsn(*lsn));
    }
    plan
}

#[test]
fn tombstone_format_is_documented_and_round_trips() {
    let m = tombstone::marker(Lsn(0x16_B374_D848));
    assert_eq!(m, "\0cache-invalidator:tombstone:00000016B374D848");
    assert_eq!(m.len(), 45);
    assert!(tombstone::is_tombstone(m.as_bytes()));
    assert_eq!(tombstone::parse(m.as_bytes()), Some(Lsn(0x16_B374_D848)));
    assert!(!tombstone::is_tombstone(b"cache-invalidator:tombstone:0"));
    assert_eq!(tombstone::parse(b"\0cache-invalidator:tombstone:12"), None);
}

#[tokio::test]
async fn tombstone_script_orders_by_lsn_sets_px_and_replaces_values() {
    let redis = RedisServer::start();
    let mut c = redis.client().get_connection().unwrap();
    let mut sink = RedisSink::connect(&options(&redis)).await.unwrap();
    sink.tune(&cache_invalidator::sink::SinkTuning {
        tombstone_hold: Duration::from_millis(5000),
        ..Default::default()
    });
    let _: () = c.set("value", "cached").unwrap();
    let _: () = c.hset("hash", "f", "v").unwrap();

    let stats = sink
        .apply(&tombstones(
            &[("value", 0x20), ("hash", 0x20), ("absent", 0x20)],
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(stats.tombstones, 3);
    for key in ["value", "hash", "absent"] {
        let v: String = c.get(key).unwrap();
        assert_eq!(v, tombstone::marker(Lsn(0x20)), "{key}");
        let pttl: i64 = c.pttl(key).unwrap();
        assert!(pttl > 0 && pttl <= 5000, "{key}: PTTL {pttl}");
    }

    // Older never replaces newer (a retried or late batch), equal is kept.
    sink.apply(&tombstones(&[("value", 0x1F)], &[]))
        .await
        .unwrap();
    let v: String = c.get("value").unwrap();
    assert_eq!(v, tombstone::marker(Lsn(0x20)));
    // Newer replaces older; the high half of the LSN counts.
    sink.apply(&tombstones(&[("value", 0x1_0000_0000)], &[]))
        .await
        .unwrap();
    let v: String = c.get("value").unwrap();
    assert_eq!(v, tombstone::marker(Lsn(0x1_0000_0000)));
    sink.apply(&tombstones(&[("value", 0xFFFF_FFFF)], &[]))
        .await
        .unwrap();
    let v: String = c.get("value").unwrap();
    assert_eq!(v, tombstone::marker(Lsn(0x1_0000_0000)));

    // NOSCRIPT (scripts flushed) reloads and redoes.
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut c).unwrap();
    sink.apply(&tombstones(&[("value", 0x2_0000_0000)], &[("tag:t", 1)]))
        .await
        .unwrap();
    let v: String = c.get("value").unwrap();
    assert_eq!(v, tombstone::marker(Lsn(0x2_0000_0000)));
}

#[tokio::test]
async fn tag_tombstone_marks_every_member_and_keeps_them() {
    let redis = RedisServer::start();
    let mut c = redis.client().get_connection().unwrap();
    let mut sink = RedisSink::connect(&options(&redis)).await.unwrap();
    // More members than one SSCAN step.
    let members: Vec<String> = (0..2500).map(|i| format!("team:{i}:members")).collect();
    for m in &members {
        let _: () = c.set(m, "x").unwrap();
    }
    let _: () = c.sadd("tag:user:1", &members).unwrap();
    let newer = "team:7:members";
    let _: () = c.set(newer, tombstone::marker(Lsn(0x99))).unwrap();
    let _: () = c.set("control", "x").unwrap();

    let stats = sink
        .apply(&tombstones(&[], &[("tag:user:1", 0x50)]))
        .await
        .unwrap();
    assert!(stats.tombstone_members >= 2500, "{stats:?}");
    for m in &members {
        let v: String = c.get(m).unwrap();
        let want = if m == newer { 0x99 } else { 0x50 };
        assert_eq!(v, tombstone::marker(Lsn(want)), "{m}");
    }
    let n: usize = c.scard("tag:user:1").unwrap();
    assert_eq!(n, 2500, "tombstoned members stay in the set");
    let v: String = c.get("control").unwrap();
    assert_eq!(v, "x");

    // A key of the wrong type under the tag prefix is unlinked, counted.
    let _: () = c.set("tag:broken", "x").unwrap();
    let stats = sink
        .apply(&tombstones(&[], &[("tag:broken", 1)]))
        .await
        .unwrap();
    assert_eq!(stats.repaired, 1);
    assert!(!c.exists::<_, bool>("tag:broken").unwrap());
}

#[tokio::test]
async fn guarded_fill_sets_only_over_what_the_miss_saw() {
    let redis = RedisServer::start();
    let (mut c, mut a) = connections(&redis).await;

    // Absent: SET NX semantics, with tags and a tag TTL.
    let seen = match cache::lookup(&mut a, "k").await.unwrap() {
        Lookup::Miss(s) => s,
        Lookup::Hit(v) => panic!("hit {v}"),
    };
    assert_eq!(seen, Seen::Absent);
    assert!(
        cache::guarded_fill(&mut a, "k", &seen, "v1", 300, &["user:1"], "tag:")
            .await
            .unwrap()
    );
    let members: Vec<String> = c.smembers("tag:user:1").unwrap();
    assert_eq!(members, ["k"]);
    let ttl: i64 = c.ttl("tag:user:1").unwrap();
    assert!(ttl > 300, "tag set TTL {ttl}");
    // Absent remembered, something there now: refused.
    assert!(
        !cache::guarded_fill(&mut a, "k", &Seen::Absent, "v2", 300, &[], "tag:")
            .await
            .unwrap()
    );
    assert_eq!(
        cache::lookup(&mut a, "k").await.unwrap(),
        Lookup::Hit("v1".into())
    );

    // A tombstone remembered: fills over exactly that one, not a newer one.
    let t1 = tombstone::marker(Lsn(1));
    let _: () = c.set("k", &t1).unwrap();
    let seen = match cache::lookup(&mut a, "k").await.unwrap() {
        Lookup::Miss(s) => s,
        Lookup::Hit(v) => panic!("a tombstone read as a hit: {v:?}"),
    };
    assert_eq!(seen, Seen::Tombstone(t1.clone()));
    let _: () = c.set("k", tombstone::marker(Lsn(2))).unwrap();
    assert!(
        !cache::guarded_fill(&mut a, "k", &seen, "stale", 300, &[], "tag:")
            .await
            .unwrap()
    );
    let _: () = c.set("k", &t1).unwrap();
    assert!(
        cache::guarded_fill(&mut a, "k", &seen, "fresh", 300, &[], "tag:")
            .await
            .unwrap()
    );
    let ttl: i64 = c.ttl("k").unwrap();
    assert!(ttl > 0 && ttl <= 300);

    // Values that look like tombstones are never cached.
    assert!(
        cache::guarded_fill(&mut a, "x", &Seen::Absent, &t1, 300, &[], "tag:")
            .await
            .is_err()
    );

    // get_or_fill: the loader runs on a miss only.
    let v = cache::get_or_fill(&mut a, "g", 300, "tag:", || async {
        Ok::<_, std::io::Error>(("loaded".to_string(), vec!["user:9".to_string()]))
    })
    .await
    .unwrap();
    assert_eq!(v, "loaded");
    let v = cache::get_or_fill(&mut a, "g", 300, "tag:", || async {
        Err::<(String, Vec<String>), _>(std::io::Error::other("must not load on a hit"))
    })
    .await
    .unwrap();
    assert_eq!(v, "loaded");
    assert!(c.sismember::<_, _, bool>("tag:user:9", "g").unwrap());
}

#[tokio::test]
async fn versioned_get_reads_version_and_data_in_one_script() {
    let redis = RedisServer::start();
    let (mut c, mut a) = connections(&redis).await;
    let vc = VersionedCache::new("version:");
    assert_eq!(profile(&vc, &mut a, "1").await, (1, None));
    vc.fill(&mut a, "user", "1", "profile", 1, "p1", 300)
        .await
        .unwrap();
    assert_eq!(profile(&vc, &mut a, "1").await, (1, Some("p1".into())));
    let _: () = c.set("version:user:1", 2).unwrap();
    assert_eq!(profile(&vc, &mut a, "1").await, (2, None));
    let zero = VersionedCache::new("version:").missing_version(0);
    assert_eq!(profile(&zero, &mut a, "2").await, (0, None));
    let v = vc
        .get_or_fill(&mut a, "user", "1", "profile", 300, || async {
            Ok::<_, std::io::Error>("p2".to_string())
        })
        .await
        .unwrap();
    assert_eq!(v, "p2");
    let stored: String = c.get("user:1:v2:profile").unwrap();
    assert_eq!(stored, "p2");
}

/// `VersionedCache::set` caches under the version current at the call and
/// makes the version key outlive the data (TTL raised to the data's plus the
/// margin), like `fill` with that version.
#[tokio::test]
async fn set_caches_under_the_current_version_and_keeps_the_version_key_longer() {
    let redis = RedisServer::start();
    let (mut c, mut a) = connections(&redis).await;
    let vc = VersionedCache::new("version:");
    let _: () = c.set_ex("version:user:1", 3, 10).unwrap();
    vc.set(&mut a, "user", "1", "profile", "p3", 300)
        .await
        .unwrap();
    assert_eq!(profile(&vc, &mut a, "1").await, (3, Some("p3".into())));
    let data_ttl: i64 = c.ttl("user:1:v3:profile").unwrap();
    let version_ttl: i64 = c.ttl("version:user:1").unwrap();
    assert!((290..=300).contains(&data_ttl), "data TTL {data_ttl}");
    assert!(
        version_ttl > 300 && version_ttl <= 300 + cache::TTL_MARGIN_SECS as i64,
        "version TTL {version_ttl}"
    );
}

/// The scripts under `scripts/` from redis-py. Needs `python3` with redis-py
/// (`pip install redis`); fails loudly without it rather than skipping.
#[test]
fn scripts_work_from_python_redis_py() {
    let redis = RedisServer::start();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/test_scripts.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(redis.port().to_string())
        .output()
        .expect("python3 is needed for the redis-py script tests");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tests/python/test_scripts.py failed (redis-py missing? `pip install redis`):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ok"), "{stdout}");
}

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)";
const MAPPING: &str = r#"
[[table]]
name = "items"
keys = ["plain:{id}"]
versions = ["item:{id}"]

[[table]]
name = "items"
keys = ["guarded:{id}"]
tags = ["item:{id}"]
mode = "tombstone"
"#;

/// What the database holds for item 1, as a reader reads it.
fn read_row(pg: &PgCluster) -> String {
    pg.psql("SELECT v FROM items WHERE id = 1")
}

/// Reproduces the stale-set race step by step: readers miss and read the
/// database (old row), a writer commits, the worker invalidates, then the
/// readers fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_set_race_unlink_is_stale_guarded_and_versioned_fills_are_not() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.psql(ITEMS);
    pg.psql("INSERT INTO items VALUES (1, 1)");
    let (_cfg, _worker) = support::running_worker(
        &pg,
        &redis,
        &[("items.toml", MAPPING)],
        "tombstone_ms = 10000",
        &[],
        WAIT,
    );

    let mut probe = RedisProbe::new(&redis);
    let mut a = redis.async_connection().await;
    let vc = VersionedCache::new("version:");

    // 1. The readers miss and read the database before the commit.
    assert_eq!(probe.get("plain:1"), None);
    let Lookup::Miss(guarded_seen) = cache::lookup(&mut a, "guarded:1").await.unwrap() else {
        panic!("guarded:1 should miss");
    };
    assert_eq!(guarded_seen, Seen::Absent);
    let (version_seen, data) = vc.get_versioned(&mut a, "item", "1", "data").await.unwrap();
    assert_eq!((version_seen, data), (1, None));
    let old = read_row(&pg);
    assert_eq!(old, "1");

    // 2. A writer commits; the worker invalidates.
    pg.psql("UPDATE items SET v = 2 WHERE id = 1");
    support::sync_worker(&pg, &redis, WAIT);

    // 3. The readers fill what they read.
    probe.set("plain:1", &old);
    let filled = cache::guarded_fill(&mut a, "guarded:1", &guarded_seen, &old, 300, &[], "tag:")
        .await
        .unwrap();
    vc.fill(&mut a, "item", "1", "data", version_seen, &old, 300)
        .await
        .unwrap();

    // Plain UNLINK: the stale entry stays (until its TTL).
    assert_eq!(read_row(&pg), "2");
    assert_eq!(
        probe.get("plain:1").as_deref(),
        Some("1"),
        "the race reproduces: plain UNLINK leaves the stale value"
    );
    // Tombstone + guarded fill: refused, the key holds the commit's tombstone.
    assert!(!filled, "the stale guarded fill was accepted");
    let t: Vec<u8> = redis::cmd("GET")
        .arg("guarded:1")
        .query_async(&mut a)
        .await
        .unwrap();
    let lsn = tombstone::parse(&t).expect("guarded:1 holds a tombstone");
    assert!(lsn > Lsn::ZERO);
    // Versions: the fill landed under the old version; readers reading the
    // version first miss.
    assert_eq!(probe.get("item:1:v1:data").as_deref(), Some("1"));
    assert_eq!(
        vc.get_versioned(&mut a, "item", "1", "data").await.unwrap(),
        (2, None)
    );

    // 4. The same race when the reader saw a tombstone at its miss, through
    // get_or_fill's pieces, with a tag: refused again, the newer tombstone stays.
    let Lookup::Miss(seen) = cache::lookup(&mut a, "guarded:1").await.unwrap() else {
        panic!("a tombstone must read as a miss");
    };
    let mid = read_row(&pg);
    pg.psql("UPDATE items SET v = 3 WHERE id = 1");
    support::sync_worker(&pg, &redis, WAIT);
    assert!(
        !cache::guarded_fill(&mut a, "guarded:1", &seen, &mid, 300, &[], "tag:")
            .await
            .unwrap()
    );
    let t2: Vec<u8> = redis::cmd("GET")
        .arg("guarded:1")
        .query_async(&mut a)
        .await
        .unwrap();
    assert!(tombstone::parse(&t2).expect("tombstone") > lsn);

    // A fill without a race lands, and its tag membership with it; the next
    // commit tombstones the tagged key and keeps it tracked.
    let v = cache::get_or_fill(&mut a, "guarded:1", 300, "tag:", || async {
        Ok::<_, std::io::Error>((read_row(&pg), vec![]))
    })
    .await
    .unwrap();
    assert_eq!(v, "3");
    assert_eq!(probe.get("guarded:1").as_deref(), Some("3"));
    let list = cache::get_or_fill(&mut a, "items:list", 300, "tag:", || async {
        Ok::<_, std::io::Error>(("[1]".to_string(), vec!["item:1".to_string()]))
    })
    .await
    .unwrap();
    assert_eq!(list, "[1]");
    pg.psql("UPDATE items SET v = 4 WHERE id = 1");
    support::sync_worker(&pg, &redis, WAIT);
    for key in ["guarded:1", "items:list"] {
        let t: Vec<u8> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut a)
            .await
            .unwrap();
        assert!(tombstone::is_tombstone(&t), "{key} is not a tombstone");
    }
    assert!(redis::cmd("SISMEMBER")
        .arg("tag:item:1")
        .arg("items:list")
        .query_async::<bool>(&mut a)
        .await
        .unwrap());
}
