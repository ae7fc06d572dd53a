//! `conduit demo`: a whole mesh on loopback, no cluster needed.
//!
//! The demo starts the real binaries as processes of their own (one `conduit-controller`, one
//! `conduit-proxy` sidecar per replica and one client-side proxy for the load generator), runs
//! the demo apps and the open-loop load generator in this process, and shows a live table per
//! service and replica, computed from the proxies' `/metrics`. Three services, each with
//! something to notice:
//!
//! - `web.demo`: three replicas, one ten times slower than the others; latency-aware balancing
//!   moves traffic off it.
//! - `api.demo`: two replicas, one failing 30 % of its requests; the service's success rate
//!   drops accordingly. Every 30 s that replica also goes down outright for 5 s: the client
//!   proxy's circuit breaker ejects it (the service row says so), probes it with a doubling
//!   backoff, and readmits it once a probe succeeds (a probe can also meet the replica's usual
//!   30 % of failures, and then the next waits twice as long). `proxy-client.log` in the work
//!   directory records each ejection and readmission. It has a route profile (`get-item`, `list-items`, `create-item`, one
//!   with a request timeout; the GET routes retry within a budget), and the load generator
//!   spreads its requests over those routes (and one path no route matches), so `conduit
//!   routes api.demo` has something to show: on the retried routes, callers' effective
//!   success near 100 % while the actual success of attempts stays near 85 %.
//! - `store.demo`: two healthy replicas.
//!
//! Each replica's proxy is told which service it fronts (`CONDUIT_PROXY_SERVICE`), so it
//! applies that service's profile to the requests it receives and counts them per route.
//!
//! The mesh is fully meshed with mTLS: the demo bootstraps the controller's CA in its work
//! directory (`identity/`), gives every proxy an identity (`<service>.serviceaccount.identity.
//! conduit.local`) with a bootstrap token in a file of its own, and lists each replica's
//! identity in the mesh file, so every hop between proxies is mutual TLS with the identity
//! checked, and every proxy reaches the controller over mTLS as well (checking the controller's
//! identity). Each service row shows the share of its requests that arrived over mTLS, as its
//! replicas' proxies counted them (`tls="true"`). `api.demo` admits only authenticated clients
//! (`policy: { default: all-authenticated }`): an outsider without an identity sends it a
//! request a second in plaintext, straight to a replica's inbound port, and the line under
//! the table counts the 403s its proxy answers (none of them reaches the app).
//!
//! On a terminal the live table is redrawn in place every second; otherwise (a pipe, a file)
//! each refresh is appended as plain lines, without escape codes. The demo prints no colour.
//!
//! Every process the demo starts is stopped when it ends (Ctrl-C, `--duration`, or an error):
//! children are killed on drop, and their logs are kept in the demo's work directory.

use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use conduit_proxy::TokioNet;
use conduit_proxy::clock::Clock;
use conduit_scenarios::load::{self, LoadConfig, Target};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::process::{Child, Command};

use crate::app::{self, AppBehaviour};
use crate::stat::{self, Counts, Figures, Row};

/// The demo's CA directory and each workload's bootstrap token (a file of its own, 0600, so
/// no token shows in a process listing's environment).
struct Identities {
    dir: PathBuf,
}

impl Identities {
    fn bootstrap(dir: &Path) -> anyhow::Result<Self> {
        use conduit_controller::identity::{CertificateAuthority, IdentityConfig};
        CertificateAuthority::open(
            &IdentityConfig::new(dir.to_owned()),
            conduit_controller::identity::system_wall_clock(),
        )
        .context("bootstrapping the demo's certificate authority")?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The proxy environment for the workload `service`: its identity name, its token file and
    /// the trust anchors.
    fn env(&self, service: &str) -> anyhow::Result<[(&'static str, String); 4]> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let name = identity_of(service);
        let token = conduit_controller::identity::issue_token(&self.dir, &name)
            .with_context(|| format!("issuing a token for {name}"))?;
        let path = self.dir.join(format!("{service}.token"));
        // Written aside and renamed into place: a proxy of another replica of the service
        // may be reading the file as it is written again.
        let aside = self.dir.join(format!(".{service}.token.tmp"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&aside)
            .with_context(|| format!("writing {}", aside.display()))?;
        file.write_all(token.as_bytes())
            .with_context(|| format!("writing {}", aside.display()))?;
        drop(file);
        std::fs::rename(&aside, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok([
            ("CONDUIT_PROXY_IDENTITY_NAME", name),
            (
                "CONDUIT_PROXY_IDENTITY_TOKEN_FILE",
                path.display().to_string(),
            ),
            (
                "CONDUIT_PROXY_IDENTITY_TRUST_ANCHORS",
                self.dir
                    .join(conduit_controller::identity::TRUST_ANCHORS_FILE)
                    .display()
                    .to_string(),
            ),
            // The control plane is reached over mTLS too.
            (
                "CONDUIT_PROXY_CONTROLLER_IDENTITY",
                conduit_controller::identity::tls::CONTROLLER_IDENTITY.to_owned(),
            ),
        ])
    }
}

/// How often the table refreshes and the proxies are scraped.
const REFRESH: Duration = Duration::from_secs(1);

/// The live table shows figures over this many refreshes (a 10 s window).
const WINDOW_SCRAPES: usize = 10;

/// How long processes get to become ready before the demo gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What `conduit demo` was asked to do.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Stop after this long; run until Ctrl-C when `None`.
    pub duration: Option<Duration>,
    /// Print a JSON summary at the end instead of the live table.
    pub json: bool,
    /// Requests per second sent to each service.
    pub rate: u32,
    /// Where `conduit-proxy` and `conduit-controller` are; next to this executable by default.
    pub bin_dir: Option<PathBuf>,
}

/// One demo replica: its app's behaviour and its ports.
#[derive(Clone, Debug)]
struct Replica {
    behaviour: AppBehaviour,
    role: &'static str,
    app: SocketAddr,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
}

#[derive(Clone, Debug)]
struct DemoService {
    name: &'static str,
    replicas: Vec<Replica>,
    /// The service's route profile, as mesh-file YAML lines (empty: no profile).
    profile: &'static [&'static str],
    /// The requests the load generator sends the service, in turn.
    requests: &'static [(http::Method, &'static str)],
}

