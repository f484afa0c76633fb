//! The subscription: live events from Redis, with no gap left unfilled.
//!
//! One pub/sub connection with pattern subscriptions to the seed's channels
//! (plain `PUBLISH`es, delivered live, without numbers), and subscriptions
//! to the gateway's scope channels (`wsgateway:events:{tenant}:{scope}`,
//! where the function library publishes every event it numbers, as
//! `n\n<channels>\n<frame>`) that follow this node's audience: a scope's
//! channel is subscribed to while the hub holds a connection of that scope.
//! The hub signals each change ([`crate::broker::ScopeChanges`]); the
//! subscriber waits [`BATCH`] for more, then subscribes and unsubscribes
//! them together, and reads the history of each new scope from just before
//! its first connection came, so that what was published while the
//! subscription was being made is not missed.
//!
//! The subscriber knows the number of every numbered event it delivered.
//! The connection is PINGed every health-check interval with the command
//! timeout as deadline, so a silently dead path is found within seconds;
//! then the subscriber reconnects on its own jittered schedule (never
//! waiting for the circuit breaker), to wherever the connector says (in
//! sentinel mode: the master the sentinels name now). It also moves when
//! the connector has found another master meanwhile. After every gap it reads, for the
//! scopes of this node's connections, what history kept after the last
//! number it had, and queues that (in order, once) before reading any live
//! message again: live messages wait in the connection meanwhile, and those
//! the fill already delivered are skipped by number. What history cannot
//! give back (trimmed, expired, or plain `PUBLISH`es never seen) is counted,
//! and the affected connections get a `resync` frame.
//!
//! In a cluster the connection is the cluster client's, in RESP3 (one
//! connection per node, messages as pushes): `SSUBSCRIBE` per tenant (one
//! slot), every primary PINGed. A node's connection lost gives the
//! subscription up (a gap, as above); a slot migrated makes its old owner
//! unsubscribe the tenant's channels, which are subscribed again on the new
//! owner and filled from the tenant's last event delivered.

mod fill;
mod live;
mod position;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tungstenite::Utf8Bytes;

use self::fill::{fill, fill_moved, fill_new};
use self::live::{Incoming, Live, Sub};
use self::position::{Gap, Position, Verdict};
use super::RedisBroker;
use super::connector::{EndpointError, Failure, RoleError};
use super::link::LinkError;
use crate::auth::TenantId;
use crate::broker::backoff::Backoff;
use crate::broker::{Arrival, Scope};
use crate::channel::Channel;
use crate::event::Fields;
use crate::metrics::Drop;

/// How long the subscriber waits, after a change of its audience, for more:
/// a storm of connections costs a few commands, not one each.
const BATCH: Duration = Duration::from_millis(20);

/// Channels per SUBSCRIBE or UNSUBSCRIBE command.
const CHANNELS_PER_COMMAND: usize = 1000;

/// Why no subscription could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum SubscribeError {
    #[error("cannot subscribe: {0}")]
    NoEndpoint(#[from] EndpointError),
    #[error("cannot subscribe: {0}")]
    Failed(#[from] Failure),
    /// Sentinel mode: the server the sentinels named is not the master.
    #[error("cannot subscribe: {0}")]
    NotMaster(String),
    #[error("cannot subscribe: timed out")]
    TimedOut,
}

impl SubscribeError {
    /// A TLS failure is a setting to fix: logged as an error.
    fn is_tls(&self) -> bool {
        match self {
            SubscribeError::NoEndpoint(e) => e.is_tls(),
            SubscribeError::Failed(f) => f.is_tls(),
            SubscribeError::NotMaster(_) | SubscribeError::TimedOut => false,
        }
    }
}

/// Why a live subscription was given up.
#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error("the master moved from {from} to {to}")]
    MasterMoved { from: String, to: String },
    #[error("PING failed: {0}")]
    Ping(Failure),
    #[error("no answer to PING within {0:?}")]
    NoPong(Duration),
    #[error("{command} failed: {failure}")]
    Command {
        command: &'static str,
        failure: Failure,
    },
    #[error("no answer to {0} within {1:?}")]
    NoAnswer(&'static str, Duration),
    #[error("cannot read the history of new scopes: {0}")]
    History(String),
    #[error("a cluster node's connection was lost")]
    NodeDropped,
    #[error("connection closed")]
    Closed,
}

/// Why a gap could not be read.
#[derive(Debug, thiserror::Error)]
enum GapError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("unexpected gap answer")]
    Unexpected,
}

