//! The backend app each service replica runs: an HTTP/1.1 + h2c server that echoes its
//! identity, so the checkers can verify routing from the client's side alone.
//!
//! Every response carries `x-served-by` (the replica's host name), `x-service` and the
//! request's `x-request-id`; the body is `"<host> r<id>\n"`, or, when the request asks for
//! `x-response-bytes: N`, N bytes of a fixed pattern streamed in chunks across many ticks. gRPC
//! requests (`content-type: application/grpc`) get one length-prefixed message
//! `"<host> r<id>"` and `grpc-status: 0` in trailers. Every arrival is recorded in the trace
//! before anything else happens, so at-most-once can be checked.
//!
//! The harness changes an app's behaviour while it runs through its [`AppControl`]: extra
//! latency (a slow replica), a stall (a replica that accepts requests and never answers), or
//! failure (a replica that answers every request with a 500, its identity headers intact, or a
//! share of them with a status or a reset), a close race (a replica that closes a kept-alive
//! HTTP/1.1 connection, without saying so, right after a response: the next request written
//! to it is never read), or a capacity (requests served at once and each one's service time,
//! for red-line searches).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::trace::{Arrival, Recorder, now_us};

/// The port every app listens on (its proxy's `app_addr` is `127.0.0.1:APP_PORT`).
pub const APP_PORT: u16 = 8080;

/// Response bodies are streamed in chunks of this size.
pub const CHUNK_BYTES: usize = 16 * 1024;

/// The pause between streamed chunks, so a large body spans many ticks.
pub const CHUNK_PAUSE: Duration = Duration::from_millis(1);

/// How often a stalled app looks whether it was released.
const STALL_POLL: Duration = Duration::from_millis(10);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The byte at offset `i` of every streamed body (and request upload).
#[must_use]
pub fn pattern_byte(i: u64) -> u8 {
    // 251 is prime, so chunk boundaries never line up with the pattern's period.
    u8::try_from(i % 251).unwrap_or(0)
}

/// Knobs the harness turns on a running app.
#[derive(Debug, Default)]
pub struct AppControl {
    delay_us: AtomicU64,
    /// The tail: per mille of arrivals (high 32 bits) and their extra delay in ms (low 32).
    tail: AtomicU64,
    /// Arrivals so far, numbering each for the tail's draw.
    arrivals: AtomicU64,
    stalled: AtomicBool,
    failing: AtomicBool,
    /// A share of failures: per mille (high 32 bits) and the [`Failure`] (low 32: 0 a reset,
    /// else the status).
    failures: AtomicU64,
    /// Arrivals drawn for `failures` so far.
    failure_draws: AtomicU64,
    /// Per mille of HTTP/1.1 responses after which the app closes the connection.
    close_race: AtomicU64,
    /// Responses drawn for `close_race` so far.
    close_draws: AtomicU64,
    /// The capacity model: at most this many requests are served at once (the rest wait in
    /// arrival order), each taking the service time. `None`: unlimited and instant.
    capacity: std::sync::Mutex<Option<(Arc<tokio::sync::Semaphore>, Duration)>>,
}

