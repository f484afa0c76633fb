//! Property: for random populations of connections across tenants and
//! users, and random events on every channel family, the hub delivers each event to exactly the audience that
//! PROTOCOL.md §6 defines (computed here independently), and never across
//! tenants; and that audience is the one `hub::audience::receives`, the
//! gateway's own statement of the rule, gives. Through the dispatcher, with two tenants drawing event ids from
//! one small pool, each connection gets each of its tenant's events once,
//! and one tenant's id never suppresses another tenant's event.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tungstenite::Utf8Bytes;
use wsgateway::auth::Endpoint;
use wsgateway::broker::EventQueue;
use wsgateway::channel::Channel;
use wsgateway::dispatcher::Dispatcher;
use wsgateway::event::{Event, Fields};
use wsgateway::hub::audience::receives;
use wsgateway::hub::{Hub, Limits, Member, Registered, Registration, SectorScope};
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
    /// Staff: the user, from a small pool so that users have several
    /// connections.
    user: i64,
}

fn conn() -> impl Strategy<Value = Conn> {
    (
        0..3i64,
        prop::sample::select(Endpoint::ALL.to_vec()),
        prop::collection::btree_set(0..4i64, 1..4),
        any::<bool>(),
        prop::collection::vec(prop::option::of(prop::collection::vec(0..4i64, 0..3)), 4),
        (0..4i64, 0..3i64),
        0..3i64,
    )
        .prop_map(
            |(tenant, endpoint, branches, unfiltered, sectors, seat, user)| Conn {
                tenant,
                endpoint,
                branches: branches.into_iter().collect(),
                unfiltered,
                sectors,
                seat,
                user,
            },
        )
}

fn event() -> impl Strategy<Value = (Channel, i64, i64, Option<i64>)> {
    (
        0..7u8,
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
                4 => Channel::Session(session),
                5 => Channel::User(session),
                _ => Channel::TenantStaff,
            };
            let event_sector = match channel {
                Channel::SectorWaiters(_, s) => event_sector.map(|_| s),
                _ => event_sector,
            };
            (channel, tenant, branch, event_sector)
        })
}

/// What a drawn connection's token makes it a member of.
fn member(c: &Conn) -> Member {
    match c.endpoint {
        // (Routing never reads the table.)
        Endpoint::Diner => Member::Diner {
            branch_id: c.seat.0,
            session_id: c.seat.1,
            table_id: 1,
        },
        endpoint => Member::Staff {
            user_id: c.user,
            branch_ids: c.branches.clone(),
            sectors: if endpoint != Endpoint::Waiter || c.unfiltered {
                SectorScope::All
            } else {
                SectorScope::ByBranch(
                    c.branches
                        .iter()
                        .map(|b| (*b, c.sectors[*b as usize].clone()))
                        .collect(),
                )
            },
        },
    }
}

/// Opens one hub registration per drawn connection.
fn register<'a>(hub: &Arc<Hub>, conns: &'a [Conn]) -> Vec<(Registered, &'a Conn)> {
    let mut open = Vec::new();
    for c in conns {
        let reg = hub
            .register(Registration {
                tenant_id: c.tenant,
                endpoint: c.endpoint,
                member: member(c),
                expires_at: u64::MAX,
                jti: None,
                queue_capacity: 100,
                greeting: None,
            })
            .unwrap();
        open.push((reg, c));
    }
    open
}

/// The event ids both tenants draw from: few, so that they collide.
const ID_POOL: i64 = 3;

/// What an event with an id is about, per tenant and id: its branch and its
/// sector (an id names one event, however many channels carry it).
fn contents() -> impl Strategy<Value = Vec<(i64, Option<i64>)>> {
    prop::collection::vec((0..4i64, prop::option::of(0..4i64)), (2 * ID_POOL) as usize)
}

/// An arrival: tenant 0 or 1, a channel family, an id from the pool (or
/// none), and the channel's sector and session.
fn arrival() -> impl Strategy<Value = (i64, u8, Option<i64>, i64, i64, i64)> {
    (
        0..2i64,
        0..7u8,
        prop::option::of(0..ID_POOL),
        0..4i64,
        0..4i64,
        0..3i64,
    )
}

