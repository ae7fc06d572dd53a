//! Top-line figures from proxies' `/metrics`: success rate, requests per second and latency
//! percentiles, the way Linkerd's `viz stat` computes them (reference/linkerd.md §1.1).
//!
//! A scrape is reduced ([`reduce`]) to cumulative [`Counts`] per authority, from the proxy's
//! top-line families (`response_total`, `response_latency_ms`), or per authority and route,
//! from their per-route twins (`route_response_total`, `route_response_latency_ms`, labelled
//! with the route of the service's profile or `default`): one reduction, two [`Family`]s.
//! Figures come from the difference between two scrapes of the same proxy, so they describe
//! the interval between them: success rate = successes / responses, requests per second =
//! responses / interval, percentiles = `histogram_quantile` over the interval's latency
//! buckets. The controller's `StatSummary` and `RouteSummary` and the CLI's demo table use
//! this module.
//!
//! [`MetricsSource`] is the seam through which the controller reads a proxy's metrics:
//! [`HttpMetricsSource`] over tokio in production, another transport in the simulation.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use conduit_core::metrics::{LATENCY_BUCKET_BOUNDS_MS, LATENCY_BUCKETS, LatencyHistogram};
use conduit_proto::prom::Sample;
use serde::Serialize;

/// Cumulative counts for one authority, as of one scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Responses (every status, every class).
    pub responses: u64,
    /// Responses classified as successes.
    pub successes: u64,
    /// Per-bucket latency counts (not cumulative), in the proxy's millisecond buckets.
    pub buckets: [u64; LATENCY_BUCKETS],
}

impl Counts {
    /// What happened between `earlier` and `self` (counter resets count as starting from 0).
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        if self.responses < earlier.responses {
            // The proxy restarted: its counters began again from zero.
            return self.clone();
        }
        let mut buckets = [0; LATENCY_BUCKETS];
        for (i, bucket) in buckets.iter_mut().enumerate() {
            *bucket = self.buckets[i].saturating_sub(earlier.buckets[i]);
        }
        Self {
            responses: self.responses - earlier.responses,
            successes: self.successes.saturating_sub(earlier.successes),
            buckets,
        }
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Self) {
        // Saturating: a proxy's counters are a peer's word, and a hostile one can say 2^64.
        self.responses = self.responses.saturating_add(other.responses);
        self.successes = self.successes.saturating_add(other.successes);
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine = mine.saturating_add(theirs);
        }
    }
}

/// The metric families a scrape is reduced from: the proxy's top-line families, or their
/// per-route twins (Linkerd's names in both cases).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `response_total` and `response_latency_ms`, labelled by `direction` and `authority`.
    Authority,
    /// `route_response_total` and `route_response_latency_ms`, labelled by `direction`,
    /// `authority` and `route` (a route of the service's profile, or `default`).
    Route,
    /// `route_actual_response_total`: every attempt's response on a route that retries,
    /// labelled like [`Family::Route`] (no latency).
    RouteAttempts,
}

impl Family {
    /// The response counter's name.
    #[must_use]
    pub const fn responses(self) -> &'static str {
        match self {
            Self::Authority => "response_total",
            Self::Route => "route_response_total",
            Self::RouteAttempts => "route_actual_response_total",
        }
    }

    /// The latency histogram's bucket series' name.
    #[must_use]
    pub const fn latency_buckets(self) -> &'static str {
        match self {
            Self::Authority => "response_latency_ms_bucket",
            Self::Route => "route_response_latency_ms_bucket",
            // No latency is kept per attempt: a name no sample has.
            Self::RouteAttempts => "",
        }
    }
}

/// What one group of a reduced scrape is: an authority, and for [`Family::Route`] a route.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Group {
    /// The `authority` label.
    pub authority: String,
    /// The `route` label; `None` for [`Family::Authority`].
    pub route: Option<String>,
}

