//! The publish bounds (PROTOCOL.md §10): a maximal request (every item with
//! the most channels, spread over many table sessions) is accepted, and
//! delivered and resumed exactly, with both brokers; one more item or
//! channel is a 400 that publishes nothing. With Redis, each scope's
//! history entry carries only its own channels, so what a publication
//! keeps is linear in its size.

use crate::common;

use std::time::Duration;

use common::redis_server::RedisServer;
use common::*;
use serde_json::{Value, json};
use wsgateway::Config;
use wsgateway::config::{Secret, Secs};

const ITEMS: usize = 200;
const CHANNELS: usize = 100;
/// Session scopes the items' channels are spread over.
const SESSIONS: usize = 1000;

fn bounds(c: &mut Config) {
    c.max_publish_items = ITEMS;
    c.max_publish_channels = CHANNELS;
    // Every channel of every item is one queued event.
    c.event_queue_size = ITEMS * CHANNELS * 2;
}

/// Item `i`'s channels: branch 5's admins and 99 sessions, a window
/// sliding over the sessions.
fn channels_of(i: usize) -> Vec<String> {
    std::iter::once("channel:branch:5:admin".to_owned())
        .chain((0..CHANNELS - 1).map(|k| format!("channel:session:{}", (i * 99 + k) % SESSIONS)))
        .collect()
}

fn items_in_session(s: usize) -> Vec<usize> {
    (0..ITEMS)
        .filter(|i| channels_of(*i).contains(&format!("channel:session:{s}")))
        .collect()
}

fn maximal_request(tag: &str) -> Value {
    Value::Array(
        (0..ITEMS)
            .map(|i| {
                json!({"channels": channels_of(i),
                       "event": {"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5,
                                 "n": i, "event_id": format!("{tag}-{i}")}})
            })
            .collect(),
    )
}

/// The `n` of each frame: the first within the usual wait (a maximal
/// request through Redis takes a while on a loaded machine), the rest until
/// `quiet` passes without one.
async fn ns(c: &mut Client) -> Vec<usize> {
    let n = |f: &Value| f["n"].as_u64().expect("an event frame") as usize;
    let Some(first) = c.next_json().await else {
        return Vec::new();
    };
    let rest = c.drain(Duration::from_millis(700)).await;
    std::iter::once(&first).chain(&rest).map(n).collect()
}

async fn a_maximal_request_is_delivered_and_resumed_exactly(gw: &TestGateway) {
    let (mut admin, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    let diner_token = diner(1, 5, 1, 3);
    let (mut near, _) = gw.join("diner", &diner_token).await;
    let (mut far, _) = gw.join("diner", &diner(1, 5, 2, 640)).await;
    let (status, answer) = gw.publish(&maximal_request("max")).await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["event_ids"].as_array().unwrap().len(), ITEMS);
    assert_eq!(ns(&mut admin).await, (0..ITEMS).collect::<Vec<_>>());
    let mine = items_in_session(3);
    assert!(mine.len() >= 2, "{mine:?}");
    assert_eq!(ns(&mut near).await, mine);
    assert_eq!(ns(&mut far).await, items_in_session(640));

    // One more item, or one more channel: nothing of it is published.
    let mut over = maximal_request("over");
    let first = over[0].clone();
    over.as_array_mut().unwrap().push(first);
    let (status, answer) = gw.publish(&over).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("too_many_items"))
    );
    let mut wide = maximal_request("wide");
    wide[ITEMS - 1]["channels"]
        .as_array_mut()
        .unwrap()
        .push(json!("channel:session:3"));
    let (status, answer) = gw.publish(&wide).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (400, Some("too_many_channels"))
    );
    assert!(
        admin
            .next_json_within(Duration::from_millis(300))
            .await
            .is_none()
    );

    // A diner of one of the many scopes resumes from its first event: the
    // rest of its own, exactly.
    drop(near);
    let url = format!(
        "ws://{}/ws/diner?table_token={diner_token}&last_event_id=max-{}",
        gw.addr, mine[0]
    );
    let mut again = Client::open(&url, None).await;
    let hello = again.next_json().await.unwrap();
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(ns(&mut again).await, mine[1..].to_vec());
}

#[tokio::test]
async fn embedded_mode() {
    let gw = TestGateway::start_with(bounds).await;
    a_maximal_request_is_delivered_and_resumed_exactly(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn redis_mode_keeps_each_channel_once() {
    // A maximal request is 20,000 events in one function call: it loads
    // the machine, and on a loaded one it may take Redis longer than the
    // default command timeout (2 s). This test is about the bounds, not
    // the latency.
    let _heavy = common::heavy().await;
    let server = RedisServer::start();
    let gw = TestGateway::start_with(|c| {
        bounds(c);
        c.redis_url = Some(Secret(server.url()));
        c.redis_timeout_s = Secs(Duration::from_secs(10));
    })
    .await;
    gw.wait_connected().await;
    a_maximal_request_is_delivered_and_resumed_exactly(&gw).await;

    // Each scope's entries carry that scope's channels, not the item's 100.
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    for (stream, channel) in [
        ("wsgateway:{1}:history:session:3", "channel:session:3"),
        ("wsgateway:{1}:history:branch:5", "channel:branch:5:admin"),
    ] {
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query(&mut conn)
            .unwrap();
        assert!(!entries.is_empty(), "{stream}");
        for (id, fields) in entries {
            // One field, `e`: "<kept at>\n<channels>\n<frame>".
            let c = fields
                .iter()
                .find(|(k, _)| k == "e")
                .and_then(|(_, v)| v.split('\n').nth(1));
            assert_eq!(c, Some(channel), "{stream} {id}");
        }
    }

    // The function applies the channel bound too.
    let fcall = |n: usize| {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("wsgateway_publish").arg(0);
        for s in 0..n {
            cmd.arg(format!("channel:session:{s}"));
        }
        cmd.arg(json!({"type": "X", "tenant_id": 1, "branch_id": 5}).to_string());
        cmd.query::<Vec<String>>(&mut client.get_connection().unwrap())
    };
    let refused = fcall(CHANNELS + 1).unwrap_err().to_string();
    assert!(refused.contains("wsgateway too_many_channels"), "{refused}");
    fcall(CHANNELS).unwrap();
    gw.stop().await;
}
