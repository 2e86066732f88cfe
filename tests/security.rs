//! Security on the aggregate port, driven by the real curl: TLS and plain on
//! one port, `require`, ALPN `h2`, client certificates, upstream TLS, users and
//! the 407 flow, access rules by user, group, network and port, reload of
//! rules under an open tunnel, and the per-client request rate.
//! Certificates are generated for each test (rcgen); none are committed.

mod security_support;

use std::time::Duration;

use porthole_suite::{
    config_with, raw_exchange, route, Curl, EchoServer, Origin, Relay, RelayProcess,
};
use security_support::{tls_client, Ca, Dir, Leaf, TlsFront};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `[tls]` for a relay certificate valid for 127.0.0.1, plus `extra` lines.
fn tls_section(dir: &Dir, leaf: &Leaf, extra: &str) -> String {
    let cert = dir.write("relay.pem", &leaf.cert);
    let key = dir.write("relay.key", &leaf.key);
    format!("[tls]\ncert = \"{cert}\"\nkey = \"{key}\"\n{extra}\n")
}

fn relay_leaf(ca: &Ca) -> Leaf {
    ca.server(&["127.0.0.1", "localhost"])
}

/// A users file with `name:password` pairs.
fn users_file(dir: &Dir, users: &[(&str, &str)]) -> String {
    let lines: Vec<String> = users
        .iter()
        .map(|(n, p)| porthole_relay::secret::passwd_line(n, p).unwrap())
        .collect();
    dir.write("users", &(lines.join("\n") + "\n"))
}

fn https_proxy(relay: &Relay) -> String {
    format!("https://{}", relay.addr)
}

#[tokio::test]
async fn tls_and_plain_on_one_port() {
    let (dir, ca) = (Dir::new(), Ca::new("relay ca"));
    let ca_pem = dir.write("ca.pem", &ca.pem());
    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "")
        + &route("db.test", "127.0.0.1", &[echo.port()], "");
    let tls = tls_section(&dir, &relay_leaf(&ca), "");
    let relay = Relay::start(&config_with(&routes, &tls)).await;
    let url = format!("http://app-a.test:{}/x", origin.port());

    let over_tls = Curl::new(&url)
        .args(&["--proxy", &https_proxy(&relay), "--proxy-cacert", &ca_pem])
        .run()
        .await;
    assert_eq!(over_tls.status, 200, "{over_tls:?}");
    assert_eq!(over_tls.text(), "ok /x");

    let plain = Curl::new(&url).proxy(&relay.url()).run().await;
    assert_eq!(plain.status, 200, "{plain:?}");

    // A CONNECT tunnel inside the TLS connection to the relay.
    let tunnelled = Curl::new(&url)
        .args(&[
            "-p",
            "--proxy",
            &https_proxy(&relay),
            "--proxy-cacert",
            &ca_pem,
        ])
        .run()
        .await;
    assert_eq!(tunnelled.status, 200, "{tunnelled:?}");
    let (mut tls, _) = tls_client(relay.addr, &ca.pem(), &[]).await;
    let req = format!("CONNECT db.test:{} HTTP/1.1\r\n\r\nping", echo.port());
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut back = vec![0u8; 43];
    tls.read_exact(&mut back).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&back),
        "HTTP/1.1 200 Connection established\r\n\r\nping"
    );
}

#[tokio::test]
async fn require_refuses_plain_http_with_400() {
    let (dir, ca) = (Dir::new(), Ca::new("relay ca"));
    let ca_pem = dir.write("ca.pem", &ca.pem());
    let origin = Origin::ok().await;
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "");
    let tls = tls_section(&dir, &relay_leaf(&ca), "require = true");
    let relay = Relay::start(&config_with(&routes, &tls)).await;
    let url = format!("http://app-a.test:{}/", origin.port());

    let plain = Curl::new(&url).proxy(&relay.url()).run().await;
    assert_eq!(plain.status, 400);
    assert!(plain.text().contains("requires TLS"), "{}", plain.text());
    assert!(origin.received().is_empty());
    // Cleartext HTTP/2 is refused too (closed, nothing served).
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let answer = raw_exchange(relay.addr, preface, Duration::from_secs(5)).await;
    assert_eq!(answer, "");

    let over_tls = Curl::new(&url)
        .args(&["--proxy", &https_proxy(&relay), "--proxy-cacert", &ca_pem])
        .run()
        .await;
    assert_eq!(over_tls.status, 200, "{over_tls:?}");
}

