//! `/metrics`, `/readyz` and `/livez` of a running worker against real servers.

mod support;

use std::time::Duration;

use support::{PgCluster, RedisProbe, RedisServer, WorkerConfig};

const WAIT: Duration = Duration::from_secs(30);

use support::{http_get as get, metric_sample as sample};

/// Scrapes until two scrapes 300 ms apart agree on the counters the test
/// compares: a key disappears from Redis before the worker records the batch.
fn settled_metrics(port: u16) -> String {
    let key = |m: &str| {
        (
            sample(m, "cache_invalidator_transactions_total", &[]),
            sample(m, "cache_invalidator_invalidations_total", &[]),
            sample(m, "cache_invalidator_changes_total", &[]),
        )
    };
    let mut last = wait_status(port, "/metrics", 200);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = wait_status(port, "/metrics", 200);
        if key(&now) == key(&last) {
            return now;
        }
        last = now;
    }
}

fn config_with_metrics(pg: &PgCluster, redis: &RedisServer, port: u16) -> WorkerConfig {
    let cfg = WorkerConfig::demo(pg, redis);
    let path = cfg.path();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}{}", support::metrics_toml(port))).unwrap();
    cfg
}

fn wait_status(port: u16, path: &str, want: u16) -> String {
    support::wait_for(&format!("{path} to answer {want}"), WAIT, || {
        match get(port, path) {
            Some((s, body)) if s == want => Some(body),
            _ => None,
        }
    })
}

#[test]
fn counters_move_by_exactly_the_workload() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.migrate();
    let port = support::free_port();
    let cfg = config_with_metrics(&pg, &redis, port);
    let (code, out, err) = cfg.command(&["setup", "--replica-identity-full"]);
    assert_eq!(code, 0, "{out}{err}");
    let _worker = cfg.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);
    let before = settled_metrics(port);

    // One update of user 123: 3 keys, 1 tag, 1 version, 1 message. Then one
    // sync_probe insert: 1 key.
    pg.psql("UPDATE users SET name = 'Ada L.' WHERE id = 123");
    support::sync_worker(&pg, &redis, WAIT);
    let after = settled_metrics(port);

    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    assert_eq!(
        delta(
            "cache_invalidator_changes_total",
            &[("table", "public.users"), ("op", "update")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "cache_invalidator_changes_total",
            &[("table", "public.sync_probe"), ("op", "insert")]
        ),
        1.0
    );
    assert_eq!(
        delta("cache_invalidator_invalidations_total", &[("kind", "keys")]),
        4.0,
        "{after}"
    );
    assert_eq!(
        delta("cache_invalidator_invalidations_total", &[("kind", "tags")]),
        1.0
    );
    assert_eq!(
        delta(
            "cache_invalidator_invalidations_total",
            &[("kind", "versions")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "cache_invalidator_invalidations_total",
            &[("kind", "publish")]
        ),
        1.0
    );
    assert_eq!(delta("cache_invalidator_transactions_total", &[]), 2.0);
    assert_eq!(
        sample(&after, "cache_invalidator_fallbacks_total", &[]),
        0.0
    );
    assert_eq!(
        sample(&after, "cache_invalidator_role", &[("role", "active")]),
        1.0
    );
    assert!(sample(&after, "cache_invalidator_confirmed_lsn", &[]) > 0.0);
    assert!(
        sample(&after, "cache_invalidator_apply_latency_seconds_count", &[]) >= 2.0,
        "{after}"
    );
    // The setup marker fired once, nothing else flushed.
    assert_eq!(
        sample(
            &after,
            "cache_invalidator_flushes_total",
            &[("reason", "marker_all")]
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "cache_invalidator_flushes_total", &[]),
        1.0,
        "{after}"
    );
}

#[test]
fn readyz_follows_redis_and_a_standby_says_so() {
    let pg = PgCluster::start();
    let mut redis = RedisServer::start();
    pg.migrate();
    let port = support::free_port();
    let cfg = config_with_metrics(&pg, &redis, port);
    let (code, out, err) = cfg.command(&["setup", "--replica-identity-full"]);
    assert_eq!(code, 0, "{out}{err}");
    let active = cfg.spawn_worker();
    wait_status(port, "/readyz", 200);

    // A second worker on the same slot waits as a standby.
    let standby_port = support::free_port();
    let standby_cfg = config_with_metrics(&pg, &redis, standby_port);
    let standby = standby_cfg.spawn_worker();
    let body = wait_status(standby_port, "/readyz", 503);
    support::wait_for("the standby to say standby", WAIT, || {
        get(standby_port, "/readyz").filter(|(s, b)| *s == 503 && b.contains("standby"))
    });
    assert_eq!(
        get(standby_port, "/livez").map(|r| r.0),
        Some(200),
        "{body}"
    );
    let m = get(standby_port, "/metrics").unwrap().1;
    assert_eq!(
        sample(&m, "cache_invalidator_role", &[("role", "standby")]),
        1.0
    );
    drop(standby);

    // Redis dies: not ready within 15 s, alive throughout; back when it returns.
    redis.kill();
    let started = std::time::Instant::now();
    let body = wait_status(port, "/readyz", 503);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    assert!(body.contains("redis"), "{body}");
    assert_eq!(get(port, "/livez").map(|r| r.0), Some(200));
    redis.restart();
    wait_status(port, "/readyz", 200);
    assert_eq!(get(port, "/livez").map(|r| r.0), Some(200));

    // And it still invalidates.
    let mut r = RedisProbe::new(&redis);
    r.set("post:7", "cached");
    pg.psql("UPDATE posts SET title = 'after outage' WHERE id = 7");
    r.wait_gone("post:7", WAIT);
    drop(active);
}
