//! The real `porthole-relay` binary with configuration files: `check`, the
//! shipped `conf/` files, environment overrides, the access log, SIGTERM
//! draining, connection limits, and a 1 GiB body streamed in bounded memory.

use std::path::PathBuf;
use std::time::Duration;

use porthole_suite::{
    binary, raw_exchange, route, start_refused, workspace_root, Curl, Origin, RelayProcess, Reply,
};
use tokio::net::TcpStream;

/// Writes a config file into a fresh temp dir and returns its path.
fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("porthole-bin-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A config file with one route, `app.test`, to `origin`.
fn app_config(name: &str, origin: &Origin, extra: &str) -> PathBuf {
    let routes = route("app.test", "127.0.0.1", &[origin.port()], "");
    write_config(name, &config(&routes, extra))
}

fn config(routes: &str, extra: &str) -> String {
    format!("[relay]\nname = \"bin.test\"\ndrain_timeout = \"10s\"\n{extra}\n{routes}")
}

async fn check(path: &std::path::Path) -> (i32, String) {
    let out = tokio::process::Command::new(binary("porthole-relay"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `check` says which keys the environment sets over the file (audit 4:
/// the shipped unit and image set PORTHOLE__RELAY__LISTEN, and an edit of
/// `listen` in the file then did nothing, without a hint why).
#[tokio::test]
async fn check_names_the_keys_the_environment_sets() {
    let path = workspace_root().join("conf/relay.toml");
    let out = tokio::process::Command::new(binary("porthole-relay"))
        .args(["check", "--config"])
        .arg(&path)
        .env("PORTHOLE__RELAY__LISTEN", "127.0.0.1:1")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("relay.toml (set by the environment: relay.listen): ok ("),
        "{text}"
    );
}

#[tokio::test]
async fn every_shipped_config_is_valid() {
    let conf = workspace_root().join("conf");
    let mut checked = 0;
    for entry in std::fs::read_dir(&conf).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml")
            || path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("shim"))
        {
            continue;
        }
        let (code, text) = check(&path).await;
        assert_eq!(code, 0, "{}: {text}", path.display());
        checked += 1;
    }
    assert!(checked >= 1, "no relay config in conf/");
}

#[tokio::test]
async fn check_names_every_bad_key_and_exits_64() {
    let path = write_config(
        "bad",
        "[relay]\nlisten = \"nowhere\"\n[limits]\nhead_timeout = \"soon\"\n[[route]]\nhost = \"a.test\"\nto = \"x:0\"\n",
    );
    let (code, text) = check(&path).await;
    assert_eq!(code, 64, "{text}");
    for key in ["relay.listen", "limits.head_timeout", "route[0].to"] {
        assert!(text.contains(key), "{key} not named in: {text}");
    }
    let path = write_config("unknown", "[relay]\nlisen = \"127.0.0.1:1\"\n");
    let (code, text) = check(&path).await;
    assert_eq!(code, 64);
    assert!(text.contains("relay.lisen"), "{text}");

    // A bad value from an environment override is blamed on its variable,
    // not on the file, which is fine.
    let good = write_config("good-for-env", &config("", ""));
    // Valid without routes (a relay for events only), with a note: a file
    // caught half-written looks the same.
    let (code, text) = check(&good).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("ok (0 routes)") && text.contains("no [[route]]"),
        "{text}"
    );
    let out = tokio::process::Command::new(binary("porthole-relay"))
        .args(["check", "--config"])
        .arg(&good)
        .env("PORTHOLE__LIMITS__HEAD_TIMEOUT", "soon")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(
        text.starts_with(
            "environment PORTHOLE__LIMITS__HEAD_TIMEOUT: limits.head_timeout: `soon` is not a duration"
        ),
        "{text}"
    );
    assert!(!text.contains(&good.display().to_string()), "{text}");

    // Running with a bad config fails the same way, before binding anything.
    let out = tokio::process::Command::new(binary("porthole-relay"))
        .arg("--config")
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn shipped_config_runs_with_environment_overrides() {
    // conf/relay.toml as shipped; listen, admin and name come from the environment.
    let conf = workspace_root().join("conf/relay.toml");
    let relay = RelayProcess::spawn(&conf, &[("PORTHOLE__RELAY__NAME", "env.test")]).await;
    let origin = Origin::ok().await;
    // The shipped route allows localhost:8000 only: another port is refused (403)...
    let out = Curl::new(&format!("http://localhost:{}/", origin.port()))
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(out.status, 403, "{out:?}");
    assert!(
        out.text().contains("route localhost: port"),
        "{}",
        out.text()
    );
    // ...and the overridden name is the relay's own host.
    let out = Curl::new("http://env.test/none")
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(out.status, 404);
    let out = Curl::new(&format!("{}/healthz", relay.admin_url()))
        .run()
        .await;
    assert_eq!((out.status, out.text().as_str()), (200, "ok\n"));
}

#[tokio::test]
async fn access_log_has_one_line_per_request_and_tunnel() {
    let origin = Origin::ok().await;
    let path = app_config("access", &origin, "");
    let relay = RelayProcess::spawn(&path, &[]).await;
    let url = format!("http://app.test:{}/logged", origin.port());
    assert_eq!(Curl::new(&url).proxy(&relay.url()).run().await.status, 200);
    assert_eq!(
        Curl::new(&url)
            .proxy(&relay.url())
            .arg("-p")
            .run()
            .await
            .status,
        200
    );
    assert_eq!(
        Curl::new("http://nope.test/")
            .proxy(&relay.url())
            .run()
            .await
            .status,
        403
    );
    // The log is written as requests finish; the three lines are there once curl has its answers.
    let mut log = String::new();
    for _ in 0..100 {
        log = relay.log_text();
        if log.matches("porthole::access").count() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("porthole::access"))
        .collect();
    assert_eq!(lines.len(), 3, "log: {log}");
    let get = lines
        .iter()
        .find(|l| l.contains("method=GET") && l.contains("/logged"))
        .expect("GET line");
    porthole_suite::assert_fields(
        get,
        &[
            "client=127.0.0.1:",
            "route=\"app.test\"",
            "status=200",
            "bytes_in=",
            "bytes_out=",
            "duration_ms=",
        ],
    );
    porthole_suite::assert_some_line(&lines, &["method=CONNECT", "status=200"]);
    porthole_suite::assert_some_line(&lines, &["status=403"]);
    // Milliseconds with at most three decimals (not 0.023334999999999998).
    for line in &lines {
        let ms = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("duration_ms="))
            .expect("duration_ms");
        let decimals = ms.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(ms.parse::<f64>().is_ok() && decimals <= 3, "{line}");
    }
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_stops_accepting_and_a_successor_takes_the_port() {
    let origin = Origin::start(|r| {
        if r.target == "/small" {
            Reply::Generated { len: 10 }
        } else {
            Reply::Generated { len: 24 << 20 }
        }
    })
    .await;
    let path = app_config("drain", &origin, "");
    let mut relay = RelayProcess::spawn(&path, &[]).await;
    let url = format!("http://app.test:{}/big", origin.port());
    let proxy = relay.url();
    let download = tokio::spawn(async move {
        Curl::new(&url)
            .proxy(&proxy)
            .args(&["--limit-rate", "4M"])
            .run()
            .await
    });
    while origin.received().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.signal("TERM");
    // Health turns 503 while draining, and no new connection is accepted.
    let mut draining = false;
    for _ in 0..100 {
        let out = Curl::new(&format!("{}/healthz", relay.admin_url()))
            .run()
            .await;
        if out.status == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(draining, "healthz never reported draining");
    let refused = TcpStream::connect(relay.addr).await;
    assert!(
        refused.is_err(),
        "the aggregate port still accepts while draining"
    );
    // The port and its claim are free: a successor starts there and serves
    // while the first relay still drains its download.
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], porthole_suite::free_port()));
    let successor = RelayProcess::spawn_on(&path, relay.addr, admin, &[], &[]).await;
    let small = format!("http://app.test:{}/small", origin.port());
    let out = Curl::new(&small).proxy(&successor.url()).run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert!(
        !download.is_finished(),
        "the download ended before the successor served (it is too short to show the overlap)"
    );
    let out = download.await.unwrap();
    assert_eq!(
        out.body.len(),
        24 << 20,
        "the in-flight download was cut: {}",
        out.stderr
    );
    let status = tokio::time::timeout(Duration::from_secs(10), relay.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// An access-log file that cannot take a line (a full disk: /dev/full)
/// costs no request, warns once rather than per request, and counts the
/// lines lost (audit 4: a WARN per request, counted nowhere).
#[tokio::test]
async fn access_lines_a_full_disk_refuses_are_counted_and_warned_about_once() {
    let origin = Origin::ok().await;
    let path = app_config("full", &origin, "[log]\naccess = \"/dev/full\"\n");
    let relay = RelayProcess::spawn(&path, &[]).await;
    let url = format!("http://app.test:{}/", origin.port());
    for _ in 0..20 {
        assert_eq!(Curl::new(&url).proxy(&relay.url()).run().await.status, 200);
    }
    let metrics = Curl::new(&format!("{}/metrics", relay.admin_url()))
        .run()
        .await
        .text();
    assert!(
        metrics.contains("\nporthole_access_lines_lost_total 20\n"),
        "{metrics}"
    );
    let warnings = relay.log_text().matches("access log write failed").count();
    assert_eq!(warnings, 1, "{}", relay.log_text());
}

#[tokio::test]
async fn connections_over_the_per_client_limit_get_503() {
    let origin = Origin::ok().await;
    let path = app_config(
        "limit",
        &origin,
        "[limits]\nmax_connections_per_client = 2\n",
    );
    let relay = RelayProcess::spawn(&path, &[]).await;
    // Two connections held, then a third. The readiness probe's connection
    // may still be counted when the two open (then the second is the one
    // turned away, and the third finds a free slot): each try opens a fresh
    // pair.
    let mut answer = String::new();
    let mut held = None;
    for _ in 0..50 {
        let a = TcpStream::connect(relay.addr).await.unwrap();
        let b = TcpStream::connect(relay.addr).await.unwrap();
        answer = raw_exchange(
            relay.addr,
            b"GET http://app.test/ HTTP/1.1\r\nConnection: close\r\n\r\n",
            Duration::from_secs(2),
        )
        .await;
        if answer.starts_with("HTTP/1.1 503") {
            held = Some((a, b));
            break;
        }
        drop((a, b));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("Retry-After: 1"), "{answer}");
    // Counted (the readiness probe's connection may have been turned away
    // in an earlier try too).
    let metrics = Curl::new(&format!("{}/metrics", relay.admin_url()))
        .run()
        .await
        .text();
    let series = r#"porthole_connections_turned_away_total{limit="max_connections_per_client"} "#;
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(counted >= 1, "{metrics}");
    drop(held);
    // Once the two are gone, the client is served again.
    let url = format!("http://app.test:{}/", origin.port());
    let mut status = 0;
    for _ in 0..50 {
        status = Curl::new(&url).proxy(&relay.url()).run().await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
}

#[tokio::test]
async fn one_gib_body_streams_through_in_bounded_memory() {
    const GIB: u64 = 1 << 30;
    let origin = Origin::start(|_| Reply::Generated { len: GIB }).await;
    let path = write_config(
        "gib",
        &config(&route("big.test", "127.0.0.1", &[origin.port()], ""), ""),
    );
    let relay = RelayProcess::spawn(&path, &[]).await;
    let before = relay.peak_rss_kib();
    let url = format!("http://big.test:{}/gib", origin.port());
    let out = Curl::new(&url)
        .proxy(&relay.url())
        .discard_body()
        .max_time(120)
        .run()
        .await;
    assert_eq!(out.exit, 0, "{}", out.stderr);
    assert_eq!(out.status, 200);
    assert_eq!(out.size_download, GIB, "{out:?}");
    let peak = relay.peak_rss_kib();
    assert!(before > 0 && peak > 0, "cannot read /proc for the relay");
    assert!(
        peak < 64 * 1024,
        "relay peak RSS {peak} KiB (was {before} KiB) grew with a 1 GiB body"
    );
}

#[tokio::test]
async fn reload_replaces_routes_keeps_tunnels_and_refuses_bad_files() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = porthole_suite::EchoServer::start().await;
    let origin = Origin::ok().await;
    let first = route("db.test", "127.0.0.1", &[echo.port()], "");
    let path = write_config("reload", &config(&first, ""));
    let relay = RelayProcess::spawn(&path, &[]).await;
    let url = format!("http://new.test:{}/x", origin.port());
    assert_eq!(Curl::new(&url).proxy(&relay.url()).run().await.status, 403);

    // An open tunnel before the reload...
    let mut tunnel = TcpStream::connect(relay.addr).await.unwrap();
    let req = format!("CONNECT db.test:{} HTTP/1.1\r\n\r\n", echo.port());
    tunnel.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 39];
    tunnel.read_exact(&mut head).await.unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"));

    // ...a route added to the file takes effect on SIGHUP...
    let second = route("new.test", "127.0.0.1", &[origin.port()], "");
    std::fs::write(&path, config(&format!("{first}{second}"), "")).unwrap();
    relay.signal("HUP");
    let mut status = 0;
    for _ in 0..100 {
        status = Curl::new(&url).proxy(&relay.url()).run().await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "the added route did not take effect");

    // ...and the tunnel still carries bytes.
    tunnel.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");

    // An invalid file is refused with its reason; the old configuration stays.
    std::fs::write(
        &path,
        config(&second, "[limits]\nhead_timeout = \"soon\"\n"),
    )
    .unwrap();
    let out = Curl::new(&format!("{}/reload", relay.admin_url()))
        .args(&["-X", "POST"])
        .run()
        .await;
    assert_eq!(out.status, 422, "{}", out.text());
    assert!(out.text().contains("limits.head_timeout"), "{}", out.text());
    assert_eq!(Curl::new(&url).proxy(&relay.url()).run().await.status, 200);
    let logged = porthole_suite::eventually(Duration::from_secs(5), || {
        let log = relay.log_text();
        async move { log.contains("reload refused") }
    })
    .await;
    assert!(logged, "{}", relay.log_text());

    // A valid file without routes is taken, with a warning: a file caught
    // half-written looks the same.
    std::fs::write(&path, config("", "")).unwrap();
    relay.signal("HUP");
    let warned = porthole_suite::eventually(Duration::from_secs(5), || {
        let log = relay.log_text();
        async move { log.contains("has no routes") }
    })
    .await;
    assert!(warned, "{}", relay.log_text());
    assert_eq!(Curl::new(&url).proxy(&relay.url()).run().await.status, 403);
}

#[tokio::test]
async fn json_logs_carry_the_access_fields() {
    let origin = Origin::ok().await;
    let path = app_config("json", &origin, "");
    let relay = RelayProcess::spawn_with_args(&path, &[], &["--log-format", "json"]).await;
    let url = format!("http://app.test:{}/j", origin.port());
    assert_eq!(Curl::new(&url).proxy(&relay.url()).run().await.status, 200);
    let mut access = None;
    for _ in 0..100 {
        access = relay
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["target"] == "porthole::access");
        if access.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = access.expect("a JSON access line");
    let fields = &line["fields"];
    assert_eq!(fields["status"], 200, "{line}");
    assert_eq!(fields["method"], "GET");
    assert_eq!(fields["route"], "app.test");
    assert!(fields["bytes_out"].as_u64().unwrap_or(0) > 0, "{line}");
    assert!(line["timestamp"].is_string(), "{line}");
    // Every line is JSON.
    for l in relay.log_text().lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok(),
            "not JSON: {l}"
        );
    }
}

