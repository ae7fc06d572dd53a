//! The one place where wire messages become core types (STYLE.md §1, §10).
//!
//! Every message that arrives from the network is validated here, once: `TryFrom<pb::X>` turns
//! it into a validated core value or an [`InvalidMessage`] that names the offending field
//! (`add.addrs[2].addr.port`). Nothing here panics on any input; the property tests feed it
//! arbitrary messages and arbitrary bytes. The other direction, core to wire, cannot fail and is
//! `From`.
//!
//! | wire (`pb`) | core |
//! |---|---|
//! | [`net::TcpAddress`] | [`SocketAddr`] (IPv6 flow info and scope id are not carried) |
//! | [`destination::WeightedAddr`] | [`mesh::Endpoint`] |
//! | [`destination::Update`] | [`DestinationUpdate`], and from it [`balance::Update`] |
//! | [`destination::Route`] | [`route::Route`] (its match, response classes, timeouts and retry policy) |
//! | [`destination::RetryPolicy`] | [`retry::RetryPolicy`] (with the route's or the profile's budget) |
//! | [`destination::DestinationProfile`] | [`ProfileUpdate`] (holding a [`route::Profile`]) |
//! | [`destination::CircuitBreaker`] | [`BreakerConfig`] (a profile's [`Profile::breaker`]) |
//! | [`destination::ServerPolicy`] | [`ServerPolicy`] (a profile's [`Profile::policy`]) |
//! | [`api::Workload`] | from [`mesh::Service`] only (the CLI issue adds the reverse) |
//!
//! A route's retry budget travels in its `RetryPolicy`; the profile-wide `retry_budget` is read
//! as the budget of routes whose policy gives none (each route still keeps its own budget), and
//! never written: every route sent carries its budget.
//!
//! [`net::TcpAddress`]: crate::pb::net::TcpAddress
//! [`destination::WeightedAddr`]: crate::pb::destination::WeightedAddr
//! [`destination::Update`]: crate::pb::destination::Update
//! [`destination::Route`]: crate::pb::destination::Route
//! [`destination::RetryPolicy`]: crate::pb::destination::RetryPolicy
//! [`destination::DestinationProfile`]: crate::pb::destination::DestinationProfile
//! [`destination::CircuitBreaker`]: crate::pb::destination::CircuitBreaker
//! [`destination::ServerPolicy`]: crate::pb::destination::ServerPolicy
//! [`api::Workload`]: crate::pb::api::Workload

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use core::time::Duration;
use std::collections::BTreeSet;

use conduit_core::backoff::BackoffConfig;
use conduit_core::balance;
use conduit_core::breaker::{
    BreakerConfig, DEFAULT_CONSECUTIVE_FAILURES, DEFAULT_MAX_EJECTED_PER_MILLE,
    DEFAULT_PENALTY_JITTER_PER_MILLE, DEFAULT_PENALTY_MAX, DEFAULT_PENALTY_MIN,
    DEFAULT_SUCCESS_RATE_MIN_REQUESTS, DEFAULT_SUCCESS_RATE_THRESHOLD_PER_MILLE,
    DEFAULT_SUCCESS_RATE_WINDOW, InvalidBreaker, SuccessRate,
};
use conduit_core::classify::{
    Classifier, ClassifyConfig, GrpcCode, GrpcRule, HttpRule, MAX_RULES, Outcome, StatusRange,
};
use conduit_core::fault::{FaultPolicy, RawAbort, RawDelay, RawFault};
use conduit_core::mesh::{self, Endpoint, MAX_ENDPOINTS, MAX_WEIGHT};
use conduit_core::policy::{
    Authorization, DefaultPolicy, IdentityMatch, MAX_AUTHORIZATIONS, MAX_IDENTITIES, MAX_NETWORKS,
    MAX_PROBE_PATHS, Network, ProbePath, ServerPolicy,
};
use conduit_core::retry::{
    self, BudgetConfig, HedgeDelay, HedgePolicy, InvalidRetry, Ratio, RetryPolicy,
};
use conduit_core::route::{
    self, MAX_HEADER_MATCHES, MAX_ROUTES, PathMatch, Pattern, Profile, RawHeaderMatch,
    RequestMatch, Route, RoutePolicy, ValueMatch,
};
use conduit_core::timeout::Timeouts;

use crate::pb::{api, destination as dst, net};

/// The longest identity name accepted: the longest DNS name.
pub const MAX_IDENTITY_BYTES: usize = 253;

/// The longest label key accepted (the mesh file's limit, which is Kubernetes' too).
pub const MAX_LABEL_KEY_BYTES: usize = 63;

