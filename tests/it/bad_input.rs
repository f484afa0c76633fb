//! The bad-input suite: malformed tokens, frames and HTTP requests, each
//! with its documented answer. After every input the gateway still serves,
//! and four bystanders (one per endpoint) have received every event
//! published meanwhile, exactly once and in order.

use crate::common;

use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use wsgateway::auth::unix_now;
use wsgateway::config::{JwtAlgorithm, Secs};

const PRIVATE: &[u8] = include_bytes!("../fixtures/rs256-private.pem");
const OTHER_PRIVATE: &[u8] = include_bytes!("../fixtures/rs256-other-private.pem");
const PUBLIC: &[u8] = include_bytes!("../fixtures/rs256-public.pem");
const MAX_PENDING: usize = 16;

fn rs256(claims: &Value) -> String {
    sign(
        Algorithm::RS256,
        claims,
        &EncodingKey::from_rsa_pem(PRIVATE).unwrap(),
    )
}

fn sign(alg: Algorithm, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn claims() -> Value {
    json!({"sub": 7, "tenant_id": 1, "branch_ids": [5], "roles": ["WAITER", "KITCHEN", "ADMIN"],
           "exp": unix_now() + 3600, "iat": unix_now()})
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

fn without(mut base: Value, key: &str) -> Value {
    base.as_object_mut().unwrap().remove(key);
    base
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, &c| (acc << 8) | c as u32) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The four bystanders and the count of inputs tried.
struct Watch {
    bystanders: Vec<Client>,
    published: usize,
    inputs: usize,
}

async fn start() -> (TestGateway, Watch) {
    let key_file =
        std::env::temp_dir().join(format!("wsgateway-bad-input-{}.pem", std::process::id()));
    std::fs::write(&key_file, PUBLIC).unwrap();
    let gw = TestGateway::start_with(|c| {
        c.jwt_algorithm = JwtAlgorithm::Rs256;
        c.jwt_public_key_file = Some(key_file);
        c.max_pending_connections = MAX_PENDING;
        c.handshake_timeout_s = Secs(Duration::from_millis(800));
    })
    .await;
    let mut bystanders = Vec::new();
    let by = with(claims(), "sub", json!(100));
    for (endpoint, token) in [
        ("waiter", rs256(&by)),
        ("kitchen", rs256(&with(by.clone(), "sub", json!(101)))),
        ("admin", rs256(&with(by.clone(), "sub", json!(102)))),
        ("diner", diner(1, 5, 1, 77)),
    ] {
        bystanders.push(gw.join(endpoint, &token).await.0);
    }
    (
        gw,
        Watch {
            bystanders,
            published: 0,
            inputs: 0,
        },
    )
}

impl Watch {
    /// One event that every bystander is in the audience of.
    async fn publish(&mut self, gw: &TestGateway) -> String {
        self.published += 1;
        let body = json!({
            "channels": ["channel:branch:5:waiters", "channel:branch:5:kitchen", "channel:session:77"],
            "event": {"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "session_id": 77,
                      "event_id": format!("by-{}", self.published)},
        });
        let (status, answer) = gw.publish(&body).await;
        assert_eq!(status, 202, "{answer}");
        format!("by-{}", self.published)
    }

    /// Records one bad input: an event is published before and after it,
    /// and every bystander must get both, in order, once.
    async fn input<F: std::future::Future<Output = ()>>(
        &mut self,
        gw: &TestGateway,
        what: &str,
        check: F,
    ) {
        let before = self.publish(gw).await;
        check.await;
        let after = self.publish(gw).await;
        for (i, by) in self.bystanders.iter_mut().enumerate() {
            for id in [&before, &after] {
                let got = by
                    .next_json()
                    .await
                    .unwrap_or_else(|| panic!("bystander {i} lost {id} around {what}"));
                assert_eq!(got["event_id"], id.as_str(), "bystander {i} around {what}");
            }
        }
        self.inputs += 1;
    }
}

async fn token_refused(gw: &TestGateway, endpoint: &str, token: &str, code: u16) {
    let mut c = gw.connect(endpoint, token).await;
    assert_eq!(c.close_code().await, Some(code), "{endpoint}");
}

/// A waiter of another branch, so that the bystanders' events do not reach it.
async fn waiter(gw: &TestGateway) -> Client {
    let claims = with(with(claims(), "sub", json!(500)), "branch_ids", json!([9]));
    gw.join("waiter", &rs256(&claims)).await.0
}

#[tokio::test]
async fn bad_inputs_get_their_documented_answer_and_break_nothing() {
    let (gw, mut s) = start().await;
    let gw = &gw;
    let good = claims();
    let now = unix_now();

    // --- Tokens: 4001 unless said otherwise.
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(good.to_string().as_bytes())
    );
    s.input(gw, "alg none", token_refused(gw, "waiter", &none, 4001))
        .await;
    let none_sig = format!("{none}{}", b64(b"sig"));
    s.input(
        gw,
        "alg none with a signature",
        token_refused(gw, "waiter", &none_sig, 4001),
    )
    .await;
    // HS256 signed with the RS256 public key: the classic algorithm confusion.
    let confused = sign(Algorithm::HS256, &good, &EncodingKey::from_secret(PUBLIC));
    s.input(
        gw,
        "HS/RS confusion",
        token_refused(gw, "waiter", &confused, 4001),
    )
    .await;
    let hs = sign(
        Algorithm::HS256,
        &good,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    );
    s.input(
        gw,
        "HS256 when RS256 is configured",
        token_refused(gw, "kitchen", &hs, 4001),
    )
    .await;
    let other = sign(
        Algorithm::RS256,
        &good,
        &EncodingKey::from_rsa_pem(OTHER_PRIVATE).unwrap(),
    );
    s.input(
        gw,
        "RS256 signed by another key",
        token_refused(gw, "admin", &other, 4001),
    )
    .await;
    let mut tampered = rs256(&good);
    tampered.insert(tampered.find('.').unwrap() + 3, 'x');
    s.input(
        gw,
        "tampered payload",
        token_refused(gw, "waiter", &tampered, 4001),
    )
    .await;
    s.input(
        gw,
        "expired",
        token_refused(
            gw,
            "waiter",
            &rs256(&with(good.clone(), "exp", json!(now - 60))),
            4001,
        ),
    )
    .await;
    s.input(
        gw,
        "not yet valid",
        token_refused(
            gw,
            "waiter",
            &rs256(&with(good.clone(), "nbf", json!(now + 600))),
            4001,
        ),
    )
    .await;
    for missing in ["sub", "tenant_id", "branch_ids", "exp"] {
        let token = rs256(&without(good.clone(), missing));
        s.input(
            gw,
            &format!("missing {missing}"),
            token_refused(gw, "waiter", &token, 4001),
        )
        .await;
    }
    for (field, value) in [
        ("tenant_id", json!("1")),
        ("tenant_id", json!(1.5)),
        ("branch_ids", json!(5)),
        ("branch_ids", json!([])),
        ("branch_ids", json!(["5"])),
        ("roles", json!("WAITER")),
        ("sub", json!("seven")),
        ("sub", json!(null)),
        ("exp", json!("tomorrow")),
    ] {
        let token = rs256(&with(good.clone(), field, value.clone()));
        s.input(
            gw,
            &format!("{field} = {value}"),
            token_refused(gw, "waiter", &token, 4001),
        )
        .await;
    }
    s.input(
        gw,
        "not a JWT",
        token_refused(gw, "waiter", "not.a.jwt", 4001),
    )
    .await;
    s.input(gw, "empty token", token_refused(gw, "kitchen", "", 4001))
        .await;
    s.input(
        gw,
        "huge token (9 KiB)",
        token_refused(gw, "waiter", &"a".repeat(9 * 1024), 4001),
    )
    .await;
    s.input(
        gw,
        "a table token on a staff endpoint",
        token_refused(gw, "admin", &diner(1, 5, 1, 77), 4001),
    )
    .await;
    s.input(
        gw,
        "a staff token on the diner endpoint",
        token_refused(gw, "diner", &rs256(&good), 4001),
    )
    .await;
    s.input(
        gw,
        "roles that do not allow the endpoint",
        token_refused(
            gw,
            "admin",
            &rs256(&with(good.clone(), "roles", json!(["WAITER"]))),
            4003,
        ),
    )
    .await;
    let addr = gw.addr;
    s.input(
        gw,
        "a token larger than the header limit: 431",
        async move {
            let head = raw_http(
                addr,
                &format!(
                    "GET /ws/waiter?token={} HTTP/1.1\r\nHost: x\r\n\r\n",
                    "a".repeat(17_000)
                ),
            )
            .await;
            assert!(head.starts_with("HTTP/1.1 431"), "{head}");
        },
    )
    .await;

    // --- Frames.
    let mut c = waiter(gw).await;
    s.input(gw, "binary frame: 1003", async {
        c.try_send(Message::binary(vec![0u8; 10])).await;
        assert_eq!(c.close_code().await, Some(1003));
    })
    .await;
    let mut c = waiter(gw).await;
    s.input(gw, "oversized message: 1009", async {
        c.try_send(Message::text("x".repeat(65_537))).await;
        assert_eq!(c.close_code().await, Some(1009));
    })
    .await;
    let mut c = waiter(gw).await;
    s.input(gw, "invalid UTF-8 in a text frame: 1007", async {
        let frame = Frame::message(vec![b'"', 0xff, 0xfe, b'"'], OpCode::Data(Data::Text), true);
        c.try_send(Message::Frame(frame)).await;
        assert_eq!(c.close_code().await, Some(1007));
    })
    .await;
    let mut c = waiter(gw).await;
    s.input(gw, "invalid JSON: error reply", async {
        assert_eq!(
            c.ask("{\"type\":").await,
            json!({"type": "error", "code": "invalid_json"})
        );
    })
    .await;
    s.input(gw, "deeply nested JSON: error reply", async {
        let deep = "{\"a\":".repeat(10_000) + "1" + &"}".repeat(10_000);
        assert_eq!(
            c.ask(&deep).await,
            json!({"type": "error", "code": "invalid_json"})
        );
    })
    .await;
    s.input(gw, "JSON that is not a message: error reply", async {
        assert_eq!(
            c.ask("[1,2,3]").await,
            json!({"type": "error", "code": "invalid_message"})
        );
        assert_eq!(
            c.ask(r#"{"type":"ping"}"#).await["type"],
            "pong",
            "still usable"
        );
    })
    .await;
    let mut c = waiter(gw).await;
    s.input(gw, "a flood: 4029", async {
        for _ in 0..200 {
            if !c.try_send(Message::text(r#"{"type":"ping"}"#)).await {
                break;
            }
        }
        assert_eq!(c.until_close().await.1, Some(4029));
    })
    .await;

    // --- HTTP.
    let bodies = [
        ("{", 400),
        (r#"{"channel":"channel:branch:5:waiters"}"#, 400),
        (
            r#"{"channel":"channel:everyone","event":{"type":"X","tenant_id":1,"branch_id":5}}"#,
            400,
        ),
        (
            r#"{"channel":"channel:branch:5:waiters","event":{"type":"X","branch_id":5}}"#,
            400,
        ),
        (
            r#"{"channel":"channel:branch:5:waiters","event":{"type":"X","tenant_id":2,"branch_id":6}}"#,
            400,
        ),
        (
            r#"[{"channel":"channel:branch:5:waiters","event":{"type":"X","tenant_id":1,"branch_id":5}}, 7]"#,
            400,
        ),
    ];
    for (body, status) in bodies {
        s.input(gw, &format!("publish {body}"), async {
            assert_eq!(
                gw.publish_raw(Some(API_KEY), body.into()).await.0,
                status,
                "{body}"
            );
        })
        .await;
    }
    let ok = r#"{"channel":"channel:branch:5:waiters","event":{"type":"X","tenant_id":1,"branch_id":5}}"#;
    s.input(gw, "publish with a wrong key: 401", async {
        assert_eq!(gw.publish_raw(Some("guess"), ok.into()).await.0, 401);
        assert_eq!(gw.publish_raw(None, ok.into()).await.0, 401);
    })
    .await;
    s.input(gw, "publish with an oversized body: 413", async {
        let huge = format!(r#"{{"channel":"channel:branch:5:waiters","event":{{"type":"X","tenant_id":1,"branch_id":5,"pad":"{}"}}}}"#, "x".repeat(1 << 21));
        assert_eq!(gw.publish_raw(Some(API_KEY), huge).await.0, 413);
    })
    .await;
    // Over the default bounds (1000 items, 100 channels per item): refused
    // whole and counted, on channels no bystander is in, so that a body
    // wrongly accepted shows as its status and not as a bystander's loss.
    let far = |channels: Vec<String>| {
        json!({"channels": channels,
               "event": {"type": "X", "tenant_id": 1, "branch_id": 5}})
    };
    let sessions = |n: usize| -> Vec<String> {
        (0..n)
            .map(|i| format!("channel:session:{}", 10_000 + i))
            .collect()
    };
    for (what, body, code) in [
        (
            "1001 items",
            Value::Array(vec![far(sessions(1)); 1001]),
            "too_many_items",
        ),
        (
            "an item of 101 channels",
            json!([far(sessions(1)), far(sessions(101))]),
            "too_many_channels",
        ),
        (
            "an item naming one channel 101 times",
            far(vec!["channel:session:10000".into(); 101]),
            "too_many_channels",
        ),
    ] {
        s.input(gw, &format!("publish {what}: 400 {code}"), async {
            let sample = format!("wsgateway_publish_rejected_total{{reason=\"{code}\"}}");
            let before = metric_value(&gw.metrics().await, &sample).unwrap_or(0.0);
            let (status, answer) = gw.publish(&body).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (400, Some(code)),
                "{what}"
            );
            assert_eq!(gw.metric(&sample).await, before + 1.0, "{what} counted");
        })
        .await;
    }
    // Numbers at the edge of their type: answered, never a panic or a wrap.
    // On a channel no bystander is in.
    let ts = |ts: &str| {
        format!(
            r#"{{"channel":"channel:session:10000","event":{{"type":"X","tenant_id":1,"branch_id":5,"ts":{ts}}}}}"#
        )
    };
    for (raw, status) in [
        ("-9223372036854775808", 400),
        ("-1e300", 400),
        ("9223372036854775807", 202),
        ("18446744073709551615", 202),
        ("1e300", 202),
    ] {
        s.input(gw, &format!("publish ts {raw}: {status}"), async {
            let (got, body) = gw.publish_raw(Some(API_KEY), ts(raw)).await;
            assert_eq!(got, status, "ts {raw}: {body}");
            if status == 400 {
                assert_eq!(body["error"], "stale_event", "ts {raw}: {body}");
            }
        })
        .await;
    }
    s.input(gw, "an unknown endpoint: 404", async {
        assert!(
            raw_http(addr, "GET /ws/chef HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 404")
        );
    })
    .await;
    s.input(gw, "a WebSocket path without the upgrade: 4xx", async {
        let head = raw_http(addr, "GET /ws/waiter?token=x HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 4"), "{head}");
    })
    .await;
    s.input(gw, "garbage instead of HTTP", async {
        let head = raw_http(addr, "\u{1}\u{2}garbage\r\n\r\n").await;
        assert!(
            head.is_empty() || head.starts_with("HTTP/1.1 400"),
            "{head}"
        );
    })
    .await;
    s.input(gw, "many half-open handshakes (slowloris)", async {
        let evicted = "wsgateway_handshakes_evicted_total";
        let refused = r#"wsgateway_connections_rejected_total{reason="handshake_limit"}"#;
        let evicted_before = gw.metric(evicted).await;
        // More than the pending budget, each sending half a request head.
        let mut held = Vec::new();
        for _ in 0..MAX_PENDING + 8 {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = tcp.write_all(b"GET /ws/waiter?token=").await;
            held.push(tcp);
        }
        // Only head readers hold the budget: a real client still gets in,
        // taking the place of the oldest.
        let (mut c, _) = gw
            .join("waiter", &rs256(&with(claims(), "sub", json!(600))))
            .await;
        assert_eq!(c.ask(r#"{"type":"ping"}"#).await["type"], "pong");
        // The oldest (8 for the flood's own newcomers, one for the client)
        // were closed unanswered and counted; nobody was refused.
        assert!(gw.metric(evicted).await >= evicted_before + 9.0);
        gw.assert_metric(refused, 0.0).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut closed = 0;
        for tcp in &mut held[..9] {
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await;
            if matches!(read, Ok(Ok(0) | Err(_))) {
                closed += 1;
            }
        }
        assert_eq!(closed, 9, "the oldest were shed");
        // The handshake timeout frees the rest.
        let mut closed = 0;
        for mut tcp in held {
            let mut buf = [0u8; 64];
            let read = tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await;
            if matches!(read, Ok(Ok(0) | Err(_))) {
                closed += 1;
            }
        }
        assert_eq!(closed, MAX_PENDING + 8);
        // And another new client gets in.
        let (mut c, _) = gw
            .join("waiter", &rs256(&with(claims(), "sub", json!(601))))
            .await;
        assert_eq!(c.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    })
    .await;

    assert_eq!(s.inputs, 55, "every input was tried");
    let (status, health) = gw.get_json("/ws/health").await;
    assert_eq!(status, 200);
    assert!(health["connections"]["total"].as_u64().unwrap() >= 4);
}

/// Sends raw bytes and returns what the server answered (its first line
/// and headers, or "" when it closed without answering).
async fn raw_http(addr: std::net::SocketAddr, request: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(request.as_bytes()).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("an answer or a close")
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn a_valid_rs256_token_is_accepted() {
    let (gw, _watch) = start().await;
    let (_c, hello) = gw
        .join("admin", &rs256(&with(claims(), "sub", json!("42"))))
        .await;
    assert_eq!(hello["user_id"], 42);
}

/// A token whose `exp` is near `u64::MAX` is valid (for ever), and the
/// re-validation pass that adds the leeway to it must neither wrap (and so
/// close it) nor panic (in a debug build, which would stop every later pass
/// of the whole process): a short-lived token opened beside it is still
/// closed with 4001 when it expires.
#[tokio::test]
async fn an_exp_near_the_end_of_time_breaks_no_pass() {
    let gw = TestGateway::start_with(|c| {
        c.jwt_leeway_s = 5;
        c.jwt_revalidate_s = Secs(Duration::from_millis(200));
    })
    .await;
    let forever = |sub| staff_token_exp(json!(sub), 1, &[5], &["WAITER"], u64::MAX - 1);
    let (mut staff, _) = gw.join("waiter", &forever(1)).await;
    let (mut table, _) = gw.join("diner", &diner_exp(1, 5, 1, 77, u64::MAX)).await;
    // Expired already, but within the leeway: admitted, then closed by the
    // first pass after the leeway runs out.
    let short = staff_token_exp(json!(2), 1, &[5], &["WAITER"], unix_now() - 4);
    let (mut expiring, _) = gw.join("waiter", &short).await;
    assert_eq!(
        expiring.close_code_within(Duration::from_secs(10)).await,
        Some(4001),
        "the pass still runs"
    );
    assert_eq!(staff.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    assert_eq!(table.ask(r#"{"type":"ping"}"#).await["type"], "pong");
    gw.stop().await;
}
