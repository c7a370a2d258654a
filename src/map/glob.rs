//! Redis glob matching (placeholder until the mappings work lands).

/// Whether `s` matches the Redis glob `pattern`.
pub fn glob_match(pattern: &[u8], s: &[u8]) -> bool {
    match (pattern.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob_match(&pattern[1..], s) || (!s.is_empty() && glob_match(pattern, &s[1..]))
        }
        (Some(b'\\'), Some(c)) if pattern.get(1) == Some(c) => glob_match(&pattern[2..], &s[1..]),
        (Some(b'?'), Some(_)) => glob_match(&pattern[1..], &s[1..]),
        (Some(p), Some(c)) if p == c => glob_match(&pattern[1..], &s[1..]),
        _ => false,
    }
}
