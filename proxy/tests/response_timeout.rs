//! The upstream response timeout and the upgrade-tunnel idle timeout, over real loopback
//! sockets against a backend that accepts connections and never answers (a dead or partitioned
//! peer as the proxy sees it). Each test is bounded in time and waits on events, not on the
//! clock: the configured timeouts are small and the tests assert on what the proxy answers.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const ERROR_HEADER: &str = "conduit-proxy-error";
const TIMEOUT: Duration = Duration::from_millis(200);

/// A backend that accepts connections, reads and discards whatever arrives, and never writes.
/// Reports how many connections it accepted, and each connection's close (EOF from the proxy).
struct Silent {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: mpsc::UnboundedReceiver<usize>,
}

#[expect(
    clippy::unwrap_used,
    reason = "test helper: a failed bind is the report"
)]
async fn silent_backend() -> Silent {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let (tx, closed) = mpsc::unbounded_channel();
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((mut io, _)) = listener.accept().await else {
                return;
            };
            let n = count.fetch_add(1, Ordering::SeqCst) + 1;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(io.read(&mut buf).await, Ok(read) if read > 0) {}
                let _ = tx.send(n);
            });
        }
    });
    Silent {
        addr,
        accepted,
        closed,
    }
}

fn timeout_config() -> conduit_proxy::ProxyConfig {
    let mut config = config();
    config.limits.response_timeout = Some(TIMEOUT);
    config
}

#[tokio::test]
async fn http1_silent_upstream_gets_504_and_its_connection_is_discarded() {
    bounded(async {
        let mut silent = silent_backend().await;
        let proxy = TestProxy::start(timeout_config(), mesh(&[("web.test", &[silent.addr])])).await;
        let mut client = h1_client(proxy.addrs.outbound).await;
        for attempt in 1..=2 {
            let response = client.send_request(get("web.test", "/")).await.unwrap();
            assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
            assert!(
                !response.headers().contains_key("connection"),
                "the client's connection stays usable"
            );
            let reason = response.headers()[ERROR_HEADER].to_str().unwrap();
            assert_eq!(
                reason,
                format!(
                    "upstream {} sent no response headers within 200ms",
                    silent.addr
                )
            );
            body_bytes(response).await;
            // The timed-out connection is closed, not pooled: the next request opens another.
            assert_eq!(silent.closed.recv().await, Some(attempt));
            assert_eq!(silent.accepted.load(Ordering::SeqCst), attempt);
        }
        let text = scrape(proxy.addrs.admin).await;
        let want = "response_total{direction=\"outbound\",authority=\"web.test:80\",status_code=\"504\",classification=\"failure\"} 2";
        assert!(text.contains(want), "missing {want}\n{text}");
    })
    .await;
}

#[tokio::test]
async fn grpc_gets_deadline_exceeded_and_the_h2_connection_is_replaced() {
    bounded(async {
        let silent = silent_backend().await;
        let proxy = TestProxy::start(timeout_config(), mesh(&[("web.test", &[silent.addr])])).await;
        let mut client = h2_client(proxy.addrs.outbound).await;
        for attempt in 1..=2 {
            let request = Request::builder()
                .method("POST")
                .uri("http://web.test/pkg.Svc/Method")
                .header("content-type", "application/grpc")
                .body(full(""))
                .unwrap();
            let response = client.send_request(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()["grpc-status"], "4");
            assert!(response.headers().contains_key(ERROR_HEADER));
            // The stalled h2 connection is no longer offered to new requests.
            assert_eq!(silent.accepted.load(Ordering::SeqCst), attempt);
        }
    })
    .await;
}

#[tokio::test]
async fn the_balancer_steers_away_from_an_endpoint_that_timed_out() {
    bounded(async {
        let silent = silent_backend().await;
        let fast = named_backend("fast").await;
        let mut config = timeout_config();
        // A fresh endpoint looks cheaper than any measured one, so the silent endpoint is
        // picked as soon as it is a candidate; only the timeout's RTT observation (200 ms)
        // keeps it from being picked again.
        config.balancer.default_rtt = Duration::from_micros(1);
        let proxy = TestProxy::start(config, mesh(&[("web.test", &[silent.addr, fast])])).await;
        let mut client = h1_client(proxy.addrs.outbound).await;
        let mut timeouts = 0;
        for _ in 0..20 {
            let response = client.send_request(get("web.test", "/")).await.unwrap();
            match response.status() {
                StatusCode::OK => assert_eq!(body_bytes(response).await, "fast"),
                StatusCode::GATEWAY_TIMEOUT => {
                    timeouts += 1;
                    body_bytes(response).await;
                }
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(timeouts, 1, "the silent endpoint was tried again");
        assert_eq!(silent.accepted.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test]
async fn a_slow_answer_within_the_timeout_passes() {
    bounded(async {
        let app = backend(false, |_req| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Response::new(full("late but in time"))
        })
        .await;
        let proxy = TestProxy::start(timeout_config(), mesh(&[("web.test", &[app])])).await;
        let response = get_once(proxy.addrs.outbound, "web.test", "/").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_bytes(response).await, "late but in time");
    })
    .await;
}

#[tokio::test]
async fn an_idle_upgrade_tunnel_is_closed() {
    bounded(async {
        let app = backend(false, |mut req: Request<hyper::body::Incoming>| async move {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                // Holds the upgraded connection open and silent until the proxy closes it.
                let mut io = hyper_util::rt::TokioIo::new(upgrade.await.unwrap());
                let mut buf = [0u8; 64];
                while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(full(""))
                .unwrap()
        })
        .await;
        let mut config = config();
        config.limits.idle_timeout = TIMEOUT;
        let proxy = TestProxy::start(config, mesh(&[("web.test", &[app])])).await;
        let mut stream = TcpStream::connect(proxy.addrs.outbound).await.unwrap();
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nhost: web.test\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
        // Nothing moves either way: the proxy closes the tunnel (EOF), well inside the bound.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    })
    .await;
}

/// Goal: with the response timeout off (`response_timeout: 0`, for long-polling apps), a
/// client that goes away still ends its request's wait: the proxy notices the client's close
/// while it waits for response headers, drops the upstream connection, and counts the request
/// as abandoned (499). Method: a GET to a silent backend, then the client closes; the backend
/// sees the proxy close its connection.
#[tokio::test]
async fn without_a_response_timeout_a_vanished_client_ends_the_wait() {
    bounded(async {
        let mut silent = silent_backend().await;
        let mut config = config();
        config.limits.response_timeout = None;
        let proxy = TestProxy::start(config, mesh(&[("web.test", &[silent.addr])])).await;
        let mut io = TcpStream::connect(proxy.addrs.outbound).await.unwrap();
        io.write_all(b"GET / HTTP/1.1\r\nhost: web.test\r\n\r\n")
            .await
            .unwrap();
        // The request reaches the backend, which never answers; the client then goes.
        while silent.accepted.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        drop(io);
        assert_eq!(silent.closed.recv().await, Some(1), "the upstream wait ended");
        let text = scrape(proxy.addrs.admin).await;
        let want = "response_total{direction=\"outbound\",authority=\"web.test:80\",status_code=\"499\",classification=\"success\"} 1";
        assert!(text.contains(want), "missing {want}\n{text}");
    })
    .await;
}
