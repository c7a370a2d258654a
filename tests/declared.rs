//! Declared invalidations against real servers: `cache_invalidator.invalidate`
//! and `flush_table` (installed by `setup`) inside the application's
//! transactions, applied by the worker after the commit, never on rollback,
//! in the same batch as the transaction's row changes, across a crash, and a
//! malformed message answered with a full flush.

mod support;

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use support::{
    PgCluster, RedisProbe, RedisServer, WorkerConfig, SYNC_PROBE_MAPPING, SYNC_PROBE_TABLE,
};

/// Generous: the machine is shared and has two cores.
const WAIT: Duration = Duration::from_secs(60);

const ITEMS_MAPPING: &str =
    "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n[table.truncate]\npatterns = [\"item:*\"]\n";

/// `items`, mapped.
const ITEMS_SQL: &str = "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0); \
     INSERT INTO items (id) SELECT g FROM generate_series(1, 10) g";

/// `likes`: not mapped, an aggregate the application keeps, whose cache is
/// invalidated by a trigger that declares it (a counter cache).
const LIKES_SQL: &str = "
CREATE TABLE likes (item_id int PRIMARY KEY, n int NOT NULL DEFAULT 0);
INSERT INTO likes (item_id) SELECT g FROM generate_series(1, 10) g;
CREATE FUNCTION likes_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM cache_invalidator.invalidate(
        keys => ARRAY['item:' || NEW.item_id || ':likes'],
        versions => ARRAY['leaderboard']);
    RETURN NEW;
END $$;
CREATE TRIGGER likes_changed AFTER UPDATE ON likes FOR EACH ROW EXECUTE FUNCTION likes_changed();
";

