//! [`Reader`]: a cursor over one payload; every read checks the bytes that
//! remain before anything is allocated for them.

use bytes::Bytes;

use super::{Reason, TupleData};
use crate::lsn::Lsn;

/// A cursor over one payload. Every read checks the bytes that remain.
pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
    /// The shared buffer `buf` is, when there is one: text values slice it.
    pub(super) owner: Option<&'a Bytes>,
    /// Emptied row vectors to fill instead of allocating new ones.
    pub(super) spare: &'a mut Vec<TupleData>,
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub(super) fn bytes(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], Reason> {
        let truncated = Reason::Truncated {
            what,
            offset: self.pos,
        };
        let end = self.pos.checked_add(len).ok_or(truncated.clone())?;
        let bytes = self.buf.get(self.pos..end).ok_or(truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    pub(super) fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Reason> {
        let offset = self.pos;
        let bytes = self.bytes(N, what)?;
        bytes
            .try_into()
            .map_err(|_| Reason::Truncated { what, offset })
    }

    pub(super) fn u8(&mut self, what: &'static str) -> Result<u8, Reason> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32, Reason> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub(super) fn i32(&mut self, what: &'static str) -> Result<i32, Reason> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    pub(super) fn i64(&mut self, what: &'static str) -> Result<i64, Reason> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    pub(super) fn lsn(&mut self, what: &'static str) -> Result<Lsn, Reason> {
        Ok(Lsn(u64::from_be_bytes(self.array(what)?)))
    }

    /// An Int16 count, refused when negative.
    pub(super) fn count16(&mut self, what: &'static str) -> Result<usize, Reason> {
        let offset = self.pos;
        let value = i16::from_be_bytes(self.array(what)?);
        usize::try_from(value).map_err(|_| Reason::NegativeLength {
            what,
            value: i64::from(value),
            offset,
        })
    }

    /// An Int32 length or count, refused when negative.
    pub(super) fn count32(&mut self, what: &'static str) -> Result<usize, Reason> {
        let offset = self.pos;
        let value = self.i32(what)?;
        usize::try_from(value).map_err(|_| Reason::NegativeLength {
            what,
            value: i64::from(value),
            offset,
        })
    }

    /// A NUL-terminated UTF-8 string.
    pub(super) fn string(&mut self, what: &'static str) -> Result<String, Reason> {
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

    pub(super) fn expect_tag(
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
