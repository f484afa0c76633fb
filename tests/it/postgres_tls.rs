//! Sector assignments over TLS, against a real PostgreSQL with `ssl=on`
//! that takes TCP connections over TLS only (tests/it/common/pg_tls.rs):
//! each `sslmode` means what it means in libpq; a certificate that does not
//! verify leaves `sector_repository` degraded with the reason, logged once,
//! and waiters hearing every sector; a missing `sslrootcert` stops `serve`.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::pg_tls::{CERT_USER, TlsPostgres};
use common::*;
use serde_json::{Value, json};
use wsgateway::config::{Secret, Secs};

const B: i64 = 5;
const WAITER: i64 = 1;

/// The server, with waiter 1 of a fresh tenant assigned sector 7 today.
async fn server() -> (Arc<TlsPostgres>, i64) {
    let pg = TlsPostgres::shared().await;
    let tenant = common::postgres::fresh_tenant();
    let db = pg.admin().await;
    common::postgres::assign(&db, tenant, B, WAITER, &[7]).await;
    (pg, tenant)
}

async fn gateway(url: String) -> TestGateway {
    TestGateway::start_with(|c| {
        c.database_url = Some(Secret(url));
        c.sector_retry_s = Secs(Duration::from_millis(200));
    })
    .await
}

/// Waits for the start-up check to have an outcome: `ok`, or `degraded`
/// for a reason other than not having been reached yet.
async fn settled(gw: &TestGateway) -> Value {
    let (_, body) = gw
        .wait_health(Duration::from_secs(20), |_, b| {
            let s = &b["sector_repository"];
            s["status"] == "ok" || (s["status"] == "degraded" && s["reason"] != "not reached yet")
        })
        .await;
    body["sector_repository"].clone()
}

fn ev(tenant: i64, tag: &str, sector: i64) -> Value {
    json!({"type": "SERVICE_CALL_CREATED", "tenant_id": tenant, "branch_id": B,
           "sector_id": sector, "tag": tag})
}

/// The sectors a waiter was told, and the tags of sector 7's and 8's
/// events that it then heard.
async fn what_the_waiter_hears(gw: &TestGateway, tenant: i64) -> (Value, Vec<String>) {
    let (mut w, hello) = gw
        .join("waiter", &staff(WAITER, tenant, &[B], &["WAITER"]))
        .await;
    gw.publish_one("channel:branch:5:waiters", ev(tenant, "s7", 7))
        .await;
    gw.publish_one("channel:branch:5:waiters", ev(tenant, "s8", 8))
        .await;
    let mut tags: Vec<String> = w
        .drain(Duration::from_millis(400))
        .await
        .iter()
        .filter_map(|f| f["tag"].as_str().map(str::to_owned))
        .collect();
    tags.sort();
    (hello["sector_ids"].clone(), tags)
}

#[tokio::test]
async fn verify_full_with_the_right_ca_reads_the_waiters_sectors() {
    let (pg, tenant) = server().await;
    let ca = pg.ca.to_str().unwrap().to_owned();
    for host in ["127.0.0.1", "localhost"] {
        let gw = gateway(pg.url(
            "postgres",
            host,
            &[("sslmode", "verify-full"), ("sslrootcert", &ca)],
        ))
        .await;
        let health = settled(&gw).await;
        assert_eq!(health, json!({"status": "ok"}), "{host}");
        assert_eq!(
            what_the_waiter_hears(&gw, tenant).await,
            (json!([7]), vec!["s7".to_owned()]),
            "{host}: sector 7 only"
        );
        gw.stop().await;
    }
}

