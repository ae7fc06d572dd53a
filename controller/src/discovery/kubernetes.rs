//! The Kubernetes backend: services, endpoints, pods and `ServiceProfile`s from the API server.
//!
//! Two parts, so that only the second touches IO:
//!
//! - [`KubeView::build`] turns the objects the API server last reported ([`Objects`]) into the
//!   services proxies resolve: one per Service port, named `NAME.NAMESPACE`, its endpoints the
//!   ready addresses of the Service's EndpointSlices (`discovery.k8s.io/v1`) or, on servers
//!   without them, its Endpoints, at the port the Service port maps to; its profile from the
//!   `ServiceProfile` of the same name. Every piece goes through the mesh file's validation,
//!   so a bad profile is refused with the field named, and only that profile.
//! - [`run`] keeps a reflector (a watch that re-lists and resumes after the API server goes
//!   away) on each kind and publishes a new view after every burst of changes. Until every
//!   reflector has synced once the backend is not ready; once it has, an API server that goes
//!   away leaves the last known state serving.
//!
//! Names resolve as clients write them: `NAME.NAMESPACE.svc.CLUSTER_DOMAIN`, `NAME.NAMESPACE.svc`
//! and `NAME.NAMESPACE`, each with or without `:PORT` (without: port 80 if the Service has it,
//! else its first port). A bare `NAME` would need the client's namespace, which the Destination
//! API does not carry: proxies resolve names fully qualified.
//!
//! An endpoint whose pod carries the proxy (the `conduit.io/proxy-version` annotation the
//! injector adds) gets the proxy's admin address (`POD_IP:4191`), so `conduit stat` reads it;
//! its identity is the pod's `conduit.io/identity` annotation when present, else, for a pod
//! the injector gave an identity (`conduit.io/identity-mode: default`), its ServiceAccount's
//! (`NAME.NAMESPACE.serviceaccount.identity.conduit.CLUSTER_DOMAIN`, what the controller
//! certifies for a proxy presenting that account's token).
//!
//! Authorization policy: a Service port governed by a `Server` gets the policy its
//! `AuthorizationPolicy`s assemble ([`crate::crd`]), in the profile, so the proxy in front of
//! each of its pods enforces it. A policy that does not validate fails closed: the port denies
//! every client (audit mode, when the Server asks for it, stays) and the object at fault is
//! reported with its field. A pod address (`POD_IP:TARGET_PORT`, what an endpoint of a Service
//! is, ready or not) resolves too: to that one endpoint, with its Service port's profile and
//! policy, so an injected proxy finds the policy of its own pod by its own address, and a
//! client dialling a pod directly reaches that pod (with mTLS when it is meshed).
//!
//! Probes: the kubelet probes a pod in plaintext from its node, through the pod's proxy, so a
//! port whose policy denies unauthenticated clients would fail its own pod's probes. A pod
//! address on a governed port therefore resolves with the pod's HTTP probe paths in its policy
//! (Linkerd authorizes them by default too): the `httpGet` liveness, readiness and startup
//! probes of its containers whose port (a number, or the name of one of that container's
//! ports) is the address's port, with scheme HTTP and no `host` other than the pod's address.
//! The proxy admits `GET`/`HEAD` of exactly those paths and nothing more
//! ([`conduit_core::policy::authorize_request`]). A path the policy cannot hold (not visible
//! ASCII, too long, more than the policy's bound) is reported and not admitted. The Service's
//! own name resolves without them: probes are one pod's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use conduit_core::identity::service_account_identity;
use conduit_core::mesh::{
    Endpoint, Mesh, RawAuthorization, RawEndpoint, RawMesh, RawServerPolicy, RawService, Service,
    split_authority, validate_server_policy,
};
use conduit_core::policy::{DefaultPolicy, MAX_PROBE_PATHS, ProbePath};
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{
    Container, Endpoints, HTTPGetAction, Pod, Service as KService, ServicePort,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};

use super::publish::{Publisher, View};
use super::{Discovery, ServiceWatch, WatchError};
use crate::crd::{
    AuthorizationPolicy, AuthorizationPolicySpec, Server, ServerPort, ServiceProfile,
};
use crate::metrics::Metrics;

/// The cluster's DNS domain unless configured otherwise.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// The port of an injected proxy's admin server.
pub const PROXY_ADMIN_PORT: u16 = 4191;

/// The annotation of a pod that has the proxy (added by the injector).
pub const PROXY_VERSION_ANNOTATION: &str = "conduit.io/proxy-version";

/// The annotation naming the workload identity a meshed pod's proxy proves.
pub const IDENTITY_ANNOTATION: &str = "conduit.io/identity";

/// The annotation of an injected pod whose proxy proves its ServiceAccount's identity
/// (`default`; the injector adds it with the trust anchors).
pub const IDENTITY_MODE_ANNOTATION: &str = "conduit.io/identity-mode";

/// The label EndpointSlices carry naming their Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// How long changes are gathered before a new view is published: a rollout changes many
/// objects at once, and one view for the burst costs proxies one update instead of dozens.
pub const PUBLISH_DELAY: Duration = Duration::from_millis(20);

/// The objects a view is built from, as the API server last reported them.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    /// Services of every namespace.
    pub services: Vec<Arc<KService>>,
    /// Endpoints, used when the server has no `discovery.k8s.io/v1` EndpointSlices.
    pub endpoints: Vec<Arc<Endpoints>>,
    /// EndpointSlices (when the server has them; then `endpoints` is ignored).
    pub slices: Option<Vec<Arc<EndpointSlice>>>,
    /// Pods, for each endpoint's proxy admin address and identity.
    pub pods: Vec<Arc<Pod>>,
    /// ServiceProfiles.
    pub profiles: Vec<Arc<ServiceProfile>>,
    /// Servers: which Service ports have an authorization policy.
    pub servers: Vec<Arc<Server>>,
    /// AuthorizationPolicies: the clients each Server admits.
    pub authorizations: Vec<Arc<AuthorizationPolicy>>,
}

/// Services as proxies resolve them: by namespace, then name, one [`Service`] per port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeView {
    namespaces: BTreeMap<String, BTreeMap<String, Vec<Arc<Service>>>>,
    /// Services by cluster IP (`namespace`, `name`): clients that address a Service by its
    /// IP, as a redirected connection's original destination does.
    cluster_ips: BTreeMap<IpAddr, (String, String)>,
    /// Endpoint addresses (`POD_IP:TARGET_PORT`, ready or not) and the Service port whose
    /// endpoints include them: how a pod's proxy finds the policy of its own pod.
    pod_addrs: BTreeMap<SocketAddr, PodAddr>,
    /// `.svc.CLUSTER_DOMAIN`, the suffix fully qualified names carry.
    suffix: String,
}

/// The Service port an endpoint address belongs to, and the endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodAddr {
    /// `(namespace, name, index of the port in the Service)`: when several Service ports have
    /// the address, the least wins, so the choice does not depend on the order objects come in.
    rank: (String, String, usize),
    /// The Service port (the port of the service as the view names it).
    port: u16,
    /// The endpoint, as the Service's endpoints have it.
    endpoint: Endpoint,
    /// The pod's HTTP probe paths on this port, when the Service port has a policy (sorted,
    /// at most [`MAX_PROBE_PATHS`]).
    probe_paths: Vec<ProbePath>,
}

/// Something in the cluster that could not be used as written, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `namespace/name` of the object.
    pub object: String,
    /// What is wrong, naming the field.
    pub reason: String,
}

impl core::fmt::Display for Problem {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

impl KubeView {
    /// A view with no services.
    #[must_use]
    pub fn empty(cluster_domain: &str) -> Self {
        Self {
            namespaces: BTreeMap::new(),
            cluster_ips: BTreeMap::new(),
            pod_addrs: BTreeMap::new(),
            suffix: format!(
                ".svc.{}",
                cluster_domain.trim_matches('.').to_ascii_lowercase()
            ),
        }
    }

