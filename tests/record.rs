//! `record` end to end against a real PostgreSQL: the JSON-lines format of
//! issue 3, types rendered under the pinned session settings, replica
//! identities, TOAST, rollbacks and savepoints, schema changes mid-stream,
//! partitions published via their root, and flat memory on a huge transaction.

mod support;

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{binary, wait_for, PgCluster, ScratchDir};

fn spawn_record(pg: &PgCluster, out: &Path, extra: &[&str]) -> Child {
    support::spawn_record(pg, out, "p", extra)
}

/// The complete lines written so far (a line being written is skipped).
fn lines(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let complete = text.rfind('\n').map(|i| &text[..=i]).unwrap_or("");
    complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn stop(mut child: Child) {
    // SIGINT: a graceful stop.
    unsafe {
        libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGINT);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "record exited with {status}");
}

#[test]
fn records_committed_transactions_in_the_documented_format() {
    let pg = PgCluster::start();
    pg.psql(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE TABLE types (id bigint PRIMARY KEY, u uuid, t text, n numeric(10,3), b bool,
                             ts timestamptz, j jsonb, a int[], by bytea, m mood, nul text);
         CREATE TABLE users (id bigint PRIMARY KEY, team_id int, name text);
         CREATE TABLE fulls (id bigint PRIMARY KEY, team_id int, name text);
         ALTER TABLE fulls REPLICA IDENTITY FULL;
         CREATE TABLE docs (id int PRIMARY KEY, big text, other int);
         CREATE TABLE alt (id int PRIMARY KEY);
         CREATE TABLE parted (id int, k text) PARTITION BY RANGE (id);
         CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100);
         CREATE TABLE marker (id int PRIMARY KEY);
         INSERT INTO users VALUES (1, 5, 'Ann'), (2, 5, 'Bob');
         INSERT INTO fulls VALUES (1, 5, 'Ann');
         CREATE PUBLICATION p FOR TABLE types, users, fulls, docs, alt, parted, marker
             WITH (publish_via_partition_root = true);",
    );
    let dir = ScratchDir::new("record");
    let out = dir.path().join("out.jsonl");
    let child = spawn_record(&pg, &out, &["--timeout", "60"]);

    pg.psql(
        "INSERT INTO types VALUES (9007199254740993, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
             E'it''s \"q\"\\n☃', 1.5, true, '2026-11-25 21:00:00.123456+01', '{\"a\": [1, 2]}',
             '{1,2,3}', '\\xdeadbeef', 'happy', NULL)",
    );
    pg.psql("UPDATE users SET team_id = 6 WHERE id = 1");
    pg.psql("UPDATE fulls SET team_id = 6 WHERE id = 1");
    pg.psql("DELETE FROM users WHERE id = 2");
    pg.psql(
        "INSERT INTO docs SELECT 1, string_agg(md5(g::text), '') FROM generate_series(1, 5000) g",
    );
    pg.psql("UPDATE docs SET other = 7 WHERE id = 1");
    pg.psql("BEGIN; INSERT INTO alt VALUES (99); ROLLBACK");
    pg.psql("BEGIN; INSERT INTO alt VALUES (10); SAVEPOINT s; INSERT INTO alt VALUES (11); ROLLBACK TO s; INSERT INTO alt VALUES (12); COMMIT");
    pg.psql("ALTER TABLE alt ADD COLUMN extra text");
    pg.psql("INSERT INTO alt VALUES (13, 'x')");
    pg.psql("ALTER TABLE alt DROP COLUMN extra");
    pg.psql("INSERT INTO alt VALUES (14)");
    pg.psql("INSERT INTO parted VALUES (5, 'k')");
    pg.psql("TRUNCATE users");
    pg.psql("INSERT INTO marker VALUES (1)");

    wait_for("the marker transaction", Duration::from_secs(60), || {
        lines(&out)
            .iter()
            .any(|l| l["changes"][0]["table"] == "public.marker")
            .then_some(())
    });
    stop(child);

    let txns: Vec<Value> = lines(&out)
        .into_iter()
        .filter(|t| t["changes"].as_array().is_some_and(|c| !c.is_empty()))
        .collect();
    let changes: Vec<&Value> = txns.iter().map(|t| &t["changes"]).collect();
    let expected = [
        // `types`: the columns a refresh value renders other than as text.
        json!([{"table":"public.types","op":"insert",
                "types":{"id":"int8","n":"numeric","b":"bool","j":"jsonb"},"new":{
            "id":"9007199254740993","u":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11","t":"it's \"q\"\n☃",
            "n":"1.500","b":"t","ts":"2026-11-25 20:00:00.123456+00","j":"{\"a\": [1, 2]}",
            "a":"{1,2,3}","by":"\\xdeadbeef","m":"happy","nul":null}}]),
        json!([{"table":"public.users","op":"update","types":{"id":"int8","team_id":"int4"},
                "new":{"id":"1","team_id":"6","name":"Ann"}}]),
        json!([{"table":"public.fulls","op":"update","types":{"id":"int8","team_id":"int4"},
                "old":{"id":"1","team_id":"5","name":"Ann"},"new":{"id":"1","team_id":"6","name":"Ann"}}]),
        json!([{"table":"public.users","op":"delete","types":{"id":"int8"},"old":{"id":"2"}}]),
    ];
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(changes[i], e, "transaction {i}");
    }
    // TOAST: the insert carries the big value, the update leaves it unchanged (unknown).
    assert_eq!(
        changes[4][0]["new"]["big"].as_str().map(str::len),
        Some(5000 * 32)
    );
    assert_eq!(
        changes[5],
        &json!([{"table":"public.docs","op":"update","types":{"id":"int4","other":"int4"},
                 "new":{"id":"1","other":"7"}}])
    );
    // Rollback yields nothing; a rolled-back savepoint drops only its rows.
    assert_eq!(
        changes[6],
        &json!([{"table":"public.alt","op":"insert","types":{"id":"int4"},"new":{"id":"10"}},
                {"table":"public.alt","op":"insert","types":{"id":"int4"},"new":{"id":"12"}}])
    );
    assert_eq!(
        changes[7],
        &json!([{"table":"public.alt","op":"insert","types":{"id":"int4"},"new":{"id":"13","extra":"x"}}])
    );
    assert_eq!(
        changes[8],
        &json!([{"table":"public.alt","op":"insert","types":{"id":"int4"},"new":{"id":"14"}}])
    );
    assert_eq!(
        changes[9],
        &json!([{"table":"public.parted","op":"insert","types":{"id":"int4"},"new":{"id":"5","k":"k"}}])
    );
    assert_eq!(
        changes[10],
        &json!([{"table":"public.users","op":"truncate"}])
    );
    assert_eq!(changes[11][0]["table"], "public.marker");
    assert_eq!(txns.len(), 12);
    // lsn = commit end LSN, increasing; commit_time in UTC with microseconds; xid a number.
    let mut prev = 0u64;
    for t in &txns {
        let lsn = t["lsn"].as_str().unwrap();
        let (hi, lo) = lsn.split_once('/').unwrap();
        let v = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
        assert!(v > prev, "{lsn}");
        prev = v;
        let ct = t["commit_time"].as_str().unwrap();
        assert!(ct.ends_with('Z') && ct.len() == 27, "{ct}");
        assert!(t["xid"].as_u64().unwrap() > 0);
    }
    // Everything recorded was acknowledged; the temporary slot is gone.
    wait_for("temporary slot dropped", Duration::from_secs(10), || {
        (pg.psql("SELECT count(*) FROM pg_replication_slots") == "0").then_some(())
    });
}

