//! Running scenarios: one seed in this process ([`run`]), one seed in a child process
//! ([`run_isolated`], what tests and sweeps use), and the `conduit sim` command ([`cli`]).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use conduit_chaos::Schedule;
use conduit_core::rand::DetRng;
use conduit_sim::check::{self, Checks, Violation};
use conduit_sim::{Flow, Report, Trace, Workload, World, WorldSpec, process};

use crate::scenarios::{self, Scenario};

/// A scenario-specific invariant over the trace.
pub type ExtraCheck = Box<dyn Fn(&Trace) -> Vec<Violation>>;

/// Everything one run of a scenario needs, derived from its seed.
pub struct Plan {
    /// Topology and physics.
    pub world: WorldSpec,
    /// Request flows (planned into a schedule with the seed).
    pub flows: Vec<Flow>,
    /// Faults and configuration changes.
    pub schedule: Schedule,
    /// Generic invariants and their bounds.
    pub checks: Checks,
    /// Scenario-specific invariants.
    pub extra: Vec<ExtraCheck>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("world", &self.world)
            .field("flows", &self.flows)
            .field("schedule", &self.schedule)
            .field("checks", &self.checks)
            .finish_non_exhaustive()
    }
}

impl Plan {
    /// A plan with the default checks, no faults and no extra invariants.
    #[must_use]
    pub fn new(world: WorldSpec, flows: Vec<Flow>) -> Self {
        Self {
            world,
            flows,
            schedule: Schedule::new(),
            checks: Checks::default(),
            extra: Vec::new(),
        }
    }

    /// Adds a scenario-specific invariant.
    #[must_use]
    pub fn check(mut self, f: impl Fn(&Trace) -> Vec<Violation> + 'static) -> Self {
        self.extra.push(Box::new(f));
        self
    }
}

/// Runs `scenario` at `seed` in this process. Call it at most once per process.
#[must_use]
pub fn run(scenario: &Scenario, seed: u64) -> (Report, Trace) {
    run_plan(scenario.name, &(scenario.plan)(seed), seed)
}

/// Runs `plan` (scenario `name`'s, possibly altered by a test) at `seed` in this process. Call
/// it at most once per process.
#[must_use]
pub fn run_plan(name: &str, plan: &Plan, seed: u64) -> (Report, Trace) {
    let mut rng = DetRng::new(seed);
    let workload = Workload::plan(&plan.flows, &mut rng.child("workload"));
    let planned = workload.requests.len();
    let world = match World::build(name, &plan.world, seed, &workload) {
        Ok(world) => world,
        Err(err) => {
            let trace = Trace {
                scenario: name.to_owned(),
                seed,
                sim_error: Some(format!("building the world: {err}")),
                ..Trace::default()
            };
            return (finish(name, seed, plan, &trace, planned), trace);
        }
    };
    let mut schedule = plan.schedule.clone();
    let trace = world.run(|world| schedule.apply_due(world));
    (finish(name, seed, plan, &trace, planned), trace)
}

fn finish(name: &str, seed: u64, plan: &Plan, trace: &Trace, planned: usize) -> Report {
    let mut violations = check::check_all(trace, &plan.checks, planned);
    for extra in &plan.extra {
        violations.extend(extra(trace));
    }
    let mut report = Report {
        scenario: name.to_owned(),
        seed,
        hash: trace.hash(),
        summary: conduit_sim::summarize(trace),
        violations,
        requests: trace.requests.len(),
        sim_ms: trace.end_us / 1000,
        failure_file: None,
    };
    if !report.passed() {
        report.failure_file = write_failure(&report, plan, trace)
            .map(|p| p.display().to_string())
            .ok();
    }
    report
}

/// Where failing runs are written: `$CONDUIT_SIM_FAILURES`, else `<tmp>/conduit-sim`.
fn failure_dir() -> PathBuf {
    std::env::var_os("CONDUIT_SIM_FAILURES")
        .map_or_else(|| std::env::temp_dir().join("conduit-sim"), PathBuf::from)
}

