//! The workload: an open-loop request schedule drawn from the seed, and the client that sends
//! it through its host's proxy.
//!
//! Open loop: request `i` is sent at its planned time whatever happened to earlier ones
//! (`scenarios::load` explains why), each on its own task, each bounded by its deadline. Every
//! request ends in exactly one [`Outcome`], which is recorded with its sim-time timings.
//!
//! HTTP/1.1 requests use a per-client pool of keep-alive connections (a connection is reused only
//! after its response ended); h2 and gRPC share one multiplexed connection per client,
//! re-opened when it closes. All go to the proxy's outbound listener on the client's own host.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use conduit_core::rand::{DetRng, Rng};
use http::{HeaderValue, Method, Request};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};

use crate::app::{CHUNK_BYTES, pattern_byte};
use crate::net::SimStream;
use crate::trace::{Outcome, Proto, Recorder, RequestRecord, micros, now_us};

/// One planned request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedRequest {
    /// Unique id (`x-request-id`).
    pub id: u64,
    /// Which client host sends it.
    pub client: usize,
    /// When, after the run starts.
    pub at: Duration,
    /// The destination authority (`web.default`).
    pub authority: String,
    /// The protocol.
    pub proto: Proto,
    /// POST (not retryable) or GET.
    pub post: bool,
    /// Request body bytes (POST only).
    pub request_bytes: u64,
    /// Response body bytes asked of the backend (0: its identity line).
    pub response_bytes: u64,
    /// The client gives up after this long.
    pub deadline: Duration,
    /// A slow reader: pause this long between body frames.
    pub read_pause: Option<Duration>,
    /// The path (`None`: the protocol's default, `/echo` or `/echo.Echo/Say`).
    pub path: Option<String>,
    /// A deadline to announce in `grpc-timeout`.
    pub grpc_timeout: Option<Duration>,
    /// Ask the app to answer this much later (`x-app-delay-ms`).
    pub app_delay: Option<Duration>,
}

/// One stream of requests in a workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// The client host index.
    pub client: usize,
    /// The destination authority.
    pub authority: String,
    /// Requests per second (open loop, evenly spaced with seeded jitter).
    pub rate: u32,
    /// First request time.
    pub start: Duration,
    /// No request is planned at or after this time.
    pub end: Duration,
    /// Protocols used, in seeded random proportion (equal weights).
    pub protos: Vec<Proto>,
    /// Probability of POST, in percent.
    pub post_percent: u64,
    /// Body sizes (request for POST, response otherwise), picked at random; 0 = small.
    pub body_bytes: Vec<u64>,
    /// Deadline per request.
    pub deadline: Duration,
    /// Slow reader pause, if any.
    pub read_pause: Option<Duration>,
    /// Paths, picked at random per request (empty: the protocol's default path).
    pub paths: Vec<String>,
    /// A deadline every request announces in `grpc-timeout`.
    pub grpc_timeout: Option<Duration>,
    /// How much later the app answers each request.
    pub app_delay: Option<Duration>,
}

impl Flow {
    /// A flow of small HTTP/1.1 GETs.
    #[must_use]
    pub fn new(client: usize, authority: &str, rate: u32, start: Duration, end: Duration) -> Self {
        Self {
            client,
            authority: authority.to_owned(),
            rate,
            start,
            end,
            protos: vec![Proto::Http1],
            post_percent: 0,
            body_bytes: vec![0],
            deadline: Duration::from_secs(10),
            read_pause: None,
            paths: Vec::new(),
            grpc_timeout: None,
            app_delay: None,
        }
    }
}

/// The whole schedule of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Requests, sorted by time then id.
    pub requests: Vec<PlannedRequest>,
}

impl Workload {
    /// Plans `flows` with draws from `rng`.
    #[must_use]
    pub fn plan(flows: &[Flow], rng: &mut DetRng) -> Self {
        let mut requests = Vec::new();
        let mut id = 1u64;
        for flow in flows {
            let mut rng = rng.child(&format!("flow/{}/{}", flow.client, flow.authority));
            if flow.rate == 0 {
                continue;
            }
            let interval_us = 1_000_000 / u64::from(flow.rate);
            let mut t = micros(flow.start);
            while t < micros(flow.end) {
                let jitter = rng.below(interval_us.max(1));
                let at = Duration::from_micros(t + jitter);
                let proto = flow.protos[pick(&mut rng, flow.protos.len())];
                let post = proto != Proto::Grpc && rng.chance(flow.post_percent, 100);
                let body = flow.body_bytes[pick(&mut rng, flow.body_bytes.len())];
                // Drawn only when there is a choice, so flows without paths keep their draws.
                let path = match flow.paths.len() {
                    0 => None,
                    1 => Some(flow.paths[0].clone()),
                    n => Some(flow.paths[pick(&mut rng, n)].clone()),
                };
                let (request_bytes, response_bytes) = match (post, proto) {
                    (_, Proto::Grpc) => (0, 0),
                    (true, _) => (body, 0),
                    (false, _) => (0, body),
                };
                requests.push(PlannedRequest {
                    id,
                    client: flow.client,
                    at,
                    authority: flow.authority.clone(),
                    proto,
                    post,
                    request_bytes,
                    response_bytes,
                    deadline: flow.deadline,
                    read_pause: flow.read_pause,
                    path,
                    grpc_timeout: flow.grpc_timeout,
                    app_delay: flow.app_delay,
                });
                id += 1;
                t += interval_us;
            }
        }
        requests.sort_by_key(|r| (r.at, r.id));
        Self { requests }
    }

