//! Relay core, driven by the real curl: HTTP relay by absolute URI and by
//! Host, CONNECT tunnels, upgrades, framing, keep-alive, errors and limits.
//! Every test starts its own internal servers and relay on free ports.

use std::io::Write;
use std::time::Duration;

use porthole_suite::{
    config_with, connect_via, echo_round, exchange, head_field, raw_exchange, response, route,
    Curl, EchoServer, Origin, Relay, Reply,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

async fn relay_to(origin: &Origin, host: &str, extra: &str) -> Relay {
    relay_to_port(origin.port(), host, extra).await
}

/// A relay with one connection worker: every client connection meets the
/// same upstream pool (each worker keeps its own).
async fn one_worker_relay_to(origin: &Origin, host: &str) -> Relay {
    Relay::start(&config_with(
        &route(host, "127.0.0.1", &[origin.port()], ""),
        "workers = 1",
    ))
    .await
}

#[tokio::test]
async fn absolute_form_is_relayed_in_origin_form_without_hop_by_hop_fields() {
    let origin = Origin::ok().await;
    let relay = relay_to(&origin, "app-a.test", "").await;
    let url = format!("http://app-a.test:{}/x?q=1", origin.port());
    let out = Curl::new(&url)
        .proxy(&relay.url())
        .args(&[
            "-U",
            "alice:secret",
            "-H",
            "Connection: X-Drop, keep-alive",
            "-H",
            "X-Drop: 1",
            "-H",
            "Keep-Alive: 5",
            "-H",
            "TE: trailers",
            "-H",
            "Proxy-Connection: keep-alive",
        ])
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /x?q=1");
    let via = out.header("via");
    assert_eq!(
        via,
        vec!["1.1 relay.test (porthole)"],
        "response Via: {}",
        out.head
    );

    let got = origin.single();
    assert_eq!(got.method, "GET");
    assert_eq!(got.target, "/x?q=1");
    assert_eq!(
        got.header("host"),
        Some(format!("app-a.test:{}", origin.port()).as_str())
    );
    assert_eq!(got.all("via"), vec!["1.1 relay.test (porthole)"]);
    for name in HOP_BY_HOP.iter().chain(&["x-drop"]) {
        assert!(
            got.header(name).is_none(),
            "{name} reached the server: {}",
            got.raw_head
        );
    }
}

#[tokio::test]
async fn jp4570628_form_restores_the_applications_host() {
    // The shim's form: absolute URI, Host naming the relay itself.
    let origin = Origin::ok().await;
    let relay = relay_to(&origin, "app-a.test", "").await;
    let url = format!("http://app-a.test:{}/index.html", origin.port());
    let out = Curl::new(&url)
        .proxy(&relay.url())
        .header("Host: relay.test")
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    let got = origin.single();
    assert_eq!(got.target, "/index.html");
    assert_eq!(
        got.all("host"),
        vec![format!("app-a.test:{}", origin.port())]
    );
}

#[tokio::test]
async fn origin_form_is_relayed_by_host_to_a_pinned_port() {
    let origin = Origin::ok().await;
    let to = format!("127.0.0.1:{}", origin.port());
    let relay = Relay::start(&config_with(&route("legacy.test", &to, &[80], ""), "")).await;
    let out = Curl::new(&format!("{}/x", relay.url()))
        .header("Host: legacy.test")
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    let got = origin.single();
    assert_eq!(got.target, "/x");
    assert_eq!(got.header("host"), Some("legacy.test"));
}

#[tokio::test]
async fn transparent_route_delivers_the_head_as_the_application_wrote_it() {
    let origin = Origin::ok().await;
    let relay = relay_to(&origin, "app-a.test", "transparent = true").await;
    let url = format!("http://app-a.test:{}/t", origin.port());
    let out = Curl::new(&url)
        .proxy(&relay.url())
        .args(&["-H", "Via: 1.1 app-gw", "-H", "X-Custom: Keep  this"])
        .run()
        .await;
    assert_eq!(out.status, 200);
    assert!(
        out.header("via")
            .iter()
            .any(|v| v.contains("relay.test (porthole)")),
        "{}",
        out.head
    );
    let got = origin.single();
    assert_eq!(got.all("via"), vec!["1.1 app-gw"], "{}", got.raw_head);
    assert_eq!(got.header("x-custom"), Some("Keep  this"));

    // A Porthole hop before this one (the shim) is hidden from the server too.
    let out = Curl::new(&url)
        .proxy(&relay.url())
        .header("Via: 1.1 shim.local (porthole)")
        .run()
        .await;
    assert_eq!(out.status, 200);
    assert!(origin.received()[1].header("via").is_none());
}

#[tokio::test]
async fn decompress_route_gunzips_for_clients_without_gzip() {
    let plain = "hello ".repeat(5000);
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(plain.as_bytes()).unwrap();
    let gz = enc.finish().unwrap();
    let gz2 = gz.clone();
    let origin = Origin::start(move |_| {
        Reply::Raw(response(
            200,
            &[("Content-Encoding", "gzip"), ("Content-Type", "text/plain")],
            &gz2,
        ))
    })
    .await;
    let relay = relay_to(&origin, "app-a.test", "decompress = true").await;
    let url = format!("http://app-a.test:{}/z", origin.port());

    let out = Curl::new(&url).proxy(&relay.url()).run().await;
    assert_eq!(out.status, 200);
    assert_eq!(out.text(), plain);
    assert!(out.header("content-encoding").is_empty(), "{}", out.head);
    assert!(out.header("content-length").is_empty());
    assert_eq!(out.header("transfer-encoding"), vec!["chunked"]);

    // HTTP/1.0 client: close-delimited.
    let out = Curl::new(&url).proxy(&relay.url()).arg("-0").run().await;
    assert_eq!(out.text(), plain);
    assert_eq!(out.header("connection"), vec!["close"]);

    // A client that offers gzip gets the bytes as the server sent them.
    let out = Curl::new(&url)
        .proxy(&relay.url())
        .header("Accept-Encoding: gzip")
        .run()
        .await;
    assert_eq!(out.body, gz);
    assert_eq!(out.header("content-encoding"), vec!["gzip"]);
}

#[tokio::test]
async fn connect_tunnel_passes_bytes_and_half_close() {
    let echo = EchoServer::start().await;
    let relay = Relay::start(&config_with(
        &route("db.test", "127.0.0.1", &[echo.port()], ""),
        "",
    ))
    .await;
    let (s, head) = connect_via(relay.addr, &format!("db.test:{}", echo.port())).await;
    assert_eq!(head, "HTTP/1.1 200 Connection established\r\n\r\n");
    let payload: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    // Half-closed after the payload: the server must see EOF and still answer.
    let back = echo_round(s, &payload).await;
    assert_eq!(back.len(), payload.len() + 4);
    assert_eq!(
        &back[..payload.len()],
        &payload[..],
        "bytes changed in the tunnel"
    );
    assert_eq!(&back[payload.len()..], b"bye\n");
    assert_eq!(echo.half_closes(), 1);
}

#[tokio::test]
async fn a_tunnel_in_use_outlives_the_idle_timeout_and_an_idle_one_is_closed() {
    let echo = EchoServer::start().await;
    let relay = Relay::start(&config_with(
        &route("db.test", "127.0.0.1", &[echo.port()], ""),
        "[limits]\nidle_timeout = \"1s\"\n",
    ))
    .await;
    let (mut s, head) = connect_via(relay.addr, &format!("db.test:{}", echo.port())).await;
    assert_eq!(head, "HTTP/1.1 200 Connection established\r\n\r\n");
    // Bytes every 300 ms for three idle timeouts: the tunnel stays.
    let mut last_bytes = std::time::Instant::now();
    for i in 0..10u8 {
        s.write_all(&[i; 10]).await.unwrap();
        let mut back = [0u8; 10];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .expect("echo within 5 s")
            .expect("tunnel still open while in use");
        last_bytes = std::time::Instant::now();
        assert_eq!(back, [i; 10]);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Then nothing: the relay closes it (end of stream, not the echo's "bye").
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the idle tunnel is closed")
        .ok();
    assert!(
        // The idle timeout counts from the last bytes the relay moved, which
        // came just before the client read them.
        last_bytes.elapsed() >= Duration::from_millis(900),
        "closed {:?} after the last bytes, before the idle timeout",
        last_bytes.elapsed()
    );
    assert!(rest.is_empty(), "unexpected bytes {rest:?}");
}

#[tokio::test]
async fn curl_proxytunnel_reaches_the_server() {
    let origin = Origin::ok().await;
    let relay = relay_to(&origin, "app-a.test", "").await;
    let url = format!("http://app-a.test:{}/tunnelled", origin.port());
    let out = Curl::new(&url).proxy(&relay.url()).arg("-p").run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /tunnelled");
    // Through a tunnel the relay does not touch the request.
    assert!(origin.single().header("via").is_none());
}

#[tokio::test]
async fn connect_answers_only_once_the_internal_connection_stands() {
    // Nothing listens on this port: the client gets 502, never 200.
    let port = porthole_suite::free_port();
    let relay = Relay::start(&config_with(
        &route("gone.test", "127.0.0.1", &[port], ""),
        "",
    ))
    .await;
    let req = format!("CONNECT gone.test:{port} HTTP/1.1\r\n\r\n");
    let answer = raw_exchange(relay.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    assert!(answer.contains("route gone.test"), "{answer}");
}

#[tokio::test]
async fn websocket_upgrade_becomes_a_tunnel() {
    let origin = Origin::start(|_| Reply::UpgradeEcho).await;
    let relay = relay_to(&origin, "ws.test", "").await;
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    let req = format!(
        "GET http://ws.test:{}/chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        origin.port()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before 101");
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_string();
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    // A masked text frame both ways through the echo.
    porthole_suite::websocket_echo(&mut s).await;
    let seen = origin.single();
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(seen.header("connection"), Some("upgrade"));
}

/// RFC 8441: an extended CONNECT (`:protocol websocket`) on HTTP/2 is the
/// relay's HTTP/1 upgrade. The server gets a GET with `Upgrade` and a fresh
/// key (HTTP/2 has none); its `101`, once the relay has checked its accept,
/// comes back as `200` on the stream, and bytes echo both ways. An unrouted
/// one gets `403`; a server that answers `200` without switching, or with an
/// accept that does not answer the key, gets the client a `502`, not a
/// tunnel.
#[tokio::test]
async fn websocket_over_http2_is_an_extended_connect() {
    use base64::Engine;
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    let origin = Origin::start(|r| match r.target.as_str() {
        "/page" => Reply::Raw(response(200, &[], b"a page")),
        "/wrong" => Reply::Raw(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: d3Jvbmc=\r\n\r\n".to_vec(),
        ),
        _ => Reply::UpgradeEcho,
    })
    .await;
    let dir = std::env::temp_dir().join(format!("porthole-core-ws-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    let relay = Relay::start(&config_with(
        &route("ws.test", "127.0.0.1", &[origin.port()], ""),
        &format!("[log]\naccess = \"{}\"\n", log.display()),
    ))
    .await;
    let mut sender = porthole_suite::h2c(relay.addr).await;
    let extended = |authority: &str, path: &str| {
        porthole_suite::websocket_h2(&format!("http://{authority}{path}"))
    };
    // The first stream is unrouted: refused like any request. Its answer
    // also means the relay's SETTINGS (extended CONNECT enabled) have come.
    let resp = sender
        .send_request(extended("nowhere.test:80", "/"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    let authority = format!("ws.test:{}", origin.port());
    let resp = sender
        .send_request(extended(&authority, "/chat?room=1"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The accept answered the relay's own key: checked and kept back.
    assert!(
        resp.headers().get("sec-websocket-accept").is_none(),
        "{:?}",
        resp.headers()
    );
    assert!(
        resp.headers().get("content-length").is_none(),
        "{:?}",
        resp.headers()
    );
    assert_eq!(resp.headers()["via"], "1.1 relay.test (porthole)");
    let mut tunnel = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    porthole_suite::websocket_echo(&mut tunnel).await;
    // The upgrade's access line, written when its tunnel ends: the HTTP
    // path's (status 101, the route, the frames' bytes on top of the heads).
    drop(tunnel);
    let upgraded = || porthole_suite::lines_with(&log, "status=101");
    let written = || async { !upgraded().is_empty() };
    assert!(
        porthole_suite::eventually(Duration::from_secs(5), written).await,
        "no upgrade line in {:?}",
        std::fs::read_to_string(&log)
    );
    porthole_suite::assert_some_line(
        &upgraded(),
        &["method=GET", "/chat?room=1", "route=\"ws.test\""],
    );

    let seen = origin.single();
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("GET", "/chat?room=1")
    );
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert_eq!(seen.header("connection"), Some("upgrade"));
    assert_eq!(seen.header("sec-websocket-version"), Some("13"));
    assert_eq!(seen.header("host"), Some(authority.as_str()));
    let key = seen
        .header("sec-websocket-key")
        .expect("a key for the server");
    let nonce = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap();
    assert_eq!(nonce.len(), 16, "{key}");

    for (path, why) in [
        ("/page", "did not switch protocols (it answered 200 OK)"),
        ("/wrong", "Sec-WebSocket-Accept does not answer the key"),
    ] {
        let resp = sender
            .send_request(extended(&authority, path))
            .await
            .unwrap();
        assert_eq!(resp.status(), 502, "{path}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains(why), "{path}: {body}");
        // Logged as what the client got, once.
        let line = || porthole_suite::lines_with(&log, path);
        let written = || async { !line().is_empty() };
        assert!(
            porthole_suite::eventually(Duration::from_secs(5), written).await,
            "no line for {path} in {:?}",
            std::fs::read_to_string(&log)
        );
        assert_eq!(line().len(), 1, "{:?}", line());
        porthole_suite::assert_some_line(&line(), &["method=GET", "status=502"]);
    }

    // The relay's own endpoints do not switch protocols: 501, one line.
    let resp = sender
        .send_request(extended("relay.test", "/proxy.pac"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 501);
    let line = || porthole_suite::lines_with(&log, "/proxy.pac");
    let written = || async { !line().is_empty() };
    assert!(
        porthole_suite::eventually(Duration::from_secs(5), written).await,
        "{:?}",
        std::fs::read_to_string(&log)
    );
    assert_eq!(line().len(), 1, "{:?}", line());
    porthole_suite::assert_some_line(&line(), &["method=GET", "status=501"]);
}

#[tokio::test]
async fn http10_head_and_keep_alive_with_pooled_upstream() {
    let origin = Origin::ok().await;
    let relay = one_worker_relay_to(&origin, "app-a.test").await;
    let base = format!("http://app-a.test:{}", origin.port());
    // Two requests on one client connection (keep-alive), then separate curls.
    let two = format!("GET {base}/1 HTTP/1.1\r\nHost: a\r\n\r\nGET {base}/2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let answer = raw_exchange(relay.addr, two.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(answer.matches("HTTP/1.1 200 ").count(), 2, "{answer}");
    assert!(answer.ends_with("ok /2"), "{answer}");
    let out = Curl::new(&format!("{base}/3"))
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(out.status, 200);
    assert_eq!(out.text(), "ok /3");
    let out = Curl::new(&format!("{base}/h"))
        .proxy(&relay.url())
        .arg("-I")
        .run()
        .await;
    assert_eq!(out.status, 200);
    assert_eq!(out.header("content-length"), vec!["5"]);
    let out = Curl::new(&format!("{base}/old"))
        .proxy(&relay.url())
        .arg("-0")
        .run()
        .await;
    assert_eq!(out.status, 200);
    assert_eq!(out.text(), "ok /old");
    let all = origin.received();
    assert_eq!(all.len(), 5);
    assert_eq!(all[3].method, "HEAD");
    assert_eq!(all[4].minor, 1, "the relay speaks HTTP/1.1 upstream");
    assert!(all[4]
        .all("via")
        .iter()
        .any(|v| v.starts_with("1.0 relay.test")));
    // Five requests from four client connections over one pooled upstream connection.
    assert_eq!(
        origin.connections(),
        1,
        "upstream connections were not reused"
    );
}

#[tokio::test]
async fn each_worker_pools_its_own_upstream_connections() {
    // Three workers, twelve client connections one after another: each
    // worker dials the server at most once and reuses its connection after.
    let origin = Origin::ok().await;
    let relay = Relay::start(&config_with(
        &route("app-a.test", "127.0.0.1", &[origin.port()], ""),
        "workers = 3",
    ))
    .await;
    for n in 0..12 {
        let out = Curl::new(&format!("http://app-a.test:{}/{n}", origin.port()))
            .proxy(&relay.url())
            .run()
            .await;
        assert_eq!((out.status, out.text()), (200, format!("ok /{n}")));
    }
    assert_eq!(origin.received().len(), 12);
    let dialled = origin.connections();
    assert!(
        (1..=3).contains(&dialled),
        "{dialled} upstream connections for 12 requests on 3 workers"
    );
}

#[tokio::test]
async fn chunked_request_with_trailers_and_expect_continue() {
    let origin = Origin::ok().await;
    let relay = relay_to(&origin, "app-a.test", "").await;
    let url = format!("http://app-a.test:{}/up", origin.port());
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let out = Curl::new(&url)
        .proxy(&relay.url())
        .args(&[
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect: 100-continue",
            "-H",
            "Trailer: X-Sum",
            "--data-binary",
            "@-",
        ])
        .stdin(body.clone())
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert!(
        out.head.starts_with("HTTP/1.1 100 Continue"),
        "curl saw no 100: {}",
        out.head
    );
    let got = origin.single();
    assert_eq!(got.body, body);
    assert_eq!(got.header("transfer-encoding"), Some("chunked"));
    assert_eq!(got.header("expect"), Some("100-continue"));

    // Trailers pass both ways (raw client: curl cannot send request trailers).
    let req = format!(
        "POST http://app-a.test:{}/t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n",
        origin.port()
    );
    let answer = raw_exchange(relay.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let got = &origin.received()[1];
    assert_eq!(got.body, b"hello");
    assert_eq!(got.trailers, "X-Sum: 42\r\n");
}

#[tokio::test]
async fn unsolicited_interim_responses_reach_http11_clients_only() {
    // The server sends `100 Continue` to a request that did not ask for one,
    // then `102 Processing`, then its answer: a proxy forwards every 1xx it
    // did not ask for itself (RFC 9110 15.2), but none to an HTTP/1.0 client.
    let origin = Origin::start(|_| {
        let mut out = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n".to_vec();
        out.extend(response(200, &[], b"final"));
        Reply::Raw(out)
    })
    .await;
    let relay = relay_to(&origin, "app-a.test", "").await;
    let request = |minor: u8| {
        format!(
            "GET http://app-a.test:{}/ HTTP/1.{minor}\r\nHost: app-a.test\r\nConnection: close\r\n\r\n",
            origin.port()
        )
    };

    let answer = raw_exchange(relay.addr, request(1).as_bytes(), Duration::from_secs(5)).await;
    let heads: Vec<&str> = answer
        .split("\r\n\r\n")
        .map(|head| head.lines().next().unwrap_or(""))
        .collect();
    assert_eq!(
        heads[..3],
        [
            "HTTP/1.1 100 Continue",
            "HTTP/1.1 102 Processing",
            "HTTP/1.1 200 X"
        ],
        "{answer}"
    );
    assert!(answer.ends_with("\r\n\r\nfinal"), "{answer}");

    let answer = raw_exchange(relay.addr, request(0).as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200 X\r\n"), "{answer}");
    assert!(
        !answer.contains("HTTP/1.1 1"),
        "an interim response: {answer}"
    );
    assert!(answer.ends_with("\r\n\r\nfinal"), "{answer}");
}

#[tokio::test]
async fn early_hints_before_the_continue_do_not_hold_back_the_body() {
    // A server that sends `103 Early Hints` before its `100 Continue`, then
    // reads the body and answers with it.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let head = read_until(&mut s, b"\r\n\r\n").await;
        assert!(head.contains("Expect: 100-continue"), "{head}");
        s.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        let mut body = [0u8; 5];
        s.read_exact(&mut body).await.unwrap();
        s.write_all(&response(200, &[], &body)).await.unwrap();
    });
    let relay = relay_to_port(port, "app-a.test", "response_timeout = \"3s\"").await;
    let mut client = TcpStream::connect(relay.addr).await.unwrap();
    let head = format!(
        "POST http://app-a.test:{port}/ HTTP/1.1\r\nHost: app-a.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    );
    client.write_all(head.as_bytes()).await.unwrap();
    // Like curl, the body waits for the `100`.
    let interim = read_until(&mut client, b"100 Continue").await;
    assert!(
        interim.starts_with("HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"),
        "{interim}"
    );
    client.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut rest))
        .await
        .expect("an answer")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("HTTP/1.1 200 X\r\n"), "{interim}{rest}");
    assert!(rest.ends_with("\r\n\r\nhello"), "{interim}{rest}");
}

/// An upload that takes longer than the route's `response_timeout` is not a
/// `504`: the server's time to answer counts from the end of the request
/// (audit 3: a slow upload the server took and answered got `504`).
#[tokio::test]
async fn an_upload_slower_than_the_response_timeout_gets_the_answer() {
    let origin = Origin::ok().await;
    let relay = relay_to(&origin, "app-a.test", "response_timeout = \"1s\"").await;
    let mut client = TcpStream::connect(relay.addr).await.unwrap();
    let head = format!(
        "POST http://app-a.test:{}/slow HTTP/1.1\r\nHost: app-a.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        origin.port()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    for _ in 0..6 {
        client.write_all(b"5\r\nabcde\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    client.write_all(b"0\r\n\r\n").await.unwrap();
    let answer = read_until(&mut client, b"ok /slow").await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert_eq!(origin.single().body, b"abcde".repeat(6));
}

/// A stalled body ends, in each direction (audit 3: nothing timed out a
/// body): a client's upload stalled past `limits.body_timeout` gets `408`
/// and the close; a server pausing its response body past its
/// `response_timeout` and a client not reading a response past
/// `body_timeout` close the connections.
#[tokio::test]
async fn stalled_bodies_end_after_their_timeouts() {
    // The server answers `/pause` with 100 of 1000 bytes, then nothing; and
    // `/big` with 64 MiB, noting when its writing failed.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    let (cut_tx, mut cut_rx) = tokio::sync::mpsc::unbounded_channel::<std::time::Instant>();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = server.accept().await else {
                return;
            };
            let cut_tx = cut_tx.clone();
            tokio::spawn(async move {
                let head = read_until(&mut s, b"\r\n\r\n").await;
                if head.contains("/deaf") {
                    // Takes no byte of the body.
                    tokio::time::sleep(Duration::from_secs(30)).await;
                } else if head.contains("/pause") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                        .await;
                    let _ = s.write_all(&[b'x'; 100]).await;
                    let mut sink = [0u8; 64];
                    let _ = s.read(&mut sink).await; // until the relay closes
                } else {
                    let len = 64 << 20;
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                    let _ = s.write_all(head.as_bytes()).await;
                    let chunk = vec![b'y'; 1 << 20];
                    for _ in 0..64 {
                        if s.write_all(&chunk).await.is_err() {
                            let _ = cut_tx.send(std::time::Instant::now());
                            return;
                        }
                    }
                }
            });
        }
    });
    let relay = Relay::start(&config_with(
        &route(
            "app-a.test",
            "127.0.0.1",
            &[port],
            "response_timeout = \"1s\"",
        ),
        "[limits]\nbody_timeout = \"1s\"\n",
    ))
    .await;

    // The client's upload stalls: 408, and the connection closes.
    let start = std::time::Instant::now();
    let answer = raw_exchange(
        relay.addr,
        format!("POST http://app-a.test:{port}/up HTTP/1.1\r\nHost: app-a.test\r\nContent-Length: 100\r\n\r\n0123456789").as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("request body stalled"), "{answer}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // The server takes no byte of a large upload: 504 naming it.
    let start = std::time::Instant::now();
    let answer = upload_while_reading(
        relay.addr,
        &format!("http://app-a.test:{port}/deaf"),
        256 << 20,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 504 "), "{answer}");
    assert!(
        answer.contains("took no byte of the request body"),
        "{answer}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // The server pauses its body: the client connection closes after 100 bytes.
    let start = std::time::Instant::now();
    let answer = raw_exchange(
        relay.addr,
        format!("GET http://app-a.test:{port}/pause HTTP/1.1\r\nHost: app-a.test\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.ends_with(&"x".repeat(100)), "{answer}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    // The client reads nothing of a large response: the relay gives up on
    // it, and the server's writing fails.
    let mut idle = TcpStream::connect(relay.addr).await.unwrap();
    let request = format!("GET http://app-a.test:{port}/big HTTP/1.1\r\nHost: app-a.test\r\n\r\n");
    idle.write_all(request.as_bytes()).await.unwrap();
    let cut = tokio::time::timeout(Duration::from_secs(10), cut_rx.recv())
        .await
        .expect("the server's writing never failed: the relay kept the stalled response");
    assert!(cut.is_some());
}

/// An HTTP/1.0 request's `Upgrade` is ignored (RFC 9110 7.8): the server
/// never sees it, and the client gets the ordinary answer, not a `101`
/// (audit 3).
#[tokio::test]
async fn an_http10_upgrade_is_ignored() {
    let origin = Origin::ok().await;
    let relay = relay_to(&origin, "app-a.test", "").await;
    let request = format!(
        "GET http://app-a.test:{}/ws HTTP/1.0\r\nHost: app-a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        origin.port()
    );
    let answer = raw_exchange(relay.addr, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.ends_with("ok /ws"), "{answer}");
    let got = origin.single();
    assert_eq!(got.header("upgrade"), None, "{}", got.raw_head);
}

/// `Expect: 100-continue` does not hold back a body the client sent without
/// waiting, nor an HTTP/1.0 request's (whose expectation is ignored, RFC
/// 9110 10.1.1): the relay's wait for a `100` (up to 1 s) is for clients
/// that wait themselves (audit 3: every such request took 1 s more).
#[tokio::test]
async fn expect_continue_does_not_hold_a_body_already_sent() {
    // A server that never sends `100`: it reads a head and 5 bytes of
    // body, and answers with the body.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = server.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut got = Vec::new();
                    let mut byte = [0u8; 1];
                    while !got.ends_with(b"\r\n\r\n") {
                        if s.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        got.push(byte[0]);
                    }
                    let mut body = [0u8; 5];
                    if s.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let _ = s.write_all(&response(200, &[], &body)).await;
                }
            });
        }
    });
    let relay = relay_to_port(port, "app-a.test", "").await;
    for version in ["1.1", "1.0"] {
        let request = format!(
            "POST http://app-a.test:{port}/e HTTP/{version}\r\nHost: app-a.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\nhello"
        );
        let start = std::time::Instant::now();
        let answer = raw_exchange(relay.addr, request.as_bytes(), Duration::from_secs(5)).await;
        let took = start.elapsed();
        assert!(answer.contains(" 200 "), "{answer}");
        assert!(answer.ends_with("hello"), "{answer}");
        assert!(
            took < Duration::from_millis(900),
            "HTTP/{version}: held {took:?}"
        );
    }
}

/// A server that answers before taking the whole body (a `413`) and closes
/// at once: the client gets that answer, not a `502` for the reset its
/// close caused (audit 3), and the connection closes after it.
#[tokio::test]
async fn an_early_answer_from_a_server_that_stopped_reading_reaches_the_client() {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = server.accept().await {
            read_until(&mut s, b"\r\n\r\n").await;
            let _ = s
                .write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
                .await;
            drop(s); // unread body bytes: the close is a reset
        }
    });
    let relay = relay_to_port(port, "app-a.test", "").await;
    let answer =
        upload_while_reading(relay.addr, &format!("http://app-a.test:{port}/up"), 8 << 20).await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.ends_with("too large"), "{answer}");
}

/// A route may name an IPv6 literal (`[::1]` or `::1`): requests for it, in
/// any spelling of the address, are routed by it (audit 3: such a route was
/// refused by the configuration check and no IPv6 target could be routed).
#[tokio::test]
async fn an_ipv6_literal_route_takes_requests_in_any_spelling() {
    let origin = Origin::ok().await;
    let relay = Relay::start(&config_with(
        &route("[::1]", "127.0.0.1", &[origin.port()], ""),
        "",
    ))
    .await;
    let port = origin.port();
    for url in [
        format!("http://[::1]:{port}/short"),
        format!("http://[0:0:0:0:0:0:0:1]:{port}/long"),
    ] {
        let out = Curl::new(&url).proxy(&relay.url()).run().await;
        assert_eq!(out.status, 200, "{url}: {out:?}");
        assert!(out.text().starts_with("ok /"), "{url}: {out:?}");
    }
    let out = Curl::new(&format!("http://[::1]:{port}/tunnel"))
        .proxy(&relay.url())
        .arg("-p")
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /tunnel");
    let out = Curl::new(&format!("http://[::2]:{port}/"))
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(out.status, 403, "{out:?}");
    assert!(
        out.text().contains("no route for host ::2"),
        "{}",
        out.text()
    );
}

/// PUTs `length` bytes to `url` through the relay at `relay` while reading
/// its answer (until it closes, 10 s at most): what came back, as text.
async fn upload_while_reading(relay: std::net::SocketAddr, url: &str, length: usize) -> String {
    let (mut read, mut write) = TcpStream::connect(relay).await.unwrap().into_split();
    let head =
        format!("PUT {url} HTTP/1.1\r\nHost: app-a.test\r\nContent-Length: {length}\r\n\r\n");
    let upload = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        let chunk = vec![b'u'; 64 << 10];
        for _ in 0..length / chunk.len() {
            write.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), read.read_to_end(&mut answer)).await;
    upload.abort();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Reads from `s` until `end` has arrived; what came, as text.
async fn read_until(s: &mut TcpStream, end: &[u8]) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(end.len()).any(|w| w == end) {
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        let n = match read {
            Ok(Ok(n)) if n > 0 => n,
            _ => panic!(
                "no {:?} within 10 s or before the close: {}",
                String::from_utf8_lossy(end),
                String::from_utf8_lossy(&got)
            ),
        };
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

async fn relay_to_port(port: u16, host: &str, extra: &str) -> Relay {
    Relay::start(&config_with(&route(host, "127.0.0.1", &[port], extra), "")).await
}

#[tokio::test]
async fn folded_fields_and_space_before_the_colon_are_refused_each_with_its_reason() {
    let origin = Origin::ok().await;
    let relay = relay_to(&origin, "app-a.test", "").await;
    let p = origin.port();
    let cases = [
        (
            format!(
                "GET http://app-a.test:{p}/ HTTP/1.1\r\nHost: a\r\nX-Long: one\r\n two\r\n\r\n"
            ),
            "obsolete line folding is not accepted (RFC 9112 5.2)",
        ),
        (
            format!("GET http://app-a.test:{p}/ HTTP/1.1\r\nHost : a\r\n\r\n"),
            "whitespace between a field name and the colon (RFC 9112 5.1)",
        ),
        (
            format!("GET http://app-a.test:{p}/ HTTP/1.1\r\nBad Name: x\r\n\r\n"),
            "invalid header name",
        ),
    ];
    for (req, why) in cases {
        let answer = raw_exchange(relay.addr, req.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{req:?} -> {answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(body.contains(why), "{req:?} -> {answer}");
    }
    assert!(origin.received().is_empty(), "{:?}", origin.received());
}

#[tokio::test]
async fn a_head_at_max_headers_passes_two_chained_relays_with_that_limit() {
    // Both relays allow 20 fields; the client's request has exactly 20, one
    // of them a `Via`. Each relay appends its entry to that line instead of
    // adding a line, so the next hop sees 20 fields too, not 21.
    let origin = Origin::ok().await;
    let limits = "[limits]\nmax_headers = 20\n";
    let hop = Relay::start(&format!(
        "[relay]\nlisten = \"127.0.0.1:0\"\nname = \"hop.test\"\n{limits}{}",
        route("app-a.test", "127.0.0.1", &[origin.port()], ""),
    ))
    .await;
    let front = Relay::start(&config_with(
        &format!(
            "[[route]]\nhost = \"app-a.test\"\nvia = \"{}\"\nports = [{}]\n",
            hop.addr,
            origin.port()
        ),
        limits,
    ))
    .await;
    let mut head = format!(
        "GET http://app-a.test:{}/twenty HTTP/1.1\r\nHost: app-a.test:{}\r\nVia: 1.1 client-proxy.test\r\n",
        origin.port(),
        origin.port()
    );
    for n in 0..18 {
        head.push_str(&format!("X-Field-{n}: {n}\r\n"));
    }
    head.push_str("\r\n");
    let mut client = TcpStream::connect(front.addr).await.unwrap();
    client.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until(&mut client, b"ok /twenty").await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");

    let seen = origin.single();
    assert_eq!(seen.headers.len(), 20, "{}", seen.raw_head);
    assert_eq!(
        seen.all("via"),
        vec!["1.1 client-proxy.test, 1.1 relay.test (porthole), 1.1 hop.test (porthole)"]
    );
    // The response's `Via` gets the same treatment: one line, each hop's entry.
    assert!(
        answer.contains("\r\nVia: 1.1 hop.test (porthole), 1.1 relay.test (porthole)\r\n"),
        "{answer}"
    );
}

/// Through a next hop, the server gets the Host the client asked for: the
/// front relay wrote `http://app.test:80/x` to the hop, which made it
/// `Host: app.test:80` (strict virtual hosts and signatures over Host break).
#[tokio::test]
async fn a_chained_route_keeps_the_host_the_client_asked_for() {
    let origin = Origin::ok().await;
    let hop = Relay::start(&format!(
        "[relay]\nlisten = \"127.0.0.1:0\"\nname = \"hop.test\"\n[[route]]\nhost = \"app.test\"\nto = \"127.0.0.1:{}\"\nports = [80, 8080]\n",
        origin.port()
    ))
    .await;
    let front = Relay::start(&config_with(
        &format!(
            "[[route]]\nhost = \"app.test\"\nvia = \"{}\"\nports = [80, 8080]\n",
            hop.addr
        ),
        "",
    ))
    .await;
    for (url, host) in [
        ("http://app.test/x", "app.test"),
        ("http://app.test:8080/y", "app.test:8080"),
    ] {
        let out = Curl::new(url).proxy(&front.url()).run().await;
        assert_eq!(out.status, 200, "{url}: {out:?}");
        let seen = origin.received().pop().expect("a request at the server");
        assert_eq!(seen.header("host"), Some(host), "{url}: {}", seen.raw_head);
    }
}

#[tokio::test]
async fn chunked_and_close_delimited_responses() {
    let origin = Origin::start(|r| match r.target.as_str() {
        "/chunked" => Reply::Raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n4\r\nabcd\r\n3\r\nefg\r\n0\r\nX-T: done\r\n\r\n".to_vec()),
        _ => Reply::RawThenClose(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end".to_vec()),
    })
    .await;
    let relay = relay_to(&origin, "app-a.test", "").await;
    let base = format!("http://app-a.test:{}", origin.port());
    let out = Curl::new(&format!("{base}/chunked"))
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(out.text(), "abcdefg");
    assert_eq!(out.header("transfer-encoding"), vec!["chunked"]);
    let out = Curl::new(&format!("{base}/close"))
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(out.status, 200);
    assert_eq!(out.text(), "until the end");
    let out = Curl::new(&format!("{base}/close"))
        .proxy(&relay.url())
        .arg("-0")
        .run()
        .await;
    assert_eq!(out.text(), "until the end");

    // Trailers reach an HTTP/1.1 client.
    let req = format!("GET {base}/chunked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let answer = raw_exchange(relay.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.ends_with("0\r\nX-T: done\r\n\r\n"), "{answer:?}");
}

#[tokio::test]
async fn errors_name_the_route_and_the_cause() {
    let origin = Origin::start(|r| match r.target.as_str() {
        "/slow" => Reply::Silent,
        // A transfer coding the relay would pass on unlabelled.
        "/gzip-coded" => Reply::RawThenClose(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nnot really gzip".to_vec(),
        ),
        "/status-099" => Reply::Raw(b"HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nok".to_vec()),
        "/no-status-line" => Reply::RawThenClose(b"HTTP/1.1 OK\r\n\r\n".to_vec()),
        _ => Reply::Raw(response(200, &[], b"ok")),
    })
    .await;
    let dead = porthole_suite::free_port();
    let routes = [
        route(
            "app-a.test",
            "127.0.0.1",
            &[origin.port()],
            "response_timeout = \"300ms\"",
        ),
        route("dead.test", "127.0.0.1", &[dead], ""),
        route(
            "nowhere.test",
            "no-such-host.invalid",
            &[80],
            "connect_timeout = \"2s\"",
        ),
    ]
    .concat();
    let relay = Relay::start(&config_with(&routes, "")).await;
    let cases = [
        (
            format!("http://other.test:{}/", origin.port()),
            403,
            "no route for host other.test",
        ),
        (
            "http://app-a.test:22/".to_string(),
            403,
            "route app-a.test: port 22 is not allowed",
        ),
        (
            format!("http://dead.test:{dead}/"),
            502,
            "route dead.test: connect to 127.0.0.1",
        ),
        (
            "http://nowhere.test/".to_string(),
            502,
            "route nowhere.test",
        ),
        (
            format!("http://app-a.test:{}/slow", origin.port()),
            504,
            "route app-a.test: no response from",
        ),
        (
            format!("http://app-a.test:{}/gzip-coded", origin.port()),
            502,
            "a transfer coding other than chunked",
        ),
        (
            format!("http://app-a.test:{}/status-099", origin.port()),
            502,
            "status code outside 100-599",
        ),
        (
            format!("http://app-a.test:{}/no-status-line", origin.port()),
            502,
            "malformed status line or header",
        ),
    ];
    for (url, status, text) in cases {
        let out = Curl::new(&url).proxy(&relay.url()).run().await;
        assert_eq!(out.status, status, "{url}: {out:?}");
        assert!(
            out.text().contains(text),
            "{url}: body {:?} lacks {text:?}",
            out.text()
        );
    }
    // A request that already passed through this relay is a loop.
    let url = format!("http://app-a.test:{}/", origin.port());
    let out = Curl::new(&url)
        .proxy(&relay.url())
        .header("Via: 1.1 relay.test (porthole)")
        .run()
        .await;
    assert_eq!(out.status, 508);
    // The relay's own name with no such endpoint.
    let out = Curl::new("http://relay.test/nothing")
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(out.status, 404);
    // Still serving after all that.
    let out = Curl::new(&url).proxy(&relay.url()).run().await;
    assert_eq!(out.status, 200);
}

#[tokio::test]
async fn bad_framing_and_oversized_heads_are_refused_and_the_relay_keeps_serving() {
    let origin = Origin::ok().await;
    let relay = Relay::start(&config_with(
        &route("app-a.test", "127.0.0.1", &[origin.port()], ""),
        "[limits]\nmax_head_bytes = 4096\nmax_headers = 20\nhead_timeout = \"1s\"\n",
    ))
    .await;
    let p = origin.port();
    let t = Duration::from_secs(5);
    let cases: Vec<(String, &str)> = vec![
        (format!("POST http://app-a.test:{p}/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), "400"),
        (format!("POST http://app-a.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), "400"),
        (format!("GET http://app-a.test:{p}/ HTTP/1.1\r\nBad Name: x\r\n\r\n"), "400"),
        (format!("GET http://app-a.test:{p}/ HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(5000)), "431"),
        (format!("GET http://app-a.test:{p}/ HTTP/1.1\r\n{}\r\n", "X: y\r\n".repeat(30)), "431"),
        // A transfer coding the relay does not handle (RFC 9112 6.1).
        (format!("POST http://app-a.test:{p}/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"), "501"),
        // The request line alone passes the limit: the target is too long.
        (format!("GET http://app-a.test:{p}/{} HTTP/1.1\r\n\r\n", "a".repeat(5000)), "414"),
    ];
    for (req, status) in cases {
        let answer = raw_exchange(relay.addr, req.as_bytes(), t).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{req:?} -> {answer:?}"
        );
        assert!(answer.contains("Connection: close"), "{answer}");
    }
    // A smuggling attempt must never reach the server.
    assert!(origin.received().is_empty(), "{:?}", origin.received());

    // Slowloris: a head that never completes gets 408 after head_timeout.
    let mut slow = TcpStream::connect(relay.addr).await.unwrap();
    slow.write_all(b"GET http://app-a.test/ HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), slow.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");

    let out = Curl::new(&format!("http://app-a.test:{p}/fine"))
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(out.status, 200);
}

#[tokio::test]
async fn drain_lets_an_open_request_finish() {
    // The server answers after a delay; shutdown starts meanwhile.
    let origin = Origin::start(|_| Reply::Generated { len: 8 << 20 }).await;
    let relay = relay_to(&origin, "app-a.test", "").await;
    let url = format!("http://app-a.test:{}/big", origin.port());
    let proxy = relay.url();
    let download = tokio::spawn(async move {
        Curl::new(&url)
            .proxy(&proxy)
            .args(&["--limit-rate", "8M"])
            .run()
            .await
    });
    // Wait until the request is in flight.
    while origin.received().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let addr = relay.addr;
    relay.shutdown().await;
    let out = download.await.unwrap();
    assert_eq!(out.status, 200);
    assert_eq!(out.body.len(), 8 << 20, "the in-flight download was cut");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}

/// A request the drain timeout cuts before its answer is logged `503` (the
/// relay stopped serving it), not `499`, which says its client gave up
/// (audit 4 L1).
#[tokio::test]
async fn a_request_the_drain_timeout_cuts_is_logged_503() {
    let origin = Origin::start(|_| Reply::Silent).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let relay = Relay::start(&format!(
        "[relay]\nlisten = \"127.0.0.1:0\"\nname = \"relay.test\"\ndrain_timeout = \"500ms\"\n[log]\naccess = \"{}\"\n{}",
        log.display(),
        route("app-a.test", "127.0.0.1", &[origin.port()], "")
    ))
    .await;
    let url = format!("http://app-a.test:{}/never", origin.port());
    let proxy = relay.url();
    let waiting = tokio::spawn(async move { Curl::new(&url).proxy(&proxy).run().await });
    while origin.received().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.shutdown().await;
    let out = waiting.await.unwrap();
    assert_ne!(out.status, 200, "{out:?}");
    let lines = porthole_suite::lines_with(&log, "/never");
    porthole_suite::assert_some_line(&lines, &["status=503", "route=\"app-a.test\""]);
}

/// A body of this many bytes, every byte different from its neighbours, so a
/// lost, repeated or reordered piece shows.
fn patterned(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn large_bodies_both_ways_arrive_byte_exact_and_the_server_connection_is_reused() {
    // Past the size from which plain TCP bodies are spliced, and not a
    // multiple of any buffer or pipe size.
    let body = patterned((3 << 20) + 7);
    let reply = response(200, &[("Content-Type", "application/octet-stream")], &body);
    let origin = Origin::start(move |_| Reply::Raw(reply.clone())).await;
    let relay = one_worker_relay_to(&origin, "app-a.test").await;
    for n in 0..2 {
        let out = Curl::new(&format!("http://app-a.test:{}/big{n}", origin.port()))
            .proxy(&relay.url())
            .run()
            .await;
        assert_eq!(out.status, 200, "{}", out.stderr);
        assert_eq!(out.exit, 0, "{}", out.stderr);
        assert!(
            out.body == body,
            "body {n} differs ({} bytes)",
            out.body.len()
        );
    }
    // And a large upload of known length, on the same server connection.
    let upload = patterned((1 << 20) + 3);
    let out = Curl::new(&format!("http://app-a.test:{}/up", origin.port()))
        .proxy(&relay.url())
        .args(&["--data-binary", "@-"])
        .stdin(upload.clone())
        .discard_body()
        .run()
        .await;
    assert_eq!(out.status, 200, "{}", out.stderr);
    let received = origin.received();
    assert_eq!(received.len(), 3);
    assert!(
        received[2].body == upload,
        "upload differs ({} bytes)",
        received[2].body.len()
    );
    assert_eq!(
        origin.connections(),
        1,
        "the server connection was not reused after a large body"
    );
}

#[tokio::test]
async fn a_large_body_cut_short_by_the_server_closes_the_client_connection() {
    let mut cut = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 1 << 20).into_bytes();
    cut.extend_from_slice(&patterned(300 << 10));
    let origin = Origin::start(move |r| {
        if r.target.ends_with("/cut") {
            Reply::RawThenClose(cut.clone())
        } else {
            Reply::Raw(response(200, &[], b"fine"))
        }
    })
    .await;
    let relay = relay_to(&origin, "app-a.test", "").await;
    let out = Curl::new(&format!("http://app-a.test:{}/cut", origin.port()))
        .proxy(&relay.url())
        .max_time(10)
        .run()
        .await;
    assert_eq!(out.status, 200);
    // 18: "partial file" — the relay closed instead of leaving curl waiting.
    assert_eq!(out.exit, 18, "{}", out.stderr);
    assert_eq!(out.body.len(), 300 << 10);
    let out = Curl::new(&format!("http://app-a.test:{}/after", origin.port()))
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!((out.status, out.text()), (200, "fine".to_string()));
}

/// An HTTP/2 connection with no stream open is closed (GOAWAY) after
/// `limits.idle_timeout`, as an idle HTTP/1 keep-alive connection is; a
/// stream in use (here a tunnel with keystrokes) keeps it open.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_and_one_in_use_is_not() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let echo = EchoServer::start().await;
    let relay = Relay::start(&config_with(
        &route("echo.test", "127.0.0.1", &[echo.port()], ""),
        "[limits]\nidle_timeout = \"1s\"\n",
    ))
    .await;
    let io = TokioIo::new(TcpStream::connect(relay.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);

    let get = http::Request::get("http://nowhere.test/")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(get).await.unwrap();
    assert_eq!(resp.status(), 403);
    resp.into_body().collect().await.unwrap();

    let connect = http::Request::connect(format!("echo.test:{}", echo.port()))
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(connect).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut tunnel = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    for key in b"abcdefgh" {
        tunnel.write_all(&[*key]).await.unwrap();
        let mut back = [0u8; 1];
        tunnel.read_exact(&mut back).await.unwrap();
        assert_eq!(back[0], *key);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Still open for new streams (no GOAWAY was sent while the tunnel ran).
    let get = http::Request::get("http://nowhere.test/")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(get).await;
    assert!(
        matches!(&resp, Ok(r) if r.status() == 403),
        "a new stream after 2.4 s with a tunnel open (1 s idle timeout): {resp:?}"
    );
    drop(resp);

    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"bye\n");
    let idle_from = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        matches!(closed, Ok(Ok(Ok(())))),
        "not closed 5 s after its last stream: {closed:?}"
    );
    assert!(
        idle_from.elapsed() >= Duration::from_millis(800),
        "closed {:?} after its last stream, before the idle timeout",
        idle_from.elapsed()
    );
    // The client kept its side open all along: the relay closed it.
    drop(sender);
}

/// A keep-alive connection quiet for longer than `limits.head_timeout` has
/// let its read buffer go (it then waits for one byte at a time): its next
/// request is still served on it, and the idle timeout still closes it.
#[tokio::test]
async fn a_keep_alive_connection_quiet_past_the_head_timeout_still_serves_and_idles_out() {
    let origin = Origin::ok().await;
    let relay = Relay::start(&config_with(
        &route("app.test", "127.0.0.1", &[origin.port()], ""),
        "[limits]\nhead_timeout = \"300ms\"\nidle_timeout = \"2s\"\n",
    ))
    .await;
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    let req = |path: &str| {
        format!(
            "GET http://app.test:{}{path} HTTP/1.1\r\nHost: app.test\r\n\r\n",
            origin.port()
        )
    };
    let mut buf = vec![0u8; 4096];
    for (path, quiet) in [("/one", 0), ("/two", 700), ("/three", 1200)] {
        tokio::time::sleep(Duration::from_millis(quiet)).await;
        s.write_all(req(path).as_bytes()).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        assert!(answer.ends_with(&format!("ok {path}")), "{path}: {answer}");
    }
    // Then silence: closed at the idle timeout (2 s), not at the head timeout.
    let quiet = std::time::Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf))
        .await
        .expect("closed within 6 s")
        .unwrap();
    assert_eq!(n, 0, "closed, not answered");
    assert!(
        quiet.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}",
        quiet.elapsed()
    );
    assert_eq!(origin.received().len(), 3);
}

/// A tunnel and a download still open when the drain timeout ends them
/// have their access lines too, with the status sent and the bytes moved
/// (one line per request or tunnel).
#[tokio::test]
async fn a_tunnel_and_a_download_cut_by_the_drain_timeout_are_logged() {
    let echo = EchoServer::start().await;
    let origin = Origin::start(|_| Reply::Generated { len: 64 << 20 }).await;
    let dir = std::env::temp_dir().join(format!("porthole-core-cut-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    let relay = Relay::start(&format!(
        "[relay]\nlisten = \"127.0.0.1:0\"\nname = \"relay.test\"\ndrain_timeout = \"1s\"\n[log]\naccess = \"{}\"\n{}",
        log.display(),
        route("db.test", "127.0.0.1", &[echo.port()], "")
            + &route("app-a.test", "127.0.0.1", &[origin.port()], "")
    ))
    .await;
    let url = format!("http://app-a.test:{}/big", origin.port());
    let proxy = relay.url();
    let download = tokio::spawn(async move {
        Curl::new(&url)
            .proxy(&proxy)
            .args(&["--limit-rate", "1M"])
            .discard_body()
            .run()
            .await
    });
    while origin.received().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut s, head) = connect_via(relay.addr, &format!("db.test:{}", echo.port())).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");

    relay.shutdown().await;
    let cut = download.await.unwrap();
    assert!(cut.size_download < 64 << 20, "{cut:?}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the tunnel outlived the relay");
    let lines = || porthole_suite::lines_with(&log, "method=CONNECT");
    let written = || async { !lines().is_empty() };
    assert!(
        porthole_suite::eventually(Duration::from_secs(5), written).await,
        "no line for the cut tunnel in {:?}",
        std::fs::read_to_string(&log)
    );
    // The heads count too: connect_via's CONNECT, the relay's 200.
    let target = format!("db.test:{}", echo.port());
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let answer = "HTTP/1.1 200 Connection established\r\n\r\n";
    porthole_suite::assert_some_line(
        &lines(),
        &[
            "status=200",
            "route=\"db.test\"",
            &format!("bytes_in={} ", request.len() + 4),
            &format!("bytes_out={} ", answer.len() + 4),
        ],
    );
    let got = porthole_suite::lines_with(&log, "method=GET");
    porthole_suite::assert_some_line(&got, &["/big", "status=200", "route=\"app-a.test\""]);
    let bytes_out: u64 = got[0]
        .split_whitespace()
        .find_map(|f| f.strip_prefix("bytes_out="))
        .and_then(|n| n.parse().ok())
        .expect("bytes_out");
    assert!(bytes_out > 0 && bytes_out < 64 << 20, "{got:?}");
}

/// CONNECT-UDP (RFC 9298): datagrams to a routed UDP server and back, as
/// capsules, over HTTP/1.1 and over HTTP/2 (extended CONNECT); unknown
/// capsules are skipped; an unrouted target is 403; one access line per
/// session.
#[tokio::test]
async fn udp_datagrams_through_connect_udp_over_http1_and_http2() {
    use porthole_relay::udp::datagram_capsule;
    use porthole_suite::{connect_udp, next_datagram, UdpEcho};
    let udp_echo = UdpEcho::start().await;
    let uport = udp_echo.port();
    let dir = std::env::temp_dir().join(format!("porthole-core-udp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    let relay = Relay::start(&config_with(
        &(route("dns.test", "127.0.0.1", &[uport], "udp = true")
            + &route("tcp.test", "127.0.0.1", &[uport], "")),
        &format!("[log]\naccess = \"{}\"\n", log.display()),
    ))
    .await;
    let path = format!("/.well-known/masque/udp/dns.test/{uport}/");

    let (mut s, head) = connect_udp(relay.addr, &format!("dns.test:{uport}")).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("Capsule-Protocol: ?1"), "{head}");
    assert!(head.contains("Upgrade: connect-udp"), "{head}");
    let mut buf = Vec::new();
    porthole_suite::echo_datagrams(&mut s, &mut buf, &[&b"one"[..], b"two"]).await;
    // An unknown capsule type is skipped; the session goes on.
    s.write_all(&[0x17, 2, 1, 2]).await.unwrap();
    s.write_all(&datagram_capsule(b"three")).await.unwrap();
    assert_eq!(next_datagram(&mut s, &mut buf).await, b"echo:three");
    drop(s);

    let mut sender = porthole_suite::h2c(relay.addr).await;
    let req = porthole_suite::connect_udp_h2(&format!("http://relay.test{path}"));
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["capsule-protocol"], "?1");
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(&datagram_capsule(b"over h2")).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(next_datagram(&mut io, &mut buf).await, b"echo:over h2");
    drop(io);

    let refused = b"GET /.well-known/masque/udp/other.test/53/ HTTP/1.1\r\nHost: relay.test\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n\r\n";
    let answer = raw_exchange(relay.addr, refused, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    // UDP is not implied by a route's TCP ports: `udp = true` allows it.
    let (_, head) = connect_udp(relay.addr, &format!("tcp.test:{uport}")).await;
    assert!(head.starts_with("HTTP/1.1 403 "), "{head}");

    let sessions = || porthole_suite::lines_with(&log, "status=101");
    let written = || async { sessions().len() == 2 };
    assert!(
        porthole_suite::eventually(Duration::from_secs(5), written).await,
        "{:?}",
        std::fs::read_to_string(&log)
    );
    porthole_suite::assert_some_line(
        &sessions(),
        &["method=GET", "route=\"dns.test\"", "masque/udp/dns.test"],
    );
}

/// A refusal with a request body the relay did not read still reaches the
/// client: the relay closes gracefully (its side first, then reads and drops
/// what the client still sends), so the client gets the 403, not a reset.
#[tokio::test]
async fn an_error_page_survives_an_unread_request_body() {
    let origin = Origin::ok().await;
    let relay = relay_to(&origin, "app-a.test", "").await;
    for _ in 0..5 {
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        let body = vec![b'x'; 32 * 1024];
        let mut req = format!(
            "POST http://nowhere.test/upload HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        s.write_all(&req).await.unwrap();
        let mut back = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back)).await;
        let read = read.expect("closed within 5 s");
        assert!(
            read.is_ok(),
            "{read:?} after {:?}",
            String::from_utf8_lossy(&back)
        );
        let back = String::from_utf8_lossy(&back);
        assert!(back.starts_with("HTTP/1.1 403 "), "{back}");
    }
}

/// A server that answers the first request on each connection ("conn N"),
/// then reads the next one and closes without an answer, as a server closes
/// an idle keep-alive connection just as a request arrives. It records every
/// request line it read.
async fn answer_once_per_connection() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            n += 1;
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for answer in [true, false] {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        let mut b = [0u8; 1024];
                        match s.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&b[..k]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    log.lock()
                        .unwrap()
                        .push(head.lines().next().unwrap_or("").to_string());
                    if answer {
                        let body = format!("conn {n}");
                        let out = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        s.write_all(out.as_bytes()).await.unwrap();
                    }
                }
            });
        }
    });
    (port, seen)
}

