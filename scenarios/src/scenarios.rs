//! The named scenarios. Each is a function from the seed to a [`Plan`]: topology, workload,
//! fault schedule and the invariants it is held to. Every plan is also held to the generic
//! invariants of `conduit_sim::check` (deadlines, no mixing, valid endpoints, picks as the
//! proxies reported them, configuration order, at-most-once, metrics agreement, liveness,
//! convergence) unless it says otherwise.

use std::time::Duration;

use conduit_chaos::{Action, Schedule};
use conduit_core::fault::{RawAbort, RawDelay, RawFault};
use conduit_core::mesh::RawServerPolicy;
use conduit_core::rand::DetRng;
use conduit_core::retry::{Ratio, RawBudget, RawHedge, RawRetry};
use conduit_core::route::{Profile, RawPathMatch, RawProfile, RawRequestMatch, RawRoute};
use conduit_core::timeout::RawTimeouts;
use conduit_sim::check::{self, Violation};
use conduit_sim::trace::micros;
use conduit_sim::{AnchorStep, DiscoveryMode, Flow, Proto, ServiceSpec, Trace, WorldSpec};

use crate::plan::{Plan, ms, secs};

/// A named scenario.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// Its name (`conduit sim --scenario NAME`).
    pub name: &'static str,
    /// One line: goal and method.
    pub doc: &'static str,
    /// The plan for a seed.
    pub plan: fn(u64) -> Plan,
}

const WEB: &str = "web.default";

/// Every scenario, in listing order.
#[must_use]
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "protocols_through_two_proxies",
            doc: "HTTP/1.1, h2 and gRPC, GET and POST, through client and server proxies: every request answered by its own backend",
            plan: protocols_through_two_proxies,
        },
        Scenario {
            name: "latency_aware_balancing",
            doc: "one replica 100 ms slower: PeakEWMA moves traffic off it (share < 10%)",
            plan: latency_aware_balancing,
        },
        Scenario {
            name: "least_loaded_stalled_replica",
            doc: "one replica stalls for 3 s: in-flight load steers new requests away, all complete after release",
            plan: least_loaded_stalled_replica,
        },
        Scenario {
            name: "endpoint_churn",
            doc: "rolling endpoint changes through discovery: no request served by a removed endpoint, proxies converge",
            plan: endpoint_churn,
        },
        Scenario {
            name: "controller_crash",
            doc: "the controller crashes and returns: proxies keep serving, then converge on the latest config",
            plan: controller_crash,
        },
        Scenario {
            name: "partition_proxy_replica",
            doc: "a client proxy is cut off from one replica for 3 s: others keep serving, recovery after repair",
            plan: partition_proxy_replica,
        },
        Scenario {
            name: "replica_crash_restart",
            doc: "a replica crashes and restarts: failures confined to its outage, full recovery",
            plan: replica_crash_restart,
        },
        Scenario {
            name: "all_replicas_gone",
            doc: "every endpoint removed: 504 with the proxy header after fail-fast, then recovery",
            plan: all_replicas_gone,
        },
        Scenario {
            name: "slow_client",
            doc: "a client reading 1 MiB bodies slowly does not slow another client",
            plan: slow_client,
        },
        Scenario {
            name: "large_streamed_bodies",
            doc: "MiB uploads and downloads over h1 and h2 stream across many ticks intact",
            plan: large_streamed_bodies,
        },
        Scenario {
            name: "h2_goaway_on_restart",
            doc: "a replica's proxy drains (GOAWAY) and restarts under h2 load: no mixing, no duplicates, recovery",
            plan: h2_goaway_on_restart,
        },
        Scenario {
            name: "config_never_out_of_order",
            doc: "rapid config versions (the first overlapping the initial one): proxies apply them in order and no request is picked under an older version after a newer one",
            plan: config_never_out_of_order,
        },
        Scenario {
            name: "route_timeouts_fire_at_deadline",
            doc: "per-route request and attempt timeouts end slow requests with the proxy's 504 at their deadline in sim time (h1, h2, gRPC); other routes unaffected",
            plan: route_timeouts_fire_at_deadline,
        },
        Scenario {
            name: "deadline_through_two_proxies",
            doc: "a caller's grpc-timeout is honoured and passed on, reduced, through client and server proxies: requests end at the caller's deadline, not later",
            plan: deadline_through_two_proxies,
        },
        Scenario {
            name: "route_metrics_agree",
            doc: "per-route counters of every client proxy equal what its clients saw on each route (h1, h2, gRPC, GET and POST)",
            plan: route_metrics_agree,
        },
        Scenario {
            name: "steady_mesh",
            doc: "two services, three clients, mixed protocols for 10 s, no faults (the benchmark scenario)",
            plan: steady_mesh,
        },
        Scenario {
            name: "throughput",
            doc: "benchmark: 2,000 req/s of HTTP/1.1 through two proxies for 5 s, no faults",
            plan: throughput,
        },
        Scenario {
            name: "breaker_ejects_failing_replica",
            doc: "one replica of three answers 500 from 1 s to 6 s: the circuit breaker ejects it (clients' success rate rises to near 100 %), probes it, and readmits it after it heals",
            plan: breaker_ejects_failing_replica,
        },
        Scenario {
            name: "retries_lift_a_failing_replica",
            doc: "one replica of three answers 500 (breaker off): GETs on a retrying route still succeed, GETs on a plain route fail, POSTs reach a backend once",
            plan: retries_lift_a_failing_replica,
        },
        Scenario {
            name: "no_retry_storm",
            doc: "every replica answers 500 for 4 s on a route allowing 10 attempts: the retry budget holds what the backends see to 0.2 of the requests plus 10/s over them",
            plan: no_retry_storm,
        },
        Scenario {
            name: "request_timeout_caps_retries",
            doc: "100 ms attempts of a route allowing 10, to an app answering 2 s late: every request ends by its 400 ms request timeout",
            plan: request_timeout_caps_retries,
        },
        Scenario {
            name: "hedging_cuts_the_tail",
            doc: "every replica answers 3 % of requests 1 s late: a route hedging after its p90 cuts the callers' p99 to under half that of the same route without hedging, within the retry budget",
            plan: hedging_cuts_the_tail,
        },
        Scenario {
            name: "fault_injection",
            doc: "a route injects 503s into 10 % of its requests and a 50 ms delay into 20 %: the aborted requests get the policy's answer from the client's proxy and never reach an app, the shares hold within sampling error, other routes are untouched",
            plan: fault_injection,
        },
        Scenario {
            name: "mtls_mesh",
            doc: "a meshed mesh: every proxy certified by the controller's CA over the Identity API, h1, h2 and gRPC all succeed, and every request reaches its replica's proxy over mTLS",
            plan: mtls_mesh,
        },
        Scenario {
            name: "mtls_unidentified_client_denied",
            doc: "a service admitting only authenticated clients: a client proxy without an identity gets the proxy's refusal (no plaintext to a meshed endpoint) and the app never sees its requests; an identified client is served",
            plan: mtls_unidentified_client_denied,
        },
        Scenario {
            name: "mtls_leaf_rotation_under_load",
            doc: "30 s leaves under 60 s of load: every proxy renews its certificate at least twice, each time before it expires, every request succeeds over mTLS, and clients that join after the first and second leaves expired handshake on the renewed ones",
            plan: mtls_leaf_rotation_under_load,
        },
        Scenario {
            name: "mtls_issuer_rotation_under_load",
            doc: "the CA's issuer rotates at 12 s under load (same anchor): every request succeeds over mTLS, leaves signed by the old issuer keep working until they are renewed, and every proxy's renewal comes from the new issuer",
            plan: mtls_issuer_rotation_under_load,
        },
        Scenario {
            name: "mtls_anchor_rotation_under_load",
            doc: "the trust anchor rotates under load through a bundle: a new anchor joins every bundle at 5 s, the issuer moves to it at 8 s, the old anchor leaves at 45 s; every request succeeds over mTLS and a client joining after the retirement handshakes on the new chain alone",
            plan: mtls_anchor_rotation_under_load,
        },
        Scenario {
            name: "mtls_expiry_while_controller_down",
            doc: "the controller (the CA) is down from 3 s to 40 s and 30 s leaves expire meanwhile: requests succeed while the leaves last, then get the client proxy's own 502 at once; after the controller returns every proxy re-certifies within 12 s and requests succeed again",
            plan: mtls_expiry_while_controller_down,
        },
        Scenario {
            name: "random_chaos",
            doc: "swarm: a seed-drawn mix of partitions, crashes and slow replicas, healed by 7 s; liveness after",
            plan: random_chaos,
        },
    ]
}

