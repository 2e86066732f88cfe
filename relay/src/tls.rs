//! TLS on both sides, with rustls (TLS 1.2 and 1.3 only):
//!
//! - the aggregate port (`[tls]`): a connection whose first byte is a TLS
//!   record is decrypted here and served as HTTP/2 when ALPN chose `h2`,
//!   otherwise as HTTP/1.1; a verified client certificate's subject common
//!   name becomes the connection's user;
//! - the client side, [`ClientTls`], for every connection Porthole dials with
//!   TLS: internal servers (route `tls = true` or `to = "https://..."`, SNI
//!   from the upstream host), and, as [`RelayTls`], the shim's link to its
//!   relay (ALPN `h2`) and an inside relay's uplink to the outside relay
//!   (ALPN `http/1.1`); verified against a configured `ca` or the system
//!   roots.
//!
//! Certificates and keys are read when the configuration is validated, so a
//! reload (SIGHUP) picks up renewed files for new connections.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use blake2::{Blake2s256, Digest};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::codec::{Conn, Rewind};
use crate::config::Collector;
use crate::{h2, http1, ConnCtx};

/// `[tls]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain for the aggregate port, leaf first.
    cert: Option<String>,
    /// PEM private key for `cert`.
    key: Option<String>,
    /// Refuse plain HTTP on the aggregate port with `400`.
    #[serde(default)]
    require: bool,
    /// PEM CA certificates that client certificates must chain to.
    client_ca: Option<String>,
    /// `"none"`, `"optional"` or `"required"`; with `client_ca`, default `"optional"`.
    client_auth: Option<String>,
}

/// Whether clients present certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    Optional,
    Required,
}

/// The validated `[tls]` settings of the aggregate port.
#[derive(Clone)]
pub struct Tls {
    pub require: bool,
    pub client_auth: ClientAuth,
    cert: PathBuf,
    acceptor: TlsAcceptor,
}

impl fmt::Debug for Tls {
    // Paths only: the server config holds the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("require", &self.require)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

/// The protocols offered in ALPN, preferred first.
const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

impl RawTls {
    pub(crate) fn validate(&self, c: &mut Collector) -> Option<Tls> {
        let client_auth = match (self.client_auth.as_deref(), &self.client_ca) {
            (None, None) | (Some("none"), _) => ClientAuth::None,
            (None, Some(_)) | (Some("optional"), Some(_)) => ClientAuth::Optional,
            (Some("required"), Some(_)) => ClientAuth::Required,
            (Some("optional" | "required"), None) => {
                c.push("tls.client_auth", "needs tls.client_ca");
                ClientAuth::None
            }
            (Some(other), _) => {
                c.push(
                    "tls.client_auth",
                    format!("`{other}` is not \"none\", \"optional\" or \"required\""),
                );
                ClientAuth::None
            }
        };
        let (cert, key) = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) => {
                if self.require || self.client_ca.is_some() {
                    c.push(
                        "tls.cert",
                        "tls.require and tls.client_ca need tls.cert and tls.key",
                    );
                }
                return None;
            }
            (Some(_), None) => {
                c.push("tls.key", "tls.cert needs tls.key");
                return None;
            }
            (None, Some(_)) => {
                c.push("tls.cert", "tls.key needs tls.cert");
                return None;
            }
        };
        let chain = match read_certs(cert) {
            Ok(chain) => chain,
            Err(e) => {
                c.push("tls.cert", e);
                return None;
            }
        };
        let key_der = match read_key(key) {
            Ok(k) => k,
            Err(e) => {
                c.push("tls.key", e);
                return None;
            }
        };
        let builder = match ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        {
            Ok(b) => b,
            Err(e) => {
                c.push("tls", e.to_string());
                return None;
            }
        };
        let builder = match (&self.client_ca, client_auth) {
            (Some(ca), ClientAuth::Optional | ClientAuth::Required) => {
                let roots = match read_roots(ca) {
                    Ok(r) => r,
                    Err(e) => {
                        c.push("tls.client_ca", e);
                        return None;
                    }
                };
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let verifier = if client_auth == ClientAuth::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                match verifier.build() {
                    Ok(v) => builder.with_client_cert_verifier(v),
                    Err(e) => {
                        c.push("tls.client_ca", format!("{ca}: {e}"));
                        return None;
                    }
                }
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = match builder.with_single_cert(chain, key_der) {
            Ok(config) => config,
            Err(e) => {
                c.push("tls.key", format!("{key} does not fit {cert}: {e}"));
                return None;
            }
        };
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Some(Tls {
            require: self.require,
            client_auth,
            cert: PathBuf::from(cert),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {path}: {e}"))?
        .collect();
    let certs = certs.map_err(|e| format!("{path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{path} holds no PEM certificate"));
    }
    Ok(certs)
}

/// A PEM private key; the error names the file, never its content.
fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a PEM private key from {path}: {e}"))
}

fn read_roots(path: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{path}: not a CA certificate: {e}"))?;
    }
    Ok(roots)
}

/// Serves a connection that starts with a TLS ClientHello: the handshake
/// (bounded by `head_timeout`), then HTTP/2 or HTTP/1.1 over the decrypted
/// stream, as ALPN decided. Both serve every request through the same gate.
pub async fn serve(conn: Conn<TcpStream>, mut ctx: ConnCtx, tls: &Tls) {
    let head_timeout = ctx.shared.config().limits.head_timeout;
    let handshake = tls.acceptor.accept(Rewind::from(conn));
    let stream = match tokio::time::timeout(head_timeout, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!(?head_timeout, "TLS handshake timed out"),
    };
    let (_, session) = stream.get_ref();
    ctx.tls = true;
    ctx.cert_user = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| common_name(leaf));
    if let Some(user) = &ctx.cert_user {
        tracing::debug!(user, "client certificate verified");
    }
    let h2 = session.alpn_protocol() == Some(b"h2");
    if h2 {
        h2::serve(Conn::new(stream), ctx).await;
    } else {
        http1::serve(Conn::new(stream), ctx).await;
    }
}

