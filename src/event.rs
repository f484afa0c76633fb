//! Events: the wire format of PROTOCOL.md §5, validated once at the edge.
//!
//! An [`Event`] is what the dispatcher routes: the routing fields read out of
//! the JSON, and the frame to send, serialized exactly once. Raw text from a
//! broker is forwarded byte for byte; nothing here re-serializes it.

use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::time::Instant;

use bytes::Bytes;
use serde_json::{Map, Value};
use tungstenite::Utf8Bytes;

use crate::auth::{BranchId, SectorId, SessionId, TenantId};
use crate::channel::Channel;

/// The event types the platform's backend is known to publish, and the
/// gateway's own escalation. Any other type is still delivered, and
/// counted.
pub const KNOWN_TYPES: &[&str] = &[
    "ROUND_SUBMITTED",
    "ROUND_IN_KITCHEN",
    "ROUND_READY",
    "ROUND_SERVED",
    "SERVICE_CALL_CREATED",
    "SERVICE_CALL_ACKED",
    "SERVICE_CALL_CLOSED",
    "PAYMENT_APPROVED",
    "PAYMENT_REJECTED",
    "PAYMENT_FAILED",
    "TABLE_SESSION_STARTED",
    "TABLE_CLEARED",
    "ENTITY_CREATED",
    "ENTITY_UPDATED",
    "ENTITY_DELETED",
    "SECTOR_ASSIGNMENT_CHANGED",
    EVENT_UNACKNOWLEDGED,
];

/// The gateway's own frame types (`crate::reply::Reply`, PROTOCOL.md §5
/// "Reserved types"): an event of one of these types would pass for a
/// protocol frame, so every way in refuses it. The Redis function library
/// (`src/broker/lua/wsgateway.lua`) has the same list; a unit test keeps
/// the two equal.
pub const RESERVED_TYPES: &[&str] = &[
    "connected",
    "pong",
    "error",
    "resync",
    "token_refreshed",
    "sectors_updated",
    "presence",
];

/// Longest caller-supplied `event_id`, in bytes.
pub const MAX_EVENT_ID_BYTES: usize = 128;

/// Why an event is refused, the same whichever way it comes in
/// (PROTOCOL.md §5, "Refusals"): the publish API's 400 `error` code, the
/// Redis function's error code (`ERR wsgateway <code>: ...`), and, as
/// `crate::metrics::Drop`, the reason a plain `PUBLISH` of it is dropped
/// and counted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A rule of §5 broken: not an object, a field missing or of the wrong
    /// type, a bad `event_id`, or disagreement with a channel.
    InvalidEvent,
    /// A type of [`RESERVED_TYPES`].
    ReservedType,
    /// A `ts` older than `WSGATEWAY_STALE_EVENT_S`.
    StaleEvent,
    /// A channel name that is not one of the seven families.
    UnknownChannel,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::InvalidEvent,
        Refusal::ReservedType,
        Refusal::StaleEvent,
        Refusal::UnknownChannel,
    ];

    /// The publish API's and the function's error code.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::InvalidEvent => "invalid_event",
            Refusal::ReservedType => "reserved_type",
            Refusal::StaleEvent => "stale_event",
            Refusal::UnknownChannel => "unknown_channel",
        }
    }
}

/// What a stale event is refused with, naming the limit in seconds (the
/// function's text is the same: Lua prints 30 and 0.5 as Rust does).
pub fn stale_detail(limit: std::time::Duration) -> String {
    format!(
        "the event's `ts` is older than the stale limit ({} s)",
        limit.as_secs_f64()
    )
}

