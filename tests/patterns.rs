//! Pattern passes against real servers (ARCHITECTURE.md, "Patterns"): a pass
//! in flight does not hold up a later transaction's plain keys, and its own
//! transaction is acknowledged only after it; a worker killed during a pass
//! loses nothing; a thousand patterns in one batch delete exactly what each
//! would delete alone, as Redis's own matcher sees it.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use cache_invalidator::map::glob::escape;
use support::{PgCluster, RedisProbe, RedisServer, WorkerConfig};

/// Generous: the machine is shared and has two cores.
const WAIT: Duration = Duration::from_secs(90);

/// `posts`: a plain key and a pattern per row; `items`: a plain key per row.
const POSTS_MAPPING: &str = r#"
[[table]]
name = "posts"
keys = ["post:{id}"]
patterns = ["post:{id}:comments:*"]
"#;
const ITEMS_MAPPING: &str = "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n";

/// Unrelated keys that make a pass long: a pass visits every key.
const FILLER_KEYS: u32 = 1_000_000;

fn lsn(pg: &PgCluster) -> u64 {
    pg.psql("SELECT pg_current_wal_insert_lsn() - '0/0'")
        .trim()
        .parse()
        .expect("lsn")
}

/// The slot's `confirmed_flush_lsn` in bytes (0 when it has none yet).
fn confirmed(pg: &PgCluster) -> u64 {
    pg.confirmed_bytes("cache_invalidator").unwrap_or(0)
}

/// Starts PostgreSQL and Redis, creates `posts` and `items` (rows 1..=3),
/// runs setup, and fills Redis with [`FILLER_KEYS`] unrelated keys.
fn prepare() -> (PgCluster, RedisServer, WorkerConfig) {
    prepare_with(FILLER_KEYS, "")
}

/// [`prepare`] with `filler` unrelated keys and extra `[worker]` lines.
fn prepare_with(filler: u32, worker_lines: &str) -> (PgCluster, RedisServer, WorkerConfig) {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.psql(
        "CREATE TABLE posts (id int PRIMARY KEY, title text);
         CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO posts (id) SELECT g FROM generate_series(1, 3) g;
         INSERT INTO items (id) SELECT g FROM generate_series(1, 3) g;",
    );
    let cfg = WorkerConfig::new(
        &pg,
        &redis,
        &support::with_sync_probe(
            &pg,
            &[("posts.toml", POSTS_MAPPING), ("items.toml", ITEMS_MAPPING)],
        ),
        worker_lines,
    );
    cfg.run_setup(&[]);
    fill(&redis, filler);
    (pg, redis, cfg)
}

/// `n` keys `filler:<i>` (a script in chunks: no DEBUG POPULATE needed).
fn fill(redis: &RedisServer, n: u32) {
    let mut conn = redis.client().get_connection().expect("redis");
    let script = redis::Script::new(
        "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do redis.call('SET', 'filler:' .. i, 'x') end return 0",
    );
    let chunk = 100_000;
    let mut from = 1;
    while from <= n {
        let to = (from + chunk - 1).min(n);
        let _: i64 = script.arg(from).arg(to).invoke(&mut conn).expect("fill");
        from = to + 1;
    }
}

fn comment_keys(post: u32) -> Vec<String> {
    (1..=20)
        .map(|i| format!("post:{post}:comments:{i}"))
        .collect()
}

fn existing(r: &mut RedisProbe, keys: &[String]) -> usize {
    keys.iter().filter(|k| r.exists(k)).count()
}

