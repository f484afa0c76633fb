//! Who an event is for, stated as a plain predicate over one connection.
//!
//! This is PROTOCOL.md §6 written once as code. The hub's indices are a fast
//! way to enumerate the connections for which [`receives`] is true; tests
//! check the two against each other, and the dispatcher uses the predicate
//! to skip connections that already got a repeated event.

use crate::auth::{BranchId, Endpoint, SectorId, SessionId, TenantId, UserId};
use crate::broker::Scope;
use crate::channel::Channel;
use crate::event::Fields;

/// Which sectors a waiter-endpoint connection hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SectorScope {
    /// Every sector: MANAGER and ADMIN tokens, and the non-waiter endpoints.
    All,
    /// Per branch: `None` when the assignments are unknown (then every
    /// sector, the seed's fallback), or the sectors assigned today.
    ByBranch(Vec<(BranchId, Option<Vec<SectorId>>)>),
}

impl SectorScope {
    /// Whether a waiter with this scope hears sector `s` of branch `b`.
    pub fn hears(&self, b: BranchId, s: SectorId) -> bool {
        match self {
            SectorScope::All => true,
            SectorScope::ByBranch(branches) => branches
                .iter()
                .find(|(branch, _)| *branch == b)
                .is_none_or(|(_, sectors)| sectors.as_ref().is_none_or(|ids| ids.contains(&s))),
        }
    }

    /// The sectors in branch `b`, or `None` when they are all heard.
    pub fn in_branch(&self, b: BranchId) -> Option<&[SectorId]> {
        match self {
            SectorScope::All => None,
            SectorScope::ByBranch(branches) => branches
                .iter()
                .find(|(branch, _)| *branch == b)
                .and_then(|(_, sectors)| sectors.as_deref()),
        }
    }

    /// What `connected` and `sectors_updated` report: the union of the
    /// sectors, or `None` when unfiltered or unknown for any branch.
    pub fn reported(&self) -> Option<Vec<SectorId>> {
        match self {
            SectorScope::All => None,
            SectorScope::ByBranch(branches) => {
                let mut all = Vec::new();
                for (_, sectors) in branches {
                    all.extend(sectors.as_ref()?);
                }
                all.sort_unstable();
                all.dedup();
                Some(all)
            }
        }
    }
}

/// What a connection's token makes it a member of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    Staff {
        user_id: UserId,
        branch_ids: Vec<BranchId>,
        sectors: SectorScope,
    },
    Diner {
        branch_id: BranchId,
        session_id: SessionId,
        /// The table its token names (presence lists it).
        table_id: i64,
    },
}

impl Member {
    /// The history scopes whose events this member (of `tenant`) may be in
    /// the audience of.
    pub fn scopes(&self, tenant: TenantId) -> Vec<Scope> {
        match self {
            Member::Staff {
                user_id,
                branch_ids,
                ..
            } => branch_ids
                .iter()
                .map(|b| Scope::Branch(tenant, *b))
                .chain([Scope::User(tenant, *user_id), Scope::TenantStaff(tenant)])
                .collect(),
            Member::Diner { session_id, .. } => vec![Scope::Session(tenant, *session_id)],
        }
    }
}

/// Whether a connection's acks count for an event it got on `channel`
/// (PROTOCOL.md §15): a branch's admins get its waiters' and kitchen's
/// events to oversee them, not to handle them, so a dashboard never
/// answers for a kitchen display that is off.
pub fn acks_from(endpoint: Endpoint, channel: Channel) -> bool {
    !(endpoint == Endpoint::Admin
        && matches!(
            channel,
            Channel::BranchWaiters(_) | Channel::SectorWaiters(..) | Channel::BranchKitchen(_)
        ))
}

