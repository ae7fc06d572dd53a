//! HPACK benchmarks on a typical gRPC exchange: encoding and decoding a request header block
//! the first time on a connection (every field a literal that gets indexed) and again (every
//! field but `grpc-timeout` a dynamic-table hit), and the response header block the same way.

#![allow(clippy::unwrap_used, reason = "benchmark setup on fixed inputs")]
use std::hint::black_box;

use conduit_h2::hpack::{Decoder, DecoderLimits, Encoder, Field};
use criterion::{Criterion, criterion_group, criterion_main};

const REQUEST: [(&[u8], &[u8]); 8] = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/pkg.Service/Method"),
    (b":authority", b"svc.ns.svc.cluster.local:8080"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"grpc-timeout", b"1S"),
    (b"user-agent", b"grpc-rust/0.1"),
];

const RESPONSE: [(&[u8], &[u8]); 3] = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-encoding", b"identity"),
];

fn fields<'l>(
    list: &'l [(&'static [u8], &'static [u8])],
) -> impl Iterator<Item = Field<'static>> + 'l {
    list.iter().map(|&(name, value)| Field::new(name, value))
}

/// The block for `list` on a fresh connection, and the one after it.
fn blocks(list: &[(&'static [u8], &'static [u8])]) -> (Vec<u8>, Vec<u8>) {
    let mut encoder = Encoder::new(4096);
    let (mut first, mut again) = (Vec::new(), Vec::new());
    encoder.encode(fields(list), &mut first);
    encoder.encode(fields(list), &mut again);
    (first, again)
}

/// Counts the bytes of the decoded fields, so the work cannot be optimised away.
fn decode(decoder: &mut Decoder, block: &[u8]) -> usize {
    let mut total = 0;
    decoder
        .decode(block, |f: Field<'_>| total += f.name.len() + f.value.len())
        .unwrap();
    total
}

fn bench(c: &mut Criterion, name: &str, list: &[(&'static [u8], &'static [u8])]) {
    let (first, again) = blocks(list);
    let mut group = c.benchmark_group(name);
    let mut out = Vec::with_capacity(256);

    group.bench_function("encode first", |b| {
        b.iter(|| {
            let mut encoder = Encoder::new(4096);
            out.clear();
            encoder.encode(fields(list), &mut out);
            black_box(out.len())
        });
    });
    let mut warm = Encoder::new(4096);
    warm.encode(fields(list), &mut Vec::new());
    group.bench_function("encode repeated", |b| {
        b.iter(|| {
            out.clear();
            warm.encode(fields(list), &mut out);
            black_box(out.len())
        });
    });
    group.bench_function("decode first", |b| {
        b.iter(|| {
            let mut decoder = Decoder::new(DecoderLimits::default());
            black_box(decode(&mut decoder, black_box(&first)))
        });
    });
    let mut decoder = Decoder::new(DecoderLimits::default());
    decode(&mut decoder, &first);
    group.bench_function("decode repeated", |b| {
        b.iter(|| black_box(decode(&mut decoder, black_box(&again))));
    });
    group.finish();
}

fn hpack(c: &mut Criterion) {
    bench(c, "grpc request", &REQUEST);
    bench(c, "grpc response", &RESPONSE);
}

criterion_group!(benches, hpack);
criterion_main!(benches);
