//! The relation cache: pgoutput messages -> [`super::Event`]s.
//!
//! pgoutput names tables by OID in row messages and describes each OID in a
//! Relation message sent before its first change on a connection (and again
//! after a schema change). [`RelationCache`] keeps the latest description per
//! OID and turns row messages into [`Change`]s whose rows are in column order,
//! with the two subtleties of the wire format resolved:
//!
//! - in a key-only ('K') old tuple, columns outside the replica identity are
//!   sent as 'n'; they become [`Value::Unknown`], never [`Value::Null`];
//! - an unchanged TOAST value ('u') in the new tuple is taken from the old
//!   tuple when that has it, otherwise it is [`Value::Unknown`].

use std::collections::HashMap;
use std::sync::Arc;

use crate::decode::events::{Change, Event, Op, Relation, Row, Value};
use crate::decode::pgoutput::{
    self, DecodeError, Message, OldTuple, Reason, TupleData, TupleValue,
};
use crate::lsn::Lsn;

/// Relation OID -> the latest Relation message for it, plus the transaction in progress.
///
/// One per replication stream: after a reconnect call [`RelationCache::clear`]
/// (PostgreSQL resends the Relation messages on a new connection).
#[derive(Debug, Default, Clone)]
pub struct RelationCache {
    relations: HashMap<u32, Arc<Relation>>,
    /// Xid of the open transaction (from its Begin), for the Commit event.
    xid: Option<u32>,
    /// Row vectors handed back by [`RelationCache::recycle`], reused by
    /// [`RelationCache::decode_shared`]: no allocation per row image.
    spare: Vec<TupleData>,
}

/// Row vectors kept for reuse (an Update has two row images).
const SPARE_ROWS: usize = 8;

