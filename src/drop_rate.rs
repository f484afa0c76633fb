//! The event drop rate over a sliding window (seed: 60 s), with an alert in
//! the log above a threshold (seed: 5 %) at most once per cooldown (5 min).

use std::time::{Duration, Instant};

/// Per-second counts over the window.
pub struct DropRate {
    window_s: u64,
    threshold: f64,
    cooldown: Duration,
    start: Instant,
    /// (second since start, processed, dropped), one slot per second.
    slots: Vec<(u64, u64, u64)>,
    last_alert: Option<Instant>,
}

impl DropRate {
    pub fn new(window: Duration, threshold: f64, cooldown: Duration) -> DropRate {
        let window_s = window.as_secs().max(1);
        DropRate {
            window_s,
            threshold,
            cooldown,
            start: Instant::now(),
            slots: vec![(u64::MAX, 0, 0); window_s as usize],
            last_alert: None,
        }
    }

    fn slot(&mut self) -> &mut (u64, u64, u64) {
        let second = self.start.elapsed().as_secs();
        let i = (second % self.window_s) as usize;
        let slot = &mut self.slots[i];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot
    }

    pub fn processed(&mut self) {
        self.slot().1 += 1;
    }

    /// Records `n` drops; returns the rate when it calls for an alert now.
    pub fn dropped(&mut self, n: u64) -> Option<f64> {
        self.slot().2 += n;
        let rate = self.rate();
        let cooled = self
            .last_alert
            .is_none_or(|at| at.elapsed() >= self.cooldown);
        if rate > self.threshold && cooled {
            self.last_alert = Some(Instant::now());
            return Some(rate);
        }
        None
    }

    /// Dropped / (processed + dropped) over the window.
    pub fn rate(&self) -> f64 {
        let now = self.start.elapsed().as_secs();
        let (p, d) = self
            .slots
            .iter()
            .filter(|(s, _, _)| *s != u64::MAX && now - s < self.window_s)
            .fold((0, 0), |(p, d), (_, sp, sd)| (p + sp, d + sd));
        if p + d == 0 {
            0.0
        } else {
            d as f64 / (p + d) as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_above_the_threshold_once_per_cooldown() {
        let mut r = DropRate::new(Duration::from_secs(60), 0.05, Duration::from_secs(300));
        for _ in 0..100 {
            r.processed();
        }
        for _ in 0..5 {
            assert_eq!(r.dropped(1), None, "5 of 105 is under 5 %");
        }
        let alert = r.dropped(1).expect("6 of 106 is over 5 %");
        assert!((alert - 6.0 / 106.0).abs() < 1e-9);
        assert_eq!(r.dropped(1), None, "cooldown");
        assert!(r.rate() > 0.05);
    }
}
