//! `conduit check --kubernetes`: is the mesh installed in this cluster, and working?
//!
//! One line per check, in the order a person would fix them: the API server answers; the CRDs
//! are installed and established; the controller's and the webhook's Deployments have every
//! replica available; the webhook's configuration points at its Service, and the webhook's
//! serving certificate is valid now, for its Service's name, and verifies against the
//! configuration's `caBundle` (what the API server will check on every pod it admits); the
//! mesh's trust anchors are published for the webhook and valid now; every meshed pod is Ready
//! and its proxy has an identity (mTLS).

use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::ListParams;
use kube::{Api, Client};

use crate::control::Check;

/// The annotation of a pod that has the proxy.
const PROXY_VERSION_ANNOTATION: &str = "conduit.io/proxy-version";

/// The annotation of an injected pod whose proxy has its ServiceAccount's identity.
const IDENTITY_MODE_ANNOTATION: &str = "conduit.io/identity-mode";

fn check(what: &str, outcome: Result<String, String>) -> Check {
    Check {
        what: what.to_owned(),
        outcome,
    }
}

/// Runs every check against the cluster `client` reaches, for the control plane installed in
/// `namespace`.
pub async fn checks(client: &Client, namespace: &str) -> Vec<Check> {
    let mut checks = Vec::new();
    match client.apiserver_version().await {
        Ok(version) => checks.push(check(
            "kubernetes-api",
            Ok(format!(
                "the API server answers (Kubernetes {}.{})",
                version.major, version.minor
            )),
        )),
        Err(err) => {
            checks.push(check(
                "kubernetes-api",
                Err(format!("cannot reach the API server: {err}")),
            ));
            return checks;
        }
    }

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in conduit_controller::crd::crds() {
        let name = crd.metadata.name.unwrap_or_default();
        let outcome = match crds.get_opt(&name).await {
            Ok(Some(installed)) => {
                let established = installed
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                let ours: Vec<_> = crd.spec.versions.iter().map(|v| &v.name).collect();
                let theirs: Vec<_> = installed.spec.versions.iter().map(|v| &v.name).collect();
                if !established {
                    Err(format!("{name} is installed but not established"))
                } else if ours != theirs {
                    Err(format!(
                        "{name} serves versions {theirs:?}, this release {ours:?}: apply `conduit install --crds`"
                    ))
                } else {
                    Ok(format!("{name} installed"))
                }
            }
            Ok(None) => Err(format!(
                "{name} is not installed: apply `conduit install --crds`"
            )),
            Err(err) => Err(format!("cannot read {name}: {err}")),
        };
        checks.push(check("crds", outcome));
    }

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    for (what, name) in [
        ("control-plane", "conduit-controller"),
        ("webhook", "conduit-webhook"),
    ] {
        let outcome = match deployments.get_opt(name).await {
            Ok(Some(deployment)) => {
                let want = deployment.spec.and_then(|s| s.replicas).unwrap_or(1);
                let available = deployment
                    .status
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0);
                if available >= want {
                    Ok(format!(
                        "{namespace}/{name}: {available} of {want} replicas available"
                    ))
                } else {
                    Err(format!(
                        "{namespace}/{name}: {available} of {want} replicas available"
                    ))
                }
            }
            Ok(None) => Err(format!(
                "no Deployment {namespace}/{name}: is Conduit installed in `{namespace}`?"
            )),
            Err(err) => Err(format!("cannot read {namespace}/{name}: {err}")),
        };
        checks.push(check(what, outcome));
    }

    checks.push(check(
        "webhook-certificate",
        webhook_certificate(client, namespace).await,
    ));
    checks.push(check(
        "trust-anchors",
        trust_anchors(client, namespace).await,
    ));
    match meshed_pods(client).await {
        Ok(meshed) => {
            checks.push(check("proxies", proxies(&meshed)));
            checks.push(check("proxy-identity", proxy_identity(&meshed)));
        }
        Err(err) => checks.push(check("proxies", Err(err))),
    }
    checks
}

