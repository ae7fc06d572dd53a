//! Conduit's data plane: the sidecar proxy.
//!
//! Being built under issue #3.
