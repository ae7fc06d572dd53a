//! Chaos runs in the simulation: one swarm [`Case`] per seed ([`run_case`]), sweeps over
//! seeds in child processes (one world per process), shrinking of failing seeds, the sweep's
//! report (JSON and a readable summary) and the `conduit chaos` command ([`cli`]).
//!
//! A failing seed's case is written to `seed-N.case.json`, shrunk while the same invariant
//! still fails, and the smallest failing case written to `seed-N.shrunk.json`; both replay with
//! `conduit chaos --replay FILE`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use conduit_chaos::shrink::{self, Shrunk, Size};
use conduit_chaos::swarm::{Case, FaultKind};
use conduit_core::rand::{DetRng, Rng};
use conduit_sim::{Report, Trace, process};
use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// The scenario name chaos reports carry.
pub const SCENARIO: &str = "chaos";

/// In a child process: the case to run, `seed:N` or a case file's path.
pub const CASE_ENV: &str = "CONDUIT_CHAOS_CASE";

/// The plan a case runs as.
#[must_use]
pub fn plan(case: &Case) -> Plan {
    let mut plan = Plan::new(case.world(), case.flows.clone());
    plan.schedule = case.schedule();
    plan.checks = case.checks();
    if case.topology.meshed {
        // No request reached a replica's proxy in plaintext (counts restart with a crashed host).
        plan = plan.check(conduit_sim::check::inbound_never_plaintext);
    }
    plan
}

/// Runs `case` in this process (once per process), after `tweak` altered its plan (tests plant
/// defects there). The report's summary ends with what the case picked and the fault points
/// that fired.
#[must_use]
pub fn run_case(case: &Case, tweak: &dyn Fn(&mut Plan)) -> (Report, Trace) {
    let mut plan = plan(case);
    tweak(&mut plan);
    conduit_proxy::fault_points::arm(
        DetRng::new(case.seed).child("fault-points").next_u64(),
        &case.fault_points,
    );
    let (mut report, trace) = crate::sim::run_plan(SCENARIO, &plan, case.seed);
    let fired = conduit_proxy::fault_points::fired();
    conduit_proxy::fault_points::disarm();
    let mut summary = case.picked.join("\n");
    summary.push('\n');
    if !fired.is_empty() {
        let fired: Vec<String> = fired.iter().map(|(p, n)| format!("{p} x{n}")).collect();
        summary.push_str(&format!("fault points fired: {}\n", fired.join(", ")));
    }
    summary.push_str(&report.summary);
    report.summary = summary;
    (report, trace)
}

/// In a child process started with [`CASE_ENV`]: runs that case (after `tweak`), prints its
/// report and returns true. Otherwise returns false.
#[must_use]
pub fn child_entry(tweak: &dyn Fn(&mut Plan)) -> bool {
    let Ok(value) = std::env::var(CASE_ENV) else {
        return false;
    };
    let report = match load_case(&value) {
        Ok(case) => run_case(&case, tweak).0,
        Err(err) => harness_failure(0, &format!("{err:#}")),
    };
    process::emit(&report);
    true
}

/// `seed:N` draws seed N's case; anything else is a case file.
fn load_case(value: &str) -> anyhow::Result<Case> {
    match value.strip_prefix("seed:") {
        Some(seed) => Ok(Case::draw(seed.parse().context("a seed")?)),
        None => read_case(Path::new(value)),
    }
}

/// Reads a case file.
///
/// # Errors
///
/// When the file cannot be read or is not a case.
pub fn read_case(path: &Path) -> anyhow::Result<Case> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the case file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a chaos case", path.display()))
}

/// Writes `case` to `path` (pretty JSON, readable and editable by hand).
///
/// # Errors
///
/// IO errors.
pub fn write_case(path: &Path, case: &Case) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(case)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

fn harness_failure(seed: u64, message: &str) -> Report {
    Report {
        scenario: SCENARIO.to_owned(),
        seed,
        hash: String::new(),
        summary: String::new(),
        violations: vec![conduit_sim::Violation::new("harness", message)],
        requests: 0,
        sim_ms: 0,
        failure_file: None,
    }
}

/// How a sweep runs one case in a child process.
#[derive(Clone, Debug)]
pub enum Runner {
    /// An executable and its arguments; `--seed N --json` or `--replay FILE --json` is
    /// appended (the `conduit chaos` command).
    Exe(Vec<String>),
    /// This test binary, re-executed into the named test (which calls [`child_entry`]).
    Test(String),
}