/// Subscribes, fills gaps, and delivers, until `shutdown`.
pub(super) async fn run(broker: Arc<RedisBroker>, shutdown: CancellationToken) {
    let timing = broker.timing;
    let mut backoff = Backoff::new(timing.retry_base, timing.retry_max);
    let mut position = Position::default();
    let mut gap: Option<Gap> = None;
    // The last failure logged: a failure is logged when it changes, not at
    // every retry.
    let mut failing: Option<SubscribeError> = None;
    loop {
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            opened = tokio::time::timeout(timing.timeout * 2, open(&broker)) => opened,
        };
        let failure = match opened {
            Ok(Ok((mut live, since))) => {
                backoff.reset();
                failing = None;
                broker.set_subscribed(false, Some("catching up after a gap".into()));
                let scopes = live.scopes();
                broker
                    .metrics
                    .redis_subscribed_scopes
                    .set(scopes.len() as i64);
                let filled = match gap.take() {
                    Some(gap) => {
                        fill(&broker, &mut position, &scopes, gap).await;
                        Ok(())
                    }
                    None => fill_new(&broker, &mut position, &scopes, since).await,
                };
                let why = match filled {
                    Ok(()) => {
                        broker.set_subscribed(true, None);
                        tracing::info!(server = %live.addr, scopes = scopes.len(), "subscribed to Redis");
                        match listen(&broker, &mut live, &mut position, &shutdown).await {
                            Some(why) => why,
                            None => return,
                        }
                    }
                    Err(why) => why,
                };
                broker.metrics.redis_subscribed_scopes.set(0);
                broker
                    .metrics
                    .redis_reconnects
                    .with_label_values(&["subscription"])
                    .inc();
                tracing::warn!(reason = %why, "lost the Redis subscription; reconnecting");
                broker.set_subscribed(false, Some(format!("subscription lost: {why}")));
                // The command connections most likely share the fate of the
                // path: make the next calls connect afresh.
                broker.link.reset();
                broker.reads.reset();
                gap = Some(Gap {
                    since: Instant::now(),
                });
                None
            }
            Ok(Err(why)) => Some(why),
            Err(_) => Some(SubscribeError::TimedOut),
        };
        if let Some(why) = failure {
            if failing.as_ref() != Some(&why) {
                if why.is_tls() {
                    tracing::error!(reason = %why, "Redis subscription failed; retrying");
                } else {
                    tracing::warn!(reason = %why, "Redis subscription failed; retrying");
                }
            }
            broker.set_subscribed(false, Some(why.to_string()));
            failing = Some(why);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Subscribes on the server to use now (in sentinel mode, confirmed as the
/// master first): to the seed's patterns, and to the channels of the scopes
/// of this node's connections. Returns the subscription, and since when
/// (this node's clock, µs) its scopes may have waited for it.
async fn open(broker: &RedisBroker) -> Result<(Live, Option<i64>), SubscribeError> {
    let connector = broker.link.connector();
    let mut live = match connector.is_cluster() {
        true => open_cluster(broker).await?,
        false => open_one(broker).await?,
    };
    // Taken before the scopes are read: a scope that comes after is a
    // change still to take.
    let changes = broker.listeners.changes();
    let since = changes.take_since_us();
    if let Err(why) = live.subscribe(broker, &broker.listeners.scopes()).await {
        changes.give_back(since);
        return Err(SubscribeError::Failed(Failure::Other(why.to_string())));
    }
    Ok((live, since))
}

/// A cluster's subscription: the seed's patterns (a plain `PUBLISH` reaches
/// every node of a cluster, so one node's subscription hears them all).
async fn open_cluster(broker: &RedisBroker) -> Result<Live, SubscribeError> {
    let connector = broker.link.connector();
    let describe = |e: redis::RedisError| SubscribeError::Failed(connector.describe(&e));
    let (tx, pushes) = tokio::sync::mpsc::unbounded_channel();
    let client = connector
        .cluster_client(Some(tx))
        .expect("cluster mode")
        .map_err(SubscribeError::Failed)?;
    let mut conn = client.get_async_connection().await.map_err(describe)?;
    for pattern in broker.names.patterns() {
        conn.psubscribe(pattern).await.map_err(describe)?;
    }
    Ok(Live {
        sub: Sub::Cluster {
            conn,
            pushes,
            pending: Default::default(),
        },
        addr: connector.seeds().unwrap_or_default().to_owned(),
        subscribed: HashSet::new(),
    })
}

/// One server's subscription (in sentinel mode, on the server confirmed as
/// the master): the seed's patterns.
async fn open_one(broker: &RedisBroker) -> Result<Live, SubscribeError> {
    let connector = broker.link.connector();
    let endpoint = connector.endpoint().await?;
    let describe = |e: redis::RedisError| SubscribeError::Failed(connector.describe(&e));
    if connector.is_sentinel() {
        let mut conn = endpoint
            .client
            .get_multiplexed_async_connection()
            .await
            .map_err(describe)?;
        connector
            .check_master(&mut conn, &endpoint.addr)
            .await
            .map_err(|e| match e {
                RoleError::NotMaster(why) => SubscribeError::NotMaster(why),
                RoleError::Failed(e) => describe(e),
            })?;
    }
    let mut pubsub = endpoint.client.get_async_pubsub().await.map_err(describe)?;
    for pattern in broker.names.patterns() {
        pubsub.psubscribe(pattern).await.map_err(describe)?;
    }
    let (sink, stream) = pubsub.split();
    Ok(Live {
        sub: Sub::One { sink, stream },
        addr: endpoint.addr,
        subscribed: HashSet::new(),
    })
}

/// Delivers messages, and follows the audience, until the connection is
/// lost (returns why) or `shutdown` (returns `None`).
async fn listen(
    broker: &RedisBroker,
    live: &mut Live,
    position: &mut Position,
    shutdown: &CancellationToken,
) -> Option<Lost> {
    let connector = broker.link.connector();
    let timing = broker.timing;
    let changes = broker.listeners.changes();
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + timing.health_check,
        timing.health_check,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the changes seen so far are applied.
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            _ = changes.wait(), if due.is_none() => {
                due = Some(tokio::time::Instant::now() + BATCH);
            }
            _ = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)), if due.is_some() => {
                due = None;
                if let Err(why) = follow(broker, live, position).await {
                    return Some(why);
                }
            }
            _ = ping.tick() => {
                if !connector.is_current(&live.addr) {
                    let to = connector.master().unwrap_or_default();
                    return Some(Lost::MasterMoved { from: live.addr.clone(), to });
                }
                match tokio::time::timeout(timing.timeout, live.ping()).await {
                    Ok(Ok(())) => position.alive = Instant::now(),
                    Ok(Err(e)) => return Some(Lost::Ping(connector.describe(&e))),
                    Err(_) => return Some(Lost::NoPong(timing.timeout)),
                }
            }
            incoming = live.next() => match incoming {
                Incoming::Msg(m) => receive(broker, m.get_channel_name(), m.get_payload_bytes(), position),
                Incoming::Push(push) => {
                    if let Err(why) = pushed(broker, live, position, push).await {
                        return Some(why);
                    }
                }
                Incoming::Closed => return Some(Lost::Closed),
            },
        }
    }
}

