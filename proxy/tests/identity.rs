//! Identity and mTLS end to end over real loopback sockets: the real controller (its CA
//! bootstrapped in a temporary directory), a server-side proxy in front of an app, and
//! client-side proxies, each with its own bootstrap token.
//!
//! What a user sees: a proxy is ready once it holds a certificate; meshed traffic between
//! proxies is mTLS (the server proxy counts it with `tls="true"`); a client proxy without an
//! identity never reaches a meshed endpoint in plaintext (502, and the app never sees the
//! request); an outside TLS client without a certificate from the mesh's CA is refused; TLS
//! for another name passes through to the app untouched. Every wait is a bounded poll.

#![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use conduit_controller::config::ControllerConfig;
use conduit_controller::identity::tls::CONTROLLER_IDENTITY;
use conduit_controller::identity::{IdentityConfig, TRUST_ANCHORS_FILE, issue_token};
use conduit_controller::net::tcp_incoming;
use conduit_core::rand::DetRng;
use conduit_proxy::config::{DiscoveryConfig, IdentitySettings, TrustAnchors};
use conduit_proxy::discover::controller::ControllerDiscoverConfig;
use conduit_proxy::errors::respond::PROXY_ERROR_HEADER;
use conduit_proxy::identity::{ControllerTls, LocalIdentity, TokenSource};
use conduit_proxy::net::PeerAddr;
use conduit_proxy::{Addrs, ControllerDiscover, Proxy, ProxyConfig, TokioNet};
use hyper::Response;
use support::{backend, body_bytes, bounded, full, get_once, scrape};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;

const WEB_ID: &str = "web.test.serviceaccount.identity.conduit.local";
const CLIENT_ID: &str = "client.test.serviceaccount.identity.conduit.local";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "conduit-proxy-identity-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The controller's runtime; dropped, it stops (without waiting, as a killed process would).
struct ControllerRuntime(Option<tokio::runtime::Runtime>);

impl Drop for ControllerRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Starts the controller on its own runtime (the CA bootstraps into `identity_dir` before it
/// serves).
fn start_controller(mesh_file: &Path, identity_dir: &Path) -> (SocketAddr, ControllerRuntime) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    grpc.set_nonblocking(true).unwrap();
    admin.set_nonblocking(true).unwrap();
    let addr = grpc.local_addr().unwrap();
    let config = ControllerConfig {
        grpc_addr: addr,
        admin_addr: admin.local_addr().unwrap(),
        discovery: conduit_controller::config::DiscoverySource::File {
            path: mesh_file.to_owned(),
            poll_interval: Duration::from_millis(5),
        },
        log: "info".into(),
        identity: IdentityConfig::new(identity_dir.to_owned()),
    };
    runtime.spawn(async move {
        let grpc = tokio::net::TcpListener::from_std(grpc).unwrap();
        let admin = tokio::net::TcpListener::from_std(admin).unwrap();
        conduit_controller::run_controller(
            &config,
            tcp_incoming(grpc),
            tcp_incoming(admin),
            std::future::pending(),
        )
        .await
        .unwrap();
    });
    (addr, ControllerRuntime(Some(runtime)))
}

/// A controller with an empty mesh file and its CA bootstrapped in a temporary directory.
struct TestMesh {
    work: PathBuf,
    identity_dir: PathBuf,
    mesh_file: PathBuf,
    controller: SocketAddr,
    _runtime: ControllerRuntime,
}

impl TestMesh {
    async fn start(name: &str) -> Self {
        let work = temp_dir(name);
        let identity_dir = work.join("identity");
        let mesh_file = work.join("mesh.yaml");
        std::fs::write(&mesh_file, "services: {}\n").unwrap();
        let (controller, runtime) = start_controller(&mesh_file, &identity_dir);
        // The CA is bootstrapped before the controller serves: poll for its anchors.
        while !identity_dir.join(TRUST_ANCHORS_FILE).exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Self {
            work,
            identity_dir,
            mesh_file,
            controller,
            _runtime: runtime,
        }
    }
}

/// A proxy's configuration, with `identity` (its name, proved by a token from the CA in
/// `dir`) or none.
fn proxy_config(controller: SocketAddr, identity: Option<(&str, &Path)>) -> ProxyConfig {
    let mut config = support::config();
    config.discovery = DiscoveryConfig::Controller {
        addr: PeerAddr::Socket(controller),
    };
    config.queue.failfast_timeout = Duration::from_secs(2);
    if let Some((name, dir)) = identity {
        config.identity = Some(IdentitySettings {
            name: name.to_owned(),
            token: TokenSource::Value(issue_token(dir, name).unwrap()),
            trust_anchors: TrustAnchors::File(dir.join(TRUST_ANCHORS_FILE)),
        });
    }
    config
}

