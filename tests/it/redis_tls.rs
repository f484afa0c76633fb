//! TLS to Redis (`rediss://`) against real `redis-server`s that have only a
//! TLS port, with certificates the test makes (a CA, a server certificate
//! for 127.0.0.1, a client certificate): delivery, resume and revocation
//! over TLS; a server that requires client certificates; a certificate from
//! another CA refused with a clear reason; and bad TLS settings stopping
//! `serve` at start with one line naming the setting.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::redis_server::{Options, RedisServer};
use common::tls::Pki;
use common::*;
use serde_json::{Value, json};
use wsgateway::auth::{mint, unix_now};
use wsgateway::config::{Secret, Secs};

fn tls_server(pki: &Pki, auth_clients: &'static str) -> RedisServer {
    RedisServer::start_with(Options {
        tls: Some(pki.server(auth_clients)),
        ..Options::default()
    })
}

fn numbered(kind: &str, n: usize) -> Value {
    json!({"type": kind, "tenant_id": 1, "branch_id": 5, "n": n, "ts": wsgateway::event::unix_ms()})
}

fn waiter_with_jti(sub: i64, jti: &str) -> String {
    mint(
        JWT_SECRET,
        &json!({"sub": sub, "tenant_id": 1, "branch_ids": [5], "roles": ["WAITER"],
                "exp": unix_now() + 3600, "jti": jti}),
    )
}

#[tokio::test]
async fn delivers_resumes_and_revokes_over_tls_verified_by_the_ca_file() {
    let pki = Pki::generate("a");
    let server = tls_server(&pki, "no");
    assert!(server.url().starts_with("rediss://"));
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.redis_ca_file = Some(pki.ca.clone());
        c.revoked_jti_key = Some("revoked:jti".into());
    })
    .await;
    gw.wait_health(Duration::from_secs(10), |s, b| {
        s == 200 && b["status"] == "healthy"
    })
    .await;
    let (mut waiter, _) = gw.join("waiter", &staff(1, 1, &[5], &["WAITER"])).await;

    // The publish API: the function call and the subscription over TLS.
    let first = gw
        .publish_one("channel:branch:5:waiters", numbered("ROUND_READY", 1))
        .await;
    let got = waiter.next_json().await.expect("the published event");
    assert_eq!(
        (got["n"].as_u64(), got["event_id"].as_str()),
        (Some(1), Some(first.as_str()))
    );
    // A backend's plain PUBLISH through its own TLS connection.
    assert_eq!(
        server.publish(
            "channel:branch:5:waiters",
            &numbered("ROUND_READY", 2).to_string()
        ),
        1,
        "the gateway's subscription is the one subscriber"
    );
    assert_eq!(waiter.next_json().await.unwrap()["n"], 2);
    let third = gw
        .publish_one("channel:branch:5:waiters", numbered("ROUND_SERVED", 3))
        .await;
    assert_eq!(
        waiter.next_json().await.unwrap()["event_id"],
        third.as_str()
    );

    // Resume reads history over TLS.
    let url = format!(
        "ws://{}/ws/waiter?token={}&last_event_id={first}",
        gw.addr,
        staff(2, 1, &[5], &["WAITER"])
    );
    let mut resumed = Client::open(&url, None).await;
    let hello = resumed.next_json().await.unwrap();
    assert_eq!(hello["recovered"], true, "{hello}");
    let replay = resumed.next_json().await.unwrap();
    assert_eq!(replay["event_id"], third.as_str(), "{replay}");

    // The revocation set is read over TLS too.
    let _: i64 = server
        .query(redis::cmd("SADD").arg("revoked:jti").arg("1:jti-gone"))
        .unwrap();
    let mut refused = gw.connect("waiter", &waiter_with_jti(3, "jti-gone")).await;
    assert_eq!(refused.close_code().await, Some(4001));
    let (mut kept, _) = gw.join("waiter", &waiter_with_jti(4, "jti-kept")).await;
    assert_eq!(kept.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    let metrics = gw.metrics().await;
    let failed = metric_value(
        &metrics,
        r#"wsgateway_revocation_checks_total{outcome="error"}"#,
    );
    assert_eq!(failed.unwrap_or(0.0), 0.0, "{metrics}");
    gw.stop().await;
}

