//! Chaos: two gateway nodes on one private Redis, node B behind a loopback
//! proxy that black-holes and resets its flows, two kills of Redis itself
//! (one restarts it empty, the other from a snapshot taken seconds before,
//! while clients are offline), a publisher running throughout (the publish
//! API of node A and `FCALL wsgateway_publish` straight to Redis), and
//! clients that stay, or hop away and back with `last_event_id`. At the end
//! every client must hold exactly the events of its audience, in order and
//! once.
//!
//! Rules the test lives by (so that what it asserts is what the gateway
//! promises, no more):
//!
//! - **Reconnect target.** A hopping client reconnects to B when no fault
//!   of B is in progress (the driver knows: from the fault's start until B
//!   reports `healthy` again) and B's last health sample is `healthy`;
//!   otherwise to A, whose path to Redis is never faulted. No client
//!   reconnects while Redis itself is down. So every resume can read
//!   history, and `recovered: false` is a failure, with one honest
//!   exception: a cursor from before a Redis kill, resumed after it. Then
//!   `recovered: false` is required: after the empty restart history does
//!   not know that id any more, and after the restore the events published
//!   between the snapshot and the kill are gone from Redis, so no earlier
//!   cursor can be vouched for (a `recovered: true` there would be a lie,
//!   which the chains below would also catch).
//! - **Chains.** A client's connections linked by `recovered: true` form a
//!   chain: together they must deliver exactly the audience events after the
//!   chain's start. A chain starts at the first connection or at a
//!   `recovered: false`; at its start it may begin with any event published
//!   before its `connected` frame arrived (a node catching up may deliver
//!   earlier ones), never later; from there on nothing may be missing,
//!   repeated or out of order. Only the last chain must reach the last
//!   event; an earlier one ends where the next restarted.
//! - **Publish outcomes.** 202 / an FCALL id: published, expected. 503 / a
//!   refused connection / a Redis error reply: not published, must never be
//!   delivered. 504 / a transport error after sending: unknown, left out of
//!   the exactness checks but delivered at most once per chain. Every id
//!   published is above every id published before it: no number is given
//!   twice, the restore's included.
//! - **The Redis kills.** The publisher is paused and the test waits until
//!   every connected client received everything accepted so far; Redis is
//!   killed with SIGKILL and restarted on its dir; the publisher resumes
//!   once both nodes are `healthy`. So the history lost with Redis's data
//!   held nothing a connected client still needs. The first restart is
//!   empty (no snapshot yet). Before the second, a `SAVE` is taken while
//!   publishing goes on, and the restart loads it: the events published
//!   after it are gone from history (checked), the connected clients had
//!   them live, and some hopping clients are offline meanwhile, holding
//!   cursors from before the `SAVE` and from after it.
//! - **Resync.** The nodes' subscriptions had a gap across each Redis
//!   restart, which reloaded (or lost) the data: each connection open
//!   across one must get a `resync` (`history_unavailable`) before the
//!   driver goes on; it does not break the connection's chain (the pause
//!   left nothing in flight). Any other `resync` is a failure: history
//!   covers every other gap.
//! - **Health.** While B's path is black-holed, from the fault's start + 3 s
//!   until the heal, B must never say `healthy` (detection with these
//!   timings is about 0.7 s).

use crate::common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::redis_server::RedisServer;
use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_util::sync::CancellationToken;
use wsgateway::config::{Secret, Secs};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The whole test must end within this (it takes about 30 s).
const BUDGET: Duration = Duration::from_secs(58);
/// Pause of the publisher between two events.
const PUBLISH_EVERY: Duration = Duration::from_millis(40);
/// Period of the health sampler.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// From a black-hole's start, B must not say healthy after this.
const DETECTION_BOUND: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    A,
    B,
}

/// What one published item is: its channels, branch and session.
struct Item {
    channels: &'static [&'static str],
    branch: i64,
    session: Option<i64>,
}

const ITEMS: &[Item] = &[
    Item {
        channels: &["channel:branch:5:admin"],
        branch: 5,
        session: None,
    },
    Item {
        channels: &["channel:branch:5:kitchen"],
        branch: 5,
        session: None,
    },
    Item {
        channels: &["channel:session:77"],
        branch: 5,
        session: Some(77),
    },
    Item {
        channels: &["channel:branch:5:waiters"],
        branch: 5,
        session: None,
    },
    Item {
        channels: &["channel:branch:6:admin"],
        branch: 6,
        session: None,
    },
    Item {
        channels: &[
            "channel:branch:5:kitchen",
            "channel:branch:5:waiters",
            "channel:session:77",
        ],
        branch: 5,
        session: Some(77),
    },
    Item {
        channels: &["channel:branch:6:kitchen"],
        branch: 6,
        session: None,
    },
    // Nobody here is at table session 78.
    Item {
        channels: &["channel:session:78"],
        branch: 5,
        session: Some(78),
    },
    Item {
        channels: &["channel:branch:5:admin", "channel:branch:5:kitchen"],
        branch: 5,
        session: None,
    },
];

const TYPES: &[&str] = &[
    "ROUND_SUBMITTED",
    "ROUND_IN_KITCHEN",
    "ROUND_READY",
    "SERVICE_CALL_CREATED",
    "PAYMENT_APPROVED",
];

#[derive(Clone, Copy, Debug)]
enum Role {
    Admin(i64),
    Kitchen(i64),
    Waiter(i64),
    /// Tenant 1, branch 5, this table session.
    Diner(i64),
}

