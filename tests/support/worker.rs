//! The worker under test: its config directory ([`WorkerConfig`]), a
//! running `cache-invalidator run` ([`WorkerProcess`]), and the sync probe
//! that tells when it applied everything committed so far.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{binary, now_nanos, signal, ScratchDir};
use super::pg::PgCluster;
use super::redis::{RedisProbe, RedisServer};

/// A table only tests write to, mapped to `sync:<id>` with no truncate: its
/// key disappears only through its own row change, never through a flush.
pub const SYNC_PROBE_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS sync_probe (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)";
/// The mapping of [`SYNC_PROBE_TABLE`].
pub const SYNC_PROBE_MAPPING: &str =
    "[[table]]\nname = \"sync_probe\"\nkeys = [\"sync:{id}\"]\ntruncate = \"none\"\n";

/// Creates [`SYNC_PROBE_TABLE`] on `pg` and returns `mappings` with its
/// mapping (`zz_sync.toml`) added: what a config needs for [`sync_worker`].
pub fn with_sync_probe<'a>(
    pg: &PgCluster,
    mappings: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    pg.psql(SYNC_PROBE_TABLE);
    let mut files = mappings.to_vec();
    files.push(("zz_sync.toml", SYNC_PROBE_MAPPING));
    files
}

/// A config for `pg`/`redis` with `mappings` and the sync probe (extra
/// `[worker]` lines `worker_toml`), `setup` run with `setup_flags`, and a
/// worker that applied everything committed so far (waiting at most
/// `timeout`). The worker's log is in the config's directory: keep both.
pub fn running_worker(
    pg: &PgCluster,
    redis: &RedisServer,
    mappings: &[(&str, &str)],
    worker_toml: &str,
    setup_flags: &[&str],
    timeout: Duration,
) -> (WorkerConfig, WorkerProcess) {
    let cfg = WorkerConfig::new(pg, redis, &with_sync_probe(pg, mappings), worker_toml);
    cfg.run_setup(setup_flags);
    let worker = cfg.spawn_worker();
    sync_worker(pg, redis, timeout);
    (cfg, worker)
}

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

/// A `sync_probe` row id no earlier probe of this test binary used.
pub fn next_sync_probe_id() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Waits until the worker applied everything committed before this call: a
/// change to `sync_probe` (committed after) must delete its key, and then be
/// acknowledged. The key alone is not enough: batches are applied in commit
/// order, but the keys of one batch (several transactions) in no particular
/// order, so the probe's key can go before an earlier transaction's key.
pub fn sync_worker(pg: &PgCluster, redis: &RedisServer, timeout: Duration) {
    let id = next_sync_probe_id();
    let mut probe = RedisProbe::new(redis);
    let key = format!("sync:{id}");
    probe.set(&key, "x");
    let lsn = touch_sync_probe(pg, id);
    probe.wait_gone(&key, timeout);
    pg.wait_confirmed(&lsn, timeout);
}

