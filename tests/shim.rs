//! The shim, driven by the real curl: both request forms through the system
//! proxy, CONNECT, forwarded ports, many tunnels over one relay connection,
//! a link failure healed without restarting anything, h2c on the relay
//! itself, the real `porthole-shim` binary with `conf/shim.toml`, the
//! link over TLS (a relay that requires it, a wrong CA, no ALPN `h2`), and
//! UDP forwards (CONNECT-UDP flows, refusals, added and removed at run time).
//! Every test starts its own relay, shim and internal servers on free ports.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use porthole_shim::{control, LinkState, RawConfig, Shim, ShimConfig};
use porthole_suite::{
    binary, config_with, connect_via, echo_round, free_port, response, route, wait_for_port,
    workspace_root, Curl, EchoServer, LinkProxy, Origin, Relay, RelayProcess, Reply,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// The certificate fixtures of the security tests (a CA made per test).
#[allow(dead_code)]
mod security_support;
use security_support::{Ca, Dir, TlsFront};

fn shim_config(relay: SocketAddr, extra: &str) -> ShimConfig {
    shim_config_text(&format!(
        "relay = \"{relay}\"\nrelay_name = \"relay.test\"\nlisten = \"127.0.0.1:0\"\n{extra}"
    ))
}

fn shim_config_text(text: &str) -> ShimConfig {
    RawConfig::from_toml(text).unwrap().validate().unwrap()
}

async fn start_shim(config: ShimConfig) -> Shim {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Shim::start(config, listener).await.unwrap()
}

/// A relay routing `host` to 127.0.0.1:`port` (`relay_extra` added to its
/// configuration) and a shim linked to it.
async fn relay_and_shim(host: &str, port: u16, relay_extra: &str) -> (Relay, Shim) {
    let relay = Relay::start(&config_with(
        &route(host, "127.0.0.1", &[port], ""),
        relay_extra,
    ))
    .await;
    let shim = start_shim(shim_config(relay.addr, "")).await;
    (relay, shim)
}

async fn wait_state(shim: &Shim, up: bool, limit: Duration) {
    let mut watch = shim.link.watch();
    tokio::time::timeout(limit, watch.wait_for(|s| s.is_up() == up))
        .await
        .unwrap_or_else(|_| panic!("link up={up} not reached within {limit:?}"))
        .unwrap();
}

#[tokio::test]
async fn relay_serves_h2c_prior_knowledge_and_its_pac_file() {
    let origin = Origin::ok().await;
    let relay = Relay::start(&config_with(
        &route("app-a.test", "127.0.0.1", &[origin.port()], ""),
        "",
    ))
    .await;
    let host = format!("app-a.test:{}", origin.port());
    let out = Curl::new(&format!("{}/h2?x=1", relay.url()))
        .args(&["--http2-prior-knowledge", "-H", &format!("Host: {host}")])
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert!(out.head.starts_with("HTTP/2 200"), "{}", out.head);
    assert_eq!(out.text(), "ok /h2?x=1");
    assert_eq!(out.header("via"), vec!["1.1 relay.test (porthole)"]);
    let got = origin.single();
    assert_eq!(got.target, "/h2?x=1");
    assert_eq!(got.header("host"), Some(host.as_str()));

    // Refusals are the HTTP/1 path's, unchanged.
    let out = Curl::new(&format!("{}/", relay.url()))
        .args(&["--http2-prior-knowledge", "-H", "Host: nowhere.test"])
        .run()
        .await;
    assert_eq!(out.status, 403, "{out:?}");

    // The PAC file, over HTTP/1 and HTTP/2: routes through the relay, the rest DIRECT.
    for h2 in [false, true] {
        let mut curl = Curl::new(&format!("{}/proxy.pac", relay.url()));
        if h2 {
            curl = curl.arg("--http2-prior-knowledge");
        }
        let out = curl.run().await;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(
            out.header("content-type"),
            vec!["application/x-ns-proxy-autoconfig"]
        );
        let pac = out.text();
        assert!(pac.contains(&format!("\"PROXY {}\"", relay.addr)), "{pac}");
        assert!(
            pac.contains("if (host == \"app-a.test\") return proxy;"),
            "{pac}"
        );
        assert!(pac.contains("return \"DIRECT\";"), "{pac}");
    }
}

#[tokio::test]
async fn proxy_form_and_origin_form_reach_the_server_as_the_application_wrote_them() {
    let origin = Origin::ok().await;
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "")
        + &route(
            "app-b.test",
            "127.0.0.1",
            &[origin.port()],
            "transparent = true",
        );
    let relay = Relay::start(&config_with(&routes, "")).await;
    let shim = start_shim(shim_config(relay.addr, "")).await;
    let shim_url = format!("http://{}", shim.addr);

    // Proxy form (HTTP_PROXY): the route adds Via; the shim's entry is there too.
    let a = format!("app-a.test:{}", origin.port());
    let out = Curl::new(&format!("http://{a}/x?q=1"))
        .proxy(&shim_url)
        .header("X-App: Kept  as is")
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /x?q=1");
    let got = &origin.received()[0];
    assert_eq!(got.target, "/x?q=1");
    assert_eq!(got.header("host"), Some(a.as_str()));
    assert_eq!(got.header("x-app"), Some("Kept  as is"));
    // One line: the relay appends its entry to the shim's.
    assert_eq!(
        got.all("via"),
        vec!["1.1 porthole-shim (porthole), 1.1 relay.test (porthole)"],
        "{}",
        got.raw_head
    );

    // Origin form with Host: target (an application pointed at the shim as if
    // it were the server), on a transparent route: the head arrives as written.
    let b = format!("app-b.test:{}", origin.port());
    let out = Curl::new(&format!("{shim_url}/y"))
        .header(&format!("Host: {b}"))
        .header("Via: 1.1 app-gw")
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    let got = &origin.received()[1];
    assert_eq!(got.target, "/y");
    assert_eq!(got.header("host"), Some(b.as_str()));
    assert_eq!(got.all("via"), vec!["1.1 app-gw"], "{}", got.raw_head);

    // The relay's refusal is passed on unchanged.
    let out = Curl::new("http://nowhere.test/")
        .proxy(&shim_url)
        .run()
        .await;
    assert_eq!(out.status, 403, "{out:?}");
    assert!(out.text().contains("nowhere.test"), "{}", out.text());

    // The PAC file from the shim points at the shim.
    let out = Curl::new(&format!("{shim_url}/proxy.pac")).run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert!(
        out.text().contains(&format!("\"PROXY {}\"", shim.addr)),
        "{}",
        out.text()
    );
    assert!(out.text().contains("app-b.test"), "{}", out.text());
    // One link for all of it: every request was a stream on the same connection.
    assert_eq!(origin.received().len(), 2);
}

#[tokio::test]
async fn bodies_stream_both_ways_through_the_shim() {
    let origin = Origin::start(|r| {
        if r.target == "/big" {
            return Reply::Generated { len: 8 << 20 };
        }
        let body = format!("got {} bytes", r.body.len());
        Reply::Raw(response(200, &[], body.as_bytes()))
    })
    .await;
    let (_relay, shim) = relay_and_shim("app-a.test", origin.port(), "").await;
    let proxy = format!("http://{}", shim.addr);
    let url = |p: &str| format!("http://app-a.test:{}{p}", origin.port());

    // Content-Length upload, then a chunked one of unknown length.
    let upload = vec![b'u'; 300_000];
    let out = Curl::new(&url("/up"))
        .proxy(&proxy)
        .args(&["--data-binary", "@-"])
        .stdin(upload.clone())
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "got 300000 bytes");
    let out = Curl::new(&url("/chunked"))
        .proxy(&proxy)
        .args(&["--data-binary", "@-", "-H", "Transfer-Encoding: chunked"])
        .stdin(upload.clone())
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "got 300000 bytes");
    let received = origin.received();
    assert_eq!(received[0].body, upload);
    assert_eq!(received[1].body, upload);

    // An 8 MiB download, more than the stream window.
    let out = Curl::new(&url("/big")).proxy(&proxy).run().await;
    assert_eq!(out.status, 200, "{}", out.stderr);
    assert_eq!(out.body.len(), 8 << 20);
}

/// The relay keeps the internal HTTP/1 legs of its HTTP/2 link alive between
/// streams; whatever ended the stream before (a chunked or fixed body, a
/// server that closed, a client that hung up mid-body, an upload, an idle
/// leg timed out), every answer reaches the request it belongs to.
#[tokio::test]
async fn streams_after_streams_on_one_link_each_get_their_own_answer() {
    let origin = Origin::start(|r| {
        let t = r.target.clone();
        let body = format!("answer to {t} ({} bytes in)", r.body.len());
        if t == "/big" {
            Reply::Generated { len: 4 << 20 }
        } else if t.starts_with("/chunked/") {
            let raw = format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            );
            Reply::Raw(raw.into_bytes())
        } else if t.starts_with("/nocontent/") {
            Reply::Raw(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec())
        } else if t.starts_with("/notmodified/") {
            Reply::Raw(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n".to_vec())
        } else if t.starts_with("/close/") {
            Reply::RawThenClose(response(200, &[("Connection", "close")], body.as_bytes()))
        } else {
            Reply::Raw(response(200, &[], body.as_bytes()))
        }
    })
    .await;
    // The relay closes idle legs and idle HTTP/2 connections after 1 s; the
    // shim's keepalive probes (streams) keep its link from being idle.
    let relay = Relay::start(&config_with(
        &route("app-a.test", "127.0.0.1", &[origin.port()], ""),
        "[limits]\nidle_timeout = \"1s\"",
    ))
    .await;
    let probing = "[keepalive]\nidle_ping = \"100ms\"\n";
    let shim = start_shim(shim_config(relay.addr, probing)).await;
    let proxy = format!("http://{}", shim.addr);
    let url = |p: &str| format!("http://app-a.test:{}{p}", origin.port());
    let fetch = |path: String| {
        let curl = Curl::new(&url(&path)).proxy(&proxy);
        async move {
            let out = curl.run().await;
            assert_eq!(out.status, 200, "{path}: {out:?}");
            assert_eq!(out.text(), format!("answer to {path} (0 bytes in)"));
        }
    };

    let kinds = ["fixed", "chunked", "close", "fixed", "fixed", "chunked"];
    fetch("/fixed/first".to_string()).await;
    let first_session = session(&shim);
    for (i, kind) in kinds.iter().cycle().take(12).enumerate() {
        fetch(format!("/{kind}/{i}")).await;
    }
    // Answers without a body (HEAD, 204, 304), each followed by one with a
    // body on the leg it leaves.
    for (i, (curl, status)) in [
        (Curl::new(&url("/fixed/head")).arg("-I"), 200),
        (Curl::new(&url("/nocontent/1")), 204),
        (Curl::new(&url("/notmodified/1")), 304),
    ]
    .into_iter()
    .enumerate()
    {
        let out = curl.proxy(&proxy).run().await;
        assert_eq!(out.status, status, "{out:?}");
        assert_eq!(out.size_download, 0, "{out:?}");
        fetch(format!("/fixed/after-empty-{i}")).await;
    }
    // Twenty at once, then more one by one on the legs they leave.
    let parallel: Vec<_> = (0..20)
        .map(|i| tokio::spawn(fetch(format!("/{}/p{i}", kinds[i % kinds.len()]))))
        .collect();
    for p in parallel {
        p.await.unwrap();
    }
    // An upload takes a leg of its own.
    let out = Curl::new(&url("/fixed/upload"))
        .proxy(&proxy)
        .args(&["--data-binary", "@-"])
        .stdin(vec![b'u'; 100_000])
        .run()
        .await;
    assert_eq!(out.text(), "answer to /fixed/upload (100000 bytes in)");
    // A client that hangs up mid-body: curl refuses the 4 MiB body at once.
    let out = Curl::new(&url("/big"))
        .proxy(&proxy)
        .args(&["--max-filesize", "1000"])
        .run()
        .await;
    assert_eq!(out.exit, 63, "curl's 'maximum file size exceeded': {out:?}");
    for (i, kind) in kinds.iter().enumerate() {
        fetch(format!("/{kind}/after-cut-{i}")).await;
    }
    // Idle legs outlive the relay's idle timeout (1 s) and are closed by it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (i, kind) in kinds.iter().enumerate() {
        fetch(format!("/{kind}/after-idle-{i}")).await;
    }
    let targets: Vec<String> = origin.received().into_iter().map(|r| r.target).collect();
    assert_eq!(
        targets.len(),
        1 + 12 + 6 + 20 + 1 + 1 + 6 + 6,
        "{targets:?}"
    );
    assert!(targets.contains(&"/chunked/after-idle-5".to_string()));
    assert_eq!(
        session(&shim),
        first_session,
        "all on one link to the relay"
    );
}

