//! Acknowledgements (PROTOCOL.md §15): what the brokers
//! say of an event that asked for one, and the embedded broker's book of
//! them. The Redis broker keeps the same state in Redis, where every node
//! reads it (`lua/wsgateway.lua`, `wsgateway_ack*`), so that the
//! publication, the acks and the deadline may each be on another node and
//! the deadline's step is taken exactly once.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use tungstenite::Utf8Bytes;

use crate::auth::{BranchId, TenantId};
use crate::channel::Channel;
use crate::event::{EVENT_UNACKNOWLEDGED, Fields};

/// What an ack from a connection that received the event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The first ack, in time: the event is acknowledged.
    Acknowledged,
    /// The event was acknowledged already.
    Repeated,
    /// After the escalation, or for an event no longer tracked.
    Late,
}

impl AckOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AckOutcome::Acknowledged => "acknowledged",
            AckOutcome::Repeated => "repeated",
            AckOutcome::Late => "late",
        }
    }

    /// Reads a Redis function's answer.
    pub fn parse(s: &str) -> AckOutcome {
        match s {
            "acknowledged" => AckOutcome::Acknowledged,
            "repeated" => AckOutcome::Repeated,
            _ => AckOutcome::Late,
        }
    }
}

/// Why an escalation was published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unacknowledged {
    /// Connections got it, twice, and none acknowledged it.
    NoAck,
    /// No connection of its audience got it by the first deadline.
    NoAudience,
}

impl Unacknowledged {
    pub const ALL: [Unacknowledged; 2] = [Unacknowledged::NoAck, Unacknowledged::NoAudience];

    pub fn as_str(self) -> &'static str {
        match self {
            Unacknowledged::NoAck => "no_ack",
            Unacknowledged::NoAudience => "no_audience",
        }
    }
}

/// An `EVENT_UNACKNOWLEDGED` escalation, as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    pub tenant: TenantId,
    pub branch: BranchId,
    pub event_id: String,
    pub event_type: String,
    /// The event's first channel.
    pub channel: String,
    pub reason: Unacknowledged,
    /// How many connections got the event, all nodes together.
    pub audience: u64,
}

impl Escalation {
    /// The escalation's event text, its fields in the contract's order
    /// (the function library writes the same).
    pub fn payload(&self, now_ms: i64) -> String {
        #[derive(Serialize)]
        struct Text<'a> {
            event_id: &'a str,
            #[serde(rename = "type")]
            kind: &'static str,
            tenant_id: TenantId,
            branch_id: BranchId,
            event_type: &'a str,
            channel: &'a str,
            reason: Unacknowledged,
            audience: u64,
            ts: i64,
        }
        serde_json::to_string(&Text {
            event_id: &self.event_id,
            kind: EVENT_UNACKNOWLEDGED,
            tenant_id: self.tenant,
            branch_id: self.branch,
            event_type: &self.event_type,
            channel: &self.channel,
            reason: self.reason,
            audience: self.audience,
            ts: now_ms,
        })
        .expect("an escalation serializes")
    }

    /// Where it is published.
    pub fn admin_channel(&self) -> Channel {
        Channel::BranchAdmin(self.branch)
    }
}

/// A step a deadline took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckStep {
    Redelivered { tenant: TenantId, event_id: String },
    Escalated(Escalation),
}

/// New connections of this node that got an event asking for an ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub tenant: TenantId,
    pub event_id: String,
    pub connections: u32,
}

/// What the embedded broker does at a deadline.
pub enum Due {
    /// Sends the event again to its channels.
    Redeliver {
        frame: Utf8Bytes,
        channels: Arc<[Channel]>,
        fields: Fields,
    },
    Escalate(Escalation),
}

/// How long an acknowledged or escalated event is remembered, to tell a
/// repeated or late ack from one of an unknown event (the history's age).
const REMEMBERED: usize = 100_000;

struct Tracked {
    within_ms: i64,
    /// 1 until the redelivery, then 2.
    stage: u8,
    deadline_ms: i64,
    audience: u64,
    frame: Utf8Bytes,
    channels: Arc<[Channel]>,
    fields: Fields,
}

#[derive(Default)]
struct Book {
    pending: HashMap<(TenantId, String), Tracked>,
    due: BTreeSet<(i64, TenantId, String)>,
    /// Finished events: acknowledged (true) or escalated (false).
    done: HashMap<(TenantId, String), bool>,
    done_order: VecDeque<(TenantId, String)>,
}

/// The embedded broker's acknowledgements, in memory.
#[derive(Default)]
pub struct MemoryAcks {
    book: Mutex<Book>,
}

impl MemoryAcks {
    /// Starts tracking a publication that asked for an ack.
    pub fn register(
        &self,
        id: &str,
        within_s: u16,
        frame: Utf8Bytes,
        channels: Arc<[Channel]>,
        fields: Fields,
        now_ms: i64,
    ) {
        let within_ms = i64::from(within_s) * 1000;
        let key = (fields.tenant_id, id.to_owned());
        let mut book = self.book.lock();
        book.due.insert((now_ms + within_ms, key.0, key.1.clone()));
        book.pending.insert(
            key,
            Tracked {
                within_ms,
                stage: 1,
                deadline_ms: now_ms + within_ms,
                audience: 0,
                frame,
                channels,
                fields,
            },
        );
    }

