//! `conduit inject`: adds the proxy to workloads' pod templates, offline, in YAML a user
//! applies with `kubectl apply -f -`.
//!
//! [`inject_pod`] is the one place that decides and applies the patch to a pod (its metadata
//! and spec); [`admission_review`], the mutating webhook's answer to the API server, turns
//! what it makes of a pod into a JSON Patch, so both give the same pod. It adds:
//! - the `conduit-init` init container, which redirects the pod's TCP through the proxy
//!   (iptables; it needs `NET_ADMIN` and `NET_RAW` and runs as root, once, before the apps);
//! - the `conduit-proxy` container: inbound on 4143 (to the app's port), outbound on
//!   127.0.0.1:4140, admin on 4191 (`/ready` and `/live` as its probes), discovery from the
//!   controller, running as uid 2102 (the uid the redirect spares); its local service is the
//!   pod's own address at the app's port, which discovery resolves to the Service port whose
//!   endpoint it is (its inbound route profile and authorization policy);
//! - the annotation `conduit.io/proxy-version`;
//! - with the mesh's trust anchors ([`InjectOptions::identity`]), the proxy's workload
//!   identity: its pod's ServiceAccount (`NAME.NAMESPACE.serviceaccount.identity.conduit.
//!   DOMAIN`, from the pod's own fields, so a template injected offline gets the namespace it
//!   lands in), proven with a ServiceAccount token the kubelet projects for the audience
//!   `identity.conduit.io` and renews, the trust anchors themselves, and mTLS to the
//!   controller; the pod is annotated `conduit.io/identity-mode: default`, which tells
//!   discovery its endpoints prove that identity. Without trust anchors the proxies run
//!   without identity (plaintext between pods).
//!
//! The proxy forwards inbound traffic to one port of the app (its first declared TCP port, or
//! `conduit.io/app-port`); the pod's other declared ports are left out of the redirect, so
//! they are reached directly (unmeshed) instead of landing on the app's port.
//!
//! A pod is left alone, with the reason reported, when it opts out
//! (`conduit.io/inject: disabled` on the workload or its pod template), already has a proxy
//! (injecting twice changes nothing), uses the host's network (the redirect would capture
//! the node's traffic), or declares no port and has no `conduit.io/app-port` annotation (the
//! proxy would not know where the app listens, and inbound traffic would go nowhere).

use anyhow::{Context as _, bail};
use serde_yaml_ng::{Mapping, Value};

/// The annotation that opts a workload in or out (`enabled` / `disabled`).
pub const INJECT_ANNOTATION: &str = "conduit.io/inject";
/// The annotation naming the app's port when the pod declares none (or another one).
pub const APP_PORT_ANNOTATION: &str = "conduit.io/app-port";
/// The annotation an injected pod carries: the version of the proxy it got.
pub const VERSION_ANNOTATION: &str = "conduit.io/proxy-version";
/// The proxy container's name.
pub const PROXY_CONTAINER: &str = "conduit-proxy";
/// The init container's name.
pub const INIT_CONTAINER: &str = "conduit-init";
/// The annotation saying how an injected pod's proxy gets its identity (`default`: its
/// ServiceAccount's), read by discovery.
pub const IDENTITY_MODE_ANNOTATION: &str = "conduit.io/identity-mode";
/// The projected ServiceAccount token volume.
pub const TOKEN_VOLUME: &str = "conduit-identity-token";
/// Where the proxy container finds the token.
pub const TOKEN_DIR: &str = "/var/run/secrets/conduit.io/serviceaccount";
/// How long each projected token lasts (the kubelet renews it at 80 % of that).
const TOKEN_EXPIRATION_SECONDS: u32 = 24 * 3600;

