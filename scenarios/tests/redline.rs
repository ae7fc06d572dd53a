//! The red-line search in the simulation: against replicas with a modelled capacity, through
//! the real client proxy, in simulated time.

use std::time::Duration;

use conduit_core::balance::Policy;
use conduit_scenarios::redline::Ending;
use conduit_scenarios::redline_sim::{self, SimRedline};

/// Goal: the red line measures capacity. Method: 3 replicas, each serving 4 requests at once
/// at 10 ms each (1,200 requests/s in all); the search's red line under p99 < 100 ms is within
/// 10 % below that capacity (the search stops within 5 %) and at most 5 % above it (a queue
/// that grows for one 2-s step at 5 % over capacity stays under 100 ms), and the same seed
/// gives the same search, step for step. Measured: 1,200.
#[test]
fn a_three_replica_service_holds_its_modelled_capacity() {
    let spec = SimRedline::new(3, 4, Duration::from_millis(10));
    let capacity = spec.capacity();
    assert!((capacity - 1_200.0).abs() < 1e-6);
    let first = redline_sim::run(&spec, 1).unwrap();
    assert_eq!(first.outcome.ending, Ending::Knee, "{:#?}", first.steps);
    let red_line = f64::from(first.outcome.red_line.unwrap());
    assert!(
        (0.9 * capacity..=1.05 * capacity).contains(&red_line),
        "red line {red_line} for a capacity of {capacity}: {:#?}",
        first.steps
    );
    let again = redline_sim::run(&spec, 1).unwrap();
    assert_eq!(
        again.outcome, first.outcome,
        "the same seed, the same red line"
    );
    assert_eq!(again.steps, first.steps, "and the same steps");
}

/// Goal: latency-aware balancing keeps a service's red line when one replica is slow, and
/// round robin does not. Method: 3 replicas of 4 at once, two at 10 ms and one at 50 ms (880
/// requests/s in all); round robin gives the slow one a third of the load, so the service
/// breaks when that replica does (240 requests/s); PeakEWMA sends it less and holds more
/// than three times that, within 10 % of the service's capacity. Measured: 243 and 875.
#[test]
fn latency_aware_balancing_holds_a_higher_red_line_than_round_robin() {
    let mut spec = SimRedline::new(3, 4, Duration::from_millis(10));
    spec.service_times = vec![
        Duration::from_millis(10),
        Duration::from_millis(10),
        Duration::from_millis(50),
    ];
    let aware = redline_sim::run(&spec, 2).unwrap();
    spec.policy = Policy::RoundRobin;
    let round_robin = redline_sim::run(&spec, 2).unwrap();
    let (aware, rr) = (
        aware.outcome.red_line.unwrap(),
        round_robin.outcome.red_line.unwrap(),
    );
    assert!(
        (216..=252).contains(&rr),
        "round robin holds what the slow replica's third allows (240): {rr}"
    );
    assert!(aware > 3 * rr, "latency-aware {aware} vs round robin {rr}");
    assert!(
        f64::from(aware) >= 0.9 * spec.capacity(),
        "latency-aware {aware} of {}",
        spec.capacity()
    );
}

/// Goal: the generator's h2 and gRPC paths run in the simulation too, and measure the same
/// capacity. Method: the three-replica service of the first test, searched with unary gRPC
/// calls over h2c (the simulated app answers them with grpc-status 0); the red line is within
/// the same bounds of 1,200 requests/s.
#[test]
fn grpc_calls_find_the_same_capacity() {
    let mut spec = SimRedline::new(3, 4, Duration::from_millis(10));
    spec.protocol = conduit_scenarios::load::Protocol::Grpc;
    let found = redline_sim::run(&spec, 3).unwrap();
    assert_eq!(found.outcome.ending, Ending::Knee, "{:#?}", found.steps);
    let red_line = f64::from(found.outcome.red_line.unwrap());
    let capacity = spec.capacity();
    assert!(
        (0.9 * capacity..=1.05 * capacity).contains(&red_line),
        "red line {red_line} for a capacity of {capacity}: {:#?}",
        found.steps
    );
    let first = &found.steps[0].step;
    assert_eq!(
        first.successes, first.requests,
        "every call succeeded: {first:?}"
    );
}
