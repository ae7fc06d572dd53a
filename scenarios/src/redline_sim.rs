//! The red-line search in the simulation: the same search and load generator as
//! `conduit redline`, against replicas with a modelled capacity, through the real client
//! proxy.
//!
//! Each replica serves at most `concurrency` requests at once, each taking its service time
//! ([`conduit_sim::app::AppControl::set_capacity`]), so a service's capacity is known:
//! `replicas x concurrency / service time` requests per second. One client host runs the
//! search through its proxy, one open-loop step per rate, all in simulated time, so a seed
//! gives the same red line every run, and a change to the proxy that costs capacity (a worse
//! balancing decision, a queue that holds requests back) moves it deterministically.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use conduit_core::balance::Policy;
use conduit_proxy::clock::Clock;
use conduit_sim::net::SimNet;
use conduit_sim::workload::Workload;
use conduit_sim::world::{Driver, ServiceSpec, World, WorldSpec};

use crate::load::{self, Arrivals, LoadConfig, Protocol, Target};
use crate::redline::{Judged, Outcome, Search, SearchConfig, Slo, cooldown, step_of};

/// The service searched, as the client addresses it.
const AUTHORITY: &str = "web.default";

/// A simulated red-line search.
#[derive(Clone, Debug, PartialEq)]
pub struct SimRedline {
    /// Replicas of the service.
    pub replicas: usize,
    /// Requests each replica serves at once.
    pub concurrency: usize,
    /// Each request's service time, per replica (replicas beyond the list take the last
    /// one's).
    pub service_times: Vec<Duration>,
    /// How the client's proxy chooses replicas.
    pub policy: Policy,
    /// The objectives.
    pub slo: Slo,
    /// The search.
    pub search: SearchConfig,
    /// How long each step sends for (simulated time).
    pub step: Duration,
    /// The generator's keep-alive connections to the client's proxy.
    pub connections: usize,
    /// How requests are spaced.
    pub arrivals: Arrivals,
    /// What the requests speak (gRPC calls get the simulated app's gRPC answer).
    pub protocol: Protocol,
}

impl SimRedline {
    /// `replicas` replicas of `concurrency` at `service_time` each, p99 under 100 ms and
    /// 99.9 % success, steps of 2 s from 100 requests/s, latency-aware balancing.
    #[must_use]
    pub fn new(replicas: usize, concurrency: usize, service_time: Duration) -> Self {
        Self {
            replicas,
            concurrency,
            service_times: vec![service_time],
            policy: Policy::PeakEwma,
            slo: Slo::default(),
            search: SearchConfig {
                start: 100,
                max: 100_000,
                growth: 2.0,
                precision: 0.05,
                max_steps: 24,
            },
            step: Duration::from_secs(2),
            connections: 64,
            arrivals: Arrivals::Constant,
            protocol: Protocol::Http1,
        }
    }

    fn service_time(&self, replica: usize) -> Duration {
        self.service_times
            .get(replica)
            .or(self.service_times.last())
            .copied()
            .unwrap_or_default()
    }

    /// The modelled capacity: what the replicas can serve per second, summed.
    #[must_use]
    pub fn capacity(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "a small count")]
        let concurrency = self.concurrency as f64;
        (0..self.replicas)
            .map(|i| concurrency / self.service_time(i).as_secs_f64().max(1e-9))
            .sum()
    }
}

/// What a simulated search found.
#[derive(Clone, Debug)]
pub struct SimOutcome {
    /// How it ended and the red line.
    pub outcome: Outcome,
    /// Every step, in order.
    pub steps: Vec<Judged>,
    /// The finished search (for reports).
    pub search: Search,
}

/// Runs the search in a world seeded by `seed`.
///
/// # Errors
///
/// The search's configuration is invalid, the world could not be built, or the simulation
/// ended before the search did (its time limit).
pub fn run(spec: &SimRedline, seed: u64) -> anyhow::Result<SimOutcome> {
    let search = Search::new(spec.search.clone(), spec.slo.clone())?;
    let mut world_spec = WorldSpec::new(
        vec![ServiceSpec::new(AUTHORITY, spec.replicas).without_breaker()],
        1,
    );
    world_spec.balancer_policy = spec.policy;
    // Every step, plus its requests' timeout and the longest pause, well within the limit.
    let per_step = spec.step + TIMEOUT + cooldown(spec.step, true);
    world_spec.time_limit = per_step * u32::try_from(spec.search.max_steps).unwrap_or(u32::MAX)
        + Duration::from_secs(30);
    let finished: Arc<Mutex<Option<Search>>> = Arc::default();
    let driver: Driver = {
        let finished = Arc::clone(&finished);
        let spec = spec.clone();
        Arc::new(move |outbound| {
            let finished = Arc::clone(&finished);
            let spec = spec.clone();
            let mut search = search.clone();
            Box::pin(async move {
                let clock = Clock::new();
                // Let discovery reach the client's proxy before the first step.
                tokio::time::sleep(Duration::from_secs(1)).await;
                while let Some((rate, _)) = search.next() {
                    let config = LoadConfig {
                        rate,
                        duration: spec.step,
                        connections: spec.connections,
                        timeout: TIMEOUT,
                        targets: vec![Target {
                            authority: AUTHORITY.to_owned(),
                            path: "/".to_owned(),
                            method: http::Method::GET,
                        }],
                        arrivals: spec.arrivals,
                        protocol: spec.protocol,
                        spin_wait: false,
                    };
                    let Ok(report) = load::run(SimNet, outbound, config, clock).await else {
                        break;
                    };
                    let step = step_of(rate, &report, &spec.slo);
                    let broke = spec.slo.judge(&step).is_err();
                    search.record(step);
                    tokio::time::sleep(cooldown(spec.step, broke)).await;
                }
                *finished.lock().unwrap_or_else(PoisonError::into_inner) = Some(search);
            })
        })
    };
    let mut world = World::build_driven(
        "redline",
        &world_spec,
        seed,
        &Workload::default(),
        Some(driver),
    )?;
    let hosts = world_spec.replica_hosts();
    for (i, host) in hosts.iter().enumerate() {
        world.set_app_capacity(host, spec.concurrency, spec.service_time(i));
    }
    let trace = world.run(|_| {});
    if let Some(error) = trace.sim_error {
        anyhow::bail!("the simulation stopped: {error}");
    }
    let search = finished
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .ok_or_else(|| anyhow::anyhow!("the search did not finish"))?;
    let outcome = search
        .outcome()
        .ok_or_else(|| anyhow::anyhow!("the search stopped before its end"))?;
    Ok(SimOutcome {
        outcome,
        steps: search.steps().to_vec(),
        search,
    })
}

/// A request's timeout in the simulated generator.
const TIMEOUT: Duration = Duration::from_secs(2);