/// The link session the shim is on (numbered from 1 per connection).
fn session(shim: &Shim) -> u64 {
    match &*shim.link.watch().borrow() {
        LinkState::Up { session, .. } => *session,
        LinkState::Connecting { last_error } => panic!("link down: {last_error:?}"),
    }
}

/// A CONNECT stream is admitted, routed, refused and logged as an HTTP/1
/// CONNECT is: the relay answers it on the stream itself and tunnels the
/// stream's bytes to the server.
#[tokio::test]
async fn connect_streams_are_routed_refused_and_logged_like_http1_ones() {
    let echo = EchoServer::start().await;
    let closed = porthole_suite::free_port();
    let dir = std::env::temp_dir().join(format!("porthole-shim-access-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    let routes = route("echo.test", "127.0.0.1", &[echo.port()], "")
        + &route("dead.test", "127.0.0.1", &[closed], "");
    let relay = Relay::start(&config_with(
        &routes,
        &format!("[log]\naccess = \"{}\"\n", log.display()),
    ))
    .await;
    let shim = start_shim(shim_config(relay.addr, "")).await;
    let proxy = format!("http://{}", shim.addr);

    let (s, _) = connect_via(shim.addr, &format!("echo.test:{}", echo.port())).await;
    // The echo server says "bye" when the client half-closes.
    assert_eq!(echo_round(s, b"hello").await, b"hellobye\n");
    for (url, status) in [
        ("http://nowhere.test:80/".to_string(), "403"),
        (format!("http://dead.test:{closed}/"), "502"),
    ] {
        let out = Curl::new(&url).proxy(&proxy).arg("-p").run().await;
        assert_ne!(out.exit, 0, "{out:?}");
        assert!(
            out.stderr.contains(&format!("response {status}")),
            "{url}: {}",
            out.stderr
        );
    }
    let lines = || porthole_suite::lines_with(&log, "CONNECT");
    let all_three = || async { lines().len() == 3 };
    assert!(
        porthole_suite::eventually(Duration::from_secs(10), all_three).await,
        "{:?}",
        lines()
    );
    let lines = lines();
    let tunnel = lines
        .iter()
        .find(|l| l.contains("echo.test"))
        .expect("the tunnel's line");
    porthole_suite::assert_fields(
        tunnel,
        &[
            "status=200",
            "bytes_in=5",
            "bytes_out=9",
            "route=\"echo.test\"",
        ],
    );
    porthole_suite::assert_some_line(&lines, &["nowhere.test", "status=403"]);
    porthole_suite::assert_some_line(&lines, &["dead.test", "status=502"]);
}

/// Copied tunnels (here: an HTTP/2 stream to a TCP server) count one-byte
/// bursts as traffic: keystrokes every 300 ms keep a tunnel open past the
/// relay's 1 s idle timeout, and silence then closes it.
#[tokio::test]
async fn keystrokes_keep_a_tunnel_through_the_shim_open() {
    let echo = EchoServer::start().await;
    let idle_1s = "[limits]\nidle_timeout = \"1s\"";
    let (_relay, shim) = relay_and_shim("echo.test", echo.port(), idle_1s).await;
    let (mut s, _) = connect_via(shim.addr, &format!("echo.test:{}", echo.port())).await;
    let started = std::time::Instant::now();
    for key in b"abcdefgh" {
        s.write_all(&[*key]).await.unwrap();
        let mut back = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut back)).await;
        assert!(
            matches!(read, Ok(Ok(1))) && back[0] == *key,
            "key {} after {:?}: {read:?}",
            *key as char,
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(started.elapsed() > Duration::from_secs(2));
    // Silence: the relay ends the tunnel after its idle timeout.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the idle tunnel was not closed");
}

#[tokio::test]
async fn connect_through_the_shim_with_half_close() {
    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "")
        + &route("echo.test", "127.0.0.1", &[echo.port()], "");
    let relay = Relay::start(&config_with(&routes, "")).await;
    let shim = start_shim(shim_config(relay.addr, "")).await;

    // curl -p: HTTP inside a CONNECT tunnel through shim and relay.
    let out = Curl::new(&format!("http://app-a.test:{}/tunnelled", origin.port()))
        .proxy(&format!("http://{}", shim.addr))
        .arg("-p")
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /tunnelled");
    assert_eq!(origin.single().target, "/tunnelled");

    // Raw bytes both ways; the client's half-close reaches the server.
    let (s, _) = connect_via(shim.addr, &format!("echo.test:{}", echo.port())).await;
    assert_eq!(echo_round(s, b"ping").await, b"pingbye\n");
    assert_eq!(echo.half_closes(), 1);

    // A refused CONNECT is the relay's 403.
    let out = Curl::new("http://nowhere.test:443/")
        .proxy(&format!("http://{}", shim.addr))
        .arg("-p")
        .run()
        .await;
    assert!(out.head.contains(" 403"), "{out:?}");
}

#[tokio::test]
async fn relay_unreachable_is_a_502_with_the_reason() {
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let shim = start_shim(shim_config(closed, "link_wait = \"300ms\"\n")).await;
    let started = Instant::now();
    let out = Curl::new("http://app-a.test/")
        .proxy(&format!("http://{}", shim.addr))
        .run()
        .await;
    assert_eq!(out.status, 502, "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let text = out.text();
    assert!(
        text.contains(&format!("relay {closed} unreachable")),
        "{text}"
    );
    assert!(text.contains("cannot connect"), "{text}");
}

#[tokio::test]
async fn a_new_connection_waits_for_the_link_instead_of_failing() {
    let origin = Origin::ok().await;
    let relay_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // The shim starts first, while nothing listens at the relay's address.
    let shim = start_shim(shim_config(relay_addr, "link_wait = \"10s\"\n")).await;
    let url = format!("http://app-a.test:{}/late", origin.port());
    let early = tokio::spawn(
        Curl::new(&url)
            .proxy(&format!("http://{}", shim.addr))
            .run(),
    );
    // Let the request arrive and the first dials fail (the point of this test).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!shim.link.is_up());

    let text = config_with(&route("app-a.test", "127.0.0.1", &[origin.port()], ""), "");
    let config = porthole_relay::Config::from_toml(&text).unwrap();
    let listeners = porthole_relay::Listeners {
        aggregate: TcpListener::bind(relay_addr).await.unwrap(),
        admin: None,
        claim: None,
    };
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(porthole_relay::run(listeners, config, async {
        let _ = stopped.await;
    }));
    let out = early.await.unwrap();
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(origin.single().target, "/late");
}

#[tokio::test]
async fn forwarded_ports_are_added_used_listed_and_removed() {
    let echo = EchoServer::start().await;
    let relay = Relay::start(&config_with(
        &route("db.test", "127.0.0.1", &[echo.port()], ""),
        "",
    ))
    .await;
    let first = free_port();
    let extra = format!("forward = [\"{first}=db.test:{}\"]\n", echo.port());
    let shim = start_shim(shim_config(relay.addr, &extra)).await;
    let first: SocketAddr = format!("127.0.0.1:{first}").parse().unwrap();

    let s = TcpStream::connect(first).await.unwrap();
    assert_eq!(echo_round(s, b"from config").await, b"from configbye\n");

    // Added while running, through the control endpoint.
    let second = free_port();
    let spec = format!("127.0.0.1:{second}=db.test:{}", echo.port());
    let path = format!("{}forwards", control::PREFIX);
    let (status, body) = control::call(shim.addr, http::Method::POST, &path, spec.clone())
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let second: SocketAddr = format!("127.0.0.1:{second}").parse().unwrap();
    let s = TcpStream::connect(second).await.unwrap();
    assert_eq!(echo_round(s, b"added").await, b"addedbye\n");

    let (status, list) = control::call(shim.addr, http::Method::GET, &path, String::new())
        .await
        .unwrap();
    assert_eq!(status, 200);
    let mut got: Vec<&str> = list.lines().collect();
    got.sort();
    let first_spec = format!("{first}=db.test:{}", echo.port());
    let mut want = vec![first_spec.as_str(), spec.as_str()];
    want.sort();
    assert_eq!(got, want);

    // Removed: its listener is closed.
    let (status, _) = control::call(
        shim.addr,
        http::Method::DELETE,
        &format!("{path}/{second}"),
        String::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_refused(second).await;
    assert_eq!(shim.forwards.list().len(), 1);

    // Another method on a known endpoint: 405 saying which it takes.
    for (method, at, allow) in [
        (http::Method::PUT, path.clone(), "GET, POST"),
        (http::Method::GET, format!("{path}/{first}"), "DELETE"),
    ] {
        let (status, body) = control::call(shim.addr, method.clone(), &at, String::new())
            .await
            .unwrap();
        assert_eq!(status, 405, "{method} {at}: {body}");
        assert!(body.contains(allow), "{method} {at}: {body}");
    }
}

/// A web page is a local client too (the user's browser runs it): it must
/// not open forwards. `fetch(..., {mode: "no-cors"})` sends a simple POST,
/// with the page's `Origin`, no preflight and no header of its own choosing.
#[tokio::test]
async fn web_pages_cannot_use_the_control_endpoint() {
    let echo = EchoServer::start().await;
    let (_relay, shim) = relay_and_shim("db.test", echo.port(), "").await;
    let url = format!("http://{}{}forwards", shim.addr, control::PREFIX);
    for (listen, extra) in [
        // A page's simple POST: its Origin, a safelisted Content-Type.
        (
            free_port(),
            vec![
                "-H",
                "Origin: http://evil.example",
                "-H",
                "Content-Type: text/plain",
            ],
        ),
        // A form's POST.
        (
            free_port(),
            vec![
                "-H",
                "Origin: null",
                "-H",
                "Content-Type: application/x-www-form-urlencoded",
            ],
        ),
        // Neither: no Origin, but not porthole-shim either.
        (free_port(), vec![]),
        // The control header with a page's Origin.
        (
            free_port(),
            vec![
                "-H",
                "Origin: http://evil.example",
                "-H",
                "porthole-shim-control: 1",
            ],
        ),
    ] {
        let body = format!("0.0.0.0:{listen}=db.test:{}", echo.port());
        let out = Curl::new(&url)
            .args(&["-X", "POST", "--data", &body])
            .args(&extra)
            .run()
            .await;
        assert_eq!(out.status, 403, "{extra:?}: {out:?}");
        assert!(out.text().contains("not from web pages"), "{}", out.text());
        let opened = TcpStream::connect(("127.0.0.1", listen)).await;
        assert!(opened.is_err(), "{extra:?} opened a forward on {listen}");
    }
    assert!(shim.forwards.list().is_empty());
    // The status line may be read by hand; with a page's Origin it may not.
    let status = format!("http://{}{}status", shim.addr, control::PREFIX);
    assert_eq!(Curl::new(&status).run().await.status, 200);
    let page = Curl::new(&status)
        .args(&["-H", "Origin: http://evil.example"])
        .run()
        .await;
    assert_eq!(page.status, 403);
    // porthole-shim itself (control::call) still adds forwards.
    let listen = free_port();
    let spec = format!("127.0.0.1:{listen}=db.test:{}", echo.port());
    let path = format!("{}forwards", control::PREFIX);
    let (status, body) = control::call(shim.addr, http::Method::POST, &path, spec)
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
}

/// A client that shuts its write side once the request is sent (`printf |
/// nc -N`, health checks) gets its answer through the shim, as from the
/// relay (RFC 9112 section 9.6); the shim dropped it, though the request
/// went on and took effect.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let relay = Relay::start(&config_with(
        &(route("app.test", "127.0.0.1", &[origin.port()], "")
            + &route("db.test", "127.0.0.1", &[echo.port()], "")),
        "",
    ))
    .await;
    let shim = start_shim(shim_config(relay.addr, "")).await;
    let half_closed = |request: String| async move {
        let mut s = TcpStream::connect(shim.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    };
    let post = format!(
        "POST http://app.test:{}/hc HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n\r\nhello",
        origin.port()
    );
    let answer = half_closed(post).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(answer.ends_with("ok /hc"), "{answer:?}");
    let get = format!(
        "GET /hc10 HTTP/1.0\r\nHost: app.test:{}\r\n\r\n",
        origin.port()
    );
    let answer = half_closed(get).await;
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
        "{answer:?}"
    );
    // A CONNECT whose client has nothing to send: the answer, then the
    // server's side of the tunnel (the echo server's goodbye on our EOF).
    let connect = format!(
        "CONNECT db.test:{} HTTP/1.1\r\nHost: db.test\r\n\r\n",
        echo.port()
    );
    let answer = half_closed(connect).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// The listener closes promptly once its task is aborted.
async fn assert_refused(addr: SocketAddr) {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ if start.elapsed() > Duration::from_secs(3) => panic!("{addr} still accepts"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test]
async fn two_hundred_tunnels_share_one_relay_connection() {
    let echo = EchoServer::start().await;
    let relay = Relay::start(&config_with(
        &route("echo.test", "127.0.0.1", &[echo.port()], ""),
        "",
    ))
    .await;
    let counter = LinkProxy::start(relay.addr).await;
    let shim = start_shim(shim_config(counter.addr, "")).await;
    let target = format!("echo.test:{}", echo.port());

    // Open all 200 first, so they are concurrent, then use them.
    let mut open = Vec::new();
    for _ in 0..200 {
        let (addr, target) = (shim.addr, target.clone());
        open.push(tokio::spawn(
            async move { connect_via(addr, &target).await.0 },
        ));
    }
    let mut streams = Vec::new();
    for t in open {
        streams.push(t.await.unwrap());
    }
    let mut rounds = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        rounds.push(tokio::spawn(async move {
            let msg = format!("tunnel {i}");
            let back = echo_round(s, msg.as_bytes()).await;
            assert_eq!(back, format!("{msg}bye\n").into_bytes());
        }));
    }
    for r in rounds {
        r.await.unwrap();
    }
    assert_eq!(echo.half_closes(), 200);
    assert_eq!(counter.accepted(), 1, "the shim opened more than one link");
}

/// Tunnel bytes cross the link in 64 KiB copies and DATA frames up to the
/// link's raised SETTINGS_MAX_FRAME_SIZE: a transfer of several windows'
/// worth, both ways at once, arrives byte for byte.
#[tokio::test]
async fn a_large_tunnel_transfer_arrives_byte_exact_both_ways() {
    let echo = EchoServer::start().await;
    let (_relay, shim) = relay_and_shim("echo.test", echo.port(), "").await;
    let (s, _) = connect_via(shim.addr, &format!("echo.test:{}", echo.port())).await;
    let sent: Vec<u8> = (0..(9 << 20) + 123).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = s.into_split();
    let out = sent.clone();
    // Written while reading, in odd-sized pieces, so that neither side's
    // buffers have to hold the whole echo.
    let writer = tokio::spawn(async move {
        for piece in out.chunks(100_003) {
            wr.write_all(piece).await.unwrap();
        }
        wr.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut back))
        .await
        .expect("echo answered in time")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), sent.len() + 4);
    assert!(back[..sent.len()] == sent[..], "tunnel bytes differ");
    assert_eq!(&back[sent.len()..], b"bye\n");
}

