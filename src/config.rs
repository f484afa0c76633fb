//! Settings: every knob of the gateway, in one table.
//!
//! Each setting has a command-line flag, an environment variable and a key in
//! the optional TOML file (`--config`); the first one given wins, in that
//! order, then the default. Values are parsed and validated once, here, so a
//! bad value stops start-up with one line that names the setting. The
//! `settings!` table below is the single source of truth: the table of
//! docs/CONFIGURATION.md is checked against it by a test.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A setting that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid setting {env} (--{flag}): {reason}")]
    Invalid {
        env: &'static str,
        flag: &'static str,
        reason: String,
    },
    #[error("missing setting {env} (--{flag}): {why}")]
    Missing {
        env: &'static str,
        flag: &'static str,
        why: &'static str,
    },
    /// Several [`ConfigError::Missing`], reported together.
    #[error("missing settings: {}", join_missing(.0))]
    MissingSeveral(Vec<ConfigError>),
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
}

/// `A (--a): why; B (--b): why`.
fn join_missing(all: &[ConfigError]) -> String {
    let each = all.iter().map(|m| match m {
        ConfigError::Missing { env, flag, why } => format!("{env} (--{flag}): {why}"),
        other => other.to_string(),
    });
    each.collect::<Vec<_>>().join("; ")
}

/// How one setting is parsed from its textual form.
pub trait SettingValue: Sized {
    /// Parses `raw`, or returns a short reason why it is not acceptable.
    fn parse_setting(raw: &str) -> Result<Self, String>;
}

/// Description of one setting, for documentation checks and `--help`.
#[derive(Debug, Clone, Copy)]
pub struct SettingInfo {
    pub env: &'static str,
    pub flag: &'static str,
    pub key: &'static str,
    pub default: Option<&'static str>,
    /// Its description (the doc comment in the table).
    pub help: &'static str,
}

impl SettingInfo {
    /// The setting whose file key is `key` (its field name, e.g.
    /// `"jwt_secret"`), for tools that set or read settings by name (the
    /// load generator): in a `const`, a key that is not a setting fails the
    /// build.
    pub const fn named(key: &str) -> &'static SettingInfo {
        let mut i = 0;
        while i < SETTINGS.len() {
            let (a, b) = (SETTINGS[i].key.as_bytes(), key.as_bytes());
            if a.len() == b.len() {
                let mut j = 0;
                while j < a.len() && a[j] == b[j] {
                    j += 1;
                }
                if j == a.len() {
                    return &SETTINGS[i];
                }
            }
            i += 1;
        }
        panic!("no setting has this key")
    }
}

