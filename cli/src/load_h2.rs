//! `conduit load --h2`: the open-loop load generator over HTTP/2 with prior knowledge (h2c).
//!
//! Pacing and accounting are the HTTP/1.1 generator's own ([`load::pace`] and
//! [`load::collect`]): request `i` is due at `start + i / rate`, paced to the microsecond with
//! `spin_wait`, and its latency runs from that intended send time to the end of its response
//! body, bounded by the timeout, so a stall shows in every request scheduled behind it. What differs is the connection model: HTTP/1.1
//! sends one request at a time per connection, so a request waits for a free connection; h2
//! multiplexes, so request `i` goes at once onto connection `i mod connections` as a stream of
//! its own, and any wait (for a connection being opened, for stream capacity) counts in its
//! latency just the same. A connection that fails is replaced by the next request given to it;
//! a stream that fails or times out is reset on its own and leaves its connection alone.
//!
//! The report is a [`LoadReport`], so `conduit load` prints the same table and JSON for both.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use conduit_proxy::clock::Clock;
use conduit_proxy::net::Net;
use conduit_scenarios::load::{self, Done, Job, LoadConfig, LoadError, LoadReport};
use http_body_util::{BodyExt as _, Empty};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

type Sender = http2::SendRequest<Empty<Bytes>>;

/// Runs one h2c load test against `addr` and reports every request's outcome.
///
/// # Errors
///
/// [`InvalidLoad`] for a configuration that cannot run, or a target whose authority and path
/// do not form a URI; nothing is sent then.
pub async fn run<N: Net>(
    net: N,
    addr: std::net::SocketAddr,
    config: LoadConfig,
    clock: Clock,
) -> anyhow::Result<LoadReport> {
    config.validate()?;
    // h2 names the service in `:authority`, which comes from an absolute URI.
    let uris: Arc<[(http::Method, http::Uri)]> = config
        .targets
        .iter()
        .map(|target| {
            let uri = format!("http://{}{}", target.authority, target.path);
            let parsed = uri
                .parse::<http::Uri>()
                .map_err(|error| anyhow::anyhow!("`{uri}` is not a request URI: {error}"))?;
            Ok((target.method.clone(), parsed))
        })
        .collect::<anyhow::Result<Vec<_>>>()?
        .into();
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();

    // One lane per connection; each lane owns its connection and opens one stream per job.
    let mut lanes = Vec::with_capacity(config.connections);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.connections {
        let (tx, rx) = mpsc::unbounded_channel::<Job>();
        lanes.push(tx);
        let lane = Lane {
            net: net.clone(),
            addr,
            timeout: config.timeout,
            uris: Arc::clone(&uris),
            clock,
            done: done_tx.clone(),
        };
        tasks.spawn(lane.run(rx));
    }
    drop(done_tx);

    let lane_count = lanes.len() as u64;
    let start = load::pace(&config, clock, |job| {
        let lane = usize::try_from(job.index % lane_count).unwrap_or(0);
        lanes[lane].send(job).is_ok()
    })
    .await;
    drop(lanes);
    let report = load::collect(&config, done_rx, start, clock).await;
    while tasks.join_next().await.is_some() {}
    Ok(LoadReport {
        elapsed: clock.now() - start,
        ..report
    })
}

/// One h2 connection and the jobs assigned to it.
struct Lane<N> {
    net: N,
    addr: std::net::SocketAddr,
    timeout: Duration,
    uris: Arc<[(http::Method, http::Uri)]>,
    clock: Clock,
    done: mpsc::UnboundedSender<Done>,
}

impl<N: Net> Lane<N> {
    async fn run(self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        let mut sender: Option<Sender> = None;
        while let Some(job) = jobs.recv().await {
            let deadline = self.clock.to_tokio(job.due + self.timeout);
            let stream_sender = match sender.as_ref().filter(|s| !s.is_closed()) {
                Some(open) => open.clone(),
                None => {
                    // Opening the connection counts in this job's latency and timeout; later
                    // jobs on this lane wait for it, as HTTP/1.1 requests wait for a free
                    // connection.
                    sender = None;
                    let connected = tokio::time::timeout_at(deadline, self.connect())
                        .await
                        .unwrap_or(Err(LoadError::Timeout));
                    match connected {
                        Ok(connected) => sender.insert(connected).clone(),
                        Err(error) => {
                            let latency = self.clock.now() - job.due;
                            if self.done.send((job.index, Err(error), latency)).is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                }
            };
            let (method, uri) =
                self.uris[usize::try_from(job.index % self.uris.len() as u64).unwrap_or(0)].clone();
            let clock = self.clock;
            let done = self.done.clone();
            tokio::spawn(async move {
                let outcome = tokio::time::timeout_at(deadline, send(stream_sender, method, uri))
                    .await
                    .unwrap_or(Err(LoadError::Timeout));
                let latency = clock.now() - job.due;
                let _ = done.send((job.index, outcome, latency));
            });
        }
    }

    async fn connect(&self) -> Result<Sender, LoadError> {
        let io = self
            .net
            .connect(self.addr)
            .await
            .map_err(|_| LoadError::Connect)?;
        let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|_| LoadError::Connect)?;
        tokio::spawn(async move {
            // The connection ends when every sender is dropped or the peer closes; either is
            // normal for a load generator.
            let _ = connection.await;
        });
        Ok(sender)
    }
}

async fn send(mut sender: Sender, method: http::Method, uri: http::Uri) -> Result<u16, LoadError> {
    let request = http::Request::builder()
        .version(http::Version::HTTP_2)
        .method(method)
        .uri(uri)
        .body(Empty::<Bytes>::new())
        .map_err(|_| LoadError::Connection)?;
    let response = sender
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

#[cfg(test)]
mod tests {
    use super::*;
    use conduit_scenarios::load::{InvalidLoad, Target};

    fn config(rate: u32) -> LoadConfig {
        LoadConfig {
            rate,
            duration: Duration::from_millis(500),
            connections: 4,
            timeout: Duration::from_secs(2),
            targets: vec![Target {
                authority: "hello".into(),
                path: "/".into(),
                method: http::Method::GET,
            }],
            arrivals: load::Arrivals::Constant,
            spin_wait: true,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn h2_load_against_hello_answers_every_request() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(crate::app::serve_hello(listener));
        let report = run(conduit_proxy::TokioNet, addr, config(400), Clock::new())
            .await
            .unwrap();
        server.abort();
        let overall = report.overall();
        assert_eq!(report.scheduled, 200);
        assert_eq!(overall.statuses.get(&200), Some(&200), "{overall:?}");
        assert!(overall.errors.is_empty(), "{overall:?}");
        assert_eq!(report.latencies.len(), 200);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn h2_load_counts_refused_connections_as_errors() {
        // A port nobody listens on: bind, note the address, close.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let report = run(conduit_proxy::TokioNet, addr, config(100), Clock::new())
            .await
            .unwrap();
        let overall = report.overall();
        assert_eq!(overall.total(), 50);
        assert_eq!(overall.errors.get(&LoadError::Connect), Some(&50));
        assert!(report.latencies.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn invalid_configs_are_refused() {
        let addr = "127.0.0.1:9".parse().unwrap();
        let bad = LoadConfig {
            connections: 0,
            ..config(100)
        };
        let error = run(conduit_proxy::TokioNet, addr, bad, Clock::new())
            .await
            .unwrap_err();
        assert_eq!(
            error.downcast_ref::<InvalidLoad>(),
            Some(&InvalidLoad::Connections(0))
        );
    }
}
