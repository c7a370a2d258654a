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

use std::fmt;

use bytes::Bytes;
use bytestring::ByteString;

use crate::decode::events::{Relation, RelationColumn, Timestamp};
use crate::lsn::Lsn;

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

/// A pgoutput message type, including the ones we never request, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// 'B'
    Begin,
    /// 'C'
    Commit,
    /// 'O'
    Origin,
    /// 'R'
    Relation,
    /// 'Y'
    Type,
    /// 'I'
    Insert,
    /// 'U'
    Update,
    /// 'D'
    Delete,
    /// 'T'
    Truncate,
    /// 'M'
    Message,
    /// 'S' (protocol v2 streaming)
    StreamStart,
    /// 'E' (protocol v2 streaming)
    StreamStop,
    /// 'c' (protocol v2 streaming)
    StreamCommit,
    /// 'A' (protocol v2 streaming)
    StreamAbort,
    /// 'b' (protocol v3 two-phase)
    BeginPrepare,
    /// 'P' (protocol v3 two-phase)
    Prepare,
    /// 'K' (protocol v3 two-phase)
    CommitPrepared,
    /// 'r' (protocol v3 two-phase)
    RollbackPrepared,
    /// 'p' (protocol v3 two-phase with streaming)
    StreamPrepare,
    /// A tag pgoutput does not define.
    Unknown(u8),
    /// The payload was empty: no tag at all.
    Empty,
}

impl MessageKind {
    /// The kind a tag byte announces.
    pub fn from_tag(tag: u8) -> Self {
        match tag {
            b'B' => Self::Begin,
            b'C' => Self::Commit,
            b'O' => Self::Origin,
            b'R' => Self::Relation,
            b'Y' => Self::Type,
            b'I' => Self::Insert,
            b'U' => Self::Update,
            b'D' => Self::Delete,
            b'T' => Self::Truncate,
            b'M' => Self::Message,
            b'S' => Self::StreamStart,
            b'E' => Self::StreamStop,
            b'c' => Self::StreamCommit,
            b'A' => Self::StreamAbort,
            b'b' => Self::BeginPrepare,
            b'P' => Self::Prepare,
            b'K' => Self::CommitPrepared,
            b'r' => Self::RollbackPrepared,
            b'p' => Self::StreamPrepare,
            other => Self::Unknown(other),
        }
    }

    /// True for the streaming and two-phase messages we never request.
    pub fn is_unrequested(self) -> bool {
        matches!(
            self,
            Self::StreamStart
                | Self::StreamStop
                | Self::StreamCommit
                | Self::StreamAbort
                | Self::BeginPrepare
                | Self::Prepare
                | Self::CommitPrepared
                | Self::RollbackPrepared
                | Self::StreamPrepare
        )
    }
}

impl fmt::Display for MessageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Begin => "Begin",
            Self::Commit => "Commit",
            Self::Origin => "Origin",
            Self::Relation => "Relation",
            Self::Type => "Type",
            Self::Insert => "Insert",
            Self::Update => "Update",
            Self::Delete => "Delete",
            Self::Truncate => "Truncate",
            Self::Message => "Message",
            Self::StreamStart => "Stream Start",
            Self::StreamStop => "Stream Stop",
            Self::StreamCommit => "Stream Commit",
            Self::StreamAbort => "Stream Abort",
            Self::BeginPrepare => "Begin Prepare",
            Self::Prepare => "Prepare",
            Self::CommitPrepared => "Commit Prepared",
            Self::RollbackPrepared => "Rollback Prepared",
            Self::StreamPrepare => "Stream Prepare",
            Self::Unknown(tag) => return write!(f, "unknown (tag 0x{tag:02x})"),
            Self::Empty => "empty",
        };
        f.write_str(name)
    }
}

