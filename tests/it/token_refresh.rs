//! In-band token refresh (`refresh_token`, PROTOCOL.md §7): an accepted
//! token is what the connection lives by from then on (expiry, `jti`,
//! branches); a rejected one changes nothing.

use crate::common;

use std::time::Duration;

use common::proxy::Proxy;
use common::redis_server::RedisServer;
use common::*;
use serde_json::{Value, json};
use wsgateway::auth::{mint, unix_now};
use wsgateway::config::{Secret, Secs};

/// Tokens are re-validated every 200 ms without leeway, so that expiry
/// shows within a test.
async fn gateway() -> TestGateway {
    TestGateway::start_with(short_expiry).await
}

fn short_expiry(c: &mut wsgateway::Config) {
    c.jwt_leeway_s = 0;
    c.jwt_revalidate_s = Secs(Duration::from_millis(200));
}

fn staff_claims(sub: i64, tenant: i64, branches: &[i64], roles: &[&str], exp: u64) -> Value {
    json!({"sub": sub, "tenant_id": tenant, "branch_ids": branches, "roles": roles, "exp": exp})
}

fn waiter_token(exp: u64) -> String {
    mint(JWT_SECRET, &staff_claims(7, 1, &[5], &["WAITER"], exp))
}

fn with_jti(jti: &str, exp: u64) -> String {
    let mut claims = staff_claims(7, 1, &[5], &["WAITER"], exp);
    claims["jti"] = json!(jti);
    mint(JWT_SECRET, &claims)
}

fn refresh_message(token: &str) -> String {
    json!({"type": "refresh_token", "token": token}).to_string()
}

/// Sends `refresh_token` and returns the answer.
async fn refresh(client: &mut Client, token: &str) -> Value {
    client.ask(&refresh_message(token)).await
}

fn rejected() -> Value {
    json!({"type": "error", "code": "token_rejected"})
}

/// Publishes an event on `channel` and expects `client` to get it next.
async fn gets_event(gw: &TestGateway, client: &mut Client, channel: &str, event: Value) {
    let id = gw.publish_one(channel, event).await;
    let got = client.next_json().await.expect("the event");
    assert_eq!(got["event_id"], id, "{got}");
}

