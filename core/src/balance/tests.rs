use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use proptest::prelude::*;

use super::*;
use crate::rand::DetRng;
use crate::time::ms;

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 8000 + i))
}

fn endpoints(n: u16) -> Vec<Endpoint> {
    (0..n).map(|i| Endpoint::new(addr(i))).collect()
}

fn balancer_with(n: u16, policy: Policy) -> Balancer {
    let mut balancer = Balancer::new(BalanceConfig {
        policy,
        ..BalanceConfig::default()
    });
    let update = Update {
        version: 1,
        change: Change::Replace(endpoints(n)),
    };
    balancer.handle_update(Instant::ZERO, update).unwrap();
    balancer
}

const T0: Instant = Instant::ZERO;

#[test]
fn discovery_states_are_distinct() {
    let mut b = Balancer::new(BalanceConfig::default());
    let mut rng = DetRng::new(1);
    assert_eq!(b.discovery(), Discovery::Unknown);
    assert!(b.pick(T0, &mut rng).is_none());
    b.handle_update(
        T0,
        Update {
            version: 1,
            change: Change::NoEndpoints,
        },
    )
    .unwrap();
    assert_eq!(b.discovery(), Discovery::NoEndpoints);
    b.handle_update(
        T0,
        Update {
            version: 2,
            change: Change::Add(endpoints(2)),
        },
    )
    .unwrap();
    assert_eq!(b.discovery(), Discovery::Endpoints);
    assert_eq!(b.ready_len(), 2);
    b.handle_update(
        T0,
        Update {
            version: 3,
            change: Change::Remove(vec![addr(0), addr(1)]),
        },
    )
    .unwrap();
    assert_eq!(b.discovery(), Discovery::NoEndpoints);
}

#[test]
fn versions_never_go_backwards() {
    let mut b = balancer_with(2, Policy::PeakEwma);
    let stale = Update {
        version: 1,
        change: Change::NoEndpoints,
    };
    assert_eq!(
        b.handle_update(T0, stale),
        Err(StaleUpdate { current: 1, got: 1 })
    );
    assert_eq!(b.len(), 2, "a stale update changes nothing");
    assert_eq!(b.stats().stale_updates, 1);
    b.handle_update(
        T0,
        Update {
            version: 5,
            change: Change::Remove(vec![addr(0)]),
        },
    )
    .unwrap();
    assert_eq!(b.version(), Some(5));
    let older = Update {
        version: 4,
        change: Change::Add(endpoints(3)),
    };
    assert!(b.handle_update(T0, older).is_err());
    assert_eq!(b.len(), 1);
}

#[test]
fn replace_keeps_survivors_state() {
    let mut b = balancer_with(3, Policy::PeakEwma);
    let mut rng = DetRng::new(1);
    let held = b.pick(T0, &mut rng).unwrap();
    let survivor = held.addr;
    let mut next: Vec<Endpoint> = vec![Endpoint::new(survivor), Endpoint::new(addr(9))];
    next[0].weight = 7;
    b.handle_update(
        T0,
        Update {
            version: 2,
            change: Change::Replace(next),
        },
    )
    .unwrap();
    assert_eq!(b.len(), 2);
    assert_eq!(
        b.in_flight(survivor),
        Some(1),
        "in-flight survives a replace"
    );
    let view: Vec<_> = b
        .endpoints(T0)
        .map(|v| (v.endpoint.addr, v.endpoint.weight))
        .collect();
    assert!(
        view.contains(&(survivor, 7)),
        "metadata updated in place: {view:?}"
    );
}

#[test]
fn in_flight_settles_on_drop_and_ignores_old_incarnations() {
    let mut b = balancer_with(1, Policy::PeakEwma);
    let mut rng = DetRng::new(1);
    let first = b.pick(T0, &mut rng).unwrap();
    let second = b.pick(T0, &mut rng).unwrap();
    assert_eq!(b.in_flight(addr(0)), Some(2));
    drop(first);
    assert_eq!(b.in_flight(addr(0)), Some(1));
    // Remove and re-add the endpoint: the old handle belongs to the old incarnation.
    b.handle_update(
        T0,
        Update {
            version: 2,
            change: Change::Remove(vec![addr(0)]),
        },
    )
    .unwrap();
    b.handle_update(
        T0,
        Update {
            version: 3,
            change: Change::Add(endpoints(1)),
        },
    )
    .unwrap();
    assert_eq!(b.in_flight(addr(0)), Some(0));
    let before = b.endpoints(T0).next().unwrap().rtt_estimate;
    b.observe(T0 + ms(900), &second.in_flight);
    assert_eq!(
        b.endpoints(T0).next().unwrap().rtt_estimate,
        before,
        "stale observation ignored"
    );
    drop(second);
    assert_eq!(b.in_flight_total(), 0);
}