macro_rules! settings {
    ($( $(#[doc = $doc:literal])* $field:ident : $ty:ty = $default:expr, env = $env:literal, flag = $flag:literal; )*) => {
        /// The settings as given on the command line or in the environment,
        /// not yet parsed (parsing happens in [`Config::load`], so that every
        /// error names the setting in the same way).
        #[derive(Debug, Default, Clone, clap::Args)]
        pub struct SettingArgs {
            $(
                $(#[doc = $doc])*
                #[arg(long = $flag, env = $env, hide_env_values = true, value_name = "VALUE")]
                pub $field: Option<String>,
            )*
        }

        /// The validated configuration of a gateway.
        #[derive(Debug, Clone)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        /// Every setting: environment variable, flag, file key and default.
        pub const SETTINGS: &[SettingInfo] = &[
            $( SettingInfo { env: $env, flag: $flag, key: stringify!($field), default: $default, help: concat!($($doc),*) }, )*
        ];

        impl Config {
            /// Resolves every setting: flag or environment, then the file, then
            /// the default.
            pub fn load(args: &SettingArgs, file: &FileSettings) -> Result<Config, ConfigError> {
                file.check_keys()?;
                Ok(Config {
                    $( $field: resolve::<$ty>(args.$field.as_deref(), file.get(stringify!($field)), $default, $env, $flag)?, )*
                })
            }
        }
    };
}

settings! {
    /// Address the HTTP and WebSocket server listens on.
    listen: SocketAddr = Some("0.0.0.0:8001"), env = "WSGATEWAY_LISTEN", flag = "listen";
    /// Secret of the staff JWTs (HS256). Required by `serve` unless a public key is configured.
    jwt_secret: Option<Secret> = None, env = "JWT_SECRET", flag = "jwt-secret";
    /// Secret of the diners' table tokens (HS256). Required by `serve`.
    table_token_secret: Option<Secret> = None, env = "TABLE_TOKEN_SECRET", flag = "table-token-secret";
    /// Algorithm of the staff JWTs: HS256, RS256 or ES256.
    jwt_algorithm: JwtAlgorithm = Some("HS256"), env = "WSGATEWAY_JWT_ALGORITHM", flag = "jwt-algorithm";
    /// PEM public key file for RS256 or ES256 staff JWTs.
    jwt_public_key_file: Option<PathBuf> = None, env = "WSGATEWAY_JWT_PUBLIC_KEY_FILE", flag = "jwt-public-key-file";
    /// Issuer staff tokens must name in `iss`; unset: `iss` is not checked.
    jwt_issuer: Option<String> = None, env = "WSGATEWAY_JWT_ISSUER", flag = "jwt-issuer";
    /// Audience staff tokens must list in `aud` (a string or an array); unset: `aud` is not checked.
    jwt_audience: Option<String> = None, env = "WSGATEWAY_JWT_AUDIENCE", flag = "jwt-audience";
    /// Clock leeway on `exp` and `nbf`, in seconds.
    jwt_leeway_s: u64 = Some("5"), env = "WSGATEWAY_JWT_LEEWAY_S", flag = "jwt-leeway-s";
    /// How often open connections have their token re-validated, in seconds.
    jwt_revalidate_s: Secs = Some("300"), env = "WSGATEWAY_JWT_REVALIDATE_S", flag = "jwt-revalidate-s";
    /// Redis set of revoked token ids (`jti`); needs REDIS_URL. Unset: no revocation.
    revoked_jti_key: Option<String> = None, env = "WSGATEWAY_REVOKED_JTI_KEY", flag = "revoked-jti-key";
    /// Browser origins allowed on the staff endpoints (comma list); unset allows any.
    allowed_origins: Option<Origins> = None, env = "ALLOWED_ORIGINS", flag = "allowed-origins";
    /// Events kept per branch and per table session for resume (`last_event_id`).
    history_size: usize = Some("1000"), env = "WSGATEWAY_HISTORY_SIZE", flag = "history-size";
    /// How long events are kept for resume, in seconds.
    history_ttl_s: Secs = Some("600"), env = "WSGATEWAY_HISTORY_TTL_S", flag = "history-ttl-s";
    /// Most events one resume may read after its cursor; beyond it, `recovered: false`. Unset: the history size.
    resume_max_events: Option<usize> = None, env = "WSGATEWAY_RESUME_MAX_EVENTS", flag = "resume-max-events";
    /// History reads (resumes) run at once per node; the others wait for a place.
    resume_concurrency: usize = Some("16"), env = "WSGATEWAY_RESUME_CONCURRENCY", flag = "resume-concurrency";
    /// Longest wait for a place among the history reads, in seconds; beyond it, `recovered: false`.
    resume_wait_s: Secs = Some("10"), env = "WSGATEWAY_RESUME_WAIT_S", flag = "resume-wait-s";
    /// Redis URL (`redis://[:password@]host:port[/db]`, `rediss://` for TLS); in sentinel mode a comma-separated list of sentinel URLs, in cluster mode of seed nodes. Unset: the embedded one-node broker.
    redis_url: Option<Secret> = None, env = "REDIS_URL", flag = "redis-url";
    /// How REDIS_URL is read: `standalone` (one server), `sentinel` (the sentinels of WSGATEWAY_REDIS_SENTINEL_MASTER) or `cluster` (seed nodes of a Redis Cluster).
    redis_mode: RedisMode = Some("standalone"), env = "WSGATEWAY_REDIS_MODE", flag = "redis-mode";
    /// Prefix of every Redis key, channel and function this deployment uses (letters, digits, `_`; at most 32), so that several deployments share one Redis server; unset: none. Required when REDIS_URL selects a database other than 0.
    redis_prefix: Option<RedisPrefix> = None, env = "WSGATEWAY_REDIS_PREFIX", flag = "redis-prefix";
    /// In sentinel mode, the name of the master the sentinels monitor (required there).
    redis_sentinel_master: Option<String> = None, env = "WSGATEWAY_REDIS_SENTINEL_MASTER", flag = "redis-sentinel-master";
    /// Password of the Redis server (in sentinel mode: of the master), when it differs from the one in REDIS_URL; unset: REDIS_URL's.
    redis_password: Option<Secret> = None, env = "WSGATEWAY_REDIS_PASSWORD", flag = "redis-password";
    /// PEM file of the CA certificates that `rediss://` servers are verified against; unset: the system roots.
    redis_ca_file: Option<PathBuf> = None, env = "WSGATEWAY_REDIS_CA_FILE", flag = "redis-ca-file";
    /// PEM file of the client certificate (chain) presented to `rediss://` servers; needs WSGATEWAY_REDIS_CLIENT_KEY_FILE.
    redis_client_cert_file: Option<PathBuf> = None, env = "WSGATEWAY_REDIS_CLIENT_CERT_FILE", flag = "redis-client-cert-file";
    /// PEM file of the client certificate's private key; needs WSGATEWAY_REDIS_CLIENT_CERT_FILE.
    redis_client_key_file: Option<PathBuf> = None, env = "WSGATEWAY_REDIS_CLIENT_KEY_FILE", flag = "redis-client-key-file";
    /// Timeout of one Redis connect or command, in seconds.
    redis_timeout_s: Secs = Some("2"), env = "WSGATEWAY_REDIS_TIMEOUT_S", flag = "redis-timeout-s";
    /// First reconnect delay after losing Redis (decorrelated jitter), in seconds.
    redis_retry_base_s: Secs = Some("0.5"), env = "WSGATEWAY_REDIS_RETRY_BASE_S", flag = "redis-retry-base-s";
    /// Longest reconnect delay, in seconds (short: live delivery is back
    /// within this, plus a moment, of Redis accepting connections again).
    redis_retry_max_s: Secs = Some("2"), env = "WSGATEWAY_REDIS_RETRY_MAX_S", flag = "redis-retry-max-s";
    /// Period of the Redis health check: every Redis connection (the
    /// subscription too) is PINGed this often, with the command timeout as
    /// deadline, in seconds.
    redis_health_check_s: Secs = Some("1"), env = "WSGATEWAY_REDIS_HEALTH_CHECK_S", flag = "redis-health-check-s";
    /// Consecutive Redis failures that open the circuit breaker.
    breaker_failure_threshold: u32 = Some("5"), env = "WSGATEWAY_BREAKER_FAILURE_THRESHOLD", flag = "breaker-failure-threshold";
    /// Time an open breaker waits before half-opening, in seconds.
    breaker_recovery_s: Secs = Some("30"), env = "WSGATEWAY_BREAKER_RECOVERY_S", flag = "breaker-recovery-s";
    /// Trial calls a half-open breaker allows; all must succeed to close it.
    breaker_half_open_calls: u32 = Some("3"), env = "WSGATEWAY_BREAKER_HALF_OPEN_CALLS", flag = "breaker-half-open-calls";
    /// Window of the event drop-rate tracker, in seconds.
    drop_rate_window_s: Secs = Some("60"), env = "WSGATEWAY_DROP_RATE_WINDOW_S", flag = "drop-rate-window-s";
    /// Drop rate (0 to 1) above which an alert is logged.
    drop_rate_alert: Ratio = Some("0.05"), env = "WSGATEWAY_DROP_RATE_ALERT", flag = "drop-rate-alert";
    /// Least time between two drop-rate alerts, in seconds.
    drop_rate_alert_cooldown_s: Secs = Some("300"), env = "WSGATEWAY_DROP_RATE_ALERT_COOLDOWN_S", flag = "drop-rate-alert-cooldown-s";
    /// PostgreSQL URL for waiters' sector assignments (TLS: sslmode, sslrootcert, sslcert, sslkey as in libpq); unset: no sector filtering.
    database_url: Option<Secret> = None, env = "DATABASE_URL", flag = "database-url";
    /// Query of a waiter's sectors in a branch ($1 user, $2 branch, $3 tenant); unset: the default of PROTOCOL.md §13.
    sector_query: Option<String> = None, env = "WSGATEWAY_SECTOR_QUERY", flag = "sector-query";
    /// How long a waiter's sectors are cached, in seconds.
    sector_cache_ttl_s: Secs = Some("300"), env = "WSGATEWAY_SECTOR_CACHE_TTL_S", flag = "sector-cache-ttl-s";
    /// Longest sector lookup before the waiter falls back to every sector, in seconds.
    sector_query_timeout_s: Secs = Some("2"), env = "WSGATEWAY_SECTOR_QUERY_TIMEOUT_S", flag = "sector-query-timeout-s";
    /// How often unknown sectors are looked up again (and a degraded database probed), in seconds.
    sector_retry_s: Secs = Some("5"), env = "WSGATEWAY_SECTOR_RETRY_S", flag = "sector-retry-s";
    /// Most PostgreSQL connections in the pool.
    database_pool_size: usize = Some("16"), env = "WSGATEWAY_DATABASE_POOL_SIZE", flag = "database-pool-size";
    /// The transactional outbox table to consume (`table` or `schema.table`, lower case); unset: no outbox. `wsgateway outbox schema` prints its DDL.
    outbox_table: Option<TableName> = None, env = "WSGATEWAY_OUTBOX_TABLE", flag = "outbox-table";
    /// The outbox's database, when not DATABASE_URL's (same format).
    outbox_database_url: Option<Secret> = None, env = "WSGATEWAY_OUTBOX_DATABASE_URL", flag = "outbox-database-url";
    /// How often the outbox is read when no notification came (a lost NOTIFY delays a row by at most this), in seconds.
    outbox_poll_s: Secs = Some("1"), env = "WSGATEWAY_OUTBOX_POLL_S", flag = "outbox-poll-s";
    /// Outbox rows claimed and published per transaction.
    outbox_batch: usize = Some("500"), env = "WSGATEWAY_OUTBOX_BATCH", flag = "outbox-batch";
    /// Bearer key of `POST /api/publish`; unset disables the publish API.
    api_key: Option<Secret> = None, env = "WSGATEWAY_API_KEY", flag = "api-key";
    /// Serve the demo page (`/`, `/client.js`) on the public address, as `dev` always does: `true` or `false`.
    demo_page: bool = Some("false"), env = "WSGATEWAY_DEMO_PAGE", flag = "demo-page";
    /// Length of the listen queue of the public address: connections the kernel completes before the gateway accepts them (a reconnect storm arrives at once). Linux caps it at `net.core.somaxconn` (4096 on kernels since 5.4).
    listen_backlog: u32 = Some("4096"), env = "WSGATEWAY_LISTEN_BACKLOG", flag = "listen-backlog";
    /// Connections allowed between accept and admission (slow handshakes); beyond it, a new one evicts the oldest still sending its request head (once read and given a tenth of the handshake timeout, at most 1 s), waits while none is evictable yet, or is closed at once when all are past their heads.
    max_pending_connections: usize = Some("1024"), env = "WSGATEWAY_MAX_PENDING_CONNECTIONS", flag = "max-pending-connections";
    /// Time a client has to send its request headers (also between keep-alive requests), in seconds.
    handshake_timeout_s: Secs = Some("10"), env = "WSGATEWAY_HANDSHAKE_TIMEOUT_S", flag = "handshake-timeout-s";
    /// Address of a second listener serving only `/ws/metrics`; unset: metrics on the public address. When set, the public `/ws/metrics` answers 404.
    metrics_listen: Option<SocketAddr> = None, env = "WSGATEWAY_METRICS_LISTEN", flag = "metrics-listen";
    /// Largest request head (request line and headers, token included), in bytes; beyond it, 431.
    max_header_bytes: usize = Some("16384"), env = "WSGATEWAY_MAX_HEADER_BYTES", flag = "max-header-bytes";
    /// Open connections allowed in total (every endpoint); beyond it, 1013.
    max_connections: usize = Some("100000"), env = "WSGATEWAY_MAX_CONNECTIONS", flag = "max-connections";
    /// Staff connections allowed per user (tenant + sub); beyond it, 4008.
    max_connections_per_user: usize = Some("3"), env = "WSGATEWAY_MAX_CONNECTIONS_PER_USER", flag = "max-connections-per-user";
    /// Diner connections allowed per table session (tenant + branch + session); beyond it, 4008.
    max_connections_per_session: usize = Some("20"), env = "WSGATEWAY_MAX_CONNECTIONS_PER_SESSION", flag = "max-connections-per-session";
    /// Largest inbound WebSocket message, in bytes; a larger one closes with 1009.
    max_message_bytes: usize = Some("65536"), env = "WSGATEWAY_MAX_MESSAGE_BYTES", flag = "max-message-bytes";
    /// Largest `POST /api/publish` body, in bytes; a larger one is a 413.
    max_publish_bytes: usize = Some("1048576"), env = "WSGATEWAY_MAX_PUBLISH_BYTES", flag = "max-publish-bytes";
    /// Most items in one `POST /api/publish` request; more is a 400 `too_many_items`.
    max_publish_items: usize = Some("1000"), env = "WSGATEWAY_MAX_PUBLISH_ITEMS", flag = "max-publish-items";
    /// Most channel names in one publish item (duplicates count); more is a
    /// 400 `too_many_channels`. Also bounds `FCALL wsgateway_publish`.
    max_publish_channels: usize = Some("100"), env = "WSGATEWAY_MAX_PUBLISH_CHANNELS", flag = "max-publish-channels";
    /// Client messages allowed per second and connection (token bucket, same burst); beyond it, 4029.
    rate_limit_per_s: u32 = Some("20"), env = "WSGATEWAY_RATE_LIMIT_PER_S", flag = "rate-limit-per-s";
    /// Heartbeat interval advertised to clients in `connected`, in seconds.
    heartbeat_interval_s: Secs = Some("30"), env = "WSGATEWAY_HEARTBEAT_INTERVAL_S", flag = "heartbeat-interval-s";
    /// A connection silent this long is closed with 1001 by the next cleanup pass, in seconds.
    heartbeat_timeout_s: Secs = Some("60"), env = "WSGATEWAY_HEARTBEAT_TIMEOUT_S", flag = "heartbeat-timeout-s";
    /// Period of the cleanup pass (stale heartbeats), in seconds.
    cleanup_interval_s: Secs = Some("30"), env = "WSGATEWAY_CLEANUP_INTERVAL_S", flag = "cleanup-interval-s";
    /// Events waiting for the dispatcher; when full, the oldest is dropped.
    event_queue_size: usize = Some("5000"), env = "WSGATEWAY_EVENT_QUEUE_SIZE", flag = "event-queue-size";
    /// Frames waiting to be written to one client; when full, the client is closed with 1008.
    send_queue_size: usize = Some("1024"), env = "WSGATEWAY_SEND_QUEUE_SIZE", flag = "send-queue-size";
    /// Window in which a repeated event reaches each connection at most once, in seconds.
    dedup_window_s: Secs = Some("5"), env = "WSGATEWAY_DEDUP_WINDOW_S", flag = "dedup-window-s";
    /// An event whose `ts` is older than this at dispatch is dropped, in seconds.
    stale_event_s: Secs = Some("30"), env = "WSGATEWAY_STALE_EVENT_S", flag = "stale-event-s";
    /// How long a closing connection may take to deliver its close frame, in seconds.
    close_timeout_s: Secs = Some("5"), env = "WSGATEWAY_CLOSE_TIMEOUT_S", flag = "close-timeout-s";
    /// On SIGTERM, connections are closed (1012) spread evenly over this many seconds; 0 closes them all at once.
    drain_s: SecsOrZero = Some("30"), env = "WSGATEWAY_DRAIN_S", flag = "drain-s";
    /// After the drain, how long shutdown waits for connections and tasks to finish before exiting, in seconds.
    shutdown_grace_s: Secs = Some("10"), env = "WSGATEWAY_SHUTDOWN_GRACE_S", flag = "shutdown-grace-s";
    /// This node's name in presence (`GET /api/presence`, an admin's `presence`); unset: `<hostname>:<port>` of the public listener.
    node_name: Option<String> = None, env = "WSGATEWAY_NODE_NAME", flag = "node-name";
    /// In Redis mode, how long a dead node's connections stay in presence at most, in whole seconds; a live node renews its heartbeat every third of it.
    presence_ttl_s: u32 = Some("30"), env = "WSGATEWAY_PRESENCE_TTL_S", flag = "presence-ttl-s";
    /// Log format: text or json. Levels come from RUST_LOG.
    log_format: LogFormat = Some("text"), env = "WSGATEWAY_LOG_FORMAT", flag = "log-format";
}

impl Config {
    /// A configuration with every default and the given secrets; for tests
    /// and for `dev`.
    pub fn with_secrets(jwt_secret: &str, table_token_secret: &str) -> Config {
        let mut config = Config::load(&SettingArgs::default(), &FileSettings::default())
            .expect("the defaults are valid");
        config.jwt_secret = Some(Secret(jwt_secret.to_owned()));
        config.table_token_secret = Some(Secret(table_token_secret.to_owned()));
        config
    }

    /// Checks what `serve` needs beyond each value being well-formed. Every
    /// missing setting is named at once, not one per attempt.
    pub fn check_for_serve(&self) -> Result<(), ConfigError> {
        let mut missing = Vec::new();
        if self.revoked_jti_key.is_some() && self.redis_url.is_none() {
            missing.push(ConfigError::Missing {
                env: "REDIS_URL",
                flag: "redis-url",
                why: "required by WSGATEWAY_REVOKED_JTI_KEY",
            });
        }
        if self.table_token_secret.is_none() {
            missing.push(required("TABLE_TOKEN_SECRET", "table-token-secret"));
        }
        if self.outbox_table.is_some()
            && self.outbox_database_url.is_none()
            && self.database_url.is_none()
        {
            missing.push(ConfigError::Missing {
                env: "DATABASE_URL",
                flag: "database-url",
                why: "required by WSGATEWAY_OUTBOX_TABLE (or WSGATEWAY_OUTBOX_DATABASE_URL)",
            });
        }
        match self.jwt_algorithm {
            JwtAlgorithm::Hs256 if self.jwt_secret.is_none() => {
                missing.push(required("JWT_SECRET", "jwt-secret"));
            }
            JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 if self.jwt_public_key_file.is_none() => {
                missing.push(ConfigError::Missing {
                    env: "WSGATEWAY_JWT_PUBLIC_KEY_FILE",
                    flag: "jwt-public-key-file",
                    why: "required by RS256 and ES256",
                });
            }
            _ => {}
        }
        match missing.len() {
            0 => {}
            1 => return Err(missing.remove(0)),
            _ => return Err(ConfigError::MissingSeveral(missing)),
        }
        // One secret for both would let whoever holds the diners' secret
        // sign staff tokens too.
        if self.jwt_secret.is_some() && self.jwt_secret == self.table_token_secret {
            return Err(ConfigError::Invalid {
                env: "JWT_SECRET",
                flag: "jwt-secret",
                reason: "equals TABLE_TOKEN_SECRET; the two must differ".into(),
            });
        }
        Ok(())
    }
}

fn required(env: &'static str, flag: &'static str) -> ConfigError {
    ConfigError::Missing {
        env,
        flag,
        why: "required by `serve`",
    }
}

fn resolve<T: SettingValue>(
    given: Option<&str>,
    from_file: Option<String>,
    default: Option<&'static str>,
    env: &'static str,
    flag: &'static str,
) -> Result<T, ConfigError> {
    let raw = given.map(str::to_owned).or(from_file);
    // Only `Option<T>` settings lack a default; they read "" as unset.
    let raw = raw.as_deref().or(default).unwrap_or_default();
    T::parse_setting(raw).map_err(|reason| ConfigError::Invalid { env, flag, reason })
}

impl<T: SettingValue> SettingValue for Option<T> {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        if raw.trim().is_empty() {
            Ok(None)
        } else {
            T::parse_setting(raw).map(Some)
        }
    }
}

macro_rules! from_str_setting {
    ($($ty:ty => $what:literal),* $(,)?) => {$(
        impl SettingValue for $ty {
            fn parse_setting(raw: &str) -> Result<Self, String> {
                raw.trim().parse().map_err(|_| format!("{raw:?} is not {}", $what))
            }
        }
    )*};
}

from_str_setting! {
    SocketAddr => "an address such as 0.0.0.0:8001",
    u64 => "a whole number",
    PathBuf => "a path",
}

impl SettingValue for u32 {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        match raw.trim().parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{raw:?} is not a positive whole number")),
        }
    }
}

