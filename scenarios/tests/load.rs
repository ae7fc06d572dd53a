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
