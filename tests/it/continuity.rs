//! Continuity that never lies (issue #28), against real `redis-server`
//! processes: numbers never given twice across a restore from an older
//! snapshot or a `FLUSHALL`; a resume says `recovered: true` only when it
//! replays everything after its cursor; nothing published on Redis makes a
//! node deaf; deployments on one server kept apart by their prefix; and a
//! retried caller `event_id` publishes nothing twice.

use crate::common;

use std::time::{Duration, Instant};

use common::redis_server::*;
use common::*;
use serde_json::{Value, json};
use wsgateway::broker::RedisChannelKey;
use wsgateway::config::Secret;

const SESSION: &str = "channel:session:77";

fn diner_token() -> String {
    diner(1, 5, 3, 77)
}

fn paid(n: &str) -> Value {
    json!({"type": "PAYMENT_APPROVED", "tenant_id": 1, "branch_id": 5, "session_id": 77, "n": n})
}

fn number(id: &str) -> u64 {
    id.parse()
        .unwrap_or_else(|_| panic!("{id:?} is not a gateway number"))
}

async fn redis_gateway(url: String, prefix: Option<&str>) -> TestGateway {
    let prefix = prefix.map(|p| p.parse().unwrap());
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(url));
        c.redis_prefix = prefix;
    })
    .await;
    gw.wait_connected().await;
    gw
}