/// PROTOCOL.md §6, written without the gateway's code.
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
        (Channel::User(u), _) => c.user == u,
        (Channel::TenantStaff, _) => true,
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
        let mut open = register(&hub, &conns);
        for (channel, tenant, branch, sector) in events {
            let fields = Fields {
                event_type: "ROUND_READY".into(), tenant_id: tenant, branch_id: branch, sector_id: sector,
                session_id: None, ts_ms: None, event_id: None, entity_waiter_id: None, ack_within_s: None,
            };
            let event = Event::assemble(channel, fields, Utf8Bytes::from_static("{}")).unwrap();
            let fanout = hub.deliver(&event, &[], &mut Vec::new());
            let mut expected = 0;
            for (reg, c) in open.iter_mut() {
                let want = audience(c, channel, tenant, branch, sector);
                // The second oracle: the gateway's own rule, which the hub's
                // indices are a fast way to enumerate.
                let rule = receives(c.tenant, c.endpoint, &member(c), channel, &event.fields);
                prop_assert_eq!(rule, want, "receives disagrees with the model: {:?} for {:?} t{} b{} s{:?}", c, channel, tenant, branch, sector);
                let got = reg.handle.pop().is_some();
                prop_assert_eq!(got, want, "{:?} for {:?} t{} b{} s{:?}", c, channel, tenant, branch, sector);
                prop_assert!(reg.handle.pop().is_none(), "delivered twice");
                prop_assert!(!got || c.tenant == tenant, "crossed tenants");
                expected += want as usize;
            }
            prop_assert_eq!(fanout.queued, expected);
        }
    }

    #[test]
    fn each_tenants_event_reaches_each_connection_once(
        conns in prop::collection::vec(conn(), 1..40),
        contents in contents(),
        arrivals in prop::collection::vec(arrival(), 1..30),
    ) {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(Limits { max_total: 1000, max_per_user: 1000, max_per_session: 1000 }, metrics.clone()));
        let queue = Arc::new(EventQueue::new(10, metrics.clone()));
        let long = Duration::from_secs(3600);
        let mut dispatcher = Dispatcher::new(hub.clone(), queue, metrics, long, long);
        let mut open = register(&hub, &conns);
        // Per connection, the (tenant, event id) pairs it has had.
        let mut had: HashMap<usize, HashSet<(i64, i64)>> = HashMap::new();
        for (n, (tenant, family, id, drawn_branch, drawn_sector, session)) in arrivals.into_iter().enumerate() {
            let (branch, sector) = match id {
                Some(i) => contents[(tenant * ID_POOL + i) as usize],
                None => (drawn_branch, Some(drawn_sector).filter(|s| s % 2 == 0)),
            };
            let channel = match family {
                0 => Channel::BranchWaiters(branch),
                1 => Channel::SectorWaiters(branch, sector.unwrap_or(drawn_sector)),
                2 => Channel::BranchKitchen(branch),
                3 => Channel::BranchAdmin(branch),
                4 => Channel::Session(session),
                5 => Channel::User(session),
                _ => Channel::TenantStaff,
            };
            let id_field = id.map(|i| format!(r#""event_id":"order-{i}","#)).unwrap_or_default();
            let sector_field = sector.map(|s| format!(r#","sector_id":{s}"#)).unwrap_or_default();
            // Id-less events are told apart by their text.
            let text = format!(
                r#"{{{id_field}"type":"ROUND_READY","tenant_id":{tenant},"branch_id":{branch}{sector_field},"n":{n}}}"#
            );
            let event = Event::parse(channel, text.into()).unwrap();
            dispatcher.dispatch(event, 0);
            for (k, (reg, c)) in open.iter_mut().enumerate() {
                let seen = had.entry(k).or_default();
                let mut want = audience(c, channel, tenant, branch, sector);
                if let Some(i) = id {
                    want = want && seen.insert((tenant, i));
                }
                let got = reg.handle.pop().is_some();
                prop_assert_eq!(got, want, "{:?} for {:?} t{} b{} s{:?} id {:?}", c, channel, tenant, branch, sector, id);
                prop_assert!(reg.handle.pop().is_none(), "delivered twice");
            }
        }
    }
}