impl AppControl {
    /// Every response waits this long before its headers.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us
            .store(crate::trace::micros(delay), Ordering::Relaxed);
    }

    /// `permille` of the requests arriving from now on wait `delay` more (whole milliseconds).
    pub fn set_tail(&self, permille: u32, delay: Duration) {
        let ms = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
        self.tail
            .store(u64::from(permille) << 32 | u64::from(ms), Ordering::Relaxed);
    }

    /// The extra delay of the next arrival: drawn from its number (a fixed mix of its bits),
    /// so a run's arrivals in the same order are slowed the same way.
    fn tail_delay(&self) -> Duration {
        let tail = self.tail.load(Ordering::Relaxed);
        let (permille, ms) = (tail >> 32, tail & u64::from(u32::MAX));
        if permille == 0 {
            return Duration::ZERO;
        }
        let n = self.arrivals.fetch_add(1, Ordering::Relaxed);
        if drawn(n, permille) {
            Duration::from_millis(ms)
        } else {
            Duration::ZERO
        }
    }

    /// `permille` of the requests arriving from now on fail as `failure` says (after their
    /// delays); 0 ends it.
    pub fn set_failures(&self, permille: u32, failure: Failure) {
        let kind = match failure {
            Failure::Reset => 0,
            Failure::Status(code) => u64::from(code.max(1)),
        };
        self.failures
            .store(u64::from(permille) << 32 | kind, Ordering::Relaxed);
    }

    /// How the next arrival fails, if it does (drawn from its number, as the tail is).
    fn failure(&self) -> Option<Failure> {
        let packed = self.failures.load(Ordering::Relaxed);
        let (permille, kind) = (packed >> 32, packed & u64::from(u32::MAX));
        if permille == 0 {
            return None;
        }
        let n = self.failure_draws.fetch_add(1, Ordering::Relaxed);
        drawn(n ^ 0x5bd1_e995, permille).then(|| match u16::try_from(kind) {
            Ok(0) | Err(_) => Failure::Reset,
            Ok(code) => Failure::Status(code),
        })
    }

    /// After `permille` of HTTP/1.1 responses from now on, the app closes the connection
    /// without announcing it (no `Connection: close`): whatever the proxy writes to it next is
    /// never read. 0 ends it.
    pub fn set_close_race(&self, permille: u32) {
        self.close_race
            .store(u64::from(permille), Ordering::Relaxed);
    }

    /// Whether to close the connection after this response.
    fn close_after(&self) -> bool {
        let permille = self.close_race.load(Ordering::Relaxed);
        if permille == 0 {
            return false;
        }
        let n = self.close_draws.fetch_add(1, Ordering::Relaxed);
        drawn(n ^ 0x2545_f491, permille)
    }

    /// Models the replica's capacity: at most `concurrency` requests are served at once (later
    /// ones wait their turn, in arrival order), each taking `service_time` before the rest of
    /// its handling (so the replica serves at most `concurrency / service_time` requests per
    /// second). A `concurrency` of 0 removes the model.
    pub fn set_capacity(&self, concurrency: usize, service_time: Duration) {
        let model = (concurrency > 0).then(|| {
            (
                Arc::new(tokio::sync::Semaphore::new(concurrency)),
                service_time,
            )
        });
        *self
            .capacity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = model;
    }

    fn capacity(&self) -> Option<(Arc<tokio::sync::Semaphore>, Duration)> {
        self.capacity
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// While stalled, requests are accepted and recorded but not answered.
    pub fn set_stalled(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::Relaxed);
    }

    /// While failing, every request is answered with a 500 (after any delay or stall).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }

    fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }
}

/// Whether draw `n` falls in the `permille` share: a fixed mix of its bits (SplitMix64's
/// finalizer), so the same sequence of draws picks the same ones.
fn drawn(n: u64, permille: u64) -> bool {
    let mut x = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    x % 1000 < permille
}

/// How a failing replica fails a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// It answers with this status (its identity headers intact).
    Status(u16),
    /// It drops the request without an answer: an HTTP/1.1 connection closes, an h2 stream is
    /// reset.
    Reset,
}

/// Who an app is.
#[derive(Clone, Debug)]
pub struct AppIdentity {
    /// The service authority (`web.default`).
    pub service: String,
    /// The replica's host name (`web-1`).
    pub host: String,
}

type AppBody = BoxBody<Bytes, std::io::Error>;

/// Serves the app on `0.0.0.0:APP_PORT` until the host stops.
///
/// # Errors
///
/// When the port cannot be bound.
pub async fn serve(
    identity: AppIdentity,
    control: Arc<AppControl>,
    recorder: Recorder,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = crate::net::bind(std::net::SocketAddr::from(([0, 0, 0, 0], APP_PORT))).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let identity = identity.clone();
        let control = Arc::clone(&control);
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let _ = connection(stream, identity, control, recorder).await;
        });
    }
}

async fn connection(
    mut stream: turmoil::net::TcpStream,
    identity: AppIdentity,
    control: Arc<AppControl>,
    recorder: Recorder,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Detect h2c prior knowledge from the first bytes, as the proxy does.
    let mut prefix = BytesMut::with_capacity(H2_PREFACE.len());
    let mut byte = [0u8; 1];
    while prefix.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&prefix) {
        if stream.read(&mut byte).await? == 0 {
            return Ok(());
        }
        prefix.extend_from_slice(&byte);
    }
    let h2 = prefix[..] == *H2_PREFACE;
    let closing = Arc::new(AtomicBool::new(false));
    let io = TokioIo::new(RaceIo {
        inner: conduit_proxy::transport::PrefixedIo::new(prefix.freeze(), stream),
        closing: Arc::clone(&closing),
        wrote: false,
    });
    let service = service_fn(move |request| {
        let identity = identity.clone();
        let control = Arc::clone(&control);
        let recorder = recorder.clone();
        let closing = Arc::clone(&closing);
        async move {
            let response = handle(request, identity, &control, recorder).await;
            if response.is_some() && !h2 && control.close_after() {
                closing.store(true, Ordering::Relaxed);
            }
            response.ok_or(Reset)
        }
    });
    if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .auto_date_header(false)
            .max_concurrent_streams(1000)
            .serve_connection(io, service)
            .await?;
    } else {
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .auto_date_header(false)
            .serve_connection(io, service)
            .await?;
    }
    Ok(())
}

