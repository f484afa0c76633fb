//! The connection loop ([`Live::run`]) over a real loopback socket: the
//! test holds the client's end (tungstenite, as a client), with a real hub
//! and handle and the gateway's shared state built without listeners. The
//! HTTP upgrade before it is covered over loopback in `tests/`.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tungstenite::protocol::{Role, WebSocketConfig};

use super::*;
use crate::config::{Config, Secs};
use crate::hub::monotonic_ms;

/// Every wait in these tests: far longer than anything takes, so that a
/// loaded machine does not fail them, and short enough that a hang does.
const WAIT: Duration = Duration::from_secs(10);

/// The size of the future a function returns, without calling it.
fn future_size<A, F>(_: fn(A) -> F) -> usize {
    std::mem::size_of::<F>()
}

/// The loop's future is what every open connection holds for its whole
/// life (BENCHMARKS.md, memory per idle connection): keep it small.
#[test]
fn the_live_connection_future_stays_under_a_kilobyte() {
    let size = future_size(Live::run);
    assert!(size <= 1024, "Live::run's future is {size} bytes");
}

/// The test's end of the socket.
struct Client {
    ws: WebSocketStream<TcpStream>,
}

impl Client {
    async fn send(&mut self, message: Message) {
        tokio::time::timeout(WAIT, self.ws.send(message))
            .await
            .expect("sent in time")
            .expect("the gateway's end is open");
    }

    async fn send_text(&mut self, text: &str) {
        self.send(Message::text(text)).await;
    }

    /// The next frame the gateway wrote; `None` once its end is gone (or
    /// the stream broke off).
    async fn next(&mut self) -> Option<Message> {
        match tokio::time::timeout(WAIT, self.ws.next())
            .await
            .expect("the gateway writes or closes in time")
        {
            Some(Ok(m)) => Some(m),
            _ => None,
        }
    }

