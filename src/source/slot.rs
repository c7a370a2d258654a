//! Replication slot commands on the replication connection: create a
//! temporary slot (for `record`), drop a slot, read whether it was
//! synchronized, and `START_REPLICATION`. Permanent slots are created by
//! `setup` over SQL (`pg_create_logical_replication_slot`, which it prints,
//! with the transactions it waits for logged): see `cli/setup.rs`.
//!
//! We never request `streaming` or `two_phase`: pgoutput then sends a
//! transaction only after its commit.

use super::connection::ReplicationConnection;
use super::error::SourceError;
use super::frame;
use crate::lsn::Lsn;
use crate::quote::{quote_ident, quote_literal};

/// A slot just created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    /// Its name.
    pub name: String,
    /// The LSN from which it streams: changes committed after it.
    pub consistent_point: Lsn,
}

/// Checks a slot name as PostgreSQL does: 1 to 63 of `[a-z0-9_]`.
pub fn validate_slot_name(slot: &str) -> Result<(), SourceError> {
    let ok = !slot.is_empty()
        && slot.len() <= 63
        && slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SourceError::InvalidSlotName {
            slot: slot.to_string(),
        })
    }
}

/// The `START_REPLICATION` command for a slot and a publication: always from
/// `0/0` (the slot is the only durable position), protocol 1, with logical
/// decoding messages; never `streaming` or `two_phase`.
pub fn start_replication_command(slot: &str, publication: &str) -> String {
    format!(
        "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names {}, messages 'true')",
        quote_ident(slot),
        quote_literal(&quote_ident(publication)),
    )
}

fn create_temporary_command(slot: &str) -> String {
    format!(
        "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
        quote_ident(slot)
    )
}

fn created(
    conn: &ReplicationConnection,
    rows: Vec<Vec<Option<String>>>,
    slot: &str,
) -> Result<CreatedSlot, SourceError> {
    let consistent_point = rows
        .first()
        .and_then(|r| r.get(1).cloned().flatten())
        .and_then(|l| l.parse().ok())
        .ok_or_else(|| {
            conn.protocol(
                "CREATE_REPLICATION_SLOT",
                "no consistent_point in the reply",
            )
        })?;
    Ok(CreatedSlot {
        name: slot.to_string(),
        consistent_point,
    })
}

/// Whether `slot` came through slot synchronization from a former primary
/// (`pg_replication_slots.synced`, PostgreSQL 17+; false before, and for a
/// missing slot). Plain SQL over the replication connection (a
/// `replication=database` walsender runs it).
pub async fn slot_synced(
    conn: &mut ReplicationConnection,
    slot: &str,
) -> Result<bool, SourceError> {
    let sql = format!(
        "SELECT coalesce((SELECT (to_jsonb(s) ->> 'synced')::bool FROM pg_replication_slots s \
         WHERE s.slot_name = {}), false)",
        quote_literal(slot)
    );
    let rows = conn.simple_query(&sql, Some(slot), None).await?;
    Ok(rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .as_deref()
        == Some("t"))
}

/// Creates a temporary logical slot (dropped when this connection closes), for `record`.
pub async fn create_temporary_slot(
    conn: &mut ReplicationConnection,
    slot: &str,
) -> Result<CreatedSlot, SourceError> {
    validate_slot_name(slot)?;
    let rows = conn
        .simple_query(&create_temporary_command(slot), Some(slot), None)
        .await?;
    created(conn, rows, slot)
}

/// Drops a slot (`DROP_REPLICATION_SLOT "name" WAIT`).
pub async fn drop_slot(conn: &mut ReplicationConnection, slot: &str) -> Result<(), SourceError> {
    validate_slot_name(slot)?;
    conn.simple_query(
        &format!("DROP_REPLICATION_SLOT {} WAIT", quote_ident(slot)),
        Some(slot),
        None,
    )
    .await
    .map(|_| ())
}

/// Sends `START_REPLICATION` and waits for CopyBothResponse. On success the
/// connection is in CopyBoth mode: hand it to [`super::stream::spawn_stream`].
pub async fn start_replication(
    conn: &mut ReplicationConnection,
    slot: &str,
    publication: &str,
) -> Result<(), SourceError> {
    validate_slot_name(slot)?;
    if conn.poisoned {
        return Err(SourceError::Poisoned {
            url: conn.url().to_string(),
        });
    }
    let cmd = start_replication_command(slot, publication);
    postgres_protocol::message::frontend::query(&cmd, &mut conn.write_buf)
        .map_err(|e| conn.protocol("START_REPLICATION", e.to_string()))?;
    conn.flush_writes("START_REPLICATION").await?;
    let mut error = None;
    loop {
        let f = conn.read_frame("START_REPLICATION").await?;
        match f.tag {
            frame::COPY_BOTH_RESPONSE => {
                tracing::info!(slot, publication, url = %conn.url(), backend_pid = conn.backend_pid(), "replication started");
                conn.publication = Some(publication.to_string());
                return Ok(());
            }
            frame::ERROR_RESPONSE => {
                error =
                    Some(conn.error_frame(&f, "START_REPLICATION", Some(slot), Some(publication)));
            }
            frame::NOTICE_RESPONSE => {}
            b'Z' => {
                return Err(error.unwrap_or_else(|| {
                    conn.protocol(
                        "START_REPLICATION",
                        "ReadyForQuery without CopyBothResponse",
                    )
                }))
            }
            other => {
                return Err(conn.protocol(
                    "START_REPLICATION",
                    format!("unexpected message {:?}", char::from(other)),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(
            start_replication_command("s1", "my \"pub's\""),
            "START_REPLICATION SLOT \"s1\" LOGICAL 0/0 (proto_version '1', publication_names '\"my \"\"pub''s\"\"\"', messages 'true')"
        );
        assert!(!start_replication_command("s", "p").contains("streaming"));
        assert!(!start_replication_command("s", "p").contains("two_phase"));
    }

    #[test]
    fn slot_names() {
        validate_slot_name("cache_invalidator_1").unwrap();
        for bad in ["", "Upper", "a-b", "a\"b", &"x".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad}");
        }
    }
}
