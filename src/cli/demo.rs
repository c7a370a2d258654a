//! `cache-invalidator demo`: the profile-picture scenario, end to end, on a
//! local PostgreSQL and Redis.
//!
//! PostgreSQL: the one at `CACHE_INVALIDATOR_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) when it runs with
//! `wal_level = logical` — the demo then works in its own database
//! `cache_invalidator_demo` and drops it, its slot and publication at the end;
//! otherwise a throwaway cluster from the installed binaries. Redis: a
//! throwaway `redis-server` when the binary is installed (your data is never
//! touched), else the local one's database 15. Nothing is left running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::error::{Because, BoxError, CliError};
use crate::lsn::Lsn;
use crate::source::conninfo::mask_connection_string;

/// The demo schema and mappings, built into the binary.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "001_users_and_teams.sql",
        include_str!("../../migrations/001_users_and_teams.sql"),
    ),
    (
        "002_chat.sql",
        include_str!("../../migrations/002_chat.sql"),
    ),
    (
        "003_blog.sql",
        include_str!("../../migrations/003_blog.sql"),
    ),
    (
        "004_seed.sql",
        include_str!("../../migrations/004_seed.sql"),
    ),
];
const MAPPINGS: &[(&str, &str)] = &[
    ("users.toml", include_str!("../../mappings/users.toml")),
    ("teams.toml", include_str!("../../mappings/teams.toml")),
    ("chat.toml", include_str!("../../mappings/chat.toml")),
    ("blog.toml", include_str!("../../mappings/blog.toml")),
];
const DEMO_DB: &str = "cache_invalidator_demo";
const WAIT: Duration = Duration::from_secs(30);

/// A demo step failed because of `err`, kept as the cause.
fn fail(what: &str, err: impl Into<BoxError>) -> CliError {
    CliError::runtime(Because::new(format!("demo: {what}"), err))
}

/// A demo step failed for a reason said in words.
fn failed(what: &str, why: impl std::fmt::Display) -> CliError {
    CliError::runtime(format!("demo: {what}: {why}"))
}

/// Runs the demo.
pub async fn run() -> Result<(), CliError> {
    let scratch =
        std::env::temp_dir().join(format!("cache-invalidator-demo-{}", std::process::id()));
    std::fs::create_dir_all(scratch.join("mappings"))
        .map_err(|e| fail("create a scratch dir", e))?;
    let mut servers = Servers::default();
    let result = demo(&scratch, &mut servers).await;
    servers.stop().await;
    let _ = std::fs::remove_dir_all(&scratch);
    if result.is_ok() {
        println!("\nDone: the worker stopped, the demo's servers and slot are gone.");
    }
    result
}

/// What the demo started or created, undone by [`Servers::stop`].
#[derive(Default)]
struct Servers {
    pg_throwaway: Option<PathBuf>,
    pg_shared_admin: Option<String>,
    redis: Option<Child>,
    worker: Option<Child>,
}

impl Servers {
    async fn stop(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            signal_term(&worker);
            let _ = wait_child(&mut worker, Duration::from_secs(10));
        }
        if let Some(admin) = self.pg_shared_admin.take() {
            if let Ok(sql) = crate::pg::connect_url(&admin, None).await {
                let _ = sql
                    .client()
                    .batch_execute(&format!(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{DEMO_DB}';
                         DROP DATABASE IF EXISTS {DEMO_DB} WITH (FORCE);"
                    ))
                    .await;
            }
        }
        if let Some(dir) = self.pg_throwaway.take() {
            let _ = pg_command(&dir, "pg_ctl")
                .args(["-D"])
                .arg(dir.join("data"))
                .args(["stop", "-m", "fast", "-w"])
                .stdout(Stdio::null())
                .status();
        }
        if let Some(mut redis) = self.redis.take() {
            let _ = redis.kill();
            let _ = redis.wait();
        }
    }
}

