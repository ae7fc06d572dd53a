//! Response classes: whether a response counts as a success or a failure, and whether its kind
//! may be retried.
//!
//! The semantics are Linkerd's (ServiceProfile `responseClasses`, proxy `classify.rs`):
//!
//! - a response whose `content-type` is `application/grpc` (or `application/grpc+proto`,
//!   `application/grpc;...`) is a gRPC response, classified by its `grpc-status`: `0` (OK) is
//!   a success, anything else a failure. The status is read from the response headers when
//!   present (a *trailers-only* response) and otherwise from the trailers at the end of the
//!   stream; a gRPC stream that ends without a status, or with one that is not a decimal
//!   number, is a failure;
//! - any other response is classified by its HTTP status: 5xx is a failure, everything else a
//!   success;
//! - a transport error ([`TransportError`]) is a failure.
//!
//! A [`ClassifyConfig`] adds ordered rules that override these defaults for chosen HTTP status
//! ranges and gRPC codes: the first matching rule wins, and statuses no rule matches keep the
//! defaults.
//!
//! A class also says whether its *kind* of response may be retried ([`Class::retryable`]).
//! That is only the response's half of the decision: the retry policy still decides whether
//! the request may be replayed (its method, its buffered body, the budget). Defaults are
//! [`DEFAULT_RETRYABLE_HTTP_STATUSES`], [`DEFAULT_RETRYABLE_GRPC_CODES`] and
//! [`TransportError::is_retryable`].
//!
//! # Drive loop
//!
//! A [`Classifier`] is immutable and shared by every request on a route. For each response:
//!
//! 1. when the response head arrives, call [`Classifier::classify_response`]. It returns
//!    [`ResponseClass::Final`] when the head decides the class, or
//!    [`ResponseClass::Pending`] for a gRPC response whose status will come in the trailers;
//! 2. for a pending class, call [`Classifier::classify_eos`] with the trailers (or `None`)
//!    when the stream ends. [`PendingEos`] cannot be built, cloned or copied by callers, and
//!    finishing consumes it, so a pending response is classified at most once;
//! 3. if the stream fails instead (before the head, or while the body streams), the class is
//!    [`Classifier::classify_error`]'s, which supersedes any class from the head.
//!
//! ```
//! use conduit_core::classify::{
//!     ClassifyConfig, Classifier, GrpcCode, Outcome, Reason, ResponseClass, TransportError,
//! };
//! use http::{HeaderMap, HeaderValue, StatusCode};
//!
//! let classifier = Classifier::new(&ClassifyConfig::default());
//!
//! // Plain HTTP: decided by the head.
//! let ResponseClass::Final(class) =
//!     classifier.classify_response(StatusCode::SERVICE_UNAVAILABLE, &HeaderMap::new())
//! else {
//!     panic!("an HTTP response is classified at its head");
//! };
//! assert_eq!(class.outcome, Outcome::Failure);
//! assert!(class.retryable);
//!
//! // gRPC with the status in the trailers: decided at the end of the stream.
//! let mut headers = HeaderMap::new();
//! headers.insert("content-type", HeaderValue::from_static("application/grpc"));
//! let ResponseClass::Pending(pending) = classifier.classify_response(StatusCode::OK, &headers)
//! else {
//!     panic!("a gRPC response without grpc-status in its head waits for trailers");
//! };
//! let mut trailers = HeaderMap::new();
//! trailers.insert("grpc-status", HeaderValue::from_static("14"));
//! let class = classifier.classify_eos(pending, Some(&trailers));
//! assert_eq!(class.reason, Reason::GrpcStatus(GrpcCode::Unavailable));
//! assert!(class.is_failure() && class.retryable);
//!
//! // Transport errors are failures.
//! assert!(classifier.classify_error(TransportError::Reset).is_failure());
//! ```

use core::fmt;

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;

/// Whether a response counts as a success or a failure: the `classification` label of
/// Linkerd's `response_total` and the input to success rates and failure accrual.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// The response counts as a success.
    Success,
    /// The response counts as a failure.
    Failure,
}

impl Outcome {
    /// The label value Linkerd uses: `"success"` or `"failure"`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The class of one response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Class {
    /// Success or failure, for metrics, success rates and failure accrual.
    pub outcome: Outcome,
    /// Whether this kind of response may be retried. A success may be retryable too when a
    /// rule says so (for example, to retry a `429` the service does not count as failing).
    pub retryable: bool,
    /// What decided the class; the source of the status or error metric labels.
    pub reason: Reason,
}

impl Class {
    /// True if the outcome is [`Outcome::Success`].
    #[must_use]
    pub const fn is_success(&self) -> bool {
        matches!(self.outcome, Outcome::Success)
    }

    /// True if the outcome is [`Outcome::Failure`].
    #[must_use]
    pub const fn is_failure(&self) -> bool {
        matches!(self.outcome, Outcome::Failure)
    }
}

/// What decided a [`Class`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// The HTTP status of a response that is not gRPC.
    HttpStatus(StatusCode),
    /// The `grpc-status` of a gRPC response, from its head or its trailers. When a gRPC
    /// response carries no `grpc-status` and its HTTP status is not `200`, this is the code a
    /// gRPC client derives from that HTTP status (gRPC's `http-grpc-status-mapping.md`).
    GrpcStatus(GrpcCode),
    /// A gRPC response whose stream ended without a `grpc-status`.
    GrpcStatusMissing,
    /// A gRPC response whose `grpc-status` was not a decimal number.
    GrpcStatusMalformed,
    /// The request or response failed in transport.
    Transport(TransportError),
}

/// Ways a request can fail below HTTP, each a failure.
///
/// Each kind says whether it is retryable by default ([`is_retryable`](Self::is_retryable)):
/// yes when the server provably did no work or the attempt merely ran out of time, no when a
/// retry could repeat work the server already did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum TransportError {
    /// No connection could be established (refused, unreachable, or connect timed out); the
    /// request was never sent. Retryable.
    ConnectRefused,
    /// The server refused the stream before processing it (HTTP/2 `REFUSED_STREAM`, or a
    /// `GOAWAY` that excludes it). Retryable: the protocol guarantees no work was done (Linkerd
    /// retries these too).
    StreamRefused,
    /// No response arrived within the attempt's timeout. Retryable, as Linkerd retries
    /// per-try timeouts; the retry policy's idempotency check guards unsafe requests.
    Timeout,
    /// The connection or stream was reset after the request was sent. Not retryable: the
    /// server may have acted on it.
    Reset,
    /// The peer violated the protocol (a malformed response, an HTTP/2 protocol error). Not
    /// retryable: the same peer is likely to do it again.
    Protocol,
}

