//! One access-log line per request and per tunnel, through `tracing` under the
//! target `porthole::access`: client, method, target, route, status, bytes
//! each way and duration (the time comes from the log formatter).

use std::time::Instant;

use crate::ConnCtx;

/// What the access log records about one request or tunnel.
#[derive(Debug)]
pub struct Access {
    pub method: String,
    pub target: String,
    pub route: Option<String>,
    pub status: u16,
    /// Bytes from the client (head and body).
    pub bytes_in: u64,
    /// Bytes to the client (head and body).
    pub bytes_out: u64,
    pub started: Instant,
}

impl Access {
    pub fn new(method: &str, target: &str, head_len: usize) -> Access {
        Access {
            method: method.to_string(),
            target: target.to_string(),
            route: None,
            status: 0,
            bytes_in: head_len as u64,
            bytes_out: 0,
            started: Instant::now(),
        }
    }

    /// Writes the line.
    pub fn finish(&self, ctx: &ConnCtx) {
        tracing::info!(
            target: "porthole::access",
            client = %ctx.peer,
            method = %self.method,
            target = %self.target,
            route = self.route.as_deref().unwrap_or("-"),
            status = self.status,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "access"
        );
    }
}
