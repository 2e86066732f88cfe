//! `porthole-shim`: parses arguments, sets up logging, loads and validates the
//! configuration (exit 64 before binding anything if it is bad), binds the
//! system-proxy port and runs the shim until SIGTERM or SIGINT. Subcommands
//! print the shell setup (`env`), change forwards of a running shim, and
//! watch an event topic (`events watch`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use http::Method;
use porthole_relay::config::ConfigError;
use porthole_shim::config::{RawConfig, DEFAULT_LISTEN};
use porthole_shim::control;
use porthole_shim::forward::Kind;
use porthole_shim::watch::{self, WatchConfig};

/// mimalloc, as in the relay: every proxied request allocates a few small
/// objects on both legs, and glibc's malloc was ~10% of the shim's CPU in a
/// `perf` profile of P1 through the shim (`_int_malloc`, `malloc_consolidate`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a bad configuration, before anything is bound.
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "porthole-shim",
    version,
    about = "Local system proxy and forwarded ports over one link to a Porthole relay"
)]
struct Cli {
    /// Configuration file (keys relay, listen, forward, ...).
    #[arg(long, short, global = true)]
    config: Option<String>,
    /// The relay's aggregate port, HOST:PORT, or https://HOST:PORT for TLS.
    #[arg(long, global = true)]
    relay: Option<String>,
    /// PEM CA certificates for the relay's certificate (TLS; default: the system roots).
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<String>,
    /// PEM client certificate chain for a relay that asks for one (TLS; with --key).
    #[arg(long, global = true, value_name = "FILE")]
    cert: Option<String>,
    /// PEM private key of --cert.
    #[arg(long, global = true, value_name = "FILE")]
    key: Option<String>,
    /// A file of one `user:password` line: the shim's credentials for the relay
    /// (Proxy-Authorization on all it sends there; a client's own are then dropped).
    #[arg(long, global = true, value_name = "FILE")]
    credentials_file: Option<String>,
    /// The system-proxy listener (default 127.0.0.1:3128).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// A forwarded port, LISTEN=HOST:PORT (repeatable).
    #[arg(long = "forward", global = true)]
    forwards: Vec<String>,
    /// A forwarded UDP port, LISTEN=HOST:PORT (repeatable; CONNECT-UDP through the relay).
    #[arg(long = "forward-udp", global = true, value_name = "LISTEN=HOST:PORT")]
    udp_forwards: Vec<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the shell lines that make a terminal use the shim.
    Env,
    /// Validate the configuration and print each problem with its key.
    Check,
    /// Change the forwarded ports of the running shim.
    Forward {
        #[command(subcommand)]
        action: ForwardAction,
    },
    /// Event topics on the relay.
    Events {
        #[command(subcommand)]
        action: EventsAction,
    },
}

#[derive(Subcommand)]
enum EventsAction {
    /// Long-poll TOPIC and print each event as one JSON line; resumes after
    /// the last printed event, kept in a state file.
    Watch {
        topic: String,
        /// The state file holding the last printed id (default
        /// $XDG_STATE_HOME/porthole/TOPIC.last or ~/.local/state/porthole/TOPIC.last).
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
        /// Seconds each poll may wait for an event (the relay caps it with its max_wait).
        #[arg(long, value_name = "SECS", default_value_t = watch::DEFAULT_WAIT.as_secs(),
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        wait: u64,
    },
}

#[derive(Subcommand)]
enum ForwardAction {
    /// Open LISTEN and forward its connections (with --udp, its datagrams) to HOST:PORT.
    Add {
        #[arg(value_name = "LISTEN=HOST:PORT")]
        spec: String,
        /// A UDP forward (CONNECT-UDP through the relay), as --forward-udp.
        #[arg(long)]
        udp: bool,
    },
    /// Close the forward on LISTEN (ADDR:PORT or a port on 127.0.0.1).
    Remove {
        #[arg(value_name = "LISTEN")]
        addr: String,
        /// The UDP forward on LISTEN (closes its socket, ends its flows).
        #[arg(long)]
        udp: bool,
    },
    /// Print the forwards, one LISTEN=HOST:PORT per line, then the UDP
    /// forwards as `udp LISTEN=HOST:PORT`, with `# last error: ...` after
    /// one whose flows fail.
    List,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of main: dropping it writes out the queued lines.
    let _logging = porthole_relay::logging::init(porthole_relay::logging::Format::Text);

    let mut raw = match cli.config.as_deref().map(RawConfig::load_file).transpose() {
        Ok(raw) => raw.unwrap_or_default(),
        Err(e) => return bad_config(&cli, &e),
    };
    // The command line wins over the file; forwards add up.
    for (flag, key) in [
        (&cli.relay, &mut raw.relay),
        (&cli.listen, &mut raw.listen),
        (&cli.ca, &mut raw.ca),
        (&cli.cert, &mut raw.cert),
        (&cli.key, &mut raw.key),
        (&cli.credentials_file, &mut raw.credentials_file),
    ] {
        if flag.is_some() {
            key.clone_from(flag);
        }
    }
    raw.forward.extend(cli.forwards.iter().cloned());
    raw.forward_udp.extend(cli.udp_forwards.iter().cloned());

