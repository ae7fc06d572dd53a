//! The outbound side: the local app's traffic to other services.
//!
//! Stack, per connection (top-down):
//! 1. count the connection (`tcp_*{direction="outbound",peer="src"}`);
//! 2. detect the protocol (h2 preface, HTTP/1 request head, else opaque);
//! 3. HTTP: the proxy's own HTTP/1 engine or hyper's HTTP/2 server moves the bytes, and every
//!    request goes through the one request path (`exchange`): routed by authority through
//!    discovery, matched to a route of the service's profile (its response classes, timeouts
//!    and metrics), balanced per request by the core's P2C over PeakEWMA behind its queue (504
//!    fail-fast, 503 shed), sent over the endpoint's pooled connections (again, when the
//!    endpoint provably never processed it), and settled;
//!    Meshed endpoints (discovery gives their identity) are reached over mTLS only, checked to
//!    prove that identity; with `outbound_require_identity`, unmeshed ones are refused.
//!    An authority discovery does not know (a host outside the mesh) goes to where its
//!    connection was headed before the pod's iptables redirect sent it here
//!    (`SO_ORIGINAL_DST`, read once per connection), as one plain endpoint through the same
//!    exchange (its metrics under the request's authority, its timeouts, its errors, the same
//!    pools); a connection that was not redirected (the proxy used as an explicit proxy) has
//!    nowhere else to go, and such a request gets 404;
//! 4. opaque TCP (and TLS the proxy does not terminate): forwarded to that original
//!    destination, else to `outbound_default_target` if set, else closed.

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
