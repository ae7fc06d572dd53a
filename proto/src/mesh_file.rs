//! The mesh file carrier: YAML text in, a validated [`Mesh`] out.
//!
//! Decoding and validation together answer with errors that name the field's path in the file
//! (`services.web.default.endpoints[0].addr`), whether the YAML was malformed, a key unknown, a
//! value of the wrong type, or a value out of range.
//!
//! The schema (each block's fields are documented on its `Raw*` type in
//! [`conduit_core::mesh`], [`conduit_core::route`] and [`conduit_core::breaker`]):
//!
//! ```yaml
//! services:
//!   api.demo:                     # the name clients use (host part of the authority)
//!     port: 80                    # default 80
//!     endpoints:
//!       - addr: 127.0.0.1:9001
//!         weight: 100             # default 100; 0 drains
//!         identity: api.demo.serviceaccount.identity.conduit.local
//!         labels: { zone: a }
//!         admin: 127.0.0.1:4191
//!     profile:                    # routes, timeouts, retries, response classes, faults
//!       routes: [ { name: items, match: { path: { prefix: /items/ } } } ]
//!     breaker: { consecutive_failures: 5 }
//!     policy:                     # who may call the service (its proxy's inbound port)
//!       default: all-authenticated      # all-unauthenticated (default) | all-authenticated | deny
//!       audit: false                    # true: deny no one, count who would have been denied
//!       authorizations:                 # the first that matches allows the client
//!         - identities: ["web.demo.serviceaccount.identity.conduit.local", "*.ops.serviceaccount.identity.conduit.local"]
//!         - networks: ["10.0.0.0/8", "127.0.0.1/32"]
//!         - { identities: ["*"], networks: ["fd00::/8"] }   # both must match
//!       probe_paths: ["/healthz", "/ready"]   # the app's HTTP probes (at most 16)
//! ```
//!
//! An authorization's `identities` are exact names, `*.suffix` (any name ending in `.suffix`)
//! or `*` (any client that proved an identity), compared without regard to case; `networks`
//! are CIDRs (or bare addresses) with no bits set past the prefix. An authorization must name
//! at least one of the two; with both, a client must match both. `probe_paths` are the app's
//! HTTP health check paths: on an HTTP connection the policy does not allow, a `GET` or `HEAD`
//! of exactly one of them (its query aside; no normalization: `/healthz/` or `/health%7Az` is
//! another path) still reaches the app and every other request gets 403, so a kubelet (or a
//! load balancer) probing in plaintext passes under `default: deny`. Each starts with `/`,
//! holds visible ASCII only, is at most 512 bytes; a query written after `?` is ignored. See
//! [`conduit_core::policy`] for the decision.

use conduit_core::mesh::{InvalidMesh, Mesh, RawMesh};

/// The largest mesh file accepted. A file watcher reads whatever is at the path; a bound keeps a
/// mistaken path (a log file, a disk image) from taking the process's memory.
pub const MAX_MESH_FILE_BYTES: usize = 16 * 1024 * 1024;

/// Why a mesh file was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeshFileError {
    /// The file is larger than [`MAX_MESH_FILE_BYTES`].
    #[error("mesh file is larger than the {MAX_MESH_FILE_BYTES}-byte limit ({size} bytes read)")]
    TooLarge {
        /// How many bytes were read before giving up (at least the limit plus one).
        size: usize,
    },
    /// The YAML is malformed or does not fit the schema (unknown key, wrong type).
    #[error("{}: {message}", if path.is_empty() { "mesh file" } else { path.as_str() })]
    Decode {
        /// Where the problem is (empty when it is the document as a whole).
        path: String,
        /// What the decoder said.
        message: String,
    },
    /// The document decoded but a value is invalid.
    #[error(transparent)]
    Invalid(#[from] InvalidMesh),
}