/// The failing replica's recurring outage: down outright for the last 5 s of every 30 s
/// (short, so the breaker's probes, 1 s then 2 s then 4 s apart, find it healed soon after).
const FAILING_OUTAGE: app::Outage = app::Outage {
    every: Duration::from_secs(30),
    lasts: Duration::from_secs(5),
};

/// The port every demo service is addressed on.
const DEMO_PORT: u16 = 80;

/// `api.demo`'s route profile: a regex, an exact and a prefix path match, retries (within a
/// budget) on the two GET routes, and a request timeout on one route.
const API_PROFILE: &[&str] = &[
    "- name: get-item",
    "  match: { method: GET, path: { regex: \"/items/[0-9]+\" } }",
    "  retry: { max_attempts: 3, budget: { ratio: 0.2, min_per_second: 10, ttl: 10s } }",
    "- name: list-items",
    "  match: { method: GET, path: { exact: /items } }",
    "  retry: { max_attempts: 3 }",
    "- name: create-item",
    "  match: { method: POST, path: { prefix: /items } }",
    "  timeouts: { request: 500ms }",
];

/// What the load generator sends `api.demo`: every route of its profile, and one path no
/// route matches (the `default` route).
const API_REQUESTS: &[(http::Method, &str)] = &[
    (http::Method::GET, "/items/7"),
    (http::Method::GET, "/items"),
    (http::Method::POST, "/items"),
    (http::Method::GET, "/items/42"),
    (http::Method::GET, "/health"),
];

/// What the load generator sends a service without a profile.
const ROOT_REQUEST: &[(http::Method, &str)] = &[(http::Method::GET, "/")];

/// The demo's final report (`--output json`).
#[derive(Debug, Serialize)]
pub struct DemoSummary {
    /// Seconds of traffic the figures cover.
    pub seconds: f64,
    /// One entry per service.
    pub services: Vec<ServiceSummary>,
    /// The outsider without an identity that `api.demo`'s policy refuses.
    pub outsider: OutsiderSummary,
}

/// What the outsider without an identity got from `api.demo`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutsiderSummary {
    /// Requests sent.
    pub sent: u64,
    /// Answered 403 by the replica's proxy (its policy).
    pub denied: u64,
    /// Answered otherwise (served, or any other status or error).
    pub other: u64,
}

/// The outsider's counts, shared with its task.
#[derive(Debug, Default)]
struct Outsider {
    sent: std::sync::atomic::AtomicU64,
    denied: std::sync::atomic::AtomicU64,
    other: std::sync::atomic::AtomicU64,
}

impl Outsider {
    async fn send(&self, target: SocketAddr) {
        use std::sync::atomic::Ordering::Relaxed;
        self.sent.fetch_add(1, Relaxed);
        let denied = matches!(http_get(target, "/items").await, Ok((403, _)));
        if denied {
            self.denied.fetch_add(1, Relaxed);
        } else {
            self.other.fetch_add(1, Relaxed);
        }
    }

    fn summary(&self) -> OutsiderSummary {
        use std::sync::atomic::Ordering::Relaxed;
        OutsiderSummary {
            sent: self.sent.load(Relaxed),
            denied: self.denied.load(Relaxed),
            other: self.other.load(Relaxed),
        }
    }

    fn line(&self) -> String {
        let s = self.summary();
        format!(
            "An outsider without an identity -> api.demo (plaintext, 1 req/s): {} sent, {} denied \
             with 403 by api.demo's policy (all-authenticated), {} otherwise\n",
            s.sent, s.denied, s.other
        )
    }
}

/// One service in the final report.
#[derive(Debug, Serialize)]
pub struct ServiceSummary {
    /// The service name.
    pub name: String,
    /// Client-side figures (what callers saw through their proxy).
    #[serde(flatten)]
    pub figures: Figures,
    /// The share of the service's requests that arrived at its replicas over mTLS (`None`
    /// without requests).
    pub mtls_share: Option<f64>,
    /// Server-side figures per replica (what each replica's proxy saw inbound).
    pub replicas: Vec<ReplicaSummary>,
}

/// One replica in the final report.
#[derive(Debug, Serialize)]
pub struct ReplicaSummary {
    /// The replica's address (its proxy's inbound port).
    pub addr: SocketAddr,
    /// `healthy`, `slow` or `failing`.
    pub role: &'static str,
    /// Its figures.
    #[serde(flatten)]
    pub figures: Figures,
}

