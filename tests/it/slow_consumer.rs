//! A client that stops reading is closed with 1008 once its queue overflows,
//! while everyone else keeps receiving every event.

use crate::common;

use std::time::Duration;

use common::*;
use serde_json::json;
use wsgateway::config::Secs;

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_1008_and_delays_no_one() {
    let _heavy = common::heavy().await;
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
    gw.assert_metric(r#"disconnects_total{reason="slow_consumer"}"#, 1.0)
        .await;
    let failed = |reason: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(&format!(
                r#"wsgateway_broadcasts_failed_total{{reason="{reason}"}}"#
            ))
            .await
        }
    };
    assert!(
        failed("slow_consumer").await >= 1.0,
        "refused by its full queue"
    );
    assert!(
        failed("connection_closed").await >= 1.0,
        "its queue was full when it closed"
    );
    // Every frame queued was either written (and read: the two readers got
    // all 600, the stalled client what it read before the close) or counted
    // as undelivered.
    let queued = gw.metric("wsgateway_broadcasts_total").await;
    let undelivered = failed("write_failed").await + failed("connection_closed").await;
    assert_eq!(
        queued - undelivered,
        (2 * total + frames.len()) as f64,
        "queued {queued}, undelivered {undelivered}"
    );
    gw.assert_metric("connections_total", 2.0).await;
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

/// A client that stops reading and then vanishes (a TCP reset) while the
/// gateway is blocked writing to it: the frames of the write that fails are
/// counted as `write_failed`, those still queued as `connection_closed`.
#[tokio::test]
async fn frames_lost_to_a_reset_connection_are_counted() {
    let _heavy = common::heavy().await;
    let gw = TestGateway::start_with(|c| c.send_queue_size = 10_000).await;
    let (stalled, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    // ~26 MB, far more than the loopback buffers hold: the gateway's write
    // to the client blocks and the rest waits in its queue (no overflow).
    let padding = "x".repeat(32 * 1024);
    let total = 800;
    for batch in 0..total / 20 {
        let items: Vec<_> = (0..20)
            .map(|i| {
                json!({"channel": "channel:branch:5:admin",
                       "event": {"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5,
                                 "n": batch * 20 + i, "pad": padding}})
            })
            .collect();
        let (status, body) = gw.publish(&json!(items)).await;
        assert_eq!(status, 202, "{body}");
    }
    gw.wait_metric("wsgateway_events_processed_total", |v| v == total as f64)
        .await;
    gw.assert_metric("broadcasts_total", total as f64).await;
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = stalled.ws.get_ref() else {
        unreachable!("plain TCP")
    };
    tcp.set_zero_linger().unwrap();
    drop(stalled);

    let write_failed = gw
        .wait_metric(
            r#"wsgateway_broadcasts_failed_total{reason="write_failed"}"#,
            |v| v >= 1.0,
        )
        .await;
    gw.wait_metric("wsgateway_connections_total", |v| v == 0.0)
        .await;
    let closed = gw
        .metric(r#"wsgateway_broadcasts_failed_total{reason="connection_closed"}"#)
        .await;
    assert!(closed >= 1.0, "frames were still queued");
    assert!(write_failed + closed <= total as f64);
    gw.assert_metric(r#"broadcasts_failed_total{reason="slow_consumer"}"#, 0.0)
        .await;
    gw.stop().await;
}
