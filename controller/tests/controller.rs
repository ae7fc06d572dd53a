//! The controller end to end over real loopback sockets: a mesh file on disk, the controller
//! as `main.rs` runs it (`run_controller`), and tonic clients.
//!
//! Method: every test rewrites the mesh file atomically (write, then rename) and waits for the
//! stream message the edit must cause, so nothing depends on how long anything takes. The file
//! is polled every few milliseconds. Every wait is bounded by [`WAIT`]; a hang is a failure,
//! never a stuck run.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failed step fails the test"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conduit_controller::RunError;
use conduit_controller::config::ControllerConfig;
use conduit_controller::identity::IdentityConfig;
use conduit_controller::net::tcp_incoming;
use conduit_core::mesh::Endpoint;
use conduit_proto::convert::{DestinationChange, DestinationUpdate, ProfileUpdate};
use conduit_proto::pb::{api, destination as pb, identity};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tonic::Streaming;
use tonic::transport::Channel;

/// The longest any single wait may take.
const WAIT: Duration = Duration::from_secs(10);

/// How often the controller checks the mesh file in these tests.
const POLL: Duration = Duration::from_millis(5);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

struct Controller {
    dir: PathBuf,
    mesh_file: PathBuf,
    grpc_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), RunError>>>,
}

impl Controller {
    async fn start(name: &str, mesh: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("conduit-controller-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mesh_file = dir.join("mesh.yaml");
        write_atomically(&mesh_file, mesh);

        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let config = ControllerConfig {
            grpc_addr,
            admin_addr,
            discovery: conduit_controller::config::DiscoverySource::File {
                path: mesh_file.clone(),
                poll_interval: POLL,
            },
            log: "info".into(),
            identity: IdentityConfig::new(dir.join("identity")),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            conduit_controller::run_controller(
                &config,
                tcp_incoming(grpc),
                tcp_incoming(admin),
                shutdown,
            )
            .await
        });
        Self {
            dir,
            mesh_file,
            grpc_addr,
            admin_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn write_mesh(&self, mesh: &str) {
        write_atomically(&self.mesh_file, mesh);
    }

    async fn channel(&self) -> Channel {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc_addr)).unwrap();
        within("connect", endpoint.connect()).await.unwrap()
    }

    async fn get(&self, path: &str) -> Streaming<pb::Update> {
        let mut client = pb::destination_client::DestinationClient::new(self.channel().await);
        let request = pb::GetDestination {
            path: path.into(),
            context_token: String::new(),
        };
        within("Get", client.get(request))
            .await
            .unwrap()
            .into_inner()
    }

    async fn get_profile(&self, path: &str) -> Streaming<pb::DestinationProfile> {
        let mut client = pb::destination_client::DestinationClient::new(self.channel().await);
        let request = pb::GetDestination {
            path: path.into(),
            context_token: String::new(),
        };
        within("GetProfile", client.get_profile(request))
            .await
            .unwrap()
            .into_inner()
    }

    /// `GET path` on the admin port: (status code, body).
    async fn admin(&self, path: &str) -> (u16, String) {
        within("admin", async {
            let mut stream = TcpStream::connect(self.admin_addr).await.unwrap();
            let request =
                format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            let status = response[9..12].parse().unwrap();
            let body = response
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default();
            (status, body)
        })
        .await
    }