    pub fn seen(&self, seen: &[Seen]) {
        let mut book = self.book.lock();
        for s in seen {
            if let Some(t) = book.pending.get_mut(&(s.tenant, s.event_id.clone())) {
                t.audience += u64::from(s.connections);
            }
        }
    }

    pub fn ack(&self, tenant: TenantId, ids: &[String]) -> Vec<AckOutcome> {
        let mut book = self.book.lock();
        ids.iter()
            .map(|id| {
                let key = (tenant, id.clone());
                if let Some(t) = book.pending.remove(&key) {
                    book.due.remove(&(t.deadline_ms, tenant, id.clone()));
                    book.finish(key, true);
                    return AckOutcome::Acknowledged;
                }
                match book.done.get(&key) {
                    Some(true) => AckOutcome::Repeated,
                    _ => AckOutcome::Late,
                }
            })
            .collect()
    }

    /// Takes the steps whose deadline is past.
    pub fn due(&self, now_ms: i64) -> Vec<Due> {
        let mut book = self.book.lock();
        let mut steps = Vec::new();
        while let Some(first) = book.due.first().cloned() {
            if first.0 > now_ms {
                break;
            }
            book.due.remove(&first);
            let (_, tenant, id) = first;
            let key = (tenant, id);
            let Some(t) = book.pending.get_mut(&key) else {
                continue;
            };
            if t.stage == 1 && t.audience > 0 {
                t.stage = 2;
                t.deadline_ms = now_ms + t.within_ms;
                steps.push(Due::Redeliver {
                    frame: t.frame.clone(),
                    channels: t.channels.clone(),
                    fields: t.fields.clone(),
                });
                let deadline = t.deadline_ms;
                book.due.insert((deadline, key.0, key.1));
                continue;
            }
            let t = book.pending.remove(&key).expect("tracked");
            steps.push(Due::Escalate(Escalation {
                tenant,
                branch: t.fields.branch_id,
                event_id: key.1.clone(),
                event_type: t.fields.event_type.clone(),
                channel: t
                    .channels
                    .first()
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
                reason: if t.audience > 0 {
                    Unacknowledged::NoAck
                } else {
                    Unacknowledged::NoAudience
                },
                audience: t.audience,
            }));
            book.finish(key, false);
        }
        steps
    }
}

impl Book {
    fn finish(&mut self, key: (TenantId, String), acknowledged: bool) {
        if self.done.insert(key.clone(), acknowledged).is_none() {
            self.done_order.push_back(key);
        }
        while self.done_order.len() > REMEMBERED {
            if let Some(old) = self.done_order.pop_front() {
                self.done.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Fields {
        Fields::parse(
            r#"{"type":"ROUND_SUBMITTED","tenant_id":1,"branch_id":5,"ack":{"within_s":2}}"#,
        )
        .unwrap()
    }

    fn book_with_one() -> MemoryAcks {
        let acks = MemoryAcks::default();
        acks.register(
            "e1",
            2,
            Utf8Bytes::from_static("{}"),
            vec![Channel::BranchKitchen(5)].into(),
            fields(),
            0,
        );
        acks
    }

    #[test]
    fn unacked_with_an_audience_is_redelivered_once_then_escalated() {
        let acks = book_with_one();
        acks.seen(&[Seen {
            tenant: 1,
            event_id: "e1".into(),
            connections: 2,
        }]);
        assert!(acks.due(1999).is_empty());
        assert!(matches!(acks.due(2000)[..], [Due::Redeliver { .. }]));
        assert!(acks.due(3999).is_empty());
        let steps = acks.due(4000);
        let [Due::Escalate(e)] = &steps[..] else {
            panic!("one escalation")
        };
        assert_eq!((e.reason, e.audience), (Unacknowledged::NoAck, 2));
        assert_eq!(e.channel, "channel:branch:5:kitchen");
        assert!(acks.due(100_000).is_empty());
        assert_eq!(acks.ack(1, &["e1".into()]), [AckOutcome::Late]);
    }

    #[test]
    fn nobody_got_it_escalates_at_the_first_deadline() {
        let acks = book_with_one();
        let steps = acks.due(2000);
        let [Due::Escalate(e)] = &steps[..] else {
            panic!("one escalation")
        };
        assert_eq!((e.reason, e.audience), (Unacknowledged::NoAudience, 0));
        let text = e.payload(7);
        assert_eq!(
            text,
            r#"{"event_id":"e1","type":"EVENT_UNACKNOWLEDGED","tenant_id":1,"branch_id":5,"event_type":"ROUND_SUBMITTED","channel":"channel:branch:5:kitchen","reason":"no_audience","audience":0,"ts":7}"#
        );
    }

    #[test]
    fn an_ack_ends_it_and_is_told_from_a_repeat_and_another_tenant() {
        let acks = book_with_one();
        assert_eq!(acks.ack(2, &["e1".into()]), [AckOutcome::Late]);
        assert_eq!(
            acks.ack(1, &["e1".into(), "e1".into()]),
            [AckOutcome::Acknowledged, AckOutcome::Repeated]
        );
        assert!(acks.due(10_000).is_empty());
    }
}
