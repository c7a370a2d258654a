//! `check` tells the truth: a table of broken configs, each run through both
//! `check` and `run` against real servers; wherever `run` refuses (or would
//! never get going), `check` exits non-zero, and both name the same problem.
//! And `setup` refuses what it cannot fix before it changes anything.

mod support;

use std::time::{Duration, Instant};

use support::{PgCluster, PgOptions, RedisServer, WorkerConfig};

const ITEMS: &str = "[[table]]\nname = \"items\"\nkeys = [\"item:{id}\"]\n";

/// Runs `run` until it exits (at most 60 s): (exit code, log).
fn run_exit(cfg: &WorkerConfig) -> (i32, String) {
    let mut worker = cfg.spawn_worker();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(code) = worker.try_exit_code() {
            return (code, worker.log());
        }
        assert!(
            Instant::now() < deadline,
            "run did not refuse within 60 s:\n{}",
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A config for `pg` and `redis` with the items mapping, optional extra
/// `[redis]` lines, and the PostgreSQL URL replaced when given.
fn config(pg: &PgCluster, redis_toml: &str, pg_url: Option<&str>, mapping: &str) -> WorkerConfig {
    let cfg = WorkerConfig::with_redis(pg, redis_toml, &[("m.toml", mapping)], "");
    if let Some(url) = pg_url {
        let text = std::fs::read_to_string(cfg.path()).unwrap();
        std::fs::write(cfg.path(), text.replace(&pg.url(), url)).unwrap();
    }
    cfg
}

/// `cfg` with `[postgres] replicas = [url]`.
fn with_replica(cfg: WorkerConfig, url: &str) -> WorkerConfig {
    let text = std::fs::read_to_string(cfg.path()).unwrap();
    let line = "publication = \"cache_invalidator\"\n";
    assert!(text.contains(line), "{text}");
    let text = text.replace(line, &format!("{line}replicas = [\"{url}\"]\n"));
    std::fs::write(cfg.path(), text).unwrap();
    cfg
}

#[test]
fn check_and_run_agree_on_every_broken_config() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    let locked = RedisServer::start();
    locked
        .cli(&["CONFIG", "SET", "requirepass", "right-password"])
        .unwrap();
    let evicting = RedisServer::start();
    evicting
        .cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"])
        .unwrap();
    pg.psql(
        "CREATE TABLE items (id int PRIMARY KEY, v int);
         CREATE TABLE nopk (id int, v int);
         CREATE TABLE events (id int, day date, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
         CREATE ROLE plain LOGIN;",
    );
    let good_redis = format!("url = \"{}\"", redis.url());
    // The good config: set up, then both check and run accept it.
    let good = config(&pg, &good_redis, None, ITEMS);
    let (code, out, err) = good.command(&["setup"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = good.command(&["check"]);
    assert_eq!(code, 0, "the good config must pass: {out}\n{err}");
    assert!(
        out.contains("checked against the catalog, the publication, the slot and Redis"),
        "{out}"
    );

    let port = pg.port();
    let cases: Vec<(&str, WorkerConfig, &str)> = vec![
        (
            "unparsable PostgreSQL URL",
            config(&pg, &good_redis, Some("postgres://postgres@127.0.0.1:notaport/postgres"), ITEMS),
            "invalid PostgreSQL connection string",
        ),
        (
            "unparsable Redis URL",
            config(&pg, "url = \"redis://127.0.0.1:notaport/0\"", None, ITEMS),
            "[redis] url: invalid Redis URL",
        ),
        (
            "missing PostgreSQL role",
            config(&pg, &good_redis, Some(&format!("postgres://nosuchrole@127.0.0.1:{port}/postgres")), ITEMS),
            "role \"nosuchrole\" does not exist",
        ),
        (
            "role without REPLICATION",
            config(&pg, &good_redis, Some(&format!("postgres://plain@127.0.0.1:{port}/postgres")), ITEMS),
            "may not start replication",
        ),
        (
            "partition mapped with its partitioned table",
            config(&pg, &good_redis, None, &format!("{ITEMS}[[table]]\nname = \"events\"\nkeys = [\"e:{{id}}\"]\n[[table]]\nname = \"events_2026\"\nkeys = [\"e:{{id}}\"]\n")),
            "is a partition of public.events",
        ),
        (
            "table without primary key",
            config(&pg, &good_redis, None, &format!("{ITEMS}[[table]]\nname = \"nopk\"\nkeys = [\"n:{{id}}\"]\n")),
            "has no usable replica identity",
        ),
        (
            "wrong Redis password",
            config(&pg, &format!("url = \"redis://:wrong-password@127.0.0.1:{}/0\"", locked.port()), None, ITEMS),
            "refused authentication",
        ),
        (
            "wait_replicas without a replica",
            config(&pg, &format!("{good_redis}\nwait_replicas = 1"), None, ITEMS),
            "wait_replicas = 1 but",
        ),
        (
            "maxmemory-policy allkeys-lru",
            config(&pg, &format!("url = \"{}\"", evicting.url()), None, ITEMS),
            "maxmemory-policy is allkeys-lru",
        ),
        (
            "a listed replica that is not a standby",
            with_replica(config(&pg, &good_redis, None, ITEMS), &pg.url()),
            "not a standby (pg_is_in_recovery() is false)",
        ),
    ];
    for (name, cfg, needle) in &cases {
        let (check_code, out, err) = cfg.command(&["check"]);
        let check_text = format!("{out}{err}");
        let (run_code, run_log) = run_exit(cfg);
        eprintln!("--- {name}: check {check_code}, run {run_code}");
        assert_ne!(check_code, 0, "{name}: check passed:\n{check_text}");
        assert_ne!(run_code, 0, "{name}: run exited 0:\n{run_log}");
        assert!(
            check_text.contains(needle),
            "{name}: check does not say {needle:?}:\n{check_text}"
        );
        assert!(
            run_log.contains(needle),
            "{name}: run does not say {needle:?}:\n{run_log}"
        );
    }
    // Authentication problems are runtime failures of `run` (exit 1, like a
    // wrong PostgreSQL password), not "unreachable" retried forever.
    let (code, log) = run_exit(&cases[6].1);
    assert_eq!(code, 1, "{log}");
    assert!(!log.contains("Redis unreachable"), "{log}");
}

#[test]
fn setup_refuses_wal_level_replica_before_changing_anything() {
    let pg = PgCluster::start_with(PgOptions::default().set("wal_level", "replica"));
    let redis = RedisServer::start();
    pg.psql("CREATE TABLE items (id int PRIMARY KEY, v int)");
    let cfg = config(&pg, &format!("url = \"{}\"", redis.url()), None, ITEMS);
    let (code, out, err) = cfg.command(&["setup"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("wal_level is \"replica\""), "{err}");
    assert!(err.contains("Nothing was changed"), "{err}");
    assert!(!out.contains("CREATE PUBLICATION"), "{out}");
    assert_eq!(pg.psql("SELECT count(*) FROM pg_publication"), "0");
    // check and run say the same.
    let (code, out, err) = cfg.command(&["check"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("wal_level is \"replica\""), "{err}");
    let (code, log) = run_exit(&cfg);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("wal_level is \"replica\""), "{log}");
}

/// A listed replica that accepts the connection and never answers (a hung
/// server, a black-holing proxy) is a warning, as an unreachable one is:
/// `check` and `run`'s start-up do not wait for it.
#[test]
fn a_replica_that_never_answers_is_a_warning_not_a_wait() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.psql("CREATE TABLE items (id int PRIMARY KEY, v int)");
    // The kernel completes the handshake; nothing ever reads or answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("port").port();
    let cfg = with_replica(
        config(&pg, &format!("url = \"{}\"", redis.url()), None, ITEMS),
        &format!("postgres://postgres@127.0.0.1:{port}/postgres"),
    );
    let (code, out, err) = cfg.command(&["setup"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let started = Instant::now();
    let (code, out, err) = cfg.command(&["check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains(&format!(
            "[postgres] replicas: replica 127.0.0.1:{port}: unreachable"
        )),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}
