//! Certificate lifecycle: when a workload asks the controller's CA for a certificate.
//!
//! A proxy holds one leaf certificate at a time. It asks for the first as soon as it starts
//! (it is not ready until one arrives), renews at 70 % of the remaining lifetime (Linkerd's
//! figure: with 24 h leaves a renewal comes every ~17 h, and a failed one has hours of margin),
//! clamped to `[min_refresh, max_refresh]`, and after a failure asks again after a capped,
//! jittered backoff while it keeps serving on the certificate it has until that expires.
//!
//! Two clocks: the schedule runs on the monotonic [`Instant`]; a certificate's validity is wall
//! time ([`UnixTime`]), read once when the certificate arrives to learn how long it has left.
//!
//! # Drive loop
//!
//! 1. `let mut refresh = Refresh::new(config, now);` A request is due at once.
//! 2. When `now >= refresh.poll_timeout()`, send a CSR to the CA.
//! 3. On success, `refresh.handle_certified(now, wall_now, valid_until)`; on failure,
//!    `refresh.handle_failed(now, &mut rng)`. Either schedules the next request.
//! 4. `refresh.is_valid(wall_now)` says whether the certificate held is still usable.
//!
//! ```
//! use conduit_core::identity::{Refresh, RefreshConfig};
//! use conduit_core::rand::DetRng;
//! use conduit_core::time::{Instant, UnixTime};
//! use core::time::Duration;
//!
//! let mut refresh = Refresh::new(RefreshConfig::default(), Instant::ZERO);
//! assert_eq!(refresh.poll_timeout(), Instant::ZERO, "the first request is due at once");
//! // A 24 h certificate arrives: the next request is due 70 % of the way through it.
//! let wall = UnixTime::from_secs(1_000_000);
//! let valid_until = UnixTime::from_secs(1_000_000 + 24 * 3600);
//! let next = refresh.handle_certified(Instant::ZERO, wall, valid_until);
//! assert_eq!(next, Instant::ZERO + Duration::from_secs(24 * 3600 * 7 / 10));
//! // The CA is down when the renewal is due: the proxy keeps its certificate and asks again
//! // soon.
//! let retry = refresh.handle_failed(next, &mut DetRng::new(7));
//! assert!(retry > next && retry <= next + Duration::from_secs(15));
//! assert!(refresh.is_valid(UnixTime::from_secs(1_000_000 + 23 * 3600)));
//! assert!(!refresh.is_valid(valid_until));
//! ```

use core::time::Duration;

use crate::backoff::{Backoff, BackoffConfig};
use crate::rand::Rng;
use crate::time::{Instant, UnixTime};

/// The identity of a Kubernetes ServiceAccount: `NAME.NAMESPACE.serviceaccount.identity.conduit.
/// CLUSTER_DOMAIN` (Linkerd's shape, with `conduit` for its control plane's namespace), lower
/// case. What the controller certifies for a proxy that proves the account with its token,
/// what discovery says a meshed pod of that account proves, and what authorization policies
/// name, so the three always agree.
///
/// ```
/// use conduit_core::identity::service_account_identity;
/// assert_eq!(
///     service_account_identity("shop", "web", "cluster.local"),
///     "web.shop.serviceaccount.identity.conduit.cluster.local"
/// );
/// ```
#[must_use]
pub fn service_account_identity(namespace: &str, name: &str, cluster_domain: &str) -> String {
    let mut identity = format!(
        "{name}.{namespace}.serviceaccount.identity.conduit.{}",
        cluster_domain.trim_end_matches('.')
    );
    identity.make_ascii_lowercase();
    identity
}

/// Renew after this many thousandths of the remaining lifetime.
pub const REFRESH_PER_MILLE: u64 = 700;

/// The soonest a renewal is scheduled after a certificate arrives, whatever its lifetime: a CA
/// handing out very short leaves must not make every proxy ask in a loop.
pub const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(10);

/// The latest a renewal is scheduled: a long-lived leaf is still renewed daily.
pub const DEFAULT_MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);

/// The first wait after a failed request.
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_millis(500);

/// The longest wait between failed requests: how late a recovered CA is noticed.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(10);

