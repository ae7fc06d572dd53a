//! `ProxyConfig`: the proxy's one typed configuration.
//!
//! Settings come from a YAML file (named by `CONDUIT_PROXY_CONFIG`) and from `CONDUIT_PROXY_*`
//! environment variables, which override the file key by key. Both carriers share one schema:
//! the variable for a key is `CONDUIT_PROXY_` + the key in upper case (`connect_timeout` ↔
//! `CONDUIT_PROXY_CONNECT_TIMEOUT`). Parse, don't validate (STYLE.md §5): the serde
//! [`RawProxyConfig`] is converted by [`ProxyConfig::try_from_raw`] into validated types, and
//! every problem is reported at once, each naming its key and variable. Nothing is re-checked at
//! runtime.
//!
//! This module reads no environment: `main` passes the variables in.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The prefix of every proxy environment variable.
pub const ENV_PREFIX: &str = "CONDUIT_PROXY_";

/// Outbound listener: the app's traffic leaving the pod (Linkerd's port, on loopback only, since
/// only the local app may use it).
pub const DEFAULT_OUTBOUND_ADDR: SocketAddr = addr([127, 0, 0, 1], 4140);
/// Inbound listener: traffic from other proxies to the local app.
pub const DEFAULT_INBOUND_ADDR: SocketAddr = addr([0, 0, 0, 0], 4143);
/// Admin server: on all interfaces so Prometheus can scrape it (`/shutdown` only answers
/// loopback peers).
pub const DEFAULT_ADMIN_ADDR: SocketAddr = addr([0, 0, 0, 0], 4191);
/// The tracing filter when none is given.
pub const DEFAULT_LOG: &str = "info";
/// Runtime worker threads: one, like Linkerd; a sidecar shares its pod's CPU with the app.
pub const DEFAULT_WORKERS: usize = 1;
/// Connect timeout to an endpoint (Linkerd's outbound default).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long protocol detection waits for the client's first bytes before treating the
/// connection as opaque TCP (Linkerd uses 10 s; a server-speaks-first protocol waits this long).
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a complete request head (slowloris defence).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// An accepted HTTP/1.1 connection waiting for its next request, or an opaque connection with no
/// bytes moving, is closed after this. Above the 90 s pool idle timeout of common clients (Go,
/// hyper), so they close first and never race our close with a new request.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the proxy waits for an upstream's response headers after it last sent the upstream
/// part of the request (the dispatch, or the last request body frame), before answering 504
/// itself and discarding the connection. `0` turns it off.
///
/// Why 60 s: a dead or partitioned upstream (a peer that vanished without a FIN or RST, which
/// real TCP only notices after minutes of retransmits) must not hang requests forever: a
/// platform team expects a bounded failure it can see in metrics. It is nginx's
/// `proxy_read_timeout`, the default operators already know, and it stays a backstop rather
/// than a policy: it is above the request timeouts most clients set themselves (so they give
/// up first and their own error wins), and far above any sane synchronous response. Envoy's
/// 15 s route timeout is a well-known source of surprise 504s for legitimate slow calls, and
/// Linkerd has no default at all. Only response *headers* are timed: streamed bodies (SSE,
/// gRPC server streaming, downloads) and uploads in progress are not cut off, and long-polling
/// apps that hold back headers longer raise it or set `0`.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pooled upstream connections idle longer than this are closed.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// The most idle HTTP/1.1 connections kept per endpoint: a memory ceiling, not a working
/// size. A pool only holds connections its endpoint recently had in use at once (one is opened
/// only when none is idle), so it follows the endpoint's recent peak of concurrent requests and
/// shrinks by the idle timeout; a cap below that peak would close connections as they return
/// and reopen them for the next requests (at 1,000 concurrent requests, a cap of 64 cost 2.9x
/// the CPU per request). As many as the listener accepts connections by default, since each
/// client connection has at most one HTTP/1.1 request in flight.
pub const DEFAULT_POOL_MAX_IDLE_PER_ENDPOINT: usize = DEFAULT_MAX_CONNECTIONS;
/// How long `/shutdown` (or SIGTERM) lets in-flight work finish: Kubernetes' default
/// termination grace period, so the kubelet does not kill us mid-drain.
pub const DEFAULT_SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// The largest request head accepted (request line plus headers); larger gets 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most request body kept to send a request again (Linkerd buffers 64 KiB for retries):
/// enough for nearly every unary gRPC call and JSON request, small enough to hold for every
/// request in flight.
pub const DEFAULT_REPLAY_BODY_LIMIT: usize = 64 * 1024;
/// Concurrent HTTP/2 streams per accepted connection.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Accepted connections per listener; beyond it new connections wait in the kernel backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Requests waiting for a ready endpoint per service (Linkerd's policy default).
pub const DEFAULT_QUEUE_CAPACITY: usize = 100;
/// How long a service may have no ready endpoint before waiting requests fail with 504.
pub const DEFAULT_FAILFAST_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the mesh file is checked for changes.
pub const DEFAULT_DISCOVERY_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// An authority without requests for this long is dropped: its balancer (and load estimates)
/// and its discovery subscription (the controller streams are cancelled); the next request
/// resolves it again. Longer than Linkerd's 5 s outbound cache so a service called once a
/// minute keeps its estimates, short enough that a proxy does not follow every name it ever
/// saw.
pub const DEFAULT_DISCOVERY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// First wait before re-subscribing to the controller after a failure (core backoff minimum).
pub const DEFAULT_DISCOVERY_BACKOFF_MIN: Duration = conduit_core::backoff::DEFAULT_MIN;
/// Longest wait between attempts to reach the controller (core backoff maximum): the worst
/// delay before a recovered controller is noticed.
pub const DEFAULT_DISCOVERY_BACKOFF_MAX: Duration = conduit_core::backoff::DEFAULT_MAX;
/// Metric series not updated for this long are dropped (Linkerd's `DEFAULT_METRICS_RETAIN_IDLE`).
pub const DEFAULT_METRICS_RETAIN_IDLE: Duration = Duration::from_secs(600);
/// Distinct `authority` label values tracked; further authorities share `authority="overflow"`.
pub const DEFAULT_METRICS_MAX_AUTHORITIES: usize = 1_000;
/// Seed for the RTT estimate of a fresh endpoint (Linkerd's `default_rtt`).
pub const DEFAULT_BALANCER_DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Time constant of the PeakEWMA decay (Linkerd's `decay`).
pub const DEFAULT_BALANCER_DECAY: Duration = Duration::from_secs(10);

const fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
        port,
    ))
}

