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
//!   drops accordingly.
//! - `store.demo`: two healthy replicas.
//!
//! Every process the demo starts is stopped when it ends (Ctrl-C, `--duration`, or an error):
//! children are killed on drop, and their logs are kept in the demo's work directory.

use std::collections::{BTreeMap, VecDeque};
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
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
}

/// The demo's final report (`--output json`).
#[derive(Debug, Serialize)]
pub struct DemoSummary {
    /// Seconds of traffic the figures cover.
    pub seconds: f64,
    /// One entry per service.
    pub services: Vec<ServiceSummary>,
}

/// One service in the final report.
#[derive(Debug, Serialize)]
pub struct ServiceSummary {
    /// The service name.
    pub name: String,
    /// Client-side figures (what callers saw through their proxy).
    #[serde(flatten)]
    pub figures: Figures,
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

fn free_port() -> anyhow::Result<SocketAddr> {
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
    let plan: [(&str, &[(u64, u64)]); 3] = [
        // (latency ms, failures per mille) per replica
        ("web.demo", &[(5, 0), (5, 0), (50, 0)]),
        ("api.demo", &[(10, 0), (10, 300)]),
        ("store.demo", &[(2, 0), (2, 0)]),
    ];
    let mut seed = 0;
    plan.iter()
        .map(|(name, replicas)| {
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
                            service: (*name).to_owned(),
                            replica: i,
                            latency: Duration::from_millis(latency_ms),
                            failures_per_mille,
                            seed,
                        },
                        role,
                        app: free_port()?,
                        inbound: free_port()?,
                        outbound: free_port()?,
                        admin: free_port()?,
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(DemoService { name, replicas })
        })
        .collect()
}

fn mesh_file(services: &[DemoService]) -> String {
    let mut yaml = String::from("# Written by `conduit demo`.\nservices:\n");
    for service in services {
        yaml.push_str(&format!(
            "  {}:\n    port: 80\n    endpoints:\n",
            service.name
        ));
        for replica in &service.replicas {
            yaml.push_str(&format!(
                "      - addr: {}\n        admin: {}\n        labels: {{ replica: \"{}\", role: {} }}\n",
                replica.inbound, replica.admin, replica.behaviour.replica, replica.role
            ));
        }
    }
    yaml
}

struct Binaries {
    proxy: PathBuf,
    controller: PathBuf,
}