/// Whether a connection (tenant, endpoint, membership) is in the audience of
/// an event (its fields, arriving on `channel`).
pub fn receives(
    tenant_id: TenantId,
    endpoint: Endpoint,
    member: &Member,
    channel: Channel,
    event: &Fields,
) -> bool {
    if tenant_id != event.tenant_id {
        return false;
    }
    match (member, endpoint) {
        (
            Member::Diner {
                branch_id,
                session_id,
                ..
            },
            Endpoint::Diner,
        ) => channel == Channel::Session(*session_id) && *branch_id == event.branch_id,
        (Member::Diner { .. }, _) | (_, Endpoint::Diner) => false,
        (
            Member::Staff {
                user_id,
                branch_ids,
                sectors,
            },
            endpoint,
        ) => {
            // A user's and the tenant's staff channels reach every staff
            // endpoint and ignore the event's branch.
            match channel {
                Channel::User(u) => return *user_id == u,
                Channel::TenantStaff => return true,
                _ => {}
            }
            let Some(b) = channel.branch() else {
                return false;
            };
            if !branch_ids.contains(&b) {
                return false;
            }
            match (endpoint, channel) {
                (Endpoint::Admin, _) => true,
                (Endpoint::Kitchen, Channel::BranchKitchen(_)) => true,
                (Endpoint::Waiter, Channel::BranchWaiters(_)) => {
                    event.sector_id.is_none_or(|s| sectors.hears(b, s))
                }
                (Endpoint::Waiter, Channel::SectorWaiters(_, s)) => sectors.hears(b, s),
                _ => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(tenant: i64, branch: i64, sector: Option<i64>) -> Fields {
        Fields {
            event_type: "ROUND_READY".into(),
            tenant_id: tenant,
            branch_id: branch,
            sector_id: sector,
            session_id: None,
            ts_ms: None,
            event_id: None,
            entity_waiter_id: None,
            ack_within_s: None,
        }
    }

    fn waiter(sectors: SectorScope) -> Member {
        Member::Staff {
            user_id: 1,
            branch_ids: vec![5],
            sectors,
        }
    }

    #[test]
    fn sector_rules() {
        let assigned = waiter(SectorScope::ByBranch(vec![(5, Some(vec![10]))]));
        let none_today = waiter(SectorScope::ByBranch(vec![(5, Some(vec![]))]));
        let unknown = waiter(SectorScope::ByBranch(vec![(5, None)]));
        let manager = waiter(SectorScope::All);
        let w = |m: &Member, c: Channel, s| receives(1, Endpoint::Waiter, m, c, &fields(1, 5, s));
        for m in [&assigned, &none_today, &unknown, &manager] {
            assert!(w(m, Channel::BranchWaiters(5), None));
            assert!(!w(m, Channel::BranchWaiters(6), None));
            assert!(!w(m, Channel::BranchKitchen(5), None));
        }
        assert!(w(&assigned, Channel::BranchWaiters(5), Some(10)));
        assert!(!w(&assigned, Channel::BranchWaiters(5), Some(11)));
        assert!(w(&assigned, Channel::SectorWaiters(5, 10), Some(10)));
        assert!(!w(&assigned, Channel::SectorWaiters(5, 11), None));
        assert!(!w(&none_today, Channel::BranchWaiters(5), Some(10)));
        assert!(!w(&none_today, Channel::SectorWaiters(5, 10), None));
        assert!(w(&unknown, Channel::SectorWaiters(5, 11), None));
        assert!(w(&manager, Channel::SectorWaiters(5, 11), None));
        assert_eq!(none_today_reported(), Some(vec![]));
    }

    fn none_today_reported() -> Option<Vec<i64>> {
        SectorScope::ByBranch(vec![(5, Some(vec![])), (6, Some(vec![]))]).reported()
    }

    #[test]
    fn user_and_tenant_staff_channels_reach_staff_on_every_endpoint_and_branch() {
        let user7 = waiter(SectorScope::ByBranch(vec![(5, Some(vec![]))]));
        let elsewhere = fields(1, 9, Some(3));
        for endpoint in [Endpoint::Waiter, Endpoint::Kitchen, Endpoint::Admin] {
            assert!(receives(1, endpoint, &user7, Channel::User(1), &elsewhere));
            assert!(!receives(1, endpoint, &user7, Channel::User(2), &elsewhere));
            assert!(receives(
                1,
                endpoint,
                &user7,
                Channel::TenantStaff,
                &elsewhere
            ));
            assert!(!receives(
                2,
                endpoint,
                &user7,
                Channel::TenantStaff,
                &elsewhere
            ));
            assert!(!receives(2, endpoint, &user7, Channel::User(1), &elsewhere));
        }
        let diner = Member::Diner {
            branch_id: 9,
            session_id: 1,
            table_id: 3,
        };
        assert!(!receives(
            1,
            Endpoint::Diner,
            &diner,
            Channel::TenantStaff,
            &elsewhere
        ));
        assert!(!receives(
            1,
            Endpoint::Diner,
            &diner,
            Channel::User(1),
            &elsewhere
        ));
    }

    #[test]
    fn tenants_never_cross() {
        let admin = waiter(SectorScope::All);
        assert!(receives(
            1,
            Endpoint::Admin,
            &admin,
            Channel::BranchKitchen(5),
            &fields(1, 5, None)
        ));
        assert!(!receives(
            2,
            Endpoint::Admin,
            &admin,
            Channel::BranchKitchen(5),
            &fields(1, 5, None)
        ));
        let diner = Member::Diner {
            branch_id: 5,
            session_id: 77,
            table_id: 3,
        };
        let ev = fields(1, 5, None);
        assert!(receives(
            1,
            Endpoint::Diner,
            &diner,
            Channel::Session(77),
            &ev
        ));
        assert!(!receives(
            2,
            Endpoint::Diner,
            &diner,
            Channel::Session(77),
            &ev
        ));
        assert!(!receives(
            1,
            Endpoint::Diner,
            &diner,
            Channel::Session(78),
            &ev
        ));
        assert!(!receives(
            1,
            Endpoint::Diner,
            &diner,
            Channel::Session(77),
            &fields(1, 6, None)
        ));
        assert!(!receives(
            1,
            Endpoint::Admin,
            &admin,
            Channel::Session(77),
            &ev
        ));
    }

    #[test]
    fn reported_sectors() {
        assert_eq!(SectorScope::All.reported(), None);
        let s = SectorScope::ByBranch(vec![(5, Some(vec![3, 1])), (6, Some(vec![1, 2]))]);
        assert_eq!(s.reported(), Some(vec![1, 2, 3]));
        let s = SectorScope::ByBranch(vec![(5, Some(vec![3])), (6, None)]);
        assert_eq!(s.reported(), None);
    }

    #[test]
    fn admins_oversee_the_waiters_and_kitchen_and_answer_for_the_rest() {
        use Channel::*;
        let overseen = [BranchWaiters(5), SectorWaiters(5, 10), BranchKitchen(5)];
        let answered = [BranchAdmin(5), TenantStaff, User(7), Session(77)];
        for c in overseen {
            assert!(!acks_from(Endpoint::Admin, c), "{c}");
        }
        for c in answered.into_iter().chain(overseen) {
            for e in [Endpoint::Waiter, Endpoint::Kitchen, Endpoint::Diner] {
                assert!(acks_from(e, c), "{e:?} {c}");
            }
        }
        for c in answered {
            assert!(acks_from(Endpoint::Admin, c), "{c}");
        }
    }
}
