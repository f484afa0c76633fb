//! Three gateway nodes on one Redis or on a Redis Cluster (`nodes`): what
//! a node with no clients costs while the others serve.
//!
//! Each run starts its own Redis (one `redis-server`, or three primaries
//! made a cluster; see `redis_servers.rs`), then three gateways on it (in
//! cluster mode `WSGATEWAY_REDIS_MODE=cluster` and every primary in
//! `REDIS_URL`). Nodes 1 and 2 each hold half of the connections, spread
//! over the same tenants × branches (as a load balancer spreads them);
//! node 3 holds none. The tenants are chosen so that their hash slots
//! (`{tenant}`) fall evenly on the three primaries that `redis-cli
//! --cluster create` makes. A steady stream of events, one per
//! `POST /api/publish`, round-robin on the branches' waiters channels, goes
//! through the publish APIs of the serving nodes in turn (`--publish-to
//! all`: of the three), open loop at `--rate` for `--duration-s`.
//!
//! Figures, over the publishing (from the first request to the last
//! delivery): deliveries per second (all clients), each serving node's CPU
//! (utime + stime from `/proc/PID/stat`) per delivery to its clients, and
//! the CPU of the node with no audience, in seconds, in ms per second of
//! the window, and as a percentage of the serving nodes' mean. Redis's CPU
//! (every server it started) is given beside them. `--redis both` runs one
//! Redis of each kind in every run, single first, so that the two see the
//! same machine; each kind's figures are the medians of its runs.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::clients::{ClientStats, Fleet, Member, Population, Role};
use super::gateway::{Sample, Target};
use super::procfs::{self, TICKS_PER_S};
use super::publish::event;
use super::redis_servers::{Kind, RedisServers, key_slot};
use super::report::{median, percentile_ms};
use super::setting::REDIS_MODE;
use super::{BenchArgs, Plan, PublishTo, RedisTopology};

/// Gateway nodes; the last serves no client.
const NODES: usize = 3;
/// After the connections are open, before publishing: time for every
/// node to subscribe to its audience's channels.
const SETTLE: Duration = Duration::from_secs(1);
/// The most to wait for the last deliveries once publishing ended, while
/// none arrives.
const QUIET: Duration = Duration::from_secs(10);

/// Runs `--runs` runs of each Redis kind asked for, prints each run, then
/// the medians as a table (or everything as JSON with `--json`). An
/// interrupt (SIGINT, SIGTERM) ends the run in progress and stops every
/// process it started.
pub async fn run(args: &BenchArgs, plan: &Plan) -> anyhow::Result<()> {
    tokio::select! {
        result = run_all(args, plan) => result,
        () = interrupted() => anyhow::bail!("interrupted; every Redis and gateway started was stopped"),
    }
}

async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending::<()>().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run_all(args: &BenchArgs, plan: &Plan) -> anyhow::Result<()> {
    let kinds: &[Kind] = match args.redis {
        RedisTopology::Single => &[Kind::Single],
        RedisTopology::Cluster => &[Kind::Cluster],
        RedisTopology::Both => &[Kind::Single, Kind::Cluster],
    };
    let runs = args.runs.max(1);
    let mut reports: Vec<(Kind, Value)> = Vec::new();
    for run in 1..=runs {
        for &kind in kinds {
            let report = run_once(args, plan, kind)
                .await
                .with_context(|| format!("run {run}, Redis {}", kind.name()))?;
            if !args.json {
                println!("--- run {run} of {runs}, Redis {}", kind.name());
                println!("{}", one_line(&report));
            }
            reports.push((kind, report));
        }
    }
    let medians: Vec<(Kind, Value)> = kinds
        .iter()
        .map(|&kind| {
            let of_kind: Vec<Value> = reports
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, r)| r.clone())
                .collect();
            (kind, median(&of_kind))
        })
        .collect();
    if args.json {
        let runs: Vec<&Value> = reports.iter().map(|(_, r)| r).collect();
        let median: serde_json::Map<String, Value> = medians
            .iter()
            .map(|(k, m)| (k.name().to_owned(), m.clone()))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"runs": runs, "median": median}))?
        );
    } else {
        print_table(plan, args, runs, &reports, &medians);
    }
    Ok(())
}

