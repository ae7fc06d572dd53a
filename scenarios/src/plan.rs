//! What a scenario is made of: its [`Plan`] for a seed (topology, workload, faults and the
//! invariants it is held to), and the time helpers scenario definitions use. Below both the
//! scenarios and the runner (`sim`, which re-exports it).

use std::time::Duration;

use conduit_chaos::Schedule;
use conduit_sim::check::{Checks, Violation};
use conduit_sim::{Flow, Trace, WorldSpec};

/// A scenario-specific invariant over the trace.
pub type ExtraCheck = Box<dyn Fn(&Trace) -> Vec<Violation>>;

/// Everything one run of a scenario needs, derived from its seed.
pub struct Plan {
    /// Topology and physics.
    pub world: WorldSpec,
    /// Request flows (planned into a schedule with the seed).
    pub flows: Vec<Flow>,
    /// Faults and configuration changes.
    pub schedule: Schedule,
    /// Generic invariants and their bounds.
    pub checks: Checks,
    /// Scenario-specific invariants.
    pub extra: Vec<ExtraCheck>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("world", &self.world)
            .field("flows", &self.flows)
            .field("schedule", &self.schedule)
            .field("checks", &self.checks)
            .finish_non_exhaustive()
    }
}

impl Plan {
    /// A plan with the default checks, no faults and no extra invariants.
    #[must_use]
    pub fn new(world: WorldSpec, flows: Vec<Flow>) -> Self {
        Self {
            world,
            flows,
            schedule: Schedule::new(),
            checks: Checks::default(),
            extra: Vec::new(),
        }
    }

    /// Adds a scenario-specific invariant.
    #[must_use]
    pub fn check(mut self, f: impl Fn(&Trace) -> Vec<Violation> + 'static) -> Self {
        self.extra.push(Box::new(f));
        self
    }
}

/// Milliseconds, for scenario definitions.
#[must_use]
pub const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Seconds, for scenario definitions.
#[must_use]
pub const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
