//! Visible before invalidated (guarantee 9) against real servers: a batch is
//! applied only once its transactions are visible on the primary (a commit
//! waiting for a synchronous standby is not) and on every listed read
//! replica (a streaming standby with its replay paused is behind). Each
//! window is also raced by a reader paused between its database read and
//! its fill: with versions and guarded fills, no stale entry is left.

mod support;

use std::time::{Duration, Instant};

use cache_invalidator::cache::{self, tombstone, Lookup, Seen, VersionedCache};
use support::standby::Standby;
use support::{PgCluster, RedisProbe, RedisServer, WorkerConfig, WorkerProcess};

const WAIT: Duration = Duration::from_secs(20);
/// How long a test holds a window open and checks nothing was invalidated.
const HOLD: Duration = Duration::from_secs(2);
/// After the window closes, the invalidation must land within this.
const PROMPT: Duration = Duration::from_secs(1);

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)";
const MAPPING: &str = r#"
[[table]]
name = "items"
keys = ["plain:{id}"]
versions = ["item:{id}"]

[[table]]
name = "items"
keys = ["guarded:{id}"]
mode = "tombstone"
"#;

/// The harness's streaming standby: it replays the primary's writes, holds
/// them back while paused and catches up on resume.
#[test]
fn standby_helper_streams_pauses_and_resumes() {
    let pg = PgCluster::start();
    let standby = Standby::start(&pg);
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    pg.psql("CREATE TABLE t (id int PRIMARY KEY, v int)");
    pg.psql("INSERT INTO t VALUES (1, 1)");
    let lsn = pg.psql("SELECT pg_current_wal_lsn()");
    standby.wait_replayed(&lsn, WAIT);
    assert_eq!(standby.psql("SELECT v FROM t WHERE id = 1"), "1");

    standby.pause_replay();
    pg.psql("UPDATE t SET v = 2 WHERE id = 1");
    let lsn = pg.psql("SELECT pg_current_wal_lsn()");
    assert_eq!(
        standby.psql("SELECT v FROM t WHERE id = 1"),
        "1",
        "a paused standby serves the old row"
    );
    standby.resume_replay();
    standby.wait_replayed(&lsn, WAIT);
    assert_eq!(standby.psql("SELECT v FROM t WHERE id = 1"), "2");
}

/// A primary with the `items` table and row (1, 1), a Redis, and a config
/// for them (the body of `[postgres]` beyond url/slot/publication given),
/// with metrics on a free port. Returns the metrics port too.
struct Setup {
    pg: PgCluster,
    redis: RedisServer,
    cfg: WorkerConfig,
    metrics_port: u16,
}

fn setup(postgres_extra: impl FnOnce(&PgCluster) -> String) -> Setup {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.psql(ITEMS);
    pg.psql("INSERT INTO items VALUES (1, 1)");
    let cfg = WorkerConfig::new(
        &pg,
        &redis,
        &support::with_sync_probe(&pg, &[("items.toml", MAPPING)]),
        "",
    );
    let metrics_port = support::free_port();
    cfg.file(
        "cache-invalidator.toml",
        &config_text(&pg, &redis, &postgres_extra(&pg), metrics_port),
    );
    cfg.run_setup(&[]);
    Setup {
        pg,
        redis,
        cfg,
        metrics_port,
    }
}

/// The worker's config: the throwaway servers, `postgres_extra` lines in
/// `[postgres]`, long tombstones, metrics on `metrics_port`.
fn config_text(
    pg: &PgCluster,
    redis: &RedisServer,
    postgres_extra: &str,
    metrics_port: u16,
) -> String {
    format!(
        "mappings = \"mappings\"\n[postgres]\nurl = \"{}\"\nslot = \"cache_invalidator\"\npublication = \"cache_invalidator\"\n{postgres_extra}\n[redis]\nurl = \"{}\"\n[worker]\ntombstone_ms = 60000\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        pg.url(),
        redis.url()
    )
}