/// A free loopback port below the kernel's ephemeral range.
///
/// # Errors
///
/// No port could be bound.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    // A port below the kernel's ephemeral range (ip_local_port_range, 32768-60999 by default):
    // port 0 would hand out a port from that range, which the kernel may then give to one of
    // the demo's own outgoing connections before the proxy binds it. Bind to check, release;
    // another process could still take it in between, and the demo then reports that.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    for _ in 0..SPAN {
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + offset) % SPAN).unwrap_or(0);
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return Ok(listener.local_addr()?);
        }
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

fn topology() -> anyhow::Result<Vec<DemoService>> {
    type Plan = (
        &'static str,
        &'static [(u64, u64)],
        &'static [&'static str],
        &'static [(http::Method, &'static str)],
    );
    let plan: [Plan; 3] = [
        // (latency ms, failures per mille) per replica
        ("web.demo", &[(5, 0), (5, 0), (50, 0)], &[], ROOT_REQUEST),
        ("api.demo", &[(10, 0), (10, 300)], API_PROFILE, API_REQUESTS),
        ("store.demo", &[(2, 0), (2, 0)], &[], ROOT_REQUEST),
    ];
    let mut seed = 0;
    plan.iter()
        .map(|&(name, replicas, profile, requests)| {
            let replicas = replicas
                .iter()
                .enumerate()
                .map(|(i, &(latency_ms, failures_per_mille))| {
                    seed += 1;
                    let role = match (latency_ms, failures_per_mille) {
                        (_, f) if f > 0 => "failing",
                        (l, _) if l >= 50 => "slow",
                        _ => "healthy",
                    };
                    Ok(Replica {
                        behaviour: AppBehaviour {
                            service: name.to_owned(),
                            replica: i,
                            latency: Duration::from_millis(latency_ms),
                            failures_per_mille,
                            seed,
                            outage: (failures_per_mille > 0).then_some(FAILING_OUTAGE),
                        },
                        role,
                        app: free_port()?,
                        inbound: free_port()?,
                        outbound: free_port()?,
                        admin: free_port()?,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(DemoService {
                name,
                replicas,
                profile,
                requests,
            })
        })
        .collect()
}

/// The load generator's own proxy, listed in the mesh as the workload `load.demo` so the
/// controller reads its outbound metrics (the callers' view in `conduit routes`).
#[derive(Clone, Copy, Debug)]
struct ClientProxy {
    inbound: SocketAddr,
    admin: SocketAddr,
}

/// The identity of the workload `service` (a demo service or `load.demo`).
fn identity_of(service: &str) -> String {
    format!("{service}.serviceaccount.identity.conduit.local")
}

/// `api.demo`'s authorization policy: only clients that prove an identity from the mesh's CA.
const API_POLICY: &[&str] = &["default: all-authenticated"];

fn mesh_file(services: &[DemoService], client: Option<ClientProxy>) -> String {
    let mut yaml = String::from("# Written by `conduit demo`.\nservices:\n");
    if let Some(client) = client {
        yaml.push_str(&format!(
            "  load.demo:\n    port: {DEMO_PORT}\n    endpoints:\n      - addr: {}\n        admin: {}\n        identity: {}\n        labels: {{ role: client }}\n",
            client.inbound,
            client.admin,
            identity_of("load.demo")
        ));
    }
    for service in services {
        yaml.push_str(&format!(
            "  {}:\n    port: {DEMO_PORT}\n    endpoints:\n",
            service.name
        ));
        for replica in &service.replicas {
            yaml.push_str(&format!(
                "      - addr: {}\n        admin: {}\n        identity: {}\n        labels: {{ replica: \"{}\", role: {} }}\n",
                replica.inbound,
                replica.admin,
                identity_of(service.name),
                replica.behaviour.replica,
                replica.role
            ));
        }
        if !service.profile.is_empty() {
            yaml.push_str("    profile:\n      routes:\n");
            for line in service.profile {
                yaml.push_str(&format!("        {line}\n"));
            }
        }
        if service.name == "api.demo" {
            yaml.push_str("    policy:\n");
            for line in API_POLICY {
                yaml.push_str(&format!("      {line}\n"));
            }
        }
    }
    yaml
}

/// The load generator's rotation: every service gets the same share of requests, and each
/// service's requests take their turns within its share, in a fixed order (the run is the
/// same every time).
fn load_targets(services: &[DemoService]) -> Vec<Target> {
    // One round per request of the longest cycle; every cycle divides the least common multiple
    // of the lengths, so each service's requests are evenly spread.
    let lcm = services
        .iter()
        .map(|s| s.requests.len().max(1))
        .fold(1, |acc, n| acc / gcd(acc, n) * n);
    let mut targets = Vec::with_capacity(lcm * services.len());
    for round in 0..lcm {
        for service in services {
            let (method, path) = service
                .requests
                .get(round % service.requests.len().max(1))
                .cloned()
                .unwrap_or((http::Method::GET, "/"));
            targets.push(Target {
                authority: service.name.to_owned(),
                path: path.to_owned(),
                method,
            });
        }
    }
    targets
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The proxy and controller binaries the demo and `conduit redline` start.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `conduit-proxy`.
    pub proxy: PathBuf,
    /// `conduit-controller`.
    pub controller: PathBuf,
}

/// The `cargo` arguments that build the demo's sibling binaries (see [`Binaries::build`]).
const BUILD_ARGS: [&str; 7] = [
    "build",
    "-p",
    "conduit-cli",
    "-p",
    "conduit-proxy",
    "-p",
    "conduit-controller",
];

impl Binaries {
    /// Finds the binaries in `bin_dir`, or next to this executable (building them first under
    /// `cargo run`).
    ///
    /// # Errors
    ///
    /// A binary is missing, or the build failed.
    pub fn locate(bin_dir: Option<&Path>) -> anyhow::Result<Self> {
        let dir = match bin_dir {
            Some(dir) => dir.to_path_buf(),
            None => std::env::current_exe()
                .context("locating this executable")?
                .parent()
                .map(Path::to_path_buf)
                .context("this executable has no directory")?,
        };
        let bins = Self {
            proxy: dir.join("conduit-proxy"),
            controller: dir.join("conduit-controller"),
        };
        // Next to this executable under `cargo run`, the siblings may be missing or older than
        // the sources: let cargo bring them up to date (a no-op when they are). An explicit
        // --bin-dir is used as given.
        if bin_dir.is_none() {
            Self::build(dir.ends_with("release"))?;
        }
        for bin in [&bins.proxy, &bins.controller] {
            if !bin.exists() {
                bail!(
                    "{} not found; build it with `cargo build --release -p conduit-proxy -p conduit-controller` or pass --bin-dir",
                    bin.display()
                );
            }
        }
        Ok(bins)
    }

    /// Under `cargo run` (which sets `CARGO`), builds the sibling binaries the demo needs:
    /// cargo builds only the package it was asked to run. Elsewhere it does nothing.
    ///
    /// The build names `conduit-cli` beside the two packages it wants. Cargo unifies the
    /// features of shared dependencies over the packages a command selects, and
    /// `conduit-cli` turns on more of them (tokio's `process`, `signal` and `fs`, hyper's
    /// server side, ...) than the proxy and the controller do alone: building those two by
    /// themselves would compile tokio, hyper, h2, tonic and everything above them a second
    /// time with the smaller feature set. With `conduit-cli` selected too, the features are
    /// the ones the `cargo run` that started the demo just built with, so every dependency is
    /// already fresh and only the two binaries are linked.
    fn build(release: bool) -> anyhow::Result<()> {
        let Some(cargo) = std::env::var_os("CARGO") else {
            return Ok(());
        };
        tracing::info!("building conduit-proxy and conduit-controller");
        let mut command = std::process::Command::new(cargo);
        command.args(BUILD_ARGS);
        if release {
            command.arg("--release");
        }
        let status = command.status().context("running cargo build")?;
        if !status.success() {
            bail!("cargo build of conduit-proxy and conduit-controller failed");
        }
        Ok(())
    }
}

/// The processes a command started; each is killed when this is dropped.
#[derive(Debug)]
pub struct Processes {
    children: Vec<Running>,
    logs: PathBuf,
}

/// A started process and how it was started (to start it again).
#[derive(Debug)]
struct Running {
    name: String,
    child: Child,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Processes {
    /// No processes yet; each one's output goes to `<logs>/<name>.log`.
    #[must_use]
    pub fn new(logs: PathBuf) -> Self {
        Self {
            children: Vec::new(),
            logs,
        }
    }

    /// Starts `program` with `env` added to its environment.
    ///
    /// # Errors
    ///
    /// The log file or the process could not be made.
    pub fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        self.spawn_with_args(name, program, &[], env)
    }

    /// Starts `program` with arguments and `env` added to its environment.
    ///
    /// # Errors
    ///
    /// The log file or the process could not be made.
    pub fn spawn_with_args(
        &mut self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let child = self.start(name, program, args, &env, false)?;
        self.children.push(Running {
            name: name.to_owned(),
            child,
            program: program.to_path_buf(),
            args: args.to_vec(),
            env,
        });
        Ok(())
    }

    fn start(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        append: bool,
    ) -> anyhow::Result<Child> {
        let path = self.logs.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .with_context(|| format!("creating the log file for {name}"))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        command
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))
    }

    fn find(&mut self, name: &str) -> anyhow::Result<&mut Running> {
        self.children
            .iter_mut()
            .find(|r| r.name == name)
            .with_context(|| format!("no process named {name}"))
    }

    /// The process id of `name`, while it runs.
    #[must_use]
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.child.id())
    }

    /// Kills `name` (SIGKILL) and waits for it to exit.
    ///
    /// # Errors
    ///
    /// No such process, or it could not be killed.
    pub async fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let running = self.find(name)?;
        running.child.start_kill().ok();
        running.child.wait().await?;
        Ok(())
    }

    /// Starts `name` again as it was started first (its log appended to), killing what is left
    /// of it.
    ///
    /// # Errors
    ///
    /// No such process, or it could not be started.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        self.kill(name).await?;
        let index = self
            .children
            .iter()
            .position(|r| r.name == name)
            .with_context(|| format!("no process named {name}"))?;
        let running = &self.children[index];
        let child = self.start(
            name,
            &running.program.clone(),
            &running.args.clone(),
            &running.env.clone(),
            true,
        )?;
        self.children[index].child = child;
        Ok(())
    }

    /// Fails if any child has exited.
    ///
    /// # Errors
    ///
    /// Names the first child that exited, with its status and log.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for running in &mut self.children {
            if let Some(status) = running.child.try_wait()? {
                bail!(
                    "{} exited ({status}); see {}",
                    running.name,
                    self.logs.join(format!("{}.log", running.name)).display()
                );
            }
        }
        Ok(())
    }
}

