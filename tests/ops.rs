//! Operations commands against real servers: `setup`, live `check`, `flush`,
//! `status` and `replay --apply`, each run as the built binary over a config
//! written into a temp dir that points at throwaway PostgreSQL and Redis.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{PgCluster, RedisProbe, RedisServer, WorkerConfig};

/// Messages carrying `content` the slot would decode (peeked, not consumed).
fn count_markers(pg: &PgCluster, content: &str) -> usize {
    pg.psql(&format!(
        "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('cache_invalidator', NULL, NULL, \
         'proto_version', '1', 'publication_names', 'cache_invalidator', 'messages', 'true') \
         WHERE position(convert_to('{content}', 'UTF8') IN data) > 0"
    ))
    .parse()
    .expect("count")
}

/// Waits until the slot decodes `expected` messages carrying `content`, then
/// checks no more arrive. (The test clusters run with `synchronous_commit =
/// off`: a commit becomes decodable a moment after it returns.)
fn markers(pg: &PgCluster, content: &str, expected: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut n = count_markers(pg, content);
    while n < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        n = count_markers(pg, content);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count_markers(pg, content), expected, "messages {content:?}");
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// A Redis holding `keys` and the tag set `tag` with `member`, and a config
/// for it (the demo mappings; PostgreSQL unreachable): for the commands that
/// only write to Redis.
fn cached(keys: &[&str], (tag, member): (&str, &str)) -> (RedisServer, WorkerConfig, RedisProbe) {
    let redis = RedisServer::start();
    let ws = WorkerConfig::urls(
        "postgres://postgres@127.0.0.1:1/postgres",
        &redis.url(),
        "p",
    )
    .with_demo_mappings();
    let mut probe = RedisProbe::new(&redis);
    for k in keys {
        probe.set(k, "v");
    }
    probe.sadd(tag, member);
    (redis, ws, probe)
}

/// Asserts every one of `keys` is gone, deleted by `by`.
fn assert_gone(probe: &mut RedisProbe, keys: &[&str], by: &str) {
    for k in keys {
        assert!(!probe.exists(k), "{k} survived {by}");
    }
}

