//! Sending a request again.
//!
//! Today one rule, Linkerd's and every HTTP client's: a request an endpoint provably never
//! processed may be sent again, whatever its method, because no work can be repeated. Proof
//! comes from the transport: a connect that was refused or timed out, an HTTP/2 stream the
//! server refused (`REFUSED_STREAM`) or excluded with a graceful `GOAWAY`, a reused HTTP/1.1
//! connection the server closed before any byte of a response (RFC 9112 §9.3.1; only safe
//! methods, since the server may have read the request before closing). The request must
//! still be whole: its body not yet read, or kept whole in the replay buffer.
//!
//! Route retry policies, budgets and hedging (retries of requests that *were* processed) come
//! with the retry issue and build on [`Unprocessed`].
//!
//! ```
//! use conduit_core::retry::{Resend, Unprocessed, resend_unprocessed};
//!
//! let refused = Unprocessed { attempts: 1, connect_failed: true, replayable: true };
//! // A balanced request goes to another endpoint; the local app would refuse again.
//! assert_eq!(resend_unprocessed(refused, true), Resend::Elsewhere);
//! assert_eq!(resend_unprocessed(refused, false), Resend::No);
//! ```

/// Attempts for a request that failed before any of it was processed: the first and at most
/// two more. A draining endpoint can fail one request twice (its `GOAWAY` refuses the stream,
/// then its closed listener refuses the connect) before the balancer takes it out of rotation;
/// beyond that the service is broadly unreachable and the error is the answer.
pub const MAX_UNPROCESSED_ATTEMPTS: u32 = 3;

/// What is known of an attempt that failed before the endpoint processed any of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unprocessed {
    /// Attempts made so far, this one included.
    pub attempts: u32,
    /// It failed to connect (refused, unreachable, timed out), as opposed to a refused stream
    /// or a closed reused connection.
    pub connect_failed: bool,
    /// The request can be sent again whole (its body unread, or kept whole).
    pub replayable: bool,
}

/// Whether and where to send a request again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resend {
    /// Answer with the error.
    No,
    /// To an endpoint the balancer offers now (never after a second wait in its queue).
    Elsewhere,
    /// To the same fixed target, on a new connection.
    Again,
}

/// Decides about a request that failed unprocessed. `balanced`: the request is balanced over
/// a service's endpoints (outbound); otherwise it has one fixed target (inbound: the local
/// app), for which only a refused stream or a closed reused connection is worth another try:
/// a refused connect would be refused again.
#[must_use]
pub fn resend_unprocessed(failure: Unprocessed, balanced: bool) -> Resend {
    if !failure.replayable || failure.attempts >= MAX_UNPROCESSED_ATTEMPTS {
        return Resend::No;
    }
    match (balanced, failure.connect_failed) {
        (true, _) => Resend::Elsewhere,
        (false, false) => Resend::Again,
        (false, true) => Resend::No,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// A request is never sent more than the bound, nor ever when it is not whole.
        #[test]
        fn resends_are_bounded_and_need_a_whole_request(
            attempts in 1u32..10,
            connect_failed: bool,
            replayable: bool,
            balanced: bool,
        ) {
            let decision = resend_unprocessed(
                Unprocessed { attempts, connect_failed, replayable },
                balanced,
            );
            if !replayable || attempts >= MAX_UNPROCESSED_ATTEMPTS {
                prop_assert_eq!(decision, Resend::No);
            }
            if decision == Resend::Again {
                prop_assert!(!balanced && !connect_failed);
            }
        }
    }
}