/// A wire message that cannot become a core value.
///
/// `field` is the path of the offending field inside the converted message, in protobuf field
/// names with list indices: `add.addrs[2].addr.port`, `routes[0].condition.method`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    /// A field the message cannot do without is absent (or a `oneof` has no case set, which is
    /// also how a receiver sees a case added by a newer sender).
    #[error("{field}: missing")]
    Missing {
        /// The absent field.
        field: String,
    },
    /// An IP address is neither 4 nor 16 bytes long.
    #[error("{field}: an IP address is 4 or 16 bytes, not {len}")]
    IpLength {
        /// The address field.
        field: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A port is 0 or above 65535.
    #[error("{field}: port {port} is outside 1..=65535")]
    Port {
        /// The port field.
        field: String,
        /// The value received.
        port: u32,
    },
    /// An endpoint weight is above [`MAX_WEIGHT`].
    #[error("{field}: weight {weight} is above the maximum {MAX_WEIGHT}")]
    Weight {
        /// The weight field.
        field: String,
        /// The value received.
        weight: u32,
    },
    /// An identity is not a DNS-like name.
    #[error("{field}: invalid identity `{name}`: {reason}")]
    Identity {
        /// The identity field.
        field: String,
        /// The name received (at most [`MAX_IDENTITY_BYTES`] of it are kept; longer names are
        /// cut at a character boundary).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A label key is empty or longer than [`MAX_LABEL_KEY_BYTES`].
    #[error("{field}: label key must be 1 to {MAX_LABEL_KEY_BYTES} bytes, not {len}")]
    LabelKey {
        /// The labels field.
        field: String,
        /// The key's length in bytes.
        len: usize,
    },
    /// An address appears twice in one set.
    #[error("{field}: duplicate address {addr}")]
    DuplicateAddress {
        /// The second occurrence.
        field: String,
        /// The repeated address.
        addr: SocketAddr,
    },
    /// A list is longer than its bound.
    #[error("{field}: {len} entries, above the limit of {max}")]
    TooMany {
        /// The list field.
        field: String,
        /// Its length.
        len: usize,
        /// The bound ([`MAX_ENDPOINTS`], [`MAX_ROUTES`], [`MAX_HEADER_MATCHES`], twice
        /// [`MAX_RULES`] for response classes, [`MAX_AUTHORIZATIONS`], [`MAX_IDENTITIES`] or
        /// [`MAX_NETWORKS`]).
        max: usize,
    },
    /// An endpoint or address set is empty. An empty endpoint set is said with `no_endpoints`,
    /// so that receivers see one way to say each thing.
    #[error("{field}: empty (an empty endpoint set is sent as `no_endpoints`)")]
    Empty {
        /// The set field.
        field: String,
    },
    /// A stream message has version 0; versions start at 1.
    #[error("{field}: versions start at 1")]
    Version {
        /// The version field.
        field: String,
    },
    /// A route's method is not an HTTP method token.
    #[error("{field}: `{method}` is not an HTTP method")]
    Method {
        /// The method field.
        field: String,
        /// The value received (truncated like identities).
        method: String,
    },
    /// A route's path match is empty or does not start with `/`.
    #[error("{field}: path `{path}` must start with `/`")]
    Path {
        /// The path field.
        field: String,
        /// The value received (truncated like identities).
        path: String,
    },
    /// A route is unnamed, its name repeats an earlier route's, or it takes the reserved name
    /// of the default route.
    #[error("{field}: route names must be present, unique and not `default`, got `{name}`")]
    RouteName {
        /// The name field.
        field: String,
        /// The value received (truncated like identities).
        name: String,
    },
    /// A value the core refuses: a regular expression too large or invalid, a header field
    /// name, a timeout out of range, a status range, a gRPC code, or in a policy a default
    /// this receiver does not know, an identity pattern, a network or an empty authorization.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// Why, for a person.
        reason: String,
    },
}

impl InvalidMessage {
    /// The path of the offending field.
    #[must_use]
    pub fn field(&self) -> &str {
        match self {
            Self::Missing { field }
            | Self::IpLength { field, .. }
            | Self::Port { field, .. }
            | Self::Weight { field, .. }
            | Self::Identity { field, .. }
            | Self::LabelKey { field, .. }
            | Self::DuplicateAddress { field, .. }
            | Self::TooMany { field, .. }
            | Self::Empty { field }
            | Self::Version { field }
            | Self::Method { field, .. }
            | Self::Path { field, .. }
            | Self::RouteName { field, .. }
            | Self::Invalid { field, .. } => field,
        }
    }
}

// === Addresses ===

