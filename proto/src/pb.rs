//! Generated protobuf messages and tonic services, one module per protobuf package.
//!
//! The `.proto` files in `proto/conduit/` are the contract and carry the documentation of every
//! field. Nothing in here is validated: turn a received message into core types with
//! [`convert`](super::convert).

// Generated code follows prost's and tonic's conventions, not ours.
#![allow(
    missing_docs,
    unreachable_pub,
    unused_qualifications,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::use_self
)]

/// `conduit.net.v1`: addresses.
pub mod net {
    tonic::include_proto!("conduit.net.v1");
}

/// `conduit.destination.v1`: endpoint and route-profile discovery.
pub mod destination {
    tonic::include_proto!("conduit.destination.v1");
}

/// `conduit.identity.v1`: workload certificates.
pub mod identity {
    tonic::include_proto!("conduit.identity.v1");
}

/// `conduit.tap.v1`: live request events.
pub mod tap {
    tonic::include_proto!("conduit.tap.v1");
}

/// `conduit.api.v1`: the public API used by the CLI.
pub mod api {
    tonic::include_proto!("conduit.api.v1");
}
