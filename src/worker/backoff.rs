//! The retry delay of the worker's Redis retries.

use std::time::Duration;

/// Capped exponential backoff for Redis retries.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starts at 100 ms, doubling up to 5 s.
    pub fn new() -> Self {
        Backoff {
            next: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }

    /// The delay to wait now; the next one doubles.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}
