//! PostgreSQL failover drills against real servers: a primary, a streaming
//! hot standby (`pg_basebackup -R`, its own physical slot), Redis, and the
//! worker on a two-host URL with `target_session_attrs=read-write`. Keys are
//! cached, rows change while the worker streams, the primary is stopped
//! (immediate shutdown) in the middle of a write loop, the standby is
//! promoted, and more rows change on the new primary.
//!
//! - PostgreSQL 17+ with a failover slot synchronized to the standby: the
//!   worker resumes from the synchronized slot; every changed key is gone, no
//!   flush fired (an unrelated cached key survives, the flush counter did not
//!   move).
//! - A slot that was not synchronized (`failover_slot = false`, or PostgreSQL
//!   before 17): the worker recreates the slot on the new primary and flushes
//!   every mapped table, counted in `cache_invalidator_flushes_total`.
//!
//! `scripts/test` runs this file on the system's PostgreSQL 15 and on 18.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::standby::Standby;
use support::{
    free_port, http_get, metric_sample, pg_bindir, pg_major, wait_for, PgCluster, PgOptions,
    RedisProbe, RedisServer, WorkerConfig, WorkerProcess, SYNC_PROBE_MAPPING, SYNC_PROBE_TABLE,
};

const WAIT: Duration = Duration::from_secs(90);
const ROWS: u32 = 200;
const MAPPING: &str = "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n";
/// Cached under the table's truncate pattern (`item:*`) but rendered by no
/// row: only a flush deletes it.
const UNRELATED: &str = "item:unrelated";

/// The servers and the worker's config of one drill.
struct Drill {
    primary: PgCluster,
    standby: Standby,
    redis: RedisServer,
    config: WorkerConfig,
    metrics_port: u16,
}

/// Primary + standby (slot synchronization on 17+) + Redis, the table, the
/// config on both hosts, and `setup` run; returns setup's stdout too.
fn drill(failover_slot: bool) -> (Drill, String) {
    let primary = PgCluster::start();
    primary.psql(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); \
         INSERT INTO items SELECT g FROM generate_series(1, {ROWS}) g; {SYNC_PROBE_TABLE}"
    ));
    let mut options = PgOptions::default().set("hot_standby_feedback", "on");
    if pg_major() >= 17 {
        options = options.set("sync_replication_slots", "on");
    }
    let standby = Standby::start_with(&primary, options);
    let redis = RedisServer::start();
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let metrics_port = free_port();
    let config = WorkerConfig::with_postgres(
        &url,
        &format!("auto_setup = true\nfailover_slot = {failover_slot}"),
        &redis,
        &[
            ("items.toml", MAPPING),
            ("zz_sync.toml", SYNC_PROBE_MAPPING),
        ],
        &support::metrics_toml(metrics_port),
    );
    let (code, out, err) = config.command(&["setup"]);
    assert_eq!(code, 0, "setup failed:\n{out}\n{err}");
    (
        Drill {
            primary,
            standby,
            redis,
            config,
            metrics_port,
        },
        out,
    )
}

/// `cache_invalidator_flushes_total` summed over reasons (or of `reason`).
fn flushes(port: u16, reason: Option<&str>) -> f64 {
    let body = wait_for("/metrics", WAIT, || {
        http_get(port, "/metrics").and_then(|(status, body)| (status == 200).then_some(body))
    });
    let labels: Vec<(&str, &str)> = reason.map(|r| vec![("reason", r)]).unwrap_or_default();
    metric_sample(&body, "cache_invalidator_flushes_total", &labels)
}

