//! The names a deployment uses on Redis: keys, channels, patterns and the
//! function library, all under `WSGATEWAY_REDIS_PREFIX`.
//!
//! Redis pub/sub and functions ignore the database index, so two
//! deployments on one server are kept apart by names alone. With the prefix
//! `staging`, keys and channels start with `staging:` (the seed's channels
//! too: `staging:channel:branch:5:waiters`) and the library and its
//! functions with `staging_` (`FCALL staging_wsgateway_publish`). The empty
//! prefix is the names of a deployment without one.
//!
//! Every key of a tenant carries the tenant as its hash tag,
//! `wsgateway:{7}:…`, so that the keys of one call share one hash slot.

use super::signing::ChannelKey;
use crate::auth::TenantId;
use crate::broker::Scope;
use crate::channel::Channel;
use crate::config::RedisPrefix;

/// The library's source: its name line and the two prefix lines are
/// replaced at load.
pub(super) const LIBRARY: &str = include_str!("../lua/wsgateway.lua");
const NAME_LINE: &str = "#!lua name=wsgateway\n";
const KEY_LINE: &str = "local KEY_PREFIX = ''\n";
const FN_LINE: &str = "local FN_PREFIX = ''\n";
const KEY_SIGNING_LINE: &str = "local SIGNING_KEY = ''\n";
const BOUNDS_LINE: &str =
    "local BOUNDS = {size = 1000, ttl_ms = 600000, max_channels = 100, stale_ms = 30000}\n";

/// The bounds the library applies to what it keeps and to what a backend
/// publishes through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LibraryBounds {
    /// `WSGATEWAY_HISTORY_SIZE`.
    pub size: usize,
    /// `WSGATEWAY_HISTORY_TTL_S`, in ms.
    pub ttl_ms: u64,
    /// `WSGATEWAY_MAX_PUBLISH_CHANNELS`.
    pub max_channels: usize,
    /// `WSGATEWAY_STALE_EVENT_S`, in ms.
    pub stale_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// `staging:`, or empty.
    key: String,
    /// `staging_`, or empty.
    function: String,
    /// What every scope channel starts with, kept: the subscriber asks for
    /// it at every message.
    scope_channels: String,
}

impl Default for Names {
    fn default() -> Names {
        Names::new(None)
    }
}

impl Names {
    pub fn new(prefix: Option<&RedisPrefix>) -> Names {
        let (key, function) = match prefix.map(RedisPrefix::as_str) {
            None | Some("") => (String::new(), String::new()),
            Some(p) => (format!("{p}:"), format!("{p}_")),
        };
        let scope_channels = format!("{key}wsgateway:events:");
        Names {
            key,
            function,
            scope_channels,
        }
    }