/// Converts a wire address, naming it `field` in errors.
///
/// # Errors
///
/// [`InvalidMessage::IpLength`] or [`InvalidMessage::Port`].
pub fn socket_addr(field: &str, addr: &net::TcpAddress) -> Result<SocketAddr, InvalidMessage> {
    let ip = match addr.ip.len() {
        4 => {
            let mut octets = [0; 4];
            octets.copy_from_slice(&addr.ip);
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        16 => {
            let mut octets = [0; 16];
            octets.copy_from_slice(&addr.ip);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        len => {
            return Err(InvalidMessage::IpLength {
                field: format!("{field}.ip"),
                len,
            });
        }
    };
    let port = match u16::try_from(addr.port) {
        Ok(port) if port != 0 => port,
        _ => {
            return Err(InvalidMessage::Port {
                field: format!("{field}.port"),
                port: addr.port,
            });
        }
    };
    Ok(SocketAddr::new(ip, port))
}

impl TryFrom<net::TcpAddress> for SocketAddr {
    type Error = InvalidMessage;

    fn try_from(addr: net::TcpAddress) -> Result<Self, InvalidMessage> {
        socket_addr("addr", &addr)
    }
}

impl From<SocketAddr> for net::TcpAddress {
    fn from(addr: SocketAddr) -> Self {
        let ip = match addr.ip() {
            IpAddr::V4(ip) => ip.octets().to_vec(),
            IpAddr::V6(ip) => ip.octets().to_vec(),
        };
        Self {
            ip,
            port: u32::from(addr.port()),
        }
    }
}

// === Endpoints ===

/// Converts one wire endpoint, naming it `field` in errors.
///
/// # Errors
///
/// [`InvalidMessage`] for a missing or invalid address, a weight above [`MAX_WEIGHT`], an
/// identity that is not a DNS-like name, or an empty or over-long label key.
pub fn endpoint(field: &str, addr: dst::WeightedAddr) -> Result<Endpoint, InvalidMessage> {
    let socket = match &addr.addr {
        Some(a) => socket_addr(&format!("{field}.addr"), a)?,
        None => {
            return Err(InvalidMessage::Missing {
                field: format!("{field}.addr"),
            });
        }
    };
    if addr.weight > MAX_WEIGHT {
        return Err(InvalidMessage::Weight {
            field: format!("{field}.weight"),
            weight: addr.weight,
        });
    }
    let identity = match addr.tls_identity {
        Some(identity) => {
            if let Err(reason) = check_identity(&identity.name) {
                return Err(InvalidMessage::Identity {
                    field: format!("{field}.tls_identity.name"),
                    name: truncated(&identity.name),
                    reason,
                });
            }
            Some(identity.name)
        }
        None => None,
    };
    if let Some(key) = addr
        .metric_labels
        .keys()
        .find(|key| key.is_empty() || key.len() > MAX_LABEL_KEY_BYTES)
    {
        return Err(InvalidMessage::LabelKey {
            field: format!("{field}.metric_labels"),
            len: key.len(),
        });
    }
    Ok(Endpoint {
        addr: socket,
        weight: addr.weight,
        identity,
        labels: addr.metric_labels,
        // Proxies do not need their peers' admin servers; the Destination API omits them.
        admin: None,
    })
}

impl TryFrom<dst::WeightedAddr> for Endpoint {
    type Error = InvalidMessage;

    fn try_from(addr: dst::WeightedAddr) -> Result<Self, InvalidMessage> {
        endpoint("addr", addr)
    }
}

impl From<Endpoint> for dst::WeightedAddr {
    fn from(endpoint: Endpoint) -> Self {
        Self {
            addr: Some(endpoint.addr.into()),
            weight: endpoint.weight,
            tls_identity: endpoint.identity.map(|name| dst::TlsIdentity { name }),
            metric_labels: endpoint.labels,
        }
    }
}

impl From<&Endpoint> for dst::WeightedAddr {
    fn from(endpoint: &Endpoint) -> Self {
        endpoint.clone().into()
    }
}

/// Checks an identity: a DNS-like name of 1 to 253 bytes, made of labels of 1 to 63 bytes of
/// ASCII lower-case letters, digits and `-`, not starting or ending with `-`. The same rule the
/// mesh file applies to `identity`, and the controller's CA to the identities it certifies.
///
/// # Errors
///
/// What is wrong, for a message.
pub fn check_identity(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > MAX_IDENTITY_BYTES {
        return Err("longer than 253 bytes");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each dot-separated label must be 1 to 63 bytes");
        }
        let valid = label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid || label.starts_with('-') || label.ends_with('-') {
            return Err("labels may hold only a-z, 0-9 and `-`, and not start or end with `-`");
        }
    }
    Ok(())
}

/// Keeps at most [`MAX_IDENTITY_BYTES`] of a received string for an error message, so an
/// error can never hold a peer's multi-megabyte field.
fn truncated(text: &str) -> String {
    let mut end = text.len().min(MAX_IDENTITY_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Converts an endpoint set: non-empty, at most [`MAX_ENDPOINTS`], distinct addresses.
fn endpoint_set(field: &str, set: dst::WeightedAddrSet) -> Result<Vec<Endpoint>, InvalidMessage> {
    let field = format!("{field}.addrs");
    check_len(&field, set.addrs.len(), MAX_ENDPOINTS)?;
    let mut seen = BTreeSet::new();
    let mut endpoints = Vec::with_capacity(set.addrs.len());
    for (i, addr) in set.addrs.into_iter().enumerate() {
        let item = format!("{field}[{i}]");
        let endpoint = endpoint(&item, addr)?;
        if !seen.insert(endpoint.addr) {
            return Err(InvalidMessage::DuplicateAddress {
                field: format!("{item}.addr"),
                addr: endpoint.addr,
            });
        }
        endpoints.push(endpoint);
    }
    Ok(endpoints)
}

/// Converts an address set: non-empty, at most [`MAX_ENDPOINTS`], distinct addresses.
fn addr_set(field: &str, set: dst::AddrSet) -> Result<Vec<SocketAddr>, InvalidMessage> {
    let field = format!("{field}.addrs");
    check_len(&field, set.addrs.len(), MAX_ENDPOINTS)?;
    let mut seen = BTreeSet::new();
    let mut addrs = Vec::with_capacity(set.addrs.len());
    for (i, addr) in set.addrs.iter().enumerate() {
        let item = format!("{field}[{i}]");
        let addr = socket_addr(&item, addr)?;
        if !seen.insert(addr) {
            return Err(InvalidMessage::DuplicateAddress { field: item, addr });
        }
        addrs.push(addr);
    }
    Ok(addrs)
}

fn check_len(field: &str, len: usize, max: usize) -> Result<(), InvalidMessage> {
    if len == 0 {
        return Err(InvalidMessage::Empty {
            field: field.to_owned(),
        });
    }
    if len > max {
        return Err(InvalidMessage::TooMany {
            field: field.to_owned(),
            len,
            max,
        });
    }
    Ok(())
}

fn check_version(version: u64) -> Result<u64, InvalidMessage> {
    if version == 0 {
        return Err(InvalidMessage::Version {
            field: "version".into(),
        });
    }
    Ok(version)
}

// === Destination.Get ===

/// One validated message of a `Destination.Get` stream.
///
/// This is [`balance::Update`] plus the one thing the balancer does not need but a proxy does:
/// whether an empty service exists at all ([`DestinationChange::NoEndpoints`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationUpdate {
    /// Strictly increasing within a stream, starting at 1.
    pub version: u64,
    /// What changed.
    pub change: DestinationChange,
}

/// What one `Destination.Get` message changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestinationChange {
    /// The endpoint set is exactly this (never empty; the first message of a stream when the
    /// service has endpoints).
    Replace(Vec<Endpoint>),
    /// These endpoints exist: new addresses are added, known ones updated in place.
    Add(Vec<Endpoint>),
    /// These addresses are gone.
    Remove(Vec<SocketAddr>),
    /// The endpoint set is empty.
    NoEndpoints {
        /// True when the service is known but has no endpoints; false when no service has
        /// the name at all.
        exists: bool,
    },
}

impl TryFrom<dst::Update> for DestinationUpdate {
    type Error = InvalidMessage;

    fn try_from(update: dst::Update) -> Result<Self, InvalidMessage> {
        let version = check_version(update.version)?;
        let change = match update.update {
            Some(dst::update::Update::Replace(set)) => {
                DestinationChange::Replace(endpoint_set("replace", set)?)
            }
            Some(dst::update::Update::Add(set)) => {
                DestinationChange::Add(endpoint_set("add", set)?)
            }
            Some(dst::update::Update::Remove(set)) => {
                DestinationChange::Remove(addr_set("remove", set)?)
            }
            Some(dst::update::Update::NoEndpoints(no)) => {
                DestinationChange::NoEndpoints { exists: no.exists }
            }
            None => {
                return Err(InvalidMessage::Missing {
                    field: "update".into(),
                });
            }
        };
        Ok(Self { version, change })
    }
}

impl From<DestinationUpdate> for dst::Update {
    fn from(update: DestinationUpdate) -> Self {
        let set = |endpoints: Vec<Endpoint>| dst::WeightedAddrSet {
            addrs: endpoints.into_iter().map(Into::into).collect(),
        };
        let update_case = match update.change {
            DestinationChange::Replace(endpoints) => dst::update::Update::Replace(set(endpoints)),
            DestinationChange::Add(endpoints) => dst::update::Update::Add(set(endpoints)),
            DestinationChange::Remove(addrs) => dst::update::Update::Remove(dst::AddrSet {
                addrs: addrs.into_iter().map(Into::into).collect(),
            }),
            DestinationChange::NoEndpoints { exists } => {
                dst::update::Update::NoEndpoints(dst::NoEndpoints { exists })
            }
        };
        Self {
            version: update.version,
            update: Some(update_case),
        }
    }
}

/// For the balancer, an unknown service and a known one without endpoints are the same: there
/// is nothing to pick. A proxy that treats unknown names differently (forwarding to the
/// original destination) reads `exists` of [`DestinationChange::NoEndpoints`] before converting.
impl From<DestinationUpdate> for balance::Update {
    fn from(update: DestinationUpdate) -> Self {
        let change = match update.change {
            DestinationChange::Replace(endpoints) => balance::Change::Replace(endpoints),
            DestinationChange::Add(endpoints) => balance::Change::Add(endpoints),
            DestinationChange::Remove(addrs) => balance::Change::Remove(addrs),
            DestinationChange::NoEndpoints { .. } => balance::Change::NoEndpoints,
        };
        Self {
            version: update.version,
            change,
        }
    }
}

impl TryFrom<dst::Update> for balance::Update {
    type Error = InvalidMessage;

    fn try_from(update: dst::Update) -> Result<Self, InvalidMessage> {
        DestinationUpdate::try_from(update).map(Into::into)
    }
}

// === Destination.GetProfile ===

/// One validated message of a `Destination.GetProfile` stream: the complete profile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProfileUpdate {
    /// Strictly increasing within a stream, starting at 1.
    pub version: u64,
    /// False when no service has the name (the profile is then empty).
    pub exists: bool,
    /// The service's canonical name (empty when it does not exist).
    pub name: String,
    /// The routes and their policies.
    pub profile: Profile,
}

