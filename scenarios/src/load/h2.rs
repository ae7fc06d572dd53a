//! The open-loop load generator over HTTP/2 with prior knowledge (h2c), and gRPC over it
//! ([`Protocol::H2`] and [`Protocol::Grpc`], run by [`super::run`]).
//!
//! Pacing and accounting are the HTTP/1.1 generator's own ([`super::pace`] and
//! [`super::collect`]): request `i` is due at `start + i / rate`, paced to the microsecond with
//! `spin_wait`, and its latency runs from that intended send time to the end of its response
//! body, bounded by the timeout, so a stall shows in every request scheduled behind it. What differs is the connection model: HTTP/1.1
//! sends one request at a time per connection, so a request waits for a free connection; h2
//! multiplexes, so request `i` goes at once onto connection `i mod connections` as a stream of
//! its own, and any wait (for a connection being opened, for stream capacity) counts in its
//! latency just the same. A connection that fails is replaced by the next request given to it;
//! a stream that fails or times out is reset on its own and leaves its connection alone.
//!
//! gRPC requests are POSTs with `content-type: application/grpc`, `te: trailers` and one
//! empty message; a response succeeds only with `grpc-status: 0` in its trailers (or its
//! headers, for a trailers-only answer), and any other code, or none, counts as
//! [`LoadError::Grpc`].
//!
//! The report is a [`LoadReport`], so `conduit load` prints the same table and JSON for both.

use std::sync::Arc;
use std::time::Duration;

use super::{Done, InvalidLoad, Job, LoadConfig, LoadError, LoadReport, Protocol};
use bytes::Bytes;
use conduit_proxy::clock::Clock;
use conduit_proxy::net::Net;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

type Sender = http2::SendRequest<Full<Bytes>>;

/// One empty gRPC message: uncompressed, zero bytes long.
const GRPC_EMPTY_MESSAGE: &[u8] = &[0, 0, 0, 0, 0];

/// Runs one h2c (or gRPC) load test against `addr` and reports every request's outcome.
///
/// # Errors
///
/// [`InvalidLoad`] for a configuration that cannot run, or a target whose authority and path
/// do not form a URI; nothing is sent then.
pub(crate) async fn run<N: Net>(
    net: N,
    addr: std::net::SocketAddr,
    config: LoadConfig,
    clock: Clock,
) -> Result<LoadReport, InvalidLoad> {
    config.validate()?;
    let grpc = config.protocol == Protocol::Grpc;
    // h2 names the service in `:authority`, which comes from an absolute URI.
    let uris: Arc<[(http::Method, http::Uri)]> = config
        .targets
        .iter()
        .map(|target| {
            let uri = format!("http://{}{}", target.authority, target.path);
            let parsed = uri
                .parse::<http::Uri>()
                .map_err(|_| InvalidLoad::Uri(uri.clone()))?;
            let method = if grpc {
                http::Method::POST
            } else {
                target.method.clone()
            };
            Ok((method, parsed))
        })
        .collect::<Result<Vec<_>, InvalidLoad>>()?
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
            grpc,
            uris: Arc::clone(&uris),
            clock,
            done: done_tx.clone(),
        };
        tasks.spawn(lane.run(rx));
    }
    drop(done_tx);

    let lane_count = lanes.len() as u64;
    let start = super::pace(&config, clock, |job| {
        let lane = usize::try_from(job.index % lane_count).unwrap_or(0);
        lanes[lane].send(job).is_ok()
    })
    .await;
    drop(lanes);
    let report = super::collect(&config, done_rx, start, clock).await;
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
    grpc: bool,
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
            let grpc = self.grpc;
            tokio::spawn(async move {
                let sent = send(stream_sender, method, uri, grpc);
                let outcome = tokio::time::timeout_at(deadline, sent)
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

async fn send(
    mut sender: Sender,
    method: http::Method,
    uri: http::Uri,
    grpc: bool,
) -> Result<u16, LoadError> {
    let mut request = http::Request::builder()
        .version(http::Version::HTTP_2)
        .method(method)
        .uri(uri);
    let body = if grpc {
        request = request
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers");
        Full::new(Bytes::from_static(GRPC_EMPTY_MESSAGE))
    } else {
        Full::new(Bytes::new())
    };
    let request = request.body(body).map_err(|_| LoadError::Connection)?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|_| LoadError::Connection)?;
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    // The latency runs to the end of the body, as a client experiences it.
    let collected = body.collect().await.map_err(|_| LoadError::Connection)?;
    if grpc {
        // A trailers-only answer carries grpc-status in its headers.
        let code = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| parts.headers.get("grpc-status"));
        if code.is_none_or(|code| code.as_bytes() != b"0") {
            return Err(LoadError::Grpc);
        }
    }
    Ok(status)
}
