//! The injecting admission webhook called by a real API server (kube-apiserver v1.20 on
//! loopback: `ci/kube-apiserver.sh start DIR`, then `CONDUIT_TEST_KUBECONFIG=DIR/kubeconfig`).
//! Without that variable the test says it skipped and why, and passes.
//!
//! The API server calls the webhook at `https://127.0.0.1:PORT/inject` with the test's own
//! self-signed certificate as the configuration's `caBundle`. The configuration selects only
//! the test's namespace (by a label), so nothing else on the server is affected.

#![allow(
    clippy::unwrap_used,
    reason = "test steps: any failed step fails the test"
)]

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use conduit_cli::inject::{INIT_CONTAINER, PROXY_CONTAINER};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

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

fn random_suffix() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{:08x}", random & 0xffff_ffff)
}

fn pod(name: &str) -> Pod {
    // The ServiceAccount is named as a cluster's ServiceAccount admission plugin (off on the
    // test server) names it before any webhook sees the pod.
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "app", "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]},
    }))
    .unwrap()
}

/// Creates pods `NAME-0`, `NAME-1`, ... until one's outcome is what the webhook
/// configuration just applied calls for (`configured`): the API server picks up a changed
/// configuration asynchronously, so a pod created at once may still meet the previous one.
/// Bounded by [`WAIT`]; a short pause between attempts keeps the API server from a busy loop.
async fn create_once_configured(
    pods: &Api<Pod>,
    name: &str,
    configured: impl Fn(&Result<Pod, kube::Error>) -> bool,
) -> Result<Pod, kube::Error> {
    within(&format!("pod {name} admitted as configured"), async {
        for attempt in 0.. {
            let created = pods
                .create(&PostParams::default(), &pod(&format!("{name}-{attempt}")))
                .await;
            if configured(&created) {
                return created;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        unreachable!("the loop only ends by returning")
    })
    .await
}

fn container_names(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let spec = pod.spec.as_ref().unwrap();
    let names = |list: &[k8s_openapi::api::core::v1::Container]| {
        list.iter().map(|c| c.name.clone()).collect::<Vec<_>>()
    };
    (
        names(&spec.containers),
        names(spec.init_containers.as_deref().unwrap_or_default()),
    )
}

/// A pod created in a selected namespace comes back with the proxy and init containers; with
/// the webhook down, `failurePolicy: Fail` refuses the pod and `Ignore` admits it unmodified.
#[tokio::test]
async fn the_api_server_injects_pods_through_the_webhook() {
    let Some(kubeconfig) = kubeconfig("the_api_server_injects_pods_through_the_webhook") else {
        return;
    };
    let client: Client = conduit_controller::discovery::kubernetes::client(Some(&kubeconfig))
        .await
        .unwrap();

    // The webhook process (`conduit inject-webhook`), over TLS with a certificate for
    // 127.0.0.1, on a port picked free just before.
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("conduit-kube-webhook-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    // The mesh's trust anchors, as the chart mounts them: every injected proxy gets an
    // identity.
    let anchors = dir.join("ca.crt");
    let anchors_pem = rcgen::generate_simple_self_signed(vec!["root.conduit.test".to_owned()])
        .unwrap()
        .cert
        .pem();
    std::fs::write(&anchors, &anchors_pem).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // kill_on_drop: the process ends with the test however the test ends.
    let mut webhook = tokio::process::Command::new(env!("CARGO_BIN_EXE_conduit"))
        .arg("inject-webhook")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--identity-trust-anchors")
        .arg(&anchors)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    within("the webhook to listen", async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::task::yield_now().await;
        }
    })
    .await;

    let suffix = random_suffix();
    let ns = format!("inject-{suffix}");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": ns, "labels": {"conduit-test-webhook": ns}}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let config_name = format!("conduit-test-{suffix}");
    let config = |failure_policy: &str| {
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": config_name},
            "webhooks": [{
                "name": "inject.conduit.io",
                "clientConfig": {
                    "url": format!("https://127.0.0.1:{port}/inject"),
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(certified.cert.pem()),
                },
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "namespaceSelector": {"matchLabels": {"conduit-test-webhook": ns}},
                "failurePolicy": failure_policy,
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
            }],
        })
    };
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let apply = PatchParams::apply("conduit-tests").force();
    configs
        .patch(&config_name, &apply, &Patch::Apply(config("Fail")))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // Injected: the API server stored what the webhook's patch made of the pod.
    let created = create_once_configured(&pods, "web", |created| {
        created
            .as_ref()
            .is_ok_and(|pod| container_names(pod).0.len() == 2)
    })
    .await
    .unwrap();
    let (containers, init) = container_names(&created);
    assert_eq!(containers, [PROXY_CONTAINER, "app"]);
    assert_eq!(init, [INIT_CONTAINER]);
    let annotations = created.metadata.annotations.unwrap_or_default();
    assert_eq!(
        annotations
            .get("conduit.io/proxy-version")
            .map(String::as_str),
        Some("0.1.0")
    );
    // Its identity: the pod's ServiceAccount, proven with a token the kubelet projects for the
    // controller's audience; the anchors as the file held them; discovery told by the
    // annotation.
    assert_eq!(
        annotations
            .get("conduit.io/identity-mode")
            .map(String::as_str),
        Some("default")
    );
    let spec = created.spec.as_ref().unwrap();
    let proxy = &spec.containers[0];
    let env = |name: &str| {
        proxy
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        env("CONDUIT_PROXY_IDENTITY_NAME").as_deref(),
        Some("$(_CONDUIT_POD_SA).$(_CONDUIT_POD_NS).serviceaccount.identity.conduit.cluster.local")
    );
    assert_eq!(
        env("CONDUIT_PROXY_IDENTITY_TRUST_ANCHORS_PEM").as_deref(),
        Some(anchors_pem.as_str())
    );
    let token = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "conduit-identity-token")
        .and_then(|v| v.projected.as_ref())
        .and_then(|p| p.sources.as_ref())
        .and_then(|s| s[0].service_account_token.clone())
        .expect("a projected ServiceAccount token");
    assert_eq!(token.audience.as_deref(), Some("identity.conduit.io"));
    let mount = proxy.volume_mounts.iter().flatten().next().unwrap();
    assert_eq!(mount.name, "conduit-identity-token");
    assert_eq!(
        env("CONDUIT_PROXY_IDENTITY_TOKEN_FILE"),
        Some(format!("{}/token", mount.mount_path))
    );

    // The anchors unreadable: the webhook refuses rather than admit a proxy without identity
    // (failurePolicy Fail refuses the pod).
    std::fs::remove_file(&anchors).unwrap();
    let refused = within(
        "a refusal",
        pods.create(&PostParams::default(), &pod("no-anchors")),
    )
    .await
    .expect_err("the anchors cannot be read");
    assert!(refused.to_string().contains("trust anchors"), "{refused}");
    std::fs::remove_dir_all(&dir).unwrap();

    // The webhook process killed, failurePolicy Fail: refused, saying why.
    webhook.kill().await.unwrap();
    let refused = within(
        "a refusal",
        pods.create(&PostParams::default(), &pod("refused")),
    )
    .await
    .expect_err("no webhook, failurePolicy Fail");
    assert!(
        refused.to_string().contains("failed calling webhook"),
        "{refused}"
    );

    // failurePolicy Ignore: admitted as written.
    configs
        .patch(&config_name, &apply, &Patch::Apply(config("Ignore")))
        .await
        .unwrap();
    let admitted = create_once_configured(&pods, "plain", Result::is_ok)
        .await
        .unwrap();
    let (containers, init) = container_names(&admitted);
    assert_eq!(containers, ["app"]);
    assert_eq!(init, Vec::<String>::new());

    let _ = configs.delete(&config_name, &DeleteParams::default()).await;
    let _ = pods
        .delete_collection(
            &DeleteParams::default().grace_period(0),
            &kube::api::ListParams::default(),
        )
        .await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}

