//! Tunnel load tool for `benches/run.sh`: the one client and the one sink used
//! for every row of the CONNECT figures (P4, P5, P6), so rows differ only in
//! what sits between them.
//!
//! Every client connection does the same thing whatever it talks to: it sends
//! `CONNECT <target> HTTP/1.1` and waits for a `200`. A CONNECT proxy answers
//! itself and tunnels to the sink; a plain TCP forwarder (socat, HAProxy tcp
//! mode) passes the request to the sink, which answers `200` the same way; and
//! "direct" sends it to the sink itself. The client's own ceiling is therefore
//! measured with exactly the client code that measures the proxies.
//!
//! Modes (one JSON line on stdout each, except `sink`):
//!
//! - `sink --listen ADDR`: accepts, answers a leading CONNECT with `200`, then
//!   discards everything it reads (one read buffer per worker thread, so idle
//!   connections hold none); prints `listening ADDR`; runs until killed;
//! - `bulk --to ADDR --target HOST:PORT --streams N --secs D [--warmup S]`:
//!   N tunnels push zeros for a warm-up, then for D seconds; the MB/s is what
//!   the client wrote in that window (socket buffers are full at both ends of
//!   the window, so what they hold cancels out);
//! - `idle --to ADDR --target HOST:PORT --n N --pids P,Q`: opens N tunnels and
//!   leaves them idle; VmRSS of the given processes and their descendants
//!   before and after;
//! - `setups --to ADDR --target HOST:PORT --concurrency C --secs D [--plain]`:
//!   C loops of open, CONNECT, 200, close (`--plain`: open, close), counted for
//!   D seconds after a short warm-up.
//!
//! Every loop is bounded by `--secs` (or by `--timeout` for `idle`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WRITE_CHUNK: usize = 256 * 1024;
const READ_BUF: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(mode) = args.next() else {
        eprintln!("usage: tunnel_load sink|bulk|idle|setups --key value ...");
        std::process::exit(64);
    };
    let mut opts: HashMap<String, String> = HashMap::new();
    let rest: Vec<String> = args.collect();
    let mut i = 0;
    while i < rest.len() {
        let key = rest[i].trim_start_matches("--").to_string();
        match rest.get(i + 1) {
            Some(v) if !v.starts_with("--") => {
                opts.insert(key, v.clone());
                i += 2;
            }
            _ => {
                opts.insert(key, String::new());
                i += 1;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async move {
        match mode.as_str() {
            "sink" => sink(&opts).await,
            "bulk" => bulk(&opts).await,
            "idle" => idle(&opts).await,
            "setups" => setups(&opts).await,
            other => Err(format!("unknown mode {other}").into()),
        }
    });
    // Open tunnels and tasks end with the runtime; do not wait for them.
    runtime.shutdown_background();
    if let Err(e) = result {
        eprintln!("tunnel_load: {e}");
        std::process::exit(1);
    }
}

fn opt<T: std::str::FromStr>(
    opts: &HashMap<String, String>,
    key: &str,
    default: Option<T>,
) -> Res<T> {
    match opts.get(key) {
        Some(v) => v
            .parse()
            .map_err(|_| format!("--{key}: cannot parse `{v}`").into()),
        None => default.ok_or_else(|| format!("--{key} is required").into()),
    }
}

// ---------------------------------------------------------------- sink

thread_local! {
    static SINK_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; READ_BUF]);
}

async fn sink(opts: &HashMap<String, String>) -> Res<()> {
    let listen: String = opt(opts, "listen", Some("127.0.0.1:0".to_string()))?;
    let listener = TcpListener::bind(&listen).await?;
    println!("listening {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = sink_conn(stream).await;
        });
    }
}