/// The trust anchors the webhook gives every proxy (the ConfigMap
/// `conduit-identity-trust-anchors`) are there, are PEM certificates, and are all valid now.
async fn trust_anchors(client: &Client, namespace: &str) -> Result<String, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let name = conduit_controller::identity::secret::TRUST_ANCHORS_CONFIG_MAP;
    let key = conduit_controller::identity::secret::TRUST_ANCHORS_KEY;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let map = maps
        .get_opt(name)
        .await
        .map_err(|err| format!("cannot read the ConfigMap {namespace}/{name}: {err}"))?
        .ok_or_else(|| {
            format!(
                "no ConfigMap {namespace}/{name}: the webhook cannot give proxies an identity \
                 (the controller publishes it when it bootstraps the CA; the chart renders it \
                 from identity.trustAnchorsPEM)"
            )
        })?;
    let pem = map
        .data
        .and_then(|d| d.get(key).cloned())
        .ok_or_else(|| format!("{namespace}/{name} has no `{key}`"))?;
    let anchors = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("{namespace}/{name} `{key}` is not PEM: {err}"))?;
    if anchors.is_empty() {
        return Err(format!("{namespace}/{name} `{key}` holds no certificate"));
    }
    let now = i64::try_from(rustls::pki_types::UnixTime::now().as_secs()).unwrap_or(i64::MAX);
    let mut soonest = i64::MAX;
    for anchor in &anchors {
        let (_, cert) = x509_parser::parse_x509_certificate(anchor)
            .map_err(|err| format!("{namespace}/{name}: an anchor does not parse: {err}"))?;
        let validity = cert.validity();
        if validity.not_before.timestamp() > now || validity.not_after.timestamp() <= now {
            return Err(format!(
                "{namespace}/{name}: the anchor `{}` is not valid now (from {} to {})",
                cert.subject(),
                validity.not_before,
                validity.not_after
            ));
        }
        soonest = soonest.min(validity.not_after.timestamp());
    }
    Ok(format!(
        "{} trust anchor{} published for the webhook, the first to expire in {} days",
        anchors.len(),
        if anchors.len() == 1 { "" } else { "s" },
        (soonest - now) / 86_400
    ))
}

/// The pods that carry the proxy, cluster-wide.
async fn meshed_pods(client: &Client) -> Result<Vec<Pod>, String> {
    let pods: Api<Pod> = Api::all(client.clone());
    let list = pods
        .list(&ListParams::default())
        .await
        .map_err(|err| format!("cannot list pods: {err}"))?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| {
            p.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(PROXY_VERSION_ANNOTATION))
        })
        .collect())
}

fn pod_name(p: &Pod) -> String {
    format!(
        "{}/{}",
        p.metadata.namespace.as_deref().unwrap_or(""),
        p.metadata.name.as_deref().unwrap_or("")
    )
}

/// "a, b, c, ..." of at most ten names.
fn some_of(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(10).map(String::as_str).collect();
    format!(
        "{}{}",
        shown.join(", "),
        if names.len() > shown.len() {
            ", ..."
        } else {
            ""
        }
    )
}

/// Every meshed pod's proxy has an identity: without one its traffic to other pods is
/// plaintext, and policies naming identities cannot admit it.
fn proxy_identity(meshed: &[Pod]) -> Result<String, String> {
    let without: Vec<String> = meshed
        .iter()
        .filter(|p| {
            p.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(IDENTITY_MODE_ANNOTATION))
                .is_none_or(|mode| mode != "default")
        })
        .map(pod_name)
        .collect();
    if without.is_empty() {
        Ok(format!(
            "{} meshed pods, all with their ServiceAccount's identity",
            meshed.len()
        ))
    } else {
        Err(format!(
            "{} of {} meshed pods have no identity (injected without trust anchors; their \
             traffic is plaintext): {}",
            without.len(),
            meshed.len(),
            some_of(&without)
        ))
    }
}

