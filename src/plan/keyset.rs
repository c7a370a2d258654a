//! [`KeySet`]: the plan's sets of Redis names, stored in one text buffer.

use std::hash::BuildHasher;

use super::FastHash;

/// A set of Redis names (keys, tag sets, version keys or patterns) in
/// insertion order. The names live in one growing text buffer, so adding one
/// allocates nothing per name (the buffer and the index grow by doubling);
/// a hash table over the buffer finds duplicates.
#[derive(Clone, Default)]
pub struct KeySet {
    /// Every name, back to back.
    text: String,
    /// (start, end) of each name in `text`, in insertion order.
    spans: Vec<(usize, usize)>,
    /// Indexes into `spans`, by the hash of the name.
    index: hashbrown::HashTable<usize>,
    hasher: FastHash,
}

impl KeySet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name`; false when it was already there.
    pub fn insert(&mut self, name: &str) -> bool {
        if self.contains(name) {
            return false;
        }
        let start = self.text.len();
        self.text.push_str(name);
        self.spans.push((start, self.text.len()));
        let (text, spans, hasher) = (&self.text, &self.spans, &self.hasher);
        self.index
            .insert_unique(hasher.hash_one(name), spans.len() - 1, |&i| {
                hasher.hash_one(span(text, spans, i))
            });
        true
    }

    /// True when `name` is in the set.
    pub fn contains(&self, name: &str) -> bool {
        self.index
            .find(self.hasher.hash_one(name), |&i| {
                span(&self.text, &self.spans, i) == name
            })
            .is_some()
    }

    /// The names, in insertion order.
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            text: &self.text,
            spans: self.spans.iter(),
        }
    }

    /// Number of names.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// True when the set holds no name.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}

/// The names of a [`KeySet`], in insertion order.
pub struct Iter<'a> {
    text: &'a str,
    spans: std::slice::Iter<'a, (usize, usize)>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        self.spans.next().map(|&(s, e)| &self.text[s..e])
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.spans.size_hint()
    }
}

impl<'a> IntoIterator for &'a KeySet {
    type Item = &'a str;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

fn span<'a>(text: &'a str, spans: &[(usize, usize)], i: usize) -> &'a str {
    spans.get(i).map_or("", |&(s, e)| &text[s..e])
}

/// Equal when both hold the same names, in any order.
impl PartialEq for KeySet {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|name| other.contains(name))
    }
}

impl Eq for KeySet {}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> Extend<S> for KeySet {
    fn extend<I: IntoIterator<Item = S>>(&mut self, names: I) {
        for name in names {
            self.insert(name.as_ref());
        }
    }
}

impl<S: AsRef<str>> FromIterator<S> for KeySet {
    fn from_iter<I: IntoIterator<Item = S>>(names: I) -> Self {
        let mut set = KeySet::new();
        set.extend(names);
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn dedups_and_keeps_insertion_order() {
        let mut set = KeySet::new();
        assert!(set.insert("b"));
        assert!(set.insert("a"));
        assert!(!set.insert("b"));
        assert!(set.insert(""));
        assert_eq!(set.iter().collect::<Vec<_>>(), ["b", "a", ""]);
        assert!(set.contains("a") && set.contains("") && !set.contains("c"));
        assert_eq!(set.len(), 3);
        let other: KeySet = ["", "a", "b", "a"].into_iter().collect();
        assert_eq!(set, other);
        assert_ne!(set, ["a", "b"].into_iter().collect::<KeySet>());
    }

    proptest! {
        /// The same answers as a std HashSet over any sequence of names.
        #[test]
        fn behaves_like_a_hash_set(names in prop::collection::vec("[a-c:]{0,4}", 0..200)) {
            let mut set = KeySet::new();
            let mut model = std::collections::HashSet::new();
            for name in &names {
                prop_assert_eq!(set.insert(name), model.insert(name.clone()));
            }
            prop_assert_eq!(set.len(), model.len());
            for name in &model {
                prop_assert!(set.contains(name));
            }
            let mut listed: Vec<&str> = set.iter().collect();
            listed.sort_unstable();
            let mut expected: Vec<&str> = model.iter().map(String::as_str).collect();
            expected.sort_unstable();
            prop_assert_eq!(listed, expected);
        }
    }
}
