//! One access-log line per request and per tunnel: client, user, method,
//! target, route, status, bytes each way and duration. By default through `tracing`
//! under the target `porthole::access`; with `[log] access = "FILE"` into
//! that file, which `SIGUSR1` reopens (for logrotate).
//! Credentials never appear: only the user name they proved.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use crate::config::Route;
use crate::ConnCtx;

/// What the access log records about one request or tunnel.
#[derive(Debug)]
pub struct Access {
    /// Static text for the standard methods (no allocation per request).
    pub method: Cow<'static, str>,
    /// Empty when no access line is written (see [`Access::logged`]).
    pub target: String,
    /// The route that served it (shared with the configuration, no copy).
    pub route: Option<Arc<Route>>,
    /// The authenticated user (password or client certificate), if any.
    pub user: Option<String>,
    pub status: u16,
    /// Bytes from the client (head and body).
    pub bytes_in: u64,
    /// Bytes to the client (head and body).
    pub bytes_out: u64,
    pub started: Instant,
    /// A tunnel (CONNECT or upgrade) rather than a single request.
    pub tunnel: bool,
}

impl Access {
    /// The record of a request; `target` is kept only when the line is
    /// written (`logged`): the metrics need the method, not the target.
    pub fn new(method: Cow<'static, str>, target: &str, head_len: usize, logged: bool) -> Access {
        Access {
            method,
            target: if logged {
                log_safe(target)
            } else {
                String::new()
            },
            route: None,
            user: None,
            status: 0,
            bytes_in: head_len as u64,
            bytes_out: 0,
            started: Instant::now(),
            tunnel: false,
        }
    }

    /// The route's name, `-` when no route served the request.
    pub fn route_name(&self) -> &str {
        self.route.as_ref().map_or("-", |r| r.host.as_str())
    }

    /// Whether [`Access::finish`] writes a line: to the access-log file, or
    /// through `tracing` when `porthole::access` is enabled at info level.
    pub fn logged(ctx: &ConnCtx) -> bool {
        ctx.shared.access_file.is_some()
            || tracing::enabled!(target: "porthole::access", tracing::Level::INFO)
    }

    /// Writes the line and counts the request in the metrics.
    pub fn finish(&self, ctx: &ConnCtx) {
        let seconds = self.started.elapsed().as_secs_f64();
        let route = self.route_name();
        ctx.shared.metrics.record(route, self, seconds);
        if let Some(file) = &ctx.shared.access_file {
            file.write_line(&format!(
                "{} client={} user={:?} method={} target={:?} route={:?} status={} bytes_in={} bytes_out={} duration_ms={:.3}\n",
                humantime::format_rfc3339_millis(SystemTime::now()),
                ctx.peer,
                self.user.as_deref().unwrap_or("-"),
                self.method,
                self.target,
                route,
                self.status,
                self.bytes_in,
                self.bytes_out,
                seconds * 1000.0
            ));
            return;
        }
        tracing::info!(
            target: "porthole::access",
            client = %ctx.peer,
            user = self.user.as_deref().unwrap_or("-"),
            method = %self.method,
            target = %self.target,
            route = self.route_name(),
            status = self.status,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            // Microseconds: a number with at most three decimals, in text and JSON.
            duration_ms = (seconds * 1_000_000.0).round() / 1000.0,
            "access"
        );
    }
}

/// A request target as the access log records it: without user
/// information ([`without_userinfo`]), and with `"` percent-encoded, so a
/// target cannot end its field early and forge others (`q"route="evil"`)
/// on a line a grep or a regex reads. (Targets hold no spaces or control
/// characters: the relay refuses those.)
fn log_safe(target: &str) -> String {
    let target = without_userinfo(target);
    if target.contains('"') {
        target.replace('"', "%22")
    } else {
        target
    }
}

/// A request target as the access log records it: user information in its
/// authority (`http://user:password@host/`, `CONNECT user:password@host:443`),
/// which the relay refuses but a client may still have sent, is replaced by
/// `***`, so that no password reaches the log. Origin-form targets (`/a@b`)
/// are kept as they are.
fn without_userinfo(target: &str) -> String {
    let start = match target.find("://") {
        Some(at) => at + 3,
        None if target.starts_with('/') => return target.to_string(),
        None => 0,
    };
    let end = target[start..]
        .find(['/', '?', '#'])
        .map_or(target.len(), |at| start + at);
    match target[start..end].rfind('@') {
        Some(at) => format!("{}***{}", &target[..start], &target[start + at..]),
        None => target.to_string(),
    }
}