/// The webhook configuration points at the webhook's Service, and the serving certificate in
/// its Secret verifies for the Service's name against the configuration's CA bundle.
async fn webhook_certificate(client: &Client, namespace: &str) -> Result<String, String> {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    let name = format!("conduit-proxy-injector-{namespace}");
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = configs
        .get_opt(&name)
        .await
        .map_err(|err| format!("cannot read the MutatingWebhookConfiguration {name}: {err}"))?
        .ok_or_else(|| format!("no MutatingWebhookConfiguration {name}"))?;
    let webhook = config
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .next()
        .ok_or_else(|| format!("{name} has no webhook"))?;
    let service = webhook
        .client_config
        .service
        .as_ref()
        .filter(|s| s.name == "conduit-webhook" && s.namespace == namespace)
        .ok_or_else(|| format!("{name} does not call the Service {namespace}/conduit-webhook"))?;
    let _ = service;
    let bundle = webhook
        .client_config
        .ca_bundle
        .ok_or_else(|| format!("{name} has no caBundle"))?;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt("conduit-webhook-tls")
        .await
        .map_err(|err| format!("cannot read the Secret {namespace}/conduit-webhook-tls: {err}"))?
        .ok_or_else(|| format!("no Secret {namespace}/conduit-webhook-tls"))?;
    let chain_pem = secret
        .data
        .and_then(|d| d.get("tls.crt").cloned())
        .ok_or_else(|| format!("{namespace}/conduit-webhook-tls has no tls.crt"))?;

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bundle.0) {
        let cert = cert.map_err(|err| format!("{name}'s caBundle is not PEM: {err}"))?;
        roots
            .add(cert)
            .map_err(|err| format!("{name}'s caBundle holds an unusable certificate: {err}"))?;
    }
    let chain = CertificateDer::pem_slice_iter(&chain_pem.0)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("the webhook's tls.crt is not PEM: {err}"))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| "the webhook's tls.crt holds no certificate".to_owned())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|err| format!("{name}'s caBundle: {err}"))?;
    let host = format!("conduit-webhook.{namespace}.svc");
    let server = ServerName::try_from(host.clone()).map_err(|err| err.to_string())?;
    verifier
        .verify_server_cert(leaf, intermediates, &server, &[], UnixTime::now())
        .map_err(|err| {
            format!("the webhook's certificate does not verify for {host} against {name}'s caBundle: {err}")
        })?;
    let days = x509_parser::parse_x509_certificate(leaf)
        .ok()
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .and_then(|not_after| {
            let now = i64::try_from(UnixTime::now().as_secs()).ok()?;
            Some((not_after - now) / 86_400)
        });
    Ok(match days {
        Some(days) => {
            format!("valid for {host} for {days} more days, trusted by the webhook configuration")
        }
        None => format!("valid for {host}, trusted by the webhook configuration"),
    })
}

/// Every meshed pod (one carrying the proxy) is Ready.
fn proxies(meshed: &[Pod]) -> Result<String, String> {
    let not_ready: Vec<String> = meshed
        .iter()
        .filter(|p| {
            !p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(pod_name)
        .collect();
    if not_ready.is_empty() {
        Ok(format!("{} meshed pods, all Ready", meshed.len()))
    } else {
        Err(format!(
            "{} of {} meshed pods are not Ready: {}",
            not_ready.len(),
            meshed.len(),
            some_of(&not_ready)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, identity: bool) -> Pod {
        let mut annotations = serde_json::json!({PROXY_VERSION_ANNOTATION: "0.1.0"});
        if identity {
            annotations[IDENTITY_MODE_ANNOTATION] = "default".into();
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
        }))
        .expect("a pod")
    }

    #[test]
    fn meshed_pods_without_identity_are_named() {
        assert_eq!(
            proxy_identity(&[pod("a", true), pod("b", true)]),
            Ok("2 meshed pods, all with their ServiceAccount's identity".into())
        );
        let Err(reason) = proxy_identity(&[pod("a", true), pod("b", false)]) else {
            panic!("b has no identity")
        };
        assert!(
            reason.starts_with("1 of 2 meshed pods have no identity"),
            "{reason}"
        );
        assert!(reason.ends_with("shop/b"), "{reason}");
    }
}