/// A push of the cluster's connection: a message (live), a node's
/// connection lost (the subscription is made afresh, and the gap filled),
/// or a shard channel unsubscribed by the server (its slot moved to
/// another node: subscribed again there, and its history read from the
/// last event delivered, so nothing is lost and nothing comes twice).
async fn pushed(
    broker: &RedisBroker,
    live: &mut Live,
    position: &mut Position,
    push: redis::PushInfo,
) -> Result<(), Lost> {
    use redis::PushKind;
    let text = |v: Option<&redis::Value>| match v {
        Some(redis::Value::BulkString(b)) => Some(b.clone()),
        Some(redis::Value::SimpleString(s)) => Some(s.clone().into_bytes()),
        _ => None,
    };
    let (channel, payload) = match push.kind {
        PushKind::Message | PushKind::SMessage => (text(push.data.first()), text(push.data.get(1))),
        PushKind::PMessage => (text(push.data.get(1)), text(push.data.get(2))),
        PushKind::Disconnection => return Err(Lost::NodeDropped),
        PushKind::SUnsubscribe => {
            let moved = |push: &redis::PushInfo| {
                (push.kind == PushKind::SUnsubscribe)
                    .then(|| text(push.data.first()))
                    .flatten()
                    .and_then(|c| String::from_utf8(c).ok())
                    .and_then(|c| read_scope(c.strip_prefix(broker.names.scope_channels())?))
            };
            let Some(scope) = moved(&push).filter(|s| live.subscribed.contains(s)) else {
                return Ok(());
            };
            // The slot moved: every channel of the tenant was unsubscribed
            // (one slot); those notices already here are this one's.
            let tenant = scope.tenant();
            live.absorb(|p| moved(p).is_some_and(|s| s.tenant() == tenant));
            return moved_tenant(broker, live, position, tenant).await;
        }
        _ => return Ok(()),
    };
    if let (Some(channel), Some(payload)) = (channel, payload)
        && let Ok(channel) = std::str::from_utf8(&channel)
    {
        receive(broker, channel, &payload, position);
    }
    Ok(())
}

