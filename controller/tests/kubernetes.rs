//! The controller's Kubernetes discovery against a real API server (kube-apiserver v1.20 with
//! etcd and the endpoints controllers, on loopback: `ci/kube-apiserver.sh start DIR`, then
//! `CONDUIT_TEST_KUBECONFIG=DIR/kubeconfig`). Without that variable every test here says it
//! skipped and why, and passes.
//!
//! There is no scheduler and no kubelet: a test places its pods on a Node object of its own
//! and patches their status (Running, an IP, Ready) as a kubelet would. Each test works in a
//! namespace of its own and deletes it at the end. Every wait is bounded by [`WAIT`] and driven
//! by what the controller streams, never by sleeping.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers: any failed step fails the test"
)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conduit_controller::RunError;
use conduit_controller::config::{ControllerConfig, DiscoverySource, LEASE_NAME, Singleton};
use conduit_controller::crd::{AuthorizationPolicy, Server, ServiceProfile, crds};
use conduit_controller::identity::IdentityConfig;
use conduit_controller::net::tcp_incoming;
use conduit_core::policy::{DefaultPolicy, IdentityMatch, ServerPolicy};
use conduit_proto::convert::{DestinationChange, DestinationUpdate, ProfileUpdate};
use conduit_proto::pb::destination as pb;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use serde_json::json;
use tokio::net::TcpListener;
use tonic::Streaming;

/// The longest any single wait may take (the endpoints controller batches for up to a
/// second; the watch then carries the change).
const WAIT: Duration = Duration::from_secs(30);

const NODE: &str = "conduit-test-node";

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// The test API server's kubeconfig, or `None` (having said why) when there is none.
fn kubeconfig(test: &str) -> Option<PathBuf> {
    match std::env::var_os("CONDUIT_TEST_KUBECONFIG") {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => {
            eprintln!(
                "{test}: skipped: CONDUIT_TEST_KUBECONFIG is not set (start a local API server \
                 with `ci/kube-apiserver.sh start DIR` and set it to DIR/kubeconfig; .ci/run does)"
            );
            None
        }
    }
}

/// A namespace of the test's own, the CRDs installed and the test Node present.
struct Cluster {
    client: Client,
    namespace: String,
}

impl Cluster {
    async fn new(kubeconfig: &Path, test: &str) -> Self {
        let client = conduit_controller::discovery::kubernetes::client(Some(kubeconfig))
            .await
            .unwrap();
        let apply = PatchParams::apply("conduit-tests").force();
        let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in crds() {
            let name = crd.metadata.name.clone().unwrap();
            crd_api
                .patch(&name, &apply, &Patch::Apply(&crd))
                .await
                .unwrap();
            within(
                "the CRD to be established",
                await_condition(crd_api.clone(), &name, conditions::is_crd_established()),
            )
            .await
            .unwrap();
        }
        let nodes: Api<Node> = Api::all(client.clone());
        nodes
            .patch(
                NODE,
                &apply,
                &Patch::Apply(
                    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}),
                ),
            )
            .await
            .unwrap();
        // Random per run (std's hasher keys are), so a namespace left from an earlier run,
        // or one still being deleted, is never reused.
        let random = {
            use std::hash::{BuildHasher as _, Hasher as _};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
        };
        let namespace = format!("{test}-{:08x}", random & 0xffff_ffff);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap(),
            )
            .await
            .unwrap();
        Self { client, namespace }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    async fn apply<K>(&self, object: serde_json::Value) -> Result<K, kube::Error>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + core::fmt::Debug
            + serde::de::DeserializeOwned
            + serde::Serialize,
        <K as kube::Resource>::DynamicType: Default,
    {
        let name = object["metadata"]["name"].as_str().unwrap().to_owned();
        self.api::<K>()
            .patch(
                &name,
                &PatchParams::apply("conduit-tests").force(),
                &Patch::Apply(object),
            )
            .await
    }

    /// A pod of `app` placed on the test node and made Running and Ready at `ip`.
    async fn running_pod(&self, name: &str, app: &str, ip: &str) {
        self.apply::<Pod>(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": app}, "annotations": {"conduit.io/proxy-version": "test"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]},
        }))
        .await
        .unwrap();
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }});
        self.api::<Pod>()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .unwrap();
    }

    async fn delete_pod(&self, name: &str) {
        // Grace period 0: with no kubelet to confirm, a graceful delete would wait forever.
        self.api::<Pod>()
            .delete(name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
    }

    async fn cleanup(self) {
        // Pods first, at once: with no kubelet to confirm a graceful delete, the namespace
        // would stay Terminating forever.
        let _ = self
            .api::<Pod>()
            .delete_collection(
                &DeleteParams::default().grace_period(0),
                &kube::api::ListParams::default(),
            )
            .await;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces
            .delete(&self.namespace, &DeleteParams::default())
            .await;
    }
}

