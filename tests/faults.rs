//! Fault injection against real servers: every delivery guarantee of
//! ARCHITECTURE.md, proven by killing, pausing, restarting and corrupting things
//! while transactions commit.
//!
//! Every test asserts the final Redis state key by key, that control keys no
//! mapping derives (and mapped keys of rows nobody changed) survive, and how
//! many flush markers, identity flushes and fallbacks fired, counted from the
//! worker logs: a worker that flushed on every start would fail them all.

mod support;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::{
    PgCluster, PgOptions, RedisProbe, RedisServer, WorkerConfig, WorkerProcess, SYNC_PROBE_MAPPING,
    SYNC_PROBE_TABLE,
};

/// Generous: the machine is shared and has two cores.
const WAIT: Duration = Duration::from_secs(60);

/// Log lines counted by [`Tally`].
const MARKER: &str = "flush marker: firing";
const FLUSHED: &str = "flushed every mapped table";
const FALLBACK: &str = "a value needed by a mapping was unknown";
const RESUMING: &str = "replication stopped; resuming from the slot";

/// `items` rows: `item:<id>`; rows above [`CONTROL_BASE`] are never changed,
/// so their keys must survive every scenario without a flush.
const ITEMS_MAPPING: &str = "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n";
const CONTROL_BASE: u32 = 1_000_000;
const CONTROL_ROWS: u32 = 10;

// ---------------------------------------------------------------------------
// helpers

/// Runs a script through psql's stdin: every statement its own transaction.
fn psql_script(pg: &PgCluster, script: &str) -> Result<String, String> {
    let mut child = pg
        .psql_command()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs a script through psql in the background (each statement its own transaction).
fn spawn_psql(pg: &PgCluster, script: &str) -> std::process::Child {
    let mut child = pg
        .psql_command()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("psql");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(script.as_bytes()).expect("write script");
    drop(stdin);
    child
}

/// `pg_current_wal_insert_lsn()` in bytes: past every record inserted so far
/// (`pg_current_wal_lsn()`, the write position, can trail a commit record
/// under `synchronous_commit = off`).
fn wal_lsn(pg: &PgCluster) -> u64 {
    pg.psql("SELECT pg_current_wal_insert_lsn() - '0/0'")
        .parse()
        .expect("lsn")
}

/// The slot's `confirmed_flush_lsn` in bytes (None: no slot).
fn confirmed(pg: &PgCluster) -> Option<u64> {
    pg.confirmed_bytes("cache_invalidator")
}

/// Waits until the slot confirmed `lsn`.
fn wait_confirmed(pg: &PgCluster, lsn: u64, timeout: Duration) {
    support::wait_for(&format!("confirmed_flush_lsn >= {lsn}"), timeout, || {
        confirmed(pg).filter(|c| *c >= lsn).map(|_| ())
    });
}

/// Waits until the worker applied AND acknowledged everything committed so far.
fn sync_acked(pg: &PgCluster, redis: &RedisServer) {
    let before = wal_lsn(pg);
    support::sync_worker(pg, redis, WAIT);
    wait_confirmed(pg, before, WAIT);
}

fn item_keys(ids: impl IntoIterator<Item = u32>) -> Vec<String> {
    ids.into_iter().map(|i| format!("item:{i}")).collect()
}

fn control_keys() -> Vec<String> {
    let mut keys = item_keys(CONTROL_BASE + 1..=CONTROL_BASE + CONTROL_ROWS);
    keys.extend(["control:a", "control:b", "control:c"].map(String::from));
    keys
}

/// SET every key (pipelined).
fn set_keys(redis: &RedisServer, keys: &[String], value: &str) {
    let mut conn = redis.client().get_connection().expect("redis");
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("SET").arg(k).arg(value).ignore();
        }
        let _: () = pipe.query(&mut conn).expect("SET pipeline");
    }
}

/// The keys of `keys` that exist.
fn existing(redis: &RedisServer, keys: &[String]) -> Vec<String> {
    let mut conn = redis.client().get_connection().expect("redis");
    let mut out = Vec::new();
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("EXISTS").arg(k);
        }
        let found: Vec<i64> = pipe.query(&mut conn).expect("EXISTS pipeline");
        out.extend(
            chunk
                .iter()
                .zip(found)
                .filter(|(_, n)| *n == 1)
                .map(|(k, _)| k.clone()),
        );
    }
    out
}

fn wait_all_gone(redis: &RedisServer, keys: &[String], timeout: Duration, logs: &Tally) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = existing(redis, keys);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} keys never deleted, e.g. {:?}\n{}",
            left.len(),
            keys.len(),
            &left[..left.len().min(5)],
            logs.tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_all_present(redis: &RedisServer, keys: &[String], logs: &Tally) {
    let present = existing(redis, keys);
    let missing: Vec<&String> = keys.iter().filter(|k| !present.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "control keys deleted: {missing:?}\n{}",
        logs.tail()
    );
}

/// Every worker process of a test, for their logs.
#[derive(Default)]
struct Tally(Vec<WorkerProcess>);

impl Tally {
    fn add(&mut self, w: WorkerProcess) -> &mut WorkerProcess {
        self.0.push(w);
        self.0.last_mut().expect("just pushed")
    }

    fn last(&mut self) -> &mut WorkerProcess {
        self.0.last_mut().expect("a worker")
    }

