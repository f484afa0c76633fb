//! Metrics and health: a known scenario, then every counter checked exactly
//! on `/ws/metrics` as parsed by a Prometheus text-format parser.

use crate::common;

use std::time::Duration;

use common::logs::Logs;
use common::redis_server::RedisServer;
use common::*;
use prometheus_parse::{Scrape, Value};
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::Message;
use wsgateway::config::{Origins, Ratio, Secret, Secs};

struct Metrics(Scrape);

impl Metrics {
    async fn scrape(gw: &TestGateway) -> Metrics {
        let text = gw.metrics().await;
        Metrics(
            Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format"),
        )
    }

    /// The value of the sample `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let sample = self
            .0
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
        match &sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a number: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_known_scenario_gives_exact_counts() {
    let mut redis = RedisServer::start();
    let gw = TestGateway::start_with(|c| {
        c.redis_url = Some(Secret(redis.url()));
        c.max_connections = 6;
        c.max_connections_per_user = 2;
        c.allowed_origins = Some(Origins(vec!["https://app.example".into()]));
        c.redis_health_check_s = Secs(Duration::from_millis(100));
        c.redis_retry_base_s = Secs(Duration::from_millis(50));
        c.redis_retry_max_s = Secs(Duration::from_millis(200));
        c.redis_timeout_s = Secs(Duration::from_millis(300));
    })
    .await;
    gw.wait_connected().await;

    // K = 2 rejections of each reason.
    for token in ["bad", ""] {
        assert_eq!(
            gw.connect("waiter", token).await.close_code().await,
            Some(4001)
        );
    }
    for roles in [vec!["KITCHEN"], vec![]] {
        let mut c = gw.connect("admin", &staff(9, 1, &[5], &roles)).await;
        assert_eq!(c.close_code().await, Some(4003));
    }
    for origin in ["https://evil.example", "null"] {
        let mut c = gw
            .connect_with("waiter", &staff(9, 1, &[5], &["WAITER"]), Some(origin))
            .await;
        assert_eq!(c.close_code().await, Some(4003));
    }
    for sub in [20, 21] {
        let (mut c, _) = gw.join("kitchen", &staff(sub, 1, &[5], &["KITCHEN"])).await;
        for _ in 0..30 {
            if !c.try_send(Message::text("{}")).await {
                break;
            }
        }
        assert_eq!(c.until_close().await.1, Some(4029));
    }
    // Their places are free once they are out of the hub.
    gw.wait_metric("wsgateway_connections_total", |open| open == 0.0)
        .await;
    // N = 6 connections held.
    let user1 = staff(1, 1, &[5], &["WAITER", "KITCHEN"]);
    let (_w, _) = gw.join("waiter", &user1).await;
    let (mut kitchen, _) = gw.join("kitchen", &user1).await;
    let (mut admin, _) = gw.join("admin", &staff(2, 1, &[5], &["ADMIN"])).await;
    for _ in 0..2 {
        assert_eq!(
            gw.connect("waiter", &user1).await.close_code().await,
            Some(4008)
        );
    }
    let mut diners = Vec::new();
    for table in 0..3 {
        diners.push(gw.join("diner", &diner(1, 5, table, 77)).await.0);
    }
    for _ in 0..2 {
        assert_eq!(
            gw.connect("diner", &diner(1, 5, 9, 77))
                .await
                .close_code()
                .await,
            Some(1013)
        );
    }

    // M = 5 events to kitchen + admin; D = 3 invalid + 1 stale.
    for n in 0..5 {
        let ev = json!({"type": "ROUND_IN_KITCHEN", "tenant_id": 1, "branch_id": 5, "n": n, "ts": wsgateway::event::unix_ms()});
        gw.publish_one("channel:branch:5:kitchen", ev).await;
    }
    for _ in 0..5 {
        kitchen.next_json().await.unwrap();
        admin.next_json().await.unwrap();
    }
    redis.publish("channel:branch:5:kitchen", "{");
    redis.publish("channel:branch:5:kitchen", r#"{"type":"X","tenant_id":1}"#);
    redis.publish(
        "channel:branch:5:kitchen",
        r#"{"type":"X","tenant_id":1,"branch_id":4}"#,
    );
    let stale = json!({"type": "X", "tenant_id": 1, "branch_id": 5, "ts": wsgateway::event::unix_ms() - 60_000});
    redis.publish("channel:branch:5:kitchen", &stale.to_string());
    gw.wait_metric(r#"wsgateway_events_dropped_total{reason="stale"}"#, |n| {
        n >= 1.0
    })
    .await;

    let m = Metrics::scrape(&gw).await;
    let rejected = |reason| {
        m.get(
            "wsgateway_connections_rejected_total",
            &[("reason", reason)],
        )
    };
    for reason in [
        "auth",
        "forbidden",
        "origin",
        "rate_limit",
        "max_per_user",
        "max_total",
    ] {
        assert_eq!(rejected(reason), 2.0, "{reason}");
    }
    assert_eq!(m.get("wsgateway_connections_total", &[]), 6.0);
    let by = |e| m.get("wsgateway_connections_by_endpoint", &[("endpoint", e)]);
    assert_eq!(
        (by("waiter"), by("kitchen"), by("admin"), by("diner")),
        (1.0, 1.0, 1.0, 3.0)
    );
    assert_eq!(m.get("wsgateway_events_processed_total", &[]), 5.0);
    let dropped = |reason| m.get("wsgateway_events_dropped_total", &[("reason", reason)]);
    assert_eq!(
        (dropped("invalid"), dropped("stale"), dropped("queue_full")),
        (3.0, 1.0, 0.0)
    );
    // Invalid and stale events are the publisher's: counted, but they do
    // not feed the backpressure drop rate (queue overflows and gap losses do).
    assert_eq!(m.get("wsgateway_event_drop_rate", &[]), 0.0);
    assert_eq!(m.get("wsgateway_broadcasts_total", &[]), 10.0);
    // Every reason is exported from start; the 5-event scenario lost none,
    // and the connections closed so far had nothing queued.
    for reason in ["slow_consumer", "write_failed", "connection_closed"] {
        assert_eq!(
            m.get("wsgateway_broadcasts_failed_total", &[("reason", reason)]),
            0.0,
            "{reason}"
        );
    }
    assert!(
        !m.0.samples
            .iter()
            .any(|s| s.metric == "wsgateway_broadcast_rate_limited_total"),
        "broadcasts are not rate-limited: no metric says otherwise"
    );
    assert_eq!(m.get("wsgateway_drop_rate_alerts_total", &[]), 0.0);
    assert_eq!(m.get("wsgateway_fanout_size_count", &[]), 5.0);
    assert_eq!(m.get("wsgateway_fanout_size_sum", &[]), 10.0);
    assert_eq!(m.get("wsgateway_dispatch_seconds_count", &[]), 5.0);
    assert_eq!(m.get("wsgateway_publish_to_queue_seconds_count", &[]), 5.0);
    assert!(m.get("wsgateway_publish_to_client_seconds_count", &[]) >= 2.0);
    assert_eq!(m.get("wsgateway_events_published_total", &[]), 5.0);
    assert_eq!(
        m.get("wsgateway_circuit_breaker_state", &[("name", "redis")]),
        0.0
    );
    assert_eq!(
        m.get("wsgateway_circuit_breaker_failures", &[("name", "redis")]),
        0.0
    );
    assert_eq!(
        m.get("wsgateway_hub_index_entries", &[("index", "tenant")]),
        1.0
    );
    assert_eq!(
        m.get("wsgateway_hub_index_entries", &[("index", "branch")]),
        1.0
    );
    assert_eq!(
        m.get("wsgateway_hub_index_entries", &[("index", "session")]),
        1.0
    );
    assert_eq!(
        m.get("wsgateway_hub_index_entries", &[("index", "user")]),
        2.0
    );

    // Health: 200 with Redis up, 503 with it stopped, the breaker reported.
    let (status, health) = gw.get_json("/ws/health/detailed").await;
    assert_eq!(status, 200, "{health}");
    // The seed's rate limiter fields: one bucket per open connection, for
    // at most WSGATEWAY_MAX_CONNECTIONS.
    assert_eq!(
        health["rate_limiter"],
        json!({"tracked_connections": 6, "capacity": 6, "per_connection_per_s": 20})
    );
    assert_eq!(
        health["circuit_breaker"],
        json!({"redis": {"state": "CLOSED", "failures": 0}})
    );
    redis.kill();
    let (status, health) = gw
        .wait_health(Duration::from_secs(10), |s, _| s == 503)
        .await;
    assert_eq!(health["status"], "unhealthy");
    assert_eq!(health["broker"]["status"], "disconnected");
    let (_, health) = gw
        .wait_health(Duration::from_secs(10), |_, b| {
            b["circuit_breaker"]["redis"]["state"] == "OPEN"
        })
        .await;
    assert_eq!(status, 503);
    assert!(
        health["circuit_breaker"]["redis"]["failures"]
            .as_u64()
            .unwrap()
            >= 5
    );
    let m = Metrics::scrape(&gw).await;
    assert_eq!(
        m.get("wsgateway_circuit_breaker_state", &[("name", "redis")]),
        1.0
    );
    drop((kitchen, admin, diners));
    gw.stop().await;
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_without_secrets() {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgateway"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("JWT_SECRET", JWT_SECRET)
        .env("TABLE_TOKEN_SECRET", TABLE_SECRET)
        .env("WSGATEWAY_LOG_FORMAT", "json")
        .env("RUST_LOG", "debug")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addr = None;
    let mut seen = Vec::new();
    while addr.is_none() {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        if v["fields"]["message"] == "listening" {
            addr = v["fields"]["addr"].as_str().map(str::to_owned);
        }
        seen.push(line);
    }
    let addr = addr.unwrap();
    let token = staff(7, 1, &[5], &["WAITER"]);
    let mut c = Client::open(&format!("ws://{addr}/ws/waiter?token={token}"), None).await;
    assert_eq!(c.next_json().await.unwrap()["type"], "connected");
    let bad = staff(7, 1, &[5], &["KITCHEN"]);
    let mut r = Client::open(&format!("ws://{addr}/ws/waiter?token={bad}"), None).await;
    assert_eq!(r.close_code().await, Some(4003));
    drop(c);
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await
    {
        seen.push(line);
    }
    assert!(child.wait().await.unwrap().success());
    let mut audit = false;
    for line in &seen {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(
            !line.contains(&token) && !line.contains(&bad) && !line.contains(JWT_SECRET),
            "{line}"
        );
        // Connection lines carry the audit context.
        if v["fields"]["message"] == "connected" {
            let span = &v["span"];
            assert_eq!(
                (span["user"].as_i64(), span["tenant"].as_i64()),
                (Some(7), Some(1)),
                "{line}"
            );
            assert_eq!(span["endpoint"], "waiter");
            assert_eq!(span["sector_ids"], "null", "no database: unknown");
            audit = true;
        }
    }
    assert!(audit, "a 'connected' line: {seen:#?}");
    // The seed's texts, which operators' alerts match.
    let message = |l: &String| {
        serde_json::from_str::<serde_json::Value>(l).unwrap()["fields"]["message"]
            .as_str()
            .map(str::to_owned)
    };
    let closed: Vec<serde_json::Value> = seen
        .iter()
        .filter(|l| message(l).as_deref() == Some("Connection closed"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        closed.len(),
        1,
        "one admitted connection, one line: {seen:#?}"
    );
    assert_eq!(closed[0]["fields"]["by"], "client");
    assert_eq!(closed[0]["span"]["user"], 7);
    assert_eq!(closed[0]["span"]["sector_ids"], "null");
    assert!(
        seen.iter()
            .any(|l| message(l).as_deref() == Some("WebSocket Gateway shutdown complete")),
        "{seen:#?}"
    );
}

/// Every metric the sample dashboard and alert rules use is one the gateway
/// exports.
#[tokio::test]
async fn the_dashboard_and_alerts_use_only_exported_metrics() {
    let url = common::redis_server::shared_redis_url();
    let gw = TestGateway::start_with(|c| c.redis_url = Some(Secret(url))).await;
    let exported = gw.metrics().await;
    let files = [
        include_str!("../../docs/grafana/wsgateway-dashboard.json"),
        include_str!("../../docs/prometheus/alerts.yml"),
    ];
    let mut checked = 0;
    for text in files {
        for (i, _) in text.match_indices("wsgateway_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            assert!(
                exported.contains(&format!("# TYPE {base} ")),
                "{name} is not exported"
            );
            checked += 1;
        }
    }
    assert!(checked > 20);
    gw.stop().await;
}

/// `WSGATEWAY_METRICS_LISTEN`: the platform's counts are served on the
/// metrics address only; the public port answers 404 there and still
/// serves everything else; both listeners stop at shutdown.
#[tokio::test]
async fn metrics_listen_moves_metrics_off_the_public_port() {
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let private = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = public.local_addr().unwrap();
    let metrics_addr = private.local_addr().unwrap();
    let gateway = wsgateway::Gateway::new(config())
        .unwrap()
        .with_metrics_listener(private)
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let signal = futures_util::stream::once(stop.clone().cancelled_owned());
    let task = tokio::spawn(gateway.serve(public, signal));
    let gw = TestGateway { addr, stop, task };

    let (_waiter, _) = gw.join("waiter", &staff(1, 1, &[5], &["WAITER"])).await;
    let status = |url: String| async move { reqwest::get(url).await.unwrap().status().as_u16() };
    assert_eq!(status(gw.url("/ws/metrics")).await, 404);
    assert_eq!(status(gw.url("/ws/health")).await, 200);
    let scraped = reqwest::get(format!("http://{metrics_addr}/ws/metrics"))
        .await
        .unwrap();
    assert_eq!(scraped.status(), 200);
    let text = scraped.text().await.unwrap();
    assert_eq!(
        metric_value(&text, "wsgateway_connections_total"),
        Some(1.0)
    );
    // The metrics listener serves nothing else.
    assert_eq!(
        status(format!("http://{metrics_addr}/ws/health")).await,
        404
    );

    gw.stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), gw.task)
        .await
        .expect("shutdown within the grace period")
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(metrics_addr).await.is_err(),
        "the metrics listener is closed after shutdown"
    );
}

