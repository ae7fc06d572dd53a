//! The scenario library, the open-loop load generator and the red-line search.
//!
//! - [`chaos`]: swarm chaos runs (a topology, fault kinds and schedule drawn per seed), their
//!   sweeps with shrinking and report, and the `conduit chaos` command;
//! - [`scenarios`]: the named deterministic scenarios (topology, workload, fault schedule,
//!   invariants), run by `cargo test` (`tests/scenarios.rs`) on fixed seeds and by `conduit sim`;
//! - [`sim`]: running a scenario in this process or in a child process (one seed per process),
//!   sweeps, failure files, and the `conduit sim` command;
//! - [`load`]: the open-loop load generator (constant arrival rate, latency from the intended
//!   send time) over HTTP/1.1, h2c ([`load::h2`]) or gRPC, used by the demo, the proxy
//!   benchmark and the red-line search;
//! - [`redline`]: the red-line search (the highest rate a service holds within its
//!   objectives), a state machine driven by `conduit redline` and the simulation, and
//!   [`plot`], its SVG chart, and [`redline_sim`], the search in the simulation against
//!   replicas with a modelled capacity.

pub mod chaos;
pub mod load;
pub mod plan;
pub mod plot;
pub mod redline;
pub mod redline_sim;
pub mod scenarios;
pub mod sim;