/// GETs `path` from `addr` with a short timeout and returns the status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = http::Request::builder()
            .uri(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))?
}

async fn wait_ready(
    processes: &mut Processes,
    admins: &[(String, SocketAddr)],
) -> anyhow::Result<()> {
    let wait = async {
        for (name, admin) in admins {
            loop {
                processes.check_alive()?;
                if matches!(http_get(*admin, "/ready").await, Ok((200, _))) {
                    break;
                }
                tracing::debug!(process = %name, "waiting for readiness");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(READY_TIMEOUT, wait)
        .await
        .with_context(|| format!("the mesh was not ready within {READY_TIMEOUT:?}"))?
}

/// One round of scrapes: the client proxy's outbound counts per service, and each replica's
/// inbound counts.
#[derive(Clone, Debug)]
struct Scrape {
    at: conduit_core::time::Instant,
    services: BTreeMap<String, Counts>,
    replicas: BTreeMap<SocketAddr, Counts>,
    /// Responses each replica's proxy counted for requests that arrived over mTLS.
    replicas_mtls: BTreeMap<SocketAddr, u64>,
    /// Endpoints the client proxy's breakers hold ejected now, per service.
    ejected: BTreeMap<String, u64>,
}

async fn scrape(
    clock: Clock,
    client_admin: SocketAddr,
    services: &[DemoService],
) -> anyhow::Result<Scrape> {
    let at = clock.now();
    let (_, text) = http_get(client_admin, "/metrics").await?;
    let samples = conduit_proto::prom::parse(&text)?;
    let mut by_service: BTreeMap<String, Counts> = BTreeMap::new();
    for (authority, counts) in stat::counts_by_authority(&samples, "outbound") {
        // Clients may or may not name the port; both are the same service.
        let host = authority.split(':').next().unwrap_or_default().to_owned();
        by_service.entry(host).or_default().add(&counts);
    }
    let mut ejected = BTreeMap::new();
    for sample in samples.iter().filter(|s| {
        s.name == "balancer_endpoints" && s.label("state") == Some("ejected") && s.value > 0.0
    }) {
        let authority = sample.label("authority").unwrap_or_default();
        let host = authority.split(':').next().unwrap_or_default().to_owned();
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a gauge of endpoints: a small whole number"
        )]
        let count = sample.value as u64;
        *ejected.entry(host).or_default() += count;
    }
    let mut replicas = BTreeMap::new();
    let mut replicas_mtls = BTreeMap::new();
    for service in services {
        for replica in &service.replicas {
            // A replica that cannot be scraped this round shows no traffic for it.
            if let Ok((_, text)) = http_get(replica.admin, "/metrics").await
                && let Ok(samples) = conduit_proto::prom::parse(&text)
            {
                replicas.insert(
                    replica.inbound,
                    stat::total(&stat::counts_by_authority(&samples, "inbound")),
                );
                let mtls: f64 = samples
                    .iter()
                    .filter(|s| {
                        s.name == "response_total"
                            && s.label("direction") == Some("inbound")
                            && s.label("tls") == Some("true")
                    })
                    .map(|s| s.value)
                    .sum();
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a counter: a whole number, clamped at zero"
                )]
                replicas_mtls.insert(replica.inbound, mtls.max(0.0) as u64);
            }
        }
    }
    Ok(Scrape {
        at,
        services: by_service,
        replicas,
        replicas_mtls,
        ejected,
    })
}

