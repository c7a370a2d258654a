//! `record --out FILE [--max-txns N] [--timeout S]`: streams decoded committed
//! transactions from a temporary slot as JSON lines, one object per
//! transaction:
//!
//! ```json
//! {"xid":735,"changes":[{"table":"public.users","op":"update","old":{"id":"1"},"new":{"id":"1","name":"Ann"}}],"lsn":"0/1A2B3C4","commit_time":"2026-11-25T20:00:00.123456Z"}
//! ```
//!
//! `lsn` is the commit's end LSN; values are PostgreSQL text (under the pinned
//! session settings) or null; a column absent from `old`/`new` is unknown (not
//! sent); `types` names the type of each written column that a `refresh`
//! value does not render as text (`{"id":"int8","active":"bool"}`, see
//! [`crate::plan::refresh::type_name_of_oid`]; omitted when there is none), so
//! `replay` renders refreshed values typed as the worker does; a truncate is
//! `{"table":"public.users","op":"truncate"}`. `changes`
//! is written while the transaction streams and `lsn`/`commit_time` last, so a
//! huge transaction needs no buffering. Transactional logical decoding
//! messages (flush markers, declared invalidations) are recorded in place as
//! `{"op":"message","prefix":"cache-invalidator","content":"invalidate:v1:{...}"}`
//! (content as UTF-8, invalid bytes replaced); non-transactional ones
//! (heartbeats) are not.
//!
//! Everything written is acknowledged to PostgreSQL (the temporary slot goes
//! away with the connection anyway). Stops on `--max-txns`, `--timeout` or
//! SIGINT/SIGTERM; a transaction cut off by the stop is removed from a regular
//! output file.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::decode::{Event, Op, Relation, Row, Value};
use crate::error::{Because, CliError};
use crate::lsn::Lsn;
use crate::source::{self, ConnectionSettings, SourceItem, StreamControl};

/// Capacity of the channel between the stream task and the decoder, in XLogData messages.
const CHANNEL_CAPACITY: usize = 1024;

/// The validated inputs of `record`.
#[derive(Debug, Clone)]
pub struct RecordArgs {
    /// PostgreSQL connection settings.
    pub postgres: ConnectionSettings,
    /// The publication to stream.
    pub publication: String,
    /// Output path (`-` for stdout).
    pub out: std::path::PathBuf,
    /// Stop after this many transactions.
    pub max_txns: Option<u64>,
    /// Stop after this long.
    pub timeout: Option<Duration>,
}

/// Writes transactions as JSON lines while they stream (see the module doc).
pub struct JsonLinesWriter<W: Write> {
    out: W,
    /// Bytes written so far (to cut off an unfinished transaction).
    written: u64,
    /// Offset where the open transaction's line starts, if one is open.
    open_at: Option<u64>,
    first_change: bool,
}

impl<W: Write> JsonLinesWriter<W> {
    /// A writer on `out`.
    pub fn new(out: W) -> Self {
        JsonLinesWriter {
            out,
            written: 0,
            open_at: None,
            first_change: true,
        }
    }

    fn put(&mut self, s: &str) -> io::Result<()> {
        self.out.write_all(s.as_bytes())?;
        self.written += u64::try_from(s.len()).unwrap_or(u64::MAX);
        Ok(())
    }

    fn put_json_str(&mut self, s: &str) -> io::Result<()> {
        let quoted = serde_json::to_string(s).map_err(io::Error::other)?;
        self.put(&quoted)
    }

