//! Inbound authorization and the app's probes, over both HTTP engines (HTTP/1.1 and h2c): a
//! plaintext client (the kubelet, from the node) under a policy that denies it still reaches
//! the app with `GET`/`HEAD` of the policy's probe paths, and gets the proxy's 403 for
//! anything else, as a refused connection does; opaque TCP is still refused whole; a policy
//! without probe paths refuses every request as before.
//!
//! Real loopback sockets, static discovery; each test is bounded in time.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers: a failed setup or request is the report"
)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use conduit_proxy::{Addrs, Discover, Proxy, Resolution, TokioNet};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const ERROR_HEADER: &str = "conduit-proxy-error";

/// The mesh: `web.test` served by `app`, under `policy` (YAML lines under `policy:`).
fn mesh_with_policy(app: SocketAddr, policy: &str) -> conduit_core::mesh::Mesh {
    let yaml = format!(
        "services:\n  web.test:\n    port: 80\n    endpoints:\n      - addr: {app}\n    policy:\n{policy}"
    );
    conduit_proto::mesh_file::parse(&yaml).unwrap()
}

/// The app: answers `app saw PATH` (nothing to `HEAD`) and counts what it saw.
async fn app(engine: Engine) -> (SocketAddr, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let addr = backend(engine == Engine::H2, move |request: Request<Incoming>| {
        counter.fetch_add(1, Ordering::SeqCst);
        // hyper's HTTP/2 server would send a HEAD response's body, which a peer must reset.
        let body = if request.method() == Method::HEAD {
            String::new()
        } else {
            format!("app saw {}", request.uri().path())
        };
        async move { Response::new(full(body)) }
    })
    .await;
    (addr, seen)
}

/// A request for `web.test` as `engine` writes it.
fn request(engine: Engine, method: &Method, path: &str, grpc: bool) -> Request<TestBody> {
    let builder = Request::builder().method(method.clone());
    let mut builder = match engine {
        Engine::H1 => builder.uri(path).header("host", "web.test"),
        Engine::H2 => builder.uri(format!("http://web.test{path}")),
    };
    if grpc {
        builder = builder.header("content-type", "application/grpc");
    }
    builder.body(full("")).unwrap()
}

/// One client connection of either engine.
enum Client {
    H1(hyper::client::conn::http1::SendRequest<TestBody>),
    H2(hyper::client::conn::http2::SendRequest<TestBody>),
}

impl Client {
    async fn connect(engine: Engine, addr: SocketAddr) -> Self {
        match engine {
            Engine::H1 => Self::H1(h1_client(addr).await),
            Engine::H2 => Self::H2(h2_client(addr).await),
        }
    }

    async fn send(&mut self, request: Request<TestBody>) -> Response<Incoming> {
        match self {
            Self::H1(client) => client.send_request(request).await.unwrap(),
            Self::H2(client) => client.send_request(request).await.unwrap(),
        }
    }
}

/// Sends one request over a new connection.
async fn send(engine: Engine, addr: SocketAddr, method: &Method, path: &str) -> Response<Incoming> {
    let request = request(engine, method, path, false);
    Client::connect(engine, addr).await.send(request).await
}

/// Waits until the proxy enforces the local service's policy (discovery has answered).
async fn until_enforced(engine: Engine, inbound: SocketAddr) {
    loop {
        let response = send(engine, inbound, &Method::GET, "/other").await;
        if response.status() == StatusCode::FORBIDDEN {
            return;
        }
        tokio::task::yield_now().await;
    }
}

