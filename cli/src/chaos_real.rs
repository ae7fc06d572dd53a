//! `conduit chaos --real`: chaos against real processes on loopback.
//!
//! It starts a controller, three replicas of a service (each a `conduit hello` app behind its
//! own conduit-proxy) and a client proxy, all as processes, with a seeded TCP fault proxy on
//! each link between the client proxy and a replica's proxy (the controller publishes the
//! fault proxies' addresses as the endpoints). Then it sends open-loop traffic through the
//! client proxy while a seeded schedule breaks things: kills and restarts proxies and the
//! controller (SIGKILL), freezes and thaws proxies and apps (SIGSTOP, SIGCONT), and turns a
//! link's fault proxy to added latency with jitter, a bandwidth cap, a connection dropped after
//! some bytes, resets, or a blackhole. Every fault heals before the run's last 40 %.
//!
//! It checks what it can observe from outside: every request got an HTTP answer (the proxy's
//! own error responses count; a request that timed out at the client or lost its connection
//! does not), every request of the last 20 % succeeded (recovery), and the client proxy's
//! request counter equals the requests sent. It writes `report.json` and `report.txt`.
//!
//! With `--netns` (root, iproute2 and iptables), each host (the client, the controller, each
//! replica with its app) runs in a network namespace of its own behind a router namespace
//! ([`crate::netns`]); the client's traffic, readiness checks and metric reads run on a thread
//! inside the client's namespace. The schedule then also draws partitions between hosts (both
//! ways and one way), random packet loss at a host and TCP resets, each an iptables rule in the
//! router added at the strike and removed at the heal.
//!
//! Bounded: the run lasts `--duration` plus start-up and at most a few seconds of draining,
//! sends traffic only to 127.0.0.1 (or to its own namespaces), and every process it started is
//! killed when it ends, on failure and on Ctrl-C (a frozen process is killed too: SIGKILL
//! needs no thaw), and every namespace it made is deleted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use conduit_core::rand::{DetRng, Rng};
use conduit_proxy::TokioNet;
use conduit_proxy::clock::Clock;
use conduit_scenarios::load::{self, LoadConfig, LoadReport, Target};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use conduit_cli::demo::{Binaries, Processes, free_port, http_get};

use crate::netns::Netns;

/// The service the run's replicas serve.
const SERVICE: &str = "web.chaos";
/// Replicas of it.
const REPLICAS: usize = 3;

/// What `--real` was asked for.
#[derive(Clone, Debug)]
pub(crate) struct RealOptions {
    pub(crate) seed: u64,
    pub(crate) duration: Duration,
    pub(crate) rate: u32,
    pub(crate) out: PathBuf,
    pub(crate) bin_dir: Option<PathBuf>,
    /// Hosts in network namespaces, with iptables faults between them.
    pub(crate) netns: bool,
}

/// What a link's fault proxy does to the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum LinkMode {
    /// Forward untouched.
    Pass,
    /// Hold each chunk `base` plus up to `jitter` before forwarding it.
    Latency { base_ms: u64, jitter_ms: u64 },
    /// Forward at most this many bytes per second, each way.
    Bandwidth { bytes_per_second: u64 },
    /// Close a connection (both ways) once it has carried this many bytes.
    DropAfter { bytes: u64 },
    /// Reset connections: new ones at once, open ones at their next chunk.
    Reset,
    /// Accept connections and carry nothing (a black hole: no answer, no close).
    Blackhole,
}

/// One fault of the schedule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum RealFault {
    /// SIGKILL a process, start it again at the heal.
    Kill(String),
    /// SIGSTOP a process, SIGCONT at the heal.
    Freeze(String),
    /// A link's fault proxy changes mode, back to `Pass` at the heal.
    Link(usize, LinkMode),
    /// Packets between two hosts are dropped, both ways (`--netns`).
    Partition(String, String),
    /// Packets from the first host to the second are dropped; the other way passes
    /// (`--netns`).
    OneWay(String, String),
    /// This percentage of packets to and from a host is dropped (`--netns`).
    Loss(String, u64),
    /// TCP segments from the first host to the second are answered with a reset (`--netns`).
    TcpReset(String, String),
}

