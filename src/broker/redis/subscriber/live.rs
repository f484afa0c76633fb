//! The subscription's connection: one server's pub/sub connection, or a
//! cluster connection in RESP3 whose messages arrive as pushes; and the
//! scope channels it is subscribed to.

use std::collections::HashSet;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;

use super::{CHANNELS_PER_COMMAND, Lost};
use crate::auth::TenantId;
use crate::broker::Scope;
use crate::broker::redis::RedisBroker;

/// A live subscription: the connection, its server, and the scopes whose
/// channels it is subscribed to.
pub(super) struct Live {
    pub(super) sub: Sub,
    /// The server (or, in a cluster, the seed nodes), for logs.
    pub(super) addr: String,
    pub(super) subscribed: HashSet<Scope>,
}

/// The subscription's connection.
pub(super) enum Sub {
    /// One server: a pub/sub connection (RESP2).
    One {
        sink: PubSubSink,
        stream: PubSubStream,
    },
    /// A cluster: the redis crate's cluster connection in RESP3, one
    /// connection per node, messages and notices arriving as pushes.
    Cluster {
        conn: ClusterConnection,
        pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
    },
}

/// What the subscription's connection brought.
pub(super) enum Incoming {
    Msg(redis::Msg),
    Push(redis::PushInfo),
    Closed,
}

impl Live {
    /// Subscribes to the channels of `scopes` (not subscribed yet), a
    /// command per [`CHANNELS_PER_COMMAND`] (in a cluster, per tenant:
    /// `SSUBSCRIBE` takes the channels of one slot), each confirmed.
    pub(super) async fn subscribe(
        &mut self,
        broker: &RedisBroker,
        scopes: &[Scope],
    ) -> Result<(), Lost> {
        for chunk in per_command(&self.sub, scopes) {
            let channels: Vec<String> = chunk
                .iter()
                .map(|s| broker.names.scope_channel(*s))
                .collect();
            self.command(broker, "SUBSCRIBE", channels).await?;
            self.subscribed.extend(chunk);
        }
        Ok(())
    }

    /// Unsubscribes from the channels of `scopes`.
    pub(super) async fn unsubscribe(
        &mut self,
        broker: &RedisBroker,
        scopes: &[Scope],
    ) -> Result<(), Lost> {
        for chunk in per_command(&self.sub, scopes) {
            for scope in &chunk {
                self.subscribed.remove(scope);
            }
            let channels: Vec<String> = chunk
                .iter()
                .map(|s| broker.names.scope_channel(*s))
                .collect();
            self.command(broker, "UNSUBSCRIBE", channels).await?;
        }
        Ok(())
    }

    pub(super) async fn command(
        &mut self,
        broker: &RedisBroker,
        command: &'static str,
        channels: Vec<String>,
    ) -> Result<(), Lost> {
        let timeout = broker.timing.timeout;
        let subscribe = command == "SUBSCRIBE";
        let sent = match &mut self.sub {
            Sub::One { sink, .. } if subscribe => {
                tokio::time::timeout(timeout, sink.subscribe(channels)).await
            }
            Sub::One { sink, .. } => {
                tokio::time::timeout(timeout, sink.unsubscribe(channels)).await
            }
            Sub::Cluster { conn, .. } if subscribe => {
                tokio::time::timeout(timeout, conn.ssubscribe(channels)).await
            }
            Sub::Cluster { conn, .. } => {
                tokio::time::timeout(timeout, conn.sunsubscribe(channels)).await
            }
        };
        match sent {
            Ok(Ok(())) => {
                broker
                    .metrics
                    .redis_subscription_commands
                    .with_label_values(&[if subscribe {
                        "subscribe"
                    } else {
                        "unsubscribe"
                    }])
                    .inc();
                Ok(())
            }
            Ok(Err(e)) => Err(Lost::Command {
                command,
                failure: broker.link.connector().describe(&e),
            }),
            Err(_) => Err(Lost::NoAnswer(command, timeout)),
        }
    }

    /// PINGs the connection (in a cluster, every primary's).
    pub(super) async fn ping(&mut self) -> redis::RedisResult<()> {
        use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
        match &mut self.sub {
            Sub::One { sink, .. } => sink.ping::<redis::Value>().await.map(drop),
            Sub::Cluster { conn, .. } => conn
                .route_command(
                    redis::cmd("PING"),
                    RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                )
                .await
                .map(drop),
        }
    }

    pub(super) async fn next(&mut self) -> Incoming {
        match &mut self.sub {
            Sub::One { stream, .. } => stream.next().await.map_or(Incoming::Closed, Incoming::Msg),
            Sub::Cluster { pushes, .. } => {
                pushes.recv().await.map_or(Incoming::Closed, Incoming::Push)
            }
        }
    }

    /// The subscribed scopes, sorted.
    pub(super) fn scopes(&self) -> Vec<Scope> {
        let mut scopes: Vec<Scope> = self.subscribed.iter().copied().collect();
        scopes.sort_unstable();
        scopes
    }
}

/// `scopes` cut into one command's each: at most [`CHANNELS_PER_COMMAND`];
/// in a cluster, of one tenant (one hash slot).
pub(super) fn per_command(sub: &Sub, scopes: &[Scope]) -> Vec<Vec<Scope>> {
    match sub {
        Sub::One { .. } => scopes
            .chunks(CHANNELS_PER_COMMAND)
            .map(<[Scope]>::to_vec)
            .collect(),
        Sub::Cluster { .. } => {
            let mut by_tenant: std::collections::BTreeMap<TenantId, Vec<Scope>> =
                std::collections::BTreeMap::new();
            for scope in scopes {
                by_tenant.entry(scope.tenant()).or_default().push(*scope);
            }
            by_tenant
                .into_values()
                .flat_map(|v| {
                    v.chunks(CHANNELS_PER_COMMAND)
                        .map(<[Scope]>::to_vec)
                        .collect::<Vec<_>>()
                })
                .collect()
        }
    }
}