/// One run: its own Redis, three fresh gateways, the clients, the stream.
async fn run_once(args: &BenchArgs, plan: &Plan, kind: Kind) -> anyhow::Result<Value> {
    let redis = RedisServers::start(kind).await?;
    let result = with_redis(args, plan, &redis).await;
    redis.stop().await;
    result
}

async fn with_redis(args: &BenchArgs, plan: &Plan, redis: &RedisServers) -> anyhow::Result<Value> {
    let tenants = spread_tenants(plan.tenants);
    let tenants_per_server = redis.tenants_per_server(&tenants).await?;
    let cluster = [(REDIS_MODE.env, "cluster")];
    let env: &[(&str, &str)] = match redis.kind {
        Kind::Single => &[],
        Kind::Cluster => &cluster,
    };
    let mut nodes = Vec::with_capacity(NODES);
    for n in 1..=NODES {
        match Target::start(args, &format!("node {n}"), Some(redis.url()), env).await {
            Ok(node) => nodes.push(node),
            Err(e) => {
                stop_all(nodes).await;
                return Err(e).context(format!("cannot start gateway node {n}"));
            }
        }
    }
    let result = measure(args, plan, &nodes, redis, &tenants).await;
    stop_all(nodes).await;
    let mut report = result?;
    report["redis"] = json!({"kind": redis.kind.name(), "servers": tenants_per_server.len(),
                             "tenants_per_server": tenants_per_server});
    Ok(report)
}

async fn stop_all(nodes: Vec<Target>) {
    for node in nodes {
        node.stop().await;
    }
}

async fn measure(
    args: &BenchArgs,
    plan: &Plan,
    nodes: &[Target],
    redis: &RedisServers,
    tenants: &[i64],
) -> anyhow::Result<Value> {
    let serving = &nodes[..NODES - 1];
    let per_node = plan.connections / serving.len();
    let populations: Vec<Population> = (0..serving.len())
        .map(|n| population(plan, tenants, per_node, n * per_node))
        .collect();
    let mut fleets = Vec::with_capacity(serving.len());
    for (node, people) in serving.iter().zip(&populations) {
        fleets.push(Fleet::connect(node, people, args).await?);
    }
    tokio::time::sleep(SETTLE).await;

    let before: Vec<Sample> = nodes.iter().map(Target::sample).collect();
    let redis_before = redis_cpu_ticks(redis);
    let started = Instant::now();
    let apis: Vec<&Target> = match args.publish_to {
        PublishTo::Serving => serving.iter().collect(),
        PublishTo::All => nodes.iter().collect(),
    };
    let published = publish(args, plan, &apis, &populations[0].pairs).await?;
    let publish_time = started.elapsed();
    let expected: Vec<u64> = populations
        .iter()
        .map(|p| {
            published
                .accepted
                .iter()
                .map(|&(t, b)| p.audience(t, b))
                .sum()
        })
        .collect();
    for (fleet, &expected) in fleets.iter().zip(&expected) {
        fleet.wait_for(expected, QUIET).await;
    }
    let window = started.elapsed();
    let after: Vec<Sample> = nodes.iter().map(Target::sample).collect();
    let redis_cpu_s = redis_cpu_ticks(redis).saturating_sub(redis_before) as f64 / TICKS_PER_S;
    let mut stats = Vec::with_capacity(fleets.len());
    for fleet in &mut fleets {
        stats.push(fleet.finish().await);
    }

    let cpu_s: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.cpu_ticks.saturating_sub(b.cpu_ticks) as f64 / TICKS_PER_S)
        .collect();
    let serving_mean = cpu_s[..serving.len()].iter().sum::<f64>() / serving.len() as f64;
    let idle_cpu = cpu_s[NODES - 1];
    let mut report = json!({
        "scenario": "nodes",
        "connections": {"per_serving_node": per_node,
                        "opened": fleets.iter().map(|f| f.opened).sum::<usize>(),
                        "failed": fleets.iter().map(|f| f.failed).sum::<usize>()},
        "events": {"published": published.accepted.len(), "refused": published.refused,
                   "rate_per_s": plan.rate, "publish_s": publish_time.as_secs_f64(),
                   "publish_to": format!("{:?}", args.publish_to).to_lowercase()},
        "deliveries": deliveries_json(&stats, &expected),
        "window_s": window.as_secs_f64(),
        "redis_cpu_s": redis_cpu_s,
    });
    for (n, s) in stats.iter().enumerate() {
        report[format!("node{}", n + 1)] = json!({
            "cpu_s": cpu_s[n],
            "deliveries": s.delivered,
            "cpu_us_per_delivery": (s.delivered > 0).then(|| cpu_s[n] * 1e6 / s.delivered as f64),
        });
    }
    report[format!("node{NODES}")] = json!({
        "cpu_s": idle_cpu,
        "cpu_ms_per_s": idle_cpu * 1e3 / window.as_secs_f64(),
        "percent_of_serving": (serving_mean > 0.0).then(|| idle_cpu * 100.0 / serving_mean),
    });
    Ok(report)
}

