//! A private `redis-server` on a free loopback port, for tests that need
//! their own Redis (to kill it, or to count exactly).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
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
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(),
                child: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server could not bind a free port in 5 tries");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
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
            if self.answers() && self.process_id() == Some(pid) {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server on port {} did not start", self.port);
    }

    /// The `process_id` of the Redis answering on the port.
    fn process_id(&self) -> Option<u32> {
        let client = redis::Client::open(self.url()).ok()?;
        let mut conn = client
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
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// PUBLISHes raw text, as a backend would.
    pub fn publish(&self, channel: &str, payload: &str) -> i64 {
        publish_to(&self.url(), channel, payload)
    }
}

pub fn publish_to(url: &str, channel: &str, payload: &str) -> i64 {
    let client = redis::Client::open(url).unwrap();
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
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("wsgateway_publish").arg(0);
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
