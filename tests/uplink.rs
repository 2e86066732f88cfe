//! Uplinks: an inside relay (I) that accepts no connection offers services
//! through an outside relay (O). Both relays run in process; curl talks to O;
//! the internal servers sit behind I.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use porthole_suite::{
    config_with, connect_via, echo_round, eventually, raw_exchange, route, Curl, EchoServer,
    LinkProxy, Origin, Relay,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// The certificate fixtures of the security tests (a CA made per test).
#[allow(dead_code)]
mod security_support;
use security_support::{Ca, Dir};

fn secret_file(tag: &str, secret: &str) -> PathBuf {
    // One file per call: tests run in parallel with the same ids and other secrets.
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir =
        std::env::temp_dir().join(format!("porthole-uplink-{}-{tag}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("secret");
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    path
}

fn accept(id: &str, secret: &str, may_offer: &[&str], extra: &str) -> String {
    let line = porthole_relay::secret::passwd_line(id, secret).unwrap();
    let offers: Vec<String> = may_offer.iter().map(|o| format!("\"{o}\"")).collect();
    format!(
        "[[accept_uplink]]\nid = \"{id}\"\nsecret_hash = \"{line}\"\nmay_offer = [{}]\n{extra}\n",
        offers.join(", ")
    )
}

/// An inside relay config: its own routes plus `[uplink]` to `to`.
fn inside(to: &str, id: &str, secret: &str, offers: &[&str], routes: &str) -> String {
    let offers: Vec<String> = offers.iter().map(|o| format!("\"{o}\"")).collect();
    let uplink = format!(
        "[uplink]\nto = \"{to}\"\nid = \"{id}\"\nsecret_file = \"{}\"\noffer = [{}]\nidle_ping = \"1s\"\ngap_probe = \"200ms\"\nping_timeout = \"1s\"\n",
        secret_file(id, secret).display(),
        offers.join(", ")
    );
    format!("[relay]\nlisten = \"127.0.0.1:0\"\nname = \"inside-{id}.test\"\n{routes}\n{uplink}")
}

/// The usual inside relay: uplink `plant-3` (secret `s`) to `to`, offering
/// its route `erp.plant3` to `origin`.
fn plant3(to: &str, origin: &Origin) -> String {
    inside(
        to,
        "plant-3",
        "s",
        &["erp.plant3"],
        &route("erp.plant3", "127.0.0.1", &[origin.port()], ""),
    )
}

async fn services(o: &Relay) -> serde_json::Value {
    let out = Curl::new("http://relay.test/services")
        .proxy(&o.url())
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    serde_json::from_slice(&out.body).unwrap()
}

/// The `/services` row of the uplinked name `name`.
fn uplink_row<'a>(s: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    s["services"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name && e["kind"] == "uplink")
}

fn state_of(s: &serde_json::Value, name: &str) -> Option<String> {
    uplink_row(s, name).map(|e| e["state"].as_str().unwrap_or("").to_string())
}

async fn wait_state(o: &Relay, name: &str, want: &str) {
    let ok = eventually(Duration::from_secs(15), || async {
        state_of(&services(o).await, name).as_deref() == Some(want)
    })
    .await;
    assert!(ok, "{name} never became {want}: {}", services(o).await);
}

/// The first `200` `get` brings within 15 s (an uplink registers in the
/// background); fails naming `what` and the last answer otherwise.
async fn answered<F, Fut>(what: &str, get: F) -> porthole_suite::CurlOutput
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = porthole_suite::CurlOutput>,
{
    let up = eventually(Duration::from_secs(15), || async {
        get().await.status == 200
    })
    .await;
    let out = get().await;
    assert!(up && out.status == 200, "{what} never answered: {out:?}");
    out
}

async fn metric(relay: &Relay, series: &str) -> f64 {
    let text = Curl::new(&format!("{}/metrics", relay.admin_url()))
        .run()
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// An offer of a name this relay routes itself is accepted but never used
/// (the route wins): /services says so beside the offer.
#[tokio::test]
async fn an_offer_shadowed_by_a_route_is_shown_as_such() {
    let origin = Origin::ok().await;
    let o = Relay::start(&config_with(
        &route("clash.plant3", "127.0.0.1", &[origin.port()], ""),
        &accept("plant-3", "s3cret", &["*.plant3"], ""),
    ))
    .await;
    let r = |h: &str| route(h, "127.0.0.1", &[origin.port()], "");
    let _i = Relay::start(&inside(
        &o.addr.to_string(),
        "plant-3",
        "s3cret",
        &["clash.plant3", "erp.plant3"],
        &[r("clash.plant3"), r("erp.plant3")].concat(),
    ))
    .await;
    wait_state(&o, "erp.plant3", "connected").await;
    let s = services(&o).await;
    let row = |name: &str| {
        uplink_row(&s, name).unwrap_or_else(|| panic!("no uplink row for {name}: {s}"))
    };
    assert_eq!(
        row("clash.plant3")["shadowed_by_route"],
        "clash.plant3",
        "{s}"
    );
    assert!(row("erp.plant3")["shadowed_by_route"].is_null(), "{s}");
}

/// A name an uplink may offer while none does (the inside relay is away,
/// or has not registered since the outside relay restarted) is a gateway
/// failure that names the uplink, not `403 no route`, which reads as final.
#[tokio::test]
async fn a_name_an_absent_uplink_may_offer_is_a_502_naming_it() {
    let o = Relay::start(&config_with(
        "",
        &accept("plant-3", "s3cret", &["*.plant3"], ""),
    ))
    .await;
    let out = Curl::new("http://erp.plant3/x").proxy(&o.url()).run().await;
    assert_eq!(out.status, 502, "{out:?}");
    assert!(out.text().contains("uplink plant-3"), "{}", out.text());
    let tunnel = Curl::new("http://erp.plant3/x")
        .proxy(&o.url())
        .arg("-p")
        .run()
        .await;
    assert!(tunnel.head.starts_with("HTTP/1.1 502"), "{tunnel:?}");
    // A name no uplink may offer is still unknown.
    let out = Curl::new("http://other.test/x").proxy(&o.url()).run().await;
    assert_eq!(out.status, 403, "{out:?}");
}

#[tokio::test]
async fn http_and_connect_reach_servers_behind_a_relay_that_only_dials_out() {
    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let o = Relay::start(&config_with(
        "",
        &accept("plant-3", "s3cret", &["*.plant3"], ""),
    ))
    .await;
    let routes = [
        route("erp.plant3", "127.0.0.1", &[origin.port()], ""),
        route("db.plant3", "127.0.0.1", &[echo.port()], ""),
    ]
    .concat();
    let i = Relay::start(&inside(
        &o.addr.to_string(),
        "plant-3",
        "s3cret",
        &["erp.plant3", "db.plant3"],
        &routes,
    ))
    .await;
    wait_state(&o, "erp.plant3", "connected").await;
    // The PAC file sends the uplinked name through the outside relay too
    // (browsers set up by PAC went DIRECT for it).
    let pac = Curl::new("http://relay.test/proxy.pac")
        .proxy(&o.url())
        .run()
        .await;
    assert!(
        pac.text()
            .contains("if (host == \"erp.plant3\") return proxy;"),
        "{}",
        pac.text()
    );

    let url = format!("http://erp.plant3:{}/x", origin.port());
    let out = Curl::new(&url).proxy(&o.url()).run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /x");
    let got = origin.single();
    assert_eq!(
        got.header("host"),
        Some(format!("erp.plant3:{}", origin.port()).as_str())
    );
    let via = got.all("via").join(", ");
    assert!(
        via.contains("relay.test (porthole)") && via.contains("inside-plant-3.test (porthole)"),
        "{via}"
    );

    let out = Curl::new(&url).proxy(&o.url()).arg("-p").run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(origin.received().len(), 2);

    // CONNECT to a TCP service behind I: bytes both ways, half-close passed on.
    let (s, head) = connect_via(o.addr, &format!("db.plant3:{}", echo.port())).await;
    assert_eq!(head, "HTTP/1.1 200 Connection established\r\n\r\n");
    let back = echo_round(s, b"through two relays").await;
    assert_eq!(back, b"through two relaysbye\n");
    assert_eq!(echo.half_closes(), 1);

    // The same CONNECT as an HTTP/2 stream, from a shim linked to O.
    let shim_config = porthole_shim::RawConfig::from_toml(&format!(
        "relay = \"{}\"\nrelay_name = \"relay.test\"\nlisten = \"127.0.0.1:0\"\n",
        o.addr
    ))
    .unwrap()
    .validate()
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shim = porthole_shim::Shim::start(shim_config, listener)
        .await
        .unwrap();
    let (s, _) = connect_via(shim.addr, &format!("db.plant3:{}", echo.port())).await;
    assert_eq!(echo_round(s, b"over the link").await, b"over the linkbye\n");
    assert_eq!(echo.half_closes(), 2);
    // A port I has no route for: I refuses, and the refusal comes back
    // through O and the link.
    let out = Curl::new(&format!("http://db.plant3:{}/", origin.port()))
        .proxy(&format!("http://{}", shim.addr))
        .arg("-p")
        .run()
        .await;
    assert!(out.stderr.contains("response 403"), "{out:?}");
    // The same refusal to a CONNECT through the shim (an HTTP/2 stream to O)
    // and straight to O (HTTP/1, where it is an answer, not a tunnel).
    let connect = format!(
        "CONNECT db.plant3:{0} HTTP/1.1\r\nHost: db.plant3:{0}\r\nConnection: close\r\n\r\n",
        origin.port()
    );
    let reason = format!(
        "\r\n\r\n403 Forbidden: route db.plant3: port {} is not allowed\n",
        origin.port()
    );
    for to in [shim.addr, o.addr] {
        let refused = raw_exchange(to, connect.as_bytes(), Duration::from_secs(5)).await;
        assert!(
            refused.starts_with("HTTP/1.1 403 Forbidden\r\n"),
            "{refused}"
        );
        assert!(
            refused
                .to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{refused}"
        );
        assert!(
            refused.ends_with(&reason),
            "I's reason, passed on: {refused}"
        );
    }
    // O counted two tunnels (the HTTP/1 one and the shim's stream) once they
    // ended, and no tunnel for either refusal.
    let tunnels = "porthole_tunnel_duration_seconds_count{route=\"db.plant3\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metric(&o, tunnels).await < 2.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&o, tunnels).await, 2.0);

    // I accepted no connection at all: every socket it has to O, it dialled.
    assert_eq!(metric(&i, "porthole_connections_accepted_total").await, 0.0);
    assert!(metric(&o, "porthole_uplinks_connected").await >= 1.0);
}

/// CONNECT-UDP (RFC 9298) to a name the inside relay offers: the outside
/// relay opens a session and asks the inside relay for the same CONNECT-UDP,
/// and the capsules pass through both, over HTTP/1.1 and as an HTTP/2
/// extended CONNECT. The inside relay's route decides: without `udp = true`
/// its 403 comes back with its reason.
#[tokio::test]
async fn udp_datagrams_reach_a_server_behind_a_relay_that_only_dials_out() {
    use porthole_relay::udp::datagram_capsule;
    use porthole_suite::{connect_udp, next_datagram, UdpEcho};
    let voice_echo = UdpEcho::start().await;
    let voice = voice_echo.port();
    let o = Relay::start(&config_with(
        "",
        &accept("plant-3", "s3cret", &["*.plant3"], ""),
    ))
    .await;
    let routes = route("voice.plant3", "127.0.0.1", &[voice], "udp = true")
        + &route("tcp.plant3", "127.0.0.1", &[voice], "");
    let _i = Relay::start(&inside(
        &o.addr.to_string(),
        "plant-3",
        "s3cret",
        &["voice.plant3", "tcp.plant3"],
        &routes,
    ))
    .await;
    wait_state(&o, "voice.plant3", "connected").await;

    let (mut s, head) = connect_udp(o.addr, &format!("voice.plant3:{voice}")).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("Capsule-Protocol: ?1"), "{head}");
    let mut buf = Vec::new();
    porthole_suite::echo_datagrams(&mut s, &mut buf, &[&b"rtp 1"[..], b"rtp 2"]).await;
    drop(s);

    let mut sender = porthole_suite::h2c(o.addr).await;
    let req = porthole_suite::connect_udp_h2(&format!(
        "http://relay.test/.well-known/masque/udp/voice.plant3/{voice}/"
    ));
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut io = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    io.write_all(&datagram_capsule(b"over h2")).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(next_datagram(&mut io, &mut buf).await, b"echo:over h2");
    drop(io);
    // Two sessions, two sockets of the inside relay's.
    assert_eq!(voice_echo.senders().len(), 2, "{:?}", voice_echo.senders());

    // The inside relay's route has no `udp = true`: its refusal, passed on.
    let refused = format!("GET /.well-known/masque/udp/tcp.plant3/{voice}/ HTTP/1.1\r\nHost: relay.test\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n\r\n");
    let answer = raw_exchange(o.addr, refused.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    assert!(
        answer
            .ends_with("route tcp.plant3: UDP refused: the route does not allow it (udp = true)\n"),
        "the inside relay's reason: {answer}"
    );
}

#[tokio::test]
async fn registration_refuses_wrong_secrets_foreign_names_and_taken_names() {
    let origin = Origin::ok().await;
    let accepts = [
        accept("plant-3", "right", &["*.plant3"], ""),
        accept("plant-4", "four", &["*.plant3", "*.plant4"], ""),
    ]
    .concat();
    let o = Relay::start(&config_with("", &accepts)).await;
    let r = |h: &str| route(h, "127.0.0.1", &[origin.port()], "");

    // Wrong secret: nothing registered; the name is one an uplink may offer,
    // so O answers 502 naming the uplink (no connected uplink offers it).
    let _bad = Relay::start(&inside(
        &o.addr.to_string(),
        "plant-3",
        "wrong",
        &["erp.plant3"],
        &r("erp.plant3"),
    ))
    .await;
    // A correct uplink offering a name outside its may_offer, and one it may offer.
    let _good = Relay::start(&inside(
        &o.addr.to_string(),
        "plant-3",
        "right",
        &["mes.plant3", "evil.corp"],
        &[r("mes.plant3"), r("evil.corp")].concat(),
    ))
    .await;
    wait_state(&o, "mes.plant3", "connected").await;
    let s = services(&o).await;
    assert!(
        state_of(&s, "evil.corp").is_none(),
        "a name outside may_offer was registered: {s}"
    );
    assert!(
        state_of(&s, "erp.plant3").is_none(),
        "the wrong secret registered: {s}"
    );
    let out = Curl::new(&format!("http://erp.plant3:{}/", origin.port()))
        .proxy(&o.url())
        .run()
        .await;
    assert_eq!(out.status, 502, "{out:?}");
    assert!(
        out.text().contains("no connected uplink offers this name"),
        "{}",
        out.text()
    );

    // plant-4 may offer *.plant3 too, but mes.plant3 is taken: refused, not taken over.
    let _rival = Relay::start(&inside(
        &o.addr.to_string(),
        "plant-4",
        "four",
        &["mes.plant3", "x.plant4"],
        &[r("mes.plant3"), r("x.plant4")].concat(),
    ))
    .await;
    wait_state(&o, "x.plant4", "connected").await;
    let s = services(&o).await;
    let owner = s["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "mes.plant3")
        .unwrap()["uplink"]
        .clone();
    assert_eq!(owner, "plant-3", "{s}");
}

/// Which inside relay a request through `o` crossed: the `Via` entries of
/// its response (each inside relay names itself).
async fn via_of(o: &Relay, url: &str) -> (u16, String) {
    let out = Curl::new(url).proxy(&o.url()).run().await;
    (out.status, out.header("via").join(", "))
}

/// Two inside relays configured with one id do not take the uplink from each
/// other in turns: the second is refused (409) while the first answers, and
/// takes over once the first is gone.
#[tokio::test]
async fn a_second_inside_relay_with_the_same_id_is_refused_while_the_first_answers() {
    let origin = Origin::ok().await;
    let o = Relay::start(&config_with("", &accept("plant-3", "s", &["*.plant3"], ""))).await;
    let config = plant3(&o.addr.to_string(), &origin);
    let first = Relay::start(&config).await;
    wait_state(&o, "erp.plant3", "connected").await;
    let url = format!("http://erp.plant3:{}/", origin.port());
    let (status, via) = via_of(&o, &url).await;
    assert_eq!(status, 200, "{via}");
    assert!(via.contains("inside-plant-3.test"), "{via}");

    let second = Relay::start(&config.replace("inside-plant-3.test", "second.test")).await;
    // For 3 s every request still crosses the first (taking turns, the
    // second took over within its first 100 ms backoff).
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let (status, via) = via_of(&o, &url).await;
        assert_eq!(status, 200, "{via}");
        assert!(
            via.contains("inside-plant-3.test") && !via.contains("second.test"),
            "the second inside relay took the uplink over: {via}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.shutdown().await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            let (status, via) = via_of(&o, &url).await;
            status == 200 && via.contains("second.test")
        })
        .await,
        "the second inside relay did not take over once the first was gone"
    );
    drop(second);
}

/// A control connection that no longer answers (the inside relay lost it
/// without the outside relay seeing a close) is replaced by the next one for
/// its id, after one unanswered ping.
#[tokio::test]
async fn a_control_connection_that_does_not_answer_is_replaced() {
    let origin = Origin::ok().await;
    let o = Relay::start(&config_with("", &accept("plant-3", "s", &["*.plant3"], ""))).await;
    let mut silent = mute_uplink(&o, "plant-3", "s", "erp.plant3").await;
    wait_state(&o, "erp.plant3", "connected").await;
    let _i = Relay::start(&plant3(&o.addr.to_string(), &origin)).await;
    // The outside relay asks the silent connection first, then closes it.
    let mut got = Vec::new();
    read_until(&mut silent, &mut got, b"\"type\":\"ping\"").await;
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the silent control connection was kept");
    let url = format!("http://erp.plant3:{}/", origin.port());
    assert!(
        eventually(Duration::from_secs(10), || async {
            via_of(&o, &url).await.0 == 200
        })
        .await,
        "the new control connection did not take the uplink"
    );
}

/// Speaks the control protocol by hand: authenticates and registers, then
/// never opens a data connection.
async fn mute_uplink(o: &Relay, id: &str, secret: &str, name: &str) -> TcpStream {
    use base64::Engine as _;
    let mut s = TcpStream::connect(o.addr).await.unwrap();
    let creds = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
    let req = format!("GET /.porthole/uplink HTTP/1.1\r\nHost: relay.test\r\nConnection: Upgrade\r\nUpgrade: porthole-uplink/1\r\nAuthorization: Basic {creds}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(format!("{{\"type\":\"register\",\"offers\":[\"{name}\"]}}\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("registered") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 101"));
    s
}

/// Reads from `s` into `got` until `got` holds `needle` (within 10 s); returns
/// the bytes up to and including it, leaving the rest in `got`.
async fn read_until(s: &mut TcpStream, got: &mut Vec<u8>, needle: &[u8]) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(at) = got.windows(needle.len()).position(|w| w == needle) {
            return got.drain(..at + needle.len()).collect();
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("read in time")
            .expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(got));
        got.extend_from_slice(&buf[..n]);
    }
}

