//! Presence (PROTOCOL.md §16): `GET /api/presence` and an admin's
//! `presence` message, embedded and across nodes on one Redis: what is
//! listed, what is not (other branches, other tenants), how fast a closed
//! connection or a killed node leaves, and healing after a Redis restart.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::*;
use serde_json::Value;
use wsgateway::config::Secret;

/// `GET /api/presence?<query>` on `addr` (`host:port`), with `key`.
async fn get_presence(addr: &str, query: &str, key: Option<&str>) -> (u16, Value) {
    get_with_key(&format!("http://{addr}/api/presence?{query}"), key).await
}

/// The connections listed for a branch, as a 200 must give them.
async fn listed(addr: &str, tenant: i64, branch: i64) -> Vec<Value> {
    let query = format!("tenant_id={tenant}&branch_id={branch}");
    let (status, body) = get_presence(addr, &query, Some(API_KEY)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["tenant_id"].as_i64(), body["branch_id"].as_i64()),
        (Some(tenant), Some(branch))
    );
    body["connections"].as_array().unwrap().clone()
}

/// `(endpoint, node)` of each listed connection, sorted.
fn kinds(conns: &[Value]) -> Vec<(String, String)> {
    let mut out: Vec<_> = conns
        .iter()
        .map(|c| {
            (
                c["endpoint"].as_str().unwrap().to_owned(),
                c["node"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Polls a branch's list until `check` holds; returns it and when.
async fn wait_listed(
    addr: &str,
    tenant: i64,
    branch: i64,
    within: Duration,
    check: impl Fn(&[Value]) -> bool,
) -> (Vec<Value>, Instant) {
    let deadline = Instant::now() + within;
    loop {
        let conns = listed(addr, tenant, branch).await;
        if check(&conns) {
            return (conns, Instant::now());
        }
        assert!(
            Instant::now() < deadline,
            "presence of {tenant}/{branch} on {addr} never satisfied the check within {within:?}; last: {conns:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pair(endpoint: &str, node: &str) -> (String, String) {
    (endpoint.to_owned(), node.to_owned())
}

/// Sorted by `connected_at`, then `id`, as the contract says.
fn assert_ordered(conns: &[Value]) {
    let keys: Vec<(u64, String)> = conns
        .iter()
        .map(|c| {
            (
                c["connected_at"].as_u64().unwrap(),
                c["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

/// Closes a client and waits until the gateway has dropped its socket
/// (which it does once the connection is out of its hub).
async fn close(mut c: Client) {
    use futures_util::StreamExt;
    let _ = c.ws.close(None).await;
    let ended =
        tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = c.ws.next().await {} }).await;
    assert!(ended.is_ok(), "the gateway dropped the socket");
}

#[tokio::test]
async fn embedded_lists_a_branch_of_one_tenant_and_forgets_a_closed_connection_at_once() {
    let gw = TestGateway::start_with(|c| c.node_name = Some("solo".into())).await;
    let addr = gw.addr.to_string();
    let before = wsgateway::event::unix_ms() as u64;
    let (_kitchen, _) = gw.join("kitchen", &staff(9, 1, &[5], &["KITCHEN"])).await;
    let (_waiter, _) = gw.join("waiter", &staff(10, 1, &[5, 6], &["WAITER"])).await;
    let (_admin, _) = gw.join("admin", &staff(11, 1, &[5], &["ADMIN"])).await;
    let (diner_client, _) = gw.join("diner", &diner(1, 5, 12, 77)).await;
    // Another branch of the tenant, and another tenant's same branch.
    let (_k6, _) = gw.join("kitchen", &staff(20, 1, &[6], &["KITCHEN"])).await;
    let (_other_k, _) = gw.join("kitchen", &staff(9, 2, &[5], &["KITCHEN"])).await;
    let (_other_d, _) = gw.join("diner", &diner(2, 5, 12, 77)).await;

    let conns = listed(&addr, 1, 5).await;
    assert_eq!(
        kinds(&conns),
        vec![
            pair("admin", "solo"),
            pair("diner", "solo"),
            pair("kitchen", "solo"),
            pair("waiter", "solo")
        ],
        "{conns:?}"
    );
    assert_ordered(&conns);
    for c in &conns {
        assert!(c["id"].as_str().unwrap().starts_with("solo/"), "{c}");
        assert!(c["connected_at"].as_u64().unwrap() >= before, "{c}");
        assert!(c["sector_ids"].is_null(), "{c}");
        let o = c.as_object().unwrap();
        if c["endpoint"] == "diner" {
            assert_eq!((&c["session_id"], &c["table_id"]), (&77.into(), &12.into()));
            assert!(!o.contains_key("user_id"), "{c}");
        } else {
            assert!(c["user_id"].is_i64(), "{c}");
            assert!(
                !o.contains_key("session_id") && !o.contains_key("table_id"),
                "{c}"
            );
        }
    }
    let kitchen = conns.iter().find(|c| c["endpoint"] == "kitchen").unwrap();
    assert_eq!(kitchen["user_id"], 9);
    // The waiter of branches 5 and 6 is in both.
    let six = listed(&addr, 1, 6).await;
    assert_eq!(
        kinds(&six),
        vec![pair("kitchen", "solo"), pair("waiter", "solo")]
    );
    // The other tenant sees only its own.
    let other = listed(&addr, 2, 5).await;
    assert_eq!(
        kinds(&other),
        vec![pair("diner", "solo"), pair("kitchen", "solo")]
    );
    assert!(listed(&addr, 3, 5).await.is_empty());

    // Closed: gone from the very next answer, no waiting.
    close(diner_client).await;
    let conns = listed(&addr, 1, 5).await;
    assert_eq!(
        kinds(&conns),
        vec![
            pair("admin", "solo"),
            pair("kitchen", "solo"),
            pair("waiter", "solo")
        ]
    );

    // The API key, and the query.
    let good = "tenant_id=1&branch_id=5";
    let (status, body) = get_presence(&addr, good, None).await;
    assert_eq!(
        (status, &body["error"]),
        (401, &"unauthorized".into()),
        "{body}"
    );
    let (status, _) = get_presence(&addr, good, Some("wrong")).await;
    assert_eq!(status, 401);
    for bad in [
        "",
        "tenant_id=1",
        "branch_id=5",
        "tenant_id=x&branch_id=5",
        "tenant_id=1&branch_id=5.5",
    ] {
        let (status, body) = get_presence(&addr, bad, Some(API_KEY)).await;
        assert_eq!(
            (status, &body["error"]),
            (400, &"invalid_query".into()),
            "{bad}: {body}"
        );
        assert!(body["detail"].is_string());
    }
    gw.assert_metric(
        r#"presence_requests_total{outcome="invalid_query",via="http"}"#,
        5.0,
    )
    .await;
    gw.assert_metric(
        r#"presence_requests_total{outcome="unauthorized",via="http"}"#,
        2.0,
    )
    .await;
    gw.stop().await;

    // No API key: the route is off.
    let off = TestGateway::start_with(|c| c.api_key = None).await;
    let (status, body) = get_presence(&off.addr.to_string(), good, Some(API_KEY)).await;
    assert_eq!(
        (status, &body["error"]),
        (404, &"presence_disabled".into()),
        "{body}"
    );
    off.stop().await;
}

#[tokio::test]
async fn an_admin_asks_for_its_branches_one_or_all_and_no_other_endpoint_may() {
    let gw = TestGateway::start().await;
    let (mut admin, _) = gw.join("admin", &staff(11, 1, &[6, 5], &["MANAGER"])).await;
    let (_kitchen, _) = gw.join("kitchen", &staff(9, 1, &[5], &["KITCHEN"])).await;
    let (_diner, _) = gw.join("diner", &diner(1, 6, 3, 40)).await;
    let (_other, _) = gw.join("kitchen", &staff(9, 2, &[5], &["KITCHEN"])).await;

    // Every branch of the token, in its order.
    admin.send_text(r#"{"type":"presence"}"#).await;
    let six = admin.next_json().await.unwrap();
    let five = admin.next_json().await.unwrap();
    assert_eq!(
        (&six["type"], &six["tenant_id"], &six["branch_id"]),
        (&"presence".into(), &1.into(), &6.into())
    );
    assert_eq!(
        (&five["type"], &five["branch_id"]),
        (&"presence".into(), &5.into())
    );
    let endpoints = |v: &Value| {
        let mut e: Vec<String> = v["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["endpoint"].as_str().unwrap().to_owned())
            .collect();
        e.sort();
        e
    };
    assert_eq!(endpoints(&six), ["admin", "diner"]);
    assert_eq!(endpoints(&five), ["admin", "kitchen"]);
    assert_ordered(five["connections"].as_array().unwrap());

    // One branch.
    let one = admin.ask(r#"{"type":"presence","branch_id":5}"#).await;
    assert_eq!(
        (&one["type"], &one["branch_id"]),
        (&"presence".into(), &5.into())
    );
    assert_eq!(endpoints(&one), ["admin", "kitchen"]);
    // The same body as the API's, plus the type.
    let api = listed(&gw.addr.to_string(), 1, 5).await;
    assert_eq!(one["connections"].as_array().unwrap(), &api);

    // Not its branch; a bad branch_id.
    let no = admin.ask(r#"{"type":"presence","branch_id":7}"#).await;
    assert_eq!(
        no,
        serde_json::json!({"type": "error", "code": "forbidden_branch"})
    );
    let bad = admin.ask(r#"{"type":"presence","branch_id":"5"}"#).await;
    assert_eq!(
        bad,
        serde_json::json!({"type": "error", "code": "invalid_message"})
    );

    // Several at once are answered in order.
    admin
        .send_text(r#"{"type":"presence","branch_id":6}"#)
        .await;
    admin
        .send_text(r#"{"type":"presence","branch_id":7}"#)
        .await;
    admin
        .send_text(r#"{"type":"presence","branch_id":5}"#)
        .await;
    assert_eq!(admin.next_json().await.unwrap()["branch_id"], 6);
    assert_eq!(admin.next_json().await.unwrap()["code"], "forbidden_branch");
    assert_eq!(admin.next_json().await.unwrap()["branch_id"], 5);

    // Other endpoints.
    for (endpoint, token) in [
        ("waiter", staff(10, 1, &[5], &["WAITER", "ADMIN"])),
        ("kitchen", staff(12, 1, &[5], &["KITCHEN"])),
        ("diner", diner(1, 5, 1, 41)),
    ] {
        let (mut c, _) = gw.join(endpoint, &token).await;
        let reply = c.ask(r#"{"type":"presence"}"#).await;
        assert_eq!(
            reply,
            serde_json::json!({"type": "error", "code": "unknown_message_type"}),
            "{endpoint}"
        );
    }
    gw.assert_metric(
        r#"presence_requests_total{outcome="ok",via="websocket"}"#,
        4.0,
    )
    .await;
    gw.assert_metric(
        r#"presence_requests_total{outcome="forbidden_branch",via="websocket"}"#,
        2.0,
    )
    .await;
    gw.stop().await;
}

fn redis_node(url: &str, name: &str, ttl_s: u32) -> impl FnOnce(&mut wsgateway::Config) {
    let (url, name) = (url.to_owned(), name.to_owned());
    move |c| {
        c.redis_url = Some(Secret(url));
        c.node_name = Some(name);
        c.presence_ttl_s = ttl_s;
    }
}

#[tokio::test]
async fn every_node_lists_every_nodes_connections_and_a_close_anywhere_is_seen_promptly() {
    let server = RedisServer::start();
    let url = server.url();
    let a = TestGateway::start_with(redis_node(&url, "node-a", 30)).await;
    let b = TestGateway::start_with(redis_node(&url, "node-b", 30)).await;
    a.wait_connected().await;
    b.wait_connected().await;
    let (_kitchen, _) = a.join("kitchen", &staff(9, 1, &[5], &["KITCHEN"])).await;
    let (_waiter, _) = b.join("waiter", &staff(10, 1, &[5, 6], &["WAITER"])).await;
    let (diner_b, _) = b.join("diner", &diner(1, 5, 12, 77)).await;
    // Tenant 2's branch 5, on both nodes: never in tenant 1's list.
    let (_other_a, _) = a.join("admin", &staff(11, 2, &[5], &["ADMIN"])).await;
    let (_other_b, _) = b.join("diner", &diner(2, 5, 12, 77)).await;

    let all = vec![
        pair("diner", "node-b"),
        pair("kitchen", "node-a"),
        pair("waiter", "node-b"),
    ];
    let within = Duration::from_secs(10);
    let (on_a, _) = wait_listed(&a.addr.to_string(), 1, 5, within, |c| kinds(c) == all).await;
    let (on_b, _) = wait_listed(&b.addr.to_string(), 1, 5, within, |c| kinds(c) == all).await;
    assert_eq!(on_a, on_b, "both nodes give the same list");
    assert_ordered(&on_a);
    let ids: BTreeSet<&str> = on_a.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3);
    for c in &on_a {
        let node = c["node"].as_str().unwrap();
        assert!(
            c["id"].as_str().unwrap().starts_with(&format!("{node}/")),
            "{c}"
        );
    }
    let diner = on_a.iter().find(|c| c["endpoint"] == "diner").unwrap();
    assert_eq!(
        (&diner["session_id"], &diner["table_id"]),
        (&77.into(), &12.into())
    );
    let (six, _) = wait_listed(&a.addr.to_string(), 1, 6, within, |c| c.len() == 1).await;
    assert_eq!(kinds(&six), vec![pair("waiter", "node-b")]);
    let other = vec![pair("admin", "node-a"), pair("diner", "node-b")];
    wait_listed(&a.addr.to_string(), 2, 5, within, |c| kinds(c) == other).await;
    wait_listed(&b.addr.to_string(), 2, 5, within, |c| kinds(c) == other).await;

    // Closed on B: gone from A's answer within a few seconds.
    close(diner_b).await;
    let left = vec![pair("kitchen", "node-a"), pair("waiter", "node-b")];
    wait_listed(&a.addr.to_string(), 1, 5, Duration::from_secs(3), |c| {
        kinds(c) == left
    })
    .await;
    // And at once from B's own.
    assert_eq!(kinds(&listed(&b.addr.to_string(), 1, 5).await), left);

    // The admin's frame reads the other node too.
    let (mut admin, _) = b.join("admin", &staff(13, 1, &[5], &["ADMIN"])).await;
    let frame = admin.ask(r#"{"type":"presence"}"#).await;
    let mut with_admin = left.clone();
    with_admin.insert(0, pair("admin", "node-b"));
    assert_eq!(kinds(frame["connections"].as_array().unwrap()), with_admin);

    // A node that stops removes its heartbeat and entries.
    a.stop().await;
    let mut conn = server.client().get_connection().unwrap();
    let hash = "wsgateway:{1}:presence:branch:5";
    let fields: Vec<String> = redis::cmd("HKEYS").arg(hash).query(&mut conn).unwrap();
    assert!(
        fields.iter().all(|f| f.starts_with("node-b/")),
        "{fields:?}"
    );
    let nodes: Vec<String> = redis::cmd("ZRANGE")
        .arg("wsgateway:presence:nodes")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert!(nodes[0].starts_with("node-b/"), "{nodes:?}");
    b.stop().await;
}

#[tokio::test]
async fn a_killed_nodes_connections_leave_within_the_ttl_and_are_deleted_after() {
    let _heavy = heavy().await;
    let server = RedisServer::start();
    let url = server.url();
    let a = TestGateway::start_with(redis_node(&url, "node-a", 2)).await;
    a.wait_connected().await;
    let b = ServeProcess::start(&[
        ("REDIS_URL", url.as_str()),
        ("WSGATEWAY_NODE_NAME", "node-b"),
        ("WSGATEWAY_PRESENCE_TTL_S", "2"),
        ("WSGATEWAY_API_KEY", API_KEY),
    ])
    .await;
    let (_kitchen, _) = a.join("kitchen", &staff(9, 1, &[5], &["KITCHEN"])).await;
    let open = |endpoint: &str, token: String| {
        let param = if endpoint == "diner" {
            "table_token"
        } else {
            "token"
        };
        format!("ws://{}/ws/{endpoint}?{param}={token}", b.addr)
    };
    let mut waiter_b = Client::open(&open("waiter", staff(10, 1, &[5], &["WAITER"])), None).await;
    let mut diner_b = Client::open(&open("diner", diner(1, 5, 12, 77)), None).await;
    assert_eq!(waiter_b.next_json().await.unwrap()["type"], "connected");
    assert_eq!(diner_b.next_json().await.unwrap()["type"], "connected");
    let all = vec![
        pair("diner", "node-b"),
        pair("kitchen", "node-a"),
        pair("waiter", "node-b"),
    ];
    let addr_a = a.addr.to_string();
    wait_listed(&addr_a, 1, 5, Duration::from_secs(10), |c| kinds(c) == all).await;
    // B's own API agrees.
    wait_listed(&b.addr, 1, 5, Duration::from_secs(10), |c| kinds(c) == all).await;

    b.signal("KILL");
    let killed = Instant::now();
    let (_, gone_at) = wait_listed(&addr_a, 1, 5, Duration::from_secs(10), |c| {
        kinds(c) == vec![pair("kitchen", "node-a")]
    })
    .await;
    let took = gone_at - killed;
    // The TTL (2 s), plus slack for a loaded machine.
    assert!(took <= Duration::from_secs(5), "left after {took:?}");
    let (status, _) = b.wait().await;
    assert!(!status.success());

    // A TTL later, a reader deletes the dead run's entries.
    let mut conn = server.client().get_connection().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let _ = listed(&addr_a, 1, 5).await;
        let fields: Vec<String> = redis::cmd("HKEYS")
            .arg("wsgateway:{1}:presence:branch:5")
            .query(&mut conn)
            .unwrap();
        if fields.iter().all(|f| f.starts_with("node-a/")) {
            assert_eq!(fields.len(), 1, "{fields:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead entries never deleted: {fields:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.stop().await;
}

#[tokio::test]
async fn presence_is_unavailable_while_redis_is_down_and_heals_after() {
    let _heavy = heavy().await;
    let mut server = RedisServer::start();
    let url = server.url();
    let a = TestGateway::start_with(redis_node(&url, "node-a", 3)).await;
    let b = TestGateway::start_with(redis_node(&url, "node-b", 3)).await;
    a.wait_connected().await;
    b.wait_connected().await;
    let (_kitchen, _) = b.join("kitchen", &staff(9, 1, &[5], &["KITCHEN"])).await;
    let (mut admin, _) = a.join("admin", &staff(11, 1, &[5], &["ADMIN"])).await;
    let both = vec![pair("admin", "node-a"), pair("kitchen", "node-b")];
    let addr_a = a.addr.to_string();
    wait_listed(&addr_a, 1, 5, Duration::from_secs(10), |c| kinds(c) == both).await;

    // Redis gone (and its data with it: no persistence).
    server.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get_presence(&addr_a, "tenant_id=1&branch_id=5", Some(API_KEY)).await;
        if status == 503 {
            assert_eq!(body["error"], "presence_unavailable", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never 503: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = admin.ask(r#"{"type":"presence"}"#).await;
    assert_eq!(
        reply,
        serde_json::json!({"type": "error", "code": "presence_unavailable"})
    );

    // Back, empty: each node writes its set again.
    server.restart();
    wait_listed(&addr_a, 1, 5, Duration::from_secs(15), |c| kinds(c) == both).await;
    wait_listed(&b.addr.to_string(), 1, 5, Duration::from_secs(15), |c| {
        kinds(c) == both
    })
    .await;
    a.stop().await;
    b.stop().await;
}

/// A `wsgateway serve` process on a Redis Cluster, with the helpers of a
/// `TestGateway` for its address (that handle's `stop` and `task` are
/// inert: the process dies when `ServeProcess` is dropped).
async fn cluster_node(seeds: &str, name: &str) -> (ServeProcess, TestGateway) {
    let process = ServeProcess::start(&[
        ("REDIS_URL", seeds),
        ("WSGATEWAY_REDIS_MODE", "cluster"),
        ("WSGATEWAY_API_KEY", API_KEY),
        ("WSGATEWAY_NODE_NAME", name),
    ])
    .await;
    let gw = TestGateway {
        addr: process.addr.parse().unwrap(),
        stop: tokio_util::sync::CancellationToken::new(),
        task: tokio::spawn(async { Ok(()) }),
    };
    (process, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_each_tenants_presence_lives_on_its_shard_and_every_node_reads_it() {
    use common::cluster::RedisCluster;
    let _heavy = heavy().await;
    let cluster = tokio::task::block_in_place(|| RedisCluster::start(3, 0));
    // Two tenants on different primaries.
    let (t1, t2) = tokio::task::block_in_place(|| {
        let shard = |t| cluster.primary_of_slot(cluster.slot_of_tenant(t));
        let t2 = (2..100).find(|t| shard(*t) != shard(1)).unwrap();
        (1, t2)
    });
    let seeds = cluster.seeds();
    let (_pa, a) = cluster_node(&seeds, "node-a").await;
    let (_pb, b) = cluster_node(&seeds, "node-b").await;
    for n in [&a, &b] {
        n.wait_health(Duration::from_secs(15), |s, body| {
            s == 200 && body["status"] == "healthy"
        })
        .await;
    }
    let (_k1, _) = a.join("kitchen", &staff(9, t1, &[5], &["KITCHEN"])).await;
    let (d1, _) = b.join("diner", &diner(t1, 5, 12, 77)).await;
    let (_k2, _) = b.join("kitchen", &staff(9, t2, &[5], &["KITCHEN"])).await;
    let (_a2, _) = a.join("admin", &staff(10, t2, &[5], &["ADMIN"])).await;
    let one = vec![pair("diner", "node-b"), pair("kitchen", "node-a")];
    let two = vec![pair("admin", "node-a"), pair("kitchen", "node-b")];
    let within = Duration::from_secs(10);
    for n in [&a, &b] {
        let addr = n.addr.to_string();
        wait_listed(&addr, t1, 5, within, |c| kinds(c) == one).await;
        wait_listed(&addr, t2, 5, within, |c| kinds(c) == two).await;
    }
    close(d1).await;
    let left = vec![pair("kitchen", "node-a")];
    wait_listed(&a.addr.to_string(), t1, 5, Duration::from_secs(3), |c| {
        kinds(c) == left
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sentinels_every_node_reads_the_masters_presence() {
    use common::sentinel::{MASTER_NAME, SentinelGroup};
    use wsgateway::config::RedisMode;
    let _heavy = heavy().await;
    let group = tokio::task::block_in_place(|| SentinelGroup::start("redis-pw"));
    let node = |name: &str| {
        let (urls, password, name) = (group.urls(), group.password.clone(), name.to_owned());
        move |c: &mut wsgateway::Config| {
            c.redis_mode = RedisMode::Sentinel;
            c.redis_url = Some(Secret(urls));
            c.redis_sentinel_master = Some(MASTER_NAME.into());
            c.redis_password = Some(Secret(password));
            c.node_name = Some(name);
        }
    };
    let a = TestGateway::start_with(node("node-a")).await;
    let b = TestGateway::start_with(node("node-b")).await;
    a.wait_connected().await;
    b.wait_connected().await;
    let (_kitchen, _) = a.join("kitchen", &staff(9, 1, &[5], &["KITCHEN"])).await;
    let (diner_b, _) = b.join("diner", &diner(1, 5, 12, 77)).await;
    let both = vec![pair("diner", "node-b"), pair("kitchen", "node-a")];
    for n in [&a, &b] {
        wait_listed(&n.addr.to_string(), 1, 5, Duration::from_secs(10), |c| {
            kinds(c) == both
        })
        .await;
    }
    close(diner_b).await;
    let left = vec![pair("kitchen", "node-a")];
    wait_listed(&a.addr.to_string(), 1, 5, Duration::from_secs(3), |c| {
        kinds(c) == left
    })
    .await;
    a.stop().await;
    b.stop().await;
}
