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
    /// Keep every response's exact latency (up to [`MAX_SAMPLES`]) for exact percentiles; the
    /// histogram's millisecond buckets cannot resolve a proxy's tens of microseconds.
    pub record_samples: bool,
    /// Pace requests to the microsecond by yielding through the last millisecond before each
    /// is due, instead of trusting the timer alone (tokio's timer wheel has millisecond
    /// granularity, which would add up to a millisecond of the generator's own lateness to
    /// every latency). Costs the generator's core; for benchmarks on the real clock only,
    /// never in the simulation, whose virtual clock does not move while a task spins.
    pub spin_wait: bool,
}

/// How far ahead of a request's due time a spin-waiting generator stops sleeping.
const SPIN_WINDOW: Duration = Duration::from_millis(1);

/// The most exact latency samples a run keeps (8 MiB).
pub const MAX_SAMPLES: usize = 1 << 20;

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
}

impl LoadError {
    /// A stable name for reports.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Connection => "connection",
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
    /// Exact latencies of responses, in arrival order, when [`LoadConfig::record_samples`]
    /// was set (at most [`MAX_SAMPLES`]).
    pub samples: Vec<Duration>,
}

impl LoadReport {
    /// The exact `q`-quantile of the recorded samples (nearest rank), if any were kept.
    #[must_use]
    pub fn exact_quantile(&self, q: f64) -> Option<Duration> {
        if self.samples.is_empty() {
            return None;
        }
        let mut sorted = self.samples.clone();
        sorted.sort_unstable();
        #[expect(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "an index into a bounded vector"
        )]
        let rank =
            ((q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        Some(sorted[rank - 1])
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

/// Runs one load test against `addr` and reports every request's outcome.
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
    let interval_nanos = 1_000_000_000u64 / u64::from(config.rate);
    for index in 0..config.request_count() {
        let due = start + Duration::from_nanos(index.saturating_mul(interval_nanos));
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
        if config.record_samples && outcome.is_ok() && report.samples.len() < MAX_SAMPLES {
            report.samples.push(latency);
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
            record_samples: false,
            spin_wait: false,
        }
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