/// Where the proxy learns services and endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DiscoveryConfig {
    /// A mesh file (the controller's file format), reloaded when it changes (`file:PATH`).
    File(PathBuf),
    /// The controller's Destination API (`IP:PORT` or `HOST:PORT`).
    Controller {
        /// The controller's gRPC address (a name is resolved at every connect).
        addr: crate::net::PeerAddr,
    },
}

/// The validated proxy configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// Where the local app's outbound traffic arrives.
    pub outbound_addr: SocketAddr,
    /// Where other proxies' traffic for the local app arrives.
    pub inbound_addr: SocketAddr,
    /// The admin server (`/metrics`, `/ready`, `/live`, `/shutdown`).
    pub admin_addr: SocketAddr,
    /// The local app; inbound traffic goes here. No inbound listener when unset.
    pub app_addr: Option<SocketAddr>,
    /// The service the local app serves (`name[:port]`, as clients address it, or in
    /// Kubernetes the pod's own `IP:PORT`, which discovery resolves to its Service). Inbound
    /// requests then take that service's route profile (per-route classes, timeouts and
    /// metrics) and authorization policy, and are counted under it; unset, they take the
    /// default route and are counted under the `Host` they carry.
    pub service: Option<String>,
    /// Where services and endpoints come from.
    pub discovery: DiscoveryConfig,
    /// The tracing filter (`EnvFilter` syntax), applied by `main`.
    pub log: String,
    /// The RNG seed; drawn from the OS (and logged) when unset.
    pub seed: Option<u64>,
    /// Runtime worker threads (1 = a current-thread runtime).
    pub workers: NonZeroUsize,
    /// Where outbound opaque (non-HTTP) TCP goes when it has no original destination (it was
    /// not redirected to the proxy by iptables); such connections are closed when unset.
    pub outbound_default_target: Option<SocketAddr>,
    /// Timeouts and limits for connections.
    pub limits: Limits,
    /// Per-service request queue.
    pub queue: QueueSettings,
    /// Load balancer tuning.
    pub balancer: BalancerSettings,
    /// Metrics retention and bounds.
    pub metrics: MetricsSettings,
    /// How often file discovery polls its file.
    pub discovery_poll_interval: Duration,
    /// How long an authority may go without requests before it is dropped (with its
    /// discovery subscription).
    pub discovery_idle_timeout: Duration,
    /// Reconnect backoff towards the controller.
    pub discovery_backoff: conduit_core::backoff::BackoffConfig,
    /// How long a graceful shutdown lets in-flight requests finish.
    pub shutdown_grace_period: Duration,
    /// The proxy's workload identity (`identity_name`, `identity_token` or
    /// `identity_token_file`, `identity_trust_anchors`): with it, the proxy gets a certificate
    /// from the controller's CA, speaks mTLS to meshed endpoints and terminates mTLS inbound.
    pub identity: Option<IdentitySettings>,
    /// Refuse outbound destinations that are not meshed (fail closed) instead of reaching
    /// them in plaintext.
    pub outbound_require_identity: bool,
    /// The identity the controller proves (`controller_identity`): with it (and an identity),
    /// the proxy reaches the controller over mTLS and checks that name; without it, plaintext.
    pub controller_identity: Option<String>,
}

pub use crate::identity::{IdentitySettings, TrustAnchors};

/// Connection timeouts and size limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Protocol detection timeout.
    pub detect_timeout: Duration,
    /// Time allowed to receive a complete request head.
    pub header_read_timeout: Duration,
    /// Idle timeout for accepted connections.
    pub idle_timeout: Duration,
    /// Idle timeout for pooled upstream connections.
    pub pool_idle_timeout: Duration,
    /// How long to wait for an upstream's response headers after the last request byte was
    /// handed to it; `None` waits forever (see [`DEFAULT_RESPONSE_TIMEOUT`]).
    pub response_timeout: Option<Duration>,
    /// Idle HTTP/1.1 connections kept per endpoint.
    pub pool_max_idle_per_endpoint: usize,
    /// The largest request head accepted.
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 streams per accepted connection.
    pub max_concurrent_streams: u32,
    /// Accepted connections per listener.
    pub max_connections: usize,
    /// The most request body kept (bytes) so a request can be sent again after an attempt
    /// that failed unprocessed; larger bodies stream without a copy and are never resent.
    pub replay_body_limit: usize,
}

