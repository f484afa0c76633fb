//! Event history for resume after a disconnect (PROTOCOL.md §14).
//!
//! Every event published through the gateway gets a sequence number from one
//! counter, so that numbers order events across branches and sessions; the
//! event is kept in the history of each scope (a tenant's branch, table
//! session, user, or its whole staff) that one of its channels names. A resume reads the client's
//! scopes after its cursor and merges them by sequence number. History is
//! bounded per scope by size and age; when a bound has cut into the events a
//! client missed, or the cursor is unknown, the answer is "not recovered".
//!
//! [`MemoryHistory`] is the embedded broker's; the Redis broker keeps the
//! same model in Redis Streams (see `redis.rs`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tungstenite::Utf8Bytes;

use crate::auth::{BranchId, SessionId, TenantId, UserId};
use crate::channel::Channel;
use crate::event::{Fields, unix_ms};

/// A tenant's branch, table session, user or whole staff: the unit history
/// is kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Branch(TenantId, BranchId),
    Session(TenantId, SessionId),
    /// `channel:user:{u}`'s events.
    User(TenantId, UserId),
    /// `channel:tenant:staff`'s events.
    TenantStaff(TenantId),
}

impl Scope {
    /// The scope an event published on `channel` is kept in.
    pub fn of(channel: Channel, fields: &Fields) -> Scope {
        let t = fields.tenant_id;
        match channel {
            Channel::Session(s) => Scope::Session(t, s),
            Channel::User(u) => Scope::User(t, u),
            Channel::TenantStaff => Scope::TenantStaff(t),
            other => Scope::Branch(t, other.branch().unwrap_or(fields.branch_id)),
        }
    }

    /// The scope within its tenant: `branch:{b}`, `session:{s}`,
    /// `user:{u}` or `staff`, as the Redis keys and scope channels name it
    /// (`lua/wsgateway.lua` names them alike).
    pub fn suffix(self) -> String {
        match self {
            Scope::Branch(_, b) => format!("branch:{b}"),
            Scope::Session(_, s) => format!("session:{s}"),
            Scope::User(_, u) => format!("user:{u}"),
            Scope::TenantStaff(_) => "staff".to_owned(),
        }
    }

    /// The scope [`Scope::suffix`] names, of `tenant`.
    pub fn from_suffix(tenant: TenantId, suffix: &str) -> Option<Scope> {
        let id = |digits: &str| {
            digits
                .parse::<i64>()
                .ok()
                .filter(|n| n.to_string() == digits)
        };
        Some(match suffix.split_once(':') {
            None if suffix == "staff" => Scope::TenantStaff(tenant),
            Some(("branch", b)) => Scope::Branch(tenant, id(b)?),
            Some(("session", s)) => Scope::Session(tenant, id(s)?),
            Some(("user", u)) => Scope::User(tenant, id(u)?),
            _ => return None,
        })
    }

    pub fn tenant(self) -> TenantId {
        match self {
            Scope::Branch(t, _)
            | Scope::Session(t, _)
            | Scope::User(t, _)
            | Scope::TenantStaff(t) => t,
        }
    }
}

/// The distinct scopes of a publication's channels.
pub fn scopes_of(channels: &[Channel], fields: &Fields) -> Vec<Scope> {
    let mut scopes: Vec<Scope> = channels.iter().map(|c| Scope::of(*c, fields)).collect();
    scopes.sort_unstable();
    scopes.dedup();
    scopes
}

/// A publication's channels grouped by the scope each is kept in, in scope
/// order, each channel in its first place. Linear (a map from scope to its
/// channels), for C channels in S scopes: O(C log S).
pub fn group_by_scope(channels: &[Channel], fields: &Fields) -> Vec<(Scope, Vec<Channel>)> {
    let mut groups: BTreeMap<Scope, Vec<Channel>> = BTreeMap::new();
    for &c in channels {
        groups.entry(Scope::of(c, fields)).or_default().push(c);
    }
    groups.into_iter().collect()
}

/// Where a resume starts: after the event with this id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    /// A gateway-assigned id: the sequence number itself.
    Seq(u64),
    /// A caller-supplied id, looked up in the tenant's id index.
    Caller(String),
}