/// Through the real binary, for its log: one line for the failure, however
/// many lookups and checks fail, naming the TLS failure; the password
/// nowhere.
#[tokio::test]
async fn verify_full_with_another_ca_is_refused_and_waiters_hear_every_sector() {
    let (pg, tenant) = server().await;
    let other = pg.other_ca.to_str().unwrap().to_owned();
    let url = pg
        .url(
            "postgres",
            "127.0.0.1",
            &[("sslmode", "verify-full"), ("sslrootcert", &other)],
        )
        .replace("postgres@", "postgres:pw-not-for-logs@");
    let gw = ServeProcess::start(&[
        ("DATABASE_URL", &url),
        ("WSGATEWAY_SECTOR_RETRY_S", "0.2"),
        ("WSGATEWAY_API_KEY", API_KEY),
    ])
    .await;
    let base = format!("http://{}", gw.addr);
    let health = || async {
        reqwest::get(format!("{base}/ws/health/detailed"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let reason = loop {
        let body = health().await;
        let reason = body["sector_repository"]["reason"].as_str().unwrap_or("");
        if reason.contains("certificate") {
            assert_eq!(body["sector_repository"]["status"], "degraded");
            assert_eq!(body["status"], "degraded");
            break reason.to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no TLS reason: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        reason.contains("TLS")
            && reason.contains("verify-full")
            && reason.contains("UnknownIssuer"),
        "{reason}"
    );

    // Two waiters: two more failed lookups, besides the retries' checks.
    for _ in 0..2 {
        let url = format!(
            "ws://{}/ws/waiter?token={}",
            gw.addr,
            staff(WAITER, tenant, &[B], &["WAITER"])
        );
        let mut w = Client::open(&url, None).await;
        let hello = w.next_json().await.unwrap();
        assert_eq!(hello["sector_ids"], Value::Null, "unknown: {hello}");
        let publish = |tag: &str, sector: i64| {
            reqwest::Client::new()
                .post(format!("{base}/api/publish"))
                .bearer_auth(API_KEY)
                .json(&json!({"channel": "channel:branch:5:waiters", "event": ev(tenant, tag, sector)}))
                .send()
        };
        assert_eq!(publish("s7", 7).await.unwrap().status(), 202);
        assert_eq!(publish("s8", 8).await.unwrap().status(), 202);
        let tags: Vec<Value> = w
            .drain(Duration::from_millis(400))
            .await
            .iter()
            .map(|f| f["tag"].clone())
            .collect();
        assert_eq!(tags, vec![json!("s7"), json!("s8")], "every sector");
    }
    // Several retry rounds' checks have failed too by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.terminate();
    let (_, log) = gw.wait().await;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sector repository degraded"))
        .collect();
    assert_eq!(lines.len(), 1, "once per change:\n{log}");
    assert!(lines[0].contains("certificate"), "{}", lines[0]);
    assert!(!log.contains("pw-not-for-logs"), "{log}");
}

#[tokio::test]
async fn verify_full_refuses_a_name_the_certificate_lacks_and_verify_ca_accepts_it() {
    let (pg, tenant) = server().await;
    let ca = pg.ca.to_str().unwrap().to_owned();
    // The certificate names localhost and 127.0.0.1; the server listens on
    // 127.0.0.2 too.
    let gw = gateway(pg.url(
        "postgres",
        "127.0.0.2",
        &[("sslmode", "verify-full"), ("sslrootcert", &ca)],
    ))
    .await;
    let health = settled(&gw).await;
    assert_eq!(health["status"], "degraded");
    let reason = health["reason"].as_str().unwrap();
    assert!(
        reason.contains("TLS") && reason.contains("not valid for name"),
        "{reason}"
    );
    assert_eq!(
        what_the_waiter_hears(&gw, tenant).await,
        (Value::Null, vec!["s7".to_owned(), "s8".to_owned()])
    );
    gw.stop().await;

    let gw = gateway(pg.url(
        "postgres",
        "127.0.0.2",
        &[("sslmode", "verify-ca"), ("sslrootcert", &ca)],
    ))
    .await;
    assert_eq!(settled(&gw).await, json!({"status": "ok"}));
    assert_eq!(
        what_the_waiter_hears(&gw, tenant).await,
        (json!([7]), vec!["s7".to_owned()])
    );
    gw.stop().await;
}

/// `require` (and the default, libpq's `prefer`) encrypt without a CA; given
/// one, `require` verifies the chain, as in libpq. The server takes TLS
/// only, so an answer means TLS.
#[tokio::test]
async fn require_and_prefer_need_no_ca_but_require_checks_one_that_is_given() {
    let (pg, tenant) = server().await;
    for params in [vec![("sslmode", "require")], vec![]] {
        let gw = gateway(pg.url("postgres", "127.0.0.2", &params)).await;
        assert_eq!(settled(&gw).await, json!({"status": "ok"}), "{params:?}");
        assert_eq!(
            what_the_waiter_hears(&gw, tenant).await,
            (json!([7]), vec!["s7".to_owned()])
        );
        gw.stop().await;
    }
    let other = pg.other_ca.to_str().unwrap().to_owned();
    let gw = gateway(pg.url(
        "postgres",
        "127.0.0.1",
        &[("sslmode", "require"), ("sslrootcert", &other)],
    ))
    .await;
    let health = settled(&gw).await;
    assert_eq!(health["status"], "degraded");
    assert!(
        health["reason"].as_str().unwrap().contains("UnknownIssuer"),
        "{health}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn disable_is_refused_by_a_server_that_takes_tls_only() {
    let (pg, tenant) = server().await;
    let gw = gateway(pg.url("postgres", "127.0.0.1", &[("sslmode", "disable")])).await;
    let health = settled(&gw).await;
    assert_eq!(health["status"], "degraded");
    let reason = health["reason"].as_str().unwrap();
    assert!(
        reason.contains("PostgreSQL refused") && reason.contains("no encryption"),
        "{reason}"
    );
    assert_eq!(
        what_the_waiter_hears(&gw, tenant).await,
        (Value::Null, vec!["s7".to_owned(), "s8".to_owned()])
    );
    gw.stop().await;
}

/// `certuser` may log in only with a client certificate of the server's CA
/// (`hostssl ... cert`): `sslcert` and `sslkey` provide it.
#[tokio::test]
async fn a_client_certificate_from_sslcert_and_sslkey() {
    let (pg, tenant) = server().await;
    let ca = pg.ca.to_str().unwrap().to_owned();
    let (cert, key) = (
        pg.client_cert.to_str().unwrap().to_owned(),
        pg.client_key.to_str().unwrap().to_owned(),
    );
    let gw = gateway(pg.url(
        CERT_USER,
        "localhost",
        &[
            ("sslmode", "verify-full"),
            ("sslrootcert", &ca),
            ("sslcert", &cert),
            ("sslkey", &key),
        ],
    ))
    .await;
    assert_eq!(settled(&gw).await, json!({"status": "ok"}));
    assert_eq!(
        what_the_waiter_hears(&gw, tenant).await,
        (json!([7]), vec!["s7".to_owned()])
    );
    gw.stop().await;

    let gw = gateway(pg.url(
        CERT_USER,
        "localhost",
        &[("sslmode", "verify-full"), ("sslrootcert", &ca)],
    ))
    .await;
    let health = settled(&gw).await;
    assert_eq!(health["status"], "degraded");
    assert!(
        health["reason"].as_str().unwrap().contains("certificate"),
        "{health}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_missing_sslrootcert_file_stops_serve() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgateway"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("JWT_SECRET", JWT_SECRET)
        .env("TABLE_TOKEN_SECRET", TABLE_SECRET)
        .env_remove("REDIS_URL")
        .env(
            "DATABASE_URL",
            "postgres://app:pw-not-for-logs@db.example.com/app?sslmode=verify-full&sslrootcert=/nonexistent/db-ca.pem",
        )
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let log = String::from_utf8(out.stderr).unwrap();
    // The error is one line (an info line about the broker may come first).
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("wsgateway:"))
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    let err = errors[0];
    assert!(
        err.contains("DATABASE_URL")
            && err.contains("sslrootcert=/nonexistent/db-ca.pem")
            && err.contains("No such file"),
        "{err}"
    );
    assert!(!log.contains("pw-not-for-logs"), "{log}");
}
