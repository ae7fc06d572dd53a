//! The mesh model: services, their endpoints, their route profiles and their authorization
//! policies.
//!
//! One schema, several carriers (DESIGN.md, "Configuration"): the mesh file read by the proxy's
//! static discovery, the controller's file backend, the demo and the simulation's topologies;
//! later the CRDs and the Destination stream carry the same shapes. This module holds the serde
//! `Raw*` types (what a file may say) and the validated types (what the mesh acts on), joined
//! by `TryFrom`: parse, don't validate. Every error names the path of the offending field in
//! the file's own terms, e.g. `services.web.default.endpoints[0].addr`, and validation reports
//! every error at once rather than the first.
//!
//! Decoding text (YAML) is a carrier concern and lives in `conduit-proto`; this module never
//! sees bytes.

use core::fmt;
use core::net::SocketAddr;
use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::breaker::BreakerConfig;
use crate::policy::{
    Authorization, DefaultPolicy, IdentityMatch, Network, ProbePath, ServerPolicy,
};

/// The weight an endpoint gets when the file does not give one.
///
/// 100 rather than 1 leaves room to express small shares (a canary at 1 % of a peer's traffic)
/// with integers.
pub const DEFAULT_WEIGHT: u32 = 100;

/// The largest weight accepted: large enough for any ratio, small enough that sums over the
/// largest endpoint set cannot overflow a `u64`.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// The port a service gets when the file does not name one: plain HTTP.
pub const DEFAULT_PORT: u16 = 80;

/// The most endpoints one service may list. A bound on every table (STYLE.md §2); ten thousand
/// replicas is far beyond any single service we know of.
pub const MAX_ENDPOINTS: usize = 10_000;

pub use crate::breaker::RawBreaker;
pub use crate::policy::{
    MAX_AUTHORIZATIONS, MAX_IDENTITIES, MAX_NETWORKS, MAX_PROBE_PATH_BYTES, MAX_PROBE_PATHS,
};
pub use crate::route::{MAX_ROUTES, Profile, RawProfile};

// === Raw (as written) ===

/// The mesh file as written: `services` keyed by the authority clients use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawMesh {
    /// Services keyed by name (the host part of the authority clients use).
    pub services: BTreeMap<String, RawService>,
}

/// One service as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawService {
    /// The port clients address the service on (default [`DEFAULT_PORT`]).
    pub port: Option<u16>,
    /// The service's replicas.
    pub endpoints: Vec<RawEndpoint>,
    /// The optional route profile.
    pub profile: Option<RawProfile>,
    /// Circuit breaking for the service's endpoints (absent: the defaults, both policies on).
    pub breaker: Option<RawBreaker>,
    /// Which clients the service's inbound port admits (absent: every client).
    pub policy: Option<RawServerPolicy>,
}

/// A service's authorization policy as written (see [`crate::policy`]).
///
/// ```yaml
/// policy:
///   default: all-authenticated      # all-unauthenticated (default) | all-authenticated | deny
///   audit: false                    # true: deny no one, count who would have been denied
///   authorizations:                 # the first that matches allows the client
///     - identities: ["web.demo.serviceaccount.identity.conduit.local", "*.ops.serviceaccount.identity.conduit.local"]
///     - networks: ["10.0.0.0/8", "127.0.0.1/32"]
///     - { identities: ["*"], networks: ["192.168.0.0/16"] }   # both must match
///   probe_paths: ["/healthz", "/ready"]   # GET/HEAD of exactly these paths pass all the same
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawServerPolicy {
    /// What happens to clients no authorization names: `all-unauthenticated` (the default),
    /// `all-authenticated` or `deny`.
    pub default: Option<String>,
    /// Only count the clients the policy would deny, and let them through.
    pub audit: bool,
    /// The authorizations, tried in order; at most [`MAX_AUTHORIZATIONS`].
    pub authorizations: Vec<RawAuthorization>,
    /// The app's HTTP probe paths (`/healthz`; a query is ignored): on a plaintext or mTLS
    /// HTTP connection the policy does not allow, a `GET` or `HEAD` of exactly one of these
    /// paths still reaches the app, and every other request gets 403 (see
    /// [`crate::policy::authorize_request`]). At most [`MAX_PROBE_PATHS`], each at most
    /// [`MAX_PROBE_PATH_BYTES`]. Kubernetes discovery fills them in from the pod's `httpGet`
    /// probes.
    pub probe_paths: Vec<String>,
}

