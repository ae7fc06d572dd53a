//! Authorization policy: which clients a service's inbound port admits.
//!
//! A service may carry a [`ServerPolicy`] (Linkerd's `Server` + `ServerAuthorization` model,
//! at the scale of one port): a list of [`Authorization`]s, each naming client identities
//! (exact names or `*.suffix` patterns, [`IdentityMatch`]) and client networks (CIDRs,
//! [`Network`]), and a [`DefaultPolicy`] for clients no authorization names. The policy applies
//! to the inbound listener of the proxy serving that service.
//!
//! [`authorize`] is the decision, a pure function of the policy and the facts about one client
//! ([`Client`]: the identity its mTLS certificate proved, if any, and its address):
//!
//! 1. The first authorization that matches allows the client ([`Rule::Authorization`]). An
//!    authorization with identities and networks needs both to match; with only one kind, that
//!    kind decides. An empty authorization is refused at validation.
//! 2. Otherwise the default decides ([`Rule::Default`]): `all-unauthenticated` allows everyone,
//!    `all-authenticated` allows any client that proved an identity, `deny` allows no one.
//! 3. In audit mode ([`ServerPolicy::audit`]) a deny becomes [`Verdict::AuditDeny`]: the caller
//!    lets the client through and counts what the policy would have refused, so a policy can be
//!    tried on live traffic before it is enforced.
//!
//! Probes: a policy may list the exact paths of its pod's HTTP probes ([`ProbePath`], from
//! the kubelet's `httpGet` liveness, readiness and startup probes, or written in the mesh file).
//! The kubelet sends them in plaintext from the node, so a port that denies unauthenticated
//! clients would fail its own pod's probes (Linkerd authorizes them by default for the same
//! reason). [`authorize_request`] admits, on an HTTP connection [`authorize`] denied (or
//! denied in audit), a `GET` or `HEAD` request whose path is byte for byte one of them
//! ([`Rule::Probe`]); any other request on that connection keeps the connection's decision.
//! The path is compared without its query, as route matching does: a probe written
//! `/healthz?verbose` admits `GET /healthz` with any query or none. Nothing is normalized:
//! a path that differs in percent-encoding (`/health%7A`), case, a trailing slash or a dot
//! segment is another path, and is not a probe.
//!
//! Identities are DNS-like names, compared without regard to ASCII case. Client addresses that
//! are IPv4-mapped IPv6 (`::ffff:10.0.0.1`, what a dual-stack listener reports) are compared
//! as the IPv4 address they carry.
//!
//! # Drive loop
//!
//! There is no state to drive: the caller holds the service's current policy (from the mesh
//! file or the Destination profile stream, carried in the route profile's `policy()`), calls
//! [`authorize`] once per inbound connection or request with what it knows of the client, and
//! acts on [`Decision::allowed`]. It counts [`Verdict::as_str`] (`allow`, `deny`,
//! `audit_deny`) and may log the [`Rule`] that decided. When the policy lists probe paths
//! ([`ServerPolicy::admits_probes`]) and the connection speaks HTTP, a connection it does not
//! allow is served all the same, and each of its requests is decided by [`authorize_request`]
//! with the connection's decision: the caller answers a denied request as it would have
//! refused the connection.
//!
//! ```
//! use core::net::IpAddr;
//! use conduit_core::policy::{
//!     authorize, authorize_request, Authorization, Client, DefaultPolicy, IdentityMatch,
//!     Network, ProbePath, Rule, ServerPolicy, Verdict,
//! };
//!
//! let ops = Authorization::try_new(
//!     vec![IdentityMatch::parse("*.ops.serviceaccount.identity.conduit.local").unwrap()],
//!     vec![],
//! )
//! .unwrap();
//! let local = Authorization::try_new(vec![], vec!["127.0.0.1/32".parse().unwrap()]).unwrap();
//! let policy = ServerPolicy::try_new(DefaultPolicy::Deny, vec![ops, local], false).unwrap();
//!
//! let addr: IpAddr = "10.1.2.3".parse().unwrap();
//! let admin = Client {
//!     identity: Some("alice.ops.serviceaccount.identity.conduit.local"),
//!     addr,
//! };
//! let decision = authorize(&policy, &admin);
//! assert!(decision.allowed());
//! assert_eq!(decision.rule, Rule::Authorization(0));
//!
//! let stranger = Client { identity: None, addr };
//! let decision = authorize(&policy, &stranger);
//! assert_eq!(decision.verdict, Verdict::Deny);
//! assert_eq!(decision.rule, Rule::Default(DefaultPolicy::Deny));
//!
//! // The same policy in audit mode lets the stranger through, but says so.
//! let audit = ServerPolicy::try_new(DefaultPolicy::Deny, policy.authorizations().to_vec(), true)
//!     .unwrap();
//! let decision = authorize(&audit, &stranger);
//! assert!(decision.allowed());
//! assert_eq!(decision.verdict.as_str(), "audit_deny");
//!
//! // With its probe paths, the enforcing policy admits the stranger's probes, and only them.
//! let probes = vec![ProbePath::parse("/healthz").unwrap()];
//! let policy = policy.with_probe_paths(probes).unwrap();
//! let connection = authorize(&policy, &stranger);
//! assert_eq!(connection.verdict, Verdict::Deny);
//! let probe = authorize_request(&policy, connection, b"GET", b"/healthz");
//! assert_eq!((probe.verdict, probe.rule), (Verdict::Allow, Rule::Probe));
//! assert_eq!(authorize_request(&policy, connection, b"POST", b"/healthz"), connection);
//! assert_eq!(authorize_request(&policy, connection, b"GET", b"/healthz/"), connection);
//! ```

use core::fmt;
use core::net::IpAddr;
use core::str::FromStr;

/// The most authorizations one policy may list. Linkerd policies rarely list more than a
/// handful; 64 is far beyond need and keeps a decision a short scan.
pub const MAX_AUTHORIZATIONS: usize = 64;

/// The most identities one authorization may list.
pub const MAX_IDENTITIES: usize = 256;

/// The most networks one authorization may list.
pub const MAX_NETWORKS: usize = 256;

/// The longest identity name, as for any DNS name.
pub const MAX_IDENTITY_BYTES: usize = 253;

/// The most probe paths one policy may list. A pod has at most three probes per container
/// (liveness, readiness, startup), usually sharing one or two paths; 16 covers pods of
/// several containers probing one port, and keeps the per-request check a short scan.
pub const MAX_PROBE_PATHS: usize = 16;