/// Status logged for a request its client abandoned before the answer
/// (nginx's 499, "client closed request").
pub const CLIENT_GONE: u16 = 499;

/// Status logged for a request the drain timeout ended before its answer:
/// the relay stopped serving it, not its client.
pub const CUT_BY_DRAIN: u16 = 503;

/// An access record whose line is written even when its request is dropped
/// before it ends: with the status already sent (a download the drain
/// timeout cut), or [`CLIENT_GONE`] before any (an HTTP/2 client resets its
/// stream while the relay dials).
pub struct Pending<'a> {
    access: Option<Access>,
    ctx: &'a ConnCtx,
}

impl<'a> Pending<'a> {
    pub fn new(access: Access, ctx: &'a ConnCtx) -> Self {
        Pending {
            access: Some(access),
            ctx,
        }
    }

    /// The record, for the caller to finish: the request did not end early.
    pub fn take(mut self) -> Access {
        match self.access.take() {
            Some(access) => access,
            None => unreachable!("a Pending record is taken once, by value"),
        }
    }
}

impl std::ops::Deref for Pending<'_> {
    type Target = Access;
    fn deref(&self) -> &Access {
        match &self.access {
            Some(access) => access,
            None => unreachable!("a Pending record holds its access until taken"),
        }
    }
}

impl std::ops::DerefMut for Pending<'_> {
    fn deref_mut(&mut self) -> &mut Access {
        match &mut self.access {
            Some(access) => access,
            None => unreachable!("a Pending record holds its access until taken"),
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(mut access) = self.access.take() {
            tracing::debug!(target = %access.target, status = access.status, "request ended early");
            if access.status == 0 {
                // Ended before its answer: by the relay's drain timeout
                // (it stopped serving) or by its client.
                access.status = match self.ctx.shared.is_draining() {
                    true => CUT_BY_DRAIN,
                    false => CLIENT_GONE,
                };
            }
            access.finish(self.ctx);
        }
    }
}

/// The access-log file: appended to, reopened on request.
pub struct FileSink {
    path: PathBuf,
    // A plain mutex: one short write per request, never held across an await.
    file: Mutex<File>,
}

impl FileSink {
    pub fn open(path: &Path) -> std::io::Result<FileSink> {
        Ok(FileSink {
            path: path.to_path_buf(),
            file: Mutex::new(open_append(path)?),
        })
    }

    /// Opens the path again (after logrotate moved the old file away).
    pub fn reopen(&self) {
        match open_append(&self.path) {
            Ok(f) => {
                *self.file.lock().unwrap_or_else(|p| p.into_inner()) = f;
                tracing::info!(path = %self.path.display(), "access log reopened");
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot reopen the access log; still writing to the old file")
            }
        }
    }

    fn write_line(&self, line: &str) {
        static WARN: crate::logging::Every = crate::logging::Every::new(10);
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            let lost = LINES_LOST.fetch_add(1, Ordering::Relaxed) + 1;
            if WARN.due() {
                tracing::warn!(path = %self.path.display(), error = %e, lost, "access log write failed (one such line per 10 s at most; porthole_access_lines_lost_total counts the lines)");
            }
        }
    }
}

/// Access lines the file could not take (a full disk), for the metrics.
static LINES_LOST: AtomicU64 = AtomicU64::new(0);

/// Access lines lost so far because writing the access-log file failed.
pub fn lines_lost() -> u64 {
    LINES_LOST.load(Ordering::Relaxed)
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::without_userinfo;

    #[test]
    fn targets_are_logged_without_user_information() {
        let cases = [
            ("http://u:pw@a.test/x@y", "http://***@a.test/x@y"),
            ("http://a.test/x?u=b@c", "http://a.test/x?u=b@c"),
            ("http://u@p@a.test:81", "http://***@a.test:81"),
            ("u:pw@a.test:443", "***@a.test:443"),
            ("a.test:443", "a.test:443"),
            ("/mail/a@b", "/mail/a@b"),
            ("*", "*"),
        ];
        for (target, logged) in cases {
            assert_eq!(without_userinfo(target), logged, "{target}");
        }
    }
}
