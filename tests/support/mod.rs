//! Throwaway servers for integration tests: a PostgreSQL cluster with
//! `wal_level=logical` and a `redis-server`, each on a free loopback port, owned
//! by the test, with `stop()`, `kill()` (SIGKILL) and `restart()` for fault
//! tests, and removed on drop even when the test panics.
//!
//! `initdb` runs once per machine into a template directory (created atomically,
//! shared by every test binary); each cluster is a copy of it. As root,
//! PostgreSQL runs as the `postgres` OS user in directories it owns.
#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a server may take to come up before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cache-invalidator"))
}

/// A free TCP port on 127.0.0.1 (the OS picks it; the listener is closed again).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Directory holding `initdb`, `postgres`, `pg_ctl`, `psql`, ...
pub fn pg_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut candidates: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.retain(|p| p.join("initdb").exists());
    candidates.sort();
    candidates
        .pop()
        .expect("no PostgreSQL binaries: install postgresql (initdb not found via pg_config or /usr/lib/postgresql/*/bin)")
}

/// The uid/gid PostgreSQL must run as: ours, or `postgres`'s when we are root.
fn pg_owner() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns a pointer into static storage or null; read immediately.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root but there is no `postgres` OS user to run PostgreSQL as"
    );
    // SAFETY: pw checked non-null above.
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

fn chown_tree(path: &Path, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        let status = Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(path)
            .status()
            .expect("chown");
        assert!(status.success(), "chown -R {}", path.display());
    }
}

fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// A scratch directory removed on drop, readable by the `postgres` user.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(label: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ci-{label}-"))
            .tempdir()
            .expect("tempdir")
            .keep();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        ScratchDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The initdb'ed template every cluster copies (once per machine and PostgreSQL version).
fn pg_template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let bindir = pg_bindir();
        let version = bindir
            .parent()
            .and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pg".into());
        let owner = pg_owner();
        let uid = owner.map(|o| o.0).unwrap_or(0);
        let final_dir =
            std::env::temp_dir().join(format!("cache-invalidator-pgtemplate-{version}-{uid}"));
        if final_dir.join("PG_VERSION").exists() {
            return final_dir;
        }
        let staging = std::env::temp_dir().join(format!(
            "cache-invalidator-pgtemplate-{version}-{uid}.tmp{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).expect("create template dir");
        chown_tree(&staging, owner);
        let out = as_owner(
            Command::new(bindir.join("initdb"))
                .arg("-D")
                .arg(&staging)
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]),
            owner,
        )
        .output()
        .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Another test binary may have won the race: then use its template.
        if fs::rename(&staging, &final_dir).is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        final_dir
    })
}

/// Extra settings for a cluster, as `-c name=value`.
#[derive(Default, Clone)]
pub struct PgOptions {
    /// Additional `postgresql.conf` settings.
    pub settings: Vec<(String, String)>,
}

impl PgOptions {
    /// Adds one setting.
    pub fn set(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }
}

/// A throwaway PostgreSQL cluster.
pub struct PgCluster {
    dir: ScratchDir,
    port: u16,
    owner: Option<(u32, u32)>,
    options: PgOptions,
    child: Option<Child>,
}

impl PgCluster {
    /// Starts a cluster with `wal_level=logical` and the default options.
    pub fn start() -> Self {
        Self::start_with(PgOptions::default())
    }

