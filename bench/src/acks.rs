//! Acknowledgements (`acks`, docs/PROTOCOL.md §15): what an ack costs the
//! gateway.
//!
//! Kitchen displays (`/ws/kitchen`, spread over tenants × branches) and a
//! steady stream of kitchen tickets published through the publish API on
//! `channel:branch:{b}:kitchen`, round-robin on the branches, at `--rate`
//! for `--duration-s`, a request every 50 ms carrying the events due by
//! then (10 at 200/s; open loop: each request in a task of its own). The
//! same stream in phases, each with a fresh gateway and fresh clients:
//!
//! - `baseline`: the items carry no `ack`; the clients only read.
//! - `ack_each`: every item carries `"ack": {"within_s": N}`
//!   (`--ack-within-s`, 30); each client sends one `ack` message per event
//!   as soon as it arrives.
//! - `ack_batched`: the same items; each client sends, every 50 ms, the ids
//!   received since, up to 20 per message.
//!
//! Per phase: the gateway's CPU (utime + stime from `/proc`) from the first
//! publication until the last delivery, and in the ack phases until the
//! gateway counted every acked id (`wsgateway_acks_total`, all outcomes,
//! from `/ws/metrics`); deliveries, missing; acks sent. Then an ack phase
//! waits until its last event's deadline is past (N s after the last
//! publication, plus a sweep) and reads the counters: every event
//! acknowledged once, the other recipients' acks `repeated`, none
//! redelivered nor escalated. The cost of an ack is the phase's CPU minus
//! the baseline's of the same run: per acknowledged delivery, per ack
//! message, per acknowledged event. The load generator's CPU, and Redis's
//! when `--redis-url` names a server on this machine (its pid from `INFO`),
//! are given beside.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;

use super::clients::{Acking, Fleet, KITCHEN_EVENT, Population, now_us};
use super::gateway::Target;
use super::procfs::{self, TICKS_PER_S};
use super::report::{percentile_ms, print_runs};
use super::{AckMode, BenchArgs, Plan};

/// After the connections are open, before publishing: time for the
/// gateway to subscribe to their channels (Redis).
const SETTLE: Duration = Duration::from_secs(1);
/// The most to wait for the last deliveries, while none arrives.
const QUIET: Duration = Duration::from_secs(10);
/// A publish request every `TICK`, with the events due by then.
const TICK: Duration = Duration::from_millis(50);
/// The most events in one publish request (when publishing at once).
const MAX_ITEMS: usize = 100;
/// The most to wait for the clients to ack every delivery, and for the
/// gateway to count every acked id.
const COUNTED: Duration = Duration::from_secs(10);
/// Past the last event's deadline before the counters are read: the
/// gateway looks at the deadlines every 200 ms.
const PAST_DEADLINE: Duration = Duration::from_millis(1500);

/// Runs `--runs` runs, prints each, then the medians (or all as JSON).
pub async fn run(args: &BenchArgs, plan: &Plan) -> anyhow::Result<()> {
    print_runs(args, || run_once(args, plan)).await
}

/// A phase of a run.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Baseline,
    Acks(AckMode),
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Baseline => "baseline",
            Phase::Acks(AckMode::Each) => "ack_each",
            Phase::Acks(AckMode::Batched) => "ack_batched",
        }
    }

    fn acking(self) -> Acking {
        match self {
            Phase::Baseline => Acking::Never,
            Phase::Acks(AckMode::Each) => Acking::Each,
            Phase::Acks(AckMode::Batched) => Acking::Batched,
        }
    }
}

