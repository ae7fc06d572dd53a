//! Requests on a connection the local service's policy does not allow, decided one by one.
//!
//! Inbound, the policy is decided once per connection, on what is known of its client (the
//! identity it proved, its address). A policy that lists its app's probe paths
//! ([`ServerPolicy::admits_probes`]) would still refuse the kubelet's plaintext probes that
//! way, so an HTTP connection it denies (or denies in audit) is served all the same, behind a
//! [`ProbeGate`]: the exchange asks the gate about each request before routing it, the gate
//! asks core ([`authorize_request`]), and a request that is not one of the policy's probes is
//! answered as the refused connection would have been (403, gRPC `PERMISSION_DENIED`, with
//! the same reason), counted and logged as before. Opaque connections are never gated: they
//! are refused whole, as there is no request to look at.
//!
//! Every other connection has no gate, and pays one branch per request for this.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use conduit_core::policy::{Decision, ServerPolicy, Verdict, authorize_request};
use conduit_core::route::RequestView;

use crate::admin::metrics::Metrics;
use crate::errors::ProxyError;

/// The per-request authorization of one connection the policy does not allow.
#[derive(Debug)]
pub(crate) struct ProbeGate {
    /// The policy the connection was decided by: a connection keeps the policy it was
    /// authorized under, as every connection does.
    policy: Arc<ServerPolicy>,
    /// The connection's decision ([`Verdict::Deny`] or [`Verdict::AuditDeny`]).
    connection: Decision,
    /// Who the client is, for logs and the refusal's reason.
    client: String,
    /// Whether the connection's refusal (or audit) was logged: once per connection at info,
    /// as a refused connection is, then at debug.
    logged: AtomicBool,
}

impl ProbeGate {
    /// The gate of a connection from `client` that `policy` decided `connection`.
    pub(crate) fn new(policy: Arc<ServerPolicy>, connection: Decision, client: String) -> Self {
        debug_assert!(policy.admits_probes() && connection.verdict != Verdict::Allow);
        Self {
            policy,
            connection,
            client,
            logged: AtomicBool::new(false),
        }
    }

    /// The connection's refusal, as the exchange answers a request the policy refuses.
    pub(crate) fn refusal(client: &str, decision: Decision) -> ProxyError {
        ProxyError::Forbidden {
            reason: format!("{client} is not authorized ({})", decision.rule),
        }
    }

    /// Decides `request` and counts the decision (`inbound_http_authz_*`): `None` lets it go
    /// on to the app, else the error to answer it with.
    pub(crate) fn admit(
        &self,
        metrics: &Metrics,
        request: &impl RequestView,
    ) -> Option<ProxyError> {
        let decision = authorize_request(
            &self.policy,
            self.connection,
            request.method(),
            request.path(),
        );
        metrics.authorized(true, decision.verdict);
        let first = !self.logged.load(Ordering::Relaxed);
        let (client, rule) = (&self.client, decision.rule);
        match decision.verdict {
            Verdict::Allow => {
                tracing::trace!(client = %client, %rule, "request admitted as a probe");
                None
            }
            Verdict::AuditDeny => {
                if first && !self.logged.swap(true, Ordering::Relaxed) {
                    tracing::info!(client = %client, %rule, "the policy would deny this connection (audit only)");
                } else {
                    tracing::debug!(client = %client, %rule, "the policy would deny this request (audit only)");
                }
                None
            }
            Verdict::Deny => {
                if first && !self.logged.swap(true, Ordering::Relaxed) {
                    tracing::info!(client = %client, %rule, "connection denied by policy");
                } else {
                    tracing::debug!(client = %client, %rule, "request denied by policy");
                }
                Some(Self::refusal(client, decision))
            }
        }
    }
}
