//! One seed per process.
//!
//! Several simulations in one process are not reproducible (turmoil.md §3: process-global
//! tokio state changes the order in which a crashed host's sockets close), and `cargo test`
//! runs tests as threads of one process. So a test (or the CLI's sweep) re-executes its own
//! binary with [`CHILD_ENV`] naming the scenario and seed; the child runs exactly that one
//! simulation and prints its [`Report`] as one JSON line after [`REPORT_PREFIX`], which the
//! parent reads back.

use std::io::Write as _;
use std::process::Command;

use anyhow::Context as _;

use crate::Report;

/// `SCENARIO:SEED` in a child process.
pub const CHILD_ENV: &str = "CONDUIT_SIM_CHILD";

/// The line prefix of a child's report on stdout.
pub const REPORT_PREFIX: &str = "CONDUIT_SIM_REPORT ";

/// In a child process: the scenario and seed it must run.
#[must_use]
pub fn child_request() -> Option<(String, u64)> {
    let value = std::env::var(CHILD_ENV).ok()?;
    let (scenario, seed) = value.rsplit_once(':')?;
    Some((scenario.to_owned(), seed.parse().ok()?))
}

/// Prints `report` for the parent.
pub fn emit(report: &Report) {
    let json = serde_json::to_string(report).unwrap_or_default();
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "\n{REPORT_PREFIX}{json}");
    let _ = stdout.flush();
}

/// Runs `command` (already set up to run one seed and [`emit`] its report) and reads the report.
///
/// # Errors
///
/// When the child cannot be started, or exits without a report (it crashed or panicked: its
/// stderr is included).
pub fn run(mut command: Command) -> anyhow::Result<Report> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in stdout.lines() {
        // libtest may print `test name ... ` before it on the same line.
        if let Some(start) = line.find(REPORT_PREFIX) {
            let json = &line[start + REPORT_PREFIX.len()..];
            return serde_json::from_str(json).context("reading the child's report");
        }
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: String = stderr
        .lines()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    anyhow::bail!(
        "the child process ({}) printed no report; stderr tail:\n{tail}",
        output.status
    )
}

/// Re-executes the current test binary to run `scenario` at `seed` in the test named
/// `test_name` (which must call the scenario's child entry when [`child_request`] is set).
///
/// # Errors
///
/// As [`run`].
pub fn run_test_child(test_name: &str, scenario: &str, seed: u64) -> anyhow::Result<Report> {
    let exe = std::env::current_exe().context("finding the test binary")?;
    let mut command = Command::new(exe);
    command
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{scenario}:{seed}"));
    run(command)
}
