//! Upstream connections: per-endpoint pools over the [`Net`] seam.
//!
//! - [`idle`]: idle HTTP/1.1 connections, which the HTTP/1 engine checks out per request and
//!   back in once a response has ended cleanly (at most `pool_max_idle_per_endpoint` per
//!   endpoint, closed after `pool_idle_timeout`); an attempt that finds none connects and takes
//!   whichever comes first, its connection or one another attempt returns;
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
use crate::identity::LocalIdentity;
use crate::net::Net;
use crate::tls::{MeshedPeers, UpstreamIo};
use crate::transport::CountingIo;

/// A connection the pools opened: counted, and mTLS when its endpoint is meshed.
pub(crate) type Conn<N> = UpstreamIo<CountingIo<<N as Net>::Io>>;

/// How a direction secures its upstream connections.
#[derive(Debug, Default)]
pub(crate) struct Security {
    /// This proxy's identity, offered to meshed endpoints.
    pub(crate) identity: Option<Arc<LocalIdentity>>,
    /// Which endpoints are meshed (outbound; inbound connects only to the local app).
    pub(crate) meshed: Option<Arc<MeshedPeers>>,
    /// Refuse endpoints that are not meshed (`outbound_require_identity`).
    pub(crate) require_identity: bool,
}

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
    security: Security,
    endpoints: Mutex<BTreeMap<SocketAddr, Arc<h2::Endpoint>>>,
    /// Idle HTTP/1.1 connections per endpoint, most recently used last.
    idle: Mutex<BTreeMap<SocketAddr, idle::Endpoint<N>>>,
}

impl<N: Net> Pools<N> {
    pub(crate) fn new(
        net: N,
        clock: Clock,
        limits: Limits,
        metrics: Arc<Metrics>,
        direction: Direction,
        security: Security,
    ) -> Self {
        Self {
            net,
            clock,
            limits,
            metrics,
            direction,
            security,
            endpoints: Mutex::default(),
            idle: Mutex::default(),
        }
    }

    /// Opens a counted connection, bounded by the connect timeout (the TLS handshake
    /// included): mTLS to a meshed endpoint, checked to prove the endpoint's identity, and
    /// never plaintext to one.
    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<Conn<N>, ProxyError> {
        let meshed = self.security.meshed.as_ref().and_then(|m| m.identity(addr));
        let tls = match (meshed, &self.security.identity) {
            (None, _) if self.security.require_identity => {
                return Err(ProxyError::Unmeshed { addr });
            }
            (None, _) => None,
            (Some(identity), None) => {
                return Err(ProxyError::NoIdentity {
                    addr,
                    identity: identity.to_string(),
                    reason: "this proxy has no identity configured (identity_name)".into(),
                });
            }
            (Some(identity), Some(local)) => {
                if !local.is_certified() {
                    return Err(ProxyError::NoIdentity {
                        addr,
                        identity: identity.to_string(),
                        reason: "this proxy holds no valid certificate yet".into(),
                    });
                }
                let Ok(name) = rustls::pki_types::ServerName::try_from(identity.to_string()) else {
                    return Err(ProxyError::Identity {
                        addr,
                        reason: "not a DNS name".into(),
                        identity: identity.to_string(),
                    });
                };
                Some((identity, name, local))
            }
        };
        let timeout = self.limits.connect_timeout;
        let connect = async {
            let io = self
                .net
                .connect(addr)
                .await
                .map_err(|source| ProxyError::Connect { addr, source })?;
            let io = CountingIo::new(io, self.metrics.connection(self.direction, Peer::Dst));
            let Some((identity, name, local)) = tls else {
                tracing::debug!(endpoint = %addr, "connected");
                return Ok(UpstreamIo::Plain(io));
            };
            let connector = tokio_rustls::TlsConnector::from(local.client_config());
            match connector.connect(name, io).await {
                Ok(tls) => {
                    tracing::debug!(endpoint = %addr, %identity, "connected over mTLS");
                    Ok(UpstreamIo::Tls(Box::new(tls)))
                }
                Err(err) => {
                    let reason = crate::admin::metrics::tls_failure_reason(&err);
                    self.metrics.tls_handshake_failed(self.direction, reason);
                    tracing::warn!(endpoint = %addr, %identity, error = %err, reason, "mTLS handshake failed");
                    Err(ProxyError::Identity {
                        addr,
                        identity: identity.to_string(),
                        reason: err.to_string(),
                    })
                }
            }
        };
        match tokio::time::timeout(timeout, connect).await {
            Err(_) => Err(ProxyError::ConnectTimeout { addr, timeout }),
            Ok(result) => result,
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