/// The controller as `main.rs` runs it, with Kubernetes discovery.
struct Controller {
    dir: PathBuf,
    grpc_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), RunError>>>,
}

impl Controller {
    async fn start(kubeconfig: &Path, name: &str) -> Self {
        Self::start_with(kubeconfig, name, None).await
    }

    async fn start_with(kubeconfig: &Path, name: &str, singleton: Option<Singleton>) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "conduit-controller-kube-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let config = ControllerConfig {
            grpc_addr,
            admin_addr: admin.local_addr().unwrap(),
            discovery: DiscoverySource::Kubernetes {
                cluster_domain: "cluster.local".into(),
                kubeconfig: Some(kubeconfig.to_owned()),
                singleton,
            },
            log: "info".into(),
            identity: IdentityConfig::new(dir.join("identity")),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            conduit_controller::run_controller(
                &config,
                tcp_incoming(grpc),
                tcp_incoming(admin),
                shutdown,
            )
            .await
        });
        Self {
            dir,
            grpc_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn client(&self) -> pb::destination_client::DestinationClient<tonic::transport::Channel> {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc_addr)).unwrap();
        // The controller may still be starting: connecting is retried within the bound.
        let channel = within("connect", async {
            loop {
                match endpoint.connect().await {
                    Ok(channel) => return channel,
                    Err(_) => tokio::task::yield_now().await,
                }
            }
        })
        .await;
        pb::destination_client::DestinationClient::new(channel)
    }

    async fn get(&self, path: &str) -> Streaming<pb::Update> {
        let request = pb::GetDestination {
            path: path.into(),
            context_token: String::new(),
        };
        within("Get", self.client().await.get(request))
            .await
            .unwrap()
            .into_inner()
    }

    async fn get_profile(&self, path: &str) -> Streaming<pb::DestinationProfile> {
        let request = pb::GetDestination {
            path: path.into(),
            context_token: String::new(),
        };
        within("GetProfile", self.client().await.get_profile(request))
            .await
            .unwrap()
            .into_inner()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = self.task.take().expect("running");
        within("shutdown", task).await.unwrap().unwrap();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Follows an endpoint stream until the set of addresses is `want`.
async fn until_endpoints(
    stream: &mut Streaming<pb::Update>,
    set: &mut BTreeSet<SocketAddr>,
    want: &[&str],
) {
    let want: BTreeSet<SocketAddr> = want.iter().map(|a| a.parse().unwrap()).collect();
    within(&format!("endpoints {want:?}"), async {
        while *set != want {
            let message = stream.message().await.unwrap().expect("stream open");
            let update = DestinationUpdate::try_from(message).expect("valid on the wire");
            match update.change {
                DestinationChange::Replace(endpoints) => {
                    *set = endpoints.iter().map(|e| e.addr).collect();
                }
                DestinationChange::Add(endpoints) => set.extend(endpoints.iter().map(|e| e.addr)),
                DestinationChange::Remove(addrs) => {
                    for addr in addrs {
                        set.remove(&addr);
                    }
                }
                DestinationChange::NoEndpoints { .. } => set.clear(),
            }
        }
    })
    .await;
}

/// Follows a profile stream until a profile with these route names arrives.
async fn until_routes(
    stream: &mut Streaming<pb::DestinationProfile>,
    want: &[&str],
) -> ProfileUpdate {
    within(&format!("routes {want:?}"), async {
        loop {
            let message = stream.message().await.unwrap().expect("stream open");
            let update = ProfileUpdate::try_from(message).expect("valid on the wire");
            let names: Vec<&str> = update.profile.routes().iter().map(|r| &*r.name).collect();
            if names == want {
                return update;
            }
        }
    })
    .await
}

/// A Service with two running pods resolves to both (through the real endpoints controller);
/// deleting a pod removes it; a ServiceProfile applied later reaches the profile stream; an
/// invalid ServiceProfile is refused by the API server's schema.
#[tokio::test]
async fn endpoints_and_profiles_follow_the_api_server() {
    let Some(kubeconfig) = kubeconfig("endpoints_and_profiles_follow_the_api_server") else {
        return;
    };
    let cluster = Cluster::new(&kubeconfig, "follow").await;
    let ns = cluster.namespace.clone();
    cluster
        .apply::<Service>(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        }))
        .await
        .unwrap();
    cluster.running_pod("web-1", "web", "10.9.0.1").await;
    cluster.running_pod("web-2", "web", "10.9.0.2").await;

    let controller = Controller::start(&kubeconfig, "follow").await;
    let authority = format!("web.{ns}.svc.cluster.local:80");
    let mut endpoints = controller.get(&authority).await;
    let mut set = BTreeSet::new();
    until_endpoints(
        &mut endpoints,
        &mut set,
        &["10.9.0.1:8080", "10.9.0.2:8080"],
    )
    .await;

    cluster.delete_pod("web-2").await;
    until_endpoints(&mut endpoints, &mut set, &["10.9.0.1:8080"]).await;

    let mut profile = controller.get_profile(&authority).await;
    until_routes(&mut profile, &[]).await;
    cluster
        .apply::<ServiceProfile>(json!({
            "apiVersion": "conduit.io/v1alpha1", "kind": "ServiceProfile",
            "metadata": {"name": "web"},
            "spec": {"routes": [{"name": "items", "match": {"method": "GET", "path": {"prefix": "/items/"}}, "timeouts": {"request": "2s"}}]},
        }))
        .await
        .unwrap();
    let update = until_routes(&mut profile, &["items"]).await;
    assert_eq!(update.name, format!("web.{ns}"));

    // The API server's schema (generated from the serde types) refuses a wrong type.
    let refused = cluster
        .apply::<ServiceProfile>(json!({
            "apiVersion": "conduit.io/v1alpha1", "kind": "ServiceProfile",
            "metadata": {"name": "bad"},
            "spec": {"routes": [{"name": "items", "match": {"method": 7}}]},
        }))
        .await
        .expect_err("refused by the schema");
    let kube::Error::Api(status) = refused else {
        panic!("an API error, not {refused:?}")
    };
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("spec.routes.match.method"),
        "{status:?}"
    );

    controller.stop().await;
    cluster.cleanup().await;
}

