//! `conduit sim`: list the deterministic scenarios, replay one seed, or sweep many (`--all`:
//! every scenario).
//!
//! The work is `conduit_scenarios::sim::cli`; this module parses arguments and runs it on a
//! plain thread (each simulation builds its own runtimes, so it must not run inside the
//! command's tokio runtime). A sweep re-executes this binary once per seed (one seed per
//! process), with `--json` so the child's report can be read back.

use std::io::Write as _;

use conduit_scenarios::sim::{SimCommand, cli};

/// `conduit sim` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct SimArgs {
    /// List the scenarios, one per line, name first.
    #[arg(long)]
    list: bool,
    /// The scenario to run (repeat for a sweep; a sweep without it runs every scenario).
    #[arg(long)]
    scenario: Vec<String>,
    /// Sweep every registered scenario over `--seeds` (one progress bar, then a table per
    /// scenario and every failure's replay command).
    #[arg(long, requires = "seeds", conflicts_with = "scenario")]
    all: bool,
    /// Replay one seed and print its summary and trace hash.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Sweep seeds `A..B` (B excluded), each in its own process, with a progress bar; every
    /// failing seed is printed with the command that replays it, and a table per scenario
    /// (runs, failures, seeds per second) ends the sweep.
    #[arg(long, value_parser = parse_seeds)]
    seeds: Option<(u64, u64)>,
    /// Seeds run at once during a sweep.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Print the report as one JSON line (what a sweep reads from its children).
    #[arg(long, hide = true)]
    json: bool,
}

fn parse_seeds(text: &str) -> Result<(u64, u64), String> {
    let (a, b) = text
        .split_once("..")
        .ok_or_else(|| format!("expected A..B, got {text:?}"))?;
    let a: u64 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u64 = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if b <= a {
        return Err(format!("empty range {a}..{b}"));
    }
    Ok((a, b))
}

/// Runs the command on its own thread.
pub(crate) fn run(args: SimArgs) -> anyhow::Result<()> {
    std::thread::spawn(move || run_here(args))
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the simulation thread panicked")))
}

fn run_here(args: SimArgs) -> anyhow::Result<()> {
    let command = if args.list {
        SimCommand::List
    } else if let Some((from, to)) = args.seeds {
        let exe = std::env::current_exe()?;
        SimCommand::Sweep {
            // `--all`, or no `--scenario`: every registered scenario.
            scenarios: if args.all { Vec::new() } else { args.scenario },
            from,
            to,
            jobs: args.jobs,
            exe: vec![exe.display().to_string(), "sim".to_owned()],
        }
    } else {
        let (Some(scenario), Some(seed)) = (args.scenario.first(), args.seed) else {
            anyhow::bail!(
                "give --list, --scenario NAME --seed N, or --seeds A..B (with --all or --scenario NAME)"
            );
        };
        SimCommand::Replay {
            scenario: scenario.clone(),
            seed,
            json: args.json,
        }
    };
    let mut stdout = std::io::stdout().lock();
    let passed = cli(command, &mut stdout)?;
    stdout.flush()?;
    if passed {
        Ok(())
    } else {
        anyhow::bail!("invariants failed (see above)")
    }
}