#[tokio::test]
async fn a_dead_link_is_detected_and_healed_without_restarting_anything() {
    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "")
        + &route("db.test", "127.0.0.1", &[echo.port()], "");
    let relay = Relay::start(&config_with(&routes, "")).await;
    let cable = LinkProxy::start(relay.addr).await;
    let forward = free_port();
    let (gap, answer) = (Duration::from_millis(300), Duration::from_millis(700));
    let extra = format!(
        "forward = [\"{forward}=db.test:{}\"]\n[keepalive]\nidle_ping = \"30s\"\ngap_probe = \"300ms\"\nping_timeout = \"700ms\"\n",
        echo.port()
    );
    let shim = start_shim(shim_config(cable.addr, &extra)).await;
    let forward: SocketAddr = format!("127.0.0.1:{forward}").parse().unwrap();
    let proxy = format!("http://{}", shim.addr);
    let url = format!("http://app-a.test:{}/x", origin.port());

    let use_both = || async {
        let out = Curl::new(&url).proxy(&proxy).run().await;
        assert_eq!(out.status, 200, "{out:?}");
        let s = TcpStream::connect(forward).await.unwrap();
        assert_eq!(echo_round(s, b"hi").await, b"hibye\n");
    };
    use_both().await;
    assert_eq!(cable.accepted(), 1);
    wait_state(&shim, true, Duration::from_secs(1)).await;

    // The cable goes dead silently: no FIN, no RST, bytes just stop. An
    // application sends a request into it.
    cable.blackhole();
    let cut = Instant::now();
    let stuck = tokio::spawn(Curl::new(&url).proxy(&proxy).max_time(15).run());
    wait_state(&shim, false, Duration::from_secs(5)).await;
    let detected = cut.elapsed();
    assert!(
        detected <= gap + answer + Duration::from_millis(700),
        "detected after {detected:?}, allowed gap_probe + ping_timeout = {:?}",
        gap + answer
    );
    if let LinkState::Connecting { last_error } = &*shim.link.watch().borrow() {
        let why = last_error.clone().unwrap_or_default();
        assert!(why.contains("keepalive"), "{why}");
    }
    // The request caught on the dead link gets a 502 that says so.
    let out = stuck.await.unwrap();
    assert_eq!(out.status, 502, "{out:?}");
    assert!(out.text().contains("link to relay"), "{}", out.text());

    // It reconnects by itself; the same listeners work again.
    wait_state(&shim, true, Duration::from_secs(5)).await;
    use_both().await;
    assert_eq!(cable.accepted(), 2);
}

#[tokio::test]
async fn the_real_binary_runs_conf_shim_toml() {
    // conf/shim.toml is a valid example.
    let conf = workspace_root().join("conf/shim.toml");
    let config = RawConfig::load_file(conf.to_str().unwrap())
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:3128");
    assert_eq!(config.relay_name, "relay.corp.example");

    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let udp_echo = porthole_suite::UdpEcho::start().await;
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "")
        + &route(
            "localhost",
            "127.0.0.1",
            &[echo.port(), udp_echo.port()],
            "udp = true",
        );
    let text = config_with(&routes, "").replace("relay.test", "relay.corp.example");
    let relay = Relay::start(&text).await;

    // The example's ports are fixed: the same file with its forward moved to
    // a free port, and the relay and listen addresses from the command line.
    let fixed_forward = free_port();
    let dir = std::env::temp_dir().join(format!(
        "porthole-shim-{}-{fixed_forward}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let example = std::fs::read_to_string(&conf).unwrap();
    let copy = dir.join("shim.toml");
    std::fs::write(
        &copy,
        example.replace(":15432=", &format!(":{fixed_forward}=")),
    )
    .unwrap();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let shim_bin = binary("porthole-shim");
    let log = std::fs::File::create(dir.join("shim.log")).unwrap();
    let _child = tokio::process::Command::new(&shim_bin)
        .arg("--config")
        .arg(&copy)
        .args([
            "--relay",
            &relay.addr.to_string(),
            "--listen",
            &listen.to_string(),
            "--forward-udp",
            &format!("127.0.0.1:0=localhost:{}", udp_echo.port()),
        ])
        .env("RUST_LOG", "info")
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_port(listen, Duration::from_secs(10)).await;

    let out = Curl::new(&format!("http://app-a.test:{}/bin", origin.port()))
        .proxy(&format!("http://{listen}"))
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    let out = Curl::new(&format!("http://{listen}/proxy.pac")).run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert!(
        out.text().contains(&format!("\"PROXY {listen}\"")),
        "{}",
        out.text()
    );

    // forward add | list | remove, as a user types them.
    let cli = |args: Vec<String>| {
        let bin = shim_bin.clone();
        async move {
            let out = tokio::process::Command::new(bin)
                .args(["--listen", &listen.to_string()])
                .args(&args)
                .output()
                .await
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            (out.status.success(), format!("{stdout}{stderr}"))
        }
    };
    let port = free_port();
    let spec = format!("127.0.0.1:{port}=localhost:{}", echo.port());
    let (ok, out) = cli(vec!["forward".into(), "add".into(), spec.clone()]).await;
    assert!(ok, "{out}");
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(echo_round(s, b"bin").await, b"binbye\n");
    let (ok, list) = cli(vec!["forward".into(), "list".into()]).await;
    assert!(ok);
    assert!(list.contains(&spec), "{list}");
    let from_file = format!("127.0.0.1:{fixed_forward}=localhost:8000");
    assert!(list.contains(&from_file), "{list}");
    let (ok, out) = cli(vec!["forward".into(), "remove".into(), port.to_string()]).await;
    assert!(ok, "{out}");
    assert_refused(format!("127.0.0.1:{port}").parse().unwrap()).await;

    // A forward the relay refuses (a port the route does not offer): the
    // local connection closes, and the shim logs the relay's reason.
    let refused_port = free_port();
    let offered_not = origin.port();
    let spec = format!("127.0.0.1:{refused_port}=localhost:{offered_not}");
    let (ok, out) = cli(vec!["forward".into(), "add".into(), spec]).await;
    assert!(ok, "{out}");
    let mut s = TcpStream::connect(("127.0.0.1", refused_port))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{rest:?}");
    let shim_log = || std::fs::read_to_string(dir.join("shim.log")).unwrap_or_default();
    let reason = format!("port {offered_not} is not allowed");
    let logged = porthole_suite::eventually(Duration::from_secs(5), || {
        let log = shim_log();
        let reason = reason.clone();
        async move { log.contains("the relay refused the tunnel") && log.contains(&reason) }
    })
    .await;
    assert!(logged, "{}", shim_log());

    // --forward-udp: listed as `udp LISTEN=HOST:PORT`, and carrying datagrams.
    let udp_line = list
        .lines()
        .find_map(|l| l.strip_prefix("udp "))
        .unwrap_or_else(|| panic!("no UDP forward listed: {list}"));
    let (udp_listen, target) = udp_line.split_once('=').unwrap();
    assert_eq!(target, format!("localhost:{}", udp_echo.port()));
    let s = udp_client(udp_listen.parse().unwrap()).await;
    s.send(b"bin udp").await.unwrap();
    assert_eq!(
        udp_recv(&s, Duration::from_secs(5)).await.as_deref(),
        Some("echo:bin udp")
    );

    // forward add|remove --udp, as a user types them.
    let add_udp = |listen: String| {
        let spec = format!("{listen}=localhost:{}", udp_echo.port());
        cli(vec!["forward".into(), "add".into(), "--udp".into(), spec])
    };
    let (ok, out) = add_udp("127.0.0.1:0".into()).await;
    assert!(ok, "{out}");
    let added = out
        .trim()
        .strip_prefix("udp ")
        .unwrap_or_else(|| panic!("{out}"));
    let (added_listen, _) = added.split_once('=').unwrap();
    let added_listen: SocketAddr = added_listen.parse().unwrap();
    let s = udp_client(added_listen).await;
    s.send(b"added udp").await.unwrap();
    assert_eq!(
        udp_recv(&s, Duration::from_secs(5)).await.as_deref(),
        Some("echo:added udp")
    );
    let (ok, list) = cli(vec!["forward".into(), "list".into()]).await;
    assert!(ok);
    assert!(list.contains(out.trim()), "{list}");
    let remove = vec![
        "forward".into(),
        "remove".into(),
        "--udp".into(),
        added_listen.port().to_string(),
    ];
    let (ok, out) = cli(remove.clone()).await;
    assert!(ok, "{out}");
    assert_eq!(out.trim(), format!("removed udp {added_listen}"));
    assert_udp_free(added_listen).await;
    let (ok, out) = cli(remove).await;
    assert!(!ok);
    assert!(
        out.contains(&format!("no UDP forward on {added_listen}")),
        "{out}"
    );
    // The forward from --forward-udp is still there.
    let (ok, list) = cli(vec!["forward".into(), "list".into()]).await;
    assert!(ok);
    assert!(list.contains(&format!("udp {udp_line}")), "{list}");
    assert!(!list.contains(&added_listen.to_string()), "{list}");
    // A local address in use is refused with the reason.
    let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let (ok, out) = add_udp(taken.to_string()).await;
    assert!(!ok);
    assert!(out.contains(&format!("cannot bind UDP {taken}")), "{out}");

    // env prints the four proxy variables pointing at the shim.
    let (ok, env) = cli(vec!["env".into()]).await;
    assert!(ok);
    let url = format!("http://{listen}");
    for var in ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"] {
        assert!(env.contains(&format!("{var}={url}")), "{env}");
    }
}