/// Follows a profile stream until its policy satisfies `want`.
async fn until_policy(
    stream: &mut Streaming<pb::DestinationProfile>,
    what: &str,
    want: impl Fn(Option<&ServerPolicy>) -> bool,
) -> ProfileUpdate {
    within(&format!("the policy: {what}"), async {
        loop {
            let message = stream.message().await.unwrap().expect("stream open");
            let update = ProfileUpdate::try_from(message).expect("valid on the wire");
            if want(update.profile.policy()) {
                return update;
            }
        }
    })
    .await
}

/// The exact identities of each authorization of a policy.
fn authorized(policy: &ServerPolicy) -> Vec<Vec<String>> {
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

/// A Server and an AuthorizationPolicy applied reach the policy in the profile stream of the
/// Service's port and of a pod's address (what an injected proxy follows); an
/// AuthorizationPolicy the schema takes but the controller cannot use (a bad CIDR) makes the
/// port deny everyone until it goes; deleting the AuthorizationPolicy removes its
/// authorization; objects of the wrong shape are refused by the API server's schema.
#[tokio::test]
async fn authorization_policies_follow_the_api_server() {
    let Some(kubeconfig) = kubeconfig("authorization_policies_follow_the_api_server") else {
        return;
    };
    let cluster = Cluster::new(&kubeconfig, "authz").await;
    let ns = cluster.namespace.clone();
    cluster
        .apply::<Service>(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        }))
        .await
        .unwrap();
    // An address of this run's own: a pod address resolves to the first Service by namespace
    // that has it, and a namespace a failed run left behind must not be that Service.
    let suffix = u32::from_str_radix(ns.rsplit('-').next().unwrap(), 16).unwrap();
    let [_, a, b, c] = suffix.to_be_bytes();
    let ip = format!("10.{a}.{b}.{}", c.clamp(1, 254));
    cluster.running_pod("web-1", "web", &ip).await;

    let controller = Controller::start(&kubeconfig, "authz").await;
    let authority = format!("web.{ns}.svc.cluster.local:80");
    let mut service = controller.get_profile(&authority).await;
    until_policy(&mut service, "none yet", |p| p.is_none()).await;

    cluster
        .apply::<Server>(json!({
            "apiVersion": "conduit.io/v1alpha1", "kind": "Server",
            "metadata": {"name": "web-http"},
            "spec": {"service": "web", "port": "http", "default": "all-authenticated"},
        }))
        .await
        .unwrap();
    cluster
        .apply::<AuthorizationPolicy>(json!({
            "apiVersion": "conduit.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "from-gateway"},
            "spec": {"server": "web-http", "serviceAccounts": [{"name": "gateway"}]},
        }))
        .await
        .unwrap();
    let gateway = vec![vec![format!(
        "gateway.{ns}.serviceaccount.identity.conduit.cluster.local"
    )]];
    let allows_gateway = |p: Option<&ServerPolicy>| {
        p.is_some_and(|p| {
            p.default_policy() == DefaultPolicy::AllAuthenticated && authorized(p) == gateway
        })
    };
    until_policy(&mut service, "the gateway allowed", allows_gateway).await;
    // The pod's own address (`POD_IP:TARGET_PORT`) has its Service port's policy.
    let mut pod = controller.get_profile(&format!("{ip}:8080")).await;
    let update = until_policy(&mut pod, "the gateway allowed, by the pod", allows_gateway).await;
    assert!(update.exists);

    // Valid to the schema, not to the controller: the port fails closed while it exists.
    cluster
        .apply::<AuthorizationPolicy>(json!({
            "apiVersion": "conduit.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "typo"},
            "spec": {"server": "web-http", "networks": ["10.0.0.0/33"]},
        }))
        .await
        .unwrap();
    let denies_everyone = |p: Option<&ServerPolicy>| {
        p.is_some_and(|p| {
            p.default_policy() == DefaultPolicy::Deny && p.authorizations().is_empty()
        })
    };
    until_policy(&mut service, "everyone denied", denies_everyone).await;
    until_policy(&mut pod, "everyone denied, by the pod", denies_everyone).await;
    cluster
        .api::<AuthorizationPolicy>()
        .delete("typo", &DeleteParams::default())
        .await
        .unwrap();
    until_policy(&mut service, "the gateway allowed again", allows_gateway).await;

    cluster
        .api::<AuthorizationPolicy>()
        .delete("from-gateway", &DeleteParams::default())
        .await
        .unwrap();
    until_policy(&mut service, "no authorization left", |p| {
        p.is_some_and(|p| {
            p.default_policy() == DefaultPolicy::AllAuthenticated && p.authorizations().is_empty()
        })
    })
    .await;

    // The API server's schema refuses what the controller could not decode.
    for (kind, spec, field) in [
        (
            "Server",
            json!({"service": "web", "default": "maybe"}),
            "spec.default",
        ),
        ("Server", json!({"service": "web", "port": 0}), "spec.port"),
        (
            "Server",
            json!({"service": "web", "port": 70000}),
            "spec.port",
        ),
        (
            "Server",
            json!({"service": "web", "port": "Not_A_Name"}),
            "spec.port",
        ),
        (
            "Server",
            json!({"service": "web", "audit": "yes"}),
            "spec.audit",
        ),
        ("Server", json!({"port": 80}), "spec.service"),
        (
            "AuthorizationPolicy",
            json!({"server": "web-http", "networks": "10.0.0.0/8"}),
            "spec.networks",
        ),
        (
            "AuthorizationPolicy",
            json!({"server": "web-http", "networks": [7]}),
            "spec.networks",
        ),
        (
            "AuthorizationPolicy",
            json!({"server": "web-http", "serviceAccounts": [{"namespace": "x"}]}),
            "spec.serviceAccounts",
        ),
        (
            "AuthorizationPolicy",
            json!({"identities": ["*"]}),
            "spec.server",
        ),
    ] {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "conduit.io/v1alpha1", "kind": kind,
            "metadata": {"name": "bad"}, "spec": spec,
        }))
        .unwrap();
        // Created, as `kubectl create` would: a server-side apply of a wrongly typed field is
        // refused before the schema sees it (1.20 answers 500, "expected list").
        let resource =
            ApiResource::from_gvk(&GroupVersionKind::gvk("conduit.io", "v1alpha1", kind));
        let api: Api<DynamicObject> =
            Api::namespaced_with(cluster.client.clone(), &cluster.namespace, &resource);
        let refused = api
            .create(&PostParams::default(), &object)
            .await
            .expect_err(&format!("{kind} {spec} refused by the schema"));
        let kube::Error::Api(status) = refused else {
            panic!("an API error, not {refused:?}")
        };
        assert_eq!(status.code, 422, "{kind} {spec}: {status:?}");
        assert!(status.message.contains(field), "{kind} {spec}: {status:?}");
    }

    controller.stop().await;
    cluster.cleanup().await;
}