/// Reduces one scrape to cumulative counts per group for one traffic direction (`inbound` or
/// `outbound`), reading `family`'s samples and summing over every other label (status code,
/// classification, ...). [`Family::Authority`] groups by `authority`, [`Family::Route`] by
/// `authority` and `route`; samples without those labels are skipped.
#[must_use]
pub fn reduce(samples: &[Sample], direction: &str, family: Family) -> BTreeMap<Group, Counts> {
    let mut groups: BTreeMap<Group, Counts> = BTreeMap::new();
    // Cumulative buckets per group and bound, summed over other labels first.
    let mut cumulative: BTreeMap<Group, [u64; LATENCY_BUCKETS]> = BTreeMap::new();
    for sample in samples {
        let is_responses = sample.name == family.responses();
        if !is_responses && sample.name != family.latency_buckets() {
            continue;
        }
        if sample.label("direction") != Some(direction) {
            continue;
        }
        let Some(authority) = sample.label("authority") else {
            continue;
        };
        let route = match family {
            Family::Authority => None,
            Family::Route | Family::RouteAttempts => match sample.label("route") {
                Some(route) => Some(route.to_owned()),
                None => continue,
            },
        };
        let group = Group {
            authority: authority.to_owned(),
            route,
        };
        let value = counter_value(sample.value);
        if is_responses {
            let counts = groups.entry(group).or_default();
            counts.responses = counts.responses.saturating_add(value);
            if sample.label("classification") == Some("success") {
                counts.successes = counts.successes.saturating_add(value);
            }
        } else if let Some(index) = sample.label("le").and_then(bucket_index) {
            let bucket = &mut cumulative.entry(group).or_insert([0; LATENCY_BUCKETS])[index];
            *bucket = bucket.saturating_add(value);
        }
    }
    for (group, cumulative) in cumulative {
        let counts = groups.entry(group).or_default();
        let mut below = 0;
        for (i, bucket) in counts.buckets.iter_mut().enumerate() {
            *bucket = cumulative[i].saturating_sub(below);
            below = below.max(cumulative[i]);
        }
    }
    groups
}

/// Reduces one scrape's top-line families to counts per authority for one direction.
#[must_use]
pub fn counts_by_authority(samples: &[Sample], direction: &str) -> BTreeMap<String, Counts> {
    reduce(samples, direction, Family::Authority)
        .into_iter()
        .map(|(group, counts)| (group.authority, counts))
        .collect()
}

/// Reduces one scrape's per-route families to counts per route for one direction, all
/// authorities merged (a replica's proxy applies its own service's profile to everything it
/// receives, whatever authority the caller wrote).
#[must_use]
pub fn counts_by_route(samples: &[Sample], direction: &str) -> BTreeMap<String, Counts> {
    let mut by_route: BTreeMap<String, Counts> = BTreeMap::new();
    for (group, counts) in reduce(samples, direction, Family::Route) {
        if let Some(route) = group.route {
            by_route.entry(route).or_default().add(&counts);
        }
    }
    by_route
}

/// One route of one authority as a caller's proxy saw it (outbound): the responses its callers
/// got (effective, after retries) and every attempt's (actual; the same as effective on a
/// route that does not retry).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientCounts {
    /// The responses callers got.
    pub effective: Counts,
    /// Every attempt's response.
    pub actual: Counts,
}

impl ClientCounts {
    /// What happened between `earlier` and `self`.
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            effective: self.effective.since(&earlier.effective),
            actual: self.actual.since(&earlier.actual),
        }
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Self) {
        self.effective.add(&other.effective);
        self.actual.add(&other.actual);
    }
}

/// Reduces one scrape's outbound per-route families to [`ClientCounts`] per authority and
/// route.
#[must_use]
pub fn client_counts_by_route(samples: &[Sample]) -> BTreeMap<Group, ClientCounts> {
    let attempts = reduce(samples, "outbound", Family::RouteAttempts);
    reduce(samples, "outbound", Family::Route)
        .into_iter()
        .map(|(group, effective)| {
            let actual = attempts
                .get(&group)
                .cloned()
                .unwrap_or_else(|| effective.clone());
            (group, ClientCounts { effective, actual })
        })
        .collect()
}

/// All authorities of one scrape merged (a replica's whole inbound traffic).
#[must_use]
pub fn total(counts: &BTreeMap<String, Counts>) -> Counts {
    let mut all = Counts::default();
    for c in counts.values() {
        all.add(c);
    }
    all
}

fn bucket_index(le: &str) -> Option<usize> {
    if le == "+Inf" {
        return Some(LATENCY_BUCKETS - 1);
    }
    let bound: f64 = le.parse().ok()?;
    LATENCY_BUCKET_BOUNDS_MS.iter().position(|&b| {
        #[expect(clippy::cast_precision_loss, reason = "bounds are at most 50,000")]
        let b = b as f64;
        (b - bound).abs() < 1e-9
    })
}