fn prepare(pg: &PgCluster, redis: &RedisServer, worker_toml: &str) -> WorkerConfig {
    pg.psql(ITEMS_SQL);
    let cfg = WorkerConfig::new(
        pg,
        redis,
        &support::with_sync_probe(pg, &[("items.toml", ITEMS_MAPPING)]),
        worker_toml,
    );
    let out = cfg.run_setup(&[]);
    assert!(
        out.contains("CREATE OR REPLACE FUNCTION cache_invalidator.invalidate("),
        "setup prints the API it installs:\n{out}"
    );
    let (code, out, err) = cfg.command(&["setup", "--grant-execute", "app"]);
    assert_eq!(
        code, 2,
        "--grant-execute of a missing role must fail:\n{out}{err}"
    );
    assert!(err.contains("--grant-execute \"app\""), "{err}");
    pg.psql("CREATE ROLE app LOGIN; GRANT SELECT, UPDATE ON items TO app");
    let (code, out, err) = cfg.command(&["setup", "--grant-execute", "app"]);
    assert_eq!(code, 0, "setup failed:\n{out}\n{err}");
    assert!(
        out.contains("GRANT EXECUTE ON FUNCTION cache_invalidator.invalidate"),
        "{out}"
    );
    assert!(!out.contains("CREATE OR REPLACE"), "reinstalled:\n{out}");
    // Idempotent: a second run changes nothing.
    let (code, out, err) = cfg.command(&["setup", "--grant-execute", "app"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("nothing to do"), "second setup ran:\n{out}");
    psql_as(pg, "postgres", LIKES_SQL).expect("likes schema");
    cfg
}

/// Runs SQL through psql as `user` (each statement in autocommit unless the
/// SQL says otherwise): stdout, or stderr on failure.
fn psql_as(pg: &PgCluster, user: &str, sql: &str) -> Result<String, String> {
    let out = psql_command(pg, user)
        .arg("-c")
        .arg(sql)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn psql_command(pg: &PgCluster, user: &str) -> Command {
    let mut c = Command::new(support::pg_bindir().join("psql"));
    c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-U", user])
        .args(["-d", "postgres", "-h"])
        .arg(pg.socket_dir())
        .arg("-p")
        .arg(pg.port().to_string());
    c
}

/// A psql session fed line by line: a transaction can stay open while the
/// test looks at Redis.
struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Session {
    fn open(pg: &PgCluster, user: &str) -> Session {
        let mut child = psql_command(pg, user)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql");
        let stdin = child.stdin.take();
        Session { child, stdin }
    }

    fn send(&mut self, sql: &str) {
        let stdin = self.stdin.as_mut().expect("open session");
        writeln!(stdin, "{sql}").expect("write to psql");
        stdin.flush().expect("flush psql");
    }

    /// Waits until the server shows this session's transaction holding an xid
    /// (the statements sent so far ran).
    fn wait_running(&self, pg: &PgCluster) {
        support::wait_for("the session's transaction to run", WAIT, || {
            let n = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND state = 'idle in transaction'");
            (n.trim() != "0").then_some(())
        });
    }

    fn finish(mut self) -> (bool, String) {
        drop(self.stdin.take());
        let out = self.child.wait_with_output().expect("psql");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Cached keys, then transactions that declare their invalidation: the
/// committed one is applied after (and only after) its commit, the rolled
/// back one never, the trigger of an aggregate table's update declares its
/// counter cache's key and bumps a version.
#[test]
fn declared_invalidations_apply_after_commit_and_never_on_rollback() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let cfg = prepare(&pg, &redis, "");
    let _worker = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);
    let mut r = RedisProbe::new(&redis);
    for k in ["report:weekly", "report:daily", "item:3:likes"] {
        r.set(k, "cached");
    }
    r.sadd("tag:reports", "reports:page:1");
    r.set("reports:page:1", "cached");

    // Open: declared, not committed. The worker applies later commits, not this.
    let mut s = Session::open(&pg, "app");
    s.send("BEGIN;");
    s.send("SELECT cache_invalidator.invalidate(keys => ARRAY['report:weekly'], tags => ARRAY['reports']);");
    s.wait_running(&pg);
    support::sync_worker(&pg, &redis, WAIT);
    assert!(r.exists("report:weekly"), "applied before the commit");
    assert!(r.exists("reports:page:1"), "tag applied before the commit");
    s.send("COMMIT;");
    let (ok, err) = s.finish();
    assert!(ok, "{err}");
    r.wait_gone("report:weekly", WAIT);
    r.wait_gone("reports:page:1", WAIT);

    // Rolled back: never.
    let mut s = Session::open(&pg, "app");
    s.send("BEGIN;");
    s.send("SELECT cache_invalidator.invalidate(keys => ARRAY['report:daily']);");
    s.send("ROLLBACK;");
    let (ok, err) = s.finish();
    assert!(ok, "{err}");
    support::sync_worker(&pg, &redis, WAIT);
    assert!(
        r.exists("report:daily"),
        "a rolled-back declaration was applied"
    );

    // From a trigger on an aggregate table (not mapped, not published).
    r.set("version:leaderboard", "5");
    pg.psql("UPDATE likes SET n = n + 1 WHERE item_id = 3");
    r.wait_gone("item:3:likes", WAIT);
    support::sync_worker(&pg, &redis, WAIT);
    assert_eq!(r.get("version:leaderboard").as_deref(), Some("6"));
    assert!(r.exists("report:daily"));
}

/// A transaction that updates a mapped row and declares a key: one batch,
/// so one UNLINK carries both (seen with MONITOR), and both are acknowledged
/// with the transaction.
#[test]
fn declared_and_mapped_invalidations_of_one_transaction_share_a_batch() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let cfg = prepare(&pg, &redis, "");
    let _worker = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);
    let monitor_log = cfg.file("monitor.log", "");
    let mut monitor = Command::new("redis-cli")
        .args(["-p", &redis.port().to_string(), "monitor"])
        .stdout(std::fs::File::create(&monitor_log).expect("monitor log"))
        .spawn()
        .expect("redis-cli monitor");
    // MONITOR lines reach the file in command order: once a marker set
    // after some command is in the file, so is that command.
    let wait_for_marker = |marker: &str| {
        support::wait_for("MONITOR to show the marker", WAIT, || {
            RedisProbe::new(&redis).set(marker, "x");
            std::fs::read_to_string(&monitor_log)
                .ok()
                .filter(|t| t.contains(marker))
                .map(|_| ())
        })
    };
    wait_for_marker("monitor:started");
    let mut r = RedisProbe::new(&redis);
    r.set("item:4", "cached");
    r.set("item:4:summary", "cached");
    let lsn = pg.psql(
        "BEGIN; UPDATE items SET v = v + 1 WHERE id = 4; \
         SELECT cache_invalidator.invalidate(keys => ARRAY['item:4:summary']); \
         SELECT pg_current_wal_insert_lsn(); COMMIT;",
    );
    r.wait_gone("item:4", WAIT);
    r.wait_gone("item:4:summary", WAIT);
    pg.wait_confirmed(lsn.lines().last().unwrap_or_default().trim(), WAIT);
    // Killing the monitor right away could lose lines it had not written yet.
    wait_for_marker("monitor:done");
    let _ = monitor.kill();
    let _ = monitor.wait();
    let log = std::fs::read_to_string(&monitor_log).expect("monitor log");
    let unlinks: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"UNLINK\"") && l.contains("item:4"))
        .collect();
    assert!(
        unlinks
            .iter()
            .any(|l| l.contains("\"item:4\"") && l.contains("\"item:4:summary\"")),
        "the mapped key and the declared key were not unlinked by one command:\n{}",
        unlinks.join("\n")
    );
}

