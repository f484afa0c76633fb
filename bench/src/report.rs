//! The bench's figures, as text or JSON.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde_json::{Value, json};

use super::Plan;
use super::clients::ClientStats;
use super::floor::Floor;
use super::gateway::Sample;
use super::procfs::TICKS_PER_S;
use super::publish::Outcome;

pub struct Report {
    pub plan: Plan,
    pub connect_time: Duration,
    pub opened: usize,
    pub failed: usize,
    pub before: Sample,
    pub connected: Sample,
    pub idle: Sample,
    pub after: Sample,
    pub outcome: Outcome,
    pub stats: ClientStats,
}

impl Report {
    fn rss_per_connection_kib(&self) -> Option<f64> {
        (self.opened > 0 && self.connected.rss_kib > 0).then(|| {
            self.connected.rss_kib.saturating_sub(self.before.rss_kib) as f64 / self.opened as f64
        })
    }

    fn cpu_us_per_delivery(&self) -> Option<f64> {
        (self.stats.delivered > 0 && self.after.cpu_ticks > 0).then(|| {
            let ticks = self.after.cpu_ticks.saturating_sub(self.idle.cpu_ticks) as f64;
            ticks / TICKS_PER_S * 1e6 / self.stats.delivered as f64
        })
    }

    fn deliveries_per_s(&self) -> f64 {
        let span = self.stats.last_us.saturating_sub(self.stats.first_us) as f64 / 1e6;
        if span > 0.0 {
            self.stats.delivered as f64 / span
        } else {
            0.0
        }
    }

    fn percentile_ms(&self, p: f64) -> Option<f64> {
        percentile_ms(&self.stats.latencies_us, p)
    }

    fn missing(&self) -> u64 {
        self.outcome.expected.saturating_sub(self.stats.delivered)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "scenario": format!("{:?}", self.plan.scenario).to_lowercase(),
            "connections": {"planned": self.plan.connections, "opened": self.opened, "failed": self.failed,
                            "connect_s": self.connect_time.as_secs_f64()},
            "events": {"published": self.outcome.published, "rate_per_s": self.plan.rate,
                       "via": format!("{:?}", self.plan.via).to_lowercase()},
            "deliveries": {"expected": self.outcome.expected, "delivered": self.stats.delivered,
                           "missing": self.missing(), "misrouted": self.stats.misrouted,
                           "per_s": self.deliveries_per_s()},
            "latency_ms": {"p50": self.percentile_ms(0.50), "p99": self.percentile_ms(0.99),
                           "max": self.percentile_ms(1.0)},
            "event_latency_ms": event_latency_json(&self.stats.latencies_us, &self.stats.events),
            "gateway": {"rss_kib_before": self.before.rss_kib, "rss_kib_connected": self.connected.rss_kib,
                        "rss_kib_per_connection": self.rss_per_connection_kib(),
                        "rss_kib_after": self.after.rss_kib,
                        "cpu_us_per_delivery": self.cpu_us_per_delivery(),
                        "cpu_s_publish_phase": self.after.cpu_ticks.saturating_sub(self.idle.cpu_ticks) as f64 / TICKS_PER_S},
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt =
            |v: Option<f64>, digits: usize| v.map_or("n/a".into(), |v| format!("{v:.digits$}"));
        writeln!(f, "scenario        {:?}", self.plan.scenario)?;
        writeln!(
            f,
            "connections     {} opened, {} failed, in {:.1} s",
            self.opened,
            self.failed,
            self.connect_time.as_secs_f64()
        )?;
        writeln!(
            f,
            "events          {} published via {:?} ({})",
            self.outcome.published,
            self.plan.via,
            if self.plan.rate > 0.0 {
                format!("{}/s", self.plan.rate)
            } else {
                "all at once".into()
            }
        )?;
        writeln!(
            f,
            "deliveries      {} of {} expected: {} missing, {} misrouted; {:.0}/s",
            self.stats.delivered,
            self.outcome.expected,
            self.missing(),
            self.stats.misrouted,
            self.deliveries_per_s()
        )?;
        writeln!(
            f,
            "latency         p50 {} ms, p99 {} ms, max {} ms",
            opt(self.percentile_ms(0.5), 2),
            opt(self.percentile_ms(0.99), 2),
            opt(self.percentile_ms(1.0), 2)
        )?;
        let per_event = event_latency_json(&self.stats.latencies_us, &self.stats.events);
        let ms = |v: &Value| v.as_f64().map_or("n/a".into(), |v| format!("{v:.2}"));
        writeln!(
            f,
            "per event       first recipient p50 {} ms, p99 {} ms; last p50 {} ms, p99 {} ms",
            ms(&per_event["first"]["p50"]),
            ms(&per_event["first"]["p99"]),
            ms(&per_event["last"]["p50"]),
            ms(&per_event["last"]["p99"]),
        )?;
        writeln!(
            f,
            "gateway RSS     {} KiB before, {} KiB connected: {} KiB per connection; {} KiB after the events",
            self.before.rss_kib,
            self.connected.rss_kib,
            opt(self.rss_per_connection_kib(), 2),
            self.after.rss_kib,
        )?;
        writeln!(
            f,
            "gateway CPU     {} µs per delivery",
            opt(self.cpu_us_per_delivery(), 3)
        )
    }
}

