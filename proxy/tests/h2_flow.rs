//! HTTP/2 flow control through the proxy: a client that reads slowly holds the upstream back,
//! so the proxy never holds more of a body than its windows allow, and every byte arrives.
//! Real loopback sockets, raw `h2` on both sides; bounded in time.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use support::*;
use tokio::net::{TcpListener, TcpStream};

/// The response body's size: many times every window on the way.
const BODY: usize = 8 * 1024 * 1024;
const CHUNK: usize = 16 * 1024;

/// The most the proxy may hold between what the upstream was allowed to send and what the
/// client has taken: its receive window for the upstream connection (1 MiB), what it queues
/// to send per stream (256 KiB), the client's stream window (65,535 bytes), and a chunk.
const HELD_AT_MOST: usize = 1024 * 1024 + 256 * 1024 + 65_535 + CHUNK;

/// An h2 server that answers every request with `BODY` bytes, sending each chunk only once
/// the proxy's window has room for it; `sent` counts the bytes the window let through.
#[expect(clippy::unwrap_used, reason = "test helper: a failure is the report")]
async fn streaming_upstream(sent: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let sent = Arc::clone(&sent);
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(io).await.unwrap();
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    let sent = Arc::clone(&sent);
                    tokio::spawn(async move {
                        let mut send = respond
                            .send_response(http::Response::new(()), false)
                            .unwrap();
                        let mut left = BODY;
                        while left > 0 {
                            send.reserve_capacity(left.min(CHUNK));
                            let granted =
                                match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                                    Some(Ok(n)) => n.min(left),
                                    _ => return,
                                };
                            if granted == 0 {
                                continue;
                            }
                            sent.fetch_add(granted, Ordering::SeqCst);
                            left -= granted;
                            send.send_data(Bytes::from(vec![7u8; granted]), left == 0)
                                .unwrap();
                        }
                    });
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_slow_h2_reader_holds_the_upstream_back_and_gets_every_byte() {
    bounded(async {
        let sent = Arc::new(AtomicUsize::new(0));
        let upstream = streaming_upstream(Arc::clone(&sent)).await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[upstream])])).await;
        // A client with h2's default windows (65,535 bytes), reading one frame at a time and
        // giving the rest of the runtime many turns between frames.
        let io = TcpStream::connect(proxy.addrs.outbound).await.unwrap();
        let (client, conn) = h2::client::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let request = http::Request::get("http://web.test/").body(()).unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        let mut body = response.into_body();
        let mut received = 0;
        let mut most_held = 0;
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            received += chunk.len();
            for _ in 0..20 {
                tokio::task::yield_now().await;
            }
            let held = sent.load(Ordering::SeqCst) - received;
            most_held = most_held.max(held);
            assert!(
                held <= HELD_AT_MOST,
                "the upstream got {held} bytes ahead of the client (at most {HELD_AT_MOST})"
            );
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        assert_eq!(received, BODY, "every byte arrives");
        // The bound was approached: the upstream did run ahead as far as the windows allow.
        assert!(most_held > 65_535, "most held: {most_held}");
    })
    .await;
}
