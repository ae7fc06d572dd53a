//! The inbound side: other proxies' traffic to the local app.
//!
//! Same stack as outbound (count, detect, serve), but every request and opaque connection goes
//! to `app_addr`. The TLS seam sits before detection in `server::serve_connection`: the
//! identity/mTLS issue terminates meshed peers' TLS there and enforces authorization.

use std::net::SocketAddr;
use std::sync::Arc;

use conduit_core::classify::Classifier;

use crate::admin::metrics::{Direction, Metrics};
use crate::clock::Clock;
use crate::config::ProxyConfig;
use crate::http::{HttpProxy, Target};
use crate::net::Net;
use crate::pool::Pools;
use crate::server::ServeContext;

pub(crate) fn context<N: Net>(
    config: &ProxyConfig,
    net: N,
    clock: Clock,
    metrics: &Arc<Metrics>,
    app: SocketAddr,
) -> Arc<ServeContext<N>> {
    let pools = Arc::new(Pools::new(
        net,
        clock,
        config.limits,
        Arc::clone(metrics),
        Direction::Inbound,
    ));
    let http = Arc::new(HttpProxy {
        direction: Direction::Inbound,
        pools,
        metrics: Arc::clone(metrics),
        clock,
        target: Target::Fixed(app),
        // Linkerd's default response classes; route profiles add theirs with their issue.
        classifier: Arc::new(Classifier::default()),
    });
    Arc::new(ServeContext {
        http,
        limits: config.limits,
        clock,
        opaque_target: Some(app),
    })
}