    /// Writes one event; returns the end LSN when it completed a transaction.
    pub fn event(&mut self, event: &Event) -> io::Result<Option<Lsn>> {
        match event {
            Event::Begin { xid, .. } => {
                self.open_at = Some(self.written);
                self.first_change = true;
                self.put(&format!("{{\"xid\":{xid},\"changes\":["))?;
            }
            Event::Change(change) if self.open_at.is_some() => {
                if !self.first_change {
                    self.put(",")?;
                }
                self.first_change = false;
                self.put("{\"table\":")?;
                self.put_json_str(&change.relation.qualified_name())?;
                self.put(&format!(",\"op\":\"{}\"", change.op.as_str()))?;
                if change.op != Op::Truncate {
                    self.types(&change.relation, [&change.old, &change.new])?;
                    if let Some(old) = &change.old {
                        self.put(",\"old\":")?;
                        self.row(&change.relation, old)?;
                    }
                    if let Some(new) = &change.new {
                        self.put(",\"new\":")?;
                        self.row(&change.relation, new)?;
                    }
                }
                self.put("}")?;
            }
            Event::Message {
                transactional: true,
                prefix,
                content,
                ..
            } if self.open_at.is_some() => {
                if !self.first_change {
                    self.put(",")?;
                }
                self.first_change = false;
                self.put("{\"op\":\"message\",\"prefix\":")?;
                self.put_json_str(prefix)?;
                self.put(",\"content\":")?;
                self.put_json_str(&String::from_utf8_lossy(content))?;
                self.put("}")?;
            }
            Event::Commit {
                end_lsn,
                commit_time,
                ..
            } if self.open_at.is_some() => {
                self.put(&format!(
                    "],\"lsn\":\"{end_lsn}\",\"commit_time\":\"{}\"}}\n",
                    commit_time.to_rfc3339()
                ))?;
                self.open_at = None;
                return Ok(Some(*end_lsn));
            }
            _ => {}
        }
        Ok(None)
    }

    /// `"types":{...}`: the columns written in either row whose type renders
    /// other than as text; nothing when there is none.
    fn types(&mut self, relation: &Relation, rows: [&Option<Row>; 2]) -> io::Result<()> {
        let mut first = true;
        for (i, column) in relation.columns.iter().enumerate() {
            let Some(name) = crate::plan::refresh::type_name_of_oid(column.type_oid) else {
                continue;
            };
            let written = rows
                .iter()
                .filter_map(|r| r.as_ref()?.values.get(i))
                .any(|v| !matches!(v, Value::Unknown));
            if !written {
                continue;
            }
            self.put(if first { ",\"types\":{" } else { "," })?;
            first = false;
            self.put_json_str(&column.name)?;
            self.put(":")?;
            self.put_json_str(name)?;
        }
        if !first {
            self.put("}")?;
        }
        Ok(())
    }

    fn row(&mut self, relation: &Relation, row: &Row) -> io::Result<()> {
        self.put("{")?;
        let mut first = true;
        for (column, value) in relation.columns.iter().zip(&row.values) {
            let text = match value {
                Value::Unknown => continue,
                Value::Null => None,
                Value::Text(t) => Some(t),
            };
            if !first {
                self.put(",")?;
            }
            first = false;
            self.put_json_str(&column.name)?;
            self.put(":")?;
            match text {
                Some(t) => self.put_json_str(t)?,
                None => self.put("null")?,
            }
        }
        self.put("}")
    }

    /// Whether a transaction is open (Begin written, Commit not yet).
    pub fn in_transaction(&self) -> bool {
        self.open_at.is_some()
    }

