//! Draining: what a node does between the first SIGTERM (or SIGINT) and
//! its exit. Readiness turns off and WebSocket upgrades are refused (503)
//! from the first moment (the routes read the `draining` token); here the
//! open connections are closed with 1012, spread evenly over
//! `WSGATEWAY_DRAIN_S`, so that their clients reconnect to the other nodes
//! (and fetch tokens) a few at a time rather than all at once. A second
//! signal closes the rest at once.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::close::Close;
use crate::hub::Hub;

/// Closes the connections `hub` holds now with 1012, the i-th of n at
/// i·window/n from now; all at once when `window` is zero or `hurry` is
/// cancelled. Returns when every one has been asked to close.
pub async fn close_spread(hub: &Hub, window: Duration, hurry: &CancellationToken) {
    let ids = hub.ids();
    let n = ids.len();
    tracing::info!(
        connections = n,
        window_s = window.as_secs_f64(),
        "draining: closing connections with 1012"
    );
    if window.is_zero() {
        hub.close_all(Close::Shutdown);
        return;
    }
    let start = Instant::now();
    let window_ns = window.as_nanos();
    let mut closed = 0;
    while closed < n {
        // The i-th is due once elapsed ≥ i·window/n.
        let elapsed = start.elapsed().as_nanos();
        let due = ((elapsed * n as u128 / window_ns) as usize + 1).min(n);
        if due > closed {
            hub.close_ids(&ids[closed..due], Close::Shutdown);
            closed = due;
        }
        if closed == n {
            break;
        }
        // Rounded up, so that the next pass finds the next one due.
        let next_ns = (window_ns * closed as u128).div_ceil(n as u128);
        tokio::select! {
            _ = tokio::time::sleep_until(start + Duration::from_nanos(next_ns as u64)) => {}
            _ = hurry.cancelled() => {
                hub.close_all(Close::Shutdown);
                return;
            }
        }
    }
}
