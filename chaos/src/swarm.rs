//! Swarm runs: each seed draws its own topology, the fault kinds that are on, their rates and
//! when they strike ([`Case::draw`]), so a sweep over seeds covers combinations nobody wrote
//! down (swarm testing: a run with few kinds on goes deeper into each than one with all).
//!
//! A [`Case`] is plain data: what the seed picked, the topology, the traffic, the fault
//! schedule and the fault points to arm. It is what a failure file holds, what
//! the `shrink` module makes smaller and what `conduit chaos --replay FILE` runs again.
//!
//! Every run has a chaos phase (faults strike and heal within it) and a heal phase (no fault,
//! traffic continues): safety invariants are checked throughout, liveness (every request
//! succeeds) from [`Case::recovery`] after [`Case::heal_at`].

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use conduit_core::rand::{DetRng, Rng};
use conduit_proxy::fault_points::FaultPoint;
use conduit_sim::app::Failure;
use conduit_sim::check::Checks;
use conduit_sim::world::{CONTROLLER, client_host};
use conduit_sim::{DiscoveryMode, Flow, Proto, ServiceSpec, WorldSpec};
use serde::{Deserialize, Serialize};

use crate::{Action, Schedule};

/// A kind of fault a swarm run may turn on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Both directions between a client and a replica cut, then repaired.
    Partition,
    /// One direction cut, then repaired.
    OneWayPartition,
    /// Messages between a client and a replica held, then released.
    Hold,
    /// A replica host crashes and restarts.
    Crash,
    /// A replica's proxy drains gracefully (GOAWAY), and the host restarts.
    Drain,
    /// A link's latency jumps, then settles.
    LatencySpike,
    /// A replica answers late (all its requests, or a tail of them).
    Slow,
    /// A replica accepts requests and stops answering, then resumes.
    Stall,
    /// A replica fails a share of its requests, with a status or a reset.
    Failing,
    /// A replica closes kept-alive connections unannounced right after a response.
    CloseRace,
    /// The controller crashes and restarts (worlds that discover through it).
    ControllerOutage,
    /// A service's endpoints change many times in quick succession, then settle.
    EndpointChurn,
    /// Fault points in the proxy's code fire (see `conduit_proxy::fault_points`).
    FaultPoints,
    /// Certificates expire: leaves last 10 s and the controller (the CA) is down for 12 s
    /// (meshed worlds).
    CertExpiry,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [Self; 14] = [
        Self::Partition,
        Self::OneWayPartition,
        Self::Hold,
        Self::Crash,
        Self::Drain,
        Self::LatencySpike,
        Self::Slow,
        Self::Stall,
        Self::Failing,
        Self::CloseRace,
        Self::ControllerOutage,
        Self::EndpointChurn,
        Self::FaultPoints,
        Self::CertExpiry,
    ];
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&name)
    }
}

/// One fault: the actions that strike and heal it, dropped together when a case is shrunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Its kind.
    pub kind: FaultKind,
    /// Its actions, at sim times.
    pub actions: Vec<(Duration, Action)>,
}

impl Fault {
    /// Whether any action names `host`.
    #[must_use]
    pub fn names(&self, host: &str) -> bool {
        self.actions.iter().any(|(_, a)| a.hosts().contains(&host))
    }
}

/// A swarm run's topology: services and their replicas, clients, and how proxies discover.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Each service's authority and replica count.
    pub services: Vec<(String, usize)>,
    /// Client hosts (each with its proxy).
    pub clients: usize,
    /// Discovery through the controller (else static, from the harness).
    pub controller: bool,
    /// Workload identity and mTLS between every pair of proxies, the controller the CA
    /// (worlds that discover through it).
    #[serde(default)]
    pub meshed: bool,
    /// How long certificates last (`None`: the CA's default, a day).
    #[serde(default)]
    pub leaf_lifetime: Option<Duration>,
}

impl Topology {
    /// The world this topology makes.
    #[must_use]
    pub fn world(&self) -> WorldSpec {
        let services = self
            .services
            .iter()
            .map(|(authority, replicas)| ServiceSpec::new(authority, *replicas))
            .collect();
        let mut world = WorldSpec::new(services, self.clients);
        if self.controller {
            world.discovery = DiscoveryMode::Controller;
        }
        if self.controller && self.meshed {
            world = world.meshed();
            if let (Some(mtls), Some(lifetime)) = (&mut world.mtls, self.leaf_lifetime) {
                mtls.leaf_lifetime = lifetime;
            }
        }
        // Partitions and stalls cost one response timeout per request caught on them.
        world.response_timeout = Some(Duration::from_secs(1));
        // A released hold delivers every connection attempt it held at once.
        world.tcp_capacity = 1024;
        world
    }