/// Names of the relay's threads, from /proc.
fn thread_names(pid: u32) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// A 127.0.0.1 address with a port free at the moment.
fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], porthole_suite::free_port()))
}

/// Starts the relay binary with `config` on `addr` and sends one request
/// through it to `origin`'s `app.test`: the relay, and what curl got.
async fn start_and_fetch(
    config: &std::path::Path,
    addr: std::net::SocketAddr,
    origin: &Origin,
) -> (RelayProcess, porthole_suite::CurlOutput) {
    let relay = RelayProcess::spawn_on(config, addr, free_addr(), &[], &[]).await;
    let out = Curl::new(&format!("http://app.test:{}/", origin.port()))
        .proxy(&relay.url())
        .run()
        .await;
    (relay, out)
}

#[tokio::test]
async fn workers_share_the_port_and_a_second_relay_on_it_is_refused() {
    let origin = Origin::ok().await;
    let path = app_config("workers", &origin, "");
    let relay = RelayProcess::spawn(&path, &[("PORTHOLE__RELAY__WORKERS", "3")]).await;
    let workers = thread_names(relay.pid())
        .into_iter()
        .filter(|n| n.starts_with("porthole-worke"))
        .count();
    assert_eq!(workers, 3, "{:?}", thread_names(relay.pid()));

    // Twenty connections at once, spread over the workers by the kernel.
    let url = format!("http://app.test:{}/", origin.port());
    let runs: Vec<_> = (0..20)
        .map(|_| tokio::spawn(Curl::new(&url).proxy(&relay.url()).run()))
        .collect();
    for run in runs {
        assert_eq!(run.await.unwrap().status, 200);
    }

    // A second relay on the same port fails at once ("address in use"),
    // rather than joining the first one's SO_REUSEPORT group.
    let log = start_refused(&path, relay.addr).await;
    assert!(
        log.contains("relay.listen") && log.contains("in use"),
        "{log}"
    );
    // The first relay serves every connection as before.
    for _ in 0..10 {
        let out = Curl::new(&url).proxy(&relay.url()).run().await;
        assert_eq!(out.status, 200);
    }
    assert_eq!(origin.received().len(), 30);
}