/// One run: the baseline, then each ack phase, and each one's cost
/// against the baseline.
async fn run_once(args: &BenchArgs, plan: &Plan) -> anyhow::Result<Value> {
    let population = Population::plan(plan, args);
    let redis_pid = match &args.redis_url {
        Some(url) => redis_pid(url).await,
        None => None,
    };
    let mut phases = Map::new();
    let mut cost = Map::new();
    let baseline = phase(args, plan, &population, Phase::Baseline, redis_pid)
        .await
        .context("baseline")?;
    for &mode in &args.ack_modes {
        let p = Phase::Acks(mode);
        let figures = phase(args, plan, &population, p, redis_pid)
            .await
            .with_context(|| p.name())?;
        cost.insert(p.name().into(), cost_of(&baseline, &figures));
        phases.insert(p.name().into(), figures);
    }
    let pairs = population.pairs.len();
    Ok(json!({
        "scenario": "acks",
        "broker": if args.redis_url.is_some() { "redis" } else { "embedded" },
        "shape": {"connections": plan.connections, "tenants": plan.tenants,
                  "branches": plan.branches,
                  "recipients_per_event": plan.connections as f64 / pairs.max(1) as f64,
                  "events": plan.events, "rate_per_s": plan.rate,
                  "ack_within_s": args.ack_within_s},
        "cost": cost,
        "baseline": baseline,
        "phases": phases,
    }))
}

/// An ack phase's cost over the baseline: the extra gateway CPU per
/// acknowledged delivery (an id the gateway took from a connection that
/// received it: `acknowledged` + `repeated`), per ack message, per
/// acknowledged event; and the same for Redis when measured.
fn cost_of(baseline: &Value, phase: &Value) -> Value {
    let f = |v: &Value, path: &[&str]| -> f64 {
        path.iter()
            .fold(v, |v, k| &v[*k])
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let extra_s = f(phase, &["gateway", "cpu_s"]) - f(baseline, &["gateway", "cpu_s"]);
    let counters = &phase["gateway_counters"]["acks_total"];
    let acknowledged = f(counters, &["acknowledged"]);
    let acked_deliveries = acknowledged + f(counters, &["repeated"]);
    let messages = f(phase, &["acks", "messages"]);
    let per = |s: f64, n: f64| (n > 0.0 && s.is_finite()).then(|| s * 1e6 / n);
    let ratio = |a: f64, b: f64| (b > 0.0 && a.is_finite()).then(|| a / b);
    let redis_extra_s =
        f(phase, &["others", "redis_cpu_s"]) - f(baseline, &["others", "redis_cpu_s"]);
    let bench_extra_s = f(phase, &["others", "load_generator_cpu_s"])
        - f(baseline, &["others", "load_generator_cpu_s"]);
    let extra_switches =
        f(phase, &["gateway", "context_switches"]) - f(baseline, &["gateway", "context_switches"]);
    json!({
        "gateway_extra_cpu_s": extra_s.is_finite().then_some(extra_s),
        "gateway_cpu_ratio": ratio(f(phase, &["gateway", "cpu_s"]), f(baseline, &["gateway", "cpu_s"])),
        "gateway_extra_cpu_us_per_acked_delivery": per(extra_s, acked_deliveries),
        "gateway_extra_cpu_us_per_ack_message": per(extra_s, messages),
        "gateway_extra_cpu_us_per_acknowledged_event": per(extra_s, acknowledged),
        "gateway_extra_context_switches_per_ack_message": ratio(extra_switches, messages),
        "redis_extra_cpu_us_per_acknowledged_event": per(redis_extra_s, acknowledged),
        "load_generator_extra_cpu_us_per_ack_message": per(bench_extra_s, messages),
    })
}

/// The pid of the Redis at `url` when it runs on this machine (`INFO
/// server`'s `process_id`, and its `/proc` entry readable).
async fn redis_pid(url: &str) -> Option<u32> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .ok()?;
    let pid: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))?
        .trim()
        .parse()
        .ok()?;
    std::path::Path::new(&format!("/proc/{pid}/stat"))
        .exists()
        .then_some(pid)
}

/// CPU ticks of the load generator and of Redis (when measured).
#[derive(Clone, Copy)]
struct Others {
    bench: u64,
    redis: u64,
}

