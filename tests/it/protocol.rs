//! The client protocol (PROTOCOL.md §7), health (§12) and the publish API (§10).

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn connected_messages_have_the_documented_shape() {
    let gw = TestGateway::start().await;
    let token = staff_token(json!("7"), 1, &[5, 6], &["WAITER"]);
    let (_w, hello) = gw.join("waiter", &token).await;
    assert_eq!(
        hello,
        json!({"type": "connected", "endpoint": "waiter", "user_id": 7, "tenant_id": 1,
               "branch_ids": [5, 6], "sector_ids": null, "heartbeat_interval_s": 30})
    );
    let (_k, hello) = gw.join("kitchen", &staff(8, 1, &[5], &["KITCHEN"])).await;
    assert_eq!(hello["endpoint"], "kitchen");
    assert_eq!(hello["sector_ids"], Value::Null);
    let (_d, hello) = gw.join("diner", &diner(1, 5, 12, 77)).await;
    assert_eq!(
        hello,
        json!({"type": "connected", "endpoint": "diner", "tenant_id": 1, "branch_id": 5,
               "session_id": 77, "table_id": 12, "heartbeat_interval_s": 30})
    );
    gw.stop().await;
}

#[tokio::test]
async fn client_messages_get_their_replies() {
    let gw = TestGateway::start().await;
    let (mut w, _) = gw.join("waiter", &staff(7, 1, &[5], &["WAITER"])).await;
    let (mut k, _) = gw.join("kitchen", &staff(8, 1, &[5], &["KITCHEN"])).await;
    let err = |code: &str| json!({"type": "error", "code": code});
    assert_eq!(w.ask(r#"{"type":"ping"}"#).await, json!({"type": "pong"}));
    assert_eq!(
        w.ask(r#"{"type":"refresh_sectors"}"#).await,
        json!({"type": "sectors_updated", "sector_ids": null})
    );
    assert_eq!(
        k.ask(r#"{"type":"refresh_sectors"}"#).await,
        err("unknown_message_type")
    );
    assert_eq!(
        w.ask(r#"{"type":"publish","event":{}}"#).await,
        err("unknown_message_type")
    );
    assert_eq!(w.ask(r#"{"type":5}"#).await, err("invalid_message"));
    assert_eq!(w.ask(r#"[{"type":"ping"}]"#).await, err("invalid_message"));
    assert_eq!(w.ask("null").await, err("invalid_message"));
    assert_eq!(w.ask("{not json").await, err("invalid_json"));
    let deep = "[".repeat(5000) + &"]".repeat(5000);
    assert_eq!(w.ask(&deep).await, err("invalid_json"));
    // Still connected and receiving.
    let id = gw
        .publish_one(
            "channel:branch:5:waiters",
            event("SERVICE_CALL_CREATED", 1, 5),
        )
        .await;
    assert_eq!(w.next_json().await.unwrap()["event_id"], id.as_str());
    gw.stop().await;
}

#[tokio::test]
async fn events_are_forwarded_as_published_with_an_event_id() {
    let gw = TestGateway::start().await;
    let (mut d, _) = gw.join("diner", &diner(1, 5, 12, 77)).await;
    let ev = json!({"type": "PAYMENT_APPROVED", "tenant_id": 1, "branch_id": 5, "session_id": 77,
                    "table_id": 12, "entity": {"amount": 12.5, "items": [1, 2]}, "zzz": true,
                    "ts": wsgateway::event::unix_ms()});
    let id = gw.publish_one("channel:session:77", ev.clone()).await;
    let got = d.next_json().await.unwrap();
    let mut expected = ev.as_object().unwrap().clone();
    expected.insert("event_id".into(), json!(id));
    assert_eq!(got, Value::Object(expected));
    // A caller's event_id is kept; an unknown type is delivered and counted.
    let custom = json!({"type": "BRAND_NEW", "tenant_id": 1, "branch_id": 5, "event_id": "mine-1"});
    assert_eq!(gw.publish_one("channel:session:77", custom).await, "mine-1");
    assert_eq!(d.next_json().await.unwrap()["event_id"], "mine-1");
    gw.assert_metric(r#"events_unknown_type_total{type="BRAND_NEW"}"#, 1.0)
        .await;
    gw.assert_metric("events_processed_total", 2.0).await;
    gw.stop().await;
}

#[tokio::test]
async fn the_publish_api_answers_as_documented() {
    let gw = TestGateway::start().await;
    let (mut k, _) = gw.join("kitchen", &staff(8, 1, &[5], &["KITCHEN"])).await;
    let ok =
        json!({"channel": "channel:branch:5:kitchen", "event": event("ROUND_SUBMITTED", 1, 5)});
    // Keys.
    assert_eq!(gw.publish_raw(None, ok.to_string()).await.0, 401);
    assert_eq!(gw.publish_raw(Some("wrong"), ok.to_string()).await.0, 401);
    // Bad bodies: 400 with a code, and nothing of the request published.
    let bad_batch = json!([ok, {"channel": "channel:branch:5:kitchen", "event": {"type": "X", "branch_id": 5}}]);
    let cases = [
        ("{", "invalid_body"),
        ("[]", "invalid_body"),
        (r#"{"event":{}}"#, "invalid_body"),
        (
            r#"{"channel":"channel:pizza:5","event":{"type":"X","tenant_id":1,"branch_id":5}}"#,
            "unknown_channel",
        ),
        (
            r#"{"channel":"channel:branch:6:kitchen","event":{"type":"X","tenant_id":1,"branch_id":5}}"#,
            "invalid_event",
        ),
        (
            r#"{"channel":"channel:branch:5:kitchen","event":{"type":"X","tenant_id":1,"branch_id":5,"ts":1000}}"#,
            "stale_event",
        ),
    ];
    for (body, code) in cases {
        let (status, answer) = gw.publish_raw(Some(API_KEY), body.into()).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some(code)),
            "{body}: {answer}"
        );
        assert!(answer["detail"].is_string());
    }
    let (status, answer) = gw.publish(&bad_batch).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        k.next_json_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing was published"
    );
    // Too large.
    let huge = json!({"channel": "channel:branch:5:kitchen",
                      "event": {"type": "X", "tenant_id": 1, "branch_id": 5, "pad": "x".repeat(2 << 20)}});
    let (status, answer) = gw.publish_raw(Some(API_KEY), huge.to_string()).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (413, Some("body_too_large"))
    );
    // The key is checked first.
    assert_eq!(gw.publish_raw(Some("wrong"), huge.to_string()).await.0, 401);
    // A batch: one id per event, in order.
    let (status, answer) = gw.publish(&json!([ok, ok])).await;
    assert_eq!(status, 202);
    let ids = answer["event_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1]);
    assert_eq!(k.next_json().await.unwrap()["event_id"], ids[0]);
    assert_eq!(k.next_json().await.unwrap()["event_id"], ids[1]);
    gw.stop().await;
}

#[tokio::test]
async fn without_a_key_the_publish_api_is_absent() {
    let gw = TestGateway::start_with(|c| c.api_key = None).await;
    let body = json!({"channel": "channel:branch:5:kitchen", "event": event("X", 1, 5)});
    assert_eq!(gw.publish_raw(Some(API_KEY), body.to_string()).await.0, 404);
    gw.stop().await;
}

#[tokio::test]
async fn health_counts_connections_by_endpoint() {
    let gw = TestGateway::start().await;
    let _w = gw.join("waiter", &staff(1, 1, &[5], &["WAITER"])).await;
    let _w2 = gw.join("waiter", &staff(2, 1, &[5], &["MANAGER"])).await;
    let _a = gw.join("admin", &staff(3, 2, &[5], &["ADMIN"])).await;
    let _d = gw.join("diner", &diner(1, 5, 1, 77)).await;
    let (status, health) = gw.get_json("/ws/health").await;
    assert_eq!(status, 200);
    assert_eq!(
        health,
        json!({"status": "healthy", "connections": {"total": 4,
               "by_endpoint": {"waiter": 2, "kitchen": 0, "admin": 1, "diner": 1}}})
    );
    let (status, detailed) = gw.get_json("/ws/health/detailed").await;
    assert_eq!(status, 200);
    assert_eq!(detailed["status"], "healthy");
    assert_eq!(
        detailed["broker"],
        json!({"kind": "embedded", "status": "connected", "publishing": true})
    );
    assert_eq!(detailed["sector_repository"]["status"], "disabled");
    assert_eq!(detailed["event_processing"]["queue_size"], 0);
    gw.assert_metric(r#"connections_by_endpoint{endpoint="waiter"}"#, 2.0)
        .await;
    gw.assert_metric("connections_total", 4.0).await;
    gw.stop().await;
}

/// PROTOCOL.md §6 "once per connection" is per tenant: event ids are the
/// publisher's, so two tenants' `order-1` are two events.
#[tokio::test]
async fn equal_event_ids_of_two_tenants_are_two_events() {
    let gw = TestGateway::start().await;
    let (mut one, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    let (mut two, _) = gw.join("admin", &staff(1, 2, &[5], &["ADMIN"])).await;
    let order = |tenant: i64| {
        json!({"event_id": "order-1", "type": "ROUND_SUBMITTED", "tenant_id": tenant,
               "branch_id": 5, "tenant": tenant})
    };
    assert_eq!(
        gw.publish_one("channel:branch:5:admin", order(1)).await,
        "order-1"
    );
    assert_eq!(
        gw.publish_one("channel:branch:5:admin", order(2)).await,
        "order-1"
    );
    let got = two.next_json().await.expect("tenant 2's own order-1");
    assert_eq!(got["tenant"], 2, "{got}");
    // Tenant 1 gets its own, and only its own: a marker published after
    // comes next.
    gw.publish_one("channel:branch:5:admin", event("ROUND_READY", 1, 5))
        .await;
    assert_eq!(one.next_json().await.unwrap()["tenant"], 1);
    assert_eq!(one.next_json().await.unwrap()["type"], "ROUND_READY");
    gw.assert_metric("events_deduplicated_total", 0.0).await;
    // A repeat within one tenant is still one event: it is not published
    // again.
    gw.publish_one("channel:branch:5:admin", order(2)).await;
    gw.publish_one("channel:branch:5:admin", event("ROUND_READY", 2, 5))
        .await;
    assert_eq!(two.next_json().await.unwrap()["type"], "ROUND_READY");
    gw.assert_metric("publish_duplicates_total", 1.0).await;
    gw.stop().await;
}
