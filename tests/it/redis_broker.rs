//! The Redis broker against a real Redis: routing of plain PUBLISHes,
//! validation, outage and recovery, several gateway processes, and the
//! drop-oldest queue.

use crate::common;

use std::time::Duration;

use common::redis_server::*;
use common::table::*;
use common::*;
use serde_json::{Value, json};
use wsgateway::config::{Secret, Secs};

fn redis(url: &str) -> impl FnOnce(&mut wsgateway::Config) {
    let url = url.to_owned();
    move |c| c.redis_url = Some(Secret(url))
}

#[tokio::test]
async fn plain_redis_publishes_reach_exactly_their_audience() {
    // The shared Redis that the test command provides; tenants unique to
    // this run so that nothing else on that Redis can interfere.
    let url = shared_redis_url();
    let base = 1_000_000 + (rand_u32() % 1_000_000) as i64 * 2;
    let tenants = [base, base + 1];
    let gw = TestGateway::start_with(redis(&url)).await;
    gw.wait_connected().await;
    let mut clients = connect_all(&gw, tenants).await;
    let published = events(tenants);
    for (p, ev) in &published {
        let mut ev = ev.clone();
        // Each publisher's own id would do; make them unique per run.
        ev["event_id"] = json!(format!("{base}-{}", p.id));
        let receivers = publish_to(&url, &p.channel, &ev.to_string());
        assert!(receivers >= 1, "the gateway is subscribed");
    }
    let published: Vec<(Published, Value)> = published
        .into_iter()
        .map(|(mut p, ev)| {
            p.id = format!("{base}-{}", p.id);
            (p, ev)
        })
        .collect();
    let got = received(&mut clients).await;
    assert_routed(&clients, &published, &got);

    // Byte-identical events without an event_id are one event too.
    let text = json!({"type": "ROUND_READY", "tenant_id": base, "branch_id": 10, "marker": base})
        .to_string();
    publish_to(&url, "channel:branch:10:waiters", &text);
    publish_to(&url, "channel:branch:10:admin", &text);
    let got: std::collections::BTreeMap<String, usize> = futures_util::future::join_all(
        clients
            .iter_mut()
            .map(|(_, c)| c.drain(Duration::from_millis(400))),
    )
    .await
    .into_iter()
    .zip(clients.iter())
    .map(|(frames, (conn, _))| (conn.label.clone(), frames.len()))
    .collect();
    let t = base;
    assert_eq!(got[&format!("t{t}b10-admin")], 1);
    assert_eq!(got[&format!("t{t}-manager@admin-both")], 1);
    assert_eq!(got[&format!("t{t}b10-waiter")], 1);
    assert_eq!(got[&format!("t{t}b10-kitchen")], 0);
    gw.stop().await;
}

/// The same table through Redis: half the events by the publish API, half
/// by the function, as a backend publishing straight to Redis would.
#[tokio::test]
async fn the_publish_api_and_the_function_route_every_family_through_redis() {
    let server = RedisServer::start();
    let url = server.url();
    let gw = TestGateway::start_with(redis(&url)).await;
    gw.wait_connected().await;
    gw.wait_health(Duration::from_secs(10), |_, b| b["status"] == "healthy")
        .await;
    let mut clients = connect_all(&gw, [1, 2]).await;
    let published = events([1, 2]);
    for (n, (p, ev)) in published.iter().enumerate() {
        if n % 2 == 0 {
            gw.publish_one(&p.channel, ev.clone()).await;
        } else {
            assert_eq!(fcall(&url, &[&p.channel], ev).unwrap(), p.id);
        }
    }
    let got = received(&mut clients).await;
    assert_routed(&clients, &published, &got);
    gw.stop().await;
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id()
}

