//! `wsgateway-bench`: the project's load generator, a crate of its own so
//! that the gateway's library and binary contain none of it.
//!
//! It opens authenticated WebSocket connections (spread over tenants and
//! branches, with client addresses spread over 127.0.0.0/8 to get past the
//! ephemeral-port limit of one address), publishes events through the
//! publish API or straight on Redis, and reports deliveries, end-to-end
//! latency, missing and misrouted deliveries, and the gateway's memory per
//! connection and CPU time per delivery (from /proc). By default it starts
//! the gateway itself (the `wsgateway` binary next to its own, or
//! `--gateway-bin`), so one command reproduces a figure. It uses the
//! gateway's library only as a client would: to mint tokens, and for the
//! names of the settings it gives the gateway it starts.

mod acks;
mod beside;
mod clients;
mod floor;
mod gateway;
mod nodes;
mod outbox;
pub mod procfs;
mod publish;
mod redis_servers;
mod report;
mod storm;
mod uring;

use std::time::{Duration, Instant};

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use wsgateway::cli::dev::{DEV_API_KEY, DEV_JWT_SECRET, DEV_TABLE_TOKEN_SECRET};
use wsgateway::config::SettingInfo;

/// The gateway's settings the bench sets or shares (flag and environment
/// variable), by their names in the gateway's settings table.
pub(crate) mod setting {
    use super::SettingInfo;
    pub const JWT_SECRET: &SettingInfo = SettingInfo::named("jwt_secret");
    pub const TABLE_TOKEN_SECRET: &SettingInfo = SettingInfo::named("table_token_secret");
    pub const API_KEY: &SettingInfo = SettingInfo::named("api_key");
    pub const REDIS_URL: &SettingInfo = SettingInfo::named("redis_url");
    pub const REDIS_MODE: &SettingInfo = SettingInfo::named("redis_mode");
    pub const LISTEN: &SettingInfo = SettingInfo::named("listen");
    pub const MAX_CONNECTIONS: &SettingInfo = SettingInfo::named("max_connections");
    pub const MAX_PENDING_CONNECTIONS: &SettingInfo = SettingInfo::named("max_pending_connections");
    pub const DRAIN_S: &SettingInfo = SettingInfo::named("drain_s");
    pub const OUTBOX_TABLE: &SettingInfo = SettingInfo::named("outbox_table");
    pub const OUTBOX_DATABASE_URL: &SettingInfo = SettingInfo::named("outbox_database_url");
    pub const OUTBOX_BATCH: &SettingInfo = SettingInfo::named("outbox_batch");
}

/// The scenarios; each sets defaults that flags override.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Hold N idle authenticated connections; report memory per connection.
    Idle,
    /// 5 000 connections, 1 000 events published at once.
    Burst,
    /// 10 000 connections of one branch, 10 events/s.
    Broadcast,
    /// 1 000 connections, 100 events/s.
    Steady,
    /// No gateway: plain blocking writes to 10 000 loopback sockets, 10
    /// events/s; the kernel's floor under the broadcast figures.
    Floor,
    /// The child process of `floor` that reads its sockets (internal).
    #[value(hide = true)]
    FloorReaders,
    /// Reconnect storm: 1 000 events (`--events`) in one branch's history,
    /// then 2 000 clients (`--connections`) resume at once from its first
    /// (`last_event_id`); time to each one's last replayed event, gateway
    /// CPU and peak RSS, why clients failed, the gateway's refusal and
    /// resume counters. With `--redis-url`, the gateway keeps history in
    /// Redis.
    Resume,
    /// Three gateway nodes on a Redis the bench starts (one server, or a
    /// cluster of three primaries: `--redis`): 1 000 connections on nodes 1
    /// and 2, none on node 3, 200 events/s for 20 s through the serving
    /// nodes' APIs; deliveries/s, each node's CPU, and the CPU of the node
    /// with no clients against a serving node's.
    Nodes,
    /// The transactional outbox, in a schema of its own in
    /// `--database-url`'s database: 100 waiters over 5 branches; rows
    /// inserted one per transaction at 200/s for 20 s, commit-to-delivery
    /// latency; then a backlog of `--backlog` rows drained by a fresh
    /// gateway per `--outbox-batch`, rows per second. With `--redis-url`,
    /// the Redis broker.
    Outbox,
    /// What an acknowledgement costs (PROTOCOL.md §15): 1 000 kitchen
    /// displays over 2 tenants × 25 branches (20 per event), events on the
    /// branches' kitchen channels at 200/s for 20 s through the publish
    /// API, in phases of a fresh gateway each: without `ack` (the
    /// baseline), then with `"ack": {"within_s": 30}` and every client
    /// acking each event as it arrives, then acking in batches every
    /// 50 ms (`--ack-modes`); gateway CPU per event, per delivery and per
    /// ack against the baseline, and the gateway's ack counters. With
    /// `--redis-url`, the Redis broker.
    Acks,
}

