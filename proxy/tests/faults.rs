//! Failure injection (a route's `fault` policy), over both HTTP engines (HTTP/1.1 and h2c):
//! what a caller sees (the policy's status, or gRPC code, with the proxy's error header saying
//! it was injected), what the app sees (an aborted request never reaches it; a delayed one
//! does), and the route's `route_fault_injections_total`.
//!
//! Real loopback sockets. Shares are 100 % (or the route has none), so every count is exact.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup or request is the report"
)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, StatusCode};
use hyper::body::Incoming;
use support::*;

const PROFILE: &str = r#"
    profile:
      routes:
        - name: aborted
          match: { path: { prefix: /aborted } }
          fault: { abort: { status: 503, percent: 100 } }
        - name: teapot
          match: { path: { prefix: /teapot } }
          fault: { abort: { status: 418, grpc: 8, percent: 100 } }
        - name: delayed
          match: { path: { prefix: /delayed } }
          fault: { delay: { duration: 20ms, percent: 100 } }
        - name: too-slow
          match: { path: { prefix: /too-slow } }
          timeouts: { request: 50ms }
          fault: { delay: { duration: 10s, percent: 100 } }
"#;

/// An app that counts the requests reaching it and answers 200.
async fn app(h2: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&seen);
    let addr = backend(h2, move |_request: Request<Incoming>| {
        count.fetch_add(1, Ordering::Relaxed);
        async move { http::Response::new(full("ok")) }
    })
    .await;
    (addr, seen)
}

fn mesh_with_profile(app: SocketAddr) -> conduit_core::mesh::Mesh {
    let yaml = format!(
        "services:\n  web.test:\n    port: 80\n    endpoints:\n      - addr: {app}\n{PROFILE}"
    );
    conduit_proto::mesh_file::parse(&yaml).unwrap()
}

async fn send(
    engine: Engine,
    addr: SocketAddr,
    path: &str,
    grpc: bool,
) -> http::Response<Incoming> {
    let mut builder = Request::builder();
    builder = match engine {
        Engine::H1 => builder.uri(path).header("host", "web.test"),
        Engine::H2 => builder.uri(format!("http://web.test{path}")),
    };
    if grpc {
        builder = builder.header("content-type", "application/grpc");
    }
    let request = builder.body(full("")).unwrap();
    match engine {
        Engine::H1 => h1_client(addr).await.send_request(request).await.unwrap(),
        Engine::H2 => h2_client(addr).await.send_request(request).await.unwrap(),
    }
}

fn injections(metrics: &str, route: &str, fault: &str) -> Option<u64> {
    sample(
        metrics,
        &format!(
            "route_fault_injections_total{{direction=\"outbound\",authority=\"web.test:80\",route=\"{route}\",fault=\"{fault}\"}}"
        ),
    )
}

#[tokio::test]
async fn an_aborted_request_gets_the_policy_s_answer_and_never_reaches_the_app() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine == Engine::H2).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(app)).await;
            let response = send(engine, proxy.addrs.outbound, "/aborted/a", false).await;
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{engine:?}");
            let reason = response.headers()["conduit-proxy-error"].to_str().unwrap().to_owned();
            assert!(reason.contains("fault injected"), "{engine:?}: {reason}");
            let response = send(engine, proxy.addrs.outbound, "/teapot", false).await;
            assert_eq!(response.status(), StatusCode::IM_A_TEAPOT, "{engine:?}");
            assert_eq!(seen.load(Ordering::Relaxed), 0, "{engine:?}: the app saw an aborted request");
            // The route's other requests, and other routes, are left alone.
            let response = send(engine, proxy.addrs.outbound, "/plain", false).await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert_eq!(seen.load(Ordering::Relaxed), 1, "{engine:?}");
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(injections(&metrics, "aborted", "abort"), Some(1), "{engine:?}\n{metrics}");
            assert_eq!(injections(&metrics, "teapot", "abort"), Some(1), "{engine:?}\n{metrics}");
            // The caller's answers are counted as the route's responses, failures included.
            assert_eq!(
                sample(
                    &metrics,
                    "route_response_total{direction=\"outbound\",authority=\"web.test:80\",route=\"aborted\",status_code=\"503\",classification=\"failure\"}"
                ),
                Some(1),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_grpc_request_gets_the_policy_s_grpc_code() {
    bounded(async {
        let (app, seen) = app(true).await;
        let proxy = TestProxy::start(config(), mesh_with_profile(app)).await;
        for (path, code) in [("/aborted", "14"), ("/teapot", "8")] {
            let response = send(Engine::H2, proxy.addrs.outbound, path, true).await;
            assert_eq!(
                response.status(),
                StatusCode::OK,
                "{path}: trailers-only gRPC"
            );
            assert_eq!(response.headers()["grpc-status"], code, "{path}");
        }
        assert_eq!(seen.load(Ordering::Relaxed), 0);
    })
    .await;
}

#[tokio::test]
async fn a_delayed_request_still_arrives_and_a_deadline_cuts_the_delay_short() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine == Engine::H2).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(app)).await;
            let response = send(engine, proxy.addrs.outbound, "/delayed", false).await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert_eq!(seen.load(Ordering::Relaxed), 1, "{engine:?}");
            // A 10 s delay on a route with a 50 ms request timeout: the caller gets the
            // timeout, not a 10 s wait, and the app never sees the request.
            let response = send(engine, proxy.addrs.outbound, "/too-slow", false).await;
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{engine:?}");
            assert_eq!(seen.load(Ordering::Relaxed), 1, "{engine:?}");
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(
                injections(&metrics, "delayed", "delay"),
                Some(1),
                "{engine:?}\n{metrics}"
            );
            assert_eq!(
                injections(&metrics, "too-slow", "delay"),
                Some(1),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}
