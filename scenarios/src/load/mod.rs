//! The open-loop load generator.
//!
//! Requests are sent at a constant arrival rate, whatever the server does: request `i` is due at
//! `start + i / rate`, and its latency is measured from that *intended* send time to the end of
//! its response body. A server that stalls therefore shows its stall in every request scheduled
//! behind it, instead of silently slowing the generator down (the coordinated omission that
//! closed-loop tools like `wrk` suffer; Gil Tene, "How NOT to Measure Latency"; wrk2 and
//! `oha --latency-correction` correct for it the same way).
//!
//! Requests go over a fixed pool of HTTP/1.1 keep-alive connections (like `oha -c`); a request
//! waits for a free connection, and the wait counts in its latency. Every request ends in a
//! response (counted by status) or an error (counted by kind); none is lost silently, and each
//! is bounded by [`LoadConfig::timeout`].
//!
//! The generator is generic over [`Net`] and reads time only through [`Clock`], so the same code
//! drives real processes (the demo, the red-line harness, benchmarks) and the simulation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use conduit_core::metrics::LatencyHistogram;
use conduit_core::time::Instant;
use conduit_proxy::clock::Clock;
use conduit_proxy::net::Net;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::sync::{Mutex, mpsc};

pub mod h2;

/// The most connections one generator opens: a bound on sockets and tasks.
pub const MAX_CONNECTIONS: usize = 1024;

/// The highest rate accepted, in requests per second.
pub const MAX_RATE: u32 = 1_000_000;

/// One kind of request the generator sends; targets are used in turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The `Host` header: which service the request is for.
    pub authority: String,
    /// The request path (with query, if any).
    pub path: String,
    /// The request method. Requests carry no body whatever the method.
    pub method: http::Method,
}

/// What to send, how fast and for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadConfig {
    /// Requests per second (1..=[`MAX_RATE`]).
    pub rate: u32,
    /// How long to keep sending; the run then waits for outstanding responses.
    pub duration: Duration,
    /// Keep-alive connections in the pool (1..=[`MAX_CONNECTIONS`]).
    pub connections: usize,
    /// The longest a request may take, from its intended send time, before it counts as an
    /// error.
    pub timeout: Duration,
    /// The requests to send, in turn. Must not be empty.
    pub targets: Vec<Target>,
    /// How requests are spaced.
    pub arrivals: Arrivals,
    /// What the requests speak.
    pub protocol: Protocol,
    /// Pace requests to the microsecond by yielding through the last millisecond before each
    /// is due, instead of trusting the timer alone (tokio's timer wheel has millisecond
    /// granularity, which would add up to a millisecond of the generator's own lateness to
    /// every latency). Costs the generator's core; for benchmarks on the real clock only,
    /// never in the simulation, whose virtual clock does not move while a task spins.
    pub spin_wait: bool,
}

/// What a run's requests speak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 over a pool of keep-alive connections, one request at a time on each.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), requests multiplexed over the connections
    /// ([`h2`]).
    H2,
    /// gRPC over h2c: each request a unary call with one empty message, a success only with
    /// `grpc-status: 0`.
    Grpc,
}

impl Protocol {
    /// A name for reports.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http/1.1",
            Self::H2 => "h2c",
            Self::Grpc => "grpc",
        }
    }
}

/// How requests are spaced in time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arrivals {
    /// Evenly: request `i` is due at `start + i / rate`.
    #[default]
    Constant,
    /// A Poisson process at the rate: exponentially distributed gaps, drawn from a generator
    /// seeded with `seed` (the same seed gives the same schedule), so bursts arrive as they do
    /// from many independent clients.
    Poisson {
        /// The schedule's seed.
        seed: u64,
    },
}

/// How far ahead of a request's due time a spin-waiting generator stops sleeping.
const SPIN_WINDOW: Duration = Duration::from_millis(1);

/// Latencies of responses: an HDR histogram over nanoseconds (3 significant digits, from 1 ns
/// to an hour; longer latencies count as an hour), so a proxy's tens of microseconds and a
/// stall of seconds are both read to 0.1 %.
#[derive(Clone)]
pub struct Latencies(hdrhistogram::Histogram<u64>);

