//! The connection loop ([`Live::run`]) driven through channels, as in
//! axum's `testing-websockets` example: the test holds the client's end of
//! a socket made of two channels, with a real hub and handle and the
//! gateway's shared state built without listeners. What tungstenite does on
//! a real socket (answering a client's close, size limits, UTF-8 checks) is
//! covered over loopback in `tests/`.

use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use futures_channel::mpsc;
use tokio::task::JoinHandle;

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
    let size = future_size(<Live>::run);
    assert!(size <= 1024, "Live::run's future is {size} bytes");
}

/// The gateway's end of a socket whose other end the test holds: frames to
/// the client go into a bounded channel (a client that does not read fills
/// it, and the loop's writes wait), frames from the client come out of an
/// unbounded one.
struct ChannelSocket {
    to_client: mpsc::Sender<Message>,
    from_client: mpsc::UnboundedReceiver<Result<Message, axum::Error>>,
    /// Frames handed to the socket so far.
    sent: Arc<AtomicUsize>,
    /// `sent` at each flush that followed new frames: the batches.
    flushed_at: Arc<Mutex<Vec<usize>>>,
}

impl Sink<Message> for ChannelSocket {
    type Error = axum::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.to_client.poll_ready(cx).map_err(axum::Error::new)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        self.sent.fetch_add(1, Ordering::SeqCst);
        self.to_client.start_send(item).map_err(axum::Error::new)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let flushed = ready!(Pin::new(&mut self.to_client).poll_flush(cx));
        if flushed.is_ok() {
            let sent = self.sent.load(Ordering::SeqCst);
            let mut at = self.flushed_at.lock().unwrap();
            if at.last().copied().unwrap_or(0) != sent {
                at.push(sent);
            }
        }
        Poll::Ready(flushed.map_err(axum::Error::new))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.to_client)
            .poll_close(cx)
            .map_err(axum::Error::new)
    }
}

impl Stream for ChannelSocket {
    type Item = Result<Message, axum::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.from_client.poll_next_unpin(cx)
    }
}

/// The test's end of the socket.
struct Client {
    tx: mpsc::UnboundedSender<Result<Message, axum::Error>>,
    rx: mpsc::Receiver<Message>,
}

impl Client {
    fn send(&self, message: Message) {
        self.tx
            .unbounded_send(Ok(message))
            .expect("the loop is still reading");
    }

    fn send_text(&self, text: &str) {
        self.send(Message::text(text));
    }

    /// A failed read, as axum reports tungstenite's errors.
    fn fail_read(&self, e: tungstenite::Error) {
        self.tx
            .unbounded_send(Err(axum::Error::new(e)))
            .expect("the loop is still reading");
    }

    /// The next frame the gateway wrote; `None` once its end is gone.
    async fn next(&mut self) -> Option<Message> {
        tokio::time::timeout(WAIT, self.rx.next())
            .await
            .expect("the gateway writes or closes in time")
    }

