//! Throwaway PostgreSQL clusters with `wal_level=logical`, each on a free
//! loopback port, with `stop()`, `kill()` (SIGKILL) and `restart()` for fault
//! tests, removed on drop even when the test panics.
//!
//! `initdb` runs once per machine into a template directory (created atomically,
//! shared by every test binary); each cluster is a copy of it. As root,
//! PostgreSQL runs as the `postgres` OS user in directories it owns.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::common::{
    child_pids, child_pids_of_dir, free_port, signal, wait_for, wait_or_kill, ScratchDir,
    START_TIMEOUT,
};

/// Environment variable naming a directory of PostgreSQL server binaries
/// (`initdb`, `postgres`, `pg_ctl`, `pg_basebackup`, `pg_recvlogical`,
/// `psql`) to test against instead of the system's: `scripts/test` points it
/// at PostgreSQL 18 for its second pass.
pub const PG_BINDIR_ENV: &str = "CI_PG_BINDIR";

/// Directory holding `initdb`, `postgres`, `pg_ctl`, `psql`, ...: `$CI_PG_BINDIR`
/// when set, else the system's (`pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`).
pub fn pg_bindir() -> PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(find_pg_bindir).clone()
}

fn find_pg_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os(PG_BINDIR_ENV).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("initdb").exists() && dir.join("postgres").exists(),
            "{PG_BINDIR_ENV}={} holds no initdb/postgres: point it at a PostgreSQL bin directory (scripts/pg18 prints one)",
            dir.display()
        );
        return dir;
    }
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
        .expect("no PostgreSQL binaries: install postgresql (initdb not found via pg_config or /usr/lib/postgresql/*/bin), or set CI_PG_BINDIR")
}

/// The server version of [`pg_bindir`]'s `postgres`, e.g. `"18.6"`.
pub fn pg_version() -> String {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let out = Command::new(pg_bindir().join("postgres"))
                .arg("--version")
                .output()
                .expect("run postgres --version");
            // "postgres (PostgreSQL) 18.6" (Debian may append " (Debian 15.10-1)").
            let text = String::from_utf8_lossy(&out.stdout);
            text.split_whitespace()
                .nth(2)
                .unwrap_or_else(|| panic!("unexpected `postgres --version` output: {text}"))
                .to_owned()
        })
        .clone()
}

/// The major version of [`pg_version`], e.g. 18.
pub fn pg_major() -> u32 {
    let version = pg_version();
    version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no major version in {version:?}"))
}

