//! Access rules (`[[rule]]`): who may reach which routes, ports and event
//! topics. Pure decisions, evaluated in order, first match wins.
//!
//! With no rule at all the route table is the only gate. Once any rule
//! exists, what no rule allows is denied.
//!
//! A rule speaks about routes when it names `routes` or `ports`, about topics
//! when it names `topics`, and about both when it names none of them (so
//! `from = ["10.0.0.0/8"], allow = false` shuts a whole network out).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;

use crate::config::Collector;

/// `[[rule]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// User names, `group:NAME`, or `"*"` for any authenticated user; omitted: anyone.
    users: Option<Vec<String>>,
    /// Client networks (`10.0.0.0/8`, `192.0.2.7`); omitted: any address.
    from: Option<Vec<String>>,
    /// Requested host patterns, as route hosts (`wiki.corp`, `*.corp`, `*`).
    routes: Option<Vec<String>>,
    /// Requested ports.
    ports: Option<Vec<u16>>,
    /// Event topic globs (`plant-*`).
    topics: Option<Vec<String>>,
    /// Whether a match allows or refuses.
    allow: bool,
}

/// What the rules say about a request or a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Denial),
}

/// Why a request was refused; says nothing about the other rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// `rule[i]` matched with `allow = false`.
    Rule(usize),
    /// Rules exist and none matched.
    NoRule,
    /// CONNECT-UDP to a route without `udp = true`.
    NoUdp,
    /// A publication on the aggregate port from a user who is not one of
    /// `[events] publishers`.
    NotPublisher,
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Rule(i) => write!(f, "access refused by rule[{i}]"),
            Denial::NoRule => write!(f, "access refused: no rule allows it"),
            Denial::NoUdp => write!(f, "UDP refused: the route does not allow it (udp = true)"),
            Denial::NotPublisher => write!(f, "publishing refused: not one of [events] publishers"),
        }
    }
}

/// The validated rules, in order, and who may publish events on the
/// aggregate port (`[events] publishers`).
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    publishers: Option<UserMatch>,
}

#[derive(Debug, Clone)]
struct Rule {
    users: Option<UserMatch>,
    from: Option<Vec<Cidr>>,
    routes: Option<Vec<String>>,
    ports: Option<Vec<u16>>,
    topics: Option<Vec<String>>,
    allow: bool,
}

/// Names with groups already expanded.
#[derive(Debug, Clone)]
struct UserMatch {
    any_user: bool,
    names: HashSet<String>,
}

impl UserMatch {
    /// Whether an authenticated `user` is one of these; nobody else is.
    fn has(&self, user: Option<&str>) -> bool {
        user.is_some_and(|name| self.any_user || self.names.contains(name))
    }

    /// Reads a list of user names, `group:NAME` (its members) and `*` (any
    /// authenticated user); problems go under `key`.
    fn read(
        list: Vec<String>,
        groups: &HashMap<String, Vec<String>>,
        key: &str,
        c: &mut Collector,
    ) -> UserMatch {
        let mut m = UserMatch {
            any_user: false,
            names: HashSet::new(),
        };
        for u in list {
            let u = u.trim();
            if u == "*" {
                m.any_user = true;
            } else if let Some(g) = u.strip_prefix("group:") {
                match groups.get(g) {
                    Some(members) => m.names.extend(members.iter().cloned()),
                    None => c.push(key, format!("no group `{g}` in [auth.groups]")),
                }
            } else if u.is_empty() {
                c.push(key, "an empty user name");
            } else {
                m.names.insert(u.to_string());
            }
        }
        m
    }
}

impl Rules {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether events may be published on the aggregate port at all
    /// (`[events] publishers` is set).
    pub fn publishing(&self) -> bool {
        self.publishers.is_some()
    }

    /// May `user` publish events on the aggregate port?
    pub fn may_publish(&self, user: Option<&str>) -> bool {
        self.publishers.as_ref().is_some_and(|p| p.has(user))
    }

    /// May `user` (authenticated or not) from `addr` reach `host:port`?
    pub fn allows_route(
        &self,
        user: Option<&str>,
        addr: IpAddr,
        host: &str,
        port: u16,
    ) -> Decision {
        let host = host.strip_suffix('.').unwrap_or(host);
        self.first_match(user, addr, |r| {
            let about_routes = r.routes.is_some() || r.ports.is_some() || r.topics.is_none();
            about_routes
                && r.routes
                    .as_ref()
                    .is_none_or(|pats| pats.iter().any(|p| host_matches(p, host)))
                && r.ports.as_ref().is_none_or(|ports| ports.contains(&port))
        })
    }

    /// May `user` from `addr` poll (or publish to) the event topic `topic`?
    pub fn allows_topic(&self, user: Option<&str>, addr: IpAddr, topic: &str) -> Decision {
        self.first_match(user, addr, |r| match &r.topics {
            Some(globs) => globs.iter().any(|g| glob_matches(g, topic)),
            None => r.routes.is_none() && r.ports.is_none(),
        })
    }

