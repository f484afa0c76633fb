//! What one pass of the outbox consumer costs in PostgreSQL, the way
//! `src/outbox/consumer.rs` runs it and the ways it could: one row
//! committed, then one pass claims, deletes and commits it (no broker, no
//! clients), `--passes` times per variant. Per pass: wall time and the CPU
//! of the consumer's PostgreSQL backend (from /proc, so PostgreSQL must
//! run on this machine).
//!
//! ```sh
//! cargo run --release -p wsgateway-bench --example outbox_pass -- \
//!     postgres://postgres@127.0.0.1:5432/test 2000
//! ```
//!
//! Variants:
//! - `as_is`: the consumer's statements as text (tokio-postgres prepares
//!   an unnamed statement for each call: one more round trip and a parse
//!   and plan each time), and the lag query after the pass;
//! - `prepared`: the same statements prepared once per session;
//! - `prepared_no_lag`: and no lag query after a pass (the lag taken from
//!   the claimed rows, or only when the pass found the table empty);
//! - `delete_returning`: claim and delete in one prepared statement
//!   (`DELETE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING`),
//!   no lag query;
//! - `..._async_commit`: the same with `synchronous_commit = off` in the
//!   consumer's session (its DELETE's commit does not wait for the WAL
//!   flush; lost in a crash, the rows are published again with the same
//!   `event_id`s, which the broker takes as duplicates).

use std::time::Instant;

use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn ticks(pid: i32) -> u64 {
    wsgateway_bench::procfs::cpu_ticks(&format!("/proc/{pid}/stat"))
}

#[tokio::main]
async fn main() {
    let mut argv = std::env::args().skip(1);
    let url = argv
        .next()
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
    let passes: usize = argv.next().map_or(2000, |n| n.parse().unwrap());
    let schema = format!("wsx_pass_{}", std::process::id());
    let t = format!("{schema}.outbox");
    let writer = connect(&url).await;
    writer
        .batch_execute(&format!(
            "CREATE SCHEMA {schema}; CREATE TABLE {t} (id bigserial primary key, \
             channels text[] not null, event jsonb not null, event_id text, \
             created_at timestamptz not null default now())"
        ))
        .await
        .unwrap();
    let insert = writer
        .prepare(&format!(
            "INSERT INTO {t} (channels, event) VALUES \
             (ARRAY['channel:branch:1:waiters'], '{{\"type\":\"ROUND_READY\",\"tenant_id\":1,\"branch_id\":1}}')"
        ))
        .await
        .unwrap();
    let claim = format!(
        "SELECT id, channels, event::text, event_id FROM {t} ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
    );
    let delete = format!("DELETE FROM {t} WHERE id = ANY($1)");
    let lag = format!(
        "SELECT COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - \
         (SELECT created_at FROM {t} ORDER BY id LIMIT 1)), 0)::float8"
    );
    let delete_returning = format!(
        "DELETE FROM {t} WHERE id IN (SELECT id FROM {t} ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
         RETURNING id, channels, event::text, event_id"
    );
    println!("variant                       per pass: wall µs (median), PostgreSQL backend CPU µs");
    for name in [
        "as_is",
        "prepared",
        "prepared_no_lag",
        "delete_returning",
        "as_is_async_commit",
        "prepared_no_lag_async_commit",
    ] {
        let variant = name.trim_end_matches("_async_commit");
        let mut consumer = connect(&url).await;
        if name.ends_with("_async_commit") {
            consumer
                .batch_execute("SET synchronous_commit = off")
                .await
                .unwrap();
        }
        let pid: i32 = consumer
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let p_claim = consumer.prepare(&claim).await.unwrap();
        let p_delete = consumer.prepare(&delete).await.unwrap();
        let p_lag = consumer.prepare(&lag).await.unwrap();
        let p_dr = consumer.prepare(&delete_returning).await.unwrap();
        let limit = 500i64;
        let mut walls = Vec::with_capacity(passes);
        let before = ticks(pid);
        for _ in 0..passes {
            writer.execute(&insert, &[]).await.unwrap();
            let began = Instant::now();
            let tx = consumer.transaction().await.unwrap();
            let ids: Vec<i64> = match variant {
                "as_is" => tx.query(&claim, &[&limit]).await.unwrap(),
                "delete_returning" => tx.query(&p_dr, &[&limit]).await.unwrap(),
                _ => tx.query(&p_claim, &[&limit]).await.unwrap(),
            }
            .iter()
            .map(|r| r.get(0))
            .collect();
            assert_eq!(ids.len(), 1);
            match variant {
                "as_is" => {
                    tx.execute(&delete, &[&ids]).await.unwrap();
                }
                "delete_returning" => {}
                _ => {
                    tx.execute(&p_delete, &[&ids]).await.unwrap();
                }
            }
            tx.commit().await.unwrap();
            match variant {
                "as_is" => {
                    consumer.query_one(&lag, &[]).await.unwrap();
                }
                "prepared" => {
                    consumer.query_one(&p_lag, &[]).await.unwrap();
                }
                _ => {}
            }
            walls.push(began.elapsed().as_micros() as u64);
        }
        let cpu_us = ticks(pid).saturating_sub(before) as f64 * 1e4 / passes as f64;
        walls.sort_unstable();
        println!("{name:<30}{:>10}{:>28.0}", walls[walls.len() / 2], cpu_us);
    }
    writer
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