impl TransportError {
    /// Whether a request that failed this way may be retried, by default.
    #[must_use]
    pub const fn is_retryable(self) -> bool {
        match self {
            Self::ConnectRefused | Self::StreamRefused | Self::Timeout => true,
            Self::Reset | Self::Protocol => false,
        }
    }

    /// A stable name for the `error` metric label.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ConnectRefused => "connect_refused",
            Self::StreamRefused => "stream_refused",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Protocol => "protocol",
        }
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A gRPC status code: the 17 codes of the gRPC specification (`doc/statuscodes.md`).
///
/// The set is complete by definition: the specification tells clients to treat any other
/// number as `UNKNOWN`, which is what [`from_header_value`](Self::from_header_value) does.
/// That also keeps the `grpc_status` metric label to 17 values whatever a server sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum GrpcCode {
    /// `0 OK`: not an error.
    Ok = 0,
    /// `1 CANCELLED`: the operation was cancelled, typically by the caller.
    Cancelled = 1,
    /// `2 UNKNOWN`: an unknown error, or a status from an unknown error space.
    Unknown = 2,
    /// `3 INVALID_ARGUMENT`: the client sent an invalid argument.
    InvalidArgument = 3,
    /// `4 DEADLINE_EXCEEDED`: the deadline expired before the operation completed.
    DeadlineExceeded = 4,
    /// `5 NOT_FOUND`: a requested entity was not found.
    NotFound = 5,
    /// `6 ALREADY_EXISTS`: the entity the client tried to create already exists.
    AlreadyExists = 6,
    /// `7 PERMISSION_DENIED`: the caller may not perform the operation.
    PermissionDenied = 7,
    /// `8 RESOURCE_EXHAUSTED`: a resource (a quota, disk space) ran out.
    ResourceExhausted = 8,
    /// `9 FAILED_PRECONDITION`: the system is not in a state the operation requires.
    FailedPrecondition = 9,
    /// `10 ABORTED`: the operation was aborted, typically by a concurrency conflict.
    Aborted = 10,
    /// `11 OUT_OF_RANGE`: the operation went past the valid range.
    OutOfRange = 11,
    /// `12 UNIMPLEMENTED`: the operation is not implemented or supported.
    Unimplemented = 12,
    /// `13 INTERNAL`: an invariant of the underlying system broke.
    Internal = 13,
    /// `14 UNAVAILABLE`: the service is currently unavailable; usually transient.
    Unavailable = 14,
    /// `15 DATA_LOSS`: unrecoverable data loss or corruption.
    DataLoss = 15,
    /// `16 UNAUTHENTICATED`: the request lacks valid authentication credentials.
    Unauthenticated = 16,
}

impl GrpcCode {
    /// All codes, in numeric order.
    pub const ALL: [Self; 17] = [
        Self::Ok,
        Self::Cancelled,
        Self::Unknown,
        Self::InvalidArgument,
        Self::DeadlineExceeded,
        Self::NotFound,
        Self::AlreadyExists,
        Self::PermissionDenied,
        Self::ResourceExhausted,
        Self::FailedPrecondition,
        Self::Aborted,
        Self::OutOfRange,
        Self::Unimplemented,
        Self::Internal,
        Self::Unavailable,
        Self::DataLoss,
        Self::Unauthenticated,
    ];

    /// The code with number `code`, or `None` if the specification defines none.
    #[must_use]
    pub fn from_u32(code: u32) -> Option<Self> {
        usize::try_from(code)
            .ok()
            .and_then(|index| Self::ALL.get(index).copied())
    }

