//! Idle HTTP/1.1 connections, per endpoint.

use std::net::SocketAddr;

use conduit_core::time::Instant;

use super::{Pools, lock};
use crate::h1::io::Upstream;
use crate::net::Net;

/// An idle HTTP/1.1 connection.
pub(crate) struct Idle<N: Net> {
    conn: Upstream<N>,
    since: Instant,
}

impl<N: Net> std::fmt::Debug for Idle<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle").field("since", &self.since).finish()
    }
}

impl<N: Net> Pools<N> {
    /// An idle HTTP/1.1 connection to `addr` not past the pool idle timeout at `now`, most
    /// recently used first. The caller checks that it is still open.
    pub(crate) fn checkout_h1(&self, addr: SocketAddr, now: Instant) -> Option<Upstream<N>> {
        let mut idle = lock(&self.idle);
        let conns = idle.get_mut(&addr)?;
        while let Some(conn) = conns.pop() {
            if crate::fault_points::fire(crate::fault_points::FaultPoint::PoolEviction) {
                // Dropped: closed, as an eviction would.
                continue;
            }
            if now.saturating_duration_since(conn.since) < self.limits.pool_idle_timeout {
                return Some(conn.conn);
            }
        }
        None
    }

    /// Returns an HTTP/1.1 connection whose last response ended cleanly at `now` (dropped,
    /// and so closed, when the endpoint has `pool_max_idle_per_endpoint` idle already).
    pub(crate) fn checkin_h1(&self, addr: SocketAddr, conn: Upstream<N>, now: Instant) {
        let mut idle = lock(&self.idle);
        let conns = idle.entry(addr).or_default();
        if conns.len() < self.limits.pool_max_idle_per_endpoint {
            conns.push(Idle { conn, since: now });
        }
    }

    /// Closes idle connections past the pool idle timeout at `now`.
    pub(super) fn sweep_idle(&self, now: Instant) {
        let timeout = self.limits.pool_idle_timeout;
        lock(&self.idle).retain(|_, conns| {
            conns.retain(|conn| now.saturating_duration_since(conn.since) < timeout);
            !conns.is_empty()
        });
    }
}