/// Queue settings per service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueSettings {
    /// Requests that may wait for a ready endpoint.
    pub capacity: usize,
    /// How long without a ready endpoint before failing fast.
    pub failfast_timeout: Duration,
}

/// Load balancer settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BalancerSettings {
    /// How endpoints are chosen (`balancer_policy`: `peak_ewma`, the default; `least_loaded`;
    /// `round_robin`, a baseline for comparisons that ignores latency and load).
    pub policy: conduit_core::balance::Policy,
    /// Initial RTT estimate.
    pub default_rtt: Duration,
    /// PeakEWMA decay time constant.
    pub decay: Duration,
}

/// Metrics settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSettings {
    /// Series idle this long are dropped.
    pub retain_idle: Duration,
    /// Distinct authorities tracked before overflow.
    pub max_authorities: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            response_timeout: Some(DEFAULT_RESPONSE_TIMEOUT),
            pool_max_idle_per_endpoint: DEFAULT_POOL_MAX_IDLE_PER_ENDPOINT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            replay_body_limit: DEFAULT_REPLAY_BODY_LIMIT,
        }
    }
}

impl ProxyConfig {
    /// A configuration with every default and the given discovery: what tests and the
    /// simulation start from.
    #[must_use]
    pub fn with_discovery(discovery: DiscoveryConfig) -> Self {
        Self {
            outbound_addr: DEFAULT_OUTBOUND_ADDR,
            inbound_addr: DEFAULT_INBOUND_ADDR,
            admin_addr: DEFAULT_ADMIN_ADDR,
            app_addr: None,
            service: None,
            discovery,
            log: DEFAULT_LOG.to_owned(),
            seed: None,
            workers: NonZeroUsize::MIN,
            outbound_default_target: None,
            limits: Limits::default(),
            queue: QueueSettings {
                capacity: DEFAULT_QUEUE_CAPACITY,
                failfast_timeout: DEFAULT_FAILFAST_TIMEOUT,
            },
            balancer: BalancerSettings {
                policy: conduit_core::balance::Policy::PeakEwma,
                default_rtt: DEFAULT_BALANCER_DEFAULT_RTT,
                decay: DEFAULT_BALANCER_DECAY,
            },
            metrics: MetricsSettings {
                retain_idle: DEFAULT_METRICS_RETAIN_IDLE,
                max_authorities: DEFAULT_METRICS_MAX_AUTHORITIES,
            },
            discovery_poll_interval: DEFAULT_DISCOVERY_POLL_INTERVAL,
            discovery_idle_timeout: DEFAULT_DISCOVERY_IDLE_TIMEOUT,
            discovery_backoff: conduit_core::backoff::BackoffConfig::default(),
            shutdown_grace_period: DEFAULT_SHUTDOWN_GRACE_PERIOD,
            identity: None,
            outbound_require_identity: false,
            controller_identity: None,
        }
    }