    /// The code's number, as sent in `grpc-status`.
    #[must_use]
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// The specification's name, such as `"UNAVAILABLE"`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ok => "OK",
            Self::Cancelled => "CANCELLED",
            Self::Unknown => "UNKNOWN",
            Self::InvalidArgument => "INVALID_ARGUMENT",
            Self::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Self::FailedPrecondition => "FAILED_PRECONDITION",
            Self::Aborted => "ABORTED",
            Self::OutOfRange => "OUT_OF_RANGE",
            Self::Unimplemented => "UNIMPLEMENTED",
            Self::Internal => "INTERNAL",
            Self::Unavailable => "UNAVAILABLE",
            Self::DataLoss => "DATA_LOSS",
            Self::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The code named `name`, ignoring ASCII case and accepting `-` for `_`, so that
    /// `UNAVAILABLE`, `unavailable` and Linkerd's annotation style `deadline-exceeded` all
    /// parse.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        let same = |candidate: &str| {
            candidate.len() == name.len()
                && candidate.bytes().zip(name.bytes()).all(|(c, n)| {
                    let n = if n == b'-' {
                        b'_'
                    } else {
                        n.to_ascii_uppercase()
                    };
                    c == n
                })
        };
        Self::ALL.into_iter().find(|code| same(code.name()))
    }

    /// The code a `grpc-status` value carries, or `None` if the value is not a decimal
    /// number. Numbers the specification does not define are [`GrpcCode::Unknown`], as it
    /// tells clients to treat them.
    #[must_use]
    pub fn from_header_value(value: &HeaderValue) -> Option<Self> {
        Self::from_bytes(value.as_bytes())
    }

    /// [`from_header_value`](Self::from_header_value) for a value as raw bytes (an HTTP/1
    /// head's field, not yet a [`HeaderValue`]).
    #[must_use]
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let number = bytes.iter().fold(0u32, |n, digit| {
            n.saturating_mul(10).saturating_add(u32::from(digit - b'0'))
        });
        Some(Self::from_u32(number).unwrap_or(Self::Unknown))
    }

    /// The code a gRPC client reports for a response with HTTP status `status` and no
    /// `grpc-status` (gRPC's `doc/http-grpc-status-mapping.md`).
    #[must_use]
    pub fn from_http_status(status: StatusCode) -> Self {
        match status.as_u16() {
            400 => Self::Internal,
            401 => Self::Unauthenticated,
            403 => Self::PermissionDenied,
            404 => Self::Unimplemented,
            429 | 502 | 503 | 504 => Self::Unavailable,
            _ => Self::Unknown,
        }
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// HTTP statuses retryable unless a rule says otherwise: `500`, `502`, `503` and `504`.
///
/// These are the server-side failures that are commonly transient: an internal error (often a
/// crashed or overloaded worker), and the gateway and availability errors that proxies,
/// including ours, return when an upstream is down or slow. Linkerd users usually write
/// `retry.linkerd.io/http: 5xx`; of that class we leave out the statuses a retry cannot fix
/// (`501 Not Implemented`, `505 HTTP Version Not Supported`, `507`, `508`, `511`, ...). `429`
/// is neither a failure nor retryable by default: retrying it without honouring `Retry-After`
/// adds load to a service that asked for less. A rule can opt any status in or out.
pub const DEFAULT_RETRYABLE_HTTP_STATUSES: [StatusCode; 4] = [
    StatusCode::INTERNAL_SERVER_ERROR,
    StatusCode::BAD_GATEWAY,
    StatusCode::SERVICE_UNAVAILABLE,
    StatusCode::GATEWAY_TIMEOUT,
];

/// gRPC codes retryable unless a rule says otherwise: `CANCELLED`, `DEADLINE_EXCEEDED`,
/// `RESOURCE_EXHAUSTED`, `INTERNAL` and `UNAVAILABLE`.
///
/// This is the list Linkerd documents for its `retry.linkerd.io/grpc` annotation and the set
/// of gRPC conditions Envoy's `retry_on` accepts, so users coming from either see the same
/// behaviour. The other codes describe the request itself (`INVALID_ARGUMENT`, `NOT_FOUND`,
/// `PERMISSION_DENIED`, ...) and would fail again.
pub const DEFAULT_RETRYABLE_GRPC_CODES: [GrpcCode; 5] = [
    GrpcCode::Cancelled,
    GrpcCode::DeadlineExceeded,
    GrpcCode::ResourceExhausted,
    GrpcCode::Internal,
    GrpcCode::Unavailable,
];

/// The most rules of each kind (HTTP, gRPC) a [`ClassifyConfig`] may hold. Real profiles carry
/// a handful; the bound caps the linear scan every response pays.
pub const MAX_RULES: usize = 64;

/// The `grpc-status` header and trailer.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Serde form of [`ClassifyConfig`], as written in the mesh file and CRDs.
///
/// ```yaml
/// http:
///   - status: { min: 500, max: 599 }   # min defaults to 100, max to 599
///     failure: true                    # required
///     retryable: false                 # default false
///   - status: { min: 429, max: 429 }
///     failure: false
///     retryable: true
/// grpc:
///   - code: unavailable                # a name (any case, - or _) or a number 0..=16
///     failure: true
///     retryable: true
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawClassifyConfig {
    /// HTTP status rules, in priority order.
    pub http: Vec<RawHttpRule>,
    /// gRPC status rules, in priority order.
    pub grpc: Vec<RawGrpcRule>,
}

/// Serde form of [`HttpRule`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawHttpRule {
    /// The statuses the rule matches. Required.
    pub status: Option<RawStatusRange>,
    /// Whether matching responses are failures. Required, so that a rule written only to
    /// make a status retryable cannot silently turn a failure into a success.
    pub failure: Option<bool>,
    /// Whether matching responses may be retried. Defaults to `false`.
    pub retryable: bool,
}

/// Serde form of [`StatusRange`].
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawStatusRange {
    /// The lowest matching status. Defaults to `100`.
    pub min: u16,
    /// The highest matching status. Defaults to `599`.
    pub max: u16,
}

impl Default for RawStatusRange {
    /// `100..=599`: every status HTTP defines, so `{min: 500}` reads "5xx".
    fn default() -> Self {
        Self { min: 100, max: 599 }
    }
}

/// Serde form of [`GrpcRule`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema, serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct RawGrpcRule {
    /// The code the rule matches. Required.
    pub code: Option<RawGrpcCode>,
    /// Whether matching responses are failures. Required (see [`RawHttpRule::failure`]).
    pub failure: Option<bool>,
    /// Whether matching responses may be retried. Defaults to `false`.
    pub retryable: bool,
}

/// A gRPC code as written in configuration: its number or its name.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[cfg_attr(feature = "schema", derive(serde::Serialize))]
#[serde(untagged)]
pub enum RawGrpcCode {
    /// A number, `0..=16`.
    Number(u64),
    /// A name such as `UNAVAILABLE` or `deadline-exceeded` (see [`GrpcCode::from_name`]).
    Name(String),
}

/// A number or a name: in a Kubernetes schema that is `x-kubernetes-int-or-string` (a
/// structural schema allows no `anyOf` of two types).
#[cfg(feature = "schema")]
impl schemars::JsonSchema for RawGrpcCode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GrpcCode".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A gRPC code: its number (0-16) or its name (UNAVAILABLE, deadline-exceeded).",
            "x-kubernetes-int-or-string": true,
        })
    }
}

/// Why a response-class configuration was rejected, naming the field at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidClassify {
    /// The path of the offending field, such as `http[2].status.min`.
    pub field: String,
    /// What is wrong with it.
    pub problem: ClassifyProblem,
}

impl InvalidClassify {
    fn new(field: impl Into<String>, problem: ClassifyProblem) -> Self {
        Self {
            field: field.into(),
            problem,
        }
    }

    /// The same error for a field nested under `parent` (`http[2]` + `status` ->
    /// `http[2].status`).
    fn within(mut self, parent: &str) -> Self {
        self.field = format!("{parent}.{}", self.field);
        self
    }
}

/// What is wrong with a field of a response-class configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClassifyProblem {
    /// A required field is absent.
    #[error("required")]
    Missing,
    /// A status bound is not a valid HTTP status.
    #[error("{value} is not an HTTP status code (100..=999)")]
    NotAStatus {
        /// The value given.
        value: u16,
    },
    /// A status range's maximum is below its minimum.
    #[error("{max} is below min {min}")]
    InvertedRange {
        /// The minimum given.
        min: u16,
        /// The maximum given.
        max: u16,
    },
    /// A gRPC code is neither a defined number nor a defined name.
    #[error("`{value}` is not a gRPC status code (0..=16, or a name such as `unavailable`)")]
    NotAGrpcCode {
        /// The value given, as written.
        value: String,
    },
    /// A rule list is longer than [`MAX_RULES`].
    #[error("{count} rules exceed the limit of {max}")]
    TooManyRules {
        /// The number of rules given.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// A non-empty, inclusive range of HTTP statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StatusRange {
    min: StatusCode,
    max: StatusCode,
}

