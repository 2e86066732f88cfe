//! The shim's own endpoints on its listen port (requests whose host is the
//! shim): the PAC file, the link status, and the control endpoint that
//! `porthole-shim forward add|remove|list` talks to. Control is for local
//! users only: requests from other addresses get `403`.
//!
//! - `GET /proxy.pac`: the relay's PAC file, pointing at the shim;
//! - `GET /.porthole-shim/status`: `up` or `connecting: <reason>`;
//! - `GET /.porthole-shim/forwards`: one `LISTEN=HOST:PORT` per line, then
//!   the UDP forwards as `udp LISTEN=HOST:PORT`;
//! - `POST /.porthole-shim/forwards` with body `LISTEN=HOST:PORT`: add one;
//! - `DELETE /.porthole-shim/forwards/LISTEN`: remove one (closes its listener).

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
use crate::link::{empty, LinkState};
use crate::{plain, Ctx};

/// Where the control endpoints live: a prefix no application uses.
pub const PREFIX: &str = "/.porthole-shim/";
/// Largest body accepted from the relay (PAC) or a control client.
const MAX_BODY: usize = 1 << 20;

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
            let tcp = ctx.forwards.list().into_iter().map(|f| f.to_string());
            let udp = ctx
                .udp_forwards
                .list()
                .into_iter()
                .map(|f| format!("udp {f}"));
            let lines: Vec<String> = tcp.chain(udp).collect();
            text(StatusCode::OK, lines.join("\n"))
        }
        (Method::POST, "forwards") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return plain(StatusCode::BAD_REQUEST, "unreadable body"),
            };
            let spec = match ForwardSpec::parse(String::from_utf8_lossy(&body).trim()) {
                Ok(s) => s,
                Err(e) => return plain(StatusCode::BAD_REQUEST, &e),
            };
            match ctx.forwards.add(spec).await {
                Ok(spec) => text(StatusCode::CREATED, spec.to_string()),
                Err(e) => plain(StatusCode::CONFLICT, &e),
            }
        }
        (Method::DELETE, rest) if rest.starts_with("forwards/") => {
            let listen = &rest["forwards/".len()..];
            let Ok(listen) = listen.parse::<SocketAddr>() else {
                return plain(
                    StatusCode::BAD_REQUEST,
                    "expected /.porthole-shim/forwards/ADDR:PORT",
                );
            };
            if ctx.forwards.remove(listen) {
                text(StatusCode::OK, format!("removed {listen}"))
            } else {
                plain(StatusCode::NOT_FOUND, &format!("no forward on {listen}"))
            }
        }
        _ => plain(StatusCode::NOT_FOUND, "no such endpoint on the shim"),
    }
}

/// The relay's PAC file (routes through the proxy, the rest `DIRECT`), with
/// the proxy replaced by the shim's address as the client reached it.
async fn proxy_pac(local: SocketAddr, ctx: &Ctx) -> Response<Body> {
    let uri = format!("http://{}/proxy.pac", ctx.link.relay_name());
    let req = match Request::get(uri).body(empty()) {
        Ok(r) => r,
        Err(_) => return plain(StatusCode::BAD_GATEWAY, "relay_name is not a host name"),
    };
    let resp = match ctx.link.send(req).await {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_GATEWAY, &e.to_string()),
    };
    let status = resp.status();
    let body = match Limited::new(resp.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return plain(StatusCode::BAD_GATEWAY, &format!("PAC from the relay: {e}")),
    };
    if status != StatusCode::OK {
        let why = format!("the relay answered {status} for its PAC file (is relay_name its name?)");
        return plain(StatusCode::BAD_GATEWAY, &why);
    }
    match pac::repoint(&String::from_utf8_lossy(&body), &local.to_string()) {
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