impl Cursor {
    /// A cursor means exactly its text: only the canonical decimal form of
    /// a number (`42`, never `0042` or `+42`) is a sequence number; any
    /// other text is a caller's id, so `0042` is not the event `42`.
    pub fn parse(id: &str) -> Option<Cursor> {
        if id.is_empty() || id.len() > crate::event::MAX_EVENT_ID_BYTES {
            return None;
        }
        Some(match id.parse::<u64>() {
            Ok(n) if n.to_string() == id => Cursor::Seq(n),
            _ => Cursor::Caller(id.to_owned()),
        })
    }
}

/// One kept event.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    /// Shared by the entries of every scope of the publication.
    pub frame: Utf8Bytes,
    /// Shared likewise: a publication on C channels in S scopes keeps its
    /// list once, not S times (memory linear in its size, PROTOCOL.md §10).
    pub channels: Arc<[Channel]>,
    /// When it was kept, Unix ms.
    pub kept_ms: i64,
}

/// What a resume finds.
#[derive(Debug, Default)]
pub struct Found {
    /// False when the cursor is unknown or a bound cut into what followed it.
    pub recovered: bool,
    /// The events after the cursor in the client's scopes, in sequence
    /// order, each once (not yet filtered by audience).
    pub entries: Vec<Entry>,
}

/// Entries read from several scopes' histories, merged into one per event
/// in sequence order. Redis keeps in each scope's entry only the channels
/// of that scope, so the channels of one event's entries are united (each
/// once: entries written before that carry the whole list). Linear in what
/// was read.
#[derive(Default)]
pub struct Merged {
    by_seq: BTreeMap<u64, (Entry, Vec<Channel>, HashSet<Channel>)>,
}

impl Merged {
    pub fn add(&mut self, entry: Entry) {
        let (_, channels, seen) = self
            .by_seq
            .entry(entry.seq)
            .or_insert_with(|| (entry.clone(), Vec::new(), HashSet::new()));
        for &c in entry.channels.iter() {
            if seen.insert(c) {
                channels.push(c);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_seq.is_empty()
    }

    /// The merged entries, in sequence order.
    pub fn into_entries(self) -> Vec<Entry> {
        self.by_seq
            .into_values()
            .map(|(entry, channels, _)| Entry {
                channels: channels.into(),
                ..entry
            })
            .collect()
    }
}

/// The bounds of history, per scope.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub size: usize,
    pub ttl: Duration,
    /// The most events one resume may read after its cursor, all its scopes
    /// together: a resume that would read more is "not recovered", so that
    /// a reconnect storm costs each client a bounded read and send.
    pub max_replay: usize,
}

/// Frames carry `event_id` first: `{"event_id":"<id>",` + the rest of the
/// serialized object. The Redis script builds the same text.
pub fn frame_with_id(id: &str, object_text: &str) -> String {
    let id_json = serde_json::Value::String(id.to_owned()).to_string();
    let rest = object_text.strip_prefix('{').unwrap_or(object_text);
    if rest.trim_start().starts_with('}') {
        format!("{{\"event_id\":{id_json}{rest}")
    } else {
        format!("{{\"event_id\":{id_json},{rest}")
    }
}

#[derive(Default)]
struct ScopeLog {
    entries: VecDeque<Entry>,
    /// The highest sequence number trimmed away (0: none).
    max_trimmed: u64,
}

#[derive(Default)]
struct Inner {
    seq: u64,
    scopes: HashMap<Scope, ScopeLog>,
    /// Caller-supplied ids → sequence number, with when they were kept.
    caller_ids: HashMap<(TenantId, String), (u64, i64)>,
    caller_order: VecDeque<(i64, TenantId, String)>,
}

/// The embedded broker's bounded in-memory history.
pub struct MemoryHistory {
    limits: HistoryLimits,
    /// A `parking_lot` mutex: appends and reads are memory copies, and
    /// nothing is awaited while it is held.
    inner: Mutex<Inner>,
}

impl MemoryHistory {
    pub fn new(limits: HistoryLimits) -> MemoryHistory {
        MemoryHistory {
            limits,
            inner: Mutex::new(Inner {
                // Numbering starts from the clock (in microseconds), so
                // that after a restart no number a client may hold is reused.
                seq: (unix_ms().max(0) as u64) * 1000,
                ..Inner::default()
            }),
        }
    }

