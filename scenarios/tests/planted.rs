//! The checks catch what they claim to: a defect planted in every proxy (behind the proxy's
//! `planted-faults` feature, which only these tests enable) must fail the run, with the check
//! that names it.
//!
//! Method: the planted run happens in a child process (one seed per process), as the scenario
//! tests do; the parent asserts on its report. The same seed without the defect passes (the
//! scenario tests run it).

use conduit_proxy::observe::PlantedFault;
use conduit_scenarios::{scenarios, sim};
use conduit_sim::process;

const TEST: &str = "a_stale_resolution_among_overlapping_sets_is_caught";

/// A balancer that, after applying `web-1` alone (which the initial four-replica version also
/// lists), applies the initial version's endpoints again: the configuration-order check
/// reports the proxy applying v1 after v2, although every backend that answered was an
/// endpoint of some version.
#[test]
fn a_stale_resolution_among_overlapping_sets_is_caught() {
    if let Some((name, seed)) = process::child_request() {
        let scenario = scenarios::find(&name).expect("a registered scenario");
        let mut plan = (scenario.plan)(seed);
        plan.world.planted = Some(PlantedFault::StaleResolution);
        let (report, _) = sim::run_plan(&name, &plan, seed);
        process::emit(&report);
        return;
    }
    for seed in [715, 5189] {
        let report = process::run_test_child(TEST, "config_never_out_of_order", seed)
            .expect("the planted run reports");
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.check == "config-order" && v.message.contains("applied config v1")),
            "seed {seed}: the planted stale resolution went unnoticed: {:#?}",
            report.violations
        );
    }
}
