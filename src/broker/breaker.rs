//! A circuit breaker (the seed's numbers: 5 consecutive failures open it, 30 s
//! later it half-opens, and 3 trial calls decide).
//!
//! CLOSED → (threshold consecutive failures) → OPEN → (recovery time, or a
//! successful out-of-band probe) → HALF_OPEN → (every trial succeeds) →
//! CLOSED, or (any trial fails, or the trial deadline passes) → OPEN.
//!
//! Every caller asks [`CircuitBreaker::allow`] first; an admitted call gets a
//! [`Permit`] and reports its outcome with [`Permit::success`] or
//! [`Permit::failure`]. A permit dropped without either (the call's future
//! was dropped, say an HTTP client went away mid-request) is *abandoned*: its
//! outcome is unknown, so nothing is recorded, but a HALF_OPEN trial slot it
//! held is freed so that another call can be the trial. The breaker can
//! therefore never be wedged in HALF_OPEN by trials that never report back.
//!
//! Each permit belongs to one epoch: a counter that moves on every state
//! change. An outcome applies only if the breaker is still in the epoch the
//! permit was admitted in, so a late answer from an old half-open round (or
//! from before the breaker opened) cannot close, reopen, or free a slot in a
//! later round. A failure from a CLOSED permit still counts while the breaker
//! stays CLOSED.
//!
//! HALF_OPEN has a deadline ([`BreakerConfig::trial_deadline`]): a round that
//! has not closed the breaker within that time of entering HALF_OPEN counts
//! as failed and the breaker goes back to OPEN. Like OPEN → HALF_OPEN after
//! the recovery time, this is checked lazily, whenever the breaker is asked
//! (`allow`, `snapshot`, `wait_hint`, `probe_succeeded`) or a permit reports.
//!
//! [`CircuitBreaker::probe_succeeded`] lets an out-of-band health probe (a
//! PING sent outside the breaker) half-open an OPEN breaker at once, without
//! waiting for the recovery time: recovery after an outage should follow the
//! backend's return within seconds, while the trial calls still decide
//! whether it closes.

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
    /// How long a half-open round may take to close the breaker before it
    /// counts as failed and the breaker reopens. Should exceed the longest a
    /// single call can take.
    pub trial_deadline: Duration,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    failures: u32,
    opened_at: Instant,
    half_opened_at: Instant,
    /// Trial slots taken in this half-open round: in flight or passed.
    trials_admitted: u32,
    trials_passed: u32,
    /// Moves on every state change; permits carry the one they were
    /// admitted in.
    epoch: u64,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Success,
    Failure,
    Abandoned,
}

pub struct CircuitBreaker {
    name: &'static str,
    config: BreakerConfig,
    /// Held for a few field updates, never across an await.
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

/// Leave to make one call, from [`CircuitBreaker::allow`]. Report the
/// call's outcome with [`Permit::success`] or [`Permit::failure`]; dropping
/// the permit without either abandons it (outcome unknown): nothing is
/// recorded, and a half-open trial slot it held is freed.
#[must_use = "report the call's outcome with success() or failure()"]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    epoch: u64,
    settled: bool,
}

impl Permit<'_> {
    /// The call succeeded.
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.settle(self.epoch, Outcome::Success);
    }

    /// The call failed.
    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.settle(self.epoch, Outcome::Failure);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.settle(self.epoch, Outcome::Abandoned);
        }
    }
}

