//! A publisher beside the reconnect storm (`resume --beside-rate R`): one
//! event per `POST /api/publish`, R requests a second, on a tenant none of
//! the storm's clients belongs to (so nothing it publishes is theirs to
//! replay), from a quiet moment before the storm until the storm's end.
//! Each request's status (or its lack) and latency are recorded, and the
//! report gives them for the quiet moment and for the storm apart.
//!
//! The publisher has a thread and a runtime of its own: the storm's 2 000
//! clients keep the load generator's runtime busy, and a request's answer
//! must not wait behind their reads to be timed. Requests are due at
//! their time whether or not earlier ones were answered (an open loop),
//! over 16 connections opened before the storm and kept (a backend's
//! pool), and each one's latency runs from its due time: a slow answer
//! does not hide the ones that queued behind it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::report::percentile_ms;

/// How long the publisher runs alone before the storm: its baseline.
pub const QUIET: Duration = Duration::from_secs(2);
/// The publisher's connections (see [`publish`]).
const CONNECTIONS: usize = 16;
/// The most one request may take; past it, counted as unanswered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The slowest answers of the storm reported with their send times.
const SLOWEST: usize = 8;
/// The publisher's tenant and branch: none of the storm's clients is of it.
const TENANT: i64 = 2;
const BRANCH: i64 = 2;

/// One request: when it was due, and its status and latency (`None`: no
/// answer, an error or the timeout).
struct Answer {
    due: Instant,
    status: Option<u16>,
    latency_us: u32,
}

/// The running publisher; [`Beside::finish`] stops it.
pub struct Beside {
    rate: f64,
    stop: CancellationToken,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
    answers: Arc<Mutex<Vec<Answer>>>,
}

impl Beside {
    /// Starts publishing to the gateway at `addr`, `rate` requests a second.
    pub fn start(addr: SocketAddr, api_key: &str, rate: f64) -> anyhow::Result<Beside> {
        anyhow::ensure!(rate > 0.0, "--beside-rate must be above 0");
        let stop = CancellationToken::new();
        let answers = Arc::new(Mutex::new(Vec::new()));
        let url = format!("http://{addr}/api/publish");
        let key = api_key.to_owned();
        let thread = {
            let (stop, answers) = (stop.clone(), answers.clone());
            std::thread::Builder::new()
                .name("beside".into())
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(publish(url, key, rate, stop, answers))
                })
                .context("cannot start the publisher's thread")?
        };
        Ok(Beside {
            rate,
            stop,
            thread,
            answers,
        })
    }

    /// Stops sending, waits for the requests in flight, and reports the
    /// requests due before `storm.0` (quiet) and from it to `storm.1`
    /// (storm); those due after the storm's end are left out.
    pub fn finish(self, storm: (Instant, Instant)) -> anyhow::Result<Value> {
        self.stop.cancel();
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the publisher's thread panicked"))??;
        let answers = std::mem::take(&mut *self.answers.lock().unwrap_or_else(|e| e.into_inner()));
        let (quiet, during): (Vec<&Answer>, Vec<&Answer>) = answers
            .iter()
            .filter(|a| a.due <= storm.1)
            .partition(|a| a.due < storm.0);
        // The slowest answers of the storm and when they were due: where in
        // the storm a publish waits.
        let mut slowest: Vec<&&Answer> = during.iter().filter(|a| a.status.is_some()).collect();
        slowest.sort_by_key(|a| std::cmp::Reverse(a.latency_us));
        let slowest: Vec<Value> = slowest
            .iter()
            .take(SLOWEST)
            .map(|a| {
                json!({"due_at_ms": a.due.duration_since(storm.0).as_millis() as u64,
                       "ms": a.latency_us as f64 / 1000.0})
            })
            .collect();
        Ok(json!({
            "rate_per_s": self.rate,
            "tenant": TENANT,
            "quiet": figures(&quiet),
            "storm": figures(&during),
            "storm_slowest": slowest,
        }))
    }
}

/// Sends one request every `1 / rate` s until `stop`, then waits for the
/// ones in flight (each ends within [`REQUEST_TIMEOUT`]). Request `k`
/// goes on connection `k % CONNECTIONS`, each kept open from the first
/// request on, as a backend's connection pool would; a request's latency
/// runs from its due time, so waiting behind a slow one on the same
/// connection counts.
async fn publish(
    url: String,
    key: String,
    rate: f64,
    stop: CancellationToken,
    answers: Arc<Mutex<Vec<Answer>>>,
) -> anyhow::Result<()> {
    let mut lanes = Vec::with_capacity(CONNECTIONS);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let (send, mut lane) = tokio::sync::mpsc::unbounded_channel::<(Instant, Value)>();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(1)
            .build()?;
        let (url, key, answers) = (url.clone(), key.clone(), answers.clone());
        workers.spawn(async move {
            while let Some((due, body)) = lane.recv().await {
                let status = match http.post(&url).bearer_auth(&key).json(&body).send().await {
                    // The whole answer, as a caller reads it.
                    Ok(response) => {
                        let status = response.status().as_u16();
                        response.bytes().await.ok().map(|_| status)
                    }
                    Err(_) => None,
                };
                let latency_us = due.elapsed().as_micros().min(u32::MAX as u128) as u32;
                answers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Answer {
                        due,
                        status,
                        latency_us,
                    });
            }
        });
        lanes.push(send);
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for seq in 0u64.. {
        let due = tokio::select! {
            _ = stop.cancelled() => break,
            due = tick.tick() => due.into_std(),
        };
        let body = json!([{"channel": format!("channel:branch:{BRANCH}:waiters"),
                           "event": {"type": "ROUND_READY", "tenant_id": TENANT,
                                     "branch_id": BRANCH, "seq": seq, "note": "beside"}}]);
        let _ = lanes[seq as usize % CONNECTIONS].send((due, body));
    }
    drop(lanes);
    while workers.join_next().await.is_some() {}
    Ok(())
}

/// Counts by status and latency quantiles of the answered requests.
fn figures(answers: &[&Answer]) -> Value {
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut accepted = 0;
    let mut other = 0;
    let mut unanswered = 0;
    for a in answers {
        match a.status {
            Some(202) => accepted += 1,
            Some(s) => {
                other += 1;
                *statuses.entry(s.to_string()).or_default() += 1;
            }
            None => unanswered += 1,
        }
    }
    let latencies: Vec<u32> = answers
        .iter()
        .filter(|a| a.status.is_some())
        .map(|a| a.latency_us)
        .collect();
    json!({
        "sent": answers.len(),
        "status": {"202": accepted, "other": other, "unanswered": unanswered},
        "other_statuses": statuses,
        "latency_ms": {"p50": percentile_ms(&latencies, 0.5), "p99": percentile_ms(&latencies, 0.99),
                       "max": percentile_ms(&latencies, 1.0)},
    })
}
