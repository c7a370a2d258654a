//! No silent gaps, against real servers: the publication narrowed, a table
//! dropped from it, the publication dropped and recreated, and a mapped
//! column dropped before a restart. Each is visible on `/readyz` while it
//! lasts, `setup` repairs it with the flush that covers the window, a repair
//! by hand is flushed by the worker itself, and the worker streams on.

mod support;

use std::time::Duration;

use support::{PgCluster, RedisProbe, RedisServer, WorkerConfig, WorkerProcess};

const WAIT: Duration = Duration::from_secs(60);

/// The publication `setup` creates for `items` and the sync probe, created
/// again by hand.
const RECREATE_PUBLICATION: &str = "CREATE PUBLICATION cache_invalidator FOR TABLE items, sync_probe WITH (publish_via_partition_root = true)";

const ITEMS: &str = "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n";

/// Waits until `/readyz` answers `want` with a body containing `needle`.
fn wait_readyz(port: u16, want: u16, needle: &str) -> String {
    support::wait_for(&format!("/readyz {want} with {needle:?}"), WAIT, || {
        support::http_get(port, "/readyz")
            .filter(|(s, b)| *s == want && b.contains(needle))
            .map(|(_, b)| b)
    })
}

/// The value of one metric sample without labels.
fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = support::http_get(port, "/metrics").expect("/metrics");
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}

/// items + the sync probe, set up, and a worker serving metrics on a free port.
fn start(
    pg: &PgCluster,
    redis: &RedisServer,
    mappings: &[(&str, &str)],
) -> (WorkerConfig, WorkerProcess, u16) {
    let cfg = WorkerConfig::new(pg, redis, &support::with_sync_probe(pg, mappings), "");
    let port = support::free_port();
    let text = std::fs::read_to_string(cfg.path()).unwrap();
    std::fs::write(cfg.path(), format!("{text}{}", support::metrics_toml(port))).unwrap();
    cfg.run_setup(&[]);
    let worker = cfg.spawn_worker();
    support::sync_worker(pg, redis, WAIT);
    wait_readyz(port, 200, "ok");
    (cfg, worker, port)
}

/// Stops `worker` gracefully (exit code 0, else its log).
fn stop_cleanly(mut worker: WorkerProcess) {
    assert_eq!(
        worker.stop(Duration::from_secs(10)),
        Some(0),
        "{}",
        worker.log()
    );
}

/// Servers, with the table `items` holding rows `ids` (v = 0) and then
/// `more_sql`.
fn servers(ids: &[u32], more_sql: &str) -> (PgCluster, RedisServer) {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let rows: Vec<String> = ids.iter().map(|id| format!("({id}, 0)")).collect();
    pg.psql(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, v int); INSERT INTO items VALUES {};{more_sql}",
        rows.join(", ")
    ));
    (pg, redis)
}

/// Checks the worker streams on precisely: with `item:1` and `kept` cached,
/// an update of row 1 deletes `item:1` and leaves `kept`.
fn streams_on_precisely(
    pg: &PgCluster,
    redis: &RedisServer,
    probe: &mut RedisProbe,
    kept: &str,
    why: &str,
) {
    probe.set("item:1", "x");
    probe.set(kept, "x");
    pg.psql("UPDATE items SET v = v + 1 WHERE id = 1");
    probe.wait_gone("item:1", WAIT);
    support::sync_worker(pg, redis, WAIT);
    assert!(probe.exists(kept), "{why}");
}

/// Caches `item:<id>`, updates row `id` while the publication hides the
/// update, and checks (after the worker caught up) that the key stayed.
fn hidden_update(pg: &PgCluster, redis: &RedisServer, probe: &mut RedisProbe, id: u32) {
    let key = format!("item:{id}");
    probe.set(&key, "stale");
    pg.psql(&format!("UPDATE items SET v = v + 1 WHERE id = {id}"));
    support::sync_worker(pg, redis, WAIT);
    assert!(
        probe.exists(&key),
        "the publication sent the hidden update of {key}"
    );
}

