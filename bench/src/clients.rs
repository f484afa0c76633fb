//! The client fleet: authenticated WebSocket connections that count what
//! they receive, and check that it was theirs to receive.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use wsgateway::auth::{StaffClaims, TableClaims, mint, unix_now};

use super::gateway::Target;
use super::{BenchArgs, Plan, Scenario};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Waiter,
    Admin,
    Kitchen,
    Diner,
}

impl Role {
    fn endpoint(self) -> &'static str {
        match self {
            Role::Waiter => "waiter",
            Role::Admin => "admin",
            Role::Kitchen => "kitchen",
            Role::Diner => "diner",
        }
    }

    /// Whether events on `channel:branch:{b}:waiters` are for this role.
    fn hears_waiter_events(self) -> bool {
        matches!(self, Role::Waiter | Role::Admin)
    }

    /// Whether events on `channel:branch:{b}:kitchen` are for this role.
    fn hears_kitchen_events(self) -> bool {
        matches!(self, Role::Kitchen | Role::Admin)
    }

    /// Whether a bench event of type `kind` is for this role: the bench
    /// publishes [`KITCHEN_EVENT`] on kitchen channels only, every other
    /// type on waiters channels.
    fn hears(self, kind: &str) -> bool {
        if kind == KITCHEN_EVENT {
            self.hears_kitchen_events()
        } else {
            self.hears_waiter_events()
        }
    }
}

/// The type of the bench's events on `channel:branch:{b}:kitchen` (a
/// kitchen ticket); its other events go to waiters channels.
pub const KITCHEN_EVENT: &str = "ROUND_SUBMITTED";

#[derive(Debug, Clone, Copy)]
pub struct Member {
    pub tenant: i64,
    pub branch: i64,
    pub role: Role,
}

impl Member {
    /// The URL member `i` connects to, with a token of its own: a table
    /// token for a diner, a staff JWT with its role otherwise.
    fn url(self, i: usize, server: SocketAddr, args: &BenchArgs, exp: u64) -> String {
        let token = match self.role {
            Role::Diner => mint(
                &args.table_token_secret,
                &TableClaims {
                    tenant_id: self.tenant,
                    branch_id: self.branch,
                    table_id: i as i64,
                    session_id: i as i64,
                    exp,
                },
            ),
            role => mint(
                &args.jwt_secret,
                &StaffClaims {
                    sub: i as i64 + 1,
                    tenant_id: self.tenant,
                    branch_ids: vec![self.branch],
                    roles: vec![match role {
                        Role::Admin => "ADMIN".into(),
                        Role::Kitchen => "KITCHEN".into(),
                        _ => "WAITER".into(),
                    }],
                    exp,
                    iat: None,
                    jti: None,
                },
            ),
        };
        let param = if self.role == Role::Diner {
            "table_token"
        } else {
            "token"
        };
        format!("ws://{server}/ws/{}?{param}={token}", self.role.endpoint())
    }
}

/// The address client `i` connects from: the `--client-addresses`
/// loopback addresses from 127.0.0.1 up, in turn (each has ports of its
/// own).
pub(super) fn client_address(i: usize, args: &BenchArgs) -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        0,
        0,
        1 + (i % args.client_addresses.max(1) as usize) as u8,
    )
}

/// Who connects: spread evenly over tenants × branches.
pub struct Population {
    pub members: Vec<Member>,
    pub pairs: Vec<(i64, i64)>,
    /// Member `i` is user (and table session) `id_base + i + 1`: fleets
    /// of one run on several gateways keep their users apart.
    pub id_base: usize,
}

impl Population {
    pub fn plan(plan: &Plan, _args: &BenchArgs) -> Population {
        let pairs: Vec<(i64, i64)> = (0..plan.tenants as i64)
            .flat_map(|t| (0..plan.branches as i64).map(move |b| (t + 1, b + 1)))
            .collect();
        let members = (0..plan.connections)
            .map(|i| {
                let (tenant, branch) = pairs[i % pairs.len()];
                let role = if plan.scenario == Scenario::Idle {
                    [Role::Waiter, Role::Kitchen, Role::Admin, Role::Diner][i % 4]
                } else if (i as f64) < plan.admin_share * plan.connections as f64 {
                    Role::Admin
                } else if plan.scenario == Scenario::Acks {
                    Role::Kitchen
                } else {
                    Role::Waiter
                };
                Member {
                    tenant,
                    branch,
                    role,
                }
            })
            .collect();
        Population {
            members,
            pairs,
            id_base: 0,
        }
    }

