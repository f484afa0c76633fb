//! Reconnect delays with decorrelated jitter: each delay is drawn between the
//! base and three times the previous one, capped. Nodes that lost Redis
//! together do not come back in lock-step.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    previous: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            previous: base,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let upper = (self.previous * 3).min(self.cap).max(self.base);
        let delay = if upper > self.base {
            rand::rng().random_range(self.base..=upper)
        } else {
            self.base
        };
        self.previous = delay;
        delay
    }

    /// Back to the base delay, after a success.
    pub fn reset(&mut self) {
        self.previous = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_between_base_and_cap_and_grow() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(2);
        let mut b = Backoff::new(base, cap);
        let delays: Vec<Duration> = (0..50).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= base && *d <= cap));
        assert!(delays.iter().any(|d| *d > base * 3), "it grows: {delays:?}");
        b.reset();
        assert!(b.next_delay() <= base * 3);
    }
}
