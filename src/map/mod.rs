//! Mapping files: the declarative table -> invalidation language.
//!
//! [`Mappings::load`] reads `mappings/*.toml` (see README, "Mapping
//! format"), validates every `[[table]]` entry into a [`Rule`] whose templates
//! are compiled once, and reports every problem with file:line:column.
//! Rendering rows into invalidations lives in [`crate::plan::planner`];
//! [`identity`] holds the replica-identity rule and [`catalog`] the checks
//! against a catalog snapshot.

pub mod catalog;
pub mod glob;
pub mod glob_set;
pub mod identity;
mod raw;
pub mod template;
mod validate;

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use crate::decode::Op;
use crate::diag::{Diagnostic, LoadError};
use raw::{RawChannel, RawFile, RawRefresh, RawRule, RawShape, RawTruncate};
pub use template::{Template, TemplateError};
use validate::Validator;

/// A table as mappings name it: `schema.table` (schema defaults to `public`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    /// Schema, as in the catalog.
    pub schema: String,
    /// Table, as in the catalog.
    pub name: String,
}

impl TableName {
    /// Parses `schema.table` or `table` (schema `public`).
    pub fn parse(s: &str) -> Result<TableName, String> {
        let (schema, name) = match s.split_once('.') {
            Some((schema, name)) => (schema, name),
            None => ("public", s),
        };
        if schema.is_empty() || name.is_empty() || name.contains('.') {
            return Err(format!(
                "invalid table name {s:?}: write \"table\" or \"schema.table\" (schema defaults to public)"
            ));
        }
        Ok(TableName {
            schema: schema.to_owned(),
            name: name.to_owned(),
        })
    }

    /// `"schema"."table"`, quoted for SQL (paste-able into psql).
    pub fn quoted(&self) -> String {
        format!(
            "\"{}\".\"{}\"",
            self.schema.replace('"', "\"\""),
            self.name.replace('"', "\"\"")
        )
    }

    /// True when this names the given schema and table.
    pub fn is(&self, schema: &str, name: &str) -> bool {
        self.schema == schema && self.name == name
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Where a rule was written (its `name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The mapping file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// The row operations a rule fires on (`on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpSet {
    /// INSERT.
    pub insert: bool,
    /// UPDATE.
    pub update: bool,
    /// DELETE.
    pub delete: bool,
}

impl OpSet {
    /// All three (the default).
    pub const ALL: OpSet = OpSet {
        insert: true,
        update: true,
        delete: true,
    };

    /// Whether the rule fires on `op` (TRUNCATE always fires the truncate invalidations).
    pub fn contains(self, op: Op) -> bool {
        match op {
            Op::Insert => self.insert,
            Op::Update => self.update,
            Op::Delete => self.delete,
            Op::Truncate => true,
        }
    }
}

/// A message shape: JSON whose string leaves are templates rendered from the row.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// A string template.
    Text(Template),
    /// A number or boolean, copied as is.
    Literal(serde_json::Value),
    /// An array of shapes.
    Array(Vec<Shape>),
    /// An object: keys in file order.
    Object(Vec<(String, Shape)>),
}

/// A `channels` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Channel {
    /// The pub/sub channel.
    pub channel: String,
    /// `None`: the default JSON message (`table`, `op`, `lsn`, `keys`, `tags`,
    /// `versions`, `epoch`); `Some`: a shaped message.
    pub message: Option<Shape>,
}

/// A `channels` entry of a truncate: no placeholders.
#[derive(Debug, Clone, PartialEq)]
pub struct TruncateChannel {
    /// The pub/sub channel.
    pub channel: String,
    /// `None`: the default truncate message `{"table", "op": "truncate", "lsn", "epoch"}`.
    pub message: Option<serde_json::Value>,
}

/// What a TRUNCATE, a fallback or a flush of the rule's table invalidates.
/// Names are without `tag_prefix` / `version_prefix` (the planner adds them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TruncateSpec {
    /// Exact keys to UNLINK.
    pub keys: Vec<String>,
    /// Tag names (the set is `<tag_prefix><tag>`).
    pub tags: Vec<String>,
    /// Version names (the key is `<version_prefix><version>`).
    pub versions: Vec<String>,
    /// Key glob patterns.
    pub patterns: Vec<String>,
    /// Glob patterns over tag names (the planner prefixes the escaped `tag_prefix`).
    pub tag_patterns: Vec<String>,
    /// Glob patterns over version names (the planner prefixes the escaped `version_prefix`).
    pub version_patterns: Vec<String>,
    /// Messages to publish.
    pub channels: Vec<TruncateChannel>,
}

