//! Deadlines: per-route request and attempt timeouts, and deadline propagation (`grpc-timeout`).
//!
//! A route may bound a request two ways ([`Timeouts`]):
//!
//! - the **request timeout** bounds the whole request, from its arrival until its response has
//!   ended, every attempt included (Linkerd's `timeout.linkerd.io/request`, Envoy's route
//!   timeout, a gRPC deadline);
//! - the **attempt timeout** bounds one attempt, from its dispatch until its response headers
//!   (Linkerd's per-try timeout): an attempt that has answered cannot be retried anyway.
//!
//! A caller may also bring its own deadline: an incoming `grpc-timeout` header (gRPC over
//! HTTP/2, "Timeout") is honoured like a request timeout, the shorter of the two winning, and
//! the time then remaining is sent on upstream in the request's `grpc-timeout`, so every hop of
//! a call chain works to the first caller's deadline and none past it.
//!
//! [`Deadlines`] fixes a request's deadlines at its arrival and answers, for each attempt, when
//! that attempt must give up and what to tell the upstream. Time only moves forward through
//! it: the remaining time never grows, and a propagated deadline is never later than the one
//! that came in (it is rounded down to the wire format's precision).
//!
//! # Drive loop
//!
//! 1. At arrival: `Deadlines::new(now, &route.timeouts, incoming)` with `incoming` from
//!    [`parse_grpc_timeout`] of the request's `grpc-timeout`, if any.
//! 2. Before each attempt: [`Deadlines::attempt`] at the dispatch time gives the attempt's
//!    deadline (wait for response headers until then) and the `grpc-timeout` to send, or
//!    [`Expiry`] if the request's deadline has already passed.
//! 3. When a wait reaches its deadline: [`Deadlines::expiry`] says which timeout it was (the
//!    request's, or only the attempt's), which decides the error and whether another attempt
//!    may follow.
//! 4. While the response body streams: [`Deadlines::request`] bounds it.
//!
//! ```
//! use std::time::Duration;
//! use conduit_core::time::Instant;
//! use conduit_core::timeout::{Deadlines, Expiry, Timeouts, encode_grpc_timeout};
//!
//! let ms = Duration::from_millis;
//! let t0 = Instant::ZERO;
//! let route = Timeouts { request: Some(ms(1000)), attempt: Some(ms(300)) };
//! // The caller allows 500 ms: its deadline is the earlier one.
//! let deadlines = Deadlines::new(t0, &route, Some(ms(500)));
//! assert_eq!(deadlines.request(), Some(t0 + ms(500)));
//!
//! // The first attempt, dispatched 100 ms later, waits 300 ms at most, and the upstream is
//! // told the 300 ms it has.
//! let attempt = deadlines.attempt(t0 + ms(100)).unwrap();
//! assert_eq!(attempt.deadline, Some(t0 + ms(400)));
//! assert_eq!(encode_grpc_timeout(attempt.propagate.unwrap()).as_str(), "300000u");
//!
//! // A second attempt at 450 ms has only the request's last 50 ms.
//! let attempt = deadlines.attempt(t0 + ms(450)).unwrap();
//! assert_eq!(attempt.deadline, Some(t0 + ms(500)));
//! assert_eq!(deadlines.expiry(t0 + ms(500)), Some(Expiry::Request { timeout: ms(500), propagated: true }));
//! ```

use core::fmt;
use core::time::Duration;

use serde::Deserialize;

use crate::time::{Instant, parse_duration};

/// The longest timeout a route may set: far beyond any request a proxy should hold open, and
/// small enough that deadline arithmetic cannot overflow.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// The longest `grpc-timeout` honoured; longer ones are capped here. The wire format allows
/// 99,999,999 hours; nothing useful waits that long.
pub const MAX_GRPC_TIMEOUT: Duration = MAX_TIMEOUT;

/// A route's timeouts, validated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Timeouts {
    /// The whole request, from arrival until the response has ended, every attempt included.
    pub request: Option<Duration>,
    /// One attempt, from its dispatch until its response headers.
    pub attempt: Option<Duration>,
}

/// A route's timeouts as written in the mesh file: durations such as `500ms`, `2s`, `1m`.
///
/// ```yaml
/// timeouts:
///   request: 2s      # the whole request, every attempt included
///   attempt: 500ms   # each attempt, until its response headers
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawTimeouts {
    /// See [`Timeouts::request`].
    pub request: Option<String>,
    /// See [`Timeouts::attempt`].
    pub attempt: Option<String>,
}

