//! Route profiles, timeouts, deadline propagation and request replay: one table of behaviour,
//! run over both HTTP engines (HTTP/1.1 and h2c, the upstream speaking what the client spoke).
//! Every request goes through the same request path whatever its engine, so every case here
//! must hold on both; a case that held on one engine only would mean the path is split again.
//!
//! Real loopback sockets; each test is bounded in time and waits on answers, not on the
//! clock (the timeouts under test are small, and slow apps never answer at all).
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup or request is the report"
)]

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const ERROR_HEADER: &str = "conduit-proxy-error";

/// A request as the table writes it.
struct Req<'a> {
    method: Method,
    path: &'a str,
    headers: &'a [(&'a str, &'a str)],
    body: Bytes,
}

fn req(path: &str) -> Req<'_> {
    Req {
        method: Method::GET,
        path,
        headers: &[],
        body: Bytes::new(),
    }
}

/// Sends `r` for `web.test` to `addr` over a new connection of `engine`.
async fn send(engine: Engine, addr: SocketAddr, r: Req<'_>) -> Response<Incoming> {
    let mut builder = Request::builder().method(r.method);
    builder = match engine {
        Engine::H1 => builder.uri(r.path).header("host", "web.test"),
        Engine::H2 => builder.uri(format!("http://web.test{}", r.path)),
    };
    for (name, value) in r.headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(full(r.body)).unwrap();
    match engine {
        Engine::H1 => h1_client(addr).await.send_request(request).await.unwrap(),
        Engine::H2 => h2_client(addr).await.send_request(request).await.unwrap(),
    }
}

/// The app: answers by path. `/slow...`, `/attempt...` and `/deadline...` never answer;
/// `/lenient` and `/strict` answer 500; `/echo-timeout...` tells the `grpc-timeout` it got;
/// `/echo` answers the request body; anything else `ok`.
async fn app(engine: Engine) -> SocketAddr {
    backend(
        engine == Engine::H2,
        |request: Request<Incoming>| async move {
            let path = request.uri().path().to_owned();
            if ["/slow", "/attempt", "/deadline"]
                .iter()
                .any(|p| path.starts_with(p))
            {
                std::future::pending::<()>().await;
            }
            if path == "/lenient" || path == "/strict" {
                let mut response = Response::new(full("failed"));
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                return response;
            }
            if path.starts_with("/echo-timeout") {
                let seen = request
                    .headers()
                    .get("grpc-timeout")
                    .map_or("none".to_owned(), |v| v.to_str().unwrap().to_owned());
                return Response::new(full(seen));
            }
            if path == "/echo" {
                return Response::new(full(body_of(request).await));
            }
            if path == "/stream" {
                // Headers and a first chunk at once, then nothing more.
                let frames =
                    futures_util::stream::iter([Ok(http_body::Frame::data(Bytes::from("first")))])
                        .chain(futures_util::stream::pending());
                let mut response = Response::new(http_body_util::BodyExt::boxed(
                    http_body_util::StreamBody::new(frames),
                ));
                if request.headers().contains_key("content-type") {
                    response
                        .headers_mut()
                        .insert("content-type", "application/grpc".parse().unwrap());
                }
                return response;
            }
            Response::new(full("ok"))
        },
    )
    .await
}

async fn body_of(request: Request<Incoming>) -> Bytes {
    http_body_util::BodyExt::collect(request.into_body())
        .await
        .unwrap()
        .to_bytes()
}

const PROFILE: &str = r#"
    profile:
      routes:
        - name: canary
          match: { headers: [ { name: X-Canary, regex: "yes|true" } ] }
        - name: get-item
          match: { method: GET, path: { regex: "/items/[0-9]+" } }
        - name: list-items
          match: { method: GET, path: { exact: /items } }
        - name: create-item
          match: { method: POST, path: { prefix: /items } }
        - name: lenient
          match: { path: { exact: /lenient } }
          response_classes: { http: [ { status: { min: 500, max: 599 }, failure: false } ] }
        - name: slow
          match: { path: { prefix: /slow } }
          timeouts: { request: 200ms }
        - name: slow-attempt
          match: { path: { prefix: /attempt } }
          timeouts: { request: 10s, attempt: 100ms }
        - name: bounded
          match: { path: { prefix: /echo-timeout/bounded } }
          timeouts: { request: 2s }
        - name: stream
          match: { path: { exact: /stream } }
          timeouts: { request: 200ms }