/// What the injected containers are and where they connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectOptions {
    /// The proxy's image.
    pub proxy_image: String,
    /// The init container's image.
    pub init_image: String,
    /// The controller's Destination API, `HOST:PORT`.
    pub controller: String,
    /// The uid the proxy runs as (and the redirect spares).
    pub proxy_uid: u32,
    /// Inbound ports of the pod that TCP reaches directly, besides the admin port.
    pub skip_inbound_ports: Vec<u16>,
    /// Destination ports the pod's apps reach directly.
    pub skip_outbound_ports: Vec<u16>,
    /// The proxies' workload identity, or `None`: no identity, plaintext between pods.
    pub identity: Option<InjectIdentity>,
}

/// Where the trust anchors come from: a file read for each use (the webhook's is a mounted
/// ConfigMap, which the kubelet updates in place when the anchors rotate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchors {
    /// The PEM bundle's file.
    pub file: std::path::PathBuf,
    /// The cluster's DNS domain.
    pub cluster_domain: String,
}

impl Anchors {
    /// The identity settings with the file's anchors as they are now.
    ///
    /// # Errors
    ///
    /// The file cannot be read or holds no PEM certificate.
    pub fn read(&self) -> anyhow::Result<InjectIdentity> {
        let pem = std::fs::read_to_string(&self.file)
            .with_context(|| format!("reading the trust anchors {}", self.file.display()))?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            bail!(
                "{} holds no PEM certificate: not a trust anchor bundle",
                self.file.display()
            );
        }
        Ok(InjectIdentity {
            trust_anchors_pem: pem,
            cluster_domain: self.cluster_domain.clone(),
            controller_identity: conduit_controller::identity::tls::CONTROLLER_IDENTITY.to_owned(),
        })
    }
}

/// What an injected proxy needs for its identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectIdentity {
    /// The mesh's trust anchors (PEM bundle), given to the proxy as they are.
    pub trust_anchors_pem: String,
    /// The cluster's DNS domain, the suffix of every identity.
    pub cluster_domain: String,
    /// The identity the controller proves (the proxy reaches it over mTLS and checks it).
    pub controller_identity: String,
}

impl InjectOptions {
    /// The defaults for this version: images tagged with it, the controller at its
    /// in-cluster name.
    #[must_use]
    pub fn for_version(version: &str) -> Self {
        Self {
            proxy_image: format!("ghcr.io/conduit-mesh/proxy:{version}"),
            init_image: format!("ghcr.io/conduit-mesh/init:{version}"),
            controller: "conduit-controller.conduit.svc.cluster.local:8086".to_owned(),
            proxy_uid: 2102,
            skip_inbound_ports: Vec::new(),
            skip_outbound_ports: Vec::new(),
            identity: None,
        }
    }
}

const INBOUND_PORT: u16 = 4143;
const OUTBOUND_PORT: u16 = 4140;
const ADMIN_PORT: u16 = 4191;

/// What happened to one pod template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The proxy was added.
    Injected,
    /// Left alone, and why.
    Skipped(String),
}

/// One workload of the input and what happened to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `Kind/name`.
    pub workload: String,
    pub outcome: Outcome,
}

/// Injects the proxy into every workload of a YAML stream (documents separated by `---`;
/// `List`s are walked), leaving every other document as it was. Returns the YAML to apply
/// and a report per workload.
///
/// # Errors
///
/// A document is not YAML, or a workload's pod template is not a mapping where Kubernetes
/// puts one.
pub fn inject_yaml(input: &str, options: &InjectOptions) -> anyhow::Result<(String, Vec<Report>)> {
    let mut out = Vec::new();
    let mut reports = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let mut value: Value = serde::Deserialize::deserialize(document)
            .with_context(|| format!("document {} is not YAML", index + 1))?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, options, &mut reports)?;
        out.push(serde_yaml_ng::to_string(&value).context("writing YAML")?);
    }
    Ok((out.join("---\n"), reports))
}