/// A fake inside relay's data connection for `session`: answers the first
/// request, then reads the next one and closes without an answer (as if
/// the inside relay closed it just as the request arrived).
async fn answer_once_then_close(o: std::net::SocketAddr, session: String, n: usize) {
    let mut s = TcpStream::connect(o).await.unwrap();
    let upgrade = format!("GET /.porthole/uplink/data HTTP/1.1\r\nHost: relay.test\r\nConnection: Upgrade\r\nUpgrade: porthole-uplink-data/1\r\nPorthole-Uplink: fake\r\nPorthole-Session: {session}\r\n\r\n");
    s.write_all(upgrade.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let head = read_until(&mut s, &mut got, b"\r\n\r\n").await;
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    read_until(&mut s, &mut got, b"\r\n\r\n").await;
    let body = format!("session {n}");
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(answer.as_bytes()).await.unwrap();
    read_until(&mut s, &mut got, b"\r\n\r\n").await;
}

#[tokio::test]
async fn a_data_connection_closed_under_the_next_request_is_retried_on_a_new_session() {
    let o = Relay::start(&config_with("", &accept("fake", "f", &["*.fake"], ""))).await;
    let mut control = mute_uplink(&o, "fake", "f", "app.fake").await;
    let sessions = Arc::new(AtomicUsize::new(0));
    let (opened, to) = (sessions.clone(), o.addr);
    tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            let line = read_until(&mut control, &mut got, b"\n").await;
            let msg: serde_json::Value = serde_json::from_slice(&line).unwrap();
            if msg["type"] == "open" {
                let session = msg["session"].as_str().unwrap_or("").to_string();
                let n = opened.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(answer_once_then_close(to, session, n));
            }
        }
    });
    let out = Curl::new("http://app.fake/1").proxy(&o.url()).run().await;
    assert_eq!(
        (out.status, out.text().as_str()),
        (200, "session 1"),
        "{out:?}"
    );
    // The second request goes down the pooled data connection of session 1,
    // which closes under it before any answer: O retries once, on a new
    // session, and the client never sees the close.
    let out = Curl::new("http://app.fake/2").proxy(&o.url()).run().await;
    assert_eq!(
        (out.status, out.text().as_str()),
        (200, "session 2"),
        "{out:?}"
    );
    assert_eq!(sessions.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unclaimed_sessions_get_504_and_stray_data_connections_are_closed() {
    let o = Relay::start(&config_with(
        "",
        &accept("mute", "m", &["*.mute"], "session_timeout = \"400ms\""),
    ))
    .await;
    let _control = mute_uplink(&o, "mute", "m", "app.mute").await;
    let started = std::time::Instant::now();
    let out = Curl::new("http://app.mute/").proxy(&o.url()).run().await;
    assert_eq!(out.status, 504, "{out:?}");
    assert!(out.text().contains("uplink mute"), "{}", out.text());
    assert!(started.elapsed() < Duration::from_secs(5));

    let stray = "GET /.porthole/uplink/data HTTP/1.1\r\nHost: relay.test\r\nConnection: Upgrade\r\nUpgrade: porthole-uplink-data/1\r\nPorthole-Session: 0123456789abcdef\r\n\r\n";
    let answer = raw_exchange(o.addr, stray.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("Connection: close"), "{answer}");
}

#[tokio::test]
async fn a_cut_control_connection_withdraws_offers_and_they_come_back() {
    let origin = Origin::ok().await;
    let o = Relay::start(&config_with("", &accept("plant-3", "s", &["*.plant3"], ""))).await;
    let proxy = LinkProxy::start(o.addr).await;
    let _i = Relay::start(&plant3(&proxy.addr.to_string(), &origin)).await;
    wait_state(&o, "erp.plant3", "connected").await;
    let url = format!("http://erp.plant3:{}/", origin.port());
    assert_eq!(Curl::new(&url).proxy(&o.url()).run().await.status, 200);

    proxy.cut();
    // O notices at once (the proxy closed the socket) and answers 502 naming the uplink...
    let mut seen_502 = false;
    for _ in 0..200 {
        let out = Curl::new(&url).proxy(&o.url()).run().await;
        if out.status == 502 {
            assert!(out.text().contains("uplink plant-3"), "{}", out.text());
            seen_502 = true;
            break;
        }
        if out.status == 200 && proxy.accepted() > 3 {
            break; // already back
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // ...and I reconnects with backoff and registers again by itself.
    wait_state(&o, "erp.plant3", "connected").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            Curl::new(&url).proxy(&o.url()).run().await.status == 200
        })
        .await,
        "requests did not work again after the reconnect"
    );
    assert!(
        proxy.accepted() >= 2,
        "I did not dial a new control connection"
    );
    let _ = seen_502; // the window can be shorter than one curl; the reconnect is what must hold
}

