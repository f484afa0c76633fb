//! Publishing the bench's events: through the publish API or straight on
//! Redis, all at once or at a rate. Each event carries its send time in
//! microseconds (`sent_us`) for end-to-end latency.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::future::try_join_all;
use serde_json::{Value, json};

use super::clients::{Population, now_us};
use super::gateway::Target;
use super::{BenchArgs, Plan, Via};

/// The bench's event `k`, for the waiters of `branch` of `tenant`, sent now.
pub(super) fn event(tenant: i64, branch: i64, k: usize) -> Value {
    json!({"type": "ROUND_READY", "tenant_id": tenant, "branch_id": branch,
           "ts": (now_us() / 1000) as i64, "sent_us": now_us(), "seq": k})
}

/// Events per publish request when publishing all at once.
const BATCH: usize = 100;

#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub published: usize,
    /// Deliveries the audience rules call for.
    pub expected: u64,
    pub publish_time: Duration,
}

pub struct Publisher {
    via: Sink,
    plan: Plan,
}

enum Sink {
    Api {
        http: reqwest::Client,
        url: String,
        key: String,
    },
    Redis(redis::aio::MultiplexedConnection),
}

impl Publisher {
    pub async fn new(target: &Target, args: &BenchArgs, plan: &Plan) -> anyhow::Result<Publisher> {
        let via = match plan.via {
            Via::Api => Sink::Api {
                http: reqwest::Client::new(),
                url: format!("http://{}/api/publish", target.addr),
                key: args.api_key.clone(),
            },
            Via::Redis => {
                let url = target.redis_url.as_deref().context("no Redis URL")?;
                let client = redis::Client::open(url)?;
                Sink::Redis(client.get_multiplexed_async_connection().await?)
            }
        };
        Ok(Publisher {
            via,
            plan: plan.clone(),
        })
    }

    pub async fn run(self, population: &Population) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        let mut outcome = Outcome::default();
        let mut next = (0..self.plan.events).map(|k| {
            let (tenant, branch) = population.pairs[k % population.pairs.len()];
            (tenant, branch, k)
        });
        if self.plan.rate <= 0.0 {
            let all: Vec<_> = next.by_ref().collect();
            for (tenant, branch, _) in &all {
                outcome.expected += population.audience(*tenant, *branch);
            }
            outcome.published = all.len();
            self.send_all(&all).await?;
        } else {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / self.plan.rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for (tenant, branch, k) in next {
                tick.tick().await;
                outcome.expected += population.audience(tenant, branch);
                outcome.published += 1;
                self.send_all(&[(tenant, branch, k)]).await?;
            }
        }
        outcome.publish_time = started.elapsed();
        Ok(outcome)
    }

    async fn send_all(&self, events: &[(i64, i64, usize)]) -> anyhow::Result<()> {
        match &self.via {
            Sink::Api { http, url, key } => {
                let requests = events.chunks(BATCH).map(|chunk| {
                    let items: Vec<Value> = chunk
                        .iter()
                        .map(|(t, b, k)| json!({"channel": format!("channel:branch:{b}:waiters"), "event": event(*t, *b, *k)}))
                        .collect();
                    let request = http.post(url).bearer_auth(key).json(&items);
                    async move {
                        let response = request.send().await?;
                        anyhow::ensure!(response.status() == 202, "publish answered {}", response.status());
                        anyhow::Ok(())
                    }
                });
                try_join_all(requests).await?;
            }
            Sink::Redis(conn) => {
                let mut pipe = redis::pipe();
                for (t, b, k) in events {
                    pipe.publish(
                        format!("channel:branch:{b}:waiters"),
                        event(*t, *b, *k).to_string(),
                    )
                    .ignore();
                }
                let mut conn = conn.clone();
                let () = pipe.query_async(&mut conn).await?;
            }
        }
        Ok(())
    }
}