/// Why an event was refused. Each variant is a metric reason and an API
/// error detail; none of them echoes the event's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("the event is not valid UTF-8")]
    NotUtf8,
    #[error("the event is not valid JSON")]
    NotJson,
    #[error("the event is not a JSON object")]
    NotObject,
    #[error("the event lacks the required field `{0}`")]
    Missing(&'static str),
    #[error("the event's field `{0}` has the wrong type")]
    WrongType(&'static str),
    #[error("`event_id` must be a non-empty string of at most 128 bytes")]
    BadEventId,
    #[error("the event's `{0}` differs from its channel's")]
    ChannelMismatch(&'static str),
    /// The type is one of [`RESERVED_TYPES`] (named from that list, never
    /// from the event).
    #[error("the type `{0}` is reserved for the gateway's own frames")]
    ReservedType(&'static str),
    /// `ack` is not `{"within_s": N}` with N from 1 to [`MAX_ACK_WITHIN_S`].
    #[error("`ack` must be {{\"within_s\": N}} with N an integer from 1 to 300")]
    BadAck,
    /// A publisher set `redelivered`, which only the gateway writes.
    #[error("`redelivered` is set by the gateway only")]
    Redelivered,
}

impl InvalidEvent {
    /// The refusal this is, on every way in.
    pub fn refusal(&self) -> Refusal {
        match self {
            InvalidEvent::ReservedType(_) => Refusal::ReservedType,
            _ => Refusal::InvalidEvent,
        }
    }
}

/// The routing fields of an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Fields {
    pub event_type: String,
    pub tenant_id: TenantId,
    pub branch_id: BranchId,
    pub sector_id: Option<SectorId>,
    pub session_id: Option<SessionId>,
    /// Publish time, Unix epoch milliseconds.
    pub ts_ms: Option<i64>,
    pub event_id: Option<String>,
    /// `entity.waiter_id`, read for `SECTOR_ASSIGNMENT_CHANGED`.
    pub entity_waiter_id: Option<i64>,
    /// `ack.within_s`: the event is to be acknowledged within this many
    /// seconds (PROTOCOL.md §15).
    pub ack_within_s: Option<u16>,
}

/// The longest `ack.within_s`.
pub const MAX_ACK_WITHIN_S: u16 = 300;

/// The type of the event the gateway publishes on a branch's admin channel
/// when an event asking for an acknowledgement got none.
pub const EVENT_UNACKNOWLEDGED: &str = "EVENT_UNACKNOWLEDGED";

/// The frame of a redelivery: `"redelivered":true` put first.
pub fn redelivery_frame(frame: &str) -> String {
    let rest = frame.strip_prefix('{').unwrap_or(frame);
    format!("{{\"redelivered\":true,{rest}")
}

/// The event type that makes the gateway re-read sector assignments.
pub const SECTOR_ASSIGNMENT_CHANGED: &str = "SECTOR_ASSIGNMENT_CHANGED";

impl Fields {
    /// Reads and checks the fields of an event object (§1.4).
    pub fn read(obj: &Map<String, Value>) -> Result<Fields, InvalidEvent> {
        let event_type = match obj.get("type") {
            None | Some(Value::Null) => return Err(InvalidEvent::Missing("type")),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => return Err(InvalidEvent::WrongType("type")),
        };
        if let Some(reserved) = RESERVED_TYPES.iter().find(|t| **t == event_type) {
            return Err(InvalidEvent::ReservedType(reserved));
        }
        let tenant_id = required_int(obj, "tenant_id")?;
        let branch_id = required_int(obj, "branch_id")?;
        let sector_id = optional_int(obj, "sector_id")?;
        let session_id = optional_int(obj, "session_id")?;
        optional_int(obj, "table_id")?;
        let entity_waiter_id = match obj.get("entity") {
            None | Some(Value::Null) => None,
            Some(Value::Object(entity)) if event_type == SECTOR_ASSIGNMENT_CHANGED => {
                entity.get("waiter_id").and_then(Value::as_i64)
            }
            Some(Value::Object(_)) => None,
            Some(_) => return Err(InvalidEvent::WrongType("entity")),
        };
        let ts_ms = match obj.get("ts") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(ts_to_ms(n)),
            Some(_) => return Err(InvalidEvent::WrongType("ts")),
        };
        let event_id = match obj.get("event_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_EVENT_ID_BYTES => {
                Some(s.clone())
            }
            Some(_) => return Err(InvalidEvent::BadEventId),
        };
        let ack_within_s = match obj.get("ack") {
            None | Some(Value::Null) => None,
            Some(ack) => Some(read_ack(ack).ok_or(InvalidEvent::BadAck)?),
        };
        Ok(Fields {
            event_type,
            tenant_id,
            branch_id,
            sector_id,
            session_id,
            ts_ms,
            event_id,
            entity_waiter_id,
            ack_within_s,
        })
    }

    /// Reads the fields of an event's JSON text.
    pub fn parse(text: &str) -> Result<Fields, InvalidEvent> {
        let value: Value = serde_json::from_str(text).map_err(|_| InvalidEvent::NotJson)?;
        let Value::Object(obj) = value else {
            return Err(InvalidEvent::NotObject);
        };
        Fields::read(&obj)
    }

    /// Checks that the event agrees with the channel it arrived on: the
    /// channel decides the branch (and the sector or session it names).
    pub fn check_channel(&self, channel: Channel) -> Result<(), InvalidEvent> {
        if let Some(b) = channel.branch()
            && b != self.branch_id
        {
            return Err(InvalidEvent::ChannelMismatch("branch_id"));
        }
        match channel {
            Channel::SectorWaiters(_, s) if self.sector_id.is_some_and(|e| e != s) => {
                Err(InvalidEvent::ChannelMismatch("sector_id"))
            }
            Channel::Session(s) if self.session_id.is_some_and(|e| e != s) => {
                Err(InvalidEvent::ChannelMismatch("session_id"))
            }
            _ => Ok(()),
        }
    }

    pub fn is_known_type(&self) -> bool {
        KNOWN_TYPES.contains(&self.event_type.as_str())
    }
}