    fn first_match(
        &self,
        user: Option<&str>,
        addr: IpAddr,
        what: impl Fn(&Rule) -> bool,
    ) -> Decision {
        if self.rules.is_empty() {
            return Decision::Allow;
        }
        let addr = addr.to_canonical();
        for (i, r) in self.rules.iter().enumerate() {
            let who = r.users.as_ref().is_none_or(|u| u.has(user));
            let whence = r
                .from
                .as_ref()
                .is_none_or(|nets| nets.iter().any(|n| n.contains(addr)));
            if who && whence && what(r) {
                return if r.allow {
                    Decision::Allow
                } else {
                    Decision::Deny(Denial::Rule(i))
                };
            }
        }
        Decision::Deny(Denial::NoRule)
    }
}

/// Validates `[[rule]]` entries and `[events] publishers`; `groups` is
/// `[auth.groups]`.
pub(crate) fn validate(
    raw: Vec<RawRule>,
    publishers: Option<Vec<String>>,
    groups: &HashMap<String, Vec<String>>,
    c: &mut Collector,
) -> Rules {
    let mut rules = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("rule[{i}].{field}");
        let mut nonempty = |field: &str, len: Option<usize>| {
            if len == Some(0) {
                c.push(key(field), "must not be empty (omit the key to match any)");
            }
        };
        nonempty("users", r.users.as_ref().map(Vec::len));
        nonempty("from", r.from.as_ref().map(Vec::len));
        nonempty("routes", r.routes.as_ref().map(Vec::len));
        nonempty("ports", r.ports.as_ref().map(Vec::len));
        nonempty("topics", r.topics.as_ref().map(Vec::len));

        let users = r
            .users
            .map(|list| UserMatch::read(list, groups, &key("users"), c));
        let from = r.from.map(|list| {
            let mut nets = Vec::new();
            for text in list {
                match Cidr::parse(&text) {
                    Ok(n) => nets.push(n),
                    Err(e) => c.push(key("from"), e),
                }
            }
            nets
        });
        let routes = r.routes.map(|list| {
            let mut pats = Vec::new();
            for p in list {
                let host = match p.trim() {
                    "*" => Some("*".to_string()),
                    written => crate::config::route_host(written),
                };
                match host {
                    Some(host) => pats.push(host),
                    None => c.push(
                        key("routes"),
                        format!("`{p}` is not a host name, IP address, *.suffix or *"),
                    ),
                }
            }
            pats
        });
        if r.ports.as_ref().is_some_and(|p| p.contains(&0)) {
            c.push(key("ports"), "port 0 is not a port");
        }
        if let Some(t) = r.topics.as_ref() {
            if t.iter().any(|g| g.trim().is_empty()) {
                c.push(key("topics"), "an empty topic pattern");
            }
        }
        rules.push(Rule {
            users,
            from,
            routes,
            ports: r.ports,
            topics: r.topics,
            allow: r.allow,
        });
    }
    let publishers = publishers.map(|list| {
        if list.is_empty() {
            c.push(
                "events.publishers",
                "must not be empty (omit the key to keep publishing on the admin listener only)",
            );
        }
        UserMatch::read(list, groups, "events.publishers", c)
    });
    Rules { rules, publishers }
}