/// `count` members for one serving node, spread over every tenant ×
/// branch, users `id_base + 1` on.
fn population(plan: &Plan, tenants: &[i64], count: usize, id_base: usize) -> Population {
    let pairs: Vec<(i64, i64)> = tenants
        .iter()
        .flat_map(|&t| (1..=plan.branches as i64).map(move |b| (t, b)))
        .collect();
    let members = (0..count)
        .map(|i| {
            let (tenant, branch) = pairs[i % pairs.len()];
            let role = if (i as f64) < plan.admin_share * count as f64 {
                Role::Admin
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
        id_base,
    }
}

/// `count` tenant ids from 1 up whose hash slots fall evenly on the three
/// primaries of a `redis-cli --cluster create` (slots 0–5460, 5461–10922,
/// 10923–16383): with 6, tenants 1, 2, 3, 4, 7 and 8, two on each.
fn spread_tenants(count: usize) -> Vec<i64> {
    let third = |t: i64| match key_slot(&t.to_string()) {
        0..=5460 => 0,
        5461..=10922 => 1,
        _ => 2,
    };
    let mut taken = [0usize; 3];
    let mut tenants = Vec::with_capacity(count);
    let mut t = 0;
    while tenants.len() < count {
        t += 1;
        let third = third(t);
        // Third k's share of `count`: as even as integers allow.
        let share = count * (third + 1) / 3 - count * third / 3;
        if taken[third] < share {
            taken[third] += 1;
            tenants.push(t);
        }
    }
    tenants
}

struct Published {
    /// (tenant, branch) of each event answered 202.
    accepted: Vec<(i64, i64)>,
    /// Requests answered otherwise, or not at all.
    refused: usize,
}

/// The stream: `plan.events` requests of one event each, at `plan.rate`,
/// open loop (each request in a task of its own, so a slow answer delays
/// no other), event `k` on pair `k mod pairs` through API `k mod apis`.
async fn publish(
    args: &BenchArgs,
    plan: &Plan,
    apis: &[&Target],
    pairs: &[(i64, i64)],
) -> anyhow::Result<Published> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let urls: Vec<String> = apis
        .iter()
        .map(|t| format!("http://{}/api/publish", t.addr))
        .collect();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.rate.max(0.001)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut requests = JoinSet::new();
    for k in 0..plan.events {
        tick.tick().await;
        let (tenant, branch) = pairs[k % pairs.len()];
        let body = json!([{"channel": format!("channel:branch:{branch}:waiters"),
                           "event": event(tenant, branch, k)}]);
        let request = http
            .post(&urls[k % urls.len()])
            .bearer_auth(&args.api_key)
            .json(&body);
        requests.spawn(async move {
            let accepted = matches!(request.send().await, Ok(r) if r.status() == 202);
            (accepted, tenant, branch)
        });
    }
    let mut published = Published {
        accepted: Vec::with_capacity(plan.events),
        refused: 0,
    };
    while let Some(done) = requests.join_next().await {
        match done? {
            (true, tenant, branch) => published.accepted.push((tenant, branch)),
            (false, ..) => published.refused += 1,
        }
    }
    if published.refused > 0 {
        eprintln!(
            "bench: {} publish requests were not answered 202",
            published.refused
        );
    }
    Ok(published)
}

fn redis_cpu_ticks(redis: &RedisServers) -> u64 {
    redis
        .pids()
        .iter()
        .map(|pid| procfs::cpu_ticks(&format!("/proc/{pid}/stat")))
        .sum()
}

fn deliveries_json(stats: &[ClientStats], expected: &[u64]) -> Value {
    let delivered: u64 = stats.iter().map(|s| s.delivered).sum();
    let expected: u64 = expected.iter().sum();
    let misrouted: u64 = stats.iter().map(|s| s.misrouted).sum();
    let first = stats
        .iter()
        .filter(|s| s.delivered > 0)
        .map(|s| s.first_us)
        .min();
    let last = stats.iter().map(|s| s.last_us).max();
    let per_s = match (first, last) {
        (Some(f), Some(l)) if l > f => delivered as f64 * 1e6 / (l - f) as f64,
        _ => 0.0,
    };
    let latencies: Vec<u32> = stats
        .iter()
        .flat_map(|s| s.latencies_us.iter().copied())
        .collect();
    json!({
        "expected": expected, "delivered": delivered,
        "missing": expected.saturating_sub(delivered), "misrouted": misrouted,
        "per_s": per_s,
        "latency_ms": {"p50": percentile_ms(&latencies, 0.5), "p99": percentile_ms(&latencies, 0.99),
                       "max": percentile_ms(&latencies, 1.0)},
    })
}

/// A number of a report, `n/a` when absent.
fn num(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("n/a".into(), |v| format!("{v:.digits$}"))
}

fn one_line(r: &Value) -> String {
    let d = &r["deliveries"];
    format!(
        "{} delivered of {} ({} missing, {} misrouted), {}/s, p99 {} ms; \
         node 1 {} µs/delivery, node 2 {} µs/delivery; node 3 (no clients) {} CPU-s = {} % of a serving node's; Redis {} CPU-s",
        d["delivered"],
        d["expected"],
        d["missing"],
        d["misrouted"],
        num(&d["per_s"], 0),
        num(&d["latency_ms"]["p99"], 2),
        num(&r["node1"]["cpu_us_per_delivery"], 2),
        num(&r["node2"]["cpu_us_per_delivery"], 2),
        num(&r["node3"]["cpu_s"], 2),
        num(&r["node3"]["percent_of_serving"], 1),
        num(&r["redis_cpu_s"], 2),
    )
}

fn print_table(
    plan: &Plan,
    args: &BenchArgs,
    runs: usize,
    reports: &[(Kind, Value)],
    medians: &[(Kind, Value)],
) {
    println!(
        "--- median of {runs} run(s): {} connections on nodes 1 and 2, none on node 3; \
         {} tenants × {} branches; {} events/s for {} s through the publish APIs of {}",
        plan.connections,
        plan.tenants,
        plan.branches,
        plan.rate,
        plan.hold.as_secs_f64(),
        match args.publish_to {
            PublishTo::Serving => "nodes 1 and 2",
            PublishTo::All => "the three nodes",
        },
    );
    println!(
        "{:<8} {:>7} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>12} {:>9}",
        "redis",
        "tenants",
        "deliv/s",
        "missing",
        "p99 ms",
        "n1 µs/d",
        "n2 µs/d",
        "n1 CPU-s",
        "n3 CPU-s",
        "n3 ms/s",
        "n3 % serving",
        "Redis s"
    );
    for (kind, m) in medians {
        let spread = m["redis"]["tenants_per_server"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_default();
        println!(
            "{:<8} {:>7} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>12} {:>9}",
            kind.name(),
            spread,
            num(&m["deliveries"]["per_s"], 0),
            num(&m["deliveries"]["missing"], 0),
            num(&m["deliveries"]["latency_ms"]["p99"], 2),
            num(&m["node1"]["cpu_us_per_delivery"], 2),
            num(&m["node2"]["cpu_us_per_delivery"], 2),
            num(&m["node1"]["cpu_s"], 2),
            num(&m["node3"]["cpu_s"], 2),
            num(&m["node3"]["cpu_ms_per_s"], 1),
            num(&m["node3"]["percent_of_serving"], 1),
            num(&m["redis_cpu_s"], 2),
        );
        let of_kind = |pointer: &str, digits: usize| {
            reports
                .iter()
                .filter(|(k, _)| k == kind)
                .map(|(_, r)| num(r.pointer(pointer).unwrap_or(&Value::Null), digits))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "{:<8} runs: node 3 % of serving ({}), node 3 CPU-s ({}), n1 µs/d ({})",
            "",
            of_kind("/node3/percent_of_serving", 1),
            of_kind("/node3/cpu_s", 2),
            of_kind("/node1/cpu_us_per_delivery", 2),
        );
    }
}