fn counter_value(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        // Counters are integers published as floats; rounding recovers them exactly.
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "checked finite and positive"
        )]
        let v = value.round() as u64;
        v
    } else {
        0
    }
}

/// Top-line figures for one row of the table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figures {
    /// Responses in the interval.
    pub requests: u64,
    /// Successes / responses, or `None` without responses.
    pub success_rate: Option<f64>,
    /// Responses per second.
    pub rps: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: Option<f64>,
    /// 95th percentile in milliseconds.
    pub p95_ms: Option<f64>,
    /// 99th percentile in milliseconds.
    pub p99_ms: Option<f64>,
}

impl Figures {
    /// The figures for `counts` observed over `interval`.
    #[must_use]
    pub fn from_counts(counts: &Counts, interval: Duration) -> Self {
        let histogram = LatencyHistogram::from_bucket_counts(counts.buckets);
        #[expect(clippy::cast_precision_loss, reason = "rates for display")]
        let (requests, successes) = (counts.responses as f64, counts.successes as f64);
        let seconds = interval.as_secs_f64();
        Self {
            requests: counts.responses,
            success_rate: (counts.responses > 0).then(|| successes / requests),
            rps: if seconds > 0.0 {
                requests / seconds
            } else {
                0.0
            },
            p50_ms: histogram.quantile_ms(0.50),
            p95_ms: histogram.quantile_ms(0.95),
            p99_ms: histogram.quantile_ms(0.99),
        }
    }
}