/// The kubelet's probes pass a Server that denies them: the profile an injected proxy follows
/// for its pod's own address carries, in its policy, the paths of that pod's `httpGet` probes
/// on the port (by name or number), and no others; the Service's own profile carries none.
#[tokio::test]
async fn a_pods_probe_paths_reach_the_policy_of_its_own_address() {
    let Some(kubeconfig) = kubeconfig("a_pods_probe_paths_reach_the_policy_of_its_own_address")
    else {
        return;
    };
    let cluster = Cluster::new(&kubeconfig, "probes").await;
    let ns = cluster.namespace.clone();
    cluster
        .apply::<Service>(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        }))
        .await
        .unwrap();
    cluster
        .apply::<Server>(json!({
            "apiVersion": "conduit.io/v1alpha1", "kind": "Server",
            "metadata": {"name": "web-http"},
            "spec": {"service": "web", "port": "http", "default": "deny"},
        }))
        .await
        .unwrap();
    // An address of this run's own (see `authorization_policies_follow_the_api_server`).
    let suffix = u32::from_str_radix(ns.rsplit('-').next().unwrap(), 16).unwrap();
    let [_, a, b, c] = suffix.to_be_bytes();
    let ip = format!("10.{a}.{b}.{}", c.clamp(1, 254));
    cluster
        .apply::<Pod>(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "labels": {"app": "web"}, "annotations": {"conduit.io/proxy-version": "test"}},
            "spec": {"nodeName": NODE, "containers": [{
                "name": "app", "image": "app",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}, {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                "livenessProbe": {"httpGet": {"path": "/live?verbose=1", "port": 8080}},
                "startupProbe": {"httpGet": {"path": "/started", "port": "metrics"}},
            }]},
        }))
        .await
        .unwrap();
    let status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    cluster
        .api::<Pod>()
        .patch_status("web-1", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();

    let controller = Controller::start(&kubeconfig, "probes").await;
    let probe_paths = |p: &ServerPolicy| -> Vec<String> {
        p.probe_paths().iter().map(ToString::to_string).collect()
    };
    // What the pod's proxy follows: its own address, POD_IP:APP_PORT.
    let mut pod = controller.get_profile(&format!("{ip}:8080")).await;
    let update = until_policy(&mut pod, "the pod's probes admitted", |p| {
        p.is_some_and(|p| {
            p.default_policy() == DefaultPolicy::Deny && probe_paths(p) == ["/live", "/ready"]
        })
    })
    .await;
    let policy = update.profile.policy().unwrap();
    assert!(policy.is_probe(b"GET", b"/ready"));
    assert!(!policy.is_probe(b"POST", b"/ready"));
    assert!(
        !policy.is_probe(b"GET", b"/started"),
        "another port's probe"
    );
    // The Service's own name: the same policy, without one pod's probes.
    let mut service = controller
        .get_profile(&format!("web.{ns}.svc.cluster.local:80"))
        .await;
    until_policy(&mut service, "denied, without probes", |p| {
        p.is_some_and(|p| p.default_policy() == DefaultPolicy::Deny && !p.admits_probes())
    })
    .await;

    controller.stop().await;
    cluster.cleanup().await;
}

