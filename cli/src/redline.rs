//! `conduit redline`: the highest rate a service holds within its objectives, found by the
//! red-line search ([`conduit_scenarios::redline`]) over real sockets.
//!
//! With `--target URL` it searches that one service. With `--compare` (and no target) it
//! starts its own backend (`conduit hello`), a `conduit-proxy` in front of it and, where they
//! are installed, nginx and haproxy as peer proxies (one worker each, upstream keep-alive),
//! and searches the backend directly and through each proxy, one step per target in turn, so
//! every target sees the same machine conditions. Before searching, every target runs one
//! step at the probe rate (1,000 requests/s by default) for the latency each proxy adds.
//!
//! Every step is an open-loop run of the load generator at one rate for a bounded time
//! (latency from each request's intended send time, so queueing is never hidden), each search
//! is bounded by its step budget, and every process started is killed when the command ends,
//! also on Ctrl-C. Output: one line per step as it finishes, a summary table, and
//! `redline.json` and `redline.svg` (p50 and p99 against offered rate, red lines marked) in
//! the output directory, rewritten after every round so an interrupted run leaves a report.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use conduit_proxy::TokioNet;
use conduit_proxy::clock::Clock;
use conduit_scenarios::load::{self, Arrivals, LoadConfig, Protocol, Target};
use conduit_scenarios::plot::{self, Series};
use conduit_scenarios::redline::{
    Ending, Judged, Outcome, Quantile, Search, SearchConfig, Slo, Step, cooldown, format_duration,
    step_of,
};

use crate::demo::{Binaries, Processes, free_port};

/// What `conduit redline` runs.
#[derive(Clone, Debug)]
pub struct RedlineOptions {
    /// One service to search (`http://host:port/path`); `None` with `compare`.
    pub target: Option<String>,
    /// Start a backend and the proxies and compare them.
    pub compare: bool,
    /// The objectives.
    pub slo: Slo,
    /// The search's rates and budget.
    pub search: SearchConfig,
    /// How long each step sends for.
    pub step: Duration,
    /// Keep-alive connections (HTTP/1.1) or multiplexed connections (h2) per step.
    pub connections: usize,
    /// The longest a request may take before it counts as failed.
    pub timeout: Duration,
    /// What the requests speak (h2c and gRPC multiplex over the connections).
    pub protocol: Protocol,
    /// Poisson arrivals with this seed, instead of evenly spaced ones.
    pub poisson: Option<u64>,
    /// The rate of the probe step each target runs first (0: none).
    pub probe_rate: u32,
    /// Where the JSON report, the plot and (with `compare`) the processes' logs go.
    pub out: PathBuf,
    /// Where `conduit-proxy` is (default: next to this executable).
    pub bin_dir: Option<PathBuf>,
    /// Search in the simulation instead, against this modelled service.
    pub sim: Option<SimService>,
}

/// The service a simulated search runs against (`conduit redline --sim`).
#[derive(Clone, Debug)]
pub struct SimService {
    /// Replicas.
    pub replicas: usize,
    /// Requests each replica serves at once.
    pub concurrency: usize,
    /// Each request's service time.
    pub service_time: Duration,
    /// One replica's service time instead (a slow replica).
    pub slow: Option<Duration>,
    /// Search once per balancer policy (PeakEWMA, least loaded, round robin) instead of
    /// PeakEWMA alone.
    pub policies: bool,
    /// The world's seed.
    pub seed: u64,
}

/// How long the started processes have to answer before the run gives up.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// One service under test.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Its name in the report.
    pub name: String,
    /// Where requests go.
    pub addr: SocketAddr,
    /// The `Host` (`:authority`) sent.
    pub authority: String,
    /// The request path.
    pub path: String,
}

/// A target's search and its probe step.
#[derive(Debug)]
struct Run {
    /// Where it ran (its address is unspecified in the simulation).
    endpoint: Endpoint,
    search: Search,
    probe: Option<Step>,
}

