//! Failure injection: a route's policy to fail or slow a share of its requests on purpose, so
//! a team can watch its callers' timeouts, retries, breakers and alerts handle the failure
//! before a real one does (the roadmap's "failure injection").
//!
//! The client's proxy applies it on the outbound side, before the request is sent: a delay
//! holds the request that long (within its deadline), an abort answers it with the policy's
//! status (or gRPC code) without reaching any endpoint. Both are drawn per request from the
//! service's seeded generator, so the simulation replays them exactly.
//!
//! ```yaml
//! fault:
//!   abort: { status: 503, percent: 10 }          # gRPC requests get grpc: 14 (UNAVAILABLE)
//!   delay: { duration: 200ms, percent: 50 }
//! ```
//!
//! A request can be both delayed and aborted (the delay comes first), as Envoy's fault filter
//! does.

use core::time::Duration;

use serde::Deserialize;

use crate::rand::Rng;
use crate::retry::Ratio;
use crate::time::parse_duration;

/// Shares are drawn in parts per million: `percent: 0.0001` is the finest share.
const PER_MILLION: u64 = 1_000_000;

/// The longest delay a route may inject.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// A route's fault policy as written (see the [module docs](self)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawFault {
    /// Answer a share of the requests with an error instead of sending them.
    pub abort: Option<RawAbort>,
    /// Hold a share of the requests before sending them.
    pub delay: Option<RawDelay>,
}

/// An abort as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawAbort {
    /// The HTTP status (400 to 599; default 503).
    pub status: Option<u16>,
    /// The gRPC status code gRPC requests get (1 to 16; default: the code gRPC maps `status`
    /// to, e.g. 14 UNAVAILABLE for 503).
    pub grpc: Option<u32>,
    /// The share of requests aborted, in percent (above 0, at most 100). Required.
    pub percent: Option<Ratio>,
}

/// A delay as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawDelay {
    /// How long (`200ms`; above zero, at most an hour). Required.
    pub duration: Option<String>,
    /// The share of requests delayed, in percent (above 0, at most 100). Required.
    pub percent: Option<Ratio>,
}

/// A validated fault policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPolicy {
    /// The abort, if any.
    pub abort: Option<Abort>,
    /// The delay, if any.
    pub delay: Option<Delay>,
}

/// A validated abort.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abort {
    /// The HTTP status plain HTTP requests get.
    pub status: u16,
    /// The gRPC status code gRPC requests get.
    pub grpc: u32,
    /// The share aborted, in parts per million (1 to 1,000,000).
    pub per_million: u32,
}

/// A validated delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delay {
    /// How long.
    pub duration: Duration,
    /// The share delayed, in parts per million (1 to 1,000,000).
    pub per_million: u32,
}

/// What one request drew.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    /// Hold the request this long first.
    pub delay: Option<Duration>,
    /// Then answer it with this instead of sending it.
    pub abort: Option<Abort>,
}

impl Injected {
    /// Whether the request is left alone.
    #[must_use]
    pub fn is_none(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }
}

impl FaultPolicy {
    /// Draws the faults of one request (two draws at most, one per kind configured).
    pub fn draw(&self, rng: &mut impl Rng) -> Injected {
        let mut hit = |per_million: u32| rng.below(PER_MILLION) < u64::from(per_million);
        Injected {
            delay: self
                .delay
                .filter(|d| hit(d.per_million))
                .map(|d| d.duration),
            abort: self.abort.filter(|a| hit(a.per_million)),
        }
    }
}