/// How the clients of `acks` acknowledge, one phase each (`--ack-modes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AckMode {
    /// One `ack` message per event, as soon as it arrives.
    Each,
    /// Every 50 ms, the ids received since (up to 20 per message).
    Batched,
}

/// Which Redis `nodes` starts (`--redis`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RedisTopology {
    /// One `redis-server`.
    Single,
    /// Three primaries made one cluster (`WSGATEWAY_REDIS_MODE=cluster`).
    Cluster,
    /// Each run: single, then cluster.
    Both,
}

/// Whose publish API `nodes` publishes through (`--publish-to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishTo {
    /// Nodes 1 and 2 in turn: node 3 does nothing but receive.
    Serving,
    /// The three nodes in turn.
    All,
}

/// How the floor's writers send (`--floor-io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FloorIo {
    /// One blocking `write` per socket.
    Write,
    /// One `io_uring_enter` per batch of up to 256 sends.
    Uring,
}

/// What the floor's readers are (`--floor-readers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FloorReaders {
    /// Fixed-size binary frames, read as bytes: the kernel's floor.
    Raw,
    /// WebSocket text frames of an event's JSON, read and parsed as the
    /// load generator's clients do (tokio-tungstenite, serde_json).
    Ws,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    Api,
    Redis,
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "wsgateway-bench",
    version,
    about = "Load generator for wsgateway: connections, events, latency, memory and CPU figures"
)]
pub struct BenchArgs {
    /// Which scenario's defaults to use.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Connections to open.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Tenants to spread connections over.
    #[arg(long)]
    pub tenants: Option<usize>,
    /// Branches per tenant to spread connections over.
    #[arg(long)]
    pub branches: Option<usize>,
    /// Share of connections on /ws/admin (the rest on /ws/waiter); idle
    /// also uses kitchen and diner connections.
    #[arg(long, default_value_t = 0.0)]
    pub admin_share: f64,
    /// Events to publish (burst; resume: into the branch's history, each
    /// client replaying all but the first) or events per second
    /// (broadcast, steady).
    #[arg(long)]
    pub events: Option<usize>,
    /// Events per second; 0 publishes all at once.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How long to publish at the rate, or to hold idle connections, in seconds.
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Publish through the API or straight on Redis.
    #[arg(long, value_enum, default_value_t = Via::Api)]
    pub via: Via,
    /// A running gateway to use (http://host:port) instead of starting one.
    #[arg(long)]
    pub url: Option<String>,
    /// The running gateway's process id, for its memory and CPU figures.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// The gateway binary to start (unless `--url`); default: `wsgateway`
    /// in the directory of this program (cargo's target/release or
    /// target/debug, where `cargo build --workspace` puts both).
    #[arg(long, env = "WSGATEWAY_BIN", value_name = "PATH")]
    pub gateway_bin: Option<PathBuf>,
    /// Redis for `--via redis`, and for the started gateway.
    #[arg(long = setting::REDIS_URL.flag, env = setting::REDIS_URL.env, hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Client addresses: 127.0.0.1 up to 127.0.0.<N>.
    #[arg(long, default_value_t = 50)]
    pub client_addresses: u8,
    /// Connections opened at once (`resume` opens all its connections at
    /// once, whatever this says).
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// `WSGATEWAY_MAX_PENDING_CONNECTIONS` of the gateway the bench starts:
    /// connections between accept and admission. While that many are
    /// pending, each new one evicts the oldest still sending its request
    /// head, so a storm of more clients at once than this loses some.
    #[arg(long, default_value_t = 4096)]
    pub max_pending_connections: usize,
    /// A setting of the gateway the bench starts, as its environment
    /// variable (`WSGATEWAY_RESUME_WAIT_S=30`); repeatable. It overrides
    /// the bench's own.
    #[arg(long, value_name = "NAME=VALUE", value_parser = parse_env)]
    pub gateway_env: Vec<(String, String)>,
    /// After each gateway run, measure the kernel's floor for the same
    /// fan-out (recipients per event, rate, frame size) and report both
    /// and their ratios (burst, broadcast, steady).
    #[arg(long)]
    pub with_floor: bool,
    /// `--with-floor`: hold only one event's recipients, all written every
    /// event (warm in the caches), instead of as many sockets as the
    /// gateway held, each event's recipients in turn.
    #[arg(long)]
    pub floor_hot: bool,
    /// How the floor writes: a `write` per socket, or io_uring batches.
    #[arg(long, value_enum, default_value_t = FloorIo::Write)]
    pub floor_io: FloorIo,
    /// How the floor's readers read: raw bytes, or WebSocket frames parsed
    /// as JSON like the gateway's clients (to separate the readers' share
    /// of a latency gap from the gateway's).
    #[arg(long, value_enum, default_value_t = FloorReaders::Raw)]
    pub floor_readers: FloorReaders,
    /// `resume`: a publisher beside the storm, this many requests a second
    /// (one event each, on a tenant none of the storm's clients is of),
    /// from 2 s before the storm to its end; the report gives its statuses
    /// and latencies before and during the storm.
    #[arg(long, value_name = "PER_S")]
    pub beside_rate: Option<f64>,
    /// `floor`: bytes per write (default 200, about a broadcast frame).
    #[arg(long)]
    pub frame_bytes: Option<usize>,
    /// `floor-readers`: the address to connect to (internal).
    #[arg(long, hide = true)]
    pub floor_addr: Option<String>,
    /// `nodes`: the Redis the three nodes share (started by the bench on
    /// free loopback ports, stopped at the end of each run).
    #[arg(long, value_enum, default_value_t = RedisTopology::Both)]
    pub redis: RedisTopology,
    /// `nodes`: the publish APIs the events go through, in turn.
    #[arg(long, value_enum, default_value_t = PublishTo::Serving)]
    pub publish_to: PublishTo,
    /// `outbox`: the PostgreSQL database the run's schema is made in (the
    /// gateway is given the same URL).
    #[arg(
        long,
        env = "WSGATEWAY_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub database_url: String,
    /// `outbox`: rows committed before the consumer starts, for the
    /// throughput figure.
    #[arg(long, default_value_t = 20_000)]
    pub backlog: usize,
    /// `outbox`: the `WSGATEWAY_OUTBOX_BATCH` of each throughput phase (a
    /// fresh gateway each), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "500")]
    pub outbox_batch: Vec<usize>,
    /// `acks`: the `within_s` of the events that ask for an ack; the
    /// phase waits that long after its last publication (plus a sweep)
    /// before reading the redelivery and escalation counters.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u16).range(1..=300))]
    pub ack_within_s: u16,
    /// `acks`: the phases with acks after the baseline, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "each,batched"
    )]
    pub ack_modes: Vec<AckMode>,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Runs of the scenario (a fresh gateway each); the summary gives the
    /// median of each figure.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    #[arg(long = setting::JWT_SECRET.flag, env = setting::JWT_SECRET.env, hide_env_values = true, default_value = DEV_JWT_SECRET)]
    pub jwt_secret: String,
    #[arg(long = setting::TABLE_TOKEN_SECRET.flag, env = setting::TABLE_TOKEN_SECRET.env, hide_env_values = true, default_value = DEV_TABLE_TOKEN_SECRET)]
    pub table_token_secret: String,
    #[arg(long = setting::API_KEY.flag, env = setting::API_KEY.env, hide_env_values = true, default_value = DEV_API_KEY)]
    pub api_key: String,
}

