//! The replication stream as a task: reads CopyBoth frames and forwards them
//! in stream order into a bounded channel, and reports the acknowledged LSN to
//! PostgreSQL with standby status updates.
//!
//! ```text
//!  walsender ──CopyData('w'/'k')──▶ [stream task] ──SourceItem──▶ mpsc (bounded) ──▶ decoder …
//!      ▲                                 │  ▲
//!      └──── status update ('r') ────────┘  └── watch<Lsn> from the acknowledger
//! ```
//!
//! * Backpressure: the socket is read only while the task holds a permit of
//!   the channel, so a slow consumer stops the reads (and the walsender
//!   blocks on its send buffer) instead of growing memory.
//! * Status updates go out from a timer every `status_interval` (min(10 s,
//!   wal_sender_timeout / 3)) and at once when a keepalive asks for a reply,
//!   whether or not the channel has room: a stalled consumer never makes
//!   PostgreSQL time us out.
//! * The LSN reported as written = flushed = applied is the highest the
//!   acknowledger's `watch` has shown: it only moves forward.
//! * Liveness: the timer's status updates ask the server to reply at once, so
//!   a healthy walsender is never silent for long. While the task reads (it
//!   holds a permit), hearing nothing for twice `wal_sender_timeout` ends the
//!   stream with a `Reconnect` error: a black-holed network or a stuck server
//!   is noticed in minutes, not after TCP's retransmission timeout (~15 min).
//! * Idle advance is the consumer's job: keepalives are forwarded in order as
//!   [`SourceItem::Keepalive`]; when nothing is pending, the acknowledger
//!   advances to the keepalive's `wal_end` and this task reports it. The task
//!   never acknowledges anything on its own.
//! * Shutdown: after the stop signal the task stops reading the socket but keeps
//!   sending status updates until the acknowledger drops its `watch::Sender`
//!   (the pipeline drained); then it sends a final status update with the last
//!   acknowledged LSN, CopyDone, waits briefly for the server's end of the
//!   stream, and returns.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::connection::{silence_limit, ReplicationConnection, READ_CHUNK};
use super::copyboth::{self, ServerCopyMessage};
use super::error::{ServerError, SourceError};
use super::frame::{self, Frame};
use crate::decode::Timestamp;
use crate::lsn::Lsn;

/// Minimum spacing of status updates sent because the acknowledged LSN moved,
/// while the stream is busy: at most 100 small messages a second under load.
const ACK_REPORT_INTERVAL: Duration = Duration::from_millis(10);

/// The same once the acknowledgement caught up with everything received so
/// far (the end of a burst, or a quiet stream): reported almost at once, so
/// the slot (and `pg_replication_slots`) shows it without waiting a busy
/// interval. At most 1,000 small messages a second.
const CAUGHT_UP_REPORT_INTERVAL: Duration = Duration::from_millis(1);

/// How long to wait for the server's end of the stream after our CopyDone.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// What the stream hands downstream, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceItem {
    /// One pgoutput message.
    XLogData {
        /// WAL position of the message.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The pgoutput message bytes.
        data: Bytes,
    },
    /// A keepalive: everything before `wal_end` has been sent. With nothing
    /// pending, the acknowledger may acknowledge `wal_end` (idle advance).
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
    },
    /// PostgreSQL 18+ decoded a change while the publication did not exist
    /// (dropped, not yet recreated) and skipped it: the walsender's WARNING
    /// "skipped loading publication", in stream order after everything
    /// decoded before that change. The changes of that window are never
    /// sent, so every mapped table must be flushed here. The walsender warns
    /// once, at the window's first change: later ones while the publication
    /// is still missing are skipped silently, and the publication watch's
    /// flush:all covers them (docs/failure-modes.md). Durable without us:
    /// until a later position is acknowledged, a restart decodes the window
    /// again and the walsender warns again. (Before 18 the walsender fails
    /// with "publication does not exist" instead.)
    PublicationSkipped {
        /// The publication the walsender skipped.
        publication: String,
    },
}

/// The task's inputs besides the connection.
#[derive(Debug)]
pub struct StreamControl {
    /// The acknowledger's "applied up to" LSN. Dropping its sender means the
    /// pipeline drained: the task sends a final status update and ends.
    /// A `watch` keeps only its latest value, so the acknowledger must publish
    /// monotonically; the task's `max` is a guard against regressions, not a merge.
    pub acked: watch::Receiver<Lsn>,
    /// Shutdown: stop reading, keep reporting until the pipeline drained.
    pub stop: crate::shutdown::Shutdown,
}