    /// Builds the view from the cluster's objects, with what could not be used.
    #[must_use]
    pub fn build(objects: &Objects, cluster_domain: &str) -> (Self, Vec<Problem>) {
        let mut view = Self::empty(cluster_domain);
        let mut problems = Vec::new();
        let pods: BTreeMap<(&str, &str), &Pod> = objects
            .pods
            .iter()
            .filter_map(|pod| {
                Some((
                    (
                        pod.metadata.namespace.as_deref()?,
                        pod.metadata.name.as_deref()?,
                    ),
                    &**pod,
                ))
            })
            .collect();
        let mut profiles: BTreeMap<(&str, String), &ServiceProfile> = BTreeMap::new();
        for profile in &objects.profiles {
            let (Some(ns), Some(name)) = (
                profile.metadata.namespace.as_deref(),
                profile.metadata.name.as_deref(),
            ) else {
                continue;
            };
            // `web` or `web.NAMESPACE.svc.CLUSTER_DOMAIN` (Linkerd's form) name Service `web`.
            let service = name
                .to_ascii_lowercase()
                .strip_suffix(&view.suffix)
                .and_then(|rest| rest.strip_suffix(&format!(".{ns}")).map(str::to_owned))
                .unwrap_or_else(|| name.to_ascii_lowercase());
            profiles.insert((ns, service), profile);
        }
        let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
        for slice in objects.slices.iter().flatten() {
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL));
            if let (Some(ns), Some(service)) = (slice.metadata.namespace.as_deref(), service) {
                slices
                    .entry((ns, service.as_str()))
                    .or_default()
                    .push(slice);
            }
        }
        let endpoints: BTreeMap<(&str, &str), &Endpoints> = objects
            .endpoints
            .iter()
            .filter_map(|e| {
                Some((
                    (
                        e.metadata.namespace.as_deref()?,
                        e.metadata.name.as_deref()?,
                    ),
                    &**e,
                ))
            })
            .collect();

        let policies = PolicyIndex::build(objects, cluster_domain, &mut problems);
        let mut governing = BTreeSet::new();

        for service in &objects.services {
            let (Some(ns), Some(name)) = (
                service.metadata.namespace.as_deref(),
                service.metadata.name.as_deref(),
            ) else {
                continue;
            };
            let Some(spec) = &service.spec else { continue };
            if spec.type_.as_deref() == Some("ExternalName") {
                continue;
            }
            let object = format!("{ns}/{name}");
            let profile = profiles.get(&(ns, name.to_owned())).copied();
            let mut built = Vec::new();
            for (index, port) in spec.ports.iter().flatten().enumerate() {
                if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                    continue;
                }
                let Ok(number) = u16::try_from(port.port) else {
                    continue;
                };
                let addrs = if objects.slices.is_some() {
                    slice_addrs(slices.get(&(ns, name)).map_or(&[][..], Vec::as_slice), port)
                } else {
                    endpoints_addrs(endpoints.get(&(ns, name)).copied(), port)
                };
                let ready: BTreeSet<SocketAddr> = addrs.ready.iter().map(|(a, _)| *a).collect();
                let policy = policies.port_policy(ns, name, port, &mut governing, &mut problems);
                // Each pod's probes, on a governed port only: without a policy every client,
                // the kubelet included, is allowed.
                let mut probes = BTreeMap::new();
                if policy.is_some() {
                    for (addr, pod) in addrs.ready.iter().chain(&addrs.not_ready) {
                        if let Some(pod) = pod.and_then(|p| pods.get(&(ns, p)).copied()) {
                            let paths = pod_probe_paths(pod, *addr, &mut problems);
                            if !paths.is_empty() {
                                probes.insert(*addr, paths);
                            }
                        }
                    }
                }
                let raw_endpoints = addrs
                    .ready
                    .into_iter()
                    .chain(addrs.not_ready)
                    .map(|(addr, pod)| {
                        raw_endpoint(
                            addr,
                            pod.and_then(|p| pods.get(&(ns, p)).copied()),
                            cluster_domain,
                        )
                    })
                    .collect();
                let mesh_name =
                    format!("{}.{}", name.to_ascii_lowercase(), ns.to_ascii_lowercase());
                let mut raw = profile.map_or_else(RawService::default, |p| p.spec.to_raw(number));
                raw.port = Some(number);
                raw.endpoints = raw_endpoints;
                raw.policy = policy;
                let validated = match validate(&mesh_name, raw.clone()) {
                    Ok(service) => Some(service),
                    Err(reason) if profile.is_some() => {
                        // The profile is at fault (the endpoints come from the API server):
                        // serve the service without it rather than not at all.
                        problems.push(Problem {
                            object: format!("ServiceProfile {object}"),
                            reason,
                        });
                        raw.profile = None;
                        raw.breaker = None;
                        validate(&mesh_name, raw)
                            .map_err(|reason| {
                                problems.push(Problem {
                                    object: format!("Service {object}"),
                                    reason,
                                });
                            })
                            .ok()
                    }
                    Err(reason) => {
                        problems.push(Problem {
                            object: format!("Service {object}"),
                            reason,
                        });
                        None
                    }
                };
                if let Some(service) = validated {
                    let (service, all) = only_ready(&service, &ready);
                    let rank = (ns.to_ascii_lowercase(), name.to_ascii_lowercase(), index);
                    view.add_pod_addrs(&rank, number, all, &mut probes);
                    built.push(service);
                }
            }
            // `None` (headless) and absent cluster IPs parse as no address.
            for ip in spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .filter_map(|ip| ip.parse::<IpAddr>().ok())
            {
                view.cluster_ips
                    .insert(ip, (ns.to_ascii_lowercase(), name.to_ascii_lowercase()));
            }
            view.namespaces
                .entry(ns.to_ascii_lowercase())
                .or_default()
                .insert(name.to_ascii_lowercase(), built);
        }
        policies.report_idle(objects, &governing, &mut problems);
        (view, problems)
    }

    /// The number of services (Service ports) in the view.
    #[must_use]
    pub fn len(&self) -> usize {
        self.namespaces
            .values()
            .flat_map(BTreeMap::values)
            .map(Vec::len)
            .sum()
    }

    /// Whether the view has no services.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The cluster's `Server`s, each with the policy its `AuthorizationPolicy`s assemble, by the
/// Service they govern.
struct PolicyIndex<'a> {
    /// Servers by `(namespace, Service name)`, in name order.
    by_service: BTreeMap<(&'a str, &'a str), Vec<Governor<'a>>>,
}

/// One `Server` and the policy of the ports it governs.
struct Governor<'a> {
    name: &'a str,
    port: Option<&'a ServerPort>,
    /// Valid, or the deny-everyone policy it failed closed to.
    policy: RawServerPolicy,
}

impl<'a> PolicyIndex<'a> {
    /// Assembles each Server's policy, reporting every AuthorizationPolicy that names no
    /// Server and every policy that fails closed.
    fn build(objects: &'a Objects, cluster_domain: &str, problems: &mut Vec<Problem>) -> Self {
        let mut servers: BTreeMap<(&str, &str), &Server> = BTreeMap::new();
        for server in &objects.servers {
            if let (Some(ns), Some(name)) = (
                server.metadata.namespace.as_deref(),
                server.metadata.name.as_deref(),
            ) {
                servers.insert((ns, name), server);
            }
        }
        // Each Server's authorizations in AuthorizationPolicy name order; `None` for one that
        // does not validate.
        let mut named: BTreeMap<(&str, &str), BTreeMap<&str, Option<RawAuthorization>>> =
            BTreeMap::new();
        for policy in &objects.authorizations {
            let (Some(ns), Some(name)) = (
                policy.metadata.namespace.as_deref(),
                policy.metadata.name.as_deref(),
            ) else {
                continue;
            };
            let server = policy.spec.server.as_str();
            let object = format!("AuthorizationPolicy {ns}/{name}");
            if !servers.contains_key(&(ns, server)) {
                problems.push(Problem {
                    object,
                    reason: format!("spec.server: no Server `{server}` in namespace {ns}; ignored"),
                });
                continue;
            }
            let raw = authorization(ns, &policy.spec, cluster_domain);
            let one = RawServerPolicy {
                authorizations: vec![raw.clone()],
                ..RawServerPolicy::default()
            };
            let valid = match validate_server_policy(one) {
                Ok(_) => Some(raw),
                Err(invalid) => {
                    let reasons: Vec<String> = invalid
                        .errors
                        .iter()
                        .map(|e| format!("{}: {}", spec_field(&policy.spec, &e.path), e.reason))
                        .collect();
                    problems.push(Problem {
                        object,
                        reason: format!(
                            "{}; Server `{server}` denies every client until this is fixed",
                            reasons.join("; ")
                        ),
                    });
                    None
                }
            };
            named.entry((ns, server)).or_default().insert(name, valid);
        }
        let mut by_service: BTreeMap<(&str, &str), Vec<Governor<'a>>> = BTreeMap::new();
        for ((ns, name), server) in servers {
            let spec = &server.spec;
            let authorizations: Option<Vec<RawAuthorization>> = named
                .remove(&(ns, name))
                .unwrap_or_default()
                .into_values()
                .collect();
            let policy = match authorizations {
                // An AuthorizationPolicy at fault, reported above.
                None => deny_everyone(spec.audit),
                Some(authorizations) => {
                    let raw = RawServerPolicy {
                        default: Some(spec.default_policy().as_str().to_owned()),
                        audit: spec.audit,
                        authorizations,
                        probe_paths: Vec::new(),
                    };
                    match validate_server_policy(raw.clone()) {
                        Ok(_) => raw,
                        Err(invalid) => {
                            let reasons: Vec<String> = invalid
                                .errors
                                .iter()
                                .map(|e| match e.path.as_str() {
                                    "authorizations" => format!(
                                        "more AuthorizationPolicies name it than the {} a \
                                         Server may have",
                                        conduit_core::policy::MAX_AUTHORIZATIONS
                                    ),
                                    path => format!("spec ({path}): {}", e.reason),
                                })
                                .collect();
                            problems.push(Problem {
                                object: format!("Server {ns}/{name}"),
                                reason: format!(
                                    "{}; it denies every client until this is fixed",
                                    reasons.join("; ")
                                ),
                            });
                            deny_everyone(spec.audit)
                        }
                    }
                }
            };
            by_service
                .entry((ns, spec.service.as_str()))
                .or_default()
                .push(Governor {
                    name,
                    port: spec.port.as_ref(),
                    policy,
                });
        }
        Self { by_service }
    }

