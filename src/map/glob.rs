//! Redis glob patterns (`SCAN MATCH`, `KEYS`): escaping of substituted values
//! and a matcher with Redis's semantics, used to test escaping and by the sink
//! to match one merged SCAN pass against many patterns client-side.
//!
//! Semantics follow Redis's `stringmatchlen`: `*` any run of bytes, `?` one
//! byte, `[abc]`, `[^abc]`, `[a-z]` (reversed ranges allowed) one byte, `\x`
//! the literal `x` (inside brackets too), a trailing `\` a literal backslash,
//! an unclosed `[` a class running to the end of the pattern. Case-sensitive.

/// The bytes that carry glob meaning and are escaped in substituted values.
pub const GLOB_SPECIAL: &[u8] = b"*?[]\\";

/// Appends `value` to `out` with every glob-special character backslash-escaped,
/// so the result matches exactly `value` and nothing else.
pub fn escape_into(value: &str, out: &mut String) {
    for ch in value.chars() {
        if ch.is_ascii() && GLOB_SPECIAL.contains(&(ch as u8)) {
            out.push('\\');
        }
        out.push(ch);
    }
}

/// `value` glob-escaped (see [`escape_into`]).
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 4);
    escape_into(value, &mut out);
    out
}

/// One byte-matching element of a pattern starting at `p` (not a `*`): whether
/// it matches `c`, and where the next element starts.
fn match_single(pattern: &[u8], p: usize, c: u8) -> (bool, usize) {
    match pattern[p] {
        b'?' => (true, p + 1),
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c, p + 2),
        b'[' => {
            let mut i = p + 1;
            let negate = pattern.get(i) == Some(&b'^');
            if negate {
                i += 1;
            }
            let mut matched = false;
            loop {
                if i >= pattern.len() {
                    // Unclosed class: runs to the end of the pattern.
                    break;
                }
                let b = pattern[i];
                if b == b'\\' && i + 1 < pattern.len() {
                    i += 1;
                    if pattern[i] == c {
                        matched = true;
                    }
                } else if b == b']' {
                    i += 1;
                    break;
                } else if i + 2 < pattern.len() && pattern[i + 1] == b'-' {
                    let (mut lo, mut hi) = (b, pattern[i + 2]);
                    if lo > hi {
                        std::mem::swap(&mut lo, &mut hi);
                    }
                    if (lo..=hi).contains(&c) {
                        matched = true;
                    }
                    i += 2;
                } else if b == c {
                    matched = true;
                }
                i += 1;
            }
            (matched != negate, i)
        }
        b => (b == c, p + 1),
    }
}

/// Where the pattern element starting at `p` ends (the next element's start):
/// `\x` takes two bytes, a `[...]` class runs to its `]` (or the end), any
/// other byte one. `p` must be in range.
pub(crate) fn element_end(pattern: &[u8], p: usize) -> usize {
    match pattern[p] {
        b'*' => p + 1,
        _ => match_single(pattern, p, 0).1,
    }
}

/// Whether `s` matches the Redis glob `pattern`.
pub fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    // Backtrack point: pattern position after the last `*`, and the string
    // position that star currently swallows up to.
    let mut star: Option<(usize, usize)> = None;
    loop {
        if p < pattern.len() && pattern[p] == b'*' {
            while p < pattern.len() && pattern[p] == b'*' {
                p += 1;
            }
            if p == pattern.len() {
                return true;
            }
            star = Some((p, i));
            continue;
        }
        if i == s.len() {
            // Only trailing stars may remain.
            return pattern[p..].iter().all(|&b| b == b'*');
        }
        if p < pattern.len() {
            let (ok, next) = match_single(pattern, p, s[i]);
            if ok {
                p = next;
                i += 1;
                continue;
            }
        }
        match star {
            Some((sp, si)) if si < s.len() => {
                star = Some((sp, si + 1));
                p = sp;
                i = si + 1;
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(p: &str, s: &str) -> bool {
        glob_match(p.as_bytes(), s.as_bytes())
    }

    #[test]
    fn redis_semantics() {
        assert!(m("*", ""));
        assert!(m("user:*", "user:1:profile"));
        assert!(!m("user:*", "users:1"));
        assert!(m("h?llo", "hello"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-b]llo", "hbllo"));
        assert!(m("h[b-a]llo", "hallo"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("a\\", "a\\"));
        assert!(m("[\\]]", "]"));
        assert!(m("a[bc", "ab"));
        assert!(m("*:user:*:x", "feed:9:user:1:x"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "aXbYbZ"));
        assert!(m("**a", "a"));
        assert!(!m("[]", "a"));
    }

    #[test]
    fn escape_neutralises_every_special() {
        assert_eq!(escape("a*b?c[d]e\\f"), "a\\*b\\?c\\[d\\]e\\\\f");
        assert!(m(&escape("*"), "*"));
        assert!(!m(&escape("*"), "x"));
        assert!(m(
            &format!("feed:*:user:{}", escape("[1]")),
            "feed:2:user:[1]"
        ));
        assert!(!m(
            &format!("feed:*:user:{}", escape("[1]")),
            "feed:2:user:1"
        ));
    }

    proptest! {
        #[test]
        fn escaped_value_matches_only_itself(
            v in "[a-c*?\\[\\]\\\\^-]{0,8}",
            other in "[a-c*?\\[\\]\\\\^-]{0,8}",
        ) {
            let pattern = escape(&v);
            prop_assert!(glob_match(pattern.as_bytes(), v.as_bytes()));
            prop_assert_eq!(glob_match(pattern.as_bytes(), other.as_bytes()), v == other);
        }

        #[test]
        fn escaped_value_inside_a_pattern_stays_literal(
            v in "[a*?\\[\\]\\\\]{0,6}",
            other in "[a*?\\[\\]\\\\]{0,6}",
        ) {
            let pattern = format!("k:{}:*", escape(&v));
            let s = format!("k:{other}:tail");
            // Only `other == v` can match: the literal part is fixed-length.
            prop_assert_eq!(glob_match(pattern.as_bytes(), s.as_bytes()), v == other || s.starts_with(&format!("k:{v}:")));
        }

        #[test]
        fn never_panics(p in proptest::collection::vec(any::<u8>(), 0..12), s in proptest::collection::vec(any::<u8>(), 0..12)) {
            let _ = glob_match(&p, &s);
        }
    }
}