/// Injects one Kubernetes object (or the items of a `List`).
fn inject_object(
    object: &mut Value,
    options: &InjectOptions,
    reports: &mut Vec<Report>,
) -> anyhow::Result<()> {
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if kind == "List" {
        if let Some(Value::Sequence(items)) = object.get_mut("items") {
            for item in items {
                inject_object(item, options, reports)?;
            }
        }
        return Ok(());
    }
    let name = object
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("<unnamed>")
        .to_owned();
    let workload = format!("{kind}/{name}");
    // Where each kind keeps its pod: the object itself, or its template.
    let path: &[&str] = match kind.as_str() {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return Ok(()),
    };
    let opted_out = annotation(object, INJECT_ANNOTATION) == Some("disabled");
    let mut pod = &mut *object;
    for key in path {
        pod = pod
            .get_mut(*key)
            .with_context(|| format!("{workload} has no {}", path.join(".")))?;
    }
    let outcome = if opted_out {
        Outcome::Skipped(format!("{INJECT_ANNOTATION}: disabled on the workload"))
    } else {
        inject_pod(pod, options).with_context(|| format!("injecting {workload}"))?
    };
    reports.push(Report { workload, outcome });
    Ok(())
}

/// An annotation of an object (a workload, a pod or a pod template).
fn annotation<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object
        .get("metadata")?
        .get("annotations")?
        .get(key)?
        .as_str()
}

/// Adds the proxy and the init container to a pod (or pod template: `metadata` and `spec`),
/// unless it must be left alone (see the module's documentation).
///
/// # Errors
///
/// The pod's `spec` is missing or not shaped as Kubernetes has it.
pub fn inject_pod(pod: &mut Value, options: &InjectOptions) -> anyhow::Result<Outcome> {
    if annotation(pod, INJECT_ANNOTATION) == Some("disabled") {
        return Ok(Outcome::Skipped(format!(
            "{INJECT_ANNOTATION}: disabled on the pod template"
        )));
    }
    let app_port_annotation = annotation(pod, APP_PORT_ANNOTATION).map(str::to_owned);
    let spec = pod.get("spec").context("no spec")?;
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped(
            "hostNetwork: the redirect would capture the node's traffic".to_owned(),
        ));
    }
    let containers = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .context("spec.containers is not a list")?;
    let named = |c: &Value, name: &str| c.get("name").and_then(Value::as_str) == Some(name);
    if containers.iter().any(|c| named(c, PROXY_CONTAINER)) {
        return Ok(Outcome::Skipped("already injected".to_owned()));
    }
    let app_port = match app_port_annotation {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("{APP_PORT_ANNOTATION}: `{port}` is not a port"))?,
        None => match containers.iter().find_map(first_tcp_port) {
            Some(port) => port,
            None => {
                return Ok(Outcome::Skipped(format!(
                    "no containerPort and no {APP_PORT_ANNOTATION} annotation: the proxy \
                     would not know where the app listens"
                )));
            }
        },
    };
    if [INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT].contains(&app_port) {
        bail!("the app's port {app_port} is one of the proxy's (4140, 4143, 4191)");
    }
    // The proxy forwards what it receives inbound to the app's port alone, so the pod's other
    // ports are reached directly, outside the mesh, rather than landing on the app's port.
    let mut other_ports: Vec<u16> = containers
        .iter()
        .flat_map(tcp_ports)
        .filter(|p| *p != app_port)
        .collect();
    other_ports.sort_unstable();
    other_ports.dedup();
    let mut options = options.clone();
    options.skip_inbound_ports.extend(other_ports);
    let options = &options;
    let spec = pod.get_mut("spec").context("no spec")?;
    push(spec, "initContainers", init_container(options), false)?;
    // First: the kubelet starts containers in order, so the proxy is up (or starting) before
    // the apps whose connections the redirect sends to it.
    push(spec, "containers", proxy_container(options, app_port), true)?;
    if options.identity.is_some() {
        push(spec, "volumes", token_volume(), false)?;
    }
    let metadata = mapping_at(pod, "metadata")?;
    let annotations = mapping_in(metadata, "annotations")?;
    annotations.insert(
        VERSION_ANNOTATION.into(),
        env!("CARGO_PKG_VERSION").to_owned().into(),
    );
    if options.identity.is_some() {
        annotations.insert(IDENTITY_MODE_ANNOTATION.into(), "default".into());
    }
    Ok(Outcome::Injected)
}