/// `NAME=VALUE` of `--gateway-env`.
fn parse_env(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("expected NAME=VALUE, not {arg:?}")),
    }
}

/// The resolved plan of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub connections: usize,
    pub tenants: usize,
    pub branches: usize,
    pub admin_share: f64,
    /// Total events to publish.
    pub events: usize,
    /// Events per second; 0: all at once.
    pub rate: f64,
    pub hold: Duration,
    pub via: Via,
}

impl Plan {
    fn from(args: &BenchArgs) -> Plan {
        let (connections, tenants, branches, events, rate, duration) = match args.scenario {
            // The load generator shares the 20 000 open-files limit: leave it
            // room for its own files.
            Scenario::Idle => (19_500, 4, 10, 0, 0.0, 5.0),
            Scenario::Burst => (5_000, 1, 17, 1_000, 0.0, 0.0),
            Scenario::Broadcast => (10_000, 1, 1, 100, 10.0, 10.0),
            Scenario::Steady => (1_000, 2, 5, 1_000, 100.0, 10.0),
            // Both ends in this process: 2 × 9 900 files under the 20 000 limit.
            Scenario::Floor => (10_000, 1, 1, 100, 10.0, 10.0),
            Scenario::FloorReaders => (0, 1, 1, 0, 0.0, 0.0),
            // The events fill the default history (1 000 per branch).
            Scenario::Resume => (2_000, 1, 1, 1_000, 0.0, 0.0),
            // 500 per serving node; 6 tenants, two on each primary.
            Scenario::Nodes => (1_000, 6, 5, 4_000, 200.0, 20.0),
            // 20 recipients per row.
            Scenario::Outbox => (100, 1, 5, 4_000, 200.0, 20.0),
            // 20 kitchen displays per branch: 20 recipients, 20 acks per event.
            Scenario::Acks => (1_000, 2, 25, 4_000, 200.0, 20.0),
        };
        let rate = args.rate.unwrap_or(rate);
        let duration = args.duration_s.unwrap_or(duration);
        let events = args.events.unwrap_or(if rate > 0.0 {
            (rate * duration).round() as usize
        } else {
            events
        });
        Plan {
            scenario: args.scenario,
            connections: args.connections.unwrap_or(connections),
            tenants: args.tenants.unwrap_or(tenants).max(1),
            branches: args.branches.unwrap_or(branches).max(1),
            admin_share: args.admin_share.clamp(0.0, 1.0),
            events,
            rate,
            hold: Duration::from_secs_f64(duration),
            via: args.via,
        }
    }
}

