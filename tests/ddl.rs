//! DDL that changes what readers see without row events, against real
//! servers: with the event triggers of `setup --ddl-trigger`, a rewrite, a
//! retype, a partition DETACH/ATTACH/DROP, a DROP and a REFRESH of a mapped
//! materialized view each flush the mapped table through a transactional
//! `flush:table:<t>` message; without them, `check` warns that DDL is not
//! tracked. A dropped placeholder column is reported once (log, metric,
//! `/readyz`) while the table falls back to its truncate invalidations.

mod support;

use std::time::{Duration, Instant};

use support::{PgCluster, RedisProbe, RedisServer, WorkerConfig, SYNC_PROBE_MAPPING};

/// Generous: the machine is shared and has two cores.
const WAIT: Duration = Duration::from_secs(60);
/// What the issue asks: a key only the DDL makes stale is gone within a
/// second of the DDL's commit.
const DDL_DEADLINE: Duration = Duration::from_secs(1);

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0, label varchar(10));
INSERT INTO items (id) SELECT g FROM generate_series(1, 10) g;
CREATE TABLE events (id int PRIMARY KEY, v int NOT NULL DEFAULT 0) PARTITION BY RANGE (id);
CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (1) TO (100);
CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (100) TO (200);
INSERT INTO events (id) VALUES (1), (150);
CREATE TABLE events_3 (id int PRIMARY KEY, v int NOT NULL DEFAULT 0);
INSERT INTO events_3 (id) VALUES (250);
CREATE MATERIALIZED VIEW item_totals AS SELECT count(*) AS n FROM items;
CREATE TABLE dropme (id int PRIMARY KEY);
";

