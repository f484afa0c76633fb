//! Sector assignments from a real PostgreSQL (PROTOCOL.md §13): waiters hear
//! their sectors only; changes follow `refresh_sectors` and
//! `SECTOR_ASSIGNMENT_CHANGED`; a database that is down, unreachable or slow
//! means branch-wide delivery without delaying the handshake past the
//! timeout; and the cache saves repeated queries.

use crate::common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::postgres::*;
use common::*;
use serde_json::{Value, json};
use wsgateway::config::{Secret, Secs};

const B: i64 = 5;

async fn gateway(configure: impl FnOnce(&mut wsgateway::Config)) -> TestGateway {
    TestGateway::start_with(|c| {
        c.database_url = Some(Secret(database_url()));
        configure(c);
    })
    .await
}

fn ev(tenant: i64, tag: &str, sector: Option<i64>) -> Value {
    let mut e =
        json!({"type": "SERVICE_CALL_CREATED", "tenant_id": tenant, "branch_id": B, "tag": tag});
    if let Some(s) = sector {
        e["sector_id"] = json!(s);
    }
    e
}

/// The `tag`s of the events a client got (and the other frames it got).
async fn tags(c: &mut Client) -> (BTreeSet<String>, Vec<Value>) {
    let mut tags = BTreeSet::new();
    let mut other = Vec::new();
    for frame in c.drain(Duration::from_millis(400)).await {
        match frame["tag"].as_str() {
            Some(t) => {
                tags.insert(t.to_owned());
            }
            None => other.push(frame),
        }
    }
    (tags, other)
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn waiters_hear_only_their_sectors_managers_hear_all() {
    let db = connect().await;
    let t = fresh_tenant();
    assign(&db, t, B, 1, &[10]).await;
    assign(&db, t, B, 2, &[11, 12]).await;
    assign(&db, t, B, 3, &[]).await;
    // Yesterday's assignment does not count.
    db.execute(
        "INSERT INTO waiter_sector_assignment (tenant_id, branch_id, sector_id, waiter_id, assignment_date) VALUES ($1, $2, 10, 3, CURRENT_DATE - 1)",
        &[&t, &B],
    )
    .await
    .unwrap();
    let gw = gateway(|_| {}).await;
    let (mut w1, hello1) = gw.join("waiter", &staff(1, t, &[B], &["WAITER"])).await;
    let (mut w2, hello2) = gw.join("waiter", &staff(2, t, &[B], &["WAITER"])).await;
    let (mut w3, hello3) = gw.join("waiter", &staff(3, t, &[B], &["WAITER"])).await;
    let (mut mgr, hello_mgr) = gw.join("waiter", &staff(4, t, &[B], &["MANAGER"])).await;
    let (mut admin, _) = gw.join("admin", &staff(5, t, &[B], &["ADMIN"])).await;
    assert_eq!(hello1["sector_ids"], json!([10]));
    assert_eq!(hello2["sector_ids"], json!([11, 12]));
    assert_eq!(hello3["sector_ids"], json!([]));
    assert_eq!(hello_mgr["sector_ids"], Value::Null);

    let waiters = "channel:branch:5:waiters";
    gw.publish_one(waiters, ev(t, "s10", Some(10))).await;
    gw.publish_one(waiters, ev(t, "s12", Some(12))).await;
    gw.publish_one(
        "channel:sector:5:11:waiters",
        ev(t, "sector-channel-11", None),
    )
    .await;
    gw.publish_one(
        "channel:sector:5:10:waiters",
        ev(t, "sector-channel-10", Some(10)),
    )
    .await;
    gw.publish_one(waiters, ev(t, "no-sector", None)).await;
    assert_eq!(
        tags(&mut w1).await.0,
        set(&["s10", "sector-channel-10", "no-sector"])
    );
    assert_eq!(
        tags(&mut w2).await.0,
        set(&["s12", "sector-channel-11", "no-sector"])
    );
    assert_eq!(
        tags(&mut w3).await.0,
        set(&["no-sector"]),
        "no sector today: only events without one"
    );
    let all = set(&[
        "s10",
        "s12",
        "sector-channel-11",
        "sector-channel-10",
        "no-sector",
    ]);
    assert_eq!(tags(&mut mgr).await.0, all);
    assert_eq!(tags(&mut admin).await.0, all);
    let (_, health) = gw.get_json("/ws/health/detailed").await;
    assert_eq!(health["sector_repository"]["status"], "ok");
    gw.stop().await;
}

#[tokio::test]
async fn delivery_follows_refresh_sectors_and_assignment_changes() {
    let db = connect().await;
    let t = fresh_tenant();
    assign(&db, t, B, 1, &[10]).await;
    assign(&db, t, B, 2, &[10]).await;
    let gw = gateway(|_| {}).await;
    let (mut w1, _) = gw.join("waiter", &staff(1, t, &[B], &["WAITER"])).await;
    let (mut w2, _) = gw.join("waiter", &staff(2, t, &[B], &["WAITER"])).await;

    // The table changes; the cache still says 10 until asked to re-read.
    assign(&db, t, B, 1, &[11]).await;
    assert_eq!(
        w1.ask(r#"{"type":"refresh_sectors"}"#).await,
        json!({"type": "sectors_updated", "sector_ids": [11]})
    );
    gw.publish_one("channel:branch:5:waiters", ev(t, "a10", Some(10)))
        .await;
    gw.publish_one("channel:branch:5:waiters", ev(t, "a11", Some(11)))
        .await;
    assert_eq!(tags(&mut w1).await.0, set(&["a11"]));
    assert_eq!(tags(&mut w2).await.0, set(&["a10"]));

    // SECTOR_ASSIGNMENT_CHANGED for waiter 1 only.
    assign(&db, t, B, 1, &[12]).await;
    assign(&db, t, B, 2, &[13]).await;
    let change = json!({"type": "SECTOR_ASSIGNMENT_CHANGED", "tenant_id": t, "branch_id": B,
                        "entity": {"waiter_id": 1}, "tag": "change-1"});
    gw.publish_one("channel:branch:5:waiters", change).await;
    let (got, other) = tags(&mut w1).await;
    assert_eq!(got, set(&["change-1"]), "the event itself is delivered too");
    assert_eq!(
        other,
        vec![json!({"type": "sectors_updated", "sector_ids": [12]})]
    );
    let (got, other) = tags(&mut w2).await;
    assert_eq!(got, set(&["change-1"]));
    assert!(other.is_empty(), "waiter 2 was not named: {other:?}");

    // Without a waiter_id, every waiter of the branch is re-read.
    let change = json!({"type": "SECTOR_ASSIGNMENT_CHANGED", "tenant_id": t, "branch_id": B, "tag": "change-all"});
    gw.publish_one("channel:branch:5:admin", change).await;
    let (_, other) = tags(&mut w2).await;
    assert_eq!(
        other,
        vec![json!({"type": "sectors_updated", "sector_ids": [13]})]
    );
    gw.publish_one("channel:branch:5:waiters", ev(t, "b12", Some(12)))
        .await;
    gw.publish_one("channel:branch:5:waiters", ev(t, "b13", Some(13)))
        .await;
    assert_eq!(tags(&mut w1).await.0, set(&["b12"]));
    assert_eq!(tags(&mut w2).await.0, set(&["b13"]));
    gw.stop().await;
}

/// Waiters 100 and up flood `refresh_sectors` while their lookups are slow
/// (50 ms each, in the query itself); a branch-wide change must still reach
/// the other waiters at once, with the routing it implies.
#[tokio::test]
async fn a_flood_of_refreshes_does_not_starve_assignment_changes() {
    use futures_util::{SinkExt, StreamExt};
    let db = connect().await;
    let t = fresh_tenant();
    assign(&db, t, B, 1, &[10]).await;
    assign(&db, t, B, 2, &[10]).await;
    let flooders = [101, 102, 103, 104];
    for w in flooders {
        assign(&db, t, B, w, &[10]).await;
    }
    let gw = gateway(|c| {
        c.rate_limit_per_s = 1000;
        c.sector_query = Some(
            "SELECT sector_id FROM waiter_sector_assignment, \
             pg_sleep(CASE WHEN $1::bigint >= 100 THEN 0.05 ELSE 0 END) \
             WHERE waiter_id = $1 AND branch_id = $2 AND tenant_id = $3 \
             AND assignment_date = CURRENT_DATE"
                .into(),
        );
    })
    .await;
    let (mut w1, _) = gw.join("waiter", &staff(1, t, &[B], &["WAITER"])).await;
    let (mut w2, _) = gw.join("waiter", &staff(2, t, &[B], &["WAITER"])).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut floods = tokio::task::JoinSet::new();
    for w in flooders {
        let (client, _) = gw.join("waiter", &staff(w, t, &[B], &["WAITER"])).await;
        let (mut tx, mut rx) = client.ws.split();
        // Replies are read (and discarded) so that the flooder is no slow consumer.
        floods.spawn(async move { while let Some(Ok(_)) = rx.next().await {} });
        let (stop, sent) = (stop.clone(), sent.clone());
        floods.spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(5));
            while !stop.is_cancelled() {
                every.tick().await;
                let refresh = r#"{"type":"refresh_sectors"}"#;
                if tx
                    .send(tokio_tungstenite::tungstenite::Message::text(refresh))
                    .await
                    .is_err()
                {
                    break;
                }
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    // Well past the 1024 commands that the old single queue held.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sent.load(std::sync::atomic::Ordering::Relaxed) < 1500 {
        assert!(Instant::now() < deadline, "the flood did not get going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assign(&db, t, B, 1, &[11]).await;
    assign(&db, t, B, 2, &[12]).await;
    let change = json!({"type": "SECTOR_ASSIGNMENT_CHANGED", "tenant_id": t, "branch_id": B, "tag": "change-all"});
    gw.publish_one("channel:branch:5:admin", change).await;
    for (w, sectors) in [(&mut w1, json!([11])), (&mut w2, json!([12]))] {
        assert_eq!(
            w.next_json().await,
            Some(json!({"type": "sectors_updated", "sector_ids": sectors})),
            "the change reached the waiter during the flood"
        );
    }
    for (tag, s) in [("c10", 10), ("c11", 11), ("c12", 12)] {
        gw.publish_one("channel:branch:5:waiters", ev(t, tag, Some(s)))
            .await;
    }
    assert_eq!(tags(&mut w1).await.0, set(&["c11"]));
    assert_eq!(tags(&mut w2).await.0, set(&["c12"]));
    assert!(
        gw.metric("wsgateway_sector_refreshes_coalesced_total")
            .await
            > 0.0,
        "refreshes joined pending ones"
    );
    stop.cancel();
    floods.abort_all();
    gw.stop().await;
}

#[tokio::test]
async fn repeated_connections_within_the_ttl_issue_one_query() {
    let db = connect().await;
    let t = fresh_tenant();
    assign(&db, t, B, 1, &[10]).await;
    // A query that records each call in the database itself.
    db.batch_execute(
        "SELECT pg_advisory_lock(80011);
         CREATE TABLE IF NOT EXISTS wsgateway_test_sector_calls (tenant_id bigint NOT NULL);
         CREATE OR REPLACE FUNCTION wsgateway_test_counted_sectors(uid bigint, bid bigint, tid bigint)
         RETURNS SETOF bigint LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO wsgateway_test_sector_calls VALUES (tid);
           RETURN QUERY SELECT sector_id FROM waiter_sector_assignment
             WHERE waiter_id = uid AND branch_id = bid AND tenant_id = tid AND assignment_date = CURRENT_DATE;
         END $$;
         SELECT pg_advisory_unlock(80011);",
    )
    .await
    .unwrap();
    let gw = gateway(|c| {
        c.sector_query = Some(
            "SELECT s AS sector_id FROM wsgateway_test_counted_sectors($1, $2, $3) AS s".into(),
        );
    })
    .await;
    for _ in 0..4 {
        let (c, hello) = gw.join("waiter", &staff(1, t, &[B], &["WAITER"])).await;
        assert_eq!(hello["sector_ids"], json!([10]));
        drop(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls: i64 = db
        .query_one(
            "SELECT count(*) FROM wsgateway_test_sector_calls WHERE tenant_id = $1",
            &[&t],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(calls, 1);
    gw.assert_metric(r#"sector_queries_total{outcome="ok"}"#, 1.0)
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_means_branch_wide_delivery() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = fresh_tenant();
    let gw = TestGateway::start_with(|c| {
        c.database_url = Some(Secret(format!("postgres://postgres@127.0.0.1:{port}/test")));
    })
    .await;
    let started = Instant::now();
    let (mut w, hello) = gw.join("waiter", &staff(1, t, &[B], &["WAITER"])).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(hello["sector_ids"], Value::Null, "unknown");
    gw.publish_one("channel:branch:5:waiters", ev(t, "s10", Some(10)))
        .await;
    gw.publish_one("channel:sector:5:11:waiters", ev(t, "s11", None))
        .await;
    assert_eq!(tags(&mut w).await.0, set(&["s10", "s11"]));
    let (status, health) = gw.get_json("/ws/health/detailed").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["sector_repository"]["status"], "degraded");
    gw.stop().await;
}

#[tokio::test]
async fn a_slow_query_times_out_into_branch_wide_delivery() {
    let db = connect().await;
    let t = fresh_tenant();
    assign(&db, t, B, 1, &[10]).await;
    let gw = gateway(|c| {
        c.sector_query_timeout_s = Secs(Duration::from_millis(500));
        c.sector_query = Some(
            "SELECT sector_id FROM waiter_sector_assignment, (SELECT pg_sleep(3)) AS slow \
             WHERE waiter_id = $1 AND branch_id = $2 AND tenant_id = $3"
                .into(),
        );
    })
    .await;
    let started = Instant::now();
    let (mut w, hello) = gw.join("waiter", &staff(1, t, &[B], &["WAITER"])).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert_eq!(hello["sector_ids"], Value::Null);
    gw.publish_one("channel:branch:5:waiters", ev(t, "s11", Some(11)))
        .await;
    assert_eq!(tags(&mut w).await.0, set(&["s11"]));
    gw.assert_metric(r#"sector_queries_total{outcome="timeout"}"#, 1.0)
        .await;
    gw.stop().await;
}

#[tokio::test]
async fn the_database_going_away_and_coming_back() {
    let db = connect().await;
    let t = fresh_tenant();
    assign(&db, t, B, 1, &[10]).await;
    assign(&db, t, B, 2, &[11]).await;
    let url: url_parts::Pg = database_url().parse().unwrap();
    let proxy = TcpProxy::start(url.addr).await;
    let gw = TestGateway::start_with(|c| {
        c.database_url = Some(Secret(url.via(proxy.addr)));
        c.sector_query_timeout_s = Secs(Duration::from_millis(500));
        c.sector_retry_s = Secs(Duration::from_millis(200));
    })
    .await;
    let (_w1, hello) = gw.join("waiter", &staff(1, t, &[B], &["WAITER"])).await;
    assert_eq!(hello["sector_ids"], json!([10]));

    proxy.set_up(false);
    let (mut w2, hello) = gw.join("waiter", &staff(2, t, &[B], &["WAITER"])).await;
    assert_eq!(
        hello["sector_ids"],
        Value::Null,
        "the database is down: unknown"
    );
    let (_, health) = gw.get_json("/ws/health/detailed").await;
    assert_eq!(health["sector_repository"]["status"], "degraded");
    gw.publish_one("channel:branch:5:waiters", ev(t, "down-s10", Some(10)))
        .await;
    assert_eq!(
        tags(&mut w2).await.0,
        set(&["down-s10"]),
        "branch-wide while unknown"
    );

    proxy.set_up(true);
    let update = w2
        .next_json_within(Duration::from_secs(5))
        .await
        .expect("sectors_updated");
    assert_eq!(
        update,
        json!({"type": "sectors_updated", "sector_ids": [11]})
    );
    gw.wait_health(Duration::from_secs(5), |_, b| {
        b["sector_repository"]["status"] == "ok"
    })
    .await;
    gw.publish_one("channel:branch:5:waiters", ev(t, "up-s10", Some(10)))
        .await;
    gw.publish_one("channel:branch:5:waiters", ev(t, "up-s11", Some(11)))
        .await;
    assert_eq!(tags(&mut w2).await.0, set(&["up-s11"]));
    gw.stop().await;
}

/// Just enough URL handling to put the proxy in front of the test database.
mod url_parts {
    use std::net::{SocketAddr, ToSocketAddrs};
    use std::str::FromStr;

    pub struct Pg {
        pub addr: SocketAddr,
        before_host: String,
        after_port: String,
    }

    impl FromStr for Pg {
        type Err = String;
        fn from_str(url: &str) -> Result<Pg, String> {
            let (scheme, rest) = url.split_once("://").ok_or("no scheme")?;
            let (auth, rest) = match rest.rsplit_once('@') {
                Some((a, r)) => (format!("{a}@"), r),
                None => (String::new(), rest),
            };
            let (hostport, path) = rest
                .split_once('/')
                .map(|(h, p)| (h, format!("/{p}")))
                .unwrap_or((rest, String::new()));
            let hostport = if hostport.contains(':') {
                hostport.to_owned()
            } else {
                format!("{hostport}:5432")
            };
            let addr = hostport
                .to_socket_addrs()
                .map_err(|e| e.to_string())?
                .next()
                .ok_or("no address")?;
            Ok(Pg {
                addr,
                before_host: format!("{scheme}://{auth}"),
                after_port: path,
            })
        }
    }

    impl Pg {
        pub fn via(&self, proxy: SocketAddr) -> String {
            format!("{}{proxy}{}", self.before_host, self.after_port)
        }
    }
}
