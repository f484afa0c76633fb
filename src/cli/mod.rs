//! The command line: `serve`, `dev`, `token` and `publish`.

pub mod dev;
mod publish;
mod serve;
mod token;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, FileSettings, LogFormat, SettingArgs};

#[derive(Debug, Parser)]
#[command(
    name = "wsgateway",
    version,
    about = "Multi-tenant WebSocket notification gateway"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Run the gateway for development: embedded broker, fixed development
    /// secrets, ready-to-use tokens and publish command, and a demo page.
    Dev(ServeArgs),
    /// Mint a staff or table token (development and tests).
    Token(token::TokenArgs),
    /// Publish one event through a gateway's publish API.
    Publish(publish::PublishArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Optional TOML file of settings (keys are the setting names in snake case).
    #[arg(long, env = "WSGATEWAY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: SettingArgs,
}

impl ServeArgs {
    fn load(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => FileSettings::read(path)?,
            None => FileSettings::default(),
        };
        Config::load(&self.settings, &file)
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Dev(args) => dev::run(args),
        Command::Token(args) => token::run(args),
        Command::Publish(args) => publish::run(args),
    }
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Whatever RUST_LOG says: tungstenite's trace lines print whole client
    // frames, and a `refresh_token` message holds a token. Each module that
    // prints frames is named, so that a more specific RUST_LOG directive
    // for it is replaced too.
    let filter = [
        "tungstenite=debug",
        "tungstenite::protocol=debug",
        "tungstenite::protocol::frame=debug",
    ]
    .into_iter()
    .fold(filter, |f, d| {
        f.add_directive(d.parse().expect("a valid directive"))
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Raises the soft open-files limit to the hard one: each connection is a
/// file descriptor.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
}

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
