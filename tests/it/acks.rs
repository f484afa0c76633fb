//! Acknowledgements (PROTOCOL.md §5, "Acknowledgements"), against the real
//! gateway with the embedded broker and with real Redis servers (one
//! server, and a cluster): acked events end quietly; unacked ones come once
//! more, then escalate once to the branch's admins; an event nobody got
//! escalates as `no_audience`; acks from connections that did not get the
//! event are ignored; a node killed after publishing leaves its deadlines
//! to the others, and each event escalates exactly once however many nodes
//! sweep.

use crate::common;

use std::time::{Duration, Instant};

use common::cluster::RedisCluster;
use common::redis_server::*;
use common::*;
use serde_json::{Value, json};
use wsgateway::config::Secret;

/// The brokers every scenario runs on: embedded, and a Redis server of the
/// test's own.
async fn gateways(server: &RedisServer) -> Vec<(&'static str, TestGateway)> {
    let url = server.url();
    let redis = TestGateway::start_with(move |c| c.redis_url = Some(Secret(url))).await;
    redis.wait_connected().await;
    vec![("embedded", TestGateway::start().await), ("redis", redis)]
}

/// A tenant no other test uses: tenants here are this process's own
/// (each test's Redis is too, but the shared ones are not).
fn tenant() -> i64 {
    static NEXT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let base = 3_000_000 + i64::from(std::process::id() % 10_000) * 100;
    base + NEXT.fetch_add(2, std::sync::atomic::Ordering::Relaxed)
}

fn order(tenant: i64, branch: i64) -> Value {
    json!({"type": "ROUND_SUBMITTED", "tenant_id": tenant, "branch_id": branch, "round": 7})
}

/// Publishes `event` on `channel` asking for an ack within `within_s`.
async fn publish_acked(gw: &TestGateway, channel: &str, event: Value, within_s: u64) -> String {
    let (status, body) = gw
        .publish(&json!({"channel": channel, "event": event, "ack": {"within_s": within_s}}))
        .await;
    assert_eq!(status, 202, "{body}");
    body["event_ids"][0].as_str().unwrap().to_owned()
}

/// The next frame that is an event (not a `pong` or the like).
async fn next_event(c: &mut Client, within: Duration) -> Option<Value> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = c.next_json_within(left).await?;
        if frame.get("tenant_id").is_some() {
            return Some(frame);
        }
    }
}

/// Asserts that nothing comes for `ms` milliseconds.
async fn assert_quiet(c: &mut Client, ms: u64) {
    assert_eq!(
        c.drain(Duration::from_millis(ms)).await,
        Vec::<Value>::new()
    );
}

/// The escalations a client gets until `ms` milliseconds pass quietly.
async fn escalations(c: &mut Client, ms: u64) -> Vec<Value> {
    let frames = c.drain(Duration::from_millis(ms)).await;
    frames
        .into_iter()
        .filter(|f| f["type"] == "EVENT_UNACKNOWLEDGED")
        .collect()
}

async fn ack(c: &mut Client, ids: &[&str]) {
    c.send_text(&json!({"type": "ack", "event_ids": ids}).to_string())
        .await;
}