/// The first TCP `containerPort` a container declares.
fn first_tcp_port(container: &Value) -> Option<u16> {
    tcp_ports(container).next()
}

/// The TCP `containerPort`s a container declares.
fn tcp_ports(container: &Value) -> impl Iterator<Item = u16> + '_ {
    container
        .get("ports")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter(|p| p.get("protocol").and_then(Value::as_str).unwrap_or("TCP") == "TCP")
        .filter_map(|p| p.get("containerPort")?.as_u64())
        .filter_map(|p| u16::try_from(p).ok())
}

/// Adds `item` to the list at `key` of `parent` (made when missing), at its end or `first`.
fn push(parent: &mut Value, key: &str, item: Value, first: bool) -> anyhow::Result<()> {
    let map = parent.as_mapping_mut().context("not a mapping")?;
    let list = map
        .entry(key.into())
        .or_insert_with(|| Value::Sequence(Vec::new()));
    if list.is_null() {
        *list = Value::Sequence(Vec::new());
    }
    let list = list
        .as_sequence_mut()
        .with_context(|| format!("{key} is not a list"))?;
    if first {
        list.insert(0, item);
    } else {
        list.push(item);
    }
    Ok(())
}

/// The mapping at `key` of `parent` (made when missing).
fn mapping_at<'a>(parent: &'a mut Value, key: &str) -> anyhow::Result<&'a mut Mapping> {
    let map = parent.as_mapping_mut().context("not a mapping")?;
    mapping_in(map, key)
}

fn mapping_in<'a>(map: &'a mut Mapping, key: &str) -> anyhow::Result<&'a mut Mapping> {
    let entry = map
        .entry(key.into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if entry.is_null() {
        *entry = Value::Mapping(Mapping::new());
    }
    entry
        .as_mapping_mut()
        .with_context(|| format!("{key} is not a mapping"))
}