/// A tenant whose shard channels the server unsubscribed (its slot
/// migrated): all its scopes subscribed again (on the slot's new owner),
/// then their history read together, in number order, from the tenant's
/// last event delivered (one start for all: a scope's fill must not move
/// another's start past events it has not had).
async fn moved_tenant(
    broker: &RedisBroker,
    live: &mut Live,
    position: &mut Position,
    tenant: TenantId,
) -> Result<(), Lost> {
    let since = Instant::now();
    let scopes: Vec<Scope> = live
        .scopes()
        .into_iter()
        .filter(|s| s.tenant() == tenant)
        .collect();
    for scope in &scopes {
        live.subscribed.remove(scope);
    }
    live.subscribe(broker, &scopes).await?;
    let count = fill_moved(broker, position, &scopes, Gap { since }).await?;
    tracing::info!(
        tenant,
        scopes = scopes.len(),
        filled = count,
        "a tenant's shard channels moved to another node; subscribed there"
    );
    Ok(())
}

/// Makes the subscription follow the audience: unsubscribes the scopes
/// that lost their last connection, subscribes the new ones and fills
/// their window from history.
async fn follow(
    broker: &RedisBroker,
    live: &mut Live,
    position: &mut Position,
) -> Result<(), Lost> {
    let since = broker.listeners.changes().take_since_us();
    let wanted: HashSet<Scope> = broker.listeners.scopes().into_iter().collect();
    let mut gone: Vec<Scope> = live.subscribed.difference(&wanted).copied().collect();
    let mut added: Vec<Scope> = wanted.difference(&live.subscribed).copied().collect();
    gone.sort_unstable();
    added.sort_unstable();
    if !gone.is_empty() {
        live.unsubscribe(broker, &gone).await?;
        for scope in &gone {
            position.filled.remove(scope);
        }
    }
    if !added.is_empty() {
        live.subscribe(broker, &added).await?;
        fill_new(broker, position, &added, since).await?;
    }
    broker
        .metrics
        .redis_subscribed_scopes
        .set(live.subscribed.len() as i64);
    tracing::debug!(
        subscribed = added.len(),
        unsubscribed = gone.len(),
        scopes = live.subscribed.len(),
        "subscription follows the audience"
    );
    Ok(())
}

