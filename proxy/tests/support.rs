//! Shared helpers for the proxy's loopback tests: backends, clients, a proxy under test.
// Test scaffolding: panicking on a setup failure is the right report, and not every test
// uses every helper.
#![allow(
    dead_code,
    unreachable_pub,
    missing_debug_implementations,
    clippy::unwrap_used
)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use conduit_proxy::config::{DiscoveryConfig, ProxyConfig};
use conduit_proxy::{Addrs, Proxy, StaticDiscover, TokioNet};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(bytes: impl Into<Bytes>) -> TestBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Every test is bounded in time.
pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out")
}

/// An HTTP backend on loopback (HTTP/1.1 with upgrades, or h2c), answering with `handler`.
pub async fn backend<H, F>(h2: bool, handler: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(1000)
                        .serve_connection(TokioIo::new(io), service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(io), service)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    addr
}

/// A backend that answers `name` to everything.
pub async fn named_backend(name: &'static str) -> SocketAddr {
    backend(false, move |_req| async move { Response::new(full(name)) }).await
}

pub fn mesh(services: &[(&str, &[SocketAddr])]) -> conduit_core::mesh::Mesh {
    let mut yaml = String::from("services:\n");
    for (name, endpoints) in services {
        yaml.push_str(&format!("  {name}:\n    port: 80\n    endpoints:\n"));
        if endpoints.is_empty() {
            yaml.push_str("      []\n");
        }
        for addr in *endpoints {
            yaml.push_str(&format!("      - addr: {addr}\n"));
        }
    }
    conduit_proto::mesh_file::parse(&yaml).unwrap()
}

pub fn config() -> ProxyConfig {
    let mut config = ProxyConfig::with_discovery(DiscoveryConfig::File("unused".into()));
    config.outbound_addr = "127.0.0.1:0".parse().unwrap();
    config.inbound_addr = "127.0.0.1:0".parse().unwrap();
    config.admin_addr = "127.0.0.1:0".parse().unwrap();
    config.shutdown_grace_period = Duration::from_secs(5);
    config
}

pub struct TestProxy {
    pub addrs: Addrs,
    pub discovery: Arc<StaticDiscover>,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestProxy {
    pub async fn start(config: ProxyConfig, mesh: conduit_core::mesh::Mesh) -> Self {
        let proxy = Proxy::bind(config, TokioNet).await.unwrap();
        let addrs = proxy.addrs();
        let discovery = Arc::new(StaticDiscover::new(mesh));
        let (tx, rx) = oneshot::channel::<()>();
        let d = Arc::clone(&discovery);
        let task = tokio::spawn(async move {
            proxy
                .serve(d, 7, async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            addrs,
            discovery,
            shutdown: Some(tx),
            task,
        }
    }

    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// An HTTP/1.1 client connection.
pub async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let io = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    sender
}

/// An h2c (prior knowledge) client connection.
pub async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let io = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

pub fn get(authority: &str, path: &str) -> Request<TestBody> {
    Request::builder()
        .uri(path)
        .header("host", authority)
        .body(full(""))
        .unwrap()
}

pub async fn body_bytes(response: Response<Incoming>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

/// One GET over a fresh HTTP/1.1 connection.
pub async fn get_once(addr: SocketAddr, authority: &str, path: &str) -> Response<Incoming> {
    let mut client = h1_client(addr).await;
    client.send_request(get(authority, path)).await.unwrap()
}

pub async fn scrape(admin: SocketAddr) -> String {
    let response = get_once(admin, "admin", "/metrics").await;
    String::from_utf8(body_bytes(response).await.to_vec()).unwrap()
}

/// The engine a behaviour test runs over: the client speaks HTTP/1.1 or h2c (prior knowledge),
/// and the upstream speaks what the client spoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    H1,
    H2,
}

/// Both engines: every behaviour test of the one request path runs over each.
pub const ENGINES: [Engine; 2] = [Engine::H1, Engine::H2];

/// The value of the series `series` (`name{labels}`) in a scrape, if present.
pub fn sample(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}