impl SettingValue for usize {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        match raw.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{raw:?} is not a positive whole number")),
        }
    }
}

impl SettingValue for bool {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(format!("{raw:?} is not true or false")),
        }
    }
}

/// A secret (signing key, API key): never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl SettingValue for String {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        Ok(raw.to_owned())
    }
}

impl SettingValue for Secret {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        Ok(Secret(raw.to_owned()))
    }
}

/// A positive duration given in (possibly fractional) seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Secs(pub Duration);

impl SettingValue for Secs {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        match raw.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Secs(Duration::from_secs_f64(s))),
            _ => Err(format!("{raw:?} is not a positive number of seconds")),
        }
    }
}

/// A PostgreSQL table's name, `table` or `schema.table`: lower-case
/// identifiers (what unquoted names in the backend's SQL fold to), each
/// short enough that the name with `_dead` or `_notify` added still fits
/// PostgreSQL's 63 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    /// The name as the backend writes it: `schema.table` or `table`.
    pub fn as_written(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.name),
            None => self.name.clone(),
        }
    }

    /// The quoted SQL name of this table with `suffix` added to its name.
    pub fn sql(&self, suffix: &str) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}{suffix}\"", self.name),
            None => format!("\"{}{suffix}\"", self.name),
        }
    }
}

impl SettingValue for TableName {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        let ident = |s: &str, max: usize| {
            let mut chars = s.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && s.len() <= max
        };
        let bad = || {
            format!(
                "{raw:?} is not a table name: `table` or `schema.table`, lower-case letters, digits and _, at most 56 bytes each"
            )
        };
        match raw.trim().split_once('.') {
            None if ident(raw.trim(), 56) => Ok(TableName {
                schema: None,
                name: raw.trim().to_owned(),
            }),
            Some((schema, name)) if ident(schema, 63) && ident(name, 56) => Ok(TableName {
                schema: Some(schema.to_owned()),
                name: name.to_owned(),
            }),
            _ => Err(bad()),
        }
    }
}