/// One authorization as written: clients with one of `identities` (exact names, `*.suffix`, or
/// `*` for any authenticated client) and, if `networks` are given too, from one of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawAuthorization {
    /// Client identities, at most [`MAX_IDENTITIES`]; absent or empty: any client.
    pub identities: Vec<String>,
    /// Client networks in CIDR notation (`10.0.0.0/8`, `fd00::/8`, or a bare address), at most
    /// [`MAX_NETWORKS`]; absent or empty: any address.
    pub networks: Vec<String>,
}

/// One endpoint as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawEndpoint {
    /// `IP:PORT` of the replica (its proxy's inbound port when meshed).
    pub addr: String,
    /// Relative share of traffic (default [`DEFAULT_WEIGHT`]; 0 drains the endpoint).
    pub weight: Option<u32>,
    /// The workload identity the endpoint proves, when it is meshed.
    pub identity: Option<String>,
    /// Free-form labels (zone, version, ...), carried into metrics and tap.
    pub labels: BTreeMap<String, String>,
    /// `IP:PORT` of the endpoint's proxy admin server, where the controller reads its metrics
    /// for `conduit stat` and `conduit check` probes its health. Optional.
    pub admin: Option<String>,
}

// === Validated ===

/// A validated mesh: every service name, address, weight and route is known good.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mesh {
    services: BTreeMap<String, Service>,
}

/// A validated service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// The service name (lower case, without a trailing dot).
    pub name: String,
    /// The port clients address it on.
    pub port: u16,
    /// Its endpoints, in file order, with distinct addresses.
    pub endpoints: Vec<Endpoint>,
    /// Its route profile (empty when the file gives none), with its circuit breaking
    /// ([`Profile::breaker`]) and the authorization policy of its inbound port
    /// ([`Profile::policy`]).
    pub profile: Profile,
}

/// A validated endpoint: one replica of a service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of traffic; 0 means drained (never picked).
    pub weight: u32,
    /// The workload identity the endpoint proves, when meshed.
    pub identity: Option<String>,
    /// Labels carried into metrics and tap.
    pub labels: BTreeMap<String, String>,
    /// The endpoint's proxy admin server, when known (stat and health checks).
    pub admin: Option<SocketAddr>,
}

impl Endpoint {
    /// An unmeshed endpoint at `addr` with the default weight, no labels and no known admin
    /// server.
    #[must_use]
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            weight: DEFAULT_WEIGHT,
            identity: None,
            admin: None,
            labels: BTreeMap::new(),
        }
    }
}

impl Mesh {
    /// An empty mesh.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// All services, ordered by name.
    pub fn services(&self) -> impl ExactSizeIterator<Item = &Service> {
        self.services.values()
    }

    /// The service called `name` (exact, already normalised name).
    #[must_use]
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.get(name)
    }

    /// The service a request's authority (`Host` or `:authority`) names.
    ///
    /// The host is compared case-insensitively and without a trailing dot. When the authority
    /// carries a port it must equal the service's port; when it carries none, the name alone
    /// decides, because HTTP clients routinely omit the port they dialled.
    #[must_use]
    pub fn lookup(&self, authority: &str) -> Option<&Service> {
        let (host, port) = split_authority(authority)?;
        let name = normalise_name(host);
        let service = self.services.get(name.as_str())?;
        match port {
            Some(port) if port != service.port => None,
            _ => Some(service),
        }
    }
}

/// Splits `host[:port]` (IPv6 hosts in brackets). `None` for a malformed authority.
#[must_use]
pub fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    if authority.is_empty() {
        return None;
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(port) => Some((host, Some(port.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((authority, None)),
    }
}

fn normalise_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

// === Validation ===

/// One reason a mesh description was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct FieldError {
    /// Where, in the file's terms: `services.web.default.endpoints[0].addr`.
    pub path: String,
    /// What is wrong, for a person.
    pub reason: String,
}

/// A mesh description that failed validation, with every error found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidMesh {
    /// Every problem found, in file order. Never empty.
    pub errors: Vec<FieldError>,
}

impl fmt::Display for InvalidMesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid mesh: ")?;
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            reason: reason.into(),
        });
    }
}

impl TryFrom<RawMesh> for Mesh {
    type Error = InvalidMesh;