/// A proxy bound (its addresses known) but not yet serving.
struct Bound {
    proxy: Proxy<TokioNet>,
    controller: SocketAddr,
    /// mTLS to the controller (with `controller_identity`), as the binary sets it up.
    tls: Option<ControllerTls>,
}

impl Bound {
    async fn new(config: ProxyConfig) -> Self {
        let DiscoveryConfig::Controller {
            addr: PeerAddr::Socket(controller),
        } = config.discovery
        else {
            unreachable!("the tests' proxies discover through the controller")
        };
        let identity = config.identity.as_ref().map(|settings| {
            Arc::new(LocalIdentity::load(settings, conduit_proxy::clock::system_unix_time).unwrap())
        });
        let tls = match (&identity, &config.controller_identity) {
            (Some(identity), Some(name)) => {
                Some(ControllerTls::new(Arc::clone(identity), name).unwrap())
            }
            _ => None,
        };
        let mut proxy = Proxy::bind(config, TokioNet).await.unwrap();
        if let Some(identity) = identity {
            proxy = proxy.with_identity(identity);
        }
        Self {
            proxy,
            controller,
            tls,
        }
    }

    fn addrs(&self) -> Addrs {
        self.proxy.addrs()
    }

    /// Serves until the returned sender is dropped.
    fn serve(self) -> (Addrs, oneshot::Sender<()>) {
        let addrs = self.proxy.addrs();
        let mut settings = ControllerDiscoverConfig::new(self.controller);
        settings.tls = self.tls;
        let discovery = ControllerDiscover::new(TokioNet, settings, DetRng::new(5)).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(self.proxy.serve(discovery, 7, async move {
            let _ = rx.await;
        }));
        (addrs, tx)
    }
}

