//! A streaming physical standby of a throwaway [`PgCluster`]: `pg_basebackup
//! -R` (standby.signal and `primary_conninfo` written by the backup), hot
//! standby, its own data directory, port and unix socket directory, a
//! physical replication slot on the primary so WAL is kept while it is
//! stopped. `Drop` stops it (SIGQUIT) and removes its directory.
//!
//! It can be promoted ([`Standby::promote`]) for failover drills; with
//! `sync_replication_slots = on` (PostgreSQL 17+) it keeps copies of the
//! primary's failover slots (`primary_conninfo` carries a dbname for that).
//!
//! Replay can be paused and resumed (`pg_wal_replay_pause()` /
//! `pg_wal_replay_resume()`), which is how tests hold a read replica behind
//! the primary on purpose.

use std::fs;
use std::process::Command;
use std::time::Duration;

use super::common::{free_port, wait_for, ScratchDir, START_TIMEOUT};
use super::pg::{
    as_owner, chown_tree, deref_to_server, pg_bindir, pg_owner, PgCluster, PgOptions, PgServer,
};

/// A hot standby streaming from a [`PgCluster`]; its [`PgServer`] (port,
/// URL, `psql`, stop and restart) through `Deref`.
pub struct Standby {
    server: PgServer,
    slot: String,
}

deref_to_server!(Standby);

impl Standby {
    /// Base-backs up `primary` and starts a hot standby streaming from it.
    pub fn start(primary: &PgCluster) -> Self {
        Self::start_with(primary, PgOptions::default())
    }

    /// Like [`Standby::start`], with extra settings (e.g. `primary_conninfo`
    /// with an `application_name`, `hot_standby_feedback`, slot sync).
    pub fn start_with(primary: &PgCluster, options: PgOptions) -> Self {
        let dir = ScratchDir::new("standby");
        let owner = pg_owner();
        fs::create_dir_all(dir.path().join("socket")).expect("socket dir");
        chown_tree(dir.path(), owner);
        let port = free_port();
        let slot = format!("standby_{port}");
        let data = dir.path().join("data");
        let out = as_owner(
            Command::new(pg_bindir().join("pg_basebackup"))
                .arg("-h")
                .arg(primary.socket_dir())
                .arg("-p")
                .arg(primary.port().to_string())
                .args(["-U", "postgres", "-R", "-X", "stream", "--no-sync", "-C"])
                // -R then writes dbname into primary_conninfo (17+), which
                // slot synchronization (sync_replication_slots) needs.
                .args(["-d", "dbname=postgres"])
                .arg("-S")
                .arg(&slot)
                .arg("-D")
                .arg(&data),
            owner,
        )
        .output()
        .expect("run pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The primary's own pid file and log are not the standby's.
        let _ = fs::remove_file(data.join("postmaster.pid"));
        let mut settings: Vec<(String, String)> = vec![
            ("hot_standby".into(), "on".into()),
            ("wal_receiver_status_interval".into(), "1s".into()),
        ];
        settings.extend(options.settings);
        let server = PgServer::launch_in(
            dir,
            port,
            owner,
            settings,
            ("standby postgres", "psql on the standby"),
        );
        let standby = Standby { server, slot };
        standby.wait_streaming(START_TIMEOUT);
        standby
    }

    /// The physical slot on the primary that keeps WAL for this standby.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// Waits until the WAL receiver streams from the primary.
    pub fn wait_streaming(&self, timeout: Duration) {
        wait_for("the standby to stream from the primary", timeout, || {
            (self.psql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")
                == "1")
                .then_some(())
        });
    }

    /// `pg_last_wal_replay_lsn()` as text.
    pub fn replay_lsn(&self) -> String {
        self.psql("SELECT pg_last_wal_replay_lsn()")
    }

    /// Waits until the standby replayed past `lsn` (a `pg_lsn` literal).
    pub fn wait_replayed(&self, lsn: &str, timeout: Duration) {
        let sql = format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
        wait_for(&format!("the standby to replay {lsn}"), timeout, || {
            (self.psql(&sql) == "t").then_some(())
        });
    }

    /// Pauses WAL replay and waits until it is paused: the standby keeps
    /// receiving WAL but serves the old rows.
    pub fn pause_replay(&self) {
        self.psql("SELECT pg_wal_replay_pause()");
        wait_for("WAL replay to pause", START_TIMEOUT, || {
            (self.psql("SELECT pg_get_wal_replay_pause_state()") == "paused").then_some(())
        });
    }

    /// Resumes WAL replay.
    pub fn resume_replay(&self) {
        self.psql("SELECT pg_wal_replay_resume()");
    }

    /// Promotes it to a primary (`pg_promote()`) and waits until it leaves
    /// recovery: the failover half of a drill.
    pub fn promote(&self) {
        self.psql("SELECT pg_promote(true, 60)");
        wait_for("the standby to leave recovery", START_TIMEOUT, || {
            (self.psql("SELECT pg_is_in_recovery()") == "f").then_some(())
        });
    }
}
