//! The outbound side: the local app's traffic to other services.
//!
//! Stack, per connection (top-down):
//! 1. count the connection (`tcp_*{direction="outbound",peer="src"}`);
//! 2. detect the protocol (h2 preface, HTTP/1 request head, else opaque);
//! 3. HTTP: hyper serves the connection; each request is routed by authority through discovery
//!    (404 when unknown), balanced per request by the core's P2C over PeakEWMA behind its queue
//!    (504 fail-fast, 503 shed), and sent over the endpoint's pooled connections;
//! 4. opaque TCP: with no original destination yet (the iptables redirect arrives with the
//!    Kubernetes issue), forwarded to `outbound_default_target` if set, else closed.

use std::sync::Arc;

use conduit_core::classify::Classifier;

use crate::admin::metrics::{Direction, Metrics};
use crate::balance::Router;
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
    router: Arc<Router>,
) -> Arc<ServeContext<N>> {
    let pools = Arc::new(Pools::new(
        net,
        clock,
        config.limits,
        Arc::clone(metrics),
        Direction::Outbound,
    ));
    let http = Arc::new(HttpProxy {
        direction: Direction::Outbound,
        pools,
        metrics: Arc::clone(metrics),
        clock,
        target: Target::Balanced(router),
        // Linkerd's default response classes; route profiles add theirs with their issue.
        classifier: Arc::new(Classifier::default()),
    });
    Arc::new(ServeContext {
        http,
        limits: config.limits,
        clock,
        opaque_target: config.outbound_default_target,
    })
}
