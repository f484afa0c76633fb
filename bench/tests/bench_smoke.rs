//! A small run of the load generator, as CI can afford: it asserts only that
//! nothing is missing or misrouted (figures are for BENCHMARKS.md, not CI).
//!
//! The gateway it starts is the `wsgateway` binary next to
//! `wsgateway-bench` in cargo's target directory (or `WSGATEWAY_BIN`):
//! `cargo test` at the root (`--workspace`) builds both before running any
//! test; `cargo test -p wsgateway-bench` alone does not rebuild the gateway.

use serde_json::Value;

/// Runs `wsgateway-bench <args> --json` (embedded broker) and returns its
/// first run's report.
async fn bench(args: &[&str]) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgateway-bench"))
        .args(args)
        .arg("--json")
        .env_remove("REDIS_URL")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    report["runs"][0].clone()
}

#[tokio::test]
async fn the_load_generator_delivers_everything_to_exactly_its_audience() {
    let run = &bench(&[
        "steady",
        "--connections",
        "1000",
        "--rate",
        "50",
        "--duration-s",
        "2",
        "--admin-share",
        "0.1",
    ])
    .await;
    assert_eq!(run["connections"]["opened"], 1000, "{run}");
    assert_eq!(run["events"]["published"], 100);
    let d = &run["deliveries"];
    assert!(d["expected"].as_u64().unwrap() > 0);
    assert_eq!(d["delivered"], d["expected"], "{run}");
    assert_eq!(d["missing"], 0);
    assert_eq!(d["misrouted"], 0);
}

#[tokio::test]
async fn with_floor_measures_the_same_fan_out_and_reports_the_ratios() {
    let run = &bench(&[
        "steady",
        "--connections",
        "200",
        "--branches",
        "2",
        "--tenants",
        "1",
        "--rate",
        "20",
        "--duration-s",
        "1",
        "--with-floor",
    ])
    .await;
    assert_eq!(run["deliveries"]["missing"], 0, "{run}");
    let floor = &run["floor"];
    // 200 connections over two branches: 100 recipients per event.
    assert_eq!(floor["shape"]["sockets"], 100, "{run}");
    // As many sockets held as the gateway had connections, each event
    // written to one branch's share of them.
    assert_eq!(floor["shape"]["held"], 200, "{run}");
    assert_eq!(floor["shape"]["events"], 20, "{run}");
    assert_eq!(floor["shape"]["rate_per_s"], 20.0, "{run}");
    // The event frames' size on the wire: text plus a 2- or 4-byte header.
    assert!(
        floor["shape"]["frame_bytes"].as_u64().unwrap() > 50,
        "{run}"
    );
    assert_eq!(floor["writes"], 100 * 20, "{run}");
    assert_eq!(floor["missing"], 0, "{run}");
    assert!(run["ratio"]["p99"].as_f64().unwrap() > 0.0, "{run}");
    assert_first_before_last(&run["event_latency_ms"]);
    assert_first_before_last(&floor["event_latency_ms"]);
}

/// Each event's first recipient is no later than its last, so neither
/// are their quantiles over the events.
fn assert_first_before_last(per_event: &Value) {
    for p in ["p50", "p99"] {
        let first = per_event["first"][p].as_f64();
        let last = per_event["last"][p].as_f64();
        assert!(
            matches!((first, last), (Some(f), Some(l)) if f > 0.0 && f <= l),
            "{per_event}"
        );
    }
}