#[tokio::test]
async fn a_server_requiring_client_certificates_takes_the_configured_one() {
    let pki = Pki::generate("a");
    let server = tls_server(&pki, "yes");
    // Without a client certificate: refused, and health says why.
    let without = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.redis_ca_file = Some(pki.ca.clone());
        c.redis_health_check_s = Secs(Duration::from_millis(200));
    })
    .await;
    let (status, health) = without
        .wait_health(Duration::from_secs(10), |_, b| {
            b["broker"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("TLS"))
        })
        .await;
    assert_eq!(status, 503, "{health}");
    let reason = health["broker"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("client certificate")
            && reason.contains("WSGATEWAY_REDIS_CLIENT_CERT_FILE"),
        "{reason}"
    );
    without.stop().await;

    let with = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.redis_ca_file = Some(pki.ca.clone());
        c.redis_client_cert_file = Some(pki.client_cert.clone());
        c.redis_client_key_file = Some(pki.client_key.clone());
    })
    .await;
    with.wait_health(Duration::from_secs(10), |s, b| {
        s == 200 && b["status"] == "healthy"
    })
    .await;
    let (mut kitchen, _) = with.join("kitchen", &staff(1, 1, &[5], &["KITCHEN"])).await;
    let id = with
        .publish_one("channel:branch:5:kitchen", numbered("ROUND_READY", 1))
        .await;
    assert_eq!(kitchen.next_json().await.unwrap()["event_id"], id.as_str());
    with.stop().await;
}

