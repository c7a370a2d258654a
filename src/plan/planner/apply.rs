//! One change through one resolved rule: keys, tags, versions, patterns,
//! refreshed values and messages, or the table's fallback.

use super::render::*;
use super::*;

impl Planner {
    /// Renders one rule for one change into the plan; `Err` asks for the fallback.
    pub(super) fn apply_rule(
        &mut self,
        rr: &ResolvedRule,
        table: &Arc<str>,
        change: &Change,
    ) -> Result<(), (FallbackReason, Option<usize>)> {
        let mappings = Arc::clone(&self.mappings);
        let rule = &mappings.rules()[rr.rule];
        if !rule.on.contains(change.op) {
            return Ok(());
        }
        let (primary, secondary) = match change.op {
            Op::Insert => match &change.new {
                Some(n) => (Image { row: n, new: None }, None),
                None => return Err((FallbackReason::UnknownValue, None)),
            },
            Op::Delete => match &change.old {
                Some(o) => (Image { row: o, new: None }, None),
                None => return Err((FallbackReason::OldRowMissing, None)),
            },
            Op::Update => {
                let Some(n) = &change.new else {
                    return Err((FallbackReason::UnknownValue, None));
                };
                if !update_fires(rr, change) {
                    return Ok(());
                }
                let old = match &change.old {
                    Some(o) => Some(Image {
                        row: o,
                        new: Some(n),
                    }),
                    None if rr.old_implied => None,
                    None => return Err((FallbackReason::OldRowMissing, None)),
                };
                (Image { row: n, new: None }, old)
            }
            Op::Truncate => return Ok(()),
        };
        // Every value needed must be known (and of sane length) before anything is planned.
        let max = self.ctx.max_key_bytes;
        for i in 0..rr.cols.len() {
            check_known(rr, primary, i, max)?;
            if let Some(old) = secondary {
                if rr.in_keys[i] {
                    check_known(rr, old, i, max)?;
                }
            }
        }

        let collect = rule.channels.iter().any(|c| c.message.is_none());
        let sc = &mut self.scratch;
        sc.keys.clear();
        sc.tags.clear();
        sc.versions.clear();
        let now = RefreshVersion {
            lsn: self.lsn,
            seq: self.seq,
        };
        for img in std::iter::once(primary).chain(secondary) {
            let ctx = &self.ctx;
            let plan = &mut self.plan;
            // Tombstone rules mark keys and tag sets at the commit LSN, the
            // others unlink them; either way a key drops the refresh of it an
            // earlier change planned.
            render_set(
                &rule.keys,
                rr,
                img,
                "",
                &mut sc.buf,
                &mut Unlinks {
                    inner: ByMode::new(rule.mode, &mut plan.keys, &mut plan.tombstones, self.lsn),
                    refresh: &mut plan.refresh,
                    now,
                },
                collect.then_some(&mut sc.keys),
            );
            render_set(
                &rule.tags,
                rr,
                img,
                &ctx.tag_prefix,
                &mut sc.buf,
                &mut ByMode::new(
                    rule.mode,
                    &mut plan.tags,
                    &mut plan.tombstone_tags,
                    self.lsn,
                ),
                collect.then_some(&mut sc.tags),
            );
            render_set(
                &rule.versions,
                rr,
                img,
                &ctx.version_prefix,
                &mut sc.buf,
                &mut plan.versions,
                collect.then_some(&mut sc.versions),
            );
            render_set(
                &rule.patterns,
                rr,
                img,
                "",
                &mut sc.buf,
                &mut Patterns {
                    set: &mut plan.patterns,
                    refresh: &mut plan.refresh,
                    now,
                },
                None,
            );
        }
        for (rf, resolved) in rule.refresh.iter().zip(&rr.refresh) {
            self.plan_refresh(
                rule.mode, rf, resolved, rr, change.op, primary, secondary, collect,
            );
        }
        if rule.channels.is_empty() {
            return Ok(());
        }
        if collect {
            let sc = &mut self.scratch;
            for v in [&mut sc.keys, &mut sc.tags, &mut sc.versions] {
                v.sort_unstable();
                v.dedup();
            }
        }
        for ch in &rule.channels {
            let message = match &ch.message {
                None => serde_json::to_string(&DefaultMessage {
                    table,
                    op: change.op.as_str(),
                    lsn: self.lsn.to_string(),
                    keys: &self.scratch.keys,
                    tags: &self.scratch.tags,
                    versions: &self.scratch.versions,
                    epoch: &self.ctx.epoch,
                }),
                Some(shape) => {
                    let v = render_shape(shape, rr, primary, &mut self.scratch.buf);
                    serde_json::to_string(&v)
                }
            };
            if let Ok(message) = message {
                self.add_message(&ch.channel, message, table);
            }
        }
        Ok(())
    }

    /// One `refresh` entry for one change: DELETE unlinks the key of the old
    /// row; INSERT and UPDATE set the key of the new row (a moved row's old
    /// key is unlinked). A value that cannot be rendered unlinks its key
    /// instead, recorded as a refresh fallback.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn plan_refresh(
        &mut self,
        mode: Mode,
        rf: &Refresh,
        resolved: &ResolvedRefresh,
        rr: &ResolvedRule,
        op: Op,
        primary: Image<'_>,
        secondary: Option<Image<'_>>,
        collect: bool,
    ) {
        let now = self.now();
        // A key that is only unlinked renders into the scratch buffer; only
        // the key that is set is allocated.
        let mut unlinked = std::mem::take(&mut self.scratch.buf);
        unlinked.clear();
        if op == Op::Delete {
            if rf
                .key
                .render_into(&mut unlinked, |i| value_text(rr, primary, i))
                .is_ok()
            {
                self.unlink(mode, &unlinked, now, collect);
            }
            self.scratch.buf = unlinked;
            return;
        }
        let mut key = String::new();
        let new_key = rf
            .key
            .render_into(&mut key, |i| value_text(rr, primary, i))
            .is_ok();
        if let Some(old) = secondary {
            if rf
                .key
                .render_into(&mut unlinked, |i| value_text(rr, old, i))
                .is_ok()
                && (!new_key || unlinked != key)
            {
                self.unlink(mode, &unlinked, now, collect);
            }
        }
        self.scratch.buf = unlinked;
        if !new_key {
            return; // a NULL in the key: no key
        }
        if collect {
            self.scratch.keys.push(key.clone());
        }
        match render_value(
            rf.format,
            resolved,
            primary.row,
            now,
            self.ctx.max_refresh_bytes,
        ) {
            Ok(value) => refresh::put(
                &mut self.plan.refresh,
                key,
                RefreshSet {
                    value,
                    version: now,
                    ttl_s: rf.ttl_s,
                },
            ),
            Err(fallback) => {
                self.pending_refresh_fallbacks.push(fallback);
                self.unlink(mode, &key, now, false);
            }
        }
    }

    /// Unlinks (or, under `mode = "tombstone"`, tombstones) `key`; a refresh
    /// of it planned by an earlier change is dropped (the later one wins).
    pub(super) fn unlink(&mut self, mode: Mode, key: &str, now: RefreshVersion, collect: bool) {
        let plan = &mut self.plan;
        Unlinks {
            inner: ByMode::new(mode, &mut plan.keys, &mut plan.tombstones, now.lsn),
            refresh: &mut plan.refresh,
            now,
        }
        .add(key);
        if collect {
            self.scratch.keys.push(key.to_owned());
        }
    }
}
