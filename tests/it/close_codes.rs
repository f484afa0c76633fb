//! Each close code of PROTOCOL.md §9 is produced by the behaviour that
//! should produce it, and a bystander connection is untouched by it.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::Message;
use wsgateway::auth::unix_now;
use wsgateway::config::{Origins, Secs};

/// A kitchen client of tenant 1, branch 5 that must keep receiving.
async fn bystander(gw: &TestGateway) -> Client {
    gw.join("kitchen", &staff(900, 1, &[5], &["KITCHEN"]))
        .await
        .0
}

async fn assert_still_served(gw: &TestGateway, by: &mut Client) {
    let id = gw
        .publish_one("channel:branch:5:kitchen", event("ROUND_IN_KITCHEN", 1, 5))
        .await;
    let got = by.next_json().await.expect("the bystander still receives");
    assert_eq!(got["event_id"], id.as_str());
}

#[tokio::test]
async fn bad_tokens_close_4001() {
    let gw = TestGateway::start().await;
    let mut by = bystander(&gw).await;
    let exp_past = unix_now() - 60;
    let cases = [
        ("waiter", String::new()),
        ("waiter", "not-a-jwt".into()),
        (
            "waiter",
            staff_token_exp(json!(7), 1, &[5], &["WAITER"], exp_past),
        ),
        ("admin", diner(1, 5, 1, 77)),
        ("diner", staff(7, 1, &[5], &["WAITER"])),
        ("diner", String::new()),
        ("kitchen", "x".repeat(9000)),
    ];
    for (endpoint, token) in cases {
        let mut c = gw.connect(endpoint, &token).await;
        assert_eq!(
            c.close_code().await,
            Some(4001),
            "{endpoint} {}",
            &token[..token.len().min(20)]
        );
    }
    // No token parameter at all.
    let mut c = Client::open(&format!("ws://{}/ws/waiter", gw.addr), None).await;
    assert_eq!(c.close_code().await, Some(4001));
    gw.assert_metric(r#"connections_rejected_total{reason="auth"}"#, 8.0)
        .await;
    assert_still_served(&gw, &mut by).await;
    gw.stop().await;
}

#[tokio::test]
async fn roles_and_origins_close_4003() {
    let gw = TestGateway::start_with(|c| {
        c.allowed_origins = Some(Origins(vec!["https://app.example".into()]))
    })
    .await;
    let mut by = bystander(&gw).await;
    for (endpoint, roles) in [
        ("admin", vec!["WAITER", "KITCHEN"]),
        ("kitchen", vec!["WAITER"]),
        ("waiter", vec!["KITCHEN"]),
        ("waiter", vec![]),
        ("waiter", vec!["waiter", "SUPERUSER"]),
    ] {
        let mut c = gw.connect(endpoint, &staff(7, 1, &[5], &roles)).await;
        assert_eq!(c.close_code().await, Some(4003), "{endpoint} {roles:?}");
    }
    let waiter = staff(8, 1, &[5], &["WAITER"]);
    let mut c = gw
        .connect_with("waiter", &waiter, Some("https://evil.example"))
        .await;
    assert_eq!(c.close_code().await, Some(4003));
    // An allowed origin, and no origin at all (not a browser), both pass.
    let mut ok = gw
        .connect_with("waiter", &waiter, Some("https://app.example"))
        .await;
    assert_eq!(ok.next_json().await.unwrap()["type"], "connected");
    let mut ok = gw.connect_with("waiter", &waiter, None).await;
    assert_eq!(ok.next_json().await.unwrap()["type"], "connected");
    // The origin is checked first: a bad origin with a bad token is 4003.
    let mut c = gw
        .connect_with("admin", "garbage", Some("https://evil.example"))
        .await;
    assert_eq!(c.close_code().await, Some(4003));
    // Diners are exempt from the origin check.
    let mut d = Client::open(
        &format!(
            "ws://{}/ws/diner?table_token={}",
            gw.addr,
            diner(1, 5, 1, 77)
        ),
        Some("https://evil.example"),
    )
    .await;
    assert_eq!(d.next_json().await.unwrap()["type"], "connected");
    gw.assert_metric(r#"connections_rejected_total{reason="forbidden"}"#, 5.0)
        .await;
    gw.assert_metric(r#"connections_rejected_total{reason="origin"}"#, 2.0)
        .await;
    assert_still_served(&gw, &mut by).await;
    gw.stop().await;
}

#[tokio::test]
async fn capacity_closes_1013_and_user_limit_4008() {
    let gw = TestGateway::start_with(|c| {
        c.max_connections = 5;
        c.max_connections_per_user = 3;
    })
    .await;
    let mut by = bystander(&gw).await;
    let all_roles = staff(7, 1, &[5], &["ADMIN", "KITCHEN", "WAITER"]);
    let mut held = Vec::new();
    // Three connections of one user across the three staff endpoints.
    for endpoint in ["waiter", "kitchen", "admin"] {
        held.push(gw.join(endpoint, &all_roles).await.0);
    }
    let mut fourth = gw.connect("waiter", &all_roles).await;
    assert_eq!(fourth.close_code().await, Some(4008));
    // The same user id in another tenant is another user.
    held.push(gw.join("waiter", &staff(7, 2, &[5], &["WAITER"])).await.0);
    // Now at 5 of 5: anyone else gets 1013, and capacity is checked before
    // the per-user limit, but after the token.
    let mut other = gw.connect("diner", &diner(1, 5, 1, 77)).await;
    assert_eq!(other.close_code().await, Some(1013));
    let mut same_user = gw.connect("waiter", &all_roles).await;
    assert_eq!(same_user.close_code().await, Some(1013));
    let mut bad = gw.connect("waiter", "garbage").await;
    assert_eq!(bad.close_code().await, Some(4001));
    // Closing one frees a place.
    drop(held.pop());
    gw.wait_metric("wsgateway_connections_total", |open| open < 5.0)
        .await;
    let (_again, hello) = gw.join("diner", &diner(1, 5, 1, 77)).await;
    assert_eq!(hello["endpoint"], "diner");
    gw.assert_metric(r#"connections_rejected_total{reason="max_per_user"}"#, 1.0)
        .await;
    gw.assert_metric(r#"connections_rejected_total{reason="max_total"}"#, 2.0)
        .await;
    assert_still_served(&gw, &mut by).await;
    gw.stop().await;
}

#[tokio::test]
async fn table_sessions_close_4008_beyond_their_limit() {
    let gw = TestGateway::start_with(|c| {
        c.max_connections = 6;
        c.max_connections_per_session = 2;
    })
    .await;
    let mut by = bystander(&gw).await;
    let table = diner(1, 5, 3, 77);
    let mut seated = Vec::new();
    for _ in 0..2 {
        seated.push(gw.join("diner", &table).await.0);
    }
    let mut third = gw.connect("diner", &table).await;
    assert_eq!(third.close_code().await, Some(4008));
    // Another token of the same session counts against the same limit;
    // the same session id in another branch or tenant is another session.
    let mut other_table = gw.connect("diner", &diner(1, 5, 4, 77)).await;
    assert_eq!(other_table.close_code().await, Some(4008));
    seated.push(gw.join("diner", &diner(1, 6, 3, 77)).await.0);
    seated.push(gw.join("diner", &diner(2, 5, 3, 77)).await.0);
    // The session's diners are still served.
    let session_event =
        json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "session_id": 77});
    let id = gw.publish_one("channel:session:77", session_event).await;
    for d in &mut seated[..2] {
        assert_eq!(
            d.next_json().await.expect("the event")["event_id"],
            id.as_str()
        );
    }
    // Order of the checks (PROTOCOL.md §2): the token before the limit...
    let expired = diner_exp(1, 5, 3, 77, unix_now() - 60);
    let mut late = gw.connect("diner", &expired).await;
    assert_eq!(late.close_code().await, Some(4001));
    // ...and the total capacity before it (6 of 6 now, bystander included).
    seated.push(gw.join("diner", &diner(1, 5, 9, 78)).await.0);
    let mut full = gw.connect("diner", &table).await;
    assert_eq!(full.close_code().await, Some(1013));
    gw.assert_metric(
        r#"connections_rejected_total{reason="max_per_session"}"#,
        2.0,
    )
    .await;
    gw.assert_metric(r#"connections_rejected_total{reason="max_total"}"#, 1.0)
        .await;
    // A diner leaving frees a seat.
    drop(seated.remove(0));
    drop(seated.pop());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let mut again = gw.connect("diner", &table).await;
        match again.next_json().await {
            Some(hello) if hello["type"] == "connected" => break,
            _ => assert!(std::time::Instant::now() < deadline, "no seat freed"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_still_served(&gw, &mut by).await;
    gw.stop().await;
}

#[tokio::test]
async fn oversized_messages_close_1009_at_the_exact_limit() {
    let gw = TestGateway::start().await;
    let mut by = bystander(&gw).await;
    let token = staff(7, 1, &[5], &["WAITER"]);
    let (mut c, _) = gw.join("waiter", &token).await;
    // 65 536 bytes pass (it is not JSON, so the answer is an error reply).
    let reply = c.ask(&"a".repeat(65_536)).await;
    assert_eq!(reply, json!({"type": "error", "code": "invalid_json"}));
    c.send_text(&"a".repeat(65_537)).await;
    assert_eq!(c.close_code().await, Some(1009));
    // A fragmented message is judged whole: 3 × 30 000 bytes.
    let (mut c, _) = gw.join("waiter", &token).await;
    let part = "b".repeat(30_000);
    use tokio_tungstenite::tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let frames = [
        Frame::message(part.clone(), OpCode::Data(Data::Text), false),
        Frame::message(part.clone(), OpCode::Data(Data::Continue), false),
        Frame::message(part, OpCode::Data(Data::Continue), true),
    ];
    for f in frames {
        let _ = c.try_send(Message::Frame(f)).await;
    }
    assert_eq!(c.close_code().await, Some(1009));
    gw.assert_metric(r#"disconnects_total{reason="too_large"}"#, 2.0)
        .await;
    assert_still_served(&gw, &mut by).await;
    gw.stop().await;
}

#[tokio::test]
async fn binary_frames_close_1003() {
    let gw = TestGateway::start().await;
    let mut by = bystander(&gw).await;
    let (mut c, _) = gw.join("diner", &diner(1, 5, 1, 77)).await;
    c.try_send(Message::binary(vec![1u8, 2, 3])).await;
    assert_eq!(c.close_code().await, Some(1003));
    assert_still_served(&gw, &mut by).await;
    gw.stop().await;
}

#[tokio::test]
async fn floods_close_4029_after_the_burst() {
    let gw = TestGateway::start().await;
    let mut by = bystander(&gw).await;
    let (mut c, _) = gw.join("waiter", &staff(7, 1, &[5], &["WAITER"])).await;
    for _ in 0..25 {
        if !c.try_send(Message::text(r#"{"type":"ping"}"#)).await {
            break;
        }
    }
    let (replies, code) = c.until_close().await;
    assert_eq!(code, Some(4029));
    assert_eq!(replies.len(), 20, "the full burst is answered: {replies:?}");
    assert!(replies.iter().all(|r| r["type"] == "pong"));
    gw.assert_metric(r#"connections_rejected_total{reason="rate_limit"}"#, 1.0)
        .await;
    assert_still_served(&gw, &mut by).await;
    gw.stop().await;
}

#[tokio::test]
async fn silence_closes_1001_and_any_frame_is_a_heartbeat() {
    let gw = TestGateway::start_with(|c| {
        c.heartbeat_timeout_s = Secs(Duration::from_millis(1200));
        c.cleanup_interval_s = Secs(Duration::from_millis(200));
    })
    .await;
    let (mut silent, _) = gw.join("waiter", &staff(7, 1, &[5], &["WAITER"])).await;
    let (mut pinger, _) = gw.join("waiter", &staff(8, 1, &[5], &["WAITER"])).await;
    let (mut proto, _) = gw.join("diner", &diner(1, 5, 1, 77)).await;
    let keep_alive = async {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            pinger.send_text(r#"{"type":"ping"}"#).await;
            proto.try_send(Message::Ping(vec![1].into())).await;
        }
    };
    let (code, ()) = tokio::join!(silent.close_code_within(Duration::from_secs(4)), keep_alive);
    assert_eq!(code, Some(1001));
    // Three seconds on, the two that kept talking are still open.
    let mut pongs = 0;
    while let Some(v) = pinger.next_json_within(Duration::from_millis(200)).await {
        assert_eq!(v["type"], "pong");
        pongs += 1;
    }
    assert_eq!(pongs, 10);
    let id = gw
        .publish_one(
            "channel:session:77",
            json!({"type": "TABLE_CLEARED", "tenant_id": 1, "branch_id": 5}),
        )
        .await;
    assert_eq!(proto.next_json().await.unwrap()["event_id"], id.as_str());
    gw.assert_metric(r#"disconnects_total{reason="heartbeat"}"#, 1.0)
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn expired_tokens_close_4001_on_revalidation() {
    let gw = TestGateway::start_with(|c| {
        c.jwt_leeway_s = 0;
        c.jwt_revalidate_s = Secs(Duration::from_millis(300));
    })
    .await;
    let short = staff_token_exp(json!(7), 1, &[5], &["WAITER"], unix_now() + 2);
    let (mut c, _) = gw.join("waiter", &short).await;
    let (mut long, _) = gw.join("waiter", &staff(8, 1, &[5], &["WAITER"])).await;
    assert_eq!(
        c.close_code_within(Duration::from_secs(6)).await,
        Some(4001)
    );
    assert_eq!(long.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    gw.stop().await;
}

#[tokio::test]
async fn expired_table_tokens_close_4001_at_connect_and_on_revalidation() {
    let gw = TestGateway::start_with(|c| {
        c.jwt_leeway_s = 0;
        c.jwt_revalidate_s = Secs(Duration::from_millis(300));
        c.cleanup_interval_s = Secs(Duration::from_millis(300));
    })
    .await;
    let mut by = bystander(&gw).await;
    let mut refused = gw
        .connect("diner", &diner_exp(1, 5, 3, 77, unix_now() - 60))
        .await;
    assert_eq!(refused.close_code().await, Some(4001));
    let (mut short, _) = gw
        .join("diner", &diner_exp(1, 5, 3, 77, unix_now() + 2))
        .await;
    let (mut long, _) = gw.join("diner", &diner(1, 5, 3, 77)).await;
    assert_eq!(
        short.close_code_within(Duration::from_secs(6)).await,
        Some(4001)
    );
    assert_eq!(long.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    gw.assert_metric(r#"connections_rejected_total{reason="auth"}"#, 1.0)
        .await;
    assert_still_served(&gw, &mut by).await;
    gw.stop().await;
}

/// `WSGATEWAY_JWT_ISSUER` and `WSGATEWAY_JWT_AUDIENCE`: a staff token of
/// another issuer or audience gets 4001 (an auth rejection); the right
/// one, with `aud` as a string or an array, is admitted; table tokens are
/// not bound.
#[tokio::test]
async fn issuer_and_audience_bind_staff_tokens_4001() {
    let gw = TestGateway::start_with(|c| {
        c.jwt_issuer = Some("https://auth.example".into());
        c.jwt_audience = Some("wsgateway".into());
    })
    .await;
    let token = |extra: serde_json::Value| {
        let mut claims = json!({"sub": 7, "tenant_id": 1, "branch_ids": [5],
            "roles": ["KITCHEN"], "exp": unix_now() + 3600});
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        wsgateway::auth::mint(JWT_SECRET, &claims)
    };
    let iss = "https://auth.example";
    let by_token = token(json!({"sub": 900, "iss": iss, "aud": "wsgateway"}));
    let mut by = gw.join("kitchen", &by_token).await.0;
    let cases = [
        (json!({}), Some(4001)),
        (json!({"aud": "wsgateway"}), Some(4001)),
        (
            json!({"iss": "https://other.example", "aud": "wsgateway"}),
            Some(4001),
        ),
        (json!({"iss": iss}), Some(4001)),
        (json!({"iss": iss, "aud": "another-service"}), Some(4001)),
        (json!({"iss": iss, "aud": ["a", "b"]}), Some(4001)),
        (
            json!({"iss": iss, "aud": ["another-service", "wsgateway"]}),
            None,
        ),
        (json!({"iss": iss, "aud": "wsgateway"}), None),
    ];
    let mut admitted = Vec::new();
    for (extra, answer) in cases {
        let mut c = gw.connect("kitchen", &token(extra.clone())).await;
        match answer {
            Some(code) => assert_eq!(c.close_code().await, Some(code), "{extra}"),
            None => {
                assert_eq!(c.next_json().await.unwrap()["type"], "connected", "{extra}");
                admitted.push(c);
            }
        }
    }
    // Table tokens carry neither claim and are unaffected.
    let (_diner, _) = gw.join("diner", &diner(1, 5, 1, 77)).await;
    gw.assert_metric(r#"connections_rejected_total{reason="auth"}"#, 6.0)
        .await;
    assert_still_served(&gw, &mut by).await;
    for c in &mut admitted {
        assert_eq!(
            c.next_json().await.unwrap()["type"],
            "ROUND_IN_KITCHEN",
            "admitted clients are served too"
        );
    }
    gw.stop().await;
}