/// A pooled upstream connection that closes under the next request: a
/// bodyless idempotent request is sent again on a fresh connection (the
/// client never sees the close); a POST is not, since the server may have
/// acted on it (RFC 9112 9.3.1): `502`, and the server saw it once.
#[tokio::test]
async fn only_idempotent_requests_are_resent_after_a_pooled_connection_closes() {
    let (port, seen) = answer_once_per_connection().await;
    // One worker: one pool, whichever connection curl's request arrives on.
    let relay = Relay::start(&config_with(
        &route("app.test", "127.0.0.1", &[port], ""),
        "workers = 1",
    ))
    .await;
    let get = |path: &str| Curl::new(&format!("http://app.test:{port}{path}")).proxy(&relay.url());

    let out = get("/a").run().await;
    assert_eq!(
        (out.status, out.text().as_str()),
        (200, "conn 1"),
        "{out:?}"
    );
    // The POST goes down connection 1, which closes under it.
    let out = get("/p").args(&["-X", "POST"]).run().await;
    assert_eq!(out.status, 502, "{out:?}");
    let out = get("/b").run().await;
    assert_eq!(
        (out.status, out.text().as_str()),
        (200, "conn 2"),
        "{out:?}"
    );
    // The GET goes down connection 2, which closes under it: sent again on 3.
    let out = get("/c").run().await;
    assert_eq!(
        (out.status, out.text().as_str()),
        (200, "conn 3"),
        "{out:?}"
    );
    let out = get("/d").args(&["-X", "DELETE"]).run().await;
    assert_eq!(
        (out.status, out.text().as_str()),
        (200, "conn 4"),
        "{out:?}"
    );

    let lines = seen.lock().unwrap().clone();
    assert_eq!(
        lines,
        [
            "GET /a HTTP/1.1",
            "POST /p HTTP/1.1",
            "GET /b HTTP/1.1",
            "GET /c HTTP/1.1",
            "GET /c HTTP/1.1",
            "DELETE /d HTTP/1.1",
            "DELETE /d HTTP/1.1",
        ],
        "the POST once, the GET and DELETE twice"
    );
}

