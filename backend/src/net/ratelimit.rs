//! Rate limits for log messages a guest can trigger.
//!
//! Theory of operation: every message that a guest can provoke (a malformed frame, a
//! request we refuse, a host socket error caused by where it pings) goes through a
//! [`LogLimiter`] before it reaches `tracing`. The limiter keeps one token bucket per
//! message class: a class may log a burst of [`BURST`] messages, then one message per
//! [`REFILL_INTERVAL`]. Messages beyond that are counted, not logged; the next message
//! that is let through reports how many were suppressed. A hostile guest can therefore
//! add at most a few lines per second per class to the log, however fast it sends.
//!
//! The limiter is plain data (no clock of its own, no locking): callers pass `now`, so
//! tests can drive it deterministically.

use std::time::{Duration, Instant};

/// Messages a class may log back to back before it is throttled.
pub(crate) const BURST: u32 = 10;

/// One more message is allowed per interval once the burst is spent.
pub(crate) const REFILL_INTERVAL: Duration = Duration::from_secs(1);

/// The token bucket of one message class.
#[derive(Debug, Clone)]
struct TokenBucket {
    tokens: u32,
    /// When `tokens` was last brought up to date.
    refilled_at: Instant,
    /// Messages dropped since the last one that was let through.
    suppressed: u64,
}

impl TokenBucket {
    fn new(now: Instant) -> Self {
        Self {
            tokens: BURST,
            refilled_at: now,
            suppressed: 0,
        }
    }

    fn admit(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.refilled_at);
        let earned = elapsed.as_nanos() / REFILL_INTERVAL.as_nanos().max(1);
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            self.refilled_at = now;
        }
        if self.tokens == 0 {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Token buckets for `CLASSES` message classes, indexed `0..CLASSES`.
#[derive(Debug, Clone)]
pub(crate) struct LogLimiter<const CLASSES: usize> {
    buckets: [TokenBucket; CLASSES],
}

impl<const CLASSES: usize> LogLimiter<CLASSES> {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            buckets: std::array::from_fn(|_| TokenBucket::new(now)),
        }
    }

    /// Whether a message of `class` may be logged now. `Some(n)`: log it, and mention
    /// that `n` messages of this class were suppressed before it (when `n > 0`).
    /// `None`: drop it. An out-of-range class is always throttled (a programming error,
    /// never a reason to flood the log).
    pub(crate) fn admit(&mut self, class: usize, now: Instant) -> Option<u64> {
        self.buckets.get_mut(class)?.admit(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_one_message_per_interval() {
        let start = Instant::now();
        let mut limiter = LogLimiter::<2>::new(start);
        for _ in 0..BURST {
            assert_eq!(limiter.admit(0, start), Some(0));
        }
        assert_eq!(limiter.admit(0, start), None);
        assert_eq!(limiter.admit(0, start), None);
        // The other class is independent.
        assert_eq!(limiter.admit(1, start), Some(0));
        // After one interval, one message passes and reports the two suppressed ones.
        let later = start + REFILL_INTERVAL;
        assert_eq!(limiter.admit(0, later), Some(2));
        assert_eq!(limiter.admit(0, later), None);
    }

    #[test]
    fn refill_is_capped_at_the_burst() {
        let start = Instant::now();
        let mut limiter = LogLimiter::<1>::new(start);
        let much_later = start + REFILL_INTERVAL * 1000;
        let admitted = (0..100)
            .filter(|_| limiter.admit(0, much_later).is_some())
            .count();
        assert_eq!(admitted, BURST as usize);
    }

    #[test]
    fn unknown_class_is_throttled() {
        let mut limiter = LogLimiter::<1>::new(Instant::now());
        assert_eq!(limiter.admit(7, Instant::now()), None);
    }
}
