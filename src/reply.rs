//! The gateway's own messages to clients, everything but events
//! (PROTOCOL.md, "Messages"): one serde type per message, so that their
//! shape is written once, whichever module sends them.

use serde::{Deserialize, Serialize};
use tungstenite::Utf8Bytes;

use crate::auth::{BranchId, SectorId, SessionId, TenantId, UserId};

/// A server → client message.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The first frame of every admitted connection.
    Connected(Connected),
    /// The answer to `ping`.
    Pong,
    /// A waiter's sectors after `refresh_sectors` or an assignment change.
    /// `null` when the waiter is not filtered by sector (or they are unknown).
    SectorsUpdated { sector_ids: Option<Vec<SectorId>> },
    /// A `refresh_token` accepted: the connection now lives by the new
    /// token, which expires at `expires_at` (Unix seconds).
    TokenRefreshed { expires_at: u64 },
    /// Events may have been lost: reload state from the backend.
    Resync { reason: ResyncReason },
    /// An admin's `presence`: the open connections of one branch.
    Presence(PresenceList),
    /// A client message the gateway could not act on.
    Error { code: ErrorCode },
}

impl Reply {
    /// The text frame.
    pub fn to_text(&self) -> Utf8Bytes {
        // Serializing these types cannot fail: no maps with non-string
        // keys, no custom serializers.
        Utf8Bytes::from(serde_json::to_string(self).expect("a reply serializes"))
    }
}

/// `connected`: who the token says the connection is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Connected {
    pub endpoint: &'static str,
    #[serde(flatten)]
    pub who: Who,
    pub heartbeat_interval_s: u64,
    /// Only on resume: whether every missed event was replayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

/// The identity part of `connected`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Who {
    Staff {
        user_id: UserId,
        tenant_id: TenantId,
        branch_ids: Vec<BranchId>,
        /// `null` when not filtered by sector (or unknown).
        sector_ids: Option<Vec<SectorId>>,
    },
    Diner {
        tenant_id: TenantId,
        branch_id: BranchId,
        session_id: SessionId,
        table_id: i64,
    },
}

/// The open connections of one tenant's branch, on every node
/// (PROTOCOL.md §16): the body of `GET /api/presence`, and an admin's
/// `presence` frame with `"type":"presence"` first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PresenceList {
    pub tenant_id: TenantId,
    pub branch_id: BranchId,
    /// By `connected_at`, then `id`.
    pub connections: Vec<PresenceConn>,
}

/// One open connection in a [`PresenceList`]; also what a node keeps of
/// its connections in Redis for the others to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceConn {
    /// `<node>/<n>`: unique among the live nodes.
    pub id: String,
    pub endpoint: String,
    /// Staff only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<UserId>,
    /// Diners only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<SessionId>,
    /// Diners only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_id: Option<i64>,
    /// A waiter's sectors in the branch; `null` when not filtered (or
    /// unknown), and for the other endpoints.
    #[serde(default)]
    pub sector_ids: Option<Vec<SectorId>>,
    /// Unix ms.
    pub connected_at: u64,
    /// The node's name (`WSGATEWAY_NODE_NAME`).
    pub node: String,
}

/// Why a `resync` was sent: the gap in the Redis subscription could not
/// be filled from history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncReason {
    /// History could not be read.
    HistoryUnavailable,
    /// The gap outlasted the history's time window.
    HistoryExpired,
    /// Events published without numbers (plain `PUBLISH`) cannot be found
    /// in history.
    UnnumberedEvents,
    /// History no longer holds the oldest missed events of some scopes.
    HistoryTrimmed,
}

impl ResyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::HistoryUnavailable => "history_unavailable",
            ResyncReason::HistoryExpired => "history_expired",
            ResyncReason::UnnumberedEvents => "unnumbered_events",
            ResyncReason::HistoryTrimmed => "history_trimmed",
        }
    }
}