fn refused(response: &Response<Incoming>) -> bool {
    let reason = response
        .headers()
        .get(ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    response.status() == StatusCode::FORBIDDEN
        && reason.contains("a client without identity at 127.0.0.1 is not authorized")
        && reason.contains("default(deny)")
}

const DENY_WITH_PROBES: &str =
    "      default: deny\n      probe_paths: [/healthz, \"/ready?verbose=1\"]\n";

#[tokio::test]
async fn probes_reach_the_app_under_a_deny_policy_and_nothing_else_does() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let mut config = config();
            config.app_addr = Some(app);
            config.service = Some("web.test".into());
            let proxy = TestProxy::start(config, mesh_with_policy(app, DENY_WITH_PROBES)).await;
            let inbound = proxy.addrs.inbound.unwrap();
            until_enforced(engine, inbound).await;
            let before = seen.load(Ordering::SeqCst);
            let metrics = scrape(proxy.addrs.admin).await;
            let allowed_before = sample(&metrics, "inbound_http_authz_allow_total").unwrap();
            let denied_before = sample(&metrics, "inbound_http_authz_deny_total").unwrap();

            // The probes: GET or HEAD of exactly a probe path (the query aside).
            let probes = [
                (Method::GET, "/healthz"),
                (Method::HEAD, "/healthz"),
                (Method::GET, "/healthz?verbose=1"),
                (Method::GET, "/ready"),
                (Method::GET, "/ready?verbose=1"),
            ];
            for (method, path) in &probes {
                let response = send(engine, inbound, method, path).await;
                assert_eq!(
                    response.status(),
                    StatusCode::OK,
                    "{engine:?} {method} {path}"
                );
                assert!(!response.headers().contains_key(ERROR_HEADER));
                if *method == Method::GET {
                    let want = format!("app saw {}", path.split('?').next().unwrap());
                    assert_eq!(body_bytes(response).await, want, "{engine:?} {path}");
                }
            }
            assert_eq!(seen.load(Ordering::SeqCst), before + probes.len());

            // Anything else: the proxy's 403, as for a refused connection; the app sees none.
            let others = [
                (Method::GET, "/other"),
                (Method::GET, "/"),
                (Method::POST, "/healthz"),
                (Method::PUT, "/healthz"),
                (Method::DELETE, "/ready"),
                (Method::GET, "/healthz/"),
                (Method::GET, "/Healthz"),
                (Method::GET, "/health%7Az"),
                (Method::GET, "//healthz"),
                (Method::GET, "/healthz/../admin"),
                (Method::GET, "/healthzz"),
            ];
            for (method, path) in &others {
                let response = send(engine, inbound, method, path).await;
                assert!(
                    refused(&response),
                    "{engine:?} {method} {path}: {response:?}"
                );
                if engine == Engine::H1 {
                    // As a refused HTTP/1 connection: the answer closes it.
                    assert_eq!(response.headers()["connection"], "close");
                }
            }
            assert_eq!(seen.load(Ordering::SeqCst), before + probes.len());

            // One connection: each request is decided on its own.
            let mut client = Client::connect(engine, inbound).await;
            let probe = client
                .send(request(engine, &Method::GET, "/healthz", false))
                .await;
            assert_eq!(probe.status(), StatusCode::OK);
            let _ = body_bytes(probe).await;
            let probe = client
                .send(request(engine, &Method::GET, "/ready", false))
                .await;
            assert_eq!(probe.status(), StatusCode::OK);
            let _ = body_bytes(probe).await;
            let other = client
                .send(request(engine, &Method::GET, "/other", false))
                .await;
            assert!(refused(&other), "{engine:?}: {other:?}");
            if engine == Engine::H2 {
                // The connection stays open for the next probe, and gRPC gets its code.
                let probe = client
                    .send(request(engine, &Method::GET, "/healthz", false))
                    .await;
                assert_eq!(probe.status(), StatusCode::OK);
                let grpc = client
                    .send(request(engine, &Method::POST, "/pkg.Svc/Call", true))
                    .await;
                assert_eq!(grpc.headers()["grpc-status"], "7", "PERMISSION_DENIED");
            }
            let probes_seen = if engine == Engine::H2 { 3 } else { 2 };
            assert_eq!(
                seen.load(Ordering::SeqCst),
                before + probes.len() + probes_seen
            );

            // Counted per request on such a connection: probes allowed, the rest denied.
            let metrics = scrape(proxy.addrs.admin).await;
            let allowed = sample(&metrics, "inbound_http_authz_allow_total").unwrap();
            let denied = sample(&metrics, "inbound_http_authz_deny_total").unwrap();
            assert_eq!(
                allowed - allowed_before,
                u64::try_from(probes.len() + probes_seen).unwrap(),
                "{engine:?}\n{metrics}"
            );
            let refusals = others.len() + if engine == Engine::H2 { 2 } else { 1 };
            assert_eq!(
                denied - denied_before,
                u64::try_from(refusals).unwrap(),
                "{engine:?}\n{metrics}"
            );

            // Opaque TCP is refused whole, as before: there is no request to look at.
            let mut tcp = TcpStream::connect(inbound).await.unwrap();
            tcp.write_all(b"\x00\x01binary protocol\n").await.unwrap();
            let mut answer = Vec::new();
            let _ = tcp.read_to_end(&mut answer).await;
            assert!(answer.is_empty(), "{answer:?}");
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(
                sample(&metrics, "inbound_tcp_authz_deny_total"),
                Some(1),
                "{metrics}"
            );
            assert_eq!(
                seen.load(Ordering::SeqCst),
                before + probes.len() + probes_seen
            );
        }
    })
    .await;
}

