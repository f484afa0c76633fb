//! Client text messages: classification never panics, and every message
//! but `refresh_sectors`, `refresh_token`, `presence` (answered once
//! acted on) and `ack` (never answered) has a fixed JSON reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgateway::auth::Endpoint;
use wsgateway::connection::ClientMessage;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for endpoint in Endpoint::ALL {
        let message = ClientMessage::parse(endpoint, text);
        let answered_later = matches!(
            message,
            ClientMessage::RefreshSectors
                | ClientMessage::RefreshToken(_)
                | ClientMessage::Presence(_)
                | ClientMessage::Ack(_)
        );
        if !answered_later {
            let reply = message.fixed_reply().expect("a reply");
            assert!(serde_json::from_str::<serde_json::Value>(reply.as_str()).is_ok());
        }
    }
});
