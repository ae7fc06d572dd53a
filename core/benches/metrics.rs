//! Hot-path costs of `core::metrics` and `core::classify`: what every proxied request pays.
//!
//! Run with `cargo bench -p conduit-core --bench metrics`. Targets: a histogram record well
//! under 20 ns; classification a few tens of nanoseconds, without allocation.

use std::hint::black_box;
use std::time::Duration;

use conduit_core::classify::{Classifier, ClassifyConfig, GrpcCode, ResponseClass};
use conduit_core::classify::{GrpcRule, HttpRule, Outcome, StatusRange};
use conduit_core::metrics::{LatencyHistogram, LatencyWindow, RequestWindow, WindowConfig};
use conduit_core::rand::{DetRng, Rng};
use conduit_core::time::{Instant, ms};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, StatusCode};

/// 1,024 latencies spread over every bucket, log-uniform from 100 µs to 100 s, so the bucket
/// search cannot be predicted the way a constant input would let it.
fn latencies() -> Vec<Duration> {
    let mut rng = DetRng::new(7);
    (0..1_024)
        .map(|_| {
            let decade = rng.below(7); // 10^5 .. 10^11 ns
            let base = 10u64.pow(u32::try_from(decade).unwrap_or(0) + 5);
            Duration::from_nanos(base + rng.below(9 * base))
        })
        .collect()
}

fn histogram(c: &mut Criterion) {
    let samples = latencies();
    let mut group = c.benchmark_group("histogram");

    group.bench_function("record_constant", |b| {
        let mut h = LatencyHistogram::new();
        b.iter(|| h.record(black_box(ms(12))));
    });

    group.bench_function("record_varied", |b| {
        let mut h = LatencyHistogram::new();
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 1_023;
            h.record(black_box(samples[i]));
        });
    });

    let mut full = LatencyHistogram::new();
    for &s in &samples {
        full.record(s);
    }
    group.bench_function("quantile_p99", |b| {
        b.iter(|| black_box(&full).quantile(black_box(0.99)))
    });

    group.bench_function("merge", |b| {
        let mut h = LatencyHistogram::new();
        b.iter(|| h.merge(black_box(&full)));
    });
    group.finish();
}

fn windows(c: &mut Criterion) {
    let samples = latencies();
    let config = WindowConfig::default();
    let mut group = c.benchmark_group("window");

    // One sample every 100 µs of fabricated time, so slots rotate as they would at 10k rps.
    group.bench_function("latency_record", |b| {
        let mut w = LatencyWindow::new(&config, Instant::ZERO);
        let mut now = Instant::ZERO;
        let mut i = 0;
        b.iter(|| {
            now += Duration::from_micros(100);
            i = (i + 1) & 1_023;
            w.record(black_box(now), black_box(samples[i]));
        });
    });

    group.bench_function("request_record", |b| {
        let mut w = RequestWindow::new(&config, Instant::ZERO);
        let mut now = Instant::ZERO;
        b.iter(|| {
            now += Duration::from_micros(100);
            w.record(black_box(now), black_box(Outcome::Success));
        });
    });

    let mut w = LatencyWindow::new(&config, Instant::ZERO);
    let mut now = Instant::ZERO;
    for &s in samples.iter().cycle().take(100_000) {
        now += Duration::from_micros(100);
        w.record(now, s);
    }
    group.bench_function("latency_snapshot_p99", |b| {
        b.iter(|| black_box(&w).snapshot(black_box(now)).quantile(0.99));
    });
    group.finish();
}

fn classify(c: &mut Criterion) {
    let defaults = Classifier::default();
    let mut group = c.benchmark_group("classify");

    let mut plain = HeaderMap::new();
    plain.insert("content-type", HeaderValue::from_static("text/plain"));
    plain.insert("content-length", HeaderValue::from_static("12"));
    plain.insert(
        "date",
        HeaderValue::from_static("Thu, 26 Nov 2026 04:27:00 GMT"),
    );
    group.bench_function("http_200", |b| {
        b.iter(|| defaults.classify_response(black_box(StatusCode::OK), black_box(&plain)));
    });

    let mut grpc = HeaderMap::new();
    grpc.insert("content-type", HeaderValue::from_static("application/grpc"));
    grpc.insert("grpc-encoding", HeaderValue::from_static("identity"));
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("14"));
    trailers.insert(
        "grpc-message",
        HeaderValue::from_static("upstream unavailable"),
    );
    group.bench_function("grpc_trailers", |b| {
        b.iter(
            || match defaults.classify_response(black_box(StatusCode::OK), black_box(&grpc)) {
                ResponseClass::Pending(pending) => {
                    defaults.classify_eos(pending, Some(black_box(&trailers)))
                }
                ResponseClass::Final(class) => class,
            },
        );
    });

    // A profile with a realistic handful of rules, none matching a 200.
    let http_rules = (0..8)
        .filter_map(|i| {
            let statuses = StatusRange::try_new(400 + i * 10, 405 + i * 10).ok()?;
            Some(HttpRule {
                statuses,
                outcome: Outcome::Failure,
                retryable: false,
            })
        })
        .collect();
    let grpc_rules = vec![GrpcRule {
        code: GrpcCode::NotFound,
        outcome: Outcome::Success,
        retryable: false,
    }];
    let ruled = ClassifyConfig::try_new(http_rules, grpc_rules).map(|c| Classifier::new(&c));
    if let Ok(ruled) = ruled {
        group.bench_function("http_200_8_rules", |b| {
            b.iter(|| ruled.classify_response(black_box(StatusCode::OK), black_box(&plain)));
        });
    }
    group.finish();
}

criterion_group!(benches, histogram, windows, classify);
criterion_main!(benches);