#[test]
fn max_txns_stops_recording_and_a_missing_publication_is_refused() {
    let pg = PgCluster::start();
    let dir = ScratchDir::new("record");
    let out = dir.path().join("out.jsonl");
    let status = Command::new(binary())
        .args(["record", "--publication", "nope", "--timeout", "5", "--out"])
        .arg(&out)
        .env("CACHE_INVALIDATOR_POSTGRES_URL", pg.url())
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert!(
        stderr.contains("publication \"nope\" does not exist"),
        "{stderr}"
    );

    pg.psql("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t");
    let mut child = spawn_record(&pg, &out, &["--max-txns", "2", "--timeout", "30"]);
    for i in 0..3 {
        pg.psql(&format!("INSERT INTO t VALUES ({i})"));
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    assert_eq!(lines(&out).len(), 2);
}

fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn a_million_row_transaction_streams_through_in_flat_memory() {
    let pg = PgCluster::start_with(support::PgOptions::default().set("max_wal_size", "1GB"));
    pg.psql("CREATE TABLE big (id int, pad text); CREATE PUBLICATION p FOR TABLE big");
    let mut child = spawn_record(
        &pg,
        Path::new("/dev/null"),
        &["--max-txns", "1", "--timeout", "120"],
    );
    let pid = child.id();
    pg.psql("INSERT INTO big SELECT g, 'row ' || g FROM generate_series(1, 1000000) g");
    let started = Instant::now();
    let mut peak = 0;
    loop {
        if let Some(kb) = vm_hwm_kb(pid) {
            peak = peak.max(kb);
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "record too slow"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "1M rows recorded in {:?}, peak RSS {} kB",
        started.elapsed(),
        peak
    );
    assert!(peak > 0 && peak < 64 * 1024, "peak RSS {peak} kB");
}
