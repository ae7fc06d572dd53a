//! Route profiles: which route a request is on, and the policy that route applies.
//!
//! A service's [`Profile`] lists [`Route`]s in order. A route matches on the request's method,
//! its path (exact, prefix, or a regular expression that must match the whole path) and its
//! header fields (exact value or regular expression, any value of the field); every condition
//! given must hold. The first route that matches is the request's route; a request that
//! matches none is on the profile's default route, named [`DEFAULT_ROUTE`], which applies the
//! default policy (Linkerd's response classes, no timeouts). A service without a profile has
//! only the default route.
//!
//! Each route carries its [`RoutePolicy`]: response classes (which responses are failures, and
//! which may be retried, for the `classification` label and success rates), [`Timeouts`] and
//! its [`RetryPolicy`]. Later issues add fault injection here, so both HTTP engines get it
//! through one lookup. Beside its routes a profile carries the service-wide settings that travel
//! with it: the circuit breaking of the service's endpoints ([`Profile::breaker`]) and the
//! authorization policy of its inbound port ([`Profile::policy`]).
//!
//! Matching reads the request through [`RequestView`], which each HTTP engine implements over
//! its own head type: nothing is copied or allocated to look a route up. Regular expressions
//! are bounded in length ([`MAX_REGEX_BYTES`]) and compiled size ([`REGEX_SIZE_LIMIT`]), and
//! match in time linear in the input (the `regex` crate's guarantee), so a profile cannot make
//! routing expensive.
//!
//! ```
//! use conduit_core::route::{Profile, RawPathMatch, RawProfile, RawRequestMatch, RawRoute, RequestView};
//!
//! struct Req(&'static str, &'static str);
//! impl RequestView for Req {
//!     fn method(&self) -> &[u8] { self.0.as_bytes() }
//!     fn path(&self) -> &[u8] { self.1.as_bytes() }
//!     fn any_header(&self, _: &http::HeaderName, _: &mut dyn FnMut(&[u8]) -> bool) -> bool {
//!         false
//!     }
//! }
//!
//! let get_item = RawRoute {
//!     name: "get-item".into(),
//!     matches: RawRequestMatch {
//!         method: Some("GET".into()),
//!         path: Some(RawPathMatch { regex: Some("/items/[0-9]+".into()), ..Default::default() }),
//!         ..Default::default()
//!     },
//!     ..Default::default()
//! };
//! let profile = Profile::try_from(RawProfile { routes: vec![get_item] }).unwrap();
//! assert_eq!(profile.find(&Req("GET", "/items/42")).name(), "get-item");
//! assert_eq!(profile.find(&Req("GET", "/items/x")).name(), "default");
//! ```

use core::fmt;
use std::collections::BTreeSet;
use std::sync::Arc;

use http::{HeaderName, Method};
use serde::Deserialize;

use crate::breaker::BreakerConfig;
use crate::classify::{Classifier, ClassifyConfig, RawClassifyConfig};
use crate::fault::{FaultPolicy, RawFault};
use crate::policy::ServerPolicy;
use crate::retry::{RawRetry, RetryPolicy};
use crate::timeout::{RawTimeouts, Timeouts};

/// The most routes one profile may list.
pub const MAX_ROUTES: usize = 500;

/// The most header conditions one route may list.
pub const MAX_HEADER_MATCHES: usize = 16;

/// The longest regular expression accepted, in bytes.
pub const MAX_REGEX_BYTES: usize = 1024;

/// The most memory one compiled regular expression may take (its program and its lazy DFA's
/// cache each): enough for any route pattern, small enough that 500 routes stay cheap.
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

/// The name of the route requests take when no route of the profile matches. Reserved: no
/// route may be given this name.
pub const DEFAULT_ROUTE: &str = "default";

/// A read-only view of a request head, implemented by each HTTP engine's head type.
pub trait RequestView {
    /// The method token (`GET`).
    fn method(&self) -> &[u8];
    /// The path, without the query (`/items/7`).
    fn path(&self) -> &[u8];
    /// Whether any value of the field `name` satisfies `matches`.
    fn any_header(&self, name: &HeaderName, matches: &mut dyn FnMut(&[u8]) -> bool) -> bool;
}

// === As written ===