impl RealFault {
    fn kind(&self) -> &'static str {
        match self {
            Self::Kill(name) if name == "controller" => "controller_kill",
            Self::Kill(_) => "proxy_kill",
            Self::Freeze(name) if name.starts_with("app-") => "app_freeze",
            Self::Freeze(_) => "proxy_freeze",
            Self::Link(_, LinkMode::Latency { .. }) => "link_latency",
            Self::Link(_, LinkMode::Bandwidth { .. }) => "link_bandwidth",
            Self::Link(_, LinkMode::DropAfter { .. }) => "link_drop_after",
            Self::Link(_, LinkMode::Reset) => "link_reset",
            Self::Link(_, LinkMode::Blackhole) => "link_blackhole",
            Self::Link(_, LinkMode::Pass) => "link_pass",
            Self::Partition(..) => "partition",
            Self::OneWay(..) => "one_way_partition",
            Self::Loss(..) => "packet_loss",
            Self::TcpReset(..) => "tcp_reset",
        }
    }
}

/// A fault with its window.
#[derive(Clone, Debug, Serialize)]
struct Scheduled {
    at_ms: u64,
    heal_ms: u64,
    fault: RealFault,
}

/// The hosts of a `--netns` run, each a namespace.
const HOSTS: [&str; 2 + REPLICAS] = [
    "client",
    "controller",
    "replica-0",
    "replica-1",
    "replica-2",
];

/// The host (namespace) a process runs on.
fn host_of(process: &str) -> String {
    match process {
        "controller" => "controller".to_owned(),
        "proxy-client" => "client".to_owned(),
        other => format!("replica-{}", other.rsplit('-').next().unwrap_or("0")),
    }
}

/// The seeded schedule: 4-8 faults, each striking inside the first 60 % of the run and healed
/// by then. With `netns`, network faults between hosts are drawn too.
fn schedule(seed: u64, duration: Duration, netns: bool) -> Vec<Scheduled> {
    let mut rng = DetRng::new(seed).child("chaos-real");
    let chaos_ms = u64::try_from(duration.as_millis()).unwrap_or(20_000) * 6 / 10;
    let start_ms = chaos_ms / 10;
    let mut out = Vec::new();
    for _ in 0..rng.between(4, 8) {
        let at_ms = start_ms + rng.below((chaos_ms - start_ms) * 3 / 4);
        let heal_ms = (at_ms + rng.between(500, 3_000)).min(chaos_ms);
        let replica = usize::try_from(rng.below(REPLICAS as u64)).unwrap_or(0);
        let fault = match rng.below(if netns { 13 } else { 9 }) {
            0 => RealFault::Kill(format!("proxy-{replica}")),
            1 => RealFault::Kill("controller".to_owned()),
            2 => RealFault::Freeze(format!("proxy-{replica}")),
            3 => RealFault::Freeze(format!("app-{replica}")),
            4 => RealFault::Link(
                replica,
                LinkMode::Latency {
                    base_ms: rng.between(20, 200),
                    jitter_ms: rng.between(0, 100),
                },
            ),
            5 => RealFault::Link(
                replica,
                LinkMode::Bandwidth {
                    bytes_per_second: rng.between(2_000, 50_000),
                },
            ),
            6 => RealFault::Link(
                replica,
                LinkMode::DropAfter {
                    bytes: rng.between(100, 20_000),
                },
            ),
            7 => RealFault::Link(replica, LinkMode::Reset),
            8 => RealFault::Link(replica, LinkMode::Blackhole),
            kind => {
                let replica = format!("replica-{replica}");
                // Which pair: the client and a replica, a replica and the controller, or the
                // client and the controller.
                let (a, b) = match rng.below(3) {
                    0 => ("client".to_owned(), replica.clone()),
                    1 => (replica.clone(), "controller".to_owned()),
                    _ => ("client".to_owned(), "controller".to_owned()),
                };
                let (a, b) = if rng.chance(1, 2) { (a, b) } else { (b, a) };
                match kind {
                    9 => RealFault::Partition(a, b),
                    10 => RealFault::OneWay(a, b),
                    11 => RealFault::Loss(a, rng.between(5, 40)),
                    _ => RealFault::TcpReset("client".to_owned(), replica),
                }
            }
        };
        out.push(Scheduled {
            at_ms,
            heal_ms,
            fault,
        });
    }
    out.sort_by_key(|s| s.at_ms);
    out
}