/// The worker dies after applying a transaction's declared invalidation but
/// before acknowledging it: PostgreSQL sends the transaction again and the
/// restarted worker applies it again.
#[test]
fn declared_invalidation_is_applied_again_after_a_crash_before_acknowledging() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let cfg = prepare(&pg, &redis, "");
    let mut w = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);
    assert_eq!(w.stop(WAIT), Some(0), "{}", w.log());

    let mut r = RedisProbe::new(&redis);
    r.set("report:monthly", "cached");
    let before = pg.psql("SELECT pg_current_wal_insert_lsn()");
    pg.psql("SELECT cache_invalidator.invalidate(keys => ARRAY['report:monthly'])");
    let env = [("CACHE_INVALIDATOR_FAILPOINT", "after_apply_before_ack")];
    let mut crashed = false;
    for _ in 0..10 {
        let mut w = cfg.spawn_worker_with_env(&env);
        support::wait_for("the failpoint abort", WAIT, || w.try_exit_code());
        assert!(w
            .log()
            .contains("failpoint after_apply_before_ack: aborting"));
        if !r.exists("report:monthly") {
            crashed = true;
            break;
        }
    }
    assert!(crashed, "the failpoint never hit the declared invalidation");
    let confirmed = pg.psql(&format!(
        "SELECT confirmed_flush_lsn <= '{}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cache_invalidator'",
        before.trim()
    ));
    assert_eq!(
        confirmed, "t",
        "acknowledged although the worker died first"
    );
    r.set("report:monthly", "cached again");
    let _w = cfg.spawn_worker();
    r.wait_gone("report:monthly", WAIT);
}

/// SIGKILL while Redis holds the worker's writes (`CLIENT PAUSE WRITE`): the
/// declared invalidation was planned (counted) but neither applied nor
/// acknowledged; the restarted worker gets the transaction again and applies it.
#[test]
fn declared_invalidation_survives_a_sigkill_before_acknowledging() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let port = support::free_port();
    let cfg = prepare(&pg, &redis, &support::metrics_toml(port));
    let mut w = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);
    let mut r = RedisProbe::new(&redis);
    r.set("report:yearly", "cached");
    redis
        .cli(&["CLIENT", "PAUSE", "600000", "WRITE"])
        .expect("CLIENT PAUSE");
    let before = pg.psql("SELECT pg_current_wal_insert_lsn()");
    pg.psql("SELECT cache_invalidator.invalidate(keys => ARRAY['report:yearly'])");
    support::wait_for("the worker to plan the declaration", WAIT, || {
        support::http_get(port, "/metrics").map(|(_, body)| body).filter(|m| {
            m.contains(r#"cache_invalidator_requested_invalidations_total{source="declared",kind="keys"} 1"#)
        })
    });
    w.kill();
    redis.cli(&["CLIENT", "UNPAUSE"]).expect("CLIENT UNPAUSE");
    let confirmed = pg.psql(&format!(
        "SELECT confirmed_flush_lsn <= '{}'::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cache_invalidator'",
        before.trim()
    ));
    assert_eq!(confirmed, "t", "acknowledged although Redis never ran it");
    // Whatever the killed worker's connection had sent is gone with it.
    r.set("report:yearly", "cached again");
    let _w = cfg.spawn_worker();
    r.wait_gone("report:yearly", WAIT);
}