/// HTTP/2 takes request heads as large as HTTP/1 does (`max_head_bytes`,
/// 64 KiB by default; hyper's own limit is 16 KiB): a 40 KB cookie reaches
/// the server whole over h2c, as over HTTP/1.1.
#[tokio::test]
async fn http2_takes_request_heads_as_large_as_http1() {
    let origin = Origin::ok().await;
    let relay = relay_to(&origin, "app.test", "").await;
    let cookie = format!("big={}", "c".repeat(40_000));
    let host = format!("app.test:{}", origin.port());
    let h2 = Curl::new(&format!("http://{}/h2", relay.addr))
        .args(&["--http2-prior-knowledge", "-H", &format!("Host: {host}")])
        .args(&["-H", &format!("Cookie: {cookie}")])
        .run()
        .await;
    assert_eq!(h2.status, 200, "{:?}", h2.head);
    let h1 = Curl::new(&format!("http://{host}/h1"))
        .proxy(&relay.url())
        .args(&["-H", &format!("Cookie: {cookie}")])
        .run()
        .await;
    assert_eq!(h1.status, 200, "{:?}", h1.head);
    let got = origin.received();
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_eq!(r.header("cookie"), Some(cookie.as_str()), "{}", r.target);
    }
}

/// Request smuggling through framing fields (the audit's C1 and C2): a body
/// whose `Content-Length` the client names in `Connection`, or writes as a
/// list, reaches the server as one body with one `Content-Length`; it never
/// becomes a request of its own on the pooled connection that the next
/// client's request takes.
#[tokio::test]
async fn framing_fields_cannot_be_dropped_or_doubled_to_smuggle_a_request() {
    let origin = Origin::ok().await;
    let relay = one_worker_relay_to(&origin, "app.test").await;
    let host = format!("Host: app.test:{}\r\n", origin.port());
    let smuggled = format!("GET /smuggled HTTP/1.1\r\n{host}X-Ignore: ");
    let t = Duration::from_secs(5);
    for framing in [
        // (Connection: close only ends the client's side sooner.)
        format!(
            "Connection: close, Content-Length\r\nContent-Length: {}\r\n",
            smuggled.len()
        ),
        format!(
            "Connection: close\r\nContent-Length: {0}, {0}\r\n",
            smuggled.len()
        ),
        format!(
            "Connection: close\r\nContent-Length: {0}\r\nContent-Length: {0}\r\n",
            smuggled.len()
        ),
    ] {
        let attack = format!("POST /attack HTTP/1.1\r\n{host}{framing}\r\n{smuggled}");
        let answer = raw_exchange(relay.addr, attack.as_bytes(), t).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        let victim = format!(
            "GET /victim HTTP/1.1\r\n{host}Cookie: session=VICTIM\r\nConnection: close\r\n\r\n"
        );
        let answer = raw_exchange(relay.addr, victim.as_bytes(), t).await;
        assert!(answer.ends_with("ok /victim"), "{answer}");
    }
    let got = origin.received();
    let targets: Vec<&str> = got.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        ["/attack", "/victim", "/attack", "/victim", "/attack", "/victim"]
    );
    for attack in got.iter().filter(|r| r.target == "/attack") {
        assert_eq!(attack.body, smuggled.as_bytes());
        assert_eq!(
            attack.all("content-length"),
            [smuggled.len().to_string().as_str()]
        );
    }
}

