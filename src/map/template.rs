//! Templates like `"user:{id}:profile"`, compiled once at load into literal
//! and column segments, rendered per row into a reused buffer.

use std::fmt;

use super::glob;

/// Why a template string is invalid. Offsets are byte offsets inside the template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `""`.
    #[error("empty template: write the key, e.g. \"user:{{id}}\"")]
    Empty,
    /// `{` with no closing `}`.
    #[error("unclosed `{{` at offset {0}: close the placeholder with `}}` or write `{{{{` for a literal brace")]
    Unclosed(usize),
    /// `}` with no opening `{`.
    #[error("unmatched `}}` at offset {0}: write `}}}}` for a literal brace")]
    Unmatched(usize),
    /// `{}`.
    #[error("empty placeholder `{{}}` at offset {0}: name a column, e.g. `{{id}}`")]
    EmptyPlaceholder(usize),
    /// `{a{b}`.
    #[error("`{{` inside a placeholder at offset {0}: a placeholder is one column name")]
    Nested(usize),
}

impl TemplateError {
    /// Byte offset of the problem inside the template.
    pub fn offset(&self) -> usize {
        match self {
            TemplateError::Empty => 0,
            TemplateError::Unclosed(o)
            | TemplateError::Unmatched(o)
            | TemplateError::EmptyPlaceholder(o)
            | TemplateError::Nested(o) => *o,
        }
    }
}

/// One piece of a compiled template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Literal text (braces already unescaped).
    Literal(String),
    /// A column placeholder: index into the owning rule's column list.
    Column(usize),
}

/// A compiled template. Column placeholders refer to the owning rule's column
/// list (see [`super::Rule::columns`]), so a row's values are resolved once per rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    segments: Vec<Segment>,
    /// Glob-escape substituted values (templates in `patterns`).
    escape: bool,
}

/// A placeholder value a template could not render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// The value is NULL: the template renders nothing.
    Null,
    /// The value is unknown (not sent) or the column is missing: fall back.
    Unknown,
}

