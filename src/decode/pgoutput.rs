//! pgoutput protocol v1 messages, parsed from one XLogData payload.
//!
//! [`parse`] is pure and total: any byte slice yields a [`Message`] or a
//! [`DecodeError`] naming the message type and what was wrong, never a panic.
//! Every length read from the wire is checked against the bytes that remain
//! before anything is allocated for it.
//!
//! Only what we request is accepted: protocol version 1, text values, no
//! streaming, no two-phase. Stream and prepared-transaction tags, and binary
//! values, are typed errors ([`Reason::Unsupported`], [`Reason::BinaryValue`]).
//! The format is PostgreSQL's "Logical Replication Message Formats".

use bytes::Bytes;
use bytestring::ByteString;

use crate::decode::events::{Relation, RelationColumn, Timestamp};
use crate::lsn::Lsn;

mod error;
mod reader;

pub use error::{DecodeError, MessageKind, Reason};
use reader::Reader;

/// One pgoutput protocol v1 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// 'B': a transaction starts.
    Begin {
        /// LSN of the commit record.
        final_lsn: Lsn,
        /// Commit time.
        commit_time: Timestamp,
        /// Transaction id.
        xid: u32,
    },
    /// 'C': the transaction committed.
    Commit {
        /// Flags (unused by PostgreSQL so far, 0).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End LSN of the transaction.
        end_lsn: Lsn,
        /// Commit time.
        commit_time: Timestamp,
    },
    /// 'O': the transaction came from a replication origin.
    Origin {
        /// LSN of the commit on the origin server.
        commit_lsn: Lsn,
        /// Name of the origin.
        name: String,
    },
    /// 'R': describes a relation; sent before its first change on a connection
    /// and again whenever its definition changed.
    Relation(Relation),
    /// 'Y': describes a non-built-in data type (e.g. an enum) used by a relation.
    Type {
        /// Type OID.
        oid: u32,
        /// Schema name (empty for `pg_catalog`).
        namespace: String,
        /// Type name.
        name: String,
    },
    /// 'I': a row was inserted.
    Insert {
        /// Relation OID.
        relation: u32,
        /// The new row.
        new: TupleData,
    },
    /// 'U': a row was updated.
    Update {
        /// Relation OID.
        relation: u32,
        /// The old row: only under REPLICA IDENTITY FULL ('O') or when the
        /// identity columns changed ('K').
        old: Option<OldTuple>,
        /// The new row.
        new: TupleData,
    },
    /// 'D': a row was deleted.
    Delete {
        /// Relation OID.
        relation: u32,
        /// The old row: identity columns ('K') or the whole row ('O').
        old: OldTuple,
    },
    /// 'T': one or more relations were truncated.
    Truncate {
        /// Option bits: [`Message::TRUNCATE_CASCADE`], [`Message::TRUNCATE_RESTART_IDENTITY`].
        options: u8,
        /// OIDs of the truncated relations.
        relations: Vec<u32>,
    },
    /// 'M': a logical decoding message (`pg_logical_emit_message`).
    Message {
        /// Emitted inside a transaction (true) or immediately (false).
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// The prefix.
        prefix: String,
        /// The content.
        content: Vec<u8>,
    },
}

impl Message {
    /// Truncate option bit: CASCADE was given.
    pub const TRUNCATE_CASCADE: u8 = 1;
    /// Truncate option bit: RESTART IDENTITY was given.
    pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

    /// The type of this message, as errors name it.
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Begin { .. } => MessageKind::Begin,
            Message::Commit { .. } => MessageKind::Commit,
            Message::Origin { .. } => MessageKind::Origin,
            Message::Relation(_) => MessageKind::Relation,
            Message::Type { .. } => MessageKind::Type,
            Message::Insert { .. } => MessageKind::Insert,
            Message::Update { .. } => MessageKind::Update,
            Message::Delete { .. } => MessageKind::Delete,
            Message::Truncate { .. } => MessageKind::Truncate,
            Message::Message { .. } => MessageKind::Message,
        }
    }
}

/// The columns of one row image, in the relation's column order.
pub type TupleData = Vec<TupleValue>;

/// One column of a row image as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// 'n': NULL — or, in a key-only old tuple, a column outside the identity.
    Null,
    /// 'u': an unchanged TOAST value whose bytes were not sent.
    UnchangedToast,
    /// 't': the value in PostgreSQL's text form.
    Text(ByteString),
}

/// The old row image of an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// 'K': only the replica identity columns are meaningful; the others are sent as 'n'.
    Key(TupleData),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

/// Parses one XLogData payload (exactly one pgoutput v1 message). Column
/// values are copied out of `payload`; [`parse_shared`] avoids the copies.
pub fn parse(payload: &[u8]) -> Result<Message, DecodeError> {
    parse_with(payload, None, &mut Vec::new())
}

/// [`parse`] of a payload held in a shared buffer: column values are slices
/// of that buffer (no allocation or copy per column).
pub fn parse_shared(payload: &Bytes) -> Result<Message, DecodeError> {
    parse_with(payload, Some(payload), &mut Vec::new())
}

/// [`parse_shared`] that takes the vectors of row images from `spare` (emptied
/// vectors of earlier rows) instead of allocating them, when it has some.
pub fn parse_pooled(payload: &Bytes, spare: &mut Vec<TupleData>) -> Result<Message, DecodeError> {
    parse_with(payload, Some(payload), spare)
}