/// The longest latency recorded as itself.
const LATENCY_CEILING: Duration = Duration::from_secs(3600);

impl Default for Latencies {
    fn default() -> Self {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "an hour in nanoseconds fits a u64"
        )]
        let high = LATENCY_CEILING.as_nanos() as u64;
        Self(
            hdrhistogram::Histogram::new_with_bounds(1, high, 3)
                .expect("1 ns to an hour at 3 digits is a valid histogram"),
        )
    }
}

impl Latencies {
    /// Counts one latency.
    pub fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.0.saturating_record(nanos.max(1));
    }

    /// Latencies counted.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether none were counted.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The latency at quantile `q` (0..=1), or `None` when none were counted.
    #[must_use]
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        (!self.is_empty())
            .then(|| Duration::from_nanos(self.0.value_at_quantile(q.clamp(0.0, 1.0))))
    }

    /// The largest latency counted, or `None`.
    #[must_use]
    pub fn max(&self) -> Option<Duration> {
        (!self.is_empty()).then(|| Duration::from_nanos(self.0.max()))
    }

    /// Adds another run's latencies.
    pub fn merge(&mut self, other: &Self) {
        // Both have the same bounds, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }
}

impl PartialEq for Latencies {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for Latencies {}

impl std::fmt::Debug for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latencies")
            .field("len", &self.len())
            .field("p50", &self.quantile(0.5))
            .field("p99", &self.quantile(0.99))
            .field("max", &self.max())
            .finish()
    }
}

/// A [`LoadConfig`] that cannot be run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidLoad {
    /// The rate is 0 or above [`MAX_RATE`].
    #[error("rate: must be between 1 and {MAX_RATE} requests per second, got {0}")]
    Rate(u32),
    /// The connection count is 0 or above [`MAX_CONNECTIONS`].
    #[error("connections: must be between 1 and {MAX_CONNECTIONS}, got {0}")]
    Connections(usize),
    /// No targets.
    #[error("targets: at least one target is needed")]
    NoTargets,
    /// A zero timeout.
    #[error("timeout: must be above zero")]
    Timeout,
    /// A target's authority and path do not form a request URI (h2 and gRPC send one).
    #[error("targets: `{0}` is not a request URI")]
    Uri(String),
}

impl LoadConfig {
    /// Checks the configuration.
    ///
    /// # Errors
    ///
    /// [`InvalidLoad`] naming the first bad field.
    pub fn validate(&self) -> Result<(), InvalidLoad> {
        if self.rate == 0 || self.rate > MAX_RATE {
            return Err(InvalidLoad::Rate(self.rate));
        }
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(InvalidLoad::Connections(self.connections));
        }
        if self.targets.is_empty() {
            return Err(InvalidLoad::NoTargets);
        }
        if self.timeout.is_zero() {
            return Err(InvalidLoad::Timeout);
        }
        Ok(())
    }

    /// How many requests a run sends: `rate x duration`, rounded down.
    #[must_use]
    pub fn request_count(&self) -> u64 {
        let nanos = self.duration.as_nanos() * u128::from(self.rate) / 1_000_000_000;
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }
}

/// Why a request got no response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum LoadError {
    /// No connection could be opened.
    Connect,
    /// No complete response within the timeout.
    Timeout,
    /// The connection failed mid-request (reset, protocol error).
    Connection,
    /// A gRPC response without `grpc-status: 0`.
    Grpc,
}

impl LoadError {
    /// A stable name for reports.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
            Self::Grpc => "grpc-status",
        }
    }
}

/// Outcomes for one target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetReport {
    /// Responses by HTTP status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no response, by reason.
    pub errors: BTreeMap<LoadError, u64>,
    /// Latency from intended send time to the end of the response, for responses.
    pub latency: LatencyHistogram,
}

