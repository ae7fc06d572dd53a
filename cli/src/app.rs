//! The demo workload: a small HTTP service whose latency and failure share are set per replica.
//!
//! It stands in for a user's app behind a sidecar. Each replica answers every request after its
//! configured latency with `200 <service> <replica>`, except a configured share of requests,
//! which get a `500`. Failures are drawn from a seeded [`DetRng`], so a replica fails the same
//! requests on every run.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use conduit_core::rand::{DetRng, Rng};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// How one demo replica behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppBehaviour {
    /// The service the replica belongs to (echoed in responses).
    pub service: String,
    /// The replica's index within its service.
    pub replica: usize,
    /// How long it takes to answer.
    pub latency: Duration,
    /// Failures per thousand requests (0..=1000).
    pub failures_per_mille: u64,
    /// Seed for the failure draws.
    pub seed: u64,
    /// A recurring outage: every request fails while it lasts.
    pub outage: Option<Outage>,
}

/// A recurring outage of a demo replica: the last `lasts` of every `every` (counted from the
/// replica's start), every request fails; then it heals until the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outage {
    /// The cycle.
    pub every: Duration,
    /// How long each outage lasts, at the end of each cycle.
    pub lasts: Duration,
}

impl Outage {
    /// Whether the replica is down `elapsed` after its start.
    #[must_use]
    pub fn down(&self, elapsed: Duration) -> bool {
        let every = self.every.as_nanos().max(1);
        let into = elapsed.as_nanos() % every;
        into >= every.saturating_sub(self.lasts.as_nanos())
    }
}