/// One HTTP/2 request on a TLS stream that negotiated `h2`.
async fn h2_get(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    url: &str,
    authorization: Option<&str>,
) -> (u16, Vec<String>, String) {
    use http_body_util::BodyExt;
    let io = hyper_util::rt::TokioIo::new(tls);
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(url);
    if let Some(value) = authorization {
        req = req.header("proxy-authorization", value);
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get_all("proxy-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        challenge,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn alpn_h2_is_served_through_the_same_gate() {
    let (dir, ca) = (Dir::new(), Ca::new("relay ca"));
    let origin = Origin::ok().await;
    let users = users_file(&dir, &[("alice", "secret")]);
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "");
    let tls = tls_section(&dir, &relay_leaf(&ca), "");
    let auth = format!("[auth]\nusers_file = \"{users}\"\nrequired = true\nrealm = \"corp\"\n");
    let relay = Relay::start(&config_with(&routes, &format!("{tls}{auth}"))).await;
    let url = format!("http://app-a.test:{}/alpn", origin.port());

    let (tls, chosen) = tls_client(relay.addr, &ca.pem(), &[b"h2", b"http/1.1"]).await;
    assert_eq!(chosen.as_deref(), Some(&b"h2"[..]));
    let (status, challenge, _) = h2_get(tls, &url, None).await;
    assert_eq!(status, 407);
    assert_eq!(challenge, ["Basic realm=\"corp\""]);

    let (tls, _) = tls_client(relay.addr, &ca.pem(), &[b"h2", b"http/1.1"]).await;
    let basic = "Basic YWxpY2U6c2VjcmV0"; // alice:secret
    let (status, _, body) = h2_get(tls, &url, Some(basic)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "ok /alpn");
    assert!(origin.single().header("proxy-authorization").is_none());

    // A client that offers only HTTP/1.1 gets HTTP/1.1.
    let (mut tls, chosen) = tls_client(relay.addr, &ca.pem(), &[b"http/1.1"]).await;
    assert_eq!(chosen.as_deref(), Some(&b"http/1.1"[..]));
    let req = format!(
        "GET {url} HTTP/1.1\r\nHost: app-a.test\r\nProxy-Authorization: {basic}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// HTTP/2 over TLS addressed to the relay as to the server itself
/// (`:scheme https`, as a browser talks to a reverse proxy) is the HTTP/1
/// request in origin form over TLS: routed by its authority, or answered by
/// the relay for its own name. Over cleartext an `https` URI is still refused.
#[tokio::test]
async fn h2_over_tls_in_origin_form_is_routed_by_its_authority() {
    let (dir, ca) = (Dir::new(), Ca::new("relay ca"));
    let ca_pem = dir.write("ca.pem", &ca.pem());
    let origin = Origin::ok().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let port = addr.port();
    let to = format!("127.0.0.1:{}", origin.port());
    let routes = route("app-a.test", &to, &[port], "");
    let tls = tls_section(&dir, &ca.server(&["relay.test", "app-a.test"]), "");
    let config = porthole_relay::Config::from_toml(&config_with(&routes, &tls)).unwrap();
    let _relay = Relay::start_on(config, listener).await;
    let https = |host: &str, path: &str| {
        Curl::new(&format!("https://{host}:{port}{path}")).args(&[
            "--http2",
            "--cacert",
            &ca_pem,
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
        ])
    };

    let routed = https("app-a.test", "/h2tls?q=1").run().await;
    assert!(routed.head.starts_with("HTTP/2 200"), "{routed:?}");
    assert_eq!(routed.text(), "ok /h2tls?q=1");
    let seen = origin.single();
    assert_eq!(seen.target, "/h2tls?q=1");
    assert_eq!(
        seen.header("host"),
        Some(format!("app-a.test:{port}").as_str())
    );

    let pac = https("relay.test", "/proxy.pac").run().await;
    assert!(pac.head.starts_with("HTTP/2 200"), "{pac:?}");
    assert!(pac.text().contains("FindProxyForURL"), "{}", pac.text());

    let mut cleartext = porthole_suite::h2c(addr).await;
    let req = http::Request::get(format!("https://app-a.test:{port}/x"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = cleartext.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(origin.received().len(), 1);
}

#[tokio::test]
async fn a_stalled_handshake_is_closed_after_head_timeout() {
    let (dir, ca) = (Dir::new(), Ca::new("relay ca"));
    let tls = tls_section(&dir, &relay_leaf(&ca), "[limits]\nhead_timeout = \"300ms\"");
    let relay = Relay::start(&config_with("", &tls)).await;
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    assert!(read.is_ok(), "the relay kept a stalled handshake open");
}

async fn client_cert_relay(
    dir: &Dir,
    ca: &Ca,
    client_ca: &Ca,
    mode: &str,
    origin: &Origin,
) -> Relay {
    let client_ca_pem = dir.write("client-ca.pem", &client_ca.pem());
    let extra = format!("client_ca = \"{client_ca_pem}\"\nclient_auth = \"{mode}\"\n");
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "")
        + &route("app-b.test", "127.0.0.1", &[origin.port()], "");
    // The certificate user carol may reach app-a.test only; anonymous users nothing.
    let rules = "[[rule]]\nusers = [\"carol\"]\nroutes = [\"app-a.test\"]\nallow = true\n";
    let tls = tls_section(dir, &relay_leaf(ca), &extra);
    Relay::start(&config_with(&routes, &format!("{tls}{rules}"))).await
}

fn with_client_cert(curl: Curl, dir: &Dir, leaf: &Leaf, name: &str) -> Curl {
    let cert = dir.write(&format!("{name}.pem"), &leaf.cert);
    let key = dir.write(&format!("{name}.key"), &leaf.key);
    curl.args(&["--proxy-cert", &cert, "--proxy-key", &key])
}

#[tokio::test]
async fn optional_client_certificate_names_the_user_for_rules() {
    let (dir, ca, clients) = (Dir::new(), Ca::new("relay ca"), Ca::new("client ca"));
    let ca_pem = dir.write("ca.pem", &ca.pem());
    let origin = Origin::ok().await;
    let relay = client_cert_relay(&dir, &ca, &clients, "optional", &origin).await;
    let carol = clients.client("carol");
    let via_tls = |url: &str| {
        Curl::new(url).args(&["--proxy", &https_proxy(&relay), "--proxy-cacert", &ca_pem])
    };
    let a = format!("http://app-a.test:{}/", origin.port());
    let b = format!("http://app-b.test:{}/", origin.port());

    let as_carol = with_client_cert(via_tls(&a), &dir, &carol, "carol")
        .run()
        .await;
    assert_eq!(as_carol.status, 200, "{as_carol:?}");
    let carol_elsewhere = with_client_cert(via_tls(&b), &dir, &carol, "carol")
        .run()
        .await;
    assert_eq!(carol_elsewhere.status, 403);
    assert!(carol_elsewhere.text().contains("no rule allows it"));

    // Optional: no certificate is still a TLS connection, of an anonymous user.
    let anonymous = via_tls(&a).run().await;
    assert_eq!(anonymous.status, 403, "{anonymous:?}");
    assert!(
        anonymous.text().contains("no rule allows it"),
        "{}",
        anonymous.text()
    );
}

#[tokio::test]
async fn required_client_certificate_refuses_handshakes_without_one() {
    let (dir, ca, clients) = (Dir::new(), Ca::new("relay ca"), Ca::new("client ca"));
    let ca_pem = dir.write("ca.pem", &ca.pem());
    let origin = Origin::ok().await;
    let relay = client_cert_relay(&dir, &ca, &clients, "required", &origin).await;
    let a = format!("http://app-a.test:{}/", origin.port());
    let via_tls =
        || Curl::new(&a).args(&["--proxy", &https_proxy(&relay), "--proxy-cacert", &ca_pem]);

    let without = via_tls().run().await;
    assert_ne!(without.exit, 0, "{without:?}");
    assert_eq!(without.status, 0);

    let stranger = Ca::new("other ca").client("carol");
    let forged = with_client_cert(via_tls(), &dir, &stranger, "forged")
        .run()
        .await;
    assert_ne!(forged.exit, 0, "{forged:?}");

    let carol = with_client_cert(via_tls(), &dir, &clients.client("carol"), "carol")
        .run()
        .await;
    assert_eq!(carol.status, 200, "{carol:?}");
    assert!(origin.received().len() == 1);
}

#[tokio::test]
async fn upstream_tls_is_verified_pooled_and_explained() {
    let (dir, good, bad) = (Dir::new(), Ca::new("internal ca"), Ca::new("unrelated ca"));
    let good_pem = dir.write("good.pem", &good.pem());
    let bad_pem = dir.write("bad.pem", &bad.pem());
    let origin = Origin::ok().await;
    let front = TlsFront::start(&good.server(&["localhost"]), origin.addr).await;
    let routes = route(
        "secure.test",
        &format!("https://localhost:{}", front.port()),
        &[80],
        &format!("ca = \"{good_pem}\""),
    ) + &route(
        "bad.test",
        "localhost",
        &[front.port()],
        &format!("tls = true\nca = \"{bad_pem}\""),
    );
    let relay = Relay::start(&config_with(&routes, "")).await;

    // Two requests on one client connection: one upstream TLS connection.
    let out = Curl::new("http://secure.test/one")
        .arg("http://secure.test/two")
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /one"); // curl writes the second body elsewhere
    let got = origin.received();
    let targets: Vec<&str> = got.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(targets, ["/one", "/two"]);
    assert_eq!(got[0].header("host"), Some("secure.test"));
    assert_eq!(origin.connections(), 1, "the TLS connection was not pooled");

    let refused = Curl::new(&format!("http://bad.test:{}/", front.port()))
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(refused.status, 502);
    let text = refused.text();
    assert!(text.contains("route bad.test"), "{text}");
    assert!(
        text.contains("certificate verify failed: UnknownIssuer"),
        "{text}"
    );
    assert_eq!(origin.received().len(), 2);
}

#[tokio::test]
async fn passwords_407_flow_never_forwarded_nor_logged() {
    let dir = Dir::new();
    let hashed = std::process::Command::new(porthole_suite::binary("porthole-relay"))
        .args(["passwd", "alice"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"secret\n")?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(hashed.status.success());
    let line = String::from_utf8(hashed.stdout).unwrap();
    assert!(line.starts_with("alice:$argon2id$"), "{line}");
    let users = dir.write("users", &line);

    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "")
        + &route("db.test", "127.0.0.1", &[echo.port()], "");
    let auth = format!("[auth]\nusers_file = \"{users}\"\nrequired = true\nrealm = \"corp\"\n");
    let config = dir.write("relay.toml", &config_with(&routes, &auth));
    let relay = RelayProcess::spawn(std::path::Path::new(&config), &[]).await;
    let url = format!("http://app-a.test:{}/", origin.port());

    let none = Curl::new(&url).proxy(&relay.url()).run().await;
    assert_eq!(none.status, 407);
    assert_eq!(
        none.header("proxy-authenticate"),
        vec!["Basic realm=\"corp\""]
    );
    let wrong = Curl::new(&url)
        .proxy(&relay.url())
        .args(&["-U", "alice:wrong"])
        .run()
        .await;
    assert_eq!(wrong.status, 407);
    let unknown = Curl::new(&url)
        .proxy(&relay.url())
        .args(&["-U", "mallory:secret"])
        .run()
        .await;
    assert_eq!(unknown.status, 407);
    assert!(origin.received().is_empty());

    // Right: relayed, twice on one connection (the second from the cache).
    let right = Curl::new(&url)
        .arg(&url)
        .proxy(&relay.url())
        .args(&["-U", "alice:secret"])
        .run()
        .await;
    assert_eq!(right.status, 200, "{right:?}");
    for got in origin.received() {
        assert!(
            got.header("proxy-authorization").is_none(),
            "{}",
            got.raw_head
        );
    }

    // CONNECT needs the same credentials.
    let req = format!("CONNECT db.test:{} HTTP/1.1\r\n\r\n", echo.port());
    let answer = answer_to(relay.addr, &req).await;
    assert!(answer.starts_with("HTTP/1.1 407"), "{answer}");
    let tunnelled = Curl::new(&url)
        .proxy(&relay.url())
        .args(&["-p", "-U", "alice:secret"])
        .run()
        .await;
    assert_eq!(tunnelled.status, 200, "{tunnelled:?}");

    // Lines are written by the relay's log thread: wait for the user's
    // access line before looking for what must not be there.
    let named = porthole_suite::eventually(Duration::from_secs(5), || {
        let log = relay.log_text();
        async move { log.contains("alice") }
    })
    .await;
    let log = relay.log_text();
    assert!(named, "the access log names the user: {log}");
    assert!(!log.contains("secret"), "{log}");
    assert!(!log.contains("YWxpY2U6c2VjcmV0"), "{log}"); // base64 of alice:secret
}

#[tokio::test]
async fn rules_by_user_group_network_and_port() {
    let dir = Dir::new();
    let users = users_file(
        &dir,
        &[("alice", "a-pw"), ("bob", "b-pw"), ("carol", "c-pw")],
    );
    let (a, b) = (Origin::ok().await, Origin::ok().await);
    let routes = route("app-a.test", "127.0.0.1", &[a.port(), b.port()], "")
        + &route("app-b.test", "127.0.0.1", &[b.port()], "");
    let extra = format!(
        r#"
[auth]
users_file = "{users}"
[auth.groups]
ops = ["alice", "bob"]

[[rule]]
from = ["127.0.0.2/32"]
allow = false

[[rule]]
users = ["group:ops"]
routes = ["*.test"]
allow = true

[[rule]]
users = ["carol"]
routes = ["app-a.test"]
ports = [{}]
allow = true
"#,
        a.port()
    );
    let relay = Relay::start(&config_with(&routes, &extra)).await;
    let get = |user: &str, url: String, iface: &str| {
        Curl::new(&url)
            .proxy(&relay.url())
            .args(&["-U", user, "--interface", iface])
    };
    let app_a = format!("http://app-a.test:{}/", a.port());
    let app_a_other_port = format!("http://app-a.test:{}/", b.port());
    let app_b = format!("http://app-b.test:{}/", b.port());
    let local = "127.0.0.1";
    let cases = [
        ("alice:a-pw", app_b.clone(), local, 200, ""),
        ("bob:b-pw", app_a_other_port.clone(), local, 200, ""),
        ("carol:c-pw", app_a.clone(), local, 200, ""),
        (
            "carol:c-pw",
            app_a_other_port,
            local,
            403,
            "no rule allows it",
        ),
        ("carol:c-pw", app_b.clone(), local, 403, "no rule allows it"),
        ("alice:a-pw", app_b, "127.0.0.2", 403, "refused by rule[0]"),
    ];
    for (user, url, iface, status, says) in cases {
        let out = get(user, url.clone(), iface).run().await;
        assert_eq!(out.status, status, "{user} {url} from {iface}: {out:?}");
        assert!(out.text().contains(says), "{}", out.text());
        assert!(!out.text().contains("rule[1]") && !out.text().contains("rule[2]"));
    }
    // Without credentials there is no user: only rules without `users` apply.
    let anonymous = Curl::new(&app_a).proxy(&relay.url()).run().await;
    assert_eq!(anonymous.status, 403);
}

/// Sends `request` and reads the answer: the head, and what follows it
/// until the relay closes or 2 s pass (an allowed CONNECT stays open).
async fn answer_to(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if out.windows(4).any(|w| w == b"\r\n\r\n") && out.starts_with(b"HTTP/1.1 200") {
                return;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn rules_by_topic_on_the_event_endpoints() {
    let dir = Dir::new();
    let users = users_file(&dir, &[("alice", "a-pw"), ("bob", "b-pw")]);
    let extra = format!(
        "[auth]\nusers_file = \"{users}\"\n\
         [[rule]]\nusers = [\"alice\"]\ntopics = [\"plant-*\"]\nallow = true\n"
    );
    let relay = Relay::start(&config_with("", &extra)).await;
    let poll = |topic: &str, user: &str| {
        Curl::new(&format!("http://relay.test/events/{topic}?wait=0"))
            .proxy(&relay.url())
            .args(&["-U", user])
    };
    let alice = poll("plant-7", "alice:a-pw").run().await;
    assert_eq!(alice.status, 200, "{alice:?}");
    let elsewhere = poll("office", "alice:a-pw").run().await;
    assert_eq!(elsewhere.status, 403);
    assert!(
        elsewhere.text().contains("no rule allows it"),
        "{}",
        elsewhere.text()
    );
    let bob = poll("plant-7", "bob:b-pw").run().await;
    assert_eq!(bob.status, 403, "{bob:?}");
}

/// A publisher that stalls its event's body is cut after
/// `limits.body_timeout` with `408`, on the aggregate port and on the admin
/// listener alike (they waited forever), and nothing is stored.
#[tokio::test]
async fn a_stalled_publish_gets_408_on_both_ports() {
    use base64::Engine as _;
    let dir = Dir::new();
    let users = users_file(&dir, &[("sensor", "s-pw")]);
    let extra = format!(
        "[limits]\nbody_timeout = \"1s\"\n[auth]\nusers_file = \"{users}\"\n\
         [events]\npublishers = [\"sensor\"]\n[[rule]]\ntopics = [\"plant-*\"]\nallow = true\n"
    );
    let relay = Relay::start(&config_with("", &extra)).await;
    let basic = base64::engine::general_purpose::STANDARD.encode("sensor:s-pw");
    let cases = [
        (
            relay.addr,
            format!("POST http://relay.test/events/plant-1 HTTP/1.1\r\nHost: relay.test\r\nProxy-Authorization: Basic {basic}\r\nContent-Length: 100\r\n\r\n{{\"t\":"),
        ),
        (
            relay.admin,
            "POST /events/plant-2 HTTP/1.1\r\nHost: admin\r\nContent-Length: 100\r\n\r\n{\"t\":".to_string(),
        ),
    ];
    for (addr, request) in &cases {
        let start = std::time::Instant::now();
        let answer = raw_exchange(*addr, request.as_bytes(), Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{request}: {answer}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }
    let status = Curl::new(&format!("{}/status", relay.admin_url()))
        .run()
        .await
        .text();
    assert!(
        !status.contains("plant-1") && !status.contains("plant-2"),
        "{status}"
    );
}

/// `[events] publishers`: named users may publish on the aggregate port,
/// authenticated like any client, within the topics the rules allow them;
/// the event reaches pollers as one published on the admin listener does.
/// Anyone else is refused (407 without credentials, 403 otherwise), and so
/// is a body that is not JSON or too large; nothing is stored from them.
#[tokio::test]
async fn publishers_publish_on_the_aggregate_port_and_nobody_else_does() {
    let dir = Dir::new();
    let users = users_file(&dir, &[("sensor", "s-pw"), ("reader", "r-pw")]);
    let extra = format!(
        "[auth]\nusers_file = \"{users}\"\n[auth.groups]\nsensors = [\"sensor\"]\n\
         [events]\npublishers = [\"group:sensors\"]\nmax_event_bytes = 64\n\
         [[rule]]\ntopics = [\"plant-*\"]\nallow = true\n"
    );
    let relay = Relay::start(&config_with("", &extra)).await;
    let post = |topic: &str, user: Option<&str>, body: &str| {
        let mut c = Curl::new(&format!("http://relay.test/events/{topic}"))
            .proxy(&relay.url())
            .args(&[
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ]);
        if let Some(u) = user {
            c = c.args(&["-U", u]);
        }
        c
    };
    let out = post("plant-7", Some("sensor:s-pw"), r#"{"t": 21}"#)
        .run()
        .await;
    assert_eq!(out.status, 201, "{out:?}");
    assert_eq!(out.text(), "{\"id\":1}\n");
    let out = post("plant-7", Some("sensor:s-pw"), "[2]").run().await;
    assert_eq!((out.status, out.text()), (201, "{\"id\":2}\n".to_string()));

    // A poller on the aggregate port gets both, with their data.
    let polled = Curl::new("http://relay.test/events/plant-7?after=0&wait=0")
        .proxy(&relay.url())
        .args(&["-U", "reader:r-pw"])
        .run()
        .await;
    assert_eq!(polled.status, 200, "{polled:?}");
    let answer: serde_json::Value = serde_json::from_slice(&polled.body).unwrap();
    let events = answer["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{answer}");
    assert_eq!(events[0]["data"], serde_json::json!({"t": 21}));
    assert_eq!(events[1]["data"], serde_json::json!([2]));

    // Not a publisher, no credentials, a topic no rule allows, bad bodies.
    let reader = post("plant-7", Some("reader:r-pw"), "{}").run().await;
    assert_eq!(reader.status, 403, "{reader:?}");
    assert!(
        reader.text().contains("not one of [events] publishers"),
        "{}",
        reader.text()
    );
    let anonymous = post("plant-7", None, "{}").run().await;
    assert_eq!(anonymous.status, 407, "{anonymous:?}");
    assert!(!anonymous.header("proxy-authenticate").is_empty());
    let office = post("office", Some("sensor:s-pw"), "{}").run().await;
    assert_eq!(office.status, 403, "{office:?}");
    assert!(
        office.text().contains("no rule allows it"),
        "{}",
        office.text()
    );
    let not_json = post("plant-7", Some("sensor:s-pw"), "{oops").run().await;
    assert_eq!(not_json.status, 400, "{not_json:?}");
    let large = format!("\"{}\"", "x".repeat(100));
    let too_large = post("plant-7", Some("sensor:s-pw"), &large).run().await;
    assert_eq!(too_large.status, 413, "{too_large:?}");
    // Chunked, past the limit as it streams.
    let chunked = post("plant-7", Some("sensor:s-pw"), &large)
        .args(&["-H", "Transfer-Encoding: chunked"])
        .run()
        .await;
    assert_eq!(chunked.status, 413, "{chunked:?}");

    let polled = Curl::new("http://relay.test/events/plant-7?after=2&wait=0")
        .proxy(&relay.url())
        .args(&["-U", "reader:r-pw"])
        .run()
        .await;
    let answer: serde_json::Value = serde_json::from_slice(&polled.body).unwrap();
    assert_eq!(
        answer["events"],
        serde_json::json!([]),
        "nothing else stored"
    );
    assert_eq!(answer["next"], 2, "{answer}");

    // The topic's Allow says POST, in OPTIONS and in a 405 alike.
    let with_post = vec!["GET, HEAD, POST, OPTIONS".to_string()];
    for method in ["OPTIONS", "PUT"] {
        let out = Curl::new("http://relay.test/events/plant-7")
            .proxy(&relay.url())
            .args(&["-U", "reader:r-pw", "-X", method])
            .run()
            .await;
        let want = if method == "OPTIONS" { 200 } else { 405 };
        assert_eq!(out.status, want, "{method}: {out:?}");
        assert_eq!(out.header("allow"), with_post, "{method}: {out:?}");
    }
}

/// Without `[events] publishers`, the aggregate port only polls: a POST to
/// an event topic is `405` with `Allow: GET, HEAD, OPTIONS`.
#[tokio::test]
async fn without_publishers_the_aggregate_port_does_not_publish() {
    let relay = Relay::start(&config_with("", "")).await;
    let out = Curl::new("http://relay.test/events/plant-7")
        .proxy(&relay.url())
        .args(&["--data-binary", "{}"])
        .run()
        .await;
    assert_eq!(out.status, 405, "{out:?}");
    assert_eq!(out.header("allow"), vec!["GET, HEAD, OPTIONS".to_string()]);
}

#[tokio::test]
async fn sighup_changes_a_decision_and_keeps_the_open_tunnel() {
    let dir = Dir::new();
    let echo = EchoServer::start().await;
    let routes = route("db.test", "127.0.0.1", &[echo.port()], "");
    let rule = |allow: bool| format!("[[rule]]\nroutes = [\"db.test\"]\nallow = {allow}\n");
    let path = dir.write("relay.toml", &config_with(&routes, &rule(true)));
    let relay = RelayProcess::spawn(std::path::Path::new(&path), &[]).await;
    let connect = format!("CONNECT db.test:{} HTTP/1.1\r\n\r\n", echo.port());

    let mut tunnel = TcpStream::connect(relay.addr).await.unwrap();
    tunnel.write_all(connect.as_bytes()).await.unwrap();
    let mut head = [0u8; 39];
    tunnel.read_exact(&mut head).await.unwrap();
    assert!(head.starts_with(b"HTTP/1.1 200"));

    std::fs::write(&path, config_with(&routes, &rule(false))).unwrap();
    relay.signal("HUP");
    let mut answer = String::new();
    for _ in 0..100 {
        answer = answer_to(relay.addr, &connect).await;
        if answer.starts_with("HTTP/1.1 403") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("refused by rule[0]"), "{answer}");

    tunnel.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
}

#[tokio::test]
async fn request_rate_per_client_gives_429_and_serves_others() {
    let origin = Origin::ok().await;
    let routes = route("app-a.test", "127.0.0.1", &[origin.port()], "");
    let limits = "[limits]\nmax_requests_per_second_per_client = 1\n";
    let relay = Relay::start(&config_with(&routes, limits)).await;
    let url = format!("http://app-a.test:{}/", origin.port());
    let from = |iface: &str| {
        Curl::new(&url)
            .proxy(&relay.url())
            .args(&["--interface", iface])
    };

    let mut limited = None;
    for _ in 0..10 {
        let out = from("127.0.0.1").run().await;
        if out.status == 429 {
            limited = Some(out);
            break;
        }
        assert_eq!(out.status, 200, "{out:?}");
    }
    let limited = limited.expect("no 429 after 10 quick requests at 1 per second");
    assert_eq!(limited.header("retry-after"), vec!["1"]);
    let other = from("127.0.0.2").run().await;
    assert_eq!(
        other.status, 200,
        "another client is still served: {other:?}"
    );
}

/// An HTTP/2 extended CONNECT (a WebSocket, RFC 8441) passes the same gate
/// as any request: `407` without credentials, through with them (they are
/// for the relay, so the server does not see them).
#[tokio::test]
async fn a_websocket_over_http2_passes_the_gate_with_its_credentials() {
    use http_body_util::Empty;
    let dir = Dir::new();
    let origin = Origin::start(|_| porthole_suite::Reply::UpgradeEcho).await;
    let users = users_file(&dir, &[("alice", "secret")]);
    let routes = route("ws.test", "127.0.0.1", &[origin.port()], "");
    let auth = format!("[auth]\nusers_file = \"{users}\"\nrequired = true\nrealm = \"corp\"\n");
    let relay = Relay::start(&config_with(&routes, &auth)).await;
    let mut sender = porthole_suite::h2c(relay.addr).await;
    let extended = |credentials: Option<&'static str>| {
        let mut req =
            porthole_suite::websocket_h2(&format!("http://ws.test:{}/chat", origin.port()));
        if let Some(c) = credentials {
            let value = http::HeaderValue::from_static(c);
            req.headers_mut().insert("proxy-authorization", value);
        }
        req
    };
    // A plain stream first, so the relay's SETTINGS have arrived.
    let get = http::Request::get("http://nowhere.test/")
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(get).await.unwrap().status(), 407);

    let resp = sender.send_request(extended(None)).await.unwrap();
    assert_eq!(resp.status(), 407);
    assert_eq!(resp.headers()["proxy-authenticate"], "Basic realm=\"corp\"");
    assert!(origin.received().is_empty());

    let resp = sender
        .send_request(extended(Some("Basic YWxpY2U6c2VjcmV0"))) // alice:secret
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut tunnel = hyper_util::rt::TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    porthole_suite::websocket_echo(&mut tunnel).await;
    let seen = origin.single();
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert!(seen.header("proxy-authorization").is_none());
}

/// Chaining (PRODUCT 8): a route with `via` goes through the next relay,
/// which authenticates this relay by the credentials in
/// `via_credentials_file`: HTTP in absolute form, and CONNECT. The next
/// hop's routes decide and its refusals pass on; its `407` (wrong
/// credentials) is this relay's `502`, not a challenge to the client.
#[tokio::test]
async fn a_route_via_the_next_relay_with_credentials() {
    let dir = Dir::new();
    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let users = users_file(&dir, &[("edge", "hop-secret")]);
    let voice_echo = porthole_suite::UdpEcho::start().await;
    let voice = voice_echo.port();
    let hop = Relay::start(&format!(
        "[relay]\nlisten = \"127.0.0.1:0\"\nname = \"hop.test\"\n[auth]\nusers_file = \"{users}\"\nrequired = true\n{}{}{}",
        route("app.test", "127.0.0.1", &[origin.port()], ""),
        route("db.test", "127.0.0.1", &[echo.port()], ""),
        route("voice.test", "127.0.0.1", &[voice], "udp = true"),
    ))
    .await;
    let good = dir.write("hop.cred", "edge:hop-secret\n");
    let bad = dir.write("bad.cred", "edge:wrong\n");
    let via = |host: &str, port: u16, credentials: &str| {
        format!(
            "[[route]]\nhost = \"{host}\"\nvia = \"{}\"\nvia_credentials_file = \"{credentials}\"\nports = [{port}]\nudp = true\n",
            hop.addr
        )
    };
    let routes = via("app.test", origin.port(), &good)
        + &via("db.test", echo.port(), &good)
        + &via("voice.test", voice, &good)
        + &via("nowhere.test", origin.port(), &good)
        + &via("bad.test", origin.port(), &bad);
    let front = Relay::start(&config_with(&routes, "")).await;

    let url = format!("http://app.test:{}/chained?x=1", origin.port());
    let out = Curl::new(&url).proxy(&front.url()).run().await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /chained?x=1");
    let seen = origin.single();
    assert_eq!(seen.target, "/chained?x=1");
    let authority = format!("app.test:{}", origin.port());
    assert_eq!(seen.header("host"), Some(authority.as_str()));
    assert!(seen.header("proxy-authorization").is_none());
    let via_seen = seen.all("via").join(", ");
    assert_eq!(
        via_seen,
        "1.1 relay.test (porthole), 1.1 hop.test (porthole)"
    );

    let (tunnel, head) =
        porthole_suite::connect_via(front.addr, &format!("db.test:{}", echo.port())).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        porthole_suite::echo_round(tunnel, b"through two relays").await,
        b"through two relaysbye\n",
        "the echo, then the server's goodbye after the half-close"
    );

    // CONNECT-UDP through both relays: datagrams as capsules, end to end.
    let (mut udp, head) =
        porthole_suite::connect_udp(front.addr, &format!("voice.test:{voice}")).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let mut buf = Vec::new();
    porthole_suite::echo_datagrams(&mut udp, &mut buf, &[&b"hello"[..], b"again"]).await;
    drop(udp);
    let (_, head) =
        porthole_suite::connect_udp(front.addr, &format!("nowhere.test:{}", origin.port())).await;
    assert!(
        head.starts_with("HTTP/1.1 403 "),
        "the hop's refusal: {head}"
    );

    let refused = Curl::new(&format!("http://nowhere.test:{}/x", origin.port()))
        .proxy(&front.url())
        .run()
        .await;
    assert_eq!(refused.status, 403, "the hop's refusal: {refused:?}");

    let wrong = Curl::new(&format!("http://bad.test:{}/x", origin.port()))
        .proxy(&front.url())
        .run()
        .await;
    assert_eq!(wrong.status, 502, "{wrong:?}");
    assert!(wrong.text().contains("credentials"), "{}", wrong.text());
    assert!(wrong.header("proxy-authenticate").is_empty());
    assert!(!wrong.text().contains("wrong"), "no secret in the page");
    let target = format!("bad.test:{}", origin.port());
    let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let answer = raw_exchange(front.addr, connect.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("credentials"), "{answer}");
    assert_eq!(origin.received().len(), 1);
}

/// A next hop over TLS that requires a client certificate (`via_ca`,
/// `via_cert`, `via_key`): HTTP, CONNECT and CONNECT-UDP go through it; the
/// hop's rules see the certificate's user. Without a certificate the
/// handshake fails: `502` naming the hop.
#[tokio::test]
async fn a_next_hop_over_tls_with_a_client_certificate() {
    let (dir, ca, clients) = (Dir::new(), Ca::new("relay ca"), Ca::new("client ca"));
    let origin = Origin::ok().await;
    let echo = EchoServer::start().await;
    let voice_echo = porthole_suite::UdpEcho::start().await;
    let voice = voice_echo.port();
    let client_ca = dir.write("client-ca.pem", &clients.pem());
    let tls = tls_section(
        &dir,
        &relay_leaf(&ca),
        &format!("require = true\nclient_ca = \"{client_ca}\"\nclient_auth = \"required\"\n"),
    );
    // Only the certificate user `edge` may use the hop's routes.
    let rules = "[[rule]]\nusers = [\"edge\"]\nallow = true\n";
    let hop = Relay::start(&format!(
        "[relay]\nlisten = \"127.0.0.1:0\"\nname = \"hop.test\"\n{tls}{rules}{}{}{}",
        route("app.test", "127.0.0.1", &[origin.port()], ""),
        route("db.test", "127.0.0.1", &[echo.port()], ""),
        route("voice.test", "127.0.0.1", &[voice], "udp = true"),
    ))
    .await;
    let ca_pem = dir.write("ca.pem", &ca.pem());
    let edge = clients.client("edge");
    let cert = dir.write("edge.pem", &edge.cert);
    let key = dir.write("edge.key", &edge.key);
    let via = |host: &str, port: u16, identity: bool| {
        let identity = if identity {
            format!("via_cert = \"{cert}\"\nvia_key = \"{key}\"\n")
        } else {
            String::new()
        };
        format!(
            "[[route]]\nhost = \"{host}\"\nvia = \"{}\"\nvia_ca = \"{ca_pem}\"\n{identity}ports = [{port}]\nudp = true\n",
            hop.addr
        )
    };
    let routes = via("app.test", origin.port(), true)
        + &via("db.test", echo.port(), true)
        + &via("voice.test", voice, true)
        + &via("anon.test", origin.port(), false);
    let front = Relay::start(&config_with(&routes, "")).await;

    let out = Curl::new(&format!("http://app.test:{}/tls-hop", origin.port()))
        .proxy(&front.url())
        .run()
        .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.text(), "ok /tls-hop");
    let (tunnel, head) =
        porthole_suite::connect_via(front.addr, &format!("db.test:{}", echo.port())).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        porthole_suite::echo_round(tunnel, b"over tls").await,
        b"over tlsbye\n"
    );
    let (mut udp, head) =
        porthole_suite::connect_udp(front.addr, &format!("voice.test:{voice}")).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    udp.write_all(&porthole_relay::udp::datagram_capsule(b"rtp"))
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(
        porthole_suite::next_datagram(&mut udp, &mut buf).await,
        b"echo:rtp"
    );

    let anon = Curl::new(&format!("http://anon.test:{}/x", origin.port()))
        .proxy(&front.url())
        .run()
        .await;
    assert_eq!(anon.status, 502, "{anon:?}");
    assert!(
        anon.text().contains(&hop.addr.to_string()),
        "{}",
        anon.text()
    );
    assert_eq!(origin.received().len(), 1);
}

/// A chain that comes back to a relay is a loop it sees by its own name in
/// `Via`, for CONNECT and CONNECT-UDP as for HTTP: `508`, not a tunnel that
/// dials itself until the connections run out. A via route does not relay a
/// request to the next hop itself, nor a CONNECT-UDP as a request.
#[tokio::test]
async fn a_chain_back_to_itself_is_a_loop_for_tunnels_too() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = format!(
        "[[route]]\nhost = \"loop.test\"\nvia = \"{addr}\"\nports = [80, 53]\nudp = true\n[[route]]\nhost = \"hop.test\"\nvia = \"hop.test:8080\"\nports = [8080]\n"
    );
    let config = porthole_relay::Config::from_toml(&config_with(&routes, "")).unwrap();
    let relay = Relay::start_on(config, listener).await;

    let connect = b"CONNECT loop.test:80 HTTP/1.1\r\nHost: loop.test:80\r\n\r\n";
    let answer = raw_exchange(relay.addr, connect, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 508 "), "{answer}");
    let (_, head) = porthole_suite::connect_udp(relay.addr, "loop.test:53").await;
    assert!(head.starts_with("HTTP/1.1 508 "), "{head}");
    let http = Curl::new("http://loop.test/x")
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(http.status, 508, "{http:?}");

    // The hop itself is not a target of its route.
    let own = Curl::new("http://hop.test:8080/status")
        .proxy(&relay.url())
        .run()
        .await;
    assert_eq!(own.status, 400, "{own:?}");
    assert!(own.text().contains("next hop itself"), "{}", own.text());
    let udp_as_request = "GET http://loop.test/.well-known/masque/udp/x/53/ HTTP/1.1\r\nHost: loop.test\r\nConnection: Upgrade\r\nUpgrade: connect-udp\r\n\r\n";
    let answer = raw_exchange(
        relay.addr,
        udp_as_request.as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
}

/// The lines of the access-log file `log`, once it has `n` (within 5 s).
async fn access_lines(log: &std::path::Path, n: usize) -> Vec<String> {
    let lines = || porthole_suite::lines_with(log, "status=");
    let all_written = || async { lines().len() >= n };
    assert!(
        porthole_suite::eventually(Duration::from_secs(5), all_written).await,
        "{:?}",
        lines()
    );
    lines()
}

/// Requests the relay cannot read (a malformed head, too many fields, a
/// target too long, a head too slow) get an access line with `-` for what
/// could not be read, and count in the metrics (audit 4: they left no trace
/// but a debug line). A `"` in a target cannot forge fields on the line.
#[tokio::test]
async fn unreadable_requests_get_an_access_line_and_count() {
    let dir = Dir::new();
    let log = dir.0.join("access.log");
    let extra = format!(
        "[limits]\nhead_timeout = \"1s\"\n[log]\naccess = \"{}\"\n",
        log.display()
    );
    let relay = Relay::start(&config_with("", &extra)).await;
    let many = "X-A: b\r\n".repeat(150);
    let long = "a".repeat(70_000);
    let cases = [
        (
            "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nX-A: b\r\n c\r\n\r\n".to_string(),
            "HTTP/1.1 400",
        ),
        (
            format!("GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\n{many}\r\n"),
            "HTTP/1.1 431",
        ),
        (
            format!("GET http://a.test/{long} HTTP/1.1\r\nHost: a.test\r\n\r\n"),
            "HTTP/1.1 414",
        ),
        // Half a head, then nothing: 408 after head_timeout.
        (
            "GET http://a.test/ HTTP/1.1\r\nHost: a.".to_string(),
            "HTTP/1.1 408",
        ),
    ];
    for (request, status) in &cases {
        let answer = raw_exchange(relay.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with(status), "{status}: {answer}");
    }
    let forged = "GET http://a.test/q\"x\"route=\"evil\" HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    let answer = raw_exchange(relay.addr, forged.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    let lines = access_lines(&log, 5).await;
    for status in ["400", "431", "414", "408"] {
        porthole_suite::assert_some_line(
            &lines,
            &["method=- ", "target=\"-\"", &format!("status={status}")],
        );
    }
    porthole_suite::assert_some_line(
        &lines,
        &["target=\"http://a.test/q%22x%22route=%22evil%22\""],
    );
    assert!(
        !lines.iter().any(|l| l.contains("route=\"evil")),
        "{lines:?}"
    );
    let metrics = Curl::new(&format!("{}/metrics", relay.admin_url()))
        .run()
        .await
        .text();
    let unreadable = r#"porthole_requests_total{route="-",method="other",status="4xx"} 4"#;
    assert!(metrics.contains(unreadable), "{metrics}");
}

/// The access line of a refused request says who was refused what, and what
/// the client got; a password in a request target never reaches the log.
#[tokio::test]
async fn access_lines_of_refusals_name_the_user_and_route_and_keep_no_password() {
    let dir = Dir::new();
    let users = users_file(&dir, &[("alice", "a-pw")]);
    let (a, b) = (Origin::ok().await, Origin::ok().await);
    let log = dir.0.join("access.log");
    let routes = route("app-a.test", "127.0.0.1", &[a.port()], "")
        + &route("app-b.test", "127.0.0.1", &[b.port()], "");
    let extra = format!(
        r#"
[auth]
users_file = "{users}"

[[rule]]
users = ["alice"]
routes = ["app-a.test"]
allow = true

[log]
access = "{}"
"#,
        log.display()
    );
    let relay = Relay::start(&config_with(&routes, &extra)).await;

    // A rule keeps alice from app-b.test.
    let refused = Curl::new(&format!("http://app-b.test:{}/", b.port()))
        .proxy(&relay.url())
        .args(&["-U", "alice:a-pw"])
        .run()
        .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    let credentials = "Proxy-Authorization: Basic YWxpY2U6YS1wdw==\r\n"; // alice:a-pw
    let cases = [
        // Targets with user information are refused, and logged without it.
        (
            format!("GET http://u:s3cretpass@app-a.test:{}/y HTTP/1.1\r\nHost: app-a.test\r\n{credentials}Connection: close\r\n\r\n", a.port()),
            "HTTP/1.1 400",
            "",
        ),
        (
            format!("CONNECT u:s3cretpass@app-a.test:{} HTTP/1.1\r\n{credentials}\r\n", a.port()),
            "HTTP/1.1 400",
            "",
        ),
        // A port the route does not offer: refused by the relay after the
        // rules let it through.
        (
            format!("CONNECT app-a.test:{} HTTP/1.1\r\n{credentials}\r\n", b.port()),
            "HTTP/1.1 403",
            "",
        ),
        // Two sets of credentials: refused, not the first taken.
        (
            format!("GET http://app-a.test:{}/ HTTP/1.1\r\nHost: app-a.test\r\n{credentials}Proxy-Authorization: Basic Ym9iOmJvYg==\r\nConnection: close\r\n\r\n", a.port()),
            "HTTP/1.1 400",
            "more than one Proxy-Authorization",
        ),
    ];
    for (request, status, says) in &cases {
        let answer = raw_exchange(relay.addr, request.as_bytes(), Duration::from_secs(5)).await;
        assert!(
            answer.starts_with(status) && answer.contains(says),
            "{request}: {answer}"
        );
    }

    let lines = access_lines(&log, 5).await;
    porthole_suite::assert_some_line(
        &lines,
        &["user=\"alice\"", "route=\"app-b.test\"", "status=403"],
    );
    porthole_suite::assert_some_line(&lines, &["target=\"http://***@app-a.test:", "status=400"]);
    porthole_suite::assert_some_line(&lines, &["target=\"***@app-a.test:", "status=400"]);
    let port_refused = lines
        .iter()
        .find(|l| l.contains("method=CONNECT") && l.contains("status=403"))
        .expect("the refused CONNECT's line");
    assert!(
        !port_refused.contains("bytes_out=0 "),
        "the 403 sent is counted: {port_refused}"
    );
    // The route that refused the port is named.
    assert!(
        port_refused.contains("route=\"app-a.test\""),
        "{port_refused}"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("s3cretpass"), "{text}");
}
