//! Raw `[[table]]` entries -> validated [`Rule`]s: templates compiled,
//! columns and shapes checked, the default truncate derived; every problem
//! reported with file:line:column.

use super::*;

/// Validates raw `[[table]]` entries of one file into [`Rule`]s, collecting
/// every problem as a located [`Diagnostic`].
pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
    pub(super) src: &'a str,
    pub(super) diags: &'a mut Vec<Diagnostic>,
}

/// Where the template text starts inside its quoted TOML string.
fn inner_offset(span: &Range<usize>, offset: usize) -> usize {
    span.start + 1 + offset
}

impl Validator<'_> {
    fn error(&mut self, offset: usize, message: impl Into<String>) {
        self.diags
            .push(Diagnostic::at(self.file, self.src, offset, message));
    }

    fn template(
        &mut self,
        field: &str,
        s: &Spanned<String>,
        escape: bool,
        columns: &mut Vec<String>,
    ) -> Option<Template> {
        let res = Template::compile(s.get_ref(), escape, |name| {
            match columns.iter().position(|c| c == name) {
                Some(i) => i,
                None => {
                    columns.push(name.to_owned());
                    columns.len() - 1
                }
            }
        });
        match res {
            Ok(t) => Some(t),
            Err(e) => {
                self.error(
                    inner_offset(&s.span(), e.offset()),
                    format!("invalid template in `{field}`: {e}"),
                );
                None
            }
        }
    }

    fn templates(
        &mut self,
        field: &str,
        list: &[Spanned<String>],
        escape: bool,
        columns: &mut Vec<String>,
    ) -> Vec<Template> {
        list.iter()
            .filter_map(|s| self.template(field, s, escape, columns))
            .collect()
    }

    fn shape(&mut self, s: &Spanned<RawShape>, columns: &mut Vec<String>) -> Option<Shape> {
        Some(match s.get_ref() {
            RawShape::Str(text) => {
                let spanned = Spanned::new(s.span(), text.clone());
                Shape::Text(self.template("message", &spanned, false, columns)?)
            }
            RawShape::Bool(b) => Shape::Literal((*b).into()),
            RawShape::Int(i) => Shape::Literal((*i).into()),
            RawShape::Float(f) => Shape::Literal(
                serde_json::Number::from_f64(*f)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null),
            ),
            RawShape::Array(items) => {
                let mut out = Vec::new();
                for i in items {
                    out.push(self.shape(i, columns)?);
                }
                Shape::Array(out)
            }
            RawShape::Table(entries) => {
                let mut out = Vec::new();
                for (k, v) in entries {
                    out.push((k.clone(), self.shape(v, columns)?));
                }
                Shape::Object(out)
            }
        })
    }

    fn channel_name(&mut self, s: &Spanned<String>) -> Option<String> {
        if s.get_ref().is_empty() {
            self.error(
                s.span().start,
                "empty channel name: name the pub/sub channel, e.g. \"cache:invalidate\"",
            );
            return None;
        }
        Some(s.get_ref().clone())
    }

    pub(super) fn rule(&mut self, r: RawRule) -> Option<Rule> {
        let errors_before = self.diags.len();
        let table = match TableName::parse(r.name.get_ref()) {
            Ok(t) => Some(t),
            Err(e) => {
                self.error(r.name.span().start, e);
                None
            }
        };
        let (line, column) = crate::diag::line_col(self.src, r.name.span().start);
        let location = Location {
            file: self.file.to_path_buf(),
            line,
            column,
        };

        let mut columns = Vec::new();
        let keys = self.templates("keys", &r.keys, false, &mut columns);
        let tags = self.templates("tags", &r.tags, false, &mut columns);
        let versions = self.templates("versions", &r.versions, false, &mut columns);
        let patterns = self.templates("patterns", &r.patterns, true, &mut columns);
        let mut channels = Vec::new();
        for c in &r.channels {
            match c.get_ref() {
                RawChannel::Name(n) => {
                    let n = Spanned::new(c.span(), n.clone());
                    if let Some(channel) = self.channel_name(&n) {
                        channels.push(Channel {
                            channel,
                            message: None,
                        });
                    }
                }
                RawChannel::Shaped(s) => {
                    let channel = self.channel_name(&s.channel);
                    let message = match &s.message {
                        Some(m) => self.shape(m, &mut columns).map(Some),
                        None => Some(None),
                    };
                    if let (Some(channel), Some(message)) = (channel, message) {
                        channels.push(Channel { channel, message });
                    }
                }
            }
        }
        let refresh: Vec<Refresh> = r
            .refresh
            .iter()
            .filter_map(|x| self.refresh(x, &mut columns))
            .collect();
        if r.keys.is_empty()
            && r.tags.is_empty()
            && r.versions.is_empty()
            && r.patterns.is_empty()
            && r.channels.is_empty()
            && r.refresh.is_empty()
        {
            self.error(
                r.name.span().start,
                format!(
                    "rule for {} invalidates nothing: give it keys, tags, versions, patterns, channels or refresh",
                    r.name.get_ref()
                ),
            );
        }

        let on = match &r.on {
            None => OpSet::ALL,
            Some(list) => {
                let mut set = OpSet {
                    insert: false,
                    update: false,
                    delete: false,
                };
                if list.get_ref().is_empty() {
                    self.error(
                        list.span().start,
                        "empty `on`: list at least one of \"insert\", \"update\", \"delete\" (or remove `on` for all three)",
                    );
                }
                for op in list.get_ref() {
                    match op.get_ref().as_str() {
                        "insert" => set.insert = true,
                        "update" => set.update = true,
                        "delete" => set.delete = true,
                        "truncate" => self.error(
                            op.span().start,
                            "`truncate` is not an `on` value: a TRUNCATE always fires the rule's truncate invalidations; allowed: insert, update, delete",
                        ),
                        other => {
                            let hint = crate::diag::suggest(other, ["insert", "update", "delete"])
                                .map(|s| format!(": did you mean \"{s}\"?"))
                                .unwrap_or_default();
                            self.error(
                                op.span().start,
                                format!("unknown operation \"{other}\" in `on`{hint}; allowed: insert, update, delete"),
                            )
                        }
                    }
                }
                set
            }
        };

        let changed_columns = match &r.columns {
            None => None,
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.error(
                        list.span().start,
                        "empty `columns`: list the columns whose change fires an update, or remove `columns`",
                    );
                }
                self.column_names("columns", list.get_ref());
                Some(list.get_ref().iter().map(|s| s.get_ref().clone()).collect())
            }
        };
        self.column_names("assume_unchanged", &r.assume_unchanged);
        let assume_unchanged = r
            .assume_unchanged
            .iter()
            .map(|s| s.get_ref().clone())
            .collect();

        let mut mode = Mode::Delete;
        if let Some(m) = &r.mode {
            match m.get_ref().as_str() {
                "delete" => {}
                "tombstone" => mode = Mode::Tombstone,
                other => {
                    let hint = crate::diag::suggest(other, ["delete", "tombstone"])
                        .map(|s| format!(": did you mean \"{s}\"?"))
                        .unwrap_or_default();
                    self.error(
                        m.span().start,
                        format!(
                            "unknown mode \"{other}\"{hint}; allowed: \"delete\", \"tombstone\""
                        ),
                    )
                }
            }
        }

        let (truncate, truncate_source) = match &r.truncate {
            None => (
                derive_truncate(&keys, &tags, &versions, &patterns, &channels, &refresh),
                TruncateSource::Derived,
            ),
            Some(t) => match t.get_ref() {
                RawTruncate::None => (TruncateSpec::default(), TruncateSource::None),
                RawTruncate::Table(t) => (self.explicit_truncate(t), TruncateSource::Explicit),
            },
        };

        if self.diags.len() > errors_before {
            return None;
        }
        Some(Rule {
            table: table?,
            location,
            columns,
            keys,
            tags,
            versions,
            patterns,
            channels,
            on,
            changed_columns,
            assume_unchanged,
            mode,
            truncate,
            truncate_source,
            refresh,
        })
    }

    fn refresh(&mut self, r: &Spanned<RawRefresh>, columns: &mut Vec<String>) -> Option<Refresh> {
        let raw = r.get_ref();
        let errors_before = self.diags.len();
        let key = self.template("refresh.key", &raw.key, false, columns);
        if let Some(k) = &key {
            if k.literal().is_some() {
                self.error(
                    raw.key.span().start,
                    "`refresh.key` has no placeholder: every row would overwrite the same key; write e.g. \"user:{id}:profile\"",
                );
            }
        }
        let value_columns = raw.columns.as_ref().map(|list| {
            if list.get_ref().is_empty() {
                self.error(
                    list.span().start,
                    "empty `refresh.columns`: list the columns of the value, or remove `columns` for every column",
                );
            }
            self.column_names("refresh.columns", list.get_ref());
            let mut names: Vec<String> = Vec::new();
            for c in list.get_ref() {
                if c.get_ref() == REFRESH_LSN_FIELD {
                    self.error(
                        c.span().start,
                        format!("`{REFRESH_LSN_FIELD}` is reserved in refreshed values (it carries the commit LSN): leave it out of `refresh.columns`"),
                    );
                } else if names.contains(c.get_ref()) {
                    self.error(c.span().start, format!("column {:?} twice in `refresh.columns`", c.get_ref()));
                } else {
                    names.push(c.get_ref().clone());
                }
            }
            names
        });
        let format = match &raw.format {
            None => RefreshFormat::Json,
            Some(f) => {
                match f.get_ref().as_str() {
                    "json" => RefreshFormat::Json,
                    "hash" => RefreshFormat::Hash,
                    other => {
                        let hint = crate::diag::suggest(other, ["json", "hash"])
                            .map(|s| format!(": did you mean \"{s}\"?"))
                            .unwrap_or_default();
                        self.error(
                        f.span().start,
                        format!("unknown refresh format \"{other}\"{hint}; allowed: \"json\", \"hash\""),
                    );
                        RefreshFormat::Json
                    }
                }
            }
        };
        let ttl_s = match &raw.ttl_s {
            None => None,
            Some(t) if *t.get_ref() <= 0 => {
                self.error(
                    t.span().start,
                    format!(
                        "ttl_s = {}: a TTL is at least 1 second (remove ttl_s for no TTL)",
                        t.get_ref()
                    ),
                );
                None
            }
            Some(t) => u64::try_from(*t.get_ref()).ok(),
        };
        if self.diags.len() > errors_before {
            return None;
        }
        Some(Refresh {
            key: key?,
            columns: value_columns,
            format,
            ttl_s,
        })
    }

    fn column_names(&mut self, field: &str, list: &[Spanned<String>]) {
        for c in list {
            if c.get_ref().is_empty() {
                self.error(c.span().start, format!("empty column name in `{field}`"));
            }
        }
    }

    fn literal(&mut self, field: &str, s: &Spanned<String>) -> Option<String> {
        let t = self.template(&format!("truncate.{field}"), s, false, &mut Vec::new())?;
        match t.literal() {
            Some(l) => Some(l),
            None => {
                let at = s.get_ref().find('{').unwrap_or(0);
                self.error(
                    inner_offset(&s.span(), at),
                    format!(
                        "placeholder in `truncate.{field}`: a truncate has no row to render; write fixed names or patterns (e.g. \"user:*\")"
                    ),
                );
                None
            }
        }
    }

    fn literal_shape(&mut self, s: &Spanned<RawShape>) -> Option<serde_json::Value> {
        Some(match s.get_ref() {
            RawShape::Str(text) => {
                let spanned = Spanned::new(s.span(), text.clone());
                serde_json::Value::String(self.literal("channels.message", &spanned)?)
            }
            RawShape::Bool(b) => (*b).into(),
            RawShape::Int(i) => (*i).into(),
            RawShape::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            RawShape::Array(items) => {
                let mut out = Vec::new();
                for i in items {
                    out.push(self.literal_shape(i)?);
                }
                serde_json::Value::Array(out)
            }
            RawShape::Table(entries) => {
                let mut out = serde_json::Map::new();
                for (k, v) in entries {
                    out.insert(k.clone(), self.literal_shape(v)?);
                }
                serde_json::Value::Object(out)
            }
        })
    }

    fn explicit_truncate(&mut self, t: &raw::RawTruncateTable) -> TruncateSpec {
        let mut spec = TruncateSpec::default();
        for (field, list, out) in [
            ("keys", &t.keys, &mut spec.keys),
            ("tags", &t.tags, &mut spec.tags),
            ("versions", &t.versions, &mut spec.versions),
            ("patterns", &t.patterns, &mut spec.patterns),
        ] {
            for s in list {
                if let Some(l) = self.literal(field, s) {
                    out.push(l);
                }
            }
        }
        for c in &t.channels {
            match c.get_ref() {
                RawChannel::Name(n) => {
                    let n = Spanned::new(c.span(), n.clone());
                    if let Some(channel) = self.channel_name(&n) {
                        spec.channels.push(TruncateChannel {
                            channel,
                            message: None,
                        });
                    }
                }
                RawChannel::Shaped(s) => {
                    let channel = self.channel_name(&s.channel);
                    let message = match &s.message {
                        Some(m) => self.literal_shape(m).map(Some),
                        None => Some(None),
                    };
                    if let (Some(channel), Some(message)) = (channel, message) {
                        spec.channels.push(TruncateChannel { channel, message });
                    }
                }
            }
        }
        spec
    }
}

/// The default truncate: every template with its placeholders replaced by `*`.
fn derive_truncate(
    keys: &[Template],
    tags: &[Template],
    versions: &[Template],
    patterns: &[Template],
    channels: &[Channel],
    refresh: &[Refresh],
) -> TruncateSpec {
    let mut spec = TruncateSpec::default();
    let split = |list: &[Template], exact: &mut Vec<String>, wild: &mut Vec<String>| {
        for t in list {
            match t.literal() {
                Some(l) => exact.push(l),
                None => wild.push(t.to_wildcard_pattern()),
            }
        }
    };
    split(keys, &mut spec.keys, &mut spec.patterns);
    for r in refresh {
        spec.patterns.push(r.key.to_wildcard_pattern());
    }
    split(tags, &mut spec.tags, &mut spec.tag_patterns);
    split(versions, &mut spec.versions, &mut spec.version_patterns);
    for p in patterns {
        spec.patterns.push(p.to_wildcard_pattern());
    }
    for c in channels {
        spec.channels.push(TruncateChannel {
            channel: c.channel.clone(),
            message: None,
        });
    }
    spec.patterns.dedup();
    spec
}
