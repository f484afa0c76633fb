//! Redis faults against real `redis-server` processes: a restart, a
//! silently dead path (a loopback proxy that black-holes its flows), and
//! the function library that gives direct publishers history. Each test
//! waits on conditions with deadlines, and prints the times it measured
//! (BENCHMARKS.md collects them).

use crate::common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::redis_server::*;
use common::*;
use serde_json::{Value, json};
use wsgateway::config::{Secret, Secs};

fn numbered(kind: &str, n: usize) -> Value {
    json!({"type": kind, "tenant_id": 1, "branch_id": 5, "n": n, "ts": wsgateway::event::unix_ms()})
}

/// The `n` of every event frame received within `quiet` of silence.
async fn ns(client: &mut Client, quiet: Duration) -> Vec<u64> {
    client
        .drain(quiet)
        .await
        .iter()
        .filter_map(|f| f["n"].as_u64())
        .collect()
}

#[tokio::test]
async fn live_delivery_is_back_within_3_s_of_redis_restarting_whatever_the_breaker() {
    let _heavy = common::heavy().await;
    let mut server = RedisServer::start();
    // The seed's breaker (30 s to half-open); quick health checks so that it
    // opens quickly.
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.redis_health_check_s = Secs(Duration::from_millis(200));
        c.redis_timeout_s = Secs(Duration::from_millis(500));
    })
    .await;
    gw.wait_connected().await;
    let (mut waiter, _) = gw.join("waiter", &staff(1, 1, &[5], &["WAITER"])).await;
    server.kill();
    let (status, health) = gw
        .wait_health(Duration::from_secs(15), |_, b| {
            b["circuit_breaker"]["redis"]["state"] == "OPEN"
        })
        .await;
    assert_eq!(
        (status, health["status"].as_str()),
        (503, Some("unhealthy"))
    );
    assert!(health["broker"]["reason"].is_string(), "{health}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart();
    let back = Instant::now();
    // Publish plain events until one arrives.
    let mut n = 0;
    let first = loop {
        n += 1;
        server.publish(
            "channel:branch:5:waiters",
            &numbered("ROUND_READY", n).to_string(),
        );
        if let Some(frame) = waiter.next_json_within(Duration::from_millis(100)).await {
            // Redis came back without its data: the node cannot know what
            // it missed meanwhile, and says so first.
            if frame["type"] == "resync" {
                assert_eq!(frame["reason"], "history_unavailable", "{frame}");
                continue;
            }
            break frame;
        }
        assert!(
            back.elapsed() < Duration::from_secs(3),
            "no live delivery 3 s after Redis came back"
        );
    };
    let live_after = back.elapsed();
    assert_eq!(first["type"], "ROUND_READY");
    // The publish API follows without waiting for the 30 s recovery: the
    // health probe half-opens the breaker and trials close it.
    let accepted_after = loop {
        let (status, _) = gw
            .publish(&json!({"channel": "channel:branch:5:waiters", "event": numbered("ROUND_SERVED", 0)}))
            .await;
        if status == 202 {
            break back.elapsed();
        }
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "publish API still refusing: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "measured: live delivery {live_after:?}, publish API {accepted_after:?} after Redis came back"
    );
    gw.wait_health(Duration::from_secs(10), |s, b| {
        s == 200 && b["status"] == "healthy"
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_silently_dead_path_is_detected_replaced_and_its_gap_filled() {
    let _heavy = common::heavy().await;
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port);
    // Production timing: PING every 1 s, 2 s deadline.
    let gw = TestGateway::start_with(|c| c.redis_url = Some(Secret(proxy.url()))).await;
    gw.wait_connected().await;
    gw.wait_health(Duration::from_secs(10), |_, b| b["status"] == "healthy")
        .await;
    let (mut admin, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    let (mut diner, _) = gw.join("diner", &diner(1, 5, 1, 77)).await;
    let url = server.url();
    fcall(
        &url,
        &["channel:branch:5:admin"],
        &numbered("ROUND_READY", 1),
    )
    .unwrap();
    assert_eq!(ns(&mut admin, Duration::from_millis(300)).await, vec![1]);

    proxy.blackhole();
    let dark = Instant::now();
    // Published elsewhere meanwhile (straight to Redis, with history).
    for n in 2..=4 {
        fcall(&url, &["channel:branch:5:admin", "channel:session:77"], &{
            let mut e = numbered("ROUND_READY", n);
            e["session_id"] = json!(77);
            e
        })
        .unwrap();
    }
    // Whichever connection notices first, health stops saying healthy;
    // both are found dead within 10 s.
    gw.wait_health(Duration::from_secs(10), |_, b| b["status"] != "healthy")
        .await;
    let detected_after = dark.elapsed();
    let (status, health) = gw
        .wait_health(Duration::from_secs(10) - dark.elapsed(), |_, b| {
            b["broker"]["status"] == "disconnected" && b["broker"]["publishing"] == false
        })
        .await;
    let both_after = dark.elapsed();
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["broker"]["status"], "disconnected");
    assert!(health["broker"]["reason"].is_string(), "{health}");
    for n in 5..=6 {
        fcall(
            &url,
            &["channel:branch:5:admin"],
            &numbered("ROUND_READY", n),
        )
        .unwrap();
    }
    // Still dark: nothing arrives, the node keeps saying so.
    assert!(
        admin
            .next_json_within(Duration::from_millis(500))
            .await
            .is_none()
    );
    let (_, health) = gw.get_json("/ws/health/detailed").await;
    assert_ne!(health["status"], "healthy", "{health}");

    proxy.heal();
    let healed = Instant::now();
    gw.wait_health(Duration::from_secs(15), |s, b| {
        s == 200 && b["broker"]["status"] == "connected"
    })
    .await;
    let back_after = healed.elapsed();
    fcall(
        &url,
        &["channel:branch:5:admin"],
        &numbered("ROUND_READY", 7),
    )
    .unwrap();
    // The gap (2..=6) first, in order and once, then live.
    assert_eq!(
        ns(&mut admin, Duration::from_millis(500)).await,
        vec![2, 3, 4, 5, 6, 7]
    );
    assert_eq!(
        ns(&mut diner, Duration::from_millis(200)).await,
        vec![2, 3, 4]
    );
    assert!(
        gw.metric(r#"wsgateway_subscription_gaps_total{outcome="filled"}"#)
            .await
            >= 1.0
    );
    assert!(gw.metric("wsgateway_gap_filled_events_total").await >= 5.0);
    assert!(
        gw.metric(r#"wsgateway_redis_connections_lost_total{connection="subscription"}"#)
            .await
            >= 1.0
    );
    // The publish API works through the new command connection.
    let id = gw
        .publish_one("channel:branch:5:admin", numbered("ROUND_SERVED", 8))
        .await;
    let got = admin.next_json().await.unwrap();
    assert_eq!(
        (got["n"].as_u64(), got["event_id"].as_str()),
        (Some(8), Some(id.as_str()))
    );
    println!(
        "measured: dead path detected after {detected_after:?} (both connections {both_after:?}); delivering {back_after:?} after the path healed"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_gap_history_cannot_fill_tells_the_clients_to_resync() {
    let _heavy = common::heavy().await;
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port);
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(proxy.url()));
        c.history_size = 3;
        c.redis_health_check_s = Secs(Duration::from_millis(200));
        c.redis_timeout_s = Secs(Duration::from_millis(500));
    })
    .await;
    gw.wait_connected().await;
    let (mut admin, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    let (mut other, _) = gw.join("admin", &staff(2, 1, &[6], &["ADMIN"])).await;
    proxy.blackhole();
    gw.wait_health(Duration::from_secs(10), |_, b| {
        b["broker"]["status"] == "disconnected"
    })
    .await;
    // Five events in a history that keeps three: two are gone.
    for n in 1..=5 {
        fcall(
            &server.url(),
            &["channel:branch:5:admin"],
            &numbered("ROUND_READY", n),
        )
        .unwrap();
    }
    proxy.heal();
    gw.wait_health(Duration::from_secs(15), |_, b| {
        b["broker"]["status"] == "connected"
    })
    .await;
    let frames = admin.drain(Duration::from_millis(500)).await;
    let types: Vec<&str> = frames.iter().filter_map(|f| f["type"].as_str()).collect();
    assert!(types.contains(&"resync"), "{frames:?}");
    let resync = frames.iter().find(|f| f["type"] == "resync").unwrap();
    assert_eq!(resync["reason"], "history_trimmed");
    let kept: Vec<u64> = frames.iter().filter_map(|f| f["n"].as_u64()).collect();
    assert_eq!(
        kept,
        vec![3, 4, 5],
        "what history kept still arrives, in order"
    );
    assert!(
        other.drain(Duration::from_millis(200)).await.is_empty(),
        "branch 6 lost nothing"
    );
    gw.assert_metric(r#"events_dropped_total{reason="gap"}"#, 1.0)
        .await;
    gw.assert_metric(r#"subscription_gaps_total{outcome="lost"}"#, 1.0)
        .await;
    gw.assert_metric("resync_notices_total", 1.0).await;
    gw.stop().await;
}

#[tokio::test]
async fn direct_publishers_get_numbering_history_and_resume_through_the_function() {
    let _heavy = common::heavy().await;
    let server = RedisServer::start();
    let gw = TestGateway::start_with(|c| c.redis_url = Some(Secret(server.url()))).await;
    gw.wait_connected().await;
    // The library is loaded on the first command connection.
    gw.wait_health(Duration::from_secs(10), |_, b| b["status"] == "healthy")
        .await;
    let (mut kitchen, _) = gw.join("kitchen", &staff(1, 1, &[5], &["KITCHEN"])).await;
    let url = server.url();
    let first = fcall(
        &url,
        &["channel:branch:5:kitchen"],
        &numbered("ROUND_IN_KITCHEN", 1),
    )
    .unwrap();
    let got = kitchen.next_json().await.unwrap();
    assert_eq!(
        got["event_id"],
        first.as_str(),
        "the frame carries the id first"
    );
    let mine = fcall(&url, &["channel:branch:5:kitchen"], &{
        let mut e = numbered("ROUND_READY", 2);
        e["event_id"] = json!("order-2");
        e
    })
    .unwrap();
    assert_eq!(mine, "order-2");
    assert_eq!(kitchen.next_json().await.unwrap()["n"], 2);
    // Refusals name what is wrong, and publish nothing.
    for (channels, event, code) in [
        (
            vec!["channel:branch:6:kitchen"],
            numbered("X", 9),
            "invalid_event",
        ),
        (vec!["channel:nope"], numbered("X", 9), "unknown_channel"),
        (
            vec!["channel:branch:5:kitchen"],
            json!({"type": "X", "branch_id": 5}),
            "invalid_event",
        ),
        // 2^53 + 1: a Lua double would read it as tenant 2^53.
        (
            vec!["channel:branch:5:kitchen"],
            json!({"type": "X", "tenant_id": 9_007_199_254_740_993_i64, "branch_id": 5}),
            "invalid_event",
        ),
    ] {
        let err = fcall(&url, &channels, &event).unwrap_err().to_string();
        assert!(err.contains(code), "{err}");
    }
    assert!(
        kitchen
            .next_json_within(Duration::from_millis(300))
            .await
            .is_none()
    );
    // A resume from the first id replays the second, with what the API
    // publishes, in order.
    let third = gw
        .publish_one("channel:branch:5:kitchen", numbered("ROUND_SERVED", 3))
        .await;
    assert_eq!(
        kitchen.next_json().await.unwrap()["event_id"],
        third.as_str()
    );
    let url_ws = format!(
        "{}?token={}&last_event_id={first}",
        gw.url("/ws/kitchen").replace("http", "ws"),
        staff(1, 1, &[5], &["KITCHEN"])
    );
    let mut again = Client::open(&url_ws, None).await;
    let hello = again.next_json().await.unwrap();
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(ns(&mut again, Duration::from_millis(300)).await, vec![2, 3]);

    // Redis loses its functions (FUNCTION FLUSH, or a restart without
    // persistence): the gateway loads the library again.
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query(&mut conn)
        .unwrap();
    let id = gw
        .publish_one("channel:branch:5:kitchen", numbered("ROUND_SERVED", 4))
        .await;
    assert_eq!(kitchen.next_json().await.unwrap()["event_id"], id.as_str());
    // Plain PUBLISH stays supported, live only.
    server.publish(
        "channel:branch:5:kitchen",
        &numbered("ROUND_READY", 5).to_string(),
    );
    let plain = kitchen.next_json().await.unwrap();
    assert_eq!(plain["n"], 5);
    assert!(plain.get("event_id").is_none());
    gw.stop().await;
}

#[tokio::test]
async fn a_failover_that_lost_writes_reuses_no_number_and_says_so() {
    let _heavy = common::heavy().await;
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port);
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(proxy.url()));
    })
    .await;
    gw.wait_connected().await;
    let (mut waiter, _) = gw.join("waiter", &staff(1, 1, &[5], &["WAITER"])).await;
    let stream = "wsgateway:{1}:history:branch:5";
    let mut ids = Vec::new();
    let mut after_first = None;
    for n in 1..=3 {
        ids.push(
            gw.publish_one("channel:branch:5:waiters", numbered("ROUND_READY", n))
                .await,
        );
        if n == 1 {
            // What a replica that missed the next two writes holds.
            let dump: Vec<u8> = server.query(redis::cmd("DUMP").arg(stream)).unwrap();
            let seq: String = server
                .query(redis::cmd("GET").arg("wsgateway:{1}:seq"))
                .unwrap();
            after_first = Some((dump, seq));
        }
    }
    assert_eq!(
        ns(&mut waiter, Duration::from_millis(300)).await,
        vec![1, 2, 3]
    );
    // That replica is promoted: the counter and the history are two events
    // behind what the node delivered, and the data was written by another
    // server process (its run_id is in the tenant's marker). The node
    // reconnects.
    let (dump, seq) = after_first.unwrap();
    let _: () = server
        .query(
            redis::cmd("RESTORE")
                .arg(stream)
                .arg(0)
                .arg(dump)
                .arg("REPLACE"),
        )
        .unwrap();
    let _: () = server
        .query(redis::cmd("SET").arg("wsgateway:{1}:seq").arg(seq))
        .unwrap();
    let _: () = server
        .query(
            redis::cmd("SET")
                .arg("wsgateway:{1}:run")
                .arg("another-server"),
        )
        .unwrap();
    let _: () = server.query(redis::cmd("FUNCTION").arg("FLUSH")).unwrap();
    proxy.close_all();
    let resync = waiter.next_json().await.expect("a resync notice");
    assert_eq!(resync["type"], "resync", "{resync}");
    gw.wait_connected().await;
    // The next event gets a number above every number given before.
    // (The command connection, closed too, may take a moment: 503.)
    let started = Instant::now();
    let id = loop {
        let (status, body) = gw
            .publish(&json!({"channel": "channel:branch:5:waiters", "event": numbered("ROUND_SERVED", 4)}))
            .await;
        if status == 202 {
            break body["event_ids"][0].as_str().unwrap().to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let number = |id: &str| id.parse::<u64>().unwrap();
    assert!(
        ids.iter().all(|old| number(old) < number(&id)),
        "{id} after {ids:?}"
    );
    assert_eq!(ns(&mut waiter, Duration::from_millis(500)).await, vec![4]);
    // A resume from before the failover cannot be vouched for.
    let (_, connected) = gw
        .join_from("waiter", &staff(1, 1, &[5], &["WAITER"]), &ids[0])
        .await;
    assert_eq!(connected["recovered"], false, "{connected}");
    gw.stop().await;
}
