//! HTTP behaviour of the proxy over real loopback sockets: protocols, bodies, upgrades,
//! balancing, errors and metrics. Each test is bounded in time.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ERROR_HEADER: &str = "conduit-proxy-error";

#[tokio::test]
async fn http1_keep_alive_and_chunked() {
    bounded(async {
        let app = backend(false, |req: Request<hyper::body::Incoming>| async move {
            let host = req.headers()["host"].to_str().unwrap().to_owned();
            let hop = req.headers().contains_key("x-hop");
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let reply = format!("{host} {} hop={hop}", body.len());
            Response::builder()
                .header("x-app", "yes")
                .body(full(reply))
                .unwrap()
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut client = h1_client(proxy.addrs.outbound).await;
        for i in 0..3 {
            let response = client
                .send_request(get("web.test", &format!("/{i}")))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert!(!response.headers().contains_key(ERROR_HEADER));
            assert_eq!(body_bytes(response).await, "web.test 0 hop=false");
        }
        // A chunked request body (no content-length) with a hop-by-hop header named in Connection.
        let chunks = futures_util::stream::iter((0..10).map(|_| {
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from(vec![
                b'x';
                1000
            ])))
        }));
        let request = Request::builder()
            .method("POST")
            .uri("/chunked")
            .header("host", "web.test")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .body(StreamBody::new(chunks).map_err(|n| match n {}).boxed())
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.headers()["x-app"], "yes");
        assert_eq!(body_bytes(response).await, "web.test 10000 hop=false");
    })
    .await;
}