    fn count(&self, needle: &str) -> usize {
        self.0.iter().map(|w| w.log().matches(needle).count()).sum()
    }

    /// The end of every log, for assertion messages.
    fn tail(&self) -> String {
        let mut s = String::new();
        for (i, w) in self.0.iter().enumerate() {
            let log = w.log();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| !l.contains("batch applied"))
                .collect();
            let from = lines.len().saturating_sub(40);
            s.push_str(&format!(
                "--- worker {i} ---\n{}\n",
                lines[from..].join("\n")
            ));
        }
        s
    }

    /// Exactly these many flush markers, identity flushes and fallbacks fired.
    fn assert_counts(&self, markers: usize, flushes: usize, fallbacks: usize) {
        let got = (
            self.count(MARKER),
            self.count(FLUSHED),
            self.count(FALLBACK),
        );
        assert_eq!(
            got,
            (markers, flushes, fallbacks),
            "(flush markers, identity flushes, fallbacks)\n{}",
            self.tail()
        );
    }
}

/// Creates `items` (rows 1..=rows plus the control rows) and the sync probe,
/// writes the config, runs `setup --replica-identity-full`.
fn prepare(
    pg: &PgCluster,
    redis: &RedisServer,
    rows: u32,
    mappings: &[(&str, &str)],
    extra_sql: &str,
) -> WorkerConfig {
    pg.psql(SYNC_PROBE_TABLE);
    pg.psql(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (id) SELECT g FROM generate_series(1, {rows}) g;
         INSERT INTO items (id) SELECT g FROM generate_series({}, {}) g;",
        CONTROL_BASE + 1,
        CONTROL_BASE + CONTROL_ROWS
    ));
    if !extra_sql.is_empty() {
        psql_script(pg, extra_sql).expect("extra SQL");
    }
    let mut all = vec![
        ("items.toml", ITEMS_MAPPING),
        ("zz_sync.toml", SYNC_PROBE_MAPPING),
    ];
    all.extend_from_slice(mappings);
    let cfg = WorkerConfig::new(pg, redis, &all, "");
    let (code, out, err) = cfg.command(&["setup", "--replica-identity-full"]);
    assert_eq!(code, 0, "setup failed:\n{out}\n{err}");
    cfg
}

/// Starts the first worker, lets it fire setup's flush marker, applies and
/// acknowledges everything, then sets the control keys.
/// [`prepare`], then [`first_worker`]: the servers ready, a worker
/// streaming and the control keys set; the worker's log is the tally's first.
fn start(
    pg: &PgCluster,
    redis: &RedisServer,
    rows: u32,
    mappings: &[(&str, &str)],
    extra_sql: &str,
) -> (WorkerConfig, Tally) {
    let cfg = prepare(pg, redis, rows, mappings, extra_sql);
    let mut logs = Tally::default();
    first_worker(pg, redis, &cfg, &mut logs);
    (cfg, logs)
}

fn first_worker(pg: &PgCluster, redis: &RedisServer, cfg: &WorkerConfig, logs: &mut Tally) {
    let w = logs.add(cfg.spawn_worker());
    w.wait_log(MARKER, WAIT);
    sync_acked(pg, redis);
    set_keys(redis, &control_keys(), "control");
}

/// `UPDATE items` of ids `from..to` (exclusive), `per_tx` rows per transaction,
/// with an optional pause between transactions.
fn update_script(from: u32, to: u32, per_tx: u32, pause_s: f64) -> String {
    let mut s = String::new();
    let mut a = from;
    while a < to {
        let b = (a + per_tx).min(to);
        s.push_str(&format!(
            "UPDATE items SET v = v + 1 WHERE id >= {a} AND id < {b};\n"
        ));
        if pause_s > 0.0 {
            s.push_str(&format!("SELECT pg_sleep({pause_s});\n"));
        }
        a = b;
    }
    s
}

// ---------------------------------------------------------------------------
// crashes

/// Guarantee 2: SIGKILL at random moments loses nothing. 5,000 distinct rows
/// updated in 250 transactions while the worker is killed 12 times.
#[test]
fn crash_loop_loses_no_invalidation() {
    const N: u32 = 5_000;
    const KILLS: usize = 12;
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let (cfg, mut logs) = start(&pg, &redis, N, &[], "");
    let keys = item_keys(1..=N);
    set_keys(&redis, &keys, "cached");

    let mut writer = spawn_psql(&pg, &update_script(1, N + 1, 20, 0.03));

    let mut rng = support::Rng::from_time();
    let mut kills = 0;
    logs.last().kill();
    kills += 1;
    loop {
        let writer_done = writer.try_wait().expect("writer").is_some();
        if kills >= KILLS && writer_done {
            break;
        }
        logs.add(cfg.spawn_worker());
        std::thread::sleep(Duration::from_millis(150 + rng.below(1200)));
        logs.last().kill();
        kills += 1;
    }
    assert!(writer.wait().expect("writer").success());

    // Drain with a fresh worker.
    logs.add(cfg.spawn_worker());
    support::sync_worker(&pg, &redis, WAIT);
    wait_all_gone(&redis, &keys, WAIT, &logs);
    assert_all_present(&redis, &control_keys(), &logs);
    // The only marker is setup's, fired and acknowledged before the first kill.
    logs.assert_counts(1, 0, 0);
    eprintln!("{kills} kills");
}