#[tokio::test]
async fn withdrawn_offers_answer_502_while_the_uplink_is_gone() {
    let origin = Origin::ok().await;
    let o = Relay::start(&config_with("", &accept("plant-3", "s", &["*.plant3"], ""))).await;
    let i = Relay::start(&plant3(&o.addr.to_string(), &origin)).await;
    wait_state(&o, "erp.plant3", "connected").await;
    i.shutdown().await; // the inside relay is gone for good
    wait_state(&o, "erp.plant3", "disconnected").await;
    let out = Curl::new(&format!("http://erp.plant3:{}/", origin.port()))
        .proxy(&o.url())
        .run()
        .await;
    assert_eq!(out.status, 502, "{out:?}");
    assert!(
        out.text().contains("uplink plant-3") && out.text().contains("not connected"),
        "{}",
        out.text()
    );
}

#[tokio::test]
async fn closing_either_end_closes_the_whole_path() {
    // A server that greets, then closes its side after reading one line.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = server.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"hello\n").await;
                let mut line = [0u8; 5];
                let _ = s.read_exact(&mut line).await;
                let _ = s.shutdown().await;
            });
        }
    });
    let echo = EchoServer::start().await;
    let o = Relay::start(&config_with("", &accept("plant-3", "s", &["*.plant3"], ""))).await;
    let routes = [
        route("greeter.plant3", "127.0.0.1", &[port], ""),
        route("echo.plant3", "127.0.0.1", &[echo.port()], ""),
    ]
    .concat();
    let _i = Relay::start(&inside(
        &o.addr.to_string(),
        "plant-3",
        "s",
        &["greeter.plant3", "echo.plant3"],
        &routes,
    ))
    .await;
    wait_state(&o, "greeter.plant3", "connected").await;

    // Server side closes: the client sees the end of the stream.
    let mut s = TcpStream::connect(o.addr).await.unwrap();
    s.write_all(format!("CONNECT greeter.plant3:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut all = Vec::new();
    s.write_all(b"quit\n").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut all))
        .await
        .expect("server-side close reached the client")
        .unwrap();
    drop(s); // the client closes its side in turn: the session ends
    assert!(
        eventually(Duration::from_secs(10), || async {
            services(&o).await["services"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["sessions"].as_u64() == Some(0))
        })
        .await,
        "the greeter session did not end"
    );
    assert!(
        String::from_utf8_lossy(&all).ends_with("hello\n"),
        "{}",
        String::from_utf8_lossy(&all)
    );

    // Client side closes: the internal server sees the end, and the session count returns to 0.
    let (s, _) = connect_via(o.addr, &format!("echo.plant3:{}", echo.port())).await;
    let during = services(&o).await;
    let sessions = during["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "echo.plant3")
        .unwrap()["sessions"]
        .as_u64();
    assert_eq!(sessions, Some(1), "{during}");
    drop(s);
    assert!(
        eventually(Duration::from_secs(10), || async {
            echo.half_closes() == 1
        })
        .await,
        "the internal server never saw the close"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            services(&o).await["services"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["sessions"].as_u64().unwrap_or(0) == 0)
        })
        .await
    );
}