/// Reads an HTTP/1 response head (through the blank line) from `s`.
async fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.unwrap();
        assert!(
            n > 0,
            "closed before the end of the head: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.push(byte[0]);
    }
    String::from_utf8(got).unwrap()
}

/// A WebSocket upgrade in proxy form through the shim (curl cannot speak
/// WebSocket, so the application is a raw socket). It crosses the link as an
/// extended CONNECT (RFC 8441): the server gets a GET with `Upgrade` and the
/// application's own key, the application gets `101` with the server's
/// accept, and frames echo both ways. An upgrade to an unrouted host gets the
/// relay's `403`, and the shim keeps serving.
#[tokio::test]
async fn websocket_through_the_shim() {
    let origin = Origin::start(|r| {
        if r.target == "/old" {
            Reply::Raw(response(426, &[("Upgrade", "websocket")], b"too old"))
        } else {
            Reply::UpgradeEcho
        }
    })
    .await;
    let (_relay, shim) = relay_and_shim("ws.test", origin.port(), "").await;
    wait_state(&shim, true, Duration::from_secs(5)).await;
    let upgrade_at = |authority: &str, path: &str| {
        format!(
            "GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
        )
    };
    let upgrade = |authority: &str| upgrade_at(authority, "/chat");
    let authority = format!("ws.test:{}", origin.port());
    let mut s = TcpStream::connect(shim.addr).await.unwrap();
    s.write_all(upgrade(&authority).as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    let lower = head.to_ascii_lowercase();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(lower.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(lower.contains("\r\nconnection: upgrade\r\n"), "{head}");
    // RFC 6455 1.3's accept for the application's key, from the server.
    assert!(
        head.contains("\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "the server's accept for the application's key: {head}"
    );
    assert!(
        lower.contains("\r\nsec-websocket-protocol: chat\r\n"),
        "{head}"
    );
    for word in [&b"hi"[..], b"again"] {
        let mut frame = vec![0x81u8, 0x80 | word.len() as u8, 1, 2, 3, 4];
        frame.extend(word.iter().enumerate().map(|(i, b)| b ^ (i as u8 % 4 + 1)));
        s.write_all(&frame).await.unwrap();
        let mut echoed = vec![0u8; frame.len()];
        s.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, frame);
    }
    let seen = origin.received().remove(0);
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("GET", "/chat")
    );
    assert_eq!(seen.header("host"), Some(authority.as_str()));
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(seen.header("connection"), Some("upgrade"));
    assert_eq!(
        seen.header("sec-websocket-key"),
        Some("dGhlIHNhbXBsZSBub25jZQ==")
    );
    assert_eq!(seen.header("sec-websocket-protocol"), Some("chat"));
    assert!(
        seen.header("via")
            .is_some_and(|v| v.contains("porthole-shim")),
        "{:?}",
        seen.header("via")
    );

    let mut refused = TcpStream::connect(shim.addr).await.unwrap();
    refused
        .write_all(upgrade("nowhere.test:80").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut refused).await;
    assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
    // A server that declines the upgrade: its answer, body and all.
    let mut declined = TcpStream::connect(shim.addr).await.unwrap();
    declined
        .write_all(upgrade_at(&authority, "/old").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut declined).await;
    assert!(head.starts_with("HTTP/1.1 426 "), "{head}");
    let mut body = [0u8; 7];
    declined.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"too old");
    assert_eq!(origin.received().len(), 2);
    // Origin form: an application pointed at the shim as if it were the server.
    let mut direct = TcpStream::connect(shim.addr).await.unwrap();
    let origin_form =
        upgrade_at(&authority, "/chat").replacen(&format!("http://{authority}"), "", 1);
    direct.write_all(origin_form.as_bytes()).await.unwrap();
    let head = read_head(&mut direct).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    direct.write_all(&[0x81, 0x80, 7, 7, 7, 7]).await.unwrap();
    let mut echoed = [0u8; 6];
    direct.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, [0x81, 0x80, 7, 7, 7, 7]);
    assert_eq!(origin.received()[2].target, "/chat");
    // The first tunnel still echoes.
    s.write_all(&[0x81, 0x80, 9, 9, 9, 9]).await.unwrap();
    let mut echoed = [0u8; 6];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(echoed, [0x81, 0x80, 9, 9, 9, 9]);
}

/// A relay that drains (SIGTERM) lets open streams finish, through the shim
/// too: its GOAWAY stops new streams on the link, but a tunnel open on it
/// keeps carrying bytes until it ends, while new requests go to the relay's
/// successor on the same address over a new link session. Before, the first
/// new request made the shim drop the link, and the tunnel with it.
#[tokio::test]
async fn a_drain_keeps_the_shims_open_tunnels_while_a_successor_takes_new_requests() {
    let echo = EchoServer::start().await;
    let origin = Origin::ok().await;
    let routes = format!(
        "{}{}",
        route("echo.test", "127.0.0.1", &[echo.port()], ""),
        route("app.test", "127.0.0.1", &[origin.port()], "")
    );
    // A drain long enough for the steps below on a loaded machine.
    let config =
        config_with(&routes, "").replace("drain_timeout = \"5s\"", "drain_timeout = \"60s\"");
    assert!(config.contains("drain_timeout = \"60s\""), "{config}");
    let relay = Relay::start(&config).await;
    let addr = relay.addr;
    let shim = start_shim(shim_config(addr, "")).await;
    wait_state(&shim, true, Duration::from_secs(5)).await;
    let (mut tunnel, _) = connect_via(shim.addr, &format!("echo.test:{}", echo.port())).await;
    let mut back = [0u8; 5];
    tunnel.write_all(b"first").await.unwrap();
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"first");

    // Drain: GOAWAY on the link; the relay waits up to drain_timeout for
    // the tunnel. Its successor takes the address.
    let drained = tokio::spawn(relay.shutdown());
    let _successor = Relay::start_at(&config_with(&routes, ""), addr).await;
    let app = format!("http://app.test:{}/", origin.port());
    for word in [b"after", b"again", b"third"] {
        let out = Curl::new(&app)
            .proxy(&format!("http://{}", shim.addr))
            .args(&["-m", "4"])
            .run()
            .await;
        assert_eq!(
            (out.status, out.text()),
            (200, "ok /".to_string()),
            "{out:?}"
        );
        tunnel.write_all(word).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(3), tunnel.read_exact(&mut back)).await;
        assert!(
            matches!(read, Ok(Ok(5))),
            "the tunnel during the drain: {read:?}"
        );
        assert_eq!(&back, word);
    }
    assert!(!drained.is_finished(), "the relay waited for the tunnel");
    drop(tunnel);
    tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .expect("the relay stopped once the tunnel ended")
        .unwrap();
    assert_eq!(origin.received().len(), 3);
}

/// A relay that does not take extended CONNECT (one older than the shim,
/// here a bare HTTP/2 server that answers every request `404`): an upgrade
/// through the shim gets a `502` that says so, not "link lost", and the link
/// stays up for everything else.
#[tokio::test]
async fn an_upgrade_through_a_relay_without_extended_connect_says_why() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let old = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let old_addr = old.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = old.accept().await {
            let service = hyper::service::service_fn(|_req| async {
                let mut resp = http::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"no"),
                ));
                *resp.status_mut() = http::StatusCode::NOT_FOUND;
                Ok::<_, std::convert::Infallible>(resp)
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    let shim = start_shim(shim_config(old_addr, "")).await;
    wait_state(&shim, true, Duration::from_secs(5)).await;
    let mut s = TcpStream::connect(shim.addr).await.unwrap();
    s.write_all(b"GET http://ws.test/chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    let mut body = vec![0u8; 512];
    let n = s.read(&mut body).await.unwrap();
    let body = String::from_utf8_lossy(&body[..n]);
    assert!(body.contains("refused the stream"), "{body}");
    assert!(body.contains("RFC 8441"), "{body}");
    assert!(shim.link.is_up(), "the link is fine");
}

/// What a hand-made HTTP/2 "relay" does with the first request after the
/// shim's probe on its first connection (RFC 9113 8.7: both say the request
/// was not processed).
#[derive(Clone, Copy, PartialEq)]
enum NotProcessed {
    /// `RST_STREAM` with `REFUSED_STREAM`; so is every request with a body.
    Refuse,
    /// A graceful `GOAWAY` whose last stream id is the probe's.
    GoAway,
}