/// `floor` over `sockets` sockets, 20 events in one second, with `extra`
/// flags: checks that every write arrived, with its event, and returns the
/// report.
async fn floor_run(sockets: usize, extra: &[&str]) -> Value {
    let n = sockets.to_string();
    let mut args = vec![
        "floor",
        "--connections",
        &n,
        "--rate",
        "20",
        "--duration-s",
        "1",
    ];
    args.extend_from_slice(extra);
    let run = bench(&args).await;
    assert_eq!(run["writes"], sockets * 20, "{run}");
    assert_eq!(run["missing"], 0, "{run}");
    assert!(run["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{run}");
    assert_first_before_last(&run["event_latency_ms"]);
    run
}

#[tokio::test]
async fn the_kernel_floor_scenario_counts_every_write() {
    let run = floor_run(200, &[]).await;
    assert_eq!(run["io"], "write", "{run}");
    assert_eq!(run["readers"], "raw", "{run}");
}

#[tokio::test]
async fn the_floor_with_websocket_readers_parses_every_frame() {
    // Every frame parsed as JSON with its send time and event.
    let run = floor_run(200, &["--frame-bytes", "139", "--floor-readers", "ws"]).await;
    assert_eq!(run["readers"], "ws", "{run}");
}

#[tokio::test]
async fn the_io_uring_floor_counts_every_write() {
    // More sockets than one ring's 256 entries: two submissions per event.
    let run = floor_run(300, &["--floor-io", "uring"]).await;
    assert_eq!(run["io"], "uring", "{run}");
    assert!(
        run["process_cpu_us_per_write"].as_f64().unwrap() > 0.0,
        "{run}"
    );
}

#[tokio::test]
async fn the_reconnect_storm_replays_the_whole_history_to_every_client() {
    let run = &bench(&["resume", "--connections", "50", "--events", "100"]).await;
    assert_eq!(run["broker"], "embedded", "{run}");
    let clients = &run["clients"];
    assert_eq!(clients["connected"], 50, "{run}");
    assert_eq!(clients["recovered"], 50, "{run}");
    assert_eq!(clients["complete"], 50, "{run}");
    assert_eq!(run["replay"]["expected_per_client"], 99);
    assert_eq!(run["replay"]["missing"], 0, "{run}");
    assert!(
        run["replay_done_ms"]["p99"].as_f64().unwrap() > 0.0,
        "{run}"
    );
}

#[tokio::test]
async fn a_publisher_beside_the_storm_reports_its_statuses_and_latency() {
    let run = &bench(&[
        "resume",
        "--connections",
        "50",
        "--events",
        "100",
        "--beside-rate",
        "50",
    ])
    .await;
    assert_eq!(run["clients"]["recovered"], 50, "{run}");
    assert_eq!(run["clients"]["not_recovered"], 0, "{run}");
    let beside = &run["beside"];
    assert_eq!(beside["rate_per_s"], 50.0, "{run}");
    // 2 s alone before the storm at 50 requests a second.
    let quiet = &beside["quiet"];
    assert!(quiet["sent"].as_u64().unwrap() >= 50, "{run}");
    assert_eq!(quiet["status"]["202"], quiet["sent"], "{run}");
    assert!(quiet["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{run}");
    let storm = &beside["storm"];
    let s = &storm["status"];
    assert_eq!(
        s["202"].as_u64().unwrap()
            + s["other"].as_u64().unwrap()
            + s["unanswered"].as_u64().unwrap(),
        storm["sent"].as_u64().unwrap(),
        "{run}"
    );
    assert_eq!(s["other"], 0, "{run}");
}

#[tokio::test]
async fn three_nodes_on_a_redis_and_on_a_cluster_deliver_everything_and_measure_the_idle_node() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsgateway-bench"))
        .args([
            "nodes",
            "--redis",
            "both",
            "--connections",
            "100",
            "--tenants",
            "3",
            "--branches",
            "2",
            "--rate",
            "50",
            "--duration-s",
            "1",
            "--json",
        ])
        .env_remove("REDIS_URL")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    // One run of each, single first.
    for (run, kind, servers) in [
        (&report["runs"][0], "single", 1),
        (&report["runs"][1], "cluster", 3),
    ] {
        assert_eq!(run["redis"]["kind"], kind, "{run}");
        // Tenants 1, 3 and 4: one on each primary.
        let spread = run["redis"]["tenants_per_server"].as_array().unwrap();
        assert_eq!(spread.len(), servers, "{run}");
        assert_eq!(
            spread.iter().filter_map(Value::as_u64).sum::<u64>(),
            3,
            "{run}"
        );
        assert_eq!(run["connections"]["opened"], 100, "{run}");
        assert_eq!(run["events"]["published"], 50, "{run}");
        let d = &run["deliveries"];
        // 50 clients per serving node over 6 branches: every event reaches
        // 8 or 9 on each.
        assert!(d["expected"].as_u64().unwrap() >= 50 * 16, "{run}");
        assert_eq!(d["delivered"], d["expected"], "{run}");
        assert_eq!(d["misrouted"], 0, "{run}");
        assert!(run["node1"]["deliveries"].as_u64().unwrap() > 0, "{run}");
        assert!(run["node2"]["deliveries"].as_u64().unwrap() > 0, "{run}");
        assert!(run["node3"]["cpu_s"].as_f64().is_some(), "{run}");
        assert_eq!(
            report["median"][kind]["deliveries"]["missing"].as_f64(),
            Some(0.0)
        );
    }
}

#[tokio::test]
async fn the_outbox_scenario_delivers_every_committed_row_once_and_drops_its_schema() {
    // The PostgreSQL that scripts/test.sh provides (as tests/it's).
    let url = std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let run = &bench(&[
        "outbox",
        "--database-url",
        &url,
        "--connections",
        "20",
        "--rate",
        "50",
        "--duration-s",
        "1",
        "--backlog",
        "300",
        "--outbox-batch",
        "100,500",
    ])
    .await;
    let l = &run["latency"];
    assert_eq!(l["rows"], 50, "{run}");
    // 20 waiters over 5 branches: 4 recipients per row.
    assert_eq!(l["deliveries"]["expected"], 200, "{run}");
    assert_eq!(l["deliveries"]["received"], 200, "{run}");
    for d in [
        &l["deliveries"],
        &run["throughput"]["batch_100"]["deliveries"],
        &run["throughput"]["batch_500"]["deliveries"],
    ] {
        assert_eq!(d["missing"], 0, "{run}");
        assert_eq!(d["duplicated"], 0, "{run}");
        assert_eq!(d["misrouted"], 0, "{run}");
    }
    assert!(
        l["commit_to_delivery_ms"]["p99"].as_f64().is_some(),
        "{run}"
    );
    let t = &run["throughput"]["batch_100"];
    assert_eq!(t["deliveries"]["received"], 1200, "{run}");
    assert!(t["rows_per_s"].as_f64().unwrap() > 0.0, "{run}");
    // The run's schema is gone.
    let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let schema = run["schema"].as_str().unwrap();
    let left: i64 = db
        .query_one(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1",
            &[&schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "{schema} left behind");
}

#[tokio::test]
async fn the_ack_scenario_acknowledges_every_event_once_and_prices_the_acks() {
    // 40 kitchen displays over 4 branches: 10 recipients, 10 acks per event.
    let run = &bench(&[
        "acks",
        "--connections",
        "40",
        "--tenants",
        "1",
        "--branches",
        "4",
        "--rate",
        "50",
        "--duration-s",
        "1",
        "--ack-within-s",
        "2",
    ])
    .await;
    assert_eq!(run["broker"], "embedded", "{run}");
    let phases = [
        &run["baseline"],
        &run["phases"]["ack_each"],
        &run["phases"]["ack_batched"],
    ];
    for phase in phases {
        assert_eq!(phase["events"]["published"], 50, "{run}");
        let d = &phase["deliveries"];
        assert_eq!(d["expected"], 500, "{run}");
        assert_eq!(d["delivered"], 500, "{run}");
        assert_eq!(d["missing"], 0, "{run}");
        assert_eq!(d["misrouted"], 0, "{run}");
        assert_eq!(d["redelivered"], 0, "{run}");
        let c = &phase["gateway_counters"];
        assert_eq!(c["events_redelivered_total"], 0.0, "{run}");
        assert_eq!(c["events_unacknowledged_total"]["no_ack"], 0.0, "{run}");
        assert_eq!(
            c["events_unacknowledged_total"]["no_audience"], 0.0,
            "{run}"
        );
        for outcome in ["late", "ignored", "failed"] {
            assert_eq!(c["acks_total"][outcome], 0.0, "{outcome}: {run}");
        }
    }
    assert_eq!(run["baseline"]["acks"]["messages"], 0, "{run}");
    assert_eq!(
        run["baseline"]["gateway_counters"]["acks_total"]["acknowledged"],
        0.0
    );
    for phase in &phases[1..] {
        // Each event acknowledged by its first ack, the other 9 repeated.
        let c = &phase["gateway_counters"]["acks_total"];
        assert_eq!(c["acknowledged"], 50.0, "{run}");
        assert_eq!(c["repeated"], 450.0, "{run}");
        assert_eq!(phase["acks"]["ids"], 500, "{run}");
    }
    assert_eq!(run["phases"]["ack_each"]["acks"]["messages"], 500, "{run}");
    for mode in ["ack_each", "ack_batched"] {
        let cost = &run["cost"][mode];
        assert!(
            cost["gateway_extra_cpu_us_per_acked_delivery"].is_number(),
            "{run}"
        );
    }
}