/// Without `WSGATEWAY_METRICS_LISTEN`, metrics stay on the public port.
#[tokio::test]
async fn without_metrics_listen_metrics_are_on_the_public_port() {
    let gw = TestGateway::start().await;
    let resp = reqwest::get(gw.url("/ws/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.text()
            .await
            .unwrap()
            .contains("wsgateway_connections_total")
    );
    gw.stop().await;
}

/// Unknown types are counted by name for the first 100 distinct ones (the
/// rest under `type="other"`), each first occurrence is logged once, and
/// `/ws/health/detailed` lists them with their counts (the seed's
/// `get_unknown_event_metrics`).
#[tokio::test]
async fn unknown_types_are_counted_by_name_logged_once_and_listed_in_health() {
    let logs = Logs::capture();
    let gw = TestGateway::start().await;
    let (mut admin, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    let item = |t: &str| json!({"channel": "channel:branch:5:admin", "event": event(t, 1, 5)});
    // A_NEW twice, B_NEW, a known type, then 100 more: the first 100
    // distinct unknown types are A_NEW, B_NEW and T0..T97.
    let mut items = vec![
        item("A_NEW"),
        item("B_NEW"),
        item("A_NEW"),
        item("ROUND_READY"),
    ];
    items.extend((0..100).map(|i| item(&format!("T{i}"))));
    let (status, body) = gw.publish(&json!(items)).await;
    assert_eq!(status, 202, "{body}");
    for _ in 0..104 {
        admin
            .next_json()
            .await
            .expect("unknown types are delivered");
    }

    let m = Metrics::scrape(&gw).await;
    let unknown = |t| m.get("wsgateway_events_unknown_type_total", &[("type", t)]);
    assert_eq!(
        (unknown("A_NEW"), unknown("B_NEW"), unknown("T97")),
        (2.0, 1.0, 1.0)
    );
    assert_eq!(unknown("other"), 2.0, "T98 and T99");
    let labels: Vec<_> =
        m.0.samples
            .iter()
            .filter(|s| s.metric == "wsgateway_events_unknown_type_total")
            .map(|s| s.labels.get("type").unwrap().to_owned())
            .collect();
    assert_eq!(labels.len(), 101, "100 types and other: {labels:?}");
    assert!(!labels.iter().any(|l| l == "T98" || l == "ROUND_READY"));

    let (_, health) = gw.get_json("/ws/health/detailed").await;
    let u = &health["unknown_events"];
    assert_eq!(u["unknown_event_types_count"], 103, "{u}");
    assert_eq!(u["unique_types_count"], 100);
    assert_eq!(u["max_tracked_types"], 100);
    assert_eq!(u["other_count"], 2);
    let seen = u["unknown_event_types_seen"].as_array().unwrap();
    assert_eq!(seen.len(), 100);
    assert_eq!(
        (&seen[0], &seen[1], &seen[2], &seen[99]),
        (
            &json!("A_NEW"),
            &json!("B_NEW"),
            &json!("T0"),
            &json!("T97")
        ),
        "oldest first"
    );
    assert_eq!(u["type_counts"]["A_NEW"], 2);
    assert_eq!(u["type_counts"]["T97"], 1);
    assert!(u["type_counts"].get("T98").is_none());

    let first = logs.with_message("Unknown event type received (first occurrence)");
    assert_eq!(first.len(), 100, "once per tracked type");
    assert_eq!(first[0]["level"], "WARN");
    assert_eq!(first[0]["fields"]["event_type"], "A_NEW");
    assert_eq!(
        first
            .iter()
            .filter(|l| l["fields"]["event_type"] == "A_NEW")
            .count(),
        1
    );
    let full = logs.with_message(
        "Unknown event types tracker at capacity; further types are counted as other",
    );
    assert_eq!(full.len(), 1, "logged once, for T98");
    assert_eq!(full[0]["fields"]["max_types"], 100);
    gw.stop().await;
}

/// End to end: a burst that overflows the event queue fires the drop-rate
/// alert once, with the seed's text and the rate in the message and in the
/// fields, counted in `wsgateway_drop_rate_alerts_total`; a second burst
/// within the cooldown does not fire it again.
#[tokio::test]
async fn a_burst_that_overflows_the_event_queue_alerts_once_per_cooldown() {
    let logs = Logs::capture();
    let gw = TestGateway::start_with(|c| {
        c.event_queue_size = 4;
        c.drop_rate_alert = Ratio(0.2);
    })
    .await;
    let (mut admin, _) = gw.join("admin", &staff(1, 1, &[5], &["ADMIN"])).await;
    let ev = |n: usize| json!({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 5, "n": n});
    for n in 0..10 {
        gw.publish_one("channel:branch:5:admin", ev(n)).await;
        assert_eq!(admin.next_json().await.unwrap()["n"], n);
    }
    // One request publishes its events into the queue in one go, before
    // the dispatcher (on this thread) takes any: 20 events into a queue of
    // 4 drop 16. The first two drops leave the rate at 1/11 and 2/12; the
    // third, 3/13 = 23.08 %, is the first above 20 %.
    let burst = |from: usize| {
        json!(
            (from..from + 20)
                .map(|n| json!({"channel": "channel:branch:5:admin", "event": ev(n)}))
                .collect::<Vec<_>>()
        )
    };
    let (status, body) = gw.publish(&burst(100)).await;
    assert_eq!(status, 202, "{body}");
    for n in 116..120 {
        assert_eq!(
            admin.next_json().await.unwrap()["n"],
            n,
            "the newest 4 kept"
        );
    }
    let alert = logs
        .wait_for("High drop rate detected", |l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("High drop rate detected"))
        })
        .await;
    assert_eq!(alert["level"], "WARN");
    let f = &alert["fields"];
    assert_eq!(f["message"], "High drop rate detected: 23.08%", "{alert}");
    assert_eq!(f["drop_rate_percent"], 23.08);
    assert!((f["drop_rate"].as_f64().unwrap() - 3.0 / 13.0).abs() < 1e-9);
    assert_eq!(
        (&f["window_dropped"], &f["window_processed"]),
        (&json!(3), &json!(10))
    );
    assert_eq!(f["threshold_percent"], 20.0);
    assert_eq!(f["alert_count"], 1);
    gw.assert_metric("drop_rate_alerts_total", 1.0).await;

    // Within the cooldown (300 s): more drops, a rate still far above the
    // threshold, and no second alert.
    let (status, body) = gw.publish(&burst(200)).await;
    assert_eq!(status, 202, "{body}");
    for n in 216..220 {
        assert_eq!(admin.next_json().await.unwrap()["n"], n);
    }
    gw.assert_metric(r#"events_dropped_total{reason="queue_full"}"#, 32.0)
        .await;
    assert!(gw.metric("wsgateway_event_drop_rate").await > 0.5);
    gw.assert_metric("drop_rate_alerts_total", 1.0).await;
    let (_, health) = gw.get_json("/ws/health/detailed").await;
    assert_eq!(health["event_processing"]["drop_rate_alerts"], 1);
    let alerts: Vec<_> = logs
        .lines()
        .into_iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("drop rate"))
        })
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    gw.stop().await;
}

