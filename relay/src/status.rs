//! `GET /status` on the admin listener: one self-contained HTML page (no
//! external assets, works offline) that refreshes itself every few seconds,
//! in the spirit of HAProxy's stats page.

use std::fmt::Write as _;
use std::time::SystemTime;

use crate::metrics::Name;
use crate::Shared;

/// Seconds between automatic refreshes of the page.
const REFRESH_SECS: u32 = 3;

/// Renders the status page.
pub fn render(shared: &Shared) -> String {
    let config = shared.config();
    let m = &shared.metrics;
    let mut html = String::with_capacity(8 * 1024);
    let uptime = SystemTime::now()
        .duration_since(shared.started)
        .map(|d| {
            humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
        })
        .unwrap_or_else(|_| "-".into());
    let state = if shared.is_draining() {
        "draining"
    } else {
        "serving"
    };
    let _ = write!(
        html,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECS}">
<title>Porthole relay {name}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; margin: 0 0 .3em; }} h2 {{ font-size: 1.1em; margin: 1.4em 0 .4em; }}
table {{ border-collapse: collapse; min-width: 40em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: left; }}
th {{ background: #eef; }} td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.ok {{ color: #070; }} .bad {{ color: #a00; }} .muted {{ color: #777; }}
</style></head><body>
<h1>Porthole relay <code>{name}</code></h1>
<p>version {version} &middot; up {uptime} &middot; <span class="{state_class}" id="state">{state}</span>
&middot; <span id="workers">{workers}</span> connection workers
&middot; open connections <span id="open-connections">{conns}</span>
&middot; open long-polls {polls}</p>
"#,
        name = escape(&config.relay.name),
        version = env!("CARGO_PKG_VERSION"),
        state_class = if state == "serving" { "ok" } else { "bad" },
        workers = shared.workers,
        conns = m.open_connections.get(),
        polls = m.open_long_polls.get(),
    );

    html.push_str("<h2>Listeners</h2><table><tr><th>role</th><th>address</th></tr>\n");
    for (role, addr) in shared
        .bound
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let _ = writeln!(html, "<tr><td>{role}</td><td>{addr}</td></tr>");
    }
    html.push_str("</table>\n");

    html.push_str(
        "<h2>Routes</h2><table id=\"routes\"><tr><th>host</th><th>to</th><th>ports</th>\
         <th>2xx</th><th>3xx</th><th>4xx</th><th>5xx</th><th>bytes in</th><th>bytes out</th><th>open tunnels</th></tr>\n",
    );
    let mut rows: Vec<Name> = config
        .routes
        .routes()
        .iter()
        .map(|r| Name::from(r.host.as_str()))
        .collect();
    rows.push(Name::from("-"));
    for (i, name) in rows.iter().enumerate() {
        let (to, ports) = match config.routes.routes().get(i) {
            Some(r) => {
                let to = match (&r.via, r.to.port) {
                    (Some(via), _) => format!("via {}", via.addr()),
                    (None, Some(p)) => crate::upstream::display_addr(&r.to.host, p),
                    (None, None) => r.to.host.clone(),
                };
                let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
                (to, ports.join(", "))
            }
            None => (
                "<span class=\"muted\">no route: refusals, and the relay's own endpoints</span>"
                    .to_string(),
                String::new(),
            ),
        };
        let (bytes_in, bytes_out) = m.bytes_for(name);
        let _ = writeln!(
            html,
            "<tr data-route=\"{host}\"><td>{host}</td><td>{to}</td><td>{ports}</td>\
             <td class=\"n\" data-count=\"2xx\">{c2}</td><td class=\"n\">{c3}</td><td class=\"n\">{c4}</td><td class=\"n\">{c5}</td>\
             <td class=\"n\">{bytes_in}</td><td class=\"n\">{bytes_out}</td><td class=\"n\">{tunnels}</td></tr>",
            host = escape(&name.0),
            c2 = m.requests_for(name, "2xx"),
            c3 = m.requests_for(name, "3xx"),
            c4 = m.requests_for(name, "4xx"),
            c5 = m.requests_for(name, "5xx"),
            tunnels = m.open_tunnels_for(name),
        );
    }
    html.push_str("</table>\n");

    let offered = shared.uplinks.offered();
    if offered.is_empty() {
        html.push_str("<h2>Uplinks</h2><p class=\"muted\">No uplinked relays.</p>\n");
    } else {
        html.push_str("<h2>Uplinks</h2><table id=\"uplinks\"><tr><th>name</th><th>uplink</th><th>state</th><th>open sessions</th><th>parked</th></tr>\n");
        for o in offered {
            let class = if o.state == "connected" { "ok" } else { "bad" };
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td>{}</td><td class=\"{class}\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                escape(&o.name),
                escape(&o.uplink),
                o.state,
                o.sessions,
                o.parked
            );
        }
        html.push_str("</table>\n");
    }
    if let Some(u) = &config.uplink {
        let _ = writeln!(
            html,
            "<p>This relay uplinks to <code>{}</code> as <code>{}</code>, offering {}.</p>",
            escape(&u.to),
            escape(&u.id),
            escape(&u.offer.join(", "))
        );
    }

    let topics = shared.events.topics();
    if topics.is_empty() {
        html.push_str(
            "<h2>Event topics</h2><p class=\"muted\">No topic published yet, and no one waiting on one.</p>\n",
        );
    } else {
        html.push_str("<h2>Event topics</h2><table id=\"topics\"><tr><th>topic</th><th>last id</th><th>pollers waiting</th></tr>\n");
        for (topic, last, pollers) in topics {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td class=\"n\">{last}</td><td class=\"n\">{pollers}</td></tr>",
                escape(&topic)
            );
        }
        html.push_str("</table>\n");
    }
    let _ = writeln!(html, "<p>event store: {}</p>", shared.events.store_kind());

    html.push_str("<h2>Configuration</h2><p>");
    let _ = write!(
        html,
        "source: <code>{}</code>; ",
        escape(&config.source.describe())
    );
    match shared.last_reload() {
        None => html.push_str("not reloaded since start."),
        Some(r) => {
            let at = httpdate::fmt_http_date(r.at);
            match r.error {
                None => {
                    let _ = write!(
                        html,
                        "last reload <span class=\"ok\">applied</span> at {at}."
                    );
                    if !r.needs_restart.is_empty() {
                        let _ = write!(
                            html,
                            " Changed, and waiting for a restart: <code id=\"needs-restart\">{}</code>.",
                            escape(&r.needs_restart.join(", "))
                        );
                    }
                }
                Some(e) => {
                    let _ = write!(
                        html,
                        "last reload <span class=\"bad\">refused</span> at {at}: <code id=\"reload-error\">{}</code>; the previous configuration stays.",
                        escape(&e)
                    );
                }
            }
        }
    }
    html.push_str("</p>\n</body></html>\n");
    html
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn page_lists_routes_and_reload_state() {
        let config =
            crate::Config::from_toml("[[route]]\nhost = \"wiki.corp\"\nto = \"10.0.0.1\"\n")
                .unwrap();
        let shared = Shared::new(config).unwrap();
        let page = render(&shared);
        assert!(
            page.contains(
                "<tr data-route=\"wiki.corp\"><td>wiki.corp</td><td>10.0.0.1</td><td>80, 443</td>"
            ),
            "{page}"
        );
        assert!(page.contains("not reloaded since start"));
        assert!(page.contains("http-equiv=\"refresh\""));
    }
}