/// Why a timeout was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidTimeout {
    /// The field at fault: `request` or `attempt`.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl Timeouts {
    /// Timeouts from durations.
    ///
    /// # Errors
    ///
    /// A zero timeout (which would fail every request) or one above [`MAX_TIMEOUT`], naming the
    /// field.
    pub fn try_new(
        request: Option<Duration>,
        attempt: Option<Duration>,
    ) -> Result<Self, InvalidTimeout> {
        for (field, value) in [("request", request), ("attempt", attempt)] {
            match value {
                Some(d) if d.is_zero() => {
                    return Err(InvalidTimeout {
                        field,
                        problem: "must be above zero (omit it for no timeout)".into(),
                    });
                }
                Some(d) if d > MAX_TIMEOUT => {
                    return Err(InvalidTimeout {
                        field,
                        problem: format!("{d:?} is above the maximum {MAX_TIMEOUT:?}"),
                    });
                }
                _ => {}
            }
        }
        Ok(Self { request, attempt })
    }
}

impl TryFrom<RawTimeouts> for Timeouts {
    type Error = InvalidTimeout;

    fn try_from(raw: RawTimeouts) -> Result<Self, InvalidTimeout> {
        let parse = |field: &'static str, text: Option<String>| match text {
            None => Ok(None),
            Some(text) => parse_duration(&text).map(Some).ok_or(InvalidTimeout {
                field,
                problem: format!("`{text}` is not a duration (like 500ms, 2s, 1m)"),
            }),
        };
        Self::try_new(
            parse("request", raw.request)?,
            parse("attempt", raw.attempt)?,
        )
    }
}

/// Which deadline passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// The request's: its route's request timeout, or the caller's propagated deadline. The
    /// request is over; no attempt may follow.
    Request {
        /// The time the request was given.
        timeout: Duration,
        /// The deadline was the caller's (`grpc-timeout`), not the route's.
        propagated: bool,
    },
    /// Only this attempt's: another attempt may follow within the request's deadline.
    Attempt {
        /// The attempt timeout.
        timeout: Duration,
    },
}

/// What one attempt is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// When the attempt gives up waiting for response headers (`None`: no deadline).
    pub deadline: Option<Instant>,
    /// The time to announce upstream in `grpc-timeout`: set only when the caller announced a
    /// deadline, and never longer than what remains of it.
    pub propagate: Option<Duration>,
}

/// A request's deadlines, fixed at its arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    start: Instant,
    /// The request's deadline and the timeout it came from.
    request: Option<(Instant, Duration)>,
    /// The deadline came from the caller's `grpc-timeout`.
    propagated: bool,
    /// The caller announced a deadline (send one on).
    announced: bool,
    attempt: Option<Duration>,
}

impl Deadlines {
    /// The deadlines of a request that arrived at `start` on a route with `timeouts`, whose
    /// caller announced `incoming` (its `grpc-timeout`, already parsed).
    #[must_use]
    pub fn new(start: Instant, timeouts: &Timeouts, incoming: Option<Duration>) -> Self {
        let incoming = incoming.map(|d| d.min(MAX_GRPC_TIMEOUT));
        let (request, propagated) = match (timeouts.request, incoming) {
            (Some(route), Some(caller)) if caller < route => (Some(caller), true),
            (Some(route), _) => (Some(route), false),
            (None, Some(caller)) => (Some(caller), true),
            (None, None) => (None, false),
        };
        Self {
            start,
            request: request.map(|timeout| (start + timeout, timeout)),
            propagated,
            announced: incoming.is_some(),
            attempt: timeouts.attempt,
        }
    }

    /// When the request arrived.
    #[must_use]
    pub fn start(&self) -> Instant {
        self.start
    }

    /// The request's deadline: its response must have ended by then.
    #[must_use]
    pub fn request(&self) -> Option<Instant> {
        self.request.map(|(deadline, _)| deadline)
    }

