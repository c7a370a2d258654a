//! Located diagnostics for config and mapping files: `file:line:column: what is
//! wrong; what is allowed`, shared by [`crate::config`] and [`crate::map`].
//!
//! TOML errors carry byte spans; this module turns them into line and column
//! numbers, rewrites serde's "unknown field" messages so they list the valid
//! names and suggest the near miss (`kyes` -> `keys`).

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in a file, with its 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic at byte `offset` of `source`.
    pub fn at(file: &Path, source: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, column) = line_col(source, offset);
        Diagnostic {
            file: file.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    /// Converts a TOML parse or deserialization error, improving serde's messages.
    pub fn from_toml(file: &Path, source: &str, err: &toml::de::Error) -> Self {
        let offset = err.span().map(|s| s.start).unwrap_or(0);
        Diagnostic::at(file, source, offset, improve_message(err.message()))
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Why a config or mapping file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read (the OS error is part of the message:
    /// callers often keep only the text).
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The mappings directory holds no `*.toml` file.
    #[error("the mappings directory {} holds no *.toml file: add a mapping file with [[table]] rules there, or point `mappings` at the right directory", dir.display())]
    NoMappingFiles {
        /// The directory.
        dir: PathBuf,
    },
    /// The file was read but is invalid; every problem found is listed.
    #[error("{}", DisplayAll(.0))]
    Invalid(Vec<Diagnostic>),
}

impl LoadError {
    /// The diagnostics, if the error is about the content.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            LoadError::Invalid(d) => d,
            LoadError::Io { .. } | LoadError::NoMappingFiles { .. } => &[],
        }
    }
}

struct DisplayAll<'a>(&'a [Diagnostic]);

impl fmt::Display for DisplayAll<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// 1-based line and column (in characters) of byte `offset` in `source`.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Edit distance between two short names (optimal string alignment: insert,
/// delete, substitute, or swap two adjacent characters, each costing 1).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for (i, row) in d.chunks_mut(w).enumerate() {
        row[0] = i;
    }
    for (j, cell) in d.iter_mut().take(w).enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[(i - 1) * w + j] + 1)
                .min(d[i * w + j - 1] + 1)
                .min(d[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[(i - 2) * w + j - 2] + 1);
            }
            d[i * w + j] = v;
        }
    }
    d[a.len() * w + b.len()]
}

/// The candidate closest to `name`, if it is a plausible typo (distance at most
/// a third of the longer name, and at least 1 edit allowed).
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count().max(3)) / 3;
    let candidates: Vec<&'a str> = candidates.into_iter().collect();
    // A difference of case alone (`{ID}` for `id`) is the likeliest mistake.
    if let Some(c) = candidates
        .iter()
        .find(|c| **c != name && c.to_lowercase() == name.to_lowercase())
    {
        return Some(c);
    }
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= limit.max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Rewrites serde's `unknown field `x`, expected one of `a`, `b`` (and the
/// `unknown variant` twin) into a message that lists the allowed names and
/// suggests the near miss. Other messages are kept.
pub fn improve_message(message: &str) -> String {
    let message = message.trim_end();
    for (prefix, what) in [("unknown field `", "field"), ("unknown variant `", "value")] {
        let Some(rest) = message.strip_prefix(prefix) else {
            continue;
        };
        let Some((name, tail)) = rest.split_once('`') else {
            continue;
        };
        let allowed: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
        let mut out = format!("unknown {what} `{name}`");
        if let Some(s) = suggest(name, allowed.iter().copied()) {
            out.push_str(&format!(": did you mean `{s}`?"));
        }
        if allowed.is_empty() {
            out.push_str(&format!("; no {what}s are allowed here"));
        } else {
            out.push_str(&format!("; allowed {what}s: {}", allowed.join(", ")));
        }
        return out;
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_difference_of_case_is_suggested_first() {
        assert_eq!(suggest("ID", ["id", "uid"]), Some("id"));
        assert_eq!(suggest("Users", ["users", "user"]), Some("users"));
    }

    use super::*;

    #[test]
    fn line_and_column_from_offset() {
        let src = "a = 1\nbé = 2\nc";
        assert_eq!(line_col(src, 0), (1, 1));
        assert_eq!(line_col(src, 6), (2, 1));
        assert_eq!(line_col(src, 9), (2, 3)); // after the two-byte é
        assert_eq!(line_col(src, 1000), (3, 2));
    }

    #[test]
    fn suggests_near_misses_only() {
        let fields = ["name", "keys", "tags", "versions", "patterns"];
        assert_eq!(suggest("kyes", fields), Some("keys"));
        assert_eq!(suggest("version", fields), Some("versions"));
        assert_eq!(suggest("colour", fields), None);
        assert_eq!(suggest("tabel", ["table"]), Some("table"));
        assert_eq!(edit_distance("kyes", "keys"), 1);
    }

    #[test]
    fn rewrites_unknown_field() {
        let m = improve_message("unknown field `kyes`, expected one of `name`, `keys`, `tags`");
        assert_eq!(
            m,
            "unknown field `kyes`: did you mean `keys`?; allowed fields: name, keys, tags"
        );
        let m = improve_message("unknown field `x`, expected `channel`");
        assert_eq!(m, "unknown field `x`; allowed fields: channel");
    }
}
