//! What an HTTP/1 attempt holds upstream: a pooled connection checked out for it, and the
//! response head it got with the connection it arrived on. Shared by the engine's own attempts
//! (`conn`) and its hedges (`copy`).

use std::net::SocketAddr;
use std::task::Poll;

use conduit_core::time::Instant;

use super::codec::ResponseHead;
use super::io::{Pump, Upstream};
use crate::net::Net;
use crate::pool::Pools;

/// An idle pooled connection to `addr` that is still open.
pub(crate) async fn checkout<N: Net>(
    pools: &Pools<N>,
    addr: SocketAddr,
    now: Instant,
) -> Option<Upstream<N>> {
    while let Some(mut upstream) = pools.checkout_h1(addr, now) {
        // An idle connection has nothing to say: input (or its end) means the server closed
        // it or broke protocol. Polling costs no syscall while nothing arrived.
        let alive =
            std::future::poll_fn(|cx| Poll::Ready(upstream.poll_read_more(cx).is_pending())).await;
        if alive {
            return Some(upstream);
        }
        tracing::trace!(endpoint = %addr, "pooled connection closed while idle");
    }
    None
}

/// A response head from the upstream, with the connection it arrived on.
pub(crate) struct H1Response<N: Net> {
    pub(crate) upstream: Upstream<N>,
    pub(crate) head: ResponseHead,
    /// The rest of the request, when the upstream answered before it was sent whole.
    pub(crate) upload: Upload,
    pub(crate) addr: SocketAddr,
}

/// Where the request stands when its response head arrives.
#[derive(Debug)]
pub(crate) enum Upload {
    /// Sent whole.
    Done,
    /// Still moving (full-duplex streaming, or an early answer).
    Moving(Pump),
    /// Sending it failed: neither connection can carry another request.
    Broken,
}
