//! The one retry policy: capped exponential backoff with jitter, driven by
//! what the error says about itself. Both error families map onto [`Retry`]
//! (`source::RetryClass` and `sink::RetryClass` implement `From`), so the
//! worker's sink stage and pattern lane, the session loop and its first
//! connection to Redis, the visibility checks, `flush` and `setup`'s retried
//! `ALTER TABLE` wait the same way. Fixed waits elsewhere are polls, not
//! retries (a standby's takeover attempts: see `worker/session.rs`). A leaf:
//! it imports nothing of the crate.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// What an error asks of the loop that met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The connection broke: reconnect after [`RECONNECT_DELAY`], without
    /// growing the backoff.
    Reconnect,
    /// A condition that passes by itself (a server down, starting, or
    /// refusing until an operator acts): wait with the growing backoff.
    BackOff,
    /// Retrying cannot help.
    Fatal,
}

/// The delay before reconnecting after a broken connection.
pub const RECONNECT_DELAY: Duration = Duration::from_millis(200);

/// Capped exponential backoff with equal jitter: the n-th delay is drawn from
/// `[d/2, d]` where `d = min(initial * 2^n, max)`, so many workers retrying the
/// same server spread out.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    initial: Duration,
    max: Duration,
    random: RandomState,
    draws: u64,
}

impl Backoff {
    /// Starts at 100 ms, doubling up to 5 s.
    pub fn new() -> Self {
        Self::between(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Starts at `initial`, doubling up to `max`.
    pub fn between(initial: Duration, max: Duration) -> Self {
        Backoff {
            next: initial,
            initial,
            max: max.max(initial),
            random: RandomState::new(),
            draws: 0,
        }
    }

    /// The delay to wait now; the next one doubles (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(self.unit())
    }

    /// How long to wait before retrying an error of `class`; `None` for a
    /// fatal one.
    pub fn delay_for(&mut self, class: impl Into<Retry>) -> Option<Duration> {
        match class.into() {
            Retry::Reconnect => Some(RECONNECT_DELAY),
            Retry::BackOff => Some(self.next_delay()),
            Retry::Fatal => None,
        }
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// A number in `[0, 1)`, different at each draw.
    fn unit(&mut self) -> f64 {
        self.draws += 1;
        let mut h = self.random.build_hasher();
        h.write_u64(self.draws);
        (h.finish() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::between(Duration::from_millis(100), Duration::from_millis(800));
        let caps = [100, 200, 400, 800, 800, 800];
        let mut delays = Vec::new();
        for cap in caps {
            let d = b.next_delay();
            let cap = Duration::from_millis(cap);
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
            delays.push(d);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        // Jitter: not every delay sits at the same point of its range.
        let points: Vec<u128> = delays
            .iter()
            .zip(caps)
            .map(|(d, c)| d.as_micros() * 1000 / (c as u128 * 1000))
            .collect();
        assert!(points.windows(2).any(|w| w[0] != w[1]), "{delays:?}");
    }

    #[test]
    fn the_class_decides() {
        let mut b = Backoff::new();
        assert_eq!(b.delay_for(Retry::Reconnect), Some(RECONNECT_DELAY));
        assert_eq!(b.delay_for(Retry::Fatal), None);
        let d = b.delay_for(Retry::BackOff).expect("a delay");
        assert!(d <= Duration::from_millis(100));
    }
}
