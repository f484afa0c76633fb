//! The gateway's log, captured in-process as the JSON lines that
//! `WSGATEWAY_LOG_FORMAT=json` prints.
//!
//! The capture is the thread's default subscriber, so it sees what runs on
//! the test's thread: use it from a `#[tokio::test]` (a current-thread
//! runtime), where a [`super::TestGateway`] and all its tasks run on that
//! thread, and other tests running at the same time are not captured.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::Value;
use tracing::subscriber::DefaultGuard;

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every line logged at `info` or above on this thread while it lives.
pub struct Logs {
    sink: Sink,
    _guard: DefaultGuard,
}

impl Logs {
    pub fn capture() -> Logs {
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish();
        Logs {
            sink,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// The lines so far, parsed.
    pub fn lines(&self) -> Vec<Value> {
        let bytes = self.sink.0.lock().clone();
        String::from_utf8(bytes)
            .expect("UTF-8 log")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
            .collect()
    }

    /// The lines so far whose message is `message`.
    pub fn with_message(&self, message: &str) -> Vec<Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["fields"]["message"] == message)
            .collect()
    }

    /// Waits (up to 10 s) until a line satisfies `check`; returns it.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = self.lines().into_iter().find(&check) {
                return line;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("no log line {what} within 10 s; log:\n{:#?}", self.lines());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