fn write_failure(report: &Report, plan: &Plan, trace: &Trace) -> anyhow::Result<PathBuf> {
    let dir = failure_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}-{}.txt", report.scenario, report.seed));
    let mut file = std::fs::File::create(&path)?;
    writeln!(file, "scenario {} seed {}", report.scenario, report.seed)?;
    writeln!(file, "replay: {}", report.replay_command())?;
    writeln!(file, "trace hash: {}\n", report.hash)?;
    writeln!(file, "== violations")?;
    for v in &report.violations {
        writeln!(file, "{v}")?;
    }
    writeln!(file, "\n== world\n{:#?}", plan.world)?;
    writeln!(file, "\n== flows\n{:#?}", plan.flows)?;
    writeln!(file, "\n== schedule\n{}", plan.schedule)?;
    writeln!(file, "== summary\n{}", report.summary)?;
    writeln!(file, "== trace\n{}", trace.render())?;
    Ok(path)
}

/// Runs `name` at `seed` in a child process that re-executes the current test binary into the
/// test `test_name` (which must call [`child_entry`] first).
///
/// # Errors
///
/// When the child cannot run or crashes without a report.
pub fn run_isolated(test_name: &str, name: &str, seed: u64) -> anyhow::Result<Report> {
    process::run_test_child(test_name, name, seed)
}

/// In a child process started by [`run_isolated`]: runs the requested scenario, prints its
/// report and returns true. Otherwise returns false.
#[must_use]
pub fn child_entry() -> bool {
    let Some((name, seed)) = process::child_request() else {
        return false;
    };
    let report = match scenarios::find(&name) {
        Some(scenario) => run(&scenario, seed).0,
        None => Report {
            scenario: name.clone(),
            seed,
            hash: String::new(),
            summary: String::new(),
            violations: vec![Violation::new(
                "harness",
                format!("no scenario named {name}"),
            )],
            requests: 0,
            sim_ms: 0,
            failure_file: None,
        },
    };
    process::emit(&report);
    true
}