    async fn next_text(&mut self) -> String {
        match self.next().await {
            Some(Message::Text(text)) => text.to_string(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Expects a close frame with this code and reason, and answers it as
    /// a client does.
    async fn expect_close(&mut self, code: u16, reason: &str) {
        match self.next().await {
            Some(Message::Close(Some(frame))) => {
                assert_eq!((frame.code, frame.reason.as_str()), (code, reason));
            }
            other => panic!("expected close {code}, got {other:?}"),
        }
        let reply = CloseFrame {
            code,
            reason: Utf8Bytes::default(),
        };
        // The loop may already have gone, having nothing more to wait for.
        let _ = self.tx.unbounded_send(Ok(Message::Close(Some(reply))));
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
        hub,
        broker: Arc::new(crate::broker::EmbeddedBroker::new(queue, history)),
        sectors: Arc::new(crate::sectors::SectorAssignments::disabled()),
        sector_sync,
        resume_reads: tokio::sync::Semaphore::new(config.resume_concurrency),
        metrics,
        shutdown: tokio_util::sync::CancellationToken::new(),
        tasks: tokio_util::task::TaskTracker::new(),
    })
}

/// One connection's loop, running in a task of its own.
struct Conn {
    client: Client,
    handle: Arc<ConnHandle>,
    sent: Arc<AtomicUsize>,
    flushed_at: Arc<Mutex<Vec<usize>>>,
    task: JoinHandle<()>,
}

/// Registers a waiter connection in the gateway's hub, lets `before` queue
/// frames or close it before its loop starts, then runs the loop on a
/// socket whose client end holds up to `buffer` unread frames.
fn open(gateway: &Arc<super::Context>, buffer: usize, before: impl FnOnce(&ConnHandle)) -> Conn {
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
    // futures' channel holds `buffer` frames plus one per sender.
    let (to_client, rx) = mpsc::channel(buffer.saturating_sub(1));
    let (tx, from_client) = mpsc::unbounded();
    let sent = Arc::new(AtomicUsize::new(0));
    let flushed_at = Arc::new(Mutex::new(Vec::new()));
    let live = Live {
        socket: ChannelSocket {
            to_client,
            from_client,
            sent: sent.clone(),
            flushed_at: flushed_at.clone(),
        },
        limiter: rate_limiter(shared.settings.rate_limit_per_s),
        ctx: shared,
        registered,
        catch_up: resume::CatchUp::default(),
        owner: super::refresh::Owner::Staff {
            tenant_id: 1,
            user_id: 7,
        },
        refreshes: super::refresh::Refreshes::default(),
    };
    Conn {
        client: Client { tx, rx },
        handle,
        sent,
        flushed_at,
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

#[tokio::test]
async fn queued_frames_are_written_in_order_up_to_64_per_flush() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, 128, |handle| {
        for i in 0..100 {
            handle.push(Outbound::event(Utf8Bytes::from(format!("e{i}")), unix_ms()));
        }
    });
    let flushed_at = conn.flushed_at.clone();
    for i in 0..100 {
        assert_eq!(conn.client.next_text().await, format!("e{i}"));
    }
    conn.client.send(Message::Close(Some(CloseFrame {
        code: 1000,
        reason: Utf8Bytes::default(),
    })));
    conn.ended().await;
    assert_eq!(*flushed_at.lock().unwrap(), [64, 100], "two batches");
    let m = &gw.metrics;
    assert_eq!(
        m.publish_to_client_seconds.get_sample_count(),
        2,
        "one latency sample per written batch"
    );
    assert_eq!(gw.hub.counts().total, 0, "out of the hub");
    assert_eq!(m.undelivered_count(Undelivered::WriteFailed), 0);
    assert_eq!(m.undelivered_count(Undelivered::ConnectionClosed), 0);
}

#[tokio::test]
async fn ping_gets_pong_and_bad_messages_their_error_while_the_loop_goes_on() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, 16, |_| {});
    let c = &mut conn.client;
    c.send_text("{ping");
    assert_eq!(
        c.next_text().await,
        r#"{"type":"error","code":"invalid_json"}"#
    );
    c.send_text(r#"["ping"]"#);
    assert_eq!(
        c.next_text().await,
        r#"{"type":"error","code":"invalid_message"}"#
    );
    c.send_text(r#"{"type":"subscribe"}"#);
    assert_eq!(
        c.next_text().await,
        r#"{"type":"error","code":"unknown_message_type"}"#
    );
    c.send_text(r#"{"type":"ping"}"#);
    assert_eq!(c.next_text().await, r#"{"type":"pong"}"#);
    // The client goes away without a close frame.
    drop(conn.client.tx);
    let task = conn.task;
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert_eq!(gw.hub.counts().total, 0);
}

#[tokio::test]
async fn refresh_sectors_goes_to_the_sector_sync_task_unanswered() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, 16, |_| {});
    let c = &mut conn.client;
    // Nothing drains the sector sync task's queue here: the second refresh
    // joins the first, still pending.
    c.send_text(r#"{"type":"refresh_sectors"}"#);
    c.send_text(r#"{"type":"refresh_sectors"}"#);
    c.send_text(r#"{"type":"ping"}"#);
    assert_eq!(c.next_text().await, r#"{"type":"pong"}"#, "no reply before");
    let m = &gw.metrics;
    assert_eq!(m.sector_refreshes_coalesced.get(), 1);
}

#[tokio::test]
async fn a_binary_message_closes_with_1003() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, 16, |_| {});
    conn.client
        .send(Message::Binary(bytes::Bytes::from_static(b"\x01")));
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
    let mut conn = open(&gw, 16, |_| {});
    for _ in 0..3 {
        conn.client.send_text(r#"{"type":"ping"}"#);
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
    let mut conn = open(&gw, 16, |_| {});
    conn.client.send_text(r#"{"type":"ping"}"#);
    assert_eq!(conn.client.next_text().await, r#"{"type":"pong"}"#);
    conn.handle.close(Close::SlowConsumer);
    conn.client.expect_close(1008, "slow consumer").await;
    conn.ended().await;
    assert_eq!(disconnects(&gw, "slow_consumer"), 1);

    // Shutdown: the hub closes every connection with 1001, and the close
    // counts as a shutdown, not a missed heartbeat.
    let gw = gateway(|_| {});
    let mut conn = open(&gw, 16, |_| {});
    gw.shutdown.cancel();
    gw.hub.close_all(Close::Shutdown);
    conn.client.expect_close(1001, "going away").await;
    conn.ended().await;
    assert_eq!(disconnects(&gw, "shutdown"), 1);
    assert_eq!(disconnects(&gw, "heartbeat"), 0);
}

#[tokio::test]
async fn a_close_request_comes_before_frames_already_queued() {
    let gw = gateway(|_| {});
    let mut conn = open(&gw, 16, |handle| {
        handle.push(Outbound::event(Utf8Bytes::from_static("e0"), 0));
        handle.close(Close::Unauthorized);
    });
    conn.client.expect_close(4001, "unauthorized").await;
    conn.ended().await;
    let m = &gw.metrics;
    assert_eq!(m.undelivered_count(Undelivered::ConnectionClosed), 1);
    assert_eq!(disconnects(&gw, "token_invalid"), 1);
}

#[tokio::test]
async fn a_write_stuck_on_a_client_that_does_not_read_yields_to_a_close_request() {
    let gw = gateway(|c| c.close_timeout_s = Secs(Duration::from_millis(200)));
    // The client's end holds one frame, and the client reads none.
    let conn = open(&gw, 1, |handle| {
        for i in 0..10 {
            handle.push(Outbound::event(Utf8Bytes::from(format!("e{i}")), 0));
        }
    });
    let sent = conn.sent.clone();
    // The first frame fills the client's end; the second waits for room.
    wait_until("a frame handed to the socket", || {
        sent.load(Ordering::SeqCst) == 1
    })
    .await;
    conn.handle.close(Close::SlowConsumer);
    let mut client = conn.ended().await;
    let m = &gw.metrics;
    // Handed to the socket but never flushed: the close frame could not
    // follow it either (its send timed out).
    assert_eq!(m.undelivered_count(Undelivered::WriteFailed), 1);
    assert_eq!(m.undelivered_count(Undelivered::ConnectionClosed), 9);
    assert_eq!(disconnects(&gw, "slow_consumer"), 1);
    assert_eq!(client.next_text().await, "e0");
    assert!(client.next().await.is_none(), "no close frame made it");
}

#[tokio::test]
async fn the_clients_close_frame_ends_the_loop() {
    let gw = gateway(|_| {});
    let conn = open(&gw, 16, |_| {});
    conn.client.send(Message::Close(Some(CloseFrame {
        code: 1000,
        reason: Utf8Bytes::from_static("bye"),
    })));
    let mut client = conn.ended().await;
    // Answering it is tungstenite's part, on a real socket.
    assert!(client.next().await.is_none(), "the gateway sends nothing");
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
    use tungstenite::error::{CapacityError, ProtocolError};
    let gw = gateway(|_| {});

    let mut conn = open(&gw, 16, |_| {});
    conn.client.fail_read(tungstenite::Error::Capacity(
        CapacityError::MessageTooLong {
            size: 70_000,
            max_size: 65_536,
        },
    ));
    conn.client.expect_close(1009, "message too big").await;
    conn.ended().await;
    assert_eq!(disconnects(&gw, "too_large"), 1);

    let mut conn = open(&gw, 16, |_| {});
    conn.client
        .fail_read(tungstenite::Error::Utf8("invalid".into()));
    conn.client.expect_close(1007, "invalid UTF-8").await;
    conn.ended().await;

    // Reset without a close handshake: nobody left to tell.
    let conn = open(&gw, 16, |_| {});
    conn.client.fail_read(tungstenite::Error::Protocol(
        ProtocolError::ResetWithoutClosingHandshake,
    ));
    let mut client = conn.ended().await;
    assert!(client.next().await.is_none(), "no close frame");
}

#[tokio::test]
async fn any_inbound_frame_is_a_heartbeat() {
    let gw = gateway(|_| {});
    let conn = open(&gw, 16, |_| {});
    let handle = conn.handle.clone();
    // Time has to pass for silence to show.
    wait_until("the connection silent for 30 ms", || {
        handle.silent_for_ms(monotonic_ms()) >= 30
    })
    .await;
    // A WebSocket ping (answered by tungstenite on a real socket), no text.
    conn.client
        .send(Message::Ping(bytes::Bytes::from_static(b"hb")));
    wait_until("the ping seen", || {
        handle.silent_for_ms(monotonic_ms()) < 30
    })
    .await;
}