/// A route profile as written.
///
/// ```yaml
/// profile:
///   routes:
///     - name: get-item
///       match:
///         method: GET
///         path: { regex: "/items/[0-9]+" }      # or exact, or prefix
///         headers:
///           - { name: x-tenant, exact: beta }  # or regex
///       timeouts: { request: 2s, attempt: 500ms }
///       retry: { max_attempts: 3, budget: { ratio: 0.2 } }   # see retry::RawRetry
///       fault: { abort: { status: 503, percent: 1 } }       # see fault::RawFault
///       response_classes:
///         http: [ { status: { min: 500 }, failure: true } ]
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawProfile {
    /// Routes, matched in order.
    pub routes: Vec<RawRoute>,
}

/// One route as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawRoute {
    /// The route's name, unique within its profile; it labels per-route metrics.
    pub name: String,
    /// What requests the route matches.
    #[serde(rename = "match")]
    pub matches: RawRequestMatch,
    /// The route's timeouts.
    pub timeouts: RawTimeouts,
    /// The route's response classes (Linkerd's defaults when absent).
    pub response_classes: RawClassifyConfig,
    /// Whether and how the route retries failed requests (absent: never, beyond resending
    /// requests no endpoint processed).
    pub retry: Option<RawRetry>,
    /// Failures injected on purpose (absent: none); see [`crate::fault`].
    pub fault: Option<RawFault>,
}

/// A route's request match as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawRequestMatch {
    /// An HTTP method; any method when absent.
    pub method: Option<String>,
    /// A path match; any path when absent.
    pub path: Option<RawPathMatch>,
    /// Header conditions, all of which must hold.
    pub headers: Vec<RawHeaderMatch>,
}

/// A path match as written: exactly one of `exact`, `prefix` or `regex`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawPathMatch {
    /// The whole path must equal this.
    pub exact: Option<String>,
    /// The path must start with this.
    pub prefix: Option<String>,
    /// The whole path must match this regular expression.
    pub regex: Option<String>,
}

/// A header condition as written: the field's name and exactly one of `exact` or `regex`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawHeaderMatch {
    /// The field name (any case).
    pub name: String,
    /// A value of the field must equal this.
    pub exact: Option<String>,
    /// A value of the field must match this regular expression, whole.
    pub regex: Option<String>,
}

// === Validated ===

/// A compiled regular expression that must match its whole input, compared by its source.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: regex::bytes::Regex,
}

impl Pattern {
    /// Compiles `source`, anchored at both ends, with ASCII semantics (paths and header values
    /// are bytes), within [`MAX_REGEX_BYTES`] and [`REGEX_SIZE_LIMIT`].
    ///
    /// # Errors
    ///
    /// A text saying why the expression is refused.
    pub fn try_new(source: &str) -> Result<Self, String> {
        if source.len() > MAX_REGEX_BYTES {
            return Err(format!(
                "regular expression of {} bytes is above the {MAX_REGEX_BYTES}-byte limit",
                source.len()
            ));
        }
        let regex = regex::bytes::RegexBuilder::new(&format!("^(?:{source})$"))
            .unicode(false)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(REGEX_SIZE_LIMIT)
            .nest_limit(64)
            .build()
            .map_err(|err| match err {
                regex::Error::CompiledTooBig(_) => {
                    format!("regular expression compiles larger than {REGEX_SIZE_LIMIT} bytes")
                }
                other => format!("invalid regular expression: {other}"),
            })?;
        Ok(Self {
            source: source.to_owned(),
            regex,
        })
    }

    /// The expression as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `input` matches whole.
    #[must_use]
    pub fn is_match(&self, input: &[u8]) -> bool {
        self.regex.is_match(input)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.source)
    }
}

/// How a route matches the request path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    /// Any path.
    Any,
    /// The path equals this string.
    Exact(String),
    /// The path starts with this string.
    Prefix(String),
    /// The whole path matches this expression.
    Regex(Pattern),
}

impl PathMatch {
    fn matches(&self, path: &[u8]) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(exact) => path == exact.as_bytes(),
            Self::Prefix(prefix) => path.starts_with(prefix.as_bytes()),
            Self::Regex(pattern) => pattern.is_match(path),
        }
    }
}

/// How a header condition matches a field value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueMatch {
    /// The value equals this.
    Exact(String),
    /// The whole value matches this expression.
    Regex(Pattern),
}