    // One thread: the link is one HTTP/2 connection, whose task every
    // request and tunnel passes through anyway. Against a multi-thread
    // runtime (P1 through the shim, 2 cores, median of 3) it cost 18 instead
    // of 24 µs of shim CPU per request, without the cross-thread wake-ups and
    // lock contention on the link's stream table, and tunnels were no slower.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match &cli.command {
        Some(Command::Env) => match listen_of(&raw) {
            Ok(listen) => {
                print!("{}", porthole_shim::env_lines(listen));
                ExitCode::SUCCESS
            }
            Err(e) => bad_config(&cli, &e),
        },
        Some(Command::Forward { action }) => match listen_of(&raw) {
            Ok(shim) => runtime.block_on(forward_command(shim, action)),
            Err(e) => bad_config(&cli, &e),
        },
        Some(Command::Events {
            action: EventsAction::Watch { topic, state, wait },
        }) => {
            // Refused before anything else, by the relay's own rule.
            if !porthole_relay::events::valid_topic(topic) {
                eprintln!("`{topic}` is not a topic name: [A-Za-z0-9._-]{{1,128}}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            let config = match raw.validate() {
                Ok(c) => c,
                Err(e) => return bad_config(&cli, &e),
            };
            let state = match state.clone().map(Ok).unwrap_or_else(|| {
                watch::default_state_path(
                    topic,
                    std::env::var_os("XDG_STATE_HOME"),
                    std::env::var_os("HOME"),
                )
            }) {
                Ok(path) => path,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let after = match watch::load_state(&state) {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let config = WatchConfig {
                relay: config.relay,
                tls: config.tls.map(|t| t.watch),
                relay_name: config.relay_name,
                authorization: config.authorization,
                topic: topic.clone(),
                state,
                wait: Duration::from_secs(*wait),
                connect_timeout: config.connect_timeout,
            };
            // The signal handler is installed inside the runtime.
            let watching =
                async { watch::run(config, after, porthole_relay::shutdown_signal()).await };
            match runtime.block_on(watching) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Check) => match raw.validate() {
            Ok(c) => {
                println!(
                    "ok: relay {}{}, listen {}, {} forwards, {} UDP forwards",
                    c.relay,
                    if c.tls.is_some() { " (TLS)" } else { "" },
                    c.listen,
                    c.forwards.len(),
                    c.udp_forwards.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => bad_config(&cli, &e),
        },
        None => {
            let config = match raw.validate() {
                Ok(c) => c,
                Err(e) => return bad_config(&cli, &e),
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(config.listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(listen = %config.listen, error = %e, "cannot bind");
                        return ExitCode::FAILURE;
                    }
                };
                tracing::info!(
                    listen = %config.listen,
                    relay = %config.relay,
                    forwards = config.forwards.len(),
                    udp_forwards = config.udp_forwards.len(),
                    "listening"
                );
                match porthole_shim::run(config, listener, porthole_relay::shutdown_signal()).await
                {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "shim failed");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

/// The system-proxy address from the config, without requiring the rest.
fn listen_of(raw: &RawConfig) -> Result<SocketAddr, ConfigError> {
    let text = raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
    text.trim().parse().map_err(|_| ConfigError {
        problems: vec![porthole_relay::config::Problem {
            key: "listen".into(),
            message: format!("`{text}` is not ADDR:PORT"),
        }],
    })
}

fn bad_config(cli: &Cli, e: &ConfigError) -> ExitCode {
    let source = cli.config.as_deref().unwrap_or("command line");
    for p in &e.problems {
        eprintln!("{source}: {p}");
    }
    ExitCode::from(EXIT_BAD_CONFIG)
}

async fn forward_command(shim: SocketAddr, action: &ForwardAction) -> ExitCode {
    let kind = |udp: bool| if udp { Kind::Udp } else { Kind::Tcp };
    let path = format!("{}forwards", control::PREFIX);
    let called = match action {
        ForwardAction::Add { spec, udp } => {
            let body = control::line(kind(*udp), spec.trim());
            control::call(shim, Method::POST, &path, body).await
        }
        ForwardAction::List => control::call(shim, Method::GET, &path, String::new()).await,
        // The shim reads LISTEN (a bare port is on 127.0.0.1).
        ForwardAction::Remove { addr, udp } => {
            let path = format!(
                "{}{}",
                control::PREFIX,
                control::forward_path(kind(*udp), addr.trim())
            );
            control::call(shim, Method::DELETE, &path, String::new()).await
        }
    };
    match called {
        Ok((status, body)) if status.is_success() => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((_, body)) => {
            eprint!("{body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
