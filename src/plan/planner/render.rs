//! Rules resolved against a relation (column positions once per Relation
//! message) and rendering their templates from a row image.

use super::*;

pub(super) fn resolve_rule(index: usize, rule: &Rule, rel: &Relation) -> ResolvedRule {
    let cols: Vec<Option<usize>> = rule.columns.iter().map(|c| rel.column_index(c)).collect();
    let assumed: Vec<bool> = rule
        .columns
        .iter()
        .map(|c| rule.assume_unchanged.contains(c))
        .collect();
    let in_keys = rule.invalidation_columns();
    let full = rel.replica_identity == b'f';
    let old_implied = full
        || rule
            .columns
            .iter()
            .zip(&cols)
            .zip(&in_keys)
            .zip(&assumed)
            .all(|(((_, idx), used), assumed)| {
                !*used
                    || *assumed
                    || idx.is_some_and(|i| rel.columns.get(i).is_some_and(|c| c.is_key))
            });
    ResolvedRule {
        rule: index,
        changed: rule
            .changed_columns
            .as_ref()
            .map(|cs| cs.iter().map(|c| rel.column_index(c)).collect()),
        cols,
        assumed,
        in_keys,
        old_implied,
        refresh: rule
            .refresh
            .iter()
            .map(|r| resolve_refresh(r, rel))
            .collect(),
    }
}

pub(super) fn resolve_refresh(r: &Refresh, rel: &Relation) -> ResolvedRefresh {
    let column = |name: &str, idx: Option<usize>| {
        let mut json_prefix = String::from(",");
        refresh::push_json_str(&mut json_prefix, name);
        json_prefix.push(':');
        ValueColumn {
            idx,
            name: Arc::from(name),
            json_prefix,
            kind: idx
                .and_then(|i| rel.columns.get(i))
                .map_or(ValueKind::Text, |c| ValueKind::of(c.type_oid)),
        }
    };
    let cols = match &r.columns {
        Some(names) => names
            .iter()
            .map(|n| column(n, rel.column_index(n)))
            .collect(),
        // Every column; a column named like the reserved field is left out
        // (`check` refuses it).
        None => rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.name != REFRESH_LSN_FIELD)
            .map(|(i, c)| column(&c.name, Some(i)))
            .collect(),
    };
    ResolvedRefresh { cols }
}

/// Renders a refreshed value from the new row; `Err` names why it cannot be
/// set (its key is unlinked instead).
pub(super) fn render_value(
    format: RefreshFormat,
    rf: &ResolvedRefresh,
    row: &Row,
    version: RefreshVersion,
    max_bytes: usize,
) -> Result<RefreshValue, (FallbackReason, Option<Arc<str>>)> {
    let value = |c: &ValueColumn| -> Result<&Value, (FallbackReason, Option<Arc<str>>)> {
        let idx = c.idx.ok_or((
            FallbackReason::RefreshMissingColumn,
            Some(Arc::clone(&c.name)),
        ))?;
        match row.get(idx) {
            None => Err((
                FallbackReason::RefreshMissingColumn,
                Some(Arc::clone(&c.name)),
            )),
            Some(Value::Unknown) => Err((
                FallbackReason::RefreshUnknownValue,
                Some(Arc::clone(&c.name)),
            )),
            Some(v) => Ok(v),
        }
    };
    let too_large = || (FallbackReason::RefreshTooLarge, None);
    match format {
        RefreshFormat::Json => {
            let mut out = String::with_capacity(64 + 24 * rf.cols.len());
            out.push_str("{\"");
            out.push_str(REFRESH_LSN_FIELD);
            out.push_str("\":\"");
            use std::fmt::Write;
            let _ = write!(out, "{version}");
            out.push('"');
            for c in &rf.cols {
                let v = value(c)?;
                out.push_str(&c.json_prefix);
                match v {
                    Value::Text(t) => refresh::push_json_value(&mut out, c.kind, t),
                    _ => out.push_str("null"),
                }
                if out.len() > max_bytes {
                    return Err(too_large());
                }
            }
            out.push('}');
            if out.len() > max_bytes {
                return Err(too_large());
            }
            Ok(RefreshValue::Json(out))
        }
        RefreshFormat::Hash => {
            let mut fields = Vec::with_capacity(rf.cols.len() + 1);
            let mut len = 0;
            fields.push((REFRESH_LSN_FIELD.to_owned(), version.to_string()));
            for c in &rf.cols {
                if let Value::Text(t) = value(c)? {
                    len += c.name.len() + t.len();
                    if len > max_bytes {
                        return Err(too_large());
                    }
                    fields.push((c.name.to_string(), t.to_string()));
                }
            }
            Ok(RefreshValue::Hash(fields))
        }
    }
}

/// Whether an UPDATE passes the rule's `columns` filter.
pub(super) fn update_fires(rr: &ResolvedRule, change: &Change) -> bool {
    let Some(cols) = &rr.changed else {
        return true;
    };
    let Some(new) = &change.new else {
        return true;
    };
    for idx in cols {
        let Some(i) = idx else {
            return true; // column missing: cannot tell
        };
        let n = new.get(*i);
        if matches!(n, Some(Value::Unknown)) {
            continue; // unchanged TOAST: not changed
        }
        let Some(old) = &change.old else {
            return true; // no old row: cannot tell
        };
        match old.get(*i) {
            None | Some(Value::Unknown) => return true,
            Some(o) if Some(o) != n => return true,
            Some(_) => {}
        }
    }
    false
}

#[inline]
pub(super) fn lookup<'a>(
    rr: &ResolvedRule,
    img: Image<'a>,
    i: usize,
) -> Result<&'a Value, FallbackReason> {
    let idx = rr.cols[i].ok_or(FallbackReason::MissingColumn)?;
    let row = match img.new {
        Some(new) if rr.assumed[i] => new,
        _ => img.row,
    };
    row.get(idx).ok_or(FallbackReason::UnknownValue)
}

