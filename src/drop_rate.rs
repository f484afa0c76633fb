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

    /// Records `n` drops; returns the alert when the rate calls for one now.
    pub fn dropped(&mut self, n: u64) -> Option<Alert> {
        self.slot().2 += n;
        let (processed, dropped) = self.window();
        let rate = ratio(processed, dropped);
        let cooled = self
            .last_alert
            .is_none_or(|at| at.elapsed() >= self.cooldown);
        if rate > self.threshold && cooled {
            self.last_alert = Some(Instant::now());
            return Some(Alert {
                rate,
                threshold: self.threshold,
                processed,
                dropped,
                window_s: self.window_s,
            });
        }
        None
    }

    /// Dropped / (processed + dropped) over the window.
    pub fn rate(&self) -> f64 {
        let (processed, dropped) = self.window();
        ratio(processed, dropped)
    }

    /// (processed, dropped) over the window.
    fn window(&self) -> (u64, u64) {
        let now = self.start.elapsed().as_secs();
        self.slots
            .iter()
            .filter(|(s, _, _)| *s != u64::MAX && now - s < self.window_s)
            .fold((0, 0), |(p, d), (_, sp, sd)| (p + sp, d + sd))
    }
}

/// A drop-rate alert: what the window held when a drop took the rate over
/// the threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Alert {
    /// Dropped / (processed + dropped), 0 to 1.
    pub rate: f64,
    pub threshold: f64,
    pub processed: u64,
    pub dropped: u64,
    pub window_s: u64,
}

impl Alert {
    /// The rate as a percentage with two decimals, as the seed reports it
    /// (`round(rate * 100, 2)`): `9.09` for 1 drop in 11 events.
    pub fn percent(&self) -> String {
        format!("{:.2}", self.rate * 100.0)
    }
}

fn ratio(processed: u64, dropped: u64) -> f64 {
    if processed + dropped == 0 {
        0.0
    } else {
        dropped as f64 / (processed + dropped) as f64
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
        assert!((alert.rate - 6.0 / 106.0).abs() < 1e-9);
        assert_eq!(
            (alert.processed, alert.dropped, alert.window_s),
            (100, 6, 60)
        );
        assert_eq!(alert.percent(), "5.66");
        assert_eq!(r.dropped(1), None, "cooldown");
        assert!(r.rate() > 0.05);
    }

    #[test]
    fn alerts_again_once_the_cooldown_is_over() {
        let mut r = DropRate::new(Duration::from_secs(60), 0.05, Duration::ZERO);
        assert!(r.dropped(1).is_some());
        assert!(r.dropped(1).is_some(), "no cooldown left");
    }
}
