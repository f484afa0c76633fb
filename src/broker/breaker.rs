//! A circuit breaker (the seed's numbers: 5 consecutive failures open it, 30 s
//! later it half-opens, and 3 trial calls decide).
//!
//! CLOSED → (threshold consecutive failures) → OPEN → (recovery time) →
//! HALF_OPEN → (every trial succeeds) → CLOSED, or (any trial fails) → OPEN.
//! Every caller asks [`CircuitBreaker::allow`] first and reports the outcome
//! of each allowed call with `success` or `failure`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::metrics::Metrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "CLOSED",
            BreakerState::Open => "OPEN",
            BreakerState::HalfOpen => "HALF_OPEN",
        }
    }

    /// The value of `wsgateway_circuit_breaker_state`.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// The breaker's settings.
#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    pub failure_threshold: u32,
    pub recovery: Duration,
    pub half_open_calls: u32,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: u32,
    opened_at: Instant,
    trials_admitted: u32,
    trials_passed: u32,
}

pub struct CircuitBreaker {
    name: &'static str,
    config: BreakerConfig,
    /// Held for a few field updates, never across an await.
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

impl CircuitBreaker {
    pub fn new(name: &'static str, config: BreakerConfig, metrics: Arc<Metrics>) -> CircuitBreaker {
        let breaker = CircuitBreaker {
            name,
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                opened_at: Instant::now(),
                trials_admitted: 0,
                trials_passed: 0,
            }),
            metrics,
        };
        breaker.publish(BreakerState::Closed, 0);
        breaker
    }

    /// Whether a call may go ahead now. In OPEN, calls fail fast until the
    /// recovery time has passed; in HALF_OPEN only the trial calls pass.
    pub fn allow(&self) -> bool {
        let mut inner = self.inner.lock();
        if inner.state == BreakerState::Open && inner.opened_at.elapsed() >= self.config.recovery {
            self.transition(&mut inner, BreakerState::HalfOpen);
        }
        match inner.state {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen if inner.trials_admitted < self.config.half_open_calls => {
                inner.trials_admitted += 1;
                true
            }
            BreakerState::HalfOpen => false,
        }
    }

    pub fn success(&self) {
        let mut inner = self.inner.lock();
        match inner.state {
            BreakerState::Closed => inner.failures = 0,
            BreakerState::HalfOpen => {
                inner.trials_passed += 1;
                if inner.trials_passed >= self.config.half_open_calls {
                    inner.failures = 0;
                    self.transition(&mut inner, BreakerState::Closed);
                }
            }
            BreakerState::Open => {}
        }
        self.publish(inner.state, inner.failures);
    }

    pub fn failure(&self) {
        let mut inner = self.inner.lock();
        inner.failures = inner.failures.saturating_add(1);
        match inner.state {
            BreakerState::Closed if inner.failures >= self.config.failure_threshold => {
                self.transition(&mut inner, BreakerState::Open)
            }
            BreakerState::HalfOpen => self.transition(&mut inner, BreakerState::Open),
            _ => {}
        }
        self.publish(inner.state, inner.failures);
    }

    /// The state and the count of consecutive failures.
    pub fn snapshot(&self) -> (BreakerState, u32) {
        let mut inner = self.inner.lock();
        if inner.state == BreakerState::Open && inner.opened_at.elapsed() >= self.config.recovery {
            self.transition(&mut inner, BreakerState::HalfOpen);
        }
        (inner.state, inner.failures)
    }

    /// How long until an OPEN breaker lets a trial through.
    pub fn wait_hint(&self) -> Duration {
        let inner = self.inner.lock();
        match inner.state {
            BreakerState::Open => self
                .config
                .recovery
                .saturating_sub(inner.opened_at.elapsed()),
            _ => Duration::ZERO,
        }
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState) {
        if inner.state == to {
            return;
        }
        match to {
            BreakerState::Open => {
                inner.opened_at = Instant::now();
                tracing::warn!(
                    breaker = self.name,
                    failures = inner.failures,
                    "circuit breaker OPEN"
                );
            }
            BreakerState::HalfOpen => {
                inner.trials_admitted = 0;
                inner.trials_passed = 0;
                tracing::info!(breaker = self.name, "circuit breaker HALF_OPEN");
            }
            BreakerState::Closed => tracing::info!(breaker = self.name, "circuit breaker CLOSED"),
        }
        inner.state = to;
        self.metrics
            .circuit_breaker_transitions
            .with_label_values(&[self.name, to.as_str()])
            .inc();
        self.publish(to, inner.failures);
    }

    fn publish(&self, state: BreakerState, failures: u32) {
        self.metrics
            .circuit_breaker_state
            .with_label_values(&[self.name])
            .set(state.as_gauge());
        self.metrics
            .circuit_breaker_failures
            .with_label_values(&[self.name])
            .set(failures as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(recovery_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(
            "test",
            BreakerConfig {
                failure_threshold: 5,
                recovery: Duration::from_millis(recovery_ms),
                half_open_calls: 3,
            },
            Arc::new(Metrics::new()),
        )
    }

    #[test]
    fn opens_after_five_consecutive_failures() {
        let b = breaker(60_000);
        for _ in 0..4 {
            assert!(b.allow());
            b.failure();
        }
        b.success();
        for _ in 0..4 {
            b.failure();
        }
        assert_eq!(b.snapshot(), (BreakerState::Closed, 4));
        b.failure();
        assert_eq!(b.snapshot().0, BreakerState::Open);
        assert!(!b.allow());
        assert!(b.wait_hint() > Duration::from_secs(59));
    }

    #[test]
    fn half_opens_then_closes_after_three_good_trials() {
        let b = breaker(20);
        for _ in 0..5 {
            b.failure();
        }
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.snapshot().0, BreakerState::HalfOpen);
        assert!(b.allow() && b.allow() && b.allow());
        assert!(!b.allow(), "only three trials");
        b.success();
        b.success();
        assert_eq!(b.snapshot().0, BreakerState::HalfOpen);
        b.success();
        assert_eq!(b.snapshot(), (BreakerState::Closed, 0));
        assert!(b.allow());
    }

    #[test]
    fn a_failed_trial_reopens() {
        let b = breaker(20);
        for _ in 0..5 {
            b.failure();
        }
        std::thread::sleep(Duration::from_millis(30));
        assert!(b.allow());
        b.success();
        assert!(b.allow());
        b.failure();
        assert_eq!(b.snapshot().0, BreakerState::Open);
        assert!(!b.allow());
        let t = &b.metrics.circuit_breaker_transitions;
        assert_eq!(t.with_label_values(&["test", "OPEN"]).get(), 2);
        assert_eq!(t.with_label_values(&["test", "HALF_OPEN"]).get(), 1);
    }
}