    /// Builds the configuration from the YAML file text (if any) and the process environment
    /// (`(name, value)` pairs; variables without the `CONDUIT_PROXY_` prefix are ignored, and
    /// `CONDUIT_PROXY_CONFIG` itself is the caller's business).
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] listing every problem, each naming its key and variable.
    pub fn load(
        file: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, InvalidConfig> {
        let mut errors = Vec::new();
        let mut map = match file {
            Some(text) if !text.trim().is_empty() => {
                match serde_yaml_ng::from_str::<serde_yaml_ng::Mapping>(text) {
                    Ok(map) => map,
                    Err(err) => {
                        return Err(InvalidConfig(vec![FieldError::new("config file", err)]));
                    }
                }
            }
            _ => serde_yaml_ng::Mapping::new(),
        };
        for (name, value) in env {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if key == "CONFIG" {
                continue;
            }
            let key = key.to_ascii_lowercase();
            // Numbers stay numbers so `CONDUIT_PROXY_WORKERS=2` means what `workers: 2` means.
            let value = match value.parse::<u64>() {
                Ok(n) => serde_yaml_ng::Value::Number(n.into()),
                Err(_) => serde_yaml_ng::Value::String(value),
            };
            map.insert(serde_yaml_ng::Value::String(key), value);
        }
        let raw: RawProxyConfig =
            match serde_path_to_error::deserialize(serde_yaml_ng::Value::Mapping(map)) {
                Ok(raw) => raw,
                Err(err) => {
                    let field = err.path().to_string();
                    errors.push(FieldError::new(&field, err.into_inner()));
                    return Err(InvalidConfig(errors));
                }
            };
        Self::try_from_raw(raw)
    }

    /// Validates a raw configuration.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] listing every invalid field.
    pub fn try_from_raw(raw: RawProxyConfig) -> Result<Self, InvalidConfig> {
        let mut errors = Vec::new();
        let mut e = |field: &str, msg: String| errors.push(FieldError::new(field, msg));

        let discovery = match raw.discovery.as_deref() {
            None | Some("") => {
                e(
                    "discovery",
                    "required: the controller's `HOST:PORT` or `IP:PORT`, or `file:PATH` for a \
                     mesh file"
                        .into(),
                );
                DiscoveryConfig::File(PathBuf::new())
            }
            Some(value) => match value.strip_prefix("file:") {
                Some(path) if !path.is_empty() => DiscoveryConfig::File(PathBuf::from(path)),
                Some(_) => {
                    e(
                        "discovery",
                        "`file:` needs a path, as in `file:mesh.yaml`".into(),
                    );
                    DiscoveryConfig::File(PathBuf::new())
                }
                None => match value.parse::<crate::net::PeerAddr>() {
                    Ok(addr) => DiscoveryConfig::Controller { addr },
                    Err(_) => {
                        e(
                            "discovery",
                            format!(
                                "`{value}` is neither the controller's `HOST:PORT` or \
                                 `IP:PORT` nor `file:PATH`"
                            ),
                        );
                        DiscoveryConfig::File(PathBuf::new())
                    }
                },
            },
        };
        let mut config = Self::with_discovery(discovery);

        let mut parse_addr = |field: &str, value: Option<String>, into: &mut SocketAddr| {
            if let Some(value) = value {
                match value.parse() {
                    Ok(a) => *into = a,
                    Err(_) => e(field, format!("`{value}` is not an IP:PORT address")),
                }
            }
        };
        parse_addr(
            "outbound_addr",
            raw.outbound_addr,
            &mut config.outbound_addr,
        );
        parse_addr("inbound_addr", raw.inbound_addr, &mut config.inbound_addr);
        parse_addr("admin_addr", raw.admin_addr, &mut config.admin_addr);
        let mut app = SocketAddr::from(([0, 0, 0, 0], 0));
        let has_app = raw.app_addr.is_some();
        parse_addr("app_addr", raw.app_addr, &mut app);
        if has_app {
            config.app_addr = Some(app);
        }
        let mut target = SocketAddr::from(([0, 0, 0, 0], 0));
        let has_target = raw.outbound_default_target.is_some();
        parse_addr(
            "outbound_default_target",
            raw.outbound_default_target,
            &mut target,
        );
        if has_target {
            config.outbound_default_target = Some(target);
        }

        if let Some(service) = raw.service {
            match local_service(&service) {
                Ok(service) => config.service = Some(service),
                Err(reason) => e("service", reason),
            }
        }
        if let Some(log) = raw.log {
            config.log = log;
        }
        config.identity = identity_settings(
            raw.identity_name,
            raw.identity_token,
            raw.identity_token_file,
            raw.identity_trust_anchors,
            raw.identity_trust_anchors_pem,
            &config.discovery,
            &mut e,
        );
        match raw.outbound_require_identity {
            None => {}
            Some(RawBool::Bool(b)) => config.outbound_require_identity = b,
            Some(RawBool::Text(text)) => match text.as_str() {
                "true" | "1" => config.outbound_require_identity = true,
                "false" | "0" => config.outbound_require_identity = false,
                _ => e(
                    "outbound_require_identity",
                    format!("`{text}` is not `true` or `false`"),
                ),
            },
            Some(RawBool::Number(n)) => match n {
                0 => config.outbound_require_identity = false,
                1 => config.outbound_require_identity = true,
                _ => e(
                    "outbound_require_identity",
                    format!("`{n}` is not `true` or `false`"),
                ),
            },
        }
        if let Some(name) = raw.controller_identity {
            if config.identity.is_none() {
                e(
                    "controller_identity",
                    "needs an identity (identity_name): mTLS to the controller presents it".into(),
                );
            } else if check_service(&name).is_ok() && !name.contains(':') {
                config.controller_identity = Some(name.to_ascii_lowercase());
            } else {
                e(
                    "controller_identity",
                    format!("`{name}` is not a DNS-like identity name"),
                );
            }
        }
        if config.outbound_require_identity && config.identity.is_none() {
            e(
                "outbound_require_identity",
                "needs an identity (identity_name): without one no destination could be reached"
                    .into(),
            );
        }
        config.seed = raw.seed;
        if let Some(workers) = raw.workers {
            match usize::try_from(workers).ok().and_then(NonZeroUsize::new) {
                Some(w) if w.get() <= 1024 => config.workers = w,
                _ => e("workers", format!("`{workers}` must be between 1 and 1024")),
            }
        }

        if let Some(name) = raw.balancer_policy.as_deref() {
            match conduit_core::balance::Policy::from_name(name) {
                Some(policy) => config.balancer.policy = policy,
                None => e(
                    "balancer_policy",
                    format!("`{name}` is not one of `peak_ewma`, `least_loaded`, `round_robin`"),
                ),
            }
        }

        let mut duration = |field: &str, value: Option<String>, into: &mut Duration| {
            if let Some(value) = value {
                match parse_duration(&value) {
                    Some(d) if !d.is_zero() => *into = d,
                    _ => e(
                        field,
                        format!("`{value}` is not a positive duration (e.g. `500ms`, `10s`, `2m`)"),
                    ),
                }
            }
        };
        let l = &mut config.limits;
        duration(
            "connect_timeout",
            raw.connect_timeout,
            &mut l.connect_timeout,
        );
        duration("detect_timeout", raw.detect_timeout, &mut l.detect_timeout);
        duration(
            "header_read_timeout",
            raw.header_read_timeout,
            &mut l.header_read_timeout,
        );
        duration("idle_timeout", raw.idle_timeout, &mut l.idle_timeout);
        duration(
            "pool_idle_timeout",
            raw.pool_idle_timeout,
            &mut l.pool_idle_timeout,
        );
        duration(
            "failfast_timeout",
            raw.failfast_timeout,
            &mut config.queue.failfast_timeout,
        );
        duration(
            "balancer_default_rtt",
            raw.balancer_default_rtt,
            &mut config.balancer.default_rtt,
        );
        duration(
            "balancer_decay",
            raw.balancer_decay,
            &mut config.balancer.decay,
        );
        duration(
            "metrics_retain_idle",
            raw.metrics_retain_idle,
            &mut config.metrics.retain_idle,
        );
        duration(
            "discovery_poll_interval",
            raw.discovery_poll_interval,
            &mut config.discovery_poll_interval,
        );
        duration(
            "discovery_idle_timeout",
            raw.discovery_idle_timeout,
            &mut config.discovery_idle_timeout,
        );
        let mut backoff_min = DEFAULT_DISCOVERY_BACKOFF_MIN;
        let mut backoff_max = DEFAULT_DISCOVERY_BACKOFF_MAX;
        duration(
            "discovery_backoff_min",
            raw.discovery_backoff_min,
            &mut backoff_min,
        );
        duration(
            "discovery_backoff_max",
            raw.discovery_backoff_max,
            &mut backoff_max,
        );
        duration(
            "shutdown_grace_period",
            raw.shutdown_grace_period,
            &mut config.shutdown_grace_period,
        );
        match conduit_core::backoff::BackoffConfig::try_new(
            backoff_min,
            backoff_max,
            conduit_core::backoff::DEFAULT_JITTER_PER_MILLE,
        ) {
            Ok(backoff) => config.discovery_backoff = backoff,
            Err(err) => e("discovery_backoff_max", err.to_string()),
        }

        match raw.response_timeout {
            None => {}
            Some(RawTimeout::Number(0)) => config.limits.response_timeout = None,
            Some(RawTimeout::Number(n)) => e(
                "response_timeout",
                format!("`{n}` needs a unit (e.g. `30s`), or `0` to turn the timeout off"),
            ),
            Some(RawTimeout::Text(text)) => match text.trim() {
                "0" | "off" => config.limits.response_timeout = None,
                _ => match parse_duration(&text) {
                    Some(d) if d.is_zero() => config.limits.response_timeout = None,
                    Some(d) => config.limits.response_timeout = Some(d),
                    None => e(
                        "response_timeout",
                        format!(
                            "`{text}` is not a duration (e.g. `500ms`, `30s`, `2m`) or `0` (off)"
                        ),
                    ),
                },
            },
        }
        let mut bounded =
            |field: &str, value: Option<u64>, min: u64, max: u64, into: &mut usize| {
                if let Some(v) = value {
                    match usize::try_from(v) {
                        Ok(n) if (min..=max).contains(&v) => *into = n,
                        _ => e(field, format!("`{v}` must be between {min} and {max}")),
                    }
                }
            };
        let l = &mut config.limits;
        bounded(
            "pool_max_idle_per_endpoint",
            raw.pool_max_idle_per_endpoint,
            0,
            1_000_000,
            &mut l.pool_max_idle_per_endpoint,
        );
        // hyper's HTTP/1 reader needs at least 8 KiB of buffer.
        bounded(
            "max_header_bytes",
            raw.max_header_bytes,
            8192,
            1 << 24,
            &mut l.max_header_bytes,
        );
        bounded(
            "replay_body_limit",
            raw.replay_body_limit,
            0,
            16 << 20,
            &mut l.replay_body_limit,
        );
        bounded(
            "max_connections",
            raw.max_connections,
            1,
            1_000_000,
            &mut l.max_connections,
        );
        bounded(
            "queue_capacity",
            raw.queue_capacity,
            0,
            1_000_000,
            &mut config.queue.capacity,
        );
        bounded(
            "metrics_max_authorities",
            raw.metrics_max_authorities,
            1,
            1_000_000,
            &mut config.metrics.max_authorities,
        );
        let mut streams = 0usize;
        bounded(
            "max_concurrent_streams",
            raw.max_concurrent_streams,
            1,
            1_000_000,
            &mut streams,
        );
        if streams > 0 {
            config.limits.max_concurrent_streams = u32::try_from(streams).unwrap_or(u32::MAX);
        }

        if errors.is_empty() {
            Ok(config)
        } else {
            Err(InvalidConfig(errors))
        }
    }
}