pub(super) fn check_known(
    rr: &ResolvedRule,
    img: Image<'_>,
    i: usize,
    max_len: usize,
) -> Result<(), (FallbackReason, Option<usize>)> {
    match lookup(rr, img, i) {
        Ok(Value::Unknown) => Err((FallbackReason::UnknownValue, Some(i))),
        Ok(Value::Text(s)) if s.len() > max_len => Err((FallbackReason::ValueTooLong, Some(i))),
        Ok(_) => Ok(()),
        Err(r) => Err((r, Some(i))),
    }
}

#[inline]
pub(super) fn value_text<'a>(
    rr: &ResolvedRule,
    img: Image<'a>,
    i: usize,
) -> Result<&'a str, Missing> {
    match lookup(rr, img, i) {
        Ok(Value::Text(s)) => Ok(s),
        Ok(Value::Null) => Err(Missing::Null),
        _ => Err(Missing::Unknown),
    }
}

/// Where [`render_set`] puts rendered names: a plain set, or a map keeping
/// the highest commit LSN per name (tombstones).
pub(super) trait RenderTarget {
    fn add(&mut self, name: &str);
}

impl RenderTarget for crate::plan::KeySet {
    fn add(&mut self, name: &str) {
        self.insert(name);
    }
}

/// Tombstone names at one commit LSN; an entry only ever moves to a higher LSN.
pub(super) struct AtLsn<'a>(pub(super) &'a mut crate::plan::LsnMap, pub(super) Lsn);

impl RenderTarget for AtLsn<'_> {
    fn add(&mut self, name: &str) {
        match self.0.get_mut(name) {
            Some(lsn) => *lsn = (*lsn).max(self.1),
            None => {
                self.0.insert(name.to_owned(), self.1);
            }
        }
    }
}

/// Where a rule's keys (or tag sets) go, by its [`Mode`]: a plain set to
/// unlink, or tombstones at the commit LSN.
pub(super) enum ByMode<'a> {
    Unlink(&'a mut crate::plan::KeySet),
    Tombstone(AtLsn<'a>),
}

impl<'a> ByMode<'a> {
    /// `unlink` under [`Mode::Delete`], `tombstones` at `lsn` under [`Mode::Tombstone`].
    pub(super) fn new(
        mode: Mode,
        unlink: &'a mut crate::plan::KeySet,
        tombstones: &'a mut crate::plan::LsnMap,
        lsn: Lsn,
    ) -> Self {
        match mode {
            Mode::Delete => ByMode::Unlink(unlink),
            Mode::Tombstone => ByMode::Tombstone(AtLsn(tombstones, lsn)),
        }
    }
}

impl RenderTarget for ByMode<'_> {
    fn add(&mut self, name: &str) {
        match self {
            ByMode::Unlink(set) => set.add(name),
            ByMode::Tombstone(at) => at.add(name),
        }
    }
}

/// Keys to unlink or tombstone: a refresh of the same key planned by an
/// earlier change is dropped (the later change wins; one of the same change
/// stays, and the sink sets it after the deletes).
pub(super) struct Unlinks<'a, T> {
    pub(super) inner: T,
    pub(super) refresh: &'a mut crate::plan::RefreshMap,
    pub(super) now: RefreshVersion,
}

impl<T: RenderTarget> RenderTarget for Unlinks<'_, T> {
    fn add(&mut self, name: &str) {
        if !self.refresh.is_empty() && self.refresh.get(name).is_some_and(|r| r.version < self.now)
        {
            self.refresh.remove(name);
        }
        self.inner.add(name);
    }
}

/// Row-level patterns: a new pattern drops the refreshes of earlier changes it matches.
pub(super) struct Patterns<'a> {
    pub(super) set: &'a mut crate::plan::KeySet,
    pub(super) refresh: &'a mut crate::plan::RefreshMap,
    pub(super) now: RefreshVersion,
}

impl RenderTarget for Patterns<'_> {
    fn add(&mut self, name: &str) {
        if self.set.insert(name) && !self.refresh.is_empty() {
            let now = self.now;
            self.refresh.retain(|key, set| {
                set.version >= now || !glob::glob_match(name.as_bytes(), key.as_bytes())
            });
        }
    }
}

pub(super) fn render_set(
    templates: &[Template],
    rr: &ResolvedRule,
    img: Image<'_>,
    prefix: &str,
    buf: &mut String,
    set: &mut impl RenderTarget,
    mut collect: Option<&mut Vec<String>>,
) {
    for t in templates {
        buf.clear();
        buf.push_str(prefix);
        if t.render_into(buf, |i| value_text(rr, img, i)).is_err() {
            continue; // NULL renders nothing (unknown values were checked before)
        }
        set.add(buf);
        if let Some(c) = collect.as_deref_mut() {
            c.push(buf.clone());
        }
    }
}

pub(super) fn render_shape(
    shape: &Shape,
    rr: &ResolvedRule,
    img: Image<'_>,
    buf: &mut String,
) -> serde_json::Value {
    match shape {
        Shape::Text(t) => {
            buf.clear();
            match t.render_into(buf, |i| value_text(rr, img, i)) {
                Ok(()) => serde_json::Value::String(buf.clone()),
                Err(_) => serde_json::Value::Null,
            }
        }
        Shape::Literal(v) => v.clone(),
        Shape::Array(items) => serde_json::Value::Array(
            items
                .iter()
                .map(|s| render_shape(s, rr, img, buf))
                .collect(),
        ),
        Shape::Object(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, s)| (k.clone(), render_shape(s, rr, img, buf)))
                .collect(),
        ),
    }
}