#[test]
fn setup_creates_publication_then_slot_once_and_marks_added_tables() {
    let pg = PgCluster::start();
    pg.migrate();
    let ws = WorkerConfig::urls(&pg.url(), "redis://127.0.0.1:1/0", "cache_invalidator")
        .with_demo_mappings();

    // status before setup: a runtime probe that says what to do.
    let (code, out, _) = ws.command(&["status", "--json"]);
    assert_eq!(code, 1);
    let s = json(&out);
    assert_eq!(s["slot_exists"], false);
    assert_eq!(s["publication_exists"], false);
    assert!(s["problem"]
        .as_str()
        .unwrap()
        .contains("run `cache-invalidator setup`"));
    let (code, out, err) = ws.command(&["status"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        out.contains("missing") && err.contains("cache-invalidator setup"),
        "{out}{err}"
    );

    let (code, out, err) = ws.command(&["setup", "--replica-identity-full"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("SET lock_timeout = '5s';"), "{out}");
    assert!(
        out.contains("ALTER TABLE \"public\".\"posts\" REPLICA IDENTITY FULL;"),
        "{out}"
    );
    assert!(
        out.contains("whole old row of every UPDATE and DELETE"),
        "{out}"
    );
    let create_pub = out
        .find("CREATE PUBLICATION \"cache_invalidator\" FOR TABLE")
        .expect("CREATE PUBLICATION");
    let create_slot = out
        .find("pg_create_logical_replication_slot('cache_invalidator', 'pgoutput'")
        .expect("slot");
    // Failover-enabled where the server has failover slots (17+).
    if support::pg_major() >= 17 {
        assert!(
            out.contains("pg_create_logical_replication_slot('cache_invalidator', 'pgoutput', false, false, true);"),
            "{out}"
        );
    } else {
        assert!(out.contains("has no failover slots (17+)"), "{out}");
    }
    assert!(create_pub < create_slot, "publication before slot: {out}");
    assert!(out.contains("WITH (publish_via_partition_root = true)"));
    assert!(out.contains("pg_logical_emit_message(true, 'cache-invalidator', 'flush:all')"));
    assert!(
        !out.contains("\"users\" REPLICA IDENTITY"),
        "only tables whose rules need old values: {out}"
    );

    assert_eq!(
        pg.psql("SELECT relreplident FROM pg_class WHERE relname = 'posts'"),
        "f"
    );
    assert_eq!(
        pg.psql("SELECT relreplident FROM pg_class WHERE relname = 'users'"),
        "d"
    );
    assert_eq!(pg.psql("SELECT pubviaroot, puballtables FROM pg_publication WHERE pubname = 'cache_invalidator'"), "t|f");
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'cache_invalidator'"),
        "5"
    );
    assert_eq!(
        pg.psql("SELECT plugin FROM pg_replication_slots WHERE slot_name = 'cache_invalidator'"),
        "pgoutput"
    );
    markers(&pg, "flush:all", 1);

    // The demo mappings pass the live check once setup ran.
    let (code, out, err) = ws.command(&["check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!err.contains("error:"), "{err}");

    // Idempotent: nothing runs, no new marker.
    let (code, out, err) = ws.command(&["setup", "--replica-identity-full"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("nothing to do"), "{out}");
    markers(&pg, "flush:all", 1);
    markers(&pg, "flush:", 1);

    let (code, out, err) = ws.command(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let s = json(&out);
    assert_eq!(s["slot_exists"], true);
    assert_eq!(s["plugin"], "pgoutput");
    assert_eq!(s["active"], false);
    assert_eq!(s["streaming"], false);
    assert!(s["confirmed_flush_lsn"].as_str().unwrap().contains('/'));
    assert!(s["lag_bytes"].as_i64().unwrap() >= 0);
    assert!(s["retained_wal_bytes"].as_i64().unwrap() >= 0);
    assert_eq!(s["wal_status"], "reserved");
    assert_eq!(s["publish_via_partition_root"], true);
    assert_eq!(s["publication_tables"].as_array().unwrap().len(), 5);
    let (code, out, _) = ws.command(&["status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("inactive: no worker streams it") && out.contains("WAL retained"),
        "{out}"
    );

    // A new mapped table: added to the publication and marked for a flush.
    pg.psql("CREATE TABLE tags (id bigint PRIMARY KEY, label text)");
    ws.mapping(
        "tags.toml",
        "[[table]]\nname = \"tags\"\nkeys = [\"tag-page:{id}\"]\n",
    );
    let (code, out, err) = ws.command(&["setup"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("ALTER PUBLICATION \"cache_invalidator\" ADD TABLE \"public\".\"tags\";"),
        "{out}"
    );
    assert!(out.contains("'flush:table:public.tags'"), "{out}");
    markers(&pg, "flush:table:public.tags", 1);
    markers(&pg, "flush:all", 1);
}

#[test]
fn setup_refuses_a_table_without_replica_identity_unless_asked() {
    let pg = PgCluster::start();
    pg.psql("CREATE TABLE nopk (a int, b text)");
    let ws = WorkerConfig::urls(&pg.url(), "redis://127.0.0.1:1/0", "cache_invalidator");
    ws.mapping(
        "nopk.toml",
        "[[table]]\nname = \"nopk\"\nkeys = [\"nopk:{a}\"]\n",
    );

    let (code, out, err) = ws.command(&["setup"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("public.nopk") && err.contains("no usable replica identity"),
        "{err}"
    );
    assert!(err.contains("rejects every UPDATE and DELETE"), "{err}");
    assert!(err.contains("--replica-identity-full"), "{err}");
    assert_eq!(pg.psql("SELECT count(*) FROM pg_publication"), "0");
    assert_eq!(pg.psql("SELECT count(*) FROM pg_replication_slots"), "0");
    assert_eq!(
        pg.psql("SELECT relreplident FROM pg_class WHERE relname = 'nopk'"),
        "d"
    );

    let (code, out, err) = ws.command(&["setup", "--replica-identity-full"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        pg.psql("SELECT relreplident FROM pg_class WHERE relname = 'nopk'"),
        "f"
    );
    markers(&pg, "flush:all", 1);
}

#[test]
fn check_refuses_what_the_live_catalog_and_redis_would_break() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.migrate();
    pg.psql(
        "CREATE VIEW v_users AS SELECT id, name FROM users;
         CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
         CREATE TABLE gen (id int PRIMARY KEY, a int, g int GENERATED ALWAYS AS (a * 2) STORED);
         CREATE TABLE events (id int, day date, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
         CREATE PUBLICATION hand_made FOR TABLE users, posts WHERE (id > 0), team_members (user_id), events
           WITH (publish = 'insert, delete');",
    );
    let mut conn = redis.client().get_connection().expect("redis");
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query::<()>(&mut conn)
        .expect("CONFIG SET");

    let ws = WorkerConfig::urls(&pg.url(), &redis.url(), "hand_made");
    ws.mapping(
        "m.toml",
        r#"
[[table]]
name = "nosuch"
keys = ["x:{id}"]

[[table]]
name = "users"
keys = ["user:{nme}"]

[[table]]
name = "v_users"
keys = ["vu:{id}"]

[[table]]
name = "scratch"
keys = ["s:{id}"]

[[table]]
name = "gen"
keys = ["gen:{g}"]

[[table]]
name = "posts"
keys = ["post:{id}", "author:{author_id}:posts"]

[[table]]
name = "team_members"
keys = ["team:{team_id}:members"]

[[table]]
name = "events"
keys = ["event:{id}"]
"#,
    );
    let (code, out, err) = ws.command(&["check"]);
    assert_eq!(code, 2, "{out}\n{err}");
    for needle in [
        "table public.nosuch does not exist",
        "table public.users has no column `nme`: did you mean `name`?",
        "public.v_users is a view (relkind 'v')",
        "public.scratch is UNLOGGED",
        "column `g` of public.gen is generated",
        "the publication does not publish updates",
        "row filter on public.posts (WHERE (id > 0))",
        "column list on public.team_members hides column(s) team_id",
        "public.events is partitioned but the publication is not `publish_via_partition_root = true`",
        "max_slot_wal_keep_size = -1",
        "Redis maxmemory-policy is allkeys-lru",
        // The posts rule without REPLICA IDENTITY FULL, with the three fixes.
        "table public.posts: the rule renders old values of column(s) author_id",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let posts = err
        .lines()
        .find(|l| l.contains("renders old values"))
        .unwrap();
    assert!(
        posts.contains("setup --replica-identity-full")
            && posts.contains("assume_unchanged")
            && posts.contains("narrow `on`"),
        "{posts}"
    );
    assert!(err.contains("warning: max_slot_wal_keep_size"), "{err}");
    // `run` refuses an evicting Redis, so `check` does too.
    assert!(err.contains("error: Redis maxmemory-policy"), "{err}");

    // An unreachable database only skips the catalog part.
    let down = WorkerConfig::urls(
        "postgres://postgres:hunter2@127.0.0.1:1/postgres",
        "redis://127.0.0.1:1/0",
        "p",
    )
    .with_demo_mappings();
    let (code, out, err) = down.command(&["check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("warning: catalog checks skipped: cannot connect to PostgreSQL"),
        "{err}"
    );
    assert!(err.contains("warning: Redis checks skipped"), "{err}");
    assert!(
        !err.contains("hunter2") && !out.contains("hunter2"),
        "password printed: {err}"
    );
}

#[test]
fn flush_fires_truncate_invalidations_and_keeps_other_keys() {
    let (_redis, ws, mut probe) = cached(
        &[
            "user:1:profile",
            "user:2:avatar",
            "post:7",
            "author:1:posts",
            "team:5:members",
            "member-list",
            "control:keep",
        ],
        ("tag:user:1", "member-list"),
    );

    let (code, out, err) = ws.command(&["flush", "--table", "nosuch"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("public.nosuch is not mapped")
            && err.contains("public.posts")
            && err.contains("public.users"),
        "{err}"
    );

    let (code, out2, err) = ws.command(&["flush", "--table", "posts"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out2.contains("flushed public.posts"), "{out2}");
    assert!(!probe.exists("post:7") && !probe.exists("author:1:posts"));
    assert!(probe.exists("user:1:profile"));

    let (code, out, err) = ws.command(&["flush"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("flushed all 5 mapped table(s)"), "{out}");
    assert_gone(
        &mut probe,
        &[
            "user:1:profile",
            "user:2:avatar",
            "team:5:members",
            "member-list",
            "tag:user:1",
        ],
        "the flush",
    );
    assert!(probe.exists("control:keep"));
}

#[test]
fn replay_apply_deletes_the_keys_of_a_recorded_file() {
    let (_redis, ws, mut probe) = cached(
        &[
            "post:7",
            "post:9",
            "author:1:posts",
            "author:2:posts",
            "author-page:1",
            "control:keep",
        ],
        ("tag:author:1", "author-page:1"),
    );
    let fixture = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/replay/blog.jsonl"),
    )
    .unwrap();
    let first_two: String = fixture.lines().take(2).map(|l| format!("{l}\n")).collect();
    let file = ws.file("rec.jsonl", &first_two);

    let (code, out, err) = ws.command(&["replay", "--apply", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.lines()
            .next()
            .unwrap()
            .contains("\"keys\":[\"author:1:posts\",\"author:2:posts\",\"post:7\"]"),
        "{out}"
    );
    assert_gone(
        &mut probe,
        &[
            "post:7",
            "author:1:posts",
            "author:2:posts",
            "author-page:1",
            "tag:author:1",
        ],
        "replay --apply",
    );
    assert!(probe.exists("post:9") && probe.exists("control:keep"));
}

/// Makes `cfg`'s `[postgres] url` (`pg`'s) set `application_name = name`.
fn set_application_name(cfg: &WorkerConfig, pg: &PgCluster, name: &str) {
    let text = std::fs::read_to_string(cfg.path()).expect("config");
    let url = pg.url();
    assert!(text.contains(&url), "{text}");
    let text = text.replace(&url, &format!("{url}?application_name={name}"));
    std::fs::write(cfg.path(), text).expect("write config");
}

/// `status` names the worker streaming the slot (its application name and
/// address from `pg_stat_replication`), not only the walsender's PID, and
/// recognises it by the application name its own config sets.
#[test]
fn status_names_the_worker_that_streams_the_slot() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let cfg = WorkerConfig::new(&pg, &redis, &support::with_sync_probe(&pg, &[]), "");
    cfg.run_setup(&[]);
    let streaming = |app: &str| {
        let mut worker = cfg.spawn_worker();
        support::sync_worker(&pg, &redis, Duration::from_secs(60));
        let (code, out, err) = cfg.command(&["status", "--json"]);
        assert_eq!(code, 0, "{out}\n{err}");
        let s = json(&out);
        assert_eq!(s["active"], true, "{s}");
        assert_eq!(s["streaming"], true, "{s}");
        let c = &s["client"];
        assert_eq!(c["application_name"], app, "{s}");
        assert_eq!(c["client_addr"], "127.0.0.1", "{s}");
        let port = c["client_port"].as_i64().expect("client_port");
        assert!(port > 0, "{s}");
        assert!(c["backend_start"].as_str().is_some(), "{s}");
        let (code, out, _) = cfg.command(&["status"]);
        assert_eq!(code, 0);
        assert!(
            out.contains(&format!(
                "a worker streams it: application_name {app:?} from 127.0.0.1:{port}"
            )),
            "{out}"
        );
        assert_eq!(
            worker.stop(Duration::from_secs(10)),
            Some(0),
            "{}",
            worker.log()
        );
    };
    streaming("cache-invalidator");

    // Another application_name in the URL: still recognised as ours.
    set_application_name(&cfg, &pg, "billing-cache");
    streaming("billing-cache");
}

/// `check` warns when `synchronous_standby_names` names the worker: by the
/// application name its own URL sets, not only the default.
#[test]
fn check_warns_when_synchronous_standby_names_names_the_worker() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let cfg = WorkerConfig::new(&pg, &redis, &support::with_sync_probe(&pg, &[]), "");
    cfg.run_setup(&[]);
    set_application_name(&cfg, &pg, "billing-cache");
    // Read-only from here: a commit would wait for that standby.
    pg.psql("ALTER SYSTEM SET synchronous_standby_names = '\"billing-cache\"'");
    pg.psql("SELECT pg_reload_conf()");
    let (code, out, err) = cfg.command(&["check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("matches `billing-cache`: the worker would become a synchronous standby"),
        "{out}\n{err}"
    );
}

/// A failed command keeps its cause: `main` prints the message (what failed,
/// what to do) and then the cause on its own line, and a cause the message
/// already names is not printed twice.
#[test]
fn a_failed_command_prints_its_cause_once() {
    let ws = WorkerConfig::urls(
        "postgres://postgres@127.0.0.1:1/postgres",
        "redis://127.0.0.1:1",
        "p",
    )
    .with_demo_mappings();
    let missing = ws.path().with_file_name("missing.jsonl");
    let (code, out, err) = ws.command(&["replay", missing.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}\n{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("error:") || l.starts_with("  caused by:"))
        .collect();
    assert_eq!(
        lines,
        [
            format!("error: cannot read {}", missing.display()).as_str(),
            "  caused by: No such file or directory (os error 2)",
        ],
        "{err}"
    );
    // LoadError names the OS error in its message: no second line for it.
    let out = std::process::Command::new(support::binary())
        .args(["--config", "/nonexistent/cache-invalidator.toml", "check"])
        .env_remove("CACHE_INVALIDATOR_CONFIG")
        .output()
        .expect("run cache-invalidator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot read /nonexistent/cache-invalidator.toml"),
        "{err}"
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// Whether PUBLIC may execute some `pg_logical_emit_message` (`t`/`f`).
const PUBLIC_MAY_EMIT: &str = "SELECT bool_or(has_function_privilege('public', oid, 'EXECUTE')) FROM pg_proc WHERE proname = 'pg_logical_emit_message'";

/// `setup` recommends (never applies) revoking `pg_logical_emit_message` from
/// PUBLIC, with the grant back to the worker's role, as SQL that runs as
/// printed; once PUBLIC may no longer run it, it says nothing more.
#[test]
fn setup_recommends_revoking_emit_message_while_public_may_run_it() {
    let pg = PgCluster::start();
    pg.psql("CREATE TABLE items (id int PRIMARY KEY)");
    let ws = WorkerConfig::urls(&pg.url(), "redis://127.0.0.1:1/0", "cache_invalidator");
    ws.mapping(
        "items.toml",
        "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n",
    );
    let (code, out, err) = ws.command(&["setup"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("-- recommended (docs/security.md)"), "{out}");
    let advice: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("--   "))
        .filter(|l| l.contains("ON FUNCTION pg_logical_emit_message("))
        .collect();
    assert_eq!(advice.len(), 2, "{out}");
    assert!(advice[0].starts_with("REVOKE EXECUTE"), "{out}");
    assert!(
        // 17+ adds a `flush` boolean to both signatures.
        advice[0].contains("pg_logical_emit_message(boolean,text,text"),
        "{out}"
    );
    assert!(advice[1].starts_with("GRANT EXECUTE"), "{out}");
    assert!(advice[1].contains("TO postgres;"), "{out}");
    // Still executable by PUBLIC: setup did not apply it.
    assert_eq!(pg.psql(PUBLIC_MAY_EMIT), "t");
    for sql in &advice {
        pg.psql(sql);
    }
    assert_eq!(pg.psql(PUBLIC_MAY_EMIT), "f");
    let (code, out, err) = ws.command(&["setup"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains("recommended"), "{out}");
}

/// `setup` creates the slot over SQL; while the creation waits for a
/// transaction that was running when it started, a second connection names
/// that transaction's backend in the log, and `setup` finishes once it ends.
#[test]
fn setup_names_the_transaction_its_slot_creation_waits_for() {
    let pg = PgCluster::start();
    pg.psql("CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE other (x int)");
    let ws = WorkerConfig::urls(&pg.url(), "redis://127.0.0.1:1/0", "cache_invalidator");
    ws.mapping(
        "items.toml",
        "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n",
    );
    // An unmapped table's write holds a transaction id until the test ends
    // it, once the slot creation has waited for it long enough for setup's
    // second connection (it polls every second) to have named it: no race
    // with how fast setup gets there on a loaded machine.
    let mut blocker = pg
        .psql_command()
        .arg("-c")
        .arg("BEGIN; INSERT INTO other VALUES (1); SELECT pg_sleep(120); COMMIT;")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    let pid = support::wait_for("the blocking transaction", Duration::from_secs(10), || {
        let pid = pg.psql("SELECT pid FROM pg_stat_activity WHERE backend_xid IS NOT NULL");
        (!pid.is_empty()).then_some(pid)
    });
    let (code, out, err) = std::thread::scope(|scope| {
        scope.spawn(|| {
            support::wait_for(
                "the slot creation to wait 5 s",
                Duration::from_secs(60),
                || {
                    let waiting = pg.psql(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                     AND query LIKE '%pg_create_logical_replication_slot%' \
                     AND query NOT LIKE '%pg_stat_activity%' \
                     AND now() - query_start > interval '5 s'",
                    );
                    (waiting == "1").then_some(())
                },
            );
            pg.psql(&format!("SELECT pg_terminate_backend({pid})"));
        });
        ws.command(&["setup"])
    });
    let _ = blocker.wait();
    assert_eq!(code, 0, "{out}\n{err}");
    let named = err
        .lines()
        .find(|l| l.contains("slot creation waits for this transaction to end"))
        .unwrap_or_else(|| panic!("no blocking transaction logged: {err}"));
    assert!(named.contains(&format!("pid={pid}")), "{named}");
    assert!(
        out.contains("pg_create_logical_replication_slot('cache_invalidator', 'pgoutput'"),
        "{out}"
    );
}

/// `setup` run by a role that may not create the publication stops with
/// PostgreSQL's error once (no `caused by: db error` line under it) and says
/// which role would have the privilege.
#[test]
fn setup_without_a_privilege_says_which_role_has_it() {
    let pg = PgCluster::start();
    pg.psql(
        "CREATE TABLE items (id int PRIMARY KEY); \
         CREATE ROLE weak LOGIN REPLICATION; GRANT SELECT ON items TO weak",
    );
    let url = pg.url().replace("postgres://postgres@", "postgres://weak@");
    let ws = WorkerConfig::urls(&url, "redis://127.0.0.1:1/0", "cache_invalidator");
    ws.mapping(
        "items.toml",
        "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n",
    );
    let (code, out, err) = ws.command(&["setup"]);
    assert_eq!(code, 1, "{out}\n{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("error:") || l.starts_with("  caused by:"))
        .collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(
        lines[0].contains("lacks a privilege") && lines[0].contains("CREATE on the database"),
        "{err}"
    );
    assert!(
        lines[1].contains("CREATE PUBLICATION")
            && lines[1].contains("permission denied for database postgres (SQLSTATE 42501)"),
        "{err}"
    );
    assert_eq!(pg.psql("SELECT count(*) FROM pg_publication"), "0");
}