/// A relay that speaks just enough HTTP/2 by hand to control its stream ids:
/// it answers every request `200` with no body, except as `mode` says.
/// Returns its address and the (connection, stream id) of each request's
/// HEADERS, in arrival order.
async fn unprocessing_relay(
    mode: NotProcessed,
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<(u32, u32)>>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
            let len = (payload.len() as u32).to_be_bytes();
            let mut f = vec![len[1], len[2], len[3], kind, flags];
            f.extend_from_slice(&stream.to_be_bytes());
            f.extend_from_slice(payload);
            f
        };
        let mut bodyless_refused = false;
        for conn in 0u32.. {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut preface = [0u8; 24];
            if s.read_exact(&mut preface).await.is_err() {
                continue;
            }
            s.write_all(&frame(4, 0, 0, &[])).await.unwrap(); // SETTINGS
            let mut probe_answered = false;
            let mut last = 0u32;
            loop {
                let mut h = [0u8; 9];
                if s.read_exact(&mut h).await.is_err() {
                    break;
                }
                let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                let (kind, flags) = (h[3], h[4]);
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                let mut payload = vec![0u8; len];
                if s.read_exact(&mut payload).await.is_err() {
                    break;
                }
                let reply = match kind {
                    4 if flags & 1 == 0 => frame(4, 1, 0, &[]), // SETTINGS ack
                    1 => {
                        log.lock().unwrap().push((conn, stream));
                        let has_body = flags & 1 == 0;
                        let first_request = conn == 0 && probe_answered;
                        probe_answered = true;
                        match mode {
                            NotProcessed::Refuse
                                if first_request && (has_body || !bodyless_refused) =>
                            {
                                bodyless_refused |= !has_body;
                                frame(3, 0, stream, &7u32.to_be_bytes())
                            }
                            NotProcessed::GoAway if first_request && last < stream => {
                                let mut p = last.to_be_bytes().to_vec();
                                p.extend_from_slice(&0u32.to_be_bytes());
                                frame(7, 0, 0, &p)
                            }
                            // `:status: 200` (static table index 8), END_STREAM | END_HEADERS.
                            _ => {
                                last = stream;
                                frame(1, 5, stream, &[0x88])
                            }
                        }
                    }
                    _ => continue,
                };
                if s.write_all(&reply).await.is_err() {
                    break;
                }
            }
        }
    });
    (addr, seen)
}

/// A request the relay did not process (a `REFUSED_STREAM` reset, or a
/// `GOAWAY` below its stream, as a relay that begins to drain sends) goes
/// once more, on the same connection or on the next session, if it has no
/// body; one with a body gets a `502` that says the relay refused it, and is
/// not sent twice.
#[tokio::test]
async fn requests_the_relay_did_not_process_are_sent_again() {
    let quiet = "[keepalive]\nidle_ping = \"60s\"\ngap_probe = \"60s\"\n";

    let (addr, seen) = unprocessing_relay(NotProcessed::Refuse).await;
    let shim = start_shim(shim_config(addr, quiet)).await;
    wait_state(&shim, true, Duration::from_secs(5)).await;
    let proxy = format!("http://{}", shim.addr);
    let posted = Curl::new("http://app.test/form")
        .proxy(&proxy)
        .args(&["--data-binary", "x=1"])
        .run()
        .await;
    assert_eq!(posted.status, 502, "{posted:?}");
    assert!(
        posted.text().contains("refused the stream"),
        "{}",
        posted.text()
    );
    assert_eq!(
        *seen.lock().unwrap(),
        [(0, 1), (0, 3)],
        "the POST went once"
    );
    let got = Curl::new("http://app.test/page").proxy(&proxy).run().await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(
        *seen.lock().unwrap(),
        [(0, 1), (0, 3), (0, 5), (0, 7)],
        "the GET was refused once and went again on the same connection"
    );
    assert!(shim.link.is_up());

    let (addr, seen) = unprocessing_relay(NotProcessed::GoAway).await;
    let shim = start_shim(shim_config(addr, quiet)).await;
    wait_state(&shim, true, Duration::from_secs(5)).await;
    let proxy = format!("http://{}", shim.addr);
    let got = Curl::new("http://app.test/page").proxy(&proxy).run().await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(
        *seen.lock().unwrap(),
        [(0, 1), (0, 3), (1, 1), (1, 3)],
        "the GET came again on the next connection, after its probe"
    );
}

// ---------------------------------------------------------------- TLS link

/// A relay that requires TLS, with a certificate from `ca` for 127.0.0.1,
/// routing `app-a.test` to `origin` and `echo.test` to `echo`.
async fn tls_relay(dir: &Dir, ca: &Ca, origin: &Origin, echo: &EchoServer) -> Relay {
    let leaf = ca.server(&["127.0.0.1", "localhost"]);
    let cert = dir.write("relay.pem", &leaf.cert);
    let key = dir.write("relay.key", &leaf.key);
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "")
        + &route("echo.test", "127.0.0.1", &[echo.port()], "");
    let tls = format!("[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nrequire = true\n");
    Relay::start(&config_with(&routes, &tls)).await
}

/// A relay that requires client certificates (`client_auth = "required"`)
/// takes the shim's link when the shim presents one (`cert`, `key`); the
/// certificate's name is the user its rules see. Without one, the handshake
/// fails and the link stays down, saying why.
#[tokio::test]
async fn the_shim_presents_a_client_certificate_to_a_relay_that_requires_one() {
    let (dir, ca, clients) = (Dir::new(), Ca::new("relay ca"), Ca::new("client ca"));
    let ca_file = dir.write("ca.pem", &ca.pem());
    let origin = Origin::ok().await;
    let leaf = ca.server(&["127.0.0.1"]);
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nrequire = true\nclient_ca = \"{}\"\nclient_auth = \"required\"\n",
        dir.write("relay.pem", &leaf.cert),
        dir.write("relay.key", &leaf.key),
        dir.write("client-ca.pem", &clients.pem()),
    );
    // Only the certificate user `laptop-7` may use the route.
    let rules = "[[rule]]\nusers = [\"laptop-7\"]\nallow = true\n";
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "");
    let relay = Relay::start(&config_with(&routes, &format!("{tls}{rules}"))).await;
    let laptop = clients.client("laptop-7");
    let identity = format!(
        "cert = \"{}\"\nkey = \"{}\"\n",
        dir.write("laptop.pem", &laptop.cert),
        dir.write("laptop.key", &laptop.key)
    );
    let shim = start_shim(shim_config(
        relay.addr,
        &format!("tls = true\nca = \"{ca_file}\"\n{identity}"),
    ))
    .await;
    wait_state(&shim, true, Duration::from_secs(10)).await;
    let url = format!("http://app-a.test:{}/with-cert", origin.port());
    let out = Curl::new(&url)
        .proxy(&format!("http://{}", shim.addr))
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /with-cert");

    let anonymous = start_shim(shim_config(
        relay.addr,
        &format!("tls = true\nca = \"{ca_file}\"\nlink_wait = \"2s\"\n"),
    ))
    .await;
    let out = Curl::new(&url)
        .proxy(&format!("http://{}", anonymous.addr))
        .run()
        .await;
    assert_eq!(out.status, 502, "{out:?}");
    assert!(out.text().contains("unreachable"), "{}", out.text());
    assert!(!anonymous.link.watch().borrow().is_up());
}

#[tokio::test]
async fn the_link_runs_over_tls_to_a_relay_that_requires_it() {
    let (dir, ca) = (Dir::new(), Ca::new("relay ca"));
    let ca_file = dir.write("ca.pem", &ca.pem());
    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let relay = tls_relay(&dir, &ca, &origin, &echo).await;
    let shim = start_shim(shim_config(
        relay.addr,
        &format!("tls = true\nca = \"{ca_file}\"\n"),
    ))
    .await;
    wait_state(&shim, true, Duration::from_secs(10)).await;

    // A request in proxy form, and HTTP inside a CONNECT tunnel.
    let proxy = format!("http://{}", shim.addr);
    let out = Curl::new(&format!("http://app-a.test:{}/over-tls", origin.port()))
        .proxy(&proxy)
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /over-tls");
    let out = Curl::new(&format!("http://app-a.test:{}/tunnelled", origin.port()))
        .proxy(&proxy)
        .arg("-p")
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /tunnelled");
    // Raw bytes both ways through a CONNECT stream, half-close included.
    let (s, _) = connect_via(shim.addr, &format!("echo.test:{}", echo.port())).await;
    assert_eq!(echo_round(s, b"ping").await, b"pingbye\n");

    // The `https://` form of `relay` is the same link, through a reconnect:
    // the relay restarts on its address and the shim links again.
    let shim2 = start_shim(shim_config_text(&format!(
        "relay = \"https://{}\"\nrelay_name = \"relay.test\"\nlisten = \"127.0.0.1:0\"\nca = \"{ca_file}\"\n",
        relay.addr
    )))
    .await;
    wait_state(&shim2, true, Duration::from_secs(10)).await;
    let addr = relay.addr;
    relay.shutdown().await;
    wait_state(&shim2, false, Duration::from_secs(10)).await;
    let leaf = ca.server(&["127.0.0.1"]);
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "");
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nrequire = true\n",
        dir.write("relay2.pem", &leaf.cert),
        dir.write("relay2.key", &leaf.key)
    );
    let _relay = Relay::start_at(&config_with(&routes, &tls), addr).await;
    let out = Curl::new(&format!("http://app-a.test:{}/again", origin.port()))
        .proxy(&format!("http://{}", shim2.addr))
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /again");
}

/// A browser that cannot fetch its PAC file goes DIRECT for everything: while
/// the link is down the shim serves the relay's last PAC file; with none
/// fetched yet, a 502 that says why.
#[tokio::test]
async fn the_last_pac_file_is_served_while_the_link_is_down() {
    let relay = Relay::start(&config_with(
        &route("app-a.test", "127.0.0.1", &[80], ""),
        "",
    ))
    .await;
    let shim = start_shim(shim_config(relay.addr, "link_wait = \"1s\"\n")).await;
    let pac_url = format!("http://{}/proxy.pac", shim.addr);
    let first = Curl::new(&pac_url).run().await;
    assert_eq!(first.status, 200, "{first:?}");
    assert!(first.text().contains("app-a.test"), "{}", first.text());
    relay.shutdown().await;
    wait_state(&shim, false, Duration::from_secs(10)).await;
    let cached = Curl::new(&pac_url).run().await;
    assert_eq!(cached.status, 200, "{cached:?}");
    assert_eq!(cached.text(), first.text());

    // A shim that never reached its relay has nothing to serve.
    let nowhere: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let lonely = start_shim(shim_config(nowhere, "link_wait = \"1s\"\n")).await;
    let out = Curl::new(&format!("http://{}/proxy.pac", lonely.addr))
        .run()
        .await;
    assert_eq!(out.status, 502, "{out:?}");
    assert!(out.text().contains("unreachable"), "{}", out.text());
}

/// After a long outage the link's backoff has grown (0.1 s doubling to
/// 10 s): a request that finds the link down makes the shim try again within
/// a second instead of waiting the backoff out, so the relay's return is
/// noticed while the request still waits (`link_wait`).
#[tokio::test]
async fn a_waiting_request_cuts_the_links_backoff_short() {
    let origin = Origin::ok().await;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let shim = start_shim(shim_config_text(&format!(
        "relay = \"{addr}\"\nrelay_name = \"relay.test\"\nlisten = \"127.0.0.1:0\"\nlink_wait = \"3s\"\n"
    )))
    .await;
    // The outage itself: nothing listens for 7 s. The link fails at once
    // each time, at 0, 0.1, 0.3, 0.7, 1.5, 3.1 and 6.3 s; its next try
    // would be at 12.7 s, after this request's 3 s of link_wait.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(!shim.link.watch().borrow().is_up());
    let _relay = Relay::start_at(
        &config_with(&route("app-a.test", "127.0.0.1", &[origin.port()], ""), ""),
        addr,
    )
    .await;
    let out = Curl::new(&format!("http://app-a.test:{}/back", origin.port()))
        .proxy(&format!("http://{}", shim.addr))
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /back");
}

