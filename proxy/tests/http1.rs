//! HTTP/1 on the wire through the proxy's own engine: pipelining, framing edge cases,
//! interim responses, early answers, pooled connections the server closed, tunnels. Raw
//! sockets on both sides where the exact bytes matter. Each test is bounded in time.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{Request, Response};
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ERROR_HEADER: &str = "conduit-proxy-error";

/// A backend speaking raw bytes: `serve` gets each accepted connection.
#[expect(clippy::unwrap_used, reason = "test helper: a failure is the report")]
async fn raw_backend<S, F>(serve: S) -> SocketAddr
where
    S: Fn(TcpStream) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            tokio::spawn(serve(io));
        }
    });
    addr
}

/// Reads until a blank line; returns the head.
#[expect(clippy::unwrap_used, reason = "test helper: a failure is the report")]
async fn read_head<R: AsyncRead + Unpin>(io: &mut R) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if io.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// Reads exactly `n` bytes.
#[expect(clippy::unwrap_used, reason = "test helper: a failure is the report")]
async fn read_n<R: AsyncRead + Unpin>(io: &mut R, n: usize) -> String {
    let mut buf = vec![0u8; n];
    io.read_exact(&mut buf).await.unwrap();
    String::from_utf8(buf).unwrap()
}

/// A backend that reads each request head and answers with `response`, then closes.
async fn canned_backend(response: &'static [u8]) -> SocketAddr {
    raw_backend(move |mut io| async move {
        read_head(&mut io).await;
        let _ = io.write_all(response).await;
    })
    .await
}

/// Sends `request` on a new connection to the outbound listener and reads until the proxy
/// closes it.
#[expect(clippy::unwrap_used, reason = "test helper: a failure is the report")]
async fn exchange_all(proxy: &TestProxy, request: &[u8]) -> String {
    let mut conn = connect(proxy).await;
    conn.write_all(request).await.unwrap();
    let mut all = String::new();
    conn.read_to_string(&mut all).await.unwrap();
    all
}

