//! The consumer's loop: connect and `LISTEN`, take the table's lock (or
//! wait as a standby), and claim, check, publish and delete rows in one
//! transaction per batch, until the node starts draining.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::poll_fn;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, Statement};
use tokio_util::sync::CancellationToken;

use super::{Outbox, OutboxSettings};
use crate::broker::backoff::Backoff;
use crate::broker::{Broker, BrokerError, EventQueue, Publication, Rules, read_item};
use crate::event::unix_ms;

/// Statements the consumer runs, for its table.
struct Sql {
    listen: String,
    claim: String,
    delete: String,
    dead: String,
    lag: String,
    /// The advisory lock's key: one per table name.
    lock_key: i64,
}

impl Sql {
    fn new(settings: &OutboxSettings) -> Sql {
        let t = settings.table.sql("");
        let dead = settings.table.sql("_dead");
        let written = settings.table.as_written();
        Sql {
            listen: format!("LISTEN \"{written}\""),
            claim: format!(
                "SELECT id, channels, event::text, event_id FROM {t} \
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
            ),
            delete: format!("DELETE FROM {t} WHERE id = ANY($1)"),
            dead: format!(
                "INSERT INTO {dead} (id, channels, event, event_id, created_at, error) \
                 SELECT id, channels, event, event_id, created_at, $2 FROM {t} WHERE id = $1 \
                 ON CONFLICT (id) DO NOTHING"
            ),
            lag: format!(
                "SELECT COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - \
                 (SELECT created_at FROM {t} ORDER BY id LIMIT 1)), 0)::float8"
            ),
            lock_key: lock_key(&written),
        }
    }
}