/// Reads a proxy's metrics exposition from its admin server.
pub trait MetricsSource: Send + Sync + 'static {
    /// The text of `GET /metrics` on the admin server at `admin`.
    fn scrape(
        &self,
        admin: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<String, ScrapeError>> + Send + '_>>;
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScrapeError {
    /// The connection or request failed.
    #[error("scraping {admin}: {reason}")]
    Failed {
        /// The admin server.
        admin: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// No answer within [`SCRAPE_TIMEOUT`].
    #[error("scraping {0}: no answer within {SCRAPE_TIMEOUT:?}")]
    Timeout(SocketAddr),
}

/// How long one scrape may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest exposition read from one proxy.
pub const MAX_SCRAPE_BYTES: usize = 8 * 1024 * 1024;

/// Scrapes over HTTP/1.1 on the kernel's network (the production [`MetricsSource`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpMetricsSource;

impl MetricsSource for HttpMetricsSource {
    fn scrape(
        &self,
        admin: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = Result<String, ScrapeError>> + Send + '_>> {
        Box::pin(async move {
            let fetch = async {
                let failed = |reason: String| ScrapeError::Failed { admin, reason };
                let stream = tokio::net::TcpStream::connect(admin)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .map_err(|e| failed(e.to_string()))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                let request = http::Request::builder()
                    .uri("/metrics")
                    .header(http::header::HOST, admin.to_string())
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .map_err(|e| failed(e.to_string()))?;
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                if !response.status().is_success() {
                    return Err(failed(format!("status {}", response.status())));
                }
                let body = http_body_util::Limited::new(response.into_body(), MAX_SCRAPE_BYTES);
                let bytes = http_body_util::BodyExt::collect(body)
                    .await
                    .map_err(|e| failed(e.to_string()))?
                    .to_bytes();
                String::from_utf8(bytes.to_vec())
                    .map_err(|_| failed("metrics are not UTF-8".into()))
            };
            tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
                .await
                .unwrap_or(Err(ScrapeError::Timeout(admin)))
        })
    }
}

/// Scrapes the proxy at `admin` and reduces its samples with `reduce`, or `None` when it
/// cannot be scraped or parsed.
pub async fn scrape_reduced<T>(
    source: &dyn MetricsSource,
    admin: SocketAddr,
    reduce: impl FnOnce(&[Sample]) -> T,
) -> Option<T> {
    match source.scrape(admin).await {
        Ok(text) => match conduit_proto::prom::parse(&text) {
            Ok(samples) => Some(reduce(&samples)),
            Err(error) => {
                tracing::debug!(%admin, %error, "unreadable metrics");
                None
            }
        },
        Err(error) => {
            tracing::debug!(%error, "scrape failed");
            None
        }
    }
}

/// The inbound traffic of the proxy at `admin`, all authorities merged, or `None` when it
/// cannot be scraped or parsed.
pub async fn scrape_inbound(source: &dyn MetricsSource, admin: SocketAddr) -> Option<Counts> {
    scrape_reduced(source, admin, |samples| {
        total(&counts_by_authority(samples, "inbound"))
    })
    .await
}

/// The inbound traffic of the proxy at `admin` per route (see [`counts_by_route`]), or `None`
/// when it cannot be scraped or parsed.
pub async fn scrape_inbound_routes(
    source: &dyn MetricsSource,
    admin: SocketAddr,
) -> Option<BTreeMap<String, Counts>> {
    scrape_reduced(source, admin, |samples| counts_by_route(samples, "inbound")).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE_1: &str = r#"
response_total{direction="outbound",authority="web.demo:80",status_code="200",classification="success"} 90
response_total{direction="outbound",authority="web.demo:80",status_code="500",classification="failure"} 10
response_total{direction="inbound",authority="web.demo:80",status_code="200",classification="success"} 5
response_latency_ms_bucket{direction="outbound",authority="web.demo:80",le="5"} 50
response_latency_ms_bucket{direction="outbound",authority="web.demo:80",le="10"} 90
response_latency_ms_bucket{direction="outbound",authority="web.demo:80",le="100"} 100
response_latency_ms_bucket{direction="outbound",authority="web.demo:80",le="+Inf"} 100
"#;

    const SCRAPE_2: &str = r#"
response_total{direction="outbound",authority="web.demo:80",status_code="200",classification="success"} 280
response_total{direction="outbound",authority="web.demo:80",status_code="500",classification="failure"} 20
response_latency_ms_bucket{direction="outbound",authority="web.demo:80",le="5"} 150
response_latency_ms_bucket{direction="outbound",authority="web.demo:80",le="10"} 290
response_latency_ms_bucket{direction="outbound",authority="web.demo:80",le="100"} 300
response_latency_ms_bucket{direction="outbound",authority="web.demo:80",le="+Inf"} 300
"#;

    fn scrape(text: &str) -> BTreeMap<String, Counts> {
        counts_by_authority(&conduit_proto::prom::parse(text).unwrap(), "outbound")
    }

    #[test]
    fn figures_cover_the_interval_between_scrapes() {
        let (first, second) = (scrape(SCRAPE_1), scrape(SCRAPE_2));
        let delta = second["web.demo:80"].since(&first["web.demo:80"]);
        assert_eq!((delta.responses, delta.successes), (200, 190));
        let figures = Figures::from_counts(&delta, Duration::from_secs(10));
        assert_eq!(figures.success_rate, Some(0.95));
        assert!((figures.rps - 20.0).abs() < 1e-9);
        assert_eq!(figures.p50_ms, Some(5.0));
    }

    /// Per-route families as the proxy publishes them: two authorities of one service, the
    /// outbound twin of a route, `_sum` and `_count` series, and a `default` route.
    const ROUTES: &str = r#"
# HELP route_request_total Total count of HTTP requests, per route.
# TYPE route_request_total counter
route_request_total{direction="inbound",authority="api.demo:80",route="get-item"} 12
route_response_total{direction="inbound",authority="api.demo:80",route="get-item",status_code="200",classification="success"} 9
route_response_total{direction="inbound",authority="api.demo:80",route="get-item",status_code="500",classification="failure"} 2
route_response_total{direction="inbound",authority="api.demo",route="get-item",status_code="200",classification="success"} 1
route_response_total{direction="outbound",authority="api.demo:80",route="get-item",status_code="200",classification="success"} 1000
route_response_total{direction="inbound",authority="api.demo:80",route="default",status_code="404",classification="success"} 3
response_total{direction="inbound",authority="api.demo:80",status_code="200",classification="success"} 13
# TYPE route_response_latency_ms histogram
route_response_latency_ms_bucket{direction="inbound",authority="api.demo:80",route="get-item",status_code="200",le="5"} 4
route_response_latency_ms_bucket{direction="inbound",authority="api.demo:80",route="get-item",status_code="200",le="10"} 9
route_response_latency_ms_bucket{direction="inbound",authority="api.demo:80",route="get-item",status_code="200",le="+Inf"} 9
route_response_latency_ms_bucket{direction="inbound",authority="api.demo:80",route="get-item",status_code="500",le="5"} 0
route_response_latency_ms_bucket{direction="inbound",authority="api.demo:80",route="get-item",status_code="500",le="10"} 0
route_response_latency_ms_bucket{direction="inbound",authority="api.demo:80",route="get-item",status_code="500",le="+Inf"} 2
route_response_latency_ms_sum{direction="inbound",authority="api.demo:80",route="get-item",status_code="200"} 61
route_response_latency_ms_count{direction="inbound",authority="api.demo:80",route="get-item",status_code="200"} 9
route_response_latency_ms_bucket{direction="inbound",authority="api.demo",route="get-item",status_code="200",le="1"} 1
route_response_latency_ms_bucket{direction="inbound",authority="api.demo",route="get-item",status_code="200",le="+Inf"} 1
"#;

    fn bucket_of(le_ms: u64) -> usize {
        LATENCY_BUCKET_BOUNDS_MS
            .iter()
            .position(|&b| b == le_ms)
            .unwrap()
    }

    #[test]
    fn one_reduction_reads_either_family() {
        let samples = conduit_proto::prom::parse(ROUTES).unwrap();
        let groups = reduce(&samples, "inbound", Family::Route);
        let keys: Vec<(&str, Option<&str>)> = groups
            .keys()
            .map(|g| (g.authority.as_str(), g.route.as_deref()))
            .collect();
        assert_eq!(
            keys,
            [
                ("api.demo", Some("get-item")),
                ("api.demo:80", Some("default")),
                ("api.demo:80", Some("get-item")),
            ]
        );
        let get_item = &groups[&Group {
            authority: "api.demo:80".into(),
            route: Some("get-item".into()),
        }];
        assert_eq!((get_item.responses, get_item.successes), (11, 9));
        // Cumulative buckets summed over status codes, then made per-bucket: 4 within 5 ms,
        // 5 more within 10 ms, 2 beyond every bound. `_sum` and `_count` are not buckets.
        assert_eq!(get_item.buckets[bucket_of(5)], 4);
        assert_eq!(get_item.buckets[bucket_of(10)], 5);
        assert_eq!(get_item.buckets[LATENCY_BUCKETS - 1], 2);
        assert_eq!(get_item.buckets.iter().sum::<u64>(), 11);

        // The top-line family of the same scrape, grouped by authority only.
        let top = reduce(&samples, "inbound", Family::Authority);
        assert_eq!(top.len(), 1);
        let (group, counts) = top.iter().next().unwrap();
        assert_eq!(
            (group.authority.as_str(), group.route.as_deref()),
            ("api.demo:80", None)
        );
        assert_eq!(counts.responses, 13);
    }

    #[test]
    fn routes_merge_their_authorities() {
        let samples = conduit_proto::prom::parse(ROUTES).unwrap();
        let routes = counts_by_route(&samples, "inbound");
        assert_eq!(routes.keys().collect::<Vec<_>>(), ["default", "get-item"]);
        let get_item = &routes["get-item"];
        assert_eq!((get_item.responses, get_item.successes), (12, 10));
        assert_eq!(get_item.buckets[bucket_of(1)], 1);
        assert_eq!(get_item.buckets.iter().sum::<u64>(), 12);
        assert_eq!(
            (routes["default"].responses, routes["default"].successes),
            (3, 3)
        );
        let outbound = counts_by_route(&samples, "outbound");
        assert_eq!(outbound["get-item"].responses, 1000);
    }

    #[test]
    fn a_restarted_proxy_starts_from_zero() {
        let (first, second) = (scrape(SCRAPE_2), scrape(SCRAPE_1));
        let delta = second["web.demo:80"].since(&first["web.demo:80"]);
        assert_eq!(delta.responses, 100);
    }

    #[test]
    fn hostile_counter_values_saturate() {
        let huge = format!(
            "response_total{{direction=\"outbound\",authority=\"a\",status_code=\"200\",classification=\"success\"}} {}\n\
             response_total{{direction=\"outbound\",authority=\"a\",status_code=\"201\",classification=\"success\"}} {}\n",
            u64::MAX,
            u64::MAX
        );
        let counts = scrape(&huge);
        assert_eq!(counts["a"].responses, u64::MAX);
        let mut all = counts["a"].clone();
        all.add(&counts["a"]);
        assert_eq!((all.responses, all.successes), (u64::MAX, u64::MAX));
    }
}