#[tokio::test]
async fn a_mute_uplink_does_not_hold_up_the_others() {
    let origin = Origin::ok().await;
    let accepts = [
        accept("mute", "m", &["*.mute"], "session_timeout = \"3s\""),
        accept("plant-3", "s", &["*.plant3"], ""),
    ]
    .concat();
    let o = Relay::start(&config_with(
        &route("local.test", "127.0.0.1", &[origin.port()], ""),
        &accepts,
    ))
    .await;
    let _control = mute_uplink(&o, "mute", "m", "app.mute").await;
    let _i = Relay::start(&plant3(&o.addr.to_string(), &origin)).await;
    wait_state(&o, "erp.plant3", "connected").await;

    let proxy = o.url();
    let stuck: Vec<_> = (0..4)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                Curl::new("http://app.mute/")
                    .proxy(&proxy)
                    .run()
                    .await
                    .status
            })
        })
        .collect();
    // While four requests wait on the mute uplink, the others are served at once.
    let started = std::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(
            Curl::new(&format!("http://erp.plant3:{}/", origin.port()))
                .proxy(&proxy)
                .run()
                .await
                .status,
            200
        );
        assert_eq!(
            Curl::new(&format!("http://local.test:{}/", origin.port()))
                .proxy(&proxy)
                .run()
                .await
                .status,
            200
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "served slowly: {:?}",
        started.elapsed()
    );
    for s in stuck {
        assert_eq!(s.await.unwrap(), 504);
    }
}