/// A connection's audit context (its log span) carries its `sector_ids`:
/// as read at connect on `connected`, as they are at close on the seed's
/// `Connection closed` line; and shutdown ends with the seed's line.
#[tokio::test]
async fn connection_lines_carry_sector_ids_and_shutdown_logs_the_seed_line() {
    use common::postgres::{assign, connect, database_url, fresh_tenant};
    let db = connect().await;
    let tenant = fresh_tenant();
    assign(&db, tenant, 5, 7, &[10]).await;
    let logs = Logs::capture();
    let gw = TestGateway::start_with(|c| c.database_url = Some(Secret(database_url()))).await;
    let (mut waiter, hello) = gw
        .join("waiter", &staff(7, tenant, &[5], &["WAITER"]))
        .await;
    assert_eq!(hello["sector_ids"], json!([10]));
    let (_kitchen, _) = gw
        .join("kitchen", &staff(8, tenant, &[5], &["KITCHEN"]))
        .await;
    assign(&db, tenant, 5, 7, &[11, 12]).await;
    let updated = waiter.ask(r#"{"type":"refresh_sectors"}"#).await;
    assert_eq!(updated["sector_ids"], json!([11, 12]));
    waiter.ws.close(None).await.unwrap();

    let of_user = |user: i64| move |l: &serde_json::Value| l["span"]["user"] == user;
    let connected = logs
        .with_message("connected")
        .into_iter()
        .find(of_user(7))
        .expect("a connected line");
    assert_eq!(connected["span"]["sector_ids"], "[10]");
    let closed = logs
        .wait_for("Connection closed of user 7", |l| {
            l["fields"]["message"] == "Connection closed" && of_user(7)(l)
        })
        .await;
    assert_eq!(closed["level"], "INFO");
    assert_eq!(closed["fields"]["by"], "client");
    assert_eq!(closed["span"]["sector_ids"], "[11,12]", "as they are now");
    assert_eq!(closed["span"]["tenant"], tenant);

    gw.stop().await;
    let closed = logs
        .with_message("Connection closed")
        .into_iter()
        .find(of_user(8))
        .expect("the kitchen's line");
    assert_eq!(
        (
            &closed["fields"]["by"],
            &closed["fields"]["code"],
            &closed["fields"]["reason"]
        ),
        (&json!("gateway"), &json!(1012), &json!("service restart"))
    );
    assert_eq!(closed["span"]["sector_ids"], "null", "not filtered");
    assert_eq!(
        logs.with_message("WebSocket Gateway shutdown complete")
            .len(),
        1
    );
}
