//! The proxy auto-config file (`GET /proxy.pac` on the relay's own host),
//! generated from the route table and the names uplinked relays offer: those
//! go through the relay, everything else `DIRECT`. The shim serves the same file pointing at itself
//! ([`repoint`]), so both programs share one generator.

use crate::codec::{FieldName, RequestHead};
use crate::routes::RouteTable;
use crate::ConnCtx;

/// The media type browsers expect for a PAC file.
pub const CONTENT_TYPE: &str = "application/x-ns-proxy-autoconfig";

/// The line that names the proxy; [`repoint`] replaces it.
const PROXY_LINE: &str = "  var proxy = \"PROXY ";

/// Renders the PAC file: `names` (route hosts, `*.suffix` patterns, the
/// names uplinked relays offer) use `PROXY proxy`, others go `DIRECT`.
pub fn render<'a>(names: impl IntoIterator<Item = &'a str>, proxy: &str) -> String {
    let mut out = String::from("function FindProxyForURL(url, host) {\n");
    out.push_str(&format!("{PROXY_LINE}{proxy}\";\n"));
    out.push_str("  host = host.toLowerCase();\n");
    let mut written = std::collections::HashSet::new();
    for name in names {
        // Names are validated host names; anything else could break the script.
        if !is_plain_name(name) || !written.insert(name) {
            continue;
        }
        match name.strip_prefix('*') {
            Some(suffix) => out.push_str(&format!(
                "  if (dnsDomainIs(host, \"{suffix}\")) return proxy;\n"
            )),
            None => out.push_str(&format!("  if (host == \"{name}\") return proxy;\n")),
        }
    }
    out.push_str("  return \"DIRECT\";\n}\n");
    out
}

/// The same PAC file with its proxy replaced by `proxy`; `None` if `pac` was
/// not written by [`render`].
pub fn repoint(pac: &str, proxy: &str) -> Option<String> {
    if !is_plain_name(proxy) {
        return None;
    }
    let mut found = false;
    let lines: Vec<String> = pac
        .lines()
        .map(|line| {
            if !found && line.starts_with(PROXY_LINE) {
                found = true;
                format!("{PROXY_LINE}{proxy}\";")
            } else {
                line.to_string()
            }
        })
        .collect();
    found.then(|| lines.join("\n") + "\n")
}

/// The PAC file for a request of the relay's own host, or `None` if the
/// request is not for it. The proxy named is the authority the client used
/// to reach the relay (it may be a NAT address the relay cannot know).
pub fn for_request(head: &RequestHead, path: &str, ctx: &ConnCtx) -> Option<String> {
    let path_only = path.split('?').next().unwrap_or(path);
    if path_only != "/proxy.pac" || !matches!(head.method(), "GET" | "HEAD") {
        return None;
    }
    let from_target = head
        .target()
        .strip_prefix("http://")
        .map(|rest| rest.split(['/', '?']).next().unwrap_or(rest).to_string());
    let from_host = || {
        head.fields
            .get(FieldName::Host)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|s| s.trim().to_string())
    };
    let proxy = from_target
        .or_else(from_host)
        .filter(|a| is_plain_name(a) && a.contains(':'))
        .unwrap_or_else(|| ctx.local.to_string());
    let config = ctx.shared.config();
    let offered = ctx.shared.uplinks.offered();
    let names = routes_and(&config.routes, offered.iter().map(|o| o.name.as_str()));
    Some(render(names, &proxy))
}

/// The route table's host names, then `more`.
fn routes_and<'a>(
    routes: &'a RouteTable,
    more: impl Iterator<Item = &'a str> + 'a,
) -> impl Iterator<Item = &'a str> + 'a {
    routes.routes().iter().map(|r| r.host.as_str()).chain(more)
}

/// Only characters of host names, IPv4/IPv6 literals and ports: nothing that
/// could end a JavaScript string.
fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '*' | '[' | ']')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn routes_go_through_the_proxy_and_the_rest_direct() {
        let config = Config::from_toml(
            "[[route]]\nhost = \"wiki.corp\"\nto = \"10.0.0.1\"\n[[route]]\nhost = \"*.plant\"\nto = \"10.0.0.2\"\n",
        )
        .unwrap();
        let pac = render(
            routes_and(&config.routes, ["erp.plant3", "wiki.corp"].into_iter()),
            "relay.example:8080",
        );
        assert!(
            pac.contains("var proxy = \"PROXY relay.example:8080\";"),
            "{pac}"
        );
        assert!(
            pac.contains("if (host == \"wiki.corp\") return proxy;"),
            "{pac}"
        );
        assert!(
            pac.contains("if (dnsDomainIs(host, \".plant\")) return proxy;"),
            "{pac}"
        );
        // A name an uplinked relay offers goes through the relay too; one
        // named twice is written once.
        assert!(
            pac.contains("if (host == \"erp.plant3\") return proxy;"),
            "{pac}"
        );
        assert_eq!(pac.matches("\"wiki.corp\"").count(), 1, "{pac}");
        assert!(pac.trim_end().ends_with("return \"DIRECT\";\n}"), "{pac}");

        let shim = repoint(&pac, "127.0.0.1:3128").unwrap();
        assert!(
            shim.contains("var proxy = \"PROXY 127.0.0.1:3128\";"),
            "{shim}"
        );
        assert!(!shim.contains("relay.example"));
        assert_eq!(repoint("not a pac", "127.0.0.1:3128"), None);
        assert_eq!(repoint(&pac, "x\"; alert(1); \""), None);
    }
}
