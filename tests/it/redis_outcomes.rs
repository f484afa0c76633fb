//! What a publish answer means against a real, private `redis-server`: a
//! 504 (outcome unknown) may have published, and a retry with the same
//! `event_id` is delivered once; a 503 published nothing; and a half-open
//! trial publish aborted by its client cannot wedge the circuit breaker.
//!
//! Redis 7 refuses `DEBUG SLEEP` unless started with `enable-debug-command`,
//! so Redis is made to stop answering in two other ways:
//! - a script that spins for a while ([`stall_redis`]): like `DEBUG SLEEP`,
//!   it blocks the event loop, so what clients send meanwhile is read and
//!   run afterwards, even from a connection closed since (the "request
//!   reached Redis, the answer came too late" case). It keeps one core busy.
//! - `CLIENT PAUSE <ms> ALL` ([`pause_redis`]): every command waits out the
//!   pause, but a command whose connection closes meanwhile is dropped, not
//!   run. It burns no CPU; enough where only "no answer in time" matters.
//!
//! Each test waits on conditions with deadlines.

use crate::common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::redis_server::*;
use common::*;
use serde_json::{Value, json};
use wsgateway::config::{Config, Secret, Secs};

const CHANNEL: &str = "channel:branch:5:admin";

/// Blocks Redis's event loop for `ms` milliseconds, as `DEBUG SLEEP` does,
/// from a thread of its own; returns once the stall has begun.
async fn stall_redis(server: &RedisServer, ms: u64) -> std::thread::JoinHandle<()> {
    const SPIN: &str = "local t = redis.call('TIME') \
        local start = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
        local n repeat n = redis.call('TIME') \
        until tonumber(n[1]) * 1000000 + tonumber(n[2]) - start >= tonumber(ARGV[1]) * 1000 \
        return 1";
    let client = redis::Client::open(server.url()).unwrap();
    let port = server.port;
    let stall = std::thread::spawn(move || {
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
        let _: i64 = redis::cmd("EVAL")
            .arg(SPIN)
            .arg(0)
            .arg(ms)
            .query(&mut conn)
            .unwrap();
    });
    let deadline = Instant::now() + Duration::from_millis(ms.min(1000));
    while answers_within(port, Duration::from_millis(50)).await {
        assert!(Instant::now() < deadline, "Redis never stalled");
    }
    stall
}

/// Makes Redis stop answering every client for `ms` milliseconds. Once this
/// returns, the pause is in effect.
async fn pause_redis(url: &str, ms: u64) {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
        let () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("ALL")
            .query(&mut conn)
            .unwrap();
    })
    .await
    .unwrap();
}

/// Whether Redis answers a PING within `wait` (false when it does not
/// answer in time, or is not there).
async fn answers_within(port: u16, wait: Duration) -> bool {
    tokio::task::spawn_blocking(move || {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(wait));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    })
    .await
    .unwrap()
}

fn order(id: &str) -> Value {
    let mut e = event("ORDER_CREATED", 1, 5);
    e["event_id"] = json!(id);
    e
}

fn publication(id: &str) -> Value {
    json!({"channel": CHANNEL, "event": order(id)})
}

/// Frames of `frames` that carry `id`.
fn count_id(frames: &[Value], id: &str) -> usize {
    frames.iter().filter(|f| f["event_id"] == id).count()
}

/// Reads frames until one carries `id` (returning every frame read, that
/// one last), or panics after `within`.
async fn frames_until(client: &mut Client, id: &str, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_json_within(left).await {
            Some(frame) => {
                let done = frame["event_id"] == id;
                got.push(frame);
                if done {
                    return got;
                }
            }
            None => panic!("event {id} not delivered within {within:?}; got {got:?}"),
        }
    }
}

