//! Porthole shim: makes unmodified applications reach internal services
//! through the relay, as their system proxy and as local forwarded ports,
//! over ONE multiplexed HTTP/2 link that heals itself (the "communication
//! processing program" of JP4570628B2, the client device of JP5535757B2).
//!
//! Layout, in the order traffic meets it:
//!
//! - [`proxy`]: the system-proxy listener: proxy form, origin form, `CONNECT`;
//! - [`forward`]: forwarded ports, each connection a `CONNECT` stream;
//! - [`udp`]: forwarded UDP ports, each local source a CONNECT-UDP stream
//!   (RFC 9298) carrying its datagrams as capsules;
//! - [`control`]: the shim's own endpoints: PAC file, status, forward control;
//! - [`link`]: the one HTTP/2 connection to the relay (h2c, or over TLS with
//!   ALPN `h2`), an actor with a handle;
//! - [`keepalive`]: the adaptive keepalive decision (pure, clock as a parameter);
//! - [`meter`]: records when bytes last crossed the link;
//! - [`config`]: raw, then validated configuration;
//! - [`watch`]: `porthole-shim events watch TOPIC`, a long-polling event
//!   watcher with a state file (its own HTTP/1.1 connection, not the link).
//!
//! Shared with the relay (crate `porthole_relay`): the HTTP/2 link settings
//! and tunnel splice (`h2`), hop-by-hop rewriting (`rewrite`), authority
//! parsing (`routes`), identity (`dispatch`), the PAC generator (`pac`),
//! client-side TLS to the relay (`tls`) and configuration errors (`config`).
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod forward;
/// The adaptive keepalive decision, shared with the relay's uplinks.
pub use porthole_relay::keepalive;
pub mod link;
pub mod meter;
pub mod proxy;
pub mod udp;
pub mod watch;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{ForwardSpec, RawConfig, ShimConfig};
pub use forward::Forwards;
pub use link::{LinkHandle, LinkState};
pub use udp::UdpForwards;

/// What every local connection shares.
#[derive(Clone)]
pub struct Ctx {
    pub link: LinkHandle,
    pub forwards: Forwards,
    pub udp_forwards: UdpForwards,
    /// The system-proxy listener's address.
    pub listen: SocketAddr,
    /// The relay's last PAC file, served while the link is down: a browser
    /// that cannot fetch its PAC file goes `DIRECT` for everything.
    pub last_pac: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// A running shim. Dropping it stops the listeners and the link.
pub struct Shim {
    /// The system-proxy listener's address.
    pub addr: SocketAddr,
    pub link: LinkHandle,
    pub forwards: Forwards,
    pub udp_forwards: UdpForwards,
    stop: CancellationToken,
}

impl Shim {
    /// Starts the link, the configured forwards (TCP and UDP) and the
    /// system-proxy listener on `listener`. Fails if a forward cannot listen.
    pub async fn start(config: ShimConfig, listener: TcpListener) -> Result<Shim, String> {
        let addr = listener.local_addr().map_err(|e| format!("listen: {e}"))?;
        let link = LinkHandle::spawn(&config);
        let forwards = Forwards::new(link.clone());
        for spec in &config.forwards {
            forwards
                .add(spec.clone())
                .await
                .map_err(|e| format!("forward {spec}: {e}"))?;
        }
        let udp_forwards = UdpForwards::new(link.clone(), config.udp_idle);
        for spec in &config.udp_forwards {
            udp_forwards
                .add(spec.clone())
                .await
                .map_err(|e| format!("forward_udp {spec}: {e}"))?;
        }
        let stop = CancellationToken::new();
        let ctx = Ctx {
            link: link.clone(),
            forwards: forwards.clone(),
            udp_forwards: udp_forwards.clone(),
            listen: addr,
            last_pac: Default::default(),
        };
        tokio::spawn(proxy::serve(listener, ctx, stop.clone()));
        Ok(Shim {
            addr,
            link,
            forwards,
            udp_forwards,
            stop,
        })
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        self.stop.cancel();
        self.forwards.clear();
        self.udp_forwards.clear();
    }
}

/// Runs the shim until `shutdown` completes.
pub async fn run(
    config: ShimConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let shim = Shim::start(config, listener).await?;
    shutdown.await;
    tracing::info!("shutting down");
    drop(shim);
    Ok(())
}

/// The shell lines that make a terminal use the shim (`porthole-shim env`).
pub fn env_lines(listen: SocketAddr) -> String {
    let url = format!("http://{listen}");
    format!(
        "export http_proxy={url} https_proxy={url} HTTP_PROXY={url} HTTPS_PROXY={url}\n\
         export no_proxy=localhost,127.0.0.1,::1 NO_PROXY=localhost,127.0.0.1,::1\n"
    )
}

pub(crate) use porthole_relay::h2::plain;

/// Aborts a task when dropped: ties a background task to its owner.
pub(crate) struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
