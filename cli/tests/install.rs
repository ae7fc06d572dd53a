//! `conduit install` and the Helm chart: one source, the same objects.
//!
//! - The chart's CRDs are the ones the controller derives from the serde types.
//! - With Helm (`CONDUIT_TEST_HELM`, the path of a `helm` binary; `ci/helm.sh` fetches one),
//!   `helm lint --strict` passes and `helm template` renders the same objects as
//!   `conduit install`, with the default and the HA values.
//! - With a real API server (`CONDUIT_TEST_KUBECONFIG`; `ci/kube-apiserver.sh`), every object
//!   of `conduit install` (default and HA) passes a server-side dry run: the API server's own
//!   validation, which offline checks miss (enums, unknown fields).
//!
//! Without either variable the tests that need it say they skipped and why, and pass.

#![allow(
    clippy::unwrap_used,
    reason = "test steps: any failed step fails the test"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use conduit_cli::install::{self, InstallOptions, Pki};

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/conduit")
}

fn env_path(var: &str, test: &str, how: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => {
            eprintln!("{test}: skipped: {var} is not set ({how}; .ci/run does)");
            None
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("conduit-install-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Clears the identity issuer from the values: the controller then bootstraps one.
fn without_issuer(values: &mut serde_yaml_ng::Value) {
    install::merge(
        values,
        serde_yaml_ng::from_str(
            "identity: {trustAnchorsPEM: '', issuer: {crtPEM: '', keyPEM: ''}}",
        )
        .unwrap(),
    );
}

/// Clears the webhook's certificate from the values: the controller then issues one.
fn without_webhook_certificate(values: &mut serde_yaml_ng::Value) {
    install::merge(
        values,
        serde_yaml_ng::from_str("webhook: {crtPEM: '', keyPEM: '', caBundlePEM: ''}").unwrap(),
    );
}

/// The values of `conduit install`, with the issuer and the webhook's certificate each given
/// or left to the controller.
fn values_with(
    options: &InstallOptions,
    pki: &Pki,
    issuer: bool,
    webhook: bool,
) -> serde_yaml_ng::Value {
    let mut values = install::values(options, pki).unwrap();
    if !issuer {
        without_issuer(&mut values);
    }
    if !webhook {
        without_webhook_certificate(&mut values);
    }
    values
}

fn options(ha: bool) -> InstallOptions {
    InstallOptions {
        ha,
        ..InstallOptions::default()
    }
}

#[test]
fn the_chart_carries_the_crds_the_controller_derives() {
    let chart = std::fs::read_to_string(chart_dir().join("crds/conduit.io.yaml")).unwrap();
    assert_eq!(
        chart,
        conduit_controller::crd::crds_yaml().unwrap(),
        "charts/conduit/crds/conduit.io.yaml is stale: regenerate it with \
         `conduit install --crds > charts/conduit/crds/conduit.io.yaml`"
    );
}

#[test]
fn the_chart_version_is_the_crate_version() {
    let chart = std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        chart.contains(&format!("\nversion: {version}\n")),
        "{chart}"
    );
    assert!(
        chart.contains(&format!("\nappVersion: {version}\n")),
        "{chart}"
    );
    let values = std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap();
    assert!(
        values.contains(&format!("\nversion: {version}\n")),
        "{values}"
    );
}

#[test]
fn a_missing_required_value_is_an_error_naming_it() {
    let pki = Pki {
        trust_anchors_pem: String::new(),
        issuer_crt_pem: "c".into(),
        issuer_key_pem: "k".into(),
        webhook_crt_pem: "c".into(),
        webhook_key_pem: "k".into(),
    };
    let err = install::install(&options(false), &pki).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("charts/conduit/templates/identity.yaml"),
        "{text}"
    );
    assert!(
        text.contains("identity.trustAnchorsPEM is required"),
        "{text}"
    );
    let err = install::install(
        &InstallOptions {
            webhook_failure_policy: "Ignor".into(),
            ..InstallOptions::default()
        },
        &Pki {
            trust_anchors_pem: "a".into(),
            ..pki
        },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("`Fail` or `Ignore`"), "{err:#}");
}

#[test]
fn helm_template_renders_what_conduit_install_renders() {
    let Some(helm) = env_path(
        "CONDUIT_TEST_HELM",
        "helm_template_renders_what_conduit_install_renders",
        "the path of a helm binary; ci/helm.sh prints the directory of one",
    ) else {
        return;
    };
    let dir = scratch("helm");
    let pki = install::generate_pki("conduit", "cluster.local").unwrap();
    // Default and HA values, with the issuer and the webhook's certificate given (as `conduit
    // install` does) or left to the controller to make under its Lease.
    for (ha, supplied, webhook) in [
        (false, true, true),
        (true, true, true),
        (false, false, true),
        (true, false, true),
        (false, true, false),
        (true, false, false),
    ] {
        let values = values_with(&options(ha), &pki, supplied, webhook);
        let values_file = dir.join(format!("values-{ha}-{supplied}-{webhook}.yaml"));
        std::fs::write(&values_file, serde_yaml_ng::to_string(&values).unwrap()).unwrap();
        let helm_cmd = |args: &[&str]| {
            let output = Command::new(&helm)
                .args(args)
                .arg(chart_dir())
                .arg("-f")
                .arg(&values_file)
                // Helm keeps its state under HOME; none of it is wanted here.
                .env("HOME", &dir)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "helm {args:?} (ha: {ha}): {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap()
        };
        helm_cmd(&["lint", "--strict"]);
        let by_helm = helm_cmd(&["template", "conduit", "--namespace", "conduit"]);
        let ours = install::render(&values, "conduit").unwrap();
        let (helm_objects, our_objects) = (
            install::objects(&by_helm).unwrap(),
            install::objects(&ours).unwrap(),
        );
        assert_eq!(
            helm_objects.keys().collect::<Vec<_>>(),
            our_objects.keys().collect::<Vec<_>>(),
            "ha: {ha}, issuer given: {supplied}, webhook certificate given: {webhook}"
        );
        for (key, object) in &helm_objects {
            assert_eq!(
                Some(object),
                our_objects.get(key),
                "{key} (ha: {ha}, issuer given: {supplied}, webhook certificate given: {webhook})"
            );
        }
        assert_eq!(
            our_objects.contains_key("PodDisruptionBudget/conduit/conduit-controller"),
            ha
        );
        assert_eq!(
            our_objects.contains_key("Role/conduit/conduit-controller"),
            !supplied || !webhook
        );
        // The webhook's Secret comes from the values, or from the controller, which is told
        // to issue it.
        assert_eq!(
            our_objects.contains_key("Secret/conduit/conduit-webhook-tls"),
            webhook
        );
        let controller =
            serde_json::to_string(&our_objects["Deployment/conduit/conduit-controller"]).unwrap();
        assert_eq!(
            controller.contains("--webhook-secret=conduit-webhook-tls"),
            !webhook,
            "{controller}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_api_server_accepts_every_object_of_the_install() {
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::core::GroupVersionKind;
    use kube::discovery::Scope;

    let Some(kubeconfig) = env_path(
        "CONDUIT_TEST_KUBECONFIG",
        "the_api_server_accepts_every_object_of_the_install",
        "start a local API server with `ci/kube-apiserver.sh start DIR` and set it to \
         DIR/kubeconfig",
    ) else {
        return;
    };
    let client = conduit_controller::discovery::kubernetes::client(Some(&kubeconfig))
        .await
        .unwrap();
    let namespace = {
        use std::hash::{BuildHasher as _, Hasher as _};
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        format!("conduit-{:08x}", random & 0xffff_ffff)
    };
    let pki = install::generate_pki(&namespace, "cluster.local").unwrap();
    for (ha, supplied, webhook) in [
        (false, true, true),
        (true, true, true),
        (true, false, true),
        (false, true, false),
        (true, false, false),
    ] {
        let options = InstallOptions {
            namespace: namespace.clone(),
            ha,
            // The test server is Kubernetes 1.20, which has no policy/v1.
            pdb_api_version: "policy/v1beta1".into(),
            ..InstallOptions::default()
        };
        let mut stream = install::install(&options, &pki).unwrap();
        if !supplied || !webhook {
            let values = values_with(&options, &pki, supplied, webhook);
            stream = install::render(&values, &namespace).unwrap();
            stream.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n"
            ));
        }
        let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
        let objects = install::objects(&stream).unwrap();
        // The namespace and the CRDs first, for real (the rest lives in them); the rest as
        // a dry run.
        let first = |object: &serde_yaml_ng::Value| {
            matches!(
                object.get("kind").and_then(serde_yaml_ng::Value::as_str),
                Some("Namespace" | "CustomResourceDefinition")
            )
        };
        let ordered = objects
            .iter()
            .filter(|(_, o)| first(o))
            .chain(objects.iter().filter(|(_, o)| !first(o)));
        for (key, object) in ordered {
            let json: serde_json::Value = serde_json::to_value(object).unwrap();
            let (group, version) = match json["apiVersion"].as_str().unwrap().split_once('/') {
                Some((group, version)) => (group.to_owned(), version.to_owned()),
                None => (
                    String::new(),
                    json["apiVersion"].as_str().unwrap().to_owned(),
                ),
            };
            let kind = json["kind"].as_str().unwrap();
            let gvk = GroupVersionKind::gvk(&group, &version, kind);
            let (resource, capabilities) = discovery
                .resolve_gvk(&gvk)
                .unwrap_or_else(|| panic!("the API server does not serve {gvk:?} ({key})"));
            let api: Api<DynamicObject> = match capabilities.scope {
                Scope::Namespaced => Api::namespaced_with(client.clone(), &namespace, &resource),
                Scope::Cluster => Api::all_with(client.clone(), &resource),
            };
            let name = json["metadata"]["name"].as_str().unwrap();
            let real = first(object);
            let mut params = PatchParams::apply("conduit-tests").force();
            if !real {
                params = params.dry_run();
            }
            if let Err(err) = api.patch(name, &params, &Patch::Apply(&json)).await {
                panic!(
                    "{key} (ha: {ha}, issuer given: {supplied}, webhook certificate given: \
                     {webhook}) refused: {err}"
                );
            }
        }
    }
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    let _ = namespaces
        .delete(&namespace, &kube::api::DeleteParams::default())
        .await;
}
