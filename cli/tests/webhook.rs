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

/// The certificate a TLS handshake with the webhook presents.
async fn presented(addr: std::net::SocketAddr, roots: &[rcgen::Certificate]) -> Vec<u8> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.der().clone()).expect("a root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connecting");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .expect("a TLS handshake");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

/// A renewed pair written over the files (as the kubelet updates a mounted Secret) serves new
/// connections once reloaded; files that do not make a pair are refused and the last good one
/// keeps serving.
#[tokio::test]
async fn a_renewed_certificate_serves_new_connections() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let dir = std::env::temp_dir().join(format!(
            "conduit-webhook-reload-test-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let write = |certified: &rcgen::CertifiedKey<rcgen::KeyPair>| {
            std::fs::write(&cert, certified.cert.pem()).expect("writing the certificate");
            std::fs::write(&key, certified.signing_key.serialize_pem()).expect("writing the key");
        };
        let first = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a certificate");
        write(&first);
        let tls = conduit_cli::webhook::WebhookTls::load(&cert, &key).expect("the pair");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(conduit_cli::webhook::serve(
            listener,
            tls.server_config().expect("a configuration"),
            InjectOptions::for_version("0.1.0"),
            None,
        ));
        let both = [first.cert.clone()];
        assert_eq!(presented(addr, &both).await, first.cert.der().to_vec());
        assert!(!tls.reload().expect("unchanged files"), "nothing changed");

        let second = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a certificate");
        write(&second);
        assert!(tls.reload().expect("the renewed pair"));
        let both = [first.cert.clone(), second.cert.clone()];
        assert_eq!(presented(addr, &both).await, second.cert.der().to_vec());

        // Half-written (a certificate with another pair's key): refused, the last pair serves.
        std::fs::write(&key, first.signing_key.serialize_pem()).expect("writing the key");
        let err = tls.reload().expect_err("a mismatched pair");
        assert!(
            format!("{err:#}").contains("do not make a usable pair"),
            "{err:#}"
        );
        std::fs::write(&cert, "garbage").expect("writing the certificate");
        assert!(tls.reload().is_err());
        assert_eq!(presented(addr, &both).await, second.cert.der().to_vec());
        std::fs::remove_dir_all(&dir).expect("removing the temporary directory");
    })
    .await
    .expect("the test timed out");
}