/// A path the configuration names that cannot be opened (an access log in
/// a directory that does not exist) stops the relay before it binds
/// anything, with exit 64 as any bad configuration (audit 4: it bound both
/// ports first, then failed with exit 1, which systemd restarts in a loop).
#[tokio::test]
async fn an_access_log_that_cannot_be_opened_stops_the_relay_before_it_binds() {
    let origin = Origin::ok().await;
    let path = app_config(
        "badlog",
        &origin,
        "[log]\naccess = \"/nonexistent-porthole-dir/access.log\"\n",
    );
    let addr = free_addr();
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(binary("porthole-relay"))
            .arg("--config")
            .arg(&path)
            .env("PORTHOLE__RELAY__LISTEN", addr.to_string())
            .env("RUST_LOG", "debug")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the relay did not exit")
    .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{log}");
    assert!(
        log.contains("log.access /nonexistent-porthole-dir/access.log"),
        "{log}"
    );
    assert!(!log.contains("listening"), "{log}");
}

/// Two relays started in the same instant can both find the port free; the
/// claim decides. The test holds the claim itself, as the first of two such
/// relays would, on a port nobody listens on.
#[tokio::test]
async fn a_relay_whose_address_another_relay_claims_does_not_start() {
    use std::os::linux::net::SocketAddrExt;
    let origin = Origin::ok().await;
    let path = app_config("claimed", &origin, "");
    let addr = free_addr();
    let name = porthole_relay::workers::claim_name(addr);
    let abstract_addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let claim = std::os::unix::net::UnixListener::bind_addr(&abstract_addr).unwrap();

    let log = start_refused(&path, addr).await;
    assert!(
        log.contains(&format!(
            "relay.listen {addr}: address in use by another porthole-relay"
        )),
        "{log}"
    );
    // It let the port go: once the claim is released, a relay starts there.
    drop(claim);
    let (_relay, out) = start_and_fetch(&path, addr, &origin).await;
    assert_eq!(out.status, 200, "{out:?}");
}

