//! A private `redis-server` on a free loopback port, for tests that need
//! their own Redis (to kill it, or to count exactly): plain, TLS only, a
//! replica, or a sentinel.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    options: Options,
    /// Its working directory (`--dir`): a replica's full sync writes the
    /// master's snapshot to disk even with `--save ""`, and must neither
    /// litter the checkout nor meet another replica's file.
    dir: tempfile::TempDir,
}

/// How a test's `redis-server` runs.
#[derive(Clone, Default)]
pub struct Options {
    /// Only a TLS port (`--port 0 --tls-port N`).
    pub tls: Option<ServerTls>,
    /// `--requirepass` (and `--masterauth`, for replicas).
    pub password: Option<String>,
    /// More arguments (`--replicaof 127.0.0.1 6380`, sentinel settings).
    pub args: Vec<String>,
    /// Run as a sentinel, with this (writable, per-sentinel) config file
    /// and its contents, written afresh at each start.
    pub sentinel_conf: Option<(PathBuf, String)>,
}

/// A TLS-only server's files, and what the test's own clients present.
#[derive(Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// `--tls-auth-clients`: `no`, `optional` or `yes`.
    pub auth_clients: &'static str,
    /// The client certificate and key the test's clients use.
    pub client: (PathBuf, PathBuf),
}

/// The shared Redis the test command provides (`REDIS_URL`, or the local
/// default). Tests fail, not skip, when it is not there.
pub fn shared_redis_url() -> String {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = redis::Client::open(url.as_str()).expect("REDIS_URL is a Redis URL");
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("no Redis at {url} ({e}); scripts/test.sh starts one"));
    let _: String = redis::cmd("PING").query(&mut conn).unwrap();
    url
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// A new `redis-server` on a free port. The port is free when chosen,
    /// but another process (a parallel test) may take it first; then this
    /// server exits and another port is tried, so that a test never talks
    /// to someone else's Redis.
    pub fn start() -> RedisServer {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> RedisServer {
        Self::start_on_ports(options, free_port)
    }

    /// Like [`RedisServer::start_with`], on ports that `pick` chooses (a
    /// cluster node needs its bus port, port + 10000, free as well).
    pub fn start_on_ports(options: Options, pick: impl Fn() -> u16) -> RedisServer {
        for _ in 0..5 {
            let mut server = RedisServer {
                port: pick(),
                child: None,
                options: options.clone(),
                dir: tempfile::tempdir().unwrap(),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server could not bind a free port in 5 tries");
    }

    /// Its URL, with the password (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.options.password {
            Some(pw) => format!("{scheme}://:{pw}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A client for it (with the test's CA and client certificate when TLS).
    pub fn client(&self) -> redis::Client {
        client_for(&self.url(), self.options.tls.as_ref())
    }

    /// The process id of the server this value started, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts (again) on the same port, and waits until it answers.
    pub fn restart(&mut self) {
        assert!(
            self.spawn(),
            "redis-server on port {} did not start",
            self.port
        );
    }

    /// Starts `redis-server` on `self.port`; true once the server answering
    /// there is this child (its `process_id`), false when the child exited
    /// first (the port was taken).
    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let o = &self.options;
        let mut command = Command::new("redis-server");
        if let Some((conf, text)) = &o.sentinel_conf {
            // A sentinel rewrites its config file: each has its own.
            std::fs::write(conf, text).unwrap();
            command.arg(conf).arg("--sentinel");
        }
        match &o.tls {
            None => command.args(["--port", &port]),
            Some(tls) => command
                .args(["--port", "0", "--tls-port", &port])
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.ca)
                .args(["--tls-auth-clients", tls.auth_clients]),
        };
        command
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path());
        if o.sentinel_conf.is_none() {
            command.args(["--save", "", "--appendonly", "no"]);
        }
        if let Some(pw) = &o.password {
            command.args(["--requirepass", pw, "--masterauth", pw]);
        }
        let mut child = command
            .args(&o.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/test.sh installs it)");
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return false;
            }
            if (self.options.tls.is_some() || self.answers()) && self.process_id() == Some(pid) {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let hint = if self.options.tls.is_some() {
            " (a TLS-only server: redis-server must be built with TLS, as Debian's is)"
        } else {
            ""
        };
        panic!("redis-server on port {} did not start{hint}", self.port);
    }

    /// The `process_id` of the Redis answering on the port.
    fn process_id(&self) -> Option<u32> {
        let mut conn = self
            .client()
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()?;
        let info: String = redis::cmd("INFO").arg("server").query(&mut conn).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse().ok())
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 7];
        // A server with a password answers -NOAUTH: it answers.
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut buf).is_ok()
            && (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH"))
    }

    /// A command on a new connection, for test set-up and checks.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut conn = self
            .client()
            .get_connection_with_timeout(Duration::from_secs(2))?;
        cmd.query(&mut conn)
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// PUBLISHes raw text, as a backend would.
    pub fn publish(&self, channel: &str, payload: &str) -> i64 {
        publish_with(&self.client(), channel, payload)
    }
}

/// A client for `url`, with the test's CA and client certificate for a TLS
/// server.
pub fn client_for(url: &str, tls: Option<&ServerTls>) -> redis::Client {
    let Some(tls) = tls else {
        return redis::Client::open(url).unwrap();
    };
    wsgateway::tls::install_crypto_provider();
    let info = redis::IntoConnectionInfo::into_connection_info(url).unwrap();
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: std::fs::read(&tls.client.0).unwrap(),
                client_key: std::fs::read(&tls.client.1).unwrap(),
            }),
            root_cert: Some(std::fs::read(&tls.ca).unwrap()),
        },
    )
    .unwrap()
}

pub fn publish_to(url: &str, channel: &str, payload: &str) -> i64 {
    publish_with(&redis::Client::open(url).unwrap(), channel, payload)
}

pub fn publish_with(client: &redis::Client, channel: &str, payload: &str) -> i64 {
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query(&mut conn)
        .unwrap()
}

/// `FCALL wsgateway_publish`, as a backend publishing straight to Redis:
/// the event's id, or the function's refusal.
pub fn fcall(
    url: &str,
    channels: &[&str],
    event: &serde_json::Value,
) -> redis::RedisResult<String> {
    fcall_as(url, "wsgateway_publish", channels, event).map(|(id, _)| id)
}

/// `FCALL <function>` (a deployment's `wsgateway_publish`): the event's id
/// and `published` or `duplicate`, or the function's refusal.
pub fn fcall_as(
    url: &str,
    function: &str,
    channels: &[&str],
    event: &serde_json::Value,
) -> redis::RedisResult<(String, String)> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut cmd = redis::cmd("FCALL");
    cmd.arg(function).arg(0);
    for c in channels {
        cmd.arg(*c);
    }
    cmd.arg(event.to_string()).query(&mut conn)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
