//! Subscriptions that follow each node's own audience (issue #30), against
//! a real `redis-server`: a node subscribes to a scope's channel only while
//! it holds a connection of that scope, unsubscribes when the last leaves,
//! batches the changes of a connection storm, and a client that connects
//! while its scope's subscription is being made misses nothing.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::redis_server::*;
use common::*;
use serde_json::json;
use wsgateway::config::Secret;

async fn node(url: &str) -> TestGateway {
    let url = url.to_owned();
    let gw = TestGateway::start_with(|c| c.redis_url = Some(Secret(url))).await;
    gw.wait_connected().await;
    gw
}

/// The scope channels some client of `server` is subscribed to.
fn scope_channels(server: &RedisServer) -> BTreeSet<String> {
    let channels: Vec<String> = server
        .query(
            redis::cmd("PUBSUB")
                .arg("CHANNELS")
                .arg("wsgateway:events:*"),
        )
        .unwrap();
    channels.into_iter().collect()
}

/// How many clients of `server` are subscribed to `channel`.
fn subscribers(server: &RedisServer, channel: &str) -> i64 {
    let (_, n): (String, i64) = server
        .query(redis::cmd("PUBSUB").arg("NUMSUB").arg(channel))
        .unwrap();
    n
}

/// Waits until Redis's view of the scope channels is `expected`.
async fn wait_channels(server: &RedisServer, expected: &[&str]) {
    let expected: BTreeSet<String> = expected.iter().map(|c| (*c).to_owned()).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = scope_channels(server);
        if now == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscribed: {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_node_subscribes_to_its_own_audience_only() {
    let server = RedisServer::start();
    let a = node(&server.url()).await;
    let b = node(&server.url()).await;
    // No clients: no scope channel at all, on either node.
    wait_channels(&server, &[]).await;
    let (waiter, _) = a.join("waiter", &staff(7, 1, &[5], &["WAITER"])).await;
    let (diner, _) = b.join("diner", &diner(2, 9, 3, 77)).await;
    wait_channels(
        &server,
        &[
            "wsgateway:events:{1}:branch:5",
            "wsgateway:events:{1}:staff",
            "wsgateway:events:{1}:user:7",
            "wsgateway:events:{2}:session:77",
        ],
    )
    .await;
    // Each channel by the one node that needs it.
    assert_eq!(subscribers(&server, "wsgateway:events:{1}:branch:5"), 1);
    assert_eq!(subscribers(&server, "wsgateway:events:{2}:session:77"), 1);
    a.wait_scopes(3).await;
    b.wait_scopes(1).await;
    // A second connection of the same scopes changes nothing; the last one
    // to leave unsubscribes them.
    let (other, _) = a.join("waiter", &staff(7, 1, &[5], &["WAITER"])).await;
    drop(waiter);
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.wait_scopes(3).await;
    drop(other);
    drop(diner);
    wait_channels(&server, &[]).await;
    a.wait_scopes(0).await;
    b.wait_scopes(0).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_client_whose_scope_is_new_misses_nothing() {
    let server = RedisServer::start();
    let publisher = node(&server.url()).await;
    let serving = node(&server.url()).await;
    // Each round a branch no node has heard of: the client's `connected`
    // comes before its node is subscribed, and the event is published at
    // once, through the other node; history fills the window.
    for branch in 100..130 {
        let (mut kitchen, _) = serving
            .join("kitchen", &staff(1, 1, &[branch], &["KITCHEN"]))
            .await;
        let channel = format!("channel:branch:{branch}:kitchen");
        let id = publisher
            .publish_one(&channel, event("ROUND_SUBMITTED", 1, branch))
            .await;
        let frame = kitchen
            .next_json()
            .await
            .unwrap_or_else(|| panic!("branch {branch}: no event"));
        assert_eq!(frame["event_id"], json!(id), "branch {branch}: {frame}");
        let later = publisher
            .publish_one(&channel, event("ROUND_READY", 1, branch))
            .await;
        let rest = kitchen.drain(Duration::from_millis(150)).await;
        let ids: Vec<&str> = rest.iter().filter_map(|f| f["event_id"].as_str()).collect();
        assert_eq!(ids, [later.as_str()], "branch {branch}: once each");
    }
    publisher.stop().await;
    serving.stop().await;
}

#[tokio::test]
async fn a_connection_storm_costs_a_few_commands() {
    let _heavy = common::heavy().await;
    common::raise_open_file_limit();
    let server = RedisServer::start();
    let gw = node(&server.url()).await;
    const CLIENTS: usize = 600;
    // Every client its own table session: 600 scopes.
    let mut joins = Vec::new();
    for s in 0..CLIENTS as i64 {
        let url = gw
            .url(&format!(
                "/ws/diner?table_token={}",
                diner(1, 5, 3, 1000 + s)
            ))
            .replacen("http://", "ws://", 1);
        joins.push(tokio::spawn(async move { Client::open(&url, None).await }));
    }
    let mut clients = Vec::new();
    for join in joins {
        clients.push(join.await.unwrap());
    }
    gw.wait_scopes(CLIENTS).await;
    let commands = gw
        .metric("wsgateway_redis_subscription_commands_total{command=\"subscribe\"}")
        .await;
    assert!(
        commands <= (CLIENTS / 10) as f64,
        "{commands} SUBSCRIBE commands for {CLIENTS} new scopes"
    );
    assert_eq!(scope_channels(&server).len(), CLIENTS);
    // And every one of them hears its session.
    let id = gw
        .publish_one(
            "channel:session:1599",
            json!({"type": "PAYMENT_APPROVED", "tenant_id": 1, "branch_id": 5, "session_id": 1599}),
        )
        .await;
    let last = clients.last_mut().unwrap();
    let frame = loop {
        let f = last.next_json().await.expect("the session's event");
        if f["type"] != "connected" {
            break f;
        }
    };
    assert_eq!(frame["event_id"], json!(id));
    drop(clients);
    gw.wait_scopes(0).await;
    let unsubscribes = gw
        .metric("wsgateway_redis_subscription_commands_total{command=\"unsubscribe\"}")
        .await;
    assert!(unsubscribes <= (CLIENTS / 10) as f64, "{unsubscribes}");
    gw.stop().await;
}
