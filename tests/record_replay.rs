//! Issue 4's end-to-end check: `record` real SQL, `replay` it through the demo
//! mappings, compare with the expected plan.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::{binary, wait_for, PgCluster, RedisServer, ScratchDir, WorkerConfig};

#[test]
fn recorded_sql_replays_into_the_expected_plan() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.migrate();
    let cfg = WorkerConfig::demo(&pg, &redis);
    let (code, out, err) = cfg.command(&["setup", "--replica-identity-full"]);
    assert_eq!(code, 0, "{out}{err}");

    let dir = ScratchDir::new("rr");
    let file = dir.path().join("recorded.jsonl");
    let mut record = Command::new(binary())
        .args([
            "record",
            "--max-txns",
            "3",
            "--timeout",
            "60",
            "--publication",
            "cache_invalidator",
            "--out",
        ])
        .arg(&file)
        .env("CACHE_INVALIDATOR_POSTGRES_URL", pg.url())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn record");
    wait_for("record's temporary slot", Duration::from_secs(30), || {
        (pg.psql("SELECT count(*) FROM pg_replication_slots WHERE temporary AND active") == "1")
            .then_some(())
    });
    pg.psql("UPDATE users SET avatar_url = 'https://img.example.com/ada-2.png' WHERE id = 123");
    pg.psql("UPDATE posts SET author_id = 2 WHERE id = 7");
    // A declared invalidation, recorded in place and planned by replay.
    pg.psql(
        "BEGIN; UPDATE posts SET title = 'Cache invalidation, 2nd ed.' WHERE id = 7; \
         SELECT cache_invalidator.invalidate(keys => ARRAY['post:7:comment_count'], tags => ARRAY['author:1']); COMMIT;",
    );
    let status = record.wait().unwrap();
    assert!(status.success(), "record failed");

    let (code, stdout, stderr) = cfg.command(&["replay", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let plans: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(plans.len(), 3, "{stdout}");
    let recorded: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(plans[0]["lsn"], recorded[0]["lsn"]);
    assert_eq!(
        plans[0]["keys"],
        json!(["user:123:avatar", "user:123:profile", "user:123:settings"])
    );
    assert_eq!(plans[0]["tags"], json!(["tag:user:123"]));
    assert_eq!(plans[0]["versions"], json!(["version:user:123"]));
    assert_eq!(
        plans[0]["publish"],
        json!([{"channel": "cache:invalidate", "message": {"entity": "user", "id": "123"}}])
    );
    assert_eq!(
        plans[1]["keys"],
        json!(["author:1:posts", "author:2:posts", "post:7"])
    );
    assert_eq!(plans[1]["lsn"], recorded[1]["lsn"]);
    let message = &recorded[2]["changes"][1];
    assert_eq!(message["op"], "message", "{}", recorded[2]);
    assert_eq!(message["prefix"], "cache-invalidator");
    assert!(
        message["content"]
            .as_str()
            .is_some_and(|c| c.starts_with("invalidate:v1:{")),
        "{message}"
    );
    assert_eq!(
        plans[2]["keys"],
        json!(["author:2:posts", "post:7", "post:7:comment_count"])
    );
    assert_eq!(plans[2]["tags"], json!(["tag:author:1"]));
    assert_eq!(plans[2]["lsn"], recorded[2]["lsn"]);
}