/// The relay's own answers to a `HEAD` have no body (RFC 9110 9.3.2; the
/// audit's S1: a 403's or 404's body ran into the next response on the
/// connection), `OPTIONS` to the relay says what it takes, and its own
/// answers carry `Date` (RFC 9110 6.6.1) and `X-Content-Type-Options`.
#[tokio::test]
async fn the_relays_own_answers_to_head_have_no_body_and_are_dated() {
    let relay = Relay::start(&config_with("", "")).await;
    let pipelined = b"HEAD /nothing HTTP/1.1\r\nHost: relay.test\r\n\r\n\
        HEAD http://nope.test/ HTTP/1.1\r\nHost: nope.test\r\n\r\n\
        HEAD /services HTTP/1.1\r\nHost: relay.test\r\n\r\n\
        OPTIONS * HTTP/1.1\r\nHost: relay.test\r\n\r\n\
        GET /services HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(relay.addr, pipelined, Duration::from_secs(5)).await;
    let heads: Vec<&str> = answer.split("\r\n\r\n").collect();
    let status = |h: &str| h.lines().next().unwrap_or("").to_string();
    assert_eq!(
        heads.iter().take(5).map(|h| status(h)).collect::<Vec<_>>(),
        [
            "HTTP/1.1 404 Not Found",
            "HTTP/1.1 403 Forbidden",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK",
        ],
        "every answer right after the one before: {answer}"
    );
    for h in &heads[..5] {
        let date = h.lines().find_map(|l| l.strip_prefix("Date: "));
        assert!(
            date.is_some_and(|d| httpdate::parse_http_date(d).is_ok()),
            "{h}"
        );
        assert!(h.contains("\r\nX-Content-Type-Options: nosniff"), "{h}");
    }
    // The HEADs still say how long the GET's body is.
    assert!(!heads[0].contains("Content-Length: 0\r"), "{}", heads[0]);
    assert!(
        heads[3].contains("\r\nAllow: GET, HEAD, OPTIONS"),
        "{}",
        heads[3]
    );
    assert!(
        heads[5].starts_with("{\"relay\":\"relay.test\""),
        "{answer}"
    );
}