#[test]
fn peak_ewma_jumps_up_and_decays_down() {
    let decay = Duration::from_secs(10);
    let mut ewma = PeakEwma::new(T0, ms(30), decay);
    assert_eq!(ewma.estimate(T0), ms(30));
    ewma.observe(T0, ms(300));
    assert_eq!(
        ewma.estimate(T0),
        ms(300),
        "a slower observation replaces the estimate"
    );
    // One time constant later the estimate has decayed by e.
    let later = ewma.estimate(T0 + decay);
    let expected = 300.0 / core::f64::consts::E;
    assert!(
        (later.as_secs_f64() * 1000.0 - expected).abs() < 0.01,
        "{later:?}"
    );
    // A faster observation blends in rather than replacing.
    let mut blend = PeakEwma::new(T0, ms(100), decay);
    blend.observe(T0 + ms(1000), ms(10));
    let est = blend.estimate(T0 + ms(1000));
    assert!(est > ms(10) && est < ms(100), "{est:?}");
}

#[test]
fn a_steady_rtt_is_what_the_estimate_converges_to() {
    // Observations of 3 ms every 10 ms for two minutes: the estimate settles at 3 ms, not below.
    let mut ewma = PeakEwma::new(T0, ms(30), Duration::from_secs(10));
    let mut now = T0;
    for _ in 0..12_000 {
        now += ms(10);
        ewma.observe(now, ms(3));
    }
    let settled = ewma.estimate(now).as_secs_f64() * 1000.0;
    assert!((settled - 3.0).abs() < 0.05, "settled at {settled} ms");
}

#[test]
fn two_idle_endpoints_share_light_traffic() {
    // Light serial traffic (nothing overlaps) still reaches both endpoints: an endpoint that is
    // not picked decays toward zero cost and is tried again.
    let mut b = balancer_with(2, Policy::PeakEwma);
    let counts = simulate(&mut b, 3, T0, Duration::from_secs(20), ms(10), &|_, _| {
        ms(3)
    });
    let first = share(&counts, addr(0));
    assert!((0.3..0.7).contains(&first), "share {first}");
}

#[test]
fn drained_endpoints_are_never_picked() {
    let mut eps = endpoints(3);
    eps[1].weight = 0;
    let mut b = Balancer::new(BalanceConfig::default());
    b.handle_update(
        T0,
        Update {
            version: 1,
            change: Change::Replace(eps),
        },
    )
    .unwrap();
    assert_eq!(b.ready_len(), 2);
    let mut rng = DetRng::new(3);
    for _ in 0..1000 {
        assert_ne!(b.pick(T0, &mut rng).unwrap().addr, addr(1));
    }
}

#[test]
fn connect_errors_back_off_exponentially_then_recover() {
    let mut b = balancer_with(2, Policy::PeakEwma);
    let mut rng = DetRng::new(1);
    b.handle_connect_error(T0, addr(0), &mut rng);
    assert_eq!(b.ready_len(), 1);
    let first = b.poll_timeout().unwrap();
    assert!(first >= T0 + ms(100) && first <= T0 + ms(110), "{first:?}");
    for _ in 0..100 {
        assert_eq!(b.pick(T0, &mut rng).unwrap().addr, addr(1));
    }
    b.handle_timeout(first - ms(1));
    assert_eq!(b.ready_len(), 1, "not before the backoff ends");
    b.handle_timeout(first);
    assert_eq!(b.ready_len(), 2);
    assert!(b.poll_timeout().is_none());
    // The second consecutive failure waits twice as long; the cap is the configured max.
    b.handle_connect_error(first, addr(0), &mut rng);
    let second = b.poll_timeout().unwrap();
    assert!(
        second - first >= ms(200) && second - first <= ms(220),
        "{:?}",
        second - first
    );
    for _ in 0..10 {
        b.handle_connect_error(first, addr(0), &mut rng);
    }
    let capped = b.poll_timeout().unwrap();
    assert!(capped - first <= ms(550), "{:?}", capped - first);
    b.handle_connect_success(addr(0));
    assert_eq!(b.ready_len(), 2);
    assert_eq!(b.endpoints(T0).next().unwrap().connect_failures, 0);
}

#[test]
fn least_loaded_picks_the_idlest() {
    let mut b = balancer_with(3, Policy::LeastLoaded);
    let mut rng = DetRng::new(1);
    let mut held = Vec::new();
    for _ in 0..9 {
        held.push(b.pick(T0, &mut rng).unwrap());
    }
    // Nine picks with nothing settling spread three per endpoint.
    for i in 0..3 {
        assert_eq!(b.in_flight(addr(i)), Some(3));
    }
    held.retain(|p| p.addr != addr(2));
    let picked = b.pick(T0, &mut rng).unwrap();
    assert_eq!(picked.addr, addr(2));
}

