//! Conduit's wire protocol.
//!
//! - [`mesh_file`]: the mesh file carrier: YAML text in, a validated
//!   [`conduit_core::mesh::Mesh`] out.
//! - [`pb`]: the protobuf messages and tonic services generated at build time from
//!   `proto/conduit/*.proto`: Destination (endpoint and profile discovery), Identity
//!   (`Certify`), Tap (`Observe`) and the public API for the CLI.
//! - [`convert`]: the one place where wire messages become core types. Every message from the
//!   network is validated there, and an invalid one is a typed [`convert::InvalidMessage`],
//!   never a panic.
//! - [`crypto`]: the crypto seam the proxy and the controller are built with (production's,
//!   or the simulation's seeded one).
//! - [`prom`]: the Prometheus text exposition format, read side (for `conduit stat` and the
//!   controller's public API).

pub mod convert;
pub mod crypto;
pub mod mesh_file;
pub mod pb;
pub mod prom;