/// Over the limits, NULLs and wrong shapes: the SQL function raises inside
/// the caller's transaction, which aborts (its row change is not committed);
/// a role without the grant cannot call it.
#[test]
fn bad_calls_abort_the_callers_transaction_with_a_clear_error() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let _cfg = prepare(&pg, &redis, "");
    let cases = [
        (
            "keys => (SELECT array_agg('k' || g) FROM generate_series(1, 10001) g)",
            "10001 entries in one call, over the limit of 10000",
        ),
        (
            "keys => ARRAY[repeat('k', 65537)]",
            "an entry is longer than 65536 bytes",
        ),
        (
            "keys => (SELECT array_agg(repeat('k', 60000) || g) FROM generate_series(1, 20) g)",
            "over the limit of 1048576",
        ),
        (
            "keys => ARRAY['a', NULL]",
            "must not contain NULL or empty strings",
        ),
        (
            "tags => ARRAY['']",
            "must not contain NULL or empty strings",
        ),
        (
            "channels => '{\"channel\": \"c\"}'",
            "channels must be a JSON array",
        ),
        (
            "channels => '[{\"chanel\": \"c\"}]'",
            "each entry of channels must be",
        ),
    ];
    for (args, want) in cases {
        let err = psql_as(
            &pg,
            "app",
            &format!(
                "BEGIN; UPDATE items SET v = 100 WHERE id = 1; SELECT cache_invalidator.invalidate({args}); COMMIT;"
            ),
        )
        .expect_err(args);
        assert!(err.contains(want), "{args}: {err}");
    }
    // Run as app: the UPDATE needs a grant.
    assert_eq!(pg.psql("SELECT v FROM items WHERE id = 1"), "0");
    let err = psql_as(
        &pg,
        "postgres",
        "BEGIN; UPDATE items SET v = 100 WHERE id = 1; SELECT cache_invalidator.invalidate(keys => ARRAY['a', NULL]); COMMIT;",
    )
    .expect_err("NULL key");
    assert!(err.contains("must not contain NULL"), "{err}");
    assert_eq!(
        pg.psql("SELECT v FROM items WHERE id = 1"),
        "0",
        "the caller's transaction committed"
    );
    pg.psql("CREATE ROLE stranger LOGIN");
    let err = psql_as(
        &pg,
        "stranger",
        "SELECT cache_invalidator.invalidate(keys => ARRAY['a'])",
    )
    .expect_err("no grant");
    assert!(err.contains("permission denied"), "{err}");
    psql_as(&pg, "app", "SELECT cache_invalidator.flush_table('items')").expect("flush_table");
    let err = psql_as(
        &pg,
        "stranger",
        "SELECT cache_invalidator.flush_table('items')",
    )
    .expect_err("no grant");
    assert!(err.contains("permission denied"), "{err}");
}