/// After a rejected refresh: the connection answers, still gets its
/// events, and is closed with 4001 when its first token (expiring at
/// `exp`) expires, not later.
async fn unchanged(gw: &TestGateway, client: &mut Client, channel: &str, event: Value, exp: u64) {
    assert_eq!(client.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    gets_event(gw, client, channel, event).await;
    assert_eq!(
        client.close_code_within(Duration::from_secs(10)).await,
        Some(4001)
    );
    let now = unix_now();
    assert!(
        now <= exp + 2,
        "closed at {now}, its token expired at {exp}"
    );
}

/// [`unchanged`] for a waiter of branch 5, after `rejections` refused
/// refreshes in all.
async fn waiter_unchanged(gw: &TestGateway, waiter: &mut Client, exp: u64, rejections: f64) {
    let branch_event = event("ROUND_READY", 1, 5);
    unchanged(gw, waiter, "channel:branch:5:waiters", branch_event, exp).await;
    gw.assert_metric(r#"token_refreshes_total{outcome="rejected"}"#, rejections)
        .await;
}

/// A staff connection whose token expires in a few seconds, rejected a
/// refresh with `token`: nothing changed.
async fn waiter_rejects(token_for: impl FnOnce(u64) -> String) {
    let gw = gateway().await;
    let exp = unix_now() + 4;
    let (mut waiter, _) = gw.join("waiter", &waiter_token(exp)).await;
    assert_eq!(
        refresh(&mut waiter, &token_for(exp + 3600)).await,
        rejected()
    );
    waiter_unchanged(&gw, &mut waiter, exp, 1.0).await;
    gw.assert_metric(r#"token_refreshes_total{outcome="accepted"}"#, 0.0)
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn an_accepted_token_is_answered_with_its_expiry() {
    let gw = gateway().await;
    let (mut waiter, _) = gw.join("waiter", &waiter_token(unix_now() + 60)).await;
    let exp = unix_now() + 7200;
    assert_eq!(
        refresh(&mut waiter, &waiter_token(exp)).await,
        json!({"type": "token_refreshed", "expires_at": exp})
    );
    gets_event(
        &gw,
        &mut waiter,
        "channel:branch:5:waiters",
        event("ROUND_READY", 1, 5),
    )
    .await;
    gw.assert_metric(r#"token_refreshes_total{outcome="accepted"}"#, 1.0)
        .await;

    // A diner refreshes with a table token of the same table and session.
    let (mut diner_conn, _) = gw.join("diner", &diner(1, 5, 12, 77)).await;
    let exp = unix_now() + 5400;
    assert_eq!(
        refresh(&mut diner_conn, &diner_exp(1, 5, 12, 77, exp)).await,
        json!({"type": "token_refreshed", "expires_at": exp})
    );
    let session_event =
        json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "session_id": 77});
    gets_event(&gw, &mut diner_conn, "channel:session:77", session_event).await;
    gw.assert_metric(r#"token_refreshes_total{outcome="accepted"}"#, 2.0)
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_token_with_a_bad_signature_is_rejected() {
    waiter_rejects(|exp| {
        mint(
            "another-secret",
            &staff_claims(7, 1, &[5], &["WAITER"], exp),
        )
    })
    .await;
}

#[tokio::test]
async fn an_expired_token_is_rejected() {
    waiter_rejects(|_| waiter_token(unix_now() - 60)).await;
}

#[tokio::test]
async fn a_malformed_token_is_rejected() {
    waiter_rejects(|_| "not.a.jwt".to_owned()).await;
}

#[tokio::test]
async fn a_token_of_another_user_is_rejected() {
    waiter_rejects(|exp| mint(JWT_SECRET, &staff_claims(8, 1, &[5], &["WAITER"], exp))).await;
}

#[tokio::test]
async fn a_token_of_another_tenant_is_rejected() {
    waiter_rejects(|exp| mint(JWT_SECRET, &staff_claims(7, 2, &[5], &["WAITER"], exp))).await;
}

/// `/ws/waiter` allows WAITER, MANAGER and ADMIN: a KITCHEN-only token
/// (or one without roles) may not keep the connection.
#[tokio::test]
async fn a_token_whose_roles_no_longer_allow_the_endpoint_is_rejected() {
    waiter_rejects(|exp| mint(JWT_SECRET, &staff_claims(7, 1, &[5], &["KITCHEN"], exp))).await;
}

#[tokio::test]
async fn a_table_token_on_a_staff_endpoint_is_rejected() {
    waiter_rejects(|exp| diner_exp(1, 5, 12, 77, exp)).await;
}

/// A diner's new table token must name the same tenant, branch, session
/// and table; a staff token is no table token.
#[tokio::test]
async fn a_table_token_of_another_session_or_table_is_rejected() {
    let gw = gateway().await;
    let exp = unix_now() + 4;
    let (mut diner_conn, _) = gw.join("diner", &diner_exp(1, 5, 12, 77, exp)).await;
    let later = exp + 3600;
    for other in [
        diner_exp(1, 5, 12, 78, later),
        diner_exp(1, 5, 13, 77, later),
        diner_exp(1, 6, 12, 77, later),
        diner_exp(2, 5, 12, 77, later),
        waiter_token(later),
    ] {
        assert_eq!(refresh(&mut diner_conn, &other).await, rejected());
    }
    let session_event =
        json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "session_id": 77});
    unchanged(
        &gw,
        &mut diner_conn,
        "channel:session:77",
        session_event,
        exp,
    )
    .await;
    gw.assert_metric(r#"token_refreshes_total{outcome="rejected"}"#, 5.0)
        .await;
    gw.stop().await;
}

/// Two connections with tokens that expire in two seconds: the one that
/// refreshes outlives the other, and is closed when its last token
/// expires.
#[tokio::test]
async fn a_connection_lives_by_its_refreshed_tokens() {
    let gw = gateway().await;
    let first_exp = unix_now() + 2;
    let (mut refreshed, _) = gw.join("waiter", &waiter_token(first_exp)).await;
    let (mut twin, _) = gw.join("waiter", &waiter_token(first_exp)).await;
    let second_exp = first_exp + 3;
    assert_eq!(
        refresh(&mut refreshed, &waiter_token(second_exp)).await["expires_at"],
        second_exp
    );
    assert_eq!(
        twin.close_code_within(Duration::from_secs(10)).await,
        Some(4001)
    );
    assert!(unix_now() > first_exp);
    // The pass that closed the twin kept the refreshed connection.
    assert_eq!(refreshed.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    let last_exp = second_exp + 2;
    assert_eq!(
        refresh(&mut refreshed, &waiter_token(last_exp)).await["expires_at"],
        last_exp
    );
    assert_eq!(
        refreshed.close_code_within(Duration::from_secs(15)).await,
        Some(4001)
    );
    let now = unix_now();
    assert!(
        now > last_exp && now <= last_exp + 2,
        "closed at {now}; the last token expired at {last_exp}"
    );
    gw.assert_metric(r#"disconnects_total{reason="token_invalid"}"#, 2.0)
        .await;
    gw.stop().await;
}

/// Adds `member` (`{tenant_id}:{jti}`) to the revoked set.
fn sadd(server: &RedisServer, member: &str) {
    let _: i64 = server
        .query(redis::cmd("SADD").arg("revoked:jti").arg(member))
        .unwrap();
}

async fn revocation_gateway(server: &RedisServer) -> TestGateway {
    let gw = TestGateway::start_with(|c| {
        short_expiry(c);
        c.redis_url = Some(Secret(server.url()));
        c.revoked_jti_key = Some("revoked:jti".into());
        c.redis_timeout_s = Secs(Duration::from_millis(300));
    })
    .await;
    gw.wait_connected().await;
    gw
}

/// A counter that may not have a sample yet (0 then).
async fn count(gw: &TestGateway, sample: &str) -> f64 {
    metric_value(&gw.metrics().await, sample).unwrap_or(0.0)
}

const VALID: &str = r#"wsgateway_revocation_checks_total{outcome="valid"}"#;

/// After a refresh the revocation pass checks the new `jti`: revoking the
/// old one closes nothing, revoking the new one closes the connection.
#[tokio::test]
async fn revocation_follows_the_refreshed_jti() {
    let server = RedisServer::start();
    let gw = revocation_gateway(&server).await;
    let exp = unix_now() + 3600;
    let (mut waiter, _) = gw.join("waiter", &with_jti("jti-old", exp)).await;
    assert_eq!(
        refresh(&mut waiter, &with_jti("jti-new", exp)).await["type"],
        "token_refreshed"
    );
    sadd(&server, "1:jti-old");
    // Two passes after the old jti was revoked, the connection is open.
    let before = count(&gw, VALID).await;
    gw.wait_metric(VALID, |v| v >= before + 2.0).await;
    assert_eq!(waiter.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    sadd(&server, "1:jti-new");
    assert_eq!(
        waiter.close_code_within(Duration::from_secs(5)).await,
        Some(4001)
    );
    gw.assert_metric(r#"disconnects_total{reason="token_invalid"}"#, 1.0)
        .await;
    gw.stop().await;
}

/// A refreshed token whose `jti` is revoked is rejected and changes
/// nothing.
#[tokio::test]
async fn a_revoked_token_is_rejected() {
    let server = RedisServer::start();
    let gw = revocation_gateway(&server).await;
    sadd(&server, "1:jti-revoked");
    let exp = unix_now() + 4;
    let (mut waiter, _) = gw.join("waiter", &with_jti("jti-first", exp)).await;
    let revoked_before = count(
        &gw,
        r#"wsgateway_revocation_checks_total{outcome="revoked"}"#,
    )
    .await;
    assert_eq!(
        refresh(&mut waiter, &with_jti("jti-revoked", exp + 3600)).await,
        rejected()
    );
    gw.assert_metric(
        r#"revocation_checks_total{outcome="revoked"}"#,
        revoked_before + 1.0,
    )
    .await;
    waiter_unchanged(&gw, &mut waiter, exp, 1.0).await;
    gw.stop().await;
}

/// With Redis down, a refreshed token passes (fail open) and the failure
/// is counted, as at admission. Re-validation keeps its default period
/// here, so that only the refresh asks Redis.
#[tokio::test]
async fn a_refresh_while_redis_fails_is_accepted_and_counted() {
    let mut server = RedisServer::start();
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.revoked_jti_key = Some("revoked:jti".into());
        c.redis_timeout_s = Secs(Duration::from_millis(300));
    })
    .await;
    gw.wait_connected().await;
    let (mut other, _) = gw
        .join("waiter", &with_jti("jti-second", unix_now() + 3600))
        .await;
    server.kill();
    let errors_before = count(&gw, r#"wsgateway_revocation_checks_total{outcome="error"}"#).await;
    let exp = unix_now() + 7200;
    assert_eq!(
        refresh(&mut other, &with_jti("jti-during-outage", exp)).await,
        json!({"type": "token_refreshed", "expires_at": exp})
    );
    gw.assert_metric(
        r#"revocation_checks_total{outcome="error"}"#,
        errors_before + 1.0,
    )
    .await;
    gw.assert_metric(r#"token_refreshes_total{outcome="accepted"}"#, 1.0)
        .await;
    assert_eq!(other.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    gw.stop().await;
}

/// How long the revocation check of a refresh waits on a Redis that does
/// not answer (`WSGATEWAY_REDIS_TIMEOUT_S`): far longer than the refusals
/// below take to come back, even on a loaded machine.
const STALL: Duration = Duration::from_secs(3);

fn in_progress() -> Value {
    json!({"type": "error", "code": "refresh_in_progress"})
}

/// While a refresh waits on a Redis that does not answer (its path
/// black-holed), nothing queues behind it: each `refresh_token` sent
/// meanwhile is answered at once with `refresh_in_progress`, before the
/// first's answer, and changes nothing. The first is answered when its
/// check gives up on Redis (fail open); once Redis answers again, the
/// connection refreshes as before.
#[tokio::test]
async fn a_refresh_sent_while_one_is_checked_is_refused_at_once() {
    let server = RedisServer::start();
    let proxy = Proxy::start(server.port);
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(proxy.url()));
        c.revoked_jti_key = Some("revoked:jti".into());
        c.redis_timeout_s = Secs(STALL);
    })
    .await;
    gw.wait_connected().await;
    // Its admission checked the jti: the revocation link goes through the
    // proxy, and so does every check after it.
    let (mut waiter, _) = gw
        .join("waiter", &with_jti("jti-first", unix_now() + 3600))
        .await;
    const ERRORS: &str = r#"wsgateway_revocation_checks_total{outcome="error"}"#;
    let errors_before = count(&gw, ERRORS).await;

    proxy.blackhole();
    let stalled_exp = unix_now() + 7200;
    let first = refresh_message(&with_jti("jti-stalled", stalled_exp));
    waiter.send_text(&first).await;
    const REFUSED: usize = 5;
    for n in 0..REFUSED {
        let token = with_jti(&format!("jti-refused-{n}"), stalled_exp + 60);
        waiter.send_text(&refresh_message(&token)).await;
    }
    waiter.send_text(r#"{"type":"ping"}"#).await;
    // The first cannot be answered before Redis's timeout: whatever comes
    // before it came while it was being checked.
    for n in 0..REFUSED {
        let got = waiter.next_json().await.expect("an answer");
        assert_eq!(got, in_progress(), "answer {n}");
    }
    assert_eq!(waiter.next_json().await.expect("a pong")["type"], "pong");
    gw.assert_metric(r#"token_refreshes_total{outcome="busy"}"#, REFUSED as f64)
        .await;
    gw.assert_metric(r#"token_refreshes_total{outcome="accepted"}"#, 0.0)
        .await;

    // Fail open, as at admission: the first is accepted, and only it.
    let answer = waiter
        .next_json_within(STALL + WAIT)
        .await
        .expect("the first refresh's answer");
    assert_eq!(
        answer,
        json!({"type": "token_refreshed", "expires_at": stalled_exp})
    );
    gw.assert_metric(ERRORS, errors_before + 1.0).await;
    gw.assert_metric(r#"token_refreshes_total{outcome="accepted"}"#, 1.0)
        .await;

    // Redis answers again: the next refreshes are checked against it, one
    // after the other's answer.
    proxy.heal();
    sadd(&server, "1:jti-revoked");
    assert_eq!(
        refresh(&mut waiter, &with_jti("jti-revoked", stalled_exp + 60)).await,
        rejected()
    );
    let later_exp = stalled_exp + 3600;
    assert_eq!(
        refresh(&mut waiter, &with_jti("jti-after", later_exp)).await,
        json!({"type": "token_refreshed", "expires_at": later_exp})
    );
    assert_eq!(waiter.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    gw.assert_metric(ERRORS, errors_before + 1.0).await;
    gw.assert_metric(r#"token_refreshes_total{outcome="busy"}"#, REFUSED as f64)
        .await;
    gw.assert_metric(r#"token_refreshes_total{outcome="rejected"}"#, 1.0)
        .await;
    gw.assert_metric(r#"token_refreshes_total{outcome="accepted"}"#, 2.0)
        .await;
    gw.stop().await;
}

/// A staff connection is re-indexed under its new token's branches: it
/// gets the events of a branch it joins and stops getting those of a
/// branch it leaves.
#[tokio::test]
async fn branches_follow_the_refreshed_token() {
    let gw = gateway().await;
    let token = |branches: &[i64]| {
        mint(
            JWT_SECRET,
            &staff_claims(7, 1, branches, &["WAITER"], unix_now() + 3600),
        )
    };
    let (mut waiter, _) = gw.join("waiter", &token(&[5])).await;
    let (mut admin, _) = gw.join("admin", &staff(9, 1, &[5], &["ADMIN"])).await;
    assert_eq!(
        refresh(&mut waiter, &token(&[5, 6])).await["type"],
        "token_refreshed"
    );
    gets_event(
        &gw,
        &mut waiter,
        "channel:branch:6:waiters",
        event("ROUND_READY", 1, 6),
    )
    .await;
    gets_event(
        &gw,
        &mut waiter,
        "channel:branch:5:waiters",
        event("ROUND_READY", 1, 5),
    )
    .await;

    assert_eq!(
        refresh(&mut waiter, &token(&[6])).await["type"],
        "token_refreshed"
    );
    // Published in this order: the branch 5 event would come first. The
    // admin of branch 5 gets it (and the one before), so it was dispatched.
    gw.publish_one("channel:branch:5:waiters", event("ROUND_SERVED", 1, 5))
        .await;
    for kind in ["ROUND_READY", "ROUND_SERVED"] {
        let admin_got = admin.next_json().await.expect("a branch 5 event");
        assert_eq!(admin_got["type"], kind, "{admin_got}");
    }
    gets_event(
        &gw,
        &mut waiter,
        "channel:branch:6:waiters",
        event("ROUND_READY", 1, 6),
    )
    .await;

    // An admin connection too, for its own channels.
    let admin_token = |branches: &[i64]| {
        mint(
            JWT_SECRET,
            &staff_claims(9, 1, branches, &["ADMIN"], unix_now() + 3600),
        )
    };
    assert_eq!(
        refresh(&mut admin, &admin_token(&[6])).await["type"],
        "token_refreshed"
    );
    gw.publish_one("channel:branch:5:admin", event("ENTITY_UPDATED", 1, 5))
        .await;
    gets_event(
        &gw,
        &mut admin,
        "channel:branch:6:admin",
        event("ENTITY_UPDATED", 1, 6),
    )
    .await;
    gw.assert_metric(r#"token_refreshes_total{outcome="accepted"}"#, 3.0)
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_refresh_without_a_string_token_is_an_invalid_message() {
    let gw = gateway().await;
    let (mut waiter, _) = gw.join("waiter", &waiter_token(unix_now() + 3600)).await;
    let invalid = json!({"type": "error", "code": "invalid_message"});
    for text in [
        r#"{"type":"refresh_token"}"#,
        r#"{"type":"refresh_token","token":42}"#,
        r#"{"type":"refresh_token","token":null}"#,
    ] {
        assert_eq!(waiter.ask(text).await, invalid, "{text}");
    }
    gw.assert_metric(r#"token_refreshes_total{outcome="rejected"}"#, 0.0)
        .await;
    gw.stop().await;
}

/// `refresh_token` counts against the message rate limit like any text
/// message.
#[tokio::test]
async fn refreshes_count_against_the_rate_limit() {
    let gw = TestGateway::start_with(|c| c.rate_limit_per_s = 2).await;
    let (mut waiter, _) = gw.join("waiter", &waiter_token(unix_now() + 3600)).await;
    let message = refresh_message(&waiter_token(unix_now() + 7200));
    for _ in 0..3 {
        waiter.send_text(&message).await;
    }
    let (frames, code) = waiter.until_close().await;
    assert_eq!(code, Some(4029));
    assert!(frames.len() <= 2, "{frames:?}");
    gw.stop().await;
}

/// A waiter's sectors follow its refreshed token: read for the branches it
/// adds (kept for the others), all of them once it has MANAGER or ADMIN,
/// and read again when it loses them; each change is told with
/// `sectors_updated`, right after `token_refreshed`.
#[tokio::test]
async fn a_waiters_sectors_follow_its_refreshed_branches_and_roles() {
    use common::postgres::{assign, connect, database_url, fresh_tenant};
    let db = connect().await;
    let t = fresh_tenant();
    assign(&db, t, 5, 1, &[10]).await;
    assign(&db, t, 6, 1, &[20]).await;
    let gw = TestGateway::start_with(|c| c.database_url = Some(Secret(database_url()))).await;
    let token = |branches: &[i64], roles: &[&str]| {
        mint(
            JWT_SECRET,
            &staff_claims(1, t, branches, roles, unix_now() + 3600),
        )
    };
    let (mut waiter, hello) = gw.join("waiter", &token(&[5], &["WAITER"])).await;
    assert_eq!(hello["sector_ids"], json!([10]));
    let sector_event = |sector: i64| json!({"type": "SERVICE_CALL_CREATED", "tenant_id": t, "branch_id": 6, "sector_id": sector});
    let sectors_updated = |ids: Value| json!({"type": "sectors_updated", "sector_ids": ids});

    assert_eq!(
        refresh(&mut waiter, &token(&[5, 6], &["WAITER"])).await["type"],
        "token_refreshed"
    );
    assert_eq!(
        waiter.next_json().await.unwrap(),
        sectors_updated(json!([10, 20]))
    );
    // Sector 21 of branch 6 is not its own: the sector 20 event comes first.
    gw.publish_one("channel:sector:6:21:waiters", sector_event(21))
        .await;
    gets_event(
        &gw,
        &mut waiter,
        "channel:sector:6:20:waiters",
        sector_event(20),
    )
    .await;

    assert_eq!(
        refresh(&mut waiter, &token(&[5, 6], &["WAITER", "ADMIN"])).await["type"],
        "token_refreshed"
    );
    assert_eq!(
        waiter.next_json().await.unwrap(),
        sectors_updated(Value::Null)
    );
    gets_event(
        &gw,
        &mut waiter,
        "channel:sector:6:21:waiters",
        sector_event(21),
    )
    .await;

    // Back to WAITER alone, in branch 6 only: filtered again.
    assert_eq!(
        refresh(&mut waiter, &token(&[6], &["WAITER"])).await["type"],
        "token_refreshed"
    );
    assert_eq!(
        waiter.next_json().await.unwrap(),
        sectors_updated(json!([20]))
    );
    gw.publish_one("channel:sector:6:21:waiters", sector_event(21))
        .await;
    gets_event(
        &gw,
        &mut waiter,
        "channel:sector:6:20:waiters",
        sector_event(20),
    )
    .await;

    // Same branches and roles: nothing to tell.
    assert_eq!(
        refresh(&mut waiter, &token(&[6], &["WAITER"])).await["type"],
        "token_refreshed"
    );
    assert_eq!(waiter.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    gw.stop().await;
}
