//! Throwaway `redis-server` instances on free loopback ports, and
//! [`RedisProbe`], a synchronous connection for assertions.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cache_invalidator::sink::identity::{self, Identity, IdentityCheck};
use cache_invalidator::sink::RedisSink;

use super::common::{free_port, signal, wait_for, wait_or_kill, ScratchDir, START_TIMEOUT};

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

    /// An async connection, as an application's reader or writer holds one.
    pub async fn async_connection(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("redis async connection")
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

/// The sink's options for a throwaway Redis at `url`: no password, no
/// `WAIT`, no second delete pass, no TLS.
pub fn sink_options(url: impl Into<String>) -> cache_invalidator::sink::SinkOptions {
    cache_invalidator::sink::SinkOptions {
        url: url.into(),
        password: None,
        wait_replicas: 0,
        redelete_after: None,
        tls: Default::default(),
    }
}

/// Subscribes `conn` to `channel`; every read waits at most `timeout`.
pub fn subscribe<'a>(
    conn: &'a mut redis::Connection,
    channel: &str,
    timeout: Duration,
) -> redis::PubSub<'a> {
    let mut pubsub = conn.as_pubsub();
    pubsub.subscribe(channel).expect("SUBSCRIBE");
    pubsub
        .set_read_timeout(Some(timeout))
        .expect("read timeout");
    pubsub
}

/// Reads messages until one whose payload contains `needle`, and returns
/// that payload (a read that times out fails the test).
pub fn wait_message(pubsub: &mut redis::PubSub<'_>, needle: &str) -> String {
    loop {
        let m = pubsub.get_message().expect("a pub/sub message");
        let payload: String = m.get_payload().expect("a text payload");
        if payload.contains(needle) {
            return payload;
        }
    }
}

/// The identity the worker of slot `slot1` (PostgreSQL system 42, timeline
/// 1) would keep in `sink`'s Redis: its key and its value.
pub async fn slot1_identity(sink: &RedisSink) -> (String, Identity) {
    let mut conn = sink.connection();
    let current = Identity {
        redis_run_id: identity::redis_run_id(&mut conn, sink.target())
            .await
            .expect("the Redis run id"),
        pg_system_id: "42".into(),
        pg_timeline: 1,
    };
    (identity::identity_key("slot1"), current)
}

/// Stores `current` under `key` through `sink`'s connection and checks it
/// then reads as unchanged.
pub async fn store_identity(sink: &RedisSink, key: &str, current: &Identity) {
    let mut conn = sink.connection();
    identity::store(&mut conn, sink.target(), key, current)
        .await
        .expect("store the identity");
    assert_eq!(
        identity::check(&mut conn, sink.target(), key, current)
            .await
            .expect("check the identity"),
        IdentityCheck::Unchanged
    );
}
