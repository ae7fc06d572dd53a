//! Deterministic simulation of whole meshes.
//!
//! A run is a turmoil world ([`world::World`]) of hosts running the real proxy and controller
//! libraries over [`net::SimNet`], driven by an open-loop [`workload`] drawn from the seed, with
//! faults applied between simulation steps (the `conduit-chaos` schedules). Everything that
//! happens is recorded in a [`trace::Trace`], whose SHA-256 is the run's fingerprint, and the
//! [`check`] module's invariant checkers read only that trace.
//!
//! Determinism rules (shared/reference/turmoil.md): the seed is the only input (turmoil's RNG,
//! every proxy's seed, the workload and the fault schedule all derive from it by name), the
//! epoch is pinned, no component sends a real-clock `date` header, and **one seed runs per
//! process** ([`process`]): cargo's test threads share a process, so tests re-execute their own
//! binary for each seed.

pub mod app;
pub mod check;
pub mod crypto;
pub mod net;
pub mod observe;
pub mod process;
pub mod trace;
pub mod workload;
pub mod world;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

pub use check::{Checks, Violation};
pub use trace::{Outcome, Proto, Trace};
pub use workload::{Flow, Workload};
pub use world::{AnchorStep, DiscoveryMode, MtlsSpec, ServiceSpec, World, WorldSpec};

/// The result of one run, as printed and as passed from a child process to its parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// SHA-256 of the trace.
    pub hash: String,
    /// The human summary (what scenario snapshots hold).
    pub summary: String,
    /// Broken invariants; empty when the run passed.
    pub violations: Vec<Violation>,
    /// Requests sent.
    pub requests: usize,
    /// Simulated time, ms.
    pub sim_ms: u64,
    /// Where the failing run's schedule and trace were written.
    pub failure_file: Option<String>,
}

impl Report {
    /// Whether every invariant held.
    #[must_use]
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The command that replays this run.
    #[must_use]
    pub fn replay_command(&self) -> String {
        replay_command(&self.scenario, self.seed)
    }
}

/// The command that replays `scenario` at `seed`.
#[must_use]
pub fn replay_command(scenario: &str, seed: u64) -> String {
    format!("cargo run -p conduit-cli -- sim --scenario {scenario} --seed {seed}")
}

/// A stable, human summary of a trace: outcomes per destination, which backend served how
/// many, and latency quantiles of successes (sim time).
#[must_use]
pub fn summarize(trace: &Trace) -> String {
    let mut out = String::new();
    let mut authorities: BTreeMap<&str, Vec<&trace::RequestRecord>> = BTreeMap::new();
    for r in &trace.requests {
        authorities.entry(r.authority.as_str()).or_default().push(r);
    }
    let _ = writeln!(out, "requests: {}", trace.requests.len());
    for (authority, requests) in authorities {
        let _ = writeln!(out, "{authority}:");
        let mut classes: BTreeMap<String, u64> = BTreeMap::new();
        for r in &requests {
            *classes.entry(r.outcome.class()).or_insert(0) += 1;
        }
        let _ = writeln!(out, "  outcomes: {classes:?}");
        let _ = writeln!(out, "  served_by: {:?}", trace.served_counts(authority));
        let mut latencies: Vec<u64> = requests
            .iter()
            .filter(|r| r.outcome.is_success())
            .map(|r| r.end_us.saturating_sub(r.start_us) / 1000)
            .collect();
        latencies.sort_unstable();
        if !latencies.is_empty() {
            let q = |p: usize| latencies[(latencies.len() - 1) * p / 100];
            let _ = writeln!(
                out,
                "  success latency ms: p50 {} p99 {} max {}",
                q(50),
                q(99),
                q(100)
            );
        }
    }
    if !trace.inbound.is_empty() {
        let tls: BTreeMap<&str, u64> = trace
            .inbound
            .iter()
            .map(|(host, c)| (host.as_str(), c.tls))
            .collect();
        let plain: u64 = trace.inbound.values().map(|c| c.plain).sum();
        let _ = writeln!(out, "inbound over mTLS: {tls:?}; plaintext: {plain}");
        let mut clients: BTreeMap<&str, u64> = BTreeMap::new();
        for (client, n) in trace.inbound.values().flat_map(|c| &c.clients) {
            *clients.entry(client.as_str()).or_insert(0) += n;
        }
        let _ = writeln!(out, "inbound client identities: {clients:?}");
    }
    if !trace.certificates.is_empty() {
        let certificates: BTreeMap<String, usize> = trace
            .certificates_by_proxy()
            .into_iter()
            .map(|((host, incarnation), certs)| (format!("{host}#{incarnation}"), certs.len()))
            .collect();
        let _ = writeln!(out, "certificates held: {certificates:?}");
    }
    let _ = writeln!(out, "configs: {}", trace.configs.len());
    let picks: usize = trace.requests.iter().map(|r| r.picks.len()).sum();
    let _ = writeln!(
        out,
        "observed: {} applied states, {picks} picks",
        trace.applied.len()
    );
    let _ = writeln!(out, "faults: {}", trace.events.len());
    if let Some(err) = &trace.sim_error {
        let _ = writeln!(out, "simulation error: {err}");
    }
    out
}

/// Wall-clock timing for benchmark reporting only (never an input to a run).
#[derive(Debug)]
#[expect(clippy::disallowed_types, reason = "benchmark reporting only")]
pub struct Stopwatch(std::time::Instant);

impl Stopwatch {
    /// Starts timing.
    #[must_use]
    #[expect(
        clippy::disallowed_methods,
        clippy::disallowed_types,
        reason = "benchmark reporting only; never feeds the simulation"
    )]
    pub fn start() -> Self {
        Self(std::time::Instant::now())
    }

    /// Wall time since start.
    #[must_use]
    pub fn elapsed(&self) -> std::time::Duration {
        self.0.elapsed()
    }
}