#[tokio::test]
async fn h2c_many_concurrent_streams() {
    bounded(async {
        let app = backend(true, |req: Request<hyper::body::Incoming>| async move {
            let path = req.uri().path().to_owned();
            tokio::time::sleep(Duration::from_millis(20)).await;
            Response::new(full(path))
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let client = h2_client(proxy.addrs.outbound).await;
        let mut tasks = Vec::new();
        for i in 0..200 {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let request = Request::builder()
                    .uri(format!("http://web.test/{i}"))
                    .body(full(""))
                    .unwrap();
                let response = client.send_request(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                assert_eq!(body_bytes(response).await, format!("/{i}"));
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn ten_megabytes_each_way_streamed() {
    const SIZE: usize = 10 * 1024 * 1024;
    bounded(async {
        // The app counts what it receives and answers with SIZE bytes of its own, in chunks.
        let app = backend(false, |req: Request<hyper::body::Incoming>| async move {
            let mut body = req.into_body();
            let mut received = 0usize;
            while let Some(frame) = body.frame().await {
                received += frame.unwrap().data_ref().map_or(0, Bytes::len);
            }
            assert_eq!(received, SIZE);
            let chunks = futures_util::stream::iter((0..SIZE / 65536).map(|_| {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                    Bytes::from(vec![7u8; 65536]),
                ))
            }));
            Response::new(StreamBody::new(chunks).boxed())
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut client = h1_client(proxy.addrs.outbound).await;
        let chunks = futures_util::stream::iter((0..SIZE / 65536).map(|_| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                Bytes::from(vec![1u8; 65536]),
            ))
        }));
        let request = Request::builder()
            .method("PUT")
            .uri("/upload")
            .header("host", "web.test")
            .body(StreamBody::new(chunks).boxed())
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        let mut body = response.into_body();
        let mut received = 0usize;
        while let Some(frame) = body.frame().await {
            received += frame.unwrap().data_ref().map_or(0, Bytes::len);
        }
        assert_eq!(received, SIZE);
    })
    .await;
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    bounded(async {
        let app = backend(false, |mut req: Request<hyper::body::Incoming>| async move {
            assert_eq!(req.headers()["upgrade"], "websocket");
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = hyper_util::rt::TokioIo::new(upgrade.await.unwrap());
                let mut buf = [0u8; 64];
                loop {
                    let n = io.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    io.write_all(&buf[..n]).await.unwrap();
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(full(""))
                .unwrap()
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut stream = TcpStream::connect(proxy.addrs.outbound).await.unwrap();
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nhost: web.test\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        for message in [&b"hello"[..], b"world!"] {
            stream.write_all(message).await.unwrap();
            let mut echo = vec![0u8; message.len()];
            stream.read_exact(&mut echo).await.unwrap();
            assert_eq!(echo, message);
        }
    })
    .await;
}

#[tokio::test]
async fn opaque_tcp_is_forwarded() {
    bounded(async {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut io, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = io.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let mut config = config();
        config.outbound_default_target = Some(echo_addr);
        config.app_addr = Some(echo_addr);
        let proxy = TestProxy::start(config, mesh(&[])).await;
        for addr in [proxy.addrs.outbound, proxy.addrs.inbound.unwrap()] {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            // Binary, not an HTTP method: detected as opaque at once.
            let message = b"\x00\x01binary protocol\n";
            stream.write_all(message).await.unwrap();
            let mut echo = vec![0u8; message.len()];
            stream.read_exact(&mut echo).await.unwrap();
            assert_eq!(&echo, message);
        }
    })
    .await;
}

#[tokio::test]
async fn inbound_forwards_to_the_app() {
    bounded(async {
        let app = named_backend("app").await;
        let mut config = config();
        config.app_addr = Some(app);
        let proxy = TestProxy::start(config, mesh(&[])).await;
        let response = get_once(proxy.addrs.inbound.unwrap(), "anything.test", "/").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_bytes(response).await, "app");
    })
    .await;
}

#[tokio::test]
async fn app_errors_pass_through_untouched() {
    bounded(async {
        let app = backend(false, |_req| async {
            Response::builder()
                .status(503)
                .header("x-app", "1")
                .body(full("app says no"))
                .unwrap()
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let response = get_once(proxy.addrs.outbound, "web.test", "/").await;
        assert_eq!(response.status(), 503);
        assert!(!response.headers().contains_key(ERROR_HEADER));
        assert_eq!(body_bytes(response).await, "app says no");
    })
    .await;
}

#[tokio::test]
async fn refused_upstream_gives_502_with_the_header() {
    bounded(async {
        // A port that was bound and released: connections are refused.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[closed])])).await;
        let response = get_once(proxy.addrs.outbound, "web.test", "/").await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let reason = response.headers()[ERROR_HEADER].to_str().unwrap();
        assert!(reason.contains("connect to"), "{reason}");
    })
    .await;
}

#[tokio::test]
async fn unknown_authority_gives_404() {
    bounded(async {
        let proxy = TestProxy::start(config(), mesh(&[])).await;
        let response = get_once(proxy.addrs.outbound, "nope.test", "/").await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let reason = response.headers()[ERROR_HEADER].to_str().unwrap();
        assert!(reason.contains("not in discovery"), "{reason}");
    })
    .await;
}

#[tokio::test]
async fn no_endpoints_gives_504_after_the_failfast_timeout() {
    bounded(async {
        let mut config = config();
        config.queue.failfast_timeout = Duration::from_millis(300);
        let proxy = TestProxy::start(config, mesh(&[("web.test", &[])])).await;
        let started = conduit_proxy::clock::Clock::new();
        let response = get_once(proxy.addrs.outbound, "web.test", "/").await;
        let waited = elapsed(&started);
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(
            response.headers()[ERROR_HEADER]
                .to_str()
                .unwrap()
                .contains("fail-fast")
        );
        assert!(
            waited >= Duration::from_millis(250),
            "answered after {waited:?}"
        );
        // Once failing fast, requests are refused at once.
        let started = conduit_proxy::clock::Clock::new();
        let response = get_once(proxy.addrs.outbound, "web.test", "/").await;
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(elapsed(&started) < Duration::from_millis(250));
    })
    .await;
}

#[tokio::test]
async fn grpc_callers_get_trailers_only_errors() {
    bounded(async {
        let proxy = TestProxy::start(config(), mesh(&[])).await;
        let mut client = h2_client(proxy.addrs.outbound).await;
        let request = Request::builder()
            .method("POST")
            .uri("http://nope.test/pkg.Svc/Method")
            .header("content-type", "application/grpc")
            .body(full(""))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "5");
        assert!(response.headers().contains_key(ERROR_HEADER));
    })
    .await;
}

#[tokio::test]
async fn a_ten_times_slower_endpoint_gets_a_smaller_share() {
    bounded(async {
        let fast = backend(false, |_req| async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Response::new(full("fast"))
        })
        .await;
        let slow = backend(false, |_req| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Response::new(full("slow"))
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[fast, slow])])).await;
        let (mut n_fast, mut n_slow) = (0, 0);
        // Four concurrent clients, so in-flight load matters as well as latency.
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let addr = proxy.addrs.outbound;
            tasks.push(tokio::spawn(async move {
                let mut client = h1_client(addr).await;
                let mut names = Vec::new();
                for _ in 0..50 {
                    let response = client.send_request(get("web.test", "/")).await.unwrap();
                    names.push(body_bytes(response).await);
                }
                names
            }));
        }
        for task in tasks {
            for name in task.await.unwrap() {
                if name == "fast" {
                    n_fast += 1
                } else {
                    n_slow += 1
                }
            }
        }
        assert_eq!(n_fast + n_slow, 200);
        assert!(n_slow * 3 < n_fast, "fast {n_fast}, slow {n_slow}");
    })
    .await;
}

#[tokio::test]
async fn metrics_count_the_requests_sent() {
    bounded(async {
        let app = backend(false, |req: Request<hyper::body::Incoming>| async move {
            let status = if req.uri().path() == "/fail" { 500 } else { 200 };
            Response::builder().status(status).body(full("")).unwrap()
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut client = h1_client(proxy.addrs.outbound).await;
        for i in 0..7 {
            let path = if i < 5 { "/ok" } else { "/fail" };
            let response = client.send_request(get("web.test", path)).await.unwrap();
            body_bytes(response).await;
        }
        let text = scrape(proxy.addrs.admin).await;
        for want in [
            "request_total{direction=\"outbound\",authority=\"web.test:80\"} 7",
            "response_total{direction=\"outbound\",authority=\"web.test:80\",status_code=\"200\",classification=\"success\"} 5",
            "response_total{direction=\"outbound\",authority=\"web.test:80\",status_code=\"500\",classification=\"failure\"} 2",
            "response_latency_ms_count{direction=\"outbound\",authority=\"web.test:80\",status_code=\"200\"} 5",
            "response_latency_ms_bucket{direction=\"outbound\",authority=\"web.test:80\",status_code=\"200\",le=\"+Inf\"} 5",
            "tcp_open_total{direction=\"outbound\",peer=\"src\"} 1",
            "tcp_open_connections{direction=\"outbound\",peer=\"dst\"} 1",
            "process_resident_memory_bytes ",
            "process_open_fds ",
        ] {
            assert!(text.contains(want), "missing {want}\n{text}");
        }
        let live = get_once(proxy.addrs.admin, "admin", "/live").await;
        assert_eq!(live.status(), 200);
        let ready = get_once(proxy.addrs.admin, "admin", "/ready").await;
        assert_eq!(ready.status(), 200);
    })
    .await;
}

/// Time since the clock was made (read through the proxy's clock seam, as the lints require).
fn elapsed(clock: &conduit_proxy::clock::Clock) -> Duration {
    Duration::from_nanos(clock.now().as_nanos())
}

#[expect(
    clippy::unwrap_used,
    reason = "test helper: a failed connect is the report"
)]
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn a_malformed_request_line_gets_400() {
    bounded(async {
        let proxy = TestProxy::start(config(), mesh(&[])).await;
        let response = raw_exchange(
            proxy.addrs.outbound,
            b"GET /a b c HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 400"), "{response}");
        assert!(
            response.contains("conduit-proxy-error: malformed request"),
            "{response}"
        );
    })
    .await;
}

#[tokio::test]
async fn oversized_headers_get_431() {
    bounded(async {
        let mut config = config();
        config.limits.max_header_bytes = 16 * 1024;
        let proxy = TestProxy::start(config, mesh(&[])).await;
        let mut request = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ".to_vec();
        request.extend(std::iter::repeat_n(b'a', 20 * 1024));
        request.extend(b"\r\n\r\n");
        let response = raw_exchange(proxy.addrs.outbound, &request).await;
        assert!(response.starts_with("HTTP/1.1 431"), "{response}");
        assert!(
            response.contains("conduit-proxy-error: request headers exceed"),
            "{response}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_slow_client_is_cut_off_while_others_are_served() {
    bounded(async {
        let app = named_backend("app").await;
        let mut config = config();
        config.limits.header_read_timeout = Duration::from_millis(300);
        let proxy = TestProxy::start(config, mesh(&[("web.test", &[app])])).await;
        let mut slow = TcpStream::connect(proxy.addrs.outbound).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: web")
            .await
            .unwrap();
        // Another client is served while the slow one dawdles.
        let response = get_once(proxy.addrs.outbound, "web.test", "/").await;
        assert_eq!(body_bytes(response).await, "app");
        let started = conduit_proxy::clock::Clock::new();
        let mut rest = Vec::new();
        let n = slow.read_to_end(&mut rest).await.unwrap_or(0);
        assert_eq!(n, 0, "the slow client gets no response, just a close");
        assert!(elapsed(&started) < Duration::from_secs(5));
    })
    .await;
}

#[tokio::test]
async fn a_kept_alive_connection_whose_next_head_dawdles_is_closed_after_the_idle_timeout() {
    bounded(async {
        let app = named_backend("app").await;
        let mut config = config();
        config.limits.idle_timeout = Duration::from_millis(300);
        let proxy = TestProxy::start(config, mesh(&[("web.test", &[app])])).await;
        let mut conn = TcpStream::connect(proxy.addrs.outbound).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nhost: web.test\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 1024];
        let n = conn.read(&mut first).await.unwrap();
        let head = String::from_utf8_lossy(&first[..n]);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // The second request's head trickles in and never completes.
        conn.write_all(b"GET / HTTP/1.1\r\nhost: web")
            .await
            .unwrap();
        let started = conduit_proxy::clock::Clock::new();
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest).await;
        let waited = elapsed(&started);
        assert!(
            !String::from_utf8_lossy(&rest).contains("HTTP/1.1"),
            "no second response: {rest:?}"
        );
        assert!(
            waited >= Duration::from_millis(200),
            "closed too early: {waited:?}"
        );
        assert!(
            waited < Duration::from_secs(5),
            "closed too late: {waited:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    bounded(async {
        let arrived = std::sync::Arc::new(tokio::sync::Notify::new());
        let notify = std::sync::Arc::clone(&arrived);
        let app = backend(false, move |_req| {
            let notify = std::sync::Arc::clone(&notify);
            async move {
                notify.notify_one();
                // The app is still working when the shutdown arrives.
                tokio::time::sleep(Duration::from_millis(300)).await;
                Response::new(full("done"))
            }
        })
        .await;
        let mut proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let outbound = proxy.addrs.outbound;
        let in_flight = tokio::spawn(async move { get_once(outbound, "web.test", "/").await });
        arrived.notified().await;
        let mut admin = h1_client(proxy.addrs.admin).await;
        let shutdown = Request::builder()
            .method("POST")
            .uri("/shutdown")
            .header("host", "admin")
            .body(full(""))
            .unwrap();
        let response = admin.send_request(shutdown).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let response = in_flight.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_bytes(response).await, "done");
        (&mut proxy.task).await.unwrap();
        assert!(
            TcpStream::connect(outbound).await.is_err(),
            "the listener is closed after drain"
        );
        proxy.stop();
    })
    .await;
}