#[test]
fn round_robin_takes_turns_whatever_the_latency() {
    let mut b = balancer_with(3, Policy::RoundRobin);
    let mut rng = DetRng::new(1);
    // Endpoint 0 is far slower than the others: round robin does not care.
    let slow = b.pick(T0, &mut rng).unwrap();
    assert_eq!(slow.addr, addr(0));
    b.observe(T0 + Duration::from_secs(1), &slow.in_flight);
    let picks: Vec<_> = (0..6).map(|_| b.pick(T0, &mut rng).unwrap().addr).collect();
    assert_eq!(
        picks,
        [addr(1), addr(2), addr(0), addr(1), addr(2), addr(0)]
    );
    // A retry avoiding the endpoint whose turn it is goes to the next.
    let retry = b.pick_avoiding(T0, &mut rng, Some(addr(1))).unwrap();
    assert_eq!(retry.addr, addr(2));
    assert_eq!(Policy::from_name("round_robin"), Some(Policy::RoundRobin));
    assert_eq!(Policy::from_name("random"), None);
}

#[test]
fn weights_shape_the_share() {
    // Among four equally healthy endpoints, one of weight 400 is considered in most picks and
    // takes more than its unweighted quarter.
    let mut eps = endpoints(4);
    eps[3].weight = 400;
    let mut b = Balancer::new(BalanceConfig::default());
    b.handle_update(
        T0,
        Update {
            version: 1,
            change: Change::Replace(eps),
        },
    )
    .unwrap();
    let counts = simulate(&mut b, 1, T0, Duration::from_secs(20), ms(5), &|_, _| {
        ms(10)
    });
    let heavy = share(&counts, addr(3));
    assert!((0.3..0.7).contains(&heavy), "heavy share {heavy}");
}

#[test]
fn queue_waits_sheds_and_fails_fast() {
    let config = QueueConfig {
        capacity: 2,
        failfast_timeout: Duration::from_secs(3),
    };
    let mut q = Queue::new(config, T0);
    assert_eq!(
        q.admit(T0 + ms(500)),
        Admit::Wait {
            deadline: T0 + ms(3000)
        }
    );
    assert_eq!(
        q.admit(T0 + ms(600)),
        Admit::Wait {
            deadline: T0 + ms(3000)
        }
    );
    assert_eq!(q.admit(T0 + ms(700)), Admit::Shed, "capacity reached");
    q.leave();
    assert!(matches!(q.admit(T0 + ms(800)), Admit::Wait { .. }));
    q.leave();
    q.leave();
    assert_eq!(q.poll_timeout(), Some(T0 + ms(3000)));
    q.handle_timeout(T0 + ms(3000));
    assert!(q.is_failing_fast());
    assert_eq!(q.admit(T0 + ms(3001)), Admit::FailFast);
    assert_eq!(q.poll_timeout(), None);
    // An endpoint becomes ready: the queue admits again, and a later outage starts a new clock.
    q.handle_readiness(T0 + ms(4000), true);
    assert!(!q.is_failing_fast());
    assert_eq!(q.poll_timeout(), None);
    q.handle_readiness(T0 + ms(5000), false);
    assert_eq!(
        q.admit(T0 + ms(5000)),
        Admit::Wait {
            deadline: T0 + ms(8000)
        }
    );
    let stats = q.stats();
    assert_eq!(
        (stats.shed, stats.failed_fast, stats.failfast_entered),
        (1, 1, 1)
    );
}

/// Drives a balancer with an open-loop request stream: one request every `interval` from
/// `start` for `length`, each taking `latency(addr, sent_at)`; responses are observed and
/// settled at their completion time. Returns picks per endpoint.
fn simulate(
    b: &mut Balancer,
    seed: u64,
    start: Instant,
    length: Duration,
    interval: Duration,
    latency: &dyn Fn(SocketAddr, Instant) -> Duration,
) -> BTreeMap<SocketAddr, u32> {
    let mut rng = DetRng::new(seed);
    let mut pending: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut handles: BTreeMap<u64, Picked> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    let mut now = start;
    let mut next_id = 0u64;
    let end = start + length;
    while now < end || !pending.is_empty() {
        while let Some(&Reverse((done, id))) = pending.peek() {
            if done > now && now < end {
                break;
            }
            pending.pop();
            let picked = handles.remove(&id).unwrap();
            b.observe(done, &picked.in_flight);
        }
        if now < end {
            let picked = b.pick(now, &mut rng).unwrap();
            *counts.entry(picked.addr).or_insert(0) += 1;
            pending.push(Reverse((now + latency(picked.addr, now), next_id)));
            handles.insert(next_id, picked);
            next_id += 1;
        }
        now += interval;
    }
    counts
}