/// Answers a leading CONNECT, then reads and discards until EOF.
async fn sink_conn(mut stream: TcpStream) -> Res<()> {
    let _ = stream.set_nodelay(true);
    let mut head = Vec::new();
    let mut small = [0u8; 1024];
    loop {
        let n = stream.read(&mut small).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&small[..n]);
        if !b"CONNECT ".starts_with(&head[..head.len().min(8)]) {
            break; // data, not a CONNECT request
        }
        if let Some(end) = find(&head, b"\r\n\r\n") {
            stream
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            head.drain(..end + 4);
            break;
        }
        if head.len() > 8192 {
            return Err("CONNECT head too long".into());
        }
    }
    drop(head);
    loop {
        stream.readable().await?;
        let read = SINK_BUF.with(|b| stream.try_read(&mut b.borrow_mut()));
        match read {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------- client

/// Opens a connection to `to` and gets a `200` for `CONNECT target`.
async fn open_tunnel(to: &str, target: &str) -> Res<TcpStream> {
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
        .await
        .map_err(|_| "connect timeout")??;
    let _ = stream.set_nodelay(true);
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // The sink never sends after its `200`, so whatever arrives up to the
    // blank line is the whole response head.
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 1024];
    let read_head = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err::<(), Box<dyn std::error::Error + Send + Sync>>(
                    "closed before the CONNECT response".into(),
                );
            }
            head.extend_from_slice(&buf[..n]);
            if head.ends_with(b"\r\n\r\n") {
                return Ok(());
            }
            if head.len() > 8192 {
                return Err("CONNECT response head too long".into());
            }
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, read_head)
        .await
        .map_err(|_| "CONNECT response timeout")??;
    let status_ok = head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200");
    if !status_ok {
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or("").to_string();
        return Err(format!("CONNECT refused: {line}").into());
    }
    Ok(stream)
}

async fn bulk(opts: &HashMap<String, String>) -> Res<()> {
    let to: String = opt(opts, "to", None)?;
    let target: String = opt(opts, "target", None)?;
    let streams: usize = opt(opts, "streams", Some(1))?;
    let secs: f64 = opt(opts, "secs", Some(3.0))?;
    let warmup: f64 = opt(opts, "warmup", Some(0.5))?;

    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut opened = Vec::new();
    for _ in 0..streams {
        opened.push(open_tunnel(&to, &target).await?);
    }
    let chunk: Arc<Vec<u8>> = Arc::new(vec![0u8; WRITE_CHUNK]);
    let errors = Arc::new(AtomicUsize::new(0));
    for mut stream in opened {
        let (written, stop, chunk, errors) =
            (written.clone(), stop.clone(), chunk.clone(), errors.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match stream.write(&chunk).await {
                    Ok(n) => {
                        written.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let (b0, t0) = (written.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (b1, t1) = (written.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    let elapsed = (t1 - t0).as_secs_f64();
    let mbps = (b1 - b0) as f64 / elapsed / 1e6;
    println!(
        "{{\"mode\":\"bulk\",\"streams\":{streams},\"bytes\":{},\"secs\":{elapsed:.3},\"mb_per_s\":{mbps:.1},\"stream_errors\":{}}}",
        b1 - b0,
        errors.load(Ordering::Relaxed)
    );
    Ok(())
}

/// VmRSS in KiB of each pid and all its descendants.
fn tree_rss_kib(roots: &[u32]) -> u64 {
    let mut parent: HashMap<u32, u32> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // The command may contain spaces: fields after the last ')'.
            let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
            if let Some(ppid) = after.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                parent.insert(pid, ppid);
            }
        }
    }
    let in_tree = |mut pid: u32| loop {
        if roots.contains(&pid) {
            return true;
        }
        match parent.get(&pid) {
            Some(&p) if p > 1 && p != pid => pid = p,
            _ => return false,
        }
    };
    parent
        .keys()
        .copied()
        .chain(roots.iter().copied())
        .collect::<std::collections::HashSet<u32>>()
        .into_iter()
        .filter(|pid| in_tree(*pid))
        .map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                })
                .unwrap_or(0)
        })
        .sum()
}

async fn open_many(
    to: &str,
    target: &str,
    n: usize,
    parallel: usize,
) -> (Vec<TcpStream>, usize, String) {
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (to, target, sem) = (to.to_string(), target.to_string(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            open_tunnel(&to, &target).await
        }));
    }
    let mut open = Vec::with_capacity(n);
    let mut failed = 0;
    let mut last_error = String::new();
    for t in tasks {
        match t.await {
            Ok(Ok(s)) => open.push(s),
            Ok(Err(e)) => {
                failed += 1;
                last_error = e.to_string();
            }
            Err(e) => {
                failed += 1;
                last_error = e.to_string();
            }
        }
    }
    (open, failed, last_error)
}