    /// The time left at `now` before the request's deadline (`None`: no deadline).
    #[must_use]
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.request()
            .map(|deadline| deadline.saturating_duration_since(now))
    }

    /// What an attempt dispatched at `now` is given.
    ///
    /// # Errors
    ///
    /// [`Expiry::Request`] when the request's deadline has passed: no attempt may start.
    pub fn attempt(&self, now: Instant) -> Result<Attempt, Expiry> {
        if let Some(expired) = self.request_expiry(now) {
            return Err(expired);
        }
        let own = self.attempt.map(|timeout| now + timeout);
        let deadline = match (own, self.request()) {
            (Some(a), Some(r)) => Some(a.min(r)),
            (a, r) => a.or(r),
        };
        let propagate = self
            .announced
            .then(|| deadline.map(|d| d.saturating_duration_since(now)))
            .flatten();
        Ok(Attempt {
            deadline,
            propagate,
        })
    }

    /// Which timeout an attempt dispatched at `dispatched` has run into at `now`, if any: the
    /// request's takes precedence over the attempt's.
    #[must_use]
    pub fn attempt_expiry(&self, dispatched: Instant, now: Instant) -> Option<Expiry> {
        if let Some(expired) = self.request_expiry(now) {
            return Some(expired);
        }
        let timeout = self.attempt?;
        (now >= dispatched + timeout).then_some(Expiry::Attempt { timeout })
    }

    /// Whether the request's own deadline has passed at `now`.
    #[must_use]
    pub fn expiry(&self, now: Instant) -> Option<Expiry> {
        self.request_expiry(now)
    }

    fn request_expiry(&self, now: Instant) -> Option<Expiry> {
        let (deadline, timeout) = self.request?;
        (now >= deadline).then_some(Expiry::Request {
            timeout,
            propagated: self.propagated,
        })
    }
}

/// Parses a `grpc-timeout` value (gRPC over HTTP/2: `TimeoutValue TimeoutUnit`, at most eight
/// ASCII digits then one of `H M S m u n`). `None` when malformed: such a header is ignored,
/// as gRPC servers do.
#[must_use]
pub fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    let duration = match unit {
        b'H' => Duration::from_secs(n.saturating_mul(3600)),
        b'M' => Duration::from_secs(n.saturating_mul(60)),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    };
    Some(duration.min(MAX_GRPC_TIMEOUT))
}

/// A `grpc-timeout` value, ready to send: at most eight digits and a unit.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct GrpcTimeout {
    bytes: [u8; 9],
    len: u8,
}

impl GrpcTimeout {
    /// The value as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and a unit letter are ever written.
        core::str::from_utf8(self.as_bytes()).unwrap_or("0n")
    }

    /// The value as bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Debug for GrpcTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Encodes `timeout` as a `grpc-timeout` value in the finest unit whose eight digits hold it,
