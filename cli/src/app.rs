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
use hyper_util::rt::TokioIo;
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
}

/// Serves the demo app on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, behaviour: AppBehaviour) {
    let behaviour = Arc::new(behaviour);
    let rng = Arc::new(Mutex::new(DetRng::new(behaviour.seed)));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let behaviour = Arc::clone(&behaviour);
        let rng = Arc::clone(&rng);
        tokio::spawn(async move {
            let service = service_fn(move |_request: http::Request<hyper::body::Incoming>| {
                let behaviour = Arc::clone(&behaviour);
                let fail = rng
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

/// Serves `200 hello world\n` to every request, as fast as possible (benchmark backend).
pub async fn serve_hello(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_request: http::Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                    b"hello world\n",
                ))))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
