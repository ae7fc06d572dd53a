//! The proxy's metrics registry and its Prometheus text rendering.
//!
//! Names and labels follow Linkerd's legacy families (reference/linkerd.md §1.1) so viz-style
//! queries work unchanged: `request_total`, `response_total`, `response_latency_ms` (Linkerd's
//! millisecond buckets, from [`conduit_core::metrics::LatencyHistogram`]) and the `tcp_*`
//! families, plus `process_*`.
//!
//! Label sets are bounded: at most `max_authorities` distinct `authority` values are tracked;
//! requests for further authorities are counted under `authority="overflow"`. Series not
//! updated for `retain_idle` (10 minutes by default, like Linkerd) are dropped at the next
//! scrape, which also frees their authority slot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use conduit_core::classify::Outcome;
use conduit_core::metrics::{Counter, LatencyHistogram};
use conduit_core::time::Instant;

use crate::clock::Clock;
use crate::config::MetricsSettings;

/// The `authority` label for authorities beyond the tracked bound.
pub const OVERFLOW_AUTHORITY: &str = "overflow";

/// Traffic direction, the `direction` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// From other proxies to the local app.
    Inbound,
    /// From the local app to other services.
    Outbound,
}

impl Direction {
    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Whether a TCP connection was accepted (`peer="src"`) or opened upstream (`peer="dst"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// An accepted connection.
    Src,
    /// An upstream connection.
    Dst,
}

/// Counters for one (direction, peer) class of TCP connections, updated lock-free by IO.
#[derive(Debug, Default)]
pub struct TcpMetrics {
    open_total: AtomicU64,
    close_total: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
}

impl TcpMetrics {
    pub(crate) fn opened(&self) {
        self.open_total.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn closed(&self) {
        self.close_total.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn read(&self, n: usize) {
        self.read_bytes
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
    pub(crate) fn wrote(&self, n: usize) {
        self.write_bytes
            .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// A resolved authority label, cheap to clone into per-request state.
pub type AuthorityLabel = Arc<str>;

#[derive(Debug)]
struct Series<T> {
    value: T,
    updated: Instant,
}

#[derive(Debug, Default)]
struct Registry {
    /// Tracked authorities and when each was last used.
    authorities: BTreeMap<AuthorityLabel, Instant>,
    requests: BTreeMap<(Direction, AuthorityLabel), Series<Counter>>,
    responses: BTreeMap<(Direction, AuthorityLabel, u16, Outcome), Series<Counter>>,
    latency: BTreeMap<(Direction, AuthorityLabel, u16), Series<LatencyHistogram>>,
}

/// The proxy's metrics; one per proxy, shared by every connection.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    clock: Clock,
    settings: MetricsSettings,
    overflow: AuthorityLabel,
    /// Indexed by `tcp_index`.
    tcp: [Arc<TcpMetrics>; 4],
    /// Open connections per `tcp_index`, as a gauge.
    open: [Arc<AtomicU64>; 4],
}

const fn tcp_index(direction: Direction, peer: Peer) -> usize {
    (match direction {
        Direction::Inbound => 0,
        Direction::Outbound => 2,
    }) + match peer {
        Peer::Src => 0,
        Peer::Dst => 1,
    }
}

/// Settles one open connection on drop (the `tcp_open_connections` gauge and `tcp_close_total`).
#[derive(Debug)]
pub struct ConnectionGuard {
    tcp: Arc<TcpMetrics>,
    open: Arc<AtomicU64>,
}

impl ConnectionGuard {
    /// The counters the connection's IO should add to.
    #[must_use]
    pub fn tcp(&self) -> &Arc<TcpMetrics> {
        &self.tcp
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.tcp.closed();
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// An empty registry.
    #[must_use]
    pub fn new(clock: Clock, settings: MetricsSettings) -> Self {
        Self {
            registry: Mutex::default(),
            clock,
            settings,
            overflow: Arc::from(OVERFLOW_AUTHORITY),
            tcp: Default::default(),
            open: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding this lock leaves counters consistent (every update is a
        // single assignment), so a poisoned lock is still safe to use.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a new TCP connection; the guard settles it when dropped.
    #[must_use]
    pub fn connection(&self, direction: Direction, peer: Peer) -> ConnectionGuard {
        let i = tcp_index(direction, peer);
        self.tcp[i].opened();
        self.open[i].fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            tcp: Arc::clone(&self.tcp[i]),
            open: Arc::clone(&self.open[i]),
        }
    }

    /// Counts a request and resolves its authority label (bounded; see the module doc).
    pub fn request(&self, direction: Direction, authority: &str) -> AuthorityLabel {
        let now = self.clock.now();
        let mut registry = self.lock();
        let label = match registry.authorities.get_key_value(authority) {
            Some((label, _)) => Arc::clone(label),
            None if registry.authorities.len() < self.settings.max_authorities => {
                Arc::from(authority)
            }
            None => Arc::clone(&self.overflow),
        };
        if !Arc::ptr_eq(&label, &self.overflow) {
            registry.authorities.insert(Arc::clone(&label), now);
        }
        let series = registry
            .requests
            .entry((direction, Arc::clone(&label)))
            .or_insert_with(|| Series {
                value: Counter::new(),
                updated: now,
            });
        series.value.incr();
        series.updated = now;
        label
    }

    /// Records the time to response headers.
    pub fn response_headers(
        &self,
        direction: Direction,
        authority: &AuthorityLabel,
        status: u16,
        latency: Duration,
    ) {
        let now = self.clock.now();
        let mut registry = self.lock();
        let series = registry
            .latency
            .entry((direction, Arc::clone(authority), status))
            .or_insert_with(|| Series {
                value: LatencyHistogram::new(),
                updated: now,
            });
        series.value.record(latency);
        series.updated = now;
    }

    /// Counts a finished response under its `classification` (the core classifier's
    /// [`Outcome`], whose label values are Linkerd's `success` and `failure`).
    pub fn response_end(
        &self,
        direction: Direction,
        authority: &AuthorityLabel,
        status: u16,
        class: Outcome,
    ) {
        let now = self.clock.now();
        let mut registry = self.lock();
        let series = registry
            .responses
            .entry((direction, Arc::clone(authority), status, class))
            .or_insert_with(|| Series {
                value: Counter::new(),
                updated: now,
            });
        series.value.incr();
        series.updated = now;
    }

    /// Drops series idle longer than `retain_idle`, and authorities no series uses.
    fn retire(&self, registry: &mut Registry, now: Instant) {
        let keep =
            |updated: Instant| now.saturating_duration_since(updated) < self.settings.retain_idle;
        registry.requests.retain(|_, s| keep(s.updated));
        registry.responses.retain(|_, s| keep(s.updated));
        registry.latency.retain(|_, s| keep(s.updated));
        registry.authorities.retain(|_, used| keep(*used));
    }

    /// Renders every family in the Prometheus text exposition format (version 0.0.4).
    #[must_use]
    pub fn render(&self, process: &str) -> String {
        let now = self.clock.now();
        let mut out = String::with_capacity(4096);
        {
            let mut registry = self.lock();
            self.retire(&mut registry, now);
            render_registry(&registry, &mut out);
        }
        self.render_tcp(&mut out);
        out.push_str(process);
        out
    }

    fn render_tcp(&self, out: &mut String) {
        let classes = [
            (Direction::Inbound, Peer::Src),
            (Direction::Inbound, Peer::Dst),
            (Direction::Outbound, Peer::Src),
            (Direction::Outbound, Peer::Dst),
        ];
        let families: [(&str, &str, &str); 5] = [
            ("tcp_open_total", "counter", "Total TCP connections opened."),
            (
                "tcp_close_total",
                "counter",
                "Total TCP connections closed.",
            ),
            (
                "tcp_open_connections",
                "gauge",
                "TCP connections currently open.",
            ),
            (
                "tcp_read_bytes_total",
                "counter",
                "Bytes read from TCP connections.",
            ),
            (
                "tcp_write_bytes_total",
                "counter",
                "Bytes written to TCP connections.",
            ),
        ];
        for (family, (name, kind, help)) in families.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (direction, peer) in classes {
                let i = tcp_index(direction, peer);
                let tcp = &self.tcp[i];
                let value = match family {
                    0 => tcp.open_total.load(Ordering::Relaxed),
                    1 => tcp.close_total.load(Ordering::Relaxed),
                    2 => self.open[i].load(Ordering::Relaxed),
                    3 => tcp.read_bytes.load(Ordering::Relaxed),
                    _ => tcp.write_bytes.load(Ordering::Relaxed),
                };
                let peer = match peer {
                    Peer::Src => "src",
                    Peer::Dst => "dst",
                };
                let _ = writeln!(
                    out,
                    "{name}{{direction=\"{}\",peer=\"{peer}\"}} {value}",
                    direction.as_str()
                );
            }
        }
    }
}

fn render_registry(registry: &Registry, out: &mut String) {
    let _ = writeln!(out, "# HELP request_total Total count of HTTP requests.");
    let _ = writeln!(out, "# TYPE request_total counter");
    for ((direction, authority), series) in &registry.requests {
        let _ = writeln!(
            out,
            "request_total{{direction=\"{}\",authority=\"{}\"}} {}",
            direction.as_str(),
            escape(authority),
            series.value.value()
        );
    }
    let _ = writeln!(out, "# HELP response_total Total count of HTTP responses.");
    let _ = writeln!(out, "# TYPE response_total counter");
    for ((direction, authority, status, class), series) in &registry.responses {
        let _ = writeln!(
            out,
            "response_total{{direction=\"{}\",authority=\"{}\",status_code=\"{status}\",classification=\"{}\"}} {}",
            direction.as_str(),
            escape(authority),
            class.as_str(),
            series.value.value()
        );
    }
    let _ = writeln!(
        out,
        "# HELP response_latency_ms Elapsed times between a request's headers being received and its response's headers being received."
    );
    let _ = writeln!(out, "# TYPE response_latency_ms histogram");
    for ((direction, authority, status), series) in &registry.latency {
        let labels = format!(
            "direction=\"{}\",authority=\"{}\",status_code=\"{status}\"",
            direction.as_str(),
            escape(authority)
        );
        for bucket in series.value.cumulative_buckets() {
            let le = bucket
                .le_ms
                .map_or_else(|| "+Inf".to_owned(), |ms| ms.to_string());
            let _ = writeln!(
                out,
                "response_latency_ms_bucket{{{labels},le=\"{le}\"}} {}",
                bucket.count
            );
        }
        let sum_micros = series.value.sum_micros();
        let _ = writeln!(
            out,
            "response_latency_ms_sum{{{labels}}} {}.{:03}",
            sum_micros / 1000,
            sum_micros % 1000
        );
        let _ = writeln!(
            out,
            "response_latency_ms_count{{{labels}}} {}",
            series.value.count()
        );
    }
}

/// Escapes a label value (backslash, quote, newline) per the exposition format.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn authorities_are_bounded_and_idle_series_retire() {
        let clock = Clock::new();
        let metrics = Metrics::new(
            clock,
            MetricsSettings {
                retain_idle: Duration::from_secs(60),
                max_authorities: 2,
            },
        );
        let a = metrics.request(Direction::Outbound, "a.svc:80");
        metrics.request(Direction::Outbound, "b.svc:80");
        let c = metrics.request(Direction::Outbound, "c.svc:80");
        assert_eq!(&*c, OVERFLOW_AUTHORITY);
        metrics.response_headers(Direction::Outbound, &a, 200, Duration::from_millis(3));
        metrics.response_end(Direction::Outbound, &a, 200, Outcome::Success);
        let text = metrics.render("");
        assert!(
            text.contains("request_total{direction=\"outbound\",authority=\"overflow\"} 1"),
            "{text}"
        );
        assert!(text.contains("response_latency_ms_bucket{direction=\"outbound\",authority=\"a.svc:80\",status_code=\"200\",le=\"3\"} 1"), "{text}");
        tokio::time::sleep(Duration::from_secs(61)).await;
        let text = metrics.render("");
        assert!(!text.contains("a.svc"), "{text}");
        let d = metrics.request(Direction::Outbound, "d.svc:80");
        assert_eq!(&*d, "d.svc:80", "retired authorities free their slots");
    }
}