/// Starts `record --out <out> --publication <publication> <extra...>` over
/// the Unix socket and waits until its temporary slot is active (changes are
/// recorded from the slot's creation on).
pub fn spawn_record(pg: &PgCluster, out: &Path, publication: &str, extra: &[&str]) -> Child {
    let child = Command::new(binary())
        .arg("record")
        .arg("--out")
        .arg(out)
        .args(["--publication", publication])
        .args(extra)
        .env("CACHE_INVALIDATOR_POSTGRES_URL", pg.socket_url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn record");
    super::common::wait_for("record's temporary slot", Duration::from_secs(30), || {
        (pg.psql(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cache_invalidator_record_%' AND active",
        ) == "1")
            .then_some(())
    });
    child
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
        Self::write(
            &pg.url(),
            "cache_invalidator",
            redis_toml,
            mappings,
            worker_toml,
        )
    }

    /// A config from URLs alone, with no mappings yet (add them with
    /// [`WorkerConfig::mapping`] or [`WorkerConfig::with_demo_mappings`]):
    /// for commands run against servers that are down or hand-made.
    pub fn urls(pg_url: &str, redis_url: &str, publication: &str) -> Self {
        let redis_toml = format!("url = \"{redis_url}\"");
        Self::write(pg_url, publication, &redis_toml, &[], "")
    }

    /// A config with any PostgreSQL URL (several hosts, say), extra
    /// `[postgres]` lines (e.g. `auto_setup = true`), and `tail_toml` after
    /// `[worker]` (its lines, then any further sections such as `[metrics]`).
    pub fn with_postgres(
        pg_url: &str,
        postgres_toml: &str,
        redis: &RedisServer,
        mappings: &[(&str, &str)],
        tail_toml: &str,
    ) -> Self {
        let redis_toml = format!("url = \"{}\"", redis.url());
        Self::write_full(
            pg_url,
            "cache_invalidator",
            postgres_toml,
            &redis_toml,
            mappings,
            tail_toml,
        )
    }

    /// Turns `[postgres] auto_setup` on in the written config (for the next
    /// worker started).
    pub fn set_auto_setup(&self) {
        let text = std::fs::read_to_string(self.path()).expect("config");
        let text = text.replace(
            "publication = \"cache_invalidator\"\n",
            "publication = \"cache_invalidator\"\nauto_setup = true\n",
        );
        std::fs::write(self.path(), text).expect("write config");
    }

    fn write(
        pg_url: &str,
        publication: &str,
        redis_toml: &str,
        mappings: &[(&str, &str)],
        worker_toml: &str,
    ) -> Self {
        Self::write_full(pg_url, publication, "", redis_toml, mappings, worker_toml)
    }

    fn write_full(
        pg_url: &str,
        publication: &str,
        postgres_toml: &str,
        redis_toml: &str,
        mappings: &[(&str, &str)],
        worker_toml: &str,
    ) -> Self {
        let dir = ScratchDir::new("cfg");
        fs::create_dir_all(dir.path().join("mappings")).expect("mappings dir");
        let config = format!(
            "mappings = \"mappings\"\n\n[postgres]\nurl = \"{pg_url}\"\nslot = \"cache_invalidator\"\npublication = \"{publication}\"\n{postgres_toml}\n\n[redis]\n{redis_toml}\n\n[worker]\n{worker_toml}\n",
        );
        fs::write(dir.path().join("cache-invalidator.toml"), config).expect("write config");
        let config = WorkerConfig { dir };
        for (name, text) in mappings {
            config.mapping(name, text);
        }
        config
    }

    /// Writes (or replaces) one mapping file.
    pub fn mapping(&self, file: &str, text: &str) {
        fs::write(self.dir.path().join("mappings").join(file), text).expect("write mapping");
    }

    /// Writes a file next to the config and returns its path.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, text).expect("write file");
        path
    }

    /// Adds the repository's demo mappings (`mappings/*.toml`), without the sync probe.
    pub fn with_demo_mappings(self) -> Self {
        for (name, text) in demo_mappings() {
            self.mapping(&name, &text);
        }
        self
    }

    /// A config using the repository's demo mappings (`mappings/*.toml`).
    pub fn demo(pg: &PgCluster, redis: &RedisServer) -> Self {
        let redis_toml = format!("url = \"{}\"", redis.url());
        Self::demo_with_redis(pg, &redis_toml)
    }

    /// The demo mappings with the body of `[redis]` given.
    pub fn demo_with_redis(pg: &PgCluster, redis_toml: &str) -> Self {
        let mut files = demo_mappings();
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
            .env_remove("CACHE_INVALIDATOR_CONFIG")
            .output()
            .expect("run cache-invalidator");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs `setup` with `flags`, asserts it succeeded, and returns its stdout.
    pub fn run_setup(&self, flags: &[&str]) -> String {
        let mut args = vec!["setup"];
        args.extend_from_slice(flags);
        let (code, out, err) = self.command(&args);
        assert_eq!(code, 0, "setup failed:\n{out}\n{err}");
        out
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

/// A `[metrics]` section serving on `127.0.0.1:port`, to append after the
/// `[worker]` lines of a config.
pub fn metrics_toml(port: u16) -> String {
    format!("\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

/// GET `path` from `127.0.0.1:port` (HTTP/1.1, connection closed): the
/// status and the body, `None` while nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The value of one Prometheus sample in `metrics`: `name` with every
/// `labels` pair, summed over the other labels; 0 when absent.
pub fn metric_sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The repository's demo mappings (`mappings/*.toml`): (file name, text).
fn demo_mappings() -> Vec<(String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings");
    let mut files = Vec::new();
    for entry in fs::read_dir(&src).expect("mappings/") {
        let path = entry.expect("entry").path();
        if path.extension().map(|e| e == "toml").unwrap_or(false) {
            let name = path
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            files.push((name, fs::read_to_string(&path).expect("read mapping")));
        }
    }
    files.sort();
    files
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