/// The uid/gid PostgreSQL must run as: ours, or `postgres`'s when we are root.
pub(crate) fn pg_owner() -> Option<(u32, u32)> {
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

pub(crate) fn chown_tree(path: &Path, owner: Option<(u32, u32)>) {
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

pub(crate) fn as_owner(cmd: &mut Command, owner: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Starts `postgres` on `<dir>/data` (its socket in `<dir>/socket`, its log
/// `<dir>/postgres.log`) with the settings every throwaway server shares, then
/// `extra` (later settings win), and waits until it accepts connections;
/// `what` names it in failures. A standby needs these settings at least as
/// high as its primary's: both launch here.
pub(crate) fn launch_server(
    dir: &Path,
    port: u16,
    owner: Option<(u32, u32)>,
    extra: &[(String, String)],
    what: &str,
) -> Child {
    let log_path = dir.join("postgres.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .expect("open log");
    chown_tree(&log_path, owner);
    let data = dir.join("data");
    let mut cmd = Command::new(pg_bindir().join("postgres"));
    cmd.arg("-D").arg(&data);
    let common = [
        ("port", port.to_string()),
        ("listen_addresses", "127.0.0.1".into()),
        (
            "unix_socket_directories",
            dir.join("socket").display().to_string(),
        ),
        ("wal_level", "logical".into()),
        ("max_replication_slots", "20".into()),
        ("max_wal_senders", "20".into()),
        ("max_connections", "60".into()),
        ("fsync", "off".into()),
        ("full_page_writes", "off".into()),
        ("shared_buffers", "32MB".into()),
        ("log_min_messages", "warning".into()),
        ("logging_collector", "off".into()),
    ];
    let common = common.iter().map(|(k, v)| (*k, v.as_str()));
    for (k, v) in common.chain(extra.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        cmd.arg("-c").arg(format!("{k}={v}"));
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log);
    as_owner(&mut cmd, owner);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let server_log = || fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited during startup ({status}):\n{}", server_log());
        }
        // The last line of postmaster.pid reads "ready" once connections are accepted.
        if let Ok(text) = fs::read_to_string(data.join("postmaster.pid")) {
            if text.lines().nth(7).map(|l| l.trim() == "ready") == Some(true) {
                return child;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready in {START_TIMEOUT:?}:\n{}",
            server_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `psql` on the server at `socket_dir`/`port` as `postgres`: unaligned,
/// tuples-only, stopping at the first error; add `-c SQL` or a script on stdin.
fn psql_base(socket_dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(pg_bindir().join("psql"));
    cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .args(["-U", "postgres", "-d", "postgres", "-h"])
        .arg(socket_dir)
        .arg("-p")
        .arg(port.to_string());
    cmd
}

/// Runs SQL through `psql` on the server at `socket_dir`/`port` and returns
/// its unaligned, tuples-only output; `what` names it in failures.
pub(crate) fn psql_on(socket_dir: &Path, port: u16, sql: &str, what: &str) -> String {
    let out = psql_base(socket_dir, port)
        .arg("-c")
        .arg(sql)
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "{what} failed for {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The initdb'ed template every cluster copies (once per machine and PostgreSQL version).
fn pg_template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let bindir = pg_bindir();
        // One template per server version and binary directory: two
        // installations of one version may still differ (e.g. in locales).
        let version = format!(
            "{}-{:x}",
            pg_version(),
            fnv1a(bindir.as_os_str().as_encoded_bytes())
        );
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

/// FNV-1a, to name a directory after a path.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
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

/// One PostgreSQL server in a scratch directory (`data/`, `socket/`,
/// `postgres.log`) on its own port: what a [`PgCluster`] and a
/// [`super::standby::Standby`] share, each reaching it through `Deref`.
pub struct PgServer {
    dir: ScratchDir,
    port: u16,
    owner: Option<(u32, u32)>,
    /// Settings after [`launch_server`]'s own, at every launch.
    settings: Vec<(String, String)>,
    /// Names the server in failures of its launch and of its `psql`.
    what: &'static str,
    psql_what: &'static str,
    child: Option<Child>,
}

impl PgServer {
    /// Launches the server prepared in `dir` (its `data/` and `socket/`
    /// there, owned by `owner`) on `port` with `settings`.
    pub(crate) fn launch_in(
        dir: ScratchDir,
        port: u16,
        owner: Option<(u32, u32)>,
        settings: Vec<(String, String)>,
        (what, psql_what): (&'static str, &'static str),
    ) -> Self {
        let mut server = PgServer {
            dir,
            port,
            owner,
            settings,
            what,
            psql_what,
            child: None,
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.what);
        self.child = Some(launch_server(
            self.dir.path(),
            self.port,
            self.owner,
            &self.settings,
            self.what,
        ));
    }

    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub(crate) fn owner(&self) -> Option<(u32, u32)> {
        self.owner
    }

    /// The postmaster, taken from the server (it counts as stopped after).
    pub(crate) fn take_child(&mut self) -> Option<Child> {
        self.child.take()
    }

    /// Directory of the server's unix socket (use as `?host=`).
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

    /// The server log so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
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

    /// Starts it again on the same port and data (after `stop()`, or a kill).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.launch();
    }

    /// Runs SQL through `psql` (over the unix socket, as `postgres`) and
    /// returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        psql_on(&self.socket_dir(), self.port, sql, self.psql_what)
    }

    /// Immediate shutdown (SIGQUIT), waiting at most 5 s: the data is thrown
    /// away anyway.
    pub(crate) fn quit(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGQUIT);
            wait_or_kill(&mut child, Duration::from_secs(5));
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.quit();
    }
}

/// Implements `Deref` and `DerefMut` from `$t` to the [`PgServer`] in its
/// field `server`.
macro_rules! deref_to_server {
    ($t:ty) => {
        impl std::ops::Deref for $t {
            type Target = PgServer;
            fn deref(&self) -> &PgServer {
                &self.server
            }
        }

        impl std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut PgServer {
                &mut self.server
            }
        }
    };
}
pub(crate) use deref_to_server;

/// A throwaway PostgreSQL cluster; its [`PgServer`] (port, URL, `psql`,
/// stop and restart) through `Deref`.
pub struct PgCluster {
    server: PgServer,
}

deref_to_server!(PgCluster);

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
        let server = PgServer::launch_in(
            dir,
            free_port(),
            owner,
            options.settings,
            ("postgres", "psql"),
        );
        PgCluster { server }
    }

    /// The same database over the unix socket.
    pub fn socket_url(&self) -> String {
        format!(
            "postgres://postgres@/postgres?host={}&port={}",
            self.socket_dir().display(),
            self.port()
        )
    }

    /// Libpq keyword/value connection string (for tokio-postgres and psql).
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port()
        )
    }

    /// Immediate shutdown (SIGQUIT, `pg_ctl stop -m immediate`): no
    /// checkpoint, backends end at once; what a failover drill does to a primary.
    pub fn stop_immediate(&mut self) {
        if let Some(mut child) = self.take_child() {
            signal(child.id(), libc::SIGQUIT);
            wait_or_kill(&mut child, Duration::from_secs(10));
        }
    }

    /// SIGKILL the postmaster and every backend: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.take_child() {
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

    /// Appends lines to `pg_hba.conf`'s top (they win) and reloads.
    pub fn set_hba(&mut self, hba: &str) {
        fs::write(self.data_dir().join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        chown_tree(&self.data_dir().join("pg_hba.conf"), self.owner());
        if let Some(pid) = self.pid() {
            signal(pid, libc::SIGHUP);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The `confirmed_flush_lsn` of `slot` in bytes; `None` while the slot
    /// does not exist or has confirmed nothing.
    pub fn confirmed_bytes(&self, slot: &str) -> Option<u64> {
        self.psql(&format!(
            "SELECT confirmed_flush_lsn - '0/0' FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .parse()
        .ok()
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

    /// `psql` on this cluster (unix socket, as `postgres`, unaligned,
    /// tuples-only, `ON_ERROR_STOP`), to run in the background or with a
    /// script on stdin; add `-c SQL` or pipe one.
    pub fn psql_command(&self) -> Command {
        psql_base(&self.socket_dir(), self.port())
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
        self.server.quit();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !child_pids_of_dir(&self.data_dir()).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