    fn try_from(raw: RawMesh) -> Result<Self, InvalidMesh> {
        let mut errors = Errors::default();
        let mut services = BTreeMap::new();
        for (raw_name, raw_service) in raw.services {
            let path = format!("services.{raw_name}");
            let name = normalise_name(&raw_name);
            if let Err(reason) = check_dns_name(&name) {
                errors.push(&path, format!("invalid service name: {reason}"));
                continue;
            }
            if services.contains_key(&name) {
                errors.push(&path, format!("duplicate service (same name as `{name}`)"));
                continue;
            }
            if let Some(service) = validate_service(&path, name.clone(), raw_service, &mut errors) {
                services.insert(name, service);
            }
        }
        if errors.0.is_empty() {
            Ok(Self { services })
        } else {
            Err(InvalidMesh { errors: errors.0 })
        }
    }
}

fn validate_service(
    path: &str,
    name: String,
    raw: RawService,
    errors: &mut Errors,
) -> Option<Service> {
    let before = errors.0.len();
    let port = raw.port.unwrap_or(DEFAULT_PORT);
    if port == 0 {
        errors.push(format!("{path}.port"), "must be between 1 and 65535");
    }
    if raw.endpoints.len() > MAX_ENDPOINTS {
        errors.push(
            format!("{path}.endpoints"),
            format!("at most {MAX_ENDPOINTS} endpoints"),
        );
    }
    let mut seen = BTreeSet::new();
    let mut endpoints = Vec::with_capacity(raw.endpoints.len());
    for (i, raw_endpoint) in raw.endpoints.into_iter().enumerate() {
        let path = format!("{path}.endpoints[{i}]");
        if let Some(endpoint) = validate_endpoint(&path, raw_endpoint, errors) {
            if seen.insert(endpoint.addr) {
                endpoints.push(endpoint);
            } else {
                errors.push(
                    format!("{path}.addr"),
                    format!("duplicate address {}", endpoint.addr),
                );
            }
        }
    }
    let profile = validate_profile(
        &format!("{path}.profile"),
        raw.profile.unwrap_or_default(),
        errors,
    );
    let breaker = BreakerConfig::try_from(raw.breaker.unwrap_or_default()).unwrap_or_else(|e| {
        errors.push(format!("{path}.breaker.{}", e.field), e.problem);
        BreakerConfig::default()
    });
    let policy = raw
        .policy
        .and_then(|raw| validate_policy(&format!("{path}.policy"), raw, errors));
    let profile = profile.with_breaker(breaker).with_policy(policy);
    (errors.0.len() == before).then_some(Service {
        name,
        port,
        endpoints,
        profile,
    })
}

fn validate_endpoint(path: &str, raw: RawEndpoint, errors: &mut Errors) -> Option<Endpoint> {
    let before = errors.0.len();
    let addr = match raw.addr.parse::<SocketAddr>() {
        Ok(addr) if addr.port() == 0 => {
            errors.push(format!("{path}.addr"), "port must not be 0");
            None
        }
        Ok(addr) => Some(addr),
        Err(_) if raw.addr.is_empty() => {
            errors.push(format!("{path}.addr"), "missing (expected IP:PORT)");
            None
        }
        Err(_) => {
            errors.push(
                format!("{path}.addr"),
                format!("`{}` is not an IP:PORT address", raw.addr),
            );
            None
        }
    };
    let admin = match raw.admin.as_deref().map(str::parse::<SocketAddr>) {
        None => None,
        Some(Ok(admin)) if admin.port() != 0 => Some(admin),
        Some(_) => {
            errors.push(
                format!("{path}.admin"),
                format!(
                    "`{}` is not an IP:PORT address",
                    raw.admin.as_deref().unwrap_or_default()
                ),
            );
            None
        }
    };
    let weight = raw.weight.unwrap_or(DEFAULT_WEIGHT);
    if weight > MAX_WEIGHT {
        errors.push(
            format!("{path}.weight"),
            format!("{weight} is above the maximum {MAX_WEIGHT}"),
        );
    }
    if let Some(identity) = &raw.identity
        && let Err(reason) = check_dns_name(identity)
    {
        errors.push(
            format!("{path}.identity"),
            format!("invalid identity: {reason}"),
        );
    }
    for key in raw.labels.keys() {
        if key.is_empty() || key.len() > 63 {
            errors.push(
                format!("{path}.labels"),
                format!("label key `{key}` must be 1 to 63 bytes"),
            );
        }
    }
    let addr = addr?;
    (errors.0.len() == before).then_some(Endpoint {
        addr,
        weight,
        identity: raw.identity,
        labels: raw.labels,
        admin,
    })
}