fn rows(services: &[DemoService], from: &Scrape, to: &Scrape) -> (Vec<Row>, Vec<ServiceSummary>) {
    let interval = to.at.saturating_duration_since(from.at);
    let mut rows = Vec::new();
    let mut summaries = Vec::new();
    for service in services {
        let empty = Counts::default();
        let now = to.services.get(service.name).unwrap_or(&empty);
        let before = from.services.get(service.name).unwrap_or(&empty);
        let figures = Figures::from_counts(&now.since(before), interval);
        let mtls = mtls_share(service, from, to);
        let mut name = service.name.to_owned();
        if let Some(share) = mtls {
            name.push_str(&format!(" (mTLS {:.0}%)", share * 100.0));
        }
        if let Some(n) = to.ejected.get(service.name) {
            name.push_str(&format!(" ({n} of {} ejected)", service.replicas.len()));
        }
        rows.push(Row {
            name,
            depth: 0,
            figures: figures.clone(),
        });
        let mut replicas = Vec::new();
        for replica in &service.replicas {
            let now = to.replicas.get(&replica.inbound).unwrap_or(&empty);
            let before = from.replicas.get(&replica.inbound).unwrap_or(&empty);
            let figures = Figures::from_counts(&now.since(before), interval);
            rows.push(Row {
                name: format!(
                    "{}-{} {} ({})",
                    service.name.trim_end_matches(".demo"),
                    replica.behaviour.replica,
                    replica.inbound,
                    replica.role
                ),
                depth: 1,
                figures: figures.clone(),
            });
            replicas.push(ReplicaSummary {
                addr: replica.inbound,
                role: replica.role,
                figures,
            });
        }
        summaries.push(ServiceSummary {
            name: service.name.to_owned(),
            figures,
            mtls_share: mtls,
            replicas,
        });
    }
    (rows, summaries)
}