impl Runner {
    /// Runs the case `target` names (`seed:N` or a file) and reads its report.
    ///
    /// # Errors
    ///
    /// When the child cannot run or prints no report.
    pub fn run(&self, target: &str) -> anyhow::Result<Report> {
        let command = match self {
            Self::Exe(exe) => {
                let (program, args) = exe
                    .split_first()
                    .ok_or_else(|| anyhow::anyhow!("no executable to run cases with"))?;
                let mut command = Command::new(program);
                command.args(args);
                match target.strip_prefix("seed:") {
                    Some(seed) => command.args(["--seed", seed]),
                    None => command.args(["--replay", target]),
                };
                command.arg("--json");
                command
            }
            Self::Test(test) => {
                let exe = std::env::current_exe().context("finding the test binary")?;
                let mut command = Command::new(exe);
                command
                    .args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"])
                    .env(CASE_ENV, target);
                command
            }
        };
        process::run(command)
    }
}

/// A sweep's settings.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// First seed.
    pub from: u64,
    /// One past the last seed.
    pub to: u64,
    /// Child processes at once.
    pub jobs: usize,
    /// Where the report and the failing cases go.
    pub out: PathBuf,
    /// Candidate runs a failing seed's shrink may spend (0: no shrinking).
    pub shrink_budget: usize,
    /// Show progress on stderr.
    pub progress: bool,
}

/// A failing seed in a sweep's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// The invariant that broke first.
    pub check: String,
    /// Every violation (at most 20).
    pub violations: Vec<String>,
    /// The case, as drawn.
    pub case_file: String,
    /// The shrunk case, when shrinking found a smaller one that fails the same way.
    pub shrunk_file: Option<String>,
    /// Size as drawn.
    pub size: Size,
    /// Size after shrinking, when shrinking found a smaller failing case.
    pub shrunk_size: Option<Size>,
    /// Shrink candidates run.
    pub shrink_tries: usize,
    /// The command that replays the failure (the shrunk case when there is one).
    pub replay: String,
    /// The simulation's failure file (schedule and trace of the seed's run).
    pub trace_file: Option<String>,
}

/// A sweep's report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    /// Seeds `from..to`.
    pub seeds: (u64, u64),
    /// Cases run (seeds, not shrink candidates).
    pub runs: usize,
    /// Seeds that failed.
    pub failed: usize,
    /// Wall time of the whole sweep (shrinking included), ms.
    pub wall_ms: u64,
    /// Seeds per minute of the sweep's wall time, shrinking excluded.
    pub seeds_per_minute: f64,
    /// Requests the runs sent (sum over seeds).
    pub requests: u64,
    /// Seeds that had each fault kind on.
    pub kinds: BTreeMap<String, usize>,
    /// Faults struck, by kind (each fault point counts once per seed it was armed in).
    pub faults: BTreeMap<String, usize>,
    /// Seeds per topology (`services x replicas, clients, discovery`).
    pub topologies: BTreeMap<String, usize>,
    /// Seeds with each fault kind on, by discovery (`static`, `controller`, `mtls`) and by
    /// size (`small`: at most three replicas in all, `large`: more).
    #[serde(default)]
    pub coverage: BTreeMap<String, BTreeMap<String, usize>>,
    /// The failures.
    pub failures: Vec<Failure>,
}