impl TruncateSpec {
    /// True when the truncate invalidates nothing (`truncate = "none"`).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.tags.is_empty()
            && self.versions.is_empty()
            && self.patterns.is_empty()
            && self.tag_patterns.is_empty()
            && self.version_patterns.is_empty()
            && self.channels.is_empty()
    }
}

/// Where a rule's truncate invalidations come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TruncateSource {
    /// Derived from the templates (placeholders -> `*`).
    Derived,
    /// Written in `[table.truncate]`.
    Explicit,
    /// `truncate = "none"`.
    None,
}

/// How a rule invalidates its keys and tag members (`mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// `UNLINK` (the default).
    #[default]
    Delete,
    /// A tombstone carrying the commit LSN, held `[worker] tombstone_ms`, so
    /// guarded fills that read the database before the commit are refused
    /// (see [`crate::cache::tombstone`]). Patterns, truncates, fallbacks and
    /// flushes still UNLINK: a full flush has no row LSN to order against.
    Tombstone,
}

/// How a refreshed value is stored in Redis (`format` of a `refresh` entry).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RefreshFormat {
    /// A string holding a JSON object of the columns, typed by column type
    /// (see `docs/pre-warm.md`), with the reserved member `_lsn` first.
    #[default]
    Json,
    /// A hash: one field per column (PostgreSQL's text; a NULL column has no
    /// field), plus the reserved field `_lsn`.
    Hash,
}

impl RefreshFormat {
    /// The name as mappings write it.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshFormat::Json => "json",
            RefreshFormat::Hash => "hash",
        }
    }
}

/// The reserved JSON member and hash field that carries a refreshed value's
/// commit position (see [`crate::plan::RefreshVersion`]).
pub const REFRESH_LSN_FIELD: &str = "_lsn";

/// A `refresh` entry: INSERT and UPDATE set `key` to the new row, DELETE
/// unlinks it, an UPDATE that moves the row (its key changed) unlinks the
/// old key and sets the new one.
#[derive(Debug, Clone, PartialEq)]
pub struct Refresh {
    /// The key; its placeholders index [`Rule::columns`] like the other templates.
    pub key: Template,
    /// The value's columns, in this order; `None`: every column of the
    /// relation, in table order.
    pub columns: Option<Vec<String>>,
    /// JSON string or hash.
    pub format: RefreshFormat,
    /// Time to live in seconds; `None`: no TTL (the value lives until the
    /// row's next change or delete).
    pub ttl_s: Option<u64>,
}

/// One validated `[[table]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The table.
    pub table: TableName,
    /// Where the rule is written.
    pub location: Location,
    /// Placeholder columns of all templates; [`template::Segment::Column`] indexes this.
    pub columns: Vec<String>,
    /// `keys`.
    pub keys: Vec<Template>,
    /// `tags` (tag names, without `tag_prefix`).
    pub tags: Vec<Template>,
    /// `versions` (version names, without `version_prefix`).
    pub versions: Vec<Template>,
    /// `patterns` (substituted values glob-escaped).
    pub patterns: Vec<Template>,
    /// `channels`.
    pub channels: Vec<Channel>,
    /// `on`.
    pub on: OpSet,
    /// `columns`: an update fires only if one of these changed.
    pub changed_columns: Option<Vec<String>>,
    /// `assume_unchanged`: columns whose old value is taken from the new row.
    pub assume_unchanged: Vec<String>,
    /// `mode`: how the rule's keys and tag members are invalidated.
    pub mode: Mode,
    /// The truncate invalidations.
    pub truncate: TruncateSpec,
    /// Where [`Rule::truncate`] comes from.
    pub truncate_source: TruncateSource,
    /// `refresh`: keys pre-warmed with the new row.
    pub refresh: Vec<Refresh>,
}