/// Spawns the stream task on a connection in CopyBoth mode (after
/// [`super::slot::start_replication`]). Ends with `Ok(())` after a clean
/// shutdown, or with the error that broke the stream (see
/// [`SourceError::retry_class`]: a dropped connection is `Reconnect`).
pub fn spawn_stream(
    conn: ReplicationConnection,
    items: mpsc::Sender<SourceItem>,
    control: StreamControl,
) -> JoinHandle<Result<(), SourceError>> {
    tokio::spawn(run_stream(conn, items, control))
}

/// The stream task's body (see [`spawn_stream`]).
pub async fn run_stream(
    mut conn: ReplicationConnection,
    items: mpsc::Sender<SourceItem>,
    control: StreamControl,
) -> Result<(), SourceError> {
    let StreamControl {
        acked: mut ack_rx,
        mut stop,
    } = control;
    let interval = conn.status_interval();
    let silence = silence_limit(conn.wal_sender_timeout());
    // Last time the socket gave us bytes, or reading resumed after backpressure.
    let mut last_heard = tokio::time::Instant::now();
    let mut was_reading = false;
    let mut acked = *ack_rx.borrow_and_update();
    let mut stopping = stop.is_requested();
    let mut permit: Option<mpsc::Permit<'_, SourceItem>> = None;
    let mut timer = tokio::time::interval(interval);
    // Acknowledgements are reported promptly (so the slot releases WAL and lag
    // reads true), at most once per ACK_REPORT_INTERVAL while busy and per
    // CAUGHT_UP_REPORT_INTERVAL once caught up; the timer covers the rest.
    let mut last = LastReport {
        acked,
        at: tokio::time::Instant::now(),
    };
    // The highest position a message handed downstream carried: the
    // keepalive's end of WAL, or an XLogData's position (a logical walsender
    // puts the change's LSN in its wal_end field).
    let mut server_end = Lsn::ZERO;
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::debug!(url = %conn.url(), status_interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX), "streaming");

    loop {
        // Hand over every complete frame already buffered, one per permit.
        while !stopping {
            if permit.is_none() {
                match items.try_reserve() {
                    Ok(p) => permit = Some(p),
                    Err(mpsc::error::TrySendError::Full(())) => break,
                    Err(mpsc::error::TrySendError::Closed(())) => {
                        stopping = true;
                        break;
                    }
                }
            }
            let f = match frame::split_frame(&mut conn.read_buf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(conn.protocol("replication stream", e.to_string())),
            };
            if let Some(item) = handle_frame(&mut conn, f, acked).await? {
                let (is_reply, item) = item;
                if let SourceItem::XLogData { wal_end, .. } | SourceItem::Keepalive { wal_end } =
                    &item
                {
                    server_end = server_end.max(*wal_end);
                }
                if let Some(p) = permit.take() {
                    p.send(item);
                }
                if is_reply {
                    last.send(&mut conn, acked, false).await?;
                }
            }
        }
        if permit.is_some() && conn.read_buf.capacity() - conn.read_buf.len() < READ_CHUNK / 4 {
            conn.read_buf.reserve(READ_CHUNK);
        }

        let reading = permit.is_some() && !stopping;
        if reading && !was_reading {
            // Unread data may have waited while we were full: silence counts from now.
            last_heard = tokio::time::Instant::now();
        }
        was_reading = reading;
        let want_room = permit.is_none() && !stopping;
        let ReplicationConnection { io, read_buf, .. } = &mut conn;
        tokio::select! {
            biased;
            // 1. Shutdown: stop reading; keep reporting until the pipeline drained.
            () = stop.requested(), if !stopping => {
                tracing::debug!(acked = %acked, "stream: stop reading");
                stopping = true;
                permit = None;
            }
            // 2. Acknowledgements: the reported LSN only moves forward.
            r = ack_rx.changed() => {
                match r {
                    Ok(()) => {
                        acked = acked.max(*ack_rx.borrow_and_update());
                        if acked > last.acked && last.at.elapsed() >= report_interval(acked, server_end) {
                            last.send(&mut conn, acked, false).await?;
                        }
                    }
                    Err(_) => {
                        acked = acked.max(*ack_rx.borrow());
                        drop(permit);
                        return finish(conn, acked).await;
                    }
                }
            }
            // 3. Status timer, whatever the consumer is doing; asks for a reply,
            //    and gives the server up when it stayed silent past the limit
            //    while we read (checked here, not by a timer per read: the
            //    read path is the hot path).
            _ = timer.tick() => {
                if let Some(limit) = silence.filter(|l| reading && last_heard.elapsed() >= *l) {
                    return Err(silent(&conn, acked, last_heard.elapsed(), limit, interval));
                }
                last.send(&mut conn, acked, true).await?;
            }
            // 3b. An acknowledgement held back by the rate limit.
            _ = tokio::time::sleep_until(last.at + report_interval(acked, server_end)), if acked > last.acked => {
                last.send(&mut conn, acked, false).await?;
            }
            // 4. The socket, only while the channel has room (we hold a permit).
            r = io.read_buf(read_buf), if reading => {
                match r {
                    Ok(0) => return Err(lost(&conn, acked, None)),
                    Ok(_) => last_heard = tokio::time::Instant::now(),
                    Err(e) => return Err(lost(&conn, acked, Some(e))),
                }
            }
            // 5. Wait for room in the channel.
            p = items.reserve(), if want_room => {
                match p {
                    Ok(p) => permit = Some(p),
                    Err(_) => {
                        tracing::debug!("stream: consumer gone, stop reading");
                        stopping = true;
                    }
                }
            }
        }
    }
}