/// Why a fault policy was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidFault {
    /// The field at fault, below `fault` (`abort.percent`).
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl InvalidFault {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

impl TryFrom<RawFault> for FaultPolicy {
    type Error = InvalidFault;

    fn try_from(raw: RawFault) -> Result<Self, InvalidFault> {
        if raw.abort.is_none() && raw.delay.is_none() {
            return Err(InvalidFault::new(
                "abort",
                "a fault policy needs an `abort`, a `delay` or both",
            ));
        }
        let abort = raw.abort.map(abort).transpose()?;
        let delay = raw
            .delay
            .map(|raw| {
                let duration = raw
                    .duration
                    .as_deref()
                    .ok_or_else(|| InvalidFault::new("delay.duration", "required (e.g. `200ms`)"))
                    .and_then(|text| {
                        parse_duration(text)
                            .filter(|d| !d.is_zero() && *d <= MAX_DELAY)
                            .ok_or_else(|| {
                                InvalidFault::new(
                                    "delay.duration",
                                    format!(
                                        "`{text}` is not a duration above zero and at most 1h (e.g. `200ms`)"
                                    ),
                                )
                            })
                    })?;
                Ok(Delay {
                    duration,
                    per_million: per_million("delay.percent", raw.percent)?,
                })
            })
            .transpose()?;
        Ok(Self { abort, delay })
    }
}

fn abort(raw: RawAbort) -> Result<Abort, InvalidFault> {
    let status = raw.status.unwrap_or(503);
    if !(400..=599).contains(&status) {
        return Err(InvalidFault::new(
            "abort.status",
            format!("{status} is not an error status (400 to 599)"),
        ));
    }
    let grpc = raw.grpc.unwrap_or_else(|| grpc_code_for(status));
    if !(1..=16).contains(&grpc) {
        return Err(InvalidFault::new(
            "abort.grpc",
            format!("{grpc} is not a gRPC error code (1 to 16)"),
        ));
    }
    Ok(Abort {
        status,
        grpc,
        per_million: per_million("abort.percent", raw.percent)?,
    })
}

fn per_million(field: &'static str, percent: Option<Ratio>) -> Result<u32, InvalidFault> {
    let Some(Ratio(percent)) = percent else {
        return Err(InvalidFault::new(field, "required (e.g. `10` for 10 %)"));
    };
    if !(percent.is_finite() && percent > 0.0 && percent <= 100.0) {
        return Err(InvalidFault::new(
            field,
            format!("{percent} is not a share above 0 and at most 100"),
        ));
    }
    // Exact for shares written with up to four decimals; never rounds a positive share to 0.
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "the share is checked to lie in (0, 100] first"
    )]
    let ppm = (percent * 10_000.0).round() as u32;
    Ok(ppm.clamp(1, 1_000_000))
}

