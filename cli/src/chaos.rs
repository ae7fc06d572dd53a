//! `conduit chaos`: swarm chaos runs in the deterministic simulation. Each seed draws a
//! topology, the fault kinds that are on, their rates and schedule; a sweep runs many seeds
//! (each in its own process), shrinks every failing one and writes a report.
//!
//! The work is `conduit_scenarios::chaos::cli`; this module parses arguments and runs it on a
//! plain thread (each simulation builds its own runtimes). A sweep re-executes this binary once
//! per seed or shrink candidate, with `--json` so the child's report can be read back.
//! `--real` breaks real processes on loopback instead ([`crate::chaos_real`]).

use std::io::Write as _;
use std::path::PathBuf;

use conduit_chaos::swarm::Case;
use conduit_scenarios::chaos::{ChaosCommand, Runner, Sweep, cli, read_case};

/// `conduit chaos` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct ChaosArgs {
    /// Sweep seeds `A..B` (B excluded), each in its own process, with a progress bar; then a
    /// report (`report.txt`, `report.json`) with every failing seed, shrunk, and the command
    /// that replays it.
    #[arg(long, value_parser = parse_seeds, conflicts_with_all = ["seed", "replay"])]
    seeds: Option<(u64, u64)>,
    /// Run one seed's case here and print what it picked and how it went.
    #[arg(long, conflicts_with = "replay")]
    seed: Option<u64>,
    /// Run a case file again (a sweep's `seed-N.case.json` or `seed-N.shrunk.json`).
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Seeds run at once during a sweep.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Where a sweep writes its report and failing cases.
    #[arg(long, default_value = "conduit-chaos")]
    out: PathBuf,
    /// Runs a failing seed's shrink may spend (0: do not shrink).
    #[arg(long, default_value_t = 60)]
    shrink: usize,
    /// Print the report as one JSON line (what a sweep reads from its children).
    #[arg(long, hide = true)]
    json: bool,
    /// Break real processes on loopback instead: a controller, three replicas (an app and its
    /// proxy each) and a client proxy, with a seeded TCP fault proxy on each link (kills and
    /// restarts, SIGSTOP and SIGCONT, latency, bandwidth, drops, resets, black holes), under
    /// open-loop traffic; `--seed` picks the schedule. Writes `<out>/real/report.json`.
    #[arg(long, conflicts_with_all = ["seeds", "replay"])]
    real: bool,
    /// How long a `--real` run sends traffic (faults strike in its first 60 %).
    #[arg(long, value_parser = crate::parse_duration, default_value = "20s", requires = "real")]
    duration: std::time::Duration,
    /// Requests per second a `--real` run sends through the client proxy.
    #[arg(long, default_value_t = 200, requires = "real")]
    rate: u32,
    /// Where `conduit-proxy` and `conduit-controller` are (default: beside this executable).
    #[arg(long, requires = "real")]
    bin_dir: Option<PathBuf>,
    /// Also put each host of a `--real` run (the client, the controller, each replica) in a
    /// network namespace of its own behind a router namespace, and add partitions (both ways
    /// and one way), packet loss and TCP resets made with iptables. Needs root, iproute2 and
    /// iptables; every namespace is deleted at the end.
    #[arg(long, requires = "real")]
    netns: bool,
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

/// Runs the command: `--real` on this runtime, a simulation on its own thread.
pub(crate) async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    if args.real {
        let passed = crate::chaos_real::run(crate::chaos_real::RealOptions {
            seed: args.seed.unwrap_or(1),
            duration: args.duration,
            rate: args.rate,
            out: args.out.join("real"),
            bin_dir: args.bin_dir,
            netns: args.netns,
        })
        .await?;
        return if passed {
            Ok(())
        } else {
            anyhow::bail!("invariants failed (see above)")
        };
    }
    std::thread::spawn(move || run_here(args))
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the simulation thread panicked")))
}

fn run_here(args: ChaosArgs) -> anyhow::Result<()> {
    let command = if let Some((from, to)) = args.seeds {
        let exe = std::env::current_exe()?;
        ChaosCommand::Sweep(
            Sweep {
                from,
                to,
                jobs: args.jobs.max(1),
                out: args.out,
                shrink_budget: args.shrink,
                progress: true,
            },
            Runner::Exe(vec![exe.display().to_string(), "chaos".to_owned()]),
        )
    } else if let Some(file) = args.replay {
        ChaosCommand::One {
            case: Box::new(read_case(&file)?),
            json: args.json,
        }
    } else if let Some(seed) = args.seed {
        ChaosCommand::One {
            case: Box::new(Case::draw(seed)),
            json: args.json,
        }
    } else {
        anyhow::bail!("give --seeds A..B (a sweep), --seed N or --replay FILE");
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