/// Abstract socket names have no permissions: a process of another user
/// holding the claim's name (who could not join this user's `SO_REUSEPORT`
/// group anyway) does not keep the relay from starting. Needs root to run a
/// process as another user; skipped otherwise.
#[tokio::test]
#[allow(unsafe_code)]
async fn a_claim_squatted_by_another_user_does_not_stop_the_relay() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to hold the name as another user");
        return;
    }
    let origin = Origin::ok().await;
    let path = app_config("squatted", &origin, "");
    let addr = free_addr();
    let name = porthole_relay::workers::claim_name(addr);
    let mut squatter = std::process::Command::new("sleep");
    squatter.arg("60");
    let held_name = name.clone();
    // SAFETY: between fork and exec the child only makes system calls
    // (setgid, setuid, socket, bind, listen) and returns their errors.
    unsafe {
        squatter.pre_exec(move || {
            use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog};
            use nix::sys::socket::{SockFlag, SockType, UnixAddr};
            nix::unistd::setgid(nix::unistd::Gid::from_raw(65534))?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(65534))?;
            // Without close-on-exec: `sleep` keeps it, listening as nobody.
            let fd = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::empty(),
                None,
            )?;
            let at = UnixAddr::new_abstract(held_name.as_bytes())?;
            bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &at)?;
            listen(&fd, Backlog::new(8)?)?;
            std::mem::forget(fd);
            Ok(())
        });
    }
    let mut child = squatter.spawn().unwrap();
    // Held once the child has listened: binding the name fails from then on.
    let abstract_addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let held = porthole_suite::eventually(Duration::from_secs(5), || async {
        std::os::unix::net::UnixListener::bind_addr(&abstract_addr).is_err()
    })
    .await;
    assert!(held, "the squatter never held @{name}");

    let (relay, out) = start_and_fetch(&path, addr, &origin).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(out.status, 200, "{out:?}");
    let log = relay.log_text();
    assert!(
        log.contains("held by a process of another user") && log.contains("holder_uid=Some(65534)"),
        "{log}"
    );
}