/// A seeded TCP fault proxy: listens on `listen`, forwards to `upstream`, in the mode set.
#[derive(Clone, Debug)]
struct FaultLink {
    mode: Arc<Mutex<LinkMode>>,
    rng: Arc<Mutex<DetRng>>,
}

impl FaultLink {
    fn mode(&self) -> LinkMode {
        *self
            .mode
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, mode: LinkMode) {
        *self
            .mode
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = mode;
    }

    fn jitter(&self, max_ms: u64) -> u64 {
        self.rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .below(max_ms + 1)
    }

    async fn serve(self, listener: TcpListener, upstream: SocketAddr) {
        loop {
            let (client, _) = conduit_cli::accept::accept(&listener).await;
            let link = self.clone();
            tokio::spawn(async move {
                let _ = link.carry(client, upstream).await;
            });
        }
    }

    async fn carry(self, client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
        match self.mode() {
            LinkMode::Reset => {
                client.set_zero_linger()?;
                return Ok(());
            }
            LinkMode::Blackhole => {
                // Read and drop until the peer gives up.
                let mut client = client;
                let mut sink = [0u8; 4096];
                while client.read(&mut sink).await? > 0 {}
                return Ok(());
            }
            _ => {}
        }
        let server = TcpStream::connect(upstream).await?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        let carried = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        let up = self
            .clone()
            .pump(client_read, server_write, Arc::clone(&carried));
        let down = self.pump(server_read, client_write, carried);
        // Either direction ending ends the connection.
        tokio::select! {
            _ = up => {}
            _ = down => {}
        }
        Ok(())
    }

    async fn pump(
        self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        carried: Arc<std::sync::atomic::AtomicU64>,
    ) -> std::io::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                to.shutdown().await?;
                return Ok(());
            }
            let total =
                carried.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed) + n as u64;
            match self.mode() {
                LinkMode::Pass => {}
                LinkMode::Latency { base_ms, jitter_ms } => {
                    let ms = base_ms + self.jitter(jitter_ms);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                LinkMode::Bandwidth { bytes_per_second } => {
                    let micros = n as u64 * 1_000_000 / bytes_per_second.max(1);
                    tokio::time::sleep(Duration::from_micros(micros)).await;
                }
                LinkMode::DropAfter { bytes } if total > bytes => return Ok(()),
                LinkMode::DropAfter { .. } => {}
                LinkMode::Reset => {
                    // Dropping both halves with unread data resets the connection.
                    return Ok(());
                }
                LinkMode::Blackhole => {
                    // Swallow everything from now on.
                    while from.read(&mut buf).await? > 0 {}
                    return Ok(());
                }
            }
            to.write_all(&buf[..n]).await?;
        }
    }
}

/// The run's report.
#[derive(Debug, Serialize)]
struct RealReport {
    seed: u64,
    duration_ms: u64,
    rate: u32,
    /// `loopback`, or the namespace of each host (`--netns`).
    network: String,
    processes: Vec<String>,
    faults: Vec<Scheduled>,
    faults_by_kind: BTreeMap<String, usize>,
    /// Per phase: chaos (faults strike and heal), settle, check (must all succeed).
    phases: Vec<PhaseReport>,
    requests: u64,
    /// The client proxy's outbound `request_total` after the run.
    proxy_counted: Option<u64>,
    violations: Vec<String>,
}

#[derive(Debug, Serialize)]
struct PhaseReport {
    phase: &'static str,
    requests: u64,
    statuses: BTreeMap<u16, u64>,
    /// Requests without an HTTP answer, by reason.
    unanswered: BTreeMap<String, u64>,
}

impl PhaseReport {
    fn new(phase: &'static str, report: &LoadReport) -> Self {
        let overall = report.overall();
        Self {
            phase,
            requests: overall.total(),
            statuses: overall.statuses.clone(),
            unanswered: overall
                .errors
                .iter()
                .map(|(reason, n)| (format!("{reason:?}"), *n))
                .collect(),
        }
    }
}

