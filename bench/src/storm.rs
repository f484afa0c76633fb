//! The reconnect storm: history filled, then every client reconnects at
//! once with the same `last_event_id` and reads its replay.
//!
//! The events go through the publish API (events `PUBLISH`ed straight on
//! Redis are not kept for resume), all on one branch, so each client's
//! replay is the whole history after the cursor. Times are from the moment
//! the storm starts (every connection opened at once) to each client's
//! `connected` and to its last replayed event; the gateway's CPU is its
//! utime + stime over the storm, its memory the highest VmRSS sampled
//! every 20 ms during it. With `--beside-rate`, a publisher runs beside
//! the storm on another tenant (see `beside.rs`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use wsgateway::auth::{StaffClaims, mint, unix_now};

use super::beside::Beside;
use super::clients::{Ws, client_address, handshake};
use super::gateway::{Sample, Target};
use super::procfs::TICKS_PER_S;
use super::report::percentile_ms;
use super::{BenchArgs, Plan};

/// Events per publish request.
const BATCH: usize = 100;
/// The most a client waits for its whole replay.
const PATIENCE: Duration = Duration::from_secs(120);

/// What one client saw, in microseconds from the storm's start.
#[derive(Debug, Default, Clone)]
struct Seen {
    connected_us: Option<u32>,
    recovered: bool,
    replayed: u64,
    /// When the last expected replayed event arrived.
    done_us: Option<u32>,
    /// Why it failed, if it did (the error's root cause).
    failure: Option<String>,
}

pub async fn run(target: &Target, args: &BenchArgs, plan: &Plan) -> anyhow::Result<Value> {
    let (tenant, branch) = (1, 1);
    let cursor = fill_history(target, args, plan.events, tenant, branch).await?;
    let expected = plan.events.saturating_sub(1) as u64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The publisher beside the storm, alone for a moment first: its baseline.
    let beside = match args.beside_rate {
        Some(rate) if rate > 0.0 => {
            let beside = Beside::start(target.addr, &args.api_key, rate)?;
            tokio::time::sleep(super::beside::QUIET).await;
            Some(beside)
        }
        _ => None,
    };
    let before = target.sample();
    let overflows_before = listen_overflows();
    // Sampled while the storm lasts, for the peak.
    let peak_rss = PeakRss::start(target.pid, before.rss_kib);

    let exp = unix_now() + 24 * 3600;
    let started = Instant::now();
    let mut clients = Vec::with_capacity(plan.connections);
    for i in 0..plan.connections {
        let token = mint(
            &args.jwt_secret,
            &StaffClaims {
                sub: i as i64 + 1,
                tenant_id: tenant,
                branch_ids: vec![branch],
                roles: vec!["WAITER".into()],
                exp,
                iat: None,
                jti: None,
            },
        );
        let url = format!(
            "ws://{}/ws/waiter?token={token}&last_event_id={cursor}",
            target.addr
        );
        let (server, local) = (target.addr, client_address(i, args));
        clients.push(tokio::spawn(async move {
            resume(server, local, &url, started, expected).await
        }));
    }
    let mut seen = Vec::with_capacity(clients.len());
    // Held open until every client is done, so that none leaves early.
    let mut open = Vec::with_capacity(clients.len());
    for client in clients {
        if let Ok((s, ws)) = client.await {
            seen.push(s);
            open.extend(ws);
        }
    }
    let storm = started.elapsed();
    let during = target.sample();
    let overflows = listen_overflows().saturating_sub(overflows_before);
    let peak_rss_kib = peak_rss.stop().await;
    let counters = gateway_counters(target).await;
    let beside = beside
        .map(|b| b.finish((started, started + storm)))
        .transpose()?;
    drop(open);
    Ok(report(
        plan,
        target,
        expected,
        &seen,
        storm,
        before,
        during,
        peak_rss_kib,
        Kernel { overflows },
        counters,
        beside,
    ))
}

/// One client of the storm: connects from `local` with its cursor in
/// `url`, then reads its replay of `expected` events, within [`PATIENCE`].
/// What it saw, and its socket unless it failed.
async fn resume(
    server: SocketAddr,
    local: Ipv4Addr,
    url: &str,
    started: Instant,
    expected: u64,
) -> (Seen, Option<Ws>) {
    let mut seen = Seen::default();
    let since = |at: Instant| at.duration_since(started).as_micros().min(u32::MAX as u128) as u32;
    let read = async {
        let (mut ws, hello) = handshake(server, local, url).await?;
        seen.connected_us = Some(since(Instant::now()));
        seen.recovered = hello.contains("\"recovered\":true");
        // Not recovered: nothing is replayed, nothing to wait for.
        while seen.recovered && seen.replayed < expected {
            match ws.next().await {
                Some(Ok(Message::Text(_))) => seen.replayed += 1,
                Some(Ok(_)) => {}
                _ => anyhow::bail!("closed after {} replayed events", seen.replayed),
            }
        }
        if seen.recovered {
            seen.done_us = Some(since(Instant::now()));
        }
        anyhow::Ok(ws)
    };
    match tokio::time::timeout(PATIENCE, read).await {
        Ok(Ok(ws)) => (seen, Some(ws)),
        Ok(Err(e)) => {
            seen.failure = Some(e.root_cause().to_string());
            (seen, None)
        }
        Err(_) => {
            seen.failure = Some(format!("not done within {} s", PATIENCE.as_secs()));
            (seen, None)
        }
    }
}

