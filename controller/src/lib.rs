//! Conduit's control plane.
//!
//! Nothing here yet: the Destination service, file discovery and the admin port arrive with the
//! controller issue (#4). Until then the proxy discovers endpoints from a mesh file directly.