    async fn next_text(&mut self) -> String {
        match self.next().await {
            Some(Message::Text(text)) => text.to_string(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Expects a close frame with this code and reason (tungstenite, as a
    /// client, answers it).
    async fn expect_close(&mut self, code: u16, reason: &str) {
        match self.next().await {
            Some(Message::Close(Some(frame))) => {
                assert_eq!(
                    (u16::from(frame.code), frame.reason.as_str()),
                    (code, reason)
                );
            }
            other => panic!("expected close {code}, got {other:?}"),
        }
    }
}

/// A connection context as the gateway builds it (a hub, metrics, the
/// embedded broker, no sector database, no revocation set), with nothing
/// listening or running: secrets only, then `configure`. Built here, not
/// through `Gateway`, so that `connection` never imports the layer above.
fn gateway(configure: impl FnOnce(&mut Config)) -> Arc<super::Context> {
    let mut config = Config::with_secrets("loop-test-jwt-secret", "loop-test-table-secret");
    configure(&mut config);
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let hub = Arc::new(crate::hub::Hub::new(
        crate::hub::Limits {
            max_total: config.max_connections,
            max_per_user: config.max_connections_per_user,
            max_per_session: config.max_connections_per_session,
        },
        metrics.clone(),
    ));
    let queue = Arc::new(crate::broker::EventQueue::new(
        config.event_queue_size,
        metrics.clone(),
    ));
    let history = crate::broker::HistoryLimits {
        size: config.history_size,
        ttl: config.history_ttl_s.0,
        max_replay: config.history_size,
    };
    let (sector_sync, _commands) = crate::sectors::sync::SectorSync::channel(1024, metrics.clone());
    Arc::new(super::Context {
        settings: super::Settings::from_config(&config),
        verifier: crate::auth::Verifier::new(&config).expect("a verifier from the secrets"),
        revocations: None,
        presence: Arc::new(crate::presence::Presence::embedded(
            hub.clone(),
            crate::presence::NodeId::new("test"),
        )),
        hub,
        broker: Arc::new(crate::broker::EmbeddedBroker::new(queue, history)),
        sectors: Arc::new(crate::sectors::SectorAssignments::disabled()),
        sector_sync,
        acks: crate::acks::Acks::new(metrics.clone()).0,
        resume_reads: tokio::sync::Semaphore::new(config.resume_concurrency),
        metrics,
        draining: tokio_util::sync::CancellationToken::new(),
        shutdown: tokio_util::sync::CancellationToken::new(),
        tasks: tokio_util::task::TaskTracker::new(),
    })
}

/// One connection's loop, running in a task of its own.
struct Conn {
    client: Client,
    handle: Arc<ConnHandle>,
    task: JoinHandle<()>,
}

/// A connected pair of loopback sockets, the gateway's end wrapped as the
/// HTTP layer wraps it, both ends framing at once (no HTTP handshake).
async fn socket_pair(max_message_bytes: usize) -> (ClientSocket, WebSocketStream<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("an address");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (server, _) = accepted.expect("accepted");
    let config = WebSocketConfig::default().max_message_size(Some(max_message_bytes));
    let wire = Wire::new(server, bytes::Bytes::new());
    let server = WebSocketStream::from_raw_socket(wire, Role::Server, Some(config)).await;
    let client = client.expect("connected");
    let client = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
    (server, client)
}

/// Registers a waiter connection in the gateway's hub, lets `before` queue
/// frames or close it before its loop starts, then runs the loop on a
/// loopback socket whose other end the test holds.
async fn open(gateway: &Arc<super::Context>, before: impl FnOnce(&ConnHandle)) -> Conn {
    let shared = gateway.clone();
    let registered = shared
        .hub
        .register(Registration {
            tenant_id: 1,
            endpoint: Endpoint::Waiter,
            member: Member::Staff {
                user_id: 7,
                branch_ids: vec![10],
                sectors: SectorScope::All,
            },
            expires_at: u64::MAX,
            jti: None,
            queue_capacity: shared.settings.send_queue_size,
            greeting: None,
        })
        .expect("room in the hub");
    let handle = registered.handle.clone();
    before(&handle);
    let (socket, ws) = socket_pair(shared.settings.max_message_bytes).await;
    let live = Live {
        socket,
        limiter: rate_limiter(shared.settings.rate_limit_per_s),
        ctx: shared,
        registered,
        catch_up: resume::CatchUp::default(),
        owner: super::refresh::Owner::Staff {
            tenant_id: 1,
            user_id: 7,
        },
        refreshes: super::refresh::Refreshes::default(),
        presences: super::presence::Presences::default(),
    };
    Conn {
        client: Client { ws },
        handle,
        task: tokio::spawn(live.run()),
    }
}

impl Conn {
    /// Waits for the loop to end; returns the client, to read what is left.
    async fn ended(self) -> Client {
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the loop ends in time")
            .expect("the loop does not panic");
        self.client
    }
}

/// Polls `check` until it holds; panics after [`WAIT`].
async fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn disconnects(gateway: &Arc<super::Context>, reason: &str) -> u64 {
    let m = &gateway.metrics;
    m.disconnects.with_label_values(&[reason]).get()
}

/// The client's close, as a client sends it.
fn bye() -> Message {
    Message::Close(Some(CloseFrame {
        code: 1000.into(),
        reason: Utf8Bytes::default(),
    }))
}

#[tokio::test]
async fn frames_queued_before_the_loop_and_pushed_during_it_arrive_in_order() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, |handle| {
        for i in 0..50 {
            handle.push(Outbound::event(Utf8Bytes::from(format!("e{i}")), unix_ms()));
        }
    })
    .await;
    // Pushed while the loop runs: written by the push itself.
    for i in 50..100 {
        conn.handle
            .push(Outbound::event(Utf8Bytes::from(format!("e{i}")), unix_ms()));
    }
    for i in 0..100 {
        assert_eq!(conn.client.next_text().await, format!("e{i}"));
    }
    conn.client.send(bye()).await;
    assert!(
        matches!(conn.client.next().await, Some(Message::Close(_))),
        "the close is answered"
    );
    conn.ended().await;
    let m = &gw.metrics;
    assert_eq!(gw.hub.counts().total, 0, "out of the hub");
    assert_eq!(m.undelivered_count(Undelivered::WriteFailed), 0);
    assert_eq!(m.undelivered_count(Undelivered::ConnectionClosed), 0);
}

#[tokio::test]
async fn ping_gets_pong_and_bad_messages_their_error_while_the_loop_goes_on() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, |_| {}).await;
    let c = &mut conn.client;
    c.send_text("{ping").await;
    assert_eq!(
        c.next_text().await,
        r#"{"type":"error","code":"invalid_json"}"#
    );
    c.send_text(r#"["ping"]"#).await;
    assert_eq!(
        c.next_text().await,
        r#"{"type":"error","code":"invalid_message"}"#
    );
    c.send_text(r#"{"type":"subscribe"}"#).await;
    assert_eq!(
        c.next_text().await,
        r#"{"type":"error","code":"unknown_message_type"}"#
    );
    c.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(c.next_text().await, r#"{"type":"pong"}"#);
    // A WebSocket ping: tungstenite's pong goes out through the same queue.
    c.send(Message::Ping(bytes::Bytes::from_static(b"hb")))
        .await;
    assert_eq!(
        c.next().await,
        Some(Message::Pong(bytes::Bytes::from_static(b"hb")))
    );
    // The client goes away without a close frame.
    drop(conn.client);
    tokio::time::timeout(WAIT, conn.task)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(gw.hub.counts().total, 0);
}

#[tokio::test]
async fn refresh_sectors_goes_to_the_sector_sync_task_unanswered() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, |_| {}).await;
    let c = &mut conn.client;
    // Nothing drains the sector sync task's queue here: the second refresh
    // joins the first, still pending.
    c.send_text(r#"{"type":"refresh_sectors"}"#).await;
    c.send_text(r#"{"type":"refresh_sectors"}"#).await;
    c.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(c.next_text().await, r#"{"type":"pong"}"#, "no reply before");
    let m = &gw.metrics;
    assert_eq!(m.sector_refreshes_coalesced.get(), 1);
}

#[tokio::test]
async fn a_binary_message_closes_with_1003() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, |_| {}).await;
    conn.client
        .send(Message::Binary(bytes::Bytes::from_static(b"\x01")))
        .await;
    conn.client
        .expect_close(1003, "binary frames are not accepted")
        .await;
    let mut client = conn.ended().await;
    assert!(client.next().await.is_none(), "nothing after the close");
    assert_eq!(disconnects(&gw, "binary"), 1);
}

#[tokio::test]
async fn a_message_over_the_rate_limit_closes_with_4029() {
    let gw = gateway(|c| c.rate_limit_per_s = 2);
    let mut conn = open(&gw, |_| {}).await;
    for _ in 0..3 {
        conn.client.send_text(r#"{"type":"ping"}"#).await;
    }
    assert_eq!(conn.client.next_text().await, r#"{"type":"pong"}"#);
    assert_eq!(conn.client.next_text().await, r#"{"type":"pong"}"#);
    conn.client.expect_close(4029, "rate limit exceeded").await;
    conn.ended().await;
    let m = &gw.metrics;
    let refused = m.connections_rejected.with_label_values(&["rate_limit"]);
    assert_eq!(refused.get(), 1);
}

#[tokio::test]
async fn a_close_request_from_the_hub_ends_the_loop_with_its_code() {
    // A slow consumer, while the loop waits on an idle socket.
    let gw = gateway(|_| {});
    let mut conn = open(&gw, |_| {}).await;
    conn.client.send_text(r#"{"type":"ping"}"#).await;
    assert_eq!(conn.client.next_text().await, r#"{"type":"pong"}"#);
    conn.handle.close(Close::SlowConsumer);
    conn.client.expect_close(1008, "slow consumer").await;
    conn.ended().await;
    assert_eq!(disconnects(&gw, "slow_consumer"), 1);

    // A drain: the hub closes every connection with 1012, and the close
    // counts as a shutdown, not a missed heartbeat.
    let gw = gateway(|_| {});
    let mut conn = open(&gw, |_| {}).await;
    gw.draining.cancel();
    gw.hub.close_all(Close::Shutdown);
    conn.client.expect_close(1012, "service restart").await;
    conn.ended().await;
    assert_eq!(disconnects(&gw, "shutdown"), 1);
    assert_eq!(disconnects(&gw, "heartbeat"), 0);
}

#[tokio::test]
async fn a_close_request_comes_before_frames_already_queued() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, |handle| {
        handle.push(Outbound::event(Utf8Bytes::from_static("e0"), 0));
        handle.close(Close::Unauthorized);
    })
    .await;
    // The handle has no socket yet: the event waits in the queue, and the
    // close request, first in line, drops it.
    conn.client.expect_close(4001, "unauthorized").await;
    conn.ended().await;
    let m = &gw.metrics;
    assert_eq!(m.undelivered_count(Undelivered::ConnectionClosed), 1);
    assert_eq!(disconnects(&gw, "token_invalid"), 1);
}

#[tokio::test]
async fn a_write_stuck_on_a_client_that_does_not_read_yields_to_a_close_request() {
    let gw = gateway(|c| {
        c.close_timeout_s = Secs(Duration::from_millis(200));
        c.send_queue_size = 400;
    });
    let conn = open(&gw, |_| {}).await;
    // Far more than loopback's socket buffers hold, and the client reads
    // none of it: the socket fills, and the rest waits for room.
    const FRAMES: usize = 400;
    let big = "x".repeat(128 * 1024);
    for i in 0..FRAMES {
        let text = Utf8Bytes::from(format!("{i:04}{big}"));
        assert!(conn.handle.push(Outbound::event(text, 0)).queued());
    }
    let handle = conn.handle.clone();
    wait_until("frames waiting for room", || handle.backlog() > 0).await;
    conn.handle.close(Close::SlowConsumer);
    let mut client = conn.ended().await;
    let m = &gw.metrics;
    assert_eq!(disconnects(&gw, "slow_consumer"), 1);
    // What the client gets: whole frames in order, then the stream breaks
    // off (the close frame never made it past the unread ones).
    let mut received = 0;
    while let Some(Message::Text(text)) = client.next().await {
        assert_eq!(&text.as_str()[..4], format!("{received:04}"));
        received += 1;
    }
    assert!(received < FRAMES, "the socket could not take them all");
    let closed = m.undelivered_count(Undelivered::ConnectionClosed);
    let failed = m.undelivered_count(Undelivered::WriteFailed);
    // At most one frame was half written when the close came.
    assert!(failed <= 1, "{failed} frames half written");
    assert_eq!(received as u64 + closed + failed, FRAMES as u64);
}

#[tokio::test]
async fn the_clients_close_frame_ends_the_loop_and_is_answered() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, |_| {}).await;
    conn.client
        .send(Message::Close(Some(CloseFrame {
            code: 1000.into(),
            reason: Utf8Bytes::from_static("bye"),
        })))
        .await;
    let mut client = conn.ended().await;
    assert!(
        matches!(client.next().await, Some(Message::Close(Some(f))) if u16::from(f.code) == 1000),
        "tungstenite's answer, written through the queue"
    );
    assert_eq!(gw.hub.counts().total, 0);
    let m = &gw.metrics;
    let all: u64 = ["binary", "slow_consumer", "shutdown", "heartbeat"]
        .iter()
        .map(|r| m.disconnects.with_label_values(&[r]).get())
        .sum();
    assert_eq!(all, 0, "a client's close is not a gateway disconnect");
}

#[tokio::test]
async fn failed_reads_close_with_their_code_or_end_quietly() {
    let gw = gateway(|c| c.max_message_bytes = 1024);

    let mut conn = open(&gw, |_| {}).await;
    conn.client.send_text(&"x".repeat(2000)).await;
    conn.client.expect_close(1009, "message too big").await;
    conn.ended().await;
    assert_eq!(disconnects(&gw, "too_large"), 1);

    let mut conn = open(&gw, |_| {}).await;
    let invalid = tungstenite::protocol::frame::Frame::message(
        bytes::Bytes::from_static(b"\xff\xfe"),
        tungstenite::protocol::frame::coding::OpCode::Data(
            tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    conn.client.send(Message::Frame(invalid)).await;
    conn.client.expect_close(1007, "invalid UTF-8").await;
    conn.ended().await;

    // Reset without a close handshake: nobody left to tell.
    let conn = open(&gw, |_| {}).await;
    let Conn { client, task, .. } = conn;
    drop(client);
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert_eq!(disconnects(&gw, "protocol_error"), 0);
}

#[tokio::test]
async fn any_inbound_frame_is_a_heartbeat() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, |_| {}).await;
    let handle = conn.handle.clone();
    // Time has to pass for silence to show.
    wait_until("the connection silent for 30 ms", || {
        handle.silent_for_ms(monotonic_ms()) >= 30
    })
    .await;
    // A WebSocket ping, no text.
    conn.client
        .send(Message::Ping(bytes::Bytes::from_static(b"hb")))
        .await;
    wait_until("the ping seen", || {
        handle.silent_for_ms(monotonic_ms()) < 30
    })
    .await;
}