/// The scenario called `name`.
#[must_use]
pub fn find(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

/// The proxies' response timeout in scenarios with partitions. turmoil drops a partition's
/// segments and never retransmits them, so a request written to a pooled connection across the
/// partition gets no answer at all (real TCP against a dead peer behaves the same for minutes).
/// The production default (60 s) would still end it, but after the workload's 10 s client
/// deadline; 1 s is what a platform team would set for services whose slowest answer (300 ms
/// here) is far below it.
const PARTITION_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long after a configuration change a proxy that discovers through the controller may
/// still route by the previous one: the controller's push is one gRPC message on a link of at
/// most 5 ms (the worlds' default), plus a tick on each host, with margin.
const CONTROLLER_ROUTING_GRACE: Duration = Duration::from_millis(10);

fn web(replicas: usize, clients: usize) -> WorldSpec {
    WorldSpec::new(vec![ServiceSpec::new(WEB, replicas)], clients)
}

fn hosts(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// Requests started in `[from, to)` (sim time) for `authority`, served per backend host.
fn served_between(
    trace: &Trace,
    from: Duration,
    to: Duration,
) -> (u64, std::collections::BTreeMap<String, u64>) {
    let (from, to) = (micros(from), micros(to));
    let mut total = 0;
    let mut by = std::collections::BTreeMap::new();
    for r in trace
        .requests
        .iter()
        .filter(|r| r.start_us >= from && r.start_us < to)
    {
        if let Some(host) = r.served_by() {
            total += 1;
            *by.entry(host.to_owned()).or_insert(0) += 1;
        }
    }
    (total, by)
}

/// Goal: the proxy carries HTTP/1.1, h2 and gRPC (trailers intact) end to end through two
/// proxies. Method: two clients send a seeded mix of all three protocols, GETs and POSTs with
/// small and 64 KiB bodies, to three replicas; every request must succeed with its own echo,
/// and each protocol must have been exercised.
fn protocols_through_two_proxies(_seed: u64) -> Plan {
    let flows = (0..2)
        .map(|client| Flow {
            protos: vec![Proto::Http1, Proto::Http2, Proto::Grpc],
            post_percent: 30,
            body_bytes: vec![0, 0, 64 * 1024],
            ..Flow::new(client, WEB, 100, ms(100), secs(3))
        })
        .collect();
    Plan::new(web(3, 2), flows).check(|trace| {
        let mut out = Vec::new();
        for proto in [Proto::Http1, Proto::Http2, Proto::Grpc] {
            let ok = trace
                .requests
                .iter()
                .filter(|r| r.proto == proto && r.outcome.is_success())
                .count();
            if ok == 0 {
                out.push(Violation::new(
                    "protocols",
                    format!("no successful {proto:?} request"),
                ));
            }
        }
        out
    })
}

/// Goal: latency-aware balancing (P2C over PeakEWMA) moves traffic off a slow replica.
/// Method: `web-2` answers 100 ms late from the start; at 200 req/s for 8 s, after a 1 s
/// warm-up it must receive under 10% of requests, and the fast replicas each over 30%.
fn latency_aware_balancing(_seed: u64) -> Plan {
    let mut plan = Plan::new(web(3, 1), vec![Flow::new(0, WEB, 200, ms(100), secs(8))]);
    plan.schedule = Schedule::new().at(Duration::ZERO, Action::AppDelay("web-2".into(), ms(100)));
    plan.check(|trace| {
        let (total, by) = served_between(trace, secs(1), secs(8));
        let share = |h: &str| by.get(h).copied().unwrap_or(0) * 100 / total.max(1);
        let mut out = Vec::new();
        if share("web-2") >= 10 {
            out.push(Violation::new(
                "balancing",
                format!(
                    "slow web-2 got {}% of {total} requests: {by:?}",
                    share("web-2")
                ),
            ));
        }
        for fast in ["web-0", "web-1"] {
            if share(fast) < 30 {
                out.push(Violation::new(
                    "balancing",
                    format!("fast {fast} got only {}%: {by:?}", share(fast)),
                ));
            }
        }
        out
    })
}

/// Goal: a replica that accepts requests but stops answering does not swallow the traffic
/// (least-loaded: the in-flight count raises its cost). Method: `web-1` stalls from 1 s to
/// 4 s under 200 req/s; of requests sent during the stall it may receive at most 5%; stalled
/// requests complete after release, within their 10 s deadline; all succeed.
fn least_loaded_stalled_replica(_seed: u64) -> Plan {
    let mut plan = Plan::new(web(3, 1), vec![Flow::new(0, WEB, 200, ms(100), secs(6))]);
    plan.schedule = Schedule::new()
        .at(secs(1), Action::AppStall("web-1".into(), true))
        .at(secs(4), Action::AppStall("web-1".into(), false));
    plan.check(|trace| {
        let (total, by) = served_between(trace, secs(1), secs(4));
        let stalled = by.get("web-1").copied().unwrap_or(0);
        if stalled * 100 > total * 5 {
            vec![Violation::new(
                "least-loaded",
                format!(
                    "stalled web-1 got {stalled} of {total} requests sent during its stall: {by:?}"
                ),
            )]
        } else {
            Vec::new()
        }
    })
}

/// Goal: endpoint churn through discovery never routes to an endpoint outside the
/// configuration, and proxies converge on the last one. Method: four replicas; every 700 ms
/// a seeded subset of two or three becomes the endpoint set; traffic at 150 req/s for 7 s.
/// Discovery is the real controller (its file backend edited by the harness) and every proxy's
/// real Destination client over turmoil, so a change reaches a proxy one gRPC message later:
/// the routing grace is [`CONTROLLER_ROUTING_GRACE`] instead of the static source's 2 ms (a
/// sweep found requests sent 3 ms after a change still routed by the previous one); the
/// 100 ms convergence bound is unchanged.
fn endpoint_churn(seed: u64) -> Plan {
    let mut world = web(4, 2);
    world.discovery = DiscoveryMode::Controller;
    let mut rng = DetRng::new(seed).child("churn");
    let all = hosts(&["web-0", "web-1", "web-2", "web-3"]);
    let mut schedule = Schedule::new();
    for step in 1..=9u64 {
        let mut set: Vec<String> = all
            .iter()
            .filter(|_| conduit_core::rand::Rng::chance(&mut rng, 2, 3))
            .cloned()
            .collect();
        if set.is_empty() {
            set.push(all[usize::try_from(step % 4).unwrap_or(0)].clone());
        }
        schedule.push(ms(700 * step), Action::SetEndpoints(WEB.into(), set));
    }
    let flows = (0..2)
        .map(|c| Flow {
            protos: vec![Proto::Http1, Proto::Http2],
            ..Flow::new(c, WEB, 75, ms(100), secs(7))
        })
        .collect();
    let mut plan = Plan::new(world, flows);
    plan.schedule = schedule;
    plan.checks.routing_grace = CONTROLLER_ROUTING_GRACE;
    plan
}

/// Goal: the controller crashing does not stop the data plane, and proxies converge on the
/// latest configuration once it is back. Method: the controller crashes at 2 s; while it is
/// down the configuration drops `web-0` (3 s); it restarts at 5 s. Requests keep succeeding
/// throughout (proxies keep their last endpoints), and from 6 s none is served by `web-0`.
/// The proxies discover through the real Destination client: the crash closes their streams,
/// they keep the last endpoints and reconnect with jittered backoff (100 ms doubling), so the
/// 3 s routing grace and convergence window cover the outage plus the reconnect.
fn controller_crash(_seed: u64) -> Plan {
    let mut world = web(3, 1);
    world.discovery = DiscoveryMode::Controller;
    let mut plan = Plan::new(world, vec![Flow::new(0, WEB, 100, ms(100), secs(8))]);
    plan.schedule = Schedule::new()
        .at(
            secs(2),
            Action::Crash(conduit_sim::world::CONTROLLER.into()),
        )
        .at(
            secs(3),
            Action::SetEndpoints(WEB.into(), hosts(&["web-1", "web-2"])),
        )
        .at(
            secs(5),
            Action::Bounce(conduit_sim::world::CONTROLLER.into()),
        );
    // Allowed: web-0 keeps serving while the controller is down (last known good).
    plan.checks.routing_grace = secs(3);
    plan.checks.converge_within = Some(secs(3));
    plan
}

/// The check shared by scenarios that tolerate a few specific failures: every failed request
/// must be `expected`, and at most `max` may fail. At most ten violations are reported.
fn only_expected_failures(
    trace: &Trace,
    check: &str,
    max: usize,
    expectation: &str,
    expected: impl Fn(&conduit_sim::trace::RequestRecord) -> bool,
) -> Vec<Violation> {
    let failed: Vec<_> = trace
        .requests
        .iter()
        .filter(|r| !r.outcome.is_success())
        .collect();
    let mut out: Vec<Violation> = failed
        .iter()
        .filter(|r| !expected(r))
        .map(|r| {
            Violation::new(
                check,
                format!(
                    "request {} ({:?}) sent at {} ms: {} ({expectation})",
                    r.id,
                    r.proto,
                    r.start_us / 1000,
                    r.outcome.class()
                ),
            )
        })
        .collect();
    if failed.len() > max {
        out.push(Violation::new(
            check,
            format!("{} requests failed; at most {max} expected", failed.len()),
        ));
    }
    out.truncate(10);
    out
}

/// Goal: a partition between a client's proxy and one replica costs at most the requests
/// caught on it, and the mesh recovers after repair. Method: `client-0` is cut off from `web-1`
/// from 2 s to 5 s at 100 req/s; turmoil drops segments without retransmit, so requests on a
/// pooled connection stall and new connects fail at once. What users see: a request stalled on
/// a pooled connection gets the proxy's 504 after the 1 s response timeout (and the timed-out
/// wait, observed as an RTT, steers the balancer off `web-1`); a connect refused by the
/// partition puts `web-1` in connect backoff and the request, never sent, goes to another
/// replica. So every failure is the proxy's 504 for a request sent during the partition (or
/// in the 50 ms before it, still on the wire when the link is cut), there are at most 10 of
/// them, every request ends before its 10 s deadline, and all requests from 6 s on succeed.
fn partition_proxy_replica(_seed: u64) -> Plan {
    let mut world = web(3, 1);
    world.response_timeout = Some(PARTITION_RESPONSE_TIMEOUT);
    let mut plan = Plan::new(world, vec![Flow::new(0, WEB, 100, ms(100), secs(9))]);
    plan.schedule = Schedule::new()
        .at(
            secs(2),
            Action::Partition("client-0".into(), "web-1".into()),
        )
        .at(secs(5), Action::Repair("client-0".into(), "web-1".into()));
    plan.checks.healthy_after = Some(secs(6));
    plan.checks.metrics = false;
    plan.check(|trace| {
        only_expected_failures(
            trace,
            "partition",
            10,
            "only the proxy's 504 during the partition is expected",
            |r| {
                // A request sent just before 2 s can still be on the wire when the link is cut.
                let in_partition = r.start_us >= 1_950_000 && r.start_us < 5_000_000;
                let proxy_made = matches!(
                    &r.outcome,
                    conduit_sim::Outcome::Response {
                        status: 504,
                        proxy_error: Some(_),
                        ..
                    }
                );
                in_partition && proxy_made
            },
        )
    })
}

/// Goal: a replica crash is confined to the replica's outage and the restarted replica is
/// used again. Method: `web-1` crashes at 2 s and restarts at 4 s under 100 req/s; requests
/// from 5 s on all succeed, and `web-1` serves again after its restart.
fn replica_crash_restart(_seed: u64) -> Plan {
    let mut plan = Plan::new(web(3, 1), vec![Flow::new(0, WEB, 100, ms(100), secs(8))]);
    plan.schedule = Schedule::new()
        .at(secs(2), Action::Crash("web-1".into()))
        .at(secs(4), Action::Bounce("web-1".into()));
    plan.checks.healthy_after = Some(secs(5));
    plan.check(|trace| {
        let (_, by) = served_between(trace, secs(5), secs(8));
        if by.get("web-1").copied().unwrap_or(0) == 0 {
            vec![Violation::new(
                "recovery",
                format!("restarted web-1 served nothing after 5 s: {by:?}"),
            )]
        } else {
            Vec::new()
        }
    })
}

/// Goal: with no endpoints, requests fail fast with 504 and the proxy's error header, and
/// traffic recovers when endpoints return. Method: at 2 s the configuration empties `web`;
/// fail-fast is 1 s; at 5 s the replicas return. Requests sent in [2.1 s, 4 s) must get 504
/// with `conduit-proxy-error`; requests from 5.5 s on succeed.
fn all_replicas_gone(_seed: u64) -> Plan {
    let mut world = web(2, 1);
    world.failfast_timeout = secs(1);
    let mut plan = Plan::new(world, vec![Flow::new(0, WEB, 50, ms(100), secs(8))]);
    plan.schedule = Schedule::new()
        .at(secs(2), Action::SetEndpoints(WEB.into(), Vec::new()))
        .at(
            secs(5),
            Action::SetEndpoints(WEB.into(), hosts(&["web-0", "web-1"])),
        );
    plan.checks.healthy_after = Some(ms(5500));
    plan.check(|trace| {
        let mut out = Vec::new();
        let mut seen = 0;
        for r in trace
            .requests
            .iter()
            .filter(|r| r.start_us >= 2_100_000 && r.start_us < 4_000_000)
        {
            seen += 1;
            match &r.outcome {
                conduit_sim::Outcome::Response {
                    status: 504,
                    proxy_error: Some(_),
                    ..
                } => {}
                other => out.push(Violation::new(
                    "no-endpoints",
                    format!(
                        "request {} sent at {} ms with no endpoints: {}",
                        r.id,
                        r.start_us / 1000,
                        other.class()
                    ),
                )),
            }
        }
        if seen == 0 {
            out.push(Violation::new(
                "no-endpoints",
                "no request was sent while the service had no endpoints",
            ));
        }
        out.truncate(10);
        out
    })
}

/// Success rate, in thousandths, of the requests started in `[from, to)`, and how many there
/// were.
fn success_per_mille(trace: &Trace, from: Duration, to: Duration) -> (u64, u64) {
    let (from, to) = (micros(from), micros(to));
    let (mut total, mut ok) = (0u64, 0u64);
    for r in trace
        .requests
        .iter()
        .filter(|r| r.start_us >= from && r.start_us < to)
    {
        total += 1;
        ok += u64::from(r.outcome.is_success());
    }
    (ok * 1000 / total.max(1), total)
}

/// When the client saw `host`'s seventh failure in a row from `from` on (the default breaker
/// trips on it), if it did.
fn seventh_failure_us(trace: &Trace, host: &str, from: Duration) -> Option<u64> {
    let mut answers: Vec<_> = trace
        .requests
        .iter()
        .filter(|r| r.start_us >= micros(from) && r.served_by() == Some(host))
        .collect();
    answers.sort_by_key(|r| r.end_us);
    let mut row = 0;
    for r in answers {
        row = if r.outcome.is_success() { 0 } else { row + 1 };
        if row == 7 {
            return Some(r.end_us);
        }
    }
    None
}

/// Goal: the circuit breaker takes a replica that fails every request out of rotation, so
/// clients' success rate rises, and admits it again by a probe once it heals; it never takes
/// more than half the replicas. Method: three replicas, 100 req/s for 16 s, the default breaker
/// (7 failures in a row; penalties 1 s doubling to 60 s, jitter 0.5; at most half ejected);
/// `web-2` answers every request with a 500 from 1 s to 6 s. The ejection is its seventh
/// failure in a row as the client saw it. Of the requests sent from then (plus 5 ms for the
/// answer to reach the client) to 6 s, `web-2` may serve only its probes: penalties of at
/// least 1, 1 and 2 s allow at most 3 by 6 s; and at least 98 % of them succeed, more than of
/// those sent between 1 s and the ejection. A probe that meets the failure ejects `web-2`
/// again for a doubled penalty: with penalties jittered by half either way and at least 1 s
/// (1-1.5 s, 1-3 s, 2-6 s, then 4-12 s), three probes can fail before the heal (the last by
/// about 5.1 s) and the fourth penalty end as late as about 17.1 s. From 12 s on every request
/// succeeds, and `web-2`
/// serves again from 18 s (the traffic runs to 20 s). (16 s and a window from 12 s, as first
/// written, missed the fourth penalty: 9 of 2,000 seeds, e.g. 1243, failed the check.)
fn breaker_ejects_failing_replica(_seed: u64) -> Plan {
    let mut plan = Plan::new(web(3, 1), vec![Flow::new(0, WEB, 100, ms(100), secs(20))]);
    plan.schedule = Schedule::new()
        .at(secs(1), Action::AppFail("web-2".into(), true))
        .at(secs(6), Action::AppFail("web-2".into(), false));
    plan.checks.healthy_after = Some(secs(12));
    plan.check(|trace| {
        let mut out = Vec::new();
        let Some(tripped_us) = seventh_failure_us(trace, "web-2", secs(1)) else {
            return vec![Violation::new(
                "ejection",
                "web-2 never failed seven requests in a row",
            )];
        };
        let ejected = Duration::from_micros(tripped_us) + ms(5);
        let (_, out_of_rotation) = served_between(trace, ejected, secs(6));
        let probes = out_of_rotation.get("web-2").copied().unwrap_or(0);
        if probes > 3 {
            out.push(Violation::new(
                "ejection",
                format!(
                    "failing web-2 served {probes} requests sent from its ejection at {} ms to 6 s (at most 3 probes expected): {out_of_rotation:?}",
                    ejected.as_millis()
                ),
            ));
        }
        let (before, before_n) = success_per_mille(trace, secs(1), ejected);
        let (during, during_n) = success_per_mille(trace, ejected, secs(6));
        if during < 980 || during <= before {
            out.push(Violation::new(
                "ejection",
                format!(
                    "success {during}‰ of {during_n} requests with web-2 ejected, {before}‰ of {before_n} before"
                ),
            ));
        }
        let (_, readmitted) = served_between(trace, secs(18), secs(20));
        if readmitted.get("web-2").copied().unwrap_or(0) == 0 {
            out.push(Violation::new(
                "readmission",
                format!("healed web-2 served nothing from 18 s: {readmitted:?}"),
            ));
        }
        out
    })
}

/// `web.default`'s profile for the retry scenarios: `/items` retried (up to `max_attempts`,
/// within `budget`, Linkerd's defaults where `None`), `/plain` never.
fn retry_profile(max_attempts: u32, budget: RawBudget) -> RawProfile {
    let mut items = route("items", None, "/items");
    items.retry = Some(RawRetry {
        max_attempts: Some(max_attempts),
        budget,
        ..RawRetry::default()
    });
    RawProfile {
        routes: vec![items, route("plain", None, "/plain")],
    }
}

/// Successes per mille among requests on paths starting with `prefix`, and how many.
fn success_on(trace: &Trace, prefix: &str) -> (u64, u64) {
    let on: Vec<_> = trace
        .requests
        .iter()
        .filter(|r| r.path.starts_with(prefix))
        .collect();
    let ok = on.iter().filter(|r| r.outcome.is_success()).count() as u64;
    let total = on.len() as u64;
    (ok * 1000 / total.max(1), total)
}

/// Goal: retries turn a failing replica's errors into successes for callers, on the routes
/// that allow them and only there. Method: three replicas, `web-2` answering 500 throughout
/// (circuit breaking off, so retries act alone); client 0 sends GETs on the retrying `/items`
/// route and client 1 the same on the plain `/plain` route, 20 req/s each over h1 and h2;
/// client 2 POSTs to `/items` (not idempotent: never retried). Clients see at least 90 % of
/// `/items` GETs succeed, fewer `/plain` GETs than that (about a third fail), and the generic
/// at-most-once check holds every POST to one arrival. (Swept over seeds 0..2000, the first
/// version failed 97 seeds, e.g. 1061 and 1298: retries went back to `web-2`, whose fast 500s
/// made it look like the cheapest replica, and up to 12 of 90 GETs failed. A retry now goes
/// elsewhere than the attempt it follows when another replica is ready.)
fn retries_lift_a_failing_replica(_seed: u64) -> Plan {
    let world = WorldSpec::new(
        vec![
            ServiceSpec::new(WEB, 3)
                .with_profile(retry_profile(3, RawBudget::default()))
                .without_breaker(),
        ],
        3,
    );
    let protos = vec![Proto::Http1, Proto::Http2];
    let flows = vec![
        Flow {
            protos: protos.clone(),
            paths: vec!["/items/1".into()],
            ..Flow::new(0, WEB, 20, ms(500), secs(5))
        },
        Flow {
            protos: protos.clone(),
            paths: vec!["/plain/1".into()],
            ..Flow::new(1, WEB, 20, ms(500), secs(5))
        },
        Flow {
            protos,
            paths: vec!["/items/new".into()],
            post_percent: 100,
            ..Flow::new(2, WEB, 10, ms(500), secs(5))
        },
    ];
    let mut plan = Plan::new(world, flows);
    plan.schedule = Schedule::new().at(ms(100), Action::AppFail("web-2".into(), true));
    plan.checks.healthy_after = None;
    plan.check(|trace| {
        let retried = trace
            .requests
            .iter()
            .filter(|r| r.path.starts_with("/items/1"));
        let (ok, n) = (
            retried.clone().filter(|r| r.outcome.is_success()).count() as u64,
            retried.count() as u64,
        );
        let items = ok * 1000 / n.max(1);
        let (plain, plain_n) = success_on(trace, "/plain");
        let mut out = Vec::new();
        if items < 900 || plain >= items {
            out.push(Violation::new(
                "retries",
                format!(
                    "GETs on the retrying route succeeded {items}‰ of {n}, on the plain route {plain}‰ of {plain_n}"
                ),
            ));
        }
        out
    })
}

/// The injected delay of `fault_injection`.
const INJECTED_DELAY: Duration = Duration::from_millis(50);

/// Goal: a route's fault policy fails and slows the share of requests it says, and nothing
/// else. Method: `web` (three replicas) has a route `/items` whose policy aborts 10 % of its
/// requests with 503 (gRPC 14) and delays 20 % by 50 ms, and a route `/plain` without one;
/// client 0 sends h1, h2 and gRPC GETs to `/items` at 40 req/s for 10 s (about 400), client
/// 1 the same to `/plain` at 20 req/s. Checks: every failure is on `/items` and is the
/// client proxy's own answer saying it injected a fault, with no endpoint picked and no app
/// arrival; aborts are 4 % to 16 % of `/items` requests and delays (successes that took 50 ms
/// or more; unmeshed hops take a few ms) 12 % to 28 % of its successes (five standard
/// deviations around 10 % and 20 % of 400); every `/plain` request succeeds; proxy counters
/// agree with the clients (the generic check).
fn fault_injection(_seed: u64) -> Plan {
    let mut items = route("items", None, "/items");
    items.fault = Some(RawFault {
        abort: Some(RawAbort {
            status: Some(503),
            grpc: None,
            percent: Some(Ratio(10.0)),
        }),
        delay: Some(RawDelay {
            duration: Some(format!("{}ms", INJECTED_DELAY.as_millis())),
            percent: Some(Ratio(20.0)),
        }),
    });
    let profile = RawProfile {
        routes: vec![items, route("plain", None, "/plain")],
    };
    let world = WorldSpec::new(vec![ServiceSpec::new(WEB, 3).with_profile(profile)], 2);
    let protos = vec![Proto::Http1, Proto::Http2, Proto::Grpc];
    let flows = vec![
        Flow {
            protos: protos.clone(),
            paths: vec!["/items/1".into()],
            ..Flow::new(0, WEB, 40, ms(100), secs(10))
        },
        Flow {
            protos,
            paths: vec!["/plain/1".into()],
            ..Flow::new(1, WEB, 20, ms(100), secs(10))
        },
    ];
    let mut plan = Plan::new(world, flows);
    plan.checks.healthy_after = None;
    plan.check(|trace| {
        let mut out = Vec::new();
        let arrived: std::collections::BTreeSet<u64> =
            trace.arrivals.iter().filter_map(|a| a.id).collect();
        let mut aborted = 0u64;
        for r in &trace.requests {
            if r.outcome.is_success() {
                continue;
            }
            let injected = matches!(&r.outcome, conduit_sim::Outcome::Response { status, grpc_status, proxy_error: Some(reason), .. }
                if reason.contains("fault injected")
                    && (*status == 503 || (*status == 200 && *grpc_status == Some(14))));
            if !injected || !r.path.starts_with("/items") {
                out.push(Violation::new(
                    "fault",
                    format!("request {} to {} failed otherwise than by the injected abort: {:?}", r.id, r.path, r.outcome),
                ));
            } else if !r.picks.is_empty() || arrived.contains(&r.id) {
                out.push(Violation::new(
                    "fault",
                    format!("the aborted request {} was sent to an endpoint ({} picks, arrived: {})", r.id, r.picks.len(), arrived.contains(&r.id)),
                ));
            }
            aborted += u64::from(injected);
        }
        let items: Vec<_> = trace.requests.iter().filter(|r| r.path.starts_with("/items")).collect();
        let n = items.len() as u64;
        let ok: Vec<_> = items.iter().filter(|r| r.outcome.is_success()).collect();
        let delayed = ok
            .iter()
            .filter(|r| r.end_us.saturating_sub(r.start_us) >= micros(INJECTED_DELAY))
            .count() as u64;
        let abort_permille = aborted * 1000 / n.max(1);
        let delay_permille = delayed * 1000 / (ok.len() as u64).max(1);
        if n < 300 || !(40..=160).contains(&abort_permille) || !(120..=280).contains(&delay_permille) {
            out.push(Violation::new(
                "fault",
                format!("of {n} requests on /items, {abort_permille}‰ aborted (100‰ set) and {delay_permille}‰ of the successes delayed (200‰ set)"),
            ));
        }
        out.truncate(10);
        out
    })
}

/// Goal: retries never multiply the load on a service that is failing outright. Method: two
/// replicas both answer 500 from 1 s to 5 s (breaker off) while a client sends 100 GET/s to
/// `/items`, whose route allows 10 attempts within the default budget (0.2 of requests plus
/// 10/s, over 10 s). Over the failure, what the backends see stays within the budget's bound
/// (the requests, plus 0.2 of every request that deposited, plus 10/s over the run and the
/// reserve's first second), near 1.3x the requests and far below the 10x the attempts alone
/// would allow; once the replicas heal, every request succeeds again.
fn no_retry_storm(_seed: u64) -> Plan {
    let world = WorldSpec::new(
        vec![
            ServiceSpec::new(WEB, 2)
                .with_profile(retry_profile(10, RawBudget::default()))
                .without_breaker(),
        ],
        1,
    );
    let flows = vec![Flow {
        protos: vec![Proto::Http1, Proto::Http2],
        paths: vec!["/items/1".into()],
        ..Flow::new(0, WEB, 100, ms(500), secs(7))
    }];
    let mut plan = Plan::new(world, flows);
    plan.schedule = Schedule::new()
        .at(secs(1), Action::AppFail("web-0".into(), true))
        .at(secs(1), Action::AppFail("web-1".into(), true))
        .at(secs(5), Action::AppFail("web-0".into(), false))
        .at(secs(5), Action::AppFail("web-1".into(), false));
    plan.checks.healthy_after = Some(ms(5_500));
    plan.check(|trace| {
        let attempts = trace.attempts();
        // Requests sent while every replica failed (a retry's backoff is at most 250 ms, so
        // those sent in the last quarter second may retry after the heal: left out).
        let (from, to) = (micros(secs(1)), micros(ms(4_750)));
        let failing: Vec<_> = trace
            .requests
            .iter()
            .filter(|r| r.start_us >= from && r.start_us < to)
            .collect();
        let requests = failing.len() as u64;
        let arrivals: u64 = failing
            .iter()
            .map(|r| attempts.get(&r.id).copied().unwrap_or(0))
            .sum();
        // What could pay for those retries: 0.2 of every request that deposited before the
        // last of them went (all are within the 10 s ttl; a retry follows its failure by at
        // most the 250 ms backoff), and the reserve over that time plus its first second.
        let last_retry = to + micros(ms(250));
        let deposits = trace
            .requests
            .iter()
            .filter(|r| r.start_us < last_retry)
            .count() as u64;
        let first = trace.requests.iter().map(|r| r.start_us).min().unwrap_or(0);
        let reserve = 10 * (last_retry.saturating_sub(first) / 1_000_000 + 2);
        let bound = requests + deposits / 5 + reserve;
        if arrivals > bound || requests == 0 {
            vec![Violation::new(
                "retry-storm",
                format!(
                    "{requests} requests sent while every replica failed reached backends {arrivals} times (x{:.2}); the budget allows {bound}",
                    arrivals as f64 / requests.max(1) as f64
                ),
            )]
        } else {
            Vec::new()
        }
    })
}

/// Goal: a route's request timeout bounds all of a request's attempts together. Method: the
/// `/items` route times attempts out after 100 ms and requests after 400 ms, and allows 10
/// attempts; the app answers 2 s late. Every request gets the proxy's 504 within 400 ms (plus
/// the slack of the wire), after at most four attempts.
fn request_timeout_caps_retries(_seed: u64) -> Plan {
    let mut profile = retry_profile(
        10,
        RawBudget {
            ratio: Some(Ratio(1.0)),
            ..RawBudget::default()
        },
    );
    profile.routes[0].timeouts = RawTimeouts {
        request: Some("400ms".into()),
        attempt: Some("100ms".into()),
    };
    let world = WorldSpec::new(vec![ServiceSpec::new(WEB, 2).with_profile(profile)], 1);
    let flows = vec![Flow {
        protos: vec![Proto::Http1, Proto::Http2],
        paths: vec!["/items/1".into()],
        app_delay: Some(secs(2)),
        ..Flow::new(0, WEB, 20, ms(100), secs(3))
    }];
    let mut plan = Plan::new(world, flows);
    plan.checks.healthy_after = None;
    plan.check(|trace| {
        let attempts = trace.attempts();
        let limit = micros(ms(400) + DEADLINE_SLACK);
        let mut out = Vec::new();
        for r in &trace.requests {
            let took = r.headers_us.unwrap_or(r.end_us).saturating_sub(r.start_us);
            let n = attempts.get(&r.id).copied().unwrap_or(0);
            let answered = matches!(
                &r.outcome,
                conduit_sim::Outcome::Response {
                    status: 504,
                    proxy_error: Some(_),
                    ..
                }
            );
            if took > limit || n > 4 || !answered {
                out.push(Violation::new(
                    "request-timeout",
                    format!(
                        "request {} ({:?}): {} after {} ms and {n} attempts",
                        r.id,
                        r.proto,
                        r.outcome.class(),
                        took / 1000
                    ),
                ));
            }
        }
        out.truncate(10);
        out
    })
}

/// Goal: hedging cuts the latency tail callers see, within the retry budget. Method: two
/// services of three replicas each, every replica answering 3 % of its requests 1 s late (a
/// tail the balancer cannot steer around); `web.default`'s `/items` route hedges after its p90
/// latency (one hedge, default budget) and `api.default`'s identical route does not. Client 0
/// sends 200 GET/s to each, over h1 and h2, for 8 s (a p99 over ~1,580 requests: a request
/// and its hedge both meet the tail 0.09 % of the time, far from the 1 % that would move it;
/// with 5 % and 790 requests, 23 of 2,000 seeds had too many such pairs, e.g. 1004). In the
/// same run (same seed, same tail),
/// the p99 time to response headers on the hedged service is under half the unhedged one's;
/// every request succeeds; the backends of the hedged service see at most the requests plus
/// the budget's share (0.2 of them and 10/s over the run and its first second).
fn hedging_cuts_the_tail(_seed: u64) -> Plan {
    const API: &str = "api.default";
    let hedged = {
        let mut items = route("items", None, "/items");
        items.retry = Some(RawRetry {
            hedge: Some(RawHedge {
                after: Some("p90".into()),
                max: Some(1),
            }),
            ..RawRetry::default()
        });
        RawProfile {
            routes: vec![items],
        }
    };
    let plain = RawProfile {
        routes: vec![route("items", None, "/items")],
    };
    let world = WorldSpec::new(
        vec![
            ServiceSpec::new(WEB, 3)
                .with_profile(hedged)
                .without_breaker(),
            ServiceSpec::new(API, 3)
                .with_profile(plain)
                .without_breaker(),
        ],
        1,
    );
    let flows = [WEB, API]
        .into_iter()
        .map(|authority| Flow {
            protos: vec![Proto::Http1, Proto::Http2],
            paths: vec!["/items/1".into()],
            ..Flow::new(0, authority, 200, ms(100), secs(8))
        })
        .collect();
    let mut plan = Plan::new(world, flows);
    let mut schedule = Schedule::new();
    for host in ["web-0", "web-1", "web-2", "api-0", "api-1", "api-2"] {
        schedule = schedule.at(Duration::ZERO, Action::AppTail(host.into(), 30, secs(1)));
    }
    plan.schedule = schedule;
    plan.checks.healthy_after = None;
    plan.check(|trace| {
        let p99 = |authority: &str| {
            let mut took: Vec<u64> = trace
                .requests
                .iter()
                .filter(|r| r.authority == authority)
                .map(|r| r.headers_us.unwrap_or(r.end_us).saturating_sub(r.start_us))
                .collect();
            took.sort_unstable();
            let at = (took.len() * 99).div_ceil(100).saturating_sub(1);
            (took.get(at).copied().unwrap_or(0), took.len() as u64)
        };
        let ((hedged, n), (plain, m)) = (p99(WEB), p99(API));
        let mut out = Vec::new();
        if n == 0 || m == 0 || hedged * 2 >= plain {
            out.push(Violation::new(
                "hedging",
                format!(
                    "p99 with hedging {} ms over {n} requests, without {} ms over {m}",
                    hedged / 1000,
                    plain / 1000
                ),
            ));
        }
        let failed = trace.requests.iter().filter(|r| !r.outcome.is_success()).count();
        if failed > 0 {
            out.push(Violation::new("hedging", format!("{failed} requests failed")));
        }
        let attempts = trace.attempts();
        let arrivals: u64 = trace
            .requests
            .iter()
            .filter(|r| r.authority == WEB)
            .map(|r| attempts.get(&r.id).copied().unwrap_or(0))
            .sum();
        let first = trace.requests.iter().map(|r| r.start_us).min().unwrap_or(0);
        let last = trace.requests.iter().map(|r| r.start_us).max().unwrap_or(0);
        let bound = n + n / 5 + 10 * ((last - first) / 1_000_000 + 2);
        if arrivals > bound {
            out.push(Violation::new(
                "hedging",
                format!("{n} hedged requests reached backends {arrivals} times; the budget allows {bound}"),
            ));
        }
        out
    })
}

/// Goal: a slow reader does not hurt other clients. Method: `client-0` downloads 1 MiB bodies
/// and pauses 20 ms between body frames (flow control pushes back through both proxies);
/// `client-1` sends small requests at 100 req/s to the same replicas. All succeed and
/// `client-1`'s slowest request takes under 100 ms.
fn slow_client(_seed: u64) -> Plan {
    let flows = vec![
        Flow {
            body_bytes: vec![1024 * 1024],
            read_pause: Some(ms(20)),
            deadline: secs(30),
            ..Flow::new(0, WEB, 2, ms(100), secs(4))
        },
        Flow::new(1, WEB, 100, ms(100), secs(4)),
    ];
    Plan::new(web(2, 2), flows).check(|trace| {
        let worst = trace
            .requests
            .iter()
            .filter(|r| r.client == 1)
            .map(|r| r.end_us - r.start_us)
            .max()
            .unwrap_or(0);
        if worst > 100_000 {
            vec![Violation::new(
                "isolation",
                format!("client-1's slowest request took {} ms", worst / 1000),
            )]
        } else {
            Vec::new()
        }
    })
}

/// Goal: large bodies stream intact through two proxies across many ticks, both ways.
/// Method: POST uploads and GET downloads of 256 KiB to 2 MiB over HTTP/1.1 and h2; every
/// body's length and byte pattern is verified (downloads by the client, uploads by the
/// backend's received-byte count via the echo).
fn large_streamed_bodies(_seed: u64) -> Plan {
    let flow = Flow {
        protos: vec![Proto::Http1, Proto::Http2],
        post_percent: 50,
        body_bytes: vec![256 * 1024, 1024 * 1024, 2 * 1024 * 1024],
        deadline: secs(30),
        ..Flow::new(0, WEB, 10, ms(100), secs(3))
    };
    Plan::new(web(2, 1), vec![flow])
}

/// Goal: HTTP/2 GOAWAY from a restarting replica is handled: no response mixing, no duplicate
/// non-retryable requests, and no error at all. Method: h2 and gRPC traffic at 150 req/s; at
/// 2 s `web-0`'s proxy drains gracefully (stops accepting, sends GOAWAY); at 3 s the host
/// restarts. After the GOAWAY the client proxy's connection to `web-0` closes; a request that
/// then meets a refused connect, a connection that closed before its stream opened, or (without
/// a body) a stream the GOAWAY excluded was never processed, so the proxy sends it again to
/// another endpoint, and every such request succeeds. The one known gap: a request *with* a
/// body (gRPC) whose stream the GOAWAY excluded cannot be rebuilt (bodies stream through,
/// unbuffered), so it gets the proxy's UNAVAILABLE; only such requests, sent within 10 ms of
/// the drain, may fail (at most 2; a sweep of 150 seeds saw 2 seeds with one each), and
/// every request from 2.1 s on succeeds.
fn h2_goaway_on_restart(_seed: u64) -> Plan {
    let flow = Flow {
        protos: vec![Proto::Http2, Proto::Grpc],
        post_percent: 30,
        ..Flow::new(0, WEB, 150, ms(100), secs(6))
    };
    let mut plan = Plan::new(web(2, 1), vec![flow]);
    plan.schedule = Schedule::new()
        .at(secs(2), Action::DrainProxy("web-0".into()))
        .at(secs(3), Action::Crash("web-0".into()))
        .at(secs(3), Action::Bounce("web-0".into()));
    plan.checks.healthy_after = Some(ms(2100));
    plan.check(|trace| {
        only_expected_failures(
            trace,
            "goaway",
            2,
            "only a gRPC stream refused at the drain may fail",
            |r| {
                let at_drain = r.start_us >= 2_000_000 && r.start_us < 2_010_000;
                let refused_with_body = r.proto == Proto::Grpc
                    && matches!(
                        &r.outcome,
                        conduit_sim::Outcome::Response {
                            grpc_status: Some(14),
                            proxy_error: Some(_),
                            ..
                        }
                    );
                at_drain && refused_with_body
            },
        )
    })
}

/// Goal: configuration versions are applied in order. Method: after the initial version (all
/// four replicas), five versions 300 ms apart, each naming a single replica (the first overlaps
/// the initial version, the others are disjoint from their predecessor); a client sends at
/// 100 req/s. The generic checks hold it to what the client's proxy reports: the versions it
/// applies never go backwards, each request goes to an endpoint of the state it was picked
/// under, the configurations requests are picked under never decrease, and after the last
/// version the proxy has applied it and only its replica serves. The versions travel through
/// the real controller and the proxy's Destination client (versioned diffs over gRPC on
/// turmoil), so the routing grace is [`CONTROLLER_ROUTING_GRACE`] (one controller message),
/// not the static 2 ms.
fn config_never_out_of_order(_seed: u64) -> Plan {
    let mut world = web(4, 1);
    world.discovery = DiscoveryMode::Controller;
    let mut plan = Plan::new(world, vec![Flow::new(0, WEB, 100, ms(100), secs(3))]);
    plan.checks.routing_grace = CONTROLLER_ROUTING_GRACE;
    let mut schedule = Schedule::new();
    for (i, host) in ["web-1", "web-2", "web-3", "web-0", "web-2"]
        .iter()
        .enumerate()
    {
        let at = ms(500 + 300 * u64::try_from(i).unwrap_or(0));
        schedule.push(at, Action::SetEndpoints(WEB.into(), hosts(&[host])));
    }
    plan.schedule = schedule;
    plan
}

/// How late after its deadline, as the client measures from its send, a timed-out request may
/// be answered. The proxy's deadline counts from when it read the request, and its timer fires
/// on the tick at or after it (1 ms ticks); the rest is the client's own side: each loopback
/// segment between the client and its proxy takes a tick, and a request may first wait for the
/// client's shared h2 connection to its proxy to be (re)established, a few segments more. Far
/// below the 1 to 2 s at which the slow app would answer.
const DEADLINE_SLACK: Duration = Duration::from_millis(15);

/// A route matching a path prefix (and a method, if given).
fn route(name: &str, method: Option<&str>, prefix: &str) -> RawRoute {
    RawRoute {
        name: name.to_owned(),
        matches: RawRequestMatch {
            method: method.map(str::to_owned),
            path: Some(RawPathMatch {
                prefix: Some(prefix.to_owned()),
                ..RawPathMatch::default()
            }),
            ..RawRequestMatch::default()
        },
        ..RawRoute::default()
    }
}

/// The route scenarios' profile of `web.default`: items (GET and POST), a route whose requests
/// time out after 300 ms, and one whose attempts time out after 150 ms.
fn web_profile() -> RawProfile {
    let mut slow = route("slow", None, "/slow");
    slow.timeouts = RawTimeouts {
        request: Some("300ms".into()),
        attempt: None,
    };
    let mut attempt = route("attempt", None, "/attempt");
    attempt.timeouts = RawTimeouts {
        request: Some("5s".into()),
        attempt: Some("150ms".into()),
    };
    RawProfile {
        routes: vec![
            route("get-item", Some("GET"), "/items/"),
            route("items", None, "/items"),
            slow,
            attempt,
        ],
    }
}

/// The validated profiles of the route scenarios, by authority, for the checkers.
fn web_profiles() -> std::collections::BTreeMap<String, Profile> {
    let profile = Profile::try_from(web_profile()).unwrap_or_default();
    std::collections::BTreeMap::from([(WEB.to_owned(), profile)])
}

/// Checks that every request on a path starting with `prefix` was answered by the proxy with
/// `reason` (its `conduit-proxy-error`, for HTTP and gRPC alike), no sooner than `after` and no
/// later than `after` plus [`DEADLINE_SLACK`] from when the client sent it.
fn timed_out(trace: &Trace, prefix: &str, reason: &str, after: Duration) -> Vec<Violation> {
    let (low, high) = (micros(after), micros(after + DEADLINE_SLACK));
    let mut out = Vec::new();
    for r in trace.requests.iter().filter(|r| r.path.starts_with(prefix)) {
        let answered = match &r.outcome {
            conduit_sim::Outcome::Response {
                proxy_error: Some(error),
                ..
            } if error.contains(reason) => r.headers_us.map(|h| h.saturating_sub(r.start_us)),
            _ => None,
        };
        match answered {
            Some(took) if (low..=high).contains(&took) => {}
            Some(took) => out.push(Violation::new(
                "deadline-time",
                format!(
                    "request {} ({:?} {}) timed out after {took} µs, not within {low}..={high} µs",
                    r.id, r.proto, r.path
                ),
            )),
            None => out.push(Violation::new(
                "deadline-time",
                format!(
                    "request {} ({:?} {}): {} (expected the proxy's `{reason}`)",
                    r.id,
                    r.proto,
                    r.path,
                    r.outcome.class()
                ),
            )),
        }
    }
    out.truncate(10);
    out
}

/// Goal: per-route timeouts fire at their configured deadline in simulated time, on every
/// protocol, and touch no other route. Method: `web.default`'s profile times out `/slow`
/// requests after 300 ms and `/attempt` attempts after 150 ms; three clients send (h1, h2 and
/// gRPC) to `/slow` and `/attempt` of an app that answers 2 s late, and to `/items/*`, which
/// it answers at once. Every slow request must get the proxy's 504 (gRPC: DEADLINE_EXCEEDED)
/// between its deadline and [`DEADLINE_SLACK`] later; every `/items` request succeeds; the
/// per-route counters agree with the clients.
fn route_timeouts_fire_at_deadline(_seed: u64) -> Plan {
    let world = WorldSpec::new(
        vec![ServiceSpec::new(WEB, 2).with_profile(web_profile())],
        3,
    );
    let all = vec![Proto::Http1, Proto::Http2, Proto::Grpc];
    let flows = vec![
        Flow {
            protos: all.clone(),
            paths: vec!["/slow/report".into()],
            app_delay: Some(secs(2)),
            ..Flow::new(0, WEB, 20, ms(100), secs(3))
        },
        Flow {
            protos: all.clone(),
            paths: vec!["/attempt/report".into()],
            app_delay: Some(secs(2)),
            ..Flow::new(1, WEB, 20, ms(100), secs(3))
        },
        Flow {
            protos: all,
            paths: vec!["/items/1".into(), "/items/2".into()],
            ..Flow::new(2, WEB, 50, ms(100), secs(3))
        },
    ];
    let mut plan = Plan::new(world, flows);
    plan.checks.healthy_after = None;
    let profiles = web_profiles();
    plan.check(|t| timed_out(t, "/slow", "request timed out after 300ms", ms(300)))
        .check(|t| {
            timed_out(
                t,
                "/attempt",
                "within the attempt timeout of 150ms",
                ms(150),
            )
        })
        .check(|t| {
            only_expected_failures(t, "items-ok", usize::MAX, "only slow routes fail", |r| {
                !r.path.starts_with("/items")
            })
        })
        .check(move |t| check::route_metrics_agree(t, &profiles))
}

/// Goal: a caller's deadline holds end to end. Method: one client sends h1, h2 and gRPC
/// requests announcing `grpc-timeout: 200ms` to an app that answers 1 s late, through its own
/// proxy and the replica's. Every request must end with a proxy's answer citing the caller's
/// deadline, between 200 ms and [`DEADLINE_SLACK`] later (not when the app answers), and
/// every request the app saw must carry a deadline, never longer than the caller's (each proxy
/// passes on only what remains of it; in simulated time no time passes inside a proxy, so
/// what remains at dispatch is all of it).
fn deadline_through_two_proxies(_seed: u64) -> Plan {
    let flows = vec![Flow {
        protos: vec![Proto::Http1, Proto::Http2, Proto::Grpc],
        grpc_timeout: Some(ms(200)),
        app_delay: Some(secs(1)),
        ..Flow::new(0, WEB, 30, ms(100), secs(3))
    }];
    let mut plan = Plan::new(web(2, 1), flows);
    plan.checks.healthy_after = None;
    plan.check(|t| timed_out(t, "/echo", "grpc-timeout", ms(200)))
        .check(|t| {
            let mut out: Vec<Violation> = t
                .arrivals
                .iter()
                .filter(|a| !a.grpc_timeout_us.is_some_and(|us| us > 0 && us <= 200_000))
                .map(|a| {
                    Violation::new(
                        "deadline-propagated",
                        format!(
                            "request {:?} reached {} with grpc-timeout {:?} µs (expected at most the caller's 200 ms)",
                            a.id, a.host, a.grpc_timeout_us
                        ),
                    )
                })
                .collect();
            if t.arrivals.is_empty() {
                out.push(Violation::new(
                    "deadline-propagated",
                    "no request reached an app",
                ));
            }
            out.truncate(10);
            out
        })
}

/// Goal: per-route counters are exact. Method: two clients send h1, h2 and gRPC GETs and
/// POSTs to `/items/1`, `/items` and `/other` of `web.default` (whose profile routes them to
/// `get-item`, `items` and `default`) for 5 s; each client proxy's `route_response_total`
/// must equal, per route and status, what its client received.
fn route_metrics_agree(_seed: u64) -> Plan {
    let world = WorldSpec::new(
        vec![ServiceSpec::new(WEB, 3).with_profile(web_profile())],
        2,
    );
    let flows = (0..2)
        .map(|c| Flow {
            protos: vec![Proto::Http1, Proto::Http2, Proto::Grpc],
            post_percent: 30,
            paths: vec!["/items/1".into(), "/items".into(), "/other".into()],
            ..Flow::new(c, WEB, 60, ms(100), secs(5))
        })
        .collect();
    let profiles = web_profiles();
    Plan::new(world, flows).check(move |t| check::route_metrics_agree(t, &profiles))
}

/// Goal: a fault-free mesh at steady load: every invariant holds, and this is the benchmark
/// workload. Method: two services (three and two replicas), three clients sending a mix of
/// HTTP/1.1, h2 and gRPC to both at 100 req/s each for 10 s.
fn steady_mesh(_seed: u64) -> Plan {
    let world = WorldSpec::new(
        vec![ServiceSpec::new(WEB, 3), ServiceSpec::new("api.default", 2)],
        3,
    );
    let mut flows = Vec::new();
    for client in 0..3 {
        for authority in [WEB, "api.default"] {
            flows.push(Flow {
                protos: vec![Proto::Http1, Proto::Http2, Proto::Grpc],
                post_percent: 20,
                ..Flow::new(client, authority, 50, ms(100), secs(10))
            });
        }
    }
    Plan::new(world, flows)
}

/// Goal: swarm testing: a seed-drawn mix of faults (partitions, crashes with restarts, slow
/// replicas) must never break safety, and the mesh recovers after the last one heals.
/// Method: `Schedule::random` between 1 s and 7 s over three replicas and two clients; traffic
/// for 10 s; requests from 2 s after the last heal must all succeed.
fn random_chaos(seed: u64) -> Plan {
    let mut world = web(3, 2);
    world.response_timeout = Some(PARTITION_RESPONSE_TIMEOUT);
    let replicas = world.replica_hosts();
    let clients: Vec<String> = (0..2).map(conduit_sim::world::client_host).collect();
    let mut rng = DetRng::new(seed).child("chaos");
    let schedule = Schedule::random(&mut rng, &clients, &replicas, secs(1), secs(7));
    let healed = schedule.last_heal().unwrap_or(Duration::ZERO);
    let flows = (0..2)
        .map(|c| Flow {
            protos: vec![Proto::Http1, Proto::Http2],
            post_percent: 20,
            ..Flow::new(c, WEB, 50, ms(100), secs(10))
        })
        .collect();
    let mut plan = Plan::new(world, flows);
    plan.schedule = schedule;
    plan.checks.healthy_after = Some(healed + secs(2));
    plan.checks.metrics = false;
    plan
}

/// Goal: measure simulated requests per wall-clock second through two proxies (the
/// benchmark), with every invariant still checked. Method: one client sends 2,000 small
/// HTTP/1.1 GETs per second for 5 s to two replicas; links 0-1 ms.
fn throughput(_seed: u64) -> Plan {
    let mut world = web(2, 1);
    world.min_latency = Duration::ZERO;
    world.max_latency = ms(1);
    Plan::new(world, vec![Flow::new(0, WEB, 2000, ms(100), secs(5))])
}

/// The requests of client `client` in `trace`.
fn requests_of(
    trace: &Trace,
    client: usize,
) -> impl Iterator<Item = &conduit_sim::trace::RequestRecord> {
    trace.requests.iter().filter(move |r| r.client == client)
}

/// Goal: a meshed mesh speaks mTLS between every pair of proxies, with identities issued by the
/// controller. Method: two services (three and two replicas) and two clients, meshed: the
/// controller runs the certificate authority on simulated wall time; every proxy, the clients'
/// too, has an identity, a bootstrap token and the trust anchors, and gets its certificate
/// through the real Identity gRPC service over turmoil; every published endpoint names its
/// service's identity. Each client sends h1, h2 and gRPC GETs and POSTs to both services at
/// 50 req/s each from 100 ms to 4 s. Every request succeeds (the generic checks), and every
/// request that reached a replica arrived at its proxy over mTLS: each replica proxy's inbound
/// counters show none in plaintext, as many over mTLS as its app saw, each from a client
/// identity (`client_id`) that is one of the two clients', and both clients' identities seen.
fn mtls_mesh(_seed: u64) -> Plan {
    let world = WorldSpec::new(
        vec![ServiceSpec::new(WEB, 3), ServiceSpec::new("api.default", 2)],
        2,
    )
    .meshed();
    let mut flows = Vec::new();
    for client in 0..2 {
        for authority in [WEB, "api.default"] {
            flows.push(Flow {
                protos: vec![Proto::Http1, Proto::Http2, Proto::Grpc],
                post_percent: 20,
                ..Flow::new(client, authority, 50, ms(100), secs(4))
            });
        }
    }
    let clients: Vec<String> = (0..2).map(conduit_sim::world::client_identity).collect();
    Plan::new(world, flows)
        .check(check::inbound_over_mtls)
        .check(move |trace| check::inbound_client_identities(trace, &clients))
        .check(|trace| {
            let mut out = Vec::new();
            for authority in [WEB, "api.default"] {
                let ok = trace
                    .requests
                    .iter()
                    .filter(|r| r.authority == authority && r.outcome.is_success())
                    .count();
                if ok == 0 {
                    out.push(Violation::new(
                        "mtls",
                        format!("no request to {authority} succeeded"),
                    ));
                }
            }
            out
        })
}

/// Whether `record` got the client proxy's refusal to send plaintext to a meshed endpoint
/// because it has no identity: 502 (gRPC: UNAVAILABLE) with `conduit-proxy-error` saying so.
fn refused_without_identity(record: &conduit_sim::trace::RequestRecord) -> bool {
    match &record.outcome {
        conduit_sim::Outcome::Response {
            status,
            grpc_status,
            proxy_error: Some(reason),
            ..
        } => {
            let status_ok = if record.proto == Proto::Grpc {
                *grpc_status == Some(14)
            } else {
                *status == 502
            };
            status_ok && reason.contains("no identity")
        }
        _ => false,
    }
}

/// The unidentified client's request rate in `mtls_unidentified_client_denied`, per second:
/// the identified client's. (This scenario found that a proxy took its own refusal to send
/// plaintext to a meshed endpoint for the endpoint's connect failure and backed the endpoint
/// off, so at 30 req/s requests queued past their deadline; the refusal now leaves the
/// endpoint alone and answers at once.)
const UNIDENTIFIED_RATE: u32 = 30;

/// How soon after its send the unidentified client's request must be refused: at once, in
/// simulated time (no backoff, no queueing), with margin for the simulated network.
const REFUSAL_WITHIN: Duration = Duration::from_millis(100);

/// Goal: a client proxy without an identity never reaches a meshed service that admits only
/// authenticated clients, and an identified client still does. Method: `web.default` (two
/// replicas) has the policy `default: all-authenticated`; the world is meshed, but `client-1`'s
/// proxy runs without an identity. `client-0` sends h1, h2 and gRPC at 30 req/s from 100 ms to
/// 3 s, `client-1` the same at [`UNIDENTIFIED_RATE`] from 100 ms to 5 s. Every request of
/// `client-0` succeeds, over mTLS (the replicas' inbound counters show no plaintext, and only
/// `client-0`'s identity); every
/// request of `client-1` gets, within [`REFUSAL_WITHIN`], its own proxy's 502 (gRPC:
/// UNAVAILABLE) whose `conduit-proxy-error` says it has no identity (the endpoints are meshed,
/// so it never sends them plaintext), and no app ever sees one of them.
fn mtls_unidentified_client_denied(_seed: u64) -> Plan {
    let service = ServiceSpec::new(WEB, 2).with_policy(RawServerPolicy {
        default: Some("all-authenticated".into()),
        ..RawServerPolicy::default()
    });
    let mut world = WorldSpec::new(vec![service], 2).meshed();
    if let Some(mtls) = &mut world.mtls {
        mtls.unidentified_clients = vec![1];
    }
    let protos = vec![Proto::Http1, Proto::Http2, Proto::Grpc];
    let flows = vec![
        Flow {
            protos: protos.clone(),
            ..Flow::new(0, WEB, 30, ms(100), secs(3))
        },
        Flow {
            protos,
            ..Flow::new(1, WEB, UNIDENTIFIED_RATE, ms(100), secs(5))
        },
    ];
    let mut plan = Plan::new(world, flows);
    plan.checks.healthy_after = None;
    let identified = vec![conduit_sim::world::client_identity(0)];
    plan.check(check::inbound_over_mtls)
        .check(move |trace| check::inbound_client_identities(trace, &identified))
        .check(|trace| {
        let mut out: Vec<Violation> = requests_of(trace, 0)
            .filter(|r| !r.outcome.is_success())
            .map(|r| {
                Violation::new(
                    "identified-served",
                    format!(
                        "request {} ({:?}) of the identified client-0 sent at {} ms: {}",
                        r.id,
                        r.proto,
                        r.start_us / 1000,
                        r.outcome.class()
                    ),
                )
            })
            .collect();
        out.extend(
            requests_of(trace, 1)
                .filter(|r| {
                    !refused_without_identity(r)
                        || r.end_us.saturating_sub(r.start_us) > micros(REFUSAL_WITHIN)
                })
                .map(|r| {
                    Violation::new(
                        "unidentified-refused",
                        format!(
                            "request {} ({:?}) of the unidentified client-1 sent at {} ms, ended {} ms later: {:?} (expected its proxy's refusal, no identity, within {REFUSAL_WITHIN:?})",
                            r.id,
                            r.proto,
                            r.start_us / 1000,
                            r.end_us.saturating_sub(r.start_us) / 1000,
                            r.outcome
                        ),
                    )
                }),
        );
        let unidentified: std::collections::BTreeSet<u64> =
            requests_of(trace, 1).map(|r| r.id).collect();
        if unidentified.is_empty() || requests_of(trace, 0).next().is_none() {
            out.push(Violation::new(
                "unidentified-refused",
                "a client sent no request",
            ));
        }
        out.extend(
            trace
                .arrivals
                .iter()
                .filter(|a| a.id.is_some_and(|id| unidentified.contains(&id)))
                .map(|a| {
                    Violation::new(
                        "unidentified-refused",
                        format!(
                            "request {:?} of the unidentified client-1 reached {}",
                            a.id, a.host
                        ),
                    )
                }),
        );
        out.truncate(10);
        out
    })
}

/// The leaf lifetime of the certificate rotation and expiry scenarios: short enough that
/// renewals (at 70 % of it, 21 s) and expiry fall inside a run. The in-memory CA takes any
/// lifetime; the controller's configuration would not go below `MIN_LEAF_LIFETIME` (60 s),
/// but the proxies' schedule is proportional (the 10 s floor is not reached), so a 30 s leaf
/// lives the same life as a 60 s one in half the simulated time.
const SHORT_LEAF_LIFETIME: Duration = Duration::from_secs(30);

/// A meshed world whose leaves last [`SHORT_LEAF_LIFETIME`] and whose proxies' certificates
/// are watched (`Trace::certificates`).
fn short_leaves(world: WorldSpec) -> WorldSpec {
    let mut world = world.meshed();
    if let Some(mtls) = &mut world.mtls {
        mtls.leaf_lifetime = SHORT_LEAF_LIFETIME;
        mtls.watch_certificates = true;
    }
    world
}

/// Every proxy host of `world`: the replicas' and the clients'.
fn proxy_hosts(world: &WorldSpec) -> Vec<String> {
    let mut hosts = world.replica_hosts();
    hosts.extend((0..world.clients).map(conduit_sim::world::client_host));
    hosts
}

/// h1, h2 and gRPC GETs (and 20 % POSTs) from `client` to `authority` at `rate` in
/// `[start, end)`.
fn mixed_flow(client: usize, authority: &str, rate: u32, start: Duration, end: Duration) -> Flow {
    Flow {
        protos: vec![Proto::Http1, Proto::Http2, Proto::Grpc],
        post_percent: 20,
        ..Flow::new(client, authority, rate, start, end)
    }
}

/// The `n`-th certificate (0 first) of every proxy's first incarnation, by host; a host
/// without one is left out.
fn nth_certificates(trace: &Trace, n: usize) -> std::collections::BTreeMap<String, u64> {
    trace
        .certificates_by_proxy()
        .into_iter()
        .filter(|((_, incarnation), _)| *incarnation == 0)
        .filter_map(|((host, _), certs)| Some((host, certs.get(n)?.valid_until_us())))
        .collect()
}

/// When `client` sent its first request, µs.
fn first_request_us(trace: &Trace, client: usize) -> Option<u64> {
    requests_of(trace, client).map(|r| r.start_us).min()
}

/// Goal: proxies rotate their leaf certificates under load without failing a request, and
/// connections made after a leaf expired use the renewed one. Method: a meshed world (`web`
/// with three replicas, `api` with two, three clients) whose CA issues
/// [`SHORT_LEAF_LIFETIME`] (30 s) leaves; every proxy certifies at start, renews 21 s later
/// (70 % of 30 s) and again at 42 s. `client-0` sends h1, h2 and gRPC to both services at
/// 20 req/s each for 60 s (its pooled connections, made on the first leaves, outlive them:
/// TLS checks certificates at the handshake only). `client-1` starts at 33 s, after every
/// first leaf expired, and `client-2` at 53 s, after every second one did, so their proxies'
/// handshakes, and the replicas' answers to them, need the renewed leaves. Checks: every
/// request succeeds (the generic checks), every request reached its replica over mTLS from one
/// of the three client identities, all three seen; every proxy (the harness reads its
/// certificate every 10 ms) renewed at least twice, each time before the certificate it held
/// expired; and the late clients did start after those expiries (the scenario's premise,
/// checked on the watched certificates).
fn mtls_leaf_rotation_under_load(_seed: u64) -> Plan {
    let world = short_leaves(WorldSpec::new(
        vec![ServiceSpec::new(WEB, 3), ServiceSpec::new("api.default", 2)],
        3,
    ));
    let mut flows = Vec::new();
    for (client, start) in [(0, ms(100)), (1, secs(33)), (2, secs(53))] {
        for authority in [WEB, "api.default"] {
            flows.push(mixed_flow(client, authority, 20, start, secs(60)));
        }
    }
    let proxies = proxy_hosts(&world);
    let clients: Vec<String> = (0..3).map(conduit_sim::world::client_identity).collect();
    Plan::new(world, flows)
        .check(check::inbound_over_mtls)
        .check(move |trace| check::inbound_client_identities(trace, &clients))
        .check(move |trace| check::certificates_renewed(trace, &proxies, 2))
        .check(|trace| {
            let mut out = Vec::new();
            for (client, n) in [(1, 0), (2, 1)] {
                let expired = nth_certificates(trace, n).values().copied().max();
                let first = first_request_us(trace, client);
                match (expired, first) {
                    (Some(expired), Some(first)) if first >= expired => {}
                    _ => out.push(Violation::new(
                        "rotation",
                        format!(
                            "client-{client} was to start after every proxy's certificate {} expired: its first request at {:?} µs, the last of those expired at {expired:?} µs",
                            n + 1,
                            first
                        ),
                    )),
                }
            }
            out
        })
}

/// When the issuer rotates in `mtls_issuer_rotation_under_load`: after every proxy's first
/// certificate, before any renewal (21 s).
const ISSUER_ROTATES_AT: Duration = Duration::from_secs(12);

/// Goal: the CA's issuer rotates without downtime. Method: the world of
/// `mtls_leaf_rotation_under_load` (30 s leaves, two services, three clients; `client-1` joins
/// at 33 s, after every first leaf expired), and at [`ISSUER_ROTATES_AT`] the CA replaces its
/// issuer with a new one signed by the same anchor, as `conduit identity rotate-issuer` does
/// to a directory. Leaves from before keep verifying (they chain to the same anchor) and each
/// proxy's renewal at 21 s comes from the new issuer. Checks: every request succeeds (the
/// generic checks) over mTLS from the expected identities; every proxy renewed at least
/// twice, before expiry; exactly two issuers were seen; every proxy's first certificate came
/// from the first issuer and every certificate seen after the rotation from the second.
fn mtls_issuer_rotation_under_load(_seed: u64) -> Plan {
    let schedule = Schedule::new().at(ISSUER_ROTATES_AT, Action::RotateIssuer);
    ca_rotation(secs(33), secs(50), schedule, ISSUER_ROTATES_AT)
}

/// The world and checks of the CA rotation scenarios: 30 s leaves, `web` (three replicas) and
/// `api` (two), `client-0` sending h1, h2 and gRPC to both from the start and `client-1` from
/// `joins`, until `end`, under `schedule`; every request succeeds over mTLS from the two
/// client identities, every proxy renews twice before expiry, and the issuer changes once, at
/// `issuer_at`.
fn ca_rotation(joins: Duration, end: Duration, schedule: Schedule, issuer_at: Duration) -> Plan {
    let world = short_leaves(WorldSpec::new(
        vec![ServiceSpec::new(WEB, 3), ServiceSpec::new("api.default", 2)],
        2,
    ));
    let mut flows = Vec::new();
    for (client, start) in [(0, ms(100)), (1, joins)] {
        for authority in [WEB, "api.default"] {
            flows.push(mixed_flow(client, authority, 20, start, end));
        }
    }
    let proxies = proxy_hosts(&world);
    let clients: Vec<String> = (0..2).map(conduit_sim::world::client_identity).collect();
    let mut plan = Plan::new(world, flows);
    plan.schedule = schedule;
    let renewed = proxies.clone();
    plan.check(check::inbound_over_mtls)
        .check(move |trace| check::inbound_client_identities(trace, &clients))
        .check(move |trace| check::certificates_renewed(trace, &renewed, 2))
        .check(move |trace| issuers_rotated(trace, &proxies, issuer_at))
}

/// The steps of `mtls_anchor_rotation_under_load`: a new anchor joins every bundle, the issuer
/// moves to it, and once every leaf of the old issuer has expired (30 s leaves) the old
/// anchor leaves the bundles.
const ANCHOR_ADDED_AT: Duration = Duration::from_secs(5);
const ANCHOR_ISSUER_AT: Duration = Duration::from_secs(8);
const ANCHOR_RETIRED_AT: Duration = Duration::from_secs(45);

/// Goal: the trust anchor rotates without downtime, through a bundle of old and new anchors,
/// in the order the README gives. Method: the meshed world of the issuer rotation (30 s
/// leaves, two services, two clients) under h1, h2 and gRPC load for 60 s; at 5 s the CA makes
/// a new anchor and every proxy's bundle (and the controller's) holds both; at 8 s the issuer
/// moves to one signed by the new anchor; at 45 s, after every leaf of the old issuer expired
/// or was renewed, the old anchor leaves every bundle. `client-1` joins at 47 s, so its
/// handshakes, and the replicas' answers, need the new chain alone. Checks: every request
/// succeeds over mTLS from the expected identities; every proxy renewed twice before expiry;
/// two issuers, the second for every certificate after 8 s.
fn mtls_anchor_rotation_under_load(_seed: u64) -> Plan {
    let schedule = Schedule::new()
        .at(ANCHOR_ADDED_AT, Action::Anchor(AnchorStep::Add))
        .at(ANCHOR_ISSUER_AT, Action::RotateIssuer)
        .at(ANCHOR_RETIRED_AT, Action::Anchor(AnchorStep::Retire));
    ca_rotation(secs(47), secs(60), schedule, ANCHOR_ISSUER_AT)
}

/// Every proxy's certificates seen before `rotated_at` came from the first issuer and all
/// after from a second one; exactly two issuers in all.
fn issuers_rotated(trace: &Trace, proxies: &[String], rotated_at: Duration) -> Vec<Violation> {
    let mut out = Vec::new();
    let rotated = micros(rotated_at);
    let issuers: std::collections::BTreeSet<&str> = trace
        .certificates
        .iter()
        .map(|c| c.issuer.as_str())
        .collect();
    if issuers.len() != 2 {
        out.push(Violation::new(
            "issuer-rotation",
            format!("{} issuers seen ({issuers:?}), 2 expected", issuers.len()),
        ));
    }
    let old = trace.certificates.first().map(|c| c.issuer.clone());
    let by_proxy = trace.certificates_by_proxy();
    for proxy in proxies {
        let certs = by_proxy
            .get(&(proxy.clone(), 0))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for cert in certs {
            let from_old = Some(&cert.issuer) == old.as_ref();
            if (cert.at_us < rotated) != from_old {
                out.push(Violation::new(
                    "issuer-rotation",
                    format!(
                        "{proxy}: the certificate seen at {} ms came from the {} issuer (the issuer rotated at {} ms)",
                        cert.at_us / 1000,
                        if from_old { "old" } else { "new" },
                        rotated / 1000
                    ),
                ));
            }
        }
    }
    out.truncate(10);
    out
}

/// When the controller goes down in `mtls_expiry_while_controller_down`: after every proxy's
/// first certificate, before any renewal (21 s).
const CA_DOWN_AT: Duration = Duration::from_secs(3);

/// When the controller returns in `mtls_expiry_while_controller_down`: 10 s after the leaves
/// (30 s) expired.
const CA_BACK_AT: Duration = Duration::from_secs(40);

/// How soon after the controller returns every proxy holds a new certificate: the proxies'
/// retry backoff is capped at 10 s (`conduit_core::identity::DEFAULT_RETRY_MAX`), plus a
/// connect timeout (1 s) for an attempt still trying the dead controller, plus the round trip.
const RECERTIFY_WITHIN: Duration = Duration::from_secs(12);

/// Whether `record` got its client proxy's own `502` (gRPC: UNAVAILABLE) naming a failed or
/// impossible mTLS connection, and, with `no_certificate`, saying it holds no valid
/// certificate.
fn mtls_refused(record: &conduit_sim::trace::RequestRecord, no_certificate: bool) -> bool {
    match &record.outcome {
        conduit_sim::Outcome::Response {
            status,
            grpc_status,
            proxy_error: Some(reason),
            ..
        } => {
            let status_ok = if record.proto == Proto::Grpc {
                *grpc_status == Some(14)
            } else {
                *status == 502
            };
            status_ok
                && reason.contains("mTLS to")
                && (!no_certificate || reason.contains("holds no valid certificate"))
        }
        _ => false,
    }
}

/// Goal: when the CA is unreachable, proxies serve on their certificates until these expire,
/// then fail fast with their own error (never a hang, never plaintext), and recover by
/// themselves once the CA returns. Method: a meshed world (`web` with three replicas, two
/// clients) whose leaves last [`SHORT_LEAF_LIFETIME`] (30 s); the controller, which is the CA,
/// crashes at [`CA_DOWN_AT`] (3 s, before any renewal is due at 21 s) and restarts at
/// [`CA_BACK_AT`] (40 s) with the same CA. Both clients send h1, h2 and gRPC at 20 req/s from
/// 100 ms to 7 s, pause, and send again from 32 s to 62 s. The pause is longer than the pool
/// idle timeout (20 s), so the requests after expiry need new connections: established ones
/// would carry on (TLS checks certificates at the handshake only). Checks, on the certificates
/// the harness watched: every proxy got its first certificate before the crash, none got one
/// while the controller was down, all had expired before it returned, and each got a new one
/// within [`RECERTIFY_WITHIN`] of its return. Requests: every one sent before the first expiry
/// succeeds (from 3 s to 7 s with the controller down); every one sent after the last expiry
/// and before the controller returned gets, within 100 ms, its client proxy's own 502 (gRPC:
/// UNAVAILABLE) saying it holds no valid certificate, and no app sees it; between the
/// controller's return and recovery a request succeeds or gets a proxy's mTLS 502; every
/// request ends before its deadline (generic), and every request from 15 s after the return to
/// the end (the last 7 s) succeeds.
fn mtls_expiry_while_controller_down(_seed: u64) -> Plan {
    let world = short_leaves(web(3, 2));
    let mut flows = Vec::new();
    for client in 0..2 {
        flows.push(mixed_flow(client, WEB, 20, ms(100), secs(7)));
        flows.push(mixed_flow(client, WEB, 20, secs(32), secs(62)));
    }
    let proxies = proxy_hosts(&world);
    let clients: Vec<String> = (0..2).map(conduit_sim::world::client_identity).collect();
    let mut plan = Plan::new(world, flows);
    plan.schedule = Schedule::new()
        .at(
            CA_DOWN_AT,
            Action::Crash(conduit_sim::world::CONTROLLER.into()),
        )
        .at(
            CA_BACK_AT,
            Action::Bounce(conduit_sim::world::CONTROLLER.into()),
        );
    plan.checks.healthy_after = Some(CA_BACK_AT + secs(15));
    plan.check(check::inbound_over_mtls)
        .check(move |trace| check::inbound_client_identities(trace, &clients))
        .check(move |trace| expiry_certificates(trace, &proxies))
        .check(expiry_requests)
}

/// The certificate half of `mtls_expiry_while_controller_down`'s checks.
fn expiry_certificates(trace: &Trace, proxies: &[String]) -> Vec<Violation> {
    let mut out = Vec::new();
    let by_proxy = trace.certificates_by_proxy();
    let (down, back) = (micros(CA_DOWN_AT), micros(CA_BACK_AT));
    for proxy in proxies {
        let certs = by_proxy
            .get(&(proxy.clone(), 0))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let Some(first) = certs.first() else {
            out.push(Violation::new(
                "expiry",
                format!("{proxy}: never held a certificate"),
            ));
            continue;
        };
        if first.at_us >= down || first.valid_until_us() > back {
            out.push(Violation::new(
                "expiry",
                format!(
                    "{proxy}: its first certificate, seen at {} ms, valid until {} s, was to come before the controller went down and expire before it returned",
                    first.at_us / 1000,
                    first.valid_until_s
                ),
            ));
        }
        match certs.get(1) {
            Some(next) if next.at_us >= back && next.at_us < back + micros(RECERTIFY_WITHIN) => {}
            other => out.push(Violation::new(
                "expiry",
                format!(
                    "{proxy}: its next certificate was to come within {RECERTIFY_WITHIN:?} after the controller returned at {} ms; seen at {:?} ms",
                    back / 1000,
                    other.map(|c| c.at_us / 1000)
                ),
            )),
        }
    }
    out.truncate(10);
    out
}

/// The request half of `mtls_expiry_while_controller_down`'s checks.
fn expiry_requests(trace: &Trace) -> Vec<Violation> {
    let mut out = Vec::new();
    let first = nth_certificates(trace, 0);
    let (Some(&expiry_min), Some(&expiry_max)) = (first.values().min(), first.values().max())
    else {
        return vec![Violation::new("expiry", "no certificate was seen")];
    };
    let (down, back) = (micros(CA_DOWN_AT), micros(CA_BACK_AT));
    let (mut down_ok, mut refused) = (0, 0);
    for r in &trace.requests {
        let t = r.start_us;
        let took = r.end_us.saturating_sub(r.start_us);
        let fault = if t < expiry_min {
            down_ok += u64::from(t >= down && r.outcome.is_success());
            (!r.outcome.is_success()).then_some("success: every certificate was still valid")
        } else if t >= expiry_max && t < back {
            refused += 1;
            (!mtls_refused(r, true) || took > micros(REFUSAL_WITHIN)).then_some(
                "the client proxy's own 502 at once: its certificate had expired, the CA was down",
            )
        } else {
            (!r.outcome.is_success() && !mtls_refused(r, false))
                .then_some("success or a proxy's mTLS 502: certificates were being renewed")
        };
        if let Some(expected) = fault {
            out.push(Violation::new(
                "expiry",
                format!(
                    "request {} ({:?}) of client-{} sent at {} ms, ended {} ms later: {:?} (expected {expected})",
                    r.id,
                    r.proto,
                    r.client,
                    t / 1000,
                    took / 1000,
                    r.outcome
                ),
            ));
        }
    }
    if down_ok == 0 || refused == 0 {
        out.push(Violation::new(
            "expiry",
            format!(
                "{down_ok} requests succeeded with the controller down and certificates valid, {refused} were sent with certificates expired: both were to be some"
            ),
        ));
    }
    let refused_ids: std::collections::BTreeSet<u64> = trace
        .requests
        .iter()
        .filter(|r| r.start_us >= expiry_max && r.start_us < back)
        .map(|r| r.id)
        .collect();
    out.extend(
        trace
            .arrivals
            .iter()
            .filter(|a| a.id.is_some_and(|id| refused_ids.contains(&id)))
            .map(|a| {
                Violation::new(
                    "expiry",
                    format!(
                        "request {:?}, sent with every certificate expired, reached {}",
                        a.id, a.host
                    ),
                )
            }),
    );
    out.truncate(10);
    out
}
