//! Events as they arrive from a broker: any channel name, any bytes. The
//! parser must never panic, and a valid event must keep its exact text
//! and never have a reserved type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgateway::channel::Channel;
use wsgateway::event::{Event, RESERVED_TYPES};

fuzz_target!(|data: &[u8]| {
    // First line: the channel name; the rest: the payload.
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let (name, payload) = data.split_at(split);
    let payload = payload.get(1..).unwrap_or_default();
    let channel = std::str::from_utf8(name)
        .ok()
        .and_then(|n| n.parse::<Channel>().ok())
        .unwrap_or(Channel::BranchWaiters(5));
    if let Ok(event) = Event::parse(channel, bytes::Bytes::copy_from_slice(payload)) {
        assert_eq!(event.frame.as_bytes(), payload);
        assert!(event.fields.check_channel(channel).is_ok());
        assert!(!event.fields.event_type.is_empty());
        assert!(!RESERVED_TYPES.contains(&event.fields.event_type.as_str()));
    }
    if let Ok(name) = std::str::from_utf8(name)
        && let Ok(channel) = name.parse::<Channel>()
    {
        assert_eq!(channel.to_string().parse::<Channel>(), Ok(channel));
    }
});