    /// Where the open transaction's line starts (to cut it off), if one is open.
    pub fn open_offset(&self) -> Option<u64> {
        self.open_at
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Flushes and returns the inner writer.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Why recording stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `--max-txns` reached.
    MaxTxns,
    /// `--timeout` elapsed.
    Timeout,
    /// SIGINT or SIGTERM.
    Signal,
}

/// Runs `record` with a decoder: `decode(payload, wal_start, out)` appends the
/// events of one XLogData payload.
pub async fn record<D, E>(args: RecordArgs, mut decode: D) -> Result<u64, CliError>
where
    D: FnMut(&[u8], Lsn, &mut Vec<Event>) -> Result<(), E>,
    E: std::error::Error + Send + Sync + 'static,
{
    let sql = crate::pg::connect(&args.postgres)
        .await
        .map_err(CliError::runtime)?;
    sql.check_publication(&args.publication)
        .await
        .map_err(CliError::runtime)?;
    let mut conn = source::connect(&args.postgres)
        .await
        .map_err(CliError::runtime)?;
    let slot = format!("cache_invalidator_record_{}", std::process::id());
    let created = source::create_temporary_slot(&mut conn, &slot)
        .await
        .map_err(CliError::runtime)?;
    source::start_replication(&mut conn, &slot, &args.publication)
        .await
        .map_err(CliError::runtime)?;
    tracing::info!(slot = %slot, publication = %args.publication, consistent_point = %created.consistent_point, out = %args.out.display(), "recording");

    let (file, mut writer) = open_out(&args.out).map_err(|e| {
        CliError::invalid(Because::new(
            format!("cannot open --out {}", args.out.display()),
            e,
        ))
    })?;
    let (tx, mut rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (ack, ack_rx) = watch::channel(Lsn::ZERO);
    let (stop, stop_rx) = crate::shutdown::ShutdownTrigger::new();
    let task = source::spawn_stream(
        conn,
        tx,
        StreamControl {
            acked: ack_rx,
            stop: stop_rx,
        },
    );

    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(CliError::runtime)?;
    let mut txns = 0u64;
    let mut events = Vec::new();
    let write_err = |e: io::Error| CliError::runtime(e);
    let reason = loop {
        if args.max_txns.is_some_and(|max| txns >= max) {
            break StopReason::MaxTxns;
        }
        let item = tokio::select! {
            biased;
            _ = tokio::signal::ctrl_c() => break StopReason::Signal,
            _ = sigterm.recv() => break StopReason::Signal,
            _ = sleep_until(deadline) => break StopReason::Timeout,
            item = rx.recv() => item,
        };
        match item {
            Some(SourceItem::XLogData {
                wal_start, data, ..
            }) => {
                events.clear();
                decode(&data, wal_start, &mut events).map_err(CliError::runtime)?;
                for event in &events {
                    if let Some(end) = writer.event(event).map_err(write_err)? {
                        txns += 1;
                        // Flush when the stream has nothing more right now: lines
                        // appear promptly for readers, in batches under load.
                        if rx.is_empty() {
                            writer.flush().map_err(write_err)?;
                        }
                        // Written (to the OS) = recorded: acknowledge it.
                        ack.send_modify(|a| *a = (*a).max(end));
                    }
                }
            }
            Some(SourceItem::PublicationSkipped { publication }) => {
                tracing::warn!(
                    publication,
                    "the publication did not exist while changes were decoded: PostgreSQL skipped them, so this recording lacks them"
                );
            }
            Some(SourceItem::Keepalive { wal_end }) => {
                if !writer.in_transaction() {
                    ack.send_modify(|a| *a = (*a).max(wal_end));
                }
            }
            None => {
                // The stream ended: its error says why.
                return match task.await {
                    Ok(Err(e)) => Err(CliError::runtime(e)),
                    _ => Err(CliError::runtime("the replication stream ended")),
                };
            }
        }
    };
    let cut = writer.open_offset();
    let out = writer.into_inner().map_err(write_err)?;
    drop(out);
    if let (Some(offset), Some(file)) = (cut, file) {
        if file.metadata().map(|m| m.is_file()).unwrap_or(false) {
            file.set_len(offset).map_err(write_err)?;
        }
    }
    stop.trigger();
    drop(ack);
    drop(rx);
    match tokio::time::timeout(Duration::from_secs(10), task).await {
        Ok(Ok(Err(error))) => tracing::warn!(%error, "replication stream ended with an error"),
        Err(_) => tracing::warn!("replication stream did not end in time"),
        _ => {}
    }
    tracing::info!(transactions = txns, reason = ?reason, "recording stopped");
    Ok(txns)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

type Out = JsonLinesWriter<BufWriter<Box<dyn Write + Send>>>;

fn open_out(path: &Path) -> io::Result<(Option<File>, Out)> {
    if path == Path::new("-") {
        let w: Box<dyn Write + Send> = Box::new(io::stdout());
        return Ok((
            None,
            JsonLinesWriter::new(BufWriter::with_capacity(1 << 16, w)),
        ));
    }
    let file = File::create(path)?;
    let w: Box<dyn Write + Send> = Box::new(file.try_clone()?);
    Ok((
        Some(file),
        JsonLinesWriter::new(BufWriter::with_capacity(1 << 16, w)),
    ))
}

/// `record` with the pgoutput decoder ([`crate::decode::RelationCache`]).
pub async fn run(args: RecordArgs) -> Result<(), CliError> {
    let mut cache = crate::decode::RelationCache::new();
    record(args, move |payload, wal_start, out| {
        cache.decode_payload(payload, wal_start, out)
    })
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::decode::{Change, RelationColumn, Timestamp};

    fn users() -> Arc<Relation> {
        let col = |name: &str, is_key, type_oid| RelationColumn {
            name: name.into(),
            is_key,
            type_oid,
            type_modifier: -1,
        };
        Arc::new(Relation {
            oid: 1,
            schema: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: vec![
                col("id", true, 20),
                col("team_id", false, 23),
                col("name", false, 25),
                col("active", false, 16),
            ],
        })
    }

    #[test]
    fn writes_the_documented_format() {
        let rel = users();
        let t = |s: &str| Value::Text(s.into());
        let mut w = JsonLinesWriter::new(Vec::new());
        let events = [
            Event::Begin {
                xid: 735,
                final_lsn: Lsn(1),
                commit_time: Timestamp(0),
            },
            Event::Change(Change {
                relation: rel.clone(),
                op: Op::Update,
                old: Some(Row {
                    values: vec![t("1"), t("5"), Value::Unknown, Value::Unknown],
                }),
                new: Some(Row {
                    values: vec![t("1"), t("6"), t("Ann \"q\"\n"), t("t")],
                }),
            }),
            Event::Change(Change {
                relation: rel.clone(),
                op: Op::Insert,
                old: None,
                new: Some(Row {
                    values: vec![t("2"), Value::Null, Value::Unknown, Value::Unknown],
                }),
            }),
            Event::Change(Change {
                relation: rel,
                op: Op::Truncate,
                old: None,
                new: None,
            }),
            Event::Message {
                transactional: true,
                lsn: Lsn(1),
                prefix: "cache-invalidator".into(),
                content: br#"invalidate:v1:{"keys":["k"]}"#.to_vec(),
            },
            // Not recorded: non-transactional (heartbeats).
            Event::Message {
                transactional: false,
                lsn: Lsn(1),
                prefix: "cache-invalidator".into(),
                content: b"heartbeat".to_vec(),
            },
        ];
        for e in &events {
            assert_eq!(w.event(e).unwrap(), None);
        }
        assert!(w.in_transaction());
        let end = w
            .event(&Event::Commit {
                xid: 735,
                commit_lsn: Lsn(1),
                end_lsn: Lsn(0x1A2B3C4),
                commit_time: Timestamp::parse_rfc3339("2026-11-25T20:00:00.123456Z").unwrap(),
            })
            .unwrap();
        assert_eq!(end, Some(Lsn(0x1A2B3C4)));
        let out = String::from_utf8(w.into_inner().unwrap()).unwrap();
        assert!(out.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"xid":735,"lsn":"0/1A2B3C4","commit_time":"2026-11-25T20:00:00.123456Z","changes":[
                {"table":"public.users","op":"update","types":{"id":"int8","team_id":"int4","active":"bool"},
                 "old":{"id":"1","team_id":"5"},"new":{"id":"1","team_id":"6","name":"Ann \"q\"\n","active":"t"}},
                // A column neither row carries is not typed.
                {"table":"public.users","op":"insert","types":{"id":"int8","team_id":"int4"},"new":{"id":"2","team_id":null}},
                {"table":"public.users","op":"truncate"},
                {"op":"message","prefix":"cache-invalidator","content":"invalidate:v1:{\"keys\":[\"k\"]}"}
            ]})
        );
    }
}
