//! The routing table shared by the embedded and Redis routing tests: two
//! tenants × two branches × every role, with sessions and one user on three
//! endpoints in both tenants, and an oracle written from PROTOCOL.md §6
//! independently of the gateway's code.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};

use super::*;

#[derive(Debug, Clone)]
pub struct Conn {
    pub label: String,
    pub tenant: i64,
    pub endpoint: &'static str,
    pub branches: Vec<i64>,
    /// Staff: the token's `sub`.
    pub user: Option<i64>,
    /// Diners: (branch, session).
    pub seat: Option<(i64, i64)>,
}

#[derive(Debug, Clone)]
pub struct Published {
    pub id: String,
    pub channel: String,
    pub tenant: i64,
    pub branch: i64,
}

/// PROTOCOL.md §6, written independently of the gateway's own code. Without
/// a database every waiter's sectors are unknown, so waiters hear every
/// sector of their branches.
pub fn oracle(c: &Conn, e: &Published) -> bool {
    if c.tenant != e.tenant {
        return false;
    }
    let parts: Vec<&str> = e.channel.split(':').collect();
    let has = |b: &str| c.branches.contains(&b.parse::<i64>().unwrap());
    match parts.as_slice() {
        ["channel", "branch", b, "waiters"] | ["channel", "sector", b, _, "waiters"] => {
            matches!(c.endpoint, "waiter" | "admin") && has(b)
        }
        ["channel", "branch", b, "kitchen"] => matches!(c.endpoint, "kitchen" | "admin") && has(b),
        ["channel", "branch", b, "admin"] => c.endpoint == "admin" && has(b),
        ["channel", "session", s] => {
            c.endpoint == "diner" && c.seat == Some((e.branch, s.parse().unwrap()))
        }
        ["channel", "user", u] => c.user == Some(u.parse().unwrap()),
        ["channel", "tenant", "staff"] => c.endpoint != "diner",
        _ => unreachable!(),
    }
}

pub fn population(tenants: [i64; 2]) -> Vec<(Conn, String)> {
    let mut out = Vec::new();
    let mut next_sub = 100;
    let mut staff_conn = |label: String, tenant, endpoint, branches: Vec<i64>, roles: &[&str]| {
        // Sub 900 is one user on several endpoints; the others are unique.
        let sub = if label.contains("-u900@") {
            900
        } else {
            next_sub += 1;
            next_sub
        };
        let token = staff(sub, tenant, &branches, roles);
        (
            Conn {
                label,
                tenant,
                endpoint,
                branches,
                user: Some(sub),
                seat: None,
            },
            token,
        )
    };
    for t in tenants {
        for b in [10, 20] {
            out.push(staff_conn(
                format!("t{t}b{b}-waiter"),
                t,
                "waiter",
                vec![b],
                &["WAITER"],
            ));
            out.push(staff_conn(
                format!("t{t}b{b}-manager@waiter"),
                t,
                "waiter",
                vec![b],
                &["MANAGER"],
            ));
            out.push(staff_conn(
                format!("t{t}b{b}-kitchen"),
                t,
                "kitchen",
                vec![b],
                &["KITCHEN"],
            ));
            out.push(staff_conn(
                format!("t{t}b{b}-admin"),
                t,
                "admin",
                vec![b],
                &["ADMIN"],
            ));
        }
        out.push(staff_conn(
            format!("t{t}-manager@admin-both"),
            t,
            "admin",
            vec![10, 20],
            &["MANAGER"],
        ));
        out.push(staff_conn(
            format!("t{t}-waiter-both"),
            t,
            "waiter",
            vec![10, 20],
            &["WAITER"],
        ));
        // User 900 of each tenant, on three endpoints and both branches.
        for (endpoint, branches, role) in [
            ("waiter", vec![10], "WAITER"),
            ("kitchen", vec![20], "KITCHEN"),
            ("admin", vec![10, 20], "ADMIN"),
        ] {
            out.push(staff_conn(
                format!("t{t}-u900@{endpoint}"),
                t,
                endpoint,
                branches,
                &[role],
            ));
        }
        // Session ids repeat across tenants and branches on purpose.
        for (b, s) in [(10, 100), (20, 200), (10, 200)] {
            let conn = Conn {
                label: format!("t{t}b{b}s{s}-diner"),
                tenant: t,
                endpoint: "diner",
                branches: vec![b],
                user: None,
                seat: Some((b, s)),
            };
            out.push((conn, diner(t, b, 1, s)));
        }
    }
    out
}

