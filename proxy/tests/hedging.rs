//! Hedges (speculative retries), over both HTTP engines (HTTP/1.1 and h2c, the upstream
//! speaking what the client spoke): a hedge that answers first wins and the slow attempt is
//! cancelled, a hedge that loses is cancelled, and every cancelled attempt releases its
//! endpoint's in-flight count; a body goes out whole with the hedge; a route's budget and
//! method rules hold for hedges as for retries.
//!
//! Real loopback sockets. Which attempt is slow is scripted by the order in which requests
//! reach the app (never by how long anything takes), so every count asserted here is exact.
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
use tokio::sync::Notify;

/// What the app saw: each request's path and body, in arrival order.
type Seen = Arc<Mutex<Vec<(String, Bytes)>>>;

/// The app. On a path starting `/first-hangs`, the first request never answers and later ones
/// echo their body; on `/second-hangs`, the first request answers only once a second has
/// arrived, and the second never answers. Otherwise it echoes the body.
async fn app(engine: Engine) -> (SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let second_arrived = Arc::new(Notify::new());
    let log = Arc::clone(&seen);
    let addr = backend(engine == Engine::H2, move |request: Request<Incoming>| {
        let log = Arc::clone(&log);
        let counts = Arc::clone(&counts);
        let second_arrived = Arc::clone(&second_arrived);
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
            if path.starts_with("/first-hangs") && n == 1 {
                std::future::pending::<()>().await;
            }
            if path.starts_with("/second-hangs") {
                if n == 1 {
                    second_arrived.notified().await;
                } else {
                    second_arrived.notify_one();
                    std::future::pending::<()>().await;
                }
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
        - name: hedged
          match: { path: { prefix: /first-hangs/get } }
          retry: { max_attempts: 2, hedge: { after: 20ms } }
        - name: hedged-posts
          match: { path: { prefix: /first-hangs/post } }
          retry: { max_attempts: 2, non_idempotent: true, hedge: { after: 20ms } }
        - name: posts
          match: { path: { prefix: /first-hangs/plain-post } }
          timeouts: { request: 300ms }
          retry: { max_attempts: 2, hedge: { after: 20ms } }
        - name: no-budget
          match: { path: { prefix: /first-hangs/no-budget } }
          timeouts: { request: 300ms }
          retry: { max_attempts: 2, hedge: { after: 20ms }, budget: { ratio: 0.0, min_per_second: 0 } }
        - name: losing
          match: { path: { prefix: /second-hangs } }
          retry: { max_attempts: 2, hedge: { after: 20ms } }
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
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    let mut builder = Request::builder().method(method);
    builder = match engine {
        Engine::H1 => builder.uri(path).header("host", "web.test"),
        Engine::H2 => builder.uri(format!("http://web.test{path}")),
    };
    let request = builder.body(full(body.into())).unwrap();
    match engine {
        Engine::H1 => h1_client(addr).await.send_request(request).await.unwrap(),
        Engine::H2 => h2_client(addr).await.send_request(request).await.unwrap(),
    }
}

fn hedges(metrics: &str, route: &str, outcome: &str) -> Option<u64> {
    sample(
        metrics,
        &format!(
            "route_hedges_total{{direction=\"outbound\",authority=\"web.test:80\",route=\"{route}\",outcome=\"{outcome}\"}}"
        ),
    )
}

fn in_flight(metrics: &str) -> Option<u64> {
    sample(
        metrics,
        "balancer_requests_in_flight{authority=\"web.test:80\"}",
    )
}

fn seen_bodies(seen: &Seen, path: &str) -> Vec<Bytes> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(p, _)| p == path)
        .map(|(_, body)| body.clone())
        .collect()
}

#[tokio::test]
async fn a_hedge_answers_for_a_slow_attempt_which_is_cancelled() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let path = "/first-hangs/get/a";
            let response = send(engine, proxy.addrs.outbound, Method::GET, path, "").await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert_eq!(seen_bodies(&seen, path).len(), 2, "{engine:?}: the attempt and its hedge");
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(hedges(&metrics, "hedged", "won"), Some(1), "{engine:?}\n{metrics}");
            assert_eq!(hedges(&metrics, "hedged", "lost"), None, "{engine:?}\n{metrics}");
            assert_eq!(
                in_flight(&metrics),
                Some(0),
                "{engine:?}: the cancelled attempt released its endpoint\n{metrics}"
            );
            // The caller got one response, counted once.
            assert_eq!(
                sample(
                    &metrics,
                    "route_response_total{direction=\"outbound\",authority=\"web.test:80\",route=\"hedged\",status_code=\"200\",classification=\"success\"}"
                ),
                Some(1),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_hedge_that_loses_is_cancelled_and_releases_its_endpoint() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let path = "/second-hangs/a";
            let response = send(engine, proxy.addrs.outbound, Method::GET, path, "").await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert_eq!(seen_bodies(&seen, path).len(), 2, "{engine:?}");
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(
                hedges(&metrics, "losing", "lost"),
                Some(1),
                "{engine:?}\n{metrics}"
            );
            assert_eq!(
                hedges(&metrics, "losing", "won"),
                None,
                "{engine:?}\n{metrics}"
            );
            assert_eq!(
                in_flight(&metrics),
                Some(0),
                "{engine:?}: the cancelled hedge released its endpoint\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_hedge_carries_the_whole_request_body() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let path = "/first-hangs/post/a";
            let body = "payload ".repeat(100);
            let response = send(
                engine,
                proxy.addrs.outbound,
                Method::POST,
                path,
                body.clone(),
            )
            .await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert_eq!(
                body_bytes(response).await,
                body,
                "{engine:?}: the hedge's echo"
            );
            assert_eq!(
                seen_bodies(&seen, path),
                vec![Bytes::from(body.clone()), Bytes::from(body)],
                "{engine:?}: both attempts carried the body whole"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_non_idempotent_request_is_not_hedged_unless_the_route_allows() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let path = "/first-hangs/plain-post/a";
            let response = send(engine, proxy.addrs.outbound, Method::POST, path, "x").await;
            assert_eq!(
                response.status(),
                StatusCode::GATEWAY_TIMEOUT,
                "{engine:?}: the slow attempt ran into the request timeout"
            );
            assert_eq!(seen_bodies(&seen, path).len(), 1, "{engine:?}: sent once");
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(
                hedges(&metrics, "posts", "won"),
                None,
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn hedges_spend_the_routes_retry_budget() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let path = "/first-hangs/no-budget/a";
            let response = send(engine, proxy.addrs.outbound, Method::GET, path, "").await;
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{engine:?}");
            assert_eq!(seen_bodies(&seen, path).len(), 1, "{engine:?}: no hedge without budget");
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(
                sample(
                    &metrics,
                    "route_retry_budget_exhausted_total{direction=\"outbound\",authority=\"web.test:80\",route=\"no-budget\"}"
                ),
                Some(1),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}