fn header<'a>(request: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The error a service returns to drop a request unanswered (hyper closes an HTTP/1.1
/// connection, resets an h2 stream).
#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the app reset the request (a failure the harness asked for)")
    }
}

impl std::error::Error for Reset {}

/// An app connection's IO that, once `closing` is set (after a response the close race picked),
/// reads end-of-file as soon as that response has been written: hyper then closes the
/// connection the proxy still holds as kept alive.
struct RaceIo<T> {
    inner: T,
    closing: Arc<AtomicBool>,
    /// Written since `closing` was set.
    wrote: bool,
}

impl<T: AsyncRead + Unpin> AsyncRead for RaceIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.wrote {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for RaceIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(_))) && self.closing.load(Ordering::Relaxed) {
            self.wrote = true;
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Answers one request; `None` drops it unanswered (a [`Failure::Reset`]).
async fn handle(
    request: Request<Incoming>,
    identity: AppIdentity,
    control: &AppControl,
    recorder: Recorder,
) -> Option<Response<AppBody>> {
    let id_text = header(&request, "x-request-id").map(str::to_owned);
    let id = id_text.as_deref().and_then(|t| t.parse::<u64>().ok());
    let grpc_timeout_us = header(&request, "grpc-timeout")
        .and_then(|t| conduit_core::timeout::parse_grpc_timeout(t.as_bytes()))
        .map(crate::trace::micros);
    recorder.with(|t| {
        t.arrivals.push(Arrival {
            id,
            host: identity.host.clone(),
            service: identity.service.clone(),
            at_us: now_us(),
            grpc_timeout_us,
        });
    });
    // A request may ask to be answered this much later (a slow route of the app).
    let asked_delay = header(&request, "x-app-delay-ms")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_millis);
    let response_bytes: u64 = header(&request, "x-response-bytes")
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let grpc =
        header(&request, "content-type").is_some_and(|ct| ct.starts_with("application/grpc"));

    // Read the whole request body, counting it.
    let mut body = request.into_body();
    let mut received: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    received += data.len() as u64;
                }
            }
            Err(_) => return Some(status(StatusCode::BAD_REQUEST)),
        }
    }

    // Wait for a free slot of the replica's capacity, then take the service time (the slot is
    // held until the response is handed back).
    let _slot = match control.capacity() {
        Some((slots, service_time)) => {
            let slot = slots.acquire_owned().await.ok();
            tokio::time::sleep(service_time).await;
            slot
        }
        None => None,
    };
    let delay = control.delay() + control.tail_delay() + asked_delay.unwrap_or_default();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    while control.stalled() {
        tokio::time::sleep(STALL_POLL).await;
    }

    let id_label = id_text.unwrap_or_default();
    let line = format!("{} r{}", identity.host, id_label);
    let body: AppBody = if grpc {
        let mut message = BytesMut::with_capacity(5 + line.len());
        message.extend_from_slice(&[0]);
        message.extend_from_slice(&u32::try_from(line.len()).unwrap_or(0).to_be_bytes());
        message.extend_from_slice(line.as_bytes());
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(message.freeze())),
            Ok(Frame::trailers(trailers)),
        ];
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    } else if response_bytes > 0 {
        streamed(response_bytes)
    } else {
        Full::new(Bytes::from(format!("{line}\n")))
            .map_err(|never| match never {})
            .boxed()
    };
    let mut response = Response::new(body);
    if control.failing() {
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    }
    match control.failure() {
        Some(Failure::Reset) => return None,
        Some(Failure::Status(code)) => {
            *response.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        }
        None => {}
    }
    let headers = response.headers_mut();
    let value = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("?"));
    headers.insert("x-served-by", value(&identity.host));
    headers.insert("x-service", value(&identity.service));
    headers.insert("x-request-id", value(&id_label));
    headers.insert("x-received-bytes", HeaderValue::from(received));
    if grpc {
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    } else if response_bytes > 0 {
        headers.insert("content-length", HeaderValue::from(response_bytes));
    }
    Some(response)
}

/// `total` bytes of [`pattern_byte`], in chunks with a pause between them.
fn streamed(total: u64) -> AppBody {
    let stream = futures_util::stream::unfold(0u64, move |sent| async move {
        if sent >= total {
            return None;
        }
        if sent > 0 {
            tokio::time::sleep(CHUNK_PAUSE).await;
        }
        let n = (total - sent).min(CHUNK_BYTES as u64);
        let chunk: Vec<u8> = (sent..sent + n).map(pattern_byte).collect();
        Some((Ok(Frame::data(Bytes::from(chunk))), sent + n))
    });
    StreamBody::new(stream).boxed()
}

fn status(code: StatusCode) -> Response<AppBody> {
    let mut response = Response::new(
        Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = code;
    response
}
