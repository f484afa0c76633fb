//! The transactional outbox (`outbox`, docs/OUTBOX.md): from a backend's
//! COMMIT to the clients, and how fast a backlog drains.
//!
//! Each run makes a schema of its own in `--database-url`'s database
//! (dropped at the end) and creates the outbox table there with the
//! gateway's own DDL (`wsgateway outbox schema --table <schema>.outbox`).
//!
//! - **Latency**: a gateway consuming the table (embedded broker, or Redis
//!   with `--redis-url`), the waiters connected, then writers insert one
//!   row per transaction at `--rate` for `--duration-s` (round-robin on
//!   the branches' waiters channels), as a backend handling one request
//!   at a time per connection. Each event carries its sequence number;
//!   the bench keeps the instant each COMMIT returned, each client the
//!   instant each event arrived, and the figure is the difference over
//!   every (event, recipient) pair, with the pairs missing and duplicated.
//! - **Throughput**: for each `--outbox-batch`, `--backlog` rows committed
//!   first; the bench holds an `ACCESS EXCLUSIVE` lock on the table while
//!   a fresh gateway (with `WSGATEWAY_OUTBOX_BATCH`) starts and the
//!   waiters connect, so that its first claim waits on the lock; from the
//!   lock's release, the time until the last delivery and until the table
//!   is empty: rows per second.
//!
//! Gateway CPU (utime + stime) is taken over each phase, per row and per
//! delivery.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls};

use super::clients::{ClientStats, Fleet, Population, now_us};
use super::gateway::{Target, gateway_bin};
use super::procfs::{self, TICKS_PER_S};
use super::report::print_runs;
use super::setting::{OUTBOX_BATCH, OUTBOX_DATABASE_URL, OUTBOX_TABLE};
use super::{BenchArgs, Plan};

/// Connections writing rows in the latency phase: a request-per-row
/// backend has several; one would make the rate depend on one commit's
/// fsync at a time.
const WRITERS: usize = 4;
/// The most to wait for the last deliveries while none arrives.
const QUIET: Duration = Duration::from_secs(20);

/// Runs `--runs` runs, prints each, then the medians (or all as JSON).
pub async fn run(args: &BenchArgs, plan: &Plan) -> anyhow::Result<()> {
    print_runs(args, || run_once(args, plan)).await
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| "cannot connect to the database (--database-url)")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("bench: database connection ended: {e}");
        }
    });
    Ok(client)
}

/// One run: a schema of its own, both phases, the schema dropped whatever
/// happened.
async fn run_once(args: &BenchArgs, plan: &Plan) -> anyhow::Result<Value> {
    let db = connect(&args.database_url).await?;
    let schema = format!(
        "wsbench_{}_{}",
        std::process::id(),
        now_us() % 1_000_000_000
    );
    let table = format!("{schema}.outbox");
    let ddl = std::process::Command::new(gateway_bin(args)?)
        .args(["outbox", "schema", "--table", &table])
        .output()
        .context("cannot run `wsgateway outbox schema`")?;
    anyhow::ensure!(
        ddl.status.success(),
        "`wsgateway outbox schema` failed: {}",
        String::from_utf8_lossy(&ddl.stderr)
    );
    db.batch_execute(&String::from_utf8(ddl.stdout)?)
        .await
        .context("cannot create the outbox table")?;
    let result = phases(args, plan, &db, &table).await;
    let dropped = db
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await;
    let mut report = result?;
    dropped.context("cannot drop the run's schema")?;
    report["schema"] = json!(schema);
    Ok(report)
}

async fn phases(args: &BenchArgs, plan: &Plan, db: &Client, table: &str) -> anyhow::Result<Value> {
    let population = Population::plan(plan, args);
    let latency = latency_phase(args, plan, &population, db, table).await?;
    let mut throughput = serde_json::Map::new();
    for &batch in &args.outbox_batch {
        let figures = throughput_phase(args, &population, db, table, batch).await?;
        throughput.insert(format!("batch_{batch}"), figures);
    }
    Ok(json!({
        "scenario": "outbox",
        "broker": if args.redis_url.is_some() { "redis" } else { "embedded" },
        "connections": plan.connections,
        "latency": latency,
        "throughput": throughput,
    }))
}

