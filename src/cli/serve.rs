//! `wsgateway serve`.

use anyhow::Context;

use super::{ServeArgs, init_tracing, raise_open_files_limit, runtime, shutdown_signals};
use crate::Gateway;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.load()?;
    config.check_for_serve()?;
    init_tracing(config.log_format);
    raise_open_files_limit();
    runtime()?.block_on(async move {
        let listener = crate::http::server::listen(config.listen, config.listen_backlog)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let metrics = match config.metrics_listen {
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                    format!("cannot listen on {addr} (WSGATEWAY_METRICS_LISTEN)")
                })?)
            }
            None => None,
        };
        let publish_off = config.api_key.is_none();
        let mut gateway = Gateway::new(config)?;
        gateway.preflight().await?;
        tracing::info!(addr = %listener.local_addr()?, "listening");
        if publish_off {
            tracing::warn!("{}", crate::http::PUBLISH_DISABLED);
        }
        if let Some(metrics) = metrics {
            tracing::info!(metrics = %metrics.local_addr()?, "serving /ws/metrics");
            gateway = gateway.with_metrics_listener(metrics)?;
        }
        gateway.serve(listener, shutdown_signals()).await?;
        Ok(())
    })
}