impl SweepReport {
    /// The readable summary.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = format!(
            "chaos sweep, seeds {}..{}: {} runs, {} failed, {} requests, {:.1} s ({:.0} seeds/minute)\n",
            self.seeds.0,
            self.seeds.1,
            self.runs,
            self.failed,
            self.requests,
            Duration::from_millis(self.wall_ms).as_secs_f64(),
            self.seeds_per_minute
        );
        out.push_str("\nfault kinds (seeds with the kind on / faults struck):\n");
        for (kind, seeds) in &self.kinds {
            let struck = self.faults.get(kind).copied().unwrap_or(0);
            out.push_str(&format!("  {kind:<20} {seeds:>6} {struck:>7}\n"));
        }
        out.push_str(&format!(
            "\nfault kinds x topologies (seeds):\n  {:<20} {:>7} {:>7} {:>11} {:>11} {:>7} {:>7}\n",
            "", "static", "static", "controller", "controller", "mTLS", "mTLS"
        ));
        out.push_str(&format!(
            "  {:<20} {:>7} {:>7} {:>11} {:>11} {:>7} {:>7}\n",
            "", "small", "large", "small", "large", "small", "large"
        ));
        for (kind, columns) in &self.coverage {
            out.push_str(&format!("  {kind:<20}"));
            for (column, width) in COVERAGE_COLUMNS.iter().zip([7, 7, 11, 11, 7, 7]) {
                let n = columns.get(*column).copied().unwrap_or(0);
                out.push_str(&format!(" {n:>width$}"));
            }
            out.push('\n');
        }
        out.push_str("\ntopologies (seeds):\n");
        for (topology, seeds) in &self.topologies {
            out.push_str(&format!("  {topology:<40} {seeds:>6}\n"));
        }
        if self.failures.is_empty() {
            out.push_str("\nno invariant broke\n");
        } else {
            out.push_str("\nfailures:\n");
            for f in &self.failures {
                out.push_str(&format!("seed {}: [{}]\n", f.seed, f.check));
                for v in f.violations.iter().take(5) {
                    out.push_str(&format!("    {v}\n"));
                }
                out.push_str(&format!("  case: {}\n", f.case_file));
                if let (Some(file), Some(after)) = (&f.shrunk_file, f.shrunk_size) {
                    let before = f.size;
                    out.push_str(&format!(
                        "  shrunk in {} runs: {} fault actions, {} hosts, {} requests (from {}, {}, {}): {file}\n",
                        f.shrink_tries,
                        after.faults,
                        after.hosts,
                        after.requests,
                        before.faults,
                        before.hosts,
                        before.requests
                    ));
                }
                out.push_str(&format!("  replay: {}\n", f.replay));
                if let Some(trace) = &f.trace_file {
                    out.push_str(&format!("  trace: {trace}\n"));
                }
            }
        }
        out
    }
}

/// The columns of the report's fault kinds x topologies table: discovery, then size.
const COVERAGE_COLUMNS: [&str; 6] = [
    "static/small",
    "static/large",
    "controller/small",
    "controller/large",
    "mtls/small",
    "mtls/large",
];

/// The column of `case` in the coverage table.
fn coverage_column(case: &Case) -> String {
    let discovery = match (case.topology.controller, case.topology.meshed) {
        (true, true) => "mtls",
        (true, false) => "controller",
        _ => "static",
    };
    let replicas: usize = case.topology.services.iter().map(|(_, r)| r).sum();
    let size = if replicas <= 3 { "small" } else { "large" };
    format!("{discovery}/{size}")
}

/// A topology in words, for the report's coverage table: services, replicas in all (in
/// buckets), clients, discovery.
fn topology_label(case: &Case) -> String {
    let replicas: usize = case.topology.services.iter().map(|(_, r)| r).sum();
    let replicas = match replicas {
        1 => "1 replica",
        2..=3 => "2-3 replicas",
        4..=6 => "4-6 replicas",
        _ => "7+ replicas",
    };
    format!(
        "{} service(s), {replicas}, {} client(s), {}",
        case.topology.services.len(),
        case.topology.clients,
        match (case.topology.controller, case.topology.meshed) {
            (true, true) => "controller, mTLS",
            (true, false) => "controller",
            _ => "static",
        }
    )
}

