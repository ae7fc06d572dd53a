//! Route lookup benchmarks: the route a request takes in profiles of 10, 100 and 500 routes
//! (the bound), whose routes mix methods, exact and prefix paths, regular expressions and
//! header conditions, for a request that matches the last route (the whole table is scanned)
//! and for one that matches none (the default route).

#![allow(clippy::unwrap_used, reason = "benchmark setup on fixed inputs")]
use std::hint::black_box;

use conduit_core::route::{
    Profile, RawHeaderMatch, RawPathMatch, RawProfile, RawRequestMatch, RawRoute, RequestView,
};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::HeaderName;

struct Req {
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
}

impl RequestView for Req {
    fn method(&self) -> &[u8] {
        self.method.as_bytes()
    }
    fn path(&self) -> &[u8] {
        self.path.as_bytes()
    }
    fn any_header(&self, name: &HeaderName, matches: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
            .any(|(_, v)| matches(v.as_bytes()))
    }
}

/// Route `i` of a profile: one of five shapes, each on its own path.
fn route(i: usize) -> RawRoute {
    let path = |p: RawPathMatch| Some(p);
    let (method, path_match, headers) = match i % 5 {
        0 => (
            Some("GET"),
            path(RawPathMatch {
                exact: Some(format!("/api/v{i}/items")),
                ..Default::default()
            }),
            vec![],
        ),
        1 => (
            Some("POST"),
            path(RawPathMatch {
                prefix: Some(format!("/api/v{i}/")),
                ..Default::default()
            }),
            vec![],
        ),
        2 => (
            None,
            path(RawPathMatch {
                regex: Some(format!("/api/v{i}/items/[0-9]+")),
                ..Default::default()
            }),
            vec![],
        ),
        3 => (
            None,
            path(RawPathMatch {
                prefix: Some(format!("/users/{i}/")),
                ..Default::default()
            }),
            vec![RawHeaderMatch {
                name: "x-tenant".into(),
                exact: Some("beta".into()),
                regex: None,
            }],
        ),
        _ => (
            Some("DELETE"),
            path(RawPathMatch {
                regex: Some(format!("/static/{i}/.+[.]js")),
                ..Default::default()
            }),
            vec![],
        ),
    };
    RawRoute {
        name: format!("route-{i}"),
        matches: RawRequestMatch {
            method: method.map(Into::into),
            path: path_match,
            headers,
        },
        ..RawRoute::default()
    }
}

fn find(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_find");
    for n in [10usize, 100, 500] {
        let mut routes: Vec<RawRoute> = (0..n - 1).map(route).collect();
        routes.push(RawRoute {
            name: "last".into(),
            matches: RawRequestMatch {
                method: Some("GET".into()),
                path: Some(RawPathMatch {
                    exact: Some("/".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..RawRoute::default()
        });
        let profile = Profile::try_from(RawProfile { routes }).unwrap();
        let last = Req {
            method: "GET",
            path: "/".into(),
            headers: vec![("x-tenant", "alpha")],
        };
        let none = Req {
            method: "PUT",
            path: "/nowhere".into(),
            headers: vec![],
        };
        assert_eq!(profile.find(&last).name(), "last");
        assert_eq!(profile.find(&none).name(), "default");
        group.bench_with_input(BenchmarkId::new("last", n), &n, |b, _| {
            b.iter(|| black_box(profile.find(black_box(&last)).index()));
        });
        group.bench_with_input(BenchmarkId::new("default", n), &n, |b, _| {
            b.iter(|| black_box(profile.find(black_box(&none)).index()));
        });
    }
    group.finish();
}

criterion_group!(benches, find);
criterion_main!(benches);
