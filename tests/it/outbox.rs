//! The transactional outbox against a real PostgreSQL (and a real Redis
//! where several nodes share it): committed rows reach their clients once,
//! in order; rolled-back ones never; invalid rows are set aside without
//! blocking the rest; a lost notification is caught by the poll; two nodes
//! consume one table; a consumer killed between publishing and committing
//! publishes nothing twice; a database that goes away and comes back.

use crate::common;

use std::time::Duration;

use common::postgres::{TcpProxy, database_url, fresh_tenant};
use common::redis_server::RedisServer;
use common::*;
use serde_json::{Value, json};
use tokio::time::Instant;
use wsgateway::config::{Secret, SettingValue, TableName};

/// A table of its own (in a schema of its own), made with the DDL that
/// `wsgateway outbox schema` prints; dropped with its schema on drop.
struct Table {
    name: TableName,
    db: tokio_postgres::Client,
}

impl Table {
    async fn create() -> Table {
        let name = TableName::parse_setting(&format!("ob_{}.outbox", fresh_tenant())).unwrap();
        let db = common::postgres::connect().await;
        db.batch_execute(&wsgateway::outbox::schema(&name))
            .await
            .unwrap();
        Table { name, db }
    }

    fn written(&self) -> String {
        self.name.as_written()
    }

    /// Inserts rows in one committed transaction.
    async fn commit(&self, rows: &[(Vec<&str>, Value)]) {
        self.db.batch_execute("BEGIN").await.unwrap();
        for (channels, event) in rows {
            self.insert(channels, event).await;
        }
        self.db.batch_execute("COMMIT").await.unwrap();
    }

    async fn insert(&self, channels: &[&str], event: &Value) {
        let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
        self.db
            .execute(
                &format!(
                    "INSERT INTO {} (channels, event) VALUES ($1, $2::text::jsonb)",
                    self.name.sql("")
                ),
                &[&channels, &event.to_string()],
            )
            .await
            .unwrap();
    }

    async fn count(&self, suffix: &str) -> i64 {
        self.db
            .query_one(
                &format!("SELECT count(*) FROM {}", self.name.sql(suffix)),
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn wait_empty(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.count("").await > 0 {
            assert!(Instant::now() < deadline, "the outbox was not consumed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let schema = self.name.schema.clone().unwrap();
        let url = database_url();
        // Its own connection: the test's runtime may be gone.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    let _ = c
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                        .await;
                }
            });
        })
        .join()
        .unwrap();
    }
}

fn order(n: i64) -> Value {
    json!({"type": "ROUND_SUBMITTED", "tenant_id": 1, "branch_id": 1, "entity": {"n": n}})
}

const WAITERS: &str = "channel:branch:1:waiters";

fn outbox_config(table: &Table, url: &str) -> impl FnOnce(&mut wsgateway::Config) + use<> {
    let name = table.name.clone();
    let url = url.to_owned();
    move |c| {
        c.outbox_table = Some(name);
        c.outbox_database_url = Some(Secret(url));
        c.outbox_poll_s = wsgateway::config::Secs(Duration::from_millis(200));
    }
}

/// The `n` of each ROUND_SUBMITTED a client got, until `quiet` passes.
async fn numbers(c: &mut Client, quiet: Duration) -> Vec<i64> {
    c.drain(quiet)
        .await
        .iter()
        .filter(|e| e["type"] == "ROUND_SUBMITTED")
        .map(|e| e["entity"]["n"].as_i64().unwrap())
        .collect()
}

/// Reads events until `expected` numbers arrived (or `within` passed).
async fn numbers_until(c: &mut Client, expected: usize, within: Duration) -> Vec<i64> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < expected && Instant::now() < deadline {
        if let Some(e) = c.next_json_within(deadline - Instant::now()).await
            && e["type"] == "ROUND_SUBMITTED"
        {
            got.push(e["entity"]["n"].as_i64().unwrap());
        }
    }
    got
}

