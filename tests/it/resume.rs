//! Resume after a disconnect (PROTOCOL.md §14), in embedded mode and against
//! a real Redis: exactly the missed events of the client's own audience, in
//! order and once, then live ones; `recovered: false` when history cannot
//! cover the gap; across a restart and across nodes.

use crate::common;

use std::time::Duration;

use common::redis_server::RedisServer;
use common::*;
use serde_json::{Value, json};
use wsgateway::config::{Secret, Secs};

fn waiter_token() -> String {
    staff(7, 1, &[5], &["WAITER"])
}

async fn resume(gw: &TestGateway, endpoint: &str, token: &str, last: &str) -> (Client, Value) {
    let param = if endpoint == "diner" {
        "table_token"
    } else {
        "token"
    };
    let url = format!(
        "ws://{}/ws/{endpoint}?{param}={token}&last_event_id={last}",
        gw.addr
    );
    let mut c = Client::open(&url, None).await;
    let hello = c.next_json().await.expect("connected");
    assert_eq!(hello["type"], "connected", "{hello}");
    (c, hello)
}

/// Publishes `n` rounds of events: one for the waiter of tenant 1 branch 5
/// (returned, in order), and several it must never see.
async fn publish_mixed(gw: &TestGateway, n: usize, tag: &str) -> Vec<String> {
    let mut mine = Vec::new();
    for i in 0..n {
        let items = json!([
            {"channel": "channel:branch:5:waiters", "event": {"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "n": format!("{tag}{i}")}},
            {"channel": "channel:branch:5:waiters", "event": {"type": "ROUND_READY", "tenant_id": 2, "branch_id": 5, "n": "other tenant"}},
            {"channel": "channel:branch:6:waiters", "event": {"type": "ROUND_READY", "tenant_id": 1, "branch_id": 6, "n": "other branch"}},
            {"channel": "channel:branch:5:kitchen", "event": {"type": "ROUND_IN_KITCHEN", "tenant_id": 1, "branch_id": 5, "n": "kitchen"}},
            {"channel": "channel:session:77", "event": {"type": "PAYMENT_APPROVED", "tenant_id": 1, "branch_id": 5, "n": "session"}},
        ]);
        let (status, answer) = gw.publish(&items).await;
        assert_eq!(status, 202, "{answer}");
        mine.push(answer["event_ids"][0].as_str().unwrap().to_owned());
    }
    mine
}

/// Reads `watcher`, a live client in the audience, until it gets the
/// event `last`: then everything published before it has been dispatched,
/// and cannot reach a client that connects afterwards as a live event (in
/// Redis mode an event travels through pub/sub after its 202).
async fn dispatched(watcher: &mut Client, last: &str) {
    loop {
        let got = watcher
            .next_json()
            .await
            .expect("the watcher gets every event");
        if got["event_id"] == last {
            return;
        }
    }
}

fn ids(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["event_id"].as_str().unwrap_or("-").to_owned())
        .collect()
}

async fn missed_events_are_replayed_in_order_then_live(gw: &TestGateway) {
    let token = waiter_token();
    let (mut c, hello) = gw.join("waiter", &token).await;
    assert!(
        hello.get("recovered").is_none(),
        "only a resume says recovered"
    );
    let first = publish_mixed(gw, 1, "before").await;
    assert_eq!(c.next_json().await.unwrap()["event_id"], first[0].as_str());
    drop(c);

    let missed = publish_mixed(gw, 200, "missed").await;
    let (mut c, hello) = resume(gw, "waiter", &token, &first[0]).await;
    assert_eq!(hello["recovered"], true, "{hello}");
    let live = publish_mixed(gw, 3, "live").await;
    let got = c.drain(Duration::from_millis(500)).await;
    let expected: Vec<String> = missed.iter().chain(&live).cloned().collect();
    assert_eq!(
        ids(&got),
        expected,
        "exactly the missed events, in order, then live"
    );
    assert!(
        got.iter()
            .all(|f| f["tenant_id"] == 1 && f["branch_id"] == 5)
    );
}

async fn events_published_during_the_replay_are_neither_lost_nor_repeated(gw: &TestGateway) {
    let token = staff(8, 1, &[5], &["WAITER"]);
    let (mut c, _) = gw.join("waiter", &token).await;
    let first = publish_mixed(gw, 1, "x").await;
    assert_eq!(c.next_json().await.unwrap()["event_id"], first[0].as_str());
    drop(c);
    // A publisher runs while the client keeps dropping off and resuming from
    // the last event it saw: what it sees, across every connection, must be
    // exactly what was published, in order.
    let publisher = publish_mixed(gw, 300, "during");
    let resumer = async {
        let mut seen: Vec<String> = Vec::new();
        let mut last = first[0].clone();
        for round in 0..12 {
            let (mut c, hello) = resume(gw, "waiter", &token, &last).await;
            assert_eq!(hello["recovered"], true, "round {round}");
            let got = ids(&c.drain(Duration::from_millis(15 + 5 * round)).await);
            if let Some(l) = got.last() {
                last = l.clone();
            }
            seen.extend(got);
        }
        (seen, last)
    };
    let (published, (mut seen, last)) = tokio::join!(publisher, resumer);
    let (mut c, _) = resume(gw, "waiter", &token, &last).await;
    seen.extend(ids(&c.drain(Duration::from_millis(500)).await));
    assert_eq!(seen, published);
}

async fn exhausted_or_unknown_history_is_not_recovered(gw: &TestGateway) {
    let token = staff(9, 1, &[5], &["WAITER"]);
    let (mut c, _) = gw.join("waiter", &token).await;
    let first = publish_mixed(gw, 1, "old").await;
    assert_eq!(c.next_json().await.unwrap()["event_id"], first[0].as_str());
    drop(c);
    // The history keeps 50 events per branch: 60 more push the cursor out.
    let (mut watcher, _) = gw.join("waiter", &staff(19, 1, &[5], &["WAITER"])).await;
    let flood = publish_mixed(gw, 60, "flood").await;
    dispatched(&mut watcher, flood.last().unwrap()).await;
    let (mut c, hello) = resume(gw, "waiter", &token, &first[0]).await;
    assert_eq!(hello["recovered"], false, "{hello}");
    assert!(
        c.next_json_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing replayed"
    );
    let live = publish_mixed(gw, 1, "live").await;
    assert_eq!(
        c.next_json().await.unwrap()["event_id"],
        live[0].as_str(),
        "then live"
    );
    for unknown in ["999999999", "no-such-id", "-1"] {
        let (_, hello) = resume(gw, "waiter", &token, unknown).await;
        assert_eq!(hello["recovered"], false, "{unknown}");
    }
}

/// With history of 50 per branch: an admin of branches 5 and 6 whose cursor
/// is on branch 5 missed more than branch 6 keeps.
async fn a_gap_in_any_scope_is_not_recovered(gw: &TestGateway) {
    let token = staff(10, 1, &[5, 6], &["ADMIN"]);
    let (mut c, _) = gw.join("admin", &token).await;
    let cursor = gw
        .publish_one("channel:branch:5:admin", event("ROUND_READY", 1, 5))
        .await;
    assert_eq!(c.next_json().await.unwrap()["event_id"], cursor.as_str());
    drop(c);
    for _ in 0..60 {
        gw.publish_one("channel:branch:6:admin", event("ROUND_READY", 1, 6))
            .await;
    }
    let (_, hello) = resume(gw, "admin", &token, &cursor).await;
    assert_eq!(
        hello["recovered"], false,
        "branch 6 lost some of what was missed"
    );
}

async fn caller_ids_are_cursors_and_other_audiences_never_leak(gw: &TestGateway) {
    let table = diner(1, 5, 12, 77);
    let (mut d, _) = gw.join("diner", &table).await;
    let ev = |tenant: i64, branch: i64, id: &str| json!({"type": "PAYMENT_APPROVED", "tenant_id": tenant, "branch_id": branch, "event_id": id});
    gw.publish_one("channel:session:77", ev(1, 5, "pay-1"))
        .await;
    assert_eq!(d.next_json().await.unwrap()["event_id"], "pay-1");
    drop(d);
    gw.publish_one("channel:session:77", ev(1, 5, "pay-2"))
        .await;
    gw.publish_one("channel:session:77", ev(2, 5, "pay-other-tenant"))
        .await;
    gw.publish_one("channel:session:78", ev(1, 5, "pay-other-session"))
        .await;
    gw.publish_one("channel:session:77", ev(1, 6, "pay-other-branch"))
        .await;
    gw.publish_one("channel:branch:5:admin", ev(1, 5, "admin-only"))
        .await;
    gw.publish_one("channel:session:77", ev(1, 5, "pay-3"))
        .await;
    let (mut d, hello) = resume(gw, "diner", &table, "pay-1").await;
    assert_eq!(hello["recovered"], true);
    assert_eq!(
        ids(&d.drain(Duration::from_millis(400)).await),
        vec!["pay-2", "pay-3"]
    );
    // Another tenant's caller id is unknown here.
    let (_, hello) = resume(gw, "diner", &diner(2, 5, 12, 77), "pay-2").await;
    assert_eq!(hello["recovered"], false);
    // An all-digit caller id works as a cursor too.
    gw.publish_one("channel:session:77", ev(1, 5, "4242")).await;
    gw.publish_one("channel:session:77", ev(1, 5, "pay-4"))
        .await;
    let (mut d, hello) = resume(gw, "diner", &table, "4242").await;
    assert_eq!(hello["recovered"], true);
    assert_eq!(
        ids(&d.drain(Duration::from_millis(400)).await),
        vec!["pay-4"]
    );
}

/// `0042` is not the event numbered 42, but it is a publisher's `0042`.
async fn a_cursor_means_exactly_its_text(gw: &TestGateway) {
    let token = staff(12, 1, &[5], &["ADMIN"]);
    let publish = |id: Option<&str>| {
        let mut e = event("ROUND_READY", 1, 5);
        if let Some(id) = id {
            e["event_id"] = json!(id);
        }
        gw.publish_one("channel:branch:5:admin", e)
    };
    let numbered = publish(None).await;
    let padded = format!("00{numbered}");
    let after_numbered = publish(None).await;
    publish(Some("0042")).await;
    let after_0042 = publish(None).await;

    let (mut c, hello) = resume(gw, "admin", &token, &numbered).await;
    assert_eq!(hello["recovered"], true, "{hello}");
    let replayed = ids(&c.drain(Duration::from_millis(400)).await);
    assert_eq!(replayed[0], after_numbered, "{replayed:?}");

    let (mut c, hello) = resume(gw, "admin", &token, &padded).await;
    assert_eq!(hello["recovered"], false, "{padded} is no event: {hello}");
    assert!(
        c.next_json_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing replayed after {padded}"
    );

    let (mut c, hello) = resume(gw, "admin", &token, "0042").await;
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(
        ids(&c.drain(Duration::from_millis(400)).await),
        vec![after_0042]
    );
}

/// A user's channel and the tenant's staff channel keep history in their
/// own scopes: a resuming staff connection gets its user's and its
/// tenant's events, whatever their branch, and nobody else's.
async fn a_users_and_the_tenants_staff_events_are_replayed(gw: &TestGateway) {
    let token = staff(31, 1, &[5], &["KITCHEN"]);
    let (mut c, _) = gw.join("kitchen", &token).await;
    let ev = |tenant: i64, branch: i64, id: &str| json!({"type": "SERVICE_CALL_CREATED", "tenant_id": tenant, "branch_id": branch, "event_id": id});
    gw.publish_one("channel:user:31", ev(1, 5, "u31-cursor"))
        .await;
    assert_eq!(c.next_json().await.unwrap()["event_id"], "u31-cursor");
    drop(c);
    for (channel, event) in [
        ("channel:user:31", ev(1, 9, "u31-other-branch")),
        ("channel:user:32", ev(1, 5, "u32")),
        ("channel:user:31", ev(2, 5, "u31-of-tenant-2")),
        ("channel:tenant:staff", ev(1, 9, "staff-1")),
        ("channel:tenant:staff", ev(2, 5, "staff-2")),
        ("channel:session:77", ev(1, 5, "diners")),
        ("channel:branch:5:kitchen", ev(1, 5, "kitchen-5")),
    ] {
        gw.publish_one(channel, event).await;
    }
    let (mut c, hello) = resume(gw, "kitchen", &token, "u31-cursor").await;
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(
        ids(&c.drain(Duration::from_millis(400)).await),
        vec!["u31-other-branch", "staff-1", "kitchen-5"]
    );
    // Tenant 2's user 31 has its own history: the cursor is unknown there.
    let (_, hello) = resume(
        gw,
        "kitchen",
        &staff(31, 2, &[5], &["KITCHEN"]),
        "u31-cursor",
    )
    .await;
    assert_eq!(hello["recovered"], false, "{hello}");
}

/// With `WSGATEWAY_RESUME_MAX_EVENTS` = 5: an admin of branches 5 and 6
/// that missed 6 events (both scopes together) is not recovered, though
/// history holds them all; 5 are replayed.
async fn a_resume_beyond_its_bound_is_not_recovered(gw: &TestGateway) {
    let token = staff(11, 1, &[5, 6], &["ADMIN"]);
    let publish = |b: i64| {
        gw.publish_one(
            if b == 5 {
                "channel:branch:5:admin"
            } else {
                "channel:branch:6:admin"
            },
            event("ROUND_READY", 1, b),
        )
    };
    let (mut watcher, _) = gw.join("admin", &staff(12, 1, &[5, 6], &["ADMIN"])).await;
    let cursor = publish(5).await;
    let mut last = String::new();
    for b in [5, 6, 5, 6, 5, 6] {
        last = publish(b).await;
    }
    dispatched(&mut watcher, &last).await;
    let (mut c, hello) = resume(gw, "admin", &token, &cursor).await;
    assert_eq!(
        hello["recovered"], false,
        "6 events after the cursor: {hello}"
    );
    assert!(
        c.next_json_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing replayed"
    );
    let cursor = publish(6).await;
    let mut missed = Vec::new();
    for b in [5, 6, 6, 5, 5] {
        missed.push(publish(b).await);
    }
    dispatched(&mut watcher, missed.last().unwrap()).await;
    let (mut c, hello) = resume(gw, "admin", &token, &cursor).await;
    assert_eq!(
        hello["recovered"], true,
        "5 events after the cursor: {hello}"
    );
    assert_eq!(ids(&c.drain(Duration::from_millis(400)).await), missed);
}

#[tokio::test]
async fn resume_reads_at_most_resume_max_events() {
    let bounded = |c: &mut wsgateway::Config| {
        c.history_size = 50;
        c.resume_max_events = Some(5);
    };
    let gw = TestGateway::start_with(bounded).await;
    a_resume_beyond_its_bound_is_not_recovered(&gw).await;
    gw.stop().await;
    let server = RedisServer::start();
    let gw = TestGateway::start_with(|c| {
        bounded(c);
        c.redis_url = Some(Secret(server.url()));
    })
    .await;
    gw.wait_connected().await;
    a_resume_beyond_its_bound_is_not_recovered(&gw).await;
    gw.stop().await;
}

/// One place for history reads, a wait of 0.3 s for it, and Redis busy
/// for 2 s (a script spinning): of two clients resuming at once, one gets
/// the place and is recovered once Redis answers; the other is not
/// recovered, after waiting for the place in vain.
#[tokio::test]
async fn resumes_wait_for_a_place_among_history_reads() {
    let server = RedisServer::start();
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(server.url()));
        c.resume_concurrency = 1;
        c.resume_wait_s = Secs(Duration::from_millis(300));
        c.redis_timeout_s = Secs(Duration::from_secs(5));
    })
    .await;
    gw.wait_connected().await;
    let cursor = gw
        .publish_one("channel:branch:5:waiters", event("ROUND_READY", 1, 5))
        .await;
    let missed = gw
        .publish_one("channel:branch:5:waiters", event("ROUND_READY", 1, 5))
        .await;
    let client = redis::Client::open(server.url()).unwrap();
    // Both connections made before Redis is busy (connecting talks to it).
    let mut busy = client.get_connection().unwrap();
    let mut probe = client.get_connection().unwrap();
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let spin = std::thread::spawn(move || {
        let script = "local t = redis.call('TIME') local start = t[1] * 1000000 + t[2] \
            while true do local n = redis.call('TIME') \
            if n[1] * 1000000 + n[2] - start > 2000000 then return 1 end end";
        let _: i64 = redis::cmd("EVAL")
            .arg(script)
            .arg(0)
            .query(&mut busy)
            .unwrap();
    });
    // Busy: a PING goes unanswered.
    let deadline = std::time::Instant::now() + WAIT;
    while redis::cmd("PING").query::<String>(&mut probe).is_ok() {
        assert!(std::time::Instant::now() < deadline, "Redis never got busy");
    }
    let (a, b) = (
        staff(21, 1, &[5], &["WAITER"]),
        staff(22, 1, &[5], &["WAITER"]),
    );
    let ((mut ca, ha), (mut cb, hb)) = tokio::join!(
        resume(&gw, "waiter", &a, &cursor),
        resume(&gw, "waiter", &b, &cursor)
    );
    spin.join().unwrap();
    let mut outcomes = [ha["recovered"].clone(), hb["recovered"].clone()];
    outcomes.sort_by_key(|v| v.to_string());
    assert_eq!(outcomes, [json!(false), json!(true)], "{ha} {hb}");
    let winner = if ha["recovered"] == true {
        &mut ca
    } else {
        &mut cb
    };
    assert_eq!(
        ids(&winner.drain(Duration::from_millis(300)).await),
        vec![missed]
    );
    gw.stop().await;
}

