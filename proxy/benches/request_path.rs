//! The proxy's request path in process, without sockets: a client, the proxy and an upstream
//! on one current-thread runtime, connected by in-memory pipes (`MemNet`, a [`Net`] over
//! `tokio::io::duplex`). Each iteration is one request through the whole path (detection
//! done, the route, the balancer's pick, the pooled upstream connection, the response copied
//! back, metrics), so a regression in the proxy's own work shows here without the kernel's
//! noise. Every figure includes the client's and the upstream's share, which do not change
//! between proxy versions.
//!
//! `cargo bench -p conduit-proxy --bench request_path`

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use conduit_proxy::config::{DiscoveryConfig, ProxyConfig};
use conduit_proxy::net::{Listener, Net};
use conduit_proxy::{Proxy, StaticDiscover};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio::sync::mpsc;

/// In-memory pipes: `bind` registers an address, `connect` hands the listener one end of a
/// fresh duplex pipe.
#[derive(Clone, Default)]
struct MemNet {
    listeners: Arc<Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<DuplexStream>>>>,
}

struct MemListener {
    addr: SocketAddr,
    accepted: tokio::sync::Mutex<mpsc::UnboundedReceiver<DuplexStream>>,
}

/// Bytes each pipe buffers in each direction.
const PIPE_BYTES: usize = 64 * 1024;

impl Listener for MemListener {
    type Io = DuplexStream;

    async fn accept(&self) -> io::Result<(DuplexStream, SocketAddr)> {
        let next = self.accepted.lock().await.recv().await;
        next.map(|io| (io, SocketAddr::from(([10, 0, 0, 9], 1))))
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

impl Net for MemNet {
    type Io = DuplexStream;
    type Listener = MemListener;

    async fn bind(&self, addr: SocketAddr) -> io::Result<MemListener> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.listeners
            .lock()
            .expect("not poisoned")
            .insert(addr, tx);
        Ok(MemListener {
            addr,
            accepted: tokio::sync::Mutex::new(rx),
        })
    }

    async fn connect(&self, addr: SocketAddr) -> io::Result<DuplexStream> {
        let listener = self
            .listeners
            .lock()
            .expect("not poisoned")
            .get(&addr)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        listener
            .send(theirs)
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused))?;
        Ok(ours)
    }

    async fn resolve(&self, _host: &str, _port: u16) -> io::Result<Vec<SocketAddr>> {
        Err(io::Error::from(io::ErrorKind::NotFound))
    }
}

const OUTBOUND: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
    4140,
);
const ADMIN: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)),
    4191,
);
const H1_APP: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)),
    80,
);
const H2_APP: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3)),
    80,
);

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nhello world\n";

/// An HTTP/1.1 upstream that answers every request head with [`RESPONSE`] (requests carry no
/// body).
async fn h1_app(listener: MemListener) {
    while let Ok((mut io, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            let mut chunk = [0u8; 4096];
            loop {
                let Ok(n) = io.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    buf.drain(..end + 4);
                    if io.write_all(RESPONSE).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// An h2c upstream (hyper) answering `hello world`.
async fn h2_app(listener: MemListener) {
    while let Ok((io, _)) = listener.accept().await {
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    Bytes::from_static(b"hello world\n"),
                )))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(io), service)
                .await;
        });
    }
}

/// The mesh: `hello` (HTTP/1.1) and `hello2` (h2c); with `profile`, `hello` has the ten
/// routes of the loopback benchmark's routed target, and requests match the last.
fn mesh(profile: bool) -> conduit_core::mesh::Mesh {
    let mut yaml = format!("services:\n  hello:\n    endpoints:\n      - addr: {H1_APP}\n");
    if profile {
        yaml.push_str(
            r#"    profile:
      routes:
        - { name: create-order, match: { method: POST, path: { prefix: /api/orders } } }
        - { name: get-order, match: { method: GET, path: { regex: "/api/orders/[0-9]+" } } }
        - { name: list-orders, match: { method: GET, path: { exact: /api/orders } } }
        - name: beta-users
          match: { path: { prefix: /api/users/ }, headers: [ { name: x-tenant, exact: beta } ] }
        - { name: delete, match: { method: DELETE, path: { prefix: /api/ } } }
        - { name: assets, match: { path: { regex: "/static/.+[.](css|js)" } } }
        - { name: health, match: { path: { prefix: /healthz } } }
        - { name: update, match: { method: PUT, path: { prefix: /api/ } } }
        - { name: metrics, match: { path: { exact: /metrics } } }
        - name: root
          match: { method: GET, path: { exact: / } }
          timeouts: { request: 10s }
"#,
        );
    }
    yaml.push_str(&format!(
        "  hello2:\n    endpoints:\n      - addr: {H2_APP}\n"
    ));
    conduit_proto::mesh_file::parse(&yaml).expect("the bench's mesh parses")
}

/// Starts the upstreams and a proxy on `net`.
async fn start(net: &MemNet, profile: bool) {
    tokio::spawn(h1_app(net.bind(H1_APP).await.expect("bind")));
    tokio::spawn(h2_app(net.bind(H2_APP).await.expect("bind")));
    let mut config = ProxyConfig::with_discovery(DiscoveryConfig::File("unused".into()));
    config.outbound_addr = OUTBOUND;
    config.admin_addr = ADMIN;
    let proxy = Proxy::bind(config, net.clone())
        .await
        .expect("the proxy binds");
    let discovery = Arc::new(StaticDiscover::new(mesh(profile)));
    tokio::spawn(async move {
        let _ = proxy.serve(discovery, 1, std::future::pending()).await;
    });
}

/// One kept-alive HTTP/1.1 request and its whole response.
async fn h1_request(io: &mut DuplexStream, buf: &mut Vec<u8>) {
    io.write_all(b"GET / HTTP/1.1\r\nhost: hello\r\n\r\n")
        .await
        .expect("write");
    buf.clear();
    let mut chunk = [0u8; 1024];
    loop {
        let n = io.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the proxy closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        if buf.ends_with(b"hello world\n") {
            return;
        }
    }
}

fn request_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut group = c.benchmark_group("request_path");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for (name, profile) in [("h1", false), ("h1_10_routes", true)] {
        let net = MemNet::default();
        let mut io = runtime.block_on(async {
            start(&net, profile).await;
            net.connect(OUTBOUND).await.expect("connect")
        });
        let mut buf = Vec::new();
        // The first request opens the upstream connection and resolves the service.
        runtime.block_on(h1_request(&mut io, &mut buf));
        group.bench_function(name, |b| {
            b.iter(|| runtime.block_on(h1_request(&mut io, &mut buf)));
        });
    }
    let net = MemNet::default();
    let mut sender = runtime.block_on(async {
        start(&net, false).await;
        let io = net.connect(OUTBOUND).await.expect("connect");
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .expect("h2 handshake");
        tokio::spawn(connection);
        sender
    });
    let h2_request = |sender: &mut hyper::client::conn::http2::SendRequest<Empty<Bytes>>| {
        let request = http::Request::get("http://hello2/")
            .body(Empty::new())
            .expect("a request");
        let sent = sender.send_request(request);
        async move {
            let response = sent.await.expect("a response");
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.expect("a body");
        }
    };
    runtime.block_on(h2_request(&mut sender));
    group.bench_function("h2", |b| {
        b.iter(|| runtime.block_on(h2_request(&mut sender)));
    });
    group.finish();
}

criterion_group!(benches, request_path);
criterion_main!(benches);