/// One request to the relay's own host, answered and closed: (status, head, body).
async fn own_exchange(
    relay: &Relay,
    method: &str,
    target: &str,
    extra: &str,
) -> (u16, String, String) {
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: relay.test\r\n{extra}Connection: close\r\n\r\n"
    );
    exchange(relay.addr, &request).await
}

/// The relay's own endpoints answer `HEAD` (the `GET`'s head, no body; a
/// poll's without waiting, an event stream's head alone), say the same
/// methods in `OPTIONS` and in a `405`'s `Allow` (the audit's L1: `HEAD
/// /events/t` was `405 Allow: GET` while `OPTIONS` offered `HEAD`; `POST
/// /proxy.pac` and `/services` were `404`), and other paths stay `404`.
#[tokio::test]
async fn the_relays_own_endpoints_take_head_and_say_the_same_allow_everywhere() {
    let relay = Relay::start(&config_with("", "")).await;
    for n in 1..=2 {
        let out = Curl::new(&format!("{}/events/t", relay.admin_url()))
            .args(&["--data", &format!("{{\"n\":{n}}}")])
            .run()
            .await;
        assert_eq!(out.status, 201, "{out:?}");
    }
    let allow = Some("GET, HEAD, OPTIONS");
    // A HEAD with a long wait is answered at once, within raw_exchange's 5 s.
    for (path, get, head) in [
        (
            "/events/t",
            "/events/t?after=0",
            "/events/t?after=0&wait=30",
        ),
        ("/proxy.pac", "/proxy.pac", "/proxy.pac"),
        ("/services", "/services", "/services"),
    ] {
        let (status, get_head, body) = own_exchange(&relay, "GET", get, "").await;
        assert_eq!(status, 200, "GET {get}: {get_head}");
        let (status, head_head, rest) = own_exchange(&relay, "HEAD", head, "").await;
        assert_eq!(status, 200, "HEAD {head}: {head_head}");
        assert_eq!(rest, "", "HEAD {head} sent a body");
        for name in ["content-type", "content-length"] {
            assert_eq!(
                head_field(&head_head, name),
                head_field(&get_head, name),
                "HEAD {head}: {head_head}"
            );
        }
        assert_eq!(
            head_field(&get_head, "content-length"),
            Some(body.len().to_string().as_str())
        );
        let (status, options, _) = own_exchange(&relay, "OPTIONS", path, "").await;
        assert_eq!(
            (status, head_field(&options, "allow")),
            (200, allow),
            "{options}"
        );
        for method in ["POST", "DELETE", "PUT"] {
            let (status, refused, _) = own_exchange(&relay, method, path, "").await;
            assert_eq!(
                (status, head_field(&refused, "allow")),
                (405, allow),
                "{method} {path}: {refused}"
            );
        }
    }
    // A HEAD of an event stream: its head, dated, and the end.
    let accept = "Accept: text/event-stream\r\n";
    let (status, stream, rest) = own_exchange(&relay, "HEAD", "/events/t", accept).await;
    assert_eq!(status, 200, "{stream}");
    assert_eq!(
        head_field(&stream, "content-type"),
        Some("text/event-stream")
    );
    assert!(
        head_field(&stream, "date").is_some_and(|d| httpdate::parse_http_date(d).is_ok()),
        "{stream}"
    );
    assert_eq!(rest, "", "HEAD of a stream sent a body");
    // A HEAD delivers nothing: only the two GETs' events are counted.
    let metrics = Curl::new(&format!("{}/metrics", relay.admin_url()))
        .run()
        .await
        .text();
    assert!(
        metrics.contains("porthole_events_delivered_total{topic=\"t\"} 2\n"),
        "{metrics}"
    );
    for method in ["GET", "OPTIONS", "POST"] {
        let (status, head, _) = own_exchange(&relay, method, "/nothing", "").await;
        assert_eq!(status, 404, "{method} /nothing: {head}");
    }
}

