//! Test support: a real gateway on a loopback port, real WebSocket clients,
//! real HTTP calls.
#![allow(dead_code)]

pub mod cluster;
pub mod logs;
pub mod pg_tls;
pub mod postgres;
pub mod proxy;
pub mod redis_server;
pub mod sentinel;
pub mod table;
pub mod tls;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use wsgateway::auth::{StaffClaims, TableClaims, mint, unix_now};
use wsgateway::config::{Secret, Secs, SecsOrZero};
use wsgateway::{Config, Gateway};

/// The tests in this binary share one process and run side by side. Those
/// that load the machine or measure recovery times (killed Redis servers,
/// stalls, failovers, thousands of sockets, slow readers) hold this lock,
/// so that at most one of them runs at a time: each then measures the
/// gateway, not the other heavy tests. Take it first thing in the test.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// Raises this process's soft open-file limit to its hard limit, once for
/// every test (the limit is the process's, not a test's); returns it.
pub fn raise_open_file_limit() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| rlimit::increase_nofile_limit(u64::MAX).unwrap())
}

pub const JWT_SECRET: &str = "test-jwt-secret";
pub const TABLE_SECRET: &str = "test-table-secret";
pub const API_KEY: &str = "test-api-key";

/// A gateway serving on 127.0.0.1:<random port> inside the test process.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub fn config() -> Config {
    let mut c = Config::with_secrets(JWT_SECRET, TABLE_SECRET);
    c.api_key = Some(Secret(API_KEY.into()));
    // Test clients often stop reading: do not wait long for close replies.
    c.close_timeout_s = Secs(Duration::from_secs(1));
    // Stopping a test gateway closes its connections at once.
    c.drain_s = SecsOrZero(Duration::ZERO);
    c
}

