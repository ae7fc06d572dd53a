//! The entropy seam: the only place the proxy draws OS entropy.
//!
//! The proxy's randomness (P2C picks today; retry jitter later) comes from one seeded
//! [`conduit_core::rand::DetRng`]. Its seed comes from configuration when given (the simulation,
//! or an operator replaying a run) and from the OS otherwise; either way it is logged once at
//! `info`, so any run can be replayed.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// Where the seed came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedSource {
    /// Given in configuration.
    Config,
    /// Drawn from the operating system.
    Os,
}

/// The seed to use: `configured` if set, else fresh OS entropy. Logs the choice once.
#[must_use]
pub fn seed(configured: Option<u64>) -> u64 {
    let (seed, source) = match configured {
        Some(seed) => (seed, SeedSource::Config),
        None => (os_seed(), SeedSource::Os),
    };
    tracing::info!(seed, source = ?source, "random seed");
    seed
}

/// 64 bits from the OS without another dependency: std seeds every `RandomState` with keys
/// drawn from the OS generator (getrandom(2) on Linux) once per thread and then increments them,
/// so hashing a fixed value under a fresh `RandomState` yields an unpredictable word.
fn os_seed() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0x636f_6e64_7569_7421);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_seed_wins() {
        assert_eq!(seed(Some(7)), 7);
        // Two OS draws differ (equal with probability 2^-64).
        assert_ne!(os_seed(), os_seed());
    }
}