/// Runs the scenario `args.runs` times and prints the figures. The caller
/// provides the runtime (a multi-threaded one) and raises the open-files
/// limit.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.scenario == Scenario::FloorReaders {
        return floor::serve_readers(&args).await;
    }
    let plan = Plan::from(&args);
    if plan.scenario == Scenario::Nodes {
        return nodes::run(&args, &plan).await;
    }
    if plan.scenario == Scenario::Outbox {
        return outbox::run(&args, &plan).await;
    }
    if plan.scenario == Scenario::Acks {
        return acks::run(&args, &plan).await;
    }
    let mut reports = Vec::new();
    for run in 1..=args.runs.max(1) {
        if plan.scenario == Scenario::Floor {
            let floor = floor::run(floor::Shape::of_plan(&plan, &args), &args)
                .await?
                .to_json();
            if !args.json {
                println!("--- run {run} of {}", args.runs.max(1));
                println!("{}", serde_json::to_string_pretty(&floor)?);
            }
            reports.push(floor);
            continue;
        }
        let target = gateway::Target::resolve(&args, &plan)
            .await
            .context("cannot start or reach the gateway")?;
        if plan.scenario == Scenario::Resume {
            let result = storm::run(&target, &args, &plan).await;
            target.stop().await;
            let storm = result?;
            if !args.json {
                println!("--- run {run} of {}", args.runs.max(1));
                println!("{}", serde_json::to_string_pretty(&storm)?);
            }
            reports.push(storm);
            continue;
        }
        let result = run_plan(&args, &plan, &target).await;
        target.stop().await;
        let report = result?;
        if !args.json {
            println!("--- run {run} of {}", args.runs.max(1));
            print!("{report}");
        }
        let mut json = report.to_json();
        if args.with_floor
            && let Some(shape) = floor::Shape::of_run(&report, args.floor_hot)
        {
            // After the gateway stopped: the floor has the machine alone,
            // as the gateway had.
            let floor = floor::run(shape, &args).await?;
            let compared = report::Compared::new(&report, &floor);
            if !args.json {
                print!("{compared}");
            }
            json["floor"] = floor.to_json();
            json["ratio"] = compared.to_json();
        }
        reports.push(json);
    }
    let summary = report::median(&reports);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"runs": reports, "median": summary}))?
        );
    } else if reports.len() > 1 {
        println!("--- median of {} runs", reports.len());
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(())
}

