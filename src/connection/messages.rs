//! Client → server messages (PROTOCOL.md, "Messages") and the server's
//! fixed replies to them.

use axum::extract::ws::Utf8Bytes;
use serde_json::Value;

use crate::auth::Endpoint;
use crate::reply::{ErrorCode, Reply};

/// What a client's text message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMessage {
    Ping,
    /// Waiter endpoint only.
    RefreshSectors,
    /// An object with a string `type` the endpoint does not handle.
    UnknownType,
    /// Valid JSON that is not an object with a string `type`.
    Invalid,
    /// Not JSON (including nesting deeper than the parser allows).
    BadJson,
}

impl ClientMessage {
    pub fn parse(endpoint: Endpoint, text: &str) -> ClientMessage {
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            return ClientMessage::BadJson;
        };
        match value.get("type") {
            Some(Value::String(t)) if value.is_object() => match t.as_str() {
                "ping" => ClientMessage::Ping,
                "refresh_sectors" if endpoint == Endpoint::Waiter => ClientMessage::RefreshSectors,
                _ => ClientMessage::UnknownType,
            },
            _ => ClientMessage::Invalid,
        }
    }

    /// The reply, for every message but `refresh_sectors` (answered by the
    /// sector sync task).
    pub fn fixed_reply(self) -> Option<Utf8Bytes> {
        let error = |code| Reply::Error { code };
        let reply = match self {
            ClientMessage::Ping => Reply::Pong,
            ClientMessage::RefreshSectors => return None,
            ClientMessage::UnknownType => error(ErrorCode::UnknownMessageType),
            ClientMessage::Invalid => error(ErrorCode::InvalidMessage),
            ClientMessage::BadJson => error(ErrorCode::InvalidJson),
        };
        Some(reply.to_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ClientMessage::*;

    #[test]
    fn classifies_as_the_protocol_says() {
        let w = Endpoint::Waiter;
        assert_eq!(ClientMessage::parse(w, r#"{"type":"ping"}"#), Ping);
        assert_eq!(
            ClientMessage::parse(w, r#"{"type":"refresh_sectors"}"#),
            RefreshSectors
        );
        assert_eq!(
            ClientMessage::parse(Endpoint::Kitchen, r#"{"type":"refresh_sectors"}"#),
            UnknownType
        );
        assert_eq!(
            ClientMessage::parse(w, r#"{"type":"subscribe"}"#),
            UnknownType
        );
        assert_eq!(ClientMessage::parse(w, r#"{"type":1}"#), Invalid);
        assert_eq!(ClientMessage::parse(w, r#"{"kind":"ping"}"#), Invalid);
        assert_eq!(ClientMessage::parse(w, r#"["ping"]"#), Invalid);
        assert_eq!(ClientMessage::parse(w, "42"), Invalid);
        assert_eq!(ClientMessage::parse(w, "{ping"), BadJson);
        assert_eq!(ClientMessage::parse(w, ""), BadJson);
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert_eq!(ClientMessage::parse(w, &deep), BadJson);
    }
}
