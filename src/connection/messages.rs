//! Client → server messages (PROTOCOL.md, "Messages") and the server's
//! fixed replies to them.

use serde_json::Value;
use tungstenite::Utf8Bytes;

use crate::auth::{BranchId, Endpoint};
use crate::event::MAX_EVENT_ID_BYTES;
use crate::reply::{ErrorCode, Reply};

/// What a client's text message asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Ping,
    /// Waiter endpoint only.
    RefreshSectors,
    /// `refresh_token` with a string `token` (any endpoint): answered by
    /// the connection once the token is checked (`token_refreshed` or
    /// `token_rejected`), or at once with `refresh_in_progress` while its
    /// previous one is still being checked.
    RefreshToken(NewToken),
    /// `presence` (admin endpoint only), of one branch (`branch_id`, an
    /// integer) or of every branch of the token: answered by the
    /// connection once read (PROTOCOL.md §16).
    Presence(Option<BranchId>),
    /// `ack` with 1 to [`MAX_ACK_IDS`] event ids (any endpoint).
    Ack(Vec<String>),
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
                "refresh_token" => match value.get("token") {
                    Some(Value::String(token)) => {
                        ClientMessage::RefreshToken(NewToken(token.clone()))
                    }
                    _ => ClientMessage::Invalid,
                },
                "presence" if endpoint == Endpoint::Admin => match value.get("branch_id") {
                    None => ClientMessage::Presence(None),
                    Some(b) => b
                        .as_i64()
                        .map_or(ClientMessage::Invalid, |b| ClientMessage::Presence(Some(b))),
                },
                "ack" => read_ack(&value).map_or(ClientMessage::Invalid, ClientMessage::Ack),
                _ => ClientMessage::UnknownType,
            },
            _ => ClientMessage::Invalid,
        }
    }

    /// The reply, for every message but `refresh_sectors` (answered by the
    /// sector sync task) and `refresh_token` (answered once checked).
    pub fn fixed_reply(&self) -> Option<Utf8Bytes> {
        let error = |code| Reply::Error { code };
        let reply = match self {
            ClientMessage::Ping => Reply::Pong,
            ClientMessage::RefreshSectors
            | ClientMessage::RefreshToken(_)
            | ClientMessage::Presence(_)
            | ClientMessage::Ack(_) => return None,
            ClientMessage::UnknownType => error(ErrorCode::UnknownMessageType),
            ClientMessage::Invalid => error(ErrorCode::InvalidMessage),
            ClientMessage::BadJson => error(ErrorCode::InvalidJson),
        };
        Some(reply.to_text())
    }
}

/// The most event ids one `ack` may carry.
pub const MAX_ACK_IDS: usize = 100;

/// An `ack`'s `event_ids`: 1 to [`MAX_ACK_IDS`] non-empty strings of at
/// most [`MAX_EVENT_ID_BYTES`] bytes.
fn read_ack(value: &Value) -> Option<Vec<String>> {
    let ids = value.get("event_ids")?.as_array()?;
    if ids.is_empty() || ids.len() > MAX_ACK_IDS {
        return None;
    }
    ids.iter()
        .map(|id| {
            id.as_str()
                .filter(|id| !id.is_empty() && id.len() <= MAX_EVENT_ID_BYTES)
                .map(str::to_owned)
        })
        .collect()
}

/// The token of a `refresh_token` message. Its `Debug` hides the text, so
/// that no log line can carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct NewToken(String);

impl NewToken {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NewToken(<{} bytes>)", self.0.len())
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
        for endpoint in Endpoint::ALL {
            assert_eq!(
                ClientMessage::parse(endpoint, r#"{"type":"refresh_token","token":"a.b.c"}"#),
                RefreshToken(NewToken("a.b.c".into()))
            );
        }
        assert_eq!(
            ClientMessage::parse(w, r#"{"type":"refresh_token"}"#),
            Invalid
        );
        assert_eq!(
            ClientMessage::parse(w, r#"{"type":"refresh_token","token":7}"#),
            Invalid
        );
        assert_eq!(
            ClientMessage::parse(w, r#"{"type":"refresh_token","token":null}"#),
            Invalid
        );
        assert_eq!(
            ClientMessage::parse(w, r#"{"type":"refresh_token","token":"x"}"#).fixed_reply(),
            None
        );
        assert_eq!(
            format!("{:?}", NewToken("secret.token".into())),
            "NewToken(<12 bytes>)"
        );
        let a = Endpoint::Admin;
        assert_eq!(
            ClientMessage::parse(a, r#"{"type":"presence"}"#),
            Presence(None)
        );
        assert_eq!(
            ClientMessage::parse(a, r#"{"type":"presence","branch_id":5}"#),
            Presence(Some(5))
        );
        for bad in [r#""5""#, "5.5", "null", "[5]"] {
            let text = format!(r#"{{"type":"presence","branch_id":{bad}}}"#);
            assert_eq!(ClientMessage::parse(a, &text), Invalid, "{text}");
        }
        for other in [Endpoint::Waiter, Endpoint::Kitchen, Endpoint::Diner] {
            assert_eq!(
                ClientMessage::parse(other, r#"{"type":"presence"}"#),
                UnknownType
            );
        }
        assert_eq!(Presence(None).fixed_reply(), None);
        for endpoint in Endpoint::ALL {
            assert_eq!(
                ClientMessage::parse(endpoint, r#"{"type":"ack","event_ids":["1","a"]}"#),
                Ack(vec!["1".into(), "a".into()])
            );
        }
        let many = format!(
            r#"{{"type":"ack","event_ids":[{}]}}"#,
            vec!["\"x\""; 101].join(",")
        );
        let long = format!(r#"{{"type":"ack","event_ids":["{}"]}}"#, "x".repeat(129));
        for bad in [
            r#"{"type":"ack"}"#,
            r#"{"type":"ack","event_ids":[]}"#,
            r#"{"type":"ack","event_ids":"1"}"#,
            r#"{"type":"ack","event_ids":[1]}"#,
            r#"{"type":"ack","event_ids":[""]}"#,
            &many,
            &long,
        ] {
            assert_eq!(ClientMessage::parse(w, bad), Invalid, "{bad}");
        }
        assert_eq!(
            ClientMessage::parse(w, r#"{"type":"ack","event_ids":["1"]}"#).fixed_reply(),
            None
        );
        assert_eq!(ClientMessage::parse(w, "{ping"), BadJson);
        assert_eq!(ClientMessage::parse(w, ""), BadJson);
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        assert_eq!(ClientMessage::parse(w, &deep), BadJson);
    }
}
