//! How far this node's delivery of numbered events has got: what each
//! message's number means, and where a gap starts.

use std::collections::HashMap;
use std::time::Instant;

use crate::auth::TenantId;
use crate::broker::Scope;
use crate::channel::Channel;
use crate::event::unix_ms;

/// A new scope's history is read from a little before its first
/// connection came, by Redis's clock as last measured: by the measure's
/// error (half its round trip), this slack, and what the clocks may have
/// drifted apart since (500 ppm, up to [`MAX_DRIFT_US`]). A connection of a
/// new scope may so receive an event published that little before it
/// connected (more only while its tenant's numbers run ahead of the clock:
/// a second after Redis reloaded its data).
pub(super) const NEW_SCOPE_SLACK_US: i64 = 2_000;
pub(super) const MAX_DRIFT_US: i64 = 50_000;

/// How far ahead of Redis's clock a number may be and still be the
/// function's: numbers follow the clock (in microseconds), and run ahead of
/// it only by a burst of more than one event per microsecond, or by the
/// jump after a reload (one second). A number beyond this is not trusted.
pub(super) const TRUST_AHEAD_US: u64 = 600_000_000;

/// A tenant's last number is taken as where its gap starts only when it is
/// at most this far ahead of the clock when the subscription was last seen
/// alive; else (a number that could not be trusted to mark the end of what
/// arrived) the gap starts this far before that moment instead.
pub(super) const LEAD_US: u64 = 5_000_000;

/// The last number delivered of a tenant, and the channels it was delivered
/// on so far: the function publishes an event once per scope, each message
/// with that scope's channels only.
#[derive(Debug, Default, Clone)]
pub(super) struct Last {
    pub(super) n: u64,
    pub(super) on: Vec<Channel>,
}

/// How far this node's delivery of numbered events has got. Nothing a
/// message says can make the node skip a later one: the only numbers that
/// skip live messages are the counters a gap fill read from Redis itself.
#[derive(Debug)]
pub(super) struct Position {
    /// Per tenant, the last event delivered (live or filled). Bounded: past
    /// `MAX_TENANTS` it starts again (a gap then starts from the clock).
    pub(super) delivered: HashMap<TenantId, Last>,
    /// The scopes the last fills read, each with its tenant's counter
    /// then: a live message of the scope numbered up to it was filled
    /// already.
    pub(super) filled: HashMap<Scope, u64>,
    /// Redis's clock minus this node's, in microseconds, as the last fill
    /// measured it.
    pub(super) offset_us: i64,
    /// How far that measure may be off (half the call's round trip), and
    /// when it was made.
    pub(super) offset_error_us: i64,
    pub(super) measured: Instant,
    /// When the subscription last showed it was alive (a message or a PONG).
    pub(super) alive: Instant,
    /// When the last plain (unnumbered) `PUBLISH` arrived.
    pub(super) plain_seen: Option<Instant>,
    /// The `run_id` of the Redis process the last fill read from.
    pub(super) run_id: Option<String>,
}

pub(super) const MAX_TENANTS: usize = 100_000;

impl Default for Position {
    fn default() -> Position {
        Position {
            delivered: HashMap::new(),
            filled: HashMap::new(),
            offset_us: 0,
            offset_error_us: MAX_DRIFT_US,
            measured: Instant::now(),
            alive: Instant::now(),
            plain_seen: None,
            run_id: None,
        }
    }
}

/// What to do with a numbered message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Deliver it on these channels.
    Deliver(Vec<Channel>),
    /// The last fill delivered it already.
    Filled,
    /// Its number is beyond what Redis can have given.
    Untrusted,
}

impl Position {
    /// Redis's clock now, as this node estimates it, in microseconds.
    pub(super) fn redis_now_us(&self) -> u64 {
        (unix_us() + self.offset_us).max(0) as u64
    }

    /// How long before a new scope's first connection its history is read
    /// from (see [`NEW_SCOPE_SLACK_US`]).
    pub(super) fn new_scope_margin_us(&self) -> i64 {
        let drift = (self.measured.elapsed().as_micros() as i64 / 2_000).min(MAX_DRIFT_US);
        self.offset_error_us + NEW_SCOPE_SLACK_US + drift
    }

    /// Redis's clock when the subscription was last seen alive.
    pub(super) fn redis_alive_us(&self) -> u64 {
        let ago = self.alive.elapsed().as_micros() as u64;
        self.redis_now_us().saturating_sub(ago)
    }

    /// Judges message `n` of `scope` on `channels`; changes nothing.
    pub(super) fn judge(&mut self, scope: Scope, n: u64, channels: &[Channel]) -> Verdict {
        if n > self.redis_now_us().saturating_add(TRUST_AHEAD_US) {
            return Verdict::Untrusted;
        }
        if let Some(&counter) = self.filled.get(&scope) {
            if n <= counter {
                return Verdict::Filled;
            }
            // A tenant's numbers grow in the order Redis runs its calls:
            // every later message of the scope is past the fill.
            self.filled.remove(&scope);
        }
        Verdict::Deliver(self.undelivered(scope.tenant(), n, channels))
    }