impl TargetReport {
    /// Requests that ended (responses plus errors).
    #[must_use]
    pub fn total(&self) -> u64 {
        self.statuses.values().sum::<u64>() + self.errors.values().sum::<u64>()
    }

    /// Responses with a status below 500 (the mesh's default success class).
    #[must_use]
    pub fn successes(&self) -> u64 {
        self.statuses.range(..500).map(|(_, n)| n).sum()
    }

    /// Fraction of ended requests that succeeded, or `None` when none ended.
    #[must_use]
    pub fn success_rate(&self) -> Option<f64> {
        let total = self.total();
        #[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
        (total > 0).then(|| self.successes() as f64 / total as f64)
    }

    fn record(&mut self, outcome: Result<u16, LoadError>, latency: Duration) {
        match outcome {
            Ok(status) => {
                *self.statuses.entry(status).or_insert(0) += 1;
                self.latency.record(latency);
            }
            Err(error) => *self.errors.entry(error).or_insert(0) += 1,
        }
    }
}

/// The outcome of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Requests scheduled.
    pub scheduled: u64,
    /// Per target, keyed by authority and path (targets that differ only in their method
    /// share an entry).
    pub targets: BTreeMap<(String, String), TargetReport>,
    /// From the first intended send to the last response.
    pub elapsed: Duration,
    /// Latencies of every response (all targets), to 0.1 %.
    pub latencies: Latencies,
}

impl LoadReport {
    /// The latency of responses at quantile `q` (0..=1), to 0.1 %, if any response came.
    #[must_use]
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        self.latencies.quantile(q)
    }
}

impl LoadReport {
    /// All targets merged.
    #[must_use]
    pub fn overall(&self) -> TargetReport {
        let mut all = TargetReport::default();
        for report in self.targets.values() {
            for (status, n) in &report.statuses {
                *all.statuses.entry(*status).or_insert(0) += n;
            }
            for (error, n) in &report.errors {
                *all.errors.entry(*error).or_insert(0) += n;
            }
            all.latency.merge(&report.latency);
        }
        all
    }
}

/// One request to send: its index in the run and its intended send time.
#[derive(Clone, Copy, Debug)]
pub struct Job {
    /// The request's index (which target it uses: `index mod targets`).
    pub index: u64,
    /// When it is due; its latency counts from here.
    pub due: Instant,
}

/// One request's end: its index, status or error, and latency from its intended send time.
pub type Done = (u64, Result<u16, LoadError>, Duration);

/// Runs one load test against `addr` in the configuration's protocol and reports every
/// request's outcome.
///
/// # Errors
///
/// [`InvalidLoad`] for a configuration that cannot run; nothing is sent then.
pub async fn run<N: Net>(
    net: N,
    addr: SocketAddr,
    config: LoadConfig,
    clock: Clock,
) -> Result<LoadReport, InvalidLoad> {
    if config.protocol != Protocol::Http1 {
        return h2::run(net, addr, config, clock).await;
    }
    config.validate()?;
    let config = Arc::new(config);
    // The queue holds at most every request of the run, which the rate and duration bound.
    let (tx, rx) = mpsc::unbounded_channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();

    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.connections {
        let worker = Worker {
            net: net.clone(),
            addr,
            config: Arc::clone(&config),
            clock,
            jobs: Arc::clone(&rx),
            done: done_tx.clone(),
        };
        workers.spawn(worker.run());
    }
    drop(done_tx);

    let start = pace(&config, clock, |job| tx.send(job).is_ok()).await;
    drop(tx);
    let report = collect(&config, done_rx, start, clock).await;
    while workers.join_next().await.is_some() {}
    Ok(LoadReport {
        elapsed: clock.now() - start,
        ..report
    })
}