impl Rule {
    /// True when some template has placeholders (the rule renders rows).
    pub fn is_row_level(&self) -> bool {
        !self.columns.is_empty()
    }

    /// Which of [`Rule::columns`] the invalidation templates (keys, tags,
    /// versions, patterns, refresh keys) use; the others are only used by shaped messages,
    /// which render from one image and need no old values.
    pub fn invalidation_columns(&self) -> Vec<bool> {
        let mut used = vec![false; self.columns.len()];
        for t in self
            .keys
            .iter()
            .chain(&self.tags)
            .chain(&self.versions)
            .chain(&self.patterns)
            .chain(self.refresh.iter().map(|r| &r.key))
        {
            for seg in t.segments() {
                if let template::Segment::Column(i) = seg {
                    if let Some(u) = used.get_mut(*i) {
                        *u = true;
                    }
                }
            }
        }
        used
    }

    /// True when the rule needs the old image of a change (it fires on update or delete).
    pub fn needs_old_values(&self) -> bool {
        self.on.update || self.on.delete
    }
}

/// A validated set of rules from one or more mapping files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mappings {
    rules: Vec<Rule>,
    files: Vec<PathBuf>,
}

impl Mappings {
    /// Loads a directory (every `*.toml` in it, in name order) or a single file.
    pub fn load(path: &Path) -> Result<Mappings, LoadError> {
        if path.is_dir() {
            Mappings::load_files(&toml_files_in(path)?)
        } else {
            Mappings::load_files(&[path.to_path_buf()])
        }
    }

    /// Loads a list of files. Every problem of every file is reported.
    pub fn load_files(files: &[PathBuf]) -> Result<Mappings, LoadError> {
        let mut sources = Vec::with_capacity(files.len());
        for f in files {
            let text = std::fs::read_to_string(f).map_err(|source| LoadError::Io {
                path: f.clone(),
                source,
            })?;
            sources.push((f.clone(), text));
        }
        Mappings::from_sources(sources.iter().map(|(f, t)| (f.as_path(), t.as_str())))
    }

    /// Parses one mapping file's text; `file` is only used in messages.
    pub fn parse(file: impl AsRef<Path>, source: &str) -> Result<Mappings, LoadError> {
        Mappings::from_sources([(file.as_ref(), source)])
    }

    /// Parses several (file name, text) pairs.
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a Path, &'a str)>,
    ) -> Result<Mappings, LoadError> {
        let mut diags = Vec::new();
        let mut out = Mappings::default();
        for (file, src) in sources {
            out.files.push(file.to_path_buf());
            match toml::from_str::<RawFile>(src) {
                Err(e) => diags.push(Diagnostic::from_toml(file, src, &e)),
                Ok(raw) => {
                    if raw.table.is_empty() {
                        diags.push(Diagnostic::at(
                            file,
                            src,
                            0,
                            "no [[table]] entries: a mapping file holds one or more [[table]] rules",
                        ));
                    }
                    let mut v = Validator {
                        file,
                        src,
                        diags: &mut diags,
                    };
                    for r in raw.table {
                        if let Some(rule) = v.rule(r) {
                            out.rules.push(rule);
                        }
                    }
                }
            }
        }
        if out.files.is_empty() {
            return Err(LoadError::Invalid(vec![Diagnostic {
                file: PathBuf::from("mappings"),
                line: 1,
                column: 1,
                message: "no mapping files found: `mappings` names a directory of *.toml files or a list of files".into(),
            }]));
        }
        if diags.is_empty() {
            Ok(out)
        } else {
            Err(LoadError::Invalid(diags))
        }
    }

    /// Every rule, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The files the rules came from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The rules of one table.
    pub fn rules_for<'a>(&'a self, table: &'a TableName) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| &r.table == table)
    }

    /// The mapped tables.
    pub fn tables(&self) -> BTreeSet<&TableName> {
        self.rules.iter().map(|r| &r.table).collect()
    }
}

/// The `*.toml` files of a directory, sorted by name.
pub fn toml_files_in(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "toml") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(LoadError::NoMappingFiles {
            dir: dir.to_path_buf(),
        });
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests;