#[tokio::test]
async fn signals_right_after_the_listening_line_are_handled_not_fatal() {
    // SIGHUP and SIGUSR1 end a process that has no handler for them: the
    // relay installs its handlers before it logs `listening` (which is all
    // RelayProcess waits for), so a signal at once reloads or is ignored.
    let origin = Origin::ok().await;
    let path = app_config("early-signals", &origin, "");
    let mut relay = RelayProcess::spawn(&path, &[]).await;
    relay.signal("HUP");
    relay.signal("USR1"); // no access-log file: nothing to reopen
    let url = format!("http://app.test:{}/", origin.port());
    let out = Curl::new(&url).proxy(&relay.url()).run().await;
    assert_eq!(out.status, 200, "{}", relay.log_text());
    let reloaded = porthole_suite::eventually(Duration::from_secs(5), || {
        let log = relay.log_text();
        async move { log.contains("configuration reloaded") }
    })
    .await;
    assert!(reloaded, "{}", relay.log_text());
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "{}",
        relay.log_text()
    );
}

/// A relay whose standard error nobody reads (a full pipe, a stuck journal)
/// keeps serving: its log lines queue for a writer thread of their own.
/// Before, a worker blocked in write(2) once the pipe held 64 KiB (about
/// 260 access lines) and every request behind it waited.
#[tokio::test]
async fn a_relay_whose_stderr_is_not_read_keeps_serving() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let origin = Origin::ok().await;
    let path = app_config("stderr", &origin, "");
    let (addr, admin) = (free_addr(), free_addr());
    let mut child = tokio::process::Command::new(binary("porthole-relay"))
        .arg("--config")
        .arg(&path)
        .env("PORTHOLE__RELAY__LISTEN", addr.to_string())
        .env("PORTHOLE__RELAY__ADMIN_LISTEN", admin.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Held open, never read.
    let _unread = child.stderr.take();
    porthole_suite::wait_for_port(addr, Duration::from_secs(10)).await;

    let stream = TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let requests = 2000;
    for i in 0..requests {
        let req = format!(
            "GET http://app.test:{}/{i} HTTP/1.1\r\nHost: app.test\r\n\r\n",
            origin.port()
        );
        write.write_all(req.as_bytes()).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            let (mut status, mut length) = (String::new(), 0usize);
            read.read_line(&mut status).await.unwrap();
            loop {
                let mut line = String::new();
                read.read_line(&mut line).await.unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0u8; length];
            read.read_exact(&mut body).await.unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        })
        .await
        .unwrap_or_else(|_| panic!("request {i} of {requests}: no answer in 5 s"));
        assert!(
            answer.0.starts_with("HTTP/1.1 200 "),
            "request {i}: {answer:?}"
        );
        assert_eq!(answer.1, format!("ok /{i}"));
    }
    // Nothing was dropped yet (the queue holds 64 Ki lines), and /metrics says so.
    let metrics = raw_exchange(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        metrics.contains("\nporthole_log_lines_dropped_total 0\n"),
        "{metrics}"
    );
}