/// The reason the link's first session failed.
async fn link_error(shim: &Shim) -> String {
    let mut watch = shim.link.watch();
    let failed = tokio::time::timeout(
        Duration::from_secs(10),
        watch.wait_for(|s| {
            matches!(
                s,
                LinkState::Connecting {
                    last_error: Some(_)
                }
            )
        }),
    )
    .await
    .expect("no link error within 10 s")
    .unwrap()
    .clone();
    match failed {
        LinkState::Connecting {
            last_error: Some(why),
        } => why,
        _ => unreachable!("waited for an error"),
    }
}

#[tokio::test]
async fn a_relay_certificate_from_another_ca_keeps_the_link_down_and_says_why() {
    let (dir, ca) = (Dir::new(), Ca::new("relay ca"));
    let other = dir.write("other-ca.pem", &Ca::new("another ca").pem());
    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let relay = tls_relay(&dir, &ca, &origin, &echo).await;
    let shim = start_shim(shim_config(
        relay.addr,
        &format!("tls = true\nca = \"{other}\"\nlink_wait = \"300ms\"\n"),
    ))
    .await;

    // The link never comes up; its state names the certificate problem.
    let why = link_error(&shim).await;
    assert!(
        why.contains(&format!("TLS with {} failed", relay.addr)),
        "{why}"
    );
    assert!(
        why.contains("certificate verify failed: UnknownIssuer"),
        "{why}"
    );
    assert!(!shim.link.is_up());

    // The status endpoint and a request's 502 say the same.
    let path = format!("{}status", control::PREFIX);
    let (_, status) = control::call(shim.addr, http::Method::GET, &path, String::new())
        .await
        .unwrap();
    assert!(status.contains("UnknownIssuer"), "{status}");
    let out = Curl::new(&format!("http://app-a.test:{}/x", origin.port()))
        .proxy(&format!("http://{}", shim.addr))
        .run()
        .await;
    assert_eq!(out.status, 502, "{out:?}");
    let text = out.text();
    assert!(
        text.contains(&format!("relay {} unreachable", relay.addr)),
        "{text}"
    );
    assert!(
        text.contains("certificate verify failed: UnknownIssuer"),
        "{text}"
    );
    assert!(origin.received().is_empty());
}

#[tokio::test]
async fn a_tls_server_that_does_not_choose_h2_is_no_link() {
    let (dir, ca) = (Dir::new(), Ca::new("relay ca"));
    let ca_file = dir.write("ca.pem", &ca.pem());
    let origin = Origin::ok().await;
    // TLS without ALPN in front of a plain HTTP/1 server.
    let backend: SocketAddr = format!("127.0.0.1:{}", origin.port()).parse().unwrap();
    let front = TlsFront::start(&ca.server(&["127.0.0.1"]), backend).await;
    let shim = start_shim(shim_config(
        front.addr,
        &format!("tls = true\nca = \"{ca_file}\"\n"),
    ))
    .await;
    let why = link_error(&shim).await;
    assert!(
        why.contains(&format!(
            "TLS with {} failed: ALPN: the relay chose nothing, not h2",
            front.addr
        )),
        "{why}"
    );
    assert!(origin.received().is_empty());
}

/// The next datagram on `s`, or `None` after `limit`.
async fn udp_recv(s: &tokio::net::UdpSocket, limit: Duration) -> Option<String> {
    let mut buf = vec![0u8; 65_535];
    let n = tokio::time::timeout(limit, s.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A local UDP socket connected to `to`.
async fn udp_client(to: SocketAddr) -> tokio::net::UdpSocket {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(to).await.unwrap();
    s
}

fn udp_forward(shim: &Shim, host: &str) -> porthole_shim::udp::UdpForwardState {
    shim.udp_forwards
        .states()
        .into_iter()
        .find(|f| f.spec.host == host)
        .unwrap_or_else(|| panic!("no UDP forward to {host}"))
}

/// The forward to `host`'s `last_error`, once there is one (within 10 s).
async fn udp_refusal(shim: &Shim, host: &str) -> String {
    let recorded = porthole_suite::eventually(Duration::from_secs(10), || async {
        udp_forward(shim, host).last_error.is_some()
    })
    .await;
    assert!(recorded, "{:?}", shim.udp_forwards.states());
    udp_forward(shim, host).last_error.unwrap()
}

/// `forward_udp`: datagrams from two local sockets to the shim's UDP port,
/// sent before any stream is open (they wait in their flow's queue), each
/// get their own echoes: one CONNECT-UDP flow per source, which the echo
/// server sees as two senders (the relay's socket of each flow). An idle
/// flow ends after `udp_idle`; the source's next datagram opens a new one.
#[tokio::test]
async fn udp_forwards_carry_each_local_sources_datagrams_on_its_own_flow() {
    let echo = porthole_suite::UdpEcho::start().await;
    let relay = Relay::start(&config_with(
        &route("dns.test", "127.0.0.1", &[echo.port()], "udp = true"),
        "",
    ))
    .await;
    let extra = format!(
        "forward_udp = [\"127.0.0.1:0=dns.test:{}\"]\nudp_idle = \"500ms\"\n",
        echo.port()
    );
    let shim = start_shim(shim_config(relay.addr, &extra)).await;
    let local = udp_forward(&shim, "dns.test").spec.listen;
    assert_ne!(local.port(), 0);
    let (a, b) = (udp_client(local).await, udp_client(local).await);

    for round in 0..2 {
        for (name, s) in [("a", &a), ("b", &b)] {
            for i in 0..3 {
                s.send(format!("{name}{round}{i}").as_bytes())
                    .await
                    .unwrap();
            }
        }
        for (name, s) in [("a", &a), ("b", &b)] {
            let mut got = Vec::new();
            for _ in 0..3 {
                let answer = udp_recv(s, Duration::from_secs(5)).await;
                got.push(answer.unwrap_or_else(|| panic!("{name}: no answer, got {got:?}")));
            }
            got.sort();
            let want: Vec<String> = (0..3).map(|i| format!("echo:{name}{round}{i}")).collect();
            assert_eq!(got, want, "{name} round {round}");
        }
    }
    assert_eq!(echo.senders().len(), 2, "{:?}", echo.senders());
    assert_eq!(udp_forward(&shim, "dns.test").flows, 2);
    assert_eq!(udp_forward(&shim, "dns.test").last_error, None);

    // Both flows idle out; a's next datagram opens a third.
    let idle = porthole_suite::eventually(Duration::from_secs(5), || async {
        udp_forward(&shim, "dns.test").flows == 0
    })
    .await;
    assert!(idle, "flows still open: {:?}", shim.udp_forwards.states());
    a.send(b"again").await.unwrap();
    assert_eq!(
        udp_recv(&a, Duration::from_secs(5)).await.as_deref(),
        Some("echo:again")
    );
    assert_eq!(echo.senders().len(), 3, "{:?}", echo.senders());
    assert_eq!(udp_forward(&shim, "dns.test").flows, 1);
}

/// A UDP forward to a target the relay has no route for: the relay answers
/// the CONNECT-UDP stream `403` (and logs it), the shim records the
/// refusal with the relay's reason, the datagram gets no answer, and the
/// shim's other UDP forward keeps working.
#[tokio::test]
async fn an_unrouted_udp_forward_is_refused_and_the_others_go_on() {
    let echo = porthole_suite::UdpEcho::start().await;
    let dir = std::env::temp_dir().join(format!("porthole-shim-udp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    let relay = Relay::start(&config_with(
        &route("dns.test", "127.0.0.1", &[echo.port()], "udp = true"),
        &format!("[log]\naccess = \"{}\"\n", log.display()),
    ))
    .await;
    let extra = format!(
        "forward_udp = [\"127.0.0.1:0=other.test:53\", \"127.0.0.1:0=dns.test:{}\"]\n",
        echo.port()
    );
    let shim = start_shim(shim_config(relay.addr, &extra)).await;
    let refused = udp_client(udp_forward(&shim, "other.test").spec.listen).await;
    let good = udp_client(udp_forward(&shim, "dns.test").spec.listen).await;

    refused.send(b"lost").await.unwrap();
    let error = udp_refusal(&shim, "other.test").await;
    assert!(error.contains("403"), "{error}");
    // The relay's own reason names the host it has no route for.
    assert!(error.contains("other.test"), "{error}");
    let refusals = || porthole_suite::lines_with(&log, "status=403");
    let logged =
        porthole_suite::eventually(Duration::from_secs(5), || async { !refusals().is_empty() })
            .await;
    assert!(logged, "{:?}", std::fs::read_to_string(&log));
    porthole_suite::assert_some_line(&refusals(), &["masque/udp/other.test/53"]);
    assert_eq!(udp_recv(&refused, Duration::from_millis(300)).await, None);

    good.send(b"still here").await.unwrap();
    assert_eq!(
        udp_recv(&good, Duration::from_secs(5)).await.as_deref(),
        Some("echo:still here")
    );
    assert_eq!(udp_forward(&shim, "dns.test").last_error, None);
    // Listed with the TCP forwards on the control endpoint.
    let path = format!("{}forwards", control::PREFIX);
    let (status, list) = control::call(shim.addr, http::Method::GET, &path, String::new())
        .await
        .unwrap();
    assert_eq!(status, 200);
    let good_spec = udp_forward(&shim, "dns.test").spec;
    assert!(list.contains(&format!("udp {good_spec}")), "{list}");
    assert!(list.contains("=other.test:53"), "{list}");
}

/// An HTTP/2 (h2c) server that records each request: an extended `CONNECT`
/// as `:protocol :scheme://:authority:path`, refused `403`; anything else
/// (the shim's probes, its PAC fetch) as `METHOD :scheme://:authority:path`,
/// answered `200`. Behind a [`TlsFront`] with ALPN `h2` it is a relay over
/// TLS as far as the shim can tell.
async fn recorder() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let log = log.clone();
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                let log = log.clone();
                async move {
                    let mut status = http::StatusCode::OK;
                    let seen = if req.method() == http::Method::CONNECT {
                        let protocol = req.extensions().get::<hyper::ext::Protocol>();
                        let protocol = protocol.map_or("-", |p| p.as_str());
                        status = http::StatusCode::FORBIDDEN;
                        format!("{protocol} {}", req.uri())
                    } else {
                        format!("{} {}", req.method(), req.uri())
                    };
                    log.lock().unwrap().push(seen);
                    let mut resp = http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"recorded"),
                    ));
                    *resp.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .enable_connect_protocol()
                    .serve_connection(TokioIo::new(tcp), service),
            );
        }
    });
    (addr, seen)
}

