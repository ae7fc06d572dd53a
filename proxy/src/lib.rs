//! Conduit's data plane: the sidecar proxy.
//!
//! The proxy sits beside an app. Its **outbound** listener takes the app's HTTP/1.1, HTTP/2,
//! gRPC and opaque TCP traffic, routes HTTP by authority through discovery and by route
//! through the service's profile, and balances each request with the core's P2C over
//! PeakEWMA; its **inbound** listener takes other proxies' traffic and forwards it to the app
//! under the local service's profile; its **admin** server serves `/metrics`, `/ready`,
//! `/live` and `/shutdown`. Both HTTP engines (its own for HTTP/1, hyper for HTTP/2) send
//! every request through one request path (`exchange`), which owns its route, deadlines,
//! attempts, metrics and span.
//!
//! Contract: the proxy's environment is a parameter. The network is a [`net::Net`] (the
//! kernel's through [`net::TokioNet`], or turmoil's in the simulation), time is read only in
//! [`clock`], OS entropy only in [`entropy`], and discovery is a [`discover::Discover`]. Every
//! mesh decision is made by `conduit_core`; this crate turns decisions into IO. Errors become
//! responses only in [`errors::respond`].
//!
//! Entry points: [`run`] (bind and serve), or [`Proxy::bind`] then [`Proxy::serve`] when the
//! caller needs the bound addresses first (tests bind port 0) or reports to an
//! [`observe::Observer`] ([`Proxy::with_observer`]).

pub mod admin;
mod balance;
pub mod body;
pub mod clock;
pub mod config;
mod detect;
pub mod discover;
pub mod drain;
pub mod entropy;
pub mod errors;
mod exchange;
pub mod fault_points;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod h1;
mod http2;
pub mod identity;
mod idle;
mod inbound;
pub mod net;
pub mod observe;
mod outbound;
mod pool;
mod server;
mod tls;
pub mod transport;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use conduit_core::rand::DetRng;
use tokio::sync::watch;

pub use config::ProxyConfig;
pub use discover::{ControllerDiscover, Discover, FileDiscover, Resolution, StaticDiscover};
pub use net::{Listener, Net, TokioNet};

/// Why the proxy could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyStartError {
    /// A listener could not be bound.
    #[error("binding the {listener} listener on {addr}: {source}")]
    Bind {
        /// `outbound`, `inbound` or `admin`.
        listener: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The identity could not be set up (unreadable or garbled trust anchors or token).
    #[error("identity: {0}")]
    Identity(#[from] identity::IdentityError),
}

/// The addresses a bound proxy listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addrs {
    /// The outbound listener.
    pub outbound: SocketAddr,
    /// The inbound listener, when an app address is configured.
    pub inbound: Option<SocketAddr>,
    /// The admin server.
    pub admin: SocketAddr,
}

/// A proxy whose listeners are bound, ready to [`serve`](Self::serve).
#[derive(Debug)]
pub struct Proxy<N: Net> {
    config: ProxyConfig,
    net: N,
    outbound: N::Listener,
    inbound: Option<N::Listener>,
    admin: N::Listener,
    addrs: Addrs,
    hooks: observe::Hooks,
    identity: Option<Arc<identity::LocalIdentity>>,
}

impl<N: Net> Proxy<N> {
    /// Binds the outbound, inbound (if `app_addr` is set) and admin listeners.
    ///
    /// # Errors
    ///
    /// [`ProxyStartError::Bind`] naming the listener.
    pub async fn bind(config: ProxyConfig, net: N) -> Result<Self, ProxyStartError> {
        async fn bind_one<N: Net>(
            net: &N,
            listener: &'static str,
            addr: SocketAddr,
        ) -> Result<(N::Listener, SocketAddr), ProxyStartError> {
            let bound = net
                .bind(addr)
                .await
                .map_err(|source| ProxyStartError::Bind {
                    listener,
                    addr,
                    source,
                })?;
            let local = bound.local_addr().map_err(|source| ProxyStartError::Bind {
                listener,
                addr,
                source,
            })?;
            Ok((bound, local))
        }
        let (outbound, outbound_addr) = bind_one(&net, "outbound", config.outbound_addr).await?;
        let (admin, admin_addr) = bind_one(&net, "admin", config.admin_addr).await?;
        let (inbound, inbound_addr) = if config.app_addr.is_some() {
            let (listener, addr) = bind_one(&net, "inbound", config.inbound_addr).await?;
            (Some(listener), Some(addr))
        } else {
            tracing::info!("no app_addr configured; the inbound listener is disabled");
            (None, None)
        };
        let addrs = Addrs {
            outbound: outbound_addr,
            inbound: inbound_addr,
            admin: admin_addr,
        };
        Ok(Self {
            config,
            net,
            outbound,
            inbound,
            admin,
            addrs,
            hooks: observe::Hooks::default(),
            identity: None,
        })
    }

    /// Reports what the proxy applies and picks to `observer` (instead of to nobody).
    /// Uses `identity` (made by the caller, e.g. the simulation with its own wall clock)
    /// instead of loading one from `config.identity`.
    #[must_use]
    pub fn with_identity(mut self, identity: Arc<identity::LocalIdentity>) -> Self {
        self.identity = Some(identity);
        self
    }

    #[must_use]
    pub fn with_observer(mut self, observer: Arc<dyn observe::Observer>) -> Self {
        self.hooks.observer = observer;
        self
    }

    /// Plants `fault` in the proxy: for tests that show a check catches it. Only with the
    /// `planted-faults` feature; no configuration reaches it.
    #[cfg(feature = "planted-faults")]
    #[must_use]
    pub fn with_planted_fault(mut self, fault: observe::PlantedFault) -> Self {
        self.hooks.planted = Some(fault);
        self
    }

