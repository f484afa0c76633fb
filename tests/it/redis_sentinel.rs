//! Redis Sentinel: a real group (master, replica, three sentinels) started
//! by the test on loopback. The master is killed, or demoted by a manual
//! failover, while clients are connected and events are published: every
//! event published before, during (the publish API retried with its
//! `event_id` while it answers 503/504) and after the failover reaches the
//! connected clients once and in order, health names the new master, and a
//! resumed client gets what history kept.
//!
//! The sentinel helpers block (std threads, sync Redis clients), so these
//! tests run on a multi-threaded runtime.

use crate::common;

use std::time::{Duration, Instant};

use common::sentinel::{MASTER_NAME, SentinelGroup};
use common::*;
use serde_json::{Value, json};
use wsgateway::config::{RedisMode, Secret, Secs};

/// Every test here is over within this.
const BOUND: Duration = Duration::from_secs(60);

fn numbered(n: usize) -> Value {
    json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "n": n,
           "event_id": format!("ev-{n}"), "ts": wsgateway::event::unix_ms()})
}

async fn start_gateway(group: &SentinelGroup) -> TestGateway {
    let urls = group.urls();
    let password = group.password.clone();
    TestGateway::start_with(move |c| {
        c.redis_mode = RedisMode::Sentinel;
        c.redis_url = Some(Secret(urls));
        c.redis_sentinel_master = Some(MASTER_NAME.into());
        c.redis_password = Some(Secret(password));
        c.redis_timeout_s = Secs(Duration::from_secs(1));
        c.revoked_jti_key = Some("revoked:jti".into());
        // Events are at most a failover old when they arrive.
        c.stale_event_s = Secs(Duration::from_secs(60));
    })
    .await
}