impl StatusRange {
    /// The statuses `min..=max`.
    ///
    /// # Errors
    ///
    /// If either bound is not a valid status (`100..=999`), naming `min` or `max`, or if
    /// `max < min`, naming `max`.
    pub fn try_new(min: u16, max: u16) -> Result<Self, InvalidClassify> {
        let bound = |field: &str, value: u16| {
            StatusCode::from_u16(value)
                .map_err(|_| InvalidClassify::new(field, ClassifyProblem::NotAStatus { value }))
        };
        let (min_status, max_status) = (bound("min", min)?, bound("max", max)?);
        if min_status > max_status {
            return Err(InvalidClassify::new(
                "max",
                ClassifyProblem::InvertedRange { min, max },
            ));
        }
        Ok(Self {
            min: min_status,
            max: max_status,
        })
    }

    /// The range holding only `status`.
    #[must_use]
    pub const fn single(status: StatusCode) -> Self {
        Self {
            min: status,
            max: status,
        }
    }

    /// The lowest status in the range.
    #[must_use]
    pub const fn min(&self) -> StatusCode {
        self.min
    }

    /// The highest status in the range.
    #[must_use]
    pub const fn max(&self) -> StatusCode {
        self.max
    }

    /// True if `status` is in the range.
    #[must_use]
    pub fn contains(&self, status: StatusCode) -> bool {
        self.min <= status && status <= self.max
    }
}

/// A rule classifying the HTTP statuses in a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HttpRule {
    /// The statuses the rule matches.
    pub statuses: StatusRange,
    /// The outcome of a matching response.
    pub outcome: Outcome,
    /// Whether a matching response may be retried.
    pub retryable: bool,
}

/// A rule classifying one gRPC status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrpcRule {
    /// The code the rule matches.
    pub code: GrpcCode,
    /// The outcome of a matching response.
    pub outcome: Outcome,
    /// Whether a matching response may be retried.
    pub retryable: bool,
}

/// Validated response-class rules. The default has no rules, so Linkerd's defaults apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassifyConfig {
    http: Vec<HttpRule>,
    grpc: Vec<GrpcRule>,
}

impl ClassifyConfig {
    /// Rules in priority order: for each response the first matching rule of its kind wins.
    ///
    /// # Errors
    ///
    /// If either list holds more than [`MAX_RULES`] rules.
    pub fn try_new(http: Vec<HttpRule>, grpc: Vec<GrpcRule>) -> Result<Self, InvalidClassify> {
        for (field, count) in [("http", http.len()), ("grpc", grpc.len())] {
            if count > MAX_RULES {
                let problem = ClassifyProblem::TooManyRules {
                    count,
                    max: MAX_RULES,
                };
                return Err(InvalidClassify::new(field, problem));
            }
        }
        Ok(Self { http, grpc })
    }

    /// The HTTP rules, in priority order.
    #[must_use]
    pub fn http_rules(&self) -> &[HttpRule] {
        &self.http
    }

    /// The gRPC rules, in priority order.
    #[must_use]
    pub fn grpc_rules(&self) -> &[GrpcRule] {
        &self.grpc
    }
}

fn missing(field: &str) -> InvalidClassify {
    InvalidClassify::new(field, ClassifyProblem::Missing)
}

fn outcome_of(failure: bool) -> Outcome {
    if failure {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}

impl TryFrom<RawHttpRule> for HttpRule {
    type Error = InvalidClassify;

    fn try_from(raw: RawHttpRule) -> Result<Self, InvalidClassify> {
        let status = raw.status.ok_or_else(|| missing("status"))?;
        let statuses =
            StatusRange::try_new(status.min, status.max).map_err(|e| e.within("status"))?;
        let failure = raw.failure.ok_or_else(|| missing("failure"))?;
        Ok(Self {
            statuses,
            outcome: outcome_of(failure),
            retryable: raw.retryable,
        })
    }
}

impl TryFrom<RawGrpcRule> for GrpcRule {
    type Error = InvalidClassify;

    fn try_from(raw: RawGrpcRule) -> Result<Self, InvalidClassify> {
        let raw_code = raw.code.ok_or_else(|| missing("code"))?;
        let code = match &raw_code {
            RawGrpcCode::Number(n) => u32::try_from(*n).ok().and_then(GrpcCode::from_u32),
            RawGrpcCode::Name(name) => GrpcCode::from_name(name),
        };
        let code = code.ok_or_else(|| {
            let value = match raw_code {
                RawGrpcCode::Number(n) => n.to_string(),
                RawGrpcCode::Name(name) => name,
            };
            InvalidClassify::new("code", ClassifyProblem::NotAGrpcCode { value })
        })?;
        let failure = raw.failure.ok_or_else(|| missing("failure"))?;
        Ok(Self {
            code,
            outcome: outcome_of(failure),
            retryable: raw.retryable,
        })
    }
}

impl TryFrom<RawClassifyConfig> for ClassifyConfig {
    type Error = InvalidClassify;

    /// Validates every rule, reporting the first error with its path (`grpc[1].code`).
    fn try_from(raw: RawClassifyConfig) -> Result<Self, InvalidClassify> {
        fn convert<R, T>(list: &str, raw: Vec<R>) -> Result<Vec<T>, InvalidClassify>
        where
            T: TryFrom<R, Error = InvalidClassify>,
        {
            if raw.len() > MAX_RULES {
                let problem = ClassifyProblem::TooManyRules {
                    count: raw.len(),
                    max: MAX_RULES,
                };
                return Err(InvalidClassify::new(list, problem));
            }
            raw.into_iter()
                .enumerate()
                .map(|(index, rule)| {
                    T::try_from(rule).map_err(|e| e.within(&format!("{list}[{index}]")))
                })
                .collect()
        }
        Self::try_new(convert("http", raw.http)?, convert("grpc", raw.grpc)?)
    }
}

/// Classifies responses by a [`ClassifyConfig`]'s rules and the defaults.
///
/// Classifying never allocates: one `content-type` lookup, at most one `grpc-status` lookup,
/// and a scan of at most [`MAX_RULES`] rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Classifier {
    config: ClassifyConfig,
}