    /// Where the listeners are.
    #[must_use]
    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// Serves until `shutdown` resolves or `/shutdown` is requested, then drains gracefully:
    /// stops accepting, lets in-flight requests finish within the grace period, and returns.
    ///
    /// # Errors
    ///
    /// None today; the result leaves room for fatal runtime errors.
    pub async fn serve<D: Discover>(
        self,
        discovery: D,
        seed: u64,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ProxyStartError> {
        let Self {
            config,
            net,
            outbound,
            inbound,
            admin,
            addrs,
            hooks,
            identity,
        } = self;
        let identity = match (identity, &config.identity) {
            (Some(identity), _) => Some(identity),
            (None, Some(settings)) => Some(Arc::new(identity::LocalIdentity::load(
                settings,
                clock::system_unix_time,
            )?)),
            (None, None) => None,
        };
        let clock = clock::Clock::new();
        let metrics = Arc::new(admin::metrics::Metrics::new(clock, config.metrics));
        let mut rng = DetRng::new(seed);
        let (drain_signal, drain) = drain::channel();

        let discovery: Arc<dyn Discover> = Arc::new(discovery);
        let router = balance::Router::new(
            Arc::clone(&discovery),
            rng.child("balance"),
            clock,
            config.balancer,
            config.queue,
            config.discovery_idle_timeout,
            hooks,
        );
        tokio::spawn(Arc::clone(&router).run(drain.clone()));

        if let Some(identity) = &identity {
            match &config.discovery {
                config::DiscoveryConfig::Controller { addr } => {
                    tokio::spawn(Arc::clone(identity).certify(
                        net.clone(),
                        (addr.clone(), config.controller_identity.clone()),
                        config.limits.connect_timeout,
                        clock,
                        rng.child("identity"),
                        drain.clone(),
                    ));
                }
                _ => tracing::error!(
                    "an identity needs the controller's CA, and discovery is not the controller"
                ),
            }
        }
        let outbound_ctx = outbound::context(
            &config,
            net.clone(),
            clock,
            &metrics,
            Arc::clone(&router),
            identity.clone(),
        );
        let mut all_pools = vec![Arc::clone(&outbound_ctx.pools)];
        tokio::spawn(server::accept_loop(outbound, outbound_ctx, drain.clone()));
        if let (Some(listener), Some(app)) = (inbound, config.app_addr) {
            let ctx = inbound::context(
                &config,
                net.clone(),
                clock,
                &metrics,
                app,
                &*discovery,
                identity.clone(),
            );
            all_pools.push(Arc::clone(&ctx.pools));
            tokio::spawn(server::accept_loop(listener, ctx, drain.clone()));
        }
        let sweep_pools = {
            let mut drain = drain.clone();
            let interval =
                (config.limits.pool_idle_timeout / 2).max(std::time::Duration::from_millis(100));
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(interval);
                loop {
                    tokio::select! {
                        _ = ticker.tick() => for pools in &all_pools { pools.sweep() },
                        () = drain.signaled() => return,
                    }
                }
            })
        };
        // Idle metric series go after `metrics_retain_idle` whether or not anyone scrapes.
        let sweep_metrics = {
            let mut drain = drain.clone();
            let metrics = Arc::clone(&metrics);
            let interval = (config.metrics.retain_idle / 4).clamp(
                std::time::Duration::from_millis(100),
                std::time::Duration::from_secs(60),
            );
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(interval);
                loop {
                    tokio::select! {
                        _ = ticker.tick() => metrics.retire_idle(),
                        () = drain.signaled() => return,
                    }
                }
            })
        };

        let (ready_tx, ready_rx) = watch::channel(true);
        let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
        // The inbound side's local service: the proxy is ready once discovery has answered
        // for it (its authorization policy is then known).
        let local_service = config
            .service
            .as_ref()
            .filter(|_| config.app_addr.is_some())
            .map(|service| (service.clone(), discovery.resolve(service)));
        let admin_state = Arc::new(admin::Admin {
            metrics: Arc::clone(&metrics),
            discovery,
            router,
            ready: ready_rx,
            shutdown: shutdown_tx,
            limits: config.limits,
            clock,
            identity,
            local_service,
        });
        let admin_task = tokio::spawn(admin::serve::<N>(admin, admin_state));
        tracing::info!(
            outbound = %addrs.outbound,
            inbound = ?addrs.inbound,
            admin = %addrs.admin,
            "proxy serving"
        );
        drop(drain);

        tokio::select! {
            () = shutdown => tracing::info!("shutdown signal received"),
            _ = shutdown_rx.wait_for(|requested| *requested) => {}
        }
        ready_tx.send_replace(false);
        tracing::info!(grace = ?config.shutdown_grace_period, "draining");
        let drained = drain_signal.drain(config.shutdown_grace_period).await;
        sweep_pools.abort();
        sweep_metrics.abort();
        if drained {
            tracing::info!("drained; exiting");
        } else {
            tracing::warn!("grace period over with work in flight; exiting anyway");
        }
        admin_task.abort();
        Ok(())
    }
}

/// Binds and serves: the one entry point the binary and the simulation share.
///
/// # Errors
///
/// [`ProxyStartError`] when a listener cannot be bound.
pub async fn run<N: Net, D: Discover>(
    config: ProxyConfig,
    net: N,
    seed: u64,
    discovery: D,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ProxyStartError> {
    Proxy::bind(config, net)
        .await?
        .serve(discovery, seed, shutdown)
        .await
}
