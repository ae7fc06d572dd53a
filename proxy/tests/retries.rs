//! Route retries and their budget, over both HTTP engines (HTTP/1.1 and h2c, the upstream
//! speaking what the client spoke): what a caller sees (the retried answer, or the failure
//! when a retry is not allowed), what the app sees (how many times a request reached it, and
//! with which body), and the route's retry metrics.
//!
//! Real loopback sockets. The app fails by script (per path, the first `n` requests), so every
//! count asserted here is exact; budgets are configured so that no refill over time can change
//! them (a zero reserve), and backoffs are a millisecond.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup or request is the report"
)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use support::*;

/// What the app saw: each request's path and body, in arrival order.
type Seen = Arc<Mutex<Vec<(String, Bytes)>>>;

/// The app. A path segment `fail-N` makes its path answer 503 to its first `N` requests;
/// `hang-N`, never answer its first `N`; `grpc-unavailable-N`, answer its first `N` with a
/// trailers-only gRPC `UNAVAILABLE`; a path starting `/always-503` always fails. Otherwise
/// it echoes the request body with 200.
async fn app(engine: Engine) -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let log = Arc::clone(&seen);
    let addr = backend(engine == Engine::H2, move |request: Request<Incoming>| {
        let log = Arc::clone(&log);
        let counts = Arc::clone(&counts);
        async move {
            let path = request.uri().path().to_owned();
            let body = http_body_util::BodyExt::collect(request.into_body())
                .await
                .unwrap()
                .to_bytes();
            log.lock().unwrap().push((path.clone(), body.clone()));
            let n = {
                let mut counts = counts.lock().unwrap();
                let n = counts.entry(path.clone()).or_default();
                *n += 1;
                *n
            };
            let failing = |kind: &str| {
                path.split('/').any(|segment| {
                    segment
                        .strip_prefix(kind)
                        .and_then(|count| count.parse::<u32>().ok())
                        .is_some_and(|count| n <= count)
                })
            };
            if path.starts_with("/always-503") || failing("fail-") {
                let mut response = Response::new(full("unavailable"));
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return response;
            }
            if failing("hang-") {
                std::future::pending::<()>().await;
            }
            if failing("grpc-unavailable-") {
                let mut response = Response::new(full(""));
                let headers = response.headers_mut();
                headers.insert("content-type", "application/grpc".parse().unwrap());
                headers.insert("grpc-status", "14".parse().unwrap());
                return response;
            }
            Response::new(full(body))
        }
    })
    .await;
    (addr, seen)
}

const PROFILE: &str = r#"
    profile:
      routes:
        - name: retried
          match: { path: { prefix: /fail- } }
          retry: { max_attempts: 3, backoff: { min: 1ms, max: 1ms } }
        - name: posts
          match: { method: POST, path: { prefix: /post } }
          retry: { max_attempts: 3, non_idempotent: true, backoff: { min: 1ms, max: 1ms } }
        - name: hung
          match: { path: { prefix: /hang- } }
          timeouts: { request: 10s, attempt: 100ms }
          retry: { max_attempts: 3, backoff: { min: 1ms, max: 1ms } }
        - name: capped
          match: { path: { prefix: /capped } }
          timeouts: { request: 300ms, attempt: 50ms }
          retry: { max_attempts: 10, backoff: { min: 1ms, max: 1ms } }
        - name: grpc
          match: { path: { prefix: /grpc } }
          retry: { max_attempts: 2, non_idempotent: true, backoff: { min: 1ms, max: 1ms } }
        - name: no-budget
          match: { path: { prefix: /always-503/none } }
          retry: { max_attempts: 3, backoff: { min: 1ms, max: 1ms }, budget: { ratio: 0.0, min_per_second: 0 } }
        - name: half-budget
          match: { path: { prefix: /always-503/half } }
          retry: { max_attempts: 3, backoff: { min: 1ms, max: 1ms }, budget: { ratio: 0.5, min_per_second: 0, ttl: 60s } }
        - name: plain
          match: { path: { prefix: /always-503/plain } }
"#;

fn mesh_with_profile(endpoints: &[SocketAddr]) -> conduit_core::mesh::Mesh {
    let mut yaml = String::from("services:\n  web.test:\n    port: 80\n    endpoints:\n");
    for addr in endpoints {
        yaml.push_str(&format!("      - addr: {addr}\n"));
    }
    yaml.push_str(PROFILE);
    conduit_proto::mesh_file::parse(&yaml).unwrap()
}

async fn send(
    engine: Engine,
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    let mut builder = Request::builder().method(method);
    builder = match engine {
        Engine::H1 => builder.uri(path).header("host", "web.test"),
        Engine::H2 => builder.uri(format!("http://web.test{path}")),
    };
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(full(body.into())).unwrap();
    match engine {
        Engine::H1 => h1_client(addr).await.send_request(request).await.unwrap(),
        Engine::H2 => h2_client(addr).await.send_request(request).await.unwrap(),
    }
}

