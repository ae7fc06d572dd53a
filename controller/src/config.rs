//! The controller's configuration: raw strings from flags or the environment in, a validated
//! [`ControllerConfig`] out, with every error naming its setting.
//!
//! `main.rs` is the only code that reads the environment; it fills a [`RawControllerConfig`].

use core::fmt;
use core::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::identity::webhook::WebhookCertificate;
use crate::identity::{IdentityConfig, MAX_LEAF_LIFETIME, MIN_LEAF_LIFETIME, SuppliedCa};

/// Where the gRPC API listens by default: Linkerd's destination port. Loopback, so a controller
/// started on a host by hand is not reachable from the network until asked to be (Kubernetes
/// manifests set `0.0.0.0:8086`).
pub const DEFAULT_GRPC_ADDR: SocketAddr = SocketAddr::new(LOOPBACK, 8086);

/// Where the admin port listens by default (loopback for the same reason).
pub const DEFAULT_ADMIN_ADDR: SocketAddr = SocketAddr::new(LOOPBACK, 9996);

const LOOPBACK: core::net::IpAddr = core::net::IpAddr::V4(core::net::Ipv4Addr::LOCALHOST);

/// How often the mesh file is checked for edits by default: quick enough that an edit feels
/// immediate, rare enough that re-reading a small file costs nothing.
pub const DEFAULT_MESH_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest poll interval accepted (tests use a few milliseconds).
pub const MIN_MESH_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// The longest poll interval accepted: beyond an hour an edit would seem ignored.
pub const MAX_MESH_POLL_INTERVAL: Duration = Duration::from_secs(3600);

/// The tracing filter used when none is given.
pub const DEFAULT_LOG: &str = "info";

/// The settings as given (flags or environment), before validation. `None` means not given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawControllerConfig {
    /// `CONDUIT_CONTROLLER_GRPC_ADDR` / `--grpc-addr`: `IP:PORT` of the gRPC API.
    pub grpc_addr: Option<String>,
    /// `CONDUIT_CONTROLLER_ADMIN_ADDR` / `--admin-addr`: `IP:PORT` of the admin port.
    pub admin_addr: Option<String>,
    /// `CONDUIT_CONTROLLER_DISCOVERY` / `--discovery`: `file` (the default) or `kubernetes`.
    pub discovery: Option<String>,
    /// `CONDUIT_CONTROLLER_MESH_FILE` / `--mesh-file`: the mesh file to serve. Required with
    /// file discovery.
    pub mesh_file: Option<String>,
    /// `CONDUIT_CONTROLLER_CLUSTER_DOMAIN` / `--cluster-domain`: the cluster's DNS domain, with
    /// Kubernetes discovery (default `cluster.local`).
    pub cluster_domain: Option<String>,
    /// `CONDUIT_CONTROLLER_MESH_POLL_MS` / `--mesh-poll-ms`: how often to check the file.
    pub mesh_poll_ms: Option<String>,
    /// `CONDUIT_CONTROLLER_LOG` / `--log`: a tracing filter (`info`, `conduit_controller=debug`).
    pub log: Option<String>,
    /// `CONDUIT_CONTROLLER_IDENTITY_DIR` / `--identity-dir`: the certificate authority's
    /// directory (default: `identity` beside the mesh file).
    pub identity_dir: Option<String>,
    /// `CONDUIT_CONTROLLER_IDENTITY_TRUST_ANCHORS` / `--identity-trust-anchors`: an operator's
    /// trust-anchor bundle (PEM). With the issuer's certificate and key, or not at all.
    pub identity_trust_anchors: Option<String>,
    /// `CONDUIT_CONTROLLER_IDENTITY_ISSUER_CERT` / `--identity-issuer-cert`: an operator's
    /// issuer certificate (PEM).
    pub identity_issuer_cert: Option<String>,
    /// `CONDUIT_CONTROLLER_IDENTITY_ISSUER_KEY` / `--identity-issuer-key`: an operator's issuer
    /// key (PKCS#8 PEM).
    pub identity_issuer_key: Option<String>,
    /// `CONDUIT_CONTROLLER_IDENTITY_LEAF_LIFETIME` / `--identity-leaf-lifetime`: how long leaf
    /// certificates last (`24h`, `90m`).
    pub identity_leaf_lifetime: Option<String>,
    /// `CONDUIT_CONTROLLER_IDENTITY_SECRET` / `--identity-secret`: with Kubernetes discovery,
    /// the Secret that holds the CA's files, bootstrapped by the replica holding the Lease.
    pub identity_secret: Option<String>,
    /// `CONDUIT_CONTROLLER_WEBHOOK_SECRET` / `--webhook-secret`: with Kubernetes discovery, the
    /// Secret (type `kubernetes.io/tls`) in which the replica holding the Lease keeps the
    /// injecting webhook's serving certificate. With `webhook_configuration`.
    pub webhook_secret: Option<String>,
    /// `CONDUIT_CONTROLLER_WEBHOOK_CONFIGURATION` / `--webhook-configuration`: the
    /// MutatingWebhookConfiguration whose `caBundle` the Lease's holder keeps set to the trust
    /// anchors. With `webhook_secret`.
    pub webhook_configuration: Option<String>,
    /// `CONDUIT_CONTROLLER_WEBHOOK_SERVICE` / `--webhook-service`: the webhook's Service in the
    /// controller's namespace, whose names the certificate carries (default
    /// `conduit-webhook`).
    pub webhook_service: Option<String>,
    /// `CONDUIT_CONTROLLER_NAMESPACE` / `--namespace`: the controller's namespace (the Lease's
    /// and the identity Secret's).
    pub namespace: Option<String>,
    /// `CONDUIT_CONTROLLER_POD_NAME` / `--pod-name`: this replica's name in the Lease.
    pub pod_name: Option<String>,
    /// `CONDUIT_CONTROLLER_LEASE_DURATION` / `--lease-duration`: how long the Lease lasts
    /// unrenewed (`15s`).
    pub lease_duration: Option<String>,
}