/// The share of `service`'s responses between two scrapes that its replicas' proxies counted
/// for requests over mTLS.
fn mtls_share(service: &DemoService, from: &Scrape, to: &Scrape) -> Option<f64> {
    let (mut all, mut mtls) = (0u64, 0u64);
    for replica in &service.replicas {
        let empty = Counts::default();
        let now = to.replicas.get(&replica.inbound).unwrap_or(&empty);
        let before = from.replicas.get(&replica.inbound).unwrap_or(&empty);
        all += now.since(before).responses;
        let tls_now = to.replicas_mtls.get(&replica.inbound).copied().unwrap_or(0);
        let tls_before = from
            .replicas_mtls
            .get(&replica.inbound)
            .copied()
            .unwrap_or(0);
        // A restarted proxy's counters start again from zero.
        mtls += if tls_now >= tls_before {
            tls_now - tls_before
        } else {
            tls_now
        };
    }
    #[expect(clippy::cast_precision_loss, reason = "a share for display")]
    let share = (all > 0).then(|| (mtls.min(all)) as f64 / all as f64);
    share
}

/// The lines above the live table: what runs, and the commands to try in another terminal.
fn header(
    services: &[DemoService],
    controller: SocketAddr,
    controller_admin: SocketAddr,
    window_seconds: usize,
    elapsed_seconds: u64,
) -> String {
    let routed: Vec<&str> = services
        .iter()
        .filter(|s| !s.profile.is_empty())
        .map(|s| s.name)
        .collect();
    let mut text = format!(
        "Conduit demo: {} services, {} replicas, each behind its own proxy; controller on {controller}.\n\
         Figures over the last {window_seconds}s; {elapsed_seconds}s elapsed. Ctrl-C stops the demo.\n\
         In another terminal:\n  conduit stat --controller {controller}\n  conduit check --controller {controller} --controller-admin {controller_admin}\n",
        services.len(),
        services.iter().map(|s| s.replicas.len()).sum::<usize>(),
    );
    for service in routed {
        text.push_str(&format!(
            "  conduit routes {service} --controller {controller}\n"
        ));
    }
    text.push('\n');
    text
}

/// What to print for a frame of the live table. On a terminal each frame replaces the one
/// before in place, as `watch` and `top` do: the first clears the screen (CSI `2J`, so what
/// was on it goes to the scrollback once), and every frame starts at the top-left corner
/// (CSI `H`), erases the rest of each line it writes (CSI `K`) and everything below its last
/// line (CSI `J`). Nothing scrolls, so the scrollback holds no copy per refresh, and lines
/// that wrap on a narrow terminal are overwritten all the same (moving the cursor up by the
/// frame's line count would miss them). Elsewhere (a pipe, a file) the frame is appended as
/// plain text after a blank line, with no escape codes.
fn redraw(first: bool, frame: &str, interactive: bool) -> String {
    if !interactive {
        return format!("{frame}\n");
    }
    let mut out = String::with_capacity(frame.len() + 64);
    if first {
        out.push_str("\x1b[2J");
    }
    out.push_str("\x1b[H");
    for line in frame.lines() {
        out.push_str(line);
        out.push_str("\x1b[K\n");
    }
    out.push_str("\x1b[J");
    out
}

/// Runs the demo until Ctrl-C or the duration ends.
///
/// # Errors
///
/// Any process failing to start or become ready, or the demo's own IO failing.
pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    let bins = Binaries::locate(options.bin_dir.as_deref())?;
    let work = std::env::temp_dir().join(format!("conduit-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = run_in(&options, &bins, &work).await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("demo logs kept in {}", work.display());
    }
    result
}