/// The crash between the Redis apply and the acknowledgement: the transaction
/// was applied but not confirmed, so PostgreSQL sends it again and it is
/// applied again (its key, cached again in between, is deleted again).
#[test]
fn crash_between_apply_and_ack_reapplies_the_transaction() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let (cfg, mut logs) = start(&pg, &redis, 10, &[], "");
    assert_eq!(logs.last().stop(WAIT), Some(0), "{}", logs.tail());

    let mut r = RedisProbe::new(&redis);
    r.set("item:1", "cached");
    let before = wal_lsn(&pg);
    pg.psql("UPDATE items SET v = v + 1 WHERE id = 1");
    let end = wal_lsn(&pg);

    // The failpoint aborts after the first applied batch; that may be an idle
    // keepalive, so start again until the transaction itself was applied.
    let env = [("CACHE_INVALIDATOR_FAILPOINT", "after_apply_before_ack")];
    for attempt in 0.. {
        assert!(attempt < 10, "the failpoint never hit the transaction");
        let w = logs.add(cfg.spawn_worker_with_env(&env));
        support::wait_for("the failpoint abort", WAIT, || w.try_exit_code());
        assert!(w
            .log()
            .contains("failpoint after_apply_before_ack: aborting"));
        if !r.exists("item:1") {
            break;
        }
    }
    let c = confirmed(&pg).expect("slot");
    assert!(
        c <= before,
        "confirmed {c} passed the unacknowledged transaction (started after {before}, ends by {end})"
    );

    // Cached again after the apply: the redelivery must delete it again.
    r.set("item:1", "cached again");
    logs.add(cfg.spawn_worker());
    r.wait_gone("item:1", WAIT);
    sync_acked(&pg, &redis);
    logs.assert_counts(1, 0, 0);
    assert_all_present(&redis, &control_keys(), &logs);
}

/// Rows of the large transaction: 200,000 by default (its re-application by
/// the debug build takes ~15 s on the 2-core machine), the design's 1,000,000
/// with `CACHE_INVALIDATOR_SLOW_TESTS=1` (~75 s more), or
/// `CACHE_INVALIDATOR_LARGE_ROWS=n`.
fn large_rows() -> u32 {
    if let Some(n) = std::env::var("CACHE_INVALIDATOR_LARGE_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return n;
    }
    match std::env::var("CACHE_INVALIDATOR_SLOW_TESTS").as_deref() {
        Ok("1") => 1_000_000,
        _ => 200_000,
    }
}

/// A kill while a large single transaction is being applied in chunks: its
/// end LSN was not confirmed, so the restart applies all of it again.
#[test]
fn kill_during_a_large_transaction_reapplies_it_whole() {
    let rows = large_rows();
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let (cfg, mut logs) = start(&pg, &redis, rows, &[], "");
    // One sampled key every 997 rows (and the last row).
    let mut sample: Vec<u32> = (1..=rows).step_by(997).collect();
    sample.push(rows);
    let keys = item_keys(sample.iter().copied());
    set_keys(&redis, &keys, "cached");

    let started = Instant::now();
    let before = wal_lsn(&pg);
    pg.psql(&format!("UPDATE items SET v = v + 1 WHERE id <= {rows}"));
    let end = wal_lsn(&pg);
    eprintln!("update of {rows} rows committed in {:?}", started.elapsed());

    // Kill once some, not all, of the sampled keys are gone.
    let left = support::wait_for("the large transaction to be partly applied", WAIT, || {
        let left = existing(&redis, &keys).len();
        (left < keys.len()).then_some(left)
    });
    logs.last().kill();
    eprintln!(
        "killed with {left} of {} sampled keys left after {:?}",
        keys.len(),
        started.elapsed()
    );
    // Keepalives answered while PostgreSQL was still reading the transaction's
    // WAL may confirm positions inside it (before its commit record, which is
    // safe: it is decoded again); never its commit.
    let c = confirmed(&pg).expect("slot");
    assert!(
        c < end,
        "confirmed {c} passed the transaction's commit ({before}..{end})"
    );

    // Everything cached again: the restart must apply the whole transaction again.
    set_keys(&redis, &keys, "cached again");
    let restarted = Instant::now();
    logs.add(cfg.spawn_worker());
    wait_all_gone(&redis, &keys, Duration::from_secs(180), &logs);
    eprintln!("re-applied {rows} rows in {:?}", restarted.elapsed());
    sync_acked(&pg, &redis);
    assert!(confirmed(&pg).expect("slot") >= end);
    logs.assert_counts(1, 0, 0);
    assert_all_present(&redis, &control_keys(), &logs);
}

// ---------------------------------------------------------------------------
// Redis failures