/// Runs `conduit redline`.
///
/// # Errors
///
/// Bad options, a target that cannot be resolved, a process that would not start, or a
/// report that could not be written.
pub async fn run(options: RedlineOptions) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    if let Some(service) = options.sim.clone() {
        // The simulation runs its own runtimes, so not on this one's thread.
        let simulated = std::thread::spawn(move || run_sim(&options, &service));
        return simulated
            .join()
            .map_err(|_| anyhow::anyhow!("the simulated search panicked"))?;
    }
    let mut processes = Processes::new(options.out.clone());
    let endpoints = match (&options.target, options.compare) {
        (Some(url), false) => vec![endpoint_of(url).await?],
        (None, true) if options.protocol == Protocol::Grpc => {
            bail!("--compare's backend answers HTTP, not gRPC: use --grpc with --target")
        }
        (None, true) => start_compare(&options, &mut processes).await?,
        (Some(_), true) => bail!("--compare starts its own backend: give it no --target"),
        (None, false) => bail!("give --target URL, --compare or --sim"),
    };
    let mut runs = endpoints
        .into_iter()
        .map(|endpoint| {
            Ok(Run {
                endpoint,
                search: Search::new(options.search.clone(), options.slo.clone())?,
                probe: None,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let interrupted = tokio::select! {
        result = search_all(&options, &mut runs, &mut processes) => {
            result?;
            false
        }
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        write_reports(&options, &runs)?;
        println!(
            "\ninterrupted: the report so far is in {}",
            options.out.display()
        );
        return Ok(());
    }
    write_reports(&options, &runs)?;
    print!("{}", summary(&options, &runs));
    println!(
        "report: {}  plot: {}",
        options.out.join("redline.json").display(),
        options.out.join("redline.svg").display()
    );
    Ok(())
}

/// `--sim`: the search in the simulation, once per policy asked for, each printed as it ends.
fn run_sim(options: &RedlineOptions, service: &SimService) -> anyhow::Result<()> {
    use conduit_core::balance::Policy;
    use conduit_scenarios::redline_sim::{self, SimRedline};
    let mut spec = SimRedline::new(service.replicas, service.concurrency, service.service_time);
    if let Some(slow) = service.slow {
        spec.service_times = vec![slow, service.service_time];
    }
    spec.slo = options.slo.clone();
    spec.search = options.search.clone();
    spec.step = options.step;
    spec.connections = options.connections;
    if let Some(seed) = options.poisson {
        spec.arrivals = Arrivals::Poisson { seed };
    }
    let policies: &[(&str, Policy)] = if service.policies {
        &[
            ("peak_ewma", Policy::PeakEwma),
            ("least_loaded", Policy::LeastLoaded),
            ("round_robin", Policy::RoundRobin),
        ]
    } else {
        &[("peak_ewma", Policy::PeakEwma)]
    };
    println!(
        "simulated red-line search, seed {}: {} replicas of {} at once at {}{}; modelled \
         capacity {:.0} requests/s; objective {}",
        service.seed,
        service.replicas,
        service.concurrency,
        format_duration(service.service_time),
        service
            .slow
            .map(|slow| format!(" (one at {})", format_duration(slow)))
            .unwrap_or_default(),
        spec.capacity(),
        options.slo,
    );
    println!(
        "{:<14} {:<8} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9}  verdict",
        "policy", "phase", "offered", "answered", "success", "p50", "p99", "p99.9"
    );
    let mut runs = Vec::new();
    for (name, policy) in policies {
        spec.policy = *policy;
        let found = redline_sim::run(&spec, service.seed)?;
        for judged in &found.steps {
            print_step(name, judged.phase.as_str(), &judged.step, &judged.verdict);
        }
        runs.push(Run {
            endpoint: Endpoint {
                name: (*name).to_owned(),
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                authority: "web.default (simulated)".to_owned(),
                path: "/".to_owned(),
            },
            search: found.search,
            probe: None,
        });
    }
    write_reports(options, &runs)?;
    print!("{}", summary(options, &runs));
    println!(
        "report: {}  plot: {}",
        options.out.join("redline.json").display(),
        options.out.join("redline.svg").display()
    );
    Ok(())
}

async fn search_all(
    options: &RedlineOptions,
    runs: &mut [Run],
    processes: &mut Processes,
) -> anyhow::Result<()> {
    println!(
        "red-line search: objective {}, {} steps of {} at most per target, {}",
        options.slo,
        options.search.max_steps,
        format_duration(options.step),
        options.protocol.as_str()
    );
    println!(
        "{:<14} {:<8} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9}  verdict",
        "target", "phase", "offered", "answered", "success", "p50", "p99", "p99.9"
    );
    if options.probe_rate > 0 {
        for run in runs.iter_mut() {
            processes.check_alive()?;
            let label = format!("{} probe {}/s", run.endpoint.name, options.probe_rate);
            let measuring = measure(options, &run.endpoint, options.probe_rate);
            let step = with_progress(&label, options.step, measuring).await?;
            let verdict = options.slo.judge(&step);
            print_step(&run.endpoint.name, "probe", &step, &verdict);
            run.probe = Some(step);
            tokio::time::sleep(cooldown(options.step, verdict.is_err())).await;
        }
    }
    loop {
        let mut ran = false;
        for run in runs.iter_mut() {
            let Some((rate, phase)) = run.search.next() else {
                continue;
            };
            processes.check_alive()?;
            let label = format!(
                "{} {} {rate}/s, step {} of at most {}",
                run.endpoint.name,
                phase.as_str(),
                run.search.steps().len() + 1,
                options.search.max_steps
            );
            let measuring = measure(options, &run.endpoint, rate);
            let step = with_progress(&label, options.step, measuring).await?;
            let verdict = options.slo.judge(&step);
            print_step(&run.endpoint.name, phase.as_str(), &step, &verdict);
            run.search.record(step);
            ran = true;
            tokio::time::sleep(cooldown(options.step, verdict.is_err())).await;
        }
        if !ran {
            return Ok(());
        }
        write_reports(options, runs)?;
    }
}

/// Awaits a step, drawing a progress bar for it on a terminal (cleared when it ends, so the
/// step's line takes its place); elsewhere just awaits it.
async fn with_progress<T>(label: &str, length: Duration, step: impl Future<Output = T>) -> T {
    use std::io::IsTerminal as _;
    if !std::io::stdout().is_terminal() {
        return step.await;
    }
    const WIDTH: usize = 30;
    let clock = Clock::new();
    let start = clock.now();
    let mut ticks = tokio::time::interval(Duration::from_millis(250));
    let mut step = std::pin::pin!(step);
    loop {
        tokio::select! {
            done = &mut step => {
                print!("\r\x1b[2K");
                let _ = std::io::stdout().flush();
                return done;
            }
            _ = ticks.tick() => {
                let elapsed = clock.now() - start;
                let share = (elapsed.as_secs_f64() / length.as_secs_f64().max(1e-9)).min(1.0);
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a share of a small width"
                )]
                let filled = (share * WIDTH as f64).round() as usize;
                let status = if share >= 1.0 { "waiting for the last responses" } else { "" };
                print!(
                    "\r\x1b[2K[{}{}] {label} {status}",
                    "#".repeat(filled),
                    " ".repeat(WIDTH - filled)
                );
                let _ = std::io::stdout().flush();
            }
        }
    }
}

/// Runs one step against `endpoint` at `rate`.
async fn measure(options: &RedlineOptions, endpoint: &Endpoint, rate: u32) -> anyhow::Result<Step> {
    let config = LoadConfig {
        rate,
        duration: options.step,
        connections: options.connections,
        timeout: options.timeout,
        targets: vec![Target {
            authority: endpoint.authority.clone(),
            path: endpoint.path.clone(),
            method: http::Method::GET,
        }],
        arrivals: options
            .poisson
            .map_or(Arrivals::Constant, |seed| Arrivals::Poisson { seed }),
        protocol: options.protocol,
        spin_wait: true,
    };
    let report = load::run(TokioNet, endpoint.addr, config, Clock::new()).await?;
    Ok(step_of(rate, &report, &options.slo))
}

fn print_step(name: &str, phase: &str, step: &Step, verdict: &Result<(), impl std::fmt::Display>) {
    let at = |q| {
        step.quantile(q)
            .map_or_else(|| "-".to_owned(), format_duration)
    };
    let verdict = match verdict {
        Ok(()) => "met".to_owned(),
        Err(breach) => format!("broke: {breach}"),
    };
    println!(
        "{name:<14} {phase:<8} {:>9} {:>9.0} {:>7.2}% {:>9} {:>9} {:>9}  {verdict}",
        step.rate,
        step.throughput,
        step.success_rate() * 100.0,
        at(Quantile::P50),
        at(Quantile::P99),
        at(Quantile::P999),
    );
    let _ = std::io::stdout().flush();
}

/// Resolves `http://host:port/path` to an endpoint.
async fn endpoint_of(url: &str) -> anyhow::Result<Endpoint> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("--target {url:?} is not a URL"))?;
    if uri.scheme_str().is_some_and(|s| s != "http") {
        bail!("--target {url:?}: only http:// targets are supported (h2c with --h2 or --grpc)");
    }
    let authority = uri
        .authority()
        .with_context(|| format!("--target {url:?} names no host"))?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((authority.host(), port))
        .await
        .with_context(|| format!("resolving {}", authority.host()))?
        .next()
        .with_context(|| format!("{} has no address", authority.host()))?;
    Ok(Endpoint {
        name: "target".to_owned(),
        addr,
        authority: authority.to_string(),
        path: uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), ToString::to_string),
    })
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// Starts the backend and the proxies in front of it; the backend and every proxy share one
/// CPU (pinned with `taskset` where there are two or more), as a sidecar shares its app's.
async fn start_compare(
    options: &RedlineOptions,
    processes: &mut Processes,
) -> anyhow::Result<Vec<Endpoint>> {
    let bins = Binaries::locate(options.bin_dir.as_deref())?;
    let cli = std::env::current_exe().context("locating this executable")?;
    let pin = on_path("taskset")
        .filter(|_| std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2));
    let mut spawn =
        |name: &str, program: &Path, args: Vec<String>, env: &[(&str, String)]| match &pin {
            Some(taskset) => {
                let mut pinned = vec![
                    "-c".to_owned(),
                    "0".to_owned(),
                    program.display().to_string(),
                ];
                pinned.extend(args);
                processes.spawn_with_args(name, taskset, &pinned, env)
            }
            None => processes.spawn_with_args(name, program, &args, env),
        };
    let backend = free_port()?;
    spawn(
        "backend",
        &cli,
        vec!["hello".into(), "--listen".into(), backend.to_string()],
        &[],
    )?;
    let endpoint = |name: &str, addr| Endpoint {
        name: name.to_owned(),
        addr,
        authority: "hello".to_owned(),
        path: "/".to_owned(),
    };
    let mut endpoints = vec![endpoint("direct", backend)];

    let mesh = options.out.join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!("services:\n  hello:\n    endpoints:\n      - addr: {backend}\n"),
    )
    .context("writing the proxy's mesh file")?;
    let proxy = free_port()?;
    let admin = free_port()?;
    spawn(
        "conduit-proxy",
        &bins.proxy,
        Vec::new(),
        &[
            ("CONDUIT_PROXY_OUTBOUND_ADDR", proxy.to_string()),
            ("CONDUIT_PROXY_INBOUND_ADDR", "127.0.0.1:0".to_owned()),
            ("CONDUIT_PROXY_ADMIN_ADDR", admin.to_string()),
            (
                "CONDUIT_PROXY_DISCOVERY",
                format!("file:{}", mesh.display()),
            ),
            ("CONDUIT_PROXY_WORKERS", "1".to_owned()),
            ("CONDUIT_PROXY_LOG", "warn".to_owned()),
        ],
    )?;
    endpoints.push(endpoint("conduit-proxy", proxy));

    if let Some(nginx) = on_path("nginx").or_else(|| on_path("/usr/sbin/nginx")) {
        let addr = free_port()?;
        let conf = options.out.join("nginx.conf");
        let listen = if options.protocol == Protocol::H2 {
            format!("{addr} http2")
        } else {
            addr.to_string()
        };
        let out = options.out.canonicalize()?;
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {pid};\n\
                 error_log {log} warn;\nevents {{ worker_connections 4096; }}\n\
                 http {{\n  access_log off;\n  upstream hello {{ server {backend}; keepalive 1024; keepalive_requests 1000000; }}\n\
                 \x20 server {{\n    listen {listen};\n    location / {{ proxy_pass http://hello; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
                pid = out.join("nginx.pid").display(),
                log = out.join("nginx.error.log").display(),
            ),
        )?;
        spawn(
            "nginx",
            &nginx,
            vec!["-c".into(), conf.canonicalize()?.display().to_string()],
            &[],
        )?;
        endpoints.push(endpoint("nginx", addr));
    }
    if let Some(haproxy) = on_path("haproxy").or_else(|| on_path("/usr/sbin/haproxy")) {
        let addr = free_port()?;
        let conf = options.out.join("haproxy.cfg");
        // h2 on both sides, as conduit-proxy speaks it upstream for h2 clients.
        let proto = if options.protocol == Protocol::H2 {
            " proto h2"
        } else {
            ""
        };
        std::fs::write(
            &conf,
            format!(
                "global\n    nbthread 1\n    maxconn 8192\ndefaults\n    mode http\n    http-reuse always\n\
                 \x20   timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
                 frontend front\n    bind {addr}{proto}\n    default_backend hello\n\
                 backend hello\n    server hello {backend}{proto}\n"
            ),
        )?;
        spawn(
            "haproxy",
            &haproxy,
            vec!["-f".into(), conf.canonicalize()?.display().to_string()],
            &[],
        )?;
        endpoints.push(endpoint("haproxy", addr));
    }
    wait_answering(&endpoints, processes, options.protocol).await?;
    Ok(endpoints)
}

/// Waits until every endpoint answers a request with 200.
async fn wait_answering(
    endpoints: &[Endpoint],
    processes: &mut Processes,
    protocol: Protocol,
) -> anyhow::Result<()> {
    let wait = async {
        for endpoint in endpoints {
            loop {
                processes.check_alive()?;
                let config = LoadConfig {
                    rate: 100,
                    duration: Duration::from_millis(10),
                    connections: 1,
                    timeout: Duration::from_secs(1),
                    targets: vec![Target {
                        authority: endpoint.authority.clone(),
                        path: endpoint.path.clone(),
                        method: http::Method::GET,
                    }],
                    arrivals: Arrivals::Constant,
                    protocol,
                    spin_wait: false,
                };
                let report = load::run(TokioNet, endpoint.addr, config, Clock::new()).await?;
                if report.overall().statuses.get(&200) == Some(&1) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(READY_TIMEOUT, wait)
        .await
        .with_context(|| format!("the targets did not answer within {READY_TIMEOUT:?}"))?
}

fn ending_str(ending: &Ending) -> &'static str {
    match ending {
        Ending::Knee => "knee found and confirmed",
        Ending::ReachedMax => "met the objectives up to the maximum rate",
        Ending::NeverMet => "no rate met the objectives",
        Ending::StepLimit => "step budget spent (unconfirmed)",
    }
}

/// The summary table: each target's red line, its ratio to the first target's (the backend
/// alone, with `--compare`), and the latency each adds at the probe rate.
fn summary(options: &RedlineOptions, runs: &[Run]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<14} {:>10} {:>9} {:>14} {:>14}  ending",
        "target",
        "red line",
        "vs first",
        format!("+p50 @{}", options.probe_rate),
        format!("+p99 @{}", options.probe_rate),
    );
    let base = runs.first();
    let base_line = base
        .and_then(|r| r.search.outcome())
        .and_then(|o| o.red_line);
    for run in runs {
        let outcome = run.search.outcome();
        let line = outcome.as_ref().and_then(|o| o.red_line);
        let ratio = match (line, base_line) {
            (Some(l), Some(b)) if b > 0 => format!("{:.2}x", f64::from(l) / f64::from(b)),
            _ => "-".to_owned(),
        };
        let added = |q| match (
            run.probe.as_ref().and_then(|p| p.quantile(q)),
            base.and_then(|b| b.probe.as_ref())
                .and_then(|p| p.quantile(q)),
        ) {
            (Some(own), Some(base)) => signed_micros(own, base),
            _ => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<14} {:>10} {:>9} {:>14} {:>14}  {}",
            run.endpoint.name,
            line.map_or_else(|| "-".to_owned(), |l| l.to_string()),
            ratio,
            added(Quantile::P50),
            added(Quantile::P99),
            outcome
                .as_ref()
                .map_or("unfinished", |o| ending_str(&o.ending)),
        );
    }
    out
}

fn signed_micros(own: Duration, base: Duration) -> String {
    let delta = own.as_secs_f64() - base.as_secs_f64();
    format!("{:+.0}us", delta * 1e6)
}

fn micros(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e7).round() / 10.0
}

fn step_json(step: &Step) -> serde_json::Value {
    let mut latency = serde_json::Map::new();
    for (q, d) in &step.latency {
        latency.insert(format!("{q}_us"), micros(*d).into());
    }
    serde_json::json!({
        "offered_rps": step.rate,
        "requests": step.requests,
        "successes": step.successes,
        "success_rate": step.success_rate(),
        "answered_rps": step.throughput,
        "latency": latency,
    })
}

fn judged_json(judged: &Judged) -> serde_json::Value {
    let mut value = step_json(&judged.step);
    value["phase"] = judged.phase.as_str().into();
    value["verdict"] = match &judged.verdict {
        Ok(()) => "met".into(),
        Err(breach) => format!("broke: {breach}").into(),
    };
    value
}

fn outcome_json(outcome: Option<&Outcome>) -> serde_json::Value {
    outcome.map_or(serde_json::Value::Null, |o| {
        serde_json::json!({
            "red_line_rps": o.red_line,
            "ending": ending_str(&o.ending),
            "broke_at": o.broke_at.as_ref().map(|(rate, breach)| serde_json::json!({
                "offered_rps": rate,
                "objective": breach.to_string(),
            })),
        })
    })
}

/// The JSON report.
fn report_json(options: &RedlineOptions, runs: &[Run]) -> serde_json::Value {
    serde_json::json!({
        "objective": options.slo.to_string(),
        "protocol": options.protocol.as_str(),
        "step_s": options.step.as_secs_f64(),
        "connections": options.connections,
        "arrivals": options.poisson.map_or_else(|| "constant".to_owned(), |s| format!("poisson (seed {s})")),
        "probe_rps": options.probe_rate,
        "targets": runs.iter().map(|run| serde_json::json!({
            "name": run.endpoint.name,
            "addr": run.endpoint.addr.to_string(),
            "authority": run.endpoint.authority,
            "outcome": outcome_json(run.search.outcome().as_ref()),
            "probe": run.probe.as_ref().map(step_json),
            "steps": run.search.steps().iter().map(judged_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn write_reports(options: &RedlineOptions, runs: &[Run]) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(&report_json(options, runs))?;
    std::fs::write(options.out.join("redline.json"), json + "\n")
        .context("writing redline.json")?;
    let series: Vec<Series> = runs
        .iter()
        .map(|run| Series {
            name: run.endpoint.name.clone(),
            points: run
                .search
                .steps()
                .iter()
                .filter_map(|j| {
                    let s = &j.step;
                    Some((
                        s.rate,
                        s.quantile(Quantile::P50)?,
                        s.quantile(Quantile::P99)?,
                    ))
                })
                .collect(),
            red_line: run.search.outcome().and_then(|o| o.red_line),
        })
        .collect();
    let title = match &options.sim {
        Some(service) => format!("red line, simulated (seed {})", service.seed),
        None => format!("red line, {} on loopback", options.protocol.as_str()),
    };
    std::fs::write(
        options.out.join("redline.svg"),
        plot::svg(&title, &options.slo.to_string(), &series),
    )
    .context("writing redline.svg")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_search_against_a_real_server_writes_its_report_and_plot() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(crate::app::serve_hello(listener));
        let out = std::env::temp_dir().join(format!("conduit-redline-test-{}", std::process::id()));
        let options = RedlineOptions {
            target: Some(format!("http://{addr}/")),
            compare: false,
            slo: "p99<1s,success>99%".parse().unwrap(),
            search: SearchConfig {
                start: 50,
                max: 200,
                ..SearchConfig::default()
            },
            step: Duration::from_millis(200),
            connections: 4,
            timeout: Duration::from_secs(2),
            protocol: Protocol::Http1,
            poisson: Some(1),
            probe_rate: 100,
            out: out.clone(),
            bin_dir: None,
            sim: None,
        };
        tokio::time::timeout(Duration::from_secs(60), run(options))
            .await
            .expect("the search is bounded")
            .unwrap();
        server.abort();
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("redline.json")).unwrap())
                .unwrap();
        let target = &report["targets"][0];
        // A server far faster than 200 requests/s meets the objective at every step: the
        // search grows 50 -> 100 -> 200 and stops at the maximum.
        assert_eq!(target["outcome"]["red_line_rps"], 200, "{report:#}");
        assert_eq!(
            target["outcome"]["ending"],
            "met the objectives up to the maximum rate"
        );
        let rates: Vec<_> = target["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["offered_rps"].as_u64().unwrap())
            .collect();
        assert_eq!(rates, [50, 100, 200]);
        assert_eq!(target["probe"]["offered_rps"], 100);
        assert_eq!(target["steps"][2]["requests"], 40);
        let svg = std::fs::read_to_string(out.join("redline.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("red line 200"),
            "{svg}"
        );
        let _ = std::fs::remove_dir_all(out);
    }

    #[tokio::test]
    async fn targets_are_read_from_urls() {
        let endpoint = endpoint_of("http://127.0.0.1:8080/api?x=1").await.unwrap();
        assert_eq!(endpoint.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(endpoint.authority, "127.0.0.1:8080");
        assert_eq!(endpoint.path, "/api?x=1");
        let err = endpoint_of("https://example.com/").await.unwrap_err();
        assert!(err.to_string().contains("only http://"), "{err}");
        assert!(endpoint_of("not a url").await.is_err());
    }
}
