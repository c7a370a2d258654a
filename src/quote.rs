//! SQL quoting, the one copy: identifiers and string literals for the
//! statements `setup`, `check` and the worker compose. A leaf: it imports
//! nothing of the crate, so any module may use it without closing a cycle.

/// Quotes an SQL identifier: `a"b` -> `"a""b"`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal: `it's` -> `'it''s'` (standard-conforming:
/// backslashes are not special).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_the_quote_character_only() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_ident("it's"), r#""it's""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal(r#"a"b\n"#), r#"'a"b\n'"#);
    }
}
