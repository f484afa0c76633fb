//! Token revocation through a Redis set of `{tenant_id}:{jti}` members
//! (`WSGATEWAY_REVOKED_JTI_KEY`): refused at connect, closed at the next
//! re-validation, and never across tenants.

use crate::common;

use std::time::Duration;

use common::redis_server::RedisServer;
use common::*;
use serde_json::json;
use wsgateway::auth::{mint, unix_now};
use wsgateway::config::{Secret, Secs};

fn token(sub: i64, jti: Option<&str>) -> String {
    tenant_token(1, sub, jti)
}

fn tenant_token(tenant: i64, sub: i64, jti: Option<&str>) -> String {
    let mut claims = json!({"sub": sub, "tenant_id": tenant, "branch_ids": [5], "roles": ["WAITER"], "exp": unix_now() + 3600});
    if let Some(jti) = jti {
        claims["jti"] = json!(jti);
    }
    mint(JWT_SECRET, &claims)
}

/// Adds `member` (`{tenant_id}:{jti}`) to the revoked set.
fn sadd(server: &RedisServer, member: &str) {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let _: i64 = redis::cmd("SADD")
        .arg("revoked:jti")
        .arg(member)
        .query(&mut conn)
        .unwrap();
}

#[tokio::test]
async fn revoked_tokens_are_refused_and_closed_on_revalidation() {
    let mut server = RedisServer::start();
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.revoked_jti_key = Some("revoked:jti".into());
        c.jwt_revalidate_s = Secs(Duration::from_millis(300));
        c.redis_timeout_s = Secs(Duration::from_millis(300));
    })
    .await;
    gw.wait_connected().await;
    sadd(&server, "1:jti-revoked");
    let mut refused = gw.connect("waiter", &token(1, Some("jti-revoked"))).await;
    assert_eq!(refused.close_code().await, Some(4001));

    let (mut kept, _) = gw.join("waiter", &token(2, Some("jti-kept"))).await;
    let (mut later, _) = gw.join("waiter", &token(3, Some("jti-later"))).await;
    let (mut no_jti, _) = gw.join("waiter", &token(4, None)).await;
    sadd(&server, "1:jti-later");
    assert_eq!(
        later.close_code_within(Duration::from_secs(3)).await,
        Some(4001)
    );
    assert_eq!(kept.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    assert_eq!(no_jti.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    gw.assert_metric(r#"disconnects_total{reason="token_invalid"}"#, 1.0)
        .await;
    assert!(
        gw.metric(r#"wsgateway_revocation_checks_total{outcome="revoked"}"#)
            .await
            >= 2.0
    );

    // Without Redis, tokens are accepted (fail open) and the failure counted.
    server.kill();
    let (mut during, _) = gw
        .join("waiter", &token(5, Some("jti-during-outage")))
        .await;
    assert_eq!(during.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    assert!(
        gw.metric(r#"wsgateway_revocation_checks_total{outcome="error"}"#)
            .await
            >= 1.0
    );
    gw.stop().await;
}

/// Two tenants' issuers both used `jti` "shared": revoking tenant 2's
/// token refuses and closes only tenant 2's connections; a bare `jti`
/// (no tenant) revokes nothing.
#[tokio::test]
async fn revocation_is_scoped_by_tenant() {
    let server = RedisServer::start();
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.revoked_jti_key = Some("revoked:jti".into());
        c.jwt_revalidate_s = Secs(Duration::from_millis(300));
    })
    .await;
    gw.wait_connected().await;
    sadd(&server, "shared");
    let (mut one, _) = gw.join("waiter", &tenant_token(1, 1, Some("shared"))).await;
    let (mut two, _) = gw.join("waiter", &tenant_token(2, 1, Some("shared"))).await;

    sadd(&server, "2:shared");
    assert_eq!(
        two.close_code_within(Duration::from_secs(3)).await,
        Some(4001),
        "tenant 2's open connection is closed at re-validation"
    );
    let mut refused = gw
        .connect("waiter", &tenant_token(2, 2, Some("shared")))
        .await;
    assert_eq!(refused.close_code().await, Some(4001));
    // Several passes later tenant 1's connection is still open, and a new
    // one with the same jti is admitted.
    let passes = |v: f64| v >= 4.0;
    gw.wait_metric(
        r#"wsgateway_revocation_checks_total{outcome="valid"}"#,
        passes,
    )
    .await;
    assert_eq!(one.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    let (mut again, _) = gw.join("waiter", &tenant_token(1, 2, Some("shared"))).await;
    assert_eq!(again.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    gw.assert_metric(r#"disconnects_total{reason="token_invalid"}"#, 1.0)
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_revocation_key_without_redis_stops_startup() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgateway"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("JWT_SECRET", "s")
        .env("TABLE_TOKEN_SECRET", "t")
        .env("WSGATEWAY_REVOKED_JTI_KEY", "revoked")
        .env_remove("REDIS_URL")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("REDIS_URL") && err.contains("WSGATEWAY_REVOKED_JTI_KEY"),
        "{err}"
    );
}