/// `{"within_s": N}`, N from 1 to [`MAX_ACK_WITHIN_S`], nothing else.
pub fn read_ack(ack: &Value) -> Option<u16> {
    let ack = ack.as_object().filter(|a| a.len() == 1)?;
    let n = ack.get("within_s")?.as_u64()?;
    (1..=u64::from(MAX_ACK_WITHIN_S))
        .contains(&n)
        .then_some(n as u16)
}

fn required_int(obj: &Map<String, Value>, field: &'static str) -> Result<i64, InvalidEvent> {
    optional_int(obj, field)?.ok_or(InvalidEvent::Missing(field))
}

fn optional_int(
    obj: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<i64>, InvalidEvent> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or(InvalidEvent::WrongType(field)),
        Some(_) => Err(InvalidEvent::WrongType(field)),
    }
}

/// What makes two arrivals "the same event" for de-duplication (§1.3): the
/// same tenant and the same `event_id`, or else the exact JSON text (kept as
/// a keyed 64-bit hash and the length, not the text itself). The tenant is
/// part of the key because event ids are the publisher's: two tenants' order
/// numbers repeat, and one tenant's event must never suppress another's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DedupKey {
    Id {
        tenant: TenantId,
        id: Box<str>,
    },
    Text {
        tenant: TenantId,
        hash: u64,
        len: usize,
    },
}

impl DedupKey {
    fn of(fields: &Fields, text: &str) -> DedupKey {
        let tenant = fields.tenant_id;
        match &fields.event_id {
            // An escalation names the event it reports in `event_id`: it is
            // a different event all the same.
            Some(id) if fields.event_type != EVENT_UNACKNOWLEDGED => DedupKey::Id {
                tenant,
                id: id.as_str().into(),
            },
            _ => DedupKey::text(tenant, text),
        }
    }

    fn text(tenant: TenantId, text: &str) -> DedupKey {
        // Random keys per process: a publisher cannot aim collisions.
        static STATE: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
        DedupKey::Text {
            tenant,
            hash: STATE.get_or_init(Default::default).hash_one(text),
            len: text.len(),
        }
    }
}

/// A validated event on its way to the dispatcher.
#[derive(Debug, Clone)]
pub struct Event {
    pub channel: Channel,
    pub fields: Fields,
    pub key: DedupKey,
    /// The text frame every recipient gets: serialized once, shared.
    pub frame: Utf8Bytes,
    /// When the gateway received it, for latency metrics.
    pub received_at: Instant,
    /// Read from history to fill a gap in the broker subscription: it is
    /// delivered however old (history's age bound decides), not dropped as
    /// stale.
    pub from_history: bool,
    /// The gateway's one redelivery of an unacknowledged event: delivered
    /// again to its audience however old, never taken for a repeat.
    pub redelivery: bool,
}

