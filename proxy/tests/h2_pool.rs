//! Upstream HTTP/2 connections over real loopback sockets: a peer's stream limit is not the
//! proxy's limit. Each test is bounded in time.

#![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// An h2c backend allowing `max_streams` concurrent streams per connection, which answers at
/// once but holds the body of every response to `/hold` open until `release` says go; counts
/// the connections it accepted and the requests to `/hold` that reached it.
async fn limited_backend(
    max_streams: u32,
    release: watch::Receiver<bool>,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let arrived = Arc::new(AtomicUsize::new(0));
    let (counted, seen) = (Arc::clone(&accepted), Arc::clone(&arrived));
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let (release, seen) = (release.clone(), Arc::clone(&seen));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let mut release = release.clone();
                    let hold = req.uri().path() == "/hold";
                    if hold {
                        seen.fetch_add(1, Ordering::SeqCst);
                    }
                    let body = futures_util::stream::once(async move {
                        if hold {
                            let _ = release.wait_for(|go| *go).await;
                        }
                        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"held")))
                    });
                    let body = StreamBody::new(body)
                        .map_err(|never| match never {})
                        .boxed();
                    async move { Ok::<_, Infallible>(Response::new(body)) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(max_streams)
                    .serve_connection(TokioIo::new(io), service)
                    .await;
            });
        }
    });
    (addr, accepted, arrived)
}

/// One request to `path` of the limited service over `client`'s connection.
async fn send(client: &SendRequest<TestBody>, path: &str) -> Response<Incoming> {
    client
        .clone()
        .send_request(get("limited.test", path))
        .await
        .unwrap()
}

#[tokio::test]
async fn streams_beyond_the_peers_limit_go_on_new_connections_not_into_a_queue() {
    bounded(async {
        let (release, held) = watch::channel(false);
        let (app, accepted, arrived) = limited_backend(2, held).await;
        let proxy = TestProxy::start(config(), mesh(&[("limited.test", &[app])])).await;
        let client = h2_client(proxy.addrs.outbound).await;
        // One request first, so the proxy knows the peer's settings.
        let response = send(&client, "/").await;
        assert_eq!(body_bytes(response).await, "held");
        // Five requests at once to an endpoint that takes two streams per connection, each
        // response body held open until the app has had all five: it only gets them if the
        // proxy opens three connections rather than queueing three streams behind the first
        // two.
        let requests: Vec<_> = (0..5)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move { client.send_request(get("limited.test", "/hold")).await })
            })
            .collect();
        while arrived.load(Ordering::SeqCst) < 5 {
            tokio::task::yield_now().await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        release.send_replace(true);
        for request in requests {
            let response = request.await.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body_bytes(response).await, "held");
        }
        // With every stream ended, later requests fit the connections already open.
        for _ in 0..4 {
            let response = send(&client, "/").await;
            assert_eq!(body_bytes(response).await, "held");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    })
    .await;
}

#[tokio::test]
async fn a_stream_counts_until_its_response_body_ends() {
    bounded(async {
        let (release, held) = watch::channel(false);
        let (app, accepted, _) = limited_backend(1, held).await;
        let proxy = TestProxy::start(config(), mesh(&[("limited.test", &[app])])).await;
        let client = h2_client(proxy.addrs.outbound).await;
        // A response whose body has not ended keeps its stream (the only one the peer allows
        // on that connection) open: the next request takes another connection.
        let response = send(&client, "/").await;
        assert_eq!(body_bytes(response).await, "held");
        let first = send(&client, "/hold").await;
        let second = send(&client, "/hold").await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        release.send_replace(true);
        assert_eq!(body_bytes(first).await, "held");
        assert_eq!(body_bytes(second).await, "held");
    })
    .await;
}