/// Converts one route, naming it `field` in errors. The caller checks name uniqueness.
///
/// # Errors
///
/// [`InvalidMessage`] for an empty or reserved name, a method that is not an HTTP token, a
/// path match that does not start with `/` or has no case set, an invalid or oversized regular
/// expression, an invalid header condition, a timeout out of range, or an invalid response
/// class.
pub fn route(field: &str, route: dst::Route) -> Result<Route, InvalidMessage> {
    route_with_budget(field, route, None)
}

/// Converts one route whose profile gives `budget` to routes without their own.
fn route_with_budget(
    field: &str,
    route: dst::Route,
    budget: Option<&dst::RetryBudget>,
) -> Result<Route, InvalidMessage> {
    if let Err(_reason) = route::check_route_name(&route.name) {
        return Err(InvalidMessage::RouteName {
            field: format!("{field}.name"),
            name: truncated(&route.name),
        });
    }
    let condition = route.condition.unwrap_or_default();
    let method = if condition.method.is_empty() {
        None
    } else {
        match http::Method::from_bytes(condition.method.as_bytes()) {
            Ok(method) => Some(method),
            Err(_) => {
                return Err(InvalidMessage::Method {
                    field: format!("{field}.condition.method"),
                    method: truncated(&condition.method),
                });
            }
        }
    };
    let regex = |field: String, source: &str| {
        Pattern::try_new(source).map_err(|reason| InvalidMessage::Invalid { field, reason })
    };
    let path = match condition.path {
        None => PathMatch::Any,
        Some(dst::PathMatch {
            kind: Some(dst::path_match::Kind::Exact(path)),
        }) => {
            check_path(&format!("{field}.condition.path.exact"), &path)?;
            PathMatch::Exact(path)
        }
        Some(dst::PathMatch {
            kind: Some(dst::path_match::Kind::Prefix(path)),
        }) => {
            check_path(&format!("{field}.condition.path.prefix"), &path)?;
            PathMatch::Prefix(path)
        }
        Some(dst::PathMatch {
            kind: Some(dst::path_match::Kind::Regex(source)),
        }) => PathMatch::Regex(regex(format!("{field}.condition.path.regex"), &source)?),
        // A path match whose case this receiver does not know (a newer sender's), must not
        // widen to "any path".
        Some(dst::PathMatch { kind: None }) => {
            return Err(InvalidMessage::Missing {
                field: format!("{field}.condition.path.kind"),
            });
        }
    };
    // No header condition is the common case; only the bound applies.
    if condition.headers.len() > MAX_HEADER_MATCHES {
        return Err(InvalidMessage::TooMany {
            field: format!("{field}.condition.headers"),
            len: condition.headers.len(),
            max: MAX_HEADER_MATCHES,
        });
    }
    let mut headers = Vec::with_capacity(condition.headers.len());
    for (i, header) in condition.headers.into_iter().enumerate() {
        let header_field = format!("{field}.condition.headers[{i}]");
        let (exact, regex) = match header.value {
            Some(dst::header_match::Value::Exact(exact)) => (Some(exact), None),
            Some(dst::header_match::Value::Regex(regex)) => (None, Some(regex)),
            None => {
                return Err(InvalidMessage::Missing {
                    field: format!("{header_field}.value"),
                });
            }
        };
        let raw = RawHeaderMatch {
            name: header.name,
            exact,
            regex,
        };
        headers.push(route::header_match(raw).map_err(|(sub, reason)| {
            InvalidMessage::Invalid {
                field: format!("{header_field}{sub}"),
                reason,
            }
        })?);
    }
    let millis = |sub: &str, ms: Option<u64>| -> Result<Option<Duration>, InvalidMessage> {
        ms.map(|ms| {
            Timeouts::try_new(Some(Duration::from_millis(ms)), None)
                .map(|t| t.request.unwrap_or_default())
                .map_err(|e| InvalidMessage::Invalid {
                    field: format!("{field}.{sub}"),
                    reason: e.problem,
                })
        })
        .transpose()
    };
    let timeouts = Timeouts {
        request: millis("timeout_ms", route.timeout_ms)?,
        attempt: millis("attempt_timeout_ms", route.attempt_timeout_ms)?,
    };
    let classifier = response_classes(field, route.response_classes)?;
    let retry = match route.retry_policy {
        None => None,
        Some(policy) => retry_policy(&format!("{field}.retry_policy"), policy, budget)?,
    };
    let fault = route
        .fault
        .map(|policy| fault_policy(&format!("{field}.fault"), policy))
        .transpose()?;
    Ok(Route {
        name: route.name.into(),
        matches: RequestMatch {
            method,
            path,
            headers,
        },
        policy: RoutePolicy {
            classifier,
            timeouts,
            retry,
            fault,
        },
    })
}