#[tokio::test]
async fn the_schema_goes_through_psql_twice() {
    let schema = format!("ob_{}", fresh_tenant());
    let table = format!("{schema}.outbox");
    for _ in 0..2 {
        let ddl = std::process::Command::new(env!("CARGO_BIN_EXE_wsgateway"))
            .args(["outbox", "schema", "--table", &table])
            .output()
            .unwrap();
        assert!(ddl.status.success());
        let mut psql = std::process::Command::new("psql")
            .args([&database_url(), "-v", "ON_ERROR_STOP=1", "-q"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("psql (scripts/test.sh installs postgresql-client)");
        use std::io::Write;
        psql.stdin.take().unwrap().write_all(&ddl.stdout).unwrap();
        assert!(psql.wait().unwrap().success(), "psql refused the DDL");
    }
    let db = common::postgres::connect().await;
    let columns: Vec<(String, String)> = db
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = 'outbox' ORDER BY ordinal_position",
            &[&schema],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected = [
        ("id", "bigint"),
        ("channels", "ARRAY"),
        ("event", "jsonb"),
        ("event_id", "text"),
        ("created_at", "timestamp with time zone"),
    ];
    assert_eq!(
        columns,
        expected.map(|(a, b)| (a.to_owned(), b.to_owned())).to_vec()
    );
    db.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
    // A bad name is refused before anything is printed.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_wsgateway"))
        .args(["outbox", "schema", "--table", "x; DROP TABLE y"])
        .output()
        .unwrap();
    assert!(!bad.status.success() && bad.stdout.is_empty());
}

#[tokio::test]
async fn committed_rows_arrive_once_in_commit_order_and_rolled_back_ones_never() {
    let table = Table::create().await;
    let gw = TestGateway::start_with(outbox_config(&table, &database_url())).await;
    let (mut waiter, _) = gw.join("waiter", &staff(10, 1, &[1], &["WAITER"])).await;

    // Interleaved: committed, rolled back, committed.
    table.commit(&[(vec![WAITERS], order(1))]).await;
    table.db.batch_execute("BEGIN").await.unwrap();
    table.insert(&[WAITERS], &order(-1)).await;
    table.db.batch_execute("ROLLBACK").await.unwrap();
    table.commit(&[(vec![WAITERS], order(2))]).await;
    // Then 20 transactions of 10 rows.
    for t in 0..20 {
        let rows: Vec<_> = (0..10)
            .map(|i| (vec![WAITERS], order(3 + t * 10 + i)))
            .collect();
        table.commit(&rows).await;
    }
    let got = numbers_until(&mut waiter, 202, Duration::from_secs(15)).await;
    assert_eq!(got, (1..=202).collect::<Vec<_>>());
    table.wait_empty().await;
    assert!(
        numbers(&mut waiter, Duration::from_millis(300))
            .await
            .is_empty()
    );
    assert_eq!(table.count("_dead").await, 0);
    gw.assert_metric(r#"wsgateway_outbox_rows_total{outcome="published"}"#, 202.0)
        .await;
    gw.assert_metric("wsgateway_outbox_consuming", 1.0).await;
    let (_, health) = gw.get_json("/ws/health/detailed").await;
    let outbox = &health["outbox"];
    assert_eq!(outbox["status"], "ok", "{health}");
    assert_eq!(outbox["table"], table.written());
    assert_eq!(outbox["consuming"], true);
    assert_eq!(outbox["rows_published"], 202);
    assert_eq!(outbox["dead_letters"], 0);
    assert!(outbox["rows_per_s"].as_f64().unwrap() > 0.0, "{outbox}");
    gw.stop().await;
}

#[tokio::test]
async fn a_backlog_larger_than_the_event_queue_is_delivered_whole() {
    let table = Table::create().await;
    let outbox = outbox_config(&table, &database_url());
    let gw = TestGateway::start_with(|c| {
        outbox(c);
        // A queue that drops its oldest events past 40: the consumer must
        // wait for room rather than publish faster than it is delivered.
        c.event_queue_size = 40;
    })
    .await;
    let (mut waiter, _) = gw.join("waiter", &staff(10, 1, &[1], &["WAITER"])).await;
    let rows: Vec<_> = (1..=3000).map(|n| (vec![WAITERS], order(n))).collect();
    table.commit(&rows).await;
    let got = numbers_until(&mut waiter, 3000, Duration::from_secs(30)).await;
    let expected: Vec<i64> = (1..=3000).collect();
    let first_wrong = got.iter().zip(&expected).position(|(g, e)| g != e);
    assert!(
        got == expected,
        "{} of 3000 received; first out of place at {first_wrong:?}",
        got.len()
    );
    gw.assert_metric(
        r#"wsgateway_events_dropped_total{reason="queue_full"}"#,
        0.0,
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn an_invalid_row_is_set_aside_counted_and_blocks_nothing() {
    let table = Table::create().await;
    let gw = TestGateway::start_with(outbox_config(&table, &database_url())).await;
    let (mut waiter, _) = gw.join("waiter", &staff(10, 1, &[1], &["WAITER"])).await;
    table
        .commit(&[
            (vec![WAITERS], order(1)),
            (vec!["channel:nowhere"], order(-1)),
            // Another branch's event on branch 1's channel.
            (
                vec![WAITERS],
                json!({"type": "ROUND_SUBMITTED", "tenant_id": 1, "branch_id": 2}),
            ),
            (vec![WAITERS], json!(["not", "an", "object"])),
            (vec![], order(-2)),
            (vec![WAITERS], order(2)),
        ])
        .await;
    assert_eq!(
        numbers_until(&mut waiter, 2, Duration::from_secs(10)).await,
        [1, 2]
    );
    table.wait_empty().await;
    assert_eq!(table.count("_dead").await, 4);
    let errors: Vec<String> = table
        .db
        .query(
            &format!("SELECT error FROM {} ORDER BY id", table.name.sql("_dead")),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(errors[0].starts_with("unknown_channel"), "{errors:?}");
    assert!(errors[1].starts_with("invalid_event"), "{errors:?}");
    assert!(errors[2].starts_with("invalid_event"), "{errors:?}");
    assert!(errors[3].starts_with("invalid_body"), "{errors:?}");
    gw.assert_metric(r#"wsgateway_outbox_rows_total{outcome="dead_letter"}"#, 4.0)
        .await;
    let (_, health) = gw.get_json("/ws/health/detailed").await;
    assert_eq!(health["outbox"]["dead_letters"], 4, "{health}");
    gw.stop().await;
}

#[tokio::test]
async fn a_row_without_its_notification_is_found_by_the_poll() {
    let table = Table::create().await;
    let gw = TestGateway::start_with(outbox_config(&table, &database_url())).await;
    let (mut waiter, _) = gw.join("waiter", &staff(10, 1, &[1], &["WAITER"])).await;
    gw.wait_metric("wsgateway_outbox_consuming", |v| v == 1.0)
        .await;
    table
        .db
        .batch_execute(&format!(
            "ALTER TABLE {} DISABLE TRIGGER wsgateway_notify",
            table.name.sql("")
        ))
        .await
        .unwrap();
    table.commit(&[(vec![WAITERS], order(1))]).await;
    assert_eq!(
        numbers_until(&mut waiter, 1, Duration::from_secs(5)).await,
        [1]
    );
    gw.stop().await;
}

#[tokio::test]
async fn the_database_goes_away_and_consumption_resumes() {
    let table = Table::create().await;
    let url = database_url();
    let upstream: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let port_in_url = url.contains("127.0.0.1:5432") || url.contains("localhost:5432");
    assert!(
        port_in_url,
        "this test proxies 127.0.0.1:5432 (TEST_DATABASE_URL is {url})"
    );
    let proxy = TcpProxy::start(upstream).await;
    let proxied = url
        .replace("127.0.0.1:5432", &proxy.addr.to_string())
        .replace("localhost:5432", &proxy.addr.to_string());
    let gw = TestGateway::start_with(outbox_config(&table, &proxied)).await;
    let (mut waiter, _) = gw.join("waiter", &staff(10, 1, &[1], &["WAITER"])).await;
    table.commit(&[(vec![WAITERS], order(1))]).await;
    assert_eq!(
        numbers_until(&mut waiter, 1, Duration::from_secs(5)).await,
        [1]
    );

    proxy.set_up(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, health) = gw.get_json("/ws/health/detailed").await;
        if health["outbox"]["status"] == "degraded" {
            assert_eq!(health["status"], "degraded", "{health}");
            assert!(health["outbox"]["reason"].is_string(), "{health}");
            break;
        }
        assert!(Instant::now() < deadline, "{health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Written while the gateway cannot see the database.
    table
        .commit(&[(vec![WAITERS], order(2)), (vec![WAITERS], order(3))])
        .await;
    proxy.set_up(true);
    assert_eq!(
        numbers_until(&mut waiter, 2, Duration::from_secs(20)).await,
        [2, 3]
    );
    gw.wait_metric("wsgateway_outbox_consuming", |v| v == 1.0)
        .await;
    let (_, health) = gw.get_json("/ws/health/detailed").await;
    assert_eq!(health["outbox"]["status"], "ok", "{health}");
    assert!(
        numbers(&mut waiter, Duration::from_millis(300))
            .await
            .is_empty()
    );
    gw.stop().await;
}

#[tokio::test]
async fn two_nodes_consume_one_table_and_publish_each_row_once() {
    let table = Table::create().await;
    let redis = RedisServer::start();
    let url = redis.url();
    let node = |url: String| {
        let outbox = outbox_config(&table, &database_url());
        move |c: &mut wsgateway::Config| {
            outbox(c);
            c.redis_url = Some(Secret(url));
        }
    };
    let a = TestGateway::start_with(node(url.clone())).await;
    let b = TestGateway::start_with(node(url.clone())).await;
    let (mut on_a, _) = a.join("waiter", &staff(10, 1, &[1], &["WAITER"])).await;
    let (mut on_b, _) = b.join("waiter", &staff(11, 1, &[1], &["WAITER"])).await;
    // A waiter's scopes: its branch, its user, its tenant's staff.
    a.wait_scopes(3).await;
    b.wait_scopes(3).await;
    for t in 0..30 {
        let rows: Vec<_> = (0..10)
            .map(|i| (vec![WAITERS], order(1 + t * 10 + i)))
            .collect();
        table.commit(&rows).await;
    }
    let expected: Vec<i64> = (1..=300).collect();
    assert_eq!(
        numbers_until(&mut on_a, 300, Duration::from_secs(20)).await,
        expected
    );
    assert_eq!(
        numbers_until(&mut on_b, 300, Duration::from_secs(20)).await,
        expected
    );
    table.wait_empty().await;
    let published = a
        .metric(r#"wsgateway_outbox_rows_total{outcome="published"}"#)
        .await
        + b.metric(r#"wsgateway_outbox_rows_total{outcome="published"}"#)
            .await;
    assert_eq!(published, 300.0);
    let consuming =
        a.metric("wsgateway_outbox_consuming").await + b.metric("wsgateway_outbox_consuming").await;
    assert_eq!(consuming, 1.0, "one node holds the lock");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_consumer_killed_between_publishing_and_committing_publishes_nothing_twice() {
    let table = Table::create().await;
    let redis = RedisServer::start();
    let url = redis.url();
    let db_url = database_url();
    let env = [
        ("REDIS_URL", url.as_str()),
        ("WSGATEWAY_OUTBOX_TABLE", &table.written()),
        ("WSGATEWAY_OUTBOX_DATABASE_URL", db_url.as_str()),
        ("WSGATEWAY_OUTBOX_POLL_S", "0.2"),
    ]
    .map(|(k, v)| (k, v.to_owned()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = ServeProcess::start(&env).await;
    let metric = |addr: String, sample: &'static str| async move {
        let text = reqwest::get(format!("http://{addr}/ws/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_value(&text, sample).unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(a.addr.clone(), "wsgateway_outbox_consuming").await != 1.0 {
        assert!(Instant::now() < deadline, "node A never took the lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = ServeProcess::start(&env).await;
    let token = staff(10, 1, &[1], &["WAITER"]);
    let mut waiter = Client::open(&format!("ws://{}/ws/waiter?token={token}", b.addr), None).await;
    assert_eq!(waiter.next_json().await.unwrap()["type"], "connected");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(b.addr.clone(), "wsgateway_redis_subscribed_scopes").await < 3.0 {
        assert!(Instant::now() < deadline, "node B never subscribed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The consumer's DELETE stalls: A has published and not committed.
    table
        .db
        .batch_execute(&format!(
            "CREATE FUNCTION {schema}.stall() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$; \
             CREATE TRIGGER stall BEFORE DELETE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {schema}.stall();",
            schema = table.name.schema.as_deref().unwrap(),
            t = table.name.sql(""),
        ))
        .await
        .unwrap();
    let rows: Vec<_> = (1..=50).map(|n| (vec![WAITERS], order(n))).collect();
    table.commit(&rows).await;
    assert_eq!(
        numbers_until(&mut waiter, 50, Duration::from_secs(10)).await,
        (1..=50).collect::<Vec<_>>()
    );
    a.signal("KILL");
    table
        .db
        .batch_execute(&format!("DROP TRIGGER stall ON {}", table.name.sql("")))
        .await
        .unwrap();
    // B takes the lock and publishes the 50 rows again, with their ids:
    // the broker takes them as duplicates, and nobody gets them twice.
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(
        b.addr.clone(),
        r#"wsgateway_outbox_rows_total{outcome="duplicate"}"#,
    )
    .await
        < 50.0
    {
        assert!(Instant::now() < deadline, "node B did not take over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    table.wait_empty().await;
    table.commit(&[(vec![WAITERS], order(51))]).await;
    assert_eq!(
        numbers_until(&mut waiter, 1, Duration::from_secs(10)).await,
        [51]
    );
    assert!(
        numbers(&mut waiter, Duration::from_millis(300))
            .await
            .is_empty()
    );
    b.terminate();
    let (status, log) = b.wait().await;
    assert!(status.success(), "{log}");
}

#[tokio::test]
async fn postgresql_crashes_and_restarts_and_consumption_resumes() {
    // A server of this test's own, restarted as after a crash (SIGQUIT),
    // reached over TLS as a production database would be.
    let mut pg = common::pg_tls::TlsPostgres::start().await;
    let name = TableName::parse_setting("outbox").unwrap();
    let admin = pg.admin().await;
    admin
        .batch_execute(&wsgateway::outbox::schema(&name))
        .await
        .unwrap();
    let ca = pg.ca.display().to_string();
    let url = pg.url(
        "postgres",
        "127.0.0.1",
        &[("sslmode", "verify-full"), ("sslrootcert", &ca)],
    );
    let gw = TestGateway::start_with(move |c| {
        c.outbox_table = Some(name);
        c.outbox_database_url = Some(Secret(url));
        c.outbox_poll_s = wsgateway::config::Secs(Duration::from_millis(200));
    })
    .await;
    let (mut waiter, _) = gw.join("waiter", &staff(10, 1, &[1], &["WAITER"])).await;
    let insert = |db: tokio_postgres::Client, from: i64| async move {
        db.batch_execute("BEGIN").await.unwrap();
        for n in from..from + 10 {
            db.execute(
                "INSERT INTO outbox (channels, event) VALUES ($1, $2::text::jsonb)",
                &[&vec![WAITERS.to_owned()], &order(n).to_string()],
            )
            .await
            .unwrap();
        }
        db.batch_execute("COMMIT").await.unwrap();
    };
    insert(admin, 1).await;
    assert_eq!(
        numbers_until(&mut waiter, 10, Duration::from_secs(10)).await,
        (1..=10).collect::<Vec<_>>()
    );

    pg.crash_and_restart().await;
    // The consumer lost its session; it comes back by itself. Rows whose
    // deletion the crash undid are published again as duplicates: no
    // client gets them twice.
    insert(pg.admin().await, 11).await;
    assert_eq!(
        numbers_until(&mut waiter, 10, Duration::from_secs(30)).await,
        (11..=20).collect::<Vec<_>>()
    );
    assert!(
        numbers(&mut waiter, Duration::from_millis(300))
            .await
            .is_empty()
    );
    gw.wait_metric(r#"wsgateway_outbox_errors_total{kind="database"}"#, |v| {
        v >= 1.0
    })
    .await;
    let (_, health) = gw.get_json("/ws/health/detailed").await;
    assert_eq!(health["outbox"]["status"], "ok", "{health}");
    gw.stop().await;
}

#[tokio::test]
async fn a_row_asks_for_an_ack_with_its_event_and_is_redelivered_then_escalated() {
    let table = Table::create().await;
    let gw = TestGateway::start_with(outbox_config(&table, &database_url())).await;
    let (mut kitchen, _) = gw.join("kitchen", &staff(1, 1, &[1], &["KITCHEN"])).await;
    let (mut admin, _) = gw.join("admin", &staff(2, 1, &[1], &["ADMIN"])).await;
    let mut asked = order(1);
    asked["ack"] = json!({"within_s": 1});
    let mut acked = order(2);
    acked["ack"] = json!({"within_s": 1});
    table
        .commit(&[
            (vec!["channel:branch:1:kitchen"], asked),
            (vec!["channel:branch:1:kitchen"], acked),
        ])
        .await;
    let first = kitchen.next_json().await.unwrap();
    let second = kitchen.next_json().await.unwrap();
    assert_eq!(first["ack"], json!({"within_s": 1}), "{first}");
    let (ignored, answered) = (first["event_id"].clone(), second["event_id"].clone());
    assert!(ignored.is_string() && answered.is_string());
    kitchen
        .send_text(&json!({"type": "ack", "event_ids": [answered]}).to_string())
        .await;
    // One redelivery, of the row not acked.
    let again = kitchen
        .next_json_within(Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        (&again["redelivered"], &again["event_id"]),
        (&json!(true), &ignored)
    );
    assert_eq!(
        kitchen.drain(Duration::from_millis(1_500)).await,
        Vec::<Value>::new()
    );
    let escalations: Vec<Value> = admin
        .drain(Duration::from_millis(500))
        .await
        .into_iter()
        .filter(|f| f["type"] == "EVENT_UNACKNOWLEDGED")
        .collect();
    assert_eq!(escalations.len(), 1, "{escalations:?}");
    assert_eq!(escalations[0]["event_id"], ignored);
    gw.assert_metric("acks_total{outcome=\"acknowledged\"}", 1.0)
        .await;
    gw.stop().await;
}