/// Runs seeds `from..to` with `runner`, shrinks each failure, and writes `report.json` and
/// `report.txt` (and the failing cases) under `sweep.out`.
///
/// # Errors
///
/// When the output directory cannot be written.
pub fn sweep(sweep: &Sweep, runner: &Runner) -> anyhow::Result<SweepReport> {
    std::fs::create_dir_all(&sweep.out)
        .with_context(|| format!("creating {}", sweep.out.display()))?;
    let stopwatch = conduit_sim::Stopwatch::start();
    let next = AtomicU64::new(sweep.from);
    let done = AtomicUsize::new(0);
    let failed = AtomicUsize::new(0);
    let total = usize::try_from(sweep.to.saturating_sub(sweep.from)).unwrap_or(usize::MAX);
    let results: Mutex<Vec<(u64, anyhow::Result<Report>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..sweep.jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= sweep.to {
                        return;
                    }
                    let report = runner.run(&format!("seed:{seed}"));
                    if !report.as_ref().is_ok_and(Report::passed) {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if sweep.progress {
                        progress(n, total, failed.load(Ordering::Relaxed), &stopwatch);
                    }
                    results
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .push((seed, report));
                }
            });
        }
    });
    if sweep.progress {
        eprintln!();
    }
    let sweep_wall = stopwatch.elapsed();
    let mut results = results
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    results.sort_by_key(|(seed, _)| *seed);

    let mut report = SweepReport {
        seeds: (sweep.from, sweep.to),
        runs: results.len(),
        failed: 0,
        wall_ms: 0,
        #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
        seeds_per_minute: results.len() as f64 * 60.0 / sweep_wall.as_secs_f64().max(1e-9),
        requests: 0,
        kinds: BTreeMap::new(),
        faults: BTreeMap::new(),
        topologies: BTreeMap::new(),
        coverage: BTreeMap::new(),
        failures: Vec::new(),
    };
    for (seed, result) in results {
        let case = Case::draw(seed);
        let column = coverage_column(&case);
        for kind in &case.kinds {
            *report.kinds.entry(kind.to_string()).or_insert(0) += 1;
            *report
                .coverage
                .entry(kind.to_string())
                .or_default()
                .entry(column.clone())
                .or_insert(0) += 1;
        }
        for fault in &case.faults {
            *report.faults.entry(fault.kind.to_string()).or_insert(0) += 1;
        }
        if !case.fault_points.is_empty() {
            *report
                .faults
                .entry(FaultKind::FaultPoints.to_string())
                .or_insert(0) += case.fault_points.len();
        }
        *report.topologies.entry(topology_label(&case)).or_insert(0) += 1;
        let run = match result {
            Ok(run) => run,
            Err(err) => harness_failure(seed, &format!("{err:#}")),
        };
        report.requests += run.requests as u64;
        if run.passed() {
            continue;
        }
        report.failed += 1;
        let failure = investigate(sweep, runner, &case, &run)?;
        if sweep.progress {
            eprintln!(
                "seed {seed} failed [{}]; replay: {}",
                failure.check, failure.replay
            );
        }
        report.failures.push(failure);
    }
    report.wall_ms = u64::try_from(stopwatch.elapsed().as_millis()).unwrap_or(u64::MAX);
    std::fs::write(
        sweep.out.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    std::fs::write(sweep.out.join("report.txt"), report.render())?;
    Ok(report)
}

/// Writes a failing seed's case, shrinks it while the same invariant fails, writes the
/// smallest.
fn investigate(
    sweep: &Sweep,
    runner: &Runner,
    case: &Case,
    run: &Report,
) -> anyhow::Result<Failure> {
    let check = run
        .violations
        .first()
        .map_or_else(|| "harness".to_owned(), |v| v.check.clone());
    let case_file = sweep.out.join(format!("seed-{}.case.json", case.seed));
    write_case(&case_file, case)?;
    let mut failure = Failure {
        seed: case.seed,
        check: check.clone(),
        violations: run
            .violations
            .iter()
            .take(20)
            .map(ToString::to_string)
            .collect(),
        case_file: case_file.display().to_string(),
        shrunk_file: None,
        size: shrink::size(case),
        shrunk_size: None,
        shrink_tries: 0,
        replay: replay_command(&case_file),
        trace_file: run.failure_file.clone(),
    };
    if sweep.shrink_budget == 0 {
        return Ok(failure);
    }
    let candidate_file = sweep.out.join(format!("seed-{}.candidate.json", case.seed));
    let Shrunk {
        case: shrunk,
        tries,
        kept,
    } = shrink::shrink(case, sweep.shrink_budget, |candidate| {
        write_case(&candidate_file, candidate).is_ok()
            && runner
                .run(&candidate_file.display().to_string())
                .is_ok_and(|r| r.violations.iter().any(|v| v.check == check))
    });
    let _ = std::fs::remove_file(&candidate_file);
    failure.shrink_tries = tries;
    if kept > 0 {
        let shrunk_file = sweep.out.join(format!("seed-{}.shrunk.json", case.seed));
        write_case(&shrunk_file, &shrunk)?;
        failure.shrunk_size = Some(shrink::size(&shrunk));
        failure.replay = replay_command(&shrunk_file);
        failure.shrunk_file = Some(shrunk_file.display().to_string());
    }
    Ok(failure)
}

/// The command that replays a case file.
#[must_use]
pub fn replay_command(file: &Path) -> String {
    format!("conduit chaos --replay {}", file.display())
}