/// A fresh gateway consuming `table`, with `WSGATEWAY_OUTBOX_BATCH` when
/// given.
async fn start_gateway(
    args: &BenchArgs,
    table: &str,
    batch: Option<usize>,
) -> anyhow::Result<Target> {
    let batch = batch.map(|b| b.to_string());
    let mut env = vec![
        (OUTBOX_TABLE.env, table),
        (OUTBOX_DATABASE_URL.env, args.database_url.as_str()),
    ];
    if let Some(batch) = &batch {
        env.push((OUTBOX_BATCH.env, batch.as_str()));
    }
    Target::start(args, "gateway", args.redis_url.clone(), &env).await
}

/// The event of row `k`: for the waiters of `(tenant, branch)`, with the
/// run's time base in `sent_us` (so that each client's "latency" is its
/// receive time after `base_us`) and `k` in `seq`.
fn event(tenant: i64, branch: i64, k: usize, base_us: u64) -> String {
    json!({"type": "ROUND_READY", "tenant_id": tenant, "branch_id": branch,
           "sent_us": base_us, "seq": k})
    .to_string()
}

fn channel(branch: i64) -> String {
    format!("channel:branch:{branch}:waiters")
}

async fn latency_phase(
    args: &BenchArgs,
    plan: &Plan,
    population: &Population,
    db: &Client,
    table: &str,
) -> anyhow::Result<Value> {
    let target = start_gateway(args, table, None).await?;
    let result = async {
        let mut fleet = Fleet::connect(&target, population, args).await?;
        anyhow::ensure!(fleet.failed == 0, "{} connections failed", fleet.failed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let backend = consumer_backend(db, table).await;
        let base_us = now_us();
        let before = target.sample();
        let others = Others::sample(backend);
        let started = Instant::now();
        let written = write_at_rate(args, plan, population, table, base_us).await?;
        let write_s = started.elapsed().as_secs_f64();
        let expected: u64 = (0..plan.events).map(|k| audience_of(population, k)).sum();
        fleet.wait_for(expected, QUIET).await;
        let after = target.sample();
        let others = Others::sample(backend).since(others, backend);
        let seen = fleet.finish_each().await;
        let pairs = Pairs::check(population, &seen, plan.events, base_us);
        let mut latencies: Vec<i64> = Vec::with_capacity(pairs.received.len());
        let mut first: HashMap<usize, i64> = HashMap::new();
        for &(k, at_us) in &pairs.received {
            let l = at_us as i64 - written.commit_us[k] as i64;
            latencies.push(l);
            let f = first.entry(k).or_insert(l);
            *f = (*f).min(l);
        }
        let mut first: Vec<i64> = first.into_values().collect();
        let cpu_s = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_S;
        let slow = latencies.iter().filter(|&&l| l > 100_000).count();
        Ok(json!({
            "rows": plan.events,
            "rate_per_s": plan.rate,
            "rows_per_s_written": plan.events as f64 / write_s,
            "commit_ms": {"p50": quantile_ms(&mut written.commit_took_us.clone(), 0.5),
                          "p99": quantile_ms(&mut written.commit_took_us.clone(), 0.99)},
            "deliveries": {"expected": expected, "received": pairs.received.len(),
                           "missing": pairs.missing, "duplicated": pairs.duplicated,
                           "misrouted": pairs.misrouted},
            "commit_to_delivery_ms": {"p50": quantile_ms(&mut latencies, 0.5),
                                      "p99": quantile_ms(&mut latencies, 0.99),
                                      "max": quantile_ms(&mut latencies, 1.0),
                                      "min": quantile_ms(&mut latencies, 0.0),
                                      "over_100ms": slow},
            "first_recipient_ms": {"p50": quantile_ms(&mut first, 0.5),
                                   "p99": quantile_ms(&mut first, 0.99)},
            "gateway": {"cpu_s": cpu_s,
                        "cpu_us_per_row": cpu_s * 1e6 / plan.events.max(1) as f64,
                        "cpu_us_per_delivery": cpu_s * 1e6 / pairs.received.len().max(1) as f64},
            "others": others,
        }))
    }
    .await;
    target.stop().await;
    result
}

/// The PostgreSQL backend (its process id) of the gateway's consumer: the
/// session, other than the bench's own (`db`'s, the lock holder's, the
/// writers'), whose last statement names the run's schema.
async fn consumer_backend(db: &Client, table: &str) -> Option<i32> {
    let schema = format!("%{}%", table.split('.').next().unwrap_or(table));
    for _ in 0..40 {
        let row = db
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
                 AND datname = current_database() AND query LIKE $1 \
                 AND query NOT LIKE 'LOCK%' AND query NOT LIKE 'INSERT%' LIMIT 1",
                &[&schema],
            )
            .await
            .ok()
            .flatten();
        if let Some(row) = row {
            return Some(row.get(0));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// CPU ticks of the consumer's backend (when PostgreSQL runs on this
/// machine) and of the load generator itself.
#[derive(Clone, Copy)]
struct Others {
    postgres: u64,
    bench: u64,
}

impl Others {
    fn sample(backend: Option<i32>) -> Others {
        Others {
            postgres: backend.map_or(0, |pid| procfs::cpu_ticks(&format!("/proc/{pid}/stat"))),
            bench: procfs::cpu_ticks("/proc/self/stat"),
        }
    }

    fn since(self, before: Others, backend: Option<i32>) -> Value {
        let s = |a: u64, b: u64| a.saturating_sub(b) as f64 / TICKS_PER_S;
        json!({"postgres_consumer_cpu_s": backend.map(|_| s(self.postgres, before.postgres)),
               "load_generator_cpu_s": s(self.bench, before.bench)})
    }
}

/// Recipients of row `k` (round-robin on the population's branches).
fn audience_of(population: &Population, k: usize) -> u64 {
    let (tenant, branch) = population.pairs[k % population.pairs.len()];
    population.audience(tenant, branch)
}

/// What the writers did: when each row's COMMIT returned (µs since the
/// epoch), and how long each transaction took.
struct Written {
    commit_us: Vec<u64>,
    commit_took_us: Vec<i64>,
}

/// Inserts `plan.events` rows, one per transaction, at `plan.rate` (open
/// loop: a row is due at its tick whatever the previous ones do), over
/// [`WRITERS`] connections.
async fn write_at_rate(
    args: &BenchArgs,
    plan: &Plan,
    population: &Population,
    table: &str,
    base_us: u64,
) -> anyhow::Result<Written> {
    let insert = format!(
        "INSERT INTO {table} (channels, event) VALUES (ARRAY[$1::text], ($2::text)::jsonb)"
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<(usize, i64, i64)>(plan.events.max(1));
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let mut client = connect(&args.database_url).await?;
        let statement = client.prepare(&insert).await?;
        let rx = rx.clone();
        writers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let next = rx.lock().await.recv().await;
                let Some((k, tenant, branch)) = next else {
                    break;
                };
                let began = Instant::now();
                let t = client.transaction().await?;
                t.execute(
                    &statement,
                    &[&channel(branch), &event(tenant, branch, k, base_us)],
                )
                .await?;
                t.commit().await?;
                done.push((k, now_us(), began.elapsed().as_micros() as i64));
            }
            anyhow::Ok(done)
        }));
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.rate.max(0.001)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for k in 0..plan.events {
        tick.tick().await;
        let (tenant, branch) = population.pairs[k % population.pairs.len()];
        tx.send((k, tenant, branch)).await?;
    }
    drop(tx);
    let mut written = Written {
        commit_us: vec![0; plan.events],
        commit_took_us: Vec::with_capacity(plan.events),
    };
    for writer in writers {
        for (k, at, took) in writer.await?? {
            written.commit_us[k] = at;
            written.commit_took_us.push(took);
        }
    }
    Ok(written)
}