fn validate_profile(path: &str, raw: RawProfile, errors: &mut Errors) -> Profile {
    Profile::try_from(raw).unwrap_or_else(|invalid| {
        for (field, reason) in invalid.errors {
            errors.push(format!("{path}.{field}"), reason);
        }
        Profile::default()
    })
}

/// Validates a policy block on its own, as the carriers that assemble one from pieces do (the
/// Kubernetes `Server` and its `AuthorizationPolicy`s), so they can name the piece at fault.
/// Every error's path is relative to the block: `default`, `authorizations`,
/// `authorizations[1].networks[0]`.
///
/// # Errors
///
/// [`InvalidMesh`] with every problem found.
pub fn validate_server_policy(raw: RawServerPolicy) -> Result<ServerPolicy, InvalidMesh> {
    let mut errors = Errors::default();
    let policy = validate_policy("", raw, &mut errors);
    match policy {
        Some(policy) if errors.0.is_empty() => Ok(policy),
        _ => {
            let mut errors = errors.0;
            for error in &mut errors {
                error.path = error.path.trim_start_matches('.').to_owned();
            }
            if errors.is_empty() {
                errors.push(FieldError {
                    path: String::new(),
                    reason: "invalid policy".into(),
                });
            }
            Err(InvalidMesh { errors })
        }
    }
}

/// Validates a service's policy, reporting every problem under `path`.
fn validate_policy(path: &str, raw: RawServerPolicy, errors: &mut Errors) -> Option<ServerPolicy> {
    let before = errors.0.len();
    let default = match raw.default.as_deref() {
        None => DefaultPolicy::default(),
        Some(name) => DefaultPolicy::from_name(name).unwrap_or_else(|| {
            errors.push(
                format!("{path}.default"),
                format!(
                    "`{name}` is not a default policy (all-unauthenticated, all-authenticated \
                     or deny)"
                ),
            );
            DefaultPolicy::default()
        }),
    };
    if raw.authorizations.len() > MAX_AUTHORIZATIONS {
        errors.push(
            format!("{path}.authorizations"),
            format!("at most {MAX_AUTHORIZATIONS} authorizations"),
        );
        return None;
    }
    let mut authorizations = Vec::with_capacity(raw.authorizations.len());
    for (i, raw) in raw.authorizations.into_iter().enumerate() {
        let path = format!("{path}.authorizations[{i}]");
        if let Some(authorization) = validate_authorization(&path, raw, errors) {
            authorizations.push(authorization);
        }
    }
    let mut probe_paths = Vec::new();
    if raw.probe_paths.len() > MAX_PROBE_PATHS {
        errors.push(
            format!("{path}.probe_paths"),
            format!("at most {MAX_PROBE_PATHS} probe paths"),
        );
    } else {
        for (i, text) in raw.probe_paths.iter().enumerate() {
            match ProbePath::parse(text) {
                Ok(probe) => probe_paths.push(probe),
                Err(reason) => errors.push(format!("{path}.probe_paths[{i}]"), reason),
            }
        }
    }
    if errors.0.len() != before {
        return None;
    }
    ServerPolicy::try_new(default, authorizations, raw.audit)
        .and_then(|policy| policy.with_probe_paths(probe_paths))
        .map_err(|e| errors.push(format!("{path}.{}", e.field), e.problem))
        .ok()
}