"#;

/// `web.test` on port 80 with `endpoints` and the table's profile.
fn mesh_with_profile(endpoints: &[SocketAddr]) -> conduit_core::mesh::Mesh {
    let mut yaml = String::from("services:\n  web.test:\n    port: 80\n    endpoints:\n");
    for addr in endpoints {
        yaml.push_str(&format!("      - addr: {addr}\n"));
    }
    yaml.push_str(PROFILE);
    conduit_proto::mesh_file::parse(&yaml).unwrap()
}

fn route_requests(metrics: &str, direction: &str, route: &str) -> Option<u64> {
    sample(
        metrics,
        &format!(
            "route_request_total{{direction=\"{direction}\",authority=\"web.test:80\",route=\"{route}\"}}"
        ),
    )
}

/// A request (method, path, header fields) and the route it must take.
type Case<'a> = (Method, &'a str, &'a [(&'a str, &'a str)], &'a str);

#[tokio::test]
async fn routes_match_by_method_path_and_headers_on_both_sides() {
    bounded(async {
        for engine in ENGINES {
            let app = app(engine).await;
            let mut config = config();
            config.app_addr = Some(app);
            config.service = Some("web.test".into());
            let proxy = TestProxy::start(config, mesh_with_profile(&[app])).await;
            let inbound = proxy.addrs.inbound.unwrap();
            let cases: [Case<'_>; 7] = [
                (Method::GET, "/items/42", &[], "get-item"),
                (Method::GET, "/items/42?full=1", &[], "get-item"),
                (Method::GET, "/items", &[], "list-items"),
                (Method::POST, "/items/new", &[], "create-item"),
                (Method::GET, "/items/42", &[("x-canary", "yes")], "canary"),
                (Method::GET, "/items/x", &[("x-canary", "maybe")], "default"),
                (Method::DELETE, "/other", &[], "default"),
            ];
            for (method, path, headers, _) in &cases {
                for addr in [proxy.addrs.outbound, inbound] {
                    let r = Req {
                        method: method.clone(),
                        path,
                        headers,
                        body: Bytes::new(),
                    };
                    let response = send(engine, addr, r).await;
                    assert_eq!(response.status(), StatusCode::OK, "{engine:?} {path}");
                }
            }
            let metrics = scrape(proxy.addrs.admin).await;
            for direction in ["outbound", "inbound"] {
                for (route, want) in [
                    ("get-item", 2),
                    ("list-items", 1),
                    ("create-item", 1),
                    ("canary", 1),
                    ("default", 2),
                ] {
                    assert_eq!(
                        route_requests(&metrics, direction, route),
                        Some(want),
                        "{engine:?} {direction} {route}\n{metrics}"
                    );
                }
            }
        }
    })
    .await;
}