impl RelationCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The latest description of a relation, if one arrived.
    pub fn get(&self, oid: u32) -> Option<&Arc<Relation>> {
        self.relations.get(&oid)
    }

    /// Forgets every relation and the open transaction (for a new connection).
    pub fn clear(&mut self) {
        self.relations.clear();
        self.xid = None;
    }

    /// Parses one XLogData payload and decodes it: [`pgoutput::parse`] then
    /// [`RelationCache::decode`], errors located at `wal_start`.
    pub fn decode_payload(
        &mut self,
        payload: &[u8],
        wal_start: Lsn,
        out: &mut Vec<Event>,
    ) -> Result<(), DecodeError> {
        let msg = pgoutput::parse(payload).map_err(|e| e.at(wal_start))?;
        self.decode(msg, wal_start, out)
    }

    /// [`RelationCache::decode_payload`] of a payload in a shared buffer:
    /// column values are slices of it, not copies, and row vectors come from
    /// [`RelationCache::recycle`] when it has some (the worker's path).
    pub fn decode_shared(
        &mut self,
        payload: &bytes::Bytes,
        wal_start: Lsn,
        out: &mut Vec<Event>,
    ) -> Result<(), DecodeError> {
        let msg = pgoutput::parse_pooled(payload, &mut self.spare).map_err(|e| e.at(wal_start))?;
        self.decode(msg, wal_start, out)
    }

    /// Takes back an event once it has been planned: its row vectors are
    /// emptied and kept for the next rows [`RelationCache::decode_shared`]
    /// decodes, so a steady stream allocates none.
    pub fn recycle(&mut self, event: Event) {
        if let Event::Change(change) = event {
            for row in [change.old, change.new].into_iter().flatten() {
                if self.spare.len() >= SPARE_ROWS {
                    return;
                }
                let mut values = row.values;
                values.clear();
                // Value and TupleValue have the same layout: the empty vector
                // is converted in place and keeps its capacity.
                self.spare
                    .push(values.into_iter().map(|_| TupleValue::Null).collect());
            }
        }
    }

    /// Turns one message into zero or more events appended to `out`: Begin,
    /// Commit, Message and Relation give one event each; Insert, Update and
    /// Delete one [`Event::Change`]; Truncate one change per relation; Origin
    /// and Type none. On error nothing is appended. `wal_start` (the XLogData's
    /// WAL start) only locates errors.
    pub fn decode(
        &mut self,
        msg: Message,
        wal_start: Lsn,
        out: &mut Vec<Event>,
    ) -> Result<(), DecodeError> {
        let kind = msg.kind();
        let fail = |reason| DecodeError::new(kind, reason).at(wal_start);
        match msg {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                self.xid = Some(xid);
                out.push(Event::Begin {
                    xid,
                    final_lsn,
                    commit_time,
                });
            }
            Message::Commit {
                commit_lsn,
                end_lsn,
                commit_time,
                ..
            } => {
                let xid = self
                    .xid
                    .take()
                    .ok_or_else(|| fail(Reason::CommitWithoutBegin))?;
                out.push(Event::Commit {
                    xid,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                });
            }
            Message::Origin { .. } | Message::Type { .. } => {}
            Message::Relation(relation) => {
                let relation = Arc::new(relation);
                self.relations.insert(relation.oid, Arc::clone(&relation));
                out.push(Event::Relation(relation));
            }
            Message::Insert { relation, new } => {
                let relation = self.relation(relation).map_err(fail)?;
                let new = row(&relation, new, false).map_err(fail)?;
                out.push(Event::Change(Change {
                    relation,
                    op: Op::Insert,
                    old: None,
                    new: Some(new),
                }));
            }
            Message::Update { relation, old, new } => {
                let relation = self.relation(relation).map_err(fail)?;
                let old = old
                    .map(|old| old_row(&relation, old))
                    .transpose()
                    .map_err(fail)?;
                let mut new = row(&relation, new, false).map_err(fail)?;
                if let Some(old) = &old {
                    fill_unchanged_toast(&mut new, old);
                }
                out.push(Event::Change(Change {
                    relation,
                    op: Op::Update,
                    old,
                    new: Some(new),
                }));
            }
            Message::Delete { relation, old } => {
                let relation = self.relation(relation).map_err(fail)?;
                let old = old_row(&relation, old).map_err(fail)?;
                out.push(Event::Change(Change {
                    relation,
                    op: Op::Delete,
                    old: Some(old),
                    new: None,
                }));
            }
            Message::Truncate { relations, .. } => {
                // Resolve every OID first: on error nothing is appended.
                if let Some(&oid) = relations
                    .iter()
                    .find(|oid| !self.relations.contains_key(oid))
                {
                    return Err(fail(Reason::UnknownRelation { oid }));
                }
                out.reserve(relations.len());
                for oid in relations {
                    let relation = self.relation(oid).map_err(fail)?;
                    out.push(Event::Change(Change {
                        relation,
                        op: Op::Truncate,
                        old: None,
                        new: None,
                    }));
                }
            }
            Message::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                out.push(Event::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                });
            }
        }
        Ok(())
    }

    fn relation(&self, oid: u32) -> Result<Arc<Relation>, Reason> {
        self.relations
            .get(&oid)
            .cloned()
            .ok_or(Reason::UnknownRelation { oid })
    }
}

fn old_row(relation: &Relation, old: OldTuple) -> Result<Row, Reason> {
    match old {
        OldTuple::Key(data) => row(relation, data, true),
        OldTuple::Full(data) => row(relation, data, false),
    }
}

/// A tuple as a row in column order. In a key-only tuple, 'n' outside the
/// identity means "not sent". 'u' is unknown here; the caller fills it.
fn row(relation: &Relation, data: TupleData, key_only: bool) -> Result<Row, Reason> {
    if data.len() != relation.columns.len() {
        return Err(Reason::ColumnCount {
            oid: relation.oid,
            expected: relation.columns.len(),
            found: data.len(),
        });
    }
    // TupleValue and Value have the same layout, so this collects in place:
    // no allocation beyond the tuple's own, the strings are moved.
    let values = data
        .into_iter()
        .zip(&relation.columns)
        .map(|(value, column)| match value {
            TupleValue::Text(s) => Value::Text(s),
            TupleValue::Null if key_only && !column.is_key => Value::Unknown,
            TupleValue::Null => Value::Null,
            TupleValue::UnchangedToast => Value::Unknown,
        })
        .collect();
    Ok(Row { values })
}