fn validate_authorization(
    path: &str,
    raw: RawAuthorization,
    errors: &mut Errors,
) -> Option<Authorization> {
    let before = errors.0.len();
    let mut identities = Vec::new();
    if raw.identities.len() > MAX_IDENTITIES {
        errors.push(
            format!("{path}.identities"),
            format!("at most {MAX_IDENTITIES} identities"),
        );
    } else {
        for (i, text) in raw.identities.iter().enumerate() {
            match IdentityMatch::parse(text) {
                Ok(identity) => identities.push(identity),
                Err(reason) => errors.push(
                    format!("{path}.identities[{i}]"),
                    format!("invalid identity `{text}`: {reason}"),
                ),
            }
        }
    }
    let mut networks = Vec::new();
    if raw.networks.len() > MAX_NETWORKS {
        errors.push(
            format!("{path}.networks"),
            format!("at most {MAX_NETWORKS} networks"),
        );
    } else {
        for (i, text) in raw.networks.iter().enumerate() {
            match text.parse::<Network>() {
                Ok(network) => networks.push(network),
                Err(reason) => errors.push(
                    format!("{path}.networks[{i}]"),
                    format!("invalid network `{text}`: {reason}"),
                ),
            }
        }
    }
    if errors.0.len() != before {
        return None;
    }
    Authorization::try_new(identities, networks)
        .map_err(|e| {
            let field = if e.field.is_empty() {
                path.to_owned()
            } else {
                format!("{path}.{}", e.field)
            };
            errors.push(field, e.problem);
        })
        .ok()
}