/// Converts a route's fault policy, checked as the mesh file's is.
///
/// # Errors
///
/// [`InvalidMessage::Invalid`] naming the field out of bounds.
pub fn fault_policy(field: &str, policy: dst::FaultPolicy) -> Result<FaultPolicy, InvalidMessage> {
    let percent = |per_million: u32| Some(Ratio(f64::from(per_million) / 10_000.0));
    let raw = RawFault {
        abort: policy.abort.map(|abort| RawAbort {
            status: (abort.http_status != 0)
                .then(|| u16::try_from(abort.http_status).unwrap_or(u16::MAX)),
            grpc: (abort.grpc_status != 0).then_some(abort.grpc_status),
            percent: percent(abort.per_million),
        }),
        delay: policy.delay.map(|delay| RawDelay {
            duration: Some(format!("{}ms", delay.duration_ms)),
            percent: percent(delay.per_million),
        }),
    };
    FaultPolicy::try_from(raw).map_err(|e| InvalidMessage::Invalid {
        field: format!("{field}.{}", e.field),
        reason: e.problem,
    })
}

impl From<&FaultPolicy> for dst::FaultPolicy {
    fn from(policy: &FaultPolicy) -> Self {
        Self {
            abort: policy.abort.map(|abort| dst::FaultAbort {
                http_status: u32::from(abort.status),
                grpc_status: abort.grpc,
                per_million: abort.per_million,
            }),
            delay: policy.delay.map(|delay| dst::FaultDelay {
                duration_ms: millis_of(delay.duration),
                per_million: delay.per_million,
            }),
        }
    }
}

/// Converts a route's retry policy (`None`: one that allows a single attempt), with the
/// profile's `budget` for a policy that gives none.
///
/// # Errors
///
/// [`InvalidMessage::Invalid`] naming the field out of bounds.
pub fn retry_policy(
    field: &str,
    policy: dst::RetryPolicy,
    budget: Option<&dst::RetryBudget>,
) -> Result<Option<RetryPolicy>, InvalidMessage> {
    let invalid = |e: InvalidRetry| InvalidMessage::Invalid {
        field: format!("{field}.{}", e.field),
        reason: e.problem,
    };
    let max_attempts = match policy.max_attempts {
        0 => retry::DEFAULT_MAX_ATTEMPTS,
        1 => return Ok(None),
        n => n,
    };
    let ms = |v: u64, default: Duration| {
        if v == 0 {
            default
        } else {
            Duration::from_millis(v)
        }
    };
    let min = ms(policy.backoff_min_ms, retry::DEFAULT_BACKOFF_MIN);
    let backoff = BackoffConfig::try_new(
        min,
        ms(policy.backoff_max_ms, min.max(retry::DEFAULT_BACKOFF_MAX)),
        retry::DEFAULT_BACKOFF_JITTER_PER_MILLE,
    )
    .map_err(|e| InvalidMessage::Invalid {
        field: format!("{field}.backoff_min_ms"),
        reason: e.to_string(),
    })?;
    let budget = match policy.budget.as_ref().or(budget) {
        None => BudgetConfig::default(),
        Some(budget) => BudgetConfig::try_new(
            budget.retry_ratio_permille,
            budget.min_retries_per_second,
            ms(budget.ttl_ms, retry::DEFAULT_BUDGET_TTL),
        )
        .map_err(invalid)?,
    };
    let hedge = match policy.hedge {
        None => None,
        Some(hedge) => Some(HedgePolicy {
            after: match hedge.after {
                Some(dst::hedge_policy::After::DelayMs(delay)) => {
                    HedgeDelay::Fixed(Duration::from_millis(delay))
                }
                Some(dst::hedge_policy::After::QuantilePermille(permille)) => {
                    HedgeDelay::Quantile { permille }
                }
                None => {
                    return Err(InvalidMessage::Missing {
                        field: format!("{field}.hedge.after"),
                    });
                }
            },
            max: match hedge.max_hedges {
                0 => retry::DEFAULT_MAX_HEDGES,
                n => n,
            },
        }),
    };
    RetryPolicy::try_new(max_attempts, backoff, policy.non_idempotent, budget, hedge)
        .map(Some)
        .map_err(invalid)
}

