//! Errors the proxy answers for itself, and the one place they become responses.

pub mod respond;

pub use respond::{ProxyError, SyntheticResponse};