    /// The policy of one Service port: its Server's. A Server naming the port comes before one
    /// for every port; among equals the first by name governs, and the others are reported.
    /// Every Server considered is added to `seen`.
    fn port_policy(
        &self,
        ns: &'a str,
        service: &str,
        port: &ServicePort,
        seen: &mut BTreeSet<(&'a str, &'a str)>,
        problems: &mut Vec<Problem>,
    ) -> Option<RawServerPolicy> {
        let governors = self.by_service.get(&(ns, service))?;
        let named = |g: &&Governor<'_>| match g.port {
            Some(ServerPort::Number(number)) => i32::from(*number) == port.port,
            Some(ServerPort::Name(name)) => port.name.as_deref() == Some(name.as_str()),
            None => false,
        };
        let every_port: Vec<&Governor<'_>> =
            governors.iter().filter(|g| g.port.is_none()).collect();
        for governor in &every_port {
            // Considered, even when a Server naming this port takes precedence.
            seen.insert((ns, governor.name));
        }
        let mut candidates: Vec<&Governor<'_>> = governors.iter().filter(named).collect();
        if candidates.is_empty() {
            candidates = every_port;
        }
        let (first, others) = candidates.split_first()?;
        seen.insert((ns, first.name));
        for other in others {
            seen.insert((ns, other.name));
            problems.push(Problem {
                object: format!("Server {ns}/{}", other.name),
                reason: format!(
                    "spec.port: port {} of Service `{service}` is governed by Server `{}` (the \
                     first by name); this Server is ignored there",
                    port.port, first.name
                ),
            });
        }
        Some(first.policy.clone())
    }

    /// Reports the Servers that govern no port: their Service or port does not exist.
    fn report_idle(
        &self,
        objects: &Objects,
        seen: &BTreeSet<(&str, &str)>,
        problems: &mut Vec<Problem>,
    ) {
        for ((ns, service), governors) in &self.by_service {
            let exists = objects.services.iter().any(|s| {
                s.metadata.namespace.as_deref() == Some(*ns)
                    && s.metadata.name.as_deref() == Some(*service)
            });
            for governor in governors {
                if seen.contains(&(*ns, governor.name)) {
                    continue;
                }
                let reason = match (exists, governor.port) {
                    (false, _) => format!("spec.service: no Service `{service}` in namespace {ns}"),
                    (true, Some(port)) => {
                        format!("spec.port: Service `{service}` has no TCP port `{port}`")
                    }
                    (true, None) => format!("spec.service: Service `{service}` has no TCP port"),
                };
                problems.push(Problem {
                    object: format!("Server {ns}/{}", governor.name),
                    reason: format!("{reason}; it governs nothing"),
                });
            }
        }
    }
}

/// What a port whose policy does not validate gets: no client is admitted. Audit mode stays
/// when the Server asks for it: audit is the operator saying "deny no one yet", and a policy
/// that would have let everyone through in audit mode opens nothing by staying so (every
/// client is then counted as one the policy would deny).
fn deny_everyone(audit: bool) -> RawServerPolicy {
    RawServerPolicy {
        default: Some(DefaultPolicy::Deny.as_str().to_owned()),
        audit,
        authorizations: Vec::new(),
        probe_paths: Vec::new(),
    }
}

/// An AuthorizationPolicy as a mesh file policy's authorization: its identities, then its
/// ServiceAccounts' identities (a ServiceAccount without a namespace is in the policy's).
fn authorization(
    namespace: &str,
    spec: &AuthorizationPolicySpec,
    cluster_domain: &str,
) -> RawAuthorization {
    let accounts = spec.service_accounts.iter().map(|account| {
        service_account_identity(
            account.namespace.as_deref().unwrap_or(namespace),
            &account.name,
            cluster_domain,
        )
    });
    RawAuthorization {
        identities: spec.identities.iter().cloned().chain(accounts).collect(),
        networks: spec.networks.clone(),
    }
}

/// The AuthorizationPolicy field a path of its one-authorization policy names:
/// `authorizations[0].identities[i]` is `spec.identities[i]` or, past those, a ServiceAccount.
fn spec_field(spec: &AuthorizationPolicySpec, path: &str) -> String {
    let Some(field) = path.strip_prefix("authorizations[0]") else {
        return "spec".into();
    };
    let indexed = |prefix: &str| -> Option<usize> {
        field
            .strip_prefix(prefix)?
            .strip_prefix('[')?
            .strip_suffix(']')?
            .parse()
            .ok()
    };
    if let Some(i) = indexed(".identities") {
        return match i.checked_sub(spec.identities.len()) {
            None => format!("spec.identities[{i}]"),
            Some(j) => format!("spec.serviceAccounts[{j}]"),
        };
    }
    if let Some(i) = indexed(".networks") {
        return format!("spec.networks[{i}]");
    }
    match field {
        ".identities" => "spec.identities and spec.serviceAccounts".into(),
        ".networks" => "spec.networks".into(),
        _ => "spec".into(),
    }
}

/// Validates one service as the mesh file would, naming the field of a problem.
fn validate(name: &str, raw: RawService) -> Result<Arc<Service>, String> {
    let mesh = Mesh::try_from(RawMesh {
        services: BTreeMap::from([(name.to_owned(), raw)]),
    })
    .map_err(|err| err.to_string())?;
    mesh.services()
        .next()
        .map(|s| Arc::new(s.clone()))
        .ok_or_else(|| "no service".to_owned())
}

fn raw_endpoint(addr: SocketAddr, pod: Option<&Pod>, cluster_domain: &str) -> RawEndpoint {
    let mut endpoint = RawEndpoint {
        addr: addr.to_string(),
        ..RawEndpoint::default()
    };
    if let Some(pod) = pod {
        if let Some(name) = &pod.metadata.name {
            endpoint.labels.insert("pod".into(), name.clone());
        }
        let annotations = pod.metadata.annotations.as_ref();
        if annotations.is_some_and(|a| a.contains_key(PROXY_VERSION_ANNOTATION)) {
            endpoint.admin = Some(SocketAddr::new(addr.ip(), PROXY_ADMIN_PORT).to_string());
            endpoint.identity = annotations
                .and_then(|a| a.get(IDENTITY_ANNOTATION))
                .cloned()
                .or_else(|| {
                    // The injector gave the proxy its ServiceAccount's identity (and told so).
                    let mode = annotations.and_then(|a| a.get(IDENTITY_MODE_ANNOTATION));
                    (mode.map(String::as_str) == Some("default")).then(|| {
                        let account = pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.service_account_name.as_deref())
                            .filter(|a| !a.is_empty())
                            .unwrap_or("default");
                        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
                        service_account_identity(namespace, account, cluster_domain)
                    })
                });
        }
    }
    endpoint
}