/// Hands each request of the run to `dispatch` at its intended send time (`start + i / rate`,
/// to the microsecond with [`LoadConfig::spin_wait`]), until the run is over or `dispatch`
/// returns false. Returns the start. Shared by every transport, so they pace alike.
pub async fn pace(
    config: &LoadConfig,
    clock: Clock,
    mut dispatch: impl FnMut(Job) -> bool,
) -> Instant {
    let start = clock.now();
    let mut schedule = Schedule::new(config);
    for index in 0..config.request_count() {
        let due = start + schedule.offset(index);
        if config.spin_wait {
            clock.sleep_until(due - SPIN_WINDOW).await;
            while clock.now() < due {
                tokio::task::yield_now().await;
            }
        } else {
            clock.sleep_until(due).await;
        }
        if !dispatch(Job { index, due }) {
            break;
        }
    }
    start
}

/// When each request of a run is due, from the run's start.
struct Schedule {
    arrivals: Arrivals,
    rate: u32,
    /// The Poisson schedule's generator state (SplitMix64) and its running offset.
    state: u64,
    offset: Duration,
}

impl Schedule {
    fn new(config: &LoadConfig) -> Self {
        let state = match config.arrivals {
            Arrivals::Constant => 0,
            Arrivals::Poisson { seed } => seed,
        };
        Self {
            arrivals: config.arrivals,
            rate: config.rate,
            state,
            offset: Duration::ZERO,
        }
    }

