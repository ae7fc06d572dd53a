//! The inbound side: other proxies' traffic to the local app.
//!
//! Same stack as outbound (count, detect, serve, the one request path), but every request and
//! opaque connection goes to `app_addr`. When the proxy knows the service its app serves
//! (`service`), inbound requests take that service's route profile (server-side per-route
//! classes, timeouts and metrics) and are counted under its name; without it, under the app's
//! address. Never under the client's `Host`: a peer could vary it to add series. With an
//! identity, a TLS ClientHello naming it (SNI) is terminated before detection (the client must
//! present a certificate from the mesh's CA) and the decrypted stream is served as any other;
//! TLS for other names passes through to the app untouched.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::admin::metrics::{Direction, Metrics};
use crate::clock::Clock;
use crate::config::ProxyConfig;
use crate::discover::Discover;
use crate::exchange::{Context, Target};
use crate::identity::LocalIdentity;
use crate::net::Net;
use crate::pool::{Pools, Security};
use crate::server::ServeContext;

pub(crate) fn context<N: Net>(
    config: &ProxyConfig,
    net: N,
    clock: Clock,
    metrics: &Arc<Metrics>,
    app: SocketAddr,
    discovery: &dyn Discover,
    identity: Option<Arc<LocalIdentity>>,
) -> Arc<ServeContext<N>> {
    // The app is reached in plaintext on its own host.
    let pools = Pools::new(
        net,
        clock,
        config.limits,
        Arc::clone(metrics),
        Direction::Inbound,
        Security::default(),
    );
    let service = config
        .service
        .as_deref()
        .map(|service| Context::follow_local(discovery, service));
    let label = config
        .service
        .clone()
        .unwrap_or_else(|| app.to_string())
        .into();
    let cx = Context::new(
        Direction::Inbound,
        Arc::clone(metrics),
        clock,
        Target::Local {
            app,
            service,
            label,
            wait: config.queue.failfast_timeout,
        },
    );
    Arc::new(ServeContext::new(
        cx,
        pools,
        config.limits,
        Some(app),
        identity,
    ))
}