async fn idle(opts: &HashMap<String, String>) -> Res<()> {
    let to: String = opt(opts, "to", None)?;
    let target: String = opt(opts, "target", None)?;
    let n: usize = opt(opts, "n", Some(2000))?;
    let settle: f64 = opt(opts, "settle", Some(1.0))?;
    let pids: Vec<u32> = opt::<String>(opts, "pids", None)?
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| "--pids: comma-separated process ids")?;

    // Warm-up: a few tunnels opened and closed, so one-time allocations
    // (thread stacks, pools, first-use tables) are not counted per tunnel.
    let (warm, _, _) = open_many(&to, &target, 20, 20).await;
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = tree_rss_kib(&pids);
    let started = Instant::now();
    let (open, failed, last_error) = open_many(&to, &target, n, 64).await;
    let open_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    // Still open? A tunnel the proxy closed reads EOF at once.
    let mut alive = 0;
    let mut probe = [0u8; 1];
    for s in &open {
        if let Err(e) = s.try_read(&mut probe) {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                alive += 1;
            }
        }
    }
    let after = tree_rss_kib(&pids);
    let per = if alive > 0 {
        (after as f64 - before as f64) / alive as f64
    } else {
        0.0
    };
    println!(
        "{{\"mode\":\"idle\",\"opened\":{},\"alive\":{alive},\"failed\":{failed},\"last_error\":{:?},\"open_secs\":{open_secs:.2},\"rss_before_kib\":{before},\"rss_after_kib\":{after},\"kib_per_tunnel\":{per:.2}}}",
        open.len(),
        last_error
    );
    drop(open);
    Ok(())
}

/// Plain TCP: open, close our side, wait for the sink to close its side.
/// (Dropping the socket right after `connect` makes loopback stall on
/// TIME_WAIT collisions, which would measure the kernel, not the client.)
async fn plain_round(to: &str) -> Res<()> {
    let mut stream = TcpStream::connect(to).await?;
    stream.shutdown().await?;
    let mut buf = [0u8; 16];
    while stream.read(&mut buf).await? > 0 {}
    Ok(())
}

async fn setups(opts: &HashMap<String, String>) -> Res<()> {
    let to: String = opt(opts, "to", None)?;
    let target: String = opt(opts, "target", None)?;
    let concurrency: usize = opt(opts, "concurrency", Some(20))?;
    let secs: f64 = opt(opts, "secs", Some(3.0))?;
    let warmup: f64 = opt(opts, "warmup", Some(0.5))?;
    let plain = opts.contains_key("plain");

    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let last_error = Arc::new(std::sync::Mutex::new(String::new()));
    for _ in 0..concurrency {
        let (to, target) = (to.clone(), target.clone());
        let (done, errors, stop, last_error) = (
            done.clone(),
            errors.clone(),
            stop.clone(),
            last_error.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = if plain {
                    plain_round(&to).await
                } else {
                    open_tunnel(&to, &target).await.map(drop)
                };
                match result {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut l) = last_error.lock() {
                            *l = e.to_string();
                        }
                        // Out of ports or refused: do not spin.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let (d0, e0, t0) = (
        done.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (d1, e1, t1) = (
        done.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        Instant::now(),
    );
    stop.store(true, Ordering::Relaxed);
    let elapsed = (t1 - t0).as_secs_f64();
    let last = last_error.lock().map(|l| l.clone()).unwrap_or_default();
    println!(
        "{{\"mode\":\"setups\",\"plain\":{plain},\"done\":{},\"errors\":{},\"last_error\":{last:?},\"secs\":{elapsed:.3},\"per_s\":{:.1}}}",
        d1 - d0,
        e1 - e0,
        (d1 - d0) as f64 / elapsed
    );
    Ok(())
}