    /// Waits until the controller has rejected `count` mesh file edits, asking `/metrics`
    /// (yielding between asks, no sleeping).
    async fn wait_for_rejects(&self, count: u64) {
        let want = format!("conduit_controller_mesh_reload_rejects_total {count}");
        within("a rejected edit", async {
            loop {
                let (_, metrics) = self.admin("/metrics").await;
                if metrics.lines().any(|line| line == want) {
                    return;
                }
                tokio::task::yield_now().await;
            }
        })
        .await;
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running");
        within("shutdown", task).await.unwrap().unwrap();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn next(stream: &mut Streaming<pb::Update>) -> DestinationUpdate {
    let message = within("an endpoint update", stream.message())
        .await
        .unwrap()
        .expect("stream open");
    DestinationUpdate::try_from(message).expect("valid on the wire")
}

async fn next_profile(stream: &mut Streaming<pb::DestinationProfile>) -> ProfileUpdate {
    let message = within("a profile update", stream.message())
        .await
        .unwrap()
        .expect("stream open");
    ProfileUpdate::try_from(message).expect("valid on the wire")
}

fn ep(port: u16) -> Endpoint {
    Endpoint::new(SocketAddr::from(([127, 0, 0, 1], port)))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A mesh with `web.default` listing these endpoint ports.
fn web(ports: &[u16]) -> String {
    let mut text = String::from("services:\n  web.default:\n    port: 80\n    endpoints:");
    if ports.is_empty() {
        text.push_str(" []\n");
    }
    for port in ports {
        text.push_str(&format!("\n      - addr: 127.0.0.1:{port}"));
    }
    text.push('\n');
    text
}

/// A subscriber gets the complete set first, then adds and removes in order as the file
/// changes, with versions that grow by one per message; then an empty set, then a service that
/// no longer exists.
#[tokio::test]
async fn endpoint_streams_follow_the_file() {
    let controller = Controller::start("follow", &web(&[9001, 9002])).await;
    let mut stream = controller.get("web.default:80").await;

    let first = next(&mut stream).await;
    assert_eq!(
        first,
        DestinationUpdate {
            version: 1,
            change: DestinationChange::Replace(vec![ep(9001), ep(9002)])
        }
    );

    controller.write_mesh(&web(&[9001, 9002, 9003]));
    assert_eq!(
        next(&mut stream).await,
        DestinationUpdate {
            version: 2,
            change: DestinationChange::Add(vec![ep(9003)])
        }
    );

    controller.write_mesh(&web(&[9002, 9003]));
    assert_eq!(
        next(&mut stream).await,
        DestinationUpdate {
            version: 3,
            change: DestinationChange::Remove(vec![addr(9001)])
        }
    );

    // One edit that both adds and removes: the add comes first.
    controller.write_mesh(&web(&[9003, 9004]));
    assert_eq!(
        next(&mut stream).await,
        DestinationUpdate {
            version: 4,
            change: DestinationChange::Add(vec![ep(9004)])
        }
    );
    assert_eq!(
        next(&mut stream).await,
        DestinationUpdate {
            version: 5,
            change: DestinationChange::Remove(vec![addr(9002)])
        }
    );

    // A weight edit is an add of the same address (an in-place update).
    controller.write_mesh(
        "services:\n  web.default:\n    endpoints:\n      - addr: 127.0.0.1:9003\n        weight: 5\n      - addr: 127.0.0.1:9004\n",
    );
    let heavier = Endpoint {
        weight: 5,
        ..ep(9003)
    };
    assert_eq!(
        next(&mut stream).await,
        DestinationUpdate {
            version: 6,
            change: DestinationChange::Add(vec![heavier])
        }
    );

    controller.write_mesh(&web(&[]));
    assert_eq!(
        next(&mut stream).await,
        DestinationUpdate {
            version: 7,
            change: DestinationChange::NoEndpoints { exists: true }
        }
    );

    controller.write_mesh("services: {}\n");
    assert_eq!(
        next(&mut stream).await,
        DestinationUpdate {
            version: 8,
            change: DestinationChange::NoEndpoints { exists: false }
        }
    );

    controller.write_mesh(&web(&[9005]));
    assert_eq!(
        next(&mut stream).await,
        DestinationUpdate {
            version: 9,
            change: DestinationChange::Add(vec![ep(9005)])
        }
    );

    drop(stream);
    controller.stop().await;
}

/// A bad edit is rejected (the error names the field), the last good state keeps serving and
/// the stream sends nothing for it; the next good edit flows as a diff from the last good
/// state. A new subscriber during the bad spell gets the last good state.
#[tokio::test]
async fn a_bad_edit_keeps_the_last_good_state() {
    let controller = Controller::start("bad-edit", &web(&[9001, 9002])).await;
    let mut stream = controller.get("web.default").await;
    assert_eq!(next(&mut stream).await.version, 1);

    controller.write_mesh("services:\n  web.default:\n    endpoints:\n      - addr: nope\n");
    controller.wait_for_rejects(1).await;
    controller.write_mesh("services:\n  web.default:\n    endpoints:\n      - adr: 127.0.0.1:1\n");
    controller.wait_for_rejects(2).await;

    let mut late = controller.get("web.default").await;
    assert_eq!(
        next(&mut late).await,
        DestinationUpdate {
            version: 1,
            change: DestinationChange::Replace(vec![ep(9001), ep(9002)])
        },
        "a subscriber arriving during the bad spell gets the last good state"
    );

    // The next message on the first stream is the good edit's diff from the last good state:
    // the bad edits sent nothing.
    controller.write_mesh(&web(&[9001, 9002, 9003]));
    assert_eq!(
        next(&mut stream).await,
        DestinationUpdate {
            version: 2,
            change: DestinationChange::Add(vec![ep(9003)])
        }
    );
    assert_eq!(
        next(&mut late).await,
        DestinationUpdate {
            version: 2,
            change: DestinationChange::Add(vec![ep(9003)])
        }
    );

    let (_, metrics) = controller.admin("/metrics").await;
    assert!(
        metrics.contains("conduit_controller_mesh_reload_rejects_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("conduit_controller_mesh_reloads_total 1"),
        "{metrics}"
    );
    drop((stream, late));
    controller.stop().await;
}

/// GetProfile sends the whole profile first and again when it changes, and nothing for edits
/// that leave it alone.
#[tokio::test]
async fn profile_streams_follow_the_file() {
    let with_routes = |routes: &str, port: u16| {
        format!(
            "services:\n  web.default:\n    endpoints:\n      - addr: 127.0.0.1:{port}\n    profile:\n      routes:\n{routes}"
        )
    };
    let items =
        "        - name: items\n          match: { method: GET, path: { prefix: /items/ } }\n";
    let health = "        - name: health\n          match: { path: { exact: /health }, headers: [ { name: x-probe, exact: \"1\" } ] }\n          timeouts: { request: 500ms }\n          response_classes: { grpc: [ { code: unavailable, failure: true } ] }\n";
    let controller = Controller::start("profile", &with_routes(items, 9001)).await;
    let mut stream = controller.get_profile("web.default:80").await;

    let first = next_profile(&mut stream).await;
    assert_eq!(
        (first.version, first.exists, first.name.as_str()),
        (1, true, "web.default")
    );
    assert_eq!(first.profile.routes().len(), 1);
    assert_eq!(&*first.profile.routes()[0].name, "items");

    controller.write_mesh(&with_routes(&format!("{items}{health}"), 9001));
    let second = next_profile(&mut stream).await;
    assert_eq!(second.version, 2);
    let names: Vec<&str> = second.profile.route_names().collect();
    assert_eq!(names, ["items", "health", "default"]);
    // The route's policy crosses the wire whole.
    let health_route = &second.profile.routes()[1];
    assert_eq!(
        health_route.policy.timeouts.request,
        Some(Duration::from_millis(500))
    );
    assert_eq!(health_route.matches.headers.len(), 1);
    assert_eq!(
        health_route.policy.classifier.config().grpc_rules().len(),
        1
    );

    // An endpoint-only edit sends no profile; the next profile edit is version 3.
    let mut endpoints = controller.get("web.default").await;
    assert_eq!(next(&mut endpoints).await.version, 1);
    controller.write_mesh(&with_routes(&format!("{items}{health}"), 9002));
    assert_eq!(
        next(&mut endpoints).await.version,
        2,
        "the endpoint edit was seen"
    );
    controller.write_mesh(&with_routes(health, 9002));
    let third = next_profile(&mut stream).await;
    assert_eq!(third.version, 3);
    assert_eq!(third.profile.routes().len(), 1);

    drop((stream, endpoints));
    controller.stop().await;
}

/// A service's `breaker:` block in the mesh file reaches proxies in its profile, and an edit
/// to it alone is a new profile.
#[tokio::test]
async fn circuit_breaking_is_served_from_the_file() {
    let with_breaker = |breaker: &str| {
        format!(
            "services:\n  web.default:\n    endpoints:\n      - addr: 127.0.0.1:9001\n    breaker: {breaker}\n"
        )
    };
    let controller = Controller::start(
        "breaker",
        &with_breaker("{ consecutive_failures: 3, backoff: { min: 2s, max: 20s } }"),
    )
    .await;
    let mut stream = controller.get_profile("web.default:80").await;
    let first = next_profile(&mut stream).await;
    let breaker = first.profile.breaker();
    assert_eq!(breaker.consecutive_failures(), Some(3));
    assert_eq!(
        (breaker.penalty().min(), breaker.penalty().max()),
        (Duration::from_secs(2), Duration::from_secs(20))
    );
    assert!(
        breaker.success_rate().is_some(),
        "the rest are the defaults"
    );

    controller.write_mesh(&with_breaker("{ enabled: false }"));
    let second = next_profile(&mut stream).await;
    assert_eq!(second.version, 2);
    assert!(!second.profile.breaker().is_enabled());

    drop(stream);
    controller.stop().await;
}

/// A service's `policy:` block in the mesh file reaches proxies in its profile (as the
/// proxies' own conversion reads it), and an edit to it alone is a new profile.
#[tokio::test]
async fn authorization_policy_is_served_from_the_file() {
    use conduit_core::policy::{DefaultPolicy, IdentityMatch};

    let with_policy = |policy: &str| {
        format!(
            "services:\n  api.demo:\n    endpoints:\n      - addr: 127.0.0.1:9001\n    policy: {policy}\n"
        )
    };
    let controller = Controller::start(
        "policy",
        &with_policy(
            "{ default: all-authenticated, authorizations: [ { identities: [\"*.ops.serviceaccount.identity.conduit.local\"] }, { networks: [10.0.0.0/8] } ] }",
        ),
    )
    .await;
    let mut stream = controller.get_profile("api.demo:80").await;
    let first = next_profile(&mut stream).await;
    let policy = first.profile.policy().unwrap();
    assert_eq!(policy.default_policy(), DefaultPolicy::AllAuthenticated);
    assert!(!policy.audit());
    assert_eq!(
        policy.authorizations()[0].identities(),
        [IdentityMatch::Suffix(
            "ops.serviceaccount.identity.conduit.local".into()
        )]
    );
    assert_eq!(
        policy.authorizations()[1].networks()[0].to_string(),
        "10.0.0.0/8"
    );

    controller.write_mesh(&with_policy("{ default: deny, audit: true }"));
    let second = next_profile(&mut stream).await;
    assert_eq!(second.version, 2);
    let policy = second.profile.policy().unwrap();
    assert_eq!(
        (
            policy.default_policy(),
            policy.audit(),
            policy.authorizations().len()
        ),
        (DefaultPolicy::Deny, true, 0)
    );

    drop(stream);
    controller.stop().await;
}

/// A name no service has is `no_endpoints { exists: false }` (and a profile with
/// `exists: false`), distinct from a service without endpoints (`exists: true`); when the
/// service appears its endpoints arrive as an add.
#[tokio::test]
async fn unknown_names_are_distinct_from_empty_services() {
    let controller = Controller::start("unknown", "services:\n  empty.default: {}\n").await;

    let mut unknown = controller.get("web.default").await;
    assert_eq!(
        next(&mut unknown).await.change,
        DestinationChange::NoEndpoints { exists: false }
    );
    let mut empty = controller.get("empty.default").await;
    assert_eq!(
        next(&mut empty).await.change,
        DestinationChange::NoEndpoints { exists: true }
    );
    let mut wrong_port = controller.get("empty.default:8080").await;
    assert_eq!(
        next(&mut wrong_port).await.change,
        DestinationChange::NoEndpoints { exists: false }
    );
    let mut profile = controller.get_profile("web.default").await;
    let none = next_profile(&mut profile).await;
    assert_eq!(
        (none.version, none.exists, none.profile.routes().len()),
        (1, false, 0)
    );

    controller.write_mesh(&format!("{}  empty.default: {{}}\n", web(&[9001])));
    assert_eq!(
        next(&mut unknown).await,
        DestinationUpdate {
            version: 2,
            change: DestinationChange::Add(vec![ep(9001)])
        }
    );
    assert!(next_profile(&mut profile).await.exists);

    // An empty path is refused.
    let mut client = pb::destination_client::DestinationClient::new(controller.channel().await);
    let status = client.get(pb::GetDestination::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    drop((unknown, empty, wrong_port, profile));
    controller.stop().await;
}

/// The admin port answers `/live`, `/ready` and `/metrics`, and the metrics count streams.
#[tokio::test]
async fn admin_endpoints_respond() {
    let controller = Controller::start("admin", &web(&[9001])).await;
    assert_eq!(controller.admin("/live").await, (200, "live\n".into()));
    let mut stream = controller.get("web.default").await;
    next(&mut stream).await;
    // The gRPC server has answered, so it is serving.
    assert_eq!(controller.admin("/ready").await, (200, "ready\n".into()));
    let (status, metrics) = controller.admin("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "conduit_controller_destination_streams_open 1",
        "conduit_controller_destination_updates_total 1",
        "conduit_controller_mesh_services 1",
        "conduit_controller_mesh_generation 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert_eq!(controller.admin("/nope").await.0, 404);
    drop(stream);
    controller.stop().await;
}

/// The public API lists the mesh's services; Identity refuses a request with no token.
#[tokio::test]
async fn public_api_lists_workloads() {
    let controller = Controller::start(
        "api",
        &format!("{}  api.default: {{ port: 8080 }}\n", web(&[9001, 9002])),
    )
    .await;
    let channel = controller.channel().await;
    let mut api_client = api::api_client::ApiClient::new(channel.clone());
    let workloads = within(
        "ListWorkloads",
        api_client.list_workloads(api::ListWorkloadsRequest {}),
    )
    .await
    .unwrap()
    .into_inner()
    .workloads;
    let summary: Vec<(&str, u32, usize)> = workloads
        .iter()
        .map(|w| (w.name.as_str(), w.port, w.endpoints.len()))
        .collect();
    assert_eq!(summary, [("api.default", 8080, 0), ("web.default", 80, 2)]);

    // No endpoint names its proxy's admin server, so there is nothing to read: every workload
    // is listed with no traffic and no scraped endpoint.
    let rows = api_client
        .stat_summary(api::StatSummaryRequest {
            workload: String::new(),
            window_ms: 100,
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    let rows: Vec<(&str, u32, u32, u64)> = rows
        .iter()
        .map(|r| {
            (
                r.workload.as_str(),
                r.total_endpoints,
                r.scraped_endpoints,
                r.success_count,
            )
        })
        .collect();
    assert_eq!(rows, [("api.default", 0, 0, 0), ("web.default", 2, 0, 0)]);
    let mut identity_client = identity::identity_client::IdentityClient::new(channel);
    let status = identity_client
        .certify(identity::CertifyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("invalid token"),
        "{}",
        status.message()
    );
    controller.stop().await;
}

/// The file controller bootstraps its CA in the identity directory; a workload with a token
/// from `issue_token` gets a leaf that chains, through the returned issuer, to the anchors in
/// `trust-anchors.pem`; refusals carry their status and every outcome is counted.
#[tokio::test]
async fn identity_certifies_a_workload_with_a_bootstrap_token() {
    use conduit_controller::identity::{TRUST_ANCHORS_FILE, issue_token};
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;

    const WEB: &str = "web.default.identity.conduit.local";
    let controller = Controller::start("identity", &web(&[9001])).await;
    let dir = controller.dir.join("identity");
    // The admin port answers once the controller has started, and so has made its CA.
    let _ = controller.admin("/ready").await;
    let anchors = std::fs::read(dir.join(TRUST_ANCHORS_FILE)).unwrap();
    let token = issue_token(&dir, WEB).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::new(vec![WEB.to_owned()])
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let mut client = identity::identity_client::IdentityClient::new(controller.channel().await);
    let request = identity::CertifyRequest {
        identity: WEB.into(),
        token: token.clone().into_bytes(),
        certificate_signing_request: csr.der().to_vec(),
    };
    let response = within("Certify", client.certify(request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.intermediate_certificates.len(), 1);
    assert_eq!(response.valid_until_unix_ms % 1000, 0);

    let mut roots = rustls::RootCertStore::empty();
    for anchor in rustls::pki_types::CertificateDer::pem_slice_iter(&anchors) {
        roots.add(anchor.unwrap()).unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    // Checked at the last second of the leaf's validity: the answer's own figure, not a clock.
    let at = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_millis(
        response.valid_until_unix_ms,
    ));
    verifier
        .verify_server_cert(
            &response.leaf_certificate.clone().into(),
            &[response.intermediate_certificates[0].clone().into()],
            &rustls::pki_types::ServerName::try_from(WEB).unwrap(),
            &[],
            at,
        )
        .unwrap();

    let refused = |mut request: identity::CertifyRequest,
                   edit: fn(&mut identity::CertifyRequest)| {
        edit(&mut request);
        let mut client = client.clone();
        async move {
            within("Certify", client.certify(request))
                .await
                .unwrap_err()
                .code()
        }
    };
    assert_eq!(
        refused(request.clone(), |r| r.token = b"ct1:web:00".to_vec()).await,
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        refused(request.clone(), |r| r.identity = "api.default".into()).await,
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        refused(request.clone(), |r| r
            .certificate_signing_request
            .truncate(10))
        .await,
        tonic::Code::InvalidArgument
    );
    let (_, metrics) = controller.admin("/metrics").await;
    for (result, count) in [
        ("ok", 1),
        ("unauthenticated", 1),
        ("denied", 1),
        ("invalid", 1),
    ] {
        let line =
            format!("conduit_controller_identity_certify_total{{result=\"{result}\"}} {count}");
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("conduit_controller_identity_issuer_expiry_timestamp_seconds ")),
        "{metrics}"
    );
    controller.stop().await;
}

/// A controller whose mesh file is invalid at start-up does not start, and says which field.
#[tokio::test]
async fn an_invalid_mesh_file_at_start_up_is_an_error_naming_the_field() {
    let mut controller = Controller::start(
        "bad-start",
        "services:\n  web.default:\n    endpoints:\n      - addr: 127.0.0.1:0\n",
    )
    .await;
    let task = controller.task.take().expect("running");
    let err = within("start-up failure", task).await.unwrap().unwrap_err();
    assert!(
        err.to_string()
            .contains("services.web.default.endpoints[0].addr"),
        "{err}"
    );
}

/// The binary exits non-zero with the field's path when the mesh file is invalid.
#[test]
fn the_binary_exits_non_zero_on_a_bad_mesh_file() {
    let dir = std::env::temp_dir().join(format!("conduit-controller-{}-bin", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mesh = dir.join("mesh.yaml");
    std::fs::write(&mesh, "services:\n  web.default:\n    port: eighty\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conduit-controller"))
        .env("CONDUIT_CONTROLLER_MESH_FILE", &mesh)
        .env("CONDUIT_CONTROLLER_GRPC_ADDR", "127.0.0.1:0")
        .env("CONDUIT_CONTROLLER_ADMIN_ADDR", "127.0.0.1:0")
        .env("CONDUIT_CONTROLLER_LOG", "off")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("services.web.default.port"), "{stderr}");

    // A garbled file in the identity directory stops it too, naming the file.
    std::fs::write(&mesh, "services: {}\n").unwrap();
    std::fs::create_dir_all(dir.join("identity")).unwrap();
    std::fs::write(dir.join("identity").join("trust-anchors.pem"), "garbage").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conduit-controller"))
        .env("CONDUIT_CONTROLLER_MESH_FILE", &mesh)
        .env("CONDUIT_CONTROLLER_GRPC_ADDR", "127.0.0.1:0")
        .env("CONDUIT_CONTROLLER_ADMIN_ADDR", "127.0.0.1:0")
        .env("CONDUIT_CONTROLLER_LOG", "off")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("trust-anchors.pem"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_conduit-controller"))
        .env_remove("CONDUIT_CONTROLLER_MESH_FILE")
        .env("CONDUIT_CONTROLLER_GRPC_ADDR", "nope")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("CONDUIT_CONTROLLER_GRPC_ADDR (--grpc-addr)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("CONDUIT_CONTROLLER_MESH_FILE (--mesh-file): missing"),
        "{stderr}"
    );
}

/// The seam the simulation uses: a controller built from a [`FileDiscovery`] with no file,
/// fed with `replace`, served over a listener the caller owns, with the `date` header pinned
/// so hyper never reads the real clock.
#[tokio::test]
async fn the_simulation_seam_serves_without_a_file() {
    use std::sync::Arc;

    use conduit_controller::Controller as Server;
    use conduit_controller::discovery::file::FileDiscovery;
    use conduit_controller::metrics::Metrics;

    let discovery = FileDiscovery::new(conduit_proto::mesh_file::parse(&web(&[9001])).unwrap());
    let controller = Server::new(Arc::new(discovery.clone()), Arc::new(Metrics::new(1)))
        .with_fixed_date_header(http::HeaderValue::from_static(
            "Thu, 01 Jan 1970 00:00:00 GMT",
        ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server_addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        controller
            .serve_grpc(tcp_incoming(listener), shutdown)
            .await
    });

    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{server_addr}")).unwrap();
    let channel = within("connect", endpoint.connect()).await.unwrap();
    // Built without `with_identity`, the controller has no CA, and says so.
    let status = identity::identity_client::IdentityClient::new(channel.clone())
        .certify(identity::CertifyRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("identity is not configured"),
        "{}",
        status.message()
    );
    let mut client = pb::destination_client::DestinationClient::new(channel);
    let request = pb::GetDestination {
        path: "web.default".into(),
        context_token: String::new(),
    };
    let response = within("Get", client.get(request)).await.unwrap();
    assert_eq!(
        response
            .metadata()
            .get("date")
            .map(|v| v.to_str().unwrap().to_owned())
            .as_deref(),
        Some("Thu, 01 Jan 1970 00:00:00 GMT")
    );
    let mut stream = response.into_inner();
    assert_eq!(next(&mut stream).await.version, 1);

    assert_eq!(
        discovery.replace(conduit_proto::mesh_file::parse(&web(&[9002])).unwrap()),
        2
    );
    assert_eq!(
        next(&mut stream).await.change,
        DestinationChange::Add(vec![ep(9002)])
    );
    assert_eq!(
        next(&mut stream).await.change,
        DestinationChange::Remove(vec![addr(9001)])
    );

    drop(stream);
    let _ = stop.send(());
    within("shutdown", server).await.unwrap().unwrap();
}

/// Goal: one greedy client cannot stop other proxies from resolving. Method: three
/// connections each hold 3,500 `Destination.Get` streams for made-up names (10,500 names, more
/// than the controller's table of watched names); a fourth client then resolves `web.default`
/// and gets its endpoints at once. Names no service has take no table entry (their streams
/// share one channel), and each connection's streams are bounded
/// (`MAX_STREAMS_PER_CONNECTION`).
#[tokio::test]
async fn a_greedy_client_cannot_stop_others_from_resolving() {
    let controller = Controller::start("greedy", &web(&[9001])).await;
    let mut held = Vec::new();
    for connection in 0..3 {
        let client = pb::destination_client::DestinationClient::new(controller.channel().await);
        let opened = (0..3500).map(|i| {
            let mut client = client.clone();
            async move {
                let request = pb::GetDestination {
                    path: format!("made-up-{connection}-{i}.default"),
                    context_token: String::new(),
                };
                client.get(request).await.map(tonic::Response::into_inner)
            }
        });
        for stream in within("greedy streams", futures_util::future::join_all(opened)).await {
            held.push(stream.expect("a made-up name is answered (not found), not refused"));
        }
    }
    let mut web = controller.get("web.default").await;
    assert_eq!(
        next(&mut web).await.change,
        DestinationChange::Replace(vec![ep(9001)])
    );
    drop(held);
}