async fn demo(scratch: &Path, servers: &mut Servers) -> Result<(), CliError> {
    println!("cache-invalidator demo: the lesson's profile-picture scenario\n");
    let pg_url = postgres(scratch, servers).await?;
    let redis_url = redis(scratch, servers)?;

    // Schema, mappings, config.
    let sql = crate::pg::connect_url(&pg_url, None)
        .await
        .map_err(|e| fail("connect to PostgreSQL", e))?;
    let client = sql.client();
    for (name, sql) in MIGRATIONS {
        client.batch_execute(sql).await.map_err(|e| fail(name, e))?;
    }
    println!("applied migrations/ (users, teams, team_members, chat_rooms, chat_participants, authors, posts)");
    for (name, text) in MAPPINGS {
        std::fs::write(scratch.join("mappings").join(name), text)
            .map_err(|e| fail("write mappings", e))?;
    }
    let config = scratch.join("cache-invalidator.toml");
    std::fs::write(
        &config,
        format!(
            "mappings = \"mappings\"\n\n[postgres]\nurl = \"{pg_url}\"\nslot = \"cache_invalidator_demo\"\npublication = \"cache_invalidator_demo\"\n\n[redis]\nurl = \"{redis_url}\"\n"
        ),
    )
    .map_err(|e| fail("write the config", e))?;

    println!("\n$ cache-invalidator setup --replica-identity-full");
    let options = super::setup::SetupOptions {
        replica_identity_full: true,
        ..Default::default()
    };
    super::setup::run_with_env(&config, &options, &crate::config::EnvOverrides::default()).await?;

    println!("\n$ cache-invalidator run   (in the background)");
    let exe = std::env::current_exe().map_err(|e| fail("find this executable", e))?;
    let worker = Command::new(exe)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("RUST_LOG", "error")
        .env_remove("CACHE_INVALIDATOR_POSTGRES_URL")
        .env_remove("CACHE_INVALIDATOR_REDIS_URL")
        .env_remove("CACHE_INVALIDATOR_CONFIG")
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| fail("start the worker", e))?;
    servers.worker = Some(worker);

    let redis_client = redis::Client::open(redis_url.as_str()).map_err(|e| fail("Redis URL", e))?;
    let mut r = redis_client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| fail("connect to Redis", e))?;
    // Wait until the worker streams (its setup flush would delete what we cache).
    let probe_started = Instant::now();
    loop {
        let _: () = redis::cmd("SET")
            .arg("user:123:settings")
            .arg("probe")
            .query_async(&mut r)
            .await
            .map_err(|e| fail("SET", e))?;
        client
            .batch_execute("UPDATE users SET updated_at = now() WHERE id = 123")
            .await
            .map_err(|e| fail("UPDATE", e))?;
        if wait_gone(&mut r, "user:123:settings", Duration::from_secs(2)).await {
            break;
        }
        if probe_started.elapsed() > WAIT {
            return Err(failed(
                "wait for the worker",
                "it did not start streaming within 30 s",
            ));
        }
    }
    // A slow first probe may still be in flight: wait until the worker has
    // acknowledged every probe update, or it would bump the version below.
    wait_acknowledged(&pg_url, "cache_invalidator_demo").await?;
    let _: () = redis::cmd("DEL")
        .arg("version:user:123")
        .query_async(&mut r)
        .await
        .map_err(|e| fail("DEL", e))?;

    println!("\nThe application caches user 123 the lesson's way:");
    let cached = [
        ("user:123:profile", r#"{"name":"Ada","avatar":"ada-1.png"}"#),
        ("user:123:avatar", "https://img.example.com/ada-1.png"),
        ("team:5:members", r#"[{"id":123,"avatar":"ada-1.png"}]"#),
        (
            "chat:room:42:participants",
            r#"[{"id":123,"avatar":"ada-1.png"}]"#,
        ),
        ("unrelated:control", "kept"),
    ];
    for (key, value) in cached {
        crate::cache::set_tagged(&mut r, key, value, 300, &[], "tag:")
            .await
            .map_err(|e| fail("SET", e))?;
        println!("  SET {key}");
    }
    for list in ["team:5:members", "chat:room:42:participants"] {
        crate::cache::set_tagged(
            &mut r,
            list,
            cached
                .iter()
                .find(|c| c.0 == list)
                .map(|c| c.1)
                .unwrap_or(""),
            300,
            &["user:123"],
            "tag:",
        )
        .await
        .map_err(|e| fail("SADD", e))?;
        println!("  SADD tag:user:123 {list}");
    }

    let mut pubsub = redis_client
        .get_async_pubsub()
        .await
        .map_err(|e| fail("subscribe", e))?;
    pubsub
        .subscribe("cache:invalidate")
        .await
        .map_err(|e| fail("subscribe", e))?;
    println!("  SUBSCRIBE cache:invalidate   (the lesson's listener)");

    println!("\nUser 123 changes their picture, with plain SQL (no application code):");
    let sql = "UPDATE users SET avatar_url = 'https://img.example.com/ada-2.png' WHERE id = 123";
    println!("  {sql};");
    client
        .batch_execute(sql)
        .await
        .map_err(|e| fail("UPDATE", e))?;

    println!("\nAfter the commit, the worker invalidated:");
    for (key, _) in cached.iter().take(4) {
        if wait_gone(&mut r, key, WAIT).await {
            println!("  {key:<28} gone");
        } else {
            return Err(failed(
                "invalidate",
                format!("{key} is still cached after 30 s"),
            ));
        }
    }
    let tag_gone = wait_gone(&mut r, "tag:user:123", WAIT).await;
    println!(
        "  {:<28} {}",
        "tag:user:123",
        if tag_gone {
            "gone (its members deleted)"
        } else {
            "STILL THERE"
        }
    );
    let version: Option<String> = redis::cmd("GET")
        .arg("version:user:123")
        .query_async(&mut r)
        .await
        .map_err(|e| fail("GET", e))?;
    println!(
        "  {:<28} {}",
        "version:user:123",
        version.as_deref().unwrap_or("missing")
    );
    let kept: Option<String> = redis::cmd("GET")
        .arg("unrelated:control")
        .query_async(&mut r)
        .await
        .map_err(|e| fail("GET", e))?;
    println!(
        "  {:<28} {}",
        "unrelated:control",
        if kept.is_some() {
            "kept (no mapping derives it)"
        } else {
            "DELETED?!"
        }
    );
    let message = tokio::time::timeout(WAIT, pubsub.on_message().next()).await;
    match message {
        Ok(Some(msg)) => {
            let payload: String = msg.get_payload().unwrap_or_default();
            println!("  PUBLISH cache:invalidate     {payload}");
        }
        _ => {
            return Err(failed(
                "pub/sub",
                "no message on cache:invalidate within 30 s",
            ))
        }
    }
    if !tag_gone || kept.is_none() || version.as_deref() != Some("2") {
        return Err(failed(
            "check the result",
            "an invalidation is missing (see above)",
        ));
    }

    println!("\nStopping the worker (SIGTERM: finish, acknowledge, exit 0).");
    if let Some(mut worker) = servers.worker.take() {
        signal_term(&worker);
        match wait_child(&mut worker, Duration::from_secs(10)) {
            Some(0) => {}
            other => return Err(failed("stop the worker", format!("exit status {other:?}"))),
        }
    }
    Ok(())
}

/// Waits until `slot`'s confirmed position reaches the current WAL position:
/// every transaction committed so far has been applied to Redis.
async fn wait_acknowledged(pg_url: &str, slot: &str) -> Result<(), CliError> {
    let sql = crate::pg::connect_url(pg_url, None)
        .await
        .map_err(|e| fail("connect to PostgreSQL", e))?;
    // `catalog::slot` reads the server's WAL position beside the slot's.
    let read = || async {
        let facts = crate::pg::catalog::slot(sql.client(), slot)
            .await
            .map_err(|e| fail("read the slot's position", e))?
            .ok_or_else(|| failed("read the slot's position", format!("no slot {slot}")))?;
        let lsn = |text: Option<&str>| text.and_then(|t| t.parse::<Lsn>().ok());
        Ok::<_, CliError>((
            lsn(Some(&facts.current_lsn)),
            lsn(facts.confirmed_flush_lsn.as_deref()),
        ))
    };
    let target = read().await?.0.ok_or_else(|| {
        failed(
            "read the WAL position",
            "pg_current_wal_lsn() is unreadable",
        )
    })?;
    let deadline = Instant::now() + WAIT;
    loop {
        if read().await?.1 >= Some(target) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(failed(
                "wait for the worker",
                format!("slot {slot} did not confirm {target} within 30 s"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_gone(
    r: &mut redis::aio::MultiplexedConnection,
    key: &str,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(r)
            .await
            .unwrap_or(1);
        if exists == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A PostgreSQL with `wal_level = logical`: the local one, or a throwaway.
async fn postgres(scratch: &Path, servers: &mut Servers) -> Result<String, CliError> {
    let admin = std::env::var("CACHE_INVALIDATOR_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    if let Ok(Ok(sql)) =
        tokio::time::timeout(Duration::from_secs(3), crate::pg::connect_url(&admin, None)).await
    {
        let client = sql.client();
        let level = client
            .query_one("SHOW wal_level", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default();
        if level == "logical" {
            client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {DEMO_DB} WITH (FORCE); CREATE DATABASE {DEMO_DB}"
                ))
                .await
                .map_err(|e| fail("create the demo database", e))?;
            servers.pg_shared_admin = Some(admin.clone());
            let url = match admin.rfind('/') {
                Some(i) => format!("{}/{DEMO_DB}", &admin[..i]),
                None => return Err(failed("PostgreSQL URL", "no database part")),
            };
            println!(
                "PostgreSQL: {} (wal_level = logical), database {DEMO_DB}",
                mask_connection_string(&admin)
            );
            return Ok(url);
        }
        println!(
            "PostgreSQL at {} has wal_level = {}: starting a throwaway cluster instead",
            mask_connection_string(&admin),
            level
        );
    } else {
        println!(
            "no PostgreSQL reachable at {}: starting a throwaway cluster",
            mask_connection_string(&admin)
        );
    }
    let dir = scratch.join("pg");
    std::fs::create_dir_all(&dir).map_err(|e| fail("create the cluster dir", e))?;
    if is_root() {
        let ok = Command::new("chown")
            .arg("-R")
            .arg("postgres")
            .arg(&dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err(failed(
                "chown the cluster dir to postgres",
                "running as root needs the `postgres` OS user",
            ));
        }
    }
    let out = pg_command(&dir, "initdb")
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
        .output()
        .map_err(|e| fail("run initdb (install PostgreSQL server binaries)", e))?;
    if !out.status.success() {
        return Err(failed("initdb", String::from_utf8_lossy(&out.stderr)));
    }
    let port = free_port()?;
    let opts = format!(
        "-c wal_level=logical -c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
        dir.display()
    );
    let out = pg_command(&dir, "pg_ctl")
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-o", &opts, "-l"])
        .arg(dir.join("postgres.log"))
        .args(["-w", "start"])
        .output()
        .map_err(|e| fail("run pg_ctl", e))?;
    if !out.status.success() {
        return Err(failed(
            "start PostgreSQL",
            String::from_utf8_lossy(&out.stderr),
        ));
    }
    servers.pg_throwaway = Some(dir);
    println!("PostgreSQL: throwaway cluster on 127.0.0.1:{port} (wal_level = logical)");
    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}

/// A throwaway `redis-server`, or the local one's database 15.
fn redis(scratch: &Path, servers: &mut Servers) -> Result<String, CliError> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(scratch)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(child) => {
            servers.redis = Some(child);
            let url = format!("redis://127.0.0.1:{port}/0");
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if Instant::now() > deadline {
                    return Err(failed("start redis-server", "not listening after 10 s"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            println!("Redis: throwaway redis-server on 127.0.0.1:{port}");
            Ok(url)
        }
        Err(_) => {
            println!("Redis: no redis-server binary; using redis://127.0.0.1:6379/15");
            Ok("redis://127.0.0.1:6379/15".into())
        }
    }
}

/// A PostgreSQL binary, run as the `postgres` user when we are root.
fn pg_command(dir: &Path, tool: &str) -> Command {
    let bin = pg_bindir()
        .map(|b| b.join(tool))
        .unwrap_or_else(|| PathBuf::from(tool));
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.current_dir(dir);
    cmd
}

fn pg_bindir() -> Option<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> Result<u16, CliError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| fail("find a free port", e))
}

fn signal_term(child: &Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