/// `porthole-relay reload --config FILE` (audit L3: `ExecReload=kill -HUP`
/// could not report a refused reload): asks the relay named by the file,
/// exits 0 when it took the file, non-zero with the reason on standard error
/// when the file is broken or the relay cannot be reached; the relay keeps
/// serving what it had.
#[tokio::test]
async fn reload_subcommand_reports_whether_the_relay_took_the_file() {
    let origin = Origin::ok().await;
    let first = route("app.test", "127.0.0.1", &[origin.port()], "");
    let path = write_config("reload-cmd", &config(&first, ""));
    let relay = RelayProcess::spawn(&path, &[]).await;
    // As in a systemd unit: the reload runs with the service's environment.
    let admin_env = relay.admin.to_string();
    let reload = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(binary("porthole-relay"));
        cmd.arg("--config")
            .arg(&path)
            .arg("reload")
            .args(args)
            .env("PORTHOLE__RELAY__ADMIN_LISTEN", &admin_env)
            .kill_on_drop(true);
        async move {
            let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
                .await
                .expect("reload finished in time")
                .expect("reload ran");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let new_url = format!("http://new.test:{}/x", origin.port());
    let app_url = format!("http://app.test:{}/x", origin.port());
    assert_eq!(
        Curl::new(&new_url).proxy(&relay.url()).run().await.status,
        403
    );

    // A valid change: exit 0, the relay's answer on stdout, the route serves.
    let second = route("new.test", "127.0.0.1", &[origin.port()], "");
    std::fs::write(&path, config(&format!("{first}{second}"), "")).unwrap();
    let (code, stdout, stderr) = reload(&[]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("reloaded"), "{stdout}");
    assert_eq!(
        Curl::new(&new_url).proxy(&relay.url()).run().await.status,
        200
    );

    // A broken file: not sent, its problem on stderr, exit 64.
    std::fs::write(&path, config(&first, "[limits]\nhead_timeout = \"soon\"\n")).unwrap();
    let (code, stdout, stderr) = reload(&[]).await;
    assert_eq!(code, 64, "{stdout}{stderr}");
    assert!(stderr.contains("limits.head_timeout"), "{stderr}");
    // With --admin, the relay is asked: it refuses with its reason (422).
    let (code, stdout, stderr) = reload(&["--admin", &relay.admin.to_string()]).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("422")
            && stderr.contains("reload refused")
            && stderr.contains("limits.head_timeout"),
        "{stderr}"
    );
    // The relay kept the configuration it had.
    assert_eq!(
        Curl::new(&new_url).proxy(&relay.url()).run().await.status,
        200
    );
    assert_eq!(
        Curl::new(&app_url).proxy(&relay.url()).run().await.status,
        200
    );

    // No relay there: non-zero, and why.
    let nobody = free_addr().to_string();
    let (code, stdout, stderr) = reload(&["--admin", &nobody]).await;
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains(&nobody) && stderr.contains("cannot ask the relay to reload"),
        "{stderr}"
    );
}

