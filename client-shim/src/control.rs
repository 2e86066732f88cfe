//! The shim's own endpoints on its listen port (requests whose host is the
//! shim): the PAC file, the link status, and the control endpoint that
//! `porthole-shim forward add|remove|list` talks to. Control is for local
//! users only: requests from other addresses get `403`. Web pages are local
//! too (the user's browser runs them), so a control request must also carry
//! [`CONTROL_HEADER`], which no page can send to another origin without a
//! CORS preflight the shim never grants, and none may carry `Origin` (what
//! a browser sends with a page's request): a page cannot open a forward.
//!
//! - `GET /proxy.pac`: the relay's PAC file, pointing at the shim;
//! - `GET /.porthole-shim/status`: `up` or `connecting: <reason>`;
//! - `GET /.porthole-shim/forwards`: one `LISTEN=HOST:PORT` per line, then
//!   the UDP forwards as `udp LISTEN=HOST:PORT`, each followed by
//!   `  # last error: <reason>` while its flows fail ([`udp_line`]);
//! - `POST /.porthole-shim/forwards` with a body in the same form (a line of
//!   the list): add a forward (`201` with its line, the port chosen for a
//!   port 0; `409` if it cannot be opened, `400` for a bad line);
//! - `DELETE /.porthole-shim/forwards/LISTEN`: remove a TCP forward (closes
//!   its listener; open connections carry on);
//! - `DELETE /.porthole-shim/forwards/udp/LISTEN`: remove a UDP forward
//!   (closes its socket and ends its flows).
//!
//! `LISTEN` is `ADDR:PORT` or a bare port on 127.0.0.1, as in the config.

use std::fmt::Display;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use porthole_relay::h2::Body;
use porthole_relay::pac;
use tokio::net::TcpStream;

use crate::config::ForwardSpec;
use crate::forward::Kind;
use crate::link::{empty, LinkState};
use crate::udp::UdpForwardState;
use crate::{plain, Ctx};

/// Where the control endpoints live: a prefix no application uses.
pub const PREFIX: &str = "/.porthole-shim/";
/// The field every control request carries (`porthole-shim forward` sends
/// it): not one a page may send across origins unasked (Fetch standard,
/// CORS-safelisted request headers).
pub const CONTROL_HEADER: &str = "porthole-shim-control";
/// Largest body accepted from the relay (PAC) or a control client.
const MAX_BODY: usize = 1 << 20;
/// The word that marks a UDP forward: before its spec in the list and a
/// `POST` body, and in its `DELETE` path (`forwards/udp/LISTEN`).
pub const UDP: &str = "udp";

/// A forward as a line of the list and a `POST` body: `LISTEN=HOST:PORT`,
/// or `udp LISTEN=HOST:PORT`.
pub fn line(kind: Kind, spec: impl Display) -> String {
    match kind {
        Kind::Tcp => spec.to_string(),
        Kind::Udp => format!("{UDP} {spec}"),
    }
}

/// A UDP forward's line in the list: [`line`], then its last error as a
/// comment while there is one, on the same line (a reason with line breaks
/// is put on one), so that the list still reads back with [`parse_line`].
pub fn udp_line(state: &UdpForwardState) -> String {
    let line = line(Kind::Udp, &state.spec);
    match &state.last_error {
        None => line,
        Some(why) => {
            let why: String = why
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            format!("{line}  {COMMENT} last error: {why}")
        }
    }
}

/// What starts a comment on a line of the list; never part of a spec.
const COMMENT: char = '#';

