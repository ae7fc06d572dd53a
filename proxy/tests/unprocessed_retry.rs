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