fn share(counts: &BTreeMap<SocketAddr, u32>, of: SocketAddr) -> f64 {
    f64::from(counts.get(&of).copied().unwrap_or(0)) / f64::from(counts.values().sum::<u32>())
}

#[derive(Clone, Debug)]
enum Op {
    Add(u16),
    Remove(u16),
    Replace(Vec<u16>),
    NoEndpoints,
    ConnectError(u16),
    Timeout(u64),
    Pick,
    Settle(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u16..8).prop_map(Op::Add),
        (0u16..8).prop_map(Op::Remove),
        proptest::collection::vec(0u16..8, 0..6).prop_map(Op::Replace),
        Just(Op::NoEndpoints),
        (0u16..8).prop_map(Op::ConnectError),
        (0u64..1000).prop_map(Op::Timeout),
        Just(Op::Pick),
        Just(Op::Pick),
        Just(Op::Pick),
        (0usize..16).prop_map(Op::Settle),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A pick only ever names an endpoint that discovery lists now and that is ready; in-flight
    /// counts return to zero once every handle is dropped.
    #[test]
    fn picks_are_live_and_ready_and_in_flight_settles(
        seed: u64,
        policy in prop_oneof![Just(Policy::PeakEwma), Just(Policy::LeastLoaded), Just(Policy::RoundRobin)],
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let mut b = Balancer::new(BalanceConfig { policy, ..BalanceConfig::default() });
        let mut rng = DetRng::new(seed);
        let mut now = T0;
        let mut version = 0;
        let mut held: Vec<Picked> = Vec::new();
        for op in ops {
            now += ms(1);
            let mut update = |change| {
                version += 1;
                b.handle_update(now, Update { version, change }).unwrap();
            };
            match op {
                Op::Add(i) => update(Change::Add(vec![Endpoint::new(addr(i))])),
                Op::Remove(i) => update(Change::Remove(vec![addr(i)])),
                Op::Replace(is) => {
                    let set: BTreeSet<u16> = is.into_iter().collect();
                    update(Change::Replace(set.into_iter().map(|i| Endpoint::new(addr(i))).collect()));
                }
                Op::NoEndpoints => update(Change::NoEndpoints),
                Op::ConnectError(i) => b.handle_connect_error(now, addr(i), &mut rng),
                Op::Timeout(after) => {
                    now += ms(after);
                    b.handle_timeout(now);
                }
                Op::Pick => match b.pick(now, &mut rng) {
                    Some(picked) => {
                        let view = b.endpoints(now).find(|v| v.endpoint.addr == picked.addr);
                        let view = view.expect("picked endpoint is listed");
                        prop_assert!(view.ready, "picked endpoint is ready");
                        b.observe(now, &picked.in_flight);
                        held.push(picked);
                    }
                    None => prop_assert_eq!(b.ready_len(), 0),
                },
                Op::Settle(i) => {
                    if !held.is_empty() {
                        drop(held.swap_remove(i % held.len()));
                    }
                }
            }
        }
        held.clear();
        prop_assert_eq!(b.in_flight_total(), 0);
    }

