//! The proxy on the controller, end to end over real loopback sockets: the real controller
//! library serving a mesh file, a proxy whose discovery is [`ControllerDiscover`], and HTTP
//! backends that answer with their own name.
//!
//! Method: the controller runs on its own tokio runtime, so killing it is shutting that runtime
//! down, which closes its listener and every connection like a killed process would. Mesh
//! edits are atomic renames that the controller notices within a few milliseconds. Every
//! expectation is a bounded poll: send requests until the answer is the expected one, a short
//! pause between tries, the whole test bounded by [`WAIT`]. Nothing depends on how long
//! anything takes, only on it happening eventually.

#![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conduit_controller::config::ControllerConfig;
use conduit_controller::net::tcp_incoming;
use conduit_core::backoff::BackoffConfig;
use conduit_core::rand::DetRng;
use conduit_proxy::discover::controller::ControllerDiscoverConfig;
use conduit_proxy::net::PeerAddr;
use conduit_proxy::{Addrs, ControllerDiscover, Proxy, TokioNet};
use support::{body_bytes, config, get_once, named_backend, scrape};
use tokio::sync::oneshot;

/// The longest any test may take.
const WAIT: Duration = Duration::from_secs(30);

/// The pause between tries of a poll.
const PAUSE: Duration = Duration::from_millis(10);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(WAIT, f).await.expect("test timed out")
}

/// A controller on its own runtime.
struct Controller {
    mesh_file: PathBuf,
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Controller {
    /// Starts a controller serving `mesh_file` on `addr` (port 0 for any).
    fn start(mesh_file: &Path, addr: SocketAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let grpc = std::net::TcpListener::bind(addr).unwrap();
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
            identity: conduit_controller::identity::IdentityConfig::new(
                conduit_controller::identity::IdentityConfig::default_dir(mesh_file),
            ),
        };
        runtime.spawn(async move {
            let grpc = tokio::net::TcpListener::from_std(grpc).unwrap();
            let admin = tokio::net::TcpListener::from_std(admin).unwrap();
            let served = conduit_controller::run_controller(
                &config,
                tcp_incoming(grpc),
                tcp_incoming(admin),
                std::future::pending(),
            )
            .await;
            if let Err(err) = served {
                panic!("controller failed: {err}");
            }
        });
        Self {
            mesh_file: mesh_file.to_owned(),
            addr,
            runtime: Some(runtime),
        }
    }

    /// Kills the controller: every task, listener and connection goes at once.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    fn write_mesh(&self, mesh: &str) {
        write_atomically(&self.mesh_file, mesh);
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "conduit-proxy-controller-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A mesh with `web.test` on port 80 over `endpoints`.
fn mesh(endpoints: &[SocketAddr]) -> String {
    let mut yaml = String::from("services:\n  web.test:\n    port: 80\n    endpoints:\n");
    if endpoints.is_empty() {
        yaml.push_str("      []\n");
    }
    for addr in endpoints {
        yaml.push_str(&format!("      - addr: {addr}\n"));
    }
    yaml
}

/// A proxy whose discovery is the controller at `controller`.
struct TestProxy {
    addrs: Addrs,
    shutdown: Option<oneshot::Sender<()>>,
}

impl TestProxy {
    async fn start(controller: impl Into<PeerAddr>, failfast: Duration) -> Self {
        Self::start_with(controller, failfast, Duration::from_secs(60)).await
    }

    async fn start_with(
        controller: impl Into<PeerAddr>,
        failfast: Duration,
        idle: Duration,
    ) -> Self {
        Self::start_configured(controller, |config| {
            config.queue.failfast_timeout = failfast;
            config.discovery_idle_timeout = idle;
        })
        .await
    }

    async fn start_configured(
        controller: impl Into<PeerAddr>,
        configure: impl FnOnce(&mut conduit_proxy::ProxyConfig),
    ) -> Self {
        let mut config = config();
        configure(&mut config);
        let proxy = Proxy::bind(config, TokioNet).await.unwrap();
        let addrs = proxy.addrs();
        let mut settings = ControllerDiscoverConfig::new(controller);
        settings.backoff =
            BackoffConfig::try_new(Duration::from_millis(10), Duration::from_millis(100), 500)
                .unwrap();
        settings.connect_timeout = Duration::from_millis(500);
        let discovery = ControllerDiscover::new(TokioNet, settings, DetRng::new(11)).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            proxy
                .serve(discovery, 7, async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            addrs,
            shutdown: Some(tx),
        }
    }

