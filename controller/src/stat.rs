//! Top-line figures from proxies' `/metrics`: success rate, requests per second and latency
//! percentiles, the way Linkerd's `viz stat` computes them (reference/linkerd.md §1.1).
//!
//! A scrape is reduced to cumulative [`Counts`] per authority; figures come from the
//! difference between two scrapes of the same proxy, so they describe the interval between
//! them: success rate = successes / responses, requests per second = responses / interval,
//! percentiles = `histogram_quantile` over the interval's latency buckets. The controller's
//! `StatSummary` and the CLI's demo table both use this module.
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
        self.responses += other.responses;
        self.successes += other.successes;
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets) {
            *mine += theirs;
        }
    }
}

/// Reduces one scrape to counts per authority for one traffic direction (`inbound` or
/// `outbound`), summing over every other label.
#[must_use]
pub fn counts_by_authority(samples: &[Sample], direction: &str) -> BTreeMap<String, Counts> {
    let mut by_authority: BTreeMap<String, Counts> = BTreeMap::new();
    // Cumulative buckets per authority and bound, summed over other labels first.
    let mut cumulative: BTreeMap<String, [u64; LATENCY_BUCKETS]> = BTreeMap::new();
    for sample in samples {
        if sample.label("direction") != Some(direction) {
            continue;
        }
        let Some(authority) = sample.label("authority") else {
            continue;
        };
        let value = counter_value(sample.value);
        match sample.name.as_str() {
            "response_total" => {
                let counts = by_authority.entry(authority.to_owned()).or_default();
                counts.responses += value;
                if sample.label("classification") == Some("success") {
                    counts.successes += value;
                }
            }
            "response_latency_ms_bucket" => {
                let Some(index) = sample.label("le").and_then(bucket_index) else {
                    continue;
                };
                cumulative
                    .entry(authority.to_owned())
                    .or_insert([0; LATENCY_BUCKETS])[index] += value;
            }
            _ => {}
        }
    }
    for (authority, cumulative) in cumulative {
        let counts = by_authority.entry(authority).or_default();
        let mut below = 0;
        for (i, bucket) in counts.buckets.iter_mut().enumerate() {
            *bucket = cumulative[i].saturating_sub(below);
            below = below.max(cumulative[i]);
        }
    }
    by_authority
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

/// The inbound traffic of the proxy at `admin`, all authorities merged, or `None` when it
/// cannot be scraped or parsed.
pub async fn scrape_inbound(source: &dyn MetricsSource, admin: SocketAddr) -> Option<Counts> {
    match source.scrape(admin).await {
        Ok(text) => match conduit_proto::prom::parse(&text) {
            Ok(samples) => Some(total(&counts_by_authority(&samples, "inbound"))),
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

    #[test]
    fn a_restarted_proxy_starts_from_zero() {
        let (first, second) = (scrape(SCRAPE_2), scrape(SCRAPE_1));
        let delta = second["web.demo:80"].since(&first["web.demo:80"]);
        assert_eq!(delta.responses, 100);
    }
}
