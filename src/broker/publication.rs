//! One publication read and checked, whoever brings it (the publish API,
//! the outbox): the rules of PROTOCOL.md §5 and §10, in one place.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::Publication;
use crate::channel::Channel;
use crate::event::{Fields, InvalidEvent, Refusal, stale_detail};

/// What a request is checked against.
pub struct Rules {
    pub now_ms: i64,
    pub stale_ms: i64,
    /// `WSGATEWAY_MAX_PUBLISH_ITEMS`.
    pub max_items: usize,
    /// `WSGATEWAY_MAX_PUBLISH_CHANNELS`.
    pub max_channels: usize,
}

/// Why an item was refused: its `error` code and a one-line detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub code: &'static str,
    pub detail: String,
}

impl Invalid {
    fn new(code: &'static str, detail: impl Into<String>) -> Invalid {
        Invalid {
            code,
            detail: detail.into(),
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

pub fn read_item(item: Value, rules: &Rules) -> Result<Publication, Invalid> {
    let Value::Object(mut item) = item else {
        return Err(Invalid::new("invalid_body", "an item must be an object"));
    };
    let channels = read_channels(&mut item, rules)?;
    let ack = item.remove("ack");
    let mut event: Map<String, Value> = match item.remove("event") {
        Some(Value::Object(event)) => event,
        Some(_) => return Err(refused(InvalidEvent::NotObject, "")),
        None => return Err(Invalid::new("invalid_body", "an item needs an `event`")),
    };
    if let Some(extra) = item.keys().next() {
        return Err(Invalid::new(
            "invalid_body",
            format!("unknown field {extra:?}"),
        ));
    }
    if let Some(ack) = ack {
        if event.contains_key("ack") {
            return Err(Invalid::new(
                "invalid_body",
                "`ack` is given both in the item and in its event; give it once",
            ));
        }
        if crate::event::read_ack(&ack).is_none() {
            return Err(Invalid::new(
                "invalid_body",
                InvalidEvent::BadAck.to_string(),
            ));
        }
        // The frame carries the request, so that clients know to ack.
        event.insert("ack".into(), ack);
    }
    if event.get("redelivered").is_some_and(|v| !v.is_null()) {
        return Err(refused(InvalidEvent::Redelivered, ""));
    }
    let fields = Fields::read(&event).map_err(|e| refused(e, ""))?;
    for channel in &channels {
        fields
            .check_channel(*channel)
            .map_err(|e| refused(e, &format!(" ({channel})")))?;
    }
    if fields
        .ts_ms
        .is_some_and(|ts| rules.now_ms.saturating_sub(ts) > rules.stale_ms)
    {
        let limit = std::time::Duration::from_millis(rules.stale_ms.max(0) as u64);
        return Err(Invalid::new(
            Refusal::StaleEvent.code(),
            stale_detail(limit),
        ));
    }
    Ok(Publication {
        channels,
        event,
        fields,
    })
}

/// An item's `channel` or `channels`, taken out of it: parsed, bounded, and
/// each named once, in its first place.
fn read_channels(item: &mut Map<String, Value>, rules: &Rules) -> Result<Vec<Channel>, Invalid> {
    let names: Vec<Value> = match (item.remove("channel"), item.remove("channels")) {
        (Some(one), None) => vec![one],
        (None, Some(Value::Array(many))) if !many.is_empty() => many,
        (None, Some(_)) => {
            return Err(Invalid::new(
                "invalid_body",
                "`channels` must be a non-empty array",
            ));
        }
        _ => {
            return Err(Invalid::new(
                "invalid_body",
                "an item needs exactly one of `channel` and `channels`",
            ));
        }
    };
    // Names are counted as given, duplicates included: the bound is on
    // what the request makes the gateway read.
    if names.len() > rules.max_channels {
        return Err(Invalid::new(
            "too_many_channels",
            format!(
                "{} channels; at most {} per item (WSGATEWAY_MAX_PUBLISH_CHANNELS)",
                names.len(),
                rules.max_channels
            ),
        ));
    }
    let mut channels = Vec::with_capacity(names.len());
    let mut seen = HashSet::with_capacity(names.len());
    for name in names {
        let Value::String(name) = name else {
            return Err(Invalid::new(
                Refusal::UnknownChannel.code(),
                "a channel must be a string",
            ));
        };
        let channel: Channel = name.parse().map_err(|e: crate::channel::UnknownChannel| {
            Invalid::new(Refusal::UnknownChannel.code(), e.to_string())
        })?;
        // A channel named twice is published once, in its first place.
        if seen.insert(channel) {
            channels.push(channel);
        }
    }
    Ok(channels)
}

/// An event refused by the rules every way in shares (PROTOCOL.md §5,
/// "Refusals"): its code, and its reason with `suffix`.
fn refused(why: InvalidEvent, suffix: &str) -> Invalid {
    Invalid::new(why.refusal().code(), format!("{why}{suffix}"))
}