impl Others {
    fn sample(redis: Option<u32>) -> Others {
        Others {
            bench: procfs::cpu_ticks("/proc/self/stat"),
            redis: redis.map_or(0, |pid| procfs::cpu_ticks(&format!("/proc/{pid}/stat"))),
        }
    }

    fn since(self, before: Others, redis: Option<u32>) -> Value {
        let s = |a: u64, b: u64| a.saturating_sub(b) as f64 / TICKS_PER_S;
        json!({"load_generator_cpu_s": s(self.bench, before.bench),
               "redis_cpu_s": redis.map(|_| s(self.redis, before.redis))})
    }
}

/// One phase on a fresh gateway.
async fn phase(
    args: &BenchArgs,
    plan: &Plan,
    population: &Population,
    phase: Phase,
    redis_pid: Option<u32>,
) -> anyhow::Result<Value> {
    let target = Target::start(args, "gateway", args.redis_url.clone(), &[]).await?;
    let result = async {
        let acking = phase.acking();
        let within_s = (acking != Acking::Never).then_some(args.ack_within_s);
        let mut fleet = Fleet::connect_acking(&target, population, args, acking).await?;
        anyhow::ensure!(fleet.failed == 0, "{} connections failed", fleet.failed);
        tokio::time::sleep(SETTLE).await;
        let before = target.sample();
        let switches = target.pid.map_or(0, procfs::context_switches);
        let others = Others::sample(redis_pid);
        let started = Instant::now();
        let published = publish(args, plan, &target, population, within_s).await?;
        let publish_s = started.elapsed().as_secs_f64();
        let last_published = Instant::now();
        fleet.wait_for(published.expected, QUIET).await;
        let mut counted = Value::Null;
        if within_s.is_some() {
            // Every delivery acked by its client (batched: within 50 ms),
            // then every acked id counted by the gateway.
            let deadline = Instant::now() + COUNTED;
            while fleet.acked() < fleet.delivered() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let sent = fleet.acked();
            let mut seen = 0.0;
            while Instant::now() < deadline {
                seen = Counters::read(&target).await?.sum("wsgateway_acks_total");
                if seen >= sent as f64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            counted = json!({"sent": sent, "counted": seen,
                             "after_last_publication_s": last_published.elapsed().as_secs_f64()});
        }
        let after = target.sample();
        let switches = target
            .pid
            .map_or(0, procfs::context_switches)
            .saturating_sub(switches);
        let others = Others::sample(redis_pid).since(others, redis_pid);
        let window_s = started.elapsed().as_secs_f64();
        if let Some(n) = within_s {
            // Past the last event's deadline: whatever was not acked in
            // time has been redelivered by now.
            let until = last_published + Duration::from_secs(n.into()) + PAST_DEADLINE;
            tokio::time::sleep_until(until.into()).await;
        }
        let waited = target.sample();
        let counters = Counters::read(&target).await?;
        let closed = fleet.closed_by_server();
        let stats = fleet.finish().await;
        let cpu_s = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_S;
        let span_s = stats.last_us.saturating_sub(stats.first_us) as f64 / 1e6;
        let per = |n: u64| (n > 0).then(|| cpu_s * 1e6 / n as f64);
        let outcomes: Map<String, Value> = ["acknowledged", "repeated", "late", "ignored", "failed"]
            .iter()
            .map(|o| {
                let v = counters.get(&format!("wsgateway_acks_total{{outcome=\"{o}\"}}"));
                ((*o).to_owned(), json!(v))
            })
            .collect();
        let reasons: Map<String, Value> = ["no_ack", "no_audience"]
            .iter()
            .map(|r| {
                let v = counters.get(&format!(
                    "wsgateway_events_unacknowledged_total{{reason=\"{r}\"}}"
                ));
                ((*r).to_owned(), json!(v))
            })
            .collect();
        // Why the gateway closed or refused connections, if it did (4029,
        // the inbound rate limit that `ack` messages count toward, is
        // `connections_rejected_total{reason="rate_limit"}`).
        let disconnects: Map<String, Value> = counters
            .series("wsgateway_disconnects_total")
            .chain(counters.series("wsgateway_connections_rejected_total"))
            .filter(|(_, v)| *v > 0.0)
            .map(|(s, v)| (s.to_owned(), json!(v)))
            .collect();
        Ok(json!({
            "phase": phase.name(),
            "ack_within_s": within_s,
            "events": {"published": published.events, "requests": published.requests,
                       "refused_requests": published.refused, "publish_s": publish_s},
            "deliveries": {"expected": published.expected, "delivered": stats.delivered,
                           "missing": published.expected.saturating_sub(stats.delivered),
                           "misrouted": stats.misrouted, "redelivered": stats.redelivered,
                           "connections_closed_by_gateway": closed,
                           "escalations_received": stats.escalations,
                           "per_s": if span_s > 0.0 { stats.delivered as f64 / span_s } else { 0.0 }},
            "latency_ms": {"p50": percentile_ms(&stats.latencies_us, 0.5),
                           "p99": percentile_ms(&stats.latencies_us, 0.99),
                           "max": percentile_ms(&stats.latencies_us, 1.0)},
            "acks": {"messages": stats.ack_messages, "ids": stats.ack_ids,
                     "send_errors": stats.ack_errors,
                     "ids_per_message": (stats.ack_messages > 0)
                         .then(|| stats.ack_ids as f64 / stats.ack_messages as f64),
                     "counted": counted},
            "gateway_counters": {
                "acks_total": outcomes,
                "events_redelivered_total": counters.get("wsgateway_events_redelivered_total"),
                "events_unacknowledged_total": reasons,
                "closes": disconnects,
            },
            "gateway": {"cpu_s": cpu_s,
                        "cpu_us_per_event": (published.events > 0)
                            .then(|| cpu_s * 1e6 / published.events as f64),
                        "cpu_us_per_delivery": per(stats.delivered),
                        "cpu_s_until_deadlines": waited.cpu_ticks.saturating_sub(after.cpu_ticks) as f64 / TICKS_PER_S,
                        "context_switches": switches,
                        "rss_kib_after": after.rss_kib,
                        "window_s": window_s},
            "others": others,
        }))
    }
    .await;
    target.stop().await;
    result
}

/// What the publisher did.
struct Published {
    /// Events in requests answered 202.
    events: usize,
    requests: usize,
    /// Requests answered otherwise, or not at all.
    refused: usize,
    /// Deliveries the accepted events call for.
    expected: u64,
}

/// The bench's kitchen ticket `k` for `(tenant, branch)`, sent now.
fn ticket(tenant: i64, branch: i64, k: usize) -> Value {
    json!({"type": KITCHEN_EVENT, "tenant_id": tenant, "branch_id": branch,
           "ts": (now_us() / 1000) as i64, "sent_us": now_us(), "seq": k})
}

/// The stream: `plan.events` events, event `k` on the kitchen channel of
/// pair `k mod pairs`; every [`TICK`] one request with the events due by
/// then at `plan.rate` (all at once in requests of [`MAX_ITEMS`] when the
/// rate is 0), each with `ack` when `within_s` is given.
async fn publish(
    args: &BenchArgs,
    plan: &Plan,
    target: &Target,
    population: &Population,
    within_s: Option<u16>,
) -> anyhow::Result<Published> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let url = format!("http://{}/api/publish", target.addr);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut requests = JoinSet::new();
    let mut next = 0;
    while next < plan.events {
        tick.tick().await;
        let due = if plan.rate > 0.0 {
            ((started.elapsed().as_secs_f64() * plan.rate) as usize + 1).min(plan.events)
        } else {
            plan.events
        };
        while next < due {
            let end = due.min(next + MAX_ITEMS);
            let mut expected = 0;
            let items: Vec<Value> = (next..end)
                .map(|k| {
                    let (tenant, branch) = population.pairs[k % population.pairs.len()];
                    expected += population.kitchen_audience(tenant, branch);
                    let mut item = json!({"channel": format!("channel:branch:{branch}:kitchen"),
                                          "event": ticket(tenant, branch, k)});
                    if let Some(n) = within_s {
                        item["ack"] = json!({"within_s": n});
                    }
                    item
                })
                .collect();
            let count = items.len();
            let request = http.post(&url).bearer_auth(&args.api_key).json(&items);
            requests.spawn(async move {
                let accepted = matches!(request.send().await, Ok(r) if r.status() == 202);
                (accepted, count, expected)
            });
            next = end;
        }
    }
    let mut published = Published {
        events: 0,
        requests: 0,
        refused: 0,
        expected: 0,
    };
    while let Some(done) = requests.join_next().await {
        let (accepted, count, expected) = done?;
        published.requests += 1;
        if accepted {
            published.events += count;
            published.expected += expected;
        } else {
            published.refused += 1;
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

/// The gateway's counters, from `/ws/metrics`: each series (`name` or
/// `name{labels}`, as written) and its value.
struct Counters(HashMap<String, f64>);

impl Counters {
    async fn read(target: &Target) -> anyhow::Result<Counters> {
        let text = reqwest::get(format!("http://{}/ws/metrics", target.addr))
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(Counters::parse(&text))
    }

    fn parse(text: &str) -> Counters {
        Counters(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (series, value) = l.rsplit_once(' ')?;
                    Some((series.to_owned(), value.parse().ok()?))
                })
                .collect(),
        )
    }

    /// A series' value; `None` when the gateway does not export it.
    fn get(&self, series: &str) -> Option<f64> {
        self.0.get(series).copied()
    }

    /// Every series of metric `name`, with its value.
    fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0
            .iter()
            .filter(move |(s, _)| {
                s.strip_prefix(name)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
            })
            .map(|(s, v)| (s.as_str(), *v))
    }

    /// The sum of every series of metric `name`.
    fn sum(&self, name: &str) -> f64 {
        self.series(name).map(|(_, v)| v).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_read_each_series_and_sum_a_metric() {
        let c = Counters::parse(
            "# HELP wsgateway_acks_total x\n\
             # TYPE wsgateway_acks_total counter\n\
             wsgateway_acks_total{outcome=\"acknowledged\"} 40\n\
             wsgateway_acks_total{outcome=\"repeated\"} 760\n\
             wsgateway_acks_total_other 5\n\
             wsgateway_events_redelivered_total 0\n",
        );
        assert_eq!(
            c.get("wsgateway_acks_total{outcome=\"acknowledged\"}"),
            Some(40.0)
        );
        assert_eq!(c.sum("wsgateway_acks_total"), 800.0);
        assert_eq!(c.get("wsgateway_events_redelivered_total"), Some(0.0));
        assert_eq!(c.get("nope"), None);
    }

    #[test]
    fn the_cost_is_the_difference_over_the_acks() {
        let baseline = json!({"gateway": {"cpu_s": 1.0}, "others": {"load_generator_cpu_s": 1.0}});
        let phase = json!({"gateway": {"cpu_s": 1.5}, "others": {"load_generator_cpu_s": 2.0},
                           "acks": {"messages": 1000},
                           "gateway_counters": {"acks_total": {"acknowledged": 50, "repeated": 950}}});
        let c = cost_of(&baseline, &phase);
        assert_eq!(c["gateway_extra_cpu_us_per_acked_delivery"], 500.0);
        assert_eq!(c["gateway_extra_cpu_us_per_ack_message"], 500.0);
        assert_eq!(c["gateway_extra_cpu_us_per_acknowledged_event"], 10_000.0);
        assert_eq!(c["gateway_cpu_ratio"], 1.5);
        assert_eq!(c["redis_extra_cpu_us_per_acknowledged_event"], Value::Null);
    }
}
