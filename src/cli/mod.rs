//! The command line: `serve`, `dev`, `token`, `publish` and `outbox`.

pub mod dev;
mod log_fields;
mod outbox;
mod publish;
mod serve;
mod token;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError, FileSettings, LogFormat, SETTINGS, SettingArgs};

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
    /// The transactional outbox's table (`outbox schema` prints its DDL).
    Outbox(outbox::OutboxArgs),
}

impl Cli {
    /// Parses the command line, with each setting's default in the help
    /// of `serve` and `dev`.
    pub fn parse_with_defaults() -> Cli {
        use clap::{CommandFactory, FromArgMatches};
        let matches = defaults_in_help(Cli::command()).get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// Appends `[default: …]` to the help of every setting that has a default.
/// Only the text: a clap default would be taken as given, and beat the
/// environment and the file (the order is flag, environment, file, default).
fn defaults_in_help(cli: clap::Command) -> clap::Command {
    let with_defaults = |command: clap::Command| {
        SETTINGS.iter().fold(command, |command, setting| {
            let Some(default) = setting.default else {
                return command;
            };
            command.mut_arg(setting.key, |arg| {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                let arg = arg.help(format!("{help} [default: {default}]"));
                match arg.get_long_help().map(ToString::to_string) {
                    Some(long) => arg.long_help(format!("{long} [default: {default}]")),
                    None => arg,
                }
            })
        })
    };
    cli.mut_subcommand("serve", with_defaults)
        .mut_subcommand("dev", with_defaults)
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
        Command::Outbox(args) => outbox::run(args),
    }
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Whatever RUST_LOG says, tungstenite never logs below debug: its trace
    // lines print whole client frames, and a `refresh_token` message holds
    // a token. A cap, not a directive: `tungstenite=debug` would also raise
    // it to debug when RUST_LOG asks for less.
    let filter = filter.and(filter_fn(|meta| {
        !(is_tungstenite(meta.target()) && *meta.level() > tracing::Level::DEBUG)
    }));
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Text => registry
            .with(
                layer
                    .fmt_fields(log_fields::ReplacingFields::default())
                    .with_filter(filter),
            )
            .init(),
        LogFormat::Json => registry.with(layer.json().with_filter(filter)).init(),
    }
}

/// tungstenite's own modules (`tungstenite`, `tungstenite::protocol::frame`,
/// ...), not tokio-tungstenite.
fn is_tungstenite(target: &str) -> bool {
    target == "tungstenite" || target.starts_with("tungstenite::")
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

/// One item per SIGTERM or SIGINT: the first starts the drain, the second
/// cuts it short. The handlers are installed here, once, so that a second
/// signal arriving at any moment is seen (and never kills the process).
fn shutdown_signals() -> impl futures_util::Stream<Item = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        futures_util::stream::unfold((term, int), |(mut term, mut int)| async move {
            tokio::select! {
                _ = recv(&mut term) => {}
                _ = recv(&mut int) => {}
            }
            Some(((), (term, int)))
        })
    }
    #[cfg(not(unix))]
    futures_util::stream::unfold((), |()| async {
        let _ = tokio::signal::ctrl_c().await;
        Some(((), ()))
    })
}