    /// One GET for `authority`: (status, body).
    async fn get(&self, authority: &str) -> (u16, String) {
        let response = get_once(self.addrs.outbound, authority, "/").await;
        let status = response.status().as_u16();
        let body = body_bytes(response).await;
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Sends requests until one is answered with `status` and `body`.
    async fn wait_for(&self, authority: &str, status: u16, body: &str) {
        loop {
            let got = self.get(authority).await;
            if got.0 == status && got.1 == body {
                return;
            }
            tokio::time::sleep(PAUSE).await;
        }
    }

    /// Sends requests until every one of `n` in a row is answered by `body`.
    async fn wait_for_only(&self, authority: &str, body: &str, n: usize) {
        let mut in_a_row = 0;
        while in_a_row < n {
            let (status, got) = self.get(authority).await;
            if status == 200 && got == body {
                in_a_row += 1;
            } else {
                in_a_row = 0;
                tokio::time::sleep(PAUSE).await;
            }
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_route_through_endpoints_from_the_controller_and_follow_edits() {
    bounded(async {
        let dir = temp_dir("follow");
        let (a, b) = (named_backend("a").await, named_backend("b").await);
        let file = dir.join("mesh.yaml");
        write_atomically(&file, &mesh(&[a]));
        let controller = Controller::start(&file, "127.0.0.1:0".parse().unwrap());
        let proxy = TestProxy::start(controller.addr, Duration::from_secs(3)).await;

        // The first request waits for the controller's answer, then routes.
        assert_eq!(proxy.get("web.test").await, (200, "a".to_owned()));

        // An edit that adds `b` and removes `a` reaches the proxy.
        controller.write_mesh(&mesh(&[a, b]));
        proxy.wait_for("web.test", 200, "b").await;
        controller.write_mesh(&mesh(&[b]));
        proxy.wait_for_only("web.test", "b", 20).await;

        let metrics = scrape(proxy.addrs.admin).await;
        for want in [
            "control_discovery_destinations 1",
            "control_discovery_streams{kind=\"endpoints\",state=\"open\"} 1",
            "control_discovery_streams{kind=\"profile\",state=\"open\"} 1",
            "request_total{direction=\"outbound\",authority=\"web.test:80\"}",
        ] {
            assert!(metrics.contains(want), "{want}\n{metrics}");
        }
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_known_endpoints_survive_the_controller_and_changes_arrive_after_it_returns() {
    bounded(async {
        let dir = temp_dir("outage");
        let (a, b) = (named_backend("a").await, named_backend("b").await);
        let file = dir.join("mesh.yaml");
        write_atomically(&file, &mesh(&[a]));
        let mut controller = Controller::start(&file, "127.0.0.1:0".parse().unwrap());
        let addr = controller.addr;
        let proxy = TestProxy::start(addr, Duration::from_secs(3)).await;
        assert_eq!(proxy.get("web.test").await, (200, "a".to_owned()));

        // The controller dies: the proxy keeps routing with what it knew, through several
        // failed reconnects.
        controller.kill();
        loop {
            let metrics = scrape(proxy.addrs.admin).await;
            let reconnects = sample(
                &metrics,
                "control_discovery_reconnects_total{kind=\"endpoints\"}",
            )
            .unwrap_or(0);
            if reconnects >= 3 {
                break;
            }
            tokio::time::sleep(PAUSE).await;
        }
        for _ in 0..10 {
            assert_eq!(proxy.get("web.test").await, (200, "a".to_owned()));
        }

        // It comes back on the same port with a different mesh: the proxy picks it up.
        write_atomically(&file, &mesh(&[b]));
        let _controller = Controller::start(&file, addr);
        proxy.wait_for_only("web.test", "b", 20).await;
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_services_get_404_from_the_proxy() {
    bounded(async {
        let dir = temp_dir("unknown");
        let a = named_backend("a").await;
        let file = dir.join("mesh.yaml");
        write_atomically(&file, &mesh(&[a]));
        let controller = Controller::start(&file, "127.0.0.1:0".parse().unwrap());
        // The controller by name, as a cluster names it: resolved through the proxy's Net.
        let by_name = PeerAddr::Name {
            host: "localhost".into(),
            port: controller.addr.port(),
        };
        let proxy = TestProxy::start(by_name, Duration::from_secs(3)).await;

        let response = get_once(proxy.addrs.outbound, "nope.test", "/").await;
        assert_eq!(response.status(), 404);
        assert!(response.headers().contains_key("conduit-proxy-error"));

        // The service appears in the mesh: the same authority now routes.
        let mut yaml = mesh(&[a]);
        yaml.push_str(&format!(
            "  nope.test:\n    endpoints:\n      - addr: {a}\n"
        ));
        controller.write_mesh(&yaml);
        proxy.wait_for("nope.test", 200, "a").await;
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_never_answers_means_504_after_fail_fast() {
    bounded(async {
        // Accepts connections (the kernel does, into the backlog) but never speaks gRPC.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy =
            TestProxy::start(silent.local_addr().unwrap(), Duration::from_millis(200)).await;
        let response = get_once(proxy.addrs.outbound, "web.test", "/").await;
        assert_eq!(response.status(), 504);
        assert!(response.headers().contains_key("conduit-proxy-error"));

        // And so does a controller nobody listens for.
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let proxy = TestProxy::start(closed, Duration::from_millis(200)).await;
        assert_eq!(proxy.get("web.test").await.0, 504);
        drop(silent);
    })
    .await;
}

/// A proxy with a local service is not ready until discovery has answered for it (so no
/// client is sent to it before it knows the service's authorization policy), and is ready once
/// the controller answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_is_not_ready_until_discovery_answers_for_its_local_service() {
    bounded(async {
        let dir = temp_dir("local-ready");
        let app = named_backend("app").await;
        let file = dir.join("mesh.yaml");
        write_atomically(&file, &mesh(&[app]));
        // The controller's address, with no controller there yet.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = TestProxy::start_configured(addr, |config| {
            config.service = Some("web.test".into());
            config.app_addr = Some(app);
        })
        .await;
        let response = get_once(proxy.addrs.admin, "admin", "/ready").await;
        assert_eq!(response.status(), 503);
        let body = String::from_utf8_lossy(&body_bytes(response).await).into_owned();
        assert!(body.contains("local service web.test"), "{body}");

        let _controller = Controller::start(&file, addr);
        loop {
            if get_once(proxy.addrs.admin, "admin", "/ready")
                .await
                .status()
                == 200
            {
                break;
            }
            tokio::time::sleep(PAUSE).await;
        }
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}

/// Reads one unlabelled or fully labelled sample from a scrape.
fn sample(metrics: &str, series: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_authorities_are_dropped_and_resolved_again_on_use() {
    bounded(async {
        let dir = temp_dir("idle");
        let a = named_backend("a").await;
        let file = dir.join("mesh.yaml");
        write_atomically(&file, &mesh(&[a]));
        let controller = Controller::start(&file, "127.0.0.1:0".parse().unwrap());
        let proxy = TestProxy::start_with(
            controller.addr,
            Duration::from_secs(3),
            Duration::from_millis(50),
        )
        .await;
        assert_eq!(proxy.get("web.test").await, (200, "a".to_owned()));

        // Unused for the idle timeout: the authority is dropped and both streams cancelled.
        loop {
            let metrics = scrape(proxy.addrs.admin).await;
            let open = |kind: &str| {
                sample(
                    &metrics,
                    &format!("control_discovery_streams{{kind=\"{kind}\",state=\"open\"}}"),
                )
            };
            if sample(&metrics, "control_discovery_destinations") == Some(0)
                && open("endpoints") == Some(0)
                && open("profile") == Some(0)
            {
                break;
            }
            tokio::time::sleep(PAUSE).await;
        }

        // The next request resolves it again.
        assert_eq!(proxy.get("web.test").await, (200, "a".to_owned()));
        let metrics = scrape(proxy.addrs.admin).await;
        assert_eq!(
            sample(&metrics, "control_discovery_destinations"),
            Some(1),
            "{metrics}"
        );
        let _ = std::fs::remove_dir_all(dir);
    })
    .await;
}