    /// Every replica host.
    #[must_use]
    pub fn replicas(&self) -> Vec<String> {
        self.world().replica_hosts()
    }

    /// Every client host.
    #[must_use]
    pub fn client_hosts(&self) -> Vec<String> {
        (0..self.clients).map(client_host).collect()
    }

    /// How many hosts (replicas, clients and the controller when there is one).
    #[must_use]
    pub fn hosts(&self) -> usize {
        self.services.iter().map(|(_, r)| r).sum::<usize>()
            + self.clients
            + usize::from(self.controller)
    }
}

/// One swarm run, drawn from a seed (and possibly shrunk since).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    /// The seed it was drawn from (and the seed of the world's own draws).
    pub seed: u64,
    /// What the seed picked, in words (printed before the run).
    pub picked: Vec<String>,
    /// The fault kinds on.
    pub kinds: BTreeSet<FaultKind>,
    /// The topology.
    pub topology: Topology,
    /// The traffic.
    pub flows: Vec<Flow>,
    /// The faults, each healed by `heal_at`.
    pub faults: Vec<Fault>,
    /// Fault points armed for the chaos phase, with their per-mille rates.
    pub fault_points: Vec<(FaultPoint, u32)>,
    /// When the chaos phase ends: every fault healed, fault points disarmed.
    pub heal_at: Duration,
    /// How long after `heal_at` the mesh has to recover (every request succeeds from then).
    pub recovery: Duration,
}

/// How long after the CA returns every proxy holds a valid certificate again: the retry
/// backoff's ceiling (10 s), a connect timeout and the round trip, with margin.
const CERT_RECOVERY: Duration = Duration::from_secs(14);
/// How long the CA stays down in a certificate-expiry fault (leaves last 10 s).
const CERT_OUTAGE: Duration = Duration::from_secs(12);

/// The chaos phase starts here (connections warm first).
const CHAOS_START: Duration = Duration::from_secs(1);
/// Traffic continues this long after the chaos phase.
const HEAL_PHASE: Duration = Duration::from_secs(4);
/// How long after the last heal every request must succeed: the proxies' connect backoff
/// (at most 1 s after repeated failures), breakers' probation and a response timeout, with
/// margin.
const RECOVERY: Duration = Duration::from_secs(2);

impl Case {
    /// The case seed `seed` draws.
    #[must_use]
    pub fn draw(seed: u64) -> Self {
        let mut rng = DetRng::new(seed).child("swarm");
        let pick = |rng: &mut DetRng, n: usize| usize::try_from(rng.below(n as u64)).unwrap_or(0);
        let service_count = if rng.chance(1, 3) { 2 } else { 1 };
        let services: Vec<(String, usize)> = ["web.default", "api.default"]
            .iter()
            .take(service_count)
            .map(|authority| {
                (
                    (*authority).to_owned(),
                    usize::try_from(rng.between(1, 5)).unwrap_or(1),
                )
            })
            .collect();
        let clients = usize::try_from(rng.between(1, 4)).unwrap_or(1);
        let controller = rng.chance(1, 2);
        let topology = Topology {
            services,
            clients,
            controller,
            meshed: controller && rng.chance(1, 2),
            leaf_lifetime: None,
        };
        // Swarm testing: each kind on with probability 1/2, at least one.
        let mut kinds: BTreeSet<FaultKind> = FaultKind::ALL
            .into_iter()
            .filter(|kind| *kind != FaultKind::ControllerOutage || topology.controller)
            .filter(|kind| *kind != FaultKind::CertExpiry || topology.meshed)
            .filter(|_| rng.chance(1, 2))
            .collect();
        if kinds.is_empty() {
            kinds.insert(FaultKind::ALL[pick(&mut rng, 10)]);
        }
        let chaos = Duration::from_millis(rng.between(2_000, 6_001));
        let heal_at = CHAOS_START + chaos;
        let end = heal_at + HEAL_PHASE;

        let all_protos = [Proto::Http1, Proto::Http2, Proto::Grpc];
        let mut protos: Vec<Proto> = all_protos
            .into_iter()
            .filter(|_| rng.chance(2, 3))
            .collect();
        if protos.is_empty() {
            protos.push(all_protos[pick(&mut rng, 3)]);
        }
        let post_percent = rng.below(31);
        let mut flows = Vec::new();
        for client in 0..topology.clients {
            for (authority, _) in &topology.services {
                let rate = u32::try_from(rng.between(10, 41)).unwrap_or(20);
                flows.push(Flow {
                    protos: protos.clone(),
                    post_percent,
                    ..Flow::new(client, authority, rate, Duration::from_millis(100), end)
                });
            }
        }

        let mut case = Self {
            seed,
            picked: Vec::new(),
            kinds,
            topology,
            flows,
            faults: Vec::new(),
            fault_points: Vec::new(),
            heal_at,
            recovery: RECOVERY,
        };
        case.draw_faults(&mut rng);
        // Traffic runs past the recovery bound (a certificate expiry lengthens both).
        let end = case.heal_at + case.recovery + (HEAL_PHASE - RECOVERY);
        for flow in &mut case.flows {
            flow.end = end;
        }
        case.picked = case.describe();
        case
    }

