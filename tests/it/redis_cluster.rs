//! Redis Cluster: a real cluster (`common/cluster.rs`) of 3 primaries, each
//! with a replica, started by the test on loopback. The harness's own test
//! kills a primary and moves a slot without any gateway; the gateway tests
//! run `wsgateway serve` processes with `WSGATEWAY_REDIS_MODE=cluster` and
//! check routing across nodes and tenants on different shards, resume from
//! one node on another, a primary's failover and a resharding under a
//! steady stream of events, and a backend's `FCALL` and plain `PUBLISH`.
//!
//! The cluster helpers block (sync Redis connections, `redis-cli`), so
//! these tests run on a multi-threaded runtime and call them inside
//! `block_in_place`.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::RedisCluster;
use common::table::*;
use common::*;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// Blocks on the cluster without stalling the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_starts_a_cluster_fails_a_primary_over_and_moves_a_slot() {
    let _heavy = common::heavy().await;
    blocking(|| {
        let started = Instant::now();
        let mut cluster = RedisCluster::start(3, 1);
        let start_took = started.elapsed();
        assert_eq!(cluster.nodes.len(), 6);
        let primaries = cluster.primaries();
        assert_eq!(primaries.len(), 3, "{}", cluster.describe());
        for &p in &primaries {
            assert_eq!(cluster.replicas_of(p).len(), 1, "{}", cluster.describe());
        }
        assert_eq!(cluster.seeds().split(',').count(), 6);
        assert!(cluster.seeds().starts_with("redis://127.0.0.1:"));

        // A tenant's keys and scope channels share one slot.
        let slot = cluster.slot_of_tenant(1);
        assert_eq!(cluster.slot_of("wsgateway:{1}:history:branch:5"), slot);
        assert_eq!(cluster.slot_of("wsgateway:events:{1}:staff"), slot);
        assert_ne!(cluster.slot_of_tenant(3), slot);

        // 250 strings and a stream in that slot, on its primary.
        let owner = cluster.primary_of_slot(slot);
        let mut conn = cluster.nodes[owner]
            .client()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
        let mut pipe = redis::pipe();
        for n in 0..250 {
            pipe.set(format!("wsgateway:{{1}}:k{n}"), n).ignore();
        }
        pipe.cmd("XADD")
            .arg("wsgateway:{1}:history:branch:5")
            .arg("1-0")
            .arg("e")
            .arg("x")
            .ignore();
        let () = pipe.query(&mut conn).unwrap();
        let keys = 251;
        assert_eq!(cluster.keys_in_slot(owner, slot), keys);

        // Moved step by step to another primary.
        let to = cluster.other_primary(owner);
        let moving = Instant::now();
        let m = cluster.begin_migration(slot, to);
        // Midway, the old owner still answers for the keys it holds.
        let read: i64 = cluster
            .query(owner, redis::cmd("GET").arg("wsgateway:{1}:k7"))
            .unwrap();
        assert_eq!(read, 7);
        assert_eq!(cluster.move_keys(&m, 100), keys);
        assert_eq!(cluster.keys_in_slot(owner, slot), 0);
        cluster.finish_migration(m, Duration::from_secs(10));
        let move_took = moving.elapsed();
        assert_eq!(cluster.primary_of_slot(slot), to);
        assert_eq!(cluster.keys_in_slot(to, slot), keys);
        // redis-cli -c on the old owner follows the MOVED redirection.
        assert_eq!(cluster.cli_on(owner, &["GET", "wsgateway:{1}:k7"]), "7");

        // The new owner dies; its replica takes over, with the keys.
        let replica = cluster.replicas_of(to);
        assert_eq!(replica.len(), 1);
        cluster.wait_replicated(to);
        let killing = Instant::now();
        let killed = cluster.kill_primary_of_slot(slot);
        assert_eq!(killed, to);
        assert!(cluster.nodes[killed].pid().is_none());
        let new = cluster.wait_failover(slot, killed, Duration::from_secs(20));
        let failover_took = killing.elapsed();
        assert_eq!(new, replica[0], "{}", cluster.describe());
        assert_eq!(cluster.keys_in_slot(new, slot), keys);
        assert_eq!(cluster.cli_on(owner, &["GET", "wsgateway:{1}:k249"]), "249");
        assert!(!cluster.seeds().contains(&cluster.nodes[killed].addr()));

        // The killed node comes back as the replica of its successor.
        cluster.restart(killed, Duration::from_secs(20));
        assert_eq!(cluster.replicas_of(new), vec![killed]);
        assert_eq!(cluster.primaries().len(), 3);
        println!(
            "measured: cluster ready in {start_took:?}, slot moved in {move_took:?}, \
             failover in {failover_took:?}; {:?} in all",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(60));
    });
}

// ---------------------------------------------------------------------------
// The gateway on the cluster.