/// A validated controller configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Where the gRPC API (Destination, Identity, Tap, public API) listens.
    pub grpc_addr: SocketAddr,
    /// Where the admin port (`/metrics`, `/ready`, `/live`) listens.
    pub admin_addr: SocketAddr,
    /// Where services, endpoints and profiles come from.
    pub discovery: DiscoverySource,
    /// The tracing filter.
    pub log: String,
    /// The certificate authority: its directory, an operator's CA if any, the leaf lifetime.
    pub identity: IdentityConfig,
}

/// The discovery backend and its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoverySource {
    /// A watched mesh file.
    File {
        /// The mesh file.
        path: PathBuf,
        /// How often it is checked for edits.
        poll_interval: Duration,
    },
    /// The Kubernetes API (the client's configuration comes from `KUBECONFIG` or the pod's
    /// service account).
    Kubernetes {
        /// The cluster's DNS domain (`cluster.local`).
        cluster_domain: String,
        /// A kubeconfig file to use instead of the environment's (`KUBECONFIG`, then the
        /// pod's service account).
        kubeconfig: Option<PathBuf>,
        /// Singleton work under a Lease (the CA kept in a Secret, the webhook's certificate), if
        /// configured.
        singleton: Option<Singleton>,
    },
}

/// The Lease of replicated controllers ([`crate::lease`]) and the work only its holder does:
/// bootstrapping the CA into the identity Secret ([`crate::identity::secret`]) and keeping the
/// webhook's certificate ([`crate::identity::webhook`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Singleton {
    /// The controller's namespace, where the Lease and the Secret live.
    pub namespace: String,
    /// This replica's name in the Lease (its pod's name).
    pub me: String,
    /// The Lease's name.
    pub lease: String,
    /// How long the Lease lasts without renewal.
    pub lease_duration: Duration,
    /// The Secret holding the CA's files, when the CA is bootstrapped (not an operator's).
    pub identity_secret: Option<String>,
    /// The webhook's serving certificate, when the controller issues it.
    pub webhook: Option<WebhookCertificate>,
}

/// The Lease's name.
pub const LEASE_NAME: &str = "conduit-controller";

/// One invalid setting.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct SettingError {
    /// The setting, as the environment variable and the flag: `CONDUIT_CONTROLLER_GRPC_ADDR
    /// (--grpc-addr)`.
    pub setting: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// A configuration that failed validation, with every error found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidConfig {
    /// Every invalid setting. Never empty.
    pub errors: Vec<SettingError>,
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: ")?;
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