impl RealReport {
    fn render(&self) -> String {
        let mut out = format!(
            "chaos --real, seed {}: {} s at {} req/s, {} requests through the client proxy\n",
            self.seed,
            self.duration_ms / 1000,
            self.rate,
            self.requests
        );
        out.push_str(&format!("network: {}\n", self.network));
        out.push_str(&format!("processes: {}\n", self.processes.join(", ")));
        out.push_str("faults:\n");
        for s in &self.faults {
            out.push_str(&format!(
                "  {:>6} ms .. {:>6} ms  {:?}\n",
                s.at_ms, s.heal_ms, s.fault
            ));
        }
        out.push_str("phases:\n");
        for p in &self.phases {
            out.push_str(&format!(
                "  {:<7} {:>6} requests, statuses {:?}, unanswered {:?}\n",
                p.phase, p.requests, p.statuses, p.unanswered
            ));
        }
        out.push_str(&format!(
            "client proxy counted: {}\n",
            self.proxy_counted
                .map_or_else(|| "unknown".to_owned(), |n| n.to_string())
        ));
        if self.violations.is_empty() {
            out.push_str(
                "result: pass (every request answered, recovered after healing, counters agree)\n",
            );
        } else {
            out.push_str("result: FAIL\n");
            for v in &self.violations {
                out.push_str(&format!("  {v}\n"));
            }
        }
        out
    }
}

/// Runs `conduit chaos --real`. Returns whether every check held.
pub(crate) async fn run(options: RealOptions) -> anyhow::Result<bool> {
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let bins = Binaries::locate(options.bin_dir.as_deref())?;
    let hello = std::env::current_exe().context("locating this executable")?;
    let report = if options.netns {
        let netns = tokio::task::spawn_blocking(|| Netns::create(&HOSTS))
            .await
            .context("making the namespaces")??;
        // Dropped (every namespace deleted) however this ends.
        let netns = Arc::new(netns);
        on_client_host(options.clone(), bins, hello, netns).await?
    } else {
        let mut processes = Processes::new(options.out.clone());
        let run = run_in(&options, &bins, &hello, &mut processes, None);
        let report = tokio::select! {
            report = run => report?,
            _ = tokio::signal::ctrl_c() => {
                anyhow::bail!("interrupted; every process started was killed");
            }
        };
        drop(processes);
        report
    };
    let text = report.render();
    std::fs::write(
        options.out.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(options.out.join("report.txt"), &text)?;
    print!("{text}");
    println!("report: {}", options.out.join("report.json").display());
    Ok(report.violations.is_empty())
}

/// Runs the whole run on a thread inside the client's namespace (a network namespace is per
/// thread: its sockets, the load's and the checks', are the client host's), on a runtime of
/// its own. Ctrl-C here stops it; its processes are killed as its run is dropped, and the
/// namespaces go when the last holder of `netns` lets go, after the thread ends.
async fn on_client_host(
    options: RealOptions,
    bins: Binaries,
    hello: PathBuf,
    netns: Arc<Netns>,
) -> anyhow::Result<RealReport> {
    let (cancel, cancelled) = tokio::sync::oneshot::channel::<()>();
    let (done, finished) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("chaos-client-host".to_owned())
        .spawn(move || {
            let result = (|| {
                netns.enter("client")?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting the client host's runtime")?;
                runtime.block_on(async {
                    let mut processes = Processes::new(options.out.clone());
                    let result = tokio::select! {
                        report = run_in(&options, &bins, &hello, &mut processes, Some(&netns)) => report,
                        _ = cancelled => Err(anyhow::anyhow!(
                            "interrupted; every process started was killed and every namespace deleted"
                        )),
                    };
                    drop(processes);
                    result
                })
            })();
            let _ = done.send(result);
        })
        .context("starting the client host's thread")?;
    let result = tokio::select! {
        result = finished => result.unwrap_or_else(|_| Err(anyhow::anyhow!("the client host's thread stopped"))),
        _ = tokio::signal::ctrl_c() => {
            let _ = cancel.send(());
            Err(anyhow::anyhow!(
                "interrupted; every process started was killed and every namespace deleted"
            ))
        }
    };
    tokio::task::spawn_blocking(move || thread.join())
        .await
        .context("waiting for the client host's thread")?
        .map_err(|_| anyhow::anyhow!("the client host's thread panicked"))?;
    result
}

/// Where a run's processes go and how they reach each other: loopback with free ports, or a
/// namespace per host with fixed ports on each host's address.
struct Place<'a> {
    netns: Option<&'a Netns>,
}