/// The paths of `pod`'s HTTP probes that the kubelet sends to `addr` (through the pod's
/// proxy): the `httpGet` liveness, readiness and startup probes of its containers (and of its
/// sidecar init containers) whose port is `addr`'s, by number or by the name of one of that
/// container's ports; not those over HTTPS (TLS the proxy cannot look into) or to another
/// `host`. A path is as the kubelet requests it: `/` when empty, with a `/` put first when it
/// has none. Sorted, once each, at most [`MAX_PROBE_PATHS`]; a path a policy cannot hold, and
/// those past the bound, are reported in `problems` and left out (their probes then fail
/// under a policy that denies the kubelet, as they did before probes were admitted).
fn pod_probe_paths(pod: &Pod, addr: SocketAddr, problems: &mut Vec<Problem>) -> Vec<ProbePath> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    let object = || {
        format!(
            "Pod {}/{}",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            pod.metadata.name.as_deref().unwrap_or("")
        )
    };
    let containers = spec
        .containers
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("spec.containers[{i}]"), c))
        .chain(
            spec.init_containers
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, c)| (format!("spec.initContainers[{i}]"), c)),
        );
    let mut paths = BTreeSet::new();
    for (field, container) in containers {
        let probes = [
            ("livenessProbe", &container.liveness_probe),
            ("readinessProbe", &container.readiness_probe),
            ("startupProbe", &container.startup_probe),
        ];
        for (kind, probe) in probes {
            let Some(get) = probe.as_ref().and_then(|p| p.http_get.as_ref()) else {
                continue;
            };
            if !probes_addr(get, container, addr) {
                continue;
            }
            let path = get.path.as_deref().unwrap_or("");
            let path = if path.starts_with('/') {
                path.to_owned()
            } else {
                format!("/{path}")
            };
            match ProbePath::parse(&path) {
                Ok(path) => {
                    paths.insert(path);
                }
                Err(reason) => problems.push(Problem {
                    object: object(),
                    reason: format!(
                        "{field}.{kind}.httpGet.path: {reason}; the proxy does not admit this \
                         probe past a policy that denies the kubelet"
                    ),
                }),
            }
        }
    }
    if paths.len() > MAX_PROBE_PATHS {
        problems.push(Problem {
            object: object(),
            reason: format!(
                "{} HTTP probe paths on port {}, above the {MAX_PROBE_PATHS} a policy admits; \
                 only the first {MAX_PROBE_PATHS} in byte order are admitted",
                paths.len(),
                addr.port()
            ),
        });
    }
    paths.into_iter().take(MAX_PROBE_PATHS).collect()
}

/// Whether the kubelet sends an `httpGet` probe of `container` to `addr` in plaintext.
fn probes_addr(get: &HTTPGetAction, container: &Container, addr: SocketAddr) -> bool {
    let port = match &get.port {
        IntOrString::Int(number) => Some(*number),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    };
    let https = get
        .scheme
        .as_deref()
        .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
    // The kubelet sends to `host` when set (the pod's IP otherwise).
    let elsewhere = get
        .host
        .as_deref()
        .filter(|h| !h.is_empty())
        .is_some_and(|h| h.parse::<IpAddr>().ok() != Some(addr.ip()));
    port == Some(i32::from(addr.port())) && !https && !elsewhere
}

/// Whether an endpoint port serves a Service port: the same name (Kubernetes names every
/// port of a multi-port Service, and the endpoints controllers copy the name).
fn same_port_name(endpoint_port: Option<&str>, service: &ServicePort) -> bool {
    endpoint_port.unwrap_or("") == service.name.as_deref().unwrap_or("")
}

/// The addresses of a Service port's endpoints, with their pods.
#[derive(Debug, Default)]
struct Addrs<'a> {
    /// Ready: the Service's endpoints.
    ready: Vec<(SocketAddr, Option<&'a str>)>,
    /// Not ready: no client is sent there, but the pod's own proxy still resolves its address.
    not_ready: Vec<(SocketAddr, Option<&'a str>)>,
}

/// The addresses, with their pods, of a Service port in its EndpointSlices.
fn slice_addrs<'a>(slices: &[&'a EndpointSlice], port: &ServicePort) -> Addrs<'a> {
    let mut out = BTreeSet::new();
    for slice in slices {
        if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
            continue;
        }
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| same_port_name(p.name.as_deref(), port))
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // `ready` absent means ready (the API's documented reading).
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            let pod = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.as_deref());
            for address in &endpoint.addresses {
                if let Ok(ip) = address.parse::<IpAddr>() {
                    out.insert((!ready, SocketAddr::new(ip, target), pod));
                }
            }
        }
    }
    dedupe(out)
}

/// The addresses, with their pods, of a Service port in its Endpoints.
fn endpoints_addrs<'a>(endpoints: Option<&'a Endpoints>, port: &ServicePort) -> Addrs<'a> {
    let mut out = BTreeSet::new();
    for subset in endpoints
        .and_then(|e| e.subsets.as_ref())
        .into_iter()
        .flatten()
    {
        let Some(target) = subset
            .ports
            .iter()
            .flatten()
            .find(|p| same_port_name(p.name.as_deref(), port))
            .and_then(|p| u16::try_from(p.port).ok())
        else {
            continue;
        };
        let ready = subset.addresses.iter().flatten().map(|a| (true, a));
        let not_ready = subset
            .not_ready_addresses
            .iter()
            .flatten()
            .map(|a| (false, a));
        for (ready, address) in ready.chain(not_ready) {
            let pod = address
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.as_deref());
            if let Ok(ip) = address.ip.parse::<IpAddr>() {
                out.insert((!ready, SocketAddr::new(ip, target), pod));
            }
        }
    }
    dedupe(out)
}

/// One entry per address (an address in two slices during a move counts once, and ready if
/// either says so). The entries are `(not ready, address, pod)`, so ready ones come first.
fn dedupe(addrs: BTreeSet<(bool, SocketAddr, Option<&str>)>) -> Addrs<'_> {
    let mut seen = BTreeSet::new();
    let mut out = Addrs::default();
    for (not_ready, addr, pod) in addrs {
        if seen.insert(addr) {
            if not_ready {
                out.not_ready.push((addr, pod));
            } else {
                out.ready.push((addr, pod));
            }
        }
    }
    out
}

/// The service with only its ready endpoints (what clients are balanced over), and every
/// endpoint it was validated with (what pod addresses resolve to).
fn only_ready(service: &Service, ready: &BTreeSet<SocketAddr>) -> (Arc<Service>, Vec<Endpoint>) {
    let all = service.endpoints.clone();
    let service = Service {
        endpoints: all
            .iter()
            .filter(|e| ready.contains(&e.addr))
            .cloned()
            .collect(),
        ..service.clone()
    };
    (Arc::new(service), all)
}

impl KubeView {
    /// Records the endpoint addresses of a Service port, with their pods' probe paths (taken
    /// from `probes`), unless a Service port that ranks first already has them.
    fn add_pod_addrs(
        &mut self,
        rank: &(String, String, usize),
        port: u16,
        all: Vec<Endpoint>,
        probes: &mut BTreeMap<SocketAddr, Vec<ProbePath>>,
    ) {
        for endpoint in all {
            let probe_paths = probes.remove(&endpoint.addr).unwrap_or_default();
            let found = PodAddr {
                rank: rank.clone(),
                port,
                endpoint,
                probe_paths,
            };
            match self.pod_addrs.entry(found.endpoint.addr) {
                std::collections::btree_map::Entry::Occupied(mut entry) => {
                    if *rank < entry.get().rank {
                        entry.insert(found);
                    }
                }
                std::collections::btree_map::Entry::Vacant(entry) => {
                    entry.insert(found);
                }
            }
        }
    }

    /// The service a pod address resolves to: its one endpoint, with the profile (and policy)
    /// of the Service port whose endpoints include it, the policy admitting the pod's probes.
    fn pod_addr(&self, addr: SocketAddr) -> Option<Arc<Service>> {
        let found = self.pod_addrs.get(&addr)?;
        let (namespace, name, _) = &found.rank;
        let service = self
            .namespaces
            .get(namespace)?
            .get(name)?
            .iter()
            .find(|s| s.port == found.port)?;
        let mut profile = service.profile.clone();
        if let Some(policy) = profile.policy().filter(|_| !found.probe_paths.is_empty()) {
            // Within the bound (checked when the view was built); were it not, the port keeps
            // its policy without probes rather than fail open.
            if let Ok(policy) = policy.clone().with_probe_paths(found.probe_paths.clone()) {
                profile = profile.with_policy(Some(policy));
            }
        }
        Some(Arc::new(Service {
            name: service.name.clone(),
            port: service.port,
            endpoints: vec![found.endpoint.clone()],
            profile,
        }))
    }
}

impl View for KubeView {
    fn lookup(&self, authority: &str) -> Option<Arc<Service>> {
        let (host, port) = split_authority(authority)?;
        let host = host.trim_end_matches('.');
        let (namespace, name) = match host.parse::<IpAddr>() {
            Ok(ip) => {
                let Some((namespace, name)) = self.cluster_ips.get(&ip) else {
                    // Not a Service's: a pod's, with the port it serves on.
                    return self.pod_addr(SocketAddr::new(ip, port?));
                };
                (namespace.as_str(), name.as_str())
            }
            Err(_) => self.split_name(host)?,
        };
        let ports = self.namespaces.get(namespace)?.get(name)?;
        let found = match port {
            Some(port) => ports.iter().find(|s| s.port == port),
            None => ports
                .iter()
                .find(|s| s.port == 80)
                .or_else(|| ports.first()),
        };
        found.cloned()
    }