/// Decodes and validates a mesh file.
///
/// An empty document is an empty mesh (no services).
///
/// # Errors
///
/// [`MeshFileError`] naming the first decoding problem, or every validation problem.
pub fn parse(text: &str) -> Result<Mesh, MeshFileError> {
    if text.len() > MAX_MESH_FILE_BYTES {
        return Err(MeshFileError::TooLarge { size: text.len() });
    }
    let raw = if text.trim().is_empty() {
        RawMesh::default()
    } else {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize::<_, RawMesh>(deserializer).map_err(|err| {
            let path = err.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let message = err.into_inner().to_string();
            // The YAML decoder prefixes its own view of the path; ours is the complete one.
            let message = message
                .strip_prefix(&format!("{path}: "))
                .map_or(message.clone(), str::to_owned);
            MeshFileError::Decode { path, message }
        })?
    };
    Ok(Mesh::try_from(raw)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
services:
  web.default:
    port: 80
    endpoints:
      - addr: 127.0.0.1:9001
        weight: 100
        identity: web.default.serviceaccount.identity.conduit.local
        labels: { zone: a }
      - addr: 127.0.0.1:9002
    profile:
      routes:
        - name: items
          match: { method: GET, path: { prefix: /items/ } }
          fault: { abort: { status: 503, percent: 2.5 }, delay: { duration: 100ms, percent: 10 } }
        - name: get-item
          match:
            method: GET
            path: { regex: "/items/[0-9]+" }
            headers:
              - { name: X-Tenant, exact: beta }
              - { name: x-canary, regex: "yes|true" }
          timeouts: { request: 2s, attempt: 500ms }
          response_classes:
            http:
              - { status: { min: 500 }, failure: true }
              - { status: { min: 429, max: 429 }, failure: false, retryable: true }
            grpc:
              - { code: unavailable, failure: true, retryable: true }
"#;

    #[test]
    fn the_design_example_parses() {
        use std::time::Duration;

        use conduit_core::classify::{GrpcCode, Outcome};
        use conduit_core::route::{PathMatch, ValueMatch};

        let mesh = parse(EXAMPLE).unwrap();
        let web = mesh.lookup("web.default:80").unwrap();
        assert_eq!(web.endpoints.len(), 2);
        assert_eq!(web.endpoints[0].labels["zone"], "a");
        let routes = web.profile.routes();
        let names: Vec<&str> = web.profile.route_names().collect();
        assert_eq!(names, ["items", "get-item", "default"]);
        assert_eq!(routes[0].matches.path, PathMatch::Prefix("/items/".into()));
        let fault = routes[0].policy.fault.clone().unwrap();
        assert_eq!(
            fault.abort.map(|a| (a.status, a.grpc, a.per_million)),
            Some((503, 14, 25_000))
        );
        assert_eq!(
            fault.delay.map(|d| (d.duration, d.per_million)),
            Some((Duration::from_millis(100), 100_000))
        );
        assert_eq!(routes[1].policy.fault, None);

        let get_item = &routes[1];
        assert!(
            matches!(&get_item.matches.path, PathMatch::Regex(p) if p.as_str() == "/items/[0-9]+")
        );
        let headers: Vec<(&str, &ValueMatch)> = get_item
            .matches
            .headers
            .iter()
            .map(|h| (h.name.as_str(), &h.value))
            .collect();
        assert_eq!(headers[0], ("x-tenant", &ValueMatch::Exact("beta".into())));
        assert!(
            matches!(headers[1], ("x-canary", ValueMatch::Regex(p)) if p.as_str() == "yes|true")
        );
        let timeouts = get_item.policy.timeouts;
        assert_eq!(timeouts.request, Some(Duration::from_secs(2)));
        assert_eq!(timeouts.attempt, Some(Duration::from_millis(500)));
        let classes = get_item.policy.classifier.config();
        let http: Vec<_> = classes
            .http_rules()
            .iter()
            .map(|r| {
                (
                    r.statuses.min().as_u16(),
                    r.statuses.max().as_u16(),
                    r.outcome,
                    r.retryable,
                )
            })
            .collect();
        assert_eq!(
            http,
            [
                (500, 599, Outcome::Failure, false),
                (429, 429, Outcome::Success, true)
            ]
        );
        let grpc = &classes.grpc_rules()[0];
        assert_eq!(
            (grpc.code, grpc.outcome, grpc.retryable),
            (
                GrpcCode::from_name("unavailable").unwrap(),
                Outcome::Failure,
                true
            )
        );
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "services:\n  web.default:\n    endpoints:\n      - addr: nope\n",
                "services.web.default.endpoints[0].addr: `nope` is not an IP:PORT address",
            ),
            (
                "services:\n  web.default:\n    endpoints:\n      - adr: 127.0.0.1:1\n",
                "services.web.default.endpoints[0]: unknown field `adr`",
            ),
            (
                "services:\n  web.default:\n    port: eighty\n",
                "services.web.default.port: invalid type",
            ),
            (
                "services:\n  web: {\n",
                "did not find expected node content at line 3",
            ),
            ("servces: {}\n", "unknown field `servces`"),
            (
                "services:\n  web.default:\n    profile:\n      routes:\n        - name: a\n          match: { path: { regex: \"(\" } }\n",
                "services.web.default.profile.routes[0].match.path.regex: invalid regular expression",
            ),
            (
                "services:\n  web.default:\n    profile:\n      routes:\n        - name: a\n          timeouts: { request: 0s }\n",
                "services.web.default.profile.routes[0].timeouts.request: must be above zero",
            ),
            (
                "services:\n  web.default:\n    profile:\n      routes:\n        - name: a\n          timeouts: { deadline: 1s }\n",
                "services.web.default.profile.routes[0].timeouts: unknown field `deadline`",
            ),
            (
                "services:\n  web.default:\n    profile:\n      routes:\n        - name: default\n",
                "services.web.default.profile.routes[0].name: `default` is reserved",
            ),
            (
                "services:\n  web.default:\n    profile:\n      routes:\n        - name: a\n          fault: { abort: { status: 503, percent: 150 } }\n",
                "services.web.default.profile.routes[0].fault.abort.percent: 150 is not a share above 0 and at most 100",
            ),
            (
                "services:\n  web.default:\n    profile:\n      routes:\n        - name: a\n          fault: { delay: { percent: 5 } }\n",
                "services.web.default.profile.routes[0].fault.delay.duration: required",
            ),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap_err().to_string();
            assert!(got.contains(want), "{text:?}\n got: {got}\nwant: {want}");
        }
    }

    #[test]
    fn a_breaker_block_parses_and_its_errors_name_the_field() {
        let text = "services:
  web.default:
    endpoints: [{ addr: 127.0.0.1:9001 }]
    breaker:
      consecutive_failures: 5
      success_rate: { threshold_per_mille: 800, window: 10s, min_requests: 10 }
      backoff: { min: 500ms, max: 30s, jitter_per_mille: 250 }
      max_ejected_per_mille: 340
";
        let mesh = parse(text).unwrap();
        let breaker = mesh.service("web.default").unwrap().profile.breaker();
        assert_eq!(breaker.consecutive_failures(), Some(5));
        let rate = breaker.success_rate().unwrap();
        assert_eq!(
            (
                rate.threshold_per_mille(),
                rate.window().as_secs(),
                rate.min_requests()
            ),
            (800, 10, 10)
        );
        assert_eq!(breaker.penalty().max().as_secs(), 30);
        assert_eq!(breaker.max_ejected_per_mille(), 340);
        let off = parse("services:\n  web.default:\n    breaker: { enabled: false }\n").unwrap();
        assert!(
            !off.service("web.default")
                .unwrap()
                .profile
                .breaker()
                .is_enabled()
        );
        let cases = [
            (
                "services:\n  web.default:\n    breaker: { backoff: { min: 2s, max: 1s } }\n",
                "services.web.default.breaker.backoff.max",
            ),
            (
                "services:\n  web.default:\n    breaker: { success_rate: { window: soon } }\n",
                "services.web.default.breaker.success_rate.window",
            ),
            (
                "services:\n  web.default:\n    breaker: { trip_after: 3 }\n",
                "services.web.default.breaker: unknown field `trip_after`",
            ),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap_err().to_string();
            assert!(got.contains(want), "{text:?}\n got: {got}\nwant: {want}");
        }
    }

    #[test]
    fn a_policy_block_parses_and_its_errors_name_the_field() {
        use conduit_core::policy::{Client, DefaultPolicy, Rule, Verdict, authorize};

        let text = r#"
services:
  api.demo:
    port: 80
    policy:
      default: all-authenticated
      audit: false
      authorizations:
        - identities: ["web.demo.serviceaccount.identity.conduit.local", "*.ops.serviceaccount.identity.conduit.local"]
        - networks: ["10.0.0.0/8", "127.0.0.1/32"]
      probe_paths: [/ready, "/live?verbose"]
"#;
        let mesh = parse(text).unwrap();
        let policy = mesh.service("api.demo").unwrap().profile.policy().unwrap();
        assert_eq!(policy.default_policy(), DefaultPolicy::AllAuthenticated);
        assert_eq!(policy.authorizations().len(), 2);
        let probes: Vec<String> = policy
            .probe_paths()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(probes, ["/live", "/ready"]);
        let decide = |identity, addr: &str| {
            authorize(
                policy,
                &Client {
                    identity,
                    addr: addr.parse().unwrap(),
                },
            )
        };
        let web = decide(
            Some("web.demo.serviceaccount.identity.conduit.local"),
            "192.0.2.1",
        );
        assert_eq!(web.rule, Rule::Authorization(0));
        assert_eq!(decide(None, "10.9.9.9").rule, Rule::Authorization(1));
        assert_eq!(
            decide(
                Some("x.other.serviceaccount.identity.conduit.local"),
                "192.0.2.1"
            )
            .verdict,
            Verdict::Allow,
            "all-authenticated"
        );
        assert_eq!(decide(None, "192.0.2.1").verdict, Verdict::Deny);

        let cases = [
            (
                "services:\n  api.demo:\n    policy: { default: allow }\n",
                "services.api.demo.policy.default: `allow` is not a default policy",
            ),
            (
                "services:\n  api.demo:\n    policy: { authorizations: [ {} ] }\n",
                "services.api.demo.policy.authorizations[0]: names neither identities nor networks",
            ),
            (
                "services:\n  api.demo:\n    policy: { authorizations: [ { networks: [10.1.0.0/8] } ] }\n",
                "services.api.demo.policy.authorizations[0].networks[0]: invalid network `10.1.0.0/8`",
            ),
            (
                "services:\n  api.demo:\n    policy: { authorizations: [ { identities: [\"a.*\"] } ] }\n",
                "services.api.demo.policy.authorizations[0].identities[0]: invalid identity `a.*`",
            ),
            (
                "services:\n  api.demo:\n    policy: { authorizations: [ { clients: [a] } ] }\n",
                "services.api.demo.policy.authorizations[0]: unknown field `clients`",
            ),
            (
                "services:\n  api.demo:\n    policy: { audit: maybe }\n",
                "services.api.demo.policy.audit: invalid type",
            ),
            (
                "services:\n  api.demo:\n    policy: { probe_paths: [/ok, healthz] }\n",
                "services.api.demo.policy.probe_paths[1]: a probe path starts with `/`",
            ),
            (
                "services:\n  api.demo:\n    policy: { probe_paths: /healthz }\n",
                "services.api.demo.policy.probe_paths: invalid type",
            ),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap_err().to_string();
            assert!(got.contains(want), "{text:?}\n got: {got}\nwant: {want}");
        }
    }

    #[test]
    fn empty_is_an_empty_mesh() {
        assert_eq!(parse("").unwrap().services().len(), 0);
        assert_eq!(parse("  \n").unwrap().services().len(), 0);
    }
}
