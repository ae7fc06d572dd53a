//! Upstream connections: per-endpoint pools over the [`Net`] seam.
//!
//! - [`idle`]: idle HTTP/1.1 connections, which the HTTP/1 engine checks out per request and
//!   back in once a response has ended cleanly (at most `pool_max_idle_per_endpoint` per
//!   endpoint, closed after `pool_idle_timeout`);
//! - [`h2`]: one multiplexed HTTP/2 connection per endpoint (hyper's client), re-established
//!   when it closes.
//!
//! Upstream speaks the protocol the client spoke (h1 for h1, h2 for h2: gRPC needs h2 end to
//! end); upgrading h1 to h2 between proxies is a later optimisation. Every connection is opened
//! by [`Pools::connect`]: counted, and bounded by the connect timeout.

pub(crate) mod h2;
pub(crate) mod idle;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use conduit_core::time::Instant;

use crate::admin::metrics::{Direction, Metrics, Peer};
use crate::clock::Clock;
use crate::config::Limits;
use crate::errors::ProxyError;
use crate::net::Net;
use crate::transport::CountingIo;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Pool state is a list of connections; a panic elsewhere cannot leave it half-updated.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every endpoint's connections, for one direction.
#[derive(Debug)]
pub(crate) struct Pools<N: Net> {
    net: N,
    pub(crate) clock: Clock,
    pub(crate) limits: Limits,
    metrics: Arc<Metrics>,
    direction: Direction,
    endpoints: Mutex<BTreeMap<SocketAddr, Arc<h2::Endpoint>>>,
    /// Idle HTTP/1.1 connections per endpoint, most recently used last.
    idle: Mutex<BTreeMap<SocketAddr, Vec<idle::Idle<N>>>>,
}

impl<N: Net> Pools<N> {
    pub(crate) fn new(
        net: N,
        clock: Clock,
        limits: Limits,
        metrics: Arc<Metrics>,
        direction: Direction,
    ) -> Self {
        Self {
            net,
            clock,
            limits,
            metrics,
            direction,
            endpoints: Mutex::default(),
            idle: Mutex::default(),
        }
    }

    /// Opens a counted connection, bounded by the connect timeout.
    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<CountingIo<N::Io>, ProxyError> {
        let timeout = self.limits.connect_timeout;
        match tokio::time::timeout(timeout, self.net.connect(addr)).await {
            Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
            Ok(Err(source)) => Err(ProxyError::Connect { addr, source }),
            Ok(Ok(io)) => {
                tracing::debug!(endpoint = %addr, "connected");
                Ok(CountingIo::new(
                    io,
                    self.metrics.connection(self.direction, Peer::Dst),
                ))
            }
        }
    }

    /// Closes idle connections past the idle timeout and forgets unused endpoints.
    pub(crate) fn sweep(&self) {
        let now = self.clock.now();
        let timeout = self.limits.pool_idle_timeout;
        self.sweep_idle(now);
        lock(&self.endpoints).retain(|_, endpoint| endpoint.sweep(now, timeout));
    }

    fn endpoint(&self, addr: SocketAddr, now: Instant) -> Arc<h2::Endpoint> {
        let endpoint = Arc::clone(
            lock(&self.endpoints)
                .entry(addr)
                .or_insert_with(|| Arc::new(h2::Endpoint::new(now))),
        );
        endpoint.used(now);
        endpoint
    }
}