async fn all_scenarios(gw: &TestGateway) {
    missed_events_are_replayed_in_order_then_live(gw).await;
    events_published_during_the_replay_are_neither_lost_nor_repeated(gw).await;
    caller_ids_are_cursors_and_other_audiences_never_leak(gw).await;
    a_cursor_means_exactly_its_text(gw).await;
    a_users_and_the_tenants_staff_events_are_replayed(gw).await;
}

fn history(c: &mut wsgateway::Config) {
    c.history_size = 1000;
}

#[tokio::test]
async fn embedded_mode() {
    let gw = TestGateway::start_with(history).await;
    all_scenarios(&gw).await;
    gw.stop().await;
    let small = TestGateway::start_with(|c| c.history_size = 50).await;
    exhausted_or_unknown_history_is_not_recovered(&small).await;
    a_gap_in_any_scope_is_not_recovered(&small).await;
    small.stop().await;
}

#[tokio::test]
async fn redis_mode() {
    let server = RedisServer::start();
    let gw = TestGateway::start_with(|c| c.redis_url = Some(Secret(server.url()))).await;
    gw.wait_connected().await;
    all_scenarios(&gw).await;
    gw.stop().await;
    let small = RedisServer::start();
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(small.url()));
        c.history_size = 50;
    })
    .await;
    gw.wait_connected().await;
    exhausted_or_unknown_history_is_not_recovered(&gw).await;
    a_gap_in_any_scope_is_not_recovered(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn history_expires_after_its_ttl() {
    let gw = TestGateway::start_with(|c| c.history_ttl_s = Secs(Duration::from_millis(500))).await;
    let token = waiter_token();
    let (mut c, _) = gw.join("waiter", &token).await;
    let first = publish_mixed(&gw, 1, "old").await;
    assert_eq!(c.next_json().await.unwrap()["event_id"], first[0].as_str());
    drop(c);
    publish_mixed(&gw, 1, "missed").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, hello) = resume(&gw, "waiter", &token, &first[0]).await;
    assert_eq!(hello["recovered"], false);
    gw.stop().await;
}

