//! Messages under our prefix (heartbeats, flush markers, declared
//! invalidations), flushes, and the pub/sub messages the planner publishes.

use std::sync::Arc;

use serde::Serialize;

use super::render::{ByMode, Patterns, RenderTarget, Unlinks};
use super::*;

/// At most 60 bytes of a content, for an error message.
fn lossy_prefix(content: &[u8]) -> String {
    let cut = &content[..content.len().min(60)];
    String::from_utf8_lossy(cut).into_owned()
}

#[derive(Serialize)]
struct TruncateMessage<'a> {
    table: &'a str,
    op: &'static str,
    lsn: String,
    epoch: &'a str,
}

impl Planner {
    /// A logical decoding message under the `cache-invalidator` prefix (others
    /// are ignored): `flush:all` and `flush:table:<schema.table>` fire
    /// truncate invalidations; `invalidate:v1:<json>` is a declared
    /// invalidation ([`super::declared`]), planned like a mapped one;
    /// `heartbeat` plans nothing. Anything else under our prefix (an unknown
    /// payload version, a malformed payload, an unknown kind) cannot be
    /// understood, so it is answered with a full flush, never guessed: see
    /// [`Planner::take_malformed`].
    pub fn message(&mut self, prefix: &str, content: &[u8], lsn: Lsn) {
        if prefix != MESSAGE_PREFIX {
            return;
        }
        if self.xid.is_none() {
            self.lsn = lsn;
        }
        if content == HEARTBEAT {
            return;
        }
        if content == b"flush:all" {
            self.stats.flush_markers += 1;
            self.flush_all();
            return;
        }
        let result = if let Some(rest) = content.strip_prefix(b"flush:table:") {
            match std::str::from_utf8(rest).ok().map(TableName::parse) {
                Some(Ok(t)) => {
                    self.stats.flush_markers += 1;
                    self.flush_table(&t);
                    Ok(())
                }
                _ => Err(DeclaredError::UnknownKind(lossy_prefix(content))),
            }
        } else if let Some(rest) = content.strip_prefix(declared::INVALIDATE_PREFIX.as_bytes()) {
            declared::parse_invalidate(rest).map(|d| self.declared(&d))
        } else {
            Err(DeclaredError::UnknownKind(lossy_prefix(content)))
        };
        if let Err(error) = result {
            self.malformed(lsn, error);
        }
    }

    /// Plans one declared invalidation: keys and patterns as given, tags and
    /// versions under their prefixes, messages after the deletes (like a
    /// mapped rule's), all in the current transaction.
    pub fn declared(&mut self, d: &Declared) {
        let c = &mut self.stats.declared;
        c.messages += 1;
        c.keys += d.keys.len() as u64;
        c.tags += d.tags.len() as u64;
        c.versions += d.versions.len() as u64;
        c.patterns += d.patterns.len() as u64;
        c.publish += d.channels.len() as u64;
        // Keys and patterns drop a refresh an earlier change of the batch
        // planned, as a mapped rule's do (docs/pre-warm.md).
        let now = self.now();
        let plan = &mut self.plan;
        let buf = &mut self.scratch.buf;
        let mut keys = Unlinks {
            inner: ByMode::Unlink(&mut plan.keys),
            refresh: &mut plan.refresh,
            now,
        };
        for k in &d.keys {
            keys.add(k);
        }
        for (set, prefix, names) in [
            (&mut plan.tags, &self.ctx.tag_prefix, &d.tags),
            (&mut plan.versions, &self.ctx.version_prefix, &d.versions),
        ] {
            for n in names {
                buf.clear();
                buf.push_str(prefix);
                buf.push_str(n);
                set.insert(buf);
            }
        }
        let mut patterns = Patterns {
            set: &mut plan.patterns,
            refresh: &mut plan.refresh,
            now,
        };
        for p in &d.patterns {
            patterns.add(p);
        }
        if d.channels.is_empty() {
            return;
        }
        let source: Arc<str> = Arc::from(DECLARED_SOURCE);
        for ch in &d.channels {
            let message = match &ch.message {
                Some(m) => m.clone(),
                None => self.declared_message(d),
            };
            self.add_message(&ch.channel, message, &source);
        }
    }

    /// The default message of a declared channel without a message of its own.
    pub(super) fn declared_message(&self, d: &Declared) -> String {
        let tags: Vec<String> = d
            .tags
            .iter()
            .map(|t| format!("{}{t}", self.ctx.tag_prefix))
            .collect();
        let versions: Vec<String> = d
            .versions
            .iter()
            .map(|v| format!("{}{v}", self.ctx.version_prefix))
            .collect();
        serde_json::json!({
            "op": "declared",
            "lsn": self.lsn.to_string(),
            "keys": d.keys,
            "tags": tags,
            "versions": versions,
            "epoch": self.ctx.epoch,
        })
        .to_string()
    }

