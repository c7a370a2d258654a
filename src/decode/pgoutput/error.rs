//! What a pgoutput message is called ([`MessageKind`]) and what can be wrong
//! with one ([`Reason`], [`DecodeError`]).

use std::fmt;

use crate::lsn::Lsn;

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
/// truncated at byte 37`. [`super::parse`] does not know the LSN; the caller adds it
/// with [`DecodeError::at`] (the [`crate::decode::relations::RelationCache`] does so itself).
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
