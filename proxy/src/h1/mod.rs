//! The proxy's HTTP/1 engine.
//!
//! HTTP/1.1 is most of a sidecar's traffic, and a proxy that parses a request into a generic
//! message, hands it to a client connection task through a channel, and serializes it again
//! pays for each step on every request. This engine instead forwards each head in one parse
//! and one copy ([`codec`]), drives the upstream connection from the client connection's task
//! ([`conn`]), and moves bodies through two reused buffers per connection ([`io`]). Routing,
//! balancing, metrics, classification and error responses are the same code the HTTP/2 path
//! uses (the exchange module, `errors::respond`).

pub(crate) mod codec;
pub(crate) mod conn;
pub(crate) mod copy;
pub(crate) mod io;
pub(crate) mod upstream;