/// One header condition: some value of the field `name` matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    /// The field name (lower case).
    pub name: HeaderName,
    /// How its value must match.
    pub value: ValueMatch,
}

impl HeaderMatch {
    fn matches(&self, request: &impl RequestView) -> bool {
        request.any_header(&self.name, &mut |value| match &self.value {
            ValueMatch::Exact(exact) => value == exact.as_bytes(),
            ValueMatch::Regex(pattern) => pattern.is_match(value),
        })
    }
}

/// A route's request match: every condition given must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestMatch {
    /// The method, if any.
    pub method: Option<Method>,
    /// The path match.
    pub path: PathMatch,
    /// Header conditions.
    pub headers: Vec<HeaderMatch>,
}

impl RequestMatch {
    /// A match on method and path only.
    #[must_use]
    pub fn new(method: Option<Method>, path: PathMatch) -> Self {
        Self {
            method,
            path,
            headers: Vec::new(),
        }
    }

    /// Whether `request` satisfies every condition.
    #[must_use]
    pub fn matches(&self, request: &impl RequestView) -> bool {
        self.method
            .as_ref()
            .is_none_or(|m| m.as_str().as_bytes() == request.method())
            && self.path.matches(request.path())
            && self.headers.iter().all(|h| h.matches(request))
    }
}

/// What a route applies to its requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePolicy {
    /// Which responses are failures.
    pub classifier: Classifier,
    /// The route's timeouts.
    pub timeouts: Timeouts,
    /// The route's retries (`None`: failed requests are not retried).
    pub retry: Option<RetryPolicy>,
    /// Failures injected into the route's requests by the client's proxy (`None`: none).
    pub fault: Option<FaultPolicy>,
}

/// A validated route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The route's name (the `route` metrics label). Shared: every request on the route
    /// carries it into its metrics without copying.
    pub name: Arc<str>,
    /// Which requests it matches.
    pub matches: RequestMatch,
    /// Its policy.
    pub policy: RoutePolicy,
}

impl Route {
    /// A route with the default policy.
    #[must_use]
    pub fn new(name: &str, matches: RequestMatch) -> Self {
        Self {
            name: Arc::from(name),
            matches,
            policy: RoutePolicy::default(),
        }
    }
}

/// A service's validated route profile: its routes in match order, and the default route;
/// the circuit breaking of its endpoints; and the authorization policy of its inbound port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    routes: Vec<Route>,
    default: Route,
    breaker: BreakerConfig,
    policy: Option<ServerPolicy>,
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            default: Route::new(DEFAULT_ROUTE, RequestMatch::new(None, PathMatch::Any)),
            breaker: BreakerConfig::default(),
            policy: None,
        }
    }
}

/// The route a request is on.
#[derive(Clone, Copy, Debug)]
pub struct Matched<'a> {
    route: &'a Route,
    index: Option<usize>,
}

impl<'a> Matched<'a> {
    /// The route's name (the metrics label): [`DEFAULT_ROUTE`] when none matched.
    #[must_use]
    pub fn name(&self) -> &'a str {
        &self.route.name
    }

    /// The route.
    #[must_use]
    pub fn route(&self) -> &'a Route {
        self.route
    }

    /// Its policy.
    #[must_use]
    pub fn policy(&self) -> &'a RoutePolicy {
        &self.route.policy
    }

    /// The route's position in the profile; `None` for the default route.
    #[must_use]
    pub fn index(&self) -> Option<usize> {
        self.index
    }
}

impl Profile {
    /// A profile of `routes`, in match order.
    ///
    /// # Errors
    ///
    /// More than [`MAX_ROUTES`] routes, a duplicate or empty name, or the reserved name
    /// [`DEFAULT_ROUTE`]; the text names the route.
    pub fn try_new(routes: Vec<Route>) -> Result<Self, String> {
        if routes.len() > MAX_ROUTES {
            return Err(format!("at most {MAX_ROUTES} routes"));
        }
        let mut names = BTreeSet::new();
        for (i, route) in routes.iter().enumerate() {
            check_route_name(&route.name)
                .map_err(|reason| format!("routes[{i}].name: {reason}"))?;
            if !names.insert(&*route.name) {
                return Err(format!(
                    "routes[{i}].name: duplicate route name `{}`",
                    route.name
                ));
            }
        }
        Ok(Self {
            routes,
            default: Self::default().default,
            breaker: BreakerConfig::default(),
            policy: None,
        })
    }

