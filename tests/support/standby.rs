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
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use super::common::{free_port, signal, wait_for, wait_or_kill, ScratchDir, START_TIMEOUT};
use super::pg::{
    as_owner, chown_tree, launch_server, pg_bindir, pg_owner, psql_on, PgCluster, PgOptions,
};

/// A hot standby streaming from a [`PgCluster`].
pub struct Standby {
    dir: ScratchDir,
    port: u16,
    owner: Option<(u32, u32)>,
    options: PgOptions,
    slot: String,
    child: Option<Child>,
}

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
        let mut standby = Standby {
            dir,
            port,
            owner,
            options,
            slot,
            child: None,
        };
        standby.launch();
        standby.wait_streaming(START_TIMEOUT);
        standby
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Directory of the standby's unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The physical slot on the primary that keeps WAL for this standby.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// The server log so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// PID of the postmaster, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "standby already running");
        let mut settings: Vec<(String, String)> = vec![
            ("hot_standby".into(), "on".into()),
            ("wal_receiver_status_interval".into(), "1s".into()),
        ];
        settings.extend(self.options.settings.iter().cloned());
        self.child = Some(launch_server(
            self.dir.path(),
            self.port,
            self.owner,
            &settings,
            "standby postgres",
        ));
    }

    /// Waits until the WAL receiver streams from the primary.
    pub fn wait_streaming(&self, timeout: Duration) {
        wait_for("the standby to stream from the primary", timeout, || {
            (self.psql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")
                == "1")
                .then_some(())
        });
    }

    /// Runs SQL on the standby through `psql` (unix socket); unaligned,
    /// tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        psql_on(&self.socket_dir(), self.port, sql, "psql on the standby")
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

    /// Fast shutdown (SIGINT), waiting for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGINT);
            wait_or_kill(&mut child, Duration::from_secs(10));
        }
    }

    /// Starts it again on the same port and data (after [`Standby::stop`]).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.launch();
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGQUIT);
            wait_or_kill(&mut child, Duration::from_secs(5));
        }
    }
}