fn progress(done: usize, total: usize, failed: usize, stopwatch: &conduit_sim::Stopwatch) {
    const WIDTH: usize = 40;
    let mut stderr = std::io::stderr();
    #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
    let rate = done as f64 * 60.0 / stopwatch.elapsed().as_secs_f64().max(1e-9);
    if !std::io::IsTerminal::is_terminal(&stderr) {
        let step = (total / 10).max(1);
        if done.is_multiple_of(step) || done == total {
            let _ = writeln!(
                stderr,
                "{done}/{total} seeds ({failed} failed, {rate:.0} seeds/minute)"
            );
        }
        return;
    }
    let filled = WIDTH * done / total.max(1);
    let bar: String = "#".repeat(filled) + &"-".repeat(WIDTH - filled);
    let _ = write!(
        stderr,
        "\r[{bar}] {done}/{total} seeds ({failed} failed, {rate:.0} seeds/minute)"
    );
    let _ = stderr.flush();
}

/// `conduit chaos`: what the command line asked for.
#[derive(Clone, Debug)]
pub enum ChaosCommand {
    /// Run one case in this process and print its report (`--json`: as a child's report
    /// line).
    One {
        /// The case.
        case: Box<Case>,
        /// Print the child-process report line.
        json: bool,
    },
    /// A sweep.
    Sweep(Sweep, Runner),
}

/// Runs a `conduit chaos` command, writing to `out`. Returns whether every run passed.
///
/// # Errors
///
/// IO errors.
pub fn cli(command: ChaosCommand, out: &mut dyn std::io::Write) -> anyhow::Result<bool> {
    match command {
        ChaosCommand::One { case, json } => {
            if !json {
                writeln!(out, "chaos case, seed {}", case.seed)?;
            }
            let stopwatch = conduit_sim::Stopwatch::start();
            let (report, _) = run_case(&case, &|_| {});
            if json {
                process::emit(&report);
                return Ok(report.passed());
            }
            write!(out, "{}", report.summary)?;
            writeln!(
                out,
                "sim time: {} ms, wall time: {} ms",
                report.sim_ms,
                stopwatch.elapsed().as_millis()
            )?;
            writeln!(out, "trace hash: {}", report.hash)?;
            if report.passed() {
                writeln!(out, "result: pass")?;
            } else {
                writeln!(out, "result: FAIL")?;
                for v in &report.violations {
                    writeln!(out, "  {v}")?;
                }
                if let Some(file) = &report.failure_file {
                    writeln!(out, "schedule and trace: {file}")?;
                }
            }
            Ok(report.passed())
        }
        ChaosCommand::Sweep(settings, runner) => {
            let report = sweep(&settings, &runner)?;
            write!(out, "{}", report.render())?;
            writeln!(
                out,
                "report: {}",
                settings.out.join("report.json").display()
            )?;
            Ok(report.failures.is_empty())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_every_failure_with_its_replay_command() {
        let report = SweepReport {
            seeds: (0, 10),
            runs: 10,
            failed: 1,
            wall_ms: 12_000,
            seeds_per_minute: 50.0,
            requests: 4_000,
            kinds: BTreeMap::from([("crash".to_owned(), 6), ("hold".to_owned(), 4)]),
            faults: BTreeMap::from([("crash".to_owned(), 11), ("hold".to_owned(), 7)]),
            topologies: BTreeMap::from([(
                "1 service(s), 2-3 replicas, 2 client(s), static".to_owned(),
                10,
            )]),
            coverage: BTreeMap::from([
                (
                    "crash".to_owned(),
                    BTreeMap::from([("static/small".to_owned(), 6)]),
                ),
                (
                    "hold".to_owned(),
                    BTreeMap::from([("static/small".to_owned(), 4)]),
                ),
            ]),
            failures: vec![Failure {
                seed: 7,
                check: "at-most-once".into(),
                violations: vec!["[at-most-once] request 12 reached apps twice".into()],
                case_file: "out/seed-7.case.json".into(),
                shrunk_file: Some("out/seed-7.shrunk.json".into()),
                size: Size {
                    faults: 14,
                    hosts: 7,
                    requests: 900,
                },
                shrunk_size: Some(Size {
                    faults: 2,
                    hosts: 2,
                    requests: 56,
                }),
                shrink_tries: 31,
                replay: "conduit chaos --replay out/seed-7.shrunk.json".into(),
                trace_file: None,
            }],
        };
        insta::assert_snapshot!(report.render());
    }
}
