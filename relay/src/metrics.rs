//! Prometheus metrics (prometheus-client), served as text on the admin
//! listener at `GET /metrics`. Label values are bounded: routes come from
//! the configuration (`-` for requests that matched none), methods and
//! statuses are folded into small classes.

use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::access_log::Access;

/// A label value shared without copying (route names, topics).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Name(pub Arc<str>);

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name(Arc::from(s))
    }
}

impl EncodeLabelValue for Name {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Name,
    pub method: &'static str,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub route: Name,
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: Name,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 0.5 ms .. ~33 min
    Histogram::new(exponential_buckets(0.0005, 4.0, 12))
}

/// Every metric the relay exports.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Histograms<RouteLabels>,
    pub tunnel_duration: Histograms<RouteLabels>,
    pub bytes_in: Family<RouteLabels, Counter>,
    pub bytes_out: Family<RouteLabels, Counter>,
    pub open_connections: Gauge,
    pub accepted: Counter,
    /// Connections answered `503` by `max_connections` or
    /// `max_connections_per_client` (the `limit` label).
    pub turned_away: Family<LimitLabels, Counter>,
    pub open_tunnels: Family<RouteLabels, Gauge>,
    pub open_long_polls: Gauge,
    pub upstream_failures: Family<FailureLabels, Counter>,
    pub events_published: Family<TopicLabels, Counter>,
    pub events_delivered: Family<TopicLabels, Counter>,
    pub uplinks_connected: Gauge,
    pub reloads: Family<ResultLabels, Counter>,
    /// Copied from [`crate::logging::dropped_lines`] when scraped.
    log_dropped: Counter,
    /// Copied from [`crate::access_log::lines_lost`] when scraped.
    access_lost: Counter,
    /// Per-route handles into the families above, so counting a request is a
    /// few atomic adds rather than four labelled look-ups.
    by_route: std::sync::RwLock<foldhash::HashMap<Arc<str>, Arc<RouteHandles>>>,
}