impl Binaries {
    fn locate(bin_dir: Option<&Path>) -> anyhow::Result<Self> {
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
    fn build(release: bool) -> anyhow::Result<()> {
        let Some(cargo) = std::env::var_os("CARGO") else {
            return Ok(());
        };
        tracing::info!("building conduit-proxy and conduit-controller");
        let mut command = std::process::Command::new(cargo);
        command.args(["build", "-p", "conduit-proxy", "-p", "conduit-controller"]);
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

/// The processes the demo started; each is killed when this is dropped.
struct Processes {
    children: Vec<(String, Child)>,
    logs: PathBuf,
}

impl Processes {
    fn spawn(&mut self, name: &str, program: &Path, env: &[(&str, String)]) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))
            .with_context(|| format!("creating the log file for {name}"))?;
        let mut command = Command::new(program);
        command
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Fails if any child has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{name} exited ({status}); see {}",
                    self.logs.join(format!("{name}.log")).display()
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
    let mut replicas = BTreeMap::new();
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
            }
        }
    }
    Ok(Scrape {
        at,
        services: by_service,
        replicas,
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
        rows.push(Row {
            name: service.name.to_owned(),
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
            replicas,
        });
    }
    (rows, summaries)
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
    std::fs::write(&mesh_path, mesh_file(&services)).context("writing the demo mesh file")?;

    // The apps run in this process; the controller and proxies are processes of their own.
    let mut apps = tokio::task::JoinSet::new();
    for replica in services.iter().flat_map(|s| &s.replicas) {
        let listener = app::bind(replica.app)
            .await
            .with_context(|| format!("binding demo app on {}", replica.app))?;
        apps.spawn(app::serve(listener, replica.behaviour.clone()));
    }

    let mut processes = Processes {
        children: Vec::new(),
        logs: work.to_path_buf(),
    };
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
            processes.spawn(
                &name,
                &bins.proxy,
                &[
                    ("CONDUIT_PROXY_INBOUND_ADDR", replica.inbound.to_string()),
                    ("CONDUIT_PROXY_OUTBOUND_ADDR", replica.outbound.to_string()),
                    ("CONDUIT_PROXY_ADMIN_ADDR", replica.admin.to_string()),
                    ("CONDUIT_PROXY_APP_ADDR", replica.app.to_string()),
                    ("CONDUIT_PROXY_DISCOVERY", discovery.clone()),
                    ("CONDUIT_PROXY_LOG", "warn".to_owned()),
                ],
            )?;
            admins.push((name, replica.admin));
        }
    }
    let client_outbound = free_port()?;
    let client_admin = free_port()?;
    processes.spawn(
        "proxy-client",
        &bins.proxy,
        &[
            ("CONDUIT_PROXY_OUTBOUND_ADDR", client_outbound.to_string()),
            ("CONDUIT_PROXY_INBOUND_ADDR", free_port()?.to_string()),
            ("CONDUIT_PROXY_ADMIN_ADDR", client_admin.to_string()),
            ("CONDUIT_PROXY_DISCOVERY", discovery.clone()),
            ("CONDUIT_PROXY_LOG", "warn".to_owned()),
        ],
    )?;
    admins.push(("proxy-client".to_owned(), client_admin));
    wait_ready(&mut processes, &admins).await?;

    // Open-loop load through the client proxy, one target per service in turn.
    let service_count = u32::try_from(services.len()).unwrap_or(u32::MAX);
    let load_config = LoadConfig {
        rate: options.rate.saturating_mul(service_count),
        duration: options.duration.unwrap_or(Duration::from_secs(24 * 3600)),
        connections: 32,
        timeout: Duration::from_secs(10),
        targets: services
            .iter()
            .map(|s| Target {
                authority: s.name.to_owned(),
                path: "/".to_owned(),
            })
            .collect(),
        record_samples: false,
        spin_wait: false,
    };
    let clock = Clock::new();
    let load = tokio::spawn(load::run(TokioNet, client_outbound, load_config, clock));

    let first = scrape(clock, client_admin, &services).await?;
    let mut window: VecDeque<Scrape> = VecDeque::from([first.clone()]);
    let end = options.duration.map(|d| first.at + d);
    let interactive = !options.json && std::io::stdout().is_terminal();
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
            let mut screen = String::new();
            if interactive {
                screen.push_str("\x1b[2J\x1b[H");
            }
            screen.push_str(&format!(
                "Conduit demo: {} services, {} replicas, each behind its own proxy; controller on {}.\nFigures over the last {}s; {}s elapsed. Ctrl-C stops the demo.\nIn another terminal: conduit stat --controller {} / conduit check --controller {} --controller-admin {}\n\n",
                services.len(),
                services.iter().map(|s| s.replicas.len()).sum::<usize>(),
                controller_grpc,
                window.len().saturating_sub(1),
                elapsed,
                controller_grpc,
                controller_grpc,
                controller_admin,
            ));
            screen.push_str(&stat::render(&table));
            print!("{screen}");
            if !interactive {
                println!();
            }
        }
        if end.is_some_and(|end| latest.at >= end) {
            break;
        }
    }
    load.abort();
    let last = scrape(clock, client_admin, &services).await?;
    let (table, summaries) = rows(&services, &first, &last);
    let summary = DemoSummary {
        seconds: last.at.saturating_duration_since(first.at).as_secs_f64(),
        services: summaries,
    };
    if options.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "\nWhole run ({:.0}s):\n{}",
            summary.seconds,
            stat::render(&table)
        );
    }
    drop(processes);
    apps.abort_all();
    Ok(())
}