/// A `wsgateway serve` process on the cluster (`common::Node`).
async fn cluster_node(seeds: &str, env: &[(&str, &str)]) -> Node {
    let mut all = vec![
        ("REDIS_URL", seeds),
        ("WSGATEWAY_REDIS_MODE", "cluster"),
        // A failover takes seconds: calls to the dead primary fail fast.
        ("WSGATEWAY_REDIS_TIMEOUT_S", "1"),
    ];
    all.extend_from_slice(env);
    Node::start(&all).await
}

/// Every node's log tail, for a failure's message.
async fn logs(nodes: &[Node]) -> String {
    let mut out = String::new();
    for (i, n) in nodes.iter().enumerate() {
        out.push_str(&format!(
            "--- node {i} ({}):\n{}\n",
            n.process.addr,
            n.log_tail(40).await
        ));
    }
    out
}

async fn start_nodes(cluster: &RedisCluster, count: usize) -> Vec<Node> {
    let mut nodes = Vec::new();
    for _ in 0..count {
        nodes.push(cluster_node(&cluster.seeds(), &[]).await);
    }
    for n in &nodes {
        n.wait_healthy(Duration::from_secs(15)).await;
    }
    nodes
}

/// The primaries that serve `tenants`, one entry per distinct primary.
fn shards_of(cluster: &RedisCluster, tenants: &[i64]) -> BTreeSet<usize> {
    tenants
        .iter()
        .map(|&t| cluster.primary_of_slot(cluster.slot_of_tenant(t)))
        .collect()
}