fn receive(broker: &RedisBroker, channel: &str, payload: &[u8], position: &mut Position) {
    position.alive = Instant::now();
    let scope_tail = channel.strip_prefix(broker.names.scope_channels());
    // On a seed channel, a plain event is a JSON object; the function's
    // messages (a backend's `wsgateway_publish`) start with their number.
    if scope_tail.is_none() && !payload.first().is_some_and(u8::is_ascii_digit) {
        position.plain_seen = Some(Instant::now());
        // The patterns are this deployment's: the prefix is there.
        let seed = broker.names.seed_channel(channel).unwrap_or(channel);
        broker
            .queue
            .ingest(seed, bytes::Bytes::copy_from_slice(payload));
        return;
    }
    let shown = || channel.chars().take(200).collect::<String>();
    let Some(message) = read_numbered(payload) else {
        broker.metrics.dropped(Drop::Invalid);
        tracing::warn!(channel = %shown(), "malformed numbered event dropped");
        return;
    };
    if !broker.signing.verify(
        channel,
        message.number,
        message.channel_list,
        message.frame,
        message.signature,
    ) {
        broker.metrics.dropped(Drop::Unsigned);
        tracing::warn!(channel = %shown(), "numbered event dropped: not signed by the wsgateway function library");
        return;
    }
    let scope = match scope_tail {
        Some(tail) => read_scope(tail),
        // On the seed channel of its scope's first channel.
        None => Fields::parse(message.frame).ok().and_then(|fields| {
            let first = *message.channels.first()?;
            (broker.names.seed_channel(channel) == Some(first.to_string().as_str()))
                .then(|| Scope::of(first, &fields))
        }),
    };
    let Some(scope) = scope else {
        broker.metrics.dropped(Drop::Invalid);
        tracing::warn!(channel = %shown(), "numbered event dropped: not of the scope of its channel");
        return;
    };
    let (n, channels) = (message.n, message.channels);
    if message.redelivery {
        // Beside the numbered sequence: it fills no gap and makes none.
        let frame = Utf8Bytes::from(message.frame.to_owned());
        broker
            .queue
            .ingest_numbered(&channels, frame, Arrival::Redelivery, Some(scope));
        return;
    }
    match position.judge(scope, n, &channels) {
        Verdict::Deliver(fresh) => {
            let frame = Utf8Bytes::from(message.frame.to_owned());
            if !fresh.is_empty()
                && broker
                    .queue
                    .ingest_numbered(&fresh, frame, Arrival::Live, Some(scope))
            {
                position.delivered(scope.tenant(), n, &fresh);
            }
        }
        Verdict::Filled => {}
        Verdict::Untrusted => {
            broker.metrics.dropped(Drop::UntrustedNumber);
            tracing::warn!(%channel, number = n, "numbered event dropped: its number is beyond any Redis has given");
        }
    }
}

/// Reads a scope channel's tail, `{<tenant>}:<scope>`.
fn read_scope(tail: &str) -> Option<Scope> {
    let (tenant, suffix) = tail.strip_prefix('{')?.split_once("}:")?;
    let tenant = tenant
        .parse::<TenantId>()
        .ok()
        .filter(|t| t.to_string() == tenant)?;
    Scope::from_suffix(tenant, suffix)
}

/// A numbered message, `n\n<channels>\n<signature>\n<frame>`, or an
/// unacknowledged event's redelivery, `r<n>\n...` (signed as it is).
struct Numbered<'a> {
    number: &'a str,
    n: u64,
    redelivery: bool,
    channel_list: &'a str,
    channels: Vec<Channel>,
    signature: &'a str,
    frame: &'a str,
}

fn read_numbered(payload: &[u8]) -> Option<Numbered<'_>> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(4, '\n');
    let (number, channel_list, signature, frame) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let channels = channel_list
        .split(',')
        .map(|c| c.parse::<Channel>().ok())
        .collect::<Option<Vec<_>>>()?;
    let (digits, redelivery) = match number.strip_prefix('r') {
        Some(digits) => (digits, true),
        None => (number, false),
    };
    let n = digits.parse().ok().filter(|_| !digits.starts_with('+'))?;
    Some(Numbered {
        number,
        n,
        redelivery,
        channel_list,
        channels,
        signature,
        frame,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbered_messages() {
        let m = read_numbered(
            b"17\nchannel:branch:5:admin,channel:session:7\nab12\n{\"a\":\"x\\ny\"}\n",
        )
        .unwrap();
        assert_eq!((m.number, m.n), ("17", 17));
        assert_eq!(
            m.channels,
            vec![Channel::BranchAdmin(5), Channel::Session(7)]
        );
        assert_eq!(m.signature, "ab12");
        assert_eq!(m.frame, "{\"a\":\"x\\ny\"}\n");
        assert!(read_numbered(b"x\nchannel:branch:5:admin\ns\n{}").is_none());
        assert!(read_numbered(b"+1\nchannel:branch:5:admin\ns\n{}").is_none());
        assert!(read_numbered(b"1\nchannel:nope\ns\n{}").is_none());
        assert!(read_numbered(b"1\nchannel:branch:5:admin\n{}").is_none());
    }

    #[test]
    fn reads_scope_channels() {
        assert_eq!(read_scope("{7}:branch:5"), Some(Scope::Branch(7, 5)));
        assert_eq!(read_scope("{7}:staff"), Some(Scope::TenantStaff(7)));
        assert_eq!(read_scope("{7}:session:9"), Some(Scope::Session(7, 9)));
        for bad in [
            "7:branch:5",
            "{x}:staff",
            "{7}:nope",
            "{+7}:staff",
            "{7}staff",
        ] {
            assert_eq!(read_scope(bad), None, "{bad}");
        }
    }
}
