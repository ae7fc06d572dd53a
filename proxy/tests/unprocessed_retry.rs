//! Requests an endpoint never processed are sent again: a refused connect (the endpoint backs
//! off and another takes the request) and an HTTP/2 stream the server refused
//! (`REFUSED_STREAM`). Real loopback sockets; each test is bounded in time.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::StatusCode;
use support::*;
use tokio::net::TcpListener;

#[tokio::test]
async fn a_refused_connect_goes_to_another_endpoint() {
    bounded(async {
        // A port that was bound and released: connections are refused.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let app = named_backend("app").await;
        let mut config = config();
        // A fresh endpoint looks cheaper than any measured one, so the closed endpoint is
        // picked as soon as it is a candidate (by the second request at the latest).
        config.balancer.default_rtt = std::time::Duration::from_micros(1);
        let proxy = TestProxy::start(config, mesh(&[("web.test", &[closed, app])])).await;
        let mut client = h1_client(proxy.addrs.outbound).await;
        for _ in 0..20 {
            let response = client.send_request(get("web.test", "/")).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body_bytes(response).await, "app");
        }
    })
    .await;
}

#[tokio::test]
async fn a_refused_h2_stream_is_sent_again() {
    bounded(async {
        // An h2 server that refuses its first stream (as a server at its stream limit or
        // shutting down does) and answers the rest.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let streams = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&streams);
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(io).await.unwrap();
                    while let Some(Ok((_request, mut respond))) = conn.accept().await {
                        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                        } else {
                            let response = http::Response::new(());
                            respond.send_response(response, true).unwrap();
                        }
                    }
                });
            }
        });
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[addr])])).await;
        let mut client = h2_client(proxy.addrs.outbound).await;
        let request = http::Request::builder()
            .uri("http://web.test/")
            .body(full(""))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(streams.load(Ordering::SeqCst), 2);
    })
    .await;
}

/// An h2 server that reads each request body whole, refuses the first stream anyway (as a
/// server shutting down does with `REFUSED_STREAM`), and echoes the body of the others.
#[expect(clippy::unwrap_used, reason = "test helper: a failure is the report")]
async fn refusing_echo_server(streams: Arc<AtomicUsize>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let seen = Arc::clone(&streams);
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(io).await.unwrap();
                while let Some(Ok((request, mut respond))) = conn.accept().await {
                    let seen = Arc::clone(&seen);
                    tokio::spawn(async move {
                        let mut body = request.into_body();
                        let mut got = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            got.extend_from_slice(&chunk);
                        }
                        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                        } else if let Ok(mut send) =
                            respond.send_response(http::Response::new(()), false)
                        {
                            let _ = send.send_data(got.into(), true);
                        }
                    });
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_refused_h2_stream_with_a_body_is_sent_again_with_that_body() {
    bounded(async {
        let streams = Arc::new(AtomicUsize::new(0));
        let addr = refusing_echo_server(Arc::clone(&streams)).await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[addr])])).await;
        let mut client = h2_client(proxy.addrs.outbound).await;
        // A unary-call-sized body, sent whole before the refusal.
        let payload = "x".repeat(1000);
        let request = http::Request::builder()
            .method("POST")
            .uri("http://web.test/")
            .body(full(payload.clone()))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body_bytes(response).await, payload.as_bytes());
        assert_eq!(streams.load(Ordering::SeqCst), 2);
    })
    .await;
}

#[tokio::test]
async fn a_refused_h2_stream_with_a_body_past_the_replay_limit_is_answered_502() {
    bounded(async {
        let streams = Arc::new(AtomicUsize::new(0));
        let addr = refusing_echo_server(Arc::clone(&streams)).await;
        let proxy = TestProxy::start(config(), mesh(&[("web.test", &[addr])])).await;
        let mut client = h2_client(proxy.addrs.outbound).await;
        let request = http::Request::builder()
            .method("POST")
            .uri("http://web.test/")
            .body(full("x".repeat(100 * 1024)))
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert!(response.headers().contains_key("conduit-proxy-error"));
        assert_eq!(streams.load(Ordering::SeqCst), 1);
    })
    .await;
}
