//! What every connection task shares: the parts a connection's life
//! touches, and the settings it reads. Built once, by the gateway.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::acks::Acks;
use crate::auth::Verifier;
use crate::broker::Broker;
use crate::config::{Config, Origins};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::revocation::Revocations;
use crate::sectors::SectorAssignments;
use crate::sectors::sync::SectorSync;

pub struct Context {
    pub settings: Settings,
    pub verifier: Verifier,
    /// The revoked-token set, when `WSGATEWAY_REVOKED_JTI_KEY` is set.
    pub revocations: Option<Revocations>,
    pub hub: Arc<Hub>,
    /// For resumes (history reads).
    pub broker: Arc<dyn Broker>,
    pub sectors: Arc<SectorAssignments>,
    /// Who is connected (an admin's `presence`).
    pub presence: Arc<Presence>,
    /// Requests to the sector sync task (refreshes).
    pub sector_sync: SectorSync,
    /// Receipts and acks of events asking for an ack.
    pub acks: Acks,
    /// `WSGATEWAY_RESUME_CONCURRENCY` places for history reads: in a
    /// reconnect storm resumes queue here, rather than sending Redis
    /// thousands of reads whose replies then time out together (dropping
    /// the shared command connection and opening the breaker).
    pub resume_reads: Semaphore,
    pub metrics: Arc<Metrics>,
    /// Cancelled at the first SIGTERM or SIGINT: upgrades are refused
    /// (503), and a connection admitted after it closes at once (1012);
    /// the ones in the hub are closed by the drain ([`crate::drain`]).
    pub draining: CancellationToken,
    /// Cancelled once, when the drain is over: the workers stop.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

/// The settings a connection reads, from [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// `ALLOWED_ORIGINS`.
    pub allowed_origins: Option<Origins>,
    /// `WSGATEWAY_HEARTBEAT_INTERVAL_S`, told to the client in `connected`.
    pub heartbeat_interval: Duration,
    /// `WSGATEWAY_SEND_QUEUE_SIZE`.
    pub send_queue_size: usize,
    /// `WSGATEWAY_MAX_MESSAGE_BYTES`.
    pub max_message_bytes: usize,
    /// `WSGATEWAY_RATE_LIMIT_PER_S`.
    pub rate_limit_per_s: u32,
    /// `WSGATEWAY_CLOSE_TIMEOUT_S`.
    pub close_timeout: Duration,
    /// `WSGATEWAY_DEDUP_WINDOW_S`: how long a resume skips live repeats.
    pub dedup_window: Duration,
    /// `WSGATEWAY_RESUME_WAIT_S`.
    pub resume_wait: Duration,
    /// `WSGATEWAY_REDIS_TIMEOUT_S`: the bound on a history read.
    pub redis_timeout: Duration,
}

impl Settings {
    pub fn from_config(config: &Config) -> Settings {
        Settings {
            allowed_origins: config.allowed_origins.clone(),
            heartbeat_interval: config.heartbeat_interval_s.0,
            send_queue_size: config.send_queue_size,
            max_message_bytes: config.max_message_bytes,
            rate_limit_per_s: config.rate_limit_per_s,
            close_timeout: config.close_timeout_s.0,
            dedup_window: config.dedup_window_s.0,
            resume_wait: config.resume_wait_s.0,
            redis_timeout: config.redis_timeout_s.0,
        }
    }
}