/// Transaction A updates a post (its pattern needs a pass over a million
/// keys); transaction B, committed right after, updates an item. B's key is
/// deleted while A's pass still runs (A's matches are all still there), and
/// nothing is acknowledged past A until its pass finished.
#[test]
fn a_pass_in_flight_does_not_delay_a_later_plain_key() {
    let (pg, redis, cfg) = prepare();
    let _worker = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);

    let mut r = RedisProbe::new(&redis);
    let comments = comment_keys(1);
    for k in comments
        .iter()
        .chain([&"item:1".to_owned(), &"post:2:comments:1".to_owned()])
    {
        r.set(k, "cached");
    }
    pg.psql("UPDATE posts SET title = 'new' WHERE id = 1");
    let a_end = lsn(&pg);
    pg.psql("UPDATE items SET v = v + 1 WHERE id = 1");
    let b_end = lsn(&pg);

    r.wait_gone("item:1", WAIT);
    // Read the acknowledged position first: if A's matches are still there
    // afterwards, A's pass had not finished when it was read.
    let acked = confirmed(&pg);
    let still = existing(&mut r, &comments);
    assert_eq!(
        still,
        comments.len(),
        "B's plain key was deleted after A's pass ended: the pass was not in flight (or held it up)"
    );
    assert!(
        acked < a_end,
        "acknowledged {acked} past A (ends by {a_end}) while its pass was still running"
    );

    for k in &comments {
        r.wait_gone(k, WAIT);
    }
    pg.wait_confirmed(
        &format!("{:X}/{:X}", b_end >> 32, b_end & 0xffff_ffff),
        WAIT,
    );
    support::sync_worker(&pg, &redis, WAIT);
    assert!(
        r.exists("post:2:comments:1"),
        "another post's comments were deleted"
    );
    assert!(r.exists("filler:1") && r.exists(&format!("filler:{FILLER_KEYS}")));
}

/// `[worker] pattern_scan_count` is what the pass asks SCAN for: over
/// 20,000 keys, COUNT 100 takes about 200 calls where the default (1,000)
/// takes about 20 (Redis's `INFO commandstats` counts them).
#[test]
fn pattern_scan_count_sets_the_keys_per_scan_call() {
    const KEYS: u32 = 20_000;
    let (pg, redis, cfg) = prepare_with(KEYS, "pattern_scan_count = 100");
    let _worker = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);
    let mut r = RedisProbe::new(&redis);
    let comments = comment_keys(1);
    for k in &comments {
        r.set(k, "cached");
    }
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query(&mut r.0)
        .expect("CONFIG RESETSTAT");
    pg.psql("UPDATE posts SET title = 'new' WHERE id = 1");
    for k in &comments {
        r.wait_gone(k, WAIT);
    }
    support::sync_worker(&pg, &redis, WAIT);
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut r.0)
        .expect("INFO commandstats");
    let calls: u32 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_scan:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no SCAN in INFO commandstats:\n{stats}"));
    assert!(
        calls >= KEYS / 100 * 3 / 4,
        "{calls} SCAN calls over {KEYS} keys: COUNT 100 was not used"
    );
    assert!(r.exists("filler:1") && r.exists(&format!("filler:{KEYS}")));
}

/// A worker killed in the middle of a pass (the `in_pattern_pass` failpoint,
/// after SCAN returned keys and before the matches were deleted) leaves the
/// transaction unacknowledged; the next worker receives it again and its
/// pass runs again.
#[test]
fn a_worker_killed_during_a_pass_loses_nothing() {
    let (pg, redis, cfg) = prepare();
    {
        let mut first = cfg.spawn_worker();
        support::sync_worker(&pg, &redis, WAIT);
        assert_eq!(first.stop(WAIT), Some(0), "{}", first.log());
    }
    let mut r = RedisProbe::new(&redis);
    let comments = comment_keys(3);
    for k in &comments {
        r.set(k, "cached");
    }
    let before = lsn(&pg);
    pg.psql("UPDATE posts SET title = 'new' WHERE id = 3");

    let mut crashed =
        cfg.spawn_worker_with_env(&[("CACHE_INVALIDATOR_FAILPOINT", "in_pattern_pass")]);
    support::wait_for("the failpoint abort", WAIT, || crashed.try_exit_code());
    assert!(
        crashed
            .log()
            .contains("failpoint in_pattern_pass: aborting"),
        "{}",
        crashed.log()
    );
    assert!(
        confirmed(&pg) <= before,
        "the transaction of the interrupted pass was acknowledged"
    );
    assert_eq!(
        existing(&mut r, &comments),
        comments.len(),
        "the interrupted pass deleted matches before the failpoint"
    );

    let _worker = cfg.spawn_worker();
    for k in &comments {
        r.wait_gone(k, WAIT);
    }
    support::sync_worker(&pg, &redis, WAIT);
    assert!(r.exists("filler:1"));
}

