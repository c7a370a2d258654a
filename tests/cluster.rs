//! `run` end to end against a throwaway 3-master Redis Cluster: every
//! strategy (keys and tag members across slots, hash-tagged tags, versions,
//! patterns on every master, PUBLISH), and a reshard during a workload.

mod support;

use std::time::Duration;

use redis::Commands;
use support::{PgCluster, RedisCluster, WorkerConfig};

const WAIT: Duration = Duration::from_secs(30);

/// When set, the reshard test writes each node's MONITOR output there.
const MONITOR_DIR: &str = "CACHE_INVALIDATOR_TEST_MONITOR_DIR";

/// Servers with the demo schema, the demo mappings on the cluster, setup done.
fn demo() -> (PgCluster, RedisCluster, WorkerConfig) {
    let pg = PgCluster::start();
    let cluster = RedisCluster::start();
    pg.migrate();
    let cfg = WorkerConfig::demo_with_redis(&pg, &cluster.redis_toml());
    let (code, out, err) = cfg.command(&["setup", "--replica-identity-full"]);
    assert_eq!(code, 0, "setup failed:\n{out}\n{err}");
    (pg, cluster, cfg)
}

#[test]
fn every_strategy_across_slots_and_masters() {
    let (pg, cluster, cfg) = demo();
    let mut r = cluster.connection();
    let worker = cfg.spawn_worker();
    let log = || worker.log();
    support::sync_worker_on_cluster(&pg, &mut r, WAIT, log);

    // Keys of user 123 and tag members spread over every master.
    let members: Vec<String> = (0..30).map(|i| format!("list:{i}:members")).collect();
    let mut on_nodes = std::collections::BTreeSet::new();
    for key in members.iter().map(String::as_str).chain([
        "user:123:profile",
        "user:123:avatar",
        "user:123:settings",
        "control:1",
        "user:124:profile",
    ]) {
        let _: () = r.set(key, "cached").unwrap();
        on_nodes.insert(cluster.node_of(key));
    }
    assert_eq!(on_nodes.len(), 3, "the keys span every master");
    for m in &members {
        let _: () = r.sadd("tag:user:123", m).unwrap();
    }

    let mut sub_conn = cluster.nodes()[2].client().get_connection().unwrap();
    let mut pubsub = support::subscribe(&mut sub_conn, "cache:invalidate", WAIT);

    pg.psql("UPDATE users SET avatar_url = 'https://img.example.com/ada-2.png' WHERE id = 123");
    for key in ["user:123:profile", "user:123:avatar", "user:123:settings"] {
        support::wait_gone_on_cluster(&mut r, key, WAIT, log);
    }
    for key in &members {
        support::wait_gone_on_cluster(&mut r, key, WAIT, log);
    }
    support::wait_gone_on_cluster(&mut r, "tag:user:123", WAIT, log);
    let version = support::wait_for("version:user:123", WAIT, || {
        r.get::<_, Option<String>>("version:user:123").unwrap()
    });
    assert_eq!(version, "2", "a missing version becomes 2:\n{}", log());
    assert!(
        support::key_exists_on_cluster(&mut r, "control:1"),
        "{}",
        log()
    );
    assert!(
        support::key_exists_on_cluster(&mut r, "user:124:profile"),
        "{}",
        log()
    );
    let msg = support::wait_message(&mut pubsub, "\"123\"");
    let json: serde_json::Value = serde_json::from_str(&msg).unwrap();
    assert_eq!(json, serde_json::json!({"entity": "user", "id": "123"}));

    // Patterns: TRUNCATE fires `chat:room:*:participants`, a SCAN of every master.
    let rooms: Vec<String> = (0..60)
        .map(|i| format!("chat:room:{i}:participants"))
        .collect();
    let mut on_nodes = std::collections::BTreeSet::new();
    for key in &rooms {
        let _: () = r.set(key, "cached").unwrap();
        on_nodes.insert(cluster.node_of(key));
    }
    assert_eq!(on_nodes.len(), 3, "pattern keys on every master");
    let _: () = r.set("chat:room:1:title", "kept").unwrap();
    pg.psql("TRUNCATE chat_participants");
    for key in &rooms {
        support::wait_gone_on_cluster(&mut r, key, WAIT, log);
    }
    support::sync_worker_on_cluster(&pg, &mut r, WAIT, log);
    assert!(
        support::key_exists_on_cluster(&mut r, "chat:room:1:title"),
        "a non-matching neighbour was deleted\n{}",
        log()
    );
    assert!(
        !worker.log().contains("Redis failed"),
        "no Redis error expected\n{}",
        log()
    );

    // `flush --table users` on the cluster: every master scanned.
    let _: () = r.set("user:9:profile", "cached").unwrap();
    let (code, out, err) = cfg.command(&["flush", "--table", "users"]);
    assert_eq!(code, 0, "flush failed:\n{out}\n{err}");
    assert!(
        !support::key_exists_on_cluster(&mut r, "user:9:profile"),
        "{out}"
    );
}

