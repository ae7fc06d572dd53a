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
    let b = balancer_with(3, Policy::LeastLoaded);
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
        policy in prop_oneof![Just(Policy::PeakEwma), Just(Policy::LeastLoaded)],
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