impl Classifier {
    /// A classifier for `config`'s rules.
    #[must_use]
    pub fn new(config: &ClassifyConfig) -> Self {
        Self {
            config: config.clone(),
        }
    }

    /// Classifies a response from its head, or says it must wait for the end of the stream.
    ///
    /// A gRPC response (see the [module docs](self)) with `grpc-status` in its headers is
    /// final; one without it is pending if its HTTP status is `200`, and otherwise final with
    /// the code a gRPC client derives from the HTTP status. Any other response is final by its
    /// HTTP status.
    pub fn classify_response(&self, status: StatusCode, headers: &HeaderMap) -> ResponseClass {
        let grpc = headers
            .get(CONTENT_TYPE)
            .is_some_and(|value| is_grpc_content_type(value.as_bytes()));
        let grpc_status = headers.get(&GRPC_STATUS).map(HeaderValue::as_bytes);
        self.classify_head(status, grpc, grpc_status)
    }

    /// [`classify_response`](Self::classify_response) from the facts of a head that is not a
    /// [`HeaderMap`] (an HTTP/1 head's raw fields): whether its `content-type` is gRPC's (see
    /// [`is_grpc_content_type`]) and its `grpc-status` field, if any. Both HTTP engines
    /// classify through this one function.
    pub fn classify_head(
        &self,
        status: StatusCode,
        grpc: bool,
        grpc_status: Option<&[u8]>,
    ) -> ResponseClass {
        if !grpc {
            return ResponseClass::Final(self.classify_http(status));
        }
        if let Some(value) = grpc_status {
            return ResponseClass::Final(self.classify_grpc_bytes(value));
        }
        if status == StatusCode::OK {
            ResponseClass::Pending(PendingEos { _private: () })
        } else {
            ResponseClass::Final(self.classify_grpc(GrpcCode::from_http_status(status)))
        }
    }

    /// Classifies a pending gRPC response at the end of its stream, from its trailers (`None`
    /// if the stream ended without any). A missing `grpc-status` is a failure.
    #[must_use]
    pub fn classify_eos(&self, pending: PendingEos, trailers: Option<&HeaderMap>) -> Class {
        let PendingEos { _private: () } = pending;
        match trailers.and_then(|trailers| trailers.get(&GRPC_STATUS)) {
            Some(value) => self.classify_grpc_value(value),
            None => Class {
                outcome: Outcome::Failure,
                retryable: false,
                reason: Reason::GrpcStatusMissing,
            },
        }
    }

    /// Classifies a request that failed in transport: always a failure, retryable as
    /// [`TransportError::is_retryable`] says.
    #[must_use]
    pub fn classify_error(&self, error: TransportError) -> Class {
        Class {
            outcome: Outcome::Failure,
            retryable: error.is_retryable(),
            reason: Reason::Transport(error),
        }
    }

    /// The rules this classifier applies.
    #[must_use]
    pub fn config(&self) -> &ClassifyConfig {
        &self.config
    }

    fn classify_http(&self, status: StatusCode) -> Class {
        let reason = Reason::HttpStatus(status);
        match self
            .config
            .http
            .iter()
            .find(|rule| rule.statuses.contains(status))
        {
            Some(rule) => Class {
                outcome: rule.outcome,
                retryable: rule.retryable,
                reason,
            },
            None => Class {
                outcome: outcome_of(status.is_server_error()),
                retryable: DEFAULT_RETRYABLE_HTTP_STATUSES.contains(&status),
                reason,
            },
        }
    }

    fn classify_grpc_value(&self, value: &HeaderValue) -> Class {
        self.classify_grpc_bytes(value.as_bytes())
    }

    fn classify_grpc_bytes(&self, value: &[u8]) -> Class {
        match GrpcCode::from_bytes(value) {
            Some(code) => self.classify_grpc(code),
            None => Class {
                outcome: Outcome::Failure,
                retryable: false,
                reason: Reason::GrpcStatusMalformed,
            },
        }
    }

    fn classify_grpc(&self, code: GrpcCode) -> Class {
        let reason = Reason::GrpcStatus(code);
        match self.config.grpc.iter().find(|rule| rule.code == code) {
            Some(rule) => Class {
                outcome: rule.outcome,
                retryable: rule.retryable,
                reason,
            },
            None => Class {
                outcome: outcome_of(code != GrpcCode::Ok),
                retryable: DEFAULT_RETRYABLE_GRPC_CODES.contains(&code),
                reason,
            },
        }
    }
}

/// The class of a response as far as its head tells, from [`Classifier::classify_response`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a pending class must be finished with `Classifier::classify_eos`"]
pub enum ResponseClass {
    /// The head decided the class. (A stream error while the body flows still supersedes it:
    /// see [`Classifier::classify_error`].)
    Final(Class),
    /// A gRPC response whose status arrives in the trailers; finish it with
    /// [`Classifier::classify_eos`].
    Pending(PendingEos),
}

/// A gRPC response awaiting its trailers. Only [`Classifier::classify_response`] makes one,
/// and [`Classifier::classify_eos`] consumes it; it is neither `Clone` nor `Copy`.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "finish it with `Classifier::classify_eos` when the stream ends"]
pub struct PendingEos {
    _private: (),
}