    /// A message under our prefix that cannot be understood: every mapped
    /// table's truncate invalidations (as `flush:all`), counted and kept for
    /// one log line with its LSN.
    pub(super) fn malformed(&mut self, lsn: Lsn, error: DeclaredError) {
        self.stats.declared.malformed += 1;
        if self.malformed.len() < MAX_MALFORMED_KEPT {
            self.malformed.push(Malformed { lsn, error });
        }
        self.flush_all();
    }

    /// Messages answered with a full flush since the last call (at most
    /// [`MAX_MALFORMED_KEPT`]; [`PlannerStats::declared`] counts them all),
    /// each for one log line.
    pub fn take_malformed(&mut self) -> Vec<Malformed> {
        std::mem::take(&mut self.malformed)
    }

    /// Declared invalidations counted since the last call (for metrics).
    pub fn take_declared(&mut self) -> DeclaredCounters {
        let now = self.stats.declared;
        let delta = now.since(&self.declared_reported);
        self.declared_reported = now;
        delta
    }

    /// Fires every mapped table's truncate invalidations.
    pub fn flush_all(&mut self) {
        let tables: Vec<TableName> = self.truncates.keys().cloned().collect();
        for t in &tables {
            self.fire_truncate(t);
        }
    }

    /// Fires one table's truncate invalidations (nothing when unmapped).
    /// Returns whether the table is mapped.
    pub fn flush_table(&mut self, table: &TableName) -> bool {
        if self.truncates.contains_key(table) {
            self.fire_truncate(table);
            true
        } else {
            false
        }
    }

    pub(super) fn fire_truncate(&mut self, table: &TableName) {
        let Some(t) = self.truncates.get(table) else {
            return;
        };
        let plan = &mut self.plan;
        if !plan.refresh.is_empty() {
            // A truncate after a refresh of the same batch: the refresh goes.
            let now = RefreshVersion {
                lsn: self.lsn,
                seq: self.seq,
            };
            plan.refresh.retain(|key, set| {
                set.version >= now
                    || !(t.keys.iter().any(|k| k == key)
                        || t.patterns
                            .iter()
                            .any(|p| glob::glob_match(p.as_bytes(), key.as_bytes())))
            });
        }
        insert_all(&mut plan.keys, &t.keys);
        insert_all(&mut plan.tags, &t.tags);
        insert_all(&mut plan.versions, &t.versions);
        insert_all(&mut plan.patterns, &t.patterns);
        insert_all(&mut plan.tag_patterns, &t.tag_patterns);
        insert_all(&mut plan.version_patterns, &t.version_patterns);
        if t.channels.is_empty() {
            return;
        }
        let name = Arc::clone(&t.name);
        let channels = t.channels.clone();
        for (channel, shaped) in channels {
            let message = shaped.unwrap_or_else(|| self.truncate_message(&name));
            self.add_message(&channel, message, &name);
        }
    }

    pub(super) fn truncate_message(&self, table: &str) -> String {
        serde_json::to_string(&TruncateMessage {
            table,
            op: "truncate",
            lsn: self.lsn.to_string(),
            epoch: &self.ctx.epoch,
        })
        .unwrap_or_default()
    }

    pub(super) fn add_message(&mut self, channel: &str, message: String, table: &Arc<str>) {
        if !self
            .txn_pairs
            .iter()
            .any(|(c, t)| c == channel && t == table)
        {
            self.txn_pairs.push((channel.to_owned(), Arc::clone(table)));
        }
        if self.txn_overflow {
            let m = self.truncate_message(table);
            self.plan.add_publish(Publish {
                channel: channel.to_owned(),
                message: m,
            });
            return;
        }
        let p = Publish {
            channel: channel.to_owned(),
            message,
        };
        if self.plan.publish_seen.contains(&p) {
            return;
        }
        self.txn_messages += 1;
        if self.txn_messages <= self.ctx.max_batch_ops {
            self.plan.add_publish(p);
            return;
        }
        // Overflow: this transaction's messages give way to one truncate
        // message per channel and table.
        self.txn_overflow = true;
        self.stats.message_overflows += 1;
        let start = self.txn_publish_start.min(self.plan.publish.len());
        for removed in self.plan.publish.drain(start..) {
            self.plan.publish_seen.remove(&removed);
        }
        let pairs = std::mem::take(&mut self.txn_pairs);
        for (c, t) in &pairs {
            let m = self.truncate_message(t);
            self.plan.add_publish(Publish {
                channel: c.clone(),
                message: m,
            });
        }
        self.txn_pairs = pairs;
    }
}
