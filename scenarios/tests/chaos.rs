//! Swarm chaos: a fixed sweep of seeds breaks no invariant, and a defect planted in the proxy
//! is caught by a sweep, shrunk to a few faults, and caught again when its file is replayed.
//!
//! Each seed runs in a child process (this test binary re-executed into the same test, with
//! the case named in `CONDUIT_CHAOS_CASE`), as `conduit chaos` runs its seeds.

use std::path::PathBuf;

use conduit_chaos::swarm::{Case, FaultKind};
use conduit_proxy::observe::PlantedFault;
use conduit_scenarios::chaos::{self, Runner, Sweep};

/// A fresh output directory for one test's sweep.
fn out_dir(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("conduit-chaos-test-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

const SWARM: &str = "fifty_swarm_seeds_break_no_invariant";

/// Seeds 0..50: every fault kind is on in some of them, and no invariant breaks (safety
/// throughout, every request succeeding from two seconds after the chaos phase).
#[test]
fn fifty_swarm_seeds_break_no_invariant() {
    if chaos::child_entry(&|_| {}) {
        return;
    }
    let out = out_dir(SWARM);
    let report = chaos::sweep(
        &Sweep {
            from: 0,
            to: 50,
            jobs: 2,
            out: out.clone(),
            shrink_budget: 20,
            progress: false,
        },
        &Runner::Test(SWARM.to_owned()),
    )
    .expect("the sweep runs");
    assert_eq!(report.runs, 50);
    assert!(report.failures.is_empty(), "{}", report.render());
    for kind in FaultKind::ALL {
        assert!(
            report.kinds.get(&kind.to_string()).copied().unwrap_or(0) > 0,
            "no seed turned {kind} on:\n{}",
            report.render()
        );
    }
    assert!(report.requests > 10_000, "{}", report.render());
    assert!(out.join("report.json").exists() && out.join("report.txt").exists());
    let _ = std::fs::remove_dir_all(&out);
}

const PLANTED: &str = "a_planted_resend_is_caught_shrunk_and_replayed";

/// The planted defect: an attempt whose upstream connection failed after the request was
/// written counts as unprocessed and is sent again. A POST that a replica read and then reset
/// (or crashed on) reaches an app twice: the at-most-once invariant breaks. The sweep finds
/// such a seed, shrinks it to a case of at most five faults and fault points (most to one),
/// and the shrunk file replayed fails the same way.
#[test]
fn a_planted_resend_is_caught_shrunk_and_replayed() {
    let plant = |plan: &mut conduit_scenarios::plan::Plan| {
        plan.world.planted = Some(PlantedFault::ResendMaybeProcessed);
    };
    if chaos::child_entry(&plant) {
        return;
    }
    let out = out_dir(PLANTED);
    let runner = Runner::Test(PLANTED.to_owned());
    let report = chaos::sweep(
        &Sweep {
            from: 0,
            to: 24,
            jobs: 2,
            out: out.clone(),
            shrink_budget: 150,
            progress: false,
        },
        &runner,
    )
    .expect("the sweep runs");
    // The figures (caught seeds, shrink ratios), for `cargo test -- --nocapture`.
    println!("{}", report.render());
    let caught: Vec<_> = report
        .failures
        .iter()
        .filter(|f| f.check == "at-most-once")
        .collect();
    assert!(
        !caught.is_empty(),
        "the planted resend went unnoticed:\n{}",
        report.render()
    );
    // Only the planted defect fails runs: the same seeds pass without it (the swarm test).
    assert_eq!(caught.len(), report.failures.len(), "{}", report.render());
    let mut smallest = usize::MAX;
    for failure in caught {
        let shrunk_file = failure.shrunk_file.as_ref().unwrap_or_else(|| {
            panic!("seed {} was not shrunk:\n{}", failure.seed, report.render())
        });
        let shrunk = chaos::read_case(shrunk_file.as_ref()).expect("the shrunk case reads");
        let original = Case::draw(failure.seed);
        let (before, after) = (failure.size, failure.shrunk_size.expect("a shrunk size"));
        // A few faults: at most five faults and fault points in all (a resend needs a crash
        // or reset at the right moment, and some seeds only fail with the faults around it
        // that set up that moment).
        assert!(
            shrunk.faults.len() + shrunk.fault_points.len() <= 5,
            "seed {}: shrunk to {} faults and {} fault points:\n{}",
            failure.seed,
            shrunk.faults.len(),
            shrunk.fault_points.len(),
            report.render()
        );
        smallest = smallest.min(shrunk.faults.len() + shrunk.fault_points.len());
        assert!(
            after < before,
            "seed {}: {before:?} -> {after:?}",
            failure.seed
        );
        assert!(shrunk.topology.hosts() <= original.topology.hosts());
        // Replayed from its file, the shrunk case fails the same way.
        let replayed = runner.run(shrunk_file).expect("the replay reports");
        assert!(
            replayed
                .violations
                .iter()
                .any(|v| v.check == "at-most-once"),
            "seed {}: the shrunk case passed when replayed: {:#?}",
            failure.seed,
            replayed.violations
        );
    }
    // And the usual case is one fault: the crash or reset that cuts a request short.
    assert!(smallest <= 1, "no caught seed shrank to a single fault");
    let _ = std::fs::remove_dir_all(&out);
}