#[tokio::test]
async fn invalid_and_stale_events_are_dropped_counted_and_never_delivered() {
    let server = RedisServer::start();
    let gw = TestGateway::start_with(redis(&server.url())).await;
    gw.wait_connected().await;
    let (mut admin, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    let stale_ts = wsgateway::event::unix_ms() - 31_000;
    let bad = [
        ("channel:branch:5:admin", "{not json".to_owned()),
        (
            "channel:branch:5:admin",
            r#"{"tenant_id":1,"branch_id":5}"#.to_owned(),
        ),
        (
            "channel:branch:5:admin",
            r#"{"type":"X","branch_id":5}"#.to_owned(),
        ),
        (
            "channel:branch:5:admin",
            r#"{"type":"X","tenant_id":1}"#.to_owned(),
        ),
        (
            "channel:branch:5:admin",
            r#"{"type":"X","tenant_id":"1","branch_id":5}"#.to_owned(),
        ),
        (
            "channel:branch:5:admin",
            r#"{"type":["X"],"tenant_id":1,"branch_id":5}"#.to_owned(),
        ),
        (
            "channel:branch:5:admin",
            r#"{"type":"X","tenant_id":1,"branch_id":6}"#.to_owned(),
        ),
        ("channel:branch:5:admin", "[1,2,3]".to_owned()),
        (
            "channel:branch:5:nobody",
            r#"{"type":"X","tenant_id":1,"branch_id":5}"#.to_owned(),
        ),
    ];
    for (channel, payload) in &bad {
        server.publish(channel, payload);
    }
    server.publish(
        "channel:branch:5:admin",
        &json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "ts": stale_ts}).to_string(),
    );
    let fresh = json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "ts": wsgateway::event::unix_ms(), "n": "fresh"});
    server.publish("channel:branch:5:admin", &fresh.to_string());
    let got = admin.drain(Duration::from_millis(500)).await;
    assert_eq!(got, vec![fresh], "only the valid, fresh event is delivered");
    // The pattern `channel:branch:*:admin` does not match the last bad
    // channel, so Redis never delivers it: 8 invalid, 1 stale.
    gw.assert_metric(r#"events_dropped_total{reason="invalid"}"#, 8.0)
        .await;
    gw.assert_metric(r#"events_dropped_total{reason="stale"}"#, 1.0)
        .await;
    gw.assert_metric("events_processed_total", 1.0).await;
    let (status, health) = gw.get_json("/ws/health/detailed").await;
    assert_eq!(
        (status, health["status"].as_str()),
        (200, Some("healthy")),
        "{health}"
    );
    assert_eq!(health["event_processing"]["dropped"], 9, "{health}");
    assert_eq!(
        health["event_processing"]["drop_rate"], 0.0,
        "invalid and stale events do not trip the backpressure alert"
    );
    assert_eq!(admin.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    gw.stop().await;
}

#[tokio::test]
async fn a_redis_outage_keeps_clients_connected_and_delivery_resumes() {
    let mut server = RedisServer::start();
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.redis_timeout_s = Secs(Duration::from_millis(500));
        c.redis_retry_base_s = Secs(Duration::from_millis(50));
        c.redis_retry_max_s = Secs(Duration::from_millis(300));
        c.redis_health_check_s = Secs(Duration::from_millis(100));
        c.breaker_recovery_s = Secs(Duration::from_secs(1));
    })
    .await;
    gw.wait_connected().await;
    let (mut waiter, _) = gw.join("waiter", &staff(1, 1, &[5], &["WAITER"])).await;
    let (mut diner, _) = gw.join("diner", &diner(1, 5, 1, 77)).await;
    let (_, health) = gw.wait_health(WAIT, |s, _| s == 200).await;
    assert_eq!(health["circuit_breaker"]["redis"]["state"], "CLOSED");

    server.kill();
    let (status, health) = gw
        .wait_health(Duration::from_secs(10), |_, b| {
            b["circuit_breaker"]["redis"]["state"] == "OPEN"
        })
        .await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["status"], "unhealthy");
    assert_eq!(health["broker"]["status"], "disconnected");
    assert!(
        health["circuit_breaker"]["redis"]["failures"]
            .as_u64()
            .unwrap()
            >= 5
    );
    // Publishing fails fast with 503, and nothing is lost silently.
    let (status, answer) = gw
        .publish(
            &json!({"channel": "channel:branch:5:waiters", "event": event("ROUND_READY", 1, 5)}),
        )
        .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (503, Some("broker_unavailable"))
    );
    // The clients are still connected and served after a whole breaker
    // cycle (open, half-open probe, open again) of outage.
    gw.wait_metric(
        r#"wsgateway_circuit_breaker_transitions_total{name="redis",to="HALF_OPEN"}"#,
        |n| n >= 1.0,
    )
    .await;
    assert_eq!(waiter.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    assert_eq!(diner.ask(r#"{"type":"ping"}"#).await["type"], "pong");

    server.restart();
    let started = std::time::Instant::now();
    let (status, health) = gw
        .wait_health(Duration::from_secs(10), |s, b| {
            s == 200 && b["circuit_breaker"]["redis"]["state"] == "CLOSED"
        })
        .await;
    assert_eq!(health["broker"]["status"], "connected", "{health}");
    assert_eq!(status, 200);
    println!("recovered {:?} after the restart", started.elapsed());
    server.publish(
        "channel:branch:5:waiters",
        &event("ROUND_READY", 1, 5).to_string(),
    );
    server.publish(
        "channel:session:77",
        &json!({"type": "TABLE_CLEARED", "tenant_id": 1, "branch_id": 5}).to_string(),
    );
    // Redis came back without its data: what the node may have missed
    // during the outage is unknown, and the clients are told so.
    for client in [&mut waiter, &mut diner] {
        let told = client.next_json().await.unwrap();
        assert_eq!(
            (told["type"].as_str(), told["reason"].as_str()),
            (Some("resync"), Some("history_unavailable")),
            "{told}"
        );
    }
    assert_eq!(waiter.next_json().await.unwrap()["type"], "ROUND_READY");
    assert_eq!(diner.next_json().await.unwrap()["type"], "TABLE_CLEARED");
    // Every transition was taken.
    for to in ["OPEN", "HALF_OPEN", "CLOSED"] {
        let n = gw
            .metric(&format!(
                r#"wsgateway_circuit_breaker_transitions_total{{name="redis",to="{to}"}}"#
            ))
            .await;
        assert!(n >= 1.0, "{to}: {n}");
    }
    gw.assert_metric(r#"circuit_breaker_state{name="redis"}"#, 0.0)
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_burst_larger_than_the_queue_drops_the_oldest_and_counts_each() {
    let server = RedisServer::start();
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.event_queue_size = 20;
        c.send_queue_size = 8192;
    })
    .await;
    gw.wait_connected().await;
    let mut clients = Vec::new();
    for sub in 0..100 {
        clients.push(gw.join("admin", &staff(sub, 1, &[5], &["ADMIN"])).await.0);
    }
    let total = 3000;
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut pipe = redis::pipe();
    for n in 0..total {
        let ev = json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "event_id": format!("{n:05}")});
        pipe.publish("channel:branch:5:admin", ev.to_string())
            .ignore();
    }
    let () = pipe.query_async(&mut conn).await.unwrap();
    let received = futures_util::future::join_all(
        clients
            .iter_mut()
            .map(|c| c.drain(Duration::from_millis(1500))),
    )
    .await;
    let dropped = gw
        .metric(r#"wsgateway_events_dropped_total{reason="queue_full"}"#)
        .await as usize;
    let ids: Vec<Vec<String>> = received
        .iter()
        .map(|frames| {
            frames
                .iter()
                .map(|f| f["event_id"].as_str().unwrap().to_owned())
                .collect()
        })
        .collect();
    assert!(dropped > 0, "the burst overflowed the queue");
    assert!(
        gw.metric("wsgateway_event_drop_rate").await > 0.0,
        "queue overflows feed the drop-rate tracker"
    );
    for got in &ids {
        assert_eq!(got, &ids[0], "every client got the same events");
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(
            &sorted, got,
            "in publish order: only the oldest were dropped"
        );
    }
    assert_eq!(
        ids[0].len() + dropped,
        total,
        "every event was either delivered or counted as dropped"
    );
    assert_eq!(
        ids[0].last().unwrap(),
        &format!("{:05}", total - 1),
        "the newest survives"
    );
    assert_eq!(
        gw.metric("wsgateway_events_processed_total").await as usize,
        ids[0].len()
    );
    gw.stop().await;
}

#[tokio::test]
async fn two_gateway_processes_on_one_redis_both_deliver() {
    let server = RedisServer::start();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let url = server.url();
        let node =
            ServeProcess::start(&[("WSGATEWAY_API_KEY", API_KEY), ("REDIS_URL", &url)]).await;
        let addr = node.addr.clone();
        nodes.push((node, addr));
    }
    let mut clients = Vec::new();
    for (_, addr) in &nodes {
        let health = format!("http://{addr}/ws/health/detailed");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while reqwest::get(&health)
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["broker"]["status"]
            != "connected"
        {
            assert!(
                std::time::Instant::now() < deadline,
                "node {addr} never subscribed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let url = format!(
            "ws://{addr}/ws/kitchen?token={}",
            staff(1, 1, &[5], &["KITCHEN"])
        );
        let mut c = Client::open(&url, None).await;
        assert_eq!(c.next_json().await.unwrap()["type"], "connected");
        clients.push(c);
    }
    // Once through node 1's publish API.
    let body =
        json!({"channel": "channel:branch:5:kitchen", "event": event("ROUND_IN_KITCHEN", 1, 5)});
    let answer: Value = reqwest::Client::new()
        .post(format!("http://{}/api/publish", nodes[0].1))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = answer["event_ids"][0].clone();
    for c in &mut clients {
        assert_eq!(c.next_json().await.unwrap()["event_id"], id);
    }
    // Once by a backend PUBLISHing on Redis directly.
    server.publish(
        "channel:branch:5:kitchen",
        &event("ROUND_READY", 1, 5).to_string(),
    );
    for c in &mut clients {
        assert_eq!(c.next_json().await.unwrap()["type"], "ROUND_READY");
        assert!(
            c.next_json_within(Duration::from_millis(200))
                .await
                .is_none(),
            "once"
        );
    }
}

/// A Python backend writes `ts: time.time()`: seconds, fractional. Below
/// 10^11 a `ts` is seconds, above it milliseconds (PROTOCOL.md §5), read
/// the same way by the publish API, a plain PUBLISH and the Redis function;
/// a stale one in seconds is still stale.
#[tokio::test]
async fn timestamps_in_seconds_or_milliseconds_are_read_everywhere() {
    let server = RedisServer::start();
    let url = server.url();
    let gw = TestGateway::start_with(redis(&url)).await;
    gw.wait_connected().await;
    gw.wait_health(Duration::from_secs(10), |_, b| b["status"] == "healthy")
        .await;
    let (mut admin, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    // Subscribed to the admin's scopes: the numbered events below then
    // arrive live, in order with the plain PUBLISHes (in a new scope's
    // first moments, they come from history, after them).
    gw.wait_scopes(3).await;
    let now_s = || wsgateway::event::unix_ms() as f64 / 1000.0;
    let ev = |n: &str, ts: Value| json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "n": n, "ts": ts});
    let channel = "channel:branch:5:admin";

    // The publish API: fresh seconds (fractional, integer) and milliseconds
    // are published; seconds a minute old are stale.
    gw.publish_one(channel, ev("api-fraction", json!(now_s())))
        .await;
    gw.publish_one(channel, ev("api-integer", json!(now_s() as i64)))
        .await;
    gw.publish_one(channel, ev("api-ms", json!(wsgateway::event::unix_ms())))
        .await;
    let (status, answer) = gw
        .publish(&json!({"channel": channel, "event": ev("api-stale", json!(now_s() - 60.0))}))
        .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("stale_event"))
    );
    // A plain PUBLISH: dispatched by its age.
    server.publish(channel, &ev("publish-fraction", json!(now_s())).to_string());
    server.publish(
        channel,
        &ev("publish-stale", json!(now_s() - 60.0)).to_string(),
    );
    // The function keeps and publishes; the dispatcher reads the age.
    fcall(&url, &[channel], &ev("fcall-fraction", json!(now_s()))).unwrap();

    let got: Vec<Value> = admin
        .drain(Duration::from_millis(600))
        .await
        .into_iter()
        .map(|f| f["n"].clone())
        .collect();
    assert_eq!(
        got,
        vec![
            json!("api-fraction"),
            json!("api-integer"),
            json!("api-ms"),
            json!("publish-fraction"),
            json!("fcall-fraction")
        ]
    );
    gw.assert_metric(r#"events_dropped_total{reason="stale"}"#, 1.0)
        .await;
    gw.stop().await;
}