impl Role {
    fn endpoint(self) -> &'static str {
        match self {
            Role::Admin(_) => "admin",
            Role::Kitchen(_) => "kitchen",
            Role::Waiter(_) => "waiter",
            Role::Diner(_) => "diner",
        }
    }

    /// The simple audience rule of PROTOCOL.md §6 for these events (all of
    /// tenant 1, none with a `sector_id`, no sector database).
    fn receives(self, item: &Item) -> bool {
        let has = |c: String| item.channels.iter().any(|x| *x == c);
        match self {
            Role::Admin(b) => {
                let prefix = format!("channel:branch:{b}:");
                item.channels.iter().any(|c| c.starts_with(&prefix))
            }
            Role::Kitchen(b) => has(format!("channel:branch:{b}:kitchen")),
            Role::Waiter(b) => has(format!("channel:branch:{b}:waiters")),
            Role::Diner(s) => item.branch == 5 && has(format!("channel:session:{s}")),
        }
    }

    fn token(self, sub: i64) -> String {
        match self {
            Role::Admin(b) => staff(sub, 1, &[b], &["ADMIN"]),
            Role::Kitchen(b) => staff(sub, 1, &[b], &["KITCHEN"]),
            Role::Waiter(b) => staff(sub, 1, &[b], &["WAITER"]),
            Role::Diner(s) => diner(1, 5, 1, s),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Outcome {
    Accepted(String),
    Rejected(String),
    Unknown(String),
    /// A test bug (a 400, a 202 without id...): fails the test.
    Unexpected(String),
}

#[derive(Clone)]
struct Published {
    n: u64,
    item: usize,
    via: &'static str,
    started: Instant,
    outcome: Outcome,
}

impl Published {
    /// Published or maybe published: part of the audiences' sequences.
    fn counts(&self) -> bool {
        matches!(self.outcome, Outcome::Accepted(_) | Outcome::Unknown(_))
    }
}

#[derive(Default)]
struct Control {
    stop: AtomicBool,
    pause: AtomicBool,
    idle: AtomicBool,
}

fn make_event(n: u64, item: &Item) -> Value {
    let mut e = json!({
        "type": TYPES[n as usize % TYPES.len()],
        "tenant_id": 1,
        "branch_id": item.branch,
        "n": n,
        "ts": wsgateway::event::unix_ms(),
    });
    if let Some(s) = item.session {
        e["session_id"] = json!(s);
    }
    e
}

async fn publish_api(http: &reqwest::Client, a: SocketAddr, item: &Item, event: &Value) -> Outcome {
    let body = if item.channels.len() == 1 {
        json!({"channel": item.channels[0], "event": event})
    } else {
        json!({"channels": item.channels, "event": event})
    };
    let sent = http
        .post(format!("http://{a}/api/publish"))
        .bearer_auth(API_KEY)
        .json(&body)
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) if e.is_connect() => return Outcome::Rejected(format!("connect: {e}")),
        Err(e) => return Outcome::Unknown(format!("http: {e}")),
    };
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    match status {
        202 => match body["event_ids"][0].as_str() {
            Some(id) => Outcome::Accepted(id.to_owned()),
            None => Outcome::Unexpected(format!("202 without an id: {body}")),
        },
        503 => Outcome::Rejected(format!("503 {body}")),
        504 => Outcome::Unknown(format!("504 {body}")),
        _ => Outcome::Unexpected(format!("{status} {body}")),
    }
}

/// `FCALL wsgateway_publish 0 <channels>... <event>`, straight to Redis.
fn fcall(url: &str, channels: &[&str], event: &Value) -> Outcome {
    let client = redis::Client::open(url).unwrap();
    let mut conn = match client.get_connection_with_timeout(Duration::from_secs(2)) {
        Ok(c) => c,
        Err(e) => return Outcome::Rejected(format!("connect: {e}")),
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("wsgateway_publish").arg(0);
    for c in channels {
        cmd.arg(*c);
    }
    cmd.arg(event.to_string());
    match cmd.query::<(String, String)>(&mut conn) {
        Ok((id, _)) => Outcome::Accepted(id),
        Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
            Outcome::Unknown(format!("FCALL: {e}"))
        }
        Err(e) => {
            let text = e.to_string();
            if text.contains("invalid") || text.contains("unknown_channel") {
                Outcome::Unexpected(format!("FCALL: {text}"))
            } else {
                Outcome::Rejected(format!("FCALL: {text}"))
            }
        }
    }
}

/// Publishes one event after another, alternating A's API and FCALL, until
/// stopped; idles while paused.
async fn publish_loop(
    a: SocketAddr,
    redis_url: String,
    ctl: Arc<Control>,
    log: Arc<Mutex<Vec<Published>>>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut n = 0u64;
    while !ctl.stop.load(Ordering::SeqCst) {
        if ctl.pause.load(Ordering::SeqCst) {
            ctl.idle.store(true, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        ctl.idle.store(false, Ordering::SeqCst);
        n += 1;
        let ix = n as usize % ITEMS.len();
        let item = &ITEMS[ix];
        let event = make_event(n, item);
        let started = Instant::now();
        let (via, outcome) = if n.is_multiple_of(2) {
            ("api", publish_api(&http, a, item, &event).await)
        } else {
            let url = redis_url.clone();
            let outcome =
                tokio::task::spawn_blocking(move || fcall(&url, ITEMS[ix].channels, &event))
                    .await
                    .unwrap();
            ("fcall", outcome)
        };
        log.lock().unwrap().push(Published {
            n,
            item: ix,
            via,
            started,
            outcome,
        });
        tokio::time::sleep(PUBLISH_EVERY).await;
    }
    ctl.idle.store(true, Ordering::SeqCst);
}

struct Sample {
    at: Instant,
    http: u16,
    status: String,
    broker: String,
}

async fn sample_health(addr: SocketAddr, stop: CancellationToken, out: Arc<Mutex<Vec<Sample>>>) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    while !stop.is_cancelled() {
        let at = Instant::now();
        let sample = match http
            .get(format!("http://{addr}/ws/health/detailed"))
            .send()
            .await
        {
            Ok(resp) => {
                let code = resp.status().as_u16();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                Sample {
                    at,
                    http: code,
                    status: body["status"].as_str().unwrap_or("?").to_owned(),
                    broker: body["broker"]["status"].as_str().unwrap_or("?").to_owned(),
                }
            }
            Err(e) => Sample {
                at,
                http: 0,
                status: format!("error: {e}"),
                broker: "?".into(),
            },
        };
        out.lock().unwrap().push(sample);
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

struct Got {
    n: u64,
    id: Option<String>,
    at: Instant,
}

/// One WebSocket connection of a client.
struct Segment {
    node: Node,
    cursor: Option<String>,
    recovered: Option<bool>,
    opened: Instant,
    connected_at: Option<Instant>,
    events: Vec<Got>,
    resyncs: Vec<(Instant, Value)>,
    /// Protocol surprises (an event before `connected`, a non-JSON frame).
    oddities: Vec<String>,
    /// Set when the server ended the connection (the test never lets it).
    ended: Option<String>,
    other_frames: usize,
}

type Log = Arc<Mutex<Vec<Segment>>>;

/// Reads one connection's frames into the last segment of `log`, until
/// `stop` (then closes it) or the server ends it.
async fn read_frames(mut ws: Ws, log: Log, stop: CancellationToken) {
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                return;
            }
            m = ws.next() => m,
        };
        let now = Instant::now();
        let mut segments = log.lock().unwrap();
        let seg = segments.last_mut().unwrap();
        match m {
            None => {
                seg.ended = Some("the stream ended".into());
                return;
            }
            Some(Err(e)) => {
                seg.ended = Some(format!("error: {e}"));
                return;
            }
            Some(Ok(Message::Close(frame))) => {
                seg.ended = Some(format!("closed by the server: {frame:?}"));
                return;
            }
            Some(Ok(Message::Text(t))) => {
                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                    seg.oddities.push(format!("not JSON: {}", t.as_str()));
                    continue;
                };
                if seg.connected_at.is_none() {
                    if v["type"] == "connected" {
                        seg.connected_at = Some(now);
                        seg.recovered = v["recovered"].as_bool();
                    } else {
                        seg.oddities.push(format!("before `connected`: {v}"));
                    }
                    continue;
                }
                if v["type"] == "resync" {
                    seg.resyncs.push((now, v));
                } else if let Some(n) = v["n"].as_u64() {
                    seg.events.push(Got {
                        n,
                        id: v["event_id"].as_str().map(str::to_owned),
                        at: now,
                    });
                } else {
                    seg.other_frames += 1;
                }
            }
            Some(Ok(_)) => {}
        }
    }
}