    /// Same seed, same inputs, same picks.
    #[test]
    fn picks_are_deterministic(seed: u64, n in 2u16..50) {
        let run = || {
            let mut b = balancer_with(n, Policy::PeakEwma);
            simulate(&mut b, seed, T0, Duration::from_secs(2), ms(3), &|a, _| ms(u64::from(a.port() % 7) + 1))
        };
        prop_assert_eq!(run(), run());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// With one endpoint ten times slower than its peers, it gets a clearly smaller share of
    /// the traffic; once it speeds up, its share recovers.
    #[test]
    fn a_slow_endpoint_loses_share_and_regains_it(seed: u64, slow in 0u16..5) {
        let mut b = balancer_with(5, Policy::PeakEwma);
        let slow = addr(slow);
        let phase1 = Duration::from_secs(20);
        let recovered = T0 + phase1;
        let latency = move |a: SocketAddr, at: Instant| {
            if a == slow && at < recovered { ms(100) } else { ms(10) }
        };
        // 500 requests per second.
        let first = simulate(&mut b, seed, T0, phase1, ms(2), &latency);
        let slow_share = share(&first, slow);
        prop_assert!(slow_share < 0.08, "slow share {slow_share} (fair is 0.2)");

        let _settling = simulate(&mut b, seed, recovered, Duration::from_secs(30), ms(2), &latency);
        let after = simulate(&mut b, seed ^ 1, recovered + Duration::from_secs(30), Duration::from_secs(10), ms(2), &latency);
        let recovered_share = share(&after, slow);
        prop_assert!(recovered_share > 0.14, "recovered share {recovered_share} (fair is 0.2)");
    }
}

// === Circuit breaking ===

fn fixed_penalty() -> BreakerConfig {
    // No jitter: penalties of exactly 1 s, 2 s, 4 s...
    let penalty = crate::backoff::BackoffConfig::try_new(ms(1_000), ms(60_000), 0).unwrap();
    BreakerConfig::try_new(Some(7), None, penalty, 500).unwrap()
}

fn breaker_balancer(n: u16, breaker: BreakerConfig) -> Balancer {
    let mut b = Balancer::new(BalanceConfig {
        breaker,
        ..BalanceConfig::default()
    });
    let change = Change::Replace(endpoints(n));
    b.handle_update(T0, Update { version: 1, change }).unwrap();
    b
}

/// Picks and settles one request at `now`: a failure at the endpoints in `failing`.
fn serve(
    b: &mut Balancer,
    now: Instant,
    rng: &mut DetRng,
    failing: &[SocketAddr],
) -> (SocketAddr, bool, Option<BreakerEvent>) {
    let picked = b.pick(now, rng).expect("an endpoint");
    let probe = picked.in_flight.is_probe();
    let outcome = if failing.contains(&picked.addr) {
        Outcome::Failure
    } else {
        Outcome::Success
    };
    let event = b.handle_outcome(now, picked.in_flight, outcome, rng);
    (picked.addr, probe, event)
}

#[test]
fn a_failing_endpoint_is_ejected_then_probed_back() {
    let mut b = breaker_balancer(3, fixed_penalty());
    let mut rng = DetRng::new(1);
    let bad = addr(0);
    let mut now = T0;
    let mut events = Vec::new();
    let mut bad_picks = 0;
    while events.is_empty() {
        now += ms(1);
        let (picked, probe, event) = serve(&mut b, now, &mut rng, &[bad]);
        assert!(!probe);
        bad_picks += u32::from(picked == bad);
        events.extend(event);
    }
    assert_eq!(bad_picks, 7, "ejected at its seventh failure in a row");
    assert_eq!(
        events,
        [BreakerEvent::Ejected {
            addr: bad,
            reason: Reason::ConsecutiveFailures,
            until: now + ms(1_000),
        }]
    );
    let ejected_at = now;
    assert_eq!(b.poll_timeout(), Some(ejected_at + ms(1_000)));
    assert_eq!((b.ready_len(), b.ejected_len()), (2, 1));
    // Out for its penalty: not one request reaches it.
    for _ in 0..500 {
        now += ms(1);
        assert_ne!(serve(&mut b, now, &mut rng, &[bad]).0, bad);
    }
    b.handle_timeout(ejected_at + ms(999));
    assert_eq!(b.ready_len(), 2, "not before the penalty ends");
    now = ejected_at + ms(1_000);
    b.handle_timeout(now);
    assert_eq!(b.ready_len(), 3, "on probation: a candidate again");
    // The first pick that lands on it is the probe; while the probe is out, no other
    // request goes there.
    let probe = loop {
        let picked = b.pick(now, &mut rng).unwrap();
        if picked.addr == bad {
            break picked;
        }
    };
    assert!(probe.in_flight.is_probe());
    assert_eq!(b.ready_len(), 2);
    for _ in 0..200 {
        let picked = b.pick(now, &mut rng).unwrap();
        assert_ne!(picked.addr, bad, "one probe at a time");
        assert!(!picked.in_flight.is_probe());
    }
    // The endpoint healed: the probe succeeds and it is back in rotation.
    let event = b.handle_outcome(now + ms(5), probe.in_flight, Outcome::Success, &mut rng);
    assert_eq!(event, Some(BreakerEvent::Readmitted { addr: bad }));
    assert_eq!((b.ready_len(), b.ejected_len()), (3, 0));
    let back = (0..300)
        .filter(|_| serve(&mut b, now + ms(6), &mut rng, &[]).0 == bad)
        .count();
    assert!(back > 50, "it takes its share again: {back} of 300");
    let stats = b.stats();
    assert_eq!(
        (stats.ejections, stats.spared, stats.ejected),
        ([1, 0], 0, 0)
    );
}

#[test]
fn a_failed_probe_ejects_again_for_twice_as_long() {
    let mut b = breaker_balancer(2, fixed_penalty());
    let mut rng = DetRng::new(2);
    let bad = addr(1);
    let mut now = T0;
    let mut until = loop {
        now += ms(1);
        if let (_, _, Some(BreakerEvent::Ejected { until, .. })) =
            serve(&mut b, now, &mut rng, &[bad])
        {
            break until;
        }
    };
    let mut penalties = Vec::new();
    for _ in 0..4 {
        assert_eq!(b.poll_timeout(), Some(until));
        b.handle_timeout(until);
        let event = loop {
            let (picked, probe, event) = serve(&mut b, until, &mut rng, &[bad]);
            assert_eq!(picked == bad, probe, "only the probe reaches it");
            if probe {
                break event;
            }
        };
        let Some(BreakerEvent::Reejected { addr, until: next }) = event else {
            panic!("a failed probe ejects again: {event:?}");
        };
        assert_eq!(addr, bad);
        penalties.push((next - until).as_secs());
        until = next;
    }
    assert_eq!(penalties, [2, 4, 8, 16]);
    assert_eq!(
        b.stats().ejections,
        [1, 0],
        "re-ejections are not new ejections"
    );
}

#[test]
fn the_maximum_share_spares_endpoints_and_never_the_last() {
    // Two endpoints, both failing: one is ejected, the other is spared and takes everything.
    let mut b = breaker_balancer(2, fixed_penalty());
    let mut rng = DetRng::new(3);
    let all = [addr(0), addr(1)];
    let mut now = T0;
    let mut events = Vec::new();
    for _ in 0..100 {
        now += ms(1);
        events.extend(serve(&mut b, now, &mut rng, &all).2);
    }
    let ejected: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            BreakerEvent::Ejected { addr, .. } => Some(*addr),
            _ => None,
        })
        .collect();
    assert_eq!(ejected.len(), 1, "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, BreakerEvent::Spared { addr, .. } if *addr != ejected[0]))
    );
    assert_eq!(b.ejected_len(), 1);
    assert!(b.stats().spared > 0);
    // A single endpoint is never ejected.
    let mut one = breaker_balancer(1, fixed_penalty());
    for i in 0..100 {
        let event = serve(&mut one, T0 + ms(i), &mut rng, &[addr(0)]).2;
        assert!(matches!(event, None | Some(BreakerEvent::Spared { .. })));
    }
    assert_eq!((one.ejected_len(), one.ready_len()), (0, 1));
    // With the share at zero, nothing is ever ejected.
    let none = BreakerConfig::try_new(Some(1), None, *fixed_penalty().penalty(), 0).unwrap();
    let mut b = breaker_balancer(10, none);
    for i in 0..200 {
        let _ = serve(&mut b, T0 + ms(i), &mut rng, &[addr(0), addr(1)]);
    }
    assert_eq!(b.ejected_len(), 0);
}

