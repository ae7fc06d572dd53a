//! The scenario library, the open-loop load generator and the red-line search.
//!
//! Nothing here yet: the named deterministic scenarios arrive with the simulation issue (#5).
