//! Shrinking a failing [`Case`]: fewer faults, fewer requests, fewer hosts, for as long as the
//! same invariant still fails, so the case a person reads is the smallest this search finds.
//!
//! The search is greedy: it tries one smaller candidate at a time (dropping half the faults,
//! then single faults and fault points, halving request rates, dropping flows, replicas,
//! clients, a service, the controller) and keeps any candidate that still fails, until a whole
//! pass keeps nothing or the budget of runs is spent. Each try is one simulation, which the
//! caller runs (in a child process: one world per process) behind `fails`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::swarm::{Case, FaultKind};

/// The outcome of a shrink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shrunk {
    /// The smallest failing case found.
    pub case: Case,
    /// Candidates run.
    pub tries: usize,
    /// Candidates that still failed (and were kept).
    pub kept: usize,
}

/// How big a case is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Size {
    /// Fault actions and fault points.
    pub faults: usize,
    /// Hosts.
    pub hosts: usize,
    /// Requests planned.
    pub requests: u64,
}

/// How big `case` is.
#[must_use]
pub fn size(case: &Case) -> Size {
    Size {
        faults: case.faults.iter().map(|f| f.actions.len()).sum::<usize>()
            + case.fault_points.len(),
        hosts: case.topology.hosts(),
        requests: case.planned_requests(),
    }
}

/// Shrinks `case` while `fails` says a candidate still fails the same way, within `budget`
/// candidate runs.
pub fn shrink(case: &Case, budget: usize, mut fails: impl FnMut(&Case) -> bool) -> Shrunk {
    let mut best = case.clone();
    let mut tries = 0;
    let mut kept = 0;
    loop {
        let mut progressed = false;
        // After a kept candidate, go on from the same place in the new best's list: the
        // cuts tried before it (bigger ones, which did not fail) are rarely worth retrying
        // in the same pass.
        let mut at = 0;
        loop {
            let list = candidates(&best);
            let Some(candidate) = list.into_iter().nth(at) else {
                break;
            };
            if tries >= budget {
                return Shrunk {
                    case: best,
                    tries,
                    kept,
                };
            }
            tries += 1;
            if fails(&candidate) {
                best = candidate;
                kept += 1;
                progressed = true;
            } else {
                at += 1;
            }
        }
        if !progressed {
            return Shrunk {
                case: best,
                tries,
                kept,
            };
        }
    }
}

