//! The determinism meta-test: the same seed gives the same trace hash in separate processes,
//! and different seeds give different traces (which catches an unseeded simulation).
//!
//! Method: each (scenario, seed) runs twice, each time in a fresh child process (this test
//! binary re-executed); the hashes must be equal. Seeds 1 and 2 of each scenario must differ.
//! The scenarios chosen cover every protocol, host crashes and restarts, GOAWAY, the
//! seed-drawn fault mix, the real controller and Destination client (with a controller crash
//! and reconnect), a meshed world (identities certified by the controller's CA over the
//! Identity API, mTLS between every pair of proxies), and short-lived certificates expiring
//! while the controller is down, then renewed through the proxies' jittered retry backoff.
//! Key generation, certificates and TLS handshakes draw from the world's seeded crypto
//! (`conduit_sim::crypto`): the certificates each proxy held, fingerprints included, are in the
//! trace, so a key, serial or signature drawn from the OS would fail this test (the bytes of a
//! whole handshake are checked in that module's own tests).

use conduit_scenarios::sim;

const TEST: &str = "same_seed_same_trace_in_separate_processes";

#[test]
fn same_seed_same_trace_in_separate_processes() {
    if sim::child_entry() {
        return;
    }
    let scenarios = [
        "protocols_through_two_proxies",
        "h2_goaway_on_restart",
        "random_chaos",
        "controller_crash",
        "mtls_mesh",
        "mtls_expiry_while_controller_down",
    ];
    let mut failures = Vec::new();
    for scenario in scenarios {
        let mut hashes = Vec::new();
        for seed in [1u64, 2, 3] {
            let first = sim::run_isolated(TEST, scenario, seed).expect("first run");
            let second = sim::run_isolated(TEST, scenario, seed).expect("second run");
            if first.hash != second.hash {
                failures.push(format!(
                    "{scenario} seed {seed}: {} then {} (replay: {})",
                    first.hash,
                    second.hash,
                    first.replay_command()
                ));
            }
            hashes.push(first.hash);
        }
        if hashes[0] == hashes[1] {
            failures.push(format!(
                "{scenario}: seeds 1 and 2 gave the same trace {}",
                hashes[0]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "nondeterminism:\n{}",
        failures.join("\n")
    );
}
