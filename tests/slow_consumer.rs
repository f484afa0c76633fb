//! A client that stops reading is closed with 1008 once its queue overflows,
//! while everyone else keeps receiving every event.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use wsgateway::config::Secs;

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_1008_and_delays_no_one() {
    let gw = TestGateway::start_with(|c| {
        c.send_queue_size = 100;
        // Long enough for the stalled client to resume and read its close.
        c.close_timeout_s = Secs(Duration::from_secs(20));
    })
    .await;
    let (mut stalled, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    let (mut reader, _) = gw.join("admin", &staff(2, 1, &[5], &["ADMIN"])).await;
    let (mut kitchen, _) = gw.join("kitchen", &staff(3, 1, &[5], &["KITCHEN"])).await;

    // ~19 MB in total: more than the loopback socket buffers can hold, so
    // the stalled client's queue must overflow.
    let padding = "x".repeat(32 * 1024);
    let total = 600;
    let publisher = async {
        for batch in 0..total / 20 {
            let items: Vec<_> = (0..20)
                .map(|i| {
                    let n = batch * 20 + i;
                    json!({"channel": "channel:branch:5:kitchen",
                           "event": {"type": "ROUND_IN_KITCHEN", "tenant_id": 1, "branch_id": 5,
                                     "event_id": format!("e{n}"), "pad": padding}})
                })
                .collect();
            let (status, body) = gw.publish(&json!(items)).await;
            assert_eq!(status, 202, "{body}");
            // Paced, so that a client that reads keeps up with its queue.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let ((), got_reader, got_kitchen) = tokio::join!(
        publisher,
        read_ids(&mut reader, total),
        read_ids(&mut kitchen, total)
    );
    let expected: Vec<String> = (0..total).map(|n| format!("e{n}")).collect();
    assert_eq!(
        got_reader, expected,
        "the reading admin got every event, in order"
    );
    assert_eq!(got_kitchen, expected);

    // The stalled client now reads what was buffered, then the close.
    let (frames, code) = stalled.until_close().await;
    assert_eq!(code, Some(1008));
    assert!(
        frames.len() < total,
        "it was cut off before the end ({} frames)",
        frames.len()
    );
    assert_eq!(
        gw.metric(r#"wsgateway_disconnects_total{reason="slow_consumer"}"#)
            .await,
        1.0
    );
    assert!(gw.metric("wsgateway_broadcasts_failed_total").await >= 1.0);
    assert_eq!(gw.metric("wsgateway_connections_total").await, 2.0);
    drop((reader, kitchen));
    gw.stop().await;
}

async fn read_ids(client: &mut Client, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        let ev = client
            .next_json_within(Duration::from_secs(10))
            .await
            .expect("every event");
        got.push(ev["event_id"].as_str().unwrap().to_owned());
    }
    got
}