    /// Draws the schedule of the kinds that are on: each kind strikes 1-3 times at a rate
    /// drawn per seed, every strike healed by `heal_at`.
    fn draw_faults(&mut self, rng: &mut DetRng) {
        let replicas = self.topology.replicas();
        let clients = self.topology.client_hosts();
        let span = u64::try_from((self.heal_at - CHAOS_START).as_millis()).unwrap_or(1000);
        let any = |rng: &mut DetRng, hosts: &[String]| {
            hosts[usize::try_from(rng.below(hosts.len() as u64)).unwrap_or(0)].clone()
        };
        for kind in self.kinds.clone() {
            if kind == FaultKind::CertExpiry {
                // Leaves issued at the start expire 10 s later, while the CA is down; the
                // proxies get new ones within their retry backoff (at most 10 s) plus a
                // connect timeout once it is back.
                self.topology.leaf_lifetime = Some(Duration::from_secs(10));
                let down = CHAOS_START + Duration::from_millis(rng.below(1_000));
                let back = down + CERT_OUTAGE;
                self.faults.push(Fault {
                    kind,
                    actions: vec![
                        (down, Action::Crash(CONTROLLER.to_owned())),
                        (back, Action::Bounce(CONTROLLER.to_owned())),
                    ],
                });
                self.heal_at = self.heal_at.max(back);
                self.recovery = CERT_RECOVERY;
                continue;
            }
            if kind == FaultKind::FaultPoints {
                self.fault_points.clear();
                for point in FaultPoint::ALL {
                    if rng.chance(1, 2) {
                        let rate = u32::try_from(rng.between(5, 101)).unwrap_or(20);
                        self.fault_points.push((point, rate));
                    }
                }
                if self.fault_points.is_empty() {
                    self.fault_points.push((FaultPoint::Upstream503, 50));
                }
                continue;
            }
            for _ in 0..rng.between(1, 3) {
                // A window inside the chaos phase.
                let from_ms = rng.below(span * 3 / 4);
                let length_ms = rng.between(100, (span - from_ms).max(101));
                let from = CHAOS_START + Duration::from_millis(from_ms);
                let to = (from + Duration::from_millis(length_ms)).min(self.heal_at);
                let replica = any(rng, &replicas);
                let client = any(rng, &clients);
                let (strike, heal) = match kind {
                    FaultKind::Partition => (
                        Action::Partition(client.clone(), replica.clone()),
                        vec![Action::Repair(client, replica)],
                    ),
                    FaultKind::OneWayPartition => {
                        let (a, b) = if rng.chance(1, 2) {
                            (client, replica)
                        } else {
                            (replica, client)
                        };
                        (
                            Action::PartitionOneWay(a.clone(), b.clone()),
                            vec![Action::RepairOneWay(a, b)],
                        )
                    }
                    FaultKind::Hold => (
                        Action::Hold(client.clone(), replica.clone()),
                        vec![Action::Release(client, replica)],
                    ),
                    FaultKind::Crash => (
                        Action::Crash(replica.clone()),
                        vec![Action::Bounce(replica)],
                    ),
                    FaultKind::Drain => (
                        Action::DrainProxy(replica.clone()),
                        vec![Action::Bounce(replica)],
                    ),
                    FaultKind::LatencySpike => {
                        let spike = Duration::from_millis(rng.between(20, 400));
                        (
                            Action::LinkLatency(client.clone(), replica.clone(), spike),
                            vec![Action::LinkLatency(
                                client,
                                replica,
                                Duration::from_millis(3),
                            )],
                        )
                    }
                    FaultKind::Slow => {
                        let delay = Duration::from_millis(rng.between(20, 300));
                        if rng.chance(1, 2) {
                            (
                                Action::AppDelay(replica.clone(), delay),
                                vec![Action::AppDelay(replica, Duration::ZERO)],
                            )
                        } else {
                            let permille = u32::try_from(rng.between(10, 200)).unwrap_or(50);
                            (
                                Action::AppTail(replica.clone(), permille, delay * 4),
                                vec![Action::AppTail(replica, 0, Duration::ZERO)],
                            )
                        }
                    }
                    FaultKind::Stall => (
                        Action::AppStall(replica.clone(), true),
                        vec![Action::AppStall(replica, false)],
                    ),
                    FaultKind::Failing => {
                        let permille = u32::try_from(rng.between(50, 1001)).unwrap_or(500);
                        let failure = match rng.below(3) {
                            0 => Failure::Reset,
                            1 => Failure::Status(503),
                            _ => Failure::Status(500),
                        };
                        (
                            Action::AppFailures(replica.clone(), permille, failure),
                            vec![Action::AppFailures(replica, 0, failure)],
                        )
                    }
                    FaultKind::CloseRace => {
                        let permille = u32::try_from(rng.between(50, 1001)).unwrap_or(500);
                        (
                            Action::AppCloseRace(replica.clone(), permille),
                            vec![Action::AppCloseRace(replica, 0)],
                        )
                    }
                    FaultKind::ControllerOutage => (
                        Action::Crash(CONTROLLER.to_owned()),
                        vec![Action::Bounce(CONTROLLER.to_owned())],
                    ),
                    FaultKind::EndpointChurn => {
                        self.churn(rng, from, to);
                        continue;
                    }
                    FaultKind::FaultPoints | FaultKind::CertExpiry => continue,
                };
                let mut actions = vec![(from, strike)];
                actions.extend(heal.into_iter().map(|action| (to, action)));
                self.faults.push(Fault { kind, actions });
            }
        }
    }

