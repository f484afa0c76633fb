//! WebSocket close codes of PROTOCOL.md §9, in one place: why the gateway
//! closes a connection, as a [`Close`] that knows its code and reason.

/// Why the gateway closes (or refuses) a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Close {
    /// 1012 (service restart): the server is draining or shutting down;
    /// the client should reconnect, with jitter, and resume.
    Shutdown,
    /// 1001: no frame from the client within the heartbeat timeout.
    Heartbeat,
    /// 1002: the client broke the WebSocket protocol (RFC 6455; not in the seed).
    ProtocolError,
    /// 1003: a binary frame was received.
    Binary,
    /// 1007: a text frame was not valid UTF-8 (RFC 6455; not in the seed).
    InvalidUtf8,
    /// 1008: slow consumer, the outbound queue overflowed.
    SlowConsumer,
    /// 1009: an inbound message larger than the limit.
    TooBig,
    /// 1013: the gateway is at its connection limit.
    AtCapacity,
    /// 4001: token missing, invalid, expired or revoked.
    Unauthorized,
    /// 4003: role or origin not allowed.
    Forbidden,
    /// 4008: the user (staff) or table session (diners) already has the
    /// maximum number of connections.
    UserLimit,
    /// 4029: too many messages per second.
    RateLimited,
}

impl Close {
    pub const ALL: [Close; 12] = [
        Close::Shutdown,
        Close::Heartbeat,
        Close::ProtocolError,
        Close::Binary,
        Close::InvalidUtf8,
        Close::SlowConsumer,
        Close::TooBig,
        Close::AtCapacity,
        Close::Unauthorized,
        Close::Forbidden,
        Close::UserLimit,
        Close::RateLimited,
    ];

    /// The close code sent.
    pub fn code(self) -> u16 {
        match self {
            Close::Shutdown => 1012,
            Close::Heartbeat => 1001,
            Close::ProtocolError => 1002,
            Close::Binary => 1003,
            Close::InvalidUtf8 => 1007,
            Close::SlowConsumer => 1008,
            Close::TooBig => 1009,
            Close::AtCapacity => 1013,
            Close::Unauthorized => 4001,
            Close::Forbidden => 4003,
            Close::UserLimit => 4008,
            Close::RateLimited => 4029,
        }
    }

    /// The short reason sent with the code.
    pub fn reason(self) -> &'static str {
        match self {
            Close::Shutdown => "service restart",
            Close::Heartbeat => "going away",
            Close::ProtocolError => "protocol error",
            Close::Binary => "binary frames are not accepted",
            Close::InvalidUtf8 => "invalid UTF-8",
            Close::SlowConsumer => "slow consumer",
            Close::TooBig => "message too big",
            Close::AtCapacity => "gateway at capacity",
            Close::Unauthorized => "unauthorized",
            Close::Forbidden => "forbidden",
            Close::UserLimit => "too many connections for this user",
            Close::RateLimited => "rate limit exceeded",
        }
    }

    /// A small number for an atomic: its place in [`Close::ALL`], plus one.
    pub fn to_index(self) -> u8 {
        self as u8 + 1
    }

    /// The inverse of [`Close::to_index`]; `None` for 0.
    pub fn from_index(i: u8) -> Option<Close> {
        Close::ALL.get(usize::from(i).checked_sub(1)?).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_those_of_the_protocol_and_indices_round_trip() {
        let codes: Vec<u16> = Close::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(
            codes,
            [
                1012, 1001, 1002, 1003, 1007, 1008, 1009, 1013, 4001, 4003, 4008, 4029
            ]
        );
        for c in Close::ALL {
            assert_eq!(Close::from_index(c.to_index()), Some(c));
        }
        assert_eq!(Close::from_index(0), None);
    }
}