    /// How many connections an event on the waiters channel of (tenant,
    /// branch) should reach.
    pub fn audience(&self, tenant: i64, branch: i64) -> u64 {
        self.members
            .iter()
            .filter(|m| m.tenant == tenant && m.branch == branch && m.role.hears_waiter_events())
            .count() as u64
    }

    /// How many connections an event on the kitchen channel of (tenant,
    /// branch) should reach.
    pub fn kitchen_audience(&self, tenant: i64, branch: i64) -> u64 {
        self.members
            .iter()
            .filter(|m| m.tenant == tenant && m.branch == branch && m.role.hears_kitchen_events())
            .count() as u64
    }
}

/// Whether and how clients acknowledge the events that ask for it
/// (PROTOCOL.md §15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acking {
    /// They never do.
    Never,
    /// One `ack` message per event, as soon as it arrives.
    Each,
    /// Every [`ACK_EVERY`], one `ack` message per [`ACK_IDS`] ids received
    /// since the last.
    Batched,
}

/// How often a [`Acking::Batched`] client sends its acks.
pub const ACK_EVERY: Duration = Duration::from_millis(50);
/// The most ids in one of its `ack` messages.
pub const ACK_IDS: usize = 20;

/// What one client saw.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub delivered: u64,
    pub misrouted: u64,
    pub latencies_us: Vec<u32>,
    /// The event (its `seq`) of each latency, for the per-event figures.
    pub events: Vec<u32>,
    /// Bytes of the delivered frames' text (for the floor's frame size).
    pub frame_bytes: u64,
    pub first_us: u64,
    pub last_us: u64,
    pub closed_by_server: bool,
    /// Frames with `"redelivered":true` (not counted in `delivered`).
    pub redelivered: u64,
    /// `ack` messages sent, and the ids they carried.
    pub ack_messages: u64,
    pub ack_ids: u64,
    /// Sends of an `ack` that failed.
    pub ack_errors: u64,
    /// `EVENT_UNACKNOWLEDGED` escalations received (admins only).
    pub escalations: u64,
}

pub struct Fleet {
    tasks: Vec<JoinHandle<ClientStats>>,
    stop: CancellationToken,
    counts: Arc<Counts>,
    pub opened: usize,
    pub failed: usize,
}

/// What the whole fleet has seen and sent so far.
#[derive(Debug, Default)]
struct Counts {
    delivered: AtomicU64,
    ack_ids: AtomicU64,
    closed: AtomicU64,
}

/// What a client reads of each event (the floor's WebSocket readers too).
#[derive(Deserialize)]
pub(super) struct Frame<'a> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[serde(default)]
    pub tenant_id: i64,
    #[serde(default)]
    pub branch_id: i64,
    #[serde(default)]
    pub sent_us: u64,
    #[serde(default)]
    pub seq: u32,
    #[serde(default, borrow)]
    pub event_id: Option<&'a str>,
    /// Present when the event asks to be acknowledged.
    #[serde(default)]
    pub ack: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub redelivered: bool,
}

/// A client's WebSocket settings: small buffers, as a fleet of 20 000
/// needs.
pub(super) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// From `sent_us` to `now_us`, in µs, as the reports keep it.
pub fn latency_us(now_us: u64, sent_us: u64) -> u32 {
    now_us.saturating_sub(sent_us).min(u32::MAX as u64) as u32
}

impl Fleet {
    /// Opens every connection (bounded concurrency) and returns once each
    /// has been admitted or has failed.
    pub async fn connect(
        target: &Target,
        population: &Population,
        args: &BenchArgs,
    ) -> anyhow::Result<Fleet> {
        Fleet::connect_acking(target, population, args, Acking::Never).await
    }