/// One route's series, taken from the families once.
struct RouteHandles {
    name: Name,
    /// `[method class][status class]`, created on first use so the
    /// exposition lists only series that happened.
    requests: [[std::sync::OnceLock<Counter>; 5]; 9],
    request_duration: Histogram,
    tunnel_duration: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("porthole");
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            tunnel_duration: Family::new_with_constructor(duration_histogram),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            open_connections: Gauge::default(),
            accepted: Counter::default(),
            turned_away: Family::default(),
            open_tunnels: Family::default(),
            open_long_polls: Gauge::default(),
            upstream_failures: Family::default(),
            events_published: Family::default(),
            events_delivered: Family::default(),
            uplinks_connected: Gauge::default(),
            reloads: Family::default(),
            log_dropped: Counter::default(),
            access_lost: Counter::default(),
            by_route: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests and tunnels by route, method class and status class",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "HTTP request duration by route, until the response body ends",
            m.request_duration.clone(),
        );
        registry.register(
            "tunnel_duration_seconds",
            "CONNECT and upgraded tunnel duration by route",
            m.tunnel_duration.clone(),
        );
        registry.register(
            "bytes_in",
            "Bytes received from clients by route",
            m.bytes_in.clone(),
        );
        registry.register(
            "bytes_out",
            "Bytes sent to clients by route",
            m.bytes_out.clone(),
        );
        registry.register(
            "open_connections",
            "Open client connections on the aggregate port",
            m.open_connections.clone(),
        );
        registry.register(
            "connections_accepted",
            "Client connections accepted on the aggregate port",
            m.accepted.clone(),
        );
        registry.register(
            "connections_turned_away",
            "Client connections answered 503 by a connection limit",
            m.turned_away.clone(),
        );
        registry.register(
            "open_tunnels",
            "Open CONNECT and upgraded tunnels by route",
            m.open_tunnels.clone(),
        );
        registry.register(
            "open_long_polls",
            "Event polls waiting for an event",
            m.open_long_polls.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Failed dials to internal servers by route and cause",
            m.upstream_failures.clone(),
        );
        registry.register(
            "events_published",
            "Events published by topic",
            m.events_published.clone(),
        );
        registry.register(
            "events_delivered",
            "Events delivered to pollers by topic",
            m.events_delivered.clone(),
        );
        registry.register(
            "uplinks_connected",
            "Uplinked relays currently connected",
            m.uplinks_connected.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because standard error was not read fast enough",
            m.log_dropped.clone(),
        );
        registry.register(
            "access_lines_lost",
            "Access lines the access-log file could not take (a write failed)",
            m.access_lost.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.log_dropped.inner().store(
            crate::logging::dropped_lines(),
            std::sync::atomic::Ordering::Relaxed,
        );
        self.access_lost.inner().store(
            crate::access_log::lines_lost(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
            let _ = writeln!(out, "# metrics encoding failed");
        }
        out
    }

    /// Counts a finished request or tunnel.
    pub fn record(&self, route: &str, a: &Access, seconds: f64) {
        let h = self.handles(route);
        let m = METHODS
            .iter()
            .position(|m| *m == method_class(&a.method))
            .unwrap_or(8);
        let s = STATUS_CLASSES
            .iter()
            .position(|c| *c == status_class(a.status))
            .unwrap_or(4);
        let counter = h.requests[m][s].get_or_init(|| {
            self.requests.get_or_create_owned(&RequestLabels {
                route: h.name.clone(),
                method: METHODS[m],
                status: STATUS_CLASSES[s],
            })
        });
        counter.inc();
        let durations = if a.tunnel {
            &h.tunnel_duration
        } else {
            &h.request_duration
        };
        durations.observe(seconds);
        h.bytes_in.inc_by(a.bytes_in);
        h.bytes_out.inc_by(a.bytes_out);
    }

    fn handles(&self, route: &str) -> Arc<RouteHandles> {
        if let Some(h) = self
            .by_route
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(route)
        {
            return h.clone();
        }
        let name = Name::from(route);
        let labels = RouteLabels {
            route: name.clone(),
        };
        let h = Arc::new(RouteHandles {
            name: name.clone(),
            requests: Default::default(),
            request_duration: self.request_duration.get_or_create_owned(&labels),
            tunnel_duration: self.tunnel_duration.get_or_create_owned(&labels),
            bytes_in: self.bytes_in.get_or_create_owned(&labels),
            bytes_out: self.bytes_out.get_or_create_owned(&labels),
        });
        let mut map = self.by_route.write().unwrap_or_else(|p| p.into_inner());
        // Bounded by the routes configured over the relay's life (plus "-").
        map.entry(name.0).or_insert(h).clone()
    }

    /// Requests seen for a route in a status class (for the status page).
    pub fn requests_for(&self, route: &Name, status: &'static str) -> u64 {
        METHODS
            .iter()
            .filter_map(|m| {
                self.requests
                    .get(&RequestLabels {
                        route: route.clone(),
                        method: m,
                        status,
                    })
                    .map(|c| c.get())
            })
            .sum()
    }

    pub fn bytes_for(&self, route: &Name) -> (u64, u64) {
        let labels = RouteLabels {
            route: route.clone(),
        };
        let get = |f: &Family<RouteLabels, Counter>| f.get(&labels).map_or(0, |c| c.get());
        (get(&self.bytes_in), get(&self.bytes_out))
    }

    pub fn open_tunnels_for(&self, route: &Name) -> i64 {
        self.open_tunnels
            .get(&RouteLabels {
                route: route.clone(),
            })
            .map_or(0, |g| g.get())
    }
}

/// Method labels: the standard methods, then `other`.
const METHODS: [&str; 9] = {
    let m = crate::codec::METHODS;
    [m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], "other"]
};
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Folds a method into a bounded set of label values.
pub fn method_class(method: &str) -> &'static str {
    METHODS[..8]
        .iter()
        .find(|m| m.eq_ignore_ascii_case(method))
        .copied()
        .unwrap_or("other")
}

/// `200` -> `"2xx"`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Holds a gauge up while alive.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(gauge: Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(method_class("get"), "GET");
        assert_eq!(method_class("PROPFIND"), "other");
        assert_eq!(status_class(101), "1xx");
        assert_eq!(status_class(404), "4xx");
        assert_eq!(status_class(508), "5xx");
    }

    #[test]
    fn exposition_carries_recorded_values() {
        let m = Metrics::new();
        let route = Name::from("wiki.corp");
        let mut get = Access::new("GET".into(), "/", 10, false);
        get.status = 200;
        get.bytes_out = 20;
        m.record(&route.0, &get, 0.01);
        let mut connect = Access::new("CONNECT".into(), "a:1", 5, false);
        connect.status = 200;
        connect.bytes_out = 6;
        connect.tunnel = true;
        m.record(&route.0, &connect, 1.0);
        let text = m.encode();
        assert!(
            text.contains(
                r#"porthole_requests_total{route="wiki.corp",method="GET",status="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"porthole_bytes_in_total{route="wiki.corp"} 15"#),
            "{text}"
        );
        assert!(
            text.contains("porthole_tunnel_duration_seconds_count{route=\"wiki.corp\"} 1"),
            "{text}"
        );
        assert_eq!(m.requests_for(&route, "2xx"), 2);
        assert_eq!(m.bytes_for(&route), (15, 26));
    }
}