    /// Starts a cluster with extra settings.
    pub fn start_with(options: PgOptions) -> Self {
        let template = pg_template();
        let dir = ScratchDir::new("pg");
        let owner = pg_owner();
        let status = Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(dir.path().join("data"))
            .status()
            .expect("cp template");
        assert!(status.success(), "copy the initdb template");
        fs::create_dir_all(dir.path().join("socket")).expect("socket dir");
        chown_tree(dir.path(), owner);
        let mut cluster = PgCluster {
            dir,
            port: free_port(),
            owner,
            options,
            child: None,
        };
        cluster.launch();
        cluster
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Directory of the cluster's unix socket (use as `?host=`).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The same database over the unix socket.
    pub fn socket_url(&self) -> String {
        format!(
            "postgres://postgres@/postgres?host={}&port={}",
            self.socket_dir().display(),
            self.port
        )
    }

    /// Libpq keyword/value connection string (for tokio-postgres and psql).
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// The server log so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "cluster already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .expect("open log");
        chown_tree(&self.dir.path().join("postgres.log"), self.owner);
        let mut cmd = Command::new(pg_bindir().join("postgres"));
        cmd.arg("-D").arg(self.data_dir());
        let mut settings: Vec<(String, String)> = vec![
            ("port".into(), self.port.to_string()),
            ("listen_addresses".into(), "127.0.0.1".into()),
            (
                "unix_socket_directories".into(),
                self.socket_dir().display().to_string(),
            ),
            ("wal_level".into(), "logical".into()),
            ("max_replication_slots".into(), "20".into()),
            ("max_wal_senders".into(), "20".into()),
            ("max_connections".into(), "60".into()),
            ("fsync".into(), "off".into()),
            ("full_page_writes".into(), "off".into()),
            ("shared_buffers".into(), "32MB".into()),
            ("log_min_messages".into(), "warning".into()),
            ("logging_collector".into(), "off".into()),
        ];
        settings.extend(self.options.settings.iter().cloned());
        for (k, v) in &settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        as_owner(&mut cmd, self.owner);
        self.child = Some(cmd.spawn().expect("spawn postgres"));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let pidfile = self.data_dir().join("postmaster.pid");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!("postgres exited during startup ({status}):\n{}", self.log());
                }
            }
            // The last line of postmaster.pid reads "ready" once connections are accepted.
            if let Ok(text) = fs::read_to_string(&pidfile) {
                if text
                    .lines()
                    .nth(7)
                    .map(|l| l.trim() == "ready")
                    .unwrap_or(false)
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "postgres not ready in {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// PID of the postmaster, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Fast shutdown (SIGINT), waiting for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGINT);
            wait_or_kill(&mut child, Duration::from_secs(10));
        }
    }

    /// SIGKILL the postmaster and every backend: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            let children = child_pids(pid);
            signal(pid, libc::SIGKILL);
            for c in children {
                signal(c, libc::SIGKILL);
            }
            let _ = child.wait();
            // Orphaned backends must be gone before the next start can claim shared memory.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !child_pids_of_dir(&self.data_dir()).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = fs::remove_file(self.data_dir().join("postmaster.pid"));
        }
    }

    /// Starts it again on the same port and data (after `stop()` or `kill()`).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.launch();
    }

    /// Appends lines to `pg_hba.conf`'s top (they win) and reloads.
    pub fn set_hba(&mut self, hba: &str) {
        fs::write(self.data_dir().join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        chown_tree(&self.data_dir().join("pg_hba.conf"), self.owner);
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGHUP);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until a logical slot's `confirmed_flush_lsn` reaches `lsn` (the
    /// worker acknowledges only what Redis confirmed).
    pub fn wait_confirmed(&self, lsn: &str, timeout: Duration) {
        let sql = format!(
            "SELECT coalesce(bool_or(confirmed_flush_lsn >= '{lsn}'::pg_lsn), false) FROM pg_replication_slots WHERE slot_type = 'logical'"
        );
        wait_for(&format!("a slot to confirm {lsn}"), timeout, || {
            (self.psql(&sql).trim() == "t").then_some(())
        });
    }

    /// Runs SQL through `psql` (over the unix socket) and returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(pg_bindir().join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .arg("-h")
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed for {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Applies every `migrations/*.sql` file in name order.
    pub fn migrate(&self) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .expect("migrations dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().map(|e| e == "sql").unwrap_or(false))
            .collect();
        files.sort();
        for f in files {
            self.psql(&fs::read_to_string(&f).expect("read migration"));
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Immediate shutdown: the data is thrown away anyway.
            signal(child.id(), libc::SIGQUIT);
            wait_or_kill(&mut child, Duration::from_secs(5));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !child_pids_of_dir(&self.data_dir()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A throwaway `redis-server`: no persistence unless asked, its own port and dir.
pub struct RedisServer {
    dir: ScratchDir,
    port: u16,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one with no persistence.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts one with extra `redis-server` arguments (e.g. `["--requirepass", "x"]`).
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_on_free_port(free_port, extra_args)
    }

    /// Starts one on a port from `pick`, picking again when another process
    /// took the port between the pick and the bind (tests run in parallel).
    pub fn start_on_free_port(pick: impl Fn() -> u16, extra_args: &[&str]) -> Self {
        let mut attempts = 0;
        loop {
            let mut server = Self::new(pick(), extra_args);
            match server.try_launch() {
                Ok(()) => return server,
                Err(log) if log.contains("Address already in use") && attempts < 5 => {
                    attempts += 1;
                }
                Err(log) => panic!("redis-server exited during startup:\n{log}"),
            }
        }
    }

    fn new(port: u16, extra_args: &[&str]) -> Self {
        RedisServer {
            dir: ScratchDir::new("redis"),
            port,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
        }
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Its working directory (where a snapshot `dump.rdb` goes).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn launch(&mut self) {
        if let Err(log) = self.try_launch() {
            panic!("redis-server exited during startup:\n{log}");
        }
    }

    /// Starts the process and waits for PING; `Err` with its log when it exits
    /// during startup.
    fn try_launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "redis already running");
        let log = fs::File::create(self.dir.path().join("redis.log")).expect("redis log");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn redis-server (is it installed?)"));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let log =
                        fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                    return Err(format!("{status}\n{log}"));
                }
            }
            if self
                .cli(&["PING"])
                .map(|s| s.contains("PONG"))
                .unwrap_or(false)
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "redis-server not ready in {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs a command through `redis-cli`, returning its raw output.
    pub fn cli(&self, args: &[&str]) -> std::io::Result<String> {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// What the server wrote to its log so far.
    pub fn server_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// A plain redis client for assertions.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis url")
    }

    /// Graceful shutdown (SIGTERM), waiting for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            wait_or_kill(&mut child, Duration::from_secs(10));
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.launch();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

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

fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a pid we spawned; errors (already gone) are ignored.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn wait_or_kill(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
}

/// Direct children of a process, from /proc.
fn child_pids(parent: u32) -> Vec<u32> {
    proc_stats()
        .into_iter()
        .filter(|(_, ppid, _)| *ppid == parent)
        .map(|(pid, _, _)| pid)
        .collect()
}

/// PostgreSQL processes whose command line names this data directory, or that
/// are orphaned backends of it (their cwd is the data directory).
fn child_pids_of_dir(data_dir: &Path) -> Vec<u32> {
    proc_stats()
        .into_iter()
        .filter(|(pid, _, _)| {
            fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|cwd| cwd == data_dir)
                .unwrap_or(false)
        })
        .map(|(pid, _, _)| pid)
        .collect()
}

fn proc_stats() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in rd.filter_map(|e| e.ok()) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Format: pid (comm) state ppid ...; comm may contain spaces.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = stat[stat.find('(').map(|i| i + 1).unwrap_or(0)..close].to_string();
        let mut fields = stat[close + 1..].split_whitespace();
        let _state = fields.next();
        if let Some(ppid) = fields.next().and_then(|p| p.parse().ok()) {
            out.push((pid, ppid, comm));
        }
    }
    out
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A table only tests write to, mapped to `sync:<id>` with no truncate: its
/// key disappears only through its own row change, never through a flush.
pub const SYNC_PROBE_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS sync_probe (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)";
/// The mapping of [`SYNC_PROBE_TABLE`].
pub const SYNC_PROBE_MAPPING: &str =
    "[[table]]\nname = \"sync_probe\"\nkeys = [\"sync:{id}\"]\ntruncate = \"none\"\n";

/// Commits a change to `sync_probe` row `id` and returns a WAL position
/// inside that transaction: once a slot confirms it, the worker has applied
/// everything committed before (and the change itself).
pub fn touch_sync_probe(pg: &PgCluster, id: u32) -> String {
    pg.psql(&format!(
        "INSERT INTO sync_probe (id) VALUES ({id}) ON CONFLICT (id) DO UPDATE SET n = sync_probe.n + 1 RETURNING pg_current_wal_lsn()"
    ))
    .trim()
    .to_owned()
}

/// Waits until the worker applied everything committed before this call: a
/// change to `sync_probe` (committed after) must delete its key, and then be
/// acknowledged. The key alone is not enough: batches are applied in commit
/// order, but the keys of one batch (several transactions) in no particular
/// order, so the probe's key can go before an earlier transaction's key.
pub fn sync_worker(pg: &PgCluster, redis: &RedisServer, timeout: Duration) {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut probe = RedisProbe::new(redis);
    let key = format!("sync:{id}");
    probe.set(&key, "x");
    let lsn = touch_sync_probe(pg, id);
    probe.wait_gone(&key, timeout);
    pg.wait_confirmed(&lsn, timeout);
}

/// A config directory for the worker: `cache-invalidator.toml` plus a
/// `mappings/` directory, pointing at throwaway servers.
pub struct WorkerConfig {
    dir: ScratchDir,
}

impl WorkerConfig {
    /// Writes a config for `pg`/`redis` with the given mapping files
    /// (name, TOML text) and extra `[worker]` lines.
    pub fn new(
        pg: &PgCluster,
        redis: &RedisServer,
        mappings: &[(&str, &str)],
        worker_toml: &str,
    ) -> Self {
        let redis_toml = format!("url = \"{}\"", redis.url());
        Self::with_redis(pg, &redis_toml, mappings, worker_toml)
    }

    /// Like [`WorkerConfig::new`], with the body of `[redis]` given (e.g.
    /// `cluster = ["redis://127.0.0.1:7000"]`).
    pub fn with_redis(
        pg: &PgCluster,
        redis_toml: &str,
        mappings: &[(&str, &str)],
        worker_toml: &str,
    ) -> Self {
        let dir = ScratchDir::new("cfg");
        fs::create_dir_all(dir.path().join("mappings")).expect("mappings dir");
        for (name, text) in mappings {
            fs::write(dir.path().join("mappings").join(name), text).expect("write mapping");
        }
        let config = format!(
            "mappings = \"mappings\"\n\n[postgres]\nurl = \"{}\"\nslot = \"cache_invalidator\"\npublication = \"cache_invalidator\"\n\n[redis]\n{}\n\n[worker]\n{}\n",
            pg.url(),
            redis_toml,
            worker_toml
        );
        fs::write(dir.path().join("cache-invalidator.toml"), config).expect("write config");
        WorkerConfig { dir }
    }

    /// A config using the repository's demo mappings (`mappings/*.toml`).
    pub fn demo(pg: &PgCluster, redis: &RedisServer) -> Self {
        let redis_toml = format!("url = \"{}\"", redis.url());
        Self::demo_with_redis(pg, &redis_toml)
    }

    /// The demo mappings with the body of `[redis]` given.
    pub fn demo_with_redis(pg: &PgCluster, redis_toml: &str) -> Self {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
        let mut files = Vec::new();
        for entry in fs::read_dir(&src).expect("mappings/") {
            let path = entry.expect("entry").path();
            if path.extension().map(|e| e == "toml").unwrap_or(false) {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                files.push((name, fs::read_to_string(&path).expect("read mapping")));
            }
        }
        files.push(("zz_sync_probe.toml".into(), SYNC_PROBE_MAPPING.into()));
        pg.psql(SYNC_PROBE_TABLE);
        let refs: Vec<(&str, &str)> = files
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        Self::with_redis(pg, redis_toml, &refs, "")
    }

    /// Path of `cache-invalidator.toml`.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("cache-invalidator.toml")
    }

    /// Runs a subcommand to completion: (exit code, stdout, stderr).
    pub fn command(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(binary())
            .arg("--config")
            .arg(self.path())
            .args(args)
            .env_remove("CACHE_INVALIDATOR_POSTGRES_URL")
            .env_remove("CACHE_INVALIDATOR_REDIS_URL")
            .output()
            .expect("run cache-invalidator");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Starts `run` in the background.
    pub fn spawn_worker(&self) -> WorkerProcess {
        self.spawn_worker_with_env(&[])
    }

    /// Starts `run` in the background with extra environment variables.
    pub fn spawn_worker_with_env(&self, env: &[(&str, &str)]) -> WorkerProcess {
        let log = self.dir.path().join(format!("worker-{}.log", now_nanos()));
        let file = fs::File::create(&log).expect("worker log");
        let child = Command::new(binary())
            .arg("--config")
            .arg(self.path())
            .arg("run")
            // CACHE_INVALIDATOR_TEST_WORKER_LOG overrides the workers' filter
            // for a post-mortem (e.g. `cache_invalidator=debug,redis=debug,info`).
            .env(
                "RUST_LOG",
                std::env::var("CACHE_INVALIDATOR_TEST_WORKER_LOG")
                    .unwrap_or_else(|_| "cache_invalidator=debug,info".into()),
            )
            .env_remove("CACHE_INVALIDATOR_POSTGRES_URL")
            .env_remove("CACHE_INVALIDATOR_REDIS_URL")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .spawn()
            .expect("spawn worker");
        WorkerProcess {
            child: Some(child),
            log,
        }
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A `cache-invalidator run` process, killed on drop.
pub struct WorkerProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl WorkerProcess {
    /// Its log (stderr) so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether it has exited, and with which code.
    pub fn try_exit_code(&mut self) -> Option<i32> {
        let child = self.child.as_mut()?;
        child
            .try_wait()
            .ok()
            .flatten()
            .map(|s| s.code().unwrap_or(-1))
    }

    /// SIGTERM, then waits up to `grace`; returns the exit code (None if it had to be killed).
    pub fn stop(&mut self, grace: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        signal(child.id(), libc::SIGKILL);
        let _ = child.wait();
        None
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "worker log never showed {needle:?} in {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A synchronous Redis connection with small helpers for assertions.
pub struct RedisProbe(pub redis::Connection);

impl RedisProbe {
    /// Connects to `redis`.
    pub fn new(redis: &RedisServer) -> Self {
        RedisProbe(redis.client().get_connection().expect("redis connection"))
    }

    /// SET key value.
    pub fn set(&mut self, key: &str, value: &str) {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query(&mut self.0)
            .expect("SET");
    }

    /// SADD set member.
    pub fn sadd(&mut self, set: &str, member: &str) {
        let _: () = redis::cmd("SADD")
            .arg(set)
            .arg(member)
            .query(&mut self.0)
            .expect("SADD");
    }

    /// Whether the key exists.
    pub fn exists(&mut self, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query::<i64>(&mut self.0)
            .expect("EXISTS")
            == 1
    }

    /// GET key.
    pub fn get(&mut self, key: &str) -> Option<String> {
        redis::cmd("GET").arg(key).query(&mut self.0).expect("GET")
    }

    /// Waits until `key` is gone.
    pub fn wait_gone(&mut self, key: &str, timeout: Duration) {
        wait_for(&format!("{key} to be deleted"), timeout, || {
            (!self.exists(key)).then_some(())
        });
    }
}