/// Smaller variants of `case`, biggest cuts first.
#[must_use]
pub fn candidates(case: &Case) -> Vec<Case> {
    let mut out = Vec::new();
    // Whole chunks of faults first (delta debugging): either half, then each quarter, each
    // eighth, removed.
    let n = case.faults.len();
    for parts in [2, 4, 8] {
        let chunk = n.div_ceil(parts);
        if chunk < 2 && parts > 2 || n < 2 {
            break;
        }
        for start in (0..n).step_by(chunk) {
            let mut c = case.clone();
            c.faults.drain(start..(start + chunk).min(n));
            out.push(c);
        }
    }
    // One fault fewer.
    for i in 0..n {
        let mut c = case.clone();
        c.faults.remove(i);
        out.push(c);
    }
    // Within an endpoint storm (each action sets a whole endpoint list, so any subset is a
    // storm too; the last, which restores every endpoint, stays): either half of the others,
    // then one fewer.
    for (i, fault) in case.faults.iter().enumerate() {
        let storm = fault.actions.len().saturating_sub(1);
        if fault.kind != FaultKind::EndpointChurn || storm == 0 {
            continue;
        }
        if storm >= 2 {
            for range in [0..storm / 2, storm / 2..storm] {
                let mut c = case.clone();
                c.faults[i].actions.drain(range);
                out.push(c);
            }
        }
        for j in 0..storm {
            let mut c = case.clone();
            c.faults[i].actions.remove(j);
            out.push(c);
        }
    }
    // No fault point, then one fault point fewer.
    if case.fault_points.len() > 1 {
        let mut c = case.clone();
        c.fault_points.clear();
        out.push(c);
    }
    for i in 0..case.fault_points.len() {
        let mut c = case.clone();
        c.fault_points.remove(i);
        out.push(c);
    }
    // Fewer hosts: the second service, a client, a replica, the controller.
    if case.topology.services.len() > 1 {
        let gone = case.topology.services[case.topology.services.len() - 1].clone();
        let mut c = case.clone();
        c.topology.services.pop();
        c.flows.retain(|f| f.authority != gone.0);
        for host in &conduit_sim::ServiceSpec::new(&gone.0, gone.1).hosts() {
            c.faults.retain(|f| !f.names(host));
        }
        out.push(c);
    }
    if case.topology.clients > 1 {
        let last = case.topology.clients - 1;
        let host = conduit_sim::world::client_host(last);
        let mut c = case.clone();
        c.topology.clients = last;
        c.flows.retain(|f| f.client != last);
        c.faults.retain(|f| !f.names(&host));
        out.push(c);
    }
    for i in 0..case.topology.services.len() {
        let replicas = case.topology.services[i].1;
        if replicas <= 1 {
            continue;
        }
        let mut c = case.clone();
        c.topology.services[i].1 = replicas - 1;
        // The replica that goes is the last one of the service.
        let remaining = c.topology.replicas();
        let before = case.topology.replicas();
        for host in before.iter().filter(|h| !remaining.contains(h)) {
            c.faults.retain(|f| {
                // An endpoint storm loses the host from its sets instead of going whole.
                f.kind == FaultKind::EndpointChurn || !f.names(host)
            });
            for fault in &mut c.faults {
                for (_, action) in &mut fault.actions {
                    if let crate::Action::SetEndpoints(_, hosts) = action {
                        hosts.retain(|h| h != host);
                    }
                }
                fault.actions.retain(|(_, a)| {
                    !matches!(a, crate::Action::SetEndpoints(_, hosts) if hosts.is_empty())
                });
            }
        }
        out.push(c);
    }
    if case.topology.controller
        && !case
            .faults
            .iter()
            .any(|f| matches!(f.kind, FaultKind::ControllerOutage | FaultKind::CertExpiry))
    {
        let mut c = case.clone();
        c.topology.controller = false;
        c.topology.meshed = false;
        c.kinds.remove(&FaultKind::ControllerOutage);
        out.push(c);
    }
    // Fewer requests: one flow fewer, then every rate halved.
    if case.flows.len() > 1 {
        for i in 0..case.flows.len() {
            let mut c = case.clone();
            c.flows.remove(i);
            out.push(c);
        }
    }
    if case.flows.iter().any(|f| f.rate > 1) {
        let mut c = case.clone();
        for flow in &mut c.flows {
            flow.rate = (flow.rate / 2).max(1);
        }
        out.push(c);
    }
    // A shorter chaos phase: heal right after the last fault action.
    let last = case
        .faults
        .iter()
        .flat_map(|f| f.actions.iter().map(|(at, _)| *at))
        .max()
        .unwrap_or(Duration::from_secs(1));
    if case.fault_points.is_empty() && last + Duration::from_millis(100) < case.heal_at {
        let mut c = case.clone();
        let cut = case.heal_at - last;
        c.heal_at = last;
        for flow in &mut c.flows {
            flow.end = flow.end.saturating_sub(cut);
        }
        out.push(c);
    }
    for c in &mut out {
        c.kinds = c.faults.iter().map(|f| f.kind).collect();
        if !c.fault_points.is_empty() {
            c.kinds.insert(FaultKind::FaultPoints);
        }
        c.picked = c.describe();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_candidate_is_smaller() {
        for seed in 0..100 {
            let case = Case::draw(seed);
            for candidate in candidates(&case) {
                let Size {
                    faults: a,
                    hosts: h,
                    requests: r,
                } = size(&candidate);
                let Size {
                    faults: a0,
                    hosts: h0,
                    requests: r0,
                } = size(&case);
                assert!(
                    a < a0 || h < h0 || r < r0,
                    "seed {seed}: {:?} is not smaller than {:?}",
                    size(&candidate),
                    size(&case)
                );
                assert!(a <= a0 && h <= h0 && r <= r0);
                // Nothing names a host the candidate no longer has.
                let mut hosts = candidate.topology.replicas();
                hosts.extend(candidate.topology.client_hosts());
                hosts.push(conduit_sim::world::CONTROLLER.to_owned());
                for fault in &candidate.faults {
                    for (_, action) in &fault.actions {
                        for host in action.hosts() {
                            assert!(hosts.iter().any(|h| h == host), "seed {seed}: {action}");
                        }
                    }
                }
                assert!(
                    candidate
                        .flows
                        .iter()
                        .all(|f| f.client < candidate.topology.clients)
                );
            }
        }
    }

    #[test]
    fn a_failure_that_needs_one_fault_shrinks_to_that_fault() {
        // The "bug": any crash of web-0 fails the run.
        let needs = |case: &Case| {
            case.faults.iter().any(|f| {
                f.actions
                    .iter()
                    .any(|(_, a)| *a == crate::Action::Crash("web-0".into()))
            })
        };
        let seed = (0..1000).find(|s| needs(&Case::draw(*s))).unwrap();
        let case = Case::draw(seed);
        let shrunk = shrink(&case, 500, needs);
        assert!(needs(&shrunk.case));
        assert_eq!(shrunk.case.faults.len(), 1, "{:#?}", shrunk.case.faults);
        assert_eq!(shrunk.case.topology.clients, 1);
        assert_eq!(shrunk.case.topology.services.len(), 1);
        assert!(shrunk.case.fault_points.is_empty());
        assert!(size(&shrunk.case) < size(&case));
    }
}