/// Serves the demo app on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, behaviour: AppBehaviour) {
    let behaviour = Arc::new(behaviour);
    let rng = Arc::new(Mutex::new(DetRng::new(behaviour.seed)));
    let clock = conduit_proxy::clock::Clock::new();
    let started = clock.now();
    loop {
        let (stream, _) = crate::accept::accept(&listener).await;
        let _ = stream.set_nodelay(true);
        let behaviour = Arc::clone(&behaviour);
        let rng = Arc::clone(&rng);
        tokio::spawn(async move {
            let service = service_fn(move |_request: http::Request<hyper::body::Incoming>| {
                let behaviour = Arc::clone(&behaviour);
                let down = behaviour.outage.is_some_and(|outage| {
                    outage.down(clock.now().saturating_duration_since(started))
                });
                let fail = down
                    || rng
                        .lock()
                        .map(|mut rng| rng.chance(behaviour.failures_per_mille, 1000))
                        .unwrap_or(false);
                async move {
                    tokio::time::sleep(behaviour.latency).await;
                    let (status, text) = if fail {
                        (http::StatusCode::INTERNAL_SERVER_ERROR, "injected failure")
                    } else {
                        (http::StatusCode::OK, "ok")
                    };
                    let body = format!("{} {} {text}\n", behaviour.service, behaviour.replica);
                    let mut response = http::Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds `addr` and serves the demo app there.
///
/// # Errors
///
/// The bind error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `200 hello world\n` to every request, as fast as possible (benchmark backend); a
/// gRPC call (`content-type: application/grpc`) gets a unary answer: an empty message and
/// `grpc-status: 0` in the trailers.
///
/// HTTP/1.1 and h2 with prior knowledge share the port: each accepted connection is peeked
/// once for the HTTP/2 connection preface and served by hyper's http2 server if it starts
/// with it, by its http1 server otherwise (one `recv(MSG_PEEK)` per connection, nothing per
/// request).
pub async fn serve_hello(listener: TcpListener) {
    loop {
        let (stream, _) = crate::accept::accept(&listener).await;
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                let grpc = request
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                Ok::<_, Infallible>(if grpc {
                    grpc_ok()
                } else {
                    http::Response::new(HelloBody::Hello(Some(Bytes::from_static(
                        b"hello world\n",
                    ))))
                })
            });
            if starts_with_h2_preface(&stream).await {
                // A connection that ends in error is logged: a proxy that trips hyper's
                // defences (too many streams reset before they were served, say) shows here.
                if let Err(err) = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::warn!(error = %err, "h2 connection ended in error");
                }
                return;
            }
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The hello server's bodies: the greeting, or a gRPC answer (one empty message, then the
/// trailers).
enum HelloBody {
    Hello(Option<Bytes>),
    Grpc(Option<Bytes>, Option<http::HeaderMap>),
}

/// A unary gRPC success: one empty length-prefixed message, `grpc-status: 0`.
fn grpc_ok() -> http::Response<HelloBody> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let mut response = http::Response::new(HelloBody::Grpc(
        Some(Bytes::from_static(&[0, 0, 0, 0, 0])),
        Some(trailers),
    ));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

impl http_body::Body for HelloBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        let frame = match self.get_mut() {
            Self::Hello(data) => data.take().map(http_body::Frame::data),
            Self::Grpc(data, trailers) => match data.take() {
                Some(data) => Some(http_body::Frame::data(data)),
                None => trailers.take().map(http_body::Frame::trailers),
            },
        };
        std::task::Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hello(data) => data.is_none(),
            Self::Grpc(data, trailers) => data.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Hello(Some(data)) => http_body::SizeHint::with_exact(data.len() as u64),
            Self::Hello(None) => http_body::SizeHint::with_exact(0),
            Self::Grpc(..) => http_body::SizeHint::default(),
        }
    }
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a connection may hold an incomplete preface before it is served as HTTP/1 (which
/// answers the garbage with an error).
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the connection's first bytes are the HTTP/2 preface, read without consuming them.
/// Decided by the first byte that differs; a peer closing or failing before that is left to
/// the HTTP/1 server to notice.
async fn starts_with_h2_preface(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; H2_PREFACE.len()];
    let peek = async {
        loop {
            let n = stream.peek(&mut buf).await.unwrap_or(0);
            if n == 0 || buf[..n] != H2_PREFACE[..n] {
                return false;
            }
            if n == H2_PREFACE.len() {
                return true;
            }
            // A partial preface (clients send it in one write, so this is rare): peeking again
            // would return the same bytes at once, so wait a little for the rest.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(PREFACE_TIMEOUT, peek)
        .await
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_covers_the_end_of_every_cycle() {
        let outage = Outage {
            every: Duration::from_secs(30),
            lasts: Duration::from_secs(5),
        };
        let down = |s: u64| outage.down(Duration::from_millis(s));
        assert!(!down(0) && !down(24_999));
        assert!(down(25_000) && down(29_999));
        assert!(!down(30_000) && down(55_000) && !down(60_001));
    }

    /// Writes `chunks` to a hello server, pausing between them so they arrive as separate
    /// segments, and returns the first 9 bytes of its answer.
    async fn first_answer(chunks: &[&[u8]]) -> Vec<u8> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_hello(listener));
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        for chunk in chunks {
            let mut rest = *chunk;
            while !rest.is_empty() {
                stream.writable().await.unwrap();
                if let Ok(n) = stream.try_write(rest) {
                    rest = &rest[n..];
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut answer = vec![0u8; 9];
        let mut filled = 0;
        let read = async {
            while filled < answer.len() {
                stream.readable().await.unwrap();
                match stream.try_read(&mut answer[filled..]) {
                    Ok(0) => panic!("closed after {filled} bytes"),
                    Ok(n) => filled += n,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(error) => panic!("{error}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .unwrap();
        server.abort();
        answer
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hello_speaks_http1() {
        let answer = first_answer(&[b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n"]).await;
        assert_eq!(&answer, b"HTTP/1.1 ");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hello_speaks_h2_prior_knowledge_even_from_a_split_preface() {
        // The preface in two writes, then an empty SETTINGS frame: an h2 server answers with
        // its own SETTINGS frame (type 4, the frame header's fourth byte).
        let answer = first_answer(&[
            b"PRI * HTTP/2.0\r\n",
            b"\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        ])
        .await;
        assert_eq!(answer[3], 4, "{answer:?}");
    }
}
