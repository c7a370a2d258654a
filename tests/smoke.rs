//! The test harness itself: both throwaway servers start, serve, survive
//! SIGKILL + restart, and leave nothing behind.

mod support;

use std::time::Duration;

use support::{PgCluster, RedisServer};

#[test]
fn throwaway_servers_start_serve_crash_and_restart() {
    let mut pg = PgCluster::start();
    let mut redis = RedisServer::start();

    assert_eq!(pg.psql("SHOW wal_level"), "logical");
    let slot =
        pg.psql("SELECT slot_name FROM pg_create_logical_replication_slot('smoke', 'pgoutput')");
    assert_eq!(slot, "smoke");

    let mut conn = redis.client().get_connection().expect("redis connection");
    let _: () = redis::cmd("SET")
        .arg("smoke")
        .arg("1")
        .query(&mut conn)
        .unwrap();
    let got: String = redis::cmd("GET").arg("smoke").query(&mut conn).unwrap();
    assert_eq!(got, "1");

    // A PostgreSQL crash keeps the (durable) slot; the cluster comes back on its port.
    let old_pid = pg.pid().unwrap();
    pg.kill();
    assert!(!process_alive(old_pid), "postmaster survived SIGKILL");
    pg.restart();
    assert_ne!(pg.pid().unwrap(), old_pid);
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'smoke'"),
        "1"
    );

    // Redis without persistence loses its data on a crash.
    let old_pid = redis.pid().unwrap();
    redis.kill();
    assert!(!process_alive(old_pid), "redis-server survived SIGKILL");
    redis.restart();
    let mut conn = redis
        .client()
        .get_connection()
        .expect("redis after restart");
    let gone: Option<String> = redis::cmd("GET").arg("smoke").query(&mut conn).unwrap();
    assert_eq!(gone, None);

    // A clean stop and start works too.
    pg.stop();
    pg.restart();
    assert_eq!(pg.psql("SELECT 1"), "1");
}

#[test]
fn servers_are_gone_after_drop() {
    let (pg_pid, redis_pid) = {
        let pg = PgCluster::start();
        let redis = RedisServer::start();
        (pg.pid().unwrap(), redis.pid().unwrap())
    };
    support::wait_for(
        "servers to exit after drop",
        Duration::from_secs(10),
        || (!process_alive(pg_pid) && !process_alive(redis_pid)).then_some(()),
    );
}

#[test]
fn parallel_clusters_do_not_collide() {
    let a = PgCluster::start();
    let b = PgCluster::start();
    assert_ne!(a.port(), b.port());
    a.psql("CREATE TABLE only_in_a (id int)");
    assert_eq!(
        b.psql("SELECT count(*) FROM pg_class WHERE relname = 'only_in_a'"),
        "0"
    );
}

fn process_alive(pid: u32) -> bool {
    // A reaped process has no /proc entry; a zombie's state is 'Z'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}
