//! No secret in any output: the binary runs `check`, `record` and `run`
//! against servers with wrong and with right passwords, at `RUST_LOG=debug`,
//! and a distinctive password string must never appear in stdout or stderr.

mod support;

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{binary, PgCluster, RedisServer};

const PG_PASSWORD: &str = "Zq7pgSECRETxyzzy";
const REDIS_PASSWORD: &str = "Zq7redisSECRETplugh";
const WRONG_PG: &str = "Zq7wrongPGSECRETfrob";
const WRONG_REDIS: &str = "Zq7wrongREDISSECRETgrue";
const ALL: [&str; 4] = [PG_PASSWORD, REDIS_PASSWORD, WRONG_PG, WRONG_REDIS];

/// Runs the binary with `args` for at most `limit` (then SIGTERM), returning
/// (stdout, stderr).
fn run_binary(
    config: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = fs::File::create(dir.path().join("out")).unwrap();
    let err = fs::File::create(dir.path().join("err")).unwrap();
    let mut child = Command::new(binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("CACHE_INVALIDATOR_POSTGRES_URL")
        .env_remove("CACHE_INVALIDATOR_REDIS_URL")
        .env("RUST_LOG", "debug")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let hard = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() && Instant::now() < hard {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    format!(
        "{}\n{}",
        fs::read_to_string(dir.path().join("out")).unwrap(),
        fs::read_to_string(dir.path().join("err")).unwrap()
    )
}

fn assert_clean(what: &str, output: &str) {
    for secret in ALL {
        assert!(
            !output.contains(secret),
            "{what}: a password appears in the output:\n{output}"
        );
    }
}

#[test]
fn no_password_in_any_output_of_failing_or_working_runs() {
    let mut pg = PgCluster::start();
    pg.migrate();
    pg.psql(&format!("ALTER ROLE postgres PASSWORD '{PG_PASSWORD}'"));
    pg.psql("CREATE PUBLICATION cache_invalidator FOR TABLE users, teams, team_members, chat_rooms, chat_participants, authors, posts");
    pg.psql("SELECT pg_create_logical_replication_slot('cache_invalidator', 'pgoutput')");
    pg.set_hba("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n");
    let redis = RedisServer::start_with(&[
        "--user",
        "worker",
        "on",
        &format!(">{REDIS_PASSWORD}"),
        "~*",
        "&*",
        "+@all",
    ]);

    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("mappings")).unwrap();
    for f in ["users.toml", "teams.toml", "chat.toml", "blog.toml"] {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("mappings")
            .join(f);
        fs::copy(src, dir.path().join("mappings").join(f)).unwrap();
    }
    fs::write(dir.path().join("pg"), format!("{PG_PASSWORD}\n")).unwrap();
    fs::write(dir.path().join("redis"), format!("{REDIS_PASSWORD}\n")).unwrap();
    let write_config = |name: &str,
                        pg_url: &str,
                        pg_extra: &str,
                        redis_url: &str,
                        redis_extra: &str| {
        let path = dir.path().join(name);
        fs::write(
            &path,
            format!("mappings = \"mappings\"\n[postgres]\nurl = \"{pg_url}\"\n{pg_extra}\n[redis]\nurl = \"{redis_url}\"\n{redis_extra}\n"),
        )
        .unwrap();
        path
    };
    let pg_base = format!("127.0.0.1:{}/postgres?sslmode=prefer", pg.port());
    let wrong = write_config(
        "wrong.toml",
        &format!("postgres://postgres:{WRONG_PG}@{pg_base}"),
        "",
        &format!("redis://worker:{WRONG_REDIS}@127.0.0.1:{}/0", redis.port()),
        "",
    );
    let right = write_config(
        "right.toml",
        &format!("postgres://postgres@{pg_base}"),
        "password_file = \"pg\"",
        &format!("redis://worker@127.0.0.1:{}/0", redis.port()),
        "password_file = \"redis\"",
    );
    let in_url = write_config(
        "in_url.toml",
        &format!("postgres://postgres:{PG_PASSWORD}@{pg_base}"),
        "",
        &format!(
            "redis://worker:{REDIS_PASSWORD}@127.0.0.1:{}/0",
            redis.port()
        ),
        "",
    );
    let short = Duration::from_secs(4);

    // Wrong passwords: every command fails, saying why, without the password.
    let out = run_binary(&wrong, &["check"], &[], short);
    assert_clean("check (wrong)", &out);
    let out = run_binary(
        &wrong,
        &["record", "--timeout", "2", "--out", "-"],
        &[],
        short,
    );
    assert!(out.contains("authentication failed"), "{out}");
    assert_clean("record (wrong)", &out);
    let wrong_url = format!("postgres://postgres:{WRONG_PG}@{pg_base}");
    let out = run_binary(
        &right,
        &[
            "record",
            "--postgres-url",
            &wrong_url,
            "--timeout",
            "2",
            "--out",
            "-",
        ],
        &[],
        short,
    );
    assert!(out.contains("authentication failed"), "{out}");
    assert_clean("record --postgres-url (wrong)", &out);
    let out = run_binary(&wrong, &["run"], &[], Duration::from_secs(6));
    assert!(out.contains("authentication failed"), "{out}");
    assert_clean("run (wrong postgres)", &out);
    let out = run_binary(
        &wrong,
        &["run"],
        &[(
            "CACHE_INVALIDATOR_POSTGRES_URL",
            &format!("postgres://postgres:{PG_PASSWORD}@{pg_base}"),
        )],
        Duration::from_secs(6),
    );
    assert_clean("run (wrong redis)", &out);

    // Right passwords, from password_file and in the URLs: the commands work.
    for config in [&right, &in_url] {
        let out = run_binary(config, &["check"], &[], short);
        assert!(out.contains("Redis ACL for the worker"), "{out}");
        assert_clean("check", &out);
        let out = run_binary(
            config,
            &["record", "--timeout", "2", "--out", "-"],
            &[],
            short,
        );
        assert!(!out.contains("authentication failed"), "{out}");
        assert_clean("record", &out);
        let out = run_binary(config, &["run"], &[], Duration::from_secs(5));
        assert!(!out.contains("authentication failed"), "{out}");
        assert_clean("run", &out);
    }
}