/// True if a `content-type` value is gRPC's: `application/grpc`, alone or followed by `+` (a
/// codec, `application/grpc+proto`) or `;` (parameters), in any ASCII case. The one test of
/// "is this gRPC" for requests and responses, on both HTTP engines.
///
/// gRPC-Web (`application/grpc-web...`) is excluded on purpose: it carries its trailers inside
/// the body, where the classifier cannot see them, so it is classified by HTTP status.
#[must_use]
pub fn is_grpc_content_type(value: &[u8]) -> bool {
    const GRPC: &[u8] = b"application/grpc";
    value
        .get(..GRPC.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(GRPC))
        && matches!(value.get(GRPC.len()), None | Some(b'+' | b';'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for &(name, value) in pairs {
            map.append(name, HeaderValue::from_static(value));
        }
        map
    }

    const GRPC_CT: (&str, &str) = ("content-type", "application/grpc");

    fn status(code: u16) -> StatusCode {
        StatusCode::from_u16(code).unwrap()
    }

    fn final_class(rc: ResponseClass) -> Class {
        match rc {
            ResponseClass::Final(class) => class,
            ResponseClass::Pending(pending) => panic!("expected a final class, got {pending:?}"),
        }
    }

    fn pending(rc: ResponseClass) -> PendingEos {
        match rc {
            ResponseClass::Pending(pending) => pending,
            ResponseClass::Final(class) => panic!("expected pending, got {class:?}"),
        }
    }

    fn http_class(classifier: &Classifier, code: u16) -> Class {
        final_class(classifier.classify_response(status(code), &HeaderMap::new()))
    }

    fn grpc_trailers_class(classifier: &Classifier, trailers: &HeaderMap) -> Class {
        let p = pending(classifier.classify_response(StatusCode::OK, &headers(&[GRPC_CT])));
        classifier.classify_eos(p, Some(trailers))
    }

    fn rule(min: u16, max: u16, failure: bool, retryable: bool) -> HttpRule {
        HttpRule {
            statuses: StatusRange::try_new(min, max).unwrap(),
            outcome: outcome_of(failure),
            retryable,
        }
    }

    #[test]
    fn http_defaults_fail_5xx_and_retry_transient_ones() {
        let c = Classifier::default();
        for code in [100, 200, 204, 301, 400, 404, 429, 499, 600, 999] {
            let class = http_class(&c, code);
            assert_eq!(class.outcome, Outcome::Success, "{code}");
            assert!(!class.retryable, "{code}");
            assert_eq!(class.reason, Reason::HttpStatus(status(code)));
        }
        for code in [500, 502, 503, 504] {
            let class = http_class(&c, code);
            assert!(class.is_failure() && class.retryable, "{code}");
        }
        for code in [501, 505, 507, 511, 599] {
            let class = http_class(&c, code);
            assert!(class.is_failure() && !class.retryable, "{code}");
        }
    }

    #[test]
    fn custom_http_ranges_override_defaults_and_fall_back() {
        let config = ClassifyConfig::try_new(
            vec![rule(400, 499, true, false), rule(429, 429, false, true)],
            vec![],
        )
        .unwrap();
        let c = Classifier::new(&config);
        assert!(http_class(&c, 404).is_failure());
        assert!(!http_class(&c, 404).retryable);
        // 429 is inside the first rule, which wins.
        assert!(http_class(&c, 429).is_failure());
        // Unmatched statuses keep the defaults.
        assert!(http_class(&c, 503).is_failure() && http_class(&c, 503).retryable);
        assert!(http_class(&c, 200).is_success());
        assert_eq!(c.config(), &config);
    }

    #[test]
    fn rule_order_decides_overlaps() {
        let narrow_first = ClassifyConfig::try_new(
            vec![rule(503, 503, false, true), rule(500, 599, true, false)],
            vec![],
        )
        .unwrap();
        let c = Classifier::new(&narrow_first);
        let class = http_class(&c, 503);
        assert_eq!((class.outcome, class.retryable), (Outcome::Success, true));
        assert!(
            !http_class(&c, 502).retryable,
            "the wide rule overrides the default"
        );

        let wide_first = ClassifyConfig::try_new(
            vec![rule(500, 599, true, false), rule(503, 503, false, true)],
            vec![],
        )
        .unwrap();
        let class = http_class(&Classifier::new(&wide_first), 503);
        assert_eq!((class.outcome, class.retryable), (Outcome::Failure, false));

        let grpc = ClassifyConfig::try_new(
            vec![],
            vec![
                GrpcRule {
                    code: GrpcCode::NotFound,
                    outcome: Outcome::Success,
                    retryable: false,
                },
                GrpcRule {
                    code: GrpcCode::NotFound,
                    outcome: Outcome::Failure,
                    retryable: true,
                },
            ],
        )
        .unwrap();
        let class = grpc_trailers_class(&Classifier::new(&grpc), &headers(&[("grpc-status", "5")]));
        assert_eq!((class.outcome, class.retryable), (Outcome::Success, false));
    }

    #[test]
    fn grpc_status_in_headers_is_final() {
        let c = Classifier::default();
        let ok = final_class(
            c.classify_response(StatusCode::OK, &headers(&[GRPC_CT, ("grpc-status", "0")])),
        );
        assert_eq!(ok.outcome, Outcome::Success);
        assert_eq!(ok.reason, Reason::GrpcStatus(GrpcCode::Ok));
        let unavailable = final_class(
            c.classify_response(StatusCode::OK, &headers(&[GRPC_CT, ("grpc-status", "14")])),
        );
        assert!(unavailable.is_failure() && unavailable.retryable);
        assert_eq!(
            unavailable.reason,
            Reason::GrpcStatus(GrpcCode::Unavailable)
        );
    }

    #[test]
    fn grpc_status_in_trailers_is_classified_at_eos() {
        let c = Classifier::default();
        assert!(grpc_trailers_class(&c, &headers(&[("grpc-status", "0")])).is_success());
        let not_found = grpc_trailers_class(&c, &headers(&[("grpc-status", "5")]));
        assert!(not_found.is_failure() && !not_found.retryable);
        for code in DEFAULT_RETRYABLE_GRPC_CODES {
            let trailers = {
                let mut map = HeaderMap::new();
                map.insert(GRPC_STATUS, HeaderValue::from(code.as_u32()));
                map
            };
            let class = grpc_trailers_class(&c, &trailers);
            assert!(class.is_failure() && class.retryable, "{code}");
        }
    }

    #[test]
    fn grpc_without_status_at_eos_is_a_failure() {
        let c = Classifier::default();
        let missing = Class {
            outcome: Outcome::Failure,
            retryable: false,
            reason: Reason::GrpcStatusMissing,
        };
        let p = pending(c.classify_response(StatusCode::OK, &headers(&[GRPC_CT])));
        assert_eq!(c.classify_eos(p, None), missing);
        let p = pending(c.classify_response(StatusCode::OK, &headers(&[GRPC_CT])));
        assert_eq!(
            c.classify_eos(p, Some(&headers(&[("x-other", "1")]))),
            missing
        );
    }

    #[test]
    fn malformed_grpc_status_is_a_failure() {
        let c = Classifier::default();
        for bad in ["", "ok", "-1", "+0", "1.0", " 0", "0x0"] {
            let mut trailers = HeaderMap::new();
            trailers.insert(GRPC_STATUS, HeaderValue::from_str(bad).unwrap());
            let class = grpc_trailers_class(&c, &trailers);
            assert_eq!(class.reason, Reason::GrpcStatusMalformed, "{bad:?}");
            assert!(class.is_failure() && !class.retryable);
        }
        let in_headers = final_class(c.classify_response(
            StatusCode::OK,
            &headers(&[GRPC_CT, ("grpc-status", "zero")]),
        ));
        assert_eq!(in_headers.reason, Reason::GrpcStatusMalformed);
    }

    #[test]
    fn undefined_grpc_numbers_are_unknown() {
        let c = Classifier::default();
        for number in ["17", "42", "99999999999999999999"] {
            let class = grpc_trailers_class(&c, &headers(&[("grpc-status", number)]));
            assert_eq!(
                class.reason,
                Reason::GrpcStatus(GrpcCode::Unknown),
                "{number}"
            );
            assert!(class.is_failure());
        }
        let padded = grpc_trailers_class(&c, &headers(&[("grpc-status", "014")]));
        assert_eq!(padded.reason, Reason::GrpcStatus(GrpcCode::Unavailable));
    }

    #[test]
    fn grpc_content_types() {
        let c = Classifier::default();
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;charset=utf-8",
            "Application/GRPC",
        ] {
            let rc = c.classify_response(StatusCode::OK, &headers(&[("content-type", ct)]));
            assert!(matches!(rc, ResponseClass::Pending(_)), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/json",
            "application/grp",
        ] {
            let rc = c.classify_response(StatusCode::OK, &headers(&[("content-type", ct)]));
            assert!(
                matches!(rc, ResponseClass::Final(class) if class.is_success()),
                "{ct}"
            );
        }
    }

    #[test]
    fn grpc_with_http_error_and_no_status_maps_like_a_grpc_client() {
        let c = Classifier::default();
        let class =
            final_class(c.classify_response(StatusCode::SERVICE_UNAVAILABLE, &headers(&[GRPC_CT])));
        assert_eq!(class.reason, Reason::GrpcStatus(GrpcCode::Unavailable));
        assert!(class.is_failure() && class.retryable);
        let class = final_class(c.classify_response(StatusCode::NOT_FOUND, &headers(&[GRPC_CT])));
        assert_eq!(class.reason, Reason::GrpcStatus(GrpcCode::Unimplemented));
        assert!(class.is_failure() && !class.retryable);
        // A grpc-status in the head wins over the HTTP status.
        let class = final_class(c.classify_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers(&[GRPC_CT, ("grpc-status", "0")]),
        ));
        assert!(class.is_success());
    }

    #[test]
    fn grpc_responses_ignore_http_rules() {
        let config = ClassifyConfig::try_new(vec![rule(100, 599, true, true)], vec![]).unwrap();
        let c = Classifier::new(&config);
        assert!(grpc_trailers_class(&c, &headers(&[("grpc-status", "0")])).is_success());
        assert!(http_class(&c, 200).is_failure());
    }

    #[test]
    fn transport_errors_are_failures() {
        let c = Classifier::default();
        let expected = [
            (TransportError::ConnectRefused, true),
            (TransportError::StreamRefused, true),
            (TransportError::Timeout, true),
            (TransportError::Reset, false),
            (TransportError::Protocol, false),
        ];
        for (error, retryable) in expected {
            let class = c.classify_error(error);
            assert_eq!(
                class,
                Class {
                    outcome: Outcome::Failure,
                    retryable,
                    reason: Reason::Transport(error)
                }
            );
        }
        assert_eq!(
            TransportError::ConnectRefused.to_string(),
            "connect_refused"
        );
    }

    #[test]
    fn grpc_code_names_and_numbers_round_trip() {
        for (number, code) in GrpcCode::ALL.into_iter().enumerate() {
            assert_eq!(usize::try_from(code.as_u32()).unwrap(), number);
            assert_eq!(GrpcCode::from_u32(code.as_u32()), Some(code));
            assert_eq!(GrpcCode::from_name(code.name()), Some(code));
            assert_eq!(
                GrpcCode::from_name(&code.name().to_lowercase().replace('_', "-")),
                Some(code)
            );
        }
        assert_eq!(GrpcCode::from_u32(17), None);
        assert_eq!(GrpcCode::from_name("unavailable "), None);
        assert_eq!(GrpcCode::from_name("unavail"), None);
        assert_eq!(GrpcCode::DeadlineExceeded.to_string(), "DEADLINE_EXCEEDED");
        assert_eq!(Outcome::Failure.to_string(), "failure");
    }

    #[test]
    fn raw_config_converts() {
        let raw = RawClassifyConfig {
            http: vec![RawHttpRule {
                status: Some(RawStatusRange {
                    min: 500,
                    ..RawStatusRange::default()
                }),
                failure: Some(true),
                retryable: true,
            }],
            grpc: vec![
                RawGrpcRule {
                    code: Some(RawGrpcCode::Name("deadline-exceeded".into())),
                    failure: Some(false),
                    retryable: false,
                },
                RawGrpcRule {
                    code: Some(RawGrpcCode::Number(14)),
                    failure: Some(true),
                    retryable: true,
                },
            ],
        };
        let config = ClassifyConfig::try_from(raw).unwrap();
        assert_eq!(config.http_rules(), &[rule(500, 599, true, true)]);
        assert_eq!(
            config.grpc_rules(),
            &[
                GrpcRule {
                    code: GrpcCode::DeadlineExceeded,
                    outcome: Outcome::Success,
                    retryable: false
                },
                GrpcRule {
                    code: GrpcCode::Unavailable,
                    outcome: Outcome::Failure,
                    retryable: true
                },
            ]
        );
        assert_eq!(
            ClassifyConfig::try_from(RawClassifyConfig::default()).unwrap(),
            ClassifyConfig::default()
        );
    }

    #[test]
    fn raw_config_errors_name_the_field() {
        let http = |status, failure| RawClassifyConfig {
            http: vec![
                RawHttpRule::default(),
                RawHttpRule {
                    status,
                    failure,
                    retryable: false,
                },
            ],
            ..RawClassifyConfig::default()
        };
        let range = |min, max| Some(RawStatusRange { min, max });
        let grpc = |code| RawClassifyConfig {
            grpc: vec![RawGrpcRule {
                code,
                failure: Some(true),
                retryable: false,
            }],
            ..RawClassifyConfig::default()
        };
        let ok_first = |mut raw: RawClassifyConfig| {
            if let Some(first) = raw.http.first_mut() {
                *first = RawHttpRule {
                    status: range(100, 199),
                    failure: Some(false),
                    retryable: false,
                };
            }
            raw
        };
        let cases = [
            (ok_first(http(None, Some(true))), "http[1].status: required"),
            (
                ok_first(http(range(500, 599), None)),
                "http[1].failure: required",
            ),
            (
                ok_first(http(range(99, 599), Some(true))),
                "http[1].status.min: 99 is not an HTTP status code (100..=999)",
            ),
            (
                ok_first(http(range(500, 1000), Some(true))),
                "http[1].status.max: 1000 is not an HTTP status code (100..=999)",
            ),
            (
                ok_first(http(range(599, 500), Some(true))),
                "http[1].status.max: 500 is below min 599",
            ),
            (grpc(None), "grpc[0].code: required"),
            (
                grpc(Some(RawGrpcCode::Number(17))),
                "grpc[0].code: `17` is not a gRPC status code (0..=16, or a name such as `unavailable`)",
            ),
            (
                grpc(Some(RawGrpcCode::Name("nope".into()))),
                "grpc[0].code: `nope` is not a gRPC status code (0..=16, or a name such as `unavailable`)",
            ),
            (
                RawClassifyConfig {
                    http: vec![RawHttpRule::default(); MAX_RULES + 1],
                    ..RawClassifyConfig::default()
                },
                "http: 65 rules exceed the limit of 64",
            ),
        ];
        for (raw, message) in cases {
            assert_eq!(
                ClassifyConfig::try_from(raw).unwrap_err().to_string(),
                message
            );
        }
        let too_many = ClassifyConfig::try_new(
            vec![],
            vec![
                GrpcRule {
                    code: GrpcCode::Ok,
                    outcome: Outcome::Success,
                    retryable: false
                };
                MAX_RULES + 1
            ],
        );
        assert_eq!(too_many.unwrap_err().field, "grpc");
    }

    #[test]
    fn raw_config_deserializes_with_defaults_and_rejects_unknown_fields() {
        use value::Value::{Bool, List, Map, Num, Str};
        let doc = Map(vec![
            (
                "http",
                List(vec![Map(vec![
                    ("status", Map(vec![("min", Num(500))])),
                    ("failure", Bool(true)),
                ])]),
            ),
            (
                "grpc",
                List(vec![
                    Map(vec![
                        ("code", Str("unavailable")),
                        ("failure", Bool(true)),
                        ("retryable", Bool(true)),
                    ]),
                    Map(vec![("code", Num(5)), ("failure", Bool(false))]),
                ]),
            ),
        ]);
        let raw = RawClassifyConfig::deserialize(doc).unwrap();
        assert_eq!(
            raw,
            RawClassifyConfig {
                http: vec![RawHttpRule {
                    status: Some(RawStatusRange { min: 500, max: 599 }),
                    failure: Some(true),
                    retryable: false,
                }],
                grpc: vec![
                    RawGrpcRule {
                        code: Some(RawGrpcCode::Name("unavailable".into())),
                        failure: Some(true),
                        retryable: true
                    },
                    RawGrpcRule {
                        code: Some(RawGrpcCode::Number(5)),
                        failure: Some(false),
                        retryable: false
                    },
                ],
            }
        );
        assert_eq!(
            RawClassifyConfig::deserialize(Map(vec![])).unwrap(),
            RawClassifyConfig::default()
        );
        for doc in [
            Map(vec![("https", List(vec![]))]),
            Map(vec![(
                "http",
                List(vec![Map(vec![("is_failure", Bool(true))])]),
            )]),
            Map(vec![(
                "http",
                List(vec![Map(vec![("status", Map(vec![("minimum", Num(1))]))])]),
            )]),
            Map(vec![(
                "grpc",
                List(vec![Map(vec![("codes", List(vec![]))])]),
            )]),
        ] {
            let error = RawClassifyConfig::deserialize(doc).unwrap_err().to_string();
            assert!(error.starts_with("unknown field"), "{error}");
        }
    }

    /// A minimal self-describing serde document, so the `Raw*` types can be deserialized in
    /// tests without a format crate among `core`'s dev-dependencies.
    mod value {
        use serde::de::value::{Error, MapDeserializer, SeqDeserializer};
        use serde::de::{Deserializer, IntoDeserializer, Visitor};

        #[derive(Clone, Debug)]
        pub(super) enum Value {
            Bool(bool),
            Num(u64),
            Str(&'static str),
            List(Vec<Self>),
            Map(Vec<(&'static str, Self)>),
        }

        impl<'de> Deserializer<'de> for Value {
            type Error = Error;

            fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                match self {
                    Self::Bool(b) => visitor.visit_bool(b),
                    Self::Num(n) => visitor.visit_u64(n),
                    Self::Str(s) => visitor.visit_str(s),
                    Self::List(items) => visitor.visit_seq(SeqDeserializer::new(items.into_iter())),
                    Self::Map(entries) => {
                        visitor.visit_map(MapDeserializer::new(entries.into_iter()))
                    }
                }
            }

            fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
                visitor.visit_some(self)
            }

            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
                identifier ignored_any
            }
        }

        impl IntoDeserializer<'_, Error> for Value {
            type Deserializer = Self;

            fn into_deserializer(self) -> Self {
                self
            }
        }
    }

    proptest! {
        /// Whatever bytes a server puts in grpc-status, classifying never panics, and only a
        /// decimal zero is a success.
        #[test]
        fn any_grpc_status_value_classifies(bytes in prop::collection::vec(any::<u8>(), 0..12)) {
            let Ok(value) = HeaderValue::from_bytes(&bytes) else { return Ok(()) };
            let mut trailers = HeaderMap::new();
            trailers.insert(GRPC_STATUS, value);
            let class = grpc_trailers_class(&Classifier::default(), &trailers);
            let is_zero = !bytes.is_empty() && bytes.iter().all(|&b| b == b'0');
            prop_assert_eq!(class.is_success(), is_zero);
        }

        /// With no rules, the HTTP outcome is exactly "5xx fails".
        #[test]
        fn default_http_outcome_is_5xx(code in 100u16..=999) {
            let class = http_class(&Classifier::default(), code);
            prop_assert_eq!(class.is_failure(), (500..=599).contains(&code));
        }
    }
}