struct Peer {
    name: &'static str,
    role: Role,
    token: String,
    log: Log,
    reader: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    /// Whether it hops (disconnects and resumes) during the run.
    hops: bool,
    /// When it last disconnected.
    left_at: Option<Instant>,
}

impl Peer {
    fn new(name: &'static str, role: Role, sub: i64, hops: bool) -> Peer {
        Peer {
            name,
            role,
            token: role.token(sub),
            log: Arc::default(),
            reader: None,
            hops,
            left_at: None,
        }
    }

    fn last_event_id(&self) -> Option<String> {
        cursor_of(&self.log.lock().unwrap()).map(|(_, id)| id)
    }

    fn received(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.events.len())
            .sum()
    }

    fn has(&self, n: u64) -> bool {
        let log = self.log.lock().unwrap();
        log.iter().any(|s| s.events.iter().any(|g| g.n == n))
    }

    /// Connects (with `last_event_id` when it received an event before)
    /// and waits for `connected`.
    async fn connect(&mut self, node: Node, addr: SocketAddr) {
        assert!(self.reader.is_none(), "{} is connected", self.name);
        let cursor = self.last_event_id();
        let param = if self.role.endpoint() == "diner" {
            "table_token"
        } else {
            "token"
        };
        let mut url = format!(
            "ws://{addr}/ws/{}?{param}={}",
            self.role.endpoint(),
            self.token
        );
        if let Some(c) = &cursor {
            url.push_str(&format!("&last_event_id={c}"));
        }
        let opened = Instant::now();
        let client = tokio::time::timeout(Duration::from_secs(5), Client::open(&url, None))
            .await
            .unwrap_or_else(|_| panic!("{}: no handshake with {node:?} within 5 s", self.name));
        self.log.lock().unwrap().push(Segment {
            node,
            cursor,
            recovered: None,
            opened,
            connected_at: None,
            events: Vec::new(),
            resyncs: Vec::new(),
            oddities: Vec::new(),
            ended: None,
            other_frames: 0,
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(read_frames(client.ws, self.log.clone(), stop.clone()));
        self.reader = Some((stop, task));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            {
                let log = self.log.lock().unwrap();
                let seg = log.last().unwrap();
                if seg.connected_at.is_some() {
                    return;
                }
                if let Some(why) = &seg.ended {
                    panic!(
                        "{}: connection to {node:?} ended before `connected`: {why}",
                        self.name
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}: no `connected` from {node:?} within 5 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn disconnect(&mut self) {
        if let Some((stop, task)) = self.reader.take() {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
            self.left_at = Some(Instant::now());
        }
    }
}

/// The last event with an id that these connections received (the cursor
/// a resume after them sends): its `n` and its id.
fn cursor_of(segments: &[Segment]) -> Option<(u64, String)> {
    segments
        .iter()
        .rev()
        .flat_map(|s| s.events.iter().rev())
        .find_map(|g| g.id.clone().map(|id| (g.n, id)))
}

struct Fault {
    kind: &'static str,
    start: Instant,
    heal: Instant,
    /// When B (or both nodes, for the Redis kill) said healthy again.
    healthy_again: Instant,
}

/// A SIGKILL of Redis and its restart on the same dir.
struct Outage {
    /// Whether the restart loaded the snapshot `SAVE` wrote (else it came
    /// back empty).
    restore: bool,
    /// The kill.
    at: Instant,
    /// The connections open across it: (peer, segment).
    open: Vec<(usize, usize)>,
    /// Until when its `resync` frames may arrive: the driver waited until
    /// every connection open across the restore had one (or 5 s).
    resyncs_until: Instant,
    /// The restore's: the newest number branch 5's history held right
    /// after the restart (`None`: none).
    restored_last: Option<u64>,
}

impl Outage {
    fn kind(&self) -> &'static str {
        if self.restore {
            "restore from the older snapshot"
        } else {
            "empty restart"
        }
    }
}

/// Everything the driver needs, owned by the test body.
struct Run {
    t0: Instant,
    a: TestGateway,
    b: TestGateway,
    peers: Vec<Peer>,
    pubs: Arc<Mutex<Vec<Published>>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    /// A fault of B is in progress: hops go to A.
    b_fault: bool,
    faults: Vec<Fault>,
    hops: Vec<String>,
    hop_count: usize,
    outages: Vec<Outage>,
    /// The `SAVE`: when it was sent and when it was answered.
    save: Option<(Instant, Instant)>,
}

impl Run {
    fn ms(&self, at: Instant) -> String {
        if at >= self.t0 {
            format!("{:.2}s", (at - self.t0).as_secs_f64())
        } else {
            "-".into()
        }
    }

    fn addr(&self, node: Node) -> SocketAddr {
        match node {
            Node::A => self.a.addr,
            Node::B => self.b.addr,
        }
    }

    fn b_looks_healthy(&self) -> bool {
        let samples = self.samples.lock().unwrap();
        samples.last().is_some_and(|s| s.status == "healthy")
    }

    /// Disconnects peer `ix`, lets events pass, and reconnects it with its
    /// cursor.
    async fn hop(&mut self, ix: usize) {
        self.peers[ix].disconnect().await;
        self.hop_count += 1;
        let away = Duration::from_millis(100 + 70 * (self.hop_count as u64 % 4));
        tokio::time::sleep(away).await;
        self.rejoin(ix).await;
    }

    /// Reconnects peer `ix` with its cursor: to B unless a fault of B is in
    /// progress.
    async fn rejoin(&mut self, ix: usize) {
        let target = if !self.b_fault && self.b_looks_healthy() {
            Node::B
        } else {
            Node::A
        };
        let at = Instant::now();
        let away = self.peers[ix].left_at.map_or(Duration::ZERO, |l| at - l);
        let addr = self.addr(target);
        self.peers[ix].connect(target, addr).await;
        let recovered = self.peers[ix].log.lock().unwrap().last().unwrap().recovered;
        let line = format!(
            "{} {} -> {target:?} (away {} ms, recovered {recovered:?})",
            self.ms(at),
            self.peers[ix].name,
            away.as_millis()
        );
        self.hops.push(line);
    }

    async fn rejoin_named(&mut self, name: &str) {
        let ix = self.peer(name);
        self.rejoin(ix).await;
    }

    /// Disconnects `name`, which stays away, holding its cursor, until
    /// `rejoin_named`.
    async fn leave_named(&mut self, name: &str) {
        let ix = self.peer(name);
        self.peers[ix].disconnect().await;
        let line = format!(
            "{} {} leaves, holding {:?}",
            self.ms(Instant::now()),
            name,
            self.peers[ix].last_event_id()
        );
        self.hops.push(line);
    }

    /// Leaves `name` once the last event it received was published after
    /// the `SAVE` was answered: its cursor is not in the snapshot.
    async fn leave_after_save(&mut self, name: &str) {
        let (_, saved) = self.save.expect("the SAVE comes first");
        let ix = self.peer(name);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let cursor = cursor_of(&self.peers[ix].log.lock().unwrap());
            let after = cursor.is_some_and(|(n, _)| {
                let pubs = self.pubs.lock().unwrap();
                pubs.iter().any(|p| p.n == n && p.started > saved)
            });
            if after {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} received no event published after the SAVE within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.leave_named(name).await;
    }

    /// `SAVE`, while the publisher goes on: the snapshot the restore loads.
    fn save(&mut self, server: &RedisServer) {
        let sent = Instant::now();
        let reply: String = tokio::task::block_in_place(|| server.query(&redis::cmd("SAVE")))
            .unwrap_or_else(|e| panic!("SAVE: {e}"));
        assert_eq!(reply, "OK", "SAVE");
        self.save = Some((sent, Instant::now()));
        let line = format!("{} SAVE", self.ms(sent));
        self.hops.push(line);
    }

    fn peer(&self, name: &str) -> usize {
        self.peers.iter().position(|p| p.name == name).unwrap()
    }

    async fn hop_named(&mut self, name: &str) {
        let ix = self.peer(name);
        self.hop(ix).await;
    }

    async fn wait_healthy(&self, node: Node, within: Duration) -> Instant {
        let gw = match node {
            Node::A => &self.a,
            Node::B => &self.b,
        };
        gw.wait_health(within, |s, b| s == 200 && b["status"] == "healthy")
            .await;
        Instant::now()
    }

    /// Black-holes B's path for `dark`, hopping the named peers at the
    /// given offsets meanwhile; heals and waits until B is healthy.
    async fn blackhole(&mut self, proxy: &Proxy, dark: Duration, hops: &[(u64, &str)]) {
        self.b_fault = true;
        let start = Instant::now();
        proxy.blackhole();
        for (at_ms, name) in hops {
            let at = start + Duration::from_millis(*at_ms);
            tokio::time::sleep_until(at.into()).await;
            self.hop_named(name).await;
        }
        tokio::time::sleep_until((start + dark).into()).await;
        proxy.heal();
        let heal = Instant::now();
        let healthy_again = self.wait_healthy(Node::B, Duration::from_secs(10)).await;
        self.b_fault = false;
        self.faults.push(Fault {
            kind: "blackhole",
            start,
            heal,
            healthy_again,
        });
    }

    /// Resets every flow of B's path, hopping the named peers meanwhile.
    async fn close_all(&mut self, proxy: &Proxy, hops: &[&str]) {
        self.b_fault = true;
        let start = Instant::now();
        proxy.close_all();
        for name in hops {
            self.hop_named(name).await;
        }
        let healthy_again = self.wait_healthy(Node::B, Duration::from_secs(10)).await;
        self.b_fault = false;
        self.faults.push(Fault {
            kind: "close_all",
            start,
            heal: start,
            healthy_again,
        });
    }

    /// The peers still missing the last accepted event of their audience.
    fn lagging(&self) -> Vec<String> {
        let pubs = self.pubs.lock().unwrap();
        self.peers
            .iter()
            .filter(|p| p.reader.is_some())
            .filter_map(|p| {
                let last = pubs.iter().rev().find(|e| {
                    matches!(e.outcome, Outcome::Accepted(_)) && p.role.receives(&ITEMS[e.item])
                })?;
                (!p.has(last.n)).then(|| format!("{} (lacks n={})", p.name, last.n))
            })
            .collect()
    }

    /// Pauses the publisher, waits until everyone has everything, kills
    /// Redis, restarts it on its dir (empty, or from the snapshot when
    /// `restore`), waits until both nodes are healthy, resumes, and waits
    /// until every connection open across it got `resync`.
    async fn kill_redis(&mut self, server: &mut RedisServer, ctl: &Control, restore: bool) {
        assert_eq!(
            restore,
            self.save.is_some(),
            "only the restore has a snapshot"
        );
        ctl.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ctl.idle.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the publisher did not pause");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.wait_healthy(Node::A, Duration::from_secs(10)).await;
        self.wait_healthy(Node::B, Duration::from_secs(10)).await;
        let deadline = Instant::now() + Duration::from_secs(8);
        loop {
            let lagging = self.lagging();
            if lagging.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                println!("chaos: before the kill, still lagging after 8 s: {lagging:?}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.b_fault = true;
        let open: Vec<(usize, usize)> = self
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.reader.is_some())
            .map(|(ix, p)| (ix, p.log.lock().unwrap().len() - 1))
            .collect();
        let start = Instant::now();
        tokio::task::block_in_place(|| server.kill());
        tokio::time::sleep(Duration::from_secs(1)).await;
        tokio::task::block_in_place(|| server.restart());
        let heal = Instant::now();
        // What the restored history of branch 5 holds (the publisher is
        // paused, so nothing has been added since the restart).
        let restored_last = if restore {
            let newest: Vec<(String, Vec<(String, String)>)> = tokio::task::block_in_place(|| {
                server.query(
                    redis::cmd("XREVRANGE")
                        .arg("wsgateway:{1}:history:branch:5")
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1),
                )
            })
            .unwrap_or_else(|e| panic!("XREVRANGE after the restore: {e}"));
            newest
                .first()
                .and_then(|(id, _)| id.strip_suffix("-0"))
                .and_then(|n| n.parse().ok())
        } else {
            None
        };
        self.wait_healthy(Node::A, Duration::from_secs(15)).await;
        let healthy_again = self.wait_healthy(Node::B, Duration::from_secs(15)).await;
        self.b_fault = false;
        ctl.idle.store(false, Ordering::SeqCst);
        ctl.pause.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let missing = open.iter().any(|&(ix, seg)| {
                let log = self.peers[ix].log.lock().unwrap();
                !log[seg].resyncs.iter().any(|(at, _)| *at > start)
            });
            if !missing {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.outages.push(Outage {
            restore,
            at: start,
            open,
            resyncs_until: Instant::now(),
            restored_last,
        });
        self.faults.push(Fault {
            kind: if restore {
                "redis restore"
            } else {
                "redis kill+restart"
            },
            start,
            heal,
            healthy_again,
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_under_outages_and_dead_paths_lose_nothing_history_kept() {
    let _heavy = common::heavy().await;
    tokio::time::timeout(BUDGET, scenario())
        .await
        .unwrap_or_else(|_| panic!("the chaos test did not end within {BUDGET:?}"));
}

async fn scenario() {
    let t0 = Instant::now();
    let mut server = RedisServer::start();
    let proxy = Proxy::start(server.port);
    let quick = |c: &mut wsgateway::Config, url: String| {
        c.redis_url = Some(Secret(url));
        c.redis_health_check_s = Secs(Duration::from_millis(200));
        c.redis_timeout_s = Secs(Duration::from_millis(500));
        c.redis_retry_base_s = Secs(Duration::from_millis(50));
        c.redis_retry_max_s = Secs(Duration::from_millis(300));
        c.send_queue_size = 10_000;
    };
    let (url_a, url_b) = (server.url(), proxy.url());
    let a = TestGateway::start_with(|c| quick(c, url_a)).await;
    let b = TestGateway::start_with(|c| quick(c, url_b)).await;
    a.wait_health(Duration::from_secs(10), |s, b| {
        s == 200 && b["status"] == "healthy"
    })
    .await;
    b.wait_health(Duration::from_secs(10), |s, b| {
        s == 200 && b["status"] == "healthy"
    })
    .await;

    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let sampler_stop = CancellationToken::new();
    let sampler = tokio::spawn(sample_health(b.addr, sampler_stop.clone(), samples.clone()));

    let peers = vec![
        Peer::new("admin5.stay@B", Role::Admin(5), 1, false),
        Peer::new("kitchen5.stay@B", Role::Kitchen(5), 2, false),
        Peer::new("waiter5.stay@B", Role::Waiter(5), 3, false),
        Peer::new("admin6.stay@B", Role::Admin(6), 4, false),
        Peer::new("diner77.stay@B", Role::Diner(77), 0, false),
        Peer::new("admin5.hop", Role::Admin(5), 11, true),
        Peer::new("kitchen5.hop", Role::Kitchen(5), 12, true),
        Peer::new("waiter5.hop", Role::Waiter(5), 13, true),
        Peer::new("admin6.hop", Role::Admin(6), 14, true),
        Peer::new("diner77.hop", Role::Diner(77), 0, true),
        Peer::new("admin5.control@A", Role::Admin(5), 21, false),
        Peer::new("diner77.control@A", Role::Diner(77), 0, false),
    ];
    let mut run = Run {
        t0,
        a,
        b,
        peers,
        pubs: Arc::default(),
        samples,
        b_fault: false,
        faults: Vec::new(),
        hops: Vec::new(),
        hop_count: 0,
        outages: Vec::new(),
        save: None,
    };
    for ix in 0..run.peers.len() {
        let node = if run.peers[ix].name.ends_with("@A") {
            Node::A
        } else {
            Node::B
        };
        let addr = run.addr(node);
        run.peers[ix].connect(node, addr).await;
    }

    let ctl = Arc::new(Control::default());
    let publisher = tokio::spawn(publish_loop(
        run.a.addr,
        server.url(),
        ctl.clone(),
        run.pubs.clone(),
    ));

    // The fault driver, with hops in between and during faults.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    run.hop_named("admin5.hop").await;
    run.hop_named("diner77.hop").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    run.blackhole(
        &proxy,
        Duration::from_secs(4),
        &[(1000, "kitchen5.hop"), (2000, "admin6.hop")],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    run.hop_named("kitchen5.hop").await;
    run.hop_named("admin6.hop").await;
    run.hop_named("waiter5.hop").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    run.close_all(&proxy, &["admin5.hop"]).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    run.hop_named("diner77.hop").await;
    run.hop_named("admin5.hop").await;
    run.blackhole(
        &proxy,
        Duration::from_millis(3500),
        &[(200, "waiter5.hop"), (2000, "diner77.hop")],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    run.hop_named("waiter5.hop").await;
    run.hop_named("diner77.hop").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // waiter5 stays away across the empty restart.
    run.leave_named("waiter5.hop").await;
    run.kill_redis(&mut server, &ctl, false).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    run.rejoin_named("waiter5.hop").await;
    run.hop_named("admin5.hop").await;
    // The snapshot, taken while publishing goes on; kitchen5 leaves before
    // it, diner77 after it (holding an event the snapshot lacks).
    run.leave_named("kitchen5.hop").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    run.save(&server);
    run.leave_after_save("diner77.hop").await;
    run.blackhole(&proxy, Duration::from_secs(3), &[(1000, "admin6.hop")])
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.hop_named("admin6.hop").await;
    run.hop_named("waiter5.hop").await;
    // Redis restarts from the snapshot while kitchen5 and diner77 are away.
    run.kill_redis(&mut server, &ctl, true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    run.rejoin_named("kitchen5.hop").await;
    run.rejoin_named("diner77.hop").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.hop_named("admin5.hop").await;
    run.hop_named("kitchen5.hop").await;
    run.hop_named("admin6.hop").await;
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Faults over: stop publishing, wait until B is healthy and quiet.
    ctl.stop.store(true, Ordering::SeqCst);
    publisher.await.unwrap();
    run.wait_healthy(Node::B, Duration::from_secs(10)).await;
    run.wait_healthy(Node::A, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = usize::MAX;
    let mut still_since = Instant::now();
    loop {
        let total: usize = run.peers.iter().map(Peer::received).sum();
        if total != last {
            last = total;
            still_since = Instant::now();
        } else if still_since.elapsed() >= Duration::from_secs(1) && run.lagging().is_empty() {
            break;
        }
        if Instant::now() > deadline {
            println!("chaos: not quiet after 10 s; lagging: {:?}", run.lagging());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in &mut run.peers {
        p.disconnect().await;
    }
    sampler_stop.cancel();
    let _ = sampler.await;

    let failures = evaluate(&run);
    summarize(&run);
    if !failures.is_empty() {
        panic!(
            "chaos: {} failure(s):\n- {}",
            failures.len(),
            failures.join("\n- ")
        );
    }
    let Run { a, b, .. } = run;
    a.stop().await;
    b.stop().await;
    drop(proxy);
    drop(server);
}

/// B's health samples within ±1.5 s of `at`.
fn samples_around(run: &Run, at: Instant) -> String {
    let samples = run.samples.lock().unwrap();
    let lo = at.checked_sub(Duration::from_millis(1500)).unwrap_or(at);
    let hi = at + Duration::from_millis(1500);
    samples
        .iter()
        .filter(|s| s.at >= lo && s.at <= hi)
        .map(|s| format!("{} {} {}/{}", run.ms(s.at), s.http, s.status, s.broker))
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_segments(run: &Run, log: &[Segment]) -> String {
    log.iter()
        .map(|s| {
            format!(
                "[{:?} opened {} connected {} cursor {:?} recovered {:?}: {} events n {:?}..{:?}{}]",
                s.node,
                run.ms(s.opened),
                s.connected_at.map_or("-".into(), |t| run.ms(t)),
                s.cursor,
                s.recovered,
                s.events.len(),
                s.events.first().map(|g| g.n),
                s.events.last().map(|g| g.n),
                s.ended
                    .as_ref()
                    .map_or(String::new(), |e| format!(" ENDED: {e}")),
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks every rule of the module comment; returns what broke.
fn evaluate(run: &Run) -> Vec<String> {
    let mut failures = Vec::new();
    let pubs = run.pubs.lock().unwrap();
    let by_n: HashMap<u64, &Published> = pubs.iter().map(|p| (p.n, p)).collect();
    for p in pubs.iter() {
        if let Outcome::Unexpected(why) = &p.outcome {
            failures.push(format!("publish of n={} via {}: {why}", p.n, p.via));
        }
    }

    // Health: never healthy from a black-hole's start + 3 s until its heal.
    {
        let samples = run.samples.lock().unwrap();
        for f in run.faults.iter().filter(|f| f.kind == "blackhole") {
            let from = f.start + DETECTION_BOUND;
            let window: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.at >= from && s.at <= f.heal)
                .collect();
            if f.heal > from + Duration::from_millis(400) && window.is_empty() {
                failures.push(format!(
                    "no health sample of B between {} and {}",
                    run.ms(from),
                    run.ms(f.heal)
                ));
            }
            for s in window.iter().filter(|s| s.status == "healthy") {
                failures.push(format!(
                    "B said healthy at {} ({:?} after its path was black-holed at {}, before the heal at {}); samples: {}",
                    run.ms(s.at),
                    s.at - f.start,
                    run.ms(f.start),
                    run.ms(f.heal),
                    samples_around(run, s.at)
                ));
            }
        }
    }

    failures.extend(check_numbers(&pubs));
    failures.extend(check_restore(run, &pubs));

    for (ix, peer) in run.peers.iter().enumerate() {
        let log = peer.log.lock().unwrap();
        let name = peer.name;
        let context = |n: u64| {
            let at = by_n.get(&n).map_or(run.t0, |p| p.started);
            format!(
                "\n    n={n} published at {}; {name}'s connections: {}\n    B's health around: {}",
                run.ms(at),
                describe_segments(run, &log),
                samples_around(run, at)
            )
        };
        // Frame-level checks.
        for (seg, s) in log.iter().enumerate() {
            if let Some(why) = &s.ended {
                failures.push(format!(
                    "{name}: its connection to {:?} ended by the server: {why}",
                    s.node
                ));
            }
            for odd in &s.oddities {
                failures.push(format!("{name}: {odd}"));
            }
            // A `resync` is expected on each connection open across a
            // Redis restart (within its window), and nowhere else.
            let across: Vec<&Outage> = run
                .outages
                .iter()
                .filter(|o| o.open.contains(&(ix, seg)))
                .collect();
            for (at, frame) in &s.resyncs {
                let expected = across.iter().any(|o| {
                    *at > o.at && *at <= o.resyncs_until && frame["reason"] == "history_unavailable"
                });
                if !expected {
                    failures.push(format!(
                        "{name}: got {frame} at {} on {:?}: history should have covered this gap; B's health around: {}",
                        run.ms(*at),
                        s.node,
                        samples_around(run, *at)
                    ));
                }
            }
            for o in across
                .iter()
                .filter(|o| !s.resyncs.iter().any(|(at, _)| *at > o.at))
            {
                failures.push(format!(
                    "{name}: its connection to {:?}, open across the Redis restart at {}, got no `resync` (its node's subscription had a gap across the reload)",
                    s.node,
                    run.ms(o.at)
                ));
            }
            if s.cursor.is_some() && s.recovered.is_none() {
                failures.push(format!(
                    "{name}: resumed on {:?} at {} without a `recovered` field",
                    s.node,
                    run.ms(s.opened)
                ));
            }
            // A cursor from before a Redis kill, resumed after it, must not
            // be recovered; every other cursor must.
            let cursor_at = cursor_of(&log[..seg])
                .and_then(|(n, _)| by_n.get(&n))
                .map(|p| p.started);
            let crossed = run
                .outages
                .iter()
                .find(|o| cursor_at.is_some_and(|at| at < o.at) && s.opened > o.at);
            match (s.cursor.is_some(), s.recovered, crossed) {
                (true, Some(false), None) => failures.push(format!(
                    "{name}: `recovered: false` on {:?} at {} with cursor {:?} (history should know it); B's health around: {}",
                    s.node,
                    run.ms(s.opened),
                    s.cursor,
                    samples_around(run, s.opened)
                )),
                (true, Some(true), Some(o)) => failures.push(format!(
                    "{name}: `recovered: true` on {:?} at {} with cursor {:?}, published at {} before the Redis {} at {}: events after it were lost with Redis's data",
                    s.node,
                    run.ms(s.opened),
                    s.cursor,
                    cursor_at.map_or("-".into(), |at| run.ms(at)),
                    o.kind(),
                    run.ms(o.at)
                )),
                _ => {}
            }
            for g in &s.events {
                match by_n.get(&g.n) {
                    None => failures.push(format!("{name}: got n={} never published", g.n)),
                    Some(p) => {
                        if let Outcome::Rejected(why) = &p.outcome {
                            failures.push(format!(
                                "{name}: got n={} whose publish was refused ({why}) at {}",
                                g.n,
                                run.ms(g.at)
                            ));
                        } else if !peer.role.receives(&ITEMS[p.item]) {
                            failures.push(format!(
                                "{name}: got n={} on {:?}, outside its audience",
                                g.n, ITEMS[p.item].channels
                            ));
                        } else if let Outcome::Accepted(id) = &p.outcome
                            && g.id.as_deref() != Some(id.as_str())
                        {
                            failures.push(format!(
                                "{name}: n={} carries event_id {:?}, published as {id:?}",
                                g.n, g.id
                            ));
                        }
                    }
                }
            }
        }

        // Sequence checks, per chain.
        let audience: Vec<&Published> = pubs
            .iter()
            .filter(|p| p.counts() && peer.role.receives(&ITEMS[p.item]))
            .collect();
        let unknown: HashSet<u64> = audience
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::Unknown(_)))
            .map(|p| p.n)
            .collect();
        let exact: Vec<u64> = audience
            .iter()
            .map(|p| p.n)
            .filter(|n| !unknown.contains(n))
            .collect();
        let mut chains: Vec<(Instant, Vec<u64>)> = Vec::new();
        for s in log.iter() {
            let fresh = s.cursor.is_none() || s.recovered != Some(true);
            if fresh || chains.is_empty() {
                chains.push((s.connected_at.unwrap_or(s.opened), Vec::new()));
            }
            chains
                .last_mut()
                .unwrap()
                .1
                .extend(s.events.iter().map(|g| g.n));
        }
        let count = chains.len();
        for (i, (start, got)) in chains.iter().enumerate() {
            let last_chain = i + 1 == count;
            let mut seen_unknown: HashMap<u64, usize> = HashMap::new();
            for n in got.iter().filter(|n| unknown.contains(n)) {
                *seen_unknown.entry(*n).or_default() += 1;
            }
            for (n, times) in seen_unknown.iter().filter(|(_, t)| **t > 1) {
                failures.push(format!(
                    "{name}: n={n} (outcome unknown) delivered {times} times{}",
                    context(*n)
                ));
            }
            let got: Vec<u64> = got
                .iter()
                .copied()
                .filter(|n| !unknown.contains(n) && exact.contains(n))
                .collect();
            // Events published after the chain's `connected` must all come.
            let must_from = exact
                .iter()
                .position(|n| by_n[n].started > *start)
                .unwrap_or(exact.len());
            let first = got
                .first()
                .and_then(|n| exact.iter().position(|x| x == n))
                .unwrap_or(must_from);
            let from = first.min(must_from);
            let expected: &[u64] = if last_chain {
                &exact[from..]
            } else {
                &exact[from..(from + got.len()).min(exact.len())]
            };
            if got.as_slice() == expected {
                continue;
            }
            let got_set: HashSet<u64> = got.iter().copied().collect();
            let missing: Vec<u64> = expected
                .iter()
                .copied()
                .filter(|n| !got_set.contains(n))
                .collect();
            let mut counts: HashMap<u64, usize> = HashMap::new();
            for n in &got {
                *counts.entry(*n).or_default() += 1;
            }
            let mut dups: Vec<u64> = counts
                .iter()
                .filter(|(_, c)| **c > 1)
                .map(|(n, _)| *n)
                .collect();
            dups.sort_unstable();
            let disorder: Vec<(u64, u64)> = got
                .windows(2)
                .filter(|w| w[0] >= w[1])
                .map(|w| (w[0], w[1]))
                .take(5)
                .collect();
            let focus = missing
                .first()
                .or(dups.first())
                .copied()
                .or(disorder.first().map(|d| d.1))
                .unwrap_or(0);
            failures.push(format!(
                "{name}, chain {} of {count} (from {}): expected {} events, got {}; missing {missing:?}; duplicated {dups:?}; out of order (prev, next) {disorder:?}{}",
                i + 1,
                run.ms(*start),
                expected.len(),
                got.len(),
                context(focus)
            ));
        }
    }
    failures
}

/// Every id accepted is a number above every id accepted before it (the
/// publisher sends one event at a time): no number is given twice, not
/// even by a counter restored from an older snapshot.
fn check_numbers(pubs: &[Published]) -> Vec<String> {
    let mut failures = Vec::new();
    let mut last: Option<(u64, &Published)> = None;
    for p in pubs {
        let Outcome::Accepted(id) = &p.outcome else {
            continue;
        };
        let Ok(number) = id.parse::<u64>() else {
            failures.push(format!("n={} was published as {id:?}, not a number", p.n));
            continue;
        };
        if let Some((before, q)) = last
            && number <= before
        {
            failures.push(format!(
                "n={} was published as {number}, not above n={}'s {before}: a number given again",
                p.n, q.n
            ));
        }
        last = Some((number, p));
    }
    failures
}

/// That the restore did what the test says: the restart loaded an older
/// snapshot (history lacks events accepted before the kill), and clients
/// resumed after it with cursors from before the `SAVE` and from after it.
fn check_restore(run: &Run, pubs: &[Published]) -> Vec<String> {
    let mut failures = Vec::new();
    let (Some((save_sent, saved)), Some(restore)) =
        (run.save, run.outages.iter().find(|o| o.restore))
    else {
        return vec!["no SAVE and restore took place".into()];
    };
    let branch5 = |p: &&Published| {
        ITEMS[p.item]
            .channels
            .iter()
            .any(|c| c.starts_with("channel:branch:5:"))
    };
    let newest_before_kill = pubs
        .iter()
        .filter(|p| p.started < restore.at)
        .filter(branch5)
        .filter_map(|p| match &p.outcome {
            Outcome::Accepted(id) => id.parse::<u64>().ok(),
            _ => None,
        })
        .max();
    let lost = restore
        .restored_last
        .zip(newest_before_kill)
        .is_some_and(|(kept, newest)| kept < newest);
    if !lost {
        failures.push(format!(
            "the restart did not load an older snapshot: branch 5's history ends at {:?} after it, the last event accepted before the kill was {newest_before_kill:?}",
            restore.restored_last
        ));
    }
    let by_n: HashMap<u64, &Published> = pubs.iter().map(|p| (p.n, p)).collect();
    let (mut before_save, mut after_save) = (0, 0);
    for peer in &run.peers {
        let log = peer.log.lock().unwrap();
        for (seg, s) in log.iter().enumerate() {
            if s.opened < restore.at {
                continue;
            }
            let Some(at) = cursor_of(&log[..seg])
                .and_then(|(n, _)| by_n.get(&n))
                .map(|p| p.started)
            else {
                continue;
            };
            if at < save_sent {
                before_save += 1;
            } else if at > saved && at < restore.at {
                after_save += 1;
            }
        }
    }
    if before_save == 0 || after_save == 0 {
        failures.push(format!(
            "resumes after the restore with a cursor from before the SAVE: {before_save}, from after it: {after_save} (the test needs both)"
        ));
    }
    failures
}

fn summarize(run: &Run) {
    let pubs = run.pubs.lock().unwrap();
    let count = |f: &dyn Fn(&Published) -> bool| pubs.iter().filter(|p| f(p)).count();
    println!(
        "chaos: published {} events in {:.1}s: accepted {} (api {}, fcall {}), refused {}, unknown {}, unexpected {}",
        pubs.len(),
        run.t0.elapsed().as_secs_f64(),
        count(&|p| matches!(p.outcome, Outcome::Accepted(_))),
        count(&|p| matches!(p.outcome, Outcome::Accepted(_)) && p.via == "api"),
        count(&|p| matches!(p.outcome, Outcome::Accepted(_)) && p.via == "fcall"),
        count(&|p| matches!(p.outcome, Outcome::Rejected(_))),
        count(&|p| matches!(p.outcome, Outcome::Unknown(_))),
        count(&|p| matches!(p.outcome, Outcome::Unexpected(_))),
    );
    for p in pubs.iter() {
        if let Outcome::Rejected(why) | Outcome::Unknown(why) = &p.outcome {
            println!("chaos:   n={} via {}: {why}", p.n, p.via);
        }
    }
    drop(pubs);
    for peer in &run.peers {
        let log = peer.log.lock().unwrap();
        let path: Vec<String> = log
            .iter()
            .map(|s| match s.recovered {
                None => format!("{:?}", s.node),
                Some(true) => format!("{:?}(resumed)", s.node),
                Some(false) => format!("{:?}(NOT recovered)", s.node),
            })
            .collect();
        let total: usize = log.iter().map(|s| s.events.len()).sum();
        println!(
            "chaos: {:<18} delivered {total:>4} events over {} connection(s): {}",
            peer.name,
            log.len(),
            path.join(" -> ")
        );
    }
    let samples = run.samples.lock().unwrap();
    for f in &run.faults {
        let detected = samples
            .iter()
            .find(|s| s.at >= f.start && s.status != "healthy")
            .map(|s| s.at - f.start);
        println!(
            "chaos: fault {:<18} at {}: lasted {:?}, B first not healthy after {:?}, healthy again {:?} after the heal",
            f.kind,
            run.ms(f.start),
            f.heal - f.start,
            detected,
            f.healthy_again - f.heal
        );
    }
    for o in &run.outages {
        let resynced: usize = o
            .open
            .iter()
            .filter(|&&(ix, seg)| {
                run.peers[ix].log.lock().unwrap()[seg]
                    .resyncs
                    .iter()
                    .any(|(at, _)| *at > o.at && *at <= o.resyncs_until)
            })
            .count();
        println!(
            "chaos: redis {} at {}: {} connection(s) open across it, {resynced} told to resync; branch 5's history restored up to {:?}",
            o.kind(),
            run.ms(o.at),
            o.open.len(),
            o.restored_last
        );
    }
    println!(
        "chaos: {} driver steps (hops, leaves, rejoins, the SAVE; {} hopping clients), {} health samples of B",
        run.hops.len(),
        run.peers.iter().filter(|p| p.hops).count(),
        samples.len()
    );
    for h in &run.hops {
        println!("chaos:   {h}");
    }
}