/// `GET /ws/health/detailed` of a `serve` process.
async fn health_of(addr: &str) -> (u16, Value) {
    let resp = reqwest::get(format!("http://{addr}/ws/health/detailed"))
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_with_a_clear_reason_logged_once() {
    let pki = Pki::generate("a");
    let other = Pki::generate("b");
    let server = tls_server(&pki, "no");
    let url = server.url();
    let ca = other.ca.display().to_string();
    let gw = ServeProcess::start(&[
        ("REDIS_URL", url.as_str()),
        ("WSGATEWAY_REDIS_CA_FILE", ca.as_str()),
        ("WSGATEWAY_API_KEY", API_KEY),
    ])
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (status, health) = loop {
        let (status, health) = health_of(&gw.addr).await;
        if health["broker"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("TLS"))
        {
            break (status, health);
        }
        assert!(tokio::time::Instant::now() < deadline, "{health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (status, health["status"].as_str()),
        (503, Some("unhealthy"))
    );
    assert_eq!(health["broker"]["status"], "disconnected", "{health}");
    assert_eq!(
        health["broker"]["reason"],
        "cannot subscribe: TLS: certificate not trusted (WSGATEWAY_REDIS_CA_FILE)",
        "{health}"
    );
    // Nothing is published over an untrusted connection.
    let resp = reqwest::Client::new()
        .post(format!("http://{}/api/publish", gw.addr))
        .bearer_auth(API_KEY)
        .json(&json!({"channel": "channel:branch:5:waiters", "event": numbered("X", 1)}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    // The subscriber retries every ≤ 2 s and the health check every 1 s:
    // over 4 s, the reason is logged once per connection (the start-up
    // check, the subscription, the command connection, presence's), not
    // per retry.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = gw.log_so_far().await;
    let lines = log
        .lines()
        .filter(|l| l.contains("certificate not trusted") && !l.contains("publish refused"))
        .count();
    assert!((1..=4).contains(&lines), "{lines} lines:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("ERROR") && log.contains("certificate not trusted (WSGATEWAY_REDIS_CA_FILE)"),
        "{log}"
    );
    gw.terminate();
    let (exit, _) = gw.wait().await;
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn without_a_ca_file_the_system_roots_decide() {
    let pki = Pki::generate("a");
    let server = tls_server(&pki, "no");
    let gw = TestGateway::start_with(|c| c.redis_url = Some(Secret(server.url()))).await;
    let (status, health) = gw
        .wait_health(Duration::from_secs(10), |_, b| {
            b["broker"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("TLS"))
        })
        .await;
    assert_eq!(status, 503);
    let reason = health["broker"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("certificate not trusted") && reason.contains("system roots"),
        "{reason}"
    );
    gw.stop().await;
}

/// Runs `wsgateway serve` with `env`; returns its exit code and stderr.
fn serve_fails(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_wsgateway"));
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("JWT_SECRET", JWT_SECRET)
        .env("TABLE_TOKEN_SECRET", TABLE_SECRET)
        .env_remove("REDIS_URL")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_tls_settings_stop_serve_with_one_line_naming_the_setting() {
    let pki = Pki::generate("a");
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let p = |p: &Path| p.display().to_string();
    let (ca, cert, key) = (p(&pki.ca), p(&pki.client_cert), p(&pki.client_key));
    let (garbage, missing) = (p(&garbage), p(&missing));
    let other_key = p(&pki.server_key);
    let tls_url = "rediss://127.0.0.1:1";
    // (environment, the setting the line names, words it says)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![
                ("REDIS_URL", tls_url),
                ("WSGATEWAY_REDIS_CA_FILE", &missing),
            ],
            "WSGATEWAY_REDIS_CA_FILE",
            "cannot read",
        ),
        (
            vec![
                ("REDIS_URL", tls_url),
                ("WSGATEWAY_REDIS_CA_FILE", &garbage),
            ],
            "WSGATEWAY_REDIS_CA_FILE",
            "no PEM certificate",
        ),
        (
            vec![
                ("REDIS_URL", tls_url),
                ("WSGATEWAY_REDIS_CLIENT_CERT_FILE", &cert),
            ],
            "WSGATEWAY_REDIS_CLIENT_KEY_FILE",
            "required by WSGATEWAY_REDIS_CLIENT_CERT_FILE",
        ),
        (
            vec![
                ("REDIS_URL", tls_url),
                ("WSGATEWAY_REDIS_CLIENT_KEY_FILE", &key),
            ],
            "WSGATEWAY_REDIS_CLIENT_CERT_FILE",
            "required by WSGATEWAY_REDIS_CLIENT_KEY_FILE",
        ),
        (
            vec![
                ("REDIS_URL", tls_url),
                ("WSGATEWAY_REDIS_CLIENT_CERT_FILE", &garbage),
                ("WSGATEWAY_REDIS_CLIENT_KEY_FILE", &key),
            ],
            "WSGATEWAY_REDIS_CLIENT_CERT_FILE",
            "no PEM certificate",
        ),
        (
            vec![
                ("REDIS_URL", tls_url),
                ("WSGATEWAY_REDIS_CLIENT_CERT_FILE", &cert),
                ("WSGATEWAY_REDIS_CLIENT_KEY_FILE", &garbage),
            ],
            "WSGATEWAY_REDIS_CLIENT_KEY_FILE",
            "no PEM private key",
        ),
        (
            // A key that is not the certificate's.
            vec![
                ("REDIS_URL", tls_url),
                ("WSGATEWAY_REDIS_CLIENT_CERT_FILE", &cert),
                ("WSGATEWAY_REDIS_CLIENT_KEY_FILE", &other_key),
            ],
            "WSGATEWAY_REDIS_CLIENT_KEY_FILE",
            "not usable with WSGATEWAY_REDIS_CLIENT_CERT_FILE",
        ),
        (
            vec![
                ("REDIS_URL", "redis://127.0.0.1:1"),
                ("WSGATEWAY_REDIS_CA_FILE", &ca),
            ],
            "WSGATEWAY_REDIS_CA_FILE",
            "need a rediss:// REDIS_URL",
        ),
        (
            vec![("WSGATEWAY_REDIS_CA_FILE", &ca)],
            "WSGATEWAY_REDIS_CA_FILE",
            "REDIS_URL is not",
        ),
        (
            vec![
                (
                    "REDIS_URL",
                    "redis://127.0.0.1:7000/2,redis://127.0.0.1:7001",
                ),
                ("WSGATEWAY_REDIS_MODE", "cluster"),
                ("WSGATEWAY_REDIS_PREFIX", "p"),
            ],
            "REDIS_URL",
            "a Redis Cluster has database 0 only",
        ),
        (
            vec![
                ("REDIS_URL", tls_url),
                ("WSGATEWAY_REDIS_MODE", "clustered"),
            ],
            "WSGATEWAY_REDIS_MODE",
            "is not one of standalone, sentinel, cluster",
        ),
        (
            vec![("REDIS_URL", tls_url), ("WSGATEWAY_REDIS_MODE", "sentinel")],
            "WSGATEWAY_REDIS_SENTINEL_MASTER",
            "required by WSGATEWAY_REDIS_MODE=sentinel",
        ),
        (
            vec![
                ("REDIS_URL", tls_url),
                ("WSGATEWAY_REDIS_SENTINEL_MASTER", "mymaster"),
            ],
            "WSGATEWAY_REDIS_SENTINEL_MASTER",
            "not sentinel",
        ),
    ];
    for (env, setting, words) in cases {
        let (code, stderr) = serve_fails(&env);
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{env:?}: one line, got:\n{stderr}");
        assert!(
            lines[0].contains(setting) && lines[0].contains(words),
            "{env:?}: {stderr}"
        );
    }
}
