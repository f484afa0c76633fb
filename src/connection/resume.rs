//! Resume after a disconnect (PROTOCOL.md §14): the events of the client's
//! audience published after its `last_event_id`, read from the broker's
//! history, in order and once, before any live event.
//!
//! The connection is registered in the hub first, so live events queue up
//! while history is read: nothing falls between replay and live. An event
//! published around the read can be both replayed and dispatched live a
//! moment later; live events that the replay already contained are skipped
//! by their `event_id` for a short while ([`CatchUp`]).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tungstenite::Utf8Bytes;

use crate::broker::Cursor;
use crate::event::Fields;
use crate::hub::{ConnId, RECEIPT_SLACK_MS, audience, monotonic_ms};

use super::Context;

/// What a resume found.
pub struct Replay {
    pub recovered: bool,
    /// The frames to send after `connected`, in publish order.
    pub frames: Vec<Utf8Bytes>,
    /// Their event ids, to skip the same events arriving live.
    pub catch_up: CatchUp,
}

/// Reads the history the connection missed and keeps what its audience
/// rules (tenant, branches, role, sectors, session) let it see.
pub async fn replay(ctx: &Context, conn: ConnId, last_event_id: &str) -> Replay {
    // Long enough for anything published before the read to be dispatched.
    let catch_up_for = ctx.settings.dedup_window;
    let not_recovered = || Replay {
        recovered: false,
        frames: Vec::new(),
        catch_up: CatchUp::default(),
    };
    let (Some(cursor), Some((tenant, endpoint, member))) =
        (Cursor::parse(last_event_id), ctx.hub.member(conn))
    else {
        return not_recovered();
    };
    let wait = ctx.settings.resume_wait;
    let Ok(Ok(place)) = tokio::time::timeout(wait, ctx.resume_reads.acquire()).await else {
        tracing::warn!("no history read free in time; not recovered");
        return not_recovered();
    };
    let scopes = member.scopes(tenant);
    let lookup = ctx.broker.resume(tenant, scopes, cursor);
    let found = match tokio::time::timeout(ctx.settings.redis_timeout, lookup).await {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "history unavailable; not recovered");
            return not_recovered();
        }
        Err(_) => {
            tracing::warn!("history read timed out; not recovered");
            return not_recovered();
        }
    };
    drop(place);
    if !found.recovered {
        return not_recovered();
    }
    let mut frames = Vec::new();
    let mut ids = HashSet::new();
    let handle = ctx.hub.handle(conn);
    for entry in found.entries {
        let Ok(Value::Object(object)) = serde_json::from_str::<Value>(entry.frame.as_str()) else {
            continue;
        };
        let Ok(fields) = Fields::read(&object) else {
            continue;
        };
        let mine = entry
            .channels
            .iter()
            .any(|c| audience::receives(tenant, endpoint, &member, *c, &fields));
        if mine {
            // A replayed event that asks for an ack: this connection got it,
            // and may ack it where it is not only an overseer.
            let answers = fields.ack_within_s.is_some()
                && entry.channels.iter().any(|c| {
                    audience::acks_from(endpoint, *c)
                        && audience::receives(tenant, endpoint, &member, *c, &fields)
                });
            if let Some(id) = fields.event_id {
                if let (Some(within_s), Some(handle), true) =
                    (fields.ack_within_s, &handle, answers)
                {
                    let until = monotonic_ms() + 2_000 * u64::from(within_s) + RECEIPT_SLACK_MS;
                    if handle.note_receipt(&id, until) {
                        ctx.acks.seen(tenant, &id, 1);
                    }
                }
                ids.insert(id);
            }
            frames.push(entry.frame);
        }
    }
    Replay {
        recovered: true,
        frames,
        catch_up: CatchUp::new(ids, catch_up_for),
    }
}

/// The replayed event ids, for as long as live events may repeat them.
///
/// Bare ids suffice, without the tenant that PROTOCOL.md §6 keys
/// de-duplication by: a `CatchUp` belongs to one connection, which is only
/// ever given its own tenant's events, replayed or live.
#[derive(Default)]
pub struct CatchUp {
    ids: HashSet<String>,
    until: Option<Instant>,
}

impl CatchUp {
    pub fn new(ids: HashSet<String>, lasting: Duration) -> CatchUp {
        let until = (!ids.is_empty()).then(|| Instant::now() + lasting);
        CatchUp { ids, until }
    }

    /// Whether live frames may still repeat replayed ones (ends itself
    /// once the window is over).
    pub fn is_active(&mut self) -> bool {
        match self.until {
            Some(until) if Instant::now() <= until => true,
            Some(_) => {
                *self = CatchUp::default();
                false
            }
            None => false,
        }
    }

    /// Whether a live frame was already replayed.
    pub fn replayed(&mut self, frame: &str) -> bool {
        self.is_active() && event_id(frame).is_some_and(|id| self.ids.contains(id.as_ref()))
    }
}

/// The `event_id` of a frame: read straight from the front where the
/// gateway puts it, else by parsing.
fn event_id(frame: &str) -> Option<std::borrow::Cow<'_, str>> {
    if let Some(rest) = frame.strip_prefix("{\"event_id\":\"")
        && let Some(end) = rest.find('"')
        && !rest[..end].contains('\\')
    {
        return Some(rest[..end].into());
    }
    match serde_json::from_str::<Map<String, Value>>(frame)
        .ok()?
        .remove("event_id")?
    {
        Value::String(id) => Some(id.into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_repeats_of_replayed_events_are_skipped_for_a_while() {
        let ids: HashSet<String> = ["12", "mine"].iter().map(|s| s.to_string()).collect();
        let mut c = CatchUp::new(ids, Duration::from_millis(50));
        assert!(c.replayed(r#"{"event_id":"12","type":"X"}"#));
        assert!(c.replayed(r#"{"type":"X","event_id":"mine"}"#));
        assert!(!c.replayed(r#"{"event_id":"13","type":"X"}"#));
        assert!(!c.replayed(r#"{"type":"X"}"#));
        assert!(!c.replayed(r#"{"event_id":"1\"2","type":"X"}"#));
        std::thread::sleep(Duration::from_millis(60));
        assert!(!c.replayed(r#"{"event_id":"12","type":"X"}"#), "over");
        assert!(!CatchUp::default().replayed(r#"{"event_id":"12"}"#));
    }
}