/// The `code` of an `error` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// An object with a string `type` the endpoint does not handle.
    UnknownMessageType,
    /// Valid JSON that is not an object with a string `type`.
    InvalidMessage,
    /// Not JSON.
    InvalidJson,
    /// A `refresh_token` whose token was refused; nothing changed.
    TokenRejected,
    /// A `refresh_token` sent while the connection's previous one was still
    /// being checked: refused unchecked; nothing changed, and the previous
    /// one is still answered.
    RefreshInProgress,
    /// A `presence` for a branch not in the admin's token.
    ForbiddenBranch,
    /// Presence could not be read (Redis).
    PresenceUnavailable,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn value(r: &Reply) -> Value {
        serde_json::from_str(r.to_text().as_str()).unwrap()
    }

    #[test]
    fn fixed_replies_are_the_protocols_bytes() {
        assert_eq!(Reply::Pong.to_text().as_str(), r#"{"type":"pong"}"#);
        let e = Reply::Error {
            code: ErrorCode::InvalidJson,
        };
        assert_eq!(
            e.to_text().as_str(),
            r#"{"type":"error","code":"invalid_json"}"#
        );
        assert_eq!(
            Reply::TokenRefreshed {
                expires_at: 1_764_680_000
            }
            .to_text()
            .as_str(),
            r#"{"type":"token_refreshed","expires_at":1764680000}"#
        );
        let rejected = Reply::Error {
            code: ErrorCode::TokenRejected,
        };
        assert_eq!(
            rejected.to_text().as_str(),
            r#"{"type":"error","code":"token_rejected"}"#
        );
        let busy = Reply::Error {
            code: ErrorCode::RefreshInProgress,
        };
        assert_eq!(
            busy.to_text().as_str(),
            r#"{"type":"error","code":"refresh_in_progress"}"#
        );
        let r = Reply::Resync {
            reason: ResyncReason::HistoryTrimmed,
        };
        assert_eq!(
            r.to_text().as_str(),
            r#"{"type":"resync","reason":"history_trimmed"}"#
        );
        for reason in [
            ResyncReason::HistoryUnavailable,
            ResyncReason::HistoryExpired,
            ResyncReason::UnnumberedEvents,
            ResyncReason::HistoryTrimmed,
        ] {
            let v = value(&Reply::Resync { reason });
            assert_eq!(v["reason"], reason.as_str());
        }
    }

    /// A staff `connected` of user 7 of tenant 1, branch 5.
    fn staff_connected(endpoint: &'static str) -> Connected {
        Connected {
            endpoint,
            who: Who::Staff {
                user_id: 7,
                tenant_id: 1,
                branch_ids: vec![5],
                sector_ids: None,
            },
            heartbeat_interval_s: 30,
            recovered: None,
        }
    }

    /// Events may not take the replies' types (PROTOCOL.md §5, "Reserved
    /// types"): `crate::event::RESERVED_TYPES` is exactly their list.
    #[test]
    fn the_reserved_event_types_are_the_replies_types() {
        let replies = [
            Reply::Connected(staff_connected("admin")),
            Reply::Pong,
            Reply::SectorsUpdated { sector_ids: None },
            Reply::TokenRefreshed { expires_at: 1 },
            Reply::Resync {
                reason: ResyncReason::HistoryExpired,
            },
            Reply::Error {
                code: ErrorCode::InvalidJson,
            },
            Reply::Presence(PresenceList {
                tenant_id: 1,
                branch_id: 5,
                connections: Vec::new(),
            }),
        ];
        for r in &replies {
            // A new kind of reply stops this from compiling: list it above.
            match r {
                Reply::Connected(_)
                | Reply::Pong
                | Reply::SectorsUpdated { .. }
                | Reply::TokenRefreshed { .. }
                | Reply::Resync { .. }
                | Reply::Presence(_)
                | Reply::Error { .. } => {}
            }
        }
        let mut types: Vec<String> = replies
            .iter()
            .map(|r| value(r)["type"].as_str().unwrap().to_owned())
            .collect();
        let mut reserved: Vec<&str> = crate::event::RESERVED_TYPES.to_vec();
        types.sort();
        reserved.sort();
        assert_eq!(types, reserved);
    }

    #[test]
    fn presence_is_the_contracts_shape() {
        let kitchen = PresenceConn {
            id: "n1/3".into(),
            endpoint: "kitchen".into(),
            user_id: Some(9),
            session_id: None,
            table_id: None,
            sector_ids: None,
            connected_at: 1_765_090_000_123,
            node: "n1".into(),
        };
        let diner = PresenceConn {
            id: "n1/4".into(),
            endpoint: "diner".into(),
            user_id: None,
            session_id: Some(77),
            table_id: Some(12),
            sector_ids: None,
            connected_at: 1_765_090_000_456,
            node: "n1".into(),
        };
        let list = PresenceList {
            tenant_id: 1,
            branch_id: 5,
            connections: vec![kitchen.clone(), diner],
        };
        assert_eq!(
            value(&Reply::Presence(list)),
            json!({"type": "presence", "tenant_id": 1, "branch_id": 5, "connections": [
                {"id": "n1/3", "endpoint": "kitchen", "user_id": 9, "sector_ids": null,
                 "connected_at": 1_765_090_000_123_u64, "node": "n1"},
                {"id": "n1/4", "endpoint": "diner", "session_id": 77, "table_id": 12,
                 "sector_ids": null, "connected_at": 1_765_090_000_456_u64, "node": "n1"}]})
        );
        let text = serde_json::to_string(&kitchen).unwrap();
        assert_eq!(
            serde_json::from_str::<PresenceConn>(&text).unwrap(),
            kitchen
        );
        let e = Reply::Error {
            code: ErrorCode::ForbiddenBranch,
        };
        assert_eq!(
            e.to_text().as_str(),
            r#"{"type":"error","code":"forbidden_branch"}"#
        );
        let e = Reply::Error {
            code: ErrorCode::PresenceUnavailable,
        };
        assert_eq!(
            e.to_text().as_str(),
            r#"{"type":"error","code":"presence_unavailable"}"#
        );
    }

    #[test]
    fn connected_has_every_field_and_recovered_only_on_resume() {
        let mut c = staff_connected("waiter");
        assert_eq!(
            value(&Reply::Connected(c.clone())),
            json!({"type": "connected", "endpoint": "waiter", "user_id": 7, "tenant_id": 1,
                   "branch_ids": [5], "sector_ids": null, "heartbeat_interval_s": 30})
        );
        c.recovered = Some(true);
        assert_eq!(value(&Reply::Connected(c))["recovered"], true);
        let diner = Connected {
            endpoint: "diner",
            who: Who::Diner {
                tenant_id: 1,
                branch_id: 5,
                session_id: 77,
                table_id: 12,
            },
            heartbeat_interval_s: 30,
            recovered: None,
        };
        assert_eq!(
            value(&Reply::Connected(diner)),
            json!({"type": "connected", "endpoint": "diner", "tenant_id": 1, "branch_id": 5,
                   "session_id": 77, "table_id": 12, "heartbeat_interval_s": 30})
        );
        let s = Reply::SectorsUpdated {
            sector_ids: Some(vec![1, 2]),
        };
        assert_eq!(
            value(&s),
            json!({"type": "sectors_updated", "sector_ids": [1, 2]})
        );
    }
}