pub use conduit_core::time::parse_duration;

/// The identity settings: all of name, token (or token file) and trust anchors, or none.
fn identity_settings(
    name: Option<String>,
    token: Option<String>,
    token_file: Option<String>,
    anchors: Option<String>,
    anchors_pem: Option<String>,
    discovery: &DiscoveryConfig,
    e: &mut impl FnMut(&str, String),
) -> Option<IdentitySettings> {
    let given = name.is_some()
        || token.is_some()
        || token_file.is_some()
        || anchors.is_some()
        || anchors_pem.is_some();
    if !given {
        return None;
    }
    let mut ok = true;
    let name = match name {
        Some(name) if check_service(&name).is_ok() && !name.contains(':') => {
            name.to_ascii_lowercase()
        }
        Some(name) => {
            e(
                "identity_name",
                format!("`{name}` is not a DNS-like identity name"),
            );
            ok = false;
            String::new()
        }
        None => {
            e(
                "identity_name",
                "required with the other identity settings".into(),
            );
            ok = false;
            String::new()
        }
    };
    let token = match (token, token_file) {
        (Some(token), None) if !token.trim().is_empty() => {
            crate::identity::TokenSource::Value(token.trim().to_owned())
        }
        (None, Some(path)) if !path.is_empty() => {
            crate::identity::TokenSource::File(PathBuf::from(path))
        }
        (Some(_), Some(_)) => {
            e(
                "identity_token",
                "give identity_token or identity_token_file, not both".into(),
            );
            ok = false;
            crate::identity::TokenSource::Value(String::new())
        }
        _ => {
            e(
                "identity_token",
                "required with an identity (from `conduit identity token NAME`), or \
                 identity_token_file"
                    .into(),
            );
            ok = false;
            crate::identity::TokenSource::Value(String::new())
        }
    };
    let trust_anchors = match (anchors, anchors_pem) {
        (Some(path), None) if !path.is_empty() => TrustAnchors::File(PathBuf::from(path)),
        (None, Some(pem)) if pem.contains("-----BEGIN CERTIFICATE-----") => TrustAnchors::Pem(pem),
        (None, Some(_)) => {
            e(
                "identity_trust_anchors_pem",
                "holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)".into(),
            );
            ok = false;
            TrustAnchors::Pem(String::new())
        }
        (Some(_), Some(_)) => {
            e(
                "identity_trust_anchors",
                "give identity_trust_anchors or identity_trust_anchors_pem, not both".into(),
            );
            ok = false;
            TrustAnchors::Pem(String::new())
        }
        _ => {
            e(
                "identity_trust_anchors",
                "required with an identity: the PEM bundle of the mesh's trust anchors (a file, \
                 or the bundle itself in identity_trust_anchors_pem)"
                    .into(),
            );
            ok = false;
            TrustAnchors::Pem(String::new())
        }
    };
    if !matches!(discovery, DiscoveryConfig::Controller { .. }) {
        e(
            "identity_name",
            "an identity comes from the controller's CA: discovery must be the controller's \
             address"
                .into(),
        );
        ok = false;
    }
    ok.then_some(IdentitySettings {
        name,
        token,
        trust_anchors,
    })
}