#[test]
fn an_abandoned_probe_lets_another_go() {
    let mut b = breaker_balancer(3, fixed_penalty());
    let mut rng = DetRng::new(4);
    let bad = addr(2);
    let mut now = T0;
    let until = loop {
        now += ms(1);
        if let (_, _, Some(BreakerEvent::Ejected { until, .. })) =
            serve(&mut b, now, &mut rng, &[bad])
        {
            break until;
        }
    };
    b.handle_timeout(until);
    let probe = loop {
        let picked = b.pick(until, &mut rng).unwrap();
        if picked.addr == bad {
            break picked;
        }
    };
    assert_eq!(b.ready_len(), 2);
    // Cancelled: dropped without an outcome. The next pick notices and the endpoint may be
    // probed again.
    drop(probe);
    let again = loop {
        let picked = b.pick(until, &mut rng).unwrap();
        if picked.addr == bad {
            break picked;
        }
    };
    assert!(again.in_flight.is_probe());
    assert_eq!(b.endpoints(until).filter(|v| v.ready).count(), 2);
}

#[test]
fn the_breaker_never_leaves_a_request_without_an_endpoint() {
    let mut b = breaker_balancer(2, fixed_penalty());
    let mut rng = DetRng::new(5);
    let (bad, good) = (addr(0), addr(1));
    let mut now = T0;
    while b.ejected_len() == 0 {
        now += ms(1);
        let _ = serve(&mut b, now, &mut rng, &[bad]);
    }
    // The healthy endpoint refuses connections and backs off: picks fall back to the ejected
    // one rather than fail.
    b.handle_connect_error(now, good, &mut rng);
    assert_eq!(b.ready_len(), 1);
    assert!(b.stats().breaker_fallback);
    let picked = b.pick(now, &mut rng).unwrap();
    assert_eq!(picked.addr, bad);
    assert!(!picked.in_flight.is_probe());
    // Its outcome while ejected decides nothing.
    assert_eq!(
        b.handle_outcome(now, picked.in_flight, Outcome::Failure, &mut rng),
        None
    );
    b.handle_connect_success(good);
    assert!(!b.stats().breaker_fallback);
    assert_eq!(b.pick(now, &mut rng).unwrap().addr, good);
}