fn ports(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The init container: `conduit-init` with the ports and uid the proxy container uses.
fn init_container(options: &InjectOptions) -> Value {
    let mut skip_inbound = vec![ADMIN_PORT];
    skip_inbound.extend(&options.skip_inbound_ports);
    let mut args = vec![
        "--inbound-port".to_owned(),
        INBOUND_PORT.to_string(),
        "--outbound-port".to_owned(),
        OUTBOUND_PORT.to_string(),
        "--proxy-uid".to_owned(),
        options.proxy_uid.to_string(),
        "--skip-inbound-ports".to_owned(),
        ports(&skip_inbound),
    ];
    if !options.skip_outbound_ports.is_empty() {
        args.push("--skip-outbound-ports".to_owned());
        args.push(ports(&options.skip_outbound_ports));
    }
    yaml(&format!(
        "name: {INIT_CONTAINER}
image: {image}
args: {args}
securityContext:
  capabilities: {{add: [NET_ADMIN, NET_RAW], drop: [ALL]}}
  runAsUser: 0
  runAsNonRoot: false
  privileged: false
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
resources:
  requests: {{cpu: 10m, memory: 10Mi}}
  limits: {{cpu: 100m, memory: 20Mi}}
",
        image = options.init_image,
        args = serde_json::to_string(&args).unwrap_or_default(),
    ))
}

/// The proxy container.
fn proxy_container(options: &InjectOptions, app_port: u16) -> Value {
    let mut container = yaml(&format!(
        "name: {PROXY_CONTAINER}
image: {image}
env:
  - {{name: CONDUIT_PROXY_INBOUND_ADDR, value: '0.0.0.0:{INBOUND_PORT}'}}
  - {{name: CONDUIT_PROXY_OUTBOUND_ADDR, value: '127.0.0.1:{OUTBOUND_PORT}'}}
  - {{name: CONDUIT_PROXY_ADMIN_ADDR, value: '0.0.0.0:{ADMIN_PORT}'}}
  - {{name: CONDUIT_PROXY_APP_ADDR, value: '127.0.0.1:{app_port}'}}
  - {{name: CONDUIT_PROXY_DISCOVERY, value: '{controller}'}}
  - {{name: _CONDUIT_POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
  - {{name: CONDUIT_PROXY_SERVICE, value: '$(_CONDUIT_POD_IP):{app_port}'}}
ports:
  - {{name: conduit-proxy, containerPort: {INBOUND_PORT}}}
  - {{name: conduit-admin, containerPort: {ADMIN_PORT}}}
readinessProbe:
  httpGet: {{path: /ready, port: {ADMIN_PORT}}}
  initialDelaySeconds: 2
livenessProbe:
  httpGet: {{path: /live, port: {ADMIN_PORT}}}
  initialDelaySeconds: 10
securityContext:
  runAsUser: {uid}
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{drop: [ALL]}}
",
        image = options.proxy_image,
        controller = options.controller,
        uid = options.proxy_uid,
    ));
    if let Some(identity) = &options.identity
        && let Some(container) = container.as_mapping_mut()
    {
        if let Some(env) = container.get_mut("env").and_then(Value::as_sequence_mut) {
            env.extend(identity_env(identity));
        }
        container.insert(
            "volumeMounts".into(),
            yaml(&format!(
                "[{{name: {TOKEN_VOLUME}, mountPath: {TOKEN_DIR}, readOnly: true}}]"
            )),
        );
    }
    container
}

/// The proxy's identity settings: its name from the pod's own namespace and ServiceAccount
/// (Kubernetes expands `$(VAR)` from variables listed before it), the projected token, the
/// trust anchors and the controller's identity.
fn identity_env(identity: &InjectIdentity) -> Vec<Value> {
    let name = format!(
        "$(_CONDUIT_POD_SA).$(_CONDUIT_POD_NS).serviceaccount.identity.conduit.{}",
        identity.cluster_domain.trim_end_matches('.')
    );
    let field = |name: &str, path: &str| {
        yaml(&format!(
            "{{name: {name}, valueFrom: {{fieldRef: {{fieldPath: {path}}}}}}}"
        ))
    };
    let value = |name: &str, value: &str| {
        let mut map = Mapping::new();
        map.insert("name".into(), name.into());
        map.insert("value".into(), value.into());
        Value::Mapping(map)
    };
    vec![
        field("_CONDUIT_POD_NS", "metadata.namespace"),
        field("_CONDUIT_POD_SA", "spec.serviceAccountName"),
        value("CONDUIT_PROXY_IDENTITY_NAME", &name),
        value(
            "CONDUIT_PROXY_IDENTITY_TOKEN_FILE",
            &format!("{TOKEN_DIR}/token"),
        ),
        value(
            "CONDUIT_PROXY_IDENTITY_TRUST_ANCHORS_PEM",
            &identity.trust_anchors_pem,
        ),
        value(
            "CONDUIT_PROXY_CONTROLLER_IDENTITY",
            &identity.controller_identity,
        ),
    ]
}

/// The projected ServiceAccount token the proxy proves its identity with: bound to the pod,
/// for the audience the controller asks the API server to check, renewed by the kubelet.
fn token_volume() -> Value {
    yaml(&format!(
        "name: {TOKEN_VOLUME}
projected:
  sources:
    - serviceAccountToken:
        audience: {audience}
        expirationSeconds: {TOKEN_EXPIRATION_SECONDS}
        path: token
",
        audience = conduit_controller::identity::serviceaccount::AUDIENCE,
    ))
}

/// Parses YAML this module writes itself (so it always parses).
fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap_or(Value::Null)
}

/// The answer refusing the pod of `review` with `code` and `message` (which `kubectl` shows),
/// whatever the pod is: the webhook's answer when it cannot decide (its trust anchors cannot be
/// read), so no pod is admitted without what it should get.
///
/// # Errors
///
/// The review has no `request.uid` (nothing an API server sends).
pub fn admission_refusal(
    review: &serde_json::Value,
    code: u16,
    message: &str,
) -> anyhow::Result<serde_json::Value> {
    let uid = review
        .pointer("/request/uid")
        .and_then(serde_json::Value::as_str)
        .context("no request.uid")?;
    Ok(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {
            "uid": uid,
            "allowed": false,
            "status": {"code": code, "message": format!("conduit: {message}")},
        },
    }))
}