/// Every (row, recipient) pair checked against the audience rules.
struct Pairs {
    /// (row, receive time in µs since the epoch), once per pair.
    received: Vec<(usize, u64)>,
    missing: u64,
    duplicated: u64,
    misrouted: u64,
}

impl Pairs {
    fn check(population: &Population, seen: &[ClientStats], rows: usize, base_us: u64) -> Pairs {
        let mut pairs = Pairs {
            received: Vec::new(),
            missing: 0,
            duplicated: 0,
            misrouted: 0,
        };
        for (member, stats) in population.members.iter().zip(seen) {
            pairs.misrouted += stats.misrouted;
            let mut got: HashMap<usize, u64> = HashMap::new();
            for (&seq, &l) in stats.events.iter().zip(&stats.latencies_us) {
                let k = seq as usize;
                if got.insert(k, base_us + l as u64).is_some() {
                    pairs.duplicated += 1;
                }
            }
            for k in 0..rows {
                let (tenant, branch) = population.pairs[k % population.pairs.len()];
                let mine = member.tenant == tenant && member.branch == branch;
                match got.remove(&k) {
                    Some(at) if mine => pairs.received.push((k, at)),
                    Some(_) => pairs.misrouted += 1,
                    None if mine => pairs.missing += 1,
                    None => {}
                }
            }
            // Rows that were never written.
            pairs.misrouted += got.len() as u64;
        }
        pairs
    }
}