/// How long after the last status update an acknowledgement may be reported.
fn report_interval(acked: Lsn, server_end: Lsn) -> Duration {
    if acked >= server_end {
        CAUGHT_UP_REPORT_INTERVAL
    } else {
        ACK_REPORT_INTERVAL
    }
}

/// The server said nothing for `quiet` (past `limit`) although every status
/// update asked it to.
fn silent(
    conn: &ReplicationConnection,
    acked: Lsn,
    quiet: Duration,
    limit: Duration,
    interval: Duration,
) -> SourceError {
    SourceError::ConnectionLost {
        during: format!(
            "streaming: no message from the server for {} s (the limit is twice wal_sender_timeout, {} s) although each status update, every {} ms, asked for a reply: the network or the server is stuck",
            quiet.as_secs(),
            limit.as_secs(),
            interval.as_millis(),
        ),
        url: conn.url().to_string(),
        lsn: Some(acked),
        source: None,
    }
}

fn lost(conn: &ReplicationConnection, acked: Lsn, source: Option<std::io::Error>) -> SourceError {
    SourceError::ConnectionLost {
        during: "streaming".into(),
        url: conn.url().to_string(),
        lsn: Some(acked),
        source,
    }
}

/// Turns one frame into an item to forward (and whether a reply is due now).
async fn handle_frame(
    conn: &mut ReplicationConnection,
    f: Frame,
    acked: Lsn,
) -> Result<Option<(bool, SourceItem)>, SourceError> {
    match f.tag {
        frame::COPY_DATA => match copyboth::parse_server_message(f.into_body()) {
            Ok(ServerCopyMessage::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            }) => Ok(Some((
                false,
                SourceItem::XLogData {
                    wal_start,
                    wal_end,
                    data,
                },
            ))),
            Ok(ServerCopyMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            }) => Ok(Some((reply_requested, SourceItem::Keepalive { wal_end }))),
            Err(e) => Err(conn.protocol("replication stream", e.to_string())),
        },
        frame::ERROR_RESPONSE => {
            let server = ServerError::parse(f.body());
            Err(match server {
                Some(server) => {
                    let err = conn.server_error(server, "streaming", None, None);
                    match err {
                        SourceError::Server { server, .. }
                            if super::error::class_of_sqlstate(&server.code)
                                == super::error::RetryClass::Reconnect =>
                        {
                            SourceError::ConnectionLost {
                                during: format!("streaming: {server}"),
                                url: conn.url().to_string(),
                                lsn: Some(acked),
                                source: None,
                            }
                        }
                        other => other,
                    }
                }
                None => conn.protocol("replication stream", "malformed ErrorResponse"),
            })
        }
        frame::NOTICE_RESPONSE => {
            let Some(n) = ServerError::parse(f.body()) else {
                return Ok(None);
            };
            if let Some(publication) = conn
                .publication
                .as_deref()
                .filter(|p| skipped_publication(&n, p))
            {
                return Ok(Some((
                    false,
                    SourceItem::PublicationSkipped {
                        publication: publication.to_string(),
                    },
                )));
            }
            tracing::info!(notice = %n, "server notice during replication");
            Ok(None)
        }
        frame::COPY_DONE => Err(SourceError::ConnectionLost {
            during: "streaming (the server ended the replication stream)".into(),
            url: conn.url().to_string(),
            lsn: Some(acked),
            source: None,
        }),
        other => Err(conn.protocol(
            "replication stream",
            format!("unexpected message {:?} in CopyBoth", char::from(other)),
        )),
    }
}

