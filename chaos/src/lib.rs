//! Fault models and schedules ("chaos chihuahua").
//!
//! A [`Schedule`] is an explicit list of `(sim time, action)` entries, generated up front (by
//! hand or from the seed, [`Schedule::random`]) and applied between simulation steps
//! (turmoil.md §6). Being plain data, a schedule is printed with every failing run, written to
//! its failure file, and can be shrunk by dropping entries.

pub mod shrink;
pub mod swarm;

use std::fmt;
use std::time::Duration;

use conduit_core::rand::{DetRng, Rng};
use conduit_sim::app::Failure;
use conduit_sim::{AnchorStep, World};
use serde::{Deserialize, Serialize};

/// One fault or harness action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Cut both directions between two hosts (established streams stall, connects fail).
    Partition(String, String),
    /// Restore the link between two hosts.
    Repair(String, String),
    /// Cut the link from the first host to the second only.
    PartitionOneWay(String, String),
    /// Restore the link from the first host to the second.
    RepairOneWay(String, String),
    /// Hold messages between two hosts.
    Hold(String, String),
    /// Deliver held messages.
    Release(String, String),
    /// Kill a host: its tasks and sockets are dropped (peers see the closes).
    Crash(String),
    /// Restart a crashed (or running) host with fresh software.
    Bounce(String),
    /// Gracefully shut down a host's proxy (GOAWAY, drain); pair with a later `Bounce`.
    DrainProxy(String),
    /// Fix the latency of a link.
    LinkLatency(String, String, Duration),
    /// An app answers this much later.
    AppDelay(String, Duration),
    /// An app answers this share of its requests (per mille, drawn per arrival from the
    /// arrival's number, so the same seed slows the same arrivals) this much later: a long
    /// latency tail. Zero per mille ends it.
    AppTail(String, u32, Duration),
    /// An app stops answering (true) or resumes (false).
    AppStall(String, bool),
    /// An app answers every request with a 500 (true) or heals (false).
    AppFail(String, bool),
    /// An app fails this share (per mille) of its requests as [`Failure`] says; 0 heals.
    AppFailures(String, u32, Failure),
    /// An app closes this share (per mille) of its kept-alive HTTP/1.1 connections right
    /// after a response, unannounced; 0 heals.
    AppCloseRace(String, u32),
    /// The proxy's fault points stop firing (armed for the run by the harness).
    DisarmFaultPoints,
    /// A new configuration: the service's endpoints become these replica hosts.
    SetEndpoints(String, Vec<String>),
    /// The controller's CA rotates its issuer (signed by its newest anchor); a meshed world
    /// only.
    RotateIssuer,
    /// A trust-anchor rotation step: a new anchor joins every bundle, or the old ones leave.
    Anchor(AnchorStep),
}

impl Action {
    /// Whether this action ends a fault (repair, release, bounce, un-stall).
    #[must_use]
    pub fn heals(&self) -> bool {
        matches!(
            self,
            Self::Repair(..)
                | Self::RepairOneWay(..)
                | Self::AppFailures(_, 0, _)
                | Self::AppCloseRace(_, 0)
                | Self::DisarmFaultPoints
                | Self::Release(..)
                | Self::Bounce(_)
                | Self::AppStall(_, false)
                | Self::AppFail(_, false)
                | Self::AppTail(_, 0, _)
        )
    }

    /// The hosts the action names.
    #[must_use]
    pub fn hosts(&self) -> Vec<&str> {
        match self {
            Self::Partition(a, b)
            | Self::Repair(a, b)
            | Self::PartitionOneWay(a, b)
            | Self::RepairOneWay(a, b)
            | Self::Hold(a, b)
            | Self::Release(a, b)
            | Self::LinkLatency(a, b, _) => vec![a, b],
            Self::Crash(h)
            | Self::Bounce(h)
            | Self::DrainProxy(h)
            | Self::AppDelay(h, _)
            | Self::AppTail(h, _, _)
            | Self::AppStall(h, _)
            | Self::AppFail(h, _)
            | Self::AppFailures(h, _, _)
            | Self::AppCloseRace(h, _) => vec![h],
            Self::SetEndpoints(_, hosts) => hosts.iter().map(String::as_str).collect(),
            Self::DisarmFaultPoints | Self::RotateIssuer | Self::Anchor(_) => Vec::new(),
        }
    }