/// The seed scenario tests use: `$CONDUIT_SEED`, else `default`.
#[must_use]
pub fn test_seed(default: u64) -> u64 {
    std::env::var("CONDUIT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Whether the seed was overridden (snapshots hold only the default seeds' summaries).
#[must_use]
pub fn seed_overridden() -> bool {
    std::env::var_os("CONDUIT_SEED").is_some()
}

/// A failing report as text: seed, replay command, violations and failure file.
#[must_use]
pub fn describe_failure(report: &Report) -> String {
    let mut text = format!(
        "scenario {} failed at seed {}\n  replay: {}\n",
        report.scenario,
        report.seed,
        report.replay_command()
    );
    for v in report.violations.iter().take(20) {
        text.push_str(&format!("  {v}\n"));
    }
    if let Some(file) = &report.failure_file {
        text.push_str(&format!("  schedule and trace written to {file}\n"));
    }
    text.push_str(&format!("summary:\n{}", report.summary));
    text
}

/// `conduit sim`: what the command line asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimCommand {
    /// List the scenarios.
    List,
    /// Run one seed in this process.
    Replay {
        /// The scenario.
        scenario: String,
        /// The seed.
        seed: u64,
        /// Print the report as a child-process JSON line too.
        json: bool,
    },
    /// Run seeds `from..to` of each scenario in child processes.
    Sweep {
        /// Scenario names (all when empty).
        scenarios: Vec<String>,
        /// First seed.
        from: u64,
        /// One past the last seed.
        to: u64,
        /// Child processes at once.
        jobs: usize,
        /// The executable and arguments that run one seed with `--json`; the seed and
        /// scenario are appended as `--scenario NAME --seed N --json`.
        exe: Vec<String>,
    },
}

/// Runs a `conduit sim` command, writing to `out` (progress to stderr). Returns whether every
/// run passed.
///
/// # Errors
///
/// IO errors writing output; unknown scenario names.
pub fn cli(command: SimCommand, out: &mut dyn std::io::Write) -> anyhow::Result<bool> {
    match command {
        SimCommand::List => {
            for scenario in scenarios::all() {
                writeln!(out, "{:<36} {}", scenario.name, scenario.doc)?;
            }
            Ok(true)
        }
        SimCommand::Replay {
            scenario,
            seed,
            json,
        } => {
            let Some(found) = scenarios::find(&scenario) else {
                anyhow::bail!("no scenario named {scenario} (see `conduit sim --list`)");
            };
            let stopwatch = conduit_sim::Stopwatch::start();
            let (report, _) = run(&found, seed);
            let wall = stopwatch.elapsed();
            if json {
                process::emit(&report);
                return Ok(report.passed());
            }
            writeln!(out, "scenario {} seed {}", report.scenario, report.seed)?;
            write!(out, "{}", report.summary)?;
            writeln!(out, "sim time: {} ms", report.sim_ms)?;
            #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
            let rate = report.requests as f64 / wall.as_secs_f64().max(1e-9);
            writeln!(
                out,
                "wall time: {} ms ({rate:.0} simulated requests per wall-second)",
                wall.as_millis()
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
        SimCommand::Sweep {
            scenarios: names,
            from,
            to,
            jobs,
            exe,
        } => sweep(&names, from, to, jobs.max(1), &exe, out),
    }
}

fn sweep(
    names: &[String],
    from: u64,
    to: u64,
    jobs: usize,
    exe: &[String],
    out: &mut dyn std::io::Write,
) -> anyhow::Result<bool> {
    let selected: Vec<Scenario> = if names.is_empty() {
        scenarios::all()
    } else {
        names
            .iter()
            .map(|n| scenarios::find(n).ok_or_else(|| anyhow::anyhow!("no scenario named {n}")))
            .collect::<anyhow::Result<_>>()?
    };
    let Some((program, args)) = exe.split_first() else {
        anyhow::bail!("no executable to run seeds with");
    };
    let runs: Vec<(&'static str, u64)> = selected
        .iter()
        .flat_map(|s| (from..to).map(move |seed| (s.name, seed)))
        .collect();
    let total = runs.len();
    let mut failed = 0usize;
    let mut done = 0usize;
    let mut pending = runs.into_iter();
    let mut running: Vec<(
        &'static str,
        u64,
        std::thread::JoinHandle<anyhow::Result<Report>>,
    )> = Vec::new();
    loop {
        while running.len() < jobs {
            let Some((name, seed)) = pending.next() else {
                break;
            };
            let mut command = Command::new(program);
            command
                .args(args)
                .args(["--scenario", name, "--seed", &seed.to_string(), "--json"]);
            running.push((
                name,
                seed,
                std::thread::spawn(move || process::run(command)),
            ));
        }
        if running.is_empty() {
            break;
        }
        let (name, seed, handle) = running.remove(0);
        let result = handle
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the sweep thread panicked")));
        done += 1;
        match result {
            Ok(report) if report.passed() => {}
            Ok(report) => {
                failed += 1;
                writeln!(
                    out,
                    "\rFAIL {name} seed {seed}: {}",
                    report
                        .violations
                        .first()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                )?;
                writeln!(out, "  replay: {}", report.replay_command())?;
                if let Some(file) = &report.failure_file {
                    writeln!(out, "  schedule and trace: {file}")?;
                }
            }
            Err(err) => {
                failed += 1;
                writeln!(out, "\rFAIL {name} seed {seed}: {err}")?;
                writeln!(out, "  replay: {}", conduit_sim::replay_command(name, seed))?;
            }
        }
        progress(done, total, failed);
    }
    let mut stderr = std::io::stderr();
    let _ = writeln!(stderr);
    writeln!(out, "{done} runs, {failed} failed")?;
    Ok(failed == 0)
}

fn progress(done: usize, total: usize, failed: usize) {
    const WIDTH: usize = 40;
    let mut stderr = std::io::stderr();
    if !std::io::IsTerminal::is_terminal(&stderr) {
        // A log file or CI: a line per tenth of the sweep instead of a redrawn bar.
        let step = (total / 10).max(1);
        if done.is_multiple_of(step) || done == total {
            let _ = writeln!(stderr, "{done}/{total} runs ({failed} failed)");
        }
        return;
    }
    let filled = WIDTH * done / total.max(1);
    let bar: String = "#".repeat(filled) + &"-".repeat(WIDTH - filled);
    let _ = write!(stderr, "\r[{bar}] {done}/{total} ({failed} failed)");
    let _ = stderr.flush();
}

/// Milliseconds, for scenario definitions.
#[must_use]
pub const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Seconds, for scenario definitions.
#[must_use]
pub const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