async fn run_in(options: &DemoOptions, bins: &Binaries, work: &Path) -> anyhow::Result<()> {
    let services = topology()?;
    let mesh_path = work.join("mesh.yaml");
    let client = ClientProxy {
        inbound: free_port()?,
        admin: free_port()?,
    };
    std::fs::write(&mesh_path, mesh_file(&services, Some(client)))
        .context("writing the demo mesh file")?;

    // The apps run in this process; the controller and proxies are processes of their own.
    let mut apps = tokio::task::JoinSet::new();
    for replica in services.iter().flat_map(|s| &s.replicas) {
        let listener = app::bind(replica.app)
            .await
            .with_context(|| format!("binding demo app on {}", replica.app))?;
        apps.spawn(app::serve(listener, replica.behaviour.clone()));
    }

    let mut processes = Processes::new(work.to_path_buf());
    // The CA, bootstrapped here before the controller starts (which then reuses it), so every
    // proxy's token and the trust anchors exist when the proxies are started.
    let identity_dir = work.join("identity");
    let identity = Identities::bootstrap(&identity_dir)?;
    let controller_grpc = free_port()?;
    let controller_admin = free_port()?;
    processes.spawn(
        "controller",
        &bins.controller,
        &[
            ("CONDUIT_CONTROLLER_GRPC_ADDR", controller_grpc.to_string()),
            (
                "CONDUIT_CONTROLLER_ADMIN_ADDR",
                controller_admin.to_string(),
            ),
            (
                "CONDUIT_CONTROLLER_MESH_FILE",
                mesh_path.display().to_string(),
            ),
            (
                "CONDUIT_CONTROLLER_IDENTITY_DIR",
                identity_dir.display().to_string(),
            ),
            ("CONDUIT_CONTROLLER_LOG", "warn".to_owned()),
        ],
    )?;
    // Every proxy discovers through the controller, as in a real mesh: the demo runs the
    // control plane path (Destination streams), not a shared file.
    let discovery = controller_grpc.to_string();
    let mut admins = vec![("controller".to_owned(), controller_admin)];
    for service in &services {
        for replica in &service.replicas {
            let name = format!("proxy-{}-{}", service.name, replica.behaviour.replica);
            let [id_name, id_token, id_anchors, id_controller] = identity.env(service.name)?;
            processes.spawn(
                &name,
                &bins.proxy,
                &[
                    id_name,
                    id_token,
                    id_anchors,
                    id_controller,
                    ("CONDUIT_PROXY_INBOUND_ADDR", replica.inbound.to_string()),
                    ("CONDUIT_PROXY_OUTBOUND_ADDR", replica.outbound.to_string()),
                    ("CONDUIT_PROXY_ADMIN_ADDR", replica.admin.to_string()),
                    ("CONDUIT_PROXY_APP_ADDR", replica.app.to_string()),
                    // The service this replica serves: its proxy applies the service's own
                    // profile to inbound requests (per-route metrics and policy).
                    (
                        "CONDUIT_PROXY_SERVICE",
                        format!("{}:{DEMO_PORT}", service.name),
                    ),
                    ("CONDUIT_PROXY_DISCOVERY", discovery.clone()),
                    ("CONDUIT_PROXY_LOG", "warn".to_owned()),
                ],
            )?;
            admins.push((name, replica.admin));
        }
    }
    let client_outbound = free_port()?;
    let client_admin = client.admin;
    let [id_name, id_token, id_anchors, id_controller] = identity.env("load.demo")?;
    processes.spawn(
        "proxy-client",
        &bins.proxy,
        &[
            id_name,
            id_token,
            id_anchors,
            id_controller,
            ("CONDUIT_PROXY_OUTBOUND_ADDR", client_outbound.to_string()),
            ("CONDUIT_PROXY_INBOUND_ADDR", client.inbound.to_string()),
            ("CONDUIT_PROXY_ADMIN_ADDR", client_admin.to_string()),
            ("CONDUIT_PROXY_DISCOVERY", discovery.clone()),
            // Each ejection and readmission is logged (info) in proxy-client.log.
            (
                "CONDUIT_PROXY_LOG",
                "warn,conduit_proxy::balance=info".to_owned(),
            ),
        ],
    )?;
    admins.push(("proxy-client".to_owned(), client_admin));
    wait_ready(&mut processes, &admins).await?;

    // Open-loop load through the client proxy: the services in turn, each with its requests in
    // turn.
    let service_count = u32::try_from(services.len()).unwrap_or(u32::MAX);
    let load_config = LoadConfig {
        rate: options.rate.saturating_mul(service_count),
        duration: options.duration.unwrap_or(Duration::from_secs(24 * 3600)),
        connections: 32,
        timeout: Duration::from_secs(10),
        targets: load_targets(&services),
        arrivals: load::Arrivals::Constant,
        protocol: load::Protocol::Http1,
        spin_wait: false,
    };
    let clock = Clock::new();
    let load = tokio::spawn(load::run(TokioNet, client_outbound, load_config, clock));

    // An outsider without an identity: plaintext, straight to an api.demo replica.
    let outsider = Arc::new(Outsider::default());
    let outsider_task = {
        let outsider = Arc::clone(&outsider);
        let target = services
            .iter()
            .find(|s| s.name == "api.demo")
            .and_then(|s| s.replicas.first())
            .map(|r| r.inbound);
        tokio::spawn(async move {
            let Some(target) = target else { return };
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                outsider.send(target).await;
            }
        })
    };

    let first = scrape(clock, client_admin, &services).await?;
    let mut window: VecDeque<Scrape> = VecDeque::from([first.clone()]);
    let end = options.duration.map(|d| first.at + d);
    let interactive = !options.json && std::io::stdout().is_terminal();
    // Whether the next frame is the first (which clears the terminal).
    let mut first_frame = true;
    let mut ticker = tokio::time::interval(REFRESH);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        processes.check_alive()?;
        let latest = scrape(clock, client_admin, &services).await?;
        window.push_back(latest.clone());
        if window.len() > WINDOW_SCRAPES + 1 {
            window.pop_front();
        }
        if !options.json {
            let (table, _) = rows(&services, &window[0], &latest);
            let elapsed = latest.at.saturating_duration_since(first.at).as_secs();
            let frame = format!(
                "{}{}\n{}",
                header(
                    &services,
                    controller_grpc,
                    controller_admin,
                    window.len().saturating_sub(1),
                    elapsed
                ),
                stat::render(&table),
                outsider.line()
            );
            print!("{}", redraw(first_frame, &frame, interactive));
            let _ = std::io::stdout().flush();
            first_frame = false;
        }
        if end.is_some_and(|end| latest.at >= end) {
            break;
        }
    }
    load.abort();
    outsider_task.abort();
    // The whole run is summed up to the last scrape of the loop: a Ctrl-C in a terminal reaches
    // the proxies too, so a scrape after it would race their shutdown.
    let last = window.back().cloned().unwrap_or_else(|| first.clone());
    let (table, summaries) = rows(&services, &first, &last);
    let summary = DemoSummary {
        seconds: last.at.saturating_duration_since(first.at).as_secs_f64(),
        services: summaries,
        outsider: outsider.summary(),
    };
    if options.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "\nWhole run ({:.0}s):\n{}\n{}",
            summary.seconds,
            stat::render(&table),
            outsider.line()
        );
    }
    drop(processes);
    apps.abort_all();
    Ok(())
}

