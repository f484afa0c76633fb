//! A Redis Sentinel group on loopback, every process the test's own: one
//! master, one replica and three sentinels (quorum 2), with small timeouts
//! so that a failover takes seconds. Each sentinel has its own config file
//! in a temporary directory (sentinels rewrite theirs).

use std::time::{Duration, Instant};

use super::redis_server::{Options, RedisServer};

pub const MASTER_NAME: &str = "mymaster";

pub struct SentinelGroup {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
    pub password: String,
    /// Holds the sentinels' config files; removed with the group.
    _dir: tempfile::TempDir,
}

impl SentinelGroup {
    /// Starts the group; the master and replica need `password`, the
    /// sentinels none. Returns once [`SentinelGroup::wait_ready`] holds.
    pub fn start(password: &str) -> SentinelGroup {
        let dir = tempfile::tempdir().unwrap();
        let data = Options {
            password: Some(password.into()),
            ..Options::default()
        };
        let master = RedisServer::start_with(data.clone());
        let replica = RedisServer::start_with(Options {
            args: vec![
                "--replicaof".into(),
                "127.0.0.1".into(),
                master.port.to_string(),
            ],
            ..data
        });
        let sentinels = (0..3)
            .map(|i| {
                let conf = format!(
                    "sentinel monitor {MASTER_NAME} 127.0.0.1 {port} 2\n\
                     sentinel auth-pass {MASTER_NAME} {password}\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                     sentinel failover-timeout {MASTER_NAME} 5000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    port = master.port
                );
                RedisServer::start_with(Options {
                    sentinel_conf: Some((dir.path().join(format!("sentinel-{i}.conf")), conf)),
                    ..Options::default()
                })
            })
            .collect();
        let group = SentinelGroup {
            master,
            replica,
            sentinels,
            password: password.into(),
            _dir: dir,
        };
        group.wait_ready(Duration::from_secs(30));
        group
    }

    /// `REDIS_URL` in sentinel mode: the sentinels, comma-separated.
    pub fn urls(&self) -> String {
        self.sentinels
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// What `sentinel` says of the master: `(ip, port)`.
    pub fn master_by(sentinel: &RedisServer) -> Option<String> {
        let found: Option<(String, u16)> = sentinel
            .query(
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(MASTER_NAME),
            )
            .ok()?;
        found.map(|(host, port)| format!("{host}:{port}"))
    }

    /// One field of `SENTINEL master` on `sentinel`.
    fn master_field(sentinel: &RedisServer, field: &str) -> Option<String> {
        let fields: Vec<String> = sentinel
            .query(redis::cmd("SENTINEL").arg("master").arg(MASTER_NAME))
            .ok()?;
        fields
            .chunks(2)
            .find(|kv| kv[0] == field)
            .map(|kv| kv[1].clone())
    }

    /// Waits until the replica is in sync with the master and every
    /// sentinel knows the master, the replica and the two other sentinels,
    /// so that a failover can happen.
    pub fn wait_ready(&self, within: Duration) {
        let master = self.master.addr();
        wait(within, "the sentinel group to be ready", || {
            self.replica_in_sync(&self.master, &self.replica)
                && self.sentinels.iter().all(|s| {
                    Self::master_by(s).as_deref() == Some(master.as_str())
                        && Self::master_field(s, "num-other-sentinels").as_deref() == Some("2")
                        && Self::master_field(s, "num-slaves").as_deref() == Some("1")
                        && Self::master_field(s, "flags").as_deref() == Some("master")
                })
        });
    }

    /// Whether `replica` is connected to `master` and has all its writes.
    pub fn replica_in_sync(&self, master: &RedisServer, replica: &RedisServer) -> bool {
        let info = |server: &RedisServer| -> String {
            server
                .query(redis::cmd("INFO").arg("replication"))
                .unwrap_or_default()
        };
        let field = |text: &str, name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let (m, r) = (info(master), info(replica));
        field(&r, "master_link_status:").as_deref() == Some("up")
            && field(&m, "master_repl_offset:").is_some()
            && field(&m, "master_repl_offset:") == field(&r, "slave_repl_offset:")
    }

    /// Waits until every live sentinel names `addr` as the master.
    pub fn wait_master(&self, addr: &str, within: Duration) {
        wait(within, &format!("the sentinels to name {addr}"), || {
            self.sentinels
                .iter()
                .all(|s| Self::master_by(s).as_deref() == Some(addr))
        });
    }
}

/// Polls `check` every 100 ms until it holds; panics after `within`.
pub fn wait(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
