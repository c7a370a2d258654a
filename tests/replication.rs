//! The replication source against a real PostgreSQL: connection and
//! authentication, actionable errors, streaming with status updates that
//! report only what was acknowledged, idle advance, reconnect after the
//! walsender is killed, and a stalled consumer that stays connected.

mod support;

use std::time::{Duration, Instant};

use cache_invalidator::ack::AckRule;
use cache_invalidator::decode::relations::RelationCache;
use cache_invalidator::pg::{self, catalog};
use cache_invalidator::shutdown::ShutdownTrigger;
use cache_invalidator::source::{
    self, connect, start_replication, ConnectionSettings, ReplicationConnection, RetryClass,
    SourceError, SourceItem, StreamControl,
};
use cache_invalidator::Lsn;
use support::{PgCluster, PgOptions};
use tokio::sync::{mpsc, watch};

fn settings(url: &str) -> ConnectionSettings {
    ConnectionSettings::parse(url, None).expect("url")
}

/// A running stream with the test in the acknowledger's seat.
struct Streaming {
    rx: mpsc::Receiver<SourceItem>,
    ack: watch::Sender<Lsn>,
    stop: ShutdownTrigger,
    task: tokio::task::JoinHandle<Result<(), SourceError>>,
    backend_pid: i32,
    interval: Duration,
}

async fn start_stream(url: &str, slot: &str, publication: &str, capacity: usize) -> Streaming {
    let mut conn = connect(&settings(url)).await.expect("connect");
    start_replication(&mut conn, slot, publication)
        .await
        .expect("START_REPLICATION");
    let (tx, rx) = mpsc::channel(capacity);
    let (ack, ack_rx) = watch::channel(Lsn::ZERO);
    let (stop, stop_rx) = ShutdownTrigger::new();
    let backend_pid = conn.backend_pid();
    let interval = conn.status_interval();
    let task = source::spawn_stream(
        conn,
        tx,
        StreamControl {
            acked: ack_rx,
            stop: stop_rx,
        },
    );
    Streaming {
        rx,
        ack,
        stop,
        task,
        backend_pid,
        interval,
    }
}

/// The end LSN of a pgoutput Commit message ('C', flags, commit_lsn, end_lsn, time).
fn commit_end(data: &[u8]) -> Option<Lsn> {
    if data.first() != Some(&b'C') || data.len() < 26 {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[10..18]);
    Some(Lsn(u64::from_be_bytes(b)))
}

/// Receives until `n` commits arrived; returns their end LSNs.
async fn commits(rx: &mut mpsc::Receiver<SourceItem>, n: usize) -> Vec<Lsn> {
    let mut ends = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ends.len() < n {
        let item = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("commits in time")
            .expect("stream open");
        if let SourceItem::XLogData { data, .. } = item {
            if let Some(end) = commit_end(&data) {
                ends.push(end);
            }
        }
    }
    ends
}