#[tokio::test]
async fn services_lists_routes_and_uplink_offers() {
    let origin = Origin::ok().await;
    let o = Relay::start(&config_with(
        &route("wiki.corp", "10.9.9.9", &[80], ""),
        &accept("plant-3", "s", &["*.plant3"], ""),
    ))
    .await;
    let _i = Relay::start(&plant3(&o.addr.to_string(), &origin)).await;
    wait_state(&o, "erp.plant3", "connected").await;
    let s = services(&o).await;
    assert_eq!(s["relay"], "relay.test");
    let list = s["services"].as_array().unwrap();
    assert!(
        list.iter()
            .any(|e| e["name"] == "wiki.corp" && e["kind"] == "route"),
        "{s}"
    );
    assert!(
        !s.to_string().contains("10.9.9.9"),
        "internal addresses leak: {s}"
    );
    let erp = list.iter().find(|e| e["name"] == "erp.plant3").unwrap();
    assert_eq!(
        (
            erp["uplink"].as_str(),
            erp["state"].as_str(),
            erp["sessions"].as_u64()
        ),
        (Some("plant-3"), Some("connected"), Some(0))
    );
    // The status page shows the same.
    let page = Curl::new(&format!("{}/status", o.admin_url()))
        .run()
        .await
        .text();
    assert!(
        page.contains("<td>erp.plant3</td><td>plant-3</td><td class=\"ok\">connected</td>"),
        "{page}"
    );
}

// ---------------------------------------------------------------- pool

/// `inside(...)` with `[uplink] pool = n`.
/// O accepting `plant-3`, a [`CountingProxy`] in front of it, and I dialling
/// through the proxy, registered.
struct Counted {
    o: Relay,
    proxy: CountingProxy,
    _i: Relay,
}

async fn counted(offers: &[&str], routes: &str, pool: usize) -> Counted {
    let o = Relay::start(&config_with("", &accept("plant-3", "s", &["*.plant3"], ""))).await;
    let proxy = CountingProxy::start(o.addr).await;
    let i = Relay::start(&inside_pooled(
        &proxy.addr.to_string(),
        offers,
        routes,
        pool,
    ))
    .await;
    wait_state(&o, offers[0], "connected").await;
    Counted { o, proxy, _i: i }
}

fn inside_pooled(to: &str, offers: &[&str], routes: &str, pool: usize) -> String {
    format!(
        "{}pool = {pool}\n",
        inside(to, "plant-3", "s", offers, routes)
    )
}

/// A TCP proxy between I and O that knows every connection I dialled: how
/// many it passed on, which are open now (the first one is the control
/// connection), how many I closed its side of, and can refuse new ones
/// (accept and close at once) or close chosen open ones (both peers see the
/// close).
struct CountingProxy {
    addr: std::net::SocketAddr,
    passed: Arc<AtomicUsize>,
    open: Arc<Mutex<HashMap<usize, tokio::task::AbortHandle>>>,
    refuse: Arc<AtomicBool>,
    closed_by_inside: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// Removes a connection from the open set when its task ends or is aborted.
struct Opened(Arc<Mutex<HashMap<usize, tokio::task::AbortHandle>>>, usize);

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.lock().unwrap().remove(&self.1);
    }
}