/// Unchanged TOAST values of the new row, taken from the old row where it knows them.
fn fill_unchanged_toast(new: &mut Row, old: &Row) {
    for (value, old) in new.values.iter_mut().zip(&old.values) {
        if *value == Value::Unknown && *old != Value::Unknown {
            value.clone_from(old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::events::{RelationColumn, Timestamp};

    fn users() -> Message {
        let col = |name: &str, is_key| RelationColumn {
            name: name.into(),
            is_key,
            type_oid: 25,
            type_modifier: -1,
        };
        Message::Relation(Relation {
            oid: 7,
            schema: "public".into(),
            name: "users".into(),
            replica_identity: b'd',
            columns: vec![col("id", true), col("name", false), col("bio", false)],
        })
    }

    /// A cache that decoded `users()`, and the emptied event buffer.
    fn knowing_users() -> (RelationCache, Vec<Event>) {
        let mut cache = RelationCache::new();
        let mut out = Vec::new();
        cache.decode(users(), Lsn(1), &mut out).unwrap();
        out.clear();
        (cache, out)
    }

    fn t(s: &str) -> TupleValue {
        TupleValue::Text(s.into())
    }

    /// An Insert into relation 7 (`users()`) as pgoutput sends it.
    fn insert_payload(values: [&str; 3]) -> bytes::Bytes {
        let mut p = vec![b'I'];
        p.extend_from_slice(&7u32.to_be_bytes());
        p.push(b'N');
        p.extend_from_slice(&3i16.to_be_bytes());
        for v in values {
            p.push(b't');
            p.extend_from_slice(&i32::try_from(v.len()).unwrap().to_be_bytes());
            p.extend_from_slice(v.as_bytes());
        }
        bytes::Bytes::from(p)
    }

    /// A recycled event's row vector carries the next row: a steady stream
    /// allocates no row vectors.
    #[test]
    fn recycled_row_vectors_are_reused() {
        let (mut cache, mut out) = knowing_users();
        let new_row = |event: &Event| match event {
            Event::Change(c) => c.new.clone().unwrap(),
            other => panic!("not a change: {other:?}"),
        };
        cache
            .decode_shared(&insert_payload(["1", "ann", "hi"]), Lsn(2), &mut out)
            .unwrap();
        let first = out.pop().unwrap();
        let buffer = match &first {
            Event::Change(c) => c.new.as_ref().unwrap().values.as_ptr() as usize,
            other => panic!("not a change: {other:?}"),
        };
        assert_eq!(new_row(&first).values[1], Value::Text("ann".into()));
        cache.recycle(first);
        assert!(
            matches!(cache.spare.as_slice(), [v] if v.is_empty() && v.capacity() >= 3),
            "the row vector was not kept with its capacity"
        );
        cache
            .decode_shared(&insert_payload(["2", "bob", "yo"]), Lsn(3), &mut out)
            .unwrap();
        assert!(cache.spare.is_empty(), "the kept vector was not used");
        let second = out.pop().unwrap();
        match &second {
            Event::Change(c) => {
                let row = c.new.as_ref().unwrap();
                assert_eq!(
                    row.values.as_ptr() as usize,
                    buffer,
                    "a new vector was allocated"
                );
                assert_eq!(
                    row.values.as_slice(),
                    [
                        Value::Text("2".into()),
                        Value::Text("bob".into()),
                        Value::Text("yo".into())
                    ]
                );
            }
            other => panic!("not a change: {other:?}"),
        }
    }

    fn decode_all(msgs: Vec<Message>) -> Result<Vec<Event>, DecodeError> {
        let mut cache = RelationCache::new();
        let mut out = Vec::new();
        for msg in msgs {
            cache.decode(msg, Lsn(0x100), &mut out)?;
        }
        Ok(out)
    }

    fn change(event: &Event) -> &Change {
        match event {
            Event::Change(c) => c,
            other => panic!("not a change: {other:?}"),
        }
    }

    #[test]
    fn key_tuple_nulls_outside_identity_are_unknown_and_toast_is_filled_only_when_known() {
        let events = decode_all(vec![
            users(),
            Message::Update {
                relation: 7,
                old: Some(OldTuple::Key(vec![
                    t("1"),
                    TupleValue::Null,
                    TupleValue::Null,
                ])),
                new: vec![t("2"), TupleValue::Null, TupleValue::UnchangedToast],
            },
        ])
        .unwrap();
        let c = change(&events[1]);
        assert_eq!(
            c.old.as_ref().unwrap().values,
            [Value::Text("1".into()), Value::Unknown, Value::Unknown]
        );
        assert_eq!(
            c.new.as_ref().unwrap().values,
            [Value::Text("2".into()), Value::Null, Value::Unknown]
        );
    }

    #[test]
    fn rows_reuse_the_tuple_allocation() {
        let Message::Relation(rel) = users() else {
            unreachable!()
        };
        let data = vec![t("1"), TupleValue::Null, TupleValue::UnchangedToast];
        let before = data.as_ptr().cast::<u8>();
        let row = row(&rel, data, true).unwrap();
        assert_eq!(
            row.values.as_ptr().cast::<u8>(),
            before,
            "collected in place"
        );
        assert_eq!(
            row.values,
            [Value::Text("1".into()), Value::Unknown, Value::Unknown]
        );
    }

    #[test]
    fn toast_filled_from_full_old_tuple() {
        let events = decode_all(vec![
            users(),
            Message::Update {
                relation: 7,
                old: Some(OldTuple::Full(vec![t("1"), t("a"), t("long")])),
                new: vec![t("1"), t("b"), TupleValue::UnchangedToast],
            },
        ])
        .unwrap();
        let c = change(&events[1]);
        assert_eq!(
            c.new.as_ref().unwrap().values[2],
            Value::Text("long".into())
        );
    }

    #[test]
    fn unknown_relation_is_named() {
        let e = decode_all(vec![Message::Delete {
            relation: 99,
            old: OldTuple::Key(vec![]),
        }])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "pgoutput Delete message at LSN 0/100: unknown relation OID 99: no Relation message for it was received on this stream"
        );
        assert!(e.reconnect_may_help());
    }

    #[test]
    fn truncate_with_an_unknown_relation_appends_nothing() {
        let (mut cache, mut out) = knowing_users();
        let e = cache
            .decode(
                Message::Truncate {
                    options: 0,
                    relations: vec![7, 8],
                },
                Lsn(1),
                &mut out,
            )
            .unwrap_err();
        assert_eq!(e.reason(), &Reason::UnknownRelation { oid: 8 });
        assert!(out.is_empty());
    }

    #[test]
    fn column_count_mismatch() {
        let e = decode_all(vec![
            users(),
            Message::Insert {
                relation: 7,
                new: vec![t("1")],
            },
        ])
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed pgoutput Insert message at LSN 0/100: tuple has 1 columns but relation OID 7 has 3"
        );
    }

    #[test]
    fn commit_carries_the_begin_xid_and_needs_a_begin() {
        let begin = Message::Begin {
            final_lsn: Lsn(5),
            commit_time: Timestamp(1),
            xid: 42,
        };
        let commit = Message::Commit {
            flags: 0,
            commit_lsn: Lsn(5),
            end_lsn: Lsn(6),
            commit_time: Timestamp(1),
        };
        let events = decode_all(vec![begin, commit.clone()]).unwrap();
        assert!(matches!(
            events[1],
            Event::Commit {
                xid: 42,
                end_lsn: Lsn(6),
                ..
            }
        ));
        let e = decode_all(vec![commit]).unwrap_err();
        assert_eq!(e.reason(), &Reason::CommitWithoutBegin);
    }
}