/// Max-Forwards (RFC 9110 7.6.2; the audit's S5): an OPTIONS or TRACE with 0
/// is answered by the relay (a TRACE with the request it received, its
/// cookie left out), with more it goes on one lower; other methods keep it.
/// Targets no request may have (a fragment, `GET *`, a Host with user
/// information) are 400 (the audit's M1-M3).
#[tokio::test]
async fn max_forwards_and_targets_no_request_may_have() {
    let origin = Origin::ok().await;
    let relay = relay_to(&origin, "app.test", "").await;
    let url = format!("http://app.test:{}/mf", origin.port());
    let run = |method: &str, max: &str| {
        Curl::new(&url)
            .proxy(&relay.url())
            .args(&["-X", method, "-H", &format!("Max-Forwards: {max}")])
            .args(&["-H", "Cookie: secret=1"])
    };
    let options = run("OPTIONS", "0").run().await;
    assert_eq!(options.status, 200, "{options:?}");
    let trace = run("TRACE", "0").run().await;
    assert_eq!(trace.status, 200, "{trace:?}");
    assert_eq!(trace.header("content-type"), ["message/http"]);
    let echo = trace.text();
    assert!(
        echo.starts_with(&format!("TRACE {url} HTTP/1.1\r\n")),
        "{echo}"
    );
    assert!(echo.contains("\r\nMax-Forwards: 0\r\n"), "{echo}");
    assert!(!echo.to_ascii_lowercase().contains("cookie"), "{echo}");
    assert!(origin.received().is_empty(), "answered by the relay");

    let out = run("OPTIONS", "5").run().await;
    assert_eq!(out.status, 200, "{out:?}");
    let out = run("GET", "0").run().await;
    assert_eq!(out.status, 200, "{out:?}");
    let got = origin.received();
    assert_eq!(got[0].method, "OPTIONS");
    assert_eq!(got[0].header("max-forwards"), Some("4"));
    assert_eq!(got[1].method, "GET");
    assert_eq!(got[1].header("max-forwards"), Some("0"));

    let host = format!("app.test:{}", origin.port());
    for bad in [
        format!("GET /f#frag HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        format!("GET * HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        format!("GET / HTTP/1.1\r\nHost: user@{host}\r\n\r\n"),
        format!("GET / HTTP/1.1\r\nHost: <b>{host}\r\n\r\n"),
    ] {
        let answer = raw_exchange(relay.addr, bad.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{bad:?} -> {answer}");
        assert!(!answer.contains("<b>"), "{answer}");
    }
    assert_eq!(origin.received().len(), 2);
}