/// Answers a Kubernetes `AdmissionReview` (`admission.k8s.io/v1`) for the mutating webhook: a
/// pod being created gets the proxy as a JSON Patch, decided and built by [`inject_pod`], the
/// function `conduit inject` uses, so the webhook and offline injection give the same pod.
/// Anything else (another kind or operation, a pod left alone) is allowed unchanged; a pod
/// whose annotations are wrong (an app port that is not one) is refused with the reason, which
/// `kubectl` shows.
///
/// # Errors
///
/// The review has no `request.uid` (nothing an API server sends).
pub fn admission_review(
    review: &serde_json::Value,
    options: &InjectOptions,
) -> anyhow::Result<serde_json::Value> {
    let request = review.get("request").context("no request")?;
    let uid = request
        .get("uid")
        .and_then(serde_json::Value::as_str)
        .context("no request.uid")?;
    let mut response = serde_json::json!({ "uid": uid, "allowed": true });
    let is_pod = request
        .pointer("/kind/kind")
        .and_then(serde_json::Value::as_str)
        == Some("Pod");
    let create = request.get("operation").and_then(serde_json::Value::as_str) == Some("CREATE");
    if let (true, true, Some(original)) = (is_pod, create, request.get("object")) {
        let mut pod: Value = serde_yaml_ng::to_value(original).context("reading the pod")?;
        match inject_pod(&mut pod, options) {
            Ok(Outcome::Injected) => {
                let injected = serde_json::to_value(&pod).context("writing the pod")?;
                let patch = serde_json::to_vec(&pod_patch(original, &injected))
                    .context("writing the patch")?;
                response["patchType"] = "JSONPatch".into();
                response["patch"] =
                    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, patch)
                        .into();
            }
            Ok(Outcome::Skipped(why)) => {
                tracing::debug!(uid, why, "pod left alone");
            }
            Err(err) => {
                response["allowed"] = false.into();
                response["status"] = serde_json::json!({
                    "code": 400,
                    "message": format!("conduit: {err:#}"),
                });
            }
        }
    }
    Ok(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// The JSON Patch (RFC 6902) from a pod to the pod [`inject_pod`] made of it: the init
/// container appended, the proxy first among the containers, the version annotation.
fn pod_patch(original: &serde_json::Value, injected: &serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    let named = |list: Option<&serde_json::Value>, name: &str| {
        list.and_then(serde_json::Value::as_array)
            .and_then(|l| {
                l.iter()
                    .find(|c| c.get("name").and_then(serde_json::Value::as_str) == Some(name))
            })
            .cloned()
            .unwrap_or_default()
    };
    let init = named(injected.pointer("/spec/initContainers"), INIT_CONTAINER);
    let proxy = named(injected.pointer("/spec/containers"), PROXY_CONTAINER);
    let mut ops = Vec::new();
    if original
        .pointer("/spec/initContainers")
        .is_some_and(serde_json::Value::is_array)
    {
        ops.push(json!({"op": "add", "path": "/spec/initContainers/-", "value": init}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [init]}));
    }
    ops.push(json!({"op": "add", "path": "/spec/containers/0", "value": proxy}));
    let token = named(injected.pointer("/spec/volumes"), TOKEN_VOLUME);
    if !token.is_null() {
        if original
            .pointer("/spec/volumes")
            .is_some_and(serde_json::Value::is_array)
        {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": token}));
        } else {
            ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [token]}));
        }
    }
    // The annotations the injection added (or changed).
    let before = original.pointer("/metadata/annotations");
    let added: serde_json::Map<String, serde_json::Value> = injected
        .pointer("/metadata/annotations")
        .and_then(serde_json::Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(key, value)| before.and_then(|b| b.get(key.as_str())) != Some(*value))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    if before.is_some_and(serde_json::Value::is_object) {
        for (key, value) in added {
            // A `/` in a key is `~1` in a JSON Pointer (RFC 6901).
            let key = key.replace('~', "~0").replace('/', "~1");
            ops.push(
                json!({"op": "add", "path": format!("/metadata/annotations/{key}"), "value": value}),
            );
        }
    } else if original
        .get("metadata")
        .is_some_and(serde_json::Value::is_object)
    {
        ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": added}));
    } else {
        ops.push(json!({"op": "add", "path": "/metadata", "value": {"annotations": added}}));
    }
    serde_json::Value::Array(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> InjectOptions {
        InjectOptions::for_version("0.1.0")
    }

    const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
        - name: web
          image: example/web:1
          ports:
            - containerPort: 8080
";

    #[test]
    fn a_deployment_gets_the_proxy_and_the_redirect() {
        let (out, reports) = inject_yaml(DEPLOYMENT, &options()).unwrap();
        assert_eq!(
            reports,
            vec![Report {
                workload: "Deployment/web".into(),
                outcome: Outcome::Injected
            }]
        );
        insta::assert_snapshot!(out);
    }

    fn identity_options() -> InjectOptions {
        let mut options = options();
        options.identity = Some(InjectIdentity {
            trust_anchors_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
                .into(),
            cluster_domain: "cluster.local".into(),
            controller_identity: "controller.conduit.serviceaccount.identity.conduit.local".into(),
        });
        options
    }

    #[test]
    fn with_the_trust_anchors_the_proxy_proves_its_service_account() {
        let options = identity_options();
        let (out, _) = inject_yaml(DEPLOYMENT, &options).unwrap();
        insta::assert_snapshot!(out);
        // The identity named in the pod is the one the controller certifies for its account.
        let name =
            "$(_CONDUIT_POD_SA).$(_CONDUIT_POD_NS).serviceaccount.identity.conduit.cluster.local";
        assert_eq!(
            name.replace("$(_CONDUIT_POD_SA)", "web")
                .replace("$(_CONDUIT_POD_NS)", "shop"),
            conduit_core::identity::service_account_identity("shop", "web", "cluster.local")
        );
        assert!(out.contains(name));
        let (twice, _) = inject_yaml(&out, &options).unwrap();
        assert_eq!(out, twice);
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let (once, _) = inject_yaml(DEPLOYMENT, &options()).unwrap();
        let (twice, reports) = inject_yaml(&once, &options()).unwrap();
        assert_eq!(once, twice);
        assert_eq!(
            reports[0].outcome,
            Outcome::Skipped("already injected".into())
        );
    }

    #[test]
    fn pods_that_must_be_left_alone_are_and_other_documents_pass_through() {
        let input = "\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  ports: [{port: 80}]
---
apiVersion: v1
kind: Pod
metadata:
  name: opted-out
  annotations: {conduit.io/inject: disabled}
spec:
  containers: [{name: a, image: a, ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: node-agent}
spec:
  hostNetwork: true
  containers: [{name: a, image: a, ports: [{containerPort: 80}]}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: '0 3 * * *'
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{name: job, image: job}]
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Pod
    metadata:
      name: annotated
      annotations: {conduit.io/app-port: '9090'}
    spec:
      containers: [{name: a, image: a}]
";
        let (out, reports) = inject_yaml(input, &options()).unwrap();
        let outcomes: Vec<String> = reports
            .iter()
            .map(|r| format!("{}: {:?}", r.workload, r.outcome))
            .collect();
        insta::assert_snapshot!(outcomes.join("\n"));
        // The Service comes through as it was, first.
        assert!(out.starts_with("apiVersion: v1\nkind: Service\n"), "{out}");
        // The annotated pod's proxy forwards to the annotated port.
        assert!(out.contains("value: 127.0.0.1:9090"), "{out}");
    }

    #[test]
    fn the_pods_other_ports_are_reached_directly() {
        let input = "kind: Pod\nmetadata: {name: p}\nspec:\n  containers:\n    - {name: a, ports: [{containerPort: 8080}, {containerPort: 9090}]}\n    - {name: b, ports: [{containerPort: 53, protocol: UDP}, {containerPort: 7000}]}\n";
        let (out, _) = inject_yaml(input, &options()).unwrap();
        assert!(out.contains("value: 127.0.0.1:8080"), "{out}");
        assert!(out.contains("- 4191,7000,9090\n"), "{out}");
    }

    #[test]
    fn an_app_port_that_is_the_proxys_is_refused() {
        let input = "kind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: a, ports: [{containerPort: 4143}]}]\n";
        let err = inject_yaml(input, &options()).unwrap_err();
        assert!(format!("{err:#}").contains("4143"), "{err:#}");
    }

    /// Applies the `add` operations of a JSON Patch (all `pod_patch` makes).
    fn apply_adds(doc: &mut serde_json::Value, patch: &serde_json::Value) {
        for op in patch.as_array().unwrap() {
            assert_eq!(op["op"], "add");
            let path = op["path"].as_str().unwrap();
            let (parent, last) = path.rsplit_once('/').unwrap();
            let last = last.replace("~1", "/").replace("~0", "~");
            let value = op["value"].clone();
            match doc.pointer_mut(parent).unwrap() {
                serde_json::Value::Array(list) if last == "-" => list.push(value),
                serde_json::Value::Array(list) => list.insert(last.parse().unwrap(), value),
                serde_json::Value::Object(map) => {
                    map.insert(last, value);
                }
                other => panic!("cannot add under {other}"),
            }
        }
    }

    fn review(pod: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE",
                "namespace": "shop",
                "object": pod,
            }
        })
    }

    #[test]
    fn the_webhook_patches_a_pod_into_what_inject_makes_of_it() {
        use base64::Engine as _;
        let pods = [
            serde_json::json!({"metadata": {"name": "web"},
                "spec": {"containers": [{"name": "web", "ports": [{"containerPort": 8080}]}]}}),
            serde_json::json!({"metadata": {"name": "web", "annotations": {"team": "shop"}},
                "spec": {"initContainers": [{"name": "migrate"}],
                         "volumes": [{"name": "data", "emptyDir": {}}],
                         "containers": [{"name": "web", "ports": [{"containerPort": 8080}]}]}}),
        ];
        for (pod, options) in pods
            .iter()
            .flat_map(|pod| [(pod, options()), (pod, identity_options())])
        {
            let answer = admission_review(&review(pod.clone()), &options).unwrap();
            let response = &answer["response"];
            assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
            assert_eq!(response["allowed"], true);
            assert_eq!(response["patchType"], "JSONPatch");
            let patch = base64::engine::general_purpose::STANDARD
                .decode(response["patch"].as_str().unwrap())
                .unwrap();
            let patch: serde_json::Value = serde_json::from_slice(&patch).unwrap();
            let mut patched = pod.clone();
            apply_adds(&mut patched, &patch);
            let mut offline: Value = serde_yaml_ng::to_value(pod).unwrap();
            assert_eq!(
                inject_pod(&mut offline, &options).unwrap(),
                Outcome::Injected
            );
            assert_eq!(patched, serde_json::to_value(&offline).unwrap());
        }
    }

    #[test]
    fn the_webhook_allows_what_it_leaves_alone_and_refuses_bad_annotations() {
        let opted_out = serde_json::json!({
            "metadata": {"annotations": {"conduit.io/inject": "disabled"}},
            "spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80}]}]}});
        let answer = admission_review(&review(opted_out), &options()).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
        let mut service = review(serde_json::json!({"spec": {}}));
        service["request"]["kind"]["kind"] = "Service".into();
        let answer = admission_review(&service, &options()).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
        let bad = serde_json::json!({
            "metadata": {"annotations": {"conduit.io/app-port": "http"}},
            "spec": {"containers": [{"name": "a"}]}});
        let answer = admission_review(&review(bad), &options()).unwrap();
        assert_eq!(answer["response"]["allowed"], false);
        let message = answer["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains("conduit.io/app-port"), "{message}");
        assert!(admission_review(&serde_json::json!({}), &options()).is_err());
    }
}