    fn services(&self) -> Vec<Arc<Service>> {
        self.namespaces
            .values()
            .flat_map(BTreeMap::values)
            .flatten()
            .cloned()
            .collect()
    }
}

impl KubeView {
    /// `(namespace, name)` of a Service's DNS name in any of its qualified forms.
    fn split_name<'a>(&self, host: &'a str) -> Option<(&'a str, &'a str)> {
        let short = host
            .strip_suffix(self.suffix.as_str())
            .or_else(|| host.strip_suffix(".svc"))
            .unwrap_or(host);
        let (name, namespace) = short.split_once('.')?;
        if namespace.contains('.') {
            return None;
        }
        Some((namespace, name))
    }
}

/// Discovery from the Kubernetes API. Cloning is cheap and clones share state.
#[derive(Clone, Debug)]
pub struct KubeDiscovery {
    publisher: Publisher<KubeView>,
    cluster_domain: String,
}

impl KubeDiscovery {
    /// A backend that is not ready until [`run`] has synced with the API server.
    #[must_use]
    pub fn new(cluster_domain: &str) -> Self {
        Self {
            publisher: Publisher::unready(KubeView::empty(cluster_domain)),
            cluster_domain: cluster_domain.to_owned(),
        }
    }

    /// Publishes a view built from `objects` and returns its generation and the problems found.
    pub fn publish(&self, objects: &Objects) -> (u64, usize, Vec<Problem>) {
        let (view, problems) = KubeView::build(objects, &self.cluster_domain);
        let services = view.len();
        (self.publisher.replace(view), services, problems)
    }
}

impl Discovery for KubeDiscovery {
    fn watch(&self, authority: &str) -> Result<ServiceWatch, WatchError> {
        self.publisher.watch(authority)
    }

    fn services(&self) -> Vec<Arc<Service>> {
        self.publisher.services()
    }

    fn is_ready(&self) -> bool {
        self.publisher.is_ready()
    }
}

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubeError {
    /// No usable configuration for a client (no kubeconfig and not in a cluster).
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
}

/// A client from `kubeconfig`, or from the environment: `KUBECONFIG` (or `~/.kube/config`),
/// else the pod's service account when running in a cluster.
///
/// # Errors
///
/// [`KubeError::Config`] when the file is unusable, or nothing is configured.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        None => kube::Config::infer()
            .await
            .map_err(|err| KubeError::Config(err.to_string()))?,
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|err| KubeError::Config(format!("{}: {err}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|err| KubeError::Config(format!("{}: {err}", path.display())))?
        }
    };
    Client::try_from(config).map_err(|err| KubeError::Config(err.to_string()))
}

/// Follows the API server and publishes to `discovery`, forever (abort the task to stop).
///
/// Every watch re-lists and resumes after errors with backoff; errors are logged and counted
/// and the last good view keeps serving.
pub async fn run(client: Client, discovery: KubeDiscovery, metrics: Arc<Metrics>) {
    let use_slices = has_resource(&client, "discovery.k8s.io/v1", "endpointslices").await;
    let has_profiles = has_resource(&client, "conduit.io/v1alpha1", "serviceprofiles").await;
    let has_servers = has_resource(&client, "conduit.io/v1alpha1", "servers").await;
    let has_authorizations =
        has_resource(&client, "conduit.io/v1alpha1", "authorizationpolicies").await;
    tracing::info!(
        endpoints = if use_slices {
            "EndpointSlices (discovery.k8s.io/v1)"
        } else {
            "Endpoints (v1)"
        },
        profiles = has_profiles,
        servers = has_servers,
        authorization_policies = has_authorizations,
        "Kubernetes discovery starting"
    );
    if !has_profiles {
        tracing::warn!(
            "the ServiceProfile CRD is not installed: services get no routes (install the CRDs, then restart the controller)"
        );
    }
    if !has_servers || !has_authorizations {
        tracing::warn!(
            "the Server or AuthorizationPolicy CRD is not installed: no port gets an authorization policy (install the CRDs, then restart the controller)"
        );
    }
    let changed = Arc::new(tokio::sync::Notify::new());
    let (services, services_task) = follow::<KService>(&client, &changed, "services");
    let (pods, pods_task) = follow::<Pod>(&client, &changed, "pods");
    let (endpoints, endpoints_task, slices, slices_task) = if use_slices {
        let (slices, task) = follow::<EndpointSlice>(&client, &changed, "endpointslices");
        (None, None, Some(slices), Some(task))
    } else {
        let (endpoints, task) = follow::<Endpoints>(&client, &changed, "endpoints");
        (Some(endpoints), Some(task), None, None)
    };
    let (profiles, profiles_task) = if has_profiles {
        let (store, task) = follow::<ServiceProfile>(&client, &changed, "serviceprofiles");
        (Some(store), Some(task))
    } else {
        (None, None)
    };
    // Both or neither: AuthorizationPolicies without their Servers would only be reported.
    let (servers, servers_task, authorizations, authorizations_task) =
        if has_servers && has_authorizations {
            let (servers, servers_task) = follow::<Server>(&client, &changed, "servers");
            let (authorizations, authorizations_task) =
                follow::<AuthorizationPolicy>(&client, &changed, "authorizationpolicies");
            (
                Some(servers),
                Some(servers_task),
                Some(authorizations),
                Some(authorizations_task),
            )
        } else {
            (None, None, None, None)
        };
    let publisher = async {
        let ready = async {
            let _ = services.wait_until_ready().await;
            let _ = pods.wait_until_ready().await;
            if let Some(store) = &endpoints {
                let _ = store.wait_until_ready().await;
            }
            if let Some(store) = &slices {
                let _ = store.wait_until_ready().await;
            }
            if let Some(store) = &profiles {
                let _ = store.wait_until_ready().await;
            }
            // No view before the policies are known: one without them would admit every
            // client of a governed port until the next.
            if let Some(store) = &servers {
                let _ = store.wait_until_ready().await;
            }
            if let Some(store) = &authorizations {
                let _ = store.wait_until_ready().await;
            }
        };
        ready.await;
        tracing::info!("Kubernetes discovery synced");
        loop {
            let objects = Objects {
                services: services.state(),
                endpoints: endpoints.as_ref().map(Store::state).unwrap_or_default(),
                slices: slices.as_ref().map(Store::state),
                pods: pods.state(),
                profiles: profiles.as_ref().map(Store::state).unwrap_or_default(),
                servers: servers.as_ref().map(Store::state).unwrap_or_default(),
                authorizations: authorizations
                    .as_ref()
                    .map(Store::state)
                    .unwrap_or_default(),
            };
            let (generation, count, problems) = discovery.publish(&objects);
            metrics.record_mesh_reload(generation, count);
            for problem in &problems {
                metrics.record_mesh_reject();
                tracing::warn!(%problem, "not used as written");
            }
            tracing::debug!(generation, services = count, "published Kubernetes view");
            changed.notified().await;
            tokio::time::sleep(PUBLISH_DELAY).await;
        }
    };
    let tasks = futures_util::future::join_all(
        [
            Some(services_task),
            Some(pods_task),
            endpoints_task,
            slices_task,
            profiles_task,
            servers_task,
            authorizations_task,
        ]
        .into_iter()
        .flatten(),
    );
    tokio::select! {
        () = publisher => {}
        _ = tasks => {}
    }
}

type Task = core::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// A reflector on every object of kind `K`, cluster-wide, waking `changed` on each event.
fn follow<K>(
    client: &Client,
    changed: &Arc<tokio::sync::Notify>,
    what: &'static str,
) -> (Store<K>, Task)
where
    K: Resource<DynamicType = ()>
        + Clone
        + core::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    let (store, writer) = reflector::store();
    let changed = Arc::clone(changed);
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default())
            // Nothing reads managedFields; they are often most of an object.
            .modify(|object: &mut K| object.meta_mut().managed_fields = None)
            .default_backoff(),
    );
    let task = Box::pin(async move {
        let mut stream = core::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => changed.notify_one(),
                Err(err) => {
                    tracing::warn!(what, error = %err, "Kubernetes watch failed; retrying (the last known state keeps serving)")
                }
            }
        }
    });
    (store, task)
}