/// The kernel's count of connections dropped because a listen queue was
/// full (`TcpExtListenOverflows`, for the whole machine); 0 when it cannot
/// be read.
fn listen_overflows() -> u64 {
    let netstat = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = netstat.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let at = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows");
        return at
            .and_then(|i| values.split_whitespace().nth(i)?.parse().ok())
            .unwrap_or(0);
    }
    0
}

/// What the kernel counted during the storm.
struct Kernel {
    /// `TcpExtListenOverflows` during the storm (machine-wide).
    overflows: u64,
}

/// The gateway's counters of refusals and resumes after the storm (from
/// `/ws/metrics`), by series; empty when it cannot be read.
async fn gateway_counters(target: &Target) -> serde_json::Map<String, Value> {
    const KEPT: [&str; 4] = [
        "wsgateway_connections_rejected_total",
        "wsgateway_handshakes_evicted_total",
        "wsgateway_resumes_total",
        "wsgateway_replayed_events_total",
    ];
    let url = format!("http://{}/ws/metrics", target.addr);
    let text = match reqwest::get(&url).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    text.lines()
        .filter(|l| KEPT.iter().any(|k| l.starts_with(k)))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), json!(value.parse::<f64>().ok()?)))
        })
        .collect()
}

/// The gateway's highest VmRSS, sampled every 20 ms until stopped.
struct PeakRss {
    peak: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
    sampler: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    /// Starts sampling the process `pid` (none: the peak stays `from_kib`).
    fn start(pid: Option<u32>, from_kib: u64) -> PeakRss {
        let peak = Arc::new(AtomicU64::new(from_kib));
        let stop = tokio_util::sync::CancellationToken::new();
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                let Some(pid) = pid else { return };
                let mut every = tokio::time::interval(Duration::from_millis(20));
                while !stop.is_cancelled() {
                    every.tick().await;
                    peak.fetch_max(super::procfs::rss_kib(pid), Ordering::Relaxed);
                }
            })
        };
        PeakRss {
            peak,
            stop,
            sampler,
        }
    }

    /// Stops sampling; the peak, in KiB.
    async fn stop(self) -> u64 {
        self.stop.cancel();
        let _ = self.sampler.await;
        self.peak.load(Ordering::Relaxed)
    }
}

/// Publishes `events` on one branch's waiters channel, in order; returns
/// the first event's id, the clients' cursor.
async fn fill_history(
    target: &Target,
    args: &BenchArgs,
    events: usize,
    tenant: i64,
    branch: i64,
) -> anyhow::Result<String> {
    let http = reqwest::Client::new();
    let url = format!("http://{}/api/publish", target.addr);
    let mut first = None;
    for start in (0..events).step_by(BATCH) {
        let items: Vec<Value> = (start..(start + BATCH).min(events))
            .map(|k| {
                json!({"channel": format!("channel:branch:{branch}:waiters"),
                       "event": {"type": "ROUND_READY", "tenant_id": tenant, "branch_id": branch,
                                 "seq": k, "round": {"items": 3, "table_id": k % 40, "note": "bench"}}})
            })
            .collect();
        let response = http
            .post(&url)
            .bearer_auth(&args.api_key)
            .json(&items)
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == 202,
            "publish answered {}",
            response.status()
        );
        let answer: Value = response.json().await?;
        if first.is_none() {
            first = answer["event_ids"][0].as_str().map(str::to_owned);
        }
    }
    first.context("nothing published")
}

#[allow(clippy::too_many_arguments)]
fn report(
    plan: &Plan,
    target: &Target,
    expected: u64,
    seen: &[Seen],
    storm: Duration,
    before: Sample,
    during: Sample,
    peak_rss_kib: u64,
    kernel: Kernel,
    counters: serde_json::Map<String, Value>,
    beside: Option<Value>,
) -> Value {
    let connected: Vec<u32> = seen.iter().filter_map(|s| s.connected_us).collect();
    let done: Vec<u32> = seen.iter().filter_map(|s| s.done_us).collect();
    let replayed: u64 = seen.iter().map(|s| s.replayed).sum();
    let recovered = seen.iter().filter(|s| s.recovered).count();
    let mut failures = std::collections::BTreeMap::<&str, usize>::new();
    for failure in seen.iter().filter_map(|s| s.failure.as_deref()) {
        *failures.entry(failure).or_default() += 1;
    }
    let cpu_s = during.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_S;
    json!({
        "scenario": "resume",
        "broker": if target.redis_url.is_some() { "redis" } else { "embedded" },
        "history_events": plan.events,
        "clients": {"planned": plan.connections, "connected": connected.len(),
                    "recovered": recovered, "not_recovered": connected.len() - recovered,
                    "complete": done.len(), "failed": failures.values().sum::<usize>()},
        "failures": failures,
        "replay": {"expected_per_client": expected, "replayed": replayed,
                   "missing": (expected * plan.connections as u64).saturating_sub(replayed)},
        "connected_ms": {"p50": percentile_ms(&connected, 0.5), "p99": percentile_ms(&connected, 0.99)},
        "replay_done_ms": {"p50": percentile_ms(&done, 0.5), "p99": percentile_ms(&done, 0.99),
                           "max": percentile_ms(&done, 1.0)},
        "storm_s": storm.as_secs_f64(),
        "gateway": {"cpu_s": cpu_s,
                    "cpu_us_per_replayed_event": (replayed > 0).then(|| cpu_s * 1e6 / replayed as f64),
                    "rss_kib_before": before.rss_kib, "rss_kib_peak": peak_rss_kib,
                    "rss_kib_done": during.rss_kib},
        "gateway_counters": counters,
        "listen_overflows": kernel.overflows,
        "beside": beside,
    })
}