    /// Drops what the age bound has expired, and scopes left empty: quiet
    /// branches and closed table sessions do not keep memory.
    pub fn prune(&self) {
        let now = unix_ms();
        let ttl_ms = self.limits.ttl.as_millis() as i64;
        let mut inner = self.inner.lock();
        inner.scopes.retain(|_, log| {
            while log
                .entries
                .front()
                .is_some_and(|e| now - e.kept_ms > ttl_ms)
            {
                let trimmed = log.entries.pop_front().expect("front exists");
                log.max_trimmed = log.max_trimmed.max(trimmed.seq);
            }
            // Once empty, every cursor this log could vouch for is expired.
            !log.entries.is_empty()
        });
    }

    /// Keeps one publication; `frame_for` builds its frame from its id.
    /// Returns the id and the frame, or `Err` with the id when the tenant
    /// used the caller's `event_id` within the history's age already (the
    /// publication is a retry: nothing is kept again).
    pub fn append(
        &self,
        channels: &Arc<[Channel]>,
        fields: &Fields,
        frame_for: impl FnOnce(&str) -> String,
    ) -> Result<(String, Utf8Bytes), String> {
        let now = unix_ms();
        let ttl_ms = self.limits.ttl.as_millis() as i64;
        let mut inner = self.inner.lock();
        if let Some(caller) = &fields.event_id
            && inner
                .caller_ids
                .get(&(fields.tenant_id, caller.clone()))
                .is_some_and(|(_, kept)| now - kept <= ttl_ms)
        {
            return Err(caller.clone());
        }
        inner.seq += 1;
        let seq = inner.seq;
        let id = fields.event_id.clone().unwrap_or_else(|| seq.to_string());
        let frame = Utf8Bytes::from(frame_for(&id));
        if let Some(caller) = &fields.event_id {
            inner
                .caller_ids
                .insert((fields.tenant_id, caller.clone()), (seq, now));
            inner
                .caller_order
                .push_back((now, fields.tenant_id, caller.clone()));
        }
        while let Some((at, _, _)) = inner.caller_order.front() {
            if now - at <= ttl_ms && inner.caller_order.len() <= self.limits.size.saturating_mul(64)
            {
                break;
            }
            let (at, tenant, id) = inner.caller_order.pop_front().expect("front exists");
            if inner
                .caller_ids
                .get(&(tenant, id.clone()))
                .is_some_and(|(_, kept)| *kept == at)
            {
                inner.caller_ids.remove(&(tenant, id));
            }
        }
        for scope in scopes_of(channels, fields) {
            let log = inner.scopes.entry(scope).or_default();
            log.entries.push_back(Entry {
                seq,
                frame: frame.clone(),
                channels: channels.clone(),
                kept_ms: now,
            });
            while log.entries.len() > self.limits.size
                || log
                    .entries
                    .front()
                    .is_some_and(|e| now - e.kept_ms > ttl_ms)
            {
                let trimmed = log.entries.pop_front().expect("front exists");
                log.max_trimmed = log.max_trimmed.max(trimmed.seq);
            }
        }
        Ok((id, frame))
    }