/// The labels every route series of these tests starts with.
fn labels(route: &str) -> String {
    format!("direction=\"outbound\",authority=\"web.test:80\",route=\"{route}\"")
}

fn times_seen(seen: &Seen, path: &str) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == path)
        .count()
}

#[tokio::test]
async fn a_retryable_response_is_retried_and_the_caller_sees_only_the_last() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let response = send(engine, proxy.addrs.outbound, Method::GET, "/fail-2/a", &[], "").await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert_eq!(times_seen(&seen, "/fail-2/a"), 3, "{engine:?}");
            let metrics = scrape(proxy.addrs.admin).await;
            let l = labels("retried");
            for (series, want) in [
                (format!("route_retries_total{{{l},reason=\"http_status\"}}"), 2),
                (format!("route_actual_response_total{{{l},status_code=\"503\",classification=\"failure\"}}"), 2),
                (format!("route_actual_response_total{{{l},status_code=\"200\",classification=\"success\"}}"), 1),
                (format!("route_response_total{{{l},status_code=\"200\",classification=\"success\"}}"), 1),
                (format!("route_request_total{{{l}}}"), 1),
            ] {
                assert_eq!(sample(&metrics, &series), Some(want), "{engine:?} {series}\n{metrics}");
            }
            assert_eq!(
                sample(&metrics, &format!("route_response_total{{{l},status_code=\"503\",classification=\"failure\"}}")),
                None,
                "{engine:?}: the caller never saw a 503\n{metrics}"
            );
            assert_eq!(
                sample(&metrics, "balancer_requests_in_flight{authority=\"web.test:80\"}"),
                Some(0),
                "{engine:?}: discarded attempts released their endpoint\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn attempts_stop_at_the_routes_maximum() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let response = send(
                engine,
                proxy.addrs.outbound,
                Method::GET,
                "/fail-5/a",
                &[],
                "",
            )
            .await;
            assert_eq!(
                response.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{engine:?}"
            );
            assert_eq!(
                body_bytes(response).await,
                "unavailable",
                "{engine:?}: the app's own answer"
            );
            assert_eq!(times_seen(&seen, "/fail-5/a"), 3, "{engine:?}");
            let metrics = scrape(proxy.addrs.admin).await;
            let l = labels("retried");
            assert_eq!(
                sample(
                    &metrics,
                    &format!("route_retry_skipped_total{{{l},reason=\"attempts\"}}")
                ),
                Some(1),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_request_body_is_sent_again_whole() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let body = "x".repeat(10_000);
            let path = "/post/fail-1/a";
            let response = send(
                engine,
                proxy.addrs.outbound,
                Method::POST,
                path,
                &[],
                body.clone(),
            )
            .await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert_eq!(body_bytes(response).await, body.as_bytes(), "{engine:?}");
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 2, "{engine:?}");
            assert!(
                seen.iter().all(|(p, b)| p == path && *b == body.as_bytes()),
                "{engine:?}: both attempts carried the whole body"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_non_idempotent_request_is_retried_only_where_the_route_allows() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            // The `retried` route does not allow POSTs to repeat.
            let response = send(
                engine,
                proxy.addrs.outbound,
                Method::POST,
                "/fail-1/b",
                &[],
                "once",
            )
            .await;
            assert_eq!(
                response.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{engine:?}"
            );
            assert_eq!(times_seen(&seen, "/fail-1/b"), 1, "{engine:?}: never twice");
            let metrics = scrape(proxy.addrs.admin).await;
            let l = labels("retried");
            assert_eq!(
                sample(
                    &metrics,
                    &format!("route_retry_skipped_total{{{l},reason=\"method\"}}")
                ),
                Some(1),
                "{engine:?}\n{metrics}"
            );
            assert!(
                !metrics.contains("route_retries_total"),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_body_too_large_to_replay_is_not_retried() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let mut config = config();
            config.limits.replay_body_limit = 1024;
            let proxy = TestProxy::start(config, mesh_with_profile(&[app])).await;
            let path = "/post/fail-1/c";
            let response = send(
                engine,
                proxy.addrs.outbound,
                Method::POST,
                path,
                &[],
                "y".repeat(10_000),
            )
            .await;
            assert_eq!(
                response.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{engine:?}"
            );
            assert_eq!(times_seen(&seen, path), 1, "{engine:?}");
            let metrics = scrape(proxy.addrs.admin).await;
            let l = labels("posts");
            assert_eq!(
                sample(
                    &metrics,
                    &format!("route_retry_skipped_total{{{l},reason=\"body_too_large\"}}")
                ),
                Some(1),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn an_exhausted_budget_gives_the_failure_back() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            for _ in 0..5 {
                let response = send(
                    engine,
                    proxy.addrs.outbound,
                    Method::GET,
                    "/always-503/none",
                    &[],
                    "",
                )
                .await;
                assert_eq!(
                    response.status(),
                    StatusCode::SERVICE_UNAVAILABLE,
                    "{engine:?}"
                );
            }
            assert_eq!(
                times_seen(&seen, "/always-503/none"),
                5,
                "{engine:?}: no retry"
            );
            let metrics = scrape(proxy.addrs.admin).await;
            let l = labels("no-budget");
            assert_eq!(
                sample(
                    &metrics,
                    &format!("route_retry_budget_exhausted_total{{{l}}}")
                ),
                Some(5),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn the_budget_bounds_retries_to_its_ratio_of_requests() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let requests = 10;
            for _ in 0..requests {
                let response = send(
                    engine,
                    proxy.addrs.outbound,
                    Method::GET,
                    "/always-503/half",
                    &[],
                    "",
                )
                .await;
                assert_eq!(
                    response.status(),
                    StatusCode::SERVICE_UNAVAILABLE,
                    "{engine:?}"
                );
            }
            let metrics = scrape(proxy.addrs.admin).await;
            let l = labels("half-budget");
            let retries = sample(
                &metrics,
                &format!("route_retries_total{{{l},reason=\"http_status\"}}"),
            )
            .unwrap_or(0);
            // Each request deposits half a retry and nothing refills: every second request
            // can pay for one retry, and no more.
            assert_eq!(retries, requests / 2, "{engine:?}\n{metrics}");
            let seen = times_seen(&seen, "/always-503/half");
            assert_eq!(seen as u64, requests + retries, "{engine:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_route_without_a_policy_never_retries() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let response = send(
                engine,
                proxy.addrs.outbound,
                Method::GET,
                "/always-503/plain",
                &[],
                "",
            )
            .await;
            assert_eq!(
                response.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{engine:?}"
            );
            assert_eq!(times_seen(&seen, "/always-503/plain"), 1, "{engine:?}");
            let metrics = scrape(proxy.addrs.admin).await;
            assert!(
                !metrics.contains("route_actual_response_total"),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn an_attempt_that_times_out_is_retried() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let response =
                send(engine, proxy.addrs.outbound, Method::GET, "/hang-1/a", &[], "").await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert_eq!(times_seen(&seen, "/hang-1/a"), 2, "{engine:?}");
            let metrics = scrape(proxy.addrs.admin).await;
            let l = labels("hung");
            for (series, want) in [
                (format!("route_retries_total{{{l},reason=\"timeout\"}}"), 1),
                (format!("route_actual_response_total{{{l},status_code=\"504\",classification=\"failure\"}}"), 1),
                (format!("route_response_total{{{l},status_code=\"200\",classification=\"success\"}}"), 1),
            ] {
                assert_eq!(sample(&metrics, &series), Some(want), "{engine:?} {series}\n{metrics}");
            }
            assert_eq!(
                sample(&metrics, "balancer_requests_in_flight{authority=\"web.test:80\"}"),
                Some(0),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn the_request_timeout_bounds_every_attempt_together() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let path = "/capped/hang-1000/a";
            let response = send(engine, proxy.addrs.outbound, Method::GET, path, &[], "").await;
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{engine:?}");
            assert_eq!(
                response.headers()["conduit-proxy-error"],
                "request timed out after 300ms",
                "{engine:?}"
            );
            // 50 ms attempts inside a 300 ms request: at most six, far below the route's ten.
            let attempts = times_seen(&seen, path);
            assert!(
                (2..=6).contains(&attempts),
                "{engine:?}: {attempts} attempts"
            );
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(
                sample(
                    &metrics,
                    "balancer_requests_in_flight{authority=\"web.test:80\"}"
                ),
                Some(0),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_trailers_only_grpc_unavailable_is_retried() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let path = "/grpc/grpc-unavailable-1/a";
            let headers = [("content-type", "application/grpc")];
            let response = send(
                engine,
                proxy.addrs.outbound,
                Method::POST,
                path,
                &headers,
                "msg",
            )
            .await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert!(
                !response.headers().contains_key("grpc-status"),
                "{engine:?}"
            );
            assert_eq!(times_seen(&seen, path), 2, "{engine:?}");
            let metrics = scrape(proxy.addrs.admin).await;
            let l = labels("grpc");
            assert_eq!(
                sample(
                    &metrics,
                    &format!("route_retries_total{{{l},reason=\"grpc_status\"}}")
                ),
                Some(1),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}