#[expect(clippy::unwrap_used, reason = "test helper: a failure is the report")]
async fn connect(proxy: &TestProxy) -> TcpStream {
    TcpStream::connect(proxy.addrs.outbound).await.unwrap()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    bounded(async {
        let app = backend(false, |req: Request<hyper::body::Incoming>| async move {
            Response::new(full(req.uri().path().to_owned()))
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut conn = connect(&proxy).await;
        conn.write_all(
            b"GET /one HTTP/1.1\r\nhost: web.test\r\n\r\n\
              GET /two HTTP/1.1\r\nhost: web.test\r\n\r\n\
              GET /three HTTP/1.1\r\nhost: web.test\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut all = String::new();
        conn.read_to_string(&mut all).await.unwrap();
        let bodies: Vec<&str> = all
            .split("HTTP/1.1 200 OK\r\n")
            .skip(1)
            .map(|r| r.rsplit("\r\n\r\n").next().unwrap())
            .collect();
        assert_eq!(bodies, ["/one", "/two", "/three"], "{all}");
        assert!(all.contains("connection: close"), "{all}");
    })
    .await;
}

#[tokio::test]
async fn ambiguous_framing_is_refused_before_reaching_the_app() {
    bounded(async {
        let seen = Arc::new(AtomicUsize::new(0));
        let app = {
            let seen = Arc::clone(&seen);
            backend(false, move |_req| {
                seen.fetch_add(1, Ordering::SeqCst);
                async move { Response::new(full("app")) }
            })
            .await
        };
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        // A classic smuggling shape: both lengths, and a second request hidden in the body.
        let mut conn = connect(&proxy).await;
        conn.write_all(
            b"POST / HTTP/1.1\r\nhost: web.test\r\ncontent-length: 4\r\n\
              transfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nhost: web.test\r\n\r\n",
        )
        .await
        .unwrap();
        let mut all = String::new();
        conn.read_to_string(&mut all).await.unwrap();
        assert!(all.starts_with("HTTP/1.1 400"), "{all}");
        assert!(all.contains(ERROR_HEADER), "{all}");
        assert_eq!(all.matches("HTTP/1.1").count(), 1, "{all}");
        assert_eq!(seen.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test]
async fn a_bad_request_later_on_a_kept_alive_connection_gets_the_error_header() {
    bounded(async {
        let app = named_backend("app").await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut conn = connect(&proxy).await;
        conn.write_all(b"GET / HTTP/1.1\r\nhost: web.test\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(read_n(&mut conn, 3).await, "app");
        conn.write_all(b"GET / HTTP/1.1\r\nhost: web.test\r\nbad header\r\n\r\n")
            .await
            .unwrap();
        let mut rest = String::new();
        conn.read_to_string(&mut rest).await.unwrap();
        assert!(rest.starts_with("HTTP/1.1 400"), "{rest}");
        assert!(
            rest.contains("conduit-proxy-error: malformed request"),
            "{rest}"
        );
    })
    .await;
}

#[tokio::test]
async fn expect_100_continue_is_relayed() {
    bounded(async {
        let app = backend(false, |req: Request<hyper::body::Incoming>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(full(format!("got {}", body.len())))
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut conn = connect(&proxy).await;
        conn.write_all(
            b"PUT /up HTTP/1.1\r\nhost: web.test\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
        // The client waits for the go-ahead, which only the app can give.
        let interim = read_head(&mut conn).await;
        assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
        conn.write_all(b"hello").await.unwrap();
        let head = read_head(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(read_n(&mut conn, 5).await, "got 5");
    })
    .await;
}

#[tokio::test]
async fn a_close_delimited_response_is_chunked_for_the_client_and_its_connection_not_reused() {
    bounded(async {
        let connections = Arc::new(AtomicUsize::new(0));
        let app = {
            let connections = Arc::clone(&connections);
            raw_backend(move |mut io| {
                connections.fetch_add(1, Ordering::SeqCst);
                async move {
                    read_head(&mut io).await;
                    let _ = io
                        .write_all(b"HTTP/1.1 200 OK\r\nx-app: 1\r\n\r\nhello")
                        .await;
                }
            })
            .await
        };
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut conn = connect(&proxy).await;
        for _ in 0..2 {
            conn.write_all(b"GET / HTTP/1.1\r\nhost: web.test\r\n\r\n")
                .await
                .unwrap();
            let head = read_head(&mut conn).await;
            assert!(head.contains("transfer-encoding: chunked"), "{head}");
            assert!(head.contains("x-app: 1"), "{head}");
            assert_eq!(read_n(&mut conn, 15).await, "5\r\nhello\r\n0\r\n\r\n");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test]
async fn an_http10_client_gets_its_response_and_a_close() {
    bounded(async {
        let app = backend(false, |_req| async move {
            // A streamed body (chunked upstream): HTTP/1.0 cannot take chunks.
            let chunks = futures_util::stream::iter(["ab", "cd"].map(|c| {
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from(c)))
            }));
            Response::new(
                http_body_util::StreamBody::new(chunks)
                    .map_err(|never| match never {})
                    .boxed(),
            )
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let all = exchange_all(&proxy, b"GET / HTTP/1.0\r\nhost: web.test\r\n\r\n").await;
        assert!(all.starts_with("HTTP/1.1 200"), "{all}");
        assert!(!all.contains("transfer-encoding"), "{all}");
        assert!(all.contains("connection: close"), "{all}");
        assert!(all.ends_with("\r\n\r\nabcd"), "{all}");
    })
    .await;
}

#[tokio::test]
async fn a_pooled_connection_the_app_closed_is_not_used_again() {
    bounded(async {
        // Answers one request per connection with keep-alive, then closes it anyway (as an
        // app with a short idle timeout does).
        let connections = Arc::new(AtomicUsize::new(0));
        let app = {
            let connections = Arc::clone(&connections);
            raw_backend(move |mut io| {
                connections.fetch_add(1, Ordering::SeqCst);
                async move {
                    read_head(&mut io).await;
                    let _ = io
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            })
            .await
        };
        let mut config = config();
        config.app_addr = Some(app);
        let proxy = TestProxy::start(config, mesh(&[("web.test", &[app])])).await;
        // Whether the proxy sees the close while the connection is idle in its pool, or only
        // when the resent request meets it, idempotent requests without a body succeed: they
        // were provably not processed, and go again on a new connection (RFC 9112 §9.3.1).
        let listeners = [proxy.addrs.outbound, proxy.addrs.inbound.unwrap()];
        for (method, listener) in ["GET", "DELETE", "GET", "PUT"]
            .into_iter()
            .flat_map(|m| listeners.map(|l| (m, l)))
        {
            let mut conn = TcpStream::connect(listener).await.unwrap();
            conn.write_all(
                format!("{method} / HTTP/1.1\r\nhost: web.test\r\ncontent-length: 0\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let head = read_head(&mut conn).await;
            assert!(
                head.starts_with("HTTP/1.1 200"),
                "{method} via {listener}: {head}"
            );
            assert_eq!(read_n(&mut conn, 2).await, "ok");
        }
        assert!(connections.load(Ordering::SeqCst) >= 8);
    })
    .await;
}

#[tokio::test]
async fn an_early_answer_ends_the_upload_and_closes_the_client_connection() {
    bounded(async {
        // Refuses the upload without reading it.
        let app = canned_backend(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let all = exchange_all(
            &proxy,
            b"POST / HTTP/1.1\r\nhost: web.test\r\ncontent-length: 1000000\r\n\r\npart",
        )
        .await;
        assert!(all.starts_with("HTTP/1.1 413"), "{all}");
        assert!(all.contains("connection: close"), "{all}");
        assert!(
            !all.contains(ERROR_HEADER),
            "the app's answer passes through: {all}"
        );
    })
    .await;
}

#[tokio::test]
async fn head_responses_carry_no_body() {
    bounded(async {
        let app = backend(false, |_req| async move { Response::new(full("hello")) }).await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut conn = connect(&proxy).await;
        conn.write_all(b"HEAD / HTTP/1.1\r\nhost: web.test\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("content-length: 5"), "{head}");
        // The connection is in sync: the next response follows at once.
        conn.write_all(b"GET / HTTP/1.1\r\nhost: web.test\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(read_n(&mut conn, 5).await, "hello");
    })
    .await;
}

#[tokio::test]
async fn a_truncated_upstream_body_cuts_the_client_off_and_counts_a_failure() {
    bounded(async {
        let app = canned_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b").await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let all = exchange_all(&proxy, b"GET / HTTP/1.1\r\nhost: web.test\r\n\r\n").await;
        assert!(all.starts_with("HTTP/1.1 200"), "{all}");
        assert!(all.ends_with("\r\n\r\nonly ten b"), "{all}");
        let metrics = scrape(proxy.addrs.admin).await;
        let failure = metrics
            .lines()
            .find(|l| l.starts_with("response_total") && l.contains("classification=\"failure\""))
            .unwrap_or_else(|| panic!("no failure counted:\n{metrics}"));
        assert!(failure.ends_with(" 1"), "{failure}");
    })
    .await;
}

#[tokio::test]
async fn connect_is_tunnelled() {
    bounded(async {
        let app = raw_backend(|mut io| async move {
            let head = read_head(&mut io).await;
            assert!(head.starts_with("CONNECT web.test:80 HTTP/1.1"), "{head}");
            let _ = io
                .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await;
            let (mut r, mut w) = io.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut conn = connect(&proxy).await;
        conn.write_all(b"CONNECT web.test:80 HTTP/1.1\r\nhost: web.test:80\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        conn.write_all(b"ping").await.unwrap();
        assert_eq!(read_n(&mut conn, 4).await, "ping");
    })
    .await;
}

#[tokio::test]
async fn an_app_streaming_both_ways_gets_the_upload_after_answering() {
    bounded(async {
        // Answers at once, then echoes the upload's raw bytes as they come, in chunks.
        let app = raw_backend(|mut io| async move {
            read_head(&mut io).await;
            let _ = io
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.ends_with(b"0\r\n\r\n") {
                let Ok(n) = io.read(&mut buf).await else { return };
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
                let chunk = format!("{n:x}\r\n");
                let _ = io.write_all(chunk.as_bytes()).await;
                let _ = io.write_all(&buf[..n]).await;
                let _ = io.write_all(b"\r\n").await;
            }
            let _ = io.write_all(b"0\r\n\r\n").await;
        })
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut conn = connect(&proxy).await;
        conn.write_all(
            b"POST /duplex HTTP/1.1\r\nhost: web.test\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut conn).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // The first piece comes back before the upload ends...
        let mut echoed = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&echoed).contains("hello") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&echoed));
            echoed.extend_from_slice(&buf[..n]);
        }
        // ...and the rest of the upload still reaches the app.
        conn.write_all(b"5\r\nworld\r\n0\r\n\r\n").await.unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await.unwrap();
        echoed.extend_from_slice(&rest);
        let text = String::from_utf8_lossy(&echoed);
        assert!(text.contains("world"), "{text}");
        assert!(text.ends_with("0\r\n\r\n"), "{text}");
    })
    .await;
}

#[tokio::test]
async fn an_http10_client_asking_for_keep_alive_keeps_its_connection() {
    bounded(async {
        // ApacheBench's `ab -k` speaks this way.
        let app = named_backend("app").await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        let mut conn = connect(&proxy).await;
        for _ in 0..2 {
            conn.write_all(b"GET / HTTP/1.0\r\nHost: web.test\r\nConnection: Keep-Alive\r\n\r\n")
                .await
                .unwrap();
            let head = read_head(&mut conn).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            assert!(head.contains("connection: keep-alive"), "{head}");
            assert!(head.contains("content-length: 3"), "{head}");
            assert_eq!(read_n(&mut conn, 3).await, "app");
        }
        // Without the ask, HTTP/1.0 closes after the response.
        conn.write_all(b"GET / HTTP/1.0\r\nHost: web.test\r\n\r\n")
            .await
            .unwrap();
        let mut rest = String::new();
        conn.read_to_string(&mut rest).await.unwrap();
        assert!(rest.contains("connection: close"), "{rest}");
        assert!(rest.ends_with("\r\n\r\napp"), "{rest}");
    })
    .await;
}

#[tokio::test]
async fn codings_an_http10_client_cannot_receive_get_502() {
    bounded(async {
        let app = canned_backend(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[app])])).await;
        // An HTTP/1.1 client is told about the coding.
        let mut conn = connect(&proxy).await;
        conn.write_all(b"GET / HTTP/1.1\r\nhost: web.test\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut conn).await;
        assert!(head.contains("transfer-encoding: gzip, chunked"), "{head}");
        // An HTTP/1.0 client could not be: the proxy answers instead.
        let all = exchange_all(&proxy, b"GET / HTTP/1.0\r\nhost: web.test\r\n\r\n").await;
        assert!(all.starts_with("HTTP/1.1 502"), "{all}");
        assert!(all.contains(ERROR_HEADER), "{all}");
    })
    .await;
}