    /// The routes, in match order (the default route is not among them).
    #[must_use]
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Whether the profile has no routes of its own (whatever its circuit breaking and policy).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The circuit breaking of the service's endpoints (the defaults unless set).
    #[must_use]
    pub fn breaker(&self) -> &BreakerConfig {
        &self.breaker
    }

    /// The profile with `breaker` as its circuit breaking.
    #[must_use]
    pub fn with_breaker(self, breaker: BreakerConfig) -> Self {
        Self { breaker, ..self }
    }

    /// The authorization policy of the service's inbound port; `None` when none is set, which
    /// admits every client (as [`ServerPolicy::default`], `all-unauthenticated`, does).
    #[must_use]
    pub fn policy(&self) -> Option<&ServerPolicy> {
        self.policy.as_ref()
    }

    /// The profile with `policy` as its inbound authorization policy.
    #[must_use]
    pub fn with_policy(self, policy: Option<ServerPolicy>) -> Self {
        Self { policy, ..self }
    }

    /// The default route.
    #[must_use]
    pub fn default_route(&self) -> &Route {
        &self.default
    }

    /// The route at `index` as [`Matched::index`] gave it (`None`: the default route; an index
    /// past the routes is the default route too).
    #[must_use]
    pub fn route_at(&self, index: Option<usize>) -> &Route {
        index
            .and_then(|i| self.routes.get(i))
            .unwrap_or(&self.default)
    }

    /// The route `request` is on: the first that matches, else the default route. Total: every
    /// request is on exactly one route.
    #[must_use]
    pub fn find(&self, request: &impl RequestView) -> Matched<'_> {
        match self
            .routes
            .iter()
            .position(|route| route.matches.matches(request))
        {
            Some(index) => Matched {
                route: &self.routes[index],
                index: Some(index),
            },
            None => Matched {
                route: &self.default,
                index: None,
            },
        }
    }

    /// Every route name a request can be counted under: the routes' and [`DEFAULT_ROUTE`].
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .map(|r| &*r.name)
            .chain(core::iter::once(DEFAULT_ROUTE))
    }
}

/// Checks a route name: 1 to 128 bytes of visible ASCII, not [`DEFAULT_ROUTE`].
///
/// # Errors
///
/// A text saying what is wrong.
pub fn check_route_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("missing".into());
    }
    if name.len() > 128 || !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "`{}` must be 1 to 128 visible ASCII characters",
            name.chars().take(64).collect::<String>()
        ));
    }
    if name == DEFAULT_ROUTE {
        return Err(format!(
            "`{DEFAULT_ROUTE}` is reserved for requests no route matches"
        ));
    }
    Ok(())
}

/// Why a route profile was rejected: every problem, each with the path of its field relative
/// to the profile (`routes[2].match.path.regex`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .errors.iter().map(|(p, r)| format!("{p}: {r}")).collect::<Vec<_>>().join("; "))]
pub struct InvalidProfile {
    /// `(field path, reason)` pairs, in order. Never empty.
    pub errors: Vec<(String, String)>,
}

impl TryFrom<RawProfile> for Profile {
    type Error = InvalidProfile;