/// Publishes event `n` through the API until it is accepted; 503 and 504
/// are retried (the `event_id` makes a retry safe). Returns the attempts.
async fn publish_until_accepted(gw: &TestGateway, n: usize, started: Instant) -> usize {
    let body = json!({"channel": "channel:branch:5:waiters", "event": numbered(n)});
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (status, reply) = gw.publish(&body).await;
        match status {
            202 => return attempts,
            503 | 504 => {}
            other => panic!("event {n}: unexpected {other} {reply}"),
        }
        assert!(
            started.elapsed() < BOUND,
            "event {n} still refused: {status} {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `n` of each event frame until `count` have arrived (or `within`).
async fn collect(client: &mut Client, count: usize, within: Duration) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < count {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(frame) = client.next_json_within(left).await else {
            break;
        };
        if let Some(n) = frame["n"].as_u64() {
            got.push(n);
        }
    }
    // Anything more would be a duplicate.
    while let Some(frame) = client.next_json_within(Duration::from_millis(300)).await {
        if let Some(n) = frame["n"].as_u64() {
            got.push(n);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_follows_a_failover_when_the_master_dies() {
    let _heavy = common::heavy().await;
    let started = Instant::now();
    let mut group = SentinelGroup::start("redis-pw");
    let old = group.master.addr();
    let new = group.replica.addr();
    let gw = start_gateway(&group).await;
    let (_, health) = gw
        .wait_health(Duration::from_secs(15), |s, b| {
            s == 200 && b["status"] == "healthy"
        })
        .await;
    assert_eq!(health["broker"]["master"], old.as_str(), "{health}");
    let (mut waiter, _) = gw.join("waiter", &staff(1, 1, &[5], &["WAITER"])).await;

    for n in 1..=5 {
        publish_until_accepted(&gw, n, started).await;
    }
    assert_eq!(
        collect(&mut waiter, 5, Duration::from_secs(5)).await,
        (1..=5).collect::<Vec<u64>>()
    );
    // Nothing the old master acknowledged is missing on the replica.
    common::sentinel::wait(Duration::from_secs(10), "the replica in sync", || {
        group.replica_in_sync(&group.master, &group.replica)
    });

    let killed = Instant::now();
    group.master.kill();
    // Published while the sentinels notice and promote the replica.
    let mut retried = 0;
    for n in 6..=15 {
        retried += publish_until_accepted(&gw, n, started).await - 1;
    }
    let (_, health) = gw
        .wait_health(Duration::from_secs(20), |s, b| {
            s == 200 && b["broker"]["master"] == new.as_str() && b["status"] == "healthy"
        })
        .await;
    let followed = killed.elapsed();
    assert_eq!(health["broker"]["status"], "connected", "{health}");
    for n in 16..=20 {
        publish_until_accepted(&gw, n, started).await;
    }
    let got = collect(&mut waiter, 15, Duration::from_secs(10)).await;
    assert_eq!(
        got,
        (6..=20).collect::<Vec<u64>>(),
        "each event once, in order"
    );
    println!(
        "measured: followed the new master {followed:?} after the kill; {retried} publish retries"
    );
    group.wait_master(&new, Duration::from_secs(10));

    // A client that resumes from event 3, given by the old master, is not
    // vouched for: a promoted replica may lack what the old master wrote
    // last, and the gateway cannot tell a failover that lost nothing from
    // one that did (PROTOCOL.md §14).
    let resume_from = |cursor: &str| {
        format!(
            "ws://{}/ws/waiter?token={}&last_event_id={cursor}",
            gw.addr,
            staff(2, 1, &[5], &["WAITER"])
        )
    };
    let mut resumed = Client::open(&resume_from("ev-3"), None).await;
    let hello = resumed.next_json().await.unwrap();
    assert_eq!(hello["recovered"], false, "{hello}");
    // One from after the failover gets what followed it, from the new
    // master's history.
    let mut resumed = Client::open(&resume_from("ev-17"), None).await;
    let hello = resumed.next_json().await.unwrap();
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(
        collect(&mut resumed, 3, Duration::from_secs(5)).await,
        (18..=20).collect::<Vec<u64>>()
    );
    // Revocation checks read the new master.
    let _: i64 = group
        .replica
        .query(redis::cmd("SADD").arg("revoked:jti").arg("1:jti-gone"))
        .unwrap();
    let token = wsgateway::auth::mint(
        JWT_SECRET,
        &json!({"sub": 3, "tenant_id": 1, "branch_ids": [5], "roles": ["WAITER"],
                "exp": wsgateway::auth::unix_now() + 3600, "jti": "jti-gone"}),
    );
    let mut refused = gw.connect("waiter", &token).await;
    assert_eq!(refused.close_code().await, Some(4001));
    gw.stop().await;
    assert!(started.elapsed() < BOUND, "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demoted_master_is_left_for_the_promoted_replica() {
    let _heavy = common::heavy().await;
    let started = Instant::now();
    let group = SentinelGroup::start("redis-pw");
    let old = group.master.addr();
    let new = group.replica.addr();
    let gw = start_gateway(&group).await;
    gw.wait_health(Duration::from_secs(15), |s, b| {
        s == 200 && b["broker"]["master"] == old.as_str()
    })
    .await;
    let (mut kitchen, _) = gw.join("waiter", &staff(1, 1, &[5], &["WAITER"])).await;
    publish_until_accepted(&gw, 1, started).await;
    assert_eq!(
        collect(&mut kitchen, 1, Duration::from_secs(5)).await,
        vec![1]
    );
    common::sentinel::wait(Duration::from_secs(10), "the replica in sync", || {
        group.replica_in_sync(&group.master, &group.replica)
    });

    // Both stay up: the old master becomes a replica under the gateway's
    // open connections.
    let () = group.sentinels[0]
        .query(redis::cmd("SENTINEL").arg("failover").arg(MASTER_NAME))
        .unwrap();
    group.wait_master(&new, Duration::from_secs(20));
    // The health check asks the sentinels every second: the gateway moves
    // although the old master still answers. (Writes the old master takes
    // before the sentinels demote it are lost when it resyncs: Redis's own
    // window, which the gateway narrows to one health-check period.)
    let moved = Instant::now();
    gw.wait_health(Duration::from_secs(10), |s, b| {
        s == 200 && b["broker"]["master"] == new.as_str() && b["status"] == "healthy"
    })
    .await;
    println!(
        "measured: moved to the promoted replica {:?} after the sentinels named it",
        moved.elapsed()
    );
    for n in 2..=6 {
        publish_until_accepted(&gw, n, started).await;
    }
    assert_eq!(
        collect(&mut kitchen, 5, Duration::from_secs(10)).await,
        (2..=6).collect::<Vec<u64>>()
    );
    // The events are on the new master, not lost on the demoted one.
    let kept: i64 = group
        .replica
        .query(redis::cmd("XLEN").arg("wsgateway:{1}:history:branch:5"))
        .unwrap();
    assert_eq!(kept, 6);
    gw.stop().await;
    assert!(started.elapsed() < BOUND, "took {:?}", started.elapsed());
}