/// FNV-1a of the table's name: the same key on every node, a different one
/// per table.
fn lock_key(table: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "wsgateway-outbox:".bytes().chain(table.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// How often the oldest row's age is read (a query of its own): at a
/// steady rate every commit makes a pass, and reading it after each one
/// cost PostgreSQL as much as the pass (BENCHMARKS.md, the outbox).
const LAG_EVERY: Duration = Duration::from_secs(1);

/// The session's statements, prepared once: as text, each would be
/// prepared again at every pass, a round trip and a parse each.
struct Prepared {
    claim: Statement,
    delete: Statement,
    dead: Statement,
    lag: Statement,
}

impl Prepared {
    async fn new(client: &Client, sql: &Sql) -> Result<Prepared, tokio_postgres::Error> {
        Ok(Prepared {
            claim: client.prepare(&sql.claim).await?,
            delete: client.prepare(&sql.delete).await?,
            dead: client.prepare(&sql.dead).await?,
            lag: client.prepare(&sql.lag).await?,
        })
    }
}

/// What one pass did.
enum Pass {
    /// This node does not hold the lock.
    Standby,
    /// The claim found no row.
    Empty,
    /// Fewer rows than a batch: the table is drained for now.
    Drained,
    /// A full batch: there may be more.
    More,
    /// The broker refused: the rows stay, to be tried after a pause.
    BrokerRefused,
}

/// Consumes the table until `stop` (the node drains: another node takes
/// the lock, which this one releases by closing its connection).
pub async fn run(
    outbox: Arc<Outbox>,
    settings: OutboxSettings,
    broker: Arc<dyn Broker>,
    queue: Arc<EventQueue>,
    stop: CancellationToken,
) {
    let sql = Sql::new(&settings);
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    tracing::info!(table = %settings.table.as_written(), "outbox: consuming");
    loop {
        let ended = tokio::select! {
            _ = stop.cancelled() => break,
            ended = session(&outbox, &settings, &sql, broker.as_ref(), &queue, &mut backoff) => ended,
        };
        let reason = ended.to_string();
        tracing::warn!(error = %reason, "outbox: database session lost; reconnecting");
        outbox
            .metrics
            .outbox_errors
            .with_label_values(&["database"])
            .inc();
        outbox.connected(false, Some(reason));
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    outbox.connected(false, None);
}

/// One database session: returns only when it fails.
async fn session(
    outbox: &Outbox,
    settings: &OutboxSettings,
    sql: &Sql,
    broker: &dyn Broker,
    queue: &EventQueue,
    backoff: &mut Backoff,
) -> SessionError {
    let woken = Arc::new(Notify::new());
    let mut client = match connect(settings, woken.clone()).await {
        Ok(client) => client,
        Err(e) => return e,
    };
    if let Err(e) = client.batch_execute(&sql.listen).await {
        return e.into();
    }
    let statements = match Prepared::new(&client, sql).await {
        Ok(statements) => statements,
        Err(e) => return e.into(),
    };
    outbox.connected(true, None);
    backoff.reset();
    let mut consuming = false;
    let mut lag_read: Option<tokio::time::Instant> = None;
    loop {
        let result: Result<Pass, SessionError> = async {
            if !consuming {
                let row = client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&sql.lock_key])
                    .await?;
                consuming = row.get(0);
                outbox.consuming(consuming);
                if consuming {
                    tracing::info!("outbox: this node holds the table's lock and publishes");
                }
            }
            let pass = if consuming {
                let max_batch = room(queue).await;
                pass(
                    &mut client,
                    settings,
                    max_batch,
                    &statements,
                    outbox,
                    broker,
                )
                .await?
            } else {
                Pass::Standby
            };
            if matches!(pass, Pass::Empty) {
                outbox.lag(0.0);
            } else if lag_read.is_none_or(|at| at.elapsed() >= LAG_EVERY) {
                let lag: f64 = client.query_one(&statements.lag, &[]).await?.get(0);
                outbox.lag(lag);
                lag_read = Some(tokio::time::Instant::now());
            }
            Ok(pass)
        }
        .await;
        match result {
            Err(e) => return e,
            Ok(Pass::More) => continue,
            Ok(Pass::Drained | Pass::Empty) => {
                // A notification, or the poll for one that was lost.
                let _ = tokio::time::timeout(settings.poll, woken.notified()).await;
            }
            // Not woken by notifications: a standby tries the lock at each
            // poll, not at each commit; a refusing broker needs the pause.
            Ok(Pass::Standby | Pass::BrokerRefused) => tokio::time::sleep(settings.poll).await,
        }
    }
}

/// Waits until this node's event queue is at most half full, and returns
/// that half: the most rows a pass may claim. A backlog drains faster than
/// the dispatcher delivers, and a full queue drops its oldest events: the
/// outbox's rows would be lost after being published. (Through Redis the
/// other nodes' queues see the same pace as this one.)
async fn room(queue: &EventQueue) -> usize {
    let half = queue.capacity() / 2;
    while queue.len() > half {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    half.max(1)
}

/// Connects, and drives the connection on a task of its own that wakes
/// `woken` at every notification.
async fn connect(settings: &OutboxSettings, woken: Arc<Notify>) -> Result<Client, SessionError> {
    let mut config = settings.database.config.clone();
    // A claim is short; a transaction left open by a node that hangs
    // releases its rows (and the lock, with the session) within a minute.
    crate::postgres::add_options(
        &mut config,
        "-c statement_timeout=30000 -c idle_in_transaction_session_timeout=60000",
    );
    config.connect_timeout(Duration::from_secs(10));
    match &settings.tls {
        None => {
            let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(drive(conn, woken));
            Ok(client)
        }
        Some(tls) => {
            let (client, conn) = config.connect(tls.clone()).await?;
            tokio::spawn(drive(conn, woken));
            Ok(client)
        }
    }
}

async fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>, woken: Arc<Notify>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(message) = poll_fn(|cx| conn.poll_message(cx)).await {
        match message {
            Ok(AsyncMessage::Notification(_)) => woken.notify_one(),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "outbox: connection ended");
                break;
            }
        }
    }
    // The client's next call fails, and the session is replaced; wake it
    // so that this happens now rather than at the next poll.
    woken.notify_one();
}

