//! "Logged once" for failures that repeat: one line when a failure starts or
//! changes, then at most one line per interval with how many times it
//! happened meanwhile. Every retry loop that logs uses [`Repeats`] (Redis
//! unreachable, the PostgreSQL reconnect loop, publication drift, replicas,
//! the visibility check), so a failure that lasts an hour is a handful of
//! lines, not thousands, and none is silent.

use std::time::{Duration, Instant};

/// How often a failure that keeps repeating is logged again.
pub const EVERY: Duration = Duration::from_secs(30);

/// A rate limiter for one repeating failure's log line.
#[derive(Debug)]
pub struct Repeats {
    every: Duration,
    last: Option<Instant>,
    count: u64,
    /// What the last line said ([`Repeats::tick_for`]): a new text is due at once.
    what: Option<String>,
}

impl Default for Repeats {
    fn default() -> Self {
        Repeats::new(EVERY)
    }
}

impl Repeats {
    /// A limiter that lets one line through per `every`.
    pub fn new(every: Duration) -> Repeats {
        Repeats {
            every,
            last: None,
            count: 0,
            what: None,
        }
    }

    /// One more occurrence: `Some(occurrences since the last line)` when a
    /// line is due (the first time, then once per interval), `None` when not.
    pub fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        let due = self.last.is_none_or(|t| t.elapsed() >= self.every);
        if !due {
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.count))
    }

    /// One more occurrence of the failure `what`: due at once when it
    /// differs from the last line's (a new failure is news), else as
    /// [`Repeats::tick`].
    pub fn tick_for(&mut self, what: &str) -> Option<u64> {
        if self.what.as_deref() != Some(what) {
            self.what = Some(what.to_owned());
            self.last = None;
        }
        self.tick()
    }

    /// The failure ended: whether one was being reported (the next one is
    /// due at once).
    pub fn clear(&mut self) -> bool {
        let was = self.what.take().is_some() || self.last.is_some();
        self.last = None;
        self.count = 0;
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_once_then_with_a_count() {
        let mut r = Repeats::new(Duration::from_millis(50));
        assert_eq!(r.tick(), Some(1));
        assert_eq!(r.tick(), None);
        assert_eq!(r.tick(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.tick(), Some(3), "the two held back plus this one");
        assert_eq!(r.tick(), None);
    }

    #[test]
    fn a_new_failure_is_logged_at_once_and_a_cleared_one_starts_over() {
        let mut r = Repeats::new(Duration::from_secs(3600));
        assert_eq!(r.tick_for("a"), Some(1));
        assert_eq!(r.tick_for("a"), None);
        assert_eq!(
            r.tick_for("b"),
            Some(2),
            "new text: due, with the held-back one"
        );
        assert_eq!(r.tick_for("b"), None);
        assert!(r.clear());
        assert!(!r.clear());
        assert_eq!(r.tick_for("b"), Some(1), "after clear: due again");
    }
}