/// Waits until the worker streams the slot on `psql`'s server and applied
/// everything committed there before this call (the sync probe's key deleted
/// through its own change). Panics with the worker's log when it exited.
fn sync_on(psql: &dyn Fn(&str) -> String, redis: &RedisServer, worker: &mut WorkerProcess) {
    let alive = |worker: &mut WorkerProcess| {
        if let Some(code) = worker.try_exit_code() {
            panic!("the worker exited with {code}:\n{}", worker.log());
        }
    };
    wait_for("the worker to stream the slot", WAIT, || {
        alive(worker);
        (psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'cache_invalidator' AND active") == "1")
            .then_some(())
    });
    let mut probe = RedisProbe::new(redis);
    probe.set("sync:9001", "x");
    psql("INSERT INTO sync_probe (id) VALUES (9001) ON CONFLICT (id) DO UPDATE SET n = sync_probe.n + 1");
    wait_for("the sync probe's key to be deleted", WAIT, || {
        alive(worker);
        (!probe.exists("sync:9001")).then_some(())
    });
}

/// One transaction per row, ids 1..=100, 20 ms apart, on `primary` (a
/// `psql` in the background: it dies with the primary).
fn write_loop(primary: &PgCluster) -> Child {
    Command::new(pg_bindir().join("psql"))
        .args(["-X", "-q", "-U", "postgres", "-d", "postgres", "-h"])
        .arg(primary.socket_dir())
        .arg("-p")
        .arg(primary.port().to_string())
        .arg("-c")
        .arg(
            "DO $$ BEGIN FOR i IN 1..100 LOOP \
               UPDATE items SET n = n + 1 WHERE id = i; COMMIT; PERFORM pg_sleep(0.02); \
             END LOOP; END $$",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn psql")
}

/// Caches every row's key and the unrelated one; starts the worker and
/// waits until it streams; writes while it streams, stops the primary
/// (immediate) in the middle of the write loop once the standby replayed
/// some of it, promotes the standby and changes more rows there. Returns
/// the worker (still running) and the flush count before the failover.
fn fail_over(d: &mut Drill) -> (WorkerProcess, f64) {
    let mut worker = d.config.spawn_worker();
    support::sync_worker(&d.primary, &d.redis, WAIT);
    let mut probe = RedisProbe::new(&d.redis);
    for id in 1..=ROWS {
        probe.set(&format!("item:{id}"), "cached");
    }
    probe.set(UNRELATED, "cached");
    let before = flushes(d.metrics_port, None);

    let mut writer = write_loop(&d.primary);
    wait_for(
        "the standby to replay 30 of the loop's updates",
        WAIT,
        || {
            let n: u32 = d
                .standby
                .psql("SELECT count(*) FROM items WHERE n > 0")
                .parse()
                .ok()?;
            (n >= 30).then_some(())
        },
    );
    d.primary.stop_immediate();
    let _ = writer.kill();
    let _ = writer.wait();
    d.standby.promote();
    // After the promotion: one multi-row transaction and single-row ones.
    d.standby
        .psql("UPDATE items SET n = n + 1 WHERE id BETWEEN 101 AND 150");
    for id in 151..=160 {
        d.standby
            .psql(&format!("UPDATE items SET n = n + 1 WHERE id = {id}"));
    }
    sync_on(&|sql| d.standby.psql(sql), &d.redis, &mut worker);
    (worker, before)
}

/// Every row changed as the new primary has it (before and after the
/// promotion) lost its key.
fn assert_changed_keys_gone(d: &Drill, worker: &WorkerProcess) {
    let changed: Vec<u32> = d
        .standby
        .psql("SELECT id FROM items WHERE n > 0 ORDER BY id")
        .lines()
        .map(|l| l.parse().expect("an id"))
        .collect();
    assert!(
        changed.iter().any(|id| *id <= 100) && changed.iter().any(|id| *id > 100),
        "changes from before and after the promotion: {changed:?}"
    );
    let mut probe = RedisProbe::new(&d.redis);
    let stale: Vec<u32> = changed
        .into_iter()
        .filter(|id| probe.exists(&format!("item:{id}")))
        .collect();
    assert!(
        stale.is_empty(),
        "keys of changed rows still cached: {stale:?}\nworker log:\n{}",
        worker.log()
    );
}

#[test]
fn promotion_resumes_from_the_synchronized_slot_without_a_flush() {
    if pg_major() < 17 {
        // No failover slots before 17: setup says so (the drill itself runs
        // in scripts/test's PostgreSQL 18 pass; the flush path of these
        // versions is the next test).
        let pg = PgCluster::start();
        let redis = RedisServer::start();
        let config = WorkerConfig::new(&pg, &redis, &[("items.toml", MAPPING)], "");
        pg.psql("CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)");
        let (code, out, err) = config.command(&["setup"]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("has no failover slots (17+)"), "{out}");
        return;
    }
    let (mut d, setup_out) = drill(true);
    assert!(
        setup_out.contains("failover-enabled (PostgreSQL 17+)"),
        "{setup_out}"
    );
    // check: synchronized_standby_slots must name the standby's slot.
    let (_, _, err) = d.config.command(&["check"]);
    assert!(
        err.contains(&format!(
            "synchronized_standby_slots does not name the physical slot(s) {}",
            d.standby.slot()
        )),
        "{err}"
    );
    d.primary.psql(&format!(
        "ALTER SYSTEM SET synchronized_standby_slots = '{}'",
        d.standby.slot()
    ));
    d.primary.psql("SELECT pg_reload_conf()");
    wait_for("synchronized_standby_slots to be set", WAIT, || {
        (d.primary.psql("SHOW synchronized_standby_slots") == d.standby.slot()).then_some(())
    });
    let (_, _, err) = d.config.command(&["check"]);
    assert!(!err.contains("synchronized_standby_slots"), "{err}");

    // The standby keeps a synchronized copy of the slot, and status says so.
    let (mut worker, before) = {
        let d = &mut d;
        // The copy exists once the worker confirmed a position on the primary.
        let worker = d.config.spawn_worker();
        support::sync_worker(&d.primary, &d.redis, WAIT);
        wait_for("the standby to synchronize the slot", WAIT, || {
            (d.standby.psql(
                "SELECT count(*) FROM pg_replication_slots \
                 WHERE slot_name = 'cache_invalidator' AND synced AND NOT temporary",
            ) == "1")
                .then_some(())
        });
        let (code, out, err) = d.config.command(&["status", "--json"]);
        assert_eq!(code, 0, "{out}\n{err}");
        let status: serde_json::Value = serde_json::from_str(out.trim()).expect("status JSON");
        assert_eq!(status["failover"], serde_json::json!(true), "{out}");
        assert_eq!(
            status["standbys"][0]["synced"],
            serde_json::json!(true),
            "{out}"
        );
        drop(worker);
        fail_over(d)
    };

    assert_changed_keys_gone(&d, &worker);
    let log = worker.log();
    assert!(
        log.contains("resuming from its position without a flush"),
        "{log}"
    );
    assert!(!log.contains("recreating the replication slot"), "{log}");
    assert!(
        RedisProbe::new(&d.redis).exists(UNRELATED),
        "a full flush fired:\n{log}"
    );
    assert_eq!(
        flushes(d.metrics_port, None),
        before,
        "flush counter moved:\n{log}"
    );
    // The new primary streams the synchronized slot; the identity moved on.
    assert_eq!(
        d.standby
            .psql("SELECT synced FROM pg_replication_slots WHERE slot_name = 'cache_invalidator'"),
        "t"
    );
    let identity: Option<String> =
        RedisProbe::new(&d.redis).get("cache-invalidator:cache_invalidator:identity");
    assert!(
        identity.as_deref().unwrap_or("").ends_with("pg_timeline=2"),
        "{identity:?}"
    );
    assert_eq!(worker.try_exit_code(), None, "the worker exited:\n{log}");
    worker.stop(Duration::from_secs(10));
}

#[test]
fn promotion_without_a_synchronized_slot_recreates_it_and_counts_a_full_flush() {
    // 17+: a slot without failover is not synchronized; before 17 none is.
    let (mut d, _) = drill(false);
    let (mut worker, before) = fail_over(&mut d);

    assert_changed_keys_gone(&d, &worker);
    let log = worker.log();
    assert!(log.contains("recreating the replication slot"), "{log}");
    assert!(
        !RedisProbe::new(&d.redis).exists(UNRELATED),
        "no full flush fired:\n{log}"
    );
    let marker_flushes = flushes(d.metrics_port, Some("marker_all"));
    assert!(
        flushes(d.metrics_port, None) > before && marker_flushes >= 2.0,
        "flushes before {before}, marker_all now {marker_flushes}:\n{log}"
    );
    assert_eq!(worker.try_exit_code(), None, "the worker exited:\n{log}");
    worker.stop(Duration::from_secs(10));
}