/// What was wrong with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The payload ended inside `what`, which started at byte `offset`.
    Truncated {
        /// The field being read, e.g. "tuple", "column name".
        what: &'static str,
        /// Byte offset in the payload where it started.
        offset: usize,
    },
    /// Bytes left over after a complete message.
    TrailingBytes {
        /// Where the message ended.
        offset: usize,
        /// How many bytes followed.
        count: usize,
    },
    /// A length or count field was negative.
    NegativeLength {
        /// The field, e.g. "value length".
        what: &'static str,
        /// The value read.
        value: i64,
        /// Byte offset of the field.
        offset: usize,
    },
    /// A string (or a text value) was not valid UTF-8.
    InvalidUtf8 {
        /// The field, e.g. "relation name".
        what: &'static str,
        /// Byte offset of the field.
        offset: usize,
    },
    /// A byte that must be one of a few tags was something else.
    BadTag {
        /// What the tag introduces, e.g. "tuple" or "column value".
        what: &'static str,
        /// What was allowed, e.g. "'K', 'O' or 'N'".
        expected: &'static str,
        /// The byte found.
        found: u8,
        /// Byte offset of the tag.
        offset: usize,
    },
    /// A binary ('b') column value; we never request binary mode.
    BinaryValue {
        /// Column position (0-based).
        column: usize,
        /// Byte offset of the value.
        offset: usize,
    },
    /// A streaming or two-phase message; we never request `streaming` or `two_phase`.
    Unsupported,
    /// A tag pgoutput does not define.
    UnknownMessage,
    /// A change for a relation OID no Relation message described.
    UnknownRelation {
        /// The relation OID.
        oid: u32,
    },
    /// A row image whose column count differs from its Relation message.
    ColumnCount {
        /// The relation OID.
        oid: u32,
        /// Columns in the Relation message.
        expected: usize,
        /// Columns in the tuple.
        found: usize,
    },
    /// A Commit with no Begin before it on this stream.
    CommitWithoutBegin,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Truncated { what, offset } => write!(f, "{what} truncated at byte {offset}"),
            Reason::TrailingBytes { offset, count } => {
                write!(f, "{count} unexpected bytes after the message end at byte {offset}")
            }
            Reason::NegativeLength { what, value, offset } => {
                write!(f, "negative {what} {value} at byte {offset}")
            }
            Reason::InvalidUtf8 { what, offset } => {
                write!(f, "invalid UTF-8 in {what} at byte {offset} (is the database encoding UTF8?)")
            }
            Reason::BadTag { what, expected, found, offset } => write!(
                f,
                "bad {what} tag {} at byte {offset}, expected {expected}",
                DisplayTag(*found)
            ),
            Reason::BinaryValue { column, offset } => write!(
                f,
                "binary value for column {column} at byte {offset}; binary mode is never requested"
            ),
            Reason::Unsupported => f.write_str(
                "streaming and two-phase messages are never requested (no `streaming`, no `two_phase`); \
                 is something else consuming this slot with other options?",
            ),
            Reason::UnknownMessage => f.write_str("not a pgoutput protocol v1 message"),
            Reason::UnknownRelation { oid } => write!(
                f,
                "unknown relation OID {oid}: no Relation message for it was received on this stream"
            ),
            Reason::ColumnCount { oid, expected, found } => write!(
                f,
                "tuple has {found} columns but relation OID {oid} has {expected}"
            ),
            Reason::CommitWithoutBegin => f.write_str("Commit without a Begin before it"),
        }
    }
}

/// A tag byte, printed as a character when printable.
struct DisplayTag(u8);

impl fmt::Display for DisplayTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", char::from(self.0))
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// A pgoutput message that could not be parsed or decoded.
///
/// Reads like `malformed pgoutput Update message at LSN 0/16B3748: tuple
/// truncated at byte 37`. [`parse`] does not know the LSN; the caller adds it
/// with [`DecodeError::at`] (the [`super::relations::RelationCache`] does so itself).
///
/// None of these goes away by retrying on the same connection. A reconnect makes
/// PostgreSQL resend Relation messages, so [`DecodeError::reconnect_may_help`]
/// is true for [`Reason::UnknownRelation`] only; everything else is fatal
/// (a bug, or a slot consumed with options we never request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    kind: MessageKind,
    lsn: Option<Lsn>,
    reason: Reason,
}

impl DecodeError {
    /// An error in a message of type `kind`.
    pub fn new(kind: MessageKind, reason: Reason) -> Self {
        DecodeError {
            kind,
            lsn: None,
            reason,
        }
    }

    /// The same error, located at the XLogData's WAL start `lsn`.
    #[must_use]
    pub fn at(mut self, lsn: Lsn) -> Self {
        self.lsn = Some(lsn);
        self
    }

    /// The type of the offending message.
    pub fn kind(&self) -> MessageKind {
        self.kind
    }

    /// The WAL position of the offending message, when known.
    pub fn lsn(&self) -> Option<Lsn> {
        self.lsn
    }