/// A name of 1 to `max` characters of `alphabet`.
fn word(rng: &mut support::Rng, alphabet: &[u8], max: u64) -> String {
    let len = 1 + rng.below(max);
    (0..len)
        .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize] as char)
        .collect()
}

/// One transaction updates 1,000 rows of a table whose rule has the pattern
/// `doc:{name}:*`, names full of glob characters: the worker's single pass
/// deletes exactly the union of what Redis's own `KEYS <pattern>` finds for
/// each escaped pattern alone, and no other key.
#[test]
fn a_thousand_patterns_in_one_batch_delete_what_each_would_alone() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.psql("CREATE TABLE docs (name text PRIMARY KEY, v int NOT NULL DEFAULT 0)");
    let mapping = "[[table]]\nname = \"docs\"\npatterns = [\"doc:{name}:*\"]\n";
    let cfg = WorkerConfig::new(
        &pg,
        &redis,
        &support::with_sync_probe(&pg, &[("docs.toml", mapping)]),
        "",
    );
    cfg.run_setup(&[]);

    let alphabet = b"ab:*?[]\\^-1";
    let mut rng = support::Rng(17);
    let mut names = BTreeSet::new();
    while names.len() < 1000 {
        names.insert(word(&mut rng, alphabet, 6));
    }
    let values: Vec<String> = names
        .iter()
        .map(|n| format!("('{}')", n.replace('\'', "''")))
        .collect();
    pg.psql(&format!(
        "INSERT INTO docs (name) VALUES {}",
        values.join(",")
    ));
    let _worker = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);

    // Keys under each name, near misses, and random keys under `doc:`.
    let mut keys = BTreeSet::new();
    for n in &names {
        keys.insert(format!("doc:{n}:1"));
        keys.insert(format!("doc:{n}:"));
        keys.insert(format!("doc:{n}"));
        keys.insert(format!("doc:{n}x:1"));
    }
    for _ in 0..3000 {
        keys.insert(format!("doc:{}", word(&mut rng, alphabet, 9)));
        keys.insert(word(&mut rng, alphabet, 9));
    }
    let mut conn = redis.client().get_connection().expect("redis");
    for chunk in keys.iter().collect::<Vec<_>>().chunks(500) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("SET").arg(k.as_str()).arg("v").ignore();
        }
        let _: () = pipe.query(&mut conn).expect("set keys");
    }
    // What each pattern alone deletes, by Redis's own matcher.
    let mut expected_gone = BTreeSet::new();
    for n in &names {
        let pattern = format!("doc:{}:*", escape(n));
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query(&mut conn)
            .expect("KEYS");
        expected_gone.extend(found);
    }
    assert!(
        expected_gone.len() >= names.len(),
        "every name has a matching key"
    );

    pg.psql("UPDATE docs SET v = v + 1");
    support::sync_worker(&pg, &redis, WAIT);

    let mut left: BTreeSet<String> = redis::cmd("KEYS")
        .arg("*")
        .query::<Vec<String>>(&mut conn)
        .expect("KEYS")
        .into_iter()
        .collect();
    left.retain(|k| !k.starts_with("cache-invalidator:"));
    let expected_left: BTreeSet<String> = keys.difference(&expected_gone).cloned().collect();
    let wrongly_deleted: Vec<_> = expected_left.difference(&left).collect();
    let wrongly_kept: Vec<_> = left.intersection(&expected_gone).collect();
    assert!(
        wrongly_deleted.is_empty() && wrongly_kept.is_empty(),
        "deleted though no pattern matches: {wrongly_deleted:?}\nkept though a pattern matches: {wrongly_kept:?}"
    );
}