/// A route-host pattern: exact, `*.suffix` (names under suffix), or `*`.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// A glob where `*` stands for any run of characters (possibly empty).
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*` at all: exact match
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// A network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `2001:db8::/32`, or a bare address (one host).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let bad = || format!("`{text}` is not a network like 10.0.0.0/8");
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| bad())?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Cidr { net, prefix })
    }

    /// Whether `addr` (already canonical) lies in this network.
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.net, addr) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn cidr_matching_by_table() {
        let cases = [
            ("10.0.0.0/8", "10.1.2.3", true),
            ("10.0.0.0/8", "11.0.0.1", false),
            ("192.168.1.7", "192.168.1.7", true),
            ("192.168.1.7", "192.168.1.8", false),
            ("192.168.1.0/31", "192.168.1.1", true),
            ("192.168.1.0/31", "192.168.1.2", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("127.0.0.1/32", "::ffff:127.0.0.1", true),
            ("2001:db8::/32", "2001:db8:1::5", true),
            ("2001:db8::/32", "2001:db9::5", false),
            ("::/0", "10.0.0.1", false),
            ("10.0.0.0/8", "::1", false),
        ];
        for (net, addr, want) in cases {
            let ip: IpAddr = addr.parse().unwrap();
            let got = Cidr::parse(net).unwrap().contains(ip.to_canonical());
            assert_eq!(got, want, "{net} contains {addr}");
        }
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "::/129", "10.0.0.0/-1", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn globs_by_table() {
        let cases = [
            ("plant-*", "plant-7", true),
            ("plant-*", "plant-", true),
            ("plant-*", "plan-7", false),
            ("*", "anything", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("*-alarm", "plant-alarm", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("a*a", "a", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(glob_matches(pattern, text), want, "{pattern} ~ {text}");
        }
    }

    fn rules(toml: &str) -> Rules {
        let config = Config::from_toml(toml).unwrap();
        config.rules
    }

    const RULES: &str = r#"
        [auth.groups]
        ops = ["alice", "bob"]

        [[rule]]
        from = ["192.0.2.0/24"]
        allow = false

        [[rule]]
        users = ["group:ops"]
        routes = ["*.corp"]
        allow = true

        [[rule]]
        users = ["carol"]
        routes = ["wiki.corp"]
        ports = [443]
        allow = true

        [[rule]]
        users = ["*"]
        topics = ["plant-*"]
        allow = true

        [[rule]]
        routes = ["public.corp"]
        allow = true

        [[rule]]
        users = ["mallory"]
        allow = false
    "#;

    #[test]
    fn route_decisions_by_table() {
        let r = rules(RULES);
        let inside: IpAddr = "10.0.0.5".parse().unwrap();
        let outside: IpAddr = "192.0.2.9".parse().unwrap();
        let allow = Decision::Allow;
        let deny = |i| Decision::Deny(Denial::Rule(i));
        let none = Decision::Deny(Denial::NoRule);
        let cases = [
            (Some("alice"), inside, "wiki.corp", 80, allow),
            (Some("bob"), inside, "db.corp", 5432, allow),
            (Some("alice"), outside, "wiki.corp", 80, deny(0)),
            (None, outside, "public.corp", 80, deny(0)),
            (Some("alice"), inside, "example.com", 80, none),
            (Some("carol"), inside, "wiki.corp", 443, allow),
            (Some("carol"), inside, "wiki.corp", 80, none),
            (Some("carol"), inside, "db.corp", 443, none),
            (None, inside, "public.corp", 80, allow),
            (Some("dave"), inside, "public.corp", 8080, allow),
            (None, inside, "wiki.corp", 80, none),
            (Some("alice"), inside, "corp", 80, none),
            (Some("mallory"), inside, "x.test", 80, deny(5)),
        ];
        for (user, addr, host, port, want) in cases {
            assert_eq!(
                r.allows_route(user, addr, host, port),
                want,
                "{user:?} from {addr} to {host}:{port}"
            );
        }
    }

    #[test]
    fn topic_decisions_by_table() {
        let r = rules(RULES);
        let inside: IpAddr = "10.0.0.5".parse().unwrap();
        let outside: IpAddr = "192.0.2.9".parse().unwrap();
        let cases = [
            (Some("alice"), inside, "plant-7", Decision::Allow),
            (Some("anyone"), inside, "plant-7", Decision::Allow),
            (None, inside, "plant-7", Decision::Deny(Denial::NoRule)),
            (
                Some("alice"),
                inside,
                "office",
                Decision::Deny(Denial::NoRule),
            ),
            (
                Some("alice"),
                outside,
                "plant-7",
                Decision::Deny(Denial::Rule(0)),
            ),
            (
                Some("mallory"),
                inside,
                "other",
                Decision::Deny(Denial::Rule(5)),
            ),
        ];
        for (user, addr, topic, want) in cases {
            assert_eq!(r.allows_topic(user, addr, topic), want, "{user:?} {topic}");
        }
    }

    #[test]
    fn no_rules_allow_everything() {
        let r = Rules::default();
        let any: IpAddr = "203.0.113.1".parse().unwrap();
        assert_eq!(r.allows_route(None, any, "x", 1), Decision::Allow);
        assert_eq!(r.allows_topic(None, any, "t"), Decision::Allow);
    }

    #[test]
    fn bad_rules_name_their_keys() {
        let text = r#"
            [[rule]]
            users = ["group:nope"]
            from = ["10.0.0.0/40"]
            routes = ["a b"]
            ports = [0]
            allow = true
            [[rule]]
            topics = []
            allow = false
            [events]
            publishers = ["group:nope", ""]
        "#;
        let keys: Vec<String> = Config::from_toml(text)
            .unwrap_err()
            .problems
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "rule[0].users",
                "rule[0].from",
                "rule[0].routes",
                "rule[0].ports",
                "rule[1].topics",
                "events.publishers",
                "events.publishers"
            ]
        );
    }

    #[test]
    fn publishers_are_users_and_groups_who_authenticated() {
        let r = rules(
            r#"
            [auth.groups]
            sensors = ["s1", "s2"]
            [events]
            publishers = ["group:sensors", "bot"]
            "#,
        );
        assert!(r.publishing());
        for (user, may) in [
            (Some("s1"), true),
            (Some("s2"), true),
            (Some("bot"), true),
            (Some("alice"), false),
            (None, false),
        ] {
            assert_eq!(r.may_publish(user), may, "{user:?}");
        }
        let anyone = rules("[events]\npublishers = [\"*\"]\n");
        assert!(anyone.may_publish(Some("alice")));
        assert!(!anyone.may_publish(None), "only an authenticated user");
        let off = rules("");
        assert!(!off.publishing() && !off.may_publish(Some("bot")));
    }

    #[test]
    fn denial_texts_reveal_nothing_else() {
        assert_eq!(Denial::Rule(2).to_string(), "access refused by rule[2]");
        assert_eq!(
            Denial::NoRule.to_string(),
            "access refused: no rule allows it"
        );
        assert_eq!(
            Denial::NoUdp.to_string(),
            "UDP refused: the route does not allow it (udp = true)"
        );
    }
}