    /// The events after `cursor` in `scopes` (see [`Found`]).
    pub fn after(&self, tenant: TenantId, scopes: &[Scope], cursor: &Cursor) -> Found {
        let now = unix_ms();
        let ttl_ms = self.limits.ttl.as_millis() as i64;
        let inner = self.inner.lock();
        // A caller-supplied id is looked up first, so that an all-digit
        // caller id still works as a cursor.
        let id = match cursor {
            Cursor::Seq(n) => n.to_string(),
            Cursor::Caller(id) => id.clone(),
        };
        let seq = match (inner.caller_ids.get(&(tenant, id)), cursor) {
            (Some((n, _)), _) => Some(*n),
            (None, Cursor::Seq(n)) => Some(*n),
            (None, Cursor::Caller(_)) => None,
        };
        let Some(seq) = seq.filter(|n| *n <= inner.seq) else {
            return Found::default();
        };
        let logs: Vec<&ScopeLog> = scopes.iter().filter_map(|s| inner.scopes.get(s)).collect();
        let cursor_entry = logs
            .iter()
            .flat_map(|log| log.entries.iter())
            .find(|e| e.seq == seq);
        let fresh = cursor_entry.is_some_and(|e| now.saturating_sub(e.kept_ms) <= ttl_ms);
        let cut = logs.iter().any(|log| log.max_trimmed > seq);
        if !fresh || cut {
            return Found::default();
        }
        let mut merged = BTreeMap::new();
        for log in logs {
            for e in log.entries.iter().filter(|e| e.seq > seq) {
                merged.entry(e.seq).or_insert_with(|| e.clone());
                if merged.len() > self.limits.max_replay {
                    return Found::default();
                }
            }
        }
        Found {
            recovered: true,
            entries: merged.into_values().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(tenant: i64, branch: i64, id: Option<&str>) -> Fields {
        Fields {
            event_type: "X".into(),
            tenant_id: tenant,
            branch_id: branch,
            sector_id: None,
            session_id: None,
            ts_ms: None,
            event_id: id.map(str::to_owned),
            entity_waiter_id: None,
            ack_within_s: None,
        }
    }

    fn keep(h: &MemoryHistory, channel: Channel, f: &Fields) -> String {
        h.append(&Arc::from([channel]), f, |id| {
            frame_with_id(id, r#"{"type":"X"}"#)
        })
        .expect("not a retry")
        .0
    }

    #[test]
    fn a_publication_in_many_scopes_keeps_its_channels_once() {
        let h = MemoryHistory::new(HistoryLimits {
            size: 10,
            ttl: Duration::from_secs(60),
            max_replay: 10,
        });
        let f = fields(1, 5, None);
        let cursor = keep(&h, Channel::BranchAdmin(5), &f);
        let channels: Arc<[Channel]> = (0..100).map(Channel::Session).collect();
        h.append(&channels, &f, |id| frame_with_id(id, r#"{"type":"X"}"#))
            .unwrap();
        let cursor = Cursor::parse(&cursor).unwrap();
        let all: Vec<Scope> = std::iter::once(Scope::Branch(1, 5))
            .chain((0..100).map(|s| Scope::Session(1, s)))
            .collect();
        let found = h.after(1, &all, &cursor);
        assert!(found.recovered);
        assert_eq!(found.entries.len(), 1, "one event, once");
        // One list for the 100 scopes' entries (and this test's handle).
        assert!(Arc::ptr_eq(&found.entries[0].channels, &channels));
        assert_eq!(Arc::strong_count(&channels), 100 + 2);
    }

    #[test]
    fn a_cursor_means_exactly_its_text() {
        assert_eq!(Cursor::parse("42"), Some(Cursor::Seq(42)));
        assert_eq!(Cursor::parse("0"), Some(Cursor::Seq(0)));
        for text in ["0042", "00", "+42", "18446744073709551616", "4 2"] {
            assert_eq!(
                Cursor::parse(text),
                Some(Cursor::Caller(text.to_owned())),
                "{text}"
            );
        }
        assert_eq!(Cursor::parse(""), None);
    }

    #[test]
    fn frames_carry_the_id_first() {
        assert_eq!(
            frame_with_id("7", r#"{"type":"X","a":1}"#),
            r#"{"event_id":"7","type":"X","a":1}"#
        );
        assert_eq!(frame_with_id("a\"b", "{}"), r#"{"event_id":"a\"b"}"#);
    }

    #[test]
    fn resume_merges_scopes_in_publish_order() {
        let h = MemoryHistory::new(HistoryLimits {
            size: 10,
            ttl: Duration::from_secs(60),
            max_replay: 10,
        });
        let b5 = Scope::Branch(1, 5);
        let b6 = Scope::Branch(1, 6);
        let first = keep(&h, Channel::BranchWaiters(5), &fields(1, 5, None));
        keep(&h, Channel::BranchKitchen(6), &fields(1, 6, None));
        keep(&h, Channel::BranchAdmin(5), &fields(2, 5, None));
        keep(&h, Channel::BranchAdmin(5), &fields(1, 5, Some("mine")));
        let found = h.after(1, &[b5, b6], &Cursor::parse(&first).unwrap());
        assert!(found.recovered);
        let base = first.parse::<u64>().unwrap() - 1;
        let seqs: Vec<u64> = found.entries.iter().map(|e| e.seq - base).collect();
        assert_eq!(seqs, vec![2, 4], "tenant 2's branch 5 is another scope");
        let found = h.after(1, &[b5, b6], &Cursor::parse("mine").unwrap());
        assert!(found.recovered && found.entries.is_empty());
        assert!(
            !h.after(2, &[b5], &Cursor::parse("mine").unwrap()).recovered,
            "ids are per tenant"
        );
        assert!(
            !h.after(1, &[b5], &Cursor::parse("99").unwrap()).recovered,
            "unknown"
        );
        assert!(!h.after(1, &[b5], &Cursor::parse("nope").unwrap()).recovered);
    }

    #[test]
    fn a_retried_caller_id_keeps_nothing_and_its_cursor_names_the_first() {
        let h = MemoryHistory::new(HistoryLimits {
            size: 10,
            ttl: Duration::from_secs(60),
            max_replay: 10,
        });
        let first = keep(&h, Channel::BranchAdmin(5), &fields(1, 5, Some("pay-77")));
        assert_eq!(first, "pay-77");
        keep(&h, Channel::BranchAdmin(5), &fields(1, 5, None));
        let retry = h.append(
            &Arc::from([Channel::BranchAdmin(5)]),
            &fields(1, 5, Some("pay-77")),
            |id| frame_with_id(id, "{}"),
        );
        assert_eq!(retry.unwrap_err(), "pay-77");
        let found = h.after(1, &[Scope::Branch(1, 5)], &Cursor::parse("pay-77").unwrap());
        assert!(found.recovered);
        assert_eq!(found.entries.len(), 1, "what came after the first");
        assert!(
            keep(&h, Channel::BranchAdmin(5), &fields(2, 5, Some("pay-77"))) == "pay-77",
            "another tenant's ids are its own"
        );
    }

    #[test]
    fn a_bound_cutting_into_the_missed_events_is_not_recovered() {
        let h = MemoryHistory::new(HistoryLimits {
            size: 3,
            ttl: Duration::from_secs(60),
            max_replay: 10,
        });
        let ids: Vec<String> = (0..5)
            .map(|_| keep(&h, Channel::BranchWaiters(5), &fields(1, 5, None)))
            .collect();
        let b5 = [Scope::Branch(1, 5)];
        assert!(
            !h.after(1, &b5, &Cursor::parse(&ids[0]).unwrap()).recovered,
            "trimmed away"
        );
        assert!(
            !h.after(1, &b5, &Cursor::parse(&ids[1]).unwrap()).recovered,
            "cursor kept? no: only the last 3"
        );
        let found = h.after(1, &b5, &Cursor::parse(&ids[2]).unwrap());
        assert!(found.recovered);
        assert_eq!(found.entries.len(), 2);
        let old = MemoryHistory::new(HistoryLimits {
            size: 3,
            ttl: Duration::from_millis(1),
            max_replay: 10,
        });
        let id = keep(&old, Channel::BranchWaiters(5), &fields(1, 5, None));
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            !old.after(1, &b5, &Cursor::parse(&id).unwrap()).recovered,
            "too old"
        );
    }

    #[test]
    fn merged_entries_unite_their_scopes_channels_once() {
        let entry = |seq, channels: &[Channel]| Entry {
            seq,
            frame: "{}".into(),
            channels: channels.into(),
            kept_ms: 0,
        };
        let mut m = Merged::default();
        m.add(entry(2, &[Channel::Session(1)]));
        m.add(entry(1, &[Channel::BranchAdmin(5), Channel::Session(1)]));
        m.add(entry(2, &[Channel::Session(2), Channel::Session(1)]));
        m.add(entry(1, &[Channel::BranchAdmin(5), Channel::Session(1)]));
        let out = m.into_entries();
        assert_eq!(out.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            &*out[0].channels,
            &[Channel::BranchAdmin(5), Channel::Session(1)]
        );
        assert_eq!(
            &*out[1].channels,
            &[Channel::Session(1), Channel::Session(2)]
        );
    }
}