/// The `p` quantile (0..=1) of `values` in µs, in ms.
fn quantile_ms(values: &mut [i64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let i = ((values.len() as f64 * p).ceil() as usize).clamp(1, values.len()) - 1;
    Some(values[i] as f64 / 1000.0)
}

async fn throughput_phase(
    args: &BenchArgs,
    population: &Population,
    db: &Client,
    table: &str,
    batch: usize,
) -> anyhow::Result<Value> {
    let rows = args.backlog;
    let base_us = now_us();
    // The backlog, committed before any consumer runs: one statement.
    let (tenants, branches): (Vec<i64>, Vec<i64>) = population.pairs.iter().copied().unzip();
    let filled = Instant::now();
    db.execute(
        &format!(
            "INSERT INTO {table} (channels, event) \
             SELECT ARRAY['channel:branch:' || p.b[1 + g % p.n] || ':waiters'], \
                    jsonb_build_object('type', 'ROUND_READY', 'tenant_id', p.t[1 + g % p.n], \
                                       'branch_id', p.b[1 + g % p.n], 'sent_us', $3::int8, 'seq', g) \
             FROM generate_series(0, $4::int8 - 1) g, \
                  (SELECT $1::int8[] AS t, $2::int8[] AS b, cardinality($1::int8[]) AS n) p"
        ),
        &[&tenants, &branches, &(base_us as i64), &(rows as i64)],
    )
    .await
    .context("cannot insert the backlog")?;
    let fill_s = filled.elapsed().as_secs_f64();
    // Held while the gateway starts and the waiters connect: its claim waits.
    let mut holder = connect(&args.database_url).await?;
    let hold = holder.transaction().await?;
    hold.batch_execute(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .await?;
    let target = start_gateway(args, table, Some(batch)).await;
    let target = match target {
        Ok(target) => target,
        Err(e) => {
            hold.rollback().await?;
            return Err(e);
        }
    };
    let result = async {
        let mut fleet = Fleet::connect(&target, population, args).await?;
        anyhow::ensure!(fleet.failed == 0, "{} connections failed", fleet.failed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let expected: u64 = (0..rows).map(|k| audience_of(population, k)).sum();
        let backend = consumer_backend(db, table).await;
        let before = target.sample();
        let others = Others::sample(backend);
        let released_us = now_us();
        let released = Instant::now();
        hold.rollback().await?;
        // The table's emptiness, watched beside the deliveries.
        let empty = Arc::new(AtomicBool::new(false));
        let watcher = {
            let empty = empty.clone();
            let query = format!("SELECT NOT EXISTS (SELECT 1 FROM {table})");
            let db = connect(&args.database_url).await?;
            tokio::spawn(async move {
                loop {
                    let row = db.query_one(&query, &[]).await?;
                    if row.get::<_, bool>(0) {
                        empty.store(true, Ordering::Relaxed);
                        return anyhow::Ok(released.elapsed());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        fleet.wait_for(expected, QUIET).await;
        let after = target.sample();
        let others = Others::sample(backend).since(others, backend);
        let empty_after = tokio::time::timeout(Duration::from_secs(30), watcher)
            .await
            .context("the table was not empty 30 s after the last delivery")???;
        let seen = fleet.finish_each().await;
        let pairs = Pairs::check(population, &seen, rows, base_us);
        let last_us = pairs.received.iter().map(|&(_, at)| at).max().unwrap_or(0);
        let drain_s = last_us.saturating_sub(released_us) as f64 / 1e6;
        let cpu_s = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_S;
        Ok(json!({
            "batch": batch,
            "rows": rows,
            "fill_s": fill_s,
            "deliveries": {"expected": expected, "received": pairs.received.len(),
                           "missing": pairs.missing, "duplicated": pairs.duplicated,
                           "misrouted": pairs.misrouted},
            "last_delivery_s": drain_s,
            "table_empty_s": empty_after.as_secs_f64(),
            "rows_per_s": rows as f64 / drain_s.max(1e-6),
            "gateway": {"cpu_s": cpu_s,
                        "cpu_us_per_row": cpu_s * 1e6 / rows.max(1) as f64,
                        "cpu_us_per_delivery": cpu_s * 1e6 / pairs.received.len().max(1) as f64},
            "others": others,
        }))
    }
    .await;
    target.stop().await;
    result
}
