//! The properties on stable Rust: proptest builds messages from the pieces
//! that matter to each parser (framing fields, hop-by-hop names, chunk
//! lines, varints), sometimes damaged by a few byte edits, sometimes plain
//! noise. A bounded number of cases per property keeps `cargo test` quick;
//! the fuzz targets run the same checks for longer.

use proptest::prelude::*;
use proptest::sample::select;

use super::*;

const CASES: u32 = 768;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // A failure is fixed with a unit test of its input, next to the fix.
        failure_persistence: None,
        // CI runs the same cases every time (a red CI is then the change's,
        // not the draw's); elsewhere every run draws new ones.
        rng_seed: match std::env::var_os("CI") {
            Some(_) => proptest::test_runner::RngSeed::Fixed(20_261_128),
            None => proptest::test_runner::RngSeed::Random,
        },
        ..ProptestConfig::default()
    }
}

/// Up to three byte edits (replace, insert, delete), or none.
fn damaged(message: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let edits = prop::collection::vec(any::<(usize, u8, u8)>(), 0..=3);
    let none = Just(Vec::new());
    (message, prop_oneof![3 => none, 1 => edits]).prop_map(|(mut bytes, edits)| {
        for (at, kind, byte) in edits {
            let at = at % (bytes.len() + 1);
            match kind % 3 {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => {}
            }
        }
        bytes
    })
}

/// A control byte, then the message (or noise).
fn input(message: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let noise = prop::collection::vec(any::<u8>(), 0..120);
    (any::<u8>(), prop_oneof![6 => damaged(message), 1 => noise]).prop_map(|(ctl, wire)| {
        let mut all = vec![ctl];
        all.extend_from_slice(&wire);
        all
    })
}