/// Checks a DNS-style name: 1 to 253 bytes of labels of 1 to 63 bytes each, made of ASCII
/// lower-case letters, digits and `-`, not starting or ending with `-`.
///
/// # Errors
///
/// What is wrong with the name, for a person.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > 253 {
        return Err("longer than 253 bytes".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("label `{label}` must be 1 to 63 bytes"));
        }
        let valid = label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid || label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "label `{label}` may hold only a-z, 0-9 and `-`, and not start or end with `-`"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{RawPathMatch, RawRequestMatch, RawRoute};

    fn endpoint(addr: &str) -> RawEndpoint {
        RawEndpoint {
            addr: addr.into(),
            ..RawEndpoint::default()
        }
    }

    fn mesh_with(name: &str, service: RawService) -> RawMesh {
        RawMesh {
            services: BTreeMap::from([(name.to_string(), service)]),
        }
    }

    #[test]
    fn a_valid_mesh_gets_defaults() {
        let raw = mesh_with(
            "web.default",
            RawService {
                endpoints: vec![endpoint("127.0.0.1:9001")],
                ..RawService::default()
            },
        );
        let mesh = Mesh::try_from(raw).unwrap();
        let web = mesh.service("web.default").unwrap();
        assert_eq!(web.port, DEFAULT_PORT);
        assert_eq!(web.endpoints[0].weight, DEFAULT_WEIGHT);
        assert!(web.profile.is_empty());
    }

    #[test]
    fn every_error_names_its_field() {
        let raw = mesh_with(
            "web.default",
            RawService {
                port: Some(0),
                endpoints: vec![
                    endpoint("127.0.0.1:9001"),
                    endpoint("not-an-addr"),
                    endpoint("127.0.0.1:9001"),
                    RawEndpoint {
                        weight: Some(MAX_WEIGHT + 1),
                        ..endpoint("127.0.0.1:9003")
                    },
                    RawEndpoint {
                        admin: Some("localhost:4191".into()),
                        ..endpoint("127.0.0.1:9004")
                    },
                ],
                breaker: Some(RawBreaker {
                    max_ejected_per_mille: Some(1001),
                    ..RawBreaker::default()
                }),
                profile: Some(RawProfile {
                    routes: vec![RawRoute {
                        name: "items".into(),
                        matches: RawRequestMatch {
                            method: Some("G ET".into()),
                            path: Some(RawPathMatch {
                                exact: Some("items".into()),
                                ..RawPathMatch::default()
                            }),
                            ..RawRequestMatch::default()
                        },
                        ..RawRoute::default()
                    }],
                }),
                policy: Some(RawServerPolicy {
                    default: Some("allow".into()),
                    ..RawServerPolicy::default()
                }),
            },
        );
        let err = Mesh::try_from(raw).unwrap_err();
        let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "services.web.default.port",
                "services.web.default.endpoints[1].addr",
                "services.web.default.endpoints[2].addr",
                "services.web.default.endpoints[3].weight",
                "services.web.default.endpoints[4].admin",
                "services.web.default.profile.routes[0].match.method",
                "services.web.default.profile.routes[0].match.path.exact",
                "services.web.default.breaker.max_ejected_per_mille",
                "services.web.default.policy.default",
            ]
        );
    }

    #[test]
    fn breaker_blocks_validate_and_name_their_fields() {
        let with_breaker = |breaker: RawBreaker| {
            mesh_with(
                "web.default",
                RawService {
                    breaker: Some(breaker),
                    ..RawService::default()
                },
            )
        };
        let mesh = Mesh::try_from(with_breaker(RawBreaker {
            consecutive_failures: Some(3),
            max_ejected_per_mille: Some(300),
            ..RawBreaker::default()
        }))
        .unwrap();
        let breaker = mesh.service("web.default").unwrap().profile.breaker();
        assert_eq!(breaker.consecutive_failures(), Some(3));
        assert_eq!(breaker.max_ejected_per_mille(), 300);
        assert!(
            breaker.success_rate().is_some(),
            "unset fields keep their defaults"
        );
        let without = mesh_with("web.default", RawService::default());
        let mesh = Mesh::try_from(without).unwrap();
        assert_eq!(
            *mesh.service("web.default").unwrap().profile.breaker(),
            BreakerConfig::default()
        );
        let err = Mesh::try_from(with_breaker(RawBreaker {
            success_rate: Some(crate::breaker::RawSuccessRate {
                window: Some("2h".into()),
                ..Default::default()
            }),
            ..RawBreaker::default()
        }))
        .unwrap_err();
        let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["services.web.default.breaker.success_rate.window"]);
    }

    #[test]
    fn policy_blocks_validate() {
        use crate::policy::{Client, DefaultPolicy, IdentityMatch, Rule, Verdict, authorize};

        let raw = mesh_with(
            "api.demo",
            RawService {
                policy: Some(RawServerPolicy {
                    default: Some("all-authenticated".into()),
                    audit: false,
                    authorizations: vec![
                        RawAuthorization {
                            identities: vec![
                                "Web.demo.serviceaccount.identity.conduit.local".into(),
                                "*.ops.serviceaccount.identity.conduit.local".into(),
                            ],
                            networks: vec![],
                        },
                        RawAuthorization {
                            identities: vec![],
                            networks: vec!["10.0.0.0/8".into(), "127.0.0.1".into()],
                        },
                    ],
                    probe_paths: vec!["/healthz".into()],
                }),
                ..RawService::default()
            },
        );
        let mesh = Mesh::try_from(raw).unwrap();
        let policy = mesh.service("api.demo").unwrap().profile.policy().unwrap();
        assert_eq!(policy.default_policy(), DefaultPolicy::AllAuthenticated);
        assert_eq!(
            policy.authorizations()[0].identities()[0],
            IdentityMatch::Exact("web.demo.serviceaccount.identity.conduit.local".into()),
            "identities are lower-cased"
        );
        assert_eq!(
            policy.authorizations()[1].networks()[1].to_string(),
            "127.0.0.1/32"
        );
        let local = Client {
            identity: None,
            addr: "127.0.0.1".parse().unwrap(),
        };
        assert_eq!(authorize(policy, &local).rule, Rule::Authorization(1));
        let outside = Client {
            identity: None,
            addr: "192.0.2.1".parse().unwrap(),
        };
        let denied = authorize(policy, &outside);
        assert_eq!(denied.verdict, Verdict::Deny);
        let probe = crate::policy::authorize_request(policy, denied, b"GET", b"/healthz");
        assert_eq!((probe.verdict, probe.rule), (Verdict::Allow, Rule::Probe));

        let without = Mesh::try_from(mesh_with("api.demo", RawService::default())).unwrap();
        assert!(
            without
                .service("api.demo")
                .unwrap()
                .profile
                .policy()
                .is_none()
        );
        let empty = Mesh::try_from(mesh_with(
            "api.demo",
            RawService {
                policy: Some(RawServerPolicy::default()),
                ..RawService::default()
            },
        ))
        .unwrap();
        assert_eq!(
            empty.service("api.demo").unwrap().profile.policy(),
            Some(&ServerPolicy::default()),
            "an empty block is the default policy"
        );
    }

    #[test]
    fn policy_errors_name_their_fields() {
        let with_policy = |policy: RawServerPolicy| {
            mesh_with(
                "api.demo",
                RawService {
                    policy: Some(policy),
                    ..RawService::default()
                },
            )
        };
        let auth = |identities: &[&str], networks: &[&str]| RawAuthorization {
            identities: identities.iter().map(|s| (*s).to_owned()).collect(),
            networks: networks.iter().map(|s| (*s).to_owned()).collect(),
        };
        let err = Mesh::try_from(with_policy(RawServerPolicy {
            default: Some("Deny".into()),
            audit: true,
            authorizations: vec![
                auth(
                    &["ok.demo", "a.*.demo", "bad_name"],
                    &["10.0.0.0/8", "10.1.0.0/8"],
                ),
                auth(&[], &[]),
                auth(&["*"], &["::/129"]),
                auth(&vec!["a.demo"; MAX_IDENTITIES + 1], &[]),
                auth(&[], &vec!["10.0.0.0/8"; MAX_NETWORKS + 1]),
            ],
            probe_paths: vec!["/ok".into(), "healthz".into(), "/a b".into()],
        }))
        .unwrap_err();
        let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "services.api.demo.policy.default",
                "services.api.demo.policy.authorizations[0].identities[1]",
                "services.api.demo.policy.authorizations[0].identities[2]",
                "services.api.demo.policy.authorizations[0].networks[1]",
                "services.api.demo.policy.authorizations[1]",
                "services.api.demo.policy.authorizations[2].networks[0]",
                "services.api.demo.policy.authorizations[3].identities",
                "services.api.demo.policy.authorizations[4].networks",
                "services.api.demo.policy.probe_paths[1]",
                "services.api.demo.policy.probe_paths[2]",
            ]
        );
        let err = Mesh::try_from(with_policy(RawServerPolicy {
            probe_paths: vec!["/ready".into(); MAX_PROBE_PATHS + 1],
            ..RawServerPolicy::default()
        }))
        .unwrap_err();
        assert_eq!(err.errors[0].path, "services.api.demo.policy.probe_paths");
        let err = Mesh::try_from(with_policy(RawServerPolicy {
            authorizations: vec![auth(&["*"], &[]); MAX_AUTHORIZATIONS + 1],
            ..RawServerPolicy::default()
        }))
        .unwrap_err();
        assert_eq!(
            err.errors[0].path,
            "services.api.demo.policy.authorizations"
        );
    }

    #[test]
    fn a_policy_block_validates_on_its_own_with_relative_paths() {
        let policy = validate_server_policy(RawServerPolicy {
            default: Some("deny".into()),
            audit: true,
            authorizations: vec![RawAuthorization {
                identities: vec!["*".into()],
                networks: vec![],
            }],
            probe_paths: vec!["/ready?full=1".into(), "/live".into()],
        })
        .unwrap();
        assert_eq!(policy.default_policy(), DefaultPolicy::Deny);
        assert!(policy.audit());
        let probes: Vec<&str> = policy.probe_paths().iter().map(ProbePath::as_str).collect();
        assert_eq!(probes, ["/live", "/ready"]);
        let err = validate_server_policy(RawServerPolicy {
            default: Some("maybe".into()),
            audit: false,
            authorizations: vec![
                RawAuthorization::default(),
                RawAuthorization {
                    identities: vec![],
                    networks: vec!["10.0.0.0/33".into()],
                },
            ],
            probe_paths: vec!["ready".into()],
        })
        .unwrap_err();
        let paths: Vec<&str> = err.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "default",
                "authorizations[0]",
                "authorizations[1].networks[0]",
                "probe_paths[0]"
            ]
        );
    }

    #[test]
    fn bad_service_names_are_rejected() {
        for name in ["", "-web", "web_default", "a..b"] {
            let raw = mesh_with(name, RawService::default());
            let err = Mesh::try_from(raw).unwrap_err();
            assert_eq!(err.errors[0].path, format!("services.{name}"), "{name}");
        }
    }

    #[test]
    fn lookup_by_authority() {
        let raw = mesh_with(
            "web.default",
            RawService {
                port: Some(8080),
                ..RawService::default()
            },
        );
        let mesh = Mesh::try_from(raw).unwrap();
        assert!(mesh.lookup("web.default").is_some());
        assert!(mesh.lookup("WEB.default.:8080").is_some());
        assert!(mesh.lookup("web.default:80").is_none(), "wrong port");
        assert!(mesh.lookup("web.default:x").is_none(), "malformed port");
        assert!(mesh.lookup("api.default").is_none());
        assert!(mesh.lookup("").is_none());
        assert_eq!(split_authority("[::1]:80"), Some(("::1", Some(80))));
        assert_eq!(split_authority("[::1]"), Some(("::1", None)));
        assert_eq!(split_authority("[::1]x"), None);
    }
}