/// A second SIGTERM during the drain ends it at once (audit N1: only
/// SIGKILL did, so `kill` twice or Ctrl-C twice waited the whole
/// `drain_timeout`), and the end of the drain is logged with how long it
/// took and how many connections it cut (N2).
#[tokio::test]
async fn a_second_sigterm_ends_the_drain_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = porthole_suite::EchoServer::start().await;
    let path = write_config(
        "second-term",
        &format!(
            "[relay]\nname = \"bin.test\"\ndrain_timeout = \"60s\"\n{}",
            route("db.test", "127.0.0.1", &[echo.port()], "")
        ),
    );
    let mut relay = RelayProcess::spawn(&path, &[]).await;
    let mut tunnel = TcpStream::connect(relay.addr).await.unwrap();
    let req = format!("CONNECT db.test:{} HTTP/1.1\r\n\r\n", echo.port());
    tunnel.write_all(req.as_bytes()).await.unwrap();
    let mut head = [0u8; 39];
    tunnel.read_exact(&mut head).await.unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
    tunnel.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tunnel.read_exact(&mut back).await.unwrap();

    relay.signal("TERM");
    let draining = porthole_suite::eventually(Duration::from_secs(5), || {
        let log = relay.log_text();
        async move { log.contains("shutting down") }
    })
    .await;
    assert!(draining, "{}", relay.log_text());
    // The open tunnel holds the drain.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        relay.child.try_wait().unwrap().is_none(),
        "the relay did not wait for its tunnel: {}",
        relay.log_text()
    );

    let again = std::time::Instant::now();
    relay.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(5), relay.child.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "still draining 5 s after the second SIGTERM: {}",
                relay.log_text()
            )
        })
        .unwrap();
    assert!(status.success(), "{status:?}: {}", relay.log_text());
    assert!(again.elapsed() < Duration::from_secs(5));
    let log = relay.log_text();
    let ended = log
        .lines()
        .find(|l| l.contains("drain ended"))
        .unwrap_or_else(|| panic!("no drain-ended line: {log}"));
    assert!(
        ended.contains("cut=1") && ended.contains("second signal") && ended.contains("took_ms="),
        "{ended}"
    );
    assert!(log.contains("second stop signal"), "{log}");
    // The tunnel was closed.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the tunnel is still open");
}