/// CONNECT-UDP over a TLS link: the real relay (TLS required) takes the
/// shim's `:scheme https` and carries the datagrams; on the wire (a
/// recorder behind TLS with ALPN `h2`, and the same recorder in cleartext)
/// the scheme is `https` over TLS and `http` over cleartext (RFC 9298 3.4).
#[tokio::test]
async fn connect_udp_over_a_tls_link_has_scheme_https_and_the_relay_takes_it() {
    let (dir, ca) = (Dir::new(), Ca::new("relay ca"));
    let ca_file = dir.write("ca.pem", &ca.pem());
    let echo = porthole_suite::UdpEcho::start().await;
    let leaf = ca.server(&["127.0.0.1"]);
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nrequire = true\n",
        dir.write("relay.pem", &leaf.cert),
        dir.write("relay.key", &leaf.key)
    );
    let routes = route("dns.test", "127.0.0.1", &[echo.port()], "udp = true");
    let relay = Relay::start(&config_with(&routes, &tls)).await;
    let forward = format!("forward_udp = [\"127.0.0.1:0=dns.test:{}\"]\n", echo.port());
    let over_tls = format!("tls = true\nca = \"{ca_file}\"\n{forward}");
    let shim = start_shim(shim_config(relay.addr, &over_tls)).await;
    let s = udp_client(udp_forward(&shim, "dns.test").spec.listen).await;
    s.send(b"over tls").await.unwrap();
    assert_eq!(
        udp_recv(&s, Duration::from_secs(10)).await.as_deref(),
        Some("echo:over tls")
    );
    assert_eq!(udp_forward(&shim, "dns.test").last_error, None);

    let (recorder, seen) = recorder().await;
    let front = TlsFront::start_with_alpn(&leaf, recorder, &[b"h2"]).await;
    let tls_shim = start_shim(shim_config(front.addr, &over_tls)).await;
    let plain_shim = start_shim(shim_config(recorder, &forward)).await;
    for shim in [&tls_shim, &plain_shim] {
        let s = udp_client(udp_forward(shim, "dns.test").spec.listen).await;
        s.send(b"recorded").await.unwrap();
        let error = udp_refusal(shim, "dns.test").await;
        assert!(error.contains("403 Forbidden recorded"), "{error}");
    }
    let mut seen: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.starts_with("connect-udp "))
        .cloned()
        .collect();
    seen.sort();
    let path = format!(
        "relay.test/.well-known/masque/udp/dns.test/{}/",
        echo.port()
    );
    assert_eq!(
        seen,
        [
            format!("connect-udp http://{path}"),
            format!("connect-udp https://{path}")
        ]
    );
}

/// The shim's own requests to the relay as an origin, its keepalive probe
/// and its PAC fetch, have `:scheme https` over a TLS link and `http` over
/// h2c, as CONNECT-UDP does (seen by a recorder behind TLS with ALPN `h2`,
/// and by the same recorder in cleartext).
#[tokio::test]
async fn the_probe_and_the_pac_fetch_over_a_tls_link_have_scheme_https() {
    let (dir, ca) = (Dir::new(), Ca::new("relay ca"));
    let ca_file = dir.write("ca.pem", &ca.pem());
    let (recorder, seen) = recorder().await;
    let front = TlsFront::start_with_alpn(&ca.server(&["127.0.0.1"]), recorder, &[b"h2"]).await;
    let tls_shim = start_shim(shim_config(
        front.addr,
        &format!("tls = true\nca = \"{ca_file}\"\n"),
    ))
    .await;
    let plain_shim = start_shim(shim_config(recorder, "")).await;
    for (shim, scheme) in [(&tls_shim, "https"), (&plain_shim, "http")] {
        // The link is up once its first probe was answered.
        wait_state(shim, true, Duration::from_secs(10)).await;
        let probe = format!("HEAD {scheme}://relay.test/");
        assert!(seen.lock().unwrap().contains(&probe), "{probe}: {seen:?}");
        // The recorder's answer is no PAC file: the shim says so, after
        // asking for it.
        let out = Curl::new(&format!("http://{}/proxy.pac", shim.addr))
            .run()
            .await;
        assert_eq!(out.status, 502, "{out:?}");
        let pac = format!("GET {scheme}://relay.test/proxy.pac");
        assert!(seen.lock().unwrap().contains(&pac), "{pac}: {seen:?}");
    }
}