/// A gateway run beside its floor: CPU per delivery against CPU per
/// write, p99 against p99 (`--with-floor`).
pub struct Compared {
    cpu: Option<(f64, f64)>,
    p99: Option<(f64, f64)>,
}

impl Compared {
    pub fn new(report: &Report, floor: &Floor) -> Compared {
        Compared {
            cpu: report
                .cpu_us_per_delivery()
                .map(|gw| (gw, floor.cpu_us_per_write)),
            p99: report.percentile_ms(0.99).zip(floor.p99_ms()),
        }
    }

    fn ratio(pair: Option<(f64, f64)>) -> Option<f64> {
        pair.and_then(|(gw, floor)| (floor > 0.0).then(|| gw / floor))
    }

    pub fn to_json(&self) -> Value {
        json!({"cpu": Compared::ratio(self.cpu), "p99": Compared::ratio(self.p99)})
    }
}

impl fmt::Display for Compared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |pair: Option<(f64, f64)>, unit: &str| match (pair, Compared::ratio(pair)) {
            (Some((gw, floor)), Some(r)) => {
                format!("gateway {gw:.3} {unit}, floor {floor:.3} {unit}: {r:.2}×")
            }
            _ => "n/a".into(),
        };
        writeln!(f, "vs floor CPU    {}", show(self.cpu, "µs"))?;
        writeln!(f, "vs floor p99    {}", show(self.p99, "ms"))
    }
}

/// The `p` quantile (0..=1) of latencies in microseconds, in milliseconds.
pub fn percentile_ms(latencies_us: &[u32], p: f64) -> Option<f64> {
    let mut l = latencies_us.to_vec();
    if l.is_empty() {
        return None;
    }
    l.sort_unstable();
    let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
    Some(l[i] as f64 / 1000.0)
}

/// Per event, the latency of its first and of its last recipient, and the
/// p50 and p99 of each over the events: the first says what comes before
/// the fan-out (the publish path), last minus first what the fan-out and
/// the readers add. `events[i]` is the event of `latencies_us[i]`.
pub fn event_latency_json(latencies_us: &[u32], events: &[u32]) -> Value {
    let mut spans: HashMap<u32, (u32, u32)> = HashMap::new();
    for (&l, &e) in latencies_us.iter().zip(events) {
        let (first, last) = spans.entry(e).or_insert((l, l));
        *first = (*first).min(l);
        *last = (*last).max(l);
    }
    let (first, last): (Vec<u32>, Vec<u32>) = spans.into_values().unzip();
    json!({
        "first": {"p50": percentile_ms(&first, 0.5), "p99": percentile_ms(&first, 0.99)},
        "last": {"p50": percentile_ms(&last, 0.5), "p99": percentile_ms(&last, 0.99)},
    })
}

/// The median of every number in the runs' reports, by path.
pub fn median(runs: &[Value]) -> Value {
    fn walk(runs: &[&Value]) -> Value {
        match runs.first() {
            Some(Value::Object(first)) => Value::Object(
                first
                    .keys()
                    .map(|k| {
                        let parts: Vec<&Value> = runs.iter().filter_map(|r| r.get(k)).collect();
                        (k.clone(), walk(&parts))
                    })
                    .collect(),
            ),
            Some(Value::Number(_)) => {
                let mut numbers: Vec<f64> = runs.iter().filter_map(|v| v.as_f64()).collect();
                numbers.sort_by(|a, b| a.total_cmp(b));
                match numbers.len() {
                    0 => Value::Null,
                    // The lower median for an even count: a figure of a real run.
                    n => json!(numbers[(n - 1) / 2]),
                }
            }
            Some(other) => (*other).clone(),
            None => Value::Null,
        }
    }
    walk(&runs.iter().collect::<Vec<_>>())
}

/// Runs `one` `--runs` times, prints each report, then their medians (or,
/// with `--json`, all of them and the medians as one document).
pub async fn print_runs<F, Fut>(args: &super::BenchArgs, mut one: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Value>>,
{
    use anyhow::Context;
    let runs = args.runs.max(1);
    let mut reports = Vec::new();
    for run in 1..=runs {
        let report = one().await.with_context(|| format!("run {run}"))?;
        if !args.json {
            println!("--- run {run} of {runs}");
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        reports.push(report);
    }
    let summary = median(&reports);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"runs": reports, "median": summary}))?
        );
    } else if reports.len() > 1 {
        println!("--- median of {} runs", reports.len());
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}