/// Reads a line as [`line`] or [`udp_line`] writes it (a `POST` body); a
/// comment is left out.
pub fn parse_line(text: &str) -> Result<(Kind, ForwardSpec), String> {
    let text = text.split(COMMENT).next().unwrap_or("").trim();
    let (word, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    if word.eq_ignore_ascii_case(UDP) {
        return ForwardSpec::parse(rest)
            .map(|spec| (Kind::Udp, spec))
            .map_err(|e| format!("expected `{UDP} LISTEN=HOST:PORT`: {e}"));
    }
    ForwardSpec::parse(text).map(|spec| (Kind::Tcp, spec))
}

/// The path (under [`PREFIX`]) that removes the forward on `listen`.
pub fn forward_path(kind: Kind, listen: impl Display) -> String {
    match kind {
        Kind::Tcp => format!("forwards/{listen}"),
        Kind::Udp => format!("forwards/{UDP}/{listen}"),
    }
}

/// Reads what follows `forwards/` in a `DELETE` path, as [`forward_path`]
/// writes it.
fn parse_forward_path(rest: &str) -> Result<(Kind, SocketAddr), String> {
    let (kind, listen) = match rest.split_once('/') {
        Some((word, listen)) if word.eq_ignore_ascii_case(UDP) => (Kind::Udp, listen),
        _ => (Kind::Tcp, rest),
    };
    ForwardSpec::parse_listen(listen)
        .map(|listen| (kind, listen))
        .map_err(|e| {
            format!("expected {PREFIX}forwards/LISTEN or {PREFIX}forwards/{UDP}/LISTEN: {e}")
        })
}

/// Serves one request for the shim itself.
pub async fn serve(
    req: Request<Incoming>,
    path: &str,
    peer: SocketAddr,
    local: SocketAddr,
    ctx: &Ctx,
) -> Response<Body> {
    let path_only = path.split('?').next().unwrap_or(path);
    if path_only == "/proxy.pac" && req.method() == Method::GET {
        return proxy_pac(local, ctx).await;
    }
    let Some(rest) = path_only.strip_prefix(PREFIX) else {
        return plain(StatusCode::NOT_FOUND, "no such endpoint on the shim");
    };
    if !peer.ip().is_loopback() {
        return plain(
            StatusCode::FORBIDDEN,
            "the shim is controlled from this machine only",
        );
    }
    // The status line alone may be read without the header (`curl` by hand).
    let asked = req.headers().contains_key(CONTROL_HEADER)
        || (req.method() == Method::GET && rest == "status");
    if req.headers().contains_key(header::ORIGIN) || !asked {
        tracing::warn!(%peer, path = path_only, origin = ?req.headers().get(header::ORIGIN), "control request refused: not from porthole-shim (a web page?)");
        return plain(
            StatusCode::FORBIDDEN,
            "control requests come from porthole-shim (header porthole-shim-control), not from web pages",
        );
    }
    match (req.method().clone(), rest) {
        (Method::GET, "status") => {
            let text = match &*ctx.link.watch().borrow() {
                s if s.is_up() => "up".to_string(),
                LinkState::Connecting {
                    last_error: Some(e),
                } => format!("connecting: {e}"),
                _ => "connecting".to_string(),
            };
            plain(StatusCode::OK, &text)
        }
        (Method::GET, "forwards") => {
            let tcp = ctx.forwards.list().into_iter().map(|f| line(Kind::Tcp, f));
            let udp = ctx.udp_forwards.states();
            let lines: Vec<String> = tcp.chain(udp.iter().map(udp_line)).collect();
            text(StatusCode::OK, lines.join("\n"))
        }
        (Method::POST, "forwards") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return plain(StatusCode::BAD_REQUEST, "unreadable body"),
            };
            let (kind, spec) = match parse_line(&String::from_utf8_lossy(&body)) {
                Ok(parsed) => parsed,
                Err(e) => return plain(StatusCode::BAD_REQUEST, &e),
            };
            if !spec.listen.ip().is_loopback() {
                tracing::warn!(listen = %spec.listen, host = %spec.host, port = spec.port, "forward added on an address other machines can reach");
            }
            let added = match kind {
                Kind::Tcp => ctx.forwards.add(spec).await,
                Kind::Udp => ctx.udp_forwards.add(spec).await,
            };
            match added {
                Ok(spec) => text(StatusCode::CREATED, line(kind, spec)),
                Err(e) => plain(StatusCode::CONFLICT, &e),
            }
        }
        (Method::DELETE, rest) if rest.starts_with("forwards/") => {
            let (kind, listen) = match parse_forward_path(&rest["forwards/".len()..]) {
                Ok(parsed) => parsed,
                Err(e) => return plain(StatusCode::BAD_REQUEST, &e),
            };
            let removed = match kind {
                Kind::Tcp => ctx.forwards.remove(listen),
                Kind::Udp => ctx.udp_forwards.remove(listen),
            };
            if removed {
                text(StatusCode::OK, format!("removed {}", line(kind, listen)))
            } else {
                let why = format!("no {} on {listen}", kind.label());
                plain(StatusCode::NOT_FOUND, &why)
            }
        }
        (method, rest) => {
            // A known endpoint asked with another method: 405 with what it
            // takes (RFC 9110 section 15.5.6).
            let allow = match rest {
                "status" => "GET",
                "forwards" => "GET, POST",
                _ if rest.starts_with("forwards/") => "DELETE",
                _ => return plain(StatusCode::NOT_FOUND, "no such endpoint on the shim"),
            };
            let mut resp = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{method} is not one of {allow} here"),
            );
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            resp
        }
    }
}

