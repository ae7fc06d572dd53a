//! The load generator against a real server on loopback: every scheduled request ends in a
//! response or a counted error, and statuses are attributed to their targets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use conduit_proxy::TokioNet;
use conduit_proxy::clock::Clock;
use conduit_scenarios::load::{self, LoadConfig, LoadError, Target};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// Answers 200, or 503 for paths starting with `/fail`.
async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let status = if req.uri().path().starts_with("/fail") {
                    503
                } else {
                    200
                };
                let response = http::Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::from_static(b"hello\n")))
                    .expect("a static response is valid");
                Ok::<_, Infallible>(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[tokio::test(flavor = "current_thread")]
async fn every_request_is_accounted_for() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener));
    let config = LoadConfig {
        rate: 1000,
        duration: Duration::from_millis(200),
        connections: 4,
        timeout: Duration::from_secs(5),
        targets: vec![
            Target {
                authority: "web".into(),
                path: "/ok".into(),
                method: http::Method::GET,
            },
            Target {
                authority: "web".into(),
                path: "/fail".into(),
                method: http::Method::GET,
            },
        ],
        arrivals: load::Arrivals::Constant,
        protocol: load::Protocol::Http1,
        spin_wait: true,
    };
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        load::run(TokioNet, addr, config, Clock::new()),
    )
    .await
    .expect("the run ends")
    .unwrap();
    assert_eq!(report.scheduled, 200);
    let ok = &report.targets[&("web".to_string(), "/ok".to_string())];
    let fail = &report.targets[&("web".to_string(), "/fail".to_string())];
    assert_eq!(ok.statuses.get(&200), Some(&100));
    assert_eq!(fail.statuses.get(&503), Some(&100));
    assert_eq!(report.overall().total(), 200);
    assert_eq!(report.overall().success_rate(), Some(0.5));
    assert_eq!(ok.latency.count(), 100);
    assert_eq!(
        report.latencies.len(),
        200,
        "every response's exact latency is kept"
    );
    assert!(report.quantile(0.5) <= report.quantile(0.99));
}

#[tokio::test(flavor = "current_thread")]
async fn a_dead_server_gives_connect_errors_not_silence() {
    // Bind and drop to find a port nothing listens on.
    let addr: SocketAddr = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let config = LoadConfig {
        rate: 500,
        duration: Duration::from_millis(100),
        connections: 2,
        timeout: Duration::from_secs(5),
        targets: vec![Target {
            authority: "web".into(),
            path: "/".into(),
            method: http::Method::GET,
        }],
        arrivals: load::Arrivals::Constant,
        protocol: load::Protocol::Http1,
        spin_wait: false,
    };
    let report = tokio::time::timeout(
        Duration::from_secs(30),
        load::run(TokioNet, addr, config, Clock::new()),
    )
    .await
    .expect("the run ends")
    .unwrap();
    let overall = report.overall();
    assert_eq!(overall.total(), 50);
    assert_eq!(overall.errors.get(&LoadError::Connect), Some(&50));
}

/// An h2c server: `hello` for plain requests; for gRPC calls, one message and
/// `grpc-status: 0` on `/ok.Service/Call`, `grpc-status: 14` (UNAVAILABLE) elsewhere.
async fn serve_h2(listener: tokio::net::TcpListener) {
    use http_body_util::BodyExt as _;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let grpc = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                let ok = req.uri().path() == "/ok.Service/Call";
                let body = if grpc {
                    let mut trailers = http::HeaderMap::new();
                    let code = if ok { "0" } else { "14" };
                    trailers.insert("grpc-status", http::HeaderValue::from_static(code));
                    let frames = vec![
                        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from_static(&[
                            0, 0, 0, 0, 0,
                        ]))),
                        Ok(hyper::body::Frame::trailers(trailers)),
                    ];
                    http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
                } else {
                    Full::new(Bytes::from_static(b"hello\n")).boxed()
                };
                Ok::<_, Infallible>(http::Response::new(body))
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn h2_config(protocol: load::Protocol, paths: &[&str]) -> LoadConfig {
    LoadConfig {
        rate: 400,
        duration: Duration::from_millis(500),
        connections: 4,
        timeout: Duration::from_secs(2),
        targets: paths
            .iter()
            .map(|path| Target {
                authority: "hello".into(),
                path: (*path).into(),
                method: http::Method::GET,
            })
            .collect(),
        arrivals: load::Arrivals::Poisson { seed: 3 },
        protocol,
        spin_wait: true,
    }
}

/// Runs the h2 configuration for `protocol` and `paths` against `addr`.
async fn run_h2(
    addr: SocketAddr,
    protocol: load::Protocol,
    paths: &[&str],
) -> Result<load::LoadReport, load::InvalidLoad> {
    load::run(TokioNet, addr, h2_config(protocol, paths), Clock::new()).await
}

#[tokio::test(flavor = "current_thread")]
async fn h2_and_grpc_requests_are_accounted_for() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve_h2(listener));
    let h2 = run_h2(addr, load::Protocol::H2, &["/"]).await.unwrap();
    let overall = h2.overall();
    assert_eq!(h2.scheduled, 200);
    assert_eq!(overall.statuses.get(&200), Some(&200), "{overall:?}");
    assert_eq!(h2.latencies.len(), 200);

    let grpc = run_h2(
        addr,
        load::Protocol::Grpc,
        &["/ok.Service/Call", "/down.Service/Call"],
    )
    .await
    .unwrap();
    server.abort();
    let ok = &grpc.targets[&("hello".to_string(), "/ok.Service/Call".to_string())];
    let down = &grpc.targets[&("hello".to_string(), "/down.Service/Call".to_string())];
    assert_eq!(ok.statuses.get(&200), Some(&100), "{ok:?}");
    assert_eq!(
        down.errors.get(&LoadError::Grpc),
        Some(&100),
        "a call without grpc-status 0 fails: {down:?}"
    );
    assert_eq!(grpc.overall().success_rate(), Some(0.5));
}

#[tokio::test(flavor = "current_thread")]
async fn h2_load_counts_refused_connections_and_refuses_bad_targets() {
    // A port nobody listens on: bind, note the address, close.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let report = run_h2(addr, load::Protocol::H2, &["/"]).await.unwrap();
    let overall = report.overall();
    assert_eq!(overall.total(), 200);
    assert_eq!(overall.errors.get(&LoadError::Connect), Some(&200));
    assert!(report.latencies.is_empty());
    let bad = run_h2(addr, load::Protocol::Grpc, &["no slash"])
        .await
        .unwrap_err();
    assert!(matches!(bad, load::InvalidLoad::Uri(_)), "{bad}");
}