    /// A key or channel name under the prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.key)
    }

    /// A function of the library, as `FCALL` names it.
    pub fn function(&self, name: &str) -> String {
        format!("{}{name}", self.function)
    }

    /// What keys and channels start with (`staging:`, or empty).
    pub fn key_prefix(&self) -> &str {
        &self.key
    }

    /// The function library with this deployment's names, the key that
    /// signs its messages, and its bounds.
    pub fn library(&self, signing: &ChannelKey, bounds: &LibraryBounds) -> String {
        let quoted = |s: &str| s.replace('\\', "\\\\").replace('\'', "\\'");
        LIBRARY
            .replacen(
                NAME_LINE,
                &format!("#!lua name={}wsgateway\n", self.function),
                1,
            )
            .replacen(
                KEY_LINE,
                &format!("local KEY_PREFIX = '{}'\n", quoted(&self.key)),
                1,
            )
            .replacen(
                FN_LINE,
                &format!("local FN_PREFIX = '{}'\n", quoted(&self.function)),
                1,
            )
            .replacen(
                KEY_SIGNING_LINE,
                &format!("local SIGNING_KEY = '{}'\n", signing.hex()),
                1,
            )
            .replacen(
                BOUNDS_LINE,
                &format!(
                    "local BOUNDS = {{size = {}, ttl_ms = {}, max_channels = {}, stale_ms = {}}}\n",
                    bounds.size, bounds.ttl_ms, bounds.max_channels, bounds.stale_ms
                ),
                1,
            )
    }

    /// The history stream of a scope (`lua/wsgateway.lua` names it alike).
    pub fn stream(&self, scope: Scope) -> String {
        self.key(&format!(
            "wsgateway:{{{}}}:history:{}",
            scope.tenant(),
            scope.suffix()
        ))
    }

    /// Where a caller-supplied `event_id` maps to its number.
    pub fn caller_id(&self, tenant: TenantId, id: &str) -> String {
        self.key(&format!("wsgateway:{{{tenant}}}:eid:{id}"))
    }

    /// What every scope channel starts with.
    pub fn scope_channels(&self) -> &str {
        &self.scope_channels
    }

    /// The patterns every node subscribes to: the seed's channels (a
    /// scope channel is subscribed to only while a connection needs it).
    pub fn patterns(&self) -> Vec<String> {
        Channel::PATTERNS.iter().map(|p| self.key(p)).collect()
    }

    /// The channel the function library publishes a scope's events on
    /// (`lua/wsgateway.lua` names it alike): the tenant is its hash tag, so
    /// in a cluster it lives on the tenant's shard.
    pub fn scope_channel(&self, scope: Scope) -> String {
        format!(
            "{}{{{}}}:{}",
            self.scope_channels,
            scope.tenant(),
            scope.suffix()
        )
    }

    /// A seed channel's name without the prefix (`None`: not this
    /// deployment's).
    pub fn seed_channel<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(self.key.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_takes_the_prefix() {
        let key = ChannelKey::derive("s", "");
        let defaults = LibraryBounds {
            size: 1000,
            ttl_ms: 600_000,
            max_channels: 100,
            stale_ms: 30_000,
        };
        let plain = Names::default().library(&key, &defaults);
        assert_eq!(
            plain,
            LIBRARY.replace(
                KEY_SIGNING_LINE,
                &format!("local SIGNING_KEY = '{}'\n", key.hex())
            ),
            "no prefix, the defaults: the source as written, with its key"
        );
        let bounds = LibraryBounds {
            size: 5,
            ttl_ms: 6,
            max_channels: 7,
            stale_ms: 8,
        };
        let staging = Names::new(Some(&"staging".parse().unwrap())).library(&key, &bounds);
        assert!(
            staging.contains(
                "local BOUNDS = {size = 5, ttl_ms = 6, max_channels = 7, stale_ms = 8}\n"
            )
        );
        assert!(staging.starts_with("#!lua name=staging_wsgateway\n"));
        assert!(staging.contains("local KEY_PREFIX = 'staging:'\n"));
        assert!(staging.contains("local FN_PREFIX = 'staging_'\n"));
        for line in [NAME_LINE, KEY_LINE, FN_LINE, KEY_SIGNING_LINE, BOUNDS_LINE] {
            assert_eq!(LIBRARY.matches(line).count(), 1, "{line}");
        }
    }

    #[test]
    fn every_name_is_under_the_prefix() {
        let names = Names::new(Some(&"prod_1".parse().unwrap()));
        let scope = Scope::Branch(7, 5);
        assert_eq!(names.stream(scope), "prod_1:wsgateway:{7}:history:branch:5");
        assert_eq!(
            names.caller_id(7, "pay-1"),
            "prod_1:wsgateway:{7}:eid:pay-1"
        );
        assert_eq!(
            names.function("wsgateway_publish"),
            "prod_1_wsgateway_publish"
        );
        assert!(names.patterns().iter().all(|p| p.starts_with("prod_1:")));
        assert_eq!(
            names.seed_channel("prod_1:channel:tenant:staff"),
            Some("channel:tenant:staff")
        );
        assert_eq!(names.seed_channel("channel:tenant:staff"), None);
        assert_eq!(
            Names::default().stream(scope),
            "wsgateway:{7}:history:branch:5"
        );
    }
}