#[tokio::test]
async fn an_acked_event_is_neither_redelivered_nor_escalated() {
    let server = RedisServer::start();
    for (broker, gw) in gateways(&server).await {
        let t = tenant();
        let (mut kitchen, _) = gw.join("kitchen", &staff(1, t, &[5], &["KITCHEN"])).await;
        let (mut admin, _) = gw.join("admin", &staff(2, t, &[5], &["ADMIN"])).await;
        let id = publish_acked(&gw, "channel:branch:5:kitchen", order(t, 5), 1).await;
        let got = next_event(&mut kitchen, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(got["event_id"], id, "{broker}");
        assert_eq!(
            got["ack"],
            json!({"within_s": 1}),
            "{broker}: the frame asks"
        );
        assert!(got.get("redelivered").is_none());
        ack(&mut kitchen, &[&id]).await;
        // The admin got it too (kitchen events reach admins); it does not
        // need to ack for the event to count as acknowledged.
        let seen = next_event(&mut admin, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(seen["event_id"], id);
        gw.wait_metric("wsgateway_acks_total{outcome=\"acknowledged\"}", |v| {
            v == 1.0
        })
        .await;
        // Past both deadlines: nothing more for either.
        assert_quiet(&mut kitchen, 2_600).await;
        assert_quiet(&mut admin, 200).await;
        gw.assert_metric("events_redelivered_total", 0.0).await;
        gw.assert_metric("events_unacknowledged_total{reason=\"no_ack\"}", 0.0)
            .await;
        // A second ack of it is no longer this connection's to give.
        ack(&mut kitchen, &[&id]).await;
        gw.wait_metric("wsgateway_acks_total{outcome=\"ignored\"}", |v| v == 1.0)
            .await;
        gw.stop().await;
    }
}

#[tokio::test]
async fn an_unacked_event_comes_once_more_then_escalates_once_to_the_branch_admins() {
    let server = RedisServer::start();
    for (broker, gw) in gateways(&server).await {
        let t = tenant();
        let (mut kitchen, _) = gw.join("kitchen", &staff(1, t, &[5], &["KITCHEN"])).await;
        let (mut waiter, _) = gw.join("waiter", &staff(3, t, &[5], &["WAITER"])).await;
        // An admin of another branch and of another tenant see nothing.
        let (mut other_branch, _) = gw.join("admin", &staff(4, t, &[6], &["ADMIN"])).await;
        let (mut other_tenant, _) = gw.join("admin", &staff(4, t + 1, &[5], &["ADMIN"])).await;
        let started = Instant::now();
        let id = publish_acked(&gw, "channel:branch:5:kitchen", order(t, 5), 1).await;
        let first = next_event(&mut kitchen, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(first["event_id"], id);
        let again = next_event(&mut kitchen, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(900), "{broker}");
        assert_eq!(again["redelivered"], true, "{broker}: {again}");
        assert_eq!(again["event_id"], id);
        assert_eq!(again["round"], 7);
        // The branch's admin connects after the redelivery: it gets the
        // escalation live.
        let (mut admin, _) = gw.join("admin", &staff(2, t, &[5], &["ADMIN"])).await;
        let escalation = next_event(&mut admin, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(1_900),
            "{broker}"
        );
        assert_eq!(
            without_ts(&escalation),
            json!({
                "event_id": id,
                "type": "EVENT_UNACKNOWLEDGED",
                "tenant_id": t,
                "branch_id": 5,
                "event_type": "ROUND_SUBMITTED",
                "channel": "channel:branch:5:kitchen",
                "reason": "no_ack",
                "audience": 1,
            }),
            "{broker}"
        );
        assert!(escalation["ts"].as_i64().unwrap() > 0);
        // Exactly one redelivery and one escalation: nothing more comes.
        assert_quiet(&mut kitchen, 1_500).await;
        assert_quiet(&mut admin, 100).await;
        assert_quiet(&mut waiter, 100).await;
        assert_quiet(&mut other_branch, 100).await;
        assert_quiet(&mut other_tenant, 100).await;
        gw.assert_metric("events_redelivered_total", 1.0).await;
        gw.assert_metric("events_unacknowledged_total{reason=\"no_ack\"}", 1.0)
            .await;
        // An ack now is late.
        ack(&mut kitchen, &[&id]).await;
        gw.wait_metric("wsgateway_acks_total{outcome=\"late\"}", |v| v == 1.0)
            .await;
        gw.stop().await;
    }
}

/// The escalation's `ts` varies; the rest is exact.
fn without_ts(v: &Value) -> Value {
    let mut v = v.clone();
    v.as_object_mut().unwrap().remove("ts");
    v
}

#[tokio::test]
async fn an_event_nobody_got_escalates_as_no_audience_and_a_resuming_admin_gets_it() {
    let server = RedisServer::start();
    for (broker, gw) in gateways(&server).await {
        let t = tenant();
        // An admin's cursor before anything happens: an earlier event.
        let (mut admin, _) = gw.join("admin", &staff(2, t, &[5], &["ADMIN"])).await;
        let cursor = gw
            .publish_one("channel:branch:5:admin", event("ENTITY_UPDATED", t, 5))
            .await;
        next_event(&mut admin, Duration::from_secs(5))
            .await
            .unwrap();
        drop(admin);
        gw.wait_metric("wsgateway_connections_total", |v| v == 0.0)
            .await;
        // Nobody of the kitchen's audience is connected (admins are, for
        // kitchen events: none is, now).
        let started = Instant::now();
        let id = publish_acked(&gw, "channel:branch:5:kitchen", order(t, 5), 1).await;
        gw.wait_metric(
            "wsgateway_events_unacknowledged_total{reason=\"no_audience\"}",
            |v| v == 1.0,
        )
        .await;
        // At the first deadline, not after a redelivery.
        assert!(started.elapsed() < Duration::from_millis(1_900), "{broker}");
        gw.assert_metric("events_redelivered_total", 0.0).await;
        let (mut admin, hello) = gw
            .join_from("admin", &staff(2, t, &[5], &["ADMIN"]), &cursor)
            .await;
        assert_eq!(hello["recovered"], true, "{broker}: {hello}");
        // The kitchen event itself (admins get kitchen events), then the
        // escalation, from history.
        let replayed = admin.drain(Duration::from_millis(500)).await;
        let types: Vec<&str> = replayed.iter().filter_map(|f| f["type"].as_str()).collect();
        assert_eq!(
            types,
            ["ROUND_SUBMITTED", "EVENT_UNACKNOWLEDGED"],
            "{broker}"
        );
        assert_eq!(replayed[1]["event_id"], id);
        assert_eq!(replayed[1]["reason"], "no_audience");
        assert_eq!(replayed[1]["audience"], 0);
        gw.stop().await;
    }
}

#[tokio::test]
async fn a_kitchen_display_that_is_off_escalates_as_no_audience_while_admins_watch() {
    let server = RedisServer::start();
    for (broker, gw) in gateways(&server).await {
        let t = tenant();
        let (mut admin, _) = gw.join("admin", &staff(2, t, &[5], &["ADMIN"])).await;
        let started = Instant::now();
        let id = publish_acked(&gw, "channel:branch:5:kitchen", order(t, 5), 1).await;
        let seen = next_event(&mut admin, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(seen["event_id"], id);
        let escalated = next_event(&mut admin, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(1_900),
            "{broker}: no redelivery first"
        );
        assert_eq!(
            (
                escalated["type"].as_str(),
                escalated["reason"].as_str(),
                &escalated["audience"]
            ),
            (Some("EVENT_UNACKNOWLEDGED"), Some("no_audience"), &json!(0)),
            "{broker}: {escalated}"
        );
        assert_quiet(&mut admin, 1_500).await;
        // The gateway's own escalation is a known type.
        let metrics = gw.metrics().await;
        assert!(
            !metrics.contains(r#"type="EVENT_UNACKNOWLEDGED""#),
            "{broker}: counted as an unknown type"
        );
        gw.stop().await;
    }
}

#[tokio::test]
async fn acks_from_connections_that_did_not_get_the_event_are_ignored() {
    let server = RedisServer::start();
    for (broker, gw) in gateways(&server).await {
        let t = tenant();
        let (mut kitchen, _) = gw.join("kitchen", &staff(1, t, &[5], &["KITCHEN"])).await;
        let (mut other_tenant, _) = gw
            .join("kitchen", &staff(1, t + 1, &[5], &["KITCHEN"]))
            .await;
        let (mut other_branch, _) = gw.join("kitchen", &staff(1, t, &[6], &["KITCHEN"])).await;
        let (mut diner, _) = gw.join("diner", &diner(t, 5, 3, 77)).await;
        let (mut admin, _) = gw.join("admin", &staff(2, t, &[5], &["ADMIN"])).await;
        let id = publish_acked(&gw, "channel:branch:5:kitchen", order(t, 5), 1).await;
        assert_eq!(
            next_event(&mut kitchen, Duration::from_secs(5))
                .await
                .unwrap()["event_id"],
            id
        );
        // The branch's admin gets the kitchen's events to oversee them: its
        // ack does not answer for the kitchen.
        assert_eq!(
            next_event(&mut admin, Duration::from_secs(5))
                .await
                .unwrap()["event_id"],
            id
        );
        for c in [&mut other_tenant, &mut other_branch, &mut diner, &mut admin] {
            ack(c, &[&id]).await;
        }
        ack(&mut kitchen, &["never-published"]).await;
        gw.wait_metric("wsgateway_acks_total{outcome=\"ignored\"}", |v| v == 5.0)
            .await;
        // So it is unacknowledged: one redelivery to the kitchen, and the
        // escalation.
        let again = next_event(&mut kitchen, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(again["redelivered"], true);
        let escalations = escalations(&mut admin, 2_500).await;
        assert_eq!(escalations.len(), 1, "{broker}: {escalations:?}");
        assert_eq!(escalations[0]["reason"], "no_ack");
        assert_eq!(escalations[0]["audience"], 1, "the kitchen, not the admin");
        gw.assert_metric("acks_total{outcome=\"acknowledged\"}", 0.0)
            .await;
        gw.stop().await;
    }
}

#[tokio::test]
async fn an_ack_after_the_redelivery_or_of_a_replayed_event_counts() {
    let server = RedisServer::start();
    for (broker, gw) in gateways(&server).await {
        let t = tenant();
        // Acked after the redelivery: no escalation.
        let (mut kitchen, _) = gw.join("kitchen", &staff(1, t, &[5], &["KITCHEN"])).await;
        let id = publish_acked(&gw, "channel:branch:5:kitchen", order(t, 5), 1).await;
        next_event(&mut kitchen, Duration::from_secs(5))
            .await
            .unwrap();
        let again = next_event(&mut kitchen, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(again["redelivered"], true, "{broker}");
        ack(&mut kitchen, &[&id]).await;
        gw.wait_metric("wsgateway_acks_total{outcome=\"acknowledged\"}", |v| {
            v == 1.0
        })
        .await;
        assert_quiet(&mut kitchen, 1_500).await;
        gw.assert_metric("events_unacknowledged_total{reason=\"no_ack\"}", 0.0)
            .await;

        // A kitchen display that was away resumes, gets the event from
        // history, and its ack counts.
        let before = gw
            .publish_one("channel:branch:5:kitchen", event("ROUND_READY", t, 5))
            .await;
        next_event(&mut kitchen, Duration::from_secs(5))
            .await
            .unwrap();
        drop(kitchen);
        let id = publish_acked(&gw, "channel:branch:5:kitchen", order(t, 5), 2).await;
        let (mut kitchen, hello) = gw
            .join_from("kitchen", &staff(1, t, &[5], &["KITCHEN"]), &before)
            .await;
        assert_eq!(hello["recovered"], true);
        let replayed = next_event(&mut kitchen, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(replayed["event_id"], id);
        ack(&mut kitchen, &[&id]).await;
        gw.wait_metric("wsgateway_acks_total{outcome=\"acknowledged\"}", |v| {
            v == 2.0
        })
        .await;
        assert_quiet(&mut kitchen, 4_500).await;
        gw.assert_metric("events_unacknowledged_total{reason=\"no_ack\"}", 0.0)
            .await;
        gw.assert_metric("events_unacknowledged_total{reason=\"no_audience\"}", 0.0)
            .await;
        gw.stop().await;
    }
}

#[tokio::test]
async fn an_ack_request_is_checked_every_way_in() {
    let server = RedisServer::start();
    let gw = TestGateway::start().await;
    let item = |ack: Value| json!({"channel": "channel:branch:5:kitchen", "event": order(1, 5), "ack": ack});
    for bad in [
        json!({"within_s": 0}),
        json!({"within_s": 301}),
        json!({"within_s": 1.5}),
        json!({"within_s": "5"}),
        json!({}),
        json!({"within_s": 5, "x": 1}),
        json!(5),
    ] {
        let (status, body) = gw.publish(&item(bad.clone())).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_body")),
            "{bad}: {body}"
        );
    }
    let mut both = item(json!({"within_s": 5}));
    both["event"]["ack"] = json!({"within_s": 5});
    assert_eq!(gw.publish(&both).await.0, 400);
    let mut own = order(1, 5);
    own["redelivered"] = json!(true);
    let (status, body) = gw
        .publish(&json!({"channel": "channel:branch:5:kitchen", "event": own}))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_event")),
        "{body}"
    );
    let mut bad_event = order(1, 5);
    bad_event["ack"] = json!({"within_s": 0});
    let (status, api) = gw
        .publish(&json!({"channel": "channel:branch:5:kitchen", "event": bad_event}))
        .await;
    assert_eq!(status, 400);
    gw.stop().await;

    // The function refuses the same, with the same text.
    let gw = TestGateway::start_with({
        let url = server.url();
        move |c| c.redis_url = Some(Secret(url))
    })
    .await;
    gw.wait_connected().await;
    let refused = fcall(&server.url(), &["channel:branch:5:kitchen"], &bad_event).unwrap_err();
    assert!(
        refused.to_string().contains(
            api["detail"]
                .as_str()
                .unwrap()
                .trim_start_matches("item 0: ")
        ),
        "{refused} / {api}"
    );
    let refused = fcall(&server.url(), &["channel:branch:5:kitchen"], &own).unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("`redelivered` is set by the gateway only"),
        "{refused}"
    );

    // And takes a valid one: a backend's FCALL asks for an ack with the
    // event's own `ack`, and gets the redelivery and the escalation.
    let t = tenant();
    let (mut kitchen, _) = gw.join("kitchen", &staff(1, t, &[5], &["KITCHEN"])).await;
    let (mut admin, _) = gw.join("admin", &staff(2, t, &[5], &["ADMIN"])).await;
    let mut asked = order(t, 5);
    asked["ack"] = json!({"within_s": 1});
    let id = fcall(&server.url(), &["channel:branch:5:kitchen"], &asked).unwrap();
    let first = next_event(&mut kitchen, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        (first["event_id"].as_str(), &first["ack"]),
        (Some(id.as_str()), &json!({"within_s": 1}))
    );
    assert_eq!(
        next_event(&mut kitchen, Duration::from_secs(5))
            .await
            .unwrap()["redelivered"],
        true
    );
    let escalated = escalations(&mut admin, 2_500).await;
    assert_eq!(escalated.len(), 1, "{escalated:?}");
    assert_eq!(escalated[0]["event_id"], id);
    gw.stop().await;
}

// ---------------------------------------------------------------------------
// Several nodes.

async fn node(env: &[(&str, &str)]) -> Node {
    let node = Node::start(env).await;
    node.wait_healthy(Duration::from_secs(20)).await;
    node
}

/// Three nodes sweep the same deadlines; the publishing node is killed
/// (SIGKILL) at once. The others take its deadline: one redelivery, and
/// exactly one escalation in all, which every node's admins get once.
async fn nodes_share_deadlines(env: &[(&str, &str)]) {
    let t = tenant();
    let publisher = node(env).await;
    let a = node(env).await;
    let b = node(env).await;
    let (mut kitchen, _) = a.gw.join("kitchen", &staff(1, t, &[5], &["KITCHEN"])).await;
    let (mut admin_a, _) = a.gw.join("admin", &staff(2, t, &[5], &["ADMIN"])).await;
    let (mut admin_b, _) = b.gw.join("admin", &staff(3, t, &[5], &["ADMIN"])).await;
    // Both nodes follow their audience: a probe on the branch reaches both.
    publisher
        .gw
        .publish_one("channel:branch:5:admin", event("ENTITY_UPDATED", t, 5))
        .await;
    for admin in [&mut admin_a, &mut admin_b] {
        let probe = next_event(admin, Duration::from_secs(5)).await.unwrap();
        assert_eq!(probe["type"], "ENTITY_UPDATED");
    }
    let id = publish_acked(&publisher.gw, "channel:branch:5:kitchen", order(t, 5), 2).await;
    publisher.process.signal("KILL");
    assert_eq!(
        next_event(&mut kitchen, Duration::from_secs(5))
            .await
            .unwrap()["event_id"],
        id
    );
    let again = next_event(&mut kitchen, Duration::from_secs(6))
        .await
        .unwrap();
    assert_eq!(
        (again["event_id"].as_str(), &again["redelivered"]),
        (Some(id.as_str()), &json!(true))
    );
    for admin in [&mut admin_a, &mut admin_b] {
        let escalated = escalations(admin, 3_500).await;
        assert_eq!(escalated.len(), 1, "{escalated:?}");
        assert_eq!(escalated[0]["event_id"], id);
        assert_eq!(escalated[0]["reason"], "no_ack");
        // The kitchen (the admins only oversee it).
        assert_eq!(escalated[0]["audience"], 1);
    }
    assert_quiet(&mut kitchen, 200).await;
    let sample = "wsgateway_events_unacknowledged_total{reason=\"no_ack\"}";
    let escalations = a.gw.metric(sample).await + b.gw.metric(sample).await;
    assert_eq!(escalations, 1.0, "one escalation in all");
    let sample = "wsgateway_events_redelivered_total";
    assert_eq!(a.gw.metric(sample).await + b.gw.metric(sample).await, 1.0);

    // A tenant no node has a connection of: its deadline is found all the
    // same (in a cluster, through the registry the publication wrote).
    let lonely = tenant();
    publish_acked(&a.gw, "channel:branch:5:kitchen", order(lonely, 5), 1).await;
    let sample = "wsgateway_events_unacknowledged_total{reason=\"no_audience\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = a.gw.metric(sample).await + b.gw.metric(sample).await;
        if n == 1.0 {
            break;
        }
        assert!(n < 1.0 && Instant::now() < deadline, "{n} escalations");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(a.gw.metric(sample).await + b.gw.metric(sample).await, 1.0);
    drop(publisher);
}

#[tokio::test]
async fn redis_nodes_share_deadlines_and_survive_the_publishers_death() {
    let server = RedisServer::start();
    let url = server.url();
    nodes_share_deadlines(&[("REDIS_URL", &url)]).await;
}

#[tokio::test]
async fn cluster_nodes_share_deadlines_and_survive_the_publishers_death() {
    let _heavy = heavy().await;
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start(3, 0))
        .await
        .unwrap();
    let seeds = cluster.seeds();
    nodes_share_deadlines(&[
        ("REDIS_URL", &seeds),
        ("WSGATEWAY_REDIS_MODE", "cluster"),
        ("WSGATEWAY_REDIS_TIMEOUT_S", "1"),
    ])
    .await;
    drop(cluster);
}