const GRPC_ADDR: &str = "CONDUIT_CONTROLLER_GRPC_ADDR (--grpc-addr)";
const ADMIN_ADDR: &str = "CONDUIT_CONTROLLER_ADMIN_ADDR (--admin-addr)";
const DISCOVERY: &str = "CONDUIT_CONTROLLER_DISCOVERY (--discovery)";
const MESH_FILE: &str = "CONDUIT_CONTROLLER_MESH_FILE (--mesh-file)";
const CLUSTER_DOMAIN: &str = "CONDUIT_CONTROLLER_CLUSTER_DOMAIN (--cluster-domain)";
const MESH_POLL_MS: &str = "CONDUIT_CONTROLLER_MESH_POLL_MS (--mesh-poll-ms)";
const IDENTITY_DIR: &str = "CONDUIT_CONTROLLER_IDENTITY_DIR (--identity-dir)";
const IDENTITY_TRUST_ANCHORS: &str =
    "CONDUIT_CONTROLLER_IDENTITY_TRUST_ANCHORS (--identity-trust-anchors)";
const IDENTITY_ISSUER_CERT: &str =
    "CONDUIT_CONTROLLER_IDENTITY_ISSUER_CERT (--identity-issuer-cert)";
const IDENTITY_ISSUER_KEY: &str = "CONDUIT_CONTROLLER_IDENTITY_ISSUER_KEY (--identity-issuer-key)";
const IDENTITY_LEAF_LIFETIME: &str =
    "CONDUIT_CONTROLLER_IDENTITY_LEAF_LIFETIME (--identity-leaf-lifetime)";
const IDENTITY_SECRET: &str = "CONDUIT_CONTROLLER_IDENTITY_SECRET (--identity-secret)";
const WEBHOOK_SECRET: &str = "CONDUIT_CONTROLLER_WEBHOOK_SECRET (--webhook-secret)";
const WEBHOOK_CONFIGURATION: &str =
    "CONDUIT_CONTROLLER_WEBHOOK_CONFIGURATION (--webhook-configuration)";
const WEBHOOK_SERVICE: &str = "CONDUIT_CONTROLLER_WEBHOOK_SERVICE (--webhook-service)";
const NAMESPACE: &str = "CONDUIT_CONTROLLER_NAMESPACE (--namespace)";
const POD_NAME: &str = "CONDUIT_CONTROLLER_POD_NAME (--pod-name)";
const LEASE_DURATION: &str = "CONDUIT_CONTROLLER_LEASE_DURATION (--lease-duration)";

impl TryFrom<RawControllerConfig> for ControllerConfig {
    type Error = InvalidConfig;

