//! Conduit's pure mesh logic.
//!
//! Every decision the mesh makes lives here as a plain struct driven by explicit inputs. This
//! crate contains no networking code, reads no clock, draws no OS entropy, spawns nothing and
//! never blocks: time arrives as a [`time::Instant`] argument, randomness from a seeded
//! [`rand::DetRng`] the caller owns, and decisions leave as return values. The proxy, the
//! controller and the simulation drive the same state machines, which is what lets a turmoil
//! world run the real mesh logic deterministically.
//!
//! Component shapes (STYLE.md §2): one-shot decisions return values
//! (`balancer.pick(now, &mut rng)`); state machines take `handle_*(now, input)` and give
//! `poll_*()` / `poll_timeout()`.
//!
//! Modules present today: [`time`], [`rand`], [`backoff`], [`balance`], [`breaker`] (circuit
//! breaking per endpoint), [`classify`], [`metrics`], [`route`] (route profiles and request
//! matching), [`timeout`] (deadlines and their propagation), [`retry`] (sending a request
//! again), [`fault`] (failures injected on purpose, drawn per request), [`identity`] (when to
//! ask for a certificate), [`policy`] (which clients a service's inbound port admits:
//! authorization as data and a pure decision) and [`mesh`] (the mesh file model). Later issues
//! add `slo` and `tap`.

#![deny(missing_docs)]

pub mod backoff;
pub mod balance;
pub mod breaker;
pub mod classify;
pub mod fault;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod policy;
pub mod rand;
pub mod retry;
pub mod route;
pub mod time;
pub mod timeout;