/// Applies every object of a YAML stream for real: namespaces and CRDs first.
async fn apply_all(client: &Client, namespace: &str, stream: &str) {
    use kube::core::GroupVersionKind;
    use kube::discovery::Scope;
    let objects = conduit_cli::install::objects(stream).unwrap();
    let first = |object: &serde_yaml_ng::Value| {
        matches!(
            object.get("kind").and_then(serde_yaml_ng::Value::as_str),
            Some("Namespace" | "CustomResourceDefinition")
        )
    };
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    let ordered = objects
        .values()
        .filter(|o| first(o))
        .chain(objects.values().filter(|o| !first(o)));
    for object in ordered {
        let json = serde_json::to_value(object).unwrap();
        let api_version = json["apiVersion"].as_str().unwrap();
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, json["kind"].as_str().unwrap());
        let (resource, capabilities) = discovery.resolve_gvk(&gvk).unwrap();
        let api: Api<kube::api::DynamicObject> = match capabilities.scope {
            Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, &resource),
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        api.patch(
            json["metadata"]["name"].as_str().unwrap(),
            &PatchParams::apply("conduit-tests").force(),
            &Patch::Apply(&json),
        )
        .await
        .unwrap();
    }
}

fn outcome<'a>(
    checks: &'a [conduit_cli::control::Check],
    what: &str,
) -> &'a Result<String, String> {
    &checks
        .iter()
        .find(|c| c.what == what)
        .unwrap_or_else(|| panic!("no check {what}"))
        .outcome
}

