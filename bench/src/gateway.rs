//! The gateway under test: started by the bench (the default: the
//! `wsgateway` binary, in a process of its own so that /proc shows its
//! figures alone) or already running, and its memory and CPU as /proc
//! reports them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::setting::{
    API_KEY, DRAIN_S, JWT_SECRET, LISTEN, MAX_CONNECTIONS, MAX_PENDING_CONNECTIONS, REDIS_URL,
    TABLE_TOKEN_SECRET,
};
use super::{BenchArgs, Plan, Via, procfs};

pub struct Target {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub redis_url: Option<String>,
    child: Option<tokio::process::Child>,
}

/// One reading of the gateway process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub rss_kib: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
}

impl Target {
    pub async fn resolve(args: &BenchArgs, plan: &Plan) -> anyhow::Result<Target> {
        let redis_url = match plan.via {
            Via::Redis => Some(
                args.redis_url
                    .clone()
                    .context("--via redis needs --redis-url (or REDIS_URL)")?,
            ),
            Via::Api => args.redis_url.clone(),
        };
        if let Some(url) = &args.url {
            let hostport = url.trim_start_matches("http://").trim_end_matches('/');
            let addr = tokio::net::lookup_host(hostport)
                .await?
                .next()
                .with_context(|| format!("cannot resolve {url}"))?;
            return Ok(Target {
                addr,
                pid: args.gateway_pid,
                redis_url,
                child: None,
            });
        }
        Target::start(args, "gateway", redis_url, &[]).await
    }

    /// Starts a gateway of the bench's own (`label` prefixes its log
    /// lines), on a free loopback port, with `env` beside the bench's
    /// settings, and waits until it listens (and, with Redis, until its
    /// broker is connected).
    pub async fn start(
        args: &BenchArgs,
        label: &str,
        redis_url: Option<String>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Target> {
        let exe = gateway_bin(args)?;
        let mut command = tokio::process::Command::new(&exe);
        command
            .args(["serve", &format!("--{}", LISTEN.flag), "127.0.0.1:0"])
            .env(JWT_SECRET.env, &args.jwt_secret)
            .env(TABLE_TOKEN_SECRET.env, &args.table_token_secret)
            .env(API_KEY.env, &args.api_key)
            .env(MAX_CONNECTIONS.env, "1000000")
            .env(
                MAX_PENDING_CONNECTIONS.env,
                args.max_pending_connections.to_string(),
            )
            // A run's end stops its gateway at once, not over a drain.
            .env(DRAIN_S.env, "0")
            .env("RUST_LOG", "warn,wsgateway::cli=info")
            .env_remove(REDIS_URL.env)
            .envs(args.gateway_env.iter().map(|(k, v)| (k, v)))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(url) = &redis_url {
            command.env(REDIS_URL.env, url);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start the gateway {}", exe.display()))?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        // Its log before it listens is said only if it never does.
        let mut early = Vec::new();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split("addr=").nth(1) {
                    return anyhow::Ok(rest.split_whitespace().next().unwrap_or_default().parse()?);
                }
                early.push(line);
            }
            bail!("the gateway exited before listening: {}", early.join("\n"))
        })
        .await
        .context("the gateway did not start within 30 s")??;
        // Keep draining its log so that it never blocks on a full pipe.
        let label = label.to_owned();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{label}: {line}");
            }
        });
        let target = Target {
            addr,
            pid: child.id(),
            redis_url,
            child: Some(child),
        };
        if target.redis_url.is_some() {
            target.wait_for_broker().await?;
        }
        Ok(target)
    }

    async fn wait_for_broker(&self) -> anyhow::Result<()> {
        let url = format!("http://{}/ws/health/detailed", self.addr);
        for _ in 0..200 {
            let body: serde_json::Value = reqwest::get(&url).await?.json().await?;
            if body["broker"]["status"] == "connected" {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the gateway never connected to Redis")
    }

    pub fn sample(&self) -> Sample {
        self.pid.map(read_proc).unwrap_or_default()
    }

    pub async fn stop(mut self) {
        if let Some(child) = &mut self.child {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
        }
    }
}

/// `--gateway-bin` (or `WSGATEWAY_BIN`), else `wsgateway` next to this
/// program.
pub(super) fn gateway_bin(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    if let Some(path) = &args.gateway_bin {
        return Ok(path.clone());
    }
    let me = std::env::current_exe().context("cannot find this program's path")?;
    let sibling = me.with_file_name(format!("wsgateway{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        sibling.is_file(),
        "no gateway binary at {} (build it with `cargo build --release --workspace`, \
         or give its path with --gateway-bin or WSGATEWAY_BIN)",
        sibling.display()
    );
    Ok(sibling)
}

fn read_proc(pid: u32) -> Sample {
    Sample {
        rss_kib: procfs::rss_kib(pid),
        cpu_ticks: procfs::cpu_ticks(&format!("/proc/{pid}/stat")),
    }
}