/// rounded down: the value sent never announces more time than `timeout`.
#[must_use]
pub fn encode_grpc_timeout(timeout: Duration) -> GrpcTimeout {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    let units: [(u8, u128); 6] = [
        (b'n', 1),
        (b'u', 1_000),
        (b'm', 1_000_000),
        (b'S', 1_000_000_000),
        (b'M', 60_000_000_000),
        (b'H', 3_600_000_000_000),
    ];
    let (unit, value) = units
        .iter()
        .map(|&(unit, per)| (unit, nanos / per))
        .find(|&(_, value)| value <= MAX)
        .unwrap_or((b'H', MAX));
    let mut bytes = [0u8; 9];
    let mut digits = [0u8; 8];
    let mut n = value;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    bytes[..len].copy_from_slice(&digits[i..]);
    bytes[len] = unit;
    GrpcTimeout {
        bytes,
        len: u8::try_from(len + 1).unwrap_or(9),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const T0: Instant = Instant::ZERO;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn grpc_timeouts_parse_and_encode() {
        assert_eq!(parse_grpc_timeout(b"100m"), Some(ms(100)));
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"5n"), Some(Duration::from_nanos(5)));
        for bad in [
            &b""[..],
            b"m",
            b"100",
            b"123456789m",
            b"10x",
            b"-1m",
            b"1 m",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(encode_grpc_timeout(ms(300)).as_str(), "300000u");
        assert_eq!(
            encode_grpc_timeout(Duration::from_nanos(99_999_999)).as_str(),
            "99999999n"
        );
        assert_eq!(encode_grpc_timeout(ms(3000)).as_str(), "3000000u");
        assert_eq!(encode_grpc_timeout(Duration::ZERO).as_str(), "0n");
        assert_eq!(
            encode_grpc_timeout(Duration::from_secs(10 * 365 * 86400)).as_str(),
            "5256000M"
        );
    }

    #[test]
    fn the_shorter_of_route_and_caller_wins() {
        let route = Timeouts {
            request: Some(ms(200)),
            attempt: None,
        };
        let d = Deadlines::new(T0, &route, Some(ms(500)));
        assert_eq!(d.request(), Some(T0 + ms(200)));
        assert_eq!(
            d.expiry(T0 + ms(200)),
            Some(Expiry::Request {
                timeout: ms(200),
                propagated: false
            })
        );
        // The caller announced a deadline: the upstream is told what is left of it.
        let a = d.attempt(T0 + ms(50)).unwrap();
        assert_eq!(a.propagate, Some(ms(150)));
        // Without an announcement nothing is sent on.
        let d = Deadlines::new(T0, &route, None);
        assert_eq!(d.attempt(T0).unwrap().propagate, None);
        assert!(
            d.attempt(T0 + ms(200)).is_err(),
            "no attempt past the deadline"
        );
    }

    #[test]
    fn an_attempt_timeout_expires_alone() {
        let route = Timeouts {
            request: Some(ms(1000)),
            attempt: Some(ms(100)),
        };
        let d = Deadlines::new(T0, &route, None);
        let a = d.attempt(T0 + ms(10)).unwrap();
        assert_eq!(a.deadline, Some(T0 + ms(110)));
        assert_eq!(d.attempt_expiry(T0 + ms(10), T0 + ms(109)), None);
        assert_eq!(
            d.attempt_expiry(T0 + ms(10), T0 + ms(110)),
            Some(Expiry::Attempt { timeout: ms(100) })
        );
        assert!(matches!(
            d.attempt_expiry(T0 + ms(950), T0 + ms(1000)),
            Some(Expiry::Request { .. })
        ));
    }

    #[test]
    fn raw_timeouts_name_their_field() {
        let raw = RawTimeouts {
            request: Some("2s".into()),
            attempt: Some("soon".into()),
        };
        assert_eq!(Timeouts::try_from(raw).unwrap_err().field, "attempt");
        let raw = RawTimeouts {
            request: Some("0ms".into()),
            attempt: None,
        };
        assert_eq!(Timeouts::try_from(raw).unwrap_err().field, "request");
    }

    proptest! {
        /// The time remaining never grows as time passes.
        #[test]
        fn the_remaining_deadline_never_grows(
            route_ms in proptest::option::of(1u64..10_000),
            caller_ms in proptest::option::of(0u64..10_000),
            mut steps in proptest::collection::vec(0u64..20_000, 1..20),
        ) {
            let route = Timeouts { request: route_ms.map(ms), attempt: None };
            let d = Deadlines::new(T0, &route, caller_ms.map(ms));
            steps.sort_unstable();
            let mut last: Option<Duration> = None;
            for step in steps {
                let remaining = d.remaining(T0 + ms(step));
                if let (Some(before), Some(now)) = (last, remaining) {
                    prop_assert!(now <= before);
                }
                last = remaining;
            }
        }

        /// What is sent upstream is never more than what the caller gave, however late the
        /// attempt and whatever the route says; and it survives the wire format.
        #[test]
        fn a_propagated_deadline_is_never_longer_than_the_incoming_one(
            route_ms in proptest::option::of(1u64..10_000),
            attempt_ms in proptest::option::of(1u64..10_000),
            caller_nanos in 0u64..20_000_000_000,
            at_nanos in 0u64..20_000_000_000,
        ) {
            let route = Timeouts { request: route_ms.map(ms), attempt: attempt_ms.map(ms) };
            let caller = Duration::from_nanos(caller_nanos);
            let d = Deadlines::new(T0, &route, Some(caller));
            let now = T0 + Duration::from_nanos(at_nanos);
            if let Ok(attempt) = d.attempt(now) {
                let sent = attempt.propagate.expect("announced");
                let elapsed = now.saturating_duration_since(T0);
                prop_assert!(sent + elapsed <= caller);
                let wire = parse_grpc_timeout(encode_grpc_timeout(sent).as_bytes()).unwrap();
                prop_assert!(wire <= sent);
            } else {
                prop_assert!(d.expiry(now).is_some());
            }
        }
    }
}