/// What `porthole-shim forward list` prints for the shim listening on `shim`.
async fn forward_list(shim: SocketAddr) -> String {
    let out = tokio::process::Command::new(binary("porthole-shim"))
        .args(["--listen", &shim.to_string(), "forward", "list"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// A UDP forward's `last_error` says why its flows fail only while they
/// do: refused while the relay is down (no link), it is cleared once the
/// relay is back and a flow opens again. `porthole-shim forward list` (the
/// control endpoint's list) shows it on the forward's line meanwhile.
#[tokio::test]
async fn a_udp_forwards_last_error_clears_once_a_flow_opens_again() {
    let echo = porthole_suite::UdpEcho::start().await;
    let relay_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let extra = format!(
        "forward_udp = [\"127.0.0.1:0=dns.test:{}\"]\nlink_wait = \"300ms\"\n",
        echo.port()
    );
    let shim = start_shim(shim_config(relay_addr, &extra)).await;
    let s = udp_client(udp_forward(&shim, "dns.test").spec.listen).await;
    s.send(b"nobody there").await.unwrap();
    let error = udp_refusal(&shim, "dns.test").await;
    assert!(error.contains("unreachable"), "{error}");
    let spec = udp_forward(&shim, "dns.test").spec;
    let list = forward_list(shim.addr).await;
    assert!(
        list.contains(&format!("udp {spec}  # last error: {error}\n")),
        "{list}"
    );

    let routes = route("dns.test", "127.0.0.1", &[echo.port()], "udp = true");
    let _relay = Relay::start_at(&config_with(&routes, ""), relay_addr).await;
    wait_state(&shim, true, Duration::from_secs(15)).await;
    // The refused flow holds its source for a second; then a datagram opens a new one.
    let start = Instant::now();
    loop {
        s.send(b"back").await.unwrap();
        match udp_recv(&s, Duration::from_millis(300)).await {
            Some(answer) => break assert_eq!(answer, "echo:back"),
            None if start.elapsed() < Duration::from_secs(10) => {}
            None => panic!("no echo: {:?}", shim.udp_forwards.states()),
        }
    }
    assert_eq!(udp_forward(&shim, "dns.test").last_error, None);
    assert_eq!(forward_list(shim.addr).await, format!("udp {spec}\n"));
}

/// Sends `method path` with `body` to the shim's control endpoint.
async fn control_call(shim: &Shim, method: http::Method, path: &str, body: &str) -> (u16, String) {
    let path = format!("{}{path}", control::PREFIX);
    let (status, text) = control::call(shim.addr, method, &path, body.to_string())
        .await
        .unwrap();
    (status.as_u16(), text)
}

/// Waits until `addr` can be bound as a UDP socket again (its forward's
/// socket is closed).
async fn assert_udp_free(addr: SocketAddr) {
    let freed = porthole_suite::eventually(Duration::from_secs(5), || async {
        std::net::UdpSocket::bind(addr).is_ok()
    })
    .await;
    assert!(freed, "{addr} is still bound");
}

/// A UDP forward added through the control endpoint (`udp LISTEN=HOST:PORT`,
/// the list's form) carries datagrams; bad lines, a taken address and a
/// duplicate are refused and say why; removing it
/// (`DELETE .../forwards/udp/LISTEN`) closes its socket and ends its flow's
/// CONNECT-UDP stream (the relay writes the session's access line at its
/// end). The TCP forwards' API is unchanged beside it.
#[tokio::test]
async fn udp_forwards_are_added_and_removed_while_the_shim_runs() {
    let echo = porthole_suite::UdpEcho::start().await;
    let dir = Dir::new();
    let log = dir.0.join("access.log");
    let relay = Relay::start(&config_with(
        &route("dns.test", "127.0.0.1", &[echo.port()], "udp = true"),
        &format!("[log]\naccess = \"{}\"\n", log.display()),
    ))
    .await;
    let shim = start_shim(shim_config(relay.addr, "")).await;
    let target = format!("dns.test:{}", echo.port());

    let (status, added) = control_call(
        &shim,
        http::Method::POST,
        "forwards",
        &format!("udp 127.0.0.1:0={target}"),
    )
    .await;
    assert_eq!(status, 201, "{added}");
    let added = added.trim().to_string();
    let listen: SocketAddr = added
        .strip_prefix("udp ")
        .and_then(|l| l.strip_suffix(&format!("={target}")))
        .unwrap_or_else(|| panic!("{added}"))
        .parse()
        .unwrap();
    assert_ne!(listen.port(), 0);
    let s = udp_client(listen).await;
    s.send(b"added").await.unwrap();
    assert_eq!(
        udp_recv(&s, Duration::from_secs(5)).await.as_deref(),
        Some("echo:added")
    );
    assert_eq!(udp_forward(&shim, "dns.test").flows, 1);
    let (status, list) = control_call(&shim, http::Method::GET, "forwards", "").await;
    assert_eq!((status, list.trim()), (200, added.as_str()));

    // Refusals, each saying what is wrong.
    let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let posts = [
        (added.clone(), 409, "is already a UDP forward".to_string()),
        (
            format!("udp {taken}={target}"),
            409,
            format!("cannot bind UDP {taken}"),
        ),
        (
            "udp 5353=dns.test".into(),
            400,
            "`dns.test` is not HOST:PORT".into(),
        ),
        ("udp".into(), 400, "expected `udp LISTEN=HOST:PORT`".into()),
    ];
    for (body, want, words) in posts {
        let (status, text) = control_call(&shim, http::Method::POST, "forwards", &body).await;
        assert_eq!(status, want, "{body}: {text}");
        assert!(text.contains(&words), "{body}: {text}");
    }
    let deletes = [
        (format!("forwards/udp/{taken}"), 404, "no UDP forward on"),
        (
            "forwards/udp/nowhere".into(),
            400,
            "`nowhere` is not a local ADDR:PORT",
        ),
        // A TCP forward's path does not name the UDP one.
        (format!("forwards/{listen}"), 404, "no forward on"),
    ];
    for (path, want, words) in deletes {
        let (status, text) = control_call(&shim, http::Method::DELETE, &path, "").await;
        assert_eq!(status, want, "{path}: {text}");
        assert!(text.contains(words), "{path}: {text}");
    }
    assert_eq!(shim.udp_forwards.list().len(), 1);
    let sessions = || porthole_suite::lines_with(&log, "masque/udp/dns.test");
    assert!(sessions().is_empty(), "{:?}", sessions());

    let (status, text) = control_call(
        &shim,
        http::Method::DELETE,
        &format!("forwards/udp/{listen}"),
        "",
    )
    .await;
    assert_eq!(
        (status, text.trim()),
        (200, &*format!("removed udp {listen}"))
    );
    let ended =
        porthole_suite::eventually(Duration::from_secs(5), || async { !sessions().is_empty() })
            .await;
    assert!(ended, "{:?}", std::fs::read_to_string(&log));
    porthole_suite::assert_some_line(&sessions(), &["status=101"]);
    assert_udp_free(listen).await;
    let (status, list) = control_call(&shim, http::Method::GET, "forwards", "").await;
    assert_eq!((status, list.as_str()), (200, ""));
}

/// Removing a UDP forward whose flow is still waiting for the link (the
/// relay is down, `link_wait` long) frees its port at once, without waiting
/// for the link.
#[tokio::test]
async fn removing_a_udp_forward_frees_its_port_while_a_flow_waits_for_the_link() {
    let relay_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let extra = "forward_udp = [\"127.0.0.1:0=dns.test:53\"]\nlink_wait = \"60s\"\n";
    let shim = start_shim(shim_config(relay_addr, extra)).await;
    let listen = udp_forward(&shim, "dns.test").spec.listen;
    let s = udp_client(listen).await;
    s.send(b"waiting").await.unwrap();
    let waiting = porthole_suite::eventually(Duration::from_secs(5), || async {
        udp_forward(&shim, "dns.test").flows == 1
    })
    .await;
    assert!(waiting, "{:?}", shim.udp_forwards.states());
    let path = format!("forwards/udp/{}", listen.port());
    let (status, text) = control_call(&shim, http::Method::DELETE, &path, "").await;
    assert_eq!(status, 200, "{text}");
    assert_udp_free(listen).await;
}

/// Large heads cross the shim's HTTP/2 link both ways (hyper's own limit is
/// 16 KiB a header list): a 30 KB cookie reaches the server, and a 30 KB
/// `Set-Cookie` comes back to the application.
#[tokio::test]
async fn large_heads_cross_the_link_both_ways() {
    let set_cookie = format!("big={}", "s".repeat(30_000));
    let answer = set_cookie.clone();
    let origin = Origin::start(move |_| {
        Reply::Raw(response(200, &[("Set-Cookie", answer.as_str())], b"ok"))
    })
    .await;
    let (_relay, shim) = relay_and_shim("app.test", origin.port(), "").await;
    let cookie = format!("c={}", "c".repeat(30_000));
    let out = Curl::new(&format!("http://app.test:{}/big", origin.port()))
        .proxy(&format!("http://{}", shim.addr))
        .args(&["-H", &format!("Cookie: {cookie}")])
        .run()
        .await;
    assert_eq!(out.status, 200, "{:?} {}", out.head.get(..200), out.stderr);
    assert_eq!(out.header("set-cookie"), vec![set_cookie]);
    assert_eq!(origin.received()[0].header("cookie"), Some(cookie.as_str()));
}

// ---------------------------------------------------------------- users

/// The password of the relay's user in the tests below.
const ALICE_PW: &str = "pw-of-alice-7Qx";

/// A relay process with users, `[auth] required = true`, routing `app.test`
/// to `origin` and `echo.test` to `echo`; its access lines go to its log.
async fn relay_with_users(
    dir: &Dir,
    origin: &Origin,
    echo: &EchoServer,
    more_routes: &str,
) -> RelayProcess {
    let users = porthole_relay::secret::passwd_line("alice", ALICE_PW).unwrap();
    let users = dir.write("users", &format!("{users}\n"));
    let routes = route("app.test", "127.0.0.1", &[origin.port()], "")
        + &route("echo.test", "127.0.0.1", &[echo.port()], "")
        + more_routes;
    let auth = format!("[auth]\nusers_file = \"{users}\"\nrequired = true\nrealm = \"corp\"\n");
    let config = dir.write("relay.toml", &config_with(&routes, &auth));
    RelayProcess::spawn(std::path::Path::new(&config), &[]).await
}

/// The `porthole-shim` binary linked to `relay` (debug logging into the
/// returned file), once its system-proxy port listens.
async fn shim_process(
    dir: &Dir,
    relay: SocketAddr,
    args: &[&str],
) -> (tokio::process::Child, SocketAddr, std::path::PathBuf) {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.0.join(format!("shim-{}.log", listen.port()));
    let child = tokio::process::Command::new(binary("porthole-shim"))
        .args([
            "--relay",
            &relay.to_string(),
            "--listen",
            &listen.to_string(),
        ])
        .args(args)
        .env("RUST_LOG", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for_port(listen, Duration::from_secs(10)).await;
    (child, listen, log)
}

/// The relay's access lines naming `needle`, once there are `count`.
async fn access_lines(relay: &RelayProcess, needle: &str, count: usize) -> Vec<String> {
    let lines = || -> Vec<String> {
        relay
            .log_text()
            .lines()
            .filter(|l| l.contains("porthole::access") && l.contains(needle))
            .map(str::to_string)
            .collect()
    };
    porthole_suite::eventually(Duration::from_secs(10), || async { lines().len() >= count }).await;
    lines()
}

/// Neither the password nor its `Basic` form is in any log.
fn assert_no_password(logs: &[String]) {
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("alice:{ALICE_PW}"));
    for log in logs {
        assert!(!log.is_empty());
        assert!(!log.contains(ALICE_PW), "password in a log:\n{log}");
        assert!(!log.contains(&basic), "credentials in a log:\n{log}");
    }
}

/// With `credentials_file` (here `--credentials-file`), the shim sends its
/// own credentials on everything: a proxied request, a CONNECT tunnel, a
/// forwarded port, a UDP forward (CONNECT-UDP), the PAC fetch and the
/// keepalive probe all pass a relay that requires users, and the relay's
/// access lines name the user.
#[tokio::test]
async fn the_shims_credentials_file_authenticates_all_it_sends_to_the_relay() {
    let dir = Dir::new();
    let (origin, echo) = (Origin::ok().await, EchoServer::start().await);
    let udp_echo = porthole_suite::UdpEcho::start().await;
    let dns = route("dns.test", "127.0.0.1", &[udp_echo.port()], "udp = true");
    let relay = relay_with_users(&dir, &origin, &echo, &dns).await;
    let credentials = dir.write("shim-credentials", &format!("alice:{ALICE_PW}\n"));
    let forward = free_port();
    let forward_udp = format!("127.0.0.1:{}", free_port());
    let config = dir.write(
        "shim-keepalive.toml",
        "[keepalive]\nidle_ping = \"200ms\"\n",
    );
    let (_shim, listen, shim_log) = shim_process(
        &dir,
        relay.addr,
        &[
            "--config",
            &config,
            "--credentials-file",
            &credentials,
            "--forward",
            &format!("{forward}=echo.test:{}", echo.port()),
            "--forward-udp",
            &format!("{forward_udp}=dns.test:{}", udp_echo.port()),
        ],
    )
    .await;
    let proxy = format!("http://{listen}");
    let url = format!("http://app.test:{}/own", origin.port());

    let out = Curl::new(&url).proxy(&proxy).run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /own");
    let out = Curl::new(&url).proxy(&proxy).arg("-p").run().await;
    assert_eq!(out.status, 200, "{out:?}");
    // A client's own (wrong) credentials are replaced by the shim's.
    let out = Curl::new(&url)
        .proxy(&proxy)
        .args(&["-U", "alice:wrong"])
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");

    let forwarded: SocketAddr = format!("127.0.0.1:{forward}").parse().unwrap();
    wait_for_port(forwarded, Duration::from_secs(10)).await;
    let s = TcpStream::connect(forwarded).await.unwrap();
    assert_eq!(echo_round(s, b"hello").await, b"hellobye\n");

    let udp = udp_client(forward_udp.parse().unwrap()).await;
    let mut answer = None;
    for _ in 0..50 {
        udp.send(b"ping").await.unwrap();
        answer = udp_recv(&udp, Duration::from_millis(200)).await;
        if answer.is_some() {
            break;
        }
    }
    assert_eq!(answer.as_deref(), Some("echo:ping"));

    let pac = Curl::new(&format!("{proxy}/proxy.pac")).run().await;
    assert_eq!(pac.status, 200, "{pac:?}");
    assert!(pac.text().contains("app.test"), "{}", pac.text());

    let lines = access_lines(&relay, "user=\"alice\"", 5).await;
    porthole_suite::assert_some_line(&lines, &["method=GET", "/own", "status=200"]);
    porthole_suite::assert_some_line(&lines, &["CONNECT", "app.test", "status=200"]);
    porthole_suite::assert_some_line(&lines, &["CONNECT", "echo.test", "status=200"]);
    // The probe at link-up and at least one keepalive probe after it (any
    // status proves the relay alive; a 407 would still say the shim sent
    // no credentials). The UDP flow's line comes when it ends; its echo
    // above is the proof the relay took its CONNECT-UDP.
    let probes = access_lines(&relay, "method=HEAD", 2).await;
    assert!(probes.len() >= 2, "{probes:?}");
    for line in &probes {
        assert!(line.contains("user=\"alice\""), "{line}");
    }
    let refused = access_lines(&relay, "status=407", 0).await;
    assert!(
        refused.is_empty(),
        "the relay refused some of it: {refused:?}"
    );
    for got in origin.received() {
        assert!(got.header("proxy-authorization").is_none(), "{got:?}");
    }
    let shim_log = std::fs::read_to_string(shim_log).unwrap();
    assert_no_password(&[relay.log_text(), shim_log]);
}

/// Without `credentials_file`, a client's own `Proxy-Authorization` goes
/// through the shim to the relay (as Squid's `login=PASSTHRU`): `curl -U`
/// passes, a request and a tunnel; without it the client gets the relay's
/// `407` and its challenge. The server never sees the credentials.
#[tokio::test]
async fn without_a_credentials_file_the_clients_credentials_pass_through() {
    let dir = Dir::new();
    let (origin, echo) = (Origin::ok().await, EchoServer::start().await);
    let relay = relay_with_users(&dir, &origin, &echo, "").await;
    let (_shim, listen, shim_log) = shim_process(&dir, relay.addr, &[]).await;
    let proxy = format!("http://{listen}");
    let url = format!("http://app.test:{}/passed", origin.port());
    let login = format!("alice:{ALICE_PW}");

    let out = Curl::new(&url)
        .proxy(&proxy)
        .args(&["-U", &login])
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /passed");
    let out = Curl::new(&url)
        .proxy(&proxy)
        .args(&["-U", &login, "-p"])
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");

    let out = Curl::new(&url).proxy(&proxy).run().await;
    assert_eq!(out.status, 407, "{out:?}");
    assert_eq!(out.header("proxy-authenticate"), ["Basic realm=\"corp\""]);
    let out = Curl::new(&url).proxy(&proxy).arg("-p").run().await;
    assert_ne!(out.exit, 0, "{out:?}");
    assert!(out.stderr.contains("407"), "{}", out.stderr);

    let lines = access_lines(&relay, "user=\"alice\"", 2).await;
    porthole_suite::assert_some_line(&lines, &["method=GET", "/passed", "status=200"]);
    porthole_suite::assert_some_line(&lines, &["CONNECT", "app.test", "status=200"]);
    let received = origin.received();
    assert_eq!(received.len(), 2, "{received:?}");
    for got in received {
        assert!(got.header("proxy-authorization").is_none(), "{got:?}");
    }
    let shim_log = std::fs::read_to_string(shim_log).unwrap();
    assert_no_password(&[relay.log_text(), shim_log]);
}

/// The shim adds its `Via` entry to the responses it forwards, as it does
/// to requests (RFC 9110 7.6.3): after the relay's, naming the HTTP/2 it
/// received the response with.
#[tokio::test]
async fn responses_through_the_shim_carry_the_relays_and_the_shims_via() {
    let origin = Origin::ok().await;
    let (_relay, shim) = relay_and_shim("app-a.test", origin.port(), "").await;
    let out = Curl::new(&format!("http://app-a.test:{}/via", origin.port()))
        .proxy(&format!("http://{}", shim.addr))
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(
        out.header("via"),
        ["1.1 relay.test (porthole)", "2 porthole-shim (porthole)"]
    );
    // Refusals from the relay are forwarded responses too.
    let out = Curl::new("http://nowhere.test/")
        .proxy(&format!("http://{}", shim.addr))
        .run()
        .await;
    assert_eq!(out.status, 403, "{out:?}");
    assert!(
        out.header("via")
            .contains(&"2 porthole-shim (porthole)".to_string()),
        "{out:?}"
    );
    let got = origin.single();
    assert_eq!(
        got.header("via"),
        Some("1.1 porthole-shim (porthole), 1.1 relay.test (porthole)")
    );
}