fn pick(items: &[&'static str]) -> impl Strategy<Value = &'static str> {
    select(items.to_vec())
}

/// A head: a first line and fields, with CRLF or bare LF line ends.
fn head(
    first_lines: &[&'static str],
    names: &[&'static str],
    values: &[&'static str],
) -> impl Strategy<Value = Vec<u8>> {
    let field = (pick(names), pick(values));
    (
        pick(first_lines),
        prop::collection::vec(field, 0..7),
        pick(&["\r\n", "\n"]),
        pick(&["", "\r\n", "body", "\r\nGET / HTTP/1.1\r\n\r\n"]),
    )
        .prop_map(|(first, fields, end, after)| {
            let mut out = format!("{first}{end}");
            for (name, value) in fields {
                out.push_str(&format!("{name}: {value}{end}"));
            }
            out.push_str(end);
            out.push_str(after);
            out.into_bytes()
        })
}

const FRAMING_NAMES: &[&str] = &[
    "Content-Length",
    "content-length",
    "Transfer-Encoding",
    "Connection",
    "Upgrade",
    "Keep-Alive",
    "Proxy-Connection",
    "TE",
    "Via",
    "X-A",
];

const FRAMING_VALUES: &[&str] = &[
    "5",
    "0",
    "5, 5",
    "5, 6",
    "+5",
    "chunked",
    "gzip, chunked",
    "chunked, gzip",
    "close",
    "upgrade",
    "keep-alive",
    "content-length",
    "close, Content-Length",
    "transfer-encoding",
    "x-a",
    "websocket",
    "connect-udp",
    "1.1 shim (porthole)",
    "",
];

fn requests() -> impl Strategy<Value = Vec<u8>> {
    let first = &[
        "GET / HTTP/1.1",
        "POST /x?y HTTP/1.1",
        "POST / HTTP/1.0",
        "OPTIONS * HTTP/1.1",
        "OPTIONS http://app.test HTTP/1.1",
        "GET http://App.Test:81/p HTTP/1.1",
        "PUT http://app.test?q HTTP/1.0",
        "GET http://relay.test/services HTTP/1.1",
        "GET http://u@app.test/ HTTP/1.1",
        "GET https://app.test/ HTTP/1.1",
        "CONNECT app.test:443 HTTP/1.1",
        "CONNECT [::1]:22 HTTP/1.1",
        "CONNECT app.test HTTP/1.1",
        "GET /.well-known/masque/udp/dns.corp/53/ HTTP/1.1",
        "GET /.porthole/uplink HTTP/1.1",
        "BREW /pot HTTP/1.1",
    ];
    let mut names = FRAMING_NAMES.to_vec();
    names.extend(["Host", "host", "Proxy-Authorization"]);
    let mut values = FRAMING_VALUES.to_vec();
    values.extend([
        "app.test",
        "relay.test",
        "127.0.0.1:8080",
        "a:0",
        "Basic eDp5",
    ]);
    head(first, &names, &values)
}

fn responses() -> impl Strategy<Value = Vec<u8>> {
    let first = &[
        "HTTP/1.1 200 OK",
        "HTTP/1.1 200",
        "HTTP/1.1 200 ",
        "HTTP/1.0 404 Not Found",
        "HTTP/1.1 500 Caf\u{e9}",
        "HTTP/1.1 204 No Content",
        "HTTP/1.1 304 Not Modified",
        "HTTP/1.1 101 Switching Protocols",
        "HTTP/1.1 100 Continue",
        "HTTP/1.1 999 Odd",
        "HTTP/2 200 OK",
    ];
    let mut names = FRAMING_NAMES.to_vec();
    names.push("Content-Encoding");
    let mut values = FRAMING_VALUES.to_vec();
    values.push("gzip");
    head(first, &names, &values)
}

/// Chunks (sizes in either case, extensions), a last chunk and trailers.
fn chunked_bodies() -> impl Strategy<Value = Vec<u8>> {
    let chunk = (
        prop::collection::vec(any::<u8>(), 1..40),
        pick(&["", ";a=b", " ;x", "; q=\"v\""]),
        any::<bool>(),
    );
    (
        prop::collection::vec(chunk, 0..5),
        pick(&["0", "000", "0;end"]),
        pick(&[
            "",
            "X-Sum: 1\r\n",
            "A: b\r\nC: d\r\n",
            "bad trailer\r\n",
            "X: y\n",
        ]),
        pick(&["\r\n", "\n"]),
        pick(&["", "GET / HTTP/1.1\r\n\r\n"]),
    )
        .prop_map(|(chunks, last, trailers, end, after)| {
            let mut out = Vec::new();
            for (data, ext, upper) in chunks {
                let size = format!("{:x}", data.len());
                let size = if upper { size.to_uppercase() } else { size };
                out.extend_from_slice(format!("{size}{ext}{end}").as_bytes());
                out.extend_from_slice(&data);
                out.extend_from_slice(end.as_bytes());
            }
            out.extend_from_slice(format!("{last}{end}{trailers}{end}{after}").as_bytes());
            out
        })
}

/// Capsule streams, CONNECT-UDP paths and CONNECT targets.
fn udp_inputs() -> impl Strategy<Value = Vec<u8>> {
    let payloads = prop::collection::vec(prop::collection::vec(any::<u8>(), 0..30), 0..4);
    let other = prop::collection::vec(any::<u8>(), 0..10);
    let stream = (payloads, any::<u64>(), other).prop_map(|(payloads, kind, other)| {
        let mut out = Vec::new();
        for p in payloads {
            out.extend_from_slice(&datagram_capsule(&p));
        }
        put_varint(&mut out, kind >> 2);
        put_varint(&mut out, other.len() as u64);
        out.extend_from_slice(&other);
        out
    });
    let path = (
        pick(&[
            "dns.corp",
            "DNS.Corp",
            "2001%3Adb8%3A%3A1",
            "[::1]",
            "",
            "a b",
            "x_y",
        ]),
        pick(&["53", "0", "65535", "65536", "+53", "x"]),
        pick(&["/", "", "/extra/"]),
    )
        .prop_map(|(host, port, end)| format!("{PATH_PREFIX}{host}/{port}{end}").into_bytes());
    let connect = (
        pick(&["app.test", "[::1]", "::1", "", "a/b", "[v6"]),
        pick(&[":443", ":0", "", ":x", ":65536"]),
    )
        .prop_map(|(host, port)| format!("{host}{port}").into_bytes());
    let noise = prop::collection::vec(any::<u8>(), 0..64);
    damaged(prop_oneof![stream, path, connect, noise])
}

/// Control messages as the uplink peers write them, one per line.
fn control_lines() -> impl Strategy<Value = Vec<u8>> {
    const TEXT: &[&str] = &["", "erp.plant3", "ab\"c", "\u{e9}\\n", "a\nb"];
    let message = (0u8..6, pick(TEXT), pick(TEXT), any::<u16>(), any::<u64>()).prop_map(
        |(kind, a, b, port, seq)| {
            use crate::uplink::{Message, Refused};
            let m = match kind {
                0 => Message::Register {
                    offers: vec![a.into(), b.into()],
                },
                1 => Message::Registered {
                    accepted: vec![a.into()],
                    refused: vec![Refused {
                        name: b.into(),
                        reason: a.into(),
                    }],
                    pool_key: (seq % 2 == 0).then(|| b.into()),
                },
                2 => Message::Open {
                    session: a.into(),
                    host: b.into(),
                    port,
                },
                3 => Message::Failed {
                    session: a.into(),
                    reason: b.into(),
                },
                4 => Message::Ping { seq },
                _ => Message::Pong { seq },
            };
            serde_json::to_vec(&m).unwrap_or_default()
        },
    );
    let odd = pick(&[
        "{}",
        "{\"type\":\"ping\"}",
        "[1]",
        "",
        "{\"type\":\"pong\",\"seq\":-1}",
    ])
    .prop_map(|s| s.as_bytes().to_vec());
    let line = prop_oneof![4 => message, 1 => odd];
    let lines = (prop::collection::vec(line, 0..4), pick(&["\n", "\r\n"]));
    lines.prop_map(|(lines, end): (Vec<Vec<u8>>, &str)| {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(&l);
            out.extend_from_slice(end.as_bytes());
        }
        out
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn request_heads_hold_their_properties(data in input(requests())) {
        request(&data);
    }

    #[test]
    fn response_heads_hold_their_properties(data in input(responses())) {
        response(&data);
    }

    #[test]
    fn chunked_bodies_hold_their_properties(data in input(chunked_bodies())) {
        chunked(&data);
    }

    #[test]
    fn capsules_varints_and_targets_hold_their_properties(data in udp_inputs()) {
        capsules(&data);
    }

    #[test]
    fn uplink_messages_hold_their_properties(data in input(control_lines())) {
        uplink(&data);
    }
}
