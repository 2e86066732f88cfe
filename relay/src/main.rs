//! `porthole-relay`: parses arguments, sets up logging, loads and validates the
//! configuration (exit 64 before binding anything if it is bad), binds, and
//! runs the relay until SIGTERM or SIGINT (a second one ends the drain).

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use porthole_relay::config::{Config, ConfigError, EMBEDDED_DEFAULT};

/// mimalloc instead of glibc's malloc: the request path allocates a few small
/// objects per request, and glibc spent ~8% of the relay's CPU on them
/// (`_int_malloc`, `malloc_consolidate`, `_int_free` in a `perf` profile of P1).
/// Built with `no_thp` (Cargo.toml): no transparent huge pages, so memory
/// grows and is returned in 4 KiB pages, not 2 MiB ones.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Read a secret on standard input and print the `NAME:hash` line for
    /// `auth.users_file` or `[[accept_uplink]] secret_hash` (argon2id, salted).
    Passwd {
        /// The user or uplink id.
        name: String,
    },
    /// Ask a running relay's admin listener for `/healthz` (exit 0 when it answers 200);
    /// for container health checks, where no curl is installed.
    Health {
        /// Admin address; defaults to the configuration's `relay.admin_listen`.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Ask a running relay to re-read its configuration (`POST /reload` on its
    /// admin listener): exit 0 when it took it; non-zero, with its reason on
    /// standard error, when it refused it or cannot be reached. For
    /// `ExecReload=` (systemd reports the failure). A configuration file
    /// that does not load here is not sent: its problems are printed (exit 64).
    Reload {
        /// Admin address; defaults to the configuration's `relay.admin_listen`.
        /// Given, the relay is asked even when the file does not load here.
        #[arg(long)]
        admin: Option<String>,
    },
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
    if let Some(Command::Passwd { name }) = &cli.command {
        return passwd(name);
    }
    // Held to the end of main: dropping it writes out the queued lines.
    let _logging = porthole_relay::logging::init(match cli.log_format {
        LogFormat::Text => porthole_relay::logging::Format::Text,
        LogFormat::Json => porthole_relay::logging::Format::Json,
    });
    let source = cli.config.as_deref().unwrap_or("embedded conf/relay.toml");

    let loaded = load(cli.config.as_deref());
    // Given an address, `reload` asks the relay whatever this file says: the
    // relay reads it itself, refuses it with its reason, and records that.
    if let (Some(Command::Reload { admin: Some(addr) }), Err(_)) = (&cli.command, &loaded) {
        return reload(addr);
    }
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            for p in &e.problems {
                // A value from an environment override is not the file's.
                let var = p.env_var();
                match std::env::var_os(&var) {
                    Some(_) => eprintln!("environment {var}: {p}"),
                    None => eprintln!("{source}: {p}"),
                }
            }
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    match cli.command {
        Some(Command::Check) => {
            let routes = config.routes.routes().len();
            // With the keys the environment set over the file, if any.
            match cli.config.is_some() {
                true => println!("{}: ok ({routes} routes)", config.source.describe()),
                false => println!("{source}: ok ({routes} routes)"),
            }
            if routes == 0 {
                // Valid (a relay for events only), but worth a second look.
                eprintln!(
                    "{source}: note: no [[route]]: every relayed request and CONNECT is refused"
                );
            }
            return ExitCode::SUCCESS;
        }
        Some(Command::Health { admin }) => {
            return match admin_addr(admin, &config) {
                Some(addr) => health(&addr),
                None => ExitCode::FAILURE,
            };
        }
        Some(Command::Reload { admin }) => {
            return match admin_addr(admin, &config) {
                Some(addr) => reload(&addr),
                None => ExitCode::FAILURE,
            };
        }
        Some(Command::Passwd { .. }) | None => {}
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
        // Before binding: a signal right after start drains (a second one ends the drain).
        let signals = porthole_relay::StopSignals::install();
        // The access log and the event store open before anything is bound:
        // a path named in the configuration that cannot be opened is a bad
        // configuration (exit 64, which the systemd unit does not restart).
        let shared = match porthole_relay::Shared::new(config) {
            Ok(shared) => std::sync::Arc::new(shared),
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("{source}: {e}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        };
        let listeners = match porthole_relay::Listeners::bind(&shared.config()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot bind");
                return ExitCode::FAILURE;
            }
        };
        let (shutdown, cut_short) = (signals.nth(1), signals.nth(2));
        match porthole_relay::run_shared(listeners, shared, shutdown, cut_short).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "relay failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// The admin address a subcommand asks: `--admin`, else `relay.admin_listen`
/// (`None`, said on standard error, when that is off).
fn admin_addr(given: Option<String>, config: &Config) -> Option<String> {
    let addr = given.or_else(|| config.relay.admin_listen.map(|a| a.to_string()));
    if addr.is_none() {
        eprintln!("relay.admin_listen is off: nothing to ask");
    }
    addr
}

/// An answer from the admin listener: its status code and status line, and its body.
struct AdminAnswer {
    code: u16,
    status_line: String,
    body: String,
}

/// One request to the admin listener at `addr` with a plain socket (no
/// `Origin`: the listener refuses requests from web pages), read until it
/// closes; waits at most `timeout` to connect and for each read.
fn admin_request(
    addr: &str,
    request: &str,
    timeout: std::time::Duration,
) -> std::io::Result<AdminAnswer> {
    use std::io::{Read, Write};
    let sock = addr
        .parse::<std::net::SocketAddr>()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status_line = head.lines().next().unwrap_or("").to_string();
    let code = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not an HTTP answer: {status_line:?}"),
            )
        })?;
    Ok(AdminAnswer {
        code,
        status_line,
        body: body.to_string(),
    })
}

/// `GET /healthz` on the admin listener: prints the answer's status line,
/// exits 0 on `200`.
fn health(addr: &str) -> ExitCode {
    let request = "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    match admin_request(addr, request, std::time::Duration::from_secs(3)) {
        Ok(answer) => {
            println!("{addr}: {}", answer.status_line);
            if answer.code == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `POST /reload` on the admin listener: prints the relay's answer, on
/// standard output when it took the configuration (exit 0), on standard
/// error when it refused it (`422`, the reason) or anything else went wrong
/// (exit 1).
fn reload(addr: &str) -> ExitCode {
    let request = "POST /reload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    // The relay reads and checks the file before it answers.
    match admin_request(addr, request, std::time::Duration::from_secs(30)) {
        Ok(answer) if answer.code == 200 => {
            print!("{addr}: {}", answer.body);
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!("{addr}: {}", answer.status_line);
            eprint!("{}", answer.body);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("{addr}: cannot ask the relay to reload: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `porthole-relay passwd NAME`: the secret comes from standard input (first
/// line), never from the command line where `ps` would show it.
fn passwd(name: &str) -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("cannot read the secret from standard input: {e}");
        return ExitCode::FAILURE;
    }
    let secret = line.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        eprintln!("empty secret on standard input");
        return ExitCode::FAILURE;
    }
    match porthole_relay::secret::passwd_line(name, secret) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