/// The schedule's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefreshConfig {
    /// The soonest renewal after a certificate arrives.
    pub min_refresh: Duration,
    /// The latest renewal after a certificate arrives.
    pub max_refresh: Duration,
    /// Waits between failed requests.
    pub retry: BackoffConfig,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self {
            min_refresh: DEFAULT_MIN_REFRESH,
            max_refresh: DEFAULT_MAX_REFRESH,
            retry: BackoffConfig::try_new(DEFAULT_RETRY_MIN, DEFAULT_RETRY_MAX, 500)
                .unwrap_or_else(|_| unreachable!("the default retry backoff is valid")),
        }
    }
}

/// What the schedule has seen, for metrics and `conduit identity`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefreshStats {
    /// Certificates received.
    pub certified: u64,
    /// Requests that failed.
    pub failures: u64,
    /// Requests that failed since the last success.
    pub consecutive_failures: u32,
    /// The end of the current certificate's validity, if one was received.
    pub valid_until: Option<UnixTime>,
}

/// When to ask for the next certificate.
#[derive(Clone, Debug)]
pub struct Refresh {
    config: RefreshConfig,
    retry: Backoff,
    next: Instant,
    stats: RefreshStats,
}

impl Refresh {
    /// A schedule with no certificate yet: the first request is due at `now`.
    #[must_use]
    pub fn new(config: RefreshConfig, now: Instant) -> Self {
        Self {
            retry: Backoff::new(config.retry),
            config,
            next: now,
            stats: RefreshStats::default(),
        }
    }

    /// When the next request is due.
    #[must_use]
    pub fn poll_timeout(&self) -> Instant {
        self.next
    }

    /// Whether a request is due at `now`.
    #[must_use]
    pub fn is_due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// A certificate valid until `valid_until` arrived at `now` (wall time `wall`). Returns when
    /// the next request is due: 70 % of the remaining lifetime later, clamped.
    pub fn handle_certified(
        &mut self,
        now: Instant,
        wall: UnixTime,
        valid_until: UnixTime,
    ) -> Instant {
        let remaining = Duration::from_secs(valid_until.as_secs().saturating_sub(wall.as_secs()));
        let refresh_in = Duration::from_millis(
            u64::try_from(remaining.as_millis())
                .unwrap_or(u64::MAX)
                .saturating_mul(REFRESH_PER_MILLE)
                / 1000,
        )
        .clamp(
            self.config.min_refresh,
            self.config.max_refresh.max(self.config.min_refresh),
        );
        self.retry.reset();
        self.stats.certified += 1;
        self.stats.consecutive_failures = 0;
        self.stats.valid_until = Some(valid_until);
        self.next = now + refresh_in;
        self.next
    }

    /// A request failed at `now`. Returns when the next one is due, after a jittered backoff.
    pub fn handle_failed(&mut self, now: Instant, rng: &mut impl Rng) -> Instant {
        self.stats.failures += 1;
        self.stats.consecutive_failures = self.stats.consecutive_failures.saturating_add(1);
        self.next = now + self.retry.next_delay(rng);
        self.next
    }

    /// Whether the certificate held is usable at wall time `wall` (one was received, and it
    /// has not expired).
    #[must_use]
    pub fn is_valid(&self, wall: UnixTime) -> bool {
        self.stats.valid_until.is_some_and(|until| wall < until)
    }

    /// What the schedule has seen.
    #[must_use]
    pub fn stats(&self) -> RefreshStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::rand::DetRng;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn short_and_long_lifetimes_are_clamped() {
        let mut refresh = Refresh::new(RefreshConfig::default(), Instant::ZERO);
        let wall = UnixTime::from_secs(100);
        // A 5 s certificate: renew no sooner than 10 s (the floor), not in a loop.
        let next = refresh.handle_certified(Instant::ZERO, wall, UnixTime::from_secs(105));
        assert_eq!(next, Instant::ZERO + DEFAULT_MIN_REFRESH);
        // A 30-day certificate: renewed daily.
        let next =
            refresh.handle_certified(Instant::ZERO, wall, UnixTime::from_secs(100 + 30 * 86_400));
        assert_eq!(next, Instant::ZERO + DEFAULT_MAX_REFRESH);
        // An already expired one (a CA with a wrong clock): asks again at the floor.
        let next = refresh.handle_certified(Instant::ZERO, wall, UnixTime::from_secs(50));
        assert_eq!(next, Instant::ZERO + DEFAULT_MIN_REFRESH);
        assert!(!refresh.is_valid(wall));
    }