/// `conduit check --kubernetes` on an install: the API, the CRDs and the webhook's
/// certificate pass; the Deployments fail until their replicas are available (status patched
/// as the Deployment controller would); a webhook certificate the configuration does not
/// trust fails, saying so.
#[tokio::test]
async fn check_reports_the_installation_as_it_is() {
    let Some(kubeconfig) = kubeconfig("check_reports_the_installation_as_it_is") else {
        return;
    };
    let client: Client = conduit_controller::discovery::kubernetes::client(Some(&kubeconfig))
        .await
        .unwrap();
    let namespace = format!("check-{}", random_suffix());
    let options = conduit_cli::install::InstallOptions {
        namespace: namespace.clone(),
        pdb_api_version: "policy/v1beta1".into(),
        ..conduit_cli::install::InstallOptions::default()
    };
    let pki = conduit_cli::install::generate_pki(&namespace, "cluster.local").unwrap();
    apply_all(
        &client,
        &namespace,
        &conduit_cli::install::install(&options, &pki).unwrap(),
    )
    .await;

    let checks = conduit_cli::kube_check::checks(&client, &namespace).await;
    let (text, passed) = conduit_cli::control::render_checks(&checks);
    assert!(!passed, "{text}");
    assert!(outcome(&checks, "kubernetes-api").is_ok(), "{text}");
    assert!(outcome(&checks, "crds").is_ok(), "{text}");
    assert!(outcome(&checks, "webhook-certificate").is_ok(), "{text}");
    assert!(
        outcome(&checks, "trust-anchors")
            .as_ref()
            .is_ok_and(|ok| ok.contains("1 trust anchor published")),
        "{text}"
    );
    let Err(reason) = outcome(&checks, "control-plane") else {
        panic!("{text}")
    };
    assert!(reason.contains("0 of 1 replicas available"), "{text}");

    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &namespace);
    for name in ["conduit-controller", "conduit-webhook"] {
        deployments
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"status": {"replicas": 1, "availableReplicas": 1, "readyReplicas": 1}}),
                ),
            )
            .await
            .unwrap();
    }
    let checks = conduit_cli::kube_check::checks(&client, &namespace).await;
    let (text, _) = conduit_cli::control::render_checks(&checks);
    assert!(outcome(&checks, "control-plane").is_ok(), "{text}");
    assert!(outcome(&checks, "webhook").is_ok(), "{text}");

    // A serving certificate the webhook configuration does not trust.
    let stranger =
        rcgen::generate_simple_self_signed(vec![format!("conduit-webhook.{namespace}.svc")])
            .unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), &namespace);
    secrets
        .patch(
            "conduit-webhook-tls",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"tls.crt": stranger.cert.pem()}})),
        )
        .await
        .unwrap();
    let checks = conduit_cli::kube_check::checks(&client, &namespace).await;
    let (text, _) = conduit_cli::control::render_checks(&checks);
    let Err(reason) = outcome(&checks, "webhook-certificate") else {
        panic!("{text}")
    };
    assert!(reason.contains("does not verify"), "{text}");

    // No published trust anchors: the webhook could not give proxies an identity.
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), &namespace);
    maps.delete("conduit-identity-trust-anchors", &DeleteParams::default())
        .await
        .unwrap();
    let checks = conduit_cli::kube_check::checks(&client, &namespace).await;
    let (text, _) = conduit_cli::control::render_checks(&checks);
    let Err(reason) = outcome(&checks, "trust-anchors") else {
        panic!("{text}")
    };
    assert!(reason.contains("no ConfigMap"), "{text}");

    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let _ = configs
        .delete(
            &format!("conduit-proxy-injector-{namespace}"),
            &DeleteParams::default(),
        )
        .await;
    let namespaces: Api<Namespace> = Api::all(client);
    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
}