/// The routing table of `common/table.rs` for `tenants`, with the event
/// ids made unique to this set (`<tag>-ev-<n>`), so that an event leaking
/// to another tenant cannot pass for one of its own.
fn tagged_events(tenants: [i64; 2], tag: &str) -> Vec<(Published, Value)> {
    events(tenants)
        .into_iter()
        .map(|(mut p, mut ev)| {
            p.id = format!("{tag}-{}", p.id);
            ev["event_id"] = json!(p.id);
            (p, ev)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_is_exact_across_three_nodes_on_three_shards() {
    let _heavy = common::heavy().await;
    let started = Instant::now();
    let cluster = blocking(|| RedisCluster::start(3, 0));
    // Four tenants whose data lives on all three primaries.
    let sets = [([1, 2], "a"), ([3, 4], "b")];
    let all: Vec<i64> = sets.iter().flat_map(|(t, _)| *t).collect();
    assert_eq!(
        blocking(|| shards_of(&cluster, &all)).len(),
        3,
        "{}",
        cluster.describe()
    );
    let nodes = start_nodes(&cluster, 3).await;

    // Every connection of the table, for both sets, spread over the nodes.
    let mut clients: Vec<(Conn, Client)> = Vec::new();
    let mut placed = 0;
    for (tenants, _) in &sets {
        for (conn, token) in population(*tenants) {
            let node = &nodes[placed % nodes.len()];
            placed += 1;
            let (client, hello) = node.join(conn.endpoint, &token).await;
            assert_eq!(hello["endpoint"], conn.endpoint);
            clients.push((conn, client));
        }
    }
    // Published at once, while the subscriptions are being set up: what
    // is not yet live is filled from history. Through each node's API in
    // turn.
    let mut published = Vec::new();
    for (tenants, tag) in &sets {
        published.extend(tagged_events(*tenants, tag));
    }
    for (i, (p, ev)) in published.iter().enumerate() {
        let id = nodes[i % nodes.len()]
            .publish_one(&p.channel, ev.clone())
            .await;
        assert_eq!(id, p.id);
    }
    let got = received(&mut clients).await;
    let routed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_routed(&clients, &published, &got)
    }));
    if let Err(e) = routed {
        eprintln!("{}", logs(&nodes).await);
        std::panic::resume_unwind(e);
    }
    println!(
        "measured: {} clients on 3 nodes, {} events, {:?} in all",
        clients.len(),
        published.len(),
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// The event ids of `frames`, `-` for a frame without one.
fn ids(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["event_id"].as_str().unwrap_or("-").to_owned())
        .collect()
}

/// Publishes `rounds` requests through `node`, each with one event for the
/// waiters of branch 5 of `tenant` (its id returned, in order) and events
/// that waiter must never see: another tenant on another shard, another
/// branch, the kitchen, a table session.
async fn publish_mixed(
    node: &Node,
    tenant: i64,
    other: i64,
    rounds: usize,
    tag: &str,
) -> Vec<String> {
    let mut mine = Vec::new();
    for i in 0..rounds {
        let items = json!([
            {"channel": "channel:branch:5:waiters", "event": {"type": "ROUND_READY", "tenant_id": tenant, "branch_id": 5, "n": format!("{tag}{i}"), "event_id": format!("{tag}-{i}")}},
            {"channel": "channel:branch:5:waiters", "event": {"type": "ROUND_READY", "tenant_id": other, "branch_id": 5, "n": "other tenant"}},
            {"channel": "channel:branch:6:waiters", "event": {"type": "ROUND_READY", "tenant_id": tenant, "branch_id": 6, "n": "other branch"}},
            {"channel": "channel:branch:5:kitchen", "event": {"type": "ROUND_IN_KITCHEN", "tenant_id": tenant, "branch_id": 5, "n": "kitchen"}},
            {"channel": "channel:session:77", "event": {"type": "PAYMENT_APPROVED", "tenant_id": tenant, "branch_id": 5, "n": "session"}},
        ]);
        let (status, answer) = node.publish(&items).await;
        assert_eq!(status, 202, "{answer}");
        mine.push(answer["event_ids"][0].as_str().unwrap().to_owned());
    }
    mine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node() {
    let _heavy = common::heavy().await;
    let started = Instant::now();
    let cluster = blocking(|| RedisCluster::start(3, 0));
    // Tenants 1 and 3 live on different primaries.
    assert_eq!(blocking(|| shards_of(&cluster, &[1, 3])).len(), 2);
    let nodes = start_nodes(&cluster, 2).await;
    for (tenant, other) in [(1, 3), (3, 1)] {
        let token = staff(7, tenant, &[5], &["WAITER"]);
        let tag = format!("t{tenant}");
        let (mut c, _) = nodes[0].join("waiter", &token).await;
        let first = publish_mixed(&nodes[0], tenant, other, 1, &format!("{tag}a")).await;
        let got = c.next_json().await.expect("the first event");
        assert_eq!(got["event_id"], first[0].as_str(), "{got}");
        drop(c);
        // Missed while away, published through the other node.
        let missed = publish_mixed(&nodes[1], tenant, other, 10, &format!("{tag}b")).await;
        let (mut c, hello) = nodes[1].join_from("waiter", &token, &first[0]).await;
        assert_eq!(hello["recovered"], true, "{hello}\n{}", logs(&nodes).await);
        // Then live, through the first node.
        let live = publish_mixed(&nodes[0], tenant, other, 3, &format!("{tag}c")).await;
        let got = ids(&c.drain(Duration::from_millis(500)).await);
        let expected: Vec<String> = missed.iter().chain(&live).cloned().collect();
        assert_eq!(
            got,
            expected,
            "tenant {tenant}: the missed events, then the live ones, each once\n{}",
            logs(&nodes).await
        );
    }
    println!("measured: {:?} in all", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(60));
}

// ---------------------------------------------------------------------------
// A steady stream of events while the cluster changes under it.

/// Event `n` of `tenant`'s steady stream: even `n` on the waiters of branch
/// 5, odd `n` on table session 77 of branch 5, both in the tenant's slot.
fn steady_item(tenant: i64, n: usize) -> Value {
    let (channel, kind) = match n % 2 {
        0 => ("channel:branch:5:waiters", "ROUND_READY"),
        _ => ("channel:session:77", "PAYMENT_APPROVED"),
    };
    json!({"channel": channel, "event": {"type": kind, "tenant_id": tenant, "branch_id": 5,
           "n": n, "event_id": format!("s{tenant}-{n}")}})
}

#[derive(Clone, Copy, Debug)]
struct Accepted {
    tenant: i64,
    n: usize,
    at: Instant,
}

/// One publish call of the stream: when it was answered, the event (its
/// tenant and `n`), the HTTP status (0: no answer within 5 s) and the body.
#[derive(Clone)]
struct Attempt {
    at: Instant,
    tenant: i64,
    n: usize,
    status: u16,
    body: String,
}

/// The stream's publisher: a task that, every `every`, publishes the next
/// event of each tenant through the nodes' APIs in turn, retrying one
/// until it is accepted (503 and 504 are retried with the same `event_id`,
/// which makes a retry safe), so that the accepted events are in order.
/// It gives up when one event is refused for 30 s.
struct Publisher {
    accepted: Arc<Mutex<Vec<Accepted>>>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Publisher {
    fn start(nodes: &[Node], tenants: &[i64], every: Duration) -> Publisher {
        let urls: Vec<String> = nodes.iter().map(|n| n.url("/api/publish")).collect();
        let tenants = tenants.to_vec();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (sink, tries, stopped) = (accepted.clone(), attempts.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut turn = 0;
            let mut tick = tokio::time::interval(every);
            for n in 0.. {
                tick.tick().await;
                if stopped.is_cancelled() {
                    return Ok(());
                }
                for &tenant in &tenants {
                    let body = steady_item(tenant, n).to_string();
                    let first = Instant::now();
                    loop {
                        turn += 1;
                        let answer = http
                            .post(&urls[turn % urls.len()])
                            .bearer_auth(API_KEY)
                            .body(body.clone())
                            .send()
                            .await;
                        let (status, text) = match answer {
                            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                            Err(e) => (0, e.to_string()),
                        };
                        tries.lock().push(Attempt {
                            at: Instant::now(),
                            tenant,
                            n,
                            status,
                            body: text.chars().take(300).collect(),
                        });
                        match status {
                            202 => break,
                            0 | 503 | 504 => {}
                            other => return Err(format!("event {n} of tenant {tenant}: {other}")),
                        }
                        if first.elapsed() > Duration::from_secs(30) {
                            return Err(format!("event {n} of tenant {tenant} refused for 30 s"));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    sink.lock().push(Accepted {
                        tenant,
                        n,
                        at: Instant::now(),
                    });
                }
            }
            Ok(())
        });
        Publisher {
            accepted,
            attempts,
            stop,
            task,
        }
    }

    fn count(&self) -> usize {
        self.accepted.lock().len()
    }

    /// The last attempts, for a failure's message.
    fn last_attempts(&self) -> String {
        last_of(&self.attempts)
    }

    /// Waits until `more` events beyond those accepted now are accepted.
    async fn wait_more(&self, more: usize) {
        let target = self.count() + more;
        self.wait_for(&format!("{more} more accepted events"), || {
            self.count() >= target
        })
        .await;
    }

    /// Waits until `more` publish calls beyond those answered now are
    /// answered, whatever the answers.
    async fn wait_attempts(&self, more: usize) {
        let target = self.attempts.lock().len() + more;
        self.wait_for(&format!("{more} more publish calls"), || {
            self.attempts.lock().len() >= target
        })
        .await;
    }

    async fn wait_for(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(40);
        while !done() {
            assert!(
                Instant::now() < deadline && !self.task.is_finished(),
                "the stream stalled waiting for {what} at {} events; last calls: {}",
                self.count(),
                self.last_attempts()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The answers to the calls made between `from` and `to`: how many of
    /// each status (and error code), by tenant.
    fn answers_between(&self, from: Instant, to: Instant) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for a in self
            .attempts
            .lock()
            .iter()
            .filter(|a| a.at >= from && a.at < to)
        {
            let code = serde_json::from_str::<Value>(&a.body)
                .ok()
                .and_then(|b| b["error"].as_str().map(str::to_owned));
            let key = match code {
                Some(code) => format!("tenant {}: {} {code}", a.tenant, a.status),
                None => format!("tenant {}: {}", a.tenant, a.status),
            };
            *out.entry(key).or_default() += 1;
        }
        out
    }

    /// Stops; returns every accepted event and the number of retries.
    async fn finish(self) -> (Vec<Accepted>, usize) {
        self.stop.cancel();
        let ended = self.task.await.expect("the publisher does not panic");
        if let Err(e) = ended {
            panic!("{e}; last calls: {}", last_of(&self.attempts));
        }
        let accepted = self.accepted.lock().clone();
        let retries = self.attempts.lock().len() - accepted.len();
        (accepted, retries)
    }
}

/// The last five publish calls.
fn last_of(attempts: &Mutex<Vec<Attempt>>) -> String {
    let attempts = attempts.lock();
    attempts[attempts.len().saturating_sub(5)..]
        .iter()
        .map(|a| {
            format!(
                "\n  event {} of tenant {}: {} {}",
                a.n, a.tenant, a.status, a.body
            )
        })
        .collect()
}

/// A client of the stream: which tenant's events, and which half of them.
struct Watcher {
    label: String,
    tenant: i64,
    /// 0: the branch's (even `n`), 1: the session's (odd `n`).
    parity: usize,
    client: Client,
}

async fn watchers(nodes: &[Node], tenants: &[i64]) -> Vec<Watcher> {
    let mut out = Vec::new();
    for &t in tenants {
        let members = [
            ("waiter", staff(10, t, &[5], &["WAITER"]), 0),
            ("admin", staff(11, t, &[5], &["ADMIN"]), 0),
            ("diner", diner(t, 5, 1, 77), 1),
        ];
        for (i, (endpoint, token, parity)) in members.into_iter().enumerate() {
            let node = i % nodes.len();
            let (client, _) = nodes[node].join(endpoint, &token).await;
            out.push(Watcher {
                label: format!("t{t}-{endpoint}@node{node}"),
                tenant: t,
                parity,
                client,
            });
        }
    }
    out
}

/// What a watcher received of the stream.
struct Received {
    ns: Vec<usize>,
    resyncs: Vec<Value>,
    /// Frames that are neither its events nor `resync`.
    other: Vec<Value>,
}

/// Reads `w` until the last of `expected` arrives (or 20 s pass), then
/// anything more within 300 ms.
async fn read_stream(w: &mut Watcher, expected: &[Accepted]) -> Received {
    let last = expected.last().map(|a| a.n);
    let mut got = Received {
        ns: Vec::new(),
        resyncs: Vec::new(),
        other: Vec::new(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut quiet_from: Option<tokio::time::Instant> = None;
    loop {
        let until = match quiet_from {
            Some(q) => q + Duration::from_millis(300),
            None => deadline,
        };
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let Some(frame) = w.client.next_json_within(left).await else {
            return got;
        };
        if frame["type"] == "resync" {
            got.resyncs.push(frame);
        } else if frame["tenant_id"] == w.tenant && frame["n"].is_u64() {
            let n = frame["n"].as_u64().unwrap() as usize;
            got.ns.push(n);
            if Some(n) == last {
                quiet_from = Some(tokio::time::Instant::now());
            }
        } else {
            got.other.push(frame);
        }
    }
}

/// The events of `accepted` that `w` should get.
fn expected_for(w: &Watcher, accepted: &[Accepted]) -> Vec<Accepted> {
    accepted
        .iter()
        .filter(|a| a.tenant == w.tenant && a.n % 2 == w.parity)
        .copied()
        .collect()
}

/// Checks what `w` received: its events only, in order, each once; all of
/// them, unless it was told to `resync` and `lost_before` allows losses:
/// then only events accepted before that instant (by a primary that died
/// before its replica had them) may be missing. Returns a description.
fn check_stream(
    w: &Watcher,
    got: &Received,
    expected: &[Accepted],
    lost_before: Option<Instant>,
) -> Result<String, String> {
    let describe = || {
        format!(
            "{}: got {:?}, resyncs {:?}, other {:?}, expected {:?}",
            w.label,
            got.ns,
            got.resyncs,
            got.other,
            expected.iter().map(|a| a.n).collect::<Vec<_>>()
        )
    };
    if !got.other.is_empty() {
        return Err(format!("frames of no one's stream: {}", describe()));
    }
    if got.ns.windows(2).any(|p| p[0] >= p[1]) {
        return Err(format!("out of order or twice: {}", describe()));
    }
    let wanted: BTreeSet<usize> = expected.iter().map(|a| a.n).collect();
    if let Some(stray) = got.ns.iter().find(|n| !wanted.contains(n)) {
        return Err(format!("event {stray} is not its own: {}", describe()));
    }
    let have: BTreeSet<usize> = got.ns.iter().copied().collect();
    let missing: Vec<&Accepted> = expected.iter().filter(|a| !have.contains(&a.n)).collect();
    if missing.is_empty() {
        return Ok(format!("{}: all {} events", w.label, got.ns.len()));
    }
    match lost_before {
        Some(at) if !got.resyncs.is_empty() && missing.iter().all(|a| a.at < at) => Ok(format!(
            "{}: {} events, told to resync ({:?}), {} lost: {:?}",
            w.label,
            got.ns.len(),
            got.resyncs,
            missing.len(),
            missing.iter().map(|a| a.n).collect::<Vec<_>>()
        )),
        _ => Err(format!("events missing: {}", describe())),
    }
}

/// One answer of `/ws/health/detailed`: when, which node, the HTTP status,
/// the body.
type Sample = (Instant, usize, u16, Value);

/// Polls every node's `/ws/health/detailed` every 50 ms.
struct HealthLog {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl HealthLog {
    fn start(nodes: &[Node]) -> HealthLog {
        let urls: Vec<String> = nodes.iter().map(|n| n.url("/ws/health/detailed")).collect();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (sink, stopped) = (samples.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            // One round more once stopped: the last samples are from
            // after `finish` was called.
            loop {
                let last = stopped.is_cancelled();
                for (i, url) in urls.iter().enumerate() {
                    let Ok(r) = http.get(url).send().await else {
                        continue;
                    };
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    sink.lock().push((Instant::now(), i, status, body));
                }
                if last {
                    break;
                }
                tokio::select! {
                    _ = stopped.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        });
        HealthLog {
            samples,
            stop,
            task,
        }
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.cancel();
        self.task.await.unwrap();
        self.samples.lock().clone()
    }
}

fn healthy(status: u16, body: &Value) -> bool {
    status == 200 && body["status"] == "healthy"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_failover_under_a_steady_stream_loses_nothing_history_kept() {
    let _heavy = common::heavy().await;
    let started = Instant::now();
    let mut cluster = blocking(|| RedisCluster::start(3, 1));
    // Tenant 1 is on the primary that dies; tenant 3, elsewhere, watches.
    let slot = blocking(|| cluster.slot_of_tenant(1));
    assert_eq!(blocking(|| shards_of(&cluster, &[1, 3])).len(), 2);
    let nodes = start_nodes(&cluster, 2).await;
    let mut watching = watchers(&nodes, &[1, 3]).await;
    let publisher = Publisher::start(&nodes, &[1, 3], Duration::from_millis(50));
    publisher.wait_more(20).await;

    let health = HealthLog::start(&nodes);
    publisher.wait_more(4).await;
    let killed_at = Instant::now();
    let killed = blocking(|| cluster.kill_primary_of_slot(slot));
    let new = blocking(|| cluster.wait_failover(slot, killed, Duration::from_secs(20)));
    let failed_over = killed_at.elapsed();
    for n in &nodes {
        n.wait_healthy(Duration::from_secs(20)).await;
    }
    let healthy_again = killed_at.elapsed();
    publisher.wait_more(40).await;
    let (accepted, retries) = publisher.finish().await;
    publisher_done(&accepted);
    // A health PING sent while the slot had no primary may time out after
    // the replica took over: the report lags by up to one check. So the
    // end is "healthy again within a deadline", not the last sample taken.
    for n in &nodes {
        n.wait_healthy(Duration::from_secs(10)).await;
    }
    let samples = health.finish().await;

    let mut report = Vec::new();
    let mut failures = Vec::new();
    for w in &mut watching {
        let expected = expected_for(w, &accepted);
        let got = read_stream(w, &expected).await;
        match check_stream(w, &got, &expected, Some(killed_at)) {
            Ok(line) => report.push(line),
            Err(e) => failures.push(e),
        }
    }
    // Health is honest: healthy before the kill, not healthy for a while
    // after it (a shard's subscription and its commands are down), healthy
    // again once the replica serves the slot.
    for node in 0..nodes.len() {
        let mine: Vec<_> = samples.iter().filter(|s| s.1 == node).collect();
        let before: Vec<_> = mine.iter().filter(|s| s.0 < killed_at).collect();
        let after: Vec<_> = mine.iter().filter(|s| s.0 >= killed_at).collect();
        if before.iter().any(|s| !healthy(s.2, &s.3)) {
            failures.push(format!("node {node} unhealthy before the kill: {before:?}"));
        }
        match after.iter().find(|s| !healthy(s.2, &s.3)) {
            None => failures.push(format!(
                "node {node} stayed healthy through the failover ({} samples)",
                after.len()
            )),
            Some(s) => report.push(format!(
                "node {node}: unhealthy {:?} after the kill: {} {}",
                s.0 - killed_at,
                s.2,
                s.3
            )),
        }
        match after.last() {
            Some(s) if healthy(s.2, &s.3) => {}
            last => failures.push(format!("node {node} not healthy at the end: {last:?}")),
        }
    }
    println!(
        "measured: node {new} took slot {slot} over {failed_over:?} after the kill, the \
         gateways healthy again after {healthy_again:?}; {} events accepted, {retries} retries; \
         {:?} in all\n{}",
        accepted.len(),
        started.elapsed(),
        report.join("\n")
    );
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        logs(&nodes).await
    );
    assert!(started.elapsed() < Duration::from_secs(90));
}

/// The stream's own sanity: each tenant's events accepted in order.
fn publisher_done(accepted: &[Accepted]) {
    for t in accepted.iter().map(|a| a.tenant).collect::<BTreeSet<_>>() {
        let ns: Vec<usize> = accepted
            .iter()
            .filter(|a| a.tenant == t)
            .map(|a| a.n)
            .collect();
        assert_eq!(ns, (0..ns.len()).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resharding_under_a_steady_stream_delivers_every_event_once_in_order() {
    let _heavy = common::heavy().await;
    let started = Instant::now();
    let cluster = blocking(|| RedisCluster::start(3, 0));
    let slot = blocking(|| cluster.slot_of_tenant(1));
    let from = blocking(|| cluster.primary_of_slot(slot));
    let to = blocking(|| cluster.other_primary(from));
    let nodes = start_nodes(&cluster, 2).await;
    let mut watching = watchers(&nodes, &[1, 3]).await;
    let publisher = Publisher::start(&nodes, &[1, 3], Duration::from_millis(30));
    publisher.wait_more(20).await;

    // Step by step, with events published between the steps. While the
    // slot is migrating, tenant 1's publications may be refused (503) and
    // retried: wait for calls, not acceptances.
    let begun = Instant::now();
    let m = blocking(|| cluster.begin_migration(slot, to));
    publisher.wait_attempts(10).await;
    let moving = Instant::now();
    let moved = blocking(|| cluster.move_keys(&m, 2));
    let keys_moved = Instant::now();
    publisher.wait_attempts(10).await;
    let finishing = Instant::now();
    blocking(|| cluster.finish_migration(m, Duration::from_secs(10)));
    let finished = Instant::now();
    publisher.wait_more(30).await;
    let phases = [
        ("migrating, keys on the old owner", begun, moving),
        ("moving the keys", moving, keys_moved),
        ("migrating, keys on the new owner", keys_moved, finishing),
        ("setting the new owner", finishing, finished),
        ("after", finished, Instant::now()),
    ]
    .map(|(name, a, b)| {
        format!(
            "{name} ({:?}): {:?}",
            b - a,
            publisher.answers_between(a, b)
        )
    });
    let (accepted, retries) = publisher.finish().await;
    publisher_done(&accepted);
    assert!(accepted.iter().any(|a| a.at > finished));
    assert_eq!(blocking(|| cluster.primary_of_slot(slot)), to);
    assert_eq!(blocking(|| cluster.keys_in_slot(from, slot)), 0);

    let mut report = Vec::new();
    let mut failures = Vec::new();
    for w in &mut watching {
        let expected = expected_for(w, &accepted);
        let got = read_stream(w, &expected).await;
        if !got.resyncs.is_empty() {
            failures.push(format!("{}: told to resync {:?}", w.label, got.resyncs));
        }
        match check_stream(w, &got, &expected, None) {
            Ok(line) => report.push(line),
            Err(e) => failures.push(e),
        }
    }
    println!(
        "measured: slot {slot} moved from node {from} to node {to} with {moved} keys; {} events \
         accepted, {retries} retries; {:?} in all\nanswers to the publish calls, by phase:\n{}\n{}",
        accepted.len(),
        started.elapsed(),
        phases.join("\n"),
        report.join("\n")
    );
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        logs(&nodes).await
    );
    assert!(started.elapsed() < Duration::from_secs(90));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_fcall_and_plain_publish_reach_the_kitchen() {
    let _heavy = common::heavy().await;
    let started = Instant::now();
    let cluster = blocking(|| RedisCluster::start(3, 1));
    let nodes = start_nodes(&cluster, 1).await;
    let (mut kitchen, _) = nodes[0]
        .join("kitchen", &staff(1, 1, &[5], &["KITCHEN"]))
        .await;
    let (mut elsewhere, _) = nodes[0]
        .join("kitchen", &staff(1, 2, &[5], &["KITCHEN"]))
        .await;
    // The backend's redis-cli asks a primary that does not hold tenant 1's
    // slot; -c follows the redirection.
    let owner = blocking(|| cluster.primary_of_slot(cluster.slot_of_tenant(1)));
    let asked = blocking(|| cluster.other_primary(owner));
    let event = json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "n": "fcall",
                       "event_id": "fcall-1"});
    let answer = blocking(|| {
        cluster.cli_on(
            asked,
            &[
                "FCALL",
                "wsgateway_publish",
                "1",
                "wsgateway:{1}:seq",
                "channel:branch:5:kitchen",
                &event.to_string(),
            ],
        )
    });
    assert_eq!(answer, "fcall-1\npublished", "{}", logs(&nodes).await);
    let got = kitchen.next_json().await;
    assert_eq!(got.as_ref(), Some(&event), "{}", logs(&nodes).await);

    // A plain PUBLISH on any node, primary or replica, reaches it too.
    let mut sent = BTreeSet::new();
    let running: Vec<usize> = cluster.running().collect();
    for i in running {
        let n = format!("plain-{i}");
        let plain = json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "n": n});
        blocking(|| {
            cluster.cli_on(
                i,
                &["PUBLISH", "channel:branch:5:kitchen", &plain.to_string()],
            )
        });
        sent.insert(n);
    }
    let frames = kitchen.drain(Duration::from_millis(500)).await;
    let got: Vec<String> = frames
        .iter()
        .map(|f| f["n"].as_str().unwrap_or("-").to_owned())
        .collect();
    assert_eq!(
        got.iter().cloned().collect::<BTreeSet<_>>(),
        sent,
        "{frames:?}\n{}",
        logs(&nodes).await
    );
    assert_eq!(got.len(), sent.len(), "each once: {got:?}");
    assert!(
        elsewhere.drain(Duration::from_millis(100)).await.is_empty(),
        "another tenant's kitchen hears nothing"
    );
    println!("measured: {:?} in all", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// Starts one gateway node on `cluster` with `env`, joins a waiter of
/// `tenant`'s branch 5, and checks that an event published through the
/// node reaches it; returns the node and the waiter.
async fn one_node_delivers(
    cluster: &RedisCluster,
    env: &[(&str, &str)],
    tenant: i64,
) -> ([Node; 1], Client) {
    let node = cluster_node(&cluster.seeds(), env).await;
    node.wait_healthy(Duration::from_secs(15)).await;
    let nodes = [node];
    let (mut waiter, _) = nodes[0]
        .join("waiter", &staff(1, tenant, &[5], &["WAITER"]))
        .await;
    let id = nodes[0]
        .publish_one(
            "channel:branch:5:waiters",
            json!({"type": "ROUND_READY", "tenant_id": tenant, "branch_id": 5, "event_id": "one-1"}),
        )
        .await;
    let got = waiter.next_json().await;
    assert_eq!(
        got.as_ref().map(|f| f["event_id"].clone()),
        Some(json!(id)),
        "{}",
        logs(&nodes).await
    );
    (nodes, waiter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_and_a_prefix_work_as_in_the_other_modes() {
    let _heavy = common::heavy().await;
    let started = Instant::now();
    let cluster = blocking(|| RedisCluster::start_with(3, 0, Some("cluster-pw")));
    assert!(cluster.seeds().contains(":cluster-pw@127.0.0.1:"));
    let (nodes, mut waiter) =
        one_node_delivers(&cluster, &[("WSGATEWAY_REDIS_PREFIX", "staging")], 3).await;
    // The tenant's keys carry the prefix, on the primary of their slot.
    let key = "staging:wsgateway:{3}:seq";
    let owner = blocking(|| cluster.primary_of_slot(cluster.slot_of(key)));
    let exists: i64 = blocking(|| cluster.query(owner, redis::cmd("EXISTS").arg(key))).unwrap();
    assert_eq!(exists, 1, "{key} on node {owner}");
    // A plain PUBLISH on the prefixed seed channel reaches the waiter.
    let plain = json!({"type": "ROUND_SERVED", "tenant_id": 3, "branch_id": 5, "n": "plain"});
    blocking(|| {
        cluster.cli_on(
            owner,
            &[
                "PUBLISH",
                "staging:channel:branch:5:waiters",
                &plain.to_string(),
            ],
        )
    });
    assert_eq!(
        waiter.next_json().await,
        Some(plain),
        "{}",
        logs(&nodes).await
    );
    println!("measured: {:?} in all", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_is_reached_with_the_ca_file() {
    let _heavy = common::heavy().await;
    let started = Instant::now();
    let pki = common::tls::Pki::generate("cluster");
    let base = common::redis_server::Options {
        tls: Some(pki.server("no")),
        ..Default::default()
    };
    let cluster = blocking(|| RedisCluster::start_from(3, 0, base));
    assert!(cluster.seeds().starts_with("rediss://127.0.0.1:"));
    let ca = pki.ca.to_str().unwrap().to_owned();
    let (nodes, mut waiter) =
        one_node_delivers(&cluster, &[("WSGATEWAY_REDIS_CA_FILE", &ca)], 1).await;
    let plain = json!({"type": "ROUND_SERVED", "tenant_id": 1, "branch_id": 5, "n": "plain"});
    blocking(|| {
        cluster.cli_on(
            2,
            &["PUBLISH", "channel:branch:5:waiters", &plain.to_string()],
        )
    });
    assert_eq!(
        waiter.next_json().await,
        Some(plain),
        "{}",
        logs(&nodes).await
    );
    println!("measured: {:?} in all", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_writes_is_not_vouched_for() {
    let _heavy = common::heavy().await;
    let started = Instant::now();
    let mut cluster = blocking(|| RedisCluster::start(3, 1));
    let slot = blocking(|| cluster.slot_of_tenant(1));
    let primary = blocking(|| cluster.primary_of_slot(slot));
    let replica = blocking(|| cluster.replicas_of(primary))[0];
    let nodes = start_nodes(&cluster, 1).await;
    let token = staff(1, 1, &[5], &["WAITER"]);
    let (mut waiter, _) = nodes[0].join("waiter", &token).await;
    let ev = |n: usize| {
        json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "n": n,
               "event_id": format!("lw-{n}")})
    };
    let first = nodes[0]
        .publish_one("channel:branch:5:waiters", ev(1))
        .await;
    assert_eq!(waiter.next_json().await.unwrap()["n"], 1);
    blocking(|| cluster.wait_replicated(primary));

    // The replica stops, and its link is cut (what the primary had sent
    // would still be read from the socket); the primary takes two more
    // events, which the waiter receives, then dies; the replica, behind,
    // is promoted.
    blocking(|| {
        cluster.signal(replica, "STOP");
        let cut: i64 = cluster
            .query(
                primary,
                redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("replica"),
            )
            .unwrap();
        assert_eq!(cut, 1);
    });
    let mut lost = Vec::new();
    for n in 2..=3 {
        lost.push(
            nodes[0]
                .publish_one("channel:branch:5:waiters", ev(n))
                .await,
        );
        assert_eq!(waiter.next_json().await.unwrap()["n"], n);
    }
    let killed = blocking(|| cluster.kill_primary_of_slot(slot));
    blocking(|| cluster.signal(replica, "CONT"));
    let new = blocking(|| cluster.wait_failover(slot, killed, Duration::from_secs(30)));
    assert_eq!(new, replica);
    let kept: i64 = blocking(|| {
        cluster.query(
            new,
            redis::cmd("XLEN").arg("wsgateway:{1}:history:branch:5"),
        )
    })
    .unwrap();
    assert_eq!(kept, 1, "the promoted replica lacks events 2 and 3");
    nodes[0].wait_healthy(Duration::from_secs(20)).await;

    // Published after the failover: the connected waiter gets it, after
    // what it had (a resync notice first is allowed).
    let started_publishing = Instant::now();
    let after = loop {
        let (status, body) = nodes[0]
            .publish(&json!({"channel": "channel:branch:5:waiters", "event": ev(4)}))
            .await;
        if status == 202 {
            break body["event_ids"][0].as_str().unwrap().to_owned();
        }
        assert!(
            started_publishing.elapsed() < Duration::from_secs(20),
            "{status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let frames = waiter.drain(Duration::from_millis(500)).await;
    let events: Vec<&Value> = frames.iter().filter(|f| f["type"] != "resync").collect();
    assert_eq!(
        events.iter().map(|f| f["n"].clone()).collect::<Vec<_>>(),
        vec![json!(4)],
        "{frames:?}\n{}",
        logs(&nodes).await
    );
    // A client that resumes from event 1 would miss events 2 and 3 (lost
    // with the old primary): it must not be told it recovered. Nor from a
    // lost event.
    let mut failures = Vec::new();
    for cursor in [&first, &lost[0], &lost[1]] {
        let (mut c, hello) = nodes[0].join_from("waiter", &token, cursor).await;
        let replay = ids(&c.drain(Duration::from_millis(400)).await);
        if hello["recovered"] != false {
            failures.push(format!(
                "resumed from {cursor}: {hello}, replayed {replay:?} (events {lost:?} were lost)"
            ));
        }
    }
    println!(
        "measured: {:?} in all; the event after the failover: {after}; frames: {frames:?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        logs(&nodes).await
    );
}
