//! `cache-invalidator demo` runs the scenario end to end and leaves nothing running.

mod support;

use std::process::Command;

#[test]
fn demo_plays_the_profile_picture_scenario_and_cleans_up() {
    // Force the throwaway PostgreSQL path (nothing listens on this port).
    let closed = support::free_port();
    let out = Command::new(support::binary())
        .arg("demo")
        .env(
            "CACHE_INVALIDATOR_POSTGRES_URL",
            format!("postgres://postgres@127.0.0.1:{closed}/postgres"),
        )
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for line in [
        "user:123:profile             gone",
        "user:123:avatar              gone",
        "team:5:members               gone",
        "chat:room:42:participants    gone",
        "version:user:123             2",
        "unrelated:control            kept",
        r#"PUBLISH cache:invalidate     {"entity":"user","id":"123"}"#,
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    // Nothing of the demo is left running.
    let ps = Command::new("ps").args(["-eo", "args="]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.contains("cache-invalidator-demo"),
        "left running:\n{ps}"
    );
}
