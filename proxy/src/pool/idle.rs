//! Idle HTTP/1.1 connections, per endpoint, and the attempts waiting for one.
//!
//! An attempt that finds no idle connection opens its own, and meanwhile waits for one that
//! another attempt returns: it takes whichever comes first. A burst of new requests to a cold
//! pool does not then need one connect per request, and one slow connect (a SYN the endpoint
//! dropped, retransmitted only after a second) holds up no request while others finish. A
//! connect that loses the race still completes: its connection joins the pool.

use std::collections::VecDeque;
use std::net::SocketAddr;

use conduit_core::time::Instant;
use tokio::sync::oneshot;

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

/// One endpoint's idle connections and the attempts waiting for one.
pub(crate) struct Endpoint<N: Net> {
    /// Most recently used last.
    conns: Vec<Idle<N>>,
    /// Attempts connecting that take a returned connection instead, oldest first.
    waiters: VecDeque<(u64, oneshot::Sender<Upstream<N>>)>,
    next_waiter: u64,
}

impl<N: Net> Default for Endpoint<N> {
    fn default() -> Self {
        Self {
            conns: Vec::new(),
            waiters: VecDeque::new(),
            next_waiter: 0,
        }
    }
}

impl<N: Net> std::fmt::Debug for Endpoint<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("idle", &self.conns.len())
            .field("waiters", &self.waiters.len())
            .finish()
    }
}

/// An attempt's place in its endpoint's queue for a returned connection. Dropped, it leaves
/// the queue, and a connection handed to it meanwhile goes back to the pool.
pub(crate) struct Waiter<'p, N: Net> {
    pools: &'p Pools<N>,
    addr: SocketAddr,
    id: u64,
    returned: oneshot::Receiver<Upstream<N>>,
}

impl<N: Net> std::fmt::Debug for Waiter<'_, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter")
            .field("addr", &self.addr)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<N: Net> Waiter<'_, N> {
    /// A connection another attempt returned; pending for good if none ever will be (the
    /// pool forgot this waiter).
    pub(crate) async fn returned(&mut self) -> Upstream<N> {
        match (&mut self.returned).await {
            Ok(conn) => conn,
            Err(_) => std::future::pending().await,
        }
    }

    /// Leaves the queue: the connection handed over meanwhile, if one was.
    pub(crate) fn leave(mut self) -> Option<Upstream<N>> {
        self.take()
    }

    fn take(&mut self) -> Option<Upstream<N>> {
        let mut idle = lock(&self.pools.idle);
        if let Some(endpoint) = idle.get_mut(&self.addr)
            && let Some(at) = endpoint.waiters.iter().position(|(id, _)| *id == self.id)
        {
            endpoint.waiters.remove(at);
            return None;
        }
        // Not queued: a connection was handed over (under this lock), or already taken.
        self.returned.try_recv().ok()
    }
}

impl<N: Net> Drop for Waiter<'_, N> {
    fn drop(&mut self) {
        if let Some(conn) = self.take() {
            self.pools
                .checkin_h1(self.addr, conn, self.pools.clock.now());
        }
    }
}

impl<N: Net> Pools<N> {
    /// An idle HTTP/1.1 connection to `addr` not past the pool idle timeout at `now`, most
    /// recently used first. The caller checks that it is still open.
    pub(crate) fn checkout_h1(&self, addr: SocketAddr, now: Instant) -> Option<Upstream<N>> {
        let mut idle = lock(&self.idle);
        let endpoint = idle.get_mut(&addr)?;
        while let Some(conn) = endpoint.conns.pop() {
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

    /// Returns an HTTP/1.1 connection that is ready for a request at `now` (its last response
    /// ended cleanly, or it was just opened): to the attempt that has waited longest for one,
    /// else to the idle list (dropped, and so closed, when the endpoint has
    /// `pool_max_idle_per_endpoint` idle already).
    pub(crate) fn checkin_h1(&self, addr: SocketAddr, mut conn: Upstream<N>, now: Instant) {
        let mut idle = lock(&self.idle);
        let endpoint = idle.entry(addr).or_default();
        while let Some((_, waiter)) = endpoint.waiters.pop_front() {
            match waiter.send(conn) {
                Ok(()) => return,
                // That attempt is gone (cancelled with its request).
                Err(back) => conn = back,
            }
        }
        if endpoint.conns.len() < self.limits.pool_max_idle_per_endpoint {
            endpoint.conns.push(Idle { conn, since: now });
        }
    }

    /// Queues an attempt that is opening a connection to `addr` for one returned meanwhile.
    pub(crate) fn wait_h1(&self, addr: SocketAddr) -> Waiter<'_, N> {
        let (send, returned) = oneshot::channel();
        let mut idle = lock(&self.idle);
        let endpoint = idle.entry(addr).or_default();
        let id = endpoint.next_waiter;
        endpoint.next_waiter = id.wrapping_add(1);
        endpoint.waiters.push_back((id, send));
        Waiter {
            pools: self,
            addr,
            id,
            returned,
        }
    }

    /// Closes idle connections past the pool idle timeout at `now`.
    pub(super) fn sweep_idle(&self, now: Instant) {
        let timeout = self.limits.pool_idle_timeout;
        lock(&self.idle).retain(|_, endpoint| {
            endpoint
                .conns
                .retain(|conn| now.saturating_duration_since(conn.since) < timeout);
            !endpoint.conns.is_empty() || !endpoint.waiters.is_empty()
        });
    }
}

#[cfg(test)]
impl<N: Net> Pools<N> {
    /// How many connections to `addr` are idle, and how many attempts wait for one.
    pub(crate) fn idle_h1(&self, addr: SocketAddr) -> (usize, usize) {
        lock(&self.idle)
            .get(&addr)
            .map_or((0, 0), |e| (e.conns.len(), e.waiters.len()))
    }
}