/// Publishes `body` until it answers 202, for at most `within`; returns the
/// body and every (status, body) answered before.
async fn publish_until_accepted(
    gw: &TestGateway,
    body: &Value,
    within: Duration,
) -> (Value, Vec<(u16, Value)>) {
    let deadline = Instant::now() + within;
    let mut refused = Vec::new();
    loop {
        let (status, answer) = gw.publish(body).await;
        if status == 202 {
            return (answer, refused);
        }
        assert!(
            status == 503 || status == 504,
            "a publish answered {status} {answer}"
        );
        refused.push((status, answer));
        if Instant::now() > deadline {
            let (_, health) = gw.get_json("/ws/health/detailed").await;
            panic!("no 202 within {within:?}; answers {refused:?}; health {health}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn breaker_state(gw: &TestGateway) -> (String, Value) {
    let (_, health) = gw.get_json("/ws/health/detailed").await;
    let state = health["circuit_breaker"]["redis"]["state"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    (state, health)
}

/// A gateway on `server` with quick Redis timings (`timeout_ms` per call, a
/// health check every `health_ms`) and `tweak`'s settings, once healthy.
async fn healthy_gateway(
    server: &RedisServer,
    timeout_ms: u64,
    health_ms: u64,
    tweak: impl FnOnce(&mut Config),
) -> TestGateway {
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.redis_timeout_s = Secs(Duration::from_millis(timeout_ms));
        c.redis_health_check_s = Secs(Duration::from_millis(health_ms));
        tweak(c);
    })
    .await;
    gw.wait_connected().await;
    gw.wait_health(Duration::from_secs(10), |s, b| {
        s == 200 && b["status"] == "healthy"
    })
    .await;
    gw
}

#[tokio::test]
async fn a_publish_answered_late_is_504_and_a_retry_with_its_event_id_is_delivered_once() {
    let _heavy = common::heavy().await;
    let server = RedisServer::start();
    let gw = healthy_gateway(&server, 500, 200, |c| {
        // The breaker stays closed: this test is about one late answer.
        c.breaker_failure_threshold = 100;
    })
    .await;
    let (mut admin, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;

    let stall = stall_redis(&server, 1500).await;
    let paused = Instant::now();
    let (status, body) = gw.publish(&publication("order-1")).await;
    let answered_after = paused.elapsed();
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"], "outcome_unknown", "{body}");
    assert!(
        answered_after < Duration::from_millis(1400),
        "answered {answered_after:?} after the pause began: not the 0.5 s deadline"
    );

    // Redis wakes and runs the publish it was sent: delivered, once.
    let mut frames = frames_until(&mut admin, "order-1", Duration::from_secs(5)).await;
    let delivered_after = paused.elapsed();
    frames.extend(admin.drain(Duration::from_millis(300)).await);
    assert_eq!(count_id(&frames, "order-1"), 1, "{frames:?}");

    // The caller retries with the same event_id: accepted, not delivered again.
    let (body, before) =
        publish_until_accepted(&gw, &publication("order-1"), Duration::from_secs(10)).await;
    let retried_after = paused.elapsed();
    assert_eq!(body["event_ids"], json!(["order-1"]), "{body}");
    assert!(
        retried_after - delivered_after < Duration::from_secs(4),
        "the retry came {:?} after the delivery: too late for the 5 s de-duplication window",
        retried_after - delivered_after
    );
    let later = admin.drain(Duration::from_secs(1)).await;
    assert_eq!(count_id(&later, "order-1"), 0, "a duplicate: {later:?}");
    stall.join().unwrap();
    println!(
        "measured: 504 after {answered_after:?}, delivered {delivered_after:?}, \
         retry accepted {retried_after:?} after the pause began ({} refusals before)",
        before.len()
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_publish_refused_with_503_published_nothing() {
    let _heavy = common::heavy().await;
    let server = RedisServer::start();
    let gw = healthy_gateway(&server, 500, 200, |_| {}).await;
    let (mut admin, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    let id = gw.publish_one(CHANNEL, order("before")).await;
    assert_eq!(admin.next_json().await.unwrap()["event_id"], id.as_str());

    let mut server = tokio::task::spawn_blocking(move || {
        let mut server = server;
        server.kill();
        server
    })
    .await
    .unwrap();
    let killed = Instant::now();
    // Every event answered 503: none of them may ever be delivered.
    let mut refused: HashSet<String> = HashSet::new();
    let mut n = 0;
    loop {
        n += 1;
        let id = format!("refused-{n}");
        let (status, body) = gw.publish(&publication(&id)).await;
        match status {
            503 => {
                assert_eq!(body["error"], "broker_unavailable", "{body}");
                refused.insert(id);
                break;
            }
            504 => {}
            other => panic!("a publish to a dead Redis answered {other} {body}"),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no 503 within 10 s of Redis dying"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_after = killed.elapsed();

    server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    let back = Instant::now();
    gw.wait_connected().await;
    let mut m = 0;
    let accepted = loop {
        m += 1;
        let id = format!("fresh-{m}");
        let (status, body) = gw.publish(&publication(&id)).await;
        match status {
            202 => {
                assert_eq!(body["event_ids"], json!([id.as_str()]), "{body}");
                break id;
            }
            503 => {
                refused.insert(id);
            }
            504 => {}
            other => panic!("a publish answered {other} {body}"),
        }
        if back.elapsed() > Duration::from_secs(10) {
            let (_, health) = gw.get_json("/ws/health/detailed").await;
            panic!("no 202 within 10 s of Redis coming back; last {status}; health {health}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let accepted_after = back.elapsed();
    let mut frames = frames_until(&mut admin, &accepted, Duration::from_secs(5)).await;
    frames.extend(admin.drain(Duration::from_secs(1)).await);
    assert_eq!(count_id(&frames, &accepted), 1, "{frames:?}");
    let leaked: Vec<&Value> = frames
        .iter()
        .filter(|f| {
            f["event_id"]
                .as_str()
                .is_some_and(|id| refused.contains(id))
        })
        .collect();
    assert!(
        leaked.is_empty(),
        "refused (503) events delivered: {leaked:?}"
    );
    println!(
        "measured: 503 after {refused_after:?} of Redis dead ({} refused), 202 after {accepted_after:?} of Redis back",
        refused.len()
    );
    drop(server);
    gw.stop().await;
}

#[tokio::test]
async fn an_aborted_half_open_publish_does_not_wedge_the_breaker() {
    let _heavy = common::heavy().await;
    let server = RedisServer::start();
    let gw = healthy_gateway(&server, 300, 100, |c| {
        c.breaker_recovery_s = Secs(Duration::from_secs(1));
        c.breaker_failure_threshold = 5;
        c.breaker_half_open_calls = 3;
    })
    .await;
    let (mut admin, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut aborted = 0;
    let mut answered = Vec::new();
    let mut missed_half_open = 0;
    let mut states_at_publish = Vec::new();

    for round in 1..=3 {
        // Health checks time out until the breaker opens.
        pause_redis(&server.url(), 2500).await;
        gw.wait_health(Duration::from_secs(5), |_, b| {
            b["circuit_breaker"]["redis"]["state"] == "OPEN"
        })
        .await;
        // Redis answers again: the health probe half-opens the breaker.
        let deadline = Instant::now() + Duration::from_secs(5);
        let half_open = loop {
            let (state, health) = breaker_state(&gw).await;
            match state.as_str() {
                "HALF_OPEN" => break true,
                // Missed it (the trials already closed it).
                "CLOSED" => break false,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: never HALF_OPEN; health {health}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if !half_open {
            missed_half_open += 1;
        }
        // A trial publish that Redis holds, and that its client gives up on.
        pause_redis(&server.url(), 250).await;
        states_at_publish.push(breaker_state(&gw).await.0);
        let result = http
            .post(gw.url("/api/publish"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(publication(&format!("aborted-{round}")).to_string())
            .timeout(Duration::from_millis(100))
            .send()
            .await;
        match result {
            Err(e) if e.is_timeout() => aborted += 1,
            Err(e) => panic!("round {round}: {e}"),
            Ok(resp) => answered.push(resp.status().as_u16()),
        }
        // Whatever the interleaving, the breaker closes again.
        let within = Duration::from_secs(10);
        let deadline = Instant::now() + within;
        loop {
            let (state, health) = breaker_state(&gw).await;
            if state == "CLOSED" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the breaker did not close within {within:?}; health {health}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let (body, before) =
        publish_until_accepted(&gw, &publication("after"), Duration::from_secs(10)).await;
    assert_eq!(body["event_ids"], json!(["after"]), "{body}");
    // The subscription may still be coming back from the last stall (its
    // reconnects back off); it does, and the event arrives.
    let closed = Instant::now();
    gw.wait_health(Duration::from_secs(10), |_, b| {
        b["circuit_breaker"]["redis"]["state"] == "CLOSED" && b["broker"]["status"] == "connected"
    })
    .await;
    let connected_after = closed.elapsed();
    let frames = frames_until(&mut admin, "after", Duration::from_secs(5)).await;
    assert_eq!(count_id(&frames, "after"), 1, "{frames:?}");
    for to in ["OPEN", "HALF_OPEN", "CLOSED"] {
        let sample =
            format!(r#"wsgateway_circuit_breaker_transitions_total{{name="redis",to="{to}"}}"#);
        assert!(gw.metric(&sample).await >= 3.0, "{sample}");
    }
    println!(
        "measured: {aborted} publishes aborted by their client (breaker {states_at_publish:?}), \
         answered {answered:?}, \
         HALF_OPEN missed {missed_half_open} times, {} refusals before the last 202, \
         subscribed {connected_after:?} after it; {:?} in all",
        before.len(),
        started.elapsed()
    );
    gw.stop().await;
}