#[tokio::test]
async fn response_classes_come_from_the_route() {
    bounded(async {
        for engine in ENGINES {
            let app = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            for path in ["/lenient", "/strict"] {
                let response = send(engine, proxy.addrs.outbound, req(path)).await;
                assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
            }
            let metrics = scrape(proxy.addrs.admin).await;
            let class = |route: &str, class: &str| {
                sample(
                    &metrics,
                    &format!("route_response_total{{direction=\"outbound\",authority=\"web.test:80\",route=\"{route}\",status_code=\"500\",classification=\"{class}\"}}"),
                )
            };
            assert_eq!(class("lenient", "success"), Some(1), "{engine:?}\n{metrics}");
            assert_eq!(class("default", "failure"), Some(1), "{engine:?}\n{metrics}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_request_timeout_answers_504_and_releases_the_attempt() {
    bounded(async {
        for engine in ENGINES {
            let app = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let response = send(engine, proxy.addrs.outbound, req("/slow")).await;
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{engine:?}");
            assert_eq!(
                response.headers()[ERROR_HEADER],
                "request timed out after 200ms",
                "{engine:?}"
            );
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(
                sample(&metrics, "balancer_requests_in_flight{authority=\"web.test:80\"}"),
                Some(0),
                "the cancelled attempt released its endpoint ({engine:?})\n{metrics}"
            );
            assert_eq!(
                sample(&metrics, "route_response_total{direction=\"outbound\",authority=\"web.test:80\",route=\"slow\",status_code=\"504\",classification=\"failure\"}"),
                Some(1),
                "{engine:?}\n{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_request_timeout_cuts_a_response_mid_stream() {
    bounded(async {
        for engine in ENGINES {
            let app = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            // The headers and first chunk arrive; the deadline then ends the response: the
            // connection or stream is cut, so the client sees an incomplete body.
            let response = send(engine, proxy.addrs.outbound, req("/stream")).await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            let body = http_body_util::BodyExt::collect(response.into_body()).await;
            assert!(body.is_err(), "{engine:?}: the body must not look complete");
            if engine == Engine::H2 {
                // A gRPC caller gets the status its deadline calls for, in the trailers.
                let r = Req {
                    method: Method::POST,
                    headers: &[("content-type", "application/grpc")],
                    ..req("/stream")
                };
                let response = send(engine, proxy.addrs.outbound, r).await;
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap();
                let trailers = body.trailers().cloned().unwrap();
                assert_eq!(trailers["grpc-status"], "4");
                assert_eq!(body.to_bytes(), "first");
            }
            let metrics = scrape(proxy.addrs.admin).await;
            assert!(
                sample(&metrics, "route_response_total{direction=\"outbound\",authority=\"web.test:80\",route=\"stream\",status_code=\"200\",classification=\"failure\"}").is_some(),
                "{engine:?}\n{metrics}"
            );
            assert_eq!(
                sample(&metrics, "balancer_requests_in_flight{authority=\"web.test:80\"}"),
                Some(0),
                "{engine:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn an_attempt_timeout_answers_504() {
    bounded(async {
        for engine in ENGINES {
            let app = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let response = send(engine, proxy.addrs.outbound, req("/attempt")).await;
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{engine:?}");
            let reason = response.headers()[ERROR_HEADER]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(
                reason.ends_with("sent no response headers within the attempt timeout of 100ms"),
                "{engine:?}: {reason}"
            );
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(
                sample(
                    &metrics,
                    "balancer_requests_in_flight{authority=\"web.test:80\"}"
                ),
                Some(0),
                "{engine:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn the_callers_grpc_timeout_is_honoured_and_reduced_upstream() {
    bounded(async {
        for engine in ENGINES {
            let app = app(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            let outbound = proxy.addrs.outbound;

            // Honoured: the caller's 150 ms end the wait for a silent app.
            let r = Req {
                headers: &[("grpc-timeout", "150m")],
                ..req("/deadline")
            };
            let response = send(engine, outbound, r).await;
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT, "{engine:?}");
            assert!(
                response.headers()[ERROR_HEADER]
                    .to_str()
                    .unwrap()
                    .contains("grpc-timeout"),
                "{engine:?}"
            );
            // A gRPC caller gets DEADLINE_EXCEEDED.
            let r = Req {
                method: Method::POST,
                headers: &[
                    ("grpc-timeout", "150m"),
                    ("content-type", "application/grpc"),
                ],
                ..req("/deadline")
            };
            let response = send(engine, outbound, r).await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
            assert_eq!(response.headers()["grpc-status"], "4", "{engine:?}");

            // Reduced: the app is told what remains, never more than the caller gave, and no
            // more than the route allows.
            for (path, at_most) in [
                ("/echo-timeout", Duration::from_secs(10)),
                ("/echo-timeout/bounded", Duration::from_secs(2)),
            ] {
                let r = Req {
                    headers: &[("grpc-timeout", "10S")],
                    ..req(path)
                };
                let response = send(engine, outbound, r).await;
                assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
                let seen = body_bytes(response).await;
                let seen = conduit_core::timeout::parse_grpc_timeout(&seen)
                    .unwrap_or_else(|| panic!("{engine:?} {path}: {seen:?}"));
                assert!(
                    seen <= at_most && seen > at_most - Duration::from_secs(1),
                    "{engine:?} {path}: {seen:?}"
                );
            }
            // Without one, nothing is added.
            let response = send(engine, outbound, req("/echo-timeout")).await;
            assert_eq!(body_bytes(response).await, "none", "{engine:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_small_body_is_sent_again_after_a_refused_connect() {
    bounded(async {
        // A port that was bound and released: connections are refused.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        for engine in ENGINES {
            let app = app(engine).await;
            let mut config = config();
            // A fresh endpoint looks cheaper than any measured one, so the closed endpoint is
            // picked as soon as it is a candidate.
            config.balancer.default_rtt = Duration::from_micros(1);
            let proxy = TestProxy::start(config, mesh_with_profile(&[closed, app])).await;
            for i in 0..20 {
                let body = Bytes::from(format!("hello {i}"));
                let r = Req {
                    method: Method::POST,
                    body: body.clone(),
                    ..req("/echo")
                };
                let response = send(engine, proxy.addrs.outbound, r).await;
                assert_eq!(response.status(), StatusCode::OK, "{engine:?}");
                assert_eq!(body_bytes(response).await, body, "{engine:?}");
            }
        }
    })
    .await;
}

/// A backend that fails the first attempt of each request (by its `x-key`) after reading it
/// whole, in the way its protocol proves the request unprocessed: HTTP/1.1 closes a reused
/// connection without a response (only a safe method may then be resent), h2 refuses the
/// stream (`REFUSED_STREAM`). Later attempts get the body's length back.
async fn refusing_backend(engine: Engine) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            match engine {
                Engine::H1 => tokio::spawn(h1_refusing(io, seen)),
                Engine::H2 => tokio::spawn(h2_refusing(io, seen)),
            };
        }
    });
    addr
}

/// Whether this is the first attempt of the request keyed `key`.
fn first_attempt(seen: &Mutex<Vec<String>>, key: &str) -> bool {
    let mut seen = seen.lock().unwrap();
    if key.is_empty() || seen.iter().any(|k| k == key) {
        return false;
    }
    seen.push(key.to_owned());
    true
}

async fn h1_refusing(mut io: tokio::net::TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    loop {
        // One request: its head, then its content-length body.
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 8192];
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let field = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::trim))
                .unwrap_or("")
                .to_owned()
        };
        let len: usize = field("content-length").parse().unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 65536];
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + len);
        if first_attempt(&seen, &field("x-key")) {
            // Read whole, then the connection closes without a word.
            return;
        }
        let body = len.to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if io.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn h2_refusing(io: tokio::net::TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let Ok(mut conn) = h2::server::handshake(io).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = conn.accept().await {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            let key = request
                .headers()
                .get("x-key")
                .map_or("", |v| v.to_str().unwrap())
                .to_owned();
            let mut body = request.into_body();
            let mut len = 0;
            while let Some(Ok(data)) = body.data().await {
                len += data.len();
                let _ = body.flow_control().release_capacity(data.len());
            }
            if first_attempt(&seen, &key) {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                return;
            }
            let Ok(mut stream) = respond.send_response(Response::new(()), false) else {
                return;
            };
            let _ = stream.send_data(Bytes::from(len.to_string()), true);
        });
    }
}

#[tokio::test]
async fn bodies_within_the_replay_limit_are_resent_and_larger_ones_are_not() {
    bounded(async {
        for engine in ENGINES {
            let app = refusing_backend(engine).await;
            let proxy = TestProxy::start(config(), mesh_with_profile(&[app])).await;
            // HTTP/1.1 resends only on a reused connection, and only safe methods: prime the
            // pool first, and send GETs with bodies.
            let outbound = proxy.addrs.outbound;
            let mut client = match engine {
                Engine::H1 => Some(h1_client(outbound).await),
                Engine::H2 => None,
            };
            let mut h2 = match engine {
                Engine::H2 => Some(h2_client(outbound).await),
                Engine::H1 => None,
            };
            let mut call = async |key: &str, len: usize| {
                let uri = match engine {
                    Engine::H1 => "/upload".to_owned(),
                    Engine::H2 => "http://web.test/upload".to_owned(),
                };
                let request = Request::builder()
                    .method(Method::GET)
                    .uri(uri)
                    .header("host", "web.test")
                    .header("x-key", key)
                    .body(full(vec![b'x'; len]))
                    .unwrap();
                match (&mut client, &mut h2) {
                    (Some(c), _) => c.send_request(request).await.unwrap(),
                    (_, Some(c)) => c.send_request(request).await.unwrap(),
                    _ => unreachable!(),
                }
            };
            let response = call("", 0).await;
            assert_eq!(response.status(), StatusCode::OK, "{engine:?} priming");
            let _ = body_bytes(response).await;

            let response = call("small", 1024).await;
            assert_eq!(
                response.status(),
                StatusCode::OK,
                "{engine:?}: resent whole"
            );
            assert_eq!(body_bytes(response).await, "1024", "{engine:?}");

            let response = call("large", 100 * 1024).await;
            assert_eq!(
                response.status(),
                StatusCode::BAD_GATEWAY,
                "{engine:?}: a body past the limit is not kept, so not resent"
            );
        }
    })
    .await;
}
