//! A real Redis Cluster on loopback, every process the test's own:
//! `redis-server --cluster-enabled yes` nodes (each in its own temporary
//! directory, with its own `nodes.conf`), joined by `redis-cli --cluster
//! create`, with a 1 s node timeout so that a failover takes seconds. The
//! test can kill a primary (SIGKILL, by the pid of the process it started)
//! and wait for its replica to take over, or move a slot to another primary
//! by hand, step by step, as `redis-cli --cluster reshard` does.
//!
//! Every call blocks (sync Redis connections, `std::thread::sleep` between
//! polls): from an async test, call it inside `tokio::task::block_in_place`
//! on a multi-threaded runtime.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::redis_server::{Options, RedisServer, ServerTls};

pub const SLOTS: u16 = 16384;

/// How long [`RedisCluster::start`] waits for the cluster to be ready.
const START_WITHIN: Duration = Duration::from_secs(20);

pub struct RedisCluster {
    /// Every node, primaries and replicas, in the order started. A killed
    /// node stays in the list (not running) so that indices stay valid.
    pub nodes: Vec<RedisServer>,
    /// Each node's cluster id (`CLUSTER MYID`), by index.
    ids: Vec<String>,
    password: Option<String>,
    tls: Option<ServerTls>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeLine {
    pub id: String,
    pub port: u16,
    pub flags: Vec<String>,
    /// A replica's primary.
    pub master: Option<String>,
    /// Slot ranges it serves (inclusive); migration markers left out.
    pub slots: Vec<(u16, u16)>,
}

impl NodeLine {
    pub fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// Each running node's port, whether it is a primary, and its primary.
type Roles = Vec<(u16, bool, Option<String>)>;

/// A slot on its way from one primary to another (see
/// [`RedisCluster::begin_migration`]).
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub slot: u16,
    pub from: usize,
    pub to: usize,
}

/// A port whose cluster bus port (port + 10000) is free too, both below
/// the kernel's ephemeral range (32768 and up on Linux), where the other
/// tests' servers (port 0) and outgoing connections take theirs. Should
/// one be taken anyway before the node binds it, the node exits and
/// `RedisServer::start_on_ports` tries another pair.
fn cluster_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..200 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + (seed.wrapping_add(n.wrapping_mul(7919)) % 2768) as u16;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10000) {
            return port;
        }
    }
    panic!("no free port pair (p, p + 10000) with p between 20000 and 22767");
}

/// Polls `check` every 50 ms until it holds; panics after `within`.
pub fn wait(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // ip:port@cport[,hostname]
            let port = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .map(|s| match s.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                    None => (s.parse().unwrap(), s.parse().unwrap()),
                })
                .collect();
            NodeLine {
                id: f[0].to_owned(),
                port,
                flags: f[2].split(',').map(str::to_owned).collect(),
                master: (f[3] != "-").then(|| f[3].to_owned()),
                slots,
            }
        })
        .collect()
}