/// The longest probe path, query included, as written. Health check paths are short; the
/// bound keeps a policy's size (and its wire message) small whatever a pod spec says.
pub const MAX_PROBE_PATH_BYTES: usize = 512;

/// What a policy does with a client no authorization names.
///
/// Not `#[non_exhaustive]`, nor are [`Verdict`] and [`Rule`]: every carrier (the mesh file, the
/// wire conversion) matches on them exhaustively, so a new case fails to compile until each
/// carrier says what it means, rather than falling into a permissive catch-all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DefaultPolicy {
    /// Every client is allowed, with or without an identity (`all-unauthenticated`). The
    /// default, so that adding the mesh changes nothing until a policy says otherwise.
    #[default]
    AllUnauthenticated,
    /// Clients that proved an identity over mTLS are allowed; plaintext clients are not
    /// (`all-authenticated`).
    AllAuthenticated,
    /// No client is allowed (`deny`).
    Deny,
}

impl DefaultPolicy {
    /// Every default policy, in order.
    pub const ALL: [Self; 3] = [Self::AllUnauthenticated, Self::AllAuthenticated, Self::Deny];

    /// The name the mesh file uses: `all-unauthenticated`, `all-authenticated` or `deny`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AllUnauthenticated => "all-unauthenticated",
            Self::AllAuthenticated => "all-authenticated",
            Self::Deny => "deny",
        }
    }

    /// The default policy named `name` (as [`DefaultPolicy::as_str`] writes it, exactly).
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == name)
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === Identities ===

/// Which client identities an authorization names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityMatch {
    /// This identity, exactly (ASCII case aside). Held lower-case.
    Exact(String),
    /// Any identity ending in `.` and this suffix, with at least one label before it: written
    /// `*.ops.serviceaccount.identity.conduit.local`, held without the `*.`, lower-case. The
    /// empty suffix, written `*`, matches any identity at all (any authenticated client).
    Suffix(String),
}

