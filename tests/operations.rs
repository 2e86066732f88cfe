//! Operating the relay: metrics that move with traffic, the status page in a
//! real (headless) Chromium, the access log file and its reopening, and the
//! Dockerfile and systemd unit kept consistent with the README and conf/.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use porthole_suite::{
    config_with, head_field, route, workspace_root, Curl, EchoServer, Origin, Relay, RelayProcess,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Parses the exposition format into `series -> value` (`name{labels}` as written).
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

async fn scrape(relay: &Relay) -> HashMap<String, f64> {
    let out = Curl::new(&format!("{}/metrics", relay.admin_url()))
        .run()
        .await;
    assert_eq!(out.status, 200);
    parse_metrics(&out.text())
}

fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_with_requests_tunnels_and_failures() {
    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let dead = porthole_suite::free_port();
    let routes = [
        route("app.test", "127.0.0.1", &[origin.port()], ""),
        route("db.test", "127.0.0.1", &[echo.port()], ""),
        route("dead.test", "127.0.0.1", &[dead], ""),
    ]
    .concat();
    let relay = Relay::start(&config_with(&routes, "")).await;
    let before = scrape(&relay).await;

    let url = format!("http://app.test:{}/m", origin.port());
    for _ in 0..3 {
        assert_eq!(Curl::new(&url).proxy(&relay.url()).run().await.status, 200);
    }
    assert_eq!(
        Curl::new("http://nope.test/")
            .proxy(&relay.url())
            .run()
            .await
            .status,
        403
    );
    assert_eq!(
        Curl::new(&format!("http://dead.test:{dead}/"))
            .proxy(&relay.url())
            .run()
            .await
            .status,
        502
    );

    // An open tunnel shows in the gauge while it is open.
    let mut t = TcpStream::connect(relay.addr).await.unwrap();
    t.write_all(format!("CONNECT db.test:{} HTTP/1.1\r\n\r\n", echo.port()).as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 39];
    t.read_exact(&mut head).await.unwrap();
    t.write_all(b"12345").await.unwrap();
    let mut back = [0u8; 5];
    t.read_exact(&mut back).await.unwrap();
    let during = scrape(&relay).await;
    assert_eq!(
        value(&during, r#"porthole_open_tunnels{route="db.test"}"#),
        1.0
    );
    assert!(value(&during, "porthole_open_connections") >= 1.0);
    drop(t);

    let app_ok = r#"porthole_requests_total{route="app.test",method="GET",status="2xx"}"#;
    let refused = r#"porthole_requests_total{route="-",method="GET",status="4xx"}"#;
    let failed = r#"porthole_upstream_connect_failures_total{route="dead.test",cause="refused"}"#;
    let mut after = scrape(&relay).await;
    // The tunnel's access record lands when both sides have closed.
    for _ in 0..100 {
        if value(
            &after,
            r#"porthole_tunnel_duration_seconds_count{route="db.test"}"#,
        ) >= 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = scrape(&relay).await;
    }
    assert_eq!(value(&after, app_ok) - value(&before, app_ok), 3.0);
    assert_eq!(value(&after, refused) - value(&before, refused), 1.0);
    assert_eq!(value(&after, failed) - value(&before, failed), 1.0);
    assert_eq!(
        value(
            &after,
            r#"porthole_request_duration_seconds_count{route="app.test"}"#
        ),
        3.0
    );
    assert!(value(&after, r#"porthole_bytes_out_total{route="app.test"}"#) > 3.0 * 5.0);
    assert_eq!(
        value(
            &after,
            r#"porthole_tunnel_duration_seconds_count{route="db.test"}"#
        ),
        1.0
    );
    assert_eq!(
        value(&after, r#"porthole_open_tunnels{route="db.test"}"#),
        0.0
    );
    assert_eq!(
        value(
            &after,
            r#"porthole_requests_total{route="db.test",method="CONNECT",status="2xx"}"#
        ),
        1.0
    );
}

fn chromium() -> PathBuf {
    for candidate in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!("chromium is not installed (scripts/test.sh installs it)");
}

/// Loads a page in headless Chromium; returns the DOM after load, and saves a screenshot if asked.
async fn chromium_dump(url: &str, screenshot: Option<&PathBuf>) -> String {
    let profile = std::env::temp_dir().join(format!(
        "porthole-chromium-{}-{}",
        std::process::id(),
        screenshot.is_some()
    ));
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .kill_on_drop(true);
    match screenshot {
        Some(path) => cmd
            .arg(format!("--screenshot={}", path.display()))
            .arg("--window-size=1200,800"),
        None => cmd.arg("--dump-dom"),
    };
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.arg(url).output())
        .await
        .expect("chromium finished in time")
        .expect("chromium ran");
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The 2xx counter of a route's row in the rendered status page.
fn route_2xx(dom: &str, route: &str) -> u64 {
    let row_start = dom
        .find(&format!("<tr data-route=\"{route}\">"))
        .unwrap_or_else(|| panic!("no row for {route} in {dom}"));
    let row = &dom[row_start..];
    let cell = row.find("data-count=\"2xx\">").expect("2xx cell") + "data-count=\"2xx\">".len();
    row[cell..]
        .split('<')
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .expect("a number")
}

#[tokio::test]
async fn status_page_renders_in_chromium_and_counts_requests() {
    let origin = Origin::ok().await;
    let relay = Relay::start(&config_with(
        &route("app.test", "127.0.0.1", &[origin.port()], ""),
        "workers = 3",
    ))
    .await;
    let status_url = format!("{}/status", relay.admin_url());
    let dom = chromium_dump(&status_url, None).await;
    assert!(dom.contains("Porthole relay"), "{dom}");
    assert!(
        dom.contains(r#"<span id="workers">3</span> connection workers"#),
        "{dom}"
    );
    let before = route_2xx(&dom, "app.test");

    let url = format!("http://app.test:{}/s", origin.port());
    assert_eq!(Curl::new(&url).proxy(&relay.url()).run().await.status, 200);
    let dom = chromium_dump(&status_url, None).await;
    assert_eq!(
        route_2xx(&dom, "app.test"),
        before + 1,
        "the route's counter did not move"
    );
    assert!(
        dom.contains(&relay.addr.to_string()),
        "the aggregate listener is not shown"
    );

    let shot = workspace_root().join("target/status-page.png");
    let _ = std::fs::create_dir_all(workspace_root().join("target"));
    chromium_dump(&status_url, Some(&shot)).await;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "not a real screenshot"
    );
}

/// `POST /reload` on the relay's admin listener.
async fn post_reload(relay: &RelayProcess) -> porthole_suite::CurlOutput {
    Curl::new(&format!("{}/reload", relay.admin_url()))
        .args(&["-X", "POST"])
        .run()
        .await
}

/// A fresh directory of this test process for configuration and log files.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("porthole-ops-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn refused_reload_shows_on_status_page_and_in_metrics() {
    let origin = Origin::ok().await;
    let dir = scratch_dir("reload");
    let path = dir.join("relay.toml");
    let good = config_with(&route("app.test", "127.0.0.1", &[origin.port()], ""), "");
    std::fs::write(&path, &good).unwrap();
    let relay = RelayProcess::spawn(&path, &[]).await;
    std::fs::write(&path, format!("{good}\n[limits]\nmax_headers = 0\n")).unwrap();
    let out = post_reload(&relay).await;
    assert_eq!(out.status, 422);
    let page = Curl::new(&format!("{}/status", relay.admin_url()))
        .run()
        .await
        .text();
    assert!(page.contains("refused"), "{page}");
    assert!(page.contains("limits.max_headers"), "{page}");
    let metrics = parse_metrics(
        &Curl::new(&format!("{}/metrics", relay.admin_url()))
            .run()
            .await
            .text(),
    );
    assert_eq!(
        value(
            &metrics,
            r#"porthole_config_reloads_total{result="refused"}"#
        ),
        1.0
    );
}

/// A reload applies what it can (a new route serves at once) and says which
/// changed settings wait for a restart: in its answer, in the log and on the
/// status page, not silently.
#[tokio::test]
async fn a_reload_names_the_changes_that_wait_for_a_restart() {
    let origin = Origin::ok().await;
    let dir = scratch_dir("later");
    let path = dir.join("relay.toml");
    let first = config_with(&route("app.test", "127.0.0.1", &[origin.port()], ""), "");
    std::fs::write(&path, &first).unwrap();
    let relay = RelayProcess::spawn(&path, &[]).await;
    // Nothing that needs a restart: a plain "reloaded".
    let out = post_reload(&relay).await;
    assert_eq!((out.status, out.text()), (200, "reloaded\n".to_string()));

    let second = config_with(
        &format!(
            "{}{}",
            route("app.test", "127.0.0.1", &[origin.port()], ""),
            route("new.test", "127.0.0.1", &[origin.port()], "")
        ),
        "[limits]\nmax_connections = 500\n[events]\nretain = 10\n",
    );
    std::fs::write(&path, &second).unwrap();
    let out = post_reload(&relay).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(
        out.text(),
        "reloaded; these changed settings take effect at the next restart: limits.max_connections, [events]\n"
    );
    let got = Curl::new(&format!("http://new.test:{}/x", origin.port()))
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!((got.status, got.text()), (200, "ok /x".to_string()));
    let page = Curl::new(&format!("{}/status", relay.admin_url()))
        .run()
        .await
        .text();
    assert!(
        page.contains("<code id=\"needs-restart\">limits.max_connections, [events]</code>"),
        "{page}"
    );
    let logged = porthole_suite::eventually(Duration::from_secs(5), || {
        let log = relay.log_text();
        async move { log.contains("changed settings take effect at the next restart") }
    })
    .await;
    assert!(logged, "{}", relay.log_text());
    // Against what runs, which is what the relay started with: the same
    // file again still waits; the first one again waits for nothing.
    let out = post_reload(&relay).await;
    assert!(
        out.text().ends_with("limits.max_connections, [events]\n"),
        "{out:?}"
    );
    std::fs::write(&path, &first).unwrap();
    let out = post_reload(&relay).await;
    assert_eq!((out.status, out.text()), (200, "reloaded\n".to_string()));
    let page = Curl::new(&format!("{}/status", relay.admin_url()))
        .run()
        .await
        .text();
    assert!(!page.contains("needs-restart"), "{page}");
}

#[tokio::test]
async fn access_log_file_is_reopened_on_sigusr1() {
    let origin = Origin::ok().await;
    let dir = scratch_dir("access");
    let log = dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    let path = dir.join("relay.toml");
    let text = config_with(
        &route("app.test", "127.0.0.1", &[origin.port()], ""),
        &format!("[log]\naccess = \"{}\"\n", log.display()),
    );
    std::fs::write(&path, text).unwrap();
    let relay = RelayProcess::spawn(&path, &[]).await;
    let url = |p: &str| format!("http://app.test:{}/{p}", origin.port());
    assert_eq!(
        Curl::new(&url("first"))
            .proxy(&relay.url())
            .run()
            .await
            .status,
        200
    );
    // The line is written as the request finishes, which can be just after curl has its answer.
    let written = |path: PathBuf, needle: &'static str| async move {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .contains(needle)
    };
    assert!(
        porthole_suite::eventually(Duration::from_secs(10), || written(log.clone(), "/first"))
            .await
    );
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    relay.signal("USR1");
    // The reopen is asynchronous: wait until the new file exists.
    for _ in 0..100 {
        if log.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        Curl::new(&url("second"))
            .proxy(&relay.url())
            .run()
            .await
            .status,
        200
    );
    assert!(
        porthole_suite::eventually(Duration::from_secs(10), || written(log.clone(), "/second"))
            .await
    );
    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(
        old.contains("target=\"http://app.test")
            && old.contains("/first\"")
            && old.contains("status=200"),
        "{old}"
    );
    assert!(!old.contains("/second"), "{old}");
    assert!(
        new.contains("/second\"") && new.contains("route=\"app.test\""),
        "{new}"
    );
    // The main log has caught up (its reopen line is there), and no access
    // line went to it.
    let caught_up = porthole_suite::eventually(Duration::from_secs(5), || {
        let log = relay.log_text();
        async move { log.contains("access log reopened") }
    })
    .await;
    assert!(caught_up, "{}", relay.log_text());
    assert!(
        !relay.log_text().contains("porthole::access"),
        "access lines leaked into the main log"
    );
}

#[test]
fn dockerfile_and_systemd_unit_agree_with_conf_and_readme() {
    let root = workspace_root();
    let docker = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let unit = std::fs::read_to_string(root.join("conf/porthole-relay.service")).unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();

    // The image builds locked, runs as a non-root user, copies the shipped config where it runs it.
    assert!(
        docker.contains("cargo build --release --locked"),
        "not a locked release build"
    );
    assert!(docker.contains("FROM debian:bookworm-slim"));
    assert!(docker.contains("COPY conf/relay.toml /etc/porthole/relay.toml"));
    assert!(root.join("conf/relay.toml").exists());
    assert!(docker.contains("USER porthole") && docker.contains("useradd --system"));
    assert!(
        docker.contains("EXPOSE 8080") && docker.contains("PORTHOLE__RELAY__LISTEN=0.0.0.0:8080")
    );
    assert!(docker.contains("HEALTHCHECK") && docker.contains("health"));
    assert!(docker.contains(
        r#"ENTRYPOINT ["/usr/local/bin/porthole-relay", "--config", "/etc/porthole/relay.toml"]"#
    ));
    // The runtime image has the CA roots that https routes, via_tls and
    // [uplink] tls verify against (audit M5: without them the container exited 64).
    assert!(
        docker.contains("apt-get install -y --no-install-recommends ca-certificates")
            && docker.contains("rm -rf /var/lib/apt/lists/*"),
        "the runtime image has no CA certificates"
    );
    // The unit runs the same binary with the same config, sandboxed; a
    // reload asks the relay and fails when it refuses the file, and a bad
    // configuration (exit 64) is not restarted in a loop (audit L3).
    let setting = |key: &str| -> Vec<&str> {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
            .collect()
    };
    assert_eq!(
        setting("ExecStart"),
        ["/usr/local/bin/porthole-relay --config /etc/porthole/relay.toml"]
    );
    assert_eq!(
        setting("ExecReload"),
        ["/usr/local/bin/porthole-relay --config /etc/porthole/relay.toml reload"]
    );
    assert_eq!(setting("RestartPreventExitStatus"), ["64"]);
    // Documentation= names the README where the install steps put it.
    assert_eq!(
        setting("Documentation"),
        ["file:/usr/share/doc/porthole/README.md"]
    );
    let doc_step = "install -D -m 644 README.md /usr/share/doc/porthole/README.md";
    assert!(unit.contains(doc_step) && readme.contains(doc_step));
    for line in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(line), "{line} missing");
    }
    assert!(
        unit.lines().any(|l| l.trim() == "CapabilityBoundingSet="),
        "capabilities not dropped"
    );
    // The README names the same paths and user.
    for needle in [
        "/etc/porthole/relay.toml",
        "USER porthole",
        "conf/porthole-relay.service",
        "docker build",
    ] {
        assert!(readme.contains(needle), "README does not mention {needle}");
    }
}