#[test]
fn discovery_shrinking_the_service_readmits_the_excess() {
    let mut b = breaker_balancer(4, fixed_penalty());
    let mut rng = DetRng::new(6);
    let bad = [addr(0), addr(1)];
    let mut now = T0;
    while b.ejected_len() < 2 {
        now += ms(1);
        let _ = serve(&mut b, now, &mut rng, &bad);
    }
    let change = Change::Remove(vec![addr(2), addr(3)]);
    b.handle_update(now, Update { version: 2, change }).unwrap();
    assert_eq!(b.ejected_len(), 1, "at most half of two");
    assert_eq!(b.ready_len(), 1);
    assert_eq!(b.stats().ejections, [2, 0]);
}

#[test]
fn outcomes_for_removed_endpoints_are_ignored_and_settings_restart_breakers() {
    let mut b = breaker_balancer(3, fixed_penalty());
    let mut rng = DetRng::new(7);
    let held: Vec<Picked> = (0..20).map(|_| b.pick(T0, &mut rng).unwrap()).collect();
    let gone = held[0].addr;
    let change = Change::Remove(vec![gone]);
    b.handle_update(T0, Update { version: 2, change }).unwrap();
    let change = Change::Add(vec![Endpoint::new(gone)]);
    b.handle_update(T0, Update { version: 3, change }).unwrap();
    for picked in held {
        let event = b.handle_outcome(T0 + ms(1), picked.in_flight, Outcome::Failure, &mut rng);
        assert!(event.is_none() || picked.addr != gone);
    }
    assert_eq!(b.in_flight_total(), 0);
    // Eject one, then turn the breaker off: every endpoint is back at once.
    let mut now = T0 + ms(2);
    while b.ejected_len() == 0 {
        now += ms(1);
        let _ = serve(&mut b, now, &mut rng, &[addr(1)]);
    }
    b.set_breaker(now, BreakerConfig::disabled());
    assert_eq!((b.ejected_len(), b.ready_len()), (0, 3));
    for i in 0..100 {
        assert_eq!(serve(&mut b, now + ms(i), &mut rng, &[addr(1)]).2, None);
    }
}

#[derive(Clone, Debug)]
enum BreakerOp {
    Replace(Vec<u16>),
    ConnectError(u16),
    ConnectSuccess(u16),
    Advance(u64),
    Pick,
    /// Settle a held request with its endpoint's outcome (or a flipped one).
    Settle(usize, bool),
    /// Drop a held request without an outcome.
    Abandon(usize),
    /// Flip whether endpoint `i` fails.
    Flip(u16),
}

