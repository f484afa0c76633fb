//! Draining, on the real binary: the first SIGTERM turns readiness off and
//! refuses new WebSocket connections at once, closes the open ones with
//! 1012 spread evenly over `WSGATEWAY_DRAIN_S` while events still reach
//! the rest, and exits 0; a second signal closes the rest at once.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::time::Instant;

/// `n` waiters of tenant 1, branch 1, each `connected`.
async fn waiters(addr: &str, n: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for i in 0..n {
        let token = staff(100 + i as i64, 1, &[1], &["WAITER"]);
        let mut c = Client::open(&format!("ws://{addr}/ws/waiter?token={token}"), None).await;
        assert_eq!(c.next_json().await.unwrap()["type"], "connected");
        clients.push(c);
    }
    clients
}

/// Each client's events and its close code, with the time its close
/// arrived, measured from `start`.
type Ending = (Vec<serde_json::Value>, Option<u16>, Duration);

fn watch(
    clients: Vec<Client>,
    start: Instant,
    within: Duration,
) -> Vec<tokio::task::JoinHandle<Ending>> {
    clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut events = Vec::new();
                let deadline = start + within;
                loop {
                    use futures_util::StreamExt;
                    use tokio_tungstenite::tungstenite::Message;
                    match tokio::time::timeout_at(deadline, c.ws.next()).await {
                        Err(_) => panic!("no close within {within:?}"),
                        Ok(Some(Ok(Message::Text(t)))) => {
                            events.push(serde_json::from_str(t.as_str()).unwrap())
                        }
                        Ok(Some(Ok(Message::Close(f)))) => {
                            return (events, f.map(|f| u16::from(f.code)), start.elapsed());
                        }
                        Ok(None) | Ok(Some(Err(_))) => return (events, None, start.elapsed()),
                        Ok(Some(Ok(_))) => {}
                    }
                }
            })
        })
        .collect()
}