impl IdentityMatch {
    /// Reads `*` (any identity), `*.suffix` or an exact name, lower-casing it. Names are
    /// DNS-like: 1 to [`MAX_IDENTITY_BYTES`] bytes of dot-separated labels of 1 to 63 bytes made
    /// of letters, digits and `-`, not starting or ending with `-`.
    ///
    /// # Errors
    ///
    /// A text saying what is wrong (without echoing the input, which may be large).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "*" {
            return Ok(Self::Suffix(String::new()));
        }
        if let Some(suffix) = text.strip_prefix("*.") {
            let suffix = suffix.to_ascii_lowercase();
            check_name(&suffix).map_err(|reason| format!("invalid suffix after `*.`: {reason}"))?;
            return Ok(Self::Suffix(suffix));
        }
        if text.contains('*') {
            return Err("`*` may only stand alone or begin the name as `*.`".into());
        }
        let name = text.to_ascii_lowercase();
        check_name(&name)?;
        Ok(Self::Exact(name))
    }

    /// Whether a client that proved `identity` is named by this match (ASCII case aside).
    #[must_use]
    pub fn matches(&self, identity: &str) -> bool {
        match self {
            Self::Exact(name) => identity.eq_ignore_ascii_case(name),
            Self::Suffix(suffix) if suffix.is_empty() => !identity.is_empty(),
            Self::Suffix(suffix) => {
                let (id, suffix) = (identity.as_bytes(), suffix.as_bytes());
                // At least one byte of label, then the dot, then the suffix.
                id.len() >= suffix.len() + 2
                    && id[id.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                    && id[id.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for IdentityMatch {
    /// As [`IdentityMatch::parse`] reads it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Suffix(suffix) if suffix.is_empty() => f.write_str("*"),
            Self::Suffix(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// Checks a lower-case DNS-like name (the rule the mesh file applies to identities).
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > MAX_IDENTITY_BYTES {
        return Err(format!("longer than {MAX_IDENTITY_BYTES} bytes"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated label must be 1 to 63 bytes".into());
        }
        let valid = label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid || label.starts_with('-') || label.ends_with('-') {
            return Err(
                "labels may hold only letters, digits and `-`, and not start or end with `-`"
                    .into(),
            );
        }
    }
    Ok(())
}

// === Networks ===

/// An IPv4 or IPv6 network in CIDR notation: an address whose bits past the prefix are zero,
/// and the prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Network {
    addr: IpAddr,
    prefix_len: u8,
}

impl Network {
    /// The network of `addr` with a prefix of `prefix_len` bits.
    ///
    /// # Errors
    ///
    /// A prefix longer than the address (32 bits for IPv4, 128 for IPv6), or an address with
    /// bits set past the prefix (`10.1.0.0/8` is refused: it says `10.0.0.0/8` ambiguously).
    pub fn try_new(addr: IpAddr, prefix_len: u8) -> Result<Self, String> {
        let max = max_prefix(addr);
        if prefix_len > max {
            return Err(format!("prefix length {prefix_len} is above {max}"));
        }
        let network = Self { addr, prefix_len };
        let masked = network.masked(addr);
        if masked != addr {
            return Err(format!(
                "bits are set past the /{prefix_len} prefix (the network is {masked}/{prefix_len})"
            ));
        }
        Ok(network)
    }

    /// The network's first address.
    #[must_use]
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    #[must_use]
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is in the network. An IPv4-mapped IPv6 address is compared as its IPv4
    /// address; otherwise an address of the other family is never in it.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == self.addr
    }

    /// `ip` (of the network's family) with the bits past the prefix cleared.
    fn masked(&self, ip: IpAddr) -> IpAddr {
        let len = u32::from(self.prefix_len);
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX.checked_shl(32 - len.min(32)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX.checked_shl(128 - len.min(128)).unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl FromStr for Network {
    type Err = String;

    /// Reads `ADDR/LEN` (`10.0.0.0/8`, `fd00::/8`), or a bare address as a network of one
    /// (`127.0.0.1` is `127.0.0.1/32`).
    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| "not an IP address or ADDR/LEN network".to_owned())?;
        let prefix_len = match len {
            None => max_prefix(addr),
            Some(len)
                if !len.is_empty() && len.len() <= 3 && len.bytes().all(|b| b.is_ascii_digit()) =>
            {
                len.parse::<u8>()
                    .map_err(|_| "the prefix length is above 255".to_owned())?
            }
            Some(_) => return Err("the prefix length after `/` must be a number".into()),
        };
        Self::try_new(addr, prefix_len)
    }
}

impl fmt::Display for Network {
    /// `ADDR/LEN`, always with the length.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

// === Probe paths ===

/// The path of one HTTP probe the port admits: a `GET` or `HEAD` request for exactly this
/// path (its query aside) is a probe. Held without its query.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProbePath(String);

impl ProbePath {
    /// Reads a probe's path as the kubelet requests it: `/` then visible ASCII (percent-encode
    /// anything else, as the kubelet does on the wire), at most [`MAX_PROBE_PATH_BYTES`]. A
    /// query (`?` and what follows) may be written and is dropped: requests are matched on
    /// their path alone, so `/healthz?verbose` is the probe path `/healthz`.
    ///
    /// # Errors
    ///
    /// A text saying what is wrong (without echoing the input, which may be large): empty,
    /// too long, not starting with `/`, or holding a byte outside visible ASCII or a `#`
    /// (a fragment is never sent).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_PROBE_PATH_BYTES {
            return Err(format!("longer than {MAX_PROBE_PATH_BYTES} bytes"));
        }
        if !text.starts_with('/') {
            return Err("a probe path starts with `/`".into());
        }
        if let Some(bad) = text.bytes().find(|b| !b.is_ascii_graphic() || *b == b'#') {
            return Err(if bad == b'#' {
                "a probe path has no fragment (`#`)".into()
            } else {
                "a probe path holds only visible ASCII (percent-encode anything else, as \
                 the request carries it)"
                    .into()
            });
        }
        let path = text.split_once('?').map_or(text, |(path, _)| path);
        Ok(Self(path.to_owned()))
    }

    /// The path, without a query, as requests are compared with it.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProbePath {
    /// The path, as [`ProbePath::parse`] reads it back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// === Policies ===

/// One rule that allows clients: those with a listed identity, from a listed network, or both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    identities: Vec<IdentityMatch>,
    networks: Vec<Network>,
}

impl Authorization {
    /// An authorization of clients proving one of `identities` (any client, when empty) and
    /// connecting from one of `networks` (anywhere, when empty).
    ///
    /// # Errors
    ///
    /// [`InvalidPolicy`] naming `identities` or `networks` when a list is longer than
    /// [`MAX_IDENTITIES`] or [`MAX_NETWORKS`], or naming the authorization itself (an empty
    /// field) when both lists are empty: such a rule would match nothing, which is never what
    /// was meant.
    pub fn try_new(
        identities: Vec<IdentityMatch>,
        networks: Vec<Network>,
    ) -> Result<Self, InvalidPolicy> {
        check_count("identities", identities.len(), MAX_IDENTITIES)?;
        check_count("networks", networks.len(), MAX_NETWORKS)?;
        if identities.is_empty() && networks.is_empty() {
            return Err(InvalidPolicy::new(
                "",
                "names neither identities nor networks (it would match no client)",
            ));
        }
        Ok(Self {
            identities,
            networks,
        })
    }

    /// The identities it names (empty: any client, authenticated or not).
    #[must_use]
    pub fn identities(&self) -> &[IdentityMatch] {
        &self.identities
    }

    /// The networks it names (empty: any address).
    #[must_use]
    pub fn networks(&self) -> &[Network] {
        &self.networks
    }

    /// Whether it allows `client`: every kind it lists matches.
    #[must_use]
    pub fn matches(&self, client: &Client<'_>) -> bool {
        let identity_ok = self.identities.is_empty()
            || client
                .proved_identity()
                .is_some_and(|id| self.identities.iter().any(|m| m.matches(id)));
        let network_ok =
            self.networks.is_empty() || self.networks.iter().any(|n| n.contains(client.addr));
        identity_ok && network_ok
    }
}

fn check_count(field: &'static str, len: usize, max: usize) -> Result<(), InvalidPolicy> {
    if len > max {
        return Err(InvalidPolicy::new(
            field,
            format!("{len} entries, above the limit of {max}"),
        ));
    }
    Ok(())
}

/// The authorization policy of a service's inbound port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerPolicy {
    default: DefaultPolicy,
    authorizations: Vec<Authorization>,
    audit: bool,
    /// Sorted, without duplicates.
    probe_paths: Vec<ProbePath>,
}

impl ServerPolicy {
    /// A policy that allows clients any of `authorizations` matches and decides the others by
    /// `default`; in `audit` mode it denies no one but reports who it would have denied.
    ///
    /// # Errors
    ///
    /// [`InvalidPolicy`] naming `authorizations` when there are more than
    /// [`MAX_AUTHORIZATIONS`].
    pub fn try_new(
        default: DefaultPolicy,
        authorizations: Vec<Authorization>,
        audit: bool,
    ) -> Result<Self, InvalidPolicy> {
        check_count("authorizations", authorizations.len(), MAX_AUTHORIZATIONS)?;
        Ok(Self {
            default,
            authorizations,
            audit,
            probe_paths: Vec::new(),
        })
    }

    /// The same policy, admitting the probes `paths` on connections it does not allow
    /// ([`authorize_request`]); duplicates count once, and no paths admit no probes.
    ///
    /// # Errors
    ///
    /// [`InvalidPolicy`] naming `probe_paths` when there are more than [`MAX_PROBE_PATHS`]
    /// distinct paths.
    pub fn with_probe_paths(self, paths: Vec<ProbePath>) -> Result<Self, InvalidPolicy> {
        let mut paths = paths;
        paths.sort_unstable();
        paths.dedup();
        check_count("probe_paths", paths.len(), MAX_PROBE_PATHS)?;
        Ok(Self {
            probe_paths: paths,
            ..self
        })
    }

    /// What happens to clients no authorization names.
    #[must_use]
    pub fn default_policy(&self) -> DefaultPolicy {
        self.default
    }

    /// The authorizations, in the order they are tried.
    #[must_use]
    pub fn authorizations(&self) -> &[Authorization] {
        &self.authorizations
    }

    /// Whether the policy only reports the clients it would deny ([`Verdict::AuditDeny`]).
    #[must_use]
    pub fn audit(&self) -> bool {
        self.audit
    }

    /// The probe paths it admits, sorted.
    #[must_use]
    pub fn probe_paths(&self) -> &[ProbePath] {
        &self.probe_paths
    }

    /// Whether it lists probe paths: an HTTP connection it does not allow is then decided
    /// request by request ([`authorize_request`]) rather than refused whole.
    #[must_use]
    pub fn admits_probes(&self) -> bool {
        !self.probe_paths.is_empty()
    }

    /// Whether a request with `method` and `path` (without its query, as
    /// the route module's `RequestView::path` gives it) is one of the
    /// policy's probes: `GET` or `HEAD` (methods are case-sensitive), and the path byte for
    /// byte one of [`probe_paths`](Self::probe_paths).
    #[must_use]
    pub fn is_probe(&self, method: &[u8], path: &[u8]) -> bool {
        matches!(method, b"GET" | b"HEAD")
            && self.probe_paths.iter().any(|p| p.0.as_bytes() == path)
    }
}

/// Why a policy was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{problem}", .field, if .field.is_empty() { "" } else { ": " })]
pub struct InvalidPolicy {
    /// The field at fault, relative to the part being built: `authorizations`, `identities`,
    /// `networks`, `probe_paths`, or empty for the authorization as a whole.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

impl InvalidPolicy {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self {
            field,
            problem: problem.into(),
        }
    }
}

// === The decision ===

/// What is known of a client when it is authorized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client<'a> {
    /// The identity the client proved with its mTLS certificate; `None` for a plaintext client
    /// (an empty name counts as none).
    pub identity: Option<&'a str>,
    /// The client's address (the connection's peer).
    pub addr: IpAddr,
}

impl<'a> Client<'a> {
    fn proved_identity(&self) -> Option<&'a str> {
        self.identity.filter(|id| !id.is_empty())
    }
}

/// The outcome of [`authorize`], one of three, each counted apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The policy allows the client.
    Allow,
    /// The policy refuses the client; the caller refuses it.
    Deny,
    /// The policy would refuse the client, but audits only: the caller lets it through and
    /// counts it.
    AuditDeny,
}

impl Verdict {
    /// The metrics label: `allow`, `deny` or `audit_deny`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::AuditDeny => "audit_deny",
        }
    }
}