impl CountingProxy {
    async fn start(to: std::net::SocketAddr) -> CountingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let passed = Arc::new(AtomicUsize::new(0));
        let open: Arc<Mutex<HashMap<usize, tokio::task::AbortHandle>>> = Arc::default();
        let refuse = Arc::new(AtomicBool::new(false));
        let closed_by_inside = Arc::new(AtomicUsize::new(0));
        let (p, o, r, c) = (
            passed.clone(),
            open.clone(),
            refuse.clone(),
            closed_by_inside.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                if r.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let n = p.fetch_add(1, Ordering::SeqCst);
                // Registered before the task runs, so a fast end cannot precede it.
                let mut map = o.lock().unwrap();
                let guard = Opened(o.clone(), n);
                let closed = c.clone();
                let handle = tokio::spawn(async move {
                    let _guard = guard;
                    let Ok(mut up) = TcpStream::connect(to).await else {
                        return;
                    };
                    // Each direction passes its end on (a half-close), as
                    // copy_bidirectional does; I's end is counted.
                    let (mut down_r, mut down_w) = down.split();
                    let (mut up_r, mut up_w) = up.split();
                    let inward = async {
                        let _ = tokio::io::copy(&mut down_r, &mut up_w).await;
                        closed.fetch_add(1, Ordering::SeqCst);
                        let _ = up_w.shutdown().await;
                    };
                    let outward = async {
                        let _ = tokio::io::copy(&mut up_r, &mut down_w).await;
                        let _ = down_w.shutdown().await;
                    };
                    tokio::join!(inward, outward);
                });
                if !handle.is_finished() {
                    map.insert(n, handle.abort_handle());
                }
            }
        });
        CountingProxy {
            addr,
            passed,
            open,
            refuse,
            closed_by_inside,
            task,
        }
    }

    /// Connections whose inside end I closed (or that failed from its side).
    fn closed_by_inside(&self) -> usize {
        self.closed_by_inside.load(Ordering::SeqCst)
    }

    /// Connections passed on so far (refused ones not counted).
    fn passed(&self) -> usize {
        self.passed.load(Ordering::SeqCst)
    }

    /// Connections open now.
    fn open(&self) -> usize {
        self.open.lock().unwrap().len()
    }

    fn refuse_new(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Closes the open connections `which` picks by their number (0 is the
    /// first connection I dialled: its first control connection).
    fn cut(&self, which: impl Fn(usize) -> bool) {
        for (n, handle) in self.open.lock().unwrap().iter() {
            if which(*n) {
                handle.abort();
            }
        }
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut(|_| true);
    }
}

async fn wait_open(proxy: &CountingProxy, want: usize, what: &str) {
    assert!(
        eventually(Duration::from_secs(15), || async { proxy.open() == want }).await,
        "{what}: {} connections open between I and O, not {want}",
        proxy.open()
    );
}

async fn connect_echo(o: &Relay, port: u16) -> Vec<u8> {
    let mut s = TcpStream::connect(o.addr).await.unwrap();
    s.write_all(format!("CONNECT db.plant3:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let back = echo_round(s, b"pooled").await;
    back
}

#[tokio::test]
async fn a_pool_parks_data_connections_and_sessions_take_them_without_a_dial() {
    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let routes = [
        route("erp.plant3", "127.0.0.1", &[origin.port()], ""),
        route("db.plant3", "127.0.0.1", &[echo.port()], ""),
    ]
    .concat();
    let Counted { o, proxy, _i } = counted(&["erp.plant3", "db.plant3"], &routes, 2).await;
    // Before any request: the control connection and two parked ones, which
    // O counts as open connections like any other.
    wait_open(&proxy, 3, "pool filled").await;
    assert_eq!(proxy.passed(), 3);
    assert!(metric(&o, "porthole_open_connections").await >= 3.0);
    // Open at the proxy is not yet parked at O (the upgrade may still be on
    // its way): O lists them once they are.
    assert!(
        eventually(Duration::from_secs(15), || async {
            parked_of(&services(&o).await, "db.plant3") == Some(2)
        })
        .await,
        "O does not list two parked data connections: {}",
        services(&o).await
    );

    // I can dial nothing now: a request and a CONNECT still go through, on
    // the parked connections.
    proxy.refuse_new(true);
    let url = format!("http://erp.plant3:{}/x", origin.port());
    let out = Curl::new(&url).proxy(&o.url()).run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /x");
    let via = origin.single().all("via").join(", ");
    assert!(via.contains("inside-plant-3.test (porthole)"), "{via}");
    assert_eq!(
        connect_echo(&o, echo.port()).await,
        b"HTTP/1.1 200 Connection established\r\n\r\npooledbye\n"
    );
    assert_eq!(proxy.passed(), 3, "a session dialled a new connection");
    // The request's data connection went back to O's upstream pool after its
    // response: the next request takes it, again without a dial.
    let out = Curl::new(&url).proxy(&o.url()).run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(origin.received().len(), 2);
    assert_eq!(proxy.passed(), 3, "a pooled data connection was not reused");
    // The parked ones are used up and cannot refill: a CONNECT (never on a
    // pooled connection) falls back to `open` on the control connection,
    // whose dial is refused too.
    let back = connect_echo(&o, echo.port()).await;
    let back = String::from_utf8_lossy(&back);
    assert!(back.starts_with("HTTP/1.1 502"), "{back}");
    assert!(back.contains("uplink plant-3"), "{back}");

    // Dialling works again: the pool refills by itself and serves again.
    // Open: the control connection, two parked, and the idle one in O's pool.
    proxy.refuse_new(false);
    wait_open(&proxy, 4, "pool refilled").await;
    let before = proxy.passed();
    assert_eq!(
        connect_echo(&o, echo.port()).await,
        b"HTTP/1.1 200 Connection established\r\n\r\npooledbye\n"
    );
    // One dial to replace the parked connection the CONNECT took, none for the session.
    assert!(
        eventually(Duration::from_secs(15), || async {
            proxy.open() == 4 && proxy.passed() == before + 1
        })
        .await,
        "after a session: {} open, {} passed (before {before})",
        proxy.open(),
        proxy.passed()
    );
    // I still accepted no connection: it dialled every one.
    assert_eq!(
        metric(&_i, "porthole_connections_accepted_total").await,
        0.0
    );
}

#[tokio::test]
async fn dead_parked_connections_are_dropped_and_replaced() {
    let origin = Origin::ok().await;
    let Counted { o, proxy, _i } = counted(
        &["erp.plant3"],
        &route("erp.plant3", "127.0.0.1", &[origin.port()], ""),
        2,
    )
    .await;
    wait_open(&proxy, 3, "pool filled").await;
    let url = format!("http://erp.plant3:{}/", origin.port());

    // Kill the parked connections, keep the control connection: O must not
    // hand the next client a dead one, and I parks new ones.
    proxy.cut(|n| n != 0);
    let out = Curl::new(&url).proxy(&o.url()).run().await;
    assert_eq!(out.status, 200, "{out:?}");
    // The control connection, two parked, and the request's data connection
    // idle in O's pool.
    wait_open(&proxy, 4, "pool replaced").await;
    for _ in 0..3 {
        assert_eq!(Curl::new(&url).proxy(&o.url()).run().await.status, 200);
    }

    // Kill only the control connection: both relays close that uplink's
    // parked connections, O its idle pooled one; I reconnects and parks two
    // new ones.
    let before = proxy.passed();
    proxy.cut(|n| n == 0);
    assert!(
        eventually(Duration::from_secs(15), || async {
            proxy.passed() >= before + 3 && proxy.open() == 3
        })
        .await,
        "after the control connection died: {} passed (before {before}), {} open",
        proxy.passed(),
        proxy.open()
    );
    wait_state(&o, "erp.plant3", "connected").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            Curl::new(&url).proxy(&o.url()).run().await.status == 200
        })
        .await
    );

    // Kill everything: the same again.
    proxy.cut(|_| true);
    assert!(
        eventually(Duration::from_secs(15), || async {
            Curl::new(&url).proxy(&o.url()).run().await.status == 200
        })
        .await,
        "requests did not work again after every connection was cut"
    );
    wait_open(&proxy, 4, "pool back after a full cut").await;
}

fn sessions_of(s: &serde_json::Value, name: &str) -> Option<u64> {
    service_field(s, name, "sessions")
}

fn parked_of(s: &serde_json::Value, name: &str) -> Option<u64> {
    service_field(s, name, "parked")
}