    /// The channels of event `n` of `tenant` it was not delivered on yet
    /// (all, unless `n` is the last delivered).
    pub(super) fn undelivered(
        &self,
        tenant: TenantId,
        n: u64,
        channels: &[Channel],
    ) -> Vec<Channel> {
        match self.delivered.get(&tenant) {
            Some(last) if last.n == n => channels
                .iter()
                .copied()
                .filter(|c| !last.on.contains(c))
                .collect(),
            _ => channels.to_vec(),
        }
    }

    /// Records event `n` of `tenant` delivered on `channels`.
    pub(super) fn delivered(&mut self, tenant: TenantId, n: u64, channels: &[Channel]) {
        if self.delivered.len() >= MAX_TENANTS && !self.delivered.contains_key(&tenant) {
            self.delivered.clear();
        }
        let last = self.delivered.entry(tenant).or_default();
        if n > last.n {
            *last = Last { n, on: Vec::new() };
        }
        if n == last.n {
            for c in channels {
                if !last.on.contains(c) {
                    last.on.push(*c);
                }
            }
        }
    }

    /// Where `tenant`'s gap starts: events numbered after it may be missing.
    pub(super) fn gap_start(&self, tenant: TenantId) -> u64 {
        let alive = self.redis_alive_us();
        match self.delivered.get(&tenant) {
            // The last event is read again: only some of its scopes'
            // messages may have arrived (the rest are filled, the channels
            // already delivered skipped).
            Some(last) if last.n <= alive.saturating_add(LEAD_US) => last.n.saturating_sub(1),
            // Nothing of this tenant arrived since the last fill, or its last
            // number is not one to start from.
            _ => alive.saturating_sub(LEAD_US),
        }
    }
}

pub(super) fn unix_us() -> i64 {
    unix_ms().saturating_mul(1000)
}

/// A stretch of time without a subscription.
#[derive(Debug, Clone, Copy)]
pub(super) struct Gap {
    pub(super) since: Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now_us() -> u64 {
        unix_us() as u64
    }

    #[test]
    fn a_number_beyond_redis_clock_changes_nothing() {
        let mut p = Position::default();
        let scope = Scope::Branch(1, 5);
        let c = [Channel::BranchAdmin(5)];
        for stray in [u64::MAX, now_us() + TRUST_AHEAD_US + 1_000_000] {
            assert_eq!(p.judge(scope, stray, &c), Verdict::Untrusted);
        }
        assert!(p.delivered.is_empty());
        assert_eq!(p.judge(scope, now_us(), &c), Verdict::Deliver(c.to_vec()));
    }

    #[test]
    fn a_plausible_stray_never_silences_later_events() {
        let mut p = Position::default();
        let scope = Scope::Branch(1, 5);
        let c = [Channel::BranchAdmin(5)];
        let stray = now_us() + 60_000_000;
        assert_eq!(p.judge(scope, stray, &c), Verdict::Deliver(c.to_vec()));
        p.delivered(1, stray, &c);
        let next = now_us();
        assert_eq!(p.judge(scope, next, &c), Verdict::Deliver(c.to_vec()));
        // And a gap after it starts from the clock, not from the stray.
        assert!(p.gap_start(1) < next);
    }

    #[test]
    fn only_the_scopes_a_fill_read_skip_what_it_filled() {
        let mut p = Position::default();
        let read = Scope::Branch(1, 5);
        let joined_during_fill = Scope::Branch(1, 6);
        let n = now_us();
        p.filled.insert(read, n);
        let c5 = [Channel::BranchAdmin(5)];
        let c6 = [Channel::BranchAdmin(6)];
        assert_eq!(p.judge(read, n - 10, &c5), Verdict::Filled);
        assert_eq!(
            p.judge(joined_during_fill, n - 5, &c6),
            Verdict::Deliver(c6.to_vec()),
            "a scope registered during the fill gets its live events"
        );
        assert_eq!(p.judge(read, n + 1, &c5), Verdict::Deliver(c5.to_vec()));
        assert!(
            !p.filled.contains_key(&read),
            "past the fill, nothing more is skipped"
        );
    }

    #[test]
    fn each_scopes_share_of_an_event_is_delivered_once() {
        let mut p = Position::default();
        let (a, b) = (Channel::Session(1), Channel::BranchAdmin(5));
        let n = now_us();
        p.delivered(1, n, &[a]);
        assert_eq!(
            p.judge(Scope::Branch(1, 5), n, &[a, b]),
            Verdict::Deliver(vec![b])
        );
        assert_eq!(p.gap_start(1), n - 1, "the last event is read again");
        assert_eq!(p.gap_start(2) / 1_000_000, (now_us() - LEAD_US) / 1_000_000);
    }
}