    #[test]
    fn failures_back_off_and_a_success_resets_them() {
        let mut rng = DetRng::new(3);
        let mut refresh = Refresh::new(RefreshConfig::default(), Instant::ZERO);
        assert!(refresh.is_due(Instant::ZERO));
        assert!(
            !refresh.is_valid(UnixTime::from_secs(0)),
            "no certificate yet"
        );
        let mut now = Instant::ZERO;
        let mut delays = Vec::new();
        for _ in 0..8 {
            let next = refresh.handle_failed(now, &mut rng);
            delays.push(next - now);
            now = next;
        }
        assert!(delays.iter().all(|d| *d <= DEFAULT_RETRY_MAX));
        assert!(delays[7] > delays[0], "waits grow: {delays:?}");
        assert_eq!(refresh.stats().consecutive_failures, 8);
        refresh.handle_certified(now, UnixTime::from_secs(0), UnixTime::from_secs(3600));
        assert_eq!(refresh.stats().consecutive_failures, 0);
        assert_eq!(refresh.stats().failures, 8);
        let next = refresh.handle_failed(now, &mut rng);
        assert!(next - now <= secs(1), "backoff restarted after a success");
    }

    proptest! {
        /// A certificate that lives longer than the floor is renewed before it expires, and
        /// never later than the ceiling; a failed renewal is retried within the backoff's cap.
        #[test]
        fn renewal_comes_before_expiry(
            start in 0u64..1_000_000,
            wall in 0u64..2_000_000_000,
            lifetime in 15u64..(90 * 86_400),
            failures in 0usize..20,
            seed in any::<u64>(),
        ) {
            let now = Instant::ZERO + secs(start);
            let config = RefreshConfig::default();
            let mut refresh = Refresh::new(config, now);
            prop_assert!(refresh.is_due(now));
            let valid_until = UnixTime::from_secs(wall + lifetime);
            let next = refresh.handle_certified(now, UnixTime::from_secs(wall), valid_until);
            let after = next - now;
            prop_assert!(after >= config.min_refresh && after <= config.max_refresh);
            prop_assert!(after < secs(lifetime), "renewal at {after:?} of {lifetime}s");
            prop_assert!(refresh.is_valid(UnixTime::from_secs(wall + after.as_secs())));
            let mut rng = DetRng::new(seed);
            let mut at = next;
            for _ in 0..failures {
                let retry = refresh.handle_failed(at, &mut rng);
                prop_assert!(retry > at && retry - at <= config.retry.max());
                at = retry;
            }
            prop_assert_eq!(refresh.stats().valid_until, Some(valid_until));
        }
    }
}

/// The kind of private key a workload or CA makes for itself.
///
/// Production makes ECDSA P-256 keys (Linkerd's choice; every TLS stack speaks it). The
/// simulation makes Ed25519 keys from its seeded randomness ([`ed25519_pkcs8`]): Ed25519
/// signatures are deterministic, where ECDSA draws a fresh nonce for every signature inside the
/// crypto library, so only Ed25519 keeps the bytes on the wire a function of the seed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256 with SHA-256, from the operating system's randomness.
    #[default]
    EcdsaP256,
    /// Ed25519, from 32 bytes of the crypto provider's randomness.
    Ed25519,
}

/// The PKCS#8 (v1, RFC 8410) document of the Ed25519 private key with `seed`: a fixed
/// 16-byte prefix (the `PrivateKeyInfo` header, the Ed25519 algorithm identifier and the
/// `CurvePrivateKey` octet string's header) followed by the seed.
#[must_use]
pub fn ed25519_pkcs8(seed: &[u8; 32]) -> [u8; 48] {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, // SEQUENCE, 46 bytes
        0x02, 0x01, 0x00, // INTEGER 0 (v1)
        0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, // SEQUENCE { OID 1.3.101.112 (Ed25519) }
        0x04, 0x22, 0x04, 0x20, // OCTET STRING { OCTET STRING (32 bytes) }
    ];
    let mut der = [0u8; 48];
    der[..16].copy_from_slice(&PREFIX);
    der[16..].copy_from_slice(seed);
    der
}
