//! The `conduit` command: run the local demo, read a mesh's top-line and per-route figures,
//! check its health, and drive load.

#![allow(clippy::print_stdout, reason = "a command-line tool prints its output")]

use conduit_cli::demo;

mod chaos;
mod chaos_real;
mod netns;
mod sim;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

/// Conduit: a service mesh whose every behaviour is proven in deterministic simulation.
#[derive(Debug, Parser)]
#[command(name = "conduit", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole mesh on loopback: a controller, three services with two or three replicas
    /// each (every replica behind its own proxy; one slow, one failing a share of its
    /// requests) and a load generator, with a live table per service until Ctrl-C.
    Demo {
        /// Stop after this long (e.g. `30s`, `2m`); run until Ctrl-C when absent.
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// `table` (live, refreshed every second) or `json` (one summary at the end).
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Requests per second sent to each service.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        rate: u32,
        /// Directory holding `conduit-proxy` and `conduit-controller` (default: next to this
        /// executable, built on demand under `cargo run`).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Print success rate, requests per second and latency percentiles per workload, read
    /// from the proxies' metrics through the controller.
    Stat {
        /// One workload; all when absent.
        workload: Option<String>,
        /// The controller's gRPC address.
        #[arg(long, default_value = "127.0.0.1:8086", env = "CONDUIT_CONTROLLER")]
        controller: SocketAddr,
        /// The window the figures cover.
        #[arg(long, value_parser = parse_duration, default_value = "2s")]
        window: Duration,
        /// `table` or `json`.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print success rate, requests per second and latency percentiles per route of one
    /// service's profile (and `default`, for requests no route matched), read from the
    /// service's proxies through the controller.
    Routes {
        /// The service (e.g. `api.demo`).
        service: String,
        /// The controller's gRPC address.
        #[arg(long, default_value = "127.0.0.1:8086", env = "CONDUIT_CONTROLLER")]
        controller: SocketAddr,
        /// The window the figures cover.
        #[arg(long, value_parser = parse_duration, default_value = "2s")]
        window: Duration,
        /// `table` or `json`.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Check, one by one, that the controller and every proxy it knows are reachable and
    /// ready; exits non-zero when any check fails.
    Check {
        /// The controller's gRPC address.
        #[arg(long, default_value = "127.0.0.1:8086", env = "CONDUIT_CONTROLLER")]
        controller: SocketAddr,
        /// The controller's admin address.
        #[arg(
            long,
            default_value = "127.0.0.1:9996",
            env = "CONDUIT_CONTROLLER_ADMIN"
        )]
        controller_admin: SocketAddr,
        /// Check the installation in a Kubernetes cluster instead (the API server, the CRDs,
        /// the control plane, the webhook and its certificate, the meshed pods), through
        /// KUBECONFIG or --kubeconfig.
        #[arg(long)]
        kubernetes: bool,
        /// With --kubernetes: the control plane's namespace.
        #[arg(long, default_value = "conduit")]
        namespace: String,
        /// With --kubernetes: a kubeconfig file instead of the environment's.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Workload identity: bootstrap tokens for the controller's certificate authority.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Deterministic simulation: `--list` the scenarios, replay `--scenario NAME --seed N`,
    /// or sweep `--seeds A..B` (each seed in its own process).
    Sim(sim::SimArgs),
    /// Swarm chaos in the simulation: every seed draws a topology and a mix of faults; sweep
    /// `--seeds A..B` (failures shrunk, a report written), run `--seed N`, or `--replay FILE`.
    Chaos(chaos::ChaosArgs),
    /// Serve `200 hello world` on one thread: the backend for proxy benchmarks. HTTP/1.1 and
    /// h2 with prior knowledge (h2c) on the same port.
    #[command(hide = true)]
    Hello {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Find the red line: the highest request rate a service holds within its objectives
    /// (open-loop steps of rising rate, bisection near the knee, the best rate confirmed by a
    /// repeat). `--target URL` searches one service; `--compare` starts a backend, a
    /// conduit-proxy and (where installed) nginx and haproxy on loopback and searches each,
    /// interleaved. Writes a table, redline.json and redline.svg.
    Redline {
        /// The service to search, `http://host:port/path`.
        #[arg(long, conflicts_with = "compare")]
        target: Option<String>,
        /// Start a backend, conduit-proxy, nginx and haproxy and compare their red lines.
        #[arg(long)]
        compare: bool,
        /// The objectives, e.g. `p99<50ms,success>99.9%`.
        #[arg(long, default_value = "p99<100ms,success>99.9%")]
        slo: conduit_scenarios::redline::Slo,
        /// The first rate tried (requests/s).
        #[arg(long, default_value_t = 500)]
        start: u32,
        /// The highest rate tried.
        #[arg(long, default_value_t = 200_000)]
        max: u32,
        /// How long each step sends for.
        #[arg(long, value_parser = parse_duration, default_value = "5s")]
        step: Duration,
        /// The most steps per target.
        #[arg(long, default_value_t = 20)]
        max_steps: usize,
        /// Bisection stops when the bracket is within this fraction of the rate.
        #[arg(long, default_value_t = 0.05)]
        precision: f64,
        /// Keep-alive connections (multiplexed ones with --h2 or --grpc).
        #[arg(long, default_value_t = 50)]
        connections: usize,
        /// Per-request timeout (a request past it fails).
        #[arg(long, value_parser = parse_duration, default_value = "2s")]
        timeout: Duration,
        /// Speak HTTP/2 with prior knowledge (h2c).
        #[arg(long, conflicts_with = "grpc")]
        h2: bool,
        /// Send unary gRPC calls (over h2c) to the target's path, e.g.
        /// `http://host:port/pkg.Service/Method`; a call succeeds only with grpc-status 0.
        #[arg(long)]
        grpc: bool,
        /// Poisson arrivals with this seed instead of evenly spaced ones.
        #[arg(long)]
        poisson: Option<u64>,
        /// The rate of the probe step that measures the latency each target adds (0: none).
        #[arg(long, default_value_t = 1000)]
        probe_rate: u32,
        /// Where the report, the plot and the started processes' logs go.
        #[arg(long, default_value = "redline")]
        out: PathBuf,
        /// Directory holding `conduit-proxy` (default: next to this executable).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Search in the deterministic simulation instead: a service of --replicas replicas,
        /// each serving --concurrency requests at once in --service-time, behind the real
        /// client proxy (the same seed gives the same red line).
        #[arg(long, conflicts_with_all = ["target", "compare"])]
        sim: bool,
        /// Simulated replicas.
        #[arg(long, default_value_t = 3, requires = "sim")]
        replicas: usize,
        /// Requests a simulated replica serves at once.
        #[arg(long, default_value_t = 4, requires = "sim")]
        concurrency: usize,
        /// A simulated request's service time.
        #[arg(long, value_parser = parse_duration, default_value = "10ms", requires = "sim")]
        service_time: Duration,
        /// One simulated replica's service time instead (a slow replica).
        #[arg(long, value_parser = parse_duration, requires = "sim")]
        slow_replica: Option<Duration>,
        /// Search once per balancer policy (peak_ewma, least_loaded, round_robin).
        #[arg(long, requires = "sim")]
        policies: bool,
        /// The simulation's seed.
        #[arg(long, default_value_t = 1, requires = "sim")]
        seed: u64,
    },
    /// Add the proxy to the workloads of a Kubernetes YAML file (`-`: stdin) and print the
    /// result, for `kubectl apply -f -`: the `conduit-init` init container that redirects the
    /// pod's TCP through the proxy, and the `conduit-proxy` container. Pods that opt out
    /// (`conduit.io/inject: disabled`), use the host's network, already have a proxy, or
    /// declare no port (and no `conduit.io/app-port` annotation) are left alone; what happened
    /// to each workload goes to stderr.
    Inject {
        /// The YAML file, or `-` for stdin.
        file: PathBuf,
        #[command(flatten)]
        inject: InjectArgs,
    },
    /// Print the Kubernetes manifests that install Conduit (the Helm chart charts/conduit,
    /// rendered, with a new certificate authority and webhook certificate): apply them with
    /// `conduit install | kubectl apply -f -`.
    Install {
        /// The control plane's namespace.
        #[arg(long, default_value = "conduit")]
        namespace: String,
        /// High availability: 3 controller replicas on distinct nodes, a PodDisruptionBudget,
        /// 2 webhook replicas (the chart's values-ha.yaml).
        #[arg(long)]
        ha: bool,
        /// What the API server does with a pod when the webhook cannot be reached: `Fail`
        /// (refuse it) or `Ignore` (admit it without the proxy).
        #[arg(long, default_value = "Fail")]
        webhook_failure_policy: String,
        /// The cluster's DNS domain.
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
        /// The PodDisruptionBudget's API version (`policy/v1beta1` for Kubernetes 1.20).
        #[arg(long, default_value = "policy/v1")]
        pdb_api_version: String,
        /// Print only the CustomResourceDefinitions.
        #[arg(long)]
        crds: bool,
    },
    /// Serve the mutating admission webhook over HTTPS: every pod the API server admits gets
    /// what `conduit inject` would add, as a JSON Patch (`POST` any path; `GET /ready`).
    InjectWebhook {
        /// Where to listen.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: SocketAddr,
        /// The serving certificate chain (PEM), for the webhook's service name.
        #[arg(long)]
        cert: PathBuf,
        /// Its private key (PEM).
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        inject: InjectArgs,
    },
    /// Send open-loop load (constant arrival rate, latency from the intended send time) to an
    /// HTTP/1.1 address (h2c with `--h2`) and print what came back.
    Load {
        /// Where to send: usually a proxy's outbound port.
        addr: SocketAddr,
        /// The `Host` header (which service).
        #[arg(long)]
        authority: String,
        /// Request path.
        #[arg(long, default_value = "/")]
        path: String,
        /// Requests per second.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// How long to send for.
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        duration: Duration,
        /// Keep-alive connections.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Per-request timeout, from the intended send time.
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        timeout: Duration,
        /// Speak HTTP/2 with prior knowledge (h2c): requests are multiplexed over the
        /// `--connections` connections (in turn) instead of one at a time on each.
        #[arg(long, conflicts_with = "grpc")]
        h2: bool,
        /// Send unary gRPC calls with an empty message (over h2c) to `--path`
        /// (`/pkg.Service/Method`); a call succeeds only with grpc-status 0.
        #[arg(long)]
        grpc: bool,
        /// `table` or `json`.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// What `conduit inject` and the webhook add, and where the proxies connect.
#[derive(Debug, clap::Args)]
struct InjectArgs {
    /// The controller's Destination API the proxies use, `HOST:PORT`.
    #[arg(
        long,
        default_value = "conduit-controller.conduit.svc.cluster.local:8086"
    )]
    controller: String,
    /// The proxy's image (default: this version's).
    #[arg(long)]
    proxy_image: Option<String>,
    /// The init container's image (default: this version's).
    #[arg(long)]
    init_image: Option<String>,
    /// Inbound ports of the pod that TCP reaches directly (besides the admin port 4191).
    #[arg(long, value_delimiter = ',')]
    skip_inbound_ports: Vec<u16>,
    /// Destination ports the pod's apps reach directly, past the proxy.
    #[arg(long, value_delimiter = ',')]
    skip_outbound_ports: Vec<u16>,
    /// The mesh's trust anchors (PEM file; in a cluster, the ConfigMap
    /// `conduit-identity-trust-anchors`, key `ca.crt`): with them every injected proxy proves
    /// its pod's ServiceAccount identity and speaks mTLS to other meshed pods. Without them
    /// the proxies run without identity. The webhook re-reads the file for every pod, so a
    /// rotated bundle reaches new pods.
    #[arg(long)]
    identity_trust_anchors: Option<PathBuf>,
    /// The cluster's DNS domain (the suffix of every identity).
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
}

impl InjectArgs {
    fn options(self) -> conduit_cli::inject::InjectOptions {
        let mut options =
            conduit_cli::inject::InjectOptions::for_version(env!("CARGO_PKG_VERSION"));
        options.controller = self.controller;
        if let Some(image) = self.proxy_image {
            options.proxy_image = image;
        }
        if let Some(image) = self.init_image {
            options.init_image = image;
        }
        options.skip_inbound_ports = self.skip_inbound_ports;
        options.skip_outbound_ports = self.skip_outbound_ports;
        options
    }

    /// The options with the trust anchors read from their file now (when one is given).
    fn anchors(&self) -> Option<conduit_cli::inject::Anchors> {
        self.identity_trust_anchors
            .clone()
            .map(|file| conduit_cli::inject::Anchors {
                file,
                cluster_domain: self.cluster_domain.clone(),
            })
    }
}

#[derive(Debug, Subcommand)]
enum IdentityCommand {
    /// Print the bootstrap token for the workload identity NAME, made with the token key in
    /// the controller's identity directory (a controller creates it on first start). Whoever
    /// holds the token can be NAME: hand it to that workload as a secret.
    Token {
        /// The identity, a DNS-like name (e.g. `web.default.identity.conduit.local`).
        name: String,
        /// The controller's identity directory.
        #[arg(long, env = "CONDUIT_CONTROLLER_IDENTITY_DIR")]
        identity_dir: PathBuf,
    },
    /// Sign a new issuer with the bootstrapped anchor's key in the identity directory and
    /// write it there (key first, then certificate, each atomically). A running controller
    /// loads it within its issuer poll interval and signs every new leaf with it; leaves
    /// already issued stay valid, as they chain to the same anchor.
    RotateIssuer {
        /// The controller's identity directory.
        #[arg(long, env = "CONDUIT_CONTROLLER_IDENTITY_DIR")]
        identity_dir: PathBuf,
    },
    /// Step 1 of a trust-anchor rotation: make a new anchor in the identity directory, add it
    /// to the trust-anchor bundle (the controller and proxies trust both from their next poll)
    /// and sign the next issuer with it. Then, once every proxy has the bundle, run
    /// `rotate-issuer`; once every leaf has renewed, `retire-anchors`.
    AddAnchor {
        /// The controller's identity directory.
        #[arg(long, env = "CONDUIT_CONTROLLER_IDENTITY_DIR")]
        identity_dir: PathBuf,
    },
    /// The last step of a trust-anchor rotation: keep in the bundle only the anchor the issuer
    /// chains to (refused while the issuer still chains to an older one).
    RetireAnchors {
        /// The controller's identity directory.
        #[arg(long, env = "CONDUIT_CONTROLLER_IDENTITY_DIR")]
        identity_dir: PathBuf,
    },
    /// Show a proxy's identity and its certificate's dates, read from its admin server.
    Show {
        /// The proxy's admin address (`/metrics`).
        admin: SocketAddr,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Parses `500ms`, `10s`, `2m` or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |i| text.split_at(i));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 500ms, 10s or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "`{text}`: unknown unit `{unit}` (use ms, s, m or h)"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Colour only for a person at a terminal, and never when NO_COLOR is set (no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CONDUIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    // `conduit load` (and `conduit redline`, which drives it) runs on one thread so its pacing spin and its connections share the core
    // cooperatively (with two threads on one pinned core the OS would time-slice them and add
    // its own jitter to the measurement); `conduit hello` is a one-thread backend like the
    // perf baselines' (shared/reference/perf.md §3); everything else gets two workers.
    let runtime = if matches!(
        cli.command,
        Command::Load { .. } | Command::Hello { .. } | Command::Redline { .. }
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("conduit: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo {
                duration,
                output,
                rate,
                bin_dir,
            } => {
                demo::run(demo::DemoOptions {
                    duration,
                    json: output == Output::Json,
                    rate,
                    bin_dir,
                })
                .await
            }
            Command::Hello { listen } => {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|error| anyhow::anyhow!("binding {listen}: {error}"))?;
                conduit_cli::app::serve_hello(listener).await;
                Ok(())
            }
            Command::Stat {
                workload,
                controller,
                window,
                output,
            } => {
                conduit_cli::control::stat(controller, workload, window, output == Output::Json)
                    .await
            }
            Command::Routes {
                service,
                controller,
                window,
                output,
            } => {
                conduit_cli::control::routes(controller, &service, window, output == Output::Json)
                    .await
            }
            Command::Check {
                controller,
                controller_admin,
                kubernetes,
                namespace,
                kubeconfig,
            } => {
                let checks = if kubernetes {
                    let client =
                        conduit_controller::discovery::kubernetes::client(kubeconfig.as_deref())
                            .await?;
                    conduit_cli::kube_check::checks(&client, &namespace).await
                } else {
                    conduit_cli::control::checks(controller, controller_admin).await
                };
                let (text, passed) = conduit_cli::control::render_checks(&checks);
                print!("{text}");
                if passed {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("check failed"))
                }
            }
            Command::Load {
                addr,
                authority,
                path,
                rate,
                duration,
                connections,
                timeout,
                h2,
                grpc,
                output,
            } => {
                let config = conduit_scenarios::load::LoadConfig {
                    rate,
                    duration,
                    connections,
                    timeout,
                    targets: vec![conduit_scenarios::load::Target {
                        authority,
                        path,
                        method: http::Method::GET,
                    }],
                    arrivals: conduit_scenarios::load::Arrivals::Constant,
                    protocol: protocol(h2, grpc),
                    spin_wait: true,
                };
                run_load(addr, config, output == Output::Json).await
            }
            Command::Redline {
                target,
                compare,
                slo,
                start,
                max,
                step,
                max_steps,
                precision,
                connections,
                timeout,
                h2,
                grpc,
                poisson,
                probe_rate,
                out,
                bin_dir,
                sim,
                replicas,
                concurrency,
                service_time,
                slow_replica,
                policies,
                seed,
            } => {
                let sim = sim.then_some(conduit_cli::redline::SimService {
                    replicas,
                    concurrency,
                    service_time,
                    slow: slow_replica,
                    policies,
                    seed,
                });
                let options = conduit_cli::redline::RedlineOptions {
                    target,
                    compare,
                    slo,
                    search: conduit_scenarios::redline::SearchConfig {
                        start,
                        max,
                        max_steps,
                        precision,
                        ..conduit_scenarios::redline::SearchConfig::default()
                    },
                    step,
                    connections,
                    timeout,
                    protocol: protocol(h2, grpc),
                    poisson,
                    probe_rate,
                    out,
                    bin_dir,
                    sim,
                };
                conduit_cli::redline::run(options).await
            }
            Command::Identity(IdentityCommand::Token { name, identity_dir }) => {
                let token = conduit_controller::identity::issue_token(&identity_dir, &name)?;
                println!("{token}");
                Ok(())
            }
            Command::Identity(IdentityCommand::RotateIssuer { identity_dir }) => {
                let clock = conduit_controller::identity::system_wall_clock();
                let not_after = conduit_controller::identity::rotate_issuer(&identity_dir, &clock)?;
                println!(
                    "wrote a new issuer to {} (valid until {} s after the Unix epoch); a \
                     running controller signs with it from its next poll",
                    identity_dir.display(),
                    not_after.as_secs()
                );
                Ok(())
            }
            Command::Identity(IdentityCommand::AddAnchor { identity_dir }) => {
                let clock = conduit_controller::identity::system_wall_clock();
                let not_after = conduit_controller::identity::add_anchor(&identity_dir, &clock)?;
                println!(
                    "added a new trust anchor (valid until {} s after the Unix epoch) to {}; \
                     once every proxy loaded the bundle (within 5 s of seeing it), run \
                     `conduit identity rotate-issuer`",
                    not_after.as_secs(),
                    identity_dir
                        .join(conduit_controller::identity::TRUST_ANCHORS_FILE)
                        .display()
                );
                Ok(())
            }
            Command::Identity(IdentityCommand::RetireAnchors { identity_dir }) => {
                let clock = conduit_controller::identity::system_wall_clock();
                let removed = conduit_controller::identity::retire_anchors(&identity_dir, &clock)?;
                println!("removed {removed} old trust anchor(s) from the bundle");
                Ok(())
            }
            Command::Identity(IdentityCommand::Show { admin }) => {
                let shown = conduit_cli::control::identity_show(admin).await?;
                print!("{shown}");
                Ok(())
            }
            Command::Install {
                namespace,
                ha,
                webhook_failure_policy,
                cluster_domain,
                pdb_api_version,
                crds,
            } => {
                if crds {
                    print!("{}", conduit_controller::crd::crds_yaml()?);
                    return Ok(());
                }
                let options = conduit_cli::install::InstallOptions {
                    namespace,
                    ha,
                    webhook_failure_policy,
                    cluster_domain,
                    pdb_api_version,
                };
                let pki = conduit_cli::install::generate_pki(
                    &options.namespace,
                    &options.cluster_domain,
                )?;
                print!("{}", conduit_cli::install::install(&options, &pki)?);
                Ok(())
            }
            Command::InjectWebhook {
                listen,
                cert,
                key,
                inject,
            } => {
                let anchors = inject.anchors();
                conduit_cli::webhook::run(listen, &cert, &key, inject.options(), anchors).await
            }
            Command::Inject { file, inject } => {
                let input = if file.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin()).context("reading stdin")?
                } else {
                    std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?
                };
                let anchors = inject.anchors();
                let mut options = inject.options();
                match anchors {
                    Some(anchors) => options.identity = Some(anchors.read()?),
                    None => eprintln!(
                        "no --identity-trust-anchors: the injected proxies run without identity \
                         (plaintext between pods); pass the mesh's anchors, e.g. from \
                         `kubectl -n conduit get configmap conduit-identity-trust-anchors -o \
                         jsonpath='{{.data.ca\\.crt}}'`"
                    ),
                }
                let (out, reports) = conduit_cli::inject::inject_yaml(&input, &options)?;
                print!("{out}");
                for report in reports {
                    match report.outcome {
                        conduit_cli::inject::Outcome::Injected => {
                            eprintln!("{}: injected", report.workload);
                        }
                        conduit_cli::inject::Outcome::Skipped(why) => {
                            eprintln!("{}: skipped ({why})", report.workload);
                        }
                    }
                }
                Ok(())
            }
            Command::Sim(args) => sim::run(args),
            Command::Chaos(args) => chaos::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("conduit: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The protocol the `--h2` and `--grpc` flags choose.
fn protocol(h2: bool, grpc: bool) -> conduit_scenarios::load::Protocol {
    use conduit_scenarios::load::Protocol;
    match (h2, grpc) {
        (_, true) => Protocol::Grpc,
        (true, false) => Protocol::H2,
        (false, false) => Protocol::Http1,
    }
}

async fn run_load(
    addr: SocketAddr,
    config: conduit_scenarios::load::LoadConfig,
    json: bool,
) -> anyhow::Result<()> {
    let report = conduit_scenarios::load::run(
        conduit_proxy::TokioNet,
        addr,
        config,
        conduit_proxy::clock::Clock::new(),
    )
    .await?;
    let overall = report.overall();
    if json {
        let us = |q| report.quantile(q).map(|d| d.as_secs_f64() * 1e6);
        let summary = serde_json::json!({
            "scheduled": report.scheduled,
            "ended": overall.total(),
            "elapsed_s": report.elapsed.as_secs_f64(),
            "statuses": overall.statuses,
            "errors": overall.errors.iter().map(|(e, n)| (e.as_str(), n)).collect::<std::collections::BTreeMap<_, _>>(),
            "p50_us": us(0.5),
            "p90_us": us(0.9),
            "p99_us": us(0.99),
            "p999_us": us(0.999),
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let ms = |q| {
        report.quantile(q).map_or_else(
            || "-".to_owned(),
            |d| format!("{:.3}ms", d.as_secs_f64() * 1000.0),
        )
    };
    println!(
        "requests   {} scheduled, {} ended in {:.1}s",
        report.scheduled,
        overall.total(),
        report.elapsed.as_secs_f64()
    );
    println!("statuses   {:?}", overall.statuses);
    println!(
        "errors     {:?}",
        overall
            .errors
            .iter()
            .map(|(e, n)| (e.as_str(), n))
            .collect::<Vec<_>>()
    );
    println!(
        "latency    p50 {}  p90 {}  p99 {}  p99.9 {}  (from intended send time)",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