/// A command on a new connection to `server`, bounded in time: 2 s to
/// connect, 10 s for the answer (more than `WAIT`'s and `MIGRATE`'s own
/// 5 s), so that a node that never answers fails the test, not hangs it.
/// One command on a new connection, within timeouts. A socket read with a
/// timeout is not restarted after a signal handler ran (signal(7)), and
/// the test process's children exit all the time (a SIGCHLD, which
/// tokio's process support handles): an interrupted command is sent once
/// more on a new connection. (The harness's commands are reads, or writes
/// whose repetition a test would see.)
fn query_on<T: redis::FromRedisValue>(
    server: &RedisServer,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    let once = || -> redis::RedisResult<T> {
        let mut conn = server
            .client()
            .get_connection_with_timeout(Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        conn.set_write_timeout(Some(Duration::from_secs(10)))?;
        cmd.query(&mut conn)
    };
    match once() {
        Err(e) if interrupted(&e) => once(),
        done => done,
    }
}

/// EINTR, which the redis crate reports only in its words.
fn interrupted(e: &redis::RedisError) -> bool {
    const EINTR: i32 = 4;
    let words = std::io::Error::from_raw_os_error(EINTR).to_string();
    e.is_io_error() && e.to_string().contains(&words)
}

fn field(info: &str, name: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .map(|v| v.trim().to_owned())
}

impl RedisCluster {
    /// `primaries` primaries with `replicas_per_primary` replicas each,
    /// ready: every node says `cluster_state:ok`, all agree on the owner of
    /// every slot, and every replica is in sync with its primary.
    pub fn start(primaries: usize, replicas_per_primary: usize) -> RedisCluster {
        Self::start_with(primaries, replicas_per_primary, None)
    }

    /// The same, every node with `--requirepass`/`--masterauth` `password`.
    pub fn start_with(
        primaries: usize,
        replicas_per_primary: usize,
        password: Option<&str>,
    ) -> RedisCluster {
        let base = Options {
            password: password.map(str::to_owned),
            ..Options::default()
        };
        Self::start_from(primaries, replicas_per_primary, base)
    }

    /// The same, every node with `base`'s password and TLS: a TLS-only
    /// cluster (`--tls-cluster yes --tls-replication yes`: the bus and the
    /// replication links are TLS too, and the nodes announce their TLS
    /// ports).
    pub fn start_from(
        primaries: usize,
        replicas_per_primary: usize,
        base: Options,
    ) -> RedisCluster {
        assert!(
            primaries >= 3,
            "redis-cli --cluster create needs 3 primaries"
        );
        let started = Instant::now();
        let mut options = Options {
            args: [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                // Only 1 s of node timeout: a replica whose link was down
                // longer may still be promoted.
                "--cluster-replica-validity-factor",
                "0",
                // A replica's first full sync starts at once (the default
                // waits 5 s for more replicas to share it).
                "--repl-diskless-sync-delay",
                "0",
            ]
            .map(str::to_owned)
            .to_vec(),
            ..base.clone()
        };
        if let Some(tls) = &base.tls {
            for arg in ["--tls-cluster", "yes", "--tls-replication", "yes"] {
                options.args.push(arg.into());
            }
            // The bus always asks the connecting node for a certificate:
            // a node connects with the client certificate, not its server
            // one (whose key usage is server authentication only).
            for (flag, file) in [
                ("--tls-client-cert-file", &tls.client.0),
                ("--tls-client-key-file", &tls.client.1),
            ] {
                options.args.push(flag.into());
                options.args.push(file.to_str().unwrap().into());
            }
        }
        options.args.extend(base.args);
        let total = primaries * (1 + replicas_per_primary);
        let nodes: Vec<RedisServer> = (0..total)
            .map(|_| RedisServer::start_on_ports(options.clone(), cluster_port))
            .collect();
        let ids = nodes
            .iter()
            .map(|n| query_on(n, redis::cmd("CLUSTER").arg("MYID")).unwrap())
            .collect();
        let cluster = RedisCluster {
            nodes,
            ids,
            password: base.password.clone(),
            tls: base.tls.clone(),
        };
        let mut create = cluster.cli();
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(n.addr());
        }
        let out = create
            .args(["--cluster-replicas", &replicas_per_primary.to_string()])
            .arg("--cluster-yes")
            .output()
            .expect("redis-cli is installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ready(START_WITHIN.saturating_sub(started.elapsed()));
        assert_eq!(cluster.primaries().len(), primaries);
        cluster
    }

    /// `redis-cli` with the cluster's password and TLS files, if any,
    /// killed after 20 s.
    pub fn cli(&self) -> Command {
        // Bounded: `redis-cli --cluster create` waits for the nodes to
        // join with no limit of its own.
        let mut c = Command::new("timeout");
        c.args(["--kill-after=2", "20", "redis-cli"]);
        if let Some(pw) = &self.password {
            c.args(["-a", pw, "--no-auth-warning"]);
        }
        if let Some(tls) = &self.tls {
            c.arg("--tls")
                .arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client.0)
                .arg("--key")
                .arg(&tls.client.1);
        }
        c
    }

    /// `redis-cli -c -p <port of node> args...` (follows redirections):
    /// its standard output, trimmed; panics when it fails.
    pub fn cli_on(&self, node: usize, args: &[&str]) -> String {
        let out = self
            .cli()
            .args([
                "-c",
                "-h",
                "127.0.0.1",
                "-p",
                &self.nodes[node].port.to_string(),
            ])
            .args(args)
            .output()
            .expect("redis-cli is installed");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `REDIS_URL` in cluster mode: every running node, comma-separated
    /// (`redis://127.0.0.1:p1,redis://127.0.0.1:p2,...`).
    pub fn seeds(&self) -> String {
        self.running()
            .map(|i| self.nodes[i].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The indices of the nodes whose process runs.
    pub fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].pid().is_some())
    }

    pub fn id(&self, node: usize) -> &str {
        &self.ids[node]
    }

    fn index_of_id(&self, id: &str) -> usize {
        self.ids
            .iter()
            .position(|i| i == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    fn index_of_port(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// A command on `node`, on a new connection; an error after 10 s
    /// without an answer.
    pub fn query<T: redis::FromRedisValue>(
        &self,
        node: usize,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        query_on(&self.nodes[node], cmd)
    }

    /// `CLUSTER NODES` as `node` sees it.
    pub fn view(&self, node: usize) -> Option<Vec<NodeLine>> {
        let text: String = self.query(node, redis::cmd("CLUSTER").arg("NODES")).ok()?;
        Some(parse_nodes(&text))
    }

    /// The owner (node index) of every slot as `node` sees it; `None` when
    /// it does not answer, or a slot has no owner, or its owner is failed.
    fn slot_map(&self, node: usize) -> Option<Vec<usize>> {
        let view = self.view(node)?;
        let mut owners = vec![usize::MAX; SLOTS as usize];
        for line in view.iter().filter(|l| l.has("master")) {
            for &(a, b) in &line.slots {
                let owner = match line.has("fail") || line.has("fail?") {
                    true => usize::MAX,
                    false => self.index_of_port(line.port),
                };
                owners[a as usize..=b as usize].fill(owner);
            }
        }
        owners.iter().all(|&o| o != usize::MAX).then_some(owners)
    }

    /// Whether every running node says `cluster_state:ok`, knows every
    /// other node (no handshake), sees no running node failed, agrees with
    /// the others on every slot's owner and every running node's role, and
    /// every running replica's link to its primary is up.
    pub fn is_ready(&self) -> bool {
        let running: Vec<usize> = self.running().collect();
        let mut first: Option<(Vec<usize>, Roles)> = None;
        for &i in &running {
            let Ok(info) = self.query::<String>(i, redis::cmd("CLUSTER").arg("INFO")) else {
                return false;
            };
            if field(&info, "cluster_state").as_deref() != Some("ok") {
                return false;
            }
            let Some(view) = self.view(i) else {
                return false;
            };
            if view.len() != self.nodes.len()
                || view.iter().any(|l| l.has("handshake") || l.has("noaddr"))
            {
                return false;
            }
            // Each running node, as this one sees it: its role and
            // primary, and not failed.
            let mut roles: Roles = Vec::new();
            for line in &view {
                let index = self.index_of_port(line.port);
                if self.nodes[index].pid().is_none() {
                    continue;
                }
                if line.has("fail") || line.has("fail?") {
                    return false;
                }
                roles.push((line.port, line.has("master"), line.master.clone()));
            }
            roles.sort();
            let Some(map) = self.slot_map(i) else {
                return false;
            };
            if map.iter().any(|&o| self.nodes[o].pid().is_none()) {
                return false;
            }
            match &first {
                None => first = Some((map, roles)),
                Some(f) if *f != (map, roles) => return false,
                Some(_) => {}
            }
            let me = view.iter().find(|l| l.has("myself")).unwrap();
            if me.has("slave") {
                let Ok(repl) = self.query::<String>(i, redis::cmd("INFO").arg("replication"))
                else {
                    return false;
                };
                if field(&repl, "master_link_status").as_deref() != Some("up") {
                    return false;
                }
            }
        }
        true
    }

    /// Waits until [`RedisCluster::is_ready`].
    pub fn wait_ready(&self, within: Duration) {
        wait(within, "the cluster to be ready", || self.is_ready());
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        let node = self.running().next().expect("a running node");
        self.query(node, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .unwrap()
    }

    /// The slot of every key of tenant `tenant` (no prefix).
    pub fn slot_of_tenant(&self, tenant: i64) -> u16 {
        self.slot_of(&format!("wsgateway:{{{tenant}}}:seq"))
    }

    /// The primary serving `slot`, as the first running node that has a
    /// complete view says.
    pub fn primary_of_slot(&self, slot: u16) -> usize {
        self.running()
            .find_map(|i| self.slot_map(i))
            .expect("a running node with every slot served")[slot as usize]
    }

    /// The node indices of the primaries (as the first running node sees
    /// them: serving slots, not failed).
    pub fn primaries(&self) -> Vec<usize> {
        let view = self
            .running()
            .find_map(|i| self.view(i))
            .expect("a running node");
        let mut out: Vec<usize> = view
            .iter()
            .filter(|l| l.has("master") && !l.has("fail") && !l.slots.is_empty())
            .map(|l| self.index_of_port(l.port))
            .collect();
        out.sort();
        out
    }

    /// The replicas of `primary`, as `primary` sees them.
    pub fn replicas_of(&self, primary: usize) -> Vec<usize> {
        let id = self.id(primary).to_owned();
        let view = self.view(primary).expect("the primary answers");
        view.iter()
            .filter(|l| l.master.as_deref() == Some(id.as_str()))
            .map(|l| self.index_of_port(l.port))
            .collect()
    }

    /// Waits until every replica of `primary` has every write `primary`
    /// has taken (replication offsets), so that a failover loses nothing.
    pub fn wait_replicated(&self, primary: usize) {
        // Not WAIT: it waits for the offset of the asking connection's own
        // writes, and a fresh connection has written nothing (the keys came
        // by MIGRATE), so it answered at once while the replica lagged.
        let offset = |node: usize, field: &str| -> i64 {
            let info: String = self
                .query(node, redis::cmd("INFO").arg("replication"))
                .unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(-1)
        };
        let target = offset(primary, "master_repl_offset");
        for replica in self.replicas_of(primary) {
            wait(
                Duration::from_secs(10),
                &format!("node {replica} to replicate node {primary} up to {target}"),
                || offset(replica, "slave_repl_offset") >= target,
            );
        }
    }

    /// SIGKILLs the primary serving `slot` (a process this cluster
    /// started); returns its index.
    pub fn kill_primary_of_slot(&mut self, slot: u16) -> usize {
        let primary = self.primary_of_slot(slot);
        self.nodes[primary].kill();
        primary
    }

    /// Sends `signal` (`STOP`, `CONT`) to `node`'s process, one this
    /// cluster started. A stopped replica takes no more of its primary's
    /// writes: killing the primary then loses them, as an asynchronous
    /// replica can.
    pub fn signal(&self, node: usize, signal: &str) {
        let pid = self.nodes[node].pid().expect("a running node");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Waits until a replica of `killed` serves `slot` and the cluster is
    /// ready again (every running node ok and agreeing); returns the new
    /// primary.
    pub fn wait_failover(&self, slot: u16, killed: usize, within: Duration) -> usize {
        let mut owner = usize::MAX;
        wait(
            within,
            &format!("a replica to take slot {slot} over"),
            || {
                if !self.is_ready() {
                    return false;
                }
                owner = self.primary_of_slot(slot);
                owner != killed
            },
        );
        owner
    }

    /// Starts a killed node again (same port, same `nodes.conf`): it
    /// rejoins as a replica of whoever took its slots. Waits until ready.
    pub fn restart(&mut self, node: usize, within: Duration) {
        self.nodes[node].restart();
        self.wait_ready(within);
    }

    /// The keys of `slot` still held by `node`.
    pub fn keys_in_slot(&self, node: usize, slot: u16) -> usize {
        self.query(node, redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(slot))
            .unwrap()
    }

    /// The first step of moving `slot` to the primary `to`: `CLUSTER
    /// SETSLOT IMPORTING` on `to`, then `MIGRATING` on the current owner.
    /// From here the owner answers `ASK` for the slot's keys it no longer
    /// holds, and `TRYAGAIN` to a multi-key command whose keys it holds
    /// only in part.
    pub fn begin_migration(&self, slot: u16, to: usize) -> Migration {
        let from = self.primary_of_slot(slot);
        assert_ne!(from, to, "slot {slot} is already on node {to}");
        let setslot = |on: usize, state: &str, id: &str| {
            let () = self
                .query(
                    on,
                    redis::cmd("CLUSTER")
                        .arg("SETSLOT")
                        .arg(slot)
                        .arg(state)
                        .arg(id),
                )
                .unwrap_or_else(|e| panic!("SETSLOT {slot} {state} on node {on}: {e}"));
        };
        setslot(to, "IMPORTING", self.id(from));
        setslot(from, "MIGRATING", self.id(to));
        Migration { slot, from, to }
    }

    /// The second step: `MIGRATE`s every key of the slot (`CLUSTER
    /// GETKEYSINSLOT`, `batch` at a time) from the old owner to the new one;
    /// returns how many moved.
    pub fn move_keys(&self, m: &Migration, batch: usize) -> usize {
        let mut moved = 0;
        loop {
            let keys: Vec<String> = self
                .query(
                    m.from,
                    redis::cmd("CLUSTER")
                        .arg("GETKEYSINSLOT")
                        .arg(m.slot)
                        .arg(batch),
                )
                .unwrap();
            if keys.is_empty() {
                return moved;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(self.nodes[m.to].port)
                .arg("")
                .arg(0)
                .arg(5000);
            if let Some(pw) = &self.password {
                migrate.arg("AUTH").arg(pw);
            }
            migrate.arg("KEYS").arg(&keys);
            let _: redis::Value = self
                .query(m.from, &migrate)
                .unwrap_or_else(|e| panic!("MIGRATE of slot {} keys: {e}", m.slot));
            moved += keys.len();
        }
    }

    /// The last step: `CLUSTER SETSLOT <slot> NODE <to>` on the new owner,
    /// the old one and every other primary, then waits until every running
    /// node agrees that `to` serves the slot.
    pub fn finish_migration(&self, m: Migration, within: Duration) {
        let mut order = vec![m.to, m.from];
        order.extend(
            self.primaries()
                .into_iter()
                .filter(|p| *p != m.to && *p != m.from),
        );
        for on in order {
            let () = self
                .query(
                    on,
                    redis::cmd("CLUSTER")
                        .arg("SETSLOT")
                        .arg(m.slot)
                        .arg("NODE")
                        .arg(self.id(m.to)),
                )
                .unwrap_or_else(|e| panic!("SETSLOT {} NODE on node {on}: {e}", m.slot));
        }
        wait(
            within,
            &format!("every node to agree that node {} serves {}", m.to, m.slot),
            || {
                self.is_ready()
                    && self
                        .running()
                        .all(|i| self.slot_map(i).map(|s| s[m.slot as usize]) == Some(m.to))
            },
        );
    }

    /// Moves `slot` with its keys to the primary `to`, all three steps.
    pub fn migrate_slot(&self, slot: u16, to: usize) {
        let m = self.begin_migration(slot, to);
        self.move_keys(&m, 100);
        self.finish_migration(m, Duration::from_secs(10));
    }

    /// The owner of `slot` as seen by each running node (for messages).
    pub fn describe(&self) -> String {
        let mut out = BTreeMap::new();
        for i in self.running() {
            out.insert(
                self.nodes[i].port,
                self.query::<String>(i, redis::cmd("CLUSTER").arg("NODES"))
                    .unwrap_or_else(|e| e.to_string()),
            );
        }
        format!("{out:#?}")
    }

    /// The primary among `primaries()` other than `not`.
    pub fn other_primary(&self, not: usize) -> usize {
        self.primaries()
            .into_iter()
            .find(|&p| p != not)
            .expect("another primary")
    }

    /// The index of the node that has the cluster id `id`.
    pub fn node_with_id(&self, id: &str) -> usize {
        self.index_of_id(id)
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Each RedisServer kills its own process when dropped; kill them
        // all first so that no node logs the others' failures for long.
        for n in &mut self.nodes {
            n.kill();
        }
    }
}
