//! The inbound side: other proxies' traffic to the local app.
//!
//! Same stack as outbound (count, detect, serve, the one request path), but every request and
//! opaque connection goes to `app_addr`. When the proxy knows the service its app serves
//! (`service`), inbound requests take that service's route profile (server-side per-route
//! classes, timeouts and metrics) and are counted under its name; without it, under the app's
//! address. Never under the client's `Host`: a peer could vary it to add series. The TLS seam sits before
//! detection in the connection server: the identity/mTLS issue terminates meshed peers' TLS
//! there and enforces authorization.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::admin::metrics::{Direction, Metrics};
use crate::clock::Clock;
use crate::config::ProxyConfig;
use crate::discover::Discover;
use crate::exchange::{Context, Target};
use crate::net::Net;
use crate::pool::Pools;
use crate::server::ServeContext;

pub(crate) fn context<N: Net>(
    config: &ProxyConfig,
    net: N,
    clock: Clock,
    metrics: &Arc<Metrics>,
    app: SocketAddr,
    discovery: &dyn Discover,
) -> Arc<ServeContext<N>> {
    let pools = Pools::new(
        net,
        clock,
        config.limits,
        Arc::clone(metrics),
        Direction::Inbound,
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
        },
    );
    Arc::new(ServeContext::new(cx, pools, config.limits, Some(app)))
}
