//! Redis servers of the bench's own (`nodes`): one `redis-server`, or a
//! cluster of three primaries made with `redis-cli --cluster create`. Each
//! server listens on a free loopback port, keeps nothing on disk (`--save
//! ""`, `--appendonly no`) and has a temporary directory of its own (a
//! cluster node writes its `nodes.conf` there). `stop` kills them and
//! removes the directories; dropping them kills them too, so an error or
//! an interrupted run leaves no server behind.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Primaries of the cluster.
const CLUSTER_SIZE: usize = 3;
/// A cluster node's bus listens on its port plus this (Redis's rule).
const BUS_OFFSET: u16 = 10_000;

/// Which Redis the bench starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Single,
    Cluster,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Single => "single",
            Kind::Cluster => "cluster",
        }
    }
}

pub struct RedisServers {
    pub kind: Kind,
    servers: Vec<Server>,
}

struct Server {
    port: u16,
    dir: PathBuf,
    child: tokio::process::Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisServers {
    /// Starts the servers and, for a cluster, makes them one (every slot
    /// assigned, `cluster_state:ok` on each), within a minute or fails. A
    /// server that does not answer (its port taken before it bound it) is
    /// given new ports, twice at most.
    pub async fn start(kind: Kind) -> anyhow::Result<RedisServers> {
        let mut attempt = 1;
        let set = loop {
            match RedisServers::start_servers(kind).await {
                Ok(set) => break set,
                Err(e) if attempt == 3 => return Err(e),
                Err(_) => attempt += 1,
            }
        };
        if kind == Kind::Cluster {
            set.create_cluster().await?;
        }
        Ok(set)
    }

    async fn start_servers(kind: Kind) -> anyhow::Result<RedisServers> {
        let ports = match kind {
            Kind::Single => free_ports(1)?,
            Kind::Cluster => cluster_ports(CLUSTER_SIZE)?,
        };
        let mut servers = Vec::with_capacity(ports.len());
        for port in ports {
            servers.push(Server::start(port, kind).await?);
        }
        let set = RedisServers { kind, servers };
        for server in &set.servers {
            server.wait_for_ping().await?;
        }
        Ok(set)
    }

    /// `REDIS_URL` for the gateways: the server, or every primary, comma
    /// separated (the cluster's seed nodes).
    pub fn url(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The servers' process ids, for their CPU time.
    pub fn pids(&self) -> Vec<u32> {
        self.servers.iter().filter_map(|s| s.child.id()).collect()
    }

    /// How many of `tenants` each server holds (the hash slot of the
    /// tenant's hash tag, `{tenant}`, in the slots the server owns), in the
    /// servers' order.
    pub async fn tenants_per_server(&self, tenants: &[i64]) -> anyhow::Result<Vec<usize>> {
        if self.kind == Kind::Single {
            return Ok(vec![tenants.len()]);
        }
        let mut counts = Vec::with_capacity(self.servers.len());
        for server in &self.servers {
            let ranges = server.own_slots().await?;
            counts.push(
                tenants
                    .iter()
                    .filter(|t| {
                        let slot = key_slot(&t.to_string());
                        ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&slot))
                    })
                    .count(),
            );
        }
        Ok(counts)
    }

    /// Kills every server and removes its directory.
    pub async fn stop(mut self) {
        for server in &mut self.servers {
            let _ = server.child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), server.child.wait()).await;
        }
        // Dropping them removes the directories.
    }

    async fn create_cluster(&self) -> anyhow::Result<()> {
        let mut command = tokio::process::Command::new("redis-cli");
        command.arg("--cluster").arg("create");
        for server in &self.servers {
            command.arg(format!("127.0.0.1:{}", server.port));
        }
        command
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .context("redis-cli --cluster create did not end within 60 s")?
            .context("cannot run redis-cli")?;
        anyhow::ensure!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for server in &self.servers {
            loop {
                let info: String = server.command(redis::cmd("CLUSTER").arg("INFO")).await?;
                if info.contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the cluster was not ok within 30 s: {info}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

impl Server {
    async fn start(port: u16, kind: Kind) -> anyhow::Result<Server> {
        let dir = std::env::temp_dir().join(format!(
            "wsgateway-bench-redis-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut command = tokio::process::Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if kind == Kind::Cluster {
            command.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "5000",
            ]);
        }
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e).context("cannot start redis-server (is it on PATH?)");
            }
        };
        Ok(Server { port, dir, child })
    }

    async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> anyhow::Result<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port))?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        Ok(cmd.query_async(&mut conn).await?)
    }

    async fn wait_for_ping(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.command::<String>(&redis::cmd("PING")).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e).context(format!(
                        "redis-server on port {} did not answer within 10 s",
                        self.port
                    ));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The slot ranges this cluster node owns: its own line of `CLUSTER
    /// NODES` (`<id> <addr> myself,master - 0 0 1 connected 0-5460`).
    async fn own_slots(&self) -> anyhow::Result<Vec<(u16, u16)>> {
        let nodes: String = self.command(redis::cmd("CLUSTER").arg("NODES")).await?;
        let mine = nodes
            .lines()
            .find(|l| {
                l.split_whitespace()
                    .nth(2)
                    .is_some_and(|f| f.contains("myself"))
            })
            .context("CLUSTER NODES has no line for the node itself")?;
        Ok(mine
            .split_whitespace()
            .skip(8)
            .filter(|r| !r.starts_with('['))
            .filter_map(|r| match r.split_once('-') {
                Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
                None => r.parse().ok().map(|s| (s, s)),
            })
            .collect())
    }
}

/// `count` distinct free loopback ports (the kernel's choice). The
/// listeners are held until all are found, so no port is given twice.
fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let held = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?)
}

/// `count` free loopback ports, each with its bus port (port + 10 000)
/// free too, all below the kernel's ephemeral range (32 768 and up), where
/// no outgoing connection or port-0 server takes one between this check
/// and the node's bind: ports 12 768–19 999, buses 22 768–29 999 (apart
/// from the ranges the integration tests' clusters use, 20 000–22 767
/// and 30 000–32 767). Listeners are held until all are found.
fn cluster_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    const LOW: u32 = 12_768;
    const SPAN: u32 = 20_000 - LOW;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for n in 0..500u32 {
        if ports.len() == count {
            return Ok(ports);
        }
        let port = (LOW + seed.wrapping_add(n.wrapping_mul(7_919)) % SPAN) as u16;
        let bind = |p: u16| TcpListener::bind(("127.0.0.1", p));
        if let (Ok(node), Ok(bus)) = (bind(port), bind(port + BUS_OFFSET)) {
            held.push(node);
            held.push(bus);
            ports.push(port);
        }
    }
    if ports.len() == count {
        return Ok(ports);
    }
    bail!("cannot find {count} free loopback port pairs (p, p + 10000) for Redis Cluster")
}

/// Redis Cluster's hash slot of a hash tag: CRC16 (XMODEM) mod 16 384.
pub fn key_slot(tag: &str) -> u16 {
    let mut crc: u16 = 0;
    for &byte in tag.as_bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

#[cfg(test)]
mod tests {
    use super::key_slot;

    #[test]
    fn key_slot_is_redis_clusters() {
        // `CLUSTER KEYSLOT` of each, on Redis 7.0.
        assert_eq!(key_slot("1"), 9842);
        assert_eq!(key_slot("3"), 1584);
        assert_eq!(key_slot("4"), 14039);
        assert_eq!(key_slot("123456789"), 12739);
    }
}
