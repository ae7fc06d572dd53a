//! Balancer benchmarks: one pick over 10, 100 and 1000 endpoints, per policy, with a realistic
//! spread of in-flight requests and RTT estimates.

#![allow(clippy::unwrap_used, reason = "benchmark setup on fixed inputs")]
use core::net::SocketAddr;
use std::hint::black_box;

use conduit_core::balance::{BalanceConfig, Balancer, Change, Picked, Policy, Update};
use conduit_core::mesh::Endpoint;
use conduit_core::rand::DetRng;
use conduit_core::time::{Instant, ms};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn loaded_balancer(n: u16, policy: Policy) -> (Balancer, Vec<Picked>) {
    let mut balancer = Balancer::new(BalanceConfig {
        policy,
        ..BalanceConfig::default()
    });
    let endpoints = (0..n)
        .map(|i| {
            let [hi, lo] = i.to_be_bytes();
            Endpoint::new(SocketAddr::from(([10, 0, hi, lo], 8080)))
        })
        .collect();
    balancer
        .handle_update(
            Instant::ZERO,
            Update {
                version: 1,
                change: Change::Replace(endpoints),
            },
        )
        .unwrap();
    // Give endpoints different estimates and leave some requests in flight.
    let mut rng = DetRng::new(1);
    let mut held = Vec::new();
    for i in 0..u64::from(n) * 2 {
        let picked = balancer.pick(Instant::ZERO, &mut rng).unwrap();
        balancer.observe(Instant::ZERO + ms(1 + i % 50), &picked.in_flight);
        if i % 3 == 0 {
            held.push(picked);
        }
    }
    (balancer, held)
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for policy in [Policy::PeakEwma, Policy::LeastLoaded] {
        for n in [10u16, 100, 1000] {
            let (mut balancer, _held) = loaded_balancer(n, policy);
            let mut rng = DetRng::new(2);
            let now = Instant::ZERO + ms(100);
            group.bench_with_input(BenchmarkId::new(format!("{policy:?}"), n), &n, |b, _| {
                b.iter(|| black_box(balancer.pick(black_box(now), &mut rng)));
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
