//! Conduit's wire protocol.
//!
//! Today this crate holds the mesh file carrier ([`mesh_file`]): YAML text in, validated
//! [`conduit_core::mesh::Mesh`] out. The protobuf services (Destination, Identity, Tap and the
//! public API) and `convert.rs` arrive with the controller issue (#4).
pub mod mesh_file;
