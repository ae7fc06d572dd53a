//! The scenario library, the open-loop load generator and the red-line search.
//!
//! Present today: [`load`], the open-loop load generator (constant arrival rate, latency from
//! the intended send time), used by the demo, the proxy benchmark and, generic over the
//! network, the simulation. The named deterministic scenarios arrive with the simulation
//! issue (#5) and the red-line search after it.

pub mod load;
