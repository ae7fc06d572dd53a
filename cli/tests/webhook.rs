//! The admission webhook over real TLS on loopback: a review of a pod comes back with the
//! patch, `/ready` answers, and a body that is not a review gets a 400 with the reason.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use conduit_cli::inject::InjectOptions;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// Starts the webhook with a fresh self-signed certificate for `localhost`; its address and a
/// client configuration that trusts it.
async fn start() -> (std::net::SocketAddr, rustls::ClientConfig) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    let dir = std::env::temp_dir().join(format!("conduit-webhook-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, certified.cert.pem()).expect("writing the certificate");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("writing the key");
    let tls = conduit_cli::webhook::tls_config(&cert, &key).expect("a TLS configuration");
    std::fs::remove_dir_all(&dir).expect("removing the temporary directory");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(conduit_cli::webhook::serve(
        listener,
        tls,
        InjectOptions::for_version("0.1.0"),
        None,
    ));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certified.cert.der().clone()).expect("a root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    (addr, client)
}

/// Sends one request to the webhook over TLS; the status and the body.
async fn send(
    addr: std::net::SocketAddr,
    client: &rustls::ClientConfig,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (http::StatusCode, Bytes) {
    let tcp = TcpStream::connect(addr).await.expect("connecting");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client.clone()))
        .connect(name, tcp)
        .await
        .expect("a TLS handshake");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("an HTTP/1.1 connection");
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a request");
    let response = sender.send_request(request).await.expect("a response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    (status, body)
}

#[tokio::test]
async fn the_webhook_answers_reviews_over_tls() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let (addr, client) = start().await;
        let review = serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "b1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE",
                "object": {"metadata": {"name": "web"},
                    "spec": {"containers": [{"name": "web", "ports": [{"containerPort": 8080}]}]}},
            }
        });
        let (status, body) = send(
            addr,
            &client,
            "POST",
            "/inject",
            serde_json::to_vec(&review).expect("JSON"),
        )
        .await;
        assert_eq!(status, http::StatusCode::OK);
        let answer: serde_json::Value = serde_json::from_slice(&body).expect("a JSON answer");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["uid"], "b1");
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(answer["response"]["patchType"], "JSONPatch");

        let (status, body) = send(addr, &client, "GET", "/ready", Vec::new()).await;
        assert_eq!((status, &body[..]), (http::StatusCode::OK, &b"ready\n"[..]));

        let (status, body) = send(addr, &client, "POST", "/inject", b"{not json".to_vec()).await;
        assert_eq!(status, http::StatusCode::BAD_REQUEST);
        assert!(
            String::from_utf8_lossy(&body).contains("not JSON"),
            "{}",
            String::from_utf8_lossy(&body)
        );
    })
    .await
    .expect("the test timed out");
}