#[cfg(test)]
mod tests {
    use conduit_core::route::{DEFAULT_ROUTE, RequestView};

    use super::*;

    struct Head<'a>(&'a http::Method, &'a str);

    impl RequestView for Head<'_> {
        fn method(&self) -> &[u8] {
            self.0.as_str().as_bytes()
        }
        fn path(&self) -> &[u8] {
            self.1.as_bytes()
        }
        fn any_header(&self, _: &http::HeaderName, _: &mut dyn FnMut(&[u8]) -> bool) -> bool {
            false
        }
    }

    /// The mesh file gives `api.demo` a profile the controller accepts, and the load
    /// generator's rotation sends each service the same share while spreading `api.demo`'s
    /// share over every one of its routes and the default route.
    #[test]
    fn the_load_covers_every_route_of_the_demo_profile() {
        let services = topology().unwrap();
        let mesh = conduit_proto::mesh_file::parse(&mesh_file(&services, None)).unwrap();
        let api = mesh.lookup("api.demo:80").unwrap();
        let names: Vec<&str> = api.profile.route_names().collect();
        assert_eq!(
            names,
            ["get-item", "list-items", "create-item", DEFAULT_ROUTE]
        );
        assert!(
            api.profile
                .routes()
                .iter()
                .any(|r| r.policy.timeouts.request == Some(Duration::from_millis(500)))
        );
        assert!(mesh.lookup("web.demo:80").unwrap().profile.is_empty());

        let targets = load_targets(&services);
        let mut per_service: BTreeMap<&str, usize> = BTreeMap::new();
        let mut per_route: BTreeMap<&str, usize> = BTreeMap::new();
        for target in &targets {
            *per_service.entry(target.authority.as_str()).or_default() += 1;
            if target.authority == "api.demo" {
                let route = api.profile.find(&Head(&target.method, &target.path));
                *per_route.entry(route.name()).or_default() += 1;
            }
        }
        assert_eq!(
            per_service.values().collect::<Vec<_>>(),
            [&5, &5, &5],
            "{per_service:?}"
        );
        assert_eq!(
            per_route,
            BTreeMap::from([
                ("create-item", 1),
                ("default", 1),
                ("get-item", 2),
                ("list-items", 1)
            ])
        );
        // The rotation interleaves the services: consecutive requests go to different ones.
        assert!(targets.windows(2).all(|w| w[0].authority != w[1].authority));
        assert_eq!(targets, load_targets(&services), "the same every run");
    }

    #[test]
    fn the_header_names_the_commands_to_try() {
        let services = topology().unwrap();
        let controller: SocketAddr = "127.0.0.1:8086".parse().unwrap();
        let admin: SocketAddr = "127.0.0.1:9996".parse().unwrap();
        let text = header(&services, controller, admin, 10, 12);
        assert!(
            text.contains("\n  conduit stat --controller 127.0.0.1:8086\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "\n  conduit check --controller 127.0.0.1:8086 --controller-admin 127.0.0.1:9996\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("\n  conduit routes api.demo --controller 127.0.0.1:8086\n"),
            "{text}"
        );
        assert!(!text.contains("conduit routes web.demo"), "{text}");
    }

    #[test]
    fn frames_redraw_in_place_on_a_terminal_and_append_elsewhere() {
        let frame = "HEADER\nrow 1\nrow 2\n";
        let piped = redraw(true, frame, false) + &redraw(false, frame, false);
        assert_eq!(piped, "HEADER\nrow 1\nrow 2\n\nHEADER\nrow 1\nrow 2\n\n");
        assert!(!piped.contains('\x1b'), "no escape codes off a terminal");

        let first = redraw(true, frame, true);
        assert_eq!(
            first,
            "\x1b[2J\x1b[HHEADER\x1b[K\nrow 1\x1b[K\nrow 2\x1b[K\n\x1b[J"
        );
        let next = redraw(false, frame, true);
        assert!(next.starts_with("\x1b[H"), "{next:?}");
        assert!(
            !next.contains("\x1b[2J"),
            "only the first frame clears the screen"
        );
    }

    #[test]
    fn the_sibling_build_selects_the_cli_too() {
        // See `Binaries::build`: without `conduit-cli`, shared dependencies would be compiled
        // a second time with another feature set.
        let packages: Vec<&str> = BUILD_ARGS
            .windows(2)
            .filter(|w| w[0] == "-p")
            .map(|w| w[1])
            .collect();
        assert_eq!(
            packages,
            ["conduit-cli", "conduit-proxy", "conduit-controller"]
        );
    }
}
