//! Handshake floods (issue #13): half-sent request heads held open must
//! not lock real clients out. While the pending budget is full, a new
//! connection takes the place of the oldest one still sending its head
//! (once read, and a moment after its accept: a storm of real clients is
//! not evicted, see the last test), which is dropped unanswered; only
//! connections past their head (being
//! answered or admitted) are never evicted, and when every place is held
//! by one of those the new connection is refused (`handshake_limit`).

use crate::common;

use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use wsgateway::config::Secs;

const EVICTED: &str = "wsgateway_handshakes_evicted_total";
const REFUSED: &str = r#"wsgateway_connections_rejected_total{reason="handshake_limit"}"#;
const HALF_HEAD: &[u8] = b"GET /ws/waiter?token=";

/// Opens a TCP connection and sends half a request head.
async fn half_open(addr: std::net::SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // The gateway may already have dropped it; what matters is the read.
    let _ = tcp.write_all(HALF_HEAD).await;
    tcp
}

/// Whether the gateway closed `tcp` (EOF or reset) before `deadline`.
async fn closed_by(tcp: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        timeout_at(deadline, tcp.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// A real client: connects with a valid token, gets `connected`, then an
/// event published to it (each client in a branch of its own).
async fn real_client_gets_in(gw: &TestGateway, sub: i64) -> Client {
    let branch = 100 + sub;
    let token = staff(sub, 1, &[branch], &["WAITER"]);
    let (mut c, hello) = gw.join("waiter", &token).await;
    assert_eq!(hello["user_id"], sub);
    let id = gw
        .publish_one(
            &format!("channel:branch:{branch}:waiters"),
            serde_json::json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": branch,
                               "event_id": format!("for-{sub}")}),
        )
        .await;
    let got = c.next_json().await.expect("the published event");
    assert_eq!(got["event_id"], id.as_str(), "{got}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_open_handshakes_is_shed_and_real_clients_get_in() {
    let _heavy = common::heavy().await;
    const FLOOD: usize = 4000;
    const BUDGET: usize = 1024;
    // Two descriptors per flood socket in this process (both ends), and
    // room for the tests running beside this one.
    let limit = common::raise_open_file_limit();
    assert!(
        limit >= 2 * FLOOD as u64 + 2000,
        "the open-file limit ({limit}) is too low for the flood"
    );
    let gw = TestGateway::start_with(|c| {
        c.max_pending_connections = BUDGET;
        // Far longer than the test: whatever closes a flood socket here is
        // an eviction, not the head timeout.
        c.handshake_timeout_s = Secs(Duration::from_secs(60));
    })
    .await;
    let started = Instant::now();

    let mut flood = Vec::with_capacity(FLOOD);
    let mut clients = Vec::new();
    for i in 0..FLOOD {
        flood.push(half_open(gw.addr).await);
        // In the middle of the flood, the budget long spent.
        if i + 1 == FLOOD / 2 {
            clients.push(real_client_gets_in(&gw, 1).await);
        }
    }
    // With the whole flood held.
    clients.push(real_client_gets_in(&gw, 2).await);

    // The flood was shed oldest first, long before the head timeout: every
    // socket but the newest (a budget's worth, less the places the real
    // clients and the publish calls took in turn) was dropped unanswered.
    let margin = 64;
    let deadline = Instant::now() + Duration::from_secs(5);
    let oldest = FLOOD - BUDGET - margin;
    let shed = join_all(
        flood[..oldest]
            .iter_mut()
            .map(|tcp| closed_by(tcp, deadline)),
    )
    .await;
    let kept = shed.iter().filter(|closed| !**closed).count();
    assert_eq!(
        kept, 0,
        "of the {oldest} oldest flood sockets, {kept} still open"
    );
    // The newest are still held: eviction takes the oldest, not any.
    let quiet = Instant::now() + Duration::from_millis(300);
    let newest = &mut flood[FLOOD - BUDGET + margin..];
    let newest_len = newest.len();
    let closed = join_all(newest.iter_mut().map(|tcp| closed_by(tcp, quiet))).await;
    let closed = closed.iter().filter(|c| **c).count();
    assert_eq!(
        closed, 0,
        "{closed} of the {newest_len} newest flood sockets closed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );

    let evicted = gw.metric(EVICTED).await;
    assert!(
        evicted >= (FLOOD - BUDGET - margin) as f64,
        "{evicted} evicted"
    );
    assert!(evicted <= (FLOOD + 16) as f64, "{evicted} evicted");
    assert_eq!(gw.metric(REFUSED).await, 0.0, "nobody was refused");

    // The real clients stayed connected, and the gateway still serves.
    for c in &mut clients {
        assert_eq!(c.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    }
    drop(flood);
    let mut after = real_client_gets_in(&gw, 3).await;
    assert_eq!(after.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    let (status, health) = gw.get_json("/ws/health").await;
    assert_eq!(status, 200, "{health}");
    gw.stop().await;
}

/// A `POST /api/publish` whose head is complete and whose body has not
/// come yet: it holds its place, past its head. Returns once the gateway
/// has asked for the body (`100 Continue`), so the head was read.
async fn stalled_publish(addr: std::net::SocketAddr, body: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("100 Continue")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 100"), "{answer}");
    tcp
}

/// Sends the body of a stalled publish and returns the status line.
async fn finish_publish(tcp: &mut TcpStream, body: &str) -> String {
    tcp.write_all(body.as_bytes()).await.unwrap();
    let mut buf = [0u8; 256];
    let n = timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn connections_past_their_head_are_never_evicted_and_a_budget_of_them_refuses() {
    let gw = TestGateway::start_with(|c| {
        c.max_pending_connections = 4;
        c.handshake_timeout_s = Secs(Duration::from_secs(60));
    })
    .await;
    let body = r#"{"channel":"channel:branch:5:waiters","event":{"type":"X","tenant_id":1,"branch_id":5}}"#;
    let soon = || Instant::now() + WAIT;

    // Two places held past the head, two by half-sent heads.
    let mut p0 = stalled_publish(gw.addr, body).await;
    let mut p1 = stalled_publish(gw.addr, body).await;
    let mut h0 = half_open(gw.addr).await;
    let mut h1 = half_open(gw.addr).await;
    // Two newcomers: the two head readers go, oldest first.
    let mut n0 = half_open(gw.addr).await;
    assert!(closed_by(&mut h0, soon()).await, "h0 evicted");
    let mut n1 = half_open(gw.addr).await;
    assert!(closed_by(&mut h1, soon()).await, "h1 evicted");
    // Two more publishes take the newcomers' places, and pass their heads.
    let mut p2 = stalled_publish(gw.addr, body).await;
    assert!(closed_by(&mut n0, soon()).await, "n0 evicted");
    let mut p3 = stalled_publish(gw.addr, body).await;
    assert!(closed_by(&mut n1, soon()).await, "n1 evicted");

    // Every place is held past its head: nobody to evict, so a new
    // connection is closed at once, unanswered.
    let mut refused = half_open(gw.addr).await;
    assert!(closed_by(&mut refused, soon()).await, "refused");

    // The publishes were kept all along, and are answered.
    for p in [&mut p0, &mut p1, &mut p2, &mut p3] {
        assert_eq!(finish_publish(p, body).await, "HTTP/1.1 202 Accepted");
    }
    // Answered, they hold no place any more: the budget is free.
    gw.assert_metric(EVICTED, 4.0).await;
    gw.assert_metric(REFUSED, 1.0).await;
    let (mut c, _) = gw.join("waiter", &staff(9, 1, &[5], &["WAITER"])).await;
    assert_eq!(c.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    gw.stop().await;
}

/// A reconnect storm (#31 item 3): many more real clients at once than the
/// pending budget, each sending its whole head at once. The gateway
/// accepts faster than it reads them, so a full budget is mostly of
/// connections not read yet; none of them is evicted for it: the newcomer
/// waits for a place, and every client gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_real_clients_larger_than_the_budget_all_get_in() {
    const CLIENTS: i64 = 300;
    let gw = TestGateway::start_with(|c| c.max_pending_connections = 16).await;
    let joins = (1..=CLIENTS).map(|sub| {
        let gw = &gw;
        async move {
            let (c, hello) = gw.join("waiter", &staff(sub, 1, &[7], &["WAITER"])).await;
            assert_eq!(hello["user_id"], sub);
            c
        }
    });
    let clients = join_all(joins).await;
    assert_eq!(clients.len(), CLIENTS as usize);
    gw.assert_metric(EVICTED, 0.0).await;
    gw.assert_metric(REFUSED, 0.0).await;
    drop(clients);
    gw.stop().await;
}
