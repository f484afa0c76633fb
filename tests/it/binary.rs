//! The real binary: `dev` prints tokens and a publish command that work as
//! printed, and gives its demo page working tokens; `serve` serves the
//! demo page only with `WSGATEWAY_DEMO_PAGE=true`. Its drain on SIGTERM is
//! drain.rs's.

use crate::common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use wsgateway::auth::unix_now;

const BIN: &str = env!("CARGO_BIN_EXE_wsgateway");

/// Reads `lines` until one contains `needle`; returns that line.
async fn wait_for_line<R: tokio::io::AsyncRead + Unpin>(
    lines: &mut tokio::io::Lines<BufReader<R>>,
    needle: &str,
) -> String {
    let find = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("the output ended before {needle:?}");
    };
    tokio::time::timeout(Duration::from_secs(30), find)
        .await
        .expect("timely output")
}

fn terminate(child: &Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// `serve` with `WSGATEWAY_METRICS_LISTEN` logs the metrics address,
/// serves `/ws/metrics` there and 404 on the public port, and stops both
/// on SIGTERM.
#[tokio::test]
async fn serve_with_metrics_listen_scrapes_only_there() {
    let gateway = ServeProcess::start(&[("WSGATEWAY_METRICS_LISTEN", "127.0.0.1:0")]).await;
    let addr = gateway.addr.clone();
    let metrics_addr = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(found) = gateway.log_so_far().await.lines().find_map(|l| {
                l.split("metrics=")
                    .nth(1)
                    .map(|r| r.split_whitespace().next().unwrap().to_owned())
            }) {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the metrics address is logged");
    let get = |url: String| async move { reqwest::get(url).await.unwrap() };
    let scraped = get(format!("http://{metrics_addr}/ws/metrics")).await;
    assert_eq!(scraped.status(), 200);
    assert!(
        scraped
            .text()
            .await
            .unwrap()
            .contains("wsgateway_connections_total")
    );
    assert_eq!(get(format!("http://{addr}/ws/metrics")).await.status(), 404);
    gateway.terminate();
    let (status, _) = gateway.wait().await;
    assert!(status.success(), "{status:?}");
    assert!(tokio::net::TcpStream::connect(&metrics_addr).await.is_err());
}

#[tokio::test]
async fn a_bad_setting_stops_startup_with_one_line_naming_it() {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("JWT_SECRET", "s")
        .env("TABLE_TOKEN_SECRET", "t")
        .env("WSGATEWAY_MAX_CONNECTIONS", "many")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("WSGATEWAY_MAX_CONNECTIONS"), "{err}");
    let out = Command::new(BIN)
        .args(["serve"])
        .env_remove("JWT_SECRET")
        .env_remove("TABLE_TOKEN_SECRET")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Both missing secrets, in one line.
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("TABLE_TOKEN_SECRET") && err.contains("JWT_SECRET (--jwt-secret)"),
        "{err}"
    );
}

/// One secret for staff and table tokens would let the holder of the
/// diners' secret sign staff tokens: `serve` refuses to start, with one
/// line that names both settings and not the secret.
#[tokio::test]
async fn serve_refuses_the_same_secret_for_staff_and_table_tokens() {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("JWT_SECRET", "one-shared-secret-value")
        .env("TABLE_TOKEN_SECRET", "one-shared-secret-value")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("JWT_SECRET") && err.contains("TABLE_TOKEN_SECRET"),
        "{err}"
    );
    assert!(!err.contains("one-shared-secret-value"), "{err}");
}