const MAPPINGS: &str = "
[[table]]
name = \"items\"
keys = [\"item:{id}\"]

[[table]]
name = \"events\"
keys = [\"event:{id}\"]

[[table]]
name = \"item_totals\"
keys = [\"totals\"]

[[table]]
name = \"dropme\"
keys = [\"dropme:{id}\"]
";

/// A key no mapping derives: every step checks it survived.
const CONTROL: &str = "control:key";

fn prepare(pg: &PgCluster, redis: &RedisServer, worker_toml: &str) -> WorkerConfig {
    pg.psql(SCHEMA);
    WorkerConfig::new(
        pg,
        redis,
        &support::with_sync_probe(pg, &[("app.toml", MAPPINGS)]),
        worker_toml,
    )
}

/// Caches `key`, commits `ddl`, and returns how long after the commit the
/// key was gone.
fn stale_after(pg: &PgCluster, r: &mut RedisProbe, key: &str, ddl: &str) -> Duration {
    r.set(key, "cached");
    pg.psql(ddl);
    let committed = Instant::now();
    r.wait_gone(key, WAIT);
    committed.elapsed()
}

#[test]
fn ddl_on_mapped_tables_flushes_them_with_the_trigger() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let port = support::free_port();
    let cfg = prepare(&pg, &redis, &support::metrics_toml(port));

    // Without the triggers: `check` says DDL is not tracked.
    let (code, out, err) = cfg.command(&["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cfg.command(&["check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("DDL is not tracked: the event triggers of `cache-invalidator setup --ddl-trigger` are not installed, so a rewrite (ALTER COLUMN ... TYPE), a partition"),
        "{err}"
    );
    assert!(
        err.contains("item_totals is a materialized view: it has no row events"),
        "{err}"
    );

    // A setup user that is not a superuser: told why, nothing half-installed.
    pg.psql("CREATE ROLE plain LOGIN REPLICATION");
    let plain = WorkerConfig::urls(
        &pg.url().replace("postgres@", "plain@"),
        &redis.url(),
        "cache_invalidator",
    );
    plain.mapping("app.toml", MAPPINGS);
    plain.mapping("zz_sync.toml", SYNC_PROBE_MAPPING);
    let (code, out, err) = plain.command(&["setup", "--ddl-trigger"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("CREATE EVENT TRIGGER needs a superuser"),
        "{out}{err}"
    );
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_event_trigger"),
        "0",
        "{out}"
    );

    let (code, out, err) = cfg.command(&["setup", "--ddl-trigger"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("CREATE EVENT TRIGGER cache_invalidator_ddl"),
        "{out}"
    );
    let (code, out, err) = cfg.command(&["setup", "--ddl-trigger"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("nothing to do"), "{out}");
    let (code, out, err) = cfg.command(&["check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!err.contains("DDL is not tracked"), "{err}");

    let w = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);
    let mut r = RedisProbe::new(&redis);
    r.set(CONTROL, "kept");

    // A rolled-back DDL emits nothing.
    r.set("item:1", "cached");
    pg.psql("BEGIN; ALTER TABLE items ALTER COLUMN v TYPE bigint USING v * 10; ROLLBACK;");
    support::sync_worker(&pg, &redis, WAIT);
    assert!(r.exists("item:1"), "a rolled-back ALTER flushed");

    // A partition created after setup: the trigger learns it (its DROP below
    // must flush the root).
    pg.psql("CREATE TABLE events_4 PARTITION OF events FOR VALUES FROM (300) TO (400)");
    let mut timings = Vec::new();
    for (what, key, ddl) in [
        (
            "rewrite (ALTER COLUMN TYPE ... USING)",
            "item:1",
            "ALTER TABLE items ALTER COLUMN v TYPE bigint USING v * 10",
        ),
        (
            "type change without rewrite",
            "item:2",
            "ALTER TABLE items ALTER COLUMN label TYPE varchar(20)",
        ),
        (
            "DETACH PARTITION",
            "event:150",
            "ALTER TABLE events DETACH PARTITION events_2",
        ),
        (
            "ATTACH PARTITION",
            "event:250",
            "ALTER TABLE events ATTACH PARTITION events_3 FOR VALUES FROM (200) TO (300)",
        ),
        (
            "DROP of a partition created after setup",
            "event:1",
            "DROP TABLE events_4",
        ),
        (
            "REFRESH MATERIALIZED VIEW",
            "totals",
            "REFRESH MATERIALIZED VIEW item_totals",
        ),
        ("DROP TABLE", "dropme:1", "DROP TABLE dropme"),
    ] {
        let t = stale_after(&pg, &mut r, key, ddl);
        timings.push((what, t));
    }
    support::sync_worker(&pg, &redis, WAIT);
    assert!(r.exists(CONTROL), "a key no mapping derives was deleted");
    for (what, t) in &timings {
        eprintln!("{what}: key gone {} ms after the commit", t.as_millis());
    }
    for (what, t) in &timings {
        assert!(
            *t <= DDL_DEADLINE,
            "{what}: the key was gone {t:?} after the DDL's commit, over {DDL_DEADLINE:?}"
        );
    }
    let log = support::strip_ansi(&w.log());
    assert!(
        log.contains("marker=flush:table:public.items")
            && log.contains("marker=flush:table:public.events")
            && log.contains("marker=flush:table:public.item_totals")
            && log.contains("marker=flush:table:public.dropme"),
        "{log}"
    );

    // A placeholder column renamed away: reported once, loudly, and the
    // table's changes fall back to its truncate invalidations.
    pg.psql("ALTER TABLE items RENAME COLUMN id TO item_id");
    support::sync_worker(&pg, &redis, WAIT);
    r.set("item:5", "cached");
    r.set("item:6", "cached");
    pg.psql("UPDATE items SET v = v + 1 WHERE item_id = 5");
    r.wait_gone("item:6", WAIT);
    pg.psql("UPDATE items SET v = v + 1 WHERE item_id = 5");
    support::sync_worker(&pg, &redis, WAIT);
    let log = w.log();
    assert_eq!(
        log.matches("no longer has a column its mapping renders")
            .count(),
        1,
        "{log}"
    );
    let (code, body) = support::http_get(port, "/readyz").expect("/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("mapped column missing public.items.id"),
        "{body}"
    );
    let (_, metrics) = support::http_get(port, "/metrics").expect("/metrics");
    assert!(
        metrics.contains("cache_invalidator_broken_tables{reason=\"missing_column\"} 1"),
        "{metrics}"
    );
    assert!(r.exists(CONTROL));
}