/// Whether the API server serves `resource` in `group_version`; asked until it answers.
async fn has_resource(client: &Client, group_version: &str, resource: &str) -> bool {
    let mut delay = Duration::from_millis(200);
    loop {
        match client.list_api_group_resources(group_version).await {
            Ok(list) => return list.resources.iter().any(|r| r.name == resource),
            Err(kube::Error::Api(status)) if status.code == 404 => return false,
            Err(err) => {
                tracing::warn!(group_version, error = %err, "cannot reach the Kubernetes API; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object<K: serde::de::DeserializeOwned>(value: serde_json::Value) -> Arc<K> {
        Arc::new(serde_json::from_value(value).expect("a valid object"))
    }

    /// Service `web` in `shop`: `http` 80 -> `web` 8080 and `admin` 9000 -> 9090.
    fn web_service() -> Arc<KService> {
        object(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::10"], "ports": [
                {"name": "http", "port": 80, "targetPort": "web"},
                {"name": "admin", "port": 9000, "targetPort": 9090},
            ]},
        }))
    }

    fn pod(name: &str, meshed: bool) -> Arc<Pod> {
        let annotations = if meshed {
            json!({PROXY_VERSION_ANNOTATION: "v1", IDENTITY_ANNOTATION: "web.shop.serviceaccount.identity.conduit.local"})
        } else {
            json!({})
        };
        object(json!({"metadata": {"name": name, "namespace": "shop", "annotations": annotations}}))
    }

    fn endpoints() -> Arc<Endpoints> {
        object(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "subsets": [{
                "addresses": [
                    {"ip": "10.0.0.1", "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"}},
                    {"ip": "10.0.0.2", "targetRef": {"kind": "Pod", "name": "web-2", "namespace": "shop"}},
                ],
                "notReadyAddresses": [{"ip": "10.0.0.3"}],
                "ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9090}],
            }],
        }))
    }

    fn objects() -> Objects {
        Objects {
            services: vec![web_service()],
            endpoints: vec![endpoints()],
            pods: vec![pod("web-1", true), pod("web-2", false)],
            ..Objects::default()
        }
    }

    fn addrs(service: &Service) -> Vec<String> {
        service
            .endpoints
            .iter()
            .map(|e| e.addr.to_string())
            .collect()
    }

    #[test]
    fn each_service_port_resolves_to_its_ready_endpoints_at_the_target_port() {
        let (view, problems) = KubeView::build(&objects(), DEFAULT_CLUSTER_DOMAIN);
        assert_eq!(problems, []);
        assert_eq!(view.len(), 2);
        let http = view.lookup("web.shop.svc.cluster.local:80").expect("found");
        assert_eq!(http.name, "web.shop");
        assert_eq!(addrs(&http), ["10.0.0.1:8080", "10.0.0.2:8080"]);
        let admin = view.lookup("web.shop:9000").expect("found");
        assert_eq!(addrs(&admin), ["10.0.0.1:9090", "10.0.0.2:9090"]);
        // The meshed pod's endpoint carries its proxy's admin address and identity.
        let meshed = &http.endpoints[0];
        assert_eq!(meshed.admin, Some("10.0.0.1:4191".parse().expect("addr")));
        assert_eq!(
            meshed.identity.as_deref(),
            Some("web.shop.serviceaccount.identity.conduit.local")
        );
        assert_eq!(meshed.labels.get("pod").map(String::as_str), Some("web-1"));
        assert_eq!(http.endpoints[1].admin, None);
        assert_eq!(http.endpoints[1].identity, None);
    }

    #[test]
    fn an_injected_pods_endpoint_proves_its_service_accounts_identity() {
        let injected = |name: &str, account: Option<&str>| -> Arc<Pod> {
            let mut spec = json!({"containers": []});
            if let Some(account) = account {
                spec["serviceAccountName"] = account.into();
            }
            object(json!({
                "metadata": {"name": name, "namespace": "shop", "annotations": {
                    PROXY_VERSION_ANNOTATION: "v1", IDENTITY_MODE_ANNOTATION: "default",
                }},
                "spec": spec,
            }))
        };
        let objects = Objects {
            pods: vec![injected("web-1", Some("web")), injected("web-2", None)],
            ..objects()
        };
        let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        assert_eq!(problems, []);
        let http = view.lookup("web.shop:80").expect("found");
        let identities: Vec<_> = http
            .endpoints
            .iter()
            .map(|e| e.identity.as_deref())
            .collect();
        // What the controller certifies for a token of that account (a pod without one runs
        // as `default`).
        assert_eq!(
            identities,
            [
                Some("web.shop.serviceaccount.identity.conduit.cluster.local"),
                Some("default.shop.serviceaccount.identity.conduit.cluster.local"),
            ]
        );
    }

    #[test]
    fn names_resolve_in_every_qualified_form() {
        let (view, _) = KubeView::build(&objects(), "Example.Org.");
        for found in [
            "web.shop.svc.example.org:80",
            "web.shop.svc.example.org.:80",
            "web.shop.svc:80",
            "web.shop:80",
            "web.shop",
            "web.shop.svc.example.org",
        ] {
            assert_eq!(view.lookup(found).map(|s| s.port), Some(80), "{found}");
        }
        // By cluster IP too (IPv6 in brackets).
        for found in ["10.96.0.10:80", "10.96.0.10", "[fd00::10]:80", "[fd00::10]"] {
            assert_eq!(view.lookup(found).map(|s| s.port), Some(80), "{found}");
        }
        assert_eq!(view.lookup("10.96.0.10:9000").map(|s| s.port), Some(9000));
        for missing in [
            "10.96.0.11:80",
            "10.96.0.10:81",
            "[fd00::10",
            "web.shop.svc.cluster.local:80",
            "web.shop:81",
            "web",
            "web.other",
            "api.shop",
            "web.shop.svc.example.org:x",
        ] {
            assert_eq!(view.lookup(missing), None, "{missing}");
        }
    }

    #[test]
    fn endpoint_slices_are_used_when_the_server_has_them() {
        let slice = |name: &str, ip: &str, ready: Option<bool>| -> Arc<EndpointSlice> {
            object(json!({
                "metadata": {"name": name, "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": "web-1"}}],
                "ports": [{"name": "http", "port": 8080}],
            }))
        };
        let objects = Objects {
            slices: Some(vec![
                slice("web-a", "10.0.1.1", Some(true)),
                slice("web-b", "10.0.1.2", None),
                slice("web-c", "10.0.1.3", Some(false)),
                // The same address in two slices (a move between slices) counts once.
                slice("web-d", "10.0.1.1", Some(true)),
            ]),
            ..objects()
        };
        let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        assert_eq!(problems, []);
        let http = view.lookup("web.shop:80").expect("found");
        assert_eq!(addrs(&http), ["10.0.1.1:8080", "10.0.1.2:8080"]);
        // No slice serves the admin port: the service exists with no endpoints.
        assert_eq!(
            addrs(&view.lookup("web.shop:9000").expect("found")),
            Vec::<String>::new()
        );
    }

    fn profile(name: &str, spec: serde_json::Value) -> Arc<ServiceProfile> {
        object(json!({
            "apiVersion": "conduit.io/v1alpha1",
            "kind": "ServiceProfile",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": spec,
        }))
    }

    #[test]
    fn a_profile_applies_by_service_name_or_fully_qualified_name() {
        for name in ["web", "web.shop.svc.cluster.local"] {
            let objects = Objects {
                profiles: vec![profile(
                    name,
                    json!({"routes": [{"name": "items", "match": {"path": {"prefix": "/items/"}}}]}),
                )],
                ..objects()
            };
            let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
            assert_eq!(problems, [], "{name}");
            for port in [80, 9000] {
                let service = view.lookup(&format!("web.shop:{port}")).expect("found");
                assert_eq!(service.profile.routes().len(), 1, "{name} {port}");
            }
        }
    }

    #[test]
    fn a_bad_profile_is_reported_and_the_service_still_served() {
        let objects = Objects {
            profiles: vec![profile(
                "web",
                json!({"routes": [{"name": "items", "match": {"path": {"regex": "("}}}]}),
            )],
            ..objects()
        };
        let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        // One problem per Service port, naming the object and the field.
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[0].object, "ServiceProfile shop/web");
        assert!(
            problems[0].reason.contains("routes[0].match.path.regex"),
            "{}",
            problems[0]
        );
        let service = view.lookup("web.shop:80").expect("still served");
        assert_eq!(service.profile.routes().len(), 0);
        assert_eq!(service.endpoints.len(), 2);
    }

    #[test]
    fn external_names_and_non_tcp_ports_are_not_services() {
        let objects = Objects {
            services: vec![
                object(json!({
                    "metadata": {"name": "db", "namespace": "shop"},
                    "spec": {"type": "ExternalName", "externalName": "db.example.org"},
                })),
                object(json!({
                    "metadata": {"name": "dns", "namespace": "shop"},
                    "spec": {"ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]},
                })),
            ],
            ..Objects::default()
        };
        let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        assert_eq!(problems, []);
        assert!(view.is_empty());
        assert_eq!(view.lookup("db.shop"), None);
        assert_eq!(view.lookup("dns.shop:53"), None);
    }

    fn server(name: &str, spec: serde_json::Value) -> Arc<Server> {
        object(json!({
            "apiVersion": "conduit.io/v1alpha1",
            "kind": "Server",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": spec,
        }))
    }

    fn authorization_policy(name: &str, spec: serde_json::Value) -> Arc<AuthorizationPolicy> {
        object(json!({
            "apiVersion": "conduit.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": spec,
        }))
    }

    fn policy_of(view: &KubeView, authority: &str) -> Option<conduit_core::policy::ServerPolicy> {
        view.lookup(authority)
            .expect("found")
            .profile
            .policy()
            .cloned()
    }

    fn identities(policy: &conduit_core::policy::ServerPolicy) -> Vec<Vec<String>> {
        use conduit_core::policy::IdentityMatch;
        policy
            .authorizations()
            .iter()
            .map(|a| {
                a.identities()
                    .iter()
                    .map(|i| match i {
                        IdentityMatch::Exact(name) => name.clone(),
                        IdentityMatch::Suffix(suffix) => format!("*.{suffix}"),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_server_gives_its_port_the_policy_its_authorization_policies_assemble() {
        use conduit_core::policy::{Client, Verdict, authorize};
        let objects = Objects {
            servers: vec![server(
                "web-http",
                json!({"service": "web", "port": "http", "default": "all-authenticated"}),
            )],
            // Out of name order: the policy lists them by name.
            authorizations: vec![
                authorization_policy(
                    "b-office",
                    json!({"server": "web-http", "networks": ["192.0.2.0/24"]}),
                ),
                authorization_policy(
                    "a-gateway",
                    json!({"server": "web-http", "serviceAccounts": [{"name": "gateway", "namespace": "edge"}, {"name": "cron"}], "identities": ["*.ops.serviceaccount.identity.conduit.cluster.local"]}),
                ),
            ],
            ..objects()
        };
        let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        assert_eq!(problems, []);
        let policy = policy_of(&view, "web.shop:80").expect("governed");
        assert_eq!(policy.default_policy(), DefaultPolicy::AllAuthenticated);
        assert!(!policy.audit());
        assert_eq!(
            identities(&policy),
            [
                vec![
                    "*.ops.serviceaccount.identity.conduit.cluster.local".to_owned(),
                    "gateway.edge.serviceaccount.identity.conduit.cluster.local".to_owned(),
                    "cron.shop.serviceaccount.identity.conduit.cluster.local".to_owned(),
                ],
                vec![],
            ]
        );
        assert_eq!(
            policy.authorizations()[1].networks()[0].to_string(),
            "192.0.2.0/24"
        );
        let gateway = Client {
            identity: Some("gateway.edge.serviceaccount.identity.conduit.cluster.local"),
            addr: "10.1.0.1".parse().expect("ip"),
        };
        assert!(authorize(&policy, &gateway).allowed());
        let stranger = Client {
            identity: None,
            addr: "10.1.0.1".parse().expect("ip"),
        };
        assert_eq!(authorize(&policy, &stranger).verdict, Verdict::Deny);
        // The other port has no Server: no policy.
        assert_eq!(policy_of(&view, "web.shop:9000"), None);
    }

    #[test]
    fn a_server_without_a_default_denies_what_no_authorization_allows() {
        let objects = Objects {
            servers: vec![server("web", json!({"service": "web", "port": 9000}))],
            ..objects()
        };
        let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        assert_eq!(problems, []);
        let policy = policy_of(&view, "web.shop:9000").expect("governed by number");
        assert_eq!(policy.default_policy(), DefaultPolicy::Deny);
        assert!(policy.authorizations().is_empty());
        assert_eq!(policy_of(&view, "web.shop:80"), None);
    }

    #[test]
    fn a_bad_authorization_policy_fails_closed_and_is_reported_with_its_field() {
        for audit in [false, true] {
            let objects = Objects {
                servers: vec![server(
                    "web",
                    json!({"service": "web", "default": "all-unauthenticated", "audit": audit}),
                )],
                authorizations: vec![
                    authorization_policy("good", json!({"server": "web", "identities": ["*"]})),
                    authorization_policy(
                        "typo",
                        json!({"server": "web", "networks": ["10.0.0.0/8", "10.0.0.0/33"]}),
                    ),
                ],
                ..objects()
            };
            let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].object, "AuthorizationPolicy shop/typo");
            assert!(
                problems[0]
                    .reason
                    .starts_with("spec.networks[1]: invalid network `10.0.0.0/33`"),
                "{}",
                problems[0]
            );
            assert!(
                problems[0]
                    .reason
                    .ends_with("Server `web` denies every client until this is fixed")
            );
            // Every port of the Service denies everyone: never the Server's permissive default.
            for port in [80, 9000] {
                let policy = policy_of(&view, &format!("web.shop:{port}")).expect("governed");
                assert_eq!(policy.default_policy(), DefaultPolicy::Deny);
                assert!(policy.authorizations().is_empty());
                assert_eq!(policy.audit(), audit, "audit mode stays as the Server says");
            }
        }
    }

    #[test]
    fn too_many_authorization_policies_fail_closed() {
        let max = conduit_core::policy::MAX_AUTHORIZATIONS;
        let objects = Objects {
            servers: vec![server(
                "web",
                json!({"service": "web", "default": "all-unauthenticated"}),
            )],
            authorizations: (0..=max)
                .map(|i| {
                    authorization_policy(
                        &format!("a{i:03}"),
                        json!({"server": "web", "identities": ["*"]}),
                    )
                })
                .collect(),
            ..objects()
        };
        let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].object, "Server shop/web");
        assert!(
            problems[0]
                .reason
                .contains(&format!("the {max} a Server may have")),
            "{}",
            problems[0]
        );
        let policy = policy_of(&view, "web.shop:80").expect("governed");
        assert_eq!(policy.default_policy(), DefaultPolicy::Deny);
        assert!(policy.authorizations().is_empty());
    }

    #[test]
    fn bad_service_accounts_are_reported_as_service_accounts() {
        let objects = Objects {
            servers: vec![server("web", json!({"service": "web"}))],
            authorizations: vec![authorization_policy(
                "bad",
                json!({"server": "web", "identities": ["ok.shop"], "serviceAccounts": [{"name": "fine"}, {"name": "under_score"}]}),
            )],
            ..objects()
        };
        let (_, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].reason.starts_with("spec.serviceAccounts[1]: "),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn the_first_server_by_name_governs_a_port_and_one_naming_it_comes_first() {
        let objects = Objects {
            servers: vec![
                server(
                    "b-http",
                    json!({"service": "web", "port": 80, "default": "deny"}),
                ),
                server(
                    "a-http",
                    json!({"service": "web", "port": "http", "default": "all-authenticated"}),
                ),
                server(
                    "all",
                    json!({"service": "web", "default": "all-unauthenticated", "audit": true}),
                ),
            ],
            ..objects()
        };
        let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        let http = policy_of(&view, "web.shop:80").expect("governed");
        assert_eq!(
            http.default_policy(),
            DefaultPolicy::AllAuthenticated,
            "a-http"
        );
        let admin = policy_of(&view, "web.shop:9000").expect("governed");
        assert_eq!(
            admin.default_policy(),
            DefaultPolicy::AllUnauthenticated,
            "all"
        );
        assert!(admin.audit());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].object, "Server shop/b-http");
        assert!(
            problems[0]
                .reason
                .starts_with("spec.port: port 80 of Service `web` is governed by Server `a-http`"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn policies_that_attach_to_nothing_are_reported_and_ignored() {
        let objects = Objects {
            servers: vec![
                server("no-service", json!({"service": "api"})),
                server("no-port", json!({"service": "web", "port": 8443})),
            ],
            authorizations: vec![authorization_policy(
                "orphan",
                json!({"server": "missing", "identities": ["*"]}),
            )],
            ..objects()
        };
        let (view, mut problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        problems.sort_by(|a, b| a.object.cmp(&b.object));
        let got: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "AuthorizationPolicy shop/orphan: spec.server: no Server `missing` in namespace shop; ignored",
                "Server shop/no-port: spec.port: Service `web` has no TCP port `8443`; it governs nothing",
                "Server shop/no-service: spec.service: no Service `api` in namespace shop; it governs nothing",
            ]
        );
        assert_eq!(policy_of(&view, "web.shop:80"), None);
    }

    #[test]
    fn a_pod_address_resolves_to_its_endpoint_with_its_service_ports_profile() {
        // A second Service selecting the same pods, in another order than its name ranks.
        let other: Arc<KService> = object(json!({
            "metadata": {"name": "zz-web", "namespace": "shop"},
            "spec": {"ports": [{"name": "http", "port": 8000, "targetPort": 8080}]},
        }));
        let other_endpoints: Arc<Endpoints> = object(json!({
            "metadata": {"name": "zz-web", "namespace": "shop"},
            "subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"name": "http", "port": 8080}]}],
        }));
        for services in [
            vec![Arc::clone(&other), web_service()],
            vec![web_service(), Arc::clone(&other)],
        ] {
            let objects = Objects {
                services,
                endpoints: vec![Arc::clone(&other_endpoints), endpoints()],
                servers: vec![server("web", json!({"service": "web", "port": 80}))],
                ..objects()
            };
            let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
            assert_eq!(problems, []);
            let pod = view.lookup("10.0.0.1:8080").expect("the pod's address");
            assert_eq!(
                (pod.name.as_str(), pod.port),
                ("web.shop", 80),
                "the first by name"
            );
            assert_eq!(addrs(&pod), ["10.0.0.1:8080"], "that endpoint only");
            assert_eq!(
                pod.endpoints[0].identity.as_deref(),
                Some("web.shop.serviceaccount.identity.conduit.local")
            );
            assert_eq!(
                pod.profile.policy().map(|p| p.default_policy()),
                Some(DefaultPolicy::Deny)
            );
            // Not ready: not among the Service's endpoints, but its own address resolves.
            assert_eq!(
                addrs(&view.lookup("web.shop:80").expect("found")),
                ["10.0.0.1:8080", "10.0.0.2:8080"]
            );
            let starting = view.lookup("10.0.0.3:8080").expect("a pod not ready yet");
            assert_eq!(addrs(&starting), ["10.0.0.3:8080"]);
            assert!(starting.profile.policy().is_some());
            let admin = view.lookup("10.0.0.1:9090").expect("the admin port");
            assert_eq!((admin.name.as_str(), admin.port), ("web.shop", 9000));
            assert_eq!(admin.profile.policy(), None);
            for missing in ["10.0.0.1", "10.0.0.1:8081", "10.0.0.9:8080"] {
                assert_eq!(view.lookup(missing), None, "{missing}");
            }
            // Pod addresses are not services of their own.
            assert_eq!(view.len(), 3);
        }
    }

    /// Pod `web-1` (at 10.0.0.1 in [`endpoints`]) with probes of every kind: those the
    /// kubelet sends to 8080 in plaintext are `/ready` (by port name), `/live` (by number,
    /// written without `/` and with a query) and `/sidecar` (a sidecar init container's).
    fn probed_pod(extra: serde_json::Value) -> Arc<Pod> {
        let get =
            |path: &str, port: serde_json::Value| json!({"httpGet": {"path": path, "port": port}});
        let mut containers = vec![
            json!({"name": "app", "ports": [{"name": "web", "containerPort": 8080}, {"name": "metrics", "containerPort": 9090}],
                "readinessProbe": get("/ready", json!("web")),
                "livenessProbe": get("live?verbose=1", json!(8080)),
                "startupProbe": get("/started", json!(9090))}),
            json!({"name": "side", "ports": [{"name": "web", "containerPort": 7000}],
                "readinessProbe": get("/side", json!("web")),
                "livenessProbe": {"httpGet": {"path": "/tls", "port": 8080, "scheme": "HTTPS"}},
                "startupProbe": {"httpGet": {"path": "/elsewhere", "port": 8080, "host": "10.9.9.9"}}}),
            json!({"name": "other", "readinessProbe": {"tcpSocket": {"port": 8080}},
                "livenessProbe": {"exec": {"command": ["true"]}},
                "startupProbe": {"httpGet": {"path": "/ready", "port": 8080, "host": "10.0.0.1"}}}),
        ];
        if let serde_json::Value::Array(more) = extra {
            containers.extend(more);
        }
        object(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "annotations": {PROXY_VERSION_ANNOTATION: "v1"}},
            "spec": {
                "containers": containers,
                "initContainers": [{"name": "sidecar", "restartPolicy": "Always",
                    "readinessProbe": get("/sidecar", json!(8080))}],
            },
        }))
    }

    fn probe_paths(view: &KubeView, authority: &str) -> Option<Vec<String>> {
        let policy = policy_of(view, authority)?;
        Some(
            policy
                .probe_paths()
                .iter()
                .map(ToString::to_string)
                .collect(),
        )
    }

    #[test]
    fn a_pod_address_on_a_governed_port_admits_the_pods_probes_on_that_port() {
        let objects = Objects {
            pods: vec![probed_pod(json!([])), pod("web-2", false)],
            servers: vec![server("web", json!({"service": "web", "port": "http"}))],
            ..objects()
        };
        let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        assert_eq!(problems, []);
        assert_eq!(
            probe_paths(&view, "10.0.0.1:8080"),
            Some(vec!["/live".into(), "/ready".into(), "/sidecar".into()])
        );
        let policy = policy_of(&view, "10.0.0.1:8080").expect("governed");
        assert_eq!(policy.default_policy(), DefaultPolicy::Deny);
        assert!(policy.is_probe(b"GET", b"/ready"));
        assert!(
            !policy.is_probe(b"GET", b"/started"),
            "another port's probe"
        );
        // The Service's name, and another pod of it, have none: probes are one pod's.
        assert_eq!(probe_paths(&view, "web.shop:80"), Some(vec![]));
        assert_eq!(probe_paths(&view, "10.0.0.2:8080"), Some(vec![]));
        // A port without a Server has no policy to add them to.
        assert_eq!(probe_paths(&view, "10.0.0.1:9090"), None);

        // A Server for every port: each port gets the probes sent to it.
        let objects = Objects {
            servers: vec![server("web", json!({"service": "web"}))],
            ..objects
        };
        let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        assert_eq!(problems, []);
        assert_eq!(
            probe_paths(&view, "10.0.0.1:9090"),
            Some(vec!["/started".into()])
        );

        // No Server: no policy at all.
        let objects = Objects {
            servers: vec![],
            ..objects
        };
        let (view, _) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        assert_eq!(probe_paths(&view, "10.0.0.1:8080"), None);
    }

    #[test]
    fn probe_paths_a_policy_cannot_hold_are_reported_and_left_out() {
        let get = |path: String| json!({"httpGet": {"path": path, "port": 8080}});
        let mut extra = vec![json!({"name": "bad", "readinessProbe": get("/a b".into())})];
        // Enough containers for more distinct paths than a policy holds.
        for i in 0..6 {
            extra.push(json!({"name": format!("c{i}"),
                "readinessProbe": get(format!("/r{i}")),
                "livenessProbe": get(format!("/l{i}")),
                "startupProbe": get(format!("/s{i}"))}));
        }
        let objects = Objects {
            pods: vec![
                probed_pod(serde_json::Value::Array(extra)),
                pod("web-2", false),
            ],
            servers: vec![server("web", json!({"service": "web", "port": 80}))],
            ..objects()
        };
        let (view, problems) = KubeView::build(&objects, DEFAULT_CLUSTER_DOMAIN);
        let got: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].starts_with("Pod shop/web-1: spec.containers[3].readinessProbe.httpGet.path: "),
            "{}",
            got[0]
        );
        assert!(
            got[1].starts_with(&format!(
                "Pod shop/web-1: 21 HTTP probe paths on port 8080, above the {MAX_PROBE_PATHS}"
            )),
            "{}",
            got[1]
        );
        let paths = probe_paths(&view, "10.0.0.1:8080").expect("governed");
        assert_eq!(paths.len(), MAX_PROBE_PATHS);
        assert_eq!(paths[0], "/l0", "the first in byte order");
    }

    #[test]
    fn the_backend_is_not_ready_until_its_first_view() {
        let discovery = KubeDiscovery::new(DEFAULT_CLUSTER_DOMAIN);
        assert!(!discovery.is_ready());
        let mut watch = discovery.watch("web.shop:80").expect("watch");
        assert_eq!(watch.latest().state, super::super::ServiceState::NotFound);
        let (generation, services, problems) = discovery.publish(&objects());
        assert_eq!((generation, services, problems.len()), (2, 2, 0));
        assert!(discovery.is_ready());
        assert!(watch.has_changed());
        assert!(matches!(
            watch.latest().state,
            super::super::ServiceState::Found(_)
        ));
        assert_eq!(discovery.services().len(), 2);
    }
}