impl Place<'_> {
    /// An address for `host` to listen on that the others reach (`port` in a namespace).
    fn addr(&self, host: &str, port: u16) -> anyhow::Result<SocketAddr> {
        match self.netns {
            Some(netns) => Ok(SocketAddr::from((netns.host(host)?.ip, port))),
            None => free_port(),
        }
    }

    /// An address only its own host reaches (an app behind its proxy).
    fn local(&self, port: u16) -> anyhow::Result<SocketAddr> {
        match self.netns {
            Some(_) => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
            None => free_port(),
        }
    }

    /// Starts `program` as process `name` on its host.
    fn spawn(
        &self,
        processes: &mut Processes,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        match self.netns {
            Some(netns) => {
                // `ip netns exec` enters the namespace and execs the program: the process id
                // is the program's own, for signals.
                let mut all = netns.exec_prefix(&host_of(name))?;
                all.push(program.display().to_string());
                all.extend_from_slice(args);
                processes.spawn_with_args(name, Path::new("ip"), &all, env)
            }
            None => processes.spawn_with_args(name, program, args, env),
        }
    }
}

async fn run_in(
    options: &RealOptions,
    bins: &Binaries,
    hello: &Path,
    processes: &mut Processes,
    netns: Option<&Netns>,
) -> anyhow::Result<RealReport> {
    let place = Place { netns };
    let mut names = Vec::new();
    // Apps and their proxies.
    let mut links = Vec::new();
    let mut admins = Vec::new();
    let mut endpoints = Vec::new();
    for i in 0..REPLICAS {
        let host = format!("replica-{i}");
        let app = place.local(8080)?;
        let inbound = place.addr(&host, 4143)?;
        let admin = place.addr(&host, 4191)?;
        place.spawn(
            processes,
            &format!("app-{i}"),
            hello,
            &["hello".to_owned(), "--listen".to_owned(), app.to_string()],
            &[],
        )?;
        names.push(format!("app-{i}"));
        let link_listener = TcpListener::bind("127.0.0.1:0").await?;
        endpoints.push(link_listener.local_addr()?);
        let link = FaultLink {
            mode: Arc::new(Mutex::new(LinkMode::Pass)),
            rng: Arc::new(Mutex::new(
                DetRng::new(options.seed).child(&format!("link-{i}")),
            )),
        };
        tokio::spawn(link.clone().serve(link_listener, inbound));
        links.push(link);
        admins.push((format!("proxy-{i}"), admin, inbound, app, host));
    }
    let mesh_path = options.out.join("mesh.yaml");
    let mut mesh = format!("services:\n  {SERVICE}:\n    endpoints:\n");
    for endpoint in &endpoints {
        mesh.push_str(&format!("      - addr: {endpoint}\n"));
    }
    std::fs::write(&mesh_path, mesh).context("writing the mesh file")?;
    let controller_grpc = place.addr("controller", 8086)?;
    let controller_admin = place.addr("controller", 9990)?;
    place.spawn(
        processes,
        "controller",
        &bins.controller,
        &[],
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
            ("CONDUIT_CONTROLLER_LOG", "warn".to_owned()),
        ],
    )?;
    names.push("controller".to_owned());
    let mut ready = vec![controller_admin];
    for (name, admin, inbound, app, host) in &admins {
        place.spawn(
            processes,
            name,
            &bins.proxy,
            &[],
            &[
                ("CONDUIT_PROXY_INBOUND_ADDR", inbound.to_string()),
                (
                    "CONDUIT_PROXY_OUTBOUND_ADDR",
                    place.addr(host, 4140)?.to_string(),
                ),
                ("CONDUIT_PROXY_ADMIN_ADDR", admin.to_string()),
                ("CONDUIT_PROXY_APP_ADDR", app.to_string()),
                ("CONDUIT_PROXY_DISCOVERY", controller_grpc.to_string()),
                ("CONDUIT_PROXY_WORKERS", "1".to_owned()),
                ("CONDUIT_PROXY_LOG", "warn".to_owned()),
            ],
        )?;
        names.push(name.clone());
        ready.push(*admin);
    }
    let outbound = place.addr("client", 4140)?;
    let client_admin = place.addr("client", 4191)?;
    place.spawn(
        processes,
        "proxy-client",
        &bins.proxy,
        &[],
        &[
            ("CONDUIT_PROXY_OUTBOUND_ADDR", outbound.to_string()),
            (
                "CONDUIT_PROXY_INBOUND_ADDR",
                place.addr("client", 4143)?.to_string(),
            ),
            ("CONDUIT_PROXY_ADMIN_ADDR", client_admin.to_string()),
            ("CONDUIT_PROXY_DISCOVERY", controller_grpc.to_string()),
            // A frozen or black-holed replica costs a request this long, then a 504.
            ("CONDUIT_PROXY_RESPONSE_TIMEOUT", "1s".to_owned()),
            ("CONDUIT_PROXY_WORKERS", "1".to_owned()),
            ("CONDUIT_PROXY_LOG", "warn".to_owned()),
        ],
    )?;
    names.push("proxy-client".to_owned());
    ready.push(client_admin);
    let wait = async {
        for admin in &ready {
            loop {
                processes.check_alive()?;
                if matches!(http_get(*admin, "/ready").await, Ok((200, _))) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the mesh was not ready within 30 s (logs in {})",
                options.out.display()
            )
        })??;

    let faults = schedule(options.seed, options.duration, netns.is_some());
    let total_ms = u64::try_from(options.duration.as_millis()).unwrap_or(20_000);
    let phases = [
        ("chaos", total_ms * 6 / 10),
        ("settle", total_ms * 2 / 10),
        ("check", total_ms - total_ms * 8 / 10),
    ];
    let load = async {
        let mut reports = Vec::new();
        for (phase, ms) in phases {
            let config = LoadConfig {
                rate: options.rate,
                duration: Duration::from_millis(ms),
                connections: 16,
                // Longer than any answer the client proxy owes (its response timeout, its
                // fail-fast and connect timeouts): a request still waiting is a hang.
                timeout: Duration::from_secs(15),
                targets: vec![Target {
                    authority: SERVICE.to_owned(),
                    path: "/".to_owned(),
                    method: http::Method::GET,
                }],
                arrivals: load::Arrivals::Constant,
                protocol: load::Protocol::Http1,
                spin_wait: false,
            };
            let report = load::run(TokioNet, outbound, config, Clock::new())
                .await
                .map_err(|err| anyhow::anyhow!("{err}"))?;
            reports.push(PhaseReport::new(phase, &report));
        }
        anyhow::Ok(reports)
    };
    let chaos = async {
        let clock = Clock::new();
        let start = clock.now();
        let mut events: Vec<(u64, bool, &Scheduled)> = faults
            .iter()
            .flat_map(|s| [(s.at_ms, true, s), (s.heal_ms, false, s)])
            .collect();
        events.sort_by_key(|(at, strike, _)| (*at, !*strike));
        // Faults the same process is under, so a heal does not undo another fault early.
        let mut frozen: BTreeMap<String, usize> = BTreeMap::new();
        for (at, strike, scheduled) in events {
            clock.sleep_until(start + Duration::from_millis(at)).await;
            apply(
                processes,
                &links,
                netns,
                &scheduled.fault,
                strike,
                &mut frozen,
            )
            .await?;
        }
        anyhow::Ok(())
    };
    let (phase_reports, ()) = tokio::try_join!(load, chaos)?;
    // The client proxy must have counted what was sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let proxy_counted = counted(client_admin).await.ok();

    let requests: u64 = phase_reports.iter().map(|p| p.requests).sum();
    let mut violations = Vec::new();
    for phase in &phase_reports {
        let unanswered: u64 = phase.unanswered.values().sum();
        if unanswered > 0 {
            violations.push(format!(
                "[answered] {unanswered} request(s) of the {} phase got no HTTP answer: {:?}",
                phase.phase, phase.unanswered
            ));
        }
    }
    if let Some(check) = phase_reports.iter().find(|p| p.phase == "check") {
        let failed: u64 = check.statuses.range(500..).map(|(_, n)| n).sum();
        if failed > 0 {
            violations.push(format!(
                "[recovery] {failed} of {} request(s) failed after every fault had healed: {:?}",
                check.requests, check.statuses
            ));
        }
    }
    match proxy_counted {
        Some(n) if n == requests => {}
        Some(n) => violations.push(format!(
            "[counters] the client proxy counted {n} requests, the client sent {requests}"
        )),
        None => violations.push("[counters] the client proxy's metrics could not be read".into()),
    }
    let mut faults_by_kind = BTreeMap::new();
    for s in &faults {
        *faults_by_kind.entry(s.fault.kind().to_owned()).or_insert(0) += 1;
    }
    Ok(RealReport {
        seed: options.seed,
        duration_ms: total_ms,
        rate: options.rate,
        network: netns.map_or_else(
            || "loopback".to_owned(),
            |netns| {
                HOSTS
                    .iter()
                    .filter_map(|h| netns.host(h).ok())
                    .map(|h| format!("{} {} ({})", h.name, h.ip, h.ns))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        processes: names,
        faults,
        faults_by_kind,
        phases: phase_reports,
        requests,
        proxy_counted,
        violations,
    })
}

/// Strikes (or heals) `fault`.
async fn apply(
    processes: &mut Processes,
    links: &[FaultLink],
    netns: Option<&Netns>,
    fault: &RealFault,
    strike: bool,
    frozen: &mut BTreeMap<String, usize>,
) -> anyhow::Result<()> {
    match fault {
        RealFault::Kill(name) => {
            if strike {
                processes.kill(name).await?;
            } else {
                processes.restart(name).await?;
            }
        }
        RealFault::Freeze(name) => {
            let count = frozen.entry(name.clone()).or_insert(0);
            let signal = if strike {
                *count += 1;
                rustix::process::Signal::STOP
            } else {
                *count = count.saturating_sub(1);
                if *count > 0 {
                    return Ok(());
                }
                rustix::process::Signal::CONT
            };
            if let Some(pid) = processes
                .pid(name)
                .and_then(|pid| i32::try_from(pid).ok())
                .and_then(rustix::process::Pid::from_raw)
            {
                // A process that died meanwhile has nothing to freeze.
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
        RealFault::Link(i, mode) => {
            if let Some(link) = links.get(*i) {
                link.set(if strike { *mode } else { LinkMode::Pass });
            }
        }
        RealFault::Partition(a, b) => {
            let netns = netns.context("a partition needs --netns")?;
            netns.drop_between(strike, a, b).await?;
            netns.drop_between(strike, b, a).await?;
        }
        RealFault::OneWay(a, b) => {
            netns
                .context("a partition needs --netns")?
                .drop_between(strike, a, b)
                .await?;
        }
        RealFault::Loss(host, percent) => {
            netns
                .context("packet loss needs --netns")?
                .loss(strike, host, *percent)
                .await?;
        }
        RealFault::TcpReset(a, b) => {
            netns
                .context("resets between hosts need --netns")?
                .reset_between(strike, a, b)
                .await?;
        }
    }
    Ok(())
}

/// The client proxy's outbound `request_total`.
async fn counted(admin: SocketAddr) -> anyhow::Result<u64> {
    let (status, text) = http_get(admin, "/metrics").await?;
    anyhow::ensure!(status == 200, "metrics answered {status}");
    let samples = conduit_proto::prom::parse(&text)?;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "counters are small non-negative integers"
    )]
    let total = samples
        .iter()
        .filter(|s| s.name == "request_total" && s.label("direction") == Some("outbound"))
        .map(|s| s.value as u64)
        .sum();
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_heals_before_the_settle_phase() {
        for seed in 0..100 {
            let duration = Duration::from_secs(20);
            let faults = schedule(seed, duration, seed % 2 == 0);
            assert!((4..=8).contains(&faults.len()));
            for s in &faults {
                assert!(s.at_ms < s.heal_ms && s.heal_ms <= 12_000, "{s:?}");
            }
            assert_eq!(
                format!("{faults:?}"),
                format!("{:?}", schedule(seed, duration, seed % 2 == 0))
            );
        }
    }
}