/// A number of seconds that may be 0 (`WSGATEWAY_DRAIN_S`: at once).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecsOrZero(pub Duration);

impl SettingValue for SecsOrZero {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        match raw.trim().parse::<f64>() {
            Ok(s) if (0.0..1e9).contains(&s) => Ok(SecsOrZero(Duration::from_secs_f64(s))),
            _ => Err(format!("{raw:?} is not 0 or a positive number of seconds")),
        }
    }
}

/// A fraction between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio(pub f64);

impl SettingValue for Ratio {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        match raw.trim().parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => Ok(Ratio(r)),
            _ => Err(format!("{raw:?} is not a number between 0 and 1")),
        }
    }
}

/// The browser origins allowed on staff endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Origins(pub Vec<String>);

impl Origins {
    pub fn allows(&self, origin: &str) -> bool {
        self.0
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }
}

impl SettingValue for Origins {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        let list: Vec<String> = raw
            .split(',')
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        if list.is_empty() {
            return Err("no origin in the list".into());
        }
        Ok(Origins(list))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlgorithm {
    Hs256,
    Rs256,
    Es256,
}

impl SettingValue for JwtAlgorithm {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        match raw.trim().to_ascii_uppercase().as_str() {
            "HS256" => Ok(JwtAlgorithm::Hs256),
            "RS256" => Ok(JwtAlgorithm::Rs256),
            "ES256" => Ok(JwtAlgorithm::Es256),
            _ => Err(format!("{raw:?} is not one of HS256, RS256, ES256")),
        }
    }
}

