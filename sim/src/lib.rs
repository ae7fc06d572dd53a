//! Deterministic simulation of whole meshes.
//!
//! Nothing here yet: the turmoil world, trace recording, invariant checkers and seed replay arrive
//! with the simulation issue (#5).