impl From<&RetryPolicy> for dst::RetryPolicy {
    fn from(policy: &RetryPolicy) -> Self {
        Self {
            max_attempts: policy.max_attempts,
            backoff_min_ms: millis_of(policy.backoff.min()).max(1),
            backoff_max_ms: millis_of(policy.backoff.max()).max(1),
            non_idempotent: policy.non_idempotent,
            budget: Some(dst::RetryBudget {
                retry_ratio_permille: policy.budget.ratio_permille(),
                min_retries_per_second: policy.budget.min_per_second(),
                ttl_ms: millis_of(policy.budget.ttl()),
            }),
            hedge: policy.hedge.map(|hedge| dst::HedgePolicy {
                after: Some(match hedge.after {
                    HedgeDelay::Fixed(delay) => {
                        dst::hedge_policy::After::DelayMs(millis_of(delay).max(1))
                    }
                    HedgeDelay::Quantile { permille } => {
                        dst::hedge_policy::After::QuantilePermille(permille)
                    }
                }),
                max_hedges: hedge.max,
            }),
        }
    }
}

/// The wire's ordered response classes, split by kind (order within each kind kept: the first
/// matching class of a response's kind wins, as the core's rules do).
fn response_classes(
    field: &str,
    classes: Vec<dst::ResponseClass>,
) -> Result<Classifier, InvalidMessage> {
    // Each kind holds at most MAX_RULES; refuse a longer list before reading any of it.
    if classes.len() > 2 * MAX_RULES {
        return Err(InvalidMessage::TooMany {
            field: format!("{field}.response_classes"),
            len: classes.len(),
            max: 2 * MAX_RULES,
        });
    }
    let mut http = Vec::new();
    let mut grpc = Vec::new();
    for (i, class) in classes.into_iter().enumerate() {
        let class_field = format!("{field}.response_classes[{i}]");
        let outcome = if class.is_failure {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        let invalid = |sub: &str, reason: String| InvalidMessage::Invalid {
            field: format!("{class_field}.condition.{sub}"),
            reason,
        };
        match class.condition.and_then(|c| c.kind) {
            Some(dst::response_match::Kind::Status(range)) => {
                let bound = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
                let statuses = StatusRange::try_new(bound(range.min), bound(range.max))
                    .map_err(|e| invalid(&format!("status.{}", e.field), e.problem.to_string()))?;
                http.push(HttpRule {
                    statuses,
                    outcome,
                    retryable: class.is_retryable,
                });
            }
            Some(dst::response_match::Kind::GrpcStatus(code)) => {
                let code = GrpcCode::from_u32(code).ok_or_else(|| {
                    invalid("grpc_status", format!("{code} is not a gRPC status code"))
                })?;
                grpc.push(GrpcRule {
                    code,
                    outcome,
                    retryable: class.is_retryable,
                });
            }
            None => {
                return Err(InvalidMessage::Missing {
                    field: format!("{class_field}.condition.kind"),
                });
            }
        }
    }
    let config = ClassifyConfig::try_new(http, grpc).map_err(|e| InvalidMessage::Invalid {
        field: format!("{field}.response_classes"),
        reason: e.problem.to_string(),
    })?;
    Ok(Classifier::new(&config))
}

fn check_path(field: &str, path: &str) -> Result<(), InvalidMessage> {
    if path.starts_with('/') {
        Ok(())
    } else {
        Err(InvalidMessage::Path {
            field: field.to_owned(),
            path: truncated(path),
        })
    }
}

impl TryFrom<dst::Route> for Route {
    type Error = InvalidMessage;

    fn try_from(value: dst::Route) -> Result<Self, InvalidMessage> {
        route("route", value)
    }
}

fn millis_of(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl From<&Route> for dst::Route {
    fn from(route: &Route) -> Self {
        let path = match &route.matches.path {
            PathMatch::Any => None,
            PathMatch::Exact(path) => Some(dst::path_match::Kind::Exact(path.clone())),
            PathMatch::Prefix(path) => Some(dst::path_match::Kind::Prefix(path.clone())),
            PathMatch::Regex(pattern) => {
                Some(dst::path_match::Kind::Regex(pattern.as_str().into()))
            }
        }
        .map(|kind| dst::PathMatch { kind: Some(kind) });
        let headers = route
            .matches
            .headers
            .iter()
            .map(|h| dst::HeaderMatch {
                name: h.name.as_str().to_owned(),
                value: Some(match &h.value {
                    ValueMatch::Exact(v) => dst::header_match::Value::Exact(v.clone()),
                    ValueMatch::Regex(p) => dst::header_match::Value::Regex(p.as_str().into()),
                }),
            })
            .collect();
        let config = route.policy.classifier.config();
        let http = config.http_rules().iter().map(|rule| dst::ResponseClass {
            condition: Some(dst::ResponseMatch {
                kind: Some(dst::response_match::Kind::Status(dst::HttpStatusRange {
                    min: u32::from(rule.statuses.min().as_u16()),
                    max: u32::from(rule.statuses.max().as_u16()),
                })),
            }),
            is_failure: rule.outcome == Outcome::Failure,
            is_retryable: rule.retryable,
        });
        let grpc = config.grpc_rules().iter().map(|rule| dst::ResponseClass {
            condition: Some(dst::ResponseMatch {
                kind: Some(dst::response_match::Kind::GrpcStatus(rule.code as u32)),
            }),
            is_failure: rule.outcome == Outcome::Failure,
            is_retryable: rule.retryable,
        });
        Self {
            name: route.name.to_string(),
            condition: Some(dst::RequestMatch {
                method: route
                    .matches
                    .method
                    .as_ref()
                    .map(|m| m.as_str().to_owned())
                    .unwrap_or_default(),
                path,
                headers,
            }),
            response_classes: http.chain(grpc).collect(),
            timeout_ms: route.policy.timeouts.request.map(millis_of),
            attempt_timeout_ms: route.policy.timeouts.attempt.map(millis_of),
            retry_policy: route.policy.retry.as_ref().map(Into::into),
            fault: route.policy.fault.as_ref().map(Into::into),
        }
    }
}

impl TryFrom<dst::DestinationProfile> for ProfileUpdate {
    type Error = InvalidMessage;

    fn try_from(profile: dst::DestinationProfile) -> Result<Self, InvalidMessage> {
        let version = check_version(profile.version)?;
        let (exists, name) = (profile.exists, profile.fully_qualified_name);
        if profile.routes.len() > MAX_ROUTES {
            return Err(InvalidMessage::TooMany {
                field: "routes".into(),
                len: profile.routes.len(),
                max: MAX_ROUTES,
            });
        }
        let mut names = BTreeSet::new();
        let mut routes = Vec::with_capacity(profile.routes.len());
        for (i, pb_route) in profile.routes.into_iter().enumerate() {
            let field = format!("routes[{i}]");
            let route = route_with_budget(&field, pb_route, profile.retry_budget.as_ref())?;
            if !names.insert(route.name.clone()) {
                return Err(InvalidMessage::RouteName {
                    field: format!("{field}.name"),
                    name: truncated(&route.name),
                });
            }
            routes.push(route);
        }
        let breaker = match profile.circuit_breaker {
            Some(wire) => breaker("circuit_breaker", wire)?,
            None => BreakerConfig::default(),
        };
        let policy = profile
            .policy
            .map(|wire| server_policy("policy", wire))
            .transpose()?;
        let profile = Profile::try_new(routes).map_err(|reason| InvalidMessage::Invalid {
            field: "routes".into(),
            reason,
        })?;
        Ok(Self {
            version,
            exists,
            name,
            profile: profile.with_breaker(breaker).with_policy(policy),
        })
    }
}

impl From<ProfileUpdate> for dst::DestinationProfile {
    fn from(update: ProfileUpdate) -> Self {
        Self {
            version: update.version,
            exists: update.exists,
            fully_qualified_name: update.name,
            routes: update.profile.routes().iter().map(Into::into).collect(),
            retry_budget: None,
            circuit_breaker: (*update.profile.breaker() != BreakerConfig::default())
                .then(|| update.profile.breaker().into()),
            policy: update.profile.policy().map(Into::into),
        }
    }
}

// === Authorization policy ===

/// Converts a service's authorization policy, naming it `field` in errors. Lists are checked
/// against their bounds before any entry is read.
///
/// # Errors
///
/// [`InvalidMessage::Invalid`] for a `default_policy` this receiver does not know, an identity
/// that is not a DNS-like name, `*` or `*.suffix`, a network that is not `ADDR/LEN` with no
/// bits past the prefix, an authorization that names neither identities nor networks, or a
/// probe path [`ProbePath::parse`] refuses; [`InvalidMessage::TooMany`] for more than
/// [`MAX_AUTHORIZATIONS`] authorizations, more than [`MAX_IDENTITIES`] identities or
/// [`MAX_NETWORKS`] networks in one, or more than [`MAX_PROBE_PATHS`] probe paths.
pub fn server_policy(field: &str, wire: dst::ServerPolicy) -> Result<ServerPolicy, InvalidMessage> {
    let default = match dst::DefaultPolicy::try_from(wire.default_policy) {
        Ok(dst::DefaultPolicy::AllUnauthenticated) => DefaultPolicy::AllUnauthenticated,
        Ok(dst::DefaultPolicy::AllAuthenticated) => DefaultPolicy::AllAuthenticated,
        Ok(dst::DefaultPolicy::Deny) => DefaultPolicy::Deny,
        // A newer sender's default must not widen to a known, perhaps more permissive one.
        Err(_) => {
            return Err(InvalidMessage::Invalid {
                field: format!("{field}.default_policy"),
                reason: format!("{} is not a known default policy", wire.default_policy),
            });
        }
    };
    let too_many = |field: String, len: usize, max: usize| {
        if len > max {
            Err(InvalidMessage::TooMany { field, len, max })
        } else {
            Ok(())
        }
    };
    too_many(
        format!("{field}.authorizations"),
        wire.authorizations.len(),
        MAX_AUTHORIZATIONS,
    )?;
    let mut authorizations = Vec::with_capacity(wire.authorizations.len());
    for (i, authorization) in wire.authorizations.into_iter().enumerate() {
        let field = format!("{field}.authorizations[{i}]");
        too_many(
            format!("{field}.identities"),
            authorization.identities.len(),
            MAX_IDENTITIES,
        )?;
        too_many(
            format!("{field}.networks"),
            authorization.networks.len(),
            MAX_NETWORKS,
        )?;
        let identities = authorization
            .identities
            .iter()
            .enumerate()
            .map(|(j, text)| {
                IdentityMatch::parse(text).map_err(|reason| InvalidMessage::Invalid {
                    field: format!("{field}.identities[{j}]"),
                    reason: format!("invalid identity `{}`: {reason}", truncated(text)),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let networks = authorization
            .networks
            .iter()
            .enumerate()
            .map(|(j, text)| {
                text.parse::<Network>()
                    .map_err(|reason| InvalidMessage::Invalid {
                        field: format!("{field}.networks[{j}]"),
                        reason: format!("invalid network `{}`: {reason}", truncated(text)),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let authorization =
            Authorization::try_new(identities, networks).map_err(|e| InvalidMessage::Invalid {
                field: if e.field.is_empty() {
                    field.clone()
                } else {
                    format!("{field}.{}", e.field)
                },
                reason: e.problem,
            })?;
        authorizations.push(authorization);
    }
    too_many(
        format!("{field}.probe_paths"),
        wire.probe_paths.len(),
        MAX_PROBE_PATHS,
    )?;
    let probe_paths = wire
        .probe_paths
        .iter()
        .enumerate()
        .map(|(i, text)| {
            ProbePath::parse(text).map_err(|reason| InvalidMessage::Invalid {
                field: format!("{field}.probe_paths[{i}]"),
                reason: format!("invalid probe path `{}`: {reason}", truncated(text)),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    ServerPolicy::try_new(default, authorizations, wire.audit)
        .and_then(|policy| policy.with_probe_paths(probe_paths))
        .map_err(|e| InvalidMessage::Invalid {
            field: format!("{field}.{}", e.field),
            reason: e.problem,
        })
}

impl TryFrom<dst::ServerPolicy> for ServerPolicy {
    type Error = InvalidMessage;

    fn try_from(wire: dst::ServerPolicy) -> Result<Self, InvalidMessage> {
        server_policy("policy", wire)
    }
}

impl From<&ServerPolicy> for dst::ServerPolicy {
    fn from(policy: &ServerPolicy) -> Self {
        let default_policy = match policy.default_policy() {
            DefaultPolicy::AllUnauthenticated => dst::DefaultPolicy::AllUnauthenticated,
            DefaultPolicy::AllAuthenticated => dst::DefaultPolicy::AllAuthenticated,
            DefaultPolicy::Deny => dst::DefaultPolicy::Deny,
        };
        Self {
            default_policy: default_policy.into(),
            authorizations: policy
                .authorizations()
                .iter()
                .map(|authorization| dst::Authorization {
                    identities: authorization
                        .identities()
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                    networks: authorization
                        .networks()
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                })
                .collect(),
            audit: policy.audit(),
            probe_paths: policy
                .probe_paths()
                .iter()
                .map(ToString::to_string)
                .collect(),
        }
    }
}

// === Circuit breaking ===

/// Converts a profile's circuit breaking, naming it `field` in errors. Zero fields take their
/// defaults; the fields of a policy that is off are not read.
///
/// # Errors
///
/// [`InvalidMessage::Invalid`] for a threshold above 1000, a success-rate window outside 1 s to
/// 1 h, a penalty maximum below its minimum or above 1 h, or a jitter or share above 1000.
pub fn breaker(field: &str, wire: dst::CircuitBreaker) -> Result<BreakerConfig, InvalidMessage> {
    let invalid = |e: InvalidBreaker| InvalidMessage::Invalid {
        field: format!("{field}.{}", wire_field(e.field)),
        reason: e.problem,
    };
    let or = |value: u64, default: Duration| {
        if value == 0 {
            default
        } else {
            Duration::from_millis(value)
        }
    };
    let nonzero = |value: u32, default: u32| if value == 0 { default } else { value };
    let penalty = BackoffConfig::try_new(
        or(wire.penalty_min_ms, DEFAULT_PENALTY_MIN),
        or(wire.penalty_max_ms, DEFAULT_PENALTY_MAX),
        wire.penalty_jitter_permille
            .unwrap_or(DEFAULT_PENALTY_JITTER_PER_MILLE),
    )
    .map_err(|e| invalid(e.into()))?;
    let consecutive_failures = (!wire.disabled && !wire.consecutive_failures_disabled)
        .then(|| nonzero(wire.consecutive_failures, DEFAULT_CONSECUTIVE_FAILURES));
    let success_rate = if wire.disabled || wire.success_rate_disabled {
        None
    } else {
        Some(
            SuccessRate::try_new(
                nonzero(
                    wire.success_rate_threshold_permille,
                    DEFAULT_SUCCESS_RATE_THRESHOLD_PER_MILLE,
                ),
                or(wire.success_rate_window_ms, DEFAULT_SUCCESS_RATE_WINDOW),
                nonzero(
                    wire.success_rate_min_requests,
                    DEFAULT_SUCCESS_RATE_MIN_REQUESTS,
                ),
            )
            .map_err(invalid)?,
        )
    };
    BreakerConfig::try_new(
        consecutive_failures,
        success_rate,
        penalty,
        wire.max_ejected_permille
            .unwrap_or(DEFAULT_MAX_EJECTED_PER_MILLE),
    )
    .map_err(invalid)
}

/// The wire name of a field the core names in the mesh file's terms.
fn wire_field(core: &str) -> &'static str {
    match core {
        "consecutive_failures" => "consecutive_failures",
        "success_rate.threshold_per_mille" => "success_rate_threshold_permille",
        "success_rate.window" => "success_rate_window_ms",
        "success_rate.min_requests" => "success_rate_min_requests",
        "backoff.min" => "penalty_min_ms",
        "backoff.max" => "penalty_max_ms",
        "backoff.jitter_per_mille" => "penalty_jitter_permille",
        "max_ejected_per_mille" => "max_ejected_permille",
        // A field a later core names: the message as a whole.
        _ => "",
    }
}

impl From<&BreakerConfig> for dst::CircuitBreaker {
    fn from(config: &BreakerConfig) -> Self {
        let rate = config.success_rate();
        Self {
            disabled: !config.is_enabled(),
            consecutive_failures: config.consecutive_failures().unwrap_or(0),
            consecutive_failures_disabled: config.consecutive_failures().is_none(),
            success_rate_threshold_permille: rate.map_or(0, SuccessRate::threshold_per_mille),
            success_rate_disabled: rate.is_none(),
            success_rate_window_ms: rate.map_or(0, |rate| millis_of(rate.window())),
            success_rate_min_requests: rate.map_or(0, SuccessRate::min_requests),
            penalty_min_ms: millis_of(config.penalty().min()),
            penalty_max_ms: millis_of(config.penalty().max()),
            penalty_jitter_permille: Some(config.penalty().jitter_per_mille()),
            max_ejected_permille: Some(config.max_ejected_per_mille()),
        }
    }
}

// === Public API ===

impl From<&mesh::Service> for api::Workload {
    fn from(service: &mesh::Service) -> Self {
        Self {
            name: service.name.clone(),
            port: u32::from(service.port),
            endpoints: service
                .endpoints
                .iter()
                .map(|endpoint| api::WorkloadEndpoint {
                    addr: Some(endpoint.addr.into()),
                    weight: endpoint.weight,
                    identity: endpoint.identity.clone().unwrap_or_default(),
                    labels: endpoint.labels.clone(),
                    admin: endpoint.admin.map(Into::into),
                })
                .collect(),
            route_count: u32::try_from(service.profile.routes().len()).unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests;