/// The subject common name of a (verified) certificate, if it is a usable name.
pub fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .trim();
    let usable = !cn.is_empty() && cn.len() <= 256 && !cn.chars().any(char::is_control);
    usable.then(|| cn.to_string())
}

// ---------------------------------------------------------------- client side

/// Client-side TLS: the one builder for every connection Porthole dials
/// with TLS (a route's internal server, the shim's link to its relay, an
/// inside relay's uplink to the outside relay). Verifies against a PEM `ca`
/// or the system roots; offers the given ALPN protocols; presents a client
/// certificate when one is configured (a route's `via_cert`).
#[derive(Clone)]
pub struct ClientTls {
    /// The `ca` file, or `None` for the system roots.
    pub ca: Option<PathBuf>,
    alpn: Vec<Vec<u8>>,
    /// The client certificate file presented, if any (the key stays unnamed
    /// here: its content is only in `fingerprint`).
    identity: Option<PathBuf>,
    /// A digest of the settings: the `ca` path, the ALPN list, and the
    /// client certificate chain and private key as read.
    fingerprint: Fingerprint,
    connector: TlsConnector,
}

impl fmt::Debug for ClientTls {
    // Paths only: the fingerprint covers the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca)
            .field("alpn", &self.alpn)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Same settings (a reload compares them, and pooled connections are kept
/// apart by them): the same `ca` path, ALPN list and client identity. The
/// identity counts by content, so a certificate or key replaced in place is
/// another identity; a CA file renewed in place counts as the same.
impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        self.fingerprint == other.fingerprint
    }
}

/// A client identity from its two configuration keys, named `names` (a
/// certificate chain and a private key, PEM files): both or neither; `Err`
/// says so when only one is set.
pub fn identity_pair<'a>(
    cert: Option<&'a str>,
    key: Option<&'a str>,
    names: (&str, &str),
) -> Result<Option<(&'a str, &'a str)>, String> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert, key))),
        (None, None) => Ok(None),
        _ => Err(format!("{} and {} go together", names.0, names.1)),
    }
}

impl ClientTls {
    /// Client settings verifying against `ca` (a PEM file) or the system
    /// roots, without ALPN (a route's internal server).
    pub fn new(ca: Option<&str>) -> Result<ClientTls, String> {
        ClientTls::with_alpn(ca, &[])
    }

    /// As [`ClientTls::new`], offering `alpn` (preferred first).
    pub fn with_alpn(ca: Option<&str>, alpn: &[&[u8]]) -> Result<ClientTls, String> {
        ClientTls::with_identity(ca, alpn, None)
    }

    /// As [`ClientTls::with_alpn`], presenting the client certificate chain
    /// and key in `identity` (PEM files `(cert, key)`) when the server asks.
    pub fn with_identity(
        ca: Option<&str>,
        alpn: &[&[u8]],
        identity: Option<(&str, &str)>,
    ) -> Result<ClientTls, String> {
        let roots = match ca {
            Some(path) => Arc::new(read_roots(path)?),
            None => system_roots()?,
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let mut digest = Digester::default();
        digest.field(ca.unwrap_or("").as_bytes());
        for protocol in &alpn {
            digest.field(protocol);
        }
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certs(cert)?;
                let key_der = read_key(key)?;
                digest.field(b"identity");
                for c in &chain {
                    digest.field(c.as_ref());
                }
                digest.field(key_der.secret_der());
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| format!("{cert} and {key} do not make a client identity: {e}"))?
            }
        };
        config.alpn_protocols = alpn.clone();
        Ok(ClientTls {
            ca: ca.map(PathBuf::from),
            alpn,
            identity: identity.map(|(cert, _)| PathBuf::from(cert)),
            fingerprint: digest.finish(),
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// A digest of these settings (see [`PartialEq`]), for keeping
    /// connections made under different settings apart.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The TLS handshake on a dialled connection, verifying `host` (a DNS
    /// name or an IP address; also the SNI); `Err` explains the failure
    /// (`certificate verify failed: UnknownIssuer`).
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        host: &str,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let name = tls_name(host)?;
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| failure_text(&e))
    }
}