    /// An endpoint-churn storm between `from` and `to`: a service's endpoints become a random
    /// non-empty subset of its replicas every 20-200 ms, and all of them again at `to`.
    fn churn(&mut self, rng: &mut DetRng, from: Duration, to: Duration) {
        let world = self.topology.world();
        let service =
            &world.services[usize::try_from(rng.below(world.services.len() as u64)).unwrap_or(0)];
        let all = service.hosts();
        let mut actions = Vec::new();
        let mut at = from;
        while at < to {
            let mut subset: Vec<String> =
                all.iter().filter(|_| rng.chance(1, 2)).cloned().collect();
            if subset.is_empty() {
                subset.push(all[usize::try_from(rng.below(all.len() as u64)).unwrap_or(0)].clone());
            }
            actions.push((at, Action::SetEndpoints(service.authority.clone(), subset)));
            at += Duration::from_millis(rng.between(20, 201));
        }
        actions.push((to, Action::SetEndpoints(service.authority.clone(), all)));
        self.faults.push(Fault {
            kind: FaultKind::EndpointChurn,
            actions,
        });
    }

    /// The schedule the run applies: every fault's actions, and the fault points disarmed at
    /// `heal_at`.
    #[must_use]
    pub fn schedule(&self) -> Schedule {
        let mut schedule = Schedule::new();
        for fault in &self.faults {
            for (at, action) in &fault.actions {
                schedule.push(*at, action.clone());
            }
        }
        if !self.fault_points.is_empty() {
            schedule.push(self.heal_at, Action::DisarmFaultPoints);
        }
        schedule
    }