/// The local service as the proxy follows it: a service name (lower case), or a pod's own
/// address `IP:PORT` (what the Kubernetes injector sets, from the pod's IP), which Kubernetes
/// discovery resolves to the Service whose endpoint it is. An IPv6 address comes bracketed or
/// bare (`fd00::1:8080`: the injector cannot bracket what the kubelet substitutes); either way
/// it is followed as `[fd00::1]:8080`.
fn local_service(service: &str) -> Result<String, String> {
    if let Ok(addr) = service.parse::<SocketAddr>() {
        return Ok(addr.to_string());
    }
    if let Some((ip, port)) = service.rsplit_once(':')
        && let Ok(ip) = ip.parse::<std::net::Ipv6Addr>()
    {
        return match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(SocketAddr::from((ip, port)).to_string()),
            _ => Err(format!("`{service}`: `{port}` is not a port")),
        };
    }
    check_service(service).map(|()| service.to_ascii_lowercase())
}

/// Checks a service authority: a DNS name, optionally with a port.
fn check_service(service: &str) -> Result<(), String> {
    let (host, port) = match service.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (service, None),
    };
    if let Some(port) = port
        && !matches!(port.parse::<u16>(), Ok(p) if p > 0)
    {
        return Err(format!("`{service}`: `{port}` is not a port"));
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{service}` is not a service name (`name[.namespace...][:port]`, as clients address it)"
        ))
    }
}

/// The configuration as written (YAML keys = lower-cased variable suffixes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[expect(
    missing_docs,
    reason = "each field is documented on its validated counterpart"
)]
pub struct RawProxyConfig {
    pub outbound_addr: Option<String>,
    pub inbound_addr: Option<String>,
    pub admin_addr: Option<String>,
    pub app_addr: Option<String>,
    pub service: Option<String>,
    pub discovery: Option<String>,
    pub log: Option<String>,
    pub seed: Option<u64>,
    pub workers: Option<u64>,
    pub outbound_default_target: Option<String>,
    pub connect_timeout: Option<String>,
    pub detect_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub pool_idle_timeout: Option<String>,
    pub pool_max_idle_per_endpoint: Option<u64>,
    pub response_timeout: Option<RawTimeout>,
    pub max_header_bytes: Option<u64>,
    pub max_concurrent_streams: Option<u64>,
    pub max_connections: Option<u64>,
    pub replay_body_limit: Option<u64>,
    pub queue_capacity: Option<u64>,
    pub failfast_timeout: Option<String>,
    pub balancer_policy: Option<String>,
    pub balancer_default_rtt: Option<String>,
    pub balancer_decay: Option<String>,
    pub metrics_retain_idle: Option<String>,
    pub metrics_max_authorities: Option<u64>,
    pub discovery_poll_interval: Option<String>,
    pub discovery_idle_timeout: Option<String>,
    pub discovery_backoff_min: Option<String>,
    pub discovery_backoff_max: Option<String>,
    pub shutdown_grace_period: Option<String>,
    pub identity_name: Option<String>,
    pub identity_token: Option<String>,
    pub identity_token_file: Option<String>,
    pub identity_trust_anchors: Option<String>,
    pub identity_trust_anchors_pem: Option<String>,
    pub outbound_require_identity: Option<RawBool>,
    pub controller_identity: Option<String>,
}

/// A flag as written: a YAML boolean, or `true`/`false` (or `1`/`0`) from the environment.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawBool {
    /// A YAML boolean.
    Bool(bool),
    /// A number (environment values that are digits arrive as numbers).
    Number(u64),
    /// Text.
    Text(String),
}

/// A timeout as written: a duration (`30s`), or `0` / `off` for none. Environment values that
/// are plain numbers arrive as numbers.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawTimeout {
    /// A bare number: only `0` (off) is meaningful.
    Number(u64),
    /// A duration with a unit, or `off`.
    Text(String),
}

/// One invalid setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The YAML key (or `config file`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl FieldError {
    fn new(field: &str, message: impl fmt::Display) -> Self {
        Self {
            field: field.to_owned(),
            message: message.to_string(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() || self.field.contains(' ') || self.field == "." {
            write!(f, "{}: {}", self.field, self.message)
        } else {
            let env = format!("{ENV_PREFIX}{}", self.field.to_ascii_uppercase());
            write!(f, "{} ({env}): {}", self.field, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidConfig(pub Vec<FieldError>);

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid proxy configuration:")?;
        for error in &self.0 {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_need_only_discovery() {
        let c =
            ProxyConfig::load(None, env(&[("CONDUIT_PROXY_DISCOVERY", "file:m.yaml")])).unwrap();
        assert_eq!(c.outbound_addr, DEFAULT_OUTBOUND_ADDR);
        assert_eq!(c.inbound_addr.port(), 4143);
        assert_eq!(c.admin_addr.port(), 4191);
        assert_eq!(c.discovery, DiscoveryConfig::File("m.yaml".into()));
        assert_eq!(c.workers.get(), 1);
    }

    #[test]
    fn env_overrides_file() {
        let file = "discovery: file:a.yaml\nconnect_timeout: 2s\nworkers: 2\n";
        let c = ProxyConfig::load(
            Some(file),
            env(&[
                ("CONDUIT_PROXY_CONNECT_TIMEOUT", "250ms"),
                ("CONDUIT_PROXY_APP_ADDR", "127.0.0.1:8080"),
                ("CONDUIT_PROXY_CONFIG", "ignored.yaml"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.limits.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.workers.get(), 2);
        assert_eq!(c.app_addr, Some("127.0.0.1:8080".parse().unwrap()));
    }

    #[test]
    fn errors_name_every_field() {
        let err = ProxyConfig::load(
            None,
            env(&[
                ("CONDUIT_PROXY_DISCOVERY", "controller"),
                ("CONDUIT_PROXY_DISCOVERY_BACKOFF_MIN", "2s"),
                ("CONDUIT_PROXY_DISCOVERY_BACKOFF_MAX", "1s"),
                ("CONDUIT_PROXY_ADMIN_ADDR", "nope"),
                ("CONDUIT_PROXY_CONNECT_TIMEOUT", "3 parsecs"),
                ("CONDUIT_PROXY_WORKERS", "0"),
            ]),
        )
        .unwrap_err()
        .to_string();
        for want in [
            "discovery (CONDUIT_PROXY_DISCOVERY): `controller` is neither the controller's `HOST:PORT` or `IP:PORT`",
            "discovery_backoff_max (CONDUIT_PROXY_DISCOVERY_BACKOFF_MAX): the maximum backoff 1s is below the minimum 2s",
            "admin_addr (CONDUIT_PROXY_ADMIN_ADDR): `nope` is not an IP:PORT address",
            "connect_timeout (CONDUIT_PROXY_CONNECT_TIMEOUT): `3 parsecs`",
            "workers (CONDUIT_PROXY_WORKERS): `0` must be between 1 and 1024",
        ] {
            assert!(err.contains(want), "{err}\nwant: {want}");
        }
    }

    #[test]
    fn controller_discovery() {
        let c = ProxyConfig::load(
            None,
            env(&[
                ("CONDUIT_PROXY_DISCOVERY", "127.0.0.1:8086"),
                ("CONDUIT_PROXY_DISCOVERY_IDLE_TIMEOUT", "5m"),
                ("CONDUIT_PROXY_DISCOVERY_BACKOFF_MAX", "30s"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.discovery,
            DiscoveryConfig::Controller {
                addr: "127.0.0.1:8086".parse().unwrap()
            }
        );
        let named = ProxyConfig::load(
            None,
            env(&[(
                "CONDUIT_PROXY_DISCOVERY",
                "conduit-controller.conduit.svc:8086",
            )]),
        )
        .unwrap();
        assert_eq!(
            named.discovery,
            DiscoveryConfig::Controller {
                addr: crate::net::PeerAddr::Name {
                    host: "conduit-controller.conduit.svc".into(),
                    port: 8086
                }
            }
        );
        assert_eq!(c.discovery_idle_timeout, Duration::from_secs(300));
        assert_eq!(c.discovery_backoff.max(), Duration::from_secs(30));
        assert_eq!(c.discovery_backoff.min(), DEFAULT_DISCOVERY_BACKOFF_MIN);
    }

    #[test]
    fn unknown_settings_are_rejected() {
        let err = ProxyConfig::load(None, env(&[("CONDUIT_PROXY_CONECT_TIMEOUT", "1s")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `conect_timeout`"), "{err}");
        let err = ProxyConfig::load(None, env(&[])).unwrap_err().to_string();
        assert!(
            err.contains("discovery (CONDUIT_PROXY_DISCOVERY): required"),
            "{err}"
        );
    }

    #[test]
    fn response_timeout() {
        let base = ("CONDUIT_PROXY_DISCOVERY", "file:m.yaml");
        let c = ProxyConfig::load(None, env(&[base])).unwrap();
        assert_eq!(c.limits.response_timeout, Some(DEFAULT_RESPONSE_TIMEOUT));
        let c = ProxyConfig::load(
            None,
            env(&[base, ("CONDUIT_PROXY_RESPONSE_TIMEOUT", "250ms")]),
        )
        .unwrap();
        assert_eq!(c.limits.response_timeout, Some(Duration::from_millis(250)));
        for off in ["0", "0s", "off"] {
            let c = ProxyConfig::load(None, env(&[base, ("CONDUIT_PROXY_RESPONSE_TIMEOUT", off)]))
                .unwrap();
            assert_eq!(c.limits.response_timeout, None, "{off}");
        }
        let c = ProxyConfig::load(
            Some("discovery: file:m.yaml\nresponse_timeout: 0\n"),
            env(&[]),
        )
        .unwrap();
        assert_eq!(c.limits.response_timeout, None);
        let err = ProxyConfig::load(None, env(&[base, ("CONDUIT_PROXY_RESPONSE_TIMEOUT", "30")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("response_timeout (CONDUIT_PROXY_RESPONSE_TIMEOUT): `30` needs a unit"),
            "{err}"
        );
    }

    #[test]
    fn the_local_service_is_a_name_or_the_pods_own_address() {
        let service = |value: &str| {
            ProxyConfig::load(
                None,
                env(&[
                    ("CONDUIT_PROXY_DISCOVERY", "127.0.0.1:8086"),
                    ("CONDUIT_PROXY_SERVICE", value),
                ]),
            )
            .map(|c| c.service)
            .map_err(|e| e.to_string())
        };
        assert_eq!(service("Web.Shop:80"), Ok(Some("web.shop:80".into())));
        assert_eq!(service("10.1.2.3:8080"), Ok(Some("10.1.2.3:8080".into())));
        // IPv6 pods: the injector's `$(POD_IP):PORT` comes unbracketed.
        assert_eq!(service("fd00::1:8080"), Ok(Some("[fd00::1]:8080".into())));
        assert_eq!(service("[fd00::1]:8080"), Ok(Some("[fd00::1]:8080".into())));
        assert!(service("fd00::1:0").is_err());
        assert!(service(":8080").is_err());
    }

    #[test]
    fn trust_anchors_come_from_a_file_or_the_bundle_itself() {
        let base = [
            ("CONDUIT_PROXY_DISCOVERY", "127.0.0.1:8086"),
            (
                "CONDUIT_PROXY_IDENTITY_NAME",
                "web.shop.serviceaccount.identity.conduit.cluster.local",
            ),
            (
                "CONDUIT_PROXY_IDENTITY_TOKEN_FILE",
                "/var/run/secrets/conduit.io/serviceaccount/token",
            ),
        ];
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let with = |extra: &[(&str, &str)]| {
            let mut vars = base.to_vec();
            vars.extend_from_slice(extra);
            ProxyConfig::load(None, env(&vars))
        };
        let config = with(&[("CONDUIT_PROXY_IDENTITY_TRUST_ANCHORS_PEM", pem)]).unwrap();
        let identity = config.identity.unwrap();
        assert_eq!(identity.trust_anchors, TrustAnchors::Pem(pem.into()));
        assert_eq!(
            identity.token,
            crate::identity::TokenSource::File(PathBuf::from(
                "/var/run/secrets/conduit.io/serviceaccount/token"
            ))
        );
        let config = with(&[("CONDUIT_PROXY_IDENTITY_TRUST_ANCHORS", "/etc/anchors.pem")]).unwrap();
        assert_eq!(
            config.identity.unwrap().trust_anchors,
            TrustAnchors::File("/etc/anchors.pem".into())
        );
        let err = with(&[
            ("CONDUIT_PROXY_IDENTITY_TRUST_ANCHORS_PEM", pem),
            ("CONDUIT_PROXY_IDENTITY_TRUST_ANCHORS", "/etc/anchors.pem"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("not both"), "{err}");
        let err = with(&[("CONDUIT_PROXY_IDENTITY_TRUST_ANCHORS_PEM", "garbage")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("identity_trust_anchors_pem") && err.contains("no PEM"),
            "{err}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10ms"), Some(Duration::from_millis(10)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("99999999999999999999s"), None);
    }
}