/// Guarantees 3 and 6: Redis killed mid-stream; nothing is acknowledged while
/// it is down; it comes back from an older snapshot holding entries whose
/// deletes had been acknowledged; the worker sees the new Redis identity and
/// flushes once; every stale key is gone and control keys survive.
#[test]
fn redis_outage_and_restore_from_a_stale_snapshot() {
    let pg = PgCluster::start();
    let mut redis = RedisServer::start_with(&["--dbfilename", "snap.rdb"]);
    let (_cfg, mut logs) = start(&pg, &redis, 400, &[], "");
    let keys = item_keys(1..=200);
    set_keys(&redis, &keys, "cached");
    assert_eq!(redis.cli(&["SAVE"]).expect("SAVE"), "OK");

    // Acknowledged deletes the snapshot does not know about.
    psql_script(&pg, &update_script(1, 101, 10, 0.0)).expect("updates");
    wait_all_gone(&redis, &keys[..100], WAIT, &logs);
    sync_acked(&pg, &redis);

    redis.kill();
    let before = wal_lsn(&pg);
    let mut writer = spawn_psql(&pg, &update_script(101, 201, 10, 0.1));
    // Poll the slot through the writes and a few seconds after.
    let mut polls = 0;
    let mut finished: Option<Instant> = None;
    loop {
        let c = confirmed(&pg).expect("slot");
        assert!(
            c <= before,
            "confirmed_flush_lsn {c} passed {before} while Redis was down"
        );
        polls += 1;
        if writer.try_wait().expect("writer").is_some() {
            let t = *finished.get_or_insert_with(Instant::now);
            if t.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(writer.wait().expect("writer").success());
    let end = wal_lsn(&pg);
    assert!(
        logs.last()
            .log()
            .contains("Redis failed; nothing is acknowledged"),
        "{}",
        logs.tail()
    );

    // Back from the snapshot: item:1..=200 stale, the identity key old.
    redis.restart();
    wait_all_gone(&redis, &keys, WAIT, &logs);
    sync_acked(&pg, &redis);
    assert!(confirmed(&pg).expect("slot") >= end);
    let control = ["control:a", "control:b", "control:c"].map(String::from);
    // The control keys were set before the SAVE; the control rows' keys too.
    assert_all_present(&redis, &control, &logs);
    assert!(
        logs.last().log().contains("identity_changed"),
        "{}",
        logs.tail()
    );
    logs.assert_counts(1, 1, 0);
    eprintln!("{polls} polls of confirmed_flush_lsn while Redis was down");
}

/// A Redis paused longer than `wal_sender_timeout`: status updates keep the
/// replication connection alive (no reconnect) and nothing is acknowledged
/// before Redis confirmed it.
#[test]
fn slow_redis_keeps_the_connection_and_acknowledges_nothing_early() {
    let pg = PgCluster::start_with(PgOptions::default().set("wal_sender_timeout", "3s"));
    let redis = RedisServer::start();
    let (_cfg, mut logs) = start(&pg, &redis, 10, &[], "");
    set_keys(&redis, &item_keys(1..=5), "cached");

    let before = wal_lsn(&pg);
    assert_eq!(
        redis
            .cli(&["CLIENT", "PAUSE", "8000", "ALL"])
            .expect("pause"),
        "OK"
    );
    let paused = Instant::now();
    psql_script(&pg, &update_script(1, 6, 1, 0.0)).expect("updates");
    while paused.elapsed() < Duration::from_millis(7500) {
        let c = confirmed(&pg).expect("slot");
        assert!(
            c <= before,
            "confirmed {c} passed {before} while Redis was paused"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_all_gone(&redis, &item_keys(1..=5), WAIT, &logs);
    sync_acked(&pg, &redis);
    assert!(!logs.last().log().contains(RESUMING), "{}", logs.tail());
    assert!(
        !pg.log().contains("replication timeout"),
        "the walsender timed out:\n{}",
        pg.log()
    );
    assert_eq!(logs.last().try_exit_code(), None);
    logs.assert_counts(1, 0, 0);
    assert_all_present(&redis, &control_keys(), &logs);
}

/// Permanent errors on one key: a tag key holding a string and a version key
/// holding text are unlinked and the step redone; the stream continues.
#[test]
fn wrongtype_tag_and_non_integer_version_are_repaired() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let users = "[[table]]\nname = \"users\"\nkeys = [\"user:{id}\"]\ntags = [\"user:{id}\"]\nversions = [\"user:{id}\"]\n";
    let (_cfg, mut logs) = start(
        &pg,
        &redis,
        10,
        &[("users.toml", users)],
        "CREATE TABLE users (id int PRIMARY KEY, name text);
         INSERT INTO users SELECT g, 'u' FROM generate_series(1, 3) g;",
    );
    let mut r = RedisProbe::new(&redis);
    r.set("user:1", "cached");
    r.set("tag:user:1", "not a set");
    r.set("version:user:1", "not a number");
    r.set("user:2", "cached");
    r.sadd("tag:user:2", "team:9:members");
    r.set("team:9:members", "cached");
    r.set("version:user:3", "7");
    pg.psql("UPDATE users SET name = 'x' WHERE id = 1");
    pg.psql("UPDATE users SET name = 'x' WHERE id IN (2, 3)");
    for k in [
        "user:1",
        "tag:user:1",
        "user:2",
        "tag:user:2",
        "team:9:members",
    ] {
        r.wait_gone(k, WAIT);
    }
    // Unlinked, then bumped from missing: 2.
    assert_eq!(r.get("version:user:1").as_deref(), Some("2"));
    assert_eq!(r.get("version:user:3").as_deref(), Some("8"));
    // The stream continues.
    r.set("item:3", "cached");
    pg.psql("UPDATE items SET v = 1 WHERE id = 3");
    r.wait_gone("item:3", WAIT);
    sync_acked(&pg, &redis);
    let log = logs.last().log();
    assert!(
        log.contains("a key under the tag prefix is not a set: unlinked it"),
        "{log}"
    );
    assert!(
        log.contains("a key under the version prefix is not an integer"),
        "{log}"
    );
    logs.assert_counts(1, 0, 0);
    assert_all_present(&redis, &control_keys(), &logs);
}

// ---------------------------------------------------------------------------
// PostgreSQL failures

/// Guarantee 3: a walsender terminated mid-stream and a PostgreSQL restart
/// mid-stream; the worker reconnects, resumes from the slot, loses nothing.
#[test]
fn walsender_kill_and_postgres_restart_lose_nothing() {
    let mut pg = PgCluster::start();
    let redis = RedisServer::start();
    let (_cfg, mut logs) = start(&pg, &redis, 3_000, &[], "");
    let keys = item_keys(1..=3_000);
    set_keys(&redis, &keys, "cached");
    // Before PostgreSQL 17 a slot whose only change is confirmed_flush_lsn is
    // not saved at shutdown: a restart replays what was acknowledged since it
    // was last saved (at-least-once), setup's flush marker included when it is
    // that recent. Let restart_lsn move past the marker (a checkpoint logs the
    // running transactions; the next acknowledgement moves it and saves the
    // slot), as it does within seconds in production.
    pg.psql("CHECKPOINT");
    sync_acked(&pg, &redis);

    psql_script(&pg, &update_script(1, 1_001, 10, 0.0)).expect("phase 1");
    let terminated = pg.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication WHERE application_name = 'cache-invalidator'",
    );
    assert_eq!(terminated, "1");
    psql_script(&pg, &update_script(1_001, 2_001, 10, 0.0)).expect("phase 2");
    pg.restart();
    psql_script(&pg, &update_script(2_001, 3_001, 10, 0.0)).expect("phase 3");

    support::sync_worker(&pg, &redis, WAIT);
    wait_all_gone(&redis, &keys, WAIT, &logs);
    assert!(logs.count(RESUMING) >= 1, "{}", logs.tail());
    assert_eq!(logs.last().try_exit_code(), None);
    logs.assert_counts(1, 0, 0);
    assert_all_present(&redis, &control_keys(), &logs);
}

/// A dropped slot without `auto_setup`: the worker exits 2 naming the setup
/// command; `setup` recreates it with the flush marker, which fires once.
/// With `auto_setup = true`, `run` recreates it by itself and streams on.
#[test]
fn dropped_slot_is_reported_and_recreated_with_one_flush() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let (cfg, mut logs) = start(&pg, &redis, 10, &[], "");

    drop_slot_under_worker(&pg);
    let code = support::wait_for("the worker to exit", WAIT, || logs.last().try_exit_code());
    let log = logs.last().log();
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("replication slot \"cache_invalidator\" does not exist"),
        "{log}"
    );
    assert!(log.contains("cache-invalidator setup"), "{log}");

    // Stale while no slot existed: only the marker can cover it.
    set_keys(&redis, &item_keys(1..=3), "stale");
    pg.psql("UPDATE items SET v = v + 1 WHERE id <= 3");
    let (code, out, err) = cfg.command(&["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("pg_create_logical_replication_slot"), "{out}");
    logs.add(cfg.spawn_worker());
    wait_all_gone(&redis, &item_keys(1..=3), WAIT, &logs);
    sync_acked(&pg, &redis);
    // The marker flushed the items, control rows' keys included: set them again.
    set_keys(&redis, &control_keys(), "control");
    logs.assert_counts(2, 0, 0);

    // auto_setup: the running worker recreates the slot itself.
    cfg.set_auto_setup();
    assert_eq!(logs.last().stop(WAIT), Some(0));
    logs.add(cfg.spawn_worker());
    sync_acked(&pg, &redis);
    drop_slot_under_worker(&pg);
    set_keys(&redis, &item_keys(4..=5), "stale");
    pg.psql("UPDATE items SET v = v + 1 WHERE id IN (4, 5)");
    support::wait_for("the slot to be recreated", WAIT, || {
        confirmed(&pg).map(|_| ())
    });
    logs.last().wait_log(MARKER, WAIT);
    wait_all_gone(&redis, &item_keys(4..=5), WAIT, &logs);
    // Streaming continues.
    set_keys(&redis, &item_keys(6..=6), "cached");
    pg.psql("UPDATE items SET v = v + 1 WHERE id = 6");
    wait_all_gone(&redis, &item_keys(6..=6), WAIT, &logs);
    sync_acked(&pg, &redis);
    assert_eq!(logs.last().try_exit_code(), None, "{}", logs.tail());
    assert!(logs.last().log().contains("recreating"), "{}", logs.tail());
    logs.assert_counts(3, 0, 0);
    let control = ["control:a", "control:b", "control:c"].map(String::from);
    assert_all_present(&redis, &control, &logs);
}

/// Terminates the worker's walsender and drops the slot before it reconnects.
fn drop_slot_under_worker(pg: &PgCluster) {
    support::wait_for("the slot to be dropped", WAIT, || {
        psql_script(
            pg,
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'cache_invalidator' AND active_pid IS NOT NULL;
             SELECT pg_drop_replication_slot('cache_invalidator');",
        )
        .ok()
    });
}

/// A slot invalidated by `max_slot_wal_keep_size` while the worker was
/// stopped: `run` refuses with exit 2 and the fix; `setup` recreates it; the
/// flush marker fires once and streaming continues.
#[test]
fn lost_slot_is_reported_and_recreated_with_one_flush() {
    let pg = PgCluster::start_with(
        PgOptions::default()
            .set("max_slot_wal_keep_size", "1MB")
            .set("min_wal_size", "32MB")
            .set("max_wal_size", "32MB"),
    );
    let redis = RedisServer::start();
    let (cfg, mut logs) = start(
        &pg,
        &redis,
        10,
        &[],
        "CREATE TABLE scratch (id int, pad text)",
    );
    assert_eq!(logs.last().stop(WAIT), Some(0));

    set_keys(&redis, &item_keys(1..=3), "stale");
    pg.psql("UPDATE items SET v = v + 1 WHERE id <= 3");
    support::wait_for("wal_status = 'lost'", Duration::from_secs(120), || {
        pg.psql("INSERT INTO scratch SELECT g, repeat('x', 200) FROM generate_series(1, 50000) g");
        pg.psql("SELECT pg_switch_wal()");
        pg.psql("CHECKPOINT");
        let status = pg.psql(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'cache_invalidator'",
        );
        (status == "lost").then_some(())
    });
    pg.psql("TRUNCATE scratch");

    let (code, _out, err) = cfg.command(&["run"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("lost WAL it needed"), "{err}");
    assert!(err.contains("cache-invalidator setup --config"), "{err}");

    let (code, out, err) = cfg.command(&["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("recreating it"), "{err}");
    logs.add(cfg.spawn_worker());
    wait_all_gone(&redis, &item_keys(1..=3), WAIT, &logs);
    set_keys(&redis, &item_keys(4..=4), "cached");
    pg.psql("UPDATE items SET v = v + 1 WHERE id = 4");
    wait_all_gone(&redis, &item_keys(4..=4), WAIT, &logs);
    sync_acked(&pg, &redis);
    logs.assert_counts(2, 0, 0);
    let control = ["control:a", "control:b", "control:c"].map(String::from);
    assert_all_present(&redis, &control, &logs);
}

/// Guarantee 7: a standby waits; when the active worker is SIGKILLed the
/// standby streams within 10 s and nothing is lost across the switch.
#[test]
fn standby_takes_over_within_ten_seconds() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let (cfg, mut logs) = start(&pg, &redis, 2_000, &[], "");
    let keys = item_keys(1..=2_000);
    set_keys(&redis, &keys, "cached");
    let standby = cfg.spawn_worker();
    standby.wait_log("standby: another worker streams this slot", WAIT);

    let mut writer = spawn_psql(&pg, &update_script(1, 2_001, 10, 0.02));
    // Kill the active one while the writer is busy.
    support::wait_for("some updates applied", WAIT, || {
        (existing(&redis, &keys).len() < 1_900).then_some(())
    });
    logs.last().kill();
    let killed = Instant::now();
    support::sync_worker(&pg, &redis, Duration::from_secs(10));
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "took over after {took:?}");
    assert!(writer.wait().expect("writer").success());
    let standby = logs.add(standby);
    standby.wait_log("replication started", WAIT);
    support::sync_worker(&pg, &redis, WAIT);
    wait_all_gone(&redis, &keys, WAIT, &logs);
    logs.assert_counts(1, 0, 0);
    assert_all_present(&redis, &control_keys(), &logs);
    eprintln!("standby streamed {took:?} after the kill");
}

/// Hot standby with three workers on one slot: the active one is SIGKILLed
/// twice while updates commit; each time one of the two others streams
/// within 10 s, and no invalidation is lost.
#[test]
fn three_workers_one_slot_two_kills() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let (cfg, mut logs) = start(&pg, &redis, 3_000, &[], "");
    let keys = item_keys(1..=3_000);
    set_keys(&redis, &keys, "cached");
    for _ in 0..2 {
        let standby = logs.add(cfg.spawn_worker());
        standby.wait_log("standby: another worker streams this slot", WAIT);
    }

    let mut writer = spawn_psql(&pg, &update_script(1, 3_001, 10, 0.03));
    let mut active = 0;
    let mut thresholds = [2_900, 2_000].into_iter();
    for kill in 1..=2 {
        let below = thresholds.next().expect("two kills");
        support::wait_for("some updates applied", WAIT, || {
            (existing(&redis, &keys).len() < below).then_some(())
        });
        logs.0[active].kill();
        let killed = Instant::now();
        support::sync_worker(&pg, &redis, Duration::from_secs(10));
        let took = killed.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "kill {kill}: took over after {took:?}\n{}",
            logs.tail()
        );
        // Exactly one survivor took over; the other still waits.
        let took_over: Vec<usize> = (0..logs.0.len())
            .filter(|&i| {
                logs.0[i].pid().is_some()
                    && logs.0[i].log().contains("took over the slot: streaming")
            })
            .collect();
        assert_eq!(
            took_over.len(),
            1,
            "kill {kill}: workers that took over: {took_over:?}\n{}",
            logs.tail()
        );
        let next = took_over[0];
        eprintln!("kill {kill}: worker {next} streamed {took:?} after the kill");
        active = next;
    }
    assert!(writer.wait().expect("writer").success());
    support::sync_worker(&pg, &redis, WAIT);
    wait_all_gone(&redis, &keys, WAIT, &logs);
    logs.assert_counts(1, 0, 0);
    assert_all_present(&redis, &control_keys(), &logs);
    let alive = logs
        .0
        .iter_mut()
        .map(|w| w.pid().is_some() && w.try_exit_code().is_none())
        .filter(|alive| *alive)
        .count();
    assert_eq!(alive, 1, "one worker left, streaming\n{}", logs.tail());
}

/// Guarantee 4: heavy writes to an unpublished table while mapped tables are
/// idle do not pin WAL: the slot's confirmed position follows within 1 MB.
#[test]
fn idle_mapped_tables_do_not_pin_wal() {
    let pg = PgCluster::start_with(PgOptions::default().set("wal_sender_timeout", "3s"));
    let redis = RedisServer::start();
    let (_cfg, logs) = start(
        &pg,
        &redis,
        10,
        &[],
        "CREATE TABLE scratch (id int, pad text)",
    );
    for _ in 0..4 {
        pg.psql("INSERT INTO scratch SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g");
    }
    let target = wal_lsn(&pg);
    let written = Instant::now();
    support::wait_for("confirmed within 1 MB of the WAL end", WAIT, || {
        let c = confirmed(&pg)?;
        (c + 1024 * 1024 >= target).then_some(())
    });
    let took = written.elapsed();
    eprintln!("confirmed within 1 MB after {took:?}");
    // Two status intervals (1 s each at wal_sender_timeout = 3s).
    assert!(took < Duration::from_secs(2), "took {took:?}");
    logs.assert_counts(1, 0, 0);
    assert_all_present(&redis, &control_keys(), &logs);
}

// ---------------------------------------------------------------------------
// schema changes

/// ADD COLUMN changes nothing; DROP of a column a template uses fires the
/// table's truncate invalidations with a warning (no crash); a renamed mapped
/// table is followed by OID with a warning.
#[test]
fn schema_changes_mid_stream() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let posts =
        "[[table]]\nname = \"posts\"\nkeys = [\"post:{id}\", \"author:{author_id}:posts\"]\n";
    let authors = "[[table]]\nname = \"authors\"\nkeys = [\"author:{id}\"]\n";
    let (_cfg, mut logs) = start(
        &pg,
        &redis,
        10,
        &[("posts.toml", posts), ("authors.toml", authors)],
        "CREATE TABLE authors (id int PRIMARY KEY, name text);
         CREATE TABLE posts (id int PRIMARY KEY, author_id int, title text);
         INSERT INTO authors VALUES (1, 'a'), (2, 'b');
         INSERT INTO posts VALUES (7, 1, 't'), (8, 2, 't');",
    );
    let mut r = RedisProbe::new(&redis);

    // ADD COLUMN: the rule still renders; no fallback.
    r.set("post:7", "cached");
    r.set("author:1:posts", "cached");
    r.set("post:8", "cached");
    pg.psql("ALTER TABLE posts ADD COLUMN subtitle text");
    pg.psql("UPDATE posts SET subtitle = 's' WHERE id = 7");
    r.wait_gone("post:7", WAIT);
    r.wait_gone("author:1:posts", WAIT);
    sync_acked(&pg, &redis);
    assert!(r.exists("post:8"));
    logs.assert_counts(1, 0, 0);

    // DROP COLUMN author_id: author:{author_id}:posts cannot render; the
    // table's truncate patterns (post:*, author:*:posts) fire instead.
    for k in ["post:7", "author:1:posts", "author:2:posts", "author:1"] {
        r.set(k, "cached");
    }
    pg.psql("ALTER TABLE posts DROP COLUMN author_id");
    pg.psql("UPDATE posts SET title = 'u' WHERE id = 7");
    for k in ["post:7", "post:8", "author:1:posts", "author:2:posts"] {
        r.wait_gone(k, WAIT);
    }
    sync_acked(&pg, &redis);
    assert!(r.exists("author:1"), "another table's key was deleted");
    assert_eq!(logs.last().try_exit_code(), None, "{}", logs.tail());
    logs.assert_counts(1, 0, 1);

    // RENAME authors: followed by OID (its Relation was seen in this session).
    pg.psql("UPDATE authors SET name = 'seen' WHERE id = 2");
    sync_acked(&pg, &redis);
    r.set("author:1", "cached");
    r.set("author:2", "cached");
    pg.psql("ALTER TABLE authors RENAME TO writers");
    pg.psql("UPDATE writers SET name = 'renamed' WHERE id = 1");
    r.wait_gone("author:1", WAIT);
    sync_acked(&pg, &redis);
    assert!(r.exists("author:2"));
    let log = logs.last().log();
    assert!(
        log.contains("a mapped table was renamed: following it by OID"),
        "no warning for the rename:\n{log}"
    );
    assert_eq!(logs.last().try_exit_code(), None);
    logs.assert_counts(1, 0, 1);
    assert_all_present(&redis, &control_keys(), &logs);
}

