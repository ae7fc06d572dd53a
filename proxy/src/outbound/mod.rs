//! The outbound side: the local app's traffic to other services.
//!
//! Stack, per connection (top-down):
//! 1. count the connection (`tcp_*{direction="outbound",peer="src"}`);
//! 2. detect the protocol (h2 preface, HTTP/1 request head, else opaque);
//! 3. HTTP: the proxy's own HTTP/1 engine or hyper's HTTP/2 server moves the bytes, and every
//!    request goes through the one request path (`exchange`): routed by authority through
//!    discovery (404 when unknown), matched to a route of the service's profile (its response
//!    classes, timeouts and metrics), balanced per request by the core's P2C over PeakEWMA
//!    behind its queue (504 fail-fast, 503 shed), sent over the endpoint's pooled connections
//!    (again, when the endpoint provably never processed it), and settled;
//!    Meshed endpoints (discovery gives their identity) are reached over mTLS only, checked to
//!    prove that identity; with `outbound_require_identity`, unmeshed ones are refused;
//! 4. opaque TCP (and TLS the proxy does not terminate): forwarded to where the connection was
//!    headed before the pod's iptables redirect sent it here (`SO_ORIGINAL_DST`), else to
//!    `outbound_default_target` if set, else closed.

use std::sync::Arc;

use crate::admin::metrics::{Direction, Metrics};
use crate::balance::Router;
use crate::clock::Clock;
use crate::config::ProxyConfig;
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
    router: Arc<Router>,
    identity: Option<Arc<LocalIdentity>>,
) -> Arc<ServeContext<N>> {
    let security = Security {
        identity,
        meshed: Some(Arc::clone(router.meshed())),
        require_identity: config.outbound_require_identity,
    };
    let pools = Pools::new(
        net,
        clock,
        config.limits,
        Arc::clone(metrics),
        Direction::Outbound,
        security,
    );
    let cx = Context::new(
        Direction::Outbound,
        Arc::clone(metrics),
        clock,
        Target::Balanced(router),
    );
    Arc::new(ServeContext::new(
        cx,
        pools,
        config.limits,
        config.outbound_default_target,
        None,
    ))
}