/// The value of the first sample named `name` whose line holds `label`.
fn sample(port: u16, name: &str, label: &str) -> f64 {
    let (_, text) = support::http_get(port, "/metrics").unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Asserts `key` keeps `value` for `hold`, polling.
fn assert_kept(probe: &mut RedisProbe, key: &str, value: &str, hold: Duration, why: &str) {
    let until = Instant::now() + hold;
    while Instant::now() < until {
        assert_eq!(probe.get(key).as_deref(), Some(value), "{key}: {why}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A reader that missed: what it saw in Redis, and the row it read.
struct PausedReader {
    guarded_seen: Seen,
    version_seen: i64,
    row: String,
}

async fn reader_misses_and_reads(
    a: &mut redis::aio::MultiplexedConnection,
    read_row: impl FnOnce() -> String,
) -> PausedReader {
    let Lookup::Miss(guarded_seen) = cache::lookup(a, "guarded:1").await.unwrap() else {
        panic!("guarded:1 should miss");
    };
    let vc = VersionedCache::new("version:");
    let (version_seen, data) = vc.get_versioned(a, "item", "1", "data").await.unwrap();
    assert_eq!(data, None, "item:1 data should miss");
    PausedReader {
        guarded_seen,
        version_seen,
        row: read_row(),
    }
}

/// The reader resumes and fills what it read; returns whether the guarded
/// fill was accepted.
async fn reader_fills(a: &mut redis::aio::MultiplexedConnection, r: &PausedReader) -> bool {
    let filled = cache::guarded_fill(a, "guarded:1", &r.guarded_seen, &r.row, 300, &[], "tag:")
        .await
        .unwrap();
    VersionedCache::new("version:")
        .fill(a, "item", "1", "data", r.version_seen, &r.row, 300)
        .await
        .unwrap();
    filled
}

/// After the window: nothing stale for a reader using versions or guarded
/// fills (the current row is `current`).
async fn assert_no_stale_entry(a: &mut redis::aio::MultiplexedConnection, current: &str) {
    let g: Option<Vec<u8>> = redis::cmd("GET")
        .arg("guarded:1")
        .query_async(a)
        .await
        .unwrap();
    if let Some(g) = g {
        assert!(
            tombstone::is_tombstone(&g) || g == current.as_bytes(),
            "guarded:1 holds a stale value {:?}",
            String::from_utf8_lossy(&g)
        );
    }
    let (_, data) = VersionedCache::new("version:")
        .get_versioned(a, "item", "1", "data")
        .await
        .unwrap();
    assert!(
        data.is_none() || data.as_deref() == Some(current),
        "a versioned reader gets the stale value {data:?}"
    );
}

fn writer_waiting_for_sync_rep(pg: &PgCluster) -> bool {
    pg.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'") == "1"
}

/// Starts `UPDATE items SET v = <v>` with `synchronous_commit = on` while
/// `synchronous_standby_names` names a standby that is not connected: the
/// commit is flushed, in the WAL stream, and invisible until released.
fn start_sync_rep_writer(pg: &PgCluster, v: u32) -> std::thread::JoinHandle<String> {
    pg.psql("ALTER SYSTEM SET synchronous_standby_names = 'ghost_standby'");
    pg.psql("SELECT pg_reload_conf()");
    let conninfo = pg.url();
    let writer = std::thread::spawn(move || {
        let out = std::process::Command::new(support::pg_bindir().join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(&conninfo)
            .arg("-c")
            .arg(format!(
                "SET synchronous_commit = on; UPDATE items SET v = {v} WHERE id = 1"
            ))
            .output()
            .expect("run psql");
        String::from_utf8_lossy(&out.stderr).into_owned()
    });
    support::wait_for(
        "the writer to wait for the synchronous standby",
        WAIT,
        || writer_waiting_for_sync_rep(pg).then_some(()),
    );
    writer
}

fn release_sync_rep(pg: &PgCluster) {
    pg.psql("ALTER SYSTEM RESET synchronous_standby_names");
    pg.psql("SELECT pg_reload_conf()");
}

fn start_worker(s: &Setup) -> WorkerProcess {
    let worker = s.cfg.spawn_worker();
    support::sync_worker(&s.pg, &s.redis, WAIT);
    worker
}

/// Done-when (1) and (4), primary: a synchronous standby that never answers
/// holds the writer's commit invisible; the key stays cached and the version
/// unbumped while it waits; a reader that missed, read the old row and
/// fills during the window leaves nothing stale; once the wait ends the key
/// is gone within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_waiting_for_a_synchronous_standby_is_not_invalidated_until_visible() {
    let s = setup(|_| String::new());
    let worker = start_worker(&s);
    let mut probe = RedisProbe::new(&s.redis);
    let mut a = s.redis.async_connection().await;
    probe.set("plain:1", "1");
    probe.set("version:item:1", "1");

    let writer = start_sync_rep_writer(&s.pg, 2);
    // The commit is in the WAL (and the stream) but every reader sees the old row.
    assert_eq!(s.pg.psql("SELECT v FROM items WHERE id = 1"), "1");
    let reader =
        reader_misses_and_reads(&mut a, || s.pg.psql("SELECT v FROM items WHERE id = 1")).await;
    assert_eq!(reader.row, "1");
    assert_eq!(reader.version_seen, 1);

    worker.wait_log("not visible on the primary yet", WAIT);
    assert!(
        sample(s.metrics_port, "cache_invalidator_visibility_waiting", "") == 1.0,
        "the waiting gauge is 1 during the wait"
    );
    assert_kept(
        &mut probe,
        "plain:1",
        "1",
        HOLD,
        "invalidated while the commit was invisible",
    );
    assert_eq!(
        probe.get("version:item:1").as_deref(),
        Some("1"),
        "version bumped early"
    );
    assert!(writer_waiting_for_sync_rep(&s.pg), "the writer still waits");
    // The paused reader fills inside the window: before the invalidation.
    assert!(
        reader_fills(&mut a, &reader).await,
        "nothing invalidated yet: the fill lands"
    );

    let released = Instant::now();
    release_sync_rep(&s.pg);
    let stderr = writer.join().expect("writer thread");
    assert!(stderr.is_empty(), "writer failed: {stderr}");
    probe.wait_gone("plain:1", PROMPT);
    eprintln!("plain:1 gone {:?} after the release", released.elapsed());
    // The key's UNLINK and the version's bump are separate rounds of one
    // batch (SET 2 NX, then INCR when the key existed): wait for the bump too.
    support::wait_for("version:item:1 bumped to 2", PROMPT, || {
        (probe.get("version:item:1").as_deref() == Some("2")).then_some(())
    });
    support::sync_worker(&s.pg, &s.redis, WAIT);
    assert_no_stale_entry(&mut a, "2").await;
    assert!(
        sample(
            s.metrics_port,
            "cache_invalidator_visibility_wait_seconds_sum",
            ""
        ) >= 1.0,
        "the wait is in the histogram"
    );
    assert!(
        worker.log().contains("synchronous standby"),
        "{}",
        worker.log()
    );
}

/// The control: with `visibility_check = false` the same window reproduces
/// the bug the check closes (the invalidation lands while the commit is
/// invisible, and a fill from the old row after it is stale). Proves the
/// test above can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_check_the_synchronous_standby_window_leaves_stale_entries() {
    let s = setup(|_| "visibility_check = false".into());
    let _worker = start_worker(&s);
    let mut probe = RedisProbe::new(&s.redis);
    let mut a = s.redis.async_connection().await;
    probe.set("plain:1", "1");

    let writer = start_sync_rep_writer(&s.pg, 2);
    probe.wait_gone("plain:1", WAIT);
    assert!(
        writer_waiting_for_sync_rep(&s.pg),
        "invalidated while invisible"
    );
    // A reader now misses (after the invalidation), reads the old row, fills.
    let reader =
        reader_misses_and_reads(&mut a, || s.pg.psql("SELECT v FROM items WHERE id = 1")).await;
    assert_eq!(reader.row, "1");
    assert!(
        reader_fills(&mut a, &reader).await,
        "the guarded fill over the tombstone it saw lands"
    );
    release_sync_rep(&s.pg);
    writer.join().expect("writer thread");
    support::sync_worker(&s.pg, &s.redis, WAIT);
    assert_eq!(probe.get("guarded:1").as_deref(), Some("1"), "stale");
    assert_eq!(
        VersionedCache::new("version:")
            .get_versioned(&mut a, "item", "1", "data")
            .await
            .unwrap(),
        (2, Some("1".into())),
        "stale under the new version"
    );
}

fn replica_extra(standby: &Standby, max_wait_ms: u64) -> String {
    format!(
        "replicas = [\"{}\"]\nreplica_max_wait_ms = {max_wait_ms}",
        standby.url()
    )
}

/// [`setup`] with a streaming standby of the primary listed as its read
/// replica (`replica_max_wait_ms = max_wait_ms`), and the replica's name in
/// metrics and logs.
fn setup_with_replica(max_wait_ms: u64) -> (Setup, Standby, String) {
    let mut standby = None;
    let s = setup(|pg| {
        let started = Standby::start(pg);
        let extra = replica_extra(&started, max_wait_ms);
        standby = Some(started);
        extra
    });
    let standby = standby.expect("standby");
    let name = format!("127.0.0.1:{}", standby.port());
    (s, standby, name)
}

/// Waits until the worker shows the replica up (or down).
fn wait_replica_up(s: &Setup, name: &str, up: bool) {
    let what = if up {
        "the replica to show up"
    } else {
        "the replica to show down"
    };
    wait_replica_metric(s, what, "cache_invalidator_replica_up", name, |v| {
        v == if up { 1.0 } else { 0.0 }
    });
}

/// Waits until the worker's `metric{replica="<name>"}` satisfies `ok`.
fn wait_replica_metric(s: &Setup, what: &str, metric: &str, name: &str, ok: impl Fn(f64) -> bool) {
    support::wait_for(what, WAIT, || {
        ok(sample(s.metrics_port, metric, name)).then_some(())
    });
}

/// How many batches the worker stopped waiting for replica `name` at
/// `replica_max_wait_ms`.
fn replica_timeouts(s: &Setup, name: &str) -> f64 {
    sample(
        s.metrics_port,
        "cache_invalidator_replica_timeouts_total",
        name,
    )
}

/// Done-when (2) and (4), replica: with replay paused the key stays and a
/// reader of the replica that fills the old row leaves nothing stale; the
/// key is gone within a second of resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_replica_holds_the_invalidation_until_it_replayed() {
    let (s, standby, name) = setup_with_replica(60_000);
    let worker = start_worker(&s);
    let mut probe = RedisProbe::new(&s.redis);
    let mut a = s.redis.async_connection().await;
    wait_replica_up(&s, &name, true);
    probe.set("plain:1", "1");
    probe.set("version:item:1", "1");

    standby.pause_replay();
    s.pg.psql("UPDATE items SET v = 2 WHERE id = 1");
    assert_eq!(standby.psql("SELECT v FROM items WHERE id = 1"), "1");
    let reader =
        reader_misses_and_reads(&mut a, || standby.psql("SELECT v FROM items WHERE id = 1")).await;
    assert_eq!(reader.row, "1", "the replica serves the old row");
    assert_kept(
        &mut probe,
        "plain:1",
        "1",
        HOLD,
        "invalidated before the replica replayed",
    );
    assert_eq!(probe.get("version:item:1").as_deref(), Some("1"));
    assert!(reader_fills(&mut a, &reader).await);

    let resumed = Instant::now();
    standby.resume_replay();
    probe.wait_gone("plain:1", PROMPT);
    eprintln!("plain:1 gone {:?} after resume", resumed.elapsed());
    assert_eq!(standby.psql("SELECT v FROM items WHERE id = 1"), "2");
    support::sync_worker(&s.pg, &s.redis, WAIT);
    assert_no_stale_entry(&mut a, "2").await;
    assert!(
        sample(
            s.metrics_port,
            "cache_invalidator_replica_waits_total",
            &name
        ) >= 1.0
    );
    assert_eq!(replica_timeouts(&s, &name), 0.0);
    drop(worker);
}

/// Done-when (2), bounded: with a small `replica_max_wait_ms` the key is
/// deleted at the timeout, and deleted again once the replica replayed (what
/// it served meanwhile, refilled here by hand, is cleaned); both counted.
#[test]
fn paused_replica_past_max_wait_is_applied_then_applied_again_after_resume() {
    let (s, standby, name) = setup_with_replica(500);
    let _worker = start_worker(&s);
    let mut probe = RedisProbe::new(&s.redis);
    probe.set("plain:1", "1");

    standby.pause_replay();
    let updated = Instant::now();
    s.pg.psql("UPDATE items SET v = 2 WHERE id = 1");
    probe.wait_gone("plain:1", WAIT);
    assert!(
        updated.elapsed() >= Duration::from_millis(500),
        "deleted before replica_max_wait_ms: {:?}",
        updated.elapsed()
    );
    // Counted right after the apply returns.
    wait_replica_metric(
        &s,
        "the timeout to be counted",
        "cache_invalidator_replica_timeouts_total",
        &name,
        |v| v == 1.0,
    );
    // The replica still serves the old row; a reader of it refills the key.
    let old = standby.psql("SELECT v FROM items WHERE id = 1");
    assert_eq!(old, "1");
    probe.set("plain:1", &old);
    // While the replica stays behind, later batches do not wait for it again.
    probe.set("sync:900", "x");
    s.pg.psql("INSERT INTO sync_probe (id) VALUES (900)");
    probe.wait_gone("sync:900", Duration::from_millis(400));
    assert_eq!(
        probe.get("plain:1").as_deref(),
        Some("1"),
        "not re-applied before resume"
    );

    standby.resume_replay();
    probe.wait_gone("plain:1", WAIT);
    wait_replica_metric(
        &s,
        "the re-application to be counted",
        "cache_invalidator_replica_reapplies_total",
        &name,
        |v| v >= 1.0,
    );
    // Both batches applied ahead of it counted: the timed-out one and the
    // one applied while it was still behind.
    assert_eq!(replica_timeouts(&s, &name), 2.0);
}

/// Done-when (3): a stopped replica does not block: invalidation goes on, it
/// shows down (metric and /readyz detail, still 200), nothing is lost; it
/// comes back up after a restart.
#[test]
fn stopped_replica_is_marked_down_and_does_not_block() {
    let (s, mut standby, name) = setup_with_replica(60_000);
    let worker = start_worker(&s);
    let mut probe = RedisProbe::new(&s.redis);
    wait_replica_up(&s, &name, true);

    standby.stop();
    for i in 0..20 {
        probe.set(&format!("plain:{}", 100 + i), "x");
    }
    for i in 0..20 {
        s.pg.psql(&format!("INSERT INTO items VALUES ({}, 1)", 100 + i));
    }
    for i in 0..20 {
        probe.wait_gone(&format!("plain:{}", 100 + i), WAIT);
    }
    support::sync_worker(&s.pg, &s.redis, WAIT);
    wait_replica_up(&s, &name, false);
    let (code, body) = support::http_get(s.metrics_port, "/readyz").expect("/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(&format!("replica {name} down")), "{body}");
    assert!(
        worker.log().contains("read replica down"),
        "{}",
        worker.log()
    );

    standby.restart();
    wait_replica_up(&s, &name, true);
    // What was applied while it was down is applied again once it replayed
    // it (it may serve readers while it catches up); not counted as timeouts.
    wait_replica_metric(
        &s,
        "the batches applied while down to be re-applied",
        "cache_invalidator_replica_reapplies_total",
        &name,
        |v| v >= 1.0,
    );
    assert_eq!(replica_timeouts(&s, &name), 0.0);
    probe.set("plain:1", "1");
    s.pg.psql("UPDATE items SET v = 5 WHERE id = 1");
    probe.wait_gone("plain:1", WAIT);
    let (code, body) = support::http_get(s.metrics_port, "/readyz").expect("/readyz");
    assert_eq!((code, body.trim()), (200, "ok"));
}

/// `check` and `status` show each replica's replay position and lag; `check`
/// refuses a replica URL that is not a standby of the primary.
#[test]
fn check_and_status_show_replicas_and_refuse_a_server_that_is_not_a_standby() {
    let (s, _standby, name) = setup_with_replica(30_000);

    let (code, out, err) = s.cfg.command(&["check"]);
    assert_eq!(code, 0, "check failed:\n{out}\n{err}");
    assert!(
        out.contains(&format!(
            "replica {name}: standby of this primary, replayed "
        )),
        "{out}"
    );
    let (code, out, err) = s.cfg.command(&["status"]);
    assert_eq!(code, 0, "status failed:\n{out}\n{err}");
    assert!(
        out.contains(&format!("replica {name}: standby of this primary")),
        "{out}"
    );
    let (code, out, _) = s.cfg.command(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("status --json");
    let r = &v["replicas"][0];
    assert_eq!(r["replica"], name.as_str());
    assert_eq!(r["reachable"], true);
    assert_eq!(r["in_recovery"], true);
    assert_eq!(r["same_system"], true);
    assert!(
        r["replay_lsn"].as_str().is_some_and(|l| l.contains('/')),
        "{r}"
    );
    assert!(r["lag_bytes"].as_i64().is_some(), "{r}");

    // A primary of its own (not in recovery) listed as a replica: refused.
    let other = PgCluster::start();
    s.cfg.file(
        "cache-invalidator.toml",
        &config_text(
            &s.pg,
            &s.redis,
            &format!("replicas = [\"{}\"]", other.url()),
            s.metrics_port,
        ),
    );
    let (code, out, err) = s.cfg.command(&["check"]);
    assert_eq!(code, 2, "check accepted a non-standby:\n{out}\n{err}");
    assert!(err.contains("not a standby"), "{err}");
    // An unreachable replica is a warning, not a failure.
    s.cfg.file(
        "cache-invalidator.toml",
        &config_text(
            &s.pg,
            &s.redis,
            &format!(
                "replicas = [\"postgres://postgres@127.0.0.1:{}/postgres\"]",
                support::free_port()
            ),
            s.metrics_port,
        ),
    );
    let (code, out, err) = s.cfg.command(&["check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("unreachable"), "{err}");
}