    /// What was wrong.
    pub fn reason(&self) -> &Reason {
        &self.reason
    }

    /// True when a fresh replication connection could get past this error.
    pub fn reconnect_may_help(&self) -> bool {
        matches!(self.reason, Reason::UnknownRelation { .. })
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let adjective = match self.reason {
            Reason::Unsupported => "unsupported ",
            Reason::UnknownMessage | Reason::UnknownRelation { .. } => "",
            Reason::CommitWithoutBegin => "unexpected ",
            _ => "malformed ",
        };
        write!(f, "{adjective}pgoutput {} message", self.kind)?;
        if let Some(lsn) = self.lsn {
            write!(f, " at LSN {lsn}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

// Handwritten: thiserror cannot vary a struct's message by its reason; there is no source.
impl std::error::Error for DecodeError {}

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

/// A cursor over one payload. Every read checks the bytes that remain.
struct Reader<'a> {
    buf: &'a [u8],
    /// The shared buffer `buf` is, when there is one: text values slice it.
    owner: Option<&'a Bytes>,
    /// Emptied row vectors to fill instead of allocating new ones.
    spare: &'a mut Vec<TupleData>,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn bytes(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], Reason> {
        let truncated = Reason::Truncated {
            what,
            offset: self.pos,
        };
        let end = self.pos.checked_add(len).ok_or(truncated.clone())?;
        let bytes = self.buf.get(self.pos..end).ok_or(truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Reason> {
        let offset = self.pos;
        let bytes = self.bytes(N, what)?;
        bytes
            .try_into()
            .map_err(|_| Reason::Truncated { what, offset })
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Reason> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, Reason> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, Reason> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, Reason> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, Reason> {
        Ok(Lsn(u64::from_be_bytes(self.array(what)?)))
    }

    /// An Int16 count, refused when negative.
    fn count16(&mut self, what: &'static str) -> Result<usize, Reason> {
        let offset = self.pos;
        let value = i16::from_be_bytes(self.array(what)?);
        usize::try_from(value).map_err(|_| Reason::NegativeLength {
            what,
            value: i64::from(value),
            offset,
        })
    }

    /// An Int32 length or count, refused when negative.
    fn count32(&mut self, what: &'static str) -> Result<usize, Reason> {
        let offset = self.pos;
        let value = self.i32(what)?;
        usize::try_from(value).map_err(|_| Reason::NegativeLength {
            what,
            value: i64::from(value),
            offset,
        })
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &'static str) -> Result<String, Reason> {
        let offset = self.pos;
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(Reason::Truncated { what, offset })?;
        let bytes = self.bytes(len, what)?;
        self.pos = self.pos.saturating_add(1); // the NUL found above
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(Reason::InvalidUtf8 { what, offset }),
        }
    }

    fn expect_tag(
        &mut self,
        what: &'static str,
        tag: u8,
        expected: &'static str,
    ) -> Result<(), Reason> {
        let offset = self.pos;
        match self.u8(what)? {
            found if found == tag => Ok(()),
            found => Err(Reason::BadTag {
                what,
                expected,
                found,
                offset,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(payload: &[u8]) -> DecodeError {
        parse(payload).expect_err("must not parse")
    }

    #[test]
    fn empty_payload_is_an_error() {
        assert_eq!(
            err(b"").to_string(),
            "malformed pgoutput empty message: message tag truncated at byte 0"
        );
    }

    #[test]
    fn truncated_tuple_names_type_offset_and_lsn() {
        // Insert into 16398, 'N', 1 column, 't', length 5, but only 2 bytes.
        let mut p = b"I\x00\x00\x40\x0eN\x00\x01t\x00\x00\x00\x05ab".to_vec();
        let e = err(&p).at("0/16B3748".parse().unwrap());
        assert_eq!(
            e.to_string(),
            "malformed pgoutput Insert message at LSN 0/16B3748: tuple truncated at byte 13"
        );
        assert_eq!(e.kind(), MessageKind::Insert);
        p.extend_from_slice(b"cde");
        assert!(matches!(
            parse(&p),
            Ok(Message::Insert {
                relation: 16398,
                ..
            })
        ));
    }

    #[test]
    fn stream_and_two_phase_tags_are_unsupported() {
        for tag in [b'S', b'E', b'c', b'A', b'b', b'P', b'K', b'r', b'p'] {
            let e = err(&[tag, 0, 0, 0, 1]);
            assert_eq!(e.reason(), &Reason::Unsupported, "tag {}", char::from(tag));
            assert!(e.to_string().starts_with("unsupported pgoutput "), "{e}");
        }
        assert_eq!(
            err(b"Sxxxx").to_string(),
            "unsupported pgoutput Stream Start message: streaming and two-phase messages are never \
             requested (no `streaming`, no `two_phase`); is something else consuming this slot with other options?"
        );
    }

    #[test]
    fn unknown_tag() {
        assert_eq!(
            err(b"z").to_string(),
            "pgoutput unknown (tag 0x7a) message: not a pgoutput protocol v1 message"
        );
    }

    #[test]
    fn binary_values_are_refused() {
        let e = err(b"I\x00\x00\x40\x0eN\x00\x02nb\x00\x00\x00\x01x");
        assert_eq!(
            e.reason(),
            &Reason::BinaryValue {
                column: 1,
                offset: 9
            }
        );
    }

    #[test]
    fn negative_lengths_are_refused_not_cast() {
        let e = err(b"I\x00\x00\x40\x0eN\x00\x01t\xff\xff\xff\xff");
        assert_eq!(
            e.reason(),
            &Reason::NegativeLength {
                what: "value length",
                value: -1,
                offset: 9
            }
        );
        let e = err(b"T\x80\x00\x00\x00\x00");
        assert!(matches!(
            e.reason(),
            Reason::NegativeLength {
                what: "relation count",
                ..
            }
        ));
    }

    #[test]
    fn huge_counts_do_not_reserve_memory() {
        // 2^31-1 relations announced, none sent: an error, not an allocation failure.
        let e = err(b"T\x7f\xff\xff\xff\x00");
        assert_eq!(
            e.reason(),
            &Reason::Truncated {
                what: "relation OID",
                offset: 6
            }
        );
        let e = err(b"I\x00\x00\x40\x0eN\x7f\xff");
        assert_eq!(
            e.reason(),
            &Reason::Truncated {
                what: "tuple",
                offset: 8
            }
        );
    }

    #[test]
    fn invalid_utf8_in_a_name() {
        let e = err(b"Y\x00\x00\x00\x01public\x00\xff\xfe\x00");
        assert_eq!(
            e.to_string(),
            "malformed pgoutput Type message: invalid UTF-8 in type name at byte 12 (is the database encoding UTF8?)"
        );
    }

    #[test]
    fn unterminated_string() {
        let e = err(b"Y\x00\x00\x00\x01public");
        assert_eq!(
            e.reason(),
            &Reason::Truncated {
                what: "type namespace",
                offset: 5
            }
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let e = err(b"Y\x00\x00\x00\x01\x00t\x00!!");
        assert_eq!(
            e.reason(),
            &Reason::TrailingBytes {
                offset: 8,
                count: 2
            }
        );
    }

    #[test]
    fn bad_old_tuple_tag() {
        let e = err(b"U\x00\x00\x40\x0eX");
        assert_eq!(
            e.to_string(),
            "malformed pgoutput Update message: bad tuple tag 'X' at byte 5, expected 'K', 'O' or 'N'"
        );
        let e = err(b"D\x00\x00\x40\x0eN\x00\x00");
        assert!(matches!(e.reason(), Reason::BadTag { found: b'N', .. }));
    }

    #[test]
    fn update_with_old_key_then_new() {
        let msg =
            parse(b"U\x00\x00\x40\x0eK\x00\x02t\x00\x00\x00\x011nN\x00\x02t\x00\x00\x00\x012u")
                .unwrap();
        assert_eq!(
            msg,
            Message::Update {
                relation: 16398,
                old: Some(OldTuple::Key(vec![
                    TupleValue::Text("1".into()),
                    TupleValue::Null
                ])),
                new: vec![TupleValue::Text("2".into()), TupleValue::UnchangedToast],
            }
        );
    }

    #[test]
    fn truncate_with_options_and_several_relations() {
        let msg = parse(b"T\x00\x00\x00\x02\x03\x00\x00\x40\x0e\x00\x00\x40\x15").unwrap();
        assert_eq!(
            msg,
            Message::Truncate {
                options: 3,
                relations: vec![16398, 16405]
            }
        );
    }
}