#[tokio::test]
async fn event_metrics_and_topics_follow_publishing_and_polling() {
    let relay = Relay::start(&config_with("", "")).await;
    let publish = |n: u32| {
        Curl::new(&format!("{}/events/plant-3", relay.admin_url())).args(&[
            "-X",
            "POST",
            "--data",
            &format!("{{\"n\":{n}}}"),
        ])
    };
    assert_eq!(publish(1).run().await.status, 201);
    assert_eq!(publish(2).run().await.status, 201);
    let out = Curl::new("http://relay.test/events/plant-3?after=0&wait=0")
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");

    // A long poll that waits shows in the gauge.
    let proxy = relay.url();
    let waiting = tokio::spawn(async move {
        Curl::new("http://relay.test/events/plant-3?after=2&wait=20")
            .proxy(&proxy)
            .run()
            .await
    });
    let polls = r#"porthole_open_long_polls"#;
    assert!(
        porthole_suite::eventually(Duration::from_secs(10), || async {
            value(&scrape(&relay).await, polls) == 1.0
        })
        .await,
        "the waiting poll is not counted"
    );
    assert_eq!(publish(3).run().await.status, 201);
    assert_eq!(waiting.await.unwrap().status, 200);

    let m = scrape(&relay).await;
    assert_eq!(
        value(&m, r#"porthole_events_published_total{topic="plant-3"}"#),
        3.0
    );
    assert_eq!(
        value(&m, r#"porthole_events_delivered_total{topic="plant-3"}"#),
        3.0
    );
    assert_eq!(value(&m, polls), 0.0);
    let page = Curl::new(&format!("{}/status", relay.admin_url()))
        .run()
        .await
        .text();
    assert!(
        page.contains("<tr><td>plant-3</td><td class=\"n\">3</td><td class=\"n\">0</td></tr>"),
        "{page}"
    );
}

/// One request to the admin listener, answered and closed: (status, head, body).
async fn admin_exchange(relay: &Relay, method: &str, path: &str) -> (u16, String, String) {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    porthole_suite::exchange(relay.admin, &request).await
}

/// The admin listener answers `HEAD` on every `GET` endpoint (the `GET`'s
/// status and fields, no body) and a wrong method on a known path with `405`
/// and `Allow` (RFC 9110 9.3.2, 15.5.6; the audit's M2: both were `404`);
/// unknown paths stay `404`.
#[tokio::test]
async fn admin_endpoints_answer_head_and_a_wrong_method_with_405_and_allow() {
    let relay = Relay::start(&config_with("", "")).await;
    for path in ["/healthz", "/readyz", "/metrics", "/status", "/events/t1"] {
        let (status, get, body) = admin_exchange(&relay, "GET", path).await;
        assert_eq!(status, 200, "GET {path}: {get}");
        let (status, head, rest) = admin_exchange(&relay, "HEAD", path).await;
        assert_eq!(status, 200, "HEAD {path}: {head}");
        assert_eq!(rest, "", "HEAD {path} sent a body");
        assert_eq!(
            head_field(&head, "content-type"),
            head_field(&get, "content-type"),
            "{path}"
        );
        let length: usize = head_field(&head, "content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("HEAD {path} without Content-Length: {head}"));
        if path == "/metrics" || path == "/status" {
            assert!(length > 0, "HEAD {path}: {head}");
        } else {
            assert_eq!(length, body.len(), "HEAD {path}: {head}");
        }
    }
    let wrong = [
        ("POST", "/healthz", "GET, HEAD"),
        ("POST", "/readyz", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
        ("DELETE", "/status", "GET, HEAD"),
        ("POST", "/status", "GET, HEAD"),
        ("GET", "/reload", "POST"),
        ("HEAD", "/reload", "POST"),
        ("PUT", "/events/t1", "GET, HEAD, POST"),
    ];
    for (method, path, allow) in wrong {
        let (status, head, _) = admin_exchange(&relay, method, path).await;
        assert_eq!(status, 405, "{method} {path}: {head}");
        assert_eq!(
            head_field(&head, "allow"),
            Some(allow),
            "{method} {path}: {head}"
        );
    }
    for method in ["GET", "HEAD", "POST", "DELETE"] {
        let (status, head, body) = admin_exchange(&relay, method, "/nothing").await;
        assert_eq!(status, 404, "{method} /nothing: {head}");
        assert_eq!(
            body.is_empty(),
            method == "HEAD",
            "{method} /nothing: {body}"
        );
    }
}

/// The admin listener had no head timeout (audit L4): a half-sent request
/// head held its connection forever. It now gets `limits.head_timeout`.
#[tokio::test]
async fn the_admin_listener_closes_a_half_sent_head_after_head_timeout() {
    let relay = Relay::start(&config_with("", "[limits]\nhead_timeout = \"1s\"\n")).await;
    let mut s = TcpStream::connect(relay.admin).await.unwrap();
    let sent = std::time::Instant::now();
    s.write_all(b"POST /reload HTTP/1.1\r\nHost: adm")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut answer)).await;
    let waited = sent.elapsed();
    assert!(
        read.is_ok(),
        "the half-sent head still held its connection after {waited:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed after {waited:?}, head_timeout is 1s"
    );
    // A whole request is answered as before.
    let (status, head, _) = admin_exchange(&relay, "GET", "/healthz").await;
    assert_eq!(status, 200, "{head}");
}

/// A web page could make a browser reload the relay or publish events on
/// the admin listener (audit L4: a cross-origin `text/plain` POST needs no
/// preflight; DNS rebinding makes it same-origin). Requests with `Origin`
/// are refused and change nothing; clients without it work as before.
#[tokio::test]
async fn admin_requests_from_web_pages_are_refused() {
    let relay = Relay::start(&config_with("", "")).await;
    let post = |path: &str, origin: Option<&str>| {
        let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        let body = r#"{"n":1}"#;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{origin}Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let admin = relay.admin;
        async move { porthole_suite::exchange(admin, &request).await }
    };
    let reloads = |m: &HashMap<String, f64>| {
        value(m, r#"porthole_config_reloads_total{result="ok"}"#)
            + value(m, r#"porthole_config_reloads_total{result="refused"}"#)
    };
    let poll = || async {
        Curl::new("http://relay.test/events/x?after=0&wait=0")
            .proxy(&relay.url())
            .run()
            .await
    };

    for origin in ["http://evil.example", "null"] {
        for path in ["/events/x", "/reload"] {
            let (status, head, body) = post(path, Some(origin)).await;
            assert_eq!(status, 403, "POST {path} from {origin}: {head}");
            assert!(
                body.contains("admin requests from web pages are refused"),
                "{body}"
            );
        }
    }
    let out = poll().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert!(out.text().contains(r#""events":[]"#), "{}", out.text());
    assert_eq!(reloads(&scrape(&relay).await), 0.0);

    let (status, head, body) = post("/events/x", None).await;
    assert_eq!((status, body.as_str()), (201, "{\"id\":1}\n"), "{head}");
    let (status, head, _) = post("/reload", None).await;
    assert_eq!(status, 200, "{head}");
    assert!(poll().await.text().contains(r#""data":{"n":1}"#));
    assert_eq!(reloads(&scrape(&relay).await), 1.0);
}