    fn try_from(raw: RawProfile) -> Result<Self, InvalidProfile> {
        let mut errors = Vec::new();
        if raw.routes.len() > MAX_ROUTES {
            errors.push(("routes".into(), format!("at most {MAX_ROUTES} routes")));
        }
        let mut names = BTreeSet::new();
        let mut routes = Vec::with_capacity(raw.routes.len());
        for (i, raw_route) in raw.routes.into_iter().enumerate() {
            let path = format!("routes[{i}]");
            let before = errors.len();
            if let Err(reason) = check_route_name(&raw_route.name) {
                errors.push((format!("{path}.name"), reason));
            } else if !names.insert(raw_route.name.clone()) {
                errors.push((
                    format!("{path}.name"),
                    format!("duplicate route name `{}`", raw_route.name),
                ));
            }
            let matches = request_match(&path, raw_route.matches, &mut errors);
            let timeouts = Timeouts::try_from(raw_route.timeouts)
                .map_err(|e| errors.push((format!("{path}.timeouts.{}", e.field), e.problem)))
                .ok();
            let classes = ClassifyConfig::try_from(raw_route.response_classes)
                .map_err(|e| {
                    errors.push((
                        format!("{path}.response_classes.{}", e.field),
                        e.problem.to_string(),
                    ));
                })
                .ok();
            let retry = raw_route
                .retry
                .map(|raw| {
                    RetryPolicy::try_from(raw)
                        .map_err(|e| errors.push((format!("{path}.retry.{}", e.field), e.problem)))
                })
                .transpose();
            let fault = raw_route
                .fault
                .map(|raw| {
                    FaultPolicy::try_from(raw)
                        .map_err(|e| errors.push((format!("{path}.fault.{}", e.field), e.problem)))
                })
                .transpose();
            if let (true, Some(timeouts), Some(classes), Ok(retry), Ok(fault)) =
                (errors.len() == before, timeouts, classes, retry, fault)
            {
                routes.push(Route {
                    name: Arc::from(raw_route.name),
                    matches,
                    policy: RoutePolicy {
                        classifier: Classifier::new(&classes),
                        timeouts,
                        retry,
                        fault,
                    },
                });
            }
        }
        if errors.is_empty() {
            Ok(Self {
                routes,
                default: Self::default().default,
                breaker: BreakerConfig::default(),
                policy: None,
            })
        } else {
            Err(InvalidProfile { errors })
        }
    }
}

fn request_match(
    path: &str,
    raw: RawRequestMatch,
    errors: &mut Vec<(String, String)>,
) -> RequestMatch {
    let method = raw.method.as_deref().and_then(|m| {
        Method::from_bytes(m.as_bytes())
            .map_err(|_| {
                errors.push((
                    format!("{path}.match.method"),
                    format!("`{m}` is not an HTTP method"),
                ));
            })
            .ok()
    });
    let path_match = match raw.path {
        None => PathMatch::Any,
        Some(RawPathMatch {
            exact: Some(p),
            prefix: None,
            regex: None,
        }) => {
            check_path(&format!("{path}.match.path.exact"), &p, errors);
            PathMatch::Exact(p)
        }
        Some(RawPathMatch {
            exact: None,
            prefix: Some(p),
            regex: None,
        }) => {
            check_path(&format!("{path}.match.path.prefix"), &p, errors);
            PathMatch::Prefix(p)
        }
        Some(RawPathMatch {
            exact: None,
            prefix: None,
            regex: Some(r),
        }) => match Pattern::try_new(&r) {
            Ok(pattern) => PathMatch::Regex(pattern),
            Err(reason) => {
                errors.push((format!("{path}.match.path.regex"), reason));
                PathMatch::Any
            }
        },
        Some(_) => {
            errors.push((
                format!("{path}.match.path"),
                "give exactly one of `exact`, `prefix` or `regex`".into(),
            ));
            PathMatch::Any
        }
    };
    if raw.headers.len() > MAX_HEADER_MATCHES {
        errors.push((
            format!("{path}.match.headers"),
            format!("at most {MAX_HEADER_MATCHES} header conditions"),
        ));
    }
    let mut headers = Vec::with_capacity(raw.headers.len());
    for (i, raw_header) in raw.headers.into_iter().enumerate() {
        let field = format!("{path}.match.headers[{i}]");
        match header_match(raw_header) {
            Ok(header) => headers.push(header),
            Err((sub, reason)) => errors.push((format!("{field}{sub}"), reason)),
        }
    }
    RequestMatch {
        method,
        path: path_match,
        headers,
    }
}

/// Validates one header condition; the error's first part is the sub-field (`.name`).
///
/// # Errors
///
/// An invalid field name, or not exactly one of `exact` and `regex`, or a bad expression.
pub fn header_match(raw: RawHeaderMatch) -> Result<HeaderMatch, (&'static str, String)> {
    let name = HeaderName::from_bytes(raw.name.as_bytes()).map_err(|_| {
        (
            ".name",
            format!(
                "`{}` is not a header field name",
                raw.name.chars().take(64).collect::<String>()
            ),
        )
    })?;
    let value = match (raw.exact, raw.regex) {
        (Some(exact), None) => ValueMatch::Exact(exact),
        (None, Some(regex)) => {
            ValueMatch::Regex(Pattern::try_new(&regex).map_err(|r| (".regex", r))?)
        }
        _ => return Err(("", "give exactly one of `exact` or `regex`".into())),
    };
    Ok(HeaderMatch { name, value })
}

