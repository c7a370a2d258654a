//! What differs between PostgreSQL versions, against the real server of the
//! run (`scripts/test` runs this file on 15 and on 18): generated columns,
//! which pgoutput sends only from 18 on and only when the publication says
//! `publish_generated_columns = stored`.

mod support;

use std::time::Duration;

use support::{pg_major, PgCluster, RedisProbe, RedisServer, WorkerConfig, SYNC_PROBE_MAPPING};

const WAIT: Duration = Duration::from_secs(60);
const MAPPING: &str = "[[table]]\nname = \"gen\"\nkeys = [\"gen:{g}\"]\non = [\"insert\"]\n";

#[test]
fn generated_columns_are_checked_and_streamed_as_the_server_publishes_them() {
    let pg = PgCluster::start();
    let redis = RedisServer::start();
    pg.psql(&format!(
        "CREATE TABLE gen (id int PRIMARY KEY, a int NOT NULL, g int GENERATED ALWAYS AS (a * 2) STORED); {}",
        support::SYNC_PROBE_TABLE
    ));
    let config = WorkerConfig::new(
        &pg,
        &redis,
        &[("gen.toml", MAPPING), ("zz_sync.toml", SYNC_PROBE_MAPPING)],
        "",
    );
    pg.psql(
        "CREATE PUBLICATION cache_invalidator FOR TABLE gen, sync_probe \
         WITH (publish_via_partition_root = true)",
    );
    let (code, out, err) = config.command(&["check"]);
    assert_ne!(
        code, 0,
        "check passed a generated column pgoutput does not send:\n{out}\n{err}"
    );
    if pg_major() < 18 {
        assert!(
            err.contains("column `g` of public.gen is generated: generated columns are not published before PostgreSQL 18"),
            "{err}"
        );
        return;
    }
    assert!(
        err.contains("column `g` of public.gen is generated")
            && err.contains("publish_generated_columns = stored"),
        "{err}"
    );

    // 18 publishes it when asked: check passes, and the worker renders the
    // key from the value pgoutput sends.
    pg.psql("ALTER PUBLICATION cache_invalidator SET (publish_generated_columns = stored)");
    let (code, out, err) = config.command(&["setup"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = config.command(&["check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    let _worker = config.spawn_worker();
    support::sync_worker(&pg, &redis, WAIT);
    let mut probe = RedisProbe::new(&redis);
    probe.set("gen:42", "cached");
    pg.psql("INSERT INTO gen (id, a) VALUES (1, 21)");
    probe.wait_gone("gen:42", WAIT);
}