// ---------------------------------------------------------------------------
// bad input

/// `check` refuses malformed mapping and config files with exit 2 and the
/// file:line:column of each error.
#[test]
fn malformed_mapping_and_config_files_are_located() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.psql("CREATE TABLE items (id int PRIMARY KEY, v int)");
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "[[table]]\nname = \"items\"\nkyes = [\"item:{id}\"]\n",
            "bad.toml:3:1",
            &["kyes", "keys"],
        ),
        (
            "[[table]]\nname = \"items\"\nkeys = [\"item:{id\"]\n",
            "bad.toml:3:15",
            &["unclosed `{`"],
        ),
        (
            "[[table]]\nname = \"items\"\nkeys = [\"item:{nope}\"]\n",
            "bad.toml:2:8",
            &["has no column `nope`; its columns: id, v"],
        ),
        ("[[table]\nname = \"items\"\n", "bad.toml:1:", &[]),
    ];
    for (text, location, words) in cases {
        let cfg = WorkerConfig::new(&pg, &redis, &[("bad.toml", text)], "");
        let (code, out, err) = cfg.command(&["check"]);
        let all = format!("{out}{err}");
        eprintln!("{all}");
        assert_eq!(code, 2, "{text}\n{all}");
        assert!(
            all.contains(location),
            "want {location} for {text:?}:\n{all}"
        );
        for w in *words {
            assert!(all.contains(w), "want {w:?} for {text:?}:\n{all}");
        }
    }
    // Config files.
    let cfg = WorkerConfig::new(&pg, &redis, &[("items.toml", ITEMS_MAPPING)], "");
    let good = std::fs::read_to_string(cfg.path()).unwrap();
    let config_cases: &[(&str, &str, &[&str])] = &[
        (
            "max_batch_delay = 5\n",
            ":1",
            &["did you mean `max_batch_delay_ms`?", "allowed fields"],
        ),
        (
            "max_batch_ops = \"many\"\n",
            ":17",
            &["invalid type: string \"many\", expected u64"],
        ),
        ("[worker\n", ":", &[]),
    ];
    // Each case appends one line to the valid file: the error is on it.
    let line = good.lines().count() + 1;
    for (extra, location, words) in config_cases {
        std::fs::write(cfg.path(), format!("{good}{extra}")).unwrap();
        let (code, out, err) = cfg.command(&["check"]);
        let all = format!("{out}{err}");
        eprintln!("{all}");
        assert_eq!(code, 2, "{extra}\n{all}");
        assert!(
            all.contains(&format!("cache-invalidator.toml:{line}{location}")),
            "want {location} for {extra:?}:\n{all}"
        );
        for w in *words {
            assert!(all.contains(w), "want {w:?} for {extra:?}:\n{all}");
        }
    }
}

