//! Micro-benchmarks of the decisions every request crosses: request head
//! parse and rewrite, route match, and dispatch classification.
//!
//!     cargo bench --bench hot_paths -- --warm-up-time 1 --measurement-time 2
//!
//! The heads are what the side-by-side harness (`benches/run.sh`) sends: a
//! `wrk` request in absolute form, and a browser-like head with more fields.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use porthole_relay::codec::parse_request_head;
use porthole_relay::config::Route;
use porthole_relay::dispatch::{classify_bytes, classify_request, Identity, RequestKind};
use porthole_relay::rewrite::{request_head, BodyHeader, RequestRewrite};
use porthole_relay::routes::{RouteTable, Target};

/// What `wrk` sends through a forward proxy (benches/run.sh).
const WRK_HEAD: &str = "GET http://127.0.0.1:8000/1k HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n";

/// A browser-like request: a dozen fields, hop-by-hop ones to strip.
const BROWSER_HEAD: &str = "GET http://wiki.corp.example/pages/Home?view=full HTTP/1.1\r\n\
Host: wiki.corp.example\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
Accept-Language: en-GB,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Proxy-Connection: keep-alive\r\n\
Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
Connection: keep-alive, X-Trace\r\n\
X-Trace: 1\r\n\
Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n\
Upgrade-Insecure-Requests: 1\r\n\
Cache-Control: max-age=0\r\n\
Via: 1.1 edge.example (squid)\r\n\
\r\n";

const CONNECT_HEAD: &str =
    "CONNECT db.corp.example:5432 HTTP/1.1\r\nHost: db.corp.example:5432\r\n\r\n";

fn me() -> Identity<'static> {
    Identity {
        name: "relay.corp.example",
        local: SocketAddr::from(([127, 0, 0, 1], 8080)),
        uplink_session: false,
    }
}

fn route(host: &str, to: &str) -> Route {
    Route {
        host: host.to_string(),
        to: Target::parse(to).expect("valid target"),
        ports: vec![80, 443, 8080],
        connect_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(60),
        transparent: false,
        decompress: false,
        tls: None,
        udp: false,
        via: None,
    }
}

/// 100 routes: 70 exact names and 30 `*.suffix` patterns of varied depth.
fn hundred_routes() -> RouteTable {
    let mut routes = Vec::new();
    for i in 0..70 {
        routes.push(route(&format!("svc{i}.corp.example"), "10.0.0.1"));
    }
    for i in 0..20 {
        routes.push(route(&format!("*.team{i}.corp.example"), "10.0.1.1:8081"));
    }
    for i in 0..9 {
        routes.push(route(&format!("*.lab{i}.example"), "10.0.2.1"));
    }
    routes.push(route("*.corp.example", "10.0.3.1"));
    RouteTable::new(routes)
}

fn parse_and_rewrite(c: &mut Criterion) {
    let mut g = c.benchmark_group("head");
    for (name, text) in [("wrk", WRK_HEAD), ("browser", BROWSER_HEAD)] {
        let raw = Bytes::from_static(text.as_bytes());
        g.bench_function(format!("parse/{name}"), |b| {
            b.iter(|| parse_request_head(black_box(raw.clone()), 100).expect("parses"))
        });
        let head = parse_request_head(raw.clone(), 100).expect("parses");
        let Ok(RequestKind::Relay(target)) = classify_request(&head, me()) else {
            panic!("{name}: not a relay request");
        };
        g.bench_function(format!("rewrite/{name}"), |b| {
            b.iter(|| {
                request_head(
                    black_box(&head),
                    &RequestRewrite {
                        name: "relay.corp.example",
                        path: &target.path,
                        host: target.authority.as_deref(),
                        body: BodyHeader::None,
                        upgrade: false,
                        transparent: false,
                        proxy_authorization: None,
                    },
                )
            })
        });
        // The whole per-request decision path the relay runs on a head.
        g.bench_function(format!("parse+classify+rewrite/{name}"), |b| {
            b.iter(|| {
                let head = parse_request_head(black_box(raw.clone()), 100).expect("parses");
                let Ok(RequestKind::Relay(target)) = classify_request(&head, me()) else {
                    unreachable!()
                };
                request_head(
                    &head,
                    &RequestRewrite {
                        name: "relay.corp.example",
                        path: &target.path,
                        host: target.authority.as_deref(),
                        body: BodyHeader::None,
                        upgrade: false,
                        transparent: false,
                        proxy_authorization: None,
                    },
                )
            })
        });
    }
    g.finish();
}

fn route_match(c: &mut Criterion) {
    let table = hundred_routes();
    let mut g = c.benchmark_group("route/decide_100");
    for (name, host) in [
        ("exact", "svc42.corp.example"),
        ("wildcard_long", "build.ci.team7.corp.example"),
        ("wildcard_short", "random.corp.example"),
        ("miss", "example.com"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| black_box(table.decide(black_box(host), 80)).is_ok())
        });
    }
    g.finish();
}

fn dispatch(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatch");
    g.bench_function("classify_bytes/http1", |b| {
        b.iter(|| classify_bytes(black_box(WRK_HEAD.as_bytes())))
    });
    g.bench_function("classify_bytes/h2_preface", |b| {
        b.iter(|| classify_bytes(black_box(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")))
    });
    g.bench_function("classify_bytes/tls", |b| {
        b.iter(|| classify_bytes(black_box(&[0x16, 0x03, 0x01, 0x02, 0x00][..])))
    });
    for (name, text) in [
        ("absolute", WRK_HEAD),
        ("browser", BROWSER_HEAD),
        ("connect", CONNECT_HEAD),
        (
            "origin_form",
            "GET /x HTTP/1.1\r\nHost: wiki.corp.example\r\n\r\n",
        ),
    ] {
        let head = parse_request_head(Bytes::from_static(text.as_bytes()), 100).expect("parses");
        g.bench_function(format!("classify_request/{name}"), |b| {
            b.iter(|| classify_request(black_box(&head), me()).is_ok())
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = parse_and_rewrite, route_match, dispatch
}
criterion_main!(benches);
