//! Waiters' sector assignments (DESIGN.md §1.8).
//!
//! Without a database every waiter's assignments are unknown, so each one
//! hears every sector of its branches (the seed's fallback). This module is
//! the seam where the PostgreSQL repository plugs in; callers already await
//! it, so a lookup can never block the dispatcher, only its own handshake.

use crate::auth::StaffIdentity;
use crate::hub::SectorScope;

/// Where a waiter's sectors come from.
#[derive(Debug, Default)]
pub struct SectorAssignments {
    _private: (),
}

impl SectorAssignments {
    /// No database: every lookup answers "unknown".
    pub fn disabled() -> SectorAssignments {
        SectorAssignments::default()
    }

    /// The sectors a WAITER token hears, branch by branch.
    pub async fn scope_for(&self, id: &StaffIdentity) -> SectorScope {
        SectorScope::ByBranch(id.branch_ids.iter().map(|b| (*b, None)).collect())
    }

    /// What `/ws/health/detailed` reports.
    pub fn status(&self) -> &'static str {
        "disabled"
    }
}