/// A TCP forwarder to the API server that the test can cut (every connection dropped, new ones
/// refused) and restore: the API server going away, as the controller sees it.
struct Forwarder {
    addr: SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(to: String) -> Self {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = {
            let up = std::sync::Arc::clone(&up);
            let connections = std::sync::Arc::clone(&connections);
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is closed at once
                    }
                    let to = to.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    connections.lock().unwrap().push(task.abort_handle());
                }
            })
        };
        Self {
            addr,
            up,
            connections,
            accept,
        }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// While the API server is unreachable the controller keeps serving what it last knew (a new
/// subscriber gets it too); when the server is back, the watches resume and a change made
/// meanwhile arrives.
#[tokio::test]
async fn the_last_known_state_serves_while_the_api_server_is_away() {
    let Some(kubeconfig) = kubeconfig("the_last_known_state_serves_while_the_api_server_is_away")
    else {
        return;
    };
    let cluster = Cluster::new(&kubeconfig, "away").await;
    let ns = cluster.namespace.clone();
    cluster
        .apply::<Service>(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "api"},
            "spec": {"selector": {"app": "api"}, "ports": [{"name": "grpc", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]},
        }))
        .await
        .unwrap();
    cluster.running_pod("api-1", "api", "10.9.1.1").await;

    // The controller reaches the API server through the forwarder.
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    let server = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("server: https://"))
        .expect("the kubeconfig names an https server")
        .to_owned();
    let forwarder = Forwarder::start(server.clone()).await;
    let dir = std::env::temp_dir().join(format!("conduit-kube-away-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let through = dir.join("kubeconfig");
    std::fs::write(&through, text.replace(&server, &forwarder.addr.to_string())).unwrap();

    let controller = Controller::start(&through, "away").await;
    let authority = format!("api.{ns}.svc.cluster.local:8080");
    let mut endpoints = controller.get(&authority).await;
    let mut set = BTreeSet::new();
    until_endpoints(&mut endpoints, &mut set, &["10.9.1.1:8080"]).await;

    forwarder.cut();
    cluster.running_pod("api-2", "api", "10.9.1.2").await;
    // A subscriber arriving now gets the last known state, not an error or an empty set.
    let mut late = controller.get(&authority).await;
    let mut late_set = BTreeSet::new();
    until_endpoints(&mut late, &mut late_set, &["10.9.1.1:8080"]).await;

    forwarder.restore();
    until_endpoints(
        &mut endpoints,
        &mut set,
        &["10.9.1.1:8080", "10.9.1.2:8080"],
    )
    .await;

    controller.stop().await;
    drop(forwarder);
    let _ = std::fs::remove_dir_all(&dir);
    cluster.cleanup().await;
}

/// Waits until the controller serves gRPC (it starts serving once its CA is ready).
async fn serving(controller: &Controller) {
    let mut stream = controller.get("nothing.here:80").await;
    within("the first answer", stream.message())
        .await
        .unwrap()
        .expect("stream open");
}

async fn holder(leases: &Api<Lease>, want: Option<&str>) -> String {
    let lease = within(
        &format!("the Lease held by {want:?}"),
        await_condition(leases.clone(), LEASE_NAME, |lease: Option<&Lease>| {
            let holder = lease
                .and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.as_deref());
            match want {
                Some(want) => holder == Some(want),
                None => holder.is_some_and(|h| !h.is_empty()),
            }
        }),
    )
    .await
    .unwrap()
    .unwrap();
    lease.spec.unwrap().holder_identity.unwrap()
}