    /// [`connect`](Self::connect), with clients that acknowledge the
    /// events asking for it as `acking` says.
    pub async fn connect_acking(
        target: &Target,
        population: &Population,
        args: &BenchArgs,
        acking: Acking,
    ) -> anyhow::Result<Fleet> {
        let stop = CancellationToken::new();
        let counts = Arc::new(Counts::default());
        let ready = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
        let exp = unix_now() + 24 * 3600;
        let mut tasks = Vec::with_capacity(population.members.len());
        for (i, member) in population.members.iter().copied().enumerate() {
            let url = member.url(population.id_base + i, target.addr, args, exp);
            let local = client_address(i, args);
            let (gate, stop, counts, ready, failed) = (
                gate.clone(),
                stop.clone(),
                counts.clone(),
                ready.clone(),
                failed.clone(),
            );
            let server = target.addr;
            tasks.push(tokio::spawn(async move {
                let permit = gate.acquire_owned().await.expect("never closed");
                let ws = match open(server, local, &url).await {
                    Ok(ws) => ws,
                    Err(e) => {
                        if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("bench: connection failed: {e:#}");
                        }
                        return ClientStats::default();
                    }
                };
                drop(permit);
                ready.fetch_add(1, Ordering::Relaxed);
                read(ws, member, stop, counts, acking).await
            }));
        }
        let total = population.members.len();
        let deadline = Instant::now() + Duration::from_secs(300);
        while ready.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < total {
            if Instant::now() > deadline {
                anyhow::bail!("connections not done after 300 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Fleet {
            tasks,
            stop,
            counts,
            opened: ready.load(Ordering::Relaxed),
            failed: failed.load(Ordering::Relaxed),
        })
    }

    /// Waits until `expected` deliveries arrived, or none for `quiet`.
    pub async fn wait_for(&self, expected: u64, quiet: Duration) {
        let mut last = 0;
        let mut since = Instant::now();
        loop {
            let now = self.counts.delivered.load(Ordering::Relaxed);
            if now >= expected {
                return;
            }
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() > quiet {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Deliveries so far (redeliveries not counted).
    pub fn delivered(&self) -> u64 {
        self.counts.delivered.load(Ordering::Relaxed)
    }

    /// Clients whose connection the gateway closed (so far).
    pub fn closed_by_server(&self) -> u64 {
        self.counts.closed.load(Ordering::Relaxed)
    }

    /// Ids acked so far.
    pub fn acked(&self) -> u64 {
        self.counts.ack_ids.load(Ordering::Relaxed)
    }

    /// Stops every client and returns what each saw, in the population's
    /// order (a client whose task failed saw nothing).
    pub async fn finish_each(&mut self) -> Vec<ClientStats> {
        self.stop.cancel();
        let mut each = Vec::with_capacity(self.tasks.len());
        for task in self.tasks.drain(..) {
            each.push(task.await.unwrap_or_default());
        }
        each
    }

    /// Stops every client and merges what they saw.
    pub async fn finish(&mut self) -> ClientStats {
        let mut all = ClientStats {
            first_us: u64::MAX,
            ..Default::default()
        };
        let mut closed = 0;
        for s in self.finish_each().await {
            all.delivered += s.delivered;
            all.misrouted += s.misrouted;
            all.frame_bytes += s.frame_bytes;
            all.latencies_us.extend(s.latencies_us);
            all.events.extend(s.events);
            all.redelivered += s.redelivered;
            all.ack_messages += s.ack_messages;
            all.ack_ids += s.ack_ids;
            all.ack_errors += s.ack_errors;
            all.escalations += s.escalations;
            if s.delivered > 0 {
                all.first_us = all.first_us.min(s.first_us);
                all.last_us = all.last_us.max(s.last_us);
            }
            closed += s.closed_by_server as usize;
        }
        all.closed_by_server = closed > 0;
        if closed > 0 {
            eprintln!("bench: {closed} connections were closed by the gateway");
        }
        all
    }
}

pub(super) type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn open(server: SocketAddr, local: Ipv4Addr, url: &str) -> anyhow::Result<Ws> {
    Ok(handshake(server, local, url).await?.0)
}

/// Connects from `local` and returns the socket once `connected` came, with
/// that frame's text.
pub(super) async fn handshake(
    server: SocketAddr,
    local: Ipv4Addr,
    url: &str,
) -> anyhow::Result<(Ws, String)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local.into(), 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())).await?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str().contains("\"connected\"") => {
            Ok((ws, t.as_str().to_owned()))
        }
        other => anyhow::bail!("no connected message: {other:?}"),
    }
}