/// Claims up to a batch of rows, publishes the valid ones, sets the others
/// aside, and deletes them all, in one transaction.
async fn pass(
    client: &mut Client,
    settings: &OutboxSettings,
    max_batch: usize,
    sql: &Prepared,
    outbox: &Outbox,
    broker: &dyn Broker,
) -> Result<Pass, SessionError> {
    let tx = client.transaction().await?;
    let batch = settings.batch.min(max_batch);
    let limit = batch as i64;
    let rows = tx.query(&sql.claim, &[&limit]).await?;
    let full = rows.len() == batch;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(Pass::Empty);
    }
    let rules = Rules {
        now_ms: unix_ms(),
        stale_ms: settings.stale_event.as_millis() as i64,
        // One row is one item.
        max_items: 1,
        max_channels: settings.max_channels,
    };
    let table = settings.table.as_written();
    let mut good: Vec<Publication> = Vec::with_capacity(rows.len());
    let mut ids: Vec<i64> = Vec::with_capacity(rows.len());
    let mut dead = 0u64;
    for row in &rows {
        let id: i64 = row.get(0);
        let item = row_item(
            &table,
            id,
            row.get::<_, Vec<Option<String>>>(1),
            row.get::<_, String>(2),
            row.get::<_, Option<String>>(3),
        );
        match read_item(item, &rules) {
            Ok(publication) => good.push(publication),
            Err(invalid) => {
                tracing::warn!(row = id, error = %invalid, "outbox: row set aside");
                tx.execute(&sql.dead, &[&id, &invalid.to_string()]).await?;
                dead += 1;
            }
        }
        ids.push(id);
    }
    let (mut published, mut duplicates) = (0u64, 0u64);
    if !good.is_empty() {
        match broker.publish(good).await {
            Ok(done) => {
                duplicates = done.iter().filter(|p| p.duplicate).count() as u64;
                published = done.len() as u64 - duplicates;
            }
            Err(e) => {
                let reason = match e {
                    BrokerError::Unavailable(why) => format!("broker unavailable: {why}"),
                    BrokerError::OutcomeUnknown(why) => format!("broker outcome unknown: {why}"),
                };
                tracing::warn!(error = %reason, rows = ids.len(), "outbox: publish failed; rows kept");
                outbox
                    .metrics
                    .outbox_errors
                    .with_label_values(&["broker"])
                    .inc();
                outbox.failed(reason);
                tx.rollback().await?;
                return Ok(Pass::BrokerRefused);
            }
        }
    }
    tx.execute(&sql.delete, &[&ids]).await?;
    // Published and not deleted, should this fail: the next pass publishes
    // them again with the same ids, which the broker takes as duplicates.
    tx.commit().await?;
    outbox.metrics.published(published, duplicates);
    outbox.passed(published, duplicates, dead);
    Ok(if full { Pass::More } else { Pass::Drained })
}

/// A row as a publish API item: its `event_id` is the column's, else the
/// event's own, else `outbox:<table>:<id>`.
fn row_item(
    table: &str,
    id: i64,
    channels: Vec<Option<String>>,
    event: String,
    event_id: Option<String>,
) -> Value {
    let mut event: Value = serde_json::from_str(&event).unwrap_or(Value::Null);
    if let Value::Object(fields) = &mut event {
        match event_id {
            Some(given) => {
                fields.insert("event_id".into(), Value::String(given));
            }
            None if !fields.contains_key("event_id") => {
                fields.insert("event_id".into(), format!("outbox:{table}:{id}").into());
            }
            None => {}
        }
    }
    let channels: Vec<Value> = channels
        .into_iter()
        .map(|c| c.map(Value::String).unwrap_or(Value::Null))
        .collect();
    json!({"channels": channels, "event": event})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_takes_the_columns_id_else_the_events_else_one_from_its_id() {
        let ev = r#"{"type":"X","tenant_id":1,"branch_id":5,"event_id":"own"}"#;
        let ch = || vec![Some("channel:branch:5:waiters".to_owned())];
        let item = row_item("o", 7, ch(), ev.into(), Some("col".into()));
        assert_eq!(item["event"]["event_id"], "col");
        let item = row_item("o", 7, ch(), ev.into(), None);
        assert_eq!(item["event"]["event_id"], "own");
        let ev = r#"{"type":"X","tenant_id":1,"branch_id":5}"#;
        let item = row_item("app.o", 7, ch(), ev.into(), None);
        assert_eq!(item["event"]["event_id"], "outbox:app.o:7");
        assert_eq!(item["channels"][0], "channel:branch:5:waiters");
    }

    #[test]
    fn each_table_has_its_own_lock() {
        assert_eq!(lock_key("a"), lock_key("a"));
        assert_ne!(lock_key("a"), lock_key("b"));
    }
}