/// The gRPC code a gateway maps an HTTP status to (gRPC's "HTTP to gRPC status code mapping").
#[must_use]
pub fn grpc_code_for(status: u16) -> u32 {
    match status {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::rand::DetRng;

    fn parse(
        yaml_abort: Option<RawAbort>,
        yaml_delay: Option<RawDelay>,
    ) -> Result<FaultPolicy, InvalidFault> {
        FaultPolicy::try_from(RawFault {
            abort: yaml_abort,
            delay: yaml_delay,
        })
    }

    fn abort_of(status: Option<u16>, grpc: Option<u32>, percent: f64) -> Option<RawAbort> {
        Some(RawAbort {
            status,
            grpc,
            percent: Some(Ratio(percent)),
        })
    }

    #[test]
    fn defaults_and_the_grpc_mapping() {
        let policy = parse(abort_of(None, None, 10.0), None).unwrap();
        assert_eq!(
            policy.abort,
            Some(Abort {
                status: 503,
                grpc: 14,
                per_million: 100_000
            })
        );
        let policy = parse(abort_of(Some(403), None, 0.0001), None).unwrap();
        assert_eq!(policy.abort.unwrap().grpc, 7);
        assert_eq!(policy.abort.unwrap().per_million, 1);
        let policy = parse(abort_of(Some(500), Some(4), 100.0), None).unwrap();
        assert_eq!(
            (
                policy.abort.unwrap().grpc,
                policy.abort.unwrap().per_million
            ),
            (4, 1_000_000)
        );
    }

    #[test]
    fn bad_policies_name_the_field() {
        let field = |r: Result<FaultPolicy, InvalidFault>| r.unwrap_err().field;
        assert_eq!(field(parse(None, None)), "abort");
        assert_eq!(
            field(parse(abort_of(Some(200), None, 1.0), None)),
            "abort.status"
        );
        assert_eq!(
            field(parse(abort_of(None, Some(0), 1.0), None)),
            "abort.grpc"
        );
        assert_eq!(
            field(parse(abort_of(None, Some(17), 1.0), None)),
            "abort.grpc"
        );
        for bad in [0.0, -1.0, 100.5, f64::NAN, f64::INFINITY] {
            assert_eq!(
                field(parse(abort_of(None, None, bad), None)),
                "abort.percent",
                "{bad}"
            );
        }
        let delay = |duration: Option<&str>, percent: Option<f64>| {
            Some(RawDelay {
                duration: duration.map(str::to_owned),
                percent: percent.map(Ratio),
            })
        };
        assert_eq!(field(parse(None, delay(None, Some(1.0)))), "delay.duration");
        for bad in ["0s", "soon", "2h", "10"] {
            assert_eq!(
                field(parse(None, delay(Some(bad), Some(1.0)))),
                "delay.duration",
                "{bad}"
            );
        }
        assert_eq!(
            field(parse(None, delay(Some("10ms"), None))),
            "delay.percent"
        );
        let ok = parse(None, delay(Some("250ms"), Some(50.0))).unwrap();
        assert_eq!(
            ok.delay,
            Some(Delay {
                duration: Duration::from_millis(250),
                per_million: 500_000
            })
        );
    }

    /// The share drawn follows the policy's within sampling error, for both kinds at once.
    ///
    /// A statistical bound checked on arbitrary seeds fails now and then by chance (CI met a
    /// 5.3-sigma draw), so the seeds here are fixed: the check is exact and repeatable, and
    /// the properties that hold for every seed are the proptest below.
    #[test]
    fn draws_follow_the_shares() {
        let n = 20_000u32;
        for seed in 0..8u64 {
            for (abort_pct, delay_pct) in [(1, 17), (10, 20), (50, 50), (99, 3), (100, 1)] {
                let policy = FaultPolicy {
                    abort: Some(Abort {
                        status: 503,
                        grpc: 14,
                        per_million: abort_pct * 10_000,
                    }),
                    delay: Some(Delay {
                        duration: Duration::from_millis(5),
                        per_million: delay_pct * 10_000,
                    }),
                };
                let mut rng = DetRng::new(seed);
                let draws: Vec<Injected> = (0..n).map(|_| policy.draw(&mut rng)).collect();
                let aborts = draws.iter().filter(|d| d.abort.is_some()).count();
                let delays = draws.iter().filter(|d| d.delay.is_some()).count();
                let both = draws
                    .iter()
                    .filter(|d| d.abort.is_some() && d.delay.is_some())
                    .count();
                let expect = |share: f64| f64::from(n) * share;
                // Five standard deviations of a binomial, plus one.
                let slack = |p: f64| 5.0 * (f64::from(n) * p * (1.0 - p)).sqrt() + 1.0;
                let near = |got: usize, p: f64| (got as f64 - expect(p)).abs() <= slack(p);
                let (pa, pd) = (f64::from(abort_pct) / 100.0, f64::from(delay_pct) / 100.0);
                let case = format!("seed {seed}, abort {abort_pct} %, delay {delay_pct} %");
                assert!(near(aborts, pa), "{case}: {aborts} aborts");
                assert!(near(delays, pd), "{case}: {delays} delays");
                // Drawn independently: both land together at the product of the shares.
                assert!(near(both, pa * pd), "{case}: {both} with both");
            }
        }
    }

    proptest! {
        /// For every seed: 100 % always hits, 0 % (no such fault) never does, and the same
        /// seed draws the same faults.
        #[test]
        fn draws_are_exact_at_the_ends_and_repeatable(seed: u64, abort_pct in 1u32..=100, delay_pct in 0u32..=100) {
            let policy = FaultPolicy {
                abort: Some(Abort { status: 503, grpc: 14, per_million: abort_pct * 10_000 }),
                delay: (delay_pct > 0).then_some(Delay { duration: Duration::from_millis(5), per_million: delay_pct * 10_000 }),
            };
            let n = 2_000u32;
            let mut rng = DetRng::new(seed);
            let draws: Vec<Injected> = (0..n).map(|_| policy.draw(&mut rng)).collect();
            let aborts = draws.iter().filter(|d| d.abort.is_some()).count();
            if abort_pct == 100 { prop_assert_eq!(aborts, n as usize); }
            if delay_pct == 0 { prop_assert!(draws.iter().all(|d| d.delay.is_none())); }
            if delay_pct == 100 { prop_assert!(draws.iter().all(|d| d.delay.is_some())); }
            let mut again = DetRng::new(seed);
            let replay: Vec<Injected> = (0..n).map(|_| policy.draw(&mut again)).collect();
            prop_assert_eq!(replay, draws);
        }
    }
}
