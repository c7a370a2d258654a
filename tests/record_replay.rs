//! Issue 4's end-to-end check: `record` real SQL, `replay` it through the demo
//! mappings, compare with the expected plan; and refreshed values replayed
//! from a recording come out typed as the worker sets them.

mod support;

use serde_json::{json, Value};
use support::{PgCluster, RedisServer, ScratchDir, WorkerConfig};

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
    let mut record = support::spawn_record(
        &pg,
        &file,
        "cache_invalidator",
        &["--max-txns", "3", "--timeout", "60"],
    );
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

/// `record` writes each column's type, so `replay` renders a `refresh`
/// value as the worker does: numbers, booleans, embedded jsonb, null (the
/// golden plan of `tests/fixtures/refresh/`, from a real recording).
#[test]
fn recorded_types_replay_into_typed_refresh_values() {
    let pg = PgCluster::start();
    pg.psql(
        "CREATE TABLE users (id bigint PRIMARY KEY, name text, email text, score numeric,
                             active bool, prefs jsonb);
         CREATE PUBLICATION p FOR TABLE users",
    );
    let dir = ScratchDir::new("rr-types");
    let file = dir.path().join("recorded.jsonl");
    let mut record =
        support::spawn_record(&pg, &file, "p", &["--max-txns", "2", "--timeout", "60"]);
    pg.psql(
        "INSERT INTO users VALUES (123, 'Ann', 'ann@example.com', 1.50, true, '{\"theme\": \"dark\"}')",
    );
    pg.psql("UPDATE users SET name = 'Ann B', score = 'NaN', active = false, prefs = NULL WHERE id = 123");
    assert!(record.wait().unwrap().success(), "record failed");

    let cfg = WorkerConfig::urls(&pg.url(), "redis://127.0.0.1:1/0", "p");
    cfg.mapping(
        "users.toml",
        include_str!("fixtures/refresh/mappings/users.toml"),
    );
    let (code, stdout, stderr) = cfg.command(&["replay", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let plans: Vec<&str> = stdout.lines().collect();
    assert_eq!(plans.len(), 2, "{stdout}");
    let recorded = std::fs::read_to_string(&file).unwrap();
    // The version: the commit LSN, 16 upper-case hex digits, and the change's position.
    let versions: Vec<String> = recorded
        .lines()
        .map(|l| {
            let lsn = serde_json::from_str::<Value>(l).unwrap()["lsn"]
                .as_str()
                .unwrap()
                .to_owned();
            let (hi, lo) = lsn.split_once('/').unwrap();
            let v =
                (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
            format!("{v:016X}.00000000")
        })
        .collect();
    let refresh = |i: usize, key: &str| {
        let plan: Value = serde_json::from_str(plans[i]).unwrap();
        plan["refresh"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["key"] == key))
            .unwrap_or_else(|| panic!("no {key} in {}", plans[i]))["value"]
            .clone()
    };
    assert_eq!(
        refresh(0, "user:123:profile"),
        json!({"_lsn": versions[0], "id": 123, "name": "Ann", "email": "ann@example.com",
               "score": 1.50, "active": true, "prefs": {"theme": "dark"}})
    );
    assert_eq!(
        refresh(1, "user:123:profile"),
        json!({"_lsn": versions[1], "id": 123, "name": "Ann B", "email": "ann@example.com",
               "score": "NaN", "active": false, "prefs": null})
    );
    // The hash card: PostgreSQL's text, as the worker writes hash fields.
    assert_eq!(
        refresh(0, "user:123:card"),
        json!({"_lsn": versions[0], "name": "Ann", "score": "1.50"})
    );
}