#[test]
fn a_narrowed_publication_is_503_until_setup_repairs_and_flushes_it() {
    let (pg, redis) = servers(&[1, 2], "");
    let (cfg, worker, port) = start(&pg, &redis, &[("items.toml", ITEMS)]);
    let mut probe = RedisProbe::new(&redis);

    pg.psql("ALTER PUBLICATION cache_invalidator SET (publish = 'insert')");
    let body = wait_readyz(port, 503, "publication drift");
    assert!(body.contains("does not publish updates"), "{body}");
    assert_eq!(metric(port, "cache_invalidator_publication_drift"), 1.0);
    // The update is hidden by the narrowed publication: its key stays.
    hidden_update(&pg, &redis, &mut probe, 1);
    worker.wait_log("publication drift", WAIT);

    // check says so, and setup repairs it with a flush of the hidden table.
    let (code, out, err) = cfg.command(&["check"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("does not publish updates"), "{err}");
    let (code, out, err) = cfg.command(&["setup"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("SET (publish = 'insert, update, delete, truncate')"),
        "{out}"
    );
    assert!(out.contains("'flush:table:public.items'"), "{out}");
    probe.wait_gone("item:1", WAIT);
    wait_readyz(port, 200, "ok");
    assert_eq!(metric(port, "cache_invalidator_publication_drift"), 0.0);
    // Streams on, precisely.
    probe.set("item:2", "x");
    pg.psql("UPDATE items SET v = 2 WHERE id = 2");
    probe.wait_gone("item:2", WAIT);
}

#[test]
fn a_table_dropped_from_the_publication_is_503_until_setup_adds_and_flushes_it() {
    let (pg, redis) = servers(&[1], "");
    let (cfg, _worker, port) = start(&pg, &redis, &[("items.toml", ITEMS)]);
    let mut probe = RedisProbe::new(&redis);

    pg.psql("ALTER PUBLICATION cache_invalidator DROP TABLE items");
    let body = wait_readyz(port, 503, "publication drift");
    assert!(
        body.contains("public.items is not in the publication"),
        "{body}"
    );
    hidden_update(&pg, &redis, &mut probe, 1);

    let (code, out, err) = cfg.command(&["setup"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("ADD TABLE \"public\".\"items\""), "{out}");
    assert!(out.contains("'flush:table:public.items'"), "{out}");
    probe.wait_gone("item:1", WAIT);
    wait_readyz(port, 200, "ok");
}

#[test]
fn a_dropped_publication_is_recreated_by_setup_with_the_slot_and_a_full_flush() {
    let (pg, redis) = servers(&[1, 2], "");
    let (cfg, worker, port) = start(&pg, &redis, &[("items.toml", ITEMS)]);
    let mut probe = RedisProbe::new(&redis);

    // Dropped while running: /readyz says so, the log names the publication once.
    pg.psql("DROP PUBLICATION cache_invalidator");
    probe.set("item:1", "stale");
    pg.psql("UPDATE items SET v = 1 WHERE id = 1");
    wait_readyz(
        port,
        503,
        "publication \"cache_invalidator\" does not exist",
    );
    worker.wait_log("does not exist", WAIT);
    let log = worker.log();
    assert!(
        !log.contains("publication \\\"publication"),
        "garbled: {log}"
    );
    assert!(!log.contains("publication \"publication"), "garbled: {log}");
    let (code, out, err) = cfg.command(&["setup"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("CREATE PUBLICATION"), "{out}");
    assert!(out.contains("recreated, with a full flush marker"), "{out}");
    assert!(out.contains("'flush:all'"), "{out}");
    probe.wait_gone("item:1", WAIT);
    support::sync_worker(&pg, &redis, WAIT);
    wait_readyz(port, 200, "ok");

    // Dropped and recreated by hand, without setup. Before 18 the slot cannot
    // decode past the gap: setup finds out and recreates it with a full
    // flush. On 18 the walsender skips the gap's changes with a warning: the
    // worker flushes every mapped table right there, in stream order (and its
    // publication watch, seeing a new OID, emits flush:all).
    pg.psql("DROP PUBLICATION cache_invalidator");
    probe.set("item:2", "stale");
    pg.psql("UPDATE items SET v = 1 WHERE id = 2");
    pg.psql(RECREATE_PUBLICATION);
    if support::pg_major() >= 18 {
        probe.wait_gone("item:2", WAIT);
        worker.wait_log("PostgreSQL skipped those changes", WAIT);
        let (code, out, err) = cfg.command(&["setup"]);
        assert_eq!(code, 0, "{out}\n{err}");
    } else {
        let (code, out, err) = cfg.command(&["setup"]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("cannot decode past a gap"), "{out}\n{err}");
        assert!(out.contains("'flush:all'"), "{out}");
        probe.wait_gone("item:2", WAIT);
    }
    support::sync_worker(&pg, &redis, WAIT);
    wait_readyz(port, 200, "ok");
    probe.set("item:1", "x");
    pg.psql("UPDATE items SET v = 3 WHERE id = 1");
    probe.wait_gone("item:1", WAIT);
}

/// The worker was stopped while the publication was dropped, a row changed
/// and the publication was recreated: its watch starts from the new
/// publication (nothing to compare with), so only the stream can tell. On 18
/// the walsender skips the gap's change with a warning and the worker flushes
/// every mapped table there; before 18 the slot cannot decode past the gap
/// and `setup` recreates it with a full flush.
#[test]
fn a_publication_recreated_while_the_worker_was_down_is_flushed_in_the_stream() {
    let (pg, redis) = servers(&[1, 2], "");
    let (cfg, worker, _port) = start(&pg, &redis, &[("items.toml", ITEMS)]);
    stop_cleanly(worker);
    let mut probe = RedisProbe::new(&redis);
    probe.set("item:1", "stale");
    probe.set("item:2", "flushed too");
    pg.psql("DROP PUBLICATION cache_invalidator");
    pg.psql("UPDATE items SET v = 1 WHERE id = 1");
    pg.psql(RECREATE_PUBLICATION);
    if support::pg_major() < 18 {
        let (code, out, err) = cfg.command(&["setup"]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert!(out.contains("cannot decode past a gap"), "{out}\n{err}");
    }
    let worker = cfg.spawn_worker();
    probe.wait_gone("item:1", WAIT);
    probe.wait_gone("item:2", WAIT);
    if support::pg_major() >= 18 {
        worker.wait_log("PostgreSQL skipped those changes", WAIT);
    }
    support::sync_worker(&pg, &redis, WAIT);
    streams_on_precisely(
        &pg,
        &redis,
        &mut probe,
        "item:2",
        "item:2 flushed again after the gap",
    );
}

/// PostgreSQL 18 warns that it skipped the publication once, at the first
/// change decoded after the drop: a later change while it is still missing
/// is skipped silently. The publication watch covers it: recreated between
/// two of its readings, the publication has a new OID, and the watch emits
/// flush:all after it. (Before 18 the stream fails on the gap instead:
/// `a_dropped_publication_is_recreated_by_setup_with_the_slot_and_a_full_flush`.)
#[test]
fn a_change_after_the_skipped_publication_warning_is_flushed_by_the_watch() {
    if support::pg_major() < 18 {
        eprintln!("PostgreSQL 18 only: before 18 the stream fails on the gap");
        return;
    }
    let (pg, redis) = servers(&[1, 2], "");
    let (_cfg, worker, port) = start(&pg, &redis, &[("items.toml", ITEMS)]);
    let mut probe = RedisProbe::new(&redis);
    pg.psql("DROP PUBLICATION cache_invalidator");
    probe.set("item:1", "stale");
    pg.psql("UPDATE items SET v = 1 WHERE id = 1");
    probe.wait_gone("item:1", WAIT);
    worker.wait_log("PostgreSQL skipped those changes", WAIT);
    // After the in-stream flush: skipped without a warning.
    probe.set("item:2", "stale");
    pg.psql("UPDATE items SET v = 1 WHERE id = 2");
    pg.psql(RECREATE_PUBLICATION);
    probe.wait_gone("item:2", WAIT);
    wait_readyz(port, 200, "ok");
    streams_on_precisely(
        &pg,
        &redis,
        &mut probe,
        "item:2",
        "item:2 flushed again after the repair",
    );
}

#[test]
fn a_dropped_publication_is_repaired_by_auto_setup_loudly() {
    let (pg, redis) = servers(&[1, 2], "");
    let (cfg, worker, port) = start(&pg, &redis, &[("items.toml", ITEMS)]);
    stop_cleanly(worker);
    cfg.set_auto_setup();
    let worker = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);
    wait_readyz(port, 200, "ok");
    let mut probe = RedisProbe::new(&redis);

    // Dropped under the running worker, a key's row changed meanwhile: the
    // worker recreates the publication (and the slot, with a full flush)
    // itself, saying so. Before 18 its stream fails on the gap; on 18 it
    // streams past it and the publication watch sees the publication gone.
    pg.psql("DROP PUBLICATION cache_invalidator");
    probe.set("item:1", "stale");
    probe.set("item:2", "flushed too");
    pg.psql("UPDATE items SET v = 1 WHERE id = 1");
    probe.wait_gone("item:1", WAIT);
    probe.wait_gone("item:2", WAIT);
    worker.wait_log("auto_setup: recreating the publication", WAIT);
    // The line comes before the statements: wait for them to commit.
    support::wait_for("the recreated publication", WAIT, || {
        (pg.psql("SELECT count(*) FROM pg_publication WHERE pubname = 'cache_invalidator'") == "1")
            .then_some(())
    });
    // The watch sees the new publication (a new OID) at a later reading and
    // emits its own flush:all (a second flush, harmless): let it land first.
    worker.wait_log("publication repaired without `setup`", WAIT);
    support::sync_worker(&pg, &redis, WAIT);
    wait_readyz(port, 200, "ok");
    streams_on_precisely(
        &pg,
        &redis,
        &mut probe,
        "item:2",
        "item:2 flushed again after the repair",
    );
}

#[test]
fn a_publication_repaired_by_hand_flushes_what_it_hid() {
    let (pg, redis) = servers(&[1, 2, 3], "");
    let (_cfg, worker, port) = start(&pg, &redis, &[("items.toml", ITEMS)]);
    let mut probe = RedisProbe::new(&redis);

    // Narrowed, an update hidden, restored by hand (no setup).
    pg.psql("ALTER PUBLICATION cache_invalidator SET (publish = 'insert')");
    wait_readyz(port, 503, "does not publish updates");
    probe.set("item:3", "kept until the flush");
    hidden_update(&pg, &redis, &mut probe, 1);
    pg.psql(
        "ALTER PUBLICATION cache_invalidator SET (publish = 'insert, update, delete, truncate')",
    );
    probe.wait_gone("item:1", WAIT);
    // By the table's truncate invalidations: the flush, not the update.
    probe.wait_gone("item:3", WAIT);
    worker.wait_log("flush:table:public.items", WAIT);
    wait_readyz(port, 200, "ok");

    // Dropped from the publication, an update hidden, added back by hand.
    pg.psql("ALTER PUBLICATION cache_invalidator DROP TABLE items");
    wait_readyz(port, 503, "public.items is not in the publication");
    hidden_update(&pg, &redis, &mut probe, 2);
    pg.psql("ALTER PUBLICATION cache_invalidator ADD TABLE items");
    probe.wait_gone("item:2", WAIT);
    wait_readyz(port, 200, "ok");
    streams_on_precisely(
        &pg,
        &redis,
        &mut probe,
        "item:3",
        "items was flushed again after the repair",
    );
}

#[test]
fn a_dropped_template_column_runs_that_table_in_fallback_after_a_restart() {
    let (pg, redis) = servers(
        &[1, 2],
        "CREATE TABLE codes (id int PRIMARY KEY, code text); INSERT INTO codes VALUES (1, 'a')",
    );
    let codes =
        "[[table]]\nname = \"codes\"\nkeys = [\"code:{code}\"]\nassume_unchanged = [\"code\"]\n";
    let (cfg, worker, port) = start(&pg, &redis, &[("items.toml", ITEMS), ("codes.toml", codes)]);
    let mut probe = RedisProbe::new(&redis);
    pg.psql("ALTER TABLE codes DROP COLUMN code");
    stop_cleanly(worker);

    let (code, out, err) = cfg.command(&["check"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("table public.codes has no column `code`"),
        "{err}"
    );

    let worker = cfg.spawn_worker();
    let body = wait_readyz(port, 503, "broken mapping (fallback): public.codes");
    assert!(body.contains("column(s) code no longer exist"), "{body}");
    let (_, metrics) = support::http_get(port, "/metrics").expect("/metrics");
    assert_eq!(
        support::metric_sample(
            &metrics,
            "cache_invalidator_broken_tables",
            &[("reason", "missing_column")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        support::metric_sample(
            &metrics,
            "cache_invalidator_broken_tables",
            &[("reason", "missing_table")]
        ),
        0.0,
        "{metrics}"
    );
    worker.wait_log("mapping broken by DDL", WAIT);
    // Every other table precisely.
    probe.set("code:a", "x");
    probe.set("code:b", "x");
    streams_on_precisely(
        &pg,
        &redis,
        &mut probe,
        "item:2",
        "items was not invalidated precisely",
    );
    // The broken table by its truncate invalidations (code:*).
    pg.psql("UPDATE codes SET id = 3 WHERE id = 1");
    probe.wait_gone("code:a", WAIT);
    probe.wait_gone("code:b", WAIT);
    assert!(
        probe.exists("item:2"),
        "the fallback of codes reached items"
    );
}
