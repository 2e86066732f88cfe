//! `porthole-relay`: parses arguments, sets up logging, loads and validates the
//! configuration (exit 64 before binding anything if it is bad), binds, and
//! runs the relay until SIGTERM or SIGINT.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use porthole_relay::config::{Config, ConfigError, EMBEDDED_DEFAULT};
use tracing_subscriber::EnvFilter;

/// Exit code for a bad configuration, before anything is bound.
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "porthole-relay",
    version,
    about = "One port through the firewall"
)]
struct Cli {
    /// Configuration file; without it the embedded conf/relay.toml is used.
    #[arg(long, short, global = true)]
    config: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and print each problem with its key.
    Check,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn load(path: Option<&str>) -> Result<Config, ConfigError> {
    match path {
        Some(p) => Config::load_file(p),
        None => Config::from_toml_with_env(EMBEDDED_DEFAULT, None),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match cli.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    let source = cli.config.as_deref().unwrap_or("embedded conf/relay.toml");

    let config = match load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            for p in &e.problems {
                eprintln!("{source}: {p}");
            }
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if let Some(Command::Check) = cli.command {
        println!("{source}: ok ({} routes)", config.routes.routes().len());
        return ExitCode::SUCCESS;
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listeners = match porthole_relay::Listeners::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot bind");
                return ExitCode::FAILURE;
            }
        };
        let addr = |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let aggregate = addr(&listeners.aggregate);
        let admin = listeners.admin.as_ref().map(addr).unwrap_or_else(|| "off".into());
        tracing::info!(%aggregate, %admin, config = %source, routes = config.routes.routes().len(), "listening");
        match porthole_relay::run(listeners, config, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "relay failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
