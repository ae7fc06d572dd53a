//! Workload identity: the controller's certificate authority and the `Identity` gRPC service.
//!
//! A workload proves who it is with a bootstrap token and sends a PKCS#10 certificate signing
//! request; the controller answers with a short-lived leaf certificate for that identity,
//! signed by its issuer (an intermediate CA), and the issuer's certificate. Proxies trust the
//! leaf through the trust anchors, which they load from [`TRUST_ANCHORS_FILE`].
//!
//! - [`ca`]: the certificate authority: its directory (bootstrapped on first start, or an
//!   operator's anchors and issuer), signing leaves, and reloading the issuer when its files
//!   change.
//! - [`token`]: bootstrap tokens, `ct1:<identity>:<hex HMAC-SHA256>`, and [`issue_token`] for
//!   the `conduit identity token` command.
//! - [`serviceaccount`]: Kubernetes ServiceAccount tokens, reviewed by the API server, as
//!   the other proof a workload may give (in a cluster).
//! - [`service`]: the gRPC service, mapping each outcome to a status and a metric.
//!
//! # The identity directory
//!
//! | file | mode | contents |
//! |---|---|---|
//! | [`TRUST_ANCHORS_FILE`] | 0644 | PEM bundle of the trust anchors (old and new during a rotation) |
//! | [`ANCHOR_KEY_FILE`] | 0600 | the bootstrapped anchor's PKCS#8 key, only when the controller made the anchor |
//! | [`ANCHOR_KEY_PREVIOUS_FILE`] | 0600 | the anchor key before the last `conduit identity add-anchor` |
//! | [`ISSUER_CERT_FILE`] | 0644 | the issuer's certificate (PEM) |
//! | [`ISSUER_KEY_FILE`] | 0600 | the issuer's PKCS#8 key (PEM) |
//! | [`TOKEN_KEY_FILE`] | 0600 | 32 random bytes, hex, the bootstrap tokens' HMAC key |
//!
//! The directory itself is 0700. With no trust anchors there, the controller makes an ECDSA
//! P-256 anchor and an issuer signed by it (both valid for [`CA_VALIDITY`]) and reuses them on
//! every later start. An operator's own anchors, issuer certificate and issuer key (all three,
//! [`SuppliedCa`]) replace that bootstrap; the directory then holds only the token key.
//!
//! # Time
//!
//! Certificate validity is wall-clock time, which comes from an injected [`WallClock`] so the
//! simulation can control it; [`system_wall_clock`] is the production one and the only place
//! that reads the system's clock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use conduit_core::time::UnixTime;

pub mod ca;
mod der;
mod files;
pub mod secret;
pub mod service;
pub mod serviceaccount;
pub mod tls;
pub mod token;
pub mod webhook;

pub use ca::{
    AnchorsReload, CaError, CertificateAuthority, Certified, CertifyError, IssuerReload,
    add_anchor, retire_anchors, rotate_issuer,
};
pub use service::IdentityService;
pub use token::{TokenError, issue_token};

/// The trust-anchor bundle's file name inside the identity directory (PEM, one or more
/// certificates). Proxies load this file.
pub const TRUST_ANCHORS_FILE: &str = "trust-anchors.pem";

/// The bootstrapped anchor's private key (PKCS#8 PEM), kept to sign a new issuer on rotation.
pub const ANCHOR_KEY_FILE: &str = "anchor.key";

/// The anchor key that [`add_anchor`] replaced (kept until the rotation is over).
pub const ANCHOR_KEY_PREVIOUS_FILE: &str = "anchor.key.previous";

/// The issuer's certificate (PEM).
pub const ISSUER_CERT_FILE: &str = "issuer.crt";

/// The issuer's private key (PKCS#8 PEM).
pub const ISSUER_KEY_FILE: &str = "issuer.key";

/// The bootstrap tokens' HMAC key: 32 random bytes, written as 64 hex digits.
pub const TOKEN_KEY_FILE: &str = "token.key";

/// How long a leaf certificate lasts by default: a day, so a stolen key is useful for a day at
/// most, while a controller outage of hours does not take workloads' identities with it
/// (proxies renew well before the end).
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The shortest leaf lifetime accepted: shorter would have proxies renewing constantly.
pub const MIN_LEAF_LIFETIME: Duration = Duration::from_secs(60);