fn parse_with(
    payload: &[u8],
    owner: Option<&Bytes>,
    spare: &mut Vec<TupleData>,
) -> Result<Message, DecodeError> {
    let Some((&tag, _)) = payload.split_first() else {
        return Err(DecodeError::new(
            MessageKind::Empty,
            Reason::Truncated {
                what: "message tag",
                offset: 0,
            },
        ));
    };
    let kind = MessageKind::from_tag(tag);
    let mut r = Reader {
        buf: payload,
        owner,
        spare,
        pos: 1,
    };
    let msg = parse_body(kind, &mut r).map_err(|reason| DecodeError::new(kind, reason))?;
    if r.pos != payload.len() {
        let reason = Reason::TrailingBytes {
            offset: r.pos,
            count: payload.len().saturating_sub(r.pos),
        };
        return Err(DecodeError::new(kind, reason));
    }
    Ok(msg)
}

fn parse_body(kind: MessageKind, r: &mut Reader<'_>) -> Result<Message, Reason> {
    Ok(match kind {
        MessageKind::Begin => Message::Begin {
            final_lsn: r.lsn("final LSN")?,
            commit_time: Timestamp(r.i64("commit timestamp")?),
            xid: r.u32("xid")?,
        },
        MessageKind::Commit => Message::Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.lsn("commit LSN")?,
            end_lsn: r.lsn("end LSN")?,
            commit_time: Timestamp(r.i64("commit timestamp")?),
        },
        MessageKind::Origin => Message::Origin {
            commit_lsn: r.lsn("origin commit LSN")?,
            name: r.string("origin name")?,
        },
        MessageKind::Relation => Message::Relation(parse_relation(r)?),
        MessageKind::Type => Message::Type {
            oid: r.u32("type OID")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        },
        MessageKind::Insert => {
            let relation = r.u32("relation OID")?;
            r.expect_tag("tuple", b'N', "'N'")?;
            let new = parse_tuple(r)?;
            Message::Insert { relation, new }
        }
        MessageKind::Update => {
            let relation = r.u32("relation OID")?;
            let offset = r.pos;
            let old = match r.u8("tuple tag")? {
                b'K' => Some(OldTuple::Key(parse_tuple(r)?)),
                b'O' => Some(OldTuple::Full(parse_tuple(r)?)),
                b'N' => None,
                found => {
                    return Err(Reason::BadTag {
                        what: "tuple",
                        expected: "'K', 'O' or 'N'",
                        found,
                        offset,
                    })
                }
            };
            if old.is_some() {
                r.expect_tag("tuple", b'N', "'N'")?;
            }
            let new = parse_tuple(r)?;
            Message::Update { relation, old, new }
        }
        MessageKind::Delete => {
            let relation = r.u32("relation OID")?;
            let offset = r.pos;
            let old = match r.u8("tuple tag")? {
                b'K' => OldTuple::Key(parse_tuple(r)?),
                b'O' => OldTuple::Full(parse_tuple(r)?),
                found => {
                    return Err(Reason::BadTag {
                        what: "tuple",
                        expected: "'K' or 'O'",
                        found,
                        offset,
                    })
                }
            };
            Message::Delete { relation, old }
        }
        MessageKind::Truncate => {
            let count = r.count32("relation count")?;
            let options = r.u8("options")?;
            // Each OID takes 4 bytes: never reserve more than the payload can hold.
            let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relations.push(r.u32("relation OID")?);
            }
            Message::Truncate { options, relations }
        }
        MessageKind::Message => {
            let transactional = r.u8("flags")? & 1 == 1;
            let lsn = r.lsn("message LSN")?;
            let prefix = r.string("message prefix")?;
            let len = r.count32("content length")?;
            let content = r.bytes(len, "message content")?.to_vec();
            Message::Message {
                transactional,
                lsn,
                prefix,
                content,
            }
        }
        k if k.is_unrequested() => return Err(Reason::Unsupported),
        _ => return Err(Reason::UnknownMessage),
    })
}

fn parse_relation(r: &mut Reader<'_>) -> Result<Relation, Reason> {
    let oid = r.u32("relation OID")?;
    let schema = r.string("relation namespace")?;
    let name = r.string("relation name")?;
    let replica_identity = r.u8("replica identity")?;
    let count = r.count16("column count")?;
    // A column takes at least 10 bytes (flags, empty name, type OID, modifier).
    let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
    for _ in 0..count {
        let flags = r.u8("column flags")?;
        columns.push(RelationColumn {
            is_key: flags & 1 == 1,
            name: r.string("column name")?,
            type_oid: r.u32("column type OID")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        oid,
        schema,
        name,
        replica_identity,
        columns,
    })
}

fn parse_tuple(r: &mut Reader<'_>) -> Result<TupleData, Reason> {
    let count = r.count16("tuple column count")?;
    // A column takes at least its 1-byte kind.
    let mut values = r.spare.pop().unwrap_or_default();
    values.clear();
    values.reserve(count.min(r.remaining()));
    for column in 0..count {
        let offset = r.pos;
        let value = match r.u8("tuple")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => {
                let len = r.count32("value length")?;
                let bytes = r.bytes(len, "tuple")?;
                let text = match r.owner {
                    Some(owner) => ByteString::try_from(owner.slice_ref(bytes)).ok(),
                    None => std::str::from_utf8(bytes).ok().map(ByteString::from),
                };
                match text {
                    Some(text) => TupleValue::Text(text),
                    None => {
                        return Err(Reason::InvalidUtf8 {
                            what: "text value",
                            offset: offset + 5,
                        })
                    }
                }
            }
            b'b' => return Err(Reason::BinaryValue { column, offset }),
            found => {
                return Err(Reason::BadTag {
                    what: "column value",
                    expected: "'n', 'u', 't' or 'b'",
                    found,
                    offset,
                })
            }
        };
        values.push(value);
    }
    Ok(values)
}

#[cfg(test)]
mod tests;