/// Polls `/ready` until it answers 200.
async fn wait_ready(admin: SocketAddr) {
    loop {
        if get_once(admin, "admin", "/ready").await.status() == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An app that answers `web` and counts what reached it.
async fn counting_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&seen);
    let addr = backend(false, move |_req| {
        counter.fetch_add(1, Ordering::Relaxed);
        async move { Response::new(full("web")) }
    })
    .await;
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_traffic_is_mtls_and_an_unidentified_proxy_never_reaches_the_app() {
    bounded(async {
        // The controller's address is needed by the proxies' configuration, and the server
        // proxy's inbound address by the mesh file: bind first, then write the mesh.
        let mesh = TestMesh::start("mesh").await;
        let (work, identity_dir, mesh_file, controller) =
            (&mesh.work, &mesh.identity_dir, &mesh.mesh_file, mesh.controller);
        let (app, seen) = counting_app().await;
        let mut server_config = proxy_config(controller, Some((WEB_ID, identity_dir)));
        server_config.app_addr = Some(app);
        let server = Bound::new(server_config).await;
        let inbound = server.addrs().inbound.unwrap();
        let yaml = format!(
            "services:\n  web.test:\n    port: 80\n    endpoints:\n      - addr: {inbound}\n        identity: {WEB_ID}\n"
        );
        write_atomically(mesh_file, &yaml);
        let (server, _server_stop) = server.serve();
        // The client proxy reaches the controller over mTLS (discovery and Certify), checking
        // the controller's identity.
        let mut client_config = proxy_config(controller, Some((CLIENT_ID, identity_dir)));
        client_config.controller_identity = Some(CONTROLLER_IDENTITY.into());
        let (client, _client_stop) = Bound::new(client_config).await.serve();
        // One that expects the controller to prove another name never certifies.
        let mut misled = proxy_config(controller, Some((CLIENT_ID, identity_dir)));
        misled.controller_identity = Some("impostor.conduit.identity.conduit.local".into());
        let (misled, _misled_stop) = Bound::new(misled).await.serve();
        wait_ready(server.admin).await;
        wait_ready(client.admin).await;

        // Through the client proxy, over mTLS, to the app.
        let mut ok = 0;
        while ok < 3 {
            let response = get_once(client.outbound, "web.test:80", "/").await;
            if response.status() == 200 {
                assert_eq!(body_bytes(response).await, "web");
                ok += 1;
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let metrics = scrape(server.admin).await;
        let over_mtls = metrics
            .lines()
            .filter(|l| l.starts_with("request_total{direction=\"inbound\",tls=\"true\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
        assert!(over_mtls >= 3, "{metrics}");
        // Counted under the identity the client proved.
        let from_client = format!(
            "request_total{{direction=\"inbound\",tls=\"true\",client_id=\"{CLIENT_ID}\","
        );
        assert!(
            metrics.lines().any(|l| l.starts_with(&from_client)),
            "{metrics}"
        );
        assert!(
            !metrics.lines().any(|l| l.starts_with("request_total{direction=\"inbound\",authority=")),
            "no request arrived in plaintext: {metrics}"
        );

        // A proxy without an identity: the endpoint is meshed, so it is never sent plaintext.
        let before = seen.load(Ordering::Relaxed);
        let (plain, _plain_stop) = Bound::new(proxy_config(controller, None)).await.serve();
        wait_ready(plain.admin).await;
        let response = get_once(plain.outbound, "web.test:80", "/").await;
        assert_eq!(response.status(), 502);
        let reason = response.headers()[PROXY_ERROR_HEADER].to_str().unwrap().to_owned();
        assert!(reason.contains("no identity"), "{reason}");
        assert_eq!(seen.load(Ordering::Relaxed), before, "the app saw nothing");
        // Every other proxy got its certificate meanwhile; the misled one holds none.
        let response = get_once(misled.admin, "admin", "/ready").await;
        assert_eq!(response.status(), 503);
        let metrics = scrape(misled.admin).await;
        let certified = format!("identity_certified{{identity=\"{CLIENT_ID}\"}} 0");
        assert!(metrics.lines().any(|l| l == certified), "{metrics}");
        let _ = std::fs::remove_dir_all(work);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_tls_clients_need_a_mesh_certificate_and_other_names_pass_through() {
    bounded(async {
        let mesh = TestMesh::start("outside").await;
        let (work, identity_dir, controller) = (&mesh.work, &mesh.identity_dir, mesh.controller);
        // The "app" echoes the first bytes it gets, so pass-through is visible byte for byte.
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0; 64 * 1024];
                    if let Ok(n) = stream.read(&mut buf).await {
                        let _ = stream.write_all(&buf[..n]).await;
                    }
                });
            }
        });
        let mut config = proxy_config(controller, Some((WEB_ID, identity_dir)));
        config.app_addr = Some(app);
        config.limits.detect_timeout = Duration::from_millis(300);
        let (server, _stop) = Bound::new(config).await.serve();
        wait_ready(server.admin).await;
        let inbound = server.inbound.unwrap();

        // A TLS client trusting the mesh's anchors but holding no certificate: refused.
        let anchors = std::fs::read(identity_dir.join(TRUST_ANCHORS_FILE)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&anchors) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(WEB_ID).unwrap();
        // TLS 1.3: the server asks for a certificate and the client's missing one is refused
        // after the client's handshake completes, so the refusal shows on first use.
        let refused = match connector.connect(name, tcp).await {
            Err(_) => true,
            Ok(mut tls) => {
                let _ = tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
                let mut buf = [0; 64];
                !matches!(tls.read(&mut buf).await, Ok(n) if n > 0)
            }
        };
        assert!(refused, "a client without a certificate was served");
        loop {
            let metrics = scrape(server.admin).await;
            if counter(
                &metrics,
                "tls_handshake_failures_total{direction=\"inbound\",reason=\"no_certificate\"}",
            ) >= 1
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // A client that sends a ClientHello for the proxy's identity and then stalls is cut off
        // by the handshake timeout (the detect timeout, short here).
        let mut stalled = tokio::net::TcpStream::connect(inbound).await.unwrap();
        let mut hello = Vec::new();
        {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            let ours = rustls::pki_types::ServerName::try_from(WEB_ID).unwrap();
            let mut conn = rustls::ClientConnection::new(Arc::new(config), ours).unwrap();
            conn.write_tls(&mut hello).unwrap();
        }
        stalled.write_all(&hello).await.unwrap();
        // The server's flight arrives, then the connection closes once the timeout passes.
        let mut sink = Vec::new();
        let _ = stalled.read_to_end(&mut sink).await;
        let metrics = scrape(server.admin).await;
        assert!(
            counter(
                &metrics,
                "tls_handshake_failures_total{direction=\"inbound\",reason=\"timeout\"}"
            ) >= 1,
            "{metrics}"
        );

        // TLS for another name goes to the app as it is, byte for byte.
        let mut hello = Vec::new();
        {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            let other = rustls::pki_types::ServerName::try_from("example.com").unwrap();
            let mut conn = rustls::ClientConnection::new(Arc::new(config), other).unwrap();
            conn.write_tls(&mut hello).unwrap();
        }
        let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        let mut echoed = vec![0; hello.len()];
        tcp.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, hello);
        let _ = std::fs::remove_dir_all(work);
    })
    .await;
}

/// The mesh file for `web.test` behind `inbound`, with `policy` (YAML lines under `policy:`).
fn mesh_with_policy(inbound: SocketAddr, policy: &str) -> String {
    format!(
        "services:\n  web.test:\n    port: 80\n    endpoints:\n      - addr: {inbound}\n        identity: {WEB_ID}\n    policy:\n{policy}"
    )
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A metric's value in a scrape (0 when absent).
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_admits_listed_identities_denies_others_with_403_and_audits() {
    bounded(async {
        let mesh = TestMesh::start("policy").await;
        let (work, identity_dir, mesh_file, controller) = (
            &mesh.work,
            &mesh.identity_dir,
            &mesh.mesh_file,
            mesh.controller,
        );
        let (app, seen) = counting_app().await;
        let mut server_config = proxy_config(controller, Some((WEB_ID, identity_dir)));
        server_config.app_addr = Some(app);
        // The proxy follows its own service: its profile carries the policy.
        server_config.service = Some("web.test:80".into());
        let server = Bound::new(server_config).await;
        let inbound = server.addrs().inbound.unwrap();
        let enforced = format!(
            "      default: deny\n      authorizations:\n        - identities: [\"{CLIENT_ID}\"]\n"
        );
        write_atomically(mesh_file, &mesh_with_policy(inbound, &enforced));
        let (server, _server_stop) = server.serve();
        let (client, _client_stop) =
            Bound::new(proxy_config(controller, Some((CLIENT_ID, identity_dir))))
                .await
                .serve();
        const OTHER_ID: &str = "other.test.serviceaccount.identity.conduit.local";
        let (other, _other_stop) =
            Bound::new(proxy_config(controller, Some((OTHER_ID, identity_dir))))
                .await
                .serve();
        for admin in [server.admin, client.admin, other.admin] {
            wait_ready(admin).await;
        }

        // The listed identity is served (once the server proxy has its service's policy).
        loop {
            let response = get_once(client.outbound, "web.test:80", "/").await;
            if response.status() == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before = seen.load(Ordering::Relaxed);
        // Another mesh identity, and a plaintext client straight to the inbound port: 403 from
        // the proxy, and the app sees neither.
        let response = get_once(other.outbound, "web.test:80", "/").await;
        assert_eq!(response.status(), 403);
        let reason = response.headers()[PROXY_ERROR_HEADER]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            reason.contains(OTHER_ID) && reason.contains("default(deny)"),
            "{reason}"
        );
        let response = get_once(inbound, "web.test:80", "/").await;
        assert_eq!(response.status(), 403);
        let reason = response.headers()[PROXY_ERROR_HEADER]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(reason.contains("without identity"), "{reason}");
        // gRPC over plaintext h2: PERMISSION_DENIED.
        let mut h2 = support::h2_client(inbound).await;
        let request = hyper::Request::builder()
            .method("POST")
            .uri("http://web.test/pkg.Svc/Call")
            .header("content-type", "application/grpc")
            .body(full(""))
            .unwrap();
        let response = h2.send_request(request).await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "7");
        assert_eq!(
            seen.load(Ordering::Relaxed),
            before,
            "the app saw no denied request"
        );
        let metrics = scrape(server.admin).await;
        assert!(
            counter(&metrics, "inbound_http_authz_allow_total") >= 1,
            "{metrics}"
        );
        assert!(
            counter(&metrics, "inbound_http_authz_deny_total") >= 3,
            "{metrics}"
        );

        // Audit mode: the same policy only records; the plaintext client reaches the app.
        let audited = format!("{enforced}      audit: true\n");
        write_atomically(mesh_file, &mesh_with_policy(inbound, &audited));
        loop {
            let response = get_once(inbound, "web.test:80", "/").await;
            if response.status() == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let metrics = scrape(server.admin).await;
        assert!(
            counter(&metrics, "inbound_http_authz_audit_deny_total") >= 1,
            "{metrics}"
        );
        let _ = std::fs::remove_dir_all(work);
    })
    .await;
}

/// A token file is read again before every certify request, as the kubelet replaces a
/// projected ServiceAccount token in place: a proxy whose first token is refused certifies
/// with the token the file holds at its next attempt, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_replaced_in_place_is_sent_on_the_next_certify() {
    bounded(async {
        let mesh = TestMesh::start("token-file").await;
        let token_file = mesh.work.join("token");
        // A token the CA made, but for another identity: refused (PERMISSION_DENIED).
        write_atomically(
            &token_file,
            &issue_token(&mesh.identity_dir, CLIENT_ID).unwrap(),
        );
        let mut config = proxy_config(mesh.controller, Some((WEB_ID, &mesh.identity_dir)));
        if let Some(identity) = &mut config.identity {
            identity.token = TokenSource::File(token_file.clone());
        }
        let (proxy, _stop) = Bound::new(config).await.serve();
        // Not ready with the token it started with (read at start: were the file not read
        // again, the proxy would never certify, and the wait below would time out).
        assert_eq!(get_once(proxy.admin, "admin", "/ready").await.status(), 503);
        // The file now holds the right token: the next attempt certifies.
        write_atomically(
            &token_file,
            &issue_token(&mesh.identity_dir, WEB_ID).unwrap(),
        );
        wait_ready(proxy.admin).await;
    })
    .await;
}