/// How the gateway finds its Redis (docs/REDIS.md, "Production Redis").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// `REDIS_URL` names the one server.
    Standalone,
    /// `REDIS_URL` lists sentinels, which name the master.
    Sentinel,
    /// `REDIS_URL` lists seed nodes of a Redis Cluster.
    Cluster,
}

impl SettingValue for RedisMode {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "standalone" => Ok(RedisMode::Standalone),
            "sentinel" => Ok(RedisMode::Sentinel),
            "cluster" => Ok(RedisMode::Cluster),
            _ => Err(format!(
                "{raw:?} is not one of standalone, sentinel, cluster"
            )),
        }
    }
}

/// `WSGATEWAY_REDIS_PREFIX`: a deployment's name on a shared Redis server.
/// Function names allow letters, digits and `_` only, and a `{` would
/// change the keys' hash slot, so nothing else is accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisPrefix(String);

impl RedisPrefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for RedisPrefix {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if raw.len() > 32 || !raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!(
                "{raw:?} is not a prefix (letters, digits and `_`, at most 32)"
            ));
        }
        Ok(RedisPrefix(raw.to_owned()))
    }
}

impl SettingValue for RedisPrefix {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        raw.parse()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl SettingValue for LogFormat {
    fn parse_setting(raw: &str) -> Result<Self, String> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{raw:?} is not one of text, json")),
        }
    }
}

