//! WebSocket close codes of DESIGN.md §1.6, in one place.

/// Server shutting down; heartbeat timeout.
pub const GOING_AWAY: u16 = 1001;
/// A binary frame was received.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// The client broke the WebSocket protocol (RFC 6455; not in the seed).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A text frame was not valid UTF-8 (RFC 6455; not in the seed).
pub const INVALID_PAYLOAD: u16 = 1007;
/// Slow consumer: the outbound queue overflowed.
pub const SLOW_CONSUMER: u16 = 1008;
/// An inbound message larger than the limit.
pub const TOO_BIG: u16 = 1009;
/// Internal error.
pub const INTERNAL: u16 = 1011;
/// The gateway is at its connection limit.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// Token missing, invalid or expired.
pub const UNAUTHORIZED: u16 = 4001;
/// Role or origin not allowed.
pub const FORBIDDEN: u16 = 4003;
/// The user (staff) or table session (diners) already has the maximum
/// number of connections.
pub const USER_LIMIT: u16 = 4008;
/// Too many messages per second.
pub const RATE_LIMITED: u16 = 4029;

/// The short reason sent with each code.
pub fn reason(code: u16) -> &'static str {
    match code {
        GOING_AWAY => "going away",
        UNSUPPORTED_DATA => "binary frames are not accepted",
        PROTOCOL_ERROR => "protocol error",
        INVALID_PAYLOAD => "invalid UTF-8",
        SLOW_CONSUMER => "slow consumer",
        TOO_BIG => "message too big",
        TRY_AGAIN_LATER => "gateway at capacity",
        UNAUTHORIZED => "unauthorized",
        FORBIDDEN => "forbidden",
        USER_LIMIT => "too many connections for this user",
        RATE_LIMITED => "rate limit exceeded",
        _ => "internal error",
    }
}