async fn http_get(addr: &str, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Waits until the gateway holds exactly `n` connections.
async fn wait_connections(addr: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = http_get(addr, "/ws/health/detailed").await;
        if body["connections"]["total"] == n {
            return;
        }
        assert!(Instant::now() < deadline, "not {n} connections: {body}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The HTTP status a WebSocket upgrade gets (101 when it succeeds).
async fn upgrade_status(addr: &str) -> u16 {
    let token = staff(999, 1, &[1], &["WAITER"]);
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws/waiter?token={token}")).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("upgrade failed without an HTTP answer: {e}"),
    }
}

#[tokio::test]
async fn sigterm_drains_the_connections_spread_over_the_window_with_1012() {
    const N: usize = 20;
    const WINDOW: Duration = Duration::from_secs(2);
    let gateway =
        ServeProcess::start(&[("WSGATEWAY_DRAIN_S", "2"), ("WSGATEWAY_API_KEY", API_KEY)]).await;
    let addr = gateway.addr.clone();
    let clients = waiters(&addr, N).await;
    assert_eq!(http_get(&addr, "/ws/health").await.0, 200);
    assert_eq!(upgrade_status(&addr).await, 101);
    // That probe's connection is dropped at once, but the gateway may not
    // have seen it go yet: the drain spreads over what it holds.
    wait_connections(&addr, N).await;

    let start = Instant::now();
    gateway.terminate();
    let endings = watch(clients, start, WINDOW + Duration::from_secs(15));
    // Readiness turns off at once (the wait is for the signal to land).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = http_get(&addr, "/ws/health").await;
        if status == 503 {
            assert_eq!(body["status"], "draining", "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/ws/health still {status}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body) = http_get(&addr, "/ws/health/detailed").await;
    assert_eq!((status, &body["status"]), (503, &json!("draining")));
    // Liveness stays on: a probe must not restart a draining node.
    assert_eq!(
        http_get(&addr, "/ws/health/live").await,
        (200, json!({"status": "alive"}))
    );
    // No new WebSocket connection is taken, and the refusal is counted.
    assert_eq!(upgrade_status(&addr).await, 503);
    let metrics = reqwest::get(format!("http://{addr}/ws/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(metric_value(&metrics, "wsgateway_draining"), Some(1.0));
    assert_eq!(
        metric_value(
            &metrics,
            r#"wsgateway_connections_rejected_total{reason="draining"}"#
        ),
        Some(1.0)
    );
    // Events still flow to the connections not yet closed.
    let client = reqwest::Client::new();
    let published = client
        .post(format!("http://{addr}/api/publish"))
        .bearer_auth(API_KEY)
        .json(&json!({"channel": "channel:branch:1:waiters", "event": event("ROUND_SUBMITTED", 1, 1)}))
        .send()
        .await
        .unwrap();
    assert_eq!(published.status().as_u16(), 202);
    let published_at = start.elapsed();

    let mut ends = Vec::new();
    for e in endings {
        ends.push(e.await.unwrap());
    }
    for (events, code, at) in &ends {
        assert_eq!(*code, Some(1012), "closed at {at:?}");
        if *at > published_at + Duration::from_millis(500) {
            assert!(
                events.iter().any(|e| e["type"] == "ROUND_SUBMITTED"),
                "a client closed at {at:?} did not get the event published at {published_at:?}"
            );
        }
    }
    // Spread evenly: the i-th of N is closed no earlier than i·WINDOW/N
    // after the signal (a close is seen after it is sent, and the signal
    // lands after it is sent), so by any time t at most ⌊t·N/W⌋ + 1 are
    // seen closed; and the last is due at (N-1)·WINDOW/N.
    let mut times: Vec<Duration> = ends.iter().map(|(_, _, at)| *at).collect();
    times.sort();
    for (i, at) in times.iter().enumerate() {
        let due = WINDOW.mul_f64(i as f64 / N as f64);
        assert!(*at >= due, "close {i} at {at:?}, before {due:?}: {times:?}");
    }
    // Not all at the end either: the first half is closed within the
    // window (generous, for a loaded machine).
    assert!(
        times[N / 2 - 1] < WINDOW + Duration::from_secs(2),
        "{times:?}"
    );

    let (status, log) = gateway.wait().await;
    assert!(status.success(), "{status:?}");
    assert!(log.contains("draining"), "{log}");
    assert!(
        !log.contains(JWT_SECRET) && !log.contains("token="),
        "{log}"
    );
}

#[tokio::test]
async fn a_second_signal_closes_the_rest_at_once() {
    for second in ["TERM", "INT"] {
        let gateway = ServeProcess::start(&[("WSGATEWAY_DRAIN_S", "120")]).await;
        let addr = gateway.addr.clone();
        let clients = waiters(&addr, 10).await;
        let start = Instant::now();
        gateway.terminate();
        let mut endings = watch(clients, start, Duration::from_secs(30));
        // The first is due at once; the second only after 12 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !endings.iter().any(|e| e.is_finished()) {
            assert!(Instant::now() < deadline, "no connection closed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(endings.iter().filter(|e| e.is_finished()).count(), 1);
        gateway.signal(second);
        let cut = Instant::now();
        for e in endings.drain(..) {
            let (_, code, _) = e.await.unwrap();
            assert_eq!(code, Some(1012));
        }
        assert!(
            cut.elapsed() < Duration::from_secs(10),
            "SIG{second}: {:?}",
            cut.elapsed()
        );
        let (status, log) = gateway.wait().await;
        assert!(status.success(), "SIG{second}: {status:?}");
        assert!(log.contains("second signal"), "{log}");
    }
}

#[tokio::test]
async fn a_drain_of_zero_closes_every_connection_at_once_and_exits_0() {
    let gateway = ServeProcess::start(&[("WSGATEWAY_DRAIN_S", "0")]).await;
    let addr = gateway.addr.clone();
    let mut clients = Vec::new();
    for (endpoint, token) in [
        ("waiter", staff(1, 1, &[5], &["WAITER"])),
        ("kitchen", staff(2, 1, &[5], &["KITCHEN"])),
        ("admin", staff(3, 1, &[5], &["ADMIN"])),
        ("diner", diner(1, 5, 1, 77)),
    ] {
        let param = if endpoint == "diner" {
            "table_token"
        } else {
            "token"
        };
        let mut c = Client::open(&format!("ws://{addr}/ws/{endpoint}?{param}={token}"), None).await;
        assert_eq!(c.next_json().await.unwrap()["type"], "connected");
        clients.push(c);
    }
    gateway.terminate();
    for c in &mut clients {
        assert_eq!(c.close_code().await, Some(1012));
    }
    let (status, log) = gateway.wait().await;
    assert!(status.success(), "{status:?}");
    assert!(
        !log.contains(JWT_SECRET) && !log.contains("token="),
        "{log}"
    );
}
