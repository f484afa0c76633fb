//! The seed's channel names, parsed into a closed enum.
//!
//! The backend publishes on these names (Redis pub/sub or the publish API);
//! the channel alone says which audience an event is for.

use std::fmt;
use std::str::FromStr;

use crate::auth::{BranchId, SectorId, SessionId, UserId};

/// One of the seven channel families of PROTOCOL.md §6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    /// `channel:branch:{b}:waiters`
    BranchWaiters(BranchId),
    /// `channel:sector:{b}:{s}:waiters`
    SectorWaiters(BranchId, SectorId),
    /// `channel:branch:{b}:kitchen`
    BranchKitchen(BranchId),
    /// `channel:branch:{b}:admin`
    BranchAdmin(BranchId),
    /// `channel:session:{id}`
    Session(SessionId),
    /// `channel:user:{u}`: every staff connection of user `u` (the seed's
    /// `send_to_user`).
    User(UserId),
    /// `channel:tenant:staff`: every staff connection of the event's tenant
    /// (the seed's `broadcast`, never across tenants).
    TenantStaff,
}

impl Channel {
    /// The branch the channel names; sessions, users and the tenant's
    /// staff name none.
    pub fn branch(self) -> Option<BranchId> {
        match self {
            Channel::BranchWaiters(b)
            | Channel::SectorWaiters(b, _)
            | Channel::BranchKitchen(b)
            | Channel::BranchAdmin(b) => Some(b),
            Channel::Session(_) | Channel::User(_) | Channel::TenantStaff => None,
        }
    }

    /// The Redis patterns that cover every channel family.
    pub const PATTERNS: [&'static str; 7] = [
        "channel:branch:*:waiters",
        "channel:sector:*:waiters",
        "channel:branch:*:kitchen",
        "channel:branch:*:admin",
        "channel:session:*",
        "channel:user:*",
        "channel:tenant:staff",
    ];
}

/// A channel name that is not one of the seven families.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown channel {0:?}")]
pub struct UnknownChannel(pub String);

impl FromStr for Channel {
    type Err = UnknownChannel;

    fn from_str(s: &str) -> Result<Channel, UnknownChannel> {
        let unknown = || UnknownChannel(s.chars().take(200).collect());
        let parts: Vec<&str> = s.split(':').collect();
        let id = |p: &str| -> Result<i64, UnknownChannel> {
            // Canonical decimal only: `05` is not branch 5, so that each
            // channel (and the history key of its scope) has one name.
            if p.is_empty()
                || !p.bytes().all(|c| c.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(unknown());
            }
            p.parse().map_err(|_| unknown())
        };
        match parts.as_slice() {
            ["channel", "branch", b, "waiters"] => Ok(Channel::BranchWaiters(id(b)?)),
            ["channel", "branch", b, "kitchen"] => Ok(Channel::BranchKitchen(id(b)?)),
            ["channel", "branch", b, "admin"] => Ok(Channel::BranchAdmin(id(b)?)),
            ["channel", "sector", b, s, "waiters"] => Ok(Channel::SectorWaiters(id(b)?, id(s)?)),
            ["channel", "session", s] => Ok(Channel::Session(id(s)?)),
            ["channel", "user", u] => Ok(Channel::User(id(u)?)),
            ["channel", "tenant", "staff"] => Ok(Channel::TenantStaff),
            _ => Err(unknown()),
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Channel::BranchWaiters(b) => write!(f, "channel:branch:{b}:waiters"),
            Channel::SectorWaiters(b, s) => write!(f, "channel:sector:{b}:{s}:waiters"),
            Channel::BranchKitchen(b) => write!(f, "channel:branch:{b}:kitchen"),
            Channel::BranchAdmin(b) => write!(f, "channel:branch:{b}:admin"),
            Channel::Session(s) => write!(f, "channel:session:{s}"),
            Channel::User(u) => write!(f, "channel:user:{u}"),
            Channel::TenantStaff => f.write_str("channel:tenant:staff"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_family() {
        for c in [
            Channel::BranchWaiters(5),
            Channel::SectorWaiters(5, 10),
            Channel::BranchKitchen(5),
            Channel::BranchAdmin(5),
            Channel::Session(77),
            Channel::User(7),
            Channel::TenantStaff,
        ] {
            assert_eq!(c.to_string().parse::<Channel>(), Ok(c));
        }
    }

    #[test]
    fn rejects_anything_else() {
        for bad in [
            "",
            "channel:branch:5",
            "channel:branch:x:waiters",
            "channel:branch:-1:waiters",
            "channel:branch:5:waiter",
            "channel:sector:5:waiters",
            "channel:session:",
            "channel:session:1:2",
            "channel:branch:99999999999999999999:admin",
            "channel:branch:+5:admin",
            "channel:branch:05:admin",
            "channel:session:0077",
            "channel:user:",
            "channel:user:x",
            "channel:user:7:waiters",
            "channel:tenant",
            "channel:tenant:1",
            "channel:tenant:staff:1",
        ] {
            assert!(bad.parse::<Channel>().is_err(), "{bad}");
        }
    }
}