/// Which part of the policy decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// The authorization at this index (the first that matched) allowed the client.
    Authorization(usize),
    /// No authorization matched; the default policy decided.
    Default(DefaultPolicy),
    /// The request is one of the policy's probes ([`authorize_request`]), admitted on a
    /// connection the policy does not allow.
    Probe,
}

impl fmt::Display for Rule {
    /// `authorizations[2]`, `default(deny)` or `probe`, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Authorization(i) => write!(f, "authorizations[{i}]"),
            Self::Default(default) => write!(f, "default({default})"),
            Self::Probe => f.write_str("probe"),
        }
    }
}

/// A policy's decision about one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Decision {
    /// Allowed, denied, or denied in audit only.
    pub verdict: Verdict,
    /// The rule that decided.
    pub rule: Rule,
}

impl Decision {
    /// Whether the caller lets the client through: everything but [`Verdict::Deny`].
    #[must_use]
    pub fn allowed(&self) -> bool {
        self.verdict != Verdict::Deny
    }
}

/// Decides whether `policy` admits `client`: the first matching authorization allows it,
/// else the default decides; in audit mode a deny is [`Verdict::AuditDeny`].
#[must_use]
pub fn authorize(policy: &ServerPolicy, client: &Client<'_>) -> Decision {
    if let Some(index) = policy
        .authorizations
        .iter()
        .position(|authorization| authorization.matches(client))
    {
        return Decision {
            verdict: Verdict::Allow,
            rule: Rule::Authorization(index),
        };
    }
    let allowed = match policy.default {
        DefaultPolicy::AllUnauthenticated => true,
        DefaultPolicy::AllAuthenticated => client.proved_identity().is_some(),
        DefaultPolicy::Deny => false,
    };
    let verdict = match (allowed, policy.audit) {
        (true, _) => Verdict::Allow,
        (false, false) => Verdict::Deny,
        (false, true) => Verdict::AuditDeny,
    };
    Decision {
        verdict,
        rule: Rule::Default(policy.default),
    }
}