impl Event {
    /// Reads an event that arrived as raw bytes on `channel` (a broker
    /// message). The bytes become the frame unchanged.
    pub fn parse(channel: Channel, payload: Bytes) -> Result<Event, InvalidEvent> {
        let frame = Utf8Bytes::try_from(payload).map_err(|_| InvalidEvent::NotUtf8)?;
        let fields = Fields::parse(frame.as_str())?;
        Self::assemble(channel, fields, frame)
    }

    /// Builds an event from fields already read and its serialized frame.
    pub fn assemble(
        channel: Channel,
        fields: Fields,
        frame: Utf8Bytes,
    ) -> Result<Event, InvalidEvent> {
        fields.check_channel(channel)?;
        Ok(Event {
            channel,
            key: DedupKey::of(&fields, frame.as_str()),
            fields,
            frame,
            received_at: Instant::now(),
            from_history: false,
            redelivery: false,
        })
    }

    /// Makes this the one redelivery of an unacknowledged event: its own
    /// entry in the de-duplication window (its text differs from the
    /// first delivery's), so that it reaches each connection once.
    pub fn redelivered(mut self) -> Event {
        self.redelivery = true;
        self.key = DedupKey::text(self.fields.tenant_id, self.frame.as_str());
        self
    }

    /// Age of the event at `now_ms` (Unix ms), when it carries `ts`.
    pub fn age_ms(&self, now_ms: i64) -> Option<i64> {
        self.fields.ts_ms.map(|ts| now_ms.saturating_sub(ts))
    }
}

/// Below this a `ts` is in seconds (a Python backend's `time.time()`), at or
/// above it in milliseconds (PROTOCOL.md §5): 10^11 s is the year 5138, and
/// 10^11 ms is March 1973, so no real timestamp is ambiguous.
const TS_SECONDS_BELOW: i64 = 100_000_000_000;