/// The longest leaf lifetime accepted (30 days): leaves are not revoked, so their lifetime is
/// the exposure of a leaked key.
pub const MAX_LEAF_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// How far before "now" a leaf's validity starts, so a peer whose clock is a little behind the
/// controller's accepts a leaf at once.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(20);

/// How long a bootstrapped trust anchor and issuer are valid: a year.
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// How often the issuer's files are checked for a new issuer by default: rotations are rare
/// and unhurried, and re-reading two small files costs nothing.
pub const DEFAULT_ISSUER_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// The common name of a bootstrapped trust anchor.
pub const ANCHOR_COMMON_NAME: &str = "root.identity.conduit.local";

/// The common name of a bootstrapped (or rotated) issuer.
pub const ISSUER_COMMON_NAME: &str = "issuer.identity.conduit.local";

/// The longest identity, as DNS limits names.
pub const MAX_IDENTITY_BYTES: usize = 253;

/// Wall-clock time for certificate validity. Injected so the simulation and tests control it.
pub type WallClock = Arc<dyn Fn() -> UnixTime + Send + Sync>;

/// The system's wall clock: the one place the controller reads it.
#[must_use]
pub fn system_wall_clock() -> WallClock {
    Arc::new(|| {
        #[expect(
            clippy::disallowed_methods,
            reason = "the production wall clock for certificate validity: the one injected \
                      source every other part of the controller receives"
        )]
        let now = std::time::SystemTime::now();
        let secs = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        UnixTime::from_secs(secs)
    })
}

/// A wall clock that always reads `time` (tests, and the simulation's starting point).
#[must_use]
pub fn fixed_wall_clock(time: UnixTime) -> WallClock {
    Arc::new(move || time)
}

/// An operator's own trust anchors and issuer, replacing the bootstrapped ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuppliedCa {
    /// PEM bundle of one or more trust-anchor certificates.
    pub trust_anchors: PathBuf,
    /// The issuer's certificate (PEM); it must chain to one of the anchors.
    pub issuer_cert: PathBuf,
    /// The issuer's PKCS#8 private key (PEM); it must match the certificate.
    pub issuer_key: PathBuf,
}

/// Where the certificate authority keeps its files, and how it signs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityConfig {
    /// The identity directory (see the [module docs](self)).
    pub dir: PathBuf,
    /// An operator's anchors and issuer; `None` to bootstrap them in [`Self::dir`].
    pub supplied: Option<SuppliedCa>,
    /// How long each leaf certificate is valid (from [`MIN_LEAF_LIFETIME`] to
    /// [`MAX_LEAF_LIFETIME`]).
    pub leaf_lifetime: Duration,
    /// How often the issuer's files are checked for a new issuer.
    pub issuer_poll_interval: Duration,
}

impl IdentityConfig {
    /// Bootstrapped in `dir`, with the default lifetimes and poll interval.
    #[must_use]
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            supplied: None,
            leaf_lifetime: DEFAULT_LEAF_LIFETIME,
            issuer_poll_interval: DEFAULT_ISSUER_POLL_INTERVAL,
        }
    }

    /// The default directory: `identity` beside the mesh file.
    #[must_use]
    pub fn default_dir(mesh_file: &Path) -> PathBuf {
        mesh_file
            .parent()
            .unwrap_or_else(|| Path::new(""))
            .join("identity")
    }

    /// The trust-anchor bundle proxies should load: the operator's, or the directory's.
    #[must_use]
    pub fn trust_anchors_path(&self) -> PathBuf {
        match &self.supplied {
            Some(supplied) => supplied.trust_anchors.clone(),
            None => self.dir.join(TRUST_ANCHORS_FILE),
        }
    }
}

/// Checks an identity name: a DNS-like name of 1 to 253 bytes of lower-case labels (the rule
/// the mesh file and the Destination API apply to identities, from `conduit-proto`).
pub use conduit_proto::convert::check_identity;

/// At most [`MAX_IDENTITY_BYTES`] of a string a client sent, for an error message.
fn truncated(text: &str) -> String {
    let mut end = text.len().min(MAX_IDENTITY_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests;