impl std::fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("breaker", &self.breaker.name)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl CircuitBreaker {
    pub fn new(name: &'static str, config: BreakerConfig, metrics: Arc<Metrics>) -> CircuitBreaker {
        let now = Instant::now();
        let breaker = CircuitBreaker {
            name,
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                failures: 0,
                opened_at: now,
                half_opened_at: now,
                trials_admitted: 0,
                trials_passed: 0,
                epoch: 0,
            }),
            metrics,
        };
        breaker.publish(BreakerState::Closed, 0);
        breaker
    }

    /// Whether a call may go ahead now: a permit to report its outcome
    /// with, or None. In OPEN, calls fail fast until the recovery time has
    /// passed; in HALF_OPEN only the trial calls pass.
    pub fn allow(&self) -> Option<Permit<'_>> {
        let mut inner = self.inner.lock();
        self.tick(&mut inner);
        let admitted = match inner.state {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen if inner.trials_admitted < self.config.half_open_calls => {
                inner.trials_admitted += 1;
                true
            }
            BreakerState::HalfOpen => false,
        };
        admitted.then(|| Permit {
            breaker: self,
            epoch: inner.epoch,
            settled: false,
        })
    }

    /// An out-of-band health probe found the backend answering. An OPEN
    /// breaker half-opens now instead of waiting out the recovery time, so
    /// recovery follows the backend's return within seconds; the trial calls
    /// still decide whether it closes. Otherwise a no-op.
    pub fn probe_succeeded(&self) {
        let mut inner = self.inner.lock();
        self.tick(&mut inner);
        if inner.state == BreakerState::Open {
            self.transition(&mut inner, BreakerState::HalfOpen);
        }
    }

    /// The state and the count of consecutive failures.
    pub fn snapshot(&self) -> (BreakerState, u32) {
        let mut inner = self.inner.lock();
        self.tick(&mut inner);
        (inner.state, inner.failures)
    }

    /// How long until an OPEN breaker lets a trial through.
    pub fn wait_hint(&self) -> Duration {
        let mut inner = self.inner.lock();
        self.tick(&mut inner);
        match inner.state {
            BreakerState::Open => self
                .config
                .recovery
                .saturating_sub(inner.opened_at.elapsed()),
            _ => Duration::ZERO,
        }
    }

    /// The time-driven transitions, checked lazily: a half-open round past
    /// its deadline has failed (→ OPEN), and an OPEN breaker past its
    /// recovery time half-opens.
    fn tick(&self, inner: &mut Inner) {
        if inner.state == BreakerState::HalfOpen
            && inner.half_opened_at.elapsed() >= self.config.trial_deadline
        {
            tracing::warn!(
                breaker = self.name,
                trials_passed = inner.trials_passed,
                "circuit breaker trials missed their deadline"
            );
            self.transition(inner, BreakerState::Open);
        }
        if inner.state == BreakerState::Open && inner.opened_at.elapsed() >= self.config.recovery {
            self.transition(inner, BreakerState::HalfOpen);
        }
    }

    /// Applies a permit's outcome, if the breaker is still in the epoch the
    /// permit was admitted in (then it is in the same state, CLOSED or
    /// HALF_OPEN, as when the permit was given).
    fn settle(&self, epoch: u64, outcome: Outcome) {
        let mut inner = self.inner.lock();
        self.tick(&mut inner);
        if inner.epoch != epoch {
            return;
        }
        match (inner.state, outcome) {
            (BreakerState::Closed, Outcome::Success) => inner.failures = 0,
            (BreakerState::Closed, Outcome::Failure) => {
                inner.failures = inner.failures.saturating_add(1);
                if inner.failures >= self.config.failure_threshold {
                    self.transition(&mut inner, BreakerState::Open);
                }
            }
            (BreakerState::HalfOpen, Outcome::Success) => {
                inner.trials_passed += 1;
                if inner.trials_passed >= self.config.half_open_calls {
                    inner.failures = 0;
                    self.transition(&mut inner, BreakerState::Closed);
                }
            }
            (BreakerState::HalfOpen, Outcome::Failure) => {
                inner.failures = inner.failures.saturating_add(1);
                self.transition(&mut inner, BreakerState::Open);
            }
            (BreakerState::HalfOpen, Outcome::Abandoned) => {
                inner.trials_admitted = inner.trials_admitted.saturating_sub(1);
            }
            (BreakerState::Closed, Outcome::Abandoned) => return,
            // No permit is given in OPEN, and every state change moves the
            // epoch.
            (BreakerState::Open, _) => return,
        }
        self.publish(inner.state, inner.failures);
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
                inner.half_opened_at = Instant::now();
                inner.trials_admitted = 0;
                inner.trials_passed = 0;
                tracing::info!(breaker = self.name, "circuit breaker HALF_OPEN");
            }
            BreakerState::Closed => tracing::info!(breaker = self.name, "circuit breaker CLOSED"),
        }
        inner.state = to;
        inner.epoch = inner.epoch.wrapping_add(1);
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

    fn breaker_with(recovery_ms: u64, trial_deadline_ms: u64) -> CircuitBreaker {
        CircuitBreaker::new(
            "test",
            BreakerConfig {
                failure_threshold: 5,
                recovery: Duration::from_millis(recovery_ms),
                half_open_calls: 3,
                trial_deadline: Duration::from_millis(trial_deadline_ms),
            },
            Arc::new(Metrics::new()),
        )
    }

    fn breaker(recovery_ms: u64) -> CircuitBreaker {
        breaker_with(recovery_ms, 60_000)
    }

    fn fail(b: &CircuitBreaker) {
        b.allow().expect("admitted").failure();
    }

    fn open(b: &CircuitBreaker) {
        for _ in 0..5 {
            fail(b);
        }
        assert_eq!(b.snapshot().0, BreakerState::Open);
    }

    fn transitions(b: &CircuitBreaker, to: &str) -> u64 {
        b.metrics
            .circuit_breaker_transitions
            .with_label_values(&["test", to])
            .get()
    }

    #[test]
    fn opens_after_five_consecutive_failures() {
        let b = breaker(60_000);
        for _ in 0..4 {
            fail(&b);
        }
        b.allow().unwrap().success();
        for _ in 0..4 {
            fail(&b);
        }
        assert_eq!(b.snapshot(), (BreakerState::Closed, 4));
        fail(&b);
        assert_eq!(b.snapshot(), (BreakerState::Open, 5));
        assert!(b.allow().is_none());
        assert!(b.wait_hint() > Duration::from_secs(59));
        let m = &b.metrics;
        assert_eq!(
            m.circuit_breaker_state.with_label_values(&["test"]).get(),
            1
        );
        assert_eq!(
            m.circuit_breaker_failures
                .with_label_values(&["test"])
                .get(),
            5
        );
    }

    #[test]
    fn half_opens_then_closes_after_three_good_trials() {
        let b = breaker(20);
        open(&b);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.snapshot().0, BreakerState::HalfOpen);
        assert_eq!(b.wait_hint(), Duration::ZERO);
        let (p1, p2, p3) = (b.allow().unwrap(), b.allow().unwrap(), b.allow().unwrap());
        assert!(b.allow().is_none(), "only three trials");
        p1.success();
        p2.success();
        assert_eq!(b.snapshot().0, BreakerState::HalfOpen);
        assert!(b.allow().is_none(), "passed trials keep their slots");
        p3.success();
        assert_eq!(b.snapshot(), (BreakerState::Closed, 0));
        assert!(b.allow().is_some());
    }

    #[test]
    fn a_failed_trial_reopens() {
        let b = breaker(20);
        open(&b);
        std::thread::sleep(Duration::from_millis(30));
        b.allow().unwrap().success();
        let held = b.allow().unwrap();
        b.allow().unwrap().failure();
        assert_eq!(b.snapshot().0, BreakerState::Open);
        assert!(b.allow().is_none());
        // The other trial of that round answering late changes nothing.
        held.success();
        assert_eq!(b.snapshot().0, BreakerState::Open);
        assert_eq!(transitions(&b, "OPEN"), 2);
        assert_eq!(transitions(&b, "HALF_OPEN"), 1);
        assert_eq!(transitions(&b, "CLOSED"), 0);
    }

    #[test]
    fn an_abandoned_trial_frees_its_slot() {
        let b = breaker(20);
        open(&b);
        std::thread::sleep(Duration::from_millis(30));
        let (p1, p2, p3) = (b.allow().unwrap(), b.allow().unwrap(), b.allow().unwrap());
        assert!(b.allow().is_none());
        drop(p2);
        assert_eq!(
            b.snapshot().0,
            BreakerState::HalfOpen,
            "no failure recorded"
        );
        let p4 = b.allow().expect("the dropped trial's slot is free");
        assert!(b.allow().is_none());
        p1.success();
        p3.success();
        assert_eq!(b.snapshot().0, BreakerState::HalfOpen);
        p4.success();
        assert_eq!(b.snapshot(), (BreakerState::Closed, 0));
    }

    #[test]
    fn a_dropped_trial_never_wedges_half_open() {
        let b = breaker(20);
        open(&b);
        std::thread::sleep(Duration::from_millis(30));
        let (p1, p2, p3) = (b.allow().unwrap(), b.allow().unwrap(), b.allow().unwrap());
        drop(p1); // the client went away mid-request
        p2.success();
        p3.success();
        assert_eq!(b.snapshot().0, BreakerState::HalfOpen);
        let p = b.allow().expect("a trial is still admitted, not wedged");
        p.success();
        assert_eq!(b.snapshot(), (BreakerState::Closed, 0));
        assert!(b.allow().is_some());
    }

    #[test]
    fn a_half_open_round_past_its_deadline_reopens() {
        // Recovery is long, so only a probe half-opens it.
        let b = breaker_with(60_000, 40);
        open(&b);
        b.probe_succeeded();
        assert_eq!(b.snapshot().0, BreakerState::HalfOpen);
        let (old1, old2) = (b.allow().unwrap(), b.allow().unwrap());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.snapshot().0, BreakerState::Open, "the round timed out");
        assert!(b.allow().is_none());
        assert!(b.wait_hint() > Duration::from_secs(59));
        old1.success();
        assert_eq!(
            b.snapshot().0,
            BreakerState::Open,
            "an old trial cannot close it"
        );
        assert_eq!(transitions(&b, "OPEN"), 2);
        assert_eq!(transitions(&b, "CLOSED"), 0);

        // A new round: the old permit holds no slot in it and counts for
        // nothing in it.
        b.probe_succeeded();
        let (p1, p2, p3) = (b.allow().unwrap(), b.allow().unwrap(), b.allow().unwrap());
        p1.success();
        p2.success();
        old2.success();
        assert_eq!(b.snapshot().0, BreakerState::HalfOpen);
        p3.success();
        assert_eq!(b.snapshot().0, BreakerState::Closed);
    }

    #[test]
    fn the_deadline_is_checked_when_a_trial_reports() {
        let b = breaker_with(60_000, 40);
        open(&b);
        b.probe_succeeded();
        let (p1, p2, p3) = (b.allow().unwrap(), b.allow().unwrap(), b.allow().unwrap());
        p1.success();
        p2.success();
        std::thread::sleep(Duration::from_millis(60));
        // Nobody asked in the meantime; the last trial arrives too late.
        p3.success();
        assert_eq!(b.snapshot().0, BreakerState::Open);
    }

    #[test]
    fn a_probe_half_opens_at_once_and_is_a_noop_otherwise() {
        let b = breaker(60_000);
        b.probe_succeeded();
        assert_eq!(b.snapshot(), (BreakerState::Closed, 0));
        assert_eq!(transitions(&b, "HALF_OPEN"), 0);

        open(&b);
        assert!(b.allow().is_none());
        b.probe_succeeded();
        assert_eq!(b.snapshot().0, BreakerState::HalfOpen);
        assert_eq!(b.wait_hint(), Duration::ZERO);
        let p = b.allow().expect("a trial");
        b.probe_succeeded(); // no-op in HALF_OPEN: the round goes on
        assert_eq!(transitions(&b, "HALF_OPEN"), 1);
        p.success();
        b.allow().unwrap().success();
        b.allow().unwrap().success();
        assert_eq!(b.snapshot(), (BreakerState::Closed, 0));
    }

    #[test]
    fn a_dropped_permit_when_closed_changes_nothing() {
        let b = breaker(60_000);
        fail(&b);
        fail(&b);
        drop(b.allow().unwrap());
        assert_eq!(b.snapshot(), (BreakerState::Closed, 2));
        fail(&b);
        fail(&b);
        drop(b.allow().unwrap());
        assert_eq!(b.snapshot(), (BreakerState::Closed, 4));
        fail(&b);
        assert_eq!(b.snapshot().0, BreakerState::Open);
    }

    #[test]
    fn permits_from_before_opening_are_ignored() {
        let b = breaker(60_000);
        let (late_ok, late_err) = (b.allow().unwrap(), b.allow().unwrap());
        open(&b);
        late_err.failure();
        assert_eq!(b.snapshot(), (BreakerState::Open, 5));
        b.probe_succeeded();
        late_ok.success();
        assert_eq!(b.snapshot().0, BreakerState::HalfOpen, "not a trial");
        let trials: Vec<_> = (0..3).map(|_| b.allow().unwrap()).collect();
        assert!(b.allow().is_none());
        trials.into_iter().for_each(Permit::success);
        assert_eq!(b.snapshot(), (BreakerState::Closed, 0));
    }
}