fn breaker_op() -> impl Strategy<Value = BreakerOp> {
    prop_oneof![
        1 => proptest::collection::vec(0u16..8, 0..8).prop_map(BreakerOp::Replace),
        1 => (0u16..8).prop_map(BreakerOp::ConnectError),
        1 => (0u16..8).prop_map(BreakerOp::ConnectSuccess),
        2 => (0u64..5_000).prop_map(BreakerOp::Advance),
        8 => Just(BreakerOp::Pick),
        8 => (0usize..32, any::<bool>()).prop_map(|(i, flip)| BreakerOp::Settle(i, flip)),
        1 => (0usize..32).prop_map(BreakerOp::Abandon),
        1 => (0u16..8).prop_map(BreakerOp::Flip),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Under any failure pattern, discovery churn, connection failures, cancellations and
    /// time: never more endpoints ejected than the maximum share; a pick fails only when no
    /// endpoint could take a request whatever the breakers say; an endpoint the breaker has
    /// out is picked only as its one probe, or when picks fall back; at most one probe per
    /// endpoint is out; and no penalty outlives its end once timeouts are handled.
    #[test]
    fn breaker_invariants_hold_in_the_balancer(
        seed: u64,
        consecutive in 1u32..5,
        max_share in 0u32..=1000,
        failing in proptest::collection::btree_set(0u16..8, 0..8),
        ops in proptest::collection::vec(breaker_op(), 1..300),
    ) {
        let penalty = crate::backoff::BackoffConfig::try_new(ms(100), ms(2_000), 500).unwrap();
        let rate = crate::breaker::SuccessRate::try_new(500, ms(1_000), 4).unwrap();
        let config = BreakerConfig::try_new(Some(consecutive), Some(rate), penalty, max_share).unwrap();
        let mut b = breaker_balancer(8, config);
        let mut failing: BTreeSet<SocketAddr> = failing.into_iter().map(addr).collect();
        let mut rng = DetRng::new(seed);
        let mut now = T0;
        let mut version = 1;
        let mut held: Vec<Picked> = Vec::new();
        let mut stale: Vec<Picked> = Vec::new();
        for op in ops {
            now += ms(1);
            match op {
                BreakerOp::Replace(is) => {
                    version += 1;
                    let set: BTreeSet<u16> = is.into_iter().collect();
                    // Picks of endpoints this update removes belong to an incarnation that is
                    // gone: a re-added endpoint is a new one, with a probe of its own. They
                    // are kept (not settled) apart from the live ones.
                    let (live, gone): (Vec<Picked>, Vec<Picked>) = held
                        .drain(..)
                        .partition(|h| set.iter().any(|&i| addr(i) == h.addr));
                    held = live;
                    stale.extend(gone);
                    let change = if set.is_empty() {
                        Change::NoEndpoints
                    } else {
                        Change::Replace(set.into_iter().map(|i| Endpoint::new(addr(i))).collect())
                    };
                    b.handle_update(now, Update { version, change }).unwrap();
                }
                BreakerOp::ConnectError(i) => b.handle_connect_error(now, addr(i), &mut rng),
                BreakerOp::ConnectSuccess(i) => b.handle_connect_success(addr(i)),
                BreakerOp::Advance(by) => {
                    now += ms(by);
                    b.handle_timeout(now);
                    for view in b.endpoints(now) {
                        if let State::Ejected { until } = view.breaker {
                            prop_assert!(until > now, "a penalty past its end");
                        }
                    }
                }
                BreakerOp::Pick => {
                    let before: BTreeMap<SocketAddr, State> =
                        b.endpoints(now).map(|v| (v.endpoint.addr, v.breaker)).collect();
                    let eligible = b
                        .endpoints(now)
                        .any(|v| v.endpoint.weight > 0 && !v.backing_off);
                    match b.pick(now, &mut rng) {
                        None => prop_assert!(!eligible, "refused with an eligible endpoint"),
                        Some(picked) => {
                            let state = before[&picked.addr];
                            let fallback = b.stats().breaker_fallback;
                            if picked.in_flight.is_probe() {
                                prop_assert!(matches!(state, State::Probation { .. }), "a probe of {:?}", state);
                                let probes = held
                                    .iter()
                                    .filter(|h| h.addr == picked.addr && h.in_flight.is_probe())
                                    .count();
                                prop_assert_eq!(probes, 0, "one probe at a time");
                            } else if state != State::Closed {
                                prop_assert!(fallback, "{:?} picked outside fallback", state);
                            }
                            held.push(picked);
                        }
                    }
                }
                BreakerOp::Settle(i, flip) => {
                    if !held.is_empty() {
                        let picked = held.swap_remove(i % held.len());
                        let fails = failing.contains(&picked.addr) != flip;
                        let outcome = if fails { Outcome::Failure } else { Outcome::Success };
                        let _ = b.handle_outcome(now, picked.in_flight, outcome, &mut rng);
                    }
                }
                BreakerOp::Abandon(i) => {
                    if !held.is_empty() {
                        drop(held.swap_remove(i % held.len()));
                    }
                }
                BreakerOp::Flip(i) => {
                    if !failing.remove(&addr(i)) {
                        failing.insert(addr(i));
                    }
                }
            }
            prop_assert!(b.ejected_len() <= config.max_ejected(b.len()));
            b.assert_invariants();
        }
        held.clear();
        prop_assert_eq!(b.in_flight_total(), 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A pick told to avoid an endpoint never returns it while another is ready (a retry goes
    /// elsewhere), and returns it when it is the only one.
    #[test]
    fn a_pick_avoids_the_endpoint_it_is_told_to(
        seed: u64,
        n in 1u16..6,
        avoided in 0u16..6,
        picks in 1usize..50,
        policy in prop_oneof![Just(Policy::PeakEwma), Just(Policy::LeastLoaded), Just(Policy::RoundRobin)],
    ) {
        let mut b = balancer_with(n, policy);
        let mut rng = DetRng::new(seed);
        let avoid = addr(avoided % n);
        let mut held = Vec::new();
        for i in 0..picks {
            let now = T0 + ms(i as u64);
            let picked = b.pick_avoiding(now, &mut rng, Some(avoid)).unwrap();
            prop_assert!(n == 1 || picked.addr != avoid, "picked {} with {n} ready", picked.addr);
            held.push(picked);
        }
    }
}
