//! The gate between a classified request and its handler, whatever protocol
//! carried it: the per-client request rate, who the client is
//! ([`auth`](crate::auth)), and whether the access rules
//! ([`rules`](crate::rules)) let that client reach the target. Cheapest
//! check first: a flood is turned away before any password is hashed.
//! Event topics are checked by the event endpoint with [`admit_topic`], once
//! it knows the topic.

use std::time::Instant;

use crate::access_log::Access;
use crate::config::Config;
use crate::error::{ErrorKind, RelayError};
use crate::rules::Decision;
use crate::{auth, ConnCtx};

/// Admits a request for `target` (`host`, `port`; `None` for the relay's own
/// endpoints, which check topics themselves). The user, once authenticated,
/// goes in the request's `access` record, admitted or not, and with a rule's
/// refusal the route refused too: the access line says who was refused what.
pub async fn admit(
    ctx: &ConnCtx,
    config: &Config,
    proxy_authorization: Option<&[u8]>,
    target: Option<(&str, u16)>,
    access: &mut Access,
) -> Result<(), RelayError> {
    if let Some(rate) = config.limits.max_requests_per_second_per_client {
        if let Err(wait) = ctx.shared.rate.check(ctx.peer.ip(), rate, Instant::now()) {
            let retry_after = (wait.as_secs_f64().ceil() as u64).max(1);
            return Err(RelayError::new(ErrorKind::TooManyRequests { retry_after }));
        }
    }
    access.user =
        auth::authenticate(&config.auth, proxy_authorization, ctx.cert_user.as_deref()).await?;
    let user = access.user.as_deref();
    if let Some((host, port)) = target {
        let decision = config.rules.allows_route(user, ctx.peer.ip(), host, port);
        if let Decision::Deny(denial) = decision {
            tracing::info!(client = %ctx.peer, user = user.unwrap_or("-"), host, port, %denial, "access refused");
            // The access line names the route the rules kept the user from.
            access.route = config.routes.lookup(host).cloned();
            return Err(RelayError::new(ErrorKind::Forbidden(denial)));
        }
    }
    Ok(())
}

/// May the client who was admitted as `user` poll `topic`? `Err` is a `403`
/// naming the rule that refused.
pub fn admit_topic(
    ctx: &ConnCtx,
    config: &Config,
    user: Option<&str>,
    topic: &str,
) -> Result<(), RelayError> {
    match config.rules.allows_topic(user, ctx.peer.ip(), topic) {
        Decision::Allow => Ok(()),
        Decision::Deny(denial) => {
            tracing::info!(client = %ctx.peer, user = user.unwrap_or("-"), topic, %denial, "topic refused");
            Err(RelayError::new(ErrorKind::Forbidden(denial)))
        }
    }
}