async fn run_plan(
    args: &BenchArgs,
    plan: &Plan,
    target: &gateway::Target,
) -> anyhow::Result<report::Report> {
    let before = target.sample();
    let started = Instant::now();
    let population = clients::Population::plan(plan, args);
    let mut fleet = clients::Fleet::connect(target, &population, args).await?;
    let connect_time = started.elapsed();
    // Let allocations settle before reading memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connected = target.sample();
    if plan.scenario == Scenario::Idle {
        tokio::time::sleep(plan.hold).await;
    }
    let idle = target.sample();

    let mut outcome = publish::Outcome::default();
    if plan.events > 0 {
        let publisher = publish::Publisher::new(target, args, plan).await?;
        outcome = publisher.run(&population).await?;
        fleet
            .wait_for(outcome.expected, Duration::from_secs(20))
            .await;
    }
    let after = target.sample();
    let stats = fleet.finish().await;
    Ok(report::Report {
        plan: plan.clone(),
        connect_time,
        opened: fleet.opened,
        failed: fleet.failed,
        before,
        connected,
        idle,
        after,
        outcome,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storm_flags_parse() {
        let args = BenchArgs::try_parse_from([
            "wsgateway-bench",
            "resume",
            "--connections",
            "10000",
            "--events",
            "101",
            "--gateway-env",
            "WSGATEWAY_RESUME_WAIT_S=30",
            "--gateway-env",
            "A=b=c",
        ])
        .unwrap();
        let plan = Plan::from(&args);
        assert_eq!((plan.connections, plan.events), (10_000, 101));
        assert_eq!(args.max_pending_connections, 4096);
        assert_eq!(
            args.gateway_env,
            [
                ("WSGATEWAY_RESUME_WAIT_S".into(), "30".into()),
                ("A".into(), "b=c".into())
            ]
        );
        assert!(BenchArgs::try_parse_from(["b", "resume", "--gateway-env", "=1"]).is_err());
        assert!(BenchArgs::try_parse_from(["b", "resume", "--gateway-env", "X"]).is_err());
    }
}
