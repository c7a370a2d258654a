//! [`GlobSet`]: many Redis glob patterns matched against one key at a cost
//! that does not grow with the number of patterns, for the pattern pass
//! (ARCHITECTURE.md, "Patterns").
//!
//! Each pattern is anchored on its longer literal end: the *prefix* (the bytes
//! before its first glob element, `\x` escapes resolved) or the *suffix* (the
//! bytes after its last one). A matching key starts with the prefix (ends with
//! the suffix), so a key is only tried against the patterns whose anchor it
//! carries: one hash probe per distinct anchor length (bounded by the key's
//! length, not by the pattern count), then [`glob_match`] on those candidates
//! alone. Template patterns (`post:{id}:comments:*`, `feed:*:user:{id}`) put
//! the substituted value inside the anchor, so each candidate list holds about
//! one pattern. Patterns with neither a prefix nor a suffix (`*:x:*`) are tried
//! on every key; rules produce few of them, as they hold no substituted value
//! at either end.
//!
//! [`GlobSet::server_filter`] is the one glob that lets Redis filter the SCAN
//! for all the patterns (their common prefix, or their set of first bytes).

use std::collections::HashMap;

use super::glob::{element_end, glob_match, GLOB_SPECIAL};

type Hasher = foldhash::fast::RandomState;

/// At most this many distinct first bytes go into a `[...]*` server filter.
const MAX_FILTER_CLASS: usize = 16;

/// A pattern's literal ends.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Literals {
    /// The bytes before the first glob element (the whole pattern when it has none).
    prefix: Vec<u8>,
    /// The bytes after the last glob element (empty when it has none).
    suffix: Vec<u8>,
}

/// Splits `pattern` into its literal prefix and suffix, with [`glob_match`]'s
/// reading of every element (a trailing `\` is a literal backslash).
fn literals(pattern: &[u8]) -> Literals {
    let mut prefix = Vec::new();
    let mut suffix = Vec::new();
    let mut seen_meta = false;
    let mut p = 0;
    while p < pattern.len() {
        let next = element_end(pattern, p);
        let literal = match pattern[p] {
            b'*' | b'?' | b'[' => None,
            b'\\' if p + 1 < pattern.len() => Some(pattern[p + 1]),
            b => Some(b),
        };
        match literal {
            Some(b) if seen_meta => suffix.push(b),
            Some(b) => prefix.push(b),
            None => {
                seen_meta = true;
                suffix.clear();
            }
        }
        p = next;
    }
    Literals { prefix, suffix }
}

/// Candidates by anchor: anchor bytes -> pattern indexes, and the distinct
/// anchor lengths, ascending.
#[derive(Debug)]
struct AnchorIndex {
    by_anchor: HashMap<Box<[u8]>, Vec<u32>, Hasher>,
    lengths: Vec<usize>,
    /// Which first (prefix index) or last (suffix index) bytes any anchor has.
    edge_bytes: [bool; 256],
}

impl Default for AnchorIndex {
    fn default() -> Self {
        AnchorIndex {
            by_anchor: HashMap::default(),
            lengths: Vec::new(),
            edge_bytes: [false; 256],
        }
    }
}

impl AnchorIndex {
    fn insert(&mut self, anchor: &[u8], edge: u8, index: u32) {
        self.by_anchor.entry(anchor.into()).or_default().push(index);
        if let Err(at) = self.lengths.binary_search(&anchor.len()) {
            self.lengths.insert(at, anchor.len());
        }
        self.edge_bytes[usize::from(edge)] = true;
    }

    fn is_empty(&self) -> bool {
        self.by_anchor.is_empty()
    }
}

/// A set of Redis glob patterns, each with a value of type `K` (for the sink,
/// what to do with a matching key), matched together (see the module doc).
#[derive(Debug)]
pub struct GlobSet<K> {
    patterns: Vec<(Box<[u8]>, K)>,
    literals: Vec<Literals>,
    /// Patterns anchored on their prefix (the longer end, or the only one).
    prefixed: AnchorIndex,
    /// Patterns anchored on their suffix.
    suffixed: AnchorIndex,
    /// Patterns with no literal end: tried on every key.
    unanchored: Vec<u32>,
}