/// Whether a notice is pgoutput's (PostgreSQL 18+) WARNING that it skipped
/// `publication` because it did not exist at that point in the WAL. Told by
/// the severity (never localized in the 'V' field), the SQLSTATE
/// (`object_not_in_prerequisite_state`) and the publication's name; the text
/// and its quotes may be in the server's language. A false match costs one
/// needless flush, a missed one a silent gap, so the test is loose.
fn skipped_publication(notice: &ServerError, publication: &str) -> bool {
    notice.severity == "WARNING" && notice.code == "55000" && notice.message.contains(publication)
}

/// The last standby status update sent: what it reported, and when.
struct LastReport {
    acked: Lsn,
    at: tokio::time::Instant,
}

impl LastReport {
    /// Sends a status update reporting `acked` (with `reply`, the server
    /// answers at once with a keepalive) and remembers it.
    async fn send(
        &mut self,
        conn: &mut ReplicationConnection,
        acked: Lsn,
        reply: bool,
    ) -> Result<(), SourceError> {
        copyboth::put_status_update(acked, Timestamp::now(), reply, &mut conn.write_buf);
        tracing::trace!(acked = %acked, reply, "standby status update");
        conn.flush_writes("status update").await?;
        self.acked = acked;
        self.at = tokio::time::Instant::now();
        Ok(())
    }
}

/// Final status update, CopyDone, then drain until the server ends the stream
/// (closing with unread data would reset the connection and could lose the update).
async fn finish(mut conn: ReplicationConnection, acked: Lsn) -> Result<(), SourceError> {
    copyboth::put_status_update(acked, Timestamp::now(), false, &mut conn.write_buf);
    copyboth::put_copy_done(&mut conn.write_buf);
    conn.flush_writes("final status update").await?;
    tracing::debug!(acked = %acked, "stream: final status update sent");
    let drained = tokio::time::timeout(FINISH_TIMEOUT, async {
        loop {
            let f = conn.read_frame("end of replication").await?;
            match f.tag {
                b'Z' => return Ok::<(), SourceError>(()),
                frame::ERROR_RESPONSE => {
                    return Err(conn.error_frame(&f, "end of replication", None, None))
                }
                _ => {}
            }
        }
    })
    .await;
    match drained {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "stream: error after CopyDone"),
        Err(_) => tracing::debug!("stream: server did not end the stream in time"),
    }
    conn.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_skipped_publication_warning_about_ours_is_a_gap() {
        let notice = |severity: &str, code: &str, message: &str| ServerError {
            severity: severity.into(),
            code: code.into(),
            message: message.into(),
            ..ServerError::default()
        };
        // PostgreSQL 18's pgoutput, in English and in another language.
        let ours = notice("WARNING", "55000", "skipped loading publication \"p 1\"");
        assert!(skipped_publication(&ours, "p 1"));
        let translated = notice("WARNING", "55000", "Publikation »p 1« übersprungen");
        assert!(skipped_publication(&translated, "p 1"));
        // Another publication, another code, or not a warning.
        assert!(!skipped_publication(&ours, "q"));
        assert!(!skipped_publication(
            &notice("WARNING", "01000", "skipped loading publication \"p 1\""),
            "p 1"
        ));
        assert!(!skipped_publication(
            &notice("NOTICE", "55000", "skipped loading publication \"p 1\""),
            "p 1"
        ));
    }

    #[test]
    fn acknowledgements_are_reported_sooner_once_caught_up() {
        let end = Lsn(0x1000);
        assert_eq!(report_interval(Lsn(0x0fff), end), ACK_REPORT_INTERVAL);
        assert_eq!(report_interval(end, end), CAUGHT_UP_REPORT_INTERVAL);
        assert_eq!(report_interval(Lsn(0x2000), end), CAUGHT_UP_REPORT_INTERVAL);
    }
}