/// A number in the `/services` row of `name`.
fn service_field(s: &serde_json::Value, name: &str, field: &str) -> Option<u64> {
    s["services"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?[field]
        .as_u64()
}

#[tokio::test]
async fn sequential_requests_reuse_one_data_connection() {
    let origin = Origin::ok().await;
    let other = Origin::ok().await;
    let echo = EchoServer::start().await;
    let routes = [
        route("erp.plant3", "127.0.0.1", &[origin.port()], ""),
        route("mes.plant3", "127.0.0.1", &[other.port()], ""),
        route("db.plant3", "127.0.0.1", &[echo.port()], ""),
    ]
    .concat();
    let Counted { o, proxy, _i } =
        counted(&["erp.plant3", "mes.plant3", "db.plant3"], &routes, 0).await;
    assert_eq!((proxy.passed(), proxy.open()), (1, 1));

    // Five requests, each from its own curl (its own client connection to
    // O): one session, one data connection, kept by O between them.
    for n in 1..=5 {
        let url = format!("http://erp.plant3:{}/r{n}", origin.port());
        let out = Curl::new(&url).proxy(&o.url()).run().await;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.text(), format!("ok /r{n}"));
    }
    assert_eq!(
        proxy.passed(),
        2,
        "I dialled more than one data connection for five sequential requests"
    );
    let targets: Vec<String> = origin.received().iter().map(|r| r.target.clone()).collect();
    assert_eq!(targets, ["/r1", "/r2", "/r3", "/r4", "/r5"]);
    // Idle in O's pool, the data connection is open but no open session.
    assert_eq!(proxy.open(), 2);
    assert_eq!(sessions_of(&services(&o).await, "erp.plant3"), Some(0));

    // Another name of the same uplink gets a data connection of its own
    // (pooled per name and port), which its next request reuses.
    for _ in 0..2 {
        let url = format!("http://mes.plant3:{}/m", other.port());
        assert_eq!(Curl::new(&url).proxy(&o.url()).run().await.status, 200);
    }
    assert_eq!(proxy.passed(), 3);
    assert_eq!(other.received().len(), 2);

    // A CONNECT is a session on a new data connection, never pooled: it
    // closes with the tunnel.
    let (s, _) = connect_via(o.addr, &format!("db.plant3:{}", echo.port())).await;
    assert_eq!(proxy.passed(), 4);
    assert_eq!(sessions_of(&services(&o).await, "db.plant3"), Some(1));
    let back = echo_round(s, b"x").await;
    assert_eq!(back, b"xbye\n");
    wait_open(&proxy, 3, "the CONNECT's data connection closed").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            sessions_of(&services(&o).await, "db.plant3") == Some(0)
        })
        .await
    );

    // And the first name still rides on its first data connection.
    let url = format!("http://erp.plant3:{}/r6", origin.port());
    assert_eq!(Curl::new(&url).proxy(&o.url()).run().await.status, 200);
    assert_eq!(proxy.passed(), 4);
    assert_eq!(origin.received().len(), 6);
}

#[tokio::test]
async fn a_pooled_data_connection_does_not_outlive_its_control_connection() {
    let origin = Origin::ok().await;
    let Counted { o, proxy, _i } = counted(
        &["erp.plant3"],
        &route("erp.plant3", "127.0.0.1", &[origin.port()], ""),
        0,
    )
    .await;
    let url = format!("http://erp.plant3:{}/", origin.port());
    assert_eq!(Curl::new(&url).proxy(&o.url()).run().await.status, 200);
    assert_eq!((proxy.passed(), proxy.open()), (2, 2));

    // Cut only the control connection, and keep I from coming back: the
    // idle data connection still works on the wire, but O drops it with its
    // control connection, and answers 502 naming the uplink.
    proxy.refuse_new(true);
    proxy.cut(|n| n == 0);
    wait_state(&o, "erp.plant3", "disconnected").await;
    wait_open(&proxy, 0, "O closed the pooled data connection").await;
    let out = Curl::new(&url).proxy(&o.url()).run().await;
    assert_eq!(out.status, 502, "{out:?}");
    assert!(out.text().contains("uplink plant-3"), "{}", out.text());
    assert_eq!(
        origin.received().len(),
        1,
        "a request went through a stale data connection"
    );

    // I reconnects: requests work again, on a new data connection.
    proxy.refuse_new(false);
    wait_state(&o, "erp.plant3", "connected").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            Curl::new(&url).proxy(&o.url()).run().await.status == 200
        })
        .await,
        "requests did not work again after the reconnect"
    );
    assert_eq!(origin.received().len(), 2);
    wait_open(&proxy, 2, "a new control and a new data connection").await;
}

#[tokio::test]
async fn the_inside_relays_idle_timeout_ends_a_pooled_data_connection() {
    let origin = Origin::ok().await;
    let routes = format!(
        "{}\n[limits]\nidle_timeout = \"300ms\"\n",
        route("erp.plant3", "127.0.0.1", &[origin.port()], "")
    );
    let Counted { o, proxy, _i } = counted(&["erp.plant3"], &routes, 0).await;
    let url = format!("http://erp.plant3:{}/", origin.port());
    assert_eq!(Curl::new(&url).proxy(&o.url()).run().await.status, 200);
    assert_eq!(proxy.passed(), 2);
    // I keeps the data connection open between requests until its idle
    // timeout, then closes it...
    assert!(
        eventually(Duration::from_secs(10), || async {
            proxy.closed_by_inside() == 1
        })
        .await,
        "I did not close its idle data connection"
    );
    // ...and O, finding it closed, opens a new session for the next request.
    assert_eq!(Curl::new(&url).proxy(&o.url()).run().await.status, 200);
    assert_eq!(proxy.passed(), 3);
    assert_eq!(origin.received().len(), 2);
}