fn check_path(field: &str, value: &str, errors: &mut Vec<(String, String)>) {
    if !value.starts_with('/') {
        errors.push((field.to_owned(), format!("`{value}` must start with `/`")));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A request as plain data.
    #[derive(Debug, Clone)]
    struct Req {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
    }

    impl RequestView for Req {
        fn method(&self) -> &[u8] {
            self.method.as_bytes()
        }
        fn path(&self) -> &[u8] {
            self.path.as_bytes()
        }
        fn any_header(&self, name: &HeaderName, matches: &mut dyn FnMut(&[u8]) -> bool) -> bool {
            self.headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
                .any(|(_, v)| matches(v.as_bytes()))
        }
    }

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Req {
        Req {
            method: method.into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn profile(yaml_like: Vec<RawRoute>) -> Profile {
        Profile::try_from(RawProfile { routes: yaml_like }).unwrap()
    }

    fn route(name: &str, method: Option<&str>, path: RawPathMatch) -> RawRoute {
        RawRoute {
            name: name.into(),
            matches: RawRequestMatch {
                method: method.map(Into::into),
                path: Some(path),
                headers: Vec::new(),
            },
            ..RawRoute::default()
        }
    }

    fn prefix(p: &str) -> RawPathMatch {
        RawPathMatch {
            prefix: Some(p.into()),
            ..RawPathMatch::default()
        }
    }

    #[test]
    fn method_path_and_headers_select_the_first_matching_route() {
        let mut canary = route("canary", None, prefix("/"));
        canary.matches.headers.push(RawHeaderMatch {
            name: "X-Canary".into(),
            regex: Some("yes|true".into()),
            ..RawHeaderMatch::default()
        });
        let p = profile(vec![
            canary,
            route(
                "item",
                Some("GET"),
                RawPathMatch {
                    regex: Some("/items/[0-9]+".into()),
                    ..RawPathMatch::default()
                },
            ),
            route(
                "list",
                Some("GET"),
                RawPathMatch {
                    exact: Some("/items".into()),
                    ..RawPathMatch::default()
                },
            ),
            route("any-items", None, prefix("/items")),
        ]);
        let on = |r: &Req| p.find(r).name().to_owned();
        assert_eq!(on(&req("GET", "/items/42", &[])), "item");
        assert_eq!(
            on(&req("GET", "/items/42/x", &[])),
            "any-items",
            "regex is anchored"
        );
        assert_eq!(on(&req("GET", "/items", &[])), "list");
        assert_eq!(on(&req("POST", "/items", &[])), "any-items");
        assert_eq!(on(&req("GET", "/other", &[])), DEFAULT_ROUTE);
        assert_eq!(
            on(&req("GET", "/items/1", &[("x-canary", "true")])),
            "canary"
        );
        assert_eq!(
            on(&req(
                "GET",
                "/items/1",
                &[("x-canary", "no"), ("X-CANARY", "yes")]
            )),
            "canary",
            "any value of the field"
        );
        assert_eq!(
            on(&req("GET", "/items/1", &[("x-canary", "truex")])),
            "item"
        );
        assert_eq!(p.find(&req("GET", "/other", &[])).index(), None);
    }

    #[test]
    fn invalid_routes_name_their_fields() {
        let raw = RawProfile {
            routes: vec![
                route("a", Some("G ET"), prefix("items")),
                route(DEFAULT_ROUTE, None, prefix("/")),
                route(
                    "b",
                    None,
                    RawPathMatch {
                        regex: Some("(".into()),
                        ..RawPathMatch::default()
                    },
                ),
                route(
                    "c",
                    None,
                    RawPathMatch {
                        regex: Some("a{1000}{1000}".into()),
                        ..RawPathMatch::default()
                    },
                ),
                route("b", None, RawPathMatch::default()),
                RawRoute {
                    name: "d".into(),
                    timeouts: RawTimeouts {
                        request: Some("0s".into()),
                        attempt: None,
                    },
                    ..RawRoute::default()
                },
            ],
        };
        let err = Profile::try_from(raw).unwrap_err();
        let paths: Vec<&str> = err.errors.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[0].match.method",
                "routes[0].match.path.prefix",
                "routes[1].name",
                "routes[2].match.path.regex",
                "routes[3].match.path.regex",
                "routes[4].name",
                "routes[4].match.path",
                "routes[5].timeouts.request",
            ],
            "{err}"
        );
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn a_regex_past_the_length_bound_is_refused() {
        let long = "a".repeat(MAX_REGEX_BYTES + 1);
        assert!(Pattern::try_new(&long).unwrap_err().contains("limit"));
        assert!(Pattern::try_new(&"a".repeat(MAX_REGEX_BYTES)).is_ok());
    }

    fn arb_req() -> impl Strategy<Value = Req> {
        (
            prop::sample::select(vec!["GET", "POST", "PUT"]),
            "/[a-c]{0,3}(/[a-c0-9]{0,3}){0,2}",
            prop::option::of(prop::sample::select(vec!["x", "y", "z"])),
        )
            .prop_map(|(m, path, h)| Req {
                method: m.into(),
                path,
                headers: h
                    .map(|v| vec![("x-h".into(), v.into())])
                    .unwrap_or_default(),
            })
    }

    fn arb_route(i: usize) -> impl Strategy<Value = RawRoute> {
        (
            prop::option::of(prop::sample::select(vec!["GET", "POST"])),
            prop::option::of(prop_oneof![
                "/[a-c]{0,2}".prop_map(|p| RawPathMatch {
                    exact: Some(p),
                    ..Default::default()
                }),
                "/[a-c]{0,2}".prop_map(|p| RawPathMatch {
                    prefix: Some(p),
                    ..Default::default()
                }),
                "/[a-c]\\.\\*".prop_map(|p| RawPathMatch {
                    regex: Some(p),
                    ..Default::default()
                }),
            ]),
            prop::option::of(prop::sample::select(vec!["x", "y"])),
        )
            .prop_map(move |(method, path, header)| RawRoute {
                name: format!("r{i}"),
                matches: RawRequestMatch {
                    method: method.map(Into::into),
                    path,
                    headers: header
                        .map(|v| {
                            vec![RawHeaderMatch {
                                name: "x-h".into(),
                                exact: Some(v.into()),
                                regex: None,
                            }]
                        })
                        .unwrap_or_default(),
                },
                ..RawRoute::default()
            })
    }

    fn arb_profile() -> impl Strategy<Value = Profile> {
        (0usize..8)
            .prop_flat_map(|n| (0..n).map(arb_route).collect::<Vec<_>>())
            .prop_map(|routes| Profile::try_from(RawProfile { routes }).unwrap())
    }

    proptest! {
        /// The route found is the first that matches, and a request matching none is on the
        /// default route: lookup is total and agrees with a plain scan.
        #[test]
        fn the_first_match_wins_and_the_rest_get_the_default(
            profile in arb_profile(),
            request in arb_req(),
        ) {
            let found = profile.find(&request);
            let first = profile.routes().iter().position(|r| r.matches.matches(&request));
            prop_assert_eq!(found.index(), first);
            match first {
                Some(i) => {
                    prop_assert_eq!(found.name(), &*profile.routes()[i].name);
                    for earlier in &profile.routes()[..i] {
                        prop_assert!(!earlier.matches.matches(&request));
                    }
                }
                None => prop_assert_eq!(found.name(), DEFAULT_ROUTE),
            }
            prop_assert!(profile.route_names().any(|n| n == found.name()));
        }

        /// Expressions are refused past the length bound whatever they say, and accepted
        /// expressions never match anything but whole inputs.
        #[test]
        fn regexes_are_bounded_and_anchored(source in "[a-z.*+?|()]{0,40}", input in "[a-z]{0,20}") {
            if let Ok(pattern) = Pattern::try_new(&source) {
                let whole = regex::bytes::Regex::new(&format!("^(?:{source})$")).unwrap();
                prop_assert_eq!(pattern.is_match(input.as_bytes()), whole.is_match(input.as_bytes()));
            }
            let long = format!("{source}{}", "a".repeat(MAX_REGEX_BYTES + 1));
            prop_assert!(Pattern::try_new(&long).is_err());
        }
    }
}