/// The relay's PAC file (routes through the proxy, the rest `DIRECT`), with
/// the proxy replaced by the shim's address as the client reached it. While
/// the link is down, the last one the relay sent, if any.
async fn proxy_pac(local: SocketAddr, ctx: &Ctx) -> Response<Body> {
    let last_pac = || ctx.last_pac.lock().unwrap_or_else(|p| p.into_inner());
    let pac = match fetch_pac(ctx).await {
        Ok(pac) => {
            *last_pac() = Some(pac.clone());
            pac
        }
        Err((link_down, why)) => match last_pac().clone().filter(|_| link_down) {
            Some(pac) => {
                tracing::warn!(reason = %why, "PAC file served from the last copy: the link is down");
                pac
            }
            None => return plain(StatusCode::BAD_GATEWAY, &why),
        },
    };
    match pac::repoint(&pac, &local.to_string()) {
        Some(text) => {
            let mut resp = Response::new(full(text));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(pac::CONTENT_TYPE),
            );
            resp
        }
        None => plain(
            StatusCode::BAD_GATEWAY,
            "the relay's PAC file has no proxy line",
        ),
    }
}

/// The relay's PAC file as it sent it; `Err` says whether the link was down
/// and why there is none.
async fn fetch_pac(ctx: &Ctx) -> Result<String, (bool, String)> {
    let uri = format!(
        "{}://{}/proxy.pac",
        ctx.link.scheme(),
        ctx.link.relay_name()
    );
    let req = Request::get(uri)
        .body(empty())
        .map_err(|_| (false, "relay_name is not a host name".to_string()))?;
    let resp = ctx
        .link
        .send(req)
        .await
        .map_err(|e| (true, e.to_string()))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| (true, format!("PAC from the relay: {e}")))?
        .to_bytes();
    if status != StatusCode::OK {
        let why = format!("the relay answered {status} for its PAC file (is relay_name its name?)");
        return Err((false, why));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

fn text(status: StatusCode, mut body: String) -> Response<Body> {
    if !body.is_empty() {
        body.push('\n');
    }
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp
}

/// A client for the control endpoint (the `forward` subcommands): sends one
/// request to the running shim and returns its status and body.
pub async fn call(
    shim: SocketAddr,
    method: Method,
    path: &str,
    body: String,
) -> Result<(StatusCode, String), String> {
    let stream = TcpStream::connect(shim)
        .await
        .map_err(|e| format!("cannot reach the shim at {shim}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("shim at {shim}: {e}"))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, shim.to_string())
        .header(CONTROL_HEADER, "1")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("shim at {shim}: {e}"))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("shim at {shim}: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_lines_and_paths_name_the_kind_and_read_back() {
        // (body, what it adds, or the error's words)
        let lines: &[(&str, Result<&str, &str>)] = &[
            (
                "127.0.0.1:15432=db.corp:5432",
                Ok("127.0.0.1:15432=db.corp:5432"),
            ),
            (" 5353=dns.corp:53\n", Ok("127.0.0.1:5353=dns.corp:53")),
            ("udp 5353=dns.corp:53", Ok("udp 127.0.0.1:5353=dns.corp:53")),
            (
                "UDP\t[::1]:0=[2001:db8::1]:53",
                Ok("udp [::1]:0=[2001:db8::1]:53"),
            ),
            (
                "udp",
                Err("expected `udp LISTEN=HOST:PORT`: `` is not LISTEN=HOST:PORT"),
            ),
            ("udp 5353=dns.corp", Err("`dns.corp` is not HOST:PORT")),
            ("udp x=dns.corp:53", Err("`x` is not a local ADDR:PORT")),
            (
                "udp5353=dns.corp:53",
                Err("`udp5353` is not a local ADDR:PORT"),
            ),
            ("tcp 1=a:1", Err("`tcp 1` is not a local ADDR:PORT")),
        ];
        for (body, want) in lines {
            let got = parse_line(body).map(|(kind, spec)| line(kind, spec));
            match want {
                Ok(want) => assert_eq!(got.as_deref(), Ok(*want), "{body:?}"),
                Err(words) => {
                    let e = got.unwrap_err();
                    assert!(e.contains(words), "{body:?}: {e}");
                }
            }
        }
        // The list's lines are bodies that add the same forward again.
        for kind in [Kind::Tcp, Kind::Udp] {
            let spec = ForwardSpec::parse("127.0.0.2:53=dns.corp:53").unwrap();
            assert_eq!(parse_line(&line(kind, &spec)), Ok((kind, spec)));
        }
        // A UDP forward's last error follows as a comment, on its line.
        let mut state = UdpForwardState {
            spec: ForwardSpec::parse("127.0.0.2:53=dns.corp:53").unwrap(),
            flows: 0,
            last_error: None,
        };
        assert_eq!(udp_line(&state), "udp 127.0.0.2:53=dns.corp:53");
        state.last_error = Some("relay answered 403 Forbidden:\nno route".into());
        let listed = udp_line(&state);
        assert_eq!(
            listed,
            "udp 127.0.0.2:53=dns.corp:53  # last error: relay answered 403 Forbidden: no route"
        );
        assert_eq!(parse_line(&listed), Ok((Kind::Udp, state.spec)));

        let v4 = SocketAddr::from(([127, 0, 0, 1], 5353));
        type Named = Result<(Kind, SocketAddr), &'static str>;
        let paths: &[(&str, Named)] = &[
            ("127.0.0.1:5353", Ok((Kind::Tcp, v4))),
            ("5353", Ok((Kind::Tcp, v4))),
            ("udp/127.0.0.1:5353", Ok((Kind::Udp, v4))),
            ("udp/5353", Ok((Kind::Udp, v4))),
            ("udp/", Err("`` is not a local ADDR:PORT")),
            ("udp", Err("`udp` is not a local ADDR:PORT")),
            ("tcp/5353", Err("`tcp/5353` is not a local ADDR:PORT")),
        ];
        for (rest, want) in paths {
            match (parse_forward_path(rest), want) {
                (got, Ok(want)) => assert_eq!(got, Ok(*want), "{rest}"),
                (Err(e), Err(words)) => {
                    assert!(e.contains(words), "{rest}: {e}");
                    assert!(e.contains("forwards/udp/LISTEN"), "{e}");
                }
                (Ok(got), Err(_)) => panic!("{rest}: {got:?}"),
            }
        }
        for kind in [Kind::Tcp, Kind::Udp] {
            let path = forward_path(kind, v4);
            let rest = path.strip_prefix("forwards/").unwrap();
            assert_eq!(parse_forward_path(rest), Ok((kind, v4)), "{path}");
        }
    }
}