/// A `ts` (seconds or milliseconds, integer or fractional) as Unix
/// milliseconds; saturating, and a fraction of a millisecond truncated.
fn ts_to_ms(n: &serde_json::Number) -> i64 {
    match n.as_i64() {
        Some(v) if v < TS_SECONDS_BELOW => v.saturating_mul(1000),
        Some(ms) => ms,
        None => {
            // A fraction, or an integer beyond i64 (then far above the bound).
            let f = n.as_f64().unwrap_or(f64::MAX);
            let ms = if f < TS_SECONDS_BELOW as f64 {
                f * 1000.0
            } else {
                f
            };
            ms as i64
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(channel: &str, text: &str) -> Result<Event, InvalidEvent> {
        Event::parse(
            channel.parse().unwrap(),
            Bytes::copy_from_slice(text.as_bytes()),
        )
    }

    #[test]
    fn ts_is_seconds_below_ten_to_the_eleven_and_milliseconds_above() {
        let ts = |raw: &str| {
            let text = format!(r#"{{"type":"X","tenant_id":1,"branch_id":5,"ts":{raw}}}"#);
            parse("channel:branch:5:waiters", &text)
                .unwrap()
                .fields
                .ts_ms
                .unwrap()
        };
        assert_eq!(ts("1764680000"), 1_764_680_000_000, "integer seconds");
        assert_eq!(ts("1764680000.1234"), 1_764_680_000_123, "time.time()");
        assert_eq!(ts("1764680000123"), 1_764_680_000_123, "milliseconds");
        assert_eq!(ts("1764680000123.9"), 1_764_680_000_123, "fractional ms");
        assert_eq!(ts("99999999999"), 99_999_999_999_000, "just below: seconds");
        assert_eq!(ts("100000000000"), 100_000_000_000, "the bound: ms");
        assert_eq!(ts("-9223372036854775808"), i64::MIN, "saturates");
        assert_eq!(ts("18446744073709551615"), i64::MAX);
        assert_eq!(ts("1e300"), i64::MAX);
        assert_eq!(ts("-1e300"), i64::MIN);
    }

    #[test]
    fn a_valid_event_keeps_its_exact_text() {
        let text = r#"{"type":"ROUND_READY","tenant_id":1,"branch_id":5,"sector_id":10,"x":[1,2]}"#;
        let e = parse("channel:branch:5:waiters", text).unwrap();
        assert_eq!(e.frame.as_str(), text);
        assert_eq!(e.fields.sector_id, Some(10));
        assert!(e.fields.is_known_type());
    }

    /// A branch channel every event below names correctly.
    const WAITERS: &str = "channel:branch:5:waiters";

    /// Each text, published on `channel`, is refused for its reason.
    fn assert_refused(channel: &str, cases: &[(&str, InvalidEvent)]) {
        for (text, why) in cases {
            assert_eq!(&parse(channel, text).unwrap_err(), why, "{text}");
        }
    }

    #[test]
    fn text_that_is_not_a_json_object_says_why() {
        assert_refused(
            WAITERS,
            &[
                ("not json", InvalidEvent::NotJson),
                ("[1]", InvalidEvent::NotObject),
            ],
        );
        assert_eq!(
            Event::parse(Channel::Session(1), Bytes::from_static(b"\xff\xfe")).unwrap_err(),
            InvalidEvent::NotUtf8
        );
    }

    #[test]
    fn a_missing_or_empty_required_field_is_named() {
        assert_refused(
            WAITERS,
            &[
                (
                    r#"{"tenant_id":1,"branch_id":5}"#,
                    InvalidEvent::Missing("type"),
                ),
                (
                    r#"{"type":"","tenant_id":1,"branch_id":5}"#,
                    InvalidEvent::WrongType("type"),
                ),
                (
                    r#"{"type":"X","branch_id":5}"#,
                    InvalidEvent::Missing("tenant_id"),
                ),
                (
                    r#"{"type":"X","tenant_id":1}"#,
                    InvalidEvent::Missing("branch_id"),
                ),
            ],
        );
    }

    #[test]
    fn ids_are_integers_written_as_integers_that_fit() {
        assert_refused(
            WAITERS,
            &[
                (
                    r#"{"type":"X","tenant_id":"1","branch_id":5}"#,
                    InvalidEvent::WrongType("tenant_id"),
                ),
                (
                    r#"{"type":"X","tenant_id":1.5,"branch_id":5}"#,
                    InvalidEvent::WrongType("tenant_id"),
                ),
                (
                    r#"{"type":"X","tenant_id":1.0,"branch_id":5}"#,
                    InvalidEvent::WrongType("tenant_id"),
                ),
                (
                    r#"{"type":"X","tenant_id":1,"branch_id":5e0}"#,
                    InvalidEvent::WrongType("branch_id"),
                ),
                // serde_json reads `-0` as a float.
                (
                    r#"{"type":"X","tenant_id":-0,"branch_id":5}"#,
                    InvalidEvent::WrongType("tenant_id"),
                ),
                (
                    r#"{"type":"X","tenant_id":9223372036854775808,"branch_id":5}"#,
                    InvalidEvent::WrongType("tenant_id"),
                ),
            ],
        );
    }

    #[test]
    fn an_optional_field_of_the_wrong_type_is_named() {
        assert_refused(
            WAITERS,
            &[
                (
                    r#"{"type":"X","tenant_id":1,"branch_id":5,"sector_id":"a"}"#,
                    InvalidEvent::WrongType("sector_id"),
                ),
                (
                    r#"{"type":"X","tenant_id":1,"branch_id":5,"entity":3}"#,
                    InvalidEvent::WrongType("entity"),
                ),
                (
                    r#"{"type":"X","tenant_id":1,"branch_id":5,"ts":"now"}"#,
                    InvalidEvent::WrongType("ts"),
                ),
            ],
        );
    }

    #[test]
    fn an_event_id_is_not_empty_nor_too_long() {
        let empty = r#"{"type":"X","tenant_id":1,"branch_id":5,"event_id":""}"#;
        assert_refused(WAITERS, &[(empty, InvalidEvent::BadEventId)]);
        let long_id = json!({"type":"X","tenant_id":1,"branch_id":5,"event_id":"a".repeat(129)});
        assert_eq!(
            parse("channel:session:1", &long_id.to_string()).unwrap_err(),
            InvalidEvent::BadEventId
        );
    }

    #[test]
    fn a_reserved_type_is_refused_before_the_other_fields_are_read() {
        assert_refused(
            WAITERS,
            &[
                (
                    r#"{"type":"pong","tenant_id":1,"branch_id":5}"#,
                    InvalidEvent::ReservedType("pong"),
                ),
                // Checked right after `type`, before the other fields.
                (
                    r#"{"type":"res\u0079nc"}"#,
                    InvalidEvent::ReservedType("resync"),
                ),
            ],
        );
    }

    #[test]
    fn an_event_that_contradicts_its_channel_names_the_field() {
        let cases = [
            (
                "channel:branch:6:waiters",
                r#"{"type":"X","tenant_id":1,"branch_id":5}"#,
                InvalidEvent::ChannelMismatch("branch_id"),
            ),
            (
                "channel:sector:5:3:waiters",
                r#"{"type":"X","tenant_id":1,"branch_id":5,"sector_id":4}"#,
                InvalidEvent::ChannelMismatch("sector_id"),
            ),
            (
                "channel:session:7",
                r#"{"type":"X","tenant_id":1,"branch_id":5,"session_id":8}"#,
                InvalidEvent::ChannelMismatch("session_id"),
            ),
        ];
        for (channel, text, why) in cases {
            assert_refused(channel, &[(text, why)]);
        }
    }

    #[test]
    fn every_reserved_type_is_refused_as_reserved_and_only_those() {
        for t in RESERVED_TYPES {
            let text = json!({"type": t, "tenant_id": 1, "branch_id": 5}).to_string();
            let why = parse("channel:branch:5:admin", &text).unwrap_err();
            assert_eq!(why, InvalidEvent::ReservedType(t));
            assert_eq!(why.refusal(), Refusal::ReservedType);
            assert_eq!(why.refusal().code(), "reserved_type");
        }
        for t in ["Pong", "CONNECTED", "pong ", "ping", "error_x"] {
            let text = json!({"type": t, "tenant_id": 1, "branch_id": 5}).to_string();
            assert!(parse("channel:branch:5:admin", &text).is_ok(), "{t}");
        }
        assert_eq!(
            InvalidEvent::WrongType("ts").refusal().code(),
            "invalid_event"
        );
    }

    #[test]
    fn dedup_key_is_the_id_or_the_exact_text() {
        let a = parse(
            "channel:branch:5:admin",
            r#"{"type":"X","tenant_id":1,"branch_id":5,"event_id":"e1"}"#,
        )
        .unwrap();
        let b = parse(
            "channel:branch:5:kitchen",
            r#"{"event_id":"e1","type":"Y","tenant_id":1,"branch_id":5}"#,
        )
        .unwrap();
        assert_eq!(a.key, b.key);
        let other_tenant = parse(
            "channel:branch:5:admin",
            r#"{"type":"X","tenant_id":2,"branch_id":5,"event_id":"e1"}"#,
        )
        .unwrap();
        assert_ne!(a.key, other_tenant.key, "event ids are per tenant");
        let c = parse(
            "channel:branch:5:admin",
            r#"{"type":"X","tenant_id":1,"branch_id":5}"#,
        )
        .unwrap();
        let d = parse(
            "channel:branch:5:kitchen",
            r#"{"type":"X","tenant_id":1,"branch_id":5}"#,
        )
        .unwrap();
        let e = parse(
            "channel:branch:5:kitchen",
            r#"{"type":"X","tenant_id":1, "branch_id":5}"#,
        )
        .unwrap();
        assert_eq!(c.key, d.key);
        assert_ne!(c.key, e.key);
        assert!(
            !parse(
                "channel:session:1",
                r#"{"type":"NEW_THING","tenant_id":1,"branch_id":5}"#
            )
            .unwrap()
            .fields
            .is_known_type()
        );
    }
}