impl<K: Copy + Ord> GlobSet<K> {
    /// Compiles `patterns` (Redis globs, substituted values already escaped).
    pub fn new<'a>(patterns: impl IntoIterator<Item = (&'a str, K)>) -> Self {
        let mut set = GlobSet {
            patterns: Vec::new(),
            literals: Vec::new(),
            prefixed: AnchorIndex::default(),
            suffixed: AnchorIndex::default(),
            unanchored: Vec::new(),
        };
        for (pattern, value) in patterns {
            let index = u32::try_from(set.patterns.len()).unwrap_or(u32::MAX);
            let bytes = pattern.as_bytes();
            let lit = literals(bytes);
            if let (Some(&first), true) = (lit.prefix.first(), lit.prefix.len() >= lit.suffix.len())
            {
                set.prefixed.insert(&lit.prefix, first, index);
            } else if let Some(&last) = lit.suffix.last() {
                set.suffixed.insert(&lit.suffix, last, index);
            } else if bytes.is_empty() {
                // Matches only the empty key: anchored on the empty prefix.
                set.prefixed.insert(b"", 0, index);
            } else {
                set.unanchored.push(index);
            }
            set.patterns.push((bytes.into(), value));
            set.literals.push(lit);
        }
        set
    }

    /// Number of patterns.
    pub fn len(&self) -> usize {
        self.patterns.len()
    }

    /// True when the set holds no pattern.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Calls `f` with the index of every pattern `key` might match (a superset
    /// of the matches; each index at most once).
    fn candidates(&self, key: &[u8], mut f: impl FnMut(u32)) {
        if let Some(&first) = key.first() {
            if self.prefixed.edge_bytes[usize::from(first)] {
                for &len in &self.prefixed.lengths {
                    if len > key.len() {
                        break;
                    }
                    if let Some(ids) = self.prefixed.by_anchor.get(&key[..len]) {
                        ids.iter().copied().for_each(&mut f);
                    }
                }
            }
        } else if let Some(ids) = self.prefixed.by_anchor.get(&key[..0]) {
            ids.iter().copied().for_each(&mut f);
        }
        if let Some(&last) = key.last() {
            if !self.suffixed.is_empty() && self.suffixed.edge_bytes[usize::from(last)] {
                for &len in &self.suffixed.lengths {
                    if len > key.len() {
                        break;
                    }
                    if let Some(ids) = self.suffixed.by_anchor.get(&key[key.len() - len..]) {
                        ids.iter().copied().for_each(&mut f);
                    }
                }
            }
        }
        self.unanchored.iter().copied().for_each(f);
    }

    /// The smallest value among the patterns `key` matches, if any.
    pub fn best_match(&self, key: &[u8]) -> Option<K> {
        let mut best: Option<K> = None;
        self.candidates(key, |i| {
            let (pattern, value) = &self.patterns[i as usize];
            if best.is_none_or(|b| *value < b) && glob_match(pattern, key) {
                best = Some(*value);
            }
        });
        best
    }

    /// The indexes (in insertion order) of every pattern `key` matches.
    pub fn matches(&self, key: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        self.candidates(key, |i| {
            if glob_match(&self.patterns[i as usize].0, key) {
                out.push(i as usize);
            }
        });
        out.sort_unstable();
        out
    }

    /// One glob that every key matching any pattern of the set matches, for
    /// `SCAN ... MATCH` to filter on the server; `None` when the best such
    /// glob is `*`. One pattern is its own filter; otherwise the escaped common
    /// prefix of every pattern's literal prefix, then `*`; or, when those share
    /// nothing, a class of their first bytes (at most 16), then `*`.
    pub fn server_filter(&self) -> Option<Vec<u8>> {
        if let [(only, _)] = self.patterns.as_slice() {
            return Some(only.to_vec());
        }
        if self.literals.is_empty() || self.literals.iter().any(|l| l.prefix.is_empty()) {
            return None;
        }
        let first = &self.literals[0].prefix;
        let common = self.literals[1..].iter().fold(first.len(), |n, l| {
            n.min(
                first
                    .iter()
                    .zip(&l.prefix)
                    .take_while(|(a, b)| a == b)
                    .count(),
            )
        });
        let mut out = Vec::new();
        if common > 0 {
            for &b in &first[..common] {
                if GLOB_SPECIAL.contains(&b) {
                    out.push(b'\\');
                }
                out.push(b);
            }
        } else {
            let mut firsts: Vec<u8> = self.literals.iter().map(|l| l.prefix[0]).collect();
            firsts.sort_unstable();
            firsts.dedup();
            if firsts.len() > MAX_FILTER_CLASS {
                return None;
            }
            out.push(b'[');
            for b in firsts {
                // Escaped inside the class too: `]`, `^`, `-` and `\` stay literal.
                out.push(b'\\');
                out.push(b);
            }
            out.push(b']');
        }
        out.push(b'*');
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::glob::escape;
    use proptest::prelude::*;

    fn lit(p: &str) -> (String, String) {
        let l = literals(p.as_bytes());
        (
            String::from_utf8_lossy(&l.prefix).into_owned(),
            String::from_utf8_lossy(&l.suffix).into_owned(),
        )
    }

    #[test]
    fn literal_ends_resolve_escapes_and_classes() {
        assert_eq!(
            lit("post:1:comments:*"),
            ("post:1:comments:".into(), "".into())
        );
        assert_eq!(lit("feed:*:user:7"), ("feed:".into(), ":user:7".into()));
        assert_eq!(lit("a\\*b*c"), ("a*b".into(), "c".into()));
        assert_eq!(lit("x[ab]y?z"), ("x".into(), "z".into()));
        assert_eq!(lit("x[a\\]b]yz"), ("x".into(), "yz".into()));
        assert_eq!(lit("plain"), ("plain".into(), "".into()));
        assert_eq!(lit("a\\"), ("a\\".into(), "".into()));
        assert_eq!(lit("*"), ("".into(), "".into()));
        assert_eq!(lit("a[bc"), ("a".into(), "".into()));
    }

    #[test]
    fn best_match_prefers_the_smallest_value() {
        let set = GlobSet::new([("post:*", 2u8), ("post:1:*", 1), ("*:1:x", 0)]);
        assert_eq!(set.best_match(b"post:1:x"), Some(0));
        assert_eq!(set.best_match(b"post:1:y"), Some(1));
        assert_eq!(set.best_match(b"post:2:y"), Some(2));
        assert_eq!(set.best_match(b"user:2"), None);
        assert_eq!(set.best_match(b""), None);
        let empty = GlobSet::new([("", 0u8)]);
        assert_eq!(empty.best_match(b""), Some(0));
        assert_eq!(empty.best_match(b"a"), None);
    }

    #[test]
    fn server_filter_covers_every_pattern() {
        let f = |ps: &[&str]| {
            GlobSet::new(ps.iter().map(|p| (*p, 0u8)))
                .server_filter()
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        assert_eq!(
            f(&["post:1:comments:*"]).as_deref(),
            Some("post:1:comments:*")
        );
        assert_eq!(
            f(&["post:1:comments:*", "post:22:comments:*"]).as_deref(),
            Some("post:*")
        );
        assert_eq!(f(&["a\\*1:*", "a\\*2:*"]).as_deref(), Some("a\\**"));
        assert_eq!(
            f(&["post:1:*", "tag:post:*", "]x*"]).as_deref(),
            Some("[\\]\\p\\t]*")
        );
        assert_eq!(f(&["post:1:*", "*:x"]), None);
        assert_eq!(f(&[]), None);
    }

    /// Keys and patterns over a small alphabet, so that matches are common.
    fn key() -> impl Strategy<Value = String> {
        "[ab:*?\\[\\]\\\\^-]{0,10}"
    }

    fn pattern() -> impl Strategy<Value = String> {
        prop_oneof![
            // Template-like: literal prefix, an escaped value, a glob tail.
            ("[ab:]{0,3}", "[ab*?\\[\\]\\\\]{0,4}", "(\\*|\\?|:\\*|)")
                .prop_map(|(p, v, t)| format!("{p}{}{t}", escape(&v))),
            // Template-like with the value at the end: `feed:*:user:{id}`.
            ("[ab:]{0,3}", "[ab*?\\[\\]\\\\]{0,4}")
                .prop_map(|(p, v)| format!("{p}*:{}", escape(&v))),
            // Anything at all.
            "[ab:*?\\[\\]\\\\^-]{0,8}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The set finds exactly the patterns each matched alone would, with
        /// up to 1,000 distinct patterns; its server filter passes every key
        /// any of them matches.
        #[test]
        fn set_matches_like_each_pattern_alone(
            patterns in proptest::collection::btree_set(pattern(), 1..=1000),
            keys in proptest::collection::vec(key(), 1..100),
        ) {
            let patterns: Vec<String> = patterns.into_iter().collect();
            let set = GlobSet::new(patterns.iter().enumerate().map(|(i, p)| (p.as_str(), i)));
            let filter = set.server_filter();
            let mut keys = keys;
            // Keys built from the patterns themselves, so that most match something.
            keys.extend(patterns.iter().take(100).map(|p| p.replace(['\\', '*', '?'], "")));
            for k in &keys {
                let alone: Vec<usize> = patterns
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| glob_match(p.as_bytes(), k.as_bytes()))
                    .map(|(i, _)| i)
                    .collect();
                prop_assert_eq!(&set.matches(k.as_bytes()), &alone, "key {:?}", k);
                prop_assert_eq!(set.best_match(k.as_bytes()), alone.first().copied());
                if let (Some(f), false) = (&filter, alone.is_empty()) {
                    prop_assert!(glob_match(f, k.as_bytes()), "filter {:?} misses {:?}", String::from_utf8_lossy(f), k);
                }
            }
        }
    }
}