/// Tag sets with a hash tag (`tag:{user:7}`) take the atomic single-slot
/// script; one whose members live on other slots falls back to the
/// multi-slot path. Both end empty with every member gone.
#[test]
fn hash_tagged_tags_use_the_single_slot_script() {
    let pg = PgCluster::start();
    let cluster = RedisCluster::start();
    pg.psql("CREATE TABLE accounts (id int PRIMARY KEY, n int NOT NULL DEFAULT 0); INSERT INTO accounts (id) SELECT g FROM generate_series(1, 10) g");
    let mapping = "[[table]]\nname = \"accounts\"\ntags = [\"{{user:{id}}}\"]\n";
    let cfg = WorkerConfig::with_redis(
        &pg,
        &cluster.redis_toml(),
        &support::with_sync_probe(&pg, &[("accounts.toml", mapping)]),
        "",
    );
    cfg.run_setup(&["--replica-identity-full"]);
    let mut r = cluster.connection();
    let worker = cfg.spawn_worker();
    let log = || worker.log();
    support::sync_worker_on_cluster(&pg, &mut r, WAIT, log);

    // Same slot as the set: the script path.
    let local: Vec<String> = (0..2500).map(|i| format!("{{user:7}}:item:{i}")).collect();
    for m in &local {
        let _: () = r.set(m, "cached").unwrap();
        let _: () = r.sadd("tag:{user:7}", m).unwrap();
    }
    // Members elsewhere: the multi-slot path.
    let spread: Vec<String> = (0..40).map(|i| format!("item:{i}")).collect();
    for m in spread.iter().chain(["{user:8}:x".to_owned()].iter()) {
        let _: () = r.set(m, "cached").unwrap();
        let _: () = r.sadd("tag:{user:8}", m).unwrap();
    }
    pg.psql("UPDATE accounts SET n = n + 1 WHERE id IN (7, 8)");
    support::wait_gone_on_cluster(&mut r, "tag:{user:7}", WAIT, log);
    support::wait_gone_on_cluster(&mut r, "tag:{user:8}", WAIT, log);
    for m in local.iter().chain(&spread) {
        assert!(
            !support::key_exists_on_cluster(&mut r, m),
            "{m} survived\n{}",
            log()
        );
    }
    assert!(
        !support::key_exists_on_cluster(&mut r, "{user:8}:x"),
        "{}",
        log()
    );
    assert_eq!(
        worker.log().matches("members on other slots").count(),
        1,
        "only tag:{{user:8}} falls back to the multi-slot path\n{}",
        log()
    );
    assert!(
        !worker.log().contains("Redis failed"),
        "no Redis error expected\n{}",
        log()
    );
}

/// Where each surviving key is now: node, slot and idle time, or gone since.
fn describe_survivors(cluster: &RedisCluster, keys: &[String]) -> Vec<String> {
    keys.iter()
        .map(|k| match cluster.node_of(k) {
            Some(node) => {
                let cli = |args: &[&str]| cluster.nodes()[node].cli(args).unwrap_or_default();
                format!(
                    "{k}: node {node}, slot {}, idle {} s",
                    cli(&["CLUSTER", "KEYSLOT", k]),
                    cli(&["OBJECT", "IDLETIME", k])
                )
            }
            None => format!("{k}: gone by now (deleted after the check)"),
        })
        .collect()
}

/// Slots move between masters (`redis-cli --cluster reshard`, three times)
/// while the application caches keys and updates commit, one transaction per
/// 10 rows: MOVED/ASK are followed and no invalidation is lost. Every pass is
/// checked once the worker acknowledged it (every key set before its row's
/// update is gone), not only the last: the next pass caches the same keys
/// again, which would hide a loss of a pass that ran during a reshard.
#[test]
fn reshard_during_a_workload_loses_nothing() {
    let (pg, cluster, cfg) = demo();
    pg.psql("INSERT INTO users (id, name, email) SELECT g, 'u' || g, 'u' || g || '@example.com' FROM generate_series(10000, 10999) g");
    let mut r = cluster.connection();
    // Every command each node runs, for the post-mortem of a failure.
    let _monitors = std::env::var_os(MONITOR_DIR).map(|dir| cluster.monitor(dir.as_ref()));
    let worker = cfg.spawn_worker();
    let log = || worker.log();
    support::sync_worker_on_cluster(&pg, &mut r, WAIT, log);
    let resharding = std::sync::atomic::AtomicBool::new(true);
    let (passes, survivors) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut w = cluster.connection();
            let mut passes = 0;
            let mut survivors = Vec::new();
            while passes == 0 || resharding.load(std::sync::atomic::Ordering::Relaxed) {
                for a in (10000..11000).step_by(10) {
                    for id in a..a + 10 {
                        let _: () = w.set(format!("user:{id}:profile"), "cached").unwrap();
                    }
                    pg.psql(&format!(
                        "UPDATE users SET name = name || 'x' WHERE id >= {a} AND id < {}",
                        a + 10
                    ));
                }
                passes += 1;
                support::sync_worker_on_cluster(&pg, &mut w, WAIT, log);
                let left: Vec<String> = (10000..11000)
                    .map(|i| format!("user:{i}:profile"))
                    .filter(|k| support::key_exists_on_cluster(&mut w, k))
                    .collect();
                for line in describe_survivors(&cluster, &left) {
                    survivors.push(format!("pass {passes}: {line}"));
                }
            }
            (passes, survivors)
        });
        for (from, to) in [(0, 1), (1, 2), (2, 0)] {
            let out = cluster.reshard(from, to, 2000);
            assert!(
                out.status.success(),
                "reshard {from} -> {to} failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        resharding.store(false, std::sync::atomic::Ordering::Relaxed);
        writer.join().expect("writer")
    });
    cluster.wait_ok();
    let server_logs: String = cluster
        .nodes()
        .iter()
        .enumerate()
        .map(|(i, n)| format!("--- node {i} log ---\n{}", n.server_log()))
        .collect();
    assert!(
        survivors.is_empty(),
        "{} keys survived their update ({passes} passes):\n{}\n(set {MONITOR_DIR} to keep every node's MONITOR output)\n{}\n{server_logs}",
        survivors.len(),
        survivors.join("\n"),
        log()
    );
    let log = worker.log();
    eprintln!(
        "{passes} passes of updates during the reshards, each checked; {} Redis failures, {} reconnects",
        log.matches("Redis failed").count(),
        log.matches("reconnected to the Redis Cluster").count()
    );
    for line in log.lines().filter(|l| l.contains("Redis failed")) {
        eprintln!("{line}");
    }
}