#[tokio::test]
async fn resume_across_a_restart_and_across_nodes() {
    let server = RedisServer::start();
    let node = || TestGateway::start_with(|c| c.redis_url = Some(Secret(server.url())));
    let token = waiter_token();
    let gw1 = node().await;
    gw1.wait_connected().await;
    let (mut c, _) = gw1.join("waiter", &token).await;
    let first = publish_mixed(&gw1, 1, "a").await;
    assert_eq!(c.next_json().await.unwrap()["event_id"], first[0].as_str());
    drop(c);
    let missed = publish_mixed(&gw1, 20, "b").await;
    gw1.stop().await;

    // The same node, restarted.
    let gw2 = node().await;
    gw2.wait_connected().await;
    let (mut c, hello) = resume(&gw2, "waiter", &token, &first[0]).await;
    assert_eq!(hello["recovered"], true);
    assert_eq!(ids(&c.drain(Duration::from_millis(400)).await), missed);
    drop(c);

    // Another node of the same cluster.
    let gw3 = node().await;
    gw3.wait_connected().await;
    let more = publish_mixed(&gw2, 5, "c").await;
    let (mut c, hello) = resume(&gw3, "waiter", &token, missed.last().unwrap()).await;
    assert_eq!(hello["recovered"], true);
    assert_eq!(ids(&c.drain(Duration::from_millis(400)).await), more);
    gw2.stop().await;
    gw3.stop().await;
}