impl TestGateway {
    pub async fn start() -> TestGateway {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> TestGateway {
        let mut c = config();
        configure(&mut c);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let gateway = Gateway::new(c).unwrap();
        let signal = futures_util::stream::once(stop.clone().cancelled_owned());
        let task = tokio::spawn(gateway.serve(listener, signal));
        TestGateway { addr, stop, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Connects to `/ws/<endpoint>` with `token` (or `table_token` for the
    /// diner endpoint).
    pub async fn connect(&self, endpoint: &str, token: &str) -> Client {
        self.connect_with(endpoint, token, None).await
    }

    pub async fn connect_with(&self, endpoint: &str, token: &str, origin: Option<&str>) -> Client {
        let param = if endpoint == "diner" {
            "table_token"
        } else {
            "token"
        };
        let url = format!("ws://{}/ws/{endpoint}?{param}={token}", self.addr);
        Client::open(&url, origin).await
    }

    /// Connects and reads the `connected` message.
    pub async fn join(&self, endpoint: &str, token: &str) -> (Client, Value) {
        let mut c = self.connect(endpoint, token).await;
        let hello = c.next_json().await.expect("a connected message");
        assert_eq!(hello["type"], "connected", "{hello}");
        (c, hello)
    }

    /// Connects with `last_event_id` and reads the `connected` message.
    pub async fn join_from(&self, endpoint: &str, token: &str, last: &str) -> (Client, Value) {
        let param = if endpoint == "diner" {
            "table_token"
        } else {
            "token"
        };
        let url = format!(
            "ws://{}/ws/{endpoint}?{param}={token}&last_event_id={}",
            self.addr,
            urlencoding(last)
        );
        let mut c = Client::open(&url, None).await;
        let hello = c.next_json().await.expect("a connected message");
        assert_eq!(hello["type"], "connected", "{hello}");
        (c, hello)
    }

    /// `POST /api/publish` with the test key; returns status and body.
    pub async fn publish(&self, body: &Value) -> (u16, Value) {
        self.publish_raw(Some(API_KEY), body.to_string()).await
    }

    pub async fn publish_raw(&self, key: Option<&str>, body: String) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .post(self.url("/api/publish"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        answer(req).await
    }

    /// Publishes one event on one channel and expects a 202.
    pub async fn publish_one(&self, channel: &str, event: Value) -> String {
        let (status, body) = self
            .publish(&json!({"channel": channel, "event": event}))
            .await;
        assert_eq!(status, 202, "{body}");
        body["event_ids"][0].as_str().unwrap().to_owned()
    }

    /// `GET <path>`, with `key` as a bearer token when given; the status
    /// and the body (as JSON when it is).
    pub async fn get_with_key(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        get_with_key(&self.url(path), key).await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = reqwest::get(self.url(path)).await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/ws/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one sample of `/ws/metrics`, e.g.
    /// `wsgateway_connections_rejected_total{reason="auth"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics().await;
        metric_value(&text, sample).unwrap_or_else(|| panic!("no sample {sample} in\n{text}"))
    }

    /// Asserts the value of one sample of `/ws/metrics`. The `wsgateway_`
    /// prefix may be left out (`connections_rejected_total{reason="auth"}`)
    /// so that the assertion fits one line.
    pub async fn assert_metric(&self, sample: &str, expected: f64) {
        let sample = match sample.starts_with("wsgateway_") {
            true => sample.to_owned(),
            false => format!("wsgateway_{sample}"),
        };
        assert_eq!(self.metric(&sample).await, expected, "{sample}");
    }

    /// Polls one sample of `/ws/metrics` until `check` holds on its value
    /// (a missing sample is 0); returns it. Panics after 10 s.
    pub async fn wait_metric(&self, sample: &str, check: impl Fn(f64) -> bool) -> f64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let value = metric_value(&self.metrics().await, sample).unwrap_or(0.0);
            if check(value) {
                return value;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{sample} never satisfied the check; last: {value}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the node (in Redis mode) is subscribed to `n` scope
    /// channels: a node follows its audience, a moment after it changes.
    pub async fn wait_scopes(&self, n: usize) {
        self.wait_metric("wsgateway_redis_subscribed_scopes", |v| v == n as f64)
            .await;
    }

    /// Polls `/ws/health/detailed` until `check` holds; returns the last
    /// answer (status, body). Panics after `within`.
    pub async fn wait_health(
        &self,
        within: Duration,
        check: impl Fn(u16, &Value) -> bool,
    ) -> (u16, Value) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (status, body) = self.get_json("/ws/health/detailed").await;
            if check(status, &body) {
                return (status, body);
            }
            if tokio::time::Instant::now() > deadline {
                panic!("health never satisfied the check within {within:?}; last: {status} {body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the broker reports itself connected.
    pub async fn wait_connected(&self) {
        self.wait_health(Duration::from_secs(10), |_, b| {
            b["broker"]["status"] == "connected"
        })
        .await;
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }
}

/// `GET <url>`, with `key` as a bearer token when given.
pub async fn get_with_key(url: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(url);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    answer(req).await
}

/// Sends a request: its status and body, as JSON when it is.
async fn answer(req: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
}

pub fn staff_token(sub: Value, tenant: i64, branches: &[i64], roles: &[&str]) -> String {
    staff_token_exp(sub, tenant, branches, roles, unix_now() + 3600)
}

pub fn staff_token_exp(
    sub: Value,
    tenant: i64,
    branches: &[i64],
    roles: &[&str],
    exp: u64,
) -> String {
    let claims = json!({
        "sub": sub, "tenant_id": tenant, "branch_ids": branches, "roles": roles,
        "exp": exp, "iat": unix_now(),
    });
    mint(JWT_SECRET, &claims)
}

/// A staff token with typed claims (integer sub).
pub fn staff(sub: i64, tenant: i64, branches: &[i64], roles: &[&str]) -> String {
    mint(
        JWT_SECRET,
        &StaffClaims {
            sub,
            tenant_id: tenant,
            branch_ids: branches.to_vec(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            exp: unix_now() + 3600,
            iat: None,
            jti: None,
        },
    )
}

pub fn diner(tenant: i64, branch: i64, table: i64, session: i64) -> String {
    diner_exp(tenant, branch, table, session, unix_now() + 3600)
}

/// A table token that expires at `exp` (Unix seconds).
pub fn diner_exp(tenant: i64, branch: i64, table: i64, session: i64, exp: u64) -> String {
    mint(
        TABLE_SECRET,
        &TableClaims {
            tenant_id: tenant,
            branch_id: branch,
            table_id: table,
            session_id: session,
            exp,
        },
    )
}

pub fn event(kind: &str, tenant: i64, branch: i64) -> Value {
    json!({"type": kind, "tenant_id": tenant, "branch_id": branch})
}

/// A real WebSocket client.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How long a client waits for a frame that should come.
pub const WAIT: Duration = Duration::from_secs(5);

impl Client {
    pub async fn open(url: &str, origin: Option<&str>) -> Client {
        let mut req = url.into_client_request().unwrap();
        if let Some(origin) = origin {
            req.headers_mut().insert("origin", origin.parse().unwrap());
        }
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("handshake");
        Client { ws }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// Sends and returns whether the socket accepted it (it may be closing).
    pub async fn try_send(&mut self, m: Message) -> bool {
        self.ws.send(m).await.is_ok()
    }

    /// The next text frame as JSON, or `None` on close, error or timeout.
    pub async fn next_json(&mut self) -> Option<Value> {
        self.next_json_within(WAIT).await
    }

    pub async fn next_json_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??
                .ok()?;
            match m {
                Message::Text(t) => {
                    return Some(serde_json::from_str(t.as_str()).expect("JSON frame"));
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                _ => return None,
            }
        }
    }

    /// Sends a text message and returns the next JSON frame.
    pub async fn ask(&mut self, text: &str) -> Value {
        self.send_text(text).await;
        self.next_json().await.expect("a reply")
    }

    /// Reads (and discards) frames until the server's close frame; returns
    /// its code, or `None` when the connection ended without one.
    pub async fn close_code(&mut self) -> Option<u16> {
        self.close_code_within(WAIT).await
    }

    pub async fn close_code_within(&mut self, wait: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("no close frame within {wait:?}"),
                Ok(None) | Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Reads every text frame up to the server's close frame; returns them
    /// and the close code (`None` when the connection ended without one).
    pub async fn until_close(&mut self) -> (Vec<Value>, Option<u16>) {
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.ws.next()).await {
                Err(_) => panic!("no close frame within {WAIT:?}"),
                Ok(None) | Ok(Some(Err(_))) => return (got, None),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return (got, frame.map(|f| u16::from(f.code)));
                }
                Ok(Some(Ok(Message::Text(t)))) => {
                    got.push(serde_json::from_str(t.as_str()).unwrap())
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Collects every text frame that arrives until `quiet` passes with none.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut got = Vec::new();
        while let Some(v) = self.next_json_within(quiet).await {
            got.push(v);
        }
        got
    }
}

/// A `wsgateway serve` process on 127.0.0.1:<random port>, with the test
/// secrets and `env` on top; its log (standard error) is collected.
pub struct ServeProcess {
    pub child: tokio::process::Child,
    pub addr: String,
    /// Its stderr so far; complete once the process has exited.
    log: std::sync::Arc<std::sync::Mutex<String>>,
    log_task: tokio::task::JoinHandle<()>,
}

impl ServeProcess {
    pub async fn start(env: &[(&str, &str)]) -> ServeProcess {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgateway"));
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("JWT_SECRET", JWT_SECRET)
            .env("TABLE_TOKEN_SECRET", TABLE_SECRET)
            .env("RUST_LOG", "info")
            // At once, unless a test sets its own drain window.
            .env("WSGATEWAY_DRAIN_S", "0")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut log = String::new();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                log.push_str(&line);
                log.push('\n');
                if let Some(rest) = line.split("addr=").nth(1) {
                    return rest.split_whitespace().next().unwrap().to_owned();
                }
            }
            panic!("the gateway exited before listening:\n{log}");
        })
        .await
        .expect("the gateway listens within 30 s");
        let log = std::sync::Arc::new(std::sync::Mutex::new(log));
        let sink = log.clone();
        let log_task = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        ServeProcess {
            child,
            addr,
            log,
            log_task,
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (`TERM`, `INT`, `KILL`, ...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        assert!(
            std::process::Command::new("kill")
                .args([&format!("-{name}"), &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits for the exit; returns its status and the whole log.
    pub async fn wait(mut self) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("exits within the grace period")
            .unwrap();
        self.log_task.await.unwrap();
        let log = self.log.lock().unwrap().clone();
        (status, log)
    }

    /// The log written so far.
    pub async fn log_so_far(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

/// A `wsgateway serve` process (with the test API key) and a `TestGateway`
/// handle for its HTTP and WebSocket helpers; that handle's `stop` and
/// `task` are inert: dropping the process kills it.
pub struct Node {
    pub process: ServeProcess,
    pub gw: TestGateway,
}

impl Node {
    pub async fn start(env: &[(&str, &str)]) -> Node {
        let mut all = vec![("WSGATEWAY_API_KEY", API_KEY)];
        all.extend_from_slice(env);
        let process = ServeProcess::start(&all).await;
        let gw = TestGateway {
            addr: process.addr.parse().unwrap(),
            stop: CancellationToken::new(),
            task: tokio::spawn(async { Ok(()) }),
        };
        Node { process, gw }
    }

    /// Waits until `/ws/health/detailed` is 200 and `healthy`.
    pub async fn wait_healthy(&self, within: Duration) -> Value {
        self.gw
            .wait_health(within, |s, b| s == 200 && b["status"] == "healthy")
            .await
            .1
    }

    /// The last `lines` lines of its log.
    pub async fn log_tail(&self, lines: usize) -> String {
        let log = self.process.log_so_far().await;
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl std::ops::Deref for Node {
    type Target = TestGateway;
    fn deref(&self) -> &TestGateway {
        &self.gw
    }
}

/// Percent-encodes a query value.
pub fn urlencoding(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