#[tokio::test]
async fn without_probe_paths_every_request_is_refused() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let mut config = config();
            config.app_addr = Some(app);
            config.service = Some("web.test".into());
            let proxy =
                TestProxy::start(config, mesh_with_policy(app, "      default: deny\n")).await;
            let inbound = proxy.addrs.inbound.unwrap();
            until_enforced(engine, inbound).await;
            let before = seen.load(Ordering::SeqCst);
            let metrics = scrape(proxy.addrs.admin).await;
            let allowed = sample(&metrics, "inbound_http_authz_allow_total");
            let denied = sample(&metrics, "inbound_http_authz_deny_total").unwrap();
            for path in ["/healthz", "/ready", "/"] {
                let response = send(engine, inbound, &Method::GET, path).await;
                assert!(refused(&response), "{engine:?} {path}: {response:?}");
            }
            // Over one HTTP/2 connection, every request is refused, and the connection is
            // counted once.
            let mut client = Client::connect(engine, inbound).await;
            let response = client
                .send(request(engine, &Method::GET, "/healthz", false))
                .await;
            assert!(refused(&response), "{engine:?}: {response:?}");
            if engine == Engine::H2 {
                let response = client
                    .send(request(engine, &Method::GET, "/healthz", false))
                    .await;
                assert!(refused(&response), "{engine:?}: {response:?}");
            }
            assert_eq!(seen.load(Ordering::SeqCst), before);
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(
                sample(&metrics, "inbound_http_authz_allow_total"),
                allowed,
                "{metrics}"
            );
            assert_eq!(
                sample(&metrics, "inbound_http_authz_deny_total"),
                Some(denied + 4),
                "{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn an_allowed_client_reaches_every_path_and_audit_lets_everything_through() {
    bounded(async {
        for engine in ENGINES {
            // The client's network is allowed: probe paths change nothing for it.
            let (open_app, open_seen) = app(engine).await;
            let mut open_config = config();
            open_config.app_addr = Some(open_app);
            open_config.service = Some("web.test".into());
            let policy = "      default: deny\n      authorizations: [ { networks: [127.0.0.1] } ]\n      probe_paths: [/healthz]\n";
            let open = TestProxy::start(open_config, mesh_with_policy(open_app, policy)).await;
            let inbound = open.addrs.inbound.unwrap();
            for (method, path) in [(Method::POST, "/other"), (Method::GET, "/healthz")] {
                let response = send(engine, inbound, &method, path).await;
                assert_eq!(response.status(), StatusCode::OK, "{engine:?} {path}");
            }
            assert_eq!(open_seen.load(Ordering::SeqCst), 2);

            // Audit: nothing is refused; probes count as allowed, the rest as audit denials.
            let (app, seen) = app(engine).await;
            let mut config = config();
            config.app_addr = Some(app);
            config.service = Some("web.test".into());
            let policy = "      default: deny\n      audit: true\n      probe_paths: [/healthz]\n";
            let proxy = TestProxy::start(config, mesh_with_policy(app, policy)).await;
            let inbound = proxy.addrs.inbound.unwrap();
            // Until discovery answers, there is no policy and every connection is allowed.
            loop {
                let _ = send(engine, inbound, &Method::GET, "/warm").await;
                let metrics = scrape(proxy.addrs.admin).await;
                if sample(&metrics, "inbound_http_authz_audit_deny_total") == Some(1) {
                    break;
                }
            }
            let before = seen.load(Ordering::SeqCst);
            let metrics = scrape(proxy.addrs.admin).await;
            let allowed = sample(&metrics, "inbound_http_authz_allow_total").unwrap();
            for (method, path) in [(Method::GET, "/healthz"), (Method::POST, "/other")] {
                let response = send(engine, inbound, &method, path).await;
                assert_eq!(response.status(), StatusCode::OK, "{engine:?} {path}");
            }
            assert_eq!(seen.load(Ordering::SeqCst), before + 2);
            let metrics = scrape(proxy.addrs.admin).await;
            assert_eq!(
                sample(&metrics, "inbound_http_authz_allow_total"),
                Some(allowed + 1),
                "{metrics}"
            );
            assert_eq!(
                sample(&metrics, "inbound_http_authz_audit_deny_total"),
                Some(2),
                "{metrics}"
            );
        }
    })
    .await;
}