    fn try_from(raw: RawControllerConfig) -> Result<Self, InvalidConfig> {
        let mut errors = Vec::new();
        let mut error = |setting, reason: String| errors.push(SettingError { setting, reason });
        let mut addr = |setting, value: Option<String>, default| match value {
            None => Some(default),
            Some(text) => match text.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    error(setting, format!("`{text}` is not an IP:PORT address"));
                    None
                }
            },
        };
        let grpc_addr = addr(GRPC_ADDR, raw.grpc_addr, DEFAULT_GRPC_ADDR);
        let admin_addr = addr(ADMIN_ADDR, raw.admin_addr, DEFAULT_ADMIN_ADDR);
        let kubernetes = match raw.discovery.as_deref() {
            None | Some("file") => false,
            Some("kubernetes") => true,
            Some(other) => {
                error(
                    DISCOVERY,
                    format!("`{other}` is not a backend: `file` or `kubernetes`"),
                );
                false
            }
        };
        let mesh_file = match raw.mesh_file {
            Some(path) if !path.is_empty() && !kubernetes => Some(PathBuf::from(path)),
            Some(_) if kubernetes => {
                error(
                    MESH_FILE,
                    "set with Kubernetes discovery, which reads no mesh file: drop one of the two"
                        .into(),
                );
                None
            }
            _ if kubernetes => None,
            _ => {
                error(
                    MESH_FILE,
                    "missing: the controller serves discovery from a mesh file (or set \
                     CONDUIT_CONTROLLER_DISCOVERY=kubernetes)"
                        .into(),
                );
                None
            }
        };
        let cluster_domain = match raw.cluster_domain {
            None => crate::discovery::kubernetes::DEFAULT_CLUSTER_DOMAIN.to_owned(),
            Some(domain) => {
                let lower = domain.trim_end_matches('.').to_ascii_lowercase();
                match conduit_core::mesh::check_dns_name(&lower) {
                    Ok(()) => lower,
                    Err(reason) => {
                        error(
                            CLUSTER_DOMAIN,
                            format!(
                                "`{domain}` is not a DNS name such as `cluster.local`: {reason}"
                            ),
                        );
                        String::new()
                    }
                }
            }
        };
        let mesh_poll_interval = match raw.mesh_poll_ms {
            None => Some(DEFAULT_MESH_POLL_INTERVAL),
            Some(text) => match text.parse::<u64>().map(Duration::from_millis) {
                Ok(interval)
                    if (MIN_MESH_POLL_INTERVAL..=MAX_MESH_POLL_INTERVAL).contains(&interval) =>
                {
                    Some(interval)
                }
                _ => {
                    error(
                        MESH_POLL_MS,
                        format!(
                            "`{text}` must be a whole number of milliseconds from {} to {}",
                            MIN_MESH_POLL_INTERVAL.as_millis(),
                            MAX_MESH_POLL_INTERVAL.as_millis()
                        ),
                    );
                    None
                }
            },
        };
        let identity_dir = match raw.identity_dir {
            Some(dir) if dir.is_empty() => {
                error(
                    IDENTITY_DIR,
                    "empty: name a directory, or leave it unset".into(),
                );
                None
            }
            Some(dir) => Some(PathBuf::from(dir)),
            None if kubernetes => {
                error(
                    IDENTITY_DIR,
                    "missing: with Kubernetes discovery, name the certificate authority's \
                     directory (a volume that outlives the pod)"
                        .into(),
                );
                None
            }
            None => mesh_file.as_deref().map(IdentityConfig::default_dir),
        };
        let supplied = match (
            raw.identity_trust_anchors,
            raw.identity_issuer_cert,
            raw.identity_issuer_key,
        ) {
            (None, None, None) => None,
            (Some(trust_anchors), Some(issuer_cert), Some(issuer_key)) => Some(SuppliedCa {
                trust_anchors: trust_anchors.into(),
                issuer_cert: issuer_cert.into(),
                issuer_key: issuer_key.into(),
            }),
            (anchors, cert, key) => {
                for (setting, value) in [
                    (IDENTITY_TRUST_ANCHORS, anchors),
                    (IDENTITY_ISSUER_CERT, cert),
                    (IDENTITY_ISSUER_KEY, key),
                ] {
                    if value.is_none() {
                        error(
                            setting,
                            "missing: an operator's CA needs the trust anchors, the issuer's \
                             certificate and the issuer's key together (or none of them, to \
                             bootstrap one)"
                                .into(),
                        );
                    }
                }
                None
            }
        };
        let leaf_lifetime = match raw.identity_leaf_lifetime {
            None => Some(crate::identity::DEFAULT_LEAF_LIFETIME),
            Some(text) => match conduit_core::time::parse_duration(&text) {
                Some(lifetime) if (MIN_LEAF_LIFETIME..=MAX_LEAF_LIFETIME).contains(&lifetime) => {
                    Some(lifetime)
                }
                _ => {
                    error(
                        IDENTITY_LEAF_LIFETIME,
                        format!(
                            "`{text}` must be a duration such as `24h` or `90m`, from 1m to 720h \
                             (30 days)"
                        ),
                    );
                    None
                }
            },
        };
        if let (Some(grpc), Some(admin)) = (grpc_addr, admin_addr)
            && grpc == admin
            && grpc.port() != 0
        {
            error(ADMIN_ADDR, format!("{admin} is also the gRPC address"));
        }
        let identity_secret = match raw.identity_secret {
            None => None,
            Some(_) if !kubernetes => {
                error(
                    IDENTITY_SECRET,
                    "only with Kubernetes discovery (CONDUIT_CONTROLLER_DISCOVERY=kubernetes)"
                        .into(),
                );
                None
            }
            Some(_) if supplied.is_some() => {
                error(
                    IDENTITY_SECRET,
                    "set with an operator's CA: the Secret holds a bootstrapped CA; drop one"
                        .into(),
                );
                None
            }
            Some(secret) => Some(secret),
        };
        let webhook = match (raw.webhook_secret, raw.webhook_configuration) {
            (None, None) => {
                if raw.webhook_service.is_some() {
                    error(
                        WEBHOOK_SERVICE,
                        "set without CONDUIT_CONTROLLER_WEBHOOK_SECRET (--webhook-secret)".into(),
                    );
                }
                None
            }
            _ if !kubernetes => {
                error(
                    WEBHOOK_SECRET,
                    "only with Kubernetes discovery (CONDUIT_CONTROLLER_DISCOVERY=kubernetes)"
                        .into(),
                );
                None
            }
            (Some(secret), Some(configuration))
                if !secret.is_empty() && !configuration.is_empty() =>
            {
                let service = raw
                    .webhook_service
                    .unwrap_or_else(|| "conduit-webhook".to_owned());
                match conduit_core::mesh::check_dns_name(&service) {
                    Ok(()) if !service.contains('.') => Some(WebhookCertificate {
                        secret,
                        configuration,
                        service,
                    }),
                    _ => {
                        error(
                            WEBHOOK_SERVICE,
                            format!("`{service}` is not a Service's name"),
                        );
                        None
                    }
                }
            }
            (secret, configuration) => {
                for (setting, value) in [
                    (WEBHOOK_SECRET, secret),
                    (WEBHOOK_CONFIGURATION, configuration),
                ] {
                    if value.is_none_or(|v| v.is_empty()) {
                        error(
                            setting,
                            "missing: the webhook's certificate needs its Secret and its \
                             webhook configuration together"
                                .into(),
                        );
                    }
                }
                None
            }
        };
        let singleton = if identity_secret.is_none() && webhook.is_none() {
            None
        } else {
            let mut required = |setting, value: Option<String>| match value {
                Some(value) if !value.is_empty() => Some(value),
                _ => {
                    error(
                        setting,
                        "missing: the Lease guarding the identity Secret and the webhook's \
                         certificate needs it (in a pod, from the downward API)"
                            .into(),
                    );
                    None
                }
            };
            let namespace = required(NAMESPACE, raw.namespace);
            let me = required(POD_NAME, raw.pod_name);
            let lease_duration = match raw.lease_duration {
                None => Some(crate::lease::DEFAULT_LEASE_DURATION),
                Some(text) => match conduit_core::time::parse_duration(&text) {
                    Some(d) if (Duration::from_secs(1)..=Duration::from_secs(300)).contains(&d) => {
                        Some(d)
                    }
                    _ => {
                        error(
                            LEASE_DURATION,
                            format!("`{text}` must be a duration from 1s to 300s"),
                        );
                        None
                    }
                },
            };
            match (namespace, me, lease_duration) {
                (Some(namespace), Some(me), Some(lease_duration)) => Some(Singleton {
                    namespace,
                    me,
                    lease: LEASE_NAME.into(),
                    lease_duration,
                    identity_secret,
                    webhook,
                }),
                _ => None,
            }
        };
        let discovery = match (kubernetes, mesh_file, mesh_poll_interval) {
            (true, _, _) => Some(DiscoverySource::Kubernetes {
                cluster_domain,
                kubeconfig: None,
                singleton,
            }),
            (false, Some(path), Some(poll_interval)) => Some(DiscoverySource::File {
                path,
                poll_interval,
            }),
            _ => None,
        };
        match (
            grpc_addr,
            admin_addr,
            discovery,
            identity_dir,
            leaf_lifetime,
        ) {
            (
                Some(grpc_addr),
                Some(admin_addr),
                Some(discovery),
                Some(identity_dir),
                Some(leaf_lifetime),
            ) if errors.is_empty() => Ok(Self {
                grpc_addr,
                admin_addr,
                discovery,
                log: raw.log.unwrap_or_else(|| DEFAULT_LOG.into()),
                identity: IdentityConfig {
                    supplied,
                    leaf_lifetime,
                    ..IdentityConfig::new(identity_dir)
                },
            }),
            _ => Err(InvalidConfig { errors }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_what_is_not_given() {
        let raw = RawControllerConfig {
            mesh_file: Some("mesh.yaml".into()),
            ..Default::default()
        };
        let config = ControllerConfig::try_from(raw).unwrap();
        assert_eq!(config.grpc_addr, "127.0.0.1:8086".parse().unwrap());
        assert_eq!(config.admin_addr, "127.0.0.1:9996".parse().unwrap());
        assert_eq!(
            config.discovery,
            DiscoverySource::File {
                path: "mesh.yaml".into(),
                poll_interval: DEFAULT_MESH_POLL_INTERVAL
            }
        );
        assert_eq!(config.log, "info");
        assert_eq!(config.identity.dir, PathBuf::from("identity"));
        assert_eq!(config.identity.supplied, None);
        assert_eq!(
            config.identity.leaf_lifetime,
            crate::identity::DEFAULT_LEAF_LIFETIME
        );
    }

    #[test]
    fn the_identity_directory_defaults_to_beside_the_mesh_file() {
        let raw = RawControllerConfig {
            mesh_file: Some("/etc/conduit/mesh.yaml".into()),
            identity_leaf_lifetime: Some("90m".into()),
            ..Default::default()
        };
        let config = ControllerConfig::try_from(raw).unwrap();
        assert_eq!(config.identity.dir, PathBuf::from("/etc/conduit/identity"));
        assert_eq!(config.identity.leaf_lifetime, Duration::from_secs(90 * 60));
    }

    #[test]
    fn an_operator_ca_needs_all_three_files() {
        let raw = RawControllerConfig {
            mesh_file: Some("m".into()),
            identity_issuer_cert: Some("issuer.crt".into()),
            ..Default::default()
        };
        let err = ControllerConfig::try_from(raw).unwrap_err();
        let settings: Vec<_> = err.errors.iter().map(|e| e.setting).collect();
        assert_eq!(settings, [IDENTITY_TRUST_ANCHORS, IDENTITY_ISSUER_KEY]);

        let raw = RawControllerConfig {
            mesh_file: Some("m".into()),
            identity_dir: Some("/var/lib/conduit".into()),
            identity_trust_anchors: Some("a.pem".into()),
            identity_issuer_cert: Some("i.crt".into()),
            identity_issuer_key: Some("i.key".into()),
            ..Default::default()
        };
        let config = ControllerConfig::try_from(raw).unwrap();
        assert_eq!(config.identity.dir, PathBuf::from("/var/lib/conduit"));
        assert_eq!(
            config.identity.supplied,
            Some(SuppliedCa {
                trust_anchors: "a.pem".into(),
                issuer_cert: "i.crt".into(),
                issuer_key: "i.key".into(),
            })
        );
        assert_eq!(config.identity.trust_anchors_path(), PathBuf::from("a.pem"));
    }

    #[test]
    fn the_leaf_lifetime_is_bounded() {
        for (text, ok) in [
            ("1m", true),
            ("720h", true),
            ("59s", false),
            ("721h", false),
            ("1d", false),
            ("soon", false),
        ] {
            let raw = RawControllerConfig {
                mesh_file: Some("m".into()),
                identity_leaf_lifetime: Some(text.into()),
                ..Default::default()
            };
            let result = ControllerConfig::try_from(raw);
            assert_eq!(result.is_ok(), ok, "{text}: {result:?}");
            if let Err(err) = result {
                assert_eq!(err.errors[0].setting, IDENTITY_LEAF_LIFETIME);
            }
        }
    }

    #[test]
    fn every_error_names_its_setting() {
        let raw = RawControllerConfig {
            grpc_addr: Some("nope".into()),
            admin_addr: Some("127.0.0.1".into()),
            mesh_file: None,
            mesh_poll_ms: Some("0".into()),
            ..Default::default()
        };
        let err = ControllerConfig::try_from(raw).unwrap_err();
        let settings: Vec<_> = err.errors.iter().map(|e| e.setting).collect();
        assert_eq!(settings, [GRPC_ADDR, ADMIN_ADDR, MESH_FILE, MESH_POLL_MS]);
        assert!(
            err.to_string()
                .contains("CONDUIT_CONTROLLER_GRPC_ADDR (--grpc-addr): `nope`"),
            "{err}"
        );
    }

    #[test]
    fn kubernetes_discovery_needs_no_mesh_file_but_an_identity_directory() {
        let raw = RawControllerConfig {
            discovery: Some("kubernetes".into()),
            identity_dir: Some("/var/lib/conduit/identity".into()),
            ..Default::default()
        };
        let config = ControllerConfig::try_from(raw).unwrap();
        assert_eq!(
            config.discovery,
            DiscoverySource::Kubernetes {
                cluster_domain: "cluster.local".into(),
                kubeconfig: None,
                singleton: None,
            }
        );

        let raw = RawControllerConfig {
            discovery: Some("kubernetes".into()),
            mesh_file: Some("mesh.yaml".into()),
            ..Default::default()
        };
        let err = ControllerConfig::try_from(raw).unwrap_err();
        let settings: Vec<_> = err.errors.iter().map(|e| e.setting).collect();
        assert_eq!(settings, [MESH_FILE, IDENTITY_DIR]);

        let raw = RawControllerConfig {
            discovery: Some("kubernetes".into()),
            identity_dir: Some("i".into()),
            identity_secret: Some("conduit-identity".into()),
            namespace: Some("conduit".into()),
            pod_name: Some("controller-0".into()),
            lease_duration: Some("5s".into()),
            ..Default::default()
        };
        let DiscoverySource::Kubernetes { singleton, .. } =
            ControllerConfig::try_from(raw).unwrap().discovery
        else {
            panic!("kubernetes")
        };
        assert_eq!(
            singleton,
            Some(Singleton {
                namespace: "conduit".into(),
                me: "controller-0".into(),
                lease: LEASE_NAME.into(),
                lease_duration: Duration::from_secs(5),
                identity_secret: Some("conduit-identity".into()),
                webhook: None,
            })
        );
        let raw = RawControllerConfig {
            discovery: Some("kubernetes".into()),
            identity_dir: Some("i".into()),
            identity_secret: Some("conduit-identity".into()),
            lease_duration: Some("0s".into()),
            ..Default::default()
        };
        let err = ControllerConfig::try_from(raw).unwrap_err();
        let settings: Vec<_> = err.errors.iter().map(|e| e.setting).collect();
        assert_eq!(settings, [NAMESPACE, POD_NAME, LEASE_DURATION]);

        // The webhook's certificate alone also runs the Lease (an operator's CA, no webhook
        // certificate in the values).
        let raw = RawControllerConfig {
            discovery: Some("kubernetes".into()),
            identity_dir: Some("i".into()),
            webhook_secret: Some("conduit-webhook-tls".into()),
            webhook_configuration: Some("conduit-proxy-injector-conduit".into()),
            namespace: Some("conduit".into()),
            pod_name: Some("controller-0".into()),
            ..Default::default()
        };
        let DiscoverySource::Kubernetes { singleton, .. } =
            ControllerConfig::try_from(raw).unwrap().discovery
        else {
            panic!("kubernetes")
        };
        let singleton = singleton.unwrap();
        assert_eq!(singleton.identity_secret, None);
        assert_eq!(
            singleton.webhook,
            Some(WebhookCertificate {
                secret: "conduit-webhook-tls".into(),
                configuration: "conduit-proxy-injector-conduit".into(),
                service: "conduit-webhook".into(),
            })
        );
        let raw = RawControllerConfig {
            discovery: Some("kubernetes".into()),
            identity_dir: Some("i".into()),
            webhook_secret: Some("conduit-webhook-tls".into()),
            webhook_service: Some("a.b".into()),
            ..Default::default()
        };
        let err = ControllerConfig::try_from(raw).unwrap_err();
        let settings: Vec<_> = err.errors.iter().map(|e| e.setting).collect();
        assert_eq!(settings, [WEBHOOK_CONFIGURATION]);
        let raw = RawControllerConfig {
            mesh_file: Some("mesh.yaml".into()),
            webhook_secret: Some("s".into()),
            webhook_configuration: Some("c".into()),
            ..Default::default()
        };
        let err = ControllerConfig::try_from(raw).unwrap_err();
        let settings: Vec<_> = err.errors.iter().map(|e| e.setting).collect();
        assert_eq!(settings, [WEBHOOK_SECRET]);

        let raw = RawControllerConfig {
            discovery: Some("kubernetes".into()),
            identity_dir: Some("i".into()),
            cluster_domain: Some("bad_domain".into()),
            ..Default::default()
        };
        let err = ControllerConfig::try_from(raw).unwrap_err();
        assert_eq!(err.errors[0].setting, CLUSTER_DOMAIN);

        let raw = RawControllerConfig {
            discovery: Some("consul".into()),
            mesh_file: Some("mesh.yaml".into()),
            ..Default::default()
        };
        let err = ControllerConfig::try_from(raw).unwrap_err();
        assert_eq!(err.errors[0].setting, DISCOVERY);
    }

    #[test]
    fn the_two_ports_must_differ() {
        let raw = RawControllerConfig {
            grpc_addr: Some("127.0.0.1:9000".into()),
            admin_addr: Some("127.0.0.1:9000".into()),
            mesh_file: Some("m".into()),
            ..Default::default()
        };
        assert_eq!(
            ControllerConfig::try_from(raw).unwrap_err().errors[0].setting,
            ADMIN_ADDR
        );
    }
}
