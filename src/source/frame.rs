//! Splitting the backend byte stream into frames: one tag byte, a 4-byte
//! big-endian length that counts itself, the body. Pure: no I/O; returns
//! `Ok(None)` when the buffer does not hold a whole frame yet.
//!
//! We split frames ourselves instead of calling `postgres-protocol`'s
//! `Message::parse` directly because that parser rejects tags it does not know
//! (CopyBothResponse 'W') and would consume the frame doing so; frames we do
//! not handle ourselves are handed to it whole.

use bytes::{Buf, Bytes, BytesMut};

/// CopyBothResponse.
pub const COPY_BOTH_RESPONSE: u8 = b'W';
/// CopyData.
pub const COPY_DATA: u8 = b'd';
/// CopyDone.
pub const COPY_DONE: u8 = b'c';
/// ErrorResponse.
pub const ERROR_RESPONSE: u8 = b'E';
/// NoticeResponse.
pub const NOTICE_RESPONSE: u8 = b'N';

/// Largest frame accepted (PostgreSQL's own limit for a message is 1 GB of
/// payload; leave room for the headers of a CopyData around it).
pub const MAX_FRAME_LEN: usize = (1 << 30) + (1 << 20);

/// One complete backend message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message type byte.
    pub tag: u8,
    /// The whole message, header included (what `postgres-protocol` parses).
    pub raw: BytesMut,
}

impl Frame {
    /// The body after the 5-byte header.
    pub fn body(&self) -> &[u8] {
        self.raw.get(5..).unwrap_or_default()
    }

    /// The body after the header, as shared bytes (no copy).
    pub fn into_body(self) -> Bytes {
        let mut raw = self.raw;
        if raw.len() >= 5 {
            raw.advance(5);
        }
        raw.freeze()
    }
}

/// A frame header that cannot be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Length below 4 (it counts itself).
    #[error("invalid message length {len} for tag {tag:?}")]
    TooShort {
        /// Tag byte, as a char.
        tag: char,
        /// The length field.
        len: u32,
    },
    /// Length above [`MAX_FRAME_LEN`].
    #[error("message of {len} bytes for tag {tag:?} exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLong {
        /// Tag byte, as a char.
        tag: char,
        /// The length field.
        len: u32,
    },
}

/// Splits one frame off the front of `buf`, or returns `Ok(None)` when more
/// bytes are needed (leaving `buf` untouched).
pub fn split_frame(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    let Some(header) = buf.get(..5) else {
        return Ok(None);
    };
    let tag = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len < 4 {
        return Err(FrameError::TooShort {
            tag: char::from(tag),
            len,
        });
    }
    let total = usize::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_FRAME_LEN)
        .and_then(|l| l.checked_add(1))
        .ok_or(FrameError::TooLong {
            tag: char::from(tag),
            len,
        })?;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(Frame {
        tag,
        raw: buf.split_to(total),
    }))
}

/// How many more bytes the frame at the front of `buf` needs (at least 1 when
/// incomplete); used to size reads of very large frames.
pub fn bytes_missing(buf: &[u8]) -> usize {
    match buf.get(..5) {
        None => 5 - buf.len(),
        Some(h) => {
            let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
            usize::try_from(len)
                .ok()
                .and_then(|l| l.checked_add(1))
                .map(|total| total.saturating_sub(buf.len()))
                .unwrap_or(0)
                .max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&(u32::try_from(body.len()).unwrap() + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut b = BytesMut::from(&[b'd', 0, 0, 0, 3][..]);
        assert!(split_frame(&mut b).is_err());
        let mut b = BytesMut::from(&[b'd', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(split_frame(&mut b).is_err());
        let mut b = BytesMut::from(&[b'd', 0, 0][..]);
        assert_eq!(split_frame(&mut b), Ok(None));
        assert_eq!(b.len(), 3);
    }

    proptest! {
        #[test]
        fn splits_correctly_under_arbitrary_short_reads(
            bodies in prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..300)), 0..20),
            cuts in prop::collection::vec(1usize..64, 1..50),
        ) {
            let mut wire = Vec::new();
            for (tag, body) in &bodies {
                wire.extend_from_slice(&frame(*tag, body));
            }
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < wire.len() {
                let n = cuts[i % cuts.len()].min(wire.len() - pos);
                i += 1;
                buf.extend_from_slice(&wire[pos..pos + n]);
                pos += n;
                while let Some(f) = split_frame(&mut buf).unwrap() {
                    prop_assert!(bytes_missing(&buf) >= 1);
                    got.push((f.tag, f.body().to_vec()));
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, bodies);
        }

        #[test]
        fn never_panics_on_garbage(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = split_frame(&mut buf) {}
            let _ = bytes_missing(&buf);
        }
    }
}