/// Publishes one event, retrying while the broker answers 503 (Redis just
/// came back; the command connection reconnects).
async fn publish_retrying(gw: &TestGateway, channel: &str, event: Value) -> String {
    let started = Instant::now();
    loop {
        let (status, body) = gw
            .publish(&json!({"channel": channel, "event": event}))
            .await;
        if status == 202 {
            return body["event_ids"][0].as_str().unwrap().to_owned();
        }
        assert!(
            status == 503 && started.elapsed() < Duration::from_secs(15),
            "{status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The event ids a client receives until `quiet` passes with none.
async fn ids(client: &mut Client, quiet: Duration) -> Vec<String> {
    client
        .drain(quiet)
        .await
        .into_iter()
        .map(|v| v["event_id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Waits until `client` has received every id in `expected` (and nothing
/// else), in order.
async fn receives(client: &mut Client, expected: &[String]) {
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let frame = client.next_json().await.expect("an event");
        got.push(frame["event_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, expected);
}

#[tokio::test]
async fn a_restore_from_an_older_snapshot_reuses_no_number_and_never_lies() {
    let _heavy = common::heavy().await;
    let mut server = RedisServer::start();
    let gw = redis_gateway(server.url(), None).await;
    let e1 = publish_retrying(&gw, SESSION, paid("E1")).await;
    let _: () = server.query(&redis::cmd("SAVE")).unwrap();
    let (mut diner, _) = gw.join("diner", &diner_token()).await;
    let mut seen = Vec::new();
    for n in ["E2", "E3", "E4", "E5"] {
        seen.push(gw.publish_one(SESSION, paid(n)).await);
    }
    receives(&mut diner, &seen).await;
    drop(diner);
    let cursor = seen.last().unwrap().clone();

    // Redis crashes and starts again from the snapshot: E2–E5 are gone.
    server.kill();
    server.restart();
    gw.wait_connected().await;
    let (mut live, _) = gw.join("diner", &diner_token()).await;
    let mut after = Vec::new();
    for n in ["F1", "F2", "F3", "F4", "F5", "F6"] {
        after.push(publish_retrying(&gw, SESSION, paid(n)).await);
    }
    // Until a live client has had all six, the subscriber may still be
    // catching up after the restart (a resync notice, a gap fill): what it
    // sends late would reach the clients below and read as a replay.
    let mut live_ids = Vec::new();
    while !after.iter().all(|f| live_ids.contains(f)) {
        let frame = live
            .next_json()
            .await
            .expect("the events after the restore");
        live_ids.extend(frame["event_id"].as_str().map(str::to_owned));
    }
    drop(live);
    let before: Vec<&String> = std::iter::once(&e1).chain(&seen).collect();
    for f in &after {
        assert!(
            before.iter().all(|e| number(e) < number(f)),
            "{f} reuses or undercuts a number of {before:?}"
        );
    }
    // The lost cursor, and a cursor the snapshot kept but after which events
    // were lost: neither can be vouched for.
    for from in [&cursor, &e1] {
        let (mut c, hello) = gw.join_from("diner", &diner_token(), from).await;
        assert_eq!(hello["recovered"], false, "from {from}: {hello}");
        assert!(ids(&mut c, Duration::from_millis(300)).await.is_empty());
    }
    // A cursor from after the restore replays exactly what followed it.
    let (mut c, hello) = gw.join_from("diner", &diner_token(), &after[0]).await;
    assert_eq!(hello["recovered"], true, "{hello}");
    assert_eq!(ids(&mut c, Duration::from_millis(300)).await, after[1..]);
    gw.stop().await;
}

#[tokio::test]
async fn flushall_reuses_no_number_and_old_cursors_are_not_recovered() {
    let server = RedisServer::start();
    let gw = redis_gateway(server.url(), None).await;
    let mut old = Vec::new();
    for n in ["E1", "E2", "E3"] {
        old.push(gw.publish_one(SESSION, paid(n)).await);
    }
    let _: () = server.query(&redis::cmd("FLUSHALL")).unwrap();
    let f1 = gw.publish_one(SESSION, paid("F1")).await;
    assert!(old.iter().all(|e| number(e) < number(&f1)), "{f1} {old:?}");
    let (_, hello) = gw.join_from("diner", &diner_token(), &old[1]).await;
    assert_eq!(hello["recovered"], false, "{hello}");
    gw.stop().await;
}

#[tokio::test]
async fn stray_messages_on_the_gateways_channels_silence_nothing() {
    let server = RedisServer::start();
    let gw = redis_gateway(server.url(), None).await;
    let (mut waiter, _) = gw.join("waiter", &staff(7, 1, &[5], &["WAITER"])).await;
    // Its branch, user and staff: the node hears the branch's channel now.
    gw.wait_scopes(3).await;
    let channel = "wsgateway:events:{1}:branch:5";
    let frame = |tenant: i64| {
        json!({"type": "ROUND_READY", "tenant_id": tenant, "branch_id": 5, "event_id": "stray"})
            .to_string()
    };
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    // What the function would sign, had it published these (the test holds
    // the deployment's key: it derives it from the gateway's secret).
    let key = RedisChannelKey::derive(TABLE_SECRET, "");
    let signed = |channel: &str, n: u64, channels: &str, frame: &str| {
        let n = n.to_string();
        let signature = key.sign(channel, &n, channels, frame);
        format!("{n}\n{channels}\n{signature}\n{frame}")
    };
    let waiters = "channel:branch:5:waiters";
    let far = now_us + 3_600_000_000;
    let zeros = "0".repeat(40);
    let strays = [
        // Unsigned: a number far ahead, the largest, a plausible one.
        format!("{far}\n{waiters}\n{zeros}\n{}", frame(1)),
        format!("18446744073709551615\n{waiters}\nbad\n{}", frame(1)),
        format!("{now_us}\n{waiters}\n{}\n{}", "f".repeat(40), frame(1)),
        // Signed for another channel than the one it came on.
        signed("wsgateway:events:{1}:branch:6", now_us, waiters, &frame(1)),
        // Not the shape the function publishes.
        "garbage".to_owned(),
        format!("{now_us}\nchannel:nope\nsig\n{}", frame(1)),
        // Signed, but another tenant's event on tenant 1's channel, or a
        // channel of another scope.
        signed(channel, now_us, waiters, &frame(2)),
        signed(channel, now_us, "channel:branch:6:waiters", &frame(1)),
        // Signed, with a number beyond Redis's clock.
        signed(channel, far, waiters, &frame(1)),
    ];
    for payload in &strays {
        server.publish(channel, payload);
    }
    // A forged numbered message on a seed channel too.
    server.publish(
        waiters,
        &format!("{now_us}\n{waiters}\n{zeros}\n{}", frame(1)),
    );
    for (reason, count) in [
        ("unsigned", 5.0),
        ("invalid", 4.0),
        ("untrusted_number", 1.0),
    ] {
        gw.wait_metric(
            &format!("wsgateway_events_dropped_total{{reason=\"{reason}\"}}"),
            |n| n == count,
        )
        .await;
    }
    // Later events flow, through the API and the function alike.
    let a = gw.publish_one(waiters, event("ROUND_READY", 1, 5)).await;
    let b = fcall(&server.url(), &[waiters], &event("ROUND_SERVED", 1, 5)).unwrap();
    assert_eq!(ids(&mut waiter, Duration::from_millis(500)).await, [a, b]);
    let (_, health) = gw.get_json("/ws/health/detailed").await;
    assert_eq!(health["status"], "healthy", "{health}");
    gw.stop().await;
}

#[tokio::test]
async fn another_database_without_a_prefix_is_refused_at_start() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgateway"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("JWT_SECRET", "a-staff-secret-for-tests")
        .env("TABLE_TOKEN_SECRET", "a-table-secret-for-tests")
        .env("WSGATEWAY_LISTEN", "127.0.0.1:0")
        .env("REDIS_URL", "redis://127.0.0.1:6379/1")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("WSGATEWAY_REDIS_PREFIX"), "{stderr}");
}

#[tokio::test]
async fn deployments_on_one_server_never_meet() {
    let server = RedisServer::start();
    let base = server.url();
    let prod = redis_gateway(format!("{base}/0"), Some("prod")).await;
    let staging = redis_gateway(format!("{base}/1"), Some("staging")).await;
    let bare = redis_gateway(base.clone(), None).await;
    let token = staff(7, 1, &[5], &["WAITER"]);
    let (mut at_prod, _) = prod.join("waiter", &token).await;
    let (mut at_staging, _) = staging.join("waiter", &token).await;
    let (mut at_bare, _) = bare.join("waiter", &token).await;
    let channel = "channel:branch:5:waiters";
    let quiet = Duration::from_millis(400);

    // Through the publish API.
    let p = prod.publish_one(channel, event("ROUND_READY", 1, 5)).await;
    let s = staging
        .publish_one(channel, event("ROUND_READY", 1, 5))
        .await;
    assert_eq!(ids(&mut at_prod, quiet).await, std::slice::from_ref(&p));
    assert_eq!(ids(&mut at_staging, quiet).await, [s]);
    assert!(ids(&mut at_bare, quiet).await.is_empty());

    // Through each deployment's function.
    let (f, status) = fcall_as(
        &base,
        "staging_wsgateway_publish",
        &[channel],
        &event("ROUND_SERVED", 1, 5),
    )
    .unwrap();
    assert_eq!(status, "published");
    assert!(
        fcall_as(&base, "wsgateway_publish", &[channel], &event("X", 1, 5)).is_ok(),
        "the bare deployment has its own"
    );
    assert_eq!(ids(&mut at_staging, quiet).await, [f]);
    assert!(ids(&mut at_prod, quiet).await.is_empty());
    assert_eq!(ids(&mut at_bare, quiet).await.len(), 1);

    // Through plain PUBLISH on each deployment's seed channel.
    let plain = |id: &str| {
        json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "event_id": id}).to_string()
    };
    server.publish("prod:channel:branch:5:waiters", &plain("to-prod"));
    server.publish(channel, &plain("to-bare"));
    assert_eq!(ids(&mut at_prod, quiet).await, ["to-prod"]);
    assert_eq!(ids(&mut at_bare, quiet).await, ["to-bare"]);
    assert!(ids(&mut at_staging, quiet).await.is_empty());

    // Each keeps its own history: a cursor of one is unknown to the other.
    let (_, hello) = staging.join_from("waiter", &token, &p).await;
    assert_eq!(hello["recovered"], false, "{hello}");
    let (_, hello) = prod.join_from("waiter", &token, &p).await;
    assert_eq!(hello["recovered"], true, "{hello}");
    let keys: Vec<String> = server.query(redis::cmd("KEYS").arg("*")).unwrap();
    for key in &keys {
        assert!(
            key.starts_with("prod:wsgateway:")
                || key.starts_with("staging:wsgateway:")
                || key.starts_with("wsgateway:"),
            "{key}"
        );
    }
    for gw in [prod, staging, bare] {
        gw.stop().await;
    }
}

/// Publish `pay-77` (the client sees it and leaves), publish X, publish
/// `pay-77` again: the retry publishes nothing, and a resume from `pay-77`
/// replays X.
async fn a_retried_caller_id_hides_nothing(gw: &TestGateway) {
    let (mut diner, _) = gw.join("diner", &diner_token()).await;
    let mut first = paid("first");
    first["event_id"] = json!("pay-77");
    let (status, body) = gw
        .publish(&json!({"channel": SESSION, "event": first}))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["duplicates"], json!([false]), "{body}");
    assert_eq!(
        ids(&mut diner, Duration::from_millis(300)).await,
        ["pay-77"]
    );
    drop(diner);
    let x = gw.publish_one(SESSION, paid("X")).await;
    let mut retry = paid("retry");
    retry["event_id"] = json!("pay-77");
    let (status, body) = gw
        .publish(&json!({"channel": SESSION, "event": retry}))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["event_ids"], json!(["pay-77"]), "{body}");
    assert_eq!(body["duplicates"], json!([true]), "{body}");
    let (mut c, hello) = gw.join_from("diner", &diner_token(), "pay-77").await;
    assert_eq!(hello["recovered"], true, "{hello}");
    let replayed = c.drain(Duration::from_millis(300)).await;
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    assert_eq!(replayed[0]["event_id"], json!(x));
    assert_eq!(replayed[0]["n"], "X");
    gw.assert_metric("wsgateway_publish_duplicates_total", 1.0)
        .await;
}

#[tokio::test]
async fn a_retried_caller_id_hides_nothing_embedded() {
    let gw = TestGateway::start().await;
    a_retried_caller_id_hides_nothing(&gw).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_retried_caller_id_hides_nothing_through_redis() {
    let server = RedisServer::start();
    let gw = redis_gateway(server.url(), None).await;
    a_retried_caller_id_hides_nothing(&gw).await;
    // The function says so too.
    let mut again = paid("again");
    again["event_id"] = json!("pay-77");
    let (id, status) = fcall_as(&server.url(), "wsgateway_publish", &[SESSION], &again).unwrap();
    assert_eq!((id.as_str(), status.as_str()), ("pay-77", "duplicate"));
    gw.stop().await;
}

/// A `PUBLISH` on `channel` as the user of `url`, of a message in the
/// function's shape.
fn publish_raw(url: &str, channel: &str) -> redis::RedisResult<i64> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_connection()?;
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg("1\nchannel:branch:5:waiters\nsig\n{}")
        .query(&mut conn)
}

/// Asserts that Redis refused a command for the user's ACL.
fn no_permission<T: std::fmt::Debug>(result: redis::RedisResult<T>) {
    let refused = result.unwrap_err();
    assert!(
        refused.to_string().to_uppercase().contains("NOPERM"),
        "{refused}"
    );
}

/// The ACL lines of docs/REDIS.md, as written there.
fn readme_acl() -> Vec<String> {
    let readme = include_str!("../../docs/REDIS.md");
    let start = readme
        .find("<!-- acl:begin -->")
        .expect("docs/REDIS.md's ACL block");
    let end = readme
        .find("<!-- acl:end -->")
        .expect("docs/REDIS.md's ACL block");
    readme[start..end]
        .lines()
        .filter(|l| l.starts_with("ACL SETUSER"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn the_readme_acl_users_publish_as_it_says() {
    let server = RedisServer::start();
    let gw = redis_gateway(server.url(), None).await;
    let lines = readme_acl();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        let mut cmd = redis::cmd("ACL");
        for word in line.split_whitespace().skip(1) {
            cmd.arg(word);
        }
        let _: () = server.query(&cmd).unwrap();
    }
    let (mut waiter, _) = gw.join("waiter", &staff(7, 1, &[5], &["WAITER"])).await;
    // The node follows its audience: its scopes (branch, user, staff).
    gw.wait_scopes(3).await;
    let url = |user: &str| format!("redis://{user}:{user}-secret@127.0.0.1:{}", server.port);
    let plain = |id: &str| {
        json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "event_id": id}).to_string()
    };
    let channel = "channel:branch:5:waiters";
    let gateway_channel = "wsgateway:events:{1}:branch:5";

    // publisher: the seed's channels only.
    assert_eq!(publish_to(&url("publisher"), channel, &plain("p1")), 1);
    no_permission(publish_raw(&url("publisher"), gateway_channel));
    no_permission(fcall(&url("publisher"), &[channel], &event("X", 1, 5)));

    // backend: the seed's channels, the function, and so the gateway's
    // channels; but what it publishes there itself is not signed.
    assert_eq!(publish_to(&url("backend"), channel, &plain("b1")), 1);
    let f = fcall(&url("backend"), &[channel], &event("ROUND_SERVED", 1, 5)).unwrap();
    // What looks like the function's, on a seed channel or on the scope's
    // channel, but is not signed by it, is dropped.
    assert_eq!(publish_raw(&url("backend"), gateway_channel).unwrap(), 1);
    let forged = format!("99999999999999\n{channel}\n{}\n{{}}", "0".repeat(40));
    publish_to(&url("backend"), channel, &forged);
    publish_to(&url("publisher"), channel, "12\ngarbage");
    let after = gw.publish_one(channel, event("ROUND_READY", 1, 5)).await;
    assert_eq!(
        ids(&mut waiter, Duration::from_millis(500)).await,
        ["p1".to_owned(), "b1".to_owned(), f, after]
    );
    gw.assert_metric("wsgateway_events_dropped_total{reason=\"unsigned\"}", 2.0)
        .await;
    gw.assert_metric("wsgateway_events_dropped_total{reason=\"invalid\"}", 1.0)
        .await;
    // backend may ask for an acknowledgement (the function keeps its
    // state and deadline), and the waiter's ack counts.
    let mut asked = event("ROUND_READY", 1, 5);
    asked["ack"] = json!({"within_s": 30});
    let acked = fcall(&url("backend"), &[channel], &asked).unwrap();
    assert_eq!(
        ids(&mut waiter, Duration::from_millis(500)).await,
        std::slice::from_ref(&acked)
    );
    waiter
        .send_text(&json!({"type": "ack", "event_ids": [acked]}).to_string())
        .await;
    gw.wait_metric("wsgateway_acks_total{outcome=\"acknowledged\"}", |v| {
        v == 1.0
    })
    .await;
    gw.stop().await;
}
