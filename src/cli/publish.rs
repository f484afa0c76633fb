//! `wsgateway publish`: one event through a gateway's publish API.

use anyhow::{Context, bail};
use clap::Args;

use super::runtime;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Base URL of the gateway.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    url: String,
    /// The publish API key.
    #[arg(long, env = "WSGATEWAY_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Channel to publish on; repeat for several (one event id).
    #[arg(long = "channel", required = true)]
    channels: Vec<String>,
    /// The event, a JSON object.
    #[arg(long)]
    event: String,
}

pub fn run(args: PublishArgs) -> anyhow::Result<()> {
    let event: serde_json::Value =
        serde_json::from_str(&args.event).context("--event is not valid JSON")?;
    let body = serde_json::json!({"channels": args.channels, "event": event});
    let url = format!("{}/api/publish", args.url.trim_end_matches('/'));
    runtime()?.block_on(async move {
        let response = reqwest::Client::new()
            .post(&url)
            .bearer_auth(&args.api_key)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{url} answered {status}: {text}");
        }
        println!("{text}");
        Ok(())
    })
}