/// Discovery that answers only when the test says: `publish` hands every follower of an
/// authority its resolution.
#[derive(Debug, Default)]
struct Held(std::sync::Mutex<Vec<(String, tokio::sync::watch::Sender<Resolution>)>>);

impl Held {
    fn following(&self, authority: &str) -> bool {
        self.0.lock().unwrap().iter().any(|(a, _)| a == authority)
    }

    fn publish(&self, authority: &str, resolution: &Resolution) {
        for (followed, tx) in self.0.lock().unwrap().iter() {
            if followed == authority {
                tx.send_replace(resolution.clone());
            }
        }
    }
}

impl Discover for Held {
    fn resolve(&self, authority: &str) -> tokio::sync::watch::Receiver<Resolution> {
        let (tx, rx) = tokio::sync::watch::channel(Resolution::Unknown);
        self.0.lock().unwrap().push((authority.to_owned(), tx));
        rx
    }
}

async fn start_held(config: conduit_proxy::config::ProxyConfig, held: &Arc<Held>) -> Addrs {
    let proxy = Proxy::bind(config, TokioNet).await.unwrap();
    let addrs = proxy.addrs();
    let discovery = Arc::clone(held);
    tokio::spawn(async move {
        proxy
            .serve(discovery, 7, std::future::pending())
            .await
            .unwrap();
    });
    addrs
}

/// Before discovery has answered for the local service its policy is unknown: a connection
/// waits for the answer and is then decided by it (here refused), and one that the answer
/// does not reach within the fail-fast timeout is refused with 503 saying why. The app sees
/// neither.
#[tokio::test]
async fn no_connection_is_served_before_the_local_policy_is_known() {
    bounded(async {
        for engine in ENGINES {
            let (app, seen) = app(engine).await;
            let mut config = config();
            config.app_addr = Some(app);
            config.service = Some("web.test".into());
            config.queue.failfast_timeout = Duration::from_millis(200);
            let held = Arc::new(Held::default());
            let addrs = start_held(config.clone(), &held).await;
            let inbound = addrs.inbound.unwrap();
            let response = send(engine, inbound, &Method::GET, "/").await;
            assert_eq!(
                response.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{engine:?}"
            );
            let reason = response.headers()[ERROR_HEADER].to_str().unwrap();
            assert!(
                reason.contains("authorization policy is not known yet"),
                "{engine:?}: {reason}"
            );

            // A connection that arrives first waits for the answer, which decides it.
            config.queue.failfast_timeout = Duration::from_secs(20);
            let held = Arc::new(Held::default());
            let addrs = start_held(config, &held).await;
            let inbound = addrs.inbound.unwrap();
            while !held.following("web.test") {
                tokio::task::yield_now().await;
            }
            let waiting = tokio::spawn(send(engine, inbound, &Method::GET, "/"));
            // Accepted, and held: the proxy counts the open connection.
            let open = "tcp_open_connections{direction=\"inbound\"";
            while !scrape(addrs.admin)
                .await
                .lines()
                .any(|l| l.starts_with(open) && l.ends_with(" 1"))
            {
                tokio::task::yield_now().await;
            }
            let mesh = mesh_with_policy(app, "      default: deny\n");
            let service = Arc::new(mesh.service("web.test").unwrap().clone());
            held.publish(
                "web.test",
                &Resolution::Service {
                    version: 1,
                    service,
                },
            );
            let response = waiting.await.unwrap();
            assert!(refused(&response), "{engine:?}: {response:?}");
            assert_eq!(seen.load(Ordering::SeqCst), 0, "{engine:?}");
        }
    })
    .await;
}