async fn read(
    mut ws: Ws,
    me: Member,
    stop: CancellationToken,
    counts: Arc<Counts>,
    acking: Acking,
) -> ClientStats {
    let mut stats = ClientStats::default();
    // One stop future for the connection's life, not one per message: the
    // fleet shares the gateway's cores, so its own cost shows in latency.
    tokio::select! {
        _ = stop.cancelled() => {}
        () = read_all(&mut ws, me, &counts, acking, &mut stats) => {
            stats.closed_by_server = !stop.is_cancelled();
            counts.closed.fetch_add(u64::from(stats.closed_by_server), Ordering::Relaxed);
        }
    }
    stats
}

/// An `ack` message for `ids`.
fn ack_message(ids: &[String]) -> Message {
    Message::text(serde_json::json!({"type": "ack", "event_ids": ids}).to_string())
}

/// Sends an `ack` for `ids` and counts it.
async fn send_ack(ws: &mut Ws, ids: &[String], counts: &Counts, stats: &mut ClientStats) {
    if ws.send(ack_message(ids)).await.is_ok() {
        stats.ack_messages += 1;
        stats.ack_ids += ids.len() as u64;
        counts
            .ack_ids
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
    } else {
        stats.ack_errors += 1;
    }
}

/// Counts what arrives until the gateway closes the connection, and acks
/// what asks for it as `acking` says.
async fn read_all(
    ws: &mut Ws,
    me: Member,
    counts: &Counts,
    acking: Acking,
    stats: &mut ClientStats,
) {
    // Batched: the ids received since the last flush.
    let mut pending: Vec<String> = Vec::new();
    let mut flush = tokio::time::interval(ACK_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = if acking == Acking::Batched {
            tokio::select! {
                message = ws.next() => message,
                _ = flush.tick() => {
                    let ids = std::mem::take(&mut pending);
                    for chunk in ids.chunks(ACK_IDS) {
                        send_ack(ws, chunk, counts, stats).await;
                    }
                    continue;
                }
            }
        } else {
            ws.next().await
        };
        match message {
            Some(Ok(Message::Text(text))) => {
                let now = now_us();
                let Ok(frame) = serde_json::from_str::<Frame>(text.as_str()) else {
                    continue;
                };
                if frame.kind == "connected" {
                    continue;
                }
                if frame.kind == "EVENT_UNACKNOWLEDGED" {
                    // The gateway's escalation, to a branch's admins.
                    stats.escalations += 1;
                    continue;
                }
                let mine = frame.tenant_id == me.tenant
                    && frame.branch_id == me.branch
                    && me.role.hears(frame.kind);
                if !mine {
                    stats.misrouted += 1;
                    continue;
                }
                let ack = match (acking, frame.ack.is_some(), frame.event_id) {
                    (Acking::Never, ..) | (_, false, _) | (_, _, None) => None,
                    (_, true, Some(id)) => Some(id.to_owned()),
                };
                if frame.redelivered {
                    // Counted apart: `delivered` is each event once.
                    stats.redelivered += 1;
                } else {
                    stats.delivered += 1;
                    stats.frame_bytes += text.len() as u64;
                    counts.delivered.fetch_add(1, Ordering::Relaxed);
                    if frame.sent_us > 0 {
                        stats.latencies_us.push(latency_us(now, frame.sent_us));
                        stats.events.push(frame.seq);
                    }
                    if stats.first_us == 0 {
                        stats.first_us = now;
                    }
                    stats.last_us = now;
                }
                match (acking, ack) {
                    (Acking::Each, Some(id)) => send_ack(ws, &[id], counts, stats).await,
                    (Acking::Batched, Some(id)) => pending.push(id),
                    _ => {}
                }
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
            Some(Ok(_)) => {}
        }
    }
}