#[tokio::test]
async fn parking_needs_the_pool_key_of_a_connected_uplink() {
    let origin = Origin::ok().await;
    let o = Relay::start(&config_with("", &accept("plant-3", "s", &["*.plant3"], ""))).await;
    let park = |id: &str, key: &str| {
        format!("GET /.porthole/uplink/data HTTP/1.1\r\nHost: relay.test\r\nConnection: Upgrade\r\nUpgrade: porthole-uplink-data/1\r\nPorthole-Uplink: {id}\r\nPorthole-Pool: {key}\r\n\r\n")
    };
    // No uplink connected yet: nothing can park.
    let answer = raw_exchange(
        o.addr,
        park("plant-3", "").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    let _i = Relay::start(&inside_pooled(
        &o.addr.to_string(),
        &["erp.plant3"],
        &route("erp.plant3", "127.0.0.1", &[origin.port()], ""),
        1,
    ))
    .await;
    wait_state(&o, "erp.plant3", "connected").await;
    for (id, key) in [
        ("plant-3", "0123456789abcdef0123456789abcdef"),
        ("plant-3", ""),
        ("plant-4", "0123456789abcdef0123456789abcdef"),
    ] {
        let answer = raw_exchange(o.addr, park(id, key).as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{id} {key}: {answer}");
        assert!(answer.contains("Connection: close"), "{answer}");
    }
    // The real inside relay parks and serves.
    let url = format!("http://erp.plant3:{}/", origin.port());
    assert_eq!(Curl::new(&url).proxy(&o.url()).run().await.status, 200);
}

#[test]
fn the_pool_size_is_validated() {
    let config = |pool: usize| {
        porthole_relay::Config::from_toml(&inside_pooled(
            "relay.outside.test:8080",
            &["erp.plant3"],
            &route("erp.plant3", "127.0.0.1", &[80], ""),
            pool,
        ))
    };
    assert!(config(0).is_ok());
    assert!(config(64).is_ok());
    let Err(err) = config(65) else {
        panic!("pool = 65 accepted");
    };
    let err = err.to_string();
    assert!(err.contains("uplink.pool"), "{err}");
}

/// An HTTP/2 client that resets its CONNECT stream while the relay is still
/// dialling (here: waiting for an inside relay that never opens the
/// session) gets an access line all the same, with status 499.
#[tokio::test]
async fn an_http2_connect_reset_while_dialling_is_logged_as_499() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let o = Relay::start(&config_with(
        "",
        &format!(
            "{}\n[log]\naccess = \"{}\"\n",
            accept("mute", "m", &["*.mute"], ""),
            log.display()
        ),
    ))
    .await;
    let mut control = mute_uplink(&o, "mute", "m", "db.mute").await;

    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(o.addr).await.unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::connect("db.mute:5432")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let stream = tokio::spawn(async move { sender.send_request(req).await.map(|r| r.status()) });
    // O asks the uplink to open a session: the relay is dialling.
    let mut got = Vec::new();
    let line = read_until(&mut control, &mut got, b"\n").await;
    assert!(
        String::from_utf8_lossy(&line).contains("\"open\""),
        "{line:?}"
    );
    stream.abort();

    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    let logged = || async { lines().contains("method=CONNECT") };
    assert!(eventually(Duration::from_secs(10), logged).await, "no line");
    porthole_suite::assert_fields(
        &lines(),
        &["status=499", "target=\"db.mute:5432\"", "route=\"db.mute\""],
    );
    // The uplink's control connection is not a request: no line of its own.
    assert_eq!(lines().lines().count(), 1, "{}", lines());
}

// ---------------------------------------------------------------- TLS

/// O requires TLS on its aggregate port; two inside relays reach it over
/// TLS, one directly with a parked data connection (`pool = 1`), one
/// through an outbound HTTP proxy (TLS inside the proxy's CONNECT tunnel).
/// Clients reach O over TLS too (`--proxy https://`).
/// An outside relay that requires client certificates takes an inside
/// relay's control and data connections when it presents one (`[uplink]
/// cert`, `key`); without one it never registers.
#[tokio::test]
async fn an_inside_relay_presents_a_client_certificate_when_the_outside_requires_one() {
    let (dir, ca, clients) = (Dir::new(), Ca::new("outside ca"), Ca::new("client ca"));
    let ca_file = dir.write("ca.pem", &ca.pem());
    let leaf = ca.server(&["127.0.0.1"]);
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nrequire = true\nclient_ca = \"{}\"\nclient_auth = \"required\"\n",
        dir.write("o.pem", &leaf.cert),
        dir.write("o.key", &leaf.key),
        dir.write("client-ca.pem", &clients.pem()),
    );
    let accepted =
        accept("plant-3", "s3", &["*.plant3"], "") + &accept("plant-4", "s4", &["*.plant4"], "");
    let o = Relay::start(&config_with("", &format!("{tls}\n{accepted}"))).await;
    let origin = Origin::ok().await;
    let plant3 = clients.client("plant-3");
    let plant3_cert = dir.write("plant3.pem", &plant3.cert);
    let plant3_key = dir.write("plant3.key", &plant3.key);
    // The config of inside relay plant-N offering erp.plantN over TLS, plus `extra`.
    let plant = |n: u8, extra: String| {
        let (id, name) = (format!("plant-{n}"), format!("erp.plant{n}"));
        let config = inside(
            &o.addr.to_string(),
            &id,
            &format!("s{n}"),
            &[name.as_str()],
            &route(&name, "127.0.0.1", &[origin.port()], ""),
        );
        format!("{config}tls = true\nca = \"{ca_file}\"\n{extra}")
    };
    let identity = format!("cert = \"{plant3_cert}\"\nkey = \"{plant3_key}\"\n");
    let _i3 = Relay::start(&plant(3, identity)).await;
    let _i4 = Relay::start(&plant(4, String::new())).await;
    let get = |url: String| {
        let (proxy, ca_file) = (format!("https://{}", o.addr), ca_file.clone());
        let (cert, key) = (plant3_cert.clone(), plant3_key.clone());
        async move {
            Curl::new(&url)
                .proxy(&proxy)
                .args(&["--proxy-cacert", &ca_file])
                .args(&["--proxy-cert", &cert, "--proxy-key", &key])
                .run()
                .await
        }
    };
    let url = format!("http://erp.plant3:{}/with-cert", origin.port());
    let out = answered("erp.plant3", || get(url.clone())).await;
    assert_eq!(out.text(), "ok /with-cert");
    // plant-4 has no certificate: its handshakes fail, it never registers.
    let out = get(format!("http://erp.plant4:{}/", origin.port())).await;
    assert_eq!(out.status, 502, "{out:?}");
    assert!(out.text().contains("uplink plant-4"), "{}", out.text());
}

#[tokio::test]
async fn uplinks_over_tls_to_an_outside_relay_that_requires_it() {
    let (dir, ca) = (Dir::new(), Ca::new("outside ca"));
    let ca_file = dir.write("ca.pem", &ca.pem());
    let leaf = ca.server(&["127.0.0.1"]);
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nrequire = true\n",
        dir.write("o.pem", &leaf.cert),
        dir.write("o.key", &leaf.key)
    );
    let accepted =
        accept("plant-3", "s3", &["*.plant3"], "") + &accept("plant-4", "s4", &["*.plant4"], "");
    let o = Relay::start(&config_with("", &format!("{tls}\n{accepted}"))).await;
    // An ordinary relay as the inside network's outbound HTTP proxy.
    let outbound = Relay::start(&config_with(
        &route("127.0.0.1", "127.0.0.1", &[o.addr.port()], ""),
        "",
    ))
    .await;

    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let uplink_tls = format!("tls = true\nca = \"{ca_file}\"\n");
    let routes3 = route("erp.plant3", "127.0.0.1", &[origin.port()], "")
        + &route("db.plant3", "127.0.0.1", &[echo.port()], "");
    let _i3 = Relay::start(&format!(
        "{}{uplink_tls}pool = 1\n",
        inside(
            &o.addr.to_string(),
            "plant-3",
            "s3",
            &["erp.plant3", "db.plant3"],
            &routes3
        )
    ))
    .await;
    let routes4 = route("erp.plant4", "127.0.0.1", &[origin.port()], "");
    let _i4 = Relay::start(&format!(
        "{}{uplink_tls}proxy = \"{}\"\n",
        inside(
            &o.addr.to_string(),
            "plant-4",
            "s4",
            &["erp.plant4"],
            &routes4
        ),
        outbound.addr
    ))
    .await;

    let o_proxy = format!("https://{}", o.addr);
    let get = |url: String| {
        let (o_proxy, ca_file) = (o_proxy.clone(), ca_file.clone());
        async move {
            Curl::new(&url)
                .proxy(&o_proxy)
                .args(&["--proxy-cacert", &ca_file])
                .run()
                .await
        }
    };
    for plant in ["plant3", "plant4"] {
        let url = format!("http://erp.{plant}:{}/{plant}", origin.port());
        let out = answered(&format!("erp.{plant}"), || get(url.clone())).await;
        assert_eq!(out.text(), format!("ok /{plant}"), "{out:?}");
    }

    // plant-4's control and data connections went through the outbound proxy.
    let through = metric(&outbound, "porthole_connections_accepted_total").await;
    assert!(through >= 2.0, "{through}");

    // A CONNECT tunnel through O and the TLS data connection to I.
    let out = Curl::new(&format!("http://erp.plant3:{}/tunnelled", origin.port()))
        .proxy(&o_proxy)
        .args(&["--proxy-cacert", &ca_file, "-p"])
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /tunnelled");
}
