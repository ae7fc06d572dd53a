//! gRPC through the proxy with tonic on both ends: unary and server-streaming calls, with the
//! app's trailers (grpc-status, grpc-message) intact.

mod support;

use std::pin::Pin;

use futures_util::Stream;
use http::uri::PathAndQuery;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{TestProxy, bounded, config, mesh};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint32, tag = "2")]
    count: u32,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

struct Unary;

impl tonic::server::UnaryService<Msg> for Unary {
    type Response = Msg;
    type Future = BoxFuture<Result<tonic::Response<Msg>, Status>>;

    fn call(&mut self, request: tonic::Request<Msg>) -> Self::Future {
        Box::pin(async move {
            let msg = request.into_inner();
            if msg.text == "fail" {
                return Err(Status::not_found("no such thing"));
            }
            Ok(tonic::Response::new(Msg {
                text: format!("hello {}", msg.text),
                count: 1,
            }))
        })
    }
}

struct Streaming;

impl tonic::server::ServerStreamingService<Msg> for Streaming {
    type Response = Msg;
    type ResponseStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;
    type Future = BoxFuture<Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: tonic::Request<Msg>) -> Self::Future {
        Box::pin(async move {
            let msg = request.into_inner();
            let items = (0..msg.count).map(move |i| {
                Ok(Msg {
                    text: msg.text.clone(),
                    count: i,
                })
            });
            let stream: Self::ResponseStream = Box::pin(futures_util::stream::iter(items));
            Ok(tonic::Response::new(stream))
        })
    }
}

#[expect(
    clippy::unwrap_used,
    reason = "test app: a failed bind or accept is the report"
)]
async fn grpc_app() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (io, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: http::Request<hyper::body::Incoming>| async move {
                        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Msg, Msg>::default());
                        let response = match request.uri().path() {
                            "/test.Echo/Unary" => grpc.unary(Unary, request).await,
                            _ => grpc.server_streaming(Streaming, request).await,
                        };
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn unary_and_server_streaming_with_trailers() {
    bounded(async {
        let app = grpc_app().await;
        let proxy = TestProxy::start(config(), mesh(&[("echo.test", &[app])])).await;
        let outbound = proxy.addrs.outbound;
        let channel = tonic::transport::Endpoint::from_static("http://echo.test")
            .connect_with_connector(tower::service_fn(move |_uri| async move {
                TcpStream::connect(outbound).await.map(TokioIo::new)
            }))
            .await
            .unwrap();
        let mut client = tonic::client::Grpc::new(channel);

        client.ready().await.unwrap();
        let response = client
            .unary(
                tonic::Request::new(Msg {
                    text: "mesh".into(),
                    count: 0,
                }),
                PathAndQuery::from_static("/test.Echo/Unary"),
                ProstCodec::<Msg, Msg>::default(),
            )
            .await
            .unwrap();
        assert_eq!(response.into_inner().text, "hello mesh");

        // The app's own error status passes through in its trailers, untouched.
        client.ready().await.unwrap();
        let status = client
            .unary(
                tonic::Request::new(Msg {
                    text: "fail".into(),
                    count: 0,
                }),
                PathAndQuery::from_static("/test.Echo/Unary"),
                ProstCodec::<Msg, Msg>::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "no such thing");
        assert!(!status.metadata().contains_key("conduit-proxy-error"));

        client.ready().await.unwrap();
        let response = client
            .server_streaming(
                tonic::Request::new(Msg {
                    text: "item".into(),
                    count: 25,
                }),
                PathAndQuery::from_static("/test.Echo/Stream"),
                ProstCodec::<Msg, Msg>::default(),
            )
            .await
            .unwrap();
        let mut stream = response.into_inner();
        let mut seen = 0;
        while let Some(msg) = stream.message().await.unwrap() {
            assert_eq!(msg.count, seen);
            seen += 1;
        }
        assert_eq!(seen, 25);
        let trailers = stream.trailers().await.unwrap().expect("trailers");
        assert_eq!(
            trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
            Some("0")
        );
    })
    .await;
}