/// Values that are glob syntax, unicode, spaces and quotes, a 1 MB value and
/// a 1,600-column table: each deletes exactly its own keys, no fallback.
#[test]
fn odd_values_and_wide_rows_delete_exactly_their_keys() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let odd =
        "[[table]]\nname = \"odd\"\nkeys = [\"odd:{name}\"]\npatterns = [\"feed:{name}:*\"]\n";
    let wide = "[[table]]\nname = \"wide\"\nkeys = [\"wide:{id}:{c1599}\"]\n";
    let cols: Vec<String> = (1..1600).map(|i| format!("c{i} int DEFAULT {i}")).collect();
    let unicode = "ü 日本 \"q\" 's {x}";
    let sql = format!(
        "CREATE TABLE odd (id int PRIMARY KEY, name text, body text);
         INSERT INTO odd VALUES (1, '*', ''), (2, '[a-z]', ''), (3, {}, ''), (4, 'big', ''), (5, 'alice', ''), (6, 'b', '');
         CREATE TABLE wide (id int PRIMARY KEY, {});
         INSERT INTO wide (id) VALUES (1), (2);",
        quote(unicode),
        cols.join(", ")
    );
    let (_cfg, logs) = start(
        &pg,
        &redis,
        10,
        &[("odd.toml", odd), ("wide.toml", wide)],
        &sql,
    );
    let mut r = RedisProbe::new(&redis);
    let unicode_key = format!("odd:{unicode}");
    let untouched: Vec<String> = [
        "feed:alice:1",
        "feed:b:1",
        "feed:a:1",
        "feed:x:1",
        "odd:alice",
        "odd:b",
        "wide:2:1599",
    ]
    .map(String::from)
    .to_vec();
    set_keys(&redis, &untouched, "kept");
    for k in [
        "feed:*:1",
        "feed:[a-z]:1",
        "odd:*",
        "odd:[a-z]",
        unicode_key.as_str(),
        "odd:big",
        "wide:1:1599",
    ] {
        r.set(k, "cached");
    }
    r.set(&format!("feed:{unicode}:9"), "cached");

    pg.psql("UPDATE odd SET body = 'x' WHERE id = 1");
    r.wait_gone("feed:*:1", WAIT);
    r.wait_gone("odd:*", WAIT);
    pg.psql("UPDATE odd SET body = 'x' WHERE id = 2");
    r.wait_gone("feed:[a-z]:1", WAIT);
    r.wait_gone("odd:[a-z]", WAIT);
    pg.psql("UPDATE odd SET body = 'x' WHERE id = 3");
    r.wait_gone(&unicode_key, WAIT);
    r.wait_gone(&format!("feed:{unicode}:9"), WAIT);
    // A 1 MB value: through TOAST, in the new and (REPLICA IDENTITY FULL) old row.
    pg.psql("UPDATE odd SET body = repeat('y', 1048576) WHERE id = 4");
    r.wait_gone("odd:big", WAIT);
    r.set("odd:big", "cached");
    pg.psql("UPDATE odd SET name = 'big' WHERE id = 4");
    r.wait_gone("odd:big", WAIT);
    pg.psql("UPDATE wide SET c5 = 0 WHERE id = 1");
    r.wait_gone("wide:1:1599", WAIT);
    sync_acked(&pg, &redis);
    assert_all_present(&redis, &untouched, &logs);
    logs.assert_counts(1, 0, 0);
    assert_all_present(&redis, &control_keys(), &logs);
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