impl Template {
    /// Compiles `source`; `intern` maps a placeholder's column name to its index
    /// in the owning rule's column list.
    pub fn compile(
        source: &str,
        escape: bool,
        mut intern: impl FnMut(&str) -> usize,
    ) -> Result<Template, TemplateError> {
        if source.is_empty() {
            return Err(TemplateError::Empty);
        }
        let bytes = source.as_bytes();
        let mut segments = Vec::new();
        let mut lit = String::new();
        let mut i = 0;
        let mut lit_start = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'{' if bytes.get(i + 1) == Some(&b'{') => {
                    lit.push_str(&source[lit_start..i]);
                    lit.push('{');
                    i += 2;
                    lit_start = i;
                }
                b'}' if bytes.get(i + 1) == Some(&b'}') => {
                    lit.push_str(&source[lit_start..i]);
                    lit.push('}');
                    i += 2;
                    lit_start = i;
                }
                b'}' => return Err(TemplateError::Unmatched(i)),
                b'{' => {
                    lit.push_str(&source[lit_start..i]);
                    let open = i;
                    let mut j = i + 1;
                    loop {
                        match bytes.get(j) {
                            None => return Err(TemplateError::Unclosed(open)),
                            Some(b'}') => break,
                            Some(b'{') => return Err(TemplateError::Nested(j)),
                            Some(_) => j += 1,
                        }
                    }
                    let name = &source[open + 1..j];
                    if name.is_empty() {
                        return Err(TemplateError::EmptyPlaceholder(open));
                    }
                    if !lit.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut lit)));
                    }
                    segments.push(Segment::Column(intern(name)));
                    i = j + 1;
                    lit_start = i;
                }
                _ => i += 1,
            }
        }
        lit.push_str(&source[lit_start..]);
        if !lit.is_empty() {
            segments.push(Segment::Literal(lit));
        }
        Ok(Template {
            source: source.to_owned(),
            segments,
            escape,
        })
    }

    /// Column names of the placeholders of `source`, in order (for validation
    /// before interning). Errors as [`Template::compile`].
    pub fn placeholders(source: &str) -> Result<Vec<String>, TemplateError> {
        let mut names = Vec::new();
        Template::compile(source, false, |n| {
            names.push(n.to_owned());
            names.len() - 1
        })?;
        Ok(names)
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The compiled segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// True when the template has at least one placeholder.
    pub fn has_placeholders(&self) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Column(_)))
    }

    /// Renders by appending to `out`. `value(i)` gives the text of the rule's
    /// column `i`, or why it has none. On `Err`, `out` holds a partial rendering.
    #[inline]
    pub fn render_into<'v>(
        &self,
        out: &mut String,
        mut value: impl FnMut(usize) -> Result<&'v str, Missing>,
    ) -> Result<(), Missing> {
        for seg in &self.segments {
            match seg {
                Segment::Literal(s) => out.push_str(s),
                Segment::Column(i) => {
                    let v = value(*i)?;
                    if self.escape {
                        glob::escape_into(v, out);
                    } else {
                        out.push_str(v);
                    }
                }
            }
        }
        Ok(())
    }

    /// The glob pattern covering every rendering: placeholders become `*`.
    /// Literal parts are glob-escaped unless the template is itself a pattern
    /// (whose literal parts keep their glob meaning).
    pub fn to_wildcard_pattern(&self) -> String {
        let mut out = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Literal(s) if self.escape => out.push_str(s),
                Segment::Literal(s) => glob::escape_into(s, &mut out),
                Segment::Column(_) => {
                    if !out.ends_with('*') {
                        out.push('*');
                    }
                }
            }
        }
        out
    }

    /// The literal text of a template without placeholders.
    pub fn literal(&self) -> Option<String> {
        let mut out = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Literal(s) => out.push_str(s),
                Segment::Column(_) => return None,
            }
        }
        Some(out)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(s: &str, escape: bool) -> Result<(Template, Vec<String>), TemplateError> {
        let mut cols: Vec<String> = Vec::new();
        let t = Template::compile(s, escape, |n| match cols.iter().position(|c| c == n) {
            Some(i) => i,
            None => {
                cols.push(n.to_owned());
                cols.len() - 1
            }
        })?;
        Ok((t, cols))
    }

    fn render(t: &Template, vals: &[Option<&str>]) -> Result<String, Missing> {
        let mut out = String::new();
        t.render_into(&mut out, |i| vals[i].ok_or(Missing::Null))?;
        Ok(out)
    }

    #[test]
    fn compiles_and_renders() {
        let (t, cols) = compile("user:{id}:{kind}:{id}", false).unwrap();
        assert_eq!(cols, ["id", "kind"]);
        assert_eq!(render(&t, &[Some("1"), Some("a")]).unwrap(), "user:1:a:1");
        assert_eq!(render(&t, &[None, Some("a")]), Err(Missing::Null));
    }

    #[test]
    fn literal_braces() {
        let (t, cols) = compile("{{x}}:{id}", false).unwrap();
        assert_eq!(cols, ["id"]);
        assert_eq!(render(&t, &[Some("7")]).unwrap(), "{x}:7");
    }

    #[test]
    fn errors() {
        assert_eq!(compile("", false).unwrap_err(), TemplateError::Empty);
        assert_eq!(
            compile("a:{id", false).unwrap_err(),
            TemplateError::Unclosed(2)
        );
        assert_eq!(
            compile("a:id}", false).unwrap_err(),
            TemplateError::Unmatched(4)
        );
        assert_eq!(
            compile("a:{}", false).unwrap_err(),
            TemplateError::EmptyPlaceholder(2)
        );
        assert_eq!(
            compile("a:{b{c}", false).unwrap_err(),
            TemplateError::Nested(4)
        );
        assert_eq!(
            TemplateError::Unclosed(2).to_string(),
            "unclosed `{` at offset 2: close the placeholder with `}` or write `{{` for a literal brace"
        );
        assert_eq!(
            TemplateError::EmptyPlaceholder(2).to_string(),
            "empty placeholder `{}` at offset 2: name a column, e.g. `{id}`"
        );
    }

    #[test]
    fn patterns_escape_values_not_literals() {
        let (t, _) = compile("feed:*:user:{id}", true).unwrap();
        assert_eq!(render(&t, &[Some("*")]).unwrap(), "feed:*:user:\\*");
        assert_eq!(t.to_wildcard_pattern(), "feed:*:user:*");
        let (k, _) = compile("odd[key]:{id}", false).unwrap();
        assert_eq!(render(&k, &[Some("*")]).unwrap(), "odd[key]:*");
        assert_eq!(k.to_wildcard_pattern(), "odd\\[key\\]:*");
    }
}