/// Decides one request with `method` and `path` (without its query) on a connection
/// [`authorize`] decided `connection`: a connection the policy allows keeps its decision for
/// every request; on one it denies, or denies in audit, a probe of the policy
/// ([`ServerPolicy::is_probe`]) is allowed by [`Rule::Probe`], and any other request keeps the
/// connection's decision (the caller answers it as it would have refused the connection, or,
/// in audit, lets it through and counts it). A policy without probe paths never changes a
/// decision, so callers only need this where [`ServerPolicy::admits_probes`].
#[must_use]
pub fn authorize_request(
    policy: &ServerPolicy,
    connection: Decision,
    method: &[u8],
    path: &[u8],
) -> Decision {
    if connection.verdict == Verdict::Allow || !policy.is_probe(method, path) {
        return connection;
    }
    Decision {
        verdict: Verdict::Allow,
        rule: Rule::Probe,
    }
}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn net(text: &str) -> Network {
        text.parse().unwrap()
    }

    fn ids(texts: &[&str]) -> Vec<IdentityMatch> {
        texts
            .iter()
            .map(|t| IdentityMatch::parse(t).unwrap())
            .collect()
    }

    fn client<'a>(identity: Option<&'a str>, addr: &str) -> Client<'a> {
        Client {
            identity,
            addr: ip(addr),
        }
    }

    #[test]
    fn exact_and_suffix_identities() {
        let exact = IdentityMatch::parse("web.demo.serviceaccount.identity.conduit.local").unwrap();
        assert!(exact.matches("web.demo.serviceaccount.identity.conduit.local"));
        assert!(exact.matches("WEB.Demo.serviceaccount.identity.conduit.local"));
        assert!(!exact.matches("api.demo.serviceaccount.identity.conduit.local"));
        assert!(!exact.matches("x.web.demo.serviceaccount.identity.conduit.local"));

        let suffix = IdentityMatch::parse("*.b.c").unwrap();
        assert_eq!(suffix, IdentityMatch::Suffix("b.c".into()));
        assert!(suffix.matches("a.b.c"));
        assert!(
            suffix.matches("x.y.b.c"),
            "more than one label before the suffix"
        );
        assert!(suffix.matches("A.B.C"));
        assert!(!suffix.matches("b.c"), "the suffix itself is not under it");
        assert!(
            !suffix.matches("xb.c"),
            "a suffix matches at a label boundary"
        );
        assert!(!suffix.matches(".b.c"), "an empty label is not a name");
        assert!(!suffix.matches("a.b.c.d"));
        assert!(!suffix.matches(""));

        let any = IdentityMatch::parse("*").unwrap();
        assert!(any.matches("a"));
        assert!(any.matches("web.demo.serviceaccount.identity.conduit.local"));
        assert!(!any.matches(""));
    }

    #[test]
    fn identities_are_lower_cased_and_checked() {
        assert_eq!(
            IdentityMatch::parse("Web.Demo").unwrap(),
            IdentityMatch::Exact("web.demo".into())
        );
        assert_eq!(
            IdentityMatch::parse("*.OPS.demo").unwrap(),
            IdentityMatch::Suffix("ops.demo".into())
        );
        for bad in [
            "", "*.", "a.*.c", "*a.b", "**", "a..b", "-a.b", "a_b", "a.b.", "*.*.b",
        ] {
            assert!(IdentityMatch::parse(bad).is_err(), "{bad:?}");
        }
        assert!(IdentityMatch::parse(&"a.".repeat(127)).is_err(), "too long");
        for text in ["*", "*.b.c", "web.demo"] {
            assert_eq!(IdentityMatch::parse(text).unwrap().to_string(), text);
        }
    }

    #[test]
    fn networks_parse_and_contain() {
        let ten = net("10.0.0.0/8");
        assert!(ten.contains(ip("10.0.0.0")));
        assert!(ten.contains(ip("10.255.255.255")));
        assert!(!ten.contains(ip("11.0.0.0")));
        assert!(!ten.contains(ip("9.255.255.255")));
        assert!(ten.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(!ten.contains(ip("::a00:1")), "IPv4-compatible is IPv6");

        let all = net("0.0.0.0/0");
        assert!(all.contains(ip("0.0.0.0")));
        assert!(all.contains(ip("255.255.255.255")));
        assert!(!all.contains(ip("::1")), "families do not mix");

        let host = net("127.0.0.1/32");
        assert_eq!(net("127.0.0.1"), host);
        assert!(host.contains(ip("127.0.0.1")));
        assert!(!host.contains(ip("127.0.0.2")));

        let v6 = net("fd00::/8");
        assert!(v6.contains(ip("fd12:3456::1")));
        assert!(!v6.contains(ip("fe80::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let v6_all = net("::/0");
        assert!(v6_all.contains(ip("2001:db8::1")));
        assert!(!v6_all.contains(ip("10.0.0.1")));
        let v6_host = net("::1/128");
        assert_eq!(net("::1"), v6_host);
        assert!(v6_host.contains(ip("::1")));
        assert!(!v6_host.contains(ip("::2")));

        for (text, want) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.0.0.0/08", "10.0.0.0/8"),
            ("127.0.0.1", "127.0.0.1/32"),
            ("FD00::/8", "fd00::/8"),
        ] {
            assert_eq!(net(text).to_string(), want);
        }
        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/1000",
            "10.1.0.0/8",
            "10.0.0.0/8/8",
            "ten/8",
            "10.0.0.0 /8",
            "[::1]/128",
        ] {
            assert!(bad.parse::<Network>().is_err(), "{bad:?}");
        }
        assert!(
            "10.1.0.0/8"
                .parse::<Network>()
                .unwrap_err()
                .contains("10.0.0.0/8")
        );
    }

    #[test]
    fn authorizations_need_every_kind_they_list() {
        let both = Authorization::try_new(ids(&["*.ops.demo"]), vec![net("10.0.0.0/8")]).unwrap();
        assert!(both.matches(&client(Some("a.ops.demo"), "10.1.1.1")));
        assert!(!both.matches(&client(Some("a.ops.demo"), "192.168.1.1")));
        assert!(!both.matches(&client(Some("a.web.demo"), "10.1.1.1")));
        assert!(!both.matches(&client(None, "10.1.1.1")));

        let only_ids = Authorization::try_new(ids(&["a.ops.demo"]), vec![]).unwrap();
        assert!(only_ids.matches(&client(Some("a.ops.demo"), "192.168.1.1")));
        assert!(!only_ids.matches(&client(None, "192.168.1.1")));
        assert!(!only_ids.matches(&client(Some(""), "192.168.1.1")));

        let only_nets = Authorization::try_new(vec![], vec![net("127.0.0.1/32")]).unwrap();
        assert!(only_nets.matches(&client(None, "127.0.0.1")));
        assert!(only_nets.matches(&client(Some("x.demo"), "127.0.0.1")));
        assert!(!only_nets.matches(&client(None, "127.0.0.2")));
    }

    #[test]
    fn bounds_and_empty_authorizations_are_refused() {
        let err = Authorization::try_new(vec![], vec![]).unwrap_err();
        assert_eq!(err.field, "");
        let many_ids = vec![IdentityMatch::Suffix(String::new()); MAX_IDENTITIES + 1];
        assert_eq!(
            Authorization::try_new(many_ids, vec![]).unwrap_err().field,
            "identities"
        );
        let many_nets = vec![net("10.0.0.0/8"); MAX_NETWORKS + 1];
        assert_eq!(
            Authorization::try_new(vec![], many_nets).unwrap_err().field,
            "networks"
        );
        let one = Authorization::try_new(vec![], vec![net("10.0.0.0/8")]).unwrap();
        assert!(
            ServerPolicy::try_new(
                DefaultPolicy::Deny,
                vec![one.clone(); MAX_AUTHORIZATIONS],
                false
            )
            .is_ok()
        );
        let err = ServerPolicy::try_new(
            DefaultPolicy::Deny,
            vec![one; MAX_AUTHORIZATIONS + 1],
            false,
        )
        .unwrap_err();
        assert_eq!(err.field, "authorizations");
        assert_eq!(
            err.to_string(),
            format!(
                "authorizations: {} entries, above the limit of {MAX_AUTHORIZATIONS}",
                MAX_AUTHORIZATIONS + 1
            )
        );
    }

    #[test]
    fn defaults_decide_when_no_authorization_matches() {
        let anon = client(None, "10.0.0.1");
        let authn = client(Some("web.demo"), "10.0.0.1");
        let cases = [
            (DefaultPolicy::AllUnauthenticated, true, true),
            (DefaultPolicy::AllAuthenticated, false, true),
            (DefaultPolicy::Deny, false, false),
        ];
        for (default, anon_ok, authn_ok) in cases {
            let policy = ServerPolicy::try_new(default, vec![], false).unwrap();
            for (c, ok) in [(&anon, anon_ok), (&authn, authn_ok)] {
                let decision = authorize(&policy, c);
                assert_eq!(decision.allowed(), ok, "{default} {c:?}");
                assert_eq!(decision.rule, Rule::Default(default));
                let want = if ok { Verdict::Allow } else { Verdict::Deny };
                assert_eq!(decision.verdict, want);
            }
        }
        assert_eq!(
            authorize(&ServerPolicy::default(), &anon).verdict,
            Verdict::Allow,
            "the default policy is all-unauthenticated"
        );
    }

    #[test]
    fn the_first_matching_authorization_decides() {
        let policy = ServerPolicy::try_new(
            DefaultPolicy::Deny,
            vec![
                Authorization::try_new(ids(&["web.demo"]), vec![]).unwrap(),
                Authorization::try_new(vec![], vec![net("10.0.0.0/8")]).unwrap(),
                Authorization::try_new(ids(&["*"]), vec![]).unwrap(),
            ],
            false,
        )
        .unwrap();
        let rule = |identity, addr| authorize(&policy, &client(identity, addr)).rule;
        assert_eq!(rule(Some("web.demo"), "10.0.0.1"), Rule::Authorization(0));
        assert_eq!(rule(None, "10.0.0.1"), Rule::Authorization(1));
        assert_eq!(rule(Some("api.demo"), "192.0.2.1"), Rule::Authorization(2));
        assert_eq!(rule(None, "192.0.2.1"), Rule::Default(DefaultPolicy::Deny));
        assert_eq!(Rule::Authorization(2).to_string(), "authorizations[2]");
        assert_eq!(
            Rule::Default(DefaultPolicy::AllAuthenticated).to_string(),
            "default(all-authenticated)"
        );
    }

    #[test]
    fn audit_mode_lets_would_be_denials_through_and_says_so() {
        let policy = ServerPolicy::try_new(DefaultPolicy::AllAuthenticated, vec![], true).unwrap();
        let plaintext = authorize(&policy, &client(None, "10.0.0.1"));
        assert_eq!(plaintext.verdict, Verdict::AuditDeny);
        assert!(plaintext.allowed());
        assert_eq!(plaintext.verdict.as_str(), "audit_deny");
        let authn = authorize(&policy, &client(Some("a.b"), "10.0.0.1"));
        assert_eq!(authn.verdict, Verdict::Allow);
    }

    #[test]
    fn default_policy_names() {
        for default in DefaultPolicy::ALL {
            assert_eq!(DefaultPolicy::from_name(default.as_str()), Some(default));
        }
        assert_eq!(DefaultPolicy::from_name("Deny"), None);
        assert_eq!(DefaultPolicy::from_name("allow"), None);
    }

    fn probes(paths: &[&str]) -> Vec<ProbePath> {
        paths.iter().map(|p| ProbePath::parse(p).unwrap()).collect()
    }

    fn deny_with_probes(paths: &[&str], audit: bool) -> ServerPolicy {
        ServerPolicy::try_new(DefaultPolicy::Deny, vec![], audit)
            .unwrap()
            .with_probe_paths(probes(paths))
            .unwrap()
    }

    #[test]
    fn probe_paths_parse_without_their_query() {
        for (text, want) in [
            ("/healthz", "/healthz"),
            ("/", "/"),
            ("/healthz?verbose", "/healthz"),
            ("/ready?a=1&b=%20", "/ready"),
            ("/?", "/"),
            ("/health%7Az", "/health%7Az"),
            ("/a/b/", "/a/b/"),
        ] {
            let path = ProbePath::parse(text).unwrap();
            assert_eq!(path.as_str(), want, "{text:?}");
            assert_eq!(ProbePath::parse(&path.to_string()), Ok(path));
        }
        for bad in [
            "",
            "healthz",
            "?x",
            "/health z",
            "/health\tz",
            "/h\u{e9}alth",
            "/healthz#top",
            "http://example.com/healthz",
        ] {
            assert!(ProbePath::parse(bad).is_err(), "{bad:?}");
        }
        let longest = format!("/{}", "a".repeat(MAX_PROBE_PATH_BYTES - 1));
        assert!(ProbePath::parse(&longest).is_ok());
        let err = ProbePath::parse(&format!("{longest}a")).unwrap_err();
        assert!(err.len() < 100, "not echoed: {err}");
    }

    #[test]
    fn probe_paths_are_bounded_sorted_and_deduplicated() {
        let policy = deny_with_probes(&["/ready", "/live", "/ready?x=1"], false);
        let held: Vec<&str> = policy.probe_paths().iter().map(ProbePath::as_str).collect();
        assert_eq!(held, ["/live", "/ready"]);
        assert!(policy.admits_probes());
        assert!(!ServerPolicy::default().admits_probes());

        let many: Vec<ProbePath> = (0..=MAX_PROBE_PATHS)
            .map(|i| ProbePath::parse(&format!("/p{i}")).unwrap())
            .collect();
        let base = ServerPolicy::try_new(DefaultPolicy::Deny, vec![], false).unwrap();
        assert!(
            base.clone()
                .with_probe_paths(many[..MAX_PROBE_PATHS].to_vec())
                .is_ok()
        );
        let err = base.with_probe_paths(many).unwrap_err();
        assert_eq!(err.field, "probe_paths");
    }

    #[test]
    fn probes_are_admitted_on_denied_connections_and_nothing_else() {
        let policy = deny_with_probes(&["/healthz", "/ready?full=1"], false);
        let connection = authorize(&policy, &client(None, "10.0.0.1"));
        assert_eq!(connection.verdict, Verdict::Deny);
        let probe = Decision {
            verdict: Verdict::Allow,
            rule: Rule::Probe,
        };
        assert_eq!(Rule::Probe.to_string(), "probe");
        for (method, path) in [("GET", "/healthz"), ("HEAD", "/healthz"), ("GET", "/ready")] {
            let decision =
                authorize_request(&policy, connection, method.as_bytes(), path.as_bytes());
            assert_eq!(decision, probe, "{method} {path}");
        }
        for (method, path) in [
            ("POST", "/healthz"),
            ("PUT", "/healthz"),
            ("OPTIONS", "/healthz"),
            ("get", "/healthz"),
            ("GET ", "/healthz"),
            ("GET", "/healthz/"),
            ("GET", "/Healthz"),
            ("GET", "/health%7Az"),
            ("GET", "/%68ealthz"),
            ("GET", "//healthz"),
            ("GET", "/healthz/../admin"),
            ("GET", "/healthz?x"),
            ("GET", "/healthzz"),
            ("GET", "/health"),
            ("GET", "/"),
            ("GET", ""),
            ("GET", "/admin"),
        ] {
            let decision =
                authorize_request(&policy, connection, method.as_bytes(), path.as_bytes());
            assert_eq!(decision, connection, "{method} {path:?}");
        }

        // An allowed connection keeps its decision (and its rule) for every request.
        let open = ServerPolicy::try_new(DefaultPolicy::AllUnauthenticated, vec![], false)
            .unwrap()
            .with_probe_paths(probes(&["/healthz"]))
            .unwrap();
        let allowed = authorize(&open, &client(None, "10.0.0.1"));
        assert_eq!(
            authorize_request(&open, allowed, b"GET", b"/healthz"),
            allowed
        );
        assert_eq!(authorize_request(&open, allowed, b"POST", b"/x"), allowed);

        // In audit mode a probe counts as allowed, anything else as the audit denial it is.
        let audited = deny_with_probes(&["/healthz"], true);
        let connection = authorize(&audited, &client(None, "10.0.0.1"));
        assert_eq!(connection.verdict, Verdict::AuditDeny);
        assert_eq!(
            authorize_request(&audited, connection, b"GET", b"/healthz"),
            probe
        );
        assert_eq!(
            authorize_request(&audited, connection, b"GET", b"/other"),
            connection
        );

        // No probe paths: nothing is a probe.
        let bare = ServerPolicy::try_new(DefaultPolicy::Deny, vec![], false).unwrap();
        let connection = authorize(&bare, &client(None, "10.0.0.1"));
        assert_eq!(
            authorize_request(&bare, connection, b"GET", b"/"),
            connection
        );
    }

    // === Properties ===

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
            any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
            // Addresses near a few networks, so that containment is often true.
            (0u32..256).prop_map(|v| IpAddr::V4(Ipv4Addr::new(10, 0, 0, u8::try_from(v).unwrap()))),
            any::<u32>().prop_map(|v| IpAddr::V6(Ipv4Addr::from(v).to_ipv6_mapped())),
        ]
    }

    fn arb_network() -> impl Strategy<Value = Network> {
        (arb_ip(), any::<u8>()).prop_map(|(ip, len)| {
            let ip = ip.to_canonical();
            let len = len % (max_prefix(ip) + 1);
            let network = Network {
                addr: ip,
                prefix_len: len,
            };
            Network::try_new(network.masked(ip), len).unwrap()
        })
    }

    fn arb_label() -> impl Strategy<Value = String> {
        prop_oneof!["[a-c]", "[a-c][a-c0-9-]{0,3}[a-c]"]
    }

    fn arb_name() -> impl Strategy<Value = String> {
        proptest::collection::vec(arb_label(), 1..4).prop_map(|labels| labels.join("."))
    }

    fn arb_identity_match() -> impl Strategy<Value = IdentityMatch> {
        prop_oneof![
            arb_name().prop_map(IdentityMatch::Exact),
            arb_name().prop_map(IdentityMatch::Suffix),
            Just(IdentityMatch::Suffix(String::new())),
        ]
    }

    fn arb_authorization() -> impl Strategy<Value = Authorization> {
        (
            proptest::collection::vec(arb_identity_match(), 0..3),
            proptest::collection::vec(arb_network(), 0..3),
        )
            .prop_filter("not empty", |(i, n)| !i.is_empty() || !n.is_empty())
            .prop_map(|(i, n)| Authorization::try_new(i, n).unwrap())
    }

    fn arb_default() -> impl Strategy<Value = DefaultPolicy> {
        prop_oneof![
            Just(DefaultPolicy::AllUnauthenticated),
            Just(DefaultPolicy::AllAuthenticated),
            Just(DefaultPolicy::Deny),
        ]
    }

    fn arb_policy() -> impl Strategy<Value = ServerPolicy> {
        (
            arb_default(),
            proptest::collection::vec(arb_authorization(), 0..4),
            any::<bool>(),
            proptest::collection::vec(arb_probe_path(), 0..4),
        )
            .prop_map(|(d, a, audit, probes)| {
                ServerPolicy::try_new(d, a, audit)
                    .unwrap()
                    .with_probe_paths(probes)
                    .unwrap()
            })
    }

    /// Probe paths as written: short, from a small alphabet (so requests often hit them),
    /// sometimes with a query.
    fn arb_probe_path() -> impl Strategy<Value = ProbePath> {
        "/[a-c/%.]{0,6}(\\?[a-c=&]{0,4})?".prop_map(|text| ProbePath::parse(&text).unwrap())
    }

    /// Request paths: arbitrary bytes, near-misses of probe paths, and probe paths exactly.
    fn arb_request_path() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..10),
            "/[a-cA-C/%.0-9]{0,7}".prop_map(String::into_bytes),
            arb_probe_path().prop_map(|p| p.as_str().as_bytes().to_vec()),
        ]
    }

    fn arb_method() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"GET".to_vec()),
            Just(b"HEAD".to_vec()),
            Just(b"POST".to_vec()),
            Just(b"get".to_vec()),
            Just(b"PUT".to_vec()),
            Just(b"CONNECT".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..6),
        ]
    }

    fn arb_decision() -> impl Strategy<Value = Decision> {
        let verdict = prop_oneof![
            Just(Verdict::Allow),
            Just(Verdict::Deny),
            Just(Verdict::AuditDeny),
        ];
        let rule = prop_oneof![
            (0usize..4).prop_map(Rule::Authorization),
            arb_default().prop_map(Rule::Default),
        ];
        (verdict, rule).prop_map(|(verdict, rule)| Decision { verdict, rule })
    }

    /// The containment of the definition: the first `len` bits agree.
    fn reference_contains(network: &Network, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (bool, u128, u32) {
            match ip.to_canonical() {
                IpAddr::V4(v4) => (true, u128::from(u32::from(v4)) << 96, 32),
                IpAddr::V6(v6) => (false, u128::from(v6), 128),
            }
        };
        let (net_v4, net_bits, _) = bits(network.addr());
        let (ip_v4, ip_bits, _) = bits(ip);
        net_v4 == ip_v4
            && (0..u32::from(network.prefix_len()))
                .all(|i| (net_bits >> (127 - i)) & 1 == (ip_bits >> (127 - i)) & 1)
    }

    proptest! {
        #[test]
        fn containment_agrees_with_the_bitwise_definition(network in arb_network(), ip in arb_ip()) {
            prop_assert_eq!(network.contains(ip), reference_contains(&network, ip));
            prop_assert!(network.contains(network.addr()));
        }

        #[test]
        fn zero_and_full_prefixes(ip in arb_ip(), other in arb_ip()) {
            let ip = ip.to_canonical();
            let other_canonical = other.to_canonical();
            let zero = Network::try_new(if ip.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) }, 0).unwrap();
            prop_assert_eq!(zero.contains(other), other_canonical.is_ipv4() == ip.is_ipv4());
            let host = Network::try_new(ip, max_prefix(ip)).unwrap();
            prop_assert_eq!(host.contains(other), other_canonical == ip);
        }

        #[test]
        fn networks_round_trip_through_text(network in arb_network()) {
            prop_assert_eq!(network.to_string().parse::<Network>(), Ok(network));
        }

        #[test]
        fn identity_matches_round_trip_through_text(m in arb_identity_match()) {
            prop_assert_eq!(IdentityMatch::parse(&m.to_string()), Ok(m));
        }

        #[test]
        fn suffix_matching_is_label_wise(prefix in arb_name(), suffix in arb_name(), other in arb_name()) {
            let m = IdentityMatch::Suffix(suffix.clone());
            let under = format!("{prefix}.{suffix}");
            prop_assert!(m.matches(&under));
            prop_assert!(!m.matches(&suffix));
            prop_assert_eq!(m.matches(&other), other.ends_with(&format!(".{suffix}")));
            // Glued without the dot is another name (unless it happens to end in `.suffix`).
            let glued = format!("{prefix}{suffix}");
            let dotted = format!(".{suffix}");
            prop_assert_eq!(m.matches(&glued), glued.ends_with(&dotted));
        }

        #[test]
        fn identity_matching_ignores_ascii_case(m in arb_identity_match(), id in arb_name()) {
            prop_assert_eq!(m.matches(&id), m.matches(&id.to_ascii_uppercase()));
            let upper = IdentityMatch::parse(&m.to_string().to_ascii_uppercase()).unwrap();
            prop_assert_eq!(&upper, &m);
        }

        /// Audit mode never denies, and denies exactly where enforcing would, by the same rule.
        #[test]
        fn audit_never_denies(policy in arb_policy(), identity in proptest::option::of(arb_name()), addr in arb_ip()) {
            let client = Client { identity: identity.as_deref(), addr };
            let audited = ServerPolicy { audit: true, ..policy.clone() };
            let enforced = ServerPolicy { audit: false, ..policy };
            let (a, e) = (authorize(&audited, &client), authorize(&enforced, &client));
            prop_assert!(a.allowed());
            prop_assert_ne!(a.verdict, Verdict::Deny);
            prop_assert_eq!(a.rule, e.rule);
            prop_assert_eq!(a.verdict == Verdict::AuditDeny, e.verdict == Verdict::Deny);
            prop_assert_ne!(e.verdict, Verdict::AuditDeny);
        }

        /// An allow names the first authorization that matches; a decision by default means none
        /// did.
        #[test]
        fn decisions_name_the_rule(policy in arb_policy(), identity in proptest::option::of(arb_name()), addr in arb_ip()) {
            let client = Client { identity: identity.as_deref(), addr };
            let decision = authorize(&policy, &client);
            let first = policy.authorizations().iter().position(|a| a.matches(&client));
            match decision.rule {
                Rule::Authorization(i) => {
                    prop_assert_eq!(Some(i), first);
                    prop_assert_eq!(decision.verdict, Verdict::Allow);
                }
                Rule::Default(d) => {
                    prop_assert_eq!(first, None);
                    prop_assert_eq!(d, policy.default_policy());
                    let allowed = match d {
                        DefaultPolicy::AllUnauthenticated => true,
                        DefaultPolicy::AllAuthenticated => identity.is_some(),
                        DefaultPolicy::Deny => false,
                    };
                    prop_assert_eq!(decision.verdict == Verdict::Allow, allowed);
                }
                Rule::Probe => prop_assert!(false, "authorize never decides by probe"),
            }
        }

        /// Probe paths never widen a policy beyond GET and HEAD of exactly those paths: a
        /// request the connection's decision refused is admitted only as such a probe, and
        /// any other request keeps the connection's decision unchanged.
        #[test]
        fn probes_admit_only_get_and_head_of_exactly_their_paths(
            policy in arb_policy(),
            connection in arb_decision(),
            method in arb_method(),
            path in arb_request_path(),
        ) {
            let decision = authorize_request(&policy, connection, &method, &path);
            let exact = policy.probe_paths().iter().any(|p| p.as_str().as_bytes() == path.as_slice());
            let probe = (method == b"GET" || method == b"HEAD") && exact;
            if decision != connection {
                prop_assert!(probe, "{:?} {:?}", String::from_utf8_lossy(&method), String::from_utf8_lossy(&path));
                prop_assert_ne!(connection.verdict, Verdict::Allow);
                prop_assert_eq!(decision, Decision { verdict: Verdict::Allow, rule: Rule::Probe });
            }
            // Never narrower than the connection.
            prop_assert!(decision.allowed() || !connection.allowed());
            if connection.verdict != Verdict::Allow && probe {
                prop_assert_eq!(decision.rule, Rule::Probe);
            }
            if !policy.admits_probes() {
                prop_assert_eq!(decision, connection);
            }
        }

        /// A path that differs from a probe path only by a trailing slash, one octet
        /// percent-encoded, a query, or ASCII case is not a probe (unless it is itself one of
        /// the policy's paths).
        #[test]
        fn near_misses_are_not_probes(policy in arb_policy(), which in any::<prop::sample::Index>(), at in any::<prop::sample::Index>()) {
            prop_assume!(policy.admits_probes());
            let probe = which.get(policy.probe_paths()).as_str();
            let bytes = probe.as_bytes();
            let i = at.index(bytes.len());
            let encoded = format!("{}%{:02X}{}", &probe[..i], bytes[i], &probe[i + 1..]);
            let upper = probe.to_ascii_uppercase();
            let misses = [
                format!("{probe}/"),
                encoded,
                format!("{probe}?x=1"),
                upper,
                format!("/{probe}"),
            ];
            let connection = Decision { verdict: Verdict::Deny, rule: Rule::Default(DefaultPolicy::Deny) };
            for miss in misses {
                if policy.probe_paths().iter().any(|p| p.as_str() == miss) {
                    continue;
                }
                let decision = authorize_request(&policy, connection, b"GET", miss.as_bytes());
                prop_assert_eq!(decision, connection, "{}", miss);
            }
            let hit = authorize_request(&policy, connection, b"GET", bytes);
            prop_assert_eq!(hit.rule, Rule::Probe);
        }

        /// A probe path written with a query is the path without it; what is read prints back
        /// as itself.
        #[test]
        fn probe_paths_drop_their_query(path in "/[a-z/%.]{0,8}", query in "[a-z=&?/]{0,6}") {
            let bare = ProbePath::parse(&path).unwrap();
            prop_assert_eq!(ProbePath::parse(&format!("{path}?{query}")), Ok(bare.clone()));
            prop_assert_eq!(ProbePath::parse(&bare.to_string()), Ok(bare));
        }
    }
}