fn confirmed(pg: &PgCluster, slot: &str) -> Lsn {
    pg.psql(&format!(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
    ))
    .parse()
    .expect("confirmed_flush_lsn")
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn setup_table(pg: &PgCluster, slot: &str) {
    pg.psql("CREATE TABLE t (id bigint PRIMARY KEY, v text); CREATE PUBLICATION p FOR TABLE t");
    pg.psql(&format!(
        "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_tcp_and_unix_socket_and_identifies_the_system() {
    let pg = PgCluster::start();
    for url in [pg.url(), pg.socket_url()] {
        let mut conn = connect(&settings(&url)).await.expect("connect");
        assert!(conn.server_version_num() >= 140_000);
        let id = conn.identify_system().await.expect("IDENTIFY_SYSTEM");
        assert!(!id.system_id.is_empty());
        assert!(id.timeline >= 1);
        assert!(id.xlogpos > Lsn::ZERO);
        assert_eq!(id.dbname.as_deref(), Some("postgres"));
        assert_eq!(
            conn.show("DateStyle".to_lowercase().as_str())
                .await
                .unwrap(),
            "ISO, MDY"
        );
        assert_eq!(conn.show("timezone").await.unwrap(), "UTC");
        assert_eq!(conn.show("bytea_output").await.unwrap(), "hex");
        conn.close().await;
    }
    let sql = pg::connect(&settings(&pg.socket_url())).await.expect("sql");
    assert!(catalog::server_version_num(sql.client()).await.unwrap() >= 140_000);
    assert_eq!(sql.wal_level().await.unwrap(), "logical");
    assert!(!sql.publication_exists("nope").await.unwrap());
    let err = sql.check_publication("nope").await.unwrap_err();
    assert!(
        matches!(
            err,
            pg::PgError::Source {
                source: SourceError::PublicationMissing { .. }
            }
        ),
        "{err}"
    );
    let lsn = sql
        .emit_message(false, "cache-invalidator", "heartbeat")
        .await
        .unwrap();
    assert!(lsn > Lsn::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_names_host_and_port_and_backs_off() {
    let port = support::free_port();
    let err = connect(&settings(&format!(
        "postgres://u:hunter2@127.0.0.1:{port}/d"
    )))
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
    assert_eq!(err.retry_class(), RetryClass::BackOffAndRetry);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_md5_scram_and_cleartext_and_rejects_a_wrong_password() {
    let mut pg = PgCluster::start();
    pg.psql(
        "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN REPLICATION PASSWORD 'md5 pw';
         SET password_encryption = 'scram-sha-256'; CREATE ROLE scramuser LOGIN REPLICATION PASSWORD 'scr''am';
         CREATE ROLE clearuser LOGIN REPLICATION PASSWORD 'clear';",
    );
    pg.set_hba(
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         host all md5user 127.0.0.1/32 md5\n\
         host all scramuser 127.0.0.1/32 scram-sha-256\n\
         host all clearuser 127.0.0.1/32 password\n",
    );
    let port = pg.port();
    for (user, pw) in [
        ("md5user", "md5 pw"),
        ("scramuser", "scr'am"),
        ("clearuser", "clear"),
    ] {
        let url = format!("postgres://{user}@127.0.0.1:{port}/postgres");
        let s = ConnectionSettings::parse(&url, Some(pw.to_string())).unwrap();
        let mut conn = connect(&s).await.unwrap_or_else(|e| panic!("{user}: {e}"));
        conn.identify_system().await.expect("IDENTIFY_SYSTEM");
        pg::connect(&s)
            .await
            .unwrap_or_else(|e| panic!("sql {user}: {e}"));
    }
    let url = format!("postgres://scramuser:wrong-secret@127.0.0.1:{port}/postgres");
    let err = connect(&settings(&url)).await.unwrap_err();
    let msg = format!("{err} {err:?}");
    assert!(
        msg.contains("password authentication failed for user \"scramuser\""),
        "{msg}"
    );
    assert!(!msg.contains("wrong-secret"), "{msg}");
    assert_eq!(err.retry_class(), RetryClass::Fatal);
    let err = connect(&settings(&format!(
        "postgres://md5user@127.0.0.1:{port}/postgres"
    )))
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::PasswordRequired { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_without_replication_is_told_to_alter_role() {
    let pg = PgCluster::start();
    pg.psql("CREATE ROLE app LOGIN");
    let url = format!("postgres://app@127.0.0.1:{}/postgres", pg.port());
    let err = connect(&settings(&url)).await.unwrap_err();
    assert!(
        matches!(err, SourceError::NotReplicationRole { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("ALTER ROLE \"app\" REPLICATION"),
        "{err}"
    );
    assert_eq!(err.retry_class(), RetryClass::Fatal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_refused_with_the_fix() {
    let pg = PgCluster::start_with(PgOptions::default().set("wal_level", "replica"));
    let err = connect(&settings(&pg.url())).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("set `wal_level = logical` in postgresql.conf or `ALTER SYSTEM SET wal_level = logical`, then restart PostgreSQL"),
        "{msg}"
    );
    assert_eq!(err.retry_class(), RetryClass::Fatal);
}

/// Creates a permanent slot over the replication protocol. The product
/// creates slots over SQL (`setup`); here the replication connection's
/// classification of the server's refusal is under test.
async fn create_slot(conn: &mut ReplicationConnection, slot: &str) -> Result<(), SourceError> {
    let cmd = format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput NOEXPORT_SNAPSHOT");
    conn.simple_query(&cmd, Some(slot), None).await.map(|_| ())
}

/// A command abandoned mid-way (its future dropped, as a timeout does) leaves
/// the replication connection unusable: the next command fails at once with
/// `Poisoned`, which reconnects, instead of reading the abandoned command's
/// answer as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_command_leaves_the_connection_unusable() {
    let pg = PgCluster::start();
    let mut conn = connect(&settings(&pg.url())).await.unwrap();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        conn.simple_query("SELECT pg_sleep(3)", None, None),
    )
    .await;
    assert!(abandoned.is_err(), "pg_sleep(3) answered within 300 ms");
    let err = conn.identify_system().await.unwrap_err();
    assert!(matches!(err, SourceError::Poisoned { .. }), "{err:?}");
    assert_eq!(err.retry_class(), RetryClass::Reconnect);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_errors_missing_in_use_and_no_free_slots() {
    let pg = PgCluster::start_with(PgOptions::default().set("max_replication_slots", "2"));
    setup_table(&pg, "s1");
    // Slot missing.
    let mut conn = connect(&settings(&pg.url())).await.unwrap();
    let err = start_replication(&mut conn, "nope", "p").await.unwrap_err();
    assert!(matches!(err, SourceError::SlotMissing { .. }), "{err:?}");
    // Active for another PID: a standby's wait.
    let s = start_stream(&pg.url(), "s1", "p", 16).await;
    let mut conn = connect(&settings(&pg.url())).await.unwrap();
    let err = start_replication(&mut conn, "s1", "p").await.unwrap_err();
    assert!(
        matches!(err, SourceError::SlotActive { pid, .. } if i32::try_from(pid).unwrap() == s.backend_pid),
        "{err:?}"
    );
    assert_eq!(err.retry_class(), RetryClass::BackOffAndRetry);
    // No free slots.
    let sql = pg::connect(&settings(&pg.url())).await.unwrap();
    let mut conn = connect(&settings(&pg.url())).await.unwrap();
    create_slot(&mut conn, "s2").await.expect("second slot");
    let err = create_slot(&mut conn, "s3").await.unwrap_err();
    assert!(matches!(err, SourceError::NoFreeSlots { .. }), "{err:?}");
    assert!(err.to_string().contains("max_replication_slots"), "{err}");
    let info = catalog::slot(sql.client(), "s2")
        .await
        .unwrap()
        .expect("s2");
    assert!(info.confirmed_flush_lsn.is_some() && info.wal_status.as_deref() != Some("lost"));
    assert_eq!(catalog::slot(sql.client(), "s3").await.unwrap(), None);
}

/// `catalog::slot` measures a slot's distances from a WAL position read no
/// earlier than the slot: while the slot follows the newest WAL (a second
/// connection writing and advancing it), a distance is never negative.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_distances_are_never_negative_while_the_slot_moves() {
    let pg = PgCluster::start();
    pg.psql("CREATE TABLE w (x int); SELECT pg_create_physical_replication_slot('moving', true)");
    let mover = pg::connect(&settings(&pg.url())).await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let moving = tokio::spawn(async move {
        while !*stopped.borrow() {
            mover
                .client()
                .batch_execute(
                    "INSERT INTO w VALUES (1); \
                     SELECT pg_replication_slot_advance('moving', pg_current_wal_flush_lsn())",
                )
                .await
                .expect("write and advance the slot");
        }
    });
    let sql = pg::connect(&settings(&pg.url())).await.unwrap();
    let mut negative = Vec::new();
    for _ in 0..300 {
        let slot = catalog::slot(sql.client(), "moving")
            .await
            .unwrap()
            .expect("the slot");
        let retained = slot
            .retained_wal_bytes
            .expect("a physical slot with WAL reserved");
        if retained < 0 {
            negative.push((retained, slot.restart_lsn, slot.current_lsn));
        }
    }
    stop.send(true).unwrap();
    moving.await.unwrap();
    assert!(
        negative.is_empty(),
        "{} of 300 reads: {:?}",
        negative.len(),
        &negative[..negative.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_updates_confirm_only_what_was_acknowledged() {
    let pg = PgCluster::start_with(PgOptions::default().set("wal_sender_timeout", "3s"));
    setup_table(&pg, "s");
    let mut s = start_stream(&pg.socket_url(), "s", "p", 64).await;
    assert_eq!(s.interval, Duration::from_secs(1));
    let before = confirmed(&pg, "s");
    for i in 1..=3 {
        pg.psql(&format!("INSERT INTO t VALUES ({i}, 'v{i}')"));
    }
    let ends = commits(&mut s.rx, 3).await;
    assert!(ends[0] < ends[1] && ends[1] < ends[2]);
    s.ack.send(ends[0]).unwrap();
    wait_until("confirmed = first commit", 3 * s.interval, || {
        confirmed(&pg, "s") == ends[0]
    })
    .await;
    // Nothing beyond what was acknowledged, over a few more intervals.
    tokio::time::sleep(2 * s.interval).await;
    assert_eq!(confirmed(&pg, "s"), ends[0]);
    assert!(before < ends[0]);
    s.ack.send(ends[2]).unwrap();
    wait_until("confirmed = third commit", 3 * s.interval, || {
        confirmed(&pg, "s") == ends[2]
    })
    .await;
    // Going backwards is ignored: the reported LSN only moves forward.
    s.ack.send(ends[1]).unwrap();
    tokio::time::sleep(2 * s.interval).await;
    assert_eq!(confirmed(&pg, "s"), ends[2]);
    // Graceful stop: stop reading, final update once the acknowledger is gone.
    s.stop.trigger();
    drop(s.ack);
    s.task.await.unwrap().expect("clean end");
    wait_until("slot released", Duration::from_secs(5), || {
        pg.psql("SELECT active FROM pg_replication_slots WHERE slot_name = 's'") == "f"
    })
    .await;
    assert_eq!(confirmed(&pg, "s"), ends[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_advance_follows_keepalives_while_unpublished_tables_write() {
    let pg = PgCluster::start_with(PgOptions::default().set("wal_sender_timeout", "3s"));
    setup_table(&pg, "s");
    pg.psql("CREATE TABLE unpublished (id int, pad text)");
    let mut s = start_stream(&pg.url(), "s", "p", 64).await;
    let ack = s.ack.clone();
    // The worker's own acknowledgement rule (ack::AckRule), each item
    // "applied" as soon as it is read: with no transaction open, a
    // keepalive's wal_end is acknowledged; a Commit's end LSN once applied.
    let acker = tokio::spawn(async move {
        let mut rule = AckRule::new();
        let mut relations = RelationCache::new();
        let mut events = Vec::new();
        while let Some(item) = s.rx.recv().await {
            match item {
                SourceItem::XLogData {
                    wal_start, data, ..
                } => {
                    events.clear();
                    relations
                        .decode_shared(&data, wal_start, &mut events)
                        .expect("pgoutput decodes");
                    for event in events.drain(..) {
                        rule.event(&event);
                    }
                }
                SourceItem::Keepalive { wal_end } => rule.keepalive(wal_end),
                SourceItem::PublicationSkipped { publication } => {
                    panic!("publication {publication} was skipped")
                }
            }
            if let Some(lsn) = rule.take() {
                ack.send_modify(|a| *a = (*a).max(lsn));
            }
        }
    });
    for _ in 0..5 {
        pg.psql(
            "INSERT INTO unpublished SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g",
        );
    }
    let current: Lsn = pg.psql("SELECT pg_current_wal_lsn()").parse().unwrap();
    let start = Instant::now();
    wait_until(
        "confirmed_flush_lsn within 1 MB of the WAL position written",
        2 * s.interval + Duration::from_millis(500),
        || confirmed(&pg, "s").0 + (1 << 20) >= current.0,
    )
    .await;
    eprintln!("idle advance took {:?}", start.elapsed());
    acker.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_walsender_is_reconnect_and_the_slot_redelivers_unacknowledged() {
    let pg = PgCluster::start_with(PgOptions::default().set("wal_sender_timeout", "3s"));
    setup_table(&pg, "s");
    let mut s = start_stream(&pg.url(), "s", "p", 64).await;
    pg.psql("INSERT INTO t VALUES (1, 'a')");
    pg.psql("INSERT INTO t VALUES (2, 'b')");
    let ends = commits(&mut s.rx, 2).await;
    s.ack.send(ends[0]).unwrap();
    wait_until("first commit confirmed", 3 * s.interval, || {
        confirmed(&pg, "s") == ends[0]
    })
    .await;
    pg.psql(&format!("SELECT pg_terminate_backend({})", s.backend_pid));
    let err = tokio::time::timeout(Duration::from_secs(10), s.task)
        .await
        .expect("task ends")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.retry_class(), RetryClass::Reconnect, "{err:?}");
    // Reconnect: the slot redelivers the unacknowledged transaction, and only it.
    wait_until("slot released", Duration::from_secs(5), || {
        pg.psql("SELECT active FROM pg_replication_slots WHERE slot_name = 's'") == "f"
    })
    .await;
    let mut s = start_stream(&pg.url(), "s", "p", 64).await;
    let again = commits(&mut s.rx, 1).await;
    assert_eq!(again[0], ends[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_consumer_keeps_the_connection_alive_past_wal_sender_timeout() {
    let pg = PgCluster::start_with(PgOptions::default().set("wal_sender_timeout", "2s"));
    setup_table(&pg, "s");
    let mut s = start_stream(&pg.url(), "s", "p", 1).await;
    pg.psql("INSERT INTO t SELECT g, repeat('y', 100) FROM generate_series(1, 30000) g");
    // The consumer stalls for more than twice wal_sender_timeout, channel full.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!s.task.is_finished(), "stream ended while stalled");
    let ends = commits(&mut s.rx, 1).await;
    assert!(ends[0] > Lsn::ZERO);
    let pid = pg.psql("SELECT pid FROM pg_stat_replication");
    assert_eq!(pid, s.backend_pid.to_string());
    assert!(!s.task.is_finished());
}

/// A walsender that stops answering (SIGSTOP: the TCP connection stays up,
/// nothing arrives) is given up after twice wal_sender_timeout, with a
/// `Reconnect` error that says so, instead of after TCP's retransmission
/// timeout; a stalled consumer (previous test) is not mistaken for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_walsender_is_given_up_after_twice_wal_sender_timeout() {
    let pg = PgCluster::start_with(PgOptions::default().set("wal_sender_timeout", "2s"));
    setup_table(&pg, "s");
    let mut s = start_stream(&pg.url(), "s", "p", 64).await;
    pg.psql("INSERT INTO t VALUES (1, 'a')");
    let ends = commits(&mut s.rx, 1).await;
    s.ack.send(ends[0]).unwrap();
    // Healthy and idle: the stream stays up well past the limit (4 s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!s.task.is_finished(), "an idle, healthy stream ended");
    let pid = s.backend_pid.to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(20), &mut s.task).await;
    signal("-CONT");
    let err = ended
        .expect("the stream gives a silent server up")
        .unwrap()
        .unwrap_err();
    assert_eq!(err.retry_class(), RetryClass::Reconnect, "{err}");
    assert!(
        err.to_string().contains("no message from the server"),
        "{err}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "gave up after {took:?}, before the limit"
    );
    eprintln!("silent walsender given up after {took:?}: {err}");
}
