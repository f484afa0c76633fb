//! Routing, table-driven: two tenants × two branches × every role, with
//! sessions. For every channel family the exact set of connections that got
//! each event is compared with an oracle written from PROTOCOL.md §6.

use crate::common;

use common::table::*;
use common::*;
use serde_json::json;

#[tokio::test]
async fn every_channel_family_reaches_exactly_its_audience() {
    let gw = TestGateway::start().await;
    let mut clients = connect_all(&gw, [1, 2]).await;
    let published = events([1, 2]);
    for (p, ev) in &published {
        gw.publish_one(&p.channel, ev.clone()).await;
    }
    let got = received(&mut clients).await;
    assert_routed(&clients, &published, &got);
    gw.stop().await;
}

#[tokio::test]
async fn a_repeated_event_reaches_each_connection_once() {
    let gw = TestGateway::start().await;
    let mut clients = connect_all(&gw, [1, 2]).await;
    let t1 = |kind: &str| json!({"type": kind, "tenant_id": 1, "branch_id": 10, "event_id": kind});
    // One event on two channels in one request: admins are in both audiences.
    gw.publish(&json!({"channels": ["channel:branch:10:waiters", "channel:branch:10:admin"], "event": t1("A")}))
        .await;
    // The same id again, in separate requests, on other channels.
    gw.publish_one("channel:branch:10:kitchen", t1("B")).await;
    gw.publish_one("channel:branch:10:admin", t1("B")).await;
    gw.publish_one("channel:branch:10:kitchen", t1("B")).await;
    // The same event on the same channel twice.
    gw.publish_one("channel:branch:10:waiters", t1("C")).await;
    gw.publish_one("channel:branch:10:waiters", t1("C")).await;
    // One event on a user's, the tenant's staff and a branch channel, then
    // again on the user's: every staff connection once, diners never.
    gw.publish(&json!({"channels": ["channel:user:900", "channel:tenant:staff", "channel:branch:10:waiters"], "event": t1("D")}))
        .await;
    gw.publish_one("channel:user:900", t1("D")).await;
    let got = received(&mut clients).await;
    let expect = |label: &str, ids: &[&str]| {
        assert_eq!(
            got[label],
            ids.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            "{label}"
        );
    };
    expect("t1b10-admin", &["A", "B", "C", "D"]);
    expect("t1-manager@admin-both", &["A", "B", "C", "D"]);
    expect("t1b10-waiter", &["A", "C", "D"]);
    expect("t1-waiter-both", &["A", "C", "D"]);
    expect("t1b10-kitchen", &["B", "D"]);
    expect("t1b20-admin", &["D"]);
    expect("t1-u900@admin", &["A", "B", "C", "D"]);
    expect("t1-u900@kitchen", &["D"]);
    expect("t1b10s100-diner", &[]);
    expect("t2b10-admin", &[]);
    expect("t2-u900@kitchen", &[]);
    gw.stop().await;
}