    /// The requests client `client` sends.
    #[must_use]
    pub fn for_client(&self, client: usize) -> Vec<PlannedRequest> {
        self.requests
            .iter()
            .filter(|r| r.client == client)
            .cloned()
            .collect()
    }
}

fn pick(rng: &mut DetRng, len: usize) -> usize {
    usize::try_from(rng.below(len as u64)).unwrap_or(0)
}

type ClientBody = BoxBody<Bytes, std::io::Error>;

/// A client's connections to its proxy.
#[derive(Debug)]
struct Conns {
    proxy: SocketAddr,
    idle_h1: Mutex<Vec<http1::SendRequest<ClientBody>>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<ClientBody>>>,
}

/// Sends `requests` (sorted by time) to the proxy at `proxy`, recording each outcome; returns
/// when every request has ended.
pub async fn run_client(proxy: SocketAddr, requests: Vec<PlannedRequest>, recorder: Recorder) {
    let conns = Arc::new(Conns {
        proxy,
        idle_h1: Mutex::default(),
        h2: tokio::sync::Mutex::new(None),
    });
    let mut tasks = Vec::with_capacity(requests.len());
    for planned in requests {
        let due = planned.at;
        let now = turmoil::sim_elapsed().unwrap_or_default();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let conns = Arc::clone(&conns);
        let recorder = recorder.clone();
        tasks.push(tokio::spawn(async move {
            let record = send(&conns, &planned).await;
            recorder.with(|t| t.requests.push(record));
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

async fn send(conns: &Conns, planned: &PlannedRequest) -> RequestRecord {
    let start_us = now_us();
    let stage = Arc::new(Mutex::new("connect"));
    let mut headers_us = None;
    let attempt = exchange(conns, planned, &stage, &mut headers_us);
    let outcome = match tokio::time::timeout(planned.deadline, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::DeadlineExceeded {
            stage: (*stage
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner))
            .to_owned(),
        },
    };
    RequestRecord {
        id: planned.id,
        client: planned.client,
        authority: planned.authority.clone(),
        proto: planned.proto,
        method: method(planned).as_str().to_owned(),
        path: path(planned).to_owned(),
        request_bytes: planned.request_bytes,
        start_us,
        headers_us,
        end_us: now_us(),
        deadline_us: micros(planned.deadline),
        outcome,
        picks: Vec::new(),
    }
}

fn set(stage: &Mutex<&'static str>, value: &'static str) {
    *stage
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = value;
}

fn request_body(planned: &PlannedRequest) -> ClientBody {
    if planned.proto == Proto::Grpc {
        let message = format!("r{}", planned.id);
        let mut framed = vec![0u8];
        framed.extend_from_slice(&u32::try_from(message.len()).unwrap_or(0).to_be_bytes());
        framed.extend_from_slice(message.as_bytes());
        return Full::new(Bytes::from(framed))
            .map_err(|never| match never {})
            .boxed();
    }
    let total = planned.request_bytes;
    if total == 0 {
        return Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed();
    }
    let stream = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent >= total {
            return None;
        }
        let n = (total - sent).min(CHUNK_BYTES as u64);
        let chunk: Vec<u8> = (sent..sent + n).map(pattern_byte).collect();
        Some((Ok(Frame::data(Bytes::from(chunk))), sent + n))
    });
    StreamBody::new(stream).boxed()
}

/// The request's method: gRPC calls are POSTs.
fn method(planned: &PlannedRequest) -> Method {
    if planned.post || planned.proto == Proto::Grpc {
        Method::POST
    } else {
        Method::GET
    }
}

/// The request's path.
fn path(planned: &PlannedRequest) -> &str {
    match (&planned.path, planned.proto) {
        (Some(path), _) => path,
        (None, Proto::Grpc) => "/echo.Echo/Say",
        (None, _) => "/echo",
    }
}

fn build_request(planned: &PlannedRequest) -> Request<ClientBody> {
    let path = path(planned);
    let mut builder = Request::builder().method(method(planned));
    builder = match planned.proto {
        Proto::Http1 => builder.uri(path).header("host", planned.authority.as_str()),
        Proto::Http2 => builder.uri(format!("http://{}{path}", planned.authority)),
        Proto::Grpc => builder
            .uri(format!("http://{}{path}", planned.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers"),
    };
    builder = builder.header("x-request-id", planned.id);
    if let Some(timeout) = planned.grpc_timeout {
        builder = builder.header(
            "grpc-timeout",
            conduit_core::timeout::encode_grpc_timeout(timeout).as_str(),
        );
    }
    if let Some(delay) = planned.app_delay {
        builder = builder.header("x-app-delay-ms", delay.as_millis().to_string());
    }
    if planned.response_bytes > 0 {
        builder = builder.header("x-response-bytes", planned.response_bytes);
    }
    if planned.request_bytes > 0 && planned.proto == Proto::Http1 {
        builder = builder.header("content-length", planned.request_bytes);
    }
    let mut request = builder
        .body(request_body(planned))
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new()).map_err(|n| match n {}).boxed()));
    if planned.proto == Proto::Http2 {
        *request.version_mut() = http::Version::HTTP_2;
    }
    if planned.proto == Proto::Grpc {
        *request.version_mut() = http::Version::HTTP_2;
    }
    request
}

async fn exchange(
    conns: &Conns,
    planned: &PlannedRequest,
    stage: &Mutex<&'static str>,
    headers_us: &mut Option<u64>,
) -> Outcome {
    let request = build_request(planned);
    let response = match planned.proto {
        Proto::Http1 => {
            let mut sender = match take_h1(conns).await {
                Ok(sender) => sender,
                Err(outcome) => return outcome,
            };
            set(stage, "headers");
            match sender.send_request(request).await {
                Ok(response) => Ok((response, Some(sender))),
                Err(err) => Err(transport("send", &err)),
            }
        }
        Proto::Http2 | Proto::Grpc => {
            let mut sender = match take_h2(conns).await {
                Ok(sender) => sender,
                Err(outcome) => return outcome,
            };
            set(stage, "headers");
            match sender.send_request(request).await {
                Ok(response) => Ok((response, None)),
                Err(err) => Err(transport("send", &err)),
            }
        }
    };
    let (response, h1) = match response {
        Ok(ok) => ok,
        Err(outcome) => return outcome,
    };
    *headers_us = Some(now_us());
    set(stage, "body");
    let outcome = read_response(response, planned).await;
    if let Some(sender) = h1
        && sender.is_ready()
    {
        conns
            .idle_h1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(sender);
    }
    outcome
}

fn transport(stage: &str, err: &dyn std::fmt::Display) -> Outcome {
    Outcome::TransportError {
        stage: stage.to_owned(),
        message: err.to_string(),
    }
}

async fn take_h1(conns: &Conns) -> Result<http1::SendRequest<ClientBody>, Outcome> {
    loop {
        let idle = conns
            .idle_h1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        match idle {
            Some(mut sender) => {
                if sender.ready().await.is_ok() {
                    return Ok(sender);
                }
            }
            None => break,
        }
    }
    let io = SimStream::connect(conns.proxy)
        .await
        .map_err(|err| transport("connect", &err))?;
    let (sender, connection) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|err| transport("handshake", &err))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn take_h2(conns: &Conns) -> Result<http2::SendRequest<ClientBody>, Outcome> {
    let mut slot = conns.h2.lock().await;
    if let Some(sender) = slot.as_ref()
        && !sender.is_closed()
    {
        return Ok(sender.clone());
    }
    *slot = None;
    let io = SimStream::connect(conns.proxy)
        .await
        .map_err(|err| transport("connect", &err))?;
    let (sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(io))
        .await
        .map_err(|err| transport("handshake", &err))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    *slot = Some(sender.clone());
    Ok(sender)
}

async fn read_response(response: hyper::Response<Incoming>, planned: &PlannedRequest) -> Outcome {
    let text = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let status = response.status().as_u16();
    let served_by = text("x-served-by");
    let echoed_id = text("x-request-id");
    let proxy_error = text(conduit_proxy::errors::respond::PROXY_ERROR_HEADER);
    let mut grpc_status = text("grpc-status").and_then(|s| s.parse().ok());
    let mut body = response.into_body();
    let mut bytes: Vec<u8> = Vec::new();
    let mut body_bytes = 0u64;
    let mut pattern_ok = true;
    let mut body_error = None;
    let keep = planned.response_bytes == 0;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(err)) => {
                body_error = Some(err.to_string());
                break;
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if keep {
                        bytes.extend_from_slice(data);
                    } else {
                        for (i, b) in data.iter().enumerate() {
                            if *b != pattern_byte(body_bytes + i as u64) {
                                pattern_ok = false;
                            }
                        }
                    }
                    body_bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(code) = trailers.get("grpc-status")
                {
                    grpc_status = code.to_str().ok().and_then(|s| s.parse().ok());
                }
                if let Some(pause) = planned.read_pause {
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
    let body_ok = match (&served_by, proxy_error.is_some()) {
        // A proxy-made response: nothing of the backend's to verify.
        (None, true) => true,
        (None, false) => false,
        (Some(host), _) => {
            let line = format!("{host} r{}", planned.id);
            match planned.proto {
                Proto::Grpc => bytes.len() >= 5 && bytes[5..] == *line.as_bytes(),
                _ if planned.response_bytes > 0 => {
                    pattern_ok && body_bytes == planned.response_bytes
                }
                _ => bytes == format!("{line}\n").as_bytes(),
            }
        }
    };
    Outcome::Response {
        status,
        served_by,
        echoed_id,
        proxy_error,
        grpc_status,
        body_bytes,
        body_ok,
        body_error,
    }
}
