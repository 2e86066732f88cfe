//! 10,000 concurrent long-pollers on one topic of the real `porthole-relay`
//! binary (release build); one publication; the time until every poller has
//! its answer (p50, p99, max), and the relay's resident memory per waiting
//! poller (VmRSS with all of them waiting, minus before). Everything on
//! 127.0.0.1, bounded in time. Run it with `benches/events.sh` (see
//! `benches/EVENTS.md`); `POLLERS=N` changes the count.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use porthole_suite::{raw_exchange, RelayProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The whole run stops after this, whatever happens.
const LIMIT: Duration = Duration::from_secs(180);

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    match tokio::time::timeout(LIMIT, run()).await {
        Ok(()) => {}
        Err(_) => {
            eprintln!("benchmark did not finish within {LIMIT:?}");
            std::process::exit(1);
        }
    }
}

async fn run() {
    let pollers: usize = std::env::var("POLLERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let dir = std::env::temp_dir().join(format!("porthole-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let conf = dir.join("relay.toml");
    let limit = pollers * 2 + 100;
    std::fs::write(
        &conf,
        format!(
            "[relay]\nname = \"relay.bench\"\n[limits]\nmax_connections = {limit}\n\
             max_connections_per_client = {limit}\n[events]\nmax_pollers_per_topic = {limit}\n\
             max_pollers = {limit}\nmax_wait = \"120s\"\n"
        ),
    )
    .expect("write config");
    // Info for the "listening" line that the start waits for; no access
    // lines (they would be written during the fan-out).
    let relay = RelayProcess::spawn(&conf, &[("RUST_LOG", "info,porthole::access=off")]).await;

    // Warm up (one publish, one poll) so the baseline includes the hub itself.
    publish(relay.admin, "warm").await;
    let _ = raw_exchange(
        relay.addr,
        request("warm", 0).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    let rss_before = relay.rss_kib();

    println!("connecting {pollers} long-pollers to {} ...", relay.addr);
    let connect_started = Instant::now();
    // One connection at a time until its request is sent: the listen backlog
    // is finite, and dropped SYNs would add whole seconds of retransmission.
    let mut clients = Vec::with_capacity(pollers);
    for _ in 0..pollers {
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
        clients.push(tokio::spawn(one_poller(relay.addr, sent_tx)));
        let _ = sent_rx.await;
    }
    wait_pollers(relay.admin, "bench", pollers).await;
    let rss_waiting = relay.rss_kib();
    println!(
        "{pollers} pollers waiting after {:?}; relay VmRSS {rss_before} KiB -> {rss_waiting} KiB",
        connect_started.elapsed()
    );

    let published = Instant::now();
    publish(relay.admin, "bench").await;
    let mut latencies = Vec::with_capacity(pollers);
    let mut failed = 0;
    for c in clients {
        match c.await {
            Ok(Some(done)) => latencies.push(done.saturating_duration_since(published)),
            _ => failed += 1,
        }
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or_default()
    };
    let per_poller = (rss_waiting.saturating_sub(rss_before) * 1024) as f64 / pollers as f64;
    println!(
        "answered: {} of {pollers} ({failed} failed)",
        latencies.len()
    );
    println!(
        "publish -> all answered: p50 {:?}  p99 {:?}  max {:?}",
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    println!("relay memory per waiting poller: {per_poller:.0} bytes (VmRSS delta / pollers)");
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}

fn request(topic: &str, wait: u64) -> String {
    format!(
        "GET /events/{topic}?after=0&wait={wait} HTTP/1.1\r\nHost: relay.bench\r\nConnection: close\r\n\r\n"
    )
}

/// Connects, asks, says it is sent, then waits for the whole answer; the
/// instant it completed, or `None` if it failed.
async fn one_poller(addr: SocketAddr, sent: tokio::sync::oneshot::Sender<()>) -> Option<Instant> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(request("bench", 100).as_bytes())
        .await
        .ok()?;
    let _ = sent.send(());
    let mut buf = Vec::with_capacity(512);
    // `Connection: close`: the answer ends when the relay closes.
    stream.read_to_end(&mut buf).await.ok()?;
    let done = Instant::now();
    let ok = buf.starts_with(b"HTTP/1.1 200") && buf.windows(8).any(|w| w == b"\"id\":1,\"");
    ok.then_some(done)
}

async fn publish(admin: SocketAddr, topic: &str) {
    let req = format!(
        "POST /events/{topic} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{{\"temp\":71}}"
    );
    let answer = raw_exchange(admin, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        answer.starts_with("HTTP/1.1 201"),
        "publish failed: {answer}"
    );
}

async fn wait_pollers(admin: SocketAddr, topic: &str, n: usize) {
    let req = format!("GET /events/{topic} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let want = format!("{{\"pollers\":{n}}}");
    let start = Instant::now();
    loop {
        let answer = raw_exchange(admin, req.as_bytes(), Duration::from_secs(2)).await;
        if answer.contains(&want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {answer} of {n} pollers waiting after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
