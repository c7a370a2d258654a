//! A throwaway Redis Cluster (three masters) built from [`RedisServer`]s.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use redis::cluster::ClusterConnection;

use super::common::{free_port, wait_for, START_TIMEOUT};
use super::pg::PgCluster;
use super::redis::RedisServer;

/// A free port whose cluster bus port (port + 10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// A throwaway Redis Cluster: three masters, no replicas, on loopback ports,
/// created with `redis-cli --cluster create`; killed on drop.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three masters, creates the cluster, waits for `cluster_state:ok` on every node.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_on_free_port(
                    free_cluster_port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "5000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok();
        cluster
    }

    /// Waits until every node reports `cluster_state:ok` and knows every other.
    pub fn wait_ok(&self) {
        wait_for("cluster_state:ok on every node", START_TIMEOUT, || {
            self.nodes
                .iter()
                .all(|n| {
                    let info = n.cli(&["CLUSTER", "INFO"]).unwrap_or_default();
                    info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
                })
                .then_some(())
        });
    }

    /// The nodes (all masters).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Seed URLs, `redis://127.0.0.1:<port>`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port()))
            .collect()
    }

    /// The body of a worker config's `[redis]` section for this cluster.
    pub fn redis_toml(&self) -> String {
        let urls: Vec<String> = self.urls().iter().map(|u| format!("{u:?}")).collect();
        format!("cluster = [{}]", urls.join(", "))
    }

    /// The node (index) holding `key` (the others answer MOVED), if any.
    pub fn node_of(&self, key: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.cli(&["EXISTS", key]).map(|s| s == "1").unwrap_or(false))
    }

    /// The node id of node `i` (`CLUSTER MYID`).
    pub fn node_id(&self, i: usize) -> String {
        self.nodes[i]
            .cli(&["CLUSTER", "MYID"])
            .expect("CLUSTER MYID")
    }

    /// A synchronous cluster connection for assertions (follows MOVED/ASK).
    pub fn connection(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(self.urls())
            .expect("cluster client")
            .get_connection()
            .expect("cluster connection")
    }

    /// Starts `redis-cli monitor` on every node, writing `<dir>/monitor-<i>.log`;
    /// the monitors stop when the returned guard drops.
    pub fn monitor(&self, dir: &Path) -> Monitors {
        let children = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let out = std::fs::File::create(dir.join(format!("monitor-{i}.log")))
                    .expect("create the monitor log");
                Command::new("redis-cli")
                    .args(["-p", &n.port().to_string(), "monitor"])
                    .stdout(out)
                    .spawn()
                    .expect("redis-cli monitor")
            })
            .collect();
        Monitors(children)
    }

    /// Moves `slots` hash slots from node `from` to node `to` (`redis-cli --cluster reshard`).
    pub fn reshard(&self, from: usize, to: usize, slots: u32) -> std::process::Output {
        Command::new("redis-cli")
            .args(["--cluster", "reshard"])
            .arg(format!("127.0.0.1:{}", self.nodes[0].port()))
            .args(["--cluster-from", &self.node_id(from)])
            .args(["--cluster-to", &self.node_id(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster reshard")
    }
}

/// Whether `key` exists, on whichever node holds its slot.
pub fn key_exists_on_cluster(conn: &mut ClusterConnection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query::<bool>(conn)
        .expect("EXISTS")
}

/// Waits until `key` is gone; on a timeout the failure shows `log()` (the worker's).
pub fn wait_gone_on_cluster(
    conn: &mut ClusterConnection,
    key: &str,
    timeout: Duration,
    log: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + timeout;
    while key_exists_on_cluster(conn, key) {
        assert!(
            std::time::Instant::now() < deadline,
            "{key} still exists after {timeout:?}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`super::sync_worker`] for a worker on a cluster: waits until it applied
/// everything committed so far (the probe key's deletion, then its
/// acknowledgement).
pub fn sync_worker_on_cluster(
    pg: &PgCluster,
    conn: &mut ClusterConnection,
    timeout: Duration,
    log: impl Fn() -> String,
) {
    let id = super::worker::next_sync_probe_id();
    let key = format!("sync:{id}");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("x")
        .query(conn)
        .expect("SET");
    let lsn = super::worker::touch_sync_probe(pg, id);
    wait_gone_on_cluster(conn, &key, timeout, log);
    pg.wait_confirmed(&lsn, timeout);
}

/// `redis-cli monitor` processes, killed on drop.
pub struct Monitors(Vec<Child>);

impl Drop for Monitors {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