    /// Applies the action to the world.
    pub fn apply(&self, world: &mut World<'_>) {
        match self {
            Self::Partition(a, b) => world.partition(a, b),
            Self::Repair(a, b) => world.repair(a, b),
            Self::PartitionOneWay(a, b) => world.partition_oneway(a, b),
            Self::RepairOneWay(a, b) => world.repair_oneway(a, b),
            Self::AppFailures(host, permille, failure) => {
                world.set_app_failures(host, *permille, *failure);
            }
            Self::AppCloseRace(host, permille) => world.set_app_close_race(host, *permille),
            Self::DisarmFaultPoints => {
                world.event("fault points disarmed".to_owned());
                conduit_proxy::fault_points::disarm();
            }
            Self::Hold(a, b) => world.hold(a, b),
            Self::Release(a, b) => world.release(a, b),
            Self::Crash(host) => world.crash(host),
            Self::Bounce(host) => world.bounce(host),
            Self::DrainProxy(host) => world.drain_proxy(host),
            Self::LinkLatency(a, b, latency) => world.set_link_latency(a, b, *latency),
            Self::AppDelay(host, delay) => world.set_app_delay(host, *delay),
            Self::AppTail(host, permille, delay) => world.set_app_tail(host, *permille, *delay),
            Self::AppStall(host, stalled) => world.set_app_stalled(host, *stalled),
            Self::AppFail(host, failing) => world.set_app_failing(host, *failing),
            Self::SetEndpoints(authority, hosts) => {
                if let Err(err) = world.set_endpoints(authority, hosts.clone()) {
                    world
                        .recorder()
                        .with(|t| t.sim_error = Some(format!("harness: {err}")));
                }
            }
            Self::RotateIssuer => world.rotate_issuer(),
            Self::Anchor(step) => world.anchor_step(*step),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Partition(a, b) => write!(f, "partition {a} <-> {b}"),
            Self::Repair(a, b) => write!(f, "repair {a} <-> {b}"),
            Self::PartitionOneWay(a, b) => write!(f, "partition {a} -> {b}"),
            Self::RepairOneWay(a, b) => write!(f, "repair {a} -> {b}"),
            Self::AppFailures(h, p, how) => write!(f, "app {h} fails {p}‰ with {how:?}"),
            Self::AppCloseRace(h, p) => {
                write!(f, "app {h} closes {p}‰ of connections after a response")
            }
            Self::DisarmFaultPoints => f.write_str("disarm fault points"),
            Self::Hold(a, b) => write!(f, "hold {a} <-> {b}"),
            Self::Release(a, b) => write!(f, "release {a} <-> {b}"),
            Self::Crash(h) => write!(f, "crash {h}"),
            Self::Bounce(h) => write!(f, "bounce {h}"),
            Self::DrainProxy(h) => write!(f, "drain proxy on {h}"),
            Self::LinkLatency(a, b, d) => write!(f, "latency {a} <-> {b} = {d:?}"),
            Self::AppDelay(h, d) => write!(f, "app {h} delay {d:?}"),
            Self::AppTail(h, p, d) => write!(f, "app {h} tail {p}‰ x {d:?}"),
            Self::AppStall(h, s) => write!(f, "app {h} stalled={s}"),
            Self::AppFail(h, s) => write!(f, "app {h} failing={s}"),
            Self::SetEndpoints(s, hosts) => write!(f, "endpoints {s} = {hosts:?}"),
            Self::RotateIssuer => f.write_str("rotate the CA's issuer"),
            Self::Anchor(step) => write!(f, "anchor rotation: {step:?}"),
        }
    }
}

/// Faults at sim times, sorted by time (stable for equal times).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    entries: Vec<(Duration, Action)>,
    next: usize,
}

impl Schedule {
    /// An empty schedule.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `action` at `at`.
    #[must_use]
    pub fn at(mut self, at: Duration, action: Action) -> Self {
        self.push(at, action);
        self
    }

    /// Adds `action` at `at`.
    pub fn push(&mut self, at: Duration, action: Action) {
        let index = self.entries.partition_point(|(t, _)| *t <= at);
        self.entries.insert(index, (at, action));
    }

    /// The entries, in order.
    #[must_use]
    pub fn entries(&self) -> &[(Duration, Action)] {
        &self.entries
    }

    /// When the last healing action happens (`None` when nothing heals).
    #[must_use]
    pub fn last_heal(&self) -> Option<Duration> {
        self.entries
            .iter()
            .filter(|(_, a)| a.heals())
            .map(|(t, _)| *t)
            .max()
    }

    /// When the last action of any kind happens.
    #[must_use]
    pub fn last_action(&self) -> Option<Duration> {
        self.entries.last().map(|(t, _)| *t)
    }

    /// Applies every entry due by the world's current time. Call before each step.
    pub fn apply_due(&mut self, world: &mut World<'_>) {
        let now = world.elapsed();
        while let Some((at, action)) = self.entries.get(self.next) {
            if *at > now {
                break;
            }
            action.apply(world);
            self.next += 1;
        }
    }

    /// A seeded swarm schedule: between `start` and `end`, a random mix of partitions between
    /// `clients` and `replicas`, replica crashes with restarts, and slow replicas, each healed
    /// before `end`. Which fault kinds are on is itself drawn from the seed (swarm testing).
    #[must_use]
    pub fn random(
        rng: &mut DetRng,
        clients: &[String],
        replicas: &[String],
        start: Duration,
        end: Duration,
    ) -> Self {
        let mut schedule = Self::new();
        if replicas.is_empty() || end <= start {
            return schedule;
        }
        let partitions = rng.chance(1, 2);
        let crashes = rng.chance(1, 2);
        let slow = rng.chance(1, 2);
        let span = u64::try_from((end - start).as_millis()).unwrap_or(u64::MAX);
        let faults = rng.between(1, 4);
        for _ in 0..faults {
            let from_ms = rng.below(span.max(1) * 2 / 3);
            let length_ms = rng.between(100, (span - from_ms).max(101) - 1);
            let from = start + Duration::from_millis(from_ms);
            let to = (from + Duration::from_millis(length_ms)).min(end);
            let replica =
                replicas[usize::try_from(rng.below(replicas.len() as u64)).unwrap_or(0)].clone();
            match rng.below(3) {
                0 if partitions && !clients.is_empty() => {
                    let client = clients
                        [usize::try_from(rng.below(clients.len() as u64)).unwrap_or(0)]
                    .clone();
                    schedule.push(from, Action::Partition(client.clone(), replica.clone()));
                    schedule.push(to, Action::Repair(client, replica));
                }
                1 if crashes => {
                    schedule.push(from, Action::Crash(replica.clone()));
                    schedule.push(to, Action::Bounce(replica));
                }
                _ if slow => {
                    let delay = Duration::from_millis(rng.between(20, 300));
                    schedule.push(from, Action::AppDelay(replica.clone(), delay));
                    schedule.push(to, Action::AppDelay(replica, Duration::ZERO));
                }
                _ => {}
            }
        }
        schedule
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (at, action) in &self.entries {
            writeln!(f, "{:>8} ms  {action}", at.as_millis())?;
        }
        Ok(())
    }
}