/// A digest of client TLS settings ([`ClientTls::fingerprint`]). It covers
/// a private key, so `Debug` does not show it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(..)")
    }
}

/// Digests a sequence of byte strings, each length-prefixed so that no two
/// sequences share an input.
#[derive(Default)]
struct Digester(Blake2s256);

impl Digester {
    fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
    }

    fn finish(self) -> Fingerprint {
        Fingerprint(self.0.finalize().into())
    }
}

/// `host` as the name a certificate must carry: a DNS name or an IP address
/// (IPv6 with or without brackets).
pub fn tls_name(host: &str) -> Result<ServerName<'static>, String> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(bare.to_string())
        .map_err(|_| format!("`{host}` is not a name TLS can verify"))
}

/// TLS to another relay that Porthole dials (the shim's link, an uplink):
/// the client settings and the name the relay's certificate must carry.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayTls {
    /// The name verified in the relay's certificate, and sent as SNI.
    pub server_name: String,
    pub client: ClientTls,
}

impl RelayTls {
    /// `server_name` must be a DNS name or an IP address.
    pub fn new(client: ClientTls, server_name: &str) -> Result<RelayTls, String> {
        tls_name(server_name)?;
        Ok(RelayTls {
            server_name: server_name.to_string(),
            client,
        })
    }

    /// The handshake with the relay at `relay` (for the error text) within
    /// `timeout`; `Err` says which relay and why (`TLS with relay.example:8080
    /// failed: certificate verify failed: UnknownIssuer`).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        relay: &str,
        timeout: std::time::Duration,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        match tokio::time::timeout(timeout, self.client.handshake(tcp, &self.server_name)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(why)) => Err(format!("TLS with {relay} failed: {why}")),
            Err(_) => Err(format!(
                "TLS with {relay} failed: no handshake within {timeout:?}"
            )),
        }
    }
}

/// The system's root certificates, read once.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("no system root certificates found; name a CA file in `ca`".into());
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

/// Why a handshake failed, as a person reads it.
fn failure_text(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(why)) => {
            format!("certificate verify failed: {why:?}")
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a fresh self-signed certificate and its key for `name` to
    /// `dir/{file}.pem` and `dir/{file}.key`, returning both paths.
    fn identity(dir: &std::path::Path, file: &str, name: &str) -> (String, String) {
        let made = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let cert = dir.join(format!("{file}.pem"));
        let key = dir.join(format!("{file}.key"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
        (cert.display().to_string(), key.display().to_string())
    }

    #[test]
    fn the_client_identity_counts_in_equality() {
        let dir = tempfile::tempdir().unwrap();
        // A CA file of its own, so the test does not need system roots.
        let (ca, _) = identity(dir.path(), "ca", "ca.test");
        let ca = Some(ca.as_str());
        let (a_cert, a_key) = identity(dir.path(), "a", "hop-a.test");
        let (b_cert, b_key) = identity(dir.path(), "b", "hop-b.test");
        let with =
            |cert: &str, key: &str| ClientTls::with_identity(ca, &[], Some((cert, key))).unwrap();

        let a = with(&a_cert, &a_key);
        assert_eq!(
            a,
            with(&a_cert, &a_key),
            "the same files are the same settings"
        );
        assert_ne!(a, with(&b_cert, &b_key), "another certificate and key");
        assert_ne!(a, ClientTls::new(ca).unwrap(), "no certificate at all");
        assert_ne!(a.fingerprint(), with(&b_cert, &b_key).fingerprint());

        // A certificate and key replaced in place (a renewal, then a
        // reload): the same paths, another identity.
        std::fs::copy(&b_cert, &a_cert).unwrap();
        std::fs::copy(&b_key, &a_key).unwrap();
        let renewed = with(&a_cert, &a_key);
        assert_ne!(a, renewed, "the content counts, not the path");
        assert_eq!(renewed, with(&b_cert, &b_key));

        // Debug names the files, never the key or the digest over it.
        let shown = format!("{a:?}");
        assert!(shown.contains("a.pem"), "{shown}");
        let key_pem = std::fs::read_to_string(&b_key).unwrap();
        let key_body = key_pem.lines().nth(1).unwrap();
        assert!(!shown.contains(key_body), "{shown}");
        assert!(!shown.contains("fingerprint"), "{shown}");
        assert_eq!(format!("{:?}", a.fingerprint()), "Fingerprint(..)");
    }
}