#[tokio::test]
async fn events_a_backend_publishes_directly_flow_live_without_ids() {
    let server = RedisServer::start();
    let gw = TestGateway::start_with(|c| c.redis_url = Some(Secret(server.url()))).await;
    gw.wait_connected().await;
    let token = waiter_token();
    let (mut c, _) = gw.join("waiter", &token).await;
    let first = publish_mixed(&gw, 1, "api").await;
    assert_eq!(c.next_json().await.unwrap()["event_id"], first[0].as_str());
    server.publish(
        "channel:branch:5:waiters",
        &event("ROUND_READY", 1, 5).to_string(),
    );
    let legacy = c.next_json().await.unwrap();
    assert_eq!(legacy["type"], "ROUND_READY");
    assert!(legacy.get("event_id").is_none(), "forwarded as published");
    drop(c);
    server.publish(
        "channel:branch:5:waiters",
        &event("ROUND_SERVED", 1, 5).to_string(),
    );
    let missed = publish_mixed(&gw, 1, "api2").await;
    let (mut c, hello) = resume(&gw, "waiter", &token, &first[0]).await;
    assert_eq!(hello["recovered"], true);
    assert_eq!(
        ids(&c.drain(Duration::from_millis(400)).await),
        missed,
        "direct PUBLISHes are not replayed"
    );
    gw.stop().await;
}