/// `mode = "tombstone"` on a cluster: the TOMBSTONE_SET script per key, and
/// tag sets tombstoned member by member (members on every master), through
/// the library's `ClusterSink`.
#[tokio::test(flavor = "multi_thread")]
async fn tombstones_across_slots() {
    use cache_invalidator::cache::tombstone;
    use cache_invalidator::lsn::Lsn;
    use cache_invalidator::plan::Plan;
    use cache_invalidator::sink::ClusterSink;

    let cluster = RedisCluster::start();
    let options = support::sink_options("");
    let mut sink = ClusterSink::connect(&cluster.urls(), &options)
        .await
        .expect("connect");
    let keys: Vec<String> = (0..20).map(|i| format!("t:{i}")).collect();
    let members: Vec<String> = (0..20).map(|i| format!("m:{i}")).collect();
    {
        let mut r = cluster.connection();
        for k in keys.iter().chain(&members) {
            let _: () = r.set(k, "cached").unwrap();
        }
        for m in &members {
            let _: () = r.sadd("tag:t", m).unwrap();
        }
    }
    let mut plan = Plan::default();
    for k in &keys {
        plan.tombstones.insert(k.clone(), Lsn(0x20));
    }
    plan.tombstone_tags.insert("tag:t".to_owned(), Lsn(0x20));
    let stats = sink.apply(&plan).await.expect("apply");
    assert_eq!(stats.tombstones as usize, keys.len());
    assert_eq!(stats.tombstone_members as usize, members.len());
    let mut r = cluster.connection();
    for k in keys.iter().chain(&members) {
        let v: Vec<u8> = r.get(k).unwrap();
        assert_eq!(v, tombstone::marker(Lsn(0x20)).into_bytes(), "{k}");
    }
    let left: usize = r.scard("tag:t").unwrap();
    assert_eq!(left, members.len(), "members stay in the set");
}

/// `redelete_after` on a cluster: keys on every master and the members of a
/// tag set, refilled right after the invalidation, are deleted again by the
/// delayed second delete.
#[tokio::test(flavor = "multi_thread")]
async fn redelete_after_deletes_refilled_keys_across_slots() {
    use cache_invalidator::plan::Plan;
    use cache_invalidator::sink::ClusterSink;

    let cluster = RedisCluster::start();
    let mut options = support::sink_options("");
    options.redelete_after = Some(Duration::from_millis(300));
    let mut sink = ClusterSink::connect(&cluster.urls(), &options)
        .await
        .expect("connect");
    let keys: Vec<String> = (0..20).map(|i| format!("k:{i}")).collect();
    let members: Vec<String> = (0..20).map(|i| format!("m:{i}")).collect();
    let fill = || {
        let mut r = cluster.connection();
        for k in keys.iter().chain(&members) {
            let _: () = r.set(k, "cached").unwrap();
        }
        for m in &members {
            let _: () = r.sadd("tag:r", m).unwrap();
        }
    };
    fill();
    let mut plan = Plan::default();
    for k in &keys {
        plan.keys.insert(k);
    }
    plan.tags.insert("tag:r");
    let stats = sink.apply(&plan).await.expect("apply");
    assert_eq!(stats.keys as usize, keys.len());
    assert_eq!(stats.tag_members as usize, members.len());
    // Readers that read the old rows fill the cache after the first delete...
    fill();
    // ...and the delayed second delete removes every key and member again.
    let mut r = cluster.connection();
    support::wait_for("the second delete", WAIT, || {
        let left = keys
            .iter()
            .chain(&members)
            .filter(|k| r.exists::<_, bool>(k.as_str()).unwrap())
            .count();
        (left == 0).then_some(())
    });
}