/// The settings of an optional TOML file; keys are the setting names in
/// snake case (`max_connections = 5000`).
#[derive(Debug, Default, Clone)]
pub struct FileSettings {
    path: String,
    table: toml::Table,
}

impl FileSettings {
    /// Reads the file; a missing or malformed file is an error.
    pub fn read(path: &std::path::Path) -> Result<FileSettings, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        Self::parse(&shown, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<FileSettings, ConfigError> {
        let table = toml::Table::from_str(text).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.message().to_owned(),
        })?;
        Ok(FileSettings {
            path: path.to_owned(),
            table,
        })
    }

    fn check_keys(&self) -> Result<(), ConfigError> {
        match self
            .table
            .keys()
            .find(|k| !SETTINGS.iter().any(|s| s.key == k.as_str()))
        {
            Some(unknown) => Err(ConfigError::File {
                path: self.path.clone(),
                reason: format!("unknown setting {unknown:?}"),
            }),
            None => Ok(()),
        }
    }

    fn get(&self, key: &str) -> Option<String> {
        self.table.get(key).map(|v| match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Array(items) => items
                .iter()
                .map(|i| match i {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: SettingArgs, file: &str) -> Result<Config, ConfigError> {
        Config::load(&args, &FileSettings::parse("test.toml", file).unwrap())
    }

    #[test]
    fn defaults_are_the_seeds() {
        let c = load(SettingArgs::default(), "").unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8001");
        assert_eq!(c.max_connections, 100_000);
        assert_eq!(c.max_connections_per_user, 3);
        assert_eq!(c.max_connections_per_session, 20);
        assert_eq!(c.event_queue_size, 5000);
        assert_eq!(c.rate_limit_per_s, 20);
        assert_eq!(c.heartbeat_timeout_s.0, Duration::from_secs(60));
        assert_eq!(c.max_message_bytes, 65536);
        assert!(c.jwt_secret.is_none());
    }

    #[test]
    fn demo_page_is_off_unless_asked_and_reads_a_toml_boolean() {
        assert!(!load(SettingArgs::default(), "").unwrap().demo_page);
        assert!(
            load(SettingArgs::default(), "demo_page = true")
                .unwrap()
                .demo_page
        );
        let args = |v: &str| SettingArgs {
            demo_page: Some(v.into()),
            ..Default::default()
        };
        assert!(load(args("TRUE"), "").unwrap().demo_page);
        let err = load(args("yes"), "").unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid setting WSGATEWAY_DEMO_PAGE (--demo-page): \"yes\" is not true or false"
        );
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let args = SettingArgs {
            max_connections: Some("7".into()),
            ..Default::default()
        };
        let c = load(args, "max_connections = 9\nrate_limit_per_s = 4\n").unwrap();
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.rate_limit_per_s, 4);
        let c = load(
            SettingArgs::default(),
            "allowed_origins = [\"https://a\", \"https://b/\"]",
        )
        .unwrap();
        assert_eq!(
            c.allowed_origins.unwrap().0,
            vec!["https://a".to_string(), "https://b".to_string()]
        );
    }

    #[test]
    fn a_bad_value_names_its_setting() {
        let args = SettingArgs {
            max_connections: Some("lots".into()),
            ..Default::default()
        };
        let err = load(args, "").unwrap_err().to_string();
        assert!(err.contains("WSGATEWAY_MAX_CONNECTIONS"), "{err}");
        assert!(err.contains("lots"), "{err}");
        let err = load(SettingArgs::default(), "heartbeat_timeout_s = -1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("WSGATEWAY_HEARTBEAT_TIMEOUT_S"), "{err}");
        let err = load(SettingArgs::default(), "max_conections = 1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown setting"), "{err}");
    }

    #[test]
    fn serve_needs_its_secrets() {
        let c = load(SettingArgs::default(), "").unwrap();
        let err = c.check_for_serve().unwrap_err().to_string();
        // Both at once, each with its flag.
        assert_eq!(
            err,
            "missing settings: TABLE_TOKEN_SECRET (--table-token-secret): required by `serve`; \
             JWT_SECRET (--jwt-secret): required by `serve`"
        );
        let mut one = Config::with_secrets("a", "b");
        one.table_token_secret = None;
        assert_eq!(
            one.check_for_serve().unwrap_err().to_string(),
            "missing setting TABLE_TOKEN_SECRET (--table-token-secret): required by `serve`"
        );
        assert!(Config::with_secrets("a", "b").check_for_serve().is_ok());
        let err = Config::with_secrets("same", "same")
            .check_for_serve()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("JWT_SECRET") && err.contains("TABLE_TOKEN_SECRET"),
            "{err}"
        );
        assert!(!err.contains("same"), "no secret in the message: {err}");
    }

    #[test]
    fn an_outbox_needs_a_database_and_a_table_name_that_cannot_inject() {
        let mut c = Config::with_secrets("a", "b");
        c.outbox_table = Some(TableName::parse_setting("app.outbox").unwrap());
        assert_eq!(
            c.check_for_serve().unwrap_err().to_string(),
            "missing setting DATABASE_URL (--database-url): required by \
             WSGATEWAY_OUTBOX_TABLE (or WSGATEWAY_OUTBOX_DATABASE_URL)"
        );
        c.outbox_database_url = Some(Secret("postgres://h/db".into()));
        assert!(c.check_for_serve().is_ok());
        let err = load(
            SettingArgs::default(),
            r#"outbox_table = "x\"; drop table y""#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("WSGATEWAY_OUTBOX_TABLE"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = Config::with_secrets("very-secret-value", "other-secret");
        let shown = format!("{c:?}");
        assert!(!shown.contains("very-secret-value"));
        assert!(!shown.contains("other-secret"));
    }

    #[test]
    fn every_setting_is_found_by_its_key() {
        for s in SETTINGS {
            assert_eq!(SettingInfo::named(s.key).env, s.env);
        }
        const JWT: &SettingInfo = SettingInfo::named("jwt_secret");
        assert_eq!((JWT.env, JWT.flag), ("JWT_SECRET", "jwt-secret"));
        assert!(std::panic::catch_unwind(|| SettingInfo::named("jwt_secre")).is_err());
    }

    /// docs/wsgateway.example.toml as the table makes it: every setting,
    /// commented out, with its description and default.
    fn example_file() -> String {
        let mut out = String::from(EXAMPLE_HEAD);
        for s in SETTINGS {
            out.push('\n');
            let mut line = String::from("#");
            for word in s.help.split_whitespace() {
                if line.len() + 1 + word.len() > 76 {
                    out.push_str(&line);
                    out.push('\n');
                    line = String::from("#");
                }
                line.push(' ');
                line.push_str(word);
            }
            out.push_str(&line);
            out.push('\n');
            let value = match s.default {
                Some(d) if d.parse::<f64>().is_ok() || d == "true" || d == "false" => d.to_owned(),
                Some(d) => format!("{d:?}"),
                None => "\"\"".to_owned(),
            };
            let default = if s.default.is_some() {
                ""
            } else {
                "   # unset"
            };
            out.push_str(&format!("# {} = {value}{default}\n", s.key));
            out.push_str(&format!("#   (env {}, flag --{})\n", s.env, s.flag));
        }
        out
    }

    const EXAMPLE_HEAD: &str = "\
# A sample settings file for `wsgateway serve --config FILE` (or
# WSGATEWAY_CONFIG=FILE); `dev` reads it too. Every setting is here,
# commented out, with its default: uncomment the ones you change. A flag
# or an environment variable beats the file, which beats the default. An
# empty string leaves an optional setting unset. docs/CONFIGURATION.md
# describes each one. (Made from the table in src/config.rs, and checked
# against it by its tests: `WSGATEWAY_WRITE_EXAMPLE=1 cargo test --lib
# example_config` writes it again.)
";

    #[test]
    fn the_example_config_lists_every_setting_with_its_default_and_parses() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/wsgateway.example.toml");
        let expected = example_file();
        if std::env::var_os("WSGATEWAY_WRITE_EXAMPLE").is_some() {
            std::fs::write(&path, &expected).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text == expected,
            "docs/wsgateway.example.toml is not the table's: run WSGATEWAY_WRITE_EXAMPLE=1 cargo test --lib example_config"
        );
        // As it is (all commented out), and with every setting uncommented:
        // read as `--config` reads it, each gives the defaults.
        let defaults = format!("{:?}", load(SettingArgs::default(), "").unwrap());
        let as_is = Config::load(&SettingArgs::default(), &FileSettings::read(&path).unwrap());
        assert_eq!(format!("{:?}", as_is.unwrap()), defaults);
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.contains(" = "))
            .map(|l| format!("{}\n", l.split("   #").next().unwrap()))
            .collect();
        let file = FileSettings::parse("uncommented", &uncommented).unwrap();
        assert_eq!(file.table.len(), SETTINGS.len(), "{uncommented}");
        let all = Config::load(&SettingArgs::default(), &file).unwrap();
        assert_eq!(format!("{all:?}"), defaults);
    }

    #[test]
    fn readme_documents_every_setting() {
        let readme = include_str!("../docs/CONFIGURATION.md");
        for s in SETTINGS {
            assert!(
                readme.contains(s.env),
                "docs/CONFIGURATION.md lacks {}",
                s.env
            );
            if let Some(default) = s.default {
                assert!(
                    readme.contains(&format!("`{}` | `{}`", s.env, default)),
                    "docs/CONFIGURATION.md lacks the default of {} ({default})",
                    s.env
                );
            }
        }
    }
}