pub fn events(tenants: [i64; 2]) -> Vec<(Published, Value)> {
    let mut out = Vec::new();
    let mut n = 0;
    let mut add = |channel: String, tenant: i64, branch: i64, extra: Value| {
        n += 1;
        let id = format!("ev-{n}");
        let mut ev = json!({"type": "ROUND_READY", "tenant_id": tenant, "branch_id": branch, "event_id": id});
        if let Value::Object(extra) = extra {
            ev.as_object_mut().unwrap().extend(extra);
        }
        out.push((
            Published {
                id,
                channel,
                tenant,
                branch,
            },
            ev,
        ));
    };
    for t in tenants {
        for b in [10, 20] {
            add(format!("channel:branch:{b}:waiters"), t, b, json!({}));
            add(
                format!("channel:branch:{b}:waiters"),
                t,
                b,
                json!({"sector_id": 7}),
            );
            add(
                format!("channel:sector:{b}:7:waiters"),
                t,
                b,
                json!({"sector_id": 7}),
            );
            add(format!("channel:sector:{b}:8:waiters"), t, b, json!({}));
            add(format!("channel:branch:{b}:kitchen"), t, b, json!({}));
            add(format!("channel:branch:{b}:admin"), t, b, json!({}));
        }
        for (b, s) in [(10, 100), (20, 200), (10, 200), (20, 100)] {
            add(
                format!("channel:session:{s}"),
                t,
                b,
                json!({"session_id": s}),
            );
        }
        // A user's channel ignores the branch; user 101 is tenant 1's only.
        add("channel:user:900".into(), t, 10, json!({}));
        add("channel:user:900".into(), t, 30, json!({}));
        add("channel:user:101".into(), t, 20, json!({}));
        add("channel:tenant:staff".into(), t, 20, json!({}));
    }
    out
}

pub async fn received(clients: &mut [(Conn, Client)]) -> BTreeMap<String, Vec<String>> {
    let drained = join_all(
        clients
            .iter_mut()
            .map(|(_, c)| c.drain(Duration::from_millis(400))),
    )
    .await;
    clients
        .iter()
        .zip(drained)
        .map(|((conn, _), frames)| {
            let ids = frames
                .iter()
                .map(|f| f["event_id"].as_str().expect("an event").to_owned())
                .collect();
            (conn.label.clone(), ids)
        })
        .collect()
}

pub async fn connect_all(gw: &TestGateway, tenants: [i64; 2]) -> Vec<(Conn, Client)> {
    let mut clients = Vec::new();
    for (conn, token) in population(tenants) {
        let (client, hello) = gw.join(conn.endpoint, &token).await;
        assert_eq!(hello["endpoint"], conn.endpoint);
        clients.push((conn, client));
    }
    clients
}

/// Asserts that every client got exactly the events the oracle gives it,
/// each once.
pub fn assert_routed(
    clients: &[(Conn, Client)],
    published: &[(Published, Value)],
    got: &BTreeMap<String, Vec<String>>,
) {
    for (conn, _) in clients {
        let mine = &got[&conn.label];
        let unique: std::collections::BTreeSet<&String> = mine.iter().collect();
        assert_eq!(
            unique.len(),
            mine.len(),
            "{} got duplicates: {mine:?}",
            conn.label
        );
        let expected: std::collections::BTreeSet<&String> = published
            .iter()
            .filter(|(p, _)| oracle(conn, p))
            .map(|(p, _)| &p.id)
            .collect();
        assert_eq!(unique, expected, "{} got the wrong events", conn.label);
    }
    assert!(got.values().all(|ids| !ids.is_empty()), "{got:?}");
}
