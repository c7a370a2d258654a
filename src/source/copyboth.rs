//! The CopyBoth sub-protocol of streaming replication: the server's XLogData
//! ('w') and primary keepalive ('k') messages inside CopyData, and our
//! standby status update ('r'). Pure: bytes in, bytes out.
//!
//! Times on this sub-protocol are microseconds since 2000-01-01 UTC.

use bytes::{BufMut, Bytes, BytesMut};

use crate::decode::Timestamp;
use crate::lsn::Lsn;

/// A message the server sends inside CopyData during replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCopyMessage {
    /// WAL data: for logical replication, one output-plugin message.
    XLogData {
        /// Starting point of the data in WAL.
        wal_start: Lsn,
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock at transmission.
        send_time: Timestamp,
        /// The pgoutput message.
        data: Bytes,
    },
    /// Primary keepalive.
    Keepalive {
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock at transmission.
        send_time: Timestamp,
        /// The server asks for a status update now (or it disconnects at wal_sender_timeout).
        reply_requested: bool,
    },
}

/// A CopyData payload that is not a valid 'w' or 'k' message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid replication CopyData message: {0}")]
pub struct CopyMessageError(pub String);

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

/// Parses the body of a CopyData frame received during replication.
pub fn parse_server_message(body: Bytes) -> Result<ServerCopyMessage, CopyMessageError> {
    let short =
        |what: &str| CopyMessageError(format!("{what} message too short ({} bytes)", body.len()));
    match body.first() {
        Some(b'w') => {
            let wal_start = be_u64(&body, 1).ok_or_else(|| short("XLogData"))?;
            let wal_end = be_u64(&body, 9).ok_or_else(|| short("XLogData"))?;
            let send_time = be_u64(&body, 17).ok_or_else(|| short("XLogData"))?;
            Ok(ServerCopyMessage::XLogData {
                wal_start: Lsn(wal_start),
                wal_end: Lsn(wal_end),
                send_time: Timestamp(i64::from_be_bytes(send_time.to_be_bytes())),
                data: body.slice(25..),
            })
        }
        Some(b'k') => {
            let wal_end = be_u64(&body, 1).ok_or_else(|| short("keepalive"))?;
            let send_time = be_u64(&body, 9).ok_or_else(|| short("keepalive"))?;
            let reply = *body.get(17).ok_or_else(|| short("keepalive"))?;
            Ok(ServerCopyMessage::Keepalive {
                wal_end: Lsn(wal_end),
                send_time: Timestamp(i64::from_be_bytes(send_time.to_be_bytes())),
                reply_requested: reply != 0,
            })
        }
        Some(other) => Err(CopyMessageError(format!(
            "unknown message type {:?}",
            char::from(*other)
        ))),
        None => Err(CopyMessageError("empty CopyData".into())),
    }
}

/// Appends a CopyData frame holding a standby status update: written =
/// flushed = applied = `acked`, our clock, and whether the server should
/// answer at once (with a keepalive).
pub fn put_status_update(acked: Lsn, now: Timestamp, reply: bool, out: &mut BytesMut) {
    // CopyData header: 'd', length (4 + 34).
    out.put_u8(b'd');
    out.put_u32(4 + 34);
    out.put_u8(b'r');
    out.put_u64(acked.0); // written
    out.put_u64(acked.0); // flushed
    out.put_u64(acked.0); // applied
    out.put_i64(now.0);
    out.put_u8(u8::from(reply));
}

/// Appends a CopyDone frame.
pub fn put_copy_done(out: &mut BytesMut) {
    postgres_protocol::message::frontend::copy_done(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut b = vec![b'w'];
        b.extend_from_slice(&1u64.to_be_bytes());
        b.extend_from_slice(&2u64.to_be_bytes());
        b.extend_from_slice(&3i64.to_be_bytes());
        b.extend_from_slice(b"B...");
        let m = parse_server_message(Bytes::from(b)).unwrap();
        assert_eq!(
            m,
            ServerCopyMessage::XLogData {
                wal_start: Lsn(1),
                wal_end: Lsn(2),
                send_time: Timestamp(3),
                data: Bytes::from_static(b"B...")
            }
        );
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        k.extend_from_slice(&7i64.to_be_bytes());
        k.push(1);
        let m = parse_server_message(Bytes::from(k)).unwrap();
        assert_eq!(
            m,
            ServerCopyMessage::Keepalive {
                wal_end: Lsn(0x1_0000_0010),
                send_time: Timestamp(7),
                reply_requested: true
            }
        );
    }

    #[test]
    fn status_update_layout() {
        let mut out = BytesMut::new();
        put_status_update(Lsn(0x10), Timestamp(5), false, &mut out);
        assert_eq!(out.len(), 1 + 4 + 34);
        assert_eq!(&out[..6], &[b'd', 0, 0, 0, 38, b'r']);
        assert_eq!(&out[6..14], &0x10u64.to_be_bytes());
        assert_eq!(&out[22..30], &0x10u64.to_be_bytes());
        assert_eq!(out[38], 0);
        out.clear();
        put_status_update(Lsn(0x10), Timestamp(5), true, &mut out);
        assert_eq!(out[38], 1);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_server_message(Bytes::from(bytes));
        }
    }
}