    /// The offset of request `index`; called for indexes in order.
    fn offset(&mut self, index: u64) -> Duration {
        match self.arrivals {
            Arrivals::Constant => {
                Duration::from_nanos(index.saturating_mul(1_000_000_000 / u64::from(self.rate)))
            }
            Arrivals::Poisson { .. } => {
                if index > 0 {
                    // Exponential gaps with mean 1/rate: -ln(U) / rate, U uniform in (0, 1].
                    let uniform = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    let gap = -(1.0 - uniform).ln() / f64::from(self.rate);
                    self.offset += Duration::from_secs_f64(gap.min(3600.0));
                }
                self.offset
            }
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Counts every request's end, as senders report them, into a report (until every sender has
/// hung up); `elapsed` runs from `start` to the last end.
pub async fn collect(
    config: &LoadConfig,
    mut done: mpsc::UnboundedReceiver<Done>,
    start: Instant,
    clock: Clock,
) -> LoadReport {
    let mut report = LoadReport {
        scheduled: config.request_count(),
        ..LoadReport::default()
    };
    while let Some((index, outcome, latency)) = done.recv().await {
        if outcome.is_ok() {
            report.latencies.record(latency);
        }
        let target = target_of(config, index);
        report
            .targets
            .entry((target.authority.clone(), target.path.clone()))
            .or_default()
            .record(outcome, latency);
    }
    report.elapsed = clock.now() - start;
    report
}

/// The target request `index` uses.
#[must_use]
pub fn target_of(config: &LoadConfig, index: u64) -> &Target {
    let i = usize::try_from(index % config.targets.len() as u64).unwrap_or(0);
    &config.targets[i]
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

struct Worker<N> {
    net: N,
    addr: SocketAddr,
    config: Arc<LoadConfig>,
    clock: Clock,
    jobs: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    done: mpsc::UnboundedSender<Done>,
}

impl<N: Net> Worker<N> {
    async fn run(self) {
        let mut sender: Option<Sender> = None;
        loop {
            let job = { self.jobs.lock().await.recv().await };
            let Some(job) = job else { return };
            let deadline = job.due + self.config.timeout;
            let outcome = tokio::time::timeout_at(
                self.clock.to_tokio(deadline),
                self.send(&mut sender, target_of(&self.config, job.index)),
            )
            .await
            .unwrap_or(Err(LoadError::Timeout));
            if outcome.is_err() {
                // The connection's state is unknown after an error or timeout: start afresh.
                sender = None;
            }
            let latency = self.clock.now() - job.due;
            if self.done.send((job.index, outcome, latency)).is_err() {
                return;
            }
        }
    }

    async fn send(&self, sender: &mut Option<Sender>, target: &Target) -> Result<u16, LoadError> {
        let ready = match sender.as_mut() {
            Some(s) => s.ready().await.is_ok(),
            None => false,
        };
        if !ready {
            *sender = Some(self.connect().await?);
        }
        let Some(s) = sender.as_mut() else {
            return Err(LoadError::Connect);
        };
        let request = http::Request::builder()
            .method(target.method.clone())
            .uri(target.path.as_str())
            .header(http::header::HOST, target.authority.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|_| LoadError::Connection)?;
        let response = s
            .send_request(request)
            .await
            .map_err(|_| LoadError::Connection)?;
        let status = response.status().as_u16();
        // The latency runs to the end of the body, as a client experiences it.
        response
            .into_body()
            .collect()
            .await
            .map_err(|_| LoadError::Connection)?;
        Ok(status)
    }

    async fn connect(&self) -> Result<Sender, LoadError> {
        let io = self
            .net
            .connect(self.addr)
            .await
            .map_err(|_| LoadError::Connect)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|_| LoadError::Connect)?;
        tokio::spawn(async move {
            // The connection ends when the sender is dropped or the peer closes; either is
            // normal for a load generator.
            let _ = connection.await;
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LoadConfig {
        LoadConfig {
            rate: 100,
            duration: Duration::from_secs(2),
            connections: 4,
            timeout: Duration::from_secs(1),
            targets: vec![Target {
                authority: "web".into(),
                path: "/".into(),
                method: http::Method::GET,
            }],
            arrivals: Arrivals::Constant,
            protocol: Protocol::Http1,
            spin_wait: false,
        }
    }

    #[test]
    fn poisson_arrivals_keep_the_rate_and_follow_the_seed() {
        let poisson = |seed| LoadConfig {
            rate: 1_000,
            arrivals: Arrivals::Poisson { seed },
            ..config()
        };
        let offsets = |config: &LoadConfig| {
            let mut schedule = Schedule::new(config);
            (0..10_000).map(|i| schedule.offset(i)).collect::<Vec<_>>()
        };
        let (a, b, c) = (
            offsets(&poisson(7)),
            offsets(&poisson(7)),
            offsets(&poisson(8)),
        );
        assert_eq!(a, b, "the same seed gives the same schedule");
        assert_ne!(a, c);
        assert!(a.windows(2).all(|w| w[0] <= w[1]), "offsets only grow");
        // 10,000 gaps of mean 1 ms: within 5 % of 10 s (the standard deviation is 1 %).
        let total = a[9_999].as_secs_f64();
        assert!((9.5..10.5).contains(&total), "{total}");
        // Bursty, unlike the constant schedule: some gaps are under a tenth of the mean.
        let short = a
            .windows(2)
            .filter(|w| w[1] - w[0] < Duration::from_micros(100))
            .count();
        assert!(short > 500, "{short} short gaps");
        let constant = offsets(&config());
        assert_eq!(constant[3], Duration::from_millis(30));
    }

    #[test]
    fn latencies_read_to_a_tenth_of_a_percent() {
        let mut latencies = Latencies::default();
        assert_eq!(latencies.quantile(0.5), None);
        for micros in 1..=1_000u64 {
            latencies.record(Duration::from_micros(micros));
        }
        latencies.record(Duration::from_secs(7_200));
        // The median of 1,001 latencies is the 501st, read to within 0.1 %.
        let p50 = latencies.quantile(0.5).unwrap().as_secs_f64() * 1e6;
        assert!((p50 - 501.0).abs() <= 0.501, "{p50}");
        assert!(
            latencies.max().unwrap() >= Duration::from_secs(3_599),
            "saturates at an hour"
        );
        let mut merged = Latencies::default();
        merged.merge(&latencies);
        assert_eq!(merged, latencies);
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(
            LoadConfig {
                rate: 0,
                ..config()
            }
            .validate(),
            Err(InvalidLoad::Rate(0))
        );
        assert_eq!(
            LoadConfig {
                connections: 0,
                ..config()
            }
            .validate(),
            Err(InvalidLoad::Connections(0))
        );
        assert_eq!(
            LoadConfig {
                targets: vec![],
                ..config()
            }
            .validate(),
            Err(InvalidLoad::NoTargets)
        );
        assert_eq!(config().request_count(), 200);
    }
}