/// Two replicas: the Lease's holder bootstraps the CA into a Secret and both load it; killed
/// (no release), its Lease passes to the other within the Lease's duration and the CA is not
/// regenerated; a replica started later loads the same CA; a holder stopped gracefully
/// releases the Lease to the remaining replica at once.
#[tokio::test]
async fn replicas_share_one_ca_and_the_lease_moves_when_its_holder_dies() {
    use conduit_controller::identity::TRUST_ANCHORS_FILE;
    let Some(kubeconfig) =
        kubeconfig("replicas_share_one_ca_and_the_lease_moves_when_its_holder_dies")
    else {
        return;
    };
    let cluster = Cluster::new(&kubeconfig, "lease").await;
    let singleton = |me: &str| Singleton {
        namespace: cluster.namespace.clone(),
        me: me.into(),
        lease: LEASE_NAME.into(),
        lease_duration: Duration::from_secs(2),
        identity_secret: Some("conduit-identity".into()),
        webhook: None,
    };
    let a = Controller::start_with(&kubeconfig, "lease-a", Some(singleton("a"))).await;
    let b = Controller::start_with(&kubeconfig, "lease-b", Some(singleton("b"))).await;
    serving(&a).await;
    serving(&b).await;

    let secrets: Api<Secret> = cluster.api();
    let secret = secrets.get("conduit-identity").await.unwrap();
    let anchors = secret.data.as_ref().unwrap()[TRUST_ANCHORS_FILE].0.clone();
    let on_disk = |controller: &Controller| {
        std::fs::read(controller.dir.join("identity").join(TRUST_ANCHORS_FILE)).unwrap()
    };
    assert_eq!(on_disk(&a), anchors);
    assert_eq!(on_disk(&b), anchors);
    // The anchors, public, are published for the injecting webhook.
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = cluster.api();
    let published = within("the trust anchors ConfigMap", async {
        loop {
            if let Ok(Some(map)) = maps.get_opt("conduit-identity-trust-anchors").await {
                return map;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(
        published.data.unwrap()["ca.crt"].as_bytes(),
        anchors.as_slice()
    );

    let leases: Api<Lease> = cluster.api();
    let first = holder(&leases, None).await;
    let (dead, alive, alive_name) = match first.as_str() {
        "a" => (a, b, "b"),
        "b" => (b, a, "a"),
        other => panic!("held by {other}"),
    };
    // Killed: its task is dropped mid-flight, and the Lease is not released.
    drop(dead);
    holder(&leases, Some(alive_name)).await;

    let after = secrets.get("conduit-identity").await.unwrap();
    assert_eq!(
        after.metadata.uid, secret.metadata.uid,
        "the Secret was not replaced"
    );
    assert_eq!(after.data.as_ref().unwrap()[TRUST_ANCHORS_FILE].0, anchors);

    let c = Controller::start_with(&kubeconfig, "lease-c", Some(singleton("c"))).await;
    serving(&c).await;
    assert_eq!(on_disk(&c), anchors);

    // Stopped gracefully, the holder releases the Lease and the other replica takes it.
    alive.stop().await;
    holder(&leases, Some("c")).await;
    c.stop().await;
    cluster.cleanup().await;
}

/// The webhook's serving certificate as the API server sees it: the MutatingWebhookConfiguration's
/// `caBundle` for the webhook calling `service`, and the Secret's chain and key.
async fn webhook_certificate(
    cluster: &Cluster,
    configuration: &str,
    service: &str,
) -> (Option<Vec<u8>>, Option<Secret>) {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(cluster.client.clone());
    let bundle = configurations
        .get(configuration)
        .await
        .unwrap()
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .find(|w| {
            w.client_config
                .service
                .as_ref()
                .is_some_and(|s| s.name == service)
        })
        .and_then(|w| w.client_config.ca_bundle)
        .map(|b| b.0);
    let secret = cluster
        .api::<Secret>()
        .get_opt("conduit-webhook-tls")
        .await
        .unwrap();
    (bundle, secret)
}

/// Whether the Secret holds a pair whose chain verifies for `host` against `bundle` now.
fn trusted(secret: &Secret, bundle: &[u8], host: &str) -> bool {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let data = secret.data.clone().unwrap_or_default();
    let (Some(crt), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) else {
        return false;
    };
    if rustls::pki_types::PrivateKeyDer::from_pem_slice(&key.0).is_err() {
        return false;
    }
    let Ok(chain) = CertificateDer::pem_slice_iter(&crt.0).collect::<Result<Vec<_>, _>>() else {
        return false;
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle) {
        roots.add(cert.unwrap()).unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    !chain.is_empty()
        && verifier
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &ServerName::try_from(host.to_owned()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .is_ok()
}

/// Waits (on watches) until the webhook configuration has a `caBundle` for our webhook and the
/// Secret holds a certificate that verifies against it for the webhook's Service name, and
/// returns that Secret.
async fn until_webhook_trusted(cluster: &Cluster, configuration: &str) -> Secret {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(cluster.client.clone());
    within(
        "the webhook's caBundle",
        await_condition(
            configurations,
            configuration,
            |c: Option<&MutatingWebhookConfiguration>| {
                c.and_then(|c| c.webhooks.as_ref())
                    .into_iter()
                    .flatten()
                    .any(|w| w.name == "inject.conduit.io" && w.client_config.ca_bundle.is_some())
            },
        ),
    )
    .await
    .unwrap();
    let (bundle, _) = webhook_certificate(cluster, configuration, "conduit-webhook").await;
    let bundle = bundle.unwrap();
    let host = format!("conduit-webhook.{}.svc", cluster.namespace);
    let secret = within(
        "the webhook's certificate",
        await_condition(
            cluster.api::<Secret>(),
            "conduit-webhook-tls",
            |s: Option<&Secret>| s.is_some_and(|s| trusted(s, &bundle, &host)),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    secret
}

/// With `--webhook-secret`, the Lease's holder issues the injecting webhook's serving
/// certificate into a `kubernetes.io/tls` Secret and sets the webhook configuration's
/// `caBundle` to the trust anchors (touching no other webhook); a new holder keeps a good
/// certificate and restores a cleared `caBundle`, and replaces a Secret whose key is garbled.
#[tokio::test]
async fn the_lease_holder_keeps_the_webhooks_certificate() {
    use conduit_controller::identity::TRUST_ANCHORS_FILE;
    use conduit_controller::identity::webhook::WebhookCertificate;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let Some(kubeconfig) = kubeconfig("the_lease_holder_keeps_the_webhooks_certificate") else {
        return;
    };
    let cluster = Cluster::new(&kubeconfig, "webhook-cert").await;
    let namespace = cluster.namespace.clone();
    let configuration = format!("conduit-proxy-injector-{namespace}");
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(cluster.client.clone());
    // Two webhooks: ours, without a caBundle (as the chart renders it without a certificate),
    // and another Service's, which must be left alone. Neither can ever be called: they
    // select no namespace, and would be ignored if they were.
    let webhook = |name: &str, service: &str| {
        json!({
            "name": name,
            "clientConfig": {"service": {"name": service, "namespace": namespace, "path": "/inject", "port": 443}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {"matchLabels": {"conduit-test": "never"}},
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
        })
    };
    configurations
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": configuration},
                "webhooks": [webhook("inject.conduit.io", "conduit-webhook"), webhook("other.example.com", "other")],
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let singleton = |me: &str| Singleton {
        namespace: namespace.clone(),
        me: me.into(),
        lease: LEASE_NAME.into(),
        lease_duration: Duration::from_secs(2),
        identity_secret: Some("conduit-identity".into()),
        webhook: Some(WebhookCertificate {
            secret: "conduit-webhook-tls".into(),
            configuration: configuration.clone(),
            service: "conduit-webhook".into(),
        }),
    };

    let a = Controller::start_with(&kubeconfig, "webhook-a", Some(singleton("a"))).await;
    serving(&a).await;
    let issued = until_webhook_trusted(&cluster, &configuration).await;
    let (bundle, _) = webhook_certificate(&cluster, &configuration, "conduit-webhook").await;
    let identity = cluster
        .api::<Secret>()
        .get("conduit-identity")
        .await
        .unwrap();
    assert_eq!(
        bundle.unwrap(),
        identity.data.unwrap()[TRUST_ANCHORS_FILE].0,
        "the caBundle is the mesh's trust anchors"
    );
    let (other, _) = webhook_certificate(&cluster, &configuration, "other").await;
    assert_eq!(other, None, "another Service's webhook was touched");
    a.stop().await;

    // A new holder keeps the good certificate, and puts back a caBundle someone cleared.
    configurations
        .patch(
            &configuration,
            &PatchParams::default(),
            &Patch::Strategic(json!({"webhooks": [{"name": "inject.conduit.io", "clientConfig": {"caBundle": null}}]})),
        )
        .await
        .unwrap();
    let b = Controller::start_with(&kubeconfig, "webhook-b", Some(singleton("b"))).await;
    let kept = until_webhook_trusted(&cluster, &configuration).await;
    assert_eq!(
        kept.metadata.resource_version, issued.metadata.resource_version,
        "a good certificate was replaced"
    );
    b.stop().await;

    // A garbled key: the next holder issues a new pair.
    cluster
        .api::<Secret>()
        .patch(
            "conduit-webhook-tls",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"tls.key": "garbage"}})),
        )
        .await
        .unwrap();
    let c = Controller::start_with(&kubeconfig, "webhook-c", Some(singleton("c"))).await;
    // `until_webhook_trusted` accepts only a usable key.
    let replaced = until_webhook_trusted(&cluster, &configuration).await;
    assert_ne!(
        replaced.data.unwrap()["tls.crt"].0,
        issued.data.unwrap()["tls.crt"].0
    );
    c.stop().await;
    let _ = configurations
        .delete(&configuration, &DeleteParams::default())
        .await;
    cluster.cleanup().await;
}

/// A token for the ServiceAccount `account`, for `audience`, from the API server's TokenRequest
/// API (what the kubelet projects into a pod).
async fn service_account_token(cluster: &Cluster, account: &str, audience: &str) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let accounts: Api<ServiceAccount> = cluster.api();
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_owned()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

/// A proxy in a pod proves its ServiceAccount with the token the kubelet projects for the
/// audience `identity.conduit.io`: the controller has the API server review it and certifies
/// that account's identity, and no other; a token for another audience, a forged token and a
/// deleted account's token prove nothing; the controller's own tokens still work beside them.
#[tokio::test]
async fn service_account_tokens_prove_their_accounts_identity() {
    use conduit_controller::identity::serviceaccount::AUDIENCE;
    use conduit_proto::pb::identity;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;
    let Some(kubeconfig) = kubeconfig("service_account_tokens_prove_their_accounts_identity")
    else {
        return;
    };
    let cluster = Cluster::new(&kubeconfig, "satoken").await;
    for account in ["web", "api"] {
        cluster
            .apply::<ServiceAccount>(json!({
                "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account},
            }))
            .await
            .unwrap();
    }
    let web_token = service_account_token(&cluster, "web", AUDIENCE).await;
    let web = conduit_core::identity::service_account_identity(
        &cluster.namespace,
        "web",
        "cluster.local",
    );
    let api = conduit_core::identity::service_account_identity(
        &cluster.namespace,
        "api",
        "cluster.local",
    );

    let controller = Controller::start(&kubeconfig, "satoken").await;
    let _ = controller.client().await;
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", controller.grpc_addr))
            .unwrap();
    let mut client = identity::identity_client::IdentityClient::new(endpoint.connect_lazy());
    let mut certify = async |name: &str, token: &[u8]| {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .serialize_request(&key)
            .unwrap();
        let request = identity::CertifyRequest {
            identity: name.to_owned(),
            token: token.to_vec(),
            certificate_signing_request: csr.der().to_vec(),
        };
        within("Certify", client.certify(request))
            .await
            .map(tonic::Response::into_inner)
    };

    // The account's own identity: a leaf naming it.
    let certified = certify(&web, web_token.as_bytes()).await.unwrap();
    let anchors = std::fs::read(
        controller
            .dir
            .join("identity")
            .join(conduit_controller::identity::TRUST_ANCHORS_FILE),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for anchor in rustls::pki_types::CertificateDer::pem_slice_iter(&anchors) {
        roots.add(anchor.unwrap()).unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    // Checked at the last second of the leaf's validity: the answer's own figure, not a clock.
    let at = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_millis(
        certified.valid_until_unix_ms,
    ));
    verifier
        .verify_server_cert(
            &certified.leaf_certificate.clone().into(),
            &[certified.intermediate_certificates[0].clone().into()],
            &rustls::pki_types::ServerName::try_from(web.as_str()).unwrap(),
            &[],
            at,
        )
        .expect("a leaf for the account's identity");
    // Another account's identity with this token: refused, naming both.
    let denied = certify(&api, web_token.as_bytes()).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains(&web), "{}", denied.message());
    // A token for another audience (the API server's own), a forged one, and the token of an
    // account since deleted: not authenticated.
    let other_audience =
        service_account_token(&cluster, "web", "https://kubernetes.default.svc").await;
    let mut forged = web_token.clone();
    forged.truncate(forged.len() - 4);
    forged.push_str("AAAA");
    for (what, token) in [("another audience", other_audience), ("forged", forged)] {
        let refused = certify(&web, token.as_bytes()).await.unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::Unauthenticated,
            "{what}: {refused:?}"
        );
    }
    let api_token = service_account_token(&cluster, "api", AUDIENCE).await;
    assert!(certify(&api, api_token.as_bytes()).await.is_ok());
    let accounts: Api<ServiceAccount> = cluster.api();
    accounts
        .delete("api", &DeleteParams::default())
        .await
        .unwrap();
    let refused = within("the deleted account's token to be refused", async {
        loop {
            match certify(&api, api_token.as_bytes()).await {
                Err(status) => return status,
                Ok(_) => tokio::task::yield_now().await,
            }
        }
    })
    .await;
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    // The controller's own tokens are still accepted.
    let own =
        conduit_controller::identity::issue_token(&controller.dir.join("identity"), &web).unwrap();
    assert!(certify(&web, own.as_bytes()).await.is_ok());

    controller.stop().await;
    cluster.cleanup().await;
}
