//! Golden tests: recorded files under `tests/fixtures/replay/` replayed through
//! the demo mappings (`mappings/`, via `cache-invalidator.toml`) by the binary
//! and by the library; the expected plans are committed beside them
//! (`<name>.expected.jsonl`). Regenerate with
//! `cache-invalidator replay tests/fixtures/replay/<name>.jsonl > ...expected.jsonl`
//! and review the diff.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use cache_invalidator::config::{Config, EnvOverrides};
use cache_invalidator::map::Mappings;
use cache_invalidator::replay::replay_str;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("tests/fixtures/replay"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.to_string_lossy().ends_with(".jsonl")
                && !p.to_string_lossy().ends_with(".expected.jsonl")
        })
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

fn expected(f: &Path) -> String {
    let e = f.with_extension("expected.jsonl");
    std::fs::read_to_string(&e).unwrap_or_else(|err| panic!("{}: {err}", e.display()))
}

/// The plans the library makes of the recorded file `f` with `config`'s
/// planner settings and `mappings`, one JSON line each (as the binary prints
/// them).
fn library_plans(config: &Config, mappings: Arc<Mappings>, f: &Path) -> String {
    let plans = replay_str(
        mappings,
        config.planner_context("replay"),
        &std::fs::read_to_string(f).unwrap(),
    )
    .unwrap();
    plans
        .iter()
        .map(|p| serde_json::to_string(p).unwrap() + "\n")
        .collect()
}

fn bin(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cache-invalidator"))
        .current_dir(root())
        .env_remove("CACHE_INVALIDATOR_CONFIG")
        .env_remove("CACHE_INVALIDATOR_POSTGRES_URL")
        .env_remove("CACHE_INVALIDATOR_REDIS_URL")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn golden_plans_through_the_binary() {
    for f in fixtures() {
        if f.to_string_lossy().contains("malformed") {
            continue;
        }
        let out = bin(&["replay", f.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            f.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            expected(&f),
            "{}",
            f.display()
        );
    }
}

#[test]
fn golden_plans_through_the_library() {
    let config = Config::load(
        &root().join("cache-invalidator.toml"),
        &EnvOverrides::default(),
    )
    .unwrap();
    let mappings = Arc::new(config.mappings.load().unwrap());
    for f in fixtures() {
        if f.to_string_lossy().contains("malformed") {
            continue;
        }
        let got = library_plans(&config, Arc::clone(&mappings), &f);
        assert_eq!(got, expected(&f), "{}", f.display());
    }
}

#[test]
fn a_malformed_line_stops_replay_with_exit_2() {
    let f = root().join("tests/fixtures/replay/malformed.jsonl");
    let out = bin(&["replay", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "nothing replayed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("malformed.jsonl:line 2: "), "{err}");
    assert!(err.contains("nothing was replayed"), "{err}");

    let out = bin(&["replay", "--skip-bad-lines", f.to_str().unwrap()]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected(&f));
}

/// Runs the binary with both servers pointed at a closed port (a server on
/// the default ports of this machine must not change the outcome).
fn bin_offline(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cache-invalidator"))
        .current_dir(root())
        .env_remove("CACHE_INVALIDATOR_CONFIG")
        .env(
            "CACHE_INVALIDATOR_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:1/postgres",
        )
        .env("CACHE_INVALIDATOR_REDIS_URL", "redis://127.0.0.1:1/0")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn replay_apply_without_redis_is_a_runtime_failure_and_prints_nothing() {
    let f = root().join("tests/fixtures/replay/blog.jsonl");
    let out = bin_offline(&["replay", "--apply", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1"));
}

#[test]
fn check_accepts_the_demo_mappings() {
    let out = bin_offline(&["check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: 5 rule(s) on 5 table(s)"));
}

#[test]
fn check_refuses_a_typo_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.toml"),
        "[[table]]\nname = \"users\"\nkyes = [\"user:{id}\"]\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        "mappings = [\"m.toml\"]\n[postgres]\nurl = \"postgres://x@h/db\"\n[redis]\nurl = \"redis://h/0\"\n",
    )
    .unwrap();
    let out = bin(&[
        "--config",
        dir.path().join("c.toml").to_str().unwrap(),
        "check",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("m.toml:3:1: unknown field `kyes`: did you mean `keys`?"),
        "{err}"
    );
}

/// `refresh` rules: the golden plan shows each refreshed key's value exactly
/// as it is set (typed JSON with `_lsn` first, a hash's fields), the last
/// image of a row changed twice in one transaction, a moved row's old keys
/// unlinked, an unknown column unlinking that key only, and a delete.
#[test]
fn golden_refresh_plans() {
    let dir = root().join("tests/fixtures/refresh");
    let f = dir.join("profile.jsonl");
    let expected = std::fs::read_to_string(dir.join("profile.expected.jsonl")).unwrap();
    let out = bin(&[
        "--config",
        dir.join("cache-invalidator.toml").to_str().unwrap(),
        "replay",
        f.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unlinked its key instead"), "{err}");
    assert!(!err.contains("fired the table's truncate"), "{err}");

    let config = Config::load(
        &dir.join("cache-invalidator.toml"),
        &EnvOverrides::default(),
    )
    .unwrap();
    let got = library_plans(&config, Arc::new(config.mappings.load().unwrap()), &f);
    assert_eq!(got, expected);
}