/// A message under our prefix that is not a valid declaration (emitted with
/// `pg_logical_emit_message` directly): counted, logged with its LSN,
/// answered with every mapped table's truncate invalidations; later
/// transactions are applied as usual.
#[test]
fn malformed_message_is_counted_logged_and_flushes_everything() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let port = support::free_port();
    let cfg = prepare(&pg, &redis, &support::metrics_toml(port));
    let w = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);
    let mut r = RedisProbe::new(&redis);
    r.set("item:7", "cached");
    r.set("unmapped:key", "kept");
    let before = lsn_of(&pg.psql("SELECT pg_current_wal_insert_lsn()"));
    pg.psql(
        "SELECT pg_logical_emit_message(true, 'cache-invalidator', 'invalidate:v1:{\"keys\": [\"x\"')",
    );
    let after = lsn_of(&pg.psql("SELECT pg_current_wal_insert_lsn()"));
    r.wait_gone("item:7", WAIT);
    w.wait_log("could not be understood", WAIT);
    let log = w.log();
    let line = log
        .lines()
        .find(|l| l.contains("could not be understood"))
        .expect("log line");
    let line = support::strip_ansi(line);
    let logged = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("lsn="))
        .map(lsn_of)
        .unwrap_or_else(|| panic!("no lsn= in {line}"));
    assert!(
        (before..=after).contains(&logged),
        "logged LSN {logged:X} outside [{before:X}, {after:X}]: {line}"
    );
    assert!(line.contains("invalid payload"), "{line}");
    assert!(
        r.exists("unmapped:key"),
        "a key no mapping derives was deleted"
    );
    // The stream goes on: an unknown version, then an ordinary declaration.
    r.set("item:8", "cached");
    pg.psql("SELECT pg_logical_emit_message(true, 'cache-invalidator', 'invalidate:v7:{}')");
    r.wait_gone("item:8", WAIT);
    r.set("report:x", "cached");
    pg.psql(
        "SELECT cache_invalidator.invalidate(keys => ARRAY['report:x'], tags => ARRAY['t1', 't2'])",
    );
    r.wait_gone("report:x", WAIT);
    support::sync_worker(&pg, &redis, WAIT);
    assert!(r.exists("unmapped:key"));
    let metrics = support::wait_for("the metrics to count both", WAIT, || {
        let m = support::http_get(port, "/metrics").map(|(_, body)| body)?;
        (m.contains(r#"cache_invalidator_flushes_total{reason="malformed_message"} 2"#)
            && m.contains(r#"cache_invalidator_requested_invalidations_total{source="declared",kind="tags"} 2"#))
        .then_some(m)
    });
    assert!(
        metrics.contains(
            r#"cache_invalidator_requested_invalidations_total{source="declared",kind="keys"} 1"#
        ),
        "{metrics}"
    );
    assert_eq!(
        w.log().matches("could not be understood").count(),
        2,
        "one line per malformed message:\n{}",
        w.log()
    );
}

/// `X/Y` (hex) as a number.
fn lsn_of(text: &str) -> u64 {
    let clean: String = text
        .chars()
        .filter(|c| c.is_ascii_hexdigit() || *c == '/')
        .collect();
    let (hi, lo) = clean.split_once('/').unwrap_or(("0", "0"));
    (u64::from_str_radix(hi, 16).unwrap_or(0) << 32) | u64::from_str_radix(lo, 16).unwrap_or(0)
}

/// `setup --print-sql` prints the API without connecting; applied by psql (a
/// migration tool), `setup` then finds it current and runs none of it.
#[test]
fn print_sql_is_what_setup_installs() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.psql(SYNC_PROBE_TABLE);
    pg.psql("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)");
    pg.psql("CREATE ROLE app LOGIN");
    let cfg = WorkerConfig::urls(
        "postgres://nobody@127.0.0.1:1/none",
        &redis.url(),
        "cache_invalidator",
    );
    cfg.mapping("items.toml", ITEMS_MAPPING);
    cfg.mapping("zz_sync.toml", SYNC_PROBE_MAPPING);
    let (code, sql, err) = cfg.command(&["setup", "--print-sql", "--grant-execute", "app"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        sql.contains("VALUES ('public', 'items'), ('public', 'sync_probe')"),
        "{sql}"
    );
    let mut psql = psql_command(&pg, "postgres")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("psql");
    psql.stdin
        .take()
        .expect("stdin")
        .write_all(sql.as_bytes())
        .expect("write");
    assert!(
        psql.wait().expect("psql").success(),
        "the printed SQL failed"
    );
    psql_as(
        &pg,
        "app",
        "SELECT cache_invalidator.invalidate(keys => ARRAY['k'])",
    )
    .expect("granted by the printed SQL");
    let cfg = WorkerConfig::new(
        &pg,
        &redis,
        &[
            ("items.toml", ITEMS_MAPPING),
            ("zz_sync.toml", SYNC_PROBE_MAPPING),
        ],
        "",
    );
    let (code, out, err) = cfg.command(&["setup", "--grant-execute", "app"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains("cache_invalidator."),
        "setup reinstalled the API:\n{out}"
    );
}
