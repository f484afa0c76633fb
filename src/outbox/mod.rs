//! The transactional outbox (docs/OUTBOX.md): events the backend wrote in
//! a table of its own database, in the same transaction as the data they
//! describe, published once committed.
//!
//! One node at a time consumes a table: the holder of a session advisory
//! lock ([`consumer`]). It claims rows in id order (`FOR UPDATE SKIP
//! LOCKED`), checks each as the publish API does, publishes the good ones
//! through the broker with an `event_id` (the row's, or one derived from
//! its id), and deletes them in the transaction that claimed them; a row
//! that fails the checks is moved to `<table>_dead`. A node that dies
//! between publishing and committing leaves the rows; whoever takes the
//! lock publishes them again with the same ids, and the broker's
//! idempotence makes that a no-op. `LISTEN` wakes the consumer; polling
//! every `WSGATEWAY_OUTBOX_POLL_S` catches what a lost notification would
//! miss.

pub mod consumer;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::{Config, TableName};
use crate::metrics::Metrics;
use crate::postgres::{tls, url};

/// The DDL `wsgateway outbox schema` prints: the table, its dead letters,
/// and the trigger that notifies the consumer once an insert commits.
pub fn schema(table: &TableName) -> String {
    let t = table.sql("");
    let dead = table.sql("_dead");
    let notify = table.sql("_notify");
    let channel = table.as_written();
    let schema = match &table.schema {
        Some(s) => format!("CREATE SCHEMA IF NOT EXISTS \"{s}\";\n\n"),
        None => String::new(),
    };
    format!(
        "-- wsgateway's transactional outbox (docs/OUTBOX.md). The backend inserts
-- one row per event in the transaction that writes the data the event
-- describes; the gateway publishes committed rows and deletes them.
{schema}CREATE TABLE IF NOT EXISTS {t} (
    id bigserial PRIMARY KEY,
    channels text[] NOT NULL,
    event jsonb NOT NULL,
    event_id text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Rows that failed the gateway's checks, with why; never retried.
CREATE TABLE IF NOT EXISTS {dead} (
    id bigint PRIMARY KEY,
    channels text[],
    event jsonb,
    event_id text,
    created_at timestamptz NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now(),
    error text NOT NULL
);

-- Wakes the consumer when an insert commits (a notification is sent at
-- commit, and never for a rolled-back transaction).
CREATE OR REPLACE FUNCTION {notify}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{channel}', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS wsgateway_notify ON {t};
CREATE TRIGGER wsgateway_notify AFTER INSERT ON {t}
    FOR EACH STATEMENT EXECUTE FUNCTION {notify}();
"
    )
}

/// What the consumer needs, from the configuration.
pub struct OutboxSettings {
    pub table: TableName,
    pub database: url::DatabaseUrl,
    pub tls: Option<tls::MakeConnect>,
    /// `WSGATEWAY_OUTBOX_POLL_S`.
    pub poll: Duration,
    /// `WSGATEWAY_OUTBOX_BATCH`.
    pub batch: usize,
    /// `WSGATEWAY_MAX_PUBLISH_CHANNELS`, `WSGATEWAY_STALE_EVENT_S`: a row
    /// is checked as a publish API item is.
    pub max_channels: usize,
    pub stale_event: Duration,
}

/// A database URL for the outbox that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BadOutboxUrl {
    #[error("invalid setting {0}: {1}")]
    Url(&'static str, url::UrlError),
    #[error("invalid setting {0}: {1}")]
    Tls(&'static str, tls::TlsParamError),
}

impl OutboxSettings {
    /// `None` when `WSGATEWAY_OUTBOX_TABLE` is unset.
    pub fn from_config(config: &Config) -> Result<Option<OutboxSettings>, BadOutboxUrl> {
        let Some(table) = &config.outbox_table else {
            return Ok(None);
        };
        let (setting, url) = match (&config.outbox_database_url, &config.database_url) {
            (Some(url), _) => ("WSGATEWAY_OUTBOX_DATABASE_URL", url),
            (None, Some(url)) => ("DATABASE_URL", url),
            // `check_for_serve` refuses this; a library user gets no outbox.
            (None, None) => return Ok(None),
        };
        let database = url::parse(url.expose()).map_err(|e| BadOutboxUrl::Url(setting, e))?;
        let tls = tls::connector(&database.tls).map_err(|e| BadOutboxUrl::Tls(setting, e))?;
        Ok(Some(OutboxSettings {
            table: table.clone(),
            database,
            tls,
            poll: config.outbox_poll_s.0,
            batch: config.outbox_batch,
            max_channels: config.max_publish_channels,
            stale_event: config.stale_event_s.0,
        }))
    }
}

/// The consumer's state as `/ws/health/detailed` shows it.
#[derive(Debug, Clone)]
pub struct OutboxHealth {
    pub table: String,
    /// Connected to the database, listening.
    pub connected: bool,
    /// This node holds the table's lock: it is the one publishing.
    pub consuming: bool,
    /// Age of the oldest row, as last read; `None` before the first read.
    pub lag_s: Option<f64>,
    /// Rows published (duplicates included) per second over the last minute.
    pub rows_per_s: f64,
    pub published: u64,
    pub dead_letters: u64,
    /// Why the last pass failed, while it did.
    pub reason: Option<String>,
}

/// What the consumer tells the health route; written by the consumer
/// only, read by health.
pub struct Outbox {
    table: String,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct State {
    connected: bool,
    consuming: bool,
    lag_s: Option<f64>,
    published: u64,
    dead_letters: u64,
    /// (when, rows) of the passes of the last minute.
    recent: VecDeque<(Instant, u64)>,
    reason: Option<String>,
}

const RATE_WINDOW: Duration = Duration::from_secs(60);

impl Outbox {
    pub fn new(table: &TableName, metrics: Arc<Metrics>) -> Outbox {
        Outbox {
            table: table.as_written(),
            state: Mutex::new(State::default()),
            metrics,
        }
    }

    pub fn health(&self) -> OutboxHealth {
        let mut s = self.state.lock();
        prune(&mut s.recent);
        let rows: u64 = s.recent.iter().map(|(_, n)| n).sum();
        OutboxHealth {
            table: self.table.clone(),
            connected: s.connected,
            consuming: s.consuming,
            lag_s: s.lag_s,
            rows_per_s: rows as f64 / RATE_WINDOW.as_secs_f64(),
            published: s.published,
            dead_letters: s.dead_letters,
            reason: s.reason.clone(),
        }
    }

    fn connected(&self, connected: bool, reason: Option<String>) {
        let mut s = self.state.lock();
        s.connected = connected;
        if !connected {
            s.consuming = false;
            self.metrics.outbox_consuming.set(0);
        }
        s.reason = reason;
    }

    fn consuming(&self, consuming: bool) {
        self.state.lock().consuming = consuming;
        self.metrics.outbox_consuming.set(i64::from(consuming));
    }

    fn lag(&self, lag_s: f64) {
        self.state.lock().lag_s = Some(lag_s);
        self.metrics.outbox_lag.set(lag_s);
    }

    fn failed(&self, reason: String) {
        self.state.lock().reason = Some(reason);
    }

    fn passed(&self, published: u64, duplicates: u64, dead: u64) {
        let mut s = self.state.lock();
        s.reason = None;
        s.published += published + duplicates;
        s.dead_letters += dead;
        if published + duplicates > 0 {
            s.recent.push_back((Instant::now(), published + duplicates));
        }
        prune(&mut s.recent);
        let m = &self.metrics;
        m.outbox_rows
            .with_label_values(&["published"])
            .inc_by(published);
        m.outbox_rows
            .with_label_values(&["duplicate"])
            .inc_by(duplicates);
        m.outbox_rows
            .with_label_values(&["dead_letter"])
            .inc_by(dead);
    }
}

fn prune(recent: &mut VecDeque<(Instant, u64)>) {
    while recent
        .front()
        .is_some_and(|(at, _)| at.elapsed() > RATE_WINDOW)
    {
        recent.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SettingValue;

    #[test]
    fn table_names_are_lower_case_identifiers_optionally_in_a_schema() {
        let t = TableName::parse_setting("wsgateway_outbox").unwrap();
        assert_eq!(t.sql("_dead"), "\"wsgateway_outbox_dead\"");
        let t = TableName::parse_setting("app.outbox_2").unwrap();
        assert_eq!(t.sql(""), "\"app\".\"outbox_2\"");
        assert_eq!(t.as_written(), "app.outbox_2");
        for bad in [
            "",
            "Outbox",
            "1outbox",
            "out box",
            "a.b.c",
            "x\"; drop table y; --",
            ".outbox",
            &"a".repeat(57),
        ] {
            assert!(TableName::parse_setting(bad).is_err(), "{bad:?}");
        }
    }
}