#[tokio::test]
async fn dev_prints_tokens_and_a_publish_command_that_work() {
    let mut child = Command::new(BIN)
        .args(["dev", "--listen", "127.0.0.1:0"])
        .env_remove("JWT_SECRET")
        .env_remove("TABLE_TOKEN_SECRET")
        .env_remove("WSGATEWAY_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let value_of = |line: String| line.split_once('=').unwrap().1.to_owned();
    let jwt_secret = value_of(wait_for_line(&mut stdout, "JWT_SECRET=").await);
    let table_secret = value_of(wait_for_line(&mut stdout, "TABLE_TOKEN_SECRET=").await);
    let api_key = value_of(wait_for_line(&mut stdout, "WSGATEWAY_API_KEY=").await);
    let url_of = |line: String| line.split_whitespace().nth(1).unwrap().to_owned();
    let waiter = url_of(wait_for_line(&mut stdout, "/ws/waiter?token=").await);
    let kitchen = url_of(wait_for_line(&mut stdout, "/ws/kitchen?token=").await);
    let admin = url_of(wait_for_line(&mut stdout, "/ws/admin?token=").await);
    let diner = url_of(wait_for_line(&mut stdout, "/ws/diner?table_token=").await);
    let publish = wait_for_line(&mut stdout, " publish --url ").await;
    let curl = wait_for_line(&mut stdout, "curl ").await;

    let mut clients = Vec::new();
    for url in [&waiter, &kitchen, &admin, &diner] {
        let mut c = Client::open(url, None).await;
        assert_eq!(c.next_json().await.unwrap()["type"], "connected", "{url}");
        clients.push(c);
    }
    let run = |cmd: String| async move {
        let out = Command::new("sh")
            .args(["-c", &cmd])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let answer = run(publish.trim().to_owned()).await;
    let id = answer["event_ids"][0].clone();
    let [w, k, a, d] = &mut clients[..] else {
        unreachable!()
    };
    let got = w.next_json().await.unwrap();
    assert_eq!(
        (got["type"].clone(), got["event_id"].clone()),
        (json!("ROUND_READY"), id.clone())
    );
    assert_eq!(a.next_json().await.unwrap()["event_id"], id);
    // The curl too reaches the first printed URL, the waiter's.
    let answer = run(curl.trim().to_owned()).await;
    let got = w.next_json().await.unwrap();
    assert_eq!(got["event_id"], answer["event_ids"][0]);
    assert_eq!(got["type"], "ROUND_READY");
    assert_eq!(a.next_json().await.unwrap()["event_id"], got["event_id"]);
    for other in [k, d] {
        assert!(
            other
                .next_json_within(Duration::from_millis(300))
                .await
                .is_none()
        );
    }
    // The printed secrets are the ones it uses: a token minted with them
    // connects, and the key publishes.
    let addr = waiter.split("/ws/").next().unwrap().replace("ws://", "");
    let mint = |args: Vec<String>| async move {
        let out = Command::new(BIN).args(args).output().await.unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let staff = mint(
        "token staff --sub 70 --tenant 1 --branches 5 --roles WAITER --secret"
            .split(' ')
            .map(str::to_owned)
            .chain([jwt_secret])
            .collect(),
    )
    .await;
    let table = mint(
        "token table --tenant 1 --branch 5 --table 3 --session 78 --secret"
            .split(' ')
            .map(str::to_owned)
            .chain([table_secret])
            .collect(),
    )
    .await;
    for url in [
        format!("ws://{addr}/ws/waiter?token={staff}"),
        format!("ws://{addr}/ws/diner?table_token={table}"),
    ] {
        let mut c = Client::open(&url, None).await;
        assert_eq!(c.next_json().await.unwrap()["type"], "connected", "{url}");
    }
    assert_eq!(api_key, "wsgateway-dev-api-key");
    // The demo page is served.
    let page = reqwest::get(
        waiter
            .replace("ws://", "http://")
            .split("/ws/")
            .next()
            .unwrap()
            .to_owned()
            + "/",
    )
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(page.contains("wsgateway dev"));
    // It gets dev's tokens and key, fresh, and they open their endpoints.
    let http = waiter.replace("ws://", "http://");
    let base = http.split("/ws/").next().unwrap();
    let session: serde_json::Value = reqwest::get(format!("{base}/demo/session.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session["dev"], true);
    assert_eq!(session["api_key"], "wsgateway-dev-api-key");
    let tokens = session["tokens"].as_array().unwrap();
    let endpoints: Vec<&str> = tokens
        .iter()
        .map(|t| t["endpoint"].as_str().unwrap())
        .collect();
    assert_eq!(endpoints, ["waiter", "kitchen", "admin", "diner"]);
    for t in tokens {
        let endpoint = t["endpoint"].as_str().unwrap();
        let param = if endpoint == "diner" {
            "table_token"
        } else {
            "token"
        };
        let url = format!(
            "{}/ws/{endpoint}?{param}={}",
            base.replace("http://", "ws://"),
            t["token"].as_str().unwrap()
        );
        let mut c = Client::open(&url, None).await;
        assert_eq!(c.next_json().await.unwrap()["endpoint"], endpoint);
    }
    terminate(&child);
    assert!(child.wait().await.unwrap().success());
}

/// `dev` signs with public secrets, so a public address (here from
/// `WSGATEWAY_LISTEN`, as a developer's shell might carry for `serve`) is
/// refused with a warning naming it, and `dev` listens on loopback.
/// `serve` has no demo page unless asked; with `WSGATEWAY_DEMO_PAGE=true`
/// it serves the page and the client, and no development tokens.
#[tokio::test]
async fn serve_serves_the_demo_page_only_when_asked() {
    let get = |url: String| async move { reqwest::get(url).await.unwrap() };
    let plain = ServeProcess::start(&[]).await;
    for path in ["/", "/client.js", "/demo/session.json"] {
        let status = get(format!("http://{}{path}", plain.addr)).await.status();
        assert_eq!(status, 404, "{path}");
    }
    plain.terminate();
    assert!(plain.wait().await.0.success());
    let demo = ServeProcess::start(&[("WSGATEWAY_DEMO_PAGE", "true")]).await;
    let addr = demo.addr.clone();
    let page = get(format!("http://{addr}/")).await;
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(page.contains("<meta name=\"viewport\"") && page.contains("from './client.js'"));
    let client = get(format!("http://{addr}/client.js")).await;
    assert_eq!(
        client.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert!(client.text().await.unwrap().contains("WsGatewayClient"));
    let session: serde_json::Value = get(format!("http://{addr}/demo/session.json"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        session,
        json!({"dev": false, "api_key": null, "tokens": []})
    );
    demo.terminate();
    let (status, _) = demo.wait().await;
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn dev_listens_on_loopback_only_and_says_so() {
    let mut child = Command::new(BIN)
        .args(["dev"])
        .env("WSGATEWAY_LISTEN", "0.0.0.0:0")
        .env_remove("JWT_SECRET")
        .env_remove("TABLE_TOKEN_SECRET")
        .env_remove("WSGATEWAY_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let warning = wait_for_line(&mut stderr, "not listening on").await;
    assert!(warning.contains("0.0.0.0:0"), "{warning}");
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = wait_for_line(&mut stdout, "listening on http://").await;
    let addr = listening.split("http://").nth(1).unwrap();
    let addr: std::net::SocketAddr = addr.split_whitespace().next().unwrap().parse().unwrap();
    assert!(addr.ip().is_loopback(), "{listening}");
    let admin = wait_for_line(&mut stdout, "/ws/admin?token=").await;
    let url = admin.split_whitespace().nth(1).unwrap();
    assert!(url.starts_with(&format!("ws://{addr}/")), "{url}");
    let mut c = Client::open(url, None).await;
    assert_eq!(c.next_json().await.unwrap()["type"], "connected");
    terminate(&child);
    assert!(child.wait().await.unwrap().success());
}

#[tokio::test]
async fn nothing_secret_is_logged_even_at_trace_level() {
    let api_key = "api-key-that-must-not-leak";
    let gateway = ServeProcess::start(&[
        ("WSGATEWAY_API_KEY", api_key),
        ("RUST_LOG", "trace,tungstenite::protocol=trace"),
    ])
    .await;
    let addr = gateway.addr.clone();
    let good = staff(1, 1, &[5], &["WAITER"]);
    let forbidden = staff(2, 1, &[5], &["KITCHEN"]);
    let table = diner(1, 5, 1, 77);
    let mut tokens = vec![good.clone(), forbidden.clone(), table.clone()];
    let mut c = Client::open(&format!("ws://{addr}/ws/waiter?token={good}"), None).await;
    assert_eq!(c.next_json().await.unwrap()["type"], "connected");
    let mut d = Client::open(&format!("ws://{addr}/ws/diner?table_token={table}"), None).await;
    assert_eq!(d.next_json().await.unwrap()["type"], "connected");
    let mut f = Client::open(&format!("ws://{addr}/ws/waiter?token={forbidden}"), None).await;
    assert_eq!(f.close_code().await, Some(4003));
    let tampered = format!("{good}x");
    let mut t = Client::open(&format!("ws://{addr}/ws/admin?token={tampered}"), None).await;
    assert_eq!(t.close_code().await, Some(4001));
    tokens.push(tampered);
    // Tokens sent in `refresh_token` messages, accepted or not.
    let refreshed = staff_token_exp(json!(1), 1, &[5, 6], &["WAITER"], unix_now() + 7200);
    let wrong_user = staff(3, 1, &[5], &["WAITER"]);
    let refreshed_table = diner_exp(1, 5, 1, 77, unix_now() + 7200);
    for (diner_side, token, answer) in [
        (false, &refreshed, "token_refreshed"),
        (false, &wrong_user, "error"),
        (true, &refreshed_table, "token_refreshed"),
    ] {
        let client = if diner_side { &mut d } else { &mut c };
        let message = json!({"type": "refresh_token", "token": token}).to_string();
        assert_eq!(client.ask(&message).await["type"], answer);
        tokens.push(token.clone());
    }
    for key in [api_key, "a-wrong-key-that-must-not-leak"] {
        reqwest::Client::new()
            .post(format!("http://{addr}/api/publish"))
            .bearer_auth(key)
            .body(r#"{"channel":"channel:branch:5:waiters","event":{"type":"X","tenant_id":1,"branch_id":5}}"#)
            .send()
            .await
            .unwrap();
    }
    drop((c, d));
    gateway.terminate();
    let (status, log) = gateway.wait().await;
    assert!(status.success());
    assert!(log.lines().count() > 20, "trace logging is on: {log}");
    for secret in tokens.iter().map(String::as_str).chain([
        JWT_SECRET,
        TABLE_SECRET,
        api_key,
        "a-wrong-key-that-must-not-leak",
    ]) {
        // Any 20-character piece of a secret is enough to count as a leak.
        let piece = &secret[secret.len().saturating_sub(20)..];
        assert!(
            !log.contains(piece),
            "the log holds a secret ({piece}):\n{log}"
        );
    }
}

/// `--secret "$JWT_SECRET"` with the variable unset is an empty secret: no
/// token is minted with it, the message says why, and the status is not 0.
#[tokio::test]
async fn token_refuses_an_empty_secret() {
    for (args, env) in [
        (
            &["staff", "--sub", "7", "--tenant", "1", "--branches", "5"][..],
            "JWT_SECRET",
        ),
        (
            &[
                "table",
                "--tenant",
                "1",
                "--branch",
                "5",
                "--table",
                "12",
                "--session",
                "77",
            ][..],
            "TABLE_TOKEN_SECRET",
        ),
    ] {
        for secret in ["", "  "] {
            let out = Command::new(BIN)
                .arg("token")
                .args(args)
                .args(["--secret", secret])
                .env_remove("JWT_SECRET")
                .env_remove("TABLE_TOKEN_SECRET")
                .output()
                .await
                .unwrap();
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            assert!(out.stdout.is_empty(), "no token is printed");
            let err = String::from_utf8(out.stderr).unwrap();
            assert!(
                err.contains("--secret is empty") && err.contains(env),
                "{err}"
            );
        }
        // A secret still mints a token.
        let out = Command::new(BIN)
            .arg("token")
            .args(args)
            .args(["--secret", "s"])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8(out.stdout).unwrap().split('.').count(), 3);
    }
}

/// At the default level (no RUST_LOG): connections that close log no
/// tungstenite line, and each `Connection closed` line names its
/// `sector_ids` once. Without `WSGATEWAY_API_KEY`, one warning at start says
/// the publish API is off, and `/api/publish` answers 404 with a JSON body
/// saying so.
#[tokio::test]
async fn serve_at_the_default_level_logs_closes_once_and_says_publish_is_off() {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("JWT_SECRET", JWT_SECRET)
        .env("TABLE_TOKEN_SECRET", TABLE_SECRET)
        .env_remove("RUST_LOG")
        .env_remove("WSGATEWAY_API_KEY")
        .env_remove("WSGATEWAY_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = wait_for_line(&mut stderr, "addr=").await;
    let addr = listening.split("addr=").nth(1).unwrap().trim().to_owned();
    // Closed by the client, by the gateway (forbidden), and by shutdown.
    let waiter = format!(
        "ws://{addr}/ws/waiter?token={}",
        staff(1, 1, &[5], &["WAITER"])
    );
    let mut c = Client::open(&waiter, None).await;
    assert_eq!(c.next_json().await.unwrap()["type"], "connected");
    drop(c);
    let kitchen = format!(
        "ws://{addr}/ws/kitchen?token={}",
        staff(2, 1, &[5], &["WAITER"])
    );
    assert_eq!(
        Client::open(&kitchen, None).await.close_code().await,
        Some(4003)
    );
    let mut open = Client::open(&waiter, None).await;
    assert_eq!(open.next_json().await.unwrap()["type"], "connected");
    let answer = reqwest::Client::new()
        .post(format!("http://{addr}/api/publish"))
        .bearer_auth("any")
        .body(r#"{"channel":"channel:branch:5:waiters","event":{"type":"X","tenant_id":1,"branch_id":5}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 404);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"], "publish_disabled");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("WSGATEWAY_API_KEY"),
        "{body}"
    );
    terminate(&child);
    assert_eq!(open.close_code().await, Some(1012));
    let mut log = listening + "\n";
    while let Some(line) = stderr.next_line().await.unwrap() {
        log.push_str(&line);
        log.push('\n');
    }
    assert!(child.wait().await.unwrap().success());
    assert!(!log.contains("tungstenite"), "{log}");
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Connection closed"))
        .collect();
    assert!(closed.len() >= 2, "{log}");
    for line in closed {
        assert_eq!(line.matches("sector_ids=").count(), 1, "{line}");
    }
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("publish API is off"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("WSGATEWAY_API_KEY"),
        "{log}"
    );
}

/// `serve --help` and `dev --help` show each setting's default, from the
/// settings table; the help only shows it (an environment variable still
/// beats the file and the default: `config.rs`'s tests).
#[tokio::test]
async fn help_shows_every_default() {
    for command in ["serve", "dev"] {
        let out = Command::new(BIN)
            .args([command, "--help"])
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        let help = String::from_utf8(out.stdout).unwrap();
        for s in wsgateway::config::SETTINGS {
            if let Some(default) = s.default {
                assert!(
                    help.contains(&format!("[default: {default}]")),
                    "{command} --help lacks the default of {}:\n{help}",
                    s.env
                );
            }
        }
    }
}

/// `--version` names the package version, and `--help` the commands the
/// README names: a newcomer's first two commands.
#[test]
fn version_and_help_answer_without_a_configuration() {
    let run = |arg: &str| {
        let out = std::process::Command::new(BIN)
            .arg(arg)
            .env_clear()
            .output()
            .unwrap();
        assert!(out.status.success(), "{arg}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        run("--version").trim(),
        format!("wsgateway {}", env!("CARGO_PKG_VERSION"))
    );
    let help = run("--help");
    for command in ["serve", "dev", "token", "publish", "outbox"] {
        assert!(help.contains(command), "--help lacks {command}: {help}");
    }
}

/// The public address's listen queue (`ss` shows a listening socket's
/// backlog as its Send-Q), the default and a configured one.
#[tokio::test]
async fn the_listen_queue_is_as_long_as_configured() {
    let backlog = |addr: &str| {
        let port = addr.rsplit(':').next().unwrap().to_owned();
        let out = std::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_owned()
    };
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let default = ServeProcess::start(&[]).await;
    assert_eq!(backlog(&default.addr), 4096.min(somaxconn).to_string());
    let set = ServeProcess::start(&[("WSGATEWAY_LISTEN_BACKLOG", "777")]).await;
    assert_eq!(backlog(&set.addr), 777.min(somaxconn).to_string());
}
