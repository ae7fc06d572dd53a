//! Running scenarios: one seed in this process ([`run`]), one seed in a child process
//! ([`run_isolated`], what tests and sweeps use), and the `conduit sim` command ([`cli`]).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use conduit_core::rand::DetRng;
use conduit_sim::check::{self, Violation};
use conduit_sim::{Report, Trace, Workload, World, process};

pub use crate::plan::{ExtraCheck, Plan, ms, secs};
use crate::scenarios::{self, Scenario};

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
    /// Run seeds `from..to` of each scenario in child processes, then print a table per
    /// scenario (runs, failures, seeds per second) and every failure's replay command.
    Sweep {
        /// Scenario names (every registered scenario when empty).
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

/// One scenario's share of a sweep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepRow {
    /// The scenario.
    pub scenario: &'static str,
    /// Seeds run.
    pub runs: usize,
    /// Seeds that failed (an invariant broke, or the child produced no report).
    pub failed: usize,
    /// Wall time its runs took, summed over the runs (each in its own process).
    pub wall: Duration,
}

/// A failed seed of a sweep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SweepFailure {
    /// The scenario.
    pub scenario: &'static str,
    /// The seed.
    pub seed: u64,
    /// The first broken invariant, or why the run produced no report.
    pub reason: String,
}

/// The sweep's summary: a row per scenario (runs, failures, seeds per second of one job's
/// time, which does not depend on `--jobs`), a total over `wall` (the sweep's own wall time,
/// which does), then every failure with the command that replays it.
#[must_use]
pub fn render_sweep(rows: &[SweepRow], failures: &[SweepFailure], wall: Duration) -> String {
    #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
    let rate = |runs: usize, wall: Duration| runs as f64 / wall.as_secs_f64().max(1e-9);
    let mut out = format!(
        "{:<36} {:>7} {:>7} {:>9} {:>8}\n",
        "scenario", "runs", "failed", "wall s", "seeds/s"
    );
    for row in rows {
        out.push_str(&format!(
            "{:<36} {:>7} {:>7} {:>9.1} {:>8.1}\n",
            row.scenario,
            row.runs,
            row.failed,
            row.wall.as_secs_f64(),
            rate(row.runs, row.wall)
        ));
    }
    let runs: usize = rows.iter().map(|r| r.runs).sum();
    let failed: usize = rows.iter().map(|r| r.failed).sum();
    out.push_str(&format!(
        "{:<36} {:>7} {:>7} {:>9.1} {:>8.1}\n",
        "total (sweep wall time)",
        runs,
        failed,
        wall.as_secs_f64(),
        rate(runs, wall)
    ));
    if !failures.is_empty() {
        out.push_str("\nfailures:\n");
        for f in failures {
            out.push_str(&format!(
                "{} seed {}: {}\n  replay: {}\n",
                f.scenario,
                f.seed,
                f.reason,
                conduit_sim::replay_command(f.scenario, f.seed)
            ));
        }
    }
    out.push_str(&format!("{runs} runs, {failed} failed\n"));
    out
}

fn sweep(
    names: &[String],
    from: u64,
    to: u64,
    jobs: usize,
    exe: &[String],
    out: &mut dyn std::io::Write,
) -> anyhow::Result<bool> {
    type Running = (
        &'static str,
        u64,
        std::thread::JoinHandle<(anyhow::Result<Report>, Duration)>,
    );
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
    let mut rows: Vec<SweepRow> = selected
        .iter()
        .map(|s| SweepRow {
            scenario: s.name,
            runs: 0,
            failed: 0,
            wall: Duration::ZERO,
        })
        .collect();
    let runs: Vec<(usize, &'static str, u64)> = selected
        .iter()
        .enumerate()
        .flat_map(|(i, s)| (from..to).map(move |seed| (i, s.name, seed)))
        .collect();
    let total = runs.len();
    let stopwatch = conduit_sim::Stopwatch::start();
    let mut failures = Vec::new();
    let mut done = 0usize;
    let mut pending = runs.into_iter();
    let mut running: Vec<(usize, Running)> = Vec::new();
    loop {
        while running.len() < jobs {
            let Some((row, name, seed)) = pending.next() else {
                break;
            };
            let mut command = Command::new(program);
            command
                .args(args)
                .args(["--scenario", name, "--seed", &seed.to_string(), "--json"]);
            let handle = std::thread::spawn(move || {
                let stopwatch = conduit_sim::Stopwatch::start();
                let report = process::run(command);
                (report, stopwatch.elapsed())
            });
            running.push((row, (name, seed, handle)));
        }
        if running.is_empty() {
            break;
        }
        let (row, (name, seed, handle)) = running.remove(0);
        let (result, wall) = handle.join().unwrap_or_else(|_| {
            (
                Err(anyhow::anyhow!("the sweep thread panicked")),
                Duration::ZERO,
            )
        });
        done += 1;
        rows[row].runs += 1;
        rows[row].wall += wall;
        let (reason, file) = match result {
            Ok(report) if report.passed() => (None, None),
            Ok(report) => (
                Some(
                    report
                        .violations
                        .first()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                ),
                report.failure_file,
            ),
            Err(err) => (Some(format!("{err:#}")), None),
        };
        if let Some(reason) = reason {
            rows[row].failed += 1;
            writeln!(out, "\rFAIL {name} seed {seed}: {reason}")?;
            writeln!(out, "  replay: {}", conduit_sim::replay_command(name, seed))?;
            if let Some(file) = file {
                writeln!(out, "  schedule and trace: {file}")?;
            }
            failures.push(SweepFailure {
                scenario: name,
                seed,
                reason,
            });
        }
        progress(done, total, failures.len());
    }
    let mut stderr = std::io::stderr();
    let _ = writeln!(stderr);
    write!(
        out,
        "{}",
        render_sweep(&rows, &failures, stopwatch.elapsed())
    )?;
    Ok(failures.is_empty())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_ends_with_a_row_per_scenario_and_every_failures_replay_command() {
        let rows = [
            SweepRow {
                scenario: "endpoint_churn",
                runs: 2000,
                failed: 0,
                wall: Duration::from_secs(400),
            },
            SweepRow {
                scenario: "random_chaos",
                runs: 2000,
                failed: 1,
                wall: Duration::from_secs(250),
            },
        ];
        let failures = [SweepFailure {
            scenario: "random_chaos",
            seed: 17,
            reason: "[liveness] request 9 failed".into(),
        }];
        let text = render_sweep(&rows, &failures, Duration::from_secs(650));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..4],
            [
                "scenario                                runs  failed    wall s  seeds/s",
                "endpoint_churn                          2000       0     400.0      5.0",
                "random_chaos                            2000       1     250.0      8.0",
                "total (sweep wall time)                 4000       1     650.0      6.2",
            ]
        );
        assert!(text.contains(
            "random_chaos seed 17: [liveness] request 9 failed\n  replay: cargo run -p conduit-cli -- sim --scenario random_chaos --seed 17\n"
        ));
        assert!(text.ends_with("4000 runs, 1 failed\n"));
    }
}
