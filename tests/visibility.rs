//! Visible before invalidated (guarantee 8) against real servers: a batch is
//! applied only once its transactions are visible on the primary (a commit
//! waiting for a synchronous standby is not) and on every listed read
//! replica (a streaming standby with its replay paused is behind).

mod support;

use std::time::Duration;

use support::standby::Standby;
use support::PgCluster;

const WAIT: Duration = Duration::from_secs(20);

/// The harness's streaming standby: it replays the primary's writes, holds
/// them back while paused and catches up on resume.
#[test]
fn standby_helper_streams_pauses_and_resumes() {
    let pg = PgCluster::start();
    let standby = Standby::start(&pg);
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    pg.psql("CREATE TABLE t (id int PRIMARY KEY, v int)");
    pg.psql("INSERT INTO t VALUES (1, 1)");
    let lsn = pg.psql("SELECT pg_current_wal_lsn()");
    standby.wait_replayed(&lsn, WAIT);
    assert_eq!(standby.psql("SELECT v FROM t WHERE id = 1"), "1");

    standby.pause_replay();
    pg.psql("UPDATE t SET v = 2 WHERE id = 1");
    let lsn = pg.psql("SELECT pg_current_wal_lsn()");
    assert_eq!(
        standby.psql("SELECT v FROM t WHERE id = 1"),
        "1",
        "a paused standby serves the old row"
    );
    standby.resume_replay();
    standby.wait_replayed(&lsn, WAIT);
    assert_eq!(standby.psql("SELECT v FROM t WHERE id = 1"), "2");
}