    /// What the case picked, in words.
    #[must_use]
    pub fn describe(&self) -> Vec<String> {
        let services: Vec<String> = self
            .topology
            .services
            .iter()
            .map(|(a, r)| format!("{a} x{r}"))
            .collect();
        let kinds: Vec<String> = self.kinds.iter().map(ToString::to_string).collect();
        let mut out = vec![
            format!(
                "topology: {}; {} client(s); discovery {}",
                services.join(", "),
                self.topology.clients,
                match (self.topology.controller, self.topology.meshed) {
                    (true, true) => "through the controller, meshed (mTLS)",
                    (true, false) => "through the controller",
                    _ => "static",
                }
            ),
            format!("faults on: {}", kinds.join(", ")),
            format!(
                "traffic: {} flow(s), {} requests/s in all, {:?} POST {}%",
                self.flows.len(),
                self.flows.iter().map(|f| f.rate).sum::<u32>(),
                self.flows
                    .first()
                    .map(|f| f.protos.clone())
                    .unwrap_or_default(),
                self.flows.first().map_or(0, |f| f.post_percent),
            ),
            format!(
                "chaos {} ms to {} ms ({} fault(s), {} actions), then healed",
                CHAOS_START.as_millis(),
                self.heal_at.as_millis(),
                self.faults.len(),
                self.faults.iter().map(|f| f.actions.len()).sum::<usize>()
            ),
        ];
        if !self.fault_points.is_empty() {
            let points: Vec<String> = self
                .fault_points
                .iter()
                .map(|(p, r)| format!("{p} {r}‰"))
                .collect();
            out.push(format!("fault points: {}", points.join(", ")));
        }
        out
    }

    /// The world to build: the topology, with checks' bounds widened for what the faults
    /// that are on legitimately cause.
    #[must_use]
    pub fn world(&self) -> WorldSpec {
        self.topology.world()
    }

    /// The invariants the run is held to: every generic safety check throughout, liveness
    /// from `heal_at + recovery`.
    #[must_use]
    pub fn checks(&self) -> Checks {
        let mut checks = Checks {
            healthy_after: Some(self.heal_at + self.recovery),
            // Proxy counters against what clients saw (for every client whose requests all
            // ended in a whole response: a lost response leaves nothing to compare).
            metrics: true,
            ..Checks::default()
        };
        let slow_discovery = self
            .fault_points
            .iter()
            .any(|(p, _)| *p == FaultPoint::SlowDiscovery);
        if self.topology.controller {
            // The controller's push is one message on a link of at most 5 ms, plus ticks.
            checks.routing_grace = Duration::from_millis(10);
        }
        if slow_discovery {
            let late = FaultPoint::SlowDiscovery.max_delay();
            checks.routing_grace += late;
            checks.converge_within = checks.converge_within.map(|c| c + late);
        }
        if self.topology.controller
            && (self.kinds.contains(&FaultKind::ControllerOutage)
                || self.kinds.contains(&FaultKind::CertExpiry))
        {
            // A proxy learns of changes made while the controller was down when it comes
            // back and the proxy reconnects (backoff up to its ceiling).
            checks.converge_within = Some(Duration::from_secs(5));
            checks.routing_grace = Duration::from_secs(5);
        }
        if self.kinds.contains(&FaultKind::CertExpiry) {
            // Changes published while the CA was down (12 s) reach a proxy once it holds a
            // certificate again and reconnects: the outage plus the certificate recovery.
            checks.converge_within = Some(CERT_OUTAGE + CERT_RECOVERY);
            checks.routing_grace = CERT_OUTAGE + CERT_RECOVERY;
        }
        checks
    }

    /// How many requests the flows plan, about.
    #[must_use]
    pub fn planned_requests(&self) -> u64 {
        self.flows
            .iter()
            .map(|f| {
                let span = f.end.saturating_sub(f.start).as_millis();
                u64::try_from(span).unwrap_or(0) * u64::from(f.rate) / 1000
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_case() {
        assert_eq!(Case::draw(7), Case::draw(7));
        assert_ne!(Case::draw(7), Case::draw(8));
    }

    #[test]
    fn every_fault_heals_within_the_chaos_phase() {
        for seed in 0..200 {
            let case = Case::draw(seed);
            assert!(!case.kinds.is_empty());
            for (at, action) in case.schedule().entries() {
                assert!(*at <= case.heal_at, "seed {seed}: {action} at {at:?}");
            }
            let flows_end = case.flows.iter().map(|f| f.end).max().unwrap();
            assert!(flows_end >= case.heal_at + case.recovery + Duration::from_secs(1));
        }
    }

    #[test]
    fn a_case_survives_its_file() {
        let case = Case::draw(11);
        let text = serde_json::to_string(&case).unwrap();
        assert_eq!(serde_json::from_str::<Case>(&text).unwrap(), case);
    }

    #[test]
    fn seeds_cover_every_kind() {
        let mut seen = BTreeSet::new();
        for seed in 0..50 {
            seen.extend(Case::draw(seed).kinds);
        }
        assert_eq!(seen.len(), FaultKind::ALL.len(), "{seen:?}");
    }
}
