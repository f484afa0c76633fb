//! Property: for random populations of connections across tenants and
//! random events, the hub delivers each event to exactly the audience that
//! DESIGN.md §1.3 defines (computed here independently), and never across
//! tenants.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use proptest::prelude::*;
use wsgateway::auth::Endpoint;
use wsgateway::channel::Channel;
use wsgateway::event::{Event, Fields};
use wsgateway::hub::{Hub, Limits, Member, Registration, SectorScope};
use wsgateway::metrics::Metrics;

#[derive(Debug, Clone)]
struct Conn {
    tenant: i64,
    endpoint: Endpoint,
    branches: Vec<i64>,
    /// MANAGER or ADMIN token on the waiter endpoint.
    unfiltered: bool,
    /// Per branch: None when unknown, else the assigned sectors.
    sectors: Vec<Option<Vec<i64>>>,
    /// Diners: (branch, session).
    seat: (i64, i64),
}

fn conn() -> impl Strategy<Value = Conn> {
    (
        0..3i64,
        prop::sample::select(Endpoint::ALL.to_vec()),
        prop::collection::btree_set(0..4i64, 1..4),
        any::<bool>(),
        prop::collection::vec(prop::option::of(prop::collection::vec(0..4i64, 0..3)), 4),
        (0..4i64, 0..3i64),
    )
        .prop_map(
            |(tenant, endpoint, branches, unfiltered, sectors, seat)| Conn {
                tenant,
                endpoint,
                branches: branches.into_iter().collect(),
                unfiltered,
                sectors,
                seat,
            },
        )
}

fn event() -> impl Strategy<Value = (Channel, i64, i64, Option<i64>)> {
    (
        0..5u8,
        0..3i64,
        0..4i64,
        0..4i64,
        prop::option::of(0..4i64),
        0..3i64,
    )
        .prop_map(|(family, tenant, branch, sector, event_sector, session)| {
            let channel = match family {
                0 => Channel::BranchWaiters(branch),
                1 => Channel::SectorWaiters(branch, sector),
                2 => Channel::BranchKitchen(branch),
                3 => Channel::BranchAdmin(branch),
                _ => Channel::Session(session),
            };
            let event_sector = match channel {
                Channel::SectorWaiters(_, s) => event_sector.map(|_| s),
                _ => event_sector,
            };
            (channel, tenant, branch, event_sector)
        })
}

/// DESIGN.md §1.3, written without the gateway's code.
fn audience(c: &Conn, channel: Channel, tenant: i64, branch: i64, sector: Option<i64>) -> bool {
    if c.tenant != tenant {
        return false;
    }
    let has = |b: i64| c.branches.contains(&b);
    let hears = |b: i64, s: i64| {
        c.unfiltered
            || c.sectors[b as usize]
                .as_ref()
                .is_none_or(|assigned| assigned.contains(&s))
    };
    use Endpoint::*;
    match (channel, c.endpoint) {
        (Channel::Session(s), Diner) => c.seat == (branch, s),
        (Channel::Session(_), _) | (_, Diner) => false,
        (
            Channel::BranchWaiters(b)
            | Channel::SectorWaiters(b, _)
            | Channel::BranchKitchen(b)
            | Channel::BranchAdmin(b),
            Admin,
        ) => has(b),
        (Channel::BranchKitchen(b), Kitchen) => has(b),
        (Channel::BranchWaiters(b), Waiter) => has(b) && sector.is_none_or(|s| hears(b, s)),
        (Channel::SectorWaiters(b, s), Waiter) => has(b) && hears(b, s),
        _ => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_hub_delivers_exactly_to_the_audience(
        conns in prop::collection::vec(conn(), 1..40),
        events in prop::collection::vec(event(), 1..25),
    ) {
        let hub = Arc::new(Hub::new(Limits { max_total: 1000, max_per_user: 1000, max_per_session: 1000 }, Arc::new(Metrics::new())));
        let mut open = Vec::new();
        for (user, c) in conns.iter().enumerate() {
            let member = match c.endpoint {
                Endpoint::Diner => Member::Diner { branch_id: c.seat.0, session_id: c.seat.1 },
                endpoint => Member::Staff {
                    user_id: user as i64,
                    branch_ids: c.branches.clone(),
                    sectors: if endpoint != Endpoint::Waiter || c.unfiltered {
                        SectorScope::All
                    } else {
                        SectorScope::ByBranch(c.branches.iter().map(|b| (*b, c.sectors[*b as usize].clone())).collect())
                    },
                },
            };
            let reg = hub.register(Registration {
                tenant_id: c.tenant, endpoint: c.endpoint, member, expires_at: u64::MAX, jti: None,
                queue_capacity: 100, greeting: None,
            }).unwrap();
            open.push((reg, c));
        }
        for (channel, tenant, branch, sector) in events {
            let fields = Fields {
                event_type: "ROUND_READY".into(), tenant_id: tenant, branch_id: branch, sector_id: sector,
                session_id: None, ts_ms: None, event_id: None, entity_waiter_id: None,
            };
            let event = Event::assemble(channel, fields, Utf8Bytes::from_static("{}")).unwrap();
            let fanout = hub.deliver(&event, &[]);
            let mut expected = 0;
            for (reg, c) in open.iter_mut() {
                let want = audience(c, channel, tenant, branch, sector);
                let got = reg.handle.pop().is_some();
                prop_assert_eq!(got, want, "{:?} for {:?} t{} b{} s{:?}", c, channel, tenant, branch, sector);
                prop_assert!(reg.handle.pop().is_none(), "delivered twice");
                prop_assert!(!got || c.tenant == tenant, "crossed tenants");
                expected += want as usize;
            }
            prop_assert_eq!(fanout.queued, expected);
        }
    }
}
